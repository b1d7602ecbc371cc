//! The posted mshare kernel selftests' sequences (`tools/testing/selftests/mshare`,
//! v3, Aug 2025) on every backing, through a real mount: a region sized to
//! `mshare_info`, 4 KiB and 8 KiB anonymous objects and 2 MiB and 4 MiB `MAP_HUGETLB`
//! ones created with `MSHAREFS_CREATE_MAPPING`, `fork`, parent and child each `open` and
//! `mmap` the whole region and see each other's writes, `MSHAREFS_UNMAP` of the object.
//! The sequence is a C program (`tests/c/mshare_basic.c`) written as the selftest is;
//! hugetlb regions are mapped through the `LD_PRELOAD` shim (FUSE cannot pass hugetlbfs
//! through, so a plain `mmap` of their file is `ENODEV`).
//!
//! Plus the object rules those sizes rely on: an object smaller than, or not a multiple
//! of, the region's page size occupies whole pages (as the kernel rounds a hugetlb
//! mapping), overlap is `EEXIST`, an unaligned start `EINVAL`, and `MSHAREFS_UNMAP` with
//! the object's own size removes it.

#[path = "support_lib.rs"]
mod support_lib;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kernel_glue::consts::*;
use kernel_glue::errnos::*;
use kernel_glue::fd as kfd;
use mshare::uapi::{self, MshareCreate, MshareUnmap};
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{PoolGuard, TempDir, loud, require_privileged};
use support_lib::{compile, libs, require_tool, run_helper};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const LIMIT: Duration = Duration::from_secs(180);

/// The selftest's variants: `FIXTURE_VARIANT_ADD(basic, ANON_4k | ANON_8k | HUGETLB_2m |
/// HUGETLB_4m)`.
const VARIANTS: [(u64, &str); 4] = [
    (4 * KIB, "anon"),
    (8 * KIB, "anon"),
    (2 * MIB, "hugetlb"),
    (4 * MIB, "hugetlb"),
];

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// Compiles `tests/c/mshare_basic.c` into `dir`.
fn build_basic(dir: &Path) -> PathBuf {
    let src = msharefs_tests::mountguard::repo().join("tests/c/mshare_basic.c");
    let bin = dir.join("mshare_basic");
    compile(
        "gcc",
        &[
            os("-std=c11"),
            os("-Wall"),
            os("-Wextra"),
            os("-Werror"),
            src.as_os_str(),
            os("-o"),
            bin.as_os_str(),
        ],
    );
    bin
}

/// Runs the selftest sequence for one variant and returns its facts (`name value`).
fn run_basic(
    bin: &Path,
    mount: &Path,
    size: u64,
    flags: &str,
    shim: bool,
) -> HashMap<String, String> {
    let preload = format!("LD_PRELOAD={}", libs().preload().display());
    let size_s = size.to_string();
    let mut args: Vec<&OsStr> = Vec::new();
    if shim {
        args.push(os(&preload));
    }
    args.extend([bin.as_os_str(), mount.as_os_str(), os(&size_s), os(flags)]);
    let name = format!("mshare_basic {size} {flags}");
    let (ok, lines) = run_helper(&name, Path::new("/usr/bin/env"), &args, LIMIT);
    assert!(ok, "{name} failed: {lines:#?}");
    lines
        .iter()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn selftest_sequences(backing: &str) {
    let what = format!("selftest_sequences_{backing}");
    if !require_privileged(&what) || !require_tool("gcc", &what) {
        return;
    }
    let _pool = PoolGuard::new();
    let dir = TempDir::new(&what).unwrap();
    let bin = build_basic(dir.path());
    let fs = Msharefs::mount(&what, &["--backing", backing]);
    // FUSE cannot carry hugetlbfs: hugetlb regions are mapped through the shim.
    let shim = backing == "hugetlb";
    for (size, flags) in VARIANTS {
        let f = run_basic(&bin, &fs.mountpoint(), size, flags, shim);
        let label = format!("{backing} {size} {flags}: {f:?}");
        assert_eq!(f["align_size"], GIB.to_string(), "{label}");
        assert_eq!(f["create_mapping"], "0", "{label}");
        assert_eq!(f["parent_sees_child"], "1", "{label}");
        assert_eq!(f["child_sees_parent"], "1", "{label}");
        assert_eq!(f["unmap"], "0", "{label}");
        assert_eq!(f["after_unmap_first_byte"], "0", "{label}: UNMAP discards");
        assert_eq!(f["done"], "1", "{label}");
        let addr = u64::from_str_radix(f["addr"].trim_start_matches("0x"), 16).unwrap();
        let page_kb: u64 = f["kernel_page_kb"].parse().unwrap();
        if backing == "hugetlb" {
            assert_eq!(page_kb, 2048, "{label}: hugetlb pages");
            assert_eq!(addr % GIB, 0, "{label}: the shim maps at a 1 GiB boundary");
        } else {
            assert_eq!(
                page_kb, 4,
                "{label}: tmpfs mappings report 4 kB kernel pages"
            );
        }
        loud(&format!(
            "{backing}: {size} B {flags} object: ok at {addr:#x}"
        ));
    }
    // Every region was unlinked by the sequence's teardown.
    let st = fs.stat();
    assert_eq!(st["regions"].as_array().unwrap().len(), 0, "{st}");
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn selftest_sequences_hugetlb() {
    selftest_sequences("hugetlb");
}

#[test]
#[ignore = "needs root: mounts msharefs"]
fn selftest_sequences_thp() {
    selftest_sequences("thp");
}

#[test]
#[ignore = "needs root: mounts msharefs"]
fn selftest_sequences_shmem() {
    selftest_sequences("shmem");
}

fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("errno"),
    }
}

fn create_object(fd: &OwnedFd, offset: u64, size: u64) -> io::Result<i32> {
    let mut req = MshareCreate {
        region_offset: offset,
        size,
        offset: 0,
        prot: (PROT_READ | PROT_WRITE) as u32,
        flags: (MAP_SHARED | MAP_FIXED | MAP_ANONYMOUS) as u32,
        fd: u32::MAX,
        _pad: 0,
    };
    kfd::ioctl_ptr(fd, uapi::MSHAREFS_CREATE_MAPPING, &mut req)
}

fn unmap(fd: &OwnedFd, offset: u64, size: u64) -> io::Result<i32> {
    let mut req = MshareUnmap {
        region_offset: offset,
        size,
    };
    kfd::ioctl_ptr(fd, uapi::MSHAREFS_UNMAP, &mut req)
}

fn objects(fs: &Msharefs) -> u64 {
    fs.stat()["regions"][0]["objects"].as_u64().unwrap()
}

/// Objects of a hugetlb region occupy whole 2 MiB pages: small ones are rounded up,
/// an unaligned start is `EINVAL`, overlap of the rounded ranges `EEXIST`, and an
/// `MSHAREFS_UNMAP` with the size the object was created with removes all of it.
#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn small_objects_occupy_whole_pages() {
    if !require_privileged("small_objects_occupy_whole_pages") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("small-objects", &["--backing", "hugetlb"]);
    let fd = kfd::open(&fs.path("r"), O_RDWR | O_CREAT | O_EXCL, 0o600).unwrap();
    kfd::ftruncate(&fd, 8 * MIB).unwrap();

    create_object(&fd, 0, 4 * KIB).unwrap();
    assert_eq!(errno(create_object(&fd, 0, 4 * KIB)), EEXIST, "same object");
    assert_eq!(
        errno(create_object(&fd, 4 * KIB, 4 * KIB)),
        EINVAL,
        "starts inside a 2 MiB page"
    );
    // 2 MiB + 4 KiB rounds to 4 MiB: [2 MiB, 6 MiB).
    create_object(&fd, 2 * MIB, 2 * MIB + 4 * KIB).unwrap();
    assert_eq!(
        errno(create_object(&fd, 4 * MIB, 4 * KIB)),
        EEXIST,
        "inside the rounded-up tail"
    );
    create_object(&fd, 6 * MIB, 8 * KIB).unwrap();
    assert_eq!(
        errno(create_object(&fd, 6 * MIB, 2 * MIB + 4 * KIB)),
        EINVAL,
        "past the end once rounded"
    );
    assert_eq!(objects(&fs), 3);
    // Unmapping with the object's own (small) size removes the whole page.
    unmap(&fd, 0, 4 * KIB).unwrap();
    assert_eq!(objects(&fs), 2);
    create_object(&fd, 0, 2 * MIB).unwrap();
    assert_eq!(
        errno(unmap(&fd, 4 * KIB, 4 * KIB)),
        EINVAL,
        "unaligned unmap"
    );
    // Unmapping a rounded part of an object trims it.
    unmap(&fd, 4 * MIB, 1).unwrap();
    assert_eq!(objects(&fs), 3, "[0,2M) [2M,4M) [6M,8M)");
    create_object(&fd, 4 * MIB, MIB).unwrap();
    assert_eq!(objects(&fs), 4);
    drop(fd);
    std::fs::remove_file(fs.path("r")).unwrap();
}

/// On 4 KiB-page backings the same calls follow the 4 KiB page, as the kernel's
/// anonymous objects do.
#[test]
#[ignore = "needs root: mounts msharefs"]
fn small_objects_on_shmem_follow_4k_pages() {
    if !require_privileged("small_objects_on_shmem_follow_4k_pages") {
        return;
    }
    let fs = Msharefs::mount("small-objects-shmem", &["--backing", "shmem"]);
    let fd = kfd::open(&fs.path("r"), O_RDWR | O_CREAT | O_EXCL, 0o600).unwrap();
    kfd::ftruncate(&fd, 2 * MIB).unwrap();
    create_object(&fd, 4 * KIB, 4 * KIB).unwrap();
    create_object(&fd, 0, 100).unwrap();
    assert_eq!(errno(create_object(&fd, 2 * KIB, 4 * KIB)), EINVAL);
    assert_eq!(errno(create_object(&fd, 4 * KIB, 8)), EEXIST);
    create_object(&fd, 8 * KIB, 8 * KIB).unwrap();
    assert_eq!(objects(&fs), 3);
    unmap(&fd, 0, 100).unwrap();
    assert_eq!(objects(&fs), 2);
    drop(fd);
    std::fs::remove_file(fs.path("r")).unwrap();
}
