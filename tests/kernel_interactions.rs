//! The kernel calls databases make on their shared memory, each on a hugetlb region with
//! two attachers (`mshare-ops` processes A and B): what the call does to the data, whether
//! the other attacher and a fresh one keep sharing page tables (their fault counts: about
//! one per GiB when they link shared tables, 512 per GiB when they build their own) and
//! what `msharefs stat` reports for each. `docs/KERNEL.md` summarizes the results.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kernel_glue::mapping::Protection;
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{
    Attach, Create, Helper, HugetlbfsDir, PoolGuard, Probe, TempDir, loud, probe_bin,
};
use msharefs_tests::{in_ci, require_privileged};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SIZE: u64 = 2 * GIB;
const LIMIT: Duration = Duration::from_secs(120);
/// Faults of a 2 GiB touch that links shared tables: one per GiB, with slack.
const SHARED_FAULTS: u64 = 4;
/// Faults of a 2 MiB-stride touch of one GiB without shared tables: one per page.
const PAGES_PER_GIB: u64 = GIB / (2 * MIB);

fn ops_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mshare-ops"))
}

/// A running `mshare-ops` attacher.
struct Ops {
    h: Helper,
    pid: u32,
    addr: u64,
}

impl Ops {
    fn start(name: &str, path: &Path) -> Ops {
        Ops::spawn(name, &[path.as_os_str()])
    }

    /// An attacher of a plain hugetlbfs file (`mshare-ops --raw`).
    fn start_raw(name: &str, file: &Path) -> Ops {
        Ops::spawn(name, &["--raw".as_ref(), file.as_os_str()])
    }

    fn spawn(name: &str, args: &[&std::ffi::OsStr]) -> Ops {
        let mut h = Helper::spawn(name, ops_bin(), args).unwrap();
        let v = h.read_json(LIMIT).unwrap();
        assert!(v.get("error").is_none(), "{name}: {v}");
        Ops {
            h,
            pid: v["pid"].as_u64().unwrap() as u32,
            addr: v["addr"].as_u64().unwrap(),
        }
    }

    /// Runs a command; its answer may be an error.
    fn try_cmd(&mut self, line: &str) -> Value {
        self.h.write_line(line).unwrap();
        self.h.read_json(LIMIT).unwrap()
    }

    /// Runs a command that must succeed.
    fn cmd(&mut self, line: &str) -> Value {
        let v = self.try_cmd(line);
        assert!(v.get("error").is_none(), "{} `{line}`: {v}", self.h.name());
        v
    }

    fn touch(&mut self) -> u64 {
        self.cmd("touch")["minor_faults"].as_u64().unwrap()
    }

    fn load(&mut self, off: u64) -> u64 {
        self.cmd(&format!("load {off}"))["value"].as_u64().unwrap()
    }

    fn store(&mut self, off: u64, v: u64) {
        self.cmd(&format!("store {off} {v}"));
    }
}

/// Creates the 2 GiB hugetlb region `/region` and waits until the daemon has built its
/// host tables, so attachers' faults count linking, not allocation.
fn create_region(fs: &Msharefs) -> PathBuf {
    let path = fs.path("region");
    Create {
        path: path.clone(),
        size: SIZE,
        mode: 0o600,
        backing: "hugetlb".into(),
    }
    .run(probe_bin!())
    .unwrap();
    let deadline = Instant::now() + LIMIT;
    while fs.stat()["regions"][0]["populated"].as_u64() != Some(SIZE) {
        assert!(Instant::now() < deadline, "region not populated");
        std::thread::sleep(Duration::from_millis(50));
    }
    path
}

/// The `stat --json` entry of attacher `pid` of the only region.
fn attached_row(fs: &Msharefs, pid: u32) -> Value {
    let st = fs.stat();
    st["regions"][0]["attached"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["pid"] == pid)
        .cloned()
        .unwrap_or_else(|| panic!("pid {pid} not attached: {st}"))
}

/// A mount with one populated 2 GiB hugetlb region and two attachers that touched it.
struct Setup {
    a: Ops,
    b: Ops,
    path: PathBuf,
    fs: Msharefs,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let fs = Msharefs::mount(tag, &["--backing", "hugetlb"]);
        let path = create_region(&fs);
        let mut a = Ops::start("A", &path);
        let mut b = Ops::start("B", &path);
        for (i, off) in [0, 8, GIB, GIB + 8].into_iter().enumerate() {
            a.store(off, 0xA000 + i as u64);
        }
        assert!(a.touch() <= SHARED_FAULTS);
        assert!(b.touch() <= SHARED_FAULTS);
        Setup { a, b, path, fs }
    }

    /// The `stat --json` entry of `pid`.
    fn attached(&self, pid: u32) -> Value {
        attached_row(&self.fs, pid)
    }

    /// Whether stat says `pid` shares every slot it maps.
    fn sharing(&self, pid: u32) -> bool {
        self.attached(pid)["sharing"].as_bool().unwrap()
    }

    /// B keeps its links (no new faults), stat says it shares, and a fresh attacher links
    /// the shared tables.
    fn others_keep_sharing(&mut self, what: &str) {
        let b = self.b.touch();
        assert!(b <= SHARED_FAULTS, "{what}: B faulted {b} times");
        let sb = self.attached(self.b.pid);
        assert_eq!(sb["sharing"], true, "{what}: B {sb}");
        let fresh = Probe::run(
            probe_bin!(),
            &Attach::new(&self.path, Protection::ReadWrite).touch(),
        )
        .unwrap();
        let f = fresh.touch_minor_faults.unwrap();
        assert!(
            f <= SHARED_FAULTS,
            "{what}: a fresh attacher faulted {f} times"
        );
        loud(&format!(
            "{what}: B {b} faults, a fresh attacher {f} for 2 GiB"
        ));
    }
}

fn start(tag: &str) -> Option<(PoolGuard<'static>, TempDir)> {
    if !require_privileged(tag) {
        return None;
    }
    Some((PoolGuard::new(), TempDir::new(tag).unwrap()))
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn o_direct_read_into_and_write_from_the_region() {
    let Some((_pool, dir)) = start("o_direct") else {
        return;
    };
    let mut s = Setup::new("o-direct");
    let file = dir.path().join("direct");
    let file = file.to_str().unwrap();
    // Write the first 2 MiB out with O_DIRECT, read them back into slot 1.
    let w = s.a.cmd(&format!("direct_write {file} 0 {}", 2 * MIB));
    assert_eq!(w["bytes"], 2 * MIB);
    let r =
        s.a.cmd(&format!("direct_read {file} {} {}", GIB + 4 * MIB, 2 * MIB));
    assert_eq!(r["bytes"], 2 * MIB);
    assert_eq!(s.b.load(GIB + 4 * MIB), 0xA000, "B sees the O_DIRECT read");
    assert_eq!(s.b.load(GIB + 4 * MIB + 8), 0xA001);
    assert!(s.sharing(s.a.pid));
    s.others_keep_sharing("O_DIRECT");
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn io_uring_with_the_region_as_fixed_buffers() {
    let Some((_pool, dir)) = start("io_uring") else {
        return;
    };
    let mut s = Setup::new("io-uring");
    let file = dir.path().join("uring");
    let file = file.to_str().unwrap();
    s.a.cmd("uring_register");
    assert_eq!(
        s.a.cmd(&format!("uring_write {file} 0 4096"))["bytes"],
        4096
    );
    assert_eq!(
        s.a.cmd(&format!("uring_read {file} {} 4096", GIB + 6 * MIB))["bytes"],
        4096
    );
    assert_eq!(
        s.b.load(GIB + 6 * MIB),
        0xA000,
        "B sees the fixed-buffer read"
    );
    // While the buffers are registered (pinned), A still shares.
    assert!(s.sharing(s.a.pid));
    s.others_keep_sharing("io_uring fixed buffers");
    s.a.cmd("uring_unregister");
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn mlock_keeps_sharing() {
    let Some((_pool, _dir)) = start("mlock") else {
        return;
    };
    let mut s = Setup::new("mlock");
    s.a.cmd(&format!("mlock 0 {SIZE}"));
    // VM_LOCKED is the one flag the kernel ignores when it compares mappings.
    let sa = s.attached(s.a.pid);
    assert_eq!(sa["sharing"], true, "{sa}");
    assert!(s.a.touch() <= SHARED_FAULTS);
    s.others_keep_sharing("mlock");
    s.a.cmd(&format!("munlock 0 {SIZE}"));
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn fork_with_the_region_attached() {
    let Some((_pool, _dir)) = start("fork") else {
        return;
    };
    let mut s = Setup::new("fork");
    let c = s.a.cmd("fork");
    let child = c["child_pid"].as_u64().unwrap() as u32;
    let f = c["minor_faults"].as_u64().unwrap();
    assert_eq!(c["value0"], 0xA000, "the child sees the data");
    assert!(
        f <= SHARED_FAULTS,
        "the child faulted {f} times: it did not link the tables"
    );
    let sc = s.attached(child);
    assert_eq!(sc["sharing"], true, "child {sc}");
    s.others_keep_sharing("fork");
    let end = s.a.cmd("fork_end");
    assert_eq!(end["status"], 0);
    loud(&format!("fork: the child took {f} faults for 2 GiB"));
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn mprotect_of_one_2mib_page_unshares_that_slot_only() {
    let Some((_pool, _dir)) = start("mprotect") else {
        return;
    };
    let mut s = Setup::new("mprotect");
    s.a.cmd(&format!("mprotect {} {} r", GIB + 2 * MIB, 2 * MIB));
    let sa = s.attached(s.a.pid);
    assert_eq!(sa["sharing"], false, "{sa}");
    let unshared = sa["unshared"].as_array().unwrap();
    assert_eq!(unshared.len(), 1, "{sa}");
    assert_eq!(unshared[0]["slot"], 1);
    assert!(
        unshared[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("mapped in part"),
        "{sa}"
    );
    // The kernel unshared A's table of slot 1 (the VMA split): A faults every page of it
    // again, slot 0 not at all.
    let f = s.a.touch();
    assert!(
        (PAGES_PER_GIB - 2..=PAGES_PER_GIB + SHARED_FAULTS).contains(&f),
        "A faulted {f} times after the mprotect"
    );
    assert_eq!(
        s.a.load(GIB + 2 * MIB),
        s.b.load(GIB + 2 * MIB),
        "same data"
    );
    assert_eq!(s.a.load(GIB), 0xA002);
    s.others_keep_sharing("mprotect of one 2 MiB page");
    loud(&format!(
        "mprotect: A faulted {f} times in the unshared slot"
    ));
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn userfaultfd_write_protect_registration_unshares() {
    let Some((_pool, _dir)) = start("uffd_wp") else {
        return;
    };
    let mut s = Setup::new("uffd-wp");
    s.a.cmd("uffd_wp");
    let sa = s.attached(s.a.pid);
    assert_eq!(sa["sharing"], false, "{sa}");
    let unshared = sa["unshared"].as_array().unwrap();
    assert_eq!(unshared.len(), 2, "{sa}");
    for u in unshared {
        assert!(
            u["reason"].as_str().unwrap().contains("write-protect"),
            "{sa}"
        );
    }
    // Registration unshared every table of A (hugetlb_unshare_all_pmds).
    let f = s.a.touch();
    assert!(
        f >= 2 * PAGES_PER_GIB - 2,
        "A faulted {f} times after registering"
    );
    assert_eq!(s.a.load(GIB), 0xA002);
    s.others_keep_sharing("userfaultfd write-protect");
    loud(&format!("uffd-wp: A faulted {f} times for 2 GiB"));
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn madv_dontneed_keeps_data_and_sharing() {
    let Some((_pool, _dir)) = start("dontneed") else {
        return;
    };
    let mut s = Setup::new("dontneed");
    s.a.cmd(&format!("madvise 0 {} dontneed", 2 * MIB));
    // A shared mapping's data stays in the file; A's next fault links the tables again.
    assert_eq!(s.a.load(0), 0xA000);
    let f = s.a.touch();
    assert!(
        f <= SHARED_FAULTS,
        "A faulted {f} times after MADV_DONTNEED"
    );
    assert!(s.sharing(s.a.pid));
    s.others_keep_sharing("MADV_DONTNEED");
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn madv_remove_discards_for_everyone() {
    let Some((_pool, _dir)) = start("remove") else {
        return;
    };
    let mut s = Setup::new("remove");
    s.a.cmd(&format!("madvise {GIB} {} remove", 2 * MIB));
    // The page is punched out of the backing file: every attacher reads zero.
    assert_eq!(s.b.load(GIB), 0, "B reads the hole");
    assert_eq!(s.a.load(GIB), 0);
    assert_eq!(s.b.load(0), 0xA000, "the rest stays");
    assert!(s.sharing(s.a.pid));
    s.others_keep_sharing("MADV_REMOVE");
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn process_vm_readv_and_proc_mem_from_another_process() {
    let Some((_pool, _dir)) = start("remote_read") else {
        return;
    };
    let mut s = Setup::new("remote-read");
    let mut buf = [0u8; 8];
    let n =
        kernel_glue::vmops::process_vm_readv(s.a.pid, (s.a.addr + GIB) as usize, &mut buf).unwrap();
    assert_eq!(n, 8);
    assert_eq!(u64::from_ne_bytes(buf), 0xA002);
    let mem = std::fs::File::open(format!("/proc/{}/mem", s.a.pid)).unwrap();
    mem.read_exact_at(&mut buf, s.a.addr + GIB + 8).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), 0xA003);
    assert!(s.sharing(s.a.pid));
    s.others_keep_sharing("process_vm_readv and /proc/PID/mem");
}

#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn core_dump_of_an_attacher_leaves_the_region_out() {
    let Some((_pool, dir)) = start("coredump") else {
        return;
    };
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let uses_pid = std::fs::read_to_string("/proc/sys/kernel/core_uses_pid").unwrap();
    if pattern.starts_with('|') || pattern.contains('/') {
        let msg = format!(
            "core dumps go to {pattern:?}, not to the crashing process's directory: \
             this test cannot find the core file"
        );
        assert!(!in_ci(), "{msg}");
        loud(&format!("SKIPPED: {msg}"));
        return;
    }
    let mut s = Setup::new("coredump");
    let filter = std::fs::read_to_string(format!("/proc/{}/coredump_filter", s.a.pid)).unwrap();
    let filter = u64::from_str_radix(filter.trim(), 16).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    s.a.h
        .write_line(&format!("coredump {}", dir.path().display()))
        .unwrap();
    let status = s.a.h.wait(LIMIT).unwrap();
    assert_eq!(status.signal(), Some(6), "{status:?}");
    assert!(status.core_dumped(), "no core dumped: {status:?}");
    let name = if uses_pid.trim() == "1" {
        format!("{}.{}", pattern.trim(), s.a.pid)
    } else {
        pattern.trim().to_string()
    };
    let core = dir.path().join(name);
    let len = std::fs::metadata(&core).unwrap().len();
    loud(&format!(
        "core dump of an attacher of a {} GiB region: {} KiB (coredump_filter {filter:#x})",
        SIZE >> 30,
        len >> 10
    ));
    // Bit 6 (shared hugetlb) is off by default: the region is not in the core.
    assert_eq!(filter & (1 << 6), 0, "coredump_filter {filter:#x}");
    assert!(len < 64 * MIB, "core of {len} bytes");
    s.others_keep_sharing("core dump of A");
}

/// The `MSHAREFS_UNMAP` guard (`mshare::guard`), measured without the daemon: a "host"
/// process populates a 2 GiB hugetlbfs file at a 1 GiB boundary, an attacher maps it
/// there, the host punches out the first 2 MiB, the attacher touches it. For each
/// combination of guarded (userfaultfd missing mode with `SIGBUS`) and plain mappings:
/// whether the attacher shares the host's tables (its faults) and what the touch does.
#[test]
#[ignore = "needs root: mounts hugetlbfs, grows the huge-page pool"]
fn uffd_guard_keeps_sharing_only_between_guarded_mappings() {
    let Some((pool, _dir)) = start("uffd_guard") else {
        return;
    };
    let huge = HugetlbfsDir::new("uffd-guard").unwrap();
    let _grant = pool.grow(SIZE / (2 * MIB) + 8).unwrap();
    for (host_guard, att_guard) in [(false, false), (false, true), (true, true), (true, false)] {
        let what = format!("host guarded {host_guard}, attacher guarded {att_guard}");
        let file = huge.file("f");
        let fd = kernel_glue::fd::open(
            &file,
            kernel_glue::consts::O_RDWR | kernel_glue::consts::O_CREAT,
            0o600,
        )
        .unwrap();
        kernel_glue::fd::ftruncate(&fd, SIZE).unwrap();
        let mut host = Ops::start_raw("host", &file);
        host.cmd("populate");
        if host_guard {
            host.cmd("guard");
        }
        let mut att = Ops::start_raw("attacher", &file);
        if att_guard {
            att.cmd("guard");
        }
        let faults = att.touch();
        host.cmd(&format!("punch 0 {}", 2 * MIB));
        let read = att.try_cmd("read_into 0");
        att.h.write_line("load 0").unwrap();
        let touched = match att.h.read_json(LIMIT) {
            Ok(v) => format!("reads {}", v["value"]),
            Err(_) => {
                let st = att.h.wait(LIMIT).unwrap();
                format!("killed by signal {:?}", st.signal())
            }
        };
        loud(&format!(
            "{what}: attacher faults for 2 GiB {faults}; touch of the punched page: \
             {touched}; read(2) into it: {read}"
        ));
        if host_guard == att_guard {
            assert!(
                faults <= SHARED_FAULTS,
                "{what}: {faults} faults, not sharing"
            );
        } else {
            assert!(faults >= 2 * PAGES_PER_GIB - 2, "{what}: {faults} faults");
        }
        if att_guard {
            assert_eq!(touched, "killed by signal Some(7)", "{what}");
            assert_eq!(read["errno"], kernel_glue::errnos::EFAULT, "{what}: {read}");
        } else {
            assert_eq!(touched, "reads 0", "{what}");
            assert_eq!(read["bytes"], 8, "{what}: {read}");
        }
        drop(att);
        drop(host);
        drop(fd);
        std::fs::remove_file(&file).unwrap();
    }
}

/// `MSHAREFS_UNMAP` on a mount with `--unmap-guard` (`-o unmap_guard`): two attachers
/// through libmshare, which arms the guard on its own (`GET_INFO` says the mount guards),
/// share tables with the guarded host mappings; after `UNMAP` a touch of the range raises `SIGBUS`, a system call into it
/// fails with `EFAULT` (so does a FUSE `write` there), the rest of the region is
/// untouched, and `CREATE_MAPPING` makes the range usable again, zeroed. An unguarded
/// mapping (the backing file mapped directly) shares nothing with guarded ones, and stat
/// says why.
#[test]
#[ignore = "needs root: mounts msharefs, grows the huge-page pool"]
fn unmap_guard_signals_and_keeps_sharing() {
    use kernel_glue::consts::{
        MAP_ANONYMOUS, MAP_FIXED, MAP_SHARED, O_RDWR, PROT_READ, PROT_WRITE,
    };
    use mshare::uapi::{self, MshareCreate, MshareUnmap};
    let Some((_pool, _dir)) = start("unmap_guard") else {
        return;
    };
    let fs = Msharefs::mount("unmap-guard", &["--backing", "hugetlb", "--unmap-guard"]);
    let path = create_region(&fs);
    let fd = kernel_glue::fd::open(&path, O_RDWR, 0).unwrap();
    let mut create = MshareCreate {
        region_offset: 0,
        size: SIZE,
        offset: 0,
        prot: (PROT_READ | PROT_WRITE) as u32,
        flags: (MAP_SHARED | MAP_FIXED | MAP_ANONYMOUS) as u32,
        fd: u32::MAX,
        _pad: 0,
    };
    kernel_glue::fd::ioctl_ptr(&fd, uapi::MSHAREFS_CREATE_MAPPING, &mut create).unwrap();
    let mut a = Ops::start("A", &path);
    let mut b = Ops::start("B", &path);
    a.store(GIB, 0xBEEF);
    a.store(0, 0xF00D);
    let (fa, fb) = (a.touch(), b.touch());
    assert!(
        fa <= SHARED_FAULTS && fb <= SHARED_FAULTS,
        "guarded: {fa}, {fb} faults"
    );
    for o in [&a, &b] {
        let row = attached_row(&fs, o.pid);
        assert_eq!(row["sharing"], true, "{row}");
    }
    // An unguarded attacher's VMA lacks VM_UFFD_MISSING: it builds its own tables.
    let ino = std::fs::metadata(&path).unwrap().ino();
    let backing = fs.state_dir().join(format!("backing/hugetlb/{ino}"));
    let mut plain = Ops::start_raw("unguarded", &backing);
    let fp = plain.touch();
    let row = attached_row(&fs, plain.pid);
    assert_eq!(row["sharing"], false, "{row}");
    assert!(
        row["unshared"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("missing [um]"),
        "{row}"
    );
    assert!(fp >= 2 * PAGES_PER_GIB - 2, "unguarded: {fp} faults");
    drop(plain);

    let mut unmap = MshareUnmap {
        region_offset: GIB,
        size: 2 * MIB,
    };
    kernel_glue::fd::ioctl_ptr(&fd, uapi::MSHAREFS_UNMAP, &mut unmap).unwrap();
    let r = b.try_cmd(&format!("read_into {GIB}"));
    assert_eq!(r["errno"], kernel_glue::errnos::EFAULT, "{r}");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let w = file.write_at(&[1u8; 8], GIB).unwrap_err();
    assert_eq!(
        w.raw_os_error(),
        Some(kernel_glue::errnos::EFAULT),
        "FUSE write: {w}"
    );
    assert_eq!(b.load(0), 0xF00D, "outside the range");
    b.h.write_line(&format!("load {GIB}")).unwrap();
    assert!(b.h.read_json(LIMIT).is_err(), "B read the unmapped page");
    let status = b.h.wait(LIMIT).unwrap();
    assert_eq!(status.signal(), Some(7), "B: {status:?}");
    // The object again: the range is usable, zeroed, and A still shares.
    create.region_offset = GIB;
    create.size = 4096;
    kernel_glue::fd::ioctl_ptr(&fd, uapi::MSHAREFS_CREATE_MAPPING, &mut create).unwrap();
    assert_eq!(a.load(GIB), 0);
    let fa = a.touch();
    assert!(fa <= SHARED_FAULTS, "A after the new object: {fa} faults");
    loud(&format!(
        "unmap guard: guarded attachers {fb} faults for 2 GiB, an unguarded one {fp}; \
         touch after UNMAP: SIGBUS; read(2): EFAULT"
    ));
}
