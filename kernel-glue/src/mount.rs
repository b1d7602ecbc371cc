//! Mounts: the daemon's own hugetlbfs and tmpfs instances, and FUSE mount points.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::check_retval;

fn c(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|_| crate::errno(libc::EINVAL))
}

/// Safe wrapper for `mount(2)` of a new file system instance (no bind, no remount).
///
/// # Errors
/// The kernel's errno (`EPERM` without `CAP_SYS_ADMIN`, `ENODEV` for an unknown type,
/// `EINVAL` for bad options).
pub fn mount(fstype: &str, target: &Path, options: &str) -> io::Result<()> {
    let src = c(fstype.as_bytes())?;
    let tgt = c(target.as_os_str().as_bytes())?;
    let data = c(options.as_bytes())?;
    // SAFETY: all strings are valid and NUL-terminated for the duration of the call.
    check_retval(unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            src.as_ptr(),
            libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
            data.as_ptr() as *const libc::c_void,
        )
    })?;
    Ok(())
}

/// Safe wrapper for `umount2(2)`; `detach` adds `MNT_DETACH` (lazy unmount).
///
/// # Errors
/// The kernel's errno (`EBUSY`, `EINVAL` when not a mount point).
pub fn umount2(target: &Path, detach: bool) -> io::Result<()> {
    let tgt = c(target.as_os_str().as_bytes())?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid string for the duration of the call.
    check_retval(unsafe { libc::umount2(tgt.as_ptr(), flags) })?;
    Ok(())
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: PathBuf,
    /// File system type (`fuse`, `hugetlbfs`, `tmpfs`, ...).
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Super-block options.
    pub options: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads `/proc/self/mountinfo`.
///
/// # Errors
/// Reading the file.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        out.push(MountEntry {
            target: PathBuf::from(unescape(l[4])),
            fstype: r[0].to_string(),
            source: unescape(r[1]),
            options: r[2].to_string(),
        });
    }
    Ok(out)
}

/// The mount whose mount point is exactly `target`, the topmost if stacked.
///
/// # Errors
/// Reading `/proc/self/mountinfo`.
pub fn mount_at(target: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.target == target))
}

/// A file system instance mounted by this process, unmounted on drop unless
/// [`InstanceMount::keep`] is called (the daemon keeps its backing mounts so that region
/// data outlives it).
#[derive(Debug)]
pub struct InstanceMount {
    target: PathBuf,
    fstype: &'static str,
    keep: bool,
}

impl InstanceMount {
    /// Mounts a new hugetlbfs instance (2 MiB pages, no size limit: pages come from the
    /// global pool) at `target`, which must exist. `mode` is the root directory's mode.
    ///
    /// # Errors
    /// The kernel's errno from `mount(2)`.
    pub fn hugetlbfs(target: &Path, mode: u32) -> io::Result<InstanceMount> {
        mount("hugetlbfs", target, &format!("pagesize=2M,mode={mode:o}"))?;
        Ok(InstanceMount {
            target: target.to_path_buf(),
            fstype: "hugetlbfs",
            keep: false,
        })
    }

    /// Mounts a new tmpfs instance at `target`; `huge` is the tmpfs `huge=` option
    /// (`never`, `always`, `within_size`, `advise`) and `size` its size limit
    /// (tmpfs syntax, e.g. `50%`).
    ///
    /// # Errors
    /// The kernel's errno from `mount(2)` (`EINVAL` for a bad `huge=` value).
    pub fn tmpfs(target: &Path, huge: &str, size: &str, mode: u32) -> io::Result<InstanceMount> {
        mount(
            "tmpfs",
            target,
            &format!("huge={huge},size={size},mode={mode:o}"),
        )?;
        Ok(InstanceMount {
            target: target.to_path_buf(),
            fstype: "tmpfs",
            keep: false,
        })
    }

    /// Mount point.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Leaves the file system mounted when this value is dropped.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for InstanceMount {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = umount2(&self.target, true) {
            log::error!(
                "cannot unmount {} {}: {e}",
                self.fstype,
                self.target.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let ms = mounts().unwrap();
        assert!(ms.iter().any(|m| m.target == Path::new("/")));
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("plain"), "plain");
    }
}
