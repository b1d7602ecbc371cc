//! Readiness for systemd (`Type=notify`): `sd_notify(3)`'s protocol, implemented here.
//!
//! The protocol is one datagram of newline-separated `KEY=VALUE` lines (`READY=1`,
//! `STOPPING=1`, `STATUS=...`) sent to the `AF_UNIX` datagram socket named by
//! `$NOTIFY_SOCKET`: a path, or an abstract name written with a leading `@`. systemd
//! accepts it from the service's main process. That is all a daemon without socket
//! activation or a watchdog needs, so this is done with the standard library's
//! `UnixDatagram` (no `unsafe`, no libsystemd) instead of a crate: `sd-notify` does the
//! same in about as many lines, and one less dependency is one less thing to keep.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The address `$NOTIFY_SOCKET` names: `@name` is an abstract socket, anything else a
/// path (systemd sets an absolute one).
///
/// # Errors
/// `EINVAL` for an empty value, a path that is not absolute or a `vsock:` address (only
/// used by systemd inside virtual machines, not supported here).
fn address(value: &std::ffi::OsStr) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let b = value.as_bytes();
    match b.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&b[1..]),
        Some(b'/') => SocketAddr::from_pathname(value),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{NOTIFY_SOCKET}={}: not an absolute path or @abstract name",
                value.to_string_lossy()
            ),
        )),
    }
}

/// Sends `state` (e.g. `"READY=1\nSTATUS=mounted"`) to the service manager, if there is
/// one. Returns whether a message was sent.
///
/// # Errors
/// A malformed `$NOTIFY_SOCKET`, or the socket refused the datagram (systemd gone).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(value) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let addr = address(&value)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{NOTIFY_SOCKET}={}: {e}", value.to_string_lossy()),
        )
    })?;
    if sent != state.len() {
        return Err(io::Error::other("short notification datagram"));
    }
    Ok(true)
}

/// [`notify`], logging instead of failing: readiness is a courtesy to the service
/// manager; the file system works without it.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!("cannot notify the service manager ({state:?}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn addresses() {
        assert!(
            address(OsStr::new("/run/systemd/notify"))
                .unwrap()
                .as_pathname()
                .is_some()
        );
        let a = address(OsStr::new("@org/x")).unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"org/x"[..]));
        for bad in ["", "relative", "vsock:2:1234"] {
            assert!(address(OsStr::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sends_one_datagram_to_a_path_and_an_abstract_socket() {
        // A socket bound here stands in for systemd's; what it receives is the protocol.
        let dir = std::env::temp_dir().join(format!("msharefs-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        let addr = address(path.as_os_str()).unwrap();
        sock.send_to_addr(b"READY=1", &addr).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();

        let name = format!("msharefs-notify-test-{}", std::process::id());
        let abs = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&abs).unwrap();
        let addr = address(OsStr::new(&format!("@{name}"))).unwrap();
        sock.send_to_addr(b"STOPPING=1", &addr).unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
