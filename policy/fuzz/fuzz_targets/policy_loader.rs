//! Any text as a policy file: loading must not panic, and a policy that
//! loads must answer (and explain) without panicking.
#![no_main]

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use policy::relay::{Context, KnownPrincipals, Mechanism, Policy, Principal, RateLimiter};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut known = KnownPrincipals::default();
    known.users.insert("demo\\alice".into());
    known.users.insert("alice".into());
    known.groups.insert("staff".into());
    for known in [None, Some(&known)] {
        let Ok(policy) = Policy::from_yaml(text, "fuzz.yaml", known) else {
            continue;
        };
        let _ = policy.warnings();
        let _ = policy.check_listeners(&["smtp"]);
        let alice = Principal {
            user: "alice".into(),
            domain: "DEMO".into(),
            groups: vec!["staff".into()],
            mechanism: Mechanism::Ntlm,
            addresses: vec!["alice@example.test".into()],
        };
        let limits = RateLimiter::with_capacity(1_000, Duration::from_secs(60));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200);
        for principal in [None, Some(&alice)] {
            for ip in ["10.1.2.3", "2001:db8::1"] {
                let ctx = Context {
                    principal,
                    client_ip: ip.parse::<IpAddr>().unwrap(),
                    listener: "smtp",
                    tls: true,
                    // With and without a declared size (a rule's limit).
                    declared_size: (ip == "10.1.2.3").then_some(1 << 20),
                };
                for to in [
                    "x@example.test",
                    "x@ext.test",
                    "x%ext.test@example.test",
                    "x@[192.0.2.1]",
                ] {
                    let _ = policy.check_sender(&ctx, "alice@example.test", now, &limits);
                    for index in [0, 1000] {
                        let d = policy.check_recipient(
                            &ctx,
                            "alice@example.test",
                            to,
                            index,
                            now,
                            &limits,
                        );
                        let _ = d.reply();
                    }
                    let _ = policy.explain(&ctx, "", to).to_string();
                }
            }
        }
    }
});
