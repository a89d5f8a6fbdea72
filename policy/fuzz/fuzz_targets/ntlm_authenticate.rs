//! Any bytes as the AUTHENTICATE message of an exchange whose CHALLENGE was
//! sent: the server must not panic, must accept only a response computed
//! with the right password, and must call anything it cannot parse a
//! protocol error. The same bytes also go to the client as a CHALLENGE.
//!
//! The fixture matches the `write_fuzz_seeds` test in
//! policy/src/ntlm/tests.rs, so the client-made seeds verify here and the
//! fuzzer starts past the proof check (MIC, target info, replay, account).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use policy::clock::{Clock, ManualClock};
use policy::identity::{nt_hash, CredentialStore, UsersFile};
use policy::ntlm::crypto;
use policy::ntlm::message::AuthenticateMessage;
use policy::ntlm::{ClientCredentials, ClientHandshake, NtlmConfig, ReplayCache, ServerHandshake};

const CHALLENGE: [u8; 8] = *b"fuzzfuzz";
const PASSWORD: &str = "Summer2024!";
/// The tls-server-end-point value the seeds' channel-bound client used.
const CERT_HASH: [u8; 32] = [0x42; 32];

struct Fixture {
    config: NtlmConfig,
    clock: Arc<dyn Clock>,
    store: UsersFile,
    negotiate: Vec<u8>,
}

fn creds(user: &str) -> ClientCredentials {
    ClientCredentials {
        user: user.into(),
        domain: "DEMO".into(),
        password: PASSWORD.into(),
        workstation: "WS01".into(),
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let h = format!("{:032x}", u128::from_be_bytes(nt_hash(PASSWORD)));
        let yaml = format!(
            "users:\n  - user: alice\n    domain: DEMO\n    nt_hash: {h}\n  \
             - user: bob\n    domain: DEMO\n    nt_hash: {h}\n    enabled: false\n"
        );
        Fixture {
            config: NtlmConfig::new("DEMO", "RELAY01", "demo.test", "relay01.demo.test"),
            clock: Arc::new(ManualClock::default()),
            store: UsersFile::parse(&yaml, "fuzz").expect("fixture users"),
            negotiate: ClientHandshake::new(creds("alice"), *b"cli-chal", None).negotiate(),
        }
    })
}

/// The same bytes on the Active Directory path: `begin_authenticate`, a
/// stand-in DC that knows alice's password, `finish_external`. Wherever the
/// two paths can be compared (alice, spelled as in the store), they must
/// give the same answer: an externally verified response gets no check
/// fewer than a local one.
fn external_agrees(
    f: &Fixture,
    data: &[u8],
    local: &Result<policy::ntlm::Authenticated, policy::ntlm::NtlmError>,
) {
    let mut server = ServerHandshake::with_challenge(&f.config, f.clock.clone(), CHALLENGE);
    server.challenge(&f.negotiate).expect("fixture NEGOTIATE");
    let replay = ReplayCache::new(Duration::from_secs(600), 16);
    let pending = match server.begin_authenticate(data) {
        Ok(p) => p,
        Err(e) => {
            // Everything begin refuses, the local path refuses the same way.
            assert_eq!(local.as_ref().err(), Some(&e));
            return;
        }
    };
    if pending.user() != "alice" || pending.domain() != "DEMO" {
        return;
    }
    let h = nt_hash(PASSWORD);
    let nt = pending.nt_response();
    let key = if nt.len() == 24 {
        let ok = crypto::ntlmv1_response(&h, &pending.external_challenge())[..] == *nt;
        ok.then(|| crypto::session_base_key_v1(&h))
    } else {
        let rk = crypto::ntowfv2(&h, "alice", "DEMO");
        let proof = crypto::nt_proof_str(&rk, &pending.external_challenge(), &nt[16..]);
        (proof[..] == nt[..16]).then(|| crypto::session_base_key_v2(&rk, &proof))
    };
    let Some(key) = key else {
        assert_eq!(
            local.as_ref().err(),
            Some(&policy::ntlm::NtlmError::BadCredentials)
        );
        return;
    };
    let account = f.store.lookup("DEMO", "alice").expect("fixture alice");
    let external = pending.finish_external(account, key, &replay, Some(&CERT_HASH));
    let summary = |r: &Result<policy::ntlm::Authenticated, policy::ntlm::NtlmError>| {
        r.as_ref()
            .map(|a| {
                (
                    a.version,
                    a.mic_verified,
                    a.channel_bound,
                    a.session_base_key,
                )
            })
            .map_err(Clone::clone)
    };
    assert_eq!(summary(&external), summary(local));
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut server = ServerHandshake::with_challenge(&f.config, f.clock.clone(), CHALLENGE);
    server.challenge(&f.negotiate).expect("fixture NEGOTIATE");
    // A fresh cache per input keeps runs deterministic.
    let replay = ReplayCache::new(Duration::from_secs(600), 16);
    let parsed = AuthenticateMessage::parse(data);
    let local = server.authenticate(data, &f.store, &replay, Some(&CERT_HASH));
    match &local {
        Ok(ok) => {
            assert_eq!(ok.account.user, "alice");
            assert!(parsed.is_ok());
        }
        Err(e) => {
            assert!(!e.metric_label().is_empty());
            if parsed.is_err() {
                assert!(e.is_protocol_error(), "{e:?}");
            }
        }
    }
    external_agrees(f, data, &local);

    let mut client = ClientHandshake::new(creds("alice"), *b"cli-chal", None);
    client.negotiate();
    let _ = client.authenticate(data);
});
