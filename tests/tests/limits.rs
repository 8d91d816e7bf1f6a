//! Limits on hostile input: each is a `SiloConfig` key, and going past it gets a typed error (or a closed
//! stream) without disturbing anything else.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use grains::CallError;
use grains_silo::wire::CONNECT_PATH;
use grains_silo::{Client, Silo, SiloConfig};
use grains_tests::Counter;
use grains_tests::process::SiloLauncher;
use grains_tests::raw_stream::ChunkedBody;
use http_body::Body as _;
use tokio::sync::mpsc;

/// Opens a Connect stream to `addr` whose request body is fed through the returned sender.
async fn open_raw_body(addr: &str) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<()>) {
    use tower_service::Service;
    let mut channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{CONNECT_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(ChunkedBody(rx)))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let response = channel.call(request);
    let task = tokio::spawn(async move {
        // Hold the response (and so the stream) open until the server ends it.
        if let Ok(response) = response.await {
            let mut body = response.into_body();
            while let Some(Ok(_)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {}
        }
    });
    (tx, task)
}

/// 50 streams each announce a 200 MiB frame and send 8 MiB of it. A silo that buffers frames up to the size
/// their header announces holds 400 MiB; one that checks the header against its payload limit (4 MiB) ends
/// each stream at the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_giant_frames_are_refused_at_the_header_not_buffered() {
    const STREAMS: usize = 50;
    const SENT_PER_STREAM: usize = 8 << 20;
    // A process of its own, so that its memory is measured alone.
    let silo = SiloLauncher::new(env!("CARGO_BIN_EXE_grains-test-silo")).args(["--port", "0", "--log", "warn"]).start();
    let before = silo.rss_mib();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(open_raw_body(&silo.addr).await);
    }
    let mut header = vec![0u8];
    header.extend_from_slice(&(200u32 << 20).to_be_bytes());
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    let mut sends = Vec::new();
    for (tx, _) in &streams {
        let tx = tx.clone();
        let header = Bytes::from(header.clone());
        let chunk = chunk.clone();
        sends.push(tokio::spawn(async move {
            if tx.send(header).await.is_err() {
                return 0;
            }
            let mut sent = 0;
            while sent < SENT_PER_STREAM {
                let sending = tokio::time::timeout(Duration::from_secs(5), tx.send(chunk.clone())).await;
                if !matches!(sending, Ok(Ok(()))) {
                    break; // the silo ended the stream (or stopped reading it)
                }
                sent += chunk.len();
            }
            sent
        }));
    }
    let mut accepted = 0;
    for send in sends {
        accepted += send.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = silo.rss_mib();
    println!(
        "silo RSS: {before} MiB before, {during} MiB with {STREAMS} streams announcing 200 MiB frames \
         ({} MiB handed to the transport)",
        accepted >> 20
    );
    assert!(during < before + 150, "the silo buffered the frames: {before} MiB -> {during} MiB");
    drop(streams);
}

async fn listening_silo(adjust: impl FnOnce(SiloConfig) -> SiloConfig) -> (Silo, Client) {
    let config = adjust(SiloConfig { port: 0, gateway: true, ..grains_tests::test_config() });
    let silo = grains_tests::start_silo(config).await;
    let client = Client::connect(format!("http://{}", silo.gateway_addr().unwrap())).await.unwrap();
    (silo, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_answers_overloaded_at_once_and_the_grain_keeps_serving() {
    let (silo, client) = listening_silo(|c| SiloConfig { max_mailbox_length: 4, ..c }).await;
    let busy = client.grain::<Counter>("limits-mailbox");
    busy.increment().await.unwrap().unwrap();
    let running = {
        let busy = busy.clone();
        tokio::spawn(async move { busy.sleep(1_500).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued: Vec<_> = (0..10)
        .map(|_| {
            let busy = busy.clone();
            tokio::spawn(async move { busy.get().await })
        })
        .collect();
    let mut served = 0;
    let mut overloaded = 0;
    for call in queued {
        match call.await.unwrap() {
            Ok(1) => served += 1,
            Err(CallError::Overloaded(_)) => overloaded += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    running.await.unwrap().unwrap();
    assert!(overloaded >= 5, "{overloaded} of 10 calls refused, {served} served, with room for 4");
    assert_eq!(served + overloaded, 10);
    assert_eq!(busy.increment().await.unwrap().unwrap(), 2, "the grain still serves");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_chosen_deadline_is_capped_by_max_call_timeout() {
    let (silo, client) = listening_silo(|c| SiloConfig { max_call_timeout: Duration::from_millis(500), ..c }).await;
    let slow = client.grain::<Counter>("limits-deadline").with_timeout(Duration::from_secs(60));
    let result = slow.sleep(3_000).await;
    assert!(matches!(result, Err(CallError::Timeout(d)) if d <= Duration::from_millis(500)), "{result:?}");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passed_in_the_queue_is_dropped_before_its_turn() {
    use grains::__private::runtime::{Call, Payload};
    let silo = grains_tests::start_silo(grains_tests::test_config()).await;
    let busy = silo.grain::<Counter>("limits-expired");
    busy.increment().await.unwrap().unwrap();
    let running = {
        let busy = busy.clone();
        tokio::spawn(async move { busy.sleep(800).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The caller still holds its reply (its future is not polled), but the deadline passes while the call
    // waits behind the sleep.
    let stale = silo.runtime().invoke(Call {
        target: grains::GrainId::new("Counter", "limits-expired"),
        method: "increment".into(),
        payload: Payload::Encoded(grains::codec::encode(&()).unwrap().into()),
        deadline: tokio::time::Instant::now() + Duration::from_millis(100),
        issued: tokio::time::Instant::now(),
        chain: Vec::new().into(),
        metadata: Default::default(),
    });
    running.await.unwrap().unwrap();
    assert_eq!(busy.get().await.unwrap(), 1, "the expired increment ran");
    assert!(matches!(stale.await, Err(CallError::Timeout(_))));
    silo.shutdown(Duration::from_secs(5)).await;
}

/// Whether the silo closes `stream` (EOF or reset) within `within`.
async fn closed_by_silo(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // the server's HTTP/2 settings
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_opens_no_request_or_goes_quiet_is_closed() {
    let (silo, client) = listening_silo(|c| SiloConfig {
        handshake_timeout: Duration::from_millis(300),
        connection_idle_timeout: Duration::from_millis(800),
        ..c
    })
    .await;
    let addr = silo.gateway_addr().unwrap();
    // Connects and says nothing.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_silo(&mut silent, Duration::from_secs(10)).await, "a silent connection stayed open");
    // Sends half of the HTTP/2 preface, then nothing: no request ever opens.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(closed_by_silo(&mut slow, Duration::from_secs(10)).await, "a half handshake stayed open");
    // An established stream that answered a call, then carries nothing for longer than the idle timeout.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let codec = grains_silo::wire::EnvelopeCodec::new(1 << 20);
    let path = http::uri::PathAndQuery::from_static(CONNECT_PATH);
    let request = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    let mut responses = grpc.streaming(request, path, codec).await.unwrap().into_inner();
    tx.send(grains_silo::wire::Envelope {
        correlation_id: 1,
        target: Some((&grains::GrainId::new("Counter", "limits-idle")).into()),
        method: "get".into(),
        payload: grains::codec::encode(&()).unwrap().into(),
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(responses.message().await, Ok(Some(grains_silo::wire::Inbound::Envelope(_)))));
    let ended = tokio::time::timeout(Duration::from_secs(10), responses.message()).await;
    assert!(matches!(ended, Ok(Err(_)) | Ok(Ok(None))), "an idle connection stayed open: {ended:?}");
    // Clients reconnect and carry on (a call that met the close in flight fails as lost, outcome unknown).
    let mut result = client.grain::<Counter>("limits-idle").get().await;
    for _ in 0..3 {
        if !matches!(result, Err(CallError::Unavailable(_))) {
            break;
        }
        result = client.grain::<Counter>("limits-idle").get().await;
    }
    assert_eq!(result, Ok(0));
    drop(tx);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_closed_at_once_and_a_freed_slot_is_reused() {
    let (silo, client) = listening_silo(|c| SiloConfig { max_connections: 3, ..c }).await;
    let addr = silo.gateway_addr().unwrap();
    // The client holds one slot; two idle connections take the others.
    let held =
        [tokio::net::TcpStream::connect(addr).await.unwrap(), tokio::net::TcpStream::connect(addr).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_silo(&mut extra, Duration::from_secs(5)).await, "a connection past the limit stayed open");
    assert_eq!(client.grain::<Counter>("limits-conns").increment().await.unwrap().unwrap(), 1);
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Client::connect(format!("http://{addr}")).await.unwrap();
    assert_eq!(second.grain::<Counter>("limits-conns").increment().await.unwrap().unwrap(), 2);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_max_calls_per_connection_are_answered_overloaded() {
    let (silo, client) = listening_silo(|c| SiloConfig { max_calls_per_connection: 2, ..c }).await;
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let grain = client.grain::<Counter>(format!("limits-per-conn-{i}"));
            tokio::spawn(async move { grain.sleep(1_000).await })
        })
        .collect();
    let mut overloaded = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => {}
            Err(CallError::Overloaded(_)) => overloaded += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(overloaded >= 4, "{overloaded} of 6 calls refused with room for 2");
    assert_eq!(client.grain::<Counter>("limits-per-conn-0").get().await.unwrap(), 0, "the connection still serves");
    silo.shutdown(Duration::from_secs(5)).await;
}
