//! `--storm N`: N attachers of one configuration started and made ready first, then
//! released at once; the wall time from the release until all have touched their whole
//! region, and the faults each took.
//!
//! The gate is a pipe: its read end is every attacher's standard input, and the bench
//! holds its only write end. A ready attacher has done everything before the open (for
//! `limit`, asked the daemon for the backing) and blocks reading; closing the write end
//! wakes all of them at once. Each attacher stamps the start and end of its attach+touch
//! with `CLOCK_REALTIME`, comparable between processes, so the wall time does not depend
//! on when the bench gets to read the reports; the attachers stay attached (idle) until
//! the last has finished and the bench kills them all.
//!
//! Memory guard: before each attacher starts, `MemAvailable` must cover the reserve plus
//! the page tables that it and every attacher already started will build once released
//! (for 4 KiB pages 2 MiB per GiB each: 1,024 attachers of 2 GiB need 4 GiB). When they do
//! not fit, the configuration's storm is skipped with a note, and the attachers started so
//! far are killed before any was released.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::attacher::unix_ns;
use crate::fleet::{Attacher, Fleet, Spec};
use crate::report::StormResult;
use crate::run::{
    BenchError, Config, Opts, Progress, mapping_tables, median, mem_available, percentile,
};
use crate::setup::{self, WorkDir};

/// Memory each attacher process may take beyond its page tables and that the guard has
/// not seen yet when it decides (its stack, heap and the kernel's structures grow a little
/// after the ready report).
const PROCESS_SLACK: u64 = 1 << 20;

fn skipped(config: Config, n: usize, size_gib: u64, note: String) -> StormResult {
    StormResult {
        name: config.name().to_string(),
        attachers: n,
        size_gib,
        finished: 0,
        wall_ms: 0.0,
        faults_per_attacher: 0.0,
        faults_per_attacher_per_gib: 0.0,
        faults_max_per_attacher: 0.0,
        attach_touch_ms_median: 0.0,
        attach_touch_ms_p99: 0.0,
        last_start_ms: 0.0,
        ready_secs: 0.0,
        note,
    }
}

/// One configuration's storm of `n` attachers.
///
/// # Errors
/// A failed set-up step, an attacher that fails before the release, or an interrupt;
/// everything started is stopped first.
pub fn run(
    opts: &Opts,
    n: usize,
    config: Config,
    work: &WorkDir,
    fleet: &mut Fleet,
    p: &mut Progress,
) -> Result<StormResult, BenchError> {
    let size = opts.size();
    let gibs = opts.size_gib as f64;
    let per_attacher = mapping_tables(setup::page_size(config), size);
    let need = per_attacher.saturating_mul(n as u64);
    let avail = mem_available()?;
    if avail < opts.reserve + size + need {
        let note = format!(
            "skipped: {n} attachers need about {} MiB of page tables beside the {} MiB region, \
             and MemAvailable was {} MiB with a {} MiB reserve",
            need >> 20,
            size >> 20,
            avail >> 20,
            opts.reserve >> 20
        );
        p.line(format!("{}: storm {note}", config.name()));
        return Ok(skipped(config, n, opts.size_gib, note));
    }
    p.line(format!(
        "{}: setting up a {} GiB region for a storm of {n}",
        config.name(),
        opts.size_gib
    ));
    let target = setup::prepare(config, size, opts.reserve, work, &opts.msharefs, fleet, p)?;
    let spec = Spec {
        kind: target.kind,
        path: Some(target.path.clone()),
        size,
        stride: opts
            .touch_stride
            .unwrap_or_else(|| setup::page_size(config)),
        populate: false,
    };
    let (gate, release) =
        std::io::pipe().map_err(|e| BenchError::setup("create the storm's gate pipe", e))?;
    let started = Instant::now();
    let mut all: Vec<Attacher> = Vec::with_capacity(n);
    for i in 0..n {
        fleet.check()?;
        // Attachers started so far are in MemAvailable already; their tables are not.
        let avail = mem_available()?;
        let pending = per_attacher.saturating_mul(i as u64 + 1);
        if avail < opts.reserve + pending + PROCESS_SLACK {
            let note = format!(
                "skipped: at {i} of {n} ready attachers MemAvailable was {} MiB; their page \
                 tables would need {} MiB more, above the {} MiB reserve",
                avail >> 20,
                pending >> 20,
                opts.reserve >> 20
            );
            p.line(format!("{}: storm {note}", config.name()));
            fleet.kill_all(all);
            return Ok(skipped(config, n, opts.size_gib, note));
        }
        let mut a = fleet.spawn_gated(&spec, &gate)?;
        fleet.report(&mut a, Duration::from_secs(60))?;
        all.push(a);
        p.throttled(format!(
            "{}: storm: {}/{n} attachers ready",
            config.name(),
            i + 1
        ));
    }
    drop(gate);
    let ready_secs = started.elapsed().as_secs_f64();
    p.line(format!(
        "{}: {n} attachers ready in {ready_secs:.1} s; releasing them",
        config.name()
    ));
    let released_ns = unix_ns();
    let released = Instant::now();
    // The only write end: every attacher reads the end of its input now.
    drop(release);
    let deadline = released + Duration::from_secs(opts.max_secs_per_config);
    let mut reports: Vec<Value> = Vec::with_capacity(n);
    let mut notes: Vec<String> = Vec::new();
    for a in all.iter_mut() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match fleet.report(a, left) {
            Ok(v) => reports.push(v),
            Err(BenchError::Interrupted) => return Err(BenchError::Interrupted),
            Err(e) => {
                notes.push(format!(
                    "stopped after {} of {n} attachers had finished: {e} \
                     (time limit {} s, --max-secs-per-config)",
                    reports.len(),
                    opts.max_secs_per_config
                ));
                break;
            }
        }
    }
    let collected = released.elapsed();
    fleet.kill_all(all);
    drop(target);

    let ns = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let finished = reports.len();
    // The latest of a stamp over all attachers, in ms after the release.
    let latest = |k: &str| {
        reports
            .iter()
            .map(|v| ns(v, k).saturating_sub(released_ns))
            .max()
            .unwrap_or(0) as f64
            / 1e6
    };
    let wall_ms = latest("done_unix_ns");
    let last_start_ms = latest("start_unix_ns");
    let faults: Vec<f64> = reports
        .iter()
        .map(|v| v["faults"].as_f64().unwrap_or(0.0))
        .collect();
    let own_ms: Vec<f64> = reports.iter().map(|v| ns(v, "ns") as f64 / 1e6).collect();
    let mean_faults = faults.iter().sum::<f64>() / faults.len().max(1) as f64;
    p.line(format!(
        "{}: storm of {n}: {finished} finished, all touched {wall_ms:.1} ms after the \
         release (the bench had every report after {:.1} ms); {mean_faults:.0} faults per \
         attacher",
        config.name(),
        collected.as_secs_f64() * 1e3
    ));
    Ok(StormResult {
        name: config.name().to_string(),
        attachers: n,
        size_gib: opts.size_gib,
        finished,
        wall_ms,
        faults_per_attacher: mean_faults,
        faults_per_attacher_per_gib: mean_faults / gibs,
        faults_max_per_attacher: faults.iter().copied().fold(0.0, f64::max),
        attach_touch_ms_median: median(&own_ms),
        attach_touch_ms_p99: percentile(&own_ms, 99.0),
        last_start_ms,
        ready_secs,
        note: notes.join("; "),
    })
}
