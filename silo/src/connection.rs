//! The calling side of one envelope stream: used by the external client (to a gateway) and by a silo (to each
//! peer silo).
//!
//! One HTTP/2 connection carries one bidirectional stream. Callers from any task put request envelopes on the
//! stream's outbound queue and wait on a oneshot keyed by correlation id; one reader task resolves them as
//! responses arrive. When the stream ends (or the peer is declared dead and the connection closed), every
//! waiting call fails at once with the connection's "lost" error: delivery is at most once, so a call in flight
//! on a lost connection has an unknown outcome and is never re-sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use grains::CallError;
use http::uri::PathAndQuery;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::Endpoint;

use crate::activation_table::FastDashMap;
use crate::filter::BearerToken;
use crate::peer_auth::PeerIdentity;
use crate::tls::{ClientTls, error_chain};
use crate::wire::{CONNECT_PATH, Envelope, EnvelopeCodec, HARD_FRAME_LIMIT, Inbound, Kind};

/// Who is at the other end, which decides the error a lost call gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerKind {
    /// A gateway, seen from an external client: lost calls are [`CallError::Unavailable`].
    Gateway,
    /// Another silo: lost calls are [`CallError::SiloUnavailable`].
    Silo,
}

/// HTTP/2 keep-alive: after `interval` without hearing from the peer the connection pings it, and closes (failing
/// its calls in flight) when the ping is not answered within `timeout` — a frozen peer is noticed even while its
/// TCP connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

impl KeepAlive {
    /// Between silos, where membership probes judge liveness.
    pub(crate) const BETWEEN_SILOS: KeepAlive =
        KeepAlive { interval: Duration::from_secs(10), timeout: Duration::from_secs(10) };
}

/// One open stream and the calls waiting on it.
pub(crate) struct Connection {
    peer: String,
    kind: PeerKind,
    outbound: mpsc::UnboundedSender<Envelope>,
    pending: FastDashMap<u64, oneshot::Sender<Result<Bytes, CallError>>>,
    next_id: AtomicU64,
    alive: AtomicBool,
    reader: std::sync::OnceLock<AbortHandle>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("peer", &self.peer).field("alive", &self.is_alive()).finish()
    }
}

impl Connection {
    /// The error for a call that cannot reach, or lost, the peer.
    pub(crate) fn lost(&self, what: &str) -> CallError {
        lost(self.kind, &self.peer, what)
    }

    /// Opens a stream to `peer` (`host:port`), proving membership of the cluster with `identity` when given
    /// (a silo's connections to its peers, over TLS when the identity carries TLS settings), pinging it as
    /// `keep_alive` says. A peer that refuses the proof answers [`CallError::PermissionDenied`].
    pub(crate) async fn open(
        peer: &str,
        kind: PeerKind,
        connect_timeout: Duration,
        identity: Option<&PeerIdentity>,
        keep_alive: KeepAlive,
    ) -> Result<Arc<Self>, CallError> {
        let tls = identity.and_then(|i| i.tls.as_ref());
        Self::open_with(peer, kind, connect_timeout, identity, tls, None, keep_alive).await
    }

    /// [`Connection::open`], speaking TLS with `tls` when given, and sending a client's `bearer_token`. A
    /// server that fails the TLS handshake (it does not speak TLS, or its certificate is not trusted) is
    /// unreachable: the call fails, it never hangs.
    async fn open_with(
        peer: &str,
        kind: PeerKind,
        connect_timeout: Duration,
        identity: Option<&PeerIdentity>,
        tls: Option<&ClientTls>,
        bearer_token: Option<&BearerToken>,
        keep_alive: KeepAlive,
    ) -> Result<Arc<Self>, CallError> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = if peer.contains("://") { peer.to_owned() } else { format!("{scheme}://{peer}") };
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|_| CallError::Protocol(format!("invalid address {peer}")))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(keep_alive.interval)
            .keep_alive_timeout(keep_alive.timeout);
        if let Some(tls) = tls {
            endpoint = tls.apply(endpoint).map_err(|e| lost(kind, peer, &error_chain(&e)))?;
        }
        let channel = match crate::sim::network() {
            Some(network) => endpoint.connect_with_connector(crate::sim::Connector(network)).await,
            None => endpoint.connect().await,
        }
        .map_err(|e| lost(kind, peer, &error_chain(&e)))?;
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(HARD_FRAME_LIMIT)
            .max_encoding_message_size(HARD_FRAME_LIMIT);
        grpc.ready().await.map_err(|e| lost(kind, peer, &e.to_string()))?;
        let (outbound, rx) = mpsc::unbounded_channel();
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        if let Some(identity) = identity {
            identity.stamp(request.metadata_mut());
        }
        if let Some(token) = bearer_token {
            crate::peer_auth::stamp_bearer_token(token, request.metadata_mut());
        }
        let response = grpc
            .streaming(request, PathAndQuery::from_static(CONNECT_PATH), EnvelopeCodec::new(HARD_FRAME_LIMIT))
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    CallError::PermissionDenied(format!("{peer} refused this connection: {}", status.message()))
                }
                _ => lost(kind, peer, &status.to_string()),
            })?;
        let conn = Arc::new(Connection {
            peer: peer.to_owned(),
            kind,
            outbound,
            pending: FastDashMap::default(),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            reader: std::sync::OnceLock::new(),
        });
        let reader = tokio::spawn(read_responses(conn.clone(), response.into_inner()));
        let _ = conn.reader.set(reader.abort_handle());
        Ok(conn)
    }

    /// Whether the stream is still open.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Sends `envelope` as a request and waits for its response until `deadline`.
    pub(crate) async fn call(&self, mut envelope: Envelope, deadline: Instant) -> Result<Bytes, CallError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let correlation_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        envelope.correlation_id = correlation_id;
        envelope.kind = Kind::Request as i32;
        envelope.set_deadline(deadline);
        let (waiter_tx, waiter) = oneshot::channel();
        self.pending.insert(correlation_id, waiter_tx);
        // Checked after inserting: a reader that has already failed every pending call will not see ours.
        if !self.is_alive() {
            self.pending.remove(&correlation_id);
            return Err(self.lost("connection closed"));
        }
        if self.outbound.send(envelope).is_err() {
            self.pending.remove(&correlation_id);
            return Err(self.lost("connection closed"));
        }
        match tokio::time::timeout_at(deadline, waiter).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.lost("connection lost during the call")),
            Err(_) => {
                self.pending.remove(&correlation_id);
                Err(CallError::Timeout(timeout))
            }
        }
    }

    /// Closes the connection: every call waiting on it fails now.
    pub(crate) fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
        self.pending.clear();
    }
}

fn lost(kind: PeerKind, peer: &str, what: &str) -> CallError {
    match kind {
        PeerKind::Gateway => CallError::Unavailable(format!("gateway {peer}: {what}")),
        PeerKind::Silo => CallError::SiloUnavailable(format!("silo {peer}: {what}")),
    }
}

/// Resolves pending calls as their responses arrive; fails them all when the stream ends.
async fn read_responses(conn: Arc<Connection>, mut inbound: Streaming<Inbound>) {
    loop {
        let envelope = match inbound.message().await {
            Ok(Some(Inbound::Envelope(envelope))) => envelope,
            Ok(Some(other)) => {
                tracing::warn!(peer = %conn.peer, frame = ?other, "undecodable frame from peer");
                continue;
            }
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(peer = %conn.peer, %status, "stream failed");
                break;
            }
        };
        if envelope.kind != Kind::Response as i32 {
            continue;
        }
        if let Some((_, waiter)) = conn.pending.remove(&envelope.correlation_id) {
            let result = match envelope.error {
                Some(error) => Err(error.to_call_error()),
                None => Ok(envelope.payload),
            };
            let _ = waiter.send(result);
        }
    }
    conn.alive.store(false, Ordering::SeqCst);
    // Dropping the senders fails every waiting call.
    conn.pending.clear();
}

/// Open connections by endpoint, each opened once even when many callers want it at the same moment. A slow
/// or frozen endpoint holds up only the callers of that endpoint.
pub(crate) struct ConnectionPool {
    kind: PeerKind,
    connect_timeout: Duration,
    identity: Option<PeerIdentity>,
    tls: Option<ClientTls>,
    bearer_token: Option<BearerToken>,
    keep_alive: KeepAlive,
    open: FastDashMap<String, Arc<Connection>>,
    opening: FastDashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl ConnectionPool {
    /// An empty pool of connections to peers of `kind`, each opened with `identity`'s membership proof (and
    /// TLS settings) if given.
    pub(crate) fn new(kind: PeerKind, connect_timeout: Duration, identity: Option<PeerIdentity>) -> Self {
        Self {
            kind,
            connect_timeout,
            tls: identity.as_ref().and_then(|i| i.tls.clone()),
            bearer_token: None,
            identity,
            keep_alive: KeepAlive::BETWEEN_SILOS,
            open: FastDashMap::default(),
            opening: FastDashMap::default(),
        }
    }

    /// The same pool, opening its connections with `keep_alive`.
    pub(crate) fn with_keep_alive(self, keep_alive: KeepAlive) -> Self {
        Self { keep_alive, ..self }
    }

    /// The same pool, opening its connections over TLS with `tls` when given.
    pub(crate) fn with_tls(self, tls: Option<ClientTls>) -> Self {
        Self { tls, ..self }
    }

    /// The same pool, sending `bearer_token` on each connection it opens (a client's, see
    /// [`crate::ClientConfig::bearer_token`]).
    pub(crate) fn with_bearer_token(self, bearer_token: Option<BearerToken>) -> Self {
        Self { bearer_token, ..self }
    }

    /// The open connection to `endpoint`, opening one if there is none or the last one died.
    pub(crate) async fn get(&self, endpoint: &str) -> Result<Arc<Connection>, CallError> {
        if let Some(conn) = self.open.get(endpoint).filter(|c| c.is_alive()) {
            return Ok(conn.clone());
        }
        let gate = self.opening.entry(endpoint.to_owned()).or_default().clone();
        let _single_flight = gate.lock().await;
        if let Some(conn) = self.open.get(endpoint).filter(|c| c.is_alive()) {
            return Ok(conn.clone());
        }
        let conn = Connection::open_with(
            endpoint,
            self.kind,
            self.connect_timeout,
            self.identity.as_ref(),
            self.tls.as_ref(),
            self.bearer_token.as_ref(),
            self.keep_alive,
        )
        .await?;
        self.open.insert(endpoint.to_owned(), conn.clone());
        Ok(conn)
    }

    /// Closes and forgets the connections whose endpoint `keep` rejects: their calls in flight fail now.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.open.retain(|endpoint, conn| {
            let kept = keep(endpoint);
            if !kept {
                conn.close();
            }
            kept
        });
        self.opening.retain(|endpoint, _| keep(endpoint));
    }
}
