//! The Rust API: create or open a region, attach it at a granule-aligned address, detach.
//!
//! A region is a file on an msharefs mount (or, without the daemon, a file on a hugetlbfs
//! mount: the "direct" mode the foundation tests use). The data flow of an attach:
//!
//! 1. [`Region::attach`] asks the region for a descriptor of its data: for hugetlb regions
//!    on msharefs, the backing file, obtained from the daemon's attach socket by passing
//!    our msharefs descriptor (see [`crate::uapi`]); for thp and shmem regions, the
//!    msharefs file itself (FUSE passthrough to the backing); in direct mode, the file.
//! 2. `kernel_glue::mapping::Mapping::map_aligned` maps it `MAP_SHARED` at a 1 GiB-aligned
//!    address, so every attacher's PMD tables line up with the daemon's host mapping and
//!    the kernel shares them (hugetlb PMD sharing).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::{consts, fd as kfd};

use crate::uapi;

/// Where a region's data lives; see the README's backing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backing {
    /// The mount's default.
    Default,
    /// 2 MiB hugetlb pages with shared page tables.
    Hugetlb,
    /// 2 MiB transparent huge pages (tmpfs `huge=always`).
    Thp,
    /// 4 KiB shmem pages.
    Shmem,
}

impl Backing {
    /// From the uAPI / C value (`MSHARE_BACKING_*`).
    ///
    /// # Errors
    /// `EINVAL` for an unknown value.
    pub fn from_raw(v: u32) -> io::Result<Backing> {
        Ok(match v {
            uapi::BACKING_DEFAULT => Backing::Default,
            uapi::BACKING_HUGETLB => Backing::Hugetlb,
            uapi::BACKING_THP => Backing::Thp,
            uapi::BACKING_SHMEM => Backing::Shmem,
            _ => return Err(kernel_glue::errno(EINVAL)),
        })
    }

    /// The uAPI / C value.
    pub fn raw(self) -> u32 {
        match self {
            Backing::Default => uapi::BACKING_DEFAULT,
            Backing::Hugetlb => uapi::BACKING_HUGETLB,
            Backing::Thp => uapi::BACKING_THP,
            Backing::Shmem => uapi::BACKING_SHMEM,
        }
    }

    /// The name used by the `user.mshare.backing` xattr and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Default => "default",
            Backing::Hugetlb => "hugetlb",
            Backing::Thp => "thp",
            Backing::Shmem => "shmem",
        }
    }

    /// Parses a name as written by [`Backing::name`].
    pub fn from_name(s: &str) -> Option<Backing> {
        Some(match s {
            "default" => Backing::Default,
            "hugetlb" => Backing::Hugetlb,
            "thp" => Backing::Thp,
            "shmem" => Backing::Shmem,
            _ => return None,
        })
    }

    /// Page size of the backing.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Hugetlb => kernel_glue::HUGE_PAGE_SIZE,
            _ => kernel_glue::PAGE_SIZE,
        }
    }
}

#[derive(Debug)]
enum Kind {
    /// A file on a hugetlbfs mount, used without the daemon.
    Direct,
    /// A region file on msharefs; attach socket of its daemon.
    Msharefs { socket: PathBuf },
}

/// An open region. Dropping it closes the descriptor; attachments stay valid.
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
    size: u64,
    backing: Backing,
    writable: bool,
    kind: Kind,
}

fn info(fd: impl AsFd) -> io::Result<uapi::MshareRegionInfo> {
    let mut info = uapi::MshareRegionInfo::default();
    kfd::ioctl_ptr(fd, uapi::MSHAREFS_GET_INFO, &mut info).map_err(|e| {
        // Another FUSE file system: not ours.
        if e.raw_os_error() == Some(ENOTTY) || e.raw_os_error() == Some(ENOSYS) {
            kernel_glue::errno(ENODEV)
        } else {
            e
        }
    })?;
    Ok(info)
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
            return Ok(Region {
                fd,
                size,
                backing: Backing::Hugetlb,
                writable: true,
                kind: Kind::Direct,
            });
        }
        // Build the region under a hidden temporary name and rename it into place once its
        // backing and size are set: other processes find either no region or a complete
        // one, never one whose backing or size is still being chosen.
        // Fail before reserving memory when the name is taken or unusable (too long, a
        // missing directory); the rename below is what decides.
        match kfd::stat(path) {
            Ok(_) => return Err(kernel_glue::errno(EEXIST)),
            Err(e) if e.raw_os_error() != Some(ENOENT) => return Err(e),
            Err(_) => {}
        }
        let (tmp, fd) = create_temp(dir, mode)?;
        let undo = |e: io::Error| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        // msharefs picks the data path (FUSE passthrough or not) when a file is opened, and
        // refuses a backing change while the file is open: choose it with the new file
        // closed, then open it again.
        let fd = if backing == Backing::Default {
            fd
        } else {
            drop(fd);
            set_backing(&tmp, backing).map_err(undo)?;
            kfd::open(&tmp, consts::O_RDWR, 0).map_err(undo)?
        };
        info(&fd).map_err(undo)?;
        kfd::ftruncate(&fd, size).map_err(undo)?;
        kfd::renameat2(&tmp, path, consts::RENAME_NOREPLACE).map_err(undo)?;
        Self::from_msharefs_fd(fd, true).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
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
        match kfd::fstatfs(&fd)?.fs_type {
            kernel_glue::HUGETLBFS_MAGIC => {
                let size = kfd::fstat(&fd)?.size;
                Ok(Region {
                    fd,
                    size,
                    backing: Backing::Hugetlb,
                    writable,
                    kind: Kind::Direct,
                })
            }
            kernel_glue::FUSE_SUPER_MAGIC => Self::from_msharefs_fd(fd, writable),
            _ => Err(kernel_glue::errno(ENODEV)),
        }
    }

    fn from_msharefs_fd(fd: OwnedFd, writable: bool) -> io::Result<Region> {
        let info = info(&fd)?;
        Ok(Region {
            size: info.size,
            backing: Backing::from_raw(info.backing)?,
            writable,
            kind: Kind::Msharefs {
                // Empty when the daemon reported none: attaching then fails.
                socket: crate::interpose::socket_path(&info)
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            },
            fd,
        })
    }

    /// Region size in bytes (0 while its size is unset).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The region's backing.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Whether the region was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The open descriptor of the region file.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Maps the whole region at a 1 GiB-aligned address with protection `prot`.
    ///
    /// # Errors
    /// `EINVAL` for a region whose size is unset or a bad `prot`; `EACCES` for
    /// `ReadWrite` on a read-only region; `ENOMEM` when no aligned address range is free;
    /// the daemon's errno when it refuses the backing.
    pub fn attach(&self, prot: Protection) -> io::Result<Attachment> {
        if self.size == 0 {
            return Err(kernel_glue::errno(EINVAL));
        }
        if prot == Protection::ReadWrite && !self.writable {
            return Err(kernel_glue::errno(EACCES));
        }
        let mapping = match (&self.kind, self.backing) {
            (Kind::Msharefs { socket }, Backing::Hugetlb) => {
                let backing = crate::interpose::request_backing(socket, self.fd.as_fd(), prot)?;
                Mapping::map_aligned(&backing, self.size, prot, uapi::MSHARE_GRANULE)?
            }
            _ => Mapping::map_aligned(&self.fd, self.size, prot, uapi::MSHARE_GRANULE)?,
        };
        Ok(Attachment { mapping })
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
    retry_while_busy(|| kfd::setxattr(path, uapi::BACKING_XATTR, backing.name().as_bytes(), 0))
}

/// Runs `f` again while it fails with `EBUSY`, sleeping 2 ms between tries, at most 100
/// times. Allocation-free, so the `LD_PRELOAD` shim uses it too.
pub(crate) fn retry_while_busy<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(EBUSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// Creates a new region file under a hidden name in `dir` (`O_EXCL`, retrying on a name
/// collision) for [`Region::create`] to finish and rename into place.
fn create_temp(dir: &Path, mode: u32) -> io::Result<(PathBuf, OwnedFd)> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let flags = consts::O_RDWR | consts::O_CREAT | consts::O_EXCL;
    let mut tries = 0;
    loop {
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            "{}{}.{seq}",
            uapi::CREATING_PREFIX,
            std::process::id()
        ));
        match kfd::open(&tmp, flags, mode) {
            // Left behind by a crashed process whose pid we now have.
            Err(e) if e.raw_os_error() == Some(EEXIST) && tries < 100 => tries += 1,
            r => return r.map(|fd| (tmp, fd)),
        }
    }
}

/// One attachment of a region: a granule-aligned shared mapping, unmapped on drop.
///
/// The memory is shared with other processes: access it through raw pointers
/// ([`Attachment::as_ptr`]) or the volatile accessors, never through `&`/`&mut`.
#[derive(Debug)]
pub struct Attachment {
    mapping: Mapping,
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

    /// Hands the mapping out as `(addr, len)`; it stays mapped until `munmap(addr, len)`.
    pub fn into_raw(self) -> (usize, usize) {
        self.mapping.into_raw()
    }
}
