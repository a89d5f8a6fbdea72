//! NTLMSSP authentication for SMTP `AUTH NTLM` ([MS-NLMP], [MS-SMTPNTLM]),
//! sans-IO.
//!
//! The gateway decodes each base64 line of the SASL exchange and hands the
//! bytes here; nothing in this module touches a socket or the system clock.
//!
//! ```text
//!   client                         gateway                     policy::ntlm
//!   AUTH NTLM <type1> ───────────▶ ServerHandshake::new ──────▶ challenge(type1)
//!          ◀──────────────── 334 <type2>  ◀──────────────────── CHALLENGE bytes
//!   <type3> ─────────────────────▶ authenticate(type3, store, replay, cb)
//!          ◀──────── 235 / 535 / 501  ◀──── Authenticated / NtlmError
//! ```
//!
//! With a domain controller as the verifier (Active Directory), the last
//! step is split: `begin_authenticate(type3)` runs the checks that need no
//! password and yields a [`PendingAuthenticate`] whose user, domain,
//! challenge and NT response go to the DC; the DC's SessionBaseKey then
//! goes to `finish_external`, which runs the same post-proof checks (target
//! info, timestamp, MIC, channel binding, replay) as the local path.
//!
//! A successful [`Authenticated`] only says who the client is. Whether that
//! identity may relay is decided separately (`policy::relay`): authenticating
//! must never imply relay permission (the MS02-011 lesson).

pub mod channel_binding;
pub mod client;
pub mod crypto;
pub mod message;
mod server;

use std::time::Duration;

use crate::identity::Account;

pub use channel_binding::{channel_bindings_hash, tls_server_end_point};
pub use client::{ClientCredentials, ClientHandshake, ClientMode, ClientOptions};
pub use server::{PendingAuthenticate, ReplayCache, ServerHandshake};

/// How the server identifies itself and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtlmConfig {
    /// NetBIOS domain name (MsvAvNbDomainName and the CHALLENGE target
    /// name). Also the domain used when a client sends none.
    pub netbios_domain: String,
    pub netbios_computer: String,
    /// DNS domain; a client naming it as its domain (or as a UPN suffix) is
    /// treated as naming `netbios_domain`.
    pub dns_domain: String,
    pub dns_computer: String,
    pub dns_tree: Option<String>,
    /// Send the 8-byte Version field. Clients ignore its contents, but
    /// Windows servers always send it and some clients expect the layout.
    pub send_version: bool,
    /// Accept NTLMv1 and NTLMv1-ESS responses. These are crackable offline
    /// from one captured exchange, so they are off unless an old device
    /// (swaks, scanners) cannot be upgraded.
    pub allow_ntlmv1: bool,
    /// Refuse NTLMv2 responses without a MIC. curl never sends one, so this
    /// is only for Windows-only deployments.
    pub require_mic: bool,
    /// How far the NTLMv2 blob timestamp may be from our clock, and how long
    /// a CHALLENGE stays answerable. See [`NtlmConfig::DEFAULT_TIMESTAMP_WINDOW`].
    pub timestamp_window: Duration,
    pub channel_binding: ChannelBindingMode,
}

impl NtlmConfig {
    /// Five minutes, the Kerberos clock-skew default that Windows domains
    /// already keep their clocks within.
    ///
    /// Windows itself allows 36 hours (MaxLifetime) for the blob timestamp.
    /// We are tighter because the window also bounds how long a CHALLENGE
    /// stays valid and how long the replay cache must remember a response;
    /// clients that echo our MsvAvTimestamp (Windows) are unaffected by
    /// clock skew, and only clients using their own clock (curl) need it
    /// to be synchronised within the window.
    pub const DEFAULT_TIMESTAMP_WINDOW: Duration = Duration::from_secs(5 * 60);

    /// A configuration with the secure defaults: NTLMv2 only, MIC optional,
    /// channel binding verified when the client offers it.
    pub fn new(
        netbios_domain: impl Into<String>,
        netbios_computer: impl Into<String>,
        dns_domain: impl Into<String>,
        dns_computer: impl Into<String>,
    ) -> Self {
        Self {
            netbios_domain: netbios_domain.into(),
            netbios_computer: netbios_computer.into(),
            dns_domain: dns_domain.into(),
            dns_computer: dns_computer.into(),
            dns_tree: None,
            send_version: true,
            allow_ntlmv1: false,
            require_mic: false,
            timestamp_window: Self::DEFAULT_TIMESTAMP_WINDOW,
            channel_binding: ChannelBindingMode::WhenSupported,
        }
    }

    /// Checks what would otherwise only fail at the first AUTH.
    pub fn validate(&self) -> Result<(), NtlmConfigError> {
        for (field, value) in [
            ("netbios_domain", &self.netbios_domain),
            ("netbios_computer", &self.netbios_computer),
        ] {
            if value.is_empty() || value.chars().count() > 15 {
                return Err(NtlmConfigError {
                    field,
                    reason: "a NetBIOS name has 1 to 15 characters",
                });
            }
        }
        for (field, value) in [
            ("dns_domain", &self.dns_domain),
            ("dns_computer", &self.dns_computer),
        ] {
            if value.is_empty() {
                return Err(NtlmConfigError {
                    field,
                    reason: "must not be empty",
                });
            }
        }
        if self.timestamp_window.is_zero() {
            return Err(NtlmConfigError {
                field: "timestamp_window",
                reason: "must be positive",
            });
        }
        Ok(())
    }

    /// The TTL a [`ReplayCache`] needs for this configuration: a response
    /// older than the window is refused by its timestamp anyway, and the
    /// factor 2 covers a client clock ahead of ours.
    pub fn replay_ttl(&self) -> Duration {
        self.timestamp_window.saturating_mul(2)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ntlm.{field}: {reason}")]
pub struct NtlmConfigError {
    pub field: &'static str,
    pub reason: &'static str,
}

/// Extended Protection: whether the client's MsvAvChannelBindings must match
/// the TLS session the AUTH arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBindingMode {
    /// Ignore bindings.
    Off,
    /// Verify a binding the client sends; accept clients that send none
    /// (curl, older Windows).
    #[default]
    WhenSupported,
    /// Refuse clients that send no binding, and AUTH outside TLS.
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NtlmVersion {
    V1,
    V1Ess,
    V2,
}

impl NtlmVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "ntlmv1",
            Self::V1Ess => "ntlmv1-ess",
            Self::V2 => "ntlmv2",
        }
    }
}

/// A verified client. Says who, not what they may do.
#[derive(Clone)]
pub struct Authenticated {
    pub account: Account,
    pub version: NtlmVersion,
    pub session_base_key: [u8; 16],
    /// The client sent a MIC and it verified: NEGOTIATE and CHALLENGE were
    /// not tampered with (e.g. flags stripped by a relay).
    pub mic_verified: bool,
    /// The client's channel binding matched our TLS certificate.
    pub channel_bound: bool,
    /// Client-supplied and unverified; for logs only.
    pub workstation: String,
}

impl std::fmt::Debug for Authenticated {
    // The session key must not reach logs through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticated")
            .field("account", &self.account)
            .field("version", &self.version)
            .field("session_base_key", &"<redacted>")
            .field("mic_verified", &self.mic_verified)
            .field("channel_bound", &self.channel_bound)
            .field("workstation", &self.workstation)
            .finish()
    }
}

/// Why an NTLM exchange failed. Every variant is the client's doing; the
/// gateway maps `Malformed` and `UnexpectedMessage` to 501 5.5.2 and all
/// others to the same 535 5.7.8, so the reply never tells an attacker which
/// check failed (the label still goes to metrics and logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NtlmError {
    #[error("malformed NTLM message: {0}")]
    Malformed(&'static str),
    #[error("NTLM message out of sequence")]
    UnexpectedMessage,
    #[error("anonymous NTLM authentication refused")]
    Anonymous,
    #[error("NTLMv1 response refused")]
    NtlmV1Refused,
    #[error("LM-only response refused")]
    LmRefused,
    /// Unknown user, wrong domain or wrong password: deliberately one error.
    #[error("bad credentials")]
    BadCredentials,
    #[error("account disabled")]
    AccountDisabled,
    #[error("replayed NTLM response")]
    Replay,
    #[error("MIC does not verify")]
    MicInvalid,
    #[error("MIC required but absent")]
    MicRequired,
    #[error("NTLMv2 target info does not echo the server's")]
    TargetInfoMismatch,
    #[error("NTLMv2 timestamp outside the allowed window")]
    TimestampOutOfWindow,
    #[error("channel binding does not match this TLS session")]
    ChannelBindingMismatch,
    #[error("channel binding required")]
    ChannelBindingRequired,
}

impl NtlmError {
    /// A bounded label for metrics (`relayguard_auth_failures_total{reason=…}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnexpectedMessage => "unexpected_message",
            Self::Anonymous => "anonymous_refused",
            Self::NtlmV1Refused => "ntlmv1_refused",
            Self::LmRefused => "lm_refused",
            Self::BadCredentials => "bad_credentials",
            Self::AccountDisabled => "account_disabled",
            Self::Replay => "replay",
            Self::MicInvalid => "mic_invalid",
            Self::MicRequired => "mic_required",
            Self::TargetInfoMismatch => "target_info_mismatch",
            Self::TimestampOutOfWindow => "timestamp_out_of_window",
            Self::ChannelBindingMismatch => "channel_binding_mismatch",
            Self::ChannelBindingRequired => "channel_binding_required",
        }
    }

    /// The client sent bytes that are not a valid NTLMSSP exchange, as
    /// opposed to a well-formed attempt that was refused.
    pub fn is_protocol_error(&self) -> bool {
        matches!(self, Self::Malformed(_) | Self::UnexpectedMessage)
    }
}

#[cfg(test)]
mod tests;
