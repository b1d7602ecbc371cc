//! Process-level calls: identity, signals, sessions, standard streams.

use std::io;
use std::os::fd::AsRawFd;

use crate::check_retval;

/// Safe wrapper for `geteuid(2)`.
pub fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Safe wrapper for `kill(2)`.
///
/// # Errors
/// `ESRCH` for a gone process, `EPERM`.
pub fn kill(pid: u32, signal: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| crate::errno(libc::EINVAL))?;
    // SAFETY: plain syscall.
    check_retval(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// Whether a process with this pid exists (and is not a zombie we could still reap).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // Field 3, after the parenthesised comm, is the state.
            let state = s
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Safe wrapper for `setsid(2)`.
///
/// # Errors
/// `EPERM` when already a process-group leader.
pub fn setsid() -> io::Result<()> {
    // SAFETY: plain syscall.
    check_retval(unsafe { libc::setsid() })?;
    Ok(())
}

/// Points standard input and output at `/dev/null` (a daemon that has told its parent it
/// is ready stops writing to the parent's pipe).
///
/// # Errors
/// Opening `/dev/null` or `dup2(2)`.
pub fn stdio_to_devnull() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for target in [0, 1] {
        // SAFETY: dup2 onto fds 0 and 1 replaces the standard streams; Rust's std handles
        // keep working with the new files.
        check_retval(unsafe { libc::dup2(null.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// Safe wrapper for `prctl(PR_SET_PDEATHSIG)`: this process gets `signal` when its parent
/// thread exits (used by test helpers so they never outlive the test).
///
/// # Errors
/// The kernel's errno.
pub fn set_parent_death_signal(signal: i32) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes only this process.
    check_retval(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) })?;
    Ok(())
}
