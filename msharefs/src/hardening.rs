//! Privilege reduction once the daemon is set up: every thread drops the capabilities the
//! daemon does not use, from its effective, permitted, inheritable, ambient and bounding
//! sets, and sets `no_new_privs`.
//!
//! The daemon keeps uid 0 (its state directory, backing stores and pool lock are root's),
//! and only the capabilities below, each measured as needed by taking it away (see
//! `docs/RELIABILITY.md`, "Capabilities"). This module owns that list and nothing else; the
//! per-thread mechanics are `kernel_glue::caps`.

use std::time::Duration;

use kernel_glue::caps::{self, CapSet};

/// The capabilities the running daemon keeps, with the reason for each. Not kept, because
/// nothing needs them once the mounts exist: all others, among them `CAP_DAC_READ_SEARCH` (covered by
/// `CAP_DAC_OVERRIDE`, and it would allow `open_by_handle_at(2)`), `CAP_SETPCAP` (dropped
/// last), `CAP_KILL`, `CAP_SETUID`, `CAP_NET_*`, `CAP_SYS_MODULE`, `CAP_IPC_LOCK`. Writing
/// `/proc/sys/vm/nr_hugepages` needs no capability (uid 0 owns it).
pub const KEPT: [(u32, &str); 5] = [
    (
        caps::CAP_SYS_ADMIN,
        "FUSE_DEV_IOC_BACKING_OPEN/CLOSE (passthrough of thp and shmem regions, on every \
         first open) and unmounting the FUSE mount at shutdown",
    ),
    (
        caps::CAP_DAC_OVERRIDE,
        "opening backing files, which carry their region's owner and mode (e.g. a 0400 \
         region of another user), read-write",
    ),
    (
        caps::CAP_FOWNER,
        "chmod of backing files owned by the region's owner (mirroring chmod)",
    ),
    (
        caps::CAP_CHOWN,
        "chown of backing files to the region's owner (new regions, mirroring chown)",
    ),
    (
        caps::CAP_SYS_PTRACE,
        "reading /proc/PID/maps of attachers that hold capabilities the daemon dropped \
         (any root process): the proof of a System V attachment, and attach accounting \
         (CAP_SYS_ADMIN suffices only for processes whose capabilities are a subset of \
         the daemon's)",
    ),
];

/// How long the threads have to comply.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The set [`KEPT`] names.
pub fn kept() -> CapSet {
    CapSet::of(&KEPT.map(|(c, _)| c))
}

/// Drops every capability not in [`KEPT`] in every thread of the daemon. Called once the
/// FUSE session runs and the backing stores are mounted. A failure is logged: the daemon
/// keeps working with the capabilities it has.
pub fn drop_capabilities() {
    match caps::restrict_process(kept(), TIMEOUT) {
        Ok((sets, threads)) => log::info!(
            "capabilities of all {threads} threads reduced to {}",
            sets.effective.names().join(",")
        ),
        Err(e) => log::warn!("cannot drop capabilities: {e}"),
    }
}
