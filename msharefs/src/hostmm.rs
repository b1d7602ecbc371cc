//! The host mm: for each hugetlb region, the daemon's own mappings of the backing at
//! 1 GiB-aligned addresses, populated, one per protection set.
//!
//! Why: the kernel shares a PMD page-table page between processes that map the same
//! hugetlb file range at congruent addresses with identical VMA flags, but only if some
//! mapping already has that PMD page. The host mappings are that "some mapping": they
//! build the tables before the first attacher arrives and keep them when the last one
//! leaves, so every attach links one table per GiB instead of faulting 512 times.
//!
//! A read-write set (read-write descriptor, `PROT_READ|PROT_WRITE`) and a read-only set
//! (read-only descriptor, `PROT_READ`) are kept apart because their VMA flags differ and
//! the kernel shares tables only between equal flags. Releasing a set frees page tables
//! only: region data lives in the backing file.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kernel_glue::mapping::{Mapping, Protection};

/// Population proceeds in chunks of this size, so progress is visible and a release can
/// stop it.
const POPULATE_CHUNK: u64 = 64 << 20;

/// One cached table set: a host mapping and its population state.
#[derive(Debug)]
struct TableSet {
    mapping: Arc<Mapping>,
    populated: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
    last_used: Instant,
}

impl TableSet {
    fn new(mapping: Mapping) -> TableSet {
        TableSet {
            mapping: Arc::new(mapping),
            populated: Arc::new(AtomicU64::new(0)),
            cancel: Arc::new(AtomicBool::new(false)),
            last_used: Instant::now(),
        }
    }

    /// Populates the whole mapping on a background thread.
    fn populate_in_background(&self, ino: u64) {
        let mapping = self.mapping.clone();
        let done = self.populated.clone();
        let cancel = self.cancel.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("populate-{ino}"))
            .spawn(move || {
                let len = mapping.len() as u64;
                let started = Instant::now();
                let mut off = 0;
                while off < len && !cancel.load(Ordering::Relaxed) {
                    let n = POPULATE_CHUNK.min(len - off);
                    if let Err(e) = mapping.populate(off, n) {
                        log::error!("populating region {ino} at {off}: {e}");
                        return;
                    }
                    off += n;
                    done.store(off, Ordering::Relaxed);
                }
                log::info!(
                    "region {ino}: host tables for {} MiB built in {:?}",
                    off >> 20,
                    started.elapsed()
                );
            });
        if let Err(e) = spawned {
            log::error!("cannot start population of region {ino}: {e}");
        }
    }
}

impl Drop for TableSet {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

fn slot(prot: Protection) -> usize {
    match prot {
        Protection::ReadWrite => 0,
        Protection::ReadOnly => 1,
    }
}

/// The table sets of one region.
#[derive(Debug, Default)]
struct HostRegion {
    sets: [Option<TableSet>; 2],
}

/// What the host mm reports about one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRegionStats {
    /// Protection sets cached (`"rw"`, `"ro"`).
    pub sets: Vec<&'static str>,
    /// Bytes of the read-write set populated so far (progress of a new region).
    pub populated: u64,
    /// Seconds since a set of this region was last used by an attach.
    pub idle_secs: u64,
}

/// All host mappings of the daemon.
#[derive(Debug, Default)]
pub struct HostMm {
    regions: Mutex<HashMap<u64, HostRegion>>,
}

impl HostMm {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HostRegion>> {
        // A panic elsewhere must not take the host mm down with it.
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adopts the read-write host mapping made when the region's size was set, and
    /// populates it in the background.
    pub fn install(&self, ino: u64, mapping: Mapping) {
        let set = TableSet::new(mapping);
        set.populate_in_background(ino);
        self.lock().entry(ino).or_default().sets[0] = Some(set);
    }

    /// Makes sure the `prot` set of a region is cached, mapping `open(write)` when it is
    /// not; marks it used. A set built here is populated before returning (pages already
    /// exist, so this only builds tables: well under a millisecond per GiB).
    ///
    /// # Errors
    /// Opening or mapping the backing.
    pub fn ensure(
        &self,
        ino: u64,
        size: u64,
        prot: Protection,
        open: impl FnOnce(bool) -> io::Result<OwnedFd>,
    ) -> io::Result<()> {
        let mut regions = self.lock();
        let region = regions.entry(ino).or_default();
        if let Some(set) = &mut region.sets[slot(prot)] {
            set.last_used = Instant::now();
            return Ok(());
        }
        let fd = open(prot == Protection::ReadWrite)?;
        let mapping = Mapping::map_aligned(&fd, size, prot, kernel_glue::PUD_SIZE)?;
        mapping.populate(0, size)?;
        let set = TableSet::new(mapping);
        set.populated.store(size, Ordering::Relaxed);
        region.sets[slot(prot)] = Some(set);
        log::debug!("region {ino}: rebuilt {prot:?} host tables");
        Ok(())
    }

    /// The read-write host mapping, if cached (for FUSE read/write and object population).
    pub fn rw_mapping(&self, ino: u64) -> Option<Arc<Mapping>> {
        let regions = self.lock();
        regions.get(&ino)?.sets[0]
            .as_ref()
            .map(|s| s.mapping.clone())
    }

    /// Drops every cached set of a region (region removed, or shrinker).
    pub fn release(&self, ino: u64) {
        self.lock().remove(&ino);
    }

    /// Drops one cached set. Returns whether something was released.
    pub fn release_set(&self, ino: u64, prot: Protection) -> bool {
        let mut regions = self.lock();
        let Some(r) = regions.get_mut(&ino) else {
            return false;
        };
        let had = r.sets[slot(prot)].take().is_some();
        if r.sets.iter().all(Option::is_none) {
            regions.remove(&ino);
        }
        had
    }

    /// Report for one region.
    pub fn stats(&self, ino: u64) -> HostRegionStats {
        let regions = self.lock();
        let Some(r) = regions.get(&ino) else {
            return HostRegionStats::default();
        };
        let mut out = HostRegionStats::default();
        let mut newest: Option<Instant> = None;
        for (i, name) in ["rw", "ro"].into_iter().enumerate() {
            if let Some(s) = &r.sets[i] {
                out.sets.push(name);
                newest = Some(newest.map_or(s.last_used, |n| n.max(s.last_used)));
            }
        }
        if let Some(s) = &r.sets[0] {
            out.populated = s.populated.load(Ordering::Relaxed);
        }
        out.idle_secs = newest.map_or(0, |n| n.elapsed().as_secs());
        out
    }

    /// Cached sets as `(ino, prot, last_used)`, for the shrinker.
    pub fn cached(&self) -> Vec<(u64, Protection, Instant)> {
        let regions = self.lock();
        let mut out = Vec::new();
        for (&ino, r) in regions.iter() {
            for prot in [Protection::ReadWrite, Protection::ReadOnly] {
                if let Some(s) = &r.sets[slot(prot)] {
                    out.push((ino, prot, s.last_used));
                }
            }
        }
        out
    }
}
