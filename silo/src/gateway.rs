//! The silo's port: framed TCP connections (see `framed`) from silos and Rust clients, and a tonic server whose
//! one gRPC method is a bidirectional stream of envelopes (clients in other languages; every connection of a
//! TLS port), told apart by a connection's first bytes.
//!
//! Each connection gets one reader loop (`serve_connection`, the same for both transports). Every request is
//! handed to the silo's call path as it arrives and answered when it completes, so one slow grain never holds up
//! the other calls on the same connection. Responses are batched: on a gRPC stream tonic writes queued
//! responses in as few HTTP/2 writes as it can; on a framed connection whoever writes takes everything queued.
//!
//! # Who may call what
//!
//! The port serves two kinds of caller, told apart when a stream is set up (see `peer_auth`):
//!
//! - **Silos of the cluster** prove membership in the stream's request metadata (on a framed connection, in its
//!   hello frame): their endpoint, a timestamp,
//!   a nonce and an HMAC-SHA256 over them keyed with the cluster secret (`cluster_secret`,
//!   `GRAINS_CLUSTER_SECRET`, `--cluster-secret[-file]`), accepted once, within two minutes of this silo's
//!   clock. A stream whose proof is wrong, stale or replayed is refused before it carries a frame
//!   (`Unauthenticated`; the opening silo sees [`CallError::PermissionDenied`]). A peer's stream carries any
//!   call, including the reserved `$system` calls that read and write membership and the directory.
//! - **Everyone else** is a client: grain calls (routed; never delivered straight to an activation) and the
//!   gateway list (`Gateways`, which [`crate::Client`] needs). Every other system call is answered
//!   [`CallError::PermissionDenied`] and changes nothing.
//!
//! Without a secret a silo runs in *insecure mode*: a stream that declares itself a peer is taken as one. That
//! suits the embedded default and loopback development clusters; on any other address the silo refuses to
//! start unless `insecure` (`--insecure`, `GRAINS_INSECURE`) is set.
//!
//! With a certificate (`tls_cert`, `tls_key`) the port speaks TLS only; the handshake runs under the accept
//! loop's limits, and a client that does not speak TLS is closed at it (see the `tls` module).
//!
//! The same port answers `GET /metrics` (HTTP/1.1 or HTTP/2) with the silo's counters in the Prometheus text
//! format, for scraping, and serves the HTTP/JSON API and the dashboard (see the `http` module).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use grains::__private::runtime::BoxFuture;
use grains::CallError;
use tokio::io::{AsyncReadExt, ReadHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::transport::ServerTlsConfig;
use tonic::transport::server::TlsConnectInfo;

use crate::admission::{self, AdmissionLimits, AdmittedStream, ConnectionInfo};
use crate::cluster::system::SystemRequest;
use crate::filter::{CallerIdentity, ClientIdentity};
use crate::framed::{self, FrameReader, FrameWriter, MAGIC};
use crate::peer_auth::{self, Caller, ClusterCredentials, PeerVerifier};
use crate::silo::SiloInner;
use crate::wire::{
    CONNECT_PATH, Envelope, EnvelopeCodec, HARD_FRAME_LIMIT, Inbound, Kind, Mode, SYSTEM_TYPE, frame_limit,
};

/// Where the silo serves its metrics in the Prometheus text format (plain HTTP/1.1 or HTTP/2 `GET`).
pub const METRICS_PATH: &str = "/metrics";

/// How long a draining connection waits for another frame before it stops reading.
const DRAIN_IDLE: Duration = Duration::from_millis(300);

/// A running gateway.
pub(crate) struct GatewayHandle {
    pub(crate) local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Closed once every framed connection has ended (each holds a sender).
    framed_ended: mpsc::Receiver<()>,
}

impl GatewayHandle {
    /// Stops accepting connections and requests; each open stream ends once its calls in flight are answered.
    /// Waits up to `grace`, then drops whatever is left.
    pub(crate) async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        let ended = async {
            let _ = (&mut self.task).await;
            while self.framed_ended.recv().await.is_some() {}
        };
        if tokio::time::timeout(grace, ended).await.is_err() {
            self.task.abort();
        }
    }
}

/// Serves the silo's endpoint on `listener` until stopped, over TLS when `tls` is given.
pub(crate) fn start(
    silo: Arc<SiloInner>,
    listener: Box<dyn crate::sim::Listener>,
    tls: Option<ServerTlsConfig>,
) -> std::io::Result<GatewayHandle> {
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let credentials =
        ClusterCredentials { cluster_id: silo.config.cluster_id.clone(), secret: silo.config.cluster_secret.clone() };
    let verifier = Arc::new(PeerVerifier::new(credentials));
    let service = GatewayService { silo, verifier, stopped: stopped.clone() };
    let limits = AdmissionLimits {
        max_connections: service.silo.config.max_connections,
        handshake_timeout: service.silo.config.handshake_timeout,
        idle_timeout: service.silo.config.connection_idle_timeout,
    };
    let admitted = admission::accept_loop(listener, limits, stopped.clone());
    let (framed_alive, framed_ended) = mpsc::channel(1);
    let framed = FramedServing { service: service.clone(), alive: framed_alive };
    let incoming = ReceiverStream::new(sort_connections(admitted, tls.is_none().then_some(framed)));
    let mut server = tonic::transport::Server::builder().accept_http1(true);
    if let Some(tls) = tls {
        // Handshakes run concurrently, each bounded by the handshake timeout; one that fails (a plaintext
        // client, an untrusted client certificate) closes only its own connection.
        server = server.tls_config(tls).map_err(|e| std::io::Error::other(crate::tls::error_chain(&e)))?;
    }
    let task = tokio::spawn(async move {
        let served = server.serve_with_incoming_shutdown(service, incoming, wait_for_stop(stopped)).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "gateway stopped with an error");
        }
    });
    tracing::info!(%local_addr, "gateway listening");
    Ok(GatewayHandle { local_addr, stop, task, framed_ended })
}

/// What serving a framed connection needs.
#[derive(Clone)]
struct FramedServing {
    service: GatewayService,
    alive: mpsc::Sender<()>,
}

/// Tells each admitted connection's transport by its first bytes: framed connections (see `framed`) are served
/// here; the rest, with the bytes read, go on to the HTTP server. With `framed` absent (a TLS port) every
/// connection goes to the HTTP server untouched.
fn sort_connections(
    mut admitted: mpsc::Receiver<std::io::Result<AdmittedStream>>,
    framed: Option<FramedServing>,
) -> mpsc::Receiver<std::io::Result<AdmittedStream>> {
    let (to_http, incoming) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(connection) = admitted.recv().await {
            let stream = match connection {
                Ok(stream) => stream,
                Err(error) => {
                    let _ = to_http.send(Err(error)).await;
                    continue;
                }
            };
            let Some(framed) = framed.clone() else {
                if to_http.send(Ok(stream)).await.is_err() {
                    return;
                }
                continue;
            };
            let to_http = to_http.clone();
            tokio::spawn(async move {
                match sniff(stream).await {
                    Ok(Sniff::Framed(stream)) => serve_framed(framed, stream).await,
                    Ok(Sniff::Other(sniffed)) => {
                        let _ = to_http.send(Ok(sniffed)).await;
                    }
                    Err(error) => tracing::debug!(%error, "connection closed before it said what it speaks"),
                }
            });
        }
    });
    incoming
}

enum Sniff {
    Framed(AdmittedStream),
    /// For the HTTP server, with the bytes read given back.
    Other(AdmittedStream),
}

/// Reads a connection's first bytes, as far as they agree with [`MAGIC`] (within the handshake timeout).
async fn sniff(mut stream: AdmittedStream) -> std::io::Result<Sniff> {
    let mut read = [0u8; MAGIC.len()];
    let mut filled = 0;
    while filled < MAGIC.len() {
        let n = stream.read(&mut read[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if read[..filled] != MAGIC[..filled] {
            break;
        }
    }
    if filled == MAGIC.len() && read == *MAGIC {
        return Ok(Sniff::Framed(stream));
    }
    stream.unread(Bytes::copy_from_slice(&read[..filled]));
    Ok(Sniff::Other(stream))
}

/// Serves a framed connection: its hello frame (credentials, checked as a gRPC stream's metadata is), then its
/// requests through [`serve_connection`].
async fn serve_framed(framed: FramedServing, stream: AdmittedStream) {
    let FramedServing { service, alive } = framed;
    let info = stream.info().clone();
    let (read, mut write) = tokio::io::split(stream);
    // As on a gRPC stream: frames up to the payload limit (and room for the envelope's own fields) are read;
    // a larger one fails its call, unbuffered.
    let max_frame = service.silo.config.max_payload_bytes.saturating_add(1024);
    let mut reader = FrameReader::new(read, max_frame);
    let hello = match framed::read_hello(&mut reader).await {
        Ok(hello) => hello,
        Err(reason) => {
            tracing::debug!(remote = %info.remote, %reason, "framed connection closed at its hello");
            return;
        }
    };
    let metadata = framed::pairs_to_metadata(&hello.metadata);
    let caller = match service.verifier.verify(&metadata) {
        Ok(caller) => caller,
        Err(refused) => {
            tracing::warn!(remote = %info.remote, %refused, "peer connection refused");
            let error = CallError::PermissionDenied(refused.to_string());
            let answer = Envelope { kind: Kind::Hello as i32, ..Envelope::response(0, Err(error)) };
            let _ = framed::write_hello(&mut write, false, &answer).await;
            return;
        }
    };
    info.established.store(true, std::sync::atomic::Ordering::Relaxed);
    let answer = Envelope { kind: Kind::Hello as i32, ..Default::default() };
    if framed::write_hello(&mut write, false, &answer).await.is_err() {
        return;
    }
    let identity = Arc::new(caller_identity(&caller, None, &metadata));
    let writer = Arc::new(FrameWriter::new(Box::new(write), Some(alive)));
    let GatewayService { silo, stopped, .. } = service;
    serve_connection(silo, caller, identity, Source::Framed(reader), Responder::Framed(writer), stopped).await;
}

/// Who a connection's calls are from, as call filters see it: settled once, at set-up.
fn caller_identity(
    caller: &Caller,
    certificate_subject: Option<String>,
    metadata: &tonic::metadata::MetadataMap,
) -> CallerIdentity {
    match caller {
        Caller::Peer(endpoint) => CallerIdentity::Member(endpoint.clone()),
        Caller::Client => {
            CallerIdentity::Client(ClientIdentity::new(certificate_subject, peer_auth::bearer_token(metadata)))
        }
    }
}

/// Where a connection's frames come from.
enum Source {
    Grpc(Streaming<Inbound>),
    Framed(FrameReader<ReadHalf<AdmittedStream>>),
}

impl Source {
    /// The next frame; `None` at the end of the stream. Cancel-safe.
    async fn next(&mut self) -> Result<Option<Inbound>, String> {
        match self {
            Source::Grpc(stream) => stream.message().await.map_err(|status| status.to_string()),
            Source::Framed(reader) => reader.next().await.map_err(|error| error.to_string()),
        }
    }
}

/// Where a connection's responses go.
#[derive(Clone)]
enum Responder {
    Grpc(mpsc::UnboundedSender<Result<Envelope, Status>>),
    Framed(Arc<FrameWriter>),
}

impl Responder {
    /// Counts a request in flight until the guard is dropped (framed connections batch writes by it).
    fn in_flight(&self) -> Option<framed::InFlight> {
        match self {
            Responder::Grpc(_) => None,
            Responder::Framed(writer) => Some(writer.in_flight()),
        }
    }

    async fn send(&self, envelope: Envelope) {
        match self {
            Responder::Grpc(queue) => {
                let _ = queue.send(Ok(envelope));
            }
            Responder::Framed(writer) => {
                let _ = writer.write(&envelope).await;
            }
        }
    }
}

async fn wait_for_stop(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// What the accept loop knows about the connection a request came on, over TLS or not.
fn connection_info(extensions: &http::Extensions) -> Option<&ConnectionInfo> {
    extensions
        .get::<ConnectionInfo>()
        .or_else(|| extensions.get::<TlsConnectInfo<ConnectionInfo>>().map(TlsConnectInfo::get_ref))
}

/// The subject of the certificate the client presented over TLS, if it presented one (`tls_client_ca`).
fn client_certificate_subject(extensions: &http::Extensions) -> Option<String> {
    let certificates = extensions.get::<TlsConnectInfo<ConnectionInfo>>()?.peer_certs()?;
    crate::filter::certificate_subject(certificates.first()?)
}

/// The HTTP/2 service: routes the one gRPC path to [`serve_connection`].
#[derive(Clone)]
struct GatewayService {
    silo: Arc<SiloInner>,
    verifier: Arc<PeerVerifier>,
    stopped: watch::Receiver<bool>,
}

impl<B> tower_service::Service<http::Request<B>> for GatewayService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(connection) = connection_info(request.extensions()) {
            connection.established.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if self.silo.config.http_api && crate::http::serves(request.uri().path()) {
            let caller = crate::http::HttpCaller {
                remote: connection_info(request.extensions()).map(|c| c.remote),
                certificate_subject: client_certificate_subject(request.extensions()),
            };
            let served = crate::http::serve(self.silo.clone(), caller, request);
            return Box::pin(async move { Ok(served.await) });
        }
        if request.uri().path() == METRICS_PATH {
            let text = crate::stats::prometheus(&self.silo);
            return Box::pin(async move {
                let mut response = http::Response::new(Body::new(text));
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
                Ok(response)
            });
        }
        if request.uri().path() != CONNECT_PATH {
            let path = request.uri().path().to_owned();
            return Box::pin(async move { Ok(Status::unimplemented(format!("no method at {path}")).into_http()) });
        }
        let silo = self.silo.clone();
        let verifier = self.verifier.clone();
        let stopped = self.stopped.clone();
        Box::pin(async move {
            let limit = silo.config.max_payload_bytes;
            // Checked on each frame's 5-byte header, before the frame is buffered.
            let mut grpc = tonic::server::Grpc::new(EnvelopeCodec::new(limit))
                .max_decoding_message_size(frame_limit(limit))
                .max_encoding_message_size(HARD_FRAME_LIMIT);
            Ok(grpc.streaming(ConnectMethod { silo, verifier, stopped }, request).await)
        })
    }
}

/// The streaming method: each accepted stream becomes a connection task, once its caller is established.
struct ConnectMethod {
    silo: Arc<SiloInner>,
    verifier: Arc<PeerVerifier>,
    stopped: watch::Receiver<bool>,
}

type Outbound = UnboundedReceiverStream<Result<Envelope, Status>>;

impl tower_service::Service<tonic::Request<Streaming<Inbound>>> for ConnectMethod {
    type Response = tonic::Response<Outbound>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::Request<Streaming<Inbound>>) -> Self::Future {
        let caller = match self.verifier.verify(request.metadata()) {
            Ok(caller) => caller,
            Err(refused) => {
                let remote = connection_info(request.extensions()).map(|c| c.remote);
                tracing::warn!(?remote, %refused, "peer connection refused");
                return std::future::ready(Err(Status::unauthenticated(refused.to_string())));
            }
        };
        let subject = client_certificate_subject(request.extensions());
        let identity = Arc::new(caller_identity(&caller, subject, request.metadata()));
        let (tx, rx) = mpsc::unbounded_channel();
        let connection = Source::Grpc(request.into_inner());
        let serve = serve_connection(
            self.silo.clone(),
            caller,
            identity,
            connection,
            Responder::Grpc(tx),
            self.stopped.clone(),
        );
        tokio::spawn(serve);
        std::future::ready(Ok(tonic::Response::new(UnboundedReceiverStream::new(rx))))
    }
}

/// Reads requests off one connection and answers each when its call completes. When the gateway stops, the
/// connection drains: it keeps answering (a stopping silo refuses grain calls with `ShuttingDown`, which callers
/// retry elsewhere) until the peer has sent nothing for a moment, then reading ends and the response stream
/// closes once the last call in flight has been answered.
async fn serve_connection(
    silo: Arc<SiloInner>,
    caller: Caller,
    identity: Arc<CallerIdentity>,
    mut inbound: Source,
    outbound: Responder,
    stopped: watch::Receiver<bool>,
) {
    tracing::debug!(?caller, "gateway connection opened");
    let stop = wait_for_stop(stopped);
    tokio::pin!(stop);
    let mut draining = false;
    // The cluster's silos carry each other's whole traffic on one connection: only clients are limited.
    let limit = silo.config.max_calls_per_connection;
    let calls_in_flight = matches!(caller, Caller::Client).then(|| Arc::new(tokio::sync::Semaphore::new(limit)));
    loop {
        let next = if draining {
            match tokio::time::timeout(DRAIN_IDLE, inbound.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                biased; // no random branch order: a simulated run repeats exactly
                next = inbound.next() => next,
                () = &mut stop => {
                    draining = true;
                    continue;
                }
            }
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, "gateway connection ended with an error");
                break;
            }
        };
        match frame {
            Inbound::Envelope(envelope) if envelope.kind == Kind::Request as i32 => {
                if let Err(denied) = authorize(&caller, &envelope) {
                    outbound.send(Envelope::response(envelope.correlation_id, Err(denied))).await;
                    continue;
                }
                let permit = match &calls_in_flight {
                    Some(slots) => match slots.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            let full = format!("this connection has its limit of {limit} calls in flight");
                            let refused = Envelope::response(envelope.correlation_id, Err(CallError::Overloaded(full)));
                            outbound.send(refused).await;
                            continue;
                        }
                    },
                    None => None,
                };
                let silo = silo.clone();
                let outbound = outbound.clone();
                let identity = identity.clone();
                let in_flight = outbound.in_flight();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _in_flight = in_flight;
                    let correlation_id = envelope.correlation_id;
                    let limit = silo.config.max_payload_bytes;
                    let (result, location) = match silo.serve_request(envelope, &identity).await {
                        Ok(served) if served.payload.len() > limit => {
                            let size = served.payload.len() as u64;
                            (Err(CallError::PayloadTooLarge { size, limit: limit as u64 }), None)
                        }
                        Ok(served) => (Ok(served.payload), served.location),
                        Err(error) => (Err(error), None),
                    };
                    let mut response = Envelope::response(correlation_id, result);
                    response.location = location.unwrap_or_default();
                    outbound.send(response).await;
                });
            }
            Inbound::Envelope(envelope) if envelope.kind == Kind::Ping as i32 => {
                outbound.send(Envelope { kind: Kind::Pong as i32, ..Default::default() }).await;
            }
            Inbound::Envelope(envelope) => {
                let error = CallError::Protocol("a client sends requests only".to_owned());
                outbound.send(Envelope::response(envelope.correlation_id, Err(error))).await;
            }
            Inbound::Malformed { correlation_id, reason } => {
                tracing::debug!(correlation_id, %reason, "malformed frame");
                let error = CallError::Protocol(format!("malformed frame: {reason}"));
                outbound.send(Envelope::response(correlation_id, Err(error))).await;
            }
            Inbound::TooLarge { correlation_id, size } => {
                let limit = silo.config.max_payload_bytes as u64;
                let error = CallError::PayloadTooLarge { size: size as u64, limit };
                outbound.send(Envelope::response(correlation_id, Err(error))).await;
            }
        }
    }
    tracing::debug!("gateway connection closed");
}

/// Whether `caller` may make the request in `envelope`. Silos may make any; a client makes grain calls to be
/// routed (never delivered straight to an activation, skipping the directory) and asks for the gateway list,
/// and nothing else: every other system request reads or rewrites the cluster's membership or directory.
fn authorize(caller: &Caller, envelope: &Envelope) -> Result<(), CallError> {
    if let Caller::Peer(_) = caller {
        return Ok(());
    }
    if envelope.target.as_ref().is_some_and(|t| t.grain_type == SYSTEM_TYPE) {
        // Only the gateway list is open to clients; anything else, decodable or not, is refused.
        let name = match grains::codec::decode_named::<SystemRequest>(&envelope.payload) {
            Ok(SystemRequest::Gateways) => return Ok(()),
            Ok(other) => system_call_name(&other),
            Err(_) => "(undecodable)",
        };
        return Err(CallError::PermissionDenied(format!(
            "the system call {name} is served only to the cluster's silos, and this connection did not prove \
             membership (see cluster_secret)"
        )));
    }
    match Mode::try_from(envelope.mode) {
        Ok(Mode::Route) => Ok(()),
        _ => Err(CallError::PermissionDenied(
            "only the cluster's silos deliver calls straight to an activation; a client's calls are routed".to_owned(),
        )),
    }
}

fn system_call_name(request: &SystemRequest) -> &'static str {
    match request {
        SystemRequest::Ping => "Ping",
        SystemRequest::Gateways => "Gateways",
        SystemRequest::LookupOrPlace { .. } => "LookupOrPlace",
        SystemRequest::Register { .. } => "Register",
        SystemRequest::Unregister { .. } => "Unregister",
        SystemRequest::MembershipChanged => "MembershipChanged",
        SystemRequest::Activations => "Activations",
        SystemRequest::Table(_) => "Table",
        SystemRequest::Recover { .. } => "Recover",
        SystemRequest::Evict { .. } => "Evict",
        SystemRequest::Draining { .. } => "Draining",
        SystemRequest::Stats => "Stats",
        SystemRequest::ReminderChanged { .. } => "ReminderChanged",
    }
}
