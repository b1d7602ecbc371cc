//! Anonymous shared memory placed on a new hugetlb region: what the `LD_PRELOAD` shim
//! does with `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_ANONYMOUS, -1, 0)` when
//! `MSHARE_MOUNT` and `MSHARE_ANON_MIN` ask for it (a database's main shared memory
//! segment, e.g. PostgreSQL's with `huge_pages=off`).
//!
//! [`create_anon_region`] creates a hugetlb region of `len` bytes rounded up to 2 MiB in
//! a directory of an msharefs mount ([`client::create`]: reserving every huge page, so a
//! shortage is an error here, never a `SIGBUS` later), anonymous (unlinked at once: it
//! ends with its last mapping, as anonymous shared memory would) or kept under a name,
//! and attaches it read-write ([`client::attach`]). Children after `fork` inherit the
//! `MAP_SHARED` mapping of the backing and so share it.
//!
//! Like the rest of the client core, this runs inside `mmap` in arbitrary programs: it
//! keeps no state, takes no lock and does not allocate. Errors are [`AnonError`]s that
//! carry the step and the errno; rendering them for a person is the caller's business.

use std::ffi::CStr;
use std::io;
use std::os::fd::AsFd;

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};

use crate::client::{self, Cover};
use crate::uapi::{self, Backing};

/// Failures of [`create_anon_region`], named after the step that failed; each carries the
/// errno to report.
#[derive(Debug, thiserror::Error)]
pub enum AnonError {
    /// Creating and sizing the region failed (`ENODEV`: the directory is not on msharefs,
    /// or it has no huge pages; `ENOMEM`/`ENOSPC`/`EDQUOT`: the memory cannot be had;
    /// `EEXIST`: a kept name is taken).
    #[error("cannot create the region: {0}")]
    Create(#[source] io::Error),
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
            AnonError::Create(e) | AnonError::Attach(e) => kernel_glue::errno_of(e),
            AnonError::NotHugetlb => EIO,
        }
    }

    /// The failed step, in a few words (allocation-free, for the shim's log line).
    pub fn step(&self) -> &'static str {
        match self {
            AnonError::Create(_) => "creating the region (reserving its huge pages)",
            AnonError::NotHugetlb => "checking the new region",
            AnonError::Attach(_) => "attaching the region",
        }
    }
}

/// The region's size for a request of `len` bytes: `len` rounded up to the huge page size.
/// `None` for 0 or on overflow.
pub fn region_size(len: usize) -> Option<u64> {
    let len = u64::try_from(len).ok().filter(|&l| l > 0)?;
    len.checked_next_multiple_of(uapi::HUGE_PAGE_SIZE)
}

/// Creates a hugetlb region of `len` bytes rounded up to 2 MiB ([`region_size`]) in `dir`
/// (a directory on an msharefs mount), named `name` or anonymous (`None`), and maps it
/// read-write at a 1 GiB-aligned address, every granule covered whole
/// ([`Cover::Granules`]). Returns the mapping, whose [`Mapping::len`] is the region size;
/// the caller hands it out with `Mapping::into_raw` (and unmaps `mapped_len` bytes).
///
/// Nothing stays reserved after an error.
///
/// # Errors
/// [`AnonError`]; its [`AnonError::errno`] is what `mmap` would report.
pub fn create_anon_region(
    dir: &CStr,
    name: Option<&CStr>,
    len: usize,
) -> Result<Mapping, AnonError> {
    let size = region_size(len).ok_or(AnonError::Create(kernel_glue::errno(EINVAL)))?;
    let fd = client::create(dir, name, size, 0o600, Backing::Hugetlb).map_err(AnonError::Create)?;
    let info = match client::info(fd.as_fd()) {
        Ok(i) if i.backing == uapi::BACKING_HUGETLB && i.size == size => i,
        _ => return Err(AnonError::NotHugetlb),
    };
    // The descriptor closes when this returns; an anonymous region then lives on in the
    // mapping alone.
    let m = client::attach(fd.as_fd(), &info, Protection::ReadWrite, Cover::Granules)
        .map_err(AnonError::Attach)?;
    // On a mount that guards MSHAREFS_UNMAP, for as long as the mapping lasts.
    std::mem::forget(client::guard(&m, &info).map_err(AnonError::Attach)?);
    Ok(m)
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
        let err = create_anon_region(c"/tmp", Some(c"x"), 1 << 20).unwrap_err();
        assert_eq!(err.errno(), ENODEV, "{err}");
        let err = create_anon_region(c"/nonexistent-msharefs-dir", None, 1 << 20).unwrap_err();
        assert_eq!(err.errno(), ENOENT);
    }
}
