//! Region memory is charged to the cgroup of the process that sizes the region, for every
//! backing, and a size its cgroup cannot hold fails at the size call: a process in a fresh
//! cgroup with a limit creates and touches a region and the cgroup's usage grows by the
//! region's size (the hugetlb controller's for hugetlb; nothing moves when others map it);
//! a region larger than the limit is `ENOMEM` and changes nothing (pool, files, usage, no
//! OOM kill); a shmem region paged out by its creator (`MADV_PAGEOUT`, as the mshare
//! selftest `memory.c` does) goes to swap charged to that cgroup. `msharefs stat` reports
//! the cgroup. Each test creates its cgroups under this process's own and removes them, and
//! the swap test's swap file is always switched off and removed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use kernel_glue::cgroup::{self, Membership};
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{Helper, PoolGuard, PoolState, TempDir, in_ci, loud, probe_bin};
use msharefs_tests::{SETTLE, require_privileged};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

/// Fails the test (in CI) or skips it loudly when the machine lacks something.
fn missing(what: &str, why: &str) -> bool {
    let msg = format!("{what} needs {why}");
    assert!(!in_ci(), "CI is set, so this test may not skip: {msg}");
    loud(&format!("SKIPPED: {msg}"));
    true
}

/// A cgroup this test made; its processes go back to the parent and it is removed on
/// drop.
struct CgroupDir {
    path: PathBuf,
    parent: PathBuf,
}

impl CgroupDir {
    fn new(parent: &Path, tag: &str) -> CgroupDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = parent.join(format!("msharefs-test-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        CgroupDir {
            path,
            parent: parent.to_path_buf(),
        }
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.path.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {}/{file}: {e}", self.path.display()));
    }

    fn read_u64(&self, file: &str) -> u64 {
        let t = std::fs::read_to_string(self.path.join(file)).unwrap();
        t.trim().parse().unwrap_or_else(|_| panic!("{file}: {t}"))
    }

    /// A `memory.stat` field.
    fn stat_field(&self, key: &str) -> u64 {
        let t = std::fs::read_to_string(self.path.join("memory.stat")).unwrap();
        t.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(self.parent.join("cgroup.procs"), pid);
        }
        let mut last = None;
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            // A process that just exited leaves the cgroup a moment later.
            std::thread::sleep(Duration::from_millis(20));
        }
        let msg = format!(
            "LEAK: cannot remove cgroup {}: {last:?}",
            self.path.display()
        );
        loud(&msg);
        if !std::thread::panicking() {
            panic!("{msg}");
        }
    }
}

/// This process's cgroup that `controller` accounts for.
fn own(controller: &str) -> Option<Membership> {
    cgroup::memberships(std::process::id())
        .unwrap()
        .into_iter()
        .find(|m| m.has(controller))
}

/// The v2 hugetlb controller enabled for this process's children (and disabled again on
/// drop when this guard enabled it).
struct HugetlbController {
    dir: PathBuf,
    enabled_here: bool,
}

static CONTROLLER: Mutex<()> = Mutex::new(());

impl HugetlbController {
    fn enable() -> Option<HugetlbController> {
        let v2 = cgroup::memberships(std::process::id())
            .unwrap()
            .into_iter()
            .find(|m| m.v2)?;
        let available = std::fs::read_to_string(v2.dir.join("cgroup.controllers")).ok()?;
        if !available.split_whitespace().any(|c| c == "hugetlb") {
            return None;
        }
        let ctl = v2.dir.join("cgroup.subtree_control");
        let on = std::fs::read_to_string(&ctl).unwrap_or_default();
        let enabled_here = !on.split_whitespace().any(|c| c == "hugetlb");
        if enabled_here {
            std::fs::write(&ctl, "+hugetlb")
                .unwrap_or_else(|e| panic!("enable hugetlb in {}: {e}", ctl.display()));
        }
        Some(HugetlbController {
            dir: v2.dir,
            enabled_here,
        })
    }
}

impl Drop for HugetlbController {
    fn drop(&mut self) {
        if self.enabled_here {
            let ctl = self.dir.join("cgroup.subtree_control");
            if let Err(e) = std::fs::write(&ctl, "-hugetlb") {
                loud(&format!(
                    "LEAK: cannot disable hugetlb in {}: {e}",
                    ctl.display()
                ));
            }
        }
    }
}

/// The requirements of a hugetlb cgroup test: root, the pool guard, this binary's
/// controller lock and the v2 hugetlb controller enabled (`None`: skip, outside CI).
fn with_hugetlb_controller(
    what: &str,
) -> Option<(
    PoolGuard<'static>,
    std::sync::MutexGuard<'static, ()>,
    HugetlbController,
)> {
    if !require_privileged(what) {
        return None;
    }
    let pool = PoolGuard::new();
    let one = CONTROLLER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(ctl) = HugetlbController::enable() else {
        missing(what, "the hugetlb controller on the cgroup v2 hierarchy");
        return None;
    };
    Some((pool, one, ctl))
}

/// Runs `mshare-probe --join DIR... ARGS` to completion; its JSON report or error.
fn probe(join: &[&Path], args: &[&str]) -> Value {
    let mut a: Vec<&std::ffi::OsStr> = Vec::new();
    for d in join {
        a.push("--join".as_ref());
        a.push(d.as_os_str());
    }
    a.extend(args.iter().map(|s| std::ffi::OsStr::new(*s)));
    let mut h = Helper::spawn("mshare-probe", probe_bin!(), &a).unwrap();
    let v = h.read_json(LIMIT).unwrap();
    let _ = h.wait(LIMIT);
    v
}

fn region_row(fs: &Msharefs, path: &str) -> Value {
    let st = fs.stat();
    st["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == path)
        .cloned()
        .unwrap_or_else(|| panic!("no region {path}: {st}"))
}

/// Creates a region from inside `cg`, touches it from outside, removes it; checks the
/// cgroup's `usage` file grows by the size and goes back.
fn charged_to_creator(backing: &str, cg: &CgroupDir, usage: &str, size: u64) {
    let fs = Msharefs::mount(&format!("charge-{backing}"), &["--backing", backing]);
    let p = fs.path("r");
    let ps = p.to_str().unwrap();
    let before = cg.read_u64(usage);
    let c = probe(
        &[&cg.path],
        &[
            "create",
            ps,
            "--size",
            &size.to_string(),
            "--backing",
            backing,
        ],
    );
    assert!(c.get("error").is_none(), "{backing}: {c}");
    let after = cg.read_u64(usage);
    loud(&format!(
        "{backing}: {usage} of the creator's cgroup {} -> {} for a {} MiB region",
        before,
        after,
        size >> 20
    ));
    assert!(
        after >= before + size && after <= before + size + 16 * MIB,
        "{backing}: {usage} {before} -> {after}, region {size}"
    );
    let row = region_row(&fs, "/r");
    assert_eq!(
        row["cgroup"],
        cg.path.display().to_string(),
        "stat shows the cgroup: {row}"
    );
    // Another process (in this test's cgroup) maps and touches it all: nothing moves.
    let t = probe(&[], &["attach", ps, "--touch", "--stride", "4096"]);
    assert!(t.get("error").is_none(), "{backing}: {t}");
    let touched = cg.read_u64(usage);
    assert!(
        touched.abs_diff(after) <= 4 * MIB,
        "{backing}: {usage} moved from {after} to {touched} when another process touched it"
    );
    std::fs::remove_file(&p).unwrap();
    let mut gone = cg.read_u64(usage);
    for _ in 0..100 {
        if gone < before + 8 * MIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        gone = cg.read_u64(usage);
    }
    assert!(
        gone < before + 8 * MIB,
        "{backing}: {usage} {gone} after unlink"
    );
}

fn memory_test(backing: &str) {
    let what = format!("tmpfs_charged_to_creator_{backing}");
    if !require_privileged(&what) {
        return;
    }
    let Some(mem) = own("memory") else {
        missing(&what, "a cgroup memory controller");
        return;
    };
    let cg = CgroupDir::new(&mem.dir, backing);
    let (limit, usage) = if mem.v2 {
        ("memory.max", "memory.current")
    } else {
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
    };
    cg.write(limit, &(512 * MIB).to_string());
    charged_to_creator(backing, &cg, usage, 128 * MIB);
}

#[test]
#[ignore = "needs root: mounts msharefs, creates cgroups"]
fn shmem_region_is_charged_to_its_creator() {
    memory_test("shmem");
}

#[test]
#[ignore = "needs root: mounts msharefs, creates cgroups"]
fn thp_region_is_charged_to_its_creator() {
    memory_test("thp");
}

#[test]
#[ignore = "needs root: mounts msharefs, creates cgroups, grows the huge-page pool"]
fn hugetlb_region_is_charged_to_its_creator() {
    let Some((_pool, _one, ctl)) =
        with_hugetlb_controller("hugetlb_region_is_charged_to_its_creator")
    else {
        return;
    };
    let cg = CgroupDir::new(&ctl.dir, "hugetlb");
    cg.write("hugetlb.2MB.max", &(256 * MIB).to_string());
    charged_to_creator("hugetlb", &cg, "hugetlb.2MB.current", 128 * MIB);
    // The reservation was charged with the pages (fallocate), and given back with them.
    assert_eq!(cg.read_u64("hugetlb.2MB.rsvd.current"), 0);
    drop(cg);
}

/// A region larger than what its creator's cgroup may hold fails at the size call with
/// `ENOMEM`; no file, no pool page and no charge remain, and nothing is OOM-killed.
#[test]
#[ignore = "needs root: mounts msharefs, creates cgroups, grows the huge-page pool"]
fn a_region_larger_than_the_limit_fails_at_the_size_call() {
    let what = "a_region_larger_than_the_limit_fails_at_the_size_call";
    let Some((_pool, _one, ctl)) = with_hugetlb_controller(what) else {
        return;
    };
    let Some(mem) = own("memory") else {
        missing(what, "a cgroup memory controller");
        return;
    };
    let memcg = CgroupDir::new(&mem.dir, "limit");
    let (limit, usage) = if mem.v2 {
        ("memory.max", "memory.current")
    } else {
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
    };
    memcg.write(limit, &(64 * MIB).to_string());
    let hcg = CgroupDir::new(&ctl.dir, "limit");
    hcg.write("hugetlb.2MB.max", &(64 * MIB).to_string());
    for backing in ["shmem", "thp", "hugetlb"] {
        let fs = Msharefs::mount(&format!("limit-{backing}"), &["--backing", backing]);
        let p = fs.path("big");
        let pool = PoolState::read();
        let used = memcg.read_u64(usage);
        let v = probe(
            &[&memcg.path, &hcg.path],
            &[
                "create",
                p.to_str().unwrap(),
                "--size",
                &(128 * MIB).to_string(),
                "--backing",
                backing,
            ],
        );
        assert_eq!(v["errno"], kernel_glue::errnos::ENOMEM, "{backing}: {v}");
        let names: Vec<_> = std::fs::read_dir(fs.mountpoint())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("mshare_info")],
            "{backing}"
        );
        assert_eq!(fs.stat()["regions"].as_array().unwrap().len(), 0);
        let now = PoolState::wait_until(SETTLE, |s| s.nr_hugepages == pool.nr_hugepages);
        assert_eq!(
            now.nr_hugepages, pool.nr_hugepages,
            "{backing}: pool changed"
        );
        assert_eq!(hcg.read_u64("hugetlb.2MB.current"), 0, "{backing}");
        assert!(
            memcg.read_u64(usage) <= used + 4 * MIB,
            "{backing}: charged"
        );
        loud(&format!(
            "{backing}: a 128 MiB region in a 64 MiB cgroup: {v}"
        ));
    }
    if !mem.v2 {
        let oom = std::fs::read_to_string(memcg.path.join("memory.oom_control")).unwrap();
        assert!(oom.contains("oom_kill 0"), "OOM kills: {oom}");
    }
}

/// A swap file for the length of a test: `swapon` on creation, `swapoff` and removal on
/// drop, also when the test fails.
struct SwapFile {
    path: PathBuf,
    on: bool,
    _dir: TempDir,
}

impl SwapFile {
    fn new(size: u64) -> Result<SwapFile, String> {
        let dir = TempDir::new("swap").map_err(|e| e.to_string())?;
        let path = dir.path().join("swapfile");
        let mut sw = SwapFile {
            path,
            on: false,
            _dir: dir,
        };
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        // Written, not fallocated: swapon refuses files with holes or unwritten extents.
        run(Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", sw.path.display()))
            .arg("bs=1M")
            .arg(format!("count={}", size >> 20))
            .arg("status=none"))?;
        std::fs::set_permissions(
            &sw.path,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|e| e.to_string())?;
        run(Command::new("mkswap").arg("-q").arg(&sw.path))?;
        run(Command::new("swapon").arg(&sw.path))?;
        sw.on = true;
        Ok(sw)
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if self.on {
            let ok = Command::new("swapoff")
                .arg(&self.path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                loud(&format!("LEAK: swapoff {} failed", self.path.display()));
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bytes of swap in use, from `/proc/swaps`.
fn swap_used() -> u64 {
    let t = std::fs::read_to_string("/proc/swaps").unwrap();
    t.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// The mshare selftest `memory.c` sequence on a shmem region: the creator, in a fresh
/// cgroup, writes every page and pages the region out with `MADV_PAGEOUT`; the swap is
/// charged to its cgroup.
#[test]
#[ignore = "needs root: mounts msharefs, creates cgroups, enables a temporary swap file"]
fn madv_pageout_of_a_shmem_region_swaps_to_the_creators_cgroup() {
    let what = "madv_pageout_of_a_shmem_region_swaps_to_the_creators_cgroup";
    if !require_privileged(what) {
        return;
    }
    let Some(mem) = own("memory") else {
        missing(what, "a cgroup memory controller");
        return;
    };
    let size = 64 * MIB;
    let swap = match SwapFile::new(2 * size) {
        Ok(s) => s,
        Err(e) => {
            // Not a skip: without swap this test cannot show what it must.
            panic!("cannot enable a swap file on this machine: {e}");
        }
    };
    let cg = CgroupDir::new(&mem.dir, "swap");
    let (limit, swap_file) = if mem.v2 {
        ("memory.max", "memory.swap.current")
    } else {
        ("memory.limit_in_bytes", "")
    };
    cg.write(limit, &(512 * MIB).to_string());
    let fs = Msharefs::mount("swap", &["--backing", "shmem"]);
    let p = fs.path("r");
    let ps = p.to_str().unwrap();
    let c = probe(
        &[&cg.path],
        &[
            "create",
            ps,
            "--size",
            &size.to_string(),
            "--backing",
            "shmem",
        ],
    );
    assert!(c.get("error").is_none(), "{c}");
    let ops_bin = Path::new(env!("CARGO_BIN_EXE_mshare-ops"));
    let mut ops = Helper::spawn(
        "creator",
        ops_bin,
        [
            std::ffi::OsStr::new("--join"),
            cg.path.as_os_str(),
            p.as_os_str(),
        ],
    )
    .unwrap();
    let hello = ops.read_json(LIMIT).unwrap();
    assert!(hello.get("error").is_none(), "{hello}");
    let mut cmd = |line: &str| {
        ops.write_line(line).unwrap();
        let v = ops.read_json(LIMIT).unwrap();
        assert!(v.get("error").is_none(), "`{line}`: {v}");
        v
    };
    cmd("fill 1");
    cmd(&format!("madvise 0 {size} pageout"));
    let used = swap_used();
    // MADV_PAGEOUT writes the pages to swap and leaves them in the swap cache, charged to
    // the cgroup as memory (v1 `swapcached`); v2 charges the swap at once
    // (`memory.swap.current`), v1 when a page leaves the swap cache, which the cgroup's
    // own pressure does: lower its limit for a moment.
    let swapcached = cg.stat_field("swapcached");
    // v1: pages in swap, out of memory (`swap`) or still in the swap cache too
    // (`swapcached`): both hold a swap slot charged to this cgroup.
    let swap_now = || {
        if mem.v2 {
            cg.read_u64(swap_file)
        } else {
            cg.stat_field("swap") + cg.stat_field("swapcached")
        }
    };
    if !mem.v2 {
        cg.write(limit, &(16 * MIB).to_string());
        cg.write(limit, &(512 * MIB).to_string());
    }
    loud(&format!(
        "after MADV_PAGEOUT: swap in use {} MiB, the cgroup's swapcached {} MiB",
        used >> 20,
        swapcached >> 20
    ));
    assert!(used >= size * 9 / 10, "swap used: {used}");
    let swapped = swap_now();
    if !mem.v2 {
        loud(&format!(
            "v1 memory.stat after the squeeze: swap {} MiB, swapcached {} MiB",
            cg.stat_field("swap") >> 20,
            cg.stat_field("swapcached") >> 20
        ));
    }
    loud(&format!(
        "shmem region of {} MiB paged out by its creator: {} MiB of swap charged to its cgroup",
        size >> 20,
        swapped >> 20
    ));
    assert!(swapped >= size * 9 / 10, "swap charged: {swapped}");
    let row = region_row(&fs, "/r");
    assert_eq!(row["cgroup"], cg.path.display().to_string(), "{row}");
    // The data comes back from swap.
    assert_eq!(cmd("load 4096")["value"], 1);
    ops.close_stdin();
    let _ = ops.wait(LIMIT);
    std::fs::remove_file(&p).unwrap();
    drop(fs);
    drop(cg);
    drop(swap);
}
