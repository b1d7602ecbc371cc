//! POSIX and System V shared memory on msharefs: the daemon's side of what the
//! `LD_PRELOAD` shim does with `shm_open`/`ftruncate` and `shmget`/`shmat`.
//!
//! The kernel stays the authority for names, keys, ids, permissions and attach counts;
//! msharefs only holds the data, in a hugetlb region mapped at 1 GiB-aligned addresses.
//!
//! **POSIX.** A segment is named by its `/dev/shm` file, so `O_CREAT`, `O_EXCL`, `O_TRUNC`,
//! mode, owner and `shm_unlink` are the kernel's. When a segment's first sizing reaches
//! `MSHARE_SHM_MIN`, the shim sends the program's `/dev/shm` descriptor (open read-write:
//! proof that the kernel let it write the segment) and the size ([`uapi::SHM_POSIX_SIZE`]).
//! The daemon makes a hugetlb region `/.posix-shm/NAME` of that length, with the file's
//! owner and mode, pairs the two (holding the file open, so its inode cannot be reused),
//! sizes the file (sparse: it costs nothing, and `ls` shows the size) and answers with the
//! region file, opened through the mount, which the shim puts in place of the program's
//! descriptor: `read`, `write`, `fstat`, `dup`, `fork` and `SCM_RIGHTS` then all reach the
//! region. Any later opener sends its `/dev/shm` descriptor ([`uapi::SHM_POSIX_OPEN`]) and
//! gets the region file with the same access mode. When the file's last name is gone
//! (`nlink` 0, after a `shm_unlink` by anyone), the region's name goes too; it ends with its
//! last descriptor, its memory with its last mapping.
//!
//! **System V.** The kernel segment is real (id, key, `IPC_STAT`, `shm_nattch`, `ipcs`,
//! `ipcrm`) but never touched. Its creator tells the daemon ([`uapi::SHM_SYSV_CREATED`]),
//! which checks `/proc/sysvipc/shm` (the creator pid and size must match) and makes the
//! region `/.sysv-shm/ID`. An attacher attaches the kernel segment itself and keeps one
//! page of it mapped, so `shm_nattch` counts it as the kernel counts any attacher (across
//! `fork`, `exec`, exit and `kill -9`); it gets the region's backing by proving that
//! attachment ([`uapi::SHM_SYSV_ATTACH`]): the daemon finds a mapping of the segment in its
//! `/proc/PID/maps`, read-write if it asks for write. The region ends when the kernel
//! segment is gone (after `IPC_RMID` and the last detach).
//!
//! Ending regions of gone segments is done by [`reconcile`]: on request (the shim asks
//! after `shm_unlink` and `shmdt`) and once a second while any such region exists.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kernel_glue::errnos::*;
use kernel_glue::ipc::{self, FileIdentity};
use kernel_glue::mapping::Protection;
use kernel_glue::{consts, fd as kfd, socket::PeerCred};
use mshare_uapi as uapi;

use crate::fs::{Core, FsResult, errno_of};
use crate::state::{Node, ShmOrigin};

/// Directory, in the mount root, of the regions of POSIX segments.
pub const POSIX_DIR: &str = ".posix-shm";
/// Directory, in the mount root, of the regions of System V segments.
pub const SYSV_DIR: &str = ".sysv-shm";
/// Where glibc keeps POSIX shared memory.
const DEV_SHM: &str = "/dev/shm";
/// How often gone segments are looked for while any region holds one.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// A POSIX region's `/dev/shm` file.
#[derive(Debug)]
struct PosixFile {
    /// Held open (read-write, from the process that sized the segment).
    fd: OwnedFd,
    id: FileIdentity,
}

/// The `/dev/shm` files of POSIX regions, by region inode.
#[derive(Debug, Default)]
pub struct PosixFiles {
    files: Mutex<HashMap<u64, PosixFile>>,
    /// Held across a sizing request: two processes sizing one segment make one region.
    sizing: Mutex<()>,
}

impl PosixFiles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PosixFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unpairs region `ino` (its name is gone, or it ended).
    pub fn forget(&self, ino: u64) {
        self.lock().remove(&ino);
    }

    /// Mirrors a chmod or chown of region `ino` onto its `/dev/shm` file, which decides
    /// who may open the segment by name.
    ///
    /// # Errors
    /// `fchmod`/`fchown` errors.
    pub fn set_owner_mode(&self, ino: u64, mode: u32, uid: u32, gid: u32) -> std::io::Result<()> {
        let files = self.lock();
        let Some(f) = files.get(&ino) else {
            return Ok(());
        };
        kfd::fchmod(&f.fd, mode & 0o7777)?;
        kfd::fchown(&f.fd, uid, gid)
    }

    fn is_paired(&self, ino: u64) -> bool {
        self.lock().contains_key(&ino)
    }

    fn region_of(&self, id: &FileIdentity) -> Option<u64> {
        self.lock()
            .iter()
            .find(|(_, f)| f.id == *id)
            .map(|(&ino, _)| ino)
    }

    /// Regions whose file has no name any more, and the owner and mode of the others.
    fn survey(&self) -> (Vec<u64>, Vec<(u64, kfd::Stat)>) {
        let mut gone = Vec::new();
        let mut live = Vec::new();
        for (&ino, f) in self.lock().iter() {
            match kfd::fstat(&f.fd) {
                Ok(st) if st.nlink > 0 => live.push((ino, st)),
                _ => gone.push(ino),
            }
        }
        (gone, live)
    }
}

/// Serves one shared-memory request from the attach socket: `req` is the whole message
/// (request byte and payload), `fd` the descriptor that came with it, `peer` the sender.
/// Returns the descriptor to send back, if the request yields one, and the region the
/// request was about, if any (its info goes into the reply).
pub fn handle(
    core: &Core,
    req: &[u8],
    fd: Option<OwnedFd>,
    peer: PeerCred,
) -> FsResult<(Option<OwnedFd>, Option<u64>)> {
    let payload = &req[1..];
    let yields = |(fd, ino): (OwnedFd, u64)| (Some(fd), Some(ino));
    match (req[0], fd) {
        (uapi::SHM_POSIX_SIZE, Some(fd)) => {
            let len = u64::from_ne_bytes(payload.try_into().map_err(|_| EINVAL)?);
            posix_size(core, fd, len, peer.pid).map(yields)
        }
        (uapi::SHM_POSIX_OPEN, Some(fd)) if payload.is_empty() => posix_open(core, fd).map(yields),
        (uapi::SHM_RECONCILE, None) if payload.is_empty() => {
            reconcile(core);
            Ok((None, None))
        }
        (uapi::SHM_SYSV_CREATED, None) if payload.len() == 12 => {
            let id = i32::from_ne_bytes(payload[..4].try_into().map_err(|_| EINVAL)?);
            let size = u64::from_ne_bytes(payload[4..].try_into().map_err(|_| EINVAL)?);
            sysv_created(core, peer, id, size).map(|ino| (None, Some(ino)))
        }
        (uapi::SHM_SYSV_ATTACH, None) if payload.len() == 5 => {
            let id = i32::from_ne_bytes(payload[..4].try_into().map_err(|_| EINVAL)?);
            let write = match payload[4] {
                0 => false,
                1 => true,
                _ => return Err(EINVAL),
            };
            sysv_attach(core, peer, id, write).map(yields)
        }
        (uapi::SHM_POSIX_SIZE | uapi::SHM_POSIX_OPEN, None) => Err(EBADF),
        _ => Err(EINVAL),
    }
}

// ---- POSIX ----------------------------------------------------------------------------

/// A descriptor's `/dev/shm` file: its stat, identity and name.
struct ShmFile {
    st: kfd::Stat,
    id: FileIdentity,
    name: String,
    acc: i32,
}

/// Checks that `fd` is an open (not `O_PATH`) regular file of `/dev/shm` and describes it.
fn shm_file(fd: &OwnedFd) -> FsResult<ShmFile> {
    let flags = kfd::fcntl_getfl(fd).map_err(|e| errno_of(&e))?;
    if flags & consts::O_PATH != 0 {
        // Opened without any permission check on the file: it proves nothing.
        return Err(EBADF);
    }
    let st = kfd::fstat(fd).map_err(|e| errno_of(&e))?;
    let shm = kfd::stat(Path::new(DEV_SHM)).map_err(|e| errno_of(&e))?;
    if st.dev != shm.dev || st.mode & 0o170000 != 0o100000 {
        return Err(EBADF);
    }
    let id = ipc::file_identity(fd).map_err(|e| errno_of(&e))?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| errno_of(&e))?;
    let name = link
        .strip_prefix(DEV_SHM)
        .ok()
        .and_then(Path::to_str)
        .filter(|n| !n.is_empty() && !n.contains('/') && st.nlink > 0)
        // Unlinked, in a subdirectory, or not UTF-8 (region names are): not promoted.
        .ok_or(ENOENT)?
        .to_string();
    Ok(ShmFile {
        st,
        id,
        name,
        acc: flags & consts::O_ACCMODE,
    })
}

/// [`uapi::SHM_POSIX_SIZE`]: makes the segment open as `fd` a region of `length` bytes,
/// or finds the one another process made for it.
/// The memory is charged to the cgroups of `pid`, the process that sizes the segment.
/// Returns the region file, open read-write, and the region.
fn posix_size(core: &Core, fd: OwnedFd, length: u64, pid: u32) -> FsResult<(OwnedFd, u64)> {
    let file = shm_file(&fd)?;
    if file.acc != consts::O_RDWR {
        return Err(EBADF);
    }
    if length == 0 || i64::try_from(length).is_err() {
        return Err(EINVAL);
    }
    let _one = core.posix.sizing.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(region) = core.posix.region_of(&file.id) {
        match file.st.size {
            s if s == length => return open_region(core, region, consts::O_RDWR),
            // Truncated (O_TRUNC) since: that segment's data is gone; a new region below.
            0 => core.remove_region(region)?,
            // A size on msharefs is fixed.
            _ => return Err(EINVAL),
        }
    } else if file.st.size != 0 {
        // Sized before, in the kernel: its data is there, keep it there.
        return Err(EINVAL);
    }
    let dir = core.shm_dir(POSIX_DIR)?;
    // A region still named after a segment that is gone (not yet reconciled) yields.
    if let Ok(old) = core.lookup(dir, &file.name) {
        if !core.posix.is_paired(old.ino) {
            core.remove_region(old.ino)?;
        }
    }
    let origin = ShmOrigin::Posix {
        path: format!("{DEV_SHM}/{}", file.name),
        dev: file.id.dev,
        ino: file.id.ino,
        btime_ns: file.id.btime_ns,
    };
    let owner = (file.st.mode & 0o7777, file.st.uid, file.st.gid);
    let ino = core.create_shm_region(dir, &file.name, owner, origin)?;
    if let Err(e) = core.set_length(ino, length, pid) {
        let _ = core.remove_region(ino);
        return Err(e);
    }
    // Sparse: it costs no memory. `ls` shows the size, and the shim's opens look for a
    // sized file without blocks before asking us.
    if let Err(e) = kfd::ftruncate(&fd, length) {
        let _ = core.remove_region(ino);
        return Err(errno_of(&e));
    }
    // The mark tells the shim in any process that this segment is ours.
    let marked = format!("{}{}", mount_string(core), core.path_of(ino));
    if let Err(e) = ipc::fsetxattr(&fd, uapi::SHM_PAIRED_XATTR, marked.as_bytes()) {
        let _ = core.remove_region(ino);
        return Err(errno_of(&e));
    }
    core.posix.lock().insert(ino, PosixFile { fd, id: file.id });
    log::info!(
        "POSIX segment {}: {length} bytes on region {ino}",
        file.name
    );
    open_region(core, ino, consts::O_RDWR)
}

/// [`uapi::SHM_POSIX_OPEN`]: the region file of the segment open as `fd`, and the region.
fn posix_open(core: &Core, fd: OwnedFd) -> FsResult<(OwnedFd, u64)> {
    let flags = kfd::fcntl_getfl(&fd).map_err(|e| errno_of(&e))?;
    if flags & consts::O_PATH != 0 {
        return Err(EBADF);
    }
    let id = ipc::file_identity(&fd).map_err(|e| errno_of(&e))?;
    let region = core.posix.region_of(&id).ok_or(ENOENT)?;
    if kfd::fstat(&fd).map_err(|e| errno_of(&e))?.size == 0 {
        // Truncated (shm_open with O_TRUNC): the segment's data is gone, and it is an
        // empty ordinary segment until it is sized again.
        let _one = core.posix.sizing.lock().unwrap_or_else(|p| p.into_inner());
        if core.posix.region_of(&id) == Some(region) {
            core.remove_region(region)?;
        }
        return Err(ENOENT);
    }
    open_region(core, region, flags & consts::O_ACCMODE)
}

fn mount_string(core: &Core) -> String {
    core.mountpoint
        .get()
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Opens region `ino` through the mount, as the client's descriptor: the kernel then
/// sends its reads, writes and `fstat`s to us like any other open of the file.
fn open_region(core: &Core, ino: u64, acc: i32) -> FsResult<(OwnedFd, u64)> {
    let mnt = core.mountpoint.get().ok_or(EIO)?;
    let path = mnt.join(core.path_of(ino).trim_start_matches('/'));
    let fd = kfd::open(&path, acc, 0).map_err(|e| errno_of(&e))?;
    Ok((fd, ino))
}

// ---- System V -------------------------------------------------------------------------

/// Refuses processes of another IPC namespace: their shmids name other segments.
fn same_ipc_namespace(pid: u32) -> FsResult<()> {
    static OURS: OnceLock<u64> = OnceLock::new();
    let ours = match OURS.get() {
        Some(&n) => n,
        None => *OURS.get_or_init(|| ipc::ipc_namespace(std::process::id()).unwrap_or(0)),
    };
    match ipc::ipc_namespace(pid) {
        Ok(n) if n == ours && n != 0 => Ok(()),
        Ok(_) => Err(EPERM),
        Err(e) => Err(errno_of(&e)),
    }
}

/// The kernel segment `id`, if it exists.
fn segment(id: i32) -> FsResult<Option<ipc::Segment>> {
    Ok(ipc::segments()
        .map_err(|e| errno_of(&e))?
        .into_iter()
        .find(|s| s.id == id))
}

/// The region of segment `id`, if there is one and it belongs to that segment (and not
/// to an earlier one with the same id).
fn sysv_region(core: &Core, id: i32, seg: &ipc::Segment) -> Option<Node> {
    let dir = core.lookup(crate::state::ROOT_INO, SYSV_DIR).ok()?;
    let node = core.lookup(dir.ino, &id.to_string()).ok()?;
    match node.region()?.shm {
        Some(ShmOrigin::Sysv { id: i, cpid }) if i == id && cpid == seg.cpid => Some(node),
        _ => None,
    }
}

/// [`uapi::SHM_SYSV_CREATED`]: makes the region of the segment `peer` just created;
/// returns it.
fn sysv_created(core: &Core, peer: PeerCred, id: i32, size: u64) -> FsResult<u64> {
    same_ipc_namespace(peer.pid)?;
    let seg = segment(id)?.ok_or(ENOENT)?;
    if seg.cpid != peer.pid || seg.size != size || size == 0 {
        return Err(EPERM);
    }
    if let Some(node) = sysv_region(core, id, &seg) {
        return Ok(node.ino);
    }
    let dir = core.shm_dir(SYSV_DIR)?;
    let name = id.to_string();
    if let Ok(stale) = core.lookup(dir, &name) {
        // An earlier segment with this id, gone but not reconciled yet.
        core.remove_region(stale.ino)?;
    }
    let origin = ShmOrigin::Sysv { id, cpid: seg.cpid };
    let owner = (seg.mode & 0o777, seg.uid, seg.gid);
    let ino = core.create_shm_region(dir, &name, owner, origin)?;
    if let Err(e) = core.set_length(ino, size, peer.pid) {
        let _ = core.remove_region(ino);
        return Err(e);
    }
    log::info!("System V segment {id}: {size} bytes on region {ino}");
    Ok(ino)
}

/// [`uapi::SHM_SYSV_ATTACH`]: the backing of segment `id`'s region for `peer`, which must
/// have the kernel segment attached (read-write for `write`), and the region.
fn sysv_attach(core: &Core, peer: PeerCred, id: i32, write: bool) -> FsResult<(OwnedFd, u64)> {
    same_ipc_namespace(peer.pid)?;
    let seg = segment(id)?.ok_or(ENOENT)?;
    let node = sysv_region(core, id, &seg).ok_or(ENOENT)?;
    static SHMEM_DEV: OnceLock<u64> = OnceLock::new();
    let dev = match SHMEM_DEV.get() {
        Some(&d) => d,
        None => {
            let d = ipc::shmem_device().map_err(|e| errno_of(&e))?;
            *SHMEM_DEV.get_or_init(|| d)
        }
    };
    let maps = kernel_glue::procfs::maps(peer.pid).map_err(|e| errno_of(&e))?;
    let attached = maps.iter().any(|m| {
        let p = m.perms.as_bytes();
        m.dev == dev
            && m.ino == id as u64
            && m.path.starts_with("/SYSV")
            && p.len() == 4
            && p[0] == b'r'
            && p[3] == b's'
            && (!write || p[1] == b'w')
    });
    if !attached {
        return Err(EACCES);
    }
    let (acc, prot) = if write {
        (consts::O_RDWR, Protection::ReadWrite)
    } else {
        (consts::O_RDONLY, Protection::ReadOnly)
    };
    core.attach_backing(node.ino, acc, prot, peer.pid)
        .map(|fd| (fd, node.ino))
}

// ---- ending regions of gone segments --------------------------------------------------

/// Removes the names of regions whose segment is gone: POSIX files without a name, System
/// V segments no longer in `/proc/sysvipc/shm` (or with another creator: the id was
/// reused). Also brings the owner and mode of POSIX regions in line with their files.
pub fn reconcile(core: &Core) {
    let (gone, live) = core.posix.survey();
    for ino in gone {
        log::info!("region {ino}: its POSIX segment was unlinked");
        let _ = core.remove_region(ino);
        core.posix.forget(ino);
    }
    for (ino, st) in live {
        if let Ok(n) = core.node(ino) {
            if (n.mode, n.uid, n.gid) != (st.mode & 0o7777, st.uid, st.gid) {
                let _ =
                    core.set_owner_mode(ino, Some(st.mode & 0o7777), Some(st.uid), Some(st.gid));
            }
        }
    }
    let regions: Vec<(u64, i32, u32)> = core
        .shm_regions()
        .into_iter()
        .filter_map(|(ino, origin)| match origin {
            ShmOrigin::Sysv { id, cpid } => Some((ino, id, cpid)),
            ShmOrigin::Posix { .. } => None,
        })
        .collect();
    if regions.is_empty() {
        return;
    }
    let Ok(segments) = ipc::segments() else {
        return;
    };
    for (ino, id, cpid) in regions {
        if !segments.iter().any(|s| s.id == id && s.cpid == cpid) {
            log::info!("region {ino}: its System V segment {id} is gone");
            let _ = core.remove_region(ino);
        }
    }
}

/// Pairs POSIX regions with their files again after a (re)start; a region whose file is
/// gone, or is another file now, loses its name.
pub fn recover(core: &Core) {
    for (region, origin) in core.shm_regions() {
        let ShmOrigin::Posix {
            path,
            dev,
            ino,
            btime_ns,
        } = origin
        else {
            continue;
        };
        let want = FileIdentity { dev, ino, btime_ns };
        let file = kfd::open(Path::new(&path), consts::O_RDWR, 0)
            .ok()
            .filter(|fd| {
                ipc::file_identity(fd).is_ok_and(|id| id == want)
                    && kfd::fstat(fd).is_ok_and(|st| st.nlink > 0)
            });
        match file {
            Some(fd) => {
                core.posix.lock().insert(region, PosixFile { fd, id: want });
            }
            None => {
                log::info!("region {region}: its POSIX segment {path} is gone");
                let _ = core.remove_region(region);
            }
        }
    }
    reconcile(core);
}

/// Runs [`reconcile`] once a second on a background thread.
pub fn spawn_reconciler(core: Arc<Core>) {
    let _ = std::thread::Builder::new()
        .name("shm-reconcile".into())
        .spawn(move || {
            loop {
                std::thread::sleep(RECONCILE_EVERY);
                reconcile(&core);
            }
        });
}
