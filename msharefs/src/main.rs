//! `msharefs`: the daemon and its command line.
//!
//! ```text
//! msharefs mount MOUNTPOINT [--backing hugetlb|thp|shmem] [--state-dir DIR] [--foreground]
//!                           [--table-budget SIZE] [--psi-threshold PCT] [--user-quota SIZE]
//! msharefs umount MOUNTPOINT [--purge]
//! msharefs stat MOUNTPOINT [--json]
//! mount.msharefs SOURCE DIR [-sfnv] [-o backing=...,state_dir=...,...]   (mount(8) helper)
//! ```
//!
//! The binary is also mount(8)'s helper when called as `mount.msharefs` (a link
//! installed as `/sbin/mount.msharefs`), so `mount -t msharefs msharefs DIR -o ...` and
//! `/etc/fstab` lines work (module `options` parses both forms).
//!
//! Modules: `fuse` (FUSE operations) → `fs` (file-system logic) → `backing` (stores and
//! reservations) and `hostmm` (host mappings that own the shared page tables), `shrinker`
//! (releases idle host tables), `attach` (the socket that hands hugetlb backings to
//! clients), `state` (persistent tree), `stats` (`msharefs stat`), `daemon` (life cycle).
#![forbid(unsafe_code)]

mod attach;
mod attachers;
mod backing;
mod daemon;
mod fs;
mod fuse;
mod hardening;
mod hostmm;
mod notify;
mod options;
mod paths;
mod shm;
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

/// The quota line of `msharefs stat`, from the report's `quota` object.
fn quota_line(q: &stats::QuotaReport) -> String {
    let limit = match q.limit_bytes {
        Some(b) => format!("{} MiB per user (root exempt)", b >> 20),
        None => "none".to_string(),
    };
    let mut line = format!("quota: {limit}");
    for u in &q.users {
        line += &format!("; uid {}: {} MiB used", u.uid, u.used_bytes >> 20);
    }
    line
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
        /// Directory for the daemon's backing mounts and metadata, made absolute; created
        /// (mode 0711) if missing; an existing one must be empty or msharefs's own
        /// [default: /run/msharefs/state/NAME].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Run the daemon in the foreground (what a systemd unit runs; readiness is sent
        /// to $NOTIFY_SOCKET).
        #[arg(long)]
        foreground: bool,
        /// Keep at most this many bytes of page tables cached for regions nobody has
        /// attached (0: cache nothing idle; K/M/G/T suffixes) [default: no limit].
        #[arg(long, value_name = "SIZE", allow_hyphen_values = true,
              value_parser = options::parse_size)]
        table_budget: Option<u64>,
        /// Release every idle cached table set when memory pressure (PSI some avg10,
        /// percent, 0 to 100) passes this.
        #[arg(long, value_name = "PCT", default_value = "10", allow_hyphen_values = true,
              value_parser = options::parse_psi_threshold)]
        psi_threshold: f64,
        /// Most region memory each user other than root may own: bytes, K/M/G/T (powers
        /// of 1024, e.g. 16G), a percentage of MemTotal (e.g. 50%), or none. Sizing a
        /// region past it fails with EDQUOT; regions root chowns to a user still count.
        #[arg(long, value_name = "SIZE", default_value = "50%", allow_hyphen_values = true,
              value_parser = options::parse_user_quota)]
        user_quota: options::UserQuota,
        /// Make a touch of a range MSHAREFS_UNMAP removed raise SIGBUS in attachers, as the
        /// kernel's mshare faults (default: it reads as zero). Every mapping of a region
        /// must then be made through libmshare or the shim, and a forked child of an
        /// attacher builds its own tables; not for mounts that serve the shim's anonymous
        /// or shared-memory placement.
        #[arg(long)]
        unmap_guard: bool,
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
    let report = stats::Report::from_reply(&body).map_err(std::io::Error::other)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?
        );
        return Ok(());
    }
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
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
    for r in &report.regions {
        println!(
            "{:<32} {:>8} {:>10.0} {:>4} {:>5} {:>8} {:>7} {:>11.3} {:>11.3} {:>11.3}",
            r.path,
            r.backing.name(),
            mib(r.size),
            r.objects,
            r.open_handles,
            r.attached.len(),
            if r.tables_cached.is_empty() {
                "-".to_string()
            } else {
                r.tables_cached.join(",")
            },
            mib(r.pt_bytes),
            mib(r.pt_bytes_4k_equivalent),
            mib(r.saving_bytes),
        );
    }
    let t = &report.totals;
    println!(
        "total: {} regions, {:.0} MiB, {} attached, page tables {:.3} MiB (4 KiB pages: {:.3} MiB), {} huge pages added",
        t.regions,
        mib(t.size),
        t.attached,
        mib(t.pt_bytes),
        mib(t.pt_bytes_4k_equivalent),
        t.pool_pages_added
    );
    println!("{}", quota_line(&report.quota));
    Ok(())
}

/// The name the binary answers to as mount(8)'s helper (`/sbin/mount.msharefs`).
const HELPER_NAME: &str = "mount.msharefs";

/// `mount.msharefs SOURCE DIR [-sfnv] [-o OPTIONS]`: what mount(8) runs for
/// `mount -t msharefs` and `/etc/fstab` lines of type msharefs.
fn helper_main(args: &[String]) -> ExitCode {
    let call = match options::parse_helper_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{HELPER_NAME}: {e}");
            // mount(8)'s "incorrect invocation or permissions".
            return ExitCode::from(1);
        }
    };
    init_logging(call.opts.log_level);
    for o in &call.ignored {
        eprintln!("{HELPER_NAME}: ignoring unknown option {o:?} (-s)");
    }
    if call.fake {
        if call.verbose {
            println!("{HELPER_NAME}: -f: options valid, nothing mounted");
        }
        return ExitCode::SUCCESS;
    }
    let r = paths::absolute_mountpoint(&call.opts.mountpoint).and_then(|mnt| {
        if process_is_root() {
            daemon::start_background(&mnt, &call.opts)
        } else {
            Err(std::io::Error::other(
                "msharefs mount needs root (FUSE passthrough and huge-page pool)",
            ))
        }
    });
    match r {
        Ok(line) => {
            if call.verbose {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{HELPER_NAME}: {e}");
            // mount(8)'s "mount failure".
            ExitCode::from(32)
        }
    }
}

fn process_is_root() -> bool {
    kernel_glue::process::geteuid() == 0
}

fn main() -> ExitCode {
    let mut argv = std::env::args();
    let name = argv.next().unwrap_or_default();
    if std::path::Path::new(&name).file_name() == Some(std::ffi::OsStr::new(HELPER_NAME)) {
        let args: Vec<String> = argv.collect();
        return helper_main(&args);
    }
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
            user_quota,
            unmap_guard,
        } => (|| {
            let mut opts = options::MountOpts::new(mountpoint);
            opts.unmap_guard = unmap_guard;
            opts.backing = backing.map(|b| match b {
                BackingArg::Hugetlb => state::Store::Hugetlb,
                BackingArg::Thp => state::Store::Thp,
                BackingArg::Shmem => state::Store::Shmem,
            });
            opts.state_dir = state_dir
                .map(|d| options::absolute_state_dir(&d))
                .transpose()
                .map_err(std::io::Error::other)?;
            opts.foreground = foreground;
            opts.table_budget = table_budget;
            opts.psi_threshold = psi_threshold;
            opts.user_quota = user_quota;
            opts.log_level = cli.log_level;
            daemon::mount(opts)
        })(),
        Cmd::Umount { mountpoint, purge } => daemon::umount(&mountpoint, purge),
        Cmd::Stat { mountpoint, json } => stat(&mountpoint, json),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msharefs: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_line_reads_the_report() {
        let q: stats::QuotaReport = serde_json::from_value(serde_json::json!({
            "limit_bytes": 12u64 << 30,
            "users": [{"uid": 0, "used_bytes": 256u64 << 20}, {"uid": 1000, "used_bytes": 4u64 << 30}],
        }))
        .unwrap();
        assert_eq!(
            quota_line(&q),
            "quota: 12288 MiB per user (root exempt); uid 0: 256 MiB used; uid 1000: 4096 MiB used"
        );
        let q =
            serde_json::from_value(serde_json::json!({"limit_bytes": null, "users": []})).unwrap();
        assert_eq!(quota_line(&q), "quota: none");
    }
}
