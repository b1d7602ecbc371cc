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
//! One thread accepts connections and waits, with epoll, until each has sent its request
//! (or hung up); only then is the connection handed to a small pool of threads that serve
//! requests, started as needed up to [`MAX_WORKERS`]. So a client that connects and says
//! nothing holds a descriptor but no thread, delays nobody, and is dropped after
//! [`CLIENT_TIMEOUT`]; past [`MAX_WAITING`] silent connections the oldest go first.
//!
//! Root may also ask for the statistics report (`msharefs stat`).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use kernel_glue::epoll::Epoll;
use kernel_glue::errnos::*;
use kernel_glue::mapping::Protection;
use kernel_glue::{consts, fd as kfd, socket};
use mshare_uapi as uapi;
use zerocopy::IntoBytes;

use crate::fs::{Core, FsResult, errno_of};

/// Request byte for the statistics report (root only); the reply is JSON until EOF.
pub const STAT_REQUEST: u8 = b's';

/// How long a client may take to send its request or read the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (out of descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Threads that wait for requests when nothing happens.
const IDLE_WORKERS: usize = 4;
/// Most threads serving at once (further requests wait in the pool's queue).
const MAX_WORKERS: usize = 64;
/// Most connections waiting for their request; past it the oldest is closed, so silent
/// clients cannot take all of the daemon's descriptors.
const MAX_WAITING: usize = 4096;

/// The epoll token of the listening socket; connections get the tokens after it.
const LISTENER: u64 = 0;

/// The threads that serve requests, and the queue they take connections from.
struct Pool {
    core: Arc<Core>,
    queue: Mutex<mpsc::Receiver<UnixStream>>,
    /// Threads waiting for a connection.
    idle: AtomicUsize,
    /// All threads.
    total: AtomicUsize,
}

/// Binds the socket (replacing a stale one) and serves it: one thread accepts, a pool
/// of threads serves.
///
/// # Errors
/// Binding or setting the socket's mode; creating the epoll instance; starting the
/// first threads.
pub fn serve(core: Arc<Core>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    epoll.add(&listener, LISTENER)?;
    let (tx, rx) = mpsc::channel();
    let pool = Arc::new(Pool {
        core,
        queue: Mutex::new(rx),
        idle: AtomicUsize::new(0),
        total: AtomicUsize::new(0),
    });
    for _ in 0..IDLE_WORKERS {
        spawn_worker(&pool)?;
    }
    std::thread::Builder::new()
        .name("attach-accept".into())
        .spawn(move || accept_loop(&listener, &epoll, &pool, &tx))?;
    Ok(())
}

/// Accepts connections and hands each to the pool once it is readable (its request
/// arrived, or the client hung up); closes those that stay silent past [`CLIENT_TIMEOUT`].
fn accept_loop(
    listener: &UnixListener,
    epoll: &Epoll,
    pool: &Arc<Pool>,
    tx: &mpsc::Sender<UnixStream>,
) {
    let mut waiting: HashMap<u64, UnixStream> = HashMap::new();
    // Tokens in the order they were accepted, so with increasing deadlines; a token
    // already handed to the pool is skipped when its deadline comes.
    let mut deadlines: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut next_token = LISTENER + 1;
    let mut ready = Vec::with_capacity(256);
    loop {
        let timeout = deadlines
            .front()
            .map(|(d, _)| d.saturating_duration_since(Instant::now()));
        if let Err(e) = epoll.wait(&mut ready, timeout) {
            log::error!("attach socket: epoll_wait: {e}");
            std::thread::sleep(ACCEPT_BACKOFF);
            continue;
        }
        for &token in &ready {
            if token != LISTENER {
                if let Some(stream) = waiting.remove(&token) {
                    let _ = epoll.delete(&stream);
                    dispatch(pool, tx, stream);
                }
                continue;
            }
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let token = next_token;
                        next_token += 1;
                        if let Err(e) = epoll.add(&stream, token) {
                            log::warn!("attach socket: cannot watch a connection: {e}");
                            continue;
                        }
                        waiting.insert(token, stream);
                        deadlines.push_back((Instant::now() + CLIENT_TIMEOUT, token));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of descriptors (EMFILE) or memory: back off instead of
                        // spinning on a listener that stays readable.
                        log::warn!("attach socket accept: {e}");
                        std::thread::sleep(ACCEPT_BACKOFF);
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        while let Some(&(deadline, token)) = deadlines.front() {
            if deadline > now && waiting.len() <= MAX_WAITING {
                break;
            }
            deadlines.pop_front();
            if waiting.remove(&token).is_some() {
                // Closing the descriptor takes it out of the epoll set.
                log::debug!("attach socket: closed a connection that sent no request");
            }
        }
    }
}

/// Queues a readable connection for the pool, starting a thread if none is waiting.
fn dispatch(pool: &Arc<Pool>, tx: &mpsc::Sender<UnixStream>, stream: UnixStream) {
    if pool.idle.load(Ordering::SeqCst) == 0 && pool.total.load(Ordering::SeqCst) < MAX_WORKERS {
        if let Err(e) = spawn_worker(pool) {
            log::warn!("attach socket: cannot start a thread: {e}");
        }
    }
    // The workers hold the receiver for as long as the pool exists.
    let _ = tx.send(stream);
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

/// One thread of the pool: serves connections from the queue; ends when more than
/// [`IDLE_WORKERS`] would wait.
fn worker(pool: &Pool) {
    loop {
        let next = pool
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(stream) = next else {
            // The accepting thread is gone; nothing more will come.
            pool.idle.fetch_sub(1, Ordering::SeqCst);
            pool.total.fetch_sub(1, Ordering::SeqCst);
            return;
        };
        pool.idle.fetch_sub(1, Ordering::SeqCst);
        handle(&pool.core, stream);
        if pool.idle.fetch_add(1, Ordering::SeqCst) >= IDLE_WORKERS {
            pool.idle.fetch_sub(1, Ordering::SeqCst);
            pool.total.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
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
        return reply(core, &stream, result);
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
    reply(core, &stream, result.map(|(fd, ino)| (Some(fd), Some(ino))));
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
/// region the request was about, if any) and the descriptor it yields.
fn reply(core: &Core, stream: &UnixStream, result: FsResult<(Option<OwnedFd>, Option<u64>)>) {
    let sent = match result {
        Ok((fd, region)) => {
            let mut r = uapi::AttachReply::default();
            if let Some(ino) = region {
                r.info = core.region_info(ino).unwrap_or_default();
            }
            socket::send_with_fd(stream, r.as_bytes(), fd.as_ref())
        }
        Err(e) => socket::send_with_fd(stream, &e.to_ne_bytes(), None::<&OwnedFd>),
    };
    if let Err(e) = sent {
        log::debug!("attach socket reply: {e}");
    }
}

/// Returns the backing and the region's inode.
fn attach(
    core: &Core,
    stream: &UnixStream,
    fd: &OwnedFd,
    prot: Protection,
) -> FsResult<(OwnedFd, u64)> {
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
        .map(|backing| (backing, st.ino))
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
