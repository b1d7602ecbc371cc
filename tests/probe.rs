//! `mshare-probe`: the "separate process" of the integration tests.
//!
//! It creates or attaches one region the way a database process would and reports what the
//! kernel did as one JSON line on standard output; the protocol (arguments, reports, data
//! pattern) is documented and typed in the harness's `probe` module. Normal attaches use
//! only libmshare's `Region` API, so the same probe works on hugetlbfs (direct mode) and on
//! msharefs mounts. Only `--shift` bypasses libmshare, to map a file deliberately out of
//! step with the 1 GiB granule.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kernel_glue::consts::{O_RDONLY, O_RDWR};
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::{fd as kfd, procfs};
use mshare::{Attachment, Backing, Region};
use msharefs_tests::probe::{
    AttachReport, CreateReport, ProbeError, pattern_offsets, pattern_word,
};

const USAGE: &str = "usage: mshare-probe [--join CGROUP_DIR]... COMMAND
  mshare-probe attach PATH [--prot rw|ro] [--shift BYTES] [--stride BYTES]
                      [--write-pattern SEED] [--check-pattern SEED] [--touch]
                      [--hold-until-stdin-closes]
  mshare-probe create PATH --size BYTES [--mode OCTAL] [--backing default|hugetlb|thp|shmem]";

/// A failure: what failed and the io::Error (whose errno the report carries).
struct Failure {
    step: String,
    err: io::Error,
}

fn at(step: impl Into<String>) -> impl FnOnce(io::Error) -> Failure {
    let step = step.into();
    move |err| Failure { step, err }
}

/// Bad command line.
struct Usage(String);

fn parse_u64(flag: &str, v: Option<String>) -> Result<u64, Usage> {
    let v = v.ok_or_else(|| Usage(format!("{flag} needs a value")))?;
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.map_err(|_| Usage(format!("{flag}: not a number: {v}")))
}

struct AttachArgs {
    path: PathBuf,
    prot: Protection,
    shift: Option<u64>,
    stride: u64,
    write_pattern: Option<u64>,
    check_pattern: Option<u64>,
    touch: bool,
    hold: bool,
}

fn parse_attach(mut args: impl Iterator<Item = String>) -> Result<AttachArgs, Usage> {
    let path = args
        .next()
        .ok_or_else(|| Usage("attach needs a PATH".into()))?;
    let mut a = AttachArgs {
        path: PathBuf::from(path),
        prot: Protection::ReadWrite,
        shift: None,
        stride: kernel_glue::HUGE_PAGE_SIZE,
        write_pattern: None,
        check_pattern: None,
        touch: false,
        hold: false,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--prot" => {
                a.prot = match args.next().as_deref() {
                    Some("rw") => Protection::ReadWrite,
                    Some("ro") => Protection::ReadOnly,
                    other => return Err(Usage(format!("--prot rw|ro, not {other:?}"))),
                }
            }
            "--shift" => a.shift = Some(parse_u64(&flag, args.next())?),
            "--stride" => a.stride = parse_u64(&flag, args.next())?,
            "--write-pattern" => a.write_pattern = Some(parse_u64(&flag, args.next())?),
            "--check-pattern" => a.check_pattern = Some(parse_u64(&flag, args.next())?),
            "--touch" => a.touch = true,
            "--hold-until-stdin-closes" => a.hold = true,
            _ => return Err(Usage(format!("unknown attach option {flag}"))),
        }
    }
    if a.stride < 16 || a.stride % 8 != 0 {
        return Err(Usage(
            "--stride must be a multiple of 8, at least 16".into(),
        ));
    }
    if a.write_pattern.is_some() && a.prot == Protection::ReadOnly {
        return Err(Usage("--write-pattern needs --prot rw".into()));
    }
    Ok(a)
}

/// What the probe maps: a libmshare attachment (with its open region), or a raw mapping.
enum Attached {
    Region {
        _region: Region,
        attachment: Attachment,
    },
    Raw(Mapping),
}

impl Attached {
    fn mapping(&self) -> &Mapping {
        match self {
            Attached::Region { attachment, .. } => attachment.mapping(),
            Attached::Raw(m) => m,
        }
    }
}

fn attach(a: &AttachArgs) -> Result<(Attached, AttachReport), Failure> {
    let oflags = match a.prot {
        Protection::ReadWrite => O_RDWR,
        Protection::ReadOnly => O_RDONLY,
    };
    let attached = match a.shift {
        None => {
            let region = Region::open(&a.path, oflags).map_err(at("open region"))?;
            let attachment = region.attach(a.prot).map_err(at("attach region"))?;
            Attached::Region {
                _region: region,
                attachment,
            }
        }
        Some(shift) => {
            let fd = kfd::open(&a.path, oflags, 0).map_err(at("open file"))?;
            let size = kfd::fstat(&fd).map_err(at("fstat"))?.size;
            let m = Mapping::map_aligned_shifted(&fd, size, a.prot, kernel_glue::PUD_SIZE, shift)
                .map_err(at(format!("map at 1 GiB-aligned + {shift}")))?;
            Attached::Raw(m)
        }
    };
    let m = attached.mapping();
    let pid = std::process::id();
    let len = m.len() as u64;
    let kernel_page_size =
        procfs::kernel_page_size(pid, m.addr()).map_err(at("read KernelPageSize"))?;

    let mut report = AttachReport {
        pid,
        addr: m.addr() as u64,
        len,
        prot: match a.prot {
            Protection::ReadWrite => "rw".into(),
            Protection::ReadOnly => "ro".into(),
        },
        kernel_page_size,
        stride: a.stride,
        touched: None,
        touch_minor_faults: None,
        touch_major_faults: None,
        touch_ns: None,
        pattern_written: false,
        pattern_ok: None,
        pattern_mismatches: None,
        vm_pte: 0,
    };

    if a.touch {
        let pages = len / a.stride;
        let before = procfs::faults().map_err(at("getrusage"))?;
        let start = Instant::now();
        touch(m, a.stride, pages);
        let ns = start.elapsed().as_nanos() as u64;
        let after = procfs::faults().map_err(at("getrusage"))?;
        report.touched = Some(pages);
        report.touch_minor_faults = Some(after.minor - before.minor);
        report.touch_major_faults = Some(after.major - before.major);
        report.touch_ns = Some(ns);
    }
    if let Some(seed) = a.write_pattern {
        for off in pattern_offsets(len, a.stride) {
            m.store_u64(off, pattern_word(seed, off))
                .map_err(at("write pattern"))?;
        }
        report.pattern_written = true;
    }
    if let Some(seed) = a.check_pattern {
        let mut bad = 0u64;
        for off in pattern_offsets(len, a.stride) {
            if m.load_u64(off).map_err(at("check pattern"))? != pattern_word(seed, off) {
                bad += 1;
            }
        }
        report.pattern_ok = Some(bad == 0);
        report.pattern_mismatches = Some(bad);
    }
    report.vm_pte = procfs::vm_pte(pid).map_err(at("read VmPTE"))?;
    Ok((attached, report))
}

/// Touches the first word of each of `pages` strides: a volatile read for a read-only
/// mapping, an atomic add of zero (a write access that changes nothing, even while other
/// processes write the word) for a read-write one. Nothing else happens in the loop, so
/// the `getrusage` fault delta around it counts the region's faults only.
fn touch(m: &Mapping, stride: u64, pages: u64) {
    let base = m.as_ptr();
    let mut sink = 0u64;
    for i in 0..pages {
        let off = (i * stride) as usize;
        match m.protection() {
            Protection::ReadOnly => {
                sink ^= m.load_u64(off as u64).expect("offset inside the mapping");
            }
            Protection::ReadWrite => {
                let p = base.wrapping_add(off) as *mut u64;
                // SAFETY: `p` is inside the mapping (off < len), 8-byte aligned (the mapping
                // is page-aligned and the stride a multiple of 8) and writable; the mapping
                // outlives the reference. Other processes access the word only with
                // volatile or atomic word-sized operations.
                let word = unsafe { AtomicU64::from_ptr(p) };
                sink ^= word.fetch_add(0, Ordering::Relaxed);
            }
        }
    }
    std::hint::black_box(sink);
}

fn parse_create(
    mut args: impl Iterator<Item = String>,
) -> Result<(PathBuf, u64, u32, Backing), Usage> {
    let path = args
        .next()
        .ok_or_else(|| Usage("create needs a PATH".into()))?;
    let (mut size, mut mode, mut backing) = (None, 0o600, Backing::Default);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--size" => size = Some(parse_u64(&flag, args.next())?),
            "--mode" => {
                let v = args.next().unwrap_or_default();
                mode = u32::from_str_radix(&v, 8)
                    .map_err(|_| Usage(format!("--mode: not octal: {v}")))?;
            }
            "--backing" => {
                let v = args.next().unwrap_or_default();
                backing = Backing::from_name(&v)
                    .ok_or_else(|| Usage(format!("--backing: unknown backing {v}")))?;
            }
            _ => return Err(Usage(format!("unknown create option {flag}"))),
        }
    }
    let size = size.ok_or_else(|| Usage("create needs --size".into()))?;
    Ok((PathBuf::from(path), size, mode, backing))
}

fn print_json(v: &impl serde::Serialize) {
    let line = serde_json::to_string(v).expect("reports serialize");
    let mut out = io::stdout().lock();
    // The test reads this line; if it is gone there is nobody to tell.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fail(step: &str, err: Option<&io::Error>, code: u8) -> ExitCode {
    let error = match err {
        Some(e) => format!("{step}: {e}"),
        None => step.to_string(),
    };
    eprintln!("mshare-probe: {error}");
    print_json(&ProbeError {
        error,
        errno: err.and_then(io::Error::raw_os_error),
    });
    ExitCode::from(code)
}

/// Moves this process into the cgroup directory `dir` (writing "0" to its
/// `cgroup.procs` moves the writer), so what it allocates is charged there.
fn join_cgroup(dir: &str) -> io::Result<()> {
    std::fs::write(PathBuf::from(dir).join("cgroup.procs"), "0")
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    while args.peek().map(String::as_str) == Some("--join") {
        args.next();
        let dir = args.next().unwrap_or_default();
        if let Err(e) = join_cgroup(&dir) {
            return fail(&format!("join cgroup {dir}"), Some(&e), 1);
        }
    }
    match args.next().as_deref() {
        Some("attach") => {
            let a = match parse_attach(args) {
                Ok(a) => a,
                Err(Usage(m)) => return fail(&format!("{m}\n{USAGE}"), None, 2),
            };
            let (attached, report) = match attach(&a) {
                Ok(r) => r,
                Err(f) => return fail(&f.step, Some(&f.err), 1),
            };
            print_json(&report);
            if a.hold {
                // Keep the mapping until the test closes our stdin (or dies).
                let mut sink = [0u8; 64];
                let mut stdin = io::stdin().lock();
                while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            }
            drop(attached);
            ExitCode::SUCCESS
        }
        Some("create") => {
            let (path, size, mode, backing) = match parse_create(args) {
                Ok(c) => c,
                Err(Usage(m)) => return fail(&format!("{m}\n{USAGE}"), None, 2),
            };
            match Region::create(&path, size, mode, backing) {
                Ok(region) => {
                    print_json(&CreateReport {
                        pid: std::process::id(),
                        size: region.size(),
                        backing: region.backing().name().to_string(),
                    });
                    ExitCode::SUCCESS
                }
                Err(e) => fail("create region", Some(&e), 1),
            }
        }
        _ => fail(USAGE, None, 2),
    }
}
