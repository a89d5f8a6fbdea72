//! The SASL exchanges of `AUTH` (RFC 4954) as a small state machine: each
//! client line moves it on; the session only does the I/O.
//!
//! NTLM follows [MS-SMTPNTLM]: `AUTH NTLM` with or without the NEGOTIATE as
//! initial response, `334 <CHALLENGE>`, then the AUTHENTICATE.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use policy::ntlm::ServerHandshake;

use super::{AuthFailure, Authenticator, Mechanism, Principal};

/// An AUTH exchange waiting for the client's next line.
pub enum Exchange {
    NtlmNegotiate(ServerHandshake),
    NtlmAuthenticate(ServerHandshake),
    Plain,
    LoginUser,
    LoginPassword(String),
}

impl Exchange {
    pub fn mechanism(&self) -> Mechanism {
        match self {
            Exchange::NtlmNegotiate(_) | Exchange::NtlmAuthenticate(_) => Mechanism::Ntlm,
            Exchange::Plain => Mechanism::Plain,
            Exchange::LoginUser | Exchange::LoginPassword(_) => Mechanism::Login,
        }
    }
}

/// Where the exchange stands after a step.
pub enum Progress {
    /// Send `334 <text>` and wait for the next line.
    Continue(Exchange, String),
    /// Verified or refused; the claimed (domain, user) feeds the lockout.
    Finished(Result<Principal, (AuthFailure, Option<(String, String)>)>),
}

/// `334` prompts of the LOGIN mechanism ("Username:", "Password:").
const LOGIN_USER: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

fn decode(line: &str) -> Result<Vec<u8>, AuthFailure> {
    if line == "=" {
        return Ok(Vec::new());
    }
    B64.decode(line.trim())
        .map_err(|_| AuthFailure::Malformed("invalid base64"))
}

fn fail(e: AuthFailure) -> Progress {
    Progress::Finished(Err((e, None)))
}

/// Starts an exchange for `AUTH <mechanism> [initial-response]`.
pub async fn start(
    auth: &Authenticator,
    mechanism: Mechanism,
    initial: Option<&str>,
    ip: IpAddr,
    channel_binding: Option<&[u8]>,
) -> Progress {
    match (mechanism, initial) {
        (Mechanism::Ntlm, None) => Progress::Continue(
            Exchange::NtlmNegotiate(auth.ntlm_handshake()),
            "NTLM supported".into(),
        ),
        (Mechanism::Ntlm, Some(i)) => {
            let exchange = Exchange::NtlmNegotiate(auth.ntlm_handshake());
            Box::pin(step(auth, exchange, i, ip, channel_binding)).await
        }
        (Mechanism::Plain, None) => Progress::Continue(Exchange::Plain, String::new()),
        (Mechanism::Plain, Some(i)) => {
            Box::pin(step(auth, Exchange::Plain, i, ip, channel_binding)).await
        }
        (Mechanism::Login, None) => Progress::Continue(Exchange::LoginUser, LOGIN_USER.into()),
        (Mechanism::Login, Some(i)) => {
            Box::pin(step(auth, Exchange::LoginUser, i, ip, channel_binding)).await
        }
    }
}

/// Feeds one client line (already known not to be `*`) to the exchange.
pub async fn step(
    auth: &Authenticator,
    exchange: Exchange,
    line: &str,
    ip: IpAddr,
    channel_binding: Option<&[u8]>,
) -> Progress {
    let bytes = match decode(line) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    match exchange {
        Exchange::NtlmNegotiate(mut hs) => match hs.challenge(&bytes) {
            Ok(challenge) => {
                Progress::Continue(Exchange::NtlmAuthenticate(hs), B64.encode(challenge))
            }
            Err(e) => fail(e.into()),
        },
        Exchange::NtlmAuthenticate(hs) => {
            Progress::Finished(auth.verify_ntlm(hs, &bytes, ip, channel_binding).await)
        }
        Exchange::Plain => {
            // authzid NUL authcid NUL passwd (RFC 4616).
            let parts: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
            let [authzid, authcid, password] = parts.as_slice() else {
                return fail(AuthFailure::Malformed(
                    "PLAIN response is not authzid NUL authcid NUL password",
                ));
            };
            let (Ok(authzid), Ok(authcid), Ok(password)) = (
                std::str::from_utf8(authzid),
                std::str::from_utf8(authcid),
                std::str::from_utf8(password),
            ) else {
                return fail(AuthFailure::Malformed("PLAIN response is not UTF-8"));
            };
            // Acting as someone else (proxy authorization) is never allowed.
            if !authzid.is_empty() && authzid != authcid {
                return fail(AuthFailure::Refused("authzid_refused"));
            }
            Progress::Finished(
                auth.verify_password(authcid, password, Mechanism::Plain, ip)
                    .await,
            )
        }
        Exchange::LoginUser => match String::from_utf8(bytes) {
            Ok(user) => Progress::Continue(Exchange::LoginPassword(user), LOGIN_PASSWORD.into()),
            Err(_) => fail(AuthFailure::Malformed("LOGIN user name is not UTF-8")),
        },
        Exchange::LoginPassword(user) => match String::from_utf8(bytes) {
            Ok(password) => Progress::Finished(
                auth.verify_password(&user, &password, Mechanism::Login, ip)
                    .await,
            ),
            Err(_) => fail(AuthFailure::Malformed("LOGIN password is not UTF-8")),
        },
    }
}
