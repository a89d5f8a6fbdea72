//! End-to-end tests: the real `relayguard` binary between real clients
//! (swaks, curl, a raw SMTP client) and a real backend (smtp-sink, or a
//! scripted fake for failures). Every test starts its own gateway and
//! backend on fresh ports, so the tests run in parallel.
//!
//! Needs `target/debug/relayguard` (`cargo build --workspace --bins`) and
//! the Debian packages that `tests/run` installs.

mod ad;
mod auth;
mod auth_ad;
mod backend;
mod backend_tls;
mod core;
mod faults;
mod lifecycle;
mod observability;
mod policy;
mod protocol;
mod proxy;
mod tls;

use std::path::PathBuf;

use relayguard_e2e::{config, test_cert, Client, Config, Gateway, Sink, SinkMessage, TIMEOUT};

/// The gateway's name in tests (`hostname` in [`relayguard_e2e::Config`]).
const HOST: &str = "relay.test";

/// A message with the things that go wrong in transit: leading dots,
/// an empty line, a line that is only a dot.
const BODY: &str = "From: Alice <alice@client.test>\r\n\
                    To: Bob <x@example.test>\r\n\
                    Subject: end-to-end\r\n\
                    Message-ID: <e2e-1@client.test>\r\n\
                    \r\n\
                    Hello from the end-to-end tests.\r\n\
                    .a line starting with a dot\r\n\
                    ..and one with two\r\n\
                    .\r\n\
                    \r\n\
                    Last line.\r\n";

/// A smtp-sink backend and a gateway in front of it, configured with
/// `extra` dotted-key settings.
fn gateway_with_sink(extra: &[(&str, &str)]) -> (Sink, Gateway) {
    let sink = Sink::start(&[]);
    let gw = Gateway::start(&config(sink.addr(), extra));
    (sink, gw)
}

/// A smtp-sink backend and a gateway in front of it with one listener,
/// `name`, set to `tls: mode` (`starttls` or `implicit`) with a fresh test
/// certificate; also the certificate's path, for clients that check it.
fn tls_gateway_with_sink(name: &str, mode: &str) -> (Sink, Gateway, PathBuf) {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = test_cert(dir.path());
    let yaml = Config::new(&[sink.addr()])
        .tls(&cert, &key)
        .listener(name, &[("tls", mode)])
        .yaml();
    let gw = Gateway::start_in(dir, &yaml);
    (sink, gw, cert)
}

/// Sends one good message through the gateway and waits until the sink
/// has exactly `expected_total` messages, the last being this one. Used
/// after something that must NOT have been delivered: once this message
/// is through, anything earlier would have arrived too.
fn barrier(gw: &Gateway, sink: &Sink, expected_total: usize) -> Vec<SinkMessage> {
    let body = "Subject: barrier\r\n\r\nbarrier\r\n";
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("barrier@client.test").expect("250");
    c.rcpt("barrier@example.test").expect("250");
    c.data_body(body).expect("250");
    c.send("QUIT").expect("221");
    let msgs = sink.wait_for_messages(expected_total, TIMEOUT);
    // smtp-sink's dump files often share a timestamp, so their order is
    // not the arrival order: find the barrier rather than take the last.
    assert_eq!(
        msgs.iter()
            .filter(|m| m.mail_from() == "barrier@client.test")
            .count(),
        1,
        "{msgs:#?}"
    );
    msgs
}
