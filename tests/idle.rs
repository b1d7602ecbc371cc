//! The daemon's idle cost does not grow with the processes on the machine: with 1,000 idle
//! attachers of one hugetlb region, and with no attacher but 4,000 unrelated processes, it
//! reads far less over a minute than one scan of every `/proc/PID/maps` a second would
//! (what the shrinker did before it learned of attachers from the attach socket and of
//! their exits from pidfds). It holds one pidfd per attacher and lets go of each when the
//! process exits. The daemon's CPU time over each minute is printed, not asserted
//! (`docs/BENCHMARKS.md`, "Daemon idle cost").

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kernel_glue::mapping::Protection;
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::seeded::env_u64;
use msharefs_tests::{Attach, PoolGuard, Probe, loud, probe_bin, require_privileged};

const GIB: u64 = 1 << 30;
/// How long each idle phase is measured.
const WINDOW: Duration = Duration::from_secs(60);

/// CPU time (user + system, clock ticks) and bytes read (`rchar`) of a process so far.
#[derive(Debug, Clone, Copy)]
struct Usage {
    ticks: u64,
    rchar: u64,
}

fn usage(pid: u32) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    // Fields after the command name, which may contain spaces: state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("daemon io");
    let rchar = io
        .lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar");
    Usage { ticks, rchar }
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// Bytes one pass over every `/proc/PID/maps` on the machine reads now.
fn one_scan_bytes() -> u64 {
    kernel_glue::procfs::pids()
        .expect("/proc")
        .into_iter()
        .map(|pid| std::fs::read(format!("/proc/{pid}/maps")).map_or(0, |b| b.len() as u64))
        .sum()
}

/// The daemon's pidfds (`anon_inode:[pidfd]` descriptors).
fn pidfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon fds")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("[pidfd]"))
        })
        .count()
}

fn processes() -> usize {
    kernel_glue::procfs::pids().expect("/proc").len()
}

/// Measures the daemon over `WINDOW` and checks it read less than a tenth of what a scan of
/// `/proc` every second would have.
fn measure(what: &str, daemon: u32, hz: u64) {
    let before = usage(daemon);
    let t = Instant::now();
    std::thread::sleep(WINDOW);
    let after = usage(daemon);
    let secs = t.elapsed().as_secs_f64();
    let scan = one_scan_bytes();
    let cpu = (after.ticks - before.ticks) as f64 / hz as f64;
    let read = after.rchar - before.rchar;
    loud(&format!(
        "idle daemon, {what}: {cpu:.2} s CPU in {secs:.0} s = {:.3}% of a core; read {read} \
         bytes ({:.2} scans of /proc/*/maps, one scan = {scan} bytes over {} processes)",
        100.0 * cpu / secs,
        read as f64 / scan as f64,
        processes()
    ));
    let per_second = scan * WINDOW.as_secs();
    assert!(
        read < per_second / 10,
        "{what}: the daemon read {read} bytes in {secs:.0} s; one /proc scan a second reads \
         {per_second}"
    );
}

/// Unrelated processes (`sleep`), killed and reaped on drop; each also dies with the test
/// (parent-death signal).
struct Crowd(Vec<Child>);

impl Crowd {
    fn spawn(n: usize) -> Crowd {
        let mut c = Crowd(Vec::with_capacity(n));
        for _ in 0..n {
            let mut cmd = Command::new("sleep");
            cmd.arg("3600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: runs between fork and exec; prctl through kernel-glue allocates
            // nothing and takes no lock (see harness::Helper::spawn).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    kernel_glue::process::set_parent_death_signal(kernel_glue::consts::SIGKILL)
                });
            }
            c.0.push(cmd.spawn().expect("spawn sleep"));
        }
        c
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        for ch in &mut self.0 {
            let _ = ch.kill();
        }
        for ch in &mut self.0 {
            let _ = ch.wait();
        }
    }
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn idle_cost_does_not_grow_with_processes() {
    if !require_privileged("idle_cost_does_not_grow_with_processes") {
        return;
    }
    let attachers = env_u64("MSHAREFS_IDLE_ATTACHERS", 1000) as usize;
    let others = env_u64("MSHAREFS_IDLE_PROCESSES", 4000) as usize;
    let hz = clock_ticks_per_second();
    let _pool = PoolGuard::new();
    // A table budget, so the shrinker may release tables and the rare reconcile with /proc
    // is on; large enough to keep the idle region's tables cached when nobody is attached.
    let fs = Msharefs::mount("idle", &["--backing", "hugetlb", "--table-budget", "1G"]);
    let daemon = fs.daemon_pid();
    let p = fs.create_region("idle", GIB);

    // 1. Idle attachers: each attaches through the socket and sleeps.
    let t = Instant::now();
    let mut probes: Vec<Probe> = (0..attachers)
        .map(|_| {
            Probe::spawn(probe_bin!(), &Attach::new(&p, Protection::ReadWrite).hold()).unwrap()
        })
        .collect();
    for pr in &mut probes {
        let rep = pr.report().expect("attach");
        assert_eq!(rep.addr % GIB, 0);
    }
    loud(&format!(
        "idle: {attachers} attachers attached in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    // Each registration is checked once, 5 s after its attach: let that pass.
    std::thread::sleep(Duration::from_secs(10));
    measure(&format!("{attachers} idle attachers"), daemon, hz);
    // The daemon learned of each of them from the socket and watches each with a pidfd.
    assert_eq!(pidfds(daemon), attachers, "one pidfd per attacher");
    let st = fs.stat();
    let r = &st["regions"][0];
    assert_eq!(r["attached"].as_array().map(Vec::len), Some(attachers));
    assert_eq!(st["totals"]["sharing"].as_u64(), Some(attachers as u64));
    assert_eq!(r["tables_cached"], serde_json::json!(["rw"]));

    // Their exits reach the daemon through the pidfds.
    for pr in probes {
        pr.finish().expect("probe exits");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pidfds(daemon) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(pidfds(daemon), 0, "pidfds of exited attachers closed");

    // 2. No attacher, the tables still cached, and many unrelated processes.
    let t = Instant::now();
    let crowd = Crowd::spawn(others);
    loud(&format!(
        "idle: {others} unrelated processes started in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    std::thread::sleep(Duration::from_secs(3));
    measure(
        &format!("no attacher, {others} unrelated processes"),
        daemon,
        hz,
    );
    let st = fs.stat();
    assert_eq!(st["regions"][0]["attached"], serde_json::json!([]));
    assert_eq!(st["regions"][0]["tables_cached"], serde_json::json!(["rw"]));
    drop(crowd);
}
