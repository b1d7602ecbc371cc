//! The FUSE front end: translates fuser requests into `fs::Core` calls and replies.
//!
//! Data paths: thp and shmem region files are opened with FUSE passthrough to their
//! backing (the kernel maps and reads the tmpfs file directly; the daemon never sees the
//! data). hugetlb region files cannot be passed through (hugetlbfs refuses stacking, the
//! kernel answers `ELOOP`), so they are opened `FOPEN_DIRECT_IO`: `read`/`write` come to
//! the daemon, and `mmap(MAP_SHARED)` fails with `ENODEV` instead of silently using the
//! FUSE page cache. Clients map hugetlb regions through libmshare or the shim.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use kernel_glue::consts;
use mshare_uapi::{self as uapi, Backing};

use crate::fs::{Core, FsResult, OpenMode};
use crate::state::{Node, NodeKind};

/// Entry cache time, and attribute cache time of everything but sized regions. Only the
/// daemon changes metadata and the kernel updates its cache from our replies, so a short
/// TTL costs little.
const TTL: Duration = Duration::from_secs(1);

/// Attribute cache time of a sized region. A region's size never changes once set, and
/// its mode, owner and times change only through this connection (the kernel updates or
/// invalidates its cache from those replies), so the kernel may keep them as long as it
/// likes. That is what lets `fstat` of a descriptor opened before a daemon crash answer
/// while the daemon is down and after it is back: that descriptor stays on the old,
/// aborted connection, whose kernel inode answers `getattr` from this cache instead of
/// asking a daemon that is gone (`ENOTCONN`). (A `write(2)` through such a descriptor
/// invalidates the cached size and times; `fstat` after it needs the old daemon.)
const SIZED_REGION_ATTR_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Open flags of every region file. `FOPEN_NOFLUSH`: the kernel sends no `FLUSH` on
/// `close(2)` (ours answered nothing useful: region data is memory), so closing a
/// descriptor opened before a daemon crash returns 0 instead of the dead connection's
/// `ENOTCONN` (`fs/fuse/file.c`, `fuse_flush`).
const REGION_FOPEN: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// The attribute TTL of `n` (see [`SIZED_REGION_ATTR_TTL`]).
fn attr_ttl(n: &Node) -> Duration {
    match &n.kind {
        NodeKind::Region(r) if r.size > 0 => SIZED_REGION_ATTR_TTL,
        _ => TTL,
    }
}

/// The fuser `Filesystem`.
#[derive(Debug)]
pub struct MshareFuse {
    core: Arc<Core>,
    /// Held from the daemon's open decision to the reply: the kernel allows one backing
    /// file per inode among its open passthrough files (a second one fails the open with
    /// EIO), so two first opens of an inode must not both register a backing.
    opening: Mutex<()>,
}

impl MshareFuse {
    /// Wraps the shared core.
    pub fn new(core: Arc<Core>) -> MshareFuse {
        MshareFuse {
            core,
            opening: Mutex::new(()),
        }
    }
}

fn time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn attr(n: &Node) -> FileAttr {
    let (kind, size, nlink, blksize) = match &n.kind {
        NodeKind::Dir => (FileType::Directory, 0, 2, 4096),
        NodeKind::Info => (
            FileType::RegularFile,
            crate::fs::info_text().len() as u64,
            1,
            4096,
        ),
        NodeKind::Region(r) => (
            FileType::RegularFile,
            r.length(),
            1,
            r.store.page_size().min(u32::MAX as u64) as u32,
        ),
    };
    FileAttr {
        ino: INodeNo(n.ino),
        size,
        blocks: size.div_ceil(512),
        atime: time(n.mtime),
        mtime: time(n.mtime),
        ctime: time(n.ctime),
        crtime: time(n.ctime),
        kind,
        perm: n.mode as u16,
        nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: 0,
        blksize,
        flags: 0,
    }
}

/// A name to create. Names are stored as UTF-8 in the state file: others are `EINVAL`.
fn new_name(name: &OsStr) -> FsResult<&str> {
    name.to_str().ok_or(libc_errno::EINVAL)
}

/// A name to find. One that is not UTF-8 cannot exist, so it is `ENOENT`.
fn existing_name(name: &OsStr) -> FsResult<&str> {
    name.to_str().ok_or(libc_errno::ENOENT)
}

mod libc_errno {
    pub use kernel_glue::errnos::{EINVAL, ENODATA, ENOENT, ENOTTY, EOPNOTSUPP, EPERM, ERANGE};
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn reply_entry(r: FsResult<Node>, reply: ReplyEntry) {
    match r {
        // The name of a sized region is cached as long as its attributes: names change
        // through this connection (rename, unlink), and the names the daemon removes on its
        // own it tells the kernel about (`Core::remove_region`). Every attacher after the
        // first then opens the region without a lookup.
        Ok(n) => reply.entry_with_ttls(&attr_ttl(&n), &attr_ttl(&n), &attr(&n), Generation(0)),
        Err(e) => reply.error(err(e)),
    }
}

fn reply_attr(r: FsResult<Node>, reply: ReplyAttr) {
    match r {
        Ok(n) => reply.attr(&attr_ttl(&n), &attr(&n)),
        Err(e) => reply.error(err(e)),
    }
}

fn reply_empty(r: FsResult<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

/// An xattr value or list: its length for a size query (`size` 0), `ERANGE` when the
/// caller's buffer is too small.
fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if (size as usize) < value.len() {
        reply.error(err(libc_errno::ERANGE))
    } else {
        reply.data(value)
    }
}

fn mode_of(mode: u32, umask: u32) -> u32 {
    mode & !umask & 0o7777
}

impl MshareFuse {
    /// The passthrough backing id for handle `fh` of `ino`: registered now from `fd` with
    /// the reply's `open_backing` on the inode's first passthrough open, else the inode's
    /// id. `None`, with the handle released, when the kernel refuses the backing.
    fn passthrough_id(
        &self,
        ino: u64,
        fh: u64,
        fd: Option<OwnedFd>,
        open_backing: impl FnOnce(&OwnedFd) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let id = match fd {
            Some(fd) => match open_backing(&fd) {
                Ok(id) => {
                    let id = Arc::new(id);
                    self.core.set_backing_id(ino, id.clone());
                    Some(id)
                }
                Err(e) => {
                    log::error!("passthrough of region {ino} refused: {e}");
                    None
                }
            },
            None => self.core.backing_id(ino),
        };
        if id.is_none() {
            self.core.release(fh);
        }
        id
    }
}

impl Filesystem for MshareFuse {
    fn init(&mut self, _req: &Request, cfg: &mut KernelConfig) -> std::io::Result<()> {
        let ok = cfg.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && cfg.set_max_stack_depth(1).is_ok();
        if !ok {
            log::warn!("kernel refused FUSE passthrough: thp and shmem regions cannot be mmapped");
        }
        let _ = self.core.passthrough.set(ok);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(
            existing_name(name).and_then(|n| self.core.lookup(parent.0, n)),
            reply,
        )
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(self.core.node(ino.0), reply)
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let core = &self.core;
        let mut r = Ok(());
        if let Some(s) = size {
            r = core.set_size(ino.0, s, req.pid());
        }
        if r.is_ok() && (mode.is_some() || uid.is_some() || gid.is_some()) {
            r = core.set_owner_mode(ino.0, mode, uid, gid);
        }
        if r.is_ok() {
            if let Some(t) = mtime {
                let t = match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let secs = t
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                r = core.set_mtime(ino.0, secs);
            }
        }
        reply_attr(r.and_then(|()| core.node(ino.0)), reply)
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Only regular files (regions) exist here.
        if mode & 0o170000 != 0o100000 {
            return reply.error(Errno::EPERM);
        }
        let r = new_name(name).and_then(|n| {
            self.core
                .create_region(parent.0, n, mode_of(mode, umask), req.uid(), req.gid())
        });
        reply_entry(r, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = new_name(name).and_then(|n| {
            self.core
                .mkdir(parent.0, n, mode_of(mode, umask), req.uid(), req.gid())
        });
        reply_entry(r, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            existing_name(name).and_then(|n| self.core.unlink(parent.0, n)),
            reply,
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            existing_name(name).and_then(|n| self.core.rmdir(parent.0, n)),
            reply,
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = existing_name(name).and_then(|a| {
            new_name(newname)
                .and_then(|b| self.core.rename(parent.0, a, newparent.0, b, flags.bits()))
        });
        reply_empty(r, reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _one = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        match self.core.open(ino.0, flags.0 & consts::O_ACCMODE) {
            Ok((fh, OpenMode::Direct)) => {
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO | REGION_FOPEN)
            }
            Ok((fh, OpenMode::Passthrough(fd))) => {
                match self.passthrough_id(ino.0, fh, fd, |fd| reply.open_backing(fd)) {
                    Some(id) => reply.opened_passthrough(FileHandle(fh), REGION_FOPEN, &id),
                    None => reply.error(Errno::EIO),
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let node = match new_name(name).and_then(|n| {
            self.core
                .create_region(parent.0, n, mode_of(mode, umask), req.uid(), req.gid())
        }) {
            Ok(n) => n,
            Err(e) => return reply.error(err(e)),
        };
        let _one = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        let (fh, mode) = match self.core.open(node.ino, flags & consts::O_ACCMODE) {
            Ok(x) => x,
            Err(e) => return reply.error(err(e)),
        };
        let a = attr(&node);
        match mode {
            OpenMode::Direct => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO | REGION_FOPEN,
            ),
            OpenMode::Passthrough(fd) => {
                match self.passthrough_id(node.ino, fh, fd, |fd| reply.open_backing(fd)) {
                    Some(id) => reply.created_passthrough(
                        &TTL,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        REGION_FOPEN,
                        &id,
                    ),
                    None => reply.error(Errno::EIO),
                }
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.core.read(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.core.write(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        // Region data is memory: there is nothing to write back.
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        reply.ok()
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.node(ino.0) {
            Ok(n) if n.is_dir() => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.core.dir_entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(err(e)),
        };
        for (i, (ino, is_dir, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            let kind = if is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Capacity is the huge-page pool, in 2 MiB blocks.
        let mi = kernel_glue::procfs::meminfo().unwrap_or_default();
        let files = self.core.node_count();
        reply.statfs(
            mi.huge_total,
            mi.huge_free,
            mi.huge_free,
            files,
            u32::MAX as u64,
            kernel_glue::HUGE_PAGE_SIZE as u32,
            crate::state::NAME_MAX as u32,
            kernel_glue::HUGE_PAGE_SIZE as u32,
        )
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if name != OsStr::new(uapi::BACKING_XATTR) {
            return reply.error(err(libc_errno::EOPNOTSUPP));
        }
        let v = std::str::from_utf8(value)
            .unwrap_or("")
            .trim_end_matches(['\0', '\n']);
        let Some(b) = Backing::from_name(v) else {
            return reply.error(Errno::EINVAL);
        };
        reply_empty(self.core.set_backing(ino.0, b, flags), reply)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.core.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(err(e)),
        };
        let value = match (name == OsStr::new(uapi::BACKING_XATTR), node.region()) {
            (true, Some(r)) => r.store.name().as_bytes().to_vec(),
            _ => return reply.error(err(libc_errno::ENODATA)),
        };
        reply_xattr(&value, size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.core.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(err(e)),
        };
        let mut list = Vec::new();
        if node.region().is_some() {
            list.extend_from_slice(uapi::BACKING_XATTR.as_bytes());
            list.push(0);
        }
        reply_xattr(&list, size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.node(ino.0) {
            Ok(n) if n.region().is_some() && name == OsStr::new(uapi::BACKING_XATTR) => {
                reply.error(err(libc_errno::EPERM))
            }
            Ok(_) => reply.error(err(libc_errno::ENODATA)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply_empty(self.core.node(ino.0).map(|_| ()), reply)
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        let r: FsResult<Vec<u8>> = (|| match cmd {
            uapi::MSHAREFS_GET_INFO => {
                if (out_size as usize) < std::mem::size_of::<uapi::MshareRegionInfo>() {
                    return Err(libc_errno::EINVAL);
                }
                let info = self.core.region_info(ino.0)?;
                Ok(crate::wire::info_bytes(&info))
            }
            uapi::MSHAREFS_CREATE_MAPPING => {
                let req = crate::wire::parse_create(in_data)?;
                self.writable(fh.0)?;
                self.core.create_object(ino.0, &req).map(|()| Vec::new())
            }
            uapi::MSHAREFS_UNMAP => {
                let req = crate::wire::parse_unmap(in_data)?;
                self.writable(fh.0)?;
                self.core.unmap_range(ino.0, &req).map(|()| Vec::new())
            }
            _ => Err(libc_errno::ENOTTY),
        })();
        match r {
            Ok(out) => reply.ioctl(0, &out),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // As in the kernel's msharefs: only fallocate(fd, 0, 0, size) sets the size.
        let r = if mode != 0 {
            Err(libc_errno::EOPNOTSUPP)
        } else if offset != 0 {
            Err(libc_errno::EINVAL)
        } else {
            self.core.set_size(ino.0, length, req.pid())
        };
        reply_empty(r, reply)
    }
}

impl MshareFuse {
    /// Object ioctls change region contents: the handle must be open for writing, so a
    /// read-only opener cannot discard other users' data.
    fn writable(&self, fh: u64) -> FsResult<()> {
        let h = self.core.handle(fh)?;
        if h.write {
            Ok(())
        } else {
            Err(kernel_glue::errnos::EBADF)
        }
    }
}
