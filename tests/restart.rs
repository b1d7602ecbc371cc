//! Crash-transparent clients: the daemon is killed with `kill -9` while this process and
//! probe processes hold descriptors, libmshare handles (Rust and C) and mappings of one
//! region of each backing (hugetlb, thp, shmem), and started again on the same state
//! directory. The kernel is the oracle for what a client sees:
//!
//! - writes through every mapping continue while the daemon is down and after;
//! - `fstat` of a descriptor opened before the crash answers while the daemon is down
//!   and after it is back, with the region's size;
//! - `close` of such a descriptor returns 0, down and back;
//! - while the daemon is down, an attach and the object ioctls through a libmshare handle
//!   fail with `ENOTCONN`; once it is back they succeed through the *old* handles (Rust
//!   `Region` and the C ABI), which reopen the region by path, and the new attachments
//!   are the same memory as the old ones;
//! - the probes' data patterns verify through the new daemon, and the holding probes exit
//!   cleanly (no `SIGBUS`).

use std::ffi::{CString, c_void};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kernel_glue::consts::*;
use kernel_glue::errnos::*;
use kernel_glue::fd as kfd;
use mshare::ffi::*;
use mshare::{Backing, Protection, Region};
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::{Attach, PoolGuard, Probe, loud, probe_bin, require_privileged};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const BACKINGS: [&str; 3] = ["hugetlb", "thp", "shmem"];

/// What this process holds of one region.
struct Held {
    backing: &'static str,
    path: PathBuf,
    /// A plain descriptor, as a C program would hold it.
    file: Option<OwnedFd>,
    /// A second one, closed while the daemon is down.
    spare: Option<OwnedFd>,
    /// A libmshare handle.
    region: Region,
    /// A C ABI handle and its attachment (written by the writer thread).
    c: *mut mshare_region,
    addr: usize,
    /// A probe process holding a patterned attachment.
    probe: Option<Probe>,
    seed: u64,
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Reads the word at byte `off` of a mapping at `addr` (volatile: other threads and
/// processes write it).
fn load(addr: usize, off: u64) -> u64 {
    // SAFETY: `addr` is a live attachment of SIZE bytes, `off + 8 <= SIZE`, 8-aligned.
    unsafe { ptr::read_volatile((addr + off as usize) as *const u64) }
}

fn store(addr: usize, off: u64, v: u64) {
    // SAFETY: as in `load`; the attachment is read-write.
    unsafe { ptr::write_volatile((addr + off as usize) as *mut u64, v) }
}

/// The writer's counter (word 0 of each attachment: the probes' pattern leaves the first
/// word of every stride alone).
const COUNTER: u64 = 0;
/// A word written through a new attachment and read through the old one.
const MARKER: u64 = 16;

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn descriptors_handles_and_mappings_survive_kill9_of_the_daemon() {
    if !require_privileged("descriptors_handles_and_mappings_survive_kill9_of_the_daemon") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("restart", &["--backing", "hugetlb"]);
    let rw = PROT_READ | PROT_WRITE;

    let mut held: Vec<Held> = Vec::new();
    for (i, backing) in BACKINGS.into_iter().enumerate() {
        let path = fs.path(&format!("r-{backing}"));
        drop(
            Region::create(&path, SIZE, 0o600, Backing::from_name(backing).unwrap())
                .unwrap_or_else(|e| panic!("create {backing} region: {e}")),
        );
        let file = kfd::open(&path, O_RDWR, 0).expect("open");
        let spare = kfd::open(&path, O_RDONLY, 0).expect("open");
        let region = Region::open(&path, O_RDWR).expect("Region::open");
        region
            .create_mapping(0, 2 * MIB, rw)
            .unwrap_or_else(|e| panic!("{backing}: object before the crash: {e}"));
        let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut c: *mut mshare_region = ptr::null_mut();
        // SAFETY: valid C string and out-pointer.
        assert_eq!(unsafe { mshare_open(cpath.as_ptr(), O_RDWR, &mut c) }, 0);
        let mut addr: *mut c_void = ptr::null_mut();
        // SAFETY: live handle, valid out-pointer.
        assert_eq!(unsafe { mshare_attach(c, rw, &mut addr) }, 0, "{backing}");
        let seed = 0x5eed_0000 + i as u64;
        let mut probe = Probe::spawn(
            probe_bin!(),
            &Attach::new(&path, Protection::ReadWrite)
                .write_pattern(seed)
                .hold(),
        )
        .expect("spawn probe");
        let r = probe.report().expect("probe attaches");
        assert!(r.pattern_written);
        held.push(Held {
            backing,
            path,
            file: Some(file),
            spare: Some(spare),
            region,
            c,
            addr: addr as usize,
            probe: Some(probe),
            seed,
        });
    }

    // One thread keeps writing through every C attachment, as a database would.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let addrs: Vec<usize> = held.iter().map(|h| h.addr).collect();
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                for &a in &addrs {
                    store(a, COUNTER, n);
                }
                writes.store(n, Ordering::Relaxed);
                if n % 1024 == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        })
    };
    let watched: Vec<(&str, usize)> = held.iter().map(|h| (h.backing, h.addr)).collect();
    let progressed = |what: &str| {
        let before = writes.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        let after = writes.load(Ordering::Relaxed);
        assert!(after > before, "writes stopped {what}");
        for &(backing, addr) in &watched {
            let seen = load(addr, COUNTER);
            assert!(
                seen >= before,
                "{backing}: counter {seen} < {before} {what}"
            );
        }
    };
    progressed("before the crash");

    fs.kill9();
    loud("restart: daemon killed with SIGKILL");
    progressed("while the daemon is down");
    for h in &mut held {
        let b = h.backing;
        let st = kfd::fstat(h.file.as_ref().unwrap());
        assert_eq!(
            st.as_ref().map(|s| s.size).ok(),
            Some(SIZE),
            "{b}: fstat down: {st:?}"
        );
        assert_eq!(
            kfd::close(h.spare.take().unwrap()).map_err(|e| e.raw_os_error()),
            Ok(()),
            "{b}: close while the daemon is down"
        );
        // What cannot work while the daemon is down: a new attach and the object ioctls
        // (they need the daemon); they say so with ENOTCONN.
        assert_eq!(
            errno_of(h.region.attach(Protection::ReadWrite)),
            Some(ENOTCONN),
            "{b}: attach while down"
        );
        assert_eq!(
            errno_of(h.region.create_mapping(2 * MIB, 2 * MIB, rw)),
            Some(ENOTCONN),
            "{b}: object while down"
        );
        let mut addr: *mut c_void = ptr::null_mut();
        // SAFETY: live handle, valid out-pointer.
        let rc = unsafe { mshare_attach(h.c, rw, &mut addr) };
        assert_eq!(rc, -ENOTCONN, "{b}: C attach while down");
    }

    fs.start();
    loud("restart: daemon started again on the same state directory");
    progressed("after the restart");
    for h in &mut held {
        let b = h.backing;
        // The probes' data, checked by a new attacher through the new daemon.
        let r = Probe::run(
            probe_bin!(),
            &Attach::new(&h.path, Protection::ReadOnly).check_pattern(h.seed),
        )
        .unwrap_or_else(|e| panic!("{b}: check probe: {e}"));
        assert_eq!(
            r.pattern_ok,
            Some(true),
            "{b}: pattern after restart: {r:?}"
        );
        h.probe
            .take()
            .unwrap()
            .finish()
            .unwrap_or_else(|e| panic!("{b}: holding probe did not exit cleanly: {e}"));

        let st = kfd::fstat(h.file.as_ref().unwrap());
        assert_eq!(
            st.as_ref().map(|s| s.size).ok(),
            Some(SIZE),
            "{b}: fstat back: {st:?}"
        );

        // A new attach through the old C handle: the same memory as the old attachment.
        let mut addr: *mut c_void = ptr::null_mut();
        // SAFETY: live handle, valid out-pointer.
        let rc = unsafe { mshare_attach(h.c, rw, &mut addr) };
        assert_eq!(rc, 0, "{b}: C attach after the restart: {rc}");
        let marker = 0xfeed_0000 + h.seed;
        store(addr as usize, MARKER, marker);
        assert_eq!(
            load(h.addr, MARKER),
            marker,
            "{b}: new attachment is other memory"
        );
        assert!(load(addr as usize, COUNTER) > 0, "{b}: counter not seen");
        // SAFETY: `addr` came from mshare_attach on this handle.
        assert_eq!(unsafe { mshare_detach(h.c, addr) }, 0);

        // The same through the old Rust handle, and the object ioctls through both.
        let a = h
            .region
            .attach(Protection::ReadWrite)
            .unwrap_or_else(|e| panic!("{b}: Region::attach after the restart: {e}"));
        assert_eq!(a.mapping().load_u64(MARKER).unwrap(), marker, "{b}");
        drop(a);
        h.region
            .create_mapping(2 * MIB, 2 * MIB, rw)
            .unwrap_or_else(|e| panic!("{b}: create_mapping after the restart: {e}"));
        h.region
            .unmap(2 * MIB, 2 * MIB)
            .unwrap_or_else(|e| panic!("{b}: unmap after the restart: {e}"));
        // SAFETY: live handle.
        unsafe {
            assert_eq!(mshare_create_mapping(h.c, 4 * MIB, 2 * MIB, rw), 0, "{b}");
            assert_eq!(mshare_unmap(h.c, 4 * MIB, 2 * MIB), 0, "{b}");
        }
        // The object made before the crash is still there: creating it again overlaps.
        assert_eq!(
            errno_of(h.region.create_mapping(0, 2 * MIB, rw)),
            Some(EEXIST),
            "{b}: the object from before the crash is gone"
        );

        assert_eq!(
            kfd::close(h.file.take().unwrap()).map_err(|e| e.raw_os_error()),
            Ok(()),
            "{b}: close after the restart"
        );
    }

    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let total = writes.load(Ordering::Relaxed);
    for h in &held {
        assert_eq!(
            load(h.addr, COUNTER),
            total,
            "{}: last write lost",
            h.backing
        );
    }
    for h in held {
        // SAFETY: live handles; their attachments are detached, then the handles closed.
        unsafe {
            assert_eq!(mshare_detach(h.c, h.addr as *mut c_void), 0);
            mshare_close(h.c);
        }
    }
    let log = fs.log();
    assert!(!log.contains("panicked"), "daemon panicked:\n{log}");
    loud(&format!(
        "restart: {total} writes through 3 attachments across kill -9 and restart; fstat, \
         close, attach and object ioctls through pre-crash descriptors all answered"
    ));
}
