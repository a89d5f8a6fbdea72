//! The decision table, loader errors, analysis warnings, explanations and
//! the size benchmark.

use std::net::IpAddr;
use std::time::Duration;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::identity::CredentialStore;

const POLICY: &str = r#"
local_domains:
  - example.test
  - "*.corp.example.test"
  - bücher.test
  - coop.test

listeners:
  submission:
    require_auth: true

sender_binding:
  senders: [directory]
  allow_null_sender: false
  check_header_from: true

rates:
  - { per: principal, window: 1m, messages: 5 }

rules:
  - name: alice-anywhere
    users: ['DEMO\alice']
    recipient_domains: ["*"]
    senders: [directory, "{user}@example.test"]

  - name: helpdesk-shared
    groups: [helpdesk]
    recipient_domains: ["*"]
    senders: [directory, helpdesk@example.test]
    max_recipients: 3

  - name: partners-only
    users: [carol]
    recipient_domains: [partner.test, "*.partner.test"]
    max_message_size: 10 MiB

  - name: ntlm-tls-submission
    users: ['DEMO\dave']
    mechanisms: [ntlm]
    tls: true
    listeners: [submission]
    recipient_domains: ["*"]

  - name: office-net
    users: ['DEMO\erin']
    networks: [10.1.0.0/16, "2001:db8:1::/48"]
    recipient_domains: ["*"]
    allow_address_literals: true
    allow_null_sender: true

  - name: bulk
    users: ['DEMO\frank']
    recipient_domains: ["*"]
    senders: ["*@example.test"]
    rates:
      - { per: principal, window: 1h, messages: 2, recipients: 3 }

  - name: anyone-to-partner
    users: ["*"]
    recipient_domains: [partner.test]

trusted_networks:
  - name: scanner
    networks: [10.9.0.0/24]
    recipient_domains: [internal.test]
    senders: ["*@example.test"]
    rates:
      - { per: client, window: 10m, recipients: 2 }

  - name: app-servers
    networks: [192.0.2.0/28]
    recipient_domains: ["*"]
    allow_null_sender: true
    max_recipients: 2
"#;

fn known() -> KnownPrincipals {
    let mut k = KnownPrincipals::default();
    for u in [
        "demo\\alice",
        "alice",
        "demo\\dave",
        "dave",
        "demo\\erin",
        "erin",
        "demo\\frank",
        "frank",
        "other\\carol",
        "carol",
    ] {
        k.users.insert(u.into());
    }
    k.groups.insert("helpdesk".into());
    k.groups.insert("staff".into());
    k
}

fn policy() -> Policy {
    Policy::from_yaml(POLICY, "policy.yaml", Some(&known())).unwrap()
}

fn principal(name: &str) -> Principal {
    let (domain, user) = name.split_once('\\').unwrap();
    let mut p = Principal {
        user: user.into(),
        domain: domain.into(),
        groups: vec!["staff".into()],
        mechanism: Mechanism::Ntlm,
        addresses: vec![format!("{user}@example.test")],
    };
    match user {
        // Only a proxyAddress; `alice@example.test` comes from the rule's
        // `{user}@example.test` template.
        "alice" => {
            p.addresses = vec![
                "SMTP:alice.smith@example.test".into(),
                "X500:/o=Demo/cn=alice".into(),
            ]
        }
        "helen" => p.groups.push("HelpDesk".into()),
        "carol" => p.groups.clear(),
        _ => {}
    }
    p
}

#[derive(Debug, Clone)]
enum Op {
    Mail(&'static str),
    Rcpt {
        from: &'static str,
        to: &'static str,
        index: usize,
    },
    Advance(u64),
}

#[derive(Debug, Clone)]
struct Row {
    who: Option<&'static str>,
    mechanism: Option<Mechanism>,
    ip: &'static str,
    listener: &'static str,
    tls: bool,
    op: Op,
    want: &'static str,
}

impl Row {
    fn on(mut self, listener: &'static str) -> Self {
        self.listener = listener;
        self
    }
    fn tls(mut self) -> Self {
        self.tls = true;
        self
    }
    fn client(mut self, ip: &'static str) -> Self {
        self.ip = ip;
        self
    }
    fn mech(mut self, m: Mechanism) -> Self {
        self.mechanism = Some(m);
        self
    }
    fn index(mut self, i: usize) -> Self {
        if let Op::Rcpt { index, .. } = &mut self.op {
            *index = i;
        }
        self
    }
}

const INTERNET: &str = "203.0.113.5";

fn row(who: Option<&'static str>, op: Op, want: &'static str) -> Row {
    Row {
        who,
        mechanism: None,
        ip: INTERNET,
        listener: "smtp",
        tls: false,
        op,
        want,
    }
}

/// RCPT TO by an unauthenticated client.
fn anon(from: &'static str, to: &'static str, want: &'static str) -> Row {
    row(None, Op::Rcpt { from, to, index: 0 }, want)
}

/// RCPT TO by an authenticated principal (`DOMAIN\user`).
fn auth(who: &'static str, from: &'static str, to: &'static str, want: &'static str) -> Row {
    row(Some(who), Op::Rcpt { from, to, index: 0 }, want)
}

/// MAIL FROM.
fn mail(who: Option<&'static str>, from: &'static str, want: &'static str) -> Row {
    row(who, Op::Mail(from), want)
}

fn advance(secs: u64) -> Row {
    row(None, Op::Advance(secs), "")
}

fn rcpt_summary(d: &RcptDecision) -> String {
    match d {
        RcptDecision::AcceptLocal { .. } => "local".into(),
        RcptDecision::AcceptRelay { rule, .. } => format!("relay {rule}"),
        RcptDecision::Deny(r) => refusal_summary(r),
        RcptDecision::RateLimited { rule, .. } => {
            format!("451 4.7.1 rate_limited {}", rule.as_deref().unwrap_or("-"))
        }
    }
}

fn sender_summary(d: &SenderDecision) -> String {
    match d {
        SenderDecision::Accept => "250".into(),
        SenderDecision::Deny(r) => refusal_summary(r),
        SenderDecision::RateLimited { rule, .. } => {
            format!("451 4.7.1 rate_limited {}", rule.as_deref().unwrap_or("-"))
        }
    }
}

fn refusal_summary(r: &Refusal) -> String {
    let (a, b, c) = r.enhanced;
    format!("{} {a}.{b}.{c} {}", r.code, r.reason)
}

const ALICE: &str = "DEMO\\alice";
const BOB: &str = "DEMO\\bob";
const HELEN: &str = "DEMO\\helen";
const CAROL: &str = "OTHER\\carol";
const DAVE: &str = "DEMO\\dave";
const ERIN: &str = "DEMO\\erin";
const FRANK: &str = "DEMO\\frank";
const GINA: &str = "DEMO\\gina";

fn table() -> Vec<Row> {
    let mut rows = vec![
        // --- local domains, unauthenticated -------------------------------
        anon("x@ext.test", "bob@example.test", "local"),
        anon("x@ext.test", "BOB@EXAMPLE.TEST", "local"),
        anon("x@ext.test", "a@hr.corp.example.test", "local"),
        anon(
            "x@ext.test",
            "a@corp.example.test",
            "550 5.7.1 relay_denied",
        ),
        anon("x@ext.test", "a@bücher.test", "local"),
        anon("x@ext.test", "a@xn--bcher-kva.test", "local"),
        anon(
            "x@ext.test",
            "a@example.test.ext.test",
            "550 5.7.1 relay_denied",
        ),
        anon("x@ext.test", "PostMaster", "local"),
        anon("", "bob@example.test", "local"),
        // --- default deny for unauthenticated relaying ----------------------
        anon("x@ext.test", "x@ext.test", "550 5.7.1 relay_denied"),
        anon("bob@example.test", "x@ext.test", "550 5.7.1 relay_denied"),
        // --- relay tricks ---------------------------------------------------
        anon(
            "x@ext.test",
            "user%ext.test@example.test",
            "550 5.7.1 relay_denied",
        ),
        anon(
            "x@ext.test",
            "user%EXT.test%example.test@example.test",
            "550 5.7.1 relay_denied",
        ),
        anon(
            "x@ext.test",
            "ext.test!user@example.test",
            "550 5.7.1 relay_denied",
        ),
        anon(
            "x@ext.test",
            "@example.test:user@ext.test",
            "550 5.7.1 relay_denied",
        ),
        anon(
            "x@ext.test",
            "@ext.test,@[192.0.2.1]:user@example.test",
            "local",
        ),
        anon(
            "x@ext.test",
            "\"user@ext.test\"@example.test",
            "550 5.7.1 relay_denied",
        ),
        anon(
            "x@ext.test",
            "\"user%ext.test\"@example.test",
            "550 5.7.1 relay_denied",
        ),
        anon("x@ext.test", "\"john smith\"@example.test", "local"),
        anon(
            "x@ext.test",
            "user@ext.test@example.test",
            "501 5.1.3 syntax",
        ),
        anon("x@ext.test", "user@[192.0.2.1]", "550 5.7.1 relay_denied"),
        anon(
            "x@ext.test",
            "user@[IPv6:2001:db8::1]",
            "550 5.7.1 relay_denied",
        ),
        anon(
            "x@ext.test",
            "user@[IPv6:::ffff:10.9.0.1]",
            "550 5.7.1 relay_denied",
        ),
        anon("x@ext.test", "user@192.0.2.1", "501 5.1.3 syntax"),
        anon("x@ext.test", "user@example.test.", "501 5.1.3 syntax"),
        anon("x@ext.test", "user", "501 5.1.3 syntax"),
        anon("x@ext.test", "user@", "501 5.1.3 syntax"),
        anon("x@ext.test", "user@ex\u{0430}mple.test", "553 5.1.3 idn"),
        anon("x@ext.test", "user@ｅｘａｍｐｌｅ.test", "553 5.1.3 idn"),
        anon(
            "x@ext.test",
            "user@\u{0441}\u{043e}\u{043e}\u{0440}.test",
            "553 5.7.1 lookalike",
        ),
        anon("x@ext.test", "wow!@example.test", "553 5.7.1 routing"),
        anon("x@ext.test", "ü@example.test", "553 5.6.7 non_ascii"),
        anon("x@ext.test", "", "501 5.1.3 syntax"),
        // --- MAIL FROM, unauthenticated -------------------------------------
        mail(None, "anyone@ext.test", "250"),
        mail(None, "", "250"),
        mail(None, "a@b@c.test", "501 5.1.7 syntax"),
        mail(None, "x@ext.test", "530 5.7.0 auth_required").on("submission"),
        anon("x@ext.test", "bob@example.test", "530 5.7.0 auth_required").on("submission"),
        // --- authenticated and permitted ------------------------------------
        auth(
            ALICE,
            "alice@example.test",
            "x@ext.test",
            "relay alice-anywhere",
        ),
        auth(
            ALICE,
            "alice.smith@example.test",
            "x@ext.test",
            "relay alice-anywhere",
        ),
        mail(Some(ALICE), "alice@example.test", "250"),
        mail(Some(ALICE), "Alice@Example.TEST", "250"),
        mail(Some(ALICE), "alice.smith@example.test", "250"),
        mail(Some(ALICE), "bob@example.test", "553 5.7.1 sender_mismatch"),
        mail(Some(ALICE), "", "553 5.7.1 null_sender"),
        auth(
            ALICE,
            "bob@example.test",
            "x@ext.test",
            "553 5.7.1 sender_mismatch",
        ),
        auth(
            ALICE,
            "alice@example.test",
            "x@[192.0.2.1]",
            "550 5.7.1 address_literal",
        ),
        auth(
            ALICE,
            "alice@example.test",
            "x%ext.test@example.test",
            "relay alice-anywhere",
        ),
        // --- authenticated but not permitted: the MS02-011 case -------------
        auth(
            BOB,
            "bob@example.test",
            "x@ext.test",
            "550 5.7.1 relay_not_permitted",
        ),
        auth(BOB, "bob@example.test", "alice@example.test", "local"),
        mail(Some(BOB), "bob@example.test", "250"),
        mail(Some(BOB), "alice@example.test", "553 5.7.1 sender_mismatch"),
        auth(
            BOB,
            "alice@example.test",
            "alice@example.test",
            "553 5.7.1 sender_mismatch",
        ),
        auth(
            BOB,
            "bob@example.test",
            "x@ext.test",
            "550 5.7.1 relay_not_permitted",
        )
        .mech(Mechanism::Plain)
        .on("submission")
        .tls(),
        auth(
            BOB,
            "bob@example.test",
            "x@ext.test",
            "550 5.7.1 relay_not_permitted",
        )
        .mech(Mechanism::Login)
        .client("10.1.2.3"),
        auth(
            BOB,
            "bob@example.test",
            "x%ext.test@example.test",
            "550 5.7.1 relay_not_permitted",
        ),
        auth(
            BOB,
            "bob@example.test",
            "ext.test!x@example.test",
            "550 5.7.1 relay_not_permitted",
        ),
        auth(
            BOB,
            "bob@example.test",
            "@example.test:x@ext.test",
            "550 5.7.1 relay_not_permitted",
        ),
        auth(
            BOB,
            "bob@example.test",
            "x@[192.0.2.1]",
            "550 5.7.1 relay_not_permitted",
        ),
        auth(
            BOB,
            "bob@example.test",
            "x@partner.test",
            "relay anyone-to-partner",
        ),
        auth(
            BOB,
            "bob@example.test",
            "x@sub.partner.test",
            "550 5.7.1 relay_not_permitted",
        ),
        auth(BOB, "bob@example.test", "bob@example.test", "local").on("submission"),
        // --- groups and shared mailboxes ------------------------------------
        auth(
            HELEN,
            "helpdesk@example.test",
            "x@ext.test",
            "relay helpdesk-shared",
        ),
        mail(Some(HELEN), "helpdesk@example.test", "250"),
        mail(
            Some(BOB),
            "helpdesk@example.test",
            "553 5.7.1 sender_mismatch",
        ),
        auth(
            HELEN,
            "helen@example.test",
            "x@ext.test",
            "relay helpdesk-shared",
        )
        .index(2),
        auth(
            HELEN,
            "helen@example.test",
            "x@ext.test",
            "452 4.5.3 too_many_recipients",
        )
        .index(3),
        // --- bare user names, recipient patterns ----------------------------
        auth(
            CAROL,
            "carol@example.test",
            "a@partner.test",
            "relay partners-only",
        ),
        auth(
            CAROL,
            "carol@example.test",
            "a@x.partner.test",
            "relay partners-only",
        ),
        auth(
            CAROL,
            "carol@example.test",
            "a@ext.test",
            "550 5.7.1 relay_not_permitted",
        ),
        // --- mechanism, TLS and listener conditions -------------------------
        auth(
            DAVE,
            "dave@example.test",
            "x@ext.test",
            "relay ntlm-tls-submission",
        )
        .on("submission")
        .tls(),
        auth(
            DAVE,
            "dave@example.test",
            "x@ext.test",
            "550 5.7.1 relay_not_permitted",
        )
        .on("submission")
        .tls()
        .mech(Mechanism::Plain),
        auth(
            DAVE,
            "dave@example.test",
            "x@ext.test",
            "550 5.7.1 relay_not_permitted",
        )
        .on("submission"),
        auth(
            DAVE,
            "dave@example.test",
            "x@ext.test",
            "550 5.7.1 relay_not_permitted",
        )
        .tls(),
        // --- client networks, literals, null sender -------------------------
        auth(ERIN, "erin@example.test", "x@ext.test", "relay office-net").client("10.1.2.3"),
        auth(
            ERIN,
            "erin@example.test",
            "x@ext.test",
            "550 5.7.1 relay_not_permitted",
        )
        .client("10.2.0.1"),
        auth(ERIN, "erin@example.test", "x@ext.test", "relay office-net").client("::ffff:10.1.2.3"),
        auth(ERIN, "erin@example.test", "x@ext.test", "relay office-net").client("2001:db8:1::5"),
        auth(
            ERIN,
            "erin@example.test",
            "x@[192.0.2.1]",
            "relay office-net",
        )
        .client("10.1.2.3"),
        auth(ERIN, "", "x@ext.test", "relay office-net").client("10.1.2.3"),
        mail(Some(ERIN), "", "250").client("10.1.2.3"),
        mail(Some(ERIN), "", "553 5.7.1 null_sender").client("10.2.0.1"),
        // --- trusted networks -----------------------------------------------
        anon("scan@example.test", "a@internal.test", "relay scanner").client("10.9.0.7"),
        anon("scan@example.test", "a@ext.test", "550 5.7.1 relay_denied").client("10.9.0.7"),
        anon(
            "scan@ext.test",
            "a@internal.test",
            "553 5.7.1 sender_mismatch",
        )
        .client("10.9.0.7"),
        anon("", "a@internal.test", "553 5.7.1 null_sender").client("10.9.0.7"),
        anon(
            "scan@example.test",
            "a@internal.test",
            "550 5.7.1 relay_denied",
        )
        .client("10.9.1.1"),
        anon(
            "scan@example.test",
            "u%ext.test@example.test",
            "550 5.7.1 relay_denied",
        )
        .client("10.9.0.8"),
        anon(
            "scan@example.test",
            "u%internal.test@example.test",
            "relay scanner",
        )
        .client("10.9.0.8"),
        anon("", "x@ext.test", "relay app-servers").client("192.0.2.5"),
        anon("", "x@ext.test", "452 4.5.3 too_many_recipients")
            .client("192.0.2.5")
            .index(2),
        anon("", "x@ext.test", "550 5.7.1 relay_denied").client("192.0.2.16"),
        // --- rates: rule per principal (2 messages, 3 recipients an hour) ---
        auth(FRANK, "frank@example.test", "a@ext.test", "relay bulk"),
        auth(FRANK, "frank@example.test", "b@ext.test", "relay bulk").index(1),
        auth(FRANK, "frank@example.test", "c@ext.test", "relay bulk"),
        auth(
            FRANK,
            "frank@example.test",
            "d@ext.test",
            "451 4.7.1 rate_limited bulk",
        )
        .index(1),
        auth(
            FRANK,
            "frank@example.test",
            "d@ext.test",
            "451 4.7.1 rate_limited bulk",
        ),
        advance(3600),
        auth(FRANK, "frank@example.test", "d@ext.test", "relay bulk"),
        auth(FRANK, "other@example.test", "d@ext.test", "relay bulk").index(1),
        auth(
            FRANK,
            "frank@ext.test",
            "d@ext.test",
            "553 5.7.1 sender_mismatch",
        )
        .index(2),
        // --- rates: trusted network per client (2 recipients in 10 min) -----
        anon("s@example.test", "a@internal.test", "relay scanner").client("10.9.0.20"),
        anon("s@example.test", "b@internal.test", "relay scanner").client("10.9.0.20"),
        anon(
            "s@example.test",
            "c@internal.test",
            "451 4.7.1 rate_limited scanner",
        )
        .client("10.9.0.20"),
        anon("s@example.test", "c@internal.test", "relay scanner").client("10.9.0.21"),
        advance(600),
        anon("s@example.test", "c@internal.test", "relay scanner").client("10.9.0.20"),
    ];
    // --- rates: top-level, per principal (5 messages a minute) --------------
    for _ in 0..5 {
        rows.push(mail(Some(GINA), "gina@example.test", "250"));
    }
    rows.push(mail(
        Some(GINA),
        "gina@example.test",
        "451 4.7.1 rate_limited -",
    ));
    rows.push(advance(60));
    rows.push(mail(Some(GINA), "gina@example.test", "250"));
    rows
}

#[test]
fn decision_table() {
    let policy = policy();
    let clock = ManualClock::default();
    let limits = RateLimiter::new();
    let rows = table();
    let decisions = rows
        .iter()
        .filter(|r| !matches!(r.op, Op::Advance(_)))
        .count();
    assert!(decisions >= 60, "only {decisions} decisions");
    let mut failures = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        let mut p = row.who.map(principal);
        if let (Some(p), Some(m)) = (&mut p, row.mechanism) {
            p.mechanism = m;
        }
        let ctx = Context {
            principal: p.as_ref(),
            client_ip: row.ip.parse::<IpAddr>().unwrap(),
            listener: row.listener,
            tls: row.tls,
            declared_size: None,
        };
        let got = match row.op {
            Op::Advance(secs) => {
                clock.advance(Duration::from_secs(secs));
                continue;
            }
            Op::Mail(from) => {
                sender_summary(&policy.check_sender(&ctx, from, clock.now(), &limits))
            }
            Op::Rcpt { from, to, index } => {
                let d = policy.check_recipient(&ctx, from, to, index, clock.now(), &limits);
                // The indexed lookup and the explanation's full scan must
                // agree wherever rates and position do not matter.
                if index == 0 && !matches!(d, RcptDecision::RateLimited { .. }) {
                    let e = policy.explain(&ctx, from, to);
                    assert_eq!(
                        rcpt_summary(&e.decision),
                        rcpt_summary(&d),
                        "row {n}: explain disagrees\n{e}"
                    );
                    if let Some(rule) = d.rule() {
                        if d.is_accept() {
                            assert_eq!(e.matched_rule(), Some(rule), "row {n}");
                        }
                    }
                }
                rcpt_summary(&d)
            }
        };
        if got != row.want {
            failures.push(format!(
                "row {n} {row:?}\n    want {}\n    got  {got}",
                row.want
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// RFC 1870: a declared size above a recipient's rule limit refuses that
/// recipient at RCPT (552 5.3.4), counts nothing against its rates, and
/// leaves recipients under other rules (and local ones) alone.
#[test]
fn a_declared_size_above_the_rule_limit_refuses_the_recipient() {
    let policy = policy();
    let clock = ManualClock::default();
    let limits = RateLimiter::new();
    let carol = principal(CAROL);
    let with_size = |size: Option<u64>| Context {
        declared_size: size,
        ..ctx(Some(&carol), INTERNET)
    };
    let rcpt = |size, to| {
        policy.check_recipient(
            &with_size(size),
            "carol@example.test",
            to,
            0,
            clock.now(),
            &limits,
        )
    };
    let limit = 10u64 << 20;
    for size in [None, Some(1), Some(limit)] {
        assert!(rcpt(size, "a@partner.test").is_accept(), "{size:?}");
    }
    let d = rcpt(Some(limit + 1), "a@partner.test");
    assert_eq!(
        d,
        RcptDecision::Deny(Refusal {
            code: 552,
            enhanced: (5, 3, 4),
            text: format!(
                "Message size {} exceeds the limit of rule partners-only ({limit} bytes) for this recipient",
                limit + 1
            ),
            rule: Some("partners-only".into()),
            reason: "message_too_large",
        })
    );
    let (code, e, _) = d.reply();
    assert_eq!((code, e), (552, (5, 3, 4)));
    // Local recipients have no rule limit (the global one applies at MAIL).
    assert!(rcpt(Some(limit * 4), "bob@example.test").is_accept());
    // The explanation says the same.
    let e = policy.explain(
        &with_size(Some(limit + 1)),
        "carol@example.test",
        "a@partner.test",
    );
    assert!(!e.is_allowed());
    assert!(
        e.to_string()
            .contains("exceeds the limit of rule partners-only"),
        "{e}"
    );
}

fn ctx<'a>(p: Option<&'a Principal>, ip: &str) -> Context<'a> {
    Context {
        principal: p,
        client_ip: ip.parse().unwrap(),
        listener: "smtp",
        tls: false,
        declared_size: None,
    }
}

#[test]
fn accepted_decisions_carry_their_settings() {
    let policy = policy();
    let clock = ManualClock::default();
    let limits = RateLimiter::new();
    let carol = principal(CAROL);
    let alice = principal(ALICE);
    let d = policy.check_recipient(
        &ctx(Some(&carol), INTERNET),
        "carol@example.test",
        "a@partner.test",
        0,
        clock.now(),
        &limits,
    );
    assert_eq!(
        d,
        RcptDecision::AcceptRelay {
            rule: "partners-only".into(),
            max_message_size: Some(10 << 20),
            check_header_from: true,
        }
    );
    let local = |p| {
        policy.check_recipient(
            &ctx(p, INTERNET),
            "",
            "bob@example.test",
            0,
            clock.now(),
            &limits,
        )
    };
    assert_eq!(
        local(None),
        RcptDecision::AcceptLocal {
            check_header_from: false
        }
    );
    let d = policy.check_recipient(
        &ctx(Some(&alice), INTERNET),
        "alice@example.test",
        "bob@example.test",
        0,
        clock.now(),
        &limits,
    );
    assert_eq!(
        d,
        RcptDecision::AcceptLocal {
            check_header_from: true
        }
    );
}

#[test]
fn refusal_texts_say_who_and_why() {
    let policy = policy();
    let clock = ManualClock::default();
    let limits = RateLimiter::new();
    let bob = principal(BOB);
    let d = policy.check_recipient(
        &ctx(Some(&bob), INTERNET),
        "bob@example.test",
        "x@ext.test",
        0,
        clock.now(),
        &limits,
    );
    assert_eq!(
        d.reply(),
        (
            550,
            (5, 7, 1),
            "Relaying denied: DEMO\\bob is authenticated but not permitted to relay to ext.test"
                .into()
        )
    );
    let d = policy.check_sender(
        &ctx(Some(&bob), INTERNET),
        "alice@example.test",
        clock.now(),
        &limits,
    );
    assert_eq!(
        d.reply().2,
        "Sender address rejected: <alice@example.test> is not owned by DEMO\\bob"
    );
    let d = policy.check_recipient(
        &ctx(None, INTERNET),
        "",
        "user%ext.test@example.test",
        0,
        clock.now(),
        &limits,
    );
    assert_eq!(
        d.reply().2,
        "Relaying denied: the address routes mail to ext.test (routed through the local part of a local address)"
    );
    // Rate limits give a retry hint.
    let frank = principal(FRANK);
    let c = ctx(Some(&frank), INTERNET);
    for i in 0..3 {
        let d = policy.check_recipient(
            &c,
            "frank@example.test",
            "a@ext.test",
            i,
            clock.now(),
            &limits,
        );
        assert!(d.is_accept(), "{d:?}");
    }
    clock.advance(Duration::from_secs(600));
    let d = policy.check_recipient(
        &c,
        "frank@example.test",
        "a@ext.test",
        0,
        clock.now(),
        &limits,
    );
    assert_eq!(
        d,
        RcptDecision::RateLimited {
            retry_after: Duration::from_secs(3000),
            rule: Some("bulk".into())
        }
    );
    assert_eq!(
        d.reply(),
        (
            451,
            (4, 7, 1),
            "Rate limit exceeded (rule bulk); try again in 50 minutes".into()
        )
    );
    assert_eq!(d.label(), "rate_limited");
}

#[test]
fn demo_policy_does_what_the_issue_says() {
    let users = crate::identity::UsersFile::parse(
        "users:\n  - {user: alice, domain: DEMO, nt_hash: 406660820be8180b5d0f94dfd556cee1, groups: [relay-senders], mail: [alice@example.test]}\n  - {user: bob, domain: DEMO, nt_hash: 7719f979b983beee07c8487b647c1efd, groups: [staff], mail: [bob@example.test]}\n",
        "demo-users.yaml",
    )
    .unwrap();
    let known = KnownPrincipals::from_accounts(users.accounts());
    let policy = Policy::from_yaml(DEMO_POLICY, "demo", Some(&known)).unwrap();
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    let to_principal = |a: &crate::identity::Account| Principal {
        user: a.user.clone(),
        domain: a.domain.clone(),
        groups: a.groups.clone(),
        mechanism: Mechanism::Ntlm,
        addresses: a.mail.clone(),
    };
    let alice = to_principal(&users.lookup("DEMO", "alice").unwrap());
    let bob = to_principal(&users.lookup("DEMO", "bob").unwrap());
    let clock = ManualClock::default();
    let limits = RateLimiter::new();
    let check = |p: Option<&Principal>, from: &str, to: &str| {
        let c = ctx(p, "127.0.0.1");
        match policy.check_sender(&c, from, clock.now(), &limits) {
            SenderDecision::Accept => {
                rcpt_summary(&policy.check_recipient(&c, from, to, 0, clock.now(), &limits))
            }
            other => sender_summary(&other),
        }
    };
    assert_eq!(
        check(Some(&alice), "alice@example.test", "x@ext.test"),
        "relay relay-senders"
    );
    assert_eq!(
        check(Some(&alice), "bob@example.test", "x@ext.test"),
        "553 5.7.1 sender_mismatch"
    );
    assert_eq!(
        check(Some(&bob), "bob@example.test", "x@example.test"),
        "local"
    );
    assert_eq!(
        check(Some(&bob), "bob@example.test", "x@ext.test"),
        "550 5.7.1 relay_not_permitted"
    );
    assert_eq!(
        check(Some(&bob), "alice@example.test", "x@example.test"),
        "553 5.7.1 sender_mismatch"
    );
    assert_eq!(
        check(None, "x@ext.test", "x@ext.test"),
        "550 5.7.1 relay_denied"
    );
    assert_eq!(check(None, "x@ext.test", "alice@example.test"), "local");
}

// --- loader errors ---------------------------------------------------------

/// The 1-based line of the first occurrence of `needle`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

fn load_err(yaml: &str, known: Option<&KnownPrincipals>) -> PolicyError {
    Policy::from_yaml(yaml, "policy.yaml", known).expect_err("should be refused")
}

#[test]
fn the_documented_example_loads_without_warnings() {
    let source = include_str!("mod.rs");
    let start = source.find("    /// ```yaml\n").unwrap() + "    /// ```yaml\n".len();
    let len = source[start..].find("    /// ```\n").unwrap();
    let yaml: String = source[start..start + len]
        .lines()
        .map(|l| {
            l.trim_start()
                .trim_start_matches("///")
                .strip_prefix(' ')
                .unwrap_or("")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let p = Policy::from_yaml(&yaml, "doc", None).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    assert_eq!(
        p.rule_names().collect::<Vec<_>>(),
        ["helpdesk-shared", "scanner"]
    );
}

#[test]
fn a_policy_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Policy>();
    shared::<RateLimiter>();
}

#[test]
fn the_test_policy_loads_without_warnings() {
    let p = policy();
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    assert_eq!(p.local_domains().len(), 4);
    assert!(p.is_local_domain("BÜCHER.test"));
    assert!(p.is_local_domain("x.corp.example.test"));
    assert!(!p.is_local_domain("corp.example.test"));
    assert!(p.requires_auth("submission"));
    assert_eq!(p.longest_window(), Some(Duration::from_secs(3600)));
    assert_eq!(p.rule_names().count(), 9);
    assert!(p.check_listeners(&["smtp", "submission"]).is_ok());
    let e = p.check_listeners(&["smtp"]).unwrap_err();
    assert!(
        e.to_string().contains("no listener is named `submission`"),
        "{e}"
    );
}

#[test]
fn unknown_key_names_file_line_column_and_field() {
    let yaml = POLICY.replace("    users: [carol]", "    userz: [carol]");
    let e = load_err(&yaml, None);
    let text = e.to_string();
    assert_eq!(e.field(), Some("rules[2].userz"), "{text}");
    let line = line_of(&yaml, "userz").unwrap();
    assert_eq!(e.line(), Some(line), "{text}");
    assert!(
        text.starts_with(&format!(
            "policy.yaml:{line}:5: field `rules[2].userz`: unknown field `userz`, expected one of"
        )),
        "{text}"
    );

    let e = load_err("local_domains: [a.test]\nrelay_rules: []\n", None);
    assert_eq!((e.line(), e.field()), (Some(2), Some("relay_rules")), "{e}");
}

#[test]
fn unknown_principals_are_refused_only_when_sources_are_known() {
    let yaml = POLICY.replace("groups: [helpdesk]", "groups: [help-desk]");
    let e = load_err(&yaml, Some(&known()));
    let text = e.to_string();
    assert_eq!(e.field(), Some("rules[1].groups[0]"), "{text}");
    assert_eq!(e.line(), line_of(&yaml, "help-desk"), "{text}");
    assert!(
        text.contains("no identity source knows the group `help-desk`"),
        "{text}"
    );
    // Active Directory: groups are looked up at run time.
    assert!(Policy::from_yaml(&yaml, "policy.yaml", None).is_ok());

    let yaml = POLICY.replace("users: ['DEMO\\dave']", "users: ['DEMO\\davd']");
    let e = load_err(&yaml, Some(&known()));
    assert_eq!(e.field(), Some("rules[3].users[0]"), "{e}");
    assert!(
        e.to_string()
            .contains("no identity source knows the user `DEMO\\davd`"),
        "{e}"
    );
    // Case does not matter.
    let yaml = POLICY.replace("users: ['DEMO\\dave']", "users: ['demo\\DAVE']");
    assert!(Policy::from_yaml(&yaml, "p", Some(&known())).is_ok());
}

#[test]
fn bad_networks_are_refused_with_their_line() {
    let yaml = POLICY.replace("networks: [10.9.0.0/24]", "networks: [10.9.0.0/33]");
    let e = load_err(&yaml, None);
    assert_eq!(e.field(), Some("trusted_networks[0].networks[0]"), "{e}");
    assert_eq!(e.line(), line_of(&yaml, "/33"), "{e}");
    assert!(
        e.to_string().contains("not an address or a CIDR network"),
        "{e}"
    );

    let yaml = POLICY.replace("networks: [10.9.0.0/24]", "networks: [10.9.0.1/24]");
    let e = load_err(&yaml, None);
    assert!(
        e.to_string().contains("host bits set; write `10.9.0.0/24`"),
        "{e}"
    );

    let yaml = POLICY.replace(
        "networks: [10.9.0.0/24]",
        "networks: [\"::ffff:10.9.0.0/120\"]",
    );
    assert!(load_err(&yaml, None).to_string().contains("IPv4-mapped"));
}

#[test]
fn bad_patterns_are_refused_with_their_line() {
    let yaml = POLICY.replace(
        "[partner.test, \"*.partner.test\"]",
        "[partner.test, \"*.part ner.test\"]",
    );
    let e = load_err(&yaml, None);
    assert_eq!(e.field(), Some("rules[2].recipient_domains[1]"), "{e}");
    assert_eq!(e.line(), line_of(&yaml, "part ner"), "{e}");
    assert!(
        e.to_string()
            .contains("`*.part ner.test` is not a valid domain name"),
        "{e}"
    );

    let yaml = POLICY.replace("  - coop.test", "  - \"coop..test\"");
    let e = load_err(&yaml, None);
    assert_eq!(e.field(), Some("local_domains[3]"), "{e}");

    // Unquoted `*` is a YAML alias: still an error with a position.
    let yaml = POLICY.replace(
        "recipient_domains: [internal.test]",
        "recipient_domains: [*]",
    );
    let e = load_err(&yaml, None);
    assert!(e.line().is_some(), "{e}");

    let yaml = POLICY.replace("helpdesk@example.test]", "helpdesk@@example.test]");
    let e = load_err(&yaml, None);
    assert_eq!(e.field(), Some("rules[1].senders[1]"), "{e}");
}

#[test]
fn structural_mistakes_are_refused() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "rules:\n  - name: a\n    recipient_domains: [\"*\"]\n",
            "rules[0]",
            "names no `users` or `groups`",
        ),
        (
            "rules:\n  - {name: a, users: [x], recipient_domains: [\"*\"]}\n  - {name: a, users: [y], recipient_domains: [\"*\"]}\n",
            "rules[1]",
            "duplicate rule name `a`",
        ),
        (
            "rules:\n  - {name: a, users: [x], recipient_domains: [\"*\"]}\ntrusted_networks:\n  - {name: a, networks: [10.0.0.0/8], recipient_domains: [x.test]}\n",
            "trusted_networks[0]",
            "duplicate rule name `a`",
        ),
        (
            "rules:\n  - {name: a, users: [x, \"*\"], recipient_domains: [\"*\"]}\n",
            "rules[0]",
            "list nothing else with it",
        ),
        (
            "rules:\n  - {name: a, users: [x], networks: [], recipient_domains: [\"*\"]}\n",
            "rules[0]",
            "`networks: []` would never match",
        ),
        (
            "rules:\n  - {name: a, users: [x], recipient_domains: []}\n",
            "rules[0]",
            "`recipient_domains` is empty",
        ),
        (
            "rules:\n  - {name: a, users: [x]}\n",
            "rules[0]",
            "missing field `recipient_domains`",
        ),
        (
            "rules:\n  - {name: a, users: [x], mechanisms: [kerberos], recipient_domains: [\"*\"]}\n",
            "rules[0].mechanisms[0]",
            "unknown authentication mechanism `kerberos`",
        ),
        (
            "rules:\n  - {name: a, users: [x], max_message_size: 10 MB2, recipient_domains: [\"*\"]}\n",
            "rules[0].max_message_size",
            "unknown size unit",
        ),
        (
            "rules:\n  - {name: a, users: [x], recipient_domains: [\"*\"], rates: [{per: client, window: 1h}]}\n",
            "rules[0].rates[0]",
            "needs `messages`, `recipients` or both",
        ),
        (
            "rules:\n  - {name: a, users: [x], recipient_domains: [\"*\"], rates: [{per: client, window: 1h, messages: 0}]}\n",
            "rules[0].rates[0]",
            "a rate of 0",
        ),
        (
            "rules:\n  - {name: a, users: [x], recipient_domains: [\"*\"], rates: [{per: anyone, window: 1h, messages: 1}]}\n",
            "rules[0].rates[0].per",
            "unknown variant `anyone`",
        ),
        (
            "rules:\n  - {name: a, users: [x], recipient_domains: [\"*\"], senders: [\"{usr}@x.test\"]}\n",
            "rules[0].senders[0]",
            "the only placeholders are",
        ),
        (
            "trusted_networks:\n  - {name: t, networks: [10.0.0.0/8], recipient_domains: [x.test], senders: [directory]}\n",
            "trusted_networks[0]",
            "needs an authenticated principal",
        ),
        (
            "trusted_networks:\n  - {name: t, networks: [10.0.0.0/8], recipient_domains: [x.test], rates: [{per: principal, window: 1h, messages: 1}]}\n",
            "trusted_networks[0]",
            "use `per: client`",
        ),
        (
            "rules:\n  - {name: 'a b', users: [x], recipient_domains: [\"*\"]}\n",
            "rules[0].name",
            "not a valid name",
        ),
        (
            "rules:\n  - {name: a, users: ['DEMO\\'], recipient_domains: [\"*\"]}\n",
            "rules[0].users[0]",
            "is not `DOMAIN\\user`",
        ),
        ("listeners:\n  smtp: {require_tls: true}\n", "listeners.smtp.require_tls", "unknown field"),
        ("", "", "the policy file is empty"),
        ("# nothing but a comment\n\n", "", "the policy file is empty"),
    ];
    for (yaml, field, message) in cases {
        let e = load_err(yaml, None);
        let text = e.to_string();
        assert_eq!(
            e.field().unwrap_or_default().trim_start_matches('.'),
            *field,
            "{yaml}\n{text}"
        );
        assert!(text.contains(message), "{yaml}\n{text}");
        assert!(text.starts_with("policy.yaml"), "{text}");
    }
}

// --- analysis ----------------------------------------------------------------

fn warnings(rules: &str) -> Vec<String> {
    let yaml = format!("local_domains: [example.test, \"*.corp.test\"]\nlisteners:\n  submission: {{require_auth: true}}\n{rules}");
    Policy::from_yaml(&yaml, "p.yaml", None)
        .unwrap_or_else(|e| panic!("{e}"))
        .warnings()
}

#[test]
fn shadowed_rules_are_reported() {
    let w = warnings(
        r#"rules:
  - { name: everyone, users: ["*"], recipient_domains: ["*"] }
  - { name: alice, users: ['D\alice'], recipient_domains: [x.test] }
"#,
    );
    assert_eq!(
        w,
        ["p.yaml: rules[1] `alice` is shadowed by rules[0] `everyone`: every request it matches is decided by that earlier rule first"]
    );

    // Narrower conditions in the earlier rule: no shadowing, either way round.
    let w = warnings(
        r#"rules:
  - { name: a, users: [alice], networks: [10.1.0.0/16], recipient_domains: ["*.x.test"] }
  - { name: b, users: ['D\alice'], networks: [10.1.2.0/24], recipient_domains: [a.x.test, "*.b.x.test"] }
  - { name: c, users: [alice], recipient_domains: [a.x.test] }
  - { name: d, users: [alice], tls: true, networks: [10.0.0.0/8], recipient_domains: ["*"] }
  - { name: e, users: [alice], tls: false, networks: [10.1.0.0/16], recipient_domains: [y.test] }
  - { name: f, groups: [staff], recipient_domains: ["*"] }
  - { name: g, users: [alice], mechanisms: [ntlm], recipient_domains: [a.test] }
  - { name: h, users: [alice, bob], recipient_domains: [a.test] }
"#,
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("rules[1] `b` is shadowed by rules[0] `a`"),
        "{w:?}"
    );

    let w = warnings(
        r#"rules:
  - { name: staff, groups: [staff, sales], mechanisms: [ntlm, plain], listeners: [smtp, submission], recipient_domains: ["*"] }
  - { name: staff-ntlm, groups: [Staff], mechanisms: [ntlm], listeners: [smtp], recipient_domains: [x.test] }
trusted_networks:
  - { name: lan, networks: [10.0.0.0/8], recipient_domains: ["*"] }
  - { name: scanner, networks: [10.9.0.0/24], recipient_domains: [internal.test] }
"#,
    );
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("rules[1] `staff-ntlm` is shadowed by rules[0] `staff`"),
        "{w:?}"
    );
    assert!(
        w[1].contains("trusted_networks[1] `scanner` is shadowed by trusted_networks[0] `lan`: every request it matches is decided by that earlier trusted network first"),
        "{w:?}"
    );
}

#[test]
fn dead_rules_and_idle_settings_are_reported() {
    let w = warnings(
        r#"rules:
  - { name: inbound, users: [alice], recipient_domains: [example.test, a.corp.test] }
  - { name: literals, users: [bob], recipient_domains: [x.test], allow_address_literals: true }
trusted_networks:
  - { name: sub, networks: [10.0.0.0/8], listeners: [submission], recipient_domains: [x.test] }
"#,
    );
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(
        w[0].contains(
            "rules[0] `inbound` can never match: every domain in its recipient_domains is local"
        ),
        "{w:?}"
    );
    assert!(
        w[1].contains("rules[1] `literals`: allow_address_literals has no effect"),
        "{w:?}"
    );
    assert!(
        w[2].contains("trusted_networks[0] `sub` only names listeners that require AUTH"),
        "{w:?}"
    );
}

// --- explanations ------------------------------------------------------------

#[test]
fn explain_lists_why_each_earlier_rule_did_not_match() {
    let policy = policy();
    let mut carol = principal(CAROL);
    carol.mechanism = Mechanism::Login;
    let c = ctx(Some(&carol), "10.1.2.3");
    let e = policy.explain(&c, "carol@example.test", "Someone@Sub.Partner.test");
    assert!(e.is_allowed());
    assert_eq!(e.matched_rule(), Some("partners-only"));
    assert_eq!(
        e.to_string(),
        "\
client:    OTHER\\carol (login) from 10.1.2.3, listener smtp, no TLS
sender:    <carol@example.test>: accepted
recipient: <Someone@sub.partner.test>: relay to sub.partner.test
  rules[0] `alice-anywhere` (rule): no match: OTHER\\carol is not in users [DEMO\\alice] nor in groups []
  rules[1] `helpdesk-shared` (rule): no match: OTHER\\carol is not in users [] nor in groups [helpdesk]
  rules[2] `partners-only` (rule): MATCHED
decision:  ALLOW (relay by `partners-only`)"
    );

    let dave = principal(DAVE);
    let c = Context {
        principal: Some(&dave),
        client_ip: "10.1.2.3".parse().unwrap(),
        listener: "smtp",
        tls: false,
        declared_size: None,
    };
    let e = policy.explain(&c, "dave@example.test", "x@ext.test");
    assert!(!e.is_allowed());
    let text = e.to_string();
    assert!(
        text.contains("rules[3] `ntlm-tls-submission` (rule): no match: listener `smtp` is not in [submission]; the session is not using TLS\n"),
        "{text}"
    );
    assert!(
        text.contains("rules[6] `anyone-to-partner` (rule): no match: ext.test is not in recipient_domains [partner.test]\n"),
        "{text}"
    );
    assert!(
        text.contains("trusted_networks[0] `scanner` (trusted network): no match: client 10.1.2.3 is not in [10.9.0.0/24]; ext.test is not in recipient_domains [internal.test]\n"),
        "{text}"
    );
    assert!(text.contains("  no rule matched: default deny\n"), "{text}");
    assert!(
        text.ends_with("decision:  DENY 550 5.7.1 Relaying denied: DEMO\\dave is authenticated but not permitted to relay to ext.test"),
        "{text}"
    );

    // Local mail consults no rule; a sender refusal is the verdict.
    let bob = principal(BOB);
    let e = policy.explain(
        &ctx(Some(&bob), INTERNET),
        "alice@example.test",
        "alice@example.test",
    );
    let text = e.to_string();
    assert!(
        text.contains(
            "recipient: <alice@example.test>: local domain: accepted without consulting rules"
        ),
        "{text}"
    );
    assert!(text.contains("refused at MAIL FROM: 553 5.7.1"), "{text}");
    assert!(e.steps.is_empty());
    assert!(!e.is_allowed());

    // An unparseable recipient is explained too.
    let e = policy.explain(&ctx(None, INTERNET), "", "a@b@c.test");
    assert!(
        e.to_string()
            .ends_with("decision:  DENY 501 5.1.3 Bad recipient address syntax: more than one '@'"),
        "{e}"
    );
}

// --- benchmark ---------------------------------------------------------------

/// 1,000 rules over 100,000 users: decisions per second.
///
/// `cargo test --release -p relayguard-policy -- --ignored --nocapture policy_benchmark`
#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn policy_benchmark() {
    use std::fmt::Write as _;
    use std::time::Instant;

    const RULES: usize = 1_000;
    const USERS: usize = 100_000;
    const GROUPS: usize = 500;
    let mut yaml = String::from("local_domains: [example.test, \"*.corp.example.test\"]\n");
    yaml.push_str("rates:\n  - { per: client, window: 1h, messages: 1000000 }\nrules:\n");
    let mut known = KnownPrincipals::default();
    for r in 0..RULES {
        // Each rule: 100 users of its own, two groups, a few domains.
        let users: Vec<String> = (0..USERS / RULES)
            .map(|i| format!("'BENCH\\u{}'", r * (USERS / RULES) + i))
            .collect();
        let _ = writeln!(
            yaml,
            "  - name: r{r}\n    users: [{}]\n    groups: [g{}, g{}]\n    recipient_domains: [d{r}.test, \"*.e{}.test\", shared.test]\n    max_recipients: 100\n    rates:\n      - {{ per: principal, window: 1h, recipients: 1000000 }}",
            users.join(", "),
            r % GROUPS,
            (r * 7 + 3) % GROUPS,
            r % 50,
        );
    }
    yaml.push_str(
        "  - { name: everyone-partner, users: [\"*\"], recipient_domains: [partner.test] }\n",
    );
    for u in 0..USERS {
        known.users.insert(format!("bench\\u{u}"));
        known.users.insert(format!("u{u}"));
    }
    for g in 0..GROUPS {
        known.groups.insert(format!("g{g}"));
    }
    let t = Instant::now();
    let policy = Policy::from_yaml(&yaml, "bench.yaml", Some(&known)).unwrap();
    let load = t.elapsed();

    let principals: Vec<Principal> = (0..1_000)
        .map(|i| {
            let u = (i * 7919) % USERS;
            Principal {
                user: format!("u{u}"),
                domain: "BENCH".into(),
                groups: (0..20)
                    .map(|g| format!("g{}", (i * 31 + g * 17) % GROUPS))
                    .collect(),
                mechanism: Mechanism::Ntlm,
                addresses: vec![format!("u{u}@example.test")],
            }
        })
        .collect();
    let recipients = [
        "x@d17.test",
        "x@shared.test",
        "x@a.b.e3.test",
        "x@ext.test",
        "x@partner.test",
        "x@example.test",
        "x@hr.corp.example.test",
    ];
    let limits = RateLimiter::new();
    let clock = ManualClock::default();
    let mut accepted = 0usize;
    const N: usize = 200_000;
    let t = Instant::now();
    for i in 0..N {
        let p = &principals[i % principals.len()];
        let c = Context {
            principal: Some(p),
            client_ip: IpAddr::from([10, 0, (i / 256 % 256) as u8, (i % 256) as u8]),
            listener: "smtp",
            tls: true,
            declared_size: None,
        };
        let from = &p.addresses[0];
        let d = policy.check_recipient(
            &c,
            from,
            recipients[i % recipients.len()],
            0,
            clock.now(),
            &limits,
        );
        accepted += usize::from(d.is_accept());
    }
    let per = t.elapsed() / N as u32;
    let t = Instant::now();
    for i in 0..N / 10 {
        let p = &principals[i % principals.len()];
        let c = ctx(Some(p), "10.0.0.1");
        let _ = policy.check_sender(&c, &p.addresses[0], clock.now(), &limits);
    }
    let per_sender = t.elapsed() / (N / 10) as u32;
    // The same decisions by scanning every rule in order (what an
    // explanation does), to show what the index saves.
    let t = Instant::now();
    for i in 0..N / 100 {
        let p = &principals[i % principals.len()];
        let c = ctx(Some(p), "10.0.0.1");
        let _ = policy.explain(&c, &p.addresses[0], recipients[i % recipients.len()]);
    }
    let per_scan = t.elapsed() / (N / 100) as u32;
    // And a plain scan without reasons: first rule whose `matches` holds.
    let hops: Vec<Vec<address::Host>> = recipients
        .iter()
        .map(
            |r| match address::parse_path(r, address::Role::Recipient).unwrap() {
                address::Path::Mailbox { mailbox, .. } => vec![mailbox.host],
                _ => unreachable!(),
            },
        )
        .collect();
    let t = Instant::now();
    let mut found = 0usize;
    for i in 0..N / 10 {
        let p = &principals[i % principals.len()];
        let c = ctx(Some(p), "10.0.0.1");
        let prep = rules::Prepared::new(&c);
        let h = &hops[i % hops.len()];
        found += usize::from(policy.rules.iter().any(|r| r.matches(&prep, h)));
    }
    let per_plain = t.elapsed() / (N / 10) as u32;
    let t = Instant::now();
    let warnings = policy.warnings().len();
    println!(
        "policy of {RULES} rules, {USERS} users: loaded in {load:?} ({warnings} warnings, {:?} to list)\n\
         check_recipient: {per:?} per decision ({:.0}/s), {accepted} of {N} accepted\n\
         check_sender:    {per_sender:?} per decision ({:.0}/s)\n\
         without the index: {per_plain:?} per rule lookup (plain scan, {found} found), \
         {per_scan:?} per explanation (scan with reasons)",
        t.elapsed(),
        1.0 / per.as_secs_f64(),
        1.0 / per_sender.as_secs_f64(),
    );
    assert!(accepted > 0);
}
