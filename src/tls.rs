//! The server certificate: loaded from `[tls]`, or made on first start when
//! `self_signed = true` and the files are missing.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.certificate {path}: {detail}")]
    Certificate { path: String, detail: String },
    #[error("tls.key {path}: {detail}")]
    Key { path: String, detail: String },
    #[error("making a self-signed certificate: {0}")]
    Generate(String),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What happened to the certificate at start, for the log.
pub enum Provenance {
    Loaded,
    MadeSelfSigned,
}

/// Loads (or makes) the certificate and builds the rustls server config.
pub fn server_config(
    cfg: &TlsConfig,
    hostname: &str,
) -> Result<(Arc<ServerConfig>, Provenance), TlsError> {
    let mut provenance = Provenance::Loaded;
    if cfg.self_signed && !cfg.certificate.exists() && !cfg.key.exists() {
        make_self_signed(&cfg.certificate, &cfg.key, hostname)?;
        provenance = Provenance::MadeSelfSigned;
    }
    let cert_path = cfg.certificate.display().to_string();
    let certs = CertificateDer::pem_file_iter(&cfg.certificate)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert_path.clone(),
            detail: format!(
                "{e}{}",
                if cfg.self_signed {
                    ""
                } else {
                    " (or set tls.self_signed = true to make one)"
                }
            ),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert_path,
            detail: "no PEM certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| TlsError::Key {
        path: cfg.key.display().to_string(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok((Arc::new(config), provenance))
}

fn make_self_signed(cert: &Path, key: &Path, hostname: &str) -> Result<(), TlsError> {
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    // The directory (by default `<store dir>/tls`) only outpost may enter.
    for p in [cert, key] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| TlsError::Generate(format!("{}: {e}", dir.display())))?;
        }
    }
    write_private(key, ck.signing_key.serialize_pem().as_bytes()).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        detail: e.to_string(),
    })?;
    std::fs::write(cert, ck.cert.pem()).map_err(|e| TlsError::Certificate {
        path: cert.display().to_string(),
        detail: e.to_string(),
    })?;
    Ok(())
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// What a certificate says about itself, for a person checking a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// The DNS names (subjectAltName) it is for, else its common name.
    pub names: Vec<String>,
    pub issuer: String,
    /// Unix seconds after which it is no longer valid.
    pub not_after: i64,
}

/// Reads names, issuer and expiry from a DER certificate; None when it
/// cannot be parsed.
pub fn describe_certificate(der: &[u8]) -> Option<CertificateSummary> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => Some(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                        16 => <[u8; 16]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
        );
    }
    Some(CertificateSummary {
        names,
        issuer: cert.issuer().to_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TlsConfig {
            certificate: dir.path().join("tls/cert.pem"),
            key: dir.path().join("tls/key.pem"),
            self_signed: true,
        };
        let (_, p) = server_config(&cfg, "gw.example").unwrap();
        assert!(matches!(p, Provenance::MadeSelfSigned));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cfg.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir = std::fs::metadata(dir.path().join("tls")).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
        let (_, p) = server_config(&cfg, "gw.example").unwrap();
        assert!(matches!(p, Provenance::Loaded));
    }

    #[test]
    fn missing_certificate_names_the_key() {
        let cfg = TlsConfig {
            certificate: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            self_signed: false,
        };
        let e = server_config(&cfg, "x").err().unwrap().to_string();
        assert!(e.contains("tls.certificate /nonexistent/cert.pem"), "{e}");
        assert!(e.contains("self_signed"), "{e}");
    }
}

/// The TLS client config for the upstream. `verify`: check the chain
/// against the system roots plus `ca_file`, and the name; otherwise
/// (opportunistic TLS) encrypt without checking who answers.
pub fn client_config(
    verify: bool,
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if verify {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Certificate {
                    path: format!("upstream.ca_file {}", path.display()),
                    detail: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(TlsError::Certificate {
                    path: format!("upstream.ca_file {}", path.display()),
                    detail: "no PEM certificate in the file".into(),
                });
            }
            for c in certs {
                roots.add(c).map_err(|e| TlsError::Certificate {
                    path: format!("upstream.ca_file {}", path.display()),
                    detail: e.to_string(),
                })?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Accepts any certificate: only for `upstream.tls = "opportunistic"`,
/// where the alternative is no encryption at all.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
