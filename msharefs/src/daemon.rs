//! Daemon life cycle: `msharefs mount` (start-up, readiness, shutdown on SIGTERM or when
//! the kernel ends the connection after `umount DIR`) and `msharefs umount` (stop, clean a
//! stale mount, purge).
//!
//! Readiness is told twice: to `msharefs mount` in the background mode (a `ready` line on
//! a pipe) and to systemd (`READY=1` on `$NOTIFY_SOCKET`, [`crate::notify`]), both only
//! once the FUSE mount answers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};
use kernel_glue::errnos::*;
use kernel_glue::{fd as kfd, hugepages, mount, process};

use crate::backing::{ALL_STORES, Stores};
use crate::fs::Core;
use crate::fuse::MshareFuse;
use crate::notify;
use crate::options::MountOpts;
use crate::paths::{self, StateDir};
use crate::shrinker;
use crate::state::{Store, Tree};

/// Environment variable set on the background daemon: report readiness on stdout.
const NOTIFY_ENV: &str = "MSHAREFS_NOTIFY";

/// How long a new daemon waits for the previous one of its state directory to finish
/// when that one's mount is already gone (`umount DIR` ends the connection; the daemon
/// then saves its state and exits within a poll interval).
const STOPPING_GRACE: Duration = Duration::from_secs(10);

/// The state directory for mount point `mnt`: `--state-dir` (absolute), or the default.
fn state_of(opts: &MountOpts, mnt: &Path) -> StateDir {
    StateDir {
        dir: opts
            .state_dir
            .clone()
            .unwrap_or_else(|| paths::default_state_dir(mnt)),
    }
}

fn fail(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// `e` with `path` named in its message (the kind is kept).
fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Whether huge pages can be had: hugetlbfs exists and the pool can grow by one page.
fn hugetlb_available() -> bool {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    fs.contains("hugetlbfs") && hugepages::grow(1).is_ok()
}

/// Whether the FUSE mount at `mnt` lost its daemon. `statfs` always asks the daemon
/// (unlike `stat`, which the kernel may answer from its attribute cache), so a dead
/// connection answers `ENOTCONN`.
fn is_dead_fuse(mnt: &Path) -> bool {
    matches!(kfd::statfs(mnt), Err(e) if e.raw_os_error() == Some(ENOTCONN))
}

/// Unmounts a dead FUSE mount left by a killed daemon; refuses a live one.
fn clear_mountpoint(mnt: &Path, state: &StateDir) -> std::io::Result<()> {
    if let Some(m) = mount::mount_at(mnt)? {
        if m.fstype.starts_with("fuse") {
            if is_dead_fuse(mnt) {
                log::warn!("{}: cleaning up the mount of a dead daemon", mnt.display());
                mount::umount2(mnt, true)?;
            } else if let Some(pid) = state.running_pid() {
                return Err(fail(format!(
                    "{} is already mounted by msharefs (pid {pid})",
                    mnt.display()
                )));
            } else {
                return Err(fail(format!("{} is already a FUSE mount", mnt.display())));
            }
        }
    }
    match kfd::stat(mnt) {
        // Like `mkdir -p`: a fresh machine has no /mnt/mshare yet.
        Err(e) if e.raw_os_error() == Some(ENOENT) => {
            std::fs::create_dir_all(mnt).map_err(|e| at(mnt, e))
        }
        Err(e) => Err(fail(format!("{}: {e}", mnt.display()))),
        Ok(st) if st.mode & 0o170000 != 0o040000 => {
            Err(fail(format!("{}: not a directory", mnt.display())))
        }
        Ok(_) => Ok(()),
    }
}

/// `msharefs mount`: in the background (default) it starts the daemon and returns once
/// the mount is live; in the foreground it is the daemon.
pub fn mount(opts: MountOpts) -> std::io::Result<()> {
    if process::geteuid() != 0 {
        return Err(fail(
            "msharefs mount needs root (FUSE passthrough and huge-page pool)".into(),
        ));
    }
    let mnt = paths::absolute_mountpoint(&opts.mountpoint)?;
    if !opts.foreground {
        return start_background(&mnt, &opts).map(|line| println!("{line}"));
    }
    let tell_parent = std::env::var_os(NOTIFY_ENV).is_some();
    if tell_parent {
        // Leave the parent's session so its exit does not hang us up.
        let _ = process::setsid();
    }
    match run_daemon(&mnt, &opts, tell_parent) {
        Ok(()) => Ok(()),
        Err(e) => {
            if tell_parent {
                println!("error: {e}");
            }
            let errno = kernel_glue::errno_of(&e);
            notify::notify_or_log(&format!("STATUS=failed: {e}\nERRNO={errno}"));
            Err(e)
        }
    }
}

/// Checks the state directory (refusing a foreign one before writing anything), starts
/// the daemon in the background and waits for its `ready`. Returns the line to print.
pub fn start_background(mnt: &Path, opts: &MountOpts) -> std::io::Result<String> {
    let state = state_of(opts, mnt);
    state.prepare()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(state.log_file())
        .map_err(|e| at(&state.log_file(), e))?;
    let mut child_opts = opts.clone();
    child_opts.state_dir = Some(state.dir.clone());
    let exe = std::env::current_exe()?;
    let mut child = Command::new(&exe)
        .args(child_opts.daemon_args(mnt))
        .env(NOTIFY_ENV, "1")
        // Readiness goes to the pipe; a service manager watching this process learns it
        // from this process's exit, not from the daemon.
        .env_remove(notify::NOTIFY_SOCKET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| at(&exe, e))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let line = line.trim();
    if line == "ready" {
        return Ok(format!(
            "msharefs: {} mounted (daemon pid {}, state {}, log {})",
            mnt.display(),
            child.id(),
            state.dir.display(),
            state.log_file().display()
        ));
    }
    let _ = child.wait();
    let msg = line.strip_prefix("error: ").unwrap_or(line);
    Err(fail(if msg.is_empty() {
        format!(
            "daemon exited before the mount was live; see {}",
            state.log_file().display()
        )
    } else {
        msg.to_string()
    }))
}

/// Refuses a state directory another live daemon uses, after giving one whose mount is
/// already gone (it is stopping) time to finish.
fn wait_for_previous(mnt: &Path, state: &StateDir) -> std::io::Result<()> {
    let deadline = Instant::now() + STOPPING_GRACE;
    while let Some(pid) = state.running_pid() {
        if pid == std::process::id() {
            return Ok(());
        }
        let mounted = mount::mount_at(mnt)?.is_some_and(|m| m.fstype.starts_with("fuse"));
        if mounted || Instant::now() >= deadline {
            return Err(fail(format!(
                "state directory {} is in use by daemon pid {pid}",
                state.dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn run_daemon(mnt: &Path, opts: &MountOpts, tell_parent: bool) -> std::io::Result<()> {
    let state = state_of(opts, mnt);
    let user_quota = opts
        .user_quota
        .limit(|| kernel_glue::procfs::meminfo().map(|m| m.mem_total))
        .map_err(|e| fail(format!("--user-quota {}: {e}", opts.user_quota.to_arg())))?;
    // One descriptor per backing file and one pidfd per attached process: a service
    // manager's default soft limit (1,024) would cap regions and attachers.
    match process::raise_nofile_limit() {
        Ok(n) => log::debug!("descriptor limit {n}"),
        Err(e) => log::warn!("cannot raise the descriptor limit: {e}"),
    }
    state.prepare()?;
    wait_for_previous(mnt, &state)?;
    clear_mountpoint(mnt, &state)?;
    let socket = state.socket();
    if socket.as_os_str().len() >= mshare_uapi::SOCKET_PATH_LEN {
        return Err(fail(format!(
            "state directory path too long for a socket: {}",
            socket.display()
        )));
    }
    paths::register(mnt, &state.dir).map_err(|e| at(&paths::registry_entry(mnt), e))?;

    let saved = if state.state_file().exists() {
        Some(
            Tree::load(&state.state_file())
                .map_err(|e| fail(format!("cannot read {}: {e}", state.state_file().display())))?,
        )
    } else {
        None
    };
    let has_hugetlb_regions = saved
        .as_ref()
        .is_some_and(|t| t.regions().any(|(_, r)| r.store == Store::Hugetlb));
    let hugetlb = hugetlb_available();
    let default = match (opts.backing, &saved) {
        (Some(Store::Hugetlb), _) if !hugetlb => {
            return Err(fail(
                "--backing hugetlb: no huge pages can be had on this machine".into(),
            ));
        }
        (Some(b), _) => b,
        (None, Some(t)) if t.default_store != Store::Hugetlb || hugetlb => t.default_store,
        (None, _) if hugetlb => Store::Hugetlb,
        (None, _) => Store::Thp,
    };
    let stores = Stores::open(&state.dir, hugetlb || has_hugetlb_regions)
        .map_err(|e| at(&state.backing_dir(), e))?;
    let mut tree = saved.unwrap_or_else(|| Tree::new(default));
    tree.default_store = default;
    let core = Arc::new(Core::new(
        tree,
        stores,
        state.state_file(),
        socket.clone(),
        user_quota,
        opts.unmap_guard,
    ));
    core.recover();
    crate::shm::recover(&core);
    crate::attachers::spawn_watcher(core.clone());
    crate::attach::serve(core.clone(), &socket).map_err(|e| at(&socket, e))?;
    crate::shm::spawn_reconciler(core.clone());
    shrinker::spawn(
        core.clone(),
        crate::tablecache::Policy {
            table_budget: opts.table_budget,
            psi_threshold: opts.psi_threshold,
            grace: Duration::from_secs(1),
        },
    );

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("msharefs".into()),
        MountOption::Subtype("msharefs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(4);
    let session = fuser::Session::new(MshareFuse::new(core.clone()), mnt, &config)
        .map_err(|e| fail(format!("cannot mount {}: {e}", mnt.display())))?;
    let bg = session.spawn().map_err(|e| at(mnt, e))?;
    // The session threads answer now, so stat of our own root cannot deadlock.
    let dev = kfd::stat(mnt).map_err(|e| at(mnt, e))?.dev;
    let _ = core.fuse_dev.set(dev);
    let _ = core.mountpoint.set(mnt.to_path_buf());
    let _ = core.notifier.set(bg.notifier());
    crate::hardening::drop_capabilities();
    std::fs::write(state.pid_file(), format!("{}\n", std::process::id()))
        .map_err(|e| at(&state.pid_file(), e))?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;
    // Last before ready: from here on the daemon reaches its end, which removes the link.
    if let Err(e) = paths::link_by_dev(dev, &socket) {
        // Clients then ask GET_INFO for the socket: one round trip more per attach.
        log::warn!(
            "cannot link the attach socket in {}: {e}",
            mshare_uapi::BY_DEV_DIR
        );
    }
    log::info!(
        "mounted {} (state {}, default backing {}, passthrough {})",
        mnt.display(),
        state.dir.display(),
        default.name(),
        core.passthrough.get().copied().unwrap_or(false)
    );
    match user_quota {
        Some(q) => log::info!("user quota: {q} bytes of region memory per uid (root exempt)"),
        None => log::info!("user quota: none"),
    }
    if tell_parent {
        println!("ready");
        let _ = std::io::stdout().flush();
        let _ = process::stdio_to_devnull();
    }
    notify::notify_or_log(&format!(
        "READY=1\nSTATUS=msharefs mounted on {} (state {})",
        mnt.display(),
        state.dir.display()
    ));

    // Ended by a signal (`msharefs umount`, systemd's stop) or by the kernel: `umount DIR`
    // (umount(8)) removes the mount and ends the connection, and the session returns.
    let by_kernel = loop {
        if signals.pending().next().is_some() {
            break false;
        }
        if bg.guard.is_finished() {
            break true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    notify::notify_or_log("STOPPING=1");
    // Hold the metadata lock to the end: no request changes state while we save and go.
    let inner = core.lock();
    if let Err(e) = inner.tree.save(&state.state_file()) {
        log::error!("cannot save state: {e}");
    }
    // After umount(8) the mount point is no longer ours: a new mount may already be
    // there, which must not be detached.
    if !by_kernel {
        if let Err(e) = mount::umount2(mnt, true) {
            if e.raw_os_error() != Some(EINVAL) {
                log::error!("cannot unmount {}: {e}", mnt.display());
            }
        }
    }
    let _ = std::fs::remove_file(state.pid_file());
    paths::unlink_by_dev(&socket);
    log::info!(
        "stopped ({}); region data kept in {}",
        if by_kernel { "unmounted" } else { "signalled" },
        state.dir.display()
    );
    // Exiting closes /dev/fuse, which ends the connection: open msharefs files get
    // ENOTCONN, while mappings (passthrough or hugetlb backing) keep working.
    std::process::exit(0);
}

/// `msharefs umount`: stops the daemon, removes the mount, and with `purge` destroys every
/// region and gives back every huge page the daemon added.
pub fn umount(mountpoint: &Path, purge: bool) -> std::io::Result<()> {
    if process::geteuid() != 0 {
        return Err(fail("msharefs umount needs root".into()));
    }
    let mnt = paths::absolute_mountpoint(mountpoint)?;
    let state = paths::state_dir_for(&mnt);
    if let Some(pid) = state.running_pid() {
        process::kill(pid, kernel_glue::consts::SIGTERM)?;
        // Until every thread is gone: only then are its host mappings (and so the pages
        // a purge gives back) released.
        if !process::wait_exited(pid, Duration::from_secs(20)) {
            log::warn!("daemon {pid} did not stop; killing it");
            let _ = process::kill(pid, kernel_glue::consts::SIGKILL);
            if !process::wait_exited(pid, Duration::from_secs(5)) {
                log::warn!("daemon {pid} still exiting after SIGKILL");
            }
        }
    }
    // A daemon that had to be killed left its link.
    paths::unlink_by_dev(&state.socket());
    let mut was_mounted = false;
    while let Some(m) = mount::mount_at(&mnt)? {
        if !m.fstype.starts_with("fuse") {
            break;
        }
        was_mounted = true;
        mount::umount2(&mnt, true)?;
    }
    if !purge {
        if !was_mounted && !state.state_file().exists() {
            return Err(fail(format!("{}: not an msharefs mount", mnt.display())));
        }
        println!(
            "msharefs: {} unmounted; regions kept in {}",
            mnt.display(),
            state.dir.display()
        );
        return Ok(());
    }
    let (pages, kept) = purge_state(&state)?;
    let _ = std::fs::remove_file(paths::registry_entry(&mnt));
    println!(
        "msharefs: {} unmounted and purged ({pages} huge pages given back)",
        mnt.display()
    );
    if !kept.is_empty() {
        println!(
            "msharefs: kept what msharefs did not create in {}: {}",
            state.dir.display(),
            kept.join(", ")
        );
    }
    Ok(())
}

/// Destroys every region of a state directory: unmounts the backing stores (pages still
/// mapped by a process go when it unmaps them), gives back the pool pages recorded, and
/// removes what msharefs created there ([`StateDir::purge`]); anything else stays.
/// Returns the pages given back and the names kept.
fn purge_state(state: &StateDir) -> std::io::Result<(u64, Vec<String>)> {
    if state.dir.exists() && !state.is_marked() {
        return Err(fail(format!(
            "{}: not an msharefs state directory (no {}); nothing unmounted or removed",
            state.dir.display(),
            paths::MARKER
        )));
    }
    let pages = match Tree::load(&state.state_file()) {
        Ok(t) => t.regions().map(|(_, r)| r.pool_pages).sum(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(at(&state.state_file(), e)),
    };
    let backing = state.backing_dir();
    for s in ALL_STORES {
        let dir = backing.join(s.name());
        while mount::mount_at(&dir)?.is_some() {
            mount::umount2(&dir, true).map_err(|e| at(&dir, e))?;
        }
    }
    hugepages::give_back(pages)?;
    let kept = state.purge(&ALL_STORES.map(|s| s.name()))?;
    Ok((pages, kept))
}
