//! TLS on the silo's port and on the streams that clients and silos open to it.
//!
//! The cluster secret (see `peer_auth`) proves who opened a stream, but the traffic itself travels in the
//! clear, and a client cannot tell a silo from anyone else who answers on its address. TLS closes both gaps:
//!
//! - **The gateway** serves TLS when the silo has a certificate and key (`tls_cert`, `tls_key`). The TLS
//!   handshake runs under the same accept loop as any connection (see `admission`): it counts against
//!   `max_connections` and must finish within `handshake_timeout`, and many handshakes run at once, so a slow
//!   one holds up no other. A plaintext client is refused at the handshake (its connection closes; it never
//!   hangs). With `tls_client_ca` the gateway also asks clients for a certificate — optional: a client without
//!   one still connects, and call filters decide what it may do, seeing the certificate's subject when there
//!   is one.
//! - **Clients** use TLS when given an `https://` address, and verify the gateway against the system's roots or
//!   against the one CA given ([`crate::ClientConfig::tls_ca`]). A client certificate is sent when configured.
//! - **Silos** with a certificate open their streams to peers (and to a seed) over TLS too, and verify the
//!   peer's certificate against the cluster CA (`tls_ca`; the system's roots when unset). Every silo of a
//!   cluster is expected to serve TLS once one does: a peer is dialled at the endpoint it advertises, so its
//!   certificate names that IP address, or every silo names one shared `tls_server_name`.
//!
//! The work is done by rustls through tonic (the `ring` provider: it builds with a C compiler alone). This
//! module turns configuration into tonic's TLS settings and checks them when the silo starts, so that a bad
//! certificate is a start-up error rather than a failure on the first connection.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
#[cfg(feature = "silo")]
use tonic::transport::ServerTlsConfig;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[cfg(feature = "silo")]
use crate::config::SiloConfig;

/// Why TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read the {what} file {path}: {source}")]
    Read {
        /// Which setting named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// One of a pair of settings was given without the other (a certificate without its key, say).
    #[error("{0}")]
    Incomplete(String),
    /// rustls refused the settings (a malformed certificate or key, no system roots, ...).
    #[error("invalid TLS settings ({what}): {reason}")]
    Invalid {
        /// Which settings.
        what: &'static str,
        /// rustls' complaint.
        reason: String,
    },
}

/// PEM text given inline (it starts with `-----BEGIN`) or as the path of a file holding it. In configuration
/// files and environment variables both forms are one string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PemSource(String);

impl PemSource {
    /// PEM text or a path, told apart by the `-----BEGIN` that starts PEM text.
    pub fn new(text_or_path: impl Into<String>) -> Self {
        Self(text_or_path.into())
    }

    /// Whether this is PEM text rather than a path.
    pub fn is_inline(&self) -> bool {
        self.0.trim_start().starts_with("-----BEGIN")
    }

    /// The PEM text: itself, or the contents of the file it names. `what` names the setting in errors.
    pub fn read(&self, what: &'static str) -> Result<String, TlsError> {
        if self.is_inline() {
            return Ok(self.0.clone());
        }
        let path = PathBuf::from(&self.0);
        std::fs::read_to_string(&path).map_err(|source| TlsError::Read { what, path, source })
    }

    /// How the source is printed: the path, or a placeholder for inline text (which may be a private key).
    pub(crate) fn masked(&self) -> Self {
        if self.is_inline() { Self::new("(inline PEM)") } else { self.clone() }
    }
}

impl std::fmt::Debug for PemSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_inline() { f.write_str("PemSource(inline)") } else { write!(f, "PemSource({:?})", self.0) }
    }
}

impl From<&str> for PemSource {
    fn from(text_or_path: &str) -> Self {
        Self::new(text_or_path)
    }
}

impl From<String> for PemSource {
    fn from(text_or_path: String) -> Self {
        Self::new(text_or_path)
    }
}

fn identity(cert: &PemSource, key: &PemSource) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(cert.read("tls_cert")?, key.read("tls_key")?))
}

/// A certificate and key, both or neither.
fn pair<'a>(
    cert: Option<&'a PemSource>,
    key: Option<&'a PemSource>,
    names: &str,
) -> Result<Option<(&'a PemSource, &'a PemSource)>, TlsError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        _ => Err(TlsError::Incomplete(format!("{names}: give a certificate and its key, or neither"))),
    }
}

/// The gateway's TLS settings, if the silo has a certificate.
#[cfg(feature = "silo")]
pub(crate) fn server_config(config: &SiloConfig) -> Result<Option<ServerTlsConfig>, TlsError> {
    let Some((cert, key)) = pair(config.tls_cert.as_ref(), config.tls_key.as_ref(), "tls_cert and tls_key")? else {
        if config.tls_client_ca.is_some() {
            return Err(TlsError::Incomplete("tls_client_ca needs tls_cert and tls_key".to_owned()));
        }
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(identity(cert, key)?).timeout(config.handshake_timeout);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(ca.read("tls_client_ca")?)).client_auth_optional(true);
    }
    // Parse it now: a bad certificate stops the silo at start, not at its first connection.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(|e| TlsError::Invalid { what: "tls_cert, tls_key, tls_client_ca", reason: error_chain(&e) })?;
    Ok(Some(tls))
}

/// How a silo dials its peers: over TLS, verified against the cluster CA, when the silo serves TLS itself.
#[cfg(feature = "silo")]
pub(crate) fn peer_config(config: &SiloConfig) -> Result<Option<ClientTls>, TlsError> {
    if config.tls_cert.is_none() {
        return Ok(None);
    }
    ClientTls::new(config.tls_ca.as_ref(), config.tls_server_name.as_deref(), None).map(Some)
}

/// TLS settings for streams this process opens (a client to a gateway, a silo to a peer). Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct ClientTls {
    config: ClientTlsConfig,
}

impl ClientTls {
    /// Verifies servers against `ca` (else the system's roots) under `server_name` (else the host dialled),
    /// presenting `identity` (certificate, key) when given.
    pub(crate) fn new(
        ca: Option<&PemSource>,
        server_name: Option<&str>,
        identity: Option<(&PemSource, &PemSource)>,
    ) -> Result<Self, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca.read("tls_ca")?)),
            None => config.with_native_roots(),
        };
        if let Some(name) = server_name {
            config = config.domain_name(name);
        }
        if let Some((cert, key)) = identity {
            config = config.identity(self::identity(cert, key)?);
        }
        let tls = Self { config };
        // Parse it now, against a placeholder address: errors show at set-up, not on the first connection.
        tls.apply(Endpoint::from_static("https://127.0.0.1:1"))
            .map_err(|e| TlsError::Invalid { what: "tls_ca, client certificate", reason: error_chain(&e) })?;
        Ok(tls)
    }

    /// Client settings from a client's configuration: its CA, server name and certificate.
    pub(crate) fn for_client(
        ca: Option<&PemSource>,
        server_name: Option<&str>,
        cert: Option<&PemSource>,
        key: Option<&PemSource>,
    ) -> Result<Self, TlsError> {
        Self::new(ca, server_name, pair(cert, key, "tls_cert and tls_key")?)
    }

    /// `endpoint`, speaking TLS with these settings.
    pub(crate) fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, tonic::transport::Error> {
        endpoint.tls_config(self.config.clone())
    }
}

/// An error with its causes, which is where tonic puts rustls' reason.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_text_and_paths_are_told_apart_and_inline_text_is_never_printed() {
        let inline = PemSource::new("-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n");
        assert!(inline.is_inline());
        assert_eq!(format!("{inline:?}"), "PemSource(inline)");
        assert_eq!(inline.masked(), PemSource::new("(inline PEM)"));
        let path = PemSource::new("/etc/grains/silo.key");
        assert!(!path.is_inline());
        assert_eq!(path.masked(), path);
        assert!(matches!(path.read("tls_key"), Err(TlsError::Read { what: "tls_key", .. })));
    }

    #[test]
    fn a_certificate_without_its_key_or_a_malformed_one_is_refused_at_start() {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = PemSource::new(generated.cert.pem());
        let key = PemSource::new(generated.signing_key.serialize_pem());
        let half = SiloConfig { tls_cert: Some(cert.clone()), ..SiloConfig::default() };
        assert!(matches!(server_config(&half), Err(TlsError::Incomplete(_))));
        let whole = SiloConfig { tls_key: Some(key.clone()), ..half };
        assert!(server_config(&whole).unwrap().is_some());
        let garbled = SiloConfig { tls_cert: Some(PemSource::new("-----BEGIN CERTIFICATE-----\nnope\n")), ..whole };
        assert!(matches!(server_config(&garbled), Err(TlsError::Invalid { .. })));
        assert!(server_config(&SiloConfig::default()).unwrap().is_none(), "no certificate: plaintext");
        assert!(ClientTls::new(Some(&cert), None, Some((&cert, &key))).is_ok());
    }
}
