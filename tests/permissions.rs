//! Permissions: an unprivileged user (uid 65534) against root's regions, by every path it
//! has: the msharefs file (open, read, map, resize, rename, unlink, chmod, chown, xattr,
//! ioctl), the attach socket with every descriptor it can obtain (including `O_PATH`), the
//! `LD_PRELOAD` shim, the state directory and backing files, and the daemon's `/proc`
//! entries. A 0600 region grants nothing; 0644 grants reading and read-only mappings;
//! 0664 grants writing to a member of the region's group only. The root directory is
//! 1777 (sticky): nobody may remove or rename another user's region.
//!
//! Also: the daemon keeps only the capabilities it needs, in every thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kernel_glue::caps::{self, CapSet};
use kernel_glue::consts::*;
use kernel_glue::fd as kfd;
use kernel_glue::mapping::Protection;
use mshare::{Backing, uapi};
use msharefs_tests::mountguard::{Msharefs, artifacts};
use msharefs_tests::{Attach, PoolGuard, Probe, TempDir, loud, probe_bin, require_privileged};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const MARKER: &str = "ROOT-SECRET";
const NOBODY: u32 = 65534;
const GROUP: u32 = 4242;
/// The system's Python, which other users can run (a per-user install under /root is not
/// reachable for them).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Runs as the other user: every action on every region, and the global probes. Prints one
/// JSON object: `{"regions": {name: {action: outcome}}, "global": {check: outcome}}`; an
/// outcome is `ok`, an errno name, or `wrong-data` when the bytes read are not the marker.
const PY_ATTACKER: &str = r#"
import array, errno, fcntl, json, mmap, os, socket, struct, sys
cfg = json.loads(sys.argv[1])
M, STATE, SOCK, SIZE = cfg["mount"], cfg["state"], cfg["socket"], cfg["size"]
MARK = cfg["marker"].encode()

def res(f):
    try:
        r = f()
        return "ok" if r is None else r
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def with_fd(path, flags, f):
    fd = os.open(path, flags)
    try:
        return f(fd)
    finally:
        os.close(fd)

def check(buf):
    return None if bytes(buf[:len(MARK)]) == MARK else "wrong-data"

def mapped(fd, prot, write=False):
    m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, prot)
    try:
        if write:
            m[SIZE - 1] = 0x4E
        return check(m[:len(MARK)])
    finally:
        m.close()

def request(msg, fds):
    # One datagram to the attach socket with the socket to answer on; returns our end.
    ours, theirs = socket.socketpair()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [theirs.fileno()] + fds))], 0, SOCK)
    theirs.close()
    return ours

def attach(path, flags, req):
    def f(fd):
        s = request(req, [fd])
        msg, fds, _, _ = socket.recv_fds(s, 4, 1)
        s.close()
        err = struct.unpack("i", msg)[0] if len(msg) == 4 else errno.EIO
        if err:
            raise OSError(err, os.strerror(err))
        if not fds:
            return "no-fd"
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if req == b"w" else 0)
            return mapped(fds[0], prot)
        finally:
            os.close(fds[0])
    return with_fd(path, flags, f)

def ioctl(path, flags, cmd, buf):
    with_fd(path, flags, lambda fd: fcntl.ioctl(fd, cmd, bytearray(buf)))

create = struct.pack("QQQIIII", cfg["object_offset"], cfg["page"], 0, 3, 0x31, 0xFFFFFFFF, 0)
unmap = struct.pack("QQ", 0, cfg["page"])
info = bytes(cfg["info_len"])
R, W, RW = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
actions = [
    ("stat", lambda p: os.stat(p) and None),
    ("open_ro", lambda p: with_fd(p, R, lambda fd: None)),
    ("open_rw", lambda p: with_fd(p, RW, lambda fd: None)),
    ("open_wo", lambda p: with_fd(p, W, lambda fd: None)),
    ("read", lambda p: with_fd(p, R, lambda fd: check(os.pread(fd, len(MARK), 0)))),
    ("mmap_ro", lambda p: with_fd(p, R, lambda fd: mapped(fd, mmap.PROT_READ))),
    ("mmap_rw", lambda p: with_fd(p, RW, lambda fd: mapped(fd, mmap.PROT_READ | mmap.PROT_WRITE, True))),
    ("mmap_rw_on_ro", lambda p: with_fd(p, R, lambda fd: mapped(fd, mmap.PROT_READ | mmap.PROT_WRITE))),
    ("truncate", lambda p: os.truncate(p, 2 * SIZE)),
    ("setxattr", lambda p: os.setxattr(p, "user.mshare.backing", b"shmem")),
    ("chmod", lambda p: os.chmod(p, 0o666)),
    ("chown", lambda p: os.chown(p, os.getuid(), -1)),
    ("ioctl_info", lambda p: ioctl(p, R, cfg["get_info"], info)),
    ("ioctl_unmap_ro", lambda p: ioctl(p, R, cfg["unmap"], unmap)),
    ("ioctl_create_rw", lambda p: ioctl(p, RW, cfg["create"], create)),
    ("attach_o_path", lambda p: attach(p, os.O_PATH, b"r")),
    ("attach_ro", lambda p: attach(p, R, b"r")),
    ("attach_rw", lambda p: attach(p, RW, b"w")),
    ("attach_w_on_ro", lambda p: attach(p, R, b"w")),
    ("rename", lambda p: os.rename(p, os.path.join(M, "stolen"))),
    ("unlink", lambda p: os.unlink(p)),
]
out = {"regions": {}, "global": {}}
for name in cfg["regions"]:
    p = os.path.join(M, name)
    out["regions"][name] = {a: res(lambda: f(p)) for a, f in actions}

g = out["global"]
g["list_state_dir"] = res(lambda: os.listdir(STATE) and None)
g["list_backing_dir"] = res(lambda: os.listdir(os.path.join(STATE, "backing")) and None)
for name, path in cfg["backing_files"].items():
    g["open_backing " + name] = res(lambda: with_fd(path, R, lambda fd: None))
for what in ["fd", "map_files"]:
    for who in ["daemon", "holder"]:
        g[who + "_" + what] = res(lambda: os.listdir("/proc/%d/%s" % (cfg[who], what)) and None)
for who in ["daemon", "holder"]:
    g[who + "_mem"] = res(lambda: with_fd("/proc/%d/mem" % cfg[who], R, lambda fd: None))
    g[who + "_environ"] = res(lambda: with_fd("/proc/%d/environ" % cfg[who], R, lambda fd: None))
def stat_request():
    s = request(b"s", [])
    body = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        body += b
    return "refused" if b'"error"' in body else "answered"
g["stat_request"] = res(stat_request)
def own_region():
    p = os.path.join(M, "nobody-own")
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        os.pwrite(fd, MARK, 0)
    finally:
        os.close(fd)
    r = attach(p, RW, b"w")
    os.unlink(p)
    return r
g["own_region"] = res(own_region)
# The state directory's files name every region, its owner and mode: root's only.
g["read_state_json"] = res(lambda: open(os.path.join(STATE, "state.json")).read() and None)
g["read_daemon_log"] = res(lambda: open(os.path.join(STATE, "daemon.log")).read() and None)
print(json.dumps(out), flush=True)
"#;

/// Runs [`PY_ATTACKER`] as uid 65534 with group `gid` (and, with `preload`, the shim).
fn attack(cfg: &Value, gid: u32, preload: Option<&Path>) -> Value {
    assert!(
        Path::new(SYSTEM_PYTHON).exists(),
        "{SYSTEM_PYTHON} is missing (apt-get install python3)"
    );
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={gid}"),
        "--clear-groups",
        SYSTEM_PYTHON,
        "-c",
        PY_ATTACKER,
        &cfg.to_string(),
    ]);
    if let Some(so) = preload {
        cmd.env("LD_PRELOAD", so);
    }
    let out = cmd.output().expect("setpriv");
    assert!(
        out.status.success(),
        "attacker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("attacker JSON")
}

/// Creates a region as root with `mode`, group `gid`, the marker at offset 0.
fn region(fs: &Msharefs, name: &str, backing: &str, mode: u32, gid: u32) -> PathBuf {
    let p = fs.path(name);
    drop(kfd::open(&p, O_RDWR | O_CREAT | O_EXCL, 0o600).expect("create"));
    mshare::set_backing(&p, Backing::from_name(backing).expect("backing name")).expect("backing");
    let fd = kfd::open(&p, O_RDWR, 0).expect("open");
    kfd::ftruncate(&fd, SIZE).expect("size");
    std::os::unix::fs::FileExt::write_all_at(&std::fs::File::from(fd), MARKER.as_bytes(), 0)
        .expect("marker");
    std::os::unix::fs::chown(&p, Some(0), Some(gid)).expect("chown");
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
    p
}

/// What the other user must get, action by action, for a region of `kind` with `backing`.
fn expected(kind: &str, hugetlb: bool, shim: bool) -> BTreeMap<&'static str, &'static str> {
    let all = |v: &'static str| -> BTreeMap<&'static str, &'static str> {
        [
            "stat",
            "open_ro",
            "open_rw",
            "open_wo",
            "read",
            "mmap_ro",
            "mmap_rw",
            "mmap_rw_on_ro",
            "truncate",
            "setxattr",
            "chmod",
            "chown",
            "ioctl_info",
            "ioctl_unmap_ro",
            "ioctl_create_rw",
            "attach_o_path",
            "attach_ro",
            "attach_rw",
            "attach_w_on_ro",
            "rename",
            "unlink",
        ]
        .into_iter()
        .map(|a| (a, v))
        .collect()
    };
    // hugetlb regions cannot be mapped through FUSE (ENODEV) unless the shim maps them;
    // thp regions are not served by the attach socket (ENODEV: map the file instead).
    let map_ok = if hugetlb && !shim { "ENODEV" } else { "ok" };
    let socket_ok = if hugetlb { "ok" } else { "ENODEV" };
    let mut e = match kind {
        // Behind a 0700 directory: not even a lookup.
        "closed" => return all("EACCES"),
        "0600" => {
            let mut e = all("EACCES");
            e.insert("stat", "ok");
            e.insert("attach_o_path", "EBADF");
            e
        }
        "0644" | "0664-other" => {
            let mut e = all("EACCES");
            e.insert("stat", "ok");
            e.insert("open_ro", "ok");
            e.insert("read", "ok");
            e.insert("mmap_ro", map_ok);
            e.insert("ioctl_info", "ok");
            e.insert("ioctl_unmap_ro", "EBADF");
            e.insert("attach_o_path", "EBADF");
            e.insert("attach_ro", socket_ok);
            e
        }
        "0664-group" => {
            let mut e = all("ok");
            e.insert("mmap_ro", map_ok);
            e.insert("mmap_rw", map_ok);
            e.insert("mmap_rw_on_ro", "EACCES");
            // Allowed, but a region's size and backing are set once.
            e.insert("truncate", "EINVAL");
            e.insert("setxattr", "EBUSY");
            e.insert("ioctl_unmap_ro", "EBADF");
            e.insert("attach_o_path", "EBADF");
            e.insert("attach_ro", socket_ok);
            e.insert("attach_rw", socket_ok);
            e.insert("attach_w_on_ro", "EACCES");
            e
        }
        other => panic!("unknown kind {other}"),
    };
    // Only the owner changes mode and owner; the sticky root directory keeps others'
    // regions where they are.
    for a in ["chmod", "chown", "rename", "unlink"] {
        e.insert(a, "EPERM");
    }
    e
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn other_users_get_exactly_what_the_mode_grants() {
    if !require_privileged("other_users_get_exactly_what_the_mode_grants") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("perm", &["--backing", "hugetlb"]);
    let mut regions = BTreeMap::new();
    for (kind, mode) in [("0600", 0o600), ("0644", 0o644), ("0664", 0o664)] {
        for backing in ["hugetlb", "thp"] {
            let name = format!("r{kind}-{backing}");
            region(&fs, &name, backing, mode, GROUP);
            regions.insert(name, (kind, backing == "hugetlb"));
        }
    }
    std::fs::create_dir(fs.path("closed")).expect("mkdir");
    region(&fs, "closed/r", "hugetlb", 0o644, 0);
    std::fs::set_permissions(
        fs.path("closed"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod closed");
    regions.insert("closed/r".into(), ("closed", true));
    // A root process holding root's private region attached.
    let mut holder = Probe::spawn(
        probe_bin!(),
        &Attach::new(fs.path("r0600-hugetlb"), Protection::ReadWrite).hold(),
    )
    .expect("holder");
    let holder_pid = holder.report().expect("holder attached").pid;

    let ino = |name: &str| kfd::stat(&fs.path(name)).expect("stat").ino;
    let backing_files = json!({
        "hugetlb 0600": fs.state_dir().join(format!("backing/hugetlb/{}", ino("r0600-hugetlb"))),
        "thp 0600": fs.state_dir().join(format!("backing/thp/{}", ino("r0600-thp"))),
        "hugetlb 0644": fs.state_dir().join(format!("backing/hugetlb/{}", ino("r0644-hugetlb"))),
    });
    for f in backing_files.as_object().expect("object").values() {
        assert!(Path::new(f.as_str().expect("path")).exists(), "{f} exists");
    }
    let cfg = json!({
        "mount": fs.mountpoint(),
        "state": fs.state_dir(),
        "socket": fs.state_dir().join("attach.sock"),
        "size": SIZE,
        "page": 2 * MIB,
        "marker": MARKER,
        "regions": regions.keys().collect::<Vec<_>>(),
        "backing_files": backing_files,
        "daemon": fs.daemon_pid(),
        "holder": holder_pid,
        "get_info": uapi::MSHAREFS_GET_INFO,
        "create": uapi::MSHAREFS_CREATE_MAPPING,
        "unmap": uapi::MSHAREFS_UNMAP,
        "info_len": std::mem::size_of::<uapi::MshareRegionInfo>(),
    });

    // The shim must be loadable by the other user: a copy in a world-readable directory.
    let shim_dir = TempDir::new("perm-shim").expect("temp dir");
    std::fs::set_permissions(
        shim_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let shim = shim_dir.path().join("libmshare_preload.so");
    std::fs::copy(artifacts().join("libmshare_preload.so"), &shim).expect("copy the shim");

    let mut mismatches = Vec::new();
    let mut checked = 0;
    let runs = [(NOBODY, None), (GROUP, None), (GROUP, Some(shim.as_path()))];
    for (run, (gid, preload)) in runs.into_iter().enumerate() {
        // Each run that may create an object gets a free place for it.
        let mut cfg = cfg.clone();
        cfg["object_offset"] = json!(SIZE.saturating_sub(2 * MIB * (run as u64).max(1)));
        let got = attack(&cfg, gid, preload);
        let label = format!(
            "gid {gid}{}",
            if preload.is_some() {
                " with the shim"
            } else {
                ""
            }
        );
        for (name, &(kind, hugetlb)) in &regions {
            let kind = match kind {
                "0664" if gid == GROUP => "0664-group",
                "0664" => "0664-other",
                k => k,
            };
            let want = expected(kind, hugetlb, preload.is_some());
            for (action, want) in want {
                let g = got["regions"][name][action].as_str().unwrap_or("missing");
                checked += 1;
                if g != want {
                    mismatches.push(format!("{label} {name} {action}: got {g}, want {want}"));
                }
            }
        }
        let global = got["global"].as_object().expect("global");
        for (check, outcome) in global {
            let want = match check.as_str() {
                "stat_request" => "refused",
                "own_region" => "ok",
                _ => "EACCES",
            };
            checked += 1;
            if outcome != want {
                mismatches.push(format!(
                    "{label} global {check}: got {outcome}, want {want}"
                ));
            }
        }
    }
    // Nothing the other user did changed root's data.
    for name in regions.keys() {
        let mut buf = vec![0u8; MARKER.len()];
        let f = std::fs::File::open(fs.path(name)).expect("open as root");
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).expect("read");
        assert_eq!(buf, MARKER.as_bytes(), "{name} marker intact");
    }
    holder.finish().expect("holder exits");
    loud(&format!(
        "permissions: {checked} checks as uid {NOBODY} (groups {NOBODY} and {GROUP}, with and \
         without the shim), {} mismatches",
        mismatches.len()
    ));
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// Capabilities the daemon keeps (see msharefs/src/hardening.rs and docs/RELIABILITY.md).
fn kept() -> CapSet {
    CapSet::of(&[
        caps::CAP_CHOWN,
        caps::CAP_DAC_OVERRIDE,
        caps::CAP_FOWNER,
        caps::CAP_SYS_ADMIN,
        caps::CAP_SYS_PTRACE,
    ])
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn daemon_threads_keep_only_the_capabilities_they_need() {
    if !require_privileged("daemon_threads_keep_only_the_capabilities_they_need") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("caps", &["--backing", "hugetlb"]);
    let pid = fs.daemon_pid();
    let check = |when: &str| {
        let tids = caps::thread_ids(pid).expect("threads");
        for tid in &tids {
            let Ok(s) = caps::status_caps(pid, Some(*tid)) else {
                continue; // the thread ended meanwhile
            };
            assert_eq!(s.effective, kept(), "{when}: thread {tid} CapEff");
            assert_eq!(s.permitted, kept(), "{when}: thread {tid} CapPrm");
            assert_eq!(s.bounding, kept(), "{when}: thread {tid} CapBnd");
            assert_eq!(s.inheritable, CapSet::EMPTY, "{when}: thread {tid} CapInh");
            assert_eq!(s.ambient, CapSet::EMPTY, "{when}: thread {tid} CapAmb");
            assert!(s.no_new_privs, "{when}: thread {tid} NoNewPrivs");
        }
        tids.len()
    };
    let at_start = check("after mount");
    // Everything that needs a kept capability still works: a hugetlb region (pool, host
    // mapping), a thp region opened with passthrough (CAP_SYS_ADMIN), chown and chmod of
    // a region owned by another user (CAP_CHOWN, CAP_FOWNER), and opening its backing
    // with a mode that denies root (CAP_DAC_OVERRIDE).
    let h = fs.path("h");
    drop(kfd::open(&h, O_RDWR | O_CREAT | O_EXCL, 0o600).expect("create"));
    kfd::ftruncate(kfd::open(&h, O_RDWR, 0).expect("open"), 4 * MIB).expect("size");
    let t = fs.path("t");
    drop(kfd::open(&t, O_RDWR | O_CREAT | O_EXCL, 0o600).expect("create"));
    mshare::set_backing(&t, Backing::Thp).expect("backing");
    kfd::ftruncate(kfd::open(&t, O_RDWR, 0).expect("open"), 4 * MIB).expect("size");
    std::os::unix::fs::chown(&t, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(&t, std::os::unix::fs::PermissionsExt::from_mode(0o400))
        .expect("chmod");
    let fd = kfd::open(&t, O_RDWR, 0).expect("root opens a 0400 region of another user");
    let m = kernel_glue::mapping::Mapping::map_aligned(&fd, 4 * MIB, Protection::ReadWrite, 4096)
        .expect("passthrough mapping");
    m.store_u64(0, 42).expect("write");
    let attached = Probe::run(
        probe_bin!(),
        &Attach::new(&h, Protection::ReadWrite).touch(),
    )
    .expect("attach through the socket");
    assert!(attached.touched.is_some());
    let later = check("after using the regions");
    let log = fs.log();
    assert!(
        log.contains("capabilities of all"),
        "the daemon logs the drop:\n{log}"
    );
    assert!(!log.contains(" ERROR "), "daemon errors:\n{log}");
    loud(&format!(
        "capabilities: all {at_start} daemon threads (then {later}) keep exactly {} \
         (bounding set too), no inheritable or ambient capabilities, no_new_privs set",
        kept().names().join(",")
    ));
}
