//! The bench's side of its attacher processes: starting them (this same binary in the
//! hidden `attacher` mode), reading their reports, sending commands, and making sure
//! none outlives the bench.
//!
//! All attachers write their report lines into one shared datagram socket (their standard
//! output; one line is one datagram, so lines of different processes never mix), read by
//! one thread, so the bench holds one descriptor per attacher (its stdin) and no thread per
//! process: hundreds of attachers cost the bench nothing that would disturb the page-table
//! counters it samples.

use std::collections::{HashMap, VecDeque};
use std::io::{self, PipeReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde_json::Value;

use crate::attacher::AttachKind;
use crate::run::BenchError;

/// What an attacher should map.
#[derive(Debug, Clone)]
pub struct Spec {
    /// How it maps.
    pub kind: AttachKind,
    /// File to open, if any.
    pub path: Option<PathBuf>,
    /// Bytes to map.
    pub size: u64,
    /// Bytes between touches.
    pub stride: u64,
    /// Populate instead of touching (see the attacher's `--populate`).
    pub populate: bool,
}

impl Spec {
    /// The attacher's command line after the subcommand.
    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--kind".into(),
            self.kind
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
                .into(),
            "--size".into(),
            self.size.to_string().into(),
            "--stride".into(),
            self.stride.to_string().into(),
        ];
        if let Some(p) = &self.path {
            a.push("--path".into());
            a.push(p.into());
        }
        if self.populate {
            a.push("--populate".into());
        }
        a
    }
}

/// A running attacher process; killed and reaped on drop.
#[derive(Debug)]
pub struct Attacher {
    id: u64,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Attacher {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command line.
    ///
    /// # Errors
    /// [`BenchError::Attacher`] when its input is closed (the process died).
    pub fn send(&mut self, cmd: &str) -> Result<(), BenchError> {
        let pid = self.pid();
        let stdin = self.stdin.as_mut().ok_or_else(|| BenchError::Attacher {
            pid,
            what: "its input is already closed".into(),
        })?;
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| BenchError::Attacher {
                pid,
                what: format!("cannot send {cmd:?}: {e}"),
            })
    }

    fn kill(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            // kill(2) of an exited but unreaped child is harmless: the pid is still ours.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Attacher {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The datagram that stops the reader thread (datagram sockets have no end of file).
const QUIT: &str = "quit";

/// Starts attachers and reads their reports.
#[derive(Debug)]
pub struct Fleet {
    me: PathBuf,
    writer: UnixDatagram,
    lines: Receiver<(u64, Value)>,
    pending: HashMap<u64, VecDeque<Value>>,
    next_id: u64,
    stop: Arc<AtomicBool>,
}

impl Fleet {
    /// Sets up the shared report socket and its reader thread. `stop` is the bench's
    /// interrupt flag: every wait returns [`BenchError::Interrupted`] soon after it is set.
    ///
    /// # Errors
    /// Creating the socket pair or the thread.
    pub fn new(stop: Arc<AtomicBool>) -> io::Result<Fleet> {
        // Attachers run this very binary through its /proc link, even if a rebuild has
        // replaced the file on disk meanwhile.
        let me = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let (reader, writer) = UnixDatagram::pair()?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("bench-reports".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = reader.recv(&mut buf) {
                    let line = String::from_utf8_lossy(&buf[..n]);
                    let line = line.trim_end();
                    if line == QUIT {
                        break;
                    }
                    match serde_json::from_str::<Value>(line) {
                        Ok(v) => {
                            let id = v["id"].as_u64().unwrap_or(u64::MAX);
                            if tx.send((id, v)).is_err() {
                                break;
                            }
                        }
                        Err(_) => eprintln!("bench: attacher said: {line}"),
                    }
                }
            })?;
        Ok(Fleet {
            me,
            writer,
            lines,
            pending: HashMap::new(),
            next_id: 0,
            stop,
        })
    }

    /// Whether the bench was interrupted.
    pub fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Returns [`BenchError::Interrupted`] when the bench was interrupted.
    ///
    /// # Errors
    /// [`BenchError::Interrupted`].
    pub fn check(&self) -> Result<(), BenchError> {
        if self.interrupted() {
            Err(BenchError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Starts one attacher. It begins mapping and touching at once; collect its report
    /// with [`Fleet::report`].
    ///
    /// # Errors
    /// [`BenchError::Spawn`].
    pub fn spawn(&mut self, spec: &Spec) -> Result<Attacher, BenchError> {
        self.start(spec, None)
    }

    /// Starts one storm attacher whose standard input is `gate`, the read end of a pipe
    /// shared by every attacher of the storm: it reports ready, then waits for the end of
    /// that input before it attaches.
    ///
    /// # Errors
    /// [`BenchError::Spawn`].
    pub fn spawn_gated(&mut self, spec: &Spec, gate: &PipeReader) -> Result<Attacher, BenchError> {
        let input = gate.try_clone().map_err(BenchError::Spawn)?;
        self.start(spec, Some(input))
    }

    fn start(&mut self, spec: &Spec, gate: Option<PipeReader>) -> Result<Attacher, BenchError> {
        self.check()?;
        let id = self.next_id;
        self.next_id += 1;
        let mut cmd = Command::new(&self.me);
        cmd.arg("attacher")
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--id")
            .arg(id.to_string())
            .args(spec.args());
        let storm = gate.is_some();
        match gate {
            Some(g) => {
                cmd.arg("--storm").stdin(Stdio::from(g));
            }
            None => {
                cmd.stdin(Stdio::piped());
            }
        }
        let out = OwnedFd::from(self.writer.try_clone().map_err(BenchError::Spawn)?);
        cmd.stdout(Stdio::from(out)).stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(BenchError::Spawn)?;
        let stdin = if storm { None } else { child.stdin.take() };
        Ok(Attacher { id, child, stdin })
    }

    /// Waits at most `limit` for the next report of `a`.
    ///
    /// # Errors
    /// [`BenchError::Interrupted`]; [`BenchError::Attacher`] when it reported a failure,
    /// died, or said nothing in time (it is killed then).
    pub fn report(&mut self, a: &mut Attacher, limit: Duration) -> Result<Value, BenchError> {
        let deadline = Instant::now() + limit;
        let mut exited: Option<(ExitStatus, Instant)> = None;
        loop {
            if let Some(v) = self.pending.get_mut(&a.id).and_then(VecDeque::pop_front) {
                if v["ok"].as_bool() == Some(true) {
                    return Ok(v);
                }
                let errno = v["errno"].as_i64().unwrap_or(0);
                return Err(BenchError::Attacher {
                    pid: a.pid(),
                    what: format!(
                        "{} (errno {errno})",
                        v["error"].as_str().unwrap_or("unknown failure")
                    ),
                });
            }
            self.check()?;
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok((id, v)) => self.pending.entry(id).or_default().push_back(v),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(BenchError::Attacher {
                        pid: a.pid(),
                        what: "the report socket closed".into(),
                    });
                }
            }
            let now = Instant::now();
            match exited {
                // A report written just before exit may still be in the socket: allow it a
                // moment to arrive.
                Some((status, at)) if now.duration_since(at) > Duration::from_millis(500) => {
                    return Err(BenchError::Attacher {
                        pid: a.pid(),
                        what: format!("exited without a report ({status})"),
                    });
                }
                Some(_) => {}
                None => {
                    if let Ok(Some(status)) = a.child.try_wait() {
                        exited = Some((status, now));
                    }
                }
            }
            if now > deadline {
                a.kill();
                return Err(BenchError::Attacher {
                    pid: a.pid(),
                    what: format!("no report within {limit:?}; killed"),
                });
            }
        }
    }

    /// Sends `cmd` to every attacher first, then collects one report from each, so they
    /// work in parallel.
    ///
    /// # Errors
    /// As [`Fleet::report`].
    pub fn command_all(
        &mut self,
        all: &mut [Attacher],
        cmd: &str,
        limit: Duration,
    ) -> Result<Vec<Value>, BenchError> {
        for a in all.iter_mut() {
            a.send(cmd)?;
        }
        all.iter_mut().map(|a| self.report(a, limit)).collect()
    }

    /// Lets every attacher go (closes their inputs), waits at most `limit` for them all to
    /// exit, and kills the rest. Returns once every process is reaped.
    ///
    /// # Errors
    /// [`BenchError::Interrupted`] (the processes are killed and reaped first).
    pub fn release(&mut self, mut all: Vec<Attacher>, limit: Duration) -> Result<(), BenchError> {
        for a in all.iter_mut() {
            drop(a.stdin.take());
        }
        let deadline = Instant::now() + limit;
        for a in all.iter_mut() {
            loop {
                match a.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline || self.interrupted() => {
                        a.kill();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
        // Reports nobody asked for (none are expected) must not pile up.
        for a in &all {
            self.pending.remove(&a.id);
        }
        drop(all);
        self.check()
    }
}

impl Fleet {
    /// Kills every attacher of `all` (`SIGKILL` to all first, so they exit in parallel)
    /// and reaps them.
    pub fn kill_all(&mut self, mut all: Vec<Attacher>) {
        for a in all.iter_mut() {
            if let Ok(None) = a.child.try_wait() {
                let _ = a.child.kill();
            }
        }
        for a in &all {
            self.pending.remove(&a.id);
        }
        // Dropping waits for each.
        drop(all);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.writer.send(QUIT.as_bytes());
    }
}
