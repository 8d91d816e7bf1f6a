//! The client gateway: a tonic server whose one method is a bidirectional stream of envelopes.
//!
//! Each connection gets one reader loop and one outbound queue. Every request is handed to the silo's call
//! path as it arrives and answered when it completes, so one slow grain never holds up the other calls on the
//! same connection. Tonic batches queued responses into as few HTTP/2 writes as it can.
//!
//! # Who may call what
//!
//! The port serves two kinds of caller, told apart when a stream is set up (see `peer_auth`):
//!
//! - **Silos of the cluster** prove membership in the stream's request metadata: their endpoint, a timestamp,
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

use grains::__private::runtime::BoxFuture;
use grains::CallError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::transport::ServerTlsConfig;
use tonic::transport::server::TlsConnectInfo;

use crate::admission::{self, AdmissionLimits, ConnectionInfo};
use crate::cluster::system::SystemRequest;
use crate::filter::{CallerIdentity, ClientIdentity};
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
}

impl GatewayHandle {
    /// Stops accepting connections and requests; each open stream ends once its calls in flight are answered.
    /// Waits up to `grace`, then drops whatever is left.
    pub(crate) async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
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
    let incoming = ReceiverStream::new(admission::accept_loop(listener, limits, stopped.clone()));
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
    Ok(GatewayHandle { local_addr, stop, task })
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
        // Who the stream's calls are from, as call filters see it: settled once, at set-up.
        let identity = Arc::new(match &caller {
            Caller::Peer(endpoint) => CallerIdentity::Member(endpoint.clone()),
            Caller::Client => CallerIdentity::Client(ClientIdentity::new(
                client_certificate_subject(request.extensions()),
                peer_auth::bearer_token(request.metadata()),
            )),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let connection = request.into_inner();
        let serve = serve_connection(self.silo.clone(), caller, identity, connection, tx, self.stopped.clone());
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
    mut inbound: Streaming<Inbound>,
    outbound: mpsc::UnboundedSender<Result<Envelope, Status>>,
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
            match tokio::time::timeout(DRAIN_IDLE, inbound.message()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                biased; // no random branch order: a simulated run repeats exactly
                next = inbound.message() => next,
                () = &mut stop => {
                    draining = true;
                    continue;
                }
            }
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%status, "gateway connection ended with an error");
                break;
            }
        };
        match frame {
            Inbound::Envelope(envelope) if envelope.kind == Kind::Request as i32 => {
                if let Err(denied) = authorize(&caller, &envelope) {
                    let _ = outbound.send(Ok(Envelope::response(envelope.correlation_id, Err(denied))));
                    continue;
                }
                let permit = match &calls_in_flight {
                    Some(slots) => match slots.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            let full = format!("this connection has its limit of {limit} calls in flight");
                            let refused = Envelope::response(envelope.correlation_id, Err(CallError::Overloaded(full)));
                            let _ = outbound.send(Ok(refused));
                            continue;
                        }
                    },
                    None => None,
                };
                let silo = silo.clone();
                let outbound = outbound.clone();
                let identity = identity.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let correlation_id = envelope.correlation_id;
                    let limit = silo.config.max_payload_bytes;
                    let result = silo.serve_request(envelope, &identity).await.and_then(|reply| {
                        if reply.len() > limit {
                            Err(CallError::PayloadTooLarge { size: reply.len() as u64, limit: limit as u64 })
                        } else {
                            Ok(reply)
                        }
                    });
                    let _ = outbound.send(Ok(Envelope::response(correlation_id, result)));
                });
            }
            Inbound::Envelope(envelope) => {
                let error = CallError::Protocol("a client sends requests only".to_owned());
                let _ = outbound.send(Ok(Envelope::response(envelope.correlation_id, Err(error))));
            }
            Inbound::Malformed { correlation_id, reason } => {
                tracing::debug!(correlation_id, %reason, "malformed frame");
                let error = CallError::Protocol(format!("malformed frame: {reason}"));
                let _ = outbound.send(Ok(Envelope::response(correlation_id, Err(error))));
            }
            Inbound::TooLarge { correlation_id, size } => {
                let limit = silo.config.max_payload_bytes as u64;
                let error = CallError::PayloadTooLarge { size: size as u64, limit };
                let _ = outbound.send(Ok(Envelope::response(correlation_id, Err(error))));
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
