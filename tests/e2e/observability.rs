//! Observability: a real Prometheus scrapes the gateway's `/metrics`
//! while real sessions run; `/readyz` follows the backend; promtool
//! accepts the metrics, the alert rules and their unit tests; the Grafana
//! dashboard asks only for what the gateway exports.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use relayguard_e2e::ntlm::ClientOptions;
use relayguard_e2e::prometheus::{
    http_get, http_request, metrics_addr, promtool, sample_names, sample_value, wait_for_status,
    PlainSink, Prometheus,
};
use relayguard_e2e::{
    config, ntlm, test_cert, write_users_file, Client, Config, Gateway, Sink, ALICE, TIMEOUT,
};

use crate::HOST;

/// The repository's root (this crate is `tests/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

/// Metrics on port 0, a backend check every second.
fn with_metrics(c: Config) -> Config {
    c.set("metrics.address", "127.0.0.1:0")
        .set("metrics.probe_interval", "1s")
}

fn output(out: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------- the big one

/// A gateway with STARTTLS, AUTH (users file) and an audit file, in front
/// of smtp-sink, scraped by Prometheus with the shipped alert rules loaded.
struct Stack {
    sink: Sink,
    gw: Gateway,
    metrics: SocketAddr,
    prom: Prometheus,
    audit: PathBuf,
}

fn stack() -> Stack {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = test_cert(dir.path());
    let users = dir.path().join("users.yaml");
    write_users_file(&users, &[ALICE]);
    let audit = dir.path().join("audit.jsonl");
    let yaml = with_metrics(Config::new(&[sink.addr()]))
        .tls(&cert, &key)
        .listener(
            "smtp",
            &[("tls", "starttls"), ("require_tls_for_auth", "false")],
        )
        .auth(&users)
        .set("audit.sink", "file")
        .set("audit.path", &format!("{:?}", audit.display().to_string()))
        .yaml();
    let gw = Gateway::start_in(dir, &yaml);
    let metrics = metrics_addr(&gw);
    let prom = Prometheus::start(&[metrics], &[&deploy("prometheus/alerts.yml")]);
    Stack {
        sink,
        gw,
        metrics,
        prom,
        audit,
    }
}

impl Stack {
    /// Waits until Prometheus has scraped a sample where `promql` (one
    /// series) equals `value`.
    fn expect(&self, promql: &str, value: f64) {
        self.prom.wait_for_value(promql, value);
    }
}

/// Runs the sessions every assertion below counts on:
/// 1. a message to two local recipients (delivered);
/// 2. a relay attempt (`550 5.7.1`), then QUIT;
/// 3. STARTTLS, `AUTH PLAIN` with a wrong password (`535`), then QUIT;
/// 4. AUTH NTLM with the right password and a message (delivered).
fn run_sessions(s: &Stack) {
    let smtp = s.gw.addr("smtp");
    let mut c = Client::greeted(smtp);
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.rcpt("y@example.test").expect("250");
    c.data_body("Subject: one\r\n\r\nfirst message\r\n")
        .expect("250");
    c.send("QUIT").expect("221");

    let mut c = Client::greeted(smtp);
    c.mail("mallory@client.test").expect("250");
    c.rcpt("victim@ext.test").expect("550 5.7.1");
    c.send("QUIT").expect("221");

    let mut c = Client::greeted(smtp);
    c.starttls("localhost");
    c.ehlo("client.test").expect("250");
    let bad = ntlm::b64(b"\0alice\0wrong-pass");
    c.send(&format!("AUTH PLAIN {bad}")).expect("535");
    c.send("QUIT").expect("221");

    let mut c = Client::greeted(smtp);
    ntlm::send_auth(&mut c, &ntlm::creds(&ALICE), ClientOptions::default());
    c.expect("235");
    c.mail("alice@client.test").expect("250");
    c.rcpt("z@example.test").expect("250");
    c.data_body("Subject: two\r\n\r\nsecond message\r\n")
        .expect("250");
    c.send("QUIT").expect("221");

    s.sink.wait_for_messages(2, TIMEOUT);
}

#[test]
fn prometheus_scrapes_what_the_sessions_did() {
    let s = stack();
    // Scraped before any session: the target is up, the build is known.
    s.expect("up{job=\"relayguard\"}", 1.0);
    let build = s.prom.wait_for("relayguard_build_info", |r| r.len() == 1);
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(build[0].value, 1.0);

    run_sessions(&s);

    // Connections and sessions, by listener and TLS version.
    s.expect(
        "relayguard_connections_accepted_total{listener=\"smtp\"}",
        4.0,
    );
    s.expect("sum(relayguard_connections_active)", 0.0);
    s.expect(
        "sum(relayguard_sessions_total{listener=\"smtp\",tls=\"none\"})",
        3.0,
    );
    s.expect(
        "sum(relayguard_sessions_total{listener=\"smtp\",tls=\"TLSv1.3\"})",
        1.0,
    );
    s.expect(
        "sum(relayguard_tls_handshake_failures_total{listener=\"smtp\"})",
        0.0,
    );
    // The backend: two delivered transactions, latency per stage, up.
    s.expect(
        "relayguard_backend_transactions_total{result=\"delivered\"}",
        2.0,
    );
    s.expect(
        "sum(relayguard_backend_transactions_total{result!=\"delivered\"})",
        0.0,
    );
    s.expect(
        "relayguard_backend_stage_duration_seconds_count{stage=\"data_done\"}",
        2.0,
    );
    s.prom.wait_for(
        "relayguard_backend_stage_duration_seconds_count{stage=\"connect\"} >= 1",
        |r| r.len() == 1,
    );
    s.expect(
        &format!("relayguard_backend_up{{server=\"{}\"}}", s.sink.addr()),
        1.0,
    );

    // Wired in the session: relay decisions, AUTH, messages forwarded.
    s.expect(
        "sum(relayguard_relay_decisions_total{decision=\"deny\"})",
        1.0,
    );
    s.expect(
        "sum(relayguard_relay_decisions_total{decision=\"accept\",reason=\"local\"})",
        3.0,
    );
    s.expect(
        "relayguard_auth_attempts_total{mechanism=\"PLAIN\",result=\"bad_credentials\"}",
        1.0,
    );
    s.expect(
        "relayguard_auth_attempts_total{mechanism=\"NTLM\",result=\"success\"}",
        1.0,
    );
    s.expect("relayguard_messages_forwarded_total", 2.0);
    s.expect("relayguard_recipients_forwarded_total", 3.0);
    s.expect("relayguard_message_size_bytes_count", 2.0);
    // Nothing lost on the way to the audit log (two deliveries, one relay
    // attempt: three transactions).
    s.prom.wait_for(
        "relayguard_audit_records_total{result=\"written\"} >= 3",
        |r| r.len() == 1,
    );
    s.expect(
        "sum(relayguard_audit_records_total{result=~\"dropped|failed\"})",
        0.0,
    );

    // The shipped alert rules load and evaluate cleanly against the real
    // series, and none fires for this healthy gateway.
    let groups = s.prom.api("rules");
    let group = groups["data"]["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == "relayguard"))
        .unwrap_or_else(|| panic!("alert group not loaded: {groups}"));
    let loaded = group["rules"].as_array().expect("rules");
    assert!(loaded.len() >= 10, "{group}");
    let ok = relayguard_e2e::wait_until(TIMEOUT, || {
        let g = s.prom.api("rules");
        g["data"]["groups"][0]["rules"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["health"] == "ok"))
    });
    assert!(ok, "a rule does not evaluate: {}", s.prom.api("rules"));
    let firing = s.prom.query("ALERTS{alertstate=\"firing\"}");
    assert!(
        firing.is_empty(),
        "alerts firing for a healthy gateway: {firing:?}"
    );

    // The audit log: one record per transaction decision, no secrets.
    let audit = std::fs::read_to_string(&s.audit).unwrap_or_default();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let decisions: Vec<&str> = records
        .iter()
        .filter_map(|r| r["decision"].as_str())
        .collect();
    assert_eq!(
        decisions.iter().filter(|d| **d == "delivered").count(),
        2,
        "{audit}"
    );
    assert!(decisions.contains(&"relay_denied"), "{audit}");
    let ntlm_record = records
        .iter()
        .find(|r| r["mechanism"] == "NTLM")
        .unwrap_or_else(|| panic!("no authenticated record: {audit}"));
    assert_eq!(ntlm_record["principal"], "DEMO\\alice", "{ntlm_record}");
    assert_eq!(ntlm_record["listener"], "smtp");
    assert!(
        !audit.contains("wrong-pass") && !audit.contains(&ntlm::b64(b"\0alice\0wrong-pass")),
        "a password reached the audit log: {audit}"
    );
    let logs = s.gw.logs().join("\n");
    assert!(!logs.contains("wrong-pass"), "a password reached the log");
}

#[test]
fn metrics_pass_promtool_and_the_dashboard_asks_only_for_them() {
    let s = stack();
    run_sessions(&s);
    let text = http_get(s.metrics, "/metrics").body;

    // promtool's linter: names, suffixes, units, HELP. No output at all.
    let out = promtool(&["check", "metrics"], Some(text.as_bytes()));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{text}",
        output(&out)
    );
    // Bounded labels: no client address, user or envelope address leaks
    // into a label value.
    for leak in ["127.0.0.1:", "alice", "example.test", "client.test"] {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let labels = line.split_once('{').map(|(_, l)| l).unwrap_or("");
            let server_label = format!("server=\"{}\"", s.sink.addr());
            let labels = labels.replace(&server_label, "");
            assert!(!labels.contains(leak), "{leak} in a label: {line}");
        }
    }

    // Every metric the dashboard queries is exported.
    let exported = sample_names(&text);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/relayguard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let exprs = dashboard_queries(&dashboard);
    assert!(exprs.len() >= 20, "{exprs:#?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "no metric in {e:?}");
        used.extend(names);
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics the gateway does not export: {missing:?}\nexported: {exported:?}"
    );
    // And each query is valid PromQL with Grafana's variables filled in.
    for e in &exprs {
        let q = e
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        if q.starts_with("label_values(") {
            continue;
        }
        s.prom.query(&q);
    }
    // The dashboard covers every family (nothing exported goes unseen),
    // except the ones that only matter to alerts.
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for f in &families {
        assert!(
            used.iter().any(|u| u.starts_with(f.as_str())),
            "family {f} is on no dashboard panel"
        );
    }
}

/// Every PromQL expression of the dashboard: panel targets and the
/// templating queries.
fn dashboard_queries(d: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push(e.to_string());
                }
                for (k, v) in m {
                    if k == "templating" {
                        for var in v["list"].as_array().into_iter().flatten() {
                            if let Some(q) = var["query"]["query"].as_str() {
                                out.push(q.to_string());
                            }
                        }
                    } else {
                        walk(v, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(d, &mut out);
    out
}

/// The metric names a PromQL expression selects: identifiers that are not
/// functions, keywords, label names in `by (…)` and the like, or inside
/// `{…}`, `[…]` and strings. Grafana's `label_values(metric, label)`
/// gives `metric`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    if let Some(args) = expr.trim().strip_prefix("label_values(") {
        let metric = args.split([',', ')']).next().unwrap_or("").trim();
        return BTreeSet::from([metric.to_string()]);
    }
    // Operators, and the aggregations (which may be followed by `by (…)`
    // rather than by their argument).
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Blank out strings, label matchers and ranges.
    let mut plain = Vec::new();
    let (mut brace, mut bracket, mut string, mut escaped) = (0, 0, false, false);
    for c in expr.chars() {
        let keep = if string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                string = false;
            }
            false
        } else {
            match c {
                '"' => string = true,
                '{' => brace += 1,
                '}' => brace -= 1,
                '[' => bracket += 1,
                ']' => bracket -= 1,
                _ => {}
            }
            brace == 0 && bracket == 0 && !"\"{}[]".contains(c)
        };
        plain.push(if keep { c } else { ' ' });
    }
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$';
    let next_char = |from: usize| plain[from..].iter().copied().find(|c| !c.is_whitespace());
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < plain.len() {
        let c = plain[i];
        if c.is_ascii_digit() || c == '.' {
            // A number, possibly with an exponent or unit: skip it whole.
            while i < plain.len() && (plain[i].is_ascii_alphanumeric() || plain[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !word_char(c) {
            i += 1;
            continue;
        }
        let start = i;
        while i < plain.len() && word_char(plain[i]) {
            i += 1;
        }
        let word: String = plain[start..i].iter().collect();
        let lower = word.to_ascii_lowercase();
        if GROUPING.contains(&lower.as_str()) && next_char(i) == Some('(') {
            // Skip the label list `(…)`.
            while i < plain.len() && plain[i] != ')' {
                i += 1;
            }
            continue;
        }
        if KEYWORDS.contains(&lower.as_str()) || word.starts_with('$') || next_char(i) == Some('(')
        {
            continue;
        }
        names.insert(word);
    }
    names
}

#[test]
fn promql_name_extraction() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names("sum by (listener, reason) (rate(relayguard_connections_refused_total{instance=~\"$instance\"}[$__rate_interval]))"),
        ["relayguard_connections_refused_total"]
    );
    assert_eq!(
        names("histogram_quantile(0.95, sum by (stage, le) (rate(a_bucket{x=\"y\"}[5m]))) / on (stage) b + 2 * c"),
        ["a_bucket", "b", "c"]
    );
    assert_eq!(
        names("label_values(relayguard_build_info, instance)"),
        ["relayguard_build_info"]
    );
    assert_eq!(names("sum(x) / sum without (le) (y) > 0.5"), ["x", "y"]);
    assert_eq!(
        names("max by (server) (up_x) == 0 unless count(z)"),
        ["up_x", "z"]
    );
}

// ---------------------------------------------------------------- readiness

#[test]
fn readiness_follows_the_backend() {
    let sink = PlainSink::start();
    let backend = sink.addr();
    let gw = Gateway::start(&config(
        backend,
        &[
            ("metrics.address", "127.0.0.1:0"),
            ("metrics.probe_interval", "1s"),
        ],
    ));
    let m = metrics_addr(&gw);

    assert_eq!(http_get(m, "/healthz").body, "ok\n");
    assert_eq!(wait_for_status(m, "/readyz", 200).body, "ready\n");

    // The backend stops: not ready, with the reason.
    drop(sink);
    let r = wait_for_status(m, "/readyz", 503);
    assert_eq!(r.body, "not ready: no backend server reachable\n");
    assert_eq!(http_get(m, "/healthz").status, 200, "alive all the same");
    let text = http_get(m, "/metrics").body;
    assert_eq!(
        sample_value(
            &text,
            "relayguard_backend_up",
            &[("server", &backend.to_string())]
        ),
        Some(0.0),
        "{text}"
    );

    // A new backend on the same address: ready again.
    let _sink = PlainSink::start_at(backend);
    wait_for_status(m, "/readyz", 200);

    // The endpoint's own rules: 404, 405 with Allow, the text format.
    assert_eq!(http_get(m, "/nope").status, 404);
    let post = http_request(m, "POST", "/metrics").expect("POST");
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    let metrics = http_get(m, "/metrics");
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let head = http_request(m, "HEAD", "/metrics").expect("HEAD");
    assert_eq!((head.status, head.body.as_str()), (200, ""));

    // SMTP still works through all this.
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send("QUIT").expect(&format!("221 2.0.0 {HOST} Bye"));
}

// ---------------------------------------------------------------- the shipped files

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = deploy("prometheus/alerts.yml");
    let out = promtool(&["check", "rules", &rules.display().to_string()], None);
    assert!(out.status.success(), "{}", output(&out));
    let tests = deploy("prometheus/alerts_test.yml");
    let out = promtool(&["test", "rules", &tests.display().to_string()], None);
    assert!(out.status.success(), "{}", output(&out));
    let example = deploy("prometheus/prometheus.yml");
    let out = promtool(&["check", "config", &example.display().to_string()], None);
    assert!(out.status.success(), "{}", output(&out));
}
