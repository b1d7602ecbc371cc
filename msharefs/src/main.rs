//! `msharefs`: the daemon and its command line.
//!
//! ```text
//! msharefs mount MOUNTPOINT [--backing hugetlb|thp|shmem] [--state-dir DIR] [--foreground]
//!                           [--user-quota SIZE]
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
mod daemon;
mod fs;
mod fuse;
mod hardening;
mod hostmm;
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

/// `--user-quota`: how much region memory each non-root owner may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserQuota {
    /// A number of bytes.
    Bytes(u64),
    /// A percentage of `MemTotal`, resolved when the daemon starts (so a re-executed
    /// daemon and its parent agree without passing a number between them).
    PercentOfMemTotal(u8),
    /// No limit.
    Unlimited,
}

/// What `--user-quota` accepts, for error messages.
const QUOTA_FORMS: &str = "expected bytes (1073741824), a size with K, M, G or T in powers of \
                           1024 (16G), a percentage of MemTotal (50%) or none";

/// A non-empty run of ASCII digits as a number (`str::parse` alone would take `+5`).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `--user-quota`: `1073741824`, `16G` (K/M/G/T, powers of 1024, any case), `50%`
/// (of MemTotal, 0 to 100) or `none`. The error becomes clap's message.
fn parse_user_quota(s: &str) -> Result<UserQuota, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(UserQuota::Unlimited);
    }
    if let Some(p) = s.strip_suffix('%') {
        return match digits(p) {
            Some(p) if p <= 100 => Ok(UserQuota::PercentOfMemTotal(p as u8)),
            _ => Err("a percentage of MemTotal is a whole number from 0 to 100".to_string()),
        };
    }
    let (number, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        Some(b't' | b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = digits(number).ok_or_else(|| QUOTA_FORMS.to_string())?;
    n.checked_mul(1 << shift)
        .map(UserQuota::Bytes)
        .ok_or_else(|| "more than 2^64 - 1 bytes".to_string())
}

impl UserQuota {
    /// The limit in bytes (`None`: no limit); `mem_total` is read only for a percentage.
    fn limit(
        self,
        mem_total: impl FnOnce() -> std::io::Result<u64>,
    ) -> std::io::Result<Option<u64>> {
        Ok(match self {
            UserQuota::Bytes(b) => Some(b),
            UserQuota::PercentOfMemTotal(p) => {
                // p <= 100, so the result fits in u64.
                Some((u128::from(mem_total()?) * u128::from(p) / 100) as u64)
            }
            UserQuota::Unlimited => None,
        })
    }
}

/// The quota line of `msharefs stat`, from the report's `quota` object.
fn quota_line(q: &serde_json::Value) -> String {
    let mib = |x: &serde_json::Value| x.as_u64().unwrap_or(0) >> 20;
    let limit = match q["limit_bytes"].as_u64() {
        Some(_) => format!("{} MiB per user (root exempt)", mib(&q["limit_bytes"])),
        None => "none".to_string(),
    };
    let mut line = format!("quota: {limit}");
    for u in q["users"].as_array().into_iter().flatten() {
        line += &format!("; uid {}: {} MiB used", u["uid"], mib(&u["used_bytes"]));
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
        /// Most region memory each user other than root may own: bytes, K/M/G/T (powers
        /// of 1024, e.g. 16G), a percentage of MemTotal (e.g. 50%), or none. Sizing a
        /// region past it fails with EDQUOT; regions root chowns to a user still count.
        #[arg(long, value_name = "SIZE", default_value = "50%", value_parser = parse_user_quota)]
        user_quota: UserQuota,
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
    // A daemon older than the quota has no such object.
    if let Some(q) = v.get("quota") {
        println!("{}", quota_line(q));
    }
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
            user_quota,
        } => {
            // The background daemon is started with the same arguments plus --foreground.
            let args: Vec<String> = std::env::args().skip(1).collect();
            user_quota
                .limit(|| kernel_glue::procfs::meminfo().map(|m| m.mem_total))
                .and_then(|user_quota| {
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
                        user_quota,
                        args,
                    })
                })
        }
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
    fn user_quota_forms() {
        use UserQuota::*;
        assert_eq!(parse_user_quota("1073741824"), Ok(Bytes(1 << 30)));
        assert_eq!(parse_user_quota("0"), Ok(Bytes(0)));
        assert_eq!(parse_user_quota("64M"), Ok(Bytes(64 << 20)));
        assert_eq!(parse_user_quota("16G"), Ok(Bytes(16 << 30)));
        assert_eq!(parse_user_quota("16g"), Ok(Bytes(16 << 30)));
        assert_eq!(parse_user_quota("3k"), Ok(Bytes(3 << 10)));
        assert_eq!(parse_user_quota("2T"), Ok(Bytes(2 << 40)));
        assert_eq!(parse_user_quota("50%"), Ok(PercentOfMemTotal(50)));
        assert_eq!(parse_user_quota("100%"), Ok(PercentOfMemTotal(100)));
        assert_eq!(parse_user_quota("0%"), Ok(PercentOfMemTotal(0)));
        assert_eq!(parse_user_quota("none"), Ok(Unlimited));
        assert_eq!(parse_user_quota("NONE"), Ok(Unlimited));
        assert_eq!(
            parse_user_quota("18446744073709551615"),
            Ok(Bytes(u64::MAX))
        );
    }

    #[test]
    fn bad_user_quotas_are_refused_with_a_reason() {
        for bad in [
            "",
            "G",
            "16X",
            "16GB",
            "16 G",
            " 16G",
            "-1",
            "+5",
            "1.5G",
            "101%",
            "-5%",
            "%",
            "50 %",
            "1e9",
            "unlimited",
            "16G%",
        ] {
            assert!(parse_user_quota(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_user_quota("16X").unwrap_err().contains("16G"));
        assert!(parse_user_quota("101%").unwrap_err().contains("0 to 100"));
        assert!(
            parse_user_quota("16777216T")
                .unwrap_err()
                .contains("more than")
        );
        assert!(parse_user_quota("18446744073709551616").is_err());
    }

    #[test]
    fn user_quota_limits() {
        let never = || -> std::io::Result<u64> { panic!("MemTotal read for a fixed size") };
        assert_eq!(UserQuota::Bytes(5).limit(never).unwrap(), Some(5));
        assert_eq!(UserQuota::Unlimited.limit(never).unwrap(), None);
        let total = || Ok(24 << 30);
        assert_eq!(
            UserQuota::PercentOfMemTotal(50).limit(total).unwrap(),
            Some(12 << 30)
        );
        assert_eq!(
            UserQuota::PercentOfMemTotal(100)
                .limit(|| Ok(u64::MAX))
                .unwrap(),
            Some(u64::MAX)
        );
        let fails = || Err(std::io::Error::other("no /proc"));
        assert!(UserQuota::PercentOfMemTotal(50).limit(fails).is_err());
    }

    #[test]
    fn quota_line_reads_the_report() {
        let q = serde_json::json!({
            "limit_bytes": 12u64 << 30,
            "users": [{"uid": 0, "used_bytes": 256u64 << 20}, {"uid": 1000, "used_bytes": 4u64 << 30}],
        });
        assert_eq!(
            quota_line(&q),
            "quota: 12288 MiB per user (root exempt); uid 0: 256 MiB used; uid 1000: 4096 MiB used"
        );
        let q = serde_json::json!({"limit_bytes": null, "users": []});
        assert_eq!(quota_line(&q), "quota: none");
    }
}
