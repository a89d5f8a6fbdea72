//! Test certificates.

use std::path::{Path, PathBuf};

/// Writes a fresh self-signed certificate for `localhost` (and 127.0.0.1)
/// into `dir` as `cert.pem` and `key.pem`; returns both paths and the
/// certificate PEM (for clients that should trust it).
pub fn test_cert(dir: &Path) -> (PathBuf, PathBuf, String) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed certificate");
    let cert_pem = ck.cert.pem();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    crate::write_file(&cert, &cert_pem);
    crate::write_file(&key, ck.key_pair.serialize_pem());
    (cert, key, cert_pem)
}

/// The DER bytes of the first certificate in `pem` (for the NTLM channel
/// binding, which hashes the certificate as sent on the wire).
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate in the PEM")
        .expect("valid PEM")
        .to_vec()
}
