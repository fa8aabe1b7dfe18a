//! TLS of the device port: rustls (ring) with a certificate that can be replaced while
//! serving. New handshakes take the new certificate; open connections keep theirs until
//! they close (at most `MAX_CONNECTION_AGE_SECS` later).

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use std::sync::{Arc, RwLock};

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file holds no PEM certificate, or a malformed one.
    #[error("TLS_CERT_FILE: {0}")]
    Cert(String),
    /// The key file holds no PEM private key, or one rustls cannot use with the certificate.
    #[error("TLS_KEY_FILE: {0}")]
    Key(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM certificate chain and its PEM private key, checking that they match.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Cert("no PEM certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Key(e.to_string()))
}

/// Serves the current certificate to every handshake; [`CertStore::set`] replaces it.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// A store serving `key`.
    pub fn new(key: CertifiedKey) -> Self {
        CertStore { current: RwLock::new(Arc::new(key)) }
    }

    /// Replaces the certificate for new handshakes.
    pub fn set(&self, key: CertifiedKey) {
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(key),
            Err(p) => *p.into_inner() = Arc::new(key),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }
}

/// A server configuration offering HTTP/2 only (gRPC) with the certificates of `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_pair_loads_and_junk_is_refused_with_the_file_named() {
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let (cert, key) = (a.cert.pem(), a.signing_key.serialize_pem());
        assert!(certified_key(cert.as_bytes(), key.as_bytes()).is_ok());
        let err = certified_key(b"nothing", key.as_bytes()).expect_err("no cert").to_string();
        assert!(err.starts_with("TLS_CERT_FILE"), "{err}");
        let err = certified_key(cert.as_bytes(), b"nothing").expect_err("no key").to_string();
        assert!(err.starts_with("TLS_KEY_FILE"), "{err}");
        let other = b.signing_key.serialize_pem();
        let err = certified_key(cert.as_bytes(), other.as_bytes()).expect_err("mismatch");
        assert!(err.to_string().starts_with("TLS_KEY_FILE"), "{err}");
    }
}
