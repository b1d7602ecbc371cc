//! What database processes do to their shared memory besides reading and writing it:
//! `mprotect`, `mlock`, `madvise`, direct I/O into and out of it, reads of another
//! process's memory, `fork`, core dumps. Safe wrappers over ranges of a [`Mapping`], for
//! the kernel-interaction tests and the tools that measure what each call does to page
//! table sharing.
//!
//! Every range is checked against the mapping (`EINVAL` outside it). Changing the
//! protection of a range or discarding it can make a later access fault (`SIGSEGV`,
//! `SIGBUS`): that ends the process, it is not memory unsafety, because nothing here or
//! in [`Mapping`] hands out references into the mapping.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use crate::check_retval;
use crate::mapping::Mapping;

/// `open(2)` flag for direct I/O.
pub const O_DIRECT: i32 = libc::O_DIRECT;

/// The address and length of `[offset, offset + len)` of `m`.
fn span(m: &Mapping, offset: u64, len: u64) -> io::Result<(*mut libc::c_void, usize)> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| crate::errno(libc::EINVAL))?;
    if end > m.len() as u64 {
        return Err(crate::errno(libc::EINVAL));
    }
    Ok((
        (m.addr() + offset as usize) as *mut libc::c_void,
        len as usize,
    ))
}

/// Safe wrapper for `mprotect(2)` of a range of `m` to `prot` (`PROT_*` bits, `PROT_NONE`
/// allowed). A later access the new protection forbids kills the process with `SIGSEGV`.
///
/// # Errors
/// `EINVAL` out of range or unaligned; the kernel's errno (`EACCES` for write on a
/// read-only file).
pub fn mprotect(m: &Mapping, offset: u64, len: u64, prot: i32) -> io::Result<()> {
    let (p, n) = span(m, offset, len)?;
    // SAFETY: the range lies inside a mapping we own; no Rust reference points into it.
    check_retval(unsafe { libc::mprotect(p, n, prot) })?;
    Ok(())
}

/// Safe wrapper for `mlock(2)` of a range of `m`.
///
/// # Errors
/// The kernel's errno (`ENOMEM`, `EPERM`, `EAGAIN`).
pub fn mlock(m: &Mapping, offset: u64, len: u64) -> io::Result<()> {
    let (p, n) = span(m, offset, len)?;
    // SAFETY: locking pages changes no contents.
    check_retval(unsafe { libc::mlock(p, n) })?;
    Ok(())
}

/// Safe wrapper for `munlock(2)` of a range of `m`.
///
/// # Errors
/// The kernel's errno.
pub fn munlock(m: &Mapping, offset: u64, len: u64) -> io::Result<()> {
    let (p, n) = span(m, offset, len)?;
    // SAFETY: unlocking pages changes no contents.
    check_retval(unsafe { libc::munlock(p, n) })?;
    Ok(())
}

/// `madvise(2)` advice this module offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop this process's page table entries (shared data stays).
    DontNeed,
    /// `MADV_REMOVE`: punch the range out of the file, for every process.
    Remove,
    /// `MADV_PAGEOUT`: reclaim the pages now (to swap for shmem).
    PageOut,
}

/// Safe wrapper for `madvise(2)` of a range of `m`.
///
/// # Errors
/// The kernel's errno (`EINVAL` for advice the mapping does not take).
pub fn madvise(m: &Mapping, offset: u64, len: u64, advice: Advice) -> io::Result<()> {
    let (p, n) = span(m, offset, len)?;
    let a = match advice {
        Advice::DontNeed => libc::MADV_DONTNEED,
        Advice::Remove => libc::MADV_REMOVE,
        Advice::PageOut => libc::MADV_PAGEOUT,
    };
    // SAFETY: the range is inside our mapping; discarding shared memory changes what
    // every process reads, but no Rust reference points into it.
    check_retval(unsafe { libc::madvise(p, n, a) })?;
    Ok(())
}

/// Safe wrapper for `pwrite(2)` of `[offset, offset + len)` of `m` to `fd` at `file_offset`
/// (with an `O_DIRECT` descriptor the kernel reads the pages by pinning them).
///
/// # Errors
/// `EINVAL` out of range; the kernel's errno.
pub fn pwrite_from(
    fd: impl AsFd,
    m: &Mapping,
    offset: u64,
    len: u64,
    file_offset: u64,
) -> io::Result<usize> {
    let (p, n) = span(m, offset, len)?;
    let off = libc::off_t::try_from(file_offset).map_err(|_| crate::errno(libc::EINVAL))?;
    // SAFETY: the source is inside our mapping; the kernel only reads it.
    let r = unsafe { libc::pwrite(fd.as_fd().as_raw_fd(), p, n, off) };
    check_retval(r).map(|r| r as usize)
}

/// Safe wrapper for `pread(2)` from `fd` at `file_offset` into `[offset, offset + len)`
/// of `m`.
///
/// # Errors
/// `EINVAL` out of range; `EACCES` for a read-only mapping; the kernel's errno.
pub fn pread_into(
    fd: impl AsFd,
    m: &Mapping,
    offset: u64,
    len: u64,
    file_offset: u64,
) -> io::Result<usize> {
    if m.protection() != crate::mapping::Protection::ReadWrite {
        return Err(crate::errno(libc::EACCES));
    }
    let (p, n) = span(m, offset, len)?;
    let off = libc::off_t::try_from(file_offset).map_err(|_| crate::errno(libc::EINVAL))?;
    // SAFETY: the target is inside our writable mapping; no Rust reference points into it.
    let r = unsafe { libc::pread(fd.as_fd().as_raw_fd(), p, n, off) };
    check_retval(r).map(|r| r as usize)
}

/// Safe wrapper for `process_vm_readv(2)`: copies `buf.len()` bytes at `remote_addr` of
/// process `pid` into `buf`.
///
/// # Errors
/// `ESRCH`, `EPERM`, `EFAULT` (unmapped remote range), `EINVAL`.
pub fn process_vm_readv(pid: u32, remote_addr: usize, buf: &mut [u8]) -> io::Result<usize> {
    let pid = i32::try_from(pid).map_err(|_| crate::errno(libc::EINVAL))?;
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: remote_addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we own mutably; the remote range is only
    // read, in another process, and checked by the kernel.
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    check_retval(r).map(|r| r as usize)
}

/// Copies `data` into `[offset, offset + data.len())` of `m` with `process_vm_writev(2)` on
/// this process: the kernel does the copy, so a page it cannot fault in (a hole of a
/// mapping registered for userfaultfd `SIGBUS`) fails the call with `EFAULT` instead of
/// raising a signal.
///
/// # Errors
/// `EINVAL` out of range; `EACCES` for a read-only mapping; `EFAULT`; a short copy is
/// `EFAULT` too.
pub fn write_through_kernel(m: &Mapping, offset: u64, data: &[u8]) -> io::Result<()> {
    if m.protection() != crate::mapping::Protection::ReadWrite {
        return Err(crate::errno(libc::EACCES));
    }
    let (p, n) = span(m, offset, data.len() as u64)?;
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: n,
    };
    let remote = libc::iovec {
        iov_base: p,
        iov_len: n,
    };
    // SAFETY: `local` describes `data`, which the kernel only reads; the target range is
    // inside our writable mapping and no Rust reference points into it.
    let r = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    if check_retval(r)? as usize != n {
        return Err(crate::errno(libc::EFAULT));
    }
    Ok(())
}

/// The result of [`fork`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent, with the child's pid.
    Parent(u32),
    /// In the child.
    Child,
}

/// Safe wrapper for `fork(2)`.
///
/// # Safety
/// The calling process must have one thread: after forking a multi-threaded process the
/// child may only call async-signal-safe functions (locks held by other threads stay
/// held), which safe Rust cannot promise.
///
/// # Errors
/// `EAGAIN`, `ENOMEM`.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller guarantees a single-threaded process (function contract).
    let pid = check_retval(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid as u32)
    })
}

/// Safe wrapper for `waitpid(2)` on one child; returns its raw wait status.
///
/// # Errors
/// `ECHILD`, `EINTR`.
pub fn waitpid(pid: u32) -> io::Result<i32> {
    let pid = i32::try_from(pid).map_err(|_| crate::errno(libc::EINVAL))?;
    let mut status = 0;
    // SAFETY: valid out-pointer.
    check_retval(unsafe { libc::waitpid(pid, &mut status, 0) })?;
    Ok(status)
}

/// Safe wrapper for `_exit(2)`: ends the process without running exit handlers (what a
/// forked child of a Rust program does).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: plain syscall; never returns.
    unsafe { libc::_exit(code) }
}

/// Sets `RLIMIT_CORE` to unlimited for this process (so it leaves a core dump when it
/// crashes).
///
/// # Errors
/// `EPERM` above the hard limit without privilege.
pub fn allow_core_dumps() -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a rlimit.
    check_retval(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) })?;
    Ok(())
}

/// Whether a raw wait status says the process was killed by `signal` and left a core.
pub fn dumped_core(status: i32, signal: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == signal && libc::WCOREDUMP(status)
}

/// The signal that killed a process, from a raw wait status.
pub fn term_signal(status: i32) -> Option<i32> {
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}

/// The exit code of a process, from a raw wait status.
pub fn exit_code(status: i32) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Protection;

    #[test]
    fn ranges_are_checked() {
        let fd = crate::fd::memfd_create("kg-vmops", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        let m = Mapping::map_aligned(&fd, 1 << 20, Protection::ReadWrite, 4096).unwrap();
        let einval = |r: io::Result<()>| r.unwrap_err().raw_os_error();
        assert_eq!(einval(mprotect(&m, 1 << 20, 4096, 0)), Some(libc::EINVAL));
        assert_eq!(
            einval(madvise(&m, u64::MAX, 2, Advice::DontNeed)),
            Some(libc::EINVAL)
        );
        m.store_u64(0, 42).unwrap();
        let mut buf = [0u8; 8];
        let me = std::process::id();
        assert_eq!(process_vm_readv(me, m.addr(), &mut buf).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(buf), 42);
        write_through_kernel(&m, 8, &7u64.to_ne_bytes()).unwrap();
        assert_eq!(m.load_u64(8).unwrap(), 7);
        mlock(&m, 0, 4096).unwrap();
        munlock(&m, 0, 4096).unwrap();
        madvise(&m, 0, 4096, Advice::Remove).unwrap();
        assert_eq!(m.load_u64(0).unwrap(), 0, "MADV_REMOVE punched the page");
    }
}
