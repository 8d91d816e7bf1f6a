//! Who is at the other end of a stream: a silo of this cluster (a *peer*), or anyone else (a *client*).
//!
//! Silos run the cluster's system calls on each other (probes, directory operations, the seed's membership
//! table), so a stream that carries them must come from a member. A silo proves membership when it opens a
//! stream: the request's metadata names the silo's endpoint and carries a timestamp, a random nonce and
//! `HMAC-SHA256(cluster secret, "grains-peer-v1|cluster_id|endpoint|timestamp|nonce")`. The receiving silo
//! accepts the proof only within [`PROOF_WINDOW`] of its own clock, and only once (a replay cache keeps the
//! nonces seen within the window). A stream without the metadata is a client's; a stream with a wrong proof is
//! refused before it carries anything.
//!
//! Why a proof in the stream's metadata rather than a challenge and response on the stream: it costs no round
//! trip (a stream is set up, authenticated and usable in one exchange), the server keeps no per-handshake
//! state besides the replay cache, and the check happens before the stream exists, so a refused peer never
//! reaches the call path. The price is that silos' clocks must agree within the window, which membership
//! (heartbeats in milliseconds since the epoch) assumes already.
//!
//! The proof authenticates the stream's set-up, not each frame: on a network where an attacker can take over
//! an established TCP connection, also run the silos on a private network (or behind TLS).
//!
//! Without a configured secret (the embedded default and loopback development clusters) a stream that
//! declares itself a peer is taken at its word: *insecure mode*. A silo refuses to listen on a non-loopback
//! address in that mode unless told `insecure = true` (see [`crate::config::SiloConfig::check_exposure`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::filter::BearerToken;

/// How far a peer's timestamp may be from the receiver's clock (either way) for its proof to count.
pub const PROOF_WINDOW: Duration = Duration::from_secs(120);

/// Metadata key: the endpoint of the silo opening the stream (its presence declares the stream a peer's).
const PEER_HEADER: &str = "grains-peer";
/// Metadata key: the proof's timestamp, in milliseconds since the Unix epoch.
const TIME_HEADER: &str = "grains-peer-time";
/// Metadata key: the proof's nonce, hex.
const NONCE_HEADER: &str = "grains-peer-nonce";
/// Metadata key: the proof, hex HMAC-SHA256.
const PROOF_HEADER: &str = "grains-peer-proof";

/// Metadata key: a client's bearer token, as `Bearer <token>` (see `crate::filter`).
const AUTHORIZATION_HEADER: &str = "authorization";

/// Adds a client's bearer token to a stream's request metadata.
pub(crate) fn stamp_bearer_token(token: &BearerToken, metadata: &mut MetadataMap) {
    match MetadataValue::try_from(format!("Bearer {}", token.as_str())) {
        Ok(value) => {
            metadata.insert(AUTHORIZATION_HEADER, value);
        }
        Err(_) => tracing::warn!("the bearer token cannot be sent as metadata (it is not visible ASCII); not sent"),
    }
}

/// The bearer token in a stream's request metadata, if any.
pub(crate) fn bearer_token(metadata: &MetadataMap) -> Option<BearerToken> {
    let value = metadata.get(AUTHORIZATION_HEADER)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(BearerToken::new(token))
}

/// The secret shared by a cluster's silos. Never printed: `Debug` and the printed configuration show `***`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterSecret(String);

impl ClusterSecret {
    /// A secret from its text (e.g. the contents of a secret file, without the trailing newline).
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// Whether `presented` is this secret, compared in constant time (for a given length).
    pub(crate) fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
    }

    fn mac(&self) -> Hmac<Sha256> {
        match Hmac::<Sha256>::new_from_slice(self.0.as_bytes()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes a key of any length"),
        }
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

impl From<&str> for ClusterSecret {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

/// What a member of a cluster presents when it opens a stream: the cluster's id and secret (`None`: declare
/// membership without proof, accepted only by silos running without a secret).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterCredentials {
    /// The cluster's id (`cluster_id` of its silos).
    pub cluster_id: String,
    /// The cluster's secret.
    pub secret: Option<ClusterSecret>,
}

/// A member's credentials together with the name it opens streams under (a silo's endpoint), and the TLS
/// settings its streams use (a silo that serves TLS dials its peers over TLS).
#[derive(Debug, Clone)]
pub(crate) struct PeerIdentity {
    pub(crate) credentials: ClusterCredentials,
    pub(crate) endpoint: String,
    pub(crate) tls: Option<crate::tls::ClientTls>,
}

fn now_ms() -> u64 {
    crate::sim::unix_ms()
}

fn proof_text(cluster_id: &str, endpoint: &str, time_ms: u64, nonce: &str) -> String {
    format!("grains-peer-v1|{cluster_id}|{endpoint}|{time_ms}|{nonce}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

impl PeerIdentity {
    /// Adds the declaration (and, with a secret, the proof) to a stream's request metadata.
    pub(crate) fn stamp(&self, metadata: &mut MetadataMap) {
        self.stamp_at(metadata, now_ms());
    }

    fn stamp_at(&self, metadata: &mut MetadataMap, time_ms: u64) {
        let Ok(endpoint) = MetadataValue::try_from(self.endpoint.as_str()) else {
            tracing::warn!(endpoint = %self.endpoint, "endpoint cannot be sent as metadata; connecting as a client");
            return;
        };
        metadata.insert(PEER_HEADER, endpoint);
        let Some(secret) = &self.credentials.secret else { return };
        let nonce = hex(grains::Uuid::new_v4().as_bytes());
        let mut mac = secret.mac();
        mac.update(proof_text(&self.credentials.cluster_id, &self.endpoint, time_ms, &nonce).as_bytes());
        let proof = hex(&mac.finalize().into_bytes());
        for (key, value) in [(TIME_HEADER, time_ms.to_string()), (NONCE_HEADER, nonce), (PROOF_HEADER, proof)] {
            if let Ok(value) = MetadataValue::try_from(value.as_str()) {
                metadata.insert(key, value);
            }
        }
    }
}

/// Who opened a stream, as established at its set-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A silo of this cluster (proven, or declared to a silo in insecure mode), by its endpoint.
    Peer(String),
    /// Anyone else: grain calls and the gateway list only.
    Client,
}

/// Why a stream's set-up was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProofError {
    /// A declared peer sent no proof, or one that cannot be read.
    #[error("peer {0} sent no readable membership proof")]
    Missing(String),
    /// The proof's timestamp is outside the window.
    #[error("peer {endpoint}'s membership proof is {skew_ms} ms away from this silo's clock (window {window_ms} ms)")]
    Stale {
        /// The declared endpoint.
        endpoint: String,
        /// How far off the timestamp is.
        skew_ms: u64,
        /// The window.
        window_ms: u64,
    },
    /// The proof does not match this cluster's id and secret.
    #[error("peer {0}'s membership proof does not match this cluster's secret")]
    WrongSecret(String),
    /// The proof was presented before.
    #[error("peer {0}'s membership proof was replayed")]
    Replayed(String),
}

/// Checks the membership proofs of incoming streams for one silo.
pub(crate) struct PeerVerifier {
    credentials: ClusterCredentials,
    /// Nonces accepted within the window, with the time (ms) after which they can be forgotten.
    seen: Mutex<HashMap<Vec<u8>, u64>>,
}

impl PeerVerifier {
    pub(crate) fn new(credentials: ClusterCredentials) -> Self {
        Self { credentials, seen: Mutex::new(HashMap::new()) }
    }

    /// Who opened the stream whose request carried `metadata`.
    pub(crate) fn verify(&self, metadata: &MetadataMap) -> Result<Caller, ProofError> {
        self.verify_at(metadata, now_ms())
    }

    fn verify_at(&self, metadata: &MetadataMap, now_ms: u64) -> Result<Caller, ProofError> {
        let text = |key| metadata.get(key).and_then(|v| v.to_str().ok());
        let Some(endpoint) = text(PEER_HEADER) else { return Ok(Caller::Client) };
        let endpoint = endpoint.to_owned();
        let Some(secret) = &self.credentials.secret else { return Ok(Caller::Peer(endpoint)) };
        let missing = || ProofError::Missing(endpoint.clone());
        let time_ms: u64 = text(TIME_HEADER).and_then(|t| t.parse().ok()).ok_or_else(missing)?;
        let nonce = text(NONCE_HEADER).ok_or_else(missing)?;
        let proof = text(PROOF_HEADER).and_then(unhex).ok_or_else(missing)?;
        let window_ms = PROOF_WINDOW.as_millis() as u64;
        let skew_ms = now_ms.abs_diff(time_ms);
        if skew_ms > window_ms {
            return Err(ProofError::Stale { endpoint, skew_ms, window_ms });
        }
        let mut mac = secret.mac();
        mac.update(proof_text(&self.credentials.cluster_id, &endpoint, time_ms, nonce).as_bytes());
        // Constant-time comparison.
        if mac.verify_slice(&proof).is_err() {
            return Err(ProofError::WrongSecret(endpoint));
        }
        // Only proven streams reach the cache, so its size is bounded by the members' connection rate.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, forget_at| *forget_at > now_ms);
        if seen.insert(nonce.as_bytes().to_vec(), time_ms + window_ms + 1).is_some() {
            return Err(ProofError::Replayed(endpoint));
        }
        Ok(Caller::Peer(endpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(secret: Option<&str>) -> PeerIdentity {
        PeerIdentity {
            credentials: ClusterCredentials { cluster_id: "prod".into(), secret: secret.map(ClusterSecret::from) },
            endpoint: "127.0.0.1:30001".into(),
            tls: None,
        }
    }

    fn verifier(secret: Option<&str>) -> PeerVerifier {
        PeerVerifier::new(identity(secret).credentials)
    }

    #[test]
    fn a_stream_without_a_declaration_is_a_client() {
        assert_eq!(verifier(Some("s")).verify(&MetadataMap::new()), Ok(Caller::Client));
    }

    #[test]
    fn a_proof_with_the_cluster_secret_is_accepted_once() {
        let mut metadata = MetadataMap::new();
        identity(Some("s")).stamp(&mut metadata);
        let verifier = verifier(Some("s"));
        assert_eq!(verifier.verify(&metadata), Ok(Caller::Peer("127.0.0.1:30001".into())));
        assert!(matches!(verifier.verify(&metadata), Err(ProofError::Replayed(_))));
    }

    #[test]
    fn a_wrong_secret_another_cluster_or_no_proof_is_refused() {
        let mut metadata = MetadataMap::new();
        identity(Some("other")).stamp(&mut metadata);
        assert!(matches!(verifier(Some("s")).verify(&metadata), Err(ProofError::WrongSecret(_))));

        let mut metadata = MetadataMap::new();
        let mut elsewhere = identity(Some("s"));
        elsewhere.credentials.cluster_id = "staging".into();
        elsewhere.stamp(&mut metadata);
        assert!(matches!(verifier(Some("s")).verify(&metadata), Err(ProofError::WrongSecret(_))));

        let mut metadata = MetadataMap::new();
        identity(None).stamp(&mut metadata);
        assert!(matches!(verifier(Some("s")).verify(&metadata), Err(ProofError::Missing(_))));
    }

    #[test]
    fn a_claimed_endpoint_is_bound_to_its_proof() {
        let mut metadata = MetadataMap::new();
        identity(Some("s")).stamp(&mut metadata);
        metadata.insert(PEER_HEADER, MetadataValue::from_static("10.0.0.9:30000"));
        assert!(matches!(verifier(Some("s")).verify(&metadata), Err(ProofError::WrongSecret(_))));
    }

    #[test]
    fn a_proof_outside_the_window_is_refused() {
        let mut metadata = MetadataMap::new();
        identity(Some("s")).stamp_at(&mut metadata, 1_000_000);
        let later = 1_000_000 + PROOF_WINDOW.as_millis() as u64 + 1;
        assert!(matches!(verifier(Some("s")).verify_at(&metadata, later), Err(ProofError::Stale { .. })));
        assert!(verifier(Some("s")).verify_at(&metadata, later - 1).is_ok());
    }

    #[test]
    fn without_a_secret_a_declared_peer_is_taken_at_its_word() {
        let mut metadata = MetadataMap::new();
        identity(None).stamp(&mut metadata);
        assert_eq!(verifier(None).verify(&metadata), Ok(Caller::Peer("127.0.0.1:30001".into())));
    }

    #[test]
    fn a_bearer_token_survives_the_stream_metadata() {
        let mut metadata = MetadataMap::new();
        assert_eq!(bearer_token(&metadata), None);
        stamp_bearer_token(&BearerToken::new("t0ken"), &mut metadata);
        assert_eq!(bearer_token(&metadata), Some(BearerToken::new("t0ken")));
    }

    #[test]
    fn the_secret_is_never_printed() {
        assert_eq!(format!("{:?}", ClusterSecret::from("hunter2")), "ClusterSecret(***)");
    }
}
