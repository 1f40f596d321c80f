//! TLS on the inference port: a rustls server config read from PEM files,
//! optionally requiring client certificates (mutual TLS), and swapped
//! whole when the files are reloaded, so rotated certificates take effect
//! for new connections without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

use crate::error::ServerError;

/// `[tls]`: TLS for the gRPC port; off unless `cert` and `key` are set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// Private key of `cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to; when
    /// set, every client must present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// True when TLS is configured.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }

    /// Checks that the settings are complete and the files load.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.client_ca.is_some() && !self.enabled() {
            return Err(ServerError::config(
                "tls.client_ca",
                "needs tls.cert and tls.key (mutual TLS is TLS)",
            ));
        }
        if self.enabled() {
            self.server_config()?;
        }
        Ok(())
    }

    /// The files to watch for changes.
    pub fn files(&self) -> Vec<PathBuf> {
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Reads the files and builds the rustls config (ALPN `h2` only: gRPC).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, ServerError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            let missing = if self.cert.is_none() {
                "tls.cert"
            } else {
                "tls.key"
            };
            return Err(ServerError::config(
                missing,
                "tls.cert and tls.key must be set together",
            ));
        };
        let chain = read_certs("tls.cert", cert)?;
        let key = read_key("tls.key", key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ServerError::config("tls", e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs("tls.client_ca", ca)? {
                    roots.add(c).map_err(|e| {
                        ServerError::config("tls.client_ca", format!("{}: {e}", ca.display()))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| {
                        ServerError::config("tls.client_ca", format!("{}: {e}", ca.display()))
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            ServerError::config(
                "tls.key",
                format!("does not match tls.cert or is unusable: {e}"),
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let pem = std::fs::read(path)
        .map_err(|e| ServerError::config(key, format!("cannot read {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::config(key, format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ServerError::config(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

fn read_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ServerError> {
    let pem = std::fs::read(path)
        .map_err(|e| ServerError::config(key, format!("cannot read {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| ServerError::config(key, format!("{}: bad PEM: {e}", path.display())))?
        .ok_or_else(|| {
            ServerError::config(key, format!("{} holds no PEM private key", path.display()))
        })
}

/// The TLS config new connections get; [`Tls::reload`] swaps it.
pub struct Tls {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads the files once; `None` when TLS is off.
    pub fn new(settings: &TlsConfig) -> Result<Option<Arc<Self>>, ServerError> {
        if !settings.enabled() {
            return Ok(None);
        }
        let config = settings.server_config()?;
        Ok(Some(Arc::new(Self {
            settings: settings.clone(),
            current: RwLock::new(config),
        })))
    }

    /// The config for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls config lock").clone()
    }

    /// Rereads the files. On error the previous config stays in use.
    pub fn reload(&self) -> Result<(), ServerError> {
        let config = self.settings.server_config()?;
        *self.current.write().expect("tls config lock") = config;
        Ok(())
    }

    /// The files this config comes from.
    pub fn files(&self) -> Vec<PathBuf> {
        self.settings.files()
    }
}
