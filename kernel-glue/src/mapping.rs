//! Owned mappings placed at aligned virtual addresses.
//!
//! hugetlb PMD sharing needs every process to map a region at an address congruent to the
//! file offset modulo 1 GiB; the kernel never picks such an address by itself. [`Mapping`]
//! reserves `len + align` bytes of address space, maps the file with `MAP_FIXED` at the
//! first aligned address inside, and trims the rest, so nothing but the mapping remains and
//! a plain `munmap(addr, len)` by the owner (or C code) removes it completely.
//!
//! Memory behind a `MAP_SHARED` mapping is written by other processes at any time. This
//! module never creates `&`/`&mut` references into it: every access is a volatile load or
//! store through a raw pointer (copies go word by word), so the compiler never assumes the
//! memory is unchanged between two reads.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr;

use crate::check_retval;

/// Protection of a mapping (`PROT_READ`, optionally `PROT_WRITE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// `PROT_READ`.
    ReadOnly,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

impl Protection {
    /// The `PROT_*` bits.
    pub fn bits(self) -> i32 {
        match self {
            Protection::ReadOnly => libc::PROT_READ,
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }

    /// From `PROT_*` bits; `PROT_WRITE` implies read. Anything beyond read/write/exec
    /// is `EINVAL`; `PROT_NONE` is `EINVAL` (nothing to attach).
    ///
    /// # Errors
    /// `EINVAL` for unsupported bits.
    pub fn from_bits(prot: i32) -> io::Result<Protection> {
        if prot & !(libc::PROT_READ | libc::PROT_WRITE) != 0 || prot == libc::PROT_NONE {
            return Err(crate::errno(libc::EINVAL));
        }
        Ok(if prot & libc::PROT_WRITE != 0 {
            Protection::ReadWrite
        } else {
            Protection::ReadOnly
        })
    }
}

/// Safe wrapper for `munmap(2)` of a range this crate handed out as a raw address.
///
/// # Errors
/// `EINVAL` from the kernel for a misaligned address.
///
/// # Safety
/// The caller must own `[addr, addr + len)` and no live Rust reference may point into it.
pub unsafe fn munmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range (function contract).
    check_retval(unsafe { crate::shim_sys::raw_munmap(addr as *mut libc::c_void, len) })?;
    Ok(())
}

/// Copies `dst.len()` bytes from `src` into `dst` with volatile loads: single bytes up to
/// the first 8-byte boundary of `src`, whole aligned words, then single bytes. The
/// compiler may neither elide, merge nor split-and-reread these loads, which plain
/// copies of memory that other processes write would allow.
///
/// # Safety
/// `[src, src + dst.len())` is readable and mapped for the whole call, and does not
/// overlap `dst`.
unsafe fn volatile_read(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let mut i = 0;
    while i < n && (src as usize + i) % 8 != 0 {
        // SAFETY: `i < n`: inside the readable source (function contract).
        dst[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`: inside the source; `src + i` is 8-byte aligned here.
        let w = unsafe { ptr::read_volatile(src.add(i) as *const u64) };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`: inside the source.
        dst[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Copies `src` to `dst` with volatile stores, word-wise like [`volatile_read`].
///
/// # Safety
/// `[dst, dst + src.len())` is writable and mapped for the whole call, and does not
/// overlap `src`.
unsafe fn volatile_write(src: &[u8], dst: *mut u8) {
    let n = src.len();
    let mut i = 0;
    while i < n && (dst as usize + i) % 8 != 0 {
        // SAFETY: `i < n`: inside the writable target (function contract).
        unsafe { ptr::write_volatile(dst.add(i), src[i]) };
        i += 1;
    }
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        // SAFETY: `i + 8 <= n`: inside the target; `dst + i` is 8-byte aligned here.
        unsafe { ptr::write_volatile(dst.add(i) as *mut u64, u64::from_ne_bytes(w)) };
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`: inside the target.
        unsafe { ptr::write_volatile(dst.add(i), src[i]) };
        i += 1;
    }
}

/// A `MAP_SHARED` mapping of a file at an address aligned to a power of two, unmapped on
/// drop (unless [`Mapping::into_raw`] hands it out).
///
/// Its system calls are raw (`syscall(SYS_mmap, ...)`): inside the `LD_PRELOAD` shim,
/// which defines `mmap` and `munmap` itself, they must not come back to the shim.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    /// Bytes of the file the caller asked for (what the accessors may reach).
    len: usize,
    /// Bytes of address space mapped (at least `len`; see [`Mapping::map_granules`]).
    mapped: usize,
    prot: Protection,
}

// SAFETY: the mapping is plain memory addressed by integer; every accessor uses volatile
// loads and stores through raw pointers (memory other processes write at any time cannot
// be data-raced in a way the compiler relies on), which hold from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; no method hands out references into the mapping, and `&self` methods
// only make volatile accesses, so concurrent calls from several threads are no more than
// the concurrent writes of other processes this module already allows for.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from file offset 0, `MAP_SHARED`, at an address that is a
    /// multiple of `align` (a power of two, at least the page size).
    ///
    /// # Errors
    /// `EINVAL` for a zero length, an `align` that is not a power of two or when
    /// `len + align` overflows; `ENOMEM` when no such range of address space is free; the
    /// kernel's errno of the file mapping (`EACCES` for `ReadWrite` on a read-only fd,
    /// `ENOMEM` when hugetlb pages cannot be reserved, `ENODEV`, ...).
    pub fn map_aligned(
        fd: impl AsFd,
        len: u64,
        prot: Protection,
        align: u64,
    ) -> io::Result<Mapping> {
        Self::map_aligned_shifted(fd, len, prot, align, 0)
    }

    /// Like [`Mapping::map_aligned`], but places the mapping `shift` bytes past a multiple
    /// of `align`: the address is congruent to `shift` modulo `align`. Tests and benchmarks
    /// use it to map a hugetlb file deliberately out of step with the 1 GiB granule, the
    /// case in which the kernel cannot share PMD tables.
    ///
    /// # Errors
    /// As [`Mapping::map_aligned`]; also `EINVAL` when `shift` is not a multiple of the
    /// page size or not smaller than `align`. The kernel refuses (`EINVAL`) a hugetlb
    /// mapping whose address is not a multiple of the huge page size.
    pub fn map_aligned_shifted(
        fd: impl AsFd,
        len: u64,
        prot: Protection,
        align: u64,
        shift: u64,
    ) -> io::Result<Mapping> {
        Self::map_inner(fd.as_fd(), 0, len, prot, align, shift)
    }

    /// Maps `len` bytes of `fd` starting at file offset `offset` (a multiple of `align`,
    /// so the address stays congruent to the offset modulo `align`, the condition for
    /// hugetlb PMD sharing) at an `align`-aligned address. The daemon maps regions one
    /// 1 GiB slot at a time with it.
    ///
    /// # Errors
    /// As [`Mapping::map_aligned`]; `EINVAL` when `offset` is not a multiple of `align`.
    pub fn map_range_aligned(
        fd: impl AsFd,
        offset: u64,
        len: u64,
        prot: Protection,
        align: u64,
    ) -> io::Result<Mapping> {
        if align == 0 || offset % align != 0 {
            return Err(crate::errno(libc::EINVAL));
        }
        Self::map_inner(fd.as_fd(), offset, len, prot, align, 0)
    }

    /// Maps `len` bytes of the hugetlb file `fd` from file offset `offset` (a multiple of
    /// `granule`) at a `granule`-aligned address so that every granule the range touches
    /// is covered by a mapping of it whole, which is the kernel's condition for sharing
    /// its page table: the whole granules as one mapping, and a last, partial one as a
    /// second mapping of a whole granule with `MAP_NORESERVE`, reaching past the end of
    /// the file (nothing there is ever touched: [`Mapping::len`] is `len`; the file's
    /// pages up to `len` are reserved with the file). Every process that maps the same
    /// file this way, the daemon's host mapping included, shares all of its tables.
    /// Unmapping takes [`Mapping::mapped_len`] bytes.
    ///
    /// # Errors
    /// As [`Mapping::map_range_aligned`].
    pub fn map_granules(
        fd: impl AsFd,
        offset: u64,
        len: u64,
        prot: Protection,
        granule: u64,
    ) -> io::Result<Mapping> {
        if granule == 0 || offset % granule != 0 {
            return Err(crate::errno(libc::EINVAL));
        }
        let whole = len - len % granule;
        if whole == len {
            return Self::map_inner(fd.as_fd(), offset, len, prot, granule, 0);
        }
        let bad = || crate::errno(libc::EINVAL);
        let mapped =
            usize::try_from(whole.checked_add(granule).ok_or_else(bad)?).map_err(|_| bad())?;
        let (whole, granule) = (whole as usize, granule as usize);
        let addr = crate::shim_sys::reserve_aligned(mapped, granule, 0)?;
        // The whole granules as one mapping; the partial one as a mapping that reserves
        // nothing (one mapping would take the file's reservation past its end).
        let pieces = [
            (0, whole, offset, 0),
            (whole, granule, offset + whole as u64, libc::MAP_NORESERVE),
        ];
        Self::map_into(fd.as_fd(), addr, mapped, &pieces, prot)?;
        Ok(Mapping {
            addr,
            len: len as usize,
            mapped,
            prot,
        })
    }

    fn map_inner(
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: u64,
        prot: Protection,
        align: u64,
        shift: u64,
    ) -> io::Result<Mapping> {
        if len == 0 || !align.is_power_of_two() || align < crate::PAGE_SIZE {
            return Err(crate::errno(libc::EINVAL));
        }
        if shift % crate::PAGE_SIZE != 0 || shift >= align {
            return Err(crate::errno(libc::EINVAL));
        }
        let len = usize::try_from(len).map_err(|_| crate::errno(libc::EINVAL))?;
        let align = usize::try_from(align).map_err(|_| crate::errno(libc::EINVAL))?;
        // `shift < align`, which fits a usize.
        let shift = shift as usize;
        let addr = crate::shim_sys::reserve_aligned(len, align, shift)?;
        Self::map_into(fd, addr, len, &[(0, len, offset, 0)], prot)?;
        Ok(Mapping {
            addr,
            len,
            mapped: len,
            prot,
        })
    }

    /// Maps `pieces` of `fd` (each: offset into the reservation, length, file offset,
    /// extra `mmap` flags) `MAP_SHARED|MAP_FIXED` into the reservation
    /// `[addr, addr + reserved)` that [`crate::shim_sys::reserve_aligned`] made for the
    /// caller. On failure the whole reservation is unmapped and the kernel's errno
    /// returned (`EINVAL` for a file offset beyond `off_t`).
    fn map_into(
        fd: std::os::fd::BorrowedFd<'_>,
        addr: usize,
        reserved: usize,
        pieces: &[(usize, usize, u64, i32)],
        prot: Protection,
    ) -> io::Result<()> {
        for &(at, n, off, extra) in pieces {
            if n == 0 {
                continue;
            }
            let got = libc::off_t::try_from(off)
                .map_err(|_| crate::errno(libc::EINVAL))
                .and_then(|off| {
                    // SAFETY: `[addr + at, addr + at + n)` lies inside the reservation the
                    // caller owns, so MAP_FIXED replaces only its own pages.
                    let p = unsafe {
                        crate::shim_sys::raw_mmap(
                            (addr + at) as *mut libc::c_void,
                            n,
                            prot.bits(),
                            libc::MAP_SHARED | libc::MAP_FIXED | extra,
                            fd.as_raw_fd(),
                            off,
                        )
                    };
                    if p == libc::MAP_FAILED {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
            if let Err(e) = got {
                // SAFETY: the whole reservation (and what was mapped in it) is the
                // caller's and nothing references it yet.
                unsafe { crate::shim_sys::raw_munmap(addr as *mut libc::c_void, reserved) };
                return Err(e);
            }
        }
        Ok(())
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes: what the caller asked for, and what the accessors reach.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes of address space the mapping takes, and that unmapping it takes: `len`, or
    /// more for [`Mapping::map_granules`].
    pub fn mapped_len(&self) -> usize {
        self.mapped
    }

    /// Always false: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Protection the mapping was made with.
    pub fn protection(&self) -> Protection {
        self.prot
    }

    /// Raw pointer to the first byte, for callers that do their own volatile access.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Faults in every page of `[offset, offset + len)` with `madvise(MADV_POPULATE_WRITE)`
    /// (or `_READ` for read-only mappings), so the page tables exist afterwards.
    ///
    /// # Errors
    /// `EINVAL` out of range; the kernel's errno (`EFAULT`, `ENOMEM`, `EINTR`) otherwise.
    pub fn populate(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, len) = self.range(offset, len)?;
        let advice = match self.prot {
            Protection::ReadWrite => libc::MADV_POPULATE_WRITE,
            Protection::ReadOnly => libc::MADV_POPULATE_READ,
        };
        // SAFETY: the range lies inside our mapping; populate changes no contents.
        check_retval(unsafe { libc::madvise(start as *mut libc::c_void, len, advice) })?;
        Ok(())
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<(usize, usize)> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| crate::errno(libc::EINVAL))?;
        if end > self.len as u64 {
            return Err(crate::errno(libc::EINVAL));
        }
        Ok((self.addr + offset as usize, len as usize))
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping, with volatile loads (other
    /// processes may write the bytes meanwhile; each aligned 8-byte word is read whole).
    ///
    /// # Errors
    /// `EINVAL` when the range is outside the mapping.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, _) = self.range(offset, buf.len() as u64)?;
        // SAFETY: the source range is inside our readable mapping, which lives as long as
        // `self`; `buf` is ordinary memory that does not overlap it.
        unsafe { volatile_read(start as *const u8, buf) };
        Ok(())
    }

    /// `EACCES` unless the mapping is read-write.
    pub(crate) fn require_writable(&self) -> io::Result<()> {
        if self.prot != Protection::ReadWrite {
            return Err(crate::errno(libc::EACCES));
        }
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`, with volatile stores (each aligned
    /// 8-byte word is written whole).
    ///
    /// # Errors
    /// `EINVAL` out of range; `EACCES` for a read-only mapping.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.require_writable()?;
        let (start, _) = self.range(offset, data.len() as u64)?;
        // SAFETY: the target range is inside our writable mapping, which lives as long as
        // `self`; `data` is ordinary memory that does not overlap it.
        unsafe { volatile_write(data, start as *mut u8) };
        Ok(())
    }

    /// Volatile load of the `u64` at `offset` (must be 8-byte aligned).
    ///
    /// # Errors
    /// `EINVAL` when out of range or misaligned.
    pub fn load_u64(&self, offset: u64) -> io::Result<u64> {
        let (start, _) = self.range(offset, 8)?;
        if start % 8 != 0 {
            return Err(crate::errno(libc::EINVAL));
        }
        // SAFETY: aligned, in range, readable; volatile because other processes write it.
        Ok(unsafe { ptr::read_volatile(start as *const u64) })
    }

    /// Volatile store of `value` at `offset` (must be 8-byte aligned).
    ///
    /// # Errors
    /// `EINVAL` when out of range or misaligned; `EACCES` for a read-only mapping.
    pub fn store_u64(&self, offset: u64, value: u64) -> io::Result<()> {
        self.require_writable()?;
        let (start, _) = self.range(offset, 8)?;
        if start % 8 != 0 {
            return Err(crate::errno(libc::EINVAL));
        }
        // SAFETY: aligned, in range, writable; volatile because other processes read it.
        unsafe { ptr::write_volatile(start as *mut u64, value) };
        Ok(())
    }

    /// Hands the mapping out: it is no longer unmapped on drop. Returns `(addr, mapped)`
    /// ([`Mapping::mapped_len`]); the caller unmaps it with `munmap(addr, mapped)`.
    pub fn into_raw(self) -> (usize, usize) {
        let r = (self.addr, self.mapped);
        std::mem::forget(self);
        r
    }

    /// Takes ownership of a mapping of `len` bytes at `addr` (as [`Mapping::into_raw`]
    /// handed it out, or as a caller made it itself).
    ///
    /// # Safety
    /// `[addr, addr + len)` must be mapped with protection `prot`, owned by nobody else.
    pub unsafe fn from_raw(addr: usize, len: usize, prot: Protection) -> Mapping {
        Mapping {
            addr,
            len,
            mapped: len,
            prot,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the range; no references into it exist (module rule).
        if let Err(e) = unsafe { munmap(self.addr, self.mapped) } {
            log::error!("munmap({:#x}, {}) failed: {e}", self.addr, self.mapped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_shared_mapping_of_a_memfd() {
        let fd = crate::fd::memfd_create("kg-map", false).unwrap();
        crate::fd::ftruncate(&fd, 8 << 20).unwrap();
        let m = Mapping::map_aligned(&fd, 8 << 20, Protection::ReadWrite, crate::PUD_SIZE).unwrap();
        assert_eq!(m.addr() as u64 % crate::PUD_SIZE, 0);
        m.populate(0, 8 << 20).unwrap();
        m.store_u64(4096, 0xfeed).unwrap();
        assert_eq!(m.load_u64(4096).unwrap(), 0xfeed);
        let mut buf = [0u8; 8];
        crate::fd::pread_full(&fd, &mut buf, 4096).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 0xfeed);
        m.write_at(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read_at(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(m.read_at(8 << 20, &mut out).is_err());
        assert!(m.store_u64(3, 1).is_err());
        // The trimmed reservation leaves exactly one VMA of the mapping's size.
        let pid = std::process::id();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let start = format!("{:x}-{:x} ", m.addr(), m.addr() + m.len());
        assert!(maps.contains(&start), "{start} not in maps");
    }

    #[test]
    fn volatile_copies_at_every_alignment() {
        let fd = crate::fd::memfd_create("kg-map", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 16).unwrap();
        let m = Mapping::map_aligned(&fd, 1 << 16, Protection::ReadWrite, 4096).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        for off in 0..17u64 {
            for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 100] {
                m.write_at(1000 + off, &data[..len]).unwrap();
                let mut back = vec![0xAAu8; len];
                m.read_at(1000 + off, &mut back).unwrap();
                assert_eq!(back, &data[..len], "offset {off}, length {len}");
                let mut file = vec![0u8; len];
                crate::fd::pread_full(&fd, &mut file, 1000 + off).unwrap();
                assert_eq!(file, &data[..len], "file at offset {off}, length {len}");
            }
        }
    }

    #[test]
    fn shifted_mapping_is_congruent_to_the_shift() {
        let fd = crate::fd::memfd_create("kg-map", false).unwrap();
        crate::fd::ftruncate(&fd, 4 << 20).unwrap();
        let shift = crate::HUGE_PAGE_SIZE;
        let m = Mapping::map_aligned_shifted(
            &fd,
            4 << 20,
            Protection::ReadWrite,
            crate::PUD_SIZE,
            shift,
        )
        .unwrap();
        assert_eq!(m.addr() as u64 % crate::PUD_SIZE, shift);
        // Mapped from file offset 0.
        m.store_u64(0, 0xabcd).unwrap();
        let mut buf = [0u8; 8];
        crate::fd::pread_full(&fd, &mut buf, 0).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 0xabcd);
        let pid = std::process::id();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let start = format!("{:x}-{:x} ", m.addr(), m.addr() + m.len());
        assert!(maps.contains(&start), "{start} not in maps");
        for bad_shift in [100, crate::PUD_SIZE, crate::PUD_SIZE + 4096] {
            let e = Mapping::map_aligned_shifted(
                &fd,
                4 << 20,
                Protection::ReadOnly,
                crate::PUD_SIZE,
                bad_shift,
            )
            .unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "shift {bad_shift}");
        }
    }

    #[test]
    fn bad_arguments() {
        let fd = crate::fd::memfd_create("kg-map", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        for (len, align) in [(0, 4096), (4096, 3), (u64::MAX, crate::PUD_SIZE)] {
            let e = Mapping::map_aligned(&fd, len, Protection::ReadOnly, align).unwrap_err();
            assert!(matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOMEM)
            ));
        }
        assert!(Protection::from_bits(libc::PROT_EXEC).is_err());
        assert!(Protection::from_bits(libc::PROT_NONE).is_err());
    }
}
