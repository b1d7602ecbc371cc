//! The Rust API: create or open a region, attach it at a granule-aligned address, detach.
//!
//! A region is a file on an msharefs mount (or, without the daemon, a file on a hugetlbfs
//! mount: the "direct" mode the foundation tests use). The data flow of an attach:
//!
//! [`Region::attach`] calls the client core ([`crate::client::attach`]): for hugetlb
//! regions on msharefs it passes our msharefs descriptor to the daemon's attach socket and
//! maps the backing it gets back at a 1 GiB-aligned address, so every attacher's PMD
//! tables line up with the daemon's host mapping and the kernel shares them; for thp and
//! shmem regions it maps the msharefs file itself (FUSE passthrough). In direct mode it
//! maps the hugetlbfs file.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::{consts, fd as kfd};

use crate::client::{self, Cover};
use crate::uapi::{self, Backing, MshareRegionInfo};

#[derive(Debug)]
enum Kind {
    /// A file on a hugetlbfs mount, used without the daemon.
    Direct,
    /// A region file on msharefs, as its daemon described it.
    Msharefs { info: Box<MshareRegionInfo> },
    /// A region file on msharefs whose daemon linked its attach socket under the file's
    /// device number (`client::socket_by_dev`), not asked anything yet: its first attach
    /// asks that socket for the backing, whose reply carries the info too, which spares
    /// the `GET_INFO` round trip. Whatever needs the info before asks `GET_INFO`.
    Unasked { socket: client::ByDev },
}

/// The open file of a region and what its daemon said about it. Replaced as a whole
/// when the region is reopened after a daemon restart.
#[derive(Debug)]
struct Open {
    fd: OwnedFd,
    /// For [`Kind::Unasked`], the size `fstat` reports, until the daemon is asked.
    size: u64,
    /// For [`Kind::Unasked`], `Default`, until the daemon is asked.
    backing: Backing,
    kind: Kind,
}

impl Open {
    /// Records what the daemon said of a region not asked yet.
    fn learn(&mut self, info: MshareRegionInfo) -> io::Result<()> {
        if matches!(self.kind, Kind::Unasked { .. }) {
            self.backing =
                Backing::from_raw(info.backing).ok_or_else(|| kernel_glue::errno(EINVAL))?;
            self.size = info.size;
            self.kind = Kind::Msharefs {
                info: Box::new(info),
            };
        }
        Ok(())
    }
}

/// An open region. Dropping it closes the descriptor; attachments stay valid.
///
/// A region survives a restart of its daemon (crash or `umount` and `mount` with the same
/// state directory): its descriptor then belongs to the old, dead FUSE connection, so
/// when an attach or an object ioctl fails and the descriptor answers `ENOTCONN` or
/// `ECONNABORTED`, the region is opened again by its path (with the same access mode),
/// checked to be the same region (inode number, size, backing; `ESTALE` otherwise) and
/// the call is repeated once. While the daemon is down such calls fail with `ENOTCONN`.
#[derive(Debug)]
pub struct Region {
    open: RwLock<Open>,
    /// Absolute path it was opened by, for reopening.
    path: PathBuf,
    /// Inode number of the region file (msharefs keeps it across restarts).
    ino: u64,
    writable: bool,
}

/// The `Open` of a region file on msharefs.
fn msharefs_open(fd: OwnedFd) -> io::Result<Open> {
    let info = client::info(fd.as_fd())?;
    msharefs_opened(fd, info)
}

/// The region open as `fd`, whose GET_INFO answered `info`.
fn msharefs_opened(fd: OwnedFd, info: MshareRegionInfo) -> io::Result<Open> {
    Ok(Open {
        size: info.size,
        backing: Backing::from_raw(info.backing).ok_or_else(|| kernel_glue::errno(EINVAL))?,
        kind: Kind::Msharefs {
            info: Box::new(info),
        },
        fd,
    })
}

impl Region {
    /// Creates a region with `O_EXCL` semantics, sets its size (reserving its memory) and
    /// returns it open read-write. On any failure the new file is removed again.
    ///
    /// On msharefs the name appears atomically, with its backing and size already set:
    /// the region is built as `DIR/.mshare-new.PID.N` and renamed into place
    /// (`RENAME_NOREPLACE`). If the process dies in between, the daemon removes the
    /// hidden region once sized (see [`uapi::CREATING_PREFIX`]).
    ///
    /// # Errors
    /// `EINVAL` for a zero size or one that is not a multiple of the backing's page size;
    /// `EEXIST` when the path exists; `ENOMEM`/`ENOSPC` when the memory cannot be had;
    /// `ENODEV` when `path` is not on msharefs or hugetlbfs; any open errno.
    pub fn create(path: &Path, size: u64, mode: u32, backing: Backing) -> io::Result<Region> {
        if size == 0 || size % backing.page_size() != 0 || mode & !0o7777 != 0 {
            return Err(kernel_glue::errno(EINVAL));
        }
        let dir = parent_dir(path);
        let direct = is_direct(dir)?;
        if direct && !matches!(backing, Backing::Default | Backing::Hugetlb) {
            return Err(kernel_glue::errno(EINVAL));
        }
        if direct && size % kernel_glue::HUGE_PAGE_SIZE != 0 {
            return Err(kernel_glue::errno(EINVAL));
        }
        if direct {
            let fd = kfd::open(
                path,
                consts::O_RDWR | consts::O_CREAT | consts::O_EXCL,
                mode,
            )?;
            // Reserve and allocate every huge page now: a short pool fails here, never
            // as a SIGBUS in an attacher later.
            kfd::fallocate(&fd, 0, size).inspect_err(|_| {
                let _ = std::fs::remove_file(path);
            })?;
            let open = Open {
                fd,
                size,
                backing: Backing::Hugetlb,
                kind: Kind::Direct,
            };
            return Self::new(path, open, true).inspect_err(|_| {
                let _ = std::fs::remove_file(path);
            });
        }
        // The client core builds it under a hidden name and renames it into place.
        let c = |p: &std::ffi::OsStr| {
            std::ffi::CString::new(p.as_bytes()).map_err(|_| kernel_glue::errno(EINVAL))
        };
        let name = path.file_name().ok_or_else(|| kernel_glue::errno(EINVAL))?;
        let fd = client::create(&c(dir.as_os_str())?, Some(&c(name)?), size, mode, backing)?;
        msharefs_open(fd)
            .and_then(|open| Self::new(path, open, true))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(path);
            })
    }

    fn new(path: &Path, open: Open, writable: bool) -> io::Result<Region> {
        let ino = kfd::fstat(&open.fd)?.ino;
        Self::with_ino(path, open, writable, ino)
    }

    /// [`Region::new`] for a caller that has `open`'s inode number already.
    fn with_ino(path: &Path, open: Open, writable: bool, ino: u64) -> io::Result<Region> {
        Ok(Region {
            ino,
            path: std::path::absolute(path)?,
            open: RwLock::new(open),
            writable,
        })
    }

    /// Removes the region `path`. Its memory is freed once no process has it open or
    /// attached.
    ///
    /// # Errors
    /// `ENODEV` when `path` is not on msharefs or hugetlbfs; any `unlink` errno.
    pub fn unlink(path: &Path) -> io::Result<()> {
        is_direct(parent_dir(path))?;
        std::fs::remove_file(path)
    }

    /// Opens an existing region; `oflags` access mode is `O_RDONLY` or `O_RDWR`.
    ///
    /// # Errors
    /// `EINVAL` for another access mode or extra flags; `ENODEV` when the file is not a
    /// region; any open errno (`ENOENT`, `EACCES`, ...).
    pub fn open(path: &Path, oflags: i32) -> io::Result<Region> {
        let acc = oflags & consts::O_ACCMODE;
        if oflags & !(consts::O_ACCMODE) != 0 || !(acc == consts::O_RDONLY || acc == consts::O_RDWR)
        {
            return Err(kernel_glue::errno(EINVAL));
        }
        let fd = kfd::open(path, oflags, 0)?;
        let writable = acc == consts::O_RDWR;
        let st = kfd::fstat(&fd)?;
        // A file of an msharefs mount whose daemon linked its socket under the mount's
        // device number: nothing to ask now (see `Kind::Unasked`).
        if st.mode & libc::S_IFMT == libc::S_IFREG && st.ino != uapi::MSHARE_INFO_INO {
            if let Some(socket) = client::socket_by_dev(st.dev) {
                let open = Open {
                    fd,
                    size: st.size,
                    backing: Backing::Default,
                    kind: Kind::Unasked { socket },
                };
                return Self::with_ino(path, open, writable, st.ino);
            }
        }
        // A region of msharefs answers GET_INFO: ask it first, which spares the round trip
        // to the daemon that `fstatfs` of a FUSE file costs. Only a regular file is asked
        // (a device would read the ioctl as its own); another file system answers ENOTTY
        // (ENODEV here), and `fstatfs` then tells hugetlbfs from the rest.
        let info = if st.mode & libc::S_IFMT == libc::S_IFREG {
            match client::info(fd.as_fd()) {
                Ok(info) => Some(info),
                Err(e) if e.raw_os_error() == Some(ENODEV) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let open = match info {
            Some(info) => msharefs_opened(fd, info)?,
            None => match kfd::fstatfs(&fd)?.fs_type {
                kernel_glue::HUGETLBFS_MAGIC => Open {
                    size: st.size,
                    fd,
                    backing: Backing::Hugetlb,
                    kind: Kind::Direct,
                },
                kernel_glue::FUSE_SUPER_MAGIC => msharefs_open(fd)?,
                _ => return Err(kernel_glue::errno(ENODEV)),
            },
        };
        Self::with_ino(path, open, writable, st.ino)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Open> {
        self.open.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open region, with what its daemon says of it: a region not asked yet is asked
    /// now (`GET_INFO`; reopened if its daemon was restarted). Should that fail, it stays
    /// unasked, with the size `fstat` reported and the `Default` backing.
    fn asked(&self) -> std::sync::RwLockReadGuard<'_, Open> {
        if matches!(self.read().kind, Kind::Unasked { .. }) {
            match self.with_open(|open| client::info(open.fd.as_fd())) {
                Ok(info) => {
                    let _ = self.write().learn(info);
                }
                // Not msharefs after all (the link was left by a daemon that died, and its
                // device number went to another mount): what `open` would have found.
                Err(e) if e.raw_os_error() == Some(ENODEV) => {
                    let mut open = self.write();
                    if kfd::fstatfs(&open.fd)
                        .is_ok_and(|s| s.fs_type == kernel_glue::HUGETLBFS_MAGIC)
                    {
                        open.kind = Kind::Direct;
                        open.backing = Backing::Hugetlb;
                    }
                }
                Err(_) => {}
            }
        }
        self.read()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Open> {
        self.open.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Region size in bytes (0 while its size is unset).
    pub fn size(&self) -> u64 {
        self.asked().size
    }

    /// The region's backing.
    pub fn backing(&self) -> Backing {
        self.asked().backing
    }

    /// Whether the region was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The absolute path the region was opened by (and is reopened by).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new descriptor of the region file (`dup`): the current one, which changes when
    /// the region is reopened after a daemon restart.
    ///
    /// # Errors
    /// `EMFILE` and the like.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.read().fd.try_clone()
    }

    /// Runs `op` on the open file; if it fails because the descriptor's FUSE connection
    /// is gone (the daemon was restarted), reopens the region by its path and runs `op`
    /// once more. While the daemon is down the reopen fails with `ENOTCONN`, which is
    /// returned.
    fn with_open<T>(&self, mut op: impl FnMut(&Open) -> io::Result<T>) -> io::Result<T> {
        let err = match op(&self.read()) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !self.connection_lost(&self.read()) {
            return Err(err);
        }
        self.reopen()?;
        op(&self.read())
    }

    /// Whether `open`'s descriptor belongs to a FUSE connection whose daemon is gone.
    fn connection_lost(&self, open: &Open) -> bool {
        !matches!(open.kind, Kind::Direct)
            && client::info(open.fd.as_fd()).is_err_and(|e| client::is_dead_connection(&e))
    }

    /// Opens the region again by its path, unless another thread already did, and checks
    /// that it is the same region.
    fn reopen(&self) -> io::Result<()> {
        let mut open = self.write();
        if !self.connection_lost(&open) {
            return Ok(());
        }
        let flags = if self.writable {
            consts::O_RDWR
        } else {
            consts::O_RDONLY
        };
        let fd = kfd::open(&self.path, flags, 0)?;
        if kfd::fstat(&fd)?.ino != self.ino {
            return Err(kernel_glue::errno(ESTALE));
        }
        let new = msharefs_open(fd)?;
        // A size, once set, never changes; a region found with another size or backing
        // is not the one this handle had (of one never asked, only the inode is known).
        let asked = !matches!(open.kind, Kind::Unasked { .. });
        if asked && (new.backing != open.backing || (open.size != 0 && new.size != open.size)) {
            return Err(kernel_glue::errno(ESTALE));
        }
        *open = new;
        Ok(())
    }

    /// Maps the whole region at a 1 GiB-aligned address with protection `prot`, every
    /// granule covered whole ([`Cover::Granules`]): all of its page tables are shared.
    ///
    /// # Errors
    /// `EINVAL` for a region whose size is unset or a bad `prot`; `EACCES` for
    /// `ReadWrite` on a read-only region; `ENOMEM` when no aligned address range is free;
    /// the daemon's errno when it refuses the backing.
    pub fn attach(&self, prot: Protection) -> io::Result<Attachment> {
        self.attach_covering(prot, Cover::Granules)
    }

    /// [`Region::attach`], covering the region as `cover` says ([`Cover::Exact`] for
    /// callers that unmap `(addr, size)` themselves).
    ///
    /// # Errors
    /// As [`Region::attach`].
    pub fn attach_covering(&self, prot: Protection, cover: Cover) -> io::Result<Attachment> {
        if prot == Protection::ReadWrite && !self.writable {
            return Err(kernel_glue::errno(EACCES));
        }
        if let Some(a) = self.attach_unasked(prot, cover)? {
            return Ok(a);
        }
        self.with_open(|open| {
            if open.size == 0 {
                return Err(kernel_glue::errno(EINVAL));
            }
            let attach = |info: &MshareRegionInfo| {
                let m = client::attach(open.fd.as_fd(), info, prot, cover)?;
                let g = client::guard(&m, info)?;
                Ok::<_, io::Error>((m, g))
            };
            let (mapping, guard) = match &open.kind {
                Kind::Msharefs { info } => attach(info)?,
                // `asked` could not learn the info (a daemon still down): ask again,
                // which fails with the reason.
                Kind::Unasked { .. } => attach(&client::info(open.fd.as_fd())?)?,
                Kind::Direct => (
                    Mapping::map_aligned(&open.fd, open.size, prot, uapi::MSHARE_GRANULE)?,
                    None,
                ),
            };
            Ok(Attachment { mapping, guard })
        })
    }

    /// The first attach of a region not asked yet ([`Kind::Unasked`]): one request to the
    /// socket found by the file's device number, whose reply carries the backing and the
    /// info. `None` when the region was asked already, or when that request cannot settle
    /// it (a thp or shmem region, `ENODEV`; a stale link; a daemon that is gone): then the
    /// caller asks the usual way, which maps the file or reports the error.
    fn attach_unasked(&self, prot: Protection, cover: Cover) -> io::Result<Option<Attachment>> {
        let reply = {
            let open = self.read();
            let Kind::Unasked { socket } = &open.kind else {
                return Ok(None);
            };
            client::request_backing(socket.path(), open.fd.as_fd(), prot)
        };
        match reply {
            Ok((backing, info)) => {
                self.write().learn(info)?;
                let mapping = client::map_backing(backing.as_fd(), info.size, prot, cover)?;
                let guard = client::guard(&mapping, &info)?;
                Ok(Some(Attachment { mapping, guard }))
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(ENODEV | EBADF | ENOENT | ECONNREFUSED | ENOTCONN | EIO)
                ) =>
            {
                // Ask now, so that later attaches go the usual way at once.
                drop(self.asked());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates an anonymous object of `size` bytes at `region_offset`, with protection
    /// `prot` (`MSHAREFS_CREATE_MAPPING`, as the kernel's mshare v3 defines it): its
    /// memory is populated now, and every attacher sees it.
    ///
    /// # Errors
    /// `EBADF` on a read-only region; `EINVAL` for a range that is not page-aligned or
    /// not inside the region, or a region whose size is unset; `EEXIST` when it
    /// overlaps an object; `ENOTTY` for a region used directly on hugetlbfs.
    pub fn create_mapping(&self, region_offset: u64, size: u64, prot: i32) -> io::Result<()> {
        let prot = u32::try_from(prot).map_err(|_| kernel_glue::errno(EINVAL))?;
        let req = uapi::MshareCreate {
            region_offset,
            size,
            offset: 0,
            prot,
            flags: (consts::MAP_SHARED | consts::MAP_FIXED | consts::MAP_ANONYMOUS) as u32,
            fd: u32::MAX,
            _pad: 0,
        };
        self.with_open(|open| {
            kfd::ioctl_ptr(&open.fd, uapi::MSHAREFS_CREATE_MAPPING, &mut { req }).map(drop)
        })
    }

    /// Removes the objects in `[region_offset, region_offset + size)`, discarding their
    /// contents in every attacher (`MSHAREFS_UNMAP`).
    ///
    /// # Errors
    /// `EBADF` on a read-only region; `EINVAL` for a range that is not page-aligned or
    /// not inside the region; `ENOTTY` for a region used directly on hugetlbfs.
    pub fn unmap(&self, region_offset: u64, size: u64) -> io::Result<()> {
        let req = uapi::MshareUnmap {
            region_offset,
            size,
        };
        self.with_open(|open| {
            kfd::ioctl_ptr(&open.fd, uapi::MSHAREFS_UNMAP, &mut { req }).map(drop)
        })
    }
}

/// The directory a region `path` lives in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether regions in `dir` are files of a hugetlbfs mount used directly (`true`) or of an
/// msharefs mount (`false`); `ENODEV` for any other file system.
fn is_direct(dir: &Path) -> io::Result<bool> {
    match kfd::statfs(dir)?.fs_type {
        kernel_glue::HUGETLBFS_MAGIC => Ok(true),
        kernel_glue::FUSE_SUPER_MAGIC => Ok(false),
        _ => Err(kernel_glue::errno(ENODEV)),
    }
}

/// Chooses the backing (`user.mshare.backing`) of a region whose size is not set yet.
///
/// msharefs refuses the change (`EBUSY`) while the region is open, and FUSE delivers a
/// close to the daemon asynchronously, so a region the caller has just created and closed
/// can look open for a moment: this retries `EBUSY` for up to about 200 ms.
///
/// # Errors
/// `EBUSY` when the region is still open after that (another process has it open) or its
/// size is set; `EINVAL` for an unknown backing; any `setxattr` errno.
pub fn set_backing(path: &Path, backing: Backing) -> io::Result<()> {
    client::retry_while_busy(|| {
        kfd::setxattr(path, uapi::BACKING_XATTR, backing.name().as_bytes(), 0)
    })
}

/// One attachment of a region: a granule-aligned shared mapping, unmapped on drop.
///
/// The memory is shared with other processes: access it through raw pointers
/// ([`Attachment::as_ptr`]) or the volatile accessors, never through `&`/`&mut`.
#[derive(Debug)]
pub struct Attachment {
    mapping: Mapping,
    /// The `MSHAREFS_UNMAP` guard, on mounts that guard it (`client::guard`).
    guard: Option<crate::guard::Guard>,
}

impl Attachment {
    /// Start address (a multiple of 1 GiB).
    pub fn addr(&self) -> usize {
        self.mapping.addr()
    }

    /// Length in bytes: the region size.
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    /// Raw pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    /// The underlying mapping (volatile accessors, populate).
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// Detaches now (the same as dropping it).
    pub fn detach(self) {}

    /// Hands the mapping out as `(addr, mapped)`; it stays mapped until
    /// `munmap(addr, mapped)` (`mapped` is the region size for [`Cover::Exact`], more for
    /// [`Cover::Granules`]).
    pub fn into_raw(self) -> (usize, usize) {
        // A guard must last as long as the mapping, which is the caller's now.
        std::mem::forget(self.guard);
        self.mapping.into_raw()
    }
}
