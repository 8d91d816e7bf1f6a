//! Postgres going away under a running silo: typed errors, nothing acknowledged that was not committed, and
//! recovery without a restart. Runs against a throw-away cluster that the test stops and starts.

use std::collections::HashMap;
use std::time::Duration;

use grains::{CallError, StorageError};
use grains_silo::{Silo, SiloConfig, StorageKind};
use grains_tests::Counter;
use grains_tests::pg::{TestDatabase, ThrowawayPostgres};

const KEYS: usize = 20;

/// Increments every counter once, concurrently; records acknowledged increments, returns the typed storage
/// failures.
async fn round(silo: &Silo, acked: &mut HashMap<String, u64>, phase: &str) -> Vec<&'static str> {
    let calls: Vec<_> = (0..KEYS)
        .map(|i| {
            let key = format!("outage-{i}");
            let counter = silo.grain::<Counter>(key.as_str());
            (key, tokio::spawn(async move { counter.increment().await }))
        })
        .collect();
    let mut errors = Vec::new();
    for (key, call) in calls {
        match call.await.expect("call task") {
            Ok(Ok(value)) => {
                let count = acked.entry(key).or_default();
                *count += 1;
                assert_eq!(value, *count, "{phase}: the value returned is the acknowledged count");
            }
            Ok(Err(StorageError::Unavailable(_))) => errors.push("write unavailable"),
            Err(CallError::StorageUnavailable { .. }) => errors.push("activation unavailable"),
            other => panic!("{phase}: unexpected outcome {other:?}"),
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_fails_calls_with_typed_errors_and_the_silo_recovers_without_a_restart() {
    let cluster = ThrowawayPostgres::start();
    cluster.wait_ready().await;
    let db = TestDatabase::create_on(&cluster.admin_url()).await;
    let config = SiloConfig {
        storage: StorageKind::Postgres,
        database_url: Some(db.url().to_owned()),
        database_acquire_timeout: Duration::from_secs(1),
        call_timeout: Duration::from_secs(10),
        ..grains_tests::test_config()
    };
    let silo = Silo::builder().config(config).start().await.unwrap();
    let mut acked: HashMap<String, u64> = HashMap::new();

    assert!(round(&silo, &mut acked, "before").await.is_empty(), "all calls succeed while postgres is up");
    cluster.stop();
    let during = round(&silo, &mut acked, "during").await;
    assert_eq!(during.len(), KEYS, "every call during the outage fails with a typed storage error: {during:?}");
    let during = round(&silo, &mut acked, "still down").await;
    assert_eq!(during.len(), KEYS, "and keeps failing, typed, while it lasts: {during:?}");

    cluster.resume();
    cluster.wait_ready().await;
    // The pool reconnects by itself; allow it a few rounds.
    let mut recovered = false;
    for _ in 0..50 {
        if round(&silo, &mut acked, "after").await.is_empty() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "the same grains work again once postgres is back");

    // What storage holds is exactly what was acknowledged: nothing lost, nothing unacknowledged.
    let stored = db.counter_values().await;
    assert_eq!(stored.len(), KEYS);
    for (key, value) in stored {
        assert_eq!(value, acked[&key], "{key}: stored value equals acknowledged increments");
    }
    silo.shutdown(Duration::from_secs(5)).await;
}
