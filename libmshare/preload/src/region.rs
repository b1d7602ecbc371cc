//! `mmap` of a region file: what `mshare_attach` gives, for a program that has only a
//! descriptor.
//!
//! - **regions of the mshare API**: `mmap(NULL, size, PROT_READ[|PROT_WRITE], MAP_SHARED,
//!   fd, 0)` of the whole region gets a 1 GiB-aligned mapping: of the backing the daemon
//!   hands out for hugetlb regions (page tables shared with every other attacher), of the
//!   file itself (FUSE passthrough) for thp and shmem ones. Other forms reach the kernel
//!   unchanged (for a hugetlb region: `ENODEV`, as without the shim).
//! - **POSIX shared-memory segments** (hugetlb regions of kind `KIND_POSIX_SHM`): every
//!   form the kernel allows for a segment: a shared mapping of the backing at an address
//!   congruent to the file offset modulo 1 GiB, any length and any huge-page-aligned
//!   offset inside the region, `MAP_FIXED`, the caller's other flags; a length that is not
//!   a huge-page multiple is recorded in [`crate::placed`] for `munmap`.
//!
//! `MAP_PRIVATE` of a region made through the mshare API is `EINVAL`, as the kernel's
//! mshare refuses it (one line on standard error says so, once); POSIX segments may be
//! mapped privately, as the kernel allows.
//!
//! Candidates cost one `fstatfs`; FUSE files one more `ioctl`.

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::AtomicBool;

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::shim_sys::{self, MAP_FAILED};
use kernel_glue::{consts, fd as kfd};
use mshare::client::{self, Cover};
use mshare::uapi::{self, MshareRegionInfo};

use crate::log::log_once;
use crate::placed;

const GIB: usize = 1 << 30;
const HUGE_PAGE: usize = kernel_glue::HUGE_PAGE_SIZE as usize;

/// Flags a thp/shmem whole-region attach may carry besides its map type.
const HONOURED_FLAGS: i32 = shim_sys::MAP_POPULATE | shim_sys::MAP_NORESERVE;

/// Said once per process.
static PRIVATE_REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether `mmap` arguments might name a region file (before looking at the file).
pub fn candidate(flags: i32, fd: i32) -> bool {
    let map_type = flags & shim_sys::MAP_TYPE;
    fd >= 0
        && flags & shim_sys::MAP_ANONYMOUS == 0
        && (map_type == shim_sys::MAP_SHARED
            || map_type == shim_sys::MAP_SHARED_VALIDATE
            || map_type == shim_sys::MAP_PRIVATE)
}

/// The slow path: `Ok(None)` when `fd` is not a region (the kernel maps it), else the
/// address of the mapping or the errno `mmap` fails with.
pub fn map(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: BorrowedFd<'_>,
    offset: i64,
) -> Result<Option<usize>, i32> {
    let info = match client::region_info(fd) {
        Some(info) => info,
        // A descriptor opened before the daemon was restarted: open the region again by
        // its path, in place of the program's descriptor, and go on (as Region does).
        None if dead_connection(fd) => {
            client::reopen_in_place(fd).map_err(|e| kernel_glue::errno_of(&e))?;
            match client::region_info(fd) {
                Some(info) => info,
                None => return Ok(None),
            }
        }
        None => return Ok(None),
    };
    let private = flags & shim_sys::MAP_TYPE == shim_sys::MAP_PRIVATE;
    if private && info.kind == uapi::KIND_REGION {
        log_once(
            &PRIVATE_REFUSED,
            format_args!(
                "mmap(MAP_PRIVATE) of an msharefs region is refused with EINVAL, as the \
                 kernel's mshare refuses it"
            ),
        );
        return Err(EINVAL);
    }
    if info.backing == uapi::BACKING_HUGETLB && info.kind != uapi::KIND_REGION {
        // A shared-memory segment: every form of mmap the kernel allows.
        map_backing(addr, len, prot, flags, fd, offset, &info).map(Some)
    } else {
        // A region of the mshare API: attached whole, as the kernel's mshare attaches.
        attach_whole(addr, len, prot, flags, fd, offset, &info)
    }
}

/// Whether `fd` is a file of a FUSE connection whose daemon is gone.
fn dead_connection(fd: BorrowedFd<'_>) -> bool {
    match kernel_glue::fd::fstatfs(fd) {
        // statfs of a dead FUSE connection fails so.
        Err(e) => client::is_dead_connection(&e),
        Ok(s) => {
            s.fs_type == kernel_glue::FUSE_SUPER_MAGIC
                && client::info(fd).is_err_and(|e| client::is_dead_connection(&e))
        }
    }
}

/// thp and shmem regions: the plain whole-region attach, aligned; anything else is the
/// kernel's (FUSE passthrough maps the file itself).
fn attach_whole(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: BorrowedFd<'_>,
    offset: i64,
    info: &MshareRegionInfo,
) -> Result<Option<usize>, i32> {
    let map_type = flags & shim_sys::MAP_TYPE;
    let plain = addr == 0
        && offset == 0
        && map_type != shim_sys::MAP_PRIVATE
        && flags & !(shim_sys::MAP_TYPE | HONOURED_FLAGS) == 0
        && info.size == len as u64;
    let Ok(prot) = Protection::from_bits(prot) else {
        return Ok(None);
    };
    if !plain {
        return Ok(None);
    }
    let mapping =
        client::attach(fd, info, prot, Cover::Granules).map_err(|e| kernel_glue::errno_of(&e))?;
    if flags & shim_sys::MAP_POPULATE != 0 {
        // mmap(2) ignores MAP_POPULATE failures too: the pages fault in later instead.
        let _ = mapping.populate(0, info.size);
    }
    let (addr, mapped) = mapping.into_raw();
    if mapped > len && !placed::register(addr, len, addr + mapped) {
        crate::log::log(format_args!(
            "more than {} regions placed; munmap of {addr:#x} must cover {mapped} bytes",
            placed::SLOTS
        ));
    }
    Ok(Some(addr))
}

/// hugetlb regions: the backing, mapped as the caller asked, where sharing works.
fn map_backing(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: BorrowedFd<'_>,
    offset: i64,
    info: &MshareRegionInfo,
) -> Result<usize, i32> {
    let shared = flags & shim_sys::MAP_TYPE != shim_sys::MAP_PRIVATE;
    // hugetlbfs maps whole huge pages from huge-page-aligned offsets.
    let offset = usize::try_from(offset).map_err(|_| EINVAL)?;
    if len == 0 || offset % HUGE_PAGE != 0 {
        return Err(EINVAL);
    }
    let mapped = len.checked_next_multiple_of(HUGE_PAGE).ok_or(ENOMEM)?;
    // Past the end the kernel would grow the backing: the region's size is fixed.
    let end = offset.checked_add(mapped).ok_or(EINVAL)?;
    if end as u64 > info.size {
        return Err(EINVAL);
    }
    // Access as mmap(2) checks it: readable descriptor; writable for shared writes.
    let acc = kfd::fcntl_getfl(fd).map_err(|e| kernel_glue::errno_of(&e))? & consts::O_ACCMODE;
    let write = shared && prot & shim_sys::PROT_WRITE != 0;
    if acc == consts::O_WRONLY || (write && acc != consts::O_RDWR) {
        return Err(EACCES);
    }
    let access = if write {
        Protection::ReadWrite
    } else {
        Protection::ReadOnly
    };
    let socket = client::socket_path(info).map_err(|e| kernel_glue::errno_of(&e))?;
    let (backing, _) =
        client::request_backing(socket, fd, access).map_err(|e| kernel_glue::errno_of(&e))?;
    let fixed = flags & (shim_sys::MAP_FIXED | shim_sys::MAP_FIXED_NOREPLACE) != 0;
    if !shared {
        return map_private_copy(addr, len, prot, flags, backing.as_fd(), offset);
    }
    let plain = flags & !(shim_sys::MAP_TYPE | HONOURED_FLAGS) == 0;
    if let (false, true, 0, Ok(p)) = (fixed, plain, offset % GIB, Protection::from_bits(prot)) {
        // The usual case (Python's and PostgreSQL's mmap of a whole segment): every GiB
        // covered whole, so all of its page tables are shared.
        let m = if uapi::covers_last_granule(info.size) {
            Mapping::map_granules(backing.as_fd(), offset as u64, mapped as u64, p, GIB as u64)
        } else {
            Mapping::map_range_aligned(backing.as_fd(), offset as u64, mapped as u64, p, GIB as u64)
        }
        .map_err(|e| kernel_glue::errno_of(&e))?;
        // On a mount that guards MSHAREFS_UNMAP, for as long as the mapping lasts.
        std::mem::forget(client::guard(&m, info).map_err(|e| kernel_glue::errno_of(&e))?);
        if flags & shim_sys::MAP_POPULATE != 0 {
            // mmap(2) ignores MAP_POPULATE failures too: the pages fault in later instead.
            let _ = m.populate(0, mapped as u64);
        }
        let (got, total) = m.into_raw();
        if total > len && !placed::register(got, len, got + total) {
            crate::log::log(format_args!(
                "more than {} regions mapped; munmap of {got:#x} must cover {total} bytes",
                placed::SLOTS
            ));
        }
        return Ok(got);
    }
    let at = if fixed {
        addr
    } else {
        // Congruent to the offset modulo 1 GiB: the kernel's condition for sharing.
        shim_sys::reserve_aligned(mapped, GIB, offset % GIB)
            .map_err(|e| kernel_glue::errno_of(&e))?
    };
    let got = match map_shared(at, len, prot, flags, fixed, backing.as_fd(), offset) {
        Ok(got) => got,
        Err(e) => {
            if !fixed {
                // SAFETY: our own reservation, referenced by nothing.
                unsafe { shim_sys::raw_munmap(at as *mut c_void, mapped) };
            }
            return Err(e);
        }
    };
    if len % HUGE_PAGE != 0 && !placed::register(got, len, got + mapped) {
        crate::log::log(format_args!(
            "more than {} regions mapped with unrounded lengths; munmap of {got:#x} must \
             use a length rounded up to 2 MiB",
            placed::SLOTS
        ));
    }
    Ok(got)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(EIO)
}

/// The backing itself, shared, at `at` (our reservation, or the caller's fixed address).
fn map_shared(
    at: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fixed: bool,
    backing: BorrowedFd<'_>,
    offset: usize,
) -> Result<usize, i32> {
    let extra = if fixed { 0 } else { shim_sys::MAP_FIXED };
    // SAFETY: with MAP_FIXED[_NOREPLACE] from the caller, the caller's mmap(2) contract;
    // otherwise `at` is our own reservation, which MAP_FIXED replaces.
    let got = unsafe {
        shim_sys::raw_mmap(
            at as *mut c_void,
            len,
            prot,
            flags | extra,
            backing.as_raw_fd(),
            offset as i64,
        )
    };
    if got == MAP_FAILED {
        return Err(last_errno());
    }
    Ok(got as usize)
}

/// `MAP_PRIVATE` of a POSIX segment: a private copy of the range, made now, in ordinary
/// anonymous memory. A private mapping of the hugetlb backing would need free huge pages
/// for its copies, which the pool (grown only for what regions reserve) does not have;
/// POSIX leaves unspecified whether later changes by others show through a private
/// mapping, so a copy taken at `mmap` time is what the kernel may also give.
fn map_private_copy(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    backing: BorrowedFd<'_>,
    offset: usize,
) -> Result<usize, i32> {
    let keep =
        flags & (shim_sys::MAP_FIXED | shim_sys::MAP_FIXED_NOREPLACE | shim_sys::MAP_POPULATE);
    // SAFETY: the caller's address and fixed flags under its mmap(2) contract; otherwise
    // a new anonymous mapping at a kernel-chosen address.
    let got = unsafe {
        shim_sys::raw_mmap(
            addr as *mut c_void,
            len,
            shim_sys::PROT_READ_WRITE,
            shim_sys::MAP_PRIVATE | shim_sys::MAP_ANONYMOUS | keep,
            -1,
            0,
        )
    };
    if got == MAP_FAILED {
        return Err(last_errno());
    }
    let got = got as usize;
    // SAFETY: the anonymous mapping just made, ours and referenced by nothing yet.
    let copied = unsafe { shim_sys::pread_into(backing, got, len, offset as i64) };
    // SAFETY: as above.
    let protected = unsafe { shim_sys::raw_mprotect(got as *mut c_void, len, prot) };
    if let Err(e) = copied {
        // SAFETY: as above.
        unsafe { shim_sys::raw_munmap(got as *mut c_void, len) };
        return Err(kernel_glue::errno_of(&e));
    }
    if protected != 0 {
        let e = last_errno();
        // SAFETY: as above.
        unsafe { shim_sys::raw_munmap(got as *mut c_void, len) };
        return Err(e);
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernel_glue::consts::{MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED};

    #[test]
    fn only_file_mappings_are_candidates() {
        assert!(candidate(MAP_SHARED, 3));
        assert!(candidate(MAP_PRIVATE, 3));
        assert!(candidate(shim_sys::MAP_SHARED_VALIDATE, 3));
        assert!(candidate(MAP_SHARED | shim_sys::MAP_FIXED, 3));
        assert!(!candidate(MAP_SHARED | MAP_ANONYMOUS, -1));
        assert!(!candidate(MAP_SHARED, -1));
    }
}
