//! The relay policy end to end: who may relay, as whom, from where, to
//! where, how much — through the real binary, with real clients (curl,
//! nmap, the raw client with policy's NTLM client), asserting on what
//! smtp-sink received.
//!
//! Most tests run the demo's policy ([`DEMO_POLICY`]) with the demo's
//! accounts: `DEMO\alice` (group `relay-senders`) may relay anywhere as
//! `alice@example.test`; `DEMO\bob` authenticates but may only send to
//! `example.test`, as `bob@example.test`. `DEMO\carol` (group `helpdesk`)
//! is added for the shared-mailbox rules. The policy lives in its own file
//! (`policy_file`), which is what hot reload watches.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use policy::relay::DEMO_POLICY;
use relayguard_e2e::ntlm::{self, ClientOptions};
use relayguard_e2e::prometheus::{metrics_addr, scrape_value};
use relayguard_e2e::{
    curl, nmap, relayguard_bin, test_cert, write_file, Account, Client, Config, Gateway,
    IdentitySource, SambaDc, Sink, SinkMessage, ALICE, BOB, TIMEOUT,
};

use crate::HOST;

/// In group `helpdesk`, which may also send as the shared mailbox
/// `helpdesk@example.test` where a policy says so.
const CAROL: Account = Account {
    domain: "DEMO",
    user: "carol",
    password: "carol-pass",
};

/// The JSON log messages of a policy reload.
const RELOADED: &str = "policy reloaded";
const RELOAD_REFUSED: &str = "policy reload refused; the running policy stays in force";

/// The demo's users file (alice in `relay-senders` with
/// `alice@example.test`, bob in `staff` with `bob@example.test`) and carol.
fn users_yaml() -> String {
    let hash = nt_hash_hex(CAROL.password);
    format!(
        "{}  - user: carol\n    domain: DEMO\n    nt_hash: {hash}\n    groups: [helpdesk]\n    mail: [carol@example.test]\n",
        relayguard::demo::DEMO_USERS
    )
}

/// The NT hash of `password` as the users file takes it.
fn nt_hash_hex(password: &str) -> String {
    policy::identity::nt_hash(password)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `policy_file: PATH` instead of the builder's inline `policy:` section
/// (which [`Config::new`] and [`Config::auth`] fill).
fn with_policy_file(c: Config, path: &Path) -> Config {
    c.set("policy", "~")
        .set("policy_file", &format!("{:?}", path.display().to_string()))
}

/// A gateway in front of smtp-sink: listener `smtp` offers STARTTLS and
/// takes AUTH NTLM before it (PLAIN and LOGIN only after), the demo's
/// accounts plus carol, and `policy` in `policy.yaml`.
struct Fixture {
    sink: Sink,
    gw: Gateway,
}

fn start(policy: &str) -> Fixture {
    start_with(policy, |c| c)
}

fn start_with(policy: &str, tweak: impl FnOnce(Config) -> Config) -> Fixture {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = test_cert(dir.path());
    let users = dir.path().join("users.yaml");
    write_file(&users, users_yaml());
    let policy_path = dir.path().join("policy.yaml");
    write_file(&policy_path, policy);
    let config = base_config(sink.addr(), &cert, &key).auth(&users);
    let config = with_policy_file(tweak(config), &policy_path);
    let gw = Gateway::start_in(dir, &config.yaml());
    Fixture { sink, gw }
}

fn base_config(backend: std::net::SocketAddr, cert: &Path, key: &Path) -> Config {
    Config::new(&[backend]).tls(cert, key).listener(
        "smtp",
        &[("tls", "starttls"), ("require_tls_for_auth", "false")],
    )
}

impl Fixture {
    fn policy_path(&self) -> PathBuf {
        self.gw.dir().join("policy.yaml")
    }

    /// Greeted on `smtp`, no TLS, not authenticated.
    fn client(&self) -> Client {
        Client::greeted(self.gw.addr("smtp"))
    }

    /// Greeted on `smtp` after STARTTLS and a second EHLO.
    fn tls_client(&self) -> Client {
        let mut c = self.client();
        c.starttls("localhost");
        c.ehlo("client.test").expect("250");
        c
    }

    /// Authenticated with NTLM (policy's client, NTLMv2), no TLS.
    fn ntlm(&self, a: &Account) -> Client {
        let mut c = self.client();
        auth_ntlm(&mut c, a);
        c
    }

    /// Authenticated with PLAIN after STARTTLS.
    fn plain(&self, a: &Account) -> Client {
        let mut c = self.tls_client();
        auth_plain(&mut c, a);
        c
    }

    /// Authenticated with LOGIN after STARTTLS.
    fn login(&self, a: &Account) -> Client {
        let mut c = self.tls_client();
        c.send("AUTH LOGIN").expect("334");
        c.send(&ntlm::b64(login_name(a).as_bytes())).expect("334");
        c.send(&ntlm::b64(a.password.as_bytes()))
            .expect("235 2.7.0");
        c
    }

    /// Waits for exactly `n` messages at the sink.
    fn delivered(&self, n: usize) -> Vec<SinkMessage> {
        self.sink.wait_for_messages(n, TIMEOUT)
    }
}

fn auth_ntlm(c: &mut Client, a: &Account) {
    ntlm::send_auth(c, &ntlm::creds(a), ClientOptions::default());
    c.expect("235 2.7.0");
}

fn auth_plain(c: &mut Client, a: &Account) {
    let response = format!("\0{}\0{}", login_name(a), a.password);
    c.send(&format!("AUTH PLAIN {}", ntlm::b64(response.as_bytes())))
        .expect("235 2.7.0");
}

/// `DOMAIN\user`, as PLAIN and LOGIN take it.
fn login_name(a: &Account) -> String {
    format!("{}\\{}", a.domain, a.user)
}

/// The refusal an authenticated principal without a relay rule gets: it
/// names the principal (the MS02-011 case, spelled out).
fn not_permitted(who: &str, domain: &str) -> String {
    format!(
        "550 5.7.1 Relaying denied: {who} is authenticated but not permitted to relay to {domain}"
    )
}

/// One message from `from` to `rcpts` (each must get 250), delivered
/// with 250 after the dot.
fn send_message(c: &mut Client, from: &str, rcpts: &[&str], subject: &str) {
    c.mail(from).expect("250 2.1.0");
    for r in rcpts {
        c.rcpt(r).expect("250");
    }
    c.data_body(&format!("Subject: {subject}\r\n\r\n{subject}\r\n"))
        .expect("250");
}

/// The message whose Subject is `subject`.
fn by_subject<'a>(msgs: &'a [SinkMessage], subject: &str) -> &'a SinkMessage {
    let header = format!("\nSubject: {subject}\n");
    msgs.iter()
        .find(|m| m.data.contains(&header))
        .unwrap_or_else(|| panic!("no message with Subject {subject:?}: {msgs:#?}"))
}

/// Every recipient the sink got, over all messages.
fn all_rcpts(msgs: &[SinkMessage]) -> Vec<String> {
    msgs.iter()
        .flat_map(|m| m.rcpt_to())
        .map(str::to_string)
        .collect()
}

/// Sends one ordinary inbound message and waits until the sink holds
/// exactly `total` messages, this one among them: anything refused before
/// it that had reached the backend would show up as one too many.
/// (Unlike `crate::barrier`, it does not rely on file times to find the
/// newest message: smtp-sink's dump files often share one.)
fn barrier(f: &Fixture, total: usize) -> Vec<SinkMessage> {
    let mut c = f.client();
    send_message(
        &mut c,
        "barrier@client.test",
        &["barrier@example.test"],
        "barrier",
    );
    c.send("QUIT").expect("221");
    let msgs = f.delivered(total);
    assert_eq!(
        by_subject(&msgs, "barrier").mail_from(),
        "barrier@client.test"
    );
    msgs
}

fn output_text(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the relayguard binary with `args` (60 s limit).
fn relayguard(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(relayguard_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run relayguard")
}

fn count_events(gw: &Gateway, message: &str) -> usize {
    gw.log_events(message).len()
}

/// Waits until there are more than `before` log events with `message`;
/// returns the newest.
fn wait_for_more_events(
    gw: &Gateway,
    message: &str,
    before: usize,
    timeout: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let events = gw.log_events(message);
        if events.len() > before {
            return events.last().cloned().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no new {message:?} log event within {timeout:?}; logs:\n{}",
            gw.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- curl with NTLM

/// curl's `AUTH <mechanism>` (NTLM over plain SMTP, anything else after
/// STARTTLS) sending one message; `--mail-rcpt-allowfails` so that a
/// refused recipient does not stop the others.
fn curl_send(f: &Fixture, mechanism: &str, login: &str, from: &str, rcpts: &[&str]) -> Output {
    let subject = format!("curl-{}", login.replace(['\\', ':'], "-"));
    let body = f.gw.dir().join(format!("{subject}.eml"));
    write_file(&body, format!("Subject: {subject}\r\n\r\nHello.\r\n"));
    let mut args: Vec<String> = vec!["-v".into(), "--max-time".into(), "30".into()];
    if mechanism != "NTLM" {
        args.extend(["--ssl-reqd".into(), "-k".into()]);
    }
    args.extend([
        format!("smtp://{}/client.test", f.gw.addr("smtp")),
        "--login-options".into(),
        format!("AUTH={mechanism}"),
        "-u".into(),
        login.into(),
        "--mail-from".into(),
        from.into(),
        "--mail-rcpt-allowfails".into(),
    ]);
    for r in rcpts {
        args.extend(["--mail-rcpt".into(), (*r).into()]);
    }
    args.extend(["--upload-file".into(), body.display().to_string()]);
    curl(&args)
}

#[test]
fn curl_ntlm_as_a_permitted_user_relays_to_an_external_domain() {
    let f = start(DEMO_POLICY);
    let out = curl_send(
        &f,
        "NTLM",
        "DEMO\\alice:alice-pass",
        "alice@example.test",
        &["friend@ext.test", "x@example.test"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let msgs = f.delivered(1);
    assert_eq!(msgs[0].mail_from(), "alice@example.test");
    assert_eq!(msgs[0].rcpt_to(), ["friend@ext.test", "x@example.test"]);
    let received = msgs[0].first_received().unwrap();
    assert!(
        received.contains("(authenticated as DEMO\\\\alice)")
            && received.contains(&format!("by {HOST} (RelayGuard) with ESMTPA id ")),
        "{received}"
    );
}

#[test]
fn curl_ntlm_authenticated_but_not_permitted_gets_550_for_the_external_recipient_only() {
    let f = start(DEMO_POLICY);
    let out = curl_send(
        &f,
        "NTLM",
        "DEMO\\bob:bob-pass",
        "bob@example.test",
        &["victim@ext.test", "x@example.test"],
    );
    let text = output_text(&out);
    assert!(out.status.success(), "one recipient was accepted: {text}");
    assert!(text.contains("< 235 2.7.0"), "AUTH succeeded: {text}");
    assert!(
        text.contains(&format!("< {}", not_permitted("DEMO\\bob", "ext.test"))),
        "the refusal names the user: {text}"
    );
    let msgs = f.delivered(1);
    assert_eq!(msgs[0].rcpt_to(), ["x@example.test"], "{msgs:#?}");
    // Logged with the rule (none) and the reason, for the operator.
    f.gw.wait_for_event("policy refused", TIMEOUT, |v| {
        v["user"] == "DEMO\\bob"
            && v["to"] == "victim@ext.test"
            && v["reason"] == "relay_not_permitted"
            && v["stage"] == "rcpt"
    });
}

#[test]
fn unauthenticated_relay_is_refused() {
    let f = start(DEMO_POLICY);
    let mut c = f.client();
    c.mail("someone@client.test").expect("250 2.1.0");
    c.rcpt("victim@ext.test")
        .expect("550 5.7.1 Relaying denied: ext.test is not a local domain; authenticate to relay");
    c.rcpt("alice@example.test").expect("250");
    c.data_body("Subject: inbound\r\n\r\ninbound\r\n")
        .expect("250");
    // curl without AUTH: the only recipient is refused, so nothing is sent.
    let body = f.gw.dir().join("anon.eml");
    write_file(&body, "Subject: anon\r\n\r\nHello.\r\n");
    let out = curl(&[
        "-v",
        "--max-time",
        "30",
        &format!("smtp://{}/client.test", f.gw.addr("smtp")),
        "--mail-from",
        "someone@client.test",
        "--mail-rcpt",
        "victim@ext.test",
        "--upload-file",
        &body.display().to_string(),
    ]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("< 550 5.7.1 Relaying denied"), "{text}");
    let msgs = barrier(&f, 2);
    assert_eq!(
        all_rcpts(&msgs),
        ["alice@example.test", "barrier@example.test"]
    );
}

/// Opens an authenticated session: [`Fixture::ntlm`], `plain`, `login`.
type Opener = fn(&Fixture, &Account) -> Client;

#[test]
fn bob_cannot_relay_with_any_mechanism_or_session() {
    let f = start(DEMO_POLICY);
    let refused = not_permitted("DEMO\\bob", "ext.test");
    let sessions: [(&str, Opener); 3] = [
        ("ntlm", Fixture::ntlm),
        ("plain", Fixture::plain),
        ("login", Fixture::login),
    ];
    for (mech, open) in sessions {
        let mut c = open(&f, &BOB);
        c.mail("bob@example.test").expect("250 2.1.0");
        c.rcpt("victim@ext.test").expect(&refused);
        // A new transaction, EHLO again, another AUTH: still bob, still no.
        c.send("RSET").expect("250");
        c.mail("bob@example.test").expect("250 2.1.0");
        c.rcpt("victim@ext.test").expect(&refused);
        c.ehlo("client.test").expect("250");
        c.send("AUTH NTLM")
            .expect("503 5.5.1 Already authenticated");
        c.mail("bob@example.test").expect("250 2.1.0");
        c.rcpt("victim@ext.test").expect(&refused);
        c.rcpt("x@example.test").expect("250");
        c.data_body(&format!("Subject: bob-{mech}\r\n\r\nlocal\r\n"))
            .expect("250");
        c.send("QUIT").expect("221");
    }
    // Alice relaying in another session at the same time lends bob nothing.
    let mut alice = f.ntlm(&ALICE);
    let mut bob = f.ntlm(&BOB);
    alice.mail("alice@example.test").expect("250 2.1.0");
    bob.mail("bob@example.test").expect("250 2.1.0");
    alice.rcpt("friend@ext.test").expect("250");
    bob.rcpt("victim@ext.test").expect(&refused);
    alice
        .data_body("Subject: alice-parallel\r\n\r\nrelayed\r\n")
        .expect("250");
    bob.rcpt("victim@ext.test").expect(&refused);
    bob.send("QUIT").expect("221");
    // Nor does an AUTH that failed for alice on bob's session.
    let mut c = f.client();
    let wrong = ntlm::creds_for("DEMO", "alice", "wrong-pass");
    ntlm::send_auth(&mut c, &wrong, ClientOptions::default());
    c.expect("535 5.7.3");
    auth_ntlm(&mut c, &BOB);
    c.mail("bob@example.test").expect("250 2.1.0");
    c.rcpt("victim@ext.test").expect(&refused);
    c.send("QUIT").expect("221");
    // curl with PLAIN over STARTTLS.
    let out = curl_send(
        &f,
        "PLAIN",
        "DEMO\\bob:bob-pass",
        "bob@example.test",
        &["victim@ext.test"],
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("< {refused}")), "{text}");

    let msgs = barrier(&f, 5);
    assert_eq!(
        by_subject(&msgs, "alice-parallel").rcpt_to(),
        ["friend@ext.test"]
    );
    for mech in ["ntlm", "plain", "login"] {
        let m = by_subject(&msgs, &format!("bob-{mech}"));
        assert_eq!(m.rcpt_to(), ["x@example.test"], "{m:#?}");
    }
    assert_eq!(
        all_rcpts(&msgs)
            .iter()
            .filter(|r| r.ends_with("@ext.test"))
            .count(),
        1,
        "only alice's message left for ext.test: {msgs:#?}"
    );
}

// ---------------------------------------------------------------- sender binding

#[test]
fn sender_binding_to_own_addresses_and_the_null_sender() {
    let f = start(DEMO_POLICY);
    let mut c = f.ntlm(&ALICE);
    c.mail("bob@example.test").expect(
        "553 5.7.1 Sender address rejected: <bob@example.test> is not owned by DEMO\\alice",
    );
    c.mail("alice@client.test").expect("553 5.7.1");
    c.mail("")
        .expect("553 5.7.1 Null sender not permitted for DEMO\\alice");
    // Case does not change whose address it is.
    c.mail("Alice@EXAMPLE.test").expect("250 2.1.0");
    c.rcpt("friend@ext.test").expect("250");
    c.data_body("Subject: own-address\r\n\r\nok\r\n")
        .expect("250");
    let mut c = f.ntlm(&BOB);
    c.mail("alice@example.test").expect(
        "553 5.7.1 Sender address rejected: <alice@example.test> is not owned by DEMO\\bob",
    );
    c.mail("bob@example.test").expect("250 2.1.0");
    c.rcpt("x@example.test").expect("250");
    c.data_body("Subject: bob-own\r\n\r\nok\r\n").expect("250");
    // Bounces (MAIL FROM:<>) come from other servers, unauthenticated:
    // inbound mail is not ours to bind.
    let mut c = f.client();
    c.mail("").expect("250 2.1.0");
    c.rcpt("alice@example.test").expect("250");
    c.rcpt("victim@ext.test").expect("550 5.7.1");
    c.data_body("Subject: bounce\r\n\r\nbounce\r\n")
        .expect("250");

    let msgs = f.delivered(3);
    assert_eq!(
        by_subject(&msgs, "own-address").mail_from(),
        "Alice@EXAMPLE.test"
    );
    assert_eq!(by_subject(&msgs, "bob-own").mail_from(), "bob@example.test");
    let bounce = by_subject(&msgs, "bounce");
    assert_eq!(bounce.mail_from(), "");
    assert_eq!(bounce.rcpt_to(), ["alice@example.test"]);
}

#[test]
fn null_sender_is_allowed_where_a_rule_says_so() {
    let f = start(
        "local_domains: [example.test]\n\
         rules:\n\
         \x20 - name: notifications\n\
         \x20   users: ['DEMO\\alice']\n\
         \x20   recipient_domains: [ext.test]\n\
         \x20   allow_null_sender: true\n",
    );
    let mut c = f.ntlm(&ALICE);
    c.mail("").expect("250 2.1.0");
    c.rcpt("x@ext.test").expect("250");
    // The rule is for ext.test only.
    c.rcpt("x@other.test")
        .expect(&not_permitted("DEMO\\alice", "other.test"));
    c.data_body("Subject: dsn\r\n\r\ndsn\r\n").expect("250");
    let mut c = f.ntlm(&BOB);
    c.mail("")
        .expect("553 5.7.1 Null sender not permitted for DEMO\\bob");
    let msgs = f.delivered(1);
    assert_eq!(msgs[0].mail_from(), "");
    assert_eq!(msgs[0].rcpt_to(), ["x@ext.test"]);
}

#[test]
fn sender_binding_with_a_user_template() {
    // No `directory`: every principal may send as {user}@example.test.
    let f = start(
        "local_domains: [example.test]\n\
         sender_binding:\n\
         \x20 senders: [\"{user}@example.test\"]\n\
         rules:\n\
         \x20 - name: relay-senders\n\
         \x20   groups: [relay-senders]\n\
         \x20   recipient_domains: [\"*\"]\n",
    );
    let mut c = f.ntlm(&CAROL);
    c.mail("alice@example.test").expect(
        "553 5.7.1 Sender address rejected: <alice@example.test> is not owned by DEMO\\carol",
    );
    c.mail("carol@other.test").expect("553 5.7.1");
    c.mail("carol@example.test").expect("250 2.1.0");
    c.rcpt("x@example.test").expect("250");
    c.rcpt("x@ext.test")
        .expect(&not_permitted("DEMO\\carol", "ext.test"));
    c.data_body("Subject: carol-template\r\n\r\nok\r\n")
        .expect("250");
    // The relay rule inherits the binding.
    let mut c = f.ntlm(&ALICE);
    c.mail("carol@example.test").expect("553 5.7.1");
    send_message(
        &mut c,
        "alice@example.test",
        &["x@ext.test"],
        "alice-template",
    );
    let msgs = f.delivered(2);
    assert_eq!(
        by_subject(&msgs, "carol-template").rcpt_to(),
        ["x@example.test"]
    );
    assert_eq!(
        by_subject(&msgs, "alice-template").rcpt_to(),
        ["x@ext.test"]
    );
}

/// The helpdesk may send as the shared mailbox, anywhere; nobody else may
/// use it.
const HELPDESK_POLICY: &str = "local_domains: [example.test]
sender_binding:
  senders: [directory]
rules:
  - name: helpdesk-shared
    groups: [helpdesk]
    recipient_domains: [\"*\"]
    senders: [directory, helpdesk@example.test]
  - name: relay-senders
    groups: [relay-senders]
    recipient_domains: [\"*\"]
";

#[test]
fn sender_binding_with_an_explicit_list_for_a_shared_mailbox() {
    let f = start(HELPDESK_POLICY);
    let mut c = f.ntlm(&CAROL);
    c.mail("other@example.test").expect("553 5.7.1");
    send_message(
        &mut c,
        "helpdesk@example.test",
        &["customer@ext.test"],
        "helpdesk-shared",
    );
    send_message(
        &mut c,
        "carol@example.test",
        &["customer@ext.test"],
        "helpdesk-own",
    );
    let mut c = f.ntlm(&ALICE);
    c.mail("helpdesk@example.test").expect(
        "553 5.7.1 Sender address rejected: <helpdesk@example.test> is not owned by DEMO\\alice",
    );
    let mut c = f.ntlm(&BOB);
    c.mail("helpdesk@example.test").expect("553 5.7.1");
    let msgs = f.delivered(2);
    assert_eq!(
        by_subject(&msgs, "helpdesk-shared").mail_from(),
        "helpdesk@example.test"
    );
    assert_eq!(
        by_subject(&msgs, "helpdesk-own").mail_from(),
        "carol@example.test"
    );
}

// ---------------------------------------------------------------- relay tricks

/// Recipient paths that try to make a local-looking address relay, or
/// that cannot be parsed, and the reply an unauthenticated client gets
/// (bob gets the same, his 550s naming him).
const TRICKS: &[(&str, &str)] = &[
    // Percent hack, any case.
    ("user%ext.test@example.test", "550 5.7.1 Relaying denied"),
    ("USER%EXT.TEST@EXAMPLE.TEST", "550 5.7.1 Relaying denied"),
    ("user%ext.test@[127.0.0.1]", "550 5.7.1 Relaying denied"),
    // Bang paths.
    ("ext.test!user@example.test", "550 5.7.1 Relaying denied"),
    (
        "a.test!ext.test!user@example.test",
        "550 5.7.1 Relaying denied",
    ),
    // Source route: decided on the final address.
    ("@example.test:user@ext.test", "550 5.7.1 Relaying denied"),
    (
        "@example.test,@example.test:user@ext.test",
        "550 5.7.1 Relaying denied",
    ),
    // Quoted local parts that hold an address.
    (
        "\"user@ext.test\"@example.test",
        "550 5.7.1 Relaying denied",
    ),
    (
        "\"user%ext.test\"@example.test",
        "550 5.7.1 Relaying denied",
    ),
    // IP literals, even our own address.
    ("user@[192.0.2.1]", "550 5.7.1 Relaying denied"),
    ("user@[127.0.0.1]", "550 5.7.1 Relaying denied"),
    ("user@[IPv6:::1]", "550 5.7.1 Relaying denied"),
    // Not RFC 5321: refused, not guessed at.
    ("user@ext.test.", "501 5.1.3"),
    ("user@example.test.", "501 5.1.3"),
    ("user@ext.test@example.test", "501 5.1.3"),
    ("user@example.test@ext.test", "501 5.1.3"),
    ("user@@example.test", "501 5.1.3"),
    ("user", "501 5.1.3"),
    ("user@", "501 5.1.3"),
    ("user@example.test:ext.test", "501 5.1.3"),
    // Look-alikes of the local domain: Cyrillic е and а, as an A-label
    // and raw (no SMTPUTF8).
    ("user@xn--mple-43d3a6i.test", "553 5.1.3"),
    ("user@\u{435}\u{445}\u{430}mple.test", "553 5.6.7"),
    // Plain relaying, for comparison.
    ("user@ext.test", "550 5.7.1 Relaying denied"),
    ("user@sub.example.test", "550 5.7.1 Relaying denied"),
];

/// Sends every trick in one transaction, then one ordinary local
/// recipient in upper case, and delivers.
fn try_tricks(c: &mut Client, from: &str, bob: bool, subject: &str) {
    c.mail(from).expect("250 2.1.0");
    for (rcpt, expected) in TRICKS {
        let expected = match (bob, *expected) {
            (true, "550 5.7.1 Relaying denied") => {
                "550 5.7.1 Relaying denied: DEMO\\bob".to_string()
            }
            (_, e) => e.to_string(),
        };
        c.rcpt(rcpt).expect(&expected);
    }
    // Case does not make a local domain foreign.
    c.rcpt("User@EXAMPLE.TEST").expect("250");
    c.data_body(&format!("Subject: {subject}\r\n\r\ntricks\r\n"))
        .expect("250");
    c.send("QUIT").expect("221");
}

#[test]
fn relay_tricks_are_refused_unauthenticated_and_for_bob() {
    // Syntax errors count towards max_errors; this test makes many.
    let f = start_with(DEMO_POLICY, |c| c.set("limits.max_errors", "100"));
    let mut c = f.client();
    try_tricks(&mut c, "someone@client.test", false, "anonymous");
    let mut c = f.ntlm(&BOB);
    try_tricks(&mut c, "bob@example.test", true, "bob");
    // Nothing but the two local recipients reached the backend, each as
    // the client wrote it.
    let msgs = f.delivered(2);
    for subject in ["anonymous", "bob"] {
        assert_eq!(
            by_subject(&msgs, subject).rcpt_to(),
            ["User@EXAMPLE.TEST"],
            "{msgs:#?}"
        );
    }
}

#[test]
fn address_literals_need_a_rule_that_allows_them() {
    let f = start(
        "local_domains: [example.test]\n\
         rules:\n\
         \x20 - name: literals\n\
         \x20   users: ['DEMO\\carol']\n\
         \x20   recipient_domains: [\"*\"]\n\
         \x20   allow_address_literals: true\n\
         \x20 - name: relay-senders\n\
         \x20   groups: [relay-senders]\n\
         \x20   recipient_domains: [\"*\"]\n",
    );
    // Alice may relay anywhere, but not to a bare address.
    let mut c = f.ntlm(&ALICE);
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("user@[192.0.2.1]")
        .expect("550 5.7.1 Relaying to address literals is not permitted (rule relay-senders)");
    c.rcpt("user%ext.test@[192.0.2.1]").expect("550 5.7.1");
    c.rcpt("friend@ext.test").expect("250");
    c.data_body("Subject: alice-literal\r\n\r\nx\r\n")
        .expect("250");
    let mut c = f.ntlm(&CAROL);
    send_message(
        &mut c,
        "carol@example.test",
        &["user@[127.0.0.1]"],
        "carol-literal",
    );
    let msgs = f.delivered(2);
    assert_eq!(
        by_subject(&msgs, "alice-literal").rcpt_to(),
        ["friend@ext.test"]
    );
    assert_eq!(
        by_subject(&msgs, "carol-literal").rcpt_to(),
        ["user@[127.0.0.1]"]
    );
}

/// A source route names hosts the mail is to pass through first, and an
/// RFC 821 MTA behind the gateway would act on it: deciding on the final
/// (local) mailbox and forwarding the route as sent would let a client
/// make the backend relay to `ext.test`. The gateway drops the route
/// (RFC 5321 §3.3, Appendix C) before deciding and forwarding.
#[test]
fn source_route_is_not_forwarded_to_the_backend() {
    let f = start(DEMO_POLICY);
    let mut c = f.client();
    c.mail("@ext.test:someone@client.test").expect("250 2.1.0");
    c.rcpt("@ext.test:user@example.test").expect("250");
    c.rcpt("@ext.test,@[192.0.2.1]:other@example.test")
        .expect("250");
    c.rcpt("@example.test:user@ext.test")
        .expect("550 5.7.1 Relaying denied: ext.test is not a local domain");
    c.data_body("Subject: routed\r\n\r\nx\r\n").expect("250");
    let msgs = f.delivered(1);
    assert_eq!(msgs[0].mail_from(), "someone@client.test");
    assert_eq!(
        msgs[0].rcpt_to(),
        ["user@example.test", "other@example.test"]
    );
}

// ---------------------------------------------------------------- trusted networks, listeners

#[test]
fn trusted_network_relays_without_auth_only_to_its_domains() {
    let f = start(
        "local_domains: [example.test]\n\
         trusted_networks:\n\
         \x20 - name: this-host\n\
         \x20   networks: [127.0.0.1/32]\n\
         \x20   recipient_domains: [partner.test]\n",
    );
    let mut c = f.client();
    c.mail("scanner@client.test").expect("250 2.1.0");
    c.rcpt("inbox@partner.test").expect("250");
    c.rcpt("victim@ext.test")
        .expect("550 5.7.1 Relaying denied: ext.test is not a local domain");
    c.rcpt("x@example.test").expect("250");
    c.data_body("Subject: scan\r\n\r\nscan\r\n").expect("250");
    // Another address is not in the network.
    let other = "127.0.0.2".parse().unwrap();
    let mut c = Client::connect_from(f.gw.addr("smtp"), other);
    c.expect("220");
    c.ehlo("client.test").expect("250");
    c.mail("scanner@client.test").expect("250 2.1.0");
    c.rcpt("inbox@partner.test")
        .expect("550 5.7.1 Relaying denied: partner.test is not a local domain");
    c.send("QUIT").expect("221");
    let msgs = barrier(&f, 2);
    assert_eq!(
        by_subject(&msgs, "scan").rcpt_to(),
        ["inbox@partner.test", "x@example.test"]
    );
}

#[test]
fn listener_that_requires_auth_refuses_even_local_mail_without_it() {
    let f = start_with(
        "local_domains: [example.test]\n\
         listeners:\n\
         \x20 smtp: {require_auth: true}\n",
        |c| c.listener("mx", &[]),
    );
    let mut c = f.client();
    c.mail("someone@client.test")
        .expect("530 5.7.0 Authentication required");
    c.rcpt("x@example.test").expect("503");
    auth_ntlm(&mut c, &BOB);
    send_message(&mut c, "bob@example.test", &["x@example.test"], "submitted");
    // The MX listener takes inbound mail as usual.
    let mut c = Client::greeted(f.gw.addr("mx"));
    send_message(
        &mut c,
        "someone@client.test",
        &["x@example.test"],
        "inbound",
    );
    let msgs = f.delivered(2);
    by_subject(&msgs, "submitted");
    by_subject(&msgs, "inbound");
}

// ---------------------------------------------------------------- rates and sizes

#[test]
fn client_rate_limit_refuses_the_third_message_with_a_retry_hint() {
    let f = start(
        "local_domains: [example.test]\n\
         rates:\n\
         \x20 - {per: client, window: 1h, messages: 2}\n",
    );
    let mut c = f.client();
    send_message(&mut c, "a@client.test", &["x@example.test"], "first");
    send_message(&mut c, "a@client.test", &["x@example.test"], "second");
    let r = c
        .mail("a@client.test")
        .expect("451 4.7.1 Rate limit exceeded");
    assert!(
        r.first().contains("; try again in ") && r.first().ends_with(" minutes"),
        "a retry hint: {}",
        c.transcript()
    );
    // Per client address: a new connection from here is still limited…
    let mut c = f.client();
    c.mail("a@client.test").expect("451 4.7.1");
    // …another address is not.
    let mut c = Client::connect_from(f.gw.addr("smtp"), "127.0.0.2".parse().unwrap());
    c.expect("220");
    c.ehlo("client.test").expect("250");
    send_message(&mut c, "b@client.test", &["x@example.test"], "other-client");
    f.gw.wait_for_event("policy refused", TIMEOUT, |v| {
        v["stage"] == "mail" && v["reason"] == "rate_limited"
    });
    let msgs = f.delivered(3);
    assert_eq!(msgs.len(), 3);
}

/// A policy where the group relay-senders (alice) relays anywhere, sender
/// bound to the directory, under one rate of its rule (a YAML mapping).
fn relay_senders_with_rate(rate: &str) -> String {
    format!(
        "local_domains: [example.test]\n\
         sender_binding:\n\
         \x20 senders: [directory]\n\
         rules:\n\
         \x20 - name: relay-senders\n\
         \x20   groups: [relay-senders]\n\
         \x20   recipient_domains: [\"*\"]\n\
         \x20   rates:\n\
         \x20     - {rate}\n"
    )
}

#[test]
fn rule_recipient_rate_limits_relaying_per_principal() {
    let f = start(&relay_senders_with_rate(
        "{per: principal, window: 1h, recipients: 3}",
    ));
    let mut c = f.ntlm(&ALICE);
    c.mail("alice@example.test").expect("250 2.1.0");
    for i in 0..3 {
        c.rcpt(&format!("r{i}@ext.test")).expect("250");
    }
    let r = c.rcpt("r3@ext.test").expect("451 4.7.1");
    assert!(
        r.first()
            .starts_with("451 4.7.1 Rate limit exceeded (rule relay-senders); try again in "),
        "{}",
        c.transcript()
    );
    // Local recipients are not relaying: the rule's rate does not apply.
    c.rcpt("x@example.test").expect("250");
    c.data_body("Subject: rated\r\n\r\nx\r\n").expect("250");
    // Per principal: alice from another session and address is limited too.
    let mut c = Client::connect_from(f.gw.addr("smtp"), "127.0.0.2".parse().unwrap());
    c.expect("220");
    c.ehlo("client.test").expect("250");
    auth_ntlm(&mut c, &ALICE);
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("r4@ext.test").expect("451 4.7.1");
    c.send("QUIT").expect("221");
    f.gw.wait_for_event("policy refused", TIMEOUT, |v| {
        v["stage"] == "rcpt" && v["reason"] == "rate_limited" && v["rule"] == "relay-senders"
    });
    let msgs = f.delivered(1);
    assert_eq!(
        msgs[0].rcpt_to(),
        [
            "r0@ext.test",
            "r1@ext.test",
            "r2@ext.test",
            "x@example.test"
        ]
    );
}

/// A rule's `messages` rate counts each message the rule relays, whatever
/// the order of its recipients: a local recipient first must not make the
/// relayed part of the message free.
#[test]
fn rule_message_rate_counts_messages_whose_first_recipient_is_local() {
    let f = start(&relay_senders_with_rate(
        "{per: principal, window: 1h, messages: 1}",
    ));
    let mut c = f.ntlm(&ALICE);
    send_message(
        &mut c,
        "alice@example.test",
        &["x@example.test", "r1@ext.test"],
        "first",
    );
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("x@example.test").expect("250");
    c.rcpt("r2@ext.test")
        .expect("451 4.7.1 Rate limit exceeded (rule relay-senders)");
    c.send("RSET").expect("250");
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("r3@ext.test").expect("451 4.7.1");
    c.send("QUIT").expect("221");
    let msgs = barrier(&f, 2);
    assert_eq!(
        by_subject(&msgs, "first").rcpt_to(),
        ["x@example.test", "r1@ext.test"]
    );
}

/// `check_header_from: true` asks the gateway to hold the header `From:`
/// to the sender binding too; a principal must not be able to put someone
/// else's address there.
#[test]
fn header_from_is_checked_when_the_policy_asks() {
    let f = start(
        "local_domains: [example.test]\n\
         sender_binding:\n\
         \x20 senders: [directory]\n\
         \x20 check_header_from: true\n\
         rules:\n\
         \x20 - name: relay-senders\n\
         \x20   groups: [relay-senders]\n\
         \x20   recipient_domains: [\"*\"]\n",
    );
    let mut c = f.ntlm(&ALICE);
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("friend@ext.test").expect("250");
    c.data_body("From: The Boss <ceo@example.test>\r\nSubject: spoof\r\n\r\npay\r\n")
        .expect("5");
    send_message(&mut c, "alice@example.test", &["friend@ext.test"], "honest");
    let msgs = barrier(&f, 2);
    assert!(
        msgs.iter().all(|m| !m.data.contains("ceo@example.test")),
        "{msgs:#?}"
    );
}

/// A body of about `n` bytes.
fn body_of(subject: &str, n: usize) -> String {
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuv\r\n";
    format!(
        "Subject: {subject}\r\n\r\n{}",
        line.repeat(n.div_ceil(line.len()))
    )
}

#[test]
fn rule_max_message_size_is_enforced() {
    let f = start_with(
        "local_domains: [example.test]\n\
         sender_binding:\n\
         \x20 senders: [directory]\n\
         rules:\n\
         \x20 - name: relay-senders\n\
         \x20   groups: [relay-senders]\n\
         \x20   recipient_domains: [\"*\"]\n\
         \x20   max_message_size: 2 KiB\n",
        |c| {
            c.set("limits.max_message_size", "100000")
                .set("metrics.address", "127.0.0.1:0")
        },
    );
    let mut c = f.ntlm(&ALICE);
    // Relayed: the rule's 2 KiB.
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("friend@ext.test").expect("250");
    c.data_body(&body_of("too-big", 4000))
        .expect("552 5.3.4 Message size exceeds fixed maximum of 2048 bytes");
    // With a local recipient too, the smallest limit applies.
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("x@example.test").expect("250");
    c.rcpt("friend@ext.test").expect("250");
    c.data_body(&body_of("mixed-too-big", 4000))
        .expect("552 5.3.4");
    // Under the limit it goes.
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("friend@ext.test").expect("250");
    c.data_body(&body_of("small", 1000)).expect("250");
    // Local mail has only the global limit.
    c.mail("alice@example.test").expect("250 2.1.0");
    c.rcpt("x@example.test").expect("250");
    c.data_body(&body_of("local-big", 4000)).expect("250");
    // A declared SIZE over the global limit is refused at MAIL.
    c.send("MAIL FROM:<alice@example.test> SIZE=200000")
        .expect("552 5.3.4");
    // A declared SIZE over the rule's limit (RFC 1870): that recipient is
    // refused at RCPT, before any data; a local one in the same
    // transaction still gets the message.
    c.send("MAIL FROM:<alice@example.test> SIZE=4000")
        .expect("250 2.1.0");
    c.rcpt("friend@ext.test").expect(
        "552 5.3.4 Message size 4000 exceeds the limit of rule relay-senders (2048 bytes) for this recipient",
    );
    c.rcpt("y@example.test").expect("250");
    c.data_body(&body_of("declared-big", 4000)).expect("250");
    // Declared within the limit: relayed as before.
    c.send("MAIL FROM:<alice@example.test> SIZE=1500")
        .expect("250 2.1.0");
    c.rcpt("friend@ext.test").expect("250");
    c.data_body(&body_of("declared-small", 1000)).expect("250");
    c.send("QUIT").expect("221");
    let msgs = f.delivered(4);
    assert_eq!(by_subject(&msgs, "small").rcpt_to(), ["friend@ext.test"]);
    assert_eq!(by_subject(&msgs, "local-big").rcpt_to(), ["x@example.test"]);
    assert_eq!(
        by_subject(&msgs, "declared-big").rcpt_to(),
        ["y@example.test"]
    );
    assert_eq!(
        by_subject(&msgs, "declared-small").rcpt_to(),
        ["friend@ext.test"]
    );
    // Counted as a policy refusal with its own reason.
    let refused = scrape_value(
        metrics_addr(&f.gw),
        "relayguard_relay_decisions_total",
        &[
            ("decision", "deny"),
            ("reason", "message_too_large"),
            ("rule", "relay-senders"),
        ],
    );
    assert_eq!(refused, Some(1.0));
}

// ---------------------------------------------------------------- reload

/// The demo policy plus a rule that lets bob (group `staff`) relay.
fn staff_may_relay() -> String {
    let marker = "\n# DEMO\\bob has no rule";
    assert!(DEMO_POLICY.contains(marker), "{DEMO_POLICY}");
    DEMO_POLICY.replace(
        marker,
        &format!("  - name: staff\n    groups: [staff]\n    recipient_domains: [\"*\"]\n{marker}"),
    )
}

/// Replaces `path` with `text` the way a careful operator does (a new
/// file renamed over the old one), so the gateway never sees half a file.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write_file(&tmp, text);
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn policy_file_change_is_reloaded_and_a_broken_file_keeps_the_running_policy() {
    let f = start(DEMO_POLICY);
    let refused = not_permitted("DEMO\\bob", "ext.test");
    // A session, with a transaction begun under the first policy.
    let mut early = f.ntlm(&BOB);
    early.mail("bob@example.test").expect("250 2.1.0");
    early.rcpt("friend@ext.test").expect(&refused);

    let reloads = count_events(&f.gw, RELOADED);
    let written = Instant::now();
    replace_file(&f.policy_path(), &staff_may_relay());
    // The file is looked at every 2 s.
    wait_for_more_events(&f.gw, RELOADED, reloads, Duration::from_secs(15));
    let mut c = f.ntlm(&BOB);
    send_message(
        &mut c,
        "bob@example.test",
        &["friend@ext.test"],
        "bob-after-reload",
    );
    eprintln!("bob relayed {:?} after the file changed", written.elapsed());
    // The transaction in flight kept the policy it started with; the
    // session's next transaction has the new one.
    early.rcpt("friend@ext.test").expect(&refused);
    early.send("RSET").expect("250");
    send_message(
        &mut early,
        "bob@example.test",
        &["friend@ext.test"],
        "early-session-new-policy",
    );
    // A transaction begun before the broken file arrives.
    early.mail("bob@example.test").expect("250 2.1.0");

    let broken = staff_may_relay().replace(
        "groups: [staff]\n    recipient_domains:",
        "groups: [staff]\n    recipient_domain:",
    );
    assert_ne!(broken, staff_may_relay());
    replace_file(&f.policy_path(), &broken);
    let event =
        f.gw.wait_for_event(RELOAD_REFUSED, Duration::from_secs(15), |_| true);
    let error = event["error"].as_str().unwrap_or_default();
    let line = broken
        .lines()
        .position(|l| l.contains("recipient_domain:"))
        .unwrap()
        + 1;
    assert!(
        error.contains(&format!("policy.yaml:{line}:")) && error.contains("recipient_domain"),
        "names the file, line and field: {error}"
    );
    // The running policy stays, for sessions old and new.
    early.rcpt("friend@ext.test").expect("250");
    early
        .data_body("Subject: early-session-after-broken\r\n\r\nx\r\n")
        .expect("250");
    let mut c = f.ntlm(&BOB);
    send_message(
        &mut c,
        "bob@example.test",
        &["friend@ext.test"],
        "bob-after-broken",
    );
    let mut c = f.ntlm(&ALICE);
    send_message(
        &mut c,
        "alice@example.test",
        &["friend@ext.test"],
        "alice-after-broken",
    );
    let mut c = f.client();
    c.mail("someone@client.test").expect("250 2.1.0");
    c.rcpt("friend@ext.test").expect("550 5.7.1");
    c.send("QUIT").expect("221");
    assert_eq!(count_events(&f.gw, RELOADED), reloads + 1);
    let msgs = f.delivered(5);
    assert!(all_rcpts(&msgs).iter().all(|r| r == "friend@ext.test"));
}

/// Replaces `path` with `text` keeping its modification time, so that only
/// a signal can make the gateway look at it.
fn replace_keeping_mtime(path: &Path, text: &str) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let tmp = path.with_extension("new");
    write_file(&tmp, text);
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn sighup_reloads_the_policy() {
    let f = start(DEMO_POLICY);
    let mut c = f.ntlm(&BOB);
    c.mail("bob@example.test").expect("250 2.1.0");
    c.rcpt("friend@ext.test")
        .expect(&not_permitted("DEMO\\bob", "ext.test"));
    c.send("RSET").expect("250");
    replace_keeping_mtime(&f.policy_path(), &staff_may_relay());
    let reloads = count_events(&f.gw, RELOADED);
    f.gw.signal("HUP");
    wait_for_more_events(&f.gw, RELOADED, reloads, TIMEOUT);
    send_message(
        &mut c,
        "bob@example.test",
        &["friend@ext.test"],
        "after-hup",
    );
    // A broken file on SIGHUP is refused as well.
    replace_keeping_mtime(
        &f.policy_path(),
        "local_domains: [example.test]\nrules: 7\n",
    );
    let refusals = count_events(&f.gw, RELOAD_REFUSED);
    f.gw.signal("HUP");
    wait_for_more_events(&f.gw, RELOAD_REFUSED, refusals, TIMEOUT);
    send_message(
        &mut c,
        "bob@example.test",
        &["friend@ext.test"],
        "after-bad-hup",
    );
    let msgs = f.delivered(2);
    assert_eq!(all_rcpts(&msgs), ["friend@ext.test", "friend@ext.test"]);
}

#[test]
fn inline_policy_is_reloaded_when_the_configuration_file_changes() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = test_cert(dir.path());
    let users = dir.path().join("users.yaml");
    write_file(&users, users_yaml());
    let config = base_config(sink.addr(), &cert, &key)
        .auth(&users)
        .set("policy.sender_binding.senders", "[directory]");
    let gw = Gateway::start_in(dir, &config.yaml());
    let mut c = Client::greeted(gw.addr("smtp"));
    auth_ntlm(&mut c, &BOB);
    c.mail("bob@example.test").expect("250 2.1.0");
    c.rcpt("friend@ext.test")
        .expect(&not_permitted("DEMO\\bob", "ext.test"));
    c.send("RSET").expect("250");
    let reloads = count_events(&gw, RELOADED);
    let changed = config.set(
        "policy.rules",
        "[{name: staff, groups: [staff], recipient_domains: [\"*\"]}]",
    );
    replace_file(gw.config_path(), &changed.yaml());
    wait_for_more_events(&gw, RELOADED, reloads, Duration::from_secs(15));
    send_message(&mut c, "bob@example.test", &["friend@ext.test"], "inline");
    let msgs = sink.wait_for_messages(1, TIMEOUT);
    assert_eq!(msgs[0].rcpt_to(), ["friend@ext.test"]);
}

// ---------------------------------------------------------------- nmap

#[test]
fn nmap_smtp_open_relay_finds_no_open_relay() {
    let f = start(DEMO_POLICY);
    // `+` runs the script although nmap does not know the port as SMTP.
    // The domain is the relay target, so it must be an external one.
    let out = nmap(&[
        "-n",
        "-Pn",
        "-p",
        &f.gw.addr("smtp").port().to_string(),
        "--script",
        "+smtp-open-relay",
        "--script-args",
        "smtp-open-relay.domain=ext.test,smtp-open-relay.ip=127.0.0.1",
        "127.0.0.1",
    ]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("smtp-open-relay: Server doesn't seem to be an open relay, all tests failed"),
        "{text}"
    );
    // The script did try: the gateway refused its attempts.
    assert!(
        count_events(&f.gw, "policy refused") >= 10,
        "{}",
        f.gw.logs().join("\n")
    );
    let msgs = barrier(&f, 1);
    assert_eq!(all_rcpts(&msgs), ["barrier@example.test"]);
}

// ---------------------------------------------------------------- explain and check

/// A configuration file in `dir` (users file, `policy` in policy.yaml)
/// for the command-line tools; returns its path.
fn config_file(dir: &Path, policy: &str) -> PathBuf {
    let users = dir.join("users.yaml");
    write_file(&users, users_yaml());
    let policy_path = dir.join("policy.yaml");
    write_file(&policy_path, policy);
    let config = with_policy_file(
        Config::new(&["127.0.0.1:25".parse().unwrap()])
            .listener("submission", &[])
            .auth(&users),
        &policy_path,
    );
    let path = dir.join("relayguard.yaml");
    write_file(&path, config.yaml());
    path
}

const EXPLAIN_POLICY: &str = "local_domains: [example.test]
rules:
  - name: relay-senders
    groups: [relay-senders]
    recipient_domains: [\"*\"]
  - name: staff-partners
    groups: [staff]
    mechanisms: [plain]
    tls: true
    networks: [10.0.0.0/8]
    recipient_domains: [partner.test]
";

/// Runs `relayguard policy explain` on `config` with `args` (split on
/// white space); asserts its exit code (0: allowed, 1: denied) and that its
/// output holds each of `says`.
fn explain(config: &Path, args: &str, code: i32, says: &[&str]) {
    let mut argv = vec!["policy", "explain", "--config", config.to_str().unwrap()];
    argv.extend(args.split_whitespace());
    let out = relayguard(&argv);
    assert_eq!(out.status.code(), Some(code), "{}", output_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in says {
        assert!(text.contains(line), "missing {line:?}:\n{text}");
    }
}

/// `--size` is the `SIZE=` of MAIL FROM: over the matched rule's limit the
/// answer is the refusal the client would get at RCPT.
#[test]
fn policy_explain_answers_for_a_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "local_domains: [example.test]\n\
         rules:\n\
         \x20 - name: relay-senders\n\
         \x20   groups: [relay-senders]\n\
         \x20   recipient_domains: [\"*\"]\n\
         \x20   max_message_size: 1 MiB\n",
    );
    let envelope = "--user alice --client 10.1.2.3 --from alice@example.test --to x@ext.test";
    explain(
        &config,
        &format!("{envelope} --size 1048576"),
        0,
        &["decision:  ALLOW (relay by `relay-senders`)"],
    );
    explain(
        &config,
        &format!("{envelope} --size 1048577"),
        1,
        &["decision:  DENY 552 5.3.4 Message size 1048577 exceeds the limit of rule relay-senders (1048576 bytes) for this recipient"],
    );
}

#[test]
fn policy_explain_names_the_rule_or_why_each_rule_did_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), EXPLAIN_POLICY);
    explain(
        &config,
        "--user alice --client 10.1.2.3 --from alice@example.test --to x@ext.test",
        0,
        &[
            "client:    DEMO\\alice (ntlm) from 10.1.2.3",
            "rules[0] `relay-senders` (rule): MATCHED",
            "decision:  ALLOW (relay by `relay-senders`)",
        ],
    );

    explain(
        &config,
        "--user bob --client 192.0.2.7 --from bob@example.test --to x@ext.test",
        1,
        &[
            "rules[0] `relay-senders` (rule): no match: DEMO\\bob is not in users [] nor in groups [relay-senders]",
            "rules[1] `staff-partners` (rule): no match: ",
            "authenticated with ntlm but the rule needs [plain]",
            "client 192.0.2.7 is not in [10.0.0.0/8]",
            "the session is not using TLS",
            "ext.test is not in recipient_domains [partner.test]",
            "no rule matched: default deny",
            "decision:  DENY 550 5.7.1 Relaying denied: DEMO\\bob is authenticated but not permitted to relay to ext.test",
        ],
    );
    // The same user in the circumstances the second rule wants.
    explain(
        &config,
        "--user DEMO\\bob --client 10.9.8.7 --mechanism plain --tls --listener submission \
         --from bob@example.test --to x@partner.test",
        0,
        &[
            "listener submission, TLS",
            "rules[1] `staff-partners` (rule): MATCHED",
        ],
    );
    // Sender binding is part of the decision.
    explain(
        &config,
        "--user alice --client 10.1.2.3 --from bob@example.test --to x@ext.test",
        1,
        &[
            "DENY 553 5.7.1 Sender address rejected: <bob@example.test> is not owned by DEMO\\alice",
        ],
    );
    // Unauthenticated, and a trick.
    explain(
        &config,
        "--client 10.1.2.3 --from a@client.test --to user%ext.test@example.test",
        1,
        &["no match: the client did not authenticate"],
    );
}

#[test]
fn check_warns_about_a_shadowed_rule() {
    let dir = tempfile::tempdir().unwrap();
    let policy = format!(
        "{EXPLAIN_POLICY}  - name: staff-partners-again\n    groups: [staff]\n    mechanisms: [plain]\n    tls: true\n    networks: [10.1.0.0/16]\n    recipient_domains: [partner.test]\n"
    );
    let config = config_file(dir.path(), &policy);
    let out = relayguard(&["check", "--config", config.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains(
            "policy.yaml: rules[2] `staff-partners-again` is shadowed by rules[1] `staff-partners`"
        ),
        "{text}"
    );
    assert!(
        stdout.contains("configuration is valid (with warnings)"),
        "{text}"
    );
}

#[test]
fn check_refuses_an_unknown_group_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let policy = EXPLAIN_POLICY.replace("groups: [staff]", "groups: [staf]");
    let config = config_file(dir.path(), &policy);
    let out = relayguard(&["check", "--config", config.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = policy.lines().position(|l| l.contains("[staf]")).unwrap() + 1;
    assert!(
        stderr.contains(&format!("policy.yaml:{line}:"))
            && stderr.contains("rules[1].groups[0]")
            && stderr.contains("no identity source knows the group `staf`"),
        "{text}"
    );
    // Inline, the position is in the configuration file.
    let users = dir.path().join("users.yaml");
    let yaml = Config::new(&["127.0.0.1:25".parse().unwrap()])
        .auth(&users)
        .set(
            "policy.rules",
            "[{name: r, users: ['DEMO\\mallory'], recipient_domains: [\"*\"]}]",
        )
        .yaml();
    let out = Gateway::check_in(dir.path(), &yaml);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    let line = yaml.lines().position(|l| l.contains("mallory")).unwrap() + 1;
    assert!(
        text.contains(&format!("relayguard.yaml:{line}:"))
            && text.contains("policy.rules[0].users[0]")
            && text.contains("no identity source knows the user `DEMO\\mallory`"),
        "{text}"
    );
}

// ---------------------------------------------------------------- README

/// The README's "Relay policy" section.
fn readme_policy_section() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section: Vec<String> = readme
        .lines()
        .skip_while(|l| *l != "## Relay policy")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .map(str::to_string)
        .collect();
    assert!(
        !section.is_empty(),
        "README has no `## Relay policy` section"
    );
    section
}

/// The fenced blocks opened with ```` ```info ```` in `lines`.
fn fenced_blocks(lines: &[String], info: &str) -> Vec<String> {
    let open = format!("```{info}");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for l in lines {
        match &mut current {
            None if *l == open => current = Some(String::new()),
            None => {}
            Some(text) if l == "```" => {
                blocks.push(std::mem::take(text));
                current = None;
            }
            Some(text) => {
                text.push_str(l);
                text.push('\n');
            }
        }
    }
    blocks
}

/// Every ```yaml block of the README's "Relay policy" section is a whole
/// policy file that `relayguard check` must accept without warnings, with
/// the users and groups the examples name; the `policy explain` transcript
/// there is what the binary prints for the helpdesk example.
#[test]
fn readme_policy_examples_pass_check() {
    let section = readme_policy_section();
    let examples = fenced_blocks(&section, "yaml");
    assert!(examples.len() >= 5, "{} examples", examples.len());
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.yaml");
    let mut users_text = String::from("users:\n");
    let hash = nt_hash_hex("example-pass");
    for (user, groups) in [
        ("alice", "[relay-senders]"),
        ("bob", "[staff]"),
        ("carol", "[helpdesk]"),
        ("dave", "[helpdesk, relay-senders]"),
    ] {
        users_text.push_str(&format!(
            "  - user: {user}\n    domain: CORP\n    nt_hash: {hash}\n    groups: {groups}\n    mail: [{user}@corp.example]\n"
        ));
    }
    write_file(&users, users_text);
    let mut helpdesk_config = None;
    for (i, example) in examples.iter().enumerate() {
        let policy = dir.path().join(format!("example-{i}.yaml"));
        write_file(&policy, example);
        let yaml = with_policy_file(
            Config::new(&["127.0.0.1:25".parse().unwrap()])
                .listener("submission", &[])
                .auth(&users)
                .set("auth.ntlm.netbios_domain", "CORP"),
            &policy,
        )
        .yaml();
        let out = Gateway::check_in(dir.path(), &yaml);
        let text = output_text(&out);
        assert!(
            out.status.success(),
            "README example {i}:\n{example}\n{text}"
        );
        assert!(
            !text.contains("warning:"),
            "README example {i} has warnings:\n{example}\n{text}"
        );
        if example.contains("name: helpdesk-shared") && example.contains("name: may-relay") {
            let config = dir.path().join(format!("example-{i}-config.yaml"));
            write_file(&config, &yaml);
            helpdesk_config = Some(config);
        }
    }
    let config = helpdesk_config.expect("the helpdesk example");

    // `$ relayguard policy explain …` (continued with `\`), then its output.
    let transcript = fenced_blocks(&section, "text")
        .into_iter()
        .find(|b| b.starts_with("$ relayguard policy explain"))
        .expect("a policy explain transcript");
    let mut runs: Vec<(String, String)> = Vec::new();
    let mut continued = false;
    for line in transcript.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            runs.push((cmd.to_string(), String::new()));
            continued = cmd.ends_with('\\');
        } else if continued {
            let run = runs.last_mut().unwrap();
            run.0.push_str(line);
            continued = line.ends_with('\\');
        } else {
            let run = runs.last_mut().unwrap();
            run.1.push_str(line);
            run.1.push('\n');
        }
    }
    assert_eq!(runs.len(), 2, "{transcript}");
    for (cmd, expected) in runs {
        let words: Vec<&str> = cmd.split_whitespace().filter(|w| *w != "\\").collect();
        assert_eq!(words[..3], ["relayguard", "policy", "explain"], "{cmd}");
        let mut args: Vec<&str> = words[1..].to_vec();
        let at = args.iter().position(|a| *a == "--config").unwrap() + 1;
        args[at] = config.to_str().unwrap();
        let out = relayguard(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.trim_end(),
            expected.trim_end(),
            "README transcript of `{cmd}` is out of date"
        );
        let allowed = expected.contains("decision:  ALLOW");
        assert_eq!(
            out.status.code(),
            Some(if allowed { 0 } else { 1 }),
            "{cmd}"
        );
    }
}

// ---------------------------------------------------------------- Active Directory

#[test]
fn active_directory_groups_decide_who_relays() {
    let dc = SambaDc::shared();
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = test_cert(dir.path());
    let policy_path = dir.path().join("policy.yaml");
    write_file(
        &policy_path,
        "local_domains: [example.test]\n\
         sender_binding:\n\
         \x20 senders: [directory]\n\
         rules:\n\
         \x20 - name: relay-senders\n\
         \x20   groups: [relay-senders]\n\
         \x20   recipient_domains: [\"*\"]\n",
    );
    let config = with_policy_file(
        base_config(sink.addr(), &cert, &key).auth_for(IdentitySource::ActiveDirectory, dir.path()),
        &policy_path,
    );
    let config_path = dir.path().join("explain.yaml");
    write_file(&config_path, config.yaml());
    let gw = Gateway::start_in(dir, &config.yaml());
    let src = IdentitySource::ActiveDirectory;
    let ntlm_session = |a: &Account| {
        let mut c = Client::greeted(gw.addr("smtp"));
        ntlm::send_auth(&mut c, &ntlm::creds(a), ClientOptions::default());
        let r = c.read_reply();
        assert_eq!(r.code, 235, "{}\nsamba log:\n{}", c.transcript(), dc.log());
        c
    };
    // alice: a direct member; carol: through helpdesk, a member group.
    for (account, mail) in [
        (src.alice(), SambaDc::ALICE.mail),
        (SambaDc::CAROL.account(), SambaDc::CAROL.mail),
    ] {
        let mut c = ntlm_session(&account);
        c.mail("bob@ad.relayguard.test").expect("553 5.7.1");
        send_message(&mut c, mail, &["friend@ext.test"], account.user);
    }
    // bob authenticates and is still no relay.
    let mut c = ntlm_session(&src.bob());
    c.mail(SambaDc::BOB.mail).expect("250 2.1.0");
    c.rcpt("friend@ext.test")
        .expect(&not_permitted("RGTEST\\bob", "ext.test"));
    c.rcpt("x@example.test").expect("250");
    c.data_body("Subject: bob\r\n\r\nlocal\r\n").expect("250");
    // curl's NTLM, passed through to the DC.
    let body = gw.dir().join("curl.eml");
    write_file(&body, "Subject: curl-alice\r\n\r\nHello.\r\n");
    let out = curl(&[
        "-v",
        "--max-time",
        "30",
        &format!("smtp://{}/client.test", gw.addr("smtp")),
        "--login-options",
        "AUTH=NTLM",
        "-u",
        &format!("RGTEST\\alice:{}", SambaDc::ALICE.password),
        "--mail-from",
        SambaDc::ALICE.mail,
        "--mail-rcpt",
        "friend@ext.test",
        "--upload-file",
        &body.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let msgs = sink.wait_for_messages(4, TIMEOUT);
    for subject in ["alice", "carol", "curl-alice"] {
        assert_eq!(by_subject(&msgs, subject).rcpt_to(), ["friend@ext.test"]);
    }
    assert_eq!(by_subject(&msgs, "bob").rcpt_to(), ["x@example.test"]);

    // `policy explain` asks the directory the same way.
    explain(
        &config_path,
        &format!(
            "--user carol --client 10.1.2.3 --from {} --to x@ext.test",
            SambaDc::CAROL.mail
        ),
        0,
        &["`relay-senders` (rule): MATCHED"],
    );
    explain(
        &config_path,
        &format!(
            "--user bob --client 10.1.2.3 --from {} --to x@ext.test",
            SambaDc::BOB.mail
        ),
        1,
        &["RGTEST\\bob is not in users [] nor in groups [relay-senders]"],
    );
}
