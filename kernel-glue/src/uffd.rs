//! userfaultfd(2): registration of mapping ranges for missing-page, write-protect or
//! minor faults, and the `SIGBUS` feature (a missing page raises `SIGBUS` in the
//! faulting thread instead of waiting for a handler).
//!
//! The registration lives as long as the [`Userfaultfd`]: dropping it closes the
//! descriptor and the kernel unregisters every range it had.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::check_retval;
use crate::mapping::Mapping;

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: handle faults from user mode only, so unprivileged processes
/// may create the descriptor (`vm.unprivileged_userfaultfd=0`); faults the kernel takes
/// on behalf of a system call then fail that call (`EFAULT`).
const UFFD_USER_MODE_ONLY: i32 = 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xC020_AA00;

/// `UFFD_FEATURE_MISSING_HUGETLBFS`.
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_SIGBUS`: missing faults raise `SIGBUS` instead of being queued.
pub const FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

/// `UFFDIO_REGISTER_MODE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Faults on pages missing from the file.
    Missing,
    /// Write-protect faults.
    WriteProtect,
    /// Minor faults (the page is in the page cache, not in the page table).
    Minor,
}

impl Mode {
    fn bits(self) -> u64 {
        match self {
            Mode::Missing => 1,
            Mode::WriteProtect => 2,
            Mode::Minor => 4,
        }
    }
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// A userfaultfd descriptor with its negotiated features.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

impl Userfaultfd {
    /// Safe wrapper for `userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)` followed
    /// by `UFFDIO_API` asking for `features`.
    ///
    /// # Errors
    /// `ENOSYS` without userfaultfd; `EPERM` where it is not allowed; `EINVAL` when the
    /// kernel lacks one of `features`.
    pub fn new(features: u64) -> io::Result<Userfaultfd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: plain syscall; returns a new descriptor or -1.
        let raw = check_retval(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) })?;
        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
        check_retval(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) })?;
        Ok(Userfaultfd {
            fd,
            features: api.features,
        })
    }

    /// The features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[offset, offset + len)` of `m` (page-aligned for the mapping's page size)
    /// for `mode` faults, with `UFFDIO_REGISTER`.
    ///
    /// # Errors
    /// `EINVAL` out of range or unaligned, or for a mode the mapping does not support.
    pub fn register(&self, m: &Mapping, offset: u64, len: u64, mode: Mode) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| crate::errno(libc::EINVAL))?;
        if end > m.len() as u64 {
            return Err(crate::errno(libc::EINVAL));
        }
        let mut reg = UffdioRegister {
            start: m.addr() as u64 + offset,
            len,
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; the range
        // lies inside a mapping we own, and registration changes no contents.
        check_retval(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Protection;

    #[test]
    fn sigbus_on_a_missing_shmem_page_is_negotiated_and_registered() {
        let u = match Userfaultfd::new(FEATURE_SIGBUS | FEATURE_MISSING_SHMEM) {
            Ok(u) => u,
            // Not every build machine allows userfaultfd; the integration tests cover it.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => return,
            Err(e) => panic!("userfaultfd: {e}"),
        };
        assert_ne!(u.features() & FEATURE_SIGBUS, 0);
        let fd = crate::fd::memfd_create("kg-uffd", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        let m = Mapping::map_aligned(&fd, 1 << 20, Protection::ReadWrite, 4096).unwrap();
        u.register(&m, 0, 1 << 20, Mode::Missing).unwrap();
        let e = u.register(&m, 4096, 1 << 21, Mode::Missing).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }
}
