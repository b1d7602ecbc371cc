//! Control groups: which cgroups a process belongs to, how much more memory a cgroup and
//! its ancestors can take, and doing an allocation as a member of another process's
//! cgroups.
//!
//! The memory controller charges a page to the cgroup of the task that allocates it, and
//! the hugetlb controller charges a huge page (and its reservation) to the cgroup of the
//! task that reserves and allocates it; the charge stays with the page whoever maps it
//! later (measured: `docs/KERNEL.md`). So memory a daemon allocates on behalf of a client
//! is charged to the client only when a process in the client's cgroups allocates it:
//! [`fallocate_in`] forks one, moves it there and lets it `fallocate`.
//!
//! Both cgroup versions are handled: v1 hierarchies with the `memory` or `hugetlb`
//! controller, and the v2 hierarchy (whatever controllers it has).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::check_retval;

/// One cgroup a process belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The cgroup's directory (mount point of its hierarchy plus its path).
    pub dir: PathBuf,
    /// The hierarchy's mount point.
    pub root: PathBuf,
    /// A v2 (unified) hierarchy.
    pub v2: bool,
    /// v1: the hierarchy's controllers; v2: the controllers enabled for this cgroup
    /// (`cgroup.controllers`).
    pub controllers: Vec<String>,
}

impl Membership {
    /// Whether `controller` (`memory`, `hugetlb`) accounts for this cgroup.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// A cgroup file system mount from `/proc/self/mountinfo`.
struct CgroupMount {
    point: PathBuf,
    v2: bool,
    /// v1 controllers from the super options.
    controllers: Vec<String>,
}

fn cgroup_mounts() -> io::Result<Vec<CgroupMount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let superopts = r.nth(1).unwrap_or("");
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        out.push(CgroupMount {
            point: PathBuf::from(unescape(point)),
            v2,
            controllers: superopts
                .split(',')
                .filter(|o| matches!(*o, "memory" | "hugetlb"))
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroups of process `pid` that can charge memory: its v2 cgroup and its v1 cgroups
/// in hierarchies with the `memory` or `hugetlb` controller.
///
/// # Errors
/// `ENOENT` for a gone process; reading `/proc`.
pub fn memberships(pid: u32) -> io::Result<Vec<Membership>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mounts = cgroup_mounts()?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if id == "0" && ctrls.is_empty() {
            let Some(m) = mounts.iter().find(|m| m.v2) else {
                continue;
            };
            let dir = m.point.join(rel);
            let controllers = std::fs::read_to_string(dir.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect();
            out.push(Membership {
                dir,
                root: m.point.clone(),
                v2: true,
                controllers,
            });
            continue;
        }
        let wanted: Vec<String> = ctrls
            .split(',')
            .filter(|c| matches!(*c, "memory" | "hugetlb"))
            .map(str::to_string)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let Some(m) = mounts
            .iter()
            .find(|m| !m.v2 && wanted.iter().all(|c| m.controllers.contains(c)))
        else {
            continue;
        };
        out.push(Membership {
            dir: m.point.join(rel),
            root: m.point.clone(),
            v2: false,
            controllers: wanted,
        });
    }
    Ok(out)
}

/// A limit file's value: a number, or `None` for no limit (`max`, or v1's huge default).
fn read_limit(path: &Path) -> Option<Option<u64>> {
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    if t == "max" {
        return Some(None);
    }
    let v: u64 = t.parse().ok()?;
    // v1 reports "no limit" as PAGE_COUNTER_MAX pages, rounded: about 2^63.
    Some((v < (1 << 62)).then_some(v))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The (limit, usage) file pairs of `controller` in a cgroup of a hierarchy.
fn counters(v2: bool, controller: &str) -> &'static [(&'static str, &'static str)] {
    match (v2, controller) {
        (false, "memory") => &[("memory.limit_in_bytes", "memory.usage_in_bytes")],
        (true, "memory") => &[("memory.max", "memory.current")],
        (false, "hugetlb") => &[
            ("hugetlb.2MB.limit_in_bytes", "hugetlb.2MB.usage_in_bytes"),
            (
                "hugetlb.2MB.rsvd.limit_in_bytes",
                "hugetlb.2MB.rsvd.usage_in_bytes",
            ),
        ],
        (true, "hugetlb") => &[
            ("hugetlb.2MB.max", "hugetlb.2MB.current"),
            ("hugetlb.2MB.rsvd.max", "hugetlb.2MB.rsvd.current"),
        ],
        _ => &[],
    }
}

/// How many more bytes `controller` lets `m` charge: the smallest `limit - usage` of the
/// cgroup and its ancestors (a child's charge counts in every ancestor); `None` when no
/// level has a limit, or the controller does not account for `m`.
pub fn headroom(m: &Membership, controller: &str) -> Option<u64> {
    if !m.has(controller) {
        return None;
    }
    let mut best: Option<u64> = None;
    let mut dir = m.dir.clone();
    loop {
        for (limit, usage) in counters(m.v2, controller) {
            if let (Some(Some(l)), Some(u)) =
                (read_limit(&dir.join(limit)), read_u64(&dir.join(usage)))
            {
                let room = l.saturating_sub(u);
                best = Some(best.map_or(room, |b| b.min(room)));
            }
        }
        if dir == m.root || !dir.pop() || !dir.starts_with(&m.root) {
            return best;
        }
    }
}

/// Allocates `[offset, offset + len)` of the file `fd` (`fallocate(fd, 0, offset, len)`)
/// in a child process (sharing this process's descriptor table)
/// that first moves itself into each cgroup directory of `join` (so the memory is charged
/// there) and makes itself the first choice of the OOM killer (`oom_score_adj` 1000), so
/// that if an allocation overruns a memory limit the kernel kills the child, not another
/// member of the cgroup. The caller's cgroups do not change.
///
/// # Errors
/// The errno of the first step that failed in the child (`ENOSPC` when a hugetlb limit or
/// tmpfs is full, `ENOMEM`, `EACCES` joining a cgroup); `ENOMEM` when the child was
/// killed (an OOM kill at the memory limit); `fork(2)` errors.
pub fn fallocate_in(join: &[PathBuf], fd: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| crate::errno(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| crate::errno(libc::EINVAL))?;
    let mut paths = Vec::new();
    for d in join {
        let p = CString::new(d.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| crate::errno(libc::EINVAL))?;
        paths.push(p);
    }
    let oom = c"/proc/self/oom_score_adj";
    let raw = fd.as_fd().as_raw_fd();
    // The child shares our descriptor table (CLONE_FILES) instead of copying it: a copy
    // would be closed when the child exits, and closing a copy of a file on a FUSE mount
    // sends FLUSH to its server, which may be this very process, busy waiting for the
    // child (a deadlock the concurrency test found). Its memory is its own (no CLONE_VM),
    // so it can join a memory cgroup without taking this process with it.
    // Everything the child needs is prepared above: it makes system calls only.
    let flags = (libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone without CLONE_VM duplicates the address space like fork; the child
    // below calls only async-signal-safe system calls (open, write, close, fallocate,
    // _exit) on memory prepared before, never allocates, locks or returns, so the other
    // threads' state cannot matter; the descriptors it opens it closes itself.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
    let pid = check_retval(ret)? as libc::pid_t;
    if pid == 0 {
        // SAFETY: see above; every pointer is a valid C string or buffer owned by the
        // parent's (copied) memory.
        unsafe {
            let write_file = |path: &std::ffi::CStr, data: &[u8]| -> i32 {
                let f = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if f < 0 {
                    return *libc::__errno_location();
                }
                let n = libc::write(f, data.as_ptr().cast(), data.len());
                let e = *libc::__errno_location();
                libc::close(f);
                if n < 0 { e } else { 0 }
            };
            let e = write_file(oom, b"1000");
            if e != 0 {
                libc::_exit(e);
            }
            for p in &paths {
                // "0" moves the writing process itself.
                let e = write_file(p, b"0");
                if e != 0 {
                    libc::_exit(e);
                }
            }
            if libc::fallocate(raw, 0, offset, len) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: valid out-pointer; `pid` is our child.
    check_retval(unsafe { libc::waitpid(pid, &mut status, 0) })?;
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            e => Err(crate::errno(e)),
        }
    } else {
        Err(crate::errno(libc::ENOMEM))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cgroups_and_headroom_is_sane() {
        let me = memberships(std::process::id()).unwrap();
        for m in &me {
            assert!(m.dir.starts_with(&m.root), "{m:?}");
            // Only counts may be read; none may be nonsense.
            let _ = headroom(m, "memory");
            let _ = headroom(m, "hugetlb");
        }
        assert_eq!(unescape("/a\\040b"), "/a b");
    }

    #[test]
    fn fallocate_in_no_cgroup_allocates() {
        let fd = crate::fd::memfd_create("kg-cgroup", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        fallocate_in(&[], &fd, 0, 1 << 20).unwrap();
        let e = fallocate_in(&[PathBuf::from("/nonexistent")], &fd, 0, 1 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
