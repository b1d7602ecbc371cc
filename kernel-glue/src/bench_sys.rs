//! What `msharefs bench` needs from the kernel and nothing else uses: the baselines msharefs
//! is measured against, and the loops that run over mapped memory.
//!
//! - [`mmap_shared`]: a `MAP_SHARED` file mapping at an address the kernel chooses, the way
//!   a database maps its shared memory today (for hugetlb: 2 MiB-aligned, almost never
//!   1 GiB-aligned, so no PMD sharing);
//! - [`mmap_anonymous_hugetlb`]: the bandwidth reference, private anonymous 2 MiB pages;
//! - [`touch`] and [`sweep`]: volatile loops over a [`Mapping`] (one write per page; a
//!   read and a write of every word);
//! - [`vm_stat_refresh`]: folds the per-CPU memory counters into `/proc/meminfo`;
//! - [`loadavg`]: `/proc/loadavg`, to record how busy the machine was.
//!
//! Nothing here changes mappings it does not own; the loops access memory other processes
//! may write only through volatile loads and stores, like [`crate::mapping`].

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr;

use crate::mapping::{Mapping, Protection};

fn len_usize(len: u64) -> io::Result<usize> {
    if len == 0 {
        return Err(crate::errno(libc::EINVAL));
    }
    usize::try_from(len).map_err(|_| crate::errno(libc::EINVAL))
}

/// Safe wrapper for `mmap(2)` of `len` bytes of `fd` from offset 0, `MAP_SHARED`, at an
/// address the kernel chooses (`addr = NULL`). Unmapped when the returned [`Mapping`]
/// drops.
///
/// # Errors
/// `EINVAL` for a zero length; otherwise the kernel's errno (`EACCES` for `ReadWrite` on a
/// read-only fd, `ENOMEM` when hugetlb pages cannot be reserved, `ENODEV`, ...).
pub fn mmap_shared(fd: impl AsFd, len: u64, prot: Protection) -> io::Result<Mapping> {
    let n = len_usize(len)?;
    // SAFETY: a new mapping at a kernel-chosen address replaces nothing we own.
    let addr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            n,
            prot.bits(),
            libc::MAP_SHARED,
            fd.as_fd().as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this mapping of exactly `n` bytes; nobody else owns
    // it or holds a reference into it.
    Ok(unsafe { Mapping::from_raw(addr as usize, n, prot) })
}

/// Safe wrapper for `mmap(2)` with `MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB`, read-write,
/// at a kernel-chosen address: `len` bytes of private 2 MiB pages from the hugetlb pool.
///
/// # Errors
/// `EINVAL` for a zero length or one that is not a multiple of 2 MiB; `ENOMEM` when the pool
/// cannot reserve the pages.
pub fn mmap_anonymous_hugetlb(len: u64) -> io::Result<Mapping> {
    if len % crate::HUGE_PAGE_SIZE != 0 {
        return Err(crate::errno(libc::EINVAL));
    }
    let n = len_usize(len)?;
    // SAFETY: a new anonymous mapping at a kernel-chosen address replaces nothing.
    let addr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as in `mmap_shared`: a fresh mapping of `n` bytes that only we know about.
    Ok(unsafe { Mapping::from_raw(addr as usize, n, Protection::ReadWrite) })
}

/// Writes one 8-byte word at every multiple of `stride` inside `m` (volatile stores), so
/// that every page of the mapping is faulted in writable. Returns the number of words
/// written.
///
/// # Errors
/// `EINVAL` when `stride` is zero or not a multiple of 8; `EACCES` for a read-only mapping.
pub fn touch(m: &Mapping, stride: u64) -> io::Result<u64> {
    m.require_writable()?;
    if stride == 0 || stride % 8 != 0 {
        return Err(crate::errno(libc::EINVAL));
    }
    let stride = usize::try_from(stride).map_err(|_| crate::errno(libc::EINVAL))?;
    let base = m.as_ptr();
    let mut count = 0u64;
    let mut off = 0usize;
    // `off + 8 <= len` keeps every store inside the mapping.
    while off + 8 <= m.len() {
        // SAFETY: `off` is 8-byte aligned (the mapping is page aligned and `stride` a
        // multiple of 8) and `[off, off + 8)` lies inside our writable mapping, which lives
        // as long as `m`; volatile because other processes share this memory.
        unsafe { ptr::write_volatile(base.add(off) as *mut u64, off as u64) };
        count += 1;
        off += stride;
    }
    Ok(count)
}

/// Reads and writes back (plus one) every 8-byte word of `m` in address order, eight words
/// (one cache line) at a time, with volatile loads and stores that the compiler may not
/// merge or drop. Returns a checksum of the words read (callers print it, so the work is
/// observable).
///
/// # Errors
/// `EACCES` for a read-only mapping.
pub fn sweep(m: &Mapping) -> io::Result<u64> {
    m.require_writable()?;
    let base = m.as_ptr() as *mut u64;
    let words = m.len() / 8;
    let lines = words / 8;
    let mut sum = 0u64;
    for line in 0..lines {
        // SAFETY: `line * 8 + 7 < words`, so all eight words lie inside our writable,
        // page-aligned (hence 8-byte aligned) mapping, which lives as long as `m`.
        unsafe {
            let p = base.add(line * 8);
            let mut v = [0u64; 8];
            for (i, w) in v.iter_mut().enumerate() {
                *w = ptr::read_volatile(p.add(i));
            }
            for (i, w) in v.iter().enumerate() {
                ptr::write_volatile(p.add(i), w.wrapping_add(1));
                sum = sum.wrapping_add(*w);
            }
        }
    }
    for i in lines * 8..words {
        // SAFETY: `i < words`: inside the mapping, aligned, as above.
        unsafe {
            let p = base.add(i);
            let w = ptr::read_volatile(p);
            ptr::write_volatile(p, w.wrapping_add(1));
            sum = sum.wrapping_add(w);
        }
    }
    Ok(sum)
}

/// Writes `/proc/sys/vm/stat_refresh`: the kernel folds every CPU's pending deltas of the
/// memory counters into their global totals. Without it `/proc/meminfo` lags by up to the
/// per-CPU threshold times the number of CPUs (here about 36 pages per CPU), which hides
/// the few page-table pages a hugetlb mapping costs. Needs root.
///
/// # Errors
/// The kernel's errno (`EACCES`/`EPERM` without root). `EINVAL`, which the kernel returns
/// after folding when some counter is transiently negative, is not an error.
pub fn vm_stat_refresh() -> io::Result<()> {
    match std::fs::write("/proc/sys/vm/stat_refresh", b"1\n") {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`.
///
/// # Errors
/// Reading the file; `EIO` when it cannot be parsed.
pub fn loadavg() -> io::Result<[f64; 3]> {
    let t = std::fs::read_to_string("/proc/loadavg")?;
    let mut it = t.split_ascii_whitespace().map(|w| w.parse::<f64>());
    let mut out = [0.0; 3];
    for v in &mut out {
        *v = it
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| crate::errno(libc::EIO))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_placed_mapping_touch_and_sweep() {
        let fd = crate::fd::memfd_create("kg-bench", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        let m = mmap_shared(&fd, 1 << 20, Protection::ReadWrite).unwrap();
        assert_eq!(m.addr() % 4096, 0);
        assert_eq!(touch(&m, 4096).unwrap(), 256);
        assert_eq!(m.load_u64(8192).unwrap(), 8192);
        // Every word is read once and incremented once.
        let before: u64 = (0..256u64).map(|i| i * 4096).sum();
        assert_eq!(sweep(&m).unwrap(), before);
        assert_eq!(m.load_u64(8192).unwrap(), 8193);
        assert_eq!(m.load_u64(8).unwrap(), 1);
        assert_eq!(
            crate::procfs::smaps_field(std::process::id(), m.addr(), "KernelPageSize").unwrap(),
            4096
        );
        assert!(crate::procfs::smaps_field(std::process::id(), m.addr(), "NoSuchField").is_err());
        assert!(loadavg().unwrap().iter().all(|v| *v >= 0.0));
    }

    #[test]
    fn bad_arguments() {
        let fd = crate::fd::memfd_create("kg-bench", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        assert_eq!(
            mmap_shared(&fd, 0, Protection::ReadOnly)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        let ro = mmap_shared(&fd, 1 << 20, Protection::ReadOnly).unwrap();
        assert_eq!(
            touch(&ro, 4096).unwrap_err().raw_os_error(),
            Some(libc::EACCES)
        );
        assert_eq!(sweep(&ro).unwrap_err().raw_os_error(), Some(libc::EACCES));
        let rw = mmap_shared(&fd, 1 << 20, Protection::ReadWrite).unwrap();
        for stride in [0, 3, 4100] {
            assert_eq!(
                touch(&rw, stride).unwrap_err().raw_os_error(),
                Some(libc::EINVAL)
            );
        }
        assert_eq!(
            mmap_anonymous_hugetlb(4096).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }
}
