//! System V shared memory (`shmget`, `shmat`, `shmdt`) on msharefs.
//!
//! With `MSHARE_MOUNT` and `MSHARE_SHM_MIN` set:
//!
//! - `shmget` that creates a segment of at least `MSHARE_SHM_MIN` bytes (`SHM_HUGETLB` or
//!   not) creates the kernel segment as asked, but with `SHM_NORESERVE` and without
//!   `SHM_HUGETLB` (its memory is never touched, so it costs nothing), and has the daemon
//!   make a hugetlb region hold its data. The id, key, permissions, `IPC_STAT`,
//!   `shm_nattch`, `IPC_RMID`, `ipcs` and `ipcrm` stay the kernel's. When the region cannot
//!   be had, the segment stays an ordinary one (one line on standard error says why).
//! - `shmat` attaches the kernel segment (so the kernel checks permissions and counts the
//!   attachment, across `fork`, `exec`, exit and `kill -9`), keeps one page of that
//!   attachment (the "stub"), and returns the region's backing mapped at a 1 GiB-aligned
//!   address, or at the caller's address (`SHM_RND`, `SHM_REMAP` as the kernel reads them).
//!   Segments that are not on msharefs get the kernel's own attachment.
//! - `shmdt` of such an address unmaps the region and detaches the stub.
//!
//! `shmctl` is not replaced: everything it does is the kernel's.

use std::ffi::{c_int, c_void};
use std::os::fd::AsFd;
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicUsize, Ordering};

use kernel_glue::errnos::*;
use kernel_glue::ipc::{self, SHM_EXEC, SHM_RDONLY, SHM_REMAP, SHM_RND, SHMLBA};
use kernel_glue::mapping::Protection;
use kernel_glue::shim_sys;
use mshare::client::{self, Cover, mount_info};
use mshare::uapi::ShmRequest;

use crate::env::{self, PATH_MAX};
use crate::log::{Bytes, errno_name, log};

const HUGE_PAGE: usize = kernel_glue::HUGE_PAGE_SIZE as usize;
const PAGE: usize = kernel_glue::PAGE_SIZE as usize;
/// `(void *)-1`, `shmat`'s failure.
const SHMAT_FAILED: *mut c_void = usize::MAX as *mut c_void;

// ---- shmget ---------------------------------------------------------------------------

/// `shmget(2)`, interposed: see the module documentation.
///
/// # Safety
/// None beyond `shmget(2)`'s (it takes no pointers).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmget(key: c_int, size: usize, flags: c_int) -> c_int {
    match env::shm_min() {
        Some(min) if size >= min && flags & ipc::IPC_CREAT != 0 && ours_page_size(flags) => {}
        _ => return ipc::raw_shmget(key, size, flags),
    }
    let placed = flags & !(ipc::SHM_HUGETLB | (ipc::SHM_HUGE_MASK << ipc::SHM_HUGE_SHIFT))
        | ipc::SHM_NORESERVE;
    // Create exclusively first, so we know whether this call creates the segment; an
    // existing one is then looked up as the kernel would find it.
    for _ in 0..16 {
        let id = ipc::raw_shmget(key, size, placed | ipc::IPC_EXCL);
        if id >= 0 {
            return catch_unwind(|| created(key, size, flags, id)).unwrap_or(id);
        }
        let exclusive = flags & ipc::IPC_EXCL != 0 || key == ipc::IPC_PRIVATE;
        if last_errno() != EEXIST || exclusive {
            return -1;
        }
        let id = ipc::raw_shmget(key, size, flags & !ipc::IPC_CREAT);
        if id >= 0 || last_errno() != ENOENT {
            return id;
        }
        // Removed between the two calls: try to create it again.
    }
    ipc::raw_shmget(key, size, flags)
}

/// Whether the page size `flags` asks for is one msharefs gives (the default, or
/// `SHM_HUGETLB` with the default or 2 MiB pages).
fn ours_page_size(flags: c_int) -> bool {
    let log2 = (flags >> ipc::SHM_HUGE_SHIFT) & ipc::SHM_HUGE_MASK;
    log2 == 0 || (flags & ipc::SHM_HUGETLB != 0 && log2 == 21)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// This process just created segment `id`: has the daemon make its region. On failure
/// the segment stays ordinary; one that asked for huge pages is made again as asked.
fn created(key: c_int, size: usize, flags: c_int, id: c_int) -> c_int {
    let mut dir_buf = [0u8; PATH_MAX];
    let Some(dir) = env::mount_dir(&mut dir_buf) else {
        return id;
    };
    let made = mount_info(dir).and_then(|info| {
        crate::posix::send(&info, ShmRequest::sysv_created(id, size as u64), None)
    });
    let Err(e) = made else {
        return id;
    };
    let errno = kernel_glue::errno_of(&e);
    log(format_args!(
        "a {size}-byte System V segment stays ordinary shared memory: msharefs at {:?} \
         refused it: errno {errno} ({})",
        Bytes(dir.to_bytes()),
        errno_name(errno)
    ));
    if flags & ipc::SHM_HUGETLB == 0 {
        return id;
    }
    // Nobody can have attached it yet: remove it and let the kernel make what was asked.
    let _ = ipc::shm_remove(id);
    ipc::raw_shmget(key, size, flags)
}

// ---- the attachments the shim made ----------------------------------------------------

/// How many placed attachments one process can hold.
const SLOTS: usize = 64;

/// Address of each placed attachment (0: free slot).
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Its length.
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// The address of its stub (the one page kept of the kernel's attachment).
static STUBS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Filled slots: 0 keeps `shmdt` on the fast path.
static LIVE: AtomicUsize = AtomicUsize::new(0);

fn register(addr: usize, len: usize, stub: usize) -> bool {
    for i in 0..SLOTS {
        if STARTS[i]
            .compare_exchange(0, addr, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            LENS[i].store(len, Ordering::Release);
            STUBS[i].store(stub, Ordering::Release);
            LIVE.fetch_add(1, Ordering::Release);
            return true;
        }
    }
    false
}

/// Whether the table holds any attachment (the check on `munmap`'s fast path).
pub fn any() -> bool {
    LIVE.load(Ordering::Acquire) != 0
}

/// The range `[addr, addr + len)` was unmapped or mapped over: attachments wholly inside
/// it are gone, as the kernel detaches a segment whose mapping goes, so their stubs are
/// detached too (else `shm_nattch` would keep counting them).
pub fn unmapped(addr: usize, len: usize) {
    let end = addr.saturating_add(len);
    for i in 0..SLOTS {
        let start = STARTS[i].load(Ordering::Acquire);
        if start == 0 || start < addr || start.saturating_add(LENS[i].load(Ordering::Acquire)) > end
        {
            continue;
        }
        let stub = STUBS[i].load(Ordering::Acquire);
        if STARTS[i]
            .compare_exchange(start, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            LIVE.fetch_sub(1, Ordering::Release);
            // SAFETY: the stub the shim attached for this attachment, which is gone.
            unsafe { ipc::raw_shmdt(stub as *const c_void) };
        }
    }
}

/// Removes the attachment at `addr` from the table: its length and stub.
fn take(addr: usize) -> Option<(usize, usize)> {
    if addr == 0 || LIVE.load(Ordering::Acquire) == 0 {
        return None;
    }
    for i in 0..SLOTS {
        if STARTS[i].load(Ordering::Acquire) != addr {
            continue;
        }
        let (len, stub) = (
            LENS[i].load(Ordering::Acquire),
            STUBS[i].load(Ordering::Acquire),
        );
        // Only one thread detaches it.
        if STARTS[i]
            .compare_exchange(addr, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            LIVE.fetch_sub(1, Ordering::Release);
            return Some((len, stub));
        }
    }
    None
}

// ---- shmat, shmdt ---------------------------------------------------------------------

/// The address `shmat` would attach at, or the errno it would fail with before looking
/// at the segment (the checks of the kernel's `do_shmat`): `Ok(None)` for a kernel-chosen
/// address.
fn wanted_address(addr: usize, flags: c_int) -> Result<Option<usize>, i32> {
    if addr == 0 {
        if flags & SHM_REMAP != 0 {
            return Err(EINVAL);
        }
        return Ok(None);
    }
    if addr % SHMLBA == 0 {
        return Ok(Some(addr));
    }
    if flags & SHM_RND != 0 && addr >= SHMLBA {
        return Ok(Some(addr & !(SHMLBA - 1)));
    }
    Err(EINVAL)
}

/// `shmat(2)`, interposed: see the module documentation.
///
/// # Safety
/// The contract of `shmat(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmat(id: c_int, addr: *const c_void, flags: c_int) -> *mut c_void {
    if env::shm_min().is_none() || id < 0 || flags & SHM_EXEC != 0 {
        // SAFETY: the caller's arguments, under shmat(2)'s contract.
        return unsafe { ipc::raw_shmat(id, addr, flags) };
    }
    let target = match wanted_address(addr as usize, flags) {
        Ok(t) => t,
        Err(e) => {
            shim_sys::set_errno(e);
            return SHMAT_FAILED;
        }
    };
    // The kernel's own attachment: its permission check, and what shm_nattch counts.
    // SAFETY: a new attachment at a kernel-chosen address replaces nothing.
    let stub = unsafe { ipc::raw_shmat(id, std::ptr::null(), flags & SHM_RDONLY) };
    if stub == SHMAT_FAILED {
        return SHMAT_FAILED;
    }
    match catch_unwind(|| place(id, stub as usize, target, flags)).unwrap_or(Err(EIO)) {
        Ok(Some(placed)) => placed as *mut c_void,
        Ok(None) if target.is_none() && flags & !SHM_RDONLY == 0 => stub,
        Ok(None) => {
            // Not ours, but asked at an address: the kernel's attachment, as asked.
            // SAFETY: the stub is our own attachment, referenced by nothing.
            unsafe { ipc::raw_shmdt(stub) };
            // SAFETY: the caller's arguments, under shmat(2)'s contract.
            unsafe { ipc::raw_shmat(id, addr, flags) }
        }
        Err(e) => {
            // SAFETY: as above.
            unsafe { ipc::raw_shmdt(stub) };
            shim_sys::set_errno(e);
            SHMAT_FAILED
        }
    }
}

/// Maps the region of segment `id`, if it has one, where `shmat` should attach it, and
/// trims the stub to one page. `Ok(None)`: the segment is not on msharefs.
fn place(
    id: c_int,
    stub: usize,
    target: Option<usize>,
    flags: c_int,
) -> Result<Option<usize>, i32> {
    let write = flags & SHM_RDONLY == 0;
    let mut dir_buf = [0u8; PATH_MAX];
    let Some(dir) = env::mount_dir(&mut dir_buf) else {
        return Ok(None);
    };
    let reply = mount_info(dir).and_then(|info| {
        client::request(
            client::socket_path(&info)?,
            ShmRequest::sysv_attach(id, write).bytes(),
            None,
        )
    });
    let (backing, info) = match reply {
        Ok((Some(fd), info)) => (fd, info),
        Ok((None, _)) => return Err(EIO),
        Err(e) if e.raw_os_error() == Some(ENOENT) => return Ok(None),
        Err(e) => {
            let errno = kernel_glue::errno_of(&e);
            // A segment of the size the shim places may have its data on msharefs: rather
            // than hand out the kernel segment's (empty) memory, fail.
            let ours =
                ipc::shm_stat(id).is_ok_and(|s| env::shm_min().is_some_and(|min| s.segsz >= min));
            log(format_args!(
                "shmat: msharefs at {:?} cannot be reached: errno {errno} ({}); segment \
                 {id} {}",
                Bytes(dir.to_bytes()),
                errno_name(errno),
                if ours {
                    "is not attached"
                } else {
                    "is attached as an ordinary one"
                }
            ));
            return if ours { Err(errno) } else { Ok(None) };
        }
    };
    let stub_len = ipc::shm_stat(id)
        .map_err(|e| kernel_glue::errno_of(&e))?
        .segsz
        .next_multiple_of(PAGE);
    let prot = if write {
        Protection::ReadWrite
    } else {
        Protection::ReadOnly
    };
    let (at, size) = match target {
        None => {
            // Every GiB covered whole: all of its page tables shared.
            let m = client::map_backing(backing.as_fd(), info.size, prot, Cover::Granules)
                .map_err(|e| kernel_glue::errno_of(&e))?;
            // On a mount that guards MSHAREFS_UNMAP, for as long as the mapping lasts.
            std::mem::forget(client::guard(&m, &info).map_err(|e| kernel_glue::errno_of(&e))?);
            m.into_raw()
        }
        // hugetlb memory maps at huge-page boundaries only (the kernel's EINVAL).
        Some(a) if a % HUGE_PAGE != 0 => return Err(EINVAL),
        Some(a) => {
            let fixed = if flags & SHM_REMAP != 0 {
                shim_sys::MAP_FIXED
            } else {
                shim_sys::MAP_FIXED_NOREPLACE
            };
            let size = info.size as usize;
            // SAFETY: the caller's address with the caller's SHM_REMAP consent (MAP_FIXED)
            // or without replacing anything (MAP_FIXED_NOREPLACE).
            let got = unsafe {
                use std::os::fd::AsRawFd;
                shim_sys::raw_mmap(
                    a as *mut c_void,
                    size,
                    prot.bits(),
                    shim_sys::MAP_SHARED | fixed,
                    backing.as_fd().as_raw_fd(),
                    0,
                )
            };
            if got == shim_sys::MAP_FAILED {
                let e = last_errno();
                // shmat reports an occupied address as EINVAL.
                return Err(if e == EEXIST { EINVAL } else { e });
            }
            (a, size)
        }
    };
    if stub_len > PAGE {
        // SAFETY: the tail of our own stub attachment, referenced by nothing.
        unsafe { shim_sys::raw_munmap((stub + PAGE) as *mut c_void, stub_len - PAGE) };
    }
    if target.is_some() {
        // SHM_REMAP may have replaced earlier attachments there.
        unmapped(at, size);
    }
    if !register(at, size, stub) {
        log(format_args!(
            "more than {SLOTS} System V attachments; shmdt({at:#x}) will not detach segment \
             {id}'s region"
        ));
    }
    Ok(Some(at))
}

/// `shmdt(2)`, interposed: an attachment the shim placed loses its region mapping and its
/// stub; anything else is the kernel's.
///
/// # Safety
/// The contract of `shmdt(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmdt(addr: *const c_void) -> c_int {
    let Some((len, stub)) = take(addr as usize) else {
        // SAFETY: the caller's argument, under shmdt(2)'s contract.
        return unsafe { ipc::raw_shmdt(addr) };
    };
    // SAFETY: the region mapping and stub the shim made for this attachment, which the
    // caller is detaching.
    unsafe {
        shim_sys::raw_munmap(addr as *mut c_void, len);
        ipc::raw_shmdt(stub as *const c_void);
    }
    // The last detach of a removed segment ends its region: free the memory now.
    let _ = catch_unwind(crate::posix::reconcile);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_as_the_kernel_does() {
        assert_eq!(wanted_address(0, 0), Ok(None));
        assert_eq!(wanted_address(0, SHM_REMAP), Err(EINVAL));
        assert_eq!(wanted_address(0x6000_0000, 0), Ok(Some(0x6000_0000)));
        assert_eq!(wanted_address(0x6000_0123, 0), Err(EINVAL));
        assert_eq!(wanted_address(0x6000_0123, SHM_RND), Ok(Some(0x6000_0000)));
        assert_eq!(wanted_address(0x123, SHM_RND), Err(EINVAL));
    }

    #[test]
    fn page_sizes() {
        assert!(ours_page_size(0o600));
        assert!(ours_page_size(ipc::SHM_HUGETLB));
        assert!(ours_page_size(
            ipc::SHM_HUGETLB | (21 << ipc::SHM_HUGE_SHIFT)
        ));
        assert!(!ours_page_size(
            ipc::SHM_HUGETLB | (30 << ipc::SHM_HUGE_SHIFT)
        ));
    }

    #[test]
    fn the_table_hands_each_attachment_back_once() {
        assert_eq!(take(0x1000), None);
        assert!(register(7 << 30, 2 << 20, 0x5000));
        assert_eq!(take(7 << 30), Some((2 << 20, 0x5000)));
        assert_eq!(take(7 << 30), None);
    }
}
