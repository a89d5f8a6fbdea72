//! The PROXY protocol behind a real HAProxy (`send-proxy`, `send-proxy-v2`):
//! the client address that policy, limits, logs and the Received header use
//! is the one behind the balancer, and only trusted balancers may claim one.
//!
//! Loopback has room for distinct addresses: the client binds 127.0.0.2 (or
//! .3) and connects to HAProxy; HAProxy connects to the gateway from
//! 127.0.0.1, the only trusted proxy. Without the PROXY protocol the
//! gateway would see 127.0.0.1 for everyone.
//!
//! What is checked on the client address: the Received header, the session
//! log, the relay policy (a trusted network behind the balancer may relay,
//! its neighbour may not) and the per-address connection limit.

use std::net::{IpAddr, SocketAddr};

use relayguard_e2e::{wait_until, Frontend, Haproxy, ProxyHeader};

use super::*;

const CLIENT: &str = "127.0.0.2";
const OTHER_CLIENT: &str = "127.0.0.3";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// smtp-sink, and a gateway whose `smtp` listener expects the PROXY
/// protocol from 127.0.0.1 only.
fn proxied_gateway(extra: &[(&str, &str)]) -> (Sink, Gateway) {
    let sink = Sink::start(&[]);
    let yaml = extra
        .iter()
        .fold(relayguard_e2e::Config::new(&[sink.addr()]), |c, (k, v)| {
            c.set(k, v)
        })
        .listener(
            "smtp",
            &[
                ("proxy_protocol", "true"),
                ("trusted_proxies", "[\"127.0.0.1/32\"]"),
            ],
        )
        // Reached directly, for barriers: no PROXY protocol there.
        .listener("direct", &[])
        .yaml();
    (sink, Gateway::start(&yaml))
}

/// One message from `source` through `entry`; returns after the final 250.
fn send_from(entry: SocketAddr, source: &str, from: &str) {
    let mut c = Client::connect_from(entry, ip(source));
    c.expect("220");
    c.ehlo("client.test").expect("250");
    c.mail(from).expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");
}

/// A message sent through the direct listener, then the sink holds exactly
/// `expected_total`: whatever was refused before it did not arrive.
fn direct_barrier(gw: &Gateway, sink: &Sink, expected_total: usize) -> Vec<SinkMessage> {
    send_from(gw.addr("direct"), "127.0.0.1", "barrier@client.test");
    let msgs = sink.wait_for_messages(expected_total, TIMEOUT);
    assert_eq!(
        msgs.last().map(|m| m.mail_from()),
        Some("barrier@client.test")
    );
    msgs
}

fn client_address_is_the_one_behind_haproxy(header: ProxyHeader) {
    let (sink, gw) = proxied_gateway(&[]);
    let lb = Haproxy::start(&[Frontend::new("lb", gw.addr("smtp"), header)]);
    send_from(lb.addr("lb"), CLIENT, "alice@client.test");

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    msgs[0].assert_relayed(BODY, HOST, "ESMTP");
    let received = msgs[0].first_received().unwrap();
    assert!(
        received.contains(&format!("([{CLIENT}])")),
        "Received header should name the client behind HAProxy: {received}"
    );
    assert!(!received.contains("[127.0.0.1]"), "{received}");
    // The session summary names the real client too.
    let summary = gw.wait_for_event("session closed", TIMEOUT, |v| {
        v["client"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{CLIENT}:")))
    });
    assert_eq!(summary["listener"], "smtp", "{summary}");
}

#[test]

fn haproxy_send_proxy_v1_gives_the_client_address() {
    client_address_is_the_one_behind_haproxy(ProxyHeader::V1);
}

#[test]

fn haproxy_send_proxy_v2_gives_the_client_address() {
    client_address_is_the_one_behind_haproxy(ProxyHeader::V2);
}

/// The relay policy decides on the client behind the balancer: the trusted
/// network 127.0.0.2/32 may relay without AUTH, 127.0.0.3 may not — both
/// through the same HAProxy, whose own address (127.0.0.1) is in neither.
#[test]

fn relay_policy_sees_the_client_network() {
    let (sink, gw) = proxied_gateway(&[(
        "policy.trusted_networks",
        "[{name: behind-lb, networks: [\"127.0.0.2/32\"], recipient_domains: [\"*\"]}]",
    )]);
    let lb = Haproxy::start(&[Frontend::new("lb", gw.addr("smtp"), ProxyHeader::V2)]);

    let mut denied = Client::connect_from(lb.addr("lb"), ip(OTHER_CLIENT));
    denied.expect("220");
    denied.ehlo("client.test").expect("250");
    denied.mail("mallory@client.test").expect("250");
    denied.rcpt("victim@ext.test").expect("550 5.7.1");
    denied.send("QUIT").expect("221");

    let mut allowed = Client::connect_from(lb.addr("lb"), ip(CLIENT));
    allowed.expect("220");
    allowed.ehlo("client.test").expect("250");
    allowed.mail("alice@client.test").expect("250");
    allowed.rcpt("friend@ext.test").expect("250");
    allowed.data_body(BODY).expect("250");
    allowed.send("QUIT").expect("221");

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(msgs[0].rcpt_to(), ["friend@ext.test"]);
    let received = msgs[0].first_received().unwrap();
    assert!(received.contains(&format!("([{CLIENT}])")), "{received}");
}

/// A real HAProxy that sends the header, but from 127.0.0.3, which the
/// gateway does not trust: refused before any SMTP, nothing delivered,
/// logged and counted as `proxy_untrusted`.
#[test]

fn header_from_an_untrusted_proxy_is_refused() {
    let (sink, gw) = proxied_gateway(&[]);
    let lb = Haproxy::start(&[
        Frontend::new("rogue", gw.addr("smtp"), ProxyHeader::V2).from_source(ip(OTHER_CLIENT))
    ]);
    let mut c = Client::connect_from(lb.addr("rogue"), ip(CLIENT));
    assert!(
        c.is_closed(),
        "no greeting through an untrusted proxy: {}",
        c.transcript()
    );
    let refusal = gw.wait_for_event("connection refused", TIMEOUT, |v| {
        v["reason"] == "proxy_untrusted"
    });
    assert!(
        refusal["client"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{OTHER_CLIENT}:"))),
        "the log names the untrusted peer: {refusal}"
    );
    direct_barrier(&gw, &sink, 1);
}

/// A client that writes a PROXY header itself, claiming another address,
/// is refused just the same: only the TCP peer's address decides trust.
#[test]

fn spoofed_header_from_a_client_is_refused() {
    let (sink, gw) = proxied_gateway(&[]);
    for header in [
        b"PROXY TCP4 10.9.9.9 127.0.0.1 40000 25\r\n".to_vec(),
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x0a\x09\x09\x09\x7f\x00\x00\x01\x9c\x40\x00\x19"
            .to_vec(),
    ] {
        // One write: the gateway may close before reading, and a second
        // write to a closed connection fails.
        let mut bytes = header;
        bytes.extend_from_slice(b"EHLO spoof.test\r\nMAIL FROM:<spoof@client.test>\r\n");
        let mut c = Client::connect_from(gw.addr("smtp"), ip(CLIENT));
        c.send_raw(&bytes);
        assert!(c.is_closed(), "{}", c.transcript());
    }
    // The log lines arrive through a pipe: wait for both.
    let untrusted = || {
        gw.log_events("connection refused")
            .into_iter()
            .filter(|v| v["reason"] == "proxy_untrusted")
            .count()
    };
    wait_until(TIMEOUT, || untrusted() >= 2);
    assert_eq!(untrusted(), 2, "{}", gw.logs().join("\n"));
    assert!(
        !gw.logs().iter().any(|l| l.contains("10.9.9.9")),
        "the claimed address must never be used"
    );
    direct_barrier(&gw, &sink, 1);
}

/// A trusted balancer that forgets the header (a plain TCP relay) does not
/// get a session either: the first bytes are not a PROXY header.
#[test]

fn trusted_peer_without_a_header_is_refused() {
    let (sink, gw) = proxied_gateway(&[]);
    let mut c = Client::connect_from(gw.addr("smtp"), ip("127.0.0.1"));
    c.send_raw(b"EHLO client.test\r\n");
    assert!(c.is_closed(), "{}", c.transcript());
    gw.wait_for_event("connection refused", TIMEOUT, |v| {
        v["reason"] == "proxy_header"
    });
    direct_barrier(&gw, &sink, 1);
}

/// `limits.max_connections_per_ip` counts the client behind the balancer:
/// two clients through one HAProxy are two addresses, a second connection
/// from the same client is over the limit. (Before PROXY support every
/// client behind HAProxy was 127.0.0.1 and the second one was refused.)
#[test]

fn per_address_limit_applies_to_the_real_client() {
    let (sink, gw) = proxied_gateway(&[("limits.max_connections_per_ip", "1")]);
    let lb = Haproxy::start(&[
        Frontend::new("v1", gw.addr("smtp"), ProxyHeader::V1),
        Frontend::new("v2", gw.addr("smtp"), ProxyHeader::V2),
    ]);
    let mut first = Client::connect_from(lb.addr("v1"), ip(CLIENT));
    first.expect("220");
    // Another client, same balancer: its own address, its own allowance.
    let mut other = Client::connect_from(lb.addr("v2"), ip(OTHER_CLIENT));
    other.expect("220");
    // The first client again, through the other frontend: over its limit.
    let mut again = Client::connect_from(lb.addr("v2"), ip(CLIENT));
    again.expect("421 4.7.0");
    let refusal = gw.wait_for_event("connection refused", TIMEOUT, |v| {
        v["reason"] == "max_connections_per_ip"
    });
    assert!(
        refusal["client"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{CLIENT}:"))),
        "{refusal}"
    );
    // Both admitted sessions work.
    for (c, from) in [
        (&mut first, "first@client.test"),
        (&mut other, "other@client.test"),
    ] {
        c.ehlo("client.test").expect("250");
        c.mail(from).expect("250");
        c.rcpt("x@example.test").expect("250");
        c.data_body(BODY).expect("250");
        c.send("QUIT").expect("221");
    }
    let msgs = sink.wait_for_messages(2, TIMEOUT);
    let mut clients: Vec<String> = msgs
        .iter()
        .map(|m| m.first_received().unwrap())
        .map(|r| {
            if r.contains(&format!("[{CLIENT}]")) {
                CLIENT.to_string()
            } else if r.contains(&format!("[{OTHER_CLIENT}]")) {
                OTHER_CLIENT.to_string()
            } else {
                r
            }
        })
        .collect();
    clients.sort();
    assert_eq!(clients, [CLIENT, OTHER_CLIENT]);
}

/// HAProxy's own health checks (`check-send-proxy`) send a v2 LOCAL
/// header: the connection is served with the balancer's own address, not
/// refused (a refused health check would take the gateway out of rotation).
#[test]

fn v2_local_header_keeps_the_connection_address() {
    let (sink, gw) = proxied_gateway(&[]);
    let mut c = Client::connect_from(gw.addr("smtp"), ip("127.0.0.1"));
    c.send_raw(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    c.expect("220");
    c.ehlo("lb-check.test").expect("250");
    c.send("QUIT").expect("221");
    gw.wait_for_event("session closed", TIMEOUT, |v| {
        v["client"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    });
    assert_eq!(sink.delivered(), 0);
}
