//! The attach socket: how a client gets the backing of a hugetlb region.
//!
//! The client sends one request byte with its open msharefs descriptor attached. That
//! descriptor is the proof of access: the kernel checked the msharefs file's mode,
//! owner and directories when the client opened it. The daemon checks the descriptor is
//! a region of this mount (device and inode) and its access mode, then answers with the
//! backing file opened read-only or read-write, never with more access than the
//! descriptor has. The socket itself is world-connectable; it grants nothing without
//! such a descriptor.
//!
//! Root may also ask for the statistics report (`msharefs stat`).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kernel_glue::errnos::*;
use kernel_glue::mapping::Protection;
use kernel_glue::{consts, fd as kfd, socket};
use mshare::uapi;

use crate::fs::{Core, FsResult, errno_of};

/// Request byte for the statistics report (root only); the reply is JSON until EOF.
pub const STAT_REQUEST: u8 = b's';

/// How long a client may take to send its request or read the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (out of descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds the socket (replacing a stale one) and serves it on a background thread.
///
/// # Errors
/// Binding or setting the socket's mode.
pub fn serve(core: Arc<Core>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    std::thread::Builder::new()
        .name("attach".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let core = core.clone();
                        // One thread per request: a slow client cannot stall others.
                        let _ = std::thread::Builder::new()
                            .name("attach-req".into())
                            .spawn(move || handle(&core, stream));
                    }
                    Err(e) => {
                        // Out of descriptors (EMFILE) or memory: back off instead of
                        // spinning on a listener that stays readable.
                        log::warn!("attach socket accept: {e}");
                        std::thread::sleep(ACCEPT_BACKOFF);
                    }
                }
            }
        })?;
    Ok(())
}

fn handle(core: &Core, stream: UnixStream) {
    // A client that connects and then says nothing (or never reads the reply) must not
    // hold a thread and a descriptor of the daemon forever.
    if let Err(e) = stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
    {
        log::debug!("attach socket timeout: {e}");
        return;
    }
    let mut req = [0u8; uapi::SHM_REQUEST_MAX];
    let (n, fd) = match socket::recv_with_fd(&stream, &mut req) {
        Ok(x) => x,
        Err(e) => {
            log::debug!("attach socket receive: {e}");
            return;
        }
    };
    if n == 1 && req[0] == STAT_REQUEST {
        return stat_reply(core, stream);
    }
    if n >= 1 && is_shm_request(req[0]) {
        let result = match socket::peer_cred(&stream) {
            Ok(peer) => crate::shm::handle(core, &req[..n], fd, peer),
            Err(e) => Err(errno_of(&e)),
        };
        if let Err(e) = result {
            log::debug!("shared-memory request {:?}: errno {e}", char::from(req[0]));
        }
        return reply(&stream, result);
    }
    // Only the first byte of an attach request counts: the rest is ignored.
    let result = if n == 0 {
        Err(EINVAL)
    } else {
        match (req[0], fd) {
            (uapi::ATTACH_WRITE, Some(fd)) => attach(core, &stream, &fd, Protection::ReadWrite),
            (uapi::ATTACH_READ, Some(fd)) => attach(core, &stream, &fd, Protection::ReadOnly),
            (_, None) => Err(EBADF),
            _ => Err(EINVAL),
        }
    };
    reply(&stream, result.map(Some));
}

fn is_shm_request(b: u8) -> bool {
    matches!(
        b,
        uapi::SHM_POSIX_SIZE
            | uapi::SHM_POSIX_OPEN
            | uapi::SHM_RECONCILE
            | uapi::SHM_SYSV_CREATED
            | uapi::SHM_SYSV_ATTACH
    )
}

/// Sends a status and, on success, the descriptor the request yields.
fn reply(stream: &UnixStream, result: FsResult<Option<OwnedFd>>) {
    let sent = match result {
        Ok(fd) => socket::send_with_fd(stream, &0i32.to_ne_bytes(), fd.as_ref()),
        Err(e) => socket::send_with_fd(stream, &e.to_ne_bytes(), None::<&OwnedFd>),
    };
    if let Err(e) = sent {
        log::debug!("attach socket reply: {e}");
    }
}

fn attach(core: &Core, stream: &UnixStream, fd: &OwnedFd, prot: Protection) -> FsResult<OwnedFd> {
    let st = kfd::fstat(fd).map_err(|e| errno_of(&e))?;
    if Some(&st.dev) != core.fuse_dev.get() {
        // Not a file of this mount (or of an earlier, dead connection).
        return Err(EBADF);
    }
    let flags = kfd::fcntl_getfl(fd).map_err(|e| errno_of(&e))?;
    if flags & kernel_glue::consts::O_PATH != 0 {
        // An O_PATH descriptor is opened without any permission on the file: it proves
        // nothing (its access-mode bits read as O_RDONLY).
        return Err(EBADF);
    }
    let acc = flags & consts::O_ACCMODE;
    let pid = socket::peer_cred(stream).map(|c| c.pid).unwrap_or(0);
    core.attach_backing(st.ino, acc, prot, pid)
}

fn stat_reply(core: &Core, mut stream: UnixStream) {
    let root = socket::peer_cred(&stream)
        .map(|c| c.uid == 0)
        .unwrap_or(false);
    let body = if root {
        serde_json::to_vec(&crate::stats::report(core)).unwrap_or_default()
    } else {
        br#"{"error":"permission denied: msharefs stat needs root"}"#.to_vec()
    };
    let _ = stream.write_all(&body);
}

/// Client side of the statistics request (used by `msharefs stat`).
///
/// # Errors
/// Connecting, sending or reading.
pub fn request_stats(path: &Path) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    socket::send_with_fd(&stream, &[STAT_REQUEST], None::<&OwnedFd>)?;
    let mut s = String::new();
    stream.read_to_string(&mut s)?;
    Ok(s)
}
