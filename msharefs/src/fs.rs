//! The file system's logic: names, permissions, region sizes, objects, handles. Every
//! operation returns `Result<_, Errno>` with the errno the client gets; `fuse.rs` only
//! translates FUSE requests to these calls and replies.
//!
//! Locking: one mutex over the metadata (`Inner`). Long work (reserving memory for a new
//! region size) runs outside it with the region marked busy.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kernel_glue::errnos::*;
use kernel_glue::mapping::Protection;
use kernel_glue::{consts, fd as kfd};
use mshare_uapi::{self as uapi, Backing};

use crate::attachers::Attachers;
use crate::backing::{Stores, charge};
use crate::hostmm::HostMm;
use crate::shm::PosixFiles;
use crate::state::{INFO_INO, Node, NodeKind, RegionMeta, ShmOrigin, Store, Tree};

/// An errno for a client.
pub type Errno = i32;
/// Result of a file-system operation.
pub type FsResult<T> = Result<T, Errno>;

/// An `io::Error`'s errno for a client, `EIO` when it carries none.
pub use kernel_glue::errno_of;

/// What `mshare_info` contains.
pub fn info_text() -> String {
    format!("{}\n", uapi::MSHARE_GRANULE)
}

/// Checks an object range of an ioctl against a region and returns it as the region
/// holds it: `[offset, end)` with `end` rounded up to the region's page size.
///
/// The region's pages are the unit, as the kernel's hugetlb mappings make them: an
/// object or unmap range must start on a page boundary of the region (`EINVAL`
/// otherwise, as `mmap(MAP_FIXED|MAP_HUGETLB)` at an unaligned address is) and its size is
/// rounded up to whole pages (as a hugetlb `mmap` rounds its length), so a 4 KiB object
/// of a hugetlb region occupies one 2 MiB page. The size must be set, the range non-empty
/// and inside the region (overflow-safe).
fn object_range(r: &RegionMeta, offset: u64, size: u64) -> FsResult<(u64, u64)> {
    let page = r.store.page_size();
    let end = offset.checked_add(size).ok_or(EINVAL)?;
    if r.size == 0 || size == 0 || end > r.size || offset % page != 0 {
        return Err(EINVAL);
    }
    // r.size is a multiple of the page size, so the rounded end stays inside the region.
    Ok((offset, end.div_ceil(page) * page))
}

/// A node's region metadata; `EISDIR`/`EPERM` for a directory or `mshare_info`.
fn region_meta(node: &Node) -> FsResult<&RegionMeta> {
    match &node.kind {
        NodeKind::Region(r) => Ok(r),
        NodeKind::Dir => Err(EISDIR),
        NodeKind::Info => Err(EPERM),
    }
}

/// Where a region's data lives and how much of it there is.
#[derive(Debug, Clone, Copy)]
struct Extent {
    store: Store,
    /// Bytes of backing (a page multiple).
    size: u64,
    /// Bytes `fstat` reports; reads and writes stop here.
    length: u64,
}

/// An open file handle.
#[derive(Debug, Clone, Copy)]
pub struct Handle {
    /// Inode it opened.
    pub ino: u64,
    /// Opened for writing.
    pub write: bool,
}

/// How a handle is opened (`Core::open`).
#[derive(Debug)]
pub enum OpenMode {
    /// `FOPEN_DIRECT_IO`: hugetlb regions (hugetlbfs cannot be passed through),
    /// `mshare_info`, and everything when the kernel refused passthrough.
    Direct,
    /// FUSE passthrough to a thp or shmem backing: with the backing descriptor to register
    /// when the inode has no backing id yet, else its id is reused.
    Passthrough(Option<OwnedFd>),
}

/// Per-inode open state.
#[derive(Debug, Default)]
pub struct OpenState {
    /// Open handles.
    pub count: u32,
    /// The passthrough backing id, shared by all handles of the inode (the kernel
    /// requires one backing file per inode while any passthrough open exists).
    pub backing_id: Option<Arc<fuser::BackingId>>,
}

/// Mutable metadata under the lock.
#[derive(Debug)]
pub struct Inner {
    /// The tree (persisted).
    pub tree: Tree,
    /// Open state by inode.
    pub open: HashMap<u64, OpenState>,
    /// Handles by file handle number.
    pub handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Regions whose size is being set right now, with what they reserve.
    busy: HashMap<u64, Reservation>,
}

/// A size being reserved right now (unlocked, see `Core::set_size`). It counts against
/// its owner's quota before it is committed, so two concurrent size calls cannot both
/// pass the check.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    /// The owner when it started (a chown meanwhile moves only the committed size).
    uid: u32,
    size: u64,
}

/// Bytes of region memory by owner uid: the sizes of all regions, unlinked-but-open ones
/// included (their memory stays pinned until the last release), plus reservations in
/// flight. Every owner of a region appears, with 0 while nothing is sized.
fn usage_by_owner(inner: &Inner) -> BTreeMap<u32, u64> {
    let mut used = BTreeMap::new();
    for (node, r) in inner.tree.regions() {
        let u: &mut u64 = used.entry(node.uid).or_default();
        *u = u.saturating_add(r.size);
    }
    for res in inner.busy.values() {
        let u: &mut u64 = used.entry(res.uid).or_default();
        *u = u.saturating_add(res.size);
    }
    used
}

/// A sized region still under libmshare's temporary name (`uapi::CREATING_PREFIX`) has
/// been sized through a descriptor its creator keeps open until the rename; once that
/// closes, the creator is gone and the reserved memory would otherwise stay pinned.
fn abandoned_creation(n: &Node) -> bool {
    n.name.starts_with(uapi::CREATING_PREFIX) && n.region().is_some_and(|r| r.size > 0)
}

/// The daemon's shared core: metadata, backing stores, host mm.
#[derive(Debug)]
pub struct Core {
    inner: Mutex<Inner>,
    /// Backing stores.
    pub stores: Stores,
    /// Host mappings.
    pub hostmm: HostMm,
    /// Processes attached to hugetlb regions, for the shrinker (`attachers.rs`).
    pub attachers: Attachers,
    state_file: PathBuf,
    /// Attach socket path (reported by `MSHAREFS_GET_INFO`).
    pub socket_path: PathBuf,
    /// Device number of the FUSE mount, known once mounted.
    pub fuse_dev: OnceLock<u64>,
    /// Whether the kernel accepted FUSE passthrough.
    pub passthrough: OnceLock<bool>,
    /// The mount point, known once mounted (the daemon opens shared-memory regions
    /// through it for clients, see `shm.rs`).
    pub mountpoint: OnceLock<PathBuf>,
    /// The `/dev/shm` files of POSIX shared-memory regions (see `shm.rs`).
    pub posix: PosixFiles,
    /// Tells the kernel about names the daemon removes on its own (not in answer to a
    /// request), so its cache does not keep them.
    pub notifier: OnceLock<fuser::Notifier>,
    /// Most bytes of region memory one non-root owner may hold (`--user-quota`); `None`:
    /// no limit. Sized regions pin memory (huge pages or tmpfs), so without a limit any
    /// local user could take most of the machine.
    pub user_quota: Option<u64>,
    /// The `MSHAREFS_UNMAP` guard (`mshare::guard`, `docs/KERNEL.md`): `UNMAP` leaves a
    /// hole (a guarded attacher that touches it gets `SIGBUS`), `CREATE_MAPPING` fills
    /// it again, and the host mappings are registered as guarded attachers' are, so they
    /// keep sharing tables; libmshare and the shim arm the guard on every mapping of a
    /// region whose info carries `FLAG_UNMAP_GUARD` (an unguarded mapping shares nothing
    /// with guarded host mappings). On with the mount option `--unmap-guard`
    /// (`-o unmap_guard`).
    pub unmap_guard: bool,
}

impl Core {
    /// A core over a loaded or new tree, with the per-user quota of region memory.
    pub fn new(
        tree: Tree,
        stores: Stores,
        state_file: PathBuf,
        socket_path: PathBuf,
        user_quota: Option<u64>,
        unmap_guard: bool,
    ) -> Core {
        Core {
            inner: Mutex::new(Inner {
                tree,
                open: HashMap::new(),
                handles: HashMap::new(),
                next_fh: 1,
                busy: HashMap::new(),
            }),
            stores,
            hostmm: HostMm::new(unmap_guard),
            attachers: Attachers::new(),
            state_file,
            socket_path,
            fuse_dev: OnceLock::new(),
            passthrough: OnceLock::new(),
            mountpoint: OnceLock::new(),
            posix: PosixFiles::default(),
            notifier: OnceLock::new(),
            user_quota,
            unmap_guard,
        }
    }

    /// Bytes of region memory each owner holds, as the quota counts them (for reports).
    pub fn usage(&self) -> BTreeMap<u32, u64> {
        usage_by_owner(&self.lock())
    }

    /// Locks the metadata. A panicked thread must not wedge the daemon: the data is
    /// plain and every mutation is completed before the lock is released.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves the tree; a failure is logged and reported as `EIO`.
    fn persist(&self, inner: &Inner) -> FsResult<()> {
        inner.tree.save(&self.state_file).map_err(|e| {
            log::error!("cannot save {}: {e}", self.state_file.display());
            EIO
        })
    }

    /// Brings back host mappings and drops orphans after a (re)start.
    pub fn recover(&self) {
        let mut inner = self.lock();
        let orphans: Vec<u64> = inner
            .tree
            .nodes
            .values()
            .filter(|n| n.orphan)
            .map(|n| n.ino)
            .collect();
        for ino in orphans {
            log::info!("removing region {ino}, unlinked before the last daemon stopped");
            self.destroy(&mut inner, ino);
        }
        // Hold every backing file from now on (a missing one is reported by the
        // operations that need it, as it would have been before).
        for (n, r) in inner.tree.regions() {
            if let Err(e) = self.stores.file(r.store, n.ino) {
                log::error!("region {}: cannot open its backing file: {e}", n.ino);
            }
        }
        let hugetlb: Vec<(u64, u64)> = inner
            .tree
            .regions()
            .filter(|(_, r)| r.store == Store::Hugetlb && r.size > 0)
            .map(|(n, r)| (n.ino, r.size))
            .collect();
        for (ino, size) in hugetlb {
            if let Err(e) = self.hostmm.install(ino, size, &self.opener(ino)) {
                log::error!("region {ino}: cannot map its backing again: {e}");
            }
        }
        let _ = self.persist(&inner);
    }

    /// Opens the hugetlb backing of `ino`, read-write or read-only: what the host mm maps.
    fn opener(&self, ino: u64) -> impl Fn(bool) -> io::Result<OwnedFd> + '_ {
        move |write| self.stores.open_file(Store::Hugetlb, ino, write)
    }

    // ---- names -------------------------------------------------------------------------

    /// Looks up `name` in `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> FsResult<Node> {
        let inner = self.lock();
        let p = inner.tree.get(parent).ok_or(ENOENT)?;
        if !p.is_dir() {
            return Err(ENOTDIR);
        }
        inner.tree.lookup(parent, name).cloned().ok_or(ENOENT)
    }

    /// The node `ino`.
    pub fn node(&self, ino: u64) -> FsResult<Node> {
        self.lock().tree.get(ino).cloned().ok_or(ENOENT)
    }

    /// Creates a directory.
    pub fn mkdir(&self, parent: u64, name: &str, mode: u32, uid: u32, gid: u32) -> FsResult<Node> {
        let mut inner = self.lock();
        let ino = inner
            .tree
            .insert(parent, name, NodeKind::Dir, mode, uid, gid)?;
        self.persist(&inner)?;
        inner.tree.get(ino).cloned().ok_or(EIO)
    }

    /// Creates a region (size unset) on the mount's default store.
    pub fn create_region(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Node> {
        let mut inner = self.lock();
        let store = inner.tree.default_store;
        let kind = NodeKind::Region(RegionMeta::new(store));
        let ino = inner.tree.insert(parent, name, kind, mode, uid, gid)?;
        if let Err(e) = self.stores.create(store, ino, mode, uid, gid) {
            inner.tree.nodes.remove(&ino);
            return Err(errno_of(&e));
        }
        self.persist(&inner)?;
        inner.tree.get(ino).cloned().ok_or(EIO)
    }

    /// Ends a region: host mappings, backing file, pool pages, node.
    fn destroy(&self, inner: &mut Inner, ino: u64) {
        if let Some(node) = inner.tree.nodes.remove(&ino) {
            if let Some(r) = node.region() {
                self.posix.forget(ino);
                self.hostmm.release(ino);
                self.attachers.forget_region(ino);
                self.stores.remove(r.store, ino);
                if let Err(e) = kernel_glue::hugepages::give_back(r.pool_pages) {
                    log::error!(
                        "region {ino}: cannot give back {} huge pages: {e}",
                        r.pool_pages
                    );
                }
                log::info!("region {} ({ino}) removed", node.name);
            }
        }
    }

    /// Removes the entry `name` (a region or, with `dir`, an empty directory) from
    /// `parent`. A region that is still open ends at its last release.
    fn remove_entry(&self, inner: &mut Inner, ino: u64) {
        let open = inner.open.get(&ino).is_some_and(|o| o.count > 0);
        let Some(node) = inner.tree.get_mut(ino) else {
            return;
        };
        let parent = node.parent;
        if node.region().is_some() && open {
            node.orphan = true;
            // Its segment's name is free again: a new segment must not find this region.
            self.posix.forget(ino);
        } else if node.is_dir() {
            inner.tree.nodes.remove(&ino);
        } else {
            self.destroy(inner, ino);
        }
        inner.tree.touch(parent);
    }

    /// `unlink(2)`.
    pub fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        let mut inner = self.lock();
        let node = inner.tree.lookup(parent, name).ok_or(ENOENT)?;
        match node.kind {
            NodeKind::Dir => return Err(EISDIR),
            NodeKind::Info => return Err(EPERM),
            NodeKind::Region(_) => {}
        }
        let ino = node.ino;
        self.remove_entry(&mut inner, ino);
        self.persist(&inner)
    }

    /// `rmdir(2)`.
    pub fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        let mut inner = self.lock();
        let node = inner.tree.lookup(parent, name).ok_or(ENOENT)?;
        if !node.is_dir() {
            return Err(ENOTDIR);
        }
        let ino = node.ino;
        if inner.tree.children(ino).next().is_some() {
            return Err(ENOTEMPTY);
        }
        self.remove_entry(&mut inner, ino);
        self.persist(&inner)
    }

    /// `rename(2)` with `RENAME_NOREPLACE` support; `RENAME_EXCHANGE` is `EINVAL`.
    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        flags: u32,
    ) -> FsResult<()> {
        if flags & !consts::RENAME_NOREPLACE != 0 {
            return Err(EINVAL);
        }
        Tree::check_name(newname)?;
        let mut inner = self.lock();
        let src = inner.tree.lookup(parent, name).cloned().ok_or(ENOENT)?;
        if matches!(src.kind, NodeKind::Info) {
            return Err(EPERM);
        }
        let np = inner.tree.get(newparent).ok_or(ENOENT)?;
        if !np.is_dir() {
            return Err(ENOTDIR);
        }
        if src.is_dir() && inner.tree.is_within(newparent, src.ino) {
            return Err(EINVAL);
        }
        if let Some(dst) = inner.tree.lookup(newparent, newname).cloned() {
            if dst.ino == src.ino {
                return Ok(());
            }
            if flags & consts::RENAME_NOREPLACE != 0 {
                return Err(EEXIST);
            }
            match (&src.kind, &dst.kind) {
                (_, NodeKind::Info) => return Err(EPERM),
                (NodeKind::Dir, NodeKind::Dir) if inner.tree.children(dst.ino).next().is_some() => {
                    return Err(ENOTEMPTY);
                }
                (NodeKind::Dir, NodeKind::Dir) => {}
                (NodeKind::Dir, _) => return Err(ENOTDIR),
                (_, NodeKind::Dir) => return Err(EISDIR),
                _ => {}
            }
            self.remove_entry(&mut inner, dst.ino);
        }
        let n = inner.tree.get_mut(src.ino).ok_or(EIO)?;
        n.parent = newparent;
        n.name = newname.to_string();
        inner.tree.touch(src.ino);
        inner.tree.touch(parent);
        inner.tree.touch(newparent);
        self.persist(&inner)
    }

    // ---- attributes --------------------------------------------------------------------

    /// Changes mode, owner and group (the kernel has checked the caller may), mirroring
    /// them onto the backing file.
    pub fn set_owner_mode(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> FsResult<()> {
        let mut inner = self.lock();
        let node = inner.tree.get_mut(ino).ok_or(ENOENT)?;
        if matches!(node.kind, NodeKind::Info) {
            return Err(EPERM);
        }
        if let Some(m) = mode {
            node.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            node.uid = u;
        }
        if let Some(g) = gid {
            node.gid = g;
        }
        let (m, u, g) = (node.mode, node.uid, node.gid);
        let store = node.region().map(|r| r.store);
        inner.tree.touch(ino);
        if let Some(s) = store {
            self.stores
                .set_owner_mode(s, ino, m, u, g)
                .map_err(|e| errno_of(&e))?;
            // A POSIX segment's /dev/shm file decides who may open it by name.
            self.posix
                .set_owner_mode(ino, m, u, g)
                .map_err(|e| errno_of(&e))?;
        }
        self.persist(&inner)
    }

    /// Sets the modification time.
    pub fn set_mtime(&self, ino: u64, secs: i64) -> FsResult<()> {
        let mut inner = self.lock();
        let node = inner.tree.get_mut(ino).ok_or(ENOENT)?;
        node.mtime = secs;
        self.persist(&inner)
    }

    /// Sets a region's size, once, reserving its memory (see `Stores::reserve`). The size
    /// must be a positive multiple of the backing's page size. Setting the size a region
    /// already has is a no-op; any other second change is `EINVAL` (regions never shrink,
    /// so `O_TRUNC` of a sized region fails too).
    ///
    /// A region owned by a uid other than root may not take its owner past
    /// `user_quota`: `EDQUOT`, with nothing reserved. The owner, not the caller, is
    /// charged: the memory stays theirs for as long as the region lives.
    ///
    /// The memory itself is allocated in the cgroups of `pid`, the process that set the
    /// size, and charged there (`backing::charge`); a size they cannot hold is `ENOMEM`.
    pub fn set_size(&self, ino: u64, size: u64, pid: u32) -> FsResult<()> {
        self.reserve_size(ino, size, size, pid)
    }

    /// [`Core::set_size`] with a `length` that need not be a page multiple: the region
    /// gets `length` rounded up to its page size and `fstat` reports `length` (POSIX and
    /// System V segments keep the size their program asked for).
    pub fn set_length(&self, ino: u64, length: u64, pid: u32) -> FsResult<()> {
        let page = {
            let inner = self.lock();
            region_meta(inner.tree.get(ino).ok_or(ENOENT)?)?
                .store
                .page_size()
        };
        let size = length.checked_next_multiple_of(page).ok_or(EINVAL)?;
        self.reserve_size(ino, size, length, pid)
    }

    fn reserve_size(&self, ino: u64, size: u64, length: u64, pid: u32) -> FsResult<()> {
        let store = {
            let mut inner = self.lock();
            let node = inner.tree.get(ino).ok_or(ENOENT)?;
            let r = region_meta(node)?;
            if size == 0 || length == 0 {
                return Err(EINVAL);
            }
            if r.size != 0 && r.length() == length {
                return Ok(());
            }
            if r.size != 0 || inner.busy.contains_key(&ino) {
                return Err(EINVAL);
            }
            if size % r.store.page_size() != 0 || i64::try_from(size).is_err() {
                return Err(EINVAL);
            }
            let (store, uid) = (r.store, node.uid);
            if let Some(limit) = self.user_quota.filter(|_| uid != 0) {
                let used = usage_by_owner(&inner).get(&uid).copied().unwrap_or(0);
                if used.saturating_add(size) > limit {
                    log::info!(
                        "region {ino}: size {size} refused: uid {uid} holds {used} bytes, \
                         quota {limit}"
                    );
                    return Err(EDQUOT);
                }
            }
            inner.busy.insert(ino, Reservation { uid, size });
            store
        };
        // Reserving can take seconds (every page is zeroed): do it unlocked.
        let reserved = charge::for_request(pid, store, size).and_then(|c| {
            let r = self.stores.reserve(store, ino, size, &c.join);
            r.map(|r| (r, c.shown)).map_err(|e| {
                log::info!("region {ino}: size {size} refused: {e}");
                errno_of(&e)
            })
        });
        let mut inner = self.lock();
        inner.busy.remove(&ino);
        let (reserved, cgroup) = reserved?;
        let Some(r) = inner.tree.get_mut(ino).and_then(Node::region_mut) else {
            // Unlinked meanwhile and already destroyed: give everything back.
            let _ = kernel_glue::hugepages::give_back(reserved.pool_pages);
            return Err(ENOENT);
        };
        r.size = size;
        r.length = if length == size { 0 } else { length };
        r.pool_pages = reserved.pool_pages;
        r.cgroup = cgroup;
        if store == Store::Hugetlb {
            // The memory is reserved; without host tables attaches still work, only slower.
            if let Err(e) = self.hostmm.install(ino, size, &self.opener(ino)) {
                log::error!("region {ino}: cannot build host tables: {e}");
            }
        }
        inner.tree.touch(ino);
        self.persist(&inner)
    }

    /// Chooses a region's backing before its size is set (`user.mshare.backing`).
    pub fn set_backing(&self, ino: u64, b: Backing, flags: i32) -> FsResult<()> {
        if flags & consts::XATTR_CREATE != 0 {
            // The attribute always exists: every region has a backing.
            return Err(EEXIST);
        }
        let mut inner = self.lock();
        let default = inner.tree.default_store;
        let open = inner.open.get(&ino).is_some_and(|o| o.count > 0);
        let node = inner.tree.get(ino).ok_or(ENOENT)?;
        let (mode, uid, gid) = (node.mode, node.uid, node.gid);
        let r = node.region().ok_or(EOPNOTSUPP)?;
        let new = Store::resolve(b, default);
        if new == r.store {
            return Ok(());
        }
        if r.size != 0 || inner.busy.contains_key(&ino) || open {
            // Data or an open file already depend on the current backing. Open files count
            // even when not passed through: the kernel applies our open replies after we
            // send them, and a direct-I/O reply applied once the inode has a passthrough
            // backing fails that open with EIO (fs/fuse/iomode.c). Every answered open
            // stays counted until its release, which the kernel sends only after it has
            // dropped the file's I/O mode, so no reply can be in flight across a change.
            return Err(EBUSY);
        }
        let old = r.store;
        self.stores
            .create(new, ino, mode, uid, gid)
            .map_err(|e| errno_of(&e))?;
        self.stores.remove(old, ino);
        if let Some(r) = inner.tree.get_mut(ino).and_then(Node::region_mut) {
            r.store = new;
        }
        self.persist(&inner)
    }

    // ---- open files --------------------------------------------------------------------

    /// Registers an open handle. Returns the handle number and how to open it.
    pub fn open(&self, ino: u64, acc: i32) -> FsResult<(u64, OpenMode)> {
        let mut inner = self.lock();
        let node = inner.tree.get(ino).ok_or(ENOENT)?;
        let write = acc == consts::O_WRONLY || acc == consts::O_RDWR;
        let store = match &node.kind {
            NodeKind::Dir => return Err(EISDIR),
            NodeKind::Info if write => return Err(EACCES),
            NodeKind::Info => None,
            NodeKind::Region(r) => Some(r.store),
        };
        let passthrough = *self.passthrough.get().unwrap_or(&false);
        let mode = match store {
            Some(s @ (Store::Thp | Store::Shmem)) if passthrough => {
                let need = inner.open.get(&ino).is_none_or(|o| o.backing_id.is_none());
                if need {
                    let fd = self
                        .stores
                        .open_file(s, ino, true)
                        .map_err(|e| errno_of(&e))?;
                    OpenMode::Passthrough(Some(fd))
                } else {
                    OpenMode::Passthrough(None)
                }
            }
            _ => OpenMode::Direct,
        };
        let fh = inner.next_fh;
        inner.next_fh += 1;
        inner.handles.insert(fh, Handle { ino, write });
        inner.open.entry(ino).or_default().count += 1;
        Ok((fh, mode))
    }

    /// Stores the passthrough backing id of an inode (first passthrough open).
    pub fn set_backing_id(&self, ino: u64, id: Arc<fuser::BackingId>) {
        self.lock().open.entry(ino).or_default().backing_id = Some(id);
    }

    /// The passthrough backing id of an inode, if any.
    pub fn backing_id(&self, ino: u64) -> Option<Arc<fuser::BackingId>> {
        self.lock()
            .open
            .get(&ino)
            .and_then(|o| o.backing_id.clone())
    }

    /// Forgets a handle; the last one drops the passthrough id and ends an unlinked
    /// region.
    pub fn release(&self, fh: u64) {
        let mut inner = self.lock();
        let Some(h) = inner.handles.remove(&fh) else {
            return;
        };
        let last = match inner.open.get_mut(&h.ino) {
            Some(o) => {
                o.count = o.count.saturating_sub(1);
                o.count == 0
            }
            None => true,
        };
        if last {
            inner.open.remove(&h.ino);
            if inner.tree.get(h.ino).is_some_and(|n| n.orphan) {
                self.destroy(&mut inner, h.ino);
                let _ = self.persist(&inner);
            } else if inner.tree.get(h.ino).is_some_and(abandoned_creation) {
                log::info!("region {}: its creator closed it before naming it", h.ino);
                self.remove_entry(&mut inner, h.ino);
                let _ = self.persist(&inner);
            }
        }
    }

    /// The handle `fh`.
    pub fn handle(&self, fh: u64) -> FsResult<Handle> {
        self.lock().handles.get(&fh).copied().ok_or(EBADF)
    }

    /// Open handles of an inode.
    pub fn open_count(&self, ino: u64) -> u32 {
        self.lock().open.get(&ino).map_or(0, |o| o.count)
    }

    // ---- data --------------------------------------------------------------------------

    /// The backing and size of region `ino` (its objects are not needed for data access).
    fn region_of(&self, ino: u64) -> FsResult<Extent> {
        let inner = self.lock();
        let r = region_meta(inner.tree.get(ino).ok_or(ENOENT)?)?;
        Ok(Extent {
            store: r.store,
            size: r.size,
            length: r.length(),
        })
    }

    /// Reads region data (for `cp`/`dd`; mapped access never comes here).
    pub fn read(&self, ino: u64, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        if ino == INFO_INO {
            let text = info_text().into_bytes();
            let start = (offset as usize).min(text.len());
            let end = start.saturating_add(len as usize).min(text.len());
            return Ok(text[start..end].to_vec());
        }
        let r = self.region_of(ino)?;
        if offset >= r.length {
            return Ok(Vec::new());
        }
        let n = (len as u64).min(r.length - offset) as usize;
        let mut buf = vec![0u8; n];
        let f = self.stores.file(r.store, ino).map_err(|e| errno_of(&e))?;
        let got = kfd::pread_full(f.fd(), &mut buf, offset).map_err(|e| errno_of(&e))?;
        buf.truncate(got);
        Ok(buf)
    }

    /// Writes region data. Regions do not grow: bytes past the end are `ENOSPC`.
    /// hugetlbfs has no `write(2)`, so hugetlb data is copied through the host mapping.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let r = self.region_of(ino)?;
        if offset >= r.length {
            return Err(ENOSPC);
        }
        let n = (data.len() as u64).min(r.length - offset) as usize;
        let data = &data[..n];
        match r.store {
            Store::Hugetlb => self
                .hostmm
                .write(ino, r.size, offset, data, &self.opener(ino))
                .map_err(|e| errno_of(&e))?,
            Store::Thp | Store::Shmem => {
                use std::os::unix::fs::FileExt;
                let fd = self
                    .stores
                    .open_file(r.store, ino, true)
                    .map_err(|e| errno_of(&e))?;
                std::fs::File::from(fd)
                    .write_all_at(data, offset)
                    .map_err(|e| errno_of(&e))?;
            }
        }
        Ok(n as u32)
    }

    // ---- ioctls ------------------------------------------------------------------------

    /// `MSHAREFS_GET_INFO`. On a directory or `mshare_info` it reports only the attach
    /// socket (size 0), for the shim, which finds the daemon of `MSHARE_MOUNT` that way.
    pub fn region_info(&self, ino: u64) -> FsResult<uapi::MshareRegionInfo> {
        let mut info = uapi::MshareRegionInfo {
            granule: uapi::MSHARE_GRANULE,
            version: 2,
            kind: uapi::KIND_MOUNT,
            ..Default::default()
        };
        let inner = self.lock();
        if let Some(r) = inner.tree.get(ino).ok_or(ENOTTY)?.region() {
            info.size = r.size;
            info.length = r.length();
            info.page_size = r.store.page_size();
            info.backing = r.store.backing().raw();
            if self.unmap_guard && r.store == Store::Hugetlb {
                info.flags |= uapi::FLAG_UNMAP_GUARD;
            }
            info.kind = match r.shm {
                None => uapi::KIND_REGION,
                Some(ShmOrigin::Posix { .. }) => uapi::KIND_POSIX_SHM,
                Some(ShmOrigin::Sysv { .. }) => uapi::KIND_SYSV_SHM,
            };
        }
        drop(inner);
        let p = self.socket_path.as_os_str().as_encoded_bytes();
        if p.len() >= uapi::SOCKET_PATH_LEN {
            return Err(ENAMETOOLONG);
        }
        info.socket_path[..p.len()].copy_from_slice(p);
        Ok(info)
    }

    /// `MSHAREFS_CREATE_MAPPING`: an anonymous shared object, reserved and populated. The
    /// flags are checked before the range, as the kernel does.
    pub fn create_object(&self, ino: u64, req: &uapi::MshareCreate) -> FsResult<()> {
        let mut inner = self.lock();
        let node = inner.tree.get(ino).ok_or(ENOENT)?;
        let r = node.region().ok_or(ENOTTY)?;
        if r.size == 0 {
            return Err(EINVAL);
        }
        let flags = req.flags as i32;
        let need = consts::MAP_SHARED | consts::MAP_FIXED;
        if flags & need != need || flags & consts::MAP_PRIVATE != 0 {
            return Err(EINVAL);
        }
        if flags & consts::MAP_ANONYMOUS == 0 {
            return Err(EOPNOTSUPP);
        }
        let prot = req.prot as i32;
        if prot & !(consts::PROT_READ | consts::PROT_WRITE | consts::PROT_EXEC) != 0 {
            return Err(EINVAL);
        }
        let (start, end) = object_range(r, req.region_offset, req.size)?;
        let overlaps = r.objects.iter().any(|(&o, &s)| o < end && start < o + s);
        if overlaps {
            return Err(EEXIST);
        }
        let (store, size) = (r.store, r.size);
        if self.unmap_guard {
            // UNMAP left holes: allocate the object's pages again, charged as the
            // region's memory is.
            let charge: Vec<PathBuf> = r.cgroup.iter().cloned().collect();
            self.stores
                .fill(store, ino, start, end - start, &charge)
                .map_err(|e| errno_of(&e))?;
        }
        if store == Store::Hugetlb {
            self.hostmm
                .populate(ino, size, start, end - start, &self.opener(ino))
                .map_err(|e| errno_of(&e))?;
        }
        if let Some(r) = inner.tree.get_mut(ino).and_then(Node::region_mut) {
            r.objects.insert(start, end - start);
        }
        self.persist(&inner)
    }

    /// `MSHAREFS_UNMAP`: discards the range's contents in every attacher (they read as
    /// zero afterwards; with the unmap guard, a guarded attacher gets `SIGBUS`) and removes
    /// the objects in it (trimming partly covered ones).
    pub fn unmap_range(&self, ino: u64, req: &uapi::MshareUnmap) -> FsResult<()> {
        let mut inner = self.lock();
        let node = inner.tree.get(ino).ok_or(ENOENT)?;
        let r = node.region().ok_or(ENOTTY)?;
        let (start, end) = object_range(r, req.region_offset, req.size)?;
        let store = r.store;
        self.stores
            .discard(store, ino, start, end - start, !self.unmap_guard)
            .map_err(|e| errno_of(&e))?;
        if let Some(r) = inner.tree.get_mut(ino).and_then(Node::region_mut) {
            let mut kept = std::collections::BTreeMap::new();
            for (&o, &s) in &r.objects {
                let oend = o + s;
                if oend <= start || o >= end {
                    kept.insert(o, s);
                    continue;
                }
                if o < start {
                    kept.insert(o, start - o);
                }
                if oend > end {
                    kept.insert(end, oend - end);
                }
            }
            r.objects = kept;
        }
        self.persist(&inner)
    }

    // ---- shared-memory segments (shm.rs) ----------------------------------------------

    /// The root-owned directory `name` in the mount root (mode 0711: others may open
    /// what is in it by name, as the kernel allows them, but not list or change it),
    /// created if missing.
    pub fn shm_dir(&self, name: &str) -> FsResult<u64> {
        let mut inner = self.lock();
        if let Some(n) = inner.tree.lookup(crate::state::ROOT_INO, name) {
            return if n.is_dir() { Ok(n.ino) } else { Err(EEXIST) };
        }
        let ino = inner
            .tree
            .insert(crate::state::ROOT_INO, name, NodeKind::Dir, 0o711, 0, 0)?;
        self.persist(&inner)?;
        Ok(ino)
    }

    /// Creates the hugetlb region that holds a shared-memory segment's data (size unset;
    /// [`Core::set_length`] reserves it).
    pub fn create_shm_region(
        &self,
        parent: u64,
        name: &str,
        owner: (u32, u32, u32),
        origin: ShmOrigin,
    ) -> FsResult<u64> {
        let (mode, uid, gid) = owner;
        let mut inner = self.lock();
        let mut meta = RegionMeta::new(Store::Hugetlb);
        meta.shm = Some(origin);
        let ino = inner
            .tree
            .insert(parent, name, NodeKind::Region(meta), mode, uid, gid)?;
        if let Err(e) = self.stores.create(Store::Hugetlb, ino, mode, uid, gid) {
            inner.tree.nodes.remove(&ino);
            return Err(errno_of(&e));
        }
        self.persist(&inner)?;
        Ok(ino)
    }

    /// Removes region `ino`'s name: it ends at once, or at its last release if open.
    /// The daemon does this on its own, so it tells the kernel, whose cache would
    /// otherwise keep finding the name.
    pub fn remove_region(&self, ino: u64) -> FsResult<()> {
        let (parent, name) = {
            let mut inner = self.lock();
            let node = inner
                .tree
                .get(ino)
                .filter(|n| n.region().is_some() && !n.orphan);
            let Some(node) = node else {
                return Err(ENOENT);
            };
            let named = (node.parent, node.name.clone());
            self.remove_entry(&mut inner, ino);
            self.persist(&inner)?;
            named
        };
        if let Some(n) = self.notifier.get() {
            // Unlocked: the kernel may wait for requests that need our lock.
            let _ = n.delete(
                fuser::INodeNo(parent),
                fuser::INodeNo(ino),
                std::ffi::OsStr::new(&name),
            );
        }
        Ok(())
    }

    /// Every named region that holds a shared-memory segment, with its origin.
    pub fn shm_regions(&self) -> Vec<(u64, ShmOrigin)> {
        self.lock()
            .tree
            .regions()
            .filter(|(n, _)| !n.orphan)
            .filter_map(|(n, r)| r.shm.clone().map(|o| (n.ino, o)))
            .collect()
    }

    /// The path of node `ino` below the mount root (`/a/b`).
    pub fn path_of(&self, ino: u64) -> String {
        self.lock().tree.path_of(ino)
    }

    // ---- attach socket -----------------------------------------------------------------

    /// Checks an attach request and returns the backing descriptor: `fd_ino` is the inode
    /// of the msharefs descriptor the client passed, `acc` its access mode.
    /// `pid` is the requesting process (0: unknown); it is registered as attached
    /// (`attachers.rs`), so the shrinker keeps the tables until it exits or a scan of
    /// `/proc` shows it no longer maps the region.
    pub fn attach_backing(
        &self,
        fd_ino: u64,
        acc: i32,
        prot: Protection,
        pid: u32,
    ) -> FsResult<OwnedFd> {
        if prot == Protection::ReadWrite && acc != consts::O_RDWR {
            return Err(EACCES);
        }
        if acc == consts::O_WRONLY {
            return Err(EACCES);
        }
        let r = self.region_of(fd_ino).map_err(|_| EBADF)?;
        if r.store != Store::Hugetlb {
            return Err(ENODEV);
        }
        if r.size == 0 {
            return Err(EINVAL);
        }
        // The host set for this protection must exist before the client faults, so its
        // faults link the cached tables.
        self.hostmm
            .ensure(fd_ino, r.size, prot, Some(pid), &self.opener(fd_ino))
            .map_err(|e| errno_of(&e))?;
        let fd = self
            .stores
            .open_file(Store::Hugetlb, fd_ino, prot == Protection::ReadWrite)
            .map_err(|e| errno_of(&e))?;
        self.attachers
            .register(pid, fd_ino, prot, 0..crate::tablecache::slots_of(r.size));
        Ok(fd)
    }

    /// A copy of the tree for reports.
    pub fn tree(&self) -> Tree {
        self.lock().tree.clone()
    }

    /// The entries of directory `ino` as `(ino, is_dir, name)`, `.` and `..` first.
    pub fn dir_entries(&self, ino: u64) -> FsResult<Vec<(u64, bool, String)>> {
        let inner = self.lock();
        let dir = inner.tree.get(ino).ok_or(ENOENT)?;
        if !dir.is_dir() {
            return Err(ENOTDIR);
        }
        let mut entries = vec![(dir.ino, true, ".".into()), (dir.parent, true, "..".into())];
        entries.extend(
            inner
                .tree
                .children(ino)
                .map(|c| (c.ino, c.is_dir(), c.name.clone())),
        );
        Ok(entries)
    }

    /// How many nodes the tree has (`statfs`'s file count).
    pub fn node_count(&self) -> u64 {
        self.lock().tree.nodes.len() as u64
    }

    /// Backing file identity `(dev, ino)` of a region, for attach accounting.
    pub fn backing_identity(&self, store: Store, ino: u64) -> Option<(u64, u64)> {
        self.stores.identity(store, ino)
    }
}
