//! STARTTLS toward the backend: verified against a pinned CA, refused when
//! it cannot be verified or is not offered and `backend.tls: required`.
//!
//! The TLS-capable backend is a second RelayGuard (a real STARTTLS server)
//! in front of smtp-sink: client → gateway A ─STARTTLS→ gateway B → sink.

use relayguard_e2e::{test_cert, Client, Config, Gateway, Sink, TIMEOUT};

use crate::{assert_same_body, send_in_pieces, varied_body, BODY};

/// Gateway B: STARTTLS listener with a test certificate, in front of a sink.
/// Returns the sink, B, and B's certificate path.
fn tls_backend() -> (Sink, Gateway, std::path::PathBuf) {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = test_cert(dir.path());
    let yaml = Config::new(&[sink.addr()])
        .set("hostname", "inner.test")
        .tls(&cert, &key)
        .listener("smtp", &[("tls", "starttls")])
        .yaml();
    let inner = Gateway::start_in(dir, &yaml);
    (sink, inner, cert)
}

/// Gateway A: requires STARTTLS toward B, verified against B's certificate.
fn pinned_outer(inner: &Gateway, cert: &std::path::Path) -> Gateway {
    let yaml = Config::new(&[inner.addr("smtp")])
        .set("backend.tls", "required")
        .set(
            "backend.ca_file",
            &format!("{:?}", cert.display().to_string()),
        )
        .set("backend.server_name", "localhost")
        .yaml();
    Gateway::start(&yaml)
}

fn send_one(gw: &Gateway, first_rcpt_reply: &str) -> Client {
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("bob@example.test").expect(first_rcpt_reply);
    c
}

#[test]
fn backend_starttls_with_pinned_ca_delivers_over_tls() {
    let (sink, inner, cert) = tls_backend();
    let outer = pinned_outer(&inner, &cert);
    let mut c = send_one(&outer, "250 2.1.5");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    let m = &msgs[0];
    // Two RelayGuard hops: the inner one received over TLS from the outer.
    let received = m.first_received().unwrap();
    assert!(
        received.contains("by inner.test (RelayGuard) with ESMTPS"),
        "{received}"
    );
    assert!(received.contains("(using TLSv1."), "{received}");
    assert_eq!(m.data.matches("(RelayGuard)").count(), 2, "{}", m.data);
    assert!(m.data.contains("Hello from the end-to-end tests."));
}

/// A large body over the TLS backend connection (written in pieces put
/// together around runs of the client's bytes) arrives exactly.
#[test]
fn a_large_body_arrives_exactly_over_backend_tls() {
    let (sink, inner, cert) = tls_backend();
    let outer = pinned_outer(&inner, &cert);
    let body = varied_body(700_000, 42);
    let mut c = send_one(&outer, "250 2.1.5");
    send_in_pieces(&mut c, &body).expect("250");
    c.send("QUIT").expect("221");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    let m = &msgs[0];
    assert!(
        m.first_received().unwrap().contains("with ESMTPS"),
        "{}",
        m.first_received().unwrap()
    );
    // Two Received headers, the inner gateway's and the outer's, then the
    // body as sent.
    let after_inner = m.without_first_received();
    let outer_line = after_inner.find("\n").unwrap() + 1;
    let continued = after_inner[outer_line..]
        .lines()
        .take_while(|l| l.starts_with([' ', '\t']))
        .map(|l| l.len() + 1)
        .sum::<usize>();
    assert_same_body(&after_inner[outer_line + continued..], &body);
}

#[test]
fn backend_certificate_not_from_the_pinned_ca_is_refused() {
    let (sink, inner, _) = tls_backend();
    let other = tempfile::tempdir().unwrap();
    let (wrong_ca, _, _) = test_cert(other.path());
    let yaml = Config::new(&[inner.addr("smtp")])
        .set("backend.tls", "required")
        .set(
            "backend.ca_file",
            &format!("{:?}", wrong_ca.display().to_string()),
        )
        .set("backend.server_name", "localhost")
        .yaml();
    let outer = Gateway::start(&yaml);
    let mut c = send_one(&outer, "451 4.4.1");
    c.send("QUIT").expect("221");
    outer.wait_for_log("backend", TIMEOUT);
    assert_eq!(sink.delivered(), 0);
}

#[test]
fn required_backend_tls_without_starttls_offered_is_refused() {
    // smtp-sink offers no STARTTLS.
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, _, _) = test_cert(dir.path());
    let yaml = Config::new(&[sink.addr()])
        .set("backend.tls", "required")
        .set(
            "backend.ca_file",
            &format!("{:?}", cert.display().to_string()),
        )
        .yaml();
    let outer = Gateway::start(&yaml);
    let mut c = send_one(&outer, "451 4.4.1");
    c.send("QUIT").expect("221");
    assert_eq!(sink.delivered(), 0);
}

#[test]
fn opportunistic_backend_tls_falls_back_to_plain() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, _, _) = test_cert(dir.path());
    let yaml = Config::new(&[sink.addr()])
        .set("backend.tls", "opportunistic")
        .set(
            "backend.ca_file",
            &format!("{:?}", cert.display().to_string()),
        )
        .yaml();
    let outer = Gateway::start(&yaml);
    let mut c = send_one(&outer, "250");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");
    assert_eq!(sink.wait_for_messages(1, TIMEOUT).len(), 1);
}
