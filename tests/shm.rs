//! POSIX and System V shared memory on msharefs through the `LD_PRELOAD` shim
//! (`MSHARE_MOUNT`, `MSHARE_SHM_MIN`), with the kernel as the oracle and Python's standard
//! library as an unmodified client.
//!
//! - `posix_and_sysv_behave_as_the_kernel_does`: `tests/shm/conformance.c` runs the same
//!   sequence of calls (names, flags, errnos, `fork`, `exec`, `SCM_RIGHTS`,
//!   `/proc/self/fd`, permissions of another user, `O_TRUNC`, `shm_unlink` from another
//!   process, `IPC_STAT`/`shm_nattch` across `fork`, `exec` and `kill -9`, fixed
//!   addresses, `IPC_SET`, `IPC_RMID` while attached, `ipcrm` without the shim) below the
//!   threshold (the kernel's own segments) and above it (segments on msharefs): every
//!   result must agree, and above it every mapping must be msharefs's, 1 GiB-aligned.
//! - `python_shared_memory_with_a_pool`: `multiprocessing.shared_memory`, 4 GiB shared by
//!   a Pool of 16 workers under `spawn` and under `forkserver`; each worker's mapping is
//!   the region's 1 GiB-aligned hugetlb backing and takes at most 2 faults per GiB; and
//!   when the program ends, or its parent is killed with `kill -9` (the resource tracker
//!   unlinks the segment), nothing is left.
//!
//! Both need root (mounts, the huge-page pool, uid 65534 in children); they leave no
//! region, pool page, `/dev/shm` file or System V segment behind (`ShmLeftovers`).

#[path = "support_lib.rs"]
mod support_lib;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use msharefs_tests::helper::Helper;
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{PoolGuard, ShmLeftovers, TempDir, loud, require_privileged};
use serde_json::Value;
use support_lib::{compile, libs, require_tool, run_helper};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const LIMIT: Duration = Duration::from_secs(300);

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// Waits until the mount holds no region and the pool is as it was: the memory of every
/// segment is back once its last descriptor and mapping are gone.
fn wait_all_freed(fs: &Msharefs, pool: &PoolGuard<'_>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let regions = fs.stat()["regions"].as_array().cloned().unwrap_or_default();
        let now = msharefs_tests::PoolState::read();
        let before = pool.before();
        if regions.is_empty()
            && now.nr_hugepages == before.nr_hugepages
            && now.surplus <= before.surplus
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {} regions ({regions:?}); pool {now:?}, before {before:?}",
            regions.len(),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool, runs children as uid 65534"]
fn posix_and_sysv_behave_as_the_kernel_does() {
    let what = "posix_and_sysv_behave_as_the_kernel_does";
    if !require_privileged(what) || !require_tool("gcc", what) || !require_tool("ipcrm", what) {
        return;
    }
    let pool = PoolGuard::new();
    let leftovers = ShmLeftovers::new();
    let fs = Msharefs::mount("shmconf", &["--backing", "hugetlb"]);
    let dir = TempDir::new("shmconf-bin").expect("temp dir");
    let bin = dir.path().join("conformance");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("shm/conformance.c");
    compile(
        "gcc",
        &[
            os("-std=gnu11"),
            os("-Wall"),
            os("-Wextra"),
            os("-Werror"),
            os("-O1"),
            src.as_os_str(),
            os("-o"),
            bin.as_os_str(),
        ],
    );
    let env = [
        format!("LD_PRELOAD={}", libs().preload().display()),
        format!("MSHARE_MOUNT={}", fs.mountpoint().display()),
        "MSHARE_SHM_MIN=2M".to_string(),
    ];
    let run = |size: u64, tag: &str| -> Vec<String> {
        let size = size.to_string();
        let mut args: Vec<&OsStr> = env.iter().map(os).collect();
        args.extend([bin.as_os_str(), os(&size), os(tag)]);
        let (ok, lines) = run_helper(tag, Path::new("/usr/bin/env"), &args, LIMIT);
        assert!(ok, "{tag} run failed:\n{}", lines.join("\n"));
        assert_eq!(
            lines.last().map(String::as_str),
            Some("done"),
            "{tag}: {lines:#?}"
        );
        lines
    };
    // 1 MiB and 64 MiB less 123 bytes: below and above MSHARE_SHM_MIN, and no page
    // multiple, so rounding shows wherever it leaks.
    let pid = std::process::id();
    let kernel = run(MIB - 123, &format!("k{pid}"));
    let ours = run(64 * MIB - 123, &format!("m{pid}"));
    let results = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with('#'))
            .cloned()
            .collect()
    };
    let (k, m) = (results(&kernel), results(&ours));
    let differ: Vec<String> = k
        .iter()
        .zip(&m)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("kernel:   {a}\nmsharefs: {b}"))
        .collect();
    assert!(
        differ.is_empty() && k.len() == m.len(),
        "{} of {} results differ ({} vs {} lines):\n{}",
        differ.len(),
        k.len(),
        k.len(),
        m.len(),
        differ.join("\n")
    );
    let placed = |lines: &[String], want: &str| -> usize {
        let obs: Vec<&String> = lines.iter().filter(|l| l.starts_with("# placed")).collect();
        for o in &obs {
            assert_eq!(o.split_whitespace().nth(3), Some(want), "{o}");
        }
        obs.len()
    };
    let below = placed(&kernel, "0");
    let above = placed(&ours, "1");
    assert_eq!(below, above);
    assert!(above >= 12, "{above} attachments observed");
    wait_all_freed(&fs, &pool, what);
    leftovers.check(what);
    loud(&format!(
        "{what}: {} results agree with the kernel's; {above} attachments above the \
         threshold were msharefs hugetlb backings at 1 GiB-aligned addresses, none below; \
         nothing left",
        k.len()
    ));
}

/// The Python side of the pool test: `argv[1]` start method, `argv[2]` workers,
/// `argv[3]` size, `argv[4]` `run` (finish and unlink) or `hold` (print the name, keep
/// everything until killed).
const POOL_PY: &str = r#"
import ctypes, json, multiprocessing as mp, os, resource, sys, time
from multiprocessing import shared_memory

HUGE = 2 << 20
SEED = 0x5eed

def mapping_of(addr):
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return lo, hi, line.split(None, 5)[5].strip() if len(line.split()) > 5 else ""
    return None

barrier = None

def init(b):
    global barrier
    barrier = b

def worker(args):
    name, idx, n, hold, parent = args
    # Every worker process takes exactly one task: it waits here for all the others.
    barrier.wait()
    t0 = time.perf_counter()
    shm = shared_memory.SharedMemory(name=name)
    t1 = time.perf_counter()
    buf = shm.buf
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    lo, hi, path = mapping_of(addr)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bad = 0
    for off in range(0, shm.size, HUGE):
        if buf[off] != (off // HUGE + SEED) & 0xff:
            bad += 1
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t2 = time.perf_counter()
    # Each worker writes one byte in every huge page of its slice.
    for off in range(idx * HUGE, shm.size, n * HUGE):
        buf[off + 1] = idx
    out = {"pid": os.getpid(), "addr": addr, "map_lo": lo, "map_len": hi - lo, "path": path,
           "faults": f1 - f0, "bad": bad, "open_s": t1 - t0, "touch_s": t2 - t1}
    if hold:
        # One write(2) per line: workers share the pipe, and print() may split a line.
        os.write(1, (json.dumps({"worker_ready": idx}) + "\n").encode())
        # Hold the mapping until the parent is gone (killed), then go too.
        while os.path.exists("/proc/%d" % parent):
            time.sleep(0.05)
        os._exit(0)
    del buf
    shm.close()
    return out

def main():
    method, n, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ctx = mp.get_context(method)
    shm = shared_memory.SharedMemory(create=True, size=size)
    buf = shm.buf
    for off in range(0, size, HUGE):
        buf[off] = (off // HUGE + SEED) & 0xff
    barrier = ctx.Barrier(n)
    if mode == "hold":
        os.write(1, (json.dumps({"name": shm.name}) + "\n").encode())
        pool = ctx.Pool(n, initializer=init, initargs=(barrier,))
        pool.map_async(worker, [(shm.name, i, n, True, os.getpid()) for i in range(n)], 1)
        time.sleep(3600)
    with ctx.Pool(n, initializer=init, initargs=(barrier,)) as pool:
        tasks = [(shm.name, i, n, False, os.getpid()) for i in range(n)]
        reports = pool.map(worker, tasks, 1)
    wrong = 0
    for off in range(0, size, HUGE):
        if buf[off + 1] != (off // HUGE) % n:
            wrong += 1
    del buf
    shm.close()
    shm.unlink()
    print(json.dumps({"name": shm.name, "workers": reports, "wrong": wrong}), flush=True)

if __name__ == "__main__":
    main()
"#;

/// Runs the pool script with the shim; returns its helper.
fn spawn_pool(
    fs: &Msharefs,
    script: &Path,
    method: &str,
    workers: u32,
    size: u64,
    mode: &str,
) -> Helper {
    let env = [
        format!("LD_PRELOAD={}", libs().preload().display()),
        format!("MSHARE_MOUNT={}", fs.mountpoint().display()),
        "MSHARE_SHM_MIN=64M".to_string(),
    ];
    let (workers, size) = (workers.to_string(), size.to_string());
    let mut args: Vec<&OsStr> = env.iter().map(os).collect();
    args.extend([
        os("python3"),
        script.as_os_str(),
        os(method),
        os(&workers),
        os(&size),
        os(mode),
    ]);
    Helper::spawn(
        &format!("pool-{method}-{mode}"),
        Path::new("/usr/bin/env"),
        &args,
    )
    .unwrap_or_else(|e| panic!("cannot start python3: {e}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {key} in {v}"))
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool by 4 GiB"]
fn python_shared_memory_with_a_pool() {
    let what = "python_shared_memory_with_a_pool";
    if !require_privileged(what) || !require_tool("python3", what) {
        return;
    }
    let pool = PoolGuard::new();
    let leftovers = ShmLeftovers::new();
    let fs = Msharefs::mount("shmpy", &["--backing", "hugetlb"]);
    let dir = TempDir::new("shmpy").expect("temp dir");
    let script = dir.path().join("pool.py");
    std::fs::write(&script, POOL_PY).expect("write script");
    const WORKERS: u32 = 16;
    let size = 4 * GIB;
    let state = fs.state_dir();
    for method in ["spawn", "forkserver"] {
        let mut h = spawn_pool(&fs, &script, method, WORKERS, size, "run");
        let report = h
            .read_json(LIMIT)
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        h.finish(LIMIT).unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(
            report["wrong"], 0,
            "{method}: workers' writes lost: {report}"
        );
        let workers = report["workers"].as_array().expect("workers");
        assert_eq!(workers.len(), WORKERS as usize);
        let mut faults = Vec::new();
        let mut pids = BTreeSet::new();
        for w in workers {
            pids.insert(num(w, "pid"));
            assert_eq!(num(w, "bad"), 0, "{method}: worker read wrong data: {w}");
            assert_eq!(num(w, "addr") % GIB, 0, "{method}: not 1 GiB-aligned: {w}");
            assert_eq!(num(w, "map_lo"), num(w, "addr"), "{method}: {w}");
            assert_eq!(num(w, "map_len"), size, "{method}: {w}");
            let path = w["path"].as_str().unwrap_or_default();
            assert!(
                path.starts_with(&format!("{}/backing/hugetlb/", state.display())),
                "{method}: the worker maps {path:?}, not the region's hugetlb backing: {w}"
            );
            let per_gib = num(w, "faults") as f64 / (size / GIB) as f64;
            assert!(
                per_gib <= 2.0,
                "{method}: {per_gib} faults per GiB (at most 2 with shared tables): {w}"
            );
            faults.push(num(w, "faults"));
        }
        assert_eq!(
            pids.len(),
            WORKERS as usize,
            "{method}: one task per worker process"
        );
        wait_all_freed(&fs, &pool, method);
        leftovers.check(method);
        loud(&format!(
            "{what} ({method}): {} workers in {} processes each mapped the 4 GiB segment \
             1 GiB-aligned on the hugetlb backing; faults per worker {faults:?}; data right; \
             nothing left",
            workers.len(),
            pids.len()
        ));
    }

    // kill -9 of the parent while workers hold the segment: the resource tracker unlinks
    // it, and the memory comes back once the workers are gone.
    let mut h = spawn_pool(&fs, &script, "forkserver", 4, GIB, "hold");
    let first = h.read_json(LIMIT).expect("segment name");
    for _ in 0..4 {
        h.read_json(LIMIT).expect("worker ready");
    }
    let name = first["name"].as_str().expect("name").to_string();
    assert!(Path::new("/dev/shm").join(&name).exists());
    h.kill().expect("kill -9 the parent");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new("/dev/shm").join(&name).exists() {
        assert!(
            Instant::now() < deadline,
            "the resource tracker did not unlink /dev/shm/{name}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_all_freed(&fs, &pool, "after kill -9");
    leftovers.check("after kill -9");
    loud(&format!(
        "{what}: after kill -9 of the parent the resource tracker unlinked {name}; no region, \
         huge page or /dev/shm file left"
    ));
}
