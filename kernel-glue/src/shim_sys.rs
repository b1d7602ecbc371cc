//! The system calls of the `LD_PRELOAD` shim that replaces the C library's `mmap`.
//!
//! A shim that defines `mmap` cannot reach the real one through the C library: calling
//! `mmap` would call itself, and `dlsym(RTLD_NEXT)` may allocate and re-enter. It makes the
//! system call directly instead, and reports failures through `errno` as `mmap` does.
//!
//! Everything here is allocation-free: the shim's slow paths run inside `mmap`, where the
//! caller may be anything (the allocator itself, a freshly forked child of a threaded
//! program), so even they build paths on the stack and call these instead of the
//! allocating wrappers in [`crate::fd`].

use std::ffi::{CStr, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

/// The raw `munmap(2)` system call, bypassing every `munmap` symbol. Returns 0, or -1
/// with `errno` set, exactly like `munmap`. Allocation-free and async-signal-safe.
///
/// # Safety
/// The same as `munmap(2)`: the caller must own `[addr, addr + len)`.
pub unsafe fn raw_munmap(addr: *mut c_void, len: usize) -> i32 {
    // SAFETY: the caller owns the range; `syscall` returns 0 or -1 with errno set.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as i32 }
}

/// Safe wrapper for `getenv(3)`: the value of `name`, borrowed from the environment.
///
/// Allocation-free. The value lives as long as nobody changes that variable: like every
/// `getenv` caller, the shim relies on the program not calling `setenv`/`putenv` for the
/// `MSHARE_*` variables while another thread reads them.
pub fn getenv(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: `name` is NUL-terminated; getenv returns NULL or a pointer into the
    // environment, a NUL-terminated string that stays valid until the variable changes.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        Some(unsafe { CStr::from_ptr(p) })
    }
}

/// Safe wrapper for `openat(2)`, relative to `dir` (or the working directory for `None`),
/// always with `O_CLOEXEC`. Allocation-free, unlike `kernel_glue::fd::open`.
///
/// # Errors
/// The kernel's errno.
pub fn openat(
    dir: Option<BorrowedFd<'_>>,
    path: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `path` is NUL-terminated and `dirfd` is open or AT_FDCWD; the mode argument
    // is read only with O_CREAT.
    let fd = unsafe { libc::openat(dirfd, path.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned `fd` and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Safe wrapper for `unlinkat(2)` of a file (not a directory) in `dir`. Allocation-free.
///
/// # Errors
/// The kernel's errno.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `dir` is an open descriptor.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Safe wrapper for `setxattr(2)` by path. Allocation-free, unlike
/// `kernel_glue::fd::setxattr`.
///
/// # Errors
/// The kernel's or the file system's errno.
pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated; `value` is valid for `value.len()` bytes.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Safe wrapper for `getpid(2)`.
pub fn getpid() -> u32 {
    // SAFETY: getpid cannot fail and touches no memory.
    let pid = unsafe { libc::getpid() };
    pid as u32
}

/// Writes `msg` to standard error with `write(2)`, retrying short writes and `EINTR`,
/// ignoring other failures (there is nowhere left to report them). Allocation-free and
/// async-signal-safe.
pub fn write_stderr(msg: &[u8]) {
    let mut rest = msg;
    while !rest.is_empty() {
        // SAFETY: `rest` is valid for `rest.len()` bytes; fd 2 is only written to.
        let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
        if n > 0 {
            rest = &rest[n as usize..];
        } else if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return;
        }
    }
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
/// `MAP_ANONYMOUS`.
pub const MAP_ANONYMOUS: i32 = libc::MAP_ANONYMOUS;
/// `MAP_HUGETLB`.
pub const MAP_HUGETLB: i32 = libc::MAP_HUGETLB;
/// `MAP_HUGE_SHIFT`: `MAP_HUGETLB`'s page size, as log2, sits in the bits from here.
pub const MAP_HUGE_SHIFT: i32 = libc::MAP_HUGE_SHIFT;
/// `MAP_HUGE_MASK`: the width of the page-size field (after shifting).
pub const MAP_HUGE_MASK: i32 = libc::MAP_HUGE_MASK;
/// `MAP_HUGE_2MB`: `MAP_HUGETLB` with 2 MiB pages, spelled out.
pub const MAP_HUGE_2MB: i32 = libc::MAP_HUGE_2MB;
/// `PROT_READ | PROT_WRITE`.
pub const PROT_READ_WRITE: i32 = libc::PROT_READ | libc::PROT_WRITE;
/// `O_DIRECTORY`.
pub const O_DIRECTORY: i32 = libc::O_DIRECTORY;

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
