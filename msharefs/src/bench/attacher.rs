//! One attacher process of `msharefs bench` (the hidden `msharefs bench-attacher`
//! subcommand): maps the region the way its configuration says, touches every page, and
//! reports what that cost, then obeys commands on standard input until it closes.
//!
//! Protocol: every report is one JSON line on standard output, written with a single
//! `write(2)` (standard output is a datagram socket all attachers share: one line is one
//! datagram), tagged with the attacher's `id`:
//!
//! - at start: `{"id", "ok": true, "ns", "open_ns", "map_ns", "touch_ns", "faults",
//!   "touched", "addr", "page_size", "pmd_mapped", "vm_pte_delta"}`: `ns` from just before
//!   open/attach to just after the last touch (split into its three steps), `faults` the
//!   minor faults of the touch loop alone (`getrusage`);
//! - `sweep N` → `{"id", "ok": true, "sweep_gbps", "checksum"}`: the best of N read+write
//!   sweeps of the whole mapping, in GB/s of memory traffic (bytes read plus bytes written);
//! - `detach` → `{"id", "ok": true, "detached": true}` once the mapping is gone;
//! - `attach` (after `detach`) → attaches and touches again, with the first report's fields;
//! - end of input: exit 0.
//!
//! Any failure is reported as `{"id", "ok": false, "error", "errno"}` and exits non-zero.
//! The process dies with its parent (`PR_SET_PDEATHSIG`), so an interrupted bench leaves
//! no attacher behind.

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::{bench_sys, consts, fd as kfd, procfs};
use mshare::{Attachment, Region};
use serde_json::{Value, json};

/// How an attacher gets at the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachKind {
    /// Maps nothing: the control process.
    Control,
    /// Opens `--path` and maps it `MAP_SHARED` at a kernel-chosen address.
    Mmap,
    /// Opens the msharefs region `--path` and attaches it through libmshare.
    Libmshare,
    /// Maps `--size` bytes of anonymous private hugetlb memory (the bandwidth reference).
    AnonHugetlb,
}

/// Arguments of `msharefs bench-attacher` (started by `msharefs bench` only).
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
    /// File to open (mmap, libmshare).
    #[arg(long)]
    path: Option<PathBuf>,
    /// Bytes to map (mmap, anon-hugetlb).
    #[arg(long, default_value_t = 0)]
    size: u64,
    /// Bytes between touches.
    #[arg(long, default_value_t = 4096)]
    stride: u64,
    /// Instead of touching, fault every page in with `MADV_POPULATE_WRITE` (the same page
    /// tables, built faster; the faults are not counted by `getrusage`).
    #[arg(long)]
    populate: bool,
}

/// What the process holds; dropping it detaches.
enum Held {
    Nothing,
    Mapping(Mapping),
    Attachment(Attachment),
}

impl Held {
    fn mapping(&self) -> Option<&Mapping> {
        match self {
            Held::Nothing => None,
            Held::Mapping(m) => Some(m),
            Held::Attachment(a) => Some(a.mapping()),
        }
    }
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

/// Opens and maps; returns what is held and the time the open took (the rest is the map).
fn attach(args: &AttacherArgs, started: Instant) -> io::Result<(Held, u64)> {
    let opened = |t: Instant| t.duration_since(started).as_nanos() as u64;
    Ok(match args.kind {
        AttachKind::Control => (Held::Nothing, 0),
        AttachKind::Mmap => {
            let path = args.path.as_ref().ok_or_else(missing_path)?;
            let fd = kfd::open(path, consts::O_RDWR, 0)?;
            let open_ns = opened(Instant::now());
            let m = bench_sys::mmap_shared(&fd, args.size, Protection::ReadWrite)?;
            (Held::Mapping(m), open_ns)
        }
        AttachKind::Libmshare => {
            let path = args.path.as_ref().ok_or_else(missing_path)?;
            let region = Region::open(path, consts::O_RDWR)?;
            let open_ns = opened(Instant::now());
            (
                Held::Attachment(region.attach(Protection::ReadWrite)?),
                open_ns,
            )
        }
        AttachKind::AnonHugetlb => (
            Held::Mapping(bench_sys::mmap_anonymous_hugetlb(args.size)?),
            0,
        ),
    })
}

/// Attaches and touches (or populates) every page, timing it; returns what is held and
/// the report.
fn attach_and_touch(args: &AttacherArgs) -> io::Result<(Held, Value)> {
    let me = std::process::id();
    let pte0 = procfs::vm_pte(me)?;
    let started = Instant::now();
    let (held, open_ns) = attach(args, started)?;
    let mapped_ns = started.elapsed().as_nanos() as u64;
    let before = procfs::faults()?;
    let touched = match held.mapping() {
        Some(m) if args.populate => {
            m.populate(0, m.len() as u64)?;
            0
        }
        Some(m) => bench_sys::touch(m, args.stride)?,
        None => 0,
    };
    let after = procfs::faults()?;
    let ns = started.elapsed().as_nanos() as u64;
    let pte1 = procfs::vm_pte(me)?;
    let (addr, page_size, pmd_mapped) = match held.mapping() {
        Some(m) => (
            m.addr(),
            procfs::kernel_page_size(me, m.addr()).unwrap_or(0),
            procfs::smaps_field(me, m.addr(), "ShmemPmdMapped").unwrap_or(0),
        ),
        None => (0, 0, 0),
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
    });
    Ok((held, report))
}

fn serve(args: &AttacherArgs, rep: &mut Reporter) -> io::Result<()> {
    let (mut held, report) = attach_and_touch(args)?;
    rep.send(report)?;

    for line in io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_ascii_whitespace();
        match (words.next(), words.next()) {
            (Some("sweep"), n) => {
                let n: u32 = n.and_then(|n| n.parse().ok()).unwrap_or(1).max(1);
                let m = held
                    .mapping()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no mapping"))?;
                let (mut best, mut checksum) = (0f64, 0u64);
                for _ in 0..n {
                    let t = Instant::now();
                    checksum = checksum.wrapping_add(bench_sys::sweep(m)?);
                    let secs = t.elapsed().as_secs_f64().max(1e-9);
                    best = best.max(2.0 * m.len() as f64 / secs / 1e9);
                }
                rep.send(json!({"ok": true, "sweep_gbps": best, "checksum": checksum}))?;
            }
            (Some("detach"), _) => {
                held = Held::Nothing;
                rep.send(json!({"ok": true, "detached": true}))?;
            }
            (Some("attach"), _) if held.mapping().is_none() => {
                let (h, report) = attach_and_touch(args)?;
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
    let r = serve(&args, &mut rep);
    if let Err(e) = &r {
        let _ = rep.send(json!({
            "ok": false,
            "error": e.to_string(),
            "errno": e.raw_os_error().unwrap_or(0),
        }));
    }
    r
}
