//! The attach socket: how a client gets the backing of a hugetlb region.
//!
//! The client sends one request byte with its open msharefs descriptor attached. That
//! descriptor is the proof of access: the kernel checked the msharefs file's mode,
//! owner and directories when the client opened it. The daemon checks the descriptor is
//! a region of this mount (device and inode) and its access mode, then answers with the
//! backing file opened read-only or read-write, never with more access than the
//! descriptor has, and the region's info (`uapi::AttachReply`): one round trip per
//! attach. The socket itself is world-connectable; it grants nothing without such a
//! descriptor. The shim's shared-memory requests (`shm.rs`) come here too.
//!
//! The socket is a datagram socket and every request is one datagram that carries the
//! socket to answer on (protocol in [`uapi::ATTACH_READ`]): so a request costs the daemon
//! one wake-up, and there is no connection that could stay silent and hold a thread or a
//! descriptor. The reply socket must be one whose peer is the sender itself (a socket pair
//! it made, as libmshare does): the daemon never writes into a connection of another
//! program. The sender's pid and uid are the kernel's (`SO_PASSCRED`).
//!
//! Requests are served by a small pool of threads that wait in `recvmsg` (no thread is
//! started per request; when all of them are busy, one more is started, up to
//! [`MAX_WORKERS`], and the kernel queues further requests, blocking their senders).
//!
//! Root may also ask for the statistics report (`msharefs stat`).

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kernel_glue::errnos::*;
use kernel_glue::mapping::Protection;
use kernel_glue::socket::PeerCred;
use kernel_glue::{consts, fd as kfd, socket};
use mshare_uapi as uapi;
use zerocopy::IntoBytes;

use crate::fs::{Core, FsResult, errno_of};

/// Request byte for the statistics report (root only); the reply is JSON until EOF.
pub const STAT_REQUEST: u8 = b's';

/// How long writing the statistics report may wait for a client that does not read it.
/// (Every other reply is small and sent without waiting at all.)
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `recvmsg`, so the loop does not spin.
const RECV_BACKOFF: Duration = Duration::from_millis(100);

/// Threads that wait for requests when nothing happens.
const IDLE_WORKERS: usize = 4;
/// Most threads serving at once (the rest of the requests wait in the socket's queue).
const MAX_WORKERS: usize = 64;

/// The threads that serve requests.
struct Pool {
    core: Arc<Core>,
    sock: UnixDatagram,
    /// Threads waiting in `recvmsg`.
    idle: AtomicUsize,
    /// All threads serving requests.
    total: AtomicUsize,
}

/// Binds the socket (replacing a stale one) and serves it on a pool of threads.
///
/// # Errors
/// Binding the socket or setting its mode and options; starting the first threads.
pub fn serve(core: Arc<Core>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let sock = UnixDatagram::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    socket::set_passcred(&sock)?;
    let pool = Arc::new(Pool {
        core,
        sock,
        idle: AtomicUsize::new(0),
        total: AtomicUsize::new(0),
    });
    for _ in 0..IDLE_WORKERS {
        spawn_worker(&pool)?;
    }
    Ok(())
}

fn spawn_worker(pool: &Arc<Pool>) -> std::io::Result<()> {
    let p = pool.clone();
    pool.total.fetch_add(1, Ordering::SeqCst);
    pool.idle.fetch_add(1, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("attach".into())
        .spawn(move || worker(&p))
        .inspect_err(|_| {
            pool.total.fetch_sub(1, Ordering::SeqCst);
            pool.idle.fetch_sub(1, Ordering::SeqCst);
        })
        .map(drop)
}

/// One thread of the pool: receives and serves requests; starts another thread when it
/// was the last one waiting, and ends when more than [`IDLE_WORKERS`] would wait.
fn worker(pool: &Arc<Pool>) {
    loop {
        let mut req = [0u8; uapi::SHM_REQUEST_MAX];
        // The reply socket and the descriptor the request names; any more are closed.
        let mut fds = [None, None];
        let got = socket::recv_fds(&pool.sock, &mut req, &mut fds);
        let was_idle = pool.idle.fetch_sub(1, Ordering::SeqCst);
        if was_idle == 1 && pool.total.load(Ordering::SeqCst) < MAX_WORKERS {
            // Keep one thread waiting while this one serves.
            if let Err(e) = spawn_worker(pool) {
                log::warn!("attach socket: cannot start a thread: {e}");
            }
        }
        match got {
            Ok((n, Some(sender))) => {
                let [reply, fd] = fds;
                match reply.and_then(|r| reply_socket(r, sender)) {
                    Some((reply, client)) => handle(&pool.core, &req[..n], reply, fd, client),
                    None => log::debug!("attach socket: request without a usable reply socket"),
                }
            }
            Ok((_, None)) => log::warn!("attach socket: request without credentials"),
            Err(e) => {
                // Out of memory, say: back off instead of spinning.
                log::warn!("attach socket receive: {e}");
                std::thread::sleep(RECV_BACKOFF);
            }
        }
        if pool.idle.fetch_add(1, Ordering::SeqCst) >= IDLE_WORKERS {
            pool.idle.fetch_sub(1, Ordering::SeqCst);
            pool.total.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
}

/// The passed reply socket and the client's credentials, if the socket's peer is the
/// sender itself (a socket pair the sender made): never a connection to another program,
/// which would get the daemon's words. A sender the kernel shows as pid 0 (outside the
/// daemon's pid namespace) is refused: sockets without peer credentials show pid 0 too.
///
/// The credentials are the peer's (`SO_PEERCRED`: the effective uid and gid of the sender
/// when it made the pair), as a connected socket's were; the message's own
/// (`SCM_CREDENTIALS`) carry the real ones.
fn reply_socket(fd: OwnedFd, sender: PeerCred) -> Option<(UnixStream, PeerCred)> {
    let peer = socket::peer_cred(&fd).ok()?;
    (sender.pid != 0 && peer.pid == sender.pid).then(|| (UnixStream::from(fd), peer))
}

fn handle(core: &Core, req: &[u8], reply_to: UnixStream, fd: Option<OwnedFd>, cred: PeerCred) {
    if req == [STAT_REQUEST] {
        return stat_reply(core, reply_to, cred);
    }
    if !req.is_empty() && is_shm_request(req[0]) {
        let result = crate::shm::handle(core, req, fd, cred);
        if let Err(e) = result {
            log::debug!("shared-memory request {:?}: errno {e}", char::from(req[0]));
        }
        return reply(core, &reply_to, result);
    }
    // Only the first byte of an attach request counts: the rest is ignored.
    let result = match (req.first(), fd) {
        (None, _) => Err(EINVAL),
        (Some(&uapi::ATTACH_WRITE), Some(fd)) => attach(core, cred, &fd, Protection::ReadWrite),
        (Some(&uapi::ATTACH_READ), Some(fd)) => attach(core, cred, &fd, Protection::ReadOnly),
        (_, None) => Err(EBADF),
        _ => Err(EINVAL),
    };
    reply(
        core,
        &reply_to,
        result.map(|(fd, ino)| (Some(fd), Some(ino))),
    );
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

/// Sends a failure's errno, or a success's [`uapi::AttachReply`] (with the info of the
/// region the request was about, if any) and the descriptor it yields. Without waiting: a
/// reply that does not fit the client's socket now (it sent the same one many times and
/// reads none) is dropped.
fn reply(core: &Core, stream: &UnixStream, result: FsResult<(Option<OwnedFd>, Option<u64>)>) {
    let sent = match result {
        Ok((fd, region)) => {
            let mut r = uapi::AttachReply::default();
            if let Some(ino) = region {
                r.info = core.region_info(ino).unwrap_or_default();
            }
            socket::send_with_fd_now(stream, r.as_bytes(), fd.as_ref())
        }
        Err(e) => socket::send_with_fd_now(stream, &e.to_ne_bytes(), None::<&OwnedFd>),
    };
    if let Err(e) = sent {
        log::debug!("attach socket reply: {e}");
    }
}

/// Returns the backing and the region's inode.
fn attach(core: &Core, cred: PeerCred, fd: &OwnedFd, prot: Protection) -> FsResult<(OwnedFd, u64)> {
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
    core.attach_backing(st.ino, acc, prot, cred.pid)
        .map(|backing| (backing, st.ino))
}

fn stat_reply(core: &Core, reply_to: UnixStream, cred: PeerCred) {
    let body = if cred.uid == 0 {
        serde_json::to_vec(&crate::stats::report(core)).unwrap_or_default()
    } else {
        br#"{"error":"permission denied: msharefs stat needs root"}"#.to_vec()
    };
    // A client that does not read its report holds this thread no longer than this.
    let _ = socket::send_all_by(&reply_to, &body, std::time::Instant::now() + CLIENT_TIMEOUT);
}

/// Client side of the statistics request (used by `msharefs stat`).
///
/// # Errors
/// Sending or reading.
pub fn request_stats(path: &Path) -> std::io::Result<String> {
    let (mut ours, theirs) = UnixStream::pair()?;
    socket::send_to_with_fds(
        UnixDatagram::unbound()?,
        path,
        &[STAT_REQUEST],
        &[theirs.as_fd()],
    )?;
    drop(theirs);
    let mut s = String::new();
    ours.read_to_string(&mut s)?;
    Ok(s)
}
