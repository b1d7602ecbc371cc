//! Operating msharefs as a system file system: mount(8) and fstab through the
//! `mount.msharefs` helper (in a private mount namespace), umount(8) and remount with
//! every region intact, systemd's readiness protocol against a socket the test binds,
//! state directories that are not msharefs's own, and invalid option values.

#[path = "support_lib.rs"]
mod support_lib;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msharefs_tests::mountguard::{Msharefs, msharefs_bin};
use msharefs_tests::{HugetlbfsDir, PoolGuard, TempDir, loud, require_privileged};
use support_lib::require_tool;

/// A link named `mount.msharefs` to the built binary in `dir`, as `make install` makes
/// in /sbin.
fn helper_link(dir: &Path) -> PathBuf {
    let link = dir.join("mount.msharefs");
    std::os::unix::fs::symlink(msharefs_bin(), &link).expect("symlink mount.msharefs");
    link
}

/// Everything about a directory tree a test must find unchanged: every entry's path,
/// mode, owner, size and modification time.
fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let m = std::fs::symlink_metadata(&d).expect("stat");
        out.push(format!(
            "{} {:o} {}:{} {} {}",
            d.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.len(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                stack.push(e.expect("entry").path());
            }
        }
    }
    out.sort();
    out
}

/// Creates a region of `size` bytes (default backing) and writes `data` at its start.
fn sized_region(path: &Path, size: u64, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("size the region");
    f.write_all(data).expect("write the region");
}

fn assert_no_mounts_below(dir: &Path) {
    let left: Vec<PathBuf> = kernel_glue::mount::mounts()
        .expect("mountinfo")
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t.starts_with(dir))
        .collect();
    assert!(
        left.is_empty(),
        "mounts left below {}: {left:?}",
        dir.display()
    );
}

fn fuse_mounted(p: &Path) -> bool {
    kernel_glue::mount::mount_at(p)
        .expect("mountinfo")
        .is_some_and(|m| m.fstype.starts_with("fuse"))
}

/// A mount that should have been refused but succeeded is taken down before the test
/// fails on it, so the failure leaves no mount behind.
fn undo_if_mounted(bin: &Path, mnt: &Path, out: &std::process::Output) {
    if out.status.success() && mnt.exists() {
        let _ = Command::new(bin)
            .args(["umount", "--purge"])
            .arg(mnt)
            .status();
    }
}

#[test]
fn invalid_option_values_are_refused_by_name_and_change_nothing() {
    let tmp = TempDir::new("options").expect("temp dir");
    let mnt = tmp.path().join("mnt");
    let state = tmp.path().join("state");
    let bin = msharefs_bin();
    // (option, value) pairs the command line and the mount helper must refuse.
    let bad = [
        ("psi-threshold", "nan"),
        ("psi-threshold", "NaN"),
        ("psi-threshold", "inf"),
        ("psi-threshold", "-1"),
        ("psi-threshold", "100.5"),
        ("psi-threshold", "ten"),
        ("table-budget", "-1"),
        ("table-budget", "1.5G"),
        ("table-budget", "18446744073709551616"),
        ("table-budget", "99999999999T"),
        ("user-quota", "-5%"),
        ("user-quota", "101%"),
        ("user-quota", "16XB"),
        ("user-quota", "nan"),
        ("backing", "huge"),
        ("log-level", "loud"),
    ];
    for (opt, value) in bad {
        let out = Command::new(&bin)
            .arg("mount")
            .arg(&mnt)
            .arg("--state-dir")
            .arg(&state)
            .arg(format!("--{opt}"))
            .arg(value)
            .output()
            .expect("run msharefs");
        let err = String::from_utf8_lossy(&out.stderr);
        undo_if_mounted(&bin, &mnt, &out);
        assert!(!out.status.success(), "--{opt} {value} was accepted");
        assert!(
            err.contains(value),
            "--{opt} {value}: error does not name it: {err}"
        );
    }
    let link = helper_link(tmp.path());
    for (opt, value) in bad {
        let o = format!("{}={value}", opt.replace('-', "_"));
        let out = Command::new(&link)
            .arg("msharefs")
            .arg(&mnt)
            .args(["-o", &o])
            .output()
            .expect("run mount.msharefs");
        let err = String::from_utf8_lossy(&out.stderr);
        undo_if_mounted(&bin, &mnt, &out);
        assert_eq!(out.status.code(), Some(1), "-o {o}: {err}");
        assert!(err.contains(value), "-o {o}: error does not name it: {err}");
    }
    for (args, needle) in [
        (vec!["-o", "frobnicate"], "frobnicate"),
        (vec!["-o", "ro"], "ro"),
        (vec!["-o", "backing"], "backing="),
        (vec!["-t", "ext4"], "ext4"),
    ] {
        let out = Command::new(&link)
            .arg("msharefs")
            .arg(&mnt)
            .args(&args)
            .output()
            .expect("run mount.msharefs");
        let err = String::from_utf8_lossy(&out.stderr);
        undo_if_mounted(&bin, &mnt, &out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // -f (fake) with valid options checks them and mounts nothing.
    let out = Command::new(&link)
        .arg("msharefs")
        .arg(&mnt)
        .args([
            "-f",
            "-o",
            "rw,backing=thp,user_quota=none,psi_threshold=12.5,noauto",
        ])
        .output()
        .expect("run mount.msharefs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !mnt.exists() && !state.exists(),
        "a refused mount left files behind"
    );
    let out = Command::new(&bin)
        .args(["stat", "/nonexistent-msharefs/mnt"])
        .output()
        .expect("run msharefs stat");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent-msharefs/mnt"),
        "stat error does not name the path: {err}"
    );
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE)"]
fn a_foreign_state_directory_is_refused_and_left_untouched() {
    if !require_privileged("a_foreign_state_directory_is_refused_and_left_untouched") {
        return;
    }
    let tmp = TempDir::new("foreign").expect("temp dir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // A directory of someone else's: files, a subdirectory, mode 0750, another owner.
    let dir = tmp.path().join("var-lib");
    std::fs::create_dir_all(dir.join("postgresql")).unwrap();
    std::fs::write(dir.join("postgresql/PG_VERSION"), "15\n").unwrap();
    std::fs::write(dir.join("state.json"), "not ours").unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let before = snapshot(&dir);
    let link = helper_link(tmp.path());
    for (what, out) in [
        (
            "msharefs mount",
            Command::new(msharefs_bin())
                .arg("mount")
                .arg(&mnt)
                .arg("--state-dir")
                .arg(&dir)
                .output(),
        ),
        (
            "mount.msharefs",
            Command::new(&link)
                .arg("msharefs")
                .arg(&mnt)
                .arg("-o")
                .arg(format!("state_dir={}", dir.display()))
                .output(),
        ),
    ] {
        let out = out.expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: a foreign directory was used"
        );
        assert!(
            err.contains(&dir.display().to_string()) && err.contains("not empty"),
            "{what}: error does not name the directory: {err}"
        );
        assert!(!fuse_mounted(&mnt), "{what}: mounted anyway");
        assert_eq!(snapshot(&dir), before, "{what}: the directory was changed");
    }
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE)"]
fn purge_removes_only_what_msharefs_created() {
    if !require_privileged("purge_removes_only_what_msharefs_created") {
        return;
    }
    let _pool = PoolGuard::new();
    let tmp = TempDir::new("purge").expect("temp dir");
    let mnt = tmp.path().join("mnt");
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    let bin = msharefs_bin();
    let mount = || {
        let out = Command::new(&bin)
            .arg("mount")
            .arg(&mnt)
            .arg("--state-dir")
            .arg(&dir)
            .args(["--backing", "thp"])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    mount();
    // An empty existing directory is adopted: marked, its mode left alone.
    assert!(dir.join(".msharefs-state").is_file());
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode, 0o750,
        "msharefs re-moded a directory it did not create"
    );
    sized_region(&mnt.join("r"), 4096, b"region data");
    // Someone else's files beside msharefs's.
    std::fs::write(dir.join("notes.txt"), "keep me").unwrap();
    std::fs::create_dir(dir.join("backup")).unwrap();
    std::fs::write(dir.join("backup/state.json.bak"), "keep me too").unwrap();
    let out = Command::new(&bin)
        .args(["umount", "--purge"])
        .arg(&mnt)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("notes.txt"),
        "kept files not listed: {stdout}"
    );
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec!["backup", "notes.txt"],
        "purge removed a foreign file or kept one of its own"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("backup/state.json.bak")).unwrap(),
        "keep me too"
    );
    assert!(!fuse_mounted(&mnt));
    assert_no_mounts_below(tmp.path());
    // Now not empty and no longer marked: refused.
    let out = Command::new(&bin)
        .arg("mount")
        .arg(&mnt)
        .arg("--state-dir")
        .arg(&dir)
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "a purged directory with foreign files was reused"
    );
}

/// Receives one datagram, or `None` after `limit`.
fn recv(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        // A signal to this process (another test's child exiting) may interrupt the wait:
        // wait again, for the time left.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE)"]
fn foreground_daemon_tells_a_notify_socket_when_the_mount_is_live() {
    if !require_privileged("foreground_daemon_tells_a_notify_socket_when_the_mount_is_live") {
        return;
    }
    let _pool = PoolGuard::new();
    let tmp = TempDir::new("notify").expect("temp dir");
    let mnt = tmp.path().join("mnt");
    let state = tmp.path().join("state");
    // The socket systemd would bind for a Type=notify service.
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let started = Instant::now();
    let mut daemon = Command::new(msharefs_bin())
        .arg("mount")
        .arg(&mnt)
        .arg("--state-dir")
        .arg(&state)
        .args(["--backing", "thp", "--foreground"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    // Whatever happens below: no daemon, mount or backing mount stays behind.
    let _purge = PurgeOnDrop(&mnt);
    let ready = recv(&sock, Duration::from_secs(60));
    let stop = |d: &mut std::process::Child| {
        let _ = kernel_glue::process::kill(d.id(), kernel_glue::consts::SIGTERM);
        d.wait().expect("wait")
    };
    let Some(ready) = ready else {
        stop(&mut daemon);
        panic!("no readiness message in 60 s");
    };
    // At READY=1 the mount must already answer.
    let live = kernel_glue::fd::statfs(&mnt).map(|s| s.fs_type);
    let info = std::fs::read_to_string(mnt.join("mshare_info"));
    loud(&format!(
        "notify: {:?} after {} ms",
        ready,
        started.elapsed().as_millis()
    ));
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first message: {ready:?}"
    );
    assert_eq!(
        live.ok(),
        Some(kernel_glue::FUSE_SUPER_MAGIC),
        "not mounted at READY=1"
    );
    assert_eq!(info.ok().as_deref(), Some("1073741824\n"));
    sized_region(&mnt.join("r"), 4096, b"x");
    let status = stop(&mut daemon);
    let stopping = recv(&sock, Duration::from_secs(30));
    assert!(status.success(), "daemon exit status {status}");
    assert!(
        stopping
            .as_deref()
            .is_some_and(|m| m.contains("STOPPING=1")),
        "stop message: {stopping:?}"
    );
    assert!(!fuse_mounted(&mnt), "still mounted after SIGTERM");
    // SIGTERM kept the region; purge it.
    let out = Command::new(msharefs_bin())
        .args(["umount", "--purge"])
        .arg(&mnt)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The script run inside a private mount namespace: `/usr/sbin` gets an overlay that adds
/// `mount.msharefs`, `/etc/fstab` a bind mount of the test's own; then mount(8) and
/// umount(8) do the work. Prints `OK <step>` lines; any failure exits non-zero.
const NAMESPACE_SCRIPT: &str = r#"
set -eu
T=$1; BIN=$2
M=$T/mnt; S=$T/state
cleanup() {
    umount -l "$M" 2>/dev/null || true
    "$BIN" umount "$M" --purge >/dev/null 2>&1 || true
}
trap cleanup EXIT
mkdir -p "$T/up" "$T/work" "$M"
mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$T/up,workdir=$T/work" /usr/sbin
ln -s "$BIN" /usr/sbin/mount.msharefs
mount --bind "$T/fstab" /etc/fstab
is_msharefs() {  # FUSE, with msharefs as its source
    [ "$(findmnt -n -o SOURCE "$M")" = msharefs ]
    case "$(findmnt -n -o FSTYPE "$M")" in fuse|fuse.msharefs) ;; *) exit 1 ;; esac
}
not_mounted() {
    if findmnt "$M" >/dev/null; then echo "$M still mounted"; exit 1; fi
}
wait_gone() {  # the daemon saves and exits after umount(8)
    for _ in $(seq 200); do
        [ -e "$S/daemon.pid" ] || return 0
        sleep 0.05
    done
    echo "daemon still running after umount"; exit 1
}

# 1. mount -t msharefs with options.
mount -t msharefs msharefs "$M" -o "backing=hugetlb,user_quota=90%,table_budget=64M,psi_threshold=20,state_dir=$S,nofail,noatime"
is_msharefs
echo "OK mount -t"
truncate -s 4M "$M/huge"
printf 'hugetlb region data' | dd of="$M/huge" conv=notrunc status=none
touch "$M/thp"
python3 -c 'import os,sys; os.setxattr(sys.argv[1], "user.mshare.backing", b"thp")' "$M/thp"
truncate -s 4M "$M/thp"
printf 'thp region data' | dd of="$M/thp" conv=notrunc status=none
"$BIN" stat "$M" --json > "$T/stat1.json"

# 2. umount(8), the plain way; the daemon stops by itself, keeping the regions.
umount "$M"
wait_gone
not_mounted
echo "OK umount"

# 3. The fstab line, by mount point only.
mount "$M"
is_msharefs
[ "$(head -c 19 "$M/huge")" = 'hugetlb region data' ]
[ "$(head -c 15 "$M/thp")" = 'thp region data' ]
[ "$(python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.mshare.backing").decode(), end="")' "$M/thp")" = thp ]
"$BIN" stat "$M" --json > "$T/stat2.json"
echo "OK fstab"

# 4. umount and mount -a (the fstab line is noauto, so -a skips it), then mount again.
umount "$M"
wait_gone
mount -a -t msharefs
not_mounted
mount "$M"
[ "$(head -c 19 "$M/huge")" = 'hugetlb region data' ]
echo "OK remount"

# 5. A bad option through mount(8): refused, nothing mounted, the value named.
umount "$M"
wait_gone
if mount -t msharefs msharefs "$M" -o "state_dir=$S,psi_threshold=nan" 2>"$T/err"; then
    echo "psi_threshold=nan accepted"; exit 1
fi
grep -q nan "$T/err"
not_mounted
echo "OK refused"

"$BIN" umount "$M" --purge >/dev/null
echo "OK purged"
"#;

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) in a private mount namespace"]
fn mount_t_msharefs_and_an_fstab_line_survive_umount_and_remount() {
    if !require_privileged("mount_t_msharefs_and_an_fstab_line_survive_umount_and_remount")
        || !require_tool("unshare", "mount_t_msharefs_and_an_fstab_line")
        || !require_tool("findmnt", "mount_t_msharefs_and_an_fstab_line")
        || !require_tool("python3", "mount_t_msharefs_and_an_fstab_line")
    {
        return;
    }
    let _pool = PoolGuard::new();
    let tmp = TempDir::new("fstab").expect("temp dir");
    let t = tmp.path();
    // noauto, nofail, _netdev and x-* are mount(8)'s and systemd's; msharefs accepts them.
    std::fs::write(
        t.join("fstab"),
        format!(
            "# test fstab\nmsharefs {m} msharefs backing=thp,state_dir={s},user_quota=90%,\
             noauto,nofail,_netdev,x-systemd.requires=local-fs.target,defaults 0 0\n",
            m = t.join("mnt").display(),
            s = t.join("state").display()
        ),
    )
    .unwrap();
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            NAMESPACE_SCRIPT,
            "sh",
        ])
        .arg(t)
        .arg(msharefs_bin())
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    loud(&format!("fstab namespace script:\n{stdout}{stderr}"));
    assert!(out.status.success(), "script failed: {}", out.status);
    for step in [
        "mount -t", "umount", "fstab", "remount", "refused", "purged",
    ] {
        assert!(
            stdout.contains(&format!("OK {step}\n")),
            "step {step} missing"
        );
    }
    // The same regions, sizes and backings before umount and after the fstab mount.
    let regions = |f: &str| -> Vec<(String, String, u64)> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(t.join(f)).unwrap()).unwrap();
        v["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["path"].as_str().unwrap().to_string(),
                    r["backing"].as_str().unwrap().to_string(),
                    r["size"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = regions("stat1.json");
    assert_eq!(
        before,
        vec![
            ("/huge".to_string(), "hugetlb".to_string(), 4 << 20),
            ("/thp".to_string(), "thp".to_string(), 4 << 20)
        ]
    );
    assert_eq!(
        regions("stat2.json"),
        before,
        "regions changed across umount and mount"
    );
    // Nothing of the namespace leaked into ours.
    assert_no_mounts_below(t);
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE)"]
fn umount8_stops_the_daemon_and_a_remount_waits_for_it() {
    if !require_privileged("umount8_stops_the_daemon_and_a_remount_waits_for_it") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("umount8", &["--backing", "shmem"]);
    sized_region(&fs.path("r"), 8192, &[7u8; 8192]);
    let pid = fs.daemon_pid();
    let out = Command::new("umount")
        .arg(fs.mountpoint())
        .output()
        .expect("run umount");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Mount again at once: the new daemon waits for the old one to save and exit.
    fs.start();
    assert!(!kernel_glue::process::alive(pid), "old daemon still alive");
    assert!(fs.log().contains("stopped (unmounted)"), "{}", fs.log());
    let st = fs.stat();
    assert_eq!(st["regions"][0]["path"], "/r");
    assert_eq!(st["regions"][0]["size"], 8192);
}

/// Stops the daemon of the mount point and purges its state when dropped (`msharefs umount
/// --purge`), also when the test fails; after a test that purged already it finds nothing.
struct PurgeOnDrop<'a>(&'a Path);

impl Drop for PurgeOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new(msharefs_bin())
            .args(["umount", "--purge"])
            .arg(self.0)
            .output();
    }
}

/// Removes a file when dropped (a link the test made, also when it fails).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The link `/run/msharefs/by-dev/MAJOR:MINOR` of `mnt`'s mount, and where it leads.
fn by_dev_link(mnt: &Path) -> (PathBuf, Option<PathBuf>) {
    let dev = std::fs::metadata(mnt).expect("stat mount").dev();
    let (major, minor) = kernel_glue::fd::major_minor(dev);
    let link = Path::new(mshare::uapi::BY_DEV_DIR).join(format!("{major}:{minor}"));
    let target = std::fs::read_link(&link).ok();
    (link, target)
}

/// Runs `mshare-probe attach PATH --touch` under `strace` and returns the probe's report
/// and the system calls strace saw (ioctl, sendmsg, connect).
fn traced_attach(path: &Path, trace: &Path) -> (serde_json::Value, String) {
    let out = Command::new("strace")
        .args(["-f", "-e", "trace=ioctl,sendmsg,connect", "-o"])
        .arg(trace)
        .arg(msharefs_tests::probe_bin!())
        .arg("attach")
        .arg(path)
        .arg("--touch")
        .output()
        .expect("run strace");
    let report = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(report.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("probe report ({e}): {report}"));
    (v, std::fs::read_to_string(trace).expect("strace output"))
}

/// A probe report of a hugetlb region of 1 GiB attached with its page table shared: every
/// page touched, with a handful of faults (the shared table's, and under strace a few of
/// the probe's own pages) where a table of its own would take 512.
fn assert_attached(v: &serde_json::Value, what: &str) {
    assert_eq!(v["touched"], 512, "{what}: {v}");
    assert!(
        v["touch_minor_faults"].as_u64().is_some_and(|f| f <= 8),
        "{what}: page table not shared: {v}"
    );
}

/// `MSHAREFS_GET_INFO` as strace prints it (it does not know msharefs's ioctls).
fn get_info_calls(trace: &str) -> usize {
    trace
        .lines()
        .filter(|l| l.contains("ioctl(") && l.contains("0x78, 0x10"))
        .count()
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn clients_find_the_daemon_by_device_number_and_fall_back_when_the_link_misleads() {
    if !require_privileged("clients_find_the_daemon_by_device_number")
        || !require_tool("strace", "clients_find_the_daemon_by_device_number")
    {
        return;
    }
    let pool = PoolGuard::new();
    let fs = Msharefs::mount("bydev", &["--backing", "hugetlb"]);
    let other = Msharefs::mount("bydev-other", &["--backing", "hugetlb"]);
    // A whole GiB: its page table is shared, so a touch takes one fault.
    let region = fs.create_region("r", 1 << 30);
    let thp = fs.path("thp");
    drop(std::fs::File::create(&thp).expect("create thp"));
    mshare::set_backing(&thp, mshare::Backing::Thp).expect("thp backing");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&thp)
        .and_then(|f| f.set_len(4 << 20))
        .expect("size thp");
    let scratch = TempDir::new("bydev-trace").expect("scratch directory");
    let trace = scratch.path().join("trace");
    let socket = fs.state_dir().join("attach.sock");

    // The daemon links its socket under its mount's device number.
    let (link, target) = by_dev_link(&fs.mountpoint());
    assert_eq!(
        target.as_deref(),
        Some(socket.as_path()),
        "{}",
        link.display()
    );

    // An open and attach of a hugetlb region asks the daemon nothing but the one request
    // to that link: no GET_INFO, no connection.
    let (v, seen) = traced_attach(&region, &trace);
    assert_attached(&v, "through the link");
    assert_eq!(get_info_calls(&seen), 0, "GET_INFO asked:\n{seen}");
    let requests: Vec<&str> = seen.lines().filter(|l| l.contains("sendmsg(")).collect();
    assert_eq!(requests.len(), 1, "requests:\n{seen}");
    assert!(
        requests[0].contains(&link.display().to_string()),
        "{}",
        requests[0]
    );
    assert!(!seen.contains("connect("), "a connection was made:\n{seen}");

    // A thp region is mapped through FUSE passthrough: the request says ENODEV, and the
    // client asks GET_INFO and maps the file.
    let (v, _) = traced_attach(&thp, &trace);
    assert_eq!(v["touched"], 2, "thp region: {v}");

    // Links that mislead: to the other mount's daemon (which refuses a descriptor of this
    // mount), to a socket nobody is bound to any more, or none at all. Each attach still
    // works, through GET_INFO.
    let dead = scratch.path().join("dead.sock");
    drop(UnixDatagram::bind(&dead).expect("bind"));
    let misleading = [
        (
            "the other mount's socket",
            Some(other.state_dir().join("attach.sock")),
        ),
        ("a dead socket", Some(dead.clone())),
        ("no link", None),
    ];
    for (what, to) in misleading {
        std::fs::remove_file(&link).expect("remove link");
        if let Some(to) = &to {
            std::os::unix::fs::symlink(to, &link).expect("link");
        }
        let (v, seen) = traced_attach(&region, &trace);
        assert_attached(&v, what);
        assert!(
            get_info_calls(&seen) >= 1,
            "{what}: GET_INFO not asked:\n{seen}"
        );
    }
    assert!(std::fs::read_link(&link).is_err(), "link left");

    // A link left by a dead daemon whose device number went to a hugetlbfs mount: a file
    // there is still used directly, as without the link.
    let _page = pool.grow(1).expect("one huge page");
    let direct_dir = HugetlbfsDir::new("bydev-direct").expect("hugetlbfs");
    let direct = direct_dir.file("direct");
    let fd = kernel_glue::fd::open(&direct, libc::O_RDWR | libc::O_CREAT, 0o600).expect("create");
    kernel_glue::fd::fallocate(&fd, 0, 2 << 20).expect("fallocate");
    drop(fd);
    let (direct_link, _) = by_dev_link(direct_dir.path());
    let _undo = RemoveOnDrop(direct_link.clone());
    std::os::unix::fs::symlink(&dead, &direct_link).expect("link");
    let (v, _) = traced_attach(&direct, &trace);
    assert_eq!(v["touched"], 1, "hugetlbfs file behind a stale link: {v}");

    // A daemon killed with -9 leaves its link; the next daemon of the same state
    // directory removes it (its mount has a new device number) and links its own, and
    // umount removes that.
    std::os::unix::fs::symlink(&socket, &link).expect("restore link");
    fs.kill9();
    assert!(std::fs::read_link(&link).is_ok(), "killed daemon's link");
    fs.start();
    let (new_link, target) = by_dev_link(&fs.mountpoint());
    assert_eq!(target.as_deref(), Some(socket.as_path()));
    if new_link != link {
        assert!(std::fs::read_link(&link).is_err(), "stale link kept");
    }
    let (v, seen) = traced_attach(&region, &trace);
    assert_attached(&v, "after the restart");
    assert_eq!(get_info_calls(&seen), 0, "after the restart:\n{seen}");
    assert!(fs.umount(true), "umount");
    assert!(
        std::fs::read_link(&new_link).is_err(),
        "link left after umount"
    );
    loud(&format!(
        "by-dev: {} -> {}; attach without GET_INFO; three misleading links fell back",
        link.display(),
        socket.display()
    ));
}
