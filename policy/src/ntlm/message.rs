//! NTLMSSP wire format ([MS-NLMP] 2.2): the three messages, their
//! security buffers and the AV pairs carried in target info.
//!
//! Everything here works on byte slices and never panics: every offset and
//! length read from the wire is checked before use, because these bytes come
//! straight from an unauthenticated SMTP client.

use std::time::{Duration, SystemTime};

use super::NtlmError;

pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

/// Upper bound on any NTLMSSP message. Real AUTHENTICATE messages are well
/// under 2 KiB; the cap keeps a hostile client from making us hash megabytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Where the MIC sits in an AUTHENTICATE message that has room for it
/// (after the 8-byte Version field).
pub const MIC_OFFSET: usize = 72;
/// The payload of an AUTHENTICATE message with a MIC starts at or after this.
pub const MIC_LAYOUT_HEADER_LEN: usize = MIC_OFFSET + 16;
/// AUTHENTICATE header without Version and MIC (as curl sends it).
pub const SHORT_AUTHENTICATE_HEADER_LEN: usize = 64;

const CHALLENGE_HEADER_LEN: usize = 56;
const NEGOTIATE_HEADER_LEN: usize = 32;

/// NegotiateFlags bits ([MS-NLMP] 2.2.2.5).
pub mod flags {
    pub const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
    pub const NEGOTIATE_OEM: u32 = 0x0000_0002;
    pub const REQUEST_TARGET: u32 = 0x0000_0004;
    pub const NEGOTIATE_SIGN: u32 = 0x0000_0010;
    pub const NEGOTIATE_SEAL: u32 = 0x0000_0020;
    pub const NEGOTIATE_DATAGRAM: u32 = 0x0000_0040;
    pub const NEGOTIATE_LM_KEY: u32 = 0x0000_0080;
    pub const NEGOTIATE_NTLM: u32 = 0x0000_0200;
    pub const ANONYMOUS: u32 = 0x0000_0800;
    pub const NEGOTIATE_OEM_DOMAIN_SUPPLIED: u32 = 0x0000_1000;
    pub const NEGOTIATE_OEM_WORKSTATION_SUPPLIED: u32 = 0x0000_2000;
    pub const NEGOTIATE_ALWAYS_SIGN: u32 = 0x0000_8000;
    pub const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
    pub const TARGET_TYPE_SERVER: u32 = 0x0002_0000;
    pub const NEGOTIATE_EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    pub const NEGOTIATE_IDENTIFY: u32 = 0x0010_0000;
    pub const REQUEST_NON_NT_SESSION_KEY: u32 = 0x0040_0000;
    pub const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
    pub const NEGOTIATE_VERSION: u32 = 0x0200_0000;
    pub const NEGOTIATE_128: u32 = 0x2000_0000;
    pub const NEGOTIATE_KEY_EXCH: u32 = 0x4000_0000;
    pub const NEGOTIATE_56: u32 = 0x8000_0000;
}

/// AV_PAIR identifiers ([MS-NLMP] 2.2.2.1).
pub mod av_id {
    pub const EOL: u16 = 0;
    pub const NB_COMPUTER_NAME: u16 = 1;
    pub const NB_DOMAIN_NAME: u16 = 2;
    pub const DNS_COMPUTER_NAME: u16 = 3;
    pub const DNS_DOMAIN_NAME: u16 = 4;
    pub const DNS_TREE_NAME: u16 = 5;
    pub const FLAGS: u16 = 6;
    pub const TIMESTAMP: u16 = 7;
    pub const SINGLE_HOST: u16 = 8;
    pub const TARGET_NAME: u16 = 9;
    pub const CHANNEL_BINDINGS: u16 = 10;
}

/// MsvAvFlags bit saying the AUTHENTICATE message carries a MIC.
pub const MSV_AV_FLAG_MIC_PRESENT: u32 = 0x0000_0002;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Negotiate = 1,
    Challenge = 2,
    Authenticate = 3,
}

/// Reads the signature and type of any NTLMSSP message.
///
/// A valid message of another type is `UnexpectedMessage` (the client is out
/// of step), anything else is `Malformed`.
pub fn message_type(msg: &[u8]) -> Result<MessageType, NtlmError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(NtlmError::Malformed("message too large"));
    }
    if msg.len() < 12 {
        return Err(NtlmError::Malformed("message truncated"));
    }
    if &msg[..8] != SIGNATURE {
        return Err(NtlmError::Malformed("bad NTLMSSP signature"));
    }
    match le_u32(msg, 8)? {
        1 => Ok(MessageType::Negotiate),
        2 => Ok(MessageType::Challenge),
        3 => Ok(MessageType::Authenticate),
        _ => Err(NtlmError::Malformed("unknown message type")),
    }
}

fn expect_type(msg: &[u8], want: MessageType) -> Result<(), NtlmError> {
    if message_type(msg)? == want {
        Ok(())
    } else {
        Err(NtlmError::UnexpectedMessage)
    }
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> Result<u16, NtlmError> {
    b.get(at..at.wrapping_add(2))
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or(NtlmError::Malformed("message truncated"))
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> Result<u32, NtlmError> {
    b.get(at..at.wrapping_add(4))
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(NtlmError::Malformed("message truncated"))
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> Result<u64, NtlmError> {
    b.get(at..at.wrapping_add(8))
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(NtlmError::Malformed("message truncated"))
}

fn array<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], NtlmError> {
    b.get(at..at.wrapping_add(N))
        .and_then(|s| s.try_into().ok())
        .ok_or(NtlmError::Malformed("message truncated"))
}

/// A security buffer (length, max length, offset) resolved against the
/// message. Returns the bytes and, for non-empty fields, their offset.
///
/// `min_offset` is the header length: a non-empty field pointing into the
/// header would let the same bytes be read as two things.
fn security_buffer<'a>(
    msg: &'a [u8],
    at: usize,
    min_offset: usize,
    what: &'static str,
) -> Result<(&'a [u8], Option<usize>), NtlmError> {
    let len = usize::from(le_u16(msg, at)?);
    let offset = le_u32(msg, at + 4)? as usize;
    if len == 0 {
        // Clients put arbitrary offsets in empty fields; they point nowhere.
        return Ok((&[], None));
    }
    if offset < min_offset {
        return Err(NtlmError::Malformed(what));
    }
    let end = offset.checked_add(len).ok_or(NtlmError::Malformed(what))?;
    msg.get(offset..end)
        .map(|s| (s, Some(offset)))
        .ok_or(NtlmError::Malformed(what))
}

fn put_security_buffer(out: &mut [u8], at: usize, len: usize, offset: usize) {
    // Lengths are u16 on the wire; callers keep messages under 64 KiB.
    let len = len as u16;
    out[at..at + 2].copy_from_slice(&len.to_le_bytes());
    out[at + 2..at + 4].copy_from_slice(&len.to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&(offset as u32).to_le_bytes());
}

/// NEGOTIATE_MESSAGE (type 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiateMessage {
    pub flags: u32,
    /// OEM domain name the client volunteered (rarely sent; informational).
    pub domain: Vec<u8>,
    pub workstation: Vec<u8>,
    pub version: Option<[u8; 8]>,
}

impl NegotiateMessage {
    pub fn parse(msg: &[u8]) -> Result<Self, NtlmError> {
        expect_type(msg, MessageType::Negotiate)?;
        let flags = le_u32(msg, 12)?;
        // The domain/workstation buffers and the version are optional: a
        // 16-byte NEGOTIATE is legal.
        let (domain, workstation, version) = if msg.len() >= NEGOTIATE_HEADER_LEN {
            let (d, _) = security_buffer(msg, 16, 16, "NEGOTIATE domain out of bounds")?;
            let (w, _) = security_buffer(msg, 24, 16, "NEGOTIATE workstation out of bounds")?;
            let version = if flags & flags::NEGOTIATE_VERSION != 0 && msg.len() >= 40 {
                Some(array(msg, 32)?)
            } else {
                None
            };
            (d.to_vec(), w.to_vec(), version)
        } else {
            (Vec::new(), Vec::new(), None)
        };
        Ok(Self {
            flags,
            domain,
            workstation,
            version,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = if self.version.is_some() { 40 } else { 32 };
        let mut out = vec![0u8; header];
        out[..8].copy_from_slice(SIGNATURE);
        out[8..12].copy_from_slice(&1u32.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        put_security_buffer(&mut out, 16, self.domain.len(), header);
        put_security_buffer(
            &mut out,
            24,
            self.workstation.len(),
            header + self.domain.len(),
        );
        if let Some(v) = self.version {
            out[32..40].copy_from_slice(&v);
        }
        out.extend_from_slice(&self.domain);
        out.extend_from_slice(&self.workstation);
        out
    }
}

/// CHALLENGE_MESSAGE (type 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeMessage {
    pub flags: u32,
    pub server_challenge: [u8; 8],
    /// In UTF-16LE when `NEGOTIATE_UNICODE` is set.
    pub target_name: Vec<u8>,
    /// Raw AV pairs, ending with MsvAvEOL; empty when absent.
    pub target_info: Vec<u8>,
    pub version: Option<[u8; 8]>,
}

impl ChallengeMessage {
    pub fn parse(msg: &[u8]) -> Result<Self, NtlmError> {
        expect_type(msg, MessageType::Challenge)?;
        let flags = le_u32(msg, 20)?;
        let server_challenge = array(msg, 24)?;
        let (target_name, name_off) = security_buffer(msg, 12, 48, "target name out of bounds")?;
        let (target_info, info_off) = security_buffer(msg, 40, 48, "target info out of bounds")?;
        if !target_info.is_empty() {
            walk_av_pairs(target_info, |_, _| Ok(()))?;
        }
        // The Version field exists only when the payload leaves room for it.
        let payload = [name_off, info_off]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(msg.len());
        let version = if flags & flags::NEGOTIATE_VERSION != 0 && payload >= CHALLENGE_HEADER_LEN {
            Some(array(msg, 48)?)
        } else {
            None
        };
        Ok(Self {
            flags,
            server_challenge,
            target_name: target_name.to_vec(),
            target_info: target_info.to_vec(),
            version,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; CHALLENGE_HEADER_LEN];
        out[..8].copy_from_slice(SIGNATURE);
        out[8..12].copy_from_slice(&2u32.to_le_bytes());
        put_security_buffer(&mut out, 12, self.target_name.len(), CHALLENGE_HEADER_LEN);
        out[20..24].copy_from_slice(&self.flags.to_le_bytes());
        out[24..32].copy_from_slice(&self.server_challenge);
        put_security_buffer(
            &mut out,
            40,
            self.target_info.len(),
            CHALLENGE_HEADER_LEN + self.target_name.len(),
        );
        out[48..56].copy_from_slice(&self.version.unwrap_or_default());
        out.extend_from_slice(&self.target_name);
        out.extend_from_slice(&self.target_info);
        out
    }

    pub fn av_pairs(&self) -> Result<Vec<AvPair>, NtlmError> {
        parse_av_pairs(&self.target_info)
    }
}

/// AUTHENTICATE_MESSAGE (type 3), borrowing from the received bytes so the
/// server's verification path copies nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuthenticateMessage<'a> {
    pub lm_response: &'a [u8],
    pub nt_response: &'a [u8],
    pub domain: &'a [u8],
    pub user: &'a [u8],
    pub workstation: &'a [u8],
    pub encrypted_random_session_key: &'a [u8],
    pub flags: u32,
    pub version: Option<[u8; 8]>,
    /// The MIC field when the layout has room for one (payload at or after
    /// offset 88). Whether it is meaningful is decided by MsvAvFlags.
    pub mic: Option<[u8; 16]>,
}

impl<'a> AuthenticateMessage<'a> {
    pub fn parse(msg: &'a [u8]) -> Result<Self, NtlmError> {
        expect_type(msg, MessageType::Authenticate)?;
        if msg.len() < SHORT_AUTHENTICATE_HEADER_LEN {
            return Err(NtlmError::Malformed("AUTHENTICATE header truncated"));
        }
        let min = SHORT_AUTHENTICATE_HEADER_LEN;
        let (lm_response, o1) = security_buffer(msg, 12, min, "LM response out of bounds")?;
        let (nt_response, o2) = security_buffer(msg, 20, min, "NT response out of bounds")?;
        let (domain, o3) = security_buffer(msg, 28, min, "domain out of bounds")?;
        let (user, o4) = security_buffer(msg, 36, min, "user name out of bounds")?;
        let (workstation, o5) = security_buffer(msg, 44, min, "workstation out of bounds")?;
        let (encrypted_random_session_key, o6) =
            security_buffer(msg, 52, min, "session key out of bounds")?;
        let flags = le_u32(msg, 60)?;
        let payload = [o1, o2, o3, o4, o5, o6]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(msg.len());
        let version = if payload >= MIC_OFFSET {
            Some(array(msg, 64)?)
        } else {
            None
        };
        let mic = if payload >= MIC_LAYOUT_HEADER_LEN {
            Some(array(msg, MIC_OFFSET)?)
        } else {
            None
        };
        Ok(Self {
            lm_response,
            nt_response,
            domain,
            user,
            workstation,
            encrypted_random_session_key,
            flags,
            version,
            mic,
        })
    }

    /// Encodes with the Windows layout (Version and MIC fields, payload at
    /// 88) when `mic_layout`, else with curl's 64-byte header. The MIC field
    /// holds `self.mic` or zeros.
    pub fn encode(&self, mic_layout: bool) -> Vec<u8> {
        let header = if mic_layout {
            MIC_LAYOUT_HEADER_LEN
        } else {
            SHORT_AUTHENTICATE_HEADER_LEN
        };
        let mut out = vec![0u8; header];
        out[..8].copy_from_slice(SIGNATURE);
        out[8..12].copy_from_slice(&3u32.to_le_bytes());
        // Windows' payload order: strings first, then responses, then key.
        let mut offset = header;
        let order: [(usize, &[u8]); 6] = [
            (28, self.domain),
            (36, self.user),
            (44, self.workstation),
            (12, self.lm_response),
            (20, self.nt_response),
            (52, self.encrypted_random_session_key),
        ];
        for (at, bytes) in order {
            put_security_buffer(&mut out, at, bytes.len(), offset);
            offset += bytes.len();
        }
        out[60..64].copy_from_slice(&self.flags.to_le_bytes());
        if mic_layout {
            out[64..72].copy_from_slice(&self.version.unwrap_or_default());
            out[MIC_OFFSET..MIC_LAYOUT_HEADER_LEN].copy_from_slice(&self.mic.unwrap_or_default());
        }
        for (_, bytes) in order {
            out.extend_from_slice(bytes);
        }
        out
    }
}

/// One AV pair, owned; used when building target info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvPair {
    pub id: u16,
    pub value: Vec<u8>,
}

impl AvPair {
    pub fn new(id: u16, value: impl Into<Vec<u8>>) -> Self {
        Self {
            id,
            value: value.into(),
        }
    }

    /// A name-valued pair (NetBIOS/DNS names), in UTF-16LE as on the wire.
    pub fn name(id: u16, name: &str) -> Self {
        Self::new(id, encode_string(name, true))
    }
}

/// Walks AV pairs up to and including MsvAvEOL, calling `f` for each pair
/// before EOL. Returns the number of bytes consumed.
///
/// Refuses a missing EOL, a non-empty EOL, a pair running past the end, and
/// a repeated AvId: [MS-NLMP] allows each at most once, and a duplicate would
/// let a client show one value to us and another to a second verifier.
pub(crate) fn walk_av_pairs<'a>(
    bytes: &'a [u8],
    mut f: impl FnMut(u16, &'a [u8]) -> Result<(), NtlmError>,
) -> Result<usize, NtlmError> {
    let mut at = 0usize;
    let mut seen: u64 = 0;
    loop {
        let id = le_u16(bytes, at).map_err(|_| NtlmError::Malformed("AV pairs without EOL"))?;
        let len = usize::from(
            le_u16(bytes, at + 2).map_err(|_| NtlmError::Malformed("AV pairs without EOL"))?,
        );
        let start = at + 4;
        let value = bytes
            .get(start..start + len)
            .ok_or(NtlmError::Malformed("AV pair out of bounds"))?;
        if id == av_id::EOL {
            if len != 0 {
                return Err(NtlmError::Malformed("MsvAvEOL with a value"));
            }
            return Ok(start);
        }
        if id < 64 {
            let bit = 1u64 << id;
            if seen & bit != 0 {
                return Err(NtlmError::Malformed("duplicate AV pair"));
            }
            seen |= bit;
        }
        let want = match id {
            av_id::FLAGS => Some(4),
            av_id::TIMESTAMP => Some(8),
            av_id::CHANNEL_BINDINGS => Some(16),
            _ => None,
        };
        if want.is_some_and(|w| w != len) {
            return Err(NtlmError::Malformed("AV pair has the wrong length"));
        }
        f(id, value)?;
        at = start + len;
    }
}

/// Parses AV pairs into owned values (without the EOL).
pub fn parse_av_pairs(bytes: &[u8]) -> Result<Vec<AvPair>, NtlmError> {
    let mut out = Vec::new();
    walk_av_pairs(bytes, |id, value| {
        out.push(AvPair::new(id, value));
        Ok(())
    })?;
    Ok(out)
}

/// Encodes AV pairs and appends MsvAvEOL.
pub fn encode_av_pairs(pairs: &[AvPair]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pairs.iter().map(|p| 4 + p.value.len()).sum::<usize>() + 4);
    for p in pairs {
        out.extend_from_slice(&p.id.to_le_bytes());
        out.extend_from_slice(&(p.value.len() as u16).to_le_bytes());
        out.extend_from_slice(&p.value);
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

/// Encodes a string as UTF-16LE, or as bytes for an OEM-mode peer (only
/// ASCII survives that; the OEM code page is unknowable here).
pub fn encode_string(s: &str, unicode: bool) -> Vec<u8> {
    if unicode {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    } else {
        s.chars()
            .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
            .collect()
    }
}

/// Decodes a string field. OEM strings must be ASCII: guessing a code page
/// could map two different byte strings onto one account name.
pub fn decode_string(bytes: &[u8], unicode: bool) -> Result<String, NtlmError> {
    if unicode {
        if bytes.len() & 1 != 0 {
            return Err(NtlmError::Malformed("odd-length UTF-16 string"));
        }
        let units = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        char::decode_utf16(units)
            .map(|r| r.map_err(|_| NtlmError::Malformed("invalid UTF-16 string")))
            .collect()
    } else if bytes.is_ascii() {
        Ok(bytes.iter().map(|&b| char::from(b)).collect())
    } else {
        Err(NtlmError::Malformed("non-ASCII OEM string"))
    }
}

/// 100 ns ticks between 1601-01-01 and 1970-01-01.
const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// Windows FILETIME (100 ns ticks since 1601) for `t`; saturates outside the
/// representable range rather than failing.
pub fn filetime(t: SystemTime) -> u64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => {
            let ticks = d.as_secs().saturating_mul(10_000_000) + u64::from(d.subsec_nanos() / 100);
            FILETIME_UNIX_EPOCH.saturating_add(ticks)
        }
        Err(e) => {
            let d = e.duration();
            let ticks = d.as_secs().saturating_mul(10_000_000) + u64::from(d.subsec_nanos() / 100);
            FILETIME_UNIX_EPOCH.saturating_sub(ticks)
        }
    }
}

/// How far apart two FILETIMEs are, in either direction.
pub(crate) fn filetime_distance(a: u64, b: u64) -> Duration {
    let ticks = a.abs_diff(b);
    Duration::new(ticks / 10_000_000, ((ticks % 10_000_000) * 100) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filetime_of_unix_epoch() {
        assert_eq!(filetime(SystemTime::UNIX_EPOCH), FILETIME_UNIX_EPOCH);
        assert_eq!(
            filetime(SystemTime::UNIX_EPOCH + Duration::new(1, 500)),
            FILETIME_UNIX_EPOCH + 10_000_005
        );
        assert_eq!(filetime_distance(10, 30_000_010), Duration::from_secs(3));
    }

    #[test]
    fn message_type_table() {
        let cases: &[(&[u8], Result<MessageType, NtlmError>)] = &[
            (b"", Err(NtlmError::Malformed("message truncated"))),
            (
                b"NTLMSSP\0\x01\0\0",
                Err(NtlmError::Malformed("message truncated")),
            ),
            (
                b"NTLMSSQ\0\x01\0\0\0",
                Err(NtlmError::Malformed("bad NTLMSSP signature")),
            ),
            (b"NTLMSSP\0\x01\0\0\0", Ok(MessageType::Negotiate)),
            (b"NTLMSSP\0\x02\0\0\0", Ok(MessageType::Challenge)),
            (b"NTLMSSP\0\x03\0\0\0", Ok(MessageType::Authenticate)),
            (
                b"NTLMSSP\0\x04\0\0\0",
                Err(NtlmError::Malformed("unknown message type")),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                format!("{:?}", message_type(input)),
                format!("{want:?}"),
                "{input:?}"
            );
        }
        let huge = vec![0u8; MAX_MESSAGE_LEN + 1];
        assert!(matches!(
            message_type(&huge),
            Err(NtlmError::Malformed("message too large"))
        ));
    }

    #[test]
    fn negotiate_round_trip_and_short_form() {
        let m = NegotiateMessage {
            flags: 0xe208_8297,
            domain: b"DOM".to_vec(),
            workstation: b"WS".to_vec(),
            version: Some([10, 0, 0x61, 0x4a, 0, 0, 0, 15]),
        };
        assert_eq!(NegotiateMessage::parse(&m.encode()).unwrap(), m);
        // curl's 16-byte-plus-empty-buffers form, and the minimal 16 bytes.
        let short = b"NTLMSSP\0\x01\0\0\0\x06\x82\x08\0";
        assert_eq!(NegotiateMessage::parse(short).unwrap().flags, 0x0008_8206);
    }

    #[test]
    fn av_pairs_are_checked() {
        let good = encode_av_pairs(&[AvPair::name(av_id::NB_DOMAIN_NAME, "D")]);
        assert_eq!(parse_av_pairs(&good).unwrap().len(), 1);
        let cases: &[(&[u8], &str)] = &[
            (b"", "AV pairs without EOL"),
            (b"\x02\x00\x02\x00D\x00", "AV pairs without EOL"),
            (b"\x02\x00\x04\x00D\x00", "AV pair out of bounds"),
            (b"\x00\x00\x01\x00\x00", "MsvAvEOL with a value"),
            (
                b"\x02\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00",
                "duplicate AV pair",
            ),
            (
                b"\x07\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00",
                "AV pair has the wrong length",
            ),
        ];
        for (input, want) in cases {
            match parse_av_pairs(input) {
                Err(NtlmError::Malformed(m)) => assert_eq!(m, *want, "{input:?}"),
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn strings() {
        assert_eq!(encode_string("Ab", true), b"A\0b\0");
        assert_eq!(decode_string(b"A\0b\0", true).unwrap(), "Ab");
        assert!(decode_string(b"A\0b", true).is_err());
        assert!(decode_string(b"\x00\xd8", true).is_err(), "lone surrogate");
        assert_eq!(decode_string(b"Ab", false).unwrap(), "Ab");
        assert!(decode_string(b"\xc4", false).is_err());
    }
}
