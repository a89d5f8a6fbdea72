//! TLS for both sides: the server certificate our listeners present (with
//! reload from disk without a restart) and the client configuration used
//! for STARTTLS toward the backend.
//!
//! Only TLS 1.2 and 1.3 are enabled: older versions are broken, and every
//! client that matters (Outlook 2013+, Windows 7+ with updates) speaks 1.2.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("{path}: unusable private key: {message}")]
    BadKey { path: String, message: String },
    #[error("{path}: certificate does not match the private key")]
    KeyMismatch { path: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a PEM certificate chain and private key and checks they belong
/// together, so that a mismatched pair is refused at load and not at the
/// first client's handshake.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs = parse_certs(&read(cert)?, cert)?;
    let key_der = parse_key(&read(key)?, key)?;
    let signing = any_supported_type(&key_der).map_err(|e| TlsError::BadKey {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|_| TlsError::KeyMismatch {
        path: cert.display().to_string(),
    })?;
    Ok(ck)
}

pub fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut BufReader::new(pem))
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.display().to_string(),
        })
}

/// The certificate a listener presents. Swapped atomically when the files
/// on disk change; handshakes in progress keep the key they started with.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    loaded_at: ArcSwap<Option<SystemTime>>,
}

impl CertStore {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let ck = load_certified_key(cert_path, key_path)?;
        Ok(Arc::new(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
            loaded_at: ArcSwap::from_pointee(newest_mtime(cert_path, key_path)),
        }))
    }

    /// The leaf certificate in use, for channel binding (tls-server-end-point).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.load().cert[0].clone()
    }

    /// Reloads if either file changed since the last load. A broken new
    /// pair is refused and the old one stays in service.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let mtime = newest_mtime(&self.cert_path, &self.key_path);
        if mtime == **self.loaded_at.load() {
            return Ok(false);
        }
        let ck = load_certified_key(&self.cert_path, &self.key_path)?;
        self.current.store(Arc::new(ck));
        self.loaded_at.store(Arc::new(mtime));
        Ok(true)
    }

    /// Checks for renewed files every `interval` for as long as the store
    /// is in use.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) {
        if interval.is_zero() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                match store.reload_if_changed() {
                    Ok(true) => tracing::info!(
                        certificate = %store.cert_path.display(),
                        "TLS certificate reloaded"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        error = %e,
                        "TLS certificate reload refused; the previous certificate stays in use"
                    ),
                }
            }
        });
    }
}

fn newest_mtime(a: &Path, b: &Path) -> Option<SystemTime> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(a).max(m(b))
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server configuration presenting the store's certificate.
pub fn server_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.ignore_client_order = true;
    Arc::new(config)
}

/// Client configuration for STARTTLS to the backend: the pinned CA (or
/// self-signed certificate) when configured, the public web roots otherwise.
pub fn backend_client_config(
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in parse_certs(&read(path)?, path)? {
                roots.add(cert)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A self-signed certificate and key in PEM, for the demo and tests.
pub fn self_signed(hostname: &str) -> Result<(String, String), TlsError> {
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let key =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((key.cert.pem(), key.key_pair.serialize_pem()))
}

/// The negotiated protocol and cipher, as shown in logs and the Received
/// header, e.g. `TLSv1.3` and `TLS13_AES_256_GCM_SHA384`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: &'static str,
    pub cipher: String,
    /// RFC 5929 tls-server-end-point of the certificate presented in this
    /// handshake (for NTLM channel binding); a later certificate reload
    /// does not change what this session was shown.
    pub end_point: Option<Vec<u8>>,
}

impl TlsInfo {
    pub fn from_connection(conn: &rustls::CommonState) -> Option<TlsInfo> {
        let version = match conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "TLS",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        Some(TlsInfo {
            version,
            cipher,
            end_point: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_loads_and_reload_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed("relay.example.test").unwrap();
        let cp = dir.path().join("cert.pem");
        let kp = dir.path().join("key.pem");
        std::fs::write(&cp, &cert).unwrap();
        std::fs::write(&kp, &key).unwrap();
        let store = CertStore::load(&cp, &kp).unwrap();
        let before = store.leaf();
        assert!(!store.reload_if_changed().unwrap());
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&cp, "not a certificate").unwrap();
        // Force a different mtime even on coarse-grained file systems.
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&cp)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(store.reload_if_changed().is_err());
        assert_eq!(
            store.leaf(),
            before,
            "old certificate stays after a bad reload"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed("a.test").unwrap();
        let (_, key) = self_signed("b.test").unwrap();
        let cp = dir.path().join("cert.pem");
        let kp = dir.path().join("key.pem");
        std::fs::write(&cp, cert).unwrap();
        std::fs::write(&kp, key).unwrap();
        assert!(matches!(
            load_certified_key(&cp, &kp),
            Err(TlsError::KeyMismatch { .. })
        ));
    }
}
