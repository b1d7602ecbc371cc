//! Process-level calls: identity, signals, pidfds, sessions, standard streams, limits.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

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

/// Whether process `pid` still runs: it exists and not all of its threads have exited.
///
/// Asked of a pidfd, which turns readable only once the whole thread group has exited,
/// that is after the process's memory and descriptors are gone. `/proc/PID/stat` would
/// not do: it shows the main thread, which can be a zombie while other threads still run
/// and still hold the process's mappings. A pid that is not a thread-group leader (no
/// pidfd) is judged by its `/proc/PID/stat` state.
pub fn alive(pid: u32) -> bool {
    match pidfd_open(pid) {
        Ok(fd) => !matches!(crate::fd::readable_within(&fd, Duration::ZERO), Ok(true)),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => false,
        Err(_) => proc_state_alive(pid),
    }
}

/// Waits up to `timeout` for process `pid` to exit with all its threads (see [`alive`]);
/// returns whether it has.
pub fn wait_exited(pid: u32, timeout: Duration) -> bool {
    match pidfd_open(pid) {
        Ok(fd) => matches!(crate::fd::readable_within(&fd, timeout), Ok(true)),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => true,
        Err(_) => {
            let deadline = std::time::Instant::now() + timeout;
            while proc_state_alive(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            !proc_state_alive(pid)
        }
    }
}

/// Whether `/proc/PID/stat` shows a state other than zombie or dead.
fn proc_state_alive(pid: u32) -> bool {
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

/// Safe wrapper for `pidfd_open(2)`: a descriptor that refers to process `pid` (a thread-group
/// leader) for as long as it is held, whatever pid the kernel hands out later. It becomes
/// readable (`poll`, `epoll`) when the process exits. The descriptor is close-on-exec.
///
/// # Errors
/// `EINVAL` for pid 0 or above `i32::MAX`, or a pid that is not a thread-group leader;
/// `ESRCH` for no such process (it exited and was reaped); `EMFILE`.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| crate::errno(libc::EINVAL))?;
    // SAFETY: plain syscall with integer arguments.
    let fd = check_retval(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel just returned `fd` (a small non-negative int) and nobody else owns
    // it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Raises this process's soft limit of open descriptors (`RLIMIT_NOFILE`) to its hard
/// limit, with `getrlimit(2)` and `setrlimit(2)`, and returns the new limit. A daemon
/// that holds a descriptor per region and per attached process needs more than the
/// 1,024 a service manager gives by default (systemd keeps the soft limit low for programs
/// that still use `select(2)`; the hard limit is 524,288).
///
/// # Errors
/// The kernel's errno.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer for one `struct rlimit`.
    check_retval(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to a `struct rlimit`, read by the kernel.
        check_retval(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
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

    #[test]
    fn pidfd_follows_one_process() {
        assert_eq!(
            pidfd_open(0).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        assert!(!crate::fd::readable(&fd).unwrap(), "running");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(crate::fd::readable(&fd).unwrap(), "exited");
        // Reaped: the pid names nothing now (unless reused at once, which a test run on a
        // quiet pid space does not see).
        assert_eq!(
            pidfd_open(child.id()).unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
    }

    #[test]
    fn a_process_runs_until_its_last_thread_exits() {
        // The main thread leaves with pthread_exit(3); a second thread runs on.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import ctypes, threading, time\n\
                 threading.Thread(target=time.sleep, args=(30,)).start()\n\
                 ctypes.CDLL(None).pthread_exit(None)",
            ])
            .spawn()
            .expect("python3");
        let pid = child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while proc_state_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "main thread never exited"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // /proc/PID/stat shows a zombie; the process still runs.
        assert!(alive(pid));
        assert!(!wait_exited(pid, Duration::from_millis(50)));
        kill(pid, libc::SIGKILL).unwrap();
        assert!(wait_exited(pid, Duration::from_secs(5)));
        assert!(!alive(pid), "exited, not yet reaped");
        child.wait().unwrap();
        assert!(!alive(pid), "reaped");
        assert!(wait_exited(pid, Duration::ZERO));
    }

    #[test]
    fn nofile_limit_reaches_the_hard_limit() {
        let n = raise_nofile_limit().unwrap();
        assert!(n >= 1024, "{n}");
        assert_eq!(raise_nofile_limit().unwrap(), n);
    }
}
