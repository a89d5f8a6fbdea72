//! Mail goes through: real clients, the gateway, smtp-sink. The backend
//! must get the client's envelope and body unchanged, plus exactly one
//! Received header naming the session.

use std::path::Path;

use relayguard_e2e::{curl, swaks, words, write_file, Client, TIMEOUT};

use crate::{
    assert_same_body, gateway_with_sink, send_in_pieces, tls_gateway_with_sink, varied_body, BODY,
    HOST,
};

/// BODY in a file, for curl (which sends a file as it is).
fn body_file(dir: &Path) -> String {
    let path = dir.join("body.eml");
    write_file(&path, BODY);
    path.display().to_string()
}

/// BODY in a file for swaks, which always adds CRLF before the final dot:
/// without BODY's last CRLF, swaks sends exactly BODY.
fn swaks_body_file(dir: &Path) -> String {
    let path = dir.join("swaks-body.eml");
    write_file(&path, BODY.strip_suffix("\r\n").unwrap());
    path.display().to_string()
}

fn assert_success(tool: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{tool} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn swaks_plain_to_local_domain_is_delivered() {
    let (sink, gw) = gateway_with_sink(&[]);
    let body = swaks_body_file(gw.dir());
    let out = swaks(&words(&format!(
        "--server {} --helo client.test --from alice@client.test --to x@example.test --data @{body}",
        gw.addr("smtp")
    )));
    assert_success("swaks", &out);

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    let m = &msgs[0];
    assert_eq!(m.mail_from(), "alice@client.test");
    assert_eq!(m.rcpt_to(), ["x@example.test"]);
    assert_eq!(
        m.helo.as_deref(),
        Some(HOST),
        "the gateway greets the backend with its own name"
    );
    m.assert_relayed(BODY, HOST, "ESMTP");
    let received = m.first_received().unwrap();
    assert!(
        received.starts_with("from client.test ([127.0.0.1])"),
        "{received}"
    );
}

#[test]
fn swaks_multiple_recipients_one_message() {
    let (sink, gw) = gateway_with_sink(&[]);
    let body = swaks_body_file(gw.dir());
    let out = swaks(&words(&format!(
        "--server {} --from alice@client.test --to x@example.test,y@example.test,z@example.test \
         --data @{body}",
        gw.addr("smtp")
    )));
    assert_success("swaks", &out);

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(
        msgs[0].rcpt_to(),
        ["x@example.test", "y@example.test", "z@example.test"]
    );
    msgs[0].assert_relayed(BODY, HOST, "ESMTP");
}

#[test]
fn curl_plain_is_delivered() {
    let (sink, gw) = gateway_with_sink(&[]);
    let body = body_file(gw.dir());
    let out = curl(&words(&format!(
        "-sS --max-time 30 smtp://{}/client.test --mail-from alice@client.test \
         --mail-rcpt x@example.test --upload-file {body}",
        gw.addr("smtp")
    )));
    assert_success("curl", &out);

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(msgs[0].mail_from(), "alice@client.test");
    assert_eq!(msgs[0].rcpt_to(), ["x@example.test"]);
    msgs[0].assert_relayed(BODY, HOST, "ESMTP");
}

#[test]
fn curl_starttls_is_delivered_with_esmtps() {
    let (sink, gw, cert) = tls_gateway_with_sink("smtp", "starttls");
    let port = gw.addr("smtp").port();
    let body = body_file(gw.dir());
    let out = curl(&words(&format!(
        "-sS --max-time 30 --ssl-reqd --cacert {} --resolve localhost:{port}:127.0.0.1 \
         smtp://localhost:{port}/client.test --mail-from alice@client.test \
         --mail-rcpt x@example.test --upload-file {body}",
        cert.display()
    )));
    assert_success("curl", &out);

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    msgs[0].assert_relayed(BODY, HOST, "ESMTPS");
    let received = msgs[0].first_received().unwrap();
    assert!(
        received.contains("(using TLSv1.3 with cipher "),
        "{received}"
    );
}

#[test]
fn curl_implicit_tls_is_delivered_with_esmtps() {
    let (sink, gw, _) = tls_gateway_with_sink("smtps", "implicit");
    let body = body_file(gw.dir());
    let out = curl(&words(&format!(
        "-sS --max-time 30 -k smtps://{}/client.test --mail-from alice@client.test \
         --mail-rcpt x@example.test --mail-rcpt y@example.test --upload-file {body}",
        gw.addr("smtps")
    )));
    assert_success("curl", &out);

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(msgs[0].rcpt_to(), ["x@example.test", "y@example.test"]);
    msgs[0].assert_relayed(BODY, HOST, "ESMTPS");
    assert!(msgs[0]
        .first_received()
        .unwrap()
        .contains("(using TLSv1.3 with cipher "));
}

#[test]
fn relaying_to_a_foreign_domain_is_refused() {
    let (sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250 2.1.0");
    c.rcpt("victim@ext.test").expect("550 5.7.1");
    c.send("DATA").expect("554 5.5.1");
    c.send("QUIT").expect("221");
    assert!(c.is_closed());
    // The backend was never involved: not even a connection reached it.
    assert_eq!(sink.delivered(), 0);
    assert!(sink.messages().is_empty());
}

#[test]
fn session_summary_is_logged_with_the_received_session_id() {
    let (sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    let id = msgs[0].session_id().expect("session id in Received");
    let summary = gw.wait_for_event("session closed", TIMEOUT, |v| v["session"] == id.as_str());
    assert_eq!(summary["helo"], "client.test", "{summary}");
    let tx = summary["transactions"].as_str().unwrap_or_default();
    assert!(tx.contains("from=<alice@client.test>"), "{summary}");
    let message = gw.wait_for_event("message", TIMEOUT, |v| v["session"] == id.as_str());
    assert_eq!(message["reply"], 250, "{message}");
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Large bodies go from the gateway's read buffer to the backend in pieces
/// put together around runs of the client's own bytes; whatever the
/// client's writes look like, the backend gets exactly the message, and
/// the messages of one connection do not mix.
#[test]
fn large_varied_bodies_arrive_exactly() {
    let (sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    let bodies: Vec<String> = (1..=3).map(|seed| varied_body(700_000, seed)).collect();
    for (i, body) in bodies.iter().enumerate() {
        c.mail(&format!("big{i}@client.test")).expect("250");
        c.rcpt("x@example.test").expect("250");
        send_in_pieces(&mut c, body).expect("250");
    }
    c.send("QUIT").expect("221");
    let msgs = sink.wait_for_messages(3, TIMEOUT);
    for (i, body) in bodies.iter().enumerate() {
        let from = format!("big{i}@client.test");
        let m = msgs.iter().find(|m| m.mail_from() == from).expect(&from);
        assert_same_body(m.without_first_received(), body);
    }
}

#[test]
fn a_50_mb_message_is_streamed_not_buffered() {
    let (sink, gw) = gateway_with_sink(&[("limits.max_message_size", "60000000")]);
    let before = rss_kib(gw.pid());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("big@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.send("DATA").expect("354");
    let line = format!("{}\r\n", "x".repeat(998));
    let block = line.repeat(1000); // 1 MB
    for _ in 0..50 {
        c.send_raw(block.as_bytes());
    }
    c.send_raw(b".\r\n").expect("250");
    c.send("QUIT").expect("221");
    let after = rss_kib(gw.pid());
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    // smtp-sink stores LF line ends: 50,000 lines of 998 bytes + LF.
    assert_eq!(
        msgs[0].data.matches(&line[..998]).count(),
        50_000,
        "whole message arrived"
    );
    // The whole message is 50 MB; the gateway's memory must not grow by
    // anything near that.
    assert!(
        after.saturating_sub(before) < 10 * 1024,
        "RSS grew from {before} KiB to {after} KiB while relaying 50 MB"
    );
}
