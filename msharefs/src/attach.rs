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
//! Requests are served by a small pool of threads that wait in `accept` (no thread is
//! started per request; when all of them are busy, one more is started, up to
//! [`MAX_WORKERS`]). A client sends its request right after connecting, so the thread that
//! accepted it waits for it up to [`FAST_WAIT`] and serves it. A connection still silent
//! by then goes to the waiter thread, which watches all such connections with epoll,
//! serves those that speak on a thread of their own, and closes those that stay silent
//! past [`CLIENT_TIMEOUT`] (the oldest first past [`MAX_WAITING`]). So a client that
//! connects and says nothing holds a descriptor but no thread, and delays nobody.
//!
//! Root may also ask for the statistics report (`msharefs stat`).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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

/// How long the accepting thread waits for a connection's request before it hands the
/// connection to the waiter thread.
const FAST_WAIT: Duration = Duration::from_millis(5);

/// Threads that wait for requests when nothing happens.
const IDLE_WORKERS: usize = 4;
/// Most threads serving at once (the rest wait in the kernel's accept queue).
const MAX_WORKERS: usize = 64;
/// Most silent connections the waiter keeps; past it the oldest is closed, so silent
/// clients cannot take all of the daemon's descriptors.
const MAX_WAITING: usize = 4096;

/// The threads that serve requests, and the connections that have not spoken yet.
struct Pool {
    core: Arc<Core>,
    /// Threads waiting in `accept`.
    idle: AtomicUsize,
    /// All threads serving requests (those started for a late request too).
    total: AtomicUsize,
    /// Watches the silent connections (tokens are keys of `waiting.streams`).
    epoll: Epoll,
    waiting: Mutex<Waiting>,
}

/// Connections handed to the waiter, by epoll token.
#[derive(Default)]
struct Waiting {
    streams: HashMap<u64, UnixStream>,
    /// Tokens in the order they came, so with increasing deadlines; a token already
    /// served is skipped when its deadline comes.
    deadlines: VecDeque<(Instant, u64)>,
    next_token: u64,
}

impl Waiting {
    /// Closes the connections silent past their deadline, and the oldest while more than
    /// [`MAX_WAITING`] wait; closing a descriptor takes it out of the epoll set.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, token)) = self.deadlines.front() {
            if deadline > now && self.streams.len() <= MAX_WAITING {
                break;
            }
            self.deadlines.pop_front();
            if self.streams.remove(&token).is_some() {
                log::debug!("attach socket: closed a connection that sent no request");
            }
        }
    }
}

/// Binds the socket (replacing a stale one) and serves it on a pool of threads.
///
/// # Errors
/// Binding or setting the socket's mode; creating the epoll instance; starting the
/// first threads.
pub fn serve(core: Arc<Core>, path: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = Arc::new(UnixListener::bind(path)?);
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let pool = Arc::new(Pool {
        core,
        idle: AtomicUsize::new(0),
        total: AtomicUsize::new(0),
        epoll: Epoll::new()?,
        waiting: Mutex::new(Waiting::default()),
    });
    for _ in 0..IDLE_WORKERS {
        spawn_worker(&pool, &listener)?;
    }
    let p = pool.clone();
    std::thread::Builder::new()
        .name("attach-wait".into())
        .spawn(move || waiter(&p))?;
    Ok(())
}

fn spawn_worker(pool: &Arc<Pool>, listener: &Arc<UnixListener>) -> std::io::Result<()> {
    let (p, listener) = (pool.clone(), listener.clone());
    pool.total.fetch_add(1, Ordering::SeqCst);
    pool.idle.fetch_add(1, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("attach".into())
        .spawn(move || worker(&p, &listener))
        .inspect_err(|_| {
            pool.total.fetch_sub(1, Ordering::SeqCst);
            pool.idle.fetch_sub(1, Ordering::SeqCst);
        })
        .map(drop)
}

/// One thread of the pool: accepts and serves requests; starts another thread when it
/// was the last one waiting, and ends when more than [`IDLE_WORKERS`] would wait.
fn worker(pool: &Arc<Pool>, listener: &Arc<UnixListener>) {
    loop {
        let conn = listener.accept();
        let was_idle = pool.idle.fetch_sub(1, Ordering::SeqCst);
        if was_idle == 1 && pool.total.load(Ordering::SeqCst) < MAX_WORKERS {
            // Keep one thread waiting while this one serves.
            if let Err(e) = spawn_worker(pool, listener) {
                log::warn!("attach socket: cannot start a thread: {e}");
            }
        }
        match conn {
            Ok((stream, _)) => match kfd::readable_within(&stream, FAST_WAIT) {
                Ok(true) => handle(&pool.core, stream),
                Ok(false) => wait_for_request(pool, stream),
                Err(e) => log::debug!("attach socket poll: {e}"),
            },
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: back off instead of spinning on
                // a listener that stays readable.
                log::warn!("attach socket accept: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
        if pool.idle.fetch_add(1, Ordering::SeqCst) >= IDLE_WORKERS {
            pool.idle.fetch_sub(1, Ordering::SeqCst);
            pool.total.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
}

/// Hands a connection that has not sent its request to the waiter thread.
fn wait_for_request(pool: &Pool, stream: UnixStream) {
    let mut w = pool.waiting.lock().unwrap_or_else(PoisonError::into_inner);
    let token = w.next_token;
    w.next_token += 1;
    if let Err(e) = pool.epoll.add(&stream, token) {
        log::warn!("attach socket: cannot watch a connection: {e}");
        return;
    }
    w.streams.insert(token, stream);
    let now = Instant::now();
    w.deadlines.push_back((now + CLIENT_TIMEOUT, token));
    w.expire(now);
}

/// The waiter thread: serves silent connections once they speak (or hang up), and
/// closes those still silent past [`CLIENT_TIMEOUT`].
fn waiter(pool: &Arc<Pool>) {
    let mut ready = Vec::with_capacity(64);
    loop {
        // A second at most between sweeps: a silent connection is closed within a second
        // of its deadline.
        if let Err(e) = pool.epoll.wait(&mut ready, Some(Duration::from_secs(1))) {
            log::error!("attach socket: epoll_wait: {e}");
            std::thread::sleep(ACCEPT_BACKOFF);
            continue;
        }
        for &token in &ready {
            let stream = pool
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .streams
                .remove(&token);
            if let Some(stream) = stream {
                let _ = pool.epoll.delete(&stream);
                serve_late(pool, stream);
            }
        }
        pool.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expire(Instant::now());
    }
}

/// Serves a request that came late on a thread of its own while the pool has room (a
/// request may take long: creating a segment reserves its memory), else on the waiter's.
fn serve_late(pool: &Arc<Pool>, stream: UnixStream) {
    if pool.total.fetch_add(1, Ordering::SeqCst) >= MAX_WORKERS {
        pool.total.fetch_sub(1, Ordering::SeqCst);
        return handle(&pool.core, stream);
    }
    let p = pool.clone();
    let spawned = std::thread::Builder::new()
        .name("attach".into())
        .spawn(move || {
            handle(&p.core, stream);
            p.total.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        // The connection went with the thread that did not start: the client sees EOF.
        pool.total.fetch_sub(1, Ordering::SeqCst);
        log::warn!("attach socket: cannot start a thread: {e}");
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
