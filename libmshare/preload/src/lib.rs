//! `libmshare_preload.so`: an `LD_PRELOAD` shim that gives unmodified programs what
//! `mshare_attach` gives: memory on msharefs hugetlb regions, mapped at 1 GiB-aligned
//! addresses, so page tables are shared between processes.
//!
//! - **Region files** (module [`region`]): `mmap` of a region file on an msharefs mount.
//! - **Anonymous shared memory** (module [`anon`]): with `MSHARE_MOUNT` and
//!   `MSHARE_ANON_MIN`, large `MAP_SHARED|MAP_ANONYMOUS` mappings (PostgreSQL's main
//!   segment) are placed on new hugetlb regions.
//! - **POSIX shared memory** (module [`posix`]) and **System V shared memory** (module
//!   [`sysv`]): with `MSHARE_MOUNT` and `MSHARE_SHM_MIN`, segments of at least that size
//!   keep their data on hugetlb regions, while names, keys, ids, permissions and attach
//!   counts stay the kernel's.
//!
//! Settings are in [`env`]. The shim defines `mmap`, `mmap64`, `munmap`, `shm_open`,
//! `shm_unlink`, `ftruncate(64)`, `fallocate(64)`, `posix_fallocate(64)`, `shmget`,
//! `shmat` and `shmdt`, and exports nothing else.
//!
//! Every call the shim does not take goes straight to the system call (or the C library's
//! function), without allocating or locking (the fast path: a few flag tests and relaxed
//! atomic loads, plus one `fstatfs` for `mmap` of a file). The shim's own system calls never
//! go through the symbols it defines. Its state is a few atomics and lock-free tables, so it
//! is safe in threaded programs and after `fork`.
//!
//! Failures return what the replaced call returns on failure, with `errno` set as the
//! kernel would set it; a panic inside the shim (a bug) is caught and reported as `EIO` or
//! turned into the kernel's answer, and never unwinds into the program.

use std::ffi::c_void;
use std::os::fd::BorrowedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kernel_glue::consts::{MAP_FIXED, MAP_SHARED};
use kernel_glue::errnos::EIO;
use kernel_glue::shim_sys::{self, MAP_FAILED};

pub mod anon;
pub mod env;
pub mod log;
pub mod placed;
pub mod posix;
pub mod region;
pub mod sysv;

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
    let min = env::anon_min()?;
    if len < min {
        return None;
    }
    let populate = flags & shim_sys::MAP_POPULATE != 0;
    // A panic here is a bug; the program still gets its memory from the kernel.
    catch_unwind(|| anon::place(len, populate)).unwrap_or(None)
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
    } else if region::candidate(flags, fd) {
        // SAFETY: `fd >= 0`. The borrow lives only for this call; the shim never closes
        // it, and a descriptor another thread closes concurrently only makes the syscalls
        // below fail (EBADF), exactly as it would make mmap(2) fail.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let mapped = catch_unwind(AssertUnwindSafe(|| {
            region::map(addr as usize, len, prot, flags, borrowed, offset)
        }));
        match mapped {
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
    if flags & (MAP_FIXED | shim_sys::MAP_FIXED_NOREPLACE) != 0 && mapped != MAP_FAILED {
        gone(mapped as usize, len);
    }
    mapped
}

/// `munmap(2)`, interposed: a range that ends inside a mapping the shim placed with an
/// unrounded length is extended to the next 2 MiB boundary (the mapping's huge
/// page), so `munmap(addr, len)` with the caller's `len` removes it, as it would remove
/// the anonymous mapping. Everything else goes to the kernel unchanged.
///
/// # Safety
/// The contract of `munmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> i32 {
    if !placed::any() && !sysv::any() {
        // SAFETY: the caller's arguments, under the caller's munmap(2) contract.
        return unsafe { shim_sys::raw_munmap(addr, len) };
    }
    let len = placed::munmap_len(addr as usize, len);
    // SAFETY: the caller's range, extended only over the rest of the huge page of a
    // mapping the shim placed and handed to the caller, who is unmapping its end.
    let r = unsafe { shim_sys::raw_munmap(addr, len) };
    if r == 0 {
        gone(addr as usize, len);
    }
    r
}

/// `[addr, addr + len)` was unmapped or replaced: the tables must forget what was there
/// (a later `munmap` ending inside must not be rounded; System V attachments wholly inside
/// are detached).
fn gone(addr: usize, len: usize) {
    if placed::any() {
        placed::forget(addr, len);
    }
    if sysv::any() {
        sysv::unmapped(addr, len);
    }
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
