//! File-descriptor passing over Unix sockets (`SCM_RIGHTS`).
//!
//! libmshare proves it may use a region by sending the daemon its open msharefs file
//! descriptor (opened under the kernel's permission checks); the daemon answers with a
//! descriptor of the backing file opened with no more access than that one.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr;

use crate::check_retval;

/// Sends `data` (non-empty) and, if given, one file descriptor in a single `sendmsg(2)`.
///
/// # Errors
/// `EINVAL` for empty data; the kernel's errno (`EPIPE`, ...); `EIO` for a short send.
pub fn send_with_fd(sock: impl AsFd, data: &[u8], fd: Option<impl AsFd>) -> io::Result<()> {
    if data.is_empty() {
        return Err(crate::errno(libc::EINVAL));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one int, aligned as cmsghdr requires.
    let mut cbuf = [0u64; 4];
    // SAFETY: zero is a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd.as_ref() {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(mem::size_of::<i32>() as u32) } as usize;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: msg_control points to `space` zeroed, aligned bytes, so CMSG_FIRSTHDR
        // returns a valid header pointer inside `cbuf`, with room for one int of data.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<i32>() as u32) as usize;
            ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd.as_fd().as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg points to valid iov and control buffers that outlive the call.
        let n = unsafe { libc::sendmsg(sock.as_fd().as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
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
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
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
    let mut first: Option<OwnedFd> = None;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of cmsg headers;
    // CMSG_FIRSTHDR/NXTHDR walk only inside that. Each passed fd is new in this process and
    // owned by nobody else, so wrapping it in OwnedFd is sound.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const i32;
                let header = libc::CMSG_LEN(0) as usize;
                let count =
                    ((*cmsg).cmsg_len as usize).saturating_sub(header) / mem::size_of::<i32>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i)));
                    if first.is_none() {
                        first = Some(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, first))
}

/// Credentials of the peer of a connected Unix socket (`SO_PEERCRED`).
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
    use std::os::unix::net::UnixStream;

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
}
