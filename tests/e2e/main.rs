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

/// A large message of varied lines (lengths 0 to 300, some starting with
/// one or two dots, some only a dot), the same for a given `seed`.
fn varied_body(len: usize, seed: u64) -> String {
    let mut state = seed | 1;
    let mut next = move |n: u64| {
        // xorshift64: deterministic, no dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut body = String::from("Subject: varied\r\n\r\n");
    while body.len() < len {
        match next(40) {
            0 => body.push_str(".\r\n"),
            1 => body.push_str(".. two dots\r\n"),
            2 => body.push_str(".one dot\r\n"),
            3 => body.push_str("\r\n"),
            _ => {
                let width = next(300) as usize;
                let start = next(26) as u8;
                body.extend((0..width).map(|i| (b'a' + (start + i as u8 % 26) % 26) as char));
                body.push_str("\r\n");
            }
        }
    }
    body
}

/// Sends `body` (dot-stuffed) after DATA in writes of uneven sizes that
/// split lines anywhere, and returns the client to read the final reply.
fn send_in_pieces<'a>(c: &'a mut Client, body: &str) -> &'a mut Client {
    c.send("DATA").expect("354");
    let wire = relayguard_e2e::dot_stuff(body);
    let mut rest = wire.as_bytes();
    let mut size = 1;
    while rest.len() > 1 {
        // 1, 1,001, 5,002, … bytes, never the whole remainder at once, so
        // the final dot comes in a write of its own or with a line before.
        size = (size * 5 + 1000) % 70_001 + 1;
        let (piece, tail) = rest.split_at(size.min(rest.len() - 1));
        c.send_raw(piece);
        rest = tail;
    }
    c.send_raw(rest)
}

/// Compares a delivered body with what was sent, reporting where they
/// first differ rather than two large messages.
fn assert_same_body(delivered: &str, sent: &str) {
    let sent = sent.replace("\r\n", "\n");
    if delivered != sent {
        let at = delivered
            .bytes()
            .zip(sent.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(delivered.len().min(sent.len()));
        panic!(
            "body differs at byte {at} (delivered {} bytes, sent {}): delivered {:?}, sent {:?}",
            delivered.len(),
            sent.len(),
            &delivered[at.saturating_sub(40)..(at + 40).min(delivered.len())],
            &sent[at.saturating_sub(40)..(at + 40).min(sent.len())],
        );
    }
}
