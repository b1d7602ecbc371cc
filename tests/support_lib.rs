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
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{in_ci, loud};

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
        let libs = Libs {
            dir: msharefs_tests::mountguard::artifacts().to_path_buf(),
        };
        for p in [libs.shared(), libs.static_lib(), libs.preload()] {
            assert!(p.exists(), "{} was not built", p.display());
        }
        libs
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

/// An msharefs mount for these tests: the harness's [`Msharefs`] (unmounted and purged
/// on drop) with the default backing chosen.
#[derive(Debug)]
pub struct MsharefsMount(Msharefs);

impl MsharefsMount {
    /// Mounts msharefs with default backing `backing` (`hugetlb`, `thp`, `shmem`).
    ///
    /// # Panics
    /// When the daemon cannot be built or does not mount.
    pub fn new(tag: &str, backing: &str) -> MsharefsMount {
        let m = Msharefs::mount(tag, &["--backing", backing]);
        let fs = kernel_glue::fd::statfs(&m.mountpoint()).expect("statfs of the mount");
        assert_eq!(
            fs.fs_type,
            kernel_glue::FUSE_SUPER_MAGIC,
            "not a FUSE mount"
        );
        MsharefsMount(m)
    }

    /// The mount point.
    pub fn path(&self) -> PathBuf {
        self.0.mountpoint()
    }

    /// A path inside the mount.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.path(name)
    }
}
