//! libmshare's C ABI: the committed header, a real C program (`examples/c/db_workers.c`)
//! built with `-Wall -Wextra -Werror` and run as real processes (also under valgrind and
//! ASAN), and the documented negative errno of every function's error cases.
//!
//! Direct mode (regions on a plain hugetlbfs mount, no daemon) needs root and hugetlbfs;
//! the msharefs tests also need `/dev/fuse` and the daemon (`msharefs mount`).

#[path = "support_lib.rs"]
mod support_lib;

use std::ffi::{CString, OsStr, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::Duration;

use mshare::ffi::*;
use msharefs_tests::{HugetlbfsDir, PoolGuard, TempDir, loud, require_privileged};
use support_lib::{MsharefsMount, compile, libs, require_tool, run_helper};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths")
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

#[test]
fn header_is_what_cbindgen_generates() {
    let script = msharefs_tests::mountguard::repo().join("scripts/check-header.sh");
    let (ok, out, err) = support_lib::run(&script, &[]);
    assert!(ok, "libmshare/include/mshare.h is stale:\n{out}{err}");
}

#[test]
fn header_compiles_as_c99_and_cxx() {
    if !require_tool("gcc", "header_compiles_as_c99_and_cxx")
        || !require_tool("g++", "header_compiles_as_c99_and_cxx")
    {
        return;
    }
    let dir = TempDir::new("header").unwrap();
    let src = dir.path().join("use_header.c");
    // Included twice: the include guard must hold.
    std::fs::write(
        &src,
        "#include \"mshare.h\"\n#include \"mshare.h\"\n\
         int use(void);\n\
         int use(void) {\n\
           struct mshare_region_stat st; mshare_region *r = NULL; void *a = NULL;\n\
           unsigned int b = MSHARE_BACKING_DEFAULT + MSHARE_BACKING_HUGETLB\n\
             + MSHARE_BACKING_THP + MSHARE_BACKING_SHMEM;\n\
           (void)b; (void)mshare_strerror(-22); (void)mshare_version();\n\
           return mshare_stat(r, &st) + mshare_attach(r, 1, &a) + mshare_detach(r, a)\n\
             + mshare_open(\"x\", 0, &r) + mshare_create(\"x\", 1, 0600, 0, &r)\n\
             + mshare_unlink(\"x\") + mshare_size(r, &st.size)\n\
             + mshare_backing(r, &st.backing);\n\
         }\n",
    )
    .unwrap();
    let include = msharefs_tests::mountguard::repo().join("libmshare/include");
    let obj = dir.path().join("o.o");
    for (cc, std) in [
        ("gcc", "-std=c99"),
        ("gcc", "-std=c11"),
        ("g++", "-std=c++11"),
        ("g++", "-std=c++17"),
    ] {
        let mut args: Vec<&OsStr> = vec![
            os(std),
            os("-Wall"),
            os("-Wextra"),
            os("-Werror"),
            os("-pedantic"),
            os("-I"),
            include.as_os_str(),
            os("-c"),
        ];
        if cc == "g++" {
            args.extend([os("-x"), os("c++")]);
        }
        args.extend([src.as_os_str(), os("-o"), obj.as_os_str()]);
        compile(cc, &args);
    }
}

/// Builds `examples/c/db_workers.c` into `dir`: against `libmshare.so` (returned first)
/// and, statically linked against `libmshare.a` with ASAN and UBSAN (second).
fn build_db_workers(dir: &Path) -> (PathBuf, PathBuf) {
    let libs = libs();
    let repo = msharefs_tests::mountguard::repo();
    let src = repo.join("examples/c/db_workers.c");
    let include = repo.join("libmshare/include");
    let dynamic = dir.join("db_workers");
    let rpath = format!("-Wl,-rpath,{}", libs.dir.display());
    let common: Vec<&OsStr> = vec![
        os("-std=c11"),
        os("-Wall"),
        os("-Wextra"),
        os("-Werror"),
        os("-g"),
        os("-I"),
        include.as_os_str(),
        src.as_os_str(),
    ];
    let mut args = common.clone();
    args.extend([
        os("-o"),
        dynamic.as_os_str(),
        os("-L"),
        libs.dir.as_os_str(),
        os(&rpath),
        os("-lmshare"),
    ]);
    compile("gcc", &args);
    let asan = dir.join("db_workers-asan");
    let mut args = common;
    args.extend([
        os("-fsanitize=address,undefined"),
        os("-fno-omit-frame-pointer"),
        os("-o"),
        asan.as_os_str(),
    ]);
    let static_lib = libs.static_lib();
    args.push(static_lib.as_os_str());
    // What `rustc --print native-static-libs` lists for a std staticlib on glibc.
    for l in [
        "-lgcc_s",
        "-lutil",
        "-lrt",
        "-lpthread",
        "-lm",
        "-ldl",
        "-lc",
    ] {
        args.push(os(l));
    }
    compile("gcc", &args);
    // The sanitizer runtime really is in the binary.
    let (_, syms, _) = support_lib::run("nm", &[asan.as_os_str()]);
    assert!(
        syms.contains("__asan_init"),
        "no ASAN runtime in {}",
        asan.display()
    );
    (dynamic, asan)
}

/// Runs db_workers (optionally under a wrapper like valgrind) and requires exit 0 and its
/// "ok" line.
fn run_db_workers(label: &str, wrapper: &[&OsStr], prog: &Path, args: &[&OsStr]) {
    let (program, mut all): (&Path, Vec<&OsStr>) = match wrapper.split_first() {
        Some((w, rest)) => (Path::new(w), rest.to_vec()),
        None => (prog, Vec::new()),
    };
    if !wrapper.is_empty() {
        all.push(prog.as_os_str());
    }
    all.extend_from_slice(args);
    let (ok, lines) = run_helper(label, program, &all, RUN_LIMIT);
    let text = lines.join("\n");
    assert!(ok, "{label}: db_workers failed; output:\n{text}");
    assert!(
        lines.iter().any(|l| l.starts_with("db_workers: ok:")),
        "{label}: no ok line:\n{text}"
    );
    loud(&format!(
        "{label}: {}",
        lines.last().map_or("", String::as_str)
    ));
}

fn valgrind_args() -> Vec<&'static OsStr> {
    [
        "valgrind",
        "-q",
        "--error-exitcode=99",
        "--leak-check=full",
        "--trace-children=yes",
    ]
    .iter()
    .map(os)
    .collect()
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn c_example_direct_mode() {
    if !require_privileged("c_example_direct_mode") || !require_tool("gcc", "c_example_direct_mode")
    {
        return;
    }
    let pool = PoolGuard::new();
    let dir = HugetlbfsDir::new("c-direct").unwrap();
    let _grant = pool
        .grow(64 * MIB / kernel_glue::HUGE_PAGE_SIZE + 8)
        .unwrap();
    let bin = TempDir::new("c-direct-bin").unwrap();
    let (dynamic, asan) = build_db_workers(bin.path());

    let r = dir.file("pool");
    run_db_workers(
        "db_workers (libmshare.so)",
        &[],
        &dynamic,
        &[os("-w"), os("4"), r.as_os_str(), os("64M")],
    );
    run_db_workers(
        "db_workers (libmshare.a, ASAN+UBSAN)",
        &[
            os("env"),
            os("ASAN_OPTIONS=detect_leaks=1:abort_on_error=0"),
        ],
        &asan,
        &[os("-w"), os("3"), r.as_os_str(), os("62M")],
    );
    if require_tool("valgrind", "c_example_direct_mode (valgrind part)") {
        run_db_workers(
            "db_workers under valgrind",
            &valgrind_args(),
            &dynamic,
            &[os("-w"), os("3"), r.as_os_str(), os("32M")],
        );
    }
    // A size that is not a multiple of the huge page size is refused, with the
    // mshare_strerror text, and leaves nothing behind.
    let bad = dir.file("bad");
    let (ok, _) = run_helper(
        "db_workers bad size",
        &dynamic,
        &[bad.as_os_str(), os("3M")],
        RUN_LIMIT,
    );
    assert!(!ok);
    // Every region was unlinked.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "regions left behind: {left:?}");
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn c_example_on_msharefs() {
    if !require_privileged("c_example_on_msharefs") || !require_tool("gcc", "c_example_on_msharefs")
    {
        return;
    }
    let _pool = PoolGuard::new();
    let bin = TempDir::new("c-msharefs-bin").unwrap();
    let (dynamic, asan) = build_db_workers(bin.path());
    let m = MsharefsMount::new("c-example", "hugetlb");
    for (backing, size, workers) in [
        ("hugetlb", "1G", "4"),
        ("thp", "64M", "4"),
        ("shmem", "8M", "3"),
    ] {
        let r = m.file(&format!("pool-{backing}"));
        run_db_workers(
            &format!("db_workers on msharefs ({backing})"),
            &[],
            &dynamic,
            &[
                os("-b"),
                os(backing),
                os("-w"),
                os(workers),
                r.as_os_str(),
                os(size),
            ],
        );
    }
    let r = m.file("pool-default");
    run_db_workers(
        "db_workers on msharefs (default backing, ASAN)",
        &[os("env"), os("ASAN_OPTIONS=detect_leaks=1")],
        &asan,
        &[os("-w"), os("2"), r.as_os_str(), os("64M")],
    );
    if require_tool("valgrind", "c_example_on_msharefs (valgrind part)") {
        let r = m.file("pool-valgrind");
        run_db_workers(
            "db_workers on msharefs under valgrind",
            &valgrind_args(),
            &dynamic,
            &[
                os("-b"),
                os("hugetlb"),
                os("-w"),
                os("3"),
                r.as_os_str(),
                os("64M"),
            ],
        );
    }
}

/// Calls that must fail with `want` and leave the out-pointer untouched.
fn assert_open_fails(path: &CString, oflags: i32, want: i32) {
    let sentinel = ptr::dangling_mut::<mshare_region>();
    let mut out = sentinel;
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { mshare_open(path.as_ptr(), oflags, &mut out) };
    assert_eq!(rc, -want, "mshare_open({path:?}, {oflags:#x})");
    assert_eq!(out, sentinel, "output written on failure");
}

fn assert_create_fails(path: &CString, size: u64, backing: u32, want: i32) {
    let sentinel = ptr::dangling_mut::<mshare_region>();
    let mut out = sentinel;
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { mshare_create(path.as_ptr(), size, 0o600, backing, &mut out) };
    assert_eq!(
        rc, -want,
        "mshare_create({path:?}, {size}, backing {backing})"
    );
    assert_eq!(out, sentinel, "output written on failure");
}

fn create(path: &CString, size: u64, backing: u32) -> *mut mshare_region {
    let mut r = ptr::null_mut();
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { mshare_create(path.as_ptr(), size, 0o600, backing, &mut r) };
    assert_eq!(rc, 0, "mshare_create({path:?}): {}", strerror(rc));
    assert!(!r.is_null());
    r
}

fn open(path: &CString, oflags: i32) -> *mut mshare_region {
    let mut r = ptr::null_mut();
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { mshare_open(path.as_ptr(), oflags, &mut r) };
    assert_eq!(rc, 0, "mshare_open({path:?}): {}", strerror(rc));
    r
}

fn strerror(rc: i32) -> String {
    // SAFETY: mshare_strerror returns a static C string.
    unsafe { std::ffi::CStr::from_ptr(mshare_strerror(rc)) }
        .to_string_lossy()
        .into_owned()
}

fn stat(r: *const mshare_region) -> mshare_region_stat {
    let mut st = mshare_region_stat::default();
    // SAFETY: live handle, valid out-pointer.
    assert_eq!(unsafe { mshare_stat(r, &mut st) }, 0);
    st
}

/// The error cases every function documents, on a region at `dir` (a hugetlbfs or
/// msharefs directory); `page` is the page size of `backing`.
fn check_error_cases(dir: &Path, backing: u32, page: u64) {
    let path = cpath(&dir.join("errors"));
    let missing = cpath(&dir.join("no-such-region"));

    // Nonexistent path.
    assert_open_fails(&missing, libc::O_RDWR, libc::ENOENT);
    // SAFETY: valid C string.
    assert_eq!(unsafe { mshare_unlink(missing.as_ptr()) }, -libc::ENOENT);
    let nodir = cpath(&dir.join("no-such-dir/region"));
    assert_create_fails(&nodir, 4 * MIB, backing, libc::ENOENT);

    // Sizes: zero, not a multiple of the page size. Nothing is left behind.
    assert_create_fails(&path, 0, backing, libc::EINVAL);
    assert_create_fails(&path, page + page / 2, backing, libc::EINVAL);
    assert_create_fails(&path, page - 1, backing, libc::EINVAL);
    assert!(!dir.join("errors").exists(), "failed create left a file");
    // Unknown backing, bad mode, bad open flags.
    assert_create_fails(&path, 4 * MIB, 7, libc::EINVAL);
    let mut out = ptr::null_mut();
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { mshare_create(path.as_ptr(), 4 * MIB, 0o170000, backing, &mut out) };
    assert_eq!(rc, -libc::EINVAL);

    // NULL pointers, everywhere.
    let size = 4 * MIB;
    let r = create(&path, size, backing);
    let mut sentinel_out = ptr::dangling_mut::<mshare_region>();
    // SAFETY: NULL arguments are what is being tested; everything else is valid.
    unsafe {
        assert_eq!(
            mshare_create(ptr::null(), size, 0o600, backing, &mut sentinel_out),
            -libc::EINVAL
        );
        assert_eq!(
            mshare_create(path.as_ptr(), size, 0o600, backing, ptr::null_mut()),
            -libc::EINVAL
        );
        assert_eq!(
            mshare_open(ptr::null(), libc::O_RDWR, &mut sentinel_out),
            -libc::EINVAL
        );
        assert_eq!(
            mshare_open(path.as_ptr(), libc::O_RDWR, ptr::null_mut()),
            -libc::EINVAL
        );
        assert_eq!(mshare_size(r, ptr::null_mut()), -libc::EINVAL);
        assert_eq!(mshare_size(ptr::null(), &mut 0), -libc::EINVAL);
        assert_eq!(mshare_backing(r, ptr::null_mut()), -libc::EINVAL);
        assert_eq!(mshare_backing(ptr::null(), &mut 0), -libc::EINVAL);
        assert_eq!(mshare_stat(r, ptr::null_mut()), -libc::EINVAL);
        assert_eq!(
            mshare_stat(ptr::null(), &mut mshare_region_stat::default()),
            -libc::EINVAL
        );
        assert_eq!(
            mshare_attach(r, libc::PROT_READ, ptr::null_mut()),
            -libc::EINVAL
        );
        let mut a: *mut c_void = ptr::null_mut();
        assert_eq!(
            mshare_attach(ptr::null_mut(), libc::PROT_READ, &mut a),
            -libc::EINVAL
        );
        assert_eq!(mshare_detach(r, ptr::null_mut()), -libc::EINVAL);
        assert_eq!(
            mshare_detach(ptr::null_mut(), 4096 as *mut c_void),
            -libc::EINVAL
        );
        assert_eq!(mshare_unlink(ptr::null()), -libc::EINVAL);
        mshare_close(ptr::null_mut());
    }
    assert_eq!(sentinel_out, ptr::dangling_mut());

    // Existing path on create.
    assert_create_fails(&path, size, backing, libc::EEXIST);
    // Bad open flags and protections.
    assert_open_fails(&path, libc::O_WRONLY, libc::EINVAL);
    assert_open_fails(&path, libc::O_RDWR | libc::O_TRUNC, libc::EINVAL);
    let mut a: *mut c_void = ptr::null_mut();
    for prot in [
        libc::PROT_NONE,
        libc::PROT_EXEC,
        libc::PROT_READ | libc::PROT_EXEC,
    ] {
        // SAFETY: live handle, valid out-pointer.
        assert_eq!(unsafe { mshare_attach(r, prot, &mut a) }, -libc::EINVAL);
        assert!(a.is_null());
    }

    // Stat of the read-write handle.
    let st = stat(r);
    assert_eq!(st.size, size);
    assert_eq!(st.page_size, page);
    assert_eq!(st.granule, GIB);
    assert_ne!(st.backing, MSHARE_BACKING_DEFAULT);
    if backing != MSHARE_BACKING_DEFAULT {
        assert_eq!(st.backing, backing);
    }
    assert_ne!(st.flags & MSHARE_STAT_WRITABLE, 0);
    assert_eq!(
        st.flags & MSHARE_STAT_SHARED_TABLES != 0,
        st.backing == MSHARE_BACKING_HUGETLB
    );
    assert_eq!(st.attachments, 0);
    let (mut sz, mut b) = (0u64, 0u32);
    // SAFETY: live handle, valid out-pointers.
    unsafe {
        assert_eq!(mshare_size(r, &mut sz), 0);
        assert_eq!(mshare_backing(r, &mut b), 0);
    }
    assert_eq!((sz, b), (size, st.backing));

    // Read-only handle: PROT_WRITE is EACCES, PROT_READ works.
    let ro = open(&path, libc::O_RDONLY | libc::O_CLOEXEC);
    assert_eq!(stat(ro).flags & MSHARE_STAT_WRITABLE, 0);
    for prot in [libc::PROT_WRITE, libc::PROT_READ | libc::PROT_WRITE] {
        // SAFETY: live handle, valid out-pointer.
        assert_eq!(unsafe { mshare_attach(ro, prot, &mut a) }, -libc::EACCES);
        assert!(a.is_null(), "output written on failure");
    }
    let mut rw_addr: *mut c_void = ptr::null_mut();
    let mut ro_addr: *mut c_void = ptr::null_mut();
    // SAFETY: live handles, valid out-pointers.
    unsafe {
        assert_eq!(
            mshare_attach(r, libc::PROT_READ | libc::PROT_WRITE, &mut rw_addr),
            0
        );
        assert_eq!(mshare_attach(ro, libc::PROT_READ, &mut ro_addr), 0);
    }
    assert_eq!(rw_addr as u64 % GIB, 0, "attach address not 1 GiB aligned");
    assert_eq!(ro_addr as u64 % GIB, 0);
    assert_eq!(stat(r).attachments, 1);
    // The two attachments see the same memory.
    // SAFETY: both mappings are `size` bytes long and live; volatile access only.
    unsafe {
        ptr::write_volatile((rw_addr as *mut u64).add(1000), 0xfeed_f00d);
        assert_eq!(
            ptr::read_volatile((ro_addr as *const u64).add(1000)),
            0xfeed_f00d
        );
    }
    // Detach: only addresses this handle attached, only once.
    // SAFETY: live handles; the addresses are not dereferenced after a successful detach.
    unsafe {
        assert_eq!(mshare_detach(r, ro_addr), -libc::EINVAL);
        assert_eq!(
            mshare_detach(r, (rw_addr as usize + 4096) as *mut c_void),
            -libc::EINVAL
        );
        assert_eq!(mshare_detach(r, rw_addr), 0);
        assert_eq!(mshare_detach(r, rw_addr), -libc::EINVAL);
    }
    assert_eq!(stat(r).attachments, 0);
    // A mapping stays valid after close, until munmap(addr, size).
    // SAFETY: live handle, closed once; the mapping outlives it by contract.
    unsafe {
        mshare_close(ro);
        assert_eq!(
            ptr::read_volatile((ro_addr as *const u64).add(1000)),
            0xfeed_f00d
        );
        kernel_glue::mapping::munmap(ro_addr as usize, size as usize).unwrap();
        mshare_close(r);
    }

    // Several threads attaching and detaching through one handle.
    let r = open(&path, libc::O_RDWR) as usize;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let r = r as *mut mshare_region;
                for i in 0..8u64 {
                    let mut a: *mut c_void = ptr::null_mut();
                    // SAFETY: the handle is live for the whole scope; each thread uses
                    // only the attachments it made.
                    unsafe {
                        assert_eq!(
                            mshare_attach(r, libc::PROT_READ | libc::PROT_WRITE, &mut a),
                            0
                        );
                        ptr::write_volatile((a as *mut u64).add(t as usize), i);
                        assert_eq!(mshare_detach(r, a), 0);
                    }
                }
            });
        }
    });
    assert_eq!(stat(r as *const mshare_region).attachments, 0);
    // SAFETY: live handle, closed once.
    unsafe { mshare_close(r as *mut mshare_region) };

    // SAFETY: valid C string.
    assert_eq!(unsafe { mshare_unlink(path.as_ptr()) }, 0);
    assert_open_fails(&path, libc::O_RDONLY, libc::ENOENT);
    // SAFETY: valid C string.
    assert_eq!(unsafe { mshare_unlink(path.as_ptr()) }, -libc::ENOENT);
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn error_cases_in_direct_mode() {
    // Not on an msharefs (or hugetlbfs) mount: ENODEV for create, open and unlink, and no
    // file is created or removed.
    let tmp = TempDir::new("enodev").unwrap();
    let plain = tmp.path().join("plain");
    std::fs::write(&plain, b"not a region").unwrap();
    let plain_c = cpath(&plain);
    assert_open_fails(&plain_c, libc::O_RDONLY, libc::ENODEV);
    // SAFETY: valid C string.
    assert_eq!(unsafe { mshare_unlink(plain_c.as_ptr()) }, -libc::ENODEV);
    assert!(plain.exists());
    assert_create_fails(&cpath(&tmp.path().join("new")), 4 * MIB, 0, libc::ENODEV);
    assert!(!tmp.path().join("new").exists());

    if !require_privileged("error_cases_in_direct_mode") {
        return;
    }
    let pool = PoolGuard::new();
    let dir = HugetlbfsDir::new("c-errors").unwrap();
    let _grant = pool.grow(8).unwrap();
    check_error_cases(
        dir.path(),
        MSHARE_BACKING_DEFAULT,
        kernel_glue::HUGE_PAGE_SIZE,
    );
    // Direct mode has hugetlb pages only.
    assert_create_fails(
        &cpath(&dir.file("thp")),
        4 * MIB,
        MSHARE_BACKING_THP,
        libc::EINVAL,
    );
    // A pool too small for the size is an error at create, never a SIGBUS later.
    let huge = cpath(&dir.file("too-big"));
    assert_create_fails(&huge, 64 * GIB, MSHARE_BACKING_HUGETLB, libc::ENOSPC);
    assert!(!dir.file("too-big").exists());
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn error_cases_on_msharefs() {
    if !require_privileged("error_cases_on_msharefs") {
        return;
    }
    let _pool = PoolGuard::new();
    let m = MsharefsMount::new("c-errors", "hugetlb");
    for (name, backing, page) in [
        (
            "hugetlb",
            MSHARE_BACKING_HUGETLB,
            kernel_glue::HUGE_PAGE_SIZE,
        ),
        ("thp", MSHARE_BACKING_THP, kernel_glue::PAGE_SIZE),
        ("shmem", MSHARE_BACKING_SHMEM, kernel_glue::PAGE_SIZE),
    ] {
        loud(&format!("error cases on msharefs, {name} backing"));
        let sub = m.file(name);
        std::fs::create_dir(&sub).unwrap();
        check_error_cases(&sub, backing, page);
    }
    // The root file `mshare_info` is not a region.
    assert_open_fails(&cpath(&m.file("mshare_info")), libc::O_RDONLY, libc::ENODEV);
}
