//! Calls that leave the process: external client → silo over loopback (to grains on the silo the client
//! connected to, and to grains on the other silo, which the client learns to call directly), and silo → silo (a grain call from one silo to a
//! grain on another), beside a raw tonic unary echo (one shared channel) and a raw
//! length-prefixed TCP echo (one connection per caller), both implemented here. Each row shows the process's CPU
//! time per call (both ends of the call run in this process, so it counts the caller's side and the callee's).
//! A last row times what a short-lived caller pays: a fresh client's connect plus its first call, beside a raw
//! TCP connect plus one echo.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use grains_silo::{Client, ClientConfig, FailureDetection, Silo, SiloConfig};
use grains_storage::{MembershipTable, MemoryMembershipTable};
use http::uri::PathAndQuery;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::harness::{Stats, header_with_cpu, measure, measure_sequential, row_with_cpu};
use crate::local::{Echo, EchoRef};

const CALLERS: [usize; 3] = [1, 64, 256];

/// Measures the remote call paths at 1, 64 and 256 callers, and `connects` fresh connections one at a time.
pub(crate) async fn run(window: Duration, connects: usize) -> anyhow::Result<()> {
    let table: Arc<dyn MembershipTable> = Arc::new(MemoryMembershipTable::new());
    let config = |name: &str| SiloConfig {
        name: name.to_owned(),
        port: 0,
        failure_detection: FailureDetection::Fast,
        ..SiloConfig::default()
    };
    let a = Silo::builder().config(config("a")).membership_table(table.clone()).start().await?;
    let b = Silo::builder().config(config("b")).membership_table(table.clone()).start().await?;
    while a.cluster_view().active().len() < 2 || b.cluster_view().active().len() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client =
        Client::connect_with(format!("http://{}", a.gateway_addr().expect("listening")), ClientConfig::default())
            .await?;

    let tonic_addr = start_tonic_echo().await?;
    let tcp_addr = start_tcp_echo().await?;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{tonic_addr}"))?.tcp_nodelay(true).connect().await?;

    let tonic_baselines = {
        let mut out = Vec::new();
        for callers in CALLERS {
            let channel = channel.clone();
            out.push(
                measure(callers, window, move |_| {
                    let channel = channel.clone();
                    async move {
                        let mut grpc = tonic::client::Grpc::new(channel);
                        grpc.ready().await?;
                        let path = PathAndQuery::from_static("/bench.Echo/Unary");
                        grpc.unary(tonic::Request::new(Bytes::from_static(&[0x91, 0x01])), path, RawCodec).await?;
                        Ok(())
                    }
                })
                .await?,
            );
        }
        out
    };
    let mut tcp_baselines = Vec::new();
    for callers in CALLERS {
        let mut conns = Vec::new();
        for _ in 0..callers {
            let stream = TcpStream::connect(tcp_addr).await?;
            stream.set_nodelay(true)?;
            conns.push(Arc::new(Mutex::new(stream)));
        }
        let conns = Arc::new(conns);
        tcp_baselines.push(
            measure(callers, window, move |w| {
                let conn = conns[w].clone();
                async move { echo_once(&mut *conn.lock().await).await }
            })
            .await?,
        );
    }

    // External client → silo a, to grains activated on a (one hop: the gateway holds the grain).
    let mut client_stats: Vec<Stats> = Vec::new();
    for callers in CALLERS {
        let refs = warm_refs(callers, |key| client.grain::<Echo>(key), |id| a.is_active(id), "client").await?;
        client_stats.push(measure_calls(refs, window).await?);
    }
    // External client → grains activated on b, through a client that connected to a: a forwards each grain's
    // first call (warm-up), and its reply tells the client to call b directly from then on.
    let mut forwarded_stats: Vec<Stats> = Vec::new();
    for callers in CALLERS {
        let refs = warm_refs(callers, |key| client.grain::<Echo>(key), |id| b.is_active(id), "forwarded").await?;
        forwarded_stats.push(measure_calls(refs, window).await?);
    }

    // Silo a → grains that live on silo b.
    let mut cross_stats: Vec<Stats> = Vec::new();
    for callers in CALLERS {
        let refs = warm_refs(callers, |key| a.grain::<Echo>(key), |id| b.is_active(id), "cross").await?;
        cross_stats.push(measure_calls(refs, window).await?);
    }

    // A fresh client per call: connect, then one call to a grain that is already active.
    let gateway = format!("http://{}", a.gateway_addr().expect("listening"));
    client.grain::<Echo>("connect").bump(0).await?;
    let fresh = measure_sequential(connects, || {
        let gateway = gateway.clone();
        async move {
            let client = Client::connect(&gateway).await?;
            client.grain::<Echo>("connect").bump(1).await?;
            Ok(())
        }
    })
    .await?;
    let fresh_tcp = measure_sequential(connects, || async move {
        let mut stream = TcpStream::connect(tcp_addr).await?;
        stream.set_nodelay(true)?;
        echo_once(&mut stream).await
    })
    .await?;

    header_with_cpu("External client → silo over loopback", "tonic unary");
    for (i, callers) in CALLERS.iter().enumerate() {
        row_with_cpu("client call", *callers, client_stats[i], tonic_baselines[i]);
    }
    header_with_cpu("External client → silo over loopback", "raw TCP echo");
    for (i, callers) in CALLERS.iter().enumerate() {
        row_with_cpu("client call", *callers, client_stats[i], tcp_baselines[i]);
    }
    row_with_cpu("connect + first call", 1, fresh, fresh_tcp);
    header_with_cpu("External client → grain on another silo than the client's first gateway", "raw TCP echo");
    for (i, callers) in CALLERS.iter().enumerate() {
        row_with_cpu("forwarded call", *callers, forwarded_stats[i], tcp_baselines[i]);
    }
    header_with_cpu("Silo → silo, grain call to another silo", "tonic unary");
    for (i, callers) in CALLERS.iter().enumerate() {
        row_with_cpu("cross-silo call", *callers, cross_stats[i], tonic_baselines[i]);
    }
    header_with_cpu("Silo → silo, grain call to another silo", "raw TCP echo");
    for (i, callers) in CALLERS.iter().enumerate() {
        row_with_cpu("cross-silo call", *callers, cross_stats[i], tcp_baselines[i]);
    }
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// `callers` warm references made by `grain`, each to a grain whose activation `placed` accepts (placement is
/// random: keys are tried until enough land where the row needs them).
async fn warm_refs(
    callers: usize,
    grain: impl Fn(String) -> EchoRef,
    placed: impl Fn(&grains::GrainId) -> bool,
    prefix: &str,
) -> anyhow::Result<Vec<EchoRef>> {
    let mut refs = Vec::new();
    for i in 0.. {
        if refs.len() == callers {
            break;
        }
        let key = format!("{prefix}-{callers}-{i}");
        let r = grain(key.clone());
        r.bump(0).await?;
        if placed(&grains::GrainId::new("Echo", key.as_str())) {
            refs.push(r);
        }
    }
    Ok(refs)
}

/// One request and its reply on the raw TCP echo.
async fn echo_once(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream.write_all(&[0, 0, 0, 2, 0x91, 0x01]).await?;
    let len = stream.read_u32().await? as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(())
}

/// Measures warm `bump` calls, one caller per reference.
async fn measure_calls(refs: Vec<EchoRef>, window: Duration) -> anyhow::Result<Stats> {
    let callers = refs.len();
    let refs = Arc::new(refs);
    measure(callers, window, move |w| {
        let r = refs[w].clone();
        async move {
            r.bump(1).await?;
            Ok(())
        }
    })
    .await
}

/// Frames are raw bytes both ways.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// A tonic server whose one unary method echoes its request.
#[derive(Clone)]
struct EchoService;

struct UnaryEcho;

impl tower_service::Service<tonic::Request<Bytes>> for UnaryEcho {
    type Response = tonic::Response<Bytes>;
    type Error = tonic::Status;
    type Future = std::future::Ready<Result<Self::Response, tonic::Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

impl<B> tower_service::Service<http::Request<B>> for EchoService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(UnaryEcho, request).await)
        })
    }
}

async fn start_tonic_echo() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder().tcp_nodelay(true).serve_with_incoming(EchoService, incoming).await;
    });
    Ok(addr)
}

async fn start_tcp_echo() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Ok(len) = stream.read_u32().await else { return };
                    buf.resize(len as usize, 0);
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let mut out = Vec::with_capacity(4 + buf.len());
                    out.put_u32(len);
                    out.extend_from_slice(&buf);
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}
