//! The server side of one NTLM exchange: NEGOTIATE in, CHALLENGE out,
//! AUTHENTICATE verified against a [`CredentialStore`].

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

    /// Verifies the AUTHENTICATE (type 3) message.
    ///
    /// `channel_binding` is the RFC 5929 `tls-server-end-point` value of the
    /// certificate this session presented (see [`super::tls_server_end_point`]),
    /// or `None` outside TLS.
    ///
    /// Checks run cheapest and credential-independent first (structure,
    /// anonymous, NTLMv1 policy), then the proof; everything after the proof
    /// is reported only to a client that knows the password.
    pub fn authenticate(
        self,
        authenticate: &[u8],
        store: &dyn CredentialStore,
        replay: &ReplayCache,
        channel_binding: Option<&[u8]>,
    ) -> Result<Authenticated, NtlmError> {
        let State::AwaitingAuthenticate(challenged) = &self.state else {
            return Err(NtlmError::UnexpectedMessage);
        };
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
        if !matches!(msg.encrypted_random_session_key.len(), 0 | 16) {
            return Err(NtlmError::Malformed("session key must be 16 bytes"));
        }
        let attempt = Attempt {
            hs: &self,
            challenged,
            msg: &msg,
            raw: authenticate,
            user: &user,
            domain: &domain,
        };
        let verified = match msg.nt_response.len() {
            24 => attempt.verify_v1(store)?,
            n if n >= 16 + BLOB_HEADER_LEN + 4 => attempt.verify_v2(store, channel_binding)?,
            _ => return Err(NtlmError::Malformed("NT response has an invalid length")),
        };
        if !replay.first_use(verified.replay_key) {
            return Err(NtlmError::Replay);
        }
        if !verified.account.enabled {
            return Err(NtlmError::AccountDisabled);
        }
        Ok(Authenticated {
            account: verified.account,
            version: verified.version,
            session_base_key: verified.session_base_key,
            mic_verified: verified.mic_verified,
            channel_bound: verified.channel_bound,
            workstation,
        })
    }

    /// Finds the account the client names, or `None`.
    ///
    /// An empty domain means our own NetBIOS domain, or, for a UPN-style user
    /// name (`alice@demo.test`, as Windows sends it), the UPN suffix. Our DNS
    /// domain is an alias for the NetBIOS one. The store is asked by domain,
    /// so an account in another domain is simply not found.
    fn lookup(&self, store: &dyn CredentialStore, domain: &str, user: &str) -> Option<Account> {
        let cfg = &self.config;
        let (domain, user) = match (domain.is_empty(), user.rsplit_once('@')) {
            (true, Some((local, suffix))) if !local.is_empty() && !suffix.is_empty() => {
                (suffix, local)
            }
            (true, _) => (cfg.netbios_domain.as_str(), user),
            (false, _) => (domain, user),
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

/// What passed the proof check, before replay and account-state checks.
struct Verified {
    account: Account,
    version: NtlmVersion,
    session_base_key: [u8; 16],
    mic_verified: bool,
    channel_bound: bool,
    replay_key: ReplayKey,
}

struct Attempt<'a> {
    hs: &'a ServerHandshake,
    challenged: &'a Challenged,
    msg: &'a AuthenticateMessage<'a>,
    raw: &'a [u8],
    user: &'a str,
    domain: &'a str,
}

/// The fields of an NTLMv2 client blob that verification needs.
struct Blob<'a> {
    timestamp: u64,
    /// AV pairs including EOL.
    av_pairs: &'a [u8],
    msv_av_flags: u32,
    channel_bindings: Option<[u8; 16]>,
}

impl<'a> Blob<'a> {
    fn parse(temp: &'a [u8]) -> Result<Self, NtlmError> {
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
            av_pairs: &av_pairs[..used],
            msv_av_flags,
            channel_bindings,
        })
    }

    fn find(&self, want: u16) -> Option<&'a [u8]> {
        let mut found = None;
        // Already validated in `parse`, so the walk cannot fail.
        let _ = walk_av_pairs(self.av_pairs, |id, value| {
            if id == want {
                found = Some(value);
            }
            Ok(())
        });
        found
    }
}

impl Attempt<'_> {
    fn server_challenge(&self) -> &[u8; 8] {
        &self.hs.server_challenge
    }

    fn verify_v2(
        &self,
        store: &dyn CredentialStore,
        channel_binding: Option<&[u8]>,
    ) -> Result<Verified, NtlmError> {
        let cfg = &self.hs.config;
        let (proof_on_wire, temp) = self.msg.nt_response.split_at(16);
        let blob = Blob::parse(temp)?;

        let account = self.hs.lookup(store, self.domain, self.user);
        let nt_hash = account.as_ref().map_or(&DUMMY_NT_HASH, |a| &a.nt_hash);
        // The user and domain exactly as sent: that is what the client hashed.
        let response_key = crypto::ntowfv2(nt_hash, self.user, self.domain);
        let proof = crypto::nt_proof_str(&response_key, self.server_challenge(), temp);
        let proof_ok: bool = proof[..].ct_eq(proof_on_wire).into();
        let account = match account {
            Some(a) if proof_ok => a,
            _ => return Err(NtlmError::BadCredentials),
        };

        // The blob is covered by the proof, so from here on its contents are
        // what the password holder sent.
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

        let now = filetime(self.hs.clock.now());
        if filetime_distance(now, blob.timestamp) > cfg.timestamp_window
            || filetime_distance(now, self.challenged.issued) > cfg.timestamp_window
        {
            return Err(NtlmError::TimestampOutOfWindow);
        }

        let session_base_key = crypto::session_base_key_v2(&response_key, &proof);
        // KeyExchangeKey = SessionBaseKey for NTLMv2. curl echoes KEY_EXCH
        // but sends no key; then the exported key is the exchange key.
        let mut exported = session_base_key;
        if self.msg.flags & flags::NEGOTIATE_KEY_EXCH != 0 {
            if let Ok(encrypted) = <[u8; 16]>::try_from(self.msg.encrypted_random_session_key) {
                exported = encrypted;
                crypto::rc4(&session_base_key, &mut exported);
            }
        }

        let mic_verified = if blob.msv_av_flags & MSV_AV_FLAG_MIC_PRESENT != 0 {
            let on_wire = self
                .msg
                .mic
                .ok_or(NtlmError::Malformed("MIC flagged but no MIC field"))?;
            let expected = crypto::mic(
                &exported,
                &self.challenged.negotiate,
                &self.challenged.challenge,
                self.raw,
            )
            .ok_or(NtlmError::Malformed("MIC flagged but no MIC field"))?;
            if !bool::from(expected.ct_eq(&on_wire)) {
                return Err(NtlmError::MicInvalid);
            }
            true
        } else if cfg.require_mic {
            return Err(NtlmError::MicRequired);
        } else {
            false
        };

        let channel_bound =
            check_channel_binding(cfg.channel_binding, blob.channel_bindings, channel_binding)?;

        Ok(Verified {
            account,
            version: NtlmVersion::V2,
            session_base_key,
            mic_verified,
            channel_bound,
            replay_key: ReplayKey::new(&proof),
        })
    }

    fn verify_v1(&self, store: &dyn CredentialStore) -> Result<Verified, NtlmError> {
        let cfg = &self.hs.config;
        if !cfg.allow_ntlmv1 {
            return Err(NtlmError::NtlmV1Refused);
        }
        let nt: &[u8; 24] = self
            .msg
            .nt_response
            .try_into()
            .map_err(|_| NtlmError::Malformed("NT response has an invalid length"))?;
        // NTLMv1-ESS puts the client challenge in the LM field, zero-padded.
        // Checking the padding too (as Samba does) keeps a plain-v1 client
        // that merely echoes our ESS flag working.
        let ess_challenge = match self.msg.lm_response {
            lm if self.msg.flags & flags::NEGOTIATE_EXTENDED_SESSIONSECURITY != 0
                && lm.len() == 24
                && lm[8..].iter().all(|&b| b == 0) =>
            {
                let mut cc = [0u8; 8];
                cc.copy_from_slice(&lm[..8]);
                Some(cc)
            }
            _ => None,
        };

        let account = self.hs.lookup(store, self.domain, self.user);
        let nt_hash = account.as_ref().map_or(&DUMMY_NT_HASH, |a| &a.nt_hash);
        let expected = match &ess_challenge {
            Some(cc) => crypto::ntlmv1_ess_response(nt_hash, self.server_challenge(), cc),
            None => crypto::ntlmv1_response(nt_hash, self.server_challenge()),
        };
        let ok: bool = expected.ct_eq(nt).into();
        let account = match account {
            Some(a) if ok => a,
            _ => return Err(NtlmError::BadCredentials),
        };
        // NTLMv1 has no AV pairs, so neither a MIC nor a channel binding.
        if cfg.require_mic {
            return Err(NtlmError::MicRequired);
        }
        if cfg.channel_binding == ChannelBindingMode::Required {
            return Err(NtlmError::ChannelBindingRequired);
        }
        Ok(Verified {
            session_base_key: crypto::session_base_key_v1(&account.nt_hash),
            account,
            version: if ess_challenge.is_some() {
                NtlmVersion::V1Ess
            } else {
                NtlmVersion::V1
            },
            mic_verified: false,
            channel_bound: false,
            replay_key: ReplayKey::new(nt),
        })
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
