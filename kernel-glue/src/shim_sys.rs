//! The system calls of the `LD_PRELOAD` shim that replaces the C library's `mmap`.
//!
//! A shim that defines `mmap` cannot reach the real one through the C library: calling
//! `mmap` would call itself, and `dlsym(RTLD_NEXT)` may allocate and re-enter. It makes the
//! system call directly instead, and reports failures through `errno` as `mmap` does.

use std::ffi::c_void;

/// The raw `mmap(2)` system call (`syscall(SYS_mmap, ...)`), bypassing every `mmap`
/// symbol. Returns the address, or `MAP_FAILED` with `errno` set, exactly like `mmap`.
/// Allocation-free and async-signal-safe.
///
/// # Safety
/// The same as `mmap(2)`: with `MAP_FIXED` it replaces whatever was mapped at `addr`, so
/// the caller must own that range.
pub unsafe fn raw_mmap(
    addr: *mut c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> *mut c_void {
    // SAFETY: the caller upholds mmap(2)'s contract; `syscall` passes the six arguments
    // through unchanged and returns -1 (MAP_FAILED) with errno set on failure.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) as *mut c_void }
}

/// `MAP_FAILED`, the error return of `mmap`.
pub const MAP_FAILED: *mut c_void = libc::MAP_FAILED;

/// `MAP_SHARED_VALIDATE` (`MAP_SHARED` that refuses unknown flags).
pub const MAP_SHARED_VALIDATE: i32 = libc::MAP_SHARED_VALIDATE;
/// `MAP_FIXED_NOREPLACE`.
pub const MAP_FIXED_NOREPLACE: i32 = libc::MAP_FIXED_NOREPLACE;
/// `MAP_POPULATE`.
pub const MAP_POPULATE: i32 = libc::MAP_POPULATE;
/// `MAP_NORESERVE`.
pub const MAP_NORESERVE: i32 = libc::MAP_NORESERVE;
/// `MAP_TYPE`: the bits that hold `MAP_SHARED`, `MAP_PRIVATE` or `MAP_SHARED_VALIDATE`.
pub const MAP_TYPE: i32 = 0x0f;

/// Sets the calling thread's `errno`.
pub fn set_errno(errno: i32) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's
    // life; writing an int there is what every failing libc call does.
    unsafe { *libc::__errno_location() = errno };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_mmap_maps_and_fails_like_mmap() {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, MAP_FAILED);
        // SAFETY: we own the page just mapped.
        unsafe { crate::mapping::munmap(p as usize, 4096) }.unwrap();
        // SAFETY: an invalid request (bad fd) maps nothing.
        let p = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                -1,
                0,
            )
        };
        assert_eq!(p, MAP_FAILED);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EBADF)
        );
        set_errno(libc::ENODEV);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENODEV)
        );
    }
}
