//! TLS client settings (rustls with the ring provider) shared by the MQTT
//! source and the PostgreSQL connections: trust anchors from a CA file, and
//! optionally a client certificate and key, all PEM.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &str, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| file_error(path, e))?
        .ok_or_else(|| file_error(path, "no PEM private key in it"))
}

/// A client configuration trusting the certificates in `ca_file`, with a
/// client certificate when `cert_file` and `key_file` are given.
///
/// # Errors
/// A file that cannot be read or holds no usable PEM, or a rejected key.
pub fn client_config(
    ca_file: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_file)? {
        roots.add(cert)?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    if cert_file.is_empty() {
        Ok(builder.with_no_client_auth())
    } else {
        Ok(builder.with_client_auth_cert(certs(cert_file)?, key(key_file)?)?)
    }
}
