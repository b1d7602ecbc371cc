//! Charging region memory to its owner: the cgroups of the process that sets a region's
//! size pay for the region's memory, for every backing (memory controller for tmpfs,
//! hugetlb controller for huge pages), on cgroup v1 and v2.
//!
//! The kernel charges a page to the cgroup of the task that allocates it (and a huge
//! page's reservation to the task that reserves it), and the charge stays with the page
//! whoever maps it later. So the daemon allocates a region's memory in a short-lived child
//! that joins the requester's cgroups first (`kernel_glue::cgroup::fallocate_in`); its
//! own host mappings then fault pages that exist and charge nothing.
//!
//! A size the requester's cgroups cannot hold is refused before anything is allocated
//! (`ENOMEM`): past a memory limit the kernel would invoke the cgroup's OOM killer, which
//! picks the largest member, likely the database that asked.

use std::path::PathBuf;

use kernel_glue::cgroup::{self, Membership};
use kernel_glue::errnos::ENOMEM;

use crate::fs::FsResult;
use crate::state::Store;

/// Where a region's memory is charged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charge {
    /// Every cgroup directory the allocating child joins (the requester's v2 cgroup and
    /// its v1 memory and hugetlb cgroups).
    pub join: Vec<PathBuf>,
    /// The cgroup whose controller charges this backing (`hugetlb` for hugetlb regions,
    /// `memory` otherwise), as reported by `msharefs stat`; `None` when no such
    /// controller accounts for the requester.
    pub shown: Option<PathBuf>,
}

/// The controller that charges a backing's pages.
pub fn controller(store: Store) -> &'static str {
    match store {
        Store::Hugetlb => "hugetlb",
        Store::Thp | Store::Shmem => "memory",
    }
}

/// The charge for `size` bytes of a `store` region sized by process `pid`.
///
/// # Errors
/// `ENOMEM` when a cgroup of the requester (or an ancestor) has less room than `size`
/// under the backing's controller.
pub fn for_request(pid: u32, store: Store, size: u64) -> FsResult<Charge> {
    let members: Vec<Membership> = match cgroup::memberships(pid) {
        Ok(m) => m,
        Err(e) => {
            // Without the requester's cgroups the daemon's own pay, as before.
            log::warn!("cgroups of pid {pid} unknown ({e}): region memory charged to msharefs");
            return Ok(Charge::default());
        }
    };
    let ctl = controller(store);
    for m in members.iter().filter(|m| m.has(ctl)) {
        if let Some(room) = cgroup::headroom(m, ctl) {
            if size > room {
                log::info!(
                    "size {size} refused: the {ctl} cgroup {} of pid {pid} has room for {room}",
                    m.dir.display()
                );
                return Err(ENOMEM);
            }
        }
    }
    Ok(Charge {
        shown: members.iter().find(|m| m.has(ctl)).map(|m| m.dir.clone()),
        join: members.into_iter().map(|m| m.dir).collect(),
    })
}
