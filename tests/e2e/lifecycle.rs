//! The process around the sessions: graceful shutdown, admission limits,
//! `relayguard check`.

use std::net::TcpStream;
use std::time::Duration;

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

#[test]
fn check_refuses_a_bad_limit_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "listeners:\n  - name: smtp\n    address: 127.0.0.1:0\nbackend:\n  servers: [\"127.0.0.1:25\"]\nlimits:\n  max_command_length: 100\n";
    let out = Gateway::check_in(dir.path(), yaml);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let located = format!(
        "{}:7:3: field `limits.max_command_length`",
        dir.path().join("relayguard.yaml").display()
    );
    assert!(stderr.contains(&located), "expected {located} in: {stderr}");
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
