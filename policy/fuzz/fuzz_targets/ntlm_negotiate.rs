//! Any bytes as the first message of an `AUTH NTLM` exchange: the server
//! must not panic, must answer only a NEGOTIATE, and what it answers must be
//! a CHALLENGE a client can parse. The same bytes also go to the client's
//! CHALLENGE parser, which the load generator points at real servers.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use policy::clock::{Clock, ManualClock};
use policy::ntlm::message::{ChallengeMessage, NegotiateMessage};
use policy::ntlm::{NtlmConfig, NtlmError, ServerHandshake};

const CHALLENGE: [u8; 8] = *b"fuzzfuzz";

fn fixture() -> &'static (NtlmConfig, Arc<dyn Clock>) {
    static F: OnceLock<(NtlmConfig, Arc<dyn Clock>)> = OnceLock::new();
    F.get_or_init(|| {
        let mut config = NtlmConfig::new("DEMO", "RELAY01", "demo.test", "relay01.demo.test");
        config.dns_tree = Some("demo.test".into());
        (config, Arc::new(ManualClock::default()))
    })
}

fuzz_target!(|data: &[u8]| {
    let (config, clock) = fixture();
    let mut server = ServerHandshake::with_challenge(config, clock.clone(), CHALLENGE);
    match server.challenge(data) {
        Ok(t2) => {
            assert!(NegotiateMessage::parse(data).is_ok());
            let m = ChallengeMessage::parse(&t2).expect("our CHALLENGE must parse");
            assert_eq!(m.server_challenge, CHALLENGE);
            assert_eq!(m.av_pairs().expect("our target info must parse").len(), 6);
            // A second NEGOTIATE in the same exchange is out of sequence.
            assert_eq!(server.challenge(data), Err(NtlmError::UnexpectedMessage));
        }
        Err(e) => assert!(e.is_protocol_error(), "{e:?}"),
    }
    if let Ok(m) = ChallengeMessage::parse(data) {
        let _ = m.av_pairs();
    }
});
