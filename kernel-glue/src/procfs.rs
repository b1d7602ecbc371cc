//! Measurement from the kernel: `/proc/meminfo`, `/proc/PID/status`, `/proc/PID/smaps`,
//! `/proc/*/maps`, PSI, `/proc/loadavg`, `getrusage`, and `vm.stat_refresh` (which makes
//! `/proc/meminfo` exact).

use std::io;
use std::mem::MaybeUninit;

use crate::check_retval;

/// The `/proc/meminfo` fields msharefs reports, in bytes (pages for `HugePages_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    /// `PageTables`: bytes of page-table pages system-wide.
    pub page_tables: u64,
    /// `HugePages_Total`.
    pub huge_total: u64,
    /// `HugePages_Free`.
    pub huge_free: u64,
    /// `HugePages_Rsvd`.
    pub huge_rsvd: u64,
    /// `HugePages_Surp`.
    pub huge_surp: u64,
    /// `MemAvailable` in bytes.
    pub mem_available: u64,
    /// `MemTotal` in bytes.
    pub mem_total: u64,
}

fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Reads `/proc/meminfo`.
///
/// # Errors
/// Reading the file; `EIO` when a field is missing.
pub fn meminfo() -> io::Result<MemInfo> {
    let t = std::fs::read_to_string("/proc/meminfo")?;
    let f = |k| field_kb(&t, k).ok_or_else(|| crate::errno(libc::EIO));
    Ok(MemInfo {
        page_tables: f("PageTables")? * 1024,
        huge_total: f("HugePages_Total")?,
        huge_free: f("HugePages_Free")?,
        huge_rsvd: f("HugePages_Rsvd")?,
        huge_surp: f("HugePages_Surp")?,
        mem_available: f("MemAvailable")? * 1024,
        mem_total: f("MemTotal")? * 1024,
    })
}

/// `VmPTE` of a process in bytes (page tables it owns, shared PMD pages included once per
/// sharer by the kernel's accounting of its own tables only).
///
/// # Errors
/// `ENOENT` for a gone process; `EIO` when the field is missing.
pub fn vm_pte(pid: u32) -> io::Result<u64> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    field_kb(&t, "VmPTE")
        .map(|kb| kb * 1024)
        .ok_or_else(|| crate::errno(libc::EIO))
}

/// `HugetlbPages` of a process in bytes: the hugetlb pages its mappings hold.
///
/// # Errors
/// `ENOENT` for a gone process; `EIO` when the field is missing (a zombie has no memory
/// fields).
pub fn hugetlb_bytes(pid: u32) -> io::Result<u64> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    field_kb(&t, "HugetlbPages")
        .map(|kb| kb * 1024)
        .ok_or_else(|| crate::errno(libc::EIO))
}

/// The `KernelPageSize` in bytes of the VMA of `pid` that contains `addr`.
///
/// # Errors
/// `ENOENT` when no VMA contains `addr` or the process is gone.
pub fn kernel_page_size(pid: u32, addr: usize) -> io::Result<u64> {
    smaps_field(pid, addr, "KernelPageSize")
}

/// The value of `field` (a `kB` field such as `KernelPageSize`, `Rss`, `ShmemPmdMapped`,
/// `FilePmdMapped`), in bytes, in the `/proc/PID/smaps` entry of the VMA of `pid` that
/// contains `addr`.
///
/// # Errors
/// `ENOENT` when no VMA contains `addr`, the field is missing or the process is gone.
pub fn smaps_field(pid: u32, addr: usize, field: &str) -> io::Result<u64> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut inside = false;
    for line in t.lines() {
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if !inside {
            continue;
        }
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            if let Some(kb) = rest
                .split_ascii_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                return Ok(kb * 1024);
            }
        }
    }
    Err(crate::errno(libc::ENOENT))
}

/// One VMA of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    /// Start address.
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// Permission string (`rw-s`).
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    /// Device as `makedev(major, minor)`.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Path, if any.
    pub path: String,
}

fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    let mut it = line.split_ascii_whitespace();
    let (a, b) = it.next()?.split_once('-')?;
    let perms = it.next()?.to_string();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let (maj, min) = it.next()?.split_once(':')?;
    let ino = it.next()?.parse().ok()?;
    let path = it.collect::<Vec<_>>().join(" ");
    let maj = u32::from_str_radix(maj, 16).ok()?;
    let min = u32::from_str_radix(min, 16).ok()?;
    Some(MapsEntry {
        start: usize::from_str_radix(a, 16).ok()?,
        end: usize::from_str_radix(b, 16).ok()?,
        perms,
        offset,
        dev: libc::makedev(maj, min),
        ino,
        path,
    })
}

/// The VMAs of a process.
///
/// # Errors
/// `ENOENT` for a gone process.
pub fn maps(pid: u32) -> io::Result<Vec<MapsEntry>> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(t.lines().filter_map(parse_maps_line).collect())
}

/// One VMA of `/proc/PID/smaps` with its `VmFlags` (two-letter mnemonics such as `rd`,
/// `wr`, `sh`, `ht`, `lo`, `uw`), the kernel's own record of the flags it compares when
/// it decides whether two mappings may share page tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmapsVma {
    /// The VMA, as in `/proc/PID/maps`.
    pub vma: MapsEntry,
    /// Its `VmFlags` mnemonics, in the kernel's order.
    pub vm_flags: Vec<String>,
}

/// The VMAs of a process from `/proc/PID/smaps`, each with its `VmFlags`; only those for
/// which `keep` is true (so a report reads the flags of the mappings it cares about).
///
/// # Errors
/// `ENOENT` for a gone process.
pub fn smaps_vmas(pid: u32, keep: impl Fn(&MapsEntry) -> bool) -> io::Result<Vec<SmapsVma>> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_smaps_vmas(&t, keep))
}

fn parse_smaps_vmas(text: &str, keep: impl Fn(&MapsEntry) -> bool) -> Vec<SmapsVma> {
    let mut out = Vec::new();
    let mut current: Option<MapsEntry> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(vma) = current.take() {
                let vm_flags = rest.split_ascii_whitespace().map(str::to_string).collect();
                out.push(SmapsVma { vma, vm_flags });
            }
            continue;
        }
        // A header line parses as a maps line; field lines ("Rss:   4 kB") do not.
        if let Some(e) = parse_maps_line(line) {
            current = keep(&e).then_some(e);
        }
    }
    out
}

/// Every process (pid, command name) that maps any of the files `(dev, ino)` in `files`,
/// with the VMAs that map them: one pass over `/proc` answers for many files. Processes
/// that vanish during the scan are skipped; those whose maps cannot be read are listed.
///
/// # Errors
/// Reading `/proc`.
pub fn mappers_of(files: &[(u64, u64)]) -> io::Result<Mappers> {
    Ok(mappers_among(&pids()?, files))
}

/// The pids of every process now (the numeric entries of `/proc`).
///
/// # Errors
/// Reading `/proc`.
pub fn pids() -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// What a scan of `/proc/PID/maps` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mappers {
    /// The processes that map one of the files.
    pub found: Vec<Mapper>,
    /// Processes that exist but whose maps could not be read (`EACCES`, `EPERM`, ...):
    /// whether they map the files is unknown.
    pub unreadable: Vec<u32>,
}

/// [`mappers_of`] among the processes `pids` only (reads their `/proc/PID/maps` and
/// nothing else). Processes that are gone are skipped.
pub fn mappers_among(pids: &[u32], files: &[(u64, u64)]) -> Mappers {
    let mut out = Mappers::default();
    for &pid in pids {
        let mut vmas = match maps(pid) {
            Ok(v) => v,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => continue,
            Err(_) => {
                out.unreadable.push(pid);
                continue;
            }
        };
        vmas.retain(|v| files.contains(&(v.dev, v.ino)));
        if !vmas.is_empty() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_default();
            out.found.push(Mapper { pid, comm, vmas });
        }
    }
    out
}

/// A process that maps a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapper {
    /// Process id.
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub comm: String,
    /// Its VMAs that map one of the files.
    pub vmas: Vec<MapsEntry>,
}

impl Mapper {
    /// Bytes it maps of the files.
    pub fn bytes(&self) -> u64 {
        self.vmas.iter().map(|v| (v.end - v.start) as u64).sum()
    }
}

/// Memory pressure from `/proc/pressure/memory` (percent of time stalled).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    /// `some avg10`.
    pub some_avg10: f64,
    /// `full avg10`.
    pub full_avg10: f64,
}

/// Reads `/proc/pressure/memory`.
///
/// # Errors
/// Reading the file (`ENOENT` without PSI); `EIO` when it cannot be parsed.
pub fn memory_pressure() -> io::Result<Pressure> {
    let t = std::fs::read_to_string("/proc/pressure/memory")?;
    let avg10 = |kind: &str| -> Option<f64> {
        let line = t.lines().find(|l| l.starts_with(kind))?;
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("avg10="))?;
        v.parse().ok()
    };
    Ok(Pressure {
        some_avg10: avg10("some").ok_or_else(|| crate::errno(libc::EIO))?,
        full_avg10: avg10("full").ok_or_else(|| crate::errno(libc::EIO))?,
    })
}

/// Fault counts of the calling process from `getrusage(RUSAGE_SELF)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Minor faults (`ru_minflt`).
    pub minor: u64,
    /// Major faults (`ru_majflt`).
    pub major: u64,
}

/// Safe wrapper for `getrusage(RUSAGE_SELF)`, returning the fault counts.
///
/// # Errors
/// The kernel's errno.
pub fn faults() -> io::Result<Faults> {
    let mut ru = MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: valid out-pointer for one `struct rusage`.
    check_retval(unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) })?;
    // SAFETY: getrusage succeeded, so it filled `ru`.
    let ru = unsafe { ru.assume_init() };
    Ok(Faults {
        minor: ru.ru_minflt as u64,
        major: ru.ru_majflt as u64,
    })
}

/// Writes `/proc/sys/vm/stat_refresh`: the kernel folds every CPU's pending deltas of the
/// memory counters into their global totals. Without it `/proc/meminfo` lags by up to the
/// per-CPU threshold times the number of CPUs (here about 36 pages per CPU), which hides
/// the few page-table pages a hugetlb mapping costs. Needs root.
///
/// # Errors
/// The kernel's errno (`EACCES`/`EPERM` without root). `EINVAL`, which the kernel returns
/// after folding when some counter is transiently negative, is not an error.
pub fn vm_stat_refresh() -> io::Result<()> {
    match std::fs::write("/proc/sys/vm/stat_refresh", b"1\n") {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`.
///
/// # Errors
/// Reading the file; `EIO` when it cannot be parsed.
pub fn loadavg() -> io::Result<[f64; 3]> {
    let t = std::fs::read_to_string("/proc/loadavg")?;
    let mut it = t.split_ascii_whitespace().map(|w| w.parse::<f64>());
    let mut out = [0.0; 3];
    for v in &mut out {
        *v = it
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| crate::errno(libc::EIO))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let mi = meminfo().unwrap();
        assert!(mi.page_tables > 0);
        assert!(vm_pte(me).unwrap() > 0);
        assert_eq!(
            hugetlb_bytes(me).unwrap(),
            0,
            "this test maps no huge pages"
        );
        assert!(pids().unwrap().contains(&me));
        let x = Box::new(5u64);
        assert_eq!(
            kernel_page_size(me, &*x as *const u64 as usize).unwrap(),
            4096
        );
        assert!(kernel_page_size(me, 0).is_err());
        memory_pressure().unwrap();
        assert!(loadavg().unwrap().iter().all(|v| *v >= 0.0));
        let f0 = faults().unwrap();
        let v = vec![1u8; 64 << 20];
        let f1 = faults().unwrap();
        assert!(f1.minor > f0.minor, "{f0:?} {f1:?} {}", v[100]);
    }

    #[test]
    fn maps_finds_a_mapped_memfd() {
        let fd = crate::fd::memfd_create("kg-maps", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        let st = crate::fd::fstat(&fd).unwrap();
        let m = crate::mapping::Mapping::map_aligned(
            &fd,
            1 << 20,
            crate::mapping::Protection::ReadOnly,
            4096,
        )
        .unwrap();
        let found = mappers_of(&[(st.dev, st.ino)]).unwrap().found;
        let me = found.iter().find(|p| p.pid == std::process::id()).unwrap();
        assert_eq!(me.bytes(), 1 << 20);
        let among = mappers_among(&[std::process::id(), u32::MAX], &[(st.dev, st.ino)]);
        assert_eq!(among.found, vec![me.clone()]);
        assert!(among.unreadable.is_empty(), "a gone pid is not unreadable");
        assert!(mappers_among(&[1], &[(st.dev, st.ino)]).found.is_empty());
        drop(m);
        let found = mappers_of(&[(st.dev, st.ino)]).unwrap().found;
        assert!(found.iter().all(|p| p.pid != std::process::id()));
    }

    #[test]
    fn parses_a_maps_line() {
        let e = parse_maps_line("7f0000000000-7f0040000000 rw-s 40000000 00:2d 12345   /run/x y/z")
            .unwrap();
        assert_eq!(e.start, 0x7f00_0000_0000);
        assert_eq!(e.ino, 12345);
        assert_eq!(e.offset, 1 << 30);
        assert_eq!(e.dev, libc::makedev(0, 0x2d));
        assert_eq!(e.path, "/run/x y/z");
    }

    #[test]
    fn parses_smaps_vm_flags() {
        let t = "40000000-80000000 rw-s 00000000 00:2d 7   /b/1\nSize: 1048576 kB\n\
                 KernelPageSize: 2048 kB\nVmFlags: rd wr sh mr mw me ms de ht uw \n\
                 7f00-8000 r--p 00000000 00:00 0 \nRss: 4 kB\nVmFlags: rd mr mw me \n";
        let v = parse_smaps_vmas(t, |e| e.ino == 7);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].vma.start, 0x4000_0000);
        assert_eq!(v[0].vm_flags.last().map(String::as_str), Some("uw"));
        assert_eq!(parse_smaps_vmas(t, |_| true).len(), 2);
    }
}
