//! A real HAProxy (Debian `haproxy`) in TCP mode in front of the gateway,
//! sending the PROXY protocol — what a load-balanced installation looks
//! like.
//!
//! ```no_run
//! # use relayguard_e2e::{Haproxy, Frontend, ProxyHeader};
//! # let gateway: std::net::SocketAddr = "127.0.0.1:2525".parse().unwrap();
//! let lb = Haproxy::start(&[Frontend::new("v2", gateway, ProxyHeader::V2)]);
//! let entry = lb.addr("v2"); // clients connect here
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use tempfile::TempDir;

use crate::tools::KillOnDrop;
use crate::{free_port, wait_until, write_file, TIMEOUT};

/// What HAProxy prepends to each connection toward the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// `send-proxy`: the text header, `PROXY TCP4 … \r\n`.
    V1,
    /// `send-proxy-v2`: the binary header.
    V2,
    /// Nothing: a plain TCP relay (the gateway sees HAProxy's address).
    None,
}

/// One frontend/backend pair: HAProxy listens on a fresh loopback port and
/// forwards to `target`.
#[derive(Debug, Clone)]
pub struct Frontend {
    pub name: String,
    pub target: SocketAddr,
    pub header: ProxyHeader,
    /// Source address of HAProxy's connection to `target` (`source` on the
    /// server line); loopback 127.0.0.1 when `None`.
    pub source: Option<IpAddr>,
}

impl Frontend {
    pub fn new(name: &str, target: SocketAddr, header: ProxyHeader) -> Frontend {
        Frontend {
            name: name.to_string(),
            target,
            header,
            source: None,
        }
    }

    /// Connect to the gateway from `source` (e.g. 127.0.0.3, an address the
    /// gateway does not trust).
    pub fn from_source(mut self, source: IpAddr) -> Frontend {
        self.source = Some(source);
        self
    }
}

/// A running `haproxy -db`, killed on drop. Its log (stderr) is kept for
/// failure messages.
pub struct Haproxy {
    child: KillOnDrop,
    _dir: TempDir,
    addrs: HashMap<String, SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
}

fn haproxy_path() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/haproxy");
    if p.exists() {
        p
    } else {
        PathBuf::from("haproxy")
    }
}

/// Is something listening on 127.0.0.1:`port`? Read from /proc/net/tcp, so
/// the check opens no connection (which HAProxy would forward to the
/// gateway, with a PROXY header, as a session of its own).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1] == want && f[3] == "0A"
            })
        })
        .unwrap_or(false)
}

fn config(frontends: &[(Frontend, u16)]) -> String {
    let mut c = String::from(
        "global\n\
         \x20   log stderr format raw local0 info\n\
         \x20   maxconn 256\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   log global\n\
         \x20   option tcplog\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n",
    );
    for (f, port) in frontends {
        let send = match f.header {
            ProxyHeader::V1 => " send-proxy",
            ProxyHeader::V2 => " send-proxy-v2",
            ProxyHeader::None => "",
        };
        let source = f.source.map(|s| format!(" source {s}")).unwrap_or_default();
        let _ = write!(
            c,
            "frontend fe_{name}\n\
             \x20   bind 127.0.0.1:{port}\n\
             \x20   default_backend be_{name}\n\
             backend be_{name}\n\
             \x20   server gateway {target}{send}{source}\n",
            name = f.name,
            target = f.target,
        );
    }
    c
}

impl Haproxy {
    /// Starts HAProxy with these frontends and waits until every one is
    /// listening.
    pub fn start(frontends: &[Frontend]) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("haproxy.cfg");
        // Losing the race for a free port makes HAProxy exit: try again.
        for _ in 0..5 {
            let ports: Vec<(Frontend, u16)> =
                frontends.iter().map(|f| (f.clone(), free_port())).collect();
            let text = config(&ports);
            write_file(&cfg, &text);
            let mut child = Command::new(haproxy_path())
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map(KillOnDrop::new)
                .unwrap_or_else(|e| panic!("cannot run haproxy (Debian package haproxy): {e}"));
            let logs = crate::tools::collect_lines(child.stderr.take().expect("piped stderr"));
            let mut exited = false;
            let up = wait_until(TIMEOUT, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || ports.iter().all(|(_, p)| listening(*p))
            });
            if up && !exited {
                let addrs = ports
                    .iter()
                    .map(|(f, p)| (f.name.clone(), SocketAddr::from((Ipv4Addr::LOCALHOST, *p))))
                    .collect();
                return Haproxy {
                    child,
                    _dir: dir,
                    addrs,
                    logs,
                };
            }
            drop(child);
            eprintln!(
                "haproxy did not start; config:\n{text}\nlog:\n{}",
                logs.lock().unwrap().join("\n")
            );
        }
        panic!("haproxy did not start");
    }

    /// Where clients connect for the frontend called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no frontend `{name}`; have {:?}", self.addrs))
    }

    /// HAProxy's log lines so far (one `option tcplog` line per connection).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Before printing, so that its last lines are in.
        self.child.kill_now();
        if std::thread::panicking() {
            eprintln!(
                "--- haproxy log ---\n{}\n--- end of haproxy log ---",
                self.logs().join("\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_section_pair_per_frontend() {
        let gw: SocketAddr = "127.0.0.1:2525".parse().unwrap();
        let c = config(&[
            (Frontend::new("a", gw, ProxyHeader::V1), 3000),
            (
                Frontend::new("b", gw, ProxyHeader::V2).from_source("127.0.0.3".parse().unwrap()),
                3001,
            ),
        ]);
        assert!(c.contains("    mode tcp\n"), "{c}");
        assert!(
            c.contains("frontend fe_a\n    bind 127.0.0.1:3000\n"),
            "{c}"
        );
        assert!(
            c.contains("    server gateway 127.0.0.1:2525 send-proxy\n"),
            "{c}"
        );
        assert!(
            c.contains("    server gateway 127.0.0.1:2525 send-proxy-v2 source 127.0.0.3\n"),
            "{c}"
        );
    }
}
