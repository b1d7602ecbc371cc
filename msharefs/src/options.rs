//! The values `msharefs mount` takes, parsed and validated in one place for both of its
//! front ends: the command line (`msharefs mount DIR --user-quota 16G ...`, clap) and the
//! mount(8) helper (`mount -t msharefs msharefs DIR -o user_quota=16G,...`, an
//! `/etc/fstab` line). Every error names the value (and the option) it is about.
//!
//! This module owns parsing only; what the values mean is `daemon` and `tablecache`.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::state::Store;

/// `--user-quota`: how much region memory each non-root owner may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserQuota {
    /// A number of bytes.
    Bytes(u64),
    /// A percentage of `MemTotal`, resolved when the daemon starts (so a re-executed
    /// daemon and its parent agree without passing a number between them).
    PercentOfMemTotal(u8),
    /// No limit.
    Unlimited,
}

/// What a size accepts, for error messages.
const SIZE_FORMS: &str = "expected bytes (1073741824) or a size with K, M, G or T in powers \
                          of 1024 (16G, 16GB, 16GiB)";

/// What `--user-quota` accepts, for error messages.
const QUOTA_FORMS: &str = "expected bytes (1073741824), a size with K, M, G or T in powers of \
                           1024 (16G, 16GB, 16GiB), a percentage of MemTotal (50%) or none";

/// A non-empty run of ASCII digits as a number (`str::parse` alone would take `+5`).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A size in bytes, in the one grammar of msharefs ([`mshare_uapi::parse_size`]):
/// `1073741824`, `16G`, `16GB`, `16GiB`. The error names the value.
pub fn parse_size(s: &str) -> Result<u64, String> {
    mshare_uapi::parse_size(s.as_bytes()).ok_or_else(|| {
        // Well formed but too large: the same unit after a small number parses.
        let unit = s.trim_start_matches(|c: char| c.is_ascii_digit());
        if unit.len() < s.len() && mshare_uapi::parse_size(format!("1{unit}").as_bytes()).is_some()
        {
            format!("{s:?}: more than 2^64 - 1 bytes")
        } else {
            format!("{s:?}: {SIZE_FORMS}")
        }
    })
}

/// Parses `--user-quota`: a size as [`parse_size`], `50%` (of MemTotal, 0 to 100) or
/// `none`. The error names the value.
pub fn parse_user_quota(s: &str) -> Result<UserQuota, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(UserQuota::Unlimited);
    }
    if let Some(p) = s.strip_suffix('%') {
        return match digits(p) {
            Some(p) if p <= 100 => Ok(UserQuota::PercentOfMemTotal(p as u8)),
            _ => Err(format!(
                "{s:?}: a percentage of MemTotal is a whole number from 0 to 100"
            )),
        };
    }
    parse_size(s).map(UserQuota::Bytes).map_err(|e| {
        if e.ends_with("bytes") {
            e
        } else {
            format!("{s:?}: {QUOTA_FORMS}")
        }
    })
}

/// Parses `--psi-threshold`: a percentage of time stalled (PSI `some avg10`), a finite
/// number from 0 to 100. `nan`, `inf`, negative and larger values are refused by name.
pub fn parse_psi_threshold(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a percentage from 0 to 100 (e.g. 10 or 12.5)"))?;
    if !v.is_finite() || !(0.0..=100.0).contains(&v) {
        return Err(format!(
            "{s:?}: a PSI threshold is a percentage from 0 to 100"
        ));
    }
    Ok(v)
}

/// Parses a backing name (`hugetlb`, `thp`, `shmem`).
pub fn parse_backing(s: &str) -> Result<Store, String> {
    match s {
        "hugetlb" => Ok(Store::Hugetlb),
        "thp" => Ok(Store::Thp),
        "shmem" => Ok(Store::Shmem),
        _ => Err(format!("{s:?}: expected hugetlb, thp or shmem")),
    }
}

/// Parses a log level (`error`, `warn`, `info`, `debug`, `trace`, `off`).
pub fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("{s:?}: expected error, warn, info, debug, trace or off"))
}

impl UserQuota {
    /// The limit in bytes (`None`: no limit); `mem_total` is read only for a percentage.
    pub fn limit(
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

    /// The form [`parse_user_quota`] reads back.
    pub fn to_arg(self) -> String {
        match self {
            UserQuota::Bytes(b) => b.to_string(),
            UserQuota::PercentOfMemTotal(p) => format!("{p}%"),
            UserQuota::Unlimited => "none".to_string(),
        }
    }
}

/// Options of `msharefs mount`, as both front ends produce them.
#[derive(Debug, Clone)]
pub struct MountOpts {
    /// Mount point (as given; made absolute by the daemon).
    pub mountpoint: PathBuf,
    /// Default backing for new regions; `None`: hugetlb when huge pages can be had.
    pub backing: Option<Store>,
    /// State directory, absolute; `None`: the default for the mount point.
    pub state_dir: Option<PathBuf>,
    /// Stay in the foreground (be the daemon).
    pub foreground: bool,
    /// Shrinker budget for idle cached tables.
    pub table_budget: Option<u64>,
    /// PSI threshold of the shrinker, percent.
    pub psi_threshold: f64,
    /// Region memory each non-root owner may hold.
    pub user_quota: UserQuota,
    /// Log level of the daemon.
    pub log_level: log::LevelFilter,
    /// Guard `MSHAREFS_UNMAP` (attachers get `SIGBUS` in an unmapped range).
    pub unmap_guard: bool,
}

/// The default `--psi-threshold`.
pub const DEFAULT_PSI_THRESHOLD: f64 = 10.0;
/// The default `--user-quota`.
pub const DEFAULT_USER_QUOTA: UserQuota = UserQuota::PercentOfMemTotal(50);

impl MountOpts {
    /// Options with every default, for mount point `mountpoint`.
    pub fn new(mountpoint: PathBuf) -> MountOpts {
        MountOpts {
            mountpoint,
            backing: None,
            state_dir: None,
            foreground: false,
            table_budget: None,
            psi_threshold: DEFAULT_PSI_THRESHOLD,
            user_quota: DEFAULT_USER_QUOTA,
            log_level: log::LevelFilter::Info,
            unmap_guard: false,
        }
    }

    /// The `msharefs` arguments that start the foreground daemon with these options (the
    /// background `mount` re-executes itself with them).
    pub fn daemon_args(&self, mountpoint: &std::path::Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--log-level".into(),
            self.log_level.to_string().to_lowercase().into(),
            "mount".into(),
            mountpoint.into(),
            "--foreground".into(),
            "--psi-threshold".into(),
            self.psi_threshold.to_string().into(),
            "--user-quota".into(),
            self.user_quota.to_arg().into(),
        ];
        if let Some(dir) = &self.state_dir {
            a.extend(["--state-dir".into(), dir.into()]);
        }
        if let Some(b) = self.backing {
            a.extend(["--backing".into(), b.name().into()]);
        }
        if let Some(t) = self.table_budget {
            a.extend(["--table-budget".into(), t.to_string().into()]);
        }
        if self.unmap_guard {
            a.push("--unmap-guard".into());
        }
        a
    }
}

/// Makes a `--state-dir` absolute against the working directory (the daemon, the
/// registry link and `msharefs umount` must all name the same directory).
///
/// # Errors
/// The working directory cannot be read; an empty path.
pub fn absolute_state_dir(p: &std::path::Path) -> Result<PathBuf, String> {
    if p.as_os_str().is_empty() {
        return Err("--state-dir: empty path".to_string());
    }
    std::path::absolute(p).map_err(|e| format!("--state-dir {}: {e}", p.display()))
}

/// What the mount(8) helper was asked to do.
#[derive(Debug, Clone)]
pub struct HelperCall {
    /// The mount options.
    pub opts: MountOpts,
    /// `-f`: check everything, mount nothing.
    pub fake: bool,
    /// `-v`: say what was done.
    pub verbose: bool,
    /// Options ignored because of `-s` (sloppy), to be reported.
    pub ignored: Vec<String>,
}

/// Options mount(8) or fstab may pass that mean nothing to msharefs: it always mounts
/// read-write, `nosuid,nodev`, and its times are the daemon's. They are accepted and
/// ignored, like `noauto`, `nofail`, `_netdev` and `x-*` (which concern mount(8) and
/// systemd, not the file system).
const IGNORED_OPTIONS: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "sync",
    "async",
    "dirsync",
    "mand",
    "nomand",
    "silent",
    "loud",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
];

/// Applies one `-o` option of the mount(8) helper to `opts`. `Ok(false)`: unknown.
fn apply_option(opts: &mut MountOpts, opt: &str) -> Result<bool, String> {
    let (key, value) = match opt.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (opt, None),
    };
    // fstab writers use both spellings of the long options.
    let key = key.replace('-', "_");
    let need = |v: Option<&str>| -> Result<String, String> {
        match v {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(format!("option {key} needs a value ({key}=...)")),
        }
    };
    let named = |e: String| format!("option {key}: {e}");
    match key.as_str() {
        "backing" => opts.backing = Some(parse_backing(&need(value)?).map_err(named)?),
        "state_dir" => {
            opts.state_dir =
                Some(absolute_state_dir(std::path::Path::new(&need(value)?)).map_err(named)?)
        }
        "table_budget" => opts.table_budget = Some(parse_size(&need(value)?).map_err(named)?),
        "psi_threshold" => {
            opts.psi_threshold = parse_psi_threshold(&need(value)?).map_err(named)?
        }
        "user_quota" => opts.user_quota = parse_user_quota(&need(value)?).map_err(named)?,
        "log_level" => opts.log_level = parse_log_level(&need(value)?).map_err(named)?,
        "unmap_guard" if value.is_none() => opts.unmap_guard = true,
        "ro" => return Err("msharefs cannot be mounted read-only (option ro)".to_string()),
        k if k.to_ascii_lowercase().starts_with("x_") || k == "comment" => {}
        k if value.is_none() && IGNORED_OPTIONS.contains(&k) => {}
        // `user=NAME`, which mount(8) adds for a `user` fstab line.
        "user" | "context" | "fscontext" | "defcontext" | "rootcontext" => {}
        _ => return Ok(false),
    }
    Ok(true)
}

/// Parses the arguments mount(8) passes to `/sbin/mount.msharefs` (argv[1..]):
/// `SOURCE DIR [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]`, options anywhere after the
/// first two. `SOURCE` is conventionally `msharefs` and otherwise ignored.
///
/// # Errors
/// A message naming the argument or option that is wrong.
pub fn parse_helper_args(args: &[String]) -> Result<HelperCall, String> {
    let mut positional = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let (mut fake, mut verbose, mut sloppy) = (false, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => options.push(
                it.next()
                    .ok_or_else(|| "-o needs an option list".to_string())?
                    .clone(),
            ),
            "-t" => {
                let t = it.next().ok_or_else(|| "-t needs a type".to_string())?;
                if t != "msharefs" && !t.starts_with("msharefs.") {
                    return Err(format!("-t {t}: this helper mounts msharefs only"));
                }
            }
            "-N" => {
                return Err(
                    "-N (mount namespace) is not supported: run mount inside the namespace"
                        .to_string(),
                );
            }
            s if s.starts_with("-o") && s.len() > 2 => options.push(s[2..].to_string()),
            s if s.starts_with('-') && s.len() > 1 => {
                for f in s[1..].chars() {
                    match f {
                        'f' => fake = true,
                        'v' => verbose = true,
                        's' => sloppy = true,
                        'n' => {}
                        _ => return Err(format!("unknown flag -{f} (in {s})")),
                    }
                }
            }
            _ => positional.push(a.clone()),
        }
    }
    let [_source, dir] = positional.as_slice() else {
        return Err(format!(
            "usage: mount.msharefs SOURCE DIR [-sfnv] [-o OPTIONS] (got {} operands: {positional:?})",
            positional.len()
        ));
    };
    let mut opts = MountOpts::new(PathBuf::from(dir));
    let mut ignored = Vec::new();
    for opt in options.iter().flat_map(|o| o.split(',')) {
        if opt.is_empty() {
            continue;
        }
        if !apply_option(&mut opts, opt)? {
            if sloppy {
                ignored.push(opt.to_string());
            } else {
                return Err(format!(
                    "unknown option {opt:?} (msharefs takes backing=, state_dir=, \
                     table_budget=, psi_threshold=, user_quota=, log_level=, unmap_guard; -s ignores \
                     unknown options)"
                ));
            }
        }
    }
    Ok(HelperCall {
        opts,
        fake,
        verbose,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

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
        for q in [Bytes(5), PercentOfMemTotal(7), Unlimited] {
            assert_eq!(parse_user_quota(&q.to_arg()), Ok(q));
        }
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for bad in [
            "",
            "G",
            "16X",
            "16GBs",
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
            let e = parse_user_quota(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        assert!(parse_user_quota("16X").unwrap_err().contains("16G"));
        assert!(parse_user_quota("101%").unwrap_err().contains("0 to 100"));
        assert!(
            parse_user_quota("16777216T")
                .unwrap_err()
                .contains("more than")
        );
        assert!(parse_user_quota("18446744073709551616").is_err());
        for bad in ["", "-1", "1.5G", "nan", "16GiBs", "18446744073709551616"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        // One grammar with the shim's environment (mshare_uapi::parse_size).
        assert_eq!(parse_size("16GB"), Ok(16 << 30));
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        for bad in [
            "nan", "NaN", "inf", "-inf", "-0.5", "100.01", "1e3", "", "ten",
        ] {
            let e = parse_psi_threshold(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
        assert_eq!(parse_psi_threshold("0"), Ok(0.0));
        assert_eq!(parse_psi_threshold("12.5"), Ok(12.5));
        assert_eq!(parse_psi_threshold("100"), Ok(100.0));
        assert!(parse_backing("huge").unwrap_err().contains("\"huge\""));
        assert!(parse_log_level("loud").unwrap_err().contains("\"loud\""));
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
    fn helper_reads_what_mount_passes() {
        // What util-linux 2.38 mount(8) passed for an fstab line with
        // `backing=thp,state_dir=/s,noauto,nofail,_netdev,x-systemd.after=foo,defaults`.
        let c = parse_helper_args(&args(
            "msharefs /mnt/m -o rw,backing=thp,state_dir=/s,user_quota=50%,nofail,_netdev",
        ))
        .unwrap();
        assert_eq!(c.opts.mountpoint, PathBuf::from("/mnt/m"));
        assert_eq!(c.opts.backing, Some(Store::Thp));
        assert_eq!(c.opts.state_dir, Some(PathBuf::from("/s")));
        assert_eq!(c.opts.user_quota, UserQuota::PercentOfMemTotal(50));
        assert!(!c.fake && !c.verbose);
        let c = parse_helper_args(&args(
            "msharefs /m -v -o noatime,table-budget=1G,psi_threshold=2.5,x-mount.mkdir -n -f \
             -t msharefs -o log_level=debug,comment=systemd.automount",
        ))
        .unwrap();
        assert_eq!(c.opts.table_budget, Some(1 << 30));
        assert_eq!(c.opts.psi_threshold, 2.5);
        assert_eq!(c.opts.log_level, log::LevelFilter::Debug);
        assert!(c.fake && c.verbose);
        let c = parse_helper_args(&args("msharefs /m -s -o frobnicate,backing=shmem")).unwrap();
        assert_eq!(c.ignored, vec!["frobnicate".to_string()]);
        assert_eq!(c.opts.backing, Some(Store::Shmem));
        // A relative state_dir is made absolute.
        let c = parse_helper_args(&args("msharefs /m -o state_dir=rel/dir")).unwrap();
        assert!(c.opts.state_dir.unwrap().is_absolute());
    }

    #[test]
    fn helper_refuses_with_the_value_named() {
        for (line, needle) in [
            ("msharefs /m -o frobnicate", "\"frobnicate\""),
            ("msharefs /m -o ro", "ro"),
            ("msharefs /m -o psi_threshold=nan", "\"nan\""),
            ("msharefs /m -o psi_threshold=-1", "\"-1\""),
            ("msharefs /m -o table_budget=-1", "\"-1\""),
            ("msharefs /m -o user_quota=200%", "\"200%\""),
            ("msharefs /m -o backing=huge", "\"huge\""),
            ("msharefs /m -o backing", "backing="),
            ("msharefs /m -o unmap_guard=1", "unmap_guard=1"),
            ("msharefs /m -o state_dir=", "state_dir="),
            ("msharefs /m -t ext4", "ext4"),
            ("msharefs /m -N 1234", "-N"),
            ("msharefs /m -x", "-x"),
            ("msharefs", "1 operands"),
            ("msharefs /m /n", "3 operands"),
        ] {
            let e = parse_helper_args(&args(line)).unwrap_err();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn daemon_args_round_trip() {
        let mut o = MountOpts::new("/m".into());
        o.backing = Some(Store::Thp);
        o.table_budget = Some(7);
        o.state_dir = Some("/s".into());
        o.psi_threshold = 2.5;
        o.unmap_guard = true;
        let a: Vec<String> = o
            .daemon_args(std::path::Path::new("/m"))
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            a.join(" "),
            "--log-level info mount /m --foreground --psi-threshold 2.5 --user-quota 50% \
             --state-dir /s --backing thp --table-budget 7 --unmap-guard"
        );
        let c = parse_helper_args(&args("msharefs /m -o unmap_guard,backing=hugetlb")).unwrap();
        assert!(c.opts.unmap_guard);
    }
}
