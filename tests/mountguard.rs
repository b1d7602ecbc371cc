//! A real msharefs mount for a test: started with the project's own `msharefs mount`,
//! stopped with `msharefs umount --purge` on drop (also while a failing test unwinds), and
//! checked: nothing of it may stay mounted.
//!
//! The `msharefs` binary is the workspace's own, built on first use into the test binary's
//! target directory and profile ([`msharefs_bin`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::scratch::TempDir;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where cargo put this test binary: `<target>/<profile-dir>/deps/<test>`.
fn build_dirs() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let target = profile_dir.parent().expect("profile dir has a parent");
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .expect("profile dir name")
        .to_string();
    (target.to_path_buf(), profile)
}

/// Runs `cargo build --workspace` once per test binary, in this test binary's target
/// directory and profile, so the C libraries, the shim and the daemon are those of the
/// code under test. Building the whole workspace gives the same feature set as
/// `cargo test --workspace`, so after a test build this only links what is missing (the
/// `cdylib`/`staticlib` outputs, the daemon binary). Panics with cargo's output on failure.
fn build_workspace() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let (target, profile) = build_dirs();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(repo())
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--quiet", "--workspace"]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
        assert!(
            out.status.success(),
            "cargo build --workspace failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The directory with the workspace's built artifacts (`msharefs`, `libmshare.so`,
/// `libmshare.a`, `libmshare_preload.so`), built once per test binary.
pub fn artifacts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_workspace();
        let (target, profile) = build_dirs();
        target.join(profile)
    })
}

/// The `msharefs` daemon binary of the code under test.
///
/// # Panics
/// When it cannot be built.
pub fn msharefs_bin() -> PathBuf {
    let bin = artifacts().join("msharefs");
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

/// A mounted msharefs with its own mount point and state directory.
#[derive(Debug)]
pub struct Msharefs {
    root: TempDir,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Msharefs {
    /// Mounts msharefs with extra `mount` arguments (e.g. `["--backing", "thp"]`).
    ///
    /// # Panics
    /// When the mount fails (the daemon's log is printed).
    pub fn mount(tag: &str, args: &[&str]) -> Msharefs {
        Msharefs::mount_with_env(tag, args, &[])
    }

    /// Mounts msharefs with extra `mount` arguments and environment variables for the
    /// daemon (e.g. `RUST_LOG=debug`).
    ///
    /// # Panics
    /// When the mount fails (the daemon's log is printed).
    pub fn mount_with_env(tag: &str, args: &[&str], env: &[(&str, &str)]) -> Msharefs {
        let root = TempDir::new(tag).expect("temp dir");
        // Other users must reach the mount point for permission tests.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        std::fs::create_dir(root.path().join("mnt")).expect("mkdir mnt");
        let m = Msharefs {
            root,
            bin: msharefs_bin(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        m.start();
        m
    }

    /// Runs `msharefs mount` again with the same arguments and state directory.
    ///
    /// # Panics
    /// When the mount fails.
    pub fn start(&self) {
        let out = Command::new(&self.bin)
            .arg("mount")
            .arg(self.mountpoint())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run msharefs mount");
        assert!(
            out.status.success(),
            "msharefs mount failed: {}\n{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The mount point.
    pub fn mountpoint(&self) -> PathBuf {
        self.root.path().join("mnt")
    }

    /// A path inside the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint().join(name)
    }

    /// Creates region `name` (mode 0666 less the umask, the mount's default backing) and
    /// sizes it to `size`; returns its path.
    ///
    /// # Panics
    /// When the region exists or cannot be created or sized.
    pub fn create_region(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("create region {}: {e}", p.display()));
        f.set_len(size)
            .unwrap_or_else(|e| panic!("size region {}: {e}", p.display()));
        p
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("daemon.log")).unwrap_or_default()
    }

    /// The daemon's pid.
    ///
    /// # Panics
    /// When no daemon runs.
    pub fn daemon_pid(&self) -> u32 {
        std::fs::read_to_string(self.state_dir().join("daemon.pid"))
            .expect("daemon.pid")
            .trim()
            .parse()
            .expect("pid")
    }

    /// Kills the daemon with SIGKILL and waits until it is gone.
    pub fn kill9(&self) {
        let pid = self.daemon_pid();
        kernel_glue::process::kill(pid, kernel_glue::consts::SIGKILL).expect("kill -9");
        assert!(
            kernel_glue::process::wait_exited(pid, std::time::Duration::from_secs(2)),
            "daemon {pid} survived SIGKILL"
        );
    }

    /// Runs the `msharefs` CLI with `args`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .output()
            .expect("run msharefs")
    }

    /// `msharefs stat --json`, parsed.
    ///
    /// # Panics
    /// When the command fails.
    pub fn stat(&self) -> serde_json::Value {
        let mnt = self.mountpoint();
        let out = self.cli(&["stat", mnt.to_str().expect("utf-8"), "--json"]);
        assert!(
            out.status.success(),
            "msharefs stat: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stat JSON")
    }

    /// `msharefs umount [--purge]`; returns whether it succeeded.
    pub fn umount(&self, purge: bool) -> bool {
        let mnt = self.mountpoint();
        let mut args = vec!["umount", mnt.to_str().expect("utf-8")];
        if purge {
            args.push("--purge");
        }
        let out = self.cli(&args);
        if !out.status.success() {
            crate::loud(&format!(
                "msharefs umount failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        out.status.success()
    }

    /// Whether anything is still mounted on the mount point or in the state directory.
    pub fn leftover_mounts(&self) -> Vec<String> {
        let root = self.root.path();
        kernel_glue::mount::mounts()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.target.starts_with(root))
            .map(|m| format!("{} on {}", m.fstype, m.target.display()))
            .collect()
    }
}

impl Drop for Msharefs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            crate::loud(&format!("daemon log of the failed test:\n{}", self.log()));
        }
        let ok = self.umount(true);
        let left = self.leftover_mounts();
        if !left.is_empty() {
            crate::loud(&format!(
                "LEAK after msharefs umount --purge: {left:?}; detaching"
            ));
            for m in kernel_glue::mount::mounts()
                .unwrap_or_default()
                .into_iter()
                .rev()
            {
                if m.target.starts_with(self.root.path()) {
                    let _ = kernel_glue::mount::umount2(&m.target, true);
                }
            }
        }
        if !std::thread::panicking() {
            assert!(ok, "msharefs umount --purge failed");
            assert!(left.is_empty(), "mounts left behind: {left:?}");
        }
    }
}
