//! Unix-socket messages with descriptors (`SCM_RIGHTS`) and credentials
//! (`SCM_CREDENTIALS`).
//!
//! libmshare proves it may use a region by sending the daemon its open msharefs file
//! descriptor (opened under the kernel's permission checks); the daemon answers with a
//! descriptor of the backing file opened with no more access than that one. Everything
//! here is allocation-free: the shim calls it inside `mmap`.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

use crate::check_retval;

/// Most descriptors one message sent here carries.
pub const MAX_FDS: usize = 4;

/// Sends `data` (non-empty) and, if given, one file descriptor in a single `sendmsg(2)`
/// on the connected socket `sock`.
///
/// # Errors
/// `EINVAL` for empty data; the kernel's errno (`EPIPE`, ...); `EIO` for a short send.
pub fn send_with_fd(sock: impl AsFd, data: &[u8], fd: Option<impl AsFd>) -> io::Result<()> {
    send_one(sock.as_fd(), data, fd.as_ref().map(AsFd::as_fd), 0)
}

/// [`send_with_fd`] that never waits (`MSG_DONTWAIT`): `EAGAIN` when the message does not
/// fit the peer's buffer now. For a daemon answering on a socket its client also holds,
/// whose `O_NONBLOCK` or send timeout the client could change at any moment.
///
/// # Errors
/// As [`send_with_fd`]; `EAGAIN`.
pub fn send_with_fd_now(sock: impl AsFd, data: &[u8], fd: Option<impl AsFd>) -> io::Result<()> {
    let fd = fd.as_ref().map(AsFd::as_fd);
    send_one(sock.as_fd(), data, fd, libc::MSG_DONTWAIT)
}

/// [`send_with_fd`] with the `sendmsg` flags `flags` added.
fn send_one(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
    flags: libc::c_int,
) -> io::Result<()> {
    if data.is_empty() {
        return Err(crate::errno(libc::EINVAL));
    }
    match fd {
        Some(fd) => send_fds(sock, None, data, &[fd], flags),
        None => send_fds(sock, None, data, &[], flags),
    }
}

/// Writes all of `data` to the connected stream socket `sock` by `deadline`, never
/// blocking in the send itself (`MSG_DONTWAIT`, then `poll` for room): a peer that reads
/// nothing costs the caller at most the time until `deadline`, whatever it does to the
/// socket's flags or timeouts.
///
/// # Errors
/// `ETIMEDOUT` past `deadline`; the kernel's errno.
pub fn send_all_by(
    sock: impl AsFd,
    mut data: &[u8],
    deadline: std::time::Instant,
) -> io::Result<()> {
    let sock = sock.as_fd();
    while !data.is_empty() {
        // SAFETY: `data` is valid for reads of its length during the call.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match check_retval(n) {
            Ok(n) => data = &data[n as usize..],
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || !crate::fd::writable_within(sock, left)? {
                    return Err(crate::errno(libc::ETIMEDOUT));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `data` as one datagram from the datagram socket `sock` to the socket bound at
/// `to`, with the descriptors `fds` (at most [`MAX_FDS`]) attached.
///
/// # Errors
/// `ENAMETOOLONG` for a path that does not fit a `sockaddr_un`; `EINVAL` for more than
/// [`MAX_FDS`] descriptors; the kernel's errno (`ENOENT`, `ECONNREFUSED` when nothing is
/// bound there, ...); `EIO` for a short send.
pub fn send_to_with_fds(
    sock: impl AsFd,
    to: &Path,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    send_fds(sock.as_fd(), Some(to), data, fds, 0)
}

fn send_fds(
    sock: BorrowedFd<'_>,
    to: Option<&Path>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: libc::c_int,
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(crate::errno(libc::EINVAL));
    }
    // SAFETY: zero is a valid sockaddr_un (family set below).
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for MAX_FDS ints, aligned as cmsghdr requires.
    let mut cbuf = [0u64; 6];
    // SAFETY: zero is a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(to) = to {
        let path = to.as_os_str().as_bytes();
        // The path and its NUL must fit.
        if path.len() >= addr.sun_path.len() {
            return Err(crate::errno(libc::ENAMETOOLONG));
        }
        for (d, &s) in addr.sun_path.iter_mut().zip(path) {
            *d = s as libc::c_char;
        }
        msg.msg_name = &mut addr as *mut libc::sockaddr_un as *mut libc::c_void;
        msg.msg_namelen = mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    }
    if !fds.is_empty() {
        let bytes = (fds.len() * mem::size_of::<libc::c_int>()) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        if space > mem::size_of_val(&cbuf) {
            return Err(crate::errno(libc::EINVAL));
        }
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: msg_control points to `space` zeroed, aligned bytes (at most the 48 of
        // `cbuf` for MAX_FDS ints), so CMSG_FIRSTHDR returns a valid header pointer inside
        // `cbuf`, with room for `fds.len()` ints of data.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let data = libc::CMSG_DATA(cmsg) as *mut i32;
            for (i, fd) in fds.iter().enumerate() {
                ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: msg points to a valid address, iov and control buffer that outlive the
        // call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | flags) };
        match check_retval(n) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(n) if n as usize != data.len() => return Err(crate::errno(libc::EIO)),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receives one message into `buf` with at most one passed descriptor (marked
/// close-on-exec). Returns the byte count (0 at end of stream) and the descriptor.
/// Extra descriptors a peer may have sent are closed.
///
/// # Errors
/// The kernel's errno.
pub fn recv_with_fd(sock: impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut fds = [None];
    let (n, _) = recv_fds(sock, buf, &mut fds)?;
    let [fd] = fds;
    Ok((n, fd))
}

/// Receives one message into `buf` (a datagram is cut to its length), its passed
/// descriptors (marked close-on-exec) into `fds` in the order sent (the rest are closed,
/// as are any past `fds.len()`), and the sender's credentials when the socket has
/// `SO_PASSCRED` set ([`set_passcred`]). Returns the byte count (0 at end of stream).
///
/// # Errors
/// The kernel's errno.
pub fn recv_fds(
    sock: impl AsFd,
    buf: &mut [u8],
    fds: &mut [Option<OwnedFd>],
) -> io::Result<(usize, Option<PeerCred>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for credentials (which come first) and MAX_FDS descriptors: the kernel closes
    // any a sender added beyond those (MSG_CTRUNC) without installing them here.
    let mut cbuf = [0u64; 8];
    debug_assert!(
        // SAFETY: CMSG_SPACE is a pure size computation.
        unsafe {
            libc::CMSG_SPACE(mem::size_of::<libc::ucred>() as u32)
                + libc::CMSG_SPACE((MAX_FDS * mem::size_of::<libc::c_int>()) as u32)
        } as usize
            <= mem::size_of_val(&cbuf)
    );
    // SAFETY: zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: msg points to valid, writable iov and control buffers.
        let n =
            unsafe { libc::recvmsg(sock.as_fd().as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match check_retval(n) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(n) => break n as usize,
        }
    };
    let mut cred = None;
    let mut next = 0;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of cmsg headers;
    // CMSG_FIRSTHDR/NXTHDR walk only inside that. Each passed fd is new in this process and
    // owned by nobody else, so wrapping it in OwnedFd is sound (those not kept are closed
    // by the drop).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let header = libc::CMSG_LEN(0) as usize;
            let len = ((*cmsg).cmsg_len as usize).saturating_sub(header);
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..len / mem::size_of::<i32>() {
                        let raw = ptr::read_unaligned((data as *const i32).add(i));
                        let fd = OwnedFd::from_raw_fd(raw);
                        if let Some(slot) = fds.get_mut(next) {
                            *slot = Some(fd);
                        }
                        next += 1;
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                    if len >= mem::size_of::<libc::ucred>() =>
                {
                    let c = ptr::read_unaligned(data as *const libc::ucred);
                    cred = Some(PeerCred {
                        pid: c.pid as u32,
                        uid: c.uid,
                        gid: c.gid,
                    });
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, cred))
}

/// Sets `SO_PASSCRED` on `sock`: every message it receives then carries its sender's
/// credentials, filled in by the kernel ([`recv_fds`]).
///
/// # Errors
/// The kernel's errno.
pub fn set_passcred(sock: impl AsFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid pointer to one int and its size.
    check_retval(unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            &on as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Credentials of a Unix socket's peer or a message's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: u32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// Safe wrapper for `getsockopt(SO_PEERCRED)`.
///
/// # Errors
/// The kernel's errno.
pub fn peer_cred(sock: impl AsFd) -> io::Result<PeerCred> {
    // SAFETY: zero is a valid ucred.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid out-pointer and length for one ucred.
    check_retval(unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(PeerCred {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    #[test]
    fn passes_a_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let memfd = crate::fd::memfd_create("kg-sock", false).unwrap();
        crate::fd::ftruncate(&memfd, 12345).unwrap();
        send_with_fd(&a, b"hi", Some(&memfd)).unwrap();
        let mut buf = [0u8; 16];
        let (n, fd) = recv_with_fd(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(crate::fd::fstat(fd.unwrap()).unwrap().size, 12345);
        send_with_fd(&a, b"no fd", None::<&OwnedFd>).unwrap();
        let (n, fd) = recv_with_fd(&b, &mut buf).unwrap();
        assert_eq!(n, 5);
        assert!(fd.is_none());
        assert_eq!(peer_cred(&b).unwrap().pid, std::process::id());
    }

    #[test]
    fn a_datagram_carries_descriptors_in_order_and_its_senders_credentials() {
        let dir = std::env::temp_dir().join(format!("kg-dgram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let server = UnixDatagram::bind(&path).unwrap();
        set_passcred(&server).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        let (m1, m2) = (
            crate::fd::memfd_create("one", false).unwrap(),
            crate::fd::memfd_create("two", false).unwrap(),
        );
        crate::fd::ftruncate(&m1, 1).unwrap();
        crate::fd::ftruncate(&m2, 2).unwrap();
        send_to_with_fds(&client, &path, b"req", &[m1.as_fd(), m2.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        // One slot for two descriptors: the second is closed, not leaked.
        let mut fds = [None];
        let (n, cred) = recv_fds(&server, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"req");
        assert_eq!(crate::fd::fstat(fds[0].take().unwrap()).unwrap().size, 1);
        let cred = cred.expect("credentials");
        assert_eq!(cred.pid, std::process::id());
        // SAFETY: getuid cannot fail.
        assert_eq!(cred.uid, unsafe { libc::getuid() });
        // Nothing bound there, and a path too long for a socket address.
        assert_eq!(
            send_to_with_fds(&client, &dir.join("none"), b"x", &[])
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOENT)
        );
        let long = dir.join("x".repeat(120));
        assert_eq!(
            send_to_with_fds(&client, &long, b"x", &[])
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENAMETOOLONG)
        );
        let five: Vec<BorrowedFd<'_>> = (0..5).map(|_| m1.as_fd()).collect();
        assert_eq!(
            send_to_with_fds(&client, &path, b"x", &five)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
