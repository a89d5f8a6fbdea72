//! Postfix's `smtp-sink` as the backend MTA, capturing every message.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use crate::tools::KillOnDrop;
use crate::{free_port, wait_until, TIMEOUT};

/// One message as smtp-sink captured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkMessage {
    /// `X-Helo-Args`: what the gateway sent in EHLO/HELO.
    pub helo: Option<String>,
    /// `X-Client-Proto`: `SMTP` or `ESMTP`.
    pub proto: String,
    /// `X-Mail-Args`, e.g. `<a@b.test> SIZE=123`.
    pub mail_args: String,
    /// One `X-Rcpt-Args` per recipient, in order, e.g. `<x@example.test>`.
    pub rcpt_args: Vec<String>,
    /// The message as the backend received it (dot-unstuffed; smtp-sink
    /// stores lines ending in `\n`), starting with the gateway's Received.
    pub data: String,
    pub file: PathBuf,
}

/// The address inside the first `<...>` of SMTP command arguments.
fn angle_addr(args: &str) -> &str {
    args.strip_prefix('<')
        .and_then(|s| s.split_once('>'))
        .map(|(a, _)| a)
        .unwrap_or(args)
}

impl SinkMessage {
    /// The envelope sender, without the angle brackets.
    pub fn mail_from(&self) -> &str {
        angle_addr(&self.mail_args)
    }

    /// The envelope recipients, without the angle brackets.
    pub fn rcpt_to(&self) -> Vec<&str> {
        self.rcpt_args.iter().map(|r| angle_addr(r)).collect()
    }

    /// The first header (unfolded, without the field name), if it is a
    /// `Received:` header — the one the gateway adds.
    pub fn first_received(&self) -> Option<String> {
        let rest = self.data.strip_prefix("Received:")?;
        let mut lines = rest.split('\n');
        let mut h = lines.next()?.to_string();
        for l in lines {
            if l.starts_with([' ', '\t']) {
                h.push(' ');
                h.push_str(l.trim_start());
            } else {
                break;
            }
        }
        Some(h.trim().to_string())
    }

    /// The message without its first header (the gateway's Received),
    /// i.e. what the client sent, with `\n` line ends.
    pub fn without_first_received(&self) -> &str {
        let mut pos = 0;
        let mut first = true;
        for line in self.data.split_inclusive('\n') {
            if !first && !line.starts_with([' ', '\t']) {
                break;
            }
            first = false;
            pos += line.len();
        }
        &self.data[pos..]
    }

    /// Session id from the gateway's `... with ESMTP id XXXX;` clause.
    pub fn session_id(&self) -> Option<String> {
        let r = self.first_received()?;
        let after = r.split(" id ").nth(1)?;
        Some(after.split(';').next()?.trim().to_string())
    }

    /// Asserts that the backend got exactly `body` (CRLF or LF line ends)
    /// after one Received header added by RelayGuard on `host` with
    /// `protocol` (`ESMTP`, `ESMTPS`, `SMTP`).
    pub fn assert_relayed(&self, body: &str, host: &str, protocol: &str) {
        let received = self.first_received().unwrap_or_else(|| {
            panic!(
                "message does not start with a Received header:\n{}",
                self.data
            )
        });
        let by = format!("by {host} (RelayGuard) with {protocol} id ");
        assert!(
            received.contains(&by),
            "Received header lacks {by:?}: {received}"
        );
        assert!(
            self.session_id().is_some_and(|id| !id.is_empty()),
            "no session id: {received}"
        );
        assert_eq!(
            self.data.matches("(RelayGuard)").count(),
            1,
            "exactly one RelayGuard Received header expected:\n{}",
            self.data
        );
        let expected = body.replace("\r\n", "\n");
        assert_eq!(
            self.without_first_received(),
            expected,
            "body differs; whole message:\n{}",
            self.data
        );
    }
}

/// Parses one smtp-sink dump file.
fn parse_dump(file: &Path, text: &str) -> SinkMessage {
    let mut msg = SinkMessage {
        helo: None,
        proto: String::new(),
        mail_args: String::new(),
        rcpt_args: Vec::new(),
        data: String::new(),
        file: file.to_path_buf(),
    };
    let mut lines = text.split_inclusive('\n');
    // smtp-sink's own headers, ending with its three-line Received header.
    for line in lines.by_ref() {
        let l = line.trim_end_matches('\n');
        if let Some(v) = l.strip_prefix("X-Helo-Args: ") {
            msg.helo = Some(v.to_string());
        } else if let Some(v) = l.strip_prefix("X-Client-Proto: ") {
            msg.proto = v.to_string();
        } else if let Some(v) = l.strip_prefix("X-Mail-Args: ") {
            msg.mail_args = v.to_string();
        } else if let Some(v) = l.strip_prefix("X-Rcpt-Args: ") {
            msg.rcpt_args.push(v.to_string());
        } else if l.starts_with("Received: ") {
            break;
        }
    }
    // Its Received header has two continuation lines (by ..., date).
    let rest: Vec<&str> = lines.collect();
    let skip = rest.iter().take_while(|l| l.starts_with('\t')).count();
    let mut data: String = rest[skip..].concat();
    // smtp-sink ends every dump with an empty line of its own.
    if data.ends_with("\n\n") || data == "\n" {
        data.pop();
    }
    msg.data = data;
    msg
}

/// A running `smtp-sink`, killed on drop.
pub struct Sink {
    /// Killed on drop.
    _child: KillOnDrop,
    addr: SocketAddr,
    dir: TempDir,
    delivered: Arc<AtomicUsize>,
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn smtp_sink_path() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/smtp-sink");
    if p.exists() {
        p
    } else {
        PathBuf::from("smtp-sink")
    }
}

impl Sink {
    /// Starts smtp-sink on a free loopback port with `extra_flags` (see
    /// `man smtp-sink`: `-e -P -E -8` for a HELO-only backend, …), dumping
    /// each message to a file.
    pub fn start(extra_flags: &[&str]) -> Sink {
        // smtp-sink runs as `nobody` under root: its dump directory must be
        // writable by that user, and every parent traversable.
        let dir = tempfile::Builder::new()
            .prefix("relayguard-sink.")
            .tempdir_in("/tmp")
            .expect("tempdir in /tmp");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod dump dir");
        let template = dir.path().join("%Y%m%d%H%M%S.");
        // Losing the race for a free port makes smtp-sink exit: try again.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut cmd = Command::new(smtp_sink_path());
            if running_as_root() {
                cmd.args(["-u", "nobody"]);
            }
            cmd.arg("-c")
                .arg("-d")
                .arg(&template)
                .args(extra_flags)
                .arg(addr.to_string())
                .arg("256")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = cmd
                .spawn()
                .map(KillOnDrop::new)
                .unwrap_or_else(|e| panic!("cannot run smtp-sink (Debian package postfix): {e}"));
            let delivered = Arc::new(AtomicUsize::new(0));
            let stdout = child.stdout.take().expect("piped stdout");
            let counter = delivered.clone();
            std::thread::spawn(move || count_messages(stdout, &counter));
            let mut exited = false;
            let up = wait_until(TIMEOUT, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            });
            if up && !exited {
                return Sink {
                    _child: child,
                    addr,
                    dir,
                    delivered,
                };
            }
        }
        panic!("smtp-sink did not start (flags {extra_flags:?})");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages whose final dot smtp-sink acknowledged (its `-c` counter).
    pub fn delivered(&self) -> usize {
        self.delivered.load(Ordering::SeqCst)
    }

    fn dump_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(self.dir.path())
            .expect("read dump dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| {
                (
                    e.metadata().and_then(|m| m.modified()).expect("mtime"),
                    e.path(),
                )
            })
            .collect();
        files.sort();
        files.into_iter().map(|(_, p)| p).collect()
    }

    /// Every captured message, oldest first. A transaction still in
    /// progress has a file too: call [`Sink::wait_for_messages`] first.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.dump_files()
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f)
                    .unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
                parse_dump(f, &text)
            })
            .collect()
    }

    /// Waits until `n` messages were delivered and no aborted transaction
    /// still has a file, then returns all messages. Panics if that does
    /// not happen within `timeout` or more than `n` arrive.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        let settled = wait_until(timeout, || {
            let d = self.delivered();
            d >= n && self.dump_files().len() == d
        });
        let msgs = self.messages();
        assert!(
            settled && msgs.len() == n,
            "expected {n} message(s) at the sink, counter says {} and there are {} file(s): {msgs:#?}",
            self.delivered(),
            msgs.len()
        );
        msgs
    }
}

/// Follows smtp-sink's `-c` output (`sess=1 quit=1 mesg=1\r`, rewritten
/// in place) and keeps the message count.
fn count_messages(mut stdout: impl Read, counter: &AtomicUsize) {
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\r' || b == b'\n') {
            let record: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&record);
            if let Some(m) = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("mesg="))
            {
                if let Ok(m) = m.trim().parse::<usize>() {
                    counter.fetch_max(m, Ordering::SeqCst);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_dump() {
        let text = "X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: relay.test\n\
                    X-Mail-Args: <a@b.test> SIZE=10\nX-Rcpt-Args: <x@example.test>\nX-Rcpt-Args: <y@example.test>\n\
                    Received: from relay.test ([127.0.0.1])\n\tby smtp-sink (smtp-sink) with ESMTP id 1;\n\tThu, 1 Jan 2026 00:00:00 +0000 (UTC)\n\
                    Received: from c ([127.0.0.1])\n\tby relay.test (RelayGuard) with ESMTP id ABC;\n\tdate\n\
                    Subject: hi\n\nbody\n\n";
        let m = parse_dump(Path::new("f"), text);
        assert_eq!(m.helo.as_deref(), Some("relay.test"));
        assert_eq!(m.mail_from(), "a@b.test");
        assert_eq!(m.rcpt_to(), ["x@example.test", "y@example.test"]);
        assert_eq!(m.session_id().as_deref(), Some("ABC"));
        assert_eq!(m.without_first_received(), "Subject: hi\n\nbody\n");
        m.assert_relayed("Subject: hi\r\n\r\nbody\r\n", "relay.test", "ESMTP");
    }
}
