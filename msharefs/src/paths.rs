//! Where a mount's state lives: `/run/msharefs/state/NAME` by default (NAME derived from
//! the mount point), and the registry `/run/msharefs/mounts/NAME` that points
//! `msharefs umount`/`stat` at the state directory of a mount point.

use std::path::{Path, PathBuf};

/// Runtime directory of msharefs.
pub const RUN_DIR: &str = "/run/msharefs";

/// Files inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

impl StateDir {
    /// The saved tree.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The daemon's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("daemon.pid")
    }
    /// The daemon's log when it runs in the background.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
    /// The attach socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("attach.sock")
    }
    /// The pid of a running daemon, if any.
    pub fn running_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        kernel_glue::process::alive(pid).then_some(pid)
    }
}

/// A name for a mount point usable as a file name: the path with `/` as `-` (and `-` as
/// `--`), or a hash when that is long (socket paths are limited to 108 bytes).
pub fn mount_name(mountpoint: &Path) -> String {
    let s = mountpoint.to_string_lossy();
    let esc: String = s
        .trim_start_matches('/')
        .replace('-', "--")
        .replace('/', "-");
    if !esc.is_empty() && esc.len() <= 48 {
        return esc;
    }
    // FNV-1a: stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("m{h:016x}")
}

/// The mount point as an absolute path, without touching the mount point itself (a dead
/// FUSE mount answers `ENOTCONN` to everything): its parent is canonicalized.
pub fn absolute_mountpoint(p: &Path) -> std::io::Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => Ok(abs),
    }
}

/// The registry entry of a mount point.
pub fn registry_entry(mountpoint: &Path) -> PathBuf {
    Path::new(RUN_DIR)
        .join("mounts")
        .join(mount_name(mountpoint))
}

/// The default state directory of a mount point.
pub fn default_state_dir(mountpoint: &Path) -> PathBuf {
    Path::new(RUN_DIR)
        .join("state")
        .join(mount_name(mountpoint))
}

/// The state directory recorded for a mount point, else the default.
pub fn state_dir_for(mountpoint: &Path) -> StateDir {
    let dir = std::fs::read_link(registry_entry(mountpoint))
        .unwrap_or_else(|_| default_state_dir(mountpoint));
    StateDir { dir }
}

/// Records `state` as the state directory of `mountpoint`.
///
/// # Errors
/// Creating the registry directory or the link.
pub fn register(mountpoint: &Path, state: &Path) -> std::io::Result<()> {
    let entry = registry_entry(mountpoint);
    if let Some(d) = entry.parent() {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_file(&entry);
    std::os::unix::fs::symlink(state, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(mount_name(Path::new("/mnt/mshare")), "mnt-mshare");
        assert_eq!(mount_name(Path::new("/a-b/c")), "a--b-c");
        assert_ne!(mount_name(Path::new("/a-b")), mount_name(Path::new("/a/b")));
        let long = format!("/{}", "x".repeat(100));
        assert!(mount_name(Path::new(&long)).starts_with('m'));
        assert_eq!(mount_name(Path::new(&long)).len(), 17);
    }
}
