//! The persistent metadata: the tree of directories and regions, saved as JSON in the
//! state directory after every change, so a restarted daemon (after `umount` or
//! `kill -9`) finds every region again. Region *data* is not here: it lives in the backing
//! files, which outlive the daemon.
//!
//! This module is a plain data structure: no FUSE, no kernel calls beyond file I/O.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use mshare_uapi::Backing;

/// Inode number of the root directory (FUSE's fixed root).
pub const ROOT_INO: u64 = 1;
/// Inode number of `mshare_info`.
pub const INFO_INO: u64 = mshare_uapi::MSHARE_INFO_INO;
/// First inode number handed to user-created nodes. Inode numbers are never reused, so a
/// descriptor of a removed region can never be mistaken for a new one.
const FIRST_INO: u64 = 16;
/// Longest file name, as on other Linux file systems.
pub const NAME_MAX: usize = 255;

/// A backing kind as stored (never `Default`: resolved at creation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    /// hugetlbfs, 2 MiB pages.
    Hugetlb,
    /// tmpfs `huge=always`.
    Thp,
    /// tmpfs `huge=never`.
    Shmem,
}

impl Store {
    /// From a client's choice; `Default` resolves to `default`.
    pub fn resolve(b: Backing, default: Store) -> Store {
        match b {
            Backing::Default => default,
            Backing::Hugetlb => Store::Hugetlb,
            Backing::Thp => Store::Thp,
            Backing::Shmem => Store::Shmem,
        }
    }

    /// The client-facing value.
    pub fn backing(self) -> Backing {
        match self {
            Store::Hugetlb => Backing::Hugetlb,
            Store::Thp => Backing::Thp,
            Store::Shmem => Backing::Shmem,
        }
    }

    /// Page size: sizes and objects must be multiples of it.
    pub fn page_size(self) -> u64 {
        self.backing().page_size()
    }

    /// Name, as in the xattr and the CLI.
    pub fn name(self) -> &'static str {
        self.backing().name()
    }
}

/// A region's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMeta {
    /// Where its data lives.
    pub store: Store,
    /// Size in bytes; 0 while unset.
    pub size: u64,
    /// Objects created with `MSHAREFS_CREATE_MAPPING`: offset → size.
    pub objects: BTreeMap<u64, u64>,
    /// Huge pages the daemon added to the pool for this region (given back when the
    /// region ends).
    pub pool_pages: u64,
    /// The size its creator asked for, which `fstat` reports, when that is not a multiple
    /// of the page size (POSIX shared memory sized with `ftruncate(fd, 3145851)` holds a
    /// region of 4 MiB); 0: the same as `size`.
    #[serde(default)]
    pub length: u64,
    /// The System V or POSIX shared-memory segment whose data this region holds.
    #[serde(default)]
    pub shm: Option<ShmOrigin>,
    /// The cgroup directory its memory is charged to (that of the process that set its
    /// size, under the backing's controller); `None` when none accounts for it.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

impl RegionMeta {
    /// A new region on `store`, size unset.
    pub fn new(store: Store) -> RegionMeta {
        RegionMeta {
            store,
            size: 0,
            objects: BTreeMap::new(),
            pool_pages: 0,
            length: 0,
            shm: None,
            cgroup: None,
        }
    }

    /// The size `fstat` reports and reads and writes stop at.
    pub fn length(&self) -> u64 {
        if self.length == 0 {
            self.size
        } else {
            self.length
        }
    }
}

/// The kernel shared-memory segment a region holds the data of (see `shm.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShmOrigin {
    /// A POSIX segment: the `/dev/shm` file that names it, identified by device, inode and
    /// birth time (so a new file that reuses the inode number is not mistaken for it).
    Posix {
        /// Path of the file (`/dev/shm/NAME`).
        path: String,
        /// Its device.
        dev: u64,
        /// Its inode.
        ino: u64,
        /// Its birth time, nanoseconds since the epoch.
        btime_ns: i128,
    },
    /// A System V segment: its id and its creator's pid (an id reused after the segment is
    /// gone has another creator).
    Sysv {
        /// The shmid.
        id: i32,
        /// `shm_cpid`.
        cpid: u32,
    },
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A directory.
    Dir,
    /// A region file.
    Region(RegionMeta),
    /// The read-only `mshare_info` file.
    Info,
}

/// A directory entry with its inode (msharefs has no hard links).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Inode number.
    pub ino: u64,
    /// Parent directory (the root is its own parent).
    pub parent: u64,
    /// Name in the parent.
    pub name: String,
    /// Directory, region or info file.
    pub kind: NodeKind,
    /// Permission bits (no file type).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Change time, seconds since the epoch.
    pub ctime: i64,
    /// Removed from the tree but still open: the region ends at its last release.
    #[serde(default)]
    pub orphan: bool,
}

impl Node {
    /// The region metadata, if this is a region.
    pub fn region(&self) -> Option<&RegionMeta> {
        match &self.kind {
            NodeKind::Region(r) => Some(r),
            _ => None,
        }
    }

    /// Mutable region metadata, if this is a region.
    pub fn region_mut(&mut self) -> Option<&mut RegionMeta> {
        match &mut self.kind {
            NodeKind::Region(r) => Some(r),
            _ => None,
        }
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir)
    }
}

/// The whole tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Format version of the saved file.
    pub version: u32,
    /// Next inode number to hand out.
    pub next_ino: u64,
    /// The default store of the mount that created this state.
    pub default_store: Store,
    /// All nodes by inode.
    pub nodes: BTreeMap<u64, Node>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Errors of tree operations, each an errno a FUSE reply carries.
pub type Errno = i32;

impl Tree {
    /// A tree with only the root directory (mode 0777 like the kernel's msharefs root,
    /// plus the sticky bit so users cannot remove each other's regions) and `mshare_info`.
    pub fn new(default_store: Store) -> Tree {
        let t = now();
        let mut nodes = BTreeMap::new();
        nodes.insert(
            ROOT_INO,
            Node {
                ino: ROOT_INO,
                parent: ROOT_INO,
                name: String::new(),
                kind: NodeKind::Dir,
                mode: 0o1777,
                uid: 0,
                gid: 0,
                mtime: t,
                ctime: t,
                orphan: false,
            },
        );
        nodes.insert(
            INFO_INO,
            Node {
                ino: INFO_INO,
                parent: ROOT_INO,
                name: mshare_uapi::MSHARE_INFO_NAME.to_string(),
                kind: NodeKind::Info,
                mode: 0o444,
                uid: 0,
                gid: 0,
                mtime: t,
                ctime: t,
                orphan: false,
            },
        );
        Tree {
            version: 1,
            next_ino: FIRST_INO,
            default_store,
            nodes,
        }
    }

    /// The node with inode `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    /// Mutable node.
    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    /// The child `name` of directory `parent` (orphans are not in any directory).
    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        self.children(parent).find(|n| n.name == name)
    }

    /// Children of a directory, in inode order.
    pub fn children(&self, parent: u64) -> impl Iterator<Item = &Node> {
        self.nodes
            .values()
            .filter(move |n| n.parent == parent && n.ino != ROOT_INO && !n.orphan)
    }

    /// Checks a new name: not empty, not `.`/`..`, at most [`NAME_MAX`] bytes, no `/`.
    pub fn check_name(name: &str) -> Result<(), Errno> {
        if name.len() > NAME_MAX {
            return Err(libc_errno::ENAMETOOLONG);
        }
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(libc_errno::EINVAL);
        }
        Ok(())
    }

    /// Adds a node under `parent`; returns its inode.
    ///
    /// # Errors
    /// `ENOENT`/`ENOTDIR` for a bad parent, `EEXIST` for a taken name, name errors.
    pub fn insert(
        &mut self,
        parent: u64,
        name: &str,
        kind: NodeKind,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        Self::check_name(name)?;
        let p = self.get(parent).ok_or(libc_errno::ENOENT)?;
        if !p.is_dir() {
            return Err(libc_errno::ENOTDIR);
        }
        if self.lookup(parent, name).is_some() {
            return Err(libc_errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let t = now();
        self.nodes.insert(
            ino,
            Node {
                ino,
                parent,
                name: name.to_string(),
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
                mtime: t,
                ctime: t,
                orphan: false,
            },
        );
        self.touch(parent);
        Ok(ino)
    }

    /// Updates a directory's times after a change of its entries.
    pub fn touch(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            let t = now();
            n.mtime = t;
            n.ctime = t;
        }
    }

    /// Whether `ino` is `ancestor` or lies below it.
    pub fn is_within(&self, mut ino: u64, ancestor: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match self.get(ino) {
                Some(n) if n.parent != ino => ino = n.parent,
                _ => return false,
            }
        }
    }

    /// The path of a node below the mount root (`/a/b`), for reports.
    pub fn path_of(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            match self.get(cur) {
                Some(n) => {
                    parts.push(n.name.clone());
                    cur = n.parent;
                }
                None => break,
            }
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// Every region (including orphans).
    pub fn regions(&self) -> impl Iterator<Item = (&Node, &RegionMeta)> {
        self.nodes
            .values()
            .filter_map(|n| n.region().map(|r| (n, r)))
    }

    /// Loads the tree saved in `path`.
    ///
    /// # Errors
    /// Reading or parsing the file.
    pub fn load(path: &Path) -> io::Result<Tree> {
        let text = std::fs::read(path)?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Saves the tree to `path` atomically (write a temporary file, fsync, rename), so a
    /// daemon killed at any moment leaves either the old or the new state.
    ///
    /// # Errors
    /// Writing or renaming.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp: PathBuf = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        // Region names, owners and modes: readable by root only.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// errno values used by this module (kept local so the module stays kernel-free).
pub mod libc_errno {
    pub use kernel_glue::errnos::{EEXIST, EINVAL, ENAMETOOLONG, ENOENT, ENOTDIR};
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> NodeKind {
        NodeKind::Region(RegionMeta::new(Store::Hugetlb))
    }

    #[test]
    fn names_are_checked() {
        let mut t = Tree::new(Store::Hugetlb);
        for bad in ["", ".", "..", "a/b"] {
            assert_eq!(
                t.insert(ROOT_INO, bad, region(), 0o600, 0, 0),
                Err(libc_errno::EINVAL)
            );
        }
        let long = "x".repeat(256);
        assert_eq!(
            t.insert(ROOT_INO, &long, region(), 0o600, 0, 0),
            Err(libc_errno::ENAMETOOLONG)
        );
        let ok = "y".repeat(255);
        assert!(t.insert(ROOT_INO, &ok, region(), 0o600, 0, 0).is_ok());
        assert_eq!(
            t.insert(ROOT_INO, "mshare_info", region(), 0o600, 0, 0),
            Err(libc_errno::EEXIST)
        );
    }

    #[test]
    fn tree_round_trips_and_paths() {
        let mut t = Tree::new(Store::Thp);
        let d = t
            .insert(ROOT_INO, "db", NodeKind::Dir, 0o755, 0, 0)
            .unwrap();
        let r = t.insert(d, "sga", region(), 0o600, 1, 2).unwrap();
        assert_eq!(t.path_of(r), "/db/sga");
        assert!(t.is_within(r, d));
        assert!(!t.is_within(d, r));
        assert_eq!(
            t.insert(r, "x", region(), 0o600, 0, 0),
            Err(libc_errno::ENOTDIR)
        );
        let dir = std::env::temp_dir().join(format!("msharefs-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.json");
        t.save(&p).unwrap();
        assert_eq!(Tree::load(&p).unwrap(), t);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
