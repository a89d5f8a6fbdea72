//! The `relayguard` process under test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::tools::KillOnDrop;
use crate::{wait_until, write_file, TIMEOUT};

/// Path of the `relayguard` binary: `$RELAYGUARD_BIN`, or the one next to
/// this test binary's `deps/` directory (`target/debug/relayguard`).
pub fn relayguard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RELAYGUARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/e2e-xxxx -> target/debug/relayguard
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("relayguard");
    assert!(
        bin.is_file(),
        "{} does not exist: build it first with `cargo build --workspace --bins` \
         (tests/run does), or set RELAYGUARD_BIN",
        bin.display()
    );
    bin
}

/// A running gateway, killed on drop. Its JSON log lines (stderr) are
/// collected as they come.
pub struct Gateway {
    child: KillOnDrop,
    dir: TempDir,
    config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    addrs: HashMap<String, SocketAddr>,
    exited: Option<ExitStatus>,
}

/// Listener names of a configuration, to know which "listening" lines to
/// wait for.
fn listener_names(yaml: &str) -> Vec<String> {
    let value: serde_norway::Value = serde_norway::from_str(yaml).expect("test config is YAML");
    value
        .get("listeners")
        .and_then(|l| l.as_sequence())
        .map(|seq| {
            seq.iter()
                .filter_map(|l| l.get("name")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses a JSON log line; non-JSON lines (panics, eprintln) give `None`.
fn json(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(line).ok()
}

impl Gateway {
    /// Starts `relayguard --log-format json run --config FILE` with `yaml`
    /// and waits until every listener logged its bound address.
    pub fn start(yaml: &str) -> Gateway {
        Gateway::start_in(tempfile::tempdir().expect("tempdir"), yaml)
    }

    /// Like [`Gateway::start`], with a directory already holding files the
    /// configuration names (certificates); the config is written there too.
    pub fn start_in(dir: TempDir, yaml: &str) -> Gateway {
        let config_path = dir.path().join("relayguard.yaml");
        write_file(&config_path, yaml);
        let mut child = Command::new(relayguard_bin())
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config_path)
            .env("RELAYGUARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map(KillOnDrop::new)
            .expect("spawn relayguard");
        let logs = crate::tools::collect_lines(child.stderr.take().expect("piped stderr"));
        let mut gw = Gateway {
            child,
            dir,
            config_path,
            logs,
            addrs: HashMap::new(),
            exited: None,
        };
        let names = listener_names(yaml);
        let ready = wait_until(TIMEOUT, || {
            gw.addrs = gw.listening();
            names.iter().all(|n| gw.addrs.contains_key(n)) || gw.has_exited()
        });
        if !ready || gw.has_exited() {
            panic!(
                "relayguard did not start listening ({:?}):\nconfig:\n{yaml}\nlogs:\n{}",
                gw.exited,
                gw.logs().join("\n")
            );
        }
        gw
    }

    /// `listener name -> bound address`, from the "listening" log lines.
    fn listening(&self) -> HashMap<String, SocketAddr> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| json(l))
            .filter(|v| v["message"] == "listening")
            .filter_map(|v| {
                let name = v["listener"].as_str()?.to_string();
                let addr = v["address"].as_str()?.parse().ok()?;
                Some((name, addr))
            })
            .collect()
    }

    fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited.is_some()
    }

    /// The bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no listener `{name}`; have {:?}", self.addrs))
    }

    /// The directory holding the configuration file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The JSON log lines so far whose `message` is `message`.
    pub fn log_events(&self, message: &str) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| json(l))
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// Waits for a log line containing `substr`; returns it, or panics
    /// with all logs.
    pub fn wait_for_log(&self, substr: &str, timeout: Duration) -> String {
        let mut found = None;
        wait_until(timeout, || {
            found = self.logs().into_iter().find(|l| l.contains(substr));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no log line containing {substr:?} within {timeout:?}; logs:\n{}",
                self.logs().join("\n")
            )
        })
    }

    /// Waits for a JSON log event with this `message` for which `matches`
    /// holds; panics with all logs if none comes.
    pub fn wait_for_event(
        &self,
        message: &str,
        timeout: Duration,
        mut matches: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut found = None;
        wait_until(timeout, || {
            found = self.log_events(message).into_iter().find(|v| matches(v));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no matching {message:?} log event within {timeout:?}; logs:\n{}",
                self.logs().join("\n")
            )
        })
    }

    /// Sends a signal by name (`TERM`, `HUP`, …) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
    }

    /// Waits for the process to exit; `None` if it is still running after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exited
    }

    /// Runs `relayguard check --config FILE` on `yaml` (written as
    /// `relayguard.yaml` in `dir`).
    pub fn check_in(dir: &Path, yaml: &str) -> Output {
        let path = dir.join("relayguard.yaml");
        write_file(&path, yaml);
        Command::new(relayguard_bin())
            .args(["check", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run relayguard check")
    }

    /// Runs `relayguard check --config FILE` on `yaml` in a fresh directory.
    pub fn check(yaml: &str) -> Output {
        let dir = tempfile::tempdir().expect("tempdir");
        Gateway::check_in(dir.path(), yaml)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Before printing, so that its last lines are in.
        self.child.kill_now();
        if std::thread::panicking() {
            eprintln!(
                "--- relayguard logs ---\n{}\n--- end of relayguard logs ---",
                self.logs().join("\n")
            );
        }
    }
}
