//! CI check that the benchmark keeps working: `msharefs-bench --quick` runs every
//! configuration (the `limit` reference included), and `msharefs-bench --quick --storm 8`
//! a storm of 8 attachers of every configuration; both exit successfully, clean up (no
//! mount left, the huge-page pool back where it was) and write JSON with every field of
//! the schema for every configuration, plus the CSV and the SVG chart. It asserts nothing
//! about speed.
//!
//! Needs root, `/dev/fuse` and hugetlbfs: outside CI it skips loudly without them; with
//! `CI` set it fails. It holds `/run/msharefs/test-pool.lock` for its whole run (the bench
//! itself takes no lock unless given `--lock`), so no other test changes the pool
//! meanwhile. The bench finds the workspace's own `msharefs` next to itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msharefs_tests::mountguard::{artifacts, msharefs_bin};
use msharefs_tests::{PoolGuard, TempDir, loud, require_privileged};

const CONFIGS: [&str; 5] = [
    "shmem-4k",
    "hugetlb-kernel-placed",
    "thp",
    "msharefs-hugetlb",
    "limit",
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
const STORM_FIELDS: [&str; 6] = [
    "attachers",
    "size_gib",
    "finished",
    "wall_ms",
    "faults_per_attacher",
    "faults_per_attacher_per_gib",
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

/// Runs `msharefs-bench ARGS --json --csv --plot` into `dir` (named by `tag`), stopping
/// it with SIGTERM (on which it cleans up) past [`LIMIT`]; checks that it succeeded and
/// left no mount behind, and returns the parsed JSON and the CSV.
fn run_bench(bin: &Path, dir: &Path, tag: &str, args: &[&str]) -> (serde_json::Value, String) {
    let file = |ext: &str| dir.join(format!("{tag}.{ext}"));
    let (json, csv, svg) = (file("json"), file("csv"), file("svg"));
    let stdout = std::fs::File::create(file("stdout")).expect("stdout file");
    let stderr = std::fs::File::create(file("stderr")).expect("stderr file");
    let mut child = Command::new(bin)
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&svg)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start msharefs-bench");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for msharefs-bench") {
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
    let out = std::fs::read_to_string(file("stdout")).unwrap_or_default();
    let err = std::fs::read_to_string(file("stderr")).unwrap_or_default();
    loud(&format!(
        "msharefs-bench {} output ({:.0} s):\n{out}",
        args.join(" "),
        started.elapsed().as_secs_f64()
    ));
    let status = status.unwrap_or_else(|| panic!("msharefs-bench {args:?} hung:\n{err}"));
    assert!(
        status.success(),
        "msharefs-bench {args:?} failed ({status}):\n{err}"
    );
    let left = bench_leftovers();
    assert!(left.is_empty(), "the bench left mounts behind: {left:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written"))
            .expect("JSON parses");
    let svg = std::fs::read_to_string(&svg).expect("SVG written");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG"
    );
    (v, std::fs::read_to_string(&csv).expect("CSV written"))
}

/// The names of the entries of `list`, in order.
fn names(list: &[serde_json::Value]) -> Vec<&str> {
    list.iter().filter_map(|c| c["name"].as_str()).collect()
}

fn assert_numbers(entry: &serde_json::Value, fields: &[&str]) {
    for f in fields {
        assert!(
            entry[f].as_f64().is_some_and(f64::is_finite),
            "{}: field {f} missing or not a number: {}",
            entry["name"],
            entry[f]
        );
    }
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn bench_quick_produces_every_field() {
    if !require_privileged("bench_quick_produces_every_field") {
        return;
    }
    // The binaries of the code under test, built on first use (see mountguard): before
    // taking the pool lock, so a build does not hold up other tests.
    let _ = msharefs_bin();
    let bin: PathBuf = artifacts().join("msharefs-bench");
    assert!(bin.exists(), "{} was not built", bin.display());
    let _pool = PoolGuard::new();
    let dir = TempDir::new("bench-quick").expect("scratch directory");

    let (v, csv) = run_bench(&bin, dir.path(), "bench", &["--quick"]);
    let configs = v["configs"].as_array().expect("configs is an array");
    assert_eq!(
        names(configs),
        CONFIGS,
        "one entry per configuration, in order"
    );
    for c in configs {
        assert_numbers(c, &NUMBER_FIELDS);
        assert_eq!(c["attachers"].as_u64(), Some(4), "--quick runs 4 attachers");
        assert_eq!(c["size_gib"].as_u64(), Some(1), "--quick maps 1 GiB");
    }
    assert!(
        v["targets"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["target"].as_str().is_some_and(|s| s.contains("limit")))),
        "the limit ratio is judged: {}",
        v["targets"]
    );
    assert_eq!(csv.lines().count(), 1 + CONFIGS.len(), "CSV:\n{csv}");

    let (v, csv) = run_bench(&bin, dir.path(), "storm", &["--quick", "--storm", "8"]);
    let storm = v["storm"].as_array().expect("storm is an array");
    assert_eq!(
        names(storm),
        CONFIGS,
        "one storm per configuration, in order"
    );
    for c in storm {
        assert_numbers(c, &STORM_FIELDS);
        assert_eq!(c["attachers"].as_u64(), Some(8), "--storm 8");
        assert_eq!(
            c["finished"].as_u64(),
            Some(8),
            "{}: every attacher touched its region: {}",
            c["name"],
            c["note"]
        );
        assert!(c["wall_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{c}");
    }
    assert_eq!(csv.lines().count(), 1 + CONFIGS.len(), "CSV:\n{csv}");
}
