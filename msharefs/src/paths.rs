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
    /// The marker that makes a directory an msharefs state directory.
    pub fn marker(&self) -> PathBuf {
        self.dir.join(MARKER)
    }
    /// The directory of the backing stores' mount points.
    pub fn backing_dir(&self) -> PathBuf {
        self.dir.join(BACKING_DIR)
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

/// The marker file msharefs writes into every state directory it uses. Its second line
/// says whether msharefs created the directory (then `--purge` removes it once empty).
pub const MARKER: &str = ".msharefs-state";
/// The backing stores' directory inside a state directory.
const BACKING_DIR: &str = "backing";
/// The files msharefs creates in a state directory, besides the marker and `backing/`.
const OWN_FILES: [&str; 5] = [
    "state.json",
    "state.json.tmp",
    "daemon.log",
    "daemon.pid",
    "attach.sock",
];

fn at(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl StateDir {
    /// Whether the directory carries msharefs's marker.
    pub fn is_marked(&self) -> bool {
        self.marker().is_file()
    }

    /// Makes the directory ready for a daemon, touching nothing that is not msharefs's:
    ///
    /// - missing: created (parents too), mode 0711 (others may reach the attach socket,
    ///   not list), and marked as created by msharefs;
    /// - marked: used as it is (its mode is whatever its owner chose);
    /// - empty, or holding only names msharefs uses (a directory of an older msharefs):
    ///   marked as adopted, its mode left alone;
    /// - anything else: refused, nothing written.
    ///
    /// # Errors
    /// A message naming the directory: not a directory, foreign and not empty, or the
    /// system error of creating it or its marker.
    pub fn prepare(&self) -> std::io::Result<()> {
        let dir = &self.dir;
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| at(parent, e))?;
                }
                match std::fs::create_dir(dir) {
                    Ok(()) => {
                        // Ours: the mode is exact, whatever the umask (systemd's 0077).
                        std::fs::set_permissions(
                            dir,
                            std::os::unix::fs::PermissionsExt::from_mode(0o711),
                        )
                        .map_err(|e| at(dir, e))?;
                        return self.write_marker(true);
                    }
                    // Created meanwhile by someone else: judge it like any existing one.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(at(dir, e)),
                }
            }
            Err(e) => return Err(at(dir, e)),
            Ok(m) if !m.is_dir() => {
                return Err(std::io::Error::other(format!(
                    "state directory {}: not a directory",
                    dir.display()
                )));
            }
            Ok(_) => {}
        }
        if self.is_marked() {
            return Ok(());
        }
        let foreign: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| at(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != BACKING_DIR && !OWN_FILES.contains(&n.as_str()))
            .collect();
        if !foreign.is_empty() {
            return Err(std::io::Error::other(format!(
                "state directory {} is not empty and not msharefs's (no {MARKER}; it holds \
                 {}): refusing to use it; choose a new or empty directory",
                dir.display(),
                foreign
                    .iter()
                    .take(3)
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if foreign.len() > 3 { ", ..." } else { "" }
            )));
        }
        self.write_marker(false)
    }

    fn write_marker(&self, created: bool) -> std::io::Result<()> {
        let text = format!(
            "msharefs state directory
created: {}
",
            if created { "yes" } else { "no" }
        );
        std::fs::write(self.marker(), text).map_err(|e| at(&self.marker(), e))
    }

    /// Whether the marker says msharefs created the directory.
    fn created_by_us(&self) -> bool {
        std::fs::read_to_string(self.marker()).is_ok_and(|t| t.lines().any(|l| l == "created: yes"))
    }

    /// Removes what msharefs put into the directory (the caller has unmounted the backing
    /// stores): its files, the empty store mount points and `backing/`, the marker, and
    /// the directory itself when msharefs created it and nothing else is left. Anything
    /// else stays. Returns the names of what was kept.
    ///
    /// # Errors
    /// A directory without the marker (nothing is removed); a removal that fails.
    pub fn purge(&self, stores: &[&str]) -> std::io::Result<Vec<String>> {
        let dir = &self.dir;
        if !dir.exists() {
            return Ok(Vec::new());
        }
        if !self.is_marked() {
            return Err(std::io::Error::other(format!(
                "{}: not an msharefs state directory (no {MARKER}); nothing removed",
                dir.display()
            )));
        }
        let gone_ok = |r: std::io::Result<()>, p: &Path| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(at(p, e)),
            _ => Ok(()),
        };
        let backing = self.backing_dir();
        for s in stores {
            let d = backing.join(s);
            // `remove_dir` removes only an empty directory: files someone put there stay.
            if let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("kept {}: {e}", d.display());
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(&backing) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("kept {}: {e}", backing.display());
            }
        }
        for f in OWN_FILES {
            let p = dir.join(f);
            gone_ok(std::fs::remove_file(&p), &p)?;
        }
        let created = self.created_by_us();
        gone_ok(std::fs::remove_file(self.marker()), &self.marker())?;
        let kept: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| at(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if kept.is_empty() && created {
            gone_ok(std::fs::remove_dir(dir), dir)?;
        }
        Ok(kept)
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
///
/// # Errors
/// The working directory or the parent cannot be resolved; the message names `p`.
pub fn absolute_mountpoint(p: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(p).map_err(|e| at(p, e))?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize().map_err(|e| at(p, e))?.join(name)),
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

/// The link to a mount's attach socket under the mount's device number
/// ([`mshare_uapi::BY_DEV_DIR`]), by which clients find the socket without asking.
pub fn by_dev_entry(dev: u64) -> PathBuf {
    let (major, minor) = kernel_glue::fd::major_minor(dev);
    Path::new(mshare_uapi::BY_DEV_DIR).join(format!("{major}:{minor}"))
}

/// Links `socket` as the [`by_dev_entry`] of `dev`, after removing the links to `socket`
/// that an earlier daemon of the same state directory left (it was killed, and its mount
/// had another device number).
///
/// # Errors
/// Creating the directory or the link.
pub fn link_by_dev(dev: u64, socket: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = Path::new(mshare_uapi::BY_DEV_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    // Clients trust these links: only a directory of root's that no one else may write.
    if !root_only_dir(dir) {
        return Err(std::io::Error::other(format!(
            "{} is not a directory only root may write",
            dir.display()
        )));
    }
    unlink_by_dev(socket);
    let entry = by_dev_entry(dev);
    // A link of a daemon that died, whose device number this mount has now.
    let _ = std::fs::remove_file(&entry);
    std::os::unix::fs::symlink(socket, entry)
}

/// Whether `dir` is a directory (not a link to one) of root's that no one else may write.
fn root_only_dir(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0)
}

/// Removes every link to `socket` from [`mshare_uapi::BY_DEV_DIR`], and nothing else.
pub fn unlink_by_dev(socket: &Path) {
    let dir = Path::new(mshare_uapi::BY_DEV_DIR);
    // Not in a directory someone else could change under us.
    if !root_only_dir(dir) {
        return;
    }
    let Ok(dir) = std::fs::read_dir(dir) else {
        return;
    };
    for e in dir.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|t| t == socket) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("msharefs-paths-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn new_directories_are_created_marked_and_purged_whole() {
        let root = scratch("new");
        let st = StateDir {
            dir: root.join("a/b"),
        };
        st.prepare().unwrap();
        assert!(st.is_marked() && st.created_by_us());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&st.dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o711);
        std::fs::write(st.state_file(), "{}").unwrap();
        std::fs::create_dir_all(st.backing_dir().join("thp")).unwrap();
        st.prepare().unwrap();
        assert_eq!(
            st.purge(&["hugetlb", "thp", "shmem"]).unwrap(),
            Vec::<String>::new()
        );
        assert!(!st.dir.exists());
        // Parents it created stay (they may be shared, like /run/msharefs/state).
        assert!(root.join("a").is_dir());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn foreign_directories_are_refused_and_untouched() {
        let root = scratch("foreign");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("passwd"), "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o750)).unwrap();
        let st = StateDir { dir: root.clone() };
        let e = st.prepare().unwrap_err().to_string();
        assert!(
            e.contains(&root.display().to_string()) && e.contains("passwd"),
            "{e}"
        );
        assert!(!st.is_marked());
        let e = st.purge(&["thp"]).unwrap_err().to_string();
        assert!(e.contains("nothing removed"), "{e}");
        assert!(root.join("passwd").exists());
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
        // A file is not a directory.
        let file = StateDir {
            dir: root.join("passwd"),
        };
        assert!(
            file.prepare()
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn adopted_directories_keep_their_mode_and_foreign_files_survive_purge() {
        let root = scratch("adopt");
        std::fs::create_dir_all(&root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o750)).unwrap();
        let st = StateDir { dir: root.clone() };
        st.prepare().unwrap();
        assert!(st.is_marked() && !st.created_by_us());
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
        std::fs::write(st.log_file(), "log").unwrap();
        std::fs::write(root.join("notes.txt"), "mine").unwrap();
        std::fs::create_dir_all(st.backing_dir().join("shmem")).unwrap();
        std::fs::write(st.backing_dir().join("shmem/keep"), "x").unwrap();
        let kept = st.purge(&["hugetlb", "thp", "shmem"]).unwrap();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(root.join("notes.txt").exists());
        assert!(st.backing_dir().join("shmem/keep").exists());
        assert!(!st.log_file().exists() && !st.is_marked());
        std::fs::remove_dir_all(&root).unwrap();
        // An empty adopted directory is left in place, empty.
        std::fs::create_dir_all(&root).unwrap();
        st.prepare().unwrap();
        assert!(st.purge(&[]).unwrap().is_empty());
        assert!(root.is_dir());
        std::fs::remove_dir_all(&root).unwrap();
    }

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
