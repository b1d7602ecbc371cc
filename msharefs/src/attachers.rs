//! Who is attached to which hugetlb region, as the shrinker needs to know it, learned
//! without reading `/proc` while nothing happens:
//!
//! - from the attach socket: each attach registers the requesting process
//!   ([`Attachers::register`], from `Core::attach_backing`) and opens a pidfd for it;
//! - of exits from the pidfds: one thread waits on all of them ([`spawn_watcher`], epoll)
//!   and forgets a process when its pidfd becomes readable (it exited);
//! - from `/proc/PID/maps`, rarely ([`Attachers::reconcile`], fed by the shrinker's scans
//!   and by each `msharefs stat`): each registration is checked once, [`SETTLE`] after it
//!   (the maps of that process only: one that was given a backing but did not map it is
//!   forgotten); a scan of every process adds the mappers the socket never saw (a process
//!   forked from an attacher, a root process mapping a backing file by hand); and a scan
//!   forgets registrations of processes that unmapped without exiting.
//!
//! The view may only be wrong towards "attached": a process is forgotten when it exited, or
//! when a scan that began at least [`SETTLE`] after its registration did not find it
//! mapping the region. What it does not know of yet (a fork child) the shrinker's scan
//! before a release finds (`shrinker.rs`).
//!
//! This module keeps the registry and nothing else: it does not read `/proc` itself and
//! never touches the host mappings.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kernel_glue::epoll::Epoll;
use kernel_glue::errnos::ESRCH;
use kernel_glue::mapping::Protection;
use kernel_glue::procfs::Mapper;
use kernel_glue::{PUD_SIZE, fd as kfd, process};

use crate::fs::Core;

/// A registration younger than this survives a scan that does not show it: the client
/// maps the backing after the daemon's answer, so a scan right after can miss it.
pub const SETTLE: Duration = Duration::from_secs(5);

/// One process's mapping of a region seen in `/proc`: `(pid, region inode, protection,
/// slots)`.
pub type Seen = (u32, u64, Protection, Range<u32>);

/// Slots of a region a process maps, with the protection of each mapping.
type Slots = Vec<(Protection, Range<u32>)>;

/// A region a process holds, with the slots and protections.
#[derive(Debug)]
struct Holding {
    slots: Slots,
    /// When the socket registered it or a scan first found it.
    since: Instant,
    /// A scan found it mapped (a registration is checked once, [`SETTLE`] after it).
    confirmed: bool,
}

/// A tracked process.
#[derive(Debug)]
struct Proc {
    /// Becomes readable when the process exits; `None` when none could be had (out of
    /// descriptors): such a process is forgotten only by a scan.
    pidfd: Option<OwnedFd>,
    /// Its epoll token: `pid | counter << 32`, unique, so a late event of a process that
    /// was already replaced by a new one with the same pid is ignored.
    token: u64,
    holds: HashMap<u64, Holding>,
}

impl Proc {
    /// Whether this entry's process has exited (so its pid may name another by now).
    fn exited(&self) -> bool {
        self.pidfd
            .as_ref()
            .is_some_and(|fd| kfd::readable(fd).unwrap_or(false))
    }
}

#[derive(Debug, Default)]
struct State {
    procs: HashMap<u32, Proc>,
    counter: u64,
    /// Start of the last scan of every process reconciled.
    last_full_scan: Option<Instant>,
}

/// The registry of attached processes.
#[derive(Debug)]
pub struct Attachers {
    state: Mutex<State>,
    /// Waits on every pidfd; `None` when it could not be created (exits are then learned
    /// from scans only).
    epoll: Option<Epoll>,
    /// Bumped on every change, so the shrinker can tell it has nothing new.
    version: AtomicU64,
}

impl Default for Attachers {
    fn default() -> Attachers {
        Attachers::new()
    }
}

impl Attachers {
    /// An empty registry.
    pub fn new() -> Attachers {
        let epoll = Epoll::new()
            .inspect_err(|e| log::warn!("no epoll ({e}): attachers' exits are seen late"))
            .ok();
        Attachers {
            state: Mutex::default(),
            epoll,
            version: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data, consistent after every operation: a panic elsewhere must not wedge it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.version.fetch_add(1, Ordering::Relaxed);
    }

    /// Bumped on every change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// A new entry for `pid`, watched through a pidfd.
    ///
    /// # Errors
    /// `ESRCH` when the process is gone; a process that exists but cannot be watched is
    /// tracked without a pidfd.
    fn track(&self, st: &mut State, pid: u32) -> io::Result<Proc> {
        st.counter += 1;
        let token = u64::from(pid) | st.counter << 32;
        let pidfd = match process::pidfd_open(pid) {
            Ok(fd) => match &self.epoll {
                Some(ep) => match ep.add(&fd, token) {
                    Ok(()) => Some(fd),
                    Err(e) => {
                        log::warn!("cannot watch process {pid} ({e}): its exit is seen late");
                        None
                    }
                },
                None => None,
            },
            Err(e) if e.raw_os_error() == Some(ESRCH) => return Err(e),
            Err(e) => {
                log::warn!("no pidfd for process {pid} ({e}): its exit is seen late");
                None
            }
        };
        Ok(Proc {
            pidfd,
            token,
            holds: HashMap::new(),
        })
    }

    /// The entry of `pid` to add a holding to: the existing one, or a new one when there is
    /// none or its process exited (the pid was reused). `None` when the process is gone.
    fn entry<'s>(&self, st: &'s mut State, pid: u32) -> Option<&'s mut Proc> {
        if st.procs.get(&pid).is_none_or(Proc::exited) {
            let p = self.track(st, pid).ok()?;
            st.procs.insert(pid, p);
        }
        st.procs.get_mut(&pid)
    }

    /// Process `pid` was given the backing of region `ino` to map `slots` of it with
    /// `prot` (the attach socket's view).
    pub fn register(&self, pid: u32, ino: u64, prot: Protection, slots: Range<u32>) {
        if !is_client(pid) {
            return;
        }
        let mut st = self.lock();
        let Some(p) = self.entry(&mut st, pid) else {
            // Gone already: nothing of it to keep.
            return;
        };
        let h = p.holds.entry(ino).or_insert_with(|| Holding {
            slots: Vec::new(),
            since: Instant::now(),
            confirmed: false,
        });
        h.since = Instant::now();
        h.confirmed = false;
        if !h.slots.contains(&(prot, slots.clone())) {
            h.slots.push((prot, slots));
        }
        drop(st);
        self.changed();
    }

    /// The pidfd with `token` became readable: its process exited.
    fn exited(&self, token: u64) {
        let pid = token as u32;
        let mut st = self.lock();
        if st.procs.get(&pid).is_some_and(|p| p.token == token) {
            // Dropping the pidfd takes it off the epoll list.
            st.procs.remove(&pid);
            drop(st);
            log::debug!("attacher {pid} exited");
            self.changed();
        }
    }

    /// Every registered mapping of region `ino`, as `(pid, protection, slots)`.
    pub fn observed(&self, ino: u64) -> Vec<(u32, Protection, Range<u32>)> {
        let st = self.lock();
        let mut out = Vec::new();
        for (&pid, p) in &st.procs {
            if let Some(h) = p.holds.get(&ino) {
                out.extend(h.slots.iter().map(|(prot, s)| (pid, *prot, s.clone())));
            }
        }
        out
    }

    /// The processes registered for any of the regions `inos`.
    pub fn holders(&self, inos: &[u64]) -> Vec<u32> {
        let st = self.lock();
        st.procs
            .iter()
            .filter(|(_, p)| inos.iter().any(|i| p.holds.contains_key(i)))
            .map(|(&pid, _)| pid)
            .collect()
    }

    /// The registrations due for their check (made at least [`SETTLE`] before `now` and not
    /// yet found mapped): their processes, and every region those hold.
    pub fn unconfirmed(&self, now: Instant) -> (Vec<u32>, Vec<u64>) {
        let st = self.lock();
        let mut pids = Vec::new();
        let mut inos = Vec::new();
        for (&pid, p) in &st.procs {
            if p.holds
                .values()
                .any(|h| !h.confirmed && h.since + SETTLE <= now)
            {
                pids.push(pid);
                inos.extend(p.holds.keys().copied());
            }
        }
        inos.sort_unstable();
        inos.dedup();
        (pids, inos)
    }

    /// Processes tracked, and how many of them through a pidfd.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        let watched = st.procs.values().filter(|p| p.pidfd.is_some()).count();
        (st.procs.len(), watched)
    }

    /// When the last scan of every process reconciled began.
    pub fn last_full_scan(&self) -> Option<Instant> {
        self.lock().last_full_scan
    }

    /// Forgets region `ino` (it was removed).
    pub fn forget_region(&self, ino: u64) {
        let mut st = self.lock();
        for p in st.procs.values_mut() {
            p.holds.remove(&ino);
        }
        st.procs.retain(|_, p| !p.holds.is_empty());
        drop(st);
        self.changed();
    }

    /// Takes the result of a scan of `/proc/PID/maps` that began at `started` and looked
    /// for the regions `scope` in the processes for which `read(pid)` is true (those whose
    /// maps it read; one that was gone counts as read); `full`: in every process. `seen` is
    /// every mapping of them it found. Registrations of those regions by those processes
    /// it did not find are forgotten, unless younger than [`SETTLE`] at the scan's start;
    /// mappings it found replace what the socket registered, and mappers the registry did
    /// not know are tracked from now on.
    pub fn reconcile(
        &self,
        started: Instant,
        scope: &[u64],
        read: impl Fn(u32) -> bool,
        full: bool,
        seen: &[Seen],
    ) {
        let mut found: HashMap<(u32, u64), Slots> = HashMap::new();
        for (pid, ino, prot, slots) in seen {
            found
                .entry((*pid, *ino))
                .or_default()
                .push((*prot, slots.clone()));
        }
        let mut st = self.lock();
        for (&pid, p) in st.procs.iter_mut() {
            if !read(pid) {
                continue;
            }
            for ino in scope {
                let Some(h) = p.holds.get_mut(ino) else {
                    continue;
                };
                if let Some(slots) = found.remove(&(pid, *ino)) {
                    h.slots = slots;
                    h.confirmed = true;
                } else if h.since + SETTLE <= started {
                    p.holds.remove(ino);
                }
            }
        }
        st.procs.retain(|_, p| !p.holds.is_empty());
        for ((pid, ino), slots) in found {
            if !is_client(pid) {
                continue;
            }
            if let Some(p) = self.entry(&mut st, pid) {
                log::debug!("process {pid} maps region {ino} without having asked the socket");
                let h = Holding {
                    slots,
                    since: started,
                    confirmed: true,
                };
                p.holds.insert(ino, h);
            }
        }
        if full {
            st.last_full_scan = Some(st.last_full_scan.map_or(started, |t| t.max(started)));
        }
        drop(st);
        self.changed();
    }

    /// Waits for exits and forgets the processes that exited, for ever.
    fn watch(&self) {
        let Some(ep) = &self.epoll else {
            return;
        };
        let mut tokens = Vec::with_capacity(64);
        loop {
            match ep.wait(&mut tokens, None) {
                Ok(()) => {
                    for &t in &tokens {
                        self.exited(t);
                    }
                }
                Err(e) => {
                    log::error!("waiting for attachers' exits: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Whether `pid` names a client: not the daemon itself (its host mappings are not
/// attachments) and not 0 (a peer whose pid the kernel could not tell).
fn is_client(pid: u32) -> bool {
    pid != 0 && pid != std::process::id()
}

/// Starts the thread that learns of attachers' exits from their pidfds.
pub fn spawn_watcher(core: Arc<Core>) {
    let r = std::thread::Builder::new()
        .name("attachers".into())
        .spawn(move || core.attachers.watch());
    if let Err(e) = r {
        log::error!("cannot start the attacher watcher: {e}");
    }
}

/// The mappings of hugetlb regions in a scan: `files` maps each backing file `(dev, ino)`
/// to its region's inode. The daemon's own mappings are left out. A writable VMA counts
/// for the read-write set, any other for the read-only one.
pub fn seen_in(mappers: &[Mapper], files: &HashMap<(u64, u64), u64>) -> Vec<Seen> {
    let mut out = Vec::new();
    for m in mappers.iter().filter(|m| is_client(m.pid)) {
        for v in &m.vmas {
            let Some(&ino) = files.get(&(v.dev, v.ino)) else {
                continue;
            };
            let prot = if v.perms.as_bytes().get(1) == Some(&b'w') {
                Protection::ReadWrite
            } else {
                Protection::ReadOnly
            };
            let first = (v.offset / PUD_SIZE) as u32;
            let last = (v.offset + (v.end - v.start) as u64).div_ceil(PUD_SIZE) as u32;
            out.push((m.pid, ino, prot, first..last));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    const RW: Protection = Protection::ReadWrite;

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    fn pids(a: &Attachers, ino: u64) -> Vec<u32> {
        let mut v: Vec<u32> = a.observed(ino).into_iter().map(|(p, _, _)| p).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn wait_until(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_exit_is_seen_through_the_pidfd() {
        let a = Arc::new(Attachers::new());
        let w = a.clone();
        std::thread::spawn(move || w.watch());
        let mut c = sleeper();
        let pid = c.id();
        a.register(pid, 7, RW, 0..2);
        a.register(pid, 7, RW, 0..2);
        a.register(pid, 8, Protection::ReadOnly, 0..1);
        assert_eq!(a.observed(7), vec![(pid, RW, 0..2)]);
        assert_eq!(a.counts(), (1, 1));
        let v = a.version();
        c.kill().unwrap();
        wait_until("exit noticed", || a.counts() == (0, 0));
        assert!(a.version() > v);
        c.wait().unwrap();
        // A reaped process cannot be registered.
        a.register(pid, 7, RW, 0..2);
        assert!(pids(&a, 7).is_empty());
    }

    #[test]
    fn scans_forget_only_settled_registrations_and_add_strangers() {
        let a = Attachers::new();
        let (mut x, mut y) = (sleeper(), sleeper());
        let all = |_: u32| true;
        a.register(x.id(), 1, RW, 0..4);
        let now = Instant::now();
        // A scan that began before the registration settled keeps it...
        a.reconcile(now, &[1], all, true, &[]);
        assert_eq!(pids(&a, 1), vec![x.id()]);
        // ...and so does a later one that could not read x's maps...
        a.reconcile(now + SETTLE, &[1], |p| p != x.id(), true, &[]);
        assert_eq!(pids(&a, 1), vec![x.id()]);
        // ...but one that read them and did not see it forgets it; one that sees y adds it
        // with the slots it maps.
        a.reconcile(now + SETTLE, &[1], all, true, &[(y.id(), 1, RW, 1..2)]);
        assert_eq!(a.observed(1), vec![(y.id(), RW, 1..2)]);
        assert_eq!(a.counts(), (1, 1));
        // Regions and processes outside the scan's scope are left alone.
        a.register(x.id(), 2, RW, 0..1);
        a.reconcile(now + 2 * SETTLE, &[1], all, true, &[(y.id(), 1, RW, 1..2)]);
        assert_eq!(pids(&a, 2), vec![x.id()]);
        let only_y = |p: u32| p == y.id();
        a.reconcile(now + 2 * SETTLE, &[2], only_y, false, &[]);
        assert_eq!(pids(&a, 2), vec![x.id()]);
        assert_eq!(a.holders(&[1, 2]).len(), 2);
        // x's registration of 2 is due for its check once settled; y's was found by a scan.
        assert_eq!(a.unconfirmed(Instant::now()), (vec![], vec![]));
        let due = a.unconfirmed(Instant::now() + SETTLE);
        assert_eq!(due, (vec![x.id()], vec![2]));
        let seen = [(x.id(), 2, RW, 0..1)];
        a.reconcile(
            Instant::now() + SETTLE,
            &due.1,
            |p| due.0.contains(&p),
            false,
            &seen,
        );
        assert_eq!(a.unconfirmed(Instant::now() + SETTLE), (vec![], vec![]));
        assert_eq!(pids(&a, 2), vec![x.id()]);
        a.forget_region(2);
        assert_eq!(a.counts(), (1, 1));
        // Only scans of every process count as full scans.
        assert_eq!(a.last_full_scan(), Some(now + 2 * SETTLE));
        for c in [&mut x, &mut y] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    #[test]
    fn a_reused_pid_starts_a_new_entry() {
        let a = Attachers::new();
        let mut c = sleeper();
        let pid = c.id();
        a.register(pid, 1, RW, 0..1);
        c.kill().unwrap();
        // Exited but not reaped: its pidfd is readable, so a registration for the same pid
        // (as if reused) replaces the entry and drops what the dead process held.
        wait_until("pidfd readable", || a.lock().procs[&pid].exited());
        let old = a.lock().procs[&pid].token;
        a.register(pid, 2, RW, 0..1);
        let st = a.lock();
        assert_ne!(st.procs[&pid].token, old);
        assert!(!st.procs[&pid].holds.contains_key(&1));
        drop(st);
        c.wait().unwrap();
    }

    #[test]
    fn seen_in_reads_slots_and_protection() {
        let e = |start: usize, len: usize, off: u64, perms: &str| kernel_glue::procfs::MapsEntry {
            start,
            end: start + len,
            perms: perms.into(),
            offset: off,
            dev: 5,
            ino: 9,
            path: String::new(),
        };
        let g = PUD_SIZE as usize;
        let m = vec![Mapper {
            pid: 4242,
            comm: "x".into(),
            vmas: vec![e(g, 2 * g, 0, "rw-s"), e(8 * g, g / 2, 3 << 30, "r--s")],
        }];
        let files = HashMap::from([((5, 9), 77)]);
        assert_eq!(
            seen_in(&m, &files),
            vec![(4242, 77, RW, 0..2), (4242, 77, Protection::ReadOnly, 3..4)]
        );
        assert!(seen_in(&m, &HashMap::new()).is_empty());
    }
}
