//! The host mm: for each hugetlb region, the daemon's own mappings of the backing, one per
//! 1 GiB slot and protection set, each at a 1 GiB-aligned address and populated.
//!
//! Why: the kernel shares a PMD page-table page between processes that map the same
//! hugetlb file range at congruent addresses with identical VMA flags, but only if some
//! mapping already has that PMD page. The host mappings are that "some mapping": they
//! build the tables before the first attacher arrives and keep them when the last one
//! leaves, so every attach links one table per GiB instead of faulting 512 times.
//!
//! The read-write set (read-write descriptor, `PROT_READ|PROT_WRITE`) and the read-only
//! set (read-only descriptor, `PROT_READ`) are kept apart because their VMA flags differ
//! and the kernel shares tables only between equal flags. Releasing a slot frees its page
//! table only: region data lives in the backing file.
//!
//! Book-keeping (what is cached, when used, who is attached) is the plain model in
//! `tablecache`; this module owns the mappings and keeps the model in step with them.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::uffd::{self, Userfaultfd};
use kernel_glue::{HUGE_PAGE_SIZE, PUD_SIZE, errnos, vmops};
use mshare_uapi as uapi;

use crate::tablecache::{Policy, SlotKey, TableCache, slots_of};

/// Population proceeds in chunks of this size, so progress is visible and a removed
/// region stops being populated soon.
const POPULATE_CHUNK: u64 = 64 << 20;

/// The part of a byte range that lies in one slot mapping.
struct Piece {
    mapping: Arc<Mapping>,
    /// Offset inside the mapping.
    at: u64,
    /// Offset inside the range.
    from: u64,
    len: u64,
}

/// Opens the region's backing read-write (`true`) or read-only.
pub type Opener<'a> = &'a dyn Fn(bool) -> io::Result<OwnedFd>;

#[derive(Debug)]
struct RegionState {
    size: u64,
    /// Bytes of the read-write set populated by the background job.
    populated: Arc<AtomicU64>,
    /// Set when the region goes away: the background job stops.
    cancel: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Host {
    model: TableCache,
    maps: HashMap<SlotKey, Arc<Mapping>>,
    /// With the unmap guard: each host mapping's userfaultfd registration (see
    /// [`HostMm::new`]).
    guards: HashMap<SlotKey, Userfaultfd>,
    regions: HashMap<u64, RegionState>,
}

/// What the host mm reports about one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRegionStats {
    /// Protection sets cached for every slot (`"rw"`, `"ro"`).
    pub sets: Vec<&'static str>,
    /// Slots of the region.
    pub slots: u32,
    /// Cached slots of the read-write set.
    pub rw_slots_cached: u32,
    /// Cached slots of the read-only set.
    pub ro_slots_cached: u32,
    /// Bytes of the read-write set populated by the background job.
    pub populated: u64,
}

/// All host mappings of the daemon.
#[derive(Debug, Default)]
pub struct HostMm {
    host: Mutex<Host>,
    /// Register every host mapping for userfaultfd missing faults with `SIGBUS`, as
    /// guarded attachers do (`mshare::guard`): the kernel shares tables only between
    /// mappings with equal flags, and the guard's flag is one of them.
    guard: bool,
}

/// Faults in `[off, off + len)` of a host mapping. With the unmap guard a page missing from
/// the file (a range `MSHAREFS_UNMAP` punched out) fails with `EFAULT` instead of being
/// allocated: such pages are skipped, 2 MiB at a time.
fn populate(m: &Mapping, off: u64, len: u64, guard: bool) -> io::Result<()> {
    match m.populate(off, len) {
        Err(e) if guard && e.raw_os_error() == Some(errnos::EFAULT) => {
            let mut at = off;
            while at < off + len {
                let n = HUGE_PAGE_SIZE.min(off + len - at);
                match m.populate(at, n) {
                    Err(e) if e.raw_os_error() == Some(errnos::EFAULT) => {}
                    r => r?,
                }
                at += n;
            }
            Ok(())
        }
        r => r,
    }
}

fn slot_range(size: u64, slot: u32) -> (u64, u64) {
    let off = slot as u64 * PUD_SIZE;
    (off, PUD_SIZE.min(size - off))
}

impl HostMm {
    /// The host mm; `guard`: register host mappings as guarded attachers do (see
    /// [`HostMm`]).
    pub fn new(guard: bool) -> HostMm {
        HostMm {
            host: Mutex::default(),
            guard,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Host> {
        // A panic elsewhere must not take the host mm down with it.
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps the missing slots of the `prot` set of a region (unpopulated).
    fn map_missing(
        &self,
        host: &mut Host,
        ino: u64,
        size: u64,
        prot: Protection,
        open: Opener<'_>,
    ) -> io::Result<Vec<Arc<Mapping>>> {
        let mut fd = None;
        let mut new = Vec::new();
        let now = Instant::now();
        for slot in 0..slots_of(size) {
            let key = SlotKey { ino, slot, prot };
            if host.maps.contains_key(&key) {
                host.model.mark_used(key, now);
                continue;
            }
            // Opened on the first missing slot only.
            let fd = match &mut fd {
                Some(f) => &*f,
                empty @ None => &*empty.insert(open(prot == Protection::ReadWrite)?),
            };
            let (off, len) = slot_range(size, slot);
            // A partial last slot is mapped as a whole one where attachers map it so, so
            // that its table is shared too (`uapi::covers_last_granule`).
            let m = if uapi::covers_last_granule(size) {
                Mapping::map_granules(fd, off, len, prot, PUD_SIZE)?
            } else {
                Mapping::map_range_aligned(fd, off, len, prot, PUD_SIZE)?
            };
            let m = Arc::new(m);
            if self.guard {
                let u = Userfaultfd::new(uffd::FEATURE_SIGBUS | uffd::FEATURE_MISSING_HUGETLBFS)?;
                u.register(&m, 0, len, uffd::Mode::Missing)?;
                host.guards.insert(key, u);
            }
            host.maps.insert(key, m.clone());
            host.model.mark_cached(key, now);
            new.push(m);
        }
        Ok(new)
    }

    /// Builds the read-write set of a region whose size was just set and populates it on a
    /// background thread (allocating and zeroing huge pages takes about a second per GiB).
    ///
    /// # Errors
    /// Opening or mapping the backing.
    pub fn install(&self, ino: u64, size: u64, open: Opener<'_>) -> io::Result<()> {
        let mut host = self.lock();
        let populated = Arc::new(AtomicU64::new(0));
        let cancel = Arc::new(AtomicBool::new(false));
        if let Some(old) = host.regions.insert(
            ino,
            RegionState {
                size,
                populated: populated.clone(),
                cancel: cancel.clone(),
            },
        ) {
            old.cancel.store(true, Ordering::Relaxed);
        }
        let maps = self.map_missing(&mut host, ino, size, Protection::ReadWrite, open)?;
        drop(host);
        let guard = self.guard;
        let spawned = std::thread::Builder::new()
            .name(format!("populate-{ino}"))
            .spawn(move || {
                let started = Instant::now();
                let mut done = 0;
                for m in maps {
                    let len = m.len() as u64;
                    let mut off = 0;
                    while off < len {
                        if cancel.load(Ordering::Relaxed) {
                            return;
                        }
                        let n = POPULATE_CHUNK.min(len - off);
                        if let Err(e) = populate(&m, off, n, guard) {
                            log::error!("populating region {ino}: {e}");
                            return;
                        }
                        off += n;
                        done += n;
                        populated.store(done, Ordering::Relaxed);
                    }
                }
                populated.store(size, Ordering::Relaxed);
                log::info!(
                    "region {ino}: host tables for {} MiB built in {:?}",
                    size >> 20,
                    started.elapsed()
                );
            });
        if let Err(e) = spawned {
            log::error!("cannot start population of region {ino}: {e}");
        }
        Ok(())
    }

    /// Makes sure every slot of the `prot` set of a region is cached, mapping and
    /// populating the missing ones now (the pages exist, so this only builds tables:
    /// well under a millisecond per GiB); marks them used.
    ///
    /// # Errors
    /// Opening, mapping or populating the backing.
    ///
    /// `attacher` is the process about to map the region (from the attach socket): it
    /// counts as attached until the kernel's view replaces it, so the shrinker cannot
    /// release the tables between this answer and the process's first fault.
    pub fn ensure(
        &self,
        ino: u64,
        size: u64,
        prot: Protection,
        attacher: Option<u32>,
        open: Opener<'_>,
    ) -> io::Result<()> {
        let mut host = self.lock();
        host.regions.entry(ino).or_insert_with(|| RegionState {
            size,
            populated: Arc::new(AtomicU64::new(size)),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        for m in self.map_missing(&mut host, ino, size, prot, open)? {
            populate(&m, 0, m.len() as u64, self.guard)?;
        }
        if let Some(pid) = attacher {
            let now = Instant::now();
            for slot in 0..slots_of(size) {
                host.model.attach(SlotKey { ino, slot, prot }, pid, now);
            }
        }
        Ok(())
    }

    /// The read-write slot mappings covering `range` of a region, each with the part of
    /// the range inside it.
    fn rw_pieces(
        &self,
        ino: u64,
        size: u64,
        range: Range<u64>,
        open: Opener<'_>,
    ) -> io::Result<Vec<Piece>> {
        self.ensure(ino, size, Protection::ReadWrite, None, open)?;
        let host = self.lock();
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let slot = (pos / PUD_SIZE) as u32;
            let (soff, slen) = slot_range(size, slot);
            let end = range.end.min(soff + slen);
            let key = SlotKey {
                ino,
                slot,
                prot: Protection::ReadWrite,
            };
            let m = host
                .maps
                .get(&key)
                .ok_or_else(|| kernel_glue::errno(kernel_glue::errnos::EIO))?;
            out.push(Piece {
                mapping: m.clone(),
                at: pos - soff,
                from: pos - range.start,
                len: end - pos,
            });
            pos = end;
        }
        Ok(out)
    }

    /// Copies `data` into the region at `offset` through the read-write set (hugetlbfs has
    /// no `write(2)`).
    ///
    /// # Errors
    /// Mapping errors; `EINVAL` out of range.
    pub fn write(
        &self,
        ino: u64,
        size: u64,
        offset: u64,
        data: &[u8],
        open: Opener<'_>,
    ) -> io::Result<()> {
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= size);
        let end = end.ok_or_else(|| kernel_glue::errno(kernel_glue::errnos::EINVAL))?;
        for p in self.rw_pieces(ino, size, offset..end, open)? {
            let part = &data[p.from as usize..(p.from + p.len) as usize];
            if self.guard {
                // A guarded host mapping raises SIGBUS on a punched-out page; the kernel's
                // copy fails with EFAULT instead.
                vmops::write_through_kernel(&p.mapping, p.at, part)?;
            } else {
                p.mapping.write_at(p.at, part)?;
            }
        }
        Ok(())
    }

    /// Faults in `[offset, offset + len)` of a region (a new object).
    ///
    /// # Errors
    /// Mapping or populate errors.
    pub fn populate(
        &self,
        ino: u64,
        size: u64,
        offset: u64,
        len: u64,
        open: Opener<'_>,
    ) -> io::Result<()> {
        for p in self.rw_pieces(ino, size, offset..offset + len, open)? {
            populate(&p.mapping, p.at, p.len, self.guard)?;
        }
        Ok(())
    }

    /// Drops every mapping of a region (it was removed).
    pub fn release(&self, ino: u64) {
        let mut host = self.lock();
        if let Some(r) = host.regions.remove(&ino) {
            r.cancel.store(true, Ordering::Relaxed);
        }
        host.maps.retain(|k, _| k.ino != ino);
        host.guards.retain(|k, _| k.ino != ino);
        host.model.remove_region(ino);
    }

    /// Regions with at least one cached slot, with their sizes.
    pub fn cached_regions(&self) -> Vec<(u64, u64)> {
        let host = self.lock();
        let mut v: Vec<(u64, u64)> = host
            .regions
            .iter()
            .filter(|(ino, _)| host.maps.keys().any(|k| k.ino == **ino))
            .map(|(&ino, r)| (ino, r.size))
            .collect();
        v.sort_unstable();
        v
    }

    /// Records what the kernel reports about who maps which slots of a region.
    pub fn set_attached(&self, ino: u64, observed: &[(u32, Protection, Range<u32>)]) {
        self.lock()
            .model
            .set_attached(ino, observed, Instant::now());
    }

    /// Whether the policy would release any slot now (the shrinker asks `/proc` who maps
    /// the regions before it lets [`HostMm::shrink`] release them).
    pub fn would_release(&self, policy: &Policy, pressure: f64) -> bool {
        !self
            .lock()
            .model
            .victims(policy, pressure, Instant::now())
            .is_empty()
    }

    /// Releases the slots the policy picks.
    pub fn shrink(&self, policy: &Policy, pressure: f64) {
        let mut host = self.lock();
        let victims = host.model.victims(policy, pressure, Instant::now());
        for key in victims {
            if host.model.mark_released(key).is_ok() && host.maps.remove(&key).is_some() {
                host.guards.remove(&key);
                log::info!(
                    "shrinker: released {:?} host table of region {} slot {}",
                    key.prot,
                    key.ino,
                    key.slot
                );
            }
        }
        debug_assert_eq!(host.model.check(), Ok(()));
    }

    /// Bytes of page tables the host mappings hold.
    pub fn cached_bytes(&self) -> u64 {
        self.lock().model.cached_bytes()
    }

    /// Report for one region.
    pub fn stats(&self, ino: u64) -> HostRegionStats {
        let host = self.lock();
        let Some(r) = host.regions.get(&ino) else {
            return HostRegionStats::default();
        };
        let slots = slots_of(r.size);
        let rw = host.model.cached_slots(ino, Protection::ReadWrite);
        let ro = host.model.cached_slots(ino, Protection::ReadOnly);
        let mut sets = Vec::new();
        if slots > 0 && rw == slots {
            sets.push("rw");
        }
        if slots > 0 && ro == slots {
            sets.push("ro");
        }
        HostRegionStats {
            sets,
            slots,
            rw_slots_cached: rw,
            ro_slots_cached: ro,
            populated: r.populated.load(Ordering::Relaxed),
        }
    }
}
