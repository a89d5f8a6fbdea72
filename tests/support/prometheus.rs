//! Observability peers: a real Prometheus server scraping the gateway,
//! `promtool`, a minimal HTTP/1.0 client for the metrics endpoint, and a
//! parser for the Prometheus text format.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::tools::KillOnDrop;
use crate::{free_port, wait_until, write_file, Gateway, TIMEOUT};

/// An HTTP response as the tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 request (so the answer is never chunked and ends at EOF).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `GET path`, panicking on I/O errors.
pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// Waits until `GET path` answers `status`; returns that response.
pub fn wait_for_status(addr: SocketAddr, path: &str, status: u16) -> HttpResponse {
    let mut last = None;
    let ok = wait_until(TIMEOUT, || {
        last = http_request(addr, "GET", path).ok();
        last.as_ref().is_some_and(|r| r.status == status)
    });
    assert!(ok, "GET {path} never answered {status}; last: {last:?}");
    last.expect("a response")
}

/// The metrics listener's address, from the gateway's
/// `{"message":"listening","listener":"metrics"}` log line.
pub fn metrics_addr(gw: &Gateway) -> SocketAddr {
    let ev = gw.wait_for_event("listening", TIMEOUT, |v| v["listener"] == "metrics");
    ev["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("bad metrics listening line: {ev}"))
}

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses `key="value",…}` (after the `{`); returns the labels and what
/// follows the `}`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices();
    loop {
        let mut key = String::new();
        loop {
            match chars.next()? {
                (i, '}') if key.is_empty() => return Some((labels, &s[i + 1..])),
                (_, ',' | ' ') if key.is_empty() => {}
                (_, '=') => break,
                (_, c) => key.push(c),
            }
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key, value);
    }
}

/// Parses the text format (names, labels with escapes, values).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(i) = line.find(['{', ' ']) else {
            continue;
        };
        let (name, rest) = line.split_at(i);
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(r) => match parse_labels(r) {
                Some(x) => x,
                None => continue,
            },
            None => (BTreeMap::new(), rest),
        };
        let value = rest.split_whitespace().next().and_then(|v| match v {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            v => v.parse().ok(),
        });
        if let Some(value) = value {
            out.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
    }
    out
}

/// Every sample name in an exposition (histograms give `_bucket`, `_sum`
/// and `_count`).
pub fn sample_names(text: &str) -> BTreeSet<String> {
    parse_exposition(text).into_iter().map(|s| s.name).collect()
}

/// Scrapes the gateway's `/metrics` at `addr` now and returns the value of
/// the sample named `name` with (at least) `labels`.
pub fn scrape_value(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    sample_value(&http_get(addr, "/metrics").body, name, labels)
}

/// The value of the one sample named `name` with (at least) `labels`.
pub fn sample_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse_exposition(text)
        .into_iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// Runs `promtool` with `args`; with `stdin` piped in when given.
pub fn promtool(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (Debian package prometheus): {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input)
            .expect("write to promtool");
    }
    child.wait_with_output().expect("wait for promtool")
}

/// A result of an instant query: the series' labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A private Prometheus server (Debian's `prometheus`), scraping the given
/// targets every second, with its own data directory. Killed on drop.
pub struct Prometheus {
    /// Killed on drop.
    _child: KillOnDrop,
    addr: SocketAddr,
    dir: TempDir,
    log: std::path::PathBuf,
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`job="relayguard"`, each
    /// with `instance` = its address) every second, evaluating
    /// `rule_files` every second, and waits for `/-/ready`.
    pub fn start(targets: &[SocketAddr], rule_files: &[&Path]) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("relayguard-prometheus.")
            .tempdir()
            .expect("tempdir");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|r| format!("  - {:?}\n", r.display().to_string()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\
             scrape_configs:\n  - job_name: relayguard\n    static_configs:\n      - targets: [{}]\n",
            if rules.is_empty() {
                "  []\n".to_string()
            } else {
                rules.concat()
            },
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        write_file(&config_path, &config);
        let log = dir.path().join("prometheus.log");
        // Losing the race for a free port makes Prometheus exit: retry.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log_file = std::fs::File::create(&log).expect("create prometheus.log");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log_file))
                .spawn()
                .map(KillOnDrop::new)
                .unwrap_or_else(|e| {
                    panic!("cannot run prometheus (Debian package prometheus): {e}")
                });
            let mut exited = false;
            let ready = wait_until(TIMEOUT, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || http_request(addr, "GET", "/-/ready").is_ok_and(|r| r.status == 200)
            });
            if ready && !exited {
                return Prometheus {
                    _child: child,
                    addr,
                    dir,
                    log,
                };
            }
        }
        panic!(
            "prometheus did not become ready; config:\n{config}\nlog:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Prometheus' own log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` as JSON; panics unless `status` is `success`.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let r = http_get(self.addr, &format!("/api/v1/{path}"));
        let v: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("/api/v1/{path}: {e}: {}", r.body));
        assert_eq!(
            v["status"],
            "success",
            "/api/v1/{path} failed: {}\nprometheus log:\n{}",
            r.body,
            self.log()
        );
        v
    }

    /// An instant query; panics if Prometheus refuses it (a syntax error).
    pub fn query(&self, promql: &str) -> Vec<QueryResult> {
        let v = self.api(&format!("query?query={}", encode(promql)));
        let data = &v["data"];
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| QueryResult {
                    labels: r["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect(),
                    value: r["value"][1]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(f64::NAN),
                })
                .collect(),
            Some("scalar") => vec![QueryResult {
                labels: BTreeMap::new(),
                value: data["result"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN),
            }],
            other => panic!("unexpected result type {other:?}: {v}"),
        }
    }

    /// Polls `promql` until `check` accepts its result; returns it. Panics
    /// with the last result and Prometheus' targets after [`TIMEOUT`].
    pub fn wait_for(
        &self,
        promql: &str,
        mut check: impl FnMut(&[QueryResult]) -> bool,
    ) -> Vec<QueryResult> {
        let mut last = Vec::new();
        let ok = wait_until(TIMEOUT, || {
            last = self.query(promql);
            check(&last)
        });
        if !ok {
            let targets = http_get(self.addr, "/api/v1/targets").body;
            panic!(
                "query {promql:?} never matched; last result: {last:?}\ntargets: {targets}\nlog:\n{}",
                self.log()
            );
        }
        last
    }

    /// Waits until `promql` returns exactly one series with `value`.
    pub fn wait_for_value(&self, promql: &str, value: f64) -> QueryResult {
        let r = self.wait_for(promql, |r| r.len() == 1 && r[0].value == value);
        r.into_iter().next().expect("one series")
    }
}

/// `smtp-sink` on a chosen address, without a dump directory: a backend
/// that can be stopped and started again on the same port. Killed on drop.
pub struct PlainSink {
    /// Killed on drop.
    _child: KillOnDrop,
    addr: SocketAddr,
}

impl PlainSink {
    /// Starts smtp-sink on `addr`; panics if it is not up in [`TIMEOUT`].
    pub fn start_at(addr: SocketAddr) -> PlainSink {
        let mut cmd = Command::new(if Path::new("/usr/sbin/smtp-sink").exists() {
            "/usr/sbin/smtp-sink"
        } else {
            "smtp-sink"
        });
        if std::fs::metadata("/proc/self").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        }) {
            cmd.args(["-u", "nobody"]);
        }
        let mut child = cmd
            .arg(addr.to_string())
            .arg("64")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(KillOnDrop::new)
            .unwrap_or_else(|e| panic!("cannot run smtp-sink (Debian package postfix): {e}"));
        let mut exited = false;
        let up = wait_until(TIMEOUT, || {
            exited = matches!(child.try_wait(), Ok(Some(_)));
            exited || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        });
        assert!(up && !exited, "smtp-sink did not start on {addr}");
        PlainSink {
            _child: child,
            addr,
        }
    }

    /// On a free loopback port.
    pub fn start() -> PlainSink {
        PlainSink::start_at(SocketAddr::from(([127, 0, 0, 1], free_port())))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_format() {
        let text = "# HELP a_total x\n# TYPE a_total counter\n\
                    a_total{listener=\"smtp\",reason=\"a \\\"b\\\" c\"} 3\n\
                    b_bucket{le=\"+Inf\"} 7\nc 1.5e3\n";
        let s = parse_exposition(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "a_total");
        assert_eq!(s[0].labels["reason"], "a \"b\" c");
        assert_eq!(s[0].labels["listener"], "smtp");
        assert_eq!(s[1].labels["le"], "+Inf");
        assert_eq!(s[2].value, 1500.0);
        assert_eq!(
            sample_value(text, "a_total", &[("listener", "smtp")]),
            Some(3.0)
        );
        assert_eq!(
            sample_names(text).into_iter().collect::<Vec<_>>(),
            ["a_total", "b_bucket", "c"]
        );
    }

    #[test]
    fn encodes_queries() {
        assert_eq!(encode("sum(a{b=\"c\"})"), "sum%28a%7Bb%3D%22c%22%7D%29");
    }
}
