//! `msharefs`: the daemon and its command line.
//!
//! ```text
//! msharefs mount MOUNTPOINT [--backing hugetlb|thp|shmem] [--state-dir DIR] [--foreground]
//! msharefs umount MOUNTPOINT [--purge]
//! msharefs stat MOUNTPOINT [--json]
//! ```
//!
//! Modules: `fuse` (FUSE operations) → `fs` (file-system logic) → `backing` (stores and
//! reservations) and `hostmm` (host mappings that own the shared page tables), `shrinker`
//! (releases idle host tables), `attach` (the socket that hands hugetlb backings to
//! clients), `state` (persistent tree), `stats` (`msharefs stat`), `daemon` (life cycle).
#![forbid(unsafe_code)]

mod attach;
mod backing;
mod bench;
mod daemon;
mod fs;
mod fuse;
mod hardening;
mod hostmm;
mod paths;
mod shrinker;
mod state;
mod stats;
mod tablecache;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// msharefs: shared page tables for large shared memory, behind the mshare file-system API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackingArg {
    /// 2 MiB hugetlb pages; attachers share page tables.
    Hugetlb,
    /// 2 MiB transparent huge pages on tmpfs; plain mmap works.
    Thp,
    /// 4 KiB shmem pages; plain mmap works.
    Shmem,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Mount msharefs; returns once the mount is live.
    Mount {
        /// Where to mount.
        mountpoint: PathBuf,
        /// Default backing of new regions [default: hugetlb when huge pages can be had,
        /// else thp].
        #[arg(long, value_enum)]
        backing: Option<BackingArg>,
        /// Directory for the daemon's backing mounts and metadata
        /// [default: /run/msharefs/state/NAME].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Run the daemon in the foreground.
        #[arg(long)]
        foreground: bool,
        /// Keep at most this many bytes of page tables cached for regions nobody has
        /// attached (0: cache nothing idle) [default: no limit].
        #[arg(long)]
        table_budget: Option<u64>,
        /// Release every idle cached table set when memory pressure (PSI some avg10,
        /// percent) passes this.
        #[arg(long, default_value_t = 10.0)]
        psi_threshold: f64,
    },
    /// Stop the daemon and remove the mount; region data stays unless --purge.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
        /// Destroy every region and give back every huge page the daemon added.
        #[arg(long)]
        purge: bool,
    },
    /// Show regions, attached processes and page-table figures.
    Stat {
        /// The mount point.
        mountpoint: PathBuf,
        /// Print JSON (stable schema, see README).
        #[arg(long)]
        json: bool,
    },
    /// Measure page-table memory, faults, attach time and bandwidth of msharefs against
    /// plain shared memory, side by side (see docs/BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// One attacher process of `msharefs bench` (internal).
    #[command(name = "bench-attacher", hide = true)]
    BenchAttacher(bench::AttacherArgs),
}

fn init_logging(level: log::LevelFilter) {
    let mut b = env_logger::Builder::new();
    b.filter_level(level);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format_timestamp_millis().init();
}

fn stat(mountpoint: &std::path::Path, json: bool) -> std::io::Result<()> {
    let mnt = paths::absolute_mountpoint(mountpoint)?;
    let state = paths::state_dir_for(&mnt);
    let body = attach::request_stats(&state.socket()).map_err(|e| {
        std::io::Error::other(format!(
            "{}: no running msharefs daemon ({e})",
            mnt.display()
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(std::io::Error::other)?;
    if let Some(e) = v.get("error") {
        return Err(std::io::Error::other(e.to_string()));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(std::io::Error::other)?
        );
        return Ok(());
    }
    let mib = |x: &serde_json::Value| x.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    println!(
        "{:<32} {:>8} {:>10} {:>4} {:>5} {:>8} {:>7} {:>11} {:>11} {:>11}",
        "REGION",
        "BACKING",
        "SIZE(MiB)",
        "OBJ",
        "OPEN",
        "ATTACHED",
        "TABLES",
        "PT(MiB)",
        "4K-PT(MiB)",
        "SAVED(MiB)"
    );
    for r in v["regions"].as_array().into_iter().flatten() {
        let tables: Vec<&str> = r["tables_cached"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        println!(
            "{:<32} {:>8} {:>10.0} {:>4} {:>5} {:>8} {:>7} {:>11.3} {:>11.3} {:>11.3}",
            r["path"].as_str().unwrap_or(""),
            r["backing"].as_str().unwrap_or(""),
            mib(&r["size"]),
            r["objects"].as_u64().unwrap_or(0),
            r["open_handles"].as_u64().unwrap_or(0),
            r["attached"].as_array().map_or(0, |a| a.len()),
            if tables.is_empty() {
                "-".to_string()
            } else {
                tables.join(",")
            },
            mib(&r["pt_bytes"]),
            mib(&r["pt_bytes_4k_equivalent"]),
            mib(&r["saving_bytes"]),
        );
    }
    let t = &v["totals"];
    println!(
        "total: {} regions, {:.0} MiB, {} attached, page tables {:.3} MiB (4 KiB pages: {:.3} MiB), {} huge pages added",
        t["regions"].as_u64().unwrap_or(0),
        mib(&t["size"]),
        t["attached"].as_u64().unwrap_or(0),
        mib(&t["pt_bytes"]),
        mib(&t["pt_bytes_4k_equivalent"]),
        t["pool_pages_added"].as_u64().unwrap_or(0)
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level);
    let r = match cli.cmd {
        Cmd::Mount {
            mountpoint,
            backing,
            state_dir,
            foreground,
            table_budget,
            psi_threshold,
        } => {
            // The background daemon is started with the same arguments plus --foreground.
            let args: Vec<String> = std::env::args().skip(1).collect();
            daemon::mount(daemon::MountOpts {
                mountpoint,
                backing: backing.map(|b| match b {
                    BackingArg::Hugetlb => state::Store::Hugetlb,
                    BackingArg::Thp => state::Store::Thp,
                    BackingArg::Shmem => state::Store::Shmem,
                }),
                state_dir,
                foreground,
                table_budget,
                psi_threshold,
                args,
            })
        }
        Cmd::Umount { mountpoint, purge } => daemon::umount(&mountpoint, purge),
        Cmd::Stat { mountpoint, json } => stat(&mountpoint, json),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchAttacher(args) => bench::attacher::run(args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msharefs: {e}");
            ExitCode::FAILURE
        }
    }
}
