//! Test support for the msharefs integration tests: privilege checks, the huge-page pool
//! guard, scratch mounts, helper processes and the `mshare-probe` protocol.
//!
//! Everything that changes machine state is a guard that undoes it in `Drop`, also while a
//! failing test unwinds. Declare guards in this order so they drop in reverse (helpers
//! first, then mounts, then the pool):
//!
//! ```ignore
//! #[test]
//! #[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
//! fn my_test() {
//! if !require_privileged("my_test") { return; }
//! let pool = PoolGuard::new();                 // checks the pool is back at the end
//! let dir = HugetlbfsDir::new("my-test")?;     // fresh hugetlbfs instance under /tmp
//! let _grant = pool.grow(1024 + 16)?;          // pages this test needs
//! let mut probe = Probe::spawn(probe_bin!(), &Attach::new(dir.file("r"), rw))?;
//! }
//! ```
//!
//! A test that needs root, `/dev/fuse` or huge pages carries `#[ignore = "needs root:
//! ..."]`, so a plain `cargo test` lists it as ignored instead of passing it; CI runs it
//! with `-- --include-ignored`, and `require_privileged` makes it fail there when
//! something is missing.
//!
//! Modules:
//! - [`privilege`]: root, `/dev/fuse`, hugetlbfs; skip loudly outside CI, fail in CI;
//! - [`pool`]: serialization of pool-changing tests and the [`PoolGuard`];
//! - [`scratch`]: temporary directories and file-system instances mounted on them;
//! - [`helper`]: child processes that cannot outlive the test;
//! - [`probe`]: the `mshare-probe` binary's arguments, reports and data pattern;
//! - [`smaps`]: `/proc/PID/smaps` fields kernel-glue does not read yet;
//! - [`mountguard`]: the workspace's built artifacts and a real msharefs mount;
//! - [`seeded`]: run sizes from the environment and a seeded generator, so a run repeats.
//!
//! Messages meant for the test log ([`loud`]) bypass libtest's output capture, so they
//! appear in CI logs whether the test passes or fails.

use std::io::Write;

pub use helper::{Helper, HelperError};
pub use pool::{PoolGuard, PoolLock, PoolState, SETTLE};
pub use privilege::{in_ci, require_privileged};
pub use probe::{Attach, AttachReport, Create, CreateReport, Probe, ProbeError, ProbeFailure};
pub use scratch::{HugetlbfsDir, TempDir, TmpfsDir};
pub use shmguard::ShmLeftovers;

/// Writes one line to the process's standard error, bypassing libtest's output capture
/// (which only intercepts `print!`/`eprint!`), so it shows up in every test log.
pub fn loud(msg: &str) {
    let mut err = std::io::stderr().lock();
    // Nothing sensible to do when stderr is gone.
    let _ = writeln!(err, "{msg}");
}

/// Every thread of `pid` with its name and kernel stack, headed by `label`: what a hang
/// or deadlock report prints.
pub fn thread_stacks(pid: u32, label: &str) -> String {
    let mut out = format!("{label} {pid}:\n");
    for tid in kernel_glue::caps::thread_ids(pid).unwrap_or_default() {
        let base = format!("/proc/{pid}/task/{tid}");
        let comm = std::fs::read_to_string(format!("{base}/comm")).unwrap_or_default();
        let stack = std::fs::read_to_string(format!("{base}/stack")).unwrap_or_default();
        out += &format!("--- {tid} {}\n{stack}", comm.trim());
    }
    out
}

/// The path of the `mshare-probe` binary. `CARGO_BIN_EXE_*` exists only while compiling
/// the integration tests of this package, so this is a macro expanded in the test crate.
#[macro_export]
macro_rules! probe_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_mshare-probe"))
    };
}

/// What a test needs from the machine, and what happens when it is missing.
pub mod privilege {
    use std::os::unix::fs::FileTypeExt;
    use std::path::Path;

    /// Whether the tests run in CI: the `CI` environment variable is set and non-empty.
    /// In CI a missing requirement is a failure, never a skip.
    pub fn in_ci() -> bool {
        std::env::var_os("CI").is_some_and(|v| !v.is_empty())
    }

    /// The requirements of tests that mount file systems and use huge pages that this
    /// machine does not meet, in words.
    pub fn missing_requirements() -> Vec<&'static str> {
        let mut missing = Vec::new();
        if kernel_glue::process::geteuid() != 0 {
            missing.push("root (effective uid 0)");
        }
        let fuse = std::fs::metadata(Path::new("/dev/fuse"));
        if !fuse.is_ok_and(|m| m.file_type().is_char_device()) {
            missing.push("the /dev/fuse character device");
        }
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs
            .lines()
            .any(|l| l.split_whitespace().last() == Some("hugetlbfs"))
        {
            missing.push("hugetlbfs in /proc/filesystems");
        }
        missing
    }

    /// Checks for root, `/dev/fuse` and hugetlbfs. Returns true when all are there.
    ///
    /// When something is missing: with `CI` set this panics (CI never skips); otherwise it
    /// prints a loud `SKIPPED:` line naming the test (`what`) and returns false, and the
    /// test returns early.
    pub fn require_privileged(what: &str) -> bool {
        let missing = missing_requirements();
        if missing.is_empty() {
            return true;
        }
        let msg = format!("{what} needs {}", missing.join(", "));
        if in_ci() {
            panic!("CI is set, so this test may not skip: {msg}");
        }
        crate::loud(&format!(
            "SKIPPED: {msg}. Run as root on a machine with FUSE and hugetlbfs; \
             with CI=1 a missing requirement fails the test."
        ));
        false
    }
}

/// The global huge-page pool: serialization and a guard that proves a test left it as
/// found.
///
/// Three levels of locking:
/// - kernel-glue's `/run/msharefs/hugepages.lock` is held inside each `grow`/`give_back`
///   only, so that every msharefs process changes the pool by consistent deltas;
/// - [`PoolLock`] holds [`TEST_POOL_LOCK`] (a separate file: an `flock` on a second open
///   file description would block on kernel-glue's own lock) for a whole test, so test
///   binaries running in parallel processes never see each other's pool changes;
/// - a process-wide mutex inside [`PoolLock`] serializes the test threads of one binary
///   (the flock alone would too, but the mutex makes the intent visible and cheap).
///
/// A program that changes the pool without taking [`TEST_POOL_LOCK`] (a daemon someone
/// started by hand) can still make a guard report a leak; that report is deliberate.
pub mod pool {
    use std::marker::PhantomData;
    use std::path::Path;
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use kernel_glue::fd::FileLock;
    use kernel_glue::hugepages::{self, PoolError, PoolGrant};

    /// Lock file held for the whole of a pool-changing test.
    pub const TEST_POOL_LOCK: &str = "/run/msharefs/test-pool.lock";

    /// How long pool checks wait for released pages to come back (see
    /// [`PoolState::wait_until`]).
    pub const SETTLE: Duration = Duration::from_secs(2);

    /// How long a [`PoolGuard`] waits for the pool to come back before calling it a leak.
    /// Longer than [`SETTLE`]: on a loaded machine the last thread of a stopped daemon can
    /// take seconds to release its mappings, and a leak stays whatever the wait.
    const GUARD_SETTLE: Duration = Duration::from_secs(10);

    static THREADS: Mutex<()> = Mutex::new(());

    /// Exclusive right, within this machine's test runs, to change the huge-page pool or
    /// to need free memory undisturbed (a test that exhausts the pool on purpose holds it
    /// too). Released on drop.
    #[derive(Debug)]
    pub struct PoolLock {
        _file: FileLock,
        _thread: MutexGuard<'static, ()>,
    }

    impl PoolLock {
        /// Waits for the lock.
        ///
        /// # Panics
        /// When the lock file cannot be created or locked.
        pub fn acquire() -> PoolLock {
            // A test that panicked while holding the lock poisons the mutex; the pool
            // itself was checked by that test's guard, so the lock is still good.
            let thread = THREADS.lock().unwrap_or_else(|e| e.into_inner());
            let file = FileLock::exclusive(Path::new(TEST_POOL_LOCK))
                .unwrap_or_else(|e| panic!("cannot lock {TEST_POOL_LOCK}: {e}"));
            PoolLock {
                _file: file,
                _thread: thread,
            }
        }
    }

    /// The pool counters a guard compares.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PoolState {
        /// `vm.nr_hugepages`: persistent pool size.
        pub nr_hugepages: u64,
        /// `HugePages_Surp`: pages in use beyond the pool (given back while still mapped
        /// or held by a file).
        pub surplus: u64,
        /// `HugePages_Free`.
        pub free: u64,
        /// `HugePages_Rsvd`: free pages promised to mappings or files.
        pub reserved: u64,
    }

    impl PoolState {
        /// Reads the counters.
        ///
        /// # Panics
        /// When `/proc/sys/vm/nr_hugepages` or `/proc/meminfo` cannot be read.
        pub fn read() -> PoolState {
            let nr = hugepages::nr_hugepages()
                .unwrap_or_else(|e| panic!("cannot read the pool size: {e}"));
            let mi = kernel_glue::procfs::meminfo()
                .unwrap_or_else(|e| panic!("cannot read /proc/meminfo: {e}"));
            PoolState {
                nr_hugepages: nr,
                surplus: mi.huge_surp,
                free: mi.huge_free,
                reserved: mi.huge_rsvd,
            }
        }

        /// Free pages nobody has reserved.
        pub fn available(&self) -> u64 {
            self.free.saturating_sub(self.reserved)
        }

        /// Reads the counters until `done` holds or `limit` passes, and returns the last
        /// reading.
        ///
        /// Pages can return to the pool a moment after the call that released them: a
        /// process that another test thread is starting holds a copy of every file
        /// descriptor (close-on-exec ones too) between `fork` and `exec`, and with it the
        /// pages of a hugetlbfs file this thread just closed. Check pool counters through
        /// this, with [`SETTLE`], never with a single read.
        pub fn wait_until(limit: Duration, mut done: impl FnMut(&PoolState) -> bool) -> PoolState {
            let deadline = Instant::now() + limit;
            loop {
                let s = PoolState::read();
                if done(&s) || Instant::now() >= deadline {
                    return s;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Records the pool when created; on drop, also while unwinding, checks that
    /// `nr_hugepages` is back to that value and that no surplus pages appeared.
    ///
    /// A pool that is not back is repaired (the difference given back, or re-added) and
    /// reported loudly; the guard then panics, unless the thread is already panicking.
    /// Declare it before everything that holds huge pages (mounts, helpers, grants), so it
    /// drops last.
    #[derive(Debug)]
    pub struct PoolGuard<'l> {
        before: PoolState,
        /// The lock, when the guard took it itself.
        _own: Option<PoolLock>,
        /// The caller's lock, which must outlive the guard.
        _under: PhantomData<&'l PoolLock>,
    }

    impl PoolGuard<'static> {
        /// Takes the [`PoolLock`] and records the pool.
        ///
        /// # Panics
        /// When the lock or the counters cannot be had.
        #[allow(clippy::new_without_default)]
        pub fn new() -> PoolGuard<'static> {
            let lock = PoolLock::acquire();
            PoolGuard {
                before: PoolState::read(),
                _own: Some(lock),
                _under: PhantomData,
            }
        }
    }

    impl<'l> PoolGuard<'l> {
        /// Records the pool under a [`PoolLock`] the caller already holds (for tests that
        /// check a guard from outside, e.g. one dropped by a panicking thread).
        pub fn under(_lock: &'l PoolLock) -> PoolGuard<'l> {
            PoolGuard {
                before: PoolState::read(),
                _own: None,
                _under: PhantomData,
            }
        }

        /// The pool as it was when the guard was made.
        pub fn before(&self) -> PoolState {
            self.before
        }

        /// Grows the pool by `pages` with kernel-glue; the grant gives them back on drop.
        ///
        /// # Errors
        /// kernel-glue's [`PoolError`] (`Short` when the kernel delivers fewer pages).
        pub fn grow(&self, pages: u64) -> Result<PoolGrant, PoolError> {
            hugepages::grow(pages)
        }

        fn repair(&self) -> Vec<String> {
            let before = self.before;
            let mut problems = Vec::new();
            let now = PoolState::wait_until(GUARD_SETTLE, |s| {
                s.nr_hugepages == before.nr_hugepages && s.surplus <= before.surplus
            })
            .nr_hugepages;
            if now > before.nr_hugepages {
                let extra = now - before.nr_hugepages;
                problems.push(format!(
                    "nr_hugepages is {now}, was {}: {extra} pages were not given back",
                    before.nr_hugepages
                ));
                if let Err(e) = hugepages::give_back(extra) {
                    problems.push(format!("giving back {extra} pages failed: {e}"));
                }
            } else if now < before.nr_hugepages {
                let lost = before.nr_hugepages - now;
                problems.push(format!(
                    "nr_hugepages is {now}, was {}: {lost} pages too many were given back",
                    before.nr_hugepages
                ));
                match hugepages::grow(lost) {
                    // The pages belonged to the pool before the test: keep them there.
                    Ok(grant) => {
                        grant.into_raw();
                    }
                    Err(e) => problems.push(format!("re-adding {lost} pages failed: {e}")),
                }
            }
            let after = PoolState::read();
            if after.nr_hugepages != before.nr_hugepages {
                problems.push(format!(
                    "could not restore nr_hugepages: {} now, {} before",
                    after.nr_hugepages, before.nr_hugepages
                ));
            }
            if after.surplus > before.surplus {
                problems.push(format!(
                    "{} surplus huge pages appeared ({} -> {}): a hugetlbfs file, mount, \
                     memfd or mapping outlived its pool grant",
                    after.surplus - before.surplus,
                    before.surplus,
                    after.surplus
                ));
                problems.push(format!("mapped by: {}", hugetlb_holders().join(", ")));
            }
            problems
        }
    }

    /// The processes that map huge pages now (`HugetlbPages` of `/proc/PID/status`), as
    /// `PID (COMM): N kB`, to name the holder of pages a guard finds unreleased.
    fn hugetlb_holders() -> Vec<String> {
        let mut out: Vec<String> = kernel_glue::procfs::pids()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|pid| {
                let bytes = kernel_glue::procfs::hugetlb_bytes(pid)
                    .ok()
                    .filter(|&b| b > 0)?;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                Some(format!("{pid} ({}): {} kB", comm.trim(), bytes >> 10))
            })
            .collect();
        if out.is_empty() {
            out.push("no process (a file or a detached mount holds them)".into());
        }
        out
    }

    impl Drop for PoolGuard<'_> {
        fn drop(&mut self) {
            let problems = self.repair();
            if problems.is_empty() {
                return;
            }
            let msg = format!("HUGE PAGE POOL NOT RESTORED: {}", problems.join("; "));
            crate::loud(&msg);
            if !std::thread::panicking() {
                panic!("{msg}");
            }
        }
    }
}

/// Temporary directories and the file-system instances tests mount on them.
pub mod scratch {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    use kernel_glue::mount::{self, InstanceMount};

    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// A fresh, empty directory under `/tmp` (mode 0700) named
    /// `msharefs-test-PID-N-TAG`, removed on drop (recursively, unless something is still
    /// mounted on it: then it is left and reported).
    #[derive(Debug)]
    pub struct TempDir {
        path: PathBuf,
    }

    impl TempDir {
        /// Creates the directory; `tag` (letters, digits, `-`) names the test.
        ///
        /// # Errors
        /// Creating the directory.
        pub fn new(tag: &str) -> io::Result<TempDir> {
            use std::os::unix::fs::DirBuilderExt;
            let tag: String = tag
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            loop {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let path = PathBuf::from(format!(
                    "/tmp/msharefs-test-{}-{n}-{tag}",
                    std::process::id()
                ));
                match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                    Ok(()) => return Ok(TempDir { path }),
                    // Left over by an earlier run of a process with the same pid.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
        }

        /// The directory.
        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            match mount::mount_at(&self.path) {
                Ok(None) => {}
                Ok(Some(m)) => {
                    crate::loud(&format!(
                        "LEAK: {} still has a {} mounted; leaving it",
                        self.path.display(),
                        m.fstype
                    ));
                    return;
                }
                Err(e) => crate::loud(&format!("cannot read mountinfo: {e}")),
            }
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                crate::loud(&format!("cannot remove {}: {e}", self.path.display()));
            }
        }
    }

    /// A file-system instance mounted on a [`TempDir`]; unmounted, checked and removed on
    /// drop.
    #[derive(Debug)]
    struct MountedDir {
        mount: Option<InstanceMount>,
        dir: TempDir,
    }

    impl MountedDir {
        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for MountedDir {
        fn drop(&mut self) {
            // InstanceMount unmounts (lazily) on drop; the kernel has released the
            // instance and its pages by the time umount2 returns to us, unless a process
            // still has a file of it open or mapped.
            drop(self.mount.take());
            match mount::mount_at(self.dir.path()) {
                Ok(None) => {}
                Ok(Some(m)) => crate::loud(&format!(
                    "LEAK: {} is still mounted on {}",
                    m.fstype,
                    self.dir.path().display()
                )),
                Err(e) => crate::loud(&format!("cannot read mountinfo: {e}")),
            }
        }
    }

    /// A fresh hugetlbfs instance (2 MiB pages from the global pool, no size limit) on a
    /// fresh directory under `/tmp`; unmounted and removed on drop.
    #[derive(Debug)]
    pub struct HugetlbfsDir(MountedDir);

    impl HugetlbfsDir {
        /// Mounts it (root directory mode 0700).
        ///
        /// # Errors
        /// Creating the directory; `mount(2)`'s errno.
        pub fn new(tag: &str) -> io::Result<HugetlbfsDir> {
            let dir = TempDir::new(tag)?;
            let mount = InstanceMount::hugetlbfs(dir.path(), 0o700)?;
            Ok(HugetlbfsDir(MountedDir {
                mount: Some(mount),
                dir,
            }))
        }

        /// The mount point.
        pub fn path(&self) -> &Path {
            self.0.path()
        }

        /// A path inside the mount.
        pub fn file(&self, name: &str) -> PathBuf {
            self.0.path().join(name)
        }
    }

    /// A fresh tmpfs instance on a fresh directory under `/tmp`; unmounted and removed on
    /// drop.
    #[derive(Debug)]
    pub struct TmpfsDir(MountedDir);

    impl TmpfsDir {
        /// Mounts it with tmpfs `huge=` option `huge` and size limit `size` (tmpfs
        /// syntax, e.g. `64M`).
        ///
        /// # Errors
        /// Creating the directory; `mount(2)`'s errno.
        pub fn new(tag: &str, huge: &str, size: &str) -> io::Result<TmpfsDir> {
            let dir = TempDir::new(tag)?;
            let mount = InstanceMount::tmpfs(dir.path(), huge, size, 0o700)?;
            Ok(TmpfsDir(MountedDir {
                mount: Some(mount),
                dir,
            }))
        }

        /// The mount point.
        pub fn path(&self) -> &Path {
            self.0.path()
        }

        /// A path inside the mount.
        pub fn file(&self, name: &str) -> PathBuf {
            self.0.path().join(name)
        }
    }
}

/// Child processes a test runs: piped stdin (closing it is the "let go" signal), stdout
/// read line by line with timeouts, stderr passed through to the test's stderr.
///
/// A [`Helper`] kills (`SIGKILL`) and reaps its process on drop, so a failing test leaves
/// no orphan; the child also gets `SIGKILL` if the thread that spawned it dies
/// (`PR_SET_PDEATHSIG`, set before `exec`), which covers a test binary that is killed.
/// Keep a helper in the thread that spawned it.
pub mod helper {
    use std::ffi::OsStr;
    use std::io::{self, BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    /// Failures of a helper process, with enough context for a test failure message.
    #[derive(Debug, thiserror::Error)]
    pub enum HelperError {
        /// `fork`/`exec` failed.
        #[error("cannot start {program}: {source}")]
        Spawn {
            /// Program path.
            program: PathBuf,
            /// The cause.
            #[source]
            source: io::Error,
        },
        /// No output line or no exit within the time limit.
        #[error("{name} (pid {pid}): no {what} within {limit:?}")]
        Timeout {
            /// Helper name.
            name: String,
            /// Process id.
            pid: u32,
            /// What was awaited.
            what: &'static str,
            /// The limit.
            limit: Duration,
        },
        /// Standard output closed before a line came.
        #[error("{name} (pid {pid}) closed its output without a line (exit: {status:?})")]
        Eof {
            /// Helper name.
            name: String,
            /// Process id.
            pid: u32,
            /// Exit status, if it exited.
            status: Option<ExitStatus>,
        },
        /// A line was not the expected JSON.
        #[error("{name}: bad JSON line {line:?}: {source}")]
        Json {
            /// Helper name.
            name: String,
            /// The line.
            line: String,
            /// The cause.
            #[source]
            source: serde_json::Error,
        },
        /// The process exited unsuccessfully.
        #[error("{name} (pid {pid}) failed: {status}")]
        Exit {
            /// Helper name.
            name: String,
            /// Process id.
            pid: u32,
            /// Exit status.
            status: ExitStatus,
        },
        /// `wait(2)` or `kill(2)` failed.
        #[error("{name}: {source}")]
        Io {
            /// Helper name.
            name: String,
            /// The cause.
            #[source]
            source: io::Error,
        },
    }

    /// A running child process; killed and reaped on drop.
    #[derive(Debug)]
    pub struct Helper {
        name: String,
        child: Child,
        stdin: Option<ChildStdin>,
        lines: Receiver<String>,
        reader: Option<JoinHandle<()>>,
        status: Option<ExitStatus>,
    }

    impl Helper {
        /// Starts `program` with `args`; `name` labels it in messages.
        ///
        /// # Errors
        /// [`HelperError::Spawn`].
        pub fn spawn<I, S>(name: &str, program: &Path, args: I) -> Result<Helper, HelperError>
        where
            I: IntoIterator<Item = S>,
            S: AsRef<OsStr>,
        {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            // SAFETY: the closure runs in the child between fork and exec. It only calls
            // prctl(2) through kernel-glue, which allocates nothing and takes no lock
            // (an error is built from errno without allocation), so it is safe in a
            // forked copy of a multi-threaded process. The spawning thread blocks until
            // exec, so it cannot die before the signal is armed.
            unsafe {
                cmd.pre_exec(|| {
                    kernel_glue::process::set_parent_death_signal(kernel_glue::consts::SIGKILL)
                });
            }
            let mut child = cmd.spawn().map_err(|source| HelperError::Spawn {
                program: program.to_path_buf(),
                source,
            })?;
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().expect("stdout is piped");
            let (tx, lines) = mpsc::channel();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            Ok(Helper {
                name: name.to_string(),
                child,
                stdin,
                lines,
                reader: Some(reader),
                status: None,
            })
        }

        /// Process id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// The name given at spawn.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// The next line of standard output, waiting at most `limit`.
        ///
        /// # Errors
        /// [`HelperError::Timeout`], [`HelperError::Eof`].
        pub fn read_line(&mut self, limit: Duration) -> Result<String, HelperError> {
            match self.lines.recv_timeout(limit) {
                Ok(line) => Ok(line),
                Err(RecvTimeoutError::Timeout) => Err(HelperError::Timeout {
                    name: self.name.clone(),
                    pid: self.pid(),
                    what: "output line",
                    limit,
                }),
                Err(RecvTimeoutError::Disconnected) => {
                    // Give the exit status a moment to arrive, for the message.
                    let status = self.wait_quietly(Duration::from_secs(2));
                    Err(HelperError::Eof {
                        name: self.name.clone(),
                        pid: self.pid(),
                        status,
                    })
                }
            }
        }

        /// The next line of standard output parsed as JSON.
        ///
        /// # Errors
        /// As [`Helper::read_line`]; [`HelperError::Json`].
        pub fn read_json(&mut self, limit: Duration) -> Result<serde_json::Value, HelperError> {
            let line = self.read_line(limit)?;
            serde_json::from_str(&line).map_err(|source| HelperError::Json {
                name: self.name.clone(),
                line,
                source,
            })
        }

        /// Writes `line` and a newline to the child's standard input.
        ///
        /// # Errors
        /// [`HelperError::Io`] when the pipe is closed or broken.
        pub fn write_line(&mut self, line: &str) -> Result<(), HelperError> {
            use std::io::Write;
            let r = match self.stdin.as_mut() {
                Some(stdin) => writeln!(stdin, "{line}").and_then(|()| stdin.flush()),
                None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
            };
            r.map_err(|source| HelperError::Io {
                name: self.name.clone(),
                source,
            })
        }

        /// Closes the child's standard input (the probe's signal to let go and exit).
        pub fn close_stdin(&mut self) {
            drop(self.stdin.take());
        }

        fn wait_quietly(&mut self, limit: Duration) -> Option<ExitStatus> {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(s) = self.status {
                    return Some(s);
                }
                if let Ok(Some(s)) = self.child.try_wait() {
                    self.status = Some(s);
                    return Some(s);
                }
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// Waits at most `limit` for the process to exit and returns its status. On a
        /// timeout the process is killed.
        ///
        /// # Errors
        /// [`HelperError::Timeout`], [`HelperError::Io`].
        pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus, HelperError> {
            if let Some(s) = self.wait_quietly(limit) {
                return Ok(s);
            }
            self.kill()?;
            Err(HelperError::Timeout {
                name: self.name.clone(),
                pid: self.pid(),
                what: "exit",
                limit,
            })
        }

        /// Closes standard input, waits at most `limit` for the exit and requires success.
        ///
        /// # Errors
        /// As [`Helper::wait`]; [`HelperError::Exit`] for a non-zero status.
        pub fn finish(&mut self, limit: Duration) -> Result<(), HelperError> {
            self.close_stdin();
            let status = self.wait(limit)?;
            if status.success() {
                Ok(())
            } else {
                Err(HelperError::Exit {
                    name: self.name.clone(),
                    pid: self.pid(),
                    status,
                })
            }
        }

        /// Kills the process (`SIGKILL`) and reaps it.
        ///
        /// # Errors
        /// [`HelperError::Io`].
        pub fn kill(&mut self) -> Result<(), HelperError> {
            if self.status.is_some() {
                return Ok(());
            }
            let io = |source| HelperError::Io {
                name: self.name.clone(),
                source,
            };
            // kill(2) of an exited but unreaped child succeeds, so this cannot hit a
            // recycled pid.
            self.child.kill().map_err(io)?;
            let status = self.child.wait().map_err(io)?;
            self.status = Some(status);
            Ok(())
        }
    }

    impl Drop for Helper {
        fn drop(&mut self) {
            drop(self.stdin.take());
            if let Err(e) = self.kill() {
                crate::loud(&format!("cannot kill helper: {e}"));
            }
            if let Some(reader) = self.reader.take() {
                // The pipe closed with the process, so the reader ends.
                let _ = reader.join();
            }
        }
    }
}

/// The `mshare-probe` binary: a separate process that creates or attaches a region and
/// reports what the kernel did, as one JSON line on standard output.
///
/// `mshare-probe attach PATH [--prot rw|ro] [--shift BYTES] [--stride BYTES]
/// [--write-pattern SEED] [--check-pattern SEED] [--touch] [--hold-until-stdin-closes]`
/// opens the region with libmshare and attaches it (or, with `--shift`, maps the file
/// with kernel-glue at a 1 GiB-aligned address plus `BYTES`), optionally touches one
/// word per stride (default 2 MiB; a read for `ro`, an atomic no-op write for `rw`)
/// counting the minor faults of that loop alone, writes or checks the data pattern,
/// prints an [`AttachReport`] and, when holding, keeps the mapping until its standard
/// input closes.
///
/// `mshare-probe create PATH --size BYTES [--mode OCTAL] [--backing NAME]` creates a
/// region with libmshare and prints a [`CreateReport`].
///
/// Any failure prints a [`ProbeError`] (message and errno) and exits with status 1
/// (2 for bad arguments).
pub mod probe {
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use kernel_glue::mapping::Protection;
    use serde::{Deserialize, Serialize};

    use crate::helper::{Helper, HelperError};

    /// Default time limit for a probe's report and exit (2 GiB of first-touch hugetlb
    /// zeroing takes a few seconds in slow VMs).
    pub const PROBE_TIMEOUT: Duration = Duration::from_secs(120);

    /// What `mshare-probe attach` reports.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct AttachReport {
        /// Probe's pid.
        pub pid: u32,
        /// Start address of the mapping.
        pub addr: u64,
        /// Length of the mapping.
        pub len: u64,
        /// `"rw"` or `"ro"`.
        pub prot: String,
        /// `KernelPageSize` of the mapping's VMA in bytes.
        pub kernel_page_size: u64,
        /// Touch stride in bytes.
        pub stride: u64,
        /// Pages touched (one word per stride), when `--touch`.
        pub touched: Option<u64>,
        /// Minor faults of the touch loop alone (`getrusage`), when `--touch`.
        pub touch_minor_faults: Option<u64>,
        /// Major faults of the touch loop alone, when `--touch`.
        pub touch_major_faults: Option<u64>,
        /// Wall time of the touch loop in nanoseconds, when `--touch`.
        pub touch_ns: Option<u64>,
        /// Whether the pattern was written (`--write-pattern`).
        pub pattern_written: bool,
        /// Result of `--check-pattern` (null when not checked).
        pub pattern_ok: Option<bool>,
        /// Words that did not match the pattern.
        pub pattern_mismatches: Option<u64>,
        /// `VmPTE` of the probe after the touch, in bytes.
        pub vm_pte: u64,
    }

    impl AttachReport {
        /// Touch-loop minor faults per GiB of mapping.
        pub fn faults_per_gib(&self) -> Option<f64> {
            let f = self.touch_minor_faults? as f64;
            Some(f * kernel_glue::PUD_SIZE as f64 / self.len as f64)
        }
    }

    /// What `mshare-probe create` reports.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct CreateReport {
        /// Probe's pid.
        pub pid: u32,
        /// Region size.
        pub size: u64,
        /// Backing name as libmshare reports it.
        pub backing: String,
    }

    /// A failure inside the probe, as it reports it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
    #[error("{error} (errno {errno:?})")]
    pub struct ProbeError {
        /// What failed, in words.
        pub error: String,
        /// The errno, when the failure had one.
        pub errno: Option<i32>,
    }

    /// A probe run that did not produce a report.
    #[derive(Debug, thiserror::Error)]
    pub enum ProbeFailure {
        /// The process misbehaved (timeout, no output, bad JSON, crash).
        #[error(transparent)]
        Helper(#[from] HelperError),
        /// The probe ran and reported an error.
        #[error("probe reported: {0}")]
        Probe(#[from] ProbeError),
    }

    impl ProbeFailure {
        /// The errno the probe reported, if it reported one.
        pub fn errno(&self) -> Option<i32> {
            match self {
                ProbeFailure::Probe(p) => p.errno,
                ProbeFailure::Helper(_) => None,
            }
        }
    }

    fn prot_name(prot: Protection) -> &'static str {
        match prot {
            Protection::ReadWrite => "rw",
            Protection::ReadOnly => "ro",
        }
    }

    /// Arguments of `mshare-probe attach`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Attach {
        /// Region path.
        pub path: PathBuf,
        /// Protection of the attach (and access mode of the open).
        pub prot: Protection,
        /// Map with kernel-glue at 1 GiB-aligned + this many bytes instead of libmshare.
        pub shift: Option<u64>,
        /// Touch stride; the probe's default (2 MiB) when `None`.
        pub stride: Option<u64>,
        /// Write the data pattern with this seed.
        pub write_pattern: Option<u64>,
        /// Check the data pattern with this seed.
        pub check_pattern: Option<u64>,
        /// Touch one word per stride, counting faults.
        pub touch: bool,
        /// Keep the mapping until standard input closes.
        pub hold: bool,
    }

    impl Attach {
        /// A plain attach of `path` with `prot`.
        pub fn new(path: impl Into<PathBuf>, prot: Protection) -> Attach {
            Attach {
                path: path.into(),
                prot,
                shift: None,
                stride: None,
                write_pattern: None,
                check_pattern: None,
                touch: false,
                hold: false,
            }
        }

        /// Maps at 1 GiB-aligned + `bytes` (kernel-glue, not libmshare).
        pub fn shift(mut self, bytes: u64) -> Attach {
            self.shift = Some(bytes);
            self
        }

        /// Touch stride.
        pub fn stride(mut self, bytes: u64) -> Attach {
            self.stride = Some(bytes);
            self
        }

        /// Writes the pattern for `seed`.
        pub fn write_pattern(mut self, seed: u64) -> Attach {
            self.write_pattern = Some(seed);
            self
        }

        /// Checks the pattern for `seed`.
        pub fn check_pattern(mut self, seed: u64) -> Attach {
            self.check_pattern = Some(seed);
            self
        }

        /// Touches one word per stride and counts the faults.
        pub fn touch(mut self) -> Attach {
            self.touch = true;
            self
        }

        /// Keeps the mapping until standard input closes.
        pub fn hold(mut self) -> Attach {
            self.hold = true;
            self
        }

        /// The command line after the program name.
        pub fn args(&self) -> Vec<OsString> {
            let mut a: Vec<OsString> = vec!["attach".into(), self.path.clone().into()];
            a.push("--prot".into());
            a.push(prot_name(self.prot).into());
            let mut num = |flag: &str, v: Option<u64>| {
                if let Some(v) = v {
                    a.push(flag.into());
                    a.push(v.to_string().into());
                }
            };
            num("--shift", self.shift);
            num("--stride", self.stride);
            num("--write-pattern", self.write_pattern);
            num("--check-pattern", self.check_pattern);
            if self.touch {
                a.push("--touch".into());
            }
            if self.hold {
                a.push("--hold-until-stdin-closes".into());
            }
            a
        }
    }

    /// Arguments of `mshare-probe create`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Create {
        /// Region path.
        pub path: PathBuf,
        /// Size in bytes.
        pub size: u64,
        /// Mode bits.
        pub mode: u32,
        /// Backing name (`default`, `hugetlb`, `thp`, `shmem`).
        pub backing: String,
    }

    impl Create {
        /// The command line after the program name.
        pub fn args(&self) -> Vec<OsString> {
            vec![
                "create".into(),
                self.path.clone().into(),
                "--size".into(),
                self.size.to_string().into(),
                "--mode".into(),
                format!("{:o}", self.mode).into(),
                "--backing".into(),
                self.backing.clone().into(),
            ]
        }

        /// Runs the probe to completion.
        ///
        /// # Errors
        /// [`ProbeFailure`].
        pub fn run(&self, probe_bin: &Path) -> Result<CreateReport, ProbeFailure> {
            let mut h = Helper::spawn("mshare-probe create", probe_bin, self.args())?;
            let report = read_report(&mut h)?;
            h.finish(PROBE_TIMEOUT)?;
            Ok(report)
        }
    }

    fn read_report<T: serde::de::DeserializeOwned>(h: &mut Helper) -> Result<T, ProbeFailure> {
        let v = h.read_json(PROBE_TIMEOUT)?;
        if v.get("error").is_some() {
            let e: ProbeError =
                serde_json::from_value(v.clone()).map_err(|source| HelperError::Json {
                    name: h.name().to_string(),
                    line: v.to_string(),
                    source,
                })?;
            // The probe exits on its own after an error; reap it for a clean state.
            let _ = h.wait(PROBE_TIMEOUT);
            return Err(ProbeFailure::Probe(e));
        }
        serde_json::from_value(v.clone()).map_err(|source| {
            ProbeFailure::Helper(HelperError::Json {
                name: h.name().to_string(),
                line: v.to_string(),
                source,
            })
        })
    }

    /// A running `mshare-probe attach`.
    #[derive(Debug)]
    pub struct Probe {
        helper: Helper,
    }

    impl Probe {
        /// Starts the probe.
        ///
        /// # Errors
        /// [`HelperError::Spawn`].
        pub fn spawn(probe_bin: &Path, attach: &Attach) -> Result<Probe, HelperError> {
            let name = format!("mshare-probe attach {}", attach.path.display());
            Ok(Probe {
                helper: Helper::spawn(&name, probe_bin, attach.args())?,
            })
        }

        /// Waits for the report.
        ///
        /// # Errors
        /// [`ProbeFailure`].
        pub fn report(&mut self) -> Result<AttachReport, ProbeFailure> {
            read_report(&mut self.helper)
        }

        /// Lets a holding probe go (closes its stdin) and requires a clean exit.
        ///
        /// # Errors
        /// [`HelperError`].
        pub fn finish(mut self) -> Result<(), HelperError> {
            self.helper.finish(PROBE_TIMEOUT)
        }

        /// The process.
        pub fn helper(&mut self) -> &mut Helper {
            &mut self.helper
        }

        /// Runs a non-holding attach to completion and returns its report.
        ///
        /// # Errors
        /// [`ProbeFailure`].
        pub fn run(probe_bin: &Path, attach: &Attach) -> Result<AttachReport, ProbeFailure> {
            let mut p = Probe::spawn(probe_bin, attach)?;
            let report = p.report()?;
            p.finish()?;
            Ok(report)
        }
    }

    /// The data pattern: the word the probe writes at `offset` of a region for `seed`
    /// (splitmix64 of seed and offset, so every word and every seed differ).
    pub fn pattern_word(seed: u64, offset: u64) -> u64 {
        let mut z = seed
            .wrapping_add(offset.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Offsets of the pattern words in a region of `len` bytes touched every `stride`
    /// bytes: the second word and the last word of every stride (the first word is the
    /// one the touch loop uses).
    pub fn pattern_offsets(len: u64, stride: u64) -> impl Iterator<Item = u64> {
        let pages = len / stride;
        (0..pages).flat_map(move |i| [i * stride + 8, i * stride + stride - 8])
    }
}

#[path = "mountguard.rs"]
pub mod mountguard;

/// Run parameters from the environment and deterministic randomness for the stress tests:
/// a seed printed by a run repeats it.
pub mod seeded {
    /// The `u64` in environment variable `name`, else `default`.
    pub fn env_u64(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// The seed in environment variable `name`, else one from the clock (never 0, which
    /// would stall the generator).
    pub fn seed(name: &str) -> u64 {
        env_u64(
            name,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1,
        )
    }

    /// xorshift64*: the tests' only source of randomness, so a seed repeats a run.
    #[derive(Debug, Clone)]
    pub struct Rng(pub u64);

    impl Rng {
        /// The next value.
        #[allow(clippy::should_implement_trait)]
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// A value in `0..n` (0 for `n` 0).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        /// True with `percent` % probability.
        pub fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
        /// One element of `v`.
        pub fn pick<T: Clone>(&mut self, v: &[T]) -> T {
            v[self.below(v.len() as u64) as usize].clone()
        }
        /// `n` random bytes.
        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }
}

/// Shared memory a test's programs make outside msharefs: `/dev/shm` files and System V
/// segments.
pub mod shmguard {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// `/dev/shm` entries and System V segment ids present now.
    fn state() -> (BTreeSet<String>, BTreeSet<i32>) {
        let files = std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let ids = kernel_glue::ipc::segments()
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.id)
            .collect();
        (files, ids)
    }

    /// Removes, on drop, the `/dev/shm` files and System V segments that appeared since it
    /// was made (also when the test fails, and what a crashed server left);
    /// [`ShmLeftovers::check`] asserts there are none.
    #[derive(Debug)]
    pub struct ShmLeftovers {
        before: (BTreeSet<String>, BTreeSet<i32>),
    }

    impl Default for ShmLeftovers {
        fn default() -> Self {
            Self::new()
        }
    }

    impl ShmLeftovers {
        /// Records what exists now.
        pub fn new() -> ShmLeftovers {
            ShmLeftovers { before: state() }
        }

        /// `/dev/shm` files and segment ids that appeared since.
        pub fn new_since(&self) -> (Vec<String>, Vec<i32>) {
            let (files, ids) = state();
            (
                files.difference(&self.before.0).cloned().collect(),
                ids.difference(&self.before.1).copied().collect(),
            )
        }

        /// Asserts that no `/dev/shm` file or segment appeared.
        ///
        /// # Panics
        /// When one did.
        pub fn check(&self, what: &str) {
            let (files, ids) = self.new_since();
            assert!(
                files.is_empty() && ids.is_empty(),
                "{what} left /dev/shm files {files:?} and System V segments {ids:?}"
            );
        }
    }

    impl Drop for ShmLeftovers {
        fn drop(&mut self) {
            let (files, ids) = self.new_since();
            for f in files {
                let _ = std::fs::remove_file(Path::new("/dev/shm").join(f));
            }
            for id in ids {
                let _ = kernel_glue::ipc::shm_remove(id);
            }
        }
    }
}
