//! Small shared helpers: ports, waiting, external tools.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// How long any wait for the gateway or a peer may take. Generous, because
/// the suite runs in parallel on a loaded two-core machine; a passing test
/// never waits this long.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A loopback port that was free a moment ago (bound to port 0, released).
/// Whoever uses it must cope with losing a race for it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A loopback address nobody listens on: connecting to it is refused.
pub fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Splits a command line on whitespace: `swaks(&words("--to x@example.test"))`.
/// For arguments without spaces only.
pub fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

/// Runs a tool under `timeout 60` so a hung peer cannot hang the suite.
fn run_tool<S: AsRef<OsStr>>(tool: &str, args: &[S]) -> Output {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new("timeout")
        .arg("60")
        .arg(tool)
        .args(&args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {tool} (is it installed? tests/run installs it): {e}")
        });
    if out.status.code() == Some(124) {
        panic!(
            "{tool} {args:?} timed out after 60 s\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs `swaks` with the given arguments (60 s limit).
pub fn swaks<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_tool("swaks", args)
}

/// Runs `curl` with the given arguments (60 s limit).
pub fn curl<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_tool("curl", args)
}

/// Runs `nmap` with the given arguments (60 s limit).
pub fn nmap<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_tool("nmap", args)
}

/// Collects a child's output lines (its log) as they come, from a thread
/// of their own, so that a test can read them while the child runs.
pub fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// A peer process (smtp-sink, haproxy, prometheus, samba, relayguard)
/// that is killed and reaped when the guard is dropped, so that neither a
/// finished nor a panicking test leaves it running. Derefs to the
/// [`Child`].
pub struct KillOnDrop(Child);

impl KillOnDrop {
    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop(child)
    }

    /// Kills and reaps the process now (dropping does it too), for owners
    /// that must do it before something else. A process that already
    /// exited and was reaped is left alone: std does not signal it again.
    pub fn kill_now(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill_now();
    }
}
