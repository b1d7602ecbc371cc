//! The `msharefs stat` report: regions, attached processes, cached table sets, the
//! page-table bytes attachers use against what 4 KiB pages would cost them, and each
//! owner's use of the per-user quota.
//!
//! Attached processes come from the kernel: every process whose `/proc/PID/maps` has a
//! mapping of the region's backing file or of its msharefs file (passthrough mappings show
//! the msharefs file). Page-table bytes are computed from those mappings with the x86-64
//! page-table geometry (see `pt_bytes`), because the kernel reports page tables per
//! process (`VmPTE`), not per mapping.

use serde::Serialize;

use kernel_glue::PUD_SIZE;
use kernel_glue::procfs;

use crate::fs::Core;
use crate::state::Store;

/// One attached process.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attached {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub comm: String,
}

/// One region's row.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    /// Path inside the mount.
    pub path: String,
    /// `hugetlb`, `thp` or `shmem`.
    pub backing: &'static str,
    /// Size in bytes (0 while unset).
    pub size: u64,
    /// Objects created by ioctl.
    pub objects: usize,
    /// Open msharefs handles.
    pub open_handles: u32,
    /// Processes that map the region (the daemon itself excluded).
    pub attached: Vec<Attached>,
    /// Host table sets cached for every slot (`rw`, `ro`).
    pub tables_cached: Vec<&'static str>,
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
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Regions.
    pub regions: usize,
    /// Sum of region sizes.
    pub size: u64,
    /// Attached processes, counted per region.
    pub attached: usize,
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
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserUsage {
    /// Owner uid.
    pub uid: u32,
    /// Sizes of its regions (unlinked-but-open ones included) plus sizes being reserved.
    pub used_bytes: u64,
}

/// The per-user quota (`--user-quota`) and what each owner of a region uses of it.
#[derive(Debug, Clone, Serialize)]
pub struct QuotaReport {
    /// Bytes each non-root owner may hold; `null`: no limit. Root is exempt.
    pub limit_bytes: Option<u64>,
    /// Every uid that owns a region, in uid order (root included, for information).
    pub users: Vec<UserUsage>,
}

/// The whole report (`msharefs stat --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Regions, in inode order.
    pub regions: Vec<RegionReport>,
    /// Totals.
    pub totals: Totals,
    /// The per-user quota and its use.
    pub quota: QuotaReport,
}

/// Page-table bytes one process pays for a mapping of `len` bytes starting at `start`.
///
/// - hugetlb at a 1 GiB-aligned start: every whole GiB links a shared PMD page (0 bytes of
///   its own); a partial last GiB needs a private PMD page (4 KiB).
/// - hugetlb elsewhere, and thp: one PMD page (4 KiB) per GiB touched.
/// - shmem: a PTE page (4 KiB) per 2 MiB plus the PMD pages.
pub fn pt_bytes(store: Store, start: usize, len: u64) -> u64 {
    let gibs = |s: u64, l: u64| ((s + l).div_ceil(PUD_SIZE)).saturating_sub(s / PUD_SIZE);
    let start = start as u64;
    match store {
        Store::Hugetlb if start % PUD_SIZE == 0 => {
            if len % PUD_SIZE == 0 {
                0
            } else {
                4096
            }
        }
        Store::Hugetlb | Store::Thp => 4096 * gibs(start, len),
        Store::Shmem => pt_bytes_4k(start as usize, len),
    }
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
    let mappers = procfs::mappers_of(&all).unwrap_or_default();
    for (node, r) in tree.regions() {
        if node.orphan {
            continue;
        }
        let files = files_of(node.ino, r.store);
        let mut attached = Vec::new();
        let (mut pt, mut pt4k) = (0, 0);
        for m in mappers.iter().filter(|m| m.pid != me) {
            let mut maps_it = false;
            for v in m.vmas.iter().filter(|v| files.contains(&(v.dev, v.ino))) {
                let len = (v.end - v.start) as u64;
                pt += pt_bytes(r.store, v.start, len);
                pt4k += pt_bytes_4k(v.start, len);
                maps_it = true;
            }
            if maps_it {
                attached.push(Attached {
                    pid: m.pid,
                    comm: m.comm.clone(),
                });
            }
        }
        let host = core.hostmm.stats(node.ino);
        let row = RegionReport {
            path: tree.path_of(node.ino),
            backing: r.store.name(),
            size: r.size,
            objects: r.objects.len(),
            open_handles: core.open_count(node.ino),
            attached,
            tables_cached: host.sets,
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

    #[test]
    fn page_table_geometry() {
        assert_eq!(pt_bytes(Store::Hugetlb, G as usize, 4 * G), 0);
        assert_eq!(pt_bytes(Store::Hugetlb, G as usize, G + (2 << 20)), 4096);
        assert_eq!(
            pt_bytes(Store::Hugetlb, (G + (2 << 20)) as usize, 2 * G),
            3 * 4096
        );
        assert_eq!(pt_bytes(Store::Thp, G as usize, 2 * G), 2 * 4096);
        // 4 KiB pages: 2 MiB of PTEs per GiB plus one PMD page.
        assert_eq!(pt_bytes_4k(G as usize, G), (2 << 20) + 4096);
        assert_eq!(pt_bytes(Store::Shmem, G as usize, G), (2 << 20) + 4096);
    }
}
