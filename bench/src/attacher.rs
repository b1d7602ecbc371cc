//! One attacher process of `msharefs-bench` (the hidden `msharefs-bench attacher`
//! subcommand): maps the region the way its configuration says, touches every page, and
//! reports what that cost, then obeys commands on standard input until it closes.
//!
//! Protocol: every report is one JSON line on standard output, written with a single
//! `write(2)` (standard output is a datagram socket all attachers share: one line is one
//! datagram), tagged with the attacher's `id`:
//!
//! - at start: `{"id", "ok": true, "ns", "open_ns", "map_ns", "touch_ns", "faults",
//!   "touched", "addr", "page_size", "pmd_mapped", "vm_pte_delta", "start_unix_ns",
//!   "done_unix_ns"}`: `ns` from just before open/attach to just after the last touch
//!   (split into its three steps; what the attach opened is closed after that, as the
//!   `limit` attacher keeps its backing open), `faults` the minor faults of the touch loop
//!   alone
//!   (`getrusage`), the two wall-clock stamps (`CLOCK_REALTIME`, comparable between
//!   processes) of the same two moments;
//! - `sweep N` → `{"id", "ok": true, "sweep_gbps", "checksum"}`: the best of N read+write
//!   sweeps of the whole mapping, in GB/s of memory traffic (bytes read plus bytes written);
//! - `detach` → `{"id", "ok": true, "detached": true}` once the mapping is gone;
//! - `attach` (after `detach`) → attaches and touches again, with the first report's fields;
//! - end of input: exit 0.
//!
//! With `--storm`, standard input is the storm's gate instead, a pipe all attachers share:
//! the attacher gets ready (everything before the open: for `limit`, the backing), reports
//! `{"id", "ok": true, "ready": true}`, waits for the end of its input (the bench closes
//! the pipe's only write end: every attacher wakes at once), attaches and touches, reports
//! as above, and then stays attached until the bench kills it.
//!
//! Any failure is reported as `{"id", "ok": false, "error", "errno"}` and exits non-zero.
//! The process dies with its parent (`PR_SET_PDEATHSIG`), so an interrupted bench leaves
//! no attacher behind.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use clap::{Args, ValueEnum};
use kernel_glue::mapping::Protection;
use kernel_glue::{consts, errnos, fd as kfd, procfs};
use mshare::Region;
use serde_json::{Value, json};

use crate::mem::{self, Held};

/// How an attacher gets at the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachKind {
    /// Maps nothing: the control process.
    Control,
    /// Opens `--path` and maps it `MAP_SHARED` at a kernel-chosen address.
    Mmap,
    /// Opens the msharefs region `--path` and attaches it through libmshare.
    Libmshare,
    /// Holds the hugetlb backing of the msharefs region `--path` (asked for once, before
    /// anything is timed) and maps it at a 1 GiB-aligned address: the floor of attach.
    Limit,
    /// Maps `--size` bytes of anonymous private hugetlb memory (the bandwidth reference).
    AnonHugetlb,
}

/// Arguments of `msharefs-bench attacher` (started by the bench only).
#[derive(Debug, Args)]
pub struct AttacherArgs {
    /// Pid of the bench that started this process; it exits when that process is gone.
    #[arg(long)]
    parent: u32,
    /// Tag of every report line.
    #[arg(long)]
    id: u64,
    /// What to map.
    #[arg(long, value_enum)]
    kind: AttachKind,
    /// File to open (mmap, libmshare, limit).
    #[arg(long)]
    path: Option<PathBuf>,
    /// Bytes to map (mmap, limit, anon-hugetlb).
    #[arg(long, default_value_t = 0)]
    size: u64,
    /// Bytes between touches.
    #[arg(long, default_value_t = 4096)]
    stride: u64,
    /// Instead of touching, fault every page in with `MADV_POPULATE_WRITE` (the same page
    /// tables, built faster; the faults are not counted by `getrusage`).
    #[arg(long)]
    populate: bool,
    /// Storm mode: report ready, wait for the end of standard input, attach and touch,
    /// report, stay attached until killed.
    #[arg(long)]
    storm: bool,
}

/// Writes one report line with one `write(2)`.
struct Reporter {
    out: File,
    id: u64,
}

impl Reporter {
    fn send(&mut self, mut v: Value) -> io::Result<()> {
        v["id"] = json!(self.id);
        let mut line = v.to_string();
        line.push('\n');
        self.out.write_all(line.as_bytes())
    }
}

fn missing_path() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "--path is required")
}

/// Nanoseconds since the epoch (`CLOCK_REALTIME`): comparable between processes.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The hugetlb backing of the msharefs region `path`, asked of its daemon once, the way
/// libmshare asks for it at attach (the attach socket named by `MSHAREFS_GET_INFO`).
fn hold_backing(path: &Path) -> io::Result<OwnedFd> {
    let fd = kfd::open(path, consts::O_RDWR, 0)?;
    let info = mshare::client::region_info(fd.as_fd())
        .ok_or_else(|| kernel_glue::errno(errnos::ENODEV))?;
    let socket = mshare::client::socket_path(&info)?;
    mshare::client::request_backing(socket, fd.as_fd(), Protection::ReadWrite).map(|(b, _)| b)
}

/// What is prepared before anything is timed.
struct Ready {
    /// The `limit` configuration's backing.
    backing: Option<OwnedFd>,
}

fn get_ready(args: &AttacherArgs) -> io::Result<Ready> {
    let backing = match args.kind {
        AttachKind::Limit => Some(hold_backing(args.path.as_ref().ok_or_else(missing_path)?)?),
        _ => None,
    };
    Ok(Ready { backing })
}

/// What an attach opened: closed once the clock has stopped, as the `limit` attacher
/// keeps its backing open throughout. (Closing is not part of an attach, and closing an
/// msharefs file wakes the daemon, `RELEASE`, while the touch runs.)
enum Opened {
    Nothing,
    File(#[allow(dead_code)] OwnedFd),
    Region(#[allow(dead_code)] Region),
}

/// Opens and maps; returns what is held, the time the open took (the rest is the map), and
/// what was opened.
fn attach(args: &AttacherArgs, ready: &Ready, started: Instant) -> io::Result<(Held, u64, Opened)> {
    let opened = |t: Instant| t.duration_since(started).as_nanos() as u64;
    Ok(match args.kind {
        AttachKind::Control => (Held::Nothing, 0, Opened::Nothing),
        AttachKind::Mmap => {
            let path = args.path.as_ref().ok_or_else(missing_path)?;
            let fd = kfd::open(path, consts::O_RDWR, 0)?;
            let open_ns = opened(Instant::now());
            let held = mem::map_shared(&fd, args.size)?;
            (held, open_ns, Opened::File(fd))
        }
        AttachKind::Libmshare => {
            let path = args.path.as_ref().ok_or_else(missing_path)?;
            let region = Region::open(path, consts::O_RDWR)?;
            let open_ns = opened(Instant::now());
            let held = mem::attachment(region.attach(Protection::ReadWrite)?)?;
            (held, open_ns, Opened::Region(region))
        }
        AttachKind::Limit => {
            let backing = ready.backing.as_ref().ok_or_else(missing_path)?;
            (
                mem::map_aligned(backing, args.size, kernel_glue::PUD_SIZE)?,
                0,
                Opened::Nothing,
            )
        }
        AttachKind::AnonHugetlb => (mem::map_anonymous_hugetlb(args.size)?, 0, Opened::Nothing),
    })
}

/// Attaches and touches (or populates) every page, timing it; returns what is held and
/// the report.
fn attach_and_touch(args: &AttacherArgs, ready: &Ready) -> io::Result<(Held, Value)> {
    let me = std::process::id();
    let pte0 = procfs::vm_pte(me)?;
    let start_unix_ns = unix_ns();
    let started = Instant::now();
    let (held, open_ns, opened) = attach(args, ready, started)?;
    let mapped_ns = started.elapsed().as_nanos() as u64;
    let before = procfs::faults()?;
    let touched = if args.populate {
        held.populate()?;
        0
    } else {
        held.touch(args.stride)?
    };
    let after = procfs::faults()?;
    let ns = started.elapsed().as_nanos() as u64;
    let done_unix_ns = unix_ns();
    drop(opened);
    let pte1 = procfs::vm_pte(me)?;
    let (addr, page_size, pmd_mapped) = if held.is_mapped() {
        (
            held.addr(),
            procfs::kernel_page_size(me, held.addr()).unwrap_or(0),
            procfs::smaps_field(me, held.addr(), "ShmemPmdMapped").unwrap_or(0),
        )
    } else {
        (0, 0, 0)
    };
    let report = json!({
        "ok": true,
        "ns": ns,
        "open_ns": open_ns,
        "map_ns": mapped_ns.saturating_sub(open_ns),
        "touch_ns": ns.saturating_sub(mapped_ns),
        "faults": after.minor.saturating_sub(before.minor),
        "touched": touched,
        "addr": addr,
        "page_size": page_size,
        "pmd_mapped": pmd_mapped,
        "vm_pte_delta": pte1 as i64 - pte0 as i64,
        "start_unix_ns": start_unix_ns,
        "done_unix_ns": done_unix_ns,
    });
    Ok((held, report))
}

/// `--storm`: ready, wait for the gate, attach and touch, report, stay until killed.
fn storm(args: &AttacherArgs, rep: &mut Reporter) -> io::Result<()> {
    let ready = get_ready(args)?;
    rep.send(json!({"ok": true, "ready": true}))?;
    // The gate opens when the bench closes the pipe's write end: end of input.
    let mut sink = [0u8; 64];
    let mut stdin = io::stdin().lock();
    while stdin.read(&mut sink)? > 0 {}
    let (_held, report) = attach_and_touch(args, &ready)?;
    rep.send(report)?;
    // Stay attached, costing nothing, while the others finish: the bench kills us.
    loop {
        std::thread::park();
    }
}

fn serve(args: &AttacherArgs, rep: &mut Reporter) -> io::Result<()> {
    let ready = get_ready(args)?;
    let (mut held, report) = attach_and_touch(args, &ready)?;
    rep.send(report)?;

    for line in io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_ascii_whitespace();
        match (words.next(), words.next()) {
            (Some("sweep"), n) => {
                let n: u32 = n.and_then(|n| n.parse().ok()).unwrap_or(1).max(1);
                if !held.is_mapped() {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "no mapping"));
                }
                let (mut best, mut checksum) = (0f64, 0u64);
                for _ in 0..n {
                    let t = Instant::now();
                    checksum = checksum.wrapping_add(held.sweep());
                    let secs = t.elapsed().as_secs_f64().max(1e-9);
                    best = best.max(2.0 * held.len() as f64 / secs / 1e9);
                }
                rep.send(json!({"ok": true, "sweep_gbps": best, "checksum": checksum}))?;
            }
            (Some("detach"), _) => {
                held = Held::Nothing;
                rep.send(json!({"ok": true, "detached": true}))?;
            }
            (Some("attach"), _) if !held.is_mapped() => {
                let (h, report) = attach_and_touch(args, &ready)?;
                held = h;
                rep.send(report)?;
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown command {line:?}"),
                ));
            }
        }
    }
    drop(held);
    Ok(())
}

/// Runs the attacher; see the module documentation.
///
/// # Errors
/// Whatever failed; it has been reported on standard output already.
pub fn run(args: AttacherArgs) -> io::Result<()> {
    kernel_glue::process::set_parent_death_signal(consts::SIGKILL)?;
    // The parent may have died before the signal was armed.
    if std::os::unix::process::parent_id() != args.parent {
        return Err(io::Error::other(
            "the bench that started this attacher is gone",
        ));
    }
    let out = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let mut rep = Reporter { out, id: args.id };
    let r = if args.storm {
        storm(&args, &mut rep)
    } else {
        serve(&args, &mut rep)
    };
    if let Err(e) = &r {
        let _ = rep.send(json!({
            "ok": false,
            "error": e.to_string(),
            "errno": e.raw_os_error().unwrap_or(0),
        }));
    }
    r
}
