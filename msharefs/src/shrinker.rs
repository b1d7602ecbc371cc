//! The shrinker: releases cached host slots nobody is attached to, least recently used
//! first, while the cached tables exceed the table budget, or all of them when memory
//! pressure (PSI) passes its threshold. The choice is the model's
//! (`tablecache::TableCache::victims`). Releasing a slot unmaps the daemon's host mapping:
//! the kernel frees the page table, the data stays in the backing file, and the next attach
//! builds it again.
//!
//! Who is attached comes from the registry (`attachers.rs`: the attach socket and pidfds),
//! plus open msharefs handles, which count as attached to every slot (they are about to
//! attach). Once a second the shrinker copies that view into the model, which costs
//! nothing while nothing changes, and reads the memory pressure. It reads `/proc`
//! only
//!
//! - once per attach, [`attachers::SETTLE`] after it: the maps of that process, so one
//!   that was given a backing but never mapped it is forgotten;
//! - right before it releases anything: every `/proc/PID/maps` (one pass for all
//!   regions), because the registry does not know every mapper (a child that inherited an
//!   attachment across `fork` outlives its parent, a root process maps a backing file by
//!   hand) and a table may only go when nobody maps its slot. At most once every
//!   [`MIN_SCAN_GAP`]: a release waits for the next scan of its own rather than trusting
//!   an older one;
//! - once every [`RECONCILE_EVERY`] while the policy could release tables (a budget is set
//!   or the pressure is high): the maps of the registered attachers of cached regions only,
//!   because a process that unmapped without exiting is still registered and keeps its
//!   tables until a scan shows it gone.
//!
//! So while nothing attaches or exits, the shrinker reads no `/proc/PID/maps` but its
//! registered attachers' once a minute, and none at all without a budget: its idle cost
//! does not grow with the processes the machine runs. `msharefs stat` scans every process
//! at each call and feeds the registry too (`stats.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kernel_glue::mapping::Protection;
use kernel_glue::procfs;

use crate::attachers;
use crate::fs::Core;
use crate::state::Store;
use crate::tablecache::{Policy, slots_of};

/// How often the shrinker looks at the model and the pressure.
const TICK: Duration = Duration::from_secs(1);
/// Fewest time between two scans of `/proc` the shrinker starts.
pub const MIN_SCAN_GAP: Duration = Duration::from_secs(5);
/// How often registrations are checked against `/proc` while that could let a table go.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(60);

/// Runs the shrinker every second on a background thread.
pub fn spawn(core: Arc<Core>, policy: Policy) {
    let r = std::thread::Builder::new()
        .name("shrinker".into())
        .spawn(move || {
            let mut s = Shrinker::default();
            loop {
                std::thread::sleep(TICK);
                s.tick(&core, &policy);
            }
        });
    if let Err(e) = r {
        log::error!("cannot start the shrinker: {e}");
    }
}

/// What the model was last given: the registry's version and, per cached region, whether
/// it had open handles.
type Synced = (u64, Vec<(u64, bool)>);

#[derive(Debug, Default)]
struct Shrinker {
    synced: Option<Synced>,
    /// When the shrinker's own last scan of every process began (`msharefs stat`'s do not
    /// count: the scan before a release must be the shrinker's own, after the slot became
    /// idle).
    last_full: Option<Instant>,
    /// When it last read the maps of every registered attacher.
    last_check: Option<Instant>,
}

impl Shrinker {
    /// Copies the registry's view of the cached `regions` (`(ino, size)`) into the model,
    /// unless nothing changed since the last time.
    fn sync(&mut self, core: &Core, regions: &[(u64, u64)]) {
        let now: Synced = (
            core.attachers.version(),
            regions
                .iter()
                .map(|&(ino, _)| (ino, core.open_count(ino) > 0))
                .collect(),
        );
        if self.synced.as_ref() == Some(&now) {
            return;
        }
        for (&(ino, size), &(_, open)) in regions.iter().zip(&now.1) {
            let mut observed = core.attachers.observed(ino);
            if open {
                // An open handle is about to attach: keep both sets of every slot.
                for prot in [Protection::ReadWrite, Protection::ReadOnly] {
                    observed.push((0, prot, 0..slots_of(size)));
                }
            }
            core.hostmm.set_attached(ino, &observed);
        }
        self.synced = Some(now);
    }

    fn tick(&mut self, core: &Core, policy: &Policy) {
        let now = Instant::now();
        // Each registration is checked once, when settled: the maps of its process only.
        let (pids, inos) = core.attachers.unconfirmed(now);
        if !pids.is_empty() {
            scan(core, &inos, Some(&pids));
        }
        let regions = core.hostmm.cached_regions();
        if regions.is_empty() {
            return;
        }
        self.sync(core, &regions);
        let pressure = procfs::memory_pressure().map_or(0.0, |p| p.some_avg10);
        let since =
            |t: Option<Instant>| t.map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        let inos: Vec<u64> = regions.iter().map(|&(ino, _)| ino).collect();
        let may_release = policy.table_budget.is_some() || pressure > policy.psi_threshold;
        if core.hostmm.would_release(policy, pressure) {
            if since(self.last_full) < MIN_SCAN_GAP {
                return;
            }
            // Only a scan of every process may let a table go: it finds mappers the
            // registry does not know.
            self.last_full = Some(now);
            if scan(core, &inos, None) {
                self.sync(core, &regions);
                core.hostmm.shrink(policy, pressure);
            }
        } else if may_release
            && since(self.last_check.max(core.attachers.last_full_scan())) >= RECONCILE_EVERY
        {
            // Registered processes that unmapped without exiting: reading their maps is
            // enough to forget them; the release waits for the full scan of a later tick.
            self.last_check = Some(now);
            let holders = core.attachers.holders(&inos);
            if !holders.is_empty() {
                scan(core, &inos, Some(&holders));
            }
        }
    }
}

/// Reads who maps the hugetlb regions `inos` from `/proc/PID/maps` of every process, or of
/// the processes `pids` only, and reconciles the registry with it. Returns false when
/// `/proc` could not be read.
pub fn scan(core: &Core, inos: &[u64], pids: Option<&[u32]>) -> bool {
    let files: HashMap<(u64, u64), u64> = inos
        .iter()
        .filter_map(|&ino| {
            core.backing_identity(Store::Hugetlb, ino)
                .map(|id| (id, ino))
        })
        .collect();
    let ids: Vec<(u64, u64)> = files.keys().copied().collect();
    let started = Instant::now();
    let scanned = match pids {
        Some(pids) => procfs::mappers_among(pids, &ids),
        None => match procfs::mappers_of(&ids) {
            Ok(m) => m,
            Err(_) => return false,
        },
    };
    let scope: Vec<u64> = files.values().copied().collect();
    let seen = attachers::seen_in(&scanned.found, &files);
    // A process whose maps could not be read keeps what it has.
    let read =
        |pid: u32| pids.is_none_or(|p| p.contains(&pid)) && !scanned.unreadable.contains(&pid);
    core.attachers
        .reconcile(started, &scope, read, pids.is_none(), &seen);
    let (tracked, watched) = core.attachers.counts();
    log::debug!(
        "shrinker: scanned /proc in {:?}: {} mappers; {tracked} attachers registered, \
         {watched} with a pidfd",
        started.elapsed(),
        scanned.found.len()
    );
    true
}
