//! The host mm through a real mount: cached shared tables serve the first attacher and
//! attachers after everyone left; the table budget releases idle tables without touching
//! data, and keeps the tables of a slot someone maps without having asked the attach
//! socket; `msharefs stat` follows attaching, detaching and killed processes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use kernel_glue::mapping::Protection;
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{Attach, Helper, PoolGuard, Probe, loud, probe_bin, require_privileged};

const GIB: u64 = 1 << 30;

fn region<'a>(stat: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    stat["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in stat: {stat}"))
}

/// Polls `msharefs stat` until `ok` holds for the region, or panics after `limit`.
fn wait_for(
    fs: &Msharefs,
    path: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = fs.stat();
        let r = region(&s, path).clone();
        if ok(&r) {
            return r;
        }
        assert!(start.elapsed() < limit, "timed out waiting on {path}: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pids(r: &serde_json::Value) -> Vec<u64> {
    let mut v: Vec<u64> = r["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["pid"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn first_and_returning_attachers_link_the_host_tables() {
    if !require_privileged("first_and_returning_attachers_link_the_host_tables") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("hostmm-first", &["--backing", "hugetlb"]);
    let size = 4 * GIB;
    let p = fs.create_region("sga", size);
    // The daemon populates its host mapping in the background; stat shows the progress.
    let r = wait_for(&fs, "/sga", Duration::from_secs(300), |r| {
        r["populated"] == size
    });
    assert_eq!(r["tables_cached"], serde_json::json!(["rw"]));
    let first = Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadWrite)
            .touch()
            .write_pattern(3),
    )
    .unwrap();
    let later = Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadWrite)
            .touch()
            .check_pattern(3),
    )
    .unwrap();
    let reader = Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadOnly)
            .touch()
            .check_pattern(3),
    )
    .unwrap();
    for (who, rep) in [
        ("first", &first),
        ("after all left", &later),
        ("read-only", &reader),
    ] {
        let per_gib = rep.faults_per_gib().unwrap();
        loud(&format!(
            "host mm: {who} attacher of a 4 GiB region: {} minor faults ({per_gib:.2} per GiB), {} us",
            rep.touch_minor_faults.unwrap(),
            rep.touch_ns.unwrap() / 1000
        ));
        assert_eq!(rep.addr % GIB, 0);
        assert_eq!(rep.kernel_page_size, 2 << 20);
        assert!(per_gib <= 4.0, "{who}: {per_gib} faults per GiB");
    }
    assert_eq!(later.pattern_ok, Some(true));
    assert_eq!(reader.pattern_ok, Some(true));
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn zero_table_budget_releases_idle_tables_and_keeps_data() {
    if !require_privileged("zero_table_budget_releases_idle_tables_and_keeps_data") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount(
        "hostmm-budget",
        &["--backing", "hugetlb", "--table-budget", "0"],
    );
    let p = fs.create_region("pool", GIB);
    Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadWrite).write_pattern(11),
    )
    .unwrap();
    // Nobody attached: the shrinker releases the host tables.
    let r = wait_for(&fs, "/pool", Duration::from_secs(30), |r| {
        r["rw_slots_cached"] == 0 && r["ro_slots_cached"] == 0
    });
    assert_eq!(r["tables_cached"], serde_json::json!([]));
    assert_eq!(fs.stat()["totals"]["tables_cached_bytes"], 0);
    // The next attach rebuilds them (and links them), and the data is intact.
    let mut holder = Probe::spawn(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadWrite)
            .touch()
            .check_pattern(11)
            .hold(),
    )
    .unwrap();
    let rep = holder.report().unwrap();
    assert_eq!(rep.pattern_ok, Some(true));
    assert!(rep.faults_per_gib().unwrap() <= 4.0, "{rep:?}");
    // While it is attached the tables stay, whatever the budget.
    std::thread::sleep(Duration::from_secs(3));
    let r = region(&fs.stat(), "/pool").clone();
    assert_eq!(r["tables_cached"], serde_json::json!(["rw"]), "{r}");
    holder.finish().unwrap();
    wait_for(&fs, "/pool", Duration::from_secs(30), |r| {
        r["rw_slots_cached"] == 0
    });
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn a_mapper_unknown_to_the_socket_keeps_the_tables() {
    if !require_privileged("a_mapper_unknown_to_the_socket_keeps_the_tables") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount(
        "hostmm-stranger",
        &["--backing", "hugetlb", "--table-budget", "0"],
    );
    let p = fs.path("pool");
    // Held open (an open handle keeps the tables) until the stranger has mapped it.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.set_len(GIB).unwrap();
    let ino = f.metadata().unwrap().ino();
    let backing = fs.state_dir().join(format!("backing/hugetlb/{ino}"));
    // A root process maps the backing file by hand, at a 1 GiB boundary: the daemon's
    // attach socket never hears of it.
    let ops = Path::new(env!("CARGO_BIN_EXE_mshare-ops"));
    let mut stranger = Helper::spawn("raw mapper", ops, [Path::new("--raw"), &backing]).unwrap();
    let v = stranger.read_json(Duration::from_secs(30)).unwrap();
    assert!(v.get("error").is_none(), "{v}");
    drop(f);
    // With nobody attached the tables would go within seconds (the test above); the
    // shrinker's scan of /proc before it releases anything finds the stranger.
    std::thread::sleep(Duration::from_secs(15));
    let r = region(&fs.stat(), "/pool").clone();
    assert_eq!(r["tables_cached"], serde_json::json!(["rw"]), "{r}");
    assert_eq!(pids(&r), vec![stranger.pid() as u64]);
    // Its exit reaches the daemon through the pidfd the scan opened; then they go.
    stranger.finish(Duration::from_secs(30)).unwrap();
    wait_for(&fs, "/pool", Duration::from_secs(30), |r| {
        r["rw_slots_cached"] == 0
    });
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn stat_follows_attach_detach_and_kill() {
    if !require_privileged("stat_follows_attach_detach_and_kill") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("hostmm-stat", &["--backing", "hugetlb"]);
    let p = fs.create_region("shared", GIB);
    let mut probes: Vec<Probe> = (0..3)
        .map(|_| {
            let mut pr =
                Probe::spawn(probe_bin!(), &Attach::new(&p, Protection::ReadWrite).hold()).unwrap();
            pr.report().unwrap();
            pr
        })
        .collect();
    let mut want: Vec<u64> = probes
        .iter_mut()
        .map(|pr| pr.helper().pid() as u64)
        .collect();
    want.sort_unstable();
    let r = region(&fs.stat(), "/shared").clone();
    assert_eq!(pids(&r), want);
    assert_eq!(r["attached"][0]["comm"], "mshare-probe");
    // Attached at 1 GiB-aligned addresses: no page-table bytes of their own for this GiB,
    // against 3 x (2 MiB + 4 KiB) with 4 KiB pages.
    assert_eq!(r["pt_bytes"], 0);
    assert_eq!(r["pt_bytes_4k_equivalent"], 3 * ((2 << 20) + 4096));

    // kill -9 one.
    let mut victim = probes.remove(1);
    let vpid = victim.helper().pid() as u64;
    victim.helper().kill().unwrap();
    want.retain(|&p| p != vpid);
    wait_for(&fs, "/shared", Duration::from_secs(10), |r| pids(r) == want);
    // Detach another cleanly.
    let gone = probes.remove(0);
    drop(gone.finish());
    want.remove(0);
    let r = wait_for(&fs, "/shared", Duration::from_secs(10), |r| {
        pids(r).len() == 1
    });
    assert_eq!(pids(&r).len(), 1);
    for pr in probes {
        pr.finish().unwrap();
    }
    wait_for(&fs, "/shared", Duration::from_secs(10), |r| {
        pids(r).is_empty()
    });
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn attach_during_population_works() {
    if !require_privileged("attach_during_population_works") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("hostmm-early", &["--backing", "hugetlb"]);
    let p = fs.create_region("early", 2 * GIB);
    // Right away, while the daemon is still building its host tables.
    let early = region(&fs.stat(), "/early")["populated"].as_u64().unwrap();
    let rep = Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadWrite)
            .touch()
            .write_pattern(5),
    )
    .unwrap();
    assert!(rep.pattern_written);
    let check = Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadOnly).check_pattern(5),
    )
    .unwrap();
    assert_eq!(check.pattern_ok, Some(true));
    loud(&format!(
        "attach during population: {early} of {} bytes populated at attach, {} faults",
        2 * GIB,
        rep.touch_minor_faults.unwrap()
    ));
    wait_for(&fs, "/early", Duration::from_secs(300), |r| {
        r["populated"] == 2 * GIB
    });
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn a_partial_last_gib_shares_its_table_too() {
    if !require_privileged("a_partial_last_gib_shares_its_table_too") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("hostmm-tail", &["--backing", "hugetlb"]);
    // 2 GiB and 128 MiB: two whole GiB and 64 huge pages of a third one.
    let size = 2 * GIB + (128 << 20);
    let p = fs.create_region("sga", size);
    wait_for(&fs, "/sga", Duration::from_secs(300), |r| {
        r["populated"] == size
    });
    let writer = Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadWrite)
            .touch()
            .write_pattern(9),
    )
    .unwrap();
    let reader = Probe::run(
        probe_bin!(),
        &Attach::new(&p, Protection::ReadWrite)
            .touch()
            .check_pattern(9),
    )
    .unwrap();
    for (who, rep) in [("writer", &writer), ("reader", &reader)] {
        let faults = rep.touch_minor_faults.unwrap();
        loud(&format!(
            "host mm: {who} of a region of 2 GiB + 128 MiB took {faults} minor faults \
             (a table of its own for the last 128 MiB would take 64)"
        ));
        assert_eq!(rep.addr % GIB, 0);
        // One per GiB, the partial one included, and some slack; 64 for the last GiB
        // alone would mean its table is not shared.
        assert!(
            faults <= 8,
            "{who}: {faults} faults: the last GiB's table is not shared"
        );
    }
    assert_eq!(reader.pattern_ok, Some(true));
    // Every attacher counts as sharing, the last slot included.
    let r = region(&fs.stat(), "/sga").clone();
    assert_eq!(r["slots"], 3, "{r}");
}
