//! Anonymous shared memory on msharefs: the shim's settings, its table of the mappings it
//! placed, and its one-line log.
//!
//! With `MSHARE_MOUNT=DIR` (a directory on an msharefs mount with huge pages) and
//! `MSHARE_ANON_MIN=BYTES` in the environment, `mmap(NULL, len, PROT_READ|PROT_WRITE,
//! MAP_SHARED|MAP_ANONYMOUS, ...)` with `len >= MSHARE_ANON_MIN` is answered with a new
//! hugetlb region of that mount (`mshare::anon`), mapped at a 1 GiB-aligned address and
//! unlinked at once, or kept under the name `MSHARE_ANON_NAME` when that is set. When the
//! region cannot be had, the call goes to the kernel unchanged and one line on standard
//! error says why.
//!
//! Settings are read from the environment on the first anonymous shared `mmap` and kept
//! in one atomic word: no lock, no allocation, the same answer in every thread and in
//! forked children. The mount directory and name are read with `getenv` when a region is
//! made (rarely: a database makes one at startup).
//!
//! A hugetlb mapping can only be unmapped in whole huge pages, while the program asked for
//! (and will `munmap`) `len` bytes. The shim remembers each region mapping it handed out in
//! a small lock-free table and rounds the end of a `munmap` that stops inside one up to
//! the huge page, so the program's own `munmap(addr, len)` removes the whole mapping.
//! Entries are dropped when their range is unmapped or replaced with `MAP_FIXED`.

use std::ffi::CStr;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use kernel_glue::shim_sys;
use mshare::anon::{AnonError, AnonName};

/// Environment variable: the msharefs directory to place regions in.
pub const ENV_MOUNT: &CStr = c"MSHARE_MOUNT";
/// Environment variable: the smallest anonymous shared mapping to place, in bytes.
pub const ENV_ANON_MIN: &CStr = c"MSHARE_ANON_MIN";
/// Environment variable: keep the region under this name instead of unlinking it.
pub const ENV_ANON_NAME: &CStr = c"MSHARE_ANON_NAME";

const HUGE_PAGE: usize = kernel_glue::HUGE_PAGE_SIZE as usize;
const PAGE: usize = kernel_glue::PAGE_SIZE as usize;

// ---- settings ------------------------------------------------------------------------

/// `MSHARE_ANON_MIN` as read, or one of the two markers below.
static ANON_MIN: AtomicUsize = AtomicUsize::new(UNREAD);
/// The environment has not been read yet.
const UNREAD: usize = 0;
/// Placement is off (variables missing or malformed).
const OFF: usize = usize::MAX;

/// The smallest anonymous shared mapping to place, or `None` when placement is off.
/// Reads the environment on the first call; two threads racing here read the same
/// environment and store the same value.
pub fn anon_min() -> Option<usize> {
    let mut min = ANON_MIN.load(Ordering::Relaxed);
    if min == UNREAD {
        min = read_settings();
        ANON_MIN.store(min, Ordering::Relaxed);
    }
    (min != OFF).then_some(min)
}

fn read_settings() -> usize {
    let Some(raw) = shim_sys::getenv(ENV_ANON_MIN) else {
        return OFF;
    };
    let Some(min) = parse_bytes(raw.to_bytes()) else {
        log(format_args!(
            "MSHARE_ANON_MIN={:?} is not a byte count (digits, optional k/M/G); \
             anonymous shared memory stays ordinary",
            Bytes(raw.to_bytes())
        ));
        return OFF;
    };
    if shim_sys::getenv(ENV_MOUNT).is_none_or(|m| m.is_empty()) {
        log(format_args!(
            "MSHARE_ANON_MIN is set but MSHARE_MOUNT is not; anonymous shared memory stays \
             ordinary"
        ));
        return OFF;
    }
    // 0 would be the UNREAD marker; every length is at least 1 anyway.
    min.clamp(1, OFF - 1)
}

/// Parses `123`, `64k`, `256M`, `2G` (powers of 1024, case-insensitive, optional `B`/`iB`).
pub fn parse_bytes(s: &[u8]) -> Option<usize> {
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: usize = 0;
    for &c in &s[..digits] {
        n = n.checked_mul(10)?.checked_add(usize::from(c - b'0'))?;
    }
    let (shift, rest) = match s.get(digits).map(u8::to_ascii_lowercase) {
        None => (0, &s[digits..]),
        Some(b'k') => (10, &s[digits + 1..]),
        Some(b'm') => (20, &s[digits + 1..]),
        Some(b'g') => (30, &s[digits + 1..]),
        Some(b'b') => (0, &s[digits..]),
        Some(_) => return None,
    };
    let rest_ok = matches!(rest, b"" | b"B" | b"b" | b"iB" | b"ib")
        && !(shift == 0 && matches!(rest, b"iB" | b"ib"));
    if !rest_ok {
        return None;
    }
    n.checked_mul(1usize.checked_shl(shift)?)
}

// ---- placing a mapping ---------------------------------------------------------------

/// Per-process counter for generated region names.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Places an anonymous shared mapping of `len` bytes on a new region of `MSHARE_MOUNT`.
/// Returns its address, or `None` (after logging one line) when the caller should let
/// the kernel map ordinary shared memory instead.
pub fn place(len: usize, populate: bool) -> Option<usize> {
    let Some(dir) = shim_sys::getenv(ENV_MOUNT).filter(|d| !d.is_empty()) else {
        // Unset since the settings were read: placement is off now.
        return None;
    };
    let name = match shim_sys::getenv(ENV_ANON_NAME) {
        Some(n) if !n.is_empty() => AnonName::Kept(n.to_bytes()),
        _ => AnonName::Generated {
            pid: shim_sys::getpid(),
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
        },
    };
    match mshare::anon::create_anon_region(dir, name, len) {
        Ok(mapping) => {
            if populate {
                // mmap(2) ignores MAP_POPULATE failures too: pages fault in later instead.
                let _ = mapping.populate(0, mapping.len() as u64);
            }
            let (addr, mapped) = mapping.into_raw();
            if !register(addr, addr + mapped) {
                log(format_args!(
                    "more than {SLOTS} regions placed; munmap of {addr:#x} must use a \
                     length rounded up to 2 MiB"
                ));
            }
            Some(addr)
        }
        Err(e) => {
            log_fallback(len, dir, &e);
            None
        }
    }
}

fn log_fallback(len: usize, dir: &CStr, e: &AnonError) {
    let errno = e.errno();
    log(format_args!(
        "a {len}-byte MAP_SHARED|MAP_ANONYMOUS mapping stays ordinary shared memory: \
         {} in {:?} failed: errno {errno} ({})",
        e.step(),
        Bytes(dir.to_bytes()),
        errno_name(errno)
    ));
}

/// The symbolic name of the errnos the placement can meet.
fn errno_name(errno: i32) -> &'static str {
    use kernel_glue::errnos::*;
    match errno {
        ENOMEM => "ENOMEM",
        ENOSPC => "ENOSPC",
        ENOENT => "ENOENT",
        EACCES => "EACCES",
        EPERM => "EPERM",
        EEXIST => "EEXIST",
        ENODEV => "ENODEV",
        ENOTCONN => "ENOTCONN",
        EINVAL => "EINVAL",
        EIO => "EIO",
        EBUSY => "EBUSY",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOTDIR => "ENOTDIR",
        EROFS => "EROFS",
        _ => "see errno(3)",
    }
}

// ---- the table of placed mappings ----------------------------------------------------

/// How many placed mappings the table holds (a database places one, or one per restart
/// after a crash).
pub const SLOTS: usize = 16;

/// Start of each placed mapping (0: free slot).
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// End of each placed mapping, a huge-page boundary (0: slot being filled or emptied).
static ENDS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Number of filled slots: 0 keeps `munmap` and `MAP_FIXED` on the fast path.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Records `[start, end)`; false when the table is full.
fn register(start: usize, end: usize) -> bool {
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
pub fn any_placed() -> bool {
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

// ---- the log line --------------------------------------------------------------------

/// Bytes shown as text, with anything that is not printable ASCII escaped.
struct Bytes<'a>(&'a [u8]);

impl std::fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_char('"')?;
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_char('"')
    }
}

/// A line built on the stack; text past its capacity is cut.
struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Keep one byte for the newline.
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes `libmshare_preload[PID]: MESSAGE` and a newline to standard error, without
/// allocating.
fn log(msg: std::fmt::Arguments<'_>) {
    let mut line = Line {
        buf: [0; 1024],
        len: 0,
    };
    let _ = write!(line, "libmshare_preload[{}]: {msg}", shim_sys::getpid());
    line.buf[line.len] = b'\n';
    shim_sys::write_stderr(&line.buf[..=line.len]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_like_the_docs_say() {
        assert_eq!(parse_bytes(b"123"), Some(123));
        assert_eq!(parse_bytes(b"64k"), Some(64 << 10));
        assert_eq!(parse_bytes(b"64KiB"), Some(64 << 10));
        assert_eq!(parse_bytes(b"256M"), Some(256 << 20));
        assert_eq!(parse_bytes(b"256MB"), Some(256 << 20));
        assert_eq!(parse_bytes(b"2g"), Some(2 << 30));
        assert_eq!(parse_bytes(b"10B"), Some(10));
        for bad in [
            &b""[..],
            b"M",
            b"-1",
            b"1.5G",
            b"12x",
            b"1GG",
            b"10iB",
            b" 1",
        ] {
            assert_eq!(parse_bytes(bad), None, "{:?}", Bytes(bad));
        }
        assert_eq!(parse_bytes(b"99999999999999999999999"), None);
        assert_eq!(parse_bytes(b"17179869184G"), None);
    }

    #[test]
    fn the_table_rounds_only_ends_inside_placed_mappings() {
        const G: usize = 1 << 30;
        // Made-up addresses: the table never touches memory.
        let (start, end) = (64 * G, 64 * G + 140 * HUGE_PAGE);
        assert!(register(start, end));
        assert!(any_placed());
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
        assert!(!any_placed());
        // The table reuses slots and refuses more than it holds.
        for i in 0..SLOTS {
            assert!(register((i + 1) * G, (i + 1) * G + HUGE_PAGE));
        }
        assert!(!register(100 * G, 100 * G + HUGE_PAGE));
        forget(G, SLOTS * G);
        assert!(!any_placed());
    }
}
