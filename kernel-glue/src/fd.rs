//! File-descriptor syscalls: memfd, sizes, allocation, stat, fcntl, ioctl, flock, xattr.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use zerocopy::{FromBytes, IntoBytes};

use crate::check_retval;

fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| crate::errno(libc::EINVAL))
}

fn path_cstring(p: &Path) -> io::Result<CString> {
    cstring(p.as_os_str().as_bytes())
}

/// Safe wrapper for `memfd_create(2)`, with `MFD_CLOEXEC` and, when `hugetlb` is set,
/// `MFD_HUGETLB` (default huge page size).
///
/// # Errors
/// `EINVAL` for a name with a NUL byte; otherwise the kernel's errno (`ENOMEM`, ...).
pub fn memfd_create(name: &str, hugetlb: bool) -> io::Result<OwnedFd> {
    let name = cstring(name.as_bytes())?;
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let fd = check_retval(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    // SAFETY: the kernel just returned `fd` to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Safe wrapper for `ftruncate(2)`.
///
/// # Errors
/// `EINVAL` when `len` does not fit an `off_t`; otherwise the kernel's errno.
pub fn ftruncate(fd: impl AsFd, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| crate::errno(libc::EINVAL))?;
    // SAFETY: plain syscall on a borrowed, open fd.
    check_retval(unsafe { libc::ftruncate(fd.as_fd().as_raw_fd(), len) })?;
    Ok(())
}

fn fallocate_raw(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset = i64::try_from(offset).map_err(|_| crate::errno(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| crate::errno(libc::EINVAL))?;
    loop {
        // SAFETY: plain syscall on a borrowed, open fd.
        let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) };
        match check_retval(r) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other.map(|_| ()),
        }
    }
}

/// Safe wrapper for `fallocate(2)` with mode 0: allocates (and for hugetlbfs, zeroes and
/// reserves) the pages of `[offset, offset + len)`, growing the file if needed.
///
/// # Errors
/// `ENOSPC` when the pages cannot be had; `EINVAL` for ranges that do not fit an `off_t`.
pub fn fallocate(fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate_raw(fd.as_fd(), 0, offset, len)
}

/// Safe wrapper for `fallocate(2)` with `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: frees
/// the pages of the range; they read as zero afterwards.
///
/// # Errors
/// The kernel's errno (`EOPNOTSUPP` on file systems without hole punching).
pub fn fallocate_punch_hole(fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate_raw(
        fd.as_fd(),
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// The fields of `struct stat` msharefs uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Device of the file system holding the file.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// File type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Hard links (0 once the last name is gone).
    pub nlink: u64,
}

impl Stat {
    fn from_raw(st: &libc::stat) -> Self {
        Stat {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            nlink: st.st_nlink,
        }
    }
}

/// The major and minor numbers of a device number (`st_dev`), as `/proc/self/mountinfo`
/// writes them (`MAJOR:MINOR`).
pub fn major_minor(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// Safe wrapper for `fstat(2)`.
///
/// # Errors
/// The kernel's errno.
pub fn fstat(fd: impl AsFd) -> io::Result<Stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out-pointer for one `struct stat`.
    check_retval(unsafe { libc::fstat(fd.as_fd().as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(Stat::from_raw(&st))
}

/// Safe wrapper for `stat(2)`.
///
/// # Errors
/// The kernel's errno (`ENOTCONN` for a dead FUSE mount).
pub fn stat(path: &Path) -> io::Result<Stat> {
    let p = path_cstring(path)?;
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid path string and out-pointer.
    check_retval(unsafe { libc::stat(p.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: stat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(Stat::from_raw(&st))
}

/// The fields of `struct statfs` msharefs uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// File system magic (`HUGETLBFS_MAGIC`, `TMPFS_MAGIC`, `FUSE_SUPER_MAGIC`, ...).
    pub fs_type: i64,
    /// Block size; for hugetlbfs, the huge page size.
    pub block_size: u64,
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub blocks_free: u64,
}

impl StatFs {
    fn from_raw(s: &libc::statfs) -> Self {
        StatFs {
            fs_type: s.f_type,
            block_size: s.f_bsize as u64,
            blocks: s.f_blocks,
            blocks_free: s.f_bfree,
        }
    }
}

/// Safe wrapper for `fstatfs(2)`.
///
/// # Errors
/// The kernel's errno.
pub fn fstatfs(fd: impl AsFd) -> io::Result<StatFs> {
    let mut s = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid out-pointer for one `struct statfs`.
    check_retval(unsafe { libc::fstatfs(fd.as_fd().as_raw_fd(), s.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded, so it filled `s`.
    let s = unsafe { s.assume_init() };
    Ok(StatFs::from_raw(&s))
}

/// Safe wrapper for `statfs(2)`.
///
/// # Errors
/// The kernel's errno.
pub fn statfs(path: &Path) -> io::Result<StatFs> {
    let p = path_cstring(path)?;
    let mut s = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid path string and out-pointer.
    check_retval(unsafe { libc::statfs(p.as_ptr(), s.as_mut_ptr()) })?;
    // SAFETY: statfs succeeded, so it filled `s`.
    let s = unsafe { s.assume_init() };
    Ok(StatFs::from_raw(&s))
}

/// Safe wrapper for `fcntl(fd, F_GETFL)`: the file status flags, including the access
/// mode (`flags & O_ACCMODE`).
///
/// # Errors
/// The kernel's errno.
pub fn fcntl_getfl(fd: impl AsFd) -> io::Result<i32> {
    // SAFETY: F_GETFL takes no argument and only reads kernel state.
    check_retval(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GETFL) })
}

/// Safe wrapper for `close(2)` that reports its result (dropping an `OwnedFd` ignores
/// it). The descriptor is gone afterwards either way, as `close(2)` promises on Linux.
///
/// # Errors
/// The kernel's or the file system's errno (a FUSE `flush` error, `EIO`, ...).
pub fn close(fd: OwnedFd) -> io::Result<()> {
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: we owned `raw` (it came out of an `OwnedFd`) and give it up here; it is not
    // used again, whatever close returns (Linux releases it even on error).
    check_retval(unsafe { libc::close(raw) })?;
    Ok(())
}

/// Safe wrapper for `open(2)` with `O_CLOEXEC` added to `flags`.
///
/// # Errors
/// The kernel's errno.
pub fn open(path: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let p = path_cstring(path)?;
    // SAFETY: valid path string; the mode argument is read only with O_CREAT.
    let fd = check_retval(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: the kernel just returned `fd` and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the file `fd` refers to again, through its `/proc/self/fd` link, with `flags`
/// (`O_CLOEXEC` added): a new open file description of the same inode, whatever its path
/// now is (a reopen with less access than `fd` has, e.g. read-only from read-write).
///
/// # Errors
/// The kernel's errno (`EACCES` when the caller may not open the file with `flags`).
pub fn reopen(fd: impl AsFd, flags: i32) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    open(Path::new(&path), flags, 0)
}

/// Safe wrapper for `poll(2)` of one descriptor with a zero timeout: whether it is
/// readable now (`POLLIN`; also true on `POLLHUP`/`POLLERR`). A pidfd is readable once its
/// process has exited.
///
/// # Errors
/// The kernel's errno (`EINTR` is retried).
pub fn readable(fd: impl AsFd) -> io::Result<bool> {
    readable_within(fd, Duration::ZERO)
}

/// [`readable`], waiting up to `timeout` (rounded up to whole milliseconds) for it.
///
/// # Errors
/// The kernel's errno (`EINTR` is retried with the time left).
pub fn readable_within(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    ready_within(fd.as_fd(), libc::POLLIN, timeout)
}

/// Whether `fd` can be written to (or has an error or hang-up to report) within
/// `timeout` (`poll(2)` for `POLLOUT`).
///
/// # Errors
/// The kernel's errno.
pub fn writable_within(fd: impl AsFd, timeout: Duration) -> io::Result<bool> {
    ready_within(fd.as_fd(), libc::POLLOUT, timeout)
}

fn ready_within(fd: BorrowedFd<'_>, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        match check_retval(unsafe { libc::poll(&mut p, 1, ms) }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(p.revents & (events | libc::POLLHUP | libc::POLLERR) != 0),
        }
    }
}

/// Safe wrapper for `ioctl(2)` with a pointer argument whose size is encoded in `cmd`.
///
/// The size bits of `cmd` (`_IOC_SIZE`) must equal `size_of::<T>()`, so the kernel never
/// reads or writes past `arg`; other commands are refused with `EINVAL` before the call.
///
/// `T` is plain old data, checked by the compiler through zerocopy's traits: every byte
/// pattern the kernel (or a FUSE daemon answering the ioctl) may write is a valid `T`
/// (`FromBytes`: no `bool`, enum, reference or pointer fields), and `T` has no padding
/// whose uninitialised bytes the kernel could read (`IntoBytes`). The uapi structs derive
/// both; `Copy` alone would let the kernel write an invalid `bool` or a dangling
/// reference.
///
/// # Errors
/// The kernel's or the driver's errno (`ENOTTY` for an unknown command).
///
/// A type the kernel could write an invalid value into is refused at compile time:
///
/// ```compile_fail
/// let fd = kernel_glue::fd::memfd_create("x", false).unwrap();
/// let mut flag = false; // only 0 and 1 are valid bools
/// kernel_glue::fd::ioctl_ptr(&fd, 0x8001_7800, &mut flag).unwrap();
/// ```
pub fn ioctl_ptr<T: FromBytes + IntoBytes>(
    fd: impl AsFd,
    cmd: u32,
    arg: &mut T,
) -> io::Result<i32> {
    let size = ((cmd >> 16) & 0x3fff) as usize;
    if size != std::mem::size_of::<T>() {
        return Err(crate::errno(libc::EINVAL));
    }
    // SAFETY: `arg` points to `size_of::<T>()` writable, initialised bytes, exactly the
    // size the command encodes; whatever bytes the kernel writes there form a valid `T`
    // (`FromBytes`), and `T` has no padding (`IntoBytes`), so the kernel reads only
    // initialised bytes.
    check_retval(unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            cmd as libc::c_ulong,
            arg as *mut T as *mut libc::c_void,
        )
    })
}

/// An exclusive `flock(2)` on a lock file, released on drop. Serializes processes that
/// change a shared kernel resource (the huge-page pool).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Opens (creating, mode 0600) `path` and takes an exclusive `flock` on it, waiting.
    ///
    /// # Errors
    /// Creating the directory or file, or `flock(2)`.
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let fd = open(path, libc::O_RDWR | libc::O_CREAT, 0o600)?;
        loop {
            // SAFETY: plain syscall on an owned, open fd.
            match check_retval(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) }) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        Ok(FileLock {
            _file: File::from(fd),
        })
    }
}

/// Safe wrapper for `setxattr(2)`.
///
/// # Errors
/// The kernel's or the file system's errno.
pub fn setxattr(path: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let p = path_cstring(path)?;
    let n = cstring(name.as_bytes())?;
    // SAFETY: valid strings; `value` is readable for `value.len()` bytes.
    check_retval(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

/// Safe wrapper for `getxattr(2)`: the value, up to 4 KiB.
///
/// # Errors
/// The kernel's or the file system's errno (`ENODATA` when not set).
pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = path_cstring(path)?;
    let n = cstring(name.as_bytes())?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid strings; `buf` is writable for its length.
    let len = check_retval(unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    })?;
    buf.truncate(len as usize);
    Ok(buf)
}

/// Safe wrapper for `renameat2(2)` on two paths, with `flags` (`RENAME_NOREPLACE`, ...).
///
/// # Errors
/// The kernel's errno.
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let f = path_cstring(from)?;
    let t = path_cstring(to)?;
    // SAFETY: valid strings; AT_FDCWD makes the paths relative to the working directory.
    check_retval(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

/// Safe wrapper for `fchown(2)`.
///
/// # Errors
/// The kernel's errno.
pub fn fchown(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed, open fd.
    check_retval(unsafe { libc::fchown(fd.as_fd().as_raw_fd(), uid, gid) })?;
    Ok(())
}

/// Safe wrapper for `fchmod(2)`.
///
/// # Errors
/// The kernel's errno.
pub fn fchmod(fd: impl AsFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed, open fd.
    check_retval(unsafe { libc::fchmod(fd.as_fd().as_raw_fd(), mode) })?;
    Ok(())
}

/// Safe wrapper for `pread(2)`, retried until `buf` is full or end of file.
///
/// # Errors
/// The kernel's errno.
pub fn pread_full(fd: impl AsFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let off = offset
            .checked_add(done as u64)
            .and_then(|o| i64::try_from(o).ok())
            .ok_or_else(|| crate::errno(libc::EINVAL))?;
        // SAFETY: the slice tail is writable for its length.
        let n = unsafe {
            libc::pread(
                fd.as_fd().as_raw_fd(),
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                off,
            )
        };
        match check_retval(n) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(0) => break,
            Ok(n) => done += n as usize,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_size_and_allocation() {
        let fd = memfd_create("kg-test", false).unwrap();
        ftruncate(&fd, 1 << 20).unwrap();
        assert_eq!(fstat(&fd).unwrap().size, 1 << 20);
        fallocate(&fd, 0, 1 << 20).unwrap();
        assert!(fstat(&fd).unwrap().blocks >= (1 << 20) / 512);
        fallocate_punch_hole(&fd, 0, 1 << 20).unwrap();
        assert_eq!(fstat(&fd).unwrap().blocks, 0);
        assert_eq!(fstatfs(&fd).unwrap().fs_type, crate::TMPFS_MAGIC);
        let fl = fcntl_getfl(&fd).unwrap();
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDWR);
    }

    #[test]
    fn bad_sizes_are_einval() {
        let fd = memfd_create("kg-test", false).unwrap();
        let e = ftruncate(&fd, u64::MAX).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = fallocate(&fd, u64::MAX, 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert!(memfd_create("a\0b", false).is_err());
    }

    #[test]
    fn reopen_gives_a_new_description_of_the_same_file() {
        let fd = memfd_create("kg-test", false).unwrap();
        let ro = reopen(&fd, libc::O_RDONLY).unwrap();
        let (a, b) = (fstat(&fd).unwrap(), fstat(&ro).unwrap());
        assert_eq!((a.dev, a.ino), (b.dev, b.ino));
        assert_eq!(fcntl_getfl(&ro).unwrap() & libc::O_ACCMODE, libc::O_RDONLY);
        assert!(readable(&ro).unwrap(), "a file is always readable");
    }

    #[test]
    fn ioctl_size_mismatch_is_refused_before_the_call() {
        let fd = memfd_create("kg-test", false).unwrap();
        let mut small = 0u32;
        // _IOW('x', 0, 40 bytes) with a 4-byte argument.
        let e = ioctl_ptr(&fd, 0x4028_7800, &mut small).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }
}
