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
use policy::identity::{nt_hash, UsersFile};
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

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut server = ServerHandshake::with_challenge(&f.config, f.clock.clone(), CHALLENGE);
    server.challenge(&f.negotiate).expect("fixture NEGOTIATE");
    // A fresh cache per input keeps runs deterministic.
    let replay = ReplayCache::new(Duration::from_secs(600), 16);
    let parsed = AuthenticateMessage::parse(data);
    match server.authenticate(data, &f.store, &replay, Some(&CERT_HASH)) {
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

    let mut client = ClientHandshake::new(creds("alice"), *b"cli-chal", None);
    client.negotiate();
    let _ = client.authenticate(data);
});
