//! The calling side of one envelope stream: used by the external client (to a gateway) and by a silo (to each
//! peer silo).
//!
//! A connection is a framed TCP connection (see `framed`) when it is plaintext, else (TLS, or
//! `GRAINS_TRANSPORT=grpc`) one bidirectional gRPC stream on its own HTTP/2 connection; everything above this
//! module sees one [`Connection`] either way. Callers from any task send request envelopes — on a framed
//! connection writing them to the socket themselves when no other write is under way, on a gRPC stream through
//! its outbound queue — and wait on a oneshot keyed by correlation id; one reader task resolves them as
//! responses arrive. When the stream ends (or the peer is declared dead and the connection closed), every
//! waiting call fails at once with the connection's "lost" error: delivery is at most once, so a call in flight
//! on a lost connection has an unknown outcome and is never re-sent.
//!
//! Replies are read through a cap on frame size (on a gRPC stream, [`ReplyFrames`]; on a framed connection, the
//! frame reader itself), checked on each frame's 5-byte header before any of the frame is buffered: a peer
//! cannot make a caller buffer more than its payload limit (plus [`ENVELOPE_OVERHEAD`]) by announcing a huge
//! frame. An oversized reply fails its own call with
//! [`CallError::PayloadTooLarge`] and is skipped unread; the stream goes on.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use grains::__private::runtime::BoxFuture;
use grains::CallError;
use http::uri::PathAndQuery;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::filter::BearerToken;
use crate::framed::{FrameReader, FrameWriter};
use crate::maps::FastDashMap;
use crate::peer_auth::PeerIdentity;
use crate::tls::{ClientTls, error_chain};
use crate::wire::{
    CONNECT_PATH, ENVELOPE_OVERHEAD, Envelope, EnvelopeCodec, HARD_FRAME_LIMIT, Inbound, Kind, frame_limit,
};

/// The largest reply payload read where no payload limit is configured (between silos): replies up to
/// [`HARD_FRAME_LIMIT`] bytes a frame.
pub(crate) const UNCONFIGURED_REPLY_PAYLOAD: usize = HARD_FRAME_LIMIT - ENVELOPE_OVERHEAD;

/// Who is at the other end, which decides the error a lost call gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerKind {
    /// A gateway, seen from an external client.
    Gateway,
    /// Another silo.
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

/// How one stream runs: its keep-alive pings, and the largest reply payload it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamSettings {
    pub(crate) keep_alive: KeepAlive,
    /// Replies in frames larger than this plus [`ENVELOPE_OVERHEAD`] fail their call with
    /// [`CallError::PayloadTooLarge`], unbuffered.
    pub(crate) max_reply_payload: usize,
    /// A gRPC stream even to a plaintext peer.
    pub(crate) grpc: bool,
}

/// Everything that opening one connection takes: whom to reach, as what, and how the stream runs.
#[derive(Clone, Copy)]
struct Dial<'a> {
    peer: &'a str,
    kind: PeerKind,
    connect_timeout: Duration,
    /// The cluster membership proof to show (a silo's connections to its peers).
    identity: Option<&'a PeerIdentity>,
    tls: Option<&'a ClientTls>,
    /// A client's token, sent once when the connection is set up.
    bearer_token: Option<&'a BearerToken>,
    settings: StreamSettings,
}

/// A call waiting for its reply: the reply's channel, and (on a framed connection) the call's place among the
/// calls in flight, given up with the entry.
type Waiter = (oneshot::Sender<Result<Reply, CallError>>, Option<crate::framed::InFlight>);

/// A successful response: its payload, and the gateway a client's next calls to the grain may go to (empty
/// when the silo that answered holds the grain, or does not know; see `Envelope::location`).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) payload: Bytes,
    pub(crate) location: String,
}

/// How requests reach the peer.
enum Outbound {
    /// Queued for the HTTP/2 connection's task (a gRPC stream: over TLS, or `GRAINS_TRANSPORT=grpc`).
    Grpc(mpsc::UnboundedSender<Envelope>),
    /// Written to the socket by the caller itself when no other write is under way (see `framed`).
    Framed(Arc<FrameWriter>),
}

/// One open stream and the calls waiting on it.
pub(crate) struct Connection {
    peer: String,
    kind: PeerKind,
    outbound: Outbound,
    pending: FastDashMap<u64, Waiter>,
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
        let settings = StreamSettings { keep_alive, max_reply_payload: UNCONFIGURED_REPLY_PAYLOAD, grpc: false };
        Self::open_with(Dial { peer, kind, connect_timeout, identity, tls, bearer_token: None, settings }).await
    }

    /// Opens a connection over the framed TCP transport when the connection is plaintext (no `tls`, no
    /// `https://` address) and `GRAINS_TRANSPORT` does not ask for gRPC; else a gRPC stream.
    async fn open_with(dial: Dial<'_>) -> Result<Arc<Self>, CallError> {
        match framed_address(dial.peer, dial.tls, dial.settings.grpc) {
            Some((host, port)) => Self::open_framed(dial, host, port).await,
            None => Self::open_grpc(dial).await,
        }
    }

    /// A new open connection to `peer`, with no call waiting yet.
    fn new(peer: &str, kind: PeerKind, outbound: Outbound) -> Arc<Self> {
        Arc::new(Connection {
            peer: peer.to_owned(),
            kind,
            outbound,
            pending: FastDashMap::default(),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            reader: std::sync::OnceLock::new(),
        })
    }

    /// Opens a framed TCP connection (see `framed`) to `host:port`, sending its credentials in the hello frame
    /// and waiting for the peer's hello: a refusal is [`CallError::PermissionDenied`].
    async fn open_framed(dial: Dial<'_>, host: &str, port: u16) -> Result<Arc<Self>, CallError> {
        let Dial { peer, kind, connect_timeout, identity, bearer_token, settings, .. } = dial;
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let Some(identity) = identity {
            identity.stamp(&mut metadata);
        }
        if let Some(token) = bearer_token {
            crate::peer_auth::stamp_bearer_token(token, &mut metadata);
        }
        let hello = Envelope {
            kind: Kind::Hello as i32,
            metadata: crate::framed::metadata_to_pairs(&metadata),
            ..Default::default()
        };
        let max_frame = frame_limit(settings.max_reply_payload);
        let handshake = async {
            let io = connect(host, port).await.map_err(|e| lost(kind, peer, &e.to_string()))?;
            let (read, mut write) = tokio::io::split(io);
            crate::framed::write_hello(&mut write, true, &hello).await.map_err(|e| lost(kind, peer, &e.to_string()))?;
            let mut reader = FrameReader::new(read, max_frame);
            let answer = crate::framed::read_hello(&mut reader).await.map_err(|e| lost(kind, peer, &e))?;
            if let Some(error) = answer.error {
                return Err(match error.to_call_error() {
                    CallError::PermissionDenied(why) => {
                        CallError::PermissionDenied(format!("{peer} refused this connection: {why}"))
                    }
                    other => other,
                });
            }
            Ok((reader, write))
        };
        let (reader, write) = tokio::time::timeout(connect_timeout, handshake)
            .await
            .map_err(|_| lost(kind, peer, &format!("no answer to the handshake within {connect_timeout:?}")))??;
        let conn = Self::new(peer, kind, Outbound::Framed(Arc::new(FrameWriter::new(Box::new(write), None))));
        let reading = tokio::spawn(read_framed(conn.clone(), reader, settings));
        let _ = conn.reader.set(reading.abort_handle());
        Ok(conn)
    }

    /// [`Connection::open`] over a gRPC stream, speaking TLS with `tls` when given, sending a client's
    /// `bearer_token`, and reading replies within `settings.max_reply_payload`. A server that fails the TLS
    /// handshake (it does not speak TLS, or its certificate is not trusted) is unreachable: the call fails, it
    /// never hangs.
    async fn open_grpc(dial: Dial<'_>) -> Result<Arc<Self>, CallError> {
        let Dial { peer, kind, connect_timeout, identity, tls, bearer_token, settings } = dial;
        let keep_alive = settings.keep_alive;
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
        // The cap on reply frames sits below tonic, which reserves a frame's announced size before reading it;
        // tonic's own limit is the same, as a second guard.
        let max_reply_payload = settings.max_reply_payload;
        let limit = frame_limit(max_reply_payload);
        let mut grpc = tonic::client::Grpc::new(CappedChannel { channel, max_reply_payload })
            .max_decoding_message_size(limit)
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
            .streaming(request, PathAndQuery::from_static(CONNECT_PATH), EnvelopeCodec::new(limit))
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    CallError::PermissionDenied(format!("{peer} refused this connection: {}", status.message()))
                }
                _ => lost(kind, peer, &status.to_string()),
            })?;
        let conn = Self::new(peer, kind, Outbound::Grpc(outbound));
        let reader = tokio::spawn(read_responses(conn.clone(), response.into_inner(), max_reply_payload));
        let _ = conn.reader.set(reader.abort_handle());
        Ok(conn)
    }

    /// Whether the stream is still open.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Sends `envelope` as a request and waits for its response's payload until `deadline`.
    pub(crate) async fn call(&self, mut envelope: Envelope, deadline: Instant) -> Result<Bytes, CallError> {
        self.call_located(&mut envelope, deadline).await.map(|reply| reply.payload)
    }

    /// Sends `envelope` as a request and waits for its response until `deadline`. The envelope is borrowed (its
    /// correlation id, kind and deadline set here): a framed connection encodes it where it is, and a caller
    /// that may send it again elsewhere keeps it without a copy.
    pub(crate) async fn call_located(&self, envelope: &mut Envelope, deadline: Instant) -> Result<Reply, CallError> {
        let correlation_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        envelope.correlation_id = correlation_id;
        envelope.kind = Kind::Request as i32;
        envelope.set_deadline(deadline);
        let timeout_ms = envelope.timeout_ms;
        let (waiter_tx, waiter) = oneshot::channel();
        let in_flight = match &self.outbound {
            Outbound::Framed(writer) => Some(writer.in_flight()),
            Outbound::Grpc(_) => None,
        };
        self.pending.insert(correlation_id, (waiter_tx, in_flight));
        // Checked after inserting: a reader that has already failed every pending call will not see ours.
        if !self.is_alive() {
            self.pending.remove(&correlation_id);
            return Err(self.lost("connection closed"));
        }
        let sent = match &self.outbound {
            Outbound::Grpc(queue) => queue.send(envelope.clone()).is_ok(),
            Outbound::Framed(writer) => writer.send(envelope).is_ok(),
        };
        if !sent {
            self.pending.remove(&correlation_id);
            // A framed connection whose socket failed a write is done with, even while its reader has not seen
            // the failure yet: the pool opens a new one for the next call.
            self.close();
            return Err(self.lost("connection closed"));
        }
        if let Outbound::Framed(writer) = &self.outbound {
            // Awaited apart from the reply (not in one future with it): the call's future, which every route
            // holds, stays the size of the larger of the two. A flush cut short by the deadline is finished by a
            // task of its own.
            if tokio::time::timeout_at(deadline, writer.flush()).await.is_err() {
                self.pending.remove(&correlation_id);
                return Err(CallError::Timeout(Duration::from_millis(timeout_ms)));
            }
        }
        if self.write_failed() {
            // This call's frame, and those queued with it, may or may not have gone out.
            self.close();
            return Err(self.lost("connection lost during the call"));
        }
        match tokio::time::timeout_at(deadline, waiter).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.lost("connection lost during the call")),
            Err(_) => {
                self.pending.remove(&correlation_id);
                Err(CallError::Timeout(Duration::from_millis(timeout_ms)))
            }
        }
    }

    /// Whether this is a framed connection whose socket failed a write.
    fn write_failed(&self) -> bool {
        matches!(&self.outbound, Outbound::Framed(writer) if writer.is_closed())
    }

    /// Fails the call waiting under `correlation_id`, if one is.
    fn fail(&self, correlation_id: u64, error: CallError) {
        if let Some((_, (waiter, _))) = self.pending.remove(&correlation_id) {
            tracing::debug!(peer = %self.peer, correlation_id, %error, "reply refused");
            let _ = waiter.send(Err(error));
        }
    }

    /// Closes the connection: every call waiting on it fails now.
    pub(crate) fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
        if let Outbound::Framed(writer) = &self.outbound {
            writer.close();
        }
        self.pending.clear();
    }

    /// Hands a frame read off the stream to the call waiting for it.
    fn deliver(&self, frame: Inbound, max_reply_payload: usize) {
        let envelope = match frame {
            Inbound::Envelope(envelope) => envelope,
            Inbound::TooLarge { correlation_id, size } => {
                let limit = max_reply_payload as u64;
                self.fail(correlation_id, CallError::PayloadTooLarge { size: size as u64, limit });
                return;
            }
            Inbound::Malformed { correlation_id, reason } => {
                tracing::warn!(peer = %self.peer, correlation_id, %reason, "undecodable reply from peer");
                self.fail(
                    correlation_id,
                    CallError::Protocol(format!("undecodable reply from {}: {reason}", self.peer)),
                );
                return;
            }
        };
        if envelope.kind != Kind::Response as i32 {
            return;
        }
        if let Some((_, (waiter, _))) = self.pending.remove(&envelope.correlation_id) {
            let result = match envelope.error {
                Some(error) => Err(error.to_call_error()),
                None => Ok(Reply { payload: envelope.payload, location: envelope.location }),
            };
            let _ = waiter.send(result);
        }
    }

    /// Marks the connection dead and fails every waiting call.
    fn ended(&self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Outbound::Framed(writer) = &self.outbound {
            writer.close();
        }
        // Dropping the senders fails every waiting call.
        self.pending.clear();
    }
}

/// Where a framed connection goes: `host:port` of a plaintext address, unless gRPC is asked for.
fn framed_address<'a>(peer: &'a str, tls: Option<&ClientTls>, grpc: bool) -> Option<(&'a str, u16)> {
    if tls.is_some() || grpc || grpc_forced() {
        return None;
    }
    let address = match peer.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return None,
        None => peer,
    };
    let address = address.trim_end_matches('/');
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

/// Whether `GRAINS_TRANSPORT=grpc` asks this process to open gRPC streams even where the framed transport
/// would do (to compare the two, or to reach a port through an HTTP/2 proxy). Read once.
fn grpc_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("GRAINS_TRANSPORT").is_ok_and(|v| v.eq_ignore_ascii_case("grpc")))
}

/// Opens a byte stream to `host:port`: through the simulator's network if one is installed, else TCP with
/// Nagle's algorithm off.
async fn connect(host: &str, port: u16) -> std::io::Result<Box<dyn crate::sim::Io>> {
    if let Some(network) = crate::sim::network() {
        return network.connect(host.to_owned(), port).await;
    }
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(Box::new(stream))
}

/// Resolves pending calls as replies arrive on a framed connection, pinging the peer when nothing has come for
/// the keep-alive interval; fails them all when the stream ends or a ping goes unanswered.
async fn read_framed(
    conn: Arc<Connection>,
    mut reader: FrameReader<tokio::io::ReadHalf<Box<dyn crate::sim::Io>>>,
    settings: StreamSettings,
) {
    let KeepAlive { interval, timeout } = settings.keep_alive;
    let mut pinged = false;
    loop {
        let wait = if pinged { timeout } else { interval };
        match tokio::time::timeout(wait, reader.next()).await {
            Ok(Ok(Some(frame))) => {
                pinged = false;
                if matches!(&frame, Inbound::Envelope(e) if e.kind == Kind::Pong as i32) {
                    continue;
                }
                conn.deliver(frame, settings.max_reply_payload);
            }
            Ok(Ok(None)) => break,
            Ok(Err(error)) => {
                tracing::debug!(peer = %conn.peer, %error, "connection failed");
                break;
            }
            Err(_) if pinged => {
                tracing::debug!(peer = %conn.peer, ?timeout, "no answer to a ping; closing the connection");
                break;
            }
            Err(_) => {
                pinged = true;
                if let Outbound::Framed(writer) = &conn.outbound {
                    let ping = Envelope { kind: Kind::Ping as i32, ..Default::default() };
                    if writer.write(&ping).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    conn.ended();
}

fn lost(kind: PeerKind, peer: &str, what: &str) -> CallError {
    match kind {
        PeerKind::Gateway => CallError::Unavailable(format!("gateway {peer}: {what}")),
        PeerKind::Silo => CallError::Unavailable(format!("silo {peer}: {what}")),
    }
}

/// Resolves pending calls as their responses arrive; fails them all when the stream ends.
async fn read_responses(conn: Arc<Connection>, mut inbound: Streaming<Inbound>, max_reply_payload: usize) {
    loop {
        match inbound.message().await {
            Ok(Some(frame)) => conn.deliver(frame, max_reply_payload),
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(peer = %conn.peer, %status, "stream failed");
                break;
            }
        }
    }
    conn.ended();
}

/// Open connections by endpoint, each opened once even when many callers want it at the same moment. A slow
/// or frozen endpoint holds up only the callers of that endpoint.
pub(crate) struct ConnectionPool {
    kind: PeerKind,
    connect_timeout: Duration,
    identity: Option<PeerIdentity>,
    tls: Option<ClientTls>,
    bearer_token: Option<BearerToken>,
    /// Open gRPC streams even to plaintext peers.
    grpc: bool,
    keep_alive: KeepAlive,
    max_reply_payload: usize,
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
            grpc: false,
            identity,
            keep_alive: KeepAlive::BETWEEN_SILOS,
            max_reply_payload: UNCONFIGURED_REPLY_PAYLOAD,
            open: FastDashMap::default(),
            opening: FastDashMap::default(),
        }
    }

    /// The same pool, opening gRPC streams even where the framed transport would do (`grpc`).
    pub(crate) fn with_grpc(self, grpc: bool) -> Self {
        Self { grpc, ..self }
    }

    /// The same pool, opening its connections with `keep_alive`.
    pub(crate) fn with_keep_alive(self, keep_alive: KeepAlive) -> Self {
        Self { keep_alive, ..self }
    }

    /// The same pool, its connections reading replies of up to `max_reply_payload` bytes (a client's
    /// [`crate::ClientConfig::max_payload_bytes`]); a larger one fails its call with
    /// [`CallError::PayloadTooLarge`] before it is buffered.
    pub(crate) fn with_max_reply_payload(self, max_reply_payload: usize) -> Self {
        Self { max_reply_payload, ..self }
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
        // Opening is rare and its future large (TLS, HTTP/2, the handshake): boxed, so that every future
        // awaiting `get` — each call, each directory request — stays small.
        Box::pin(self.open(endpoint)).await
    }

    /// Opens the connection to `endpoint`, one opening at a time per endpoint.
    async fn open(&self, endpoint: &str) -> Result<Arc<Connection>, CallError> {
        let gate = self.opening.entry(endpoint.to_owned()).or_default().clone();
        let _single_flight = gate.lock().await;
        if let Some(conn) = self.open.get(endpoint).filter(|c| c.is_alive()) {
            return Ok(conn.clone());
        }
        let conn = Connection::open_with(Dial {
            peer: endpoint,
            kind: self.kind,
            connect_timeout: self.connect_timeout,
            identity: self.identity.as_ref(),
            tls: self.tls.as_ref(),
            bearer_token: self.bearer_token.as_ref(),
            settings: StreamSettings {
                keep_alive: self.keep_alive,
                max_reply_payload: self.max_reply_payload,
                grpc: self.grpc,
            },
        })
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

/// The channel a connection's stream runs on, its replies read through [`ReplyFrames`].
#[derive(Clone)]
struct CappedChannel {
    channel: Channel,
    max_reply_payload: usize,
}

impl tower_service::Service<http::Request<tonic::body::Body>> for CappedChannel {
    type Response = http::Response<ReplyFrames>;
    type Error = tonic::transport::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let response = self.channel.call(request);
        let max_reply_payload = self.max_reply_payload;
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| ReplyFrames::new(body, max_reply_payload)))
        })
    }
}

/// A reply body read through [`FrameCap`]: frames within the cap pass unchanged (without copying their
/// payload), an oversized one is replaced by a small response failing its call.
pub(crate) struct ReplyFrames {
    inner: tonic::body::Body,
    cap: FrameCap,
    ready: VecDeque<Bytes>,
    /// The stream cannot go on (an oversized frame whose call cannot be told): reported after `ready`.
    failed: Option<tonic::Status>,
    done: bool,
}

impl ReplyFrames {
    fn new(inner: tonic::body::Body, max_reply_payload: usize) -> Self {
        ReplyFrames { inner, cap: FrameCap::new(max_reply_payload), ready: VecDeque::new(), failed: None, done: false }
    }
}

impl http_body::Body for ReplyFrames {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(bytes))));
            }
            if let Some(status) = this.failed.take() {
                this.done = true;
                return Poll::Ready(Some(Err(status)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => {
                    this.done = other.is_none();
                    return Poll::Ready(other);
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    if let Err(status) = this.cap.feed(data, &mut this.ready) {
                        this.failed = Some(status);
                    }
                }
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.ready.is_empty() && self.failed.is_none()
    }
}

/// The most bytes of an oversized frame read to find its correlation id: field 1's key and a 10-byte varint.
const CORRELATION_PEEK: usize = 11;

/// Splits a stream of gRPC-framed bytes (a 1-byte flag and a 4-byte big-endian length, then the message) into
/// frames, passing those within `frame_limit(max_payload)` and replacing each larger one, at its header and
/// before any of it is buffered, with a response failing its call with [`CallError::PayloadTooLarge`]. The
/// call is told by the oversized frame's first bytes (its correlation id, field 1); the rest of the frame is
/// discarded as it arrives, so the stream goes on after it. An oversized frame that does not start with a
/// correlation id ends the stream (every call on it fails as lost).
#[derive(Debug)]
struct FrameCap {
    max_payload: usize,
    frame_limit: usize,
    state: CapState,
}

#[derive(Debug)]
enum CapState {
    /// Reading a frame's header.
    Header { bytes: [u8; 5], filled: usize },
    /// Passing on a frame within the cap: `left` bytes of it to come.
    Pass { left: usize },
    /// Reading the first bytes of an oversized frame of `size` bytes for its correlation id.
    Peek { size: usize, left: usize, peeked: Vec<u8> },
    /// Discarding the rest of an oversized frame.
    Skip { left: usize },
}

/// What the first bytes of a frame say about its correlation id.
#[derive(Debug, PartialEq, Eq)]
enum Peeked {
    Id(u64),
    NeedMore,
    Absent,
}

fn peek_correlation_id(bytes: &[u8]) -> Peeked {
    // Field 1, varint: key byte 0x08.
    match bytes.first() {
        None => return Peeked::NeedMore,
        Some(0x08) => {}
        Some(_) => return Peeked::Absent,
    }
    let mut id = 0u64;
    for (i, byte) in bytes[1..].iter().enumerate().take(CORRELATION_PEEK - 1) {
        id |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Peeked::Id(id);
        }
    }
    if bytes.len() >= CORRELATION_PEEK { Peeked::Absent } else { Peeked::NeedMore }
}

impl FrameCap {
    fn new(max_payload: usize) -> Self {
        FrameCap { max_payload, frame_limit: frame_limit(max_payload), state: FrameCap::header() }
    }

    fn header() -> CapState {
        CapState::Header { bytes: [0; 5], filled: 0 }
    }

    /// Takes the next bytes of the stream and appends what passes to `out`.
    fn feed(&mut self, mut chunk: Bytes, out: &mut VecDeque<Bytes>) -> Result<(), tonic::Status> {
        while !chunk.is_empty() {
            match &mut self.state {
                CapState::Header { bytes, filled } => {
                    if *filled == 0 && chunk.len() >= bytes.len() {
                        // The usual case, a whole header in the chunk: passed on with its frame, uncopied.
                        let size = u32::from_be_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
                        if size <= self.frame_limit {
                            self.state = CapState::Pass { left: bytes.len() + size };
                            continue;
                        }
                    }
                    let n = (bytes.len() - *filled).min(chunk.len());
                    bytes[*filled..*filled + n].copy_from_slice(&chunk[..n]);
                    chunk.advance(n);
                    *filled += n;
                    if *filled < bytes.len() {
                        continue;
                    }
                    let size = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
                    if size <= self.frame_limit {
                        out.push_back(Bytes::copy_from_slice(bytes));
                        self.state = if size == 0 { FrameCap::header() } else { CapState::Pass { left: size } };
                    } else {
                        let peeked = Vec::with_capacity(CORRELATION_PEEK);
                        self.state = CapState::Peek { size, left: size, peeked };
                    }
                }
                CapState::Pass { left } => {
                    let n = (*left).min(chunk.len());
                    out.push_back(chunk.split_to(n));
                    *left -= n;
                    if *left == 0 {
                        self.state = FrameCap::header();
                    }
                }
                CapState::Peek { size, left, peeked } => {
                    let n = (CORRELATION_PEEK - peeked.len()).min(*left).min(chunk.len());
                    peeked.extend_from_slice(&chunk[..n]);
                    chunk.advance(n);
                    *left -= n;
                    match peek_correlation_id(peeked) {
                        Peeked::Id(correlation_id) => {
                            let error =
                                CallError::PayloadTooLarge { size: *size as u64, limit: self.max_payload as u64 };
                            tracing::warn!(
                                size,
                                limit = self.frame_limit,
                                correlation_id,
                                "reply frame over the limit; skipped"
                            );
                            out.push_back(substitute_frame(correlation_id, error));
                            let left = *left;
                            self.state = if left == 0 { FrameCap::header() } else { CapState::Skip { left } };
                        }
                        Peeked::NeedMore if *left > 0 => {}
                        Peeked::NeedMore | Peeked::Absent => {
                            return Err(tonic::Status::out_of_range(format!(
                                "a reply frame of {size} bytes is over the limit of {} bytes and names no call",
                                self.frame_limit
                            )));
                        }
                    }
                }
                CapState::Skip { left } => {
                    let n = (*left).min(chunk.len());
                    chunk.advance(n);
                    *left -= n;
                    if *left == 0 {
                        self.state = FrameCap::header();
                    }
                }
            }
        }
        Ok(())
    }
}

/// A gRPC frame holding a response that fails call `correlation_id` with `error`.
fn substitute_frame(correlation_id: u64, error: CallError) -> Bytes {
    let message = Envelope::response(correlation_id, Err(error)).encode_to_vec();
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut frame = vec![0];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(message);
        frame
    }

    fn reply(correlation_id: u64, payload_len: usize) -> Vec<u8> {
        Envelope::response(correlation_id, Ok(vec![7u8; payload_len].into())).encode_to_vec()
    }

    /// Feeds `stream` to a cap in chunks of `chunk` bytes and decodes what comes out.
    fn through_cap(max_payload: usize, stream: &[u8], chunk: usize) -> (Result<(), tonic::Status>, Vec<Envelope>) {
        let mut cap = FrameCap::new(max_payload);
        let mut out = VecDeque::new();
        let mut result = Ok(());
        for piece in stream.chunks(chunk) {
            result = cap.feed(Bytes::copy_from_slice(piece), &mut out);
            if result.is_err() {
                break;
            }
        }
        let passed: Vec<u8> = out.into_iter().flatten().collect();
        let mut envelopes = Vec::new();
        let mut rest = passed.as_slice();
        while !rest.is_empty() {
            let size = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            envelopes.push(Envelope::decode(&rest[5..5 + size]).unwrap());
            rest = &rest[5 + size..];
        }
        (result, envelopes)
    }

    #[test]
    fn an_oversized_reply_fails_its_own_call_and_the_frames_around_it_pass() {
        let max = 1024;
        let big = frame_limit(max) + 1;
        let mut stream = framed(&reply(1, 10));
        let oversized = reply(2, big);
        assert!(oversized.len() > frame_limit(max));
        stream.extend(framed(&oversized));
        stream.extend(framed(&reply(3, max)));
        stream.extend(framed(&[])); // an empty frame (a default envelope) passes too
        for chunk in [1, 2, 3, 7, 64, 4096, stream.len()] {
            let (result, envelopes) = through_cap(max, &stream, chunk);
            assert!(result.is_ok(), "chunks of {chunk}: {result:?}");
            let ids: Vec<u64> = envelopes.iter().map(|e| e.correlation_id).collect();
            assert_eq!(ids, [1, 2, 3, 0], "chunks of {chunk}");
            assert_eq!(envelopes[0].payload.len(), 10);
            let error = envelopes[1].error.as_ref().expect("the oversized reply becomes an error").to_call_error();
            let expected = CallError::PayloadTooLarge { size: oversized.len() as u64, limit: max as u64 };
            assert_eq!(error, expected, "chunks of {chunk}");
            assert_eq!(envelopes[2].payload.len(), max);
        }
    }

    #[test]
    fn an_oversized_frame_that_names_no_call_ends_the_stream() {
        let max = 1024;
        let mut stream = framed(&reply(1, 10));
        stream.extend(framed(&vec![0x5a; frame_limit(max) + 100]));
        for chunk in [1, 5, 4096] {
            let (result, envelopes) = through_cap(max, &stream, chunk);
            assert!(result.is_err(), "chunks of {chunk}");
            assert_eq!(envelopes.len(), 1, "the frame before it passed");
        }
        // A header alone, announcing 4 GiB: refused at once with nothing buffered.
        let mut cap = FrameCap::new(max);
        let mut out = VecDeque::new();
        cap.feed(Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff, 0x08, 0x80]), &mut out).unwrap();
        assert!(out.is_empty(), "waiting for the rest of the correlation id");
        cap.feed(Bytes::from_static(&[0x01]), &mut out).unwrap();
        assert_eq!(out.len(), 1, "the substitute for call 128");
        assert!(matches!(&cap.state, CapState::Skip { left } if *left == u32::MAX as usize - 3));
    }

    #[test]
    fn correlation_ids_are_read_from_partial_frames() {
        assert_eq!(peek_correlation_id(&[]), Peeked::NeedMore);
        assert_eq!(peek_correlation_id(&[0x08]), Peeked::NeedMore);
        assert_eq!(peek_correlation_id(&[0x08, 0x2a]), Peeked::Id(42));
        assert_eq!(peek_correlation_id(&[0x08, 0x80, 0x01]), Peeked::Id(128));
        assert_eq!(peek_correlation_id(&[0x10, 0x01]), Peeked::Absent);
        assert_eq!(peek_correlation_id(&[0x08, 0xff, 0xff]), Peeked::NeedMore);
        assert_eq!(
            peek_correlation_id(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Peeked::Absent
        );
        let id = u64::MAX;
        let encoded = Envelope { correlation_id: id, ..Default::default() }.encode_to_vec();
        assert_eq!(peek_correlation_id(&encoded), Peeked::Id(id));
    }
}
