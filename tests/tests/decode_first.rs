//! An encoded call is decoded when it arrives, before any activation: arguments that do not decode cost the
//! silo no activation and no storage read, and the caller gets the typed codec error.

use std::time::Duration;

use grains::__private::runtime::{Call, Payload};
use grains::{CallError, GrainId};
use grains_silo::{Client, SiloConfig};
use grains_tests::Counter;

const FRESH_KEYS: usize = 1_000;

fn encoded_call(key: String, method: &'static str, payload: Vec<u8>) -> Call {
    Call {
        target: GrainId::new("Counter", key),
        method: method.into(),
        payload: Payload::Encoded(payload.into()),
        deadline: tokio::time::Instant::now() + Duration::from_secs(30),
        issued: tokio::time::Instant::now(),
        chain: Vec::new().into(),
        metadata: Default::default(),
    }
}

/// Payloads that `Counter`'s methods cannot decode, one shape of wrongness each.
fn undecodable(i: usize) -> (&'static str, Vec<u8>) {
    match i % 4 {
        0 => ("increment", vec![0xc1]), // not MessagePack at all
        1 => ("sleep", grains::codec::encode(&("not a number",)).unwrap()), // a string for a u64
        2 => ("sleep", grains::codec::encode(&(1u64, 2u64)).unwrap()), // two arguments for one
        _ => ("get", grains::codec::encode(&vec![0u8; 3]).unwrap()[..2].to_vec()), // cut short
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_calls_to_fresh_keys_activate_nothing_and_get_codec_errors() {
    let config = SiloConfig { port: 0, gateway: true, ..grains_tests::test_config() };
    let silo = grains_tests::start_silo(config).await;
    let client = Client::connect(format!("http://{}", silo.gateway_addr().unwrap())).await.unwrap();

    // Through the gateway, as a hostile client would send them.
    let remote = client.runtime();
    let calls: Vec<_> = (0..FRESH_KEYS)
        .map(|i| {
            let (method, payload) = undecodable(i);
            remote.invoke(encoded_call(format!("garbage-{i}"), method, payload))
        })
        .collect();
    for (i, outcome) in futures_join(calls).await.into_iter().enumerate() {
        assert!(matches!(outcome, Err(CallError::Codec(_))), "call {i}: {outcome:?}");
    }
    // In-process encoded calls take the same check.
    let local = silo.runtime();
    for i in 0..8 {
        let (method, payload) = undecodable(i);
        let outcome = local.invoke(encoded_call(format!("local-garbage-{i}"), method, payload)).await;
        assert!(matches!(outcome, Err(CallError::Codec(_))), "local call {i}: {outcome:?}");
    }

    let metrics = silo.metrics();
    assert_eq!(silo.activation_count(), 0, "{metrics:?}");
    assert_eq!((metrics.activations, metrics.activation_failures, metrics.active), (0, 0, 0), "{metrics:?}");

    // Well-formed calls, typed and encoded, still work.
    assert_eq!(client.grain::<Counter>("decoded-fine").increment().await.unwrap().unwrap(), 1);
    let reply = remote.invoke(encoded_call("decoded-fine".into(), "get", vec![0x90])).await.unwrap();
    assert_eq!(grains::codec::decode::<u64>(&reply.into_bytes().unwrap()).unwrap(), 1);
    let reply = local.invoke(encoded_call("decoded-fine".into(), "increment", vec![0x90])).await.unwrap();
    let encoded = match reply {
        Payload::Encoded(bytes) => bytes,
        Payload::Local(_) => panic!("an encoded call is answered with an encoded reply"),
    };
    let count: Result<u64, grains::StorageError> = grains::codec::decode(&encoded).unwrap();
    assert_eq!(count, Ok(2));
    assert_eq!(silo.metrics().activations, 1);
    silo.shutdown(Duration::from_secs(5)).await;
}

/// Awaits every future, concurrently, in order.
async fn futures_join<F: std::future::Future<Output: Send + 'static> + Send + 'static>(
    calls: Vec<F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("the call task does not panic"));
    }
    out
}
