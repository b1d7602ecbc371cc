//! The C ABI: `mshare_*` functions over [`Region`], header `include/mshare.h`.
//!
//! This module owns the C calling conventions and nothing else: every export checks its
//! pointers, catches panics, turns `io::Error` into a negative errno in exactly one place
//! ([`neg_errno`]) and writes its outputs only on success. The work is done by
//! [`crate::region`] and kernel-glue; nothing here calls `libc` (only its constants).
//!
//! The header is generated from this file by cbindgen (`scripts/check-header.sh`): the
//! doc comments below are the C documentation.

// C names: `mshare_region`, `mshare_region_stat`.
#![allow(non_camel_case_types)]

use std::ffi::{CStr, OsStr, c_char, c_int, c_uint, c_void};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use kernel_glue::mapping::Protection;

use crate::Backing;
use crate::region::Region;
use crate::uapi;

/// Major version of the library this header belongs to (`mshare_version()` gives the
/// library's at run time). The shared library's SONAME is `libmshare.so.MAJOR`.
pub const MSHARE_VERSION_MAJOR: c_uint = 0u32;
/// Minor version: new functions, compatible.
pub const MSHARE_VERSION_MINOR: c_uint = 1u32;
/// Patch version: fixes only.
pub const MSHARE_VERSION_PATCH: c_uint = 0u32;

/// The number a decimal string of digits stands for (the version parts of Cargo's
/// environment), at compile time.
const fn parse_version_part(s: &str) -> c_uint {
    let b = s.as_bytes();
    let mut n: c_uint = 0;
    let mut i = 0;
    while i < b.len() {
        n = n * 10 + (b[i] - b'0') as c_uint;
        i += 1;
    }
    n
}

// cbindgen needs literals for the header's #defines; these keep them equal to the crate
// version (`cargo build` fails when Cargo.toml's version moves without them).
const _: () = assert!(
    MSHARE_VERSION_MAJOR == parse_version_part(env!("CARGO_PKG_VERSION_MAJOR"))
        && MSHARE_VERSION_MINOR == parse_version_part(env!("CARGO_PKG_VERSION_MINOR"))
        && MSHARE_VERSION_PATCH == parse_version_part(env!("CARGO_PKG_VERSION_PATCH")),
    "MSHARE_VERSION_* differ from the crate version in Cargo.toml"
);

/// The mount's default backing (`msharefs mount --backing`): hugetlb unless configured
/// otherwise.
pub const MSHARE_BACKING_DEFAULT: c_uint = 0u32;
/// 2 MiB hugetlb pages; attachers share their page tables (one fault per GiB to attach).
pub const MSHARE_BACKING_HUGETLB: c_uint = 1u32;
/// 2 MiB transparent huge pages: 512 times smaller page tables, not shared.
pub const MSHARE_BACKING_THP: c_uint = 2u32;
/// 4 KiB shmem pages: no page-table saving, always available.
pub const MSHARE_BACKING_SHMEM: c_uint = 3u32;

const _: () = assert!(
    MSHARE_BACKING_DEFAULT == uapi::BACKING_DEFAULT
        && MSHARE_BACKING_HUGETLB == uapi::BACKING_HUGETLB
        && MSHARE_BACKING_THP == uapi::BACKING_THP
        && MSHARE_BACKING_SHMEM == uapi::BACKING_SHMEM
);

/// `mshare_region_stat.flags`: the handle was opened read-write (`O_RDWR`).
pub const MSHARE_STAT_WRITABLE: c_uint = 1u32;
/// `mshare_region_stat.flags`: attachers of the region share page tables (hugetlb).
pub const MSHARE_STAT_SHARED_TABLES: c_uint = 2u32;

/// An open region: a file on an msharefs mount, opened by `mshare_create` or
/// `mshare_open` and released by `mshare_close`.
///
/// A handle may be used by several threads at once, except that `mshare_close` must be
/// the last call on it.
///
/// A handle survives a restart of the msharefs daemon (a crash, or `umount` and `mount`
/// with the same state directory): its attachments keep working throughout, and once the
/// mount is back `mshare_attach`, `mshare_create_mapping` and `mshare_unmap` reopen the
/// region by the path it was opened by (same access mode, same region: `-ESTALE` if the
/// path now names another one). While the daemon is down they fail with `-ENOTCONN`. After `fork`, the child may keep using an inherited handle, as
/// long as no other thread of the parent was inside an `mshare_*` call on it at the time.
pub struct mshare_region {
    region: Region,
    /// `(addr, len)` of the live attachments made through this handle, so that
    /// `mshare_detach` never unmaps memory it did not map.
    attachments: Mutex<Vec<(usize, usize)>>,
}

/// What `mshare_stat` reports about a region.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct mshare_region_stat {
    /// Region size in bytes.
    pub size: u64,
    /// Page size of the backing in bytes, the unit the size is a multiple of: 2097152 for
    /// hugetlb, 4096 for thp and shmem.
    pub page_size: u64,
    /// Alignment of every address `mshare_attach` returns, in bytes (1 GiB): the range one
    /// shared page-table page covers.
    pub granule: u64,
    /// The backing, one of `MSHARE_BACKING_HUGETLB`, `_THP` or `_SHMEM` (never `_DEFAULT`).
    pub backing: c_uint,
    /// `MSHARE_STAT_*` bits.
    pub flags: c_uint,
    /// Number of attachments made through this handle and not yet detached.
    pub attachments: u64,
    /// Zero; room for later fields without changing the struct size.
    pub reserved: [u64; 4],
}

/// The errno reported for a panic inside the library (a bug): the call did nothing the
/// caller can rely on.
const PANIC_ERRNO: c_int = libc::EIO;

/// The one place an `io::Error` becomes a C return value: a negative errno, `-EIO` when
/// the error carries none.
fn neg_errno(e: &io::Error) -> c_int {
    -kernel_glue::errno_of(e)
}

fn einval() -> io::Error {
    kernel_glue::errno(libc::EINVAL)
}

/// Runs `f` inside the panic boundary and converts its result: `0` or a negative errno.
fn boundary(f: impl FnOnce() -> io::Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => neg_errno(&e),
        Err(_) => -PANIC_ERRNO,
    }
}

/// Borrows a C path; NULL is `EINVAL`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
unsafe fn c_path<'a>(p: *const c_char) -> io::Result<&'a Path> {
    if p.is_null() {
        return Err(einval());
    }
    // SAFETY: non-NULL, and NUL-terminated and live by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

/// Borrows a handle; NULL is `EINVAL`.
///
/// # Safety
/// `r` is NULL or a live handle from `mshare_create`/`mshare_open`.
unsafe fn handle<'a>(r: *const mshare_region) -> io::Result<&'a mshare_region> {
    // SAFETY: by the caller's contract a non-NULL `r` is a live, boxed handle, and handles
    // are only ever used through shared references (interior state is in a Mutex).
    unsafe { r.as_ref() }.ok_or_else(einval)
}

/// Checks an out-pointer; NULL is `EINVAL`.
fn out_ptr<T>(p: *mut T) -> io::Result<*mut T> {
    if p.is_null() { Err(einval()) } else { Ok(p) }
}

/// Writes `value` through a checked out-pointer.
///
/// # Safety
/// `p` passed [`out_ptr`] and points to writable memory for one `T`.
unsafe fn write_out<T>(p: *mut T, value: T) {
    // SAFETY: non-NULL and writable by the caller's contract; `write` drops nothing, and
    // the C types written here have no destructors.
    unsafe { p.write(value) }
}

fn into_handle(region: Region) -> *mut mshare_region {
    Box::into_raw(Box::new(mshare_region {
        region,
        attachments: Mutex::new(Vec::new()),
    }))
}

/// Creates the region `path` on an msharefs mount with `O_EXCL` semantics, sets its size
/// (reserving its memory now: a lack of huge pages fails here, never as a SIGBUS later)
/// and opens it read-write.
///
/// - `size`: bytes, a non-zero multiple of the backing's page size (2 MiB for hugetlb,
///   4096 otherwise). Page tables are shared for every whole GiB of it.
/// - `mode`: permission bits of the new file (`0600`, ...), subject to the umask.
/// - `backing`: one of `MSHARE_BACKING_*`.
/// - `out`: on success, receives the new handle; release it with `mshare_close`.
///
/// On failure no file is left behind. On msharefs the name appears only once the region
/// is complete, so other processes never find it unsized: it is built under a hidden name
/// in the same directory (`.mshare-new.PID.N`) and renamed into place.
///
/// Returns 0 or a negative errno: `-EEXIST` when `path` exists; `-EINVAL` for a NULL
/// pointer, a zero size or one that is not a multiple of the page size, a bad mode or an
/// unknown backing; `-ENOMEM`/`-ENOSPC` when the memory cannot be reserved; `-ENODEV`
/// when `path` is not on an msharefs (or hugetlbfs) mount; `-ENOENT`, `-EACCES`, ... as
/// from `open(2)`.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_create(
    path: *const c_char,
    size: u64,
    mode: c_uint,
    backing: c_uint,
    out: *mut *mut mshare_region,
) -> c_int {
    boundary(|| {
        // SAFETY: `path` is NULL or a C string (function contract).
        let path = unsafe { c_path(path) }?;
        let out = out_ptr(out)?;
        let backing = Backing::from_raw(backing).ok_or_else(einval)?;
        let region = Region::create(path, size, mode, backing)?;
        // SAFETY: `out` is non-NULL and writable (function contract).
        unsafe { write_out(out, into_handle(region)) };
        Ok(())
    })
}

/// Opens the existing region `path`.
///
/// - `oflags`: `O_RDONLY` or `O_RDWR`, optionally with `O_CLOEXEC` (always implied).
///   A read-only handle can only be attached with `PROT_READ`.
/// - `out`: on success, receives the handle; release it with `mshare_close`.
///
/// Returns 0 or a negative errno: `-ENOENT` when `path` does not exist; `-EINVAL` for a
/// NULL pointer or other `oflags`; `-ENODEV` when the file is not a region; `-EACCES`,
/// ... as from `open(2)`.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_open(
    path: *const c_char,
    oflags: c_int,
    out: *mut *mut mshare_region,
) -> c_int {
    boundary(|| {
        // SAFETY: `path` is NULL or a C string (function contract).
        let path = unsafe { c_path(path) }?;
        let out = out_ptr(out)?;
        let region = Region::open(path, oflags & !libc::O_CLOEXEC)?;
        // SAFETY: `out` is non-NULL and writable (function contract).
        unsafe { write_out(out, into_handle(region)) };
        Ok(())
    })
}

/// Stores the region's size in bytes in `*size_out`.
///
/// Returns 0, or `-EINVAL` for a NULL pointer.
///
/// # Safety
/// `r` is NULL or a live handle; `size_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_size(r: *const mshare_region, size_out: *mut u64) -> c_int {
    boundary(|| {
        // SAFETY: `r` is NULL or a live handle (function contract).
        let h = unsafe { handle(r) }?;
        let out = out_ptr(size_out)?;
        // SAFETY: `out` is non-NULL and writable (function contract).
        unsafe { write_out(out, h.region.size()) };
        Ok(())
    })
}

/// Stores the region's backing, one of `MSHARE_BACKING_HUGETLB`, `_THP` or `_SHMEM`, in
/// `*out`.
///
/// Returns 0, or `-EINVAL` for a NULL pointer.
///
/// # Safety
/// `r` is NULL or a live handle; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_backing(r: *const mshare_region, out: *mut c_uint) -> c_int {
    boundary(|| {
        // SAFETY: `r` is NULL or a live handle (function contract).
        let h = unsafe { handle(r) }?;
        let out = out_ptr(out)?;
        // SAFETY: `out` is non-NULL and writable (function contract).
        unsafe { write_out(out, h.region.backing().raw()) };
        Ok(())
    })
}

/// Fills `*out` with the region's size, backing, page size and granule, and this
/// handle's access mode and live attachments.
///
/// Returns 0, or `-EINVAL` for a NULL pointer.
///
/// # Safety
/// `r` is NULL or a live handle; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_stat(
    r: *const mshare_region,
    out: *mut mshare_region_stat,
) -> c_int {
    boundary(|| {
        // SAFETY: `r` is NULL or a live handle (function contract).
        let h = unsafe { handle(r) }?;
        let out = out_ptr(out)?;
        let region = &h.region;
        let backing = region.backing();
        let mut flags = 0;
        if region.writable() {
            flags |= MSHARE_STAT_WRITABLE;
        }
        if backing == Backing::Hugetlb {
            flags |= MSHARE_STAT_SHARED_TABLES;
        }
        let attachments = h
            .attachments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64;
        let stat = mshare_region_stat {
            size: region.size(),
            page_size: backing.page_size(),
            granule: uapi::MSHARE_GRANULE,
            backing: backing.raw(),
            flags,
            attachments,
            reserved: [0; 4],
        };
        // SAFETY: `out` is non-NULL and writable (function contract).
        unsafe { write_out(out, stat) };
        Ok(())
    })
}

/// Maps the whole region, `MAP_SHARED`, at an address aligned to the granule (1 GiB), and
/// stores that address in `*addr_out`. Hugetlb regions share their page tables with every
/// other attacher; thp and shmem regions are mapped through the msharefs file.
///
/// - `prot`: `PROT_READ` or `PROT_READ | PROT_WRITE`.
///
/// The mapping is `size` bytes long (see `mshare_size`) and stays valid after
/// `mshare_close` until `mshare_detach` or `munmap(addr, size)`. Other processes write the
/// memory at any time: synchronise through atomics or locks placed inside it.
///
/// Returns 0 or a negative errno: `-EINVAL` for a NULL pointer or another `prot`;
/// `-EACCES` for `PROT_WRITE` on a handle opened `O_RDONLY`; `-ENOMEM` when no aligned
/// range of address space is free; `-ENOTCONN` while the msharefs daemon is down; the
/// daemon's errno when it refuses the backing.
///
/// # Safety
/// `r` is NULL or a live handle; `addr_out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_attach(
    r: *mut mshare_region,
    prot: c_int,
    addr_out: *mut *mut c_void,
) -> c_int {
    boundary(|| {
        // SAFETY: `r` is NULL or a live handle (function contract).
        let h = unsafe { handle(r) }?;
        let out = out_ptr(addr_out)?;
        let prot = Protection::from_bits(prot)?;
        // Exactly the region: the C API lets callers unmap (addr, size) themselves.
        let attachment = h
            .region
            .attach_covering(prot, crate::client::Cover::Exact)?;
        let mut list = h.attachments.lock().unwrap_or_else(PoisonError::into_inner);
        list.try_reserve(1)
            .map_err(|_| kernel_glue::errno(libc::ENOMEM))?;
        let (addr, len) = attachment.into_raw();
        list.push((addr, len));
        // SAFETY: `out` is non-NULL and writable (function contract).
        unsafe { write_out(out, addr as *mut c_void) };
        Ok(())
    })
}

/// Unmaps an attachment: `addr` is an address `mshare_attach` returned on this same
/// handle and that was not detached yet.
///
/// Returns 0 or a negative errno: `-EINVAL` for a NULL pointer or any other address
/// (nothing is unmapped then). After `mshare_close`, use `munmap(addr, size)` instead.
///
/// # Safety
/// `r` is NULL or a live handle. No pointer into the mapping may be used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_detach(r: *mut mshare_region, addr: *mut c_void) -> c_int {
    boundary(|| {
        // SAFETY: `r` is NULL or a live handle (function contract).
        let h = unsafe { handle(r) }?;
        if addr.is_null() {
            return Err(einval());
        }
        let mut list = h.attachments.lock().unwrap_or_else(PoisonError::into_inner);
        let i = list
            .iter()
            .position(|&(a, _)| a == addr as usize)
            .ok_or_else(einval)?;
        let (a, len) = list[i];
        // SAFETY: `[a, a + len)` is a mapping this handle made and still owns (it is in
        // the list); the caller stops using pointers into it (function contract).
        unsafe { kernel_glue::mapping::munmap(a, len) }?;
        list.swap_remove(i);
        Ok(())
    })
}

/// Creates an anonymous object of `size` bytes at byte `offset` of the region, with
/// protection `prot` (`PROT_READ`, `PROT_WRITE`, `PROT_EXEC` bits): the kernel mshare v3's
/// `MSHAREFS_CREATE_MAPPING` with `MAP_SHARED | MAP_FIXED | MAP_ANONYMOUS`. The object's
/// memory is populated now and seen by every attacher.
///
/// Returns 0 or a negative errno: `-EINVAL` for a NULL handle, a range that is not
/// page-aligned or not inside the region, a region whose size is unset or a bad `prot`;
/// `-EEXIST` when the range overlaps an object; `-EBADF` on a handle opened `O_RDONLY`;
/// `-ENOTCONN` while the msharefs daemon is down (after a restart the handle reopens
/// the region by its path and the call succeeds).
///
/// # Safety
/// `r` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_create_mapping(
    r: *mut mshare_region,
    offset: u64,
    size: u64,
    prot: c_int,
) -> c_int {
    boundary(|| {
        // SAFETY: `r` is NULL or a live handle (function contract).
        let h = unsafe { handle(r) }?;
        h.region.create_mapping(offset, size, prot)
    })
}

/// Removes the objects in `[offset, offset + size)` of the region, discarding their
/// contents in every attacher (the memory stays reserved and reads as zero): the kernel
/// mshare v3's `MSHAREFS_UNMAP`.
///
/// Returns 0 or a negative errno: `-EINVAL` for a NULL handle or a range that is not
/// page-aligned or not inside the region; `-EBADF` on a handle opened `O_RDONLY`;
/// `-ENOTCONN` while the msharefs daemon is down.
///
/// # Safety
/// `r` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_unmap(r: *mut mshare_region, offset: u64, size: u64) -> c_int {
    boundary(|| {
        // SAFETY: `r` is NULL or a live handle (function contract).
        let h = unsafe { handle(r) }?;
        h.region.unmap(offset, size)
    })
}

/// Closes a handle. Attachments stay mapped (release them with `munmap(addr, size)`).
/// `NULL` is a no-op; closing a handle twice is undefined behaviour.
///
/// # Safety
/// `r` is NULL or a live handle that no other thread is using; it is dangling afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_close(r: *mut mshare_region) {
    if r.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a non-NULL `r` came from `Box::into_raw` in `into_handle` and is owned by
        // the caller, who gives it up now (function contract).
        drop(unsafe { Box::from_raw(r) });
    }));
}

/// Removes the region `path`. Its memory is freed once no process has it open or
/// attached; processes that have it attached keep their data.
///
/// Returns 0 or a negative errno: `-ENOENT` when `path` does not exist; `-EINVAL` for
/// NULL; `-ENODEV` when `path` is not on an msharefs (or hugetlbfs) mount; `-EACCES`,
/// `-EISDIR`, ... as from `unlink(2)`.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mshare_unlink(path: *const c_char) -> c_int {
    boundary(|| {
        // SAFETY: `path` is NULL or a C string (function contract).
        let path = unsafe { c_path(path) }?;
        Region::unlink(path)
    })
}

/// A static, human-readable description of `err`, a negative errno as returned by the
/// `mshare_*` functions (a positive errno is accepted too). Never NULL; the string must
/// not be freed or modified.
#[unsafe(no_mangle)]
pub extern "C" fn mshare_strerror(err: c_int) -> *const c_char {
    catch_unwind(|| describe(err))
        .unwrap_or(c"internal error")
        .as_ptr()
}

/// The library version, e.g. `"0.1.0"`. Never NULL; static.
#[unsafe(no_mangle)]
pub extern "C" fn mshare_version() -> *const c_char {
    VERSION.as_ptr()
}

const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => c"unknown",
    };

fn describe(err: c_int) -> &'static CStr {
    use libc::*;
    match err.unsigned_abs() as c_int {
        0 => c"success",
        EPERM => c"EPERM: operation not permitted",
        ENOENT => c"ENOENT: no such region or directory",
        EINTR => c"EINTR: interrupted system call",
        EIO => c"EIO: input/output error (or an internal error in libmshare)",
        EBADF => c"EBADF: bad file descriptor",
        EAGAIN => c"EAGAIN: resource temporarily unavailable",
        ENOMEM => c"ENOMEM: out of memory, huge pages or aligned address space",
        EACCES => c"EACCES: permission denied (or PROT_WRITE on a read-only handle)",
        EFAULT => c"EFAULT: bad address",
        EBUSY => c"EBUSY: region busy (its size is set, or it is open while its backing changes)",
        EEXIST => c"EEXIST: region already exists",
        EXDEV => c"EXDEV: cross-device link",
        ENODEV => c"ENODEV: not a region on an msharefs mount",
        ENOTDIR => c"ENOTDIR: not a directory",
        EISDIR => c"EISDIR: is a directory",
        EINVAL => c"EINVAL: invalid argument (NULL pointer, size, flags or protection)",
        ENFILE => c"ENFILE: too many open files in system",
        EMFILE => c"EMFILE: too many open files",
        ENOTTY => c"ENOTTY: inappropriate ioctl for device",
        EFBIG => c"EFBIG: region too large",
        ENOSPC => c"ENOSPC: no space left (huge page pool or backing store exhausted)",
        EROFS => c"EROFS: read-only file system",
        ERANGE => c"ERANGE: result out of range",
        ENAMETOOLONG => c"ENAMETOOLONG: file name too long",
        ENOSYS => c"ENOSYS: function not implemented",
        ENOTEMPTY => c"ENOTEMPTY: directory not empty",
        ELOOP => c"ELOOP: too many levels of symbolic links",
        ENODATA => c"ENODATA: no data available",
        EOVERFLOW => c"EOVERFLOW: value too large for defined data type",
        EOPNOTSUPP => c"EOPNOTSUPP: operation not supported",
        ECONNREFUSED => c"ECONNREFUSED: the msharefs daemon is not running",
        ENOTCONN => c"ENOTCONN: the msharefs mount is disconnected from its daemon",
        ETIMEDOUT => c"ETIMEDOUT: connection timed out",
        EDQUOT => c"EDQUOT: the region owner's quota (msharefs mount --user-quota) is exceeded",
        ESTALE => c"ESTALE: the region's path now names another region",
        ECONNABORTED => c"ECONNABORTED: the msharefs daemon went away during the call",
        _ => c"unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    #[test]
    fn null_pointers_are_einval_and_outputs_untouched() {
        let mut out: *mut mshare_region = ptr::dangling_mut();
        let sentinel = out;
        // SAFETY: NULL path and a valid out-pointer.
        let rc = unsafe { mshare_create(ptr::null(), 1 << 21, 0o600, 0, &mut out) };
        assert_eq!(rc, -libc::EINVAL);
        // SAFETY: valid path, NULL out-pointer.
        let rc = unsafe { mshare_open(c"/nonexistent".as_ptr(), libc::O_RDWR, ptr::null_mut()) };
        assert_eq!(rc, -libc::EINVAL);
        // SAFETY: NULL path.
        let rc = unsafe { mshare_open(ptr::null(), libc::O_RDWR, &mut out) };
        assert_eq!(rc, -libc::EINVAL);
        assert_eq!(out, sentinel);
        let mut size = 7u64;
        let mut b = 7u32;
        let mut st = mshare_region_stat::default();
        let mut addr: *mut c_void = ptr::null_mut();
        // SAFETY: NULL handles throughout.
        unsafe {
            assert_eq!(mshare_size(ptr::null(), &mut size), -libc::EINVAL);
            assert_eq!(mshare_backing(ptr::null(), &mut b), -libc::EINVAL);
            assert_eq!(mshare_stat(ptr::null(), &mut st), -libc::EINVAL);
            assert_eq!(
                mshare_attach(ptr::null_mut(), libc::PROT_READ, &mut addr),
                -libc::EINVAL
            );
            assert_eq!(
                mshare_detach(ptr::null_mut(), ptr::null_mut()),
                -libc::EINVAL
            );
            assert_eq!(mshare_unlink(ptr::null()), -libc::EINVAL);
            assert_eq!(
                mshare_create_mapping(ptr::null_mut(), 0, 4096, libc::PROT_READ),
                -libc::EINVAL
            );
            assert_eq!(mshare_unmap(ptr::null_mut(), 0, 4096), -libc::EINVAL);
            mshare_close(ptr::null_mut());
        }
        assert_eq!((size, b), (7, 7));
        assert!(addr.is_null());
    }

    #[test]
    fn open_of_a_missing_path_is_enoent() {
        let mut out: *mut mshare_region = ptr::null_mut();
        // SAFETY: valid C string and out-pointer.
        let rc = unsafe { mshare_open(c"/nonexistent/region".as_ptr(), libc::O_RDONLY, &mut out) };
        assert_eq!(rc, -libc::ENOENT);
        assert!(out.is_null());
        // SAFETY: as above; a bad access mode is refused before any system call.
        let rc = unsafe { mshare_open(c"/nonexistent".as_ptr(), libc::O_WRONLY, &mut out) };
        assert_eq!(rc, -libc::EINVAL);
    }

    #[test]
    fn strerror_is_never_null() {
        for e in [
            0,
            -libc::EINVAL,
            libc::EEXIST,
            -9999,
            c_int::MIN,
            c_int::MAX,
        ] {
            let p = mshare_strerror(e);
            assert!(!p.is_null());
            // SAFETY: mshare_strerror returns static C strings.
            assert!(!unsafe { CStr::from_ptr(p) }.to_bytes().is_empty());
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(mshare_strerror(-libc::EEXIST)) };
        assert!(s.to_str().unwrap().starts_with("EEXIST"));
        // SAFETY: static C string.
        let v = unsafe { CStr::from_ptr(mshare_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn panics_become_eio() {
        assert_eq!(boundary(|| panic!("test panic")), -libc::EIO);
        assert_eq!(boundary(|| Err(io::Error::other("no errno"))), -libc::EIO);
        assert_eq!(
            boundary(|| Err(kernel_glue::errno(libc::ENOSPC))),
            -libc::ENOSPC
        );
    }
}
