//! STARTTLS done right: no plaintext injection (CVE-2011-0411 class), and
//! nothing learned before TLS survives it.

use relayguard_e2e::{Client, Gateway, Sink, TIMEOUT};

use crate::{tls_gateway_with_sink, BODY, HOST};

fn starttls_gateway() -> (Sink, Gateway) {
    let (sink, gw, _) = tls_gateway_with_sink("smtp", "starttls");
    (sink, gw)
}

#[test]
fn commands_pipelined_after_starttls_are_refused() {
    let (sink, gw) = starttls_gateway();
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send_raw(b"STARTTLS\r\nEHLO injected.test\r\n")
        .expect("554 5.5.1");
    assert!(c.is_closed(), "the connection must be closed, not upgraded");
    assert_eq!(c.tls_version(), None);
    assert_eq!(sink.delivered(), 0);
}

#[test]
fn starttls_discards_everything_learned_before() {
    let (sink, gw) = starttls_gateway();
    let mut c = Client::connect(gw.addr("smtp"));
    c.expect("220");
    let ehlo = c.ehlo("before-tls.test").expect("250");
    assert!(ehlo.has_line("STARTTLS"), "{ehlo:?}");
    c.mail("before@client.test").expect("250");
    // Only outside a transaction.
    c.send("STARTTLS").expect("503 5.5.1");
    c.send("RSET").expect("250");
    let version = c.starttls("localhost");
    assert_eq!(version, "TLSv1_3");

    // The EHLO from before TLS is forgotten: MAIL needs a new one.
    c.mail("after@client.test").expect("503 5.5.1");
    let ehlo = c.ehlo("after-tls.test").expect("250");
    assert!(
        !ehlo.has_line("STARTTLS"),
        "STARTTLS is not offered twice: {ehlo:?}"
    );
    c.send("STARTTLS").expect("503 5.5.1");
    c.mail("after@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    let m = &msgs[0];
    assert_eq!(m.mail_from(), "after@client.test");
    m.assert_relayed(BODY, HOST, "ESMTPS");
    let received = m.first_received().unwrap();
    assert!(received.starts_with("from after-tls.test "), "{received}");
    assert!(
        received.contains("(using TLSv1.3 with cipher "),
        "{received}"
    );
}

#[test]
fn implicit_tls_listener_greets_inside_tls() {
    let (sink, gw, _) = tls_gateway_with_sink("smtps", "implicit");
    let mut c = Client::implicit_tls(gw.addr("smtps"), "localhost");
    c.expect("220");
    let ehlo = c.ehlo("client.test").expect("250");
    assert!(!ehlo.has_line("STARTTLS"), "{ehlo:?}");
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("250");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    msgs[0].assert_relayed(BODY, HOST, "ESMTPS");
}
