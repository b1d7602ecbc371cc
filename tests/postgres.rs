//! Anonymous shared memory on msharefs through the `LD_PRELOAD` shim: first with
//! `python3`'s `mmap`, then with an unmodified PostgreSQL and pgbench, at a small scale
//! (`examples/postgres/run.sh` is the full-size benchmark).
//!
//! With `MSHARE_MOUNT` and `MSHARE_ANON_MIN` set, a large `MAP_SHARED|MAP_ANONYMOUS` mapping
//! becomes a hugetlb region of the mount, mapped at a 1 GiB-aligned address and unlinked at
//! once: every process that has it (the creator and its forked children) shows in
//! `/proc/PID/maps` a `rw-s` mapping of the region's backing file under the daemon's state
//! directory, marked `(deleted)`, of the requested length rounded up to 2 MiB, and
//! `msharefs stat` lists no region. With `MSHARE_ANON_NAME` the region keeps that name, the
//! mapping is not `(deleted)` and `msharefs stat` lists every process as attached.
//!
//! These tests need root, `/dev/fuse` and hugetlbfs, and `python3` or PostgreSQL
//! (`/usr/lib/postgresql/*/bin` with `postgres`, `initdb`, `pg_ctl`, `pgbench`, `psql`, the
//! `postgres` user, `runuser`): outside CI a missing one skips loudly, with `CI` set it
//! fails (`.ci/run` installs `postgresql`). They hold the pool lock for their whole run.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use msharefs_tests::helper::Helper;
use msharefs_tests::mountguard::{Msharefs, artifacts};
use msharefs_tests::{PoolGuard, TempDir, in_ci, loud, require_privileged};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const HUGE: u64 = 2 * MIB;
const LIMIT: Duration = Duration::from_secs(120);

/// In CI, panics; otherwise prints a loud `SKIPPED:` line. Returns false (skip).
fn missing(what: &str, msg: &str) -> bool {
    if in_ci() {
        panic!("CI is set, so this test may not skip: {what} needs {msg}");
    }
    loud(&format!("SKIPPED: {what} needs {msg}"));
    false
}

fn require_python(what: &str) -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok || missing(what, "`python3` on PATH")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fresh scratch directory other users may traverse (the server runs as `postgres`),
/// holding a copy of the shim they can read.
fn scratch(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag).expect("temp dir");
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).expect("chmod");
    let shim = dir.path().join("libmshare_preload.so");
    std::fs::copy(artifacts().join("libmshare_preload.so"), &shim).expect("copy the shim");
    std::fs::set_permissions(&shim, PermissionsExt::from_mode(0o644)).expect("chmod");
    (dir, shim)
}

/// `msharefs stat --json`'s regions.
fn regions(m: &Msharefs) -> Vec<Value> {
    m.stat()["regions"].as_array().cloned().unwrap_or_default()
}

/// The mappings of `pid` of a hugetlb backing file of `m`'s state directory; `None` when
/// the process is gone.
fn backing_mappings(pid: u32, m: &Msharefs) -> Option<Vec<kernel_glue::procfs::MapsEntry>> {
    let store = m.state_dir().join("backing").join("hugetlb");
    let store = store.to_str().expect("utf-8");
    let maps = kernel_glue::procfs::maps(pid)
        .ok()
        .filter(|v| !v.is_empty())?;
    Some(
        maps.into_iter()
            .filter(|v| v.path.starts_with(store))
            .collect(),
    )
}

// ---- python3 -------------------------------------------------------------------------

/// Maps `argv[1]` bytes of anonymous shared memory, writes both ends, lets a forked child
/// check and write, unmaps with the same length, then maps 1 MiB shared and `argv[1]`
/// private. Reports each mapping's `/proc/self/maps` line as JSON; with `argv[2] == "hold"`
/// it reports the first mapping and keeps it until standard input closes.
const ANON_PY: &str = r#"
import ctypes, json, mmap, os, sys, time

size = int(sys.argv[1])
hold = len(sys.argv) > 2 and sys.argv[2] == "hold"

def maps():
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split(None, 5)
            lo, hi = (int(x, 16) for x in p[0].split("-"))
            out.append((lo, hi, p[1], p[5].strip() if len(p) > 5 else ""))
    return out

def mapping_of(m):
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for lo, hi, perms, path in maps():
        if lo <= addr < hi:
            return {"addr": addr, "start": lo, "len": hi - lo, "perms": perms, "path": path}
    return {"addr": addr}

out = {}
m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
out["big"] = mapping_of(m)
# An unlinked region's backing goes when the daemon handles the shim's close, which the
# kernel sends it asynchronously: give it a moment to show as deleted.
for _ in range(200):
    if out["big"].get("path", "").endswith("(deleted)") or os.environ.get("MSHARE_ANON_NAME"):
        break
    time.sleep(0.01)
    out["big"] = mapping_of(m)
if hold:
    print(json.dumps(out), flush=True)
    sys.stdin.read()
    sys.exit(0)
m[0:8] = b"parent!!"
m[size - 8:size] = b"lastword"
pid = os.fork()
if pid == 0:
    ok = m[0:8] == b"parent!!" and m[size - 8:size] == b"lastword"
    m[8:16] = b"child!!!"
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
out["child_status"] = status
out["child_write_seen"] = m[8:16] == b"child!!!"
start = out["big"]["start"]
m.close()
out["unmapped"] = not any(lo <= start < hi for lo, hi, _, _ in maps())
s = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED)
out["small"] = mapping_of(s)
s.close()
p = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
out["private"] = mapping_of(p)
p.close()
print(json.dumps(out), flush=True)
"#;

/// Maps `argv[1]` bytes of anonymous shared memory with `MAP_NORESERVE` (`argv[2]`, the
/// flag's value) and reports where it landed, or the errno.
const HUGE_PY: &str = r#"
import ctypes, json, mmap, sys
size, noreserve = int(sys.argv[1]), int(sys.argv[2])
try:
    m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | noreserve)
except OSError as e:
    print(json.dumps({"errno": e.errno}), flush=True)
    sys.exit(0)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
m[0] = 1
with open("/proc/self/maps") as f:
    for line in f:
        p = line.split(None, 5)
        lo, hi = (int(x, 16) for x in p[0].split("-"))
        if lo <= addr < hi:
            print(json.dumps({"len": hi - lo, "path": p[5].strip() if len(p) > 5 else ""}), flush=True)
"#;

fn python_env(shim: &Path, dir: &Path, name: Option<&str>) -> Vec<String> {
    let mut env = vec![
        format!("LD_PRELOAD={}", shim.display()),
        format!("MSHARE_MOUNT={}", dir.display()),
        "MSHARE_ANON_MIN=16M".to_string(),
    ];
    if let Some(n) = name {
        env.push(format!("MSHARE_ANON_NAME={n}"));
    }
    env
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {key} in {v}"))
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn shim_places_anonymous_shared_memory_on_msharefs() {
    const NAME: &str = "shim_places_anonymous_shared_memory_on_msharefs";
    if !require_privileged(NAME) || !require_python(NAME) {
        return;
    }
    let _pool = PoolGuard::new();
    let m = Msharefs::mount("anon", &["--backing", "hugetlb"]);
    let (scratch_dir, shim) = scratch("anon-shim");
    let dir = m.mountpoint();
    let size = 64 * MIB + 4096;
    let store = m.state_dir().join("backing").join("hugetlb");

    // Unnamed: a (deleted) backing, 1 GiB-aligned, rounded up to 2 MiB, shared with a
    // forked child, fully unmapped by munmap(addr, size).
    let mut args: Vec<String> = python_env(&shim, &dir, None);
    args.extend([
        "python3".into(),
        "-c".into(),
        ANON_PY.into(),
        size.to_string(),
    ]);
    let out = Command::new("/usr/bin/env").args(&args).output().unwrap();
    assert!(out.status.success(), "anon.py: {}", text(&out));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    loud(&format!("anon.py: {v}"));
    let big = &v["big"];
    assert_eq!(num(big, "start") % GIB, 0, "not 1 GiB-aligned: {v}");
    assert_eq!(num(big, "addr"), num(big, "start"), "{v}");
    assert_eq!(
        num(big, "len"),
        66 * MIB,
        "length not rounded up to 2 MiB: {v}"
    );
    assert_eq!(big["perms"], "rw-s", "{v}");
    let path = big["path"].as_str().unwrap_or_default();
    assert!(
        path.starts_with(store.to_str().unwrap()) && path.ends_with(" (deleted)"),
        "not an unlinked backing of this mount: {v}"
    );
    assert_eq!(
        v["child_status"], 0,
        "the child did not see the parent's data: {v}"
    );
    assert_eq!(
        v["child_write_seen"], true,
        "the parent did not see the child's: {v}"
    );
    assert_eq!(
        v["unmapped"], true,
        "munmap(addr, len) left part of the mapping: {v}"
    );
    // Below MSHARE_ANON_MIN, and private memory: the kernel's own.
    assert_eq!(v["small"]["path"], "/dev/zero (deleted)", "{v}");
    assert_ne!(v["private"]["perms"], "rw-s", "{v}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("libmshare_preload"),
        "{}",
        text(&out)
    );
    assert!(
        regions(&m).is_empty(),
        "the unlinked region outlived its process: {}",
        m.stat()
    );

    // Named: the region stays, and msharefs lists the process as attached.
    let name = "kept-anon";
    let mut args: Vec<String> = python_env(&shim, &dir, Some(name));
    args.extend([
        "python3".into(),
        "-c".into(),
        ANON_PY.into(),
        size.to_string(),
        "hold".into(),
    ]);
    let mut h = Helper::spawn("anon.py hold", Path::new("/usr/bin/env"), &args).unwrap();
    let v = h.read_json(LIMIT).unwrap();
    let big = &v["big"];
    assert_eq!(num(big, "start") % GIB, 0, "{v}");
    assert!(
        big["path"]
            .as_str()
            .is_some_and(|p| p.starts_with(store.to_str().unwrap()) && !p.contains("deleted")),
        "{v}"
    );
    let stat = m.stat();
    let regs = stat["regions"].as_array().cloned().unwrap_or_default();
    assert_eq!(regs.len(), 1, "{stat}");
    assert!(
        regs[0]["path"].as_str().is_some_and(|p| p.ends_with(name)),
        "{stat}"
    );
    assert_eq!(regs[0]["backing"], "hugetlb", "{stat}");
    assert_eq!(num(&regs[0], "size"), 66 * MIB, "{stat}");
    let attached: Vec<u64> = regs[0]["attached"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default();
    assert!(
        attached.contains(&u64::from(h.pid())),
        "pid {} not attached: {stat}",
        h.pid()
    );
    h.finish(LIMIT).unwrap();
    std::fs::remove_file(dir.join(name)).unwrap();
    assert!(regions(&m).is_empty(), "{}", m.stat());

    // A region the machine cannot hold (twice its available memory, MAP_NORESERVE): the
    // daemon refuses to grow the pool (ENOMEM), and there is one line on
    // stderr, and the program gets ordinary shared memory.
    let available: u64 = kernel_glue::procfs::meminfo().unwrap().mem_available;
    let too_big = (2 * available).div_ceil(GIB) * GIB;
    let mut args: Vec<String> = python_env(&shim, &dir, None);
    args.extend([
        "python3".into(),
        "-c".into(),
        HUGE_PY.into(),
        too_big.to_string(),
        libc::MAP_NORESERVE.to_string(),
    ]);
    let out = Command::new("/usr/bin/env").args(&args).output().unwrap();
    assert!(out.status.success(), "huge.py: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("libmshare_preload"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one fallback line: {}", text(&out));
    assert!(
        lines[0].contains("stays ordinary shared memory"),
        "{}",
        lines[0]
    );
    loud(&format!("fallback: {}", lines[0]));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    if std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|s| s.trim() == "2") {
        // Strict overcommit ignores MAP_NORESERVE: the kernel refuses too.
        assert_eq!(v["errno"].as_i64(), Some(i64::from(libc::ENOMEM)), "{v}");
    } else {
        assert_eq!(v["path"], "/dev/zero (deleted)", "{v}");
        assert_eq!(num(&v, "len"), too_big, "{v}");
    }
    assert!(regions(&m).is_empty(), "{}", m.stat());
    drop(scratch_dir);
}

// ---- PostgreSQL --------------------------------------------------------------------------

/// An installed PostgreSQL and the user it runs as.
struct Postgres {
    bin: PathBuf,
    uid: u32,
    gid: u32,
}

impl Postgres {
    /// The newest `/usr/lib/postgresql/*/bin` with every program the test runs, the
    /// `postgres` user and `runuser`; `None` (after [`missing`]) when something lacks.
    fn find(what: &str) -> Option<Postgres> {
        let mut bins: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        bins.sort();
        let Some((_, bin)) = bins.pop() else {
            missing(
                what,
                "PostgreSQL (/usr/lib/postgresql/*/bin; apt-get install postgresql)",
            );
            return None;
        };
        for prog in ["postgres", "initdb", "pg_ctl", "pgbench", "psql"] {
            if !bin.join(prog).exists() {
                missing(
                    what,
                    &format!("{} (PostgreSQL's {prog})", bin.join(prog).display()),
                );
                return None;
            }
        }
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        let (Some(uid), Some(gid)) = (id("-u"), id("-g")) else {
            missing(
                what,
                "the `postgres` user (the postgresql package creates it)",
            );
            return None;
        };
        if !Command::new("runuser")
            .arg("--help")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            missing(what, "`runuser` (util-linux)");
            return None;
        }
        Some(Postgres { bin, uid, gid })
    }

    fn prog(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// `runuser -u postgres -- env ENV.. PROGRAM ARGS..`, to completion.
    fn run_as(&self, env: &[String], prog: &str, args: &[&OsStr]) -> Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--", "env"])
            .args(env)
            .arg(self.prog(prog))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
    }
}

/// A throw-away cluster in a scratch directory; a running server is stopped on drop
/// (`pg_ctl stop -m immediate`), also when the test fails.
struct Cluster<'p> {
    pg: &'p Postgres,
    dir: TempDir,
    shim: PathBuf,
    running: bool,
}

impl<'p> Cluster<'p> {
    /// `initdb`, with a small configuration: shared_buffers 256MB, Unix socket only.
    fn init(pg: &'p Postgres, tag: &str) -> Cluster<'p> {
        let (dir, shim) = scratch(tag);
        let c = Cluster {
            pg,
            dir,
            shim,
            running: false,
        };
        for sub in ["data", "sock"] {
            let p = c.dir.path().join(sub);
            std::fs::create_dir(&p).unwrap();
            std::os::unix::fs::chown(&p, Some(pg.uid), Some(pg.gid)).unwrap();
        }
        let data = c.data();
        let out = pg.run_as(
            &[],
            "initdb",
            &[
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-A"),
                OsStr::new("trust"),
                OsStr::new("--no-sync"),
            ],
        );
        assert!(out.status.success(), "initdb: {}", text(&out));
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\n\
             max_connections = 20\nshared_buffers = '256MB'\nfsync = off\n\
             synchronous_commit = off\nautovacuum = off\n",
            c.sock().display()
        );
        let path = data.join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push_str(&conf);
        std::fs::write(&path, all).unwrap();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("sock").join("server.log")
    }

    /// The environment that puts the server's shared memory on msharefs.
    fn shim_env(&self, dir: &Path, name: Option<&str>) -> Vec<String> {
        let mut env = vec![
            format!("LD_PRELOAD={}", self.shim.display()),
            format!("MSHARE_MOUNT={}", dir.display()),
            "MSHARE_ANON_MIN=64M".to_string(),
        ];
        if let Some(n) = name {
            env.push(format!("MSHARE_ANON_NAME={n}"));
        }
        env
    }

    /// `pg_ctl start` with `env` (huge_pages=off: PostgreSQL's plain anonymous mapping).
    fn start(&mut self, env: &[String]) {
        self.start_with(env, "");
    }

    /// `pg_ctl start` with `env` and server options `opts` (`-c name=value ...`), besides
    /// huge_pages=off.
    fn start_with(&mut self, env: &[String], opts: &str) {
        let out = self.try_start(env, opts);
        assert!(
            out.status.success(),
            "pg_ctl start: {}\nserver log:\n{}",
            text(&out),
            self.server_log()
        );
    }

    /// `pg_ctl start`, whatever comes of it.
    fn try_start(&mut self, env: &[String], opts: &str) -> Output {
        let data = self.data();
        let log = self.log();
        self.running = true;
        let opts = format!("-c huge_pages=off {opts}");
        let out = self.pg.run_as(
            env,
            "pg_ctl",
            &[
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-l"),
                log.as_os_str(),
                OsStr::new("-w"),
                OsStr::new("-t"),
                OsStr::new("120"),
                OsStr::new("-o"),
                OsStr::new(&opts),
                OsStr::new("start"),
            ],
        );
        if !out.status.success() {
            self.running = false;
        }
        out
    }

    fn stop(&mut self, mode: &str) {
        let data = self.data();
        let out = self.pg.run_as(
            &[],
            "pg_ctl",
            &[
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-m"),
                OsStr::new(mode),
                OsStr::new("-w"),
                OsStr::new("stop"),
            ],
        );
        self.running = false;
        assert!(out.status.success(), "pg_ctl stop: {}", text(&out));
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn postmaster(&self) -> u32 {
        let pid =
            std::fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        pid.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid")
    }

    /// The postmaster and its children (every server process), with their command lines.
    fn processes(&self) -> Vec<(u32, String)> {
        let pm = self.postmaster();
        let mut out = vec![(pm, cmdline(pm))];
        for pid in kernel_glue::procfs::pids().expect("/proc") {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
            let mut fields = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace())
                .into_iter()
                .flatten();
            let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse().ok()));
            // A zombie (a backend that has just exited) has no memory left to check.
            if ppid == Some(pm) && state != Some("Z") {
                out.push((pid, cmdline(pid)));
            }
        }
        out
    }

    fn client_args<'a>(&'a self, sock: &'a Path) -> Vec<&'a OsStr> {
        vec![
            OsStr::new("-h"),
            sock.as_os_str(),
            OsStr::new("-p"),
            OsStr::new("5432"),
            OsStr::new("-U"),
            OsStr::new("postgres"),
        ]
    }

    fn psql(&self, sql: &str) -> String {
        let sock = self.sock();
        let out = Command::new(self.pg.prog("psql"))
            .args(self.client_args(&sock))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        if self.running {
            if std::thread::panicking() {
                loud(&format!(
                    "server log of the failed test:\n{}",
                    self.server_log()
                ));
            }
            let data = self.data();
            let _ = self.pg.run_as(
                &[],
                "pg_ctl",
                &[
                    OsStr::new("-D"),
                    data.as_os_str(),
                    OsStr::new("-m"),
                    OsStr::new("immediate"),
                    OsStr::new("-w"),
                    OsStr::new("stop"),
                ],
            );
        }
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Checks that every server process maps the same region of `m` at the same 1 GiB-aligned
/// address, `deleted` or not, of a length that fits PostgreSQL's `shared_memory_size`
/// (whole MB, rounded up) rounded up to 2 MiB. Returns the mapping.
fn check_shared_memory(
    c: &Cluster<'_>,
    m: &Msharefs,
    deleted: bool,
    shmem_mb: u64,
) -> kernel_glue::procfs::MapsEntry {
    let procs = c.processes();
    assert!(procs.len() >= 4, "too few server processes: {procs:?}");
    let pm = c.postmaster();
    let maps = backing_mappings(pm, m).expect("the postmaster is running");
    // The main segment is the largest (processes may also map dynamic shared memory
    // segments placed on msharefs).
    let r = maps
        .iter()
        .max_by_key(|v| v.end - v.start)
        .unwrap_or_else(|| panic!("postmaster {pm}: no region mapping"))
        .clone();
    let len = (r.end - r.start) as u64;
    assert_eq!(r.start as u64 % GIB, 0, "not 1 GiB-aligned: {r:?}");
    assert_eq!(r.perms, "rw-s", "{r:?}");
    assert_eq!(r.path.ends_with(" (deleted)"), deleted, "{r:?}");
    assert_eq!(len % HUGE, 0, "{r:?}");
    assert!(
        len + HUGE > (shmem_mb - 1) * MIB && len < shmem_mb * MIB + HUGE,
        "mapping of {len} bytes for {shmem_mb} MB of shared memory: {r:?}"
    );
    let mut checked = 0;
    for (pid, cmd) in &procs {
        // A backend may exit between the listing and here.
        if let Some(mut theirs) = backing_mappings(*pid, m) {
            theirs.retain(|v| v.ino == r.ino);
            assert_eq!(
                theirs,
                vec![r.clone()],
                "{pid} ({cmd}) does not share the postmaster's mapping"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "only {checked} server processes checked: {procs:?}"
    );
    r
}

/// Runs pgbench (`args`) to completion; while it runs, once `clients` client backends are
/// connected, `during` is called. Checks that it ends successfully with no failed
/// transaction and returns its standard output.
fn pgbench(c: &Cluster<'_>, args: &[&str], clients: usize, mut during: impl FnMut()) -> String {
    let sock = c.sock();
    let mut all: Vec<&OsStr> = c.client_args(&sock);
    all.extend(args.iter().map(OsStr::new));
    all.push(OsStr::new("postgres"));
    let mut h = Helper::spawn("pgbench", &c.pg.prog("pgbench"), &all).unwrap();
    h.close_stdin();
    let deadline = Instant::now() + LIMIT;
    let mut seen = false;
    while Instant::now() < deadline {
        let n = c
            .processes()
            .iter()
            .filter(|(_, cmd)| cmd.contains("[local]"))
            .count();
        if n >= clients {
            during();
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen, "pgbench never had {clients} backends connected");
    let status = h.wait(LIMIT).unwrap();
    let mut lines = Vec::new();
    while let Ok(l) = h.read_line(Duration::from_secs(5)) {
        lines.push(l);
    }
    let out = lines.join("\n");
    assert!(status.success(), "pgbench {args:?}: {status}\n{out}");
    assert!(
        out.contains("number of failed transactions: 0"),
        "pgbench {args:?}:\n{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("tps = ")),
        "pgbench {args:?}:\n{out}"
    );
    out
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn postgres_runs_on_msharefs_under_the_shim() {
    const NAME: &str = "postgres_runs_on_msharefs_under_the_shim";
    if !require_privileged(NAME) {
        return;
    }
    let Some(pg) = Postgres::find(NAME) else {
        return;
    };
    let _pool = PoolGuard::new();
    let m = Msharefs::mount("postgres", &["--backing", "hugetlb"]);
    let dir = m.path("pg");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(pg.uid), Some(pg.gid)).unwrap();
    let mut c = Cluster::init(&pg, "postgres-shim");

    // 1. Unlinked region (the benchmark's configuration).
    let env = c.shim_env(&dir, None);
    c.start(&env);
    let shmem_mb: u64 = c
        .psql("SHOW shared_memory_size")
        .trim_end_matches("MB")
        .parse()
        .expect("shared_memory_size in MB");
    let r = check_shared_memory(&c, &m, true, shmem_mb);
    loud(&format!(
        "postgres: {} MB of shared memory on {:#x}-{:#x} {}",
        shmem_mb, r.start, r.end, r.path
    ));
    assert!(
        regions(&m).is_empty(),
        "an unlinked region is listed: {}",
        m.stat()
    );
    let sock = c.sock();
    let mut init: Vec<&OsStr> = c.client_args(&sock);
    init.extend(["-i", "-q", "-s", "5", "postgres"].map(OsStr::new));
    let out = Command::new(pg.prog("pgbench"))
        .args(&init)
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench -i: {}", text(&out));
    // Client backends are forked after the mapping was made: they have it too.
    let out = pgbench(&c, &["-n", "-c", "4", "-j", "2", "-T", "5"], 4, || {
        check_shared_memory(&c, &m, true, shmem_mb);
    });
    loud(&format!("pgbench (tpcb-like, 4 clients, shim):\n{out}"));
    c.stop("fast");
    let log = c.server_log();
    assert!(
        !log.contains("libmshare_preload"),
        "the shim fell back:\n{log}"
    );
    assert!(
        !log.contains("munmap("),
        "PostgreSQL could not unmap its shared memory:\n{log}"
    );

    // 2. Kept under a name: msharefs lists every server process as attached.
    let env = c.shim_env(&dir, Some("shmem"));
    c.start(&env);
    let r = check_shared_memory(&c, &m, false, shmem_mb);
    let pids: Vec<u64> = c.processes().iter().map(|(p, _)| u64::from(*p)).collect();
    let stat = m.stat();
    let regs = stat["regions"].as_array().cloned().unwrap_or_default();
    assert_eq!(regs.len(), 1, "{stat}");
    assert!(
        regs[0]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("pg/shmem")),
        "{stat}"
    );
    assert_eq!(num(&regs[0], "size"), (r.end - r.start) as u64, "{stat}");
    let attached: Vec<(u64, String)> = regs[0]["attached"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["pid"].as_u64()?, p["comm"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    for pid in &pids {
        assert!(
            attached
                .iter()
                .any(|(p, comm)| p == pid && comm == "postgres"),
            "server process {pid} not listed as attached: {stat}"
        );
    }
    let out = pgbench(
        &c,
        &["-n", "-S", "-c", "4", "-j", "2", "-T", "3"],
        4,
        || {
            let stat = m.stat();
            let n = stat["regions"][0]["attached"]
                .as_array()
                .map_or(0, Vec::len);
            assert!(
                n >= pids.len() + 4,
                "{n} attached with 4 clients connected: {stat}"
            );
        },
    );
    loud(&format!(
        "pgbench (select-only, 4 clients, named region):\n{out}"
    ));
    c.stop("fast");
    std::fs::remove_file(dir.join("shmem")).unwrap();
    assert!(regions(&m).is_empty(), "{}", m.stat());
    assert_eq!(m.stat()["totals"]["pool_pages_added"], 0, "{}", m.stat());
}

// ---- System V main segment and POSIX dynamic shared memory -----------------------------

/// The shared-memory key and id PostgreSQL wrote to line 7 of `postmaster.pid`.
fn shmem_key_and_id(c: &Cluster<'_>) -> (u64, i32) {
    let pid = std::fs::read_to_string(c.data().join("postmaster.pid")).expect("postmaster.pid");
    let line = pid.lines().nth(6).expect("line 7 of postmaster.pid");
    let mut f = line.split_whitespace();
    let key = f.next().and_then(|k| k.parse().ok()).expect("key");
    let id = f.next().and_then(|k| k.parse().ok()).expect("shmid");
    (key, id)
}

fn segment(id: i32) -> Option<kernel_glue::ipc::Segment> {
    kernel_glue::ipc::segments()
        .expect("/proc/sysvipc/shm")
        .into_iter()
        .find(|s| s.id == id)
}

/// Regions of POSIX segments PostgreSQL made (`/.posix-shm/PostgreSQL.N`).
fn dsm_regions(m: &Msharefs) -> usize {
    regions(m)
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/.posix-shm/PostgreSQL."))
        })
        .count()
}

const PARALLEL_SETUP: &str = "CREATE TABLE a AS SELECT g AS k, g % 1000 AS x \
     FROM generate_series(1, 3000000) g; \
     CREATE TABLE b AS SELECT g AS k, g % 7 AS y FROM generate_series(1, 3000000) g; \
     ANALYZE a; ANALYZE b;";

/// A parallel hash join whose shared hash table grows through dynamic shared memory
/// segments of 1, 1, 2, 2, 4, 4, ... MiB (`dsa.c`).
const PARALLEL_JOIN: &str = "SET max_parallel_workers_per_gather = 2; \
     SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; \
     SET parallel_leader_participation = off; SET enable_parallel_hash = on; \
     SET work_mem = '256MB'; \
     SELECT count(*), sum(a.x::bigint * b.y) FROM a JOIN b USING (k);";

/// Runs the parallel join while watching the mount; returns its result and the most
/// POSIX regions seen at once.
fn parallel_join(c: &Cluster<'_>, m: &Msharefs) -> (String, usize) {
    let done = std::sync::atomic::AtomicBool::new(false);
    let most = std::sync::atomic::AtomicUsize::new(0);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                most.fetch_max(dsm_regions(m), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let r = c.psql(PARALLEL_JOIN);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    (result, most.into_inner())
}

/// Waits until `pid` is gone.
fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + LIMIT;
    while kernel_glue::process::alive(pid) {
        assert!(Instant::now() < deadline, "{what} {pid} does not go");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE), uses huge pages, runs PostgreSQL as postgres"]
fn postgres_sysv_and_posix_dsm_on_msharefs_under_the_shim() {
    const NAME: &str = "postgres_sysv_and_posix_dsm_on_msharefs_under_the_shim";
    if !require_privileged(NAME) {
        return;
    }
    let Some(pg) = Postgres::find(NAME) else {
        return;
    };
    let pool = PoolGuard::new();
    // Dropped after the cluster: removes what a crashed server leaves, also on failure.
    let leftovers = msharefs_tests::ShmLeftovers::new();
    let m = Msharefs::mount("pgsysv", &["--backing", "hugetlb"]);
    let dir = m.path("pg");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(pg.uid), Some(pg.gid)).unwrap();
    let mut c = Cluster::init(&pg, "pg-sysv");
    let env = vec![
        format!("LD_PRELOAD={}", c.shim.display()),
        format!("MSHARE_MOUNT={}", dir.display()),
        // Low, so that the parallel hash join's 1 MiB segments are placed too.
        "MSHARE_SHM_MIN=1M".to_string(),
    ];
    const OPTS: &str = "-c shared_memory_type=sysv -c dynamic_shared_memory_type=posix \
                        -c max_connections=40";
    c.start_with(&env, OPTS);

    // The main segment: a kernel System V segment whose data is on msharefs.
    let shmem_mb: u64 = c
        .psql("SHOW shared_memory_size")
        .trim_end_matches("MB")
        .parse()
        .expect("shared_memory_size in MB");
    let r = check_shared_memory(&c, &m, false, shmem_mb);
    let (key, id) = shmem_key_and_id(&c);
    let seg = segment(id).expect("the segment in /proc/sysvipc/shm");
    assert_eq!(seg.key as u64, key, "{seg:?}");
    // The backend of the last psql may still be exiting (attached when the segment is
    // read, gone when the processes are listed): compare until both readings agree.
    let deadline = Instant::now() + Duration::from_secs(10);
    let procs = loop {
        let seg = segment(id).expect("the segment in /proc/sysvipc/shm");
        let procs = c.processes().len() as u64;
        if seg.nattch == procs {
            break procs;
        }
        assert!(
            Instant::now() < deadline,
            "every server process counts: {seg:?}, {procs} processes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let listed = Command::new("ipcs").args(["-m"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&id.to_string())),
        "ipcs -m does not list {id}:\n{}",
        text(&listed)
    );
    assert!(
        regions(&m)
            .iter()
            .any(|x| x["path"] == format!("/.sysv-shm/{id}")),
        "{}",
        m.stat()
    );
    loud(&format!(
        "postgres sysv: segment {id} (key {key}, {} bytes, nattch {}) on {:#x}-{:#x} {}",
        seg.size, seg.nattch, r.start, r.end, r.path
    ));
    let sock = c.sock();
    let mut init: Vec<&OsStr> = c.client_args(&sock);
    init.extend(["-i", "-q", "-s", "5", "postgres"].map(OsStr::new));
    let out = Command::new(pg.prog("pgbench"))
        .args(&init)
        .output()
        .unwrap();
    assert!(out.status.success(), "pgbench -i: {}", text(&out));
    let out = pgbench(
        &c,
        &["-n", "-S", "-c", "16", "-j", "2", "-T", "5"],
        16,
        || {
            check_shared_memory(&c, &m, false, shmem_mb);
            let seg = segment(id).expect("segment");
            assert!(seg.nattch >= procs + 16, "16 clients attached: {seg:?}");
        },
    );
    loud(&format!(
        "pgbench (select-only, 16 clients, sysv on msharefs):\n{out}"
    ));

    // Dynamic shared memory of a parallel hash join: POSIX segments on msharefs.
    c.psql(PARALLEL_SETUP);
    let plan =
        c.psql(&PARALLEL_JOIN.replace("SELECT count", "EXPLAIN (ANALYZE, COSTS OFF) SELECT count"));
    assert!(
        plan.contains("Parallel Hash") && plan.contains("Workers Launched: 2"),
        "not a parallel hash join:\n{plan}"
    );
    let (ours, seen) = parallel_join(&c, &m);
    assert!(
        seen >= 1,
        "no dynamic shared memory segment on msharefs during the join"
    );
    let log = m.log();
    let placed = log.matches("POSIX segment PostgreSQL.").count();
    assert!(placed >= 2, "{placed} POSIX segments placed:\n{log}");
    assert!(
        !c.server_log().contains("libmshare_preload"),
        "the shim fell back:\n{}",
        c.server_log()
    );
    loud(&format!(
        "postgres parallel hash join under the shim: {ours}; up to {seen} dynamic segments \
         on msharefs at once, {placed} placed in all"
    ));

    // kill -9 of the postmaster while a backend lives: a new start must be refused while
    // that backend holds the segment (shm_nattch), and succeed once it is gone.
    let mut busy_args: Vec<&OsStr> = c.client_args(&sock);
    busy_args.extend(
        [
            "-X",
            "-c",
            "SELECT count(*) FROM generate_series(1, 10000000000)",
            "postgres",
        ]
        .map(OsStr::new),
    );
    let mut busy = Helper::spawn("busy psql", &pg.prog("psql"), &busy_args).unwrap();
    busy.close_stdin();
    let deadline = Instant::now() + LIMIT;
    let backend = loop {
        let b = c
            .processes()
            .into_iter()
            .find(|(_, cmd)| cmd.contains("[local] SELECT"));
        if let Some((pid, _)) = b {
            break pid;
        }
        assert!(Instant::now() < deadline, "the busy backend does not show");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pm = c.postmaster();
    kernel_glue::process::kill(pm, kernel_glue::consts::SIGKILL).unwrap();
    wait_gone(pm, "postmaster");
    // As PostgreSQL's own test of this (src/test/recovery/t/017_shm.pl) does: without the
    // lock file, the new postmaster meets the old segment through its key.
    std::fs::remove_file(c.data().join("postmaster.pid")).unwrap();
    // Likewise the socket's lock file: it names the dead postmaster, which this sandbox's
    // init may not have reaped yet (a zombie passes PostgreSQL's liveness check).
    let _ = std::fs::remove_file(c.sock().join(".s.PGSQL.5432.lock"));
    // The other server processes notice the postmaster's death and exit; the busy
    // backend, in a CPU loop, does not.
    let deadline = Instant::now() + LIMIT;
    loop {
        let n = segment(id).map_or(0, |s| s.nattch);
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "nattch stays {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(kernel_glue::process::alive(backend));
    let refused = c.try_start(&env, OPTS);
    assert!(
        !refused.status.success(),
        "started beside a live backend: {}",
        text(&refused)
    );
    let log = c.server_log();
    assert!(
        log.contains("pre-existing shared memory block") && log.contains("is still in use"),
        "not refused for the shared memory:\n{log}"
    );
    kernel_glue::process::kill(backend, kernel_glue::consts::SIGKILL).unwrap();
    wait_gone(backend, "busy backend");
    drop(busy);
    c.start_with(&env, OPTS);
    let (_, new_id) = shmem_key_and_id(&c);
    assert_ne!(new_id, id, "the old segment is not reused");
    check_shared_memory(&c, &m, false, shmem_mb);
    let again = c.psql(PARALLEL_JOIN);
    assert_eq!(again, ours);
    loud(&format!(
        "postgres: after kill -9 of the postmaster a start was refused while backend {backend} \
         held segment {id}, and succeeded once it was gone (new segment {new_id})"
    ));

    // A clean stop leaves nothing: no segment, no /dev/shm file, no region, no pool page.
    c.stop("fast");
    assert!(segment(new_id).is_none(), "segment {new_id} left");
    assert!(segment(id).is_none(), "segment {id} left");
    leftovers.check("a clean stop");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !regions(&m).is_empty() {
        assert!(Instant::now() < deadline, "regions left: {}", m.stat());
        std::thread::sleep(Duration::from_millis(100));
    }
    let now = msharefs_tests::PoolState::read();
    assert!(
        now.nr_hugepages == pool.before().nr_hugepages,
        "pool {now:?}, before {:?}",
        pool.before()
    );

    // The same join without the shim: the kernel's own shared memory, the same result.
    c.start_with(&[], OPTS);
    let (kernel, seen) = parallel_join(&c, &m);
    assert_eq!(seen, 0);
    assert_eq!(kernel, ours, "results differ with and without the shim");
    c.stop("fast");
    leftovers.check("a clean stop without the shim");
    loud(&format!(
        "postgres: the join gives {kernel} without the shim too; a clean stop left no \
         segment, /dev/shm file, region or huge page"
    ));
}
