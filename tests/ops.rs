//! `mshare-ops`: an attacher that does to its region what database processes do, one
//! command at a time, so a test can check each call's effect on data, faults and page
//! table sharing while other attachers run.
//!
//! `mshare-ops PATH` opens and attaches the region read-write with libmshare, prints
//! `{"pid":..,"addr":..,"len":..}` and then answers each command line on standard input
//! with one JSON line (`{"error":..,"errno":..}` on failure):
//!
//! - `touch`: reads one word per 2 MiB page; `{"minor_faults": N}` of that loop alone
//! - `store OFF VALUE`, `load OFF` (`{"value": V}`): one word
//! - `mprotect OFF LEN r|rw|none`, `mlock OFF LEN`, `munlock OFF LEN`,
//!   `madvise OFF LEN dontneed|remove`
//! - `direct_write FILE OFF LEN`, `direct_read FILE OFF LEN`: `O_DIRECT` I/O between the
//!   region at `OFF` and `FILE` at offset 0 (`{"bytes": N}`)
//! - `uring_register`, `uring_write FILE OFF LEN`, `uring_read FILE OFF LEN`,
//!   `uring_unregister`: the region as io_uring fixed buffers
//! - `uffd_wp`: registers the whole mapping for userfaultfd write-protect faults (kept)
//! - `fork`: forks a child that touches the region and reports
//!   `{"child_pid", "minor_faults", "value0"}` and stays until `fork_end`
//!   (`{"status": S}`)
//! - `coredump DIR`: allows core dumps, moves to `DIR` and aborts (no answer)
//! - `populate`: faults in the whole mapping for writing
//! - `guard`: arms libmshare's `MSHAREFS_UNMAP` guard (`mshare::guard::arm`) on it
//! - `read_into OFF`: `read(2)` of 8 bytes from `/dev/zero` into the region at `OFF`
//!   (`{"bytes": 8}`, or the errno)
//! - `punch OFF LEN` (raw mode only): punches a hole in the file
//!
//! - `fill VALUE`: stores `VALUE` in the first word of every 4 KiB page
//!
//! `mshare-ops --join CGROUP_DIR ... PATH` first moves itself into each cgroup directory.
//! `mshare-ops --raw FILE` maps a plain hugetlbfs file instead, read-write at a 1 GiB
//! boundary, for experiments without the daemon.

use std::io::{self, BufRead, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use kernel_glue::consts::{O_CREAT, O_RDONLY, O_RDWR, O_WRONLY, PROT_NONE, PROT_READ, PROT_WRITE};
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::uffd::{self, Userfaultfd};
use kernel_glue::uring::FixedBuffers;
use kernel_glue::vmops::{self, Advice, Forked};
use kernel_glue::{fd as kfd, procfs};
use mshare::{Backing, Region};
use serde_json::{Value, json};

const STRIDE: u64 = 2 << 20;

/// Reads one word per 2 MiB page; returns the minor faults of the loop alone.
fn touch(m: &Mapping) -> io::Result<u64> {
    let before = procfs::faults()?.minor;
    let mut sink = 0u64;
    let mut off = 0;
    while off < m.len() as u64 {
        sink ^= m.load_u64(off)?;
        off += STRIDE;
    }
    std::hint::black_box(sink);
    Ok(procfs::faults()?.minor - before)
}

fn num(arg: Option<&str>) -> io::Result<u64> {
    let a = arg.ok_or_else(|| kernel_glue::errno(kernel_glue::errnos::EINVAL))?;
    let r = match a.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => a.parse(),
    };
    r.map_err(|_| kernel_glue::errno(kernel_glue::errnos::EINVAL))
}

fn word(arg: Option<&str>) -> io::Result<&str> {
    arg.ok_or_else(|| kernel_glue::errno(kernel_glue::errnos::EINVAL))
}

/// A forked child that holds the region until its pipe closes.
struct Child {
    pid: u32,
    release: io::PipeWriter,
}

fn fork_child(m: &Mapping) -> io::Result<(Child, Value)> {
    let (mut report_r, mut report_w) = io::pipe()?;
    let (mut release_r, release_w) = io::pipe()?;
    // SAFETY: mshare-ops is single-threaded (no thread is ever started).
    match unsafe { vmops::fork() }? {
        Forked::Child => {
            drop(report_r);
            drop(release_w);
            let r = touch(m).and_then(|f| Ok((f, m.load_u64(0)?)));
            let v = match r {
                Ok((f, v0)) => {
                    json!({"child_pid": std::process::id(), "minor_faults": f, "value0": v0})
                }
                Err(e) => json!({"error": e.to_string()}),
            };
            let _ = writeln!(report_w, "{v}");
            drop(report_w);
            let mut sink = [0u8; 1];
            let _ = release_r.read(&mut sink);
            vmops::exit_now(0);
        }
        Forked::Parent(pid) => {
            drop(report_w);
            drop(release_r);
            let mut line = String::new();
            io::BufReader::new(&mut report_r).read_line(&mut line)?;
            let v: Value = serde_json::from_str(&line)
                .map_err(|_| kernel_glue::errno(kernel_glue::errnos::EIO))?;
            Ok((
                Child {
                    pid,
                    release: release_w,
                },
                v,
            ))
        }
    }
}

struct State<'m> {
    m: &'m Mapping,
    backing: Backing,
    /// The mapped file, in raw mode.
    file: Option<&'m std::os::fd::OwnedFd>,
    guard: Option<mshare::guard::Guard>,
    ring: Option<FixedBuffers<'m>>,
    uffd: Option<Userfaultfd>,
    child: Option<Child>,
}

fn command(st: &mut State<'_>, line: &str) -> io::Result<Value> {
    let mut it = line.split_whitespace();
    let cmd = it.next().unwrap_or("");
    let m = st.m;
    Ok(match cmd {
        "touch" => json!({"minor_faults": touch(m)?}),
        "store" => {
            m.store_u64(num(it.next())?, num(it.next())?)?;
            json!({})
        }
        "load" => json!({"value": m.load_u64(num(it.next())?)?}),
        "mprotect" => {
            let (off, len) = (num(it.next())?, num(it.next())?);
            let prot = match word(it.next())? {
                "r" => PROT_READ,
                "rw" => PROT_READ | PROT_WRITE,
                "none" => PROT_NONE,
                _ => return Err(kernel_glue::errno(kernel_glue::errnos::EINVAL)),
            };
            vmops::mprotect(m, off, len, prot)?;
            json!({})
        }
        "mlock" => {
            vmops::mlock(m, num(it.next())?, num(it.next())?)?;
            json!({})
        }
        "munlock" => {
            vmops::munlock(m, num(it.next())?, num(it.next())?)?;
            json!({})
        }
        "madvise" => {
            let (off, len) = (num(it.next())?, num(it.next())?);
            let advice = match word(it.next())? {
                "dontneed" => Advice::DontNeed,
                "remove" => Advice::Remove,
                "pageout" => Advice::PageOut,
                _ => return Err(kernel_glue::errno(kernel_glue::errnos::EINVAL)),
            };
            vmops::madvise(m, off, len, advice)?;
            json!({})
        }
        "direct_write" | "direct_read" => {
            let file = Path::new(word(it.next())?);
            let (off, len) = (num(it.next())?, num(it.next())?);
            let bytes = if cmd == "direct_write" {
                let fd = kfd::open(file, O_WRONLY | O_CREAT | vmops::O_DIRECT, 0o600)?;
                vmops::pwrite_from(&fd, m, off, len, 0)?
            } else {
                let fd = kfd::open(file, O_RDONLY | vmops::O_DIRECT, 0)?;
                vmops::pread_into(&fd, m, off, len, 0)?
            };
            json!({"bytes": bytes})
        }
        "uring_register" => {
            st.ring = Some(FixedBuffers::register(m)?);
            json!({})
        }
        "uring_write" | "uring_read" => {
            let file = Path::new(word(it.next())?);
            let (off, len) = (num(it.next())?, num(it.next())?);
            let ring = st
                .ring
                .as_mut()
                .ok_or_else(|| kernel_glue::errno(kernel_glue::errnos::EINVAL))?;
            let bytes = if cmd == "uring_write" {
                let fd = kfd::open(file, O_WRONLY | O_CREAT, 0o600)?;
                ring.write_fixed(&fd, off, len, 0)?
            } else {
                let fd = kfd::open(file, O_RDONLY, 0)?;
                ring.read_fixed(&fd, off, len, 0)?
            };
            json!({"bytes": bytes})
        }
        "uring_unregister" => {
            st.ring = None;
            json!({})
        }
        "uffd_wp" => {
            let u = Userfaultfd::new(uffd::FEATURE_WP_HUGETLBFS_SHMEM)?;
            u.register(m, 0, m.len() as u64, uffd::Mode::WriteProtect)?;
            st.uffd = Some(u);
            json!({})
        }
        "fork" => {
            let (child, v) = fork_child(m)?;
            st.child = Some(child);
            v
        }
        "fork_end" => {
            let c = st
                .child
                .take()
                .ok_or_else(|| kernel_glue::errno(kernel_glue::errnos::EINVAL))?;
            drop(c.release);
            json!({"status": vmops::waitpid(c.pid)?})
        }
        "fill" => {
            let v = num(it.next())?;
            let mut off = 0;
            while off < m.len() as u64 {
                m.store_u64(off, v)?;
                off += 4096;
            }
            json!({})
        }
        "populate" => {
            m.populate(0, m.len() as u64)?;
            json!({})
        }
        "guard" => {
            st.guard = Some(mshare::guard::arm(m, st.backing)?);
            json!({})
        }
        "read_into" => {
            let zero = kfd::open(Path::new("/dev/zero"), O_RDONLY, 0)?;
            json!({"bytes": vmops::pread_into(&zero, m, num(it.next())?, 8, 0)?})
        }
        "punch" => {
            let f = st
                .file
                .ok_or_else(|| kernel_glue::errno(kernel_glue::errnos::EINVAL))?;
            kfd::fallocate_punch_hole(f, num(it.next())?, num(it.next())?)?;
            json!({})
        }
        "coredump" => {
            std::env::set_current_dir(word(it.next())?)?;
            vmops::allow_core_dumps()?;
            std::process::abort();
        }
        _ => return Err(kernel_glue::errno(kernel_glue::errnos::EINVAL)),
    })
}

fn say(v: &Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn error(e: &io::Error) -> Value {
    json!({"error": e.to_string(), "errno": e.raw_os_error()})
}

/// What the process maps: a libmshare attachment, or a raw mapping of a file.
enum Attached {
    Region(Region, mshare::Attachment),
    Raw(std::os::fd::OwnedFd, Mapping),
}

fn attach(args: &[String]) -> io::Result<Attached> {
    match args {
        [flag, file] if flag == "--raw" => {
            let fd = kfd::open(Path::new(file), O_RDWR, 0)?;
            let size = kfd::fstat(&fd)?.size;
            let m = Mapping::map_aligned(&fd, size, Protection::ReadWrite, 1 << 30)?;
            Ok(Attached::Raw(fd, m))
        }
        [path] => {
            let r = Region::open(Path::new(path), O_RDWR)?;
            let a = r.attach(Protection::ReadWrite)?;
            Ok(Attached::Region(r, a))
        }
        _ => Err(kernel_glue::errno(kernel_glue::errnos::EINVAL)),
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    while args.len() >= 2 && args[0] == "--join" {
        let dir = args.remove(1);
        args.remove(0);
        if let Err(e) = std::fs::write(Path::new(&dir).join("cgroup.procs"), "0") {
            say(&error(&e));
            return ExitCode::FAILURE;
        }
    }
    let attached = match attach(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("usage: mshare-ops PATH | mshare-ops --raw FILE");
            say(&error(&e));
            return ExitCode::FAILURE;
        }
    };
    let (m, backing, file) = match &attached {
        Attached::Region(r, a) => (a.mapping(), r.backing(), None),
        Attached::Raw(fd, m) => (m, Backing::Hugetlb, Some(fd)),
    };
    say(&json!({"pid": std::process::id(), "addr": m.addr(), "len": m.len()}));
    let mut st = State {
        m,
        backing,
        file,
        guard: None,
        ring: None,
        uffd: None,
        child: None,
    };
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match command(&mut st, &line) {
            Ok(v) => say(&v),
            Err(e) => say(&error(&e)),
        }
    }
    ExitCode::SUCCESS
}
