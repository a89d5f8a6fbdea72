//! An NTLM client that behaves like Windows SSPI by default, with knobs to
//! misbehave. Used by tests (honest and hostile clients) and the load
//! generator; the gateway itself never authenticates outward with NTLM.

use rand::rngs::OsRng;
use rand::RngCore;

use super::channel_binding::channel_bindings_hash;
use super::crypto;
use super::message::{
    av_id, encode_av_pairs, encode_string, flags, le_u32, le_u64, AuthenticateMessage, AvPair,
    ChallengeMessage, NegotiateMessage, MIC_LAYOUT_HEADER_LEN, MIC_OFFSET, MSV_AV_FLAG_MIC_PRESENT,
};
use super::NtlmError;

/// Version we announce: Windows 10.0 build 19041, NTLM revision 15.
const VERSION: [u8; 8] = [10, 0, 0x61, 0x4a, 0, 0, 0, 0x0f];

#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub user: String,
    pub domain: String,
    pub password: String,
    pub workstation: String,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("user", &self.user)
            .field("domain", &self.domain)
            .field("password", &"<redacted>")
            .field("workstation", &self.workstation)
            .finish()
    }
}

/// Which response the client computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientMode {
    #[default]
    NtlmV2,
    /// NTLMv1 with an LMv1 response (as swaks sends).
    NtlmV1,
    /// NTLMv1 with extended session security.
    NtlmV1Ess,
    /// An LMv1 response and no NT response.
    LmOnly,
    /// No NT response and a one-zero-byte LM response, as an anonymous
    /// client sends; the user name is still taken from the credentials.
    Anonymous,
}

/// How the client behaves. The default is an honest Windows-like client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub mode: ClientMode,
    /// Add MsvAvFlags 0x2 and a MIC (NTLMv2 only), with the Windows
    /// 88-byte AUTHENTICATE header. Without it the message has curl's
    /// 64-byte header.
    pub mic: bool,
    /// Flip a bit of the MIC after computing it.
    pub corrupt_mic: bool,
    /// Ask for KEY_EXCH and, if granted, send an encrypted random session key.
    pub key_exchange: bool,
    /// The random session key to send instead of one from the OS RNG.
    pub session_key: Option<[u8; 16]>,
    /// Set the ANONYMOUS flag in the AUTHENTICATE message.
    pub anonymous_flag: bool,
    /// tls-server-end-point value to bind to (MsvAvChannelBindings).
    pub channel_binding: Option<Vec<u8>>,
    /// Edits the AV pairs (after the client added its own, before EOL) that
    /// go into the NTLMv2 blob, to play a client that alters target info.
    pub edit_av_pairs: Option<fn(&mut Vec<AvPair>)>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            mode: ClientMode::NtlmV2,
            mic: true,
            corrupt_mic: false,
            key_exchange: true,
            session_key: None,
            anonymous_flag: false,
            channel_binding: None,
            edit_av_pairs: None,
        }
    }
}

/// One client-side NTLM exchange.
#[derive(Debug)]
pub struct ClientHandshake {
    creds: ClientCredentials,
    client_challenge: [u8; 8],
    timestamp: Option<u64>,
    opts: ClientOptions,
    negotiate: Option<Vec<u8>>,
}

impl ClientHandshake {
    /// `timestamp` (FILETIME) overrides the blob timestamp, as curl does
    /// with its own clock; `None` echoes the server's MsvAvTimestamp, as
    /// Windows does (zero if the server sent none).
    pub fn new(
        creds: ClientCredentials,
        client_challenge: [u8; 8],
        timestamp: Option<u64>,
    ) -> Self {
        Self {
            creds,
            client_challenge,
            timestamp,
            opts: ClientOptions::default(),
            negotiate: None,
        }
    }

    pub fn with_options(mut self, opts: ClientOptions) -> Self {
        self.opts = opts;
        self
    }

    /// The NEGOTIATE (type 1) message. The same bytes are kept for the MIC.
    pub fn negotiate(&mut self) -> Vec<u8> {
        let mut f = flags::NEGOTIATE_UNICODE
            | flags::NEGOTIATE_OEM
            | flags::REQUEST_TARGET
            | flags::NEGOTIATE_NTLM
            | flags::NEGOTIATE_SIGN
            | flags::NEGOTIATE_ALWAYS_SIGN
            | flags::NEGOTIATE_EXTENDED_SESSIONSECURITY
            | flags::NEGOTIATE_128
            | flags::NEGOTIATE_56
            | flags::NEGOTIATE_VERSION;
        if self.opts.key_exchange {
            f |= flags::NEGOTIATE_KEY_EXCH;
        }
        let bytes = NegotiateMessage {
            flags: f,
            domain: Vec::new(),
            workstation: Vec::new(),
            version: Some(VERSION),
        }
        .encode();
        self.negotiate = Some(bytes.clone());
        bytes
    }

    /// The AUTHENTICATE (type 3) message answering `challenge`.
    pub fn authenticate(&mut self, challenge: &[u8]) -> Result<Vec<u8>, NtlmError> {
        let negotiate = self.negotiate.take().ok_or(NtlmError::UnexpectedMessage)?;
        let chal = ChallengeMessage::parse(challenge)?;
        let unicode = chal.flags & flags::NEGOTIATE_UNICODE != 0;
        let opts = &self.opts;
        let creds = &self.creds;
        let nt_hash = crypto::ntowfv1(&creds.password);
        let sc = &chal.server_challenge;

        let mut auth_flags = chal.flags;
        if !opts.key_exchange {
            auth_flags &= !flags::NEGOTIATE_KEY_EXCH;
        }
        if opts.anonymous_flag {
            auth_flags |= flags::ANONYMOUS;
        }

        let mut mic_layout = false;
        let lm_response: Vec<u8>;
        let nt_response: Vec<u8>;
        let key_exchange_key: [u8; 16];
        match opts.mode {
            ClientMode::NtlmV2 => {
                let server_pairs = chal.av_pairs()?;
                let server_ts = server_pairs
                    .iter()
                    .find(|p| p.id == av_id::TIMESTAMP)
                    .and_then(|p| le_u64(&p.value, 0).ok());
                let time = self.timestamp.or(server_ts).unwrap_or(0);
                let mut pairs = server_pairs;
                if opts.mic {
                    mic_layout = true;
                    match pairs.iter_mut().find(|p| p.id == av_id::FLAGS) {
                        Some(p) => {
                            let v = le_u32(&p.value, 0)? | MSV_AV_FLAG_MIC_PRESENT;
                            p.value = v.to_le_bytes().to_vec();
                        }
                        None => pairs.push(AvPair::new(
                            av_id::FLAGS,
                            MSV_AV_FLAG_MIC_PRESENT.to_le_bytes(),
                        )),
                    }
                }
                if let Some(endpoint) = &opts.channel_binding {
                    pairs.push(AvPair::new(
                        av_id::CHANNEL_BINDINGS,
                        channel_bindings_hash(endpoint),
                    ));
                }
                if let Some(edit) = opts.edit_av_pairs {
                    edit(&mut pairs);
                }
                let key = crypto::ntowfv2(&nt_hash, &creds.user, &creds.domain);
                let temp =
                    crypto::ntlmv2_temp(time, &self.client_challenge, &encode_av_pairs(&pairs));
                let proof = crypto::nt_proof_str(&key, sc, &temp);
                nt_response = [&proof[..], &temp].concat();
                // Windows sends Z(24) when the server sent a timestamp.
                lm_response = if server_ts.is_some() {
                    vec![0; 24]
                } else {
                    crypto::lmv2_response(&key, sc, &self.client_challenge).to_vec()
                };
                key_exchange_key = crypto::session_base_key_v2(&key, &proof);
            }
            ClientMode::NtlmV1 | ClientMode::LmOnly => {
                auth_flags &= !flags::NEGOTIATE_EXTENDED_SESSIONSECURITY;
                let lm = crypto::desl(&crypto::lmowfv1(&creds.password), sc);
                lm_response = lm.to_vec();
                nt_response = if opts.mode == ClientMode::LmOnly {
                    Vec::new()
                } else {
                    crypto::ntlmv1_response(&nt_hash, sc).to_vec()
                };
                key_exchange_key = crypto::session_base_key_v1(&nt_hash);
            }
            ClientMode::NtlmV1Ess => {
                let mut lm = [0u8; 24];
                lm[..8].copy_from_slice(&self.client_challenge);
                nt_response =
                    crypto::ntlmv1_ess_response(&nt_hash, sc, &self.client_challenge).to_vec();
                key_exchange_key = crypto::key_exchange_key_v1_ess(
                    &crypto::session_base_key_v1(&nt_hash),
                    sc,
                    &lm,
                );
                lm_response = lm.to_vec();
            }
            ClientMode::Anonymous => {
                lm_response = vec![0];
                nt_response = Vec::new();
                key_exchange_key = [0; 16];
            }
        }

        let (exported, encrypted_key) = if auth_flags & flags::NEGOTIATE_KEY_EXCH != 0 {
            let random = opts.session_key.unwrap_or_else(|| {
                let mut k = [0u8; 16];
                OsRng.fill_bytes(&mut k);
                k
            });
            let mut enc = random;
            crypto::rc4(&key_exchange_key, &mut enc);
            (random, enc.to_vec())
        } else {
            (key_exchange_key, Vec::new())
        };
        if !mic_layout {
            auth_flags &= !flags::NEGOTIATE_VERSION;
        }

        let domain = encode_string(&creds.domain, unicode);
        let user = encode_string(&creds.user, unicode);
        let workstation = encode_string(&creds.workstation, unicode);
        let mut out = AuthenticateMessage {
            lm_response: &lm_response,
            nt_response: &nt_response,
            domain: &domain,
            user: &user,
            workstation: &workstation,
            encrypted_random_session_key: &encrypted_key,
            flags: auth_flags,
            version: Some(VERSION),
            mic: None,
        }
        .encode(mic_layout);
        if mic_layout {
            let mut mic = crypto::mic(&exported, &negotiate, challenge, &out)
                .ok_or(NtlmError::Malformed("no room for MIC"))?;
            if opts.corrupt_mic {
                mic[0] ^= 0x01;
            }
            out[MIC_OFFSET..MIC_LAYOUT_HEADER_LEN].copy_from_slice(&mic);
        }
        Ok(out)
    }
}
