//! The memory an attacher holds, and the loops that run over it.
//!
//! The baselines are mapped the way a database maps its shared memory today: a plain
//! `MAP_SHARED` mapping at an address the kernel chooses (for hugetlb: 2 MiB-aligned,
//! almost never 1 GiB-aligned, so no PMD sharing), and the bandwidth reference is private
//! anonymous 2 MiB pages. Both are memmap2's job (`MmapOptions::map_raw`, and `map_anon`
//! with `huge`); 1 GiB-aligned placement stays kernel-glue's (`Mapping::map_aligned`,
//! through libmshare or directly for the `limit` configuration).
//!
//! Other processes write the shared memory, so the loops never form a reference into it:
//! they use raw pointers and volatile loads and stores only.

use std::io;
use std::os::fd::AsFd;
use std::ptr;

use kernel_glue::mapping::{Mapping, Protection};
use memmap2::{Advice, MmapOptions, MmapRaw};
use mshare::Attachment;

/// `MAP_HUGE_2MB`: log2 of the huge page size, for memmap2's `huge`.
const HUGE_PAGE_BITS: u8 = 21;

/// What an attacher maps; dropping it unmaps (detaches).
#[derive(Debug)]
pub enum Held {
    /// Nothing mapped (the control process, or between `detach` and `attach`).
    Nothing,
    /// A memmap2 mapping, read-write: a file `MAP_SHARED` at a kernel-chosen address, or
    /// anonymous private huge pages.
    Raw(MmapRaw),
    /// A libmshare attachment, read-write.
    Attachment(Attachment),
    /// A kernel-glue mapping at an aligned address, read-write (the `limit` configuration).
    Aligned(Mapping),
}

fn einval() -> io::Error {
    kernel_glue::errno(kernel_glue::errnos::EINVAL)
}

fn length(len: u64) -> io::Result<usize> {
    match usize::try_from(len) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(einval()),
    }
}

/// `len` bytes of `fd` from offset 0, `MAP_SHARED` and read-write, at an address the
/// kernel chooses.
///
/// # Errors
/// `EINVAL` for a zero length; the kernel's errno (`EACCES` for a read-only descriptor,
/// `ENOMEM` when hugetlb pages cannot be reserved, ...).
pub fn map_shared(fd: impl AsFd, len: u64) -> io::Result<Held> {
    let n = length(len)?;
    let fd = fd.as_fd();
    Ok(Held::Raw(MmapOptions::new().len(n).map_raw(&fd)?))
}

/// `len` bytes of private anonymous 2 MiB pages from the hugetlb pool, read-write, at a
/// kernel-chosen address: the bandwidth reference.
///
/// # Errors
/// `EINVAL` for a length that is zero or not a multiple of 2 MiB; `ENOMEM` when the pool
/// cannot reserve the pages.
pub fn map_anonymous_hugetlb(len: u64) -> io::Result<Held> {
    if len % kernel_glue::HUGE_PAGE_SIZE != 0 {
        return Err(einval());
    }
    let n = length(len)?;
    let m = MmapOptions::new()
        .len(n)
        .huge(Some(HUGE_PAGE_BITS))
        .map_anon()?;
    Ok(Held::Raw(m.into()))
}

/// A libmshare attachment; `EACCES` unless it is read-write (the loops write).
///
/// # Errors
/// `EACCES`.
pub fn attachment(a: Attachment) -> io::Result<Held> {
    writable(a.mapping())?;
    Ok(Held::Attachment(a))
}

/// `len` bytes of `fd` mapped read-write at a multiple of `align` (kernel-glue's placement).
///
/// # Errors
/// As [`Mapping::map_aligned`].
pub fn map_aligned(fd: impl AsFd, len: u64, align: u64) -> io::Result<Held> {
    Ok(Held::Aligned(Mapping::map_aligned(
        fd,
        len,
        Protection::ReadWrite,
        align,
    )?))
}

fn writable(m: &Mapping) -> io::Result<()> {
    if m.protection() != Protection::ReadWrite {
        return Err(kernel_glue::errno(kernel_glue::errnos::EACCES));
    }
    Ok(())
}

impl Held {
    /// Start and length of the mapping, `None` when nothing (writable) is mapped. memmap2
    /// mappings are read-write by construction (the functions above).
    fn span(&self) -> Option<(*mut u8, usize)> {
        match self {
            Held::Nothing => None,
            Held::Raw(m) => Some((m.as_mut_ptr(), m.len())),
            Held::Attachment(a) => writable(a.mapping()).ok().map(|()| (a.as_ptr(), a.len())),
            Held::Aligned(m) => writable(m).ok().map(|()| (m.as_ptr(), m.len())),
        }
    }

    /// Whether something is mapped.
    pub fn is_mapped(&self) -> bool {
        self.span().is_some()
    }

    /// Start address (0 when nothing is mapped).
    pub fn addr(&self) -> usize {
        self.span().map_or(0, |(p, _)| p as usize)
    }

    /// Length in bytes (0 when nothing is mapped).
    pub fn len(&self) -> usize {
        self.span().map_or(0, |(_, n)| n)
    }

    /// Faults in every page writable with `MADV_POPULATE_WRITE`: the same page tables as
    /// touching, built faster (the faults are not counted by `getrusage`).
    ///
    /// # Errors
    /// The kernel's errno.
    pub fn populate(&self) -> io::Result<()> {
        match self {
            Held::Nothing => Ok(()),
            Held::Raw(m) => m.advise(Advice::PopulateWrite),
            Held::Attachment(a) => a.mapping().populate(0, a.len() as u64),
            Held::Aligned(m) => m.populate(0, m.len() as u64),
        }
    }

    /// Writes one 8-byte word at every multiple of `stride` inside the mapping (volatile
    /// stores), so that every page is faulted in writable. Returns the words written.
    ///
    /// # Errors
    /// `EINVAL` when `stride` is zero or not a multiple of 8.
    pub fn touch(&self, stride: u64) -> io::Result<u64> {
        if stride == 0 || stride % 8 != 0 {
            return Err(einval());
        }
        let Some((base, len)) = self.span() else {
            return Ok(0);
        };
        let stride = usize::try_from(stride).map_err(|_| einval())?;
        let mut count = 0u64;
        let mut off = 0usize;
        // `off + 8 <= len` keeps every store inside the mapping.
        while off + 8 <= len {
            // SAFETY: `off` is 8-byte aligned (the mapping is page aligned, `stride` a
            // multiple of 8) and `[off, off + 8)` lies inside our read-write mapping, which
            // lives as long as `self`; a raw volatile store, no reference, because other
            // processes share this memory.
            unsafe { ptr::write_volatile(base.add(off).cast::<u64>(), off as u64) };
            count += 1;
            off += stride;
        }
        Ok(count)
    }

    /// Reads and writes back (plus one) every 8-byte word of the mapping in address order,
    /// one cache line (eight words) at a time, with volatile loads and stores the compiler
    /// may not merge or drop. Returns a checksum of the words read (callers report it, so
    /// the work is observable).
    pub fn sweep(&self) -> u64 {
        let Some((base, len)) = self.span() else {
            return 0;
        };
        let base = base.cast::<u64>();
        let words = len / 8;
        let lines = words / 8;
        let mut sum = 0u64;
        for line in 0..lines {
            // SAFETY: `line * 8 + 7 < words`, so all eight words lie inside our read-write,
            // page-aligned (hence 8-byte aligned) mapping, which lives as long as `self`;
            // raw volatile accesses only.
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
        sum
    }

    /// The word at `offset` (volatile load), `None` outside the mapping or unaligned.
    #[cfg(test)]
    fn load(&self, offset: usize) -> Option<u64> {
        let (base, len) = self.span()?;
        if offset % 8 != 0 || offset.checked_add(8)? > len {
            return None;
        }
        // SAFETY: checked above: aligned and inside the mapping.
        Some(unsafe { ptr::read_volatile(base.add(offset).cast::<u64>()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_placed_mapping_touch_and_sweep() {
        let fd = kernel_glue::fd::memfd_create("bench-mem", false).unwrap();
        kernel_glue::fd::ftruncate(&fd, 1 << 20).unwrap();
        let m = map_shared(&fd, 1 << 20).unwrap();
        assert!(m.is_mapped());
        assert_eq!(m.addr() % 4096, 0);
        assert_eq!(m.len(), 1 << 20);
        m.populate().unwrap();
        assert_eq!(m.touch(4096).unwrap(), 256);
        assert_eq!(m.load(8192), Some(8192));
        // Every word is read once and incremented once.
        let before: u64 = (0..256u64).map(|i| i * 4096).sum();
        assert_eq!(m.sweep(), before);
        assert_eq!(m.load(8192), Some(8193));
        assert_eq!(m.load(8), Some(1));
        assert_eq!(m.load(1 << 20), None);
        // A second mapping of the same memfd sees the writes: it is shared.
        let m2 = map_shared(&fd, 1 << 20).unwrap();
        assert_eq!(m2.load(8192), Some(8193));
        assert_eq!(
            kernel_glue::procfs::kernel_page_size(std::process::id(), m.addr()).unwrap(),
            4096
        );
    }

    #[test]
    fn bad_arguments() {
        let fd = kernel_glue::fd::memfd_create("bench-mem", false).unwrap();
        kernel_glue::fd::ftruncate(&fd, 1 << 20).unwrap();
        assert_eq!(
            map_shared(&fd, 0).unwrap_err().raw_os_error(),
            Some(kernel_glue::errnos::EINVAL)
        );
        let m = map_shared(&fd, 1 << 20).unwrap();
        for stride in [0, 3, 4100] {
            assert_eq!(
                m.touch(stride).unwrap_err().raw_os_error(),
                Some(kernel_glue::errnos::EINVAL)
            );
        }
        assert_eq!(
            map_anonymous_hugetlb(4096).unwrap_err().raw_os_error(),
            Some(kernel_glue::errnos::EINVAL)
        );
        let nothing = Held::Nothing;
        assert_eq!(nothing.touch(4096).unwrap(), 0);
        assert_eq!(nothing.sweep(), 0);
        assert!(!nothing.is_mapped());
    }

    #[test]
    fn read_only_attachments_are_refused() {
        let fd = kernel_glue::fd::memfd_create("bench-mem", false).unwrap();
        kernel_glue::fd::ftruncate(&fd, 1 << 20).unwrap();
        let ro = Mapping::map_aligned(&fd, 1 << 20, Protection::ReadOnly, 4096).unwrap();
        assert_eq!(
            writable(&ro).unwrap_err().raw_os_error(),
            Some(kernel_glue::errnos::EACCES)
        );
        let rw = map_aligned(&fd, 1 << 20, 1 << 21).unwrap();
        assert_eq!(rw.addr() % (1 << 21), 0);
        assert_eq!(rw.touch(1 << 12).unwrap(), 256);
    }
}
