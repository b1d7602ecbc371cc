//! CI check that the benchmark keeps working: `msharefs bench --quick` runs every
//! configuration, exits successfully, cleans up (no mount left, the huge-page pool back
//! where it was) and writes JSON with every field of the schema for every configuration,
//! plus the CSV and the SVG chart. It asserts nothing about speed.
//!
//! Needs root, `/dev/fuse` and hugetlbfs: outside CI it skips loudly without them; with
//! `CI` set it fails. It holds `/run/msharefs/test-pool.lock` for its whole run (and tells
//! the bench so, with `--no-pool-lock`), so no other test changes the pool meanwhile.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kernel_glue::fd::FileLock;
use kernel_glue::hugepages;
use msharefs_tests::mountguard::msharefs_bin;

const TEST_POOL_LOCK: &str = "/run/msharefs/test-pool.lock";
const CONFIGS: [&str; 4] = [
    "shmem-4k",
    "hugetlb-kernel-placed",
    "thp",
    "msharefs-hugetlb",
];
const NUMBER_FIELDS: [&str; 7] = [
    "attachers",
    "size_gib",
    "pt_bytes_per_attacher_per_gib",
    "faults_per_attacher_per_gib",
    "attach_touch_ms_median",
    "attach_touch_ms_p99",
    "bandwidth_ratio",
];
/// `--quick` takes well under a minute here; allow a slow CI machine.
const LIMIT: Duration = Duration::from_secs(600);

fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

/// Root, `/dev/fuse` and hugetlbfs, or: with `CI` set a failure, otherwise a loud skip.
fn privileged(test: &str) -> bool {
    let mut missing = Vec::new();
    if kernel_glue::process::geteuid() != 0 {
        missing.push("root");
    }
    if !std::fs::metadata("/dev/fuse").is_ok_and(|m| m.file_type().is_char_device()) {
        missing.push("the /dev/fuse character device");
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("hugetlbfs"))
    {
        missing.push("hugetlbfs");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test} needs {}", missing.join(", "));
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("CI is set, so this test may not skip: {msg}");
    }
    loud(&format!(
        "SKIPPED: {msg}. Run as root on a machine with FUSE and hugetlbfs; \
         with CI=1 a missing requirement fails the test."
    ));
    false
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checks on drop (also while a failing test unwinds) that `vm.nr_hugepages` is back to
/// what it was; gives back any difference and reports it.
struct PoolCheck {
    before: u64,
}

impl Drop for PoolCheck {
    fn drop(&mut self) {
        let now = hugepages::nr_hugepages().expect("read vm.nr_hugepages");
        if now == self.before {
            return;
        }
        let msg = format!(
            "HUGE PAGE POOL NOT RESTORED: vm.nr_hugepages is {now}, was {}",
            self.before
        );
        loud(&msg);
        if now > self.before {
            let _ = hugepages::give_back(now - self.before);
        }
        if !std::thread::panicking() {
            panic!("{msg}");
        }
    }
}

fn bench_leftovers() -> Vec<String> {
    kernel_glue::mount::mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.target.to_string_lossy().contains("/msharefs-bench-"))
        .map(|m| format!("{} on {}", m.fstype, m.target.display()))
        .collect()
}

#[test]
fn bench_quick_produces_every_field() {
    if !privileged("bench_quick_produces_every_field") {
        return;
    }
    // The daemon binary of the code under test, built on first use (see mountguard):
    // before taking the pool lock, so a build does not hold up other tests.
    let bin = msharefs_bin();
    let _lock = FileLock::exclusive(Path::new(TEST_POOL_LOCK))
        .unwrap_or_else(|e| panic!("cannot lock {TEST_POOL_LOCK}: {e}"));
    let _pool = PoolCheck {
        before: hugepages::nr_hugepages().expect("read vm.nr_hugepages"),
    };
    let dir = Scratch(
        std::env::temp_dir().join(format!("msharefs-test-bench-quick-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).expect("scratch directory");
    let (json, csv, svg) = (
        dir.0.join("bench.json"),
        dir.0.join("bench.csv"),
        dir.0.join("bench.svg"),
    );
    let stdout = std::fs::File::create(dir.0.join("stdout")).expect("stdout file");
    let stderr = std::fs::File::create(dir.0.join("stderr")).expect("stderr file");
    let mut child = Command::new(&bin)
        .args(["bench", "--quick", "--no-pool-lock", "--json"])
        .arg(&json)
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&svg)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start msharefs bench");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for msharefs bench") {
            break Some(s);
        }
        if started.elapsed() > LIMIT {
            // SIGTERM first: the bench cleans up on it.
            let _ = kernel_glue::process::kill(child.id(), kernel_glue::consts::SIGTERM);
            std::thread::sleep(Duration::from_secs(20));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(dir.0.join("stdout")).unwrap_or_default();
    let err = std::fs::read_to_string(dir.0.join("stderr")).unwrap_or_default();
    loud(&format!("msharefs bench --quick output:\n{out}"));
    let status = status.unwrap_or_else(|| panic!("msharefs bench --quick hung:\n{err}"));
    assert!(
        status.success(),
        "msharefs bench --quick failed ({status}):\n{err}"
    );
    let left = bench_leftovers();
    assert!(left.is_empty(), "the bench left mounts behind: {left:?}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written"))
            .expect("JSON parses");
    let configs = v["configs"].as_array().expect("configs is an array");
    let names: Vec<&str> = configs.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, CONFIGS, "one entry per configuration, in order");
    for c in configs {
        for f in NUMBER_FIELDS {
            assert!(
                c[f].as_f64().is_some_and(f64::is_finite),
                "{}: field {f} missing or not a number: {}",
                c["name"],
                c[f]
            );
        }
        assert_eq!(c["attachers"].as_u64(), Some(4), "--quick runs 4 attachers");
        assert_eq!(c["size_gib"].as_u64(), Some(1), "--quick maps 1 GiB");
    }
    let csv = std::fs::read_to_string(&csv).expect("CSV written");
    assert_eq!(csv.lines().count(), 1 + CONFIGS.len(), "CSV:\n{csv}");
    let svg = std::fs::read_to_string(&svg).expect("SVG written");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG"
    );
}
