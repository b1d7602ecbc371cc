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

/// Safe wrapper for `getenv(3)`: the value of `name`, copied into `buf` (with its NUL),
/// or `None` when it is unset or does not fit.
///
/// Allocation-free. The value is copied at once because the environment's own string is
/// freed by a later `setenv`/`putenv` of the same variable.
pub fn getenv<'b>(name: &CStr, buf: &'b mut [u8]) -> Option<&'b CStr> {
    // SAFETY: `name` is NUL-terminated; getenv returns NULL or a pointer into the
    // environment, a NUL-terminated string, which we copy before returning.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated (above).
    let value = unsafe { CStr::from_ptr(p) }.to_bytes_with_nul();
    let dst = buf.get_mut(..value.len())?;
    dst.copy_from_slice(value);
    CStr::from_bytes_with_nul(dst).ok()
}

/// Whether the environment variable `name` is set (to anything, even empty).
pub fn env_is_set(name: &CStr) -> bool {
    // SAFETY: `name` is NUL-terminated; only the pointer's nullness is used.
    !unsafe { libc::getenv(name.as_ptr()) }.is_null()
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

/// Safe wrapper for `renameat2(2)` with `RENAME_NOREPLACE`, within `dir`. Allocation-free.
///
/// # Errors
/// `EEXIST` when `to` exists; the kernel's or the file system's errno.
pub fn renameat_noreplace(dir: BorrowedFd<'_>, from: &CStr, to: &CStr) -> io::Result<()> {
    let d = dir.as_raw_fd();
    // SAFETY: both names are NUL-terminated and `dir` is an open descriptor.
    let r = unsafe { libc::renameat2(d, from.as_ptr(), d, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `name` exists in `dir` (`fstatat(2)` without following a final symbolic
/// link). Allocation-free.
///
/// # Errors
/// The kernel's errno other than `ENOENT`.
pub fn exists_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated; fstatat writes one struct stat into our buffer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `ftruncate(2)` as a system call, so that the shim's own sizing never comes back to
/// the `ftruncate` it defines.
///
/// # Errors
/// The kernel's errno.
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    if raw_ftruncate(fd.as_raw_fd(), len) < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The path `/proc/self/fd/N` names for descriptor `fd` (`readlink(2)`), into `buf`
/// with a NUL. Allocation-free.
///
/// # Errors
/// The kernel's errno; `ENAMETOOLONG` when it does not fit.
pub fn fd_path<'b>(fd: BorrowedFd<'_>, buf: &'b mut [u8]) -> io::Result<&'b CStr> {
    let mut link = [0u8; 32];
    let mut w = &mut link[..];
    let _ = std::io::Write::write_fmt(&mut w, format_args!("/proc/self/fd/{}\0", fd.as_raw_fd()));
    let link = CStr::from_bytes_until_nul(&link)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `link` is NUL-terminated; readlink writes at most `buf.len() - 1` bytes into
    // our buffer.
    let n = unsafe { libc::readlink(link.as_ptr(), buf.as_mut_ptr().cast(), buf.len() - 1) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n >= buf.len() - 1 {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf[n] = 0;
    CStr::from_bytes_with_nul(&buf[..=n]).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Reads up to `buf.len()` bytes of the file `path` (a `/proc` file) into `buf`; returns
/// how many. Allocation-free.
///
/// # Errors
/// The kernel's errno.
pub fn read_file(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let fd = openat(None, path, libc::O_RDONLY, 0)?;
    let mut n = 0;
    while n < buf.len() {
        // SAFETY: the rest of our buffer, valid for its length.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf[n..].as_mut_ptr().cast(), buf.len() - n) };
        match r {
            0 => break,
            r if r > 0 => n += r as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(n)
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

/// The raw `ftruncate(2)` system call, bypassing the C library's (which the shim
/// replaces). Returns 0, or -1 with `errno` set.
pub fn raw_ftruncate(fd: i32, len: i64) -> i32 {
    // SAFETY: ftruncate takes plain integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_ftruncate, fd, len) as i32 }
}

/// The raw `fallocate(2)` system call. Returns 0, or -1 with `errno` set.
pub fn raw_fallocate(fd: i32, mode: i32, offset: i64, len: i64) -> i32 {
    // SAFETY: fallocate takes plain integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_fallocate, fd, mode, offset, len) as i32 }
}

/// Reads up to `len` bytes at `offset` of `fd` into `[addr, addr + len)`, retrying short
/// reads and `EINTR` (`pread(2)` into memory the caller owns). Returns the bytes read
/// (fewer at end of file).
///
/// # Errors
/// The kernel's errno.
///
/// # Safety
/// `[addr, addr + len)` must be writable memory the caller owns, referenced by nothing.
pub unsafe fn pread_into(
    fd: BorrowedFd<'_>,
    addr: usize,
    len: usize,
    offset: i64,
) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        // SAFETY: the rest of the caller's range (function contract).
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                (addr + done) as *mut c_void,
                len - done,
                offset + done as i64,
            )
        };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}

/// The raw `mprotect(2)` system call. Returns 0, or -1 with `errno` set.
///
/// # Safety
/// The caller must own `[addr, addr + len)`.
pub unsafe fn raw_mprotect(addr: *mut c_void, len: usize, prot: i32) -> i32 {
    // SAFETY: the caller owns the range.
    unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) as i32 }
}

/// The next definition of `name` after the calling object (`dlsym(RTLD_NEXT, name)`):
/// the C library's function the shim replaces, or null.
///
/// Does not allocate when the symbol exists. Call it outside of `malloc` and signal
/// handlers only (the shim's callers, `shm_open` and friends, are neither).
pub fn next_symbol(name: &CStr) -> *mut c_void {
    // SAFETY: `name` is NUL-terminated; dlsym only reads it.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
}

/// Safe wrapper for `dup3(2)`: makes `new` a duplicate of `old` (closing what `new` was),
/// close-on-exec when `cloexec`.
///
/// # Errors
/// The kernel's errno.
pub fn dup3(old: BorrowedFd<'_>, new: i32, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 takes plain integers; replacing `new` is what the caller asks for.
    if unsafe { libc::dup3(old.as_raw_fd(), new, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes `fd`, which the caller owns and no one uses any more (`close(2)`; errors are
/// ignored: the descriptor is gone either way).
pub fn close_raw(fd: i32) {
    // SAFETY: closing a descriptor the caller owns; nothing else refers to it.
    unsafe { libc::close(fd) };
}

/// Whether `fd` is close-on-exec (`fcntl(F_GETFD)`).
///
/// # Errors
/// `EBADF`.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFD takes no argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r & libc::FD_CLOEXEC != 0)
}

/// The device of the file system holding `path` (`stat(2)`). Allocation-free.
///
/// # Errors
/// The kernel's errno.
pub fn path_dev(path: &CStr) -> io::Result<u64> {
    stat(path).map(|st| st.st_dev)
}

/// `stat(2)` of `path`, following symbolic links. Allocation-free.
fn stat(path: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `path` is NUL-terminated; stat writes one struct stat into our buffer.
    if unsafe { libc::stat(path.as_ptr(), st.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: stat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Whether `path` (following symbolic links) is a socket owned by root; `false` when it
/// cannot be reached.
pub fn is_root_socket(path: &CStr) -> bool {
    stat(path).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK && st.st_uid == 0)
}

/// Whether `fd` has the extended attribute `name` (`fgetxattr(2)` with no buffer).
///
/// # Errors
/// The kernel's errno other than `ENODATA`.
pub fn has_xattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    // SAFETY: a null buffer of size 0 asks only for the value's size.
    let r = unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if r >= 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENODATA) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Reserves `len` bytes of address space (anonymous, `PROT_NONE`) at an address
/// congruent to `shift` modulo `align` (a power of two), for the caller to map over with
/// `MAP_FIXED`. Returns the address; the reservation is exactly `[addr, addr + len)`.
///
/// # Errors
/// `EINVAL` for a bad `align` or `shift`; `ENOMEM` when no such range is free.
pub fn reserve_aligned(len: usize, align: usize, shift: usize) -> io::Result<usize> {
    if len == 0 || !align.is_power_of_two() || shift >= align || shift % 4096 != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let span = len
        .checked_add(align)
        .and_then(|s| s.checked_add(shift))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous PROT_NONE reservation at a kernel-chosen address.
    let base = unsafe {
        raw_mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let addr = ((base + align - 1) & !(align - 1)) + shift;
    // SAFETY: both trimmed ranges are parts of the reservation just made, outside
    // [addr, addr + len), referenced by nothing.
    unsafe {
        if addr > base {
            raw_munmap(base as *mut c_void, addr - base);
        }
        if base + span > addr + len {
            raw_munmap((addr + len) as *mut c_void, base + span - addr - len);
        }
    }
    Ok(addr)
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
/// `MAP_SHARED`.
pub const MAP_SHARED: i32 = libc::MAP_SHARED;
/// `MAP_PRIVATE`.
pub const MAP_PRIVATE: i32 = libc::MAP_PRIVATE;
/// `MAP_FIXED`.
pub const MAP_FIXED: i32 = libc::MAP_FIXED;
/// `PROT_READ`.
pub const PROT_READ: i32 = libc::PROT_READ;
/// `PROT_WRITE`.
pub const PROT_WRITE: i32 = libc::PROT_WRITE;
/// `PROT_EXEC`.
pub const PROT_EXEC: i32 = libc::PROT_EXEC;

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
