//! Support for the libmshare C ABI and shim tests (`libmshare_c.rs`, `shim.rs`): the
//! built artifacts (`libmshare.so`, `libmshare.a`, `libmshare_preload.so`, the `msharefs`
//! binary), compiling C programs, external tools, and an msharefs mount made with the
//! daemon's CLI that is unmounted on drop.
//!
//! Included by each test file with `#[path = "support_lib.rs"] mod support_lib;`; the
//! shared harness (`msharefs_tests`) provides privileges, the pool guard and scratch mounts.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use msharefs_tests::helper::Helper;
use msharefs_tests::{TempDir, in_ci, loud};

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

/// Paths of the built libraries.
#[derive(Debug, Clone)]
pub struct Libs {
    /// Directory with `libmshare.so`, `libmshare.a` and `libmshare_preload.so`.
    pub dir: PathBuf,
}

impl Libs {
    /// `libmshare.so`.
    pub fn shared(&self) -> PathBuf {
        self.dir.join("libmshare.so")
    }
    /// `libmshare.a`.
    pub fn static_lib(&self) -> PathBuf {
        self.dir.join("libmshare.a")
    }
    /// `libmshare_preload.so`.
    pub fn preload(&self) -> PathBuf {
        self.dir.join("libmshare_preload.so")
    }
}

/// Builds (once per test binary) and returns libmshare's C libraries and the shim.
pub fn libs() -> &'static Libs {
    static LIBS: OnceLock<Libs> = OnceLock::new();
    LIBS.get_or_init(|| {
        build_workspace();
        let (target, profile) = build_dirs();
        let libs = Libs {
            dir: target.join(profile),
        };
        for p in [libs.shared(), libs.static_lib(), libs.preload()] {
            assert!(p.exists(), "{} was not built", p.display());
        }
        libs
    })
}

/// Builds (once per test binary) and returns the `msharefs` daemon binary.
pub fn msharefs_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        build_workspace();
        let (target, profile) = build_dirs();
        let bin = target.join(profile).join("msharefs");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// Whether `tool` runs (`tool --version` exits 0). When it does not: in CI, panic;
/// otherwise print a loud `SKIPPED:` line for `what` and return false.
pub fn require_tool(tool: &str, what: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    let msg = format!("{what} needs `{tool}` on PATH");
    if in_ci() {
        panic!("CI is set, so this test may not skip: {msg}");
    }
    loud(&format!("SKIPPED: {msg}"));
    false
}

/// Runs `program args..` to completion, capturing its output; panics when it cannot be
/// started. Returns (exit success, stdout, stderr).
pub fn run(program: impl AsRef<OsStr>, args: &[&OsStr]) -> (bool, String, String) {
    let program = program.as_ref();
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Compiles C (or, with `-x c++`, C++) `args` with `compiler`; panics with the
/// diagnostics on failure.
pub fn compile(compiler: &str, args: &[&OsStr]) {
    let (ok, out, err) = run(compiler, args);
    assert!(ok, "{compiler} {args:?} failed:\n{out}{err}");
}

/// Runs a program under the harness's [`Helper`] (killed on timeout or drop) with its
/// standard output collected; returns (exit success, stdout lines).
pub fn run_helper(
    name: &str,
    program: &Path,
    args: &[&OsStr],
    limit: Duration,
) -> (bool, Vec<String>) {
    let mut h =
        Helper::spawn(name, program, args).unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    h.close_stdin();
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match h.read_line(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let status = h
        .wait(left.max(Duration::from_secs(1)))
        .unwrap_or_else(|e| panic!("{name}: {e}\noutput so far: {lines:#?}"));
    (status.success(), lines)
}

/// A running msharefs mount made with `msharefs mount`, with its own mount point and
/// state directory; `msharefs umount --purge` on drop (falling back to a lazy unmount and
/// a loud report, so a failing test never leaves a mount behind).
#[derive(Debug)]
pub struct MsharefsMount {
    bin: PathBuf,
    mnt: TempDir,
    state: TempDir,
    mounted: bool,
}

impl MsharefsMount {
    /// Mounts msharefs with default backing `backing` (`hugetlb`, `thp`, `shmem`).
    ///
    /// # Panics
    /// When the daemon cannot be built or does not mount.
    pub fn new(tag: &str, backing: &str) -> MsharefsMount {
        let bin = msharefs_bin().to_path_buf();
        let mnt = TempDir::new(&format!("{tag}-mnt")).expect("mount point");
        let state = TempDir::new(&format!("{tag}-state")).expect("state dir");
        let mut m = MsharefsMount {
            bin,
            mnt,
            state,
            mounted: false,
        };
        // `umount --purge` removes the state directory itself: keep it inside ours.
        let state_dir = m.state.path().join("state");
        let args: Vec<&OsStr> = vec![
            "mount".as_ref(),
            m.mnt.path().as_os_str(),
            "--backing".as_ref(),
            backing.as_ref(),
            "--state-dir".as_ref(),
            state_dir.as_os_str(),
        ];
        let (ok, out, err) = run(&m.bin, &args);
        // Unmount even when `mount` failed half-way.
        m.mounted = true;
        assert!(ok, "msharefs mount failed:\n{out}{err}");
        let fs = kernel_glue::fd::statfs(m.mnt.path()).expect("statfs of the mount");
        assert_eq!(
            fs.fs_type,
            kernel_glue::FUSE_SUPER_MAGIC,
            "msharefs mount returned but {} is not a FUSE mount",
            m.mnt.path().display()
        );
        m
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.mnt.path()
    }

    /// A path inside the mount.
    pub fn file(&self, name: &str) -> PathBuf {
        self.mnt.path().join(name)
    }
}

impl Drop for MsharefsMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let args: Vec<&OsStr> = vec![
            "umount".as_ref(),
            self.mnt.path().as_os_str(),
            "--purge".as_ref(),
        ];
        let (ok, out, err) = run(&self.bin, &args);
        if !ok {
            loud(&format!("msharefs umount --purge failed:\n{out}{err}"));
        }
        if let Ok(Some(_)) = kernel_glue::mount::mount_at(self.mnt.path()) {
            loud(&format!(
                "LEAK: msharefs still mounted on {}; unmounting lazily",
                self.mnt.path().display()
            ));
            if let Err(e) = kernel_glue::mount::umount2(self.mnt.path(), true) {
                loud(&format!("umount2 failed: {e}"));
            }
        }
    }
}
