//! Backing stores: the daemon's own hugetlbfs and tmpfs mounts under the state directory,
//! and the backing file of each region on them.
//!
//! Layout: `STATE/backing/{hugetlb,thp,shmem}/INO`. `STATE/backing` is mode 0700, so no
//! one but root reaches a backing file by path; clients get descriptors from the daemon
//! (FUSE passthrough or the attach socket) only after the kernel has checked their access
//! to the msharefs file. Backing files still carry their region's mode and owner.
//!
//! The mounts are kept when the daemon exits: they hold the region data, which must
//! survive a daemon restart or crash.
//!
//! The daemon holds each backing file open ([`BackingFile`]) from the region's creation (or
//! the daemon's start) to its removal, and works through that descriptor: sizing, reads,
//! discards, passthrough and attaches never look the file up by path again.

pub mod charge;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::mount::InstanceMount;
use kernel_glue::{cgroup, consts, fd as kfd, hugepages};

use crate::state::Store;

/// The three stores of one state directory, and the backing files the daemon holds open.
#[derive(Debug)]
pub struct Stores {
    root: PathBuf,
    hugetlb: bool,
    files: Mutex<HashMap<(Store, u64), Arc<BackingFile>>>,
}

/// A region's backing file, held open by the daemon.
///
/// Attachers get duplicates of the held descriptors (`fcntl(F_DUPFD_CLOEXEC)`), so they
/// share the daemon's open file description: status flags a client sets with `F_SETFL`
/// (`O_NONBLOCK`, `O_APPEND`, `O_ASYNC`) are shared, which changes nothing here, because
/// everything done with a backing is `mmap`, `fallocate`, `ftruncate` and positional
/// reads and writes (hugetlbfs refuses `O_DIRECT`). `flock(2)` locks belong to the
/// description too, so attachers of one region cannot exclude each other with `flock` on
/// their backing descriptors (as after a `dup`); msharefs takes none.
///
/// Read-only attachers of hugetlb regions (and the read-only host set) need a read-only
/// description, since the access mode of a description is fixed: a second descriptor,
/// opened with the first by reopening it through `/proc/self/fd` (the same inode, whatever
/// the path) and held with it. Reopening on every read-only attach instead would cost a
/// path walk and an `open` per attach; holding it costs one descriptor per hugetlb region.
/// thp and shmem backings are never handed to attachers (passthrough takes the read-write
/// one), so they hold one descriptor.
#[derive(Debug)]
pub struct BackingFile {
    rw: OwnedFd,
    /// hugetlb only.
    ro: Option<OwnedFd>,
    id: (u64, u64),
}

impl BackingFile {
    fn new(s: Store, rw: OwnedFd) -> io::Result<BackingFile> {
        let st = kfd::fstat(&rw)?;
        let ro = match s {
            Store::Hugetlb => Some(kfd::reopen(&rw, consts::O_RDONLY)?),
            Store::Thp | Store::Shmem => None,
        };
        Ok(BackingFile {
            rw,
            ro,
            id: (st.dev, st.ino),
        })
    }

    /// The held read-write descriptor, for the daemon's own work.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.rw.as_fd()
    }

    /// `(dev, ino)` of the file, as `/proc/PID/maps` shows its mappings.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// A descriptor of the file for a client or a mapping: a duplicate of the held
    /// read-write descriptor, or of the read-only one (thp and shmem: a new read-only
    /// one).
    ///
    /// # Errors
    /// `EMFILE`; reopening errors.
    pub fn descriptor(&self, write: bool) -> io::Result<OwnedFd> {
        match (write, &self.ro) {
            (true, _) => self.rw.try_clone(),
            (false, Some(ro)) => ro.try_clone(),
            (false, None) => kfd::reopen(&self.rw, consts::O_RDONLY),
        }
    }
}

/// All stores, for iteration.
pub const ALL_STORES: [Store; 3] = [Store::Hugetlb, Store::Thp, Store::Shmem];

fn store_dir(root: &Path, s: Store) -> PathBuf {
    root.join(s.name())
}

/// Mounts the store `s` at `dir` unless something of the right type is already there
/// (left by an earlier daemon, with region data in it).
fn ensure_mounted(dir: &Path, s: Store) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let want = match s {
        Store::Hugetlb => "hugetlbfs",
        Store::Thp | Store::Shmem => "tmpfs",
    };
    if let Some(m) = kernel_glue::mount::mount_at(dir)? {
        if m.fstype == want {
            return Ok(());
        }
        return Err(io::Error::other(format!(
            "{} is already a {} mount, not {want}",
            dir.display(),
            m.fstype
        )));
    }
    // tmpfs is limited to 80% of RAM: a region that does not fit fails with ENOSPC when its
    // size is set instead of pushing the machine into the OOM killer later.
    let mount = match s {
        Store::Hugetlb => InstanceMount::hugetlbfs(dir, 0o700)?,
        Store::Thp => InstanceMount::tmpfs(dir, "always", "80%", 0o700)?,
        Store::Shmem => InstanceMount::tmpfs(dir, "never", "80%", 0o700)?,
    };
    mount.keep();
    Ok(())
}

impl Stores {
    /// Sets up `STATE/backing` and mounts the stores (hugetlbfs only when `hugetlb`).
    ///
    /// # Errors
    /// Creating directories or mounting.
    pub fn open(state_dir: &Path, hugetlb: bool) -> io::Result<Stores> {
        let root = state_dir.join("backing");
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for s in ALL_STORES {
            if s == Store::Hugetlb && !hugetlb {
                continue;
            }
            ensure_mounted(&store_dir(&root, s), s)?;
        }
        Ok(Stores {
            root,
            hugetlb,
            files: Mutex::default(),
        })
    }

    fn files(&self) -> MutexGuard<'_, HashMap<(Store, u64), Arc<BackingFile>>> {
        // A panic elsewhere must not take the stores down: the map is always consistent.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mount point of a store.
    pub fn dir(&self, s: Store) -> PathBuf {
        store_dir(&self.root, s)
    }

    /// Path of a region's backing file.
    pub fn path(&self, s: Store, ino: u64) -> PathBuf {
        self.dir(s).join(ino.to_string())
    }

    /// Creates an empty backing file with the region's mode and owner, and holds it open.
    ///
    /// # Errors
    /// `ENODEV` for hugetlb without hugetlbfs; file creation errors.
    pub fn create(&self, s: Store, ino: u64, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
        if s == Store::Hugetlb && !self.hugetlb {
            return Err(kernel_glue::errno(ENODEV));
        }
        let fd = kfd::open(
            &self.path(s, ino),
            consts::O_RDWR | consts::O_CREAT | consts::O_EXCL,
            mode & 0o7777,
        )?;
        kfd::fchmod(&fd, mode & 0o7777)?;
        kfd::fchown(&fd, uid, gid)?;
        self.files()
            .insert((s, ino), Arc::new(BackingFile::new(s, fd)?));
        Ok(())
    }

    /// A region's backing file: the held one, else (a region the daemon found at start)
    /// opened read-write by path and held from now on.
    ///
    /// # Errors
    /// Open errors (`ENOENT` when missing).
    pub fn file(&self, s: Store, ino: u64) -> io::Result<Arc<BackingFile>> {
        let mut files = self.files();
        if let Some(f) = files.get(&(s, ino)) {
            return Ok(f.clone());
        }
        let fd = kfd::open(&self.path(s, ino), consts::O_RDWR, 0)?;
        let f = Arc::new(BackingFile::new(s, fd)?);
        files.insert((s, ino), f.clone());
        Ok(f)
    }

    /// A descriptor of a region's backing file, read-write or read-only (see
    /// [`BackingFile::descriptor`]).
    ///
    /// # Errors
    /// As [`Stores::file`] and [`BackingFile::descriptor`].
    pub fn open_file(&self, s: Store, ino: u64, write: bool) -> io::Result<OwnedFd> {
        self.file(s, ino)?.descriptor(write)
    }

    /// `(dev, ino)` of a region's backing file, `None` when it cannot be had.
    pub fn identity(&self, s: Store, ino: u64) -> Option<(u64, u64)> {
        self.file(s, ino).ok().map(|f| f.id())
    }

    /// Mirrors a region's mode and owner onto its backing file.
    ///
    /// # Errors
    /// Open, chmod or chown errors.
    pub fn set_owner_mode(
        &self,
        s: Store,
        ino: u64,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> io::Result<()> {
        let f = self.file(s, ino)?;
        kfd::fchmod(f.fd(), mode & 0o7777)?;
        kfd::fchown(f.fd(), uid, gid)
    }

    /// Removes a backing file; processes that still map it keep their pages until they
    /// unmap.
    pub fn remove(&self, s: Store, ino: u64) {
        self.files().remove(&(s, ino));
        if let Err(e) = std::fs::remove_file(self.path(s, ino)) {
            if e.raw_os_error() != Some(ENOENT) {
                log::error!("cannot remove backing {}: {e}", self.path(s, ino).display());
            }
        }
    }

    /// Sets the size of a region's backing once and allocates all of its memory, in a
    /// child process that joins the cgroups in `charge` first, so the memory is charged
    /// there (`kernel_glue::cgroup::fallocate_in`), and a shortage fails here rather than
    /// as a SIGBUS in an attacher later.
    ///
    /// - hugetlb: grows the pool by `size / 2 MiB` pages, sets the file size and allocates
    ///   every huge page (charged, with its reservation, to the hugetlb controller);
    /// - thp, shmem: sets the size and allocates every page (memory controller).
    ///
    /// On failure nothing stays allocated and the pool is as before.
    ///
    /// # Errors
    /// `ENOMEM` when huge pages cannot be had (pool or hugetlb limit) or the memory limit
    /// is reached; `ENOSPC` when tmpfs is full.
    pub fn reserve(
        &self,
        s: Store,
        ino: u64,
        size: u64,
        charge: &[PathBuf],
    ) -> io::Result<Reserved> {
        let f = self.file(s, ino)?;
        let fd = f.fd();
        let fill = || {
            kfd::ftruncate(fd, size)?;
            cgroup::fallocate_in(charge, fd, 0, size).inspect_err(|_| {
                // Frees what the child allocated before it failed.
                let _ = kfd::ftruncate(fd, 0);
            })
        };
        match s {
            Store::Hugetlb => {
                // Under the pool lock, so a concurrent give-back cannot free the new pages
                // first. hugetlbfs says ENOSPC for a hugetlb cgroup limit too: for huge
                // pages that is ENOMEM, as for an empty pool.
                let (grant, ()) = hugepages::grow_then(size / kernel_glue::HUGE_PAGE_SIZE, || {
                    fill().map_err(|e| match e.raw_os_error() {
                        Some(ENOSPC) => kernel_glue::errno(ENOMEM),
                        _ => e,
                    })
                })?;
                Ok(Reserved {
                    pool_pages: grant.into_raw(),
                })
            }
            Store::Thp | Store::Shmem => {
                fill()?;
                Ok(Reserved { pool_pages: 0 })
            }
        }
    }

    /// Discards the contents of `[offset, offset + len)`: they read as zero afterwards.
    ///
    /// With `refill` the pages stay allocated, so the range stays reserved: it is zeroed in
    /// place through a mapping of it (an aligned range of the backing's page size).
    /// Punching a hole and allocating it again, as this once did, can lose the range: a
    /// hugetlb page freed while the pool has surplus pages (given back while still mapped)
    /// goes back to the system, not to the pool, so the allocation that follows fails
    /// (`ENOSPC`) and leaves a hole nobody reserved, which every attacher touching it then
    /// meets as `SIGBUS` (tmpfs can lose the space to another region between the two calls
    /// the same way). Without `refill` (the unmap guard) the range becomes a hole on
    /// purpose, until [`Stores::fill`].
    ///
    /// # Errors
    /// Mapping errors (`ENOMEM` without address space) or `fallocate` errors; nothing is
    /// changed then.
    pub fn discard(
        &self,
        s: Store,
        ino: u64,
        offset: u64,
        len: u64,
        refill: bool,
    ) -> io::Result<()> {
        /// Bytes zeroed per copy.
        const CHUNK: u64 = kernel_glue::HUGE_PAGE_SIZE;
        let f = self.file(s, ino)?;
        if !refill {
            return kfd::fallocate_punch_hole(f.fd(), offset, len);
        }
        let m =
            Mapping::map_range_aligned(f.fd(), offset, len, Protection::ReadWrite, s.page_size())?;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            m.write_at(done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Allocates `[offset, offset + len)` of a region's backing (a no-op where pages
    /// exist), charged to the cgroups `charge` as the region's memory is.
    ///
    /// # Errors
    /// `fallocate` errors (`ENOSPC` when huge pages or tmpfs space cannot be had).
    pub fn fill(
        &self,
        s: Store,
        ino: u64,
        offset: u64,
        len: u64,
        charge: &[PathBuf],
    ) -> io::Result<()> {
        let f = self.file(s, ino)?;
        match cgroup::fallocate_in(charge, f.fd(), offset, len) {
            // The region's cgroup is gone: its parent inherited the charges; the daemon
            // pays for the new pages.
            Err(e) if e.raw_os_error() == Some(ENOENT) && !charge.is_empty() => {
                kfd::fallocate(f.fd(), offset, len)
            }
            r => r,
        }
    }
}

/// What [`Stores::reserve`] set up.
#[derive(Debug)]
pub struct Reserved {
    /// Huge pages added to the pool.
    pub pool_pages: u64,
}
