//! The `LD_PRELOAD` shim (`libmshare_preload.so`) with an unmodified interpreter: `python3`
//! and its `mmap` module, as real processes on a real msharefs mount.
//!
//! - Without the shim, `mmap` of a hugetlb region's msharefs file fails with `ENODEV`;
//!   with it, the same call returns a 1 GiB-aligned mapping of the region (checked in the
//!   process's own `/proc/self/maps`), and a second process touching 2 GiB takes at most
//!   4 minor faults per GiB (shared page tables).
//! - Access modes are those of `mmap`; every other mapping passes through untouched, also
//!   in threads and after `fork`.

#[path = "support_lib.rs"]
mod support_lib;

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use msharefs_tests::helper::Helper;
use msharefs_tests::{PoolGuard, TempDir, loud, require_privileged};
use serde_json::Value;
use support_lib::{MsharefsMount, libs, require_tool};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const LIMIT: Duration = Duration::from_secs(300);

/// Opens `argv[1]` (`rw` or `ro` in `argv[2]`), maps the whole file with `mmap.mmap`,
/// finds the new mapping in `/proc/self/maps`, then per `argv[4]` writes or checks one
/// word per `argv[3]`-byte stride, counting the minor faults of a read-touch loop over
/// the same offsets alone. Prints one JSON line; with `argv[5] == "hold"` keeps the
/// mapping until standard input closes.
const ATTACH_PY: &str = r#"
import ctypes, json, mmap, os, resource, struct, sys

SEED = 0x6d73686172650000
path, mode, stride, action, hold = sys.argv[1:6]
stride = int(stride)

def maps():
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out[lo] = (hi - lo, parts[1], parts[5].strip() if len(parts) > 5 else "")
    return out

fd = os.open(path, os.O_RDWR if mode == "rw" else os.O_RDONLY)
size = os.fstat(fd).st_size
access = mmap.ACCESS_WRITE if mode == "rw" else mmap.ACCESS_READ
before = maps()
try:
    m = mmap.mmap(fd, size, access=access)
except OSError as e:
    print(json.dumps({"errno": e.errno, "error": str(e)}), flush=True)
    sys.exit(0)
new = [(lo, v) for lo, v in maps().items() if lo not in before and v[0] == size]
if len(new) != 1:
    print(json.dumps({"error": "mapping not found in /proc/self/maps", "new": str(new)}), flush=True)
    sys.exit(1)
addr, (length, perms, file) = new[0]
if mode == "rw":
    assert ctypes.addressof(ctypes.c_char.from_buffer(m)) == addr
preload = any("libmshare_preload" in v[2] for v in maps().values())
offs = list(range(0, size, stride))
if action == "write":
    for o in offs:
        struct.pack_into("<Q", m, o, o ^ SEED)
s = 0
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for o in offs:
    s += m[o]
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bad = 0
if action == "check":
    bad = sum(1 for o in offs if struct.unpack_from("<Q", m, o)[0] != o ^ SEED)
print(json.dumps({"addr": addr, "len": length, "perms": perms, "file": file,
                  "touch_faults": f1 - f0, "touched": len(offs), "bad_words": bad,
                  "preload_loaded": preload}), flush=True)
if hold == "hold":
    sys.stdin.read()
m.close()
os.close(fd)
"#;

/// Every kind of mapping that is not a region attach, from threads and a forked child,
/// under the shim: all must behave exactly as without it.
const PASSTHROUGH_PY: &str = r#"
import errno, json, mmap, os, sys, threading

path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 1 << 20)
m = mmap.mmap(-1, 1 << 20)
m[0:5] = b"hello"; assert m[0:5] == b"hello"; m.close()
m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
m[0:3] = b"abc"; m.close()
assert os.pread(fd, 3, 0) == b"abc"
m = mmap.mmap(fd, 1 << 20, mmap.MAP_PRIVATE)
m[0:3] = b"xyz"; m.close()
assert os.pread(fd, 3, 0) == b"abc"
m = mmap.mmap(fd, 4096, offset=8192); m[0] = 7; m.close()
assert os.pread(fd, 1, 8192) == b"\x07"
m = mmap.mmap(fd, 4096, access=mmap.ACCESS_READ); assert m[0:3] == b"abc"; m.close()
ro = os.open(path, os.O_RDONLY)
try:
    mmap.mmap(ro, 4096, access=mmap.ACCESS_WRITE)
    raise SystemExit("PROT_WRITE on O_RDONLY mapped")
except PermissionError as e:
    assert e.errno == errno.EACCES
errors = []
def worker(n):
    try:
        for i in range(300):
            a = mmap.mmap(-1, 65536); a[i % 65536] = 1; a.close()
            b = mmap.mmap(fd, 4096); assert b[0:3] == b"abc"; b.close()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
for t in threads: t.start()
pid = os.fork()
if pid == 0:
    try:
        worker(99)
        os._exit(0 if not errors else 1)
    except BaseException:
        os._exit(2)
for t in threads: t.join()
_, status = os.waitpid(pid, 0)
preload = "libmshare_preload" in open("/proc/self/maps").read()
print(json.dumps({"errors": errors, "child_status": status, "preload_loaded": preload}), flush=True)
"#;

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// Starts `python3 ATTACH_PY ...`, with or without the shim.
fn spawn_attach(
    name: &str,
    preload: bool,
    path: &Path,
    mode: &str,
    action: &str,
    hold: bool,
) -> Helper {
    let shim = format!("LD_PRELOAD={}", libs().preload().display());
    let stride = (2 * MIB).to_string();
    let mut args: Vec<&OsStr> = Vec::new();
    if preload {
        args.push(os(&shim));
    }
    args.extend([
        os("python3"),
        os("-c"),
        os(ATTACH_PY),
        path.as_os_str(),
        os(mode),
        os(&stride),
        os(action),
        os(if hold { "hold" } else { "exit" }),
    ]);
    Helper::spawn(name, Path::new("/usr/bin/env"), &args)
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// Runs an attach script to completion and returns its report.
fn attach_once(name: &str, preload: bool, path: &Path, mode: &str, action: &str) -> Value {
    let mut h = spawn_attach(name, preload, path, mode, action, false);
    let v = h.read_json(LIMIT).unwrap_or_else(|e| panic!("{name}: {e}"));
    h.finish(LIMIT)
        .unwrap_or_else(|e| panic!("{name}: {e}; report {v}"));
    loud(&format!("{name}: {v}"));
    v
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {key} in {v}"))
}

fn create_region(path: &Path, size: u64, backing: mshare::Backing) {
    mshare::Region::create(path, size, 0o600, backing)
        .unwrap_or_else(|e| panic!("creating {} ({backing:?}): {e}", path.display()));
}

#[test]
fn shim_passes_every_other_mapping_through() {
    if !require_tool("python3", "shim_passes_every_other_mapping_through") {
        return;
    }
    let dir = TempDir::new("shim-passthrough").unwrap();
    let file = dir.path().join("plain");
    let shim = format!("LD_PRELOAD={}", libs().preload().display());
    let args = [
        os(&shim),
        os("python3"),
        os("-c"),
        os(PASSTHROUGH_PY),
        file.as_os_str(),
    ];
    let mut h = Helper::spawn("passthrough.py", Path::new("/usr/bin/env"), args).unwrap();
    let v = h.read_json(LIMIT).unwrap();
    h.finish(LIMIT).unwrap();
    assert_eq!(v["preload_loaded"], true, "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["child_status"], 0, "{v}");
    // Unrelated programs run normally under the shim.
    let programs: [&[&str]; 2] = [&["sh", "-c", "ls / > /dev/null"], &["sort", "--version"]];
    for cmd in programs {
        let mut args = vec![os(&shim)];
        args.extend(cmd.iter().map(os));
        let (ok, out, err) = support_lib::run("/usr/bin/env", &args);
        assert!(ok, "{cmd:?} under the shim: {out}{err}");
    }
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn shim_leaves_hugetlbfs_files_alone() {
    if !require_privileged("shim_leaves_hugetlbfs_files_alone")
        || !require_tool("python3", "shim_leaves_hugetlbfs_files_alone")
    {
        return;
    }
    let pool = PoolGuard::new();
    let dir = msharefs_tests::HugetlbfsDir::new("shim-direct").unwrap();
    let _grant = pool.grow(8).unwrap();
    // A region in direct mode is a plain hugetlbfs file: not FUSE, so the shim passes the
    // call to the kernel, which maps it (at an address of its choosing).
    let path = dir.file("direct");
    create_region(&path, 8 * MIB, mshare::Backing::Hugetlb);
    let v = attach_once("direct.py", true, &path, "rw", "write");
    assert_eq!(v["preload_loaded"], true, "{v}");
    assert_eq!(num(&v, "len"), 8 * MIB);
    assert_eq!(num(&v, "bad_words"), 0);
    std::fs::remove_file(&path).unwrap();
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn python_maps_a_hugetlb_region_only_through_the_shim() {
    if !require_privileged("python_maps_a_hugetlb_region_only_through_the_shim")
        || !require_tool(
            "python3",
            "python_maps_a_hugetlb_region_only_through_the_shim",
        )
    {
        return;
    }
    let _pool = PoolGuard::new();
    let m = MsharefsMount::new("shim-hugetlb", "hugetlb");
    let size = 2 * GIB;
    let path = m.file("sga");
    create_region(&path, size, mshare::Backing::Hugetlb);

    // Without the shim: the kernel cannot map a hugetlb region through FUSE.
    let plain = attach_once("python without shim", false, &path, "rw", "exit");
    assert_eq!(
        plain["errno"].as_i64(),
        Some(i64::from(libc::ENODEV)),
        "plain mmap of a hugetlb region must fail with ENODEV: {plain}"
    );

    // With the shim: a 1 GiB-aligned mapping of the region. The first process writes one
    // word per huge page and keeps the mapping.
    let mut first = spawn_attach("python A (shim)", true, &path, "rw", "write", true);
    let a = first.read_json(LIMIT).unwrap();
    loud(&format!("python A (shim): {a}"));
    assert_eq!(a["preload_loaded"], true, "{a}");
    assert_eq!(num(&a, "len"), size, "{a}");
    assert_eq!(num(&a, "addr") % GIB, 0, "not 1 GiB-aligned: {a}");
    assert_eq!(a["perms"], "rw-s", "{a}");

    // A second such process: touching 2 GiB costs at most 4 minor faults per GiB, and
    // it sees the first one's data.
    let b = attach_once("python B (shim)", true, &path, "rw", "check");
    assert_eq!(num(&b, "addr") % GIB, 0, "{b}");
    assert_eq!(num(&b, "bad_words"), 0, "{b}");
    assert_eq!(num(&b, "touched"), size / (2 * MIB));
    let faults = num(&b, "touch_faults");
    let per_gib = faults as f64 / (size / GIB) as f64;
    loud(&format!(
        "shim: second process touched 2 GiB with {faults} minor faults ({per_gib} per GiB)"
    ));
    assert!(
        per_gib <= 4.0,
        "{faults} faults for 2 GiB: page tables not shared: {b}"
    );

    // A read-only attacher through the shim, while A still holds its mapping.
    let c = attach_once("python C (shim, read-only)", true, &path, "ro", "check");
    assert_eq!(num(&c, "addr") % GIB, 0, "{c}");
    assert_eq!(c["perms"], "r--s", "{c}");
    assert_eq!(num(&c, "bad_words"), 0, "{c}");

    first.finish(LIMIT).unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// Python checks of the shim's `mmap` semantics on regions: access modes like `mmap`,
/// partial and private mappings left to the kernel, threads and fork.
const SEMANTICS_PY: &str = r#"
import errno, json, mmap, os, sys, threading

path = sys.argv[1]
GIB = 1 << 30
out = {}
rw = os.open(path, os.O_RDWR)
ro = os.open(path, os.O_RDONLY)
size = os.fstat(rw).st_size

def shared_of_size(size):
    with open("/proc/self/maps") as f:
        fields = [line.split() for line in f]
    return {int(x[0].split("-")[0], 16) for x in fields
            if x[1].endswith("s") and
            (lambda lo, hi: hi - lo)(*(int(v, 16) for v in x[0].split("-"))) == size}

try:
    mmap.mmap(ro, size, access=mmap.ACCESS_WRITE)
    out["ro_write"] = 0
except OSError as e:
    out["ro_write"] = e.errno
before = shared_of_size(size)
m = mmap.mmap(ro, size, access=mmap.ACCESS_READ)
new = shared_of_size(size) - before
out["ro_read_aligned"] = len(new) == 1 and all(a % GIB == 0 for a in new)
m.close()
out["unmapped"] = not (shared_of_size(size) & new)
try:
    m = mmap.mmap(rw, size // 2)
    out["partial"] = 0
    m.close()
except OSError as e:
    out["partial"] = e.errno
try:
    m = mmap.mmap(rw, size, mmap.MAP_PRIVATE)
    out["private"] = 0
    m.close()
except OSError as e:
    out["private"] = e.errno

errors = []
def worker(n):
    try:
        for i in range(20):
            m = mmap.mmap(rw, size)
            m[n * 4096] = (i + n) % 256
            assert m[n * 4096] == (i + n) % 256
            m.close()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
for t in threads: t.start()
pid = os.fork()
if pid == 0:
    worker(50)
    os._exit(0 if not errors else 1)
for t in threads: t.join()
_, status = os.waitpid(pid, 0)
out["thread_errors"] = errors
out["child_status"] = status
print(json.dumps(out), flush=True)
"#;

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn shim_mmap_semantics_on_regions() {
    if !require_privileged("shim_mmap_semantics_on_regions")
        || !require_tool("python3", "shim_mmap_semantics_on_regions")
    {
        return;
    }
    let _pool = PoolGuard::new();
    let m = MsharefsMount::new("shim-semantics", "hugetlb");
    let shim = format!("LD_PRELOAD={}", libs().preload().display());
    for (name, backing, size) in [
        ("hugetlb", mshare::Backing::Hugetlb, 64 * MIB),
        ("thp", mshare::Backing::Thp, 16 * MIB),
        ("shmem", mshare::Backing::Shmem, 4 * MIB),
    ] {
        let path = m.file(name);
        create_region(&path, size, backing);
        let args = [
            os(&shim),
            os("python3"),
            os("-c"),
            os(SEMANTICS_PY),
            path.as_os_str(),
        ];
        let label = format!("semantics.py ({name})");
        let mut h = Helper::spawn(&label, Path::new("/usr/bin/env"), args).unwrap();
        let v = h.read_json(LIMIT).unwrap();
        h.finish(LIMIT).unwrap();
        loud(&format!("{label}: {v}"));
        assert_eq!(v["ro_write"], libc::EACCES, "{label}: {v}");
        assert_eq!(v["ro_read_aligned"], true, "{label}: {v}");
        assert_eq!(v["unmapped"], true, "{label}: munmap left a mapping: {v}");
        assert_eq!(v["thread_errors"].as_array().map(Vec::len), Some(0), "{v}");
        assert_eq!(v["child_status"], 0, "{label}: {v}");
        if backing == mshare::Backing::Hugetlb {
            // Not an attach of the whole region: the kernel's answer, as without the shim.
            // (`MAP_PRIVATE` also goes to the kernel untouched; what it does with a FUSE
            // file is the daemon's business, so it is only reported here.)
            assert_eq!(v["partial"], libc::ENODEV, "{label}: {v}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// Opens `argv[1]` read-write, writes a mark into it through a mapping, says `ready`, and
/// after a line on standard input (the daemon was killed and started again meanwhile)
/// maps it again through the same descriptor and reports what it sees.
const RESTART_PY: &str = r#"
import json, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size)
m[0:8] = b"before!!"
m.close()
print("ready", flush=True)
sys.stdin.readline()
out = {}
try:
    m = mmap.mmap(fd, size)
    out["mark"] = m[0:8].decode()
    m[8:16] = b"after!!!"
    m.close()
    out["fstat_size"] = os.fstat(fd).st_size
except OSError as e:
    out["errno"] = e.errno
print(json.dumps(out), flush=True)
"#;

#[test]
#[ignore = "needs root: mounts msharefs (FUSE), kills and restarts its daemon"]
fn shim_reopens_a_region_after_a_daemon_restart() {
    let what = "shim_reopens_a_region_after_a_daemon_restart";
    if !require_privileged(what) || !require_tool("python3", what) {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = msharefs_tests::mountguard::Msharefs::mount("shim-restart", &["--backing", "hugetlb"]);
    let path = fs.path("r");
    create_region(&path, 64 * MIB, mshare::Backing::Hugetlb);
    let shim = format!("LD_PRELOAD={}", libs().preload().display());
    let args = [
        os(&shim),
        os("python3"),
        os("-c"),
        os(RESTART_PY),
        path.as_os_str(),
    ];
    let mut h = Helper::spawn("restart.py", Path::new("/usr/bin/env"), args).unwrap();
    assert_eq!(h.read_line(LIMIT).unwrap(), "ready");
    fs.kill9();
    fs.start();
    h.write_line("go").unwrap();
    let v = h.read_json(LIMIT).unwrap();
    h.finish(LIMIT).unwrap();
    loud(&format!("{what}: {v}"));
    assert_eq!(v["mark"], "before!!", "{v}");
    assert_eq!(num(&v, "fstat_size"), 64 * MIB, "{v}");
    let mut buf = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&path).unwrap(), &mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"before!!after!!!");
}
