//! Hostile input against a real mount: a seeded fuzzer drives ioctl payloads (the real
//! command numbers with structured and raw payloads, and random command numbers), names
//! (empty, `.`, `..`, `/`, 255 and 256 bytes, invalid UTF-8), sizes (0, unaligned, huge,
//! overflowing offset + size), extended attributes and random operation sequences. After
//! every call: the daemon is alive, the call returned or failed with an errno, and a failed
//! call changed nothing (the persisted tree and the contents of the fixture regions are
//! compared before and after). Every 100 calls the daemon must answer `statfs` and its
//! in-memory view (the `stat` report) must match the persisted tree. A watchdog fails the
//! test when one call takes longer than 30 s (a hang), printing the daemon's thread stacks.
//!
//! The attach socket gets its own test: garbage, no descriptor, foreign descriptors, a
//! descriptor of another msharefs mount, a directory, `O_WRONLY`, `O_PATH`, several
//! descriptors at once, thousands of idle connections.
//!
//! `MSHAREFS_FUZZ_CASES` (default 3000) and `MSHAREFS_FUZZ_SEED` control the fuzzer.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kernel_glue::consts::*;
use kernel_glue::errnos::*;
use kernel_glue::fd as kfd;
use kernel_glue::mapping::{Mapping, Protection};
use mshare::uapi::{self, MshareCreate};
use mshare::{Attachment, Backing, Region};
use msharefs_tests::mountguard::Msharefs;
use msharefs_tests::seeded::{Rng, env_u64, seed};
use msharefs_tests::{PoolGuard, loud, require_privileged, thread_stacks};

const MIB: u64 = 1 << 20;
const HUGE: u64 = 2 * MIB;

/// Raw calls the kernel-glue wrappers deliberately do not offer: any ioctl command with a
/// buffer big enough for any size the command can encode, and xattr calls with a chosen
/// buffer size.
mod sys {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// `_IOC_SIZE` is 14 bits: no command can make the kernel copy more than this.
    pub const IOCTL_BUF: usize = 1 << 14;

    fn ret(r: libc::c_long) -> io::Result<usize> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    fn cpath(p: &Path) -> io::Result<CString> {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(22))
    }

    /// `ioctl(fd, cmd, buf)`.
    pub fn ioctl(fd: BorrowedFd<'_>, cmd: u32, buf: &mut [u8; IOCTL_BUF]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for IOCTL_BUF bytes, the most any command number can
        // make the kernel (or FUSE) read or write through the argument; commands that
        // interpret the argument as a count of further records are never generated.
        ret(
            unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::c_ulong, buf.as_mut_ptr()) }
                as libc::c_long,
        )
    }

    /// `getxattr(path, name, buf, size)`.
    pub fn getxattr(path: &Path, name: &[u8], size: usize) -> io::Result<usize> {
        let (p, n) = (cpath(path)?, CString::new(name)?);
        let mut buf = vec![0u8; size];
        // SAFETY: valid strings; `buf` is writable for `size` bytes.
        ret(
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) }
                as libc::c_long,
        )
    }

    /// `setxattr(path, name, value, flags)` with any name bytes.
    pub fn setxattr(path: &Path, name: &[u8], value: &[u8], flags: i32) -> io::Result<usize> {
        let (p, n) = (cpath(path)?, CString::new(name)?);
        // SAFETY: valid strings; `value` is readable for its length.
        ret(unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        } as libc::c_long)
    }

    /// `listxattr(path, buf, size)`.
    pub fn listxattr(path: &Path, size: usize) -> io::Result<usize> {
        let p = cpath(path)?;
        let mut buf = vec![0u8; size];
        // SAFETY: valid string; `buf` is writable for `size` bytes.
        ret(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), size) } as libc::c_long)
    }

    /// `removexattr(path, name)`.
    pub fn removexattr(path: &Path, name: &[u8]) -> io::Result<usize> {
        let (p, n) = (cpath(path)?, CString::new(name)?);
        // SAFETY: valid strings.
        ret(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) } as libc::c_long)
    }

    /// `truncate(path, len)` with the length as the kernel sees it (signed).
    pub fn truncate(path: &Path, len: u64) -> io::Result<usize> {
        let p = cpath(path)?;
        // SAFETY: valid string.
        ret(unsafe { libc::truncate(p.as_ptr(), len as libc::off_t) } as libc::c_long)
    }

    /// `fallocate(fd, mode, offset, len)` with any mode.
    pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<usize> {
        // SAFETY: plain syscall on an open descriptor.
        ret(unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        } as libc::c_long)
    }
}

/// Sizes and offsets worth trying. Valid sizes stay small (at most 8 MiB): the fuzzer must
/// not reserve real gigabytes; the huge ones fail before any memory is touched.
const SIZES: [u64; 20] = [
    0,
    1,
    4095,
    4096,
    4097,
    HUGE - 4096,
    HUGE,
    HUGE + 4096,
    2 * HUGE,
    4 * HUGE,
    3 * HUGE,
    1 << 40,
    1 << 50,
    i64::MAX as u64,
    (i64::MAX as u64) & !(HUGE - 1),
    1 << 63,
    u64::MAX,
    !(HUGE - 1),
    u64::MAX - HUGE + 1,
    8 * MIB + HUGE,
];

/// Names the kernel and the daemon must refuse or handle.
fn hostile_names() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        // `.` and `..` only below `zd/`: `MNT/..` would leave the mount.
        b"zd/.".to_vec(),
        b"/".to_vec(),
        b"//".to_vec(),
        b"a/b".to_vec(),
        b"zd/..".to_vec(),
        vec![b'n'; 255],
        vec![b'n'; 256],
        vec![b'm'; 1024],
        b"\xff\xfe".to_vec(),
        b"bad\x80name".to_vec(),
        b"\xc3\x28".to_vec(),
        b"line\nbreak".to_vec(),
        b" ".to_vec(),
        b"-".to_vec(),
        uapi::MSHARE_INFO_NAME.as_bytes().to_vec(),
        b"\\".to_vec(),
        b"%s%n".to_vec(),
    ];
    // 254 and 256 bytes of two-byte UTF-8.
    v.push("é".repeat(127).into_bytes());
    v.push("é".repeat(128).into_bytes());
    v
}

/// `MNT/NAME` by concatenation (`Path::join` would replace the path with an absolute
/// name such as `/`). Panics when the result would leave the mount: the fuzzer chmods,
/// chowns and renames what it names, and must never touch anything outside.
fn inside(mnt: &Path, name: &[u8]) -> PathBuf {
    let mut bytes = mnt.as_os_str().as_bytes().to_vec();
    bytes.push(b'/');
    bytes.extend_from_slice(name);
    let p = PathBuf::from(OsStr::from_bytes(&bytes));
    let mut depth = 0i32;
    for c in p.strip_prefix(mnt).expect("below the mount").components() {
        match c {
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
        assert!(depth >= 0, "fuzzer path {p:?} leaves the mount");
    }
    p
}

/// A fixture region and the test's own read-only view of it.
struct Fixture {
    path: PathBuf,
    view: View,
    hash: u64,
}

enum View {
    Lib(Attachment),
    Map(Mapping),
}

impl View {
    fn mapping(&self) -> &Mapping {
        match self {
            View::Lib(a) => a.mapping(),
            View::Map(m) => m,
        }
    }
}

fn content_hash(m: &Mapping) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut buf = vec![0u8; MIB as usize];
    let len = m.len() as u64;
    let mut off = 0;
    while off < len {
        let n = MIB.min(len - off) as usize;
        m.read_at(off, &mut buf[..n]).expect("read fixture");
        for c in buf[..n].chunks_exact(8) {
            h = (h ^ u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                .wrapping_mul(0x100_0000_01b3);
        }
        off += n as u64;
    }
    h
}

/// An open descriptor of the fuzzer, and whether it names a fixture.
struct OpenFd {
    fd: OwnedFd,
    fixture: bool,
    what: String,
}

/// What one call did, for the histogram and the invariants.
struct Outcome {
    kind: &'static str,
    what: String,
    fixture: bool,
    result: io::Result<()>,
}

struct Fuzz<'a> {
    fs: &'a Msharefs,
    mnt: PathBuf,
    rng: Rng,
    names: Vec<Vec<u8>>,
    fixtures: Vec<Fixture>,
    fds: Vec<OpenFd>,
    maps: Vec<Mapping>,
    attached: Vec<Attachment>,
    tree: serde_json::Value,
    histogram: BTreeMap<String, u64>,
    oddities: Vec<String>,
    /// Failed calls during which an earlier close ended an unlinked region.
    late_releases: u64,
    /// A descriptor or mapping was dropped in this step: the kernel sends its RELEASE to
    /// the daemon asynchronously, and the last release of an unlinked region ends it.
    released: bool,
}

/// The persisted tree, as the daemon saved it after its last change.
fn saved_tree(fs: &Msharefs) -> serde_json::Value {
    let text = std::fs::read(fs.state_dir().join("state.json")).expect("state.json");
    serde_json::from_slice(&text).expect("state.json parses")
}

/// The persisted tree once it has stopped changing (unchanged for 50 ms, at most 2 s):
/// after a close, the daemon handles the release a moment later.
fn settled_tree(fs: &Msharefs) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = saved_tree(fs);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = saved_tree(fs);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// `before` less the unlinked regions (orphans) that `after` no longer has. An orphan
/// ends when the daemon handles the release of its last descriptor, which can arrive
/// after `settled_tree` gave up waiting and so during a later call; no call can cause
/// that, so it is not a change that call made.
fn with_late_releases(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    let mut expected = before.clone();
    if let Some(nodes) = expected["nodes"].as_object_mut() {
        nodes.retain(|ino, n| {
            !n["orphan"].as_bool().unwrap_or(false) || after["nodes"].get(ino).is_some()
        });
    }
    expected
}

/// The daemon's in-memory view of the regions, from the `stat` report, in the shape the
/// persisted tree gives: path → (size, objects, backing).
fn live_regions(fs: &Msharefs) -> BTreeMap<String, (u64, u64, String)> {
    let st = fs.stat();
    st["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap_or("").to_string(),
                (
                    r["size"].as_u64().unwrap_or(0),
                    r["objects"].as_u64().unwrap_or(0),
                    r["backing"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

fn saved_regions(tree: &serde_json::Value) -> BTreeMap<String, (u64, u64, String)> {
    let nodes = tree["nodes"].as_object().expect("nodes");
    let path_of = |ino: &str| -> String {
        let mut parts = Vec::new();
        let mut cur = ino.to_string();
        while cur != "1" {
            let n = &nodes[&cur];
            parts.push(n["name"].as_str().unwrap_or("").to_string());
            cur = n["parent"].to_string();
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    };
    nodes
        .iter()
        .filter(|(_, n)| !n["orphan"].as_bool().unwrap_or(false))
        .filter_map(|(ino, n)| {
            let r = n["kind"].get("region")?;
            Some((
                path_of(ino),
                (
                    r["size"].as_u64().unwrap_or(0),
                    r["objects"].as_object().map_or(0, |o| o.len() as u64),
                    r["store"].as_str().unwrap_or("").to_string(),
                ),
            ))
        })
        .collect()
}

impl<'a> Fuzz<'a> {
    fn new(fs: &'a Msharefs, seed: u64) -> Fuzz<'a> {
        let mnt = fs.mountpoint();
        let mut fixtures = Vec::new();
        std::fs::create_dir(mnt.join("fx-d")).expect("mkdir fx-d");
        for (name, backing, size) in [
            ("fx-h", "hugetlb", 4 * HUGE),
            ("fx-t", "thp", 2 * HUGE),
            ("fx-s", "shmem", 2 * HUGE),
            ("fx-d/fx-in", "shmem", 64 * 1024),
        ] {
            let path = mnt.join(name);
            drop(kfd::open(&path, O_RDWR | O_CREAT | O_EXCL, 0o644).expect("create fixture"));
            mshare::set_backing(&path, Backing::from_name(backing).expect("backing name"))
                .expect("backing");
            let fd = kfd::open(&path, O_RDWR, 0).expect("open fixture");
            kfd::ftruncate(&fd, size).expect("size fixture");
            let mut req = MshareCreate {
                region_offset: 0,
                size: size / 2,
                prot: (PROT_READ | PROT_WRITE) as u32,
                flags: (MAP_SHARED | MAP_FIXED | MAP_ANONYMOUS) as u32,
                ..Default::default()
            };
            kfd::ioctl_ptr(&fd, uapi::MSHAREFS_CREATE_MAPPING, &mut req).expect("object");
            // A pattern, written through the file (read/write paths of the daemon).
            let pattern: Vec<u8> = (0..size)
                .map(|i| (i * 7 + name.len() as u64) as u8)
                .collect();
            std::fs::File::from(fd)
                .write_all_at(&pattern, 0)
                .expect("fill fixture");
            let view = if backing == "hugetlb" {
                let r = Region::open(&path, O_RDONLY).expect("open fixture region");
                View::Lib(r.attach(Protection::ReadOnly).expect("attach fixture"))
            } else {
                let fd = kfd::open(&path, O_RDONLY, 0).expect("open fixture");
                View::Map(
                    Mapping::map_aligned(&fd, size, Protection::ReadOnly, 4096)
                        .expect("map fixture"),
                )
            };
            let hash = content_hash(view.mapping());
            let mut check = vec![0u8; 64];
            view.mapping().read_at(0, &mut check).expect("read");
            assert_eq!(
                check,
                pattern[..64],
                "{name}: pattern visible in the mapping"
            );
            fixtures.push(Fixture { path, view, hash });
        }
        std::fs::create_dir(mnt.join("zd")).expect("mkdir zd");
        Fuzz {
            fs,
            tree: saved_tree(fs),
            mnt,
            rng: Rng(seed),
            names: hostile_names(),
            fixtures,
            fds: Vec::new(),
            maps: Vec::new(),
            attached: Vec::new(),
            histogram: BTreeMap::new(),
            oddities: Vec::new(),
            late_releases: 0,
            released: false,
        }
    }

    /// A path to operate on, and whether it is a fixture.
    fn path(&mut self) -> (PathBuf, bool) {
        match self.rng.below(10) {
            0..=2 => {
                let i = self.rng.below(self.fixtures.len() as u64) as usize;
                (self.fixtures[i].path.clone(), true)
            }
            3..=6 => {
                let k = self.rng.below(6);
                (self.mnt.join(format!("z{k}")), false)
            }
            7 => {
                let k = self.rng.below(3);
                (self.mnt.join(format!("zd/z{k}")), false)
            }
            _ => {
                let n = self.rng.pick(&self.names);
                (inside(&self.mnt, &n), false)
            }
        }
    }

    /// A path that is not a fixture (for unlink, rename, rmdir: the fixtures must stay
    /// where the content checks find them).
    fn free_path(&mut self) -> PathBuf {
        loop {
            let (p, fixture) = self.path();
            if !fixture && !p.starts_with(self.mnt.join("fx-d")) {
                return p;
            }
        }
    }

    fn size(&mut self) -> u64 {
        if self.rng.chance(15) {
            self.rng.below(16 * MIB)
        } else {
            self.rng.pick(&SIZES)
        }
    }

    fn fd(&mut self) -> Option<(usize, bool)> {
        if self.fds.is_empty() {
            return None;
        }
        let i = self.rng.below(self.fds.len() as u64) as usize;
        Some((i, self.fds[i].fixture))
    }

    fn borrowed(&self, i: usize) -> BorrowedFd<'_> {
        self.fds[i].fd.as_fd()
    }

    fn open_flags(&mut self) -> i32 {
        let acc = self.rng.pick(&[O_RDONLY, O_WRONLY, O_RDWR, O_ACCMODE]);
        let mut f = acc;
        for extra in [
            libc::O_TRUNC,
            libc::O_APPEND,
            libc::O_DIRECTORY,
            libc::O_NOFOLLOW,
            libc::O_NONBLOCK,
            libc::O_PATH,
            libc::O_DIRECT,
            libc::O_SYNC,
        ] {
            if self.rng.chance(8) {
                f |= extra;
            }
        }
        f
    }

    fn push_fd(&mut self, fd: OwnedFd, fixture: bool, what: String) {
        self.fds.push(OpenFd { fd, fixture, what });
        if self.fds.len() > 24 {
            let i = self.rng.below(self.fds.len() as u64) as usize;
            self.fds.swap_remove(i);
            self.released = true;
        }
    }

    /// An ioctl command: the real ones mostly, some with the wrong size, some random
    /// (never of the generic VFS ranges that take further records or freeze the file
    /// system).
    fn ioctl_cmd(&mut self) -> u32 {
        match self.rng.below(10) {
            0..=2 => uapi::MSHAREFS_CREATE_MAPPING,
            3..=4 => uapi::MSHAREFS_UNMAP,
            5 => uapi::MSHAREFS_GET_INFO,
            6 => {
                // A real number with another size or direction.
                let base = self.rng.pick(&[
                    uapi::MSHAREFS_CREATE_MAPPING,
                    uapi::MSHAREFS_UNMAP,
                    uapi::MSHAREFS_GET_INFO,
                ]);
                let size = self
                    .rng
                    .pick(&[0u32, 1, 8, 16, 39, 41, 143, 145, 4096, 16383]);
                let dir = self.rng.below(4) as u32;
                (base & 0x0000_ffff) | (size << 16) | (dir << 30)
            }
            7 => {
                // The 'x' range: other numbers.
                let nr = self.rng.below(256) as u32;
                let size = self.rng.below(1 << 14) as u32;
                let dir = self.rng.below(4) as u32;
                (dir << 30) | (size << 16) | ((b'x' as u32) << 8) | nr
            }
            _ => loop {
                let cmd = self.rng.next() as u32;
                let ty = (cmd >> 8) & 0xff;
                // 'X' (FIFREEZE/FITHAW/FITRIM), 0x94 (FICLONE*, FIDEDUPERANGE), 'f'
                // (FS_IOC_*, FIEMAP), 0x15 (FS_IOC_GETFSUUID/SYSFSPATH), 0 (FIBMAP, ...).
                if ![b'X' as u32, 0x94, b'f' as u32, 0x15, 0].contains(&ty) {
                    break cmd;
                }
            },
        }
    }

    fn ioctl_payload(&mut self, cmd: u32, buf: &mut [u8; sys::IOCTL_BUF]) {
        let raw = self.rng.bytes(64);
        buf[..64].copy_from_slice(&raw);
        if self.rng.chance(30) {
            return;
        }
        if cmd == uapi::MSHAREFS_CREATE_MAPPING {
            let flags = [
                MAP_SHARED,
                MAP_FIXED,
                MAP_ANONYMOUS,
                MAP_PRIVATE,
                MAP_HUGETLB,
            ]
            .iter()
            .fold(0, |f, &b| if self.rng.chance(70) { f | b } else { f });
            let req = MshareCreate {
                region_offset: self.size(),
                size: self.size(),
                offset: if self.rng.chance(80) { 0 } else { self.size() },
                prot: if self.rng.chance(70) {
                    (PROT_READ | PROT_WRITE) as u32
                } else {
                    self.rng.next() as u32
                },
                flags: flags as u32,
                fd: self.rng.pick(&[u32::MAX, 0, 1, 2, 1000]),
                _pad: 0,
            };
            let words = [req.region_offset, req.size, req.offset];
            for (k, w) in words.iter().enumerate() {
                buf[8 * k..8 * k + 8].copy_from_slice(&w.to_ne_bytes());
            }
            buf[24..28].copy_from_slice(&req.prot.to_ne_bytes());
            buf[28..32].copy_from_slice(&req.flags.to_ne_bytes());
            buf[32..36].copy_from_slice(&req.fd.to_ne_bytes());
        } else if cmd == uapi::MSHAREFS_UNMAP {
            let (o, s) = (self.size(), self.size());
            buf[0..8].copy_from_slice(&o.to_ne_bytes());
            buf[8..16].copy_from_slice(&s.to_ne_bytes());
        }
    }

    /// One random call.
    fn step(&mut self) -> Outcome {
        let op = self.rng.below(100);
        let mut fixture = false;
        let (kind, what, result): (&'static str, String, io::Result<()>) = match op {
            0..=9 => {
                let (p, fx) = self.path();
                fixture = fx;
                let flags =
                    self.open_flags() | O_CREAT | if self.rng.chance(50) { O_EXCL } else { 0 };
                let mode = self.rng.pick(&[0o600, 0o644, 0o000, 0o7777, 0o1777]);
                let what = format!("create {p:?} flags {flags:#o} mode {mode:#o}");
                let r = kfd::open(&p, flags, mode).map(|fd| self.push_fd(fd, fx, what.clone()));
                ("create", what, r)
            }
            10..=19 => {
                let (p, fx) = self.path();
                fixture = fx;
                let flags = self.open_flags();
                let what = format!("open {p:?} flags {flags:#o}");
                let r = kfd::open(&p, flags, 0).map(|fd| self.push_fd(fd, fx, what.clone()));
                ("open", what, r)
            }
            20..=23 => {
                if let Some((i, _)) = self.fd() {
                    self.fds.swap_remove(i);
                    self.released = true;
                }
                ("close", String::new(), Ok(()))
            }
            24..=31 => {
                let size = self.size();
                match (self.rng.chance(70), self.fd()) {
                    (true, Some((i, fx))) => {
                        fixture = fx;
                        let what = format!("ftruncate {} to {size}", self.fds[i].what);
                        ("ftruncate", what, kfd::ftruncate(self.borrowed(i), size))
                    }
                    _ => {
                        let (p, fx) = self.path();
                        fixture = fx;
                        let what = format!("truncate {p:?} to {size}");
                        ("truncate", what, sys::truncate(&p, size).map(drop))
                    }
                }
            }
            32..=37 => match self.fd() {
                Some((i, fx)) => {
                    fixture = fx;
                    let mode = self.rng.pick(&[0, 0, 0, 1, 2, 3, 0x10, 0x20, -1]);
                    let (o, l) = if self.rng.chance(30) {
                        (0, self.size())
                    } else {
                        (self.size(), self.size())
                    };
                    let what = format!("fallocate {} mode {mode} {o}+{l}", self.fds[i].what);
                    let r = sys::fallocate(self.borrowed(i), mode, o, l).map(drop);
                    ("fallocate", what, r)
                }
                None => ("fallocate", "no fd".into(), Ok(())),
            },
            38..=57 => match self.fd() {
                Some((i, fx)) => {
                    fixture = fx;
                    let cmd = self.ioctl_cmd();
                    let mut buf = [0u8; sys::IOCTL_BUF];
                    self.ioctl_payload(cmd, &mut buf);
                    let what = format!(
                        "ioctl {} cmd {cmd:#010x} payload {:02x?}",
                        self.fds[i].what,
                        &buf[..40]
                    );
                    let r = sys::ioctl(self.borrowed(i), cmd, &mut buf).map(drop);
                    ("ioctl", what, r)
                }
                None => ("ioctl", "no fd".into(), Ok(())),
            },
            58..=65 => {
                let (p, fx) = self.path();
                fixture = fx;
                let name: Vec<u8> = match self.rng.below(6) {
                    0..=2 => uapi::BACKING_XATTR.as_bytes().to_vec(),
                    3 => b"user.other".to_vec(),
                    4 => self
                        .rng
                        .pick(&[
                            &b"trusted.x"[..],
                            b"security.capability",
                            b"system.posix_acl_access",
                            b"user.",
                        ])
                        .to_vec(),
                    _ => {
                        let mut n = b"user.".to_vec();
                        n.extend(vec![b'q'; self.rng.pick(&[1usize, 250, 251, 300])]);
                        n
                    }
                };
                let value: Vec<u8> = match self.rng.below(6) {
                    0 => b"thp".to_vec(),
                    1 => self
                        .rng
                        .pick(&[&b"hugetlb\0"[..], b"shmem\n", b"default", b"", b"THP"])
                        .to_vec(),
                    2 => vec![0xff; 70000],
                    _ => {
                        let n = self.rng.below(300) as usize;
                        self.rng.bytes(n)
                    }
                };
                let sub = self.rng.below(4);
                let shown = String::from_utf8_lossy(&name[..name.len().min(40)]).into_owned();
                let (kind, r) = match sub {
                    0 => {
                        let flags = self.rng.pick(&[0, XATTR_CREATE, XATTR_REPLACE, 3, 0x100]);
                        (
                            "setxattr",
                            sys::setxattr(&p, &name, &value, flags).map(drop),
                        )
                    }
                    1 => {
                        let size = self.rng.pick(&[0usize, 1, 3, 7, 64, 70000]);
                        ("getxattr", sys::getxattr(&p, &name, size).map(drop))
                    }
                    2 => {
                        let size = self.rng.pick(&[0usize, 1, 19, 20, 4096]);
                        ("listxattr", sys::listxattr(&p, size).map(drop))
                    }
                    _ => ("removexattr", sys::removexattr(&p, &name).map(drop)),
                };
                (
                    kind,
                    format!("{kind} {p:?} {shown} ({} bytes)", value.len()),
                    r,
                )
            }
            66..=73 => match self.fd() {
                Some((i, fx)) => {
                    fixture = fx;
                    let off = self.size();
                    let file = std::fs::File::from(self.fds[i].fd.try_clone().expect("dup"));
                    if self.rng.chance(50) {
                        let mut buf = vec![0u8; self.rng.pick(&[0usize, 1, 4096, 300_000])];
                        let what = format!("pread {} at {off}", self.fds[i].what);
                        ("read", what, file.read_at(&mut buf, off).map(drop))
                    } else {
                        let n = self.rng.pick(&[0usize, 1, 4096, 200_000]);
                        let data = self.rng.bytes(n);
                        let what =
                            format!("pwrite {} bytes {} at {off}", data.len(), self.fds[i].what);
                        ("write", what, file.write_at(&data, off).map(drop))
                    }
                }
                None => ("read", "no fd".into(), Ok(())),
            },
            74..=79 => {
                let a = if self.rng.chance(20) {
                    self.path().0
                } else {
                    self.free_path()
                };
                let fx_dir = self.mnt.join("fx-d");
                if a.starts_with(&fx_dir) || self.fixtures.iter().any(|f| f.path == a) {
                    // Renaming a fixture away would hide it from the content checks.
                    ("rename", "skipped".into(), Ok(()))
                } else {
                    let b = self.free_path();
                    let flags = self
                        .rng
                        .pick(&[0, RENAME_NOREPLACE, RENAME_EXCHANGE, 4, 0xff]);
                    let what = format!("rename {a:?} -> {b:?} flags {flags}");
                    ("rename", what, kfd::renameat2(&a, &b, flags))
                }
            }
            80..=84 => {
                let p = self.free_path();
                let what = format!("unlink {p:?}");
                ("unlink", what, std::fs::remove_file(&p))
            }
            85..=87 => {
                let p = self.free_path();
                if self.rng.chance(50) {
                    let what = format!("mkdir {p:?}");
                    ("mkdir", what, std::fs::create_dir(&p))
                } else {
                    let what = format!("rmdir {p:?}");
                    ("rmdir", what, std::fs::remove_dir(&p))
                }
            }
            88..=91 => {
                let (p, fx) = self.path();
                fixture = fx;
                let what = format!("map {p:?}");
                let prot = if self.rng.chance(50) {
                    Protection::ReadWrite
                } else {
                    Protection::ReadOnly
                };
                let oflags = if prot == Protection::ReadWrite {
                    O_RDWR
                } else {
                    O_RDONLY
                };
                let len = self.rng.pick(&[4096u64, HUGE, 4 * HUGE, 1 << 40]);
                if self.rng.chance(50) {
                    // libmshare's attach (the attach socket for hugetlb regions).
                    let r = Region::open(&p, oflags).and_then(|r| r.attach(prot));
                    let r = r.map(|a| {
                        self.attached.push(a);
                        if self.attached.len() > 6 {
                            self.attached.remove(0);
                            self.released = true;
                        }
                    });
                    ("attach", what, r)
                } else {
                    // A plain mmap of the msharefs file.
                    let r = kfd::open(&p, oflags, 0)
                        .and_then(|fd| Mapping::map_aligned(&fd, len, prot, 4096))
                        .map(|m| {
                            self.maps.push(m);
                            if self.maps.len() > 6 {
                                self.maps.remove(0);
                                self.released = true;
                            }
                        });
                    ("mmap", what, r)
                }
            }
            92..=95 => {
                let (p, fx) = self.path();
                fixture = fx;
                if self.rng.chance(50) {
                    let mode = self.rng.pick(&[0o600, 0o644, 0o4755, 0o7777, 0o000]);
                    let what = format!("chmod {p:?} {mode:#o}");
                    let r = std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(mode),
                    );
                    ("chmod", what, r)
                } else {
                    let (u, g) = (
                        self.rng.pick(&[0u32, 65534, 1000, u32::MAX]),
                        self.rng.pick(&[0u32, 65534, u32::MAX]),
                    );
                    let what = format!("chown {p:?} {u}:{g}");
                    (
                        "chown",
                        what,
                        std::os::unix::fs::chown(&p, Some(u), Some(g)),
                    )
                }
            }
            _ => {
                let (p, _) = self.path();
                let what = format!("readdir/stat {p:?}");
                let r = match std::fs::read_dir(&p) {
                    Ok(mut rd) => rd.try_for_each(|e| e.map(drop)),
                    Err(_) => std::fs::metadata(&p).map(drop),
                };
                ("lookup", what, r)
            }
        };
        Outcome {
            kind,
            what,
            fixture,
            result,
        }
    }

    /// Checks the invariants after a call; updates the expectations after a success.
    fn check(&mut self, o: &Outcome) {
        let key = match &o.result {
            Ok(()) => format!("{} ok", o.kind),
            Err(e) => {
                let errno = e
                    .raw_os_error()
                    .unwrap_or_else(|| panic!("{}: an error without an errno: {e}", o.what));
                assert!(
                    errno != ENOTCONN && errno != ECONNABORTED,
                    "{}: errno {errno}, the daemon is gone\nlog:\n{}",
                    o.what,
                    self.fs.log()
                );
                if errno == EIO {
                    self.oddities.push(format!("{}: EIO", o.what));
                }
                format!("{} {}", o.kind, errno_name(errno))
            }
        };
        *self.histogram.entry(key).or_default() += 1;
        let tree = if std::mem::take(&mut self.released) {
            settled_tree(self.fs)
        } else {
            saved_tree(self.fs)
        };
        match &o.result {
            Err(_) => {
                let expected = with_late_releases(&self.tree, &tree);
                assert_eq!(
                    tree, expected,
                    "a failed call changed the persisted tree: {}",
                    o.what
                );
                if expected != self.tree {
                    self.late_releases += 1;
                    self.tree = tree;
                }
                if o.fixture {
                    for f in &self.fixtures {
                        assert_eq!(
                            content_hash(f.view.mapping()),
                            f.hash,
                            "a failed call changed the contents of {:?}: {}",
                            f.path,
                            o.what
                        );
                    }
                }
            }
            Ok(()) => {
                self.tree = tree;
                if o.fixture {
                    for f in &mut self.fixtures {
                        f.hash = content_hash(f.view.mapping());
                    }
                }
            }
        }
    }
}

fn errno_name(e: i32) -> String {
    let names = [
        (EPERM, "EPERM"),
        (ENOENT, "ENOENT"),
        (EIO, "EIO"),
        (EBADF, "EBADF"),
        (ENOMEM, "ENOMEM"),
        (EACCES, "EACCES"),
        (EFAULT, "EFAULT"),
        (EBUSY, "EBUSY"),
        (EEXIST, "EEXIST"),
        (EXDEV, "EXDEV"),
        (ENODEV, "ENODEV"),
        (ENOTDIR, "ENOTDIR"),
        (EISDIR, "EISDIR"),
        (EINVAL, "EINVAL"),
        (libc::EFBIG, "EFBIG"),
        (ENOSPC, "ENOSPC"),
        (ERANGE, "ERANGE"),
        (ENAMETOOLONG, "ENAMETOOLONG"),
        (ENOSYS, "ENOSYS"),
        (ENOTEMPTY, "ENOTEMPTY"),
        (ENODATA, "ENODATA"),
        (ENOTTY, "ENOTTY"),
        (EOPNOTSUPP, "EOPNOTSUPP"),
        (E2BIG, "E2BIG"),
        (EOVERFLOW, "EOVERFLOW"),
        (libc::ELOOP, "ELOOP"),
        (libc::ESPIPE, "ESPIPE"),
        (EDQUOT, "EDQUOT"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == e)
        .map_or_else(|| format!("errno{e}"), |(_, s)| s.to_string())
}

/// Fails the test with the daemon's thread stacks when the call in progress takes longer
/// than `limit`; kills the daemon so the call returns.
struct Watchdog {
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(pid: u32, progress: Arc<AtomicU64>, current: Arc<Mutex<String>>) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (s, f) = (stop.clone(), fired.clone());
        let thread = std::thread::spawn(move || {
            let limit = Duration::from_secs(30);
            let mut last = (progress.load(Ordering::SeqCst), Instant::now());
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let now = progress.load(Ordering::SeqCst);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > limit {
                    let op = current.lock().map(|c| c.clone()).unwrap_or_default();
                    loud(&format!("HANG: no progress for {limit:?} in: {op}"));
                    loud(&thread_stacks(pid, "threads of daemon"));
                    f.store(true, Ordering::SeqCst);
                    let _ = kernel_glue::process::kill(pid, SIGKILL);
                    return;
                }
            }
        });
        Watchdog {
            stop,
            fired,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn fuzzed_calls_fail_cleanly_and_change_nothing() {
    if !require_privileged("fuzzed_calls_fail_cleanly_and_change_nothing") {
        return;
    }
    let cases = env_u64("MSHAREFS_FUZZ_CASES", 3000);
    let seed = seed("MSHAREFS_FUZZ_SEED");
    loud(&format!(
        "fuzz: {cases} calls, seed {seed} (MSHAREFS_FUZZ_SEED={seed} repeats the run)"
    ));
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("fuzz", &["--backing", "hugetlb"]);
    let pid = fs.daemon_pid();
    let mut fuzz = Fuzz::new(&fs, seed);
    let progress = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new(String::new()));
    let dog = Watchdog::start(pid, progress.clone(), current.clone());
    let started = Instant::now();
    let mut slowest = (Duration::ZERO, String::new());
    for n in 0..cases {
        let t = Instant::now();
        let o = fuzz.step();
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, o.what.clone());
        }
        if let Ok(mut c) = current.lock() {
            c.clone_from(&o.what);
        }
        assert!(!dog.fired.load(Ordering::SeqCst), "hang in: {}", o.what);
        assert!(
            kernel_glue::process::alive(pid),
            "daemon died after: {}\nlog:\n{}",
            o.what,
            fs.log()
        );
        fuzz.check(&o);
        if n % 100 == 99 {
            kfd::statfs(&fs.mountpoint()).expect("daemon answers statfs");
            assert_eq!(
                std::fs::read_to_string(fs.path("mshare_info")).expect("mshare_info"),
                "1073741824\n"
            );
            assert_eq!(
                live_regions(&fs),
                saved_regions(&fuzz.tree),
                "the daemon's live regions differ from its persisted tree (after {})",
                o.what
            );
        }
        progress.fetch_add(1, Ordering::SeqCst);
    }
    drop(dog);
    let elapsed = started.elapsed();
    // Everything the fuzzer holds goes; the fixtures are unchanged (checked after every
    // failed call) and every other region ends.
    fuzz.fds.clear();
    fuzz.maps.clear();
    fuzz.attached.clear();
    let log = fs.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    let histogram: Vec<String> = fuzz
        .histogram
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    loud(&format!(
        "fuzz: {cases} calls in {:.1} s (slowest {} ms: {}), daemon alive, no panic; \
         {} failed calls saw an earlier close end an unlinked region; outcomes: {}",
        elapsed.as_secs_f64(),
        slowest.0.as_millis(),
        slowest.1,
        fuzz.late_releases,
        histogram.join(", ")
    ));
    if !fuzz.oddities.is_empty() {
        loud(&format!(
            "fuzz: calls answered EIO ({}): {:?}",
            fuzz.oddities.len(),
            &fuzz.oddities[..fuzz.oddities.len().min(10)]
        ));
    }
    assert!(errors.is_empty(), "daemon errors: {errors:?}");
}

// ---- the attach socket -------------------------------------------------------------------

fn socket_path(fs: &Msharefs) -> PathBuf {
    fs.state_dir().join("attach.sock")
}

/// Sends `data` with `fds` attached, after a reply socket, as one request datagram, and
/// returns the reply: the errno (0 for success) and whether a descriptor came back; `None`
/// when the daemon closed the reply socket without a reply.
fn attach_request(sock: &Path, data: &[u8], fds: &[BorrowedFd<'_>]) -> Option<(i32, bool)> {
    let (ours, theirs) = UnixStream::pair().expect("pair");
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut all = vec![theirs.as_fd()];
    all.extend_from_slice(fds);
    send_request(sock, data, &all);
    drop(theirs);
    let mut reply = [0u8; 4];
    let (n, fd) = kernel_glue::socket::recv_with_fd(&ours, &mut reply).expect("reply");
    if n == 0 {
        return None;
    }
    assert_eq!(n, 4, "reply length");
    Some((i32::from_ne_bytes(reply), fd.is_some()))
}

/// `sendmsg` of one datagram to `sock` with any number of descriptors in one
/// `SCM_RIGHTS` message (more than libmshare's sender allows).
fn send_request(sock: &Path, data: &[u8], fds: &[BorrowedFd<'_>]) {
    let s = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let path = sock.as_os_str().as_encoded_bytes();
    let mut cbuf = [0u64; 32];
    // SAFETY: zero is a valid sockaddr_un and msghdr; the path fits sun_path (state
    // directories of the tests are short); the control buffer (256 bytes) has room for the
    // header and up to 60 descriptors, more than any caller passes; every pointer stays
    // valid during sendmsg.
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        assert!(path.len() < addr.sun_path.len(), "socket path too long");
        std::ptr::copy_nonoverlapping(path.as_ptr(), addr.sun_path.as_mut_ptr().cast(), path.len());
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&raw mut addr).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE((raw.len() * 4) as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
        assert_eq!(
            libc::sendmsg(s.as_raw_fd(), &msg, 0),
            data.len() as isize,
            "sendmsg: {}",
            io::Error::last_os_error()
        );
    }
}

/// One attach-socket case: what, request bytes, descriptors, expected reply.
type Case<'a> = (
    &'static str,
    Vec<u8>,
    Vec<BorrowedFd<'a>>,
    Option<(i32, bool)>,
);

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
#[ignore = "needs root: mounts msharefs (FUSE) and uses huge pages"]
fn attach_socket_refuses_everything_but_a_region_descriptor() {
    if !require_privileged("attach_socket_refuses_everything_but_a_region_descriptor") {
        return;
    }
    let _pool = PoolGuard::new();
    let fs = Msharefs::mount("sock", &["--backing", "hugetlb"]);
    let other = Msharefs::mount("sock-other", &["--backing", "hugetlb"]);
    let sock = socket_path(&fs);
    let pid = fs.daemon_pid();
    let region = fs.path("r");
    drop(kfd::open(&region, O_RDWR | O_CREAT | O_EXCL, 0o666).expect("create"));
    kfd::ftruncate(kfd::open(&region, O_RDWR, 0).expect("open"), 4 * MIB).expect("size");
    let no_size = fs.path("unsized");
    drop(kfd::open(&no_size, O_RDWR | O_CREAT | O_EXCL, 0o600).expect("create"));
    let thp = fs.path("thp");
    drop(kfd::open(&thp, O_RDWR | O_CREAT | O_EXCL, 0o600).expect("create"));
    mshare::set_backing(&thp, Backing::Thp).expect("backing");
    kfd::ftruncate(kfd::open(&thp, O_RDWR, 0).expect("open"), 4 * MIB).expect("size");
    let foreign = other.path("r");
    drop(kfd::open(&foreign, O_RDWR | O_CREAT | O_EXCL, 0o600).expect("create"));
    kfd::ftruncate(kfd::open(&foreign, O_RDWR, 0).expect("open"), 4 * MIB).expect("size");
    std::fs::create_dir(fs.path("dir")).expect("mkdir");

    let fds_before = fd_count(pid);
    let threads_before = kernel_glue::caps::thread_ids(pid).map_or(0, |t| t.len());
    let rw = kfd::open(&region, O_RDWR, 0).expect("open rw");
    let ro = kfd::open(&region, O_RDONLY, 0).expect("open ro");
    let wo = kfd::open(&region, O_WRONLY, 0).expect("open wo");
    let path_only = kfd::open(&region, libc::O_PATH, 0).expect("open O_PATH");
    let dir = kfd::open(&fs.path("dir"), O_RDONLY | libc::O_DIRECTORY, 0).expect("open dir");
    let info = kfd::open(&fs.path("mshare_info"), O_RDONLY, 0).expect("open info");
    let devnull = kfd::open(Path::new("/dev/null"), O_RDWR, 0).expect("/dev/null");
    let tmp = kfd::memfd_create("not-a-region", false).expect("memfd");
    let other_fd = kfd::open(&foreign, O_RDWR, 0).expect("foreign region");
    let no_size_fd = kfd::open(&no_size, O_RDWR, 0).expect("unsized");
    let thp_fd = kfd::open(&thp, O_RDWR, 0).expect("thp");
    let (pipe_r, _pipe_w) = {
        let (a, b) = UnixStream::pair().expect("pair");
        (OwnedFd::from(a), b)
    };

    let w = [uapi::ATTACH_WRITE];
    let r = [uapi::ATTACH_READ];
    let cases: Vec<Case<'_>> = vec![
        (
            "rw descriptor, write",
            w.to_vec(),
            vec![rw.as_fd()],
            Some((0, true)),
        ),
        (
            "ro descriptor, read",
            r.to_vec(),
            vec![ro.as_fd()],
            Some((0, true)),
        ),
        (
            "ro descriptor, write",
            w.to_vec(),
            vec![ro.as_fd()],
            Some((EACCES, false)),
        ),
        (
            "O_WRONLY descriptor, read",
            r.to_vec(),
            vec![wo.as_fd()],
            Some((EACCES, false)),
        ),
        (
            "O_WRONLY descriptor, write",
            w.to_vec(),
            vec![wo.as_fd()],
            Some((EACCES, false)),
        ),
        (
            "O_PATH descriptor, read",
            r.to_vec(),
            vec![path_only.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "O_PATH descriptor, write",
            w.to_vec(),
            vec![path_only.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "no descriptor, write",
            w.to_vec(),
            vec![],
            Some((EBADF, false)),
        ),
        (
            "no descriptor, read",
            r.to_vec(),
            vec![],
            Some((EBADF, false)),
        ),
        (
            "directory of the mount",
            r.to_vec(),
            vec![dir.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "mshare_info",
            r.to_vec(),
            vec![info.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "/dev/null",
            r.to_vec(),
            vec![devnull.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "a memfd",
            w.to_vec(),
            vec![tmp.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "a socket",
            w.to_vec(),
            vec![pipe_r.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "region of another mount",
            w.to_vec(),
            vec![other_fd.as_fd()],
            Some((EBADF, false)),
        ),
        (
            "region with no size",
            w.to_vec(),
            vec![no_size_fd.as_fd()],
            Some((EINVAL, false)),
        ),
        (
            "thp region",
            w.to_vec(),
            vec![thp_fd.as_fd()],
            Some((ENODEV, false)),
        ),
        (
            "unknown request byte",
            b"?".to_vec(),
            vec![rw.as_fd()],
            Some((EINVAL, false)),
        ),
        // Only the first byte is read: the rest of a longer request is ignored.
        (
            "two bytes",
            b"ww".to_vec(),
            vec![rw.as_fd()],
            Some((0, true)),
        ),
        (
            "three descriptors, the first a foreign one",
            w.to_vec(),
            vec![devnull.as_fd(), rw.as_fd(), ro.as_fd()],
            Some((EBADF, false)),
        ),
        ("nothing at all", vec![], vec![], Some((EINVAL, false))),
    ];
    let mut tried = 0;
    for (what, data, fds, want) in &cases {
        let got = attach_request(&sock, data, fds);
        assert_eq!(&got, want, "{what}");
        tried += 1;
    }
    // Garbage: random bytes, with and without a valid descriptor.
    let mut rng = Rng(0x5eed_f09a_4ba9);
    for i in 0..200 {
        let len = 1 + rng.below(if i % 10 == 0 { 65536 } else { 64 }) as usize;
        let mut data = rng.bytes(len);
        if data[0] == uapi::ATTACH_WRITE || data[0] == uapi::ATTACH_READ || data[0] == b's' {
            data[0] = 0;
        }
        let fds: Vec<BorrowedFd<'_>> = if i % 2 == 0 { vec![rw.as_fd()] } else { vec![] };
        let got = attach_request(&sock, &data, &fds);
        assert!(
            matches!(got, Some((e, false)) if e == EINVAL || e == EBADF),
            "garbage {len} bytes: {got:?}"
        );
        tried += 1;
    }
    // Requests the daemon must not answer: without a reply socket, with a reply socket
    // whose peer is another process (the daemon would speak into someone else's
    // connection), with a file as the reply socket. Nothing may be written anywhere, and a
    // real attach after them is served.
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let memfd = kfd::memfd_create("reply-file", false).expect("memfd");
    let mut listener_dir = fs.state_dir().to_path_buf();
    listener_dir.pop();
    let other_end = {
        // A connection whose peer is another process: a child that holds its end.
        let path = listener_dir.join(format!("hostile-peer-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect({:?}); \
                 sys.stdout.write('x'); sys.stdout.flush(); time.sleep(30)",
                path.to_str().expect("utf-8 path")
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let (conn, _) = l.accept().expect("accept");
        let _ = std::fs::remove_file(&path);
        (conn, child.stdout.take(), child)
    };
    for (what, first) in [
        ("no reply socket", None),
        ("a memfd as the reply socket", Some(memfd.as_fd())),
        (
            "a connection to another process as the reply socket",
            Some(other_end.0.as_fd()),
        ),
    ] {
        let mut all: Vec<BorrowedFd<'_>> = first.into_iter().collect();
        all.push(rw.as_fd());
        send_request(&sock, &w, &all);
        tried += 1;
        assert_eq!(
            attach_request(&sock, &w, &[rw.as_fd()]),
            Some((0, true)),
            "attach after a request with {what}"
        );
    }
    assert_eq!(
        kfd::fstat(&memfd).expect("fstat").size,
        0,
        "daemon wrote into a file"
    );
    other_end
        .0
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut b = [0u8; 1];
    assert!(
        (&other_end.0).read(&mut b).is_err(),
        "daemon wrote into another process's connection"
    );
    let (_, _, mut child) = other_end;
    let _ = child.kill();
    let _ = child.wait();
    drop((ours, theirs));
    // Many requests whose replies nobody reads, all on one reply socket: the daemon's
    // threads do not wait for that client, a real attach is still served, and the
    // daemon gets its descriptors back once the client goes.
    let (unread, theirs) = UnixStream::pair().expect("pair");
    for _ in 0..2000 {
        send_request(&sock, &w, &[theirs.as_fd(), no_size_fd.as_fd()]);
    }
    let t = Instant::now();
    assert_eq!(
        attach_request(&sock, &w, &[rw.as_fd()]),
        Some((0, true)),
        "attach after 2000 unread replies"
    );
    let busy_attach = t.elapsed();
    let threads_busy = kernel_glue::caps::thread_ids(pid).map_or(0, |t| t.len());
    drop((unread, theirs));
    drop((
        rw, ro, wo, path_only, dir, info, other_fd, no_size_fd, thp_fd,
    ));
    let settle = Instant::now() + Duration::from_secs(10);
    while fd_count(pid) > fds_before && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fd_count(pid), fds_before, "daemon descriptors leaked");
    let threads = || kernel_glue::caps::thread_ids(pid).map_or(0, |t| t.len());
    while threads() > threads_before && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }
    let threads_after = threads();
    assert!(
        threads_after <= threads_before,
        "daemon threads: {threads_after} after, {threads_before} before"
    );
    let log = fs.log();
    assert!(!log.contains("panicked"), "daemon panicked:\n{log}");
    loud(&format!(
        "attach socket: {tried} hostile requests refused with the right errno or dropped \
         unanswered; attach after 2000 unread replies took {} ms ({threads_busy} daemon \
         threads); {threads_after} threads and {} descriptors after",
        busy_attach.as_millis(),
        fd_count(pid)
    ));
}
