//! The installed tree, as a distribution package would ship it: `make install` into a
//! temporary prefix, then the tools packagers and users run on it are the oracle:
//! `readelf` (SONAME, symbol versions), `nm` (what the preload library exports),
//! `pkg-config` (building the C example with nothing else), `systemd-analyze verify` (the
//! unit, with the installed man page its Documentation= names), `groff` (man pages).

#[path = "support_lib.rs"]
mod support_lib;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use msharefs_tests::mountguard::{Msharefs, artifacts, repo};
use msharefs_tests::{PoolGuard, TempDir, loud, require_privileged};
use support_lib::require_tool;

/// Runs a command; panics with its output when it fails. Returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `make install prefix=PREFIX`, built in this test binary's target directory and profile.
fn install(prefix: &Path) {
    // Both tests install at once otherwise, and two makes linking the same output file
    // can hand `install` a half-written library.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let built = artifacts();
    let target = built.parent().expect("target dir");
    let profile = built.file_name().expect("profile").to_str().expect("utf-8");
    run(Command::new("make")
        .current_dir(repo())
        .arg("--no-print-directory")
        .arg("install")
        .arg(format!("prefix={}", prefix.display()))
        .arg(format!("CARGO_TARGET_DIR={}", target.display()))
        .arg(format!("PROFILE={profile}"))
        .env("CARGO", env!("CARGO")));
}

/// The names of an exports.map's `global:` section.
fn map_globals(map: &str) -> BTreeSet<String> {
    let body = map
        .split_once("global:")
        .and_then(|(_, rest)| rest.split_once("local:"))
        .map(|(g, _)| g)
        .expect("a global: and a local: section");
    body.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Defined dynamic symbols of a shared object (`nm -D --defined-only`), without the
/// version definition symbols (`A`).
fn exports(lib: &Path) -> BTreeSet<String> {
    run(Command::new("nm").args(["-D", "--defined-only"]).arg(lib))
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_, kind, name) = (w.next()?, w.next()?, w.next()?);
            (kind != "A").then(|| name.split('@').next().unwrap_or(name).to_string())
        })
        .collect()
}

/// The `mshare_*` functions the header declares (every `mshare_NAME(`).
fn header_functions(header: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = BTreeSet::new();
    for (i, _) in header.match_indices("mshare_") {
        if header[..i].chars().next_back().is_some_and(ident) {
            continue;
        }
        let name: String = header[i..].chars().take_while(|&c| ident(c)).collect();
        if header[i + name.len()..].starts_with('(') {
            out.insert(name);
        }
    }
    out
}

fn tools(what: &str) -> bool {
    [
        "make",
        "cc",
        "nm",
        "readelf",
        "pkg-config",
        "systemd-analyze",
        "groff",
    ]
    .iter()
    .all(|t| require_tool(t, what))
}

#[test]
fn installed_tree_has_soname_versions_exports_pkgconfig_unit_and_man_pages() {
    if !tools("installed_tree_has_soname_versions_exports_pkgconfig_unit_and_man_pages") {
        return;
    }
    let tmp = TempDir::new("install").expect("temp dir");
    let prefix = tmp.path().join("prefix");
    install(&prefix);
    let lib = prefix.join("lib");
    let version = env!("CARGO_PKG_VERSION");
    let real = lib.join(format!("libmshare.so.{version}"));

    // The files and links a package ships.
    for p in [
        "bin/msharefs",
        "sbin/mount.msharefs",
        "lib/libmshare.so",
        "lib/libmshare.so.0",
        "lib/libmshare.a",
        "lib/libmshare_preload.so",
        "include/mshare.h",
        "lib/pkgconfig/mshare.pc",
        "lib/systemd/system/msharefs@.service",
        "share/man/man8/msharefs.8",
        "share/man/man8/mount.msharefs.8",
        "share/man/man3/libmshare.3",
    ] {
        assert!(prefix.join(p).exists(), "{p} not installed");
    }
    assert!(real.is_file());
    assert_eq!(
        std::fs::read_link(lib.join("libmshare.so.0")).unwrap(),
        PathBuf::from(format!("libmshare.so.{version}"))
    );
    assert_eq!(
        std::fs::read_link(prefix.join("sbin/mount.msharefs")).unwrap(),
        prefix.join("bin/msharefs")
    );

    // SONAME and symbol versions.
    let dynamic = run(Command::new("readelf").arg("-d").arg(&real));
    assert!(
        dynamic.contains("Library soname: [libmshare.so.0]"),
        "no SONAME:\n{dynamic}"
    );
    let syms = run(Command::new("readelf")
        .args(["--dyn-syms", "-W"])
        .arg(&real));
    let header = std::fs::read_to_string(prefix.join("include/mshare.h")).unwrap();
    let declared = header_functions(&header);
    assert!(declared.len() >= 13, "header functions: {declared:?}");
    let versioned: BTreeSet<String> = syms
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|s| s.strip_suffix("@@MSHARE_0"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        versioned, declared,
        "versioned exports differ from mshare.h"
    );
    let all = exports(&real);
    assert_eq!(
        all, declared,
        "libmshare.so exports more than mshare.h declares"
    );

    // The preload library, installed and cargo-built, exports exactly its list.
    let listed = map_globals(
        &std::fs::read_to_string(repo().join("libmshare/preload/exports.map")).unwrap(),
    );
    assert!(
        listed.contains("mmap") && listed.contains("munmap"),
        "{listed:?}"
    );
    for p in [
        lib.join("libmshare_preload.so"),
        artifacts().join("libmshare_preload.so"),
    ] {
        let got = exports(&p);
        assert_eq!(
            got,
            listed,
            "{}: exports differ from exports.map",
            p.display()
        );
        assert!(got.iter().all(|s| !s.starts_with("mshare_")));
    }
    // Interposed functions must stay unversioned to replace the C library's.
    let preload_syms = run(Command::new("readelf")
        .args(["--dyn-syms", "-W"])
        .arg(lib.join("libmshare_preload.so")));
    assert!(!preload_syms.contains("mmap@@"), "{preload_syms}");

    // The header's version macros and pkg-config agree with the crate.
    let mut parts = version.split('.');
    for name in ["MAJOR", "MINOR", "PATCH"] {
        let want = format!("#define MSHARE_VERSION_{name} {}u", parts.next().unwrap());
        assert!(header.contains(&want), "header lacks {want}");
    }
    let pc = lib.join("pkgconfig");
    let pkg = |args: &[&str]| {
        run(Command::new("pkg-config")
            .args(args)
            .env("PKG_CONFIG_PATH", &pc))
    };
    assert_eq!(pkg(&["--modversion", "mshare"]).trim(), version);
    assert_eq!(
        pkg(&["--cflags", "--libs", "mshare"]).trim(),
        format!(
            "-I{} -L{} -lmshare",
            prefix.join("include").display(),
            lib.display()
        )
    );

    // The unit verifies, man page included (systemd-analyze runs `man` for
    // Documentation=man:msharefs(8)).
    let units = tmp.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let unit = units.join("msharefs@mnt-mshare.service");
    std::fs::copy(prefix.join("lib/systemd/system/msharefs@.service"), &unit).unwrap();
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains(&format!(
        "ExecStart={}/msharefs mount %f --foreground",
        prefix.join("bin").display()
    )));
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", prefix.join("share/man"))
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    // Man pages format without a warning.
    for page in ["man8/msharefs.8", "man3/libmshare.3"] {
        let out = Command::new("groff")
            .args(["-man", "-ww", "-z"])
            .arg(prefix.join("share/man").join(page))
            .output()
            .expect("run groff");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.is_empty(),
            "{page}: {warnings}"
        );
    }

    // make uninstall leaves no file behind.
    run(Command::new("make")
        .current_dir(repo())
        .args(["--no-print-directory", "uninstall"])
        .arg(format!("prefix={}", prefix.display())));
    let mut files = Vec::new();
    let mut stack = vec![prefix.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(files.is_empty(), "left by make uninstall: {files:?}");
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn c_example_builds_with_pkg_config_alone_and_runs_against_the_installed_library() {
    if !require_privileged("c_example_builds_with_pkg_config_alone")
        || !tools("c_example_builds_with_pkg_config_alone")
    {
        return;
    }
    let _pool = PoolGuard::new();
    let tmp = TempDir::new("pkgconfig").expect("temp dir");
    let prefix = tmp.path().join("prefix");
    install(&prefix);
    let pc = prefix.join("lib/pkgconfig");
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "mshare"])
        .env("PKG_CONFIG_PATH", &pc));
    let exe = tmp.path().join("db_workers");
    // Only the example and pkg-config's flags: no path into the source tree.
    run(Command::new("cc")
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .arg(repo().join("examples/c/db_workers.c"))
        .args(flags.split_whitespace())
        .arg("-o")
        .arg(&exe));
    let needed = run(Command::new("readelf").arg("-d").arg(&exe));
    assert!(
        needed.contains("Shared library: [libmshare.so.0]"),
        "{needed}"
    );

    let fs = Msharefs::mount("pkgconfig", &["--backing", "hugetlb"]);
    for backing in ["hugetlb", "thp"] {
        let out = Command::new(&exe)
            .args(["-w", "4", "-b", backing])
            .arg(fs.path(&format!("pc-{backing}")))
            .arg("64M")
            .env("LD_LIBRARY_PATH", prefix.join("lib"))
            .output()
            .expect("run db_workers");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        loud(&format!(
            "installed db_workers ({backing}): {}",
            text.trim()
        ));
        assert!(
            out.status.success(),
            "db_workers ({backing}) failed: {text}"
        );
    }
    // The program loaded the installed library, not the build tree's.
    let maps = run(Command::new("sh").arg("-c").arg(format!(
        "LD_LIBRARY_PATH={} LD_TRACE_LOADED_OBJECTS=1 {}",
        prefix.join("lib").display(),
        exe.display()
    )));
    assert!(
        maps.contains(&format!("{}/libmshare.so.0", prefix.join("lib").display())),
        "{maps}"
    );
}
