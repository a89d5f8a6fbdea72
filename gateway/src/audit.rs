//! The audit log: one JSON object per line per transaction decision, for
//! a SIEM, apart from the debug log on stderr.
//!
//! A session fills an [`AuditRecord`] and hands it to [`AuditLog::record`],
//! which serialises it and queues the line for a writer thread. The queue
//! is bounded: when the sink cannot keep up (a full disk, a blocked pipe)
//! records are dropped and counted in
//! `relayguard_audit_records_total{result="dropped"}` rather than ever
//! making a client wait on the audit log.
//!
//! **What is never in a record:** passwords, password hashes, NTLM
//! messages or any part of them (challenges, responses, session keys),
//! SASL exchanges, message bodies or headers. The record type has no field
//! that could hold them: the principal is the verified `DOMAIN\user` and
//! the mechanism is its name. Envelope addresses and the HELO name are
//! client-supplied text; JSON escaping keeps them from forging records.
//!
//! ```text
//! {"time":"2025-01-01T12:00:00.123Z","event":"transaction","session":"8KQ2M4X7ZP1C",
//!  "client":"192.0.2.7:50123","listener":"smtp","tls":{"version":"TLSv1.3","cipher":"TLS13_AES_256_GCM_SHA384"},
//!  "helo":"pc17.corp.example","principal":"CORP\\alice","mechanism":"NTLM","mail_from":"alice@corp.example",
//!  "recipients":[{"address":"bob@ext.example","outcome":"relay_allowed","rule":"staff"}],
//!  "decision":"delivered","rule":"staff","backend_reply":"250 2.0.0 Ok: queued","size":5120,"duration_ms":41}
//! ```

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::smtp::reply::Reply;
use crate::tls::TlsInfo;

/// `audit:` in the configuration.
///
/// ```yaml
/// audit:
///   sink: file              # stdout (default) | file | none
///   path: /var/log/relayguard/audit.jsonl   # with `file`; appended to, created if missing
///   queue: 4096             # records waiting for the writer before new ones are dropped
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default)]
    pub sink: AuditSink,
    /// The file for `sink: file` (relative to the configuration file).
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_queue")]
    pub queue: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditSink {
    /// Standard output (the debug log goes to standard error).
    #[default]
    Stdout,
    /// Appended to `path`.
    File,
    /// No audit log.
    None,
}

fn default_queue() -> usize {
    4096
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            sink: AuditSink::default(),
            path: None,
            queue: default_queue(),
        }
    }
}

impl AuditConfig {
    /// Checks the combination of fields. The error is `(field, message)`
    /// for the configuration's located errors.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match (self.sink, &self.path) {
            (AuditSink::File, None) => {
                return Err(("audit.path", "required with `sink: file`".into()))
            }
            (AuditSink::Stdout | AuditSink::None, Some(_)) => {
                return Err(("audit.path", "only allowed with `sink: file`".into()))
            }
            _ => {}
        }
        if self.queue == 0 {
            return Err(("audit.queue", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditDecision {
    /// The backend accepted the message (2xx to the final dot).
    Delivered,
    /// The client was told to retry: the backend said 4xx, or failed.
    Deferred,
    /// The backend refused the message (5xx).
    Rejected,
    /// Every recipient was refused by the relay policy.
    RelayDenied,
    /// The gateway refused the message itself (size, line length, bare
    /// line endings, …): see `reason`.
    Refused,
    /// The client disappeared during DATA; nothing was delivered.
    Aborted,
    /// The transaction ended (RSET, QUIT, disconnect) without DATA and not
    /// only because of relay refusals.
    Abandoned,
}

/// One recipient and what the policy said about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecipient {
    pub address: String,
    /// The policy's decision label (`local`, `relay_allowed`,
    /// `relay_denied`, …), or the backend's refusal (`backend_refused`).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditTls {
    pub version: &'static str,
    pub cipher: String,
}

/// One audit record. Build it with [`AuditRecord::transaction`] at MAIL
/// FROM and the setters (every one optional), add recipients as they are
/// decided, and hand it to [`AuditLog::record`] when the transaction is
/// decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// When the transaction began (RFC 3339, UTC, milliseconds).
    pub time: String,
    pub event: &'static str,
    pub session: String,
    pub client: SocketAddr,
    pub listener: String,
    pub tls: Option<AuditTls>,
    pub helo: Option<String>,
    /// `DOMAIN\user` once authenticated.
    pub principal: Option<String>,
    pub mechanism: Option<&'static str>,
    /// The envelope sender (empty for the null sender `<>`).
    pub mail_from: Option<String>,
    pub recipients: Vec<AuditRecipient>,
    pub decision: AuditDecision,
    /// The relay rule behind the decision.
    pub rule: Option<String>,
    /// A short machine-readable reason (`bare_lf`, `backend_error=data_done`, …).
    pub reason: Option<String>,
    /// The backend's final reply, on one line (`250 2.0.0 Ok: queued as X`).
    pub backend_reply: Option<String>,
    /// Message size in octets (dot-unstuffed), when DATA was received.
    pub size: Option<u64>,
    /// From the start of the transaction to [`AuditLog::record`] (or as
    /// set with [`AuditRecord::duration`]).
    pub duration_ms: u64,
    #[serde(skip)]
    started: Instant,
    #[serde(skip)]
    duration_set: bool,
}

/// The longest client-supplied string kept in a record; longer ones are
/// cut (an SMTP path is at most 256 octets anyway).
const MAX_FIELD: usize = 512;

fn clip(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl AuditRecord {
    /// A transaction record of session `session` from `client` on
    /// `listener`; the decision defaults to `abandoned` until set.
    pub fn transaction(session: &str, client: SocketAddr, listener: &str) -> AuditRecord {
        AuditRecord {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            event: "transaction",
            session: session.to_string(),
            client,
            listener: listener.to_string(),
            tls: None,
            helo: None,
            principal: None,
            mechanism: None,
            mail_from: None,
            recipients: Vec::new(),
            decision: AuditDecision::Abandoned,
            rule: None,
            reason: None,
            backend_reply: None,
            size: None,
            duration_ms: 0,
            started: Instant::now(),
            duration_set: false,
        }
    }

    pub fn tls(mut self, tls: Option<&TlsInfo>) -> Self {
        self.tls = tls.map(|t| AuditTls {
            version: t.version,
            cipher: t.cipher.clone(),
        });
        self
    }

    pub fn helo(mut self, helo: Option<&str>) -> Self {
        self.helo = helo.map(clip);
        self
    }

    /// The verified principal (`Principal::display()`) and mechanism name.
    pub fn principal(mut self, principal: &str, mechanism: &'static str) -> Self {
        self.principal = Some(clip(principal));
        self.mechanism = Some(mechanism);
        self
    }

    pub fn mail_from(mut self, sender: &str) -> Self {
        self.mail_from = Some(clip(sender));
        self
    }

    pub fn recipient(mut self, address: &str, outcome: &'static str, rule: Option<&str>) -> Self {
        self.add_recipient(address, outcome, rule);
        self
    }

    /// Adds a recipient to a record kept in the transaction.
    pub fn add_recipient(&mut self, address: &str, outcome: &'static str, rule: Option<&str>) {
        self.recipients.push(AuditRecipient {
            address: clip(address),
            outcome,
            rule: rule.map(clip),
        });
    }

    pub fn decision(mut self, decision: AuditDecision) -> Self {
        self.decision = decision;
        self
    }

    pub fn rule(mut self, rule: &str) -> Self {
        self.rule = Some(clip(rule));
        self
    }

    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(clip(reason));
        self
    }

    pub fn backend_reply(mut self, reply: &Reply) -> Self {
        self.backend_reply = Some(clip(&reply.to_string()));
        self
    }

    pub fn size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }

    /// Overrides the duration measured from [`AuditRecord::transaction`].
    pub fn duration(mut self, elapsed: Duration) -> Self {
        self.duration_ms = elapsed.as_millis().try_into().unwrap_or(u64::MAX);
        self.duration_set = true;
        self
    }

    /// The record as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

enum Msg {
    Line(String),
    Flush(SyncSender<()>),
}

/// The audit sink: a bounded queue in front of a writer thread. Cheap to
/// call from any task; never blocks.
pub struct AuditLog {
    tx: Option<SyncSender<Msg>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl AuditLog {
    /// Opens the sink (the file is created if missing and appended to) and
    /// starts the writer thread. Fails when the file cannot be opened, so
    /// a wrong path stops start-up instead of losing the audit trail.
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match (config.sink, &config.path) {
            (AuditSink::None, _) => return Ok(AuditLog::disabled(metrics)),
            (AuditSink::Stdout, _) => Box::new(io::stdout()),
            (AuditSink::File, Some(path)) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
            (AuditSink::File, None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "audit.path is required with `sink: file`",
                ))
            }
        };
        Ok(AuditLog::with_writer(out, config.queue.max(1), metrics))
    }

    /// An audit log that records nothing.
    pub fn disabled(metrics: Arc<Metrics>) -> AuditLog {
        AuditLog { tx: None, metrics }
    }

    /// An audit log writing to `out` (tests use a pipe or a buffer).
    pub fn with_writer(out: Box<dyn Write + Send>, queue: usize, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::sync_channel(queue);
        let m = metrics.clone();
        let spawned = std::thread::Builder::new()
            .name("relayguard-audit".into())
            .spawn(move || writer(rx, out, &m));
        match spawned {
            Ok(_) => AuditLog {
                tx: Some(tx),
                metrics,
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the audit writer; audit records will be dropped");
                AuditLog { tx: None, metrics }
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one record (its duration ends now). Drops (and counts) it
    /// when the queue is full.
    pub fn record(&self, mut record: AuditRecord) {
        let Some(tx) = &self.tx else {
            return;
        };
        if !record.duration_set {
            record.duration_ms = record
                .started
                .elapsed()
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX);
        }
        let mut line = record.to_json();
        line.push('\n');
        match tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.audit_record("dropped");
            }
        }
    }

    /// Waits (up to `timeout`) until every record queued so far is
    /// written and flushed; for a clean shutdown. Blocking: call it from
    /// `spawn_blocking` or after the runtime's work is done.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else {
            return true;
        };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + timeout;
        let mut msg = Msg::Flush(done_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        !matches!(
            done_rx.recv_timeout(left),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
        )
    }
}

/// The writer thread: writes what is queued, flushes whenever the queue
/// runs dry (so a quiet gateway's records are on disk at once, and a busy
/// one's are written in batches). Ends when the [`AuditLog`] is dropped.
fn writer(rx: Receiver<Msg>, out: Box<dyn Write + Send>, metrics: &Metrics) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    let mut failing = false;
    let mut written = 0u64;
    let report = |res: io::Result<()>, n: u64, failing: &mut bool| match res {
        Ok(()) => {
            for _ in 0..n {
                metrics.audit_record("written");
            }
            if *failing {
                tracing::warn!("audit log writable again");
                *failing = false;
            }
        }
        Err(e) => {
            for _ in 0..n {
                metrics.audit_record("failed");
            }
            if !*failing {
                tracing::error!(error = %e, "cannot write the audit log; records are lost until it recovers");
                *failing = true;
            }
        }
    };
    while let Ok(first) = rx.recv() {
        let mut flush_waiters = Vec::new();
        let mut pending = Some(first);
        let mut res = Ok(());
        while let Some(msg) = pending.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Line(line) => {
                    if res.is_ok() {
                        res = out.write_all(line.as_bytes());
                    }
                    written += 1;
                }
                Msg::Flush(done) => flush_waiters.push(done),
            }
        }
        if res.is_ok() {
            res = out.flush();
        } else {
            // Drop what the failed buffer holds; the next batch starts clean.
            let _ = out.flush();
        }
        report(res, written, &mut failing);
        written = 0;
        for done in flush_waiters {
            let _ = done.send(());
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer that blocks until released, to fill the queue.
    struct Gate(Arc<Mutex<()>>, Shared);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _held = self.0.lock().unwrap();
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sample() -> AuditRecord {
        let tls = TlsInfo {
            version: "TLSv1.3",
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            end_point: Some(vec![1, 2, 3]),
        };
        AuditRecord::transaction("ABC123", "192.0.2.7:50123".parse().unwrap(), "smtp")
            .tls(Some(&tls))
            .helo(Some("pc17.corp.example"))
            .principal("CORP\\alice", "NTLM")
            .mail_from("alice@corp.example")
            .recipient("bob@example.test", "local", Some("local_domains"))
            .recipient("eve@ext.test", "relay_denied", Some("default"))
            .decision(AuditDecision::Delivered)
            .rule("local_domains")
            .backend_reply(&Reply::multi(250, None, vec!["Ok: queued".into()]))
            .size(5120)
            .duration(Duration::from_millis(41))
    }

    fn rendered(m: &Metrics, result: &str) -> String {
        let text = m.render();
        let series = format!("relayguard_audit_records_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series).map(str::to_string))
            .unwrap_or_default()
    }

    #[test]
    fn record_is_one_json_line_with_the_documented_fields() {
        let json: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut expected = vec![
            "time",
            "event",
            "session",
            "client",
            "listener",
            "tls",
            "helo",
            "principal",
            "mechanism",
            "mail_from",
            "recipients",
            "decision",
            "rule",
            "reason",
            "backend_reply",
            "size",
            "duration_ms",
        ];
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(keys_sorted, expected);
        assert_eq!(json["decision"], "delivered");
        assert_eq!(json["principal"], "CORP\\alice");
        assert_eq!(json["client"], "192.0.2.7:50123");
        assert_eq!(json["tls"]["version"], "TLSv1.3");
        assert_eq!(json["recipients"][1]["outcome"], "relay_denied");
        assert_eq!(json["backend_reply"], "250 Ok: queued");
        assert_eq!(json["size"], 5120);
        assert_eq!(json["duration_ms"], 41);
        assert!(json["time"].as_str().unwrap().ends_with('Z'));
        // The channel-binding hash of the TLS session is not audit data.
        assert!(!sample().to_json().contains("end_point"));
    }

    #[test]
    fn client_text_cannot_break_the_line() {
        let line = AuditRecord::transaction("S", "127.0.0.1:1".parse().unwrap(), "smtp")
            .mail_from("a\r\n{\"decision\":\"delivered\"}@x")
            .helo(Some(&"h".repeat(5000)))
            .to_json();
        assert!(!line.contains('\n') && !line.contains('\r'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["decision"], "abandoned");
        assert!(v["helo"].as_str().unwrap().len() <= MAX_FIELD + 3);
    }

    #[test]
    fn writes_lines_and_counts_them() {
        let metrics = Arc::new(Metrics::new());
        let buf = Shared::default();
        let log = AuditLog::with_writer(Box::new(buf.clone()), 16, metrics.clone());
        log.record(sample());
        log.record(sample().decision(AuditDecision::RelayDenied));
        assert!(log.flush(Duration::from_secs(5)));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[1].contains("\"decision\":\"relay_denied\""));
        assert_eq!(rendered(&metrics, "written"), "2");
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let metrics = Arc::new(Metrics::new());
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let buf = Shared::default();
        let log = AuditLog::with_writer(
            Box::new(Gate(gate.clone(), buf.clone())),
            2,
            metrics.clone(),
        );
        let started = std::time::Instant::now();
        for _ in 0..200 {
            log.record(sample());
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "record() blocked"
        );
        let dropped: u64 = rendered(&metrics, "dropped").parse().unwrap();
        assert!(dropped >= 100, "dropped {dropped}");
        drop(held);
        assert!(log.flush(Duration::from_secs(5)));
        let written: u64 = rendered(&metrics, "written").parse().unwrap();
        assert_eq!(written + dropped, 200);
    }

    #[test]
    fn file_sink_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let config = AuditConfig {
            sink: AuditSink::File,
            path: Some(path.clone()),
            queue: 8,
        };
        config.validate().unwrap();
        let log = AuditLog::open(&config, Arc::new(Metrics::new())).unwrap();
        log.record(sample());
        assert!(log.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("earlier\n{\"time\":"), "{text}");
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn config_parses_and_validates() {
        let c: AuditConfig = serde_norway::from_str("sink: file\npath: a.jsonl\n").unwrap();
        assert_eq!(c.sink, AuditSink::File);
        c.validate().unwrap();
        let c: AuditConfig = serde_norway::from_str("sink: file\n").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "audit.path");
        let c: AuditConfig = serde_norway::from_str("sink: stdout\npath: x\n").unwrap();
        assert!(c.validate().is_err());
        assert!(serde_norway::from_str::<AuditConfig>("sink: syslog\n").is_err());
        assert!(serde_norway::from_str::<AuditConfig>("sinc: stdout\n").is_err());
        let c: AuditConfig = serde_norway::from_str("{}").unwrap();
        assert_eq!(c, AuditConfig::default());
        let off = AuditLog::open(
            &AuditConfig {
                sink: AuditSink::None,
                ..AuditConfig::default()
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert!(!off.enabled());
    }
}
