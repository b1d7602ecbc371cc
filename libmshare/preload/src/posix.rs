//! POSIX shared memory (`shm_open`) on msharefs.
//!
//! With `MSHARE_MOUNT` and `MSHARE_SHM_MIN` set, a segment whose first sizing
//! (`ftruncate`, `fallocate`, `posix_fallocate`, or their 64 variants) reaches
//! `MSHARE_SHM_MIN` gets its data on a hugetlb region of the mount (the daemon's `shm.rs`
//! has the protocol), and every later `shm_open` of its name, in any process that runs the
//! shim, opens that region. The program's descriptor is replaced in place (`dup3`) by the
//! region file, so `read`, `write`, `fstat`, `dup`, `fork`, `SCM_RIGHTS` and
//! `/proc/self/fd` all reach the region, and `mmap` of it gives a 1 GiB-aligned mapping
//! with shared page tables ([`crate::region`]).
//!
//! The name stays a `/dev/shm` file, so glibc's name rules and the kernel's `O_CREAT`,
//! `O_EXCL`, `O_TRUNC`, permissions and `shm_unlink` apply unchanged: the real
//! `shm_open`/`shm_unlink` run first, and the shim acts only on their success.
//!
//! The sizing calls' fast path (no `MSHARE_SHM_MIN`, or a size below it) is one atomic load
//! and a comparison before the system call.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use kernel_glue::errnos::*;
use kernel_glue::{consts, fd as kfd, shim_sys};
use mshare::client::{mount_info, request, socket_path};
use mshare::uapi::{self, MshareRegionInfo, ShmRequest};

use crate::env::{self, PATH_MAX};
use crate::log::{Bytes, errno_name, log};

/// Where glibc keeps POSIX shared memory.
const DEV_SHM: &CStr = c"/dev/shm";

/// A C library function the shim replaces, found once with `dlsym(RTLD_NEXT)`.
struct Next {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
}

impl Next {
    const fn new(name: &'static CStr) -> Next {
        Next {
            name,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The function's address; null if the C library has none (then the caller fails
    /// with `ENOSYS`).
    fn get(&self) -> *mut c_void {
        let mut p = self.ptr.load(Ordering::Acquire);
        if p.is_null() {
            p = shim_sys::next_symbol(self.name);
            self.ptr.store(p, Ordering::Release);
        }
        p
    }
}

static SHM_OPEN: Next = Next::new(c"shm_open");
static SHM_UNLINK: Next = Next::new(c"shm_unlink");
static POSIX_FALLOCATE: Next = Next::new(c"posix_fallocate");
static POSIX_FALLOCATE64: Next = Next::new(c"posix_fallocate64");

type ShmOpenFn = unsafe extern "C" fn(*const c_char, c_int, u32) -> c_int;
type ShmUnlinkFn = unsafe extern "C" fn(*const c_char) -> c_int;
type PosixFallocateFn = unsafe extern "C" fn(c_int, i64, i64) -> c_int;

/// Device of `/dev/shm` (0: not read yet).
static DEV_SHM_DEV: AtomicU64 = AtomicU64::new(0);

fn dev_shm_dev() -> Option<u64> {
    let mut dev = DEV_SHM_DEV.load(Ordering::Relaxed);
    if dev == 0 {
        dev = shim_sys::path_dev(DEV_SHM).ok()?;
        DEV_SHM_DEV.store(dev, Ordering::Relaxed);
    }
    Some(dev)
}

/// Keeps `errno` across the shim's own work after a call that succeeded.
struct SavedErrno(i32);

impl SavedErrno {
    fn save() -> SavedErrno {
        SavedErrno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl Drop for SavedErrno {
    fn drop(&mut self) {
        shim_sys::set_errno(self.0);
    }
}

/// Puts `region` in place of the program's descriptor `fd`, keeping its close-on-exec
/// flag.
fn replace(fd: BorrowedFd<'_>, region: BorrowedFd<'_>) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    let cloexec = shim_sys::is_cloexec(fd).map_err(|e| kernel_glue::errno_of(&e))?;
    shim_sys::dup3(region, fd.as_raw_fd(), cloexec).map_err(|e| kernel_glue::errno_of(&e))
}

// ---- sizing ---------------------------------------------------------------------------

/// The sizing hook: `Some(Ok(()))` when the segment open as `fd` became a region of `len`
/// bytes (the caller reports success), `Some(Err(errno))` when it should fail, `None` when
/// the call is not for us and goes to the kernel.
fn size_hook(fd: c_int, len: i64) -> Option<Result<(), i32>> {
    let min = env::shm_min()?;
    let len = u64::try_from(len).ok().filter(|&l| l >= min as u64)?;
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd >= 0`; the borrow lives for this call only and the shim never closes
    // it. A descriptor another thread closes meanwhile only makes the calls below fail.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    catch_unwind(|| promote(fd, len)).unwrap_or(None)
}

fn promote(fd: BorrowedFd<'_>, len: u64) -> Option<Result<(), i32>> {
    let st = kfd::fstat(fd).ok()?;
    // A regular /dev/shm file never sized, open read-write (else the kernel answers).
    if st.mode & 0o170000 != 0o100000 || st.size != 0 || Some(st.dev) != dev_shm_dev() {
        return None;
    }
    if kfd::fcntl_getfl(fd).ok()? & consts::O_ACCMODE != consts::O_RDWR {
        return None;
    }
    let mut dir_buf = [0u8; PATH_MAX];
    let dir = env::mount_dir(&mut dir_buf)?;
    let _errno = SavedErrno::save();
    let region = mount_info(dir).and_then(|info| {
        send(&info, ShmRequest::posix_size(len), Some(fd))?.ok_or_else(|| kernel_glue::errno(EIO))
    });
    match region {
        Ok(region) => Some(replace(fd, region.as_fd())),
        Err(e) => {
            let errno = kernel_glue::errno_of(&e);
            log(format_args!(
                "a {len}-byte POSIX shared-memory segment stays ordinary shared memory: \
                 msharefs at {:?} refused it: errno {errno} ({})",
                Bytes(dir.to_bytes()),
                errno_name(errno)
            ));
            None
        }
    }
}

/// `ftruncate(2)`, interposed: see the module documentation.
///
/// # Safety
/// The contract of `ftruncate(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: i64) -> c_int {
    match size_hook(fd, len) {
        Some(Ok(())) => 0,
        Some(Err(e)) => {
            shim_sys::set_errno(e);
            -1
        }
        None => shim_sys::raw_ftruncate(fd, len),
    }
}

/// `ftruncate64`, the same as `ftruncate` on 64-bit Linux.
///
/// # Safety
/// The contract of `ftruncate(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: i64) -> c_int {
    // SAFETY: forwarded under the caller's contract.
    unsafe { ftruncate(fd, len) }
}

/// `fallocate(2)`, interposed: `fallocate(fd, 0, 0, len)` sizes a segment.
///
/// # Safety
/// The contract of `fallocate(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    if mode == 0 && offset == 0 {
        match size_hook(fd, len) {
            Some(Ok(())) => return 0,
            Some(Err(e)) => {
                shim_sys::set_errno(e);
                return -1;
            }
            None => {}
        }
    }
    shim_sys::raw_fallocate(fd, mode, offset, len)
}

/// `fallocate64`, the same as `fallocate` on 64-bit Linux.
///
/// # Safety
/// The contract of `fallocate(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, offset: i64, len: i64) -> c_int {
    // SAFETY: forwarded under the caller's contract.
    unsafe { fallocate(fd, mode, offset, len) }
}

/// The shared body of `posix_fallocate` and `posix_fallocate64`, which return an errno
/// instead of setting it (glibc's own calls the `fallocate` system call directly, so
/// interposing `fallocate` alone would miss PostgreSQL 16+'s only sizing call).
fn posix_fallocate_with(next: &Next, fd: c_int, offset: i64, len: i64) -> c_int {
    if offset == 0 {
        match size_hook(fd, len) {
            Some(Ok(())) => return 0,
            Some(Err(e)) => return e,
            None => {}
        }
    }
    let f = next.get();
    if f.is_null() {
        return ENOSYS;
    }
    // SAFETY: the C library's posix_fallocate, which has this signature.
    let f: PosixFallocateFn = unsafe { std::mem::transmute::<*mut c_void, PosixFallocateFn>(f) };
    // SAFETY: the caller's arguments, under posix_fallocate(3)'s contract.
    unsafe { f(fd, offset, len) }
}

/// `posix_fallocate(3)`, interposed: `posix_fallocate(fd, 0, len)` sizes a segment.
///
/// # Safety
/// The contract of `posix_fallocate(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_fallocate(fd: c_int, offset: i64, len: i64) -> c_int {
    posix_fallocate_with(&POSIX_FALLOCATE, fd, offset, len)
}

/// `posix_fallocate64(3)`, interposed like `posix_fallocate`.
///
/// # Safety
/// The contract of `posix_fallocate(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_fallocate64(fd: c_int, offset: i64, len: i64) -> c_int {
    posix_fallocate_with(&POSIX_FALLOCATE64, fd, offset, len)
}

// ---- names ----------------------------------------------------------------------------

/// After a successful `shm_open`: if the segment is on msharefs, puts its region file in
/// place of `fd`. `Err` fails the `shm_open`: a segment marked as ours whose region cannot
/// be had must not silently read as the empty `/dev/shm` file.
fn adopt(fd: BorrowedFd<'_>) -> Result<(), i32> {
    match shim_sys::has_xattr(fd, uapi::SHM_PAIRED_XATTR) {
        Ok(true) => {}
        _ => return Ok(()),
    }
    let mut dir_buf = [0u8; PATH_MAX];
    let Some(dir) = env::mount_dir(&mut dir_buf) else {
        return Err(EIO);
    };
    let region = mount_info(dir).and_then(|info| send(&info, ShmRequest::posix_open(), Some(fd)));
    match region {
        Ok(Some(region)) => replace(fd, region.as_fd()),
        // The mark outlived its region (the mount was purged): an ordinary segment now.
        Err(e) if e.raw_os_error() == Some(ENOENT) => Ok(()),
        Ok(None) => Err(EIO),
        Err(e) => {
            let errno = kernel_glue::errno_of(&e);
            log(format_args!(
                "shm_open: the segment's data is on msharefs at {:?}, which cannot be \
                 reached: errno {errno} ({})",
                Bytes(dir.to_bytes()),
                errno_name(errno)
            ));
            Err(errno)
        }
    }
}

/// `shm_open(3)`, interposed: glibc's, then [`adopt`].
///
/// # Safety
/// The contract of `shm_open(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shm_open(name: *const c_char, oflag: c_int, mode: u32) -> c_int {
    let f = SHM_OPEN.get();
    if f.is_null() {
        shim_sys::set_errno(ENOSYS);
        return -1;
    }
    // SAFETY: glibc's shm_open, which has this signature.
    let f: ShmOpenFn = unsafe { std::mem::transmute::<*mut c_void, ShmOpenFn>(f) };
    // SAFETY: the caller's arguments, under shm_open(3)'s contract.
    let fd = unsafe { f(name, oflag, mode) };
    if fd < 0 || env::shm_min().is_none() {
        return fd;
    }
    let _errno = SavedErrno::save();
    // SAFETY: the descriptor shm_open just returned; the caller owns it, we only borrow.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    match catch_unwind(|| adopt(borrowed)).unwrap_or(Err(EIO)) {
        Ok(()) => fd,
        Err(e) => {
            drop(_errno);
            shim_sys::close_raw(fd);
            shim_sys::set_errno(e);
            -1
        }
    }
}

/// `shm_unlink(3)`, interposed: glibc's; then the daemon ends the region's name at once,
/// so the name is free for a new segment (the memory stays until the last descriptor and
/// mapping are gone).
///
/// # Safety
/// The contract of `shm_unlink(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shm_unlink(name: *const c_char) -> c_int {
    let f = SHM_UNLINK.get();
    if f.is_null() {
        shim_sys::set_errno(ENOSYS);
        return -1;
    }
    // SAFETY: glibc's shm_unlink, which has this signature.
    let f: ShmUnlinkFn = unsafe { std::mem::transmute::<*mut c_void, ShmUnlinkFn>(f) };
    // SAFETY: the caller's argument, under shm_unlink(3)'s contract.
    let r = unsafe { f(name) };
    if r == 0 && env::shm_min().is_some() {
        let _errno = SavedErrno::save();
        let _ = catch_unwind(reconcile);
    }
    r
}

/// Sends `req` (with `fd`) to the daemon whose mount `info` describes; returns the
/// descriptor it yields.
pub fn send(
    info: &MshareRegionInfo,
    req: ShmRequest,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    request(socket_path(info)?, req.bytes(), fd).map(|(fd, _)| fd)
}

/// Asks the daemon to end the regions of gone segments now.
pub fn reconcile() {
    let mut dir_buf = [0u8; PATH_MAX];
    if let Some(dir) = env::mount_dir(&mut dir_buf) {
        let _ = mount_info(dir).and_then(|info| send(&info, ShmRequest::reconcile(), None));
    }
}
