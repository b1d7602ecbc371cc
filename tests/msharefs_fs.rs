//! The msharefs file system through a real mount, with real processes: the kernel v3 usage
//! sequence, every documented errno, crash recovery, permissions, and purge.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kernel_glue::consts::*;
use kernel_glue::errnos::*;
use kernel_glue::fd as kfd;
use kernel_glue::mapping::{Mapping, Protection};
use mshare::Backing;
use mshare::uapi::{self, MshareCreate, MshareUnmap};
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{
    Attach, Helper, PoolGuard, PoolState, Probe, SETTLE, loud, probe_bin, require_privileged,
};

const MIB: u64 = 1 << 20;

fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("errno"),
    }
}

fn create(path: &Path) -> io::Result<OwnedFd> {
    kfd::open(path, O_RDWR | O_CREAT | O_EXCL, 0o600)
}

fn anon_object(offset: u64, size: u64) -> MshareCreate {
    MshareCreate {
        region_offset: offset,
        size,
        offset: 0,
        prot: (PROT_READ | PROT_WRITE) as u32,
        flags: (MAP_SHARED | MAP_FIXED | MAP_ANONYMOUS) as u32,
        fd: u32::MAX,
        _pad: 0,
    }
}

fn create_object(fd: &OwnedFd, req: MshareCreate) -> io::Result<i32> {
    let mut req = req;
    kfd::ioctl_ptr(fd, uapi::MSHAREFS_CREATE_MAPPING, &mut req)
}

fn unmap_object(fd: &OwnedFd, offset: u64, size: u64) -> io::Result<i32> {
    let mut req = MshareUnmap {
        region_offset: offset,
        size,
    };
    kfd::ioctl_ptr(fd, uapi::MSHAREFS_UNMAP, &mut req)
}

/// The attacher of the v3 sequence, as a separate process (Python's `mmap` is a thin
/// wrapper over mmap(2)): maps the region, checks the creator's word, writes its own,
/// then waits for a line on stdin and reports the first word again.
const PY_ATTACHER: &str = r#"
import mmap, os, struct, sys
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
assert os.fstat(fd).st_size == size, os.fstat(fd).st_size
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
print("seen %x" % struct.unpack_from("Q", m, 0)[0], flush=True)
struct.pack_into("Q", m, 8192, 0xA77AC4E5)
print("wrote", flush=True)
sys.stdin.readline()
print("after %x" % struct.unpack_from("Q", m, 0)[0], flush=True)
"#;

fn v3_sequence(backing: &str) {
    if !require_privileged("v3_sequence") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount(&format!("v3-{backing}"), &["--backing", backing]);
    let info = std::fs::read_to_string(fs.path("mshare_info")).unwrap();
    assert_eq!(info, "1073741824\n");

    // Creator: create, size, object, map, write.
    let size = 64 * MIB;
    let path = fs.path("region");
    let fd = create(&path).unwrap();
    kfd::ftruncate(&fd, size).unwrap();
    assert_eq!(kfd::fstat(&fd).unwrap().size, size);
    create_object(&fd, anon_object(0, 4 * MIB)).unwrap();
    // 2 MiB-aligned, so a thp region can be mapped with huge pages.
    let m = Mapping::map_aligned(&fd, size, Protection::ReadWrite, 2 * MIB).unwrap();
    m.store_u64(0, 0xC0FFEE).unwrap();

    // Attacher: a separate process.
    let mut py = Helper::spawn(
        "attacher",
        Path::new("python3"),
        ["-c", PY_ATTACHER, path.to_str().unwrap(), &size.to_string()],
    )
    .unwrap();
    assert_eq!(
        py.read_line(Duration::from_secs(20)).unwrap(),
        "seen c0ffee"
    );
    assert_eq!(py.read_line(Duration::from_secs(20)).unwrap(), "wrote");
    assert_eq!(
        m.load_u64(8192).unwrap(),
        0xA77AC4E5,
        "creator sees the attacher's write"
    );

    // UNMAP discards the object's contents in every attacher.
    unmap_object(&fd, 0, 4 * MIB).unwrap();
    assert_eq!(m.load_u64(0).unwrap(), 0);
    py.close_stdin();
    assert_eq!(py.read_line(Duration::from_secs(20)).unwrap(), "after 0");
    py.finish(Duration::from_secs(20)).unwrap();

    if backing == "thp" {
        // Passthrough to tmpfs huge=always: PMD-mapped, so 2 MiB pages.
        m.populate(0, size).unwrap();
        let pmd = kernel_glue::procfs::smaps_field(std::process::id(), m.addr(), "ShmemPmdMapped")
            .unwrap();
        loud(&format!(
            "thp region: ShmemPmdMapped {} of {} MiB",
            pmd >> 20,
            size >> 20
        ));
        assert_eq!(pmd, size, "thp region is not fully PMD-mapped");
    }
    drop(m);
    std::fs::remove_file(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(fs.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("mshare_info")]);
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn v3_sequence_shmem() {
    v3_sequence("shmem");
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn v3_sequence_thp() {
    v3_sequence("thp");
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn every_error_has_its_errno() {
    if !require_privileged("every_error_has_its_errno") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("errors", &["--backing", "hugetlb"]);
    let p = fs.path("r");
    let fd = create(&p).unwrap();
    // Object before the size is set.
    assert_eq!(errno(create_object(&fd, anon_object(0, 2 * MIB))), EINVAL);
    assert_eq!(errno(unmap_object(&fd, 0, 2 * MIB)), EINVAL);
    // Bad sizes.
    assert_eq!(errno(kfd::ftruncate(&fd, 0)), EINVAL);
    assert_eq!(
        errno(kfd::ftruncate(&fd, MIB)),
        EINVAL,
        "not a multiple of 2 MiB"
    );
    assert_eq!(
        errno(kfd::ftruncate(&fd, i64::MAX as u64 & !(2 * MIB - 1))),
        ENOMEM
    );
    assert_eq!(
        errno(kfd::fallocate(&fd, 4096, 2 * MIB)),
        EINVAL,
        "offset must be 0"
    );
    assert_eq!(
        kfd::fstat(&fd).unwrap().size,
        0,
        "failed calls changed nothing"
    );
    // Backing choice.
    assert_eq!(
        errno(kfd::setxattr(&p, uapi::BACKING_XATTR, b"bogus", 0)),
        EINVAL
    );
    assert_eq!(errno(kfd::setxattr(&p, "user.other", b"x", 0)), EOPNOTSUPP);
    // Not while the region is open: an open answered for one backing must not meet
    // another (the kernel would fail it with EIO).
    assert_eq!(
        errno(kfd::setxattr(&p, uapi::BACKING_XATTR, b"thp", 0)),
        EBUSY,
        "backing change while open"
    );
    assert_eq!(kfd::getxattr(&p, uapi::BACKING_XATTR).unwrap(), b"hugetlb");
    // The size, once.
    kfd::fallocate(&fd, 0, 8 * MIB).unwrap();
    assert_eq!(kfd::fstat(&fd).unwrap().size, 8 * MIB);
    assert_eq!(errno(kfd::ftruncate(&fd, 16 * MIB)), EINVAL, "second size");
    assert_eq!(
        errno(kfd::setxattr(&p, uapi::BACKING_XATTR, b"thp", 0)),
        EBUSY
    );
    // Objects.
    let mut no_fixed = anon_object(0, 2 * MIB);
    no_fixed.flags = (MAP_SHARED | MAP_ANONYMOUS) as u32;
    assert_eq!(errno(create_object(&fd, no_fixed)), EINVAL);
    let mut private = anon_object(0, 2 * MIB);
    private.flags = (MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS) as u32;
    assert_eq!(errno(create_object(&fd, private)), EINVAL);
    let mut file_backed = anon_object(0, 2 * MIB);
    file_backed.flags = (MAP_SHARED | MAP_FIXED) as u32;
    assert_eq!(errno(create_object(&fd, file_backed)), EOPNOTSUPP);
    assert_eq!(
        errno(create_object(&fd, anon_object(8 * MIB, 2 * MIB))),
        EINVAL,
        "past end"
    );
    assert_eq!(
        errno(create_object(&fd, anon_object(4096, 2 * MIB))),
        EINVAL,
        "unaligned"
    );
    assert_eq!(
        errno(create_object(&fd, anon_object(2 * MIB, u64::MAX - MIB))),
        EINVAL,
        "overflow"
    );
    assert_eq!(
        errno(create_object(&fd, anon_object(0, 0))),
        EINVAL,
        "empty"
    );
    create_object(&fd, anon_object(2 * MIB, 4 * MIB)).unwrap();
    assert_eq!(
        errno(create_object(&fd, anon_object(0, 4 * MIB))),
        EEXIST,
        "overlap"
    );
    assert_eq!(
        errno(unmap_object(&fd, 0, 10 * MIB)),
        EINVAL,
        "unmap past end"
    );
    assert_eq!(
        errno(unmap_object(&fd, u64::MAX - MIB, 4 * MIB)),
        EINVAL,
        "unmap overflow"
    );
    let mut unknown = 0u64;
    assert_eq!(
        errno(kfd::ioctl_ptr(&fd, 0x4008_7805, &mut unknown)),
        ENOTTY
    );
    // A read-only handle may not change contents.
    let ro = kfd::open(&p, O_RDONLY, 0).unwrap();
    assert_eq!(errno(create_object(&ro, anon_object(0, 2 * MIB))), EBADF);
    // hugetlb regions are not mmappable through FUSE.
    assert_eq!(
        errno(Mapping::map_aligned(
            &fd,
            8 * MIB,
            Protection::ReadWrite,
            4096
        )),
        ENODEV
    );
    // Names and the info file.
    assert_eq!(errno(create(&fs.path("r"))), EEXIST);
    assert_eq!(errno(create(&fs.path(&"n".repeat(256)))), ENAMETOOLONG);
    create(&fs.path(&"n".repeat(255))).unwrap();
    // Names that are not UTF-8 cannot be stored (EINVAL), so none exists (ENOENT).
    let bad = fs
        .mountpoint()
        .join(std::ffi::OsStr::from_bytes(b"bad\x80name"));
    assert_eq!(errno(std::fs::metadata(&bad)), ENOENT, "lookup");
    assert_eq!(errno(std::fs::remove_file(&bad)), ENOENT, "unlink");
    assert_eq!(errno(std::fs::remove_dir(&bad)), ENOENT, "rmdir");
    assert_eq!(
        errno(std::fs::rename(&bad, fs.path("x"))),
        ENOENT,
        "rename from"
    );
    assert_eq!(errno(create(&bad)), EINVAL, "create");
    assert_eq!(errno(std::fs::create_dir(&bad)), EINVAL, "mkdir");
    assert_eq!(errno(std::fs::rename(&p, &bad)), EINVAL, "rename to");
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        8 * MIB,
        "rename changed nothing"
    );
    assert_eq!(errno(std::fs::remove_file(fs.path("mshare_info"))), EPERM);
    assert_eq!(
        errno(std::fs::rename(fs.path("mshare_info"), fs.path("x"))),
        EPERM
    );
    assert_eq!(errno(std::fs::rename(&p, fs.path("mshare_info"))), EPERM);
    assert_eq!(errno(kfd::open(&fs.path("mshare_info"), O_RDWR, 0)), EACCES);
    std::fs::create_dir(fs.path("d")).unwrap();
    create(&fs.path("d/inner")).unwrap();
    assert_eq!(errno(std::fs::remove_dir(fs.path("d"))), ENOTEMPTY);
    assert_eq!(errno(std::fs::remove_file(fs.path("d"))), EISDIR);
    assert_eq!(
        errno(std::fs::rename(fs.path("d"), fs.path("d/inner2"))),
        EINVAL
    );
    // The daemon still serves.
    assert_eq!(
        std::fs::read_to_string(fs.path("mshare_info")).unwrap(),
        "1073741824\n"
    );
    std::fs::rename(&p, fs.path("d/moved")).unwrap();
    assert_eq!(
        std::fs::metadata(fs.path("d/moved")).unwrap().len(),
        8 * MIB
    );
}

/// Python writer: maps a region and writes a counter into every 4 KiB page, round after
/// round, until stdin closes; then prints the sha256 of its view of the region.
const PY_WRITER: &str = r#"
import hashlib, mmap, os, struct, sys, threading
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
n = 0
print("writing", flush=True)
while not stop.is_set():
    n += 1
    for off in range(0, size, 4096):
        struct.pack_into("QQ", m, off, n, off)
print("rounds %d sha256 %s" % (n, hashlib.sha256(m[:]).hexdigest()), flush=True)
"#;

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn kill9_of_the_daemon_loses_nothing() {
    if !require_privileged("kill9_of_the_daemon_loses_nothing") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("kill9", &["--backing", "hugetlb"]);
    let size = 32 * MIB;
    // A thp region written through a passthrough mapping, non-stop.
    let thp = fs.path("thp");
    drop(create(&thp).unwrap());
    mshare::set_backing(&thp, Backing::Thp).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&thp)
        .unwrap()
        .set_len(size)
        .unwrap();
    let mut writer = Helper::spawn(
        "writer",
        Path::new("python3"),
        ["-c", PY_WRITER, thp.to_str().unwrap(), &size.to_string()],
    )
    .unwrap();
    assert_eq!(
        writer.read_line(Duration::from_secs(20)).unwrap(),
        "writing"
    );
    // A hugetlb region attached through libmshare, pattern written, mapping held.
    let huge = fs.path("huge");
    drop(create(&huge).unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&huge)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut holder = Probe::spawn(
        probe_bin!(),
        &Attach::new(&huge, Protection::ReadWrite)
            .write_pattern(77)
            .hold(),
    )
    .unwrap();
    holder.report().unwrap();

    std::thread::sleep(Duration::from_millis(300));
    fs.kill9();
    // A request that meets the kernel aborting the connection gets ECONNABORTED, later
    // ones ENOTCONN.
    let dead = errno(std::fs::metadata(fs.path("thp")));
    assert!(dead == ENOTCONN || dead == ECONNABORTED, "errno {dead}");
    std::thread::sleep(Duration::from_millis(300));
    fs.start();

    // The writer never noticed; its final view equals the file's contents.
    writer.close_stdin();
    let line = writer.read_line(Duration::from_secs(60)).unwrap();
    writer.finish(Duration::from_secs(20)).unwrap();
    let want = line.rsplit(' ').next().unwrap().to_string();
    let got = Command::new("sha256sum")
        .arg(&thp)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&got.stdout);
    loud(&format!(
        "kill -9 during writes: writer {line}; file sha256 {got}"
    ));
    assert_eq!(
        got.split(' ').next().unwrap(),
        want,
        "thp contents differ after restart"
    );

    // The hugetlb pattern survived, seen by a new attacher on the new daemon.
    let check = Probe::run(
        probe_bin!(),
        &Attach::new(&huge, Protection::ReadOnly).check_pattern(77),
    )
    .unwrap();
    assert_eq!(check.pattern_ok, Some(true));
    holder.finish().unwrap();
}

/// The system's Python, which other users can run (a per-user install under /root is not
/// reachable for them); `.ci/run` installs it.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

fn as_nobody(script: &str, args: &[&str]) -> String {
    assert!(
        Path::new(SYSTEM_PYTHON).exists(),
        "{SYSTEM_PYTHON} is missing (apt-get install python3)"
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-c",
            script,
        ])
        .args(args)
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Tries open modes and a writable mapping as another user; prints the outcome of each.
const PY_ACCESS: &str = r#"
import errno, mmap, os, sys
def try_(f):
    try:
        f(); return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
p = sys.argv[1]
res = [try_(lambda: os.close(os.open(p, os.O_RDONLY))), try_(lambda: os.close(os.open(p, os.O_RDWR)))]
def map_rw():
    fd = os.open(p, os.O_RDONLY)
    mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
def map_ro():
    fd = os.open(p, os.O_RDONLY)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    assert m[0:4] == b"root"
res += [try_(map_rw), try_(map_ro), try_(lambda: os.truncate(p, 8 << 20)), try_(lambda: os.unlink(p))]
print(" ".join(res))
"#;

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn permissions_are_enforced_for_other_users() {
    if !require_privileged("permissions_are_enforced_for_other_users") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("perms", &["--backing", "shmem"]);
    let p = fs.path("private");
    let fd = create(&p).unwrap();
    kfd::ftruncate(&fd, 4 * MIB).unwrap();
    let m = Mapping::map_aligned(&fd, 4 * MIB, Protection::ReadWrite, 4096).unwrap();
    m.write_at(0, b"root").unwrap();
    let ps = p.to_str().unwrap();
    // 0600: nothing at all (unlink: EPERM, the root directory is sticky).
    assert_eq!(
        as_nobody(PY_ACCESS, &[ps]),
        "EACCES EACCES EACCES EACCES EACCES EPERM"
    );
    // 0644: read and read-only mappings; no writes, no resize, no unlink (sticky root).
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    assert_eq!(
        as_nobody(PY_ACCESS, &[ps]),
        "ok EACCES EACCES ok EACCES EPERM"
    );
    // The backing file carries the same mode and owner.
    let st = kfd::stat(&p).unwrap();
    assert_eq!(st.mode & 0o7777, 0o644);
    assert_eq!(st.uid, 0);
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn purge_leaves_no_mounts_and_restores_the_pool() {
    if !require_privileged("purge_leaves_no_mounts_and_restores_the_pool") {
        return;
    }
    let pool = PoolGuard::new();
    let before = pool.before().nr_hugepages;
    let fs = Msharefs::mount("purge", &["--backing", "hugetlb"]);
    let fd = create(&fs.path("r")).unwrap();
    kfd::ftruncate(&fd, 64 * MIB).unwrap();
    drop(fd);
    assert_eq!(kernel_glue::hugepages::nr_hugepages().unwrap(), before + 32);
    assert!(fs.umount(true));
    assert!(
        fs.leftover_mounts().is_empty(),
        "{:?}",
        fs.leftover_mounts()
    );
    assert_eq!(kernel_glue::hugepages::nr_hugepages().unwrap(), before);
    assert!(!fs.state_dir().exists());
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn read_and_write_through_the_file_match_the_mapping() {
    if !require_privileged("read_and_write_through_the_file_match_the_mapping") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("rw-file", &["--backing", "hugetlb"]);
    let size = 4 * MIB;
    let p = fs.path("data");
    let region = mshare::Region::create(&p, size, 0o600, mshare::Backing::Hugetlb).unwrap();
    let att = region.attach(Protection::ReadWrite).unwrap();
    // write(2) through msharefs (hugetlbfs itself has no write): seen in the mapping.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"written by pwrite", 3 * MIB + 100).unwrap();
    let mut buf = [0u8; 17];
    att.mapping().read_at(3 * MIB + 100, &mut buf).unwrap();
    assert_eq!(&buf, b"written by pwrite");
    // The mapping's writes are what read(2) and cp see.
    att.mapping()
        .write_at(4096, b"written by the mapping")
        .unwrap();
    let copy = std::fs::read(&p).unwrap();
    assert_eq!(copy.len() as u64, size);
    assert_eq!(&copy[4096..4096 + 22], b"written by the mapping");
    assert_eq!(
        &copy[(3 * MIB + 100) as usize..][..17],
        b"written by pwrite"
    );
    // Regions do not grow.
    assert_eq!(errno(f.write_all_at(b"x", size)), ENOSPC);
    let partial = f.write_at(b"abcdef", size - 3).unwrap();
    assert_eq!(partial, 3);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), size);
}

/// Python creator that dies mid-create: sizes a region under libmshare's temporary name
/// (as `Region::create` does before its rename), then waits to be killed.
const PY_HALF_CREATE: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(fd, int(sys.argv[2]))
print("sized", flush=True)
sys.stdin.read()
"#;

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn a_creator_killed_before_naming_its_region_leaks_no_memory() {
    if !require_privileged("a_creator_killed_before_naming_its_region_leaks_no_memory") {
        return;
    }
    let pool = PoolGuard::new();
    let before = pool.before().nr_hugepages;
    let fs = Msharefs::mount("half-create", &["--backing", "hugetlb"]);
    let hidden = fs.path(&format!("{}4242.0", uapi::CREATING_PREFIX));
    let mut creator = Helper::spawn(
        "half creator",
        Path::new("python3"),
        [
            "-c",
            PY_HALF_CREATE,
            hidden.to_str().unwrap(),
            &(8 * MIB).to_string(),
        ],
    )
    .expect("spawn creator");
    assert_eq!(creator.read_line(Duration::from_secs(30)).unwrap(), "sized");
    assert_eq!(kernel_glue::hugepages::nr_hugepages().unwrap(), before + 4);
    // A region with a plain name outlives its creator; one under the temporary name
    // whose size is not set holds no memory and stays too (its creator may be between
    // choosing the backing and opening it again).
    drop(kfd::ftruncate(create(&fs.path("kept")).unwrap(), 4 * MIB));
    let not_sized = fs.path(&format!("{}4242.1", uapi::CREATING_PREFIX));
    drop(create(&not_sized).unwrap());
    creator.kill().unwrap();
    let gone = Instant::now() + Duration::from_secs(10);
    while kfd::stat(&hidden).is_ok() && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        errno(kfd::stat(&hidden)),
        ENOENT,
        "abandoned region removed"
    );
    let pool_now = PoolState::wait_until(SETTLE, |s| s.nr_hugepages == before + 2);
    assert_eq!(
        pool_now.nr_hugepages,
        before + 2,
        "its 4 huge pages given back"
    );
    assert_eq!(kfd::stat(&fs.path("kept")).unwrap().size, 4 * MIB);
    assert_eq!(kfd::stat(&not_sized).unwrap().size, 0);
    assert!(fs.log().contains("its creator closed it before naming it"));
}

/// `MSHAREFS_UNMAP` of a hugetlb region while the pool has surplus pages (pages of a
/// removed region a process still maps, given back to the pool) used to punch a hole
/// whose page the kernel then freed to the system, fail the re-allocation with `ENOSPC`
/// and leave the range unreserved: attachers touching it got `SIGBUS` (found by the
/// hostile fuzzer). Discarding now zeroes the range in place: the call succeeds, the
/// range reads as zero, everything else is intact, and an attacher can touch all of it.
#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn unmap_while_the_pool_has_surplus_pages_keeps_the_range_reserved() {
    if !require_privileged("unmap_while_the_pool_has_surplus_pages_keeps_the_range_reserved") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("surplus", &["--backing", "hugetlb"]);
    let (x, y) = (fs.path("x"), fs.path("y"));
    let keep = mshare::Region::create(&x, 4 * MIB, 0o600, Backing::Hugetlb).unwrap();
    let gone = mshare::Region::create(&y, 4 * MIB, 0o600, Backing::Hugetlb).unwrap();
    let held = gone.attach(Protection::ReadWrite).unwrap();
    held.mapping().store_u64(0, 1).unwrap();
    drop(gone);
    std::fs::remove_file(&y).unwrap();
    // The daemon removes y at its last release and gives its pages back while `held`
    // still maps them: they become surplus.
    let deadline = Instant::now() + Duration::from_secs(10);
    while PoolState::read().surplus == 0 {
        assert!(Instant::now() < deadline, "no surplus pages appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = keep.attach(Protection::ReadWrite).unwrap();
    a.mapping().store_u64(8, 0xdead).unwrap();
    a.mapping().store_u64(2 * MIB, 0xbeef).unwrap();
    keep.unmap(0, 2 * MIB).expect("unmap with surplus pages");
    assert_eq!(
        a.mapping().load_u64(8).unwrap(),
        0,
        "discarded range not zero"
    );
    assert_eq!(
        a.mapping().load_u64(2 * MIB).unwrap(),
        0xbeef,
        "outside the range"
    );
    // A new attacher faults in every page of the region: none may be missing.
    let r = Probe::run(probe_bin!(), &Attach::new(&x, Protection::ReadOnly).touch())
        .expect("attach and touch all of x");
    assert_eq!(r.touched, Some(2));
    drop(held);
}
