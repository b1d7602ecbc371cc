//! Exhaustion: asking for more memory than the machine can give fails at the size call
//! (`ENOMEM` for huge pages, `ENOSPC` for tmpfs), leaves the huge-page pool and the region
//! as they were, and never hurts a process that is attached and writing meanwhile (no
//! SIGBUS, no lost record). Objects never need memory beyond the region's reservation.
//! Thousands of regions and thousands of open handles work, a process that runs out of
//! descriptors gets `EMFILE`, and the daemon keeps serving throughout.
//!
//! `MSHAREFS_MANY_REGIONS` (default 1000) and `MSHAREFS_MANY_HANDLES` (default 5000) set
//! the counts; `docs/RELIABILITY.md` has the long run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kernel_glue::consts::*;
use kernel_glue::errnos::*;
use kernel_glue::fd as kfd;
use kernel_glue::mapping::Protection;
use mshare::Backing;
use mshare::uapi::{self, MshareCreate};
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::seeded::env_u64;
use msharefs_tests::{
    Attach, Helper, PoolGuard, PoolState, Probe, SETTLE, loud, probe_bin, require_privileged,
};

const MIB: u64 = 1 << 20;
const HUGE: u64 = 2 * MIB;
const LIMIT: Duration = Duration::from_secs(120);

fn stress_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mshare-stress"))
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("errno"),
    }
}

fn new_region(fs: &Msharefs, name: &str, backing: &str) -> PathBuf {
    let p = fs.path(name);
    drop(kfd::open(&p, O_RDWR | O_CREAT | O_EXCL, 0o644).expect("create"));
    mshare::set_backing(&p, Backing::from_name(backing).expect("backing name")).expect("backing");
    p
}

fn sized_region(fs: &Msharefs, name: &str, backing: &str, size: u64) -> PathBuf {
    let p = new_region(fs, name, backing);
    kfd::ftruncate(kfd::open(&p, O_RDWR, 0).expect("open"), size).expect("size");
    p
}

fn writer(huge: &Path, thp: &Path) -> Helper {
    let args = [
        "writer".to_string(),
        huge.display().to_string(),
        thp.display().to_string(),
        "--id".into(),
        "0".into(),
        "--writers".into(),
        "1".into(),
        "--round".into(),
        "1".into(),
    ];
    let mut w = Helper::spawn("writer", stress_bin(), &args).expect("spawn writer");
    assert_eq!(w.read_line(LIMIT).expect("writer starts"), "writing");
    w
}

/// `MemTotal` in bytes.
fn mem_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("MemTotal")
        * 1024
}

fn pool_added(fs: &Msharefs) -> u64 {
    fs.stat()["totals"]["pool_pages_added"]
        .as_u64()
        .expect("pool_pages_added")
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn more_memory_than_the_machine_has_fails_at_the_size_call() {
    if !require_privileged("more_memory_than_the_machine_has_fails_at_the_size_call") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("exhaust", &["--backing", "hugetlb"]);
    // Processes attached and writing the whole time.
    let w_huge = sized_region(&fs, "w-huge", "hugetlb", 16 * MIB);
    let w_thp = sized_region(&fs, "w-thp", "thp", 16 * MIB);
    let mut writer = writer(&w_huge, &w_thp);
    let held = sized_region(&fs, "held", "hugetlb", 8 * MIB);
    let mut holder = Probe::spawn(
        probe_bin!(),
        &Attach::new(&held, Protection::ReadWrite)
            .write_pattern(31)
            .hold(),
    )
    .expect("holder");
    holder.report().expect("holder attached");

    let round = |b: u64| b / HUGE * HUGE;
    let total = mem_total();
    let available = kernel_glue::procfs::meminfo()
        .expect("meminfo")
        .mem_available;
    let pool_before = PoolState::read();
    let added_before = pool_added(&fs);
    let mut tried = Vec::new();
    for (backing, how, size, want) in [
        ("hugetlb", "ftruncate", round(2 * total), ENOMEM),
        ("hugetlb", "fallocate", round(2 * total), ENOMEM),
        ("hugetlb", "ftruncate", round(available + (1 << 30)), ENOMEM),
        ("hugetlb", "ftruncate", round(u64::MAX / 2), ENOMEM),
        ("thp", "ftruncate", round(2 * total), ENOSPC),
        ("thp", "fallocate", round(total / 10 * 9), ENOSPC),
        ("shmem", "ftruncate", round(2 * total), ENOSPC),
    ] {
        let name = format!("big-{backing}-{how}-{}", tried.len());
        let p = new_region(&fs, &name, backing);
        let fd = kfd::open(&p, O_RDWR, 0).expect("open");
        let t = Instant::now();
        let r = match how {
            "ftruncate" => kfd::ftruncate(&fd, size),
            _ => kfd::fallocate(&fd, 0, size),
        };
        let took = t.elapsed();
        let got = errno(r);
        assert_eq!(
            got,
            want,
            "{backing} {how} of {} GiB: errno {got}",
            size >> 30
        );
        assert_eq!(
            kfd::fstat(&fd).expect("fstat").size,
            0,
            "{name}: size unchanged"
        );
        // An object cannot be made in a region without memory.
        let mut req = MshareCreate {
            region_offset: 0,
            size: HUGE,
            prot: (PROT_READ | PROT_WRITE) as u32,
            flags: (MAP_SHARED | MAP_FIXED | MAP_ANONYMOUS) as u32,
            ..Default::default()
        };
        assert_eq!(
            errno(kfd::ioctl_ptr(&fd, uapi::MSHAREFS_CREATE_MAPPING, &mut req)),
            EINVAL
        );
        let now = PoolState::wait_until(SETTLE, |s| {
            s.nr_hugepages == pool_before.nr_hugepages && s.reserved == pool_before.reserved
        });
        assert_eq!(
            (now.nr_hugepages, now.reserved, now.surplus),
            (
                pool_before.nr_hugepages,
                pool_before.reserved,
                pool_before.surplus
            ),
            "{name}: the pool changed"
        );
        tried.push(format!(
            "{backing} {how} {} GiB: {} in {} ms",
            size >> 30,
            if got == ENOMEM { "ENOMEM" } else { "ENOSPC" },
            took.as_millis()
        ));
        drop(fd);
        std::fs::remove_file(&p).expect("unlink");
    }
    assert_eq!(
        pool_added(&fs),
        added_before,
        "pool pages recorded by the daemon"
    );
    // Objects live inside the reservation: filling a region with objects needs no more.
    let fd = kfd::open(&held, O_RDWR, 0).expect("open held");
    for k in 0..4 {
        let mut req = MshareCreate {
            region_offset: k * HUGE,
            size: HUGE,
            prot: (PROT_READ | PROT_WRITE) as u32,
            flags: (MAP_SHARED | MAP_FIXED | MAP_ANONYMOUS) as u32,
            ..Default::default()
        };
        kfd::ioctl_ptr(&fd, uapi::MSHAREFS_CREATE_MAPPING, &mut req).expect("object");
    }
    assert_eq!(PoolState::read().nr_hugepages, pool_before.nr_hugepages);
    // The daemon still grants what fits.
    let after = sized_region(&fs, "fits", "hugetlb", 4 * MIB);
    assert_eq!(kfd::stat(&after).expect("stat").size, 4 * MIB);

    // The attached processes never noticed: the writer's records and the holder's
    // pattern are intact, and both exit cleanly (a SIGBUS would kill them).
    writer.close_stdin();
    let v = writer.read_json(LIMIT).expect("writer report");
    writer.finish(LIMIT).expect("writer exits cleanly");
    let count = v["records"].as_u64().expect("records");
    let args = [
        "verify".to_string(),
        w_huge.display().to_string(),
        w_thp.display().to_string(),
        "--writers".into(),
        "1".into(),
        "--round".into(),
        "1".into(),
        "--counts".into(),
        count.to_string(),
    ];
    let mut check = Helper::spawn("verify", stress_bin(), &args).expect("verify");
    let r = check.read_json(LIMIT).expect("verify report");
    check.finish(LIMIT).expect("verify exits");
    assert_eq!(r["lost"], 0, "{r}");
    let pattern = Probe::run(
        probe_bin!(),
        &Attach::new(&held, Protection::ReadOnly).check_pattern(31),
    )
    .expect("check pattern");
    assert_eq!(pattern.pattern_ok, Some(true));
    holder.finish().expect("holder exits cleanly");
    loud(&format!(
        "exhaustion: {} (MemTotal {} GiB, MemAvailable {} GiB); pool unchanged; writer \
         wrote {count} records meanwhile, 0 lost, no SIGBUS",
        tried.join("; "),
        total >> 30,
        available >> 30
    ));
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn thousands_of_regions_and_handles_work_or_fail_cleanly() {
    if !require_privileged("thousands_of_regions_and_handles_work_or_fail_cleanly") {
        return;
    }
    let regions = env_u64("MSHAREFS_MANY_REGIONS", 1000);
    let handles = env_u64("MSHAREFS_MANY_HANDLES", 5000);
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("many", &["--backing", "shmem"]);
    let pid = fs.daemon_pid();

    // Many regions, in directories of 100.
    let t = Instant::now();
    let mut paths = Vec::new();
    for i in 0..regions {
        let dir = fs.path(&format!("d{}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir(&dir).expect("mkdir");
        }
        let p = dir.join(format!("r{i}"));
        let fd = kfd::open(&p, O_RDWR | O_CREAT | O_EXCL, 0o644).expect("create region");
        kfd::ftruncate(&fd, 64 * 1024).expect("size");
        paths.push(p);
    }
    let create_time = t.elapsed();
    let state_bytes = std::fs::metadata(fs.state_dir().join("state.json")).map_or(0, |m| m.len());
    // A few hugetlb and thp regions among them.
    let huge = sized_region(&fs, "huge", "hugetlb", 4 * MIB);
    let thp = sized_region(&fs, "thp", "thp", 4 * MIB);
    let listed: usize = (0..regions.div_ceil(100))
        .map(|d| {
            std::fs::read_dir(fs.path(&format!("d{d}")))
                .expect("readdir")
                .count()
        })
        .sum();
    assert_eq!(listed as u64, regions, "readdir sees every region");
    let st = fs.stat();
    assert_eq!(
        st["totals"]["regions"].as_u64(),
        Some(regions + 2),
        "stat reports every region"
    );
    // All of them open at once in this process.
    let t = Instant::now();
    let open: Vec<_> = paths
        .iter()
        .map(|p| kfd::open(p, O_RDWR, 0).expect("open"))
        .collect();
    let open_time = t.elapsed();
    drop(open);

    // Thousands of handles on one region from one process, and a process that runs out
    // of descriptors: it gets EMFILE, the daemon does not notice.
    let mut many = Vec::new();
    for (target, limit, max) in [
        (&thp, None, handles),
        (&huge, None, handles),
        (&thp, Some(512), handles),
    ] {
        let args = [
            "open-many".to_string(),
            target.display().to_string(),
            "--max".into(),
            max.to_string(),
        ];
        let mut h = match limit {
            None => Helper::spawn("open-many", stress_bin(), &args),
            Some(l) => {
                let mut a = vec![format!("--nofile={l}:{l}"), "--".into()];
                a.push(stress_bin().display().to_string());
                a.extend(args.iter().cloned());
                Helper::spawn("open-many (limited)", Path::new("prlimit"), &a)
            }
        }
        .expect("spawn open-many");
        let v = h.read_json(LIMIT).expect("open-many report");
        let opened = v["opened"].as_u64().expect("opened");
        match limit {
            None => assert_eq!((opened, v["errno"].as_i64()), (max, Some(0)), "{v}"),
            Some(l) => {
                assert_eq!(v["errno"].as_i64(), Some(libc::EMFILE as i64), "{v}");
                assert!(opened > 0 && opened < l, "{v}");
            }
        }
        many.push((h, opened));
    }
    let handles_of = |name: &str| -> u64 {
        fs.stat()["regions"]
            .as_array()
            .expect("regions")
            .iter()
            .find(|r| r["path"] == name)
            .and_then(|r| r["open_handles"].as_u64())
            .unwrap_or(u64::MAX)
    };
    let (thp_n, huge_n, limited_n) = (many[0].1, many[1].1, many[2].1);
    let thp_open = handles_of("/thp");
    let huge_open = handles_of("/huge");
    assert_eq!(thp_open, thp_n + limited_n, "open handles of /thp");
    assert_eq!(huge_open, huge_n, "open handles of /huge");
    // Still serving: a new region and an attach while all of that is open.
    let extra = sized_region(&fs, "extra", "hugetlb", 2 * MIB);
    let a = Probe::run(
        probe_bin!(),
        &Attach::new(&extra, Protection::ReadWrite).touch(),
    )
    .expect("attach while thousands of handles are open");
    assert!(a.touched.is_some());
    for (mut h, _) in many {
        h.finish(LIMIT).expect("open-many exits");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while (handles_of("/thp"), handles_of("/huge")) != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        (handles_of("/thp"), handles_of("/huge")),
        (0, 0),
        "handles released"
    );

    // And everything goes away again.
    let t = Instant::now();
    for d in 0..regions.div_ceil(100) {
        std::fs::remove_dir_all(fs.path(&format!("d{d}"))).expect("remove");
    }
    let remove_time = t.elapsed();
    for p in [&huge, &thp, &extra] {
        std::fs::remove_file(p).expect("unlink");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let left = || -> usize {
        ["hugetlb", "thp", "shmem"]
            .iter()
            .map(|s| {
                std::fs::read_dir(fs.state_dir().join("backing").join(s)).map_or(0, |d| d.count())
            })
            .sum()
    };
    while left() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(left(), 0, "backing files left");
    let log = fs.log();
    assert!(
        !log.contains("panicked") && !log.contains(" ERROR "),
        "{log}"
    );
    let daemon_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    loud(&format!(
        "exhaustion: {regions} regions created in {:.1} s ({:.1} ms each), opened at once in \
         {} ms, removed in {:.1} s; {} handles on a thp and {} on a hugetlb region from one \
         process each; a process limited to 512 descriptors got EMFILE after {}; daemon \
         kept serving, {daemon_fds} descriptors at the end; state.json held {} KiB with all \
         regions",
        create_time.as_secs_f64(),
        create_time.as_secs_f64() * 1000.0 / regions as f64,
        open_time.as_millis(),
        remove_time.as_secs_f64(),
        thp_n,
        huge_n,
        limited_n,
        state_bytes / 1024,
    ));
}
