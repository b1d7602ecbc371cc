//! The mappings of region backings the shim handed out that are longer than the program
//! asked for.
//!
//! A hugetlb mapping can only be unmapped in whole huge pages, while a program that asked
//! for (and will `munmap`) `len` bytes passes `len`: PostgreSQL's main segment, a POSIX
//! segment of 3,145,851 bytes mapped by Python. And a region whose size is not a multiple
//! of 1 GiB is mapped up to the next GiB boundary, so that the table of its last GiB is
//! shared too (`Mapping::map_granules`). The shim remembers each such mapping in a small
//! lock-free table: a `munmap` that reaches the end the program asked for removes the
//! whole mapping; one that stops inside it earlier is rounded up to the huge page. So the
//! program's own `munmap(addr, len)` removes everything the shim mapped. Entries are
//! dropped when their range is unmapped or replaced with `MAP_FIXED`.

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
/// End of what the program asked for, rounded up to the page (at most the end).
static ASKED: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Number of filled slots: 0 keeps `munmap` and `MAP_FIXED` on the fast path.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Records a mapping of `[start, end)` of which the program asked for `len` bytes; false
/// when the table is full.
pub fn register(start: usize, len: usize, end: usize) -> bool {
    let asked = start.saturating_add(len.next_multiple_of(PAGE)).min(end);
    for i in 0..SLOTS {
        if STARTS[i]
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            ASKED[i].store(asked, Ordering::Release);
            ENDS[i].store(end, Ordering::Release);
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
/// inside a placed mapping: then up to the mapping's end if the range reaches the end the
/// program asked for, else up to the next huge-page boundary (which the mapping covers:
/// its end is one).
pub fn munmap_len(addr: usize, len: usize) -> usize {
    let Some(end) = len
        .checked_add(PAGE - 1)
        .map(|l| l & !(PAGE - 1))
        .and_then(|l| addr.checked_add(l))
    else {
        return len;
    };
    for i in 0..SLOTS {
        let start = STARTS[i].load(Ordering::Acquire);
        let (asked, stop) = (
            ASKED[i].load(Ordering::Acquire),
            ENDS[i].load(Ordering::Acquire),
        );
        if start == 0 || stop == 0 || end <= start || end >= stop {
            continue;
        }
        if end >= asked {
            return stop - addr;
        }
        if end % HUGE_PAGE != 0 {
            return end.next_multiple_of(HUGE_PAGE) - addr;
        }
        return len;
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
        assert!(register(start, 291_954_688, end));
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
            assert!(register((i + 1) * G, HUGE_PAGE, (i + 1) * G + HUGE_PAGE));
        }
        assert!(!register(1000 * G, HUGE_PAGE, 1000 * G + HUGE_PAGE));
        forget(G, SLOTS * G);
        assert!(!any());
        // Mapped up to the next GiB: an unmap of what was asked for takes it all; one of
        // a part of it only rounds to the huge page.
        assert!(register(3 * G, 300 << 20, 4 * G));
        assert_eq!(munmap_len(3 * G, 300 << 20), G);
        assert_eq!(munmap_len(3 * G, (300 << 20) - 4096), 300 << 20);
        assert_eq!(munmap_len(3 * G, 100 << 20), 100 << 20);
        assert_eq!(munmap_len(3 * G, (100 << 20) + 1), 102 << 20);
        forget(3 * G, G);
        assert!(!any());
    }
}
