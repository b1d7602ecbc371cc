//! The shrinker: once a second, refreshes from the kernel which processes map which slots
//! of each region (`/proc/PID/maps` entries of the backing file; open msharefs handles
//! count as attached to every slot), then releases cached host slots nobody is attached
//! to, least recently used first, while the cached tables exceed the table budget, or all
//! of them when memory pressure (PSI) passes its threshold. The choice is the model's
//! (`tablecache::TableCache::victims`). Releasing a slot unmaps the daemon's host mapping:
//! the kernel frees the page table, the data stays in the backing file, and the next
//! attach builds it again.

use std::sync::Arc;
use std::time::Duration;

use kernel_glue::mapping::Protection;
use kernel_glue::{PUD_SIZE, procfs};

use crate::fs::Core;
use crate::state::Store;
use crate::tablecache::{Policy, slots_of};

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

/// Who maps which slots of a region, from the kernel's `mappers` of the backing files:
/// `(pid, protection, slots)`.
fn observed_attachments(
    core: &Core,
    mappers: &[procfs::Mapper],
    ino: u64,
    size: u64,
) -> Vec<(u32, Protection, std::ops::Range<u32>)> {
    let me = std::process::id();
    let mut out = Vec::new();
    if let Some(id) = core.backing_identity(Store::Hugetlb, ino) {
        for m in mappers.iter().filter(|m| m.pid != me) {
            for v in &m.vmas {
                if (v.dev, v.ino) != id {
                    continue;
                }
                let prot = if v.perms.as_bytes().get(1) == Some(&b'w') {
                    Protection::ReadWrite
                } else {
                    Protection::ReadOnly
                };
                let first = (v.offset / PUD_SIZE) as u32;
                let last = (v.offset + (v.end - v.start) as u64).div_ceil(PUD_SIZE) as u32;
                out.push((m.pid, prot, first..last));
            }
        }
    }
    if core.open_count(ino) > 0 {
        // An open handle is about to attach: keep both sets of every slot.
        for prot in [Protection::ReadWrite, Protection::ReadOnly] {
            out.push((0, prot, 0..slots_of(size)));
        }
    }
    out
}

/// One pass of the shrinker over the live host mm.
pub fn shrink_once(core: &Core, policy: &Policy) {
    let regions = core.hostmm.cached_regions();
    if regions.is_empty() {
        return;
    }
    // One scan of /proc for all regions.
    let files: Vec<(u64, u64)> = regions
        .iter()
        .filter_map(|&(ino, _)| core.backing_identity(Store::Hugetlb, ino))
        .collect();
    let mappers = procfs::mappers_of(&files).unwrap_or_default();
    for (ino, size) in regions {
        let observed = observed_attachments(core, &mappers, ino, size);
        core.hostmm.set_attached(ino, &observed);
    }
    let pressure = procfs::memory_pressure().map_or(0.0, |p| p.some_avg10);
    core.hostmm.shrink(policy, pressure);
}
