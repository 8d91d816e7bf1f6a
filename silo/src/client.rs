//! The external client: calls grains from another process through the cluster's gateways.
//!
//! A client knows one or more gateway addresses (every silo is a gateway) and keeps one connection — one
//! multiplexed stream — per gateway it uses. A grain's first call goes to the next gateway round-robin; when
//! the grain lives on another silo, that gateway forwards the call and its reply names the silo's gateway
//! (`Envelope::location`), and the client sends the grain's next calls straight there — one network hop instead
//! of two, as an Akka sharding proxy does. Where a grain lives is a hint (remembered for up to 100,000 grains):
//! a stale one costs a forward, never a wrong answer. A call is moved to
//! another gateway only when it certainly did not run: the connection could not be opened, or the silo refused
//! it because it is shutting down. A call lost in flight fails with [`CallError::Unavailable`] (outcome
//! unknown: at most once). The gateway list is refreshed from the cluster's membership in the background.
//!
//! A gateway can stop answering while its TCP connection stays open (a frozen process): membership takes many
//! seconds to declare it dead, and until then a round-robin share of every caller's calls would wait out their
//! deadlines on it. So each connection pings its gateway after half of
//! [`ClientConfig::gateway_liveness_timeout`] without a frame from it, and closes when the ping goes unanswered
//! for that long: the calls waiting on it fail as unavailable (never re-sent), and the gateway is *avoided* —
//! new calls go to the others — until a background probe gets an answer from it again.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use grains::__private::RefCore;
use grains::__private::runtime::{Call, GrainRuntime, Invoked, Payload};
use grains::{CallError, Grain, GrainId, GrainKey, GrainRef};
use tokio::time::Instant;

use crate::cluster::system::{self, SystemRequest, SystemResponse};
use crate::connection::{Connection, ConnectionPool, KeepAlive, PeerKind};
use crate::filter::BearerToken;
use crate::maps::FastDashMap;
use crate::peer_auth::{ClusterCredentials, PeerIdentity};
use crate::tls::{ClientTls, PemSource, TlsError};
use crate::wire::{Envelope, Mode, WireGrainId};

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No gateway address was given, or one is not a valid address.
    #[error("invalid gateway address `{0}`")]
    InvalidAddress(String),
    /// No gateway accepted the connection.
    #[error("cannot connect to {url}: {reason}")]
    Unreachable {
        /// The gateway addresses tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The TLS settings cannot be used (an unreadable or malformed CA, certificate or key).
    #[error("TLS settings: {0}")]
    Tls(#[from] TlsError),
}

/// Client settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The deadline of calls that do not set their own (default 30s).
    pub call_timeout: Duration,
    /// The largest request payload the client sends, and the largest reply payload it reads, in bytes
    /// (default 4 MiB). A larger request fails locally with [`CallError::PayloadTooLarge`]. A reply whose frame
    /// header announces more than this plus 64 KiB ([`crate::wire::ENVELOPE_OVERHEAD`]) fails its call with
    /// [`CallError::PayloadTooLarge`] at the header: none of it is buffered, it is skipped as it arrives, and
    /// the connection carries on — a broken or hostile gateway cannot make the client buffer a huge frame.
    pub max_payload_bytes: usize,
    /// How long to wait for a connection to a gateway (default 5s).
    pub connect_timeout: Duration,
    /// How often to refresh the gateway list from the cluster (default 5s).
    pub gateway_refresh_interval: Duration,
    /// Connect as a member of the cluster, proving it with the cluster's id and secret, for the diagnostics
    /// only members may ask for ([`Client::active_grains`]). `None`: an ordinary client (grain calls and the
    /// gateway list).
    pub member: Option<ClusterCredentials>,
    /// How long a gateway may leave a keep-alive ping unanswered before its connection is closed (its calls in
    /// flight fail as unavailable) and new calls avoid it until it answers again. The ping goes out after half
    /// this long without a frame from the gateway (default 1s).
    pub gateway_liveness_timeout: Duration,
    /// For `https://` gateways: the CA their certificates must chain to. `None`: the system's roots.
    pub tls_ca: Option<PemSource>,
    /// For `https://` gateways: the name their certificates are checked against. `None`: the host dialled —
    /// the one in the address given, then the addresses the cluster lists (IP addresses).
    pub tls_server_name: Option<String>,
    /// For `https://` gateways that ask for one (`tls_client_ca`): the client's certificate chain, and
    /// `tls_key` its key. The gateway's call filters see its subject.
    pub tls_cert: Option<PemSource>,
    /// The private key of `tls_cert`.
    pub tls_key: Option<PemSource>,
    /// A token sent once, when each connection to a gateway is set up (as `authorization: Bearer …`), for the
    /// silo's call filters to check (see [`crate::filter`]). Send it over TLS only: it travels as it is.
    pub bearer_token: Option<BearerToken>,
    /// What the client speaks to `http://` gateways (default [`Transport::Framed`]; `https://` gateways are
    /// always reached over gRPC).
    pub transport: Transport,
}

/// How a client reaches a plaintext gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Length-prefixed envelopes straight over TCP: the lowest latency, and what silos speak to each other.
    #[default]
    Framed,
    /// The bidirectional gRPC stream (`grains.v1.Gateway/Connect`) that clients in other languages use: for
    /// reaching gateways through an HTTP/2 proxy or load balancer. The environment variable
    /// `GRAINS_TRANSPORT=grpc` makes every connection of the process use it, silos' included.
    Grpc,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            call_timeout: grains::__private::runtime::DEFAULT_CALL_TIMEOUT,
            max_payload_bytes: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            gateway_refresh_interval: Duration::from_secs(5),
            member: None,
            gateway_liveness_timeout: Duration::from_secs(1),
            tls_ca: None,
            tls_server_name: None,
            tls_cert: None,
            tls_key: None,
            bearer_token: None,
            transport: Transport::Framed,
        }
    }
}

/// A connection to a cluster's gateways, for calling grains from outside the silo processes. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("gateways", &self.inner.gateways()).finish_non_exhaustive()
    }
}

/// How many grains' locations a client remembers; past it, about half are forgotten.
const LOCATION_CAPACITY: usize = 100_000;

struct ClientInner {
    config: ClientConfig,
    gateways: RwLock<Arc<[String]>>,
    /// The gateway of the silo each grain was last found on (see the module doc).
    locations: FastDashMap<GrainId, Arc<str>>,
    connections: ConnectionPool,
    /// Gateways that stopped answering; each has one probe waiting for it to answer again.
    avoided: FastDashMap<String, ()>,
    next: AtomicUsize,
    this: Weak<ClientInner>,
}

/// The order in which one call tries the gateways: `preferred` (where the grain was last found) if it is listed
/// and not avoided, then round-robin from `start` over the others not avoided, then the avoided ones as a last
/// resort (when every gateway is avoided, calls still go somewhere).
fn gateway_order<'a>(
    gateways: &'a [String],
    preferred: Option<&str>,
    start: usize,
    avoided: &'a impl Fn(&str) -> bool,
) -> impl Iterator<Item = &'a String> {
    let preferred = preferred.and_then(|p| gateways.iter().find(|g| *g == p)).filter(|g| !avoided(g));
    let rotated = move || {
        (0..gateways.len()).map(move |i| &gateways[(start + i) % gateways.len()]).filter(move |g| Some(*g) != preferred)
    };
    preferred.into_iter().chain(rotated().filter(|g| !avoided(g))).chain(rotated().filter(|g| avoided(g)))
}

/// `http://host:port/` → `host:port`.
fn normalize(url: &str) -> Result<String, ConnectError> {
    let bare = url.split_once("://").map_or(url, |(_, rest)| rest).trim_end_matches('/');
    if bare.is_empty() || !bare.contains(':') {
        return Err(ConnectError::InvalidAddress(url.to_owned()));
    }
    Ok(bare.to_owned())
}

impl Client {
    /// Connects to the gateway at `url` (e.g. `http://127.0.0.1:30000`) with default settings; other gateways of
    /// the cluster are learned from it. An `https://` address connects over TLS (to every gateway), verifying
    /// the gateway against the system's roots or [`ClientConfig::tls_ca`].
    pub async fn connect(url: impl AsRef<str>) -> Result<Client, ConnectError> {
        Self::connect_cluster([url.as_ref()], ClientConfig::default()).await
    }

    /// Connects to the gateway at `url` with `config`.
    pub async fn connect_with(url: impl AsRef<str>, config: ClientConfig) -> Result<Client, ConnectError> {
        Self::connect_cluster([url.as_ref()], config).await
    }

    /// Connects to a cluster through any of `urls`; calls are spread over every gateway the cluster lists.
    pub async fn connect_cluster<S: AsRef<str>>(
        urls: impl IntoIterator<Item = S>,
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let gateways = urls.iter().map(|u| normalize(u)).collect::<Result<Vec<_>, _>>()?;
        if gateways.is_empty() {
            return Err(ConnectError::InvalidAddress(String::new()));
        }
        // The cluster lists its gateways as bare `host:port`: one scheme applies to all of them.
        let secure = urls.iter().filter(|u| u.starts_with("https://")).count();
        if secure != 0 && secure != urls.len() {
            return Err(ConnectError::InvalidAddress(format!("{}: mixes http and https", urls.join(", "))));
        }
        let tls = match secure {
            0 => None,
            _ => Some(ClientTls::for_client(
                config.tls_ca.as_ref(),
                config.tls_server_name.as_deref(),
                config.tls_cert.as_ref(),
                config.tls_key.as_ref(),
            )?),
        };
        let identity = config.member.clone().map(|credentials| PeerIdentity {
            credentials,
            endpoint: format!("client-{}", std::process::id()),
            tls: tls.clone(),
        });
        let connections = ConnectionPool::new(PeerKind::Gateway, config.connect_timeout, identity)
            .with_tls(tls)
            .with_bearer_token(config.bearer_token.clone())
            .with_grpc(config.transport == Transport::Grpc)
            .with_max_reply_payload(config.max_payload_bytes)
            .with_keep_alive(KeepAlive {
                interval: config.gateway_liveness_timeout / 2,
                timeout: config.gateway_liveness_timeout,
            });
        let inner = Arc::new_cyclic(|this| ClientInner {
            config,
            gateways: RwLock::new(gateways.clone().into()),
            locations: FastDashMap::default(),
            connections,
            avoided: Default::default(),
            next: AtomicUsize::new(0),
            this: this.clone(),
        });
        let mut last_error = None;
        for gateway in &gateways {
            match inner.connection(gateway).await {
                Ok(_) => {
                    last_error = None;
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(ConnectError::Unreachable { url: gateways.join(", "), reason: e.to_string() });
        }
        inner.refresh_gateways().await;
        tokio::spawn(refresh_loop(Arc::downgrade(&inner)));
        Ok(Client { inner })
    }

    /// A typed reference to grain `key` of type `G`.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> G::Ref {
        G::Ref::from_core(RefCore::new(GrainId::new(G::TYPE_NAME, key), self.inner.clone()))
    }

    /// This client as a [`GrainRuntime`], for untyped calls (the workspace's tests and simulator; [`GrainRuntime`] is
    /// internal).
    #[doc(hidden)]
    pub fn runtime(&self) -> Arc<dyn GrainRuntime> {
        self.inner.clone()
    }

    /// The gateways the client currently spreads calls over.
    pub fn gateways(&self) -> Vec<String> {
        self.inner.gateways()
    }

    /// Diagnostics: the grain ids active on the silo at `gateway` (`host:port`). Only for a client connected
    /// as a member ([`ClientConfig::member`]); others get [`CallError::PermissionDenied`].
    pub async fn active_grains(&self, gateway: &str) -> Result<Vec<GrainId>, CallError> {
        let gateway = normalize(gateway).map_err(|e| CallError::Protocol(e.to_string()))?;
        let conn = self.inner.connection(&gateway).await?;
        let deadline = Instant::now() + self.inner.config.call_timeout;
        match system::call(&conn, &SystemRequest::Activations, deadline).await? {
            SystemResponse::Activations(ids) => Ok(ids),
            other => Err(CallError::Protocol(format!("unexpected answer {other:?}"))),
        }
    }
}

async fn refresh_loop(inner: Weak<ClientInner>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.config.gateway_refresh_interval) else { return };
        tokio::time::sleep(interval).await;
        let Some(client) = inner.upgrade() else { return };
        client.refresh_gateways().await;
    }
}

impl ClientInner {
    fn gateways(&self) -> Vec<String> {
        self.gateway_list().to_vec()
    }

    /// The gateways calls go to, shared (no copy per call).
    fn gateway_list(&self) -> Arc<[String]> {
        self.gateways.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Remembers that `grain` lives behind `gateway` (an answer from `gateway` named no other).
    fn remember(&self, grain: &GrainId, known: Option<&Arc<str>>, gateway: &str) {
        if known.is_some_and(|known| **known == *gateway) {
            return;
        }
        self.locations.insert(grain.clone(), Arc::from(gateway));
        if self.locations.len() > LOCATION_CAPACITY {
            let hasher = self.locations.hasher().clone();
            let half = hasher.hash_one(grain) % 2;
            self.locations.retain(|grain, _| hasher.hash_one(grain) % 2 != half);
        }
    }

    /// The open connection to `gateway`, opening one if there is none or the last one died.
    async fn connection(&self, gateway: &str) -> Result<Arc<Connection>, CallError> {
        self.connections.get(gateway).await
    }

    /// Asks a gateway for the cluster's current gateway list and adopts it (keeping the old one on failure).
    /// Each gateway gets its own deadline, and avoided gateways are asked last: a frozen one costs one
    /// deadline, not the refresh.
    async fn refresh_gateways(&self) {
        let gateways = self.gateway_list();
        for gateway in gateway_order(&gateways, None, 0, &|g| self.is_avoided(g)) {
            let deadline = Instant::now() + self.config.connect_timeout;
            let answer = tokio::time::timeout_at(deadline, async {
                let conn = self.connection(gateway).await?;
                system::call(&conn, &SystemRequest::Gateways, deadline).await
            });
            if let Ok(Ok(SystemResponse::Gateways(list))) = answer.await
                && !list.is_empty()
            {
                *self.gateways.write().unwrap_or_else(|e| e.into_inner()) = list.into();
                return;
            }
        }
    }

    fn is_avoided(&self, gateway: &str) -> bool {
        self.avoided.contains_key(gateway)
    }

    /// Routes new calls away from `gateway` until it answers a probe again.
    fn avoid(&self, gateway: &str) {
        if self.avoided.insert(gateway.to_owned(), ()).is_some() {
            return; // already avoided, and probed
        }
        tracing::warn!(%gateway, "gateway not answering; routing calls to the others until it answers again");
        tokio::spawn(probe_until_answered(self.this.clone(), gateway.to_owned()));
    }

    /// Sends one call through a gateway, as a client span when traces are exported.
    async fn send(&self, call: Call) -> Result<Payload, CallError> {
        #[cfg(feature = "otlp")]
        {
            let mut call = call;
            let span = crate::otlp::start_call(&mut call, crate::otlp::Kind::Client);
            let result = self.send_once(call).await;
            if let Some(span) = span {
                span.end(result.as_ref().err().map(ToString::to_string));
            }
            result
        }
        #[cfg(not(feature = "otlp"))]
        self.send_once(call).await
    }

    /// Sends one call through a gateway; moves to another gateway only if the call certainly did not run.
    async fn send_once(&self, call: Call) -> Result<Payload, CallError> {
        let payload = call.payload.into_bytes()?;
        let limit = self.config.max_payload_bytes;
        if payload.len() > limit {
            return Err(CallError::PayloadTooLarge { size: payload.len() as u64, limit: limit as u64 });
        }
        let mut envelope = Envelope {
            target: Some(WireGrainId::from(&call.target)),
            method: call.method.into_owned(),
            payload,
            call_chain: call.chain.iter().map(WireGrainId::from).collect(),
            mode: Mode::Route as i32,
            metadata: call.metadata.to_map(),
            ..Default::default()
        };
        let gateways = self.gateway_list();
        let known = self.locations.get(&call.target).map(|at| at.value().clone());
        let start = if known.is_some() { 0 } else { self.next.fetch_add(1, Ordering::Relaxed) };
        let timeout = call.deadline.saturating_duration_since(Instant::now());
        let mut last_error = CallError::Unavailable("no gateway".to_owned());
        let avoided = |g: &str| self.is_avoided(g);
        for gateway in gateway_order(&gateways, known.as_deref(), start, &avoided) {
            if Instant::now() >= call.deadline {
                break;
            }
            let conn = match tokio::time::timeout_at(call.deadline, self.connection(gateway)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    self.avoid(gateway);
                    last_error = e; // nothing was sent: try the next gateway
                    continue;
                }
                Err(_) => return Err(CallError::Timeout(timeout)), // still connecting: nothing was sent
            };
            match conn.call_located(&mut envelope, call.deadline).await {
                Ok(reply) => {
                    let at = if reply.location.is_empty() { gateway.as_str() } else { reply.location.as_str() };
                    self.remember(&call.target, known.as_ref(), at);
                    return Ok(Payload::Encoded(reply.payload));
                }
                Err(CallError::ShuttingDown) => {
                    // Refused before running: safe to move. Leave this gateway out until the next refresh.
                    last_error = CallError::ShuttingDown;
                    self.locations.remove(&call.target);
                    let mut list = self.gateways.write().unwrap_or_else(|e| e.into_inner());
                    if list.len() > 1 {
                        *list = list.iter().filter(|g| *g != gateway).cloned().collect();
                    }
                    continue;
                }
                Err(e) => {
                    if !conn.is_alive() {
                        self.avoid(gateway); // lost, or closed for not answering the keep-alive ping
                        self.locations.remove(&call.target);
                    }
                    return Err(e);
                }
            }
        }
        Err(last_error)
    }
}

/// Pings an avoided gateway until it answers (then calls may go to it again), it leaves the cluster's gateway
/// list, or the client is dropped.
async fn probe_until_answered(client: Weak<ClientInner>, gateway: String) {
    loop {
        let Some(pause) = client.upgrade().map(|c| c.config.gateway_liveness_timeout) else { return };
        tokio::time::sleep(pause).await;
        let Some(client) = client.upgrade() else { return };
        if !client.gateways().contains(&gateway) {
            client.avoided.remove(&gateway);
            return;
        }
        let deadline = Instant::now() + client.config.connect_timeout;
        let answer = tokio::time::timeout_at(deadline, async {
            let conn = client.connection(&gateway).await?;
            system::call(&conn, &SystemRequest::Ping, deadline).await
        });
        if let Ok(Ok(SystemResponse::Pong { .. })) = answer.await {
            tracing::info!(%gateway, "gateway answers again");
            client.avoided.remove(&gateway);
            return;
        }
    }
}

impl Drop for ClientInner {
    /// The last handle is gone (every `Client` clone, grain reference and call in flight hold the inner client):
    /// close the connections. Each connection's reader task holds the connection, and with it the stream's
    /// sending half, so without this a dropped client's streams would stay open — kept alive by their pings —
    /// and hold a connection slot at every gateway it used.
    fn drop(&mut self) {
        self.connections.retain(|_| false);
    }
}

impl GrainRuntime for ClientInner {
    fn invoke(&self, call: Call) -> Invoked {
        let Some(client) = self.this.upgrade() else {
            return Invoked::ready(Err(CallError::Unavailable("client dropped".to_owned())));
        };
        Invoked::pending(async move { client.send(call).await })
    }

    fn default_timeout(&self) -> Duration {
        self.config.call_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names<'a>(order: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
        order.map(String::as_str).collect()
    }

    #[test]
    fn calls_rotate_over_the_answering_gateways_and_try_an_avoided_one_last() {
        let gateways: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let none = |_: &str| false;
        assert_eq!(names(gateway_order(&gateways, None, 1, &none)), ["b", "c", "a"]);
        let avoid_b = |g: &str| g == "b";
        assert_eq!(names(gateway_order(&gateways, None, 0, &avoid_b)), ["a", "c", "b"]);
        assert_eq!(names(gateway_order(&gateways, None, 1, &avoid_b)), ["c", "a", "b"]);
        let all = |_: &str| true;
        assert_eq!(names(gateway_order(&gateways, None, 2, &all)), ["c", "a", "b"], "all avoided: still round-robin");
        assert!(names(gateway_order(&[], None, 5, &none)).is_empty());
    }

    #[test]
    fn a_grain_s_known_gateway_goes_first_unless_avoided_or_unlisted() {
        let gateways: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let none = |_: &str| false;
        assert_eq!(names(gateway_order(&gateways, Some("c"), 0, &none)), ["c", "a", "b"]);
        assert_eq!(names(gateway_order(&gateways, Some("a"), 0, &none)), ["a", "b", "c"]);
        let avoid_c = |g: &str| g == "c";
        assert_eq!(names(gateway_order(&gateways, Some("c"), 0, &avoid_c)), ["a", "b", "c"], "avoided: last");
        assert_eq!(names(gateway_order(&gateways, Some("gone"), 1, &none)), ["b", "c", "a"], "unlisted: ignored");
    }
}
