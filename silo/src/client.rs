//! The external client: calls grains from another process through a silo's gateway.
//!
//! One client holds one HTTP/2 connection with one bidirectional stream; every call from every task shares it,
//! matched to its response by correlation id. If the connection drops, calls in flight fail with
//! [`CallError::Unavailable`] (their outcome is unknown: at most once) and the next call reconnects.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use grains::runtime::{BoxFuture, Call, GrainRuntime, Payload};
use grains::{CallError, Grain, GrainId, GrainKey, GrainRef, RefCore};
use http::uri::PathAndQuery;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::wire::{CONNECT_PATH, Envelope, EnvelopeCodec, HARD_FRAME_LIMIT, Inbound, Kind, WireGrainId};

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The gateway address is not a valid URL.
    #[error("invalid gateway address `{0}`")]
    InvalidAddress(String),
    /// The gateway did not accept the connection.
    #[error("cannot connect to {url}: {reason}")]
    Unreachable {
        /// The gateway address.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// Client settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// The deadline of calls that do not set their own.
    pub call_timeout: Duration,
    /// The largest request payload the client sends, in bytes (larger ones fail locally).
    pub max_payload_bytes: usize,
    /// How long to wait for a connection to the gateway.
    pub connect_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            call_timeout: grains::runtime::DEFAULT_CALL_TIMEOUT,
            max_payload_bytes: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A connection to a cluster's gateway, for calling grains from outside the silo process. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.inner.url).finish_non_exhaustive()
    }
}

struct ClientInner {
    url: String,
    endpoint: Endpoint,
    config: ClientConfig,
    current: RwLock<Option<Arc<Connection>>>,
    reconnect: Mutex<()>,
    this: std::sync::Weak<ClientInner>,
}

/// One open stream and the calls waiting on it.
struct Connection {
    outbound: mpsc::UnboundedSender<Envelope>,
    pending: DashMap<u64, oneshot::Sender<Result<Payload, CallError>>>,
    next_id: AtomicU64,
    alive: AtomicBool,
}

impl Client {
    /// Connects to the gateway at `url` (e.g. `http://127.0.0.1:30000`) with default settings.
    pub async fn connect(url: impl Into<String>) -> Result<Client, ConnectError> {
        Self::connect_with(url, ClientConfig::default()).await
    }

    /// Connects to the gateway at `url` with `config`.
    pub async fn connect_with(url: impl Into<String>, config: ClientConfig) -> Result<Client, ConnectError> {
        let url = url.into();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|_| ConnectError::InvalidAddress(url.clone()))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true);
        let inner = Arc::new_cyclic(|this| ClientInner {
            url: url.clone(),
            endpoint,
            config,
            current: RwLock::new(None),
            reconnect: Mutex::new(()),
            this: this.clone(),
        });
        inner.connection().await.map_err(|e| ConnectError::Unreachable { url, reason: e.to_string() })?;
        Ok(Client { inner })
    }

    /// A typed reference to grain `key` of type `G`.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> G::Ref {
        G::Ref::from_core(RefCore::new(GrainId::new(G::TYPE_NAME, key), self.inner.clone()))
    }

    /// This client as a [`GrainRuntime`], for untyped calls.
    pub fn runtime(&self) -> Arc<dyn GrainRuntime> {
        self.inner.clone()
    }
}

impl ClientInner {
    /// The live connection, opening a new one if there is none or the last one died.
    async fn connection(&self) -> Result<Arc<Connection>, CallError> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let _single_flight = self.reconnect.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let conn = self.open().await?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn live(&self) -> Option<Arc<Connection>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|c| c.alive.load(Ordering::SeqCst)).cloned()
    }

    async fn open(&self) -> Result<Arc<Connection>, CallError> {
        let unavailable = |e: &dyn std::fmt::Display| CallError::Unavailable(format!("gateway {}: {e}", self.url));
        let channel: Channel = self.endpoint.connect().await.map_err(|e| unavailable(&e))?;
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(HARD_FRAME_LIMIT)
            .max_encoding_message_size(HARD_FRAME_LIMIT);
        grpc.ready().await.map_err(|e| unavailable(&e))?;
        let (outbound, rx) = mpsc::unbounded_channel();
        let response = grpc
            .streaming(
                tonic::Request::new(UnboundedReceiverStream::new(rx)),
                PathAndQuery::from_static(CONNECT_PATH),
                EnvelopeCodec::new(usize::MAX / 2),
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let conn = Arc::new(Connection {
            outbound,
            pending: DashMap::new(),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
        });
        tokio::spawn(read_responses(conn.clone(), response.into_inner()));
        Ok(conn)
    }
}

/// Resolves pending calls as their responses arrive; fails them all when the stream ends.
async fn read_responses(conn: Arc<Connection>, mut inbound: Streaming<Inbound>) {
    loop {
        let envelope = match inbound.message().await {
            Ok(Some(Inbound::Envelope(envelope))) => envelope,
            Ok(Some(other)) => {
                tracing::warn!(frame = ?other, "undecodable frame from the gateway");
                continue;
            }
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%status, "gateway stream failed");
                break;
            }
        };
        if envelope.kind != Kind::Response as i32 {
            continue;
        }
        if let Some((_, waiter)) = conn.pending.remove(&envelope.correlation_id) {
            let result = match envelope.error {
                Some(error) => Err(error.to_call_error()),
                None => Ok(Payload::Encoded(envelope.payload)),
            };
            let _ = waiter.send(result);
        }
    }
    conn.alive.store(false, Ordering::SeqCst);
    // Dropping the senders fails every waiting call with `Unavailable`.
    conn.pending.clear();
}

impl GrainRuntime for ClientInner {
    fn invoke(&self, call: Call) -> BoxFuture<'static, Result<Payload, CallError>> {
        let Some(client) = self.this.upgrade() else {
            return Box::pin(std::future::ready(Err(CallError::Unavailable("client dropped".to_owned()))));
        };
        Box::pin(async move { client.send(call).await })
    }

    fn default_timeout(&self) -> Duration {
        self.config.call_timeout
    }
}

impl ClientInner {
    /// Sends one call on the live connection and waits for its response or its deadline.
    async fn send(&self, call: Call) -> Result<Payload, CallError> {
        let payload = call.payload.into_bytes()?;
        let limit = self.config.max_payload_bytes;
        if payload.len() > limit {
            return Err(CallError::PayloadTooLarge { size: payload.len() as u64, limit: limit as u64 });
        }
        let timeout = call.deadline.saturating_duration_since(Instant::now());
        let conn = tokio::time::timeout_at(call.deadline, self.connection())
            .await
            .map_err(|_| CallError::Timeout(timeout))??;
        let correlation_id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (waiter_tx, waiter) = oneshot::channel();
        conn.pending.insert(correlation_id, waiter_tx);
        // Checked after inserting: a reader that has already failed every pending call will not see ours.
        if !conn.alive.load(Ordering::SeqCst) {
            conn.pending.remove(&correlation_id);
            return Err(CallError::Unavailable(format!("gateway {}: connection lost", self.url)));
        }
        let envelope = Envelope {
            correlation_id,
            kind: Kind::Request as i32,
            target: Some(WireGrainId::from(&call.target)),
            method: call.method.into_owned(),
            payload,
            timeout_ms: timeout.as_millis().max(1) as u64,
            call_chain: call.chain.iter().map(WireGrainId::from).collect(),
            error: None,
        };
        if conn.outbound.send(envelope).is_err() {
            conn.pending.remove(&correlation_id);
            return Err(CallError::Unavailable(format!("gateway {}: connection lost", self.url)));
        }
        match tokio::time::timeout_at(call.deadline, waiter).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Unavailable(format!("gateway {}: connection lost during the call", self.url))),
            Err(_) => {
                conn.pending.remove(&correlation_id);
                Err(CallError::Timeout(timeout))
            }
        }
    }
}
