//! The shim's one-line messages on standard error, written without allocating.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use kernel_glue::shim_sys;

/// Bytes shown as text, with anything that is not printable ASCII escaped.
pub struct Bytes<'a>(pub &'a [u8]);

impl std::fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_char('"')?;
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_char('"')
    }
}

impl std::fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// A line built on the stack; text past its capacity is cut.
struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Keep one byte for the newline.
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes `libmshare_preload[PID]: MESSAGE` and a newline to standard error, without
/// allocating.
pub fn log(msg: std::fmt::Arguments<'_>) {
    let mut line = Line {
        buf: [0; 1024],
        len: 0,
    };
    let _ = write!(line, "libmshare_preload[{}]: {msg}", shim_sys::getpid());
    line.buf[line.len] = b'\n';
    shim_sys::write_stderr(&line.buf[..=line.len]);
}

/// [`log`], once per process for each `flag`.
pub fn log_once(flag: &AtomicBool, msg: std::fmt::Arguments<'_>) {
    if !flag.swap(true, Ordering::Relaxed) {
        log(msg);
    }
}

/// The symbolic name of the errnos the shim can meet.
pub fn errno_name(errno: i32) -> &'static str {
    use kernel_glue::errnos::*;
    match errno {
        ENOMEM => "ENOMEM",
        ENOSPC => "ENOSPC",
        ENOENT => "ENOENT",
        EACCES => "EACCES",
        EPERM => "EPERM",
        EEXIST => "EEXIST",
        ENODEV => "ENODEV",
        ENOTCONN => "ENOTCONN",
        EINVAL => "EINVAL",
        EIO => "EIO",
        EBUSY => "EBUSY",
        EBADF => "EBADF",
        EDQUOT => "EDQUOT",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOTDIR => "ENOTDIR",
        EROFS => "EROFS",
        ECONNREFUSED => "ECONNREFUSED",
        _ => "see errno(3)",
    }
}
