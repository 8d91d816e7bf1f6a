//! The seam through which a deterministic simulator drives silos: the network, the wall clock, and the seed of
//! the runtime's randomness.
//!
//! A silo reaches the outside world in three ways that a simulation must control: it opens and accepts
//! connections, it reads the wall clock (membership timestamps, absolute call deadlines, peer proofs), and it
//! draws random numbers (placement, registration ids). By default these are TCP, the system clock and a seed
//! taken from the clock. A simulator (for instance one built on `turmoil`, as this project's simulation suite is)
//! [`install`]s its own once per process, before starting any silo or client; from then on every silo and client
//! of the process goes through it. Monotonic time needs no seam: the runtime reads it through `tokio::time`,
//! which a simulator controls already.
//!
//! This is process-wide on purpose: a simulation runs a whole cluster in one process, and the seam stays out of
//! every constructor's signature. Nothing here is used unless [`install`] is called.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use grains::__private::runtime::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream, as a connection is.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An open listening socket.
pub trait Listener: Send + 'static {
    /// The next incoming connection and its peer's address.
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Box<dyn Io>, SocketAddr)>>;
    /// The bound address.
    fn local_addr(&self) -> std::io::Result<SocketAddr>;
}

/// How a silo and a client reach each other.
pub trait Network: Send + Sync + 'static {
    /// Opens a connection to `host:port`.
    fn connect(&self, host: String, port: u16) -> BoxFuture<'static, std::io::Result<Box<dyn Io>>>;
    /// Listens on `addr`.
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<Box<dyn Listener>>>;
}

/// What a simulator supplies.
pub struct Seams {
    /// The network every silo and client of the process uses.
    pub network: Arc<dyn Network>,
    /// Wall-clock milliseconds since the Unix epoch.
    pub wall_clock_ms: fn() -> u64,
}

impl std::fmt::Debug for Seams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seams").finish_non_exhaustive()
    }
}

static SEAMS: OnceLock<Seams> = OnceLock::new();

/// Installs the simulator's seams for the rest of the process. Returns false (changing nothing) if seams were
/// installed before.
pub fn install(seams: Seams) -> bool {
    SEAMS.set(seams).is_ok()
}

/// Re-seeds the runtime's random choices (placement, registration ids), so that a simulation run with the same
/// seed makes the same choices.
///
/// The seed holds for the calling thread (a simulation runs on one thread; seeds may run side by side on
/// several): its placement choices, registration ids, and the seeds of the silo's hash maps, whose iteration
/// orders would otherwise differ from run to run.
pub fn seed_randomness(seed: u64) {
    THREAD_SEED.with(|s| s.set(Some(seed)));
    HASH_SEEDS.with(|s| s.set(0));
    #[cfg(feature = "silo")]
    crate::cluster::placement::seed(seed);
}

thread_local! {
    static THREAD_SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    /// How many hash seeds this thread has handed out since it was seeded.
    static HASH_SEEDS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The seed a simulation gave this thread, if any.
pub(crate) fn thread_seed() -> Option<u64> {
    THREAD_SEED.with(std::cell::Cell::get)
}

/// The seed of a new hash map: drawn from the simulation's seed on a seeded thread (the same sequence in every
/// run of that seed), else random.
pub(crate) fn hash_seed() -> u64 {
    match thread_seed() {
        Some(seed) => {
            let n = HASH_SEEDS.with(|c| {
                let n = c.get();
                c.set(n + 1);
                n
            });
            seed.rotate_left(17) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }
        None => {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        }
    }
}

/// The installed network, if any.
pub(crate) fn network() -> Option<Arc<dyn Network>> {
    SEAMS.get().map(|s| s.network.clone())
}

/// Wall-clock milliseconds since the Unix epoch: the simulator's clock if one is installed.
pub(crate) fn unix_ms() -> u64 {
    match SEAMS.get() {
        Some(seams) => (seams.wall_clock_ms)(),
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    }
}

/// Whether a simulator's seams are installed.
pub(crate) fn is_simulated() -> bool {
    SEAMS.get().is_some()
}

/// The system's network: TCP, with Nagle's algorithm off.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TcpNetwork;

struct TcpListenerIo(tokio::net::TcpListener);

/// Accepts one TCP connection with Nagle's algorithm off. tonic ignores its own `tcp_nodelay` for a listener
/// it is handed, and Nagle's algorithm meeting delayed ACKs held small replies back by ~40 ms.
async fn accept_tcp(listener: &tokio::net::TcpListener) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    let (stream, remote) = listener.accept().await?;
    let _ = stream.set_nodelay(true);
    Ok((stream, remote))
}

impl Listener for TcpListenerIo {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Box<dyn Io>, SocketAddr)>> {
        Box::pin(async move {
            let (stream, remote) = accept_tcp(&self.0).await?;
            Ok((Box::new(stream) as Box<dyn Io>, remote))
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl TcpNetwork {
    /// Wraps a bound TCP listener.
    pub(crate) fn listener(listener: tokio::net::TcpListener) -> Box<dyn Listener> {
        Box::new(TcpListenerIo(listener))
    }
}

/// Opens connections through the installed [`Network`], for tonic's `connect_with_connector`.
#[derive(Clone)]
pub(crate) struct Connector(pub(crate) Arc<dyn Network>);

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<Box<dyn Io>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, std::io::Error>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let network = self.0.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_owned();
            let port = uri.port_u16().unwrap_or(80);
            Ok(hyper_util::rt::TokioIo::new(network.connect(host, port).await?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nagles_algorithm_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(!client.nodelay().unwrap(), "a fresh socket has Nagle's algorithm on: the check below means something");
        let (accepted, _) = accept_tcp(&listener).await.unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY on the accepted socket");
    }
}
