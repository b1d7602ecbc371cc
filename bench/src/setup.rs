//! The memory each configuration is measured on, set up before its attachers start and
//! torn down after they are gone: a 4 KiB memfd, a hugetlb memfd with its pool grant, a
//! file on the bench's own THP tmpfs, a region on the bench's own msharefs mount (for
//! `msharefs-hugetlb` and `limit`).
//!
//! msharefs is driven through its command line only, as an administrator would:
//! `msharefs mount MNT --state-dir DIR --backing hugetlb`, `msharefs stat MNT --json` and
//! `msharefs umount MNT --purge`; the daemon's pid (for its page-table growth) is read
//! from `DIR/daemon.pid`, its log from `DIR/daemon.log`.
//!
//! Every resource is a value whose `Drop` releases it (the mapping is unmapped, the memfd
//! closed, the tmpfs unmounted, msharefs unmounted with `--purge`, the pool grant given
//! back), in that order, so a failed step or an interrupt leaves nothing behind.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kernel_glue::hugepages::{self, PoolGrant};
use kernel_glue::mount::{self, InstanceMount};
use kernel_glue::{HUGE_PAGE_SIZE, PAGE_SIZE, consts, fd as kfd, procfs};
use mshare::{Backing, Region};

use crate::attacher::AttachKind;
use crate::fleet::Fleet;
use crate::run::{BenchError, Config, Progress};

/// The bench's scratch directory, `/tmp/msharefs-bench-PID`: mount points and state.
/// Removed on drop, unless something is still mounted below it (then it is detached
/// first; what cannot be detached is reported and left).
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates the directory (mode 0700).
    ///
    /// # Errors
    /// Creating it.
    pub fn create() -> io::Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("msharefs-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(WorkDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        for m in mount::mounts().unwrap_or_default().into_iter().rev() {
            if m.target.starts_with(&self.path) {
                eprintln!(
                    "bench: {} is still mounted on {}; detaching it",
                    m.fstype,
                    m.target.display()
                );
                let _ = mount::umount2(&m.target, true);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("bench: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// An msharefs mount started with `msharefs mount` and stopped with `umount --purge` on
/// drop, which destroys the regions and gives back the huge pages the daemon added.
#[derive(Debug)]
pub struct MsharefsMount {
    exe: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
}

impl MsharefsMount {
    /// `EXE mount MNT --state-dir STATE --backing hugetlb` (`EXE`: the `msharefs` binary),
    /// returning once live.
    ///
    /// # Errors
    /// [`BenchError::Setup`] with the command's output and the daemon log's tail.
    pub fn start(exe: &Path, root: &Path) -> Result<MsharefsMount, BenchError> {
        let mnt = root.join("mnt");
        let state = root.join("state");
        std::fs::create_dir_all(&mnt).map_err(|e| BenchError::setup("create mount point", e))?;
        let out = Command::new(exe)
            .arg("mount")
            .arg(&mnt)
            .arg("--state-dir")
            .arg(&state)
            .args(["--backing", "hugetlb"])
            .output()
            .map_err(|e| BenchError::setup("run msharefs mount", e))?;
        // From here on the mount (or what a failed start left) is ours to clean up.
        let m = MsharefsMount {
            exe: exe.to_path_buf(),
            mnt,
            state,
        };
        if !out.status.success() {
            let log = std::fs::read_to_string(m.state.join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            return Err(BenchError::Msharefs(format!(
                "msharefs mount failed ({}): {}{}\ndaemon log (last lines, newest first):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail.join("\n")
            )));
        }
        Ok(m)
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mnt
    }

    /// The daemon's pid, from the pid file `msharefs mount` writes in the state directory.
    pub fn daemon_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.state.join("daemon.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Bytes of the host mapping of the region `name` (at the mount's root) populated so
    /// far: `populated` in `msharefs stat MNT --json`.
    ///
    /// # Errors
    /// [`BenchError::Msharefs`] when the command fails or shows no such region.
    pub fn populated(&self, name: &str) -> Result<u64, BenchError> {
        let out = Command::new(&self.exe)
            .arg("stat")
            .arg(&self.mnt)
            .arg("--json")
            .output()
            .map_err(|e| BenchError::setup("run msharefs stat", e))?;
        if !out.status.success() {
            return Err(BenchError::Msharefs(format!(
                "msharefs stat --json failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| BenchError::Msharefs(format!("msharefs stat: bad JSON: {e}")))?;
        v["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["path"].as_str().map(|p| p.trim_start_matches('/')) == Some(name))
            .and_then(|r| r["populated"].as_u64())
            .ok_or_else(|| BenchError::Msharefs(format!("msharefs stat shows no region {name}")))
    }
}

impl Drop for MsharefsMount {
    fn drop(&mut self) {
        let out = Command::new(&self.exe)
            .arg("umount")
            .arg(&self.mnt)
            .arg("--purge")
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "bench: msharefs umount {} --purge failed: {}{}",
                self.mnt.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("bench: cannot run msharefs umount: {e}"),
        }
    }
}

/// What a configuration holds while its attachers run. Fields drop in declaration order:
/// the file before the mount or the pool pages behind it.
#[derive(Debug)]
#[allow(dead_code)] // the fields are held for their Drop
enum Held {
    Memfd {
        fd: OwnedFd,
        grant: Option<PoolGrant>,
    },
    TmpfsFile {
        mount: InstanceMount,
    },
    Msharefs {
        mount: MsharefsMount,
    },
}

/// A configuration's memory, ready for attachers.
#[derive(Debug)]
pub struct Target {
    /// How attachers map it.
    pub kind: AttachKind,
    /// What attachers open.
    pub path: PathBuf,
    /// Page-table bytes the configuration allocated once, outside the attachers (the
    /// msharefs daemon's host mapping), measured as the daemon's `VmPTE` growth.
    pub shared_pt_bytes: u64,
    _held: Held,
}

fn memory_check(size: u64, reserve: u64, what: &str) -> Result<(), BenchError> {
    let avail = procfs::meminfo()
        .map_err(|e| BenchError::setup("read /proc/meminfo", e))?
        .mem_available;
    if avail < size.saturating_add(reserve) {
        return Err(BenchError::Memory(format!(
            "{what}: {} MiB available, need {} MiB for the region plus the {} MiB reserve",
            avail >> 20,
            size >> 20,
            reserve >> 20
        )));
    }
    Ok(())
}

/// Writes every page of `fd` once through a temporary kernel-placed mapping, so the
/// attachers find the pages allocated and zeroed (shmem zeroes a fallocated page at its
/// first fault).
fn prefault(fd: &OwnedFd, size: u64, fleet: &Fleet, p: &mut Progress) -> Result<(), BenchError> {
    let chunk: u64 = 256 << 20;
    let mut off = 0;
    while off < size {
        fleet.check()?;
        let n = chunk.min(size - off);
        // One chunk at a time, so an interrupt is seen within a fraction of a second.
        let m = memmap2::MmapOptions::new()
            .offset(off)
            .len(n as usize)
            .map_raw(fd)
            .map_err(|e| BenchError::setup("map the region to fill it", e))?;
        m.advise(memmap2::Advice::PopulateWrite)
            .map_err(|e| BenchError::setup("fill the region", e))?;
        off += n;
        p.throttled(format!("  filling: {} of {} MiB", off >> 20, size >> 20));
    }
    Ok(())
}

fn proc_fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}

/// Name of the region file on the bench's msharefs mount.
pub const REGION_NAME: &str = "bench-region";

/// Sets up `config`'s memory of `size` bytes. `reserve` is the memory that must stay
/// available; `msharefs` is the `msharefs` binary.
///
/// # Errors
/// [`BenchError`] of the step that failed; what was set up is released.
pub fn prepare(
    config: Config,
    size: u64,
    reserve: u64,
    work: &WorkDir,
    msharefs: &Path,
    fleet: &Fleet,
    p: &mut Progress,
) -> Result<Target, BenchError> {
    memory_check(size, reserve, config.name())?;
    match config {
        Config::Shmem4k => {
            let fd = kfd::memfd_create("msharefs-bench-shmem", false)
                .map_err(|e| BenchError::setup("memfd_create", e))?;
            kfd::ftruncate(&fd, size).map_err(|e| BenchError::setup("ftruncate", e))?;
            kfd::fallocate(&fd, 0, size).map_err(|e| BenchError::setup("fallocate", e))?;
            prefault(&fd, size, fleet, p)?;
            Ok(Target {
                kind: AttachKind::Mmap,
                path: proc_fd_path(&fd),
                shared_pt_bytes: 0,
                _held: Held::Memfd { fd, grant: None },
            })
        }
        Config::HugetlbKernelPlaced => {
            let grant = hugepages::grow(size / HUGE_PAGE_SIZE)
                .map_err(|e| BenchError::setup("grow the huge page pool", e.into()))?;
            let fd = kfd::memfd_create("msharefs-bench-hugetlb", true)
                .map_err(|e| BenchError::setup("memfd_create(MFD_HUGETLB)", e))?;
            kfd::ftruncate(&fd, size).map_err(|e| BenchError::setup("ftruncate", e))?;
            // Allocates (and zeroes) every huge page now.
            kfd::fallocate(&fd, 0, size).map_err(|e| BenchError::setup("fallocate", e))?;
            Ok(Target {
                kind: AttachKind::Mmap,
                path: proc_fd_path(&fd),
                shared_pt_bytes: 0,
                _held: Held::Memfd {
                    fd,
                    grant: Some(grant),
                },
            })
        }
        Config::Thp => {
            let dir = work.path().join("thp");
            std::fs::create_dir_all(&dir).map_err(|e| BenchError::setup("mkdir thp", e))?;
            let mib = size.div_ceil(1 << 20) + 8;
            let mount = InstanceMount::tmpfs(&dir, "always", &format!("{mib}m"), 0o700)
                .map_err(|e| BenchError::setup("mount tmpfs huge=always", e))?;
            let path = dir.join("region");
            let fd = kfd::open(&path, consts::O_RDWR | consts::O_CREAT, 0o600)
                .map_err(|e| BenchError::setup("create the THP file", e))?;
            kfd::ftruncate(&fd, size).map_err(|e| BenchError::setup("ftruncate", e))?;
            kfd::fallocate(&fd, 0, size).map_err(|e| BenchError::setup("fallocate", e))?;
            prefault(&fd, size, fleet, p)?;
            drop(fd);
            Ok(Target {
                kind: AttachKind::Mmap,
                path,
                shared_pt_bytes: 0,
                _held: Held::TmpfsFile { mount },
            })
        }
        Config::MsharefsHugetlb | Config::Limit => {
            let mount = MsharefsMount::start(msharefs, work.path())?;
            let pte0 = mount
                .daemon_pid()
                .and_then(|pid| procfs::vm_pte(pid).ok())
                .unwrap_or(0);
            let path = mount.mountpoint().join(REGION_NAME);
            let region = Region::create(&path, size, 0o600, Backing::Hugetlb)
                .map_err(|e| BenchError::setup("create the msharefs region", e))?;
            drop(region);
            // The daemon builds its host tables in the background; attach measurements
            // start once they are complete.
            let deadline = Instant::now() + Duration::from_secs(60 + 10 * (size >> 30));
            loop {
                fleet.check()?;
                let done = mount.populated(REGION_NAME)?;
                p.throttled(format!(
                    "  daemon populating its host mapping: {} of {} MiB",
                    done >> 20,
                    size >> 20
                ));
                if done >= size {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(BenchError::Msharefs(format!(
                        "host mapping still at {} of {} MiB after the deadline",
                        done >> 20,
                        size >> 20
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let pte1 = mount
                .daemon_pid()
                .and_then(|pid| procfs::vm_pte(pid).ok())
                .unwrap_or(pte0);
            Ok(Target {
                kind: if config == Config::Limit {
                    AttachKind::Limit
                } else {
                    AttachKind::Libmshare
                },
                path,
                shared_pt_bytes: pte1.saturating_sub(pte0),
                _held: Held::Msharefs { mount },
            })
        }
    }
}

/// Default bytes between touches of a configuration: its page size.
pub fn page_size(config: Config) -> u64 {
    match config {
        Config::Shmem4k => PAGE_SIZE,
        _ => HUGE_PAGE_SIZE,
    }
}
