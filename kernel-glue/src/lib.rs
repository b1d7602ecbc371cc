//! kernel-glue: every `libc` call, ioctl and `/proc` read that msharefs makes, behind safe,
//! documented wrappers.
//!
//! This crate owns all `unsafe` code that talks to the kernel. The other crates call these
//! wrappers and may not call `libc` themselves. Kernel objects (mappings, mounts, huge-page
//! pool grants, file locks) are types that release what they hold in `Drop`.
//!
//! Errors keep the kernel's errno: every wrapper returns `io::Error::last_os_error()` (or
//! an `io::Error` built from a raw errno), never a rebuilt error that loses it.

pub mod caps;
pub mod cgroup;
pub mod epoll;
pub mod fd;
pub mod hugepages;
pub mod ipc;
pub mod mapping;
pub mod mount;
pub mod process;
pub mod procfs;
pub mod shim_sys;
pub mod socket;
pub mod uffd;
#[cfg(feature = "uring")]
pub mod uring;
pub mod vmops;

use std::io;

/// Page size of the hugetlb pages msharefs uses (x86-64 PMD size).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Size of the range one PMD page-table page covers, the unit of hugetlb table sharing.
pub const PUD_SIZE: u64 = 1 << 30;
/// Base page size.
pub const PAGE_SIZE: u64 = 4096;

/// `statfs.f_type` of hugetlbfs.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
/// `statfs.f_type` of tmpfs and shmem (memfd).
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs.f_type` of FUSE.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Turns a `-1` return value into the thread's current errno.
pub(crate) fn check_retval<T: From<i8> + PartialEq>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An `io::Error` carrying `errno`, with no other text, so the errno survives to the
/// FUSE reply or the C caller.
pub fn errno(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The errno an `io::Error` carries, `EIO` when it carries none: what a client is told.
/// Allocation-free (the `LD_PRELOAD` shim uses it).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
}

/// Re-exported errno values the other crates need, so they never touch `libc` directly.
pub mod errnos {
    pub use libc::{
        E2BIG, EACCES, EBADF, EBUSY, ECONNABORTED, ECONNREFUSED, EDQUOT, EEXIST, EFAULT, EIDRM,
        EINVAL, EIO, EISDIR, ENAMETOOLONG, ENODATA, ENODEV, ENOENT, ENOMEM, ENOSPC, ENOSYS,
        ENOTCONN, ENOTDIR, ENOTEMPTY, ENOTTY, EOPNOTSUPP, EOVERFLOW, EPERM, ERANGE, EROFS, ESRCH,
        ESTALE, EXDEV,
    };
}

/// Re-exported constants for `mmap` protection and flags and `open` modes.
pub mod consts {
    pub use libc::{
        MAP_ANONYMOUS, MAP_FIXED, MAP_HUGETLB, MAP_PRIVATE, MAP_SHARED, O_ACCMODE, O_CREAT, O_EXCL,
        O_PATH, O_RDONLY, O_RDWR, O_WRONLY, PROT_EXEC, PROT_NONE, PROT_READ, PROT_WRITE, SIGKILL,
        SIGTERM,
    };
    /// `renameat2` flags.
    pub use libc::{RENAME_EXCHANGE, RENAME_NOREPLACE};
    /// `setxattr` flags.
    pub use libc::{XATTR_CREATE, XATTR_REPLACE};
}
