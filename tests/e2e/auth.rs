//! Authentication end to end: real clients (curl, swaks, impacket, nmap)
//! and policy's NTLM client, honest and hostile, through the real binary.
//!
//! Every refused attempt is followed by a probe: a relay attempt (refused:
//! relaying needs a rule, whoever asks) and a message to a local
//! recipient, whose Received header must show an unauthenticated session.
//! The sink's exact message count shows that nothing else got through.
//!
//! The scenarios that do not depend on where accounts come from are in
//! [`scenarios`], one function per scenario taking the identity source:
//! this module runs them against the users file, `auth_ad` against the
//! Samba AD DC. The tests below them are about the users file itself or
//! about what happens before any account is looked up.

pub(crate) mod scenarios;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use relayguard_e2e::ntlm::{self, av_id, impacket, AvPair, ClientMode, ClientOptions};
use relayguard_e2e::IdentitySource::{self, UsersFile};
use relayguard_e2e::{
    curl, nmap, pem_to_der, run_hash_password, swaks, test_cert, wait_until, write_file,
    write_users_file, Account, Client, Config, Gateway, Sink, ALICE, BOB, TIMEOUT,
};

use crate::{barrier, HOST};

/// Not in the users file until a test adds her.
const CAROL: Account = Account {
    domain: "DEMO",
    user: "carol",
    password: "carol-pass",
};

/// A second client machine, for the per-address lockouts.
const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A gateway with AUTH in front of smtp-sink: listener `smtp` offers
/// STARTTLS and accepts AUTH NTLM before it, `smtps` is implicit TLS;
/// the accounts come from `source` ([`Config::auth_for`]).
pub(crate) struct Fixture {
    source: IdentitySource,
    sink: Sink,
    pub(crate) gw: Gateway,
    /// The gateway's certificate (DER), for channel bindings.
    cert_der: Vec<u8>,
}

/// [`start_with`] the users file: alice and bob, disabled dave.
fn start(tweak: impl FnOnce(Config) -> Config) -> Fixture {
    start_with(UsersFile, tweak)
}

pub(crate) fn start_with(source: IdentitySource, tweak: impl FnOnce(Config) -> Config) -> Fixture {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, pem) = test_cert(dir.path());
    let config = Config::new(&[sink.addr()])
        .tls(&cert, &key)
        .listener(
            "smtp",
            &[("tls", "starttls"), ("require_tls_for_auth", "false")],
        )
        .listener("smtps", &[("tls", "implicit")])
        .auth_for(source, dir.path());
    let gw = Gateway::start_in(dir, &tweak(config).yaml());
    Fixture {
        source,
        sink,
        gw,
        cert_der: pem_to_der(&pem),
    }
}

impl Fixture {
    fn smtp(&self) -> SocketAddr {
        self.gw.addr("smtp")
    }

    /// Greeted on `smtp`, no TLS.
    pub(crate) fn client(&self) -> Client {
        Client::greeted(self.smtp())
    }

    /// Greeted on `smtp`, after STARTTLS and a second EHLO.
    pub(crate) fn tls_client(&self) -> Client {
        let mut c = Client::greeted(self.smtp());
        c.starttls("localhost");
        c.ehlo("client.test").expect("250");
        c
    }

    /// Greeted on `smtps` (TLS from the first byte).
    fn smtps_client(&self) -> Client {
        let mut c = Client::implicit_tls(self.gw.addr("smtps"), "localhost");
        c.expect("220");
        c.ehlo("client.test").expect("250");
        c
    }

    fn users_file(&self) -> PathBuf {
        self.gw.dir().join("users.yaml")
    }

    /// Waits for the gateway to log a failed AUTH with this reason label.
    fn assert_failure_logged(&self, reason: &str) {
        self.gw
            .wait_for_event("authentication failed", TIMEOUT, |v| v["reason"] == reason);
    }

    /// The `reason` labels of every failed AUTH the gateway logged so far
    /// are exactly `reasons`, in order (waits for that many).
    pub(crate) fn assert_failures_logged(&self, reasons: &[&str]) {
        let logged = || -> Vec<String> {
            self.gw
                .log_events("authentication failed")
                .iter()
                .map(|v| v["reason"].as_str().unwrap_or("?").to_string())
                .collect()
        };
        wait_until(TIMEOUT, || logged().len() >= reasons.len());
        assert_eq!(logged(), reasons, "logs:\n{}", self.gw.logs().join("\n"));
    }

    /// The gateway's Received header of the message tagged `tag`, once the
    /// sink holds exactly `total` messages.
    pub(crate) fn received(&self, total: usize, tag: &str) -> String {
        let msgs = self.sink.wait_for_messages(total, TIMEOUT);
        let m = msgs
            .iter()
            .find(|m| m.mail_from() == format!("{tag}@client.test"))
            .unwrap_or_else(|| panic!("no message from {tag}@client.test: {msgs:#?}"));
        assert!(
            msgs.iter()
                .all(|m| m.rcpt_to().iter().all(|r| r.ends_with("@example.test"))),
            "something was relayed: {msgs:#?}"
        );
        m.first_received().expect("a Received header")
    }

    /// `DOMAIN\alice` as the gateway names her (logs).
    fn alice_display(&self) -> String {
        format!(
            "{}\\{}",
            self.source.netbios_domain(),
            self.source.alice().user
        )
    }

    /// Alice's AUTH NTLM on `c` succeeds (235), and a [`probe`] tagged
    /// `tag` then reaches the backend as the only message, hers, with
    /// `protocol`: the session is usable after whatever came before.
    fn ntlm_as_alice_then_probe(&self, c: &mut Client, tag: &str, protocol: &str) {
        ntlm::send_auth(
            c,
            &ntlm::creds(&self.source.alice()),
            ClientOptions::default(),
        );
        c.expect("235 2.7.0");
        probe(c, tag);
        self.assert_authenticated(&self.received(1, tag), protocol);
    }

    /// The session was alice's, and `protocol` (RFC 3848) says so. In the
    /// Received header the backslash is a quoted-pair inside the comment.
    fn assert_authenticated(&self, received: &str, protocol: &str) {
        let who = self.alice_display().replace('\\', "\\\\");
        assert!(
            received.contains(&format!("(authenticated as {who})")),
            "{received}"
        );
        assert!(
            received.contains(&format!("by {HOST} (RelayGuard) with {protocol} id ")),
            "{received}"
        );
    }
}

/// After an AUTH attempt: relaying is refused, and a message to a local
/// recipient is accepted, tagged with `tag` as its sender's local part.
pub(crate) fn probe(c: &mut Client, tag: &str) {
    c.mail(&format!("{tag}@client.test")).expect("250 2.1.0");
    c.rcpt("victim@ext.test").expect("550 5.7.1");
    c.rcpt("x@example.test").expect("250");
    c.data_body(&format!("Subject: {tag}\r\n\r\nprobe\r\n"))
        .expect("250");
    c.send("QUIT").expect("221");
}

pub(crate) fn assert_unauthenticated(received: &str) {
    assert!(
        !received.contains("authenticated")
            && !received.contains("ESMTPA ")
            && !received.contains("ESMTPSA "),
        "the session must not be authenticated: {received}"
    );
    assert!(
        received.contains(&format!("by {HOST} (RelayGuard) with ESMTP id "))
            || received.contains(&format!("by {HOST} (RelayGuard) with ESMTPS id ")),
        "{received}"
    );
}

fn output_text(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_success(tool: &str, out: &Output) {
    assert!(out.status.success(), "{tool} failed:\n{}", output_text(out));
}

fn body_file(gw: &Gateway, subject: &str) -> String {
    let path = gw.dir().join(format!("{subject}.eml"));
    write_file(&path, format!("Subject: {subject}\r\n\r\nHello.\r\n"));
    path.display().to_string()
}

// ---------------------------------------------------------------- every identity source

// The scenarios of `scenarios.rs` with the users file; `auth_ad.rs` has
// the same list with Active Directory.

#[test]
fn curl_ntlm_is_delivered_as_esmtpa() {
    scenarios::curl_ntlm_is_delivered_as_esmtpa(UsersFile);
}

#[test]
fn curl_ntlm_wrong_password_and_unknown_user_get_the_same_535() {
    scenarios::curl_ntlm_wrong_password_and_unknown_user_get_the_same_535(UsersFile);
}

#[test]
fn curl_ntlm_over_starttls_is_delivered_as_esmtpsa() {
    scenarios::curl_ntlm_over_starttls_is_delivered_as_esmtpsa(UsersFile);
}

#[test]
fn swaks_ntlm_v1_is_refused_by_default() {
    scenarios::swaks_ntlm_v1_is_refused_by_default(UsersFile);
}

#[test]
fn swaks_plain_and_login_over_starttls() {
    scenarios::swaks_plain_and_login_over_starttls(UsersFile);
}

#[test]
fn curl_plain_over_starttls() {
    scenarios::curl_plain_over_starttls(UsersFile);
}

#[test]
fn plain_and_login_accept_every_login_form() {
    scenarios::plain_and_login_accept_every_login_form(UsersFile);
}

#[test]
fn every_spelling_of_an_account_is_the_same_principal() {
    scenarios::every_spelling_of_an_account_is_the_same_principal(UsersFile);
}

#[test]
fn plain_and_login_refuse_bad_credentials() {
    scenarios::plain_and_login_refuse_bad_credentials(UsersFile);
}

#[test]
fn ntlm_with_the_negotiate_as_initial_response() {
    scenarios::ntlm_with_the_negotiate_as_initial_response(UsersFile);
}

#[test]
fn impacket_ntlmv2_succeeds() {
    scenarios::impacket_ntlmv2_succeeds(UsersFile);
}

#[test]
fn impacket_ntlmv1_is_refused() {
    scenarios::impacket_ntlmv1_is_refused(UsersFile);
}

#[test]
fn impacket_anonymous_is_refused() {
    scenarios::impacket_anonymous_is_refused(UsersFile);
}

#[test]
fn impacket_replayed_authenticate_in_a_new_session_is_refused() {
    scenarios::impacket_replayed_authenticate_in_a_new_session_is_refused(UsersFile);
}

#[test]
fn impacket_wrong_domain_is_refused() {
    scenarios::impacket_wrong_domain_is_refused(UsersFile);
}

#[test]
fn anonymous_lm_and_v1_responses_from_the_rust_client_are_refused() {
    scenarios::anonymous_lm_and_v1_responses_from_the_rust_client_are_refused(UsersFile);
}

#[test]
fn missing_mic_is_refused_when_required() {
    scenarios::missing_mic_is_refused_when_required(UsersFile);
}

#[test]
fn corrupted_mic_is_refused() {
    scenarios::corrupted_mic_is_refused(UsersFile);
}

#[test]
fn msv_av_flags_altered_in_transit_are_refused() {
    scenarios::msv_av_flags_altered_in_transit_are_refused(UsersFile);
}

#[test]
fn tampered_av_pairs_are_refused() {
    scenarios::tampered_av_pairs_are_refused(UsersFile);
}

#[test]
fn stale_ntlmv2_timestamp_is_refused() {
    scenarios::stale_ntlmv2_timestamp_is_refused(UsersFile);
}

#[test]
fn channel_binding_is_checked_over_implicit_tls_and_starttls() {
    scenarios::channel_binding_is_checked_over_implicit_tls_and_starttls(UsersFile);
}

#[test]
fn channel_binding_required_refuses_clients_without_one() {
    scenarios::channel_binding_required_refuses_clients_without_one(UsersFile);
}

#[test]
fn client_address_is_locked_out_after_max_failures() {
    scenarios::client_address_is_locked_out_after_max_failures(UsersFile);
}

#[test]
fn exchange_opened_before_a_client_lockout_is_refused_after_it() {
    scenarios::exchange_opened_before_a_client_lockout_is_refused_after_it(UsersFile);
}

#[test]
fn account_is_locked_out_per_address_after_max_failures() {
    scenarios::account_is_locked_out_per_address_after_max_failures(UsersFile);
}

#[test]
fn account_lockout_covers_every_spelling_of_the_domain() {
    scenarios::account_lockout_covers_every_spelling_of_the_domain(UsersFile);
}

#[test]
fn failure_delay_is_the_same_for_wrong_password_and_unknown_user() {
    scenarios::failure_delay_is_the_same_for_wrong_password_and_unknown_user(UsersFile);
}

#[test]
fn disabled_account_is_refused_with_the_same_535() {
    scenarios::disabled_account_is_refused_with_the_same_535(UsersFile);
}

// ---------------------------------------------------------------- curl

/// curl's `AUTH NTLM`, over plain SMTP or (`tls`) after STARTTLS.
fn curl_ntlm(f: &Fixture, login: &str, tls: bool) -> Output {
    curl_auth(f, "NTLM", login, tls)
}

/// curl sending one message to x@example.test with `AUTH mechanism` as
/// `login` (`DOMAIN\user:password`), over plain SMTP or (`tls`) after
/// STARTTLS; the message's subject is `curl-<mechanism>`.
fn curl_auth(f: &Fixture, mechanism: &str, login: &str, tls: bool) -> Output {
    let body = body_file(&f.gw, &format!("curl-{}", mechanism.to_lowercase()));
    let mut args: Vec<String> = vec!["-v".into(), "--max-time".into(), "30".into()];
    if tls {
        args.extend(["--ssl-reqd".into(), "-k".into()]);
    }
    args.extend([
        format!("smtp://{}/client.test", f.smtp()),
        "--login-options".into(),
        format!("AUTH={mechanism}"),
        "-u".into(),
        login.into(),
        "--mail-from".into(),
        "curl@client.test".into(),
        "--mail-rcpt".into(),
        "x@example.test".into(),
        "--upload-file".into(),
        body,
    ]);
    curl(&args)
}

// ---------------------------------------------------------------- swaks

fn swaks_auth(f: &Fixture, extra: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "--server",
        &f.smtp().to_string(),
        "--helo",
        "client.test",
        "--from",
        "swaks@client.test",
        "--to",
        "x@example.test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    swaks(&args)
}

/// swaks' `AUTH NTLM` (always NTLMv1 + LM) as `a`.
fn swaks_ntlm(a: &Account) -> Vec<String> {
    [
        "--auth",
        "NTLM",
        "--auth-user",
        a.user,
        "--auth-password",
        a.password,
        "--auth-extra",
        &format!("domain={}", a.domain),
    ]
    .map(str::to_string)
    .to_vec()
}

#[test]
fn swaks_ntlm_v1_is_accepted_when_allowed_and_logged_as_weak() {
    let f = start(|c| c.set("auth.ntlm.allow_ntlmv1", "true"));
    let args = swaks_ntlm(&ALICE);
    let out = swaks_auth(&f, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_success("swaks", &out);
    assert!(
        output_text(&out).contains("235 2.7.0 Authentication successful"),
        "{}",
        output_text(&out)
    );
    let received = f.received(1, "swaks");
    f.assert_authenticated(&received, "ESMTPA");
    let weak = f.gw.wait_for_event(
        "weak NTLMv1 authentication accepted (allow_ntlmv1)",
        TIMEOUT,
        |_| true,
    );
    assert_eq!(weak["user"], "alice", "{weak}");
    assert_eq!(weak["level"], "WARN", "{weak}");
    let ev = f.gw.wait_for_event("authenticated", TIMEOUT, |_| true);
    assert_eq!(ev["ntlm"], "ntlmv1", "{ev}");
}

// ---------------------------------------------------------------- curl PLAIN

/// curl's `AUTH PLAIN`, after STARTTLS.
fn curl_plain(f: &Fixture, login: &str) -> Output {
    curl_auth(f, "PLAIN", login, true)
}

// ---------------------------------------------------------------- PLAIN / LOGIN on the raw client

fn plain_response(authcid: &str, password: &str) -> String {
    ntlm::b64(format!("\0{authcid}\0{password}").as_bytes())
}

/// `AUTH PLAIN` with the credentials as initial response.
pub(crate) fn send_plain<'a>(c: &'a mut Client, login: &str, password: &str) -> &'a mut Client {
    c.send(&format!("AUTH PLAIN {}", plain_response(login, password)))
}

fn auth_lines(ehlo: &relayguard_e2e::Reply) -> Vec<String> {
    ehlo.lines
        .iter()
        .filter_map(|l| l.get(4..))
        .filter(|t| t.starts_with("AUTH"))
        .map(str::to_string)
        .collect()
}

#[test]
fn ehlo_offers_ntlm_before_tls_and_everything_after() {
    let f = start(|c| c);
    let mut c = Client::connect(f.smtp());
    c.expect("220");
    let before = c.ehlo("client.test").expect("250");
    assert_eq!(auth_lines(&before), ["AUTH NTLM"], "{before:?}");
    c.starttls("localhost");
    let after = c.ehlo("client.test").expect("250");
    assert_eq!(auth_lines(&after), ["AUTH NTLM LOGIN PLAIN"], "{after:?}");
    send_plain(&mut c, "alice", "alice-pass").expect("235 2.7.0");
    // Once authenticated, AUTH is no longer offered.
    let again = c.ehlo("client.test").expect("250");
    assert!(auth_lines(&again).is_empty(), "{again:?}");
}

#[test]
fn plain_and_login_are_refused_before_starttls() {
    let f = start(|c| c);
    let mut c = f.client();
    send_plain(&mut c, "alice", "alice-pass").expect("538 5.7.11");
    c.send("AUTH PLAIN").expect("538 5.7.11");
    c.send("AUTH LOGIN").expect("538 5.7.11");
    c.send("NOOP").expect("250");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

#[test]
fn auth_before_starttls_is_refused_when_the_listener_requires_tls() {
    let f = start(|c| c.listener("smtp", &[("tls", "starttls")]));
    let mut c = Client::connect(f.smtp());
    c.expect("220");
    let before = c.ehlo("client.test").expect("250");
    assert!(auth_lines(&before).is_empty(), "{before:?}");
    c.send("AUTH NTLM").expect("530 5.7.0");
    send_plain(&mut c, "alice", "alice-pass").expect("530 5.7.0");
    c.send("AUTH LOGIN").expect("530 5.7.0");
    c.starttls("localhost");
    let after = c.ehlo("client.test").expect("250");
    assert_eq!(auth_lines(&after), ["AUTH NTLM LOGIN PLAIN"], "{after:?}");
    f.ntlm_as_alice_then_probe(&mut c, "tls", "ESMTPSA");
}

// ---------------------------------------------------------------- AUTH NTLM framing

#[test]
fn ntlm_exchange_step_by_step() {
    use policy::ntlm::message::{flags, ChallengeMessage};
    let f = start(|c| c);
    let mut c = f.client();
    let mut hs = ntlm::ClientHandshake::new(ntlm::creds(&ALICE), *b"e2e-cc01", None);
    c.send("AUTH NTLM").expect("334 NTLM supported");
    c.send(&ntlm::b64(&hs.negotiate()));
    let r = c.expect("334 ");
    let challenge = ntlm::unb64(&r.first()[4..]);
    let msg = ChallengeMessage::parse(&challenge).expect("a CHALLENGE message");
    assert_ne!(
        msg.flags & flags::NEGOTIATE_EXTENDED_SESSIONSECURITY,
        0,
        "ESS, or curl falls back to NTLMv1"
    );
    assert_ne!(msg.flags & flags::NEGOTIATE_TARGET_INFO, 0);
    let ids: Vec<u16> = msg.av_pairs().unwrap().iter().map(|p| p.id).collect();
    assert!(ids.contains(&av_id::TIMESTAMP), "{ids:?}");
    c.send(&ntlm::b64(&hs.authenticate(&challenge).unwrap()))
        .expect("235 2.7.0 Authentication successful");

    // Every AUTH gets its own random challenge.
    let mut other = f.client();
    let mut hs2 = ntlm::ClientHandshake::new(ntlm::creds(&ALICE), *b"e2e-cc02", None);
    let challenge2 = ntlm::challenge(&mut other, &hs2.negotiate(), false);
    let msg2 = ChallengeMessage::parse(&challenge2).unwrap();
    assert_ne!(msg.server_challenge, msg2.server_challenge);
    other.send("*").expect("501 5.7.0");

    probe(&mut c, "ntlm");
    f.assert_authenticated(&f.received(1, "ntlm"), "ESMTPA");
}

#[test]
fn star_cancels_and_the_session_goes_on() {
    let f = start(|c| c);
    let mut c = f.client();
    c.send("AUTH NTLM").expect("334 NTLM supported");
    c.send("*").expect("501 5.7.0 Authentication cancelled");
    let mut hs = ntlm::ClientHandshake::new(ntlm::creds(&ALICE), *b"e2e-cc03", None);
    ntlm::challenge(&mut c, &hs.negotiate(), false);
    c.send("*").expect("501 5.7.0 Authentication cancelled");
    c.send("NOOP").expect("250");
    f.ntlm_as_alice_then_probe(&mut c, "cancel", "ESMTPA");
}

#[test]
fn invalid_base64_and_malformed_ntlmssp_get_501_and_the_session_goes_on() {
    let f = start(|c| c);
    let mut c = f.client();
    c.send("AUTH NTLM").expect("334 NTLM supported");
    c.send("!!not base64!!")
        .expect("501 5.5.2 Malformed authentication data");
    c.send("NOOP").expect("250");
    // Not NTLMSSP at all.
    c.send(&format!("AUTH NTLM {}", ntlm::b64(b"hello, world")))
        .expect("501 5.5.2");
    // A NEGOTIATE cut short.
    let mut hs = ntlm::ClientHandshake::new(ntlm::creds(&ALICE), *b"e2e-cc04", None);
    let negotiate = hs.negotiate();
    c.send(&format!("AUTH NTLM {}", ntlm::b64(&negotiate[..14])))
        .expect("501 5.5.2");
    // An AUTHENTICATE where the NEGOTIATE belongs.
    let mut hs = ntlm::ClientHandshake::new(ntlm::creds(&ALICE), *b"e2e-cc05", None);
    let chal = ntlm::challenge(&mut c, &hs.negotiate(), false);
    let auth = hs.authenticate(&chal).unwrap();
    c.send("*").expect("501 5.7.0");
    c.send(&format!("AUTH NTLM {}", ntlm::b64(&auth)))
        .expect("501 5.5.2");
    c.send("NOOP").expect("250");
    f.ntlm_as_alice_then_probe(&mut c, "after", "ESMTPA");
}

#[test]
fn auth_twice_or_during_a_transaction_gets_503() {
    let f = start(|c| c);
    let mut c = Client::connect(f.smtp());
    c.expect("220");
    c.send("AUTH NTLM").expect("503 5.5.1");
    c.ehlo("client.test").expect("250");
    c.mail("alice@client.test").expect("250");
    c.send("AUTH NTLM")
        .expect("503 5.5.1 Not allowed during a mail transaction");
    c.send("RSET").expect("250");
    ntlm::send_auth(&mut c, &ntlm::creds(&ALICE), ClientOptions::default());
    c.expect("235 2.7.0");
    c.send("AUTH NTLM")
        .expect("503 5.5.1 Already authenticated");
    c.send(&format!("AUTH NTLM {}", ntlm::b64(b"NTLMSSP\0")))
        .expect("503 5.5.1 Already authenticated");
    probe(&mut c, "twice");
    f.assert_authenticated(&f.received(1, "twice"), "ESMTPA");
}

#[test]
fn unknown_mechanism_gets_504() {
    let f = start(|c| c);
    let mut c = f.client();
    c.send("AUTH CRAM-MD5")
        .expect("504 5.5.4 Unrecognized authentication mechanism");
    c.send("AUTH GSSAPI").expect("504 5.5.4");
    c.send("AUTH XOAUTH2 dXNlcj1hbGljZQ==").expect("504 5.5.4");
    c.send("NOOP").expect("250");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

// ---------------------------------------------------------------- hostile NTLM clients (policy's client)

fn no_mic() -> ClientOptions {
    ClientOptions {
        mic: false,
        ..ClientOptions::default()
    }
}

/// A client that says "no MIC here" in MsvAvFlags but keeps the layout.
fn clear_msv_av_flags(pairs: &mut Vec<AvPair>) {
    pairs.retain(|p| p.id != av_id::FLAGS);
    pairs.push(AvPair::new(av_id::FLAGS, 0u32.to_le_bytes()));
}

fn rename_server(pairs: &mut Vec<AvPair>) {
    pairs.retain(|p| p.id != av_id::NB_COMPUTER_NAME);
    pairs.push(AvPair::name(av_id::NB_COMPUTER_NAME, "EVILRELAY"));
}

fn drop_timestamp(pairs: &mut Vec<AvPair>) {
    pairs.retain(|p| p.id != av_id::TIMESTAMP);
}

#[test]
fn truncated_and_oversized_messages_are_refused_and_the_session_goes_on() {
    let f = start(|c| c);
    let mut c = f.client();
    ntlm::send_auth_tampered(
        &mut c,
        &ntlm::creds(&ALICE),
        ClientOptions::default(),
        |m| m[..m.len() / 2].to_vec(),
    );
    c.expect("501 5.5.2 Malformed authentication data");
    ntlm::send_auth_tampered(
        &mut c,
        &ntlm::creds(&ALICE),
        ClientOptions::default(),
        |m| m[..40].to_vec(),
    );
    c.expect("501 5.5.2");
    c.send("NOOP").expect("250");

    // Over the 12288-byte line limit of RFC 4954, as the AUTHENTICATE…
    let mut hs = ntlm::ClientHandshake::new(ntlm::creds(&ALICE), *b"e2e-cc06", None);
    let chal = ntlm::challenge(&mut c, &hs.negotiate(), false);
    let mut auth = hs.authenticate(&chal).unwrap();
    auth.resize(10_000, b'A');
    let line = ntlm::b64(&auth);
    assert!(line.len() > 12_288);
    c.send(&line).expect("500 5.5.2 Line too long");
    c.send("NOOP").expect("250");
    // …and as an initial response.
    c.send(&format!("AUTH NTLM {line}")).expect("500 5.5.2");
    c.send("NOOP").expect("250");
    probe(&mut c, "probe");
    assert_unauthenticated(&f.received(1, "probe"));
}

/// Now minus `ago`, as a Windows FILETIME (100 ns since 1601).
fn filetime_ago(ago: Duration) -> u64 {
    policy::ntlm::message::filetime(std::time::SystemTime::now() - ago)
}

// ---------------------------------------------------------------- channel binding

fn bound_to(end_point: Vec<u8>) -> ClientOptions {
    ClientOptions {
        channel_binding: Some(end_point),
        ..ClientOptions::default()
    }
}

/// The tls-server-end-point of a certificate a man in the middle would
/// present.
fn other_end_point() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, pem) = test_cert(dir.path());
    policy::ntlm::tls_server_end_point(&pem_to_der(&pem)).unwrap()
}

#[test]
fn channel_binding_follows_the_certificate_the_session_saw() {
    let f = start(|c| c);
    let before = policy::ntlm::tls_server_end_point(&f.cert_der).expect("end point");
    let mut old = f.smtps_client();
    // The certificate is renewed while that session is open.
    let (_, _, pem) = test_cert(f.gw.dir());
    let after = policy::ntlm::tls_server_end_point(&pem_to_der(&pem)).expect("end point");
    let reloads = count_events(&f.gw, "users file reloaded");
    f.gw.signal("HUP");
    // SIGHUP reloads the certificates first, then the users file.
    wait_for_more_events(&f.gw, "users file reloaded", reloads, TIMEOUT);
    let mut new = f.smtps_client();
    ntlm::send_auth(&mut new, &ntlm::creds(&ALICE), bound_to(after));
    new.expect("235 2.7.0");
    // The old session is still bound to the certificate it was shown.
    ntlm::send_auth(&mut old, &ntlm::creds(&ALICE), bound_to(before));
    old.expect("235 2.7.0");
}

// ---------------------------------------------------------------- brute-force protection

pub(crate) fn wrong_ntlm(c: &mut Client, account: &Account) {
    let creds = ntlm::creds_for(account.domain, account.user, "wrong-pass");
    ntlm::send_auth(c, &creds, ClientOptions::default());
    c.expect("535 5.7.3 Authentication unsuccessful");
}

#[test]
fn zero_lockout_thresholds_are_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.yaml");
    write_users_file(&users, &[ALICE]);
    for key in ["max_failures_per_client", "max_failures_per_account"] {
        let yaml = Config::new(&["127.0.0.1:25".parse().unwrap()])
            .auth(&users)
            .set(&format!("auth.lockout.{key}"), "0")
            .yaml();
        let out = Gateway::check_in(dir.path(), &yaml);
        let text = output_text(&out);
        assert!(!out.status.success(), "{key}: 0 accepted:\n{text}");
        assert!(text.contains(key), "names the field: {text}");
    }
}

/// Time from the last line of an attempt to its reply.
fn timed(c: &mut Client, expect: &str, send: impl FnOnce(&mut Client)) -> Duration {
    send(c);
    let t0 = Instant::now();
    c.expect(expect);
    t0.elapsed()
}

// ---------------------------------------------------------------- users file

/// Counts the log events with this message so far.
fn count_events(gw: &Gateway, message: &str) -> usize {
    gw.log_events(message).len()
}

/// Waits until there are more than `before` events with this message.
fn wait_for_more_events(gw: &Gateway, message: &str, before: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while count_events(gw, message) <= before {
        assert!(
            Instant::now() < deadline,
            "no new {message:?} log event within {timeout:?}; logs:\n{}",
            gw.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn carol_ntlm(f: &Fixture, expect: &str) {
    let mut c = f.client();
    ntlm::send_auth(&mut c, &ntlm::creds(&CAROL), ClientOptions::default());
    c.expect(expect);
}

#[test]
fn users_file_changes_are_picked_up_without_a_signal() {
    let f = start(|c| c);
    carol_ntlm(&f, "535 5.7.3");
    write_users_file(&f.users_file(), &[ALICE, BOB, CAROL]);
    // The gateway looks every 5 s.
    wait_for_more_events(&f.gw, "users file reloaded", 0, Duration::from_secs(8));
    carol_ntlm(&f, "235 2.7.0");
}

#[test]
fn sighup_reloads_the_users_file_and_an_invalid_file_is_refused() {
    let f = start(|c| c);
    write_file(
        &f.users_file(),
        "users:\n  - user: carol\n    domain: DEMO\n    nt_hash: not-a-hash\n",
    );
    let errors = count_events(
        &f.gw,
        "users file reload refused; the previous accounts stay",
    );
    f.gw.signal("HUP");
    wait_for_more_events(
        &f.gw,
        "users file reload refused; the previous accounts stay",
        errors,
        TIMEOUT,
    );
    let refused =
        f.gw.log_events("users file reload refused; the previous accounts stay");
    let error = refused.last().unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("users.yaml"), "names the file: {error}");
    assert!(error.contains("nt_hash"), "names the field: {error}");
    // The accounts in force stay.
    let mut c = f.client();
    ntlm::send_auth(&mut c, &ntlm::creds(&ALICE), ClientOptions::default());
    c.expect("235 2.7.0");
    carol_ntlm(&f, "535 5.7.3");

    let reloads = count_events(&f.gw, "users file reloaded");
    write_users_file(&f.users_file(), &[ALICE, CAROL]);
    f.gw.signal("HUP");
    wait_for_more_events(&f.gw, "users file reloaded", reloads, TIMEOUT);
    carol_ntlm(&f, "235 2.7.0");
    let mut c = f.client();
    ntlm::send_auth(&mut c, &ntlm::creds(&BOB), ClientOptions::default());
    c.expect("535 5.7.3");
}

#[test]
fn hash_password_prints_the_nt_hash() {
    for stdin in [&b"Password\n"[..], b"Password", b"Password\r\n"] {
        let out = run_hash_password(stdin);
        assert!(out.status.success(), "{}", output_text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a4f49c406510bdcab6824ee7c30fd852\n",
            "stdin {stdin:?}"
        );
    }
    let empty = run_hash_password(b"\n");
    assert!(!empty.status.success(), "{}", output_text(&empty));
}

// ---------------------------------------------------------------- what a scanner learns

#[test]
fn nmap_smtp_ntlm_info_shows_only_the_configured_names() {
    let f = start(|c| {
        c.set("auth.ntlm.dns_tree", "forest.demo.test")
            .set("auth.ntlm.send_version", "false")
    });
    // `+` runs the script although nmap does not know the port as SMTP.
    let out = nmap(&[
        "-n",
        "-Pn",
        "-p",
        &f.smtp().port().to_string(),
        "--script",
        "+smtp-ntlm-info",
        "127.0.0.1",
    ]);
    assert_success("nmap", &out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("| smtp-ntlm-info:"))
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_start_matches(['|', '_']).trim())
        .collect();
    assert_eq!(
        lines,
        [
            "Target_Name: DEMO",
            "NetBIOS_Domain_Name: DEMO",
            "NetBIOS_Computer_Name: RELAYGUARD",
            "DNS_Domain_Name: demo.test",
            "DNS_Computer_Name: relayguard.demo.test",
            "DNS_Tree_Name: forest.demo.test",
        ],
        "{text}"
    );
    // The scan authenticated nobody and delivered nothing.
    barrier(&f.gw, &f.sink, 1);
}
