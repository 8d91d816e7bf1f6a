//! The client's cap on reply frames, against a fake gateway that answers a call with a gRPC frame whose header
//! announces 192 MiB. The client must fail that call with `PayloadTooLarge` as soon as it reads the header,
//! without buffering the frame, and go on using the connection once the frame has gone by.
//!
//! In a test binary of its own: the process's resident memory is measured, and no other test may move it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use grains::CallError;
use grains_silo::Client;
use grains_silo::wire::{CONNECT_PATH, Envelope, Kind, SYSTEM_TYPE};
use grains_tests::Counter;
use grains_tests::raw_stream::ChunkedBody;
use http_body::Body as _;
use prost::Message;
use tokio::sync::mpsc;

/// What the fake gateway announces for its oversized reply.
const ANNOUNCED: usize = 192 << 20;

fn framed(envelope: &Envelope) -> Bytes {
    let message = envelope.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame.into()
}

/// A gateway that speaks the envelope protocol just enough: system calls fail (the client keeps the address it
/// was given), the first grain call gets a reply frame announcing [`ANNOUNCED`] bytes, sent in full, and later
/// grain calls get `5`.
#[derive(Clone, Default)]
struct FakeGateway {
    streams: Arc<AtomicUsize>,
}

impl tower_service::Service<http::Request<tonic::body::Body>> for FakeGateway {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        assert_eq!(request.uri().path(), CONNECT_PATH);
        self.streams.fetch_add(1, Ordering::SeqCst);
        let (replies, body) = mpsc::channel(4);
        tokio::spawn(answer(request.into_body(), replies));
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::new(ChunkedBody(body)))
            .unwrap();
        std::future::ready(Ok(response))
    }
}

/// Reads the request frames of one stream and answers them.
async fn answer(mut requests: tonic::body::Body, replies: mpsc::Sender<Bytes>) {
    let mut buffer = Vec::<u8>::new();
    let mut grain_calls = 0;
    while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut requests).poll_frame(cx)).await {
        let Ok(mut data) = frame.into_data() else { continue };
        while data.has_remaining() {
            let chunk = data.chunk();
            buffer.extend_from_slice(chunk);
            let n = chunk.len();
            data.advance(n);
        }
        while buffer.len() >= 5 {
            let size = u32::from_be_bytes(buffer[1..5].try_into().unwrap()) as usize;
            if buffer.len() < 5 + size {
                break;
            }
            let request = Envelope::decode(&buffer[5..5 + size]).expect("the client sends envelopes");
            buffer.drain(..5 + size);
            let id = request.correlation_id;
            if request.target.as_ref().is_some_and(|t| t.grain_type == SYSTEM_TYPE) {
                let refused = Envelope::response(id, Err(CallError::Unavailable("a fake gateway".into())));
                let _ = replies.send(framed(&refused)).await;
                continue;
            }
            grain_calls += 1;
            if grain_calls > 1 {
                let five = Envelope::response(id, Ok(grains::codec::encode(&5u64).unwrap().into()));
                let _ = replies.send(framed(&five)).await;
                continue;
            }
            // The header, then the start of an envelope answering this call, then zeros up to the size announced.
            let start = Envelope { correlation_id: id, kind: Kind::Response as i32, ..Default::default() };
            let mut head = vec![0u8];
            head.extend_from_slice(&(ANNOUNCED as u32).to_be_bytes());
            head.extend_from_slice(&start.encode_to_vec());
            let mut left = ANNOUNCED - (head.len() - 5);
            if replies.send(head.into()).await.is_err() {
                return;
            }
            let zeros = Bytes::from(vec![0u8; 1 << 20]);
            while left > 0 {
                let n = left.min(zeros.len());
                if replies.send(zeros.slice(..n)).await.is_err() {
                    return;
                }
                left -= n;
            }
        }
    }
}

/// This process's resident memory, in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status")
        / 1024
}

#[cfg(not(target_os = "linux"))]
#[test]
fn a_reply_frame_over_the_client_limit_fails_its_call_at_the_header_and_the_connection_goes_on() {
    eprintln!("SKIPPED: this test reads its memory from /proc (Linux only)");
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_frame_over_the_client_limit_fails_its_call_at_the_header_and_the_connection_goes_on() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = FakeGateway::default();
    let streams = gateway.streams.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(gateway, tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // The fake gateway speaks gRPC only (the framed transport's reader has its own cap, unit-tested in `framed`).
    let config = grains_silo::ClientConfig { transport: grains_silo::Transport::Grpc, ..Default::default() };
    let client = Client::connect_with(format!("http://{addr}"), config).await.unwrap();
    let limit = grains_silo::ClientConfig::default().max_payload_bytes;
    let grain = client.grain::<Counter>("huge-reply").with_timeout(Duration::from_secs(20));
    let before = rss_mib();

    // Sample the memory while the oversized frame streams in.
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_mib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let first = grain.get().await;
    let refused_after = started.elapsed();
    // The next reply comes after the rest of the oversized frame, on the same connection.
    let second = grain.get().await;
    let total = started.elapsed();
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed).max(rss_mib());
    println!(
        "a reply announcing {} MiB against a limit of {} MiB: {first:?} after {refused_after:?}; the next call: \
         {second:?} after {total:?} (the whole frame went by); client process RSS {before} MiB before, {peak} MiB \
         at most while the frame streamed in",
        ANNOUNCED >> 20,
        limit >> 20
    );
    assert_eq!(
        first,
        Err(CallError::PayloadTooLarge { size: ANNOUNCED as u64, limit: limit as u64 }),
        "the oversized reply fails its call, typed"
    );
    assert!(
        refused_after < grains_tests::scaled(Duration::from_secs(2)),
        "the call failed only after {refused_after:?}: the frame was read before it was refused"
    );
    assert_eq!(second, Ok(5), "the connection carries on after the oversized reply");
    assert_eq!(streams.load(Ordering::SeqCst), 1, "one stream throughout: the connection was kept");
    assert!(peak < before + 64, "the client buffered the frame: RSS {before} MiB -> {peak} MiB");
}
