//! The NTLM one-way functions and key derivations of [MS-NLMP] 3.3 and 3.4,
//! built on RustCrypto primitives.
//!
//! Everything works on fixed-size arrays and feeds hashes incrementally, so
//! the verification path allocates nothing.

use des::cipher::{BlockEncrypt, KeyInit as _};
use hmac::{Hmac, Mac};
use md4::Md4;
use md5::{Digest, Md5};
use rc4::{consts::U16, Rc4, StreamCipher};

use super::message::{MIC_LAYOUT_HEADER_LEN, MIC_OFFSET};
use crate::identity::upcase_char;

type HmacMd5 = Hmac<Md5>;

/// NTOWFv1: MD4(UTF-16LE(password)).
pub fn ntowfv1(password: &str) -> [u8; 16] {
    crate::identity::nt_hash(password)
}

/// LMOWFv1: the LAN Manager hash. Only the client uses it (for NTLMv1
/// LM responses and the [MS-NLMP] 4.2.2 vectors); the server never accepts
/// LM authentication.
pub fn lmowfv1(password: &str) -> [u8; 16] {
    let mut key = [0u8; 14];
    for (slot, c) in key.iter_mut().zip(password.chars()) {
        // The OEM code page is unknowable here; non-ASCII maps to '?' as
        // Windows does for unmappable characters.
        *slot = if c.is_ascii() {
            c.to_ascii_uppercase() as u8
        } else {
            b'?'
        };
    }
    const MAGIC: &[u8; 8] = b"KGS!@#$%";
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&des_block(key[..7].try_into().unwrap_or_default(), MAGIC));
    out[8..].copy_from_slice(&des_block(key[7..].try_into().unwrap_or_default(), MAGIC));
    out
}

/// NTOWFv2 = HMAC_MD5(NT hash, UTF-16LE(UPPER(user) || domain)).
///
/// The domain is hashed exactly as the client sent it (not uppercased), so
/// callers must pass the wire value, not the account's canonical spelling.
pub fn ntowfv2(nt_hash: &[u8; 16], user: &str, domain: &str) -> [u8; 16] {
    let mut mac = hmac(nt_hash);
    for c in user.chars().map(upcase_char) {
        feed_utf16(&mut mac, c);
    }
    for c in domain.chars() {
        feed_utf16(&mut mac, c);
    }
    mac.finalize().into_bytes().into()
}

fn feed_utf16(mac: &mut HmacMd5, c: char) {
    let mut buf = [0u16; 2];
    for unit in c.encode_utf16(&mut buf) {
        mac.update(&unit.to_le_bytes());
    }
}

fn hmac(key: &[u8]) -> HmacMd5 {
    // HMAC accepts keys of any length; this cannot fail.
    <HmacMd5 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// HMAC_MD5 over the concatenation of `parts`.
pub fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = hmac(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// NTProofStr = HMAC_MD5(ResponseKeyNT, ServerChallenge || temp), where
/// `temp` is the NTLMv2 client challenge blob (everything after the
/// NTProofStr in the NT response).
pub fn nt_proof_str(
    response_key_nt: &[u8; 16],
    server_challenge: &[u8; 8],
    temp: &[u8],
) -> [u8; 16] {
    hmac_md5(response_key_nt, &[server_challenge, temp])
}

/// SessionBaseKey for NTLMv2 (also its KeyExchangeKey).
pub fn session_base_key_v2(response_key_nt: &[u8; 16], nt_proof_str: &[u8; 16]) -> [u8; 16] {
    hmac_md5(response_key_nt, &[nt_proof_str])
}

/// LMv2 response: HMAC_MD5(ResponseKeyLM, ServerChallenge || ClientChallenge)
/// followed by the client challenge.
pub fn lmv2_response(
    response_key: &[u8; 16],
    server_challenge: &[u8; 8],
    client_challenge: &[u8; 8],
) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(&hmac_md5(
        response_key,
        &[server_challenge, client_challenge],
    ));
    out[16..].copy_from_slice(client_challenge);
    out
}

/// The NTLMv2 client challenge blob ("temp" in [MS-NLMP] 3.3.2): header,
/// timestamp, client challenge, AV pairs (already ending in EOL), and the
/// trailing four zero bytes Windows appends.
pub fn ntlmv2_temp(timestamp: u64, client_challenge: &[u8; 8], av_pairs: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(28 + av_pairs.len() + 4);
    t.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
    t.extend_from_slice(&timestamp.to_le_bytes());
    t.extend_from_slice(client_challenge);
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(av_pairs);
    t.extend_from_slice(&[0, 0, 0, 0]);
    t
}

/// Expands a 7-byte key to the 8-byte DES key layout (parity bits unused).
fn des_key(k: [u8; 7]) -> [u8; 8] {
    [
        k[0],
        (k[0] << 7) | (k[1] >> 1),
        (k[1] << 6) | (k[2] >> 2),
        (k[2] << 5) | (k[3] >> 3),
        (k[3] << 4) | (k[4] >> 4),
        (k[4] << 3) | (k[5] >> 5),
        (k[5] << 2) | (k[6] >> 6),
        k[6] << 1,
    ]
}

fn des_block(key7: [u8; 7], data: &[u8; 8]) -> [u8; 8] {
    let key = des_key(key7);
    let cipher = des::Des::new(&key.into());
    let mut block = (*data).into();
    cipher.encrypt_block(&mut block);
    block.into()
}

/// DESL(K, D): D encrypted under three DES keys cut from the 16-byte K
/// (padded to 21 bytes with zeros).
pub fn desl(key: &[u8; 16], data: &[u8; 8]) -> [u8; 24] {
    let mut k = [0u8; 21];
    k[..16].copy_from_slice(key);
    let mut out = [0u8; 24];
    for i in 0..3 {
        let part: [u8; 7] = k[i * 7..i * 7 + 7].try_into().unwrap_or_default();
        out[i * 8..i * 8 + 8].copy_from_slice(&des_block(part, data));
    }
    out
}

/// NTLMv1 NT response (no extended session security).
pub fn ntlmv1_response(nt_hash: &[u8; 16], server_challenge: &[u8; 8]) -> [u8; 24] {
    desl(nt_hash, server_challenge)
}

/// NTLMv1 with extended session security ("NTLM2 session response"):
/// DESL(NT hash, MD5(ServerChallenge || ClientChallenge)[0..8]).
pub fn ntlmv1_ess_response(
    nt_hash: &[u8; 16],
    server_challenge: &[u8; 8],
    client_challenge: &[u8; 8],
) -> [u8; 24] {
    desl(nt_hash, &ess_challenge(server_challenge, client_challenge))
}

/// The challenge NTLMv1-ESS responses are computed over:
/// MD5(ServerChallenge || ClientChallenge)[0..8].
pub fn ess_challenge(server_challenge: &[u8; 8], client_challenge: &[u8; 8]) -> [u8; 8] {
    let digest = Md5::new()
        .chain_update(server_challenge)
        .chain_update(client_challenge)
        .finalize();
    let mut d = [0u8; 8];
    d.copy_from_slice(&digest[..8]);
    d
}

/// SessionBaseKey for NTLMv1 and v1-ESS: MD4(NT hash).
pub fn session_base_key_v1(nt_hash: &[u8; 16]) -> [u8; 16] {
    Md4::digest(nt_hash).into()
}

/// KeyExchangeKey for v1 with extended session security.
pub fn key_exchange_key_v1_ess(
    session_base_key: &[u8; 16],
    server_challenge: &[u8; 8],
    lm_response: &[u8; 24],
) -> [u8; 16] {
    hmac_md5(session_base_key, &[server_challenge, &lm_response[..8]])
}

/// RC4 with a 16-byte key, in place (RC4K in [MS-NLMP]).
pub fn rc4(key: &[u8; 16], data: &mut [u8]) {
    let mut cipher = Rc4::<U16>::new(key.into());
    cipher.apply_keystream(data);
}

/// MIC = HMAC_MD5(ExportedSessionKey, NEGOTIATE || CHALLENGE || AUTHENTICATE)
/// with the AUTHENTICATE's MIC field taken as zeros.
///
/// Returns `None` when `authenticate` is too short to hold a MIC field.
pub fn mic(
    exported_session_key: &[u8; 16],
    negotiate: &[u8],
    challenge: &[u8],
    authenticate: &[u8],
) -> Option<[u8; 16]> {
    let before = authenticate.get(..MIC_OFFSET)?;
    let after = authenticate.get(MIC_LAYOUT_HEADER_LEN..)?;
    Some(hmac_md5(
        exported_session_key,
        &[negotiate, challenge, before, &[0u8; 16], after],
    ))
}

#[cfg(test)]
mod tests {
    //! [MS-NLMP] 4.2 vectors, from /work/shared/ms-nlmp-test-vectors.json.
    use super::*;
    use crate::ntlm::message::{av_id, encode_av_pairs, AvPair, ChallengeMessage};

    fn h<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        hex::decode_to_slice(s, &mut out).unwrap();
        out
    }

    const USER: &str = "User";
    const DOMAIN: &str = "Domain";
    const PASSWORD: &str = "Password";
    const SERVER_CHALLENGE: &str = "0123456789abcdef";
    const CLIENT_CHALLENGE: &str = "aaaaaaaaaaaaaaaa";
    const RANDOM_SESSION_KEY: &str = "55555555555555555555555555555555";

    #[test]
    fn v1_one_way_functions_4_2_2_1() {
        assert_eq!(
            hex::encode(lmowfv1(PASSWORD)),
            "e52cac67419a9a224a3b108f3fa6cb6d"
        );
        assert_eq!(
            hex::encode(ntowfv1(PASSWORD)),
            "a4f49c406510bdcab6824ee7c30fd852"
        );
        assert_eq!(
            hex::encode(session_base_key_v1(&ntowfv1(PASSWORD))),
            "d87262b0cde4b1cb7499becccdf10784"
        );
    }

    #[test]
    fn v1_responses_4_2_2_2() {
        let sc = h::<8>(SERVER_CHALLENGE);
        assert_eq!(
            hex::encode(ntlmv1_response(&ntowfv1(PASSWORD), &sc)),
            "67c43011f30298a2ad35ece64f16331c44bdbed927841f94"
        );
        assert_eq!(
            hex::encode(desl(&lmowfv1(PASSWORD), &sc)),
            "98def7b87f88aa5dafe2df779688a172def11c7d5ccdef13"
        );
        // Flags 0xE2028233 negotiate KEY_EXCH without LM_KEY or ESS, so
        // KeyExchangeKey = SessionBaseKey.
        let mut key = h::<16>(RANDOM_SESSION_KEY);
        rc4(&session_base_key_v1(&ntowfv1(PASSWORD)), &mut key);
        assert_eq!(hex::encode(key), "518822b1b3f350c8958682ecbb3e3cb7");
    }

    #[test]
    fn v1_ess_4_2_3() {
        let sc = h::<8>(SERVER_CHALLENGE);
        let cc = h::<8>(CLIENT_CHALLENGE);
        let nt = ntlmv1_ess_response(&ntowfv1(PASSWORD), &sc, &cc);
        assert_eq!(
            hex::encode(nt),
            "7537f803ae367128ca458204bde7caf81e97ed2683267232"
        );
        let mut lm = [0u8; 24];
        lm[..8].copy_from_slice(&cc);
        assert_eq!(
            hex::encode(lm),
            "aaaaaaaaaaaaaaaa00000000000000000000000000000000"
        );
        let sbk = session_base_key_v1(&ntowfv1(PASSWORD));
        assert_eq!(
            hex::encode(key_exchange_key_v1_ess(&sbk, &sc, &lm)),
            "eb93429a8bd952f8b89c55b87f475edc"
        );
    }

    fn temp_4_2_4() -> Vec<u8> {
        let pairs = encode_av_pairs(&[
            AvPair::name(av_id::NB_DOMAIN_NAME, DOMAIN),
            AvPair::name(av_id::NB_COMPUTER_NAME, "Server"),
        ]);
        ntlmv2_temp(0, &h::<8>(CLIENT_CHALLENGE), &pairs)
    }

    #[test]
    fn v2_4_2_4() {
        let key = ntowfv2(&ntowfv1(PASSWORD), USER, DOMAIN);
        assert_eq!(hex::encode(key), "0c868a403bfd7a93a3001ef22ef02e3f");
        let sc = h::<8>(SERVER_CHALLENGE);
        let cc = h::<8>(CLIENT_CHALLENGE);
        assert_eq!(
            hex::encode(lmv2_response(&key, &sc, &cc)),
            "86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa"
        );
        let temp = temp_4_2_4();
        assert_eq!(
            hex::encode(&temp),
            "01010000000000000000000000000000aaaaaaaaaaaaaaaa0000000002000c0044006f006d00610069006e0001000c005300650072007600650072000000000000000000"
        );
        let proof = nt_proof_str(&key, &sc, &temp);
        assert_eq!(hex::encode(proof), "68cd0ab851e51c96aabc927bebef6a1c");
        let sbk = session_base_key_v2(&key, &proof);
        assert_eq!(hex::encode(sbk), "8de40ccadbc14a82f15cb0ad0de95ca3");
        let mut encrypted = h::<16>(RANDOM_SESSION_KEY);
        rc4(&sbk, &mut encrypted);
        assert_eq!(hex::encode(encrypted), "c5dad2544fc9799094ce1ce90bc9d03e");
        // And back: the server recovers the exported session key.
        rc4(&sbk, &mut encrypted);
        assert_eq!(encrypted, h::<16>(RANDOM_SESSION_KEY));
    }

    #[test]
    fn ntowfv2_uppercases_user_but_not_domain() {
        let hash = ntowfv1(PASSWORD);
        assert_eq!(ntowfv2(&hash, "user", DOMAIN), ntowfv2(&hash, USER, DOMAIN));
        assert_ne!(ntowfv2(&hash, USER, "DOMAIN"), ntowfv2(&hash, USER, DOMAIN));
        // One-to-one case mapping, as Windows: ß is not expanded to SS.
        assert_ne!(ntowfv2(&hash, "ß", DOMAIN), ntowfv2(&hash, "SS", DOMAIN));
    }

    #[test]
    fn challenge_message_4_2_4() {
        let bytes = hex::decode(
            "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef00000000000000002400240044000000060070170000000f53006500720076006500720002000c0044006f006d00610069006e0001000c0053006500720076006500720000000000",
        )
        .unwrap();
        let m = ChallengeMessage::parse(&bytes).unwrap();
        assert_eq!(m.flags, 0xE28A_8233);
        assert_eq!(m.server_challenge, h::<8>(SERVER_CHALLENGE));
        assert_eq!(m.version, Some([0x06, 0x00, 0x70, 0x17, 0, 0, 0, 0x0f]));
        assert_eq!(
            m.target_name,
            crate::ntlm::message::encode_string("Server", true)
        );
        assert_eq!(
            m.av_pairs().unwrap(),
            vec![
                AvPair::name(av_id::NB_DOMAIN_NAME, DOMAIN),
                AvPair::name(av_id::NB_COMPUTER_NAME, "Server"),
            ]
        );
        assert_eq!(m.encode(), bytes, "re-encoding is byte-identical");
    }

    #[test]
    fn rc4_check() {
        use rc4::consts::U3;
        let mut data = *b"Plaintext";
        let mut cipher = Rc4::<U3>::new(b"Key".into());
        cipher.apply_keystream(&mut data);
        assert_eq!(hex::encode(data), "bbf316e8d940af0ad3");
    }

    #[test]
    fn mic_zeroes_its_own_field() {
        let key = [7u8; 16];
        let mut auth = vec![1u8; 100];
        let a = mic(&key, b"n", b"c", &auth).unwrap();
        auth[MIC_OFFSET..MIC_LAYOUT_HEADER_LEN].fill(0xff);
        assert_eq!(mic(&key, b"n", b"c", &auth).unwrap(), a);
        auth[90] = 0;
        assert_ne!(mic(&key, b"n", b"c", &auth).unwrap(), a);
        assert!(mic(&key, b"n", b"c", &auth[..80]).is_none());
    }
}
