//! Protocol edge cases over a raw connection: limits, malformed input,
//! smuggling attempts, command order, pipelining.

use std::time::Duration;

use relayguard_e2e::{Client, TIMEOUT};

use crate::{barrier, gateway_with_sink, BODY, HOST};

#[test]
fn size_parameter_over_the_limit_is_refused_at_mail() {
    let (sink, gw) = gateway_with_sink(&[("limits.max_message_size", "2048")]);
    let mut c = Client::connect(gw.addr("smtp"));
    c.expect("220");
    let ehlo = c.ehlo("client.test").expect("250");
    assert!(ehlo.has_line("SIZE 2048"), "{ehlo:?}");
    c.send("MAIL FROM:<alice@client.test> SIZE=999999")
        .expect("552 5.3.4");
    // No transaction was opened: a new MAIL is fine.
    c.send("MAIL FROM:<alice@client.test> SIZE=1000")
        .expect("250 2.1.0");
    c.send("QUIT").expect("221");
    assert_eq!(sink.delivered(), 0);
}

#[test]
fn body_over_the_limit_is_refused_after_the_dot() {
    let (sink, gw) = gateway_with_sink(&[("limits.max_message_size", "2048")]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    let big: String = (0..100)
        .map(|i| format!("line {i:03} padding padding padding\r\n"))
        .collect();
    c.data_body(&format!("Subject: big\r\n\r\n{big}"))
        .expect("552 5.3.4");
    c.send("QUIT").expect("221");
    barrier(&gw, &sink, 1);
}

#[test]
fn overlong_command_line_is_refused_and_the_session_goes_on() {
    let (_sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    let long = format!("NOOP {}", "x".repeat(10_000 - 7));
    c.send(&long).expect("500 5.5.2");
    c.send("NOOP").expect("250");
    c.send("RSET").expect("250");
}

#[test]
fn overlong_line_in_data_refuses_the_message() {
    let (sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    let body = format!(
        "Subject: long line\r\n\r\n{}\r\nafter\r\n",
        "y".repeat(10_000)
    );
    c.data_body(&body).expect("550 5.6.0");
    c.send("NOOP").expect("250");
    c.send("QUIT").expect("221");
    barrier(&gw, &sink, 1);
}

#[test]
fn nul_byte_in_a_command_is_refused() {
    let (_sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send_raw(b"NO\0OP\r\n").expect("500 5.5.2");
    c.send_raw(b"MAIL FROM:<a\0b@client.test>\r\n")
        .expect("500 5.5.2");
    c.send("NOOP").expect("250");
}

#[test]
fn bare_lf_command_is_refused() {
    let (_sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send_raw(b"NOOP\n").expect("500 5.5.2");
    c.send("NOOP").expect("250");
}

/// SMTP smuggling (CVE-2023-51764 class): an end-of-data with bare LFs
/// that a lenient backend would take as the real one, followed by a
/// second, forged transaction inside the message.
#[test]
fn smuggled_end_of_data_is_refused_and_nothing_is_delivered() {
    let (sink, gw) = gateway_with_sink(&[]);
    let smuggled = "MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n\
                    Subject: smuggled\r\n\r\nforged\r\n";
    for fake_end in ["\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r\n"] {
        let mut c = Client::greeted(gw.addr("smtp"));
        c.mail("alice@client.test").expect("250");
        c.rcpt("x@example.test").expect("250");
        c.send("DATA").expect("354");
        let data = format!("Subject: innocent\r\n\r\nhello{fake_end}{smuggled}.\r\n");
        c.send_raw(data.as_bytes()).expect("550 5.6.0");
        // Had the gateway ended the data early, the smuggled commands
        // would be answered here, and NOOP would not be the next reply.
        c.send("NOOP").expect("250");
        c.send("QUIT").expect("221");
    }
    let msgs = barrier(&gw, &sink, 1);
    assert!(
        msgs.iter().all(|m| !m.data.contains("smuggled")),
        "{msgs:#?}"
    );
}

#[test]
fn data_before_rcpt_and_before_mail_is_out_of_order() {
    let (_sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send("DATA").expect("503 5.5.1");
    c.mail("alice@client.test").expect("250");
    c.send("DATA").expect("503 5.5.1");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("250");
}

#[test]
fn mail_before_ehlo_is_out_of_order() {
    let (_sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::connect(gw.addr("smtp"));
    c.expect("220");
    c.mail("alice@client.test").expect("503 5.5.1");
    c.rcpt("x@example.test").expect("503 5.5.1");
}

#[test]
fn a_thousand_pipelined_commands_get_a_thousand_replies_in_order() {
    let (sink, gw) = gateway_with_sink(&[
        ("limits.max_junk_commands", "10000"),
        ("limits.max_errors", "10000"),
    ]);
    let mut c = Client::connect(gw.addr("smtp"));
    c.expect("220");
    let ehlo = c.ehlo("client.test").expect("250");
    assert!(ehlo.has_line("PIPELINING"), "{ehlo:?}");

    // 250 rounds of: MAIL, local RCPT (asks the backend), foreign RCPT
    // (refused by policy), RSET.
    let round = [
        ("MAIL FROM:<alice@client.test>", "250 2.1.0"),
        ("RCPT TO:<x@example.test>", "250 2.1.5"),
        ("RCPT TO:<x@ext.test>", "550 5.7.1"),
        ("RSET", "250 2.0.0"),
    ];
    let script: Vec<(&str, &str)> = round.iter().copied().cycle().take(1000).collect();
    let mut burst = String::new();
    for (cmd, _) in &script {
        burst.push_str(cmd);
        burst.push_str("\r\n");
    }
    c.send_raw(burst.as_bytes());
    for (i, (cmd, want)) in script.iter().enumerate() {
        let r = c.read_reply();
        assert!(
            r.first().starts_with(want),
            "reply {i} to {cmd}: expected {want}, got {:?}",
            r.lines
        );
    }
    c.send("NOOP").expect("250");
    c.send("QUIT").expect("221");
    assert!(c.is_closed());
    assert_eq!(sink.delivered(), 0);
}

#[test]
fn bdat_is_refused_and_its_chunk_is_not_run_as_commands() {
    let (_sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    // The 12 chunk bytes look like two QUITs.
    c.send_raw(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\n")
        .expect("502 5.5.1");
    // Had the chunk been read as commands, this would be answered 221.
    c.send("NOOP").expect("250");
    c.send("RSET").expect("250");
}

#[test]
fn vrfy_never_reveals_users() {
    let (_sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send("VRFY postmaster").expect("252 2.5.0");
    c.send("EXPN staff").expect("252 2.5.0");

    let (_sink2, gw2) = gateway_with_sink(&[("smtp.vrfy", "not_implemented")]);
    let mut c = Client::greeted(gw2.addr("smtp"));
    c.send("VRFY postmaster").expect("502 5.5.1");
}

#[test]
fn client_gone_during_data_delivers_nothing() {
    let (sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.send("DATA").expect("354");
    c.send_raw(b"Subject: half\r\n\r\nthe first half of a message\r\n");
    drop(c);
    gw.wait_for_log("client lost during DATA", TIMEOUT);
    let msgs = barrier(&gw, &sink, 1);
    assert!(
        msgs.iter().all(|m| !m.data.contains("first half")),
        "{msgs:#?}"
    );
}

#[test]
fn early_talker_is_refused() {
    let (_sink, gw) = gateway_with_sink(&[("smtp.greeting_delay", "500ms")]);
    let mut c = Client::connect(gw.addr("smtp"));
    c.send("EHLO client.test");
    c.expect("554 5.5.1");
    assert!(c.is_closed());

    // A patient client is greeted after the delay.
    let mut c = Client::connect(gw.addr("smtp"));
    let started = std::time::Instant::now();
    c.expect(&format!("220 {HOST}"));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "greeted after {:?}",
        started.elapsed()
    );
    c.ehlo("client.test").expect("250");
}

#[test]
fn recipients_over_the_limit_get_452() {
    let (sink, gw) = gateway_with_sink(&[("limits.max_recipients", "2")]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.mail("alice@client.test").expect("250");
    c.rcpt("a@example.test").expect("250");
    c.rcpt("b@example.test").expect("250");
    c.rcpt("c@example.test").expect("452 4.5.3");
    c.data_body(BODY).expect("250");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(msgs[0].rcpt_to(), ["a@example.test", "b@example.test"]);
}

#[test]
fn too_many_errors_close_the_session() {
    let (_sink, gw) = gateway_with_sink(&[("limits.max_errors", "3")]);
    let mut c = Client::greeted(gw.addr("smtp"));
    c.send("FOO").expect("500 5.5.1");
    c.send("BAR").expect("500 5.5.1");
    c.send("BAZ").expect("421 4.7.0");
    assert!(c.is_closed());
}

#[test]
fn too_many_commands_without_a_transaction_close_the_session() {
    let (_sink, gw) = gateway_with_sink(&[("limits.max_junk_commands", "3")]);
    let mut c = Client::greeted(gw.addr("smtp"));
    for _ in 0..3 {
        c.send("NOOP").expect("250");
    }
    c.send("NOOP").expect("421 4.7.0");
    assert!(c.is_closed());
}

#[test]
fn helo_client_gets_smtp_in_received() {
    let (sink, gw) = gateway_with_sink(&[]);
    let mut c = Client::connect(gw.addr("smtp"));
    c.expect("220");
    c.send("HELO old-client.test").expect("250");
    c.mail("alice@client.test").expect("250");
    c.rcpt("x@example.test").expect("250");
    c.data_body(BODY).expect("250");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    msgs[0].assert_relayed(BODY, HOST, "SMTP");
    assert!(msgs[0]
        .first_received()
        .unwrap()
        .starts_with("from old-client.test "));
}
