//! The results of a run: the terminal table, `--json`, `--csv` and the `--plot` SVG chart,
//! and the check of msharefs-hugetlb against its targets.
//!
//! The JSON has the stable fields `{"configs": [{"name", "attachers", "size_gib",
//! "pt_bytes_per_attacher_per_gib", "faults_per_attacher_per_gib", "attach_touch_ms_median",
//! "attach_touch_ms_p99", "bandwidth_ratio"}], "storm": [{"name", "attachers",
//! "size_gib", "wall_ms", "faults_per_attacher", "faults_per_attacher_per_gib"}]}` (one
//! of the two lists is empty: a run measures storms or not); everything else is
//! explanation that may grow.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One configuration's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigResult {
    /// Configuration name.
    pub name: String,
    /// Attachers asked for (N).
    pub attachers: usize,
    /// Region size (G).
    pub size_gib: u64,
    /// Page-table bytes the region costs per attacher per GiB: `PageTables` with every
    /// attacher attached and touched minus after the same processes unmapped it, / (N G);
    /// median over rounds.
    pub pt_bytes_per_attacher_per_gib: f64,
    /// Minor faults of the touch loop per attacher per GiB (mean).
    pub faults_per_attacher_per_gib: f64,
    /// Attach+touch time, median over attachers (ms).
    pub attach_touch_ms_median: f64,
    /// Attach+touch time, 99th percentile (nearest rank) over attachers (ms).
    pub attach_touch_ms_p99: f64,
    /// Sweep bandwidth inside the region over the anonymous hugetlb reference.
    pub bandwidth_ratio: f64,
    /// Attachers that were really attached (fewer than `attachers` when memory or the time
    /// budget stopped the run; see `note`).
    pub attachers_measured: usize,
    /// Why the run stopped early or what else to know; empty when nothing.
    pub note: String,
    /// Rounds measured.
    pub rounds: usize,
    /// Bytes between touches.
    pub touch_stride: u64,
    /// Kernel page size of the attachers' mappings (`KernelPageSize` in smaps).
    pub page_size: u64,
    /// Fraction of the mapping in 2 MiB pages (hugetlb: 1; THP: `ShmemPmdMapped` / size).
    pub huge_mapped_fraction: f64,
    /// The page-table figure of each round.
    pub pt_bytes_per_attacher_per_gib_rounds: Vec<f64>,
    /// The same from separate control processes: (`PageTables` with the attachers minus
    /// after they exited) minus N times a control process's own tables, / (N G).
    pub pt_bytes_per_attacher_per_gib_vs_control: f64,
    /// What the kernel's per-process `VmPTE` grew by per GiB (it counts a shared PMD page
    /// in every process that links it).
    pub vmpte_bytes_per_attacher_per_gib: f64,
    /// Page-table bytes allocated once for all attachers (msharefs: the daemon's host
    /// mapping, its `VmPTE` growth).
    pub shared_pt_bytes: u64,
    /// `pt_bytes_per_attacher_per_gib` plus `shared_pt_bytes` spread over the attachers.
    pub pt_bytes_per_attacher_per_gib_with_shared: f64,
    /// Most faults per GiB any attacher took.
    pub faults_max_per_attacher_per_gib: f64,
    /// Fastest attach+touch (ms).
    pub attach_touch_ms_min: f64,
    /// Slowest attach+touch (ms).
    pub attach_touch_ms_max: f64,
    /// Median time of the open step (msharefs file or memfd) inside attach+touch (ms).
    pub open_ms_median: f64,
    /// Median time of the map step (libmshare attach or mmap) (ms).
    pub map_ms_median: f64,
    /// Median time of the touch loop (ms).
    pub touch_ms_median: f64,
    /// Attach+touch samples behind the median and p99 (attachers times rounds).
    pub samples: usize,
    /// Best read+write sweep inside the region, GB/s of traffic (read plus written).
    pub bandwidth_gbps: f64,
    /// Best sweep of the anonymous MAP_HUGETLB reference of the same size, measured
    /// alternately with the region's sweeps (GB/s).
    pub reference_gbps: f64,
    /// msharefs-hugetlb only, when `limit` runs too: attach+touch median of the
    /// libmshare halves of the pairs measured against `limit` on this region (ms).
    #[serde(default)]
    pub paired_attach_touch_ms_median: Option<f64>,
    /// The `limit` halves of those pairs (ms).
    #[serde(default)]
    pub paired_limit_ms_median: Option<f64>,
    /// Pairs measured (0 when none).
    #[serde(default)]
    pub paired_samples: usize,
}

/// One configuration's storm (`--storm N`): N attachers made ready, then released at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormResult {
    /// Configuration name.
    pub name: String,
    /// Attachers asked for (N).
    pub attachers: usize,
    /// Region size (G).
    pub size_gib: u64,
    /// Attachers that touched their whole region before the time limit (0 when the storm
    /// was skipped; see `note`).
    pub finished: usize,
    /// Wall time from the release until the last attacher had touched its whole region
    /// (ms), from the attachers' own `CLOCK_REALTIME` stamps; 0 when skipped.
    pub wall_ms: f64,
    /// Minor faults of the touch loop per attacher (mean).
    pub faults_per_attacher: f64,
    /// The same per GiB.
    pub faults_per_attacher_per_gib: f64,
    /// Most faults any attacher took.
    pub faults_max_per_attacher: f64,
    /// Each attacher's own attach+touch time inside the storm, median (ms).
    pub attach_touch_ms_median: f64,
    /// The same, 99th percentile (nearest rank).
    pub attach_touch_ms_p99: f64,
    /// From the release until the last attacher had woken and started (ms): how long the
    /// CPUs took to get to everyone.
    pub last_start_ms: f64,
    /// Seconds it took to start the N attachers and get them ready (not part of the storm).
    pub ready_secs: f64,
    /// Why the storm was skipped or stopped, or what else to know; empty when nothing.
    pub note: String,
}

/// One target of msharefs-hugetlb and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// What is compared.
    pub target: String,
    /// The measured value.
    pub value: f64,
    /// The limit it must meet.
    pub limit: f64,
    /// Whether it did.
    pub met: bool,
    /// The comparison in words.
    pub detail: String,
}

/// Facts about the machine, for the record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPUs online.
    pub cpus: usize,
    /// `MemTotal` in GiB.
    pub mem_total_gib: f64,
    /// 1-minute load average at the start and at the end of the run (other work on the
    /// machine slows whatever needs the CPU, the daemon's answers included).
    #[serde(default)]
    pub load_avg_1m: Option<[f64; 2]>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// One entry per configuration (empty for a storm run).
    pub configs: Vec<ConfigResult>,
    /// One entry per configuration of a storm run (`--storm`), else empty.
    #[serde(default)]
    pub storm: Vec<StormResult>,
    /// Attachers asked for (per configuration; for a storm run, the storm's N).
    pub attachers: usize,
    /// Region size.
    pub size_gib: u64,
    /// The command line.
    pub command: String,
    /// Page-table bytes of one control process (the attacher program mapping nothing).
    pub control_pt_bytes_per_process: f64,
    /// How the figures were measured.
    pub method: Vec<String>,
    /// msharefs-hugetlb against its targets (when the baselines or `limit` ran).
    pub targets: Vec<Target>,
    /// The machine.
    pub machine: Machine,
    /// Wall time of the run in seconds.
    pub elapsed_secs: f64,
}

const METHOD: [&str; 8] = [
    "pt_bytes_per_attacher_per_gib: /proc/meminfo PageTables (after vm.stat_refresh) with all \
     attachers attached and every page touched, minus PageTables after the same processes \
     unmapped the region, divided by attachers and GiB; median over detach/re-attach \
     windows, then over rounds",
    "faults_per_attacher_per_gib: getrusage(RUSAGE_SELF) minor faults around the touch loop \
     in each timed attacher, mean",
    "attach_touch_ms: in each timed attacher, from just before open/attach to just after the \
     last touch (one 8-byte write every touch_stride bytes); attachers start one at a time",
    "attachers beyond --timed build the same page tables with MADV_POPULATE_WRITE and count \
     for page tables only",
    "bandwidth_ratio: best read+write sweep of the whole region in one attacher over the \
     best sweep of an anonymous MAP_HUGETLB mapping of the same size in another process, \
     the two alternating sweep by sweep",
    "attachers are separate processes (msharefs-bench attacher), all alive together",
    "limit: an attacher holding the msharefs region's hugetlb backing (asked of the daemon \
     once, before its clock starts) maps it at a 1 GiB-aligned address and touches it: the \
     floor of attach+touch",
    "storm (--storm N): N attachers started and made ready (for limit: holding the \
     backing), then released at once by closing the one write end of a pipe that is all \
     their standard inputs; wall_ms from the release to the last attacher's end of touch \
     (CLOCK_REALTIME stamps taken by the attachers)",
];

fn machine(load_at_start: f64) -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let total = kernel_glue::procfs::meminfo().map_or(0, |m| m.mem_total);
    Machine {
        kernel,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total_gib: total as f64 / (1u64 << 30) as f64,
        load_avg_1m: Some([
            load_at_start,
            kernel_glue::procfs::loadavg().map_or(0.0, |l| l[0]),
        ]),
    }
}

fn find<'a>(cs: &'a [ConfigResult], name: &str) -> Option<&'a ConfigResult> {
    cs.iter().find(|c| c.name == name)
}

/// msharefs-hugetlb's median attach+touch over `limit`'s from the pairs measured on the
/// same region, when there are some.
pub fn paired_limit_ratio(cs: &[ConfigResult]) -> Option<(f64, f64, f64)> {
    let ms = find(cs, "msharefs-hugetlb")?;
    let (ours, floor) = (
        ms.paired_attach_touch_ms_median?,
        ms.paired_limit_ms_median?,
    );
    Some((ours / floor.max(1e-9), ours, floor))
}

/// msharefs-hugetlb's median attach+touch over `limit`'s, when both ran.
pub fn limit_ratio(cs: &[ConfigResult]) -> Option<f64> {
    let ms = find(cs, "msharefs-hugetlb")?;
    let l = find(cs, "limit")?;
    Some(ms.attach_touch_ms_median / l.attach_touch_ms_median.max(1e-9))
}

fn storm_targets(ss: &[StormResult]) -> Vec<Target> {
    let find = |n: &str| ss.iter().find(|s| s.name == n && s.finished == s.attachers);
    let (Some(ms), Some(h)) = (find("msharefs-hugetlb"), find("hugetlb-kernel-placed")) else {
        return Vec::new();
    };
    vec![Target {
        target: "storm: msharefs-hugetlb finishes no later than hugetlb-kernel-placed".into(),
        value: ms.wall_ms,
        limit: h.wall_ms,
        met: ms.wall_ms <= h.wall_ms,
        detail: format!(
            "{:.1} ms vs {:.1} ms ({} attachers of {} GiB)",
            ms.wall_ms, h.wall_ms, ms.attachers, ms.size_gib
        ),
    }]
}

fn targets(cs: &[ConfigResult]) -> Vec<Target> {
    let mut out = Vec::new();
    let Some(ms) = find(cs, "msharefs-hugetlb") else {
        return out;
    };
    // Judged on the pairs (both halves in the same moment) when they were measured, else
    // on the two configurations' phases.
    let floor = match paired_limit_ratio(cs) {
        Some((ratio, ours, floor)) => Some((
            ratio,
            format!(
                "{ratio:.2}x ({ours:.3} ms vs {floor:.3} ms, {} pairs on the same region)",
                ms.paired_samples
            ),
        )),
        None => find(cs, "limit").zip(limit_ratio(cs)).map(|(l, ratio)| {
            let detail = format!(
                "{ratio:.2}x ({:.3} ms vs {:.3} ms)",
                ms.attach_touch_ms_median, l.attach_touch_ms_median
            );
            (ratio, detail)
        }),
    };
    if let Some((ratio, detail)) = floor {
        out.push(Target {
            target: "attach+touch median at most 2x limit's".into(),
            value: ratio,
            limit: 2.0,
            met: ratio <= 2.0,
            detail,
        });
    }
    let shmem = find(cs, "shmem-4k");
    let huge = find(cs, "hugetlb-kernel-placed");
    if let Some(s) = shmem {
        let limit = s.pt_bytes_per_attacher_per_gib / 1000.0;
        out.push(Target {
            target: "page-table bytes per attacher per GiB <= 1/1000 of shmem-4k".into(),
            value: ms.pt_bytes_per_attacher_per_gib,
            limit,
            met: ms.pt_bytes_per_attacher_per_gib <= limit,
            detail: format!(
                "{:.1} B vs limit {:.1} B (shmem-4k {:.0} B)",
                ms.pt_bytes_per_attacher_per_gib, limit, s.pt_bytes_per_attacher_per_gib
            ),
        });
    }
    if let Some(h) = huge {
        let limit = h.pt_bytes_per_attacher_per_gib / 50.0;
        out.push(Target {
            target: "page-table bytes per attacher per GiB <= 1/50 of hugetlb-kernel-placed".into(),
            value: ms.pt_bytes_per_attacher_per_gib,
            limit,
            met: ms.pt_bytes_per_attacher_per_gib <= limit,
            detail: format!(
                "{:.1} B vs limit {:.1} B (hugetlb-kernel-placed {:.0} B)",
                ms.pt_bytes_per_attacher_per_gib, limit, h.pt_bytes_per_attacher_per_gib
            ),
        });
    }
    out.push(Target {
        target: "faults per attacher per GiB <= 2".into(),
        value: ms.faults_per_attacher_per_gib,
        limit: 2.0,
        met: ms.faults_per_attacher_per_gib <= 2.0,
        detail: format!(
            "{:.2} (worst attacher {:.2})",
            ms.faults_per_attacher_per_gib, ms.faults_max_per_attacher_per_gib
        ),
    });
    if let Some(s) = shmem {
        let speedup = s.attach_touch_ms_median / ms.attach_touch_ms_median.max(1e-9);
        out.push(Target {
            target: "attach+touch at least 100x faster than shmem-4k (median)".into(),
            value: speedup,
            limit: 100.0,
            met: speedup >= 100.0,
            detail: format!(
                "{speedup:.0}x ({:.3} ms vs {:.1} ms)",
                ms.attach_touch_ms_median, s.attach_touch_ms_median
            ),
        });
    }
    out.push(Target {
        target: "bandwidth ratio >= 0.95".into(),
        value: ms.bandwidth_ratio,
        limit: 0.95,
        met: ms.bandwidth_ratio >= 0.95,
        detail: format!("{:.3}", ms.bandwidth_ratio),
    });
    out
}

fn ratio_words(a: f64, b: f64) -> String {
    if a <= 0.0 {
        format!("{a:.0} B per attacher per GiB against {b:.0} B")
    } else {
        format!("1/{:.0}", b / a)
    }
}

/// The figures of msharefs-hugetlb against the two baselines of the headline (or what ran
/// of them; `thp` when neither did), in two short lines: the chart's subtitle.
pub fn headline(r: &Report) -> Option<[String; 2]> {
    let ms = find(&r.configs, "msharefs-hugetlb")?;
    let mut bases: Vec<&ConfigResult> = ["shmem-4k", "hugetlb-kernel-placed"]
        .iter()
        .filter_map(|n| find(&r.configs, n))
        .collect();
    if bases.is_empty() {
        bases.extend(find(&r.configs, "thp"));
    }
    if bases.is_empty() {
        return None;
    }
    let mut line1 = format!(
        "per attacher per GiB, msharefs-hugetlb: {} of page tables, {:.0} fault",
        fmt_bytes(ms.pt_bytes_per_attacher_per_gib),
        ms.faults_per_attacher_per_gib
    );
    for b in &bases {
        let _ = write!(
            line1,
            " | {}: {}, {:.0}",
            b.name,
            fmt_bytes(b.pt_bytes_per_attacher_per_gib),
            b.faults_per_attacher_per_gib
        );
    }
    let speeds: Vec<String> = bases
        .iter()
        .map(|b| {
            format!(
                "{} than {}",
                speed_words(b.attach_touch_ms_median, ms.attach_touch_ms_median),
                b.name
            )
        })
        .collect();
    Some([
        line1,
        format!(
            "attach+touch {}; bandwidth ratio {:.2}",
            speeds.join(", "),
            ms.bandwidth_ratio
        ),
    ])
}

fn speed_words(base_ms: f64, ms_ms: f64) -> String {
    let x = base_ms / ms_ms.max(1e-9);
    if x >= 10.0 {
        format!("{x:.0}x faster")
    } else if x >= 1.0 {
        format!("{x:.2}x faster")
    } else {
        format!("{:.2}x slower", 1.0 / x.max(1e-9))
    }
}

impl Report {
    /// Assembles the report.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        attachers: usize,
        size_gib: u64,
        command: String,
        configs: Vec<ConfigResult>,
        storm: Vec<StormResult>,
        control: f64,
        load_at_start: f64,
        elapsed_secs: f64,
    ) -> Report {
        let mut targets = targets(&configs);
        targets.extend(storm_targets(&storm));
        Report {
            configs,
            storm,
            attachers,
            size_gib,
            command,
            control_pt_bytes_per_process: control,
            method: METHOD.iter().map(|m| m.to_string()).collect(),
            targets,
            machine: machine(load_at_start),
            elapsed_secs,
        }
    }

    /// The terminal table, the comparison lines and the targets.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let load = self.machine.load_avg_1m.map_or(String::new(), |[a, b]| {
            format!("; load average {a:.1} at the start, {b:.1} at the end")
        });
        let what = if self.storm.is_empty() {
            format!(
                "{} attachers x {} GiB region",
                self.attachers, self.size_gib
            )
        } else {
            format!(
                "storm of {} attachers x {} GiB region, released at once",
                self.attachers, self.size_gib
            )
        };
        let _ = writeln!(
            s,
            "\nmsharefs-bench: {what}, Linux {}, {} CPUs, {:.0} GiB RAM ({:.0} s{load})",
            self.machine.kernel, self.machine.cpus, self.machine.mem_total_gib, self.elapsed_secs,
        );
        if self.storm.is_empty() {
            self.configs_table(&mut s);
        } else {
            self.storm_table(&mut s);
        }
        for t in &self.targets {
            let _ = writeln!(
                s,
                "target {}: {}: {}",
                if t.met { "MET   " } else { "MISSED" },
                t.target,
                t.detail
            );
        }
        s
    }

    fn configs_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "{:<22} {:>9} {:>14} {:>12} {:>13} {:>11} {:>9}",
            "config",
            "attachers",
            "PT B/att/GiB",
            "faults/GiB",
            "attach ms p50",
            "ms p99",
            "bandwidth"
        );
        for c in &self.configs {
            let att = if c.attachers_measured == c.attachers {
                c.attachers.to_string()
            } else {
                format!("{}/{}", c.attachers_measured, c.attachers)
            };
            let _ = writeln!(
                s,
                "{:<22} {:>9} {:>14.1} {:>12.1} {:>13.3} {:>11.3} {:>9.3}",
                c.name,
                att,
                c.pt_bytes_per_attacher_per_gib,
                c.faults_per_attacher_per_gib,
                c.attach_touch_ms_median,
                c.attach_touch_ms_p99,
                c.bandwidth_ratio
            );
        }
        for c in &self.configs {
            if !c.note.is_empty() {
                let _ = writeln!(s, "note: {}: {}", c.name, c.note);
            }
        }
        if let Some(ms) = find(&self.configs, "msharefs-hugetlb") {
            for base in ["shmem-4k", "hugetlb-kernel-placed", "thp"] {
                let Some(b) = find(&self.configs, base) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "msharefs-hugetlb vs {base}: page tables {}, faults 1/{:.0}, attach+touch {}",
                    ratio_words(
                        ms.pt_bytes_per_attacher_per_gib,
                        b.pt_bytes_per_attacher_per_gib
                    ),
                    b.faults_per_attacher_per_gib / ms.faults_per_attacher_per_gib.max(1e-9),
                    speed_words(b.attach_touch_ms_median, ms.attach_touch_ms_median)
                );
            }
            if let (Some(l), Some(r)) = (find(&self.configs, "limit"), limit_ratio(&self.configs)) {
                let _ = writeln!(
                    s,
                    "msharefs-hugetlb / limit: attach+touch median {r:.2}x the floor \
                     ({:.3} ms vs {:.3} ms; p99 {:.3} vs {:.3} ms)",
                    ms.attach_touch_ms_median,
                    l.attach_touch_ms_median,
                    ms.attach_touch_ms_p99,
                    l.attach_touch_ms_p99
                );
            }
            if let Some((r, ours, floor)) = paired_limit_ratio(&self.configs) {
                let _ = writeln!(
                    s,
                    "msharefs-hugetlb / limit in {} pairs on the same region: attach+touch \
                     median {r:.2}x the floor ({ours:.3} ms vs {floor:.3} ms)",
                    ms.paired_samples
                );
            }
        }
    }

    fn storm_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "{:<22} {:>9} {:>14} {:>12} {:>12} {:>13} {:>11} {:>13}",
            "config",
            "finished",
            "all touched ms",
            "faults/att",
            "faults/GiB",
            "own ms p50",
            "own ms p99",
            "last start ms"
        );
        for c in &self.storm {
            let _ = writeln!(
                s,
                "{:<22} {:>9} {:>14.1} {:>12.1} {:>12.1} {:>13.3} {:>11.3} {:>13.1}",
                c.name,
                format!("{}/{}", c.finished, c.attachers),
                c.wall_ms,
                c.faults_per_attacher,
                c.faults_per_attacher_per_gib,
                c.attach_touch_ms_median,
                c.attach_touch_ms_p99,
                c.last_start_ms
            );
        }
        for c in &self.storm {
            if !c.note.is_empty() {
                let _ = writeln!(s, "note: {}: {}", c.name, c.note);
            }
        }
        let done = |n: &str| {
            self.storm
                .iter()
                .find(|c| c.name == n && c.finished == c.attachers && c.attachers > 0)
        };
        if let Some(ms) = done("msharefs-hugetlb") {
            for base in ["shmem-4k", "hugetlb-kernel-placed", "thp", "limit"] {
                if let Some(b) = done(base) {
                    let _ = writeln!(
                        s,
                        "storm, msharefs-hugetlb vs {base}: all touched {}",
                        speed_words(b.wall_ms, ms.wall_ms)
                    );
                }
            }
        }
    }

    /// Reads a report written by [`Report::json`] (to print or plot it again).
    ///
    /// # Errors
    /// A description of what does not parse.
    pub fn from_json(text: &str) -> Result<Report, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// `--json`.
    pub fn json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            // Serializing plain numbers and strings cannot fail; keep the schema if it does.
            format!("{{\"configs\": [], \"error\": \"{e}\"}}")
        });
        s.push('\n');
        s
    }

    /// `--csv`: one line per configuration.
    pub fn csv(&self) -> String {
        if !self.storm.is_empty() {
            return self.storm_csv();
        }
        let mut s = String::from(
            "name,attachers,size_gib,pt_bytes_per_attacher_per_gib,faults_per_attacher_per_gib,\
             attach_touch_ms_median,attach_touch_ms_p99,bandwidth_ratio,attachers_measured,\
             pt_bytes_per_attacher_per_gib_vs_control,vmpte_bytes_per_attacher_per_gib,\
             shared_pt_bytes,touch_stride,bandwidth_gbps,note\n",
        );
        for c in &self.configs {
            let _ = writeln!(
                s,
                "{},{},{},{:.3},{:.3},{:.4},{:.4},{:.4},{},{:.3},{:.3},{},{},{:.3},\"{}\"",
                c.name,
                c.attachers,
                c.size_gib,
                c.pt_bytes_per_attacher_per_gib,
                c.faults_per_attacher_per_gib,
                c.attach_touch_ms_median,
                c.attach_touch_ms_p99,
                c.bandwidth_ratio,
                c.attachers_measured,
                c.pt_bytes_per_attacher_per_gib_vs_control,
                c.vmpte_bytes_per_attacher_per_gib,
                c.shared_pt_bytes,
                c.touch_stride,
                c.bandwidth_gbps,
                c.note.replace('"', "\"\"")
            );
        }
        s
    }

    fn storm_csv(&self) -> String {
        let mut s = String::from(
            "name,attachers,size_gib,finished,wall_ms,faults_per_attacher,\
             faults_per_attacher_per_gib,faults_max_per_attacher,attach_touch_ms_median,\
             attach_touch_ms_p99,last_start_ms,ready_secs,note\n",
        );
        for c in &self.storm {
            let _ = writeln!(
                s,
                "{},{},{},{},{:.3},{:.3},{:.3},{:.0},{:.4},{:.4},{:.3},{:.3},\"{}\"",
                c.name,
                c.attachers,
                c.size_gib,
                c.finished,
                c.wall_ms,
                c.faults_per_attacher,
                c.faults_per_attacher_per_gib,
                c.faults_max_per_attacher,
                c.attach_touch_ms_median,
                c.attach_touch_ms_p99,
                c.last_start_ms,
                c.ready_secs,
                c.note.replace('"', "\"\"")
            );
        }
        s
    }

    /// `--plot`: four bar charts (page tables, faults, attach+touch time on log scales;
    /// bandwidth ratio on a linear one), one bar per configuration; for a storm run two
    /// (wall time until all touched, faults per attacher).
    pub fn svg(&self) -> String {
        if self.storm.is_empty() {
            svg::chart(self)
        } else {
            svg::storm_chart(self)
        }
    }
}

/// Bytes as a reader wants them: `0 B`, `3968 B`, `2.00 MiB`.
fn fmt_bytes(v: f64) -> String {
    if v.abs() >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", v / (1u64 << 20) as f64)
    } else {
        format!("{v:.0} B")
    }
}

mod svg {
    use std::fmt::Write as _;

    use super::{Report, fmt_bytes};

    const W: f64 = 1000.0;
    const H: f64 = 665.0;
    const COLORS: [(&str, &str); 5] = [
        ("shmem-4k", "#8c8c8c"),
        ("hugetlb-kernel-placed", "#e0862c"),
        ("thp", "#4c78a8"),
        ("msharefs-hugetlb", "#2ca02c"),
        ("limit", "#9467bd"),
    ];

    fn color(name: &str) -> &'static str {
        COLORS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("#444444", |(_, c)| c)
    }

    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }

    fn fmt_value(v: f64) -> String {
        let a = v.abs();
        if a == 0.0 {
            "0".into()
        } else if a >= 1e6 {
            format!("{:.2}M", v / 1e6)
        } else if a >= 1e4 {
            format!("{:.0}k", v / 1e3)
        } else if a >= 100.0 {
            format!("{v:.0}")
        } else if a >= 1.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.3}")
        }
    }

    /// A tick label: as short as the value allows (`0.1`, `1`, `10k`, `1M`, `0.4`).
    fn fmt_tick(v: f64) -> String {
        let (x, suffix) = if v >= 1e6 {
            (v / 1e6, "M")
        } else if v >= 1e3 {
            (v / 1e3, "k")
        } else {
            (v, "")
        };
        let s = format!("{x:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}{suffix}")
    }

    /// One bar: configuration, value, label at the bar's end, and a note under the name
    /// (attachers measured, when fewer than asked for).
    struct Bar<'a> {
        name: &'a str,
        value: f64,
        label: String,
        note: Option<String>,
    }

    struct Panel<'a> {
        title: &'a str,
        hint: &'a str,
        log: bool,
        values: Vec<Bar<'a>>,
        line_at: Option<(f64, &'a str)>,
    }

    fn panel(out: &mut String, x0: f64, y0: f64, w: f64, h: f64, p: &Panel<'_>) {
        let label_w = 170.0;
        let right = 70.0;
        let top = 46.0;
        let bar_h = 26.0;
        let gap = (h - top - 40.0 - bar_h * p.values.len() as f64) / (p.values.len() as f64 + 1.0);
        let plot_x = x0 + label_w;
        let plot_w = w - label_w - right;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="15" font-weight="bold">{}</text>"#,
            x0 + 8.0,
            y0 + 20.0,
            esc(p.title)
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
            x0 + 8.0,
            y0 + 36.0,
            esc(p.hint)
        );
        // Scale.
        let max = p
            .values
            .iter()
            .map(|v| v.value)
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let (lo, hi) = if p.log {
            let min_pos = p
                .values
                .iter()
                .map(|v| v.value)
                .filter(|v| *v > 0.0)
                .fold(f64::INFINITY, f64::min);
            let min_pos = if min_pos.is_finite() { min_pos } else { 1.0 };
            let lo = 10f64.powf((min_pos.log10() - 0.5).floor());
            let hi = 10f64.powf(max.log10().ceil()).max(lo * 10.0);
            (lo, hi)
        } else {
            (0.0, (max * 1.15).max(1.2))
        };
        let xpos = |v: f64| -> f64 {
            if p.log {
                if v <= lo {
                    return plot_x;
                }
                plot_x + plot_w * (v.log10() - lo.log10()) / (hi.log10() - lo.log10())
            } else {
                plot_x + plot_w * (v.clamp(lo, hi) - lo) / (hi - lo)
            }
        };
        let axis_y = y0 + h - 30.0;
        // Grid lines and tick labels.
        let ticks: Vec<f64> = if p.log {
            let mut t = Vec::new();
            let mut v = lo;
            while v <= hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            (0..=((hi / 0.2).floor() as usize))
                .map(|i| i as f64 * 0.2)
                .collect()
        };
        for t in ticks {
            let x = xpos(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{axis_y:.1}" stroke="#ddd"/>"##,
                y0 + top
            );
            let _ = writeln!(
                out,
                r##"<text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#555">{}</text>"##,
                axis_y + 14.0,
                fmt_tick(t)
            );
        }
        if let Some((v, label)) = p.line_at {
            let x = xpos(v);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{axis_y:.1}" stroke="#c00" stroke-dasharray="4,3"/>"##,
                y0 + top - 4.0
            );
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#c00">{}</text>"##,
                x + 3.0,
                y0 + top + 4.0,
                esc(label)
            );
        }
        let _ = writeln!(
            out,
            r##"<line x1="{plot_x:.1}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333"/>"##,
            plot_x + plot_w
        );
        for (i, bar) in p.values.iter().enumerate() {
            let (name, label) = (bar.name, &bar.label);
            let y = y0 + top + gap + i as f64 * (bar_h + gap);
            let x1 = xpos(bar.value).max(plot_x + 1.5);
            let name_y = if bar.note.is_some() {
                y + bar_h * 0.45
            } else {
                y + bar_h * 0.68
            };
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{name_y:.1}" font-size="12" text-anchor="end">{}</text>"#,
                plot_x - 6.0,
                esc(name)
            );
            if let Some(note) = &bar.note {
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#a00">{}</text>"##,
                    plot_x - 6.0,
                    y + bar_h * 0.95,
                    esc(note)
                );
            }
            let _ = writeln!(
                out,
                r#"<rect x="{plot_x:.1}" y="{y:.1}" width="{:.1}" height="{bar_h:.1}" fill="{}"/>"#,
                x1 - plot_x,
                color(name)
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                x1 + 4.0,
                y + bar_h * 0.68,
                esc(label)
            );
        }
    }

    pub(super) fn chart(r: &Report) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">"#
        );
        let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="28" font-size="18" font-weight="bold" text-anchor="middle">msharefs-bench: {} attacher processes of a {} GiB region (Linux {})</text>"#,
            W / 2.0,
            r.attachers,
            r.size_gib,
            esc(&r.machine.kernel)
        );
        if let Some(lines) = super::headline(r) {
            for (i, line) in lines.iter().enumerate() {
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle" fill="#333">{}</text>"##,
                    W / 2.0,
                    48.0 + 15.0 * i as f64,
                    esc(line)
                );
            }
        }
        let cfg = |f: &dyn Fn(&super::ConfigResult) -> f64, fmt: &dyn Fn(f64) -> String| {
            r.configs
                .iter()
                .map(|c| Bar {
                    name: &c.name,
                    value: f(c),
                    label: fmt(f(c)),
                    note: (c.attachers_measured < c.attachers)
                        .then(|| format!("{} of {} attachers", c.attachers_measured, c.attachers)),
                })
                .collect::<Vec<_>>()
        };
        let panels = [
            Panel {
                title: "Page tables per attacher per GiB",
                hint: "bytes, log scale; lower is better",
                log: true,
                values: cfg(&|c| c.pt_bytes_per_attacher_per_gib, &fmt_bytes),
                line_at: None,
            },
            Panel {
                title: "Minor faults per attacher per GiB",
                hint: "to touch every page; log scale; lower is better",
                log: true,
                values: cfg(&|c| c.faults_per_attacher_per_gib, &fmt_value),
                line_at: None,
            },
            Panel {
                title: "New process: attach + touch the region",
                hint: "median, milliseconds, log scale; lower is better",
                log: true,
                values: cfg(&|c| c.attach_touch_ms_median, &|v| {
                    format!("{} ms", fmt_value(v))
                }),
                line_at: None,
            },
            Panel {
                title: "Memory bandwidth inside the region",
                hint: "read+write sweep / anonymous MAP_HUGETLB; higher is better",
                log: false,
                values: cfg(&|c| c.bandwidth_ratio, &|v| format!("{v:.3}")),
                line_at: Some((0.95, "0.95 target")),
            },
        ];
        let (pw, ph) = (W / 2.0, (H - 85.0) / 2.0);
        for (i, p) in panels.iter().enumerate() {
            let x0 = (i % 2) as f64 * pw;
            let y0 = 77.0 + (i / 2) as f64 * ph;
            panel(&mut out, x0, y0, pw, ph, p);
        }
        out.push_str("</svg>\n");
        out
    }

    pub(super) fn storm_chart(r: &Report) -> String {
        let mut out = String::new();
        let h = 380.0;
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
        );
        let _ = writeln!(out, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="28" font-size="18" font-weight="bold" text-anchor="middle">msharefs-bench --storm: {} attachers of a {} GiB region released at once (Linux {})</text>"#,
            W / 2.0,
            r.attachers,
            r.size_gib,
            esc(&r.machine.kernel)
        );
        let bars = |f: &dyn Fn(&super::StormResult) -> f64, fmt: &dyn Fn(f64) -> String| {
            r.storm
                .iter()
                .map(|c| Bar {
                    name: &c.name,
                    value: f(c),
                    label: if c.finished == 0 {
                        "skipped".into()
                    } else {
                        fmt(f(c))
                    },
                    note: (c.finished < c.attachers)
                        .then(|| format!("{} of {} finished", c.finished, c.attachers)),
                })
                .collect::<Vec<_>>()
        };
        let panels = [
            Panel {
                title: "Release to all touched",
                hint: "wall time, milliseconds, log scale; lower is better",
                log: true,
                values: bars(&|c| c.wall_ms, &|v| format!("{} ms", fmt_value(v))),
                line_at: None,
            },
            Panel {
                title: "Minor faults per attacher",
                hint: "to touch the whole region; log scale; lower is better",
                log: true,
                values: bars(&|c| c.faults_per_attacher, &fmt_value),
                line_at: None,
            },
        ];
        for (i, p) in panels.iter().enumerate() {
            panel(&mut out, i as f64 * W / 2.0, 45.0, W / 2.0, h - 50.0, p);
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, pt: f64, faults: f64, ms: f64, bw: f64) -> ConfigResult {
        ConfigResult {
            name: name.to_string(),
            attachers: 4,
            size_gib: 1,
            pt_bytes_per_attacher_per_gib: pt,
            faults_per_attacher_per_gib: faults,
            attach_touch_ms_median: ms,
            attach_touch_ms_p99: ms * 1.5,
            bandwidth_ratio: bw,
            attachers_measured: 4,
            note: String::new(),
            rounds: 2,
            touch_stride: 4096,
            page_size: 4096,
            huge_mapped_fraction: 0.0,
            pt_bytes_per_attacher_per_gib_rounds: vec![pt],
            pt_bytes_per_attacher_per_gib_vs_control: pt,
            vmpte_bytes_per_attacher_per_gib: pt,
            shared_pt_bytes: 0,
            pt_bytes_per_attacher_per_gib_with_shared: pt,
            faults_max_per_attacher_per_gib: faults,
            attach_touch_ms_min: ms,
            attach_touch_ms_max: ms,
            open_ms_median: 0.0,
            map_ms_median: 0.0,
            touch_ms_median: ms,
            samples: 8,
            bandwidth_gbps: 10.0 * bw,
            reference_gbps: 10.0,
            paired_attach_touch_ms_median: None,
            paired_limit_ms_median: None,
            paired_samples: 0,
        }
    }

    fn report() -> Report {
        Report::new(
            4,
            1,
            "msharefs-bench --quick".into(),
            vec![
                result("shmem-4k", 2_101_248.0, 262_144.0, 250.0, 0.93),
                result("hugetlb-kernel-placed", 4096.0, 512.0, 0.6, 1.0),
                result("thp", 4096.0, 512.0, 0.9, 0.99),
                result("msharefs-hugetlb", 0.0, 1.0, 0.2, 1.0),
                result("limit", 0.0, 1.0, 0.08, 1.0),
            ],
            vec![],
            100_000.0,
            1.0,
            12.0,
        )
    }

    #[test]
    fn json_has_every_field_of_the_schema() {
        let v: serde_json::Value = serde_json::from_str(&report().json()).unwrap();
        let configs = v["configs"].as_array().unwrap();
        assert_eq!(configs.len(), 5);
        for c in configs {
            for f in [
                "name",
                "attachers",
                "size_gib",
                "pt_bytes_per_attacher_per_gib",
                "faults_per_attacher_per_gib",
                "attach_touch_ms_median",
                "attach_touch_ms_p99",
                "bandwidth_ratio",
            ] {
                assert!(!c[f].is_null(), "{f} missing");
            }
        }
    }

    #[test]
    fn targets_are_judged() {
        let r = report();
        assert_eq!(r.targets.len(), 6);
        // 0.2 ms against the floor's 0.08 ms: 2.5x, over the 2x target.
        let lim = &r.targets[0];
        assert!(!lim.met && (lim.value - 2.5).abs() < 1e-9, "{lim:?}");
        assert!(r.targets[1..].iter().all(|t| t.met), "{:?}", r.targets);
        let t = r.table();
        assert!(t.contains("msharefs-hugetlb vs shmem-4k"));
        assert!(t.contains("msharefs-hugetlb / limit: attach+touch median 2.50x"));
        assert!(t.contains("target MET") && t.contains("target MISSED"));
        let csv = r.csv();
        assert_eq!(csv.lines().count(), 6);
    }

    #[test]
    fn the_pairs_judge_the_floor_target_when_measured() {
        // The phases say 2.5x (0.2 against 0.08 ms); the pairs 1.5x.
        let mut ms = result("msharefs-hugetlb", 0.0, 1.0, 0.2, 1.0);
        ms.paired_attach_touch_ms_median = Some(0.15);
        ms.paired_limit_ms_median = Some(0.1);
        ms.paired_samples = 48;
        let configs = vec![ms, result("limit", 0.0, 1.0, 0.08, 1.0)];
        let r = Report::new(
            4,
            1,
            "msharefs-bench".into(),
            configs,
            vec![],
            0.0,
            1.0,
            1.0,
        );
        let lim = &r.targets[0];
        assert!(lim.met && (lim.value - 1.5).abs() < 1e-9, "{lim:?}");
        assert!(lim.detail.contains("48 pairs"), "{lim:?}");
        let t = r.table();
        assert!(t.contains("attach+touch median 2.50x the floor"), "{t}");
        assert!(
            t.contains("in 48 pairs on the same region: attach+touch median 1.50x"),
            "{t}"
        );
    }

    #[test]
    fn json_reads_back_to_the_same_report() {
        let r = report();
        let back = Report::from_json(&r.json()).unwrap();
        assert_eq!(back.table(), r.table());
        assert_eq!(back.svg(), r.svg());
        assert!(Report::from_json("{\"configs\": 3}").is_err());
        assert!(Report::from_json("not json").is_err());
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let s = report().svg();
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<rect").count(), 1 + 20);
        assert!(!s.contains("NaN") && !s.contains("inf"));
    }

    fn storm(name: &str, wall_ms: f64, finished: usize) -> StormResult {
        StormResult {
            name: name.into(),
            attachers: 8,
            size_gib: 1,
            finished,
            wall_ms,
            faults_per_attacher: 512.0,
            faults_per_attacher_per_gib: 512.0,
            faults_max_per_attacher: 512.0,
            attach_touch_ms_median: 1.0,
            attach_touch_ms_p99: 2.0,
            last_start_ms: 0.5,
            ready_secs: 0.1,
            note: String::new(),
        }
    }

    #[test]
    fn storm_reports_compare_wall_times() {
        let mk = |ms_wall: f64| {
            Report::new(
                8,
                1,
                "msharefs-bench --storm 8 --quick".into(),
                vec![],
                vec![
                    storm("shmem-4k", 0.0, 0),
                    storm("hugetlb-kernel-placed", 20.0, 8),
                    storm("msharefs-hugetlb", ms_wall, 8),
                ],
                0.0,
                1.0,
                3.0,
            )
        };
        let r = mk(10.0);
        assert_eq!(r.targets.len(), 1);
        assert!(r.targets[0].met);
        assert!(!mk(30.0).targets[0].met);
        let t = r.table();
        assert!(t.contains(
            "storm, msharefs-hugetlb vs hugetlb-kernel-placed: all touched 2.00x faster"
        ));
        assert!(t.contains("0/8"), "{t}");
        assert_eq!(r.csv().lines().count(), 4);
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.contains("skipped"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let back = Report::from_json(&r.json()).unwrap();
        assert_eq!(back.table(), r.table());
        // A report written before storms existed still reads.
        let mut v: serde_json::Value = serde_json::from_str(&report().json()).unwrap();
        v.as_object_mut().unwrap().remove("storm");
        assert!(Report::from_json(&v.to_string()).unwrap().storm.is_empty());
    }
}
