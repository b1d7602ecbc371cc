//! The run: its order, the memory guard, the time budget, and clean-up on errors and
//! signals (docs/BENCHMARKS.md, "What is measured, exactly").
//!
//! For N attacher processes of a G GiB region, for each configuration ([`Config`]: plain
//! 4 KiB shmem, plain hugetlb at kernel-chosen addresses, THP tmpfs, msharefs hugetlb
//! through libmshare, and the `limit` reference), it measures:
//!
//! - **page-table bytes per attacher per GiB**: `PageTables` of `/proc/meminfo` (after
//!   `vm.stat_refresh`) with all N attachers attached and every page touched, minus
//!   `PageTables` once the same N processes have unmapped the region (the control: the
//!   same processes without the region), divided by N and G; the median over up to
//!   [`WINDOWS`] detach/re-attach windows per round and then over the rounds. A second
//!   figure uses separate control processes (`PageTables` with the N attachers minus after
//!   they exit, minus N times what a control process that maps nothing costs).
//! - **minor faults per attacher per GiB** of the touch loop (`getrusage` in the attacher);
//! - **attach+touch time**: median and p99 over the attachers, each measured in its own
//!   process from just before open/attach to just after the last touch; attachers start
//!   one after another, so each runs alone. Only the first `--timed` attachers of a round
//!   touch; the rest build the same page tables with `MADV_POPULATE_WRITE` (4x faster for
//!   4 KiB pages), so that 512 attachers of 8 GiB fit in minutes, and count for page
//!   tables only;
//! - **attach+touch against `limit` in pairs** (msharefs-hugetlb, when `limit` runs too):
//!   [`PAIRS`] pairs of a libmshare attacher and a `limit` attacher on msharefs-hugetlb's
//!   own region, one right after the other, the order alternating; the ratio of the two
//!   medians judges the 2x target, since both halves of a pair see the same machine;
//! - **bandwidth ratio**: the best of S read+write sweeps of the whole region in one
//!   attacher over the best of S sweeps of an anonymous `MAP_HUGETLB` mapping of the same
//!   size in another process, the two alternating sweep by sweep.
//!
//! `limit` is the floor of attach+touch: an attacher that holds the region's hugetlb
//! backing already (asked of the daemon once, before its clock starts) maps it at a
//! 1 GiB-aligned address and touches it. With `--storm N` the run measures storms instead
//! (module `storm`).
//!
//! Safety of the machine: before each attacher the memory guard checks that `MemAvailable`
//! stays above `--reserve-mib` plus what the attacher will need, and stops adding
//! attachers otherwise (recorded as `attachers_measured` and a note); a time budget does
//! the same. Every resource is a guard released on any exit, including SIGINT, SIGTERM and
//! SIGHUP, which set a flag every wait checks. msharefs is driven through its command line
//! and libmshare, as a user would; nothing here knows the daemon's insides or the test
//! harness.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kernel_glue::procfs;

use crate::attacher::AttachKind;
use crate::fleet::{Attacher, Fleet, Spec};
use crate::report::{ConfigResult, Report};
use crate::setup::{self, Target, WorkDir};
use crate::storm;

pub const GIB: u64 = 1 << 30;

/// The configurations, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Config {
    /// A plain memfd (4 KiB pages) mapped by each process.
    #[value(name = "shmem-4k")]
    Shmem4k,
    /// A plain MFD_HUGETLB memfd mapped with mmap(NULL): kernel-chosen addresses.
    #[value(name = "hugetlb-kernel-placed")]
    HugetlbKernelPlaced,
    /// A file on a tmpfs mounted huge=always, mapped by each process.
    #[value(name = "thp")]
    Thp,
    /// A region on msharefs (hugetlb backing) attached through libmshare.
    #[value(name = "msharefs-hugetlb")]
    MsharefsHugetlb,
    /// The floor: the msharefs region's hugetlb backing, held already (asked of the
    /// daemon once, before the clock starts), mapped 1 GiB-aligned.
    #[value(name = "limit")]
    Limit,
}

/// All configurations.
pub const ALL_CONFIGS: [Config; 5] = [
    Config::Shmem4k,
    Config::HugetlbKernelPlaced,
    Config::Thp,
    Config::MsharefsHugetlb,
    Config::Limit,
];

impl Config {
    /// The name used in tables, JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Config::Shmem4k => "shmem-4k",
            Config::HugetlbKernelPlaced => "hugetlb-kernel-placed",
            Config::Thp => "thp",
            Config::MsharefsHugetlb => "msharefs-hugetlb",
            Config::Limit => "limit",
        }
    }
}

/// Arguments of `msharefs-bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Attacher processes per configuration [default: 64; with --quick: 4].
    #[arg(long)]
    attachers: Option<usize>,
    /// Region size in GiB [default: 4; with --quick: 1].
    #[arg(long)]
    size_gib: Option<u64>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the results as CSV to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write a chart of the results (SVG) to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// A small, fast run (4 attachers of 1 GiB, 2 rounds; with --storm: 1 GiB): checks
    /// that the benchmark works.
    #[arg(long)]
    quick: bool,
    /// Storm mode: N attachers per configuration are started and made ready first, then
    /// released at once; measures the wall time until all have touched their region.
    #[arg(long, value_name = "N")]
    storm: Option<usize>,
    /// Configurations to run, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    configs: Vec<Config>,
    /// Bytes between the attachers' touches [default: each configuration's page size,
    /// i.e. one write per page].
    #[arg(long)]
    touch_stride: Option<u64>,
    /// Rounds of N attachers per configuration; rounds after the first run only while a
    /// round takes less than 30 s [default: 3; with --quick: 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// Read+write sweeps per bandwidth figure, alternating with the reference's; the best
    /// of each counts [default: 5].
    #[arg(long)]
    sweeps: Option<u32>,
    /// Attachers per round that touch the region and are timed; the others build the same
    /// page tables with MADV_POPULATE_WRITE, about 4x faster for 4 KiB pages, and count
    /// for page tables only.
    #[arg(long, default_value_t = 64)]
    timed: usize,
    /// Stop adding attachers to a configuration after this many seconds.
    #[arg(long, default_value_t = 600)]
    max_secs_per_config: u64,
    /// MiB of memory that must stay available (MemAvailable): attachers stop being added
    /// before a step could take the machine below it.
    #[arg(long, default_value_t = 3072)]
    reserve_mib: u64,
    /// Hold an exclusive flock(2) on this file for the whole run (e.g. the lock that test
    /// runs take before they change the huge-page pool; see docs/BENCHMARKS.md).
    #[arg(long, value_name = "PATH")]
    lock: Option<PathBuf>,
    /// The msharefs binary to mount with [default: `msharefs` next to this program].
    #[arg(long, value_name = "PATH")]
    msharefs: Option<PathBuf>,
    /// Measure nothing: read the results of an earlier run from this JSON file and print
    /// the table and write --csv / --plot from them.
    #[arg(long, value_name = "FILE")]
    from_json: Option<PathBuf>,
}

/// Validated settings of one run.
#[derive(Debug, Clone)]
pub struct Opts {
    pub attachers: usize,
    pub size_gib: u64,
    pub configs: Vec<Config>,
    pub touch_stride: Option<u64>,
    rounds: usize,
    sweeps: u32,
    timed: usize,
    pub max_secs_per_config: u64,
    pub reserve: u64,
    pub storm: Option<usize>,
    pub msharefs: PathBuf,
    pub command: String,
}

impl Opts {
    fn from_args(a: &BenchArgs) -> Result<Opts, BenchError> {
        let bad = |m: String| BenchError::Usage(m);
        let attachers = a.attachers.unwrap_or(if a.quick { 4 } else { 64 });
        let size_gib = a.size_gib.unwrap_or(if a.quick { 1 } else { 4 });
        if !(1..=4096).contains(&attachers) {
            return Err(bad(format!(
                "--attachers {attachers}: must be between 1 and 4096"
            )));
        }
        if !(1..=4096).contains(&size_gib) {
            return Err(bad(format!(
                "--size-gib {size_gib}: must be between 1 and 4096"
            )));
        }
        if let Some(s) = a.touch_stride {
            if s == 0 || s % 8 != 0 || s > size_gib * GIB {
                return Err(bad(format!(
                    "--touch-stride {s}: must be a positive multiple of 8 within the region"
                )));
            }
        }
        let rounds = a.rounds.unwrap_or(if a.quick { 2 } else { 3 });
        let sweeps = a.sweeps.unwrap_or(5);
        if !(1..=20).contains(&rounds) || !(1..=20).contains(&sweeps) {
            return Err(bad("--rounds and --sweeps must be between 1 and 20".into()));
        }
        for p in [&a.plot].into_iter().flatten() {
            if p.extension().and_then(|e| e.to_str()) != Some("svg") {
                return Err(bad(format!(
                    "--plot {}: the chart is SVG; name the file *.svg",
                    p.display()
                )));
            }
        }
        if let Some(n) = a.storm {
            if !(1..=4096).contains(&n) {
                return Err(bad(format!("--storm {n}: must be between 1 and 4096")));
            }
        }
        let msharefs = match &a.msharefs {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("msharefs")))
                .ok_or_else(|| {
                    bad("cannot locate this program; name msharefs with --msharefs".into())
                })?,
        };
        let mut configs = Vec::new();
        for c in ALL_CONFIGS {
            if a.configs.is_empty() || a.configs.contains(&c) {
                configs.push(c);
            }
        }
        let command = std::iter::once("msharefs-bench".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Opts {
            attachers,
            size_gib,
            configs,
            touch_stride: a.touch_stride,
            rounds,
            sweeps,
            timed: a.timed.max(1),
            max_secs_per_config: a.max_secs_per_config,
            reserve: a.reserve_mib.saturating_mul(1 << 20),
            storm: a.storm,
            msharefs,
            command,
        })
    }

    pub fn size(&self) -> u64 {
        self.size_gib * GIB
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// SIGINT, SIGTERM or SIGHUP arrived; everything was cleaned up.
    #[error("interrupted; cleaned up")]
    Interrupted,
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// A set-up step failed.
    #[error("{step}: {source}")]
    Setup {
        /// The step.
        step: &'static str,
        /// The cause, with its errno.
        #[source]
        source: io::Error,
    },
    /// Not enough memory for a step.
    #[error("not enough memory: {0}")]
    Memory(String),
    /// Starting an attacher failed.
    #[error("cannot start an attacher: {0}")]
    Spawn(#[source] io::Error),
    /// An attacher failed, died or hung.
    #[error("attacher pid {pid}: {what}")]
    Attacher {
        /// Its pid.
        pid: u32,
        /// What happened.
        what: String,
    },
    /// The bench's msharefs mount misbehaved.
    #[error("msharefs: {0}")]
    Msharefs(String),
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl BenchError {
    pub fn setup(step: &'static str, source: io::Error) -> BenchError {
        BenchError::Setup { step, source }
    }
}

/// Progress lines on standard error, with the time since the start; `throttled` lines at
/// most every 2 seconds.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    last: Option<Instant>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            start: Instant::now(),
            last: None,
        }
    }

    /// Prints a line.
    pub fn line(&mut self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:7.1}s] {}",
            self.start.elapsed().as_secs_f64(),
            msg.as_ref()
        );
        self.last = Some(Instant::now());
    }

    /// Prints a line unless one was printed in the last 2 seconds.
    pub fn throttled(&mut self, msg: impl AsRef<str>) {
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            self.line(msg);
        }
    }
}

/// A `PageTables` sample and whether it had settled.
#[derive(Debug, Clone, Copy)]
pub struct PtSample {
    pub bytes: u64,
    pub settled: bool,
}

/// `PageTables` once it has stopped moving. Each sample first folds the per-CPU counter
/// deltas (`vm.stat_refresh`), without which the counter lags by hundreds of KiB; freed
/// page tables are accounted after an RCU grace period, and other processes come and go.
/// Returns the first value seen three times in a row 10 ms apart; after 1.5 s without
/// that, the last value, marked as not settled.
pub fn settled_page_tables() -> Result<PtSample, BenchError> {
    let read = || {
        procfs::vm_stat_refresh()
            .map_err(|e| BenchError::setup("write /proc/sys/vm/stat_refresh", e))?;
        procfs::meminfo()
            .map(|m| m.page_tables)
            .map_err(|e| BenchError::setup("read /proc/meminfo", e))
    };
    std::thread::sleep(Duration::from_millis(30));
    let mut last = read()?;
    let mut same = 0;
    for _ in 0..150 {
        std::thread::sleep(Duration::from_millis(10));
        let v = read()?;
        if v == last {
            same += 1;
            if same >= 2 {
                return Ok(PtSample {
                    bytes: v,
                    settled: true,
                });
            }
        } else {
            same = 0;
            last = v;
        }
    }
    Ok(PtSample {
        bytes: last,
        settled: false,
    })
}

/// Detach/attach windows per round when re-attaching is cheap: the page-table figure of a
/// round is the median over its windows, so a window in which another process on the
/// machine changed its page tables does not count.
const WINDOWS: usize = 5;

/// Pairs of attach+touch samples, msharefs-hugetlb against `limit` on the same region
/// ([`paired_with_limit`]).
const PAIRS: usize = 48;

/// Re-attaching all attachers of a round is cheap when starting them took less than this.
const CHEAP_ROUND: Duration = Duration::from_secs(10);

pub fn mem_available() -> Result<u64, BenchError> {
    procfs::meminfo()
        .map(|m| m.mem_available)
        .map_err(|e| BenchError::setup("read /proc/meminfo", e))
}

/// Median of `v` (0 for none).
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile of `v` (0 for none).
pub fn percentile(v: &[f64], pct: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((pct / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Time limit for one attacher's report: touching 4 KiB pages runs at about 0.3 s per
/// GiB here; allow for a much slower machine.
pub fn report_limit(size: u64) -> Duration {
    Duration::from_secs(120 + 20 * size.div_ceil(GIB))
}

/// Page-table bytes one attacher of a mapping with `page_size` pages should add at most
/// (PTE pages for 4 KiB pages, PMD pages, its own process), plus slack, to keep the memory
/// guard ahead.
fn pt_estimate(page_size: u64, size: u64, control: u64) -> u64 {
    mapping_tables(page_size, size) + 4096 * size.div_ceil(GIB) + control + (16 << 20)
}

/// Page tables one attacher's mapping of `size` bytes with `page_size` pages builds: a PTE
/// page per 2 MiB for 4 KiB pages, a PMD page per GiB, rounded up.
pub fn mapping_tables(page_size: u64, size: u64) -> u64 {
    let ptes = if page_size < kernel_glue::HUGE_PAGE_SIZE {
        size.div_ceil(kernel_glue::HUGE_PAGE_SIZE) * kernel_glue::PAGE_SIZE
    } else {
        0
    };
    ptes + size.div_ceil(GIB) * kernel_glue::PAGE_SIZE
}

/// The per-process page tables of the attacher processes themselves: N control processes
/// that map nothing. Median over rounds, in bytes per process.
fn control_run(opts: &Opts, fleet: &mut Fleet, p: &mut Progress) -> Result<f64, BenchError> {
    let spec = Spec {
        kind: AttachKind::Control,
        path: None,
        size: 0,
        stride: 4096,
        populate: false,
    };
    let mut per_process = Vec::new();
    for round in 0..opts.rounds {
        let mut all: Vec<Attacher> = Vec::new();
        for _ in 0..opts.attachers {
            let mut a = fleet.spawn(&spec)?;
            fleet.report(&mut a, Duration::from_secs(60))?;
            all.push(a);
        }
        let alive = settled_page_tables()?;
        let n = all.len();
        fleet.release(all, Duration::from_secs(60))?;
        let gone = settled_page_tables()?;
        let c = (alive.bytes as f64 - gone.bytes as f64) / n as f64;
        p.line(format!(
            "control round {}: {n} processes, {:.1} KiB of page tables each",
            round + 1,
            c / 1024.0
        ));
        per_process.push(c);
    }
    Ok(median(&per_process))
}

/// Read+write sweep bandwidth in one attacher of `spec` and in one attacher of an
/// anonymous MAP_HUGETLB mapping of the same size, alternating sweep by sweep (so both see
/// the same machine), best of `sweeps` each, in GB/s. `None` when the reference does not
/// fit next to the region (memory or huge pages); the caller measures it afterwards.
fn bandwidth_interleaved(
    opts: &Opts,
    spec: &Spec,
    fleet: &mut Fleet,
) -> Result<Option<(f64, f64)>, BenchError> {
    let size = opts.size();
    if mem_available()? < size + opts.reserve {
        return Ok(None);
    }
    let Ok(_grant) = kernel_glue::hugepages::grow(size / kernel_glue::HUGE_PAGE_SIZE) else {
        return Ok(None);
    };
    let mut r = fleet.spawn(&reference_spec(size))?;
    fleet.report(&mut r, report_limit(size))?;
    let mut c = fleet.spawn(spec)?;
    fleet.report(&mut c, report_limit(size))?;
    let (mut best_r, mut best_c) = (0f64, 0f64);
    for i in 0..opts.sweeps {
        for first in [i % 2 == 0, i % 2 != 0] {
            let a = if first { &mut r } else { &mut c };
            a.send("sweep 1")?;
            let v = fleet.report(a, report_limit(size))?;
            let gbps = v["sweep_gbps"].as_f64().unwrap_or(0.0);
            if first {
                best_r = best_r.max(gbps);
            } else {
                best_c = best_c.max(gbps);
            }
        }
    }
    fleet.release(vec![r, c], Duration::from_secs(120))?;
    Ok(Some((best_c, best_r)))
}

/// Sweep bandwidth of an anonymous MAP_HUGETLB mapping of the region's size on its own:
/// the best of `sweeps`, in GB/s.
fn bandwidth_reference(opts: &Opts, fleet: &mut Fleet) -> Result<f64, BenchError> {
    let size = opts.size();
    let avail = mem_available()?;
    if avail < size + opts.reserve {
        return Err(BenchError::Memory(format!(
            "bandwidth reference: {} MiB available, need {} MiB plus the reserve",
            avail >> 20,
            size >> 20
        )));
    }
    let _grant = kernel_glue::hugepages::grow(size / kernel_glue::HUGE_PAGE_SIZE)
        .map_err(|e| BenchError::setup("grow the huge page pool for the reference", e.into()))?;
    sweep_alone(
        fleet,
        &reference_spec(size),
        opts.sweeps,
        Duration::from_secs(60),
    )
}

/// The bandwidth reference: an anonymous MAP_HUGETLB mapping of `size` bytes.
fn reference_spec(size: u64) -> Spec {
    Spec {
        kind: AttachKind::AnonHugetlb,
        path: None,
        size,
        stride: kernel_glue::HUGE_PAGE_SIZE,
        populate: false,
    }
}

/// One attacher of `spec` sweeping `sweeps` times with nothing else running; its best
/// bandwidth in GB/s.
fn sweep_alone(
    fleet: &mut Fleet,
    spec: &Spec,
    sweeps: u32,
    release_limit: Duration,
) -> Result<f64, BenchError> {
    let mut a = fleet.spawn(spec)?;
    fleet.report(&mut a, report_limit(spec.size))?;
    a.send(&format!("sweep {sweeps}"))?;
    let v = fleet.report(&mut a, report_limit(spec.size) * sweeps)?;
    fleet.release(vec![a], release_limit)?;
    Ok(v["sweep_gbps"].as_f64().unwrap_or(0.0))
}

/// Raw measurements of one configuration.
#[derive(Debug, Default)]
struct Samples {
    attach_ms: Vec<f64>,
    open_ms: Vec<f64>,
    map_ms: Vec<f64>,
    touch_ms: Vec<f64>,
    faults_per_gib: Vec<f64>,
    vmpte_per_gib: Vec<f64>,
    pt_unmap: Vec<f64>,
    pt_control: Vec<f64>,
    page_size: u64,
    huge_fraction: Vec<f64>,
}

impl Samples {
    fn record(&mut self, v: &serde_json::Value, gibs: f64, size: u64) -> (f64, f64) {
        let ms = |k: &str| v[k].as_f64().unwrap_or(0.0) / 1e6;
        let faults = v["faults"].as_f64().unwrap_or(0.0);
        self.attach_ms.push(ms("ns"));
        self.open_ms.push(ms("open_ns"));
        self.map_ms.push(ms("map_ns"));
        self.touch_ms.push(ms("touch_ns"));
        self.faults_per_gib.push(faults / gibs);
        self.vmpte_per_gib
            .push(v["vm_pte_delta"].as_f64().unwrap_or(0.0) / gibs);
        let page_size = v["page_size"].as_u64().unwrap_or(0);
        self.page_size = page_size;
        self.huge_fraction
            .push(if page_size >= kernel_glue::HUGE_PAGE_SIZE {
                1.0
            } else {
                v["pmd_mapped"].as_f64().unwrap_or(0.0) / size as f64
            });
        (ms("ns"), faults)
    }
}

/// One round: N attachers started one after another, each attaching and touching alone;
/// then the page-table figures of the round. Returns the attachers started and the two
/// page-table figures (same processes unmapped; separate control processes).
#[allow(clippy::too_many_arguments)]
fn run_round(
    opts: &Opts,
    config: Config,
    round: usize,
    want: usize,
    spec: &Spec,
    control: f64,
    estimate: u64,
    deadline: Option<Instant>,
    s: &mut Samples,
    notes: &mut Vec<String>,
    fleet: &mut Fleet,
    p: &mut Progress,
) -> Result<(usize, f64, f64), BenchError> {
    let size = opts.size();
    let gibs = opts.size_gib as f64;
    let round_start = Instant::now();
    let mut all: Vec<Attacher> = Vec::new();
    for i in 0..want {
        fleet.check()?;
        let avail = mem_available()?;
        if avail < opts.reserve + estimate {
            notes.push(format!(
                "stopped at {i} of {} attachers: MemAvailable was {} MiB and the next \
                 attacher needs about {} MiB of page tables above the {} MiB reserve",
                opts.attachers,
                avail >> 20,
                estimate >> 20,
                opts.reserve >> 20
            ));
            break;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            notes.push(format!(
                "stopped at {i} of {} attachers: the time budget of {} s \
                 (--max-secs-per-config) was used up",
                opts.attachers, opts.max_secs_per_config
            ));
            break;
        }
        let timed = i < opts.timed;
        let this = Spec {
            populate: !timed,
            ..spec.clone()
        };
        let mut a = fleet.spawn(&this)?;
        let v = fleet.report(&mut a, report_limit(size))?;
        all.push(a);
        if timed {
            let (ms, faults) = s.record(&v, gibs, size);
            p.throttled(format!(
                "{} round {}: attacher {}/{want}: attach+touch {ms:.2} ms, {faults} faults",
                config.name(),
                round + 1,
                i + 1
            ));
        } else {
            p.throttled(format!(
                "{} round {}: attacher {}/{want} (populated, untimed): {:.0} ms",
                config.name(),
                round + 1,
                i + 1,
                v["ns"].as_f64().unwrap_or(0.0) / 1e6
            ));
        }
    }
    let k = all.len();
    if k == 0 {
        return Err(BenchError::Memory(format!(
            "{}: not even one attacher fits; {}",
            config.name(),
            notes.join("; ")
        )));
    }
    let spawned = round_start.elapsed();
    let first = settled_page_tables()?;
    let mut attached = first;
    let mut windows: Vec<(f64, bool)> = Vec::new();
    let n_windows = if spawned < CHEAP_ROUND { WINDOWS } else { 1 };
    for w in 0..n_windows {
        if w > 0 {
            fleet.command_all(&mut all, "attach", report_limit(size))?;
            attached = settled_page_tables()?;
        }
        fleet.command_all(&mut all, "detach", report_limit(size))?;
        let detached = settled_page_tables()?;
        windows.push((
            attached.bytes as f64 - detached.bytes as f64,
            attached.settled && detached.settled,
        ));
    }
    fleet.release(all, Duration::from_secs(120))?;
    let gone = settled_page_tables()?;
    let settled: Vec<f64> = windows.iter().filter(|w| w.1).map(|w| w.0).collect();
    let all_windows: Vec<f64> = windows.iter().map(|w| w.0).collect();
    if settled.is_empty() {
        notes.push(format!(
            "round {}: PageTables never settled (other processes were busy); the figure \
             may carry their noise",
            round + 1
        ));
    }
    let denom = k as f64 * gibs;
    let unmap = median(if settled.is_empty() {
        &all_windows
    } else {
        &settled
    }) / denom;
    let vs_control = (first.bytes as f64 - gone.bytes as f64 - k as f64 * control) / denom;
    p.line(format!(
        "{} round {}: {k} attachers: page tables {unmap:.1} B per attacher per GiB \
         ({vs_control:.1} against control processes); attach+touch median {:.3} ms",
        config.name(),
        round + 1,
        median(&s.attach_ms)
    ));
    Ok((k, unmap, vs_control))
}

fn run_config(
    opts: &Opts,
    config: Config,
    control: f64,
    work: &WorkDir,
    fleet: &mut Fleet,
    p: &mut Progress,
) -> Result<ConfigResult, BenchError> {
    let size = opts.size();
    let gibs = opts.size_gib as f64;
    p.line(format!(
        "{}: setting up a {} GiB region",
        config.name(),
        opts.size_gib
    ));
    let target: Target =
        setup::prepare(config, size, opts.reserve, work, &opts.msharefs, fleet, p)?;
    let stride = opts.touch_stride.unwrap_or(setup::page_size(config));
    let spec = Spec {
        kind: target.kind,
        path: Some(target.path.clone()),
        size,
        stride,
        populate: false,
    };
    let mut notes: Vec<String> = Vec::new();
    let interleaved = bandwidth_interleaved(opts, &spec, fleet)?;
    if let Some((c, r)) = interleaved {
        p.line(format!(
            "{}: bandwidth {c:.2} GB/s, anonymous MAP_HUGETLB {r:.2} GB/s (interleaved)",
            config.name()
        ));
    }
    let estimate = pt_estimate(setup::page_size(config), size, control.max(0.0) as u64);
    let deadline = Instant::now() + Duration::from_secs(opts.max_secs_per_config);
    let mut s = Samples::default();
    let mut measured = 0;
    let mut rounds_done = 0;
    for round in 0..opts.rounds {
        let round_start = Instant::now();
        let want = if round == 0 { opts.attachers } else { measured };
        let dl = (round == 0).then_some(deadline);
        let (k, unmap, vs_control) = run_round(
            opts, config, round, want, &spec, control, estimate, dl, &mut s, &mut notes, fleet, p,
        )?;
        if round == 0 {
            measured = k;
        }
        s.pt_unmap.push(unmap);
        s.pt_control.push(vs_control);
        rounds_done += 1;
        if round + 1 < opts.rounds && round_start.elapsed() > Duration::from_secs(30) {
            notes.push(format!(
                "{} of {} rounds: a round took {:.0} s",
                round + 1,
                opts.rounds,
                round_start.elapsed().as_secs_f64()
            ));
            break;
        }
    }
    // Against the floor in pairs, on this region, while it is set up.
    let paired = if config == Config::MsharefsHugetlb && opts.configs.contains(&Config::Limit) {
        Some(paired_with_limit(&spec, fleet, p)?)
    } else {
        None
    };
    if config == Config::Thp {
        let f = median(&s.huge_fraction);
        if f < 0.9 {
            notes.push(format!(
                "only {:.0}% of the THP mapping was PMD-mapped",
                f * 100.0
            ));
        }
    }
    let shared = target.shared_pt_bytes;
    let (bandwidth, reference) = match interleaved {
        Some(x) => x,
        None => {
            // Not enough memory for both at once: the region's attacher sweeps now, the
            // reference right after the region is gone.
            let bandwidth = sweep_alone(fleet, &spec, opts.sweeps, Duration::from_secs(120))?;
            drop(target);
            let r = bandwidth_reference(opts, fleet)?;
            notes.push(
                "bandwidth reference measured right after the region was released (both did \
                 not fit at once)"
                    .into(),
            );
            (bandwidth, r)
        }
    };
    let pt = median(&s.pt_unmap);
    Ok(ConfigResult {
        name: config.name().to_string(),
        attachers: opts.attachers,
        size_gib: opts.size_gib,
        pt_bytes_per_attacher_per_gib: pt,
        faults_per_attacher_per_gib: s.faults_per_gib.iter().sum::<f64>()
            / s.faults_per_gib.len().max(1) as f64,
        attach_touch_ms_median: median(&s.attach_ms),
        attach_touch_ms_p99: percentile(&s.attach_ms, 99.0),
        bandwidth_ratio: if reference > 0.0 {
            bandwidth / reference
        } else {
            0.0
        },
        attachers_measured: measured,
        note: notes.join("; "),
        rounds: rounds_done,
        touch_stride: stride,
        page_size: s.page_size,
        huge_mapped_fraction: median(&s.huge_fraction),
        pt_bytes_per_attacher_per_gib_rounds: s.pt_unmap,
        pt_bytes_per_attacher_per_gib_vs_control: median(&s.pt_control),
        vmpte_bytes_per_attacher_per_gib: median(&s.vmpte_per_gib),
        shared_pt_bytes: shared,
        pt_bytes_per_attacher_per_gib_with_shared: pt + shared as f64 / (measured as f64 * gibs),
        faults_max_per_attacher_per_gib: s.faults_per_gib.iter().copied().fold(0.0, f64::max),
        attach_touch_ms_min: s.attach_ms.iter().copied().fold(f64::INFINITY, f64::min),
        attach_touch_ms_max: s.attach_ms.iter().copied().fold(0.0, f64::max),
        open_ms_median: median(&s.open_ms),
        map_ms_median: median(&s.map_ms),
        touch_ms_median: median(&s.touch_ms),
        samples: s.attach_ms.len(),
        bandwidth_gbps: bandwidth,
        reference_gbps: reference,
        paired_attach_touch_ms_median: paired.as_ref().map(|(ours, _)| median(ours)),
        paired_limit_ms_median: paired.as_ref().map(|(_, floor)| median(floor)),
        paired_samples: paired.as_ref().map_or(0, |(ours, _)| ours.len()),
    })
}

/// Attach+touch of msharefs-hugetlb against `limit` in [`PAIRS`] pairs on the region
/// `spec` names: a libmshare attacher and a `limit` attacher (which holds this region's
/// backing before its clock starts), one right after the other, each alone, the order
/// alternating from pair to pair. Both halves of a pair see the same machine, which the
/// two configurations' phases of a run do not: on a noisy VM the floor moves by a factor
/// of two between phases. Returns both series (ms).
fn paired_with_limit(
    spec: &Spec,
    fleet: &mut Fleet,
    p: &mut Progress,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    let floor_spec = Spec {
        kind: AttachKind::Limit,
        ..spec.clone()
    };
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for i in 0..PAIRS {
        let order = if i % 2 == 0 {
            [spec, &floor_spec]
        } else {
            [&floor_spec, spec]
        };
        for sp in order {
            let mut a = fleet.spawn(sp)?;
            let v = fleet.report(&mut a, report_limit(sp.size))?;
            fleet.release(vec![a], Duration::from_secs(30))?;
            let ms = v["ns"].as_f64().unwrap_or(0.0) / 1e6;
            if sp.kind == AttachKind::Limit {
                floor.push(ms);
            } else {
                ours.push(ms);
            }
        }
    }
    p.line(format!(
        "msharefs-hugetlb against limit in {PAIRS} pairs on the same region: attach+touch \
         median {:.3} ms vs {:.3} ms ({:.2}x)",
        median(&ours),
        median(&floor),
        median(&ours) / median(&floor).max(1e-9)
    ));
    Ok((ours, floor))
}

fn bench(
    opts: &Opts,
    fleet: &mut Fleet,
    work: &WorkDir,
    p: &mut Progress,
) -> Result<Report, BenchError> {
    let started = Instant::now();
    let load_at_start = procfs::loadavg().map_or(0.0, |l| l[0]);
    let pool_before = kernel_glue::hugepages::nr_hugepages()
        .map_err(|e| BenchError::setup("read vm.nr_hugepages", e.into()))?;
    let names = opts
        .configs
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(", ");
    let (mut results, mut storms, mut control) = (Vec::new(), Vec::new(), 0.0);
    if let Some(n) = opts.storm {
        p.line(format!(
            "msharefs-bench --storm: {n} attachers x {} GiB, released at once; configurations: {names}",
            opts.size_gib
        ));
        for &c in &opts.configs {
            storms.push(storm::run(opts, n, c, work, fleet, p)?);
        }
    } else {
        p.line(format!(
            "msharefs-bench: {} attachers x {} GiB; configurations: {names}",
            opts.attachers, opts.size_gib
        ));
        control = control_run(opts, fleet, p)?;
        for &c in &opts.configs {
            results.push(run_config(opts, c, control, work, fleet, p)?);
        }
    }
    let pool_after = kernel_glue::hugepages::nr_hugepages()
        .map_err(|e| BenchError::setup("read vm.nr_hugepages", e.into()))?;
    if pool_after != pool_before {
        p.line(format!(
            "WARNING: vm.nr_hugepages is {pool_after}, was {pool_before} at the start \
             (another program changed it, or a grant was not given back)"
        ));
    }
    Ok(Report::new(
        opts.storm.unwrap_or(opts.attachers),
        opts.size_gib,
        opts.command.clone(),
        results,
        storms,
        control,
        load_at_start,
        started.elapsed().as_secs_f64(),
    ))
}

/// Runs the bench.
///
/// # Errors
/// A bad argument, a failed step or an interrupt, after cleaning up.
pub fn run(args: BenchArgs) -> io::Result<()> {
    let opts = Opts::from_args(&args).map_err(io::Error::other)?;
    let report = match &args.from_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            Report::from_json(&text).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a bench result: {e}", path.display()),
                )
            })?
        }
        None => measure(&args, &opts)?,
    };
    print!("{}", report.table());
    let write = |path: &PathBuf, body: String| {
        std::fs::write(path, body).map_err(|source| {
            io::Error::other(BenchError::Output {
                path: path.clone(),
                source,
            })
        })
    };
    if let Some(path) = &args.json {
        write(path, report.json())?;
    }
    if let Some(path) = &args.csv {
        write(path, report.csv())?;
    }
    if let Some(path) = &args.plot {
        write(path, report.svg())?;
    }
    Ok(())
}

/// An exclusive lock on `path`, named in the error.
fn lock(path: &Path) -> io::Result<kernel_glue::fd::FileLock> {
    kernel_glue::fd::FileLock::exclusive(path)
        .map_err(|e| io::Error::new(e.kind(), format!("--lock {}: {e}", path.display())))
}

/// The measuring part of [`run`]: set-up, signals, the pool lock, the run, clean-up.
fn measure(args: &BenchArgs, opts: &Opts) -> io::Result<Report> {
    if kernel_glue::process::geteuid() != 0 {
        return Err(io::Error::other(
            "msharefs-bench needs root (mounts, huge-page pool)",
        ));
    }
    if !opts.msharefs.is_file() {
        return Err(io::Error::other(format!(
            "{}: no msharefs binary there; name it with --msharefs",
            opts.msharefs.display()
        )));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let mut p = Progress::new();
    let _lock = match &args.lock {
        Some(path) => {
            p.line(format!(
                "taking {} (waits while another holds it)",
                path.display()
            ));
            Some(lock(path)?)
        }
        None => None,
    };
    let work = WorkDir::create()?;
    let mut fleet = Fleet::new(stop.clone())?;
    let result = bench(opts, &mut fleet, &work, &mut p);
    // Attachers, mounts and pool grants are gone by now; the work directory goes next.
    drop(fleet);
    drop(work);
    result.map_err(|e| {
        if matches!(e, BenchError::Interrupted) {
            p.line("interrupted: attachers stopped, mounts removed, huge pages given back");
        }
        io::Error::other(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_table_estimate_follows_the_geometry() {
        // 4 KiB pages: a 4 KiB PTE page per 2 MiB plus a PMD page per GiB.
        assert_eq!(mapping_tables(4096, 2 * GIB), (1024 + 2) * 4096);
        // 2 MiB pages: a PMD page per GiB.
        assert_eq!(mapping_tables(2 << 20, 2 * GIB), 2 * 4096);
        assert_eq!(mapping_tables(2 << 20, 1), 4096);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(median(&v), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 99.0), 3.0);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[7.0]), 7.0);
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        let base = || BenchArgs {
            attachers: None,
            size_gib: None,
            json: None,
            csv: None,
            plot: None,
            quick: true,
            storm: None,
            configs: vec![],
            touch_stride: None,
            rounds: None,
            sweeps: None,
            timed: 64,
            max_secs_per_config: 600,
            reserve_mib: 3072,
            lock: None,
            msharefs: Some("/bin/true".into()),
            from_json: None,
        };
        let o = Opts::from_args(&base()).unwrap();
        assert_eq!((o.attachers, o.size_gib, o.configs.len()), (4, 1, 5));
        let mut a = base();
        a.storm = Some(0);
        assert!(matches!(Opts::from_args(&a), Err(BenchError::Usage(_))));
        let mut a = base();
        a.attachers = Some(0);
        assert!(matches!(Opts::from_args(&a), Err(BenchError::Usage(_))));
        let mut a = base();
        a.touch_stride = Some(12);
        assert!(matches!(Opts::from_args(&a), Err(BenchError::Usage(_))));
        let mut a = base();
        a.plot = Some("x.png".into());
        assert!(matches!(Opts::from_args(&a), Err(BenchError::Usage(_))));
        let mut a = base();
        a.size_gib = Some(u64::MAX);
        assert!(matches!(Opts::from_args(&a), Err(BenchError::Usage(_))));
    }
}
