//! The shim's settings, from the environment.
//!
//! - `MSHARE_MOUNT=DIR`: the msharefs mount (or a directory in it) to place memory on.
//! - `MSHARE_ANON_MIN=BYTES`: place `MAP_SHARED|MAP_ANONYMOUS` mappings of at least this
//!   size (module [`crate::anon`]); `MSHARE_ANON_NAME` keeps such a region under a name.
//! - `MSHARE_SHM_MIN=BYTES`: place POSIX and System V shared-memory segments of at least
//!   this size (modules [`crate::posix`] and [`crate::sysv`]).
//!
//! The thresholds are read once, on first use, and kept in atomics: no lock, no
//! allocation, the same answer in every thread and in forked children. A threshold
//! without `MSHARE_MOUNT`, or one that does not parse, turns its feature off with one line
//! on standard error. `MSHARE_MOUNT` is copied out of the environment when used.

use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use kernel_glue::shim_sys;

use crate::log::{Bytes, log};

/// Environment variable: the msharefs directory to place regions in.
pub const ENV_MOUNT: &CStr = c"MSHARE_MOUNT";
/// Environment variable: the smallest anonymous shared mapping to place, in bytes.
pub const ENV_ANON_MIN: &CStr = c"MSHARE_ANON_MIN";
/// Environment variable: keep the anonymous region under this name instead of unlinking.
pub const ENV_ANON_NAME: &CStr = c"MSHARE_ANON_NAME";
/// Environment variable: the smallest POSIX or System V segment to place, in bytes.
pub const ENV_SHM_MIN: &CStr = c"MSHARE_SHM_MIN";

/// Room for a path (`PATH_MAX`).
pub const PATH_MAX: usize = 4096;

/// The environment has not been read yet.
const UNREAD: usize = 0;
/// The feature is off (variables missing or malformed).
const OFF: usize = usize::MAX;

static ANON_MIN: AtomicUsize = AtomicUsize::new(UNREAD);
static SHM_MIN: AtomicUsize = AtomicUsize::new(UNREAD);

/// The smallest anonymous shared mapping to place, or `None` when that is off.
pub fn anon_min() -> Option<usize> {
    threshold(&ANON_MIN, ENV_ANON_MIN)
}

/// The smallest shared-memory segment to place, or `None` when that is off (then the
/// shim leaves `shm_open`, `shmget` and their kin to the kernel entirely).
pub fn shm_min() -> Option<usize> {
    threshold(&SHM_MIN, ENV_SHM_MIN)
}

/// Reads `var` on the first call; two threads racing here read the same environment and
/// store the same value.
fn threshold(slot: &AtomicUsize, var: &CStr) -> Option<usize> {
    let mut min = slot.load(Ordering::Relaxed);
    if min == UNREAD {
        min = read_threshold(var);
        slot.store(min, Ordering::Relaxed);
    }
    (min != OFF).then_some(min)
}

fn read_threshold(var: &CStr) -> usize {
    let mut buf = [0u8; 64];
    if !shim_sys::env_is_set(var) {
        return OFF;
    }
    let Some(min) = shim_sys::getenv(var, &mut buf).and_then(|v| parse_bytes(v.to_bytes())) else {
        let mut raw = [0u8; 64];
        let shown = shim_sys::getenv(var, &mut raw).map_or(&b"(too long)"[..], CStr::to_bytes);
        log(format_args!(
            "{}={:?} is not a byte count (digits, optional k/M/G/T, optional B or iB); that \
             placement stays off",
            Bytes(var.to_bytes()),
            Bytes(shown)
        ));
        return OFF;
    };
    let mut dir = [0u8; PATH_MAX];
    if mount_dir(&mut dir).is_none() {
        log(format_args!(
            "{} is set but MSHARE_MOUNT is not; that placement stays off",
            Bytes(var.to_bytes())
        ));
        return OFF;
    }
    // 0 would be the UNREAD marker; every length is at least 1 anyway.
    min.clamp(1, OFF - 1)
}

/// `MSHARE_MOUNT`, copied into `buf`; `None` when unset, empty or too long.
pub fn mount_dir(buf: &mut [u8; PATH_MAX]) -> Option<&CStr> {
    shim_sys::getenv(ENV_MOUNT, buf).filter(|d| !d.is_empty())
}

/// A byte count in msharefs's one size grammar ([`mshare::uapi::parse_size`]: `123`,
/// `64k`, `256M`, `2G`, `2GB`, `2GiB`).
pub fn parse_bytes(s: &[u8]) -> Option<usize> {
    mshare::uapi::parse_size(s).and_then(|n| usize::try_from(n).ok())
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
}
