//! Server and client together: honest clients, hostile clients and broken
//! bytes.

use std::sync::Arc;
use std::time::Duration;

use super::message::{av_id, filetime, flags, le_u32, AvPair, ChallengeMessage, MIC_OFFSET};
use super::*;
use crate::clock::{Clock, ManualClock};
use crate::identity::{nt_hash, UsersFile};

const PASSWORD: &str = "Summer2024!";
const CERT_HASH: [u8; 32] = [0x42; 32];

struct Fixture {
    config: NtlmConfig,
    clock: Arc<ManualClock>,
    store: UsersFile,
    replay: ReplayCache,
}

impl Fixture {
    fn new() -> Self {
        Self::with_config(|_| {})
    }

    fn with_config(edit: impl FnOnce(&mut NtlmConfig)) -> Self {
        let mut config = NtlmConfig::new("DEMO", "RELAY01", "demo.test", "relay01.demo.test");
        edit(&mut config);
        config.validate().unwrap();
        let h = hex::encode(nt_hash(PASSWORD));
        let yaml = format!(
            "users:
  - user: alice
    domain: DEMO
    nt_hash: {h}
    groups: [relay-senders]
    mail: [alice@demo.test]
  - user: bob
    domain: DEMO
    nt_hash: {h}
    enabled: false
  - user: carol
    domain: OTHER
    nt_hash: {h}
"
        );
        Self {
            replay: ReplayCache::for_config(&config),
            config,
            clock: Arc::new(ManualClock::default()),
            store: UsersFile::parse(&yaml, "test").unwrap(),
        }
    }

    fn server(&self, challenge: Option<[u8; 8]>) -> ServerHandshake {
        let clock: Arc<dyn Clock> = self.clock.clone();
        match challenge {
            Some(c) => ServerHandshake::with_challenge(&self.config, clock, c),
            None => ServerHandshake::new(&self.config, clock),
        }
    }

    fn now(&self) -> u64 {
        filetime(self.clock.now())
    }

    /// Runs NEGOTIATE and CHALLENGE; returns the server awaiting
    /// AUTHENTICATE and the client's AUTHENTICATE bytes.
    fn exchange(
        &self,
        client: &mut ClientHandshake,
        challenge: Option<[u8; 8]>,
    ) -> (ServerHandshake, Vec<u8>) {
        let mut server = self.server(challenge);
        let t2 = server.challenge(&client.negotiate()).unwrap();
        let t3 = client.authenticate(&t2).unwrap();
        (server, t3)
    }

    fn finish(
        &self,
        server: ServerHandshake,
        t3: &[u8],
        cb: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        server.authenticate(t3, &self.store, &self.replay, cb)
    }

    fn run(&self, client: ClientHandshake) -> Result<Authenticated, NtlmError> {
        self.run_cb(client, None)
    }

    fn run_cb(
        &self,
        mut client: ClientHandshake,
        cb: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        let (server, t3) = self.exchange(&mut client, None);
        self.finish(server, &t3, cb)
    }
}

fn creds(domain: &str, user: &str, password: &str) -> ClientCredentials {
    ClientCredentials {
        user: user.into(),
        domain: domain.into(),
        password: password.into(),
        workstation: "WS01".into(),
    }
}

fn client(domain: &str, user: &str, password: &str) -> ClientHandshake {
    ClientHandshake::new(creds(domain, user, password), *b"cli-chal", None)
}

fn alice() -> ClientHandshake {
    client("DEMO", "alice", PASSWORD)
}

fn opts(edit: impl FnOnce(&mut ClientOptions)) -> ClientOptions {
    let mut o = ClientOptions::default();
    edit(&mut o);
    o
}

/// A curl 7.88-like client: no MIC, no key exchange, 64-byte header, its
/// own clock in the blob.
fn curl_like(fx: &Fixture, c: ClientHandshake) -> ClientHandshake {
    let _ = fx;
    c.with_options(opts(|o| {
        o.mic = false;
        o.key_exchange = false;
    }))
}

/// Offset of the NT response inside an AUTHENTICATE message.
fn nt_offset(t3: &[u8]) -> usize {
    le_u32(t3, 24).unwrap() as usize
}

/// Offset of the first AV pair with `id` in the NTLMv2 blob.
fn av_offset(t3: &[u8], id: u16) -> usize {
    let mut at = nt_offset(t3) + 16 + 28;
    loop {
        let this = u16::from_le_bytes([t3[at], t3[at + 1]]);
        let len = u16::from_le_bytes([t3[at + 2], t3[at + 3]]) as usize;
        assert_ne!(this, av_id::EOL, "AV pair {id} not found");
        if this == id {
            return at;
        }
        at += 4 + len;
    }
}

// --- the CHALLENGE we send -------------------------------------------------

#[test]
fn challenge_offers_ess_and_target_info_and_names_from_config() {
    let fx = Fixture::with_config(|c| c.dns_tree = Some("demo.test".into()));
    let mut server = fx.server(Some(*b"\x01\x23\x45\x67\x89\xab\xcd\xef"));
    // curl 7.88's NEGOTIATE: OEM only, no KEY_EXCH.
    let curl_negotiate = b"NTLMSSP\0\x01\0\0\0\x06\x82\x08\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    let t2 = server.challenge(curl_negotiate).unwrap();
    let m = ChallengeMessage::parse(&t2).unwrap();
    for f in [
        flags::NEGOTIATE_UNICODE,
        flags::NEGOTIATE_NTLM,
        flags::REQUEST_TARGET,
        flags::TARGET_TYPE_DOMAIN,
        flags::NEGOTIATE_TARGET_INFO,
        flags::NEGOTIATE_EXTENDED_SESSIONSECURITY,
        flags::NEGOTIATE_ALWAYS_SIGN,
        flags::NEGOTIATE_VERSION,
    ] {
        assert_ne!(m.flags & f, 0, "flag {f:#x} missing");
    }
    for f in [
        flags::NEGOTIATE_KEY_EXCH,
        flags::NEGOTIATE_128,
        flags::NEGOTIATE_LM_KEY,
        flags::NEGOTIATE_OEM,
        flags::ANONYMOUS,
    ] {
        assert_eq!(m.flags & f, 0, "flag {f:#x} not asked for");
    }
    assert_eq!(m.server_challenge, *b"\x01\x23\x45\x67\x89\xab\xcd\xef");
    assert_eq!(m.target_name, message::encode_string("DEMO", true));
    assert_eq!(
        m.av_pairs().unwrap(),
        vec![
            AvPair::name(av_id::NB_DOMAIN_NAME, "DEMO"),
            AvPair::name(av_id::NB_COMPUTER_NAME, "RELAY01"),
            AvPair::name(av_id::DNS_DOMAIN_NAME, "demo.test"),
            AvPair::name(av_id::DNS_COMPUTER_NAME, "relay01.demo.test"),
            AvPair::name(av_id::DNS_TREE_NAME, "demo.test"),
            AvPair::new(av_id::TIMESTAMP, fx.now().to_le_bytes()),
        ]
    );
}

#[test]
fn challenge_echoes_key_exch_only_when_asked_and_version_only_when_configured() {
    let fx = Fixture::with_config(|c| c.send_version = false);
    let mut server = fx.server(None);
    let t2 = server.challenge(&alice().negotiate()).unwrap();
    let m = ChallengeMessage::parse(&t2).unwrap();
    assert_ne!(m.flags & flags::NEGOTIATE_KEY_EXCH, 0);
    assert_ne!(m.flags & flags::NEGOTIATE_128, 0);
    assert_eq!(m.flags & flags::NEGOTIATE_VERSION, 0);
    assert_eq!(m.version, None);
}

#[test]
fn random_challenges_differ() {
    let fx = Fixture::new();
    let a =
        ChallengeMessage::parse(&fx.server(None).challenge(&alice().negotiate()).unwrap()).unwrap();
    let b =
        ChallengeMessage::parse(&fx.server(None).challenge(&alice().negotiate()).unwrap()).unwrap();
    assert_ne!(a.server_challenge, b.server_challenge);
}

// --- honest clients --------------------------------------------------------

#[test]
fn v2_with_mic_and_key_exchange() {
    let fx = Fixture::new();
    let ok = fx.run(alice()).unwrap();
    assert_eq!(ok.account.user, "alice");
    assert_eq!(ok.account.groups, vec!["relay-senders"]);
    assert_eq!(ok.version, NtlmVersion::V2);
    assert!(ok.mic_verified);
    assert!(!ok.channel_bound);
    assert_eq!(ok.workstation, "WS01");
}

#[test]
fn v2_with_mic_without_key_exchange() {
    let fx = Fixture::new();
    let ok = fx
        .run(alice().with_options(opts(|o| o.key_exchange = false)))
        .unwrap();
    assert!(ok.mic_verified);
}

#[test]
fn v2_without_mic_curl_style() {
    let fx = Fixture::new();
    let own_clock = fx.now() - 30 * 10_000_000; // client 30 s behind
    let c = ClientHandshake::new(
        creds("DEMO", "alice", PASSWORD),
        *b"12345678",
        Some(own_clock),
    );
    let ok = fx.run(curl_like(&fx, c)).unwrap();
    assert_eq!(ok.version, NtlmVersion::V2);
    assert!(!ok.mic_verified);
}

#[test]
fn session_base_key_is_the_ntlmv2_one() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, None);
    let ok = fx.finish(server, &t3, None).unwrap();
    let nt = &t3[nt_offset(&t3)..];
    let key = crypto::ntowfv2(&nt_hash(PASSWORD), "alice", "DEMO");
    let proof: [u8; 16] = nt[..16].try_into().unwrap();
    assert_eq!(
        ok.session_base_key,
        crypto::session_base_key_v2(&key, &proof)
    );
}

#[test]
fn user_and_domain_spellings_that_name_the_same_account() {
    let fx = Fixture::new();
    for (domain, user) in [
        ("DEMO", "alice"),
        ("demo", "ALICE"),
        ("", "alice"),           // no domain: ours
        ("demo.test", "alice"),  // our DNS domain
        ("", "alice@demo.test"), // UPN, as Windows sends it
        ("", "Alice@DEMO"),
    ] {
        let ok = fx
            .run(client(domain, user, PASSWORD))
            .unwrap_or_else(|e| panic!("{domain:?}\\{user:?}: {e}"));
        assert_eq!(ok.account.user, "alice", "canonical spelling");
    }
}

#[test]
fn account_in_another_domain() {
    let fx = Fixture::new();
    assert!(fx.run(client("OTHER", "carol", PASSWORD)).is_ok());
    assert_eq!(
        fx.run(client("DEMO", "carol", PASSWORD)).unwrap_err(),
        NtlmError::BadCredentials
    );
}

// --- refused credentials ----------------------------------------------------

#[test]
fn wrong_password_unknown_user_and_wrong_domain_look_the_same() {
    let fx = Fixture::new();
    for (domain, user, password) in [
        ("DEMO", "alice", "summer2024!"),
        ("DEMO", "mallory", PASSWORD),
        ("OTHER", "alice", PASSWORD),
        ("", "alice@other.test", PASSWORD),
    ] {
        let err = fx.run(client(domain, user, password)).unwrap_err();
        assert_eq!(err, NtlmError::BadCredentials, "{domain}\\{user}");
        assert_eq!(err.metric_label(), "bad_credentials");
    }
}

#[test]
fn disabled_account_is_reported_only_with_the_right_password() {
    let fx = Fixture::new();
    assert_eq!(
        fx.run(client("DEMO", "bob", PASSWORD)).unwrap_err(),
        NtlmError::AccountDisabled
    );
    assert_eq!(
        fx.run(client("DEMO", "bob", "guess")).unwrap_err(),
        NtlmError::BadCredentials
    );
}

#[test]
fn anonymous_is_refused() {
    let fx = Fixture::new();
    let flag = alice().with_options(opts(|o| o.anonymous_flag = true));
    let empty_user = client("DEMO", "", PASSWORD);
    let empty_nt = alice().with_options(opts(|o| o.mode = ClientMode::Anonymous));
    let true_anonymous = client("", "", "").with_options(opts(|o| {
        o.mode = ClientMode::Anonymous;
        o.anonymous_flag = true;
    }));
    for c in [flag, empty_user, empty_nt, true_anonymous] {
        let err = fx.run(c).unwrap_err();
        assert_eq!(err, NtlmError::Anonymous);
        assert_eq!(err.metric_label(), "anonymous_refused");
    }
}

#[test]
fn ntlmv1_refused_by_default() {
    let fx = Fixture::new();
    for mode in [ClientMode::NtlmV1, ClientMode::NtlmV1Ess] {
        let err = fx
            .run(alice().with_options(opts(|o| o.mode = mode)))
            .unwrap_err();
        assert_eq!(err, NtlmError::NtlmV1Refused, "{mode:?}");
        assert_eq!(err.metric_label(), "ntlmv1_refused");
    }
    let err = fx
        .run(alice().with_options(opts(|o| o.mode = ClientMode::LmOnly)))
        .unwrap_err();
    assert_eq!(err, NtlmError::LmRefused);
}

#[test]
fn ntlmv1_accepted_when_allowed() {
    let fx = Fixture::with_config(|c| c.allow_ntlmv1 = true);
    for (mode, want) in [
        (ClientMode::NtlmV1, NtlmVersion::V1),
        (ClientMode::NtlmV1Ess, NtlmVersion::V1Ess),
    ] {
        let ok = fx
            .run(alice().with_options(opts(|o| o.mode = mode)))
            .unwrap();
        assert_eq!(ok.version, want);
        assert!(!ok.mic_verified);
        assert_eq!(
            ok.session_base_key,
            crypto::session_base_key_v1(&nt_hash(PASSWORD))
        );
        let bad = client("DEMO", "alice", "wrong").with_options(opts(|o| o.mode = mode));
        assert_eq!(fx.run(bad).unwrap_err(), NtlmError::BadCredentials);
        let unknown = client("DEMO", "nobody", PASSWORD).with_options(opts(|o| o.mode = mode));
        assert_eq!(fx.run(unknown).unwrap_err(), NtlmError::BadCredentials);
    }
    // LM-only stays refused: we hold no LM hashes.
    let err = fx
        .run(alice().with_options(opts(|o| o.mode = ClientMode::LmOnly)))
        .unwrap_err();
    assert_eq!(err, NtlmError::LmRefused);
}

#[test]
fn ntlmv1_cannot_satisfy_mic_or_binding_requirements() {
    let fx = Fixture::with_config(|c| {
        c.allow_ntlmv1 = true;
        c.require_mic = true;
    });
    let v1 = || alice().with_options(opts(|o| o.mode = ClientMode::NtlmV1));
    assert_eq!(fx.run(v1()).unwrap_err(), NtlmError::MicRequired);
    let fx = Fixture::with_config(|c| {
        c.allow_ntlmv1 = true;
        c.channel_binding = ChannelBindingMode::Required;
    });
    assert_eq!(
        fx.run_cb(v1(), Some(&CERT_HASH)).unwrap_err(),
        NtlmError::ChannelBindingRequired
    );
}

// --- replay -----------------------------------------------------------------

#[test]
fn replayed_authenticate_is_refused() {
    let fx = Fixture::new();
    let challenge = *b"samechal";
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, Some(challenge));
    fx.finish(server, &t3, None).unwrap();

    // Same bytes, new handshake that (wrongly) reuses the challenge.
    let mut server = fx.server(Some(challenge));
    // The MIC covers NEGOTIATE too, so the replayer resends the same one.
    server.challenge(&alice().negotiate()).unwrap();
    let err = fx.finish(server, &t3, None).unwrap_err();
    assert_eq!(err, NtlmError::Replay);
    assert_eq!(err.metric_label(), "replay");

    // With a fresh challenge the old response does not even verify.
    let mut server = fx.server(None);
    server.challenge(&alice().negotiate()).unwrap();
    assert_eq!(
        fx.finish(server, &t3, None).unwrap_err(),
        NtlmError::BadCredentials
    );
}

#[test]
fn replayed_ntlmv1_response_is_refused() {
    let fx = Fixture::with_config(|c| c.allow_ntlmv1 = true);
    let challenge = *b"v1v1v1v1";
    let mut c = alice().with_options(opts(|o| o.mode = ClientMode::NtlmV1));
    let (server, t3) = fx.exchange(&mut c, Some(challenge));
    fx.finish(server, &t3, None).unwrap();
    let mut server = fx.server(Some(challenge));
    server.challenge(&alice().negotiate()).unwrap();
    assert_eq!(fx.finish(server, &t3, None).unwrap_err(), NtlmError::Replay);
}

// --- MIC and blob integrity -------------------------------------------------

#[test]
fn corrupted_mic_is_refused() {
    let fx = Fixture::new();
    for key_exchange in [true, false] {
        let c = alice().with_options(opts(|o| {
            o.corrupt_mic = true;
            o.key_exchange = key_exchange;
        }));
        let err = fx.run(c).unwrap_err();
        assert_eq!(err, NtlmError::MicInvalid);
        assert_eq!(err.metric_label(), "mic_invalid");
    }
}

#[test]
fn stripping_the_mic_flag_breaks_the_proof() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, mut t3) = fx.exchange(&mut c, None);
    let at = av_offset(&t3, av_id::FLAGS) + 4;
    t3[at] &= !0x02; // claim "no MIC"
    t3[MIC_OFFSET..MIC_OFFSET + 16].fill(0);
    assert_eq!(
        fx.finish(server, &t3, None).unwrap_err(),
        NtlmError::BadCredentials
    );
}

#[test]
fn altering_msv_av_flags_breaks_the_proof() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, mut t3) = fx.exchange(&mut c, None);
    let at = av_offset(&t3, av_id::FLAGS) + 4;
    t3[at] |= 0x04;
    assert_eq!(
        fx.finish(server, &t3, None).unwrap_err(),
        NtlmError::BadCredentials
    );
}

#[test]
fn tampering_with_the_negotiate_is_caught_by_the_mic() {
    // A relay that rewrites NEGOTIATE flags (here: drops SIGN) before we see
    // them cannot fix the MIC, which the client keyed over what it sent.
    let fx = Fixture::new();
    let mut c = alice();
    let mut server = fx.server(None);
    let mut t1 = c.negotiate();
    t1[12] &= !0x10;
    let t2 = server.challenge(&t1).unwrap();
    let t3 = c.authenticate(&t2).unwrap();
    assert_eq!(
        fx.finish(server, &t3, None).unwrap_err(),
        NtlmError::MicInvalid
    );
}

#[test]
fn every_single_bit_flip_of_a_mic_protected_message_fails() {
    let fx = Fixture::new();
    let mut c = alice().with_options(opts(|o| o.session_key = Some([9; 16])));
    let negotiate = c.negotiate();
    let challenge = *b"flipflip";
    let mut server = fx.server(Some(challenge));
    let t2 = server.challenge(&negotiate).unwrap();
    let t3 = c.authenticate(&t2).unwrap();
    for i in 0..t3.len() {
        let mut bad = t3.clone();
        bad[i] ^= 0x01;
        let mut server = fx.server(Some(challenge));
        server.challenge(&negotiate).unwrap();
        assert!(
            fx.finish(server, &bad, None).is_err(),
            "flip at byte {i} went unnoticed"
        );
    }
    // The untouched message still verifies (the loop recorded no replay).
    let mut server = fx.server(Some(challenge));
    server.challenge(&negotiate).unwrap();
    fx.finish(server, &t3, None).unwrap();
}

// Edits of the target info (AV pairs) a client signs, as
// `ClientOptions::edit_av_pairs` functions (hence `&mut Vec`).
#[allow(clippy::ptr_arg)]
fn change_domain(p: &mut Vec<AvPair>) {
    for pair in p.iter_mut() {
        if pair.id == av_id::NB_DOMAIN_NAME {
            *pair = AvPair::name(av_id::NB_DOMAIN_NAME, "EVIL");
        }
    }
}

fn drop_timestamp(p: &mut Vec<AvPair>) {
    p.retain(|pair| pair.id != av_id::TIMESTAMP);
}

#[test]
fn altered_target_info_is_refused() {
    // The edit functions must have the `ClientOptions::edit_av_pairs` type.
    #[allow(clippy::ptr_arg)]
    fn change_timestamp(p: &mut Vec<AvPair>) {
        for pair in p.iter_mut() {
            if pair.id == av_id::TIMESTAMP {
                pair.value[0] ^= 1;
            }
        }
    }
    fn drop_dns_computer(p: &mut Vec<AvPair>) {
        p.retain(|pair| pair.id != av_id::DNS_COMPUTER_NAME);
    }
    fn add_target_name(p: &mut Vec<AvPair>) {
        // Windows adds MsvAvTargetName (the SPN); extra pairs are fine.
        p.push(AvPair::name(
            av_id::TARGET_NAME,
            "SMTPSVC/relay01.demo.test",
        ));
    }
    let fx = Fixture::new();
    for edit in [
        change_domain,
        drop_timestamp,
        change_timestamp,
        drop_dns_computer,
    ] {
        let c = alice().with_options(opts(|o| o.edit_av_pairs = Some(edit)));
        let err = fx.run(c).unwrap_err();
        assert_eq!(err, NtlmError::TargetInfoMismatch);
        assert_eq!(err.metric_label(), "target_info_mismatch");
    }
    let c = alice().with_options(opts(|o| o.edit_av_pairs = Some(add_target_name)));
    fx.run(c).unwrap();

    // A man in the middle editing the pairs after the fact breaks the proof.
    let mut c = alice();
    let (server, mut t3) = fx.exchange(&mut c, None);
    let at = av_offset(&t3, av_id::NB_DOMAIN_NAME) + 4;
    t3[at] = b'X';
    assert_eq!(
        fx.finish(server, &t3, None).unwrap_err(),
        NtlmError::BadCredentials
    );
}

// --- time -------------------------------------------------------------------

#[test]
fn slow_answer_is_out_of_window() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, None);
    fx.clock
        .advance(fx.config.timestamp_window + Duration::from_secs(1));
    let err = fx.finish(server, &t3, None).unwrap_err();
    assert_eq!(err, NtlmError::TimestampOutOfWindow);
    assert_eq!(err.metric_label(), "timestamp_out_of_window");
}

#[test]
fn answer_within_window_is_fine() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, None);
    fx.clock
        .advance(fx.config.timestamp_window - Duration::from_secs(1));
    fx.finish(server, &t3, None).unwrap();
}

#[test]
fn client_clock_skew_beyond_window_is_refused() {
    let fx = Fixture::new();
    let tick = 10_000_000u64; // one second in FILETIME units
    let window = fx.config.timestamp_window.as_secs();
    for (skew, ok) in [
        (-(window as i64) - 1, false),
        (window as i64 + 1, false),
        (-(window as i64) + 1, true),
        (window as i64 - 1, true),
    ] {
        let ts = (fx.now() as i64 + skew * tick as i64) as u64;
        let c = ClientHandshake::new(creds("DEMO", "alice", PASSWORD), *b"skewskew", Some(ts));
        let res = fx.run(curl_like(&fx, c));
        if ok {
            res.unwrap();
        } else {
            assert_eq!(
                res.unwrap_err(),
                NtlmError::TimestampOutOfWindow,
                "skew {skew}s"
            );
        }
    }
}

#[test]
fn clock_going_backwards_past_window_is_out_of_window() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, None);
    fx.clock
        .rewind(fx.config.timestamp_window + Duration::from_secs(1));
    assert_eq!(
        fx.finish(server, &t3, None).unwrap_err(),
        NtlmError::TimestampOutOfWindow
    );
}

// --- policy knobs -----------------------------------------------------------

#[test]
fn require_mic_refuses_clients_without_one() {
    let fx = Fixture::with_config(|c| c.require_mic = true);
    let err = fx
        .run(alice().with_options(opts(|o| o.mic = false)))
        .unwrap_err();
    assert_eq!(err, NtlmError::MicRequired);
    assert_eq!(err.metric_label(), "mic_required");
    assert!(fx.run(alice()).unwrap().mic_verified);
}

#[test]
fn channel_binding_table() {
    use ChannelBindingMode::*;
    #[derive(Debug, Clone, Copy)]
    enum Client {
        Unbound,
        Bound(&'static [u8]),
        /// Windows' "no binding available": 16 zero bytes.
        Zeros,
    }
    fn make(c: Client) -> ClientHandshake {
        fn zeros(p: &mut Vec<AvPair>) {
            p.push(AvPair::new(av_id::CHANNEL_BINDINGS, [0u8; 16]));
        }
        match c {
            Client::Unbound => alice(),
            Client::Bound(endpoint) => {
                alice().with_options(opts(|o| o.channel_binding = Some(endpoint.to_vec())))
            }
            Client::Zeros => alice().with_options(opts(|o| o.edit_av_pairs = Some(zeros))),
        }
    }
    const OTHER: &[u8] = &[0x24; 32];
    let ours: Option<&[u8]> = Some(&CERT_HASH);
    use Client::*;
    let cases = [
        (WhenSupported, Bound(&CERT_HASH), ours, Ok(true)),
        (Required, Bound(&CERT_HASH), ours, Ok(true)),
        (
            WhenSupported,
            Bound(OTHER),
            ours,
            Err(NtlmError::ChannelBindingMismatch),
        ),
        (
            Required,
            Bound(OTHER),
            ours,
            Err(NtlmError::ChannelBindingMismatch),
        ),
        (
            WhenSupported,
            Bound(&CERT_HASH),
            None,
            Err(NtlmError::ChannelBindingMismatch),
        ),
        (WhenSupported, Unbound, ours, Ok(false)),
        (WhenSupported, Unbound, None, Ok(false)),
        (WhenSupported, Zeros, ours, Ok(false)),
        (
            Required,
            Unbound,
            ours,
            Err(NtlmError::ChannelBindingRequired),
        ),
        (
            Required,
            Zeros,
            ours,
            Err(NtlmError::ChannelBindingRequired),
        ),
        (
            Required,
            Bound(&CERT_HASH),
            None,
            Err(NtlmError::ChannelBindingRequired),
        ),
        (Off, Bound(OTHER), ours, Ok(false)),
        (Off, Unbound, None, Ok(false)),
    ];
    for (mode, client, server_cb, want) in cases {
        let fx = Fixture::with_config(|c| c.channel_binding = mode);
        let got = fx.run_cb(make(client), server_cb).map(|a| a.channel_bound);
        assert_eq!(got, want, "{mode:?} {client:?} server {server_cb:?}");
        if let Err(e) = got {
            assert!(e.metric_label().starts_with("channel_binding_"));
        }
    }
}

#[test]
fn channel_binding_works_with_a_real_endpoint_value() {
    // tls_server_end_point() output plugs straight in on both sides.
    let fx = Fixture::with_config(|c| c.channel_binding = ChannelBindingMode::Required);
    let fake_cert = [
        &[
            0x30u8, 0x0d, 0x30, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70,
        ][..],
        &[0x03, 0x02, 0x00, 0x00],
    ]
    .concat();
    let endpoint = tls_server_end_point(&fake_cert).unwrap();
    let c = alice().with_options(opts(|o| o.channel_binding = Some(endpoint.clone())));
    assert!(fx.run_cb(c, Some(&endpoint)).unwrap().channel_bound);
}

// --- broken bytes -----------------------------------------------------------

fn assert_malformed(r: Result<impl std::fmt::Debug, NtlmError>, what: &str) {
    match r {
        Err(e @ NtlmError::Malformed(_)) => assert_eq!(e.metric_label(), "malformed"),
        other => panic!("{what}: expected Malformed, got {other:?}"),
    }
}

#[test]
fn garbage_negotiate_is_malformed() {
    let fx = Fixture::new();
    let big = [b"NTLMSSP\0\x01\0\0\0".as_slice(), &vec![0u8; 70_000]].concat();
    let cases: &[&[u8]] = &[
        b"",
        b"hello",
        b"NTLMSSP\0",
        b"NTLMSSP\0\x01\0\0\0",
        b"NTLMSSP\0\x09\0\0\0\0\0\0\0",
        // domain buffer pointing past the end
        b"NTLMSSP\0\x01\0\0\0\x07\x32\0\0\x05\0\x05\0\x20\0\0\0\0\0\0\0\0\0\0\0",
        &big,
    ];
    for input in cases {
        assert_malformed(fx.server(None).challenge(input), &format!("{input:?}"));
    }
}

#[test]
fn out_of_sequence_messages() {
    let fx = Fixture::new();
    let mut c = alice();
    let mut server = fx.server(None);
    let t1 = c.negotiate();
    let t2 = server.challenge(&t1).unwrap();
    assert_eq!(
        server.challenge(&t1).unwrap_err(),
        NtlmError::UnexpectedMessage
    );
    let t3 = c.authenticate(&t2).unwrap();
    // AUTHENTICATE where NEGOTIATE is expected, and vice versa.
    assert_eq!(
        fx.server(None).challenge(&t3).unwrap_err(),
        NtlmError::UnexpectedMessage
    );
    let mut s = fx.server(None);
    s.challenge(&t1).unwrap();
    let e = fx.finish(s, &t1, None).unwrap_err();
    assert_eq!(e, NtlmError::UnexpectedMessage);
    assert_eq!(e.metric_label(), "unexpected_message");
    // AUTHENTICATE before any CHALLENGE was sent.
    assert_eq!(
        fx.finish(fx.server(None), &t3, None).unwrap_err(),
        NtlmError::UnexpectedMessage
    );
    // The client refuses a CHALLENGE before it sent NEGOTIATE.
    assert_eq!(
        alice().authenticate(&t2).unwrap_err(),
        NtlmError::UnexpectedMessage
    );
}

#[test]
fn every_truncation_of_authenticate_fails_without_panicking() {
    let fx = Fixture::new();
    for mic in [true, false] {
        let mut c = alice().with_options(opts(|o| o.mic = mic));
        let negotiate = c.negotiate();
        let mut server = fx.server(Some(*b"truncate"));
        let t2 = server.challenge(&negotiate).unwrap();
        let t3 = c.authenticate(&t2).unwrap();
        for len in 0..t3.len() {
            let mut s = fx.server(Some(*b"truncate"));
            s.challenge(&negotiate).unwrap();
            let r = fx.finish(s, &t3[..len], None);
            assert!(r.is_err(), "truncated to {len} accepted");
            if len < 64 || len < nt_offset(&t3) + 16 {
                assert_malformed(r, &format!("truncated to {len}"));
            }
        }
    }
}

#[test]
fn malformed_authenticate_table() {
    let fx = Fixture::new();
    let mut c = alice();
    let negotiate = c.negotiate();
    let mut server = fx.server(Some(*b"tabletab"));
    let t2 = server.challenge(&negotiate).unwrap();
    let good = c.authenticate(&t2).unwrap();
    let nt_off = nt_offset(&good);

    let patch = |edits: &[(usize, &[u8])]| {
        let mut m = good.clone();
        for (at, bytes) in edits {
            m[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        m
    };
    let oversized = [good.clone(), vec![0u8; 70_000]].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        (
            "garbage",
            b"\xff\xfe garbage that is long enough to be a header, or is it? ...........".to_vec(),
        ),
        ("bad signature", patch(&[(0, &b"NTLMSSQ\0"[..])])),
        ("unknown type", patch(&[(8, &b"\x07"[..])])),
        ("oversized", oversized),
        ("header only", good[..64].to_vec()),
        ("NT response past end", patch(&[(20, &b"\xff\x7f"[..])])),
        (
            "NT offset past end",
            patch(&[(24, &b"\xff\xff\xff\x7f"[..])]),
        ),
        ("NT offset wraps", patch(&[(24, &b"\xff\xff\xff\xff"[..])])),
        (
            "user inside header",
            patch(&[(36, &b"\x02\0\x02\0\x10\0\0\0"[..])]),
        ),
        (
            "odd-length UTF-16 user",
            patch(&[(36, &b"\x03\0\x03\0"[..])]),
        ),
        ("NT response 30 bytes", patch(&[(20, &b"\x1e\0\x1e\0"[..])])),
        ("session key 5 bytes", patch(&[(52, &b"\x05\0\x05\0"[..])])),
        ("blob resp type", patch(&[(nt_off + 16, &b"\x02"[..])])),
        (
            "AV pair length past end",
            patch(&[(nt_off + 16 + 28 + 2, &b"\xff\xff"[..])]),
        ),
        (
            "LM 7 bytes, no NT",
            patch(&[(12, &b"\x07\0\x07\0"[..]), (20, &b"\0\0\0\0"[..])]),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = fx.server(Some(*b"tabletab"));
        s.challenge(&negotiate).unwrap();
        assert_malformed(fx.finish(s, &bytes, None), what);
    }
}

#[test]
fn mic_flag_without_room_for_a_mic_is_malformed() {
    // A client whose blob claims a MIC but whose header has no MIC field.
    let fx = Fixture::new();
    let mut c = alice();
    let negotiate = c.negotiate();
    let mut server = fx.server(Some(*b"nomicfld"));
    let t2 = server.challenge(&negotiate).unwrap();
    let t3 = c.authenticate(&t2).unwrap();
    let m = message::AuthenticateMessage::parse(&t3).unwrap();
    let short = m.encode(false); // same fields, 64-byte header
    assert_malformed(fx.finish(server, &short, None), "MIC flagged, short header");
}

#[test]
fn pseudo_random_inputs_never_panic() {
    // A cheap in-tree stand-in for the cargo-fuzz targets: xorshift noise,
    // and noise spliced into a valid message.
    let fx = Fixture::new();
    let mut c = alice();
    let negotiate = c.negotiate();
    let mut server = fx.server(Some(*b"noisynoi"));
    let t2 = server.challenge(&negotiate).unwrap();
    let good = c.authenticate(&t2).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..3000 {
        let mut msg = if round % 2 == 0 {
            let len = (next() % 300) as usize;
            let mut m: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if m.len() >= 12 {
                m[..8].copy_from_slice(b"NTLMSSP\0");
                m[8] = (next() % 4) as u8;
                m[9..12].fill(0);
            }
            m
        } else {
            good.clone()
        };
        let n = msg.len().max(1);
        for _ in 0..(next() % 8) {
            let i = (next() as usize) % n;
            if i < msg.len() {
                msg[i] = next() as u8;
            }
        }
        let _ = fx.server(None).challenge(&msg);
        let mut s = fx.server(Some(*b"noisynoi"));
        s.challenge(&negotiate).unwrap();
        let _ = fx.finish(s, &msg, None);
        let _ = ChallengeMessage::parse(&msg);
    }
}

#[test]
fn metric_labels_are_distinct() {
    let all = [
        NtlmError::Malformed("x"),
        NtlmError::UnexpectedMessage,
        NtlmError::Anonymous,
        NtlmError::NtlmV1Refused,
        NtlmError::LmRefused,
        NtlmError::BadCredentials,
        NtlmError::AccountDisabled,
        NtlmError::Replay,
        NtlmError::MicInvalid,
        NtlmError::MicRequired,
        NtlmError::TargetInfoMismatch,
        NtlmError::TimestampOutOfWindow,
        NtlmError::ChannelBindingMismatch,
        NtlmError::ChannelBindingRequired,
    ];
    let labels: std::collections::BTreeSet<_> = all.iter().map(NtlmError::metric_label).collect();
    assert_eq!(labels.len(), all.len());
    assert!(all.iter().filter(|e| e.is_protocol_error()).count() == 2);
}

// --- real clients -----------------------------------------------------------
//
// AUTHENTICATE messages captured from real clients answering CHALLENGEs our
// server produced (fixed challenge, clock at `unix_ms`), replayed here so a
// change that breaks a real client fails in CI, not in production.

struct Capture {
    negotiate: &'static str,
    authenticate: &'static str,
    unix_ms: u64,
    challenge: [u8; 8],
}

/// curl 7.88.1: `curl smtp://… --login-options AUTH=NTLM -u 'DEMO\alice:…'`.
/// OEM-only NEGOTIATE, 64-byte AUTHENTICATE header, real LMv2, its own clock
/// in the blob, no MIC.
const CURL_7_88: Capture = Capture {
    negotiate: "TlRMTVNTUAABAAAABoIIAAAAAAAAAAAAAAAAAAAAAAA=",
    authenticate: "TlRMTVNTUAADAAAAGAAYAEAAAACaAJoAWAAAAAgACADyAAAACgAKAPoAAAAWABYABAEAAAAAAAAAAAAABYKJApGfuSpxUDiOPBOKmZ7g+AEml0LoVuJOZGTbijKm6UTzvMXWk0CSoI0BAQAAAAAAAAA+6ZWLfd0BJpdC6FbiTmQAAAAAAgAIAEQARQBNAE8AAQAOAFIARQBMAEEAWQAwADEABAASAGQAZQBtAG8ALgB0AGUAcwB0AAMAIgByAGUAbABhAHkAMAAxAC4AZABlAG0AbwAuAHQAZQBzAHQABwAIAJDw8ZWLfd0BAAAAAAAAAABEAEUATQBPAGEAbABpAGMAZQBXAE8AUgBLAFMAVABBAFQASQBPAE4A",
    unix_ms: 1_795_686_636_057,
    challenge: *b"\x01\x23\x45\x67\x89\xab\xcd\xef",
};

/// impacket 0.10.0 `getNTLMSSPType3(..., use_ntlmv2=True)`: re-encodes the
/// AV pairs and adds MsvAvTargetName, sends a KEY_EXCH session key, no MIC.
const IMPACKET_0_10: Capture = Capture {
    negotiate: "TlRMTVNTUAABAAAANYKI4AAAAAAAAAAAAAAAAAAAAAA=",
    authenticate: "TlRMTVNTUAADAAAAGAAYAFoAAAC2ALYAcgAAAAgACABAAAAACgAKAEgAAAAIAAgAUgAAABAAEAAoAQAANYKI4EQARQBNAE8AYQBsAGkAYwBlAFcAUwAwADEAz1TTOe+FDPDsA7gYNec9qlU0aklBU2Z6PawX3SDQr3xvbIVj17oWEwEBAAAAAAAAcIXJmYt93QFVNGpJQVNmegAAAAACAAgARABFAE0ATwABAA4AUgBFAEwAQQBZADAAMQAEABIAZABlAG0AbwAuAHQAZQBzAHQAAwAiAHIAZQBsAGEAeQAwADEALgBkAGUAbQBvAC4AdABlAHMAdAAHAAgAcIXJmYt93QEJABgAYwBpAGYAcwAvAFIARQBMAEEAWQAwADEAAAAAAAAAAACYpoDKuIe6G7Uu8U+4hUkL",
    unix_ms: 1_795_686_642_503,
    challenge: *b"\xf0\x0d\xfa\xce\xca\xfe\xbe\xef",
};

fn replay_capture(cap: &Capture, after: Duration) -> Result<Authenticated, NtlmError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let fx = Fixture::new();
    fx.clock
        .set(std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(cap.unix_ms));
    let mut server = fx.server(Some(cap.challenge));
    server
        .challenge(&b64.decode(cap.negotiate).unwrap())
        .unwrap();
    fx.clock.advance(after);
    fx.finish(server, &b64.decode(cap.authenticate).unwrap(), None)
}

#[test]
fn curl_7_88_authenticate_verifies() {
    let ok = replay_capture(&CURL_7_88, Duration::from_secs(1)).unwrap();
    assert_eq!(ok.version, NtlmVersion::V2);
    assert!(!ok.mic_verified);
    assert_eq!(ok.workstation, "WORKSTATION");
    assert_eq!(
        replay_capture(&CURL_7_88, Duration::from_secs(600)).unwrap_err(),
        NtlmError::TimestampOutOfWindow
    );
}

#[test]
fn impacket_authenticate_verifies() {
    let ok = replay_capture(&IMPACKET_0_10, Duration::from_secs(1)).unwrap();
    assert_eq!(ok.version, NtlmVersion::V2);
    assert_eq!(ok.workstation, "WS01");
}

// --- fuzz seeds -------------------------------------------------------------

/// Writes `fuzz/seeds/`. Run after changing the client or the fuzz fixture:
/// `cargo test -p relayguard-policy -- --ignored write_fuzz_seeds`.
///
/// The constants must match `fuzz/fuzz_targets/ntlm_authenticate.rs` so the
/// client-generated seeds verify there and the fuzzer starts from messages
/// that reach the MIC, replay and account checks.
#[test]
#[ignore = "writes files; run on purpose"]
fn write_fuzz_seeds() {
    use base64::Engine as _;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    // Shared with the fuzz target.
    const CHALLENGE: [u8; 8] = *b"fuzzfuzz";
    let fx = Fixture::new(); // ManualClock::default(), DEMO\alice / PASSWORD
    let negotiate = alice().negotiate();

    let seed = |name: &str, mut c: ClientHandshake| {
        c.negotiate();
        let mut server = fx.server(Some(CHALLENGE));
        let t2 = server.challenge(&negotiate).unwrap();
        let t3 = c.authenticate(&t2).unwrap();
        write("ntlm_authenticate", name, &t3);
        (server, t3)
    };
    let (server, t3) = seed(
        "client_v2_mic",
        alice().with_options(opts(|o| o.session_key = Some([0x55; 16]))),
    );
    fx.finish(server, &t3, None).expect("seed must verify");
    seed("client_v2_no_mic", curl_like(&fx, alice()));
    seed(
        "client_v1_ess",
        alice().with_options(opts(|o| o.mode = ClientMode::NtlmV1Ess)),
    );
    seed(
        "client_anonymous",
        client("", "", "").with_options(opts(|o| o.mode = ClientMode::Anonymous)),
    );
    seed(
        "client_channel_bound",
        alice().with_options(opts(|o| o.channel_binding = Some(CERT_HASH.to_vec()))),
    );

    let b64 = base64::engine::general_purpose::STANDARD;
    write(
        "ntlm_authenticate",
        "curl_7_88",
        &b64.decode(CURL_7_88.authenticate).unwrap(),
    );
    write(
        "ntlm_authenticate",
        "impacket_0_10",
        &b64.decode(IMPACKET_0_10.authenticate).unwrap(),
    );
    let spec_challenge = hex::decode(
        "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef00000000000000002400240044000000060070170000000f53006500720076006500720002000c0044006f006d00610069006e0001000c0053006500720076006500720000000000",
    )
    .unwrap();
    for target in ["ntlm_authenticate", "ntlm_negotiate"] {
        write(target, "ms_nlmp_4_2_4_challenge", &spec_challenge);
    }
    write("ntlm_negotiate", "client", &negotiate);
    write(
        "ntlm_negotiate",
        "curl_7_88",
        &b64.decode(CURL_7_88.negotiate).unwrap(),
    );
    write(
        "ntlm_negotiate",
        "impacket_0_10",
        &b64.decode(IMPACKET_0_10.negotiate).unwrap(),
    );
    let with_names = message::NegotiateMessage {
        flags: 0xe208_b297,
        domain: b"DEMO".to_vec(),
        workstation: b"WS01".to_vec(),
        version: Some([10, 0, 0x61, 0x4a, 0, 0, 0, 15]),
    };
    write("ntlm_negotiate", "oem_names", &with_names.encode());
}

#[test]
fn debug_output_hides_secrets() {
    let fx = Fixture::new();
    let ok = fx.run(alice()).unwrap();
    let dbg = format!("{ok:?} {:?}", creds("DEMO", "alice", PASSWORD));
    assert!(dbg.contains("redacted"));
    assert!(!dbg.contains(PASSWORD));
    assert!(!dbg.contains(&format!("{:?}", ok.session_base_key)));
}

// --- split verification: a domain controller checks the proof ---------------

/// What a domain controller does with a pass-through request (Samba's
/// `ntlm_auth --helper-protocol=ntlm-server-1`, netlogon): checks the proof
/// for exactly these user, domain, challenge and NT response against the
/// password it holds and returns the SessionBaseKey.
fn dc_verify(
    user: &str,
    domain: &str,
    challenge: [u8; 8],
    nt: &[u8],
    password: &str,
) -> Option<[u8; 16]> {
    let h = nt_hash(password);
    if nt.len() == 24 {
        let ok = crypto::ntlmv1_response(&h, &challenge)[..] == *nt;
        return ok.then(|| crypto::session_base_key_v1(&h));
    }
    let key = crypto::ntowfv2(&h, user, domain);
    let proof = crypto::nt_proof_str(&key, &challenge, &nt[16..]);
    (proof[..] == nt[..16]).then(|| crypto::session_base_key_v2(&key, &proof))
}

/// Alice as a directory describes her (not the users file's groups).
fn directory_alice() -> Account {
    Account {
        user: "alice".into(),
        domain: "DEMO".into(),
        nt_hash: [0; 16],
        groups: vec!["from-directory".into()],
        enabled: true,
        mail: vec!["alice@demo.test".into()],
    }
}

impl Fixture {
    /// The gateway's AD path: begin, ask the "DC" (which knows alice's
    /// password as `PASSWORD`), finish with its key.
    fn finish_via_dc(
        &self,
        server: ServerHandshake,
        t3: &[u8],
        cb: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        let pending = server.begin_authenticate(t3)?;
        let key = dc_verify(
            pending.user(),
            pending.domain(),
            pending.external_challenge(),
            pending.nt_response(),
            PASSWORD,
        )
        .ok_or(NtlmError::BadCredentials)?;
        pending.finish_external(directory_alice(), key, &self.replay, cb)
    }
}

#[test]
fn begin_authenticate_exposes_what_a_dc_needs() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, Some(*b"dc-chall"));
    let p = server.begin_authenticate(&t3).unwrap();
    assert_eq!(
        (p.user(), p.domain(), p.workstation()),
        ("alice", "DEMO", "WS01")
    );
    assert_eq!(p.server_challenge(), *b"dc-chall");
    assert_eq!(p.external_challenge(), *b"dc-chall");
    assert_eq!(p.version(), NtlmVersion::V2);
    let nt_off = nt_offset(&t3);
    assert_eq!(p.nt_response(), &t3[nt_off..nt_off + p.nt_response().len()]);
    assert!(p.nt_response().len() > 24);
    // Windows-style: Z(24) as the LM response when the server sent a timestamp.
    assert_eq!(p.lm_response(), &[0u8; 24][..]);
    let dbg = format!("{p:?}");
    assert!(dbg.contains("alice") && !dbg.contains(&format!("{:?}", p.nt_response())));
}

#[test]
fn finish_external_with_the_dc_key_authenticates_with_directory_data() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, None);
    let ok = fx.finish_via_dc(server, &t3, None).unwrap();
    assert_eq!(ok.account, directory_alice());
    assert_eq!(ok.version, NtlmVersion::V2);
    assert!(ok.mic_verified, "the DC's key verifies the MIC");
    assert_eq!(ok.workstation, "WS01");
    let nt = &t3[nt_offset(&t3)..];
    let proof: [u8; 16] = nt[..16].try_into().unwrap();
    let key = crypto::ntowfv2(&nt_hash(PASSWORD), "alice", "DEMO");
    assert_eq!(
        ok.session_base_key,
        crypto::session_base_key_v2(&key, &proof)
    );
}

#[test]
fn finish_external_with_a_wrong_key_fails_the_mic() {
    let fx = Fixture::new();
    for key_exchange in [true, false] {
        let mut c = alice().with_options(opts(|o| o.key_exchange = key_exchange));
        let (server, t3) = fx.exchange(&mut c, None);
        let pending = server.begin_authenticate(&t3).unwrap();
        let err = pending
            .finish_external(directory_alice(), [0x11; 16], &fx.replay, None)
            .unwrap_err();
        assert_eq!(err, NtlmError::MicInvalid, "key exchange {key_exchange}");
    }
}

#[test]
fn external_and_local_verification_refuse_the_same_things() {
    const OTHER: &[u8] = &[0x24; 32];
    type Edit = fn(&mut NtlmConfig);
    struct Case {
        what: &'static str,
        config: Edit,
        client: fn() -> ClientHandshake,
        /// Seconds the server clock moves between CHALLENGE and AUTHENTICATE.
        delay: u64,
        tls: Option<&'static [u8]>,
        want: Result<(bool, bool), NtlmError>,
    }
    let none: Edit = |_| {};
    let cases = [
        Case {
            what: "honest, MIC",
            config: none,
            client: alice,
            delay: 0,
            tls: None,
            want: Ok((true, false)),
        },
        Case {
            what: "curl-like, no MIC",
            config: none,
            client: || {
                alice().with_options(opts(|o| {
                    o.mic = false;
                    o.key_exchange = false;
                }))
            },
            delay: 0,
            tls: None,
            want: Ok((false, false)),
        },
        Case {
            what: "bound to our certificate",
            config: |c| c.channel_binding = ChannelBindingMode::Required,
            client: || alice().with_options(opts(|o| o.channel_binding = Some(CERT_HASH.to_vec()))),
            delay: 0,
            tls: Some(&CERT_HASH),
            want: Ok((true, true)),
        },
        Case {
            what: "target info altered",
            config: none,
            client: || alice().with_options(opts(|o| o.edit_av_pairs = Some(change_domain))),
            delay: 0,
            tls: None,
            want: Err(NtlmError::TargetInfoMismatch),
        },
        Case {
            what: "timestamp dropped",
            config: none,
            client: || alice().with_options(opts(|o| o.edit_av_pairs = Some(drop_timestamp))),
            delay: 0,
            tls: None,
            want: Err(NtlmError::TargetInfoMismatch),
        },
        Case {
            what: "answer too late",
            config: none,
            client: alice,
            delay: NtlmConfig::DEFAULT_TIMESTAMP_WINDOW.as_secs() + 1,
            tls: None,
            want: Err(NtlmError::TimestampOutOfWindow),
        },
        Case {
            what: "corrupted MIC",
            config: none,
            client: || alice().with_options(opts(|o| o.corrupt_mic = true)),
            delay: 0,
            tls: None,
            want: Err(NtlmError::MicInvalid),
        },
        Case {
            what: "bound to another TLS session",
            config: none,
            client: || alice().with_options(opts(|o| o.channel_binding = Some(OTHER.to_vec()))),
            delay: 0,
            tls: Some(&CERT_HASH),
            want: Err(NtlmError::ChannelBindingMismatch),
        },
        Case {
            what: "binding required, none sent",
            config: |c| c.channel_binding = ChannelBindingMode::Required,
            client: alice,
            delay: 0,
            tls: Some(&CERT_HASH),
            want: Err(NtlmError::ChannelBindingRequired),
        },
        Case {
            what: "MIC required, none sent",
            config: |c| c.require_mic = true,
            client: || alice().with_options(opts(|o| o.mic = false)),
            delay: 0,
            tls: None,
            want: Err(NtlmError::MicRequired),
        },
        Case {
            what: "wrong password",
            config: none,
            client: || client("DEMO", "alice", "wrong"),
            delay: 0,
            tls: None,
            want: Err(NtlmError::BadCredentials),
        },
    ];
    for case in cases {
        for external in [false, true] {
            let fx = Fixture::with_config(case.config);
            let mut c = (case.client)();
            let (server, t3) = fx.exchange(&mut c, None);
            fx.clock.advance(Duration::from_secs(case.delay));
            let got = if external {
                fx.finish_via_dc(server, &t3, case.tls)
            } else {
                fx.finish(server, &t3, case.tls)
            };
            assert_eq!(
                got.map(|a| (a.mic_verified, a.channel_bound)),
                case.want,
                "{} ({})",
                case.what,
                if external { "external" } else { "local" }
            );
        }
    }
}

#[test]
fn a_response_accepted_on_one_path_is_a_replay_on_the_other() {
    let fx = Fixture::new();
    let challenge = *b"replayed";
    let mut c = alice();
    let negotiate = c.negotiate();
    let mut first = fx.server(Some(challenge));
    let t2 = first.challenge(&negotiate).unwrap();
    let t3 = c.authenticate(&t2).unwrap();
    let again = || {
        let mut s = fx.server(Some(challenge));
        s.challenge(&negotiate).unwrap();
        s
    };
    fx.finish(first, &t3, None).unwrap();
    assert_eq!(
        fx.finish_via_dc(again(), &t3, None).unwrap_err(),
        NtlmError::Replay
    );

    let fx = Fixture::new();
    let mut s = fx.server(Some(challenge));
    s.challenge(&negotiate).unwrap();
    fx.finish_via_dc(s, &t3, None).unwrap();
    let mut s = fx.server(Some(challenge));
    s.challenge(&negotiate).unwrap();
    assert_eq!(fx.finish(s, &t3, None).unwrap_err(), NtlmError::Replay);
    let mut s = fx.server(Some(challenge));
    s.challenge(&negotiate).unwrap();
    assert_eq!(
        fx.finish_via_dc(s, &t3, None).unwrap_err(),
        NtlmError::Replay
    );
}

#[test]
fn finish_external_refuses_a_disabled_directory_account() {
    let fx = Fixture::new();
    let mut c = alice();
    let (server, t3) = fx.exchange(&mut c, None);
    let pending = server.begin_authenticate(&t3).unwrap();
    let key = dc_verify(
        "alice",
        "DEMO",
        pending.server_challenge(),
        pending.nt_response(),
        PASSWORD,
    )
    .unwrap();
    let disabled = Account {
        enabled: false,
        ..directory_alice()
    };
    assert_eq!(
        pending
            .finish_external(disabled, key, &fx.replay, None)
            .unwrap_err(),
        NtlmError::AccountDisabled
    );
}

#[test]
fn begin_authenticate_refuses_by_policy_before_any_proof() {
    // These must never reach a domain controller: they are refused whatever
    // the password, so a wrong one gives the policy error, not BadCredentials.
    let fx = Fixture::with_config(|c| c.require_mic = true);
    let mut c = client("DEMO", "alice", "wrong").with_options(opts(|o| o.mic = false));
    let (server, t3) = fx.exchange(&mut c, None);
    assert_eq!(
        server.begin_authenticate(&t3).unwrap_err(),
        NtlmError::MicRequired
    );
    let fx = Fixture::new();
    for (mode, want) in [
        (ClientMode::NtlmV1, NtlmError::NtlmV1Refused),
        (ClientMode::NtlmV1Ess, NtlmError::NtlmV1Refused),
        (ClientMode::LmOnly, NtlmError::LmRefused),
        (ClientMode::Anonymous, NtlmError::Anonymous),
    ] {
        let mut c = client("DEMO", "alice", "wrong").with_options(opts(|o| o.mode = mode));
        let (server, t3) = fx.exchange(&mut c, None);
        assert_eq!(
            server.begin_authenticate(&t3).unwrap_err(),
            want,
            "{mode:?}"
        );
    }
    let fx = Fixture::with_config(|c| {
        c.allow_ntlmv1 = true;
        c.channel_binding = ChannelBindingMode::Required;
    });
    let mut c =
        client("DEMO", "alice", "wrong").with_options(opts(|o| o.mode = ClientMode::NtlmV1));
    let (server, t3) = fx.exchange(&mut c, None);
    assert_eq!(
        server.begin_authenticate(&t3).unwrap_err(),
        NtlmError::ChannelBindingRequired
    );
}

#[test]
fn a_dc_verifies_ntlmv1_against_the_external_challenge() {
    let fx = Fixture::with_config(|c| c.allow_ntlmv1 = true);
    for (mode, want) in [
        (ClientMode::NtlmV1, NtlmVersion::V1),
        (ClientMode::NtlmV1Ess, NtlmVersion::V1Ess),
    ] {
        let mut c = alice().with_options(opts(|o| o.mode = mode));
        let (server, t3) = fx.exchange(&mut c, None);
        let pending = server.begin_authenticate(&t3).unwrap();
        assert_eq!(pending.version(), want);
        if want == NtlmVersion::V1 {
            assert_eq!(pending.external_challenge(), pending.server_challenge());
        } else {
            assert_ne!(pending.external_challenge(), pending.server_challenge());
        }
        // A DC that knows nothing of ESS checks a plain v1 response.
        let key = dc_verify(
            "alice",
            "DEMO",
            pending.external_challenge(),
            pending.nt_response(),
            PASSWORD,
        )
        .expect("the DC accepts the response");
        let ok = pending
            .finish_external(directory_alice(), key, &fx.replay, None)
            .unwrap();
        assert_eq!(ok.version, want);
        assert!(!ok.mic_verified);
    }
}
