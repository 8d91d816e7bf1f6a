//! The client gateway: typed calls from an external client, and typed errors for bad input on a connection
//! that keeps working.

use std::time::Duration;

use bytes::Bytes;
use grains::__private::runtime::{Call, Payload};
use grains::{CallError, GrainId};
use grains_silo::wire::{Envelope, Kind, WireGrainId};
use grains_silo::{Client, Silo, SiloConfig};
use grains_tests::raw_stream::RawEnvelopeStream;
use grains_tests::{Counter, Peer, start_silo};
use prost::Message;

async fn silo_with_gateway(max_payload_bytes: usize) -> (Silo, String) {
    let config = SiloConfig { port: 0, max_payload_bytes, ..grains_tests::test_config() };
    let config = SiloConfig { gateway: true, ..config };
    let silo = start_silo(config).await;
    let url = format!("http://{}", silo.gateway_addr().expect("gateway runs"));
    (silo, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_call_to_an_idle_activation_runs_on_the_gateway_task_serving_it() {
    let (silo, url) = silo_with_gateway(4 << 20).await;
    let client = Client::connect(&url).await.unwrap();
    let counter = client.grain::<Counter>("gateway-inline");
    // The first call activates the grain and runs on the activation's own task.
    let activation_task = counter.task().await.unwrap();
    // Warm and idle, later calls run on the task serving each request: a different one each time.
    let (second, third) = (counter.task().await.unwrap(), counter.task().await.unwrap());
    assert_ne!(second, activation_task);
    assert_ne!(third, activation_task);
    assert_ne!(second, third);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_client_calls_grains_with_every_key_shape() {
    let (silo, url) = silo_with_gateway(4 << 20).await;
    let client = Client::connect(&url).await.unwrap();
    let counter = client.grain::<Counter>("gateway-counter");
    assert_eq!(counter.increment().await.unwrap().unwrap(), 1);
    assert_eq!(counter.increment().await.unwrap().unwrap(), 2);
    let uuid = grains::Uuid::from_u128(99);
    for (key, text) in [
        (grains::GrainKey::from("s"), "s".to_owned()),
        (grains::GrainKey::from(-5i64), "-5".to_owned()),
        (uuid.into(), uuid.to_string()),
        ((1, "x").into(), "1+x".to_owned()),
    ] {
        assert_eq!(client.grain::<Peer>(key).name().await.unwrap(), text);
    }
    // Grain-to-grain calls started from outside.
    assert_eq!(client.grain::<Peer>("a").ask_name("b".into()).await.unwrap().unwrap(), "b");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_closes_its_connection() {
    // A gateway that takes one connection at a time: a client that kept its connection open after being
    // dropped would lock every later client out.
    let config = SiloConfig { port: 0, gateway: true, max_connections: 1, ..grains_tests::test_config() };
    let silo = start_silo(config).await;
    let url = format!("http://{}", silo.gateway_addr().expect("gateway runs"));
    for round in 0..3 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let client = loop {
            match Client::connect(&url).await {
                Ok(client) => break client,
                // The last client's connection may still be closing.
                Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("round {round}: the previous client's connection was never closed: {e}"),
            }
        };
        client.grain::<Counter>("dropped-client").increment().await.unwrap().unwrap();
    }
    silo.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn a_client_dropped_outside_its_runtime_closes_quietly() {
    // A CLI's `main` drops its client after `block_on` has returned: closing its connections must not need a
    // runtime (spawning there would panic).
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (silo, client) = runtime.block_on(async {
        let (silo, url) = silo_with_gateway(4 << 20).await;
        let client = Client::connect(&url).await.unwrap();
        client.grain::<Counter>("dropped-outside").increment().await.unwrap().unwrap();
        (silo, client)
    });
    drop(client);
    runtime.block_on(silo.shutdown(Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_share_one_connection() {
    let (silo, url) = silo_with_gateway(4 << 20).await;
    let client = Client::connect(&url).await.unwrap();
    let calls: Vec<_> = (0..500i64)
        .map(|i| {
            let counter = client.grain::<Counter>(i % 50);
            tokio::spawn(async move { counter.increment().await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap().unwrap();
    }
    for i in 0..50i64 {
        assert_eq!(client.grain::<Counter>(i).get().await.unwrap(), 10);
    }
    silo.shutdown(Duration::from_secs(5)).await;
}

fn encoded_call(grain_type: &'static str, method: &'static str, payload: Vec<u8>) -> Call {
    Call {
        target: GrainId::new(grain_type, "k"),
        method: method.into(),
        payload: Payload::Encoded(payload.into()),
        deadline: tokio::time::Instant::now() + Duration::from_secs(5),
        issued: tokio::time::Instant::now(),
        chain: Vec::new().into(),
        metadata: Default::default(),
    }
}

#[tokio::test]
async fn unknown_types_methods_and_undecodable_arguments_get_typed_errors() {
    let (silo, url) = silo_with_gateway(4 << 20).await;
    let client = Client::connect(&url).await.unwrap();
    let runtime = client.runtime();

    let err = runtime.invoke(encoded_call("NoSuchGrain", "get", vec![0x90])).await.unwrap_err();
    assert_eq!(err, CallError::UnknownGrainType("NoSuchGrain".into()));
    let message = err.to_string();
    assert!(message.contains("`NoSuchGrain`") && message.contains("link()"), "names the usual cause: {message}");

    let err = runtime.invoke(encoded_call("Counter", "no_such_method", vec![0x90])).await.unwrap_err();
    assert_eq!(err, CallError::UnknownMethod { grain_type: "Counter".into(), method: "no_such_method".into() });

    // `sleep` takes one u64; send a string instead.
    let wrong = grains::codec::encode(&("not a number",)).unwrap();
    let err = runtime.invoke(encoded_call("Counter", "sleep", wrong)).await.unwrap_err();
    assert!(matches!(err, CallError::Codec(_)), "got {err:?}");

    // The connection still serves well-formed calls.
    assert_eq!(client.grain::<Counter>("still-fine").increment().await.unwrap().unwrap(), 1);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_refuses_an_oversized_payload_before_sending() {
    let (silo, url) = silo_with_gateway(1024).await;
    let config = grains_silo::ClientConfig { max_payload_bytes: 1024, ..Default::default() };
    let client = Client::connect_with(&url, config).await.unwrap();
    let peer = client.grain::<Peer>("big");
    let err = peer.echo(vec![7; 4096]).await.unwrap_err();
    assert!(matches!(err, CallError::PayloadTooLarge { limit: 1024, .. }), "got {err:?}");
    assert_eq!(peer.echo(vec![7; 100]).await.unwrap(), 100);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_client_deadline_ends_in_timeout() {
    let (silo, url) = silo_with_gateway(4 << 20).await;
    let client = Client::connect(&url).await.unwrap();
    let counter = client.grain::<Counter>("client-slow").with_timeout(Duration::from_millis(100));
    let result = counter.sleep(2_000).await;
    assert!(matches!(result, Err(CallError::Timeout(_))), "got {result:?}");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_graceful_shutdown_finishes_calls_in_flight_then_refuses_the_connection() {
    let (silo, url) = silo_with_gateway(4 << 20).await;
    let client = Client::connect(&url).await.unwrap();
    let counter = client.grain::<Counter>("in-flight");
    let call = tokio::spawn(async move { counter.sleep(1_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    silo.shutdown(Duration::from_secs(10)).await;
    let result = tokio::time::timeout(Duration::from_secs(10), call).await.expect("no hang").unwrap();
    assert_eq!(result, Ok(()), "the call in flight completed within the grace period");
    let after = client.grain::<Counter>("in-flight").get().await;
    assert!(matches!(after, Err(CallError::Unavailable(_))), "got {after:?}");
}

/// Past its grace period a stopping silo stops the turns still running: the caller gets an error at once,
/// and nothing of the grain runs after the silo is gone.
#[tokio::test]
async fn a_turn_still_running_past_the_grace_period_is_stopped_and_its_caller_answered() {
    let (silo, url) = silo_with_gateway(4 << 20).await;
    let client = Client::connect(&url).await.unwrap();
    let counter = client.grain::<Counter>("overstaying");
    let call = tokio::spawn(async move { counter.increment_slowly(3_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = std::time::Instant::now();
    silo.shutdown(Duration::from_millis(100)).await;
    let result = tokio::time::timeout(Duration::from_secs(10), call).await.expect("no hang").unwrap();
    assert!(result.is_err(), "the stopped turn's caller gets an error, got {result:?}");
    assert!(stopping.elapsed() < Duration::from_millis(2_500), "the turn did not run to its end");
}

fn request(correlation_id: u64, method: &str, payload: Vec<u8>) -> Bytes {
    Envelope {
        correlation_id,
        kind: Kind::Request as i32,
        target: Some(WireGrainId::from(&GrainId::new("Peer", "raw"))),
        method: method.into(),
        payload: payload.into(),
        timeout_ms: 5_000,
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

#[tokio::test]
async fn malformed_and_oversized_frames_get_typed_replies_and_the_stream_keeps_working() {
    let (silo, url) = silo_with_gateway(1024).await;
    let mut stream = RawEnvelopeStream::open(&url).await;

    // A truncated envelope: field 1 (correlation id 41) is readable, the rest is cut off mid-field.
    let mut broken = request(41, "name", grains::codec::encode(&()).unwrap()).to_vec();
    broken.truncate(broken.len() - 1);
    stream.send_frame(broken.into());
    let reply = stream.next_reply().await;
    assert_eq!(reply.correlation_id, 41);
    let error = reply.error.expect("an error reply").to_call_error();
    assert!(matches!(error, CallError::Protocol(ref m) if m.contains("malformed")), "got {error:?}");

    // A frame over the silo's 1 KiB limit.
    stream.send_frame(request(42, "echo", grains::codec::encode(&(vec![1u8; 8192],)).unwrap()));
    let reply = stream.next_reply().await;
    assert_eq!(reply.correlation_id, 42);
    let error = reply.error.expect("an error reply").to_call_error();
    assert!(matches!(error, CallError::PayloadTooLarge { limit: 1024, .. }), "got {error:?}");

    // Garbage with no readable correlation id.
    stream.send_frame(Bytes::from_static(&[0xff, 0xff, 0xff]));
    let reply = stream.next_reply().await;
    assert_eq!(reply.correlation_id, 0);
    assert!(reply.error.is_some(), "{reply:?}");

    // The same stream still carries a good call.
    stream.send_frame(request(43, "echo", grains::codec::encode(&(vec![1u8; 10],)).unwrap()));
    let reply = stream.next_reply().await;
    assert_eq!(reply.correlation_id, 43);
    assert!(reply.error.is_none(), "{:?}", reply.error);
    let n: usize = grains::codec::decode(&reply.payload).unwrap();
    assert_eq!(n, 10);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_silo_serves_prometheus_metrics_on_its_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (silo, _url) = silo_with_gateway(4 << 20).await;
    silo.grain::<Counter>("metered").increment().await.unwrap().unwrap();
    let mut stream = tokio::net::TcpStream::connect(silo.gateway_addr().unwrap()).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: silo\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("# TYPE grains_calls_total counter"), "{response}");
    assert!(response.contains("grains_activations_active 1"), "{response}");
    silo.shutdown(Duration::from_secs(5)).await;
}
