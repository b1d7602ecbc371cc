//! `libmshare_preload.so`: an `LD_PRELOAD` shim that gives unmodified programs what
//! `mshare_attach` gives.
//!
//! It defines `mmap` and `mmap64`. A call of the form
//! `mmap(NULL, size, PROT_READ[|PROT_WRITE], MAP_SHARED, fd, 0)`, where `fd` is a region
//! file on an msharefs mount and `size` is the region's size, is answered with a mapping of
//! the region at a granule-aligned (1 GiB) address; for hugetlb regions, a mapping of the
//! backing the daemon hands out, so page tables are shared with every other attacher. The
//! mapping is exactly `[addr, addr + size)`, so the program's `munmap` needs no help.
//!
//! Every other call goes straight to the `mmap` system call, without allocating, locking
//! or looking at the descriptor (the fast path). Candidates cost one `fstatfs`; FUSE files
//! one more `ioctl`. The shim keeps no state at all, so it is safe in threaded programs and
//! after `fork`. `MAP_POPULATE` and `MAP_NORESERVE` are honoured; calls with any other
//! flag, a `PROT_EXEC`/`PROT_NONE` protection or a partial length reach the kernel
//! unchanged (for a hugetlb region that is `ENODEV`, as without the shim).
//!
//! Failures return `MAP_FAILED` with `errno` set as `mmap` would (`EACCES` for
//! `PROT_WRITE` on a descriptor opened read-only, `ENOMEM`, the daemon's errno); a panic
//! inside the shim (a bug) is caught and reported as `EIO`.

use std::ffi::c_void;
use std::os::fd::BorrowedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kernel_glue::consts::{MAP_FIXED, MAP_SHARED};
use kernel_glue::errnos::EIO;
use kernel_glue::mapping::Protection;
use kernel_glue::shim_sys::{self, MAP_FAILED};
use mshare::interpose;

/// Flags a candidate may carry besides its map type.
const HONOURED_FLAGS: i32 = shim_sys::MAP_POPULATE | shim_sys::MAP_NORESERVE;

/// Whether a call might be a region attach; everything else takes the fast path.
fn candidate(addr: *mut c_void, flags: i32, fd: i32, offset: i64) -> bool {
    let map_type = flags & shim_sys::MAP_TYPE;
    addr.is_null()
        && fd >= 0
        && offset == 0
        && (map_type == MAP_SHARED || map_type == shim_sys::MAP_SHARED_VALIDATE)
        && flags & (MAP_FIXED | shim_sys::MAP_FIXED_NOREPLACE) == 0
        && flags & !(shim_sys::MAP_TYPE | HONOURED_FLAGS) == 0
}

/// The slow path: `Ok(None)` when the call is not for us, else the attach's outcome.
fn attach(len: usize, prot: i32, flags: i32, fd: BorrowedFd<'_>) -> Result<Option<usize>, i32> {
    let Some(info) = interpose::region_info(fd) else {
        return Ok(None);
    };
    if info.size != len as u64 {
        return Ok(None);
    }
    let Ok(prot) = Protection::from_bits(prot) else {
        return Ok(None);
    };
    let mapping = interpose::attach_fd(fd, &info, prot)
        .map_err(|e| e.raw_os_error().filter(|&n| n > 0).unwrap_or(EIO))?;
    if flags & shim_sys::MAP_POPULATE != 0 {
        // mmap(2) ignores MAP_POPULATE failures too: the pages fault in later instead.
        let _ = mapping.populate(0, info.size);
    }
    Ok(Some(mapping.into_raw().0))
}

/// The shared body of `mmap` and `mmap64`.
///
/// # Safety
/// The contract of `mmap(2)`.
unsafe fn shim_mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> *mut c_void {
    if candidate(addr, flags, fd, offset) {
        // SAFETY: `fd >= 0`. The borrow lives only for this call; the shim never closes
        // it, and a descriptor another thread closes concurrently only makes the syscalls
        // below fail (EBADF), exactly as it would make mmap(2) fail.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match catch_unwind(AssertUnwindSafe(|| attach(len, prot, flags, borrowed))) {
            Ok(Ok(Some(mapped))) => return mapped as *mut c_void,
            Ok(Ok(None)) => {}
            Ok(Err(errno)) => {
                shim_sys::set_errno(errno);
                return MAP_FAILED;
            }
            Err(_) => {
                shim_sys::set_errno(EIO);
                return MAP_FAILED;
            }
        }
    }
    // SAFETY: the caller's arguments, passed to the kernel unchanged, under the caller's
    // mmap(2) contract.
    unsafe { shim_sys::raw_mmap(addr, len, prot, flags, fd, offset) }
}

/// `mmap(2)`, interposed: see the crate documentation.
///
/// # Safety
/// The contract of `mmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> *mut c_void {
    // SAFETY: forwarded under the caller's contract.
    unsafe { shim_mmap(addr, len, prot, flags, fd, offset) }
}

/// `mmap64(2)`, the same as `mmap` on 64-bit Linux (programs built with
/// `_FILE_OFFSET_BITS=64` call it).
///
/// # Safety
/// The contract of `mmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> *mut c_void {
    // SAFETY: forwarded under the caller's contract.
    unsafe { shim_mmap(addr, len, prot, flags, fd, offset) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernel_glue::consts::{MAP_ANONYMOUS, MAP_PRIVATE};

    #[test]
    fn only_plain_shared_file_mappings_are_candidates() {
        let null = std::ptr::null_mut();
        assert!(candidate(null, MAP_SHARED, 3, 0));
        assert!(candidate(null, MAP_SHARED | shim_sys::MAP_POPULATE, 3, 0));
        assert!(candidate(null, shim_sys::MAP_SHARED_VALIDATE, 3, 0));
        assert!(!candidate(null, MAP_PRIVATE, 3, 0));
        assert!(!candidate(null, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
        assert!(!candidate(null, MAP_SHARED | MAP_FIXED, 3, 0));
        assert!(!candidate(null, MAP_SHARED, 3, 4096));
        assert!(!candidate(4096 as *mut c_void, MAP_SHARED, 3, 0));
        assert!(!candidate(
            null,
            MAP_SHARED | kernel_glue::consts::MAP_HUGETLB,
            3,
            0
        ));
    }
}
