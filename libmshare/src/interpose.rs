//! Attaching a region through a descriptor the program opened itself: what the
//! `LD_PRELOAD` shim (`libmshare_preload.so`) does inside `mmap`.
//!
//! [`Region`](crate::Region) opens regions by path; an unmodified program has only a
//! descriptor and a length. This module recognises a region from the descriptor (a FUSE
//! file that answers `MSHAREFS_GET_INFO`) and maps it the way `Region::attach` does.
//!
//! Everything here runs inside `mmap` in arbitrary programs, possibly in several threads
//! at once or in a freshly forked child: it keeps no state, takes no lock and does not
//! allocate (paths are borrowed from the info struct, errors are raw errnos).

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use kernel_glue::errnos::*;
use kernel_glue::mapping::{Mapping, Protection};
use kernel_glue::{consts, fd as kfd, socket};

use crate::uapi::{self, MshareRegionInfo};

/// The region behind `fd`, if `fd` is a region file on an msharefs mount with its size
/// set; `None` for anything else (other file systems, other FUSE file systems, a dead
/// mount, a bad descriptor): the caller then lets the kernel handle the request.
pub fn region_info(fd: BorrowedFd<'_>) -> Option<MshareRegionInfo> {
    if kfd::fstatfs(fd).ok()?.fs_type != kernel_glue::FUSE_SUPER_MAGIC {
        return None;
    }
    let mut info = MshareRegionInfo::default();
    kfd::ioctl_ptr(fd, uapi::MSHAREFS_GET_INFO, &mut info).ok()?;
    (info.size > 0 && info.granule.is_power_of_two()).then_some(info)
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

/// Sends one request message `msg` (with descriptor `fd`, if any) to the daemon's
/// socket and reads its reply: the descriptor it sends on success, if any.
///
/// # Errors
/// Connecting or talking to the socket; `EIO` for a malformed reply; the daemon's errno.
pub fn request(
    socket: &Path,
    msg: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<Option<OwnedFd>> {
    let stream = UnixStream::connect(socket)?;
    socket::send_with_fd(&stream, msg, fd)?;
    let mut reply = [0u8; uapi::ATTACH_REPLY_LEN];
    let (n, fd) = socket::recv_with_fd(&stream, &mut reply)?;
    if n != uapi::ATTACH_REPLY_LEN {
        return Err(kernel_glue::errno(EIO));
    }
    match i32::from_ne_bytes(reply) {
        0 => Ok(fd),
        e if e > 0 => Err(kernel_glue::errno(e)),
        _ => Err(kernel_glue::errno(EIO)),
    }
}

/// Asks the daemon at `socket` for the backing of the region open as `region_fd`, with
/// read-only or read-write access (attach protocol in [`crate::uapi`]).
///
/// # Errors
/// Connecting or talking to the socket; `EIO` for a malformed reply; the daemon's errno
/// (`EACCES` when `region_fd` does not allow `prot`).
pub fn request_backing(
    socket: &Path,
    region_fd: BorrowedFd<'_>,
    prot: Protection,
) -> io::Result<OwnedFd> {
    let req = match prot {
        Protection::ReadWrite => uapi::ATTACH_WRITE,
        Protection::ReadOnly => uapi::ATTACH_READ,
    };
    request(socket, &[req], Some(region_fd))?.ok_or_else(|| kernel_glue::errno(EIO))
}

/// What `MSHAREFS_GET_INFO` on the directory `dir` of an msharefs mount reports: the
/// daemon's attach socket (the shim's way to find the daemon of `MSHARE_MOUNT`).
///
/// # Errors
/// `ENODEV` when `dir` is not on msharefs; open and ioctl errors.
pub fn mount_info(dir: &CStr) -> io::Result<MshareRegionInfo> {
    let flags = consts::O_RDONLY | kernel_glue::shim_sys::O_DIRECTORY;
    let fd = kernel_glue::shim_sys::openat(None, dir, flags, 0)?;
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

/// A shared-memory request (see [`uapi::SHM_POSIX_SIZE`] and the others): the request
/// byte and its payload, built without allocating.
pub struct ShmRequest {
    buf: [u8; uapi::SHM_REQUEST_MAX],
    len: usize,
}

impl ShmRequest {
    fn new(kind: u8) -> ShmRequest {
        let mut buf = [0; uapi::SHM_REQUEST_MAX];
        buf[0] = kind;
        ShmRequest { buf, len: 1 }
    }

    fn with(mut self, bytes: &[u8]) -> ShmRequest {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }

    /// Make the POSIX segment sent with it a region of `length` bytes.
    pub fn posix_size(length: u64) -> ShmRequest {
        Self::new(uapi::SHM_POSIX_SIZE).with(&length.to_ne_bytes())
    }

    /// The region file of the POSIX segment sent with it.
    pub fn posix_open() -> ShmRequest {
        Self::new(uapi::SHM_POSIX_OPEN)
    }

    /// End the regions of segments that are gone, now.
    pub fn reconcile() -> ShmRequest {
        Self::new(uapi::SHM_RECONCILE)
    }

    /// The System V segment `id` of `size` bytes was just created by the sender.
    pub fn sysv_created(id: i32, size: u64) -> ShmRequest {
        Self::new(uapi::SHM_SYSV_CREATED)
            .with(&id.to_ne_bytes())
            .with(&size.to_ne_bytes())
    }

    /// The backing of System V segment `id`, which the sender has attached.
    pub fn sysv_attach(id: i32, write: bool) -> ShmRequest {
        Self::new(uapi::SHM_SYSV_ATTACH)
            .with(&id.to_ne_bytes())
            .with(&[u8::from(write)])
    }

    /// Sends it to the daemon whose `mshare_info` said `info`, with `fd` if the request
    /// names a descriptor.
    ///
    /// # Errors
    /// As [`request`].
    pub fn send(
        &self,
        info: &MshareRegionInfo,
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<Option<OwnedFd>> {
        request(socket_path(info)?, &self.buf[..self.len], fd)
    }
}

/// Maps the whole region open as `fd` (described by `info`, from [`region_info`]) with
/// protection `prot` at a granule-aligned address: for hugetlb regions the backing the
/// daemon hands out, otherwise the msharefs file itself (FUSE passthrough).
///
/// Access follows `mmap(2)`: a descriptor not open for reading, or `ReadWrite` on a
/// descriptor not open for writing, is `EACCES`.
///
/// # Errors
/// `EACCES` as above; `EINVAL` for a region too large for the address space; `ENOMEM`
/// when no aligned range is free; the daemon's or the kernel's errno.
pub fn attach_fd(
    fd: BorrowedFd<'_>,
    info: &MshareRegionInfo,
    prot: Protection,
) -> io::Result<Mapping> {
    let mode = kfd::fcntl_getfl(fd)? & consts::O_ACCMODE;
    let readable = mode == consts::O_RDONLY || mode == consts::O_RDWR;
    if !readable || (prot == Protection::ReadWrite && mode != consts::O_RDWR) {
        return Err(kernel_glue::errno(EACCES));
    }
    let granule = info.granule.max(uapi::MSHARE_GRANULE);
    if info.backing == uapi::BACKING_HUGETLB {
        let backing = request_backing(socket_path(info)?, fd, prot)?;
        Mapping::map_aligned(backing.as_fd(), info.size, prot, granule)
    } else {
        Mapping::map_aligned(fd, info.size, prot, granule)
    }
}
