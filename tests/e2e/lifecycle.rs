//! The process around the sessions: graceful shutdown, admission limits,
//! `relayguard check`.

use std::net::TcpStream;
use std::time::Duration;

use relayguard_e2e::prometheus::{metrics_addr, scrape_value};
use relayguard_e2e::{closed_port, config, dot_stuff, wait_until, Client, Gateway, TIMEOUT};

use crate::{gateway_with_sink, BODY, HOST};

#[test]
fn sigterm_lets_the_transaction_in_flight_finish() {
    let (sink, mut gw) = gateway_with_sink(&[("shutdown.drain_timeout", "20s")]);
    let mut busy = Client::greeted(gw.addr("smtp"));
    busy.mail("alice@client.test").expect("250");
    busy.rcpt("x@example.test").expect("250");
    busy.send("DATA").expect("354");
    let wire = dot_stuff(BODY);
    let (head, tail) = wire.split_at(wire.len() / 2);
    busy.send_raw(head.as_bytes());
    let mut idle = Client::greeted(gw.addr("smtp"));

    gw.signal("TERM");
    // The idle client is told at once.
    idle.expect(&format!("421 4.3.2 {HOST}"));
    assert!(idle.is_closed());
    // New connections are no longer accepted: the listener is closed.
    gw.wait_for_log("shutting down", TIMEOUT);
    let addr = gw.addr("smtp");
    let refused = wait_until(TIMEOUT, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
    });
    assert!(
        refused,
        "the listener still accepts connections after SIGTERM"
    );

    // The transaction in flight completes and is delivered.
    busy.send_raw(tail.as_bytes()).expect("250");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    msgs[0].assert_relayed(BODY, HOST, "ESMTP");
    // Then that client too is told the service is going away.
    busy.expect("421 4.3.2");

    let status = gw
        .wait_exit(TIMEOUT)
        .expect("relayguard exits after draining");
    assert!(status.success(), "exit status {status}");
    // It exited because the sessions were done, not at the drain deadline.
    gw.wait_for_log("all sessions finished", TIMEOUT);
}

#[test]
fn connections_over_the_per_ip_limit_get_421() {
    let (_sink, gw) = gateway_with_sink(&[("limits.max_connections_per_ip", "2")]);
    let mut first = Client::connect(gw.addr("smtp"));
    first.expect("220");
    let mut second = Client::connect(gw.addr("smtp"));
    second.expect("220");
    let mut third = Client::connect(gw.addr("smtp"));
    third.expect("421 4.7.0");
    assert!(third.is_closed());

    // A freed place is given to the next client.
    first.send("QUIT").expect("221");
    assert!(first.is_closed());
    let mut again = None;
    let admitted = wait_until(TIMEOUT, || {
        let mut c = Client::connect(gw.addr("smtp"));
        let ok = c.read_reply().code == 220;
        again = Some(c);
        ok
    });
    assert!(
        admitted,
        "a third client is admitted once the first has gone"
    );
    second.send("NOOP").expect("250");
    drop(again);
}

#[test]
fn check_accepts_a_good_config() {
    // `check` does not contact the backend.
    let out = Gateway::check(&config(closed_port(), &[]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
}

#[test]
fn check_locates_an_unknown_field() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "listeners:\n  - name: smtp\n    address: 127.0.0.1:0\n    adress: typo\nbackend:\n  servers: [\"127.0.0.1:25\"]\n";
    let out = Gateway::check_in(dir.path(), yaml);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = dir.path().join("relayguard.yaml");
    let located = format!("{}:4:", file.display());
    assert!(
        stderr.contains(&located),
        "expected {located}... in: {stderr}"
    );
    assert!(stderr.contains("field `listeners[0]"), "{stderr}");
    assert!(stderr.contains("adress"), "{stderr}");
}

/// Runs `relayguard check` on a configuration of one listener and one
/// backend followed by `rest`; asserts it is refused with
/// `relayguard.yaml:<at>` in its message and returns the message.
fn check_refused_at(rest: &str, at: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listeners:\n  - name: smtp\n    address: 127.0.0.1:0\nbackend:\n  servers: [\"127.0.0.1:25\"]\n{rest}"
    );
    let out = Gateway::check_in(dir.path(), &yaml);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let located = format!("{}:{at}", dir.path().join("relayguard.yaml").display());
    assert!(stderr.contains(&located), "expected {located} in: {stderr}");
    stderr
}

#[test]
fn check_refuses_a_bad_limit_with_its_location() {
    check_refused_at(
        "limits:\n  max_command_length: 100\n",
        "7:3: field `limits.max_command_length`",
    );
}

#[test]
fn check_refuses_zero_threads_with_its_location() {
    let stderr = check_refused_at("threads: 0\n", "6:1: field `threads`");
    assert!(stderr.contains("between 1 and 1024"), "{stderr}");
}

#[test]
fn run_refuses_a_bad_config_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    relayguard_e2e::write_file(
        &path,
        "listeners: []\nbackend:\n  servers: [\"127.0.0.1:25\"]\n",
    );
    let out = std::process::Command::new(relayguard_e2e::relayguard_bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least one listener"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

#[test]
fn idle_timeout_closes_with_421() {
    let (_sink, gw) = gateway_with_sink(&[("limits.command_timeout", "1s")]);
    let mut c = Client::greeted(gw.addr("smtp"));
    let started = std::time::Instant::now();
    c.expect("421 4.4.2");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(c.is_closed());
}

// ------------------------------------------------ silent clients (the parker)
//
// A client that is greeted and says nothing waits in its listener's parker,
// not in a task of its own (gateway/src/idle.rs). `Client::greeted` sends
// EHLO, so these tests connect with `Client::connect` and stay silent.

/// Connects and reads the greeting, then says nothing.
fn silent(addr: std::net::SocketAddr) -> Client {
    let mut c = Client::connect(addr);
    c.expect(&format!("220 {HOST}"));
    c
}

/// `end` of the "session closed" lines logged so far.
fn session_ends(gw: &Gateway) -> Vec<String> {
    gw.log_events("session closed")
        .iter()
        .map(|v| v["end"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn a_client_silent_after_the_greeting_times_out_with_421() {
    let (_sink, gw) = gateway_with_sink(&[("limits.command_timeout", "1s")]);
    let mut c = silent(gw.addr("smtp"));
    let started = std::time::Instant::now();
    c.expect(&format!("421 4.4.2 {HOST}"));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "after {waited:?}");
    assert!(c.is_closed());
    let ev = gw.wait_for_event("session closed", TIMEOUT, |_| true);
    assert_eq!(ev["end"], "timeout", "{ev}");
}

/// At SIGTERM every silent client is told 421 at once, and the gateway
/// exits without waiting for the drain deadline.
#[test]
fn sigterm_tells_every_silent_client_at_once() {
    let (_sink, mut gw) = gateway_with_sink(&[("shutdown.drain_timeout", "30s")]);
    let mut clients: Vec<Client> = (0..20).map(|_| silent(gw.addr("smtp"))).collect();
    let started = std::time::Instant::now();
    gw.signal("TERM");
    for c in &mut clients {
        c.expect(&format!("421 4.3.2 {HOST}"));
        assert!(c.is_closed());
    }
    let status = gw.wait_exit(TIMEOUT).expect("relayguard exits");
    assert!(status.success(), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    gw.wait_for_log("all sessions finished", TIMEOUT);
    let ends = session_ends(&gw);
    assert_eq!(ends.len(), 20, "{ends:?}");
    assert!(ends.iter().all(|e| e == "shutdown"), "{ends:?}");
}

/// A silent client that hangs up gives everything back: its place under
/// the per-address limit, the `connections_active` gauge, its descriptor.
/// One that speaks after a while gets its session.
#[test]
fn silent_clients_that_hang_up_give_their_places_back() {
    let (_sink, gw) = gateway_with_sink(&[
        ("limits.max_connections_per_ip", "3"),
        ("metrics.address", "127.0.0.1:0"),
    ]);
    let smtp = gw.addr("smtp");
    let metrics = metrics_addr(&gw);
    let active = || {
        scrape_value(
            metrics,
            "relayguard_connections_active",
            &[("listener", "smtp")],
        )
    };
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .count()
    };
    let fd0 = fds();

    let mut clients: Vec<Client> = (0..3).map(|_| silent(smtp)).collect();
    assert_eq!(active(), Some(3.0));
    let mut refused = Client::connect(smtp);
    refused.expect("421 4.7.0");
    assert!(refused.is_closed());

    drop(clients.split_off(1));
    assert!(
        wait_until(TIMEOUT, || active() == Some(1.0)),
        "connections_active {:?} after two silent clients hung up",
        active()
    );
    assert!(wait_until(TIMEOUT, || session_ends(&gw)
        .iter()
        .filter(|e| *e == "client_gone")
        .count()
        == 2));
    assert!(
        wait_until(TIMEOUT, || fds() <= fd0 + 1),
        "{} fds, {fd0} before",
        fds()
    );

    // Their places are free again; the one still waiting speaks.
    let mut more: Vec<Client> = (0..2).map(|_| silent(smtp)).collect();
    let first = &mut clients[0];
    first.ehlo("client.test").expect("250");
    first.send("QUIT").expect("221");
    for c in &mut more {
        c.send("QUIT").expect("221");
    }
    assert!(
        wait_until(TIMEOUT, || active() == Some(0.0)),
        "connections_active {:?} after every client left",
        active()
    );
}

/// With `greeting_delay`, a client that talks before the greeting is
/// refused; a patient one is greeted after the delay, waits silent like
/// any other, and is served when it speaks.
#[test]
fn greeting_delay_refuses_early_talkers_and_greets_the_patient() {
    let (_sink, gw) = gateway_with_sink(&[
        ("smtp.greeting_delay", "500ms"),
        ("limits.command_timeout", "2s"),
    ]);
    let smtp = gw.addr("smtp");
    let mut early = Client::connect(smtp);
    early.send_raw(b"EHLO early.test\r\n");
    early.expect("554 5.5.1");
    assert!(early.is_closed());

    let started = std::time::Instant::now();
    let mut patient = silent(smtp);
    assert!(started.elapsed() >= Duration::from_millis(450));
    std::thread::sleep(Duration::from_millis(500));
    patient.ehlo("client.test").expect("250");
    patient.send("QUIT").expect("221");

    let mut quiet = silent(smtp);
    quiet.expect("421 4.4.2");
}

#[test]
fn a_second_instance_on_the_same_port_fails_to_start_and_takes_no_connection() {
    // Each shard has its own socket in a SO_REUSEPORT group; the port is
    // checked with a plain bind first, so a second gateway started by the
    // same user on the same port cannot quietly join the group.
    let (sink, gw) = gateway_with_sink(&[("threads", "2")]);
    let addr = gw.addr("smtp");
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(sink.addr(), &[("threads", "2")]).replace("127.0.0.1:0", &addr.to_string());
    let path = dir.path().join("second.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = std::process::Command::new(relayguard_e2e::relayguard_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run a second relayguard");
    if !wait_until(TIMEOUT, || child.try_wait().unwrap().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the second instance started on {addr}");
    }
    let second = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("listener `smtp`: cannot bind {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
    // Every connection still reaches the first gateway.
    for i in 0..10 {
        let mut c = Client::greeted(addr);
        c.mail(&format!("n{i}@client.test")).expect("250");
        c.rcpt("x@example.test").expect("250");
        c.data_body(BODY).expect("250");
        c.send("QUIT").expect("221");
    }
    sink.wait_for_messages(10, TIMEOUT);
}
