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
            PoolError::Sysctl(e) | PoolError::Lock(e) => e.raw_os_error().unwrap_or(libc::EIO),
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
    let _guard = lock()?;
    let before = nr_hugepages()?;
    let target = before.checked_add(pages).ok_or(PoolError::Short {
        wanted: pages,
        got: 0,
    })?;
    if let Err(e) = set_nr_hugepages(target) {
        // Not a shortage (e.g. EACCES without privileges): report the real cause.
        let _ = set_nr_hugepages(before);
        return Err(e);
    }
    let mut after = nr_hugepages()?;
    if after < target {
        // Free memory is often there but fragmented into pieces smaller than 2 MiB:
        // compact once and ask again before calling it a shortage.
        let _ = std::fs::write("/proc/sys/vm/compact_memory", "1\n");
        let _ = set_nr_hugepages(target);
        after = nr_hugepages()?;
    }
    let got = after.saturating_sub(before);
    if got < pages {
        // Give back exactly what this call added.
        if got > 0 {
            set_nr_hugepages(before)?;
        }
        log::warn!("huge page pool: wanted {pages} more, kernel delivered {got}");
        return Err(PoolError::Short { wanted: pages, got });
    }
    log::info!("huge page pool: {before} -> {after}");
    Ok(PoolGrant { pages })
}

/// Gives back `pages` that an earlier [`grow`] added (e.g. recorded across a daemon
/// restart). Pages still in use become surplus and return to the system when released.
///
/// # Errors
/// [`PoolError`].
pub fn give_back(pages: u64) -> Result<(), PoolError> {
    if pages == 0 {
        return Ok(());
    }
    let _guard = lock()?;
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
