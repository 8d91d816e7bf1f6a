//! A client connection whose socket stops taking writes while it still reads: every call on it ends (a reply or
//! an error) long before its deadline, and the client's next calls go through a new connection.
//!
//! Two things see to it: a failed write closes the connection and fails the calls waiting on it, and a reader
//! that hears nothing pings its peer and closes the connection when no answer comes. With both taken out, calls
//! wait out their deadline and this test fails; with either one, it passes.
//!
//! The network is real TCP behind `grains_silo::sim`'s seam, so that the test can break one side of a socket:
//! from the moment it is broken, a write to it fails with `BrokenPipe`, while its reads go on as before (the
//! peer keeps answering what it already got). It has a process of its own: the seam is process-wide.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use grains::__private::runtime::BoxFuture;
use grains::CallError;
use grains_silo::sim::{Io, Listener, Network, Seams};
use grains_silo::{Client, ClientConfig, SiloConfig};
use grains_tests::{Counter, scaled, start_silo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A TCP stream whose writes fail once `broken` is set; its reads are untouched.
struct HalfBroken {
    inner: TcpStream,
    broken: Arc<AtomicBool>,
}

impl HalfBroken {
    fn refuse(&self) -> Option<std::io::Error> {
        self.broken
            .load(Ordering::SeqCst)
            .then(|| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writes broken by the test"))
    }
}

impl AsyncRead for HalfBroken {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for HalfBroken {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.refuse() {
            Some(error) => Poll::Ready(Err(error)),
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.refuse() {
            Some(error) => Poll::Ready(Err(error)),
            None => Pin::new(&mut self.inner).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Real TCP; every connection opened through it can have its writes broken.
#[derive(Default)]
struct BreakableTcp {
    opened: Mutex<Vec<Arc<AtomicBool>>>,
}

impl BreakableTcp {
    /// Breaks the writes of every connection opened so far; returns how many there were.
    fn break_writes(&self) -> usize {
        let opened = self.opened.lock().unwrap();
        for broken in opened.iter() {
            broken.store(true, Ordering::SeqCst);
        }
        opened.len()
    }
}

struct TcpAccept(TcpListener);

impl Listener for TcpAccept {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Box<dyn Io>, SocketAddr)>> {
        Box::pin(async move {
            let (stream, remote) = self.0.accept().await?;
            stream.set_nodelay(true)?;
            Ok((Box::new(stream) as Box<dyn Io>, remote))
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// The seam's handle on a [`BreakableTcp`] the test keeps too.
struct Shared(Arc<BreakableTcp>);

impl Network for Shared {
    fn connect(&self, host: String, port: u16) -> BoxFuture<'static, std::io::Result<Box<dyn Io>>> {
        let network = self.0.clone();
        Box::pin(async move {
            let inner = TcpStream::connect((host.as_str(), port)).await?;
            inner.set_nodelay(true)?;
            let broken = Arc::new(AtomicBool::new(false));
            network.opened.lock().unwrap().push(broken.clone());
            Ok(Box::new(HalfBroken { inner, broken }) as Box<dyn Io>)
        })
    }

    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<Box<dyn Listener>>> {
        Box::pin(async move { Ok(Box::new(TcpAccept(TcpListener::bind(addr).await?)) as Box<dyn Listener>) })
    }
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_a_connection_that_stops_taking_writes_end_long_before_their_deadline() {
    let network = Arc::new(BreakableTcp::default());
    assert!(grains_silo::sim::install(Seams { network: Arc::new(Shared(network.clone())), wall_clock_ms }));
    let silo = start_silo(SiloConfig { gateway: true, port: 0, ..grains_tests::test_config() }).await;
    let url = format!("http://{}", silo.gateway_addr().expect("gateway runs"));
    // A deadline far beyond the bound asserted below: a call that ends only at its deadline fails the test.
    let deadline = Duration::from_secs(60);
    let client = Client::connect_with(url, ClientConfig { call_timeout: deadline, ..ClientConfig::default() })
        .await
        .expect("the client connects");
    for i in 0..8 {
        client.grain::<Counter>(format!("sleeper-{i}")).sleep(0).await.expect("warm");
    }
    let opened_before = network.opened.lock().unwrap().len();
    assert!(opened_before > 0, "the client's connection goes through the test's network");

    // Eight calls in flight (their requests written, their turns running), then the socket stops taking writes,
    // then eight calls more that meet the broken socket.
    let started = tokio::time::Instant::now();
    let call = |key: String, ms: u64| {
        let grain = client.grain::<Counter>(key);
        tokio::spawn(async move { (grain.sleep(ms).await, started.elapsed()) })
    };
    let mut calls: Vec<_> = (0..8).map(|i| call(format!("sleeper-{i}"), 300)).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(network.break_writes() >= opened_before);
    calls.extend((0..8).map(|i| call(format!("late-{i}"), 0)));

    let bound = scaled(Duration::from_secs(10));
    let (mut answered, mut failed) = (0, 0);
    for call in calls {
        let (result, took) = tokio::time::timeout(bound + Duration::from_secs(5), call)
            .await
            .unwrap_or_else(|_| panic!("a call on the half-broken connection was still waiting after {bound:?}"))
            .expect("the calling task");
        assert!(took < bound, "a call ended only after {took:?} (its deadline is {deadline:?})");
        match result {
            Ok(()) => answered += 1,
            Err(CallError::Unavailable(_)) => failed += 1,
            Err(other) => panic!("a call on a connection that lost its writes failed with {other:?}"),
        }
    }
    assert_eq!(answered + failed, 16);

    // The client goes on, on a connection of its own: the broken one is not reused.
    let after = client.grain::<Counter>("after").sleep(0).await;
    assert!(after.is_ok(), "a call after the failure: {after:?}");
    assert!(network.opened.lock().unwrap().len() > opened_before, "the client opened a new connection");
    drop(client);
    silo.shutdown(Duration::from_secs(5)).await;
}
