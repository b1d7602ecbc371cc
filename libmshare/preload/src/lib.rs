//! `libmshare_preload.so`: an `LD_PRELOAD` shim that gives unmodified programs what
//! `mshare_attach` gives.
//!
//! It defines `mmap`, `mmap64` and `munmap`.
//!
//! **Region files.** A call of the form
//! `mmap(NULL, size, PROT_READ[|PROT_WRITE], MAP_SHARED, fd, 0)`, where `fd` is a region
//! file on an msharefs mount and `size` is the region's size, is answered with a mapping of
//! the region at a granule-aligned (1 GiB) address; for hugetlb regions, a mapping of the
//! backing the daemon hands out, so page tables are shared with every other attacher. The
//! mapping is exactly `[addr, addr + size)`, so the program's `munmap` needs no help.
//! Candidates cost one `fstatfs`; FUSE files one more `ioctl`. `MAP_POPULATE` and
//! `MAP_NORESERVE` are honoured; calls with any other flag, a `PROT_EXEC`/`PROT_NONE`
//! protection or a partial length reach the kernel unchanged (for a hugetlb region that is
//! `ENODEV`, as without the shim).
//!
//! **Anonymous shared memory** (module [`anon`]). With `MSHARE_MOUNT=DIR` and
//! `MSHARE_ANON_MIN=BYTES` in the environment, `mmap(NULL, len, PROT_READ|PROT_WRITE,
//! MAP_SHARED|MAP_ANONYMOUS, -1, 0)` with `len >= MSHARE_ANON_MIN` (also with
//! `MAP_NORESERVE`, `MAP_POPULATE` or `MAP_HUGETLB` for 2 MiB pages) is placed on a new
//! hugetlb region in `DIR`, `len` rounded up to 2 MiB, 1 GiB-aligned, unlinked at once (or
//! kept as `MSHARE_ANON_NAME`). Children after `fork` inherit the shared mapping and with
//! it the memory and the shared page tables. When the region cannot be had the call goes to
//! the kernel unchanged and one line on standard error says why, so the program still
//! starts. `munmap(addr, len)` of such a mapping removes all of it (hugetlb mappings end
//! on a 2 MiB boundary; the shim rounds the length up).
//!
//! Every other call goes straight to the system call, without allocating, locking or
//! looking at the descriptor (the fast path: a few flag tests and one relaxed atomic load).
//! The shim's only state is a few atomics (settings read once from the environment, a
//! table of placed mappings), so it is safe in threaded programs and after `fork`.
//!
//! Failures of a region attach return `MAP_FAILED` with `errno` set as `mmap` would
//! (`EACCES` for `PROT_WRITE` on a descriptor opened read-only, `ENOMEM`, the daemon's
//! errno); a panic inside the shim (a bug) is caught and reported as `EIO` (for a region
//! file) or turned into the fallback (for anonymous memory).

use std::ffi::c_void;
use std::os::fd::BorrowedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kernel_glue::consts::{MAP_FIXED, MAP_SHARED};
use kernel_glue::errnos::EIO;
use kernel_glue::mapping::Protection;
use kernel_glue::shim_sys::{self, MAP_FAILED};
use mshare::interpose;

pub mod anon;

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

/// Flags an anonymous candidate may carry besides `MAP_SHARED|MAP_ANONYMOUS`.
const ANON_HONOURED_FLAGS: i32 = shim_sys::MAP_POPULATE
    | shim_sys::MAP_NORESERVE
    | shim_sys::MAP_HUGETLB
    | (shim_sys::MAP_HUGE_MASK << shim_sys::MAP_HUGE_SHIFT);

/// Whether a call is anonymous shared memory of a kind the shim may place on a region
/// (before looking at the size threshold): no address, shared, read-write, no flags but
/// those honoured, and huge pages (if asked for) of the default or the 2 MiB size.
fn anon_candidate(addr: *mut c_void, prot: i32, flags: i32) -> bool {
    let map_type = flags & shim_sys::MAP_TYPE;
    let huge_size = flags & (shim_sys::MAP_HUGE_MASK << shim_sys::MAP_HUGE_SHIFT);
    addr.is_null()
        && flags & shim_sys::MAP_ANONYMOUS != 0
        && (map_type == MAP_SHARED || map_type == shim_sys::MAP_SHARED_VALIDATE)
        && prot == shim_sys::PROT_READ_WRITE
        && flags & !(shim_sys::MAP_TYPE | shim_sys::MAP_ANONYMOUS | ANON_HONOURED_FLAGS) == 0
        && (huge_size == 0
            || (flags & shim_sys::MAP_HUGETLB != 0 && huge_size == shim_sys::MAP_HUGE_2MB))
}

/// The anonymous slow path: the placed mapping's address, or `None` for the kernel.
fn place_anon(len: usize, flags: i32) -> Option<usize> {
    let min = anon::anon_min()?;
    if len < min {
        return None;
    }
    let populate = flags & shim_sys::MAP_POPULATE != 0;
    // A panic here is a bug; the program still gets its memory from the kernel.
    catch_unwind(|| anon::place(len, populate)).unwrap_or(None)
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
    let mapping = interpose::attach_fd(fd, &info, prot).map_err(|e| kernel_glue::errno_of(&e))?;
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
    if flags & shim_sys::MAP_ANONYMOUS != 0 {
        if anon_candidate(addr, prot, flags) {
            if let Some(placed) = place_anon(len, flags) {
                return placed as *mut c_void;
            }
        }
    } else if candidate(addr, flags, fd, offset) {
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
    let mapped = unsafe { shim_sys::raw_mmap(addr, len, prot, flags, fd, offset) };
    if flags & (MAP_FIXED | shim_sys::MAP_FIXED_NOREPLACE) != 0
        && mapped != MAP_FAILED
        && anon::any_placed()
    {
        // A fixed mapping replaced (part of) a placed one: the table must not round a later
        // munmap that ends inside the new mapping.
        anon::forget(mapped as usize, len);
    }
    mapped
}

/// `munmap(2)`, interposed: a range that ends inside a mapping the shim placed for
/// anonymous shared memory is extended to the next 2 MiB boundary (the mapping's huge
/// page), so `munmap(addr, len)` with the caller's `len` removes it, as it would remove
/// the anonymous mapping. Everything else goes to the kernel unchanged.
///
/// # Safety
/// The contract of `munmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> i32 {
    if !anon::any_placed() {
        // SAFETY: the caller's arguments, under the caller's munmap(2) contract.
        return unsafe { shim_sys::raw_munmap(addr, len) };
    }
    let len = anon::munmap_len(addr as usize, len);
    // SAFETY: the caller's range, extended only over the rest of the huge page of a
    // mapping the shim placed and handed to the caller, who is unmapping its end.
    let r = unsafe { shim_sys::raw_munmap(addr, len) };
    if r == 0 {
        anon::forget(addr as usize, len);
    }
    r
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

    #[test]
    fn only_plain_shared_anonymous_read_write_memory_is_an_anon_candidate() {
        let null = std::ptr::null_mut();
        let rw = shim_sys::PROT_READ_WRITE;
        let anon = MAP_SHARED | MAP_ANONYMOUS;
        assert!(anon_candidate(null, rw, anon));
        assert!(anon_candidate(
            null,
            rw,
            shim_sys::MAP_SHARED_VALIDATE | MAP_ANONYMOUS
        ));
        assert!(anon_candidate(null, rw, anon | shim_sys::MAP_NORESERVE));
        assert!(anon_candidate(null, rw, anon | shim_sys::MAP_POPULATE));
        assert!(anon_candidate(null, rw, anon | shim_sys::MAP_HUGETLB));
        let huge2m = anon | shim_sys::MAP_HUGETLB | shim_sys::MAP_HUGE_2MB;
        assert!(anon_candidate(null, rw, huge2m));
        // 1 GiB pages, or a page size without MAP_HUGETLB: not ours.
        let huge1g = anon | shim_sys::MAP_HUGETLB | (30 << shim_sys::MAP_HUGE_SHIFT);
        assert!(!anon_candidate(null, rw, huge1g));
        assert!(!anon_candidate(null, rw, anon | shim_sys::MAP_HUGE_2MB));
        assert!(!anon_candidate(null, rw, MAP_PRIVATE | MAP_ANONYMOUS));
        assert!(!anon_candidate(null, rw, MAP_SHARED));
        assert!(!anon_candidate(null, rw, anon | MAP_FIXED));
        assert!(!anon_candidate(null, rw, anon | libc::MAP_LOCKED));
        assert!(!anon_candidate(null, kernel_glue::consts::PROT_READ, anon));
        assert!(!anon_candidate(
            null,
            rw | kernel_glue::consts::PROT_EXEC,
            anon
        ));
        assert!(!anon_candidate(4096 as *mut c_void, rw, anon));
    }
}
