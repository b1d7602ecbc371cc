//! The mappings of region backings the shim handed out whose length the program will
//! `munmap` unrounded.
//!
//! A hugetlb mapping can only be unmapped in whole huge pages, while a program that asked
//! for (and will `munmap`) `len` bytes passes `len`: PostgreSQL's main segment, a POSIX
//! segment of 3,145,851 bytes mapped by Python. The shim remembers each such mapping in a
//! small lock-free table and rounds the end of a `munmap` that stops inside one up to the
//! huge page, so the program's own `munmap(addr, len)` removes the whole mapping. Entries
//! are dropped when their range is unmapped or replaced with `MAP_FIXED`.

use std::sync::atomic::{AtomicUsize, Ordering};

const HUGE_PAGE: usize = kernel_glue::HUGE_PAGE_SIZE as usize;
const PAGE: usize = kernel_glue::PAGE_SIZE as usize;

/// How many placed mappings the table holds (a database places one main segment; its
/// dynamic segments come and go).
pub const SLOTS: usize = 128;

/// Start of each placed mapping (0: free slot).
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// End of each placed mapping, a huge-page boundary (0: slot being filled or emptied).
static ENDS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Number of filled slots: 0 keeps `munmap` and `MAP_FIXED` on the fast path.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Records `[start, end)`; false when the table is full.
pub fn register(start: usize, end: usize) -> bool {
    for (s, e) in STARTS.iter().zip(&ENDS) {
        if s.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            e.store(end, Ordering::Release);
            LIVE.fetch_add(1, Ordering::Release);
            return true;
        }
    }
    false
}

/// Whether any placed mapping is recorded (the only check on the fast path).
pub fn any() -> bool {
    LIVE.load(Ordering::Acquire) != 0
}

/// The length to pass to the kernel for `munmap(addr, len)`: `len`, unless the range ends
/// inside a placed mapping at a point that is not a huge-page boundary; then up to that
/// boundary (which the mapping covers: its end is one).
pub fn munmap_len(addr: usize, len: usize) -> usize {
    let Some(end) = len
        .checked_add(PAGE - 1)
        .map(|l| l & !(PAGE - 1))
        .and_then(|l| addr.checked_add(l))
    else {
        return len;
    };
    if end % HUGE_PAGE == 0 {
        return len;
    }
    for (s, e) in STARTS.iter().zip(&ENDS) {
        let (start, stop) = (s.load(Ordering::Acquire), e.load(Ordering::Acquire));
        if start != 0 && stop != 0 && end > start && end < stop {
            let rounded = (end + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
            return rounded - addr;
        }
    }
    len
}

/// Drops the table entries that overlap `[addr, addr + len)` (unmapped or replaced).
pub fn forget(addr: usize, len: usize) {
    let end = addr.saturating_add(len);
    for (s, e) in STARTS.iter().zip(&ENDS) {
        let (start, stop) = (s.load(Ordering::Acquire), e.load(Ordering::Acquire));
        if start == 0 || stop == 0 || end <= start || addr >= stop {
            continue;
        }
        // Only the thread that empties `ENDS` frees the slot.
        if e.compare_exchange(stop, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.store(0, Ordering::Release);
            LIVE.fetch_sub(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_rounds_only_ends_inside_placed_mappings() {
        const G: usize = 1 << 30;
        // Made-up addresses: the table never touches memory.
        let (start, end) = (64 * G, 64 * G + 140 * HUGE_PAGE);
        assert!(register(start, end));
        assert!(any());
        // PostgreSQL's munmap(addr, 291954688): rounded to the 140 huge pages mapped.
        assert_eq!(munmap_len(start, 291_954_688), 140 * HUGE_PAGE);
        // Already a huge-page multiple, or ending elsewhere: unchanged.
        assert_eq!(munmap_len(start, 140 * HUGE_PAGE), 140 * HUGE_PAGE);
        assert_eq!(
            munmap_len(start, 4096 + 140 * HUGE_PAGE),
            4096 + 140 * HUGE_PAGE
        );
        assert_eq!(munmap_len(8 * G, 5000), 5000);
        assert_eq!(munmap_len(start + HUGE_PAGE, 1), HUGE_PAGE);
        forget(start, 4096);
        assert_eq!(munmap_len(start, 291_954_688), 291_954_688);
        assert!(!any());
        // The table reuses slots and refuses more than it holds.
        for i in 0..SLOTS {
            assert!(register((i + 1) * G, (i + 1) * G + HUGE_PAGE));
        }
        assert!(!register(1000 * G, 1000 * G + HUGE_PAGE));
        forget(G, SLOTS * G);
        assert!(!any());
    }
}
