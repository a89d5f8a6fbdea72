//! `AUTH NTLM` over a raw [`Client`], with the NTLM messages made by
//! policy's client ([`policy::ntlm::client`], honest or hostile) or by
//! Python impacket (`tests/e2e/scripts/impacket_ntlm.py`).
//!
//! The helpers send everything up to and including the AUTHENTICATE and
//! leave the final reply to the test:
//!
//! ```no_run
//! # use relayguard_e2e::{ntlm, Client, ALICE};
//! # let mut c: Client = unimplemented!();
//! ntlm::send_auth(&mut c, &ntlm::creds(&ALICE), ntlm::ClientOptions::default());
//! c.expect("235 2.7.0");
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

pub use policy::ntlm::client::{ClientCredentials, ClientHandshake, ClientMode, ClientOptions};
pub use policy::ntlm::message::{av_id, AvPair};

use crate::{Account, Client};

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    B64.decode(text.trim())
        .unwrap_or_else(|e| panic!("not base64 ({e}): {text:?}"))
}

/// Credentials for policy's NTLM client.
pub fn creds(a: &Account) -> ClientCredentials {
    creds_for(a.domain, a.user, a.password)
}

pub fn creds_for(domain: &str, user: &str, password: &str) -> ClientCredentials {
    ClientCredentials {
        user: user.to_string(),
        domain: domain.to_string(),
        password: password.to_string(),
        workstation: "E2E-CLIENT".to_string(),
    }
}

/// Eight bytes that differ between calls (the NTLMv2 client challenge).
fn client_challenge() -> [u8; 8] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    (nanos as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes()
}

/// Starts `AUTH NTLM` and sends `negotiate`: as the initial response on
/// the AUTH line when `initial`, else after `334 NTLM supported`. Returns
/// the CHALLENGE from the `334` reply.
pub fn challenge(c: &mut Client, negotiate: &[u8], initial: bool) -> Vec<u8> {
    if initial {
        c.send(&format!("AUTH NTLM {}", b64(negotiate)));
    } else {
        c.send("AUTH NTLM").expect("334 NTLM supported");
        c.send(&b64(negotiate));
    }
    let r = c.expect("334 ");
    unb64(&r.first()[4..])
}

/// A whole NTLM exchange with policy's client, AUTHENTICATE passed
/// through `tamper` before it is sent; returns the bytes sent. The final
/// reply is left unread.
pub fn send_auth_tampered(
    c: &mut Client,
    creds: &ClientCredentials,
    opts: ClientOptions,
    tamper: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> Vec<u8> {
    let mut hs = ClientHandshake::new(creds.clone(), client_challenge(), None).with_options(opts);
    let negotiate = hs.negotiate();
    let chal = challenge(c, &negotiate, false);
    let auth = hs
        .authenticate(&chal)
        .unwrap_or_else(|e| panic!("policy's client refused the CHALLENGE: {e}"));
    let auth = tamper(auth);
    c.send(&b64(&auth));
    auth
}

/// A whole NTLM exchange with policy's client (`AUTH NTLM`, `334`,
/// NEGOTIATE, `334 CHALLENGE`, AUTHENTICATE); returns the AUTHENTICATE
/// sent. The final reply is left unread.
pub fn send_auth(c: &mut Client, creds: &ClientCredentials, opts: ClientOptions) -> Vec<u8> {
    send_auth_tampered(c, creds, opts, |m| m)
}

/// Like [`send_auth`] with the NEGOTIATE as initial response
/// (`AUTH NTLM <base64>`).
pub fn send_auth_initial(
    c: &mut Client,
    creds: &ClientCredentials,
    opts: ClientOptions,
) -> Vec<u8> {
    let mut hs = ClientHandshake::new(creds.clone(), client_challenge(), None).with_options(opts);
    let negotiate = hs.negotiate();
    let chal = challenge(c, &negotiate, true);
    let auth = hs
        .authenticate(&chal)
        .unwrap_or_else(|e| panic!("policy's client refused the CHALLENGE: {e}"));
    c.send(&b64(&auth));
    auth
}

/// Where the NT response of an AUTHENTICATE message lies (its security
/// buffer at offset 20).
pub fn nt_response_range(msg: &[u8]) -> std::ops::Range<usize> {
    let len = usize::from(u16::from_le_bytes([msg[20], msg[21]]));
    let off = u32::from_le_bytes([msg[24], msg[25], msg[26], msg[27]]) as usize;
    off..off + len
}

/// The position of the value of AV pair `id` inside the NTLMv2 blob of an
/// AUTHENTICATE message, if the blob has one.
pub fn blob_av_pair(msg: &[u8], id: u16) -> Option<std::ops::Range<usize>> {
    let nt = nt_response_range(msg);
    // NTProofStr (16) + blob header (28), then the AV pairs.
    let mut at = nt.start + 16 + 28;
    while at + 4 <= nt.end {
        let pair_id = u16::from_le_bytes([msg[at], msg[at + 1]]);
        let len = usize::from(u16::from_le_bytes([msg[at + 2], msg[at + 3]]));
        if pair_id == id {
            return Some(at + 4..at + 4 + len);
        }
        if pair_id == av_id::EOL {
            return None;
        }
        at += 4 + len;
    }
    None
}

/// Python impacket (Debian `python3-impacket`, importable by
/// `/usr/bin/python3` only) making NTLM messages.
pub mod impacket {
    use super::*;

    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2e/scripts/impacket_ntlm.py")
    }

    fn run(args: &[&str]) -> Vec<u8> {
        let out = Command::new("timeout")
            .arg("60")
            .arg("/usr/bin/python3")
            .arg(script())
            .args(args)
            .output()
            .expect("run /usr/bin/python3");
        assert!(
            out.status.success(),
            "impacket_ntlm.py {args:?} failed ({}); is python3-impacket installed?\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        unb64(&String::from_utf8_lossy(&out.stdout))
    }

    /// Which response impacket computes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        NtlmV2,
        /// NTLMv1 (NTLMv1-ESS when the CHALLENGE offers it, as ours does).
        NtlmV1,
        /// The named user with no NT response and a one-byte LM response.
        EmptyNtResponse,
    }

    /// impacket's NEGOTIATE.
    pub fn negotiate(mode: Mode) -> Vec<u8> {
        match mode {
            Mode::NtlmV1 => run(&["negotiate", "--v1"]),
            _ => run(&["negotiate"]),
        }
    }

    /// impacket's AUTHENTICATE answering `challenge`. An empty user and
    /// password make impacket's anonymous message.
    pub fn authenticate(
        negotiate: &[u8],
        challenge: &[u8],
        domain: &str,
        user: &str,
        password: &str,
        mode: Mode,
    ) -> Vec<u8> {
        let (neg, chal) = (b64(negotiate), b64(challenge));
        let mut args = vec![
            "authenticate",
            "--negotiate",
            neg.as_str(),
            "--challenge",
            chal.as_str(),
            "--domain",
            domain,
            "--user",
            user,
            "--password",
            password,
        ];
        match mode {
            Mode::NtlmV2 => {}
            Mode::NtlmV1 => args.push("--v1"),
            Mode::EmptyNtResponse => args.push("--empty-nt"),
        }
        run(&args)
    }

    /// A whole exchange with impacket's messages; returns the
    /// AUTHENTICATE sent. The final reply is left unread.
    pub fn send_auth(
        c: &mut Client,
        domain: &str,
        user: &str,
        password: &str,
        mode: Mode,
    ) -> Vec<u8> {
        let neg = negotiate(mode);
        let chal = super::challenge(c, &neg, false);
        let auth = authenticate(&neg, &chal, domain, user, password, mode);
        c.send(&b64(&auth));
        auth
    }
}
