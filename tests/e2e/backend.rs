//! The backend misbehaves, is down, or is old: the client must get an
//! honest answer (4xx when in doubt) and nothing may be half-delivered.

use relayguard_e2e::prometheus::{metrics_addr, scrape_value};
use relayguard_e2e::{
    closed_port, wait_until, Client, Config, DataBehaviour, FakeBackend, Gateway, Sink, TIMEOUT,
};

use crate::{gateway_with_sink, BODY, HOST};

#[test]
fn unreachable_backend_gives_451_at_rcpt() {
    let gw = Gateway::start(&Config::new(&[closed_port()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250 2.1.0");
    c.rcpt("x@example.test").expect("451 4.4.1");
    // Nothing was accepted, so there is nothing to send.
    c.send("DATA").expect("554 5.5.1");
    c.send("QUIT").expect("221");
}

#[test]
fn failover_to_the_second_backend_server() {
    let sink = Sink::start(&[]);
    let gw = Gateway::start(&Config::new(&[closed_port(), sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250 2.1.5");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(msgs[0].rcpt_to(), ["x@example.test"]);
    msgs[0].assert_relayed(BODY, HOST, "ESMTP");
}

#[test]
fn backend_refusing_data_is_reported_after_the_clients_message() {
    // The gateway tells the client 354 without waiting for the backend's
    // answer to DATA; a refusal must still reach the client, as the reply
    // to its final dot, and nothing may be delivered.
    let fake = FakeBackend::start(
        &[],
        DataBehaviour::RefuseData("452 4.3.1 Insufficient system storage"),
    );
    let gw = Gateway::start(&Config::new(&[fake.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    for round in 0..2 {
        c.mail("alice@client.test").expect("250");
        c.rcpt("x@example.test").expect("250");
        c.send("DATA").expect("354");
        c.send_raw(b"Subject: refused\r\n\r\nnot stored\r\n.\r\n")
            .expect("452 4.3.1");
        assert!(fake.messages().is_empty(), "round {round}");
    }
    c.send("QUIT").expect("221");
    // The backend connection stayed in step: the second transaction went
    // over the same connection, after an RSET, and no body was ever sent.
    // (Connections without MAIL are the readiness probe's.)
    let conns = transaction_connections(&fake);
    assert_eq!(conns.len(), 1, "{conns:?}");
    let verbs: Vec<&str> = conns[0]
        .iter()
        .map(|l| l.split([' ', ':']).next().unwrap_or(""))
        .filter(|v| !matches!(*v, "EHLO" | "QUIT"))
        .collect();
    assert_eq!(
        verbs,
        ["MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"],
        "{conns:?}"
    );
    assert_eq!(fake.data_bytes(), 0);
}

#[test]
fn smtp_sink_refusing_data_is_reported_after_the_dot() {
    // The same against a real server: `smtp-sink -r data` answers DATA
    // with a 4xx. The client hears 354 first, then the refusal for its
    // message, twice over the same session, and nothing is stored.
    let sink = Sink::start(&["-r", "data"]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    for _ in 0..2 {
        c.mail("alice@client.test").expect("250");
        c.rcpt("x@example.test").expect("250");
        c.send("DATA").expect("354");
        c.send_raw(b"Subject: refused\r\n\r\nnot stored\r\n.\r\n")
            .expect("4");
    }
    c.send("QUIT").expect("221");
    // smtp-sink opens its dump file at MAIL, so a refused transaction can
    // leave an envelope-only file: its own counter of finished messages,
    // and the absence of the body, are the truth.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(sink.delivered(), 0);
    assert!(sink
        .messages()
        .iter()
        .all(|m| !m.data.contains("not stored")));
}

#[test]
fn idle_backend_connections_close_after_idle_timeout_without_traffic() {
    let (sink, gw) = gateway_with_sink(&[
        ("backend.pool.idle_timeout", "1s"),
        ("metrics.address", "127.0.0.1:0"),
    ]);
    let metrics = metrics_addr(&gw);
    let idle = || scrape_value(metrics, "relayguard_backend_pool_idle_connections", &[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");
    sink.wait_for_messages(1, TIMEOUT);
    assert!(
        wait_until(TIMEOUT, || idle() == Some(1.0)),
        "pooled after the session: {:?}",
        idle()
    );
    // No more traffic: the sweeper closes it once idle_timeout has passed.
    assert!(
        wait_until(TIMEOUT, || idle() == Some(0.0)),
        "still pooled: {:?}",
        idle()
    );
}

#[test]
fn backend_lost_during_data_gives_451_after_the_dot() {
    // The backend reads a little of the message, then hangs up.
    let fake = FakeBackend::start(&[], DataBehaviour::CloseAfter(100));
    let gw = Gateway::start(&Config::new(&[fake.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    // Big enough that the gateway is still writing when the backend is gone.
    let big: String = (0..2000)
        .map(|i| format!("line {i} of a long message\r\n"))
        .collect();
    let body = format!("Subject: lost\r\n\r\n{big}");
    c.data_body(&body).expect("451 4.4.");
    assert!(
        fake.messages().is_empty(),
        "the backend never acknowledged a message"
    );
    assert!(
        fake.data_bytes() >= 100,
        "the backend did receive part of the message data"
    );
    // The session goes on; the next transaction gets a fresh connection.
    c.send("NOOP").expect("250");
}

#[test]
fn backend_refusing_one_of_three_recipients() {
    let fake = FakeBackend::start(
        &[(
            "bob@example.test",
            "550 5.1.1 <bob@example.test>: no such user",
        )],
        DataBehaviour::Accept,
    );
    let gw = Gateway::start(&Config::new(&[fake.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("ann@example.test").expect("250");
    let refused = c.rcpt("bob@example.test").expect("550 5.1.1");
    assert!(
        refused.first().contains("no such user"),
        "the backend's reason is passed on: {refused:?}"
    );
    c.rcpt("cat@example.test").expect("250");
    c.data_body(BODY).expect("250");
    c.send("QUIT").expect("221");

    let msgs = fake.messages();
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_eq!(msgs[0].mail_from, "alice@client.test");
    assert_eq!(msgs[0].rcpt_to, ["ann@example.test", "cat@example.test"]);
    assert!(msgs[0].data.starts_with("Received: "), "{}", msgs[0].data);
    assert!(msgs[0].data.ends_with(BODY), "{}", msgs[0].data);
}

#[test]
fn helo_only_backend_without_pipelining() {
    // No ESMTP (so no PIPELINING, SIZE, 8BITMIME), no enhanced codes.
    let sink = Sink::start(&["-e", "-P", "-E", "-8"]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send("MAIL FROM:<alice@client.test> SIZE=400 BODY=8BITMIME")
        .expect("250");
    for to in ["x@example.test", "y@example.test", "z@example.test"] {
        c.rcpt(to).expect("250 2.1.5");
    }
    c.data_body(BODY).expect("250 2.0.0");
    c.send("QUIT").expect("221");

    let msgs = sink.wait_for_messages(1, TIMEOUT);
    let m = &msgs[0];
    assert_eq!(m.proto, "SMTP", "the gateway fell back to HELO");
    assert_eq!(m.helo.as_deref(), Some(HOST));
    assert_eq!(
        m.mail_args, "<alice@client.test>",
        "no ESMTP parameters to a HELO-only backend"
    );
    assert_eq!(
        m.rcpt_to(),
        ["x@example.test", "y@example.test", "z@example.test"]
    );
    m.assert_relayed(BODY, HOST, "ESMTP");
}

/// A backend that did not announce ENHANCEDSTATUSCODES (here: HELO only)
/// may still send enhanced codes, as smtp-sink does; the client must not
/// get the code twice (`250 2.1.5 2.1.5 Ok`).
#[test]
fn enhanced_codes_from_a_helo_only_backend_are_not_doubled() {
    let sink = Sink::start(&["-e", "-P", "-E", "-8"]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    let rcpt = c.rcpt("x@example.test").expect("250 2.1.5");
    assert!(
        !rcpt.first().starts_with("250 2.1.5 2.1.5"),
        "{}",
        c.transcript()
    );
    let done = c.data_body(BODY).expect("250 2.0.0");
    assert!(
        !done.first().starts_with("250 2.0.0 2.0.0"),
        "{}",
        c.transcript()
    );
}

#[test]
fn backend_refusing_mail_is_reported_at_rcpt() {
    let sink = Sink::start(&["-f", "MAIL"]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250 2.1.0");
    c.rcpt("x@example.test").expect("500 5.3.0");
    c.rcpt("y@example.test").expect("500 5.3.0");
    c.send("DATA").expect("554 5.5.1");
    c.send("QUIT").expect("221");
    assert_eq!(sink.delivered(), 0);
}

#[test]
fn backend_verdict_on_the_message_is_passed_on() {
    // smtp-sink answers the final dot with 450.
    let sink = Sink::start(&["-r", "."]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("450 4.3.0");
    c.send("NOOP").expect("250");
}

#[test]
fn backend_hanging_up_after_the_dot_gives_451() {
    // The message may have reached the backend; without its reply the
    // client must retry (a duplicate beats a loss).
    let sink = Sink::start(&["-q", "."]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("451 4.4.2");
    c.send("NOOP").expect("250");
}

#[test]
fn reused_backend_connection_does_not_leak_envelopes() {
    let sink = Sink::start(&[]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    // Two transactions in one session, one in another session: the pooled
    // backend connection carries all three.
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("one@client.test").expect("250");
    c.rcpt("a@example.test").expect("250");
    c.rcpt("b@example.test").expect("250");
    c.data_body("Subject: one\r\n\r\n1\r\n").expect("250");
    c.mail("two@client.test").expect("250");
    c.rcpt("c@example.test").expect("250");
    // An abandoned transaction must not leak its recipient either.
    c.send("RSET").expect("250");
    c.mail("abandoned@client.test").expect("250");
    c.rcpt("leak@example.test").expect("250");
    c.send("RSET").expect("250");
    c.mail("two@client.test").expect("250");
    c.rcpt("c@example.test").expect("250");
    c.data_body("Subject: two\r\n\r\n2\r\n").expect("250");
    c.send("QUIT").expect("221");
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("three@client.test").expect("250");
    c.rcpt("d@example.test").expect("250");
    c.data_body("Subject: three\r\n\r\n3\r\n").expect("250");
    c.send("QUIT").expect("221");

    let msgs = sink.wait_for_messages(3, TIMEOUT);
    let mut envelopes: Vec<(String, Vec<&str>)> = msgs
        .iter()
        .map(|m| (m.mail_from().to_string(), m.rcpt_to()))
        .collect();
    envelopes.sort();
    assert_eq!(
        envelopes,
        [
            (
                "one@client.test".to_string(),
                vec!["a@example.test", "b@example.test"]
            ),
            ("three@client.test".to_string(), vec!["d@example.test"]),
            ("two@client.test".to_string(), vec!["c@example.test"]),
        ]
    );
}

#[test]
fn eight_bit_mime_is_forwarded_to_a_backend_that_offers_it() {
    let sink = Sink::start(&[]);
    let gw = Gateway::start(&Config::new(&[sink.addr()]).yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send("MAIL FROM:<alice@client.test> BODY=8BITMIME")
        .expect("250");
    c.rcpt("x@example.test").expect("250");
    let body = "Subject: 8bit\r\n\r\ncaf\u{e9} cr\u{e8}me br\u{fb}l\u{e9}e\r\n";
    c.data_body(body).expect("250");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(msgs[0].mail_args, "<alice@client.test> BODY=8BITMIME");
    msgs[0].assert_relayed(body, HOST, "ESMTP");
}

#[test]
fn connections_are_served_by_every_shard_and_share_one_warm_backend_connection() {
    // `threads: 4`: four single-threaded event loops accept from the same
    // socket (see gateway/src/shards.rs). Whichever shard a session lands
    // on, the warm backend connection left by the previous session is
    // used (moved between shards), never a second one.
    let fake = FakeBackend::start(&[], DataBehaviour::Accept);
    let gw = Gateway::start(&Config::new(&[fake.addr()]).set("threads", "4").yaml());
    let shard_threads = std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("relayguard-shar"))
        .count();
    assert_eq!(shard_threads, 4);
    for i in 0..24 {
        let closed = gw.log_events("session closed").len();
        let mut c = Client::greeted(gw.addr("smtp"));
        c.mail(&format!("s{i}@client.test")).expect("250");
        c.rcpt("x@example.test").expect("250");
        c.data_body(&format!("Subject: {i}\r\n\r\n{i}\r\n"))
            .expect("250");
        c.send("QUIT").expect("221");
        // The backend connection is back in the pool once the session is.
        gw.wait_for_event("session closed", TIMEOUT, |_| {
            gw.log_events("session closed").len() > closed
        });
    }
    assert_eq!(fake.messages().len(), 24);
    let conns = transaction_connections(&fake);
    assert_eq!(conns.len(), 1, "one backend connection for all: {conns:?}");
    let mails = conns[0].iter().filter(|l| l.starts_with("MAIL")).count();
    assert_eq!(mails, 24);
    // And in parallel: 30 clients at once, every message delivered once.
    let addr = gw.addr("smtp");
    let clients: Vec<_> = (0..30)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::greeted(addr);
                c.mail(&format!("p{i}@client.test")).expect("250");
                c.rcpt("x@example.test").expect("250");
                c.data_body(&format!("Subject: p{i}\r\n\r\np{i}\r\n"))
                    .expect("250");
                c.send("QUIT").expect("221");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let msgs = fake.messages();
    assert_eq!(msgs.len(), 54);
    let mut subjects: Vec<String> = msgs
        .iter()
        .filter_map(|m| {
            m.data
                .lines()
                .find(|l| l.starts_with("Subject: p"))
                .map(str::to_string)
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 30, "each parallel message once");
}

/// The backend connections that carried a transaction (the readiness
/// probe's carry none), each as the commands the fake backend saw.
fn transaction_connections(fake: &FakeBackend) -> Vec<Vec<String>> {
    fake.connections()
        .into_iter()
        .filter(|c| c.iter().any(|l| l.starts_with("MAIL")))
        .collect()
}
