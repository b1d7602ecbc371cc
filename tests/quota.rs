//! Per-user quota of region memory (`msharefs mount --user-quota`): an unprivileged user
//! (uid 65534) that sizes regions past its quota gets `EDQUOT` at `ftruncate` and at
//! `fallocate`, and nothing changes (the huge-page pool, the region's size). Every backing
//! counts; an unlinked region counts until its last close; root is exempt, and a region
//! root chowns to a user counts against that user from then on. Eight processes of the
//! user sizing regions at the same moment get exactly what fits. `msharefs stat` reports
//! the limit and each owner's use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kernel_glue::consts::*;
use kernel_glue::fd as kfd;
use mshare::uapi;
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{Helper, PoolGuard, PoolState, SETTLE, loud, require_privileged};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const QUOTA: u64 = 64 * MIB;
const NOBODY: u32 = 65534;
/// The system's Python, which other users can run (a per-user install under /root is not
/// reachable for them).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(60);

/// What uid 65534 does, one command per run (`hold` until its standard input closes):
///
/// - `size PATH BACKING BYTES ftruncate|fallocate`: creates the region (0600, with the
///   backing) unless it exists, sets its size; prints `{"result": ok|ERRNO, "size": N}`;
/// - `unlink PATH`: prints `{"result": ...}`;
/// - `hold PATH`: opens the region, prints `holding`, closes it when stdin closes;
/// - `race BACKING BYTES PATH...`: creates the regions, forks one process per region,
///   releases them at once (they all wait on one pipe), each sizes its region; prints
///   `{PATH: result}`.
const PY_USER: &str = r#"
import ctypes, errno, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

def res(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def fallocate(fd, n):
    # fallocate(2) itself: glibc's posix_fallocate may fall back to writing.
    if libc.fallocate(fd, 0, 0, n) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def region(path, backing):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    # The daemon refuses a backing change while the region is open (EBUSY), and FUSE
    # delivers our close asynchronously: retry briefly, as mshare::set_backing does.
    for _ in range(100):
        try:
            return os.setxattr(path, "user.mshare.backing", backing.encode())
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.002)
    os.setxattr(path, "user.mshare.backing", backing.encode())

def size(path, backing, n, how):
    region(path, backing)
    fd = os.open(path, os.O_RDWR)
    try:
        call = (lambda: os.ftruncate(fd, n)) if how == "ftruncate" else (lambda: fallocate(fd, n))
        return {"result": res(call), "size": os.fstat(fd).st_size}
    finally:
        os.close(fd)

def race(backing, n, paths):
    for p in paths:
        region(p, backing)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for p in paths:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(go_w)
                fd = os.open(p, os.O_RDWR)
                os.write(ready_w, b"r")
                os.read(go_r, 1)  # end of file once the parent closes go_w: all at once
                r = res(lambda: os.ftruncate(fd, n))
                os.write(out_w, json.dumps({"path": p, "result": r}).encode() + b"\n")
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(ready_w)
    os.close(go_r)
    for _ in paths:
        if not os.read(ready_r, 1):
            break
    os.close(go_w)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(out_w)
    out = b""
    while True:
        b = os.read(out_r, 65536)
        if not b:
            break
        out += b
    return {d["path"]: d["result"] for d in map(json.loads, out.decode().splitlines())}

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "size":
    print(json.dumps(size(args[0], args[1], int(args[2]), args[3])))
elif cmd == "unlink":
    print(json.dumps({"result": res(lambda: os.unlink(args[0]))}))
elif cmd == "hold":
    fd = os.open(args[0], os.O_RDWR)
    print("holding", flush=True)
    sys.stdin.read()
    os.close(fd)
elif cmd == "race":
    print(json.dumps(race(args[0], int(args[1]), args[2:])))
else:
    sys.exit("unknown command " + cmd)
"#;

/// `setpriv` arguments that run [`PY_USER`] as uid 65534 with `args`.
fn nobody_args(args: &[&str]) -> Vec<String> {
    assert!(
        Path::new(SYSTEM_PYTHON).exists(),
        "{SYSTEM_PYTHON} is missing (apt-get install python3)"
    );
    let mut a = vec![
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        SYSTEM_PYTHON.into(),
        "-c".into(),
        PY_USER.into(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

/// Runs one [`PY_USER`] command as uid 65534 and parses its JSON line.
fn as_nobody(args: &[&str]) -> Value {
    let out = Command::new("setpriv")
        .args(nobody_args(args))
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "{args:?} as uid {NOBODY}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the uid 65534 script")
}

/// Sizes (creating it first if needed) the region `name` as uid 65534; returns the
/// outcome and the region's size afterwards.
fn nobody_sizes(fs: &Msharefs, name: &str, backing: &str, bytes: u64, how: &str) -> (String, u64) {
    let path = fs.path(name).display().to_string();
    let v = as_nobody(&["size", &path, backing, &bytes.to_string(), how]);
    (
        v["result"].as_str().unwrap_or("missing").to_string(),
        v["size"].as_u64().unwrap_or(u64::MAX),
    )
}

fn ok(size: u64) -> (String, u64) {
    ("ok".to_string(), size)
}

fn edquot() -> (String, u64) {
    ("EDQUOT".to_string(), 0)
}

/// Creates a region as root and sets its size.
fn root_region(fs: &Msharefs, name: &str, backing: &str, size: u64) -> PathBuf {
    let p = fs.path(name);
    drop(kfd::open(&p, O_RDWR | O_CREAT | O_EXCL, 0o600).expect("create"));
    kfd::setxattr(&p, uapi::BACKING_XATTR, backing.as_bytes(), 0).expect("backing");
    kfd::ftruncate(kfd::open(&p, O_RDWR, 0).expect("open"), size).expect("size as root");
    p
}

/// What `msharefs stat --json` says `uid` uses (`None`: not listed, owns no region).
fn used(stat: &Value, uid: u32) -> Option<u64> {
    stat["quota"]["users"]
        .as_array()
        .expect("quota.users")
        .iter()
        .find(|u| u["uid"] == uid)
        .map(|u| u["used_bytes"].as_u64().expect("used_bytes"))
}

/// Polls `msharefs stat` until `uid` uses `want` (releases of closed files reach the
/// daemon a moment after the close); returns the last reading.
fn wait_used(fs: &Msharefs, uid: u32, want: Option<u64>) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = used(&fs.stat(), uid);
        if got == want || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sum of the sizes of the regions in the mount's root directory owned by `uid`.
fn sizes_owned_by(fs: &Msharefs, uid: u32) -> u64 {
    std::fs::read_dir(fs.mountpoint())
        .expect("readdir")
        .map(|e| kfd::stat(&e.expect("entry").path()).expect("stat"))
        .filter(|st| st.uid == uid)
        .map(|st| st.size)
        .sum()
}

/// The pool counters a refused size call must leave alone.
fn pool_counters(s: &PoolState) -> (u64, u64) {
    (s.nr_hugepages, s.reserved)
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn a_user_past_its_quota_gets_edquot_and_nothing_changes() {
    if !require_privileged("a_user_past_its_quota_gets_edquot_and_nothing_changes") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("quota", &["--backing", "hugetlb", "--user-quota", "64M"]);
    let pool_start = PoolState::read();
    let st = fs.stat();
    assert_eq!(st["quota"]["limit_bytes"].as_u64(), Some(QUOTA), "{st}");

    // Up to the quota: fine.
    assert_eq!(
        nobody_sizes(&fs, "a", "hugetlb", 32 * MIB, "ftruncate"),
        ok(32 * MIB)
    );
    assert_eq!(
        nobody_sizes(&fs, "b", "hugetlb", 32 * MIB, "ftruncate"),
        ok(32 * MIB)
    );
    assert_eq!(used(&fs.stat(), NOBODY), Some(QUOTA));

    // One page more: EDQUOT by both routes, and the pool and the region stay as they were.
    let before = PoolState::read();
    for how in ["ftruncate", "fallocate"] {
        assert_eq!(
            nobody_sizes(&fs, "c", "hugetlb", 2 * MIB, how),
            edquot(),
            "c by {how}"
        );
        let now = PoolState::wait_until(SETTLE, |s| pool_counters(s) == pool_counters(&before));
        assert_eq!(
            pool_counters(&now),
            pool_counters(&before),
            "(nr_hugepages, HugePages_Rsvd) after the refused {how}"
        );
    }
    assert_eq!(kfd::stat(&fs.path("c")).expect("stat c").size, 0);
    assert_eq!(used(&fs.stat(), NOBODY), Some(QUOTA), "nothing was charged");

    // An unlinked region still pins its memory while it is open: it still counts.
    let a = fs.path("a").display().to_string();
    let mut holder = Helper::spawn(
        "holder of a",
        Path::new("setpriv"),
        nobody_args(&["hold", &a]),
    )
    .expect("spawn holder");
    assert_eq!(holder.read_line(LIMIT).expect("holder"), "holding");
    assert_eq!(as_nobody(&["unlink", &a])["result"], "ok");
    assert_eq!(
        nobody_sizes(&fs, "c", "hugetlb", 2 * MIB, "ftruncate"),
        edquot(),
        "c while the unlinked a is open"
    );
    assert_eq!(
        used(&fs.stat(), NOBODY),
        Some(QUOTA),
        "the open orphan counts"
    );
    holder.finish(LIMIT).expect("holder exits");
    // Gone with its last close: its 32 MiB are free for the user again.
    assert_eq!(wait_used(&fs, NOBODY, Some(32 * MIB)), Some(32 * MIB));
    assert_eq!(
        nobody_sizes(&fs, "c", "hugetlb", 2 * MIB, "ftruncate"),
        ok(2 * MIB)
    );

    // Every backing pins memory, so every backing counts: 34 MiB used.
    assert_eq!(
        nobody_sizes(&fs, "d", "thp", 64 * MIB, "ftruncate"),
        edquot()
    );
    assert_eq!(
        nobody_sizes(&fs, "d", "thp", 64 * MIB, "fallocate"),
        edquot()
    );
    // Exactly up to the limit is allowed, one 4 KiB page past it is not.
    assert_eq!(
        nobody_sizes(&fs, "d", "thp", 30 * MIB, "ftruncate"),
        ok(30 * MIB)
    );
    assert_eq!(nobody_sizes(&fs, "e", "shmem", 4096, "ftruncate"), edquot());

    // Root is exempt.
    let pool_root = PoolState::read();
    let big = root_region(&fs, "root-big", "hugetlb", 256 * MIB);
    let grown = PoolState::read().nr_hugepages - pool_root.nr_hugepages;
    assert_eq!(grown, 128, "the pool grew for root's 256 MiB");

    let st = fs.stat();
    let nobody_used = used(&st, NOBODY).expect("uid 65534 listed");
    assert_eq!(nobody_used, sizes_owned_by(&fs, NOBODY), "{st}");
    assert_eq!(nobody_used, QUOTA);
    assert_eq!(used(&st, 0), Some(256 * MIB), "root's use is reported");
    let out = fs.cli(&["stat", fs.mountpoint().to_str().expect("utf-8")]);
    let human = String::from_utf8_lossy(&out.stdout).to_string();
    let quota_line = human
        .lines()
        .find(|l| l.starts_with("quota:"))
        .unwrap_or_else(|| panic!("no quota line in:\n{human}"))
        .to_string();
    assert_eq!(
        quota_line,
        "quota: 64 MiB per user (root exempt); uid 0: 256 MiB used; uid 65534: 64 MiB used"
    );

    // Root may give a sized region to a user whatever the user's quota (an administrator's
    // decision); it counts against the user from then on.
    std::os::unix::fs::chown(&big, Some(NOBODY), Some(NOBODY)).expect("root chowns");
    let st = fs.stat();
    assert_eq!(used(&st, NOBODY), Some(QUOTA + 256 * MIB), "{st}");
    assert_eq!(used(&st, 0), None, "root owns no region now");
    assert_eq!(nobody_sizes(&fs, "e", "shmem", 4096, "ftruncate"), edquot());

    // Cleanup: every region goes, and with them every charge.
    for name in ["b", "c", "d", "e", "root-big"] {
        std::fs::remove_file(fs.path(name)).expect("unlink");
    }
    let st = fs.stat();
    assert_eq!(st["quota"]["users"], serde_json::json!([]), "{st}");
    let back = PoolState::wait_until(SETTLE, |s| pool_counters(s) == pool_counters(&pool_start));
    assert_eq!(
        pool_counters(&back),
        pool_counters(&pool_start),
        "every huge page given back"
    );
    loud(&format!(
        "quota: --user-quota 64M as uid {NOBODY}: 32+32 MiB hugetlb ok; 2 MiB more EDQUOT by \
         ftruncate and fallocate with (nr_hugepages, HugePages_Rsvd) = {:?} unchanged and \
         size 0; still EDQUOT while the unlinked 32 MiB region was open, ok after its \
         close; thp 64 MiB EDQUOT, thp 30 MiB ok (exactly 64 MiB), shmem 4 KiB EDQUOT; \
         root 256 MiB ok (+{grown} huge pages); stat: uid {NOBODY} {} bytes = sum of its \
         regions; root chown of 256 MiB to uid {NOBODY} allowed ({} bytes, over quota)",
        pool_counters(&before),
        nobody_used,
        QUOTA + 256 * MIB,
    ));
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn concurrent_sizes_never_pass_the_quota_together() {
    if !require_privileged("concurrent_sizes_never_pass_the_quota_together") {
        return;
    }
    const EACH: u64 = 16 * MIB;
    const PROCS: usize = 8;
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount(
        "quota-race",
        &["--backing", "hugetlb", "--user-quota", "64M"],
    );
    let mut summary = Vec::new();
    for (round, backing, pre) in [
        (0, "hugetlb", 0),
        (1, "hugetlb", 16 * MIB),
        (2, "thp", 16 * MIB),
    ] {
        let mut names = Vec::new();
        if pre > 0 {
            let name = format!("pre{round}");
            assert_eq!(nobody_sizes(&fs, &name, backing, pre, "ftruncate"), ok(pre));
            names.push(name);
        }
        let racers: Vec<String> = (0..PROCS).map(|i| format!("r{round}-{i}")).collect();
        let paths: Vec<String> = racers
            .iter()
            .map(|n| fs.path(n).display().to_string())
            .collect();
        let pool_before = PoolState::read();
        let mut args = vec!["race".to_string(), backing.to_string(), EACH.to_string()];
        args.extend(paths.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let results = as_nobody(&args);
        let mut granted = 0;
        for (name, path) in racers.iter().zip(&paths) {
            let r = results[path].as_str().unwrap_or("missing");
            let size = kfd::stat(Path::new(path)).expect("stat").size;
            match r {
                "ok" => {
                    granted += 1;
                    assert_eq!(size, EACH, "{name}");
                }
                "EDQUOT" => assert_eq!(size, 0, "{name}"),
                other => panic!("{name}: {other}"),
            }
        }
        let want = (QUOTA - pre) / EACH;
        assert_eq!(
            granted, want,
            "round {round} ({backing}, {pre} bytes used before): {results}"
        );
        assert_eq!(
            wait_used(&fs, NOBODY, Some(QUOTA)),
            Some(QUOTA),
            "round {round}"
        );
        assert_eq!(sizes_owned_by(&fs, NOBODY), QUOTA, "round {round}");
        let grown = PoolState::read().nr_hugepages - pool_before.nr_hugepages;
        if backing == "hugetlb" {
            assert_eq!(
                grown,
                granted * EACH / (2 * MIB),
                "round {round}: pool growth"
            );
        } else {
            assert_eq!(
                grown, 0,
                "round {round}: thp takes no huge pages from the pool"
            );
        }
        summary.push(format!(
            "{backing} with {} MiB used: {granted} of {PROCS} granted (+{grown} huge pages)",
            pre >> 20
        ));
        names.extend(racers);
        for n in &names {
            std::fs::remove_file(fs.path(n)).expect("unlink");
        }
        // The racers' files close as their processes exit; the last release ends them.
        assert_eq!(
            wait_used(&fs, NOBODY, None),
            None,
            "round {round}: all gone"
        );
    }
    loud(&format!(
        "quota: {PROCS} processes of uid {NOBODY} sizing {} MiB each at once under a 64 MiB \
         quota: {}",
        EACH >> 20,
        summary.join("; ")
    ));
}
