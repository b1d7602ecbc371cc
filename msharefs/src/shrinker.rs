//! The shrinker: releases cached host table sets of regions nobody has attached, least
//! recently used first, when the cached tables exceed the table budget or memory pressure
//! (PSI) passes a threshold. Releasing a set unmaps the daemon's host mapping: the kernel
//! frees the page tables, the data stays in the backing file, and the next attach builds
//! the set again.
//!
//! `pick_victims` is the policy, a pure function with unit tests; `run` applies it to the
//! live host mm once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kernel_glue::mapping::Protection;
use kernel_glue::{PUD_SIZE, procfs};

use crate::fs::Core;
use crate::state::Store;

/// A cached table set as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Region inode.
    pub ino: u64,
    /// Protection set.
    pub prot: Protection,
    /// Page-table bytes the set holds (one PMD page per GiB).
    pub table_bytes: u64,
    /// Last use by an attach.
    pub last_used: Instant,
    /// Processes attached to the region now (sets of attached regions are never released).
    pub attached: usize,
}

/// Settings of the shrinker.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Most bytes of idle cached tables to keep; `Some(0)` caches nothing idle.
    pub table_budget: Option<u64>,
    /// PSI `some avg10` percentage above which every idle set is released.
    pub psi_threshold: f64,
    /// A set used this recently is not idle (an attacher between the daemon's answer and
    /// its first fault must still find the tables).
    pub grace: Duration,
}

/// The sets to release, in release order: idle sets (no attachers, unused for `grace`),
/// least recently used first, until the idle cached bytes fit the budget; all idle sets
/// under memory pressure.
pub fn pick_victims(
    mut sets: Vec<Candidate>,
    policy: &Policy,
    pressure: f64,
    now: Instant,
) -> Vec<Candidate> {
    sets.retain(|c| c.attached == 0 && now.saturating_duration_since(c.last_used) >= policy.grace);
    sets.sort_by_key(|c| c.last_used);
    if pressure > policy.psi_threshold {
        return sets;
    }
    let Some(budget) = policy.table_budget else {
        return Vec::new();
    };
    let mut cached: u64 = sets.iter().map(|c| c.table_bytes).sum();
    let mut out = Vec::new();
    for c in sets {
        if cached <= budget {
            break;
        }
        cached -= c.table_bytes;
        out.push(c);
    }
    out
}

/// Runs the shrinker every second on a background thread.
pub fn spawn(core: Arc<Core>, policy: Policy) {
    let r = std::thread::Builder::new()
        .name("shrinker".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                shrink_once(&core, &policy);
            }
        });
    if let Err(e) = r {
        log::error!("cannot start the shrinker: {e}");
    }
}

/// One pass of the shrinker over the live host mm.
pub fn shrink_once(core: &Core, policy: &Policy) {
    let cached = core.hostmm.cached();
    if cached.is_empty() {
        return;
    }
    let tree = core.tree();
    let me = std::process::id();
    let mut sets = Vec::new();
    for (ino, prot, last_used) in cached {
        let Some(r) = tree.get(ino).and_then(|n| n.region()) else {
            continue;
        };
        let attached = core
            .backing_identity(Store::Hugetlb, ino)
            .and_then(|id| procfs::mappers_of(&[id]).ok())
            .map_or(0, |m| m.iter().filter(|p| p.pid != me).count());
        sets.push(Candidate {
            ino,
            prot,
            table_bytes: 4096 * r.size.div_ceil(PUD_SIZE),
            last_used,
            attached: attached + core.open_count(ino) as usize,
        });
    }
    let pressure = procfs::memory_pressure().map_or(0.0, |p| p.some_avg10);
    for v in pick_victims(sets, policy, pressure, Instant::now()) {
        if core.hostmm.release_set(v.ino, v.prot) {
            log::info!(
                "shrinker: released {:?} host tables of region {} ({} bytes)",
                v.prot,
                v.ino,
                v.table_bytes
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ino: u64, age: u64, attached: usize, now: Instant) -> Candidate {
        Candidate {
            ino,
            prot: Protection::ReadWrite,
            table_bytes: 4096,
            last_used: now - Duration::from_secs(age),
            attached,
        }
    }

    fn policy(budget: Option<u64>) -> Policy {
        Policy {
            table_budget: budget,
            psi_threshold: 10.0,
            grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn lru_until_within_budget_and_never_attached() {
        let now = Instant::now() + Duration::from_secs(100);
        let sets = vec![
            c(1, 5, 0, now),
            c(2, 50, 0, now),
            c(3, 90, 1, now),
            c(4, 20, 0, now),
        ];
        let v = pick_victims(sets.clone(), &policy(Some(4096)), 0.0, now);
        assert_eq!(v.iter().map(|c| c.ino).collect::<Vec<_>>(), vec![2, 4]);
        let v = pick_victims(sets.clone(), &policy(Some(0)), 0.0, now);
        assert_eq!(v.iter().map(|c| c.ino).collect::<Vec<_>>(), vec![2, 4, 1]);
        assert!(pick_victims(sets.clone(), &policy(None), 0.0, now).is_empty());
        let v = pick_victims(sets, &policy(None), 50.0, now);
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn grace_period_protects_fresh_sets() {
        let now = Instant::now() + Duration::from_secs(100);
        let v = pick_victims(vec![c(1, 0, 0, now)], &policy(Some(0)), 0.0, now);
        assert!(v.is_empty());
    }
}
