//! Prometheus metrics: one [`Metrics`] per process, shared by every
//! session through [`crate::server::Shared`], rendered by [`crate::http`].
//!
//! Call sites never touch a `prometheus` type: they say what happened
//! (`metrics.connection_refused(listener, ConnectionRefusal::PerIp)`,
//! `metrics.auth_failed(mech, &failure)`), and this module knows which
//! series that is. That keeps names, units and label sets in one place,
//! where the tests below check them against the Prometheus conventions.
//!
//! **Labels are bounded.** Every label value is either a `&'static str`
//! chosen by the code (a reason, a result, a stage, a TLS version), an
//! enum of this module, or a name from the operator's configuration (a
//! listener name, a backend server, a relay rule). User names, envelope
//! addresses and client IPs never become label values: they belong in the
//! audit log ([`crate::audit`]), not in a time series.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::core::Collector;
use prometheus::proto::{Counter, Gauge, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::auth::{AuthFailure, Mechanism};
use crate::smtp::data::DataViolation;
use crate::smtp::reply::Reply;

/// `Content-Type` of [`Metrics::render`]: the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets for backend stages, in seconds: from a loopback reply
/// (sub-millisecond) to an old MTA chewing on a large message.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Message size buckets, in bytes: 1 KiB to 64 MiB, ×4 each.
const SIZE_BUCKETS: &[f64] = &[
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

/// The `stage` values of `relayguard_backend_stage_duration_seconds`
/// (`crate::backend::Stage::label()`, without `body`, which is not timed).
const BACKEND_STAGES: [&str; 9] = [
    "connect",
    "greeting",
    "ehlo",
    "starttls",
    "rset",
    "mail",
    "rcpt",
    "data",
    "data_done",
];

/// Why a connection was refused before its session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// `limits.max_connections` reached.
    MaxConnections,
    /// `limits.max_connections_per_ip` reached for the client's address.
    MaxConnectionsPerIp,
    /// A `proxy_protocol` listener, and the peer is not a trusted proxy.
    ProxyUntrusted,
    /// A trusted proxy, but no valid PROXY header in time.
    ProxyHeader,
}

impl ConnectionRefusal {
    pub const ALL: [ConnectionRefusal; 4] = [
        ConnectionRefusal::MaxConnections,
        ConnectionRefusal::MaxConnectionsPerIp,
        ConnectionRefusal::ProxyUntrusted,
        ConnectionRefusal::ProxyHeader,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::MaxConnections => "max_connections",
            ConnectionRefusal::MaxConnectionsPerIp => "max_connections_per_ip",
            ConnectionRefusal::ProxyUntrusted => "proxy_untrusted",
            ConnectionRefusal::ProxyHeader => "proxy_header",
        }
    }
}

/// How a TLS handshake with a client failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The handshake failed (no shared version or cipher, bad record, the
    /// client hung up or rejected our certificate).
    Error,
    /// `limits.tls_handshake_timeout` passed.
    Timeout,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 2] = [TlsFailure::Error, TlsFailure::Timeout];

    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::Error => "error",
            TlsFailure::Timeout => "timeout",
        }
    }
}

/// How one transaction ended at the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendResult {
    /// 2xx to the final dot: the backend took responsibility.
    Delivered,
    /// 4xx to MAIL, DATA or the final dot.
    Deferred,
    /// 5xx to MAIL, DATA or the final dot.
    Rejected,
    /// A timeout, I/O or protocol error in the middle of the transaction.
    Failed,
    /// No backend server could be reached for a new transaction.
    Unavailable,
    /// The gateway abandoned the message during DATA (client gone, or the
    /// message broke a limit): the backend connection was closed without
    /// the final dot, so the backend discards it.
    Aborted,
}

impl BackendResult {
    /// In declaration order: `ALL[r as usize] == r` (a test checks it).
    pub const ALL: [BackendResult; 6] = [
        BackendResult::Delivered,
        BackendResult::Deferred,
        BackendResult::Rejected,
        BackendResult::Failed,
        BackendResult::Unavailable,
        BackendResult::Aborted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            BackendResult::Delivered => "delivered",
            BackendResult::Deferred => "deferred",
            BackendResult::Rejected => "rejected",
            BackendResult::Failed => "failed",
            BackendResult::Unavailable => "unavailable",
            BackendResult::Aborted => "aborted",
        }
    }

    /// The result a final reply stands for (2xx, 4xx, 5xx).
    pub fn of_reply(reply: &Reply) -> BackendResult {
        if reply.is_positive() {
            BackendResult::Delivered
        } else if reply.is_transient() {
            BackendResult::Deferred
        } else {
            BackendResult::Rejected
        }
    }
}

/// What was reloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadKind {
    /// The relay policy from the configuration file (SIGHUP).
    Policy,
    /// The users file of `auth`.
    Users,
    /// A listener's certificate and key.
    Certificate,
}

impl ReloadKind {
    pub const ALL: [ReloadKind; 3] = [
        ReloadKind::Policy,
        ReloadKind::Users,
        ReloadKind::Certificate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ReloadKind::Policy => "policy",
            ReloadKind::Users => "users",
            ReloadKind::Certificate => "certificate",
        }
    }
}

/// The label of a data violation (`relayguard_messages_refused_total`).
pub fn violation_label(v: DataViolation) -> &'static str {
    match v {
        DataViolation::TooLarge => "too_large",
        DataViolation::LineTooLong => "line_too_long",
        DataViolation::BareLf => "bare_lf",
        DataViolation::BareCr => "bare_cr",
        DataViolation::Nul => "nul",
    }
}

/// The `tls` label of a session: `none`, `TLSv1.2` or `TLSv1.3`.
pub fn tls_label(tls: Option<&crate::tls::TlsInfo>) -> &'static str {
    tls.map(|t| t.version).unwrap_or("none")
}

/// Every metric RelayGuard exports, registered in its own registry (no
/// global state, so tests can create as many as they like).
pub struct Metrics {
    registry: Registry,
    connections_accepted: IntCounterVec,
    connections_refused: IntCounterVec,
    connections_active: IntGaugeVec,
    connections_max: IntGauge,
    sessions: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    early_talkers: IntCounterVec,
    auth_attempts: IntCounterVec,
    relay_decisions: PerShard<IntCounterVec>,
    rate_limited: IntCounterVec,
    messages_forwarded: PerShard<IntCounter>,
    recipients_forwarded: PerShard<IntCounter>,
    message_size: PerShard<Histogram>,
    messages_refused: IntCounterVec,
    backend_transactions: PerShard<IntCounterVec>,
    /// `backend_transactions` by shard, then by result (indexed by
    /// `BackendResult as usize`), resolved once: counted for every
    /// message, where a label lookup (hash and lock) is measurable.
    backend_results: Vec<Vec<IntCounter>>,
    /// `relay_decisions{none,accept,local}` by shard: every inbound
    /// recipient.
    relay_local: Vec<IntCounter>,
    backend_stage_duration: PerShard<HistogramVec>,
    backend_up: IntGaugeVec,
    backend_pool_idle: IntGauge,
    reloads: IntCounterVec,
    audit_records: IntCounterVec,
    /// Set once the accept loops run, cleared when shutdown starts; read
    /// by `/readyz`. Not a metric.
    accepting: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The index into a per-shard list for the calling thread.
pub(crate) fn shard_of<T>(per_shard: &[T]) -> usize {
    crate::shards::current() % per_shard.len()
}

/// A metric kept once per shard and added up when scraped.
///
/// Why: what every message counts (forwarded, its size, the backend's
/// stage latencies, the relay decision) would otherwise be a handful of
/// atomic updates to the same cache lines from every shard, which then
/// take turns at them: about 2% of the CPU per message at 1 KB with two
/// shards. Each shard updates its own copy; `/metrics` sums the copies,
/// so what is exported is exactly what one metric would have shown.
#[derive(Clone)]
struct PerShard<C> {
    copies: Vec<C>,
}

impl<C: Collector> PerShard<C> {
    fn new(shards: usize, make: impl Fn() -> C) -> Self {
        PerShard {
            copies: (0..shards.max(1)).map(|_| make()).collect(),
        }
    }

    /// The calling shard's copy (the first for any other thread).
    fn here(&self) -> &C {
        &self.copies[shard_of(&self.copies)]
    }

    fn all(&self) -> &[C] {
        &self.copies
    }
}

impl<C: Collector> Collector for PerShard<C> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.copies[0].desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut copies = self.copies.iter().map(Collector::collect);
        let mut total = copies.next().unwrap_or_default();
        for families in copies {
            for (sum, family) in total.iter_mut().zip(families) {
                add_family(sum, family);
            }
        }
        total
    }
}

/// Adds `family`'s samples to `sum`'s series of the same labels (counters,
/// gauges and histograms of the same buckets).
fn add_family(sum: &mut MetricFamily, mut family: MetricFamily) {
    let kind = sum.get_field_type();
    for metric in family.take_metric() {
        let same = sum
            .mut_metric()
            .iter_mut()
            .find(|m| m.get_label() == metric.get_label());
        let Some(target) = same else {
            sum.mut_metric().push(metric);
            continue;
        };
        match kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(target.get_counter().get_value() + metric.get_counter().get_value());
                target.set_counter(c);
            }
            MetricType::GAUGE => {
                let mut g = Gauge::default();
                g.set_value(target.get_gauge().get_value() + metric.get_gauge().get_value());
                target.set_gauge(g);
            }
            MetricType::HISTOGRAM => {
                let (a, b) = (target.get_histogram(), metric.get_histogram());
                let mut h = a.clone();
                h.set_sample_count(a.get_sample_count() + b.get_sample_count());
                h.set_sample_sum(a.get_sample_sum() + b.get_sample_sum());
                let buckets = a
                    .get_bucket()
                    .iter()
                    .zip(b.get_bucket())
                    .map(|(x, y)| {
                        let mut bucket = x.clone();
                        bucket.set_cumulative_count(
                            x.get_cumulative_count() + y.get_cumulative_count(),
                        );
                        bucket
                    })
                    .collect();
                h.set_bucket(buckets);
                target.set_histogram(h);
            }
            _ => {}
        }
    }
}

/// Registers a collector; names are fixed at compile time and unique, so
/// a failure is a programming error caught by the unit tests.
fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    register(registry, c)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
    register(registry, g)
}

impl Metrics {
    /// A fresh registry with every metric, and zeroed series for each
    /// label value known in advance (so `rate()` and alerts see the first
    /// increment). `relayguard_build_info` carries the crate version.
    pub fn new() -> Metrics {
        Metrics::with_shards(1)
    }

    /// Like [`new`](Self::new), with the per-message series kept once per
    /// shard (see [`PerShard`]).
    pub fn with_shards(shards: usize) -> Metrics {
        let shards = shards.max(1);
        let r = Registry::new();
        let build_info = gauge_vec(
            &r,
            "relayguard_build_info",
            "Always 1; the label carries the RelayGuard version.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let relay_decisions = register(
            &r,
            PerShard::new(shards, || {
                IntCounterVec::new(
                    Opts::new(
                        "relayguard_relay_decisions_total",
                        "Relay policy decisions (MAIL and RCPT), by the rule that decided (none if no rule did), accept or deny, and the reason (local, relay, or the refusal reason).",
                    ),
                    &["rule", "decision", "reason"],
                )
                .expect("valid counter")
            }),
        );
        let relay_local = relay_decisions
            .all()
            .iter()
            .map(|v| v.with_label_values(&["none", "accept", "local"]))
            .collect();
        let mut m = Metrics {
            connections_accepted: counter_vec(
                &r,
                "relayguard_connections_accepted_total",
                "TCP connections accepted, before admission limits.",
                &["listener"],
            ),
            connections_refused: counter_vec(
                &r,
                "relayguard_connections_refused_total",
                "Connections refused by an admission limit.",
                &["listener", "reason"],
            ),
            connections_active: gauge_vec(
                &r,
                "relayguard_connections_active",
                "Client connections currently admitted.",
                &["listener"],
            ),
            connections_max: register(
                &r,
                IntGauge::new(
                    "relayguard_connections_max",
                    "The configured limit on concurrent client connections (limits.max_connections).",
                )
                .expect("valid gauge"),
            ),
            sessions: counter_vec(
                &r,
                "relayguard_sessions_total",
                "Client sessions ended, by listener, negotiated TLS version (none, TLSv1.2, TLSv1.3) and why they ended.",
                &["listener", "tls", "end"],
            ),
            tls_handshake_failures: counter_vec(
                &r,
                "relayguard_tls_handshake_failures_total",
                "Client TLS handshakes (implicit TLS or STARTTLS) that failed or timed out.",
                &["listener", "reason"],
            ),
            early_talkers: counter_vec(
                &r,
                "relayguard_early_talkers_total",
                "Clients refused for sending before the greeting.",
                &["listener"],
            ),
            auth_attempts: counter_vec(
                &r,
                "relayguard_auth_attempts_total",
                "Completed AUTH exchanges, by mechanism and result (success or the failure reason).",
                &["mechanism", "result"],
            ),
            relay_decisions,
            rate_limited: counter_vec(
                &r,
                "relayguard_rate_limited_total",
                "Commands refused by a rate limit, by SMTP stage (mail, rcpt) and the rule whose limit it was (global for the top-level rates).",
                &["stage", "rule"],
            ),
            messages_forwarded: register(
                &r,
                PerShard::new(shards, || IntCounter::new(
                    "relayguard_messages_forwarded_total",
                    "Messages the backend accepted (2xx to the final dot).",
                )
                .expect("valid counter")),
            ),
            recipients_forwarded: register(
                &r,
                PerShard::new(shards, || IntCounter::new(
                    "relayguard_recipients_forwarded_total",
                    "Recipients of the messages the backend accepted.",
                )
                .expect("valid counter")),
            ),
            message_size: register(
                &r,
                PerShard::new(shards, || Histogram::with_opts(
                    HistogramOpts::new(
                        "relayguard_message_size_bytes",
                        "Size of forwarded messages (octets after dot-unstuffing).",
                    )
                    .buckets(SIZE_BUCKETS.to_vec()),
                )
                .expect("valid histogram")),
            ),
            messages_refused: counter_vec(
                &r,
                "relayguard_messages_refused_total",
                "Messages refused by the gateway during DATA, by the violation (too_large, line_too_long, bare_lf, bare_cr, nul).",
                &["reason"],
            ),
            backend_transactions: register(
                &r,
                PerShard::new(shards, || {
                    IntCounterVec::new(
                        Opts::new(
                            "relayguard_backend_transactions_total",
                            "Transactions toward the backend, by how they ended.",
                        ),
                        &["result"],
                    )
                    .expect("valid counter")
                }),
            ),
            backend_stage_duration: register(
                &r,
                PerShard::new(shards, || HistogramVec::new(
                    HistogramOpts::new(
                        "relayguard_backend_stage_duration_seconds",
                        "Backend latency per stage: TCP connect, greeting, EHLO, STARTTLS, and from each command to its reply.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["stage"],
                )
                .expect("valid histogram")),
            ),
            backend_up: gauge_vec(
                &r,
                "relayguard_backend_up",
                "1 if the last connection or probe to this backend server succeeded, else 0.",
                &["server"],
            ),
            backend_pool_idle: register(
                &r,
                IntGauge::new(
                    "relayguard_backend_pool_idle_connections",
                    "Warm backend connections waiting in the pool.",
                )
                .expect("valid gauge"),
            ),
            reloads: counter_vec(
                &r,
                "relayguard_reloads_total",
                "Reloads of the policy, users file or certificates, by result (success, failure).",
                &["kind", "result"],
            ),
            audit_records: counter_vec(
                &r,
                "relayguard_audit_records_total",
                "Audit records, by fate: written, dropped (queue full) or failed (write error).",
                &["result"],
            ),
            accepting: AtomicBool::new(false),
            registry: r,
            backend_results: Vec::new(),
            relay_local,
        };
        m.backend_results = m
            .backend_transactions
            .all()
            .iter()
            .map(|v| {
                BackendResult::ALL
                    .into_iter()
                    .map(|r| v.with_label_values(&[r.label()]))
                    .collect()
            })
            .collect();
        for kind in ReloadKind::ALL {
            for result in ["success", "failure"] {
                m.reloads.with_label_values(&[kind.label(), result]);
            }
        }
        for result in ["written", "dropped", "failed"] {
            m.audit_records.with_label_values(&[result]);
        }
        for v in [
            DataViolation::TooLarge,
            DataViolation::LineTooLong,
            DataViolation::BareLf,
            DataViolation::BareCr,
            DataViolation::Nul,
        ] {
            m.messages_refused.with_label_values(&[violation_label(v)]);
        }
        m.relay_decisions
            .here()
            .with_label_values(&["none", "deny", "relay_denied"]);
        for stage in ["mail", "rcpt"] {
            m.rate_limited.with_label_values(&[stage, "global"]);
        }
        for stage in BACKEND_STAGES {
            m.backend_stage_duration.here().with_label_values(&[stage]);
        }
        m
    }

    /// The registry, for callers that want to add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything, in the text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a
        // malformed family, which `register` already refused.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    // ---- configuration known at start ----

    /// Zeroes the per-listener series of a configured listener, so they
    /// exist before its first connection.
    pub fn init_listener(&self, listener: &str, tls: bool) {
        self.connections_accepted.with_label_values(&[listener]);
        self.connections_active.with_label_values(&[listener]);
        self.early_talkers.with_label_values(&[listener]);
        for r in ConnectionRefusal::ALL {
            self.connections_refused
                .with_label_values(&[listener, r.label()]);
        }
        if tls {
            for f in TlsFailure::ALL {
                self.tls_handshake_failures
                    .with_label_values(&[listener, f.label()]);
            }
        }
    }

    /// Zeroes the AUTH series of an offered mechanism (success and the
    /// commonest failure), so the family exists before the first AUTH.
    pub fn init_auth_mechanism(&self, mechanism: Mechanism) {
        for result in ["success", "bad_credentials"] {
            self.auth_attempts
                .with_label_values(&[mechanism.name(), result]);
        }
    }

    /// The configured connection limit (for saturation: active / max).
    pub fn set_connection_limit(&self, max: usize) {
        self.connections_max.set(max as i64);
    }

    // ---- admission (server) ----

    pub fn connection_accepted(&self, listener: &str) {
        self.connections_accepted
            .with_label_values(&[listener])
            .inc();
    }

    pub fn connection_refused(&self, listener: &str, reason: ConnectionRefusal) {
        self.connections_refused
            .with_label_values(&[listener, reason.label()])
            .inc();
    }

    /// An admitted connection: counted as active until the guard drops.
    pub fn connection_opened(&self, listener: &str) -> ActiveConnection {
        let gauge = self.connections_active.with_label_values(&[listener]);
        gauge.inc();
        ActiveConnection(gauge)
    }

    pub fn early_talker(&self, listener: &str) {
        self.early_talkers.with_label_values(&[listener]).inc();
    }

    pub fn tls_handshake_failed(&self, listener: &str, why: TlsFailure) {
        self.tls_handshake_failures
            .with_label_values(&[listener, why.label()])
            .inc();
    }

    /// A session ended. Counted at the end, not the start, because a
    /// STARTTLS session's TLS version is only known halfway through.
    /// `tls` is [`tls_label`]; `end` is the session's end reason.
    pub fn session_closed(&self, listener: &str, tls: &'static str, end: &'static str) {
        self.sessions.with_label_values(&[listener, tls, end]).inc();
    }

    /// The accept loops run (true) or shutdown started (false); `/readyz`
    /// is not ready while false.
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    // ---- authentication ----

    pub fn auth_succeeded(&self, mechanism: Mechanism) {
        self.auth_attempt(mechanism.name(), "success");
    }

    /// A failed AUTH, labelled with [`AuthFailure::label`] (`bad_credentials`,
    /// `anonymous_refused`, `ntlmv1_refused`, `replay`, `mic_invalid`,
    /// `locked_out`, `client_locked_out`, `malformed`, …).
    pub fn auth_failed(&self, mechanism: Mechanism, failure: &AuthFailure) {
        self.auth_attempt(mechanism.name(), failure.label());
    }

    /// The general form: `result` is `success` or a failure label.
    pub fn auth_attempt(&self, mechanism: &'static str, result: &'static str) {
        self.auth_attempts
            .with_label_values(&[mechanism, result])
            .inc();
    }

    // ---- policy ----

    /// A recipient at a local domain: accepted without consulting rules.
    pub fn relay_local(&self) {
        self.relay_local[shard_of(&self.relay_local)].inc();
    }

    /// Relaying allowed by `rule` (a configured rule or trusted network).
    pub fn relay_allowed(&self, rule: &str) {
        self.relay_decisions
            .here()
            .with_label_values(&[rule, "accept", "relay"])
            .inc();
    }

    /// The policy refused a sender or recipient: `rule` is the rule that
    /// decided (`None` when no rule did), `reason` the decision's bounded
    /// label (`relay_denied`, `relay_not_permitted`, `address_literal`,
    /// `auth_required`, `sender_mismatch`, `null_sender`, `rate_limited`,
    /// …). Never pass an address here.
    pub fn relay_denied(&self, rule: Option<&str>, reason: &'static str) {
        self.relay_decisions
            .here()
            .with_label_values(&[rule.unwrap_or("none"), "deny", reason])
            .inc();
    }

    /// The general form of the three above: `outcome` `local`, `relay` (or
    /// `allowed`) counts as an acceptance, anything else as a refusal with
    /// that reason.
    pub fn relay_decision(&self, rule: Option<&str>, outcome: &'static str) {
        match outcome {
            "local" => self.relay_local(),
            "relay" | "allowed" => self.relay_allowed(rule.unwrap_or("none")),
            reason => self.relay_denied(rule, reason),
        }
    }

    /// A rate limit refused a command at `stage` (`mail`, `rcpt`); `rule`
    /// is the rule whose limit it was, `None` for the top-level rates.
    pub fn rate_limited(&self, stage: &'static str, rule: Option<&str>) {
        self.rate_limited
            .with_label_values(&[stage, rule.unwrap_or("global")])
            .inc();
    }

    // ---- messages ----

    /// The backend accepted a message of `size_bytes` for `recipients`.
    pub fn message_forwarded(&self, size_bytes: u64, recipients: usize) {
        self.messages_forwarded.here().inc();
        self.recipients_forwarded.here().inc_by(recipients as u64);
        self.message_size.here().observe(size_bytes as f64);
    }

    /// The gateway refused a message during DATA.
    pub fn message_refused(&self, violation: DataViolation) {
        self.messages_refused
            .with_label_values(&[violation_label(violation)])
            .inc();
    }

    // ---- backend ----

    pub fn backend_transaction(&self, result: BackendResult) {
        self.backend_results[shard_of(&self.backend_results)][result as usize].inc();
    }

    /// The latency histograms of one backend stage (`Stage::label()`:
    /// connect, greeting, ehlo, starttls, rset, mail, rcpt, data,
    /// data_done), one per shard, resolved once by the backend so that
    /// timing a stage is one observation, not a label lookup per message.
    pub fn backend_stage_histograms(&self, stage: &'static str) -> Vec<Histogram> {
        self.backend_stage_duration
            .all()
            .iter()
            .map(|v| v.with_label_values(&[stage]))
            .collect()
    }

    /// The `relayguard_backend_up` gauge of one configured server (created
    /// at zero: down until a connection or probe says otherwise), resolved
    /// once by the backend.
    pub fn backend_up_gauge(&self, server: &str) -> IntGauge {
        self.backend_up.with_label_values(&[server])
    }

    pub fn backend_pool_idle(&self, idle: usize) {
        self.backend_pool_idle.set(idle as i64);
    }

    // ---- operations ----

    pub fn reload(&self, kind: ReloadKind, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads
            .with_label_values(&[kind.label(), result])
            .inc();
    }

    pub(crate) fn audit_record(&self, result: &'static str) {
        self.audit_records.with_label_values(&[result]).inc();
    }
}

/// Keeps a connection counted in `relayguard_connections_active`.
#[derive(Debug)]
pub struct ActiveConnection(IntGauge);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[test]
    fn backend_results_are_listed_in_declaration_order() {
        for (i, r) in BackendResult::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r:?}");
        }
    }

    /// `(name, type)` of every family in the text output.
    fn families(text: &str) -> BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (name, ty) = l.split_once(' ')?;
                Some((name.to_string(), ty.to_string()))
            })
            .collect()
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// What every message counts, as a session on some shard does it.
    fn count_messages(m: &Metrics, n: u64) {
        for i in 0..n {
            m.relay_local();
            m.relay_allowed(if i % 2 == 0 { "staff" } else { "partners" });
            m.relay_denied(Some("staff"), "sender_mismatch");
            m.message_forwarded(1000 * i, 1 + i as usize % 3);
            m.backend_transaction(BackendResult::Delivered);
            m.backend_stage_histograms("data_done")[crate::shards::current()]
                .observe(i as f64 / 1024.0); // exact in binary: sums in any order agree
        }
    }

    /// Counting per shard changes nothing in what is exported: the same
    /// messages counted on three shards render exactly as on one.
    #[test]
    fn per_shard_series_add_up_to_the_single_series() {
        let one = Metrics::new();
        count_messages(&one, 10);
        count_messages(&one, 20);
        count_messages(&one, 30);

        let sharded = Arc::new(Metrics::with_shards(3));
        let shards = crate::shards::Shards::start(3).unwrap();
        for (handle, n) in shards.handles().iter().zip([10, 20, 30]) {
            let m = sharded.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            handle.spawn(async move {
                count_messages(&m, n);
                tx.send(crate::shards::current()).unwrap();
            });
            rx.recv().unwrap();
        }
        // Each shard counted into its own copy...
        for (i, copy) in sharded.messages_forwarded.all().iter().enumerate() {
            assert_eq!(copy.get(), [10, 20, 30][i]);
        }
        // ...and the sum is what one metric shows.
        assert_eq!(sharded.render(), one.render());
    }

    /// Exercises every method, so every family has at least one series.
    fn exercised() -> Metrics {
        let m = Metrics::new();
        m.init_listener("smtp", true);
        m.set_connection_limit(100);
        m.connection_accepted("smtp");
        m.connection_refused("smtp", ConnectionRefusal::MaxConnectionsPerIp);
        let active = m.connection_opened("smtp");
        m.early_talker("smtp");
        m.tls_handshake_failed("smtp", TlsFailure::Timeout);
        m.session_closed("smtp", "TLSv1.3", "quit");
        m.auth_succeeded(Mechanism::Ntlm);
        m.auth_failed(Mechanism::Plain, &AuthFailure::Refused("bad_credentials"));
        m.auth_failed(Mechanism::Login, &AuthFailure::LockedOut);
        m.relay_local();
        m.relay_allowed("staff");
        m.relay_denied(Some("staff"), "sender_mismatch");
        m.relay_decision(None, "relay_denied");
        m.relay_decision(Some("partners"), "allowed");
        m.rate_limited("rcpt", None);
        m.message_forwarded(5000, 3);
        m.message_refused(DataViolation::BareLf);
        m.backend_transaction(BackendResult::Delivered);
        m.backend_stage_histograms("data_done")[0].observe(0.012);
        m.backend_up_gauge("127.0.0.1:25").set(1);
        m.backend_pool_idle(2);
        m.reload(ReloadKind::Policy, false);
        m.audit_record("written");
        drop(active);
        m
    }

    #[test]
    fn every_family_renders_with_help_and_type() {
        let text = exercised().render();
        let fams = families(&text);
        let expected = [
            ("relayguard_build_info", "gauge"),
            ("relayguard_connections_accepted_total", "counter"),
            ("relayguard_connections_refused_total", "counter"),
            ("relayguard_connections_active", "gauge"),
            ("relayguard_connections_max", "gauge"),
            ("relayguard_sessions_total", "counter"),
            ("relayguard_tls_handshake_failures_total", "counter"),
            ("relayguard_early_talkers_total", "counter"),
            ("relayguard_auth_attempts_total", "counter"),
            ("relayguard_relay_decisions_total", "counter"),
            ("relayguard_rate_limited_total", "counter"),
            ("relayguard_messages_forwarded_total", "counter"),
            ("relayguard_recipients_forwarded_total", "counter"),
            ("relayguard_message_size_bytes", "histogram"),
            ("relayguard_messages_refused_total", "counter"),
            ("relayguard_backend_transactions_total", "counter"),
            ("relayguard_backend_stage_duration_seconds", "histogram"),
            ("relayguard_backend_up", "gauge"),
            ("relayguard_backend_pool_idle_connections", "gauge"),
            ("relayguard_reloads_total", "counter"),
            ("relayguard_audit_records_total", "counter"),
        ];
        let expected: BTreeMap<String, String> = expected
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert_eq!(fams, expected, "{text}");
        for name in expected.keys() {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
        }
    }

    /// The rules `promtool check metrics` applies, plus ours.
    #[test]
    fn names_follow_prometheus_conventions() {
        let text = exercised().render();
        let name_ok = |n: &str| {
            n.starts_with("relayguard_")
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for (name, ty) in families(&text) {
            assert!(name_ok(&name), "{name}: relayguard_ prefix, snake_case");
            match ty.as_str() {
                "counter" => assert!(name.ends_with("_total"), "{name}: counters end in _total"),
                _ => assert!(
                    !name.ends_with("_total"),
                    "{name}: only counters end in _total"
                ),
            }
            if ty == "histogram" {
                assert!(
                    name.ends_with("_seconds") || name.ends_with("_bytes"),
                    "{name}: histograms are in base units"
                );
            }
            for bad in [
                "_milliseconds",
                "_ms",
                "_kilobytes",
                "_count",
                "_sum",
                "_bucket",
            ] {
                assert!(
                    !name.ends_with(bad),
                    "{name}: reserved suffix or non-base unit"
                );
            }
        }
        // Label names: snake_case, and never identities of people or hosts.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some(labels) = line.split_once('{').map(|(_, l)| l) else {
                continue;
            };
            for pair in labels.split("\",") {
                let key = pair.split('=').next().unwrap().trim_start_matches(',');
                assert!(
                    ![
                        "user",
                        "client",
                        "ip",
                        "address",
                        "sender",
                        "recipient",
                        "from",
                        "to"
                    ]
                    .contains(&key),
                    "unbounded label {key} in {line}"
                );
            }
        }
    }

    #[test]
    fn values_and_labels_render() {
        let m = exercised();
        let text = m.render();
        let version = env!("CARGO_PKG_VERSION");
        let checks = [
            (format!("relayguard_build_info{{version=\"{version}\"}}"), 1.0),
            ("relayguard_connections_accepted_total{listener=\"smtp\"}".into(), 1.0),
            (
                "relayguard_connections_refused_total{listener=\"smtp\",reason=\"max_connections_per_ip\"}".into(),
                1.0,
            ),
            (
                "relayguard_connections_refused_total{listener=\"smtp\",reason=\"max_connections\"}".into(),
                0.0,
            ),
            ("relayguard_connections_active{listener=\"smtp\"}".into(), 0.0),
            ("relayguard_connections_max".into(), 100.0),
            (
                "relayguard_sessions_total{end=\"quit\",listener=\"smtp\",tls=\"TLSv1.3\"}".into(),
                1.0,
            ),
            (
                "relayguard_tls_handshake_failures_total{listener=\"smtp\",reason=\"timeout\"}".into(),
                1.0,
            ),
            (
                "relayguard_auth_attempts_total{mechanism=\"NTLM\",result=\"success\"}".into(),
                1.0,
            ),
            (
                "relayguard_auth_attempts_total{mechanism=\"PLAIN\",result=\"bad_credentials\"}".into(),
                1.0,
            ),
            (
                "relayguard_auth_attempts_total{mechanism=\"LOGIN\",result=\"locked_out\"}".into(),
                1.0,
            ),
            (
                "relayguard_relay_decisions_total{decision=\"deny\",reason=\"sender_mismatch\",rule=\"staff\"}".into(),
                1.0,
            ),
            (
                "relayguard_relay_decisions_total{decision=\"deny\",reason=\"relay_denied\",rule=\"none\"}".into(),
                1.0,
            ),
            (
                "relayguard_relay_decisions_total{decision=\"accept\",reason=\"local\",rule=\"none\"}".into(),
                1.0,
            ),
            (
                "relayguard_relay_decisions_total{decision=\"accept\",reason=\"relay\",rule=\"staff\"}".into(),
                1.0,
            ),
            (
                "relayguard_relay_decisions_total{decision=\"accept\",reason=\"relay\",rule=\"partners\"}".into(),
                1.0,
            ),
            (
                "relayguard_rate_limited_total{rule=\"global\",stage=\"rcpt\"}".into(),
                1.0,
            ),
            ("relayguard_messages_forwarded_total".into(), 1.0),
            ("relayguard_recipients_forwarded_total".into(), 3.0),
            ("relayguard_message_size_bytes_sum".into(), 5000.0),
            ("relayguard_message_size_bytes_bucket{le=\"4096\"}".into(), 0.0),
            ("relayguard_message_size_bytes_bucket{le=\"16384\"}".into(), 1.0),
            ("relayguard_messages_refused_total{reason=\"bare_lf\"}".into(), 1.0),
            (
                "relayguard_backend_transactions_total{result=\"delivered\"}".into(),
                1.0,
            ),
            (
                "relayguard_backend_transactions_total{result=\"unavailable\"}".into(),
                0.0,
            ),
            (
                "relayguard_backend_stage_duration_seconds_count{stage=\"data_done\"}".into(),
                1.0,
            ),
            ("relayguard_backend_up{server=\"127.0.0.1:25\"}".into(), 1.0),
            ("relayguard_backend_pool_idle_connections".into(), 2.0),
            (
                "relayguard_reloads_total{kind=\"policy\",result=\"failure\"}".into(),
                1.0,
            ),
            (
                "relayguard_reloads_total{kind=\"certificate\",result=\"success\"}".into(),
                0.0,
            ),
        ];
        for (series, value) in checks {
            assert_eq!(sample(&text, &series), Some(value), "{series} in\n{text}");
        }
    }

    #[test]
    fn active_connections_follow_the_guards() {
        let m = Metrics::new();
        let a = m.connection_opened("smtp");
        let b = m.connection_opened("smtp");
        let text = m.render();
        assert_eq!(
            sample(&text, "relayguard_connections_active{listener=\"smtp\"}"),
            Some(2.0)
        );
        drop(a);
        drop(b);
        assert_eq!(
            sample(
                &m.render(),
                "relayguard_connections_active{listener=\"smtp\"}"
            ),
            Some(0.0)
        );
    }

    #[test]
    fn reply_classes_map_to_results() {
        use crate::smtp::reply::Reply;
        assert_eq!(
            BackendResult::of_reply(&Reply::multi(250, None, vec!["ok".into()])),
            BackendResult::Delivered
        );
        assert_eq!(
            BackendResult::of_reply(&Reply::multi(451, None, vec!["later".into()])),
            BackendResult::Deferred
        );
        assert_eq!(
            BackendResult::of_reply(&Reply::multi(554, None, vec!["no".into()])),
            BackendResult::Rejected
        );
    }

    #[test]
    fn accepting_flag() {
        let m = Metrics::new();
        assert!(!m.is_accepting());
        m.set_accepting(true);
        assert!(m.is_accepting());
    }
}

/// The backend client's instrumentation, against a scripted backend.
#[cfg(test)]
mod backend_tests {
    use super::*;
    use crate::backend::{Backend, MailArgs, Wire};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// What the scripted backend does after its 354.
    #[derive(Clone, Copy)]
    enum AfterData {
        Reply(&'static str),
        Hangup,
    }

    async fn backend(after: AfterData) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = w.write_all(b"220 fake\r\n").await;
                    let mut in_data = false;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let reply = if in_data {
                            if line != "." {
                                continue;
                            }
                            in_data = false;
                            match after {
                                AfterData::Reply(r) => r,
                                AfterData::Hangup => return,
                            }
                        } else {
                            match line.get(..4).unwrap_or("") {
                                "DATA" => {
                                    in_data = true;
                                    "354 go"
                                }
                                "QUIT" => {
                                    let _ = w.write_all(b"221 bye\r\n").await;
                                    return;
                                }
                                _ => "250 ok",
                            }
                        };
                        if w.write_all(format!("{reply}\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn client(servers: &[SocketAddr], metrics: Arc<Metrics>) -> Arc<Backend> {
        let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        let yaml = format!(
            "servers: [{}]\ntimeouts:\n  connect: 2s\n  data_done: 2s\n",
            list.join(", ")
        );
        let config: crate::config::BackendConfig = serde_norway::from_str(&yaml).unwrap();
        Backend::new(&config, "relay.test", metrics, 1).unwrap()
    }

    fn value(m: &Metrics, series: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    fn result(m: &Metrics, r: BackendResult) -> f64 {
        value(
            m,
            &format!(
                "relayguard_backend_transactions_total{{result=\"{}\"}}",
                r.label()
            ),
        )
    }

    const ARGS: MailArgs<'static> = MailArgs {
        path: "a@client.test",
        size: None,
        eight_bit: false,
    };

    /// MAIL, RCPT, DATA; the body is streamed by the caller.
    async fn to_data(backend: &Backend) -> crate::backend::Connection {
        let mut conn = backend.connect_any().await.unwrap();
        let begun = conn.begin(&ARGS, "x@example.test").await.unwrap();
        assert!(begun.mail.is_positive());
        assert_eq!(conn.data().await.unwrap().code, 354);
        conn.body(Wire::assembled(b"Subject: t\r\n\r\nhi\r\n"))
            .await
            .unwrap();
        conn
    }

    #[tokio::test]
    async fn a_session_keeps_its_large_buffer_but_the_pool_keeps_a_small_one() {
        let ok = backend(AfterData::Reply("250 queued")).await;
        let b = client(&[ok], Arc::new(Metrics::new()));
        let mut conn = to_data(&b).await;
        let mut tail = conn.take_buffer();
        tail.reserve(200 * 1024);
        assert!(conn.finish(&mut tail, None).await.unwrap().is_positive());
        // Between the messages of one session: kept (up to 256 KB).
        conn.return_buffer(tail);
        assert!(conn.take_buffer().capacity() >= 200 * 1024);
        let mut big = Vec::with_capacity(200 * 1024);
        big.push(b'x');
        conn.return_buffer(big);
        // Back in the pool: given back.
        b.release(conn);
        let mut conn = b.take_idle().expect("pooled");
        assert_eq!(conn.take_buffer().capacity(), 0);
        // Too large even for a session: not kept.
        conn.return_buffer(Vec::with_capacity(300 * 1024));
        assert_eq!(conn.take_buffer().capacity(), 0);
    }

    #[tokio::test]
    async fn idle_pool_connections_expire_without_traffic() {
        let ok = backend(AfterData::Reply("250 queued")).await;
        let m = Arc::new(Metrics::new());
        let yaml = format!("servers: [\"{ok}\"]\npool:\n  idle_timeout: 1s\n");
        let config: crate::config::BackendConfig = serde_norway::from_str(&yaml).unwrap();
        let b = Backend::new(&config, "relay.test", m.clone(), 1).unwrap();
        let mut conn = to_data(&b).await;
        assert!(conn
            .finish(&mut Vec::new(), None)
            .await
            .unwrap()
            .is_positive());
        b.release(conn);
        let idle = "relayguard_backend_pool_idle_connections";
        assert_eq!(value(&m, idle), 1.0);
        b.expire_idle();
        assert_eq!(value(&m, idle), 1.0, "not idle long enough yet");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let sweeper = tokio::spawn(b.clone().sweep_pool(shutdown.clone()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while value(&m, idle) != 0.0 {
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(b.take_idle().is_none());
        shutdown.cancel();
        sweeper.await.unwrap();
    }

    #[tokio::test]
    async fn transaction_results_stages_and_health() {
        let ok = backend(AfterData::Reply("250 queued")).await;
        let refuses = backend(AfterData::Reply("554 no")).await;
        let defers = backend(AfterData::Reply("451 later")).await;
        let hangs_up = backend(AfterData::Hangup).await;

        let m = Arc::new(Metrics::new());
        let b = client(&[ok], m.clone());
        let up = format!("relayguard_backend_up{{server=\"{ok}\"}}");
        assert_eq!(value(&m, &up), 0.0, "down until proven up");
        let mut conn = to_data(&b).await;
        assert!(conn
            .finish(&mut Vec::new(), None)
            .await
            .unwrap()
            .is_positive());
        assert_eq!(result(&m, BackendResult::Delivered), 1.0);
        assert_eq!(value(&m, &up), 1.0);
        for stage in [
            "connect",
            "greeting",
            "ehlo",
            "mail",
            "rcpt",
            "data",
            "data_done",
        ] {
            let count =
                format!("relayguard_backend_stage_duration_seconds_count{{stage=\"{stage}\"}}");
            assert_eq!(value(&m, &count), 1.0, "{stage}");
        }
        // The same connection again (RSET first): counted once more.
        let begun = conn.begin(&ARGS, "y@example.test").await.unwrap();
        assert!(begun.mail.is_positive());
        assert_eq!(conn.data().await.unwrap().code, 354);
        conn.body(Wire::assembled(b"x\r\n")).await.unwrap();
        conn.finish(&mut Vec::new(), None).await.unwrap();
        assert_eq!(result(&m, BackendResult::Delivered), 2.0);
        // Dropped between 354 and the final dot: aborted.
        drop(to_data(&b).await);
        assert_eq!(result(&m, BackendResult::Aborted), 1.0);

        for (addr, want) in [
            (refuses, BackendResult::Rejected),
            (defers, BackendResult::Deferred),
        ] {
            let m = Arc::new(Metrics::new());
            let b = client(&[addr], m.clone());
            let mut conn = to_data(&b).await;
            conn.finish(&mut Vec::new(), None).await.unwrap();
            assert_eq!(result(&m, want), 1.0, "{}", want.label());
            // Not delivered, and not counted twice when dropped.
            drop(conn);
            assert_eq!(result(&m, BackendResult::Aborted), 0.0);
        }

        let m = Arc::new(Metrics::new());
        let b = client(&[hangs_up], m.clone());
        let mut conn = to_data(&b).await;
        assert!(conn.finish(&mut Vec::new(), None).await.is_err());
        drop(conn);
        assert_eq!(result(&m, BackendResult::Failed), 1.0);
        assert_eq!(result(&m, BackendResult::Aborted), 0.0);
    }

    #[tokio::test]
    async fn unreachable_backends_are_down_and_transactions_unavailable() {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let ok = backend(AfterData::Reply("250 queued")).await;
        let m = Arc::new(Metrics::new());
        let b = client(&[closed, ok], m.clone());
        // Failover: the first is down, the second serves.
        let conn = b.connect_any().await.unwrap();
        assert_eq!(conn.server(), ok.to_string());
        let down = format!("relayguard_backend_up{{server=\"{closed}\"}}");
        let up = format!("relayguard_backend_up{{server=\"{ok}\"}}");
        assert_eq!(value(&m, &down), 0.0);
        assert_eq!(value(&m, &up), 1.0);
        assert!(b.reachable(Duration::from_secs(5)));
        // The probe checks both; one is up.
        assert_eq!(b.probe_all(Duration::ZERO).await, 1);

        let m = Arc::new(Metrics::new());
        let b = client(&[closed], m.clone());
        assert!(b.connect_any().await.is_err());
        assert_eq!(result(&m, BackendResult::Unavailable), 1.0);
        assert_eq!(b.probe_all(Duration::ZERO).await, 0);
        assert!(!b.reachable(Duration::from_secs(5)));
        // A probe is not a transaction.
        assert_eq!(result(&m, BackendResult::Unavailable), 1.0);
    }
}
