//! epoll(7): one descriptor that waits for many (the daemon watches the pidfds of its
//! attachers with it).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::check_retval;

/// An epoll instance. Each watched descriptor carries a caller-chosen `u64` token, which
/// [`Epoll::wait`] returns when the descriptor is readable.
///
/// A descriptor the caller closes leaves the interest list by itself once its file has no
/// other descriptor (epoll(7)); a token already returned for it may still arrive once, so
/// callers should make tokens unique rather than reuse them.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// Safe wrapper for `epoll_create1(EPOLL_CLOEXEC)`.
    ///
    /// # Errors
    /// The kernel's errno (`EMFILE`, `ENOMEM`).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall, no pointers.
        let fd = check_retval(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: the kernel just returned `fd` and nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    fn ctl(&self, op: i32, fd: impl AsFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call (the kernel
        // copies it); both descriptors are open (borrowed).
        check_retval(unsafe {
            libc::epoll_ctl(self.fd.as_raw_fd(), op, fd.as_fd().as_raw_fd(), &mut ev)
        })?;
        Ok(())
    }

    /// Safe wrapper for `epoll_ctl(EPOLL_CTL_ADD)`: reports `token` whenever `fd` is
    /// readable (level-triggered, `EPOLLIN`).
    ///
    /// # Errors
    /// `EEXIST` when `fd` is already watched; `EPERM` for a descriptor epoll cannot watch
    /// (a regular file); `ENOSPC` past `max_user_watches`.
    pub fn add(&self, fd: impl AsFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    /// Safe wrapper for `epoll_ctl(EPOLL_CTL_DEL)`.
    ///
    /// # Errors
    /// `ENOENT` when `fd` is not watched.
    pub fn delete(&self, fd: impl AsFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0)
    }

    /// Safe wrapper for `epoll_wait(2)`: waits up to `timeout` (`None`: for ever) and puts
    /// the tokens of up to `tokens.capacity()` (at least one) ready descriptors in `tokens`
    /// (cleared first). A signal ends the wait early with no token.
    ///
    /// # Errors
    /// The kernel's errno (`EINTR` is not an error).
    pub fn wait(&self, tokens: &mut Vec<u64>, timeout: Option<Duration>) -> io::Result<()> {
        tokens.clear();
        let max = tokens.capacity().clamp(1, 1024);
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; max];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `events` has room for `max` entries, which is what the kernel may write.
        let r =
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max as i32, ms) };
        match check_retval(r) {
            Ok(n) => {
                tokens.extend(events[..n as usize].iter().map(|e| e.u64));
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_token_of_an_exited_child() {
        let ep = Epoll::new().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pidfd = crate::process::pidfd_open(child.id()).unwrap();
        ep.add(&pidfd, 42).unwrap();
        assert_eq!(
            ep.add(&pidfd, 42).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        let mut tokens = Vec::with_capacity(4);
        ep.wait(&mut tokens, Some(Duration::from_millis(0)))
            .unwrap();
        assert!(tokens.is_empty(), "still running");
        ep.wait(&mut tokens, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(tokens, vec![42]);
        child.wait().unwrap();
        ep.delete(&pidfd).unwrap();
        assert_eq!(
            ep.delete(&pidfd).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }
}
