//! Call filters: application code that sees each call before it runs, and may refuse it (after Orleans'
//! incoming and outgoing grain call filters).
//!
//! A silo runs its filters where a call *enters* its call path, once per call:
//!
//! - a call from an external client, on the gateway silo that received it: **incoming** filters, which see
//!   the client's identity (its TLS certificate's subject, its bearer token);
//! - a call a grain makes, on the calling grain's silo: **outgoing** filters, then incoming filters, which see
//!   the calling grain;
//! - a call made in the silo's process outside any grain (`Silo::grain`): incoming filters.
//!
//! The silo that then runs the grain, when it is another one, does not filter the call again: it comes from a
//! peer that proved membership, which filtered it on entry. So every silo of a cluster should register the
//! same filters. Filtering on entry means a refused call costs no hop across the cluster; unlike Orleans, a
//! filter does not see the grain instance, only who calls what with which metadata.
//!
//! Filters are synchronous, run on the caller's task and must be quick: they sit on the path of every call
//! (a silo without filters pays one branch). A filter that needs I/O to decide (a token introspection
//! endpoint, say) should cache its answers. Refusals are usually [`CallError::PermissionDenied`]; whatever a
//! filter returns reaches the caller as it is, and the call does not run.

use std::sync::Arc;

use grains::{CallError, GrainId, RequestMetadata};

/// What a call filter sees of one call.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct CallInfo<'a> {
    /// Who makes the call.
    pub caller: &'a CallerIdentity,
    /// The grain called.
    pub grain: &'a GrainId,
    /// The method called.
    pub method: &'a str,
    /// The caller's request metadata. Whoever calls chooses it: it proves nothing about who they are.
    pub metadata: &'a RequestMetadata,
}

/// Who makes a call, as the silo knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallerIdentity {
    /// Code in the silo's own process, outside any grain (e.g. through [`crate::Silo::grain`]).
    Local,
    /// A grain, during one of its turns on this silo.
    Grain(GrainId),
    /// An external client, through the gateway.
    Client(ClientIdentity),
    /// A connection that proved membership of the cluster with its secret (a client connected as a member,
    /// see [`crate::ClientConfig::member`]), by the name it connected under.
    Member(String),
}

/// What a client showed of itself when it opened its connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientIdentity {
    /// The subject of the certificate it presented over TLS (`tls_client_ca`), in RFC 4514 form
    /// (e.g. `CN=alice,O=Example`); the gateway has verified the certificate against that CA.
    pub certificate_subject: Option<String>,
    /// The bearer token it sent ([`crate::ClientConfig::bearer_token`]). Not verified by the silo: checking
    /// it is what a filter is for.
    pub bearer_token: Option<BearerToken>,
}

impl ClientIdentity {
    /// An identity with the given certificate subject and bearer token.
    pub fn new(certificate_subject: Option<String>, bearer_token: Option<BearerToken>) -> Self {
        Self { certificate_subject, bearer_token }
    }
}

/// A bearer token a client sends when it connects. Never printed: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// A token from its text.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(***)")
    }
}

impl From<&str> for BearerToken {
    fn from(token: &str) -> Self {
        Self::new(token)
    }
}

impl From<String> for BearerToken {
    fn from(token: String) -> Self {
        Self::new(token)
    }
}

/// A call filter: `Ok` lets the call through, an error refuses it with that error.
pub type CallFilter = Arc<dyn Fn(&CallInfo<'_>) -> Result<(), CallError> + Send + Sync>;

/// The filters a silo runs, in the order they were registered.
#[derive(Clone, Default)]
pub(crate) struct CallFilters {
    pub(crate) incoming: Vec<CallFilter>,
    pub(crate) outgoing: Vec<CallFilter>,
}

impl CallFilters {
    /// Whether there are no filters at all (the common case, checked first on the hot path).
    pub(crate) fn is_empty(&self) -> bool {
        self.incoming.is_empty() && self.outgoing.is_empty()
    }

    /// Runs the filters of a call entering the silo: for a grain's call, the outgoing filters and then the
    /// incoming ones; for anyone else's, the incoming ones.
    pub(crate) fn check(&self, call: &CallInfo<'_>) -> Result<(), CallError> {
        if let CallerIdentity::Grain(_) = call.caller {
            self.outgoing.iter().try_for_each(|filter| filter(call))?;
        }
        self.incoming.iter().try_for_each(|filter| filter(call))
    }
}

/// The subject of a DER certificate, in RFC 4514 form; `None` if it cannot be read (it was verified by
/// rustls, so this does not happen for a certificate the gateway accepted).
#[cfg(feature = "silo")]
pub(crate) fn certificate_subject(der: &[u8]) -> Option<String> {
    use x509_cert::der::Decode;
    let certificate = x509_cert::Certificate::from_der(der).ok()?;
    Some(certificate.tbs_certificate.subject.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse_all(_: &CallInfo<'_>) -> Result<(), CallError> {
        Err(CallError::PermissionDenied("no".into()))
    }

    #[test]
    fn outgoing_filters_see_only_calls_made_by_grains() {
        let filters = CallFilters { incoming: Vec::new(), outgoing: vec![Arc::new(refuse_all)] };
        let grain = GrainId::new("Cart", "alice");
        let metadata = RequestMetadata::new();
        let call =
            |caller| filters.check(&CallInfo { caller: &caller, grain: &grain, method: "add", metadata: &metadata });
        assert!(call(CallerIdentity::Grain(GrainId::new("Shop", "s"))).is_err());
        assert!(call(CallerIdentity::Local).is_ok());
        assert!(call(CallerIdentity::Client(ClientIdentity::default())).is_ok());
    }

    #[test]
    fn the_subject_of_a_certificate_is_read_in_rfc_4514_form() {
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Example");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let subject = certificate_subject(cert.der()).unwrap();
        assert!(subject.contains("CN=alice") && subject.contains("O=Example"), "{subject}");
        assert_eq!(certificate_subject(b"not a certificate"), None);
    }

    #[test]
    fn a_bearer_token_is_never_printed() {
        let identity = ClientIdentity::new(None, Some("hunter2".into()));
        assert!(!format!("{identity:?}").contains("hunter2"));
    }
}
