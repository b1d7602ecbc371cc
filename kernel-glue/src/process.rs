//! Process-level calls: identity, signals, sessions, standard streams.

use std::io;
use std::os::fd::AsRawFd;

use crate::check_retval;

/// Safe wrapper for `geteuid(2)`.
pub fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Safe wrapper for `kill(2)` of one process. `pid` 0 (`kill(2)`: the caller's whole
/// process group) and pids above `i32::MAX` (negative: process groups, or every process)
/// are refused, so a bad pid read from a file never signals more than one process.
///
/// # Errors
/// `EINVAL` for pid 0 or above `i32::MAX`; `ESRCH` for a gone process, `EPERM`.
pub fn kill(pid: u32, signal: i32) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| crate::errno(libc::EINVAL))?;
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
        // SAFETY: fds 0 and 1 are the standard streams, which std owns (it opens them at
        // start-up if closed; no `OwnedFd` of safe code holds them); dup2 swaps the open
        // file behind them atomically, and std's handles keep working with the new files.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_refuses_groups() {
        for pid in [0, u32::MAX, 1 << 31] {
            let e = kill(pid, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "pid {pid}");
        }
        kill(std::process::id(), 0).unwrap();
    }
}
