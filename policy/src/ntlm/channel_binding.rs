//! Channel binding (Extended Protection for Authentication) for NTLM over
//! TLS.
//!
//! A client that binds puts MD5(gss_channel_bindings_struct) into the
//! MsvAvChannelBindings AV pair, with the struct's application data set to
//! `"tls-server-end-point:" || hash(server certificate)` (RFC 5929 4.1).
//! If a man in the middle terminated TLS with its own certificate and relayed
//! the NTLM exchange to us, the hash the client saw differs from ours.

use md5::{Digest, Md5};
use sha2::{Sha224, Sha256, Sha384, Sha512};

const PREFIX: &[u8] = b"tls-server-end-point:";

/// The RFC 5929 `tls-server-end-point` value for a DER certificate: its hash
/// under the certificate's signature hash, SHA-256 when that is MD5 or SHA-1.
///
/// Signature algorithms that name no hash (Ed25519, Ed448) or that this
/// parser does not know also get SHA-256, as Windows and OpenSSL-based
/// clients do. Returns `None` only when the input is not a DER certificate.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let hash = signature_hash(cert_der)?;
    Some(match hash {
        Hash::Sha224 => Sha224::digest(cert_der).to_vec(),
        Hash::Sha256 => Sha256::digest(cert_der).to_vec(),
        Hash::Sha384 => Sha384::digest(cert_der).to_vec(),
        Hash::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

/// The MsvAvChannelBindings value for a `tls-server-end-point` binding:
/// MD5 of the gss_channel_bindings_struct with empty addresses.
pub fn channel_bindings_hash(tls_server_end_point: &[u8]) -> [u8; 16] {
    let app_len = (PREFIX.len() + tls_server_end_point.len()) as u32;
    Md5::new()
        .chain_update([0u8; 16]) // initiator and acceptor address types and lengths
        .chain_update(app_len.to_le_bytes())
        .chain_update(PREFIX)
        .chain_update(tls_server_end_point)
        .finalize()
        .into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

// Object identifier contents (DER, without tag and length).
const SHA224_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e];
const SHA384_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
const SHA512_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
const RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const ECDSA_WITH_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01];
const ECDSA_WITH_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
const ECDSA_WITH_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
const SHA224: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04];
const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
fn signature_hash(der: &[u8]) -> Option<Hash> {
    let (cert, _) = tlv(der, 0x30)?;
    let (_tbs, rest) = tlv(cert, 0x30)?;
    let (alg, _) = tlv(rest, 0x30)?;
    let (oid, params) = tlv(alg, 0x06)?;
    Some(match oid {
        SHA224_WITH_RSA | ECDSA_WITH_SHA224 => Hash::Sha224,
        SHA384_WITH_RSA | ECDSA_WITH_SHA384 => Hash::Sha384,
        SHA512_WITH_RSA | ECDSA_WITH_SHA512 => Hash::Sha512,
        RSASSA_PSS => pss_hash(params).unwrap_or(Hash::Sha256),
        _ => Hash::Sha256,
    })
}

/// RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier
/// DEFAULT sha1, ... }; the default (SHA-1) maps to SHA-256.
fn pss_hash(params: &[u8]) -> Option<Hash> {
    let (seq, _) = tlv(params, 0x30)?;
    let (explicit, _) = tlv(seq, 0xa0)?;
    let (alg, _) = tlv(explicit, 0x30)?;
    let (oid, _) = tlv(alg, 0x06)?;
    Some(match oid {
        SHA224 => Hash::Sha224,
        SHA384 => Hash::Sha384,
        SHA512 => Hash::Sha512,
        _ => Hash::Sha256,
    })
}

/// Reads one DER element with the expected tag: (contents, rest).
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, r) = rest.split_at_checked(n)?;
        rest = r;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    rest.split_at_checked(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(content);
        out
    }

    /// A structurally valid certificate: only the algorithm matters here.
    fn cert(alg_identifier: Vec<u8>) -> Vec<u8> {
        let tbs = der(0x30, &[0x5a; 200]); // long enough for long-form lengths
        let sig = der(0x03, &[0, 1, 2, 3]);
        der(0x30, &[tbs, alg_identifier, sig].concat())
    }

    fn alg(oid: &[u8], params: &[u8]) -> Vec<u8> {
        der(0x30, &[der(0x06, oid), params.to_vec()].concat())
    }

    #[test]
    fn hash_follows_the_signature_algorithm() {
        let sha256_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
        let sha1_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
        let ed25519 = [0x2b, 0x65, 0x70];
        let null = [0x05, 0x00];
        let cases: Vec<(Vec<u8>, usize)> = vec![
            (alg(&sha256_rsa, &null), 32),
            (alg(&sha1_rsa, &null), 32),
            (alg(&ed25519, &[]), 32),
            (alg(SHA384_WITH_RSA, &null), 48),
            (alg(ECDSA_WITH_SHA384, &[]), 48),
            (alg(ECDSA_WITH_SHA512, &[]), 64),
            (alg(SHA224_WITH_RSA, &null), 28),
            (
                alg(RSASSA_PSS, &der(0x30, &der(0xa0, &alg(SHA512, &null)))),
                64,
            ),
            (alg(RSASSA_PSS, &der(0x30, &[])), 32),
        ];
        for (a, len) in cases {
            let c = cert(a);
            let v = tls_server_end_point(&c).unwrap();
            assert_eq!(v.len(), len);
            match len {
                32 => assert_eq!(v, Sha256::digest(&c).to_vec()),
                48 => assert_eq!(v, Sha384::digest(&c).to_vec()),
                64 => assert_eq!(v, Sha512::digest(&c).to_vec()),
                _ => assert_eq!(v, Sha224::digest(&c).to_vec()),
            }
        }
    }

    #[test]
    fn non_certificates_give_none() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x05\x30\x00",
            b"\x31\x00",
            b"\x30\x84\xff\xff\xff\xff",
        ] {
            assert_eq!(tls_server_end_point(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bindings_hash_covers_the_struct() {
        let endpoint = [0xabu8; 32];
        let mut manual = vec![0u8; 16];
        manual.extend_from_slice(&(21u32 + 32).to_le_bytes());
        manual.extend_from_slice(b"tls-server-end-point:");
        manual.extend_from_slice(&endpoint);
        let want: [u8; 16] = Md5::digest(&manual).into();
        assert_eq!(channel_bindings_hash(&endpoint), want);
    }
}
