//! [`Proc`]: one of our binaries run as a child process, its output read line
//! by line, signalled by PID and killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A running child.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<(Stream, String)>,
    /// Every line read so far, for failure messages.
    pub seen: Vec<(Stream, String)>,
}

impl Proc {
    /// Starts `bin` with `args`, piping stdout and stderr.
    pub fn spawn(bin: impl AsRef<Path>, args: &[&str]) -> Self {
        let bin = bin.as_ref();
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let (tx, rx) = mpsc::channel();
        for (stream, pipe) in [
            (
                Stream::Stdout,
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
            (
                Stream::Stderr,
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
        ] {
            let tx = tx.clone();
            let pipe = pipe.expect("piped");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send((stream, line)).is_err() {
                        return;
                    }
                }
            });
        }
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line containing `needle` and returns it. Panics with the
    /// output so far after `patience`.
    pub fn wait_for_line(&mut self, needle: &str, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((s, line)) => {
                    self.seen.push((s, line.clone()));
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {patience:?}; output:\n{}",
                    self.output()
                ),
            }
        }
    }

    /// Everything read so far, one line each.
    pub fn output(&self) -> String {
        self.seen
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Sends a signal by PID with kill(1): `"TERM"`, `"INT"`, `"KILL"`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits for the child to exit, draining its output; panics after `patience`.
    pub fn wait_exit(&mut self, patience: Duration) -> ExitStatus {
        let deadline = Instant::now() + patience;
        loop {
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Collect what the reader threads still hold.
                std::thread::sleep(Duration::from_millis(50));
                while let Ok(l) = self.lines.try_recv() {
                    self.seen.push(l);
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit within {patience:?}; output:\n{}",
                self.pid(),
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `bin`, waits for a line containing `started`, sends SIGTERM and
/// asserts a clean exit 0 in time. Returns everything it printed.
pub fn assert_clean_sigterm(bin: &str, args: &[&str], started: &str) -> String {
    let mut p = Proc::spawn(bin, args);
    p.wait_for_line(started, Duration::from_secs(20));
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "{bin} exited {status:?} after SIGTERM; output:\n{}",
        p.output()
    );
    p.output()
}

/// Runs `bin` with bad flags and asserts it exits 64 (EX_USAGE) without a
/// panic, its output naming every one of `wants`.
pub fn assert_usage_error(bin: &str, args: &[&str], wants: &[&str]) {
    let mut p = Proc::spawn(bin, args);
    let status = p.wait_exit(Duration::from_secs(10));
    let out = p.output();
    assert_eq!(status.code(), Some(64), "{bin} {args:?}; output:\n{out}");
    for want in wants {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("panicked"), "{out}");
}
