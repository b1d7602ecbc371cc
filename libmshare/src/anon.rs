//! Anonymous shared memory placed on a new hugetlb region: what the `LD_PRELOAD` shim
//! does with `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_ANONYMOUS, -1, 0)` when
//! `MSHARE_MOUNT` and `MSHARE_ANON_MIN` ask for it (a database's main shared memory
//! segment, e.g. PostgreSQL's with `huge_pages=off`).
//!
//! [`create_anon_region`] creates a region file in a directory of an msharefs mount, sets
//! its backing to hugetlb and its size (which reserves every huge page, so a shortage is
//! an error here, never a `SIGBUS` later), attaches it at a 1 GiB-aligned address like
//! [`crate::interpose::attach_fd`], and, unless the caller names it, unlinks it at once:
//! the region then ends with its last mapping, as anonymous shared memory would. Children
//! after `fork` inherit the `MAP_SHARED` mapping of the backing and so share it.
//!
//! Like [`crate::interpose`], this runs inside `mmap` in arbitrary programs: it keeps no
//! state, takes no lock and does not allocate (paths are built on the stack and the system
//! calls are kernel-glue's allocation-free `shim_sys` ones). Errors are [`AnonError`]s that
//! carry the step and the errno; rendering them for a person is the caller's business.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::shim_sys;
use kernel_glue::{consts, fd as kfd};

use crate::cstr::{StackStr, TooLong};
use crate::region::Backing;
use crate::uapi;

/// Longest path the module builds (`PATH_MAX`, with the NUL).
const PATH_MAX: usize = 4096;
/// Longest region name (`NAME_MAX`, with the NUL).
const NAME_MAX: usize = 256;
/// How many generated names to try before giving up (a stale region of an earlier process
/// with the same pid can hold one).
const NAME_TRIES: u32 = 64;

/// Failures of [`create_anon_region`], named after the step that failed; each carries the
/// errno to report.
#[derive(Debug, thiserror::Error)]
pub enum AnonError {
    /// The mount directory cannot be opened.
    #[error("cannot open the mount directory: {0}")]
    OpenMount(#[source] io::Error),
    /// The directory is not on msharefs (`ENODEV`).
    #[error("the directory is not on an msharefs mount")]
    NotMsharefs,
    /// The directory and name do not fit a path (`ENAMETOOLONG`).
    #[error("the region path is too long")]
    PathTooLong,
    /// Creating the region file failed (`EEXIST` for a taken `name`).
    #[error("cannot create the region file: {0}")]
    Create(#[source] io::Error),
    /// Choosing the hugetlb backing failed (`ENODEV`: the mount has no huge pages).
    #[error("cannot choose the hugetlb backing: {0}")]
    SetBacking(#[source] io::Error),
    /// Setting the size failed: `ENOMEM`/`ENOSPC` when the huge pages cannot be had.
    #[error("cannot set the region size (reserve its huge pages): {0}")]
    SetSize(#[source] io::Error),
    /// The file did not become a hugetlb region of the requested size (`EIO`).
    #[error("the new file is not a hugetlb region of the requested size")]
    NotHugetlb,
    /// Attaching (the daemon's attach socket, the aligned mapping) failed.
    #[error("cannot attach the region: {0}")]
    Attach(#[source] io::Error),
}

impl AnonError {
    /// The errno for `mmap`'s caller.
    pub fn errno(&self) -> i32 {
        match self {
            AnonError::OpenMount(e)
            | AnonError::Create(e)
            | AnonError::SetBacking(e)
            | AnonError::SetSize(e)
            | AnonError::Attach(e) => kernel_glue::errno_of(e),
            AnonError::NotMsharefs => ENODEV,
            AnonError::PathTooLong => ENAMETOOLONG,
            AnonError::NotHugetlb => EIO,
        }
    }

    /// The failed step, in a few words (allocation-free, for the shim's log line).
    pub fn step(&self) -> &'static str {
        match self {
            AnonError::OpenMount(_) => "opening the mount directory",
            AnonError::NotMsharefs => "checking the mount (not msharefs)",
            AnonError::PathTooLong => "building the region path",
            AnonError::Create(_) => "creating the region file",
            AnonError::SetBacking(_) => "choosing the hugetlb backing",
            AnonError::SetSize(_) => "reserving the huge pages",
            AnonError::NotHugetlb => "checking the new region",
            AnonError::Attach(_) => "attaching the region",
        }
    }
}

/// How the new region is named.
#[derive(Debug, Clone, Copy)]
pub enum AnonName<'a> {
    /// `anon-PID-N` with the first free `N` from `seq` on; unlinked right after attaching.
    Generated {
        /// The creating process.
        pid: u32,
        /// First sequence number to try (the caller's per-process counter).
        seq: u64,
    },
    /// Exactly this name (no `/`), which must not exist yet; kept after attaching, so
    /// `msharefs stat` shows the region and its attachers, until someone unlinks it.
    Kept(&'a [u8]),
}

impl From<TooLong> for AnonError {
    fn from(_: TooLong) -> Self {
        AnonError::PathTooLong
    }
}

/// The region's size for a request of `len` bytes: `len` rounded up to the huge page size.
/// `None` for 0 or on overflow.
pub fn region_size(len: usize) -> Option<u64> {
    let len = u64::try_from(len).ok().filter(|&l| l > 0)?;
    let page = kernel_glue::HUGE_PAGE_SIZE;
    len.checked_add(page - 1).map(|l| l / page * page)
}

/// A region file just created (and, for generated names, to be unlinked again).
struct NewFile<'a> {
    dir: &'a OwnedFd,
    name: &'a CStr,
    remove: bool,
}

impl Drop for NewFile<'_> {
    fn drop(&mut self) {
        if self.remove {
            // Nothing sensible to do on failure: the daemon's `umount --purge` ends it.
            let _ = shim_sys::unlinkat(self.dir.as_fd(), self.name);
        }
    }
}

/// Creates a hugetlb region of `len` bytes rounded up to 2 MiB ([`region_size`]) in
/// `dir` (a directory on an msharefs mount), named per `name`, and maps it read-write at a
/// 1 GiB-aligned address. Returns the mapping (exactly the region size long; the caller
/// hands it out with `Mapping::into_raw`).
///
/// The region is unlinked before returning for [`AnonName::Generated`] (it ends when the
/// last process unmaps it) and on every failure; nothing stays reserved after an error.
///
/// # Errors
/// [`AnonError`]; its [`AnonError::errno`] is what `mmap` would report.
pub fn create_anon_region(
    dir: &CStr,
    name: AnonName<'_>,
    len: usize,
) -> Result<Mapping, AnonError> {
    let size = region_size(len).ok_or(AnonError::SetSize(kernel_glue::errno(EINVAL)))?;
    let dirfd = shim_sys::openat(None, dir, consts::O_RDONLY | shim_sys::O_DIRECTORY, 0)
        .map_err(AnonError::OpenMount)?;
    match kfd::fstatfs(&dirfd) {
        Ok(fs) if fs.fs_type == kernel_glue::FUSE_SUPER_MAGIC => {}
        Ok(_) => return Err(AnonError::NotMsharefs),
        Err(e) => return Err(AnonError::OpenMount(e)),
    }
    let create = consts::O_RDWR | consts::O_CREAT | consts::O_EXCL;
    let mut file = StackStr::<NAME_MAX>::new();
    let (fd, remove_after) = match name {
        AnonName::Kept(n) => {
            if n.contains(&b'/') {
                return Err(AnonError::Create(kernel_glue::errno(EINVAL)));
            }
            file.push(n)?;
            let fd = shim_sys::openat(Some(dirfd.as_fd()), file.as_cstr(), create, 0o600)
                .map_err(AnonError::Create)?;
            (fd, false)
        }
        AnonName::Generated { pid, seq } => {
            let mut tries = 0;
            loop {
                file = StackStr::new();
                file.push(b"anon-")?;
                file.push_u64(u64::from(pid))?;
                file.push(b"-")?;
                file.push_u64(seq.wrapping_add(u64::from(tries)))?;
                match shim_sys::openat(Some(dirfd.as_fd()), file.as_cstr(), create, 0o600) {
                    Ok(fd) => break (fd, true),
                    Err(e) if e.raw_os_error() == Some(EEXIST) && tries < NAME_TRIES => {
                        tries += 1;
                    }
                    Err(e) => return Err(AnonError::Create(e)),
                }
            }
        }
    };
    // From here on, every failure removes the file again.
    let mut guard = NewFile {
        dir: &dirfd,
        name: file.as_cstr(),
        remove: true,
    };
    // msharefs picks a file's data path when it is opened, and a backing cannot change
    // while the file is open (thp/shmem default mounts): choose the backing with the file
    // closed, retrying until the daemon has seen our close, then open it again (as
    // `Region::create` does).
    drop(fd);
    let mut path = StackStr::<PATH_MAX>::new();
    path.push(dir.to_bytes())?;
    path.push(b"/")?;
    path.push(file.bytes())?;
    crate::region::retry_while_busy(|| {
        shim_sys::setxattr(
            path.as_cstr(),
            uapi::BACKING_XATTR_C,
            Backing::Hugetlb.name().as_bytes(),
            0,
        )
    })
    .map_err(AnonError::SetBacking)?;
    let fd = shim_sys::openat(Some(dirfd.as_fd()), file.as_cstr(), consts::O_RDWR, 0)
        .map_err(AnonError::Create)?;
    kfd::ftruncate(&fd, size).map_err(AnonError::SetSize)?;
    let info = match crate::interpose::region_info(fd.as_fd()) {
        Some(i) if i.backing == uapi::BACKING_HUGETLB && i.size == size => i,
        _ => return Err(AnonError::NotHugetlb),
    };
    let mapping = crate::interpose::attach_fd(fd.as_fd(), &info, Protection::ReadWrite)
        .map_err(AnonError::Attach)?;
    guard.remove = remove_after;
    // Unlinking (in the guard's drop) before closing: the daemon ends the region at the
    // release of this last descriptor; the mapping keeps the backing's pages until the last
    // process unmaps them.
    drop(guard);
    drop(fd);
    Ok(mapping)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_huge_pages() {
        const MIB: u64 = 1 << 20;
        assert_eq!(region_size(0), None);
        assert_eq!(region_size(1), Some(2 * MIB));
        assert_eq!(region_size(2 << 20), Some(2 * MIB));
        assert_eq!(region_size(291_954_688), Some(140 * 2 * MIB));
        assert_eq!(region_size(usize::MAX), None);
    }

    #[test]
    fn a_directory_that_is_not_msharefs_is_refused() {
        let err = create_anon_region(c"/tmp", AnonName::Kept(b"x"), 1 << 20).unwrap_err();
        assert!(matches!(err, AnonError::NotMsharefs), "{err}");
        assert_eq!(err.errno(), ENODEV);
        let err = create_anon_region(
            c"/nonexistent-msharefs-dir",
            AnonName::Generated { pid: 1, seq: 0 },
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(err.errno(), ENOENT);
    }
}
