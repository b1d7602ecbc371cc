//! The `MSHAREFS_UNMAP` guard: makes a touch of an unmapped range of a region raise a
//! signal in the attacher, as the kernel's mshare does (there `SIGSEGV`, here `SIGBUS`),
//! instead of silently reading (and allocating) a fresh zeroed page.
//!
//! How: the attacher's mapping is registered with userfaultfd for *missing* pages with
//! `UFFD_FEATURE_SIGBUS`. A page that is in the backing file maps as before; a page that
//! is not (a range `MSHAREFS_UNMAP` punched out) raises `SIGBUS` in the faulting thread,
//! and a system call that touches it fails with `EFAULT`.
//!
//! Page-table sharing (measured, `docs/KERNEL.md`): missing-mode registration does not
//! disable PMD sharing, but it adds `VM_UFFD_MISSING` to the VMA and the kernel shares
//! tables only between mappings with equal flags. Guard every mapping of a hugetlb
//! region (the daemon's host mappings included) or none: a guarded attacher does not
//! share with unguarded mappings.
//!
//! Call [`arm`] right after mapping, before the first touch, and keep the [`Guard`] as
//! long as the mapping: dropping it closes the userfaultfd and the kernel removes the
//! registration. A forked child is not guarded (the kernel drops the registration in it).

use std::io;

use kernel_glue::mapping::Mapping;
use kernel_glue::uffd::{self, Mode, Userfaultfd};

use crate::Backing;

/// An armed guard; the registration lasts as long as this value.
#[derive(Debug)]
pub struct Guard {
    _uffd: Userfaultfd,
}

/// Registers the whole of `m`, a mapping of a region with backing `backing`, so that a
/// touch of a page missing from the region raises `SIGBUS`.
///
/// # Errors
/// `EINVAL` for `Backing::Default` (resolve it first, e.g. from `MSHAREFS_GET_INFO`) or
/// when the kernel lacks the features; `ENOSYS` without userfaultfd; `EPERM` where the
/// system forbids it.
pub fn arm(m: &Mapping, backing: Backing) -> io::Result<Guard> {
    let missing = match backing {
        Backing::Hugetlb => uffd::FEATURE_MISSING_HUGETLBFS,
        Backing::Thp | Backing::Shmem => uffd::FEATURE_MISSING_SHMEM,
        Backing::Default => return Err(kernel_glue::errno(kernel_glue::errnos::EINVAL)),
    };
    let u = Userfaultfd::new(uffd::FEATURE_SIGBUS | missing)?;
    u.register(m, 0, m.len() as u64, Mode::Missing)?;
    Ok(Guard { _uffd: u })
}
