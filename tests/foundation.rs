//! Foundation: what the rest of msharefs stands on, shown on the real kernel.
//!
//! - separate processes attaching one hugetlb region at 1 GiB-aligned addresses share its
//!   PMD page tables (a handful of faults per GiB), and the same attach shifted by 2 MiB
//!   does not (hundreds of faults per GiB);
//! - the huge-page pool wrappers leave `vm.nr_hugepages` as found, also when a test
//!   panics;
//! - bad sizes and short pools fail at create, leaving no file, no pages and no mount;
//! - kernel-glue's mounts, tmpfs THP and hugetlb memfds behave as the design assumes.
//!
//! Every test needs root, `/dev/fuse` and hugetlbfs: outside CI it skips loudly, in CI
//! (`CI` set) it fails.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use kernel_glue::errnos::{EINVAL, ENODEV, ENOENT, ENOMEM, ENOSPC};
use kernel_glue::hugepages::PoolError;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::mount::{InstanceMount, mount_at};
use kernel_glue::{HUGE_PAGE_SIZE, HUGETLBFS_MAGIC, PUD_SIZE, TMPFS_MAGIC, fd as kfd, procfs};
use libc::EFBIG;
use mshare::{Backing, Region};
use msharefs_tests::probe::{pattern_offsets, pattern_word};
use msharefs_tests::{
    Attach, AttachReport, Create, HugetlbfsDir, PoolGuard, PoolLock, PoolState, Probe, SETTLE,
    TempDir, TmpfsDir, loud, probe_bin, require_privileged,
};

const GIB: u64 = 1 << 30;
/// The region the sharing tests attach.
const REGION_SIZE: u64 = 2 * GIB;
/// Pool pages grown beyond the region's, so the test never depends on pages others hold.
const POOL_MARGIN: u64 = 16;
/// Upper bound for an aligned attacher when another process maps the region: one fault
/// links a shared PMD table per GiB; allow a few more.
const MAX_SHARED_FAULTS_PER_GIB: f64 = 4.0;
/// Lower bound for an attacher shifted by 2 MiB: it cannot share and takes one fault per
/// 2 MiB page (512 per GiB); half of that is unmistakable.
const MIN_UNSHARED_FAULTS_PER_GIB: f64 = 256.0;

fn assert_errno(r: std::io::Result<impl std::fmt::Debug>, allowed: &[i32], what: &str) {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected errno {allowed:?}"),
        Err(e) => assert!(
            e.raw_os_error().is_some_and(|n| allowed.contains(&n)),
            "{what}: {e} (errno {:?}), expected errno {allowed:?}",
            e.raw_os_error()
        ),
    }
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .expect("read scratch directory")
        .next()
        .is_none()
}

/// Checks what every attacher of a hugetlb region must show, and its data.
fn assert_attached(r: &AttachReport, shift: u64, who: &str) {
    assert_eq!(
        r.addr % PUD_SIZE,
        shift,
        "{who}: address {:#x} is not 1 GiB-aligned + {shift:#x}",
        r.addr
    );
    assert_eq!(r.len, REGION_SIZE, "{who}: mapping length");
    assert_eq!(
        r.kernel_page_size, HUGE_PAGE_SIZE,
        "{who}: KernelPageSize of the mapping"
    );
    assert_eq!(
        r.touched,
        Some(REGION_SIZE / HUGE_PAGE_SIZE),
        "{who}: pages touched"
    );
}

/// Creates a 2 GiB direct-mode region on a fresh hugetlbfs, starts a first attacher that
/// writes the data pattern and keeps its mapping, then runs `followers` attachers at
/// 1 GiB-aligned + `shift` that touch every page and check the pattern while the first
/// still holds the region. Returns the first attacher's report and the followers'.
fn attach_in_turn(tag: &str, shift: u64, followers: usize) -> (AttachReport, Vec<AttachReport>) {
    let probe = probe_bin!();
    let pool = PoolGuard::new();
    let dir = HugetlbfsDir::new(tag).expect("mount hugetlbfs");
    let _grant = pool
        .grow(REGION_SIZE / HUGE_PAGE_SIZE + POOL_MARGIN)
        .expect("grow the huge-page pool for a 2 GiB region");
    let path = dir.file("region");
    let t = Instant::now();
    let region = Region::create(&path, REGION_SIZE, 0o600, Backing::Hugetlb)
        .expect("create a 2 GiB region on hugetlbfs");
    assert_eq!(region.size(), REGION_SIZE);
    assert_eq!(region.backing(), Backing::Hugetlb);
    loud(&format!(
        "foundation: created a 2 GiB hugetlb region in {:.2?}",
        t.elapsed()
    ));
    let seed = 0x6d73_6861_7265 ^ shift;

    let mut first = Probe::spawn(
        probe,
        &Attach::new(&path, Protection::ReadWrite)
            .write_pattern(seed)
            .touch()
            .hold(),
    )
    .expect("start the first attacher");
    let w = first.report().expect("first attacher's report");
    assert_attached(&w, 0, "first attacher");
    assert!(w.pattern_written);
    assert_ne!(
        w.pid,
        std::process::id(),
        "attachers are separate processes"
    );

    // The pattern reached the file, not just the writer's view of it.
    let fd = kfd::open(&path, kernel_glue::consts::O_RDONLY, 0).expect("open region file");
    for off in pattern_offsets(REGION_SIZE, HUGE_PAGE_SIZE).step_by(333) {
        let mut buf = [0u8; 8];
        kfd::pread_full(fd.as_fd(), &mut buf, off).expect("pread the region file");
        assert_eq!(
            u64::from_ne_bytes(buf),
            pattern_word(seed, off),
            "word at {off:#x} of the region file"
        );
    }
    drop(fd);

    let mut reports = Vec::new();
    for i in 0..followers {
        let who = format!("attacher {} (shift {shift:#x})", i + 2);
        let mut attach = Attach::new(&path, Protection::ReadWrite)
            .check_pattern(seed)
            .touch();
        if shift != 0 {
            attach = attach.shift(shift);
        }
        let r = Probe::run(probe, &attach).unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_attached(&r, shift, &who);
        assert_ne!(r.pid, w.pid);
        assert_eq!(r.pattern_ok, Some(true), "{who}: data pattern: {r:?}");
        reports.push(r);
    }
    first.finish().expect("first attacher lets go");
    (w, reports)
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn aligned_attachers_share_pmd_tables() {
    if !require_privileged("aligned_attachers_share_pmd_tables") {
        return;
    }
    let (first, followers) = attach_in_turn("aligned", 0, 2);
    loud(&format!(
        "foundation: first attacher (no tables to share yet): {} minor faults touching 2 GiB",
        first.touch_minor_faults.unwrap_or_default()
    ));
    for r in &followers {
        let per_gib = r.faults_per_gib().expect("touched");
        loud(&format!(
            "foundation: ALIGNED attacher (pid {}, addr {:#x}): {} minor faults touching \
             2 GiB = {per_gib:.1} per GiB in {} us; VmPTE {} kB",
            r.pid,
            r.addr,
            r.touch_minor_faults.unwrap_or_default(),
            r.touch_ns.unwrap_or_default() / 1000,
            r.vm_pte / 1024
        ));
        assert!(
            per_gib <= MAX_SHARED_FAULTS_PER_GIB,
            "aligned attacher took {per_gib:.1} faults per GiB (at most \
             {MAX_SHARED_FAULTS_PER_GIB} with shared PMD tables): {r:?}"
        );
    }
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn misaligned_attacher_does_not_share() {
    if !require_privileged("misaligned_attacher_does_not_share") {
        return;
    }
    let (_, followers) = attach_in_turn("misaligned", HUGE_PAGE_SIZE, 1);
    let r = &followers[0];
    let per_gib = r.faults_per_gib().expect("touched");
    loud(&format!(
        "foundation: MISALIGNED attacher (+2 MiB, pid {}, addr {:#x}): {} minor faults \
         touching 2 GiB = {per_gib:.1} per GiB in {} us; VmPTE {} kB",
        r.pid,
        r.addr,
        r.touch_minor_faults.unwrap_or_default(),
        r.touch_ns.unwrap_or_default() / 1000,
        r.vm_pte / 1024
    ));
    assert!(
        per_gib >= MIN_UNSHARED_FAULTS_PER_GIB,
        "attacher shifted by 2 MiB took only {per_gib:.1} faults per GiB (expected at \
         least {MIN_UNSHARED_FAULTS_PER_GIB}: it cannot share PMD tables): {r:?}"
    );
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn a_pattern_check_can_fail() {
    if !require_privileged("a_pattern_check_can_fail") {
        return;
    }
    let pool = PoolGuard::new();
    let dir = HugetlbfsDir::new("pattern").expect("mount hugetlbfs");
    let _grant = pool.grow(4).expect("grow the pool by 4 pages");
    let path = dir.file("small");
    // Created by a process that exits at once: the region outlives its creator.
    let created = Create {
        path: path.clone(),
        size: 4 * HUGE_PAGE_SIZE,
        mode: 0o600,
        backing: "hugetlb".into(),
    }
    .run(probe_bin!())
    .expect("create from a probe");
    assert_eq!(created.size, 4 * HUGE_PAGE_SIZE);
    assert_eq!(created.backing, "hugetlb");
    let written = Probe::run(
        probe_bin!(),
        &Attach::new(&path, Protection::ReadWrite).write_pattern(1),
    )
    .expect("writer");
    assert!(written.pattern_written);
    let wrong = Probe::run(
        probe_bin!(),
        &Attach::new(&path, Protection::ReadOnly).check_pattern(2),
    )
    .expect("checker with the wrong seed");
    assert_eq!(wrong.pattern_ok, Some(false));
    assert_eq!(wrong.pattern_mismatches, Some(8), "2 words x 4 pages");
    let right = Probe::run(
        probe_bin!(),
        &Attach::new(&path, Protection::ReadOnly)
            .check_pattern(1)
            .touch(),
    )
    .expect("checker with the right seed");
    assert_eq!(right.pattern_ok, Some(true));
    assert_eq!(right.prot, "ro");
    assert_eq!(right.addr % PUD_SIZE, 0);
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn probe_reports_errors_with_errno() {
    if !require_privileged("probe_reports_errors_with_errno") {
        return;
    }
    let dir = TmpfsDir::new("probe-errors", "never", "4M").expect("mount tmpfs");
    loud("foundation: probe_reports_errors_with_errno: two mshare-probe errors follow on purpose");
    let e = Probe::run(
        probe_bin!(),
        &Attach::new(dir.file("missing"), Protection::ReadOnly),
    )
    .expect_err("attach of a missing file");
    assert_eq!(e.errno(), Some(ENOENT), "{e}");
    // A file that is neither on msharefs nor on hugetlbfs is not a region.
    std::fs::write(dir.file("plain"), b"x").expect("write a tmpfs file");
    let e = Probe::run(
        probe_bin!(),
        &Attach::new(dir.file("plain"), Protection::ReadOnly),
    )
    .expect_err("attach of a tmpfs file");
    assert_eq!(e.errno(), Some(ENODEV), "{e}");
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn helpers_do_not_outlive_a_failing_test() {
    if !require_privileged("helpers_do_not_outlive_a_failing_test") {
        return;
    }
    let pool = PoolGuard::new();
    let dir = HugetlbfsDir::new("orphans").expect("mount hugetlbfs");
    let _grant = pool.grow(1).expect("grow by 1");
    let path = dir.file("region");
    Region::create(&path, HUGE_PAGE_SIZE, 0o600, Backing::Hugetlb).expect("create");
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let mut p = Probe::spawn(
            probe_bin!(),
            &Attach::new(&path, Protection::ReadWrite).hold(),
        )
        .expect("start a holding probe");
        let report = p.report().expect("report");
        assert!(kernel_glue::process::alive(report.pid));
        tx.send(report.pid).expect("send pid");
        panic!("deliberate panic while a probe holds the region");
    })
    .join();
    assert!(r.is_err(), "the body panicked");
    let pid = rx.recv().expect("the probe's pid");
    assert!(
        !kernel_glue::process::alive(pid),
        "probe {pid} outlived the panicking test"
    );
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn pool_is_restored_when_a_test_panics() {
    if !require_privileged("pool_is_restored_when_a_test_panics") {
        return;
    }
    let lock = PoolLock::acquire();
    let before = PoolState::read();
    loud(
        "foundation: pool_is_restored_when_a_test_panics leaks pages on purpose: the next two \
          HUGE PAGE POOL NOT RESTORED lines are expected",
    );
    std::thread::scope(|s| {
        // A grant dropped while unwinding gives its pages back.
        let r = s
            .spawn(|| {
                let guard = PoolGuard::under(&lock);
                let _grant = guard.grow(8).expect("grow by 8");
                assert_eq!(PoolState::read().nr_hugepages, before.nr_hugepages + 8);
                // Pages in use at the panic: a mapped hugetlb memfd.
                let fd = kfd::memfd_create("panic", true).expect("hugetlb memfd");
                kfd::ftruncate(&fd, 4 * HUGE_PAGE_SIZE).expect("ftruncate");
                let m =
                    Mapping::map_aligned(&fd, 4 * HUGE_PAGE_SIZE, Protection::ReadWrite, PUD_SIZE)
                        .expect("map");
                m.populate(0, 4 * HUGE_PAGE_SIZE).expect("populate");
                panic!("deliberate panic holding 8 granted pages, 4 of them mapped");
            })
            .join();
        assert!(r.is_err(), "the body panicked");
        assert_eq!(PoolState::read().nr_hugepages, before.nr_hugepages);

        // A grant that leaked (into_raw) is given back by the guard while unwinding.
        let r = s
            .spawn(|| {
                let guard = PoolGuard::under(&lock);
                let leaked = guard.grow(6).expect("grow by 6").into_raw();
                assert_eq!(leaked, 6);
                panic!("deliberate panic after leaking 6 pages");
            })
            .join();
        assert!(r.is_err());
        assert_eq!(PoolState::read().nr_hugepages, before.nr_hugepages);

        // Without a panic, the guard repairs the pool and then fails the test.
        let r = s
            .spawn(|| {
                let guard = PoolGuard::under(&lock);
                guard.grow(5).expect("grow by 5").into_raw();
            })
            .join();
        let msg = r.expect_err("the guard panics on a leak");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("NOT RESTORED"), "guard's message: {msg:?}");
        assert_eq!(PoolState::read().nr_hugepages, before.nr_hugepages);
    });
    let after = PoolState::wait_until(SETTLE, |s| s.surplus == before.surplus);
    assert_eq!(after.nr_hugepages, before.nr_hugepages);
    assert_eq!(after.surplus, before.surplus, "no pages left in use");
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn bad_sizes_are_einval_and_leave_nothing() {
    if !require_privileged("bad_sizes_are_einval_and_leave_nothing") {
        return;
    }
    let pool = PoolGuard::new();
    let dir = HugetlbfsDir::new("bad-sizes").expect("mount hugetlbfs");
    let mount_point = dir.path().to_path_buf();
    let aligned_max = !(HUGE_PAGE_SIZE - 1);
    for size in [
        0,
        1,
        4096,
        HUGE_PAGE_SIZE - 4096,
        HUGE_PAGE_SIZE + 4096,
        3 << 20,
        u64::MAX,
        aligned_max,
    ] {
        let path = dir.file("bad");
        assert_errno(
            Region::create(&path, size, 0o600, Backing::Hugetlb),
            &[EINVAL],
            &format!("create with size {size:#x}"),
        );
        assert!(!path.exists(), "size {size:#x} left a file");
        assert!(dir_is_empty(dir.path()));
    }
    // Only hugetlb regions can live on hugetlbfs.
    assert_errno(
        Region::create(&dir.file("thp"), HUGE_PAGE_SIZE, 0o600, Backing::Thp),
        &[EINVAL],
        "thp backing on hugetlbfs",
    );
    assert!(dir_is_empty(dir.path()));
    assert_eq!(PoolState::read(), pool.before(), "no pages were taken");
    drop(dir);
    assert_eq!(mount_at(&mount_point).expect("mountinfo"), None);
    assert!(!mount_point.exists());
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn region_larger_than_the_pool_fails_at_create() {
    if !require_privileged("region_larger_than_the_pool_fails_at_create") {
        return;
    }
    let pool = PoolGuard::new();
    let dir = HugetlbfsDir::new("short-pool").expect("mount hugetlbfs");
    let mount_point = dir.path().to_path_buf();
    let _grant = pool.grow(8).expect("grow by 8");
    let ready = PoolState::read();
    let too_many = ready.available() + 8;
    let path = dir.file("too-big");
    assert_errno(
        Region::create(&path, too_many * HUGE_PAGE_SIZE, 0o600, Backing::Hugetlb),
        &[ENOSPC, ENOMEM],
        &format!(
            "create {too_many} pages with {} available",
            ready.available()
        ),
    );
    assert!(!path.exists(), "a failed create left its file");
    assert_eq!(
        PoolState::wait_until(SETTLE, |s| *s == ready),
        ready,
        "the pages a failed create allocated went back to the pool"
    );
    // Absurd but representable: the kernel runs out of pool long before the file size.
    assert_errno(
        Region::create(&path, 1 << 62, 0o600, Backing::Hugetlb),
        &[ENOSPC, ENOMEM, EFBIG],
        "create a 4 EiB region",
    );
    assert!(!path.exists());
    assert_eq!(PoolState::wait_until(SETTLE, |s| *s == ready), ready);
    // What the pool can give, it gives.
    let fits = Region::create(&path, 8 * HUGE_PAGE_SIZE, 0o600, Backing::Hugetlb)
        .expect("create within the pool");
    assert_eq!(
        kfd::fstat(fits.try_clone_fd().expect("dup"))
            .expect("fstat")
            .size,
        8 * HUGE_PAGE_SIZE
    );
    assert_eq!(PoolState::read().available(), ready.available() - 8);
    drop(fits);
    std::fs::remove_file(&path).expect("remove region");
    assert_eq!(PoolState::wait_until(SETTLE, |s| *s == ready), ready);
    drop(dir);
    assert_eq!(mount_at(&mount_point).expect("mountinfo"), None);
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn pool_request_the_kernel_cannot_satisfy() {
    if !require_privileged("pool_request_the_kernel_cannot_satisfy") {
        return;
    }
    let pool = PoolGuard::new();
    let before = pool.before();
    // 10 million pages (20 TiB). kernel-glue refuses a request beyond MemAvailable before
    // asking the kernel (which would first take all free memory into the pool, for about a
    // second); were the request passed on, it would give back what the kernel added.
    // Either way: PoolError::Short and the pool unchanged.
    let wanted = 10_000_000;
    let t = Instant::now();
    match pool.grow(wanted) {
        Err(PoolError::Short { wanted: w, got }) => {
            assert_eq!(w, wanted);
            assert!(got < wanted);
            let how = if got == 0 {
                "refused before asking the kernel".to_string()
            } else {
                format!("the kernel delivered {got}, given back")
            };
            loud(&format!(
                "foundation: asked for {wanted} huge pages: {how}, in {:.2?}",
                t.elapsed()
            ));
        }
        Err(e) => panic!("expected PoolError::Short, got {e}"),
        Ok(g) => panic!("the kernel granted {} pages (20 TiB)?", g.pages()),
    }
    assert_eq!(PoolState::read().nr_hugepages, before.nr_hugepages);

    // A request that overflows the counter never reaches the kernel.
    let one = pool.grow(1).expect("grow by 1");
    match pool.grow(u64::MAX) {
        Err(PoolError::Short { got: 0, .. }) => {}
        other => panic!("grow(u64::MAX) on a non-empty pool: {other:?}"),
    }
    assert_eq!(PoolState::read().nr_hugepages, before.nr_hugepages + 1);
    drop(one);
    assert_eq!(PoolState::read().nr_hugepages, before.nr_hugepages);
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn instance_mounts_unmount_on_drop() {
    if !require_privileged("instance_mounts_unmount_on_drop") {
        return;
    }
    let dir = TempDir::new("mounts").expect("temp dir");
    let target = dir.path();

    let m = InstanceMount::hugetlbfs(target, 0o700).expect("mount hugetlbfs");
    let entry = mount_at(target).expect("mountinfo").expect("mounted");
    assert_eq!(entry.fstype, "hugetlbfs");
    let fs = kfd::statfs(target).expect("statfs");
    assert_eq!(fs.fs_type, HUGETLBFS_MAGIC);
    assert_eq!(fs.block_size, HUGE_PAGE_SIZE);
    drop(m);
    assert_eq!(
        mount_at(target).expect("mountinfo"),
        None,
        "hugetlbfs unmounted"
    );

    let m = InstanceMount::tmpfs(target, "always", "8M", 0o700).expect("mount tmpfs");
    let entry = mount_at(target).expect("mountinfo").expect("mounted");
    assert_eq!(entry.fstype, "tmpfs");
    assert!(entry.options.contains("huge=always"), "{}", entry.options);
    assert_eq!(kfd::statfs(target).expect("statfs").fs_type, TMPFS_MAGIC);
    drop(m);
    assert_eq!(
        mount_at(target).expect("mountinfo"),
        None,
        "tmpfs unmounted"
    );

    assert_errno(
        InstanceMount::tmpfs(target, "sometimes", "8M", 0o700).map(|m| m.target().to_owned()),
        &[EINVAL],
        "tmpfs with a bad huge= value",
    );
    assert_eq!(mount_at(target).expect("mountinfo"), None);

    // The harness's own guards.
    let h = HugetlbfsDir::new("mounts-guard").expect("mount hugetlbfs");
    let t = TmpfsDir::new("mounts-guard", "never", "1M").expect("mount tmpfs");
    let (hp, tp) = (h.path().to_path_buf(), t.path().to_path_buf());
    assert_eq!(
        mount_at(&hp).expect("mountinfo").expect("mounted").fstype,
        "hugetlbfs"
    );
    assert_eq!(
        mount_at(&tp).expect("mountinfo").expect("mounted").fstype,
        "tmpfs"
    );
    drop((h, t));
    for p in [hp, tp] {
        assert_eq!(mount_at(&p).expect("mountinfo"), None);
        assert!(!p.exists(), "{} was not removed", p.display());
    }
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn tmpfs_huge_always_maps_pmds() {
    if !require_privileged("tmpfs_huge_always_maps_pmds") {
        return;
    }
    // Not a pool change, but it needs free 2 MiB blocks: keep clear of the test that
    // exhausts memory on purpose.
    let _lock = PoolLock::acquire();
    let len = 16 << 20;
    let dir = TmpfsDir::new("thp", "always", "64M").expect("mount tmpfs huge=always");
    let fd = kfd::open(
        &dir.file("data"),
        kernel_glue::consts::O_RDWR | kernel_glue::consts::O_CREAT,
        0o600,
    )
    .expect("create a tmpfs file");
    kfd::ftruncate(&fd, len).expect("ftruncate");
    let m = Mapping::map_aligned(&fd, len, Protection::ReadWrite, PUD_SIZE).expect("map");
    m.populate(0, len).expect("populate");
    let me = std::process::id();
    let shmem = procfs::smaps_field(me, m.addr(), "ShmemPmdMapped").unwrap_or(0);
    let file = procfs::smaps_field(me, m.addr(), "FilePmdMapped").unwrap_or(0);
    let kps = procfs::kernel_page_size(me, m.addr()).expect("KernelPageSize");
    loud(&format!(
        "foundation: tmpfs huge=always, 16 MiB: ShmemPmdMapped {} kB, FilePmdMapped {} kB, \
         KernelPageSize {} kB",
        shmem / 1024,
        file / 1024,
        kps / 1024
    ));
    assert!(
        shmem + file > 0 || kps == HUGE_PAGE_SIZE,
        "tmpfs huge=always mapped no 2 MiB pages"
    );
    drop(m);
}

#[test]
#[ignore = "needs root: mounts hugetlbfs and changes the huge-page pool"]
fn hugetlb_memfd_uses_the_pool() {
    if !require_privileged("hugetlb_memfd_uses_the_pool") {
        return;
    }
    let pool = PoolGuard::new();
    let _grant = pool.grow(4).expect("grow by 4");
    let ready = PoolState::read();
    let len = 4 * HUGE_PAGE_SIZE;
    let fd = kfd::memfd_create("foundation", true).expect("memfd_create(MFD_HUGETLB)");
    kfd::ftruncate(&fd, len).expect("ftruncate");
    assert_eq!(kfd::fstatfs(&fd).expect("fstatfs").fs_type, HUGETLBFS_MAGIC);
    let m = Mapping::map_aligned(&fd, len, Protection::ReadWrite, PUD_SIZE).expect("map");
    assert_eq!(m.addr() as u64 % PUD_SIZE, 0);
    assert_eq!(
        procfs::kernel_page_size(std::process::id(), m.addr()).expect("KernelPageSize"),
        HUGE_PAGE_SIZE
    );
    m.populate(0, len).expect("populate");
    m.store_u64(len - 8, 0x1234_5678).expect("store");
    assert_eq!(m.load_u64(len - 8).expect("load"), 0x1234_5678);
    assert_eq!(
        PoolState::read().free,
        ready.free - 4,
        "4 pool pages in use"
    );
    drop(m);
    drop(fd);
    assert_eq!(
        PoolState::wait_until(SETTLE, |s| s.free == ready.free).free,
        ready.free,
        "pages back in the pool"
    );
}
