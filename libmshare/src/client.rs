//! The client core: what libmshare's Rust API ([`crate::Region`]), its C ABI and the
//! `LD_PRELOAD` shim do with a region, written once: find out what a descriptor is
//! ([`info`], [`region_info`], [`mount_info`]), create a region ([`create`]), attach it
//! ([`attach`], [`map_backing`]), and talk to the daemon's attach socket ([`request`]).
//!
//! The path of one attach of a hugetlb region: the caller opened the region file (the
//! kernel checked its permissions) and knows its [`MshareRegionInfo`]; [`attach`] sends
//! the descriptor to the attach socket ([`request_backing`], one round trip: the reply
//! carries the backing descriptor and the region's info) and [`map_backing`] maps the
//! backing so that every granule of it is covered whole (`Mapping::map_granules`), where
//! the kernel links the page tables the daemon's host mapping holds.
//!
//! Everything here may run inside `mmap` in arbitrary programs, possibly in several
//! threads at once or in a freshly forked child: it keeps no state, takes no lock and
//! does not allocate (paths are built on the stack, errors carry raw errnos).

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::{consts, fd as kfd, shim_sys, socket};
use zerocopy::FromBytes;

use crate::cstr::StackStr;
use crate::uapi::{self, AttachReply, Backing, MshareRegionInfo};

/// `MSHAREFS_GET_INFO` on `fd`: a region (`kind` other than `KIND_MOUNT`) of an msharefs
/// mount.
///
/// # Errors
/// `ENODEV` for a file of another file system (another FUSE one answers `ENOTTY`), for
/// `mshare_info` and for a directory; the kernel's errno (`ENOTCONN` when the daemon of
/// the descriptor's mount is gone).
pub fn info(fd: BorrowedFd<'_>) -> io::Result<MshareRegionInfo> {
    let mut info = MshareRegionInfo::default();
    kfd::ioctl_ptr(fd, uapi::MSHAREFS_GET_INFO, &mut info).map_err(|e| {
        if matches!(e.raw_os_error(), Some(ENOTTY | ENOSYS)) {
            kernel_glue::errno(ENODEV)
        } else {
            e
        }
    })?;
    if info.kind == uapi::KIND_MOUNT {
        return Err(kernel_glue::errno(ENODEV));
    }
    Ok(info)
}

/// The region behind `fd`, if `fd` is a region file on an msharefs mount with its size
/// set; `None` for anything else (other file systems, other FUSE file systems, a dead
/// mount, a bad descriptor): the shim then lets the kernel handle the call. One
/// `fstatfs`, plus the ioctl for FUSE files.
pub fn region_info(fd: BorrowedFd<'_>) -> Option<MshareRegionInfo> {
    if kfd::fstatfs(fd).ok()?.fs_type != kernel_glue::FUSE_SUPER_MAGIC {
        return None;
    }
    let info = info(fd).ok()?;
    (info.size > 0 && info.granule.is_power_of_two()).then_some(info)
}

/// What `MSHAREFS_GET_INFO` on the directory `dir` of an msharefs mount reports: the
/// daemon's attach socket (the shim's way to find the daemon of `MSHARE_MOUNT`).
///
/// # Errors
/// `ENODEV` when `dir` is not on msharefs; open and ioctl errors.
pub fn mount_info(dir: &CStr) -> io::Result<MshareRegionInfo> {
    let fd = shim_sys::openat(None, dir, consts::O_RDONLY | shim_sys::O_DIRECTORY, 0)?;
    if kfd::fstatfs(&fd)?.fs_type != kernel_glue::FUSE_SUPER_MAGIC {
        return Err(kernel_glue::errno(ENODEV));
    }
    let mut info = MshareRegionInfo::default();
    kfd::ioctl_ptr(&fd, uapi::MSHAREFS_GET_INFO, &mut info).map_err(|e| {
        if e.raw_os_error() == Some(ENOTTY) {
            kernel_glue::errno(ENODEV)
        } else {
            e
        }
    })?;
    Ok(info)
}

/// The attach socket path inside `info`, borrowed.
///
/// # Errors
/// `EIO` when the daemon reported no path.
pub fn socket_path(info: &MshareRegionInfo) -> io::Result<&Path> {
    let end = info
        .socket_path
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.socket_path.len());
    if end == 0 {
        return Err(kernel_glue::errno(EIO));
    }
    Ok(Path::new(OsStr::from_bytes(&info.socket_path[..end])))
}

/// The attach socket of the daemon of the msharefs mount whose device number is `dev`,
/// as that daemon linked it in [`uapi::BY_DEV_DIR`]: found with one `stat`, without
/// asking the daemon. `None` when there is no such link to a socket owned by root (not an
/// msharefs mount, or a daemon that could not write there). A hint only (see
/// [`uapi::BY_DEV_DIR`]): when a request to it fails, ask `GET_INFO`.
pub fn socket_by_dev(dev: u64) -> Option<ByDev> {
    let (major, minor) = kfd::major_minor(dev);
    let mut p = StackStr::new();
    p.push(uapi::BY_DEV_DIR.as_bytes())
        .and_then(|()| p.push(b"/"))
        .and_then(|()| p.push_u64(u64::from(major)))
        .and_then(|()| p.push(b":"))
        .and_then(|()| p.push_u64(u64::from(minor)))
        .ok()?;
    // Root's daemons bind their sockets as root: a socket of anyone else at the end of a
    // link (one left by a dead daemon, into a directory others may write) never gets a
    // region descriptor.
    shim_sys::is_root_socket(p.as_cstr()).then_some(ByDev(p))
}

/// A path in [`uapi::BY_DEV_DIR`], from [`socket_by_dev`].
#[derive(Clone)]
pub struct ByDev(StackStr<64>);

impl ByDev {
    /// The path (a link to the daemon's attach socket).
    pub fn path(&self) -> &Path {
        Path::new(OsStr::from_bytes(self.0.bytes()))
    }
}

impl std::fmt::Debug for ByDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.path().fmt(f)
    }
}

/// Sends one request message `msg` (with descriptor `fd`, if any) to the daemon's socket
/// and reads its reply (protocol in [`crate::uapi`]): the descriptor it sends, if any,
/// and the region's info (zeros for a request that names no region).
///
/// The request is one datagram that carries, first, one end of a new socket pair: the
/// daemon answers on it, and the other end is ours alone. So one wake-up of the daemon
/// serves the request (no connection to accept), and no other process can read the reply.
///
/// # Errors
/// Sending (`ECONNREFUSED` when the daemon is gone) or reading; `EIO` for a malformed
/// reply or none; the daemon's errno.
pub fn request(
    socket: &Path,
    msg: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<(Option<OwnedFd>, MshareRegionInfo)> {
    let (ours, theirs) = UnixStream::pair()?;
    let sender = UnixDatagram::unbound()?;
    match fd {
        Some(fd) => socket::send_to_with_fds(&sender, socket, msg, &[theirs.as_fd(), fd])?,
        None => socket::send_to_with_fds(&sender, socket, msg, &[theirs.as_fd()])?,
    }
    // Only the daemon holds the other end now: should it drop the request, we read EOF.
    drop(theirs);
    let mut reply = [0u8; std::mem::size_of::<AttachReply>()];
    let (mut n, fd) = socket::recv_with_fd(&ours, &mut reply)?;
    if n < uapi::STATUS_LEN {
        return Err(kernel_glue::errno(EIO));
    }
    let status = i32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]);
    if status != 0 {
        return Err(kernel_glue::errno(if status > 0 { status } else { EIO }));
    }
    // A stream socket may deliver the rest of the reply in further reads.
    while n < reply.len() {
        match io::Read::read(&mut &ours, &mut reply[n..]) {
            Ok(0) => return Err(kernel_glue::errno(EIO)),
            Ok(m) => n += m,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let reply = AttachReply::read_from_bytes(&reply).map_err(|_| kernel_glue::errno(EIO))?;
    Ok((fd, reply.info))
}

/// Asks the daemon at `socket` for the backing of the region open as `region_fd`, with
/// read-only or read-write access: the backing descriptor and the region's info.
///
/// # Errors
/// As [`request`]; the daemon's errno (`EACCES` when `region_fd` does not allow `prot`).
pub fn request_backing(
    socket: &Path,
    region_fd: BorrowedFd<'_>,
    prot: Protection,
) -> io::Result<(OwnedFd, MshareRegionInfo)> {
    let req = match prot {
        Protection::ReadWrite => uapi::ATTACH_WRITE,
        Protection::ReadOnly => uapi::ATTACH_READ,
    };
    match request(socket, &[req], Some(region_fd))? {
        (Some(fd), info) => Ok((fd, info)),
        (None, _) => Err(kernel_glue::errno(EIO)),
    }
}

/// How an attachment covers a hugetlb region whose size is not a multiple of the granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cover {
    /// Exactly the region (rounded up to the page size): `munmap(addr, size)` removes it,
    /// as the C API documents; the last, partial granule's page table is not shared.
    Exact,
    /// Every granule whole (`Mapping::map_granules`), where the daemon covers them so
    /// ([`uapi::covers_last_granule`]): every page table is shared, and unmapping takes
    /// `Mapping::mapped_len` bytes.
    Granules,
}

/// Maps `size` bytes of the hugetlb `backing` of a region (a descriptor from the attach
/// socket) at a granule-aligned address: where the kernel shares page tables with the
/// daemon's host mapping and every other attacher.
///
/// # Errors
/// `ENOMEM` when no aligned range of address space is free; the kernel's errno.
pub fn map_backing(
    backing: BorrowedFd<'_>,
    size: u64,
    prot: Protection,
    cover: Cover,
) -> io::Result<Mapping> {
    if cover == Cover::Granules && uapi::covers_last_granule(size) {
        Mapping::map_granules(backing, 0, size, prot, uapi::MSHARE_GRANULE)
    } else {
        Mapping::map_aligned(backing, size, prot, uapi::MSHARE_GRANULE)
    }
}

/// Attaches the whole region open as `fd` (described by `info`, from [`info`]) with
/// protection `prot` at a granule-aligned address: for hugetlb regions the backing the
/// daemon hands out ([`map_backing`]), otherwise the msharefs file itself (FUSE
/// passthrough).
///
/// Access follows `mmap(2)`: a descriptor not open for reading, or `ReadWrite` on a
/// descriptor not open for writing, is `EACCES`.
///
/// # Errors
/// `EACCES` as above; `EINVAL` for a region whose size is unset or too large for the
/// address space; `ENOMEM` when no aligned range is free; the daemon's or the kernel's
/// errno (`ENOTCONN` when the daemon of `fd`'s connection is gone).
pub fn attach(
    fd: BorrowedFd<'_>,
    info: &MshareRegionInfo,
    prot: Protection,
    cover: Cover,
) -> io::Result<Mapping> {
    let mode = kfd::fcntl_getfl(fd)? & consts::O_ACCMODE;
    let readable = mode == consts::O_RDONLY || mode == consts::O_RDWR;
    if !readable || (prot == Protection::ReadWrite && mode != consts::O_RDWR) {
        return Err(kernel_glue::errno(EACCES));
    }
    if info.size == 0 {
        return Err(kernel_glue::errno(EINVAL));
    }
    if info.backing == uapi::BACKING_HUGETLB {
        let (backing, _) = request_backing(socket_path(info)?, fd, prot)?;
        return map_backing(backing.as_fd(), info.size, prot, cover);
    }
    // FUSE passthrough: the kernel maps the backing without the daemon, but marks the
    // region's cached times stale, and only the daemon can make them valid again. A
    // descriptor whose daemon is gone could map the region but never answer fstat again:
    // ask the daemon first (a dead connection fails here: the caller may reopen the
    // region), and refresh the attributes after.
    self::info(fd)?;
    let granule = info.granule.max(uapi::MSHARE_GRANULE);
    let m = Mapping::map_aligned(fd, info.size, prot, granule)?;
    let _ = kfd::fstat(fd);
    Ok(m)
}

/// Whether `e` is what a descriptor of a FUSE connection whose daemon is gone answers.
pub fn is_dead_connection(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ENOTCONN | ECONNABORTED))
}

/// Puts a new descriptor of the same region in place of `fd` (`dup3`, keeping its
/// close-on-exec flag), opened again by path: for a descriptor of a daemon that was
/// restarted (its connection is dead, the region is back on a new one). The kernel names
/// such a descriptor by its path inside the old mount (`/proc/self/fd`), which is detached
/// by then, so that path is tried below every msharefs mount in `/proc/self/mounts`; the
/// region found must be the same (msharefs keeps inode numbers across restarts).
///
/// # Errors
/// `ENOENT` when no mount has it; `ENOTCONN` while the daemon is still down; open errors.
pub fn reopen_in_place(fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; PATH_MAX];
    let inside = shim_sys::fd_path(fd, &mut buf)?.to_bytes();
    let acc = kfd::fcntl_getfl(fd)? & consts::O_ACCMODE;
    let old = kfd::fstat(fd)?.ino;
    let mut mounts = [0u8; 16384];
    let n = shim_sys::read_file(c"/proc/self/mounts", &mut mounts)?;
    for line in mounts[..n].split(|&b| b == b'\n') {
        let mut fields = line.split(|&b| b == b' ');
        let (Some(source), Some(point), Some(fstype)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // msharefs mounts itself as `msharefs /mnt fuse` (or `fuse.msharefs`).
        if source != b"msharefs" || !fstype.starts_with(b"fuse") {
            continue;
        }
        let mut path = StackStr::<PATH_MAX>::new();
        if path.push(point).and_then(|()| path.push(inside)).is_err() {
            continue;
        }
        let Ok(new) = shim_sys::openat(None, path.as_cstr(), acc, 0) else {
            continue;
        };
        if kfd::fstat(&new).is_ok_and(|st| st.ino == old) && info(new.as_fd()).is_ok() {
            let cloexec = shim_sys::is_cloexec(fd)?;
            return shim_sys::dup3(new.as_fd(), fd.as_raw_fd(), cloexec);
        }
    }
    Err(kernel_glue::errno(ENOENT))
}

/// Arms the `MSHAREFS_UNMAP` guard on `m`, a new mapping of the region `info` describes,
/// when the region's mount guards it ([`uapi::FLAG_UNMAP_GUARD`]): then every mapping must
/// be guarded to share page tables with the daemon's. The registration lasts as long as
/// the returned guard (or, forgotten, as long as the mapping).
///
/// # Errors
/// As `guard::arm` (`ENOSYS` without userfaultfd).
pub fn guard(m: &Mapping, info: &MshareRegionInfo) -> io::Result<Option<crate::guard::Guard>> {
    if info.flags & uapi::FLAG_UNMAP_GUARD == 0 {
        return Ok(None);
    }
    let backing = Backing::from_raw(info.backing).ok_or_else(|| kernel_glue::errno(EINVAL))?;
    crate::guard::arm(m, backing).map(Some)
}

/// Runs `f` again while it fails with `EBUSY`, sleeping 2 ms between tries, at most 100
/// times: msharefs refuses a backing change while the region is open, and FUSE delivers
/// a close to the daemon asynchronously, so a region just created and closed can look
/// open for a moment.
pub fn retry_while_busy<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(EBUSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// Longest path the core builds (`PATH_MAX`, with the NUL).
const PATH_MAX: usize = 4096;
/// Longest name (`NAME_MAX`, with the NUL).
const NAME_MAX: usize = 256;

/// Per-process counter for hidden creation names.
static SEQ: AtomicU64 = AtomicU64::new(0);

fn too_long(_: crate::cstr::TooLong) -> io::Error {
    kernel_glue::errno(ENAMETOOLONG)
}

/// Creates a region in the directory `dir` of an msharefs mount: with `backing`
/// (`Default`: the mount's), of `size` bytes (a multiple of the backing's page size;
/// setting it reserves the memory), mode `mode`, and returns it open read-write.
///
/// It is built under a hidden name (`.mshare-new.PID.N`, [`uapi::CREATING_PREFIX`]), so
/// no other process ever sees a region whose backing or size is not set yet, and then
/// renamed to `name` (`RENAME_NOREPLACE`: `EEXIST` when taken), or, for `None`, unlinked:
/// an anonymous region that ends with its last descriptor and mapping. On any failure
/// nothing stays behind (and should the caller die before the rename, the daemon removes
/// the hidden region when its last descriptor closes).
///
/// # Errors
/// `EINVAL` for a zero size or a bad mode; `EEXIST` for a taken `name`; `ENOMEM`,
/// `ENOSPC` or `EDQUOT` when the memory cannot be had; `ENAMETOOLONG`; any open,
/// `setxattr` or `ftruncate` errno.
pub fn create(
    dir: &CStr,
    name: Option<&CStr>,
    size: u64,
    mode: u32,
    backing: Backing,
) -> io::Result<OwnedFd> {
    if size == 0 || mode & !0o7777 != 0 {
        return Err(kernel_glue::errno(EINVAL));
    }
    let dirfd = shim_sys::openat(None, dir, consts::O_RDONLY | shim_sys::O_DIRECTORY, 0)?;
    if kfd::fstatfs(&dirfd)?.fs_type != kernel_glue::FUSE_SUPER_MAGIC {
        return Err(kernel_glue::errno(ENODEV));
    }
    if let Some(name) = name {
        // A taken or unusable name fails before any memory is reserved; the rename below
        // is what decides.
        if shim_sys::exists_at(dirfd.as_fd(), name)? {
            return Err(kernel_glue::errno(EEXIST));
        }
    }
    let creating = consts::O_RDWR | consts::O_CREAT | consts::O_EXCL;
    let mut tmp;
    let mut tries = 0;
    let fd = loop {
        tmp = StackStr::<NAME_MAX>::new();
        tmp.push(uapi::CREATING_PREFIX.as_bytes())
            .and_then(|()| tmp.push_u64(u64::from(shim_sys::getpid())))
            .and_then(|()| tmp.push(b"."))
            .and_then(|()| tmp.push_u64(SEQ.fetch_add(1, Ordering::Relaxed)))
            .map_err(too_long)?;
        match shim_sys::openat(Some(dirfd.as_fd()), tmp.as_cstr(), creating, mode) {
            // Left behind by a crashed process whose pid we now have.
            Err(e) if e.raw_os_error() == Some(EEXIST) && tries < 100 => tries += 1,
            r => break r?,
        }
    };
    // From here on, every failure removes the hidden file again.
    let undo = |e: io::Error| {
        let _ = shim_sys::unlinkat(dirfd.as_fd(), tmp.as_cstr());
        e
    };
    // msharefs picks the data path (FUSE passthrough or not) when a file is opened, and
    // refuses a backing change while the file is open: choose it with the file closed,
    // then open it again.
    let fd = if backing == Backing::Default {
        fd
    } else {
        drop(fd);
        let mut path = StackStr::<PATH_MAX>::new();
        path.push(dir.to_bytes())
            .and_then(|()| path.push(b"/"))
            .and_then(|()| path.push(tmp.bytes()))
            .map_err(too_long)
            .map_err(undo)?;
        retry_while_busy(|| {
            shim_sys::setxattr(
                path.as_cstr(),
                uapi::BACKING_XATTR_C,
                backing.name().as_bytes(),
                0,
            )
        })
        .map_err(undo)?;
        shim_sys::openat(Some(dirfd.as_fd()), tmp.as_cstr(), consts::O_RDWR, 0).map_err(undo)?
    };
    shim_sys::ftruncate(fd.as_fd(), size).map_err(undo)?;
    match name {
        Some(name) => {
            shim_sys::renameat_noreplace(dirfd.as_fd(), tmp.as_cstr(), name).map_err(undo)?
        }
        // Anonymous: the region ends with its last descriptor and mapping.
        None => shim_sys::unlinkat(dirfd.as_fd(), tmp.as_cstr())?,
    }
    Ok(fd)
}
