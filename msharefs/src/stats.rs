//! The `msharefs stat` report: regions, attached processes, cached table sets, the
//! page-table bytes attachers use against what 4 KiB pages would cost them, and each
//! owner's use of the per-user quota.
//!
//! Attached processes come from the kernel: every process whose `/proc/PID/maps` has a
//! mapping of the region's backing file or of its msharefs file (passthrough mappings show
//! the msharefs file). Whether a process shares the page tables of each 1 GiB slot it maps
//! is decided from its VMAs and their `VmFlags` in `/proc/PID/smaps`, with the kernel's
//! own conditions (`mm/hugetlb.c`: `want_pmd_share`, `vma_shareable`,
//! `page_table_shareable`; see [`slot_sharing`]). Page-table bytes follow from that with
//! the x86-64 geometry, because the kernel reports page tables per process (`VmPTE`), not
//! per mapping.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Deserializer, Serialize};

use kernel_glue::PUD_SIZE;
use kernel_glue::procfs::{self, MapsEntry};

use crate::fs::Core;
use crate::state::Store;

/// One attached process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attached {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// Whether its mapping of every slot it maps meets every kernel condition for sharing
    /// the slot's page table.
    pub sharing: bool,
    /// The slots it maps that cannot share, each with the reason.
    pub unshared: Vec<Unshared>,
}

/// A slot an attacher maps without sharing its page table, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unshared {
    /// The 1 GiB slot (file offset / 1 GiB).
    pub slot: u32,
    /// The first kernel condition it fails, in words.
    pub reason: String,
}

/// One region's row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionReport {
    /// Path inside the mount.
    pub path: String,
    /// `hugetlb`, `thp` or `shmem`.
    pub backing: Store,
    /// Size in bytes (0 while unset).
    pub size: u64,
    /// The cgroup directory its memory is charged to (the sizing process's, under the
    /// backing's controller); `null` when none accounts for it.
    #[serde(deserialize_with = "present")]
    pub cgroup: Option<String>,
    /// Objects created by ioctl.
    pub objects: usize,
    /// Open msharefs handles.
    pub open_handles: u32,
    /// Processes that map the region (the daemon itself excluded).
    pub attached: Vec<Attached>,
    /// Host table sets cached for every slot (`rw`, `ro`).
    pub tables_cached: Vec<String>,
    /// 1 GiB slots of the region.
    pub slots: u32,
    /// Cached slots of the read-write set.
    pub rw_slots_cached: u32,
    /// Cached slots of the read-only set.
    pub ro_slots_cached: u32,
    /// Bytes of the host read-write mapping populated so far.
    pub populated: u64,
    /// Page-table bytes the attachers use now for this region (computed).
    pub pt_bytes: u64,
    /// What the same attachers would use with 4 KiB pages (computed).
    pub pt_bytes_4k_equivalent: u64,
    /// `pt_bytes_4k_equivalent - pt_bytes`.
    pub saving_bytes: u64,
}

/// Totals for the mount.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    /// Regions.
    pub regions: usize,
    /// Sum of region sizes.
    pub size: u64,
    /// Attached processes, counted per region.
    pub attached: usize,
    /// Of those, the ones that share the tables of every slot they map.
    pub sharing: usize,
    /// Sum of `pt_bytes`.
    pub pt_bytes: u64,
    /// Sum of `pt_bytes_4k_equivalent`.
    pub pt_bytes_4k_equivalent: u64,
    /// Sum of `saving_bytes`.
    pub saving_bytes: u64,
    /// Huge pages the daemon added to the pool for its regions.
    pub pool_pages_added: u64,
    /// Page-table bytes held by the daemon's cached host mappings.
    pub tables_cached_bytes: u64,
}

/// One owner's region memory, as the quota counts it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserUsage {
    /// Owner uid.
    pub uid: u32,
    /// Sizes of its regions (unlinked-but-open ones included) plus sizes being reserved.
    pub used_bytes: u64,
}

/// The per-user quota (`--user-quota`) and what each owner of a region uses of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuotaReport {
    /// Bytes each non-root owner may hold; `null`: no limit. Root is exempt.
    #[serde(deserialize_with = "present")]
    pub limit_bytes: Option<u64>,
    /// Every uid that owns a region, in uid order (root included, for information).
    pub users: Vec<UserUsage>,
}

/// The whole report (`msharefs stat --json` prints it). The daemon sends it as JSON on
/// the attach socket and `msharefs stat` reads it back into this type: a field the daemon
/// does not send (renamed, or from another version) is an error naming it, never a 0.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    /// Regions, in inode order.
    pub regions: Vec<RegionReport>,
    /// Totals.
    pub totals: Totals,
    /// The per-user quota and its use.
    pub quota: QuotaReport,
}

/// An `Option` field that must be in the JSON (`null` or a value): serde would read a
/// missing one as `None`, so a renamed `limit_bytes` would print "quota: none".
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// What the daemon answers instead of a report (to a caller that is not root).
#[derive(Debug, Deserialize)]
struct ErrorReply {
    error: String,
}

impl Report {
    /// Reads the daemon's answer to a statistics request.
    ///
    /// # Errors
    /// The daemon's error message, or what does not match the report's schema.
    pub fn from_reply(body: &str) -> Result<Report, String> {
        if let Ok(e) = serde_json::from_str::<ErrorReply>(body) {
            return Err(e.error);
        }
        serde_json::from_str(body).map_err(|e| {
            format!(
                "the daemon's report does not match this msharefs (a daemon of another \
                 version?): {e}"
            )
        })
    }
}

/// One VMA of an attacher that maps a region's file: its range, file offset and
/// `VmFlags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionVma {
    /// Start address.
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// File offset of `start`.
    pub offset: u64,
    /// `VmFlags` mnemonics from `/proc/PID/smaps`.
    pub flags: Vec<String>,
}

impl RegionVma {
    fn from_smaps(v: &MapsEntry, flags: &[String]) -> RegionVma {
        RegionVma {
            start: v.start,
            end: v.end,
            offset: v.offset,
            flags: flags.to_vec(),
        }
    }

    fn writable(&self) -> bool {
        self.flags.iter().any(|f| f == "wr")
    }
}

/// Flags the kernel ignores when it compares two mappings for sharing
/// (`VM_LOCKED_MASK`: `lo`; `VM_LOCKONFAULT` has no mnemonic).
const IGNORED_FLAGS: [&str; 1] = ["lo"];
/// Protection flags, reported apart from the others.
const PROT_FLAGS: [&str; 3] = ["rd", "wr", "ex"];

fn prot_string(flags: &[String]) -> String {
    let has = |f: &str| flags.iter().any(|x| x == f);
    format!(
        "{}{}{}",
        if has("rd") { 'r' } else { '-' },
        if has("wr") { 'w' } else { '-' },
        if has("ex") { 'x' } else { '-' }
    )
}

/// Why the VMA `v` cannot share the page table of the 1 GiB slot `slot`, or `None` when
/// it meets every condition `mm/hugetlb.c` checks (Linux 6.18):
///
/// - `want_pmd_share`: no userfaultfd write-protect (`uw`) or minor (`ui`) registration;
/// - `vma_shareable`: a shared mapping (`VM_MAYSHARE`, `ms`) whose one VMA covers the
///   whole 1 GiB-aligned virtual range;
/// - `page_table_shareable`: the address congruent to the file offset modulo 1 GiB, and
///   the same VMA flags as the mapping it shares with (`VM_LOCKED` aside): `host`, the
///   flags of the daemon's host mapping of the slot for the same protection, when cached.
///
/// `vmas` are all of the attacher's VMAs of this region's file.
fn slot_reason(vmas: &[RegionVma], slot: u32, host: Option<&[String]>) -> Option<String> {
    let lo = slot as u64 * PUD_SIZE;
    let hi = lo + PUD_SIZE;
    let parts: Vec<&RegionVma> = vmas
        .iter()
        .filter(|v| v.offset < hi && lo < v.offset + (v.end - v.start) as u64)
        .collect();
    let whole = parts
        .iter()
        .find(|v| v.offset <= lo && hi <= v.offset + (v.end - v.start) as u64);
    let Some(v) = whole else {
        return Some(format!(
            "mapped in part: {} VMAs cover pieces of this GiB (mprotect, munmap, mlock or \
             madvise of part of a mapping splits it)",
            parts.len()
        ));
    };
    let addr = v.start as u64 + (lo - v.offset);
    if addr % PUD_SIZE != 0 {
        return Some(format!(
            "not 1 GiB-congruent: address {addr:#x} maps file offset {lo:#x}"
        ));
    }
    let has = |f: &str| v.flags.iter().any(|x| x == f);
    if has("uw") {
        return Some("userfaultfd write-protect registered (VmFlags uw)".into());
    }
    if has("ui") {
        return Some("userfaultfd minor-fault registered (VmFlags ui)".into());
    }
    if !has("ms") {
        return Some("not a shared mapping (no VM_MAYSHARE)".into());
    }
    // Without cached host tables there is no mapping to compare flags with.
    let host = host?;
    let hp = prot_string(host);
    let vp = prot_string(&v.flags);
    if hp != vp {
        return Some(format!(
            "protection {vp} differs from the host tables' {hp}"
        ));
    }
    let relevant =
        |f: &&String| !IGNORED_FLAGS.contains(&f.as_str()) && !PROT_FLAGS.contains(&f.as_str());
    let mine: BTreeSet<&String> = v.flags.iter().filter(relevant).collect();
    let theirs: BTreeSet<&String> = host.iter().filter(relevant).collect();
    if mine != theirs {
        let plus: Vec<&str> = mine.difference(&theirs).map(|s| s.as_str()).collect();
        let minus: Vec<&str> = theirs.difference(&mine).map(|s| s.as_str()).collect();
        return Some(format!(
            "VMA flags differ from the host mapping's: extra [{}], missing [{}]",
            plus.join(" "),
            minus.join(" ")
        ));
    }
    None
}

/// For one attacher of a region of `size` bytes on `store`: the slots it maps that share
/// their page table and the ones that do not, with the reason. `host(slot, writable)` gives
/// the flags of the daemon's host mapping of a slot for a protection, when cached.
pub fn slot_sharing<'h>(
    store: Store,
    size: u64,
    vmas: &[RegionVma],
    host: impl Fn(u32, bool) -> Option<&'h [String]>,
) -> (Vec<u32>, Vec<Unshared>) {
    let mut slots = BTreeSet::new();
    for v in vmas {
        let end = v.offset + (v.end - v.start) as u64;
        slots.extend((v.offset / PUD_SIZE) as u32..end.div_ceil(PUD_SIZE) as u32);
    }
    let (mut shared, mut unshared) = (Vec::new(), Vec::new());
    for slot in slots {
        let reason = if store != Store::Hugetlb {
            Some(format!(
                "{} pages: the kernel shares page tables of hugetlb mappings only",
                store.name()
            ))
        } else if (slot as u64 + 1) * PUD_SIZE > size {
            Some("partial GiB: the region ends inside this slot".into())
        } else {
            let writable = vmas.iter().any(RegionVma::writable);
            slot_reason(vmas, slot, host(slot, writable))
        };
        match reason {
            None => shared.push(slot),
            Some(reason) => unshared.push(Unshared { slot, reason }),
        }
    }
    (shared, unshared)
}

/// Page-table bytes one process pays for its mappings of a region, given the slots whose
/// tables it shares.
///
/// - hugetlb: a shared slot costs nothing of its own (it links a PMD page someone else
///   owns); every other 1 GiB virtual range its mappings touch costs a PMD page (4 KiB).
/// - thp: one PMD page per 1 GiB virtual range touched.
/// - shmem: a PTE page (4 KiB) per 2 MiB plus the PMD pages.
pub fn pt_bytes(store: Store, vmas: &[RegionVma], shared: &[u32]) -> u64 {
    if store == Store::Shmem {
        return vmas
            .iter()
            .map(|v| pt_bytes_4k(v.start, (v.end - v.start) as u64))
            .sum();
    }
    let mut gibs = BTreeSet::new();
    for v in vmas {
        gibs.extend(v.start as u64 / PUD_SIZE..(v.end as u64).div_ceil(PUD_SIZE));
    }
    for &slot in shared {
        // A shared slot is one whole, congruent VMA range: its virtual GiB.
        if let Some(v) = vmas.iter().find(|v| {
            let lo = slot as u64 * PUD_SIZE;
            v.offset <= lo && lo < v.offset + (v.end - v.start) as u64
        }) {
            gibs.remove(&((v.start as u64 + (slot as u64 * PUD_SIZE - v.offset)) / PUD_SIZE));
        }
    }
    4096 * gibs.len() as u64
}

/// Page-table bytes of a 4 KiB-page mapping: 8 bytes per page plus its PMD pages.
pub fn pt_bytes_4k(start: usize, len: u64) -> u64 {
    let start = start as u64;
    let gibs = ((start + len).div_ceil(PUD_SIZE)).saturating_sub(start / PUD_SIZE);
    len.div_ceil(4096) * 8 + 4096 * gibs
}

/// Builds the report.
pub fn report(core: &Core) -> Report {
    let tree = core.tree();
    let me = std::process::id();
    let fuse_dev = core.fuse_dev.get().copied();
    let mut regions = Vec::new();
    let mut totals = Totals::default();
    // The files of each region: its backing and its msharefs file.
    let files_of = |ino: u64, store: Store| -> Vec<(u64, u64)> {
        let backing = core.backing_identity(store, ino);
        backing
            .into_iter()
            .chain(fuse_dev.map(|dev| (dev, ino)))
            .collect()
    };
    // One scan of /proc for all regions.
    let all: Vec<(u64, u64)> = tree
        .regions()
        .flat_map(|(n, r)| files_of(n.ino, r.store))
        .collect();
    let started = std::time::Instant::now();
    let scanned = procfs::mappers_of(&all);
    if let Ok(m) = &scanned {
        // The shrinker's registry learns from this scan too (`attachers.rs`).
        let hugetlb: HashMap<(u64, u64), u64> = tree
            .regions()
            .filter(|(_, r)| r.store == Store::Hugetlb)
            .filter_map(|(n, _)| {
                core.backing_identity(Store::Hugetlb, n.ino)
                    .map(|id| (id, n.ino))
            })
            .collect();
        let scope: Vec<u64> = hugetlb.values().copied().collect();
        let seen = crate::attachers::seen_in(&m.found, &hugetlb);
        let read = |pid: u32| !m.unreadable.contains(&pid);
        core.attachers.reconcile(started, &scope, read, true, &seen);
    }
    let mappers = scanned.map(|m| m.found).unwrap_or_default();
    // The flags of the daemon's own host mappings, by (backing file, slot, writable): what
    // an attacher's mapping must match to share the host's tables.
    let mut host_flags: HashMap<((u64, u64), u32, bool), Vec<String>> = HashMap::new();
    for h in procfs::smaps_vmas(me, |v| all.contains(&(v.dev, v.ino))).unwrap_or_default() {
        let rv = RegionVma::from_smaps(&h.vma, &h.vm_flags);
        let slot = (h.vma.offset / PUD_SIZE) as u32;
        host_flags.insert(((h.vma.dev, h.vma.ino), slot, rv.writable()), rv.flags);
    }
    for (node, r) in tree.regions() {
        if node.orphan {
            continue;
        }
        let files = files_of(node.ino, r.store);
        let backing = core.backing_identity(r.store, node.ino);
        let mut attached = Vec::new();
        let (mut pt, mut pt4k) = (0, 0);
        for m in mappers.iter().filter(|m| m.pid != me) {
            let mine = |v: &MapsEntry| files.contains(&(v.dev, v.ino));
            if !m.vmas.iter().any(mine) {
                continue;
            }
            // VmFlags for the sharing conditions; a process that exits meanwhile is gone.
            let Ok(smaps) = procfs::smaps_vmas(m.pid, mine) else {
                continue;
            };
            let vmas: Vec<RegionVma> = smaps
                .iter()
                .map(|s| RegionVma::from_smaps(&s.vma, &s.vm_flags))
                .collect();
            let host = |slot: u32, writable: bool| {
                backing
                    .and_then(|b| host_flags.get(&(b, slot, writable)))
                    .map(Vec::as_slice)
            };
            let (shared, unshared) = slot_sharing(r.store, r.size, &vmas, host);
            pt += pt_bytes(r.store, &vmas, &shared);
            pt4k += vmas
                .iter()
                .map(|v| pt_bytes_4k(v.start, (v.end - v.start) as u64))
                .sum::<u64>();
            attached.push(Attached {
                pid: m.pid,
                comm: m.comm.clone(),
                sharing: unshared.is_empty(),
                unshared,
            });
        }
        let host = core.hostmm.stats(node.ino);
        let row = RegionReport {
            path: tree.path_of(node.ino),
            backing: r.store,
            size: r.size,
            cgroup: r.cgroup.as_ref().map(|p| p.display().to_string()),
            objects: r.objects.len(),
            open_handles: core.open_count(node.ino),
            attached,
            tables_cached: host.sets.iter().map(|s| s.to_string()).collect(),
            slots: host.slots,
            rw_slots_cached: host.rw_slots_cached,
            ro_slots_cached: host.ro_slots_cached,
            populated: host.populated,
            pt_bytes: pt,
            pt_bytes_4k_equivalent: pt4k,
            saving_bytes: pt4k.saturating_sub(pt),
        };
        totals.regions += 1;
        totals.size += row.size;
        totals.attached += row.attached.len();
        totals.sharing += row.attached.iter().filter(|a| a.sharing).count();
        totals.pt_bytes += row.pt_bytes;
        totals.pt_bytes_4k_equivalent += row.pt_bytes_4k_equivalent;
        totals.saving_bytes += row.saving_bytes;
        totals.pool_pages_added += r.pool_pages;
        regions.push(row);
    }
    totals.tables_cached_bytes = core.hostmm.cached_bytes();
    let quota = QuotaReport {
        limit_bytes: core.user_quota,
        users: core
            .usage()
            .into_iter()
            .map(|(uid, used_bytes)| UserUsage { uid, used_bytes })
            .collect(),
    };
    Report {
        regions,
        totals,
        quota,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const G: u64 = PUD_SIZE;

    fn vma(start: u64, len: u64, offset: u64, flags: &str) -> RegionVma {
        RegionVma {
            start: start as usize,
            end: (start + len) as usize,
            offset,
            flags: flags.split_whitespace().map(str::to_string).collect(),
        }
    }

    const RW: &str = "rd wr sh mr mw me ms de ht sd";

    #[test]
    fn page_table_geometry() {
        let host: Vec<String> = RW.split_whitespace().map(str::to_string).collect();
        let h = |_: u32, _: bool| Some(host.as_slice());
        // Aligned, whole GiBs: every slot shares, no tables of its own.
        let v = [vma(G, 4 * G, 0, RW)];
        let (s, u) = slot_sharing(Store::Hugetlb, 4 * G, &v, h);
        assert_eq!((s.len(), u.len()), (4, 0));
        assert_eq!(pt_bytes(Store::Hugetlb, &v, &s), 0);
        // A partial last GiB: one private PMD page.
        let v = [vma(G, G + (2 << 20), 0, RW)];
        let (s, u) = slot_sharing(Store::Hugetlb, G + (2 << 20), &v, h);
        assert_eq!((s, u.len()), (vec![0], 1));
        assert!(u[0].reason.starts_with("partial GiB"), "{u:?}");
        assert_eq!(pt_bytes(Store::Hugetlb, &v, &[0]), 4096);
        // Shifted by 2 MiB: nothing shares, three virtual GiBs touched.
        let v = [vma(G + (2 << 20), 2 * G, 0, RW)];
        let (s, u) = slot_sharing(Store::Hugetlb, 2 * G, &v, h);
        assert!(s.is_empty());
        assert!(u[0].reason.starts_with("not 1 GiB-congruent"), "{u:?}");
        assert_eq!(pt_bytes(Store::Hugetlb, &v, &s), 3 * 4096);
        assert_eq!(pt_bytes(Store::Thp, &[vma(G, 2 * G, 0, RW)], &[]), 2 * 4096);
        // 4 KiB pages: 2 MiB of PTEs per GiB plus one PMD page.
        assert_eq!(pt_bytes_4k(G as usize, G), (2 << 20) + 4096);
        assert_eq!(
            pt_bytes(Store::Shmem, &[vma(G, G, 0, RW)], &[]),
            (2 << 20) + 4096
        );
    }

    fn sample() -> Report {
        Report {
            regions: vec![RegionReport {
                path: "/sga".into(),
                backing: Store::Hugetlb,
                size: 8 * G,
                cgroup: Some("/sys/fs/cgroup/unified/db".into()),
                objects: 0,
                open_handles: 1,
                attached: vec![Attached {
                    pid: 4242,
                    comm: "postgres".into(),
                    sharing: false,
                    unshared: vec![Unshared {
                        slot: 3,
                        reason: "mapped in part".into(),
                    }],
                }],
                tables_cached: vec!["rw".into()],
                slots: 8,
                rw_slots_cached: 8,
                ro_slots_cached: 0,
                populated: 8 * G,
                pt_bytes: 4096,
                pt_bytes_4k_equivalent: 16809984,
                saving_bytes: 16805888,
            }],
            totals: Totals {
                regions: 1,
                attached: 1,
                ..Totals::default()
            },
            quota: QuotaReport {
                limit_bytes: None,
                users: vec![UserUsage {
                    uid: 0,
                    used_bytes: 8 * G,
                }],
            },
        }
    }

    #[test]
    fn the_report_reads_back_as_sent() {
        let r = sample();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(Report::from_reply(&json), Ok(r));
        // The README's schema: field names and the backing as a lowercase word.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["regions"][0]["backing"], "hugetlb");
        assert_eq!(v["regions"][0]["attached"][0]["unshared"][0]["slot"], 3);
        assert_eq!(v["totals"]["sharing"], 0);
        assert_eq!(v["quota"]["limit_bytes"], serde_json::Value::Null);
    }

    #[test]
    fn a_renamed_field_is_an_error_not_a_zero() {
        let json = serde_json::to_string(&sample())
            .unwrap()
            .replace("\"pt_bytes\":", "\"pt_bytes_used\":");
        let e = Report::from_reply(&json).unwrap_err();
        assert!(e.contains("missing field `pt_bytes`"), "{e}");
        // Optional values too: `null` is a value, a missing field is an error.
        for (field, renamed) in [("limit_bytes", "limit"), ("cgroup", "cg")] {
            let json = serde_json::to_string(&sample())
                .unwrap()
                .replace(&format!("\"{field}\":"), &format!("\"{renamed}\":"));
            let e = Report::from_reply(&json).unwrap_err();
            assert!(e.contains(&format!("missing field `{field}`")), "{e}");
        }
        assert_eq!(
            Report::from_reply(r#"{"error":"permission denied: msharefs stat needs root"}"#),
            Err("permission denied: msharefs stat needs root".into())
        );
        assert!(Report::from_reply("").is_err());
    }

    #[test]
    fn each_kernel_condition_has_its_reason() {
        let host: Vec<String> = RW.split_whitespace().map(str::to_string).collect();
        let h = |_: u32, _: bool| Some(host.as_slice());
        let reason = |v: &[RegionVma]| {
            let (_, u) = slot_sharing(Store::Hugetlb, 2 * G, v, h);
            u.iter()
                .map(|u| (u.slot, u.reason.clone()))
                .collect::<Vec<_>>()
        };
        // mprotect of one 2 MiB page in slot 1: slot 1 is split, slot 0 still shares.
        let m = 2 << 20;
        let split = [
            vma(G, G + m, 0, RW),
            vma(2 * G + m, m, G + m, "rd sh mr mw me ms de ht sd"),
            vma(2 * G + 2 * m, G - 2 * m, G + 2 * m, RW),
        ];
        let r = reason(&split);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, 1);
        assert!(r[0].1.starts_with("mapped in part: 3 VMAs"), "{r:?}");
        // mlock: ignored by the kernel's comparison.
        assert!(reason(&[vma(G, 2 * G, 0, &format!("{RW} lo"))]).is_empty());
        // userfaultfd.
        let r = reason(&[vma(G, 2 * G, 0, &format!("{RW} uw"))]);
        assert!(r[0].1.contains("write-protect"), "{r:?}");
        let r = reason(&[vma(G, 2 * G, 0, &format!("{RW} ui"))]);
        assert!(r[0].1.contains("minor"), "{r:?}");
        // Protection and other flags.
        let r = reason(&[vma(G, 2 * G, 0, "rd sh mr mw me ms de ht sd")]);
        assert!(r[0].1.contains("protection r--"), "{r:?}");
        let r = reason(&[vma(G, 2 * G, 0, &format!("{RW} dd"))]);
        assert!(r[0].1.contains("extra [dd]"), "{r:?}");
        // thp and shmem never share.
        let (_, u) = slot_sharing(Store::Thp, G, &[vma(G, G, 0, RW)], h);
        assert!(u[0].reason.contains("hugetlb mappings only"), "{u:?}");
    }
}
