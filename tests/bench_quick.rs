//! CI check that the benchmark keeps working: `msharefs bench --quick` runs every
//! configuration, exits successfully, cleans up (no mount left, the huge-page pool back
//! where it was) and writes JSON with every field of the schema for every configuration,
//! plus the CSV and the SVG chart. It asserts nothing about speed.
//!
//! Needs root, `/dev/fuse` and hugetlbfs: outside CI it skips loudly without them; with
//! `CI` set it fails. It holds `/run/msharefs/test-pool.lock` for its whole run (and tells
//! the bench so, with `--no-pool-lock`), so no other test changes the pool meanwhile.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msharefs_tests::mountguard::msharefs_bin;
use msharefs_tests::{PoolGuard, TempDir, loud, require_privileged};

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

fn bench_leftovers() -> Vec<String> {
    kernel_glue::mount::mounts()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.target.to_string_lossy().contains("/msharefs-bench-"))
        .map(|m| format!("{} on {}", m.fstype, m.target.display()))
        .collect()
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn bench_quick_produces_every_field() {
    if !require_privileged("bench_quick_produces_every_field") {
        return;
    }
    // The daemon binary of the code under test, built on first use (see mountguard):
    // before taking the pool lock, so a build does not hold up other tests.
    let bin = msharefs_bin();
    let _pool = PoolGuard::new();
    let dir = TempDir::new("bench-quick").expect("scratch directory");
    let (json, csv, svg) = (
        dir.path().join("bench.json"),
        dir.path().join("bench.csv"),
        dir.path().join("bench.svg"),
    );
    let stdout = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
    let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
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
    let out = std::fs::read_to_string(dir.path().join("stdout")).unwrap_or_default();
    let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
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
