//! The global hugetlb pool (`vm.nr_hugepages`, 2 MiB pages).
//!
//! The pool is machine-wide state shared with other programs, so this module only ever
//! changes it by a delta (grow by N, give back N), under an exclusive lock file that every
//! msharefs process (daemons, tests, benchmarks) takes, and it verifies that the kernel
//! really delivered what was asked.

use std::io;
use std::path::Path;

use crate::fd::FileLock;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
/// Lock file that serializes pool changes between msharefs processes.
pub const POOL_LOCK: &str = "/run/msharefs/hugepages.lock";

/// Errors of pool changes.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Reading or writing `/proc/sys/vm/nr_hugepages` failed.
    #[error("cannot access {NR_HUGEPAGES}: {0}")]
    Sysctl(#[source] io::Error),
    /// The kernel could not find enough free memory for the requested huge pages.
    #[error("asked the kernel for {wanted} more huge pages, it delivered {got}; gave them back")]
    Short {
        /// Pages requested.
        wanted: u64,
        /// Pages the kernel added before giving up.
        got: u64,
    },
    /// Taking the pool lock failed.
    #[error("cannot lock {POOL_LOCK}: {0}")]
    Lock(#[source] io::Error),
}

impl PoolError {
    /// The errno a client should see: `ENOMEM` for a short pool, else the cause's.
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::Short { .. } => libc::ENOMEM,
            PoolError::Sysctl(e) | PoolError::Lock(e) => crate::errno_of(e),
        }
    }
}

impl From<PoolError> for io::Error {
    fn from(e: PoolError) -> io::Error {
        crate::errno(e.errno())
    }
}

/// Reads `vm.nr_hugepages`.
///
/// # Errors
/// [`PoolError::Sysctl`].
pub fn nr_hugepages() -> Result<u64, PoolError> {
    let s = std::fs::read_to_string(NR_HUGEPAGES).map_err(PoolError::Sysctl)?;
    s.trim()
        .parse()
        .map_err(|_| PoolError::Sysctl(crate::errno(libc::EIO)))
}

fn set_nr_hugepages(n: u64) -> Result<(), PoolError> {
    std::fs::write(NR_HUGEPAGES, format!("{n}\n")).map_err(PoolError::Sysctl)
}

fn lock() -> Result<FileLock, PoolError> {
    FileLock::exclusive(Path::new(POOL_LOCK)).map_err(PoolError::Lock)
}

/// Grows the pool by `pages` and returns a grant that gives them back on drop.
///
/// If the kernel delivers fewer pages than asked (memory too fragmented or short), what it
/// did add is given back at once and the call fails with [`PoolError::Short`].
///
/// # Errors
/// [`PoolError`].
pub fn grow(pages: u64) -> Result<PoolGrant, PoolError> {
    let _guard = lock()?;
    grow_locked(pages)
}

/// Grows the pool by `pages` and runs `reserve` (which should reserve those pages, e.g.
/// by a shared hugetlb mapping) before anyone else may change the pool: a concurrent
/// [`give_back`] would otherwise free the new pages before they are reserved. On failure
/// of `reserve` the pages are given back and its error returned.
///
/// # Errors
/// [`PoolError`] as an `io::Error` (`ENOMEM` when short), or the error of `reserve`.
pub fn grow_then<T>(
    pages: u64,
    mut reserve: impl FnMut() -> io::Result<T>,
) -> io::Result<(PoolGrant, T)> {
    let _guard = lock()?;
    let mut added = grow_locked(pages)?.into_raw();
    let mut tries = 0;
    loop {
        match reserve() {
            Ok(v) => return Ok((PoolGrant { pages: added }, v)),
            // Pages freed and taken by processes outside the lock (attachers unmapping
            // surplus pages, faults) can leave the pool a little short: add once more.
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && tries < 2 => {
                tries += 1;
                match grow_locked(pages) {
                    Ok(g) => added += g.into_raw(),
                    Err(_) => {
                        let _ = give_back_locked(added);
                        return Err(e);
                    }
                }
            }
            Err(e) => {
                // Still under the lock: give back directly (a grant's Drop would lock again).
                if let Err(g) = give_back_locked(added) {
                    log::error!("cannot give back huge pages: {g}");
                }
                return Err(e);
            }
        }
    }
}

fn grow_locked(pages: u64) -> Result<PoolGrant, PoolError> {
    if pages == 0 {
        return Ok(PoolGrant { pages: 0 });
    }
    // Asking the kernel for more than the machine has makes it reclaim everything it can
    // before failing: refuse what cannot fit up front.
    let available = crate::procfs::meminfo()
        .map(|m| m.mem_available / crate::HUGE_PAGE_SIZE)
        .unwrap_or(u64::MAX);
    if pages > available {
        return Err(PoolError::Short {
            wanted: pages,
            got: 0,
        });
    }
    let before = nr_hugepages()?;
    let free_before = free_unreserved()?;
    // Raising the pool first turns surplus pages (given back while still mapped) into
    // pool pages, which are not free: ask for those too, so `pages` more are really free.
    // The grant then covers them, and they are given back with it.
    let surplus = crate::procfs::meminfo()
        .map_err(PoolError::Sysctl)?
        .huge_surp;
    let mut target = before
        .checked_add(pages)
        .and_then(|t| t.checked_add(surplus))
        .ok_or(PoolError::Short {
            wanted: pages,
            got: 0,
        })?;
    if let Err(e) = set_nr_hugepages(target) {
        // Not a shortage (e.g. EACCES without privileges): report the real cause.
        let _ = set_nr_hugepages(before);
        return Err(e);
    }
    // Keep raising until `pages` more are really free (more surplus may have appeared);
    // free memory may also be fragmented: compact once before calling it a shortage.
    let mut compacted = false;
    for _ in 0..8 {
        let gained = free_unreserved()?.saturating_sub(free_before);
        if gained >= pages {
            break;
        }
        let now = nr_hugepages()?;
        if now < target && !compacted {
            let _ = std::fs::write("/proc/sys/vm/compact_memory", "1\n");
            compacted = true;
        } else if now >= target {
            target = now + (pages - gained);
        } else {
            break;
        }
        let _ = set_nr_hugepages(target);
    }
    let after = nr_hugepages()?;
    let got = after.saturating_sub(before);
    let gained = free_unreserved()?.saturating_sub(free_before);
    if gained < pages {
        // Give back exactly what this call added.
        if got > 0 {
            set_nr_hugepages(before)?;
        }
        log::warn!("huge page pool: wanted {pages} more free pages, kernel delivered {gained}");
        return Err(PoolError::Short {
            wanted: pages,
            got: gained,
        });
    }
    log::info!("huge page pool: {before} -> {after}");
    Ok(PoolGrant { pages: got })
}

/// Free pool pages nobody has reserved.
fn free_unreserved() -> Result<u64, PoolError> {
    let m = crate::procfs::meminfo().map_err(PoolError::Sysctl)?;
    Ok(m.huge_free.saturating_sub(m.huge_rsvd))
}

/// Gives back `pages` that an earlier [`grow`] added (e.g. recorded across a daemon
/// restart). Pages still in use become surplus and return to the system when released.
///
/// # Errors
/// [`PoolError`].
pub fn give_back(pages: u64) -> Result<(), PoolError> {
    let _guard = lock()?;
    give_back_locked(pages)
}

fn give_back_locked(pages: u64) -> Result<(), PoolError> {
    if pages == 0 {
        return Ok(());
    }
    let now = nr_hugepages()?;
    let target = now.saturating_sub(pages);
    set_nr_hugepages(target)?;
    log::info!("huge page pool: {now} -> {target}");
    Ok(())
}

/// Huge pages this process added to the pool; given back on drop.
#[derive(Debug)]
pub struct PoolGrant {
    pages: u64,
}

impl PoolGrant {
    /// Pages held.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Stops giving the pages back on drop; the caller records the count and later calls
    /// [`give_back`].
    pub fn into_raw(self) -> u64 {
        let p = self.pages;
        std::mem::forget(self);
        p
    }
}

impl Drop for PoolGrant {
    fn drop(&mut self) {
        if let Err(e) = give_back(self.pages) {
            log::error!("cannot give back {} huge pages: {e}", self.pages);
        }
    }
}
