//! Capabilities: `capget(2)`/`capset(2)`, the bounding and ambient sets, `no_new_privs`,
//! `/proc` capability reports, and dropping capabilities in *every* thread of the process.
//!
//! Linux keeps capabilities per thread: `capset(2)`, `PR_CAPBSET_DROP` and
//! `PR_SET_NO_NEW_PRIVS` change the calling thread only, and a thread created later copies
//! its creator. A daemon that drops privileges after it has started worker threads must
//! therefore make every thread drop them itself. [`restrict_process`] does what glibc does
//! for `setuid(2)`: it signals each thread (a real-time signal whose handler makes only raw
//! system calls) and then checks `/proc/self/task/*/status` until every thread reports the
//! reduced sets.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::check_retval;

/// Capability numbers and names (`linux/capability.h`), in number order.
pub const NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// `CAP_CHOWN`: change file owners.
pub const CAP_CHOWN: u32 = 0;
/// `CAP_DAC_OVERRIDE`: bypass file read/write/search permission checks.
pub const CAP_DAC_OVERRIDE: u32 = 1;
/// `CAP_FOWNER`: act as the owner of any file (`chmod`, `utimes`, ...).
pub const CAP_FOWNER: u32 = 3;
/// `CAP_KILL`: signal any process.
pub const CAP_KILL: u32 = 5;
/// `CAP_SYS_PTRACE`: trace or inspect (`/proc/PID/maps`) any process.
pub const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_SYS_ADMIN`: mount, FUSE passthrough backing ids, and much more.
pub const CAP_SYS_ADMIN: u32 = 21;

/// A set of capabilities as a bit mask (bit N is capability N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CapSet(pub u64);

impl CapSet {
    /// The empty set.
    pub const EMPTY: CapSet = CapSet(0);

    /// The set of `caps`.
    pub fn of(caps: &[u32]) -> CapSet {
        CapSet(
            caps.iter()
                .fold(0, |m, &c| m | 1u64.checked_shl(c).unwrap_or(0)),
        )
    }

    /// Whether `cap` is in the set.
    pub fn contains(self, cap: u32) -> bool {
        self.0 & 1u64.checked_shl(cap).unwrap_or(0) != 0
    }

    /// Whether every capability of `self` is in `other`.
    pub fn is_subset(self, other: CapSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Names of the capabilities in the set (`cap_N` for numbers this crate does not know).
    pub fn names(self) -> Vec<String> {
        (0..64)
            .filter(|&c| self.contains(c))
            .map(|c| match NAMES.get(c as usize) {
                Some(n) => format!("cap_{n}"),
                None => format!("cap_{c}"),
            })
            .collect()
    }
}

/// The capability sets of the calling thread (`capget(2)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCaps {
    /// Effective set.
    pub effective: CapSet,
    /// Permitted set.
    pub permitted: CapSet,
    /// Inheritable set.
    pub inheritable: CapSet,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `capget(2)` for the calling thread without allocation (usable in a signal handler):
/// returns 0 or the errno.
fn capget_raw(out: &mut [CapData; 2]) -> i32 {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: capget reads the header and writes two CapData structs (version 3), both
    // valid for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            out.as_mut_ptr(),
        )
    };
    if r == -1 { last_errno() } else { 0 }
}

/// `capset(2)` for the calling thread without allocation: returns 0 or the errno.
fn capset_raw(data: &[CapData; 2]) -> i32 {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads the header and two CapData structs, valid during the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r == -1 { last_errno() } else { 0 }
}

fn last_errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

fn split(set: CapSet) -> (u32, u32) {
    (set.0 as u32, (set.0 >> 32) as u32)
}

fn join(lo: u32, hi: u32) -> CapSet {
    CapSet(lo as u64 | (hi as u64) << 32)
}

/// Safe wrapper for `capget(2)` of the calling thread.
///
/// # Errors
/// The kernel's errno.
pub fn capget() -> io::Result<ThreadCaps> {
    let mut d = [CapData::default(); 2];
    match capget_raw(&mut d) {
        0 => Ok(ThreadCaps {
            effective: join(d[0].effective, d[1].effective),
            permitted: join(d[0].permitted, d[1].permitted),
            inheritable: join(d[0].inheritable, d[1].inheritable),
        }),
        e => Err(crate::errno(e)),
    }
}

/// The highest capability number the running kernel knows (`/proc/sys/kernel/cap_last_cap`).
///
/// # Errors
/// Reading the file; `EIO` when it does not parse.
pub fn last_cap() -> io::Result<u32> {
    let s = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?;
    s.trim()
        .parse::<u32>()
        .map(|c| c.min(63))
        .map_err(|_| crate::errno(libc::EIO))
}

/// The capability lines of `/proc/PID/status` (or of one thread of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCaps {
    /// `CapInh`.
    pub inheritable: CapSet,
    /// `CapPrm`.
    pub permitted: CapSet,
    /// `CapEff`.
    pub effective: CapSet,
    /// `CapBnd`.
    pub bounding: CapSet,
    /// `CapAmb`.
    pub ambient: CapSet,
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
}

impl StatusCaps {
    /// Parses the text of a `status` file.
    ///
    /// # Errors
    /// `EIO` when a capability line is missing or malformed.
    pub fn parse(text: &str) -> io::Result<StatusCaps> {
        let field = |name: &str| -> io::Result<CapSet> {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .ok_or_else(|| crate::errno(libc::EIO))?;
            u64::from_str_radix(v.trim(), 16)
                .map(CapSet)
                .map_err(|_| crate::errno(libc::EIO))
        };
        let no_new_privs = text
            .lines()
            .find_map(|l| l.strip_prefix("NoNewPrivs:"))
            .is_some_and(|v| v.trim() == "1");
        Ok(StatusCaps {
            inheritable: field("CapInh")?,
            permitted: field("CapPrm")?,
            effective: field("CapEff")?,
            bounding: field("CapBnd")?,
            ambient: field("CapAmb")?,
            no_new_privs,
        })
    }

    /// Whether these sets hold no more than `limit`'s and carry `limit`'s restrictions
    /// (empty inheritable and ambient sets, `no_new_privs` when `limit` has it).
    pub fn within(&self, limit: &StatusCaps) -> bool {
        self.effective.is_subset(limit.effective)
            && self.permitted.is_subset(limit.permitted)
            && self.bounding.is_subset(limit.bounding)
            && self.inheritable.is_subset(limit.inheritable)
            && self.ambient.is_subset(limit.ambient)
            && (self.no_new_privs || !limit.no_new_privs)
    }
}

/// Reads the capability lines of process `pid`, or of its thread `tid`.
///
/// # Errors
/// `ENOENT` for a gone process or thread; `EIO` for a malformed file.
pub fn status_caps(pid: u32, tid: Option<u32>) -> io::Result<StatusCaps> {
    let path = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    StatusCaps::parse(&std::fs::read_to_string(path)?)
}

/// The thread ids of process `pid` (`/proc/PID/task`).
///
/// # Errors
/// Reading the directory.
pub fn thread_ids(pid: u32) -> io::Result<Vec<u32>> {
    let mut v: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Capabilities every thread keeps, for the signal handler.
static KEEP: AtomicU64 = AtomicU64::new(0);
/// Highest capability number of the kernel, for the signal handler.
static LAST_CAP: AtomicU64 = AtomicU64::new(0);
/// First errno a thread met while restricting itself (0: none).
static FAILED: AtomicI32 = AtomicI32::new(0);
/// One [`restrict_process`] at a time.
static RESTRICTING: Mutex<()> = Mutex::new(());

/// Restricts the calling thread to `keep`, using raw system calls only (it runs in signal
/// handlers): drops every other capability from the bounding set (while `CAP_SETPCAP` is
/// still effective), clears the ambient set, sets `no_new_privs`, then sets the effective
/// and permitted sets to `keep` (as far as they hold it) and the inheritable set to empty.
/// Returns 0 or the first errno.
fn restrict_thread_raw(keep: u64, last_cap: u64) -> i32 {
    for cap in 0..=last_cap {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_READ/DROP take a capability number; thread-local effect.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong) };
        if present == 1 {
            // SAFETY: as above.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) } == -1 {
                return last_errno();
            }
        }
    }
    // SAFETY: clears this thread's ambient set; unsupported (EINVAL) on kernels before
    // 4.3, which have no ambient set to clear.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r == -1 && last_errno() != libc::EINVAL {
        return last_errno();
    }
    // SAFETY: sets a flag of this thread; the extra arguments must be zero.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r == -1 {
        return last_errno();
    }
    let mut d = [CapData::default(); 2];
    let e = capget_raw(&mut d);
    if e != 0 {
        return e;
    }
    let (lo, hi) = split(CapSet(keep));
    for (w, mask) in d.iter_mut().zip([lo, hi]) {
        w.permitted &= mask;
        w.effective = w.permitted;
        w.inheritable = 0;
    }
    capset_raw(&d)
}

extern "C" fn restrict_handler(_sig: libc::c_int) {
    // The interrupted code may look at errno after we return.
    let saved = last_errno();
    let e = restrict_thread_raw(KEEP.load(Ordering::SeqCst), LAST_CAP.load(Ordering::SeqCst));
    if e != 0 {
        let _ = FAILED.compare_exchange(0, e, Ordering::SeqCst, Ordering::SeqCst);
    }
    crate::shim_sys::set_errno(saved);
}

/// The signal [`restrict_process`] uses: a real-time signal above glibc's own.
fn restrict_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

fn set_disposition(sig: libc::c_int, handler: libc::sighandler_t) -> io::Result<()> {
    // SAFETY: zero is a valid sigaction (empty mask, no flags) before we fill it in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler;
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: sa.sa_mask is a valid sigset_t to initialise.
    check_retval(unsafe { libc::sigemptyset(&mut sa.sa_mask) })?;
    // SAFETY: `sa` is fully initialised; the handler (when not SIG_IGN) only makes raw
    // system calls and touches atomics, which is async-signal-safe.
    check_retval(unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) })?;
    Ok(())
}

fn tgkill(pid: u32, tid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: tgkill sends a signal to one thread of our own thread group.
    check_retval(unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            pid as libc::c_long,
            tid as libc::c_long,
            sig as libc::c_long,
        )
    })?;
    Ok(())
}

fn gettid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Restricts **every thread** of this process to the capabilities in `keep`: their
/// effective and permitted sets become `keep` (as far as they had it), their bounding sets
/// lose everything else, their inheritable and ambient sets become empty, and
/// `no_new_privs` is set. Threads created afterwards inherit the result.
///
/// The calling thread restricts itself first (it needs `CAP_SETPCAP` for the bounding set
/// unless `keep` holds it); every other thread is sent a real-time signal whose handler does
/// the same with raw system calls, until `/proc/self/task/*/status` shows every thread
/// within the calling thread's sets or `timeout` passes. The signal is ignored afterwards.
/// Interrupted system calls restart (`SA_RESTART`).
///
/// Returns the sets every thread now has (those of the calling thread) and the number of
/// threads checked.
///
/// # Errors
/// The first errno a thread met; `ETIMEDOUT` when some thread did not comply in time
/// (e.g. it blocks the signal).
pub fn restrict_process(keep: CapSet, timeout: Duration) -> io::Result<(StatusCaps, usize)> {
    let _one = RESTRICTING.lock().unwrap_or_else(|p| p.into_inner());
    let last = last_cap()? as u64;
    KEEP.store(keep.0, Ordering::SeqCst);
    LAST_CAP.store(last, Ordering::SeqCst);
    FAILED.store(0, Ordering::SeqCst);
    let e = restrict_thread_raw(keep.0, last);
    if e != 0 {
        return Err(crate::errno(e));
    }
    let pid = std::process::id();
    let me = gettid();
    let target = status_caps(pid, Some(me))?;
    let sig = restrict_signal();
    set_disposition(sig, restrict_handler as *const () as libc::sighandler_t)?;
    let deadline = Instant::now() + timeout;
    let result = loop {
        let e = FAILED.load(Ordering::SeqCst);
        if e != 0 {
            break Err(crate::errno(e));
        }
        let tids = thread_ids(pid)?;
        let mut pending = 0;
        for &tid in &tids {
            match status_caps(pid, Some(tid)) {
                Ok(s) if s.within(&target) => {}
                Ok(_) => {
                    pending += 1;
                    if tid != me {
                        // ESRCH: the thread ended meanwhile.
                        let _ = tgkill(pid, tid, sig);
                    }
                }
                // The thread ended meanwhile.
                Err(_) => {}
            }
        }
        if pending == 0 {
            break Ok((target, tids.len()));
        }
        if Instant::now() >= deadline {
            break Err(crate::errno(libc::ETIMEDOUT));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // Signals still queued for a thread that already complied are discarded.
    set_disposition(sig, libc::SIG_IGN)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_and_names() {
        let s = CapSet::of(&[CAP_CHOWN, CAP_SYS_ADMIN]);
        assert_eq!(s.0, 1 | 1 << 21);
        assert!(s.contains(CAP_SYS_ADMIN) && !s.contains(CAP_KILL));
        assert_eq!(s.names(), vec!["cap_chown", "cap_sys_admin"]);
        assert!(CapSet::of(&[CAP_CHOWN]).is_subset(s));
        assert!(!s.is_subset(CapSet::of(&[CAP_CHOWN])));
        assert_eq!(NAMES[CAP_SYS_PTRACE as usize], "sys_ptrace");
        assert_eq!(NAMES[40], "checkpoint_restore");
        assert_eq!(CapSet::of(&[70]), CapSet::EMPTY);
    }

    #[test]
    fn parses_status() {
        let text = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000200009\n\
                    CapEff:\t0000000000200009\nCapBnd:\t000001ffffffffff\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        let s = StatusCaps::parse(text).unwrap();
        assert_eq!(s.effective, CapSet::of(&[0, 3, 21]));
        assert_eq!(s.bounding.0, 0x1ff_ffff_ffff);
        assert!(s.no_new_privs);
        assert!(s.within(&s));
        let mut more = s;
        more.effective = CapSet(u64::MAX);
        assert!(!more.within(&s));
        assert!(StatusCaps::parse("Name:\tx\n").is_err());
    }

    #[test]
    fn reads_own_sets() {
        let own = status_caps(std::process::id(), None).unwrap();
        let caps = capget().unwrap();
        assert_eq!(own.effective, caps.effective);
        assert!(!thread_ids(std::process::id()).unwrap().is_empty());
        assert!(last_cap().unwrap() >= 36);
    }
}
