//! The table-cache model: per region, per 1 GiB slot and per protection set, whether the
//! daemon holds a host mapping (so the kernel keeps that slot's PMD table), when it was
//! last used, and which processes are attached to it.
//!
//! A plain data structure, with no kernel calls: `hostmm` keeps it in step with the host
//! mappings it makes and releases, and with the attachments the kernel reports
//! (`/proc/PID/maps`); the shrinker asks it for victims. Its invariants are unit-tested,
//! including over random sequences of operations.
//!
//! Records are kept in one map from `(region, slot, protection)` to the record. (A slab
//! with a map indexing it once held them: a slab's keys are its own allocation order, so
//! it cannot be indexed by slot, and nothing refers to a record by a slab key; the map
//! alone is the same lookup with one structure instead of two to keep in step.)

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kernel_glue::PUD_SIZE;
use kernel_glue::mapping::Protection;

/// Page-table bytes one cached slot holds: one PMD page.
pub const SLOT_TABLE_BYTES: u64 = 4096;

/// Identifies one table set of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotKey {
    /// Region inode.
    pub ino: u64,
    /// Slot index: bytes `[slot GiB, (slot + 1) GiB)` of the region.
    pub slot: u32,
    /// Protection set.
    pub prot: Protection,
}

/// What the model knows of one slot's table set.
#[derive(Debug, Clone)]
pub struct SlotRec {
    /// A host mapping holds the table.
    pub cached: bool,
    /// Last time an attach used it, or it was built.
    pub last_used: Instant,
    /// Processes attached to this slot with this protection (pid 0 stands for open
    /// msharefs handles, which are about to attach).
    pub attached: BTreeSet<u32>,
}

/// Model errors: operations that would break an invariant are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Detaching a process that is not attached (a refcount would go negative).
    #[cfg_attr(not(test), allow(dead_code))]
    #[error("pid {pid} is not attached to {key:?}")]
    NotAttached {
        /// The process.
        pid: u32,
        /// The slot.
        key: SlotKey,
    },
    /// Releasing a slot that has attached processes.
    #[error("{key:?} has {count} attached processes")]
    InUse {
        /// The slot.
        key: SlotKey,
        /// Attached processes.
        count: usize,
    },
}

/// Settings of the shrinker.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Most bytes of idle cached tables to keep; `Some(0)` caches nothing idle, `None`
    /// keeps everything (unless under pressure).
    pub table_budget: Option<u64>,
    /// PSI `some avg10` percentage above which every idle slot is released.
    pub psi_threshold: f64,
    /// A slot used this recently is not idle (an attacher between the daemon's answer and
    /// its first fault must still find the tables).
    pub grace: Duration,
}

/// The model.
#[derive(Debug, Default)]
pub struct TableCache {
    recs: HashMap<SlotKey, SlotRec>,
}

/// Number of slots of a region of `size` bytes.
pub fn slots_of(size: u64) -> u32 {
    size.div_ceil(PUD_SIZE) as u32
}

impl TableCache {
    fn rec_mut(&mut self, key: SlotKey, now: Instant) -> &mut SlotRec {
        self.recs.entry(key).or_insert_with(|| SlotRec {
            cached: false,
            last_used: now,
            attached: BTreeSet::new(),
        })
    }

    /// The record of a slot, if the model knows it.
    #[cfg(test)]
    pub fn get(&self, key: SlotKey) -> Option<&SlotRec> {
        self.recs.get(&key)
    }

    /// A host mapping now holds the slot's table.
    pub fn mark_cached(&mut self, key: SlotKey, now: Instant) {
        let r = self.rec_mut(key, now);
        r.cached = true;
        r.last_used = now;
    }

    /// An attach used the slot.
    pub fn mark_used(&mut self, key: SlotKey, now: Instant) {
        self.rec_mut(key, now).last_used = now;
    }

    /// The host mapping of the slot was released.
    ///
    /// # Errors
    /// [`ModelError::InUse`] when processes are attached: the shrinker never releases
    /// those.
    pub fn mark_released(&mut self, key: SlotKey) -> Result<(), ModelError> {
        let Some(r) = self.recs.get_mut(&key) else {
            return Ok(());
        };
        let count = r.attached.len();
        if count > 0 {
            return Err(ModelError::InUse { key, count });
        }
        r.cached = false;
        self.gc(key);
        Ok(())
    }

    /// A process attached to a slot.
    pub fn attach(&mut self, key: SlotKey, pid: u32, now: Instant) {
        let r = self.rec_mut(key, now);
        r.attached.insert(pid);
        r.last_used = now;
    }

    /// A process detached from a slot (the daemon learns detaches from the kernel's view,
    /// `set_attached`; this is the model's own operation, exercised by its tests).
    ///
    /// # Errors
    /// [`ModelError::NotAttached`] when it was not attached.
    #[cfg(test)]
    pub fn detach(&mut self, key: SlotKey, pid: u32) -> Result<(), ModelError> {
        let Some(r) = self.recs.get_mut(&key) else {
            return Err(ModelError::NotAttached { pid, key });
        };
        if !r.attached.remove(&pid) {
            return Err(ModelError::NotAttached { pid, key });
        }
        self.gc(key);
        Ok(())
    }

    /// Replaces the attachments of region `ino` with what the kernel reports: each
    /// `(pid, prot, slots)` says that `pid` maps `slots` of the region with `prot`.
    /// Slots that gain an attacher count as used now.
    pub fn set_attached(
        &mut self,
        ino: u64,
        observed: &[(u32, Protection, std::ops::Range<u32>)],
        now: Instant,
    ) {
        let mut want: HashMap<SlotKey, BTreeSet<u32>> = HashMap::new();
        for (pid, prot, slots) in observed {
            for slot in slots.clone() {
                want.entry(SlotKey {
                    ino,
                    slot,
                    prot: *prot,
                })
                .or_default()
                .insert(*pid);
            }
        }
        let known: Vec<SlotKey> = self
            .recs
            .keys()
            .filter(|k| k.ino == ino && !want.contains_key(k))
            .copied()
            .collect();
        for key in known {
            if let Some(r) = self.recs.get_mut(&key) {
                r.attached.clear();
            }
            self.gc(key);
        }
        for (key, pids) in want {
            let r = self.rec_mut(key, now);
            if pids.iter().any(|p| !r.attached.contains(p)) {
                r.last_used = now;
            }
            r.attached = pids;
        }
    }

    /// Forgets a region (it was removed).
    pub fn remove_region(&mut self, ino: u64) {
        self.recs.retain(|k, _| k.ino != ino);
    }

    /// Drops a record that carries no information (not cached, nobody attached).
    fn gc(&mut self, key: SlotKey) {
        if self
            .recs
            .get(&key)
            .is_some_and(|r| !r.cached && r.attached.is_empty())
        {
            self.recs.remove(&key);
        }
    }

    /// Cached slots of a region with `prot`.
    pub fn cached_slots(&self, ino: u64, prot: Protection) -> u32 {
        self.recs
            .iter()
            .filter(|(k, r)| k.ino == ino && k.prot == prot && r.cached)
            .count() as u32
    }

    /// Processes attached to any slot of a region.
    #[cfg(test)]
    pub fn attached_pids(&self, ino: u64) -> BTreeSet<u32> {
        self.recs
            .iter()
            .filter(|(k, _)| k.ino == ino)
            .flat_map(|(_, r)| r.attached.iter().copied())
            .collect()
    }

    /// Bytes of page tables held by all cached slots.
    pub fn cached_bytes(&self) -> u64 {
        self.recs.iter().filter(|(_, r)| r.cached).count() as u64 * SLOT_TABLE_BYTES
    }

    /// The slots the shrinker should release, in release order: cached slots nobody is
    /// attached to and that were not used within the grace period, least recently used
    /// first, until the idle cached bytes fit the budget; every idle slot when memory
    /// pressure passes the threshold. Slots with attachers are never chosen.
    pub fn victims(&self, policy: &Policy, pressure: f64, now: Instant) -> Vec<SlotKey> {
        let mut idle: Vec<(&SlotKey, &SlotRec)> = self
            .recs
            .iter()
            .filter(|(_, r)| {
                r.cached
                    && r.attached.is_empty()
                    && now.saturating_duration_since(r.last_used) >= policy.grace
            })
            .collect();
        // Read-write before read-only among equals, so the order never depends on the
        // map's.
        idle.sort_by_key(|(k, r)| (r.last_used, k.ino, k.slot, k.prot == Protection::ReadOnly));
        if pressure > policy.psi_threshold {
            return idle.into_iter().map(|(k, _)| *k).collect();
        }
        let Some(budget) = policy.table_budget else {
            return Vec::new();
        };
        let mut held = idle.len() as u64 * SLOT_TABLE_BYTES;
        let mut out = Vec::new();
        for (k, _) in idle {
            if held <= budget {
                break;
            }
            held -= SLOT_TABLE_BYTES;
            out.push(*k);
        }
        out
    }

    /// Checks the model's invariant: no record is kept that carries nothing.
    ///
    /// # Errors
    /// A description of the first broken invariant.
    pub fn check(&self) -> Result<(), String> {
        for (key, r) in &self.recs {
            if !r.cached && r.attached.is_empty() {
                return Err(format!("{key:?} is kept though empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64, slot: u32) -> SlotKey {
        SlotKey {
            ino,
            slot,
            prot: Protection::ReadWrite,
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
    fn lru_until_within_budget_never_attached() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut m = TableCache::default();
        m.mark_cached(key(1, 0), at(50));
        m.mark_cached(key(2, 0), at(5));
        m.mark_cached(key(3, 0), at(1));
        m.attach(key(3, 0), 42, at(1));
        m.mark_cached(key(4, 0), at(30));
        let now = at(100);
        assert_eq!(
            m.victims(&policy(Some(4096)), 0.0, now),
            vec![key(2, 0), key(4, 0)]
        );
        assert_eq!(
            m.victims(&policy(Some(0)), 0.0, now),
            vec![key(2, 0), key(4, 0), key(1, 0)]
        );
        assert!(m.victims(&policy(None), 0.0, now).is_empty());
        assert_eq!(m.victims(&policy(None), 50.0, now).len(), 3);
        assert_eq!(
            m.mark_released(key(3, 0)),
            Err(ModelError::InUse {
                key: key(3, 0),
                count: 1
            })
        );
        m.check().unwrap();
    }

    #[test]
    fn grace_period_protects_fresh_slots() {
        let now = Instant::now();
        let mut m = TableCache::default();
        m.mark_cached(key(1, 0), now);
        assert!(m.victims(&policy(Some(0)), 0.0, now).is_empty());
        assert_eq!(
            m.victims(&policy(Some(0)), 0.0, now + Duration::from_secs(2))
                .len(),
            1
        );
    }

    #[test]
    fn detach_of_a_stranger_is_refused() {
        let now = Instant::now();
        let mut m = TableCache::default();
        assert!(m.detach(key(1, 0), 7).is_err());
        m.attach(key(1, 0), 7, now);
        m.detach(key(1, 0), 7).unwrap();
        assert!(m.detach(key(1, 0), 7).is_err());
        m.check().unwrap();
        assert_eq!(m.recs.len(), 0, "empty records are dropped");
    }

    #[test]
    fn kernel_reports_replace_attachments() {
        let now = Instant::now();
        let mut m = TableCache::default();
        for s in 0..4 {
            m.mark_cached(key(9, s), now);
        }
        m.set_attached(
            9,
            &[
                (100, Protection::ReadWrite, 0..4),
                (200, Protection::ReadWrite, 2..3),
            ],
            now,
        );
        assert_eq!(m.get(key(9, 2)).unwrap().attached.len(), 2);
        assert_eq!(
            m.attached_pids(9).into_iter().collect::<Vec<_>>(),
            vec![100, 200]
        );
        m.set_attached(9, &[(200, Protection::ReadWrite, 2..3)], now);
        assert!(m.get(key(9, 0)).unwrap().attached.is_empty());
        assert_eq!(m.cached_slots(9, Protection::ReadWrite), 4);
        m.remove_region(9);
        assert_eq!(m.cached_bytes(), 0);
        m.check().unwrap();
    }

    /// A small deterministic generator: the test needs no extra crate and replays the same
    /// sequences on every run.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn random_sequences_keep_the_invariants() {
        let t0 = Instant::now();
        for seed in 1..=200u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut m = TableCache::default();
            // Reference refcounts kept beside the model.
            let mut refs: HashMap<SlotKey, BTreeSet<u32>> = HashMap::new();
            for step in 0..400u64 {
                let now = t0 + Duration::from_millis(step * 100);
                let k = SlotKey {
                    ino: 1 + rng.next(3),
                    slot: rng.next(4) as u32,
                    prot: if rng.next(2) == 0 {
                        Protection::ReadWrite
                    } else {
                        Protection::ReadOnly
                    },
                };
                let pid = 1 + rng.next(5) as u32;
                match rng.next(5) {
                    0 => {
                        m.attach(k, pid, now);
                        refs.entry(k).or_default().insert(pid);
                    }
                    1 => {
                        let was = refs.entry(k).or_default().remove(&pid);
                        assert_eq!(m.detach(k, pid).is_ok(), was, "detach {k:?} {pid}");
                    }
                    2 => m.mark_cached(k, now),
                    3 => {
                        let attached = refs.get(&k).is_some_and(|s| !s.is_empty());
                        assert_eq!(m.mark_released(k).is_err(), attached);
                    }
                    _ => {
                        let p = policy(Some(rng.next(3) * SLOT_TABLE_BYTES));
                        let v = m.victims(&p, 0.0, now);
                        let mut last = None;
                        for key in &v {
                            let r = m.get(*key).unwrap();
                            assert!(r.attached.is_empty(), "victim with attachers");
                            assert!(r.cached);
                            assert!(last.is_none_or(|l| l <= r.last_used), "not LRU order");
                            last = Some(r.last_used);
                        }
                        for key in v {
                            m.mark_released(key).unwrap();
                        }
                    }
                }
                m.check()
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                for (k, pids) in &refs {
                    let got = m.get(*k).map(|r| r.attached.clone()).unwrap_or_default();
                    assert_eq!(&got, pids, "seed {seed} step {step} {k:?}");
                }
            }
        }
    }
}
