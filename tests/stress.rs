//! `mshare-stress`: the worker processes of the reliability tests (`crash.rs`,
//! `concurrency.rs`, `exhaustion.rs`).
//!
//! ```text
//! mshare-stress writer HUGE THP --id I --writers N --round R [--pace-us US]
//! mshare-stress verify HUGE THP --writers N --round R --counts C0,C1,...
//! mshare-stress churn MOUNT --id I --secs S --seed X [--shared K] [--private P]
//! mshare-stress open-many PATH --max N
//! ```
//!
//! - `writer` attaches the hugetlb region `HUGE` with libmshare and maps the thp region
//!   `THP` with a plain shared mapping of the msharefs file (FUSE passthrough), prints
//!   `writing`, then writes checksummed 64-byte records into its own slice (`1/N` of each
//!   region, used as a ring) until its standard input closes, and prints
//!   `{"id":I,"records":COUNT}`: records `0..COUNT` were written completely.
//! - `verify` attaches both regions read-only (through whatever daemon serves them now)
//!   and checks, for every writer, the last `min(COUNT, ring size)` records; prints
//!   `{"checked":N,"lost":M,"first_bad":...}`.
//! - `churn` creates, attaches, detaches, unlinks and renames regions on `MOUNT` for `S`
//!   seconds (shared names `s0..sK` that every worker uses, private names `pI-0..pI-P`,
//!   both created with libmshare, and shared names `r0..r3` created with the plain uAPI)
//!   and prints a JSON summary: operations, errnos met, errnos that no race explains, and
//!   the slowest operation.
//! - `open-many` opens `PATH` read-only until `N` handles or an error, prints
//!   `{"opened":N,"errno":E}` and holds the handles until standard input closes.
//!
//! Exit status 0 unless something failed that the protocol does not report in JSON.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kernel_glue::consts::{O_RDONLY, O_RDWR};
use kernel_glue::errnos::*;
use kernel_glue::fd as kfd;
use kernel_glue::mapping::{Mapping, Protection};
use mshare::{Attachment, Backing, Region};

/// Bytes per record: 8 words, the last a checksum of the first 7.
const REC: u64 = 64;
const MAGIC: u64 = 0x6d73_6861_7265_6673;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The record writer `id` writes as its `seq`-th in round `round`.
fn record(round: u64, id: u64, seq: u64) -> [u64; 8] {
    let mut w = [0u64; 8];
    w[0] = MAGIC ^ round;
    w[1] = id;
    w[2] = seq;
    for (k, x) in w.iter_mut().enumerate().take(7).skip(3) {
        *x = mix(round.wrapping_mul(31).wrapping_add(id) ^ seq.rotate_left(17) ^ k as u64);
    }
    w[7] = checksum(&w);
    w
}

fn checksum(w: &[u64; 8]) -> u64 {
    w[..7]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &x| mix(h ^ x))
}

/// Byte range of writer `id`'s slice of a region of `len` bytes shared by `writers`.
fn slice_of(len: u64, writers: u64, id: u64) -> (u64, u64) {
    let per = (len / writers) / REC * REC;
    (id * per, per / REC)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("mshare-stress: {msg}");
    ExitCode::from(2)
}

fn print_line(s: &str) {
    let mut out = io::stdout().lock();
    // The test reads the line; when it is gone there is nobody to tell.
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

/// Options `--name value` after the positional arguments.
fn options(args: &[String]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        if let Some(name) = k.strip_prefix("--") {
            m.insert(name.to_string(), it.next().cloned().unwrap_or_default());
        }
    }
    m
}

fn num(opts: &BTreeMap<String, String>, name: &str, default: Option<u64>) -> Result<u64, String> {
    match opts.get(name) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("--{name}: not a number: {v}")),
        None => default.ok_or_else(|| format!("--{name} is required")),
    }
}

/// A thread that sets the flag when standard input closes.
fn stop_on_stdin_close() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        s.store(true, Ordering::SeqCst);
    });
    stop
}

/// The hugetlb region attached through libmshare, the thp region mapped plainly.
fn map_both(huge: &Path, thp: &Path, prot: Protection) -> io::Result<(Attachment, Mapping)> {
    let oflags = match prot {
        Protection::ReadWrite => O_RDWR,
        Protection::ReadOnly => O_RDONLY,
    };
    let region = Region::open(huge, oflags)?;
    let a = region.attach(prot)?;
    drop(region);
    let fd = kfd::open(thp, oflags, 0)?;
    let size = kfd::fstat(&fd)?.size;
    let m = Mapping::map_aligned(&fd, size, prot, kernel_glue::HUGE_PAGE_SIZE)?;
    Ok((a, m))
}

fn write_record(m: &Mapping, off: u64, w: &[u64; 8]) -> io::Result<()> {
    for (k, &x) in w.iter().enumerate() {
        m.store_u64(off + 8 * k as u64, x)?;
    }
    Ok(())
}

fn writer(args: &[String]) -> ExitCode {
    let (Some(huge), Some(thp)) = (args.first(), args.get(1)) else {
        return usage("writer HUGE THP --id I --writers N --round R");
    };
    let opts = options(&args[2..]);
    let parsed = (|| {
        Ok::<_, String>((
            num(&opts, "id", None)?,
            num(&opts, "writers", None)?,
            num(&opts, "round", None)?,
            num(&opts, "pace-us", Some(200))?,
        ))
    })();
    let (id, writers, round, pace) = match parsed {
        Ok(v) => v,
        Err(e) => return usage(&e),
    };
    let (a, t) = match map_both(Path::new(huge), Path::new(thp), Protection::ReadWrite) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mshare-stress writer {id}: attach: {e}");
            return ExitCode::FAILURE;
        }
    };
    let maps = [a.mapping(), &t];
    let slices: Vec<(u64, u64)> = maps
        .iter()
        .map(|m| slice_of(m.len() as u64, writers, id))
        .collect();
    let stop = stop_on_stdin_close();
    print_line("writing");
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        // A batch, then a short pause: the writers must not starve the daemon's restart
        // of the two CPUs.
        for _ in 0..256 {
            let w = record(round, id, seq);
            for (m, &(base, cap)) in maps.iter().zip(&slices) {
                if let Err(e) = write_record(m, base + (seq % cap) * REC, &w) {
                    eprintln!("mshare-stress writer {id}: write: {e}");
                    return ExitCode::FAILURE;
                }
            }
            seq += 1;
        }
        std::thread::sleep(Duration::from_micros(pace));
    }
    print_line(&format!(r#"{{"id":{id},"records":{seq}}}"#));
    ExitCode::SUCCESS
}

fn verify(args: &[String]) -> ExitCode {
    let (Some(huge), Some(thp)) = (args.first(), args.get(1)) else {
        return usage("verify HUGE THP --writers N --round R --counts C0,C1,...");
    };
    let opts = options(&args[2..]);
    let parsed = (|| {
        let counts: Result<Vec<u64>, _> = opts
            .get("counts")
            .ok_or("--counts is required")?
            .split(',')
            .map(|c| c.parse::<u64>())
            .collect();
        Ok::<_, String>((
            num(&opts, "writers", None)?,
            num(&opts, "round", None)?,
            counts.map_err(|e| format!("--counts: {e}"))?,
        ))
    })();
    let (writers, round, counts) = match parsed {
        Ok(v) => v,
        Err(e) => return usage(&e),
    };
    let (a, t) = match map_both(Path::new(huge), Path::new(thp), Protection::ReadOnly) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mshare-stress verify: attach: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut checked, mut lost) = (0u64, 0u64);
    let mut first_bad = String::from("null");
    for (name, m) in [("hugetlb", a.mapping()), ("thp", &t)] {
        for (id, &count) in counts.iter().enumerate().take(writers as usize) {
            let id = id as u64;
            let (base, cap) = slice_of(m.len() as u64, writers, id);
            for seq in count.saturating_sub(cap)..count {
                let off = base + (seq % cap) * REC;
                let mut got = [0u64; 8];
                for (k, g) in got.iter_mut().enumerate() {
                    *g = m.load_u64(off + 8 * k as u64).unwrap_or(0);
                }
                checked += 1;
                if got != record(round, id, seq) {
                    if lost == 0 {
                        first_bad = format!(
                            r#"{{"region":"{name}","writer":{id},"seq":{seq},"words":"{got:x?}"}}"#
                        );
                    }
                    lost += 1;
                }
            }
        }
    }
    print_line(&format!(
        r#"{{"checked":{checked},"lost":{lost},"first_bad":{first_bad}}}"#
    ));
    ExitCode::SUCCESS
}

/// Errnos a racing operation can meet with other workers changing the same names: the
/// name went or came. Nothing else on libmshare's names: `Region::create` makes a name
/// appear with its backing and size already set, so no worker finds a region half made.
const RACE_ERRNOS: [i32; 2] = [ENOENT, EEXIST];

/// Also explained on the raw names (`rK`), whose creators use the plain uAPI (create,
/// close, choose the backing, open, size) while others open them: a region not sized yet
/// (`EINVAL`), a backing change refused because another worker has the region open
/// (`EBUSY`). Never `EIO`: that is the kernel failing an open the daemon answered for a
/// backing that changed before the kernel applied it.
const RAW_RACE_ERRNOS: [i32; 4] = [ENOENT, EEXIST, EINVAL, EBUSY];

/// Names shared by every worker that are created through the plain uAPI.
const RAW_NAMES: u64 = 4;

/// The slowest an operation may be before it counts as stuck.
const SLOW: Duration = Duration::from_secs(10);

struct Churn {
    mount: PathBuf,
    id: u64,
    shared: u64,
    private: u64,
    rng: u64,
    held: Vec<Attachment>,
    ops: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    unexpected: Vec<String>,
    slowest: (Duration, String),
    /// What the current operation is doing, for failure messages.
    detail: String,
}

impl Churn {
    fn next(&mut self) -> u64 {
        self.rng = mix(self.rng);
        self.rng
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn name(&mut self) -> PathBuf {
        let shared = self.below(3) != 0;
        if shared {
            let k = self.below(self.shared);
            self.mount.join(format!("s{k}"))
        } else {
            let k = self.below(self.private);
            self.mount.join(format!("p{}-{k}", self.id))
        }
    }

    fn raw_name(&mut self) -> PathBuf {
        let k = self.below(RAW_NAMES);
        self.mount.join(format!("r{k}"))
    }

    /// A name for an operation other than create and rename: now and then a raw one.
    fn any_name(&mut self) -> (PathBuf, &'static [i32]) {
        if self.below(5) == 0 {
            (self.raw_name(), &RAW_RACE_ERRNOS)
        } else {
            (self.name(), &RACE_ERRNOS)
        }
    }

    fn record(&mut self, op: &'static str, r: io::Result<()>, explained: &[i32], took: Duration) {
        *self.ops.entry(op).or_default() += 1;
        if took > self.slowest.0 {
            self.slowest = (took, op.to_string());
        }
        if took > SLOW {
            self.unexpect(format!("{op} took {} ms", took.as_millis()));
        }
        if let Err(e) = r {
            let errno = e.raw_os_error();
            *self
                .errors
                .entry(format!("{op}:{}", errno.unwrap_or(-1)))
                .or_default() += 1;
            if !errno.is_some_and(|n| explained.contains(&n)) {
                let detail = std::mem::take(&mut self.detail);
                self.unexpect(format!("{op} ({detail}): {e}"));
            }
        }
    }

    /// Keeps the first 20 unexpected failures (the counts are in `errors`).
    fn unexpect(&mut self, what: String) {
        if self.unexpected.len() < 20 {
            self.unexpected.push(what);
        }
    }

    fn step(&mut self) {
        let start = Instant::now();
        let pick = self.below(100);
        let backing = match self.below(3) {
            0 => Backing::Hugetlb,
            1 => Backing::Thp,
            _ => Backing::Shmem,
        };
        let size = (1 + self.below(2)) * kernel_glue::HUGE_PAGE_SIZE;
        let (op, r, explained): (&'static str, io::Result<()>, &[i32]) = match pick {
            0..=15 => {
                let path = self.name();
                let mode = if self.below(2) == 0 { 0o600 } else { 0o644 };
                self.detail = format!("{} {} bytes {backing:?}", path.display(), size);
                (
                    "create",
                    Region::create(&path, size, mode, backing).map(drop),
                    &RACE_ERRNOS,
                )
            }
            16..=19 => {
                let path = self.raw_name();
                (
                    "create-raw",
                    self.create_raw(&path, size, backing),
                    &RAW_RACE_ERRNOS,
                )
            }
            20..=44 => {
                let (path, explained) = self.any_name();
                let rw = self.below(4) != 0;
                let r = self.attach(&path, rw);
                ("attach", r, explained)
            }
            45..=59 => {
                if !self.held.is_empty() {
                    let i = self.below(self.held.len() as u64) as usize;
                    self.held.swap_remove(i);
                }
                ("detach", Ok(()), &RACE_ERRNOS)
            }
            60..=74 => {
                let (path, explained) = self.any_name();
                ("unlink", std::fs::remove_file(path), explained)
            }
            75..=89 => {
                // Among libmshare's names only: a raw region may be unsized.
                let (a, b) = (self.name(), self.name());
                ("rename", std::fs::rename(a, b), &RACE_ERRNOS)
            }
            _ => {
                let (path, explained) = self.any_name();
                ("stat", std::fs::metadata(path).map(drop), explained)
            }
        };
        self.record(op, r, explained, start.elapsed());
    }

    /// The plain uAPI sequence of a C program that does not use libmshare.
    fn create_raw(&mut self, path: &Path, size: u64, backing: Backing) -> io::Result<()> {
        self.detail = format!("{} raw create", path.display());
        drop(kfd::open(
            path,
            O_RDWR | kernel_glue::consts::O_CREAT | kernel_glue::consts::O_EXCL,
            0o644,
        )?);
        self.detail = format!("{} raw backing {backing:?}", path.display());
        mshare::set_backing(path, backing)?;
        self.detail = format!("{} raw open", path.display());
        let fd = kfd::open(path, O_RDWR, 0)?;
        self.detail = format!("{} raw size {size}", path.display());
        kfd::ftruncate(&fd, size)
    }

    fn attach(&mut self, path: &Path, rw: bool) -> io::Result<()> {
        let (oflags, prot) = if rw {
            (O_RDWR, Protection::ReadWrite)
        } else {
            (O_RDONLY, Protection::ReadOnly)
        };
        self.detail = format!("{} open", path.display());
        let region = Region::open(path, oflags)?;
        self.detail = format!(
            "{} attach {:?} of {} bytes",
            path.display(),
            region.backing(),
            region.size()
        );
        let a = region.attach(prot)?;
        // Touch it: a word of our own, or a read.
        let off = (self.id % 64) * 8;
        if rw {
            a.mapping().store_u64(off, self.id)?;
        } else {
            a.mapping().load_u64(off)?;
        }
        self.held.push(a);
        if self.held.len() > 4 {
            self.held.remove(0);
        }
        Ok(())
    }
}

fn churn(args: &[String]) -> ExitCode {
    let Some(mount) = args.first() else {
        return usage("churn MOUNT --id I --secs S --seed X [--shared K] [--private P]");
    };
    let opts = options(&args[1..]);
    let parsed = (|| {
        Ok::<_, String>((
            num(&opts, "id", None)?,
            num(&opts, "secs", None)?,
            num(&opts, "seed", None)?,
            num(&opts, "shared", Some(8))?,
            num(&opts, "private", Some(3))?,
        ))
    })();
    let (id, secs, seed, shared, private) = match parsed {
        Ok(v) => v,
        Err(e) => return usage(&e),
    };
    let mut c = Churn {
        mount: PathBuf::from(mount),
        id,
        shared,
        private,
        rng: mix(seed ^ id.wrapping_mul(0x1000_0001)),
        held: Vec::new(),
        ops: BTreeMap::new(),
        errors: BTreeMap::new(),
        unexpected: Vec::new(),
        slowest: (Duration::ZERO, String::new()),
        detail: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut total = 0u64;
    while Instant::now() < deadline {
        c.step();
        total += 1;
    }
    c.held.clear();
    let ops = serde_json::to_string(&c.ops).unwrap_or_default();
    let errors = serde_json::to_string(&c.errors).unwrap_or_default();
    let unexpected = serde_json::to_string(&c.unexpected).unwrap_or_default();
    print_line(&format!(
        r#"{{"id":{id},"total":{total},"ops":{ops},"errors":{errors},"unexpected":{unexpected},"slowest_ms":{},"slowest_op":"{}"}}"#,
        c.slowest.0.as_millis(),
        c.slowest.1
    ));
    ExitCode::SUCCESS
}

fn open_many(args: &[String]) -> ExitCode {
    let Some(path) = args.first() else {
        return usage("open-many PATH --max N");
    };
    let opts = options(&args[1..]);
    let max = match num(&opts, "max", None) {
        Ok(v) => v,
        Err(e) => return usage(&e),
    };
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut errno = 0;
    while (held.len() as u64) < max {
        match kfd::open(Path::new(path), O_RDONLY, 0) {
            Ok(fd) => held.push(fd),
            Err(e) => {
                errno = e.raw_os_error().unwrap_or(-1);
                break;
            }
        }
    }
    print_line(&format!(r#"{{"opened":{},"errno":{errno}}}"#, held.len()));
    // Hold until the test lets go.
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
    drop(held);
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    match args.first().map(String::as_str) {
        Some("writer") => writer(rest),
        Some("verify") => verify(rest),
        Some("churn") => churn(rest),
        Some("open-many") => open_many(rest),
        _ => usage("writer | verify | churn | open-many (see the source's module docs)"),
    }
}
