//! The server side of one NTLM exchange: NEGOTIATE in, CHALLENGE out,
//! AUTHENTICATE verified against a [`CredentialStore`] or, split in two
//! ([`ServerHandshake::begin_authenticate`], then
//! [`PendingAuthenticate::finish_external`]), by a domain controller.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::OsRng;
use rand::RngCore;
use subtle::ConstantTimeEq;

use super::channel_binding::channel_bindings_hash;
use super::crypto;
use super::message::{
    av_id, encode_av_pairs, encode_string, filetime, filetime_distance, flags, le_u32, le_u64,
    walk_av_pairs, AuthenticateMessage, AvPair, ChallengeMessage, NegotiateMessage,
    MSV_AV_FLAG_MIC_PRESENT,
};
use super::{Authenticated, ChannelBindingMode, NtlmConfig, NtlmError, NtlmVersion};
use crate::clock::Clock;
use crate::identity::{upcase_char, Account, CredentialStore};

/// Version we announce: Windows 10.0 build 20348, NTLM revision 15. Clients
/// only look at the revision; the rest is informational.
const VERSION: [u8; 8] = [10, 0, 0x7c, 0x4f, 0, 0, 0, 0x0f];

/// Flags echoed from the client's NEGOTIATE when it asks for them. They
/// only matter for signing/sealing, which SMTP never uses, but echoing keeps
/// clients on their normal code path (KEY_EXCH in particular makes Windows
/// send the random session key its MIC is keyed with).
const ECHOED_FLAGS: u32 = flags::NEGOTIATE_128
    | flags::NEGOTIATE_56
    | flags::NEGOTIATE_KEY_EXCH
    | flags::NEGOTIATE_SIGN
    | flags::NEGOTIATE_SEAL
    | flags::NEGOTIATE_ALWAYS_SIGN;

/// Verifications for unknown users run against this hash so they cost the
/// same as for known ones. Its value is irrelevant: an unknown user fails
/// whatever the comparison says.
const DUMMY_NT_HASH: [u8; 16] = [
    0x5f, 0x1d, 0x26, 0x8b, 0x9e, 0x02, 0xc4, 0x71, 0x3a, 0xe8, 0x50, 0x97, 0x0c, 0xb6, 0x44, 0xd3,
];

/// One authentication attempt, created per `AUTH NTLM` command.
///
/// Holds the random server challenge and, once the CHALLENGE is sent, the
/// exact NEGOTIATE and CHALLENGE bytes: the MIC covers all three messages.
pub struct ServerHandshake {
    config: NtlmConfig,
    clock: Arc<dyn Clock>,
    server_challenge: [u8; 8],
    state: State,
}

enum State {
    AwaitingNegotiate,
    AwaitingAuthenticate(Challenged),
}

struct Challenged {
    negotiate: Vec<u8>,
    challenge: Vec<u8>,
    /// Where the target info sits inside `challenge`.
    target_info: std::ops::Range<usize>,
    /// FILETIME we put in MsvAvTimestamp.
    issued: u64,
}

impl fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandshake")
            .field(
                "state",
                &match self.state {
                    State::AwaitingNegotiate => "awaiting_negotiate",
                    State::AwaitingAuthenticate(_) => "awaiting_authenticate",
                },
            )
            .finish_non_exhaustive()
    }
}

impl ServerHandshake {
    /// A handshake with a fresh challenge from the OS RNG.
    ///
    /// Panics only if the OS has no entropy source, which no supported
    /// platform lacks once booted.
    pub fn new(config: &NtlmConfig, clock: Arc<dyn Clock>) -> Self {
        let mut challenge = [0u8; 8];
        OsRng.fill_bytes(&mut challenge);
        Self::with_challenge(config, clock, challenge)
    }

    /// A handshake with a chosen challenge, for tests and known-answer
    /// vectors. A predictable challenge in production would allow replay.
    pub fn with_challenge(config: &NtlmConfig, clock: Arc<dyn Clock>, challenge: [u8; 8]) -> Self {
        Self {
            config: config.clone(),
            clock,
            server_challenge: challenge,
            state: State::AwaitingNegotiate,
        }
    }

    /// Parses the NEGOTIATE (type 1) message and returns the CHALLENGE
    /// (type 2) to send.
    ///
    /// We always offer extended session security and target info, whatever
    /// the client asked: curl only computes NTLMv2 when both are present.
    pub fn challenge(&mut self, negotiate: &[u8]) -> Result<Vec<u8>, NtlmError> {
        if !matches!(self.state, State::AwaitingNegotiate) {
            return Err(NtlmError::UnexpectedMessage);
        }
        let neg = NegotiateMessage::parse(negotiate)?;
        let cfg = &self.config;
        let mut f = flags::NEGOTIATE_UNICODE
            | flags::NEGOTIATE_NTLM
            | flags::REQUEST_TARGET
            | flags::TARGET_TYPE_DOMAIN
            | flags::NEGOTIATE_TARGET_INFO
            | flags::NEGOTIATE_EXTENDED_SESSIONSECURITY
            | (neg.flags & ECHOED_FLAGS);
        if cfg.send_version {
            f |= flags::NEGOTIATE_VERSION;
        }
        let issued = filetime(self.clock.now());
        let mut pairs = vec![
            AvPair::name(av_id::NB_DOMAIN_NAME, &cfg.netbios_domain),
            AvPair::name(av_id::NB_COMPUTER_NAME, &cfg.netbios_computer),
            AvPair::name(av_id::DNS_DOMAIN_NAME, &cfg.dns_domain),
            AvPair::name(av_id::DNS_COMPUTER_NAME, &cfg.dns_computer),
        ];
        if let Some(tree) = &cfg.dns_tree {
            pairs.push(AvPair::name(av_id::DNS_TREE_NAME, tree));
        }
        pairs.push(AvPair::new(av_id::TIMESTAMP, issued.to_le_bytes()));
        let msg = ChallengeMessage {
            flags: f,
            server_challenge: self.server_challenge,
            target_name: encode_string(&cfg.netbios_domain, true),
            target_info: encode_av_pairs(&pairs),
            version: cfg.send_version.then_some(VERSION),
        };
        let bytes = msg.encode();
        let start = bytes.len() - msg.target_info.len();
        self.state = State::AwaitingAuthenticate(Challenged {
            negotiate: negotiate.to_vec(),
            target_info: start..bytes.len(),
            challenge: bytes.clone(),
            issued,
        });
        Ok(bytes)
    }

    /// Verifies the AUTHENTICATE (type 3) message against local NT hashes:
    /// [`ServerHandshake::begin_authenticate`] then
    /// [`PendingAuthenticate::verify_local`].
    ///
    /// `channel_binding` is the RFC 5929 `tls-server-end-point` value of the
    /// certificate this session presented (see [`super::tls_server_end_point`]),
    /// or `None` outside TLS.
    ///
    /// Checks run cheapest and credential-independent first (structure,
    /// anonymous, NTLMv1 policy, MIC requirement), then the proof; everything
    /// after the proof is reported only to a client that knows the password.
    pub fn authenticate(
        self,
        authenticate: &[u8],
        store: &dyn CredentialStore,
        replay: &ReplayCache,
        channel_binding: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        self.begin_authenticate(authenticate)?
            .verify_local(store, replay, channel_binding)
    }

    /// Parses the AUTHENTICATE (type 3) message and runs every check that
    /// does not need the password: structure, anonymous, LM and NTLMv1
    /// policy, and whether a required MIC (or a channel binding NTLMv1
    /// cannot carry) is present.
    ///
    /// The result is verified either here ([`PendingAuthenticate::verify_local`])
    /// or by a domain controller, whose answer goes to
    /// [`PendingAuthenticate::finish_external`]. Both end in the same
    /// post-proof checks.
    pub fn begin_authenticate(self, authenticate: &[u8]) -> Result<PendingAuthenticate, NtlmError> {
        let State::AwaitingAuthenticate(challenged) = self.state else {
            return Err(NtlmError::UnexpectedMessage);
        };
        let cfg = self.config;
        let msg = AuthenticateMessage::parse(authenticate)?;
        let unicode = msg.flags & flags::NEGOTIATE_UNICODE != 0;
        if msg.flags & flags::ANONYMOUS != 0 {
            return Err(NtlmError::Anonymous);
        }
        let user = super::message::decode_string(msg.user, unicode)?;
        if user.is_empty() {
            return Err(NtlmError::Anonymous);
        }
        if msg.nt_response.is_empty() {
            return Err(match msg.lm_response.len() {
                0 | 1 => NtlmError::Anonymous,
                24 => NtlmError::LmRefused,
                _ => NtlmError::Malformed("LM response has an invalid length"),
            });
        }
        let domain = super::message::decode_string(msg.domain, unicode)?;
        let workstation = super::message::decode_string(msg.workstation, unicode)?;
        let encrypted_session_key = match msg.encrypted_random_session_key.len() {
            0 => None,
            16 => <[u8; 16]>::try_from(msg.encrypted_random_session_key).ok(),
            _ => return Err(NtlmError::Malformed("session key must be 16 bytes")),
        };
        let kind = match msg.nt_response.len() {
            24 => {
                if !cfg.allow_ntlmv1 {
                    return Err(NtlmError::NtlmV1Refused);
                }
                // NTLMv1 has no AV pairs, so neither a MIC nor a channel binding.
                if cfg.require_mic {
                    return Err(NtlmError::MicRequired);
                }
                if cfg.channel_binding == ChannelBindingMode::Required {
                    return Err(NtlmError::ChannelBindingRequired);
                }
                // NTLMv1-ESS puts the client challenge in the LM field,
                // zero-padded. Checking the padding too (as Samba does) keeps
                // a plain-v1 client that merely echoes our ESS flag working.
                let ess_client_challenge = match msg.lm_response {
                    lm if msg.flags & flags::NEGOTIATE_EXTENDED_SESSIONSECURITY != 0
                        && lm.len() == 24
                        && lm[8..].iter().all(|&b| b == 0) =>
                    {
                        let mut cc = [0u8; 8];
                        cc.copy_from_slice(&lm[..8]);
                        Some(cc)
                    }
                    _ => None,
                };
                Kind::V1 {
                    ess_client_challenge,
                }
            }
            n if n >= 16 + BLOB_HEADER_LEN + 4 => {
                let blob = Blob::parse(&msg.nt_response[16..])?;
                if blob.msv_av_flags & MSV_AV_FLAG_MIC_PRESENT != 0 {
                    if msg.mic.is_none() {
                        return Err(NtlmError::Malformed("MIC flagged but no MIC field"));
                    }
                } else if cfg.require_mic {
                    return Err(NtlmError::MicRequired);
                }
                Kind::V2(blob)
            }
            _ => return Err(NtlmError::Malformed("NT response has an invalid length")),
        };
        Ok(PendingAuthenticate {
            config: cfg,
            clock: self.clock,
            server_challenge: self.server_challenge,
            challenged,
            flags: msg.flags,
            lm_response: msg.lm_response.to_vec(),
            nt_response: msg.nt_response.to_vec(),
            encrypted_session_key,
            mic: msg.mic,
            raw: authenticate.to_vec(),
            user,
            domain,
            workstation,
            kind,
        })
    }
}

/// An AUTHENTICATE message that passed every check not needing the
/// password, waiting for its proof to be verified.
///
/// Consumed by exactly one of [`PendingAuthenticate::verify_local`] (NT
/// hashes we hold) or [`PendingAuthenticate::finish_external`] (a domain
/// controller verified the proof). Either way the same post-proof checks
/// run: target-info echo, timestamp window, MIC, channel binding, replay,
/// account state. An externally verified response cannot skip them: both
/// methods end in the same private function, and a `PendingAuthenticate`
/// leads nowhere else.
pub struct PendingAuthenticate {
    config: NtlmConfig,
    clock: Arc<dyn Clock>,
    server_challenge: [u8; 8],
    challenged: Challenged,
    flags: u32,
    lm_response: Vec<u8>,
    nt_response: Vec<u8>,
    encrypted_session_key: Option<[u8; 16]>,
    mic: Option<[u8; 16]>,
    /// The AUTHENTICATE exactly as received: the MIC covers it.
    raw: Vec<u8>,
    user: String,
    domain: String,
    workstation: String,
    kind: Kind,
}

enum Kind {
    V1 {
        ess_client_challenge: Option<[u8; 8]>,
    },
    V2(Blob),
}

impl fmt::Debug for PendingAuthenticate {
    // Responses are offline-crackable: keep them out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingAuthenticate")
            .field("user", &self.user)
            .field("domain", &self.domain)
            .field("workstation", &self.workstation)
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl PendingAuthenticate {
    /// The user name exactly as the client sent it (the proof covers this
    /// spelling).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The domain exactly as the client sent it; may be empty.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Client-supplied and unverified; for logs only.
    pub fn workstation(&self) -> &str {
        &self.workstation
    }

    /// The challenge this gateway sent in its CHALLENGE.
    pub fn server_challenge(&self) -> [u8; 8] {
        self.server_challenge
    }

    /// The challenge a domain controller must verify the NT response
    /// against: the server challenge, except for NTLMv1-ESS, where it is
    /// MD5(ServerChallenge ‖ ClientChallenge)[0..8]. Extended session
    /// security is negotiated between client and gateway; a DC's
    /// pass-through check (netlogon, winbind) only sees a challenge and a
    /// response, so the gateway hands it the effective one, as Samba's own
    /// NTLMSSP server does.
    pub fn external_challenge(&self) -> [u8; 8] {
        match &self.kind {
            Kind::V1 {
                ess_client_challenge: Some(cc),
            } => crypto::ess_challenge(&self.server_challenge, cc),
            _ => self.server_challenge,
        }
    }

    pub fn nt_response(&self) -> &[u8] {
        &self.nt_response
    }

    pub fn lm_response(&self) -> &[u8] {
        &self.lm_response
    }

    pub fn version(&self) -> NtlmVersion {
        match &self.kind {
            Kind::V2(_) => NtlmVersion::V2,
            Kind::V1 {
                ess_client_challenge: Some(_),
            } => NtlmVersion::V1Ess,
            Kind::V1 { .. } => NtlmVersion::V1,
        }
    }

    /// Verifies the proof against the NT hash of the account `store` has for
    /// the named user, then runs the post-proof checks.
    pub fn verify_local(
        self,
        store: &dyn CredentialStore,
        replay: &ReplayCache,
        channel_binding: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        let account = self.lookup(store);
        let nt_hash = account.as_ref().map_or(&DUMMY_NT_HASH, |a| &a.nt_hash);
        let (proof_ok, session_base_key) = match &self.kind {
            Kind::V2(_) => {
                let (proof_on_wire, temp) = self.nt_response.split_at(16);
                // The user and domain exactly as sent: that is what the
                // client hashed.
                let response_key = crypto::ntowfv2(nt_hash, &self.user, &self.domain);
                let proof = crypto::nt_proof_str(&response_key, &self.server_challenge, temp);
                (
                    bool::from(proof[..].ct_eq(proof_on_wire)),
                    crypto::session_base_key_v2(&response_key, &proof),
                )
            }
            Kind::V1 {
                ess_client_challenge,
            } => {
                let expected = match ess_client_challenge {
                    Some(cc) => crypto::ntlmv1_ess_response(nt_hash, &self.server_challenge, cc),
                    None => crypto::ntlmv1_response(nt_hash, &self.server_challenge),
                };
                (
                    bool::from(expected[..].ct_eq(&self.nt_response)),
                    crypto::session_base_key_v1(nt_hash),
                )
            }
        };
        let account = match account {
            Some(a) if proof_ok => a,
            _ => return Err(NtlmError::BadCredentials),
        };
        self.conclude(account, session_base_key, replay, channel_binding)
    }

    /// Completes an exchange whose proof an external verifier (the domain
    /// controller) accepted, given the SessionBaseKey it returned (Samba's
    /// `User-Session-Key`; for NTLMv2 the key the MIC depends on).
    ///
    /// The verifier must have been given exactly [`Self::user`],
    /// [`Self::domain`], [`Self::external_challenge`] and
    /// [`Self::nt_response`] of this value: the NTLMv2 blob is trusted here
    /// only because its proof was checked over these bytes. `account` is who
    /// the directory says the client is (groups, addresses, enabled).
    pub fn finish_external(
        self,
        account: Account,
        session_base_key: [u8; 16],
        replay: &ReplayCache,
        channel_binding: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        self.conclude(account, session_base_key, replay, channel_binding)
    }

    /// The checks that follow a verified proof, shared by both paths.
    fn conclude(
        self,
        account: Account,
        session_base_key: [u8; 16],
        replay: &ReplayCache,
        channel_binding: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        let (mic_verified, channel_bound, replay_key) = match &self.kind {
            Kind::V2(blob) => {
                // The blob is covered by the proof, so from here on its
                // contents are what the password holder sent.
                self.check_target_info_echo(blob)?;
                self.check_timestamps(blob)?;
                let mic_verified = self.check_mic(blob, &session_base_key)?;
                let channel_bound = check_channel_binding(
                    self.config.channel_binding,
                    blob.channel_bindings,
                    channel_binding,
                )?;
                // The NTProofStr covers the server challenge.
                (
                    mic_verified,
                    channel_bound,
                    ReplayKey::new(&self.nt_response[..16]),
                )
            }
            // MIC and binding requirements were refused before the proof.
            Kind::V1 { .. } => (false, false, ReplayKey::new(&self.nt_response)),
        };
        if !replay.first_use(replay_key) {
            return Err(NtlmError::Replay);
        }
        if !account.enabled {
            return Err(NtlmError::AccountDisabled);
        }
        Ok(Authenticated {
            version: self.version(),
            account,
            session_base_key,
            mic_verified,
            channel_bound,
            workstation: self.workstation,
        })
    }

    fn check_target_info_echo(&self, blob: &Blob) -> Result<(), NtlmError> {
        let sent = &self.challenged.challenge[self.challenged.target_info.clone()];
        walk_av_pairs(sent, |id, value| match id {
            av_id::NB_DOMAIN_NAME
            | av_id::NB_COMPUTER_NAME
            | av_id::DNS_DOMAIN_NAME
            | av_id::DNS_COMPUTER_NAME
            | av_id::DNS_TREE_NAME
            | av_id::TIMESTAMP
                if blob.find(id) != Some(value) =>
            {
                Err(NtlmError::TargetInfoMismatch)
            }
            _ => Ok(()),
        })?;
        Ok(())
    }

    fn check_timestamps(&self, blob: &Blob) -> Result<(), NtlmError> {
        let window = self.config.timestamp_window;
        let now = filetime(self.clock.now());
        if filetime_distance(now, blob.timestamp) > window
            || filetime_distance(now, self.challenged.issued) > window
        {
            return Err(NtlmError::TimestampOutOfWindow);
        }
        Ok(())
    }

    /// Verifies the MIC when MsvAvFlags announces one; `Ok(false)` when none
    /// is announced (its absence under `require_mic` was refused earlier).
    fn check_mic(&self, blob: &Blob, session_base_key: &[u8; 16]) -> Result<bool, NtlmError> {
        if blob.msv_av_flags & MSV_AV_FLAG_MIC_PRESENT == 0 {
            return Ok(false);
        }
        // KeyExchangeKey = SessionBaseKey for NTLMv2. curl echoes KEY_EXCH
        // but sends no key; then the exported key is the exchange key.
        let mut exported = *session_base_key;
        if self.flags & flags::NEGOTIATE_KEY_EXCH != 0 {
            if let Some(encrypted) = self.encrypted_session_key {
                exported = encrypted;
                crypto::rc4(session_base_key, &mut exported);
            }
        }
        let on_wire = self
            .mic
            .ok_or(NtlmError::Malformed("MIC flagged but no MIC field"))?;
        let expected = crypto::mic(
            &exported,
            &self.challenged.negotiate,
            &self.challenged.challenge,
            &self.raw,
        )
        .ok_or(NtlmError::Malformed("MIC flagged but no MIC field"))?;
        if !bool::from(expected.ct_eq(&on_wire)) {
            return Err(NtlmError::MicInvalid);
        }
        Ok(true)
    }

    /// Finds the account the client names, or `None`.
    ///
    /// An empty domain means our own NetBIOS domain, or, for a UPN-style user
    /// name (`alice@demo.test`, as Windows sends it), the UPN suffix. Our DNS
    /// domain is an alias for the NetBIOS one. The store is asked by domain,
    /// so an account in another domain is simply not found.
    fn lookup(&self, store: &dyn CredentialStore) -> Option<Account> {
        let cfg = &self.config;
        let (domain, user) = match (self.domain.is_empty(), self.user.rsplit_once('@')) {
            (true, Some((local, suffix))) if !local.is_empty() && !suffix.is_empty() => {
                (suffix, local)
            }
            (true, _) => (cfg.netbios_domain.as_str(), self.user.as_str()),
            (false, _) => (self.domain.as_str(), self.user.as_str()),
        };
        let domain = if eq_fold(domain, &cfg.dns_domain) {
            cfg.netbios_domain.as_str()
        } else {
            domain
        };
        let account = store.lookup(domain, user)?;
        // Don't trust a store implementation to have honoured the domain.
        (eq_fold(&account.domain, domain) && eq_fold(&account.user, user)).then_some(account)
    }
}

fn eq_fold(a: &str, b: &str) -> bool {
    a.chars().map(upcase_char).eq(b.chars().map(upcase_char))
}

/// RespType, HiRespType, reserved, timestamp, client challenge, reserved.
const BLOB_HEADER_LEN: usize = 28;

/// The fields of an NTLMv2 client blob that verification needs.
struct Blob {
    timestamp: u64,
    /// AV pairs including EOL.
    av_pairs: Vec<u8>,
    msv_av_flags: u32,
    channel_bindings: Option<[u8; 16]>,
}

impl Blob {
    fn parse(temp: &[u8]) -> Result<Self, NtlmError> {
        if temp.first() != Some(&1) || temp.get(1) != Some(&1) {
            return Err(NtlmError::Malformed("unknown NTLMv2 response type"));
        }
        let timestamp = le_u64(temp, 8)?;
        let av_pairs = temp
            .get(BLOB_HEADER_LEN..)
            .ok_or(NtlmError::Malformed("NTLMv2 blob truncated"))?;
        let mut msv_av_flags = 0;
        let mut channel_bindings = None;
        let used = walk_av_pairs(av_pairs, |id, value| {
            match id {
                av_id::FLAGS => msv_av_flags = le_u32(value, 0)?,
                av_id::CHANNEL_BINDINGS => {
                    channel_bindings = value.try_into().ok();
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(Self {
            timestamp,
            av_pairs: av_pairs[..used].to_vec(),
            msv_av_flags,
            channel_bindings,
        })
    }

    fn find(&self, want: u16) -> Option<&[u8]> {
        let mut found = None;
        // Already validated in `parse`, so the walk cannot fail.
        let _ = walk_av_pairs(&self.av_pairs, |id, value| {
            if id == want {
                found = Some(value);
            }
            Ok(())
        });
        found
    }
}

/// Decides channel binding. `client` is the MsvAvChannelBindings value,
/// `tls` our tls-server-end-point value.
fn check_channel_binding(
    mode: ChannelBindingMode,
    client: Option<[u8; 16]>,
    tls: Option<&[u8]>,
) -> Result<bool, NtlmError> {
    // Windows sends all zeros when it has no binding to offer.
    let client = client.filter(|c| c != &[0u8; 16]);
    match (mode, client, tls) {
        (ChannelBindingMode::Off, _, _) => Ok(false),
        (_, Some(c), Some(tls)) => {
            if bool::from(channel_bindings_hash(tls).ct_eq(&c)) {
                Ok(true)
            } else {
                Err(NtlmError::ChannelBindingMismatch)
            }
        }
        // The client bound to a TLS session we are not part of: someone in
        // between terminated TLS. Exactly what bindings exist to catch.
        (ChannelBindingMode::WhenSupported, Some(_), None) => {
            Err(NtlmError::ChannelBindingMismatch)
        }
        (ChannelBindingMode::WhenSupported, None, _) => Ok(false),
        (ChannelBindingMode::Required, _, _) => Err(NtlmError::ChannelBindingRequired),
    }
}

/// A response that was accepted: the NTProofStr (v2) or the NT response
/// (v1), which both cover the server challenge.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ReplayKey {
    len: u8,
    bytes: [u8; 24],
}

impl ReplayKey {
    fn new(v: &[u8]) -> Self {
        let mut bytes = [0u8; 24];
        let n = v.len().min(24);
        bytes[..n].copy_from_slice(&v[..n]);
        Self {
            len: n as u8,
            bytes,
        }
    }
}

/// Responses already accepted, shared by all sessions.
///
/// With a fresh random challenge per handshake a captured AUTHENTICATE can
/// never verify again, so this is defence in depth: it catches a repeated
/// challenge (a broken RNG, or `with_challenge` misused) and makes replay
/// visible in metrics.
#[derive(Clone)]
pub struct ReplayCache {
    seen: moka::sync::Cache<ReplayKey, ()>,
}

impl fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCache")
            .field("entries", &self.seen.entry_count())
            .finish()
    }
}

impl ReplayCache {
    /// Enough for a busy gateway's AUTHs within [`NtlmConfig::replay_ttl`]
    /// at ~40 bytes an entry.
    pub const DEFAULT_CAPACITY: u64 = 100_000;

    /// Entries live `ttl`; past `capacity` the least recently used go first
    /// (LRU rather than moka's default TinyLFU, which may refuse to admit a
    /// new key: for replay detection the newest entries matter most).
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        Self {
            seen: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
        }
    }

    pub fn for_config(config: &NtlmConfig) -> Self {
        Self::new(config.replay_ttl(), Self::DEFAULT_CAPACITY)
    }

    /// Records the key; `false` if it was already there. Atomic, so two
    /// sessions racing with the same response cannot both succeed.
    fn first_use(&self, key: ReplayKey) -> bool {
        self.seen.entry(key).or_insert(()).is_fresh()
    }
}
