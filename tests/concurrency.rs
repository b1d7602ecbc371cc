//! Concurrency: many processes create, attach, detach, unlink and rename regions at once,
//! on shared names (every worker uses `s0..s7`) and private ones, for a while. Every
//! operation must finish (a worker that is not done well after its time is a deadlock:
//! the test prints the daemon's and the workers' kernel stacks), fail only with errnos a
//! race explains (`mshare-stress` lists them: a name went or came; on the names created
//! through the plain uAPI also a region not sized yet or a backing change refused while
//! another worker has it open; never `EIO`), and leave no error in the daemon's log. Afterwards, with every name
//! removed: no region, no backing file in `STATE/backing/*`, no huge page added to the
//! pool, no descriptor or thread left in the daemon, and (checked by the mount guard) no
//! mount.
//!
//! CI: `MSHAREFS_STRESS_PROCS` (default 16) workers for `MSHAREFS_STRESS_SECS` (default
//! 20) seconds; `docs/RELIABILITY.md` has the long run (64 workers, 60 seconds).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::seeded::{env_u64, seed};
use msharefs_tests::{Helper, PoolGuard, PoolState, loud, require_privileged, thread_stacks};

fn stress_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mshare-stress"))
}

fn backing_files(fs: &Msharefs) -> Vec<String> {
    let mut v = Vec::new();
    for store in ["hugetlb", "thp", "shmem"] {
        let dir = fs.state_dir().join("backing").join(store);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            v.push(format!("{store}/{}", e.file_name().to_string_lossy()));
        }
    }
    v
}

fn count(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |d| d.count())
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn many_processes_churn_regions_without_deadlock_or_leak() {
    if !require_privileged("many_processes_churn_regions_without_deadlock_or_leak") {
        return;
    }
    let procs = env_u64("MSHAREFS_STRESS_PROCS", 16);
    let secs = env_u64("MSHAREFS_STRESS_SECS", 20);
    let seed = seed("MSHAREFS_STRESS_SEED");
    loud(&format!(
        "concurrency: {procs} processes for {secs} s, seed {seed} (MSHAREFS_STRESS_SEED)"
    ));
    let pool = PoolGuard::new();
    let before = pool.before();
    let fs = Msharefs::mount("churn", &["--backing", "hugetlb"]);
    let pid = fs.daemon_pid();
    let (fds_before, threads_before) = (count(pid, "fd"), count(pid, "task"));
    let mnt = fs.mountpoint();

    let started = Instant::now();
    let mut workers: Vec<Helper> = (0..procs)
        .map(|id| {
            let args = [
                "churn".to_string(),
                mnt.display().to_string(),
                "--id".into(),
                id.to_string(),
                "--secs".into(),
                secs.to_string(),
                "--seed".into(),
                seed.to_string(),
            ];
            Helper::spawn(&format!("churn {id}"), stress_bin(), &args).expect("spawn worker")
        })
        .collect();
    let mut total = 0u64;
    let mut ops: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut slowest = (0u64, String::new());
    let limit = Duration::from_secs(secs + 60);
    for w in &mut workers {
        let left = limit.saturating_sub(started.elapsed());
        let v = match w.read_json(left) {
            Ok(v) => v,
            Err(e) => {
                loud(&thread_stacks(pid, "DEADLOCK? daemon"));
                loud(&thread_stacks(w.pid(), "stuck worker"));
                panic!("{}: {e}\ndaemon log:\n{}", w.name(), fs.log());
            }
        };
        total += v["total"].as_u64().unwrap_or(0);
        for (k, n) in v["ops"].as_object().into_iter().flatten() {
            *ops.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
        for (k, n) in v["errors"].as_object().into_iter().flatten() {
            *errors.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
        for u in v["unexpected"].as_array().into_iter().flatten() {
            unexpected.push(format!("{}: {}", w.name(), u.as_str().unwrap_or("")));
        }
        let ms = v["slowest_ms"].as_u64().unwrap_or(0);
        if ms > slowest.0 {
            slowest = (ms, v["slowest_op"].as_str().unwrap_or("").to_string());
        }
    }
    for mut w in workers {
        w.finish(Duration::from_secs(30))
            .expect("worker exits cleanly");
    }
    let ran = started.elapsed();
    assert!(
        kernel_glue::process::alive(pid),
        "daemon died:\n{}",
        fs.log()
    );

    // Every create either renamed its hidden file into place or removed it.
    let hidden: Vec<String> = std::fs::read_dir(&mnt)
        .expect("readdir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".mshare-new."))
        .collect();
    assert!(hidden.is_empty(), "creates left hidden files: {hidden:?}");

    // Remove every name; then nothing may remain.
    for e in std::fs::read_dir(&mnt).expect("readdir").flatten() {
        let p = e.path();
        if e.file_name() == "mshare_info" {
            continue;
        }
        if p.is_dir() {
            std::fs::remove_dir_all(&p).expect("remove dir");
        } else {
            std::fs::remove_file(&p).expect("remove region");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let settled = loop {
        let regions = fs.stat()["regions"].as_array().map_or(0, |r| r.len());
        let files = backing_files(&fs);
        let pool_now = PoolState::read();
        let fds = count(pid, "fd");
        let threads = count(pid, "task");
        let done = regions == 0
            && files.is_empty()
            && pool_now.nr_hugepages == before.nr_hugepages
            && pool_now.surplus <= before.surplus
            && fds <= fds_before
            && threads <= threads_before;
        if done || Instant::now() > deadline {
            break (regions, files, pool_now, fds, threads);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = fs.log();
    let log_errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    let fmt = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    loud(&format!(
        "concurrency: {procs} processes, {total} operations in {:.1} s ({}); race errnos: \
         {}; slowest {} ms ({}); unexpected: {}; afterwards {} regions, {} backing files, \
         nr_hugepages {} (before {}), daemon fds {} (before {fds_before}), threads {} \
         (before {threads_before})",
        ran.as_secs_f64(),
        fmt(&ops),
        fmt(&errors),
        slowest.0,
        slowest.1,
        unexpected.len(),
        settled.0,
        settled.1.len(),
        settled.2.nr_hugepages,
        before.nr_hugepages,
        settled.3,
        settled.4,
    ));
    assert!(
        unexpected.is_empty(),
        "unexpected failures (the first {} of them; counts by op:errno above): {:#?}",
        unexpected.len().min(40),
        &unexpected[..unexpected.len().min(40)]
    );
    assert!(log_errors.is_empty(), "daemon log errors: {log_errors:#?}");
    assert_eq!(settled.0, 0, "regions left");
    assert!(settled.1.is_empty(), "backing files left: {:?}", settled.1);
    assert_eq!(
        settled.2.nr_hugepages, before.nr_hugepages,
        "pool pages left"
    );
    assert!(
        settled.2.surplus <= before.surplus,
        "surplus huge pages left"
    );
    assert!(settled.3 <= fds_before, "daemon descriptors leaked");
    assert!(settled.4 <= threads_before, "daemon threads leaked");
}
