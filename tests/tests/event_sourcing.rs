//! Event-sourced grains on real silos: exact recovery after deactivation and after a silo is killed, snapshots
//! that change nothing but speed, one winner when two activations append at one sequence, and fencing.

use std::time::Duration;

use grains::{CallError, StorageError};
use grains_silo::{Client, EventStorage, MembershipKind, Silo, SiloConfig, StorageKind};
use grains_storage::postgres::PostgresMembershipTable;
use grains_storage::{MembershipEntry, MembershipTable, SiloStatus};
use grains_tests::es::{Ledger, LedgerState, SnappedLedger};
use grains_tests::pg::TestDatabase;
use grains_tests::process::SiloLauncher;
use rand::{Rng, SeedableRng};

fn postgres_config(url: &str) -> SiloConfig {
    SiloConfig { storage: StorageKind::Postgres, database_url: Some(url.to_owned()), ..grains_tests::test_config() }
}

/// A silo on `storage`: in memory, or on the Postgres database `db`.
async fn start(db: Option<&TestDatabase>) -> Silo {
    let config = match db {
        Some(db) => postgres_config(db.url()),
        None => grains_tests::test_config(),
    };
    Silo::builder().config(config).start().await.expect("silo starts")
}

fn random_values(seed: u64, n: usize) -> Vec<i64> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1_000_000..1_000_000)).collect()
}

/// The ledger state `values` fold into.
fn folded(values: &[i64]) -> LedgerState {
    let mut state = LedgerState::default();
    for value in values {
        grains::EventSourced::apply(&mut state, &grains_tests::es::LedgerEvent::Added(*value));
    }
    state
}

async fn recovers_exactly_after_deactivation(db: Option<&TestDatabase>) {
    let silo = start(db).await;
    let ledger = silo.grain::<Ledger>("recovering");
    let values = random_values(1, 60);
    // One at a time and several at once.
    for value in &values[..30] {
        ledger.add(*value).await.unwrap().unwrap();
    }
    for chunk in values[30..].chunks(6) {
        ledger.add_all(chunk.to_vec()).await.unwrap().unwrap();
    }
    let before = ledger.view().await.unwrap();
    assert_eq!((before.version, &before.state), (60, &folded(&values)));

    ledger.deactivate().await.unwrap();
    let after = ledger.view().await.unwrap();
    assert_eq!(after.replayed, 60, "a new activation replayed the journal");
    assert_eq!((after.version, after.state), (before.version, before.state), "recovered exactly");
    // And it goes on from there.
    assert_eq!(ledger.add(7).await.unwrap().unwrap(), 61);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_an_event_sourced_grain_recovers_exactly_after_deactivation() {
    recovers_exactly_after_deactivation(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_event_sourced_grain_recovers_exactly_after_deactivation() {
    let db = TestDatabase::create().await;
    recovers_exactly_after_deactivation(Some(&db)).await;
}

async fn snapshot_plus_replay_equals_full_replay(db: Option<&TestDatabase>) {
    let silo = start(db).await;
    let values = random_values(2, 100);
    let snapped = silo.grain::<SnappedLedger>("snap");
    let plain = silo.grain::<Ledger>("snap");
    for chunk in values.chunks(3) {
        snapped.add_all(chunk.to_vec()).await.unwrap().unwrap();
        plain.add_all(chunk.to_vec()).await.unwrap().unwrap();
    }
    snapped.deactivate().await.unwrap();
    plain.deactivate().await.unwrap();

    let from_snapshot = snapped.view().await.unwrap();
    let full = plain.view().await.unwrap();
    // Snapshots every 7 events, taken after appends of 3: the last one at or after each 7 events since the
    // previous snapshot, i.e. at 9, 18, ..., 99.
    assert_eq!(from_snapshot.snapshot, Some(99), "recovered from the latest snapshot");
    assert_eq!(from_snapshot.replayed, 1, "and replayed only the event after it");
    assert_eq!((full.snapshot, full.replayed), (None, 100), "the plain ledger replays everything");
    assert_eq!(from_snapshot.state, full.state, "snapshot + replay equals full replay");
    assert_eq!(from_snapshot.state, folded(&values));
    assert_eq!(snapped.full_replay().await.unwrap().unwrap(), from_snapshot.state, "and equals its own full fold");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_snapshot_plus_replay_equals_full_replay() {
    snapshot_plus_replay_equals_full_replay(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_snapshot_plus_replay_equals_full_replay() {
    let db = TestDatabase::create().await;
    snapshot_plus_replay_equals_full_replay(Some(&db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_no_longer_decodes_is_skipped_and_the_journal_replayed() {
    let db = TestDatabase::create().await;
    let silo = start(Some(&db)).await;
    let snapped = silo.grain::<SnappedLedger>("evolved");
    let values = random_values(3, 10);
    snapped.add_all(values.clone()).await.unwrap().unwrap();
    snapped.deactivate().await.unwrap();
    // The state type changed incompatibly since the snapshot was taken.
    let pool = db.pool().await;
    let changed = sqlx::query("UPDATE grains_journal_snapshots SET document = '{\"values\": \"not a list\"}'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1);
    let view = snapped.view().await.unwrap();
    assert_eq!((view.snapshot, view.replayed), (None, 10));
    assert_eq!(view.state, folded(&values));
    silo.shutdown(Duration::from_secs(5)).await;
    pool.close().await;
}

/// Two silos that share the journal but not a directory: each activates the grain, a forced duplicate.
async fn two_activations_at_one_sequence(first: Silo, second: Silo) {
    let (a, b) = (first.grain::<Ledger>("duplicated"), second.grain::<Ledger>("duplicated"));
    assert_eq!(a.view().await.unwrap().version, 0);
    assert_eq!(b.view().await.unwrap().version, 0);

    // Both append at sequence 1, at the same moment.
    let (ra, rb) = tokio::join!(a.add_after(1, 20), b.add_after(2, 20));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let (winner, loser) = match (&ra, &rb) {
        (Ok(1), Err(StorageError::Conflict { .. })) => (1, &b),
        (Err(StorageError::Conflict { .. }), Ok(1)) => (2, &a),
        other => panic!("expected exactly one winner at sequence 1: {other:?}"),
    };
    // The loser deactivated after its failed turn; its next call recovers the winner's event.
    let recovered = loser.view().await.unwrap();
    assert_eq!((recovered.version, recovered.state.values.clone()), (1, vec![winner]));
    assert_eq!(loser.add(3).await.unwrap().unwrap(), 2);

    // Rounds of simultaneous appends: never two winners, never an event lost or doubled.
    let mut acknowledged = vec![winner, 3];
    for round in 0..10 {
        let (ra, rb) = tokio::join!(a.add_after(10 + round, 5), b.add_after(100 + round, 5));
        for (value, result) in [(10 + round, ra.unwrap()), (100 + round, rb.unwrap())] {
            match result {
                Ok(_) => acknowledged.push(value),
                Err(StorageError::Conflict { .. }) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
    }
    let final_a = a.view().await.unwrap();
    let final_b = b.view().await.unwrap();
    let full = a.full_replay().await.unwrap().unwrap();
    assert_eq!(full.values.len(), acknowledged.len(), "every acknowledged append is in the journal, once");
    let mut stored = full.values.clone();
    stored.sort_unstable();
    acknowledged.sort_unstable();
    assert_eq!(stored, acknowledged);
    for view in [final_a, final_b] {
        assert!(full.values.starts_with(&view.state.values), "an activation's state is a prefix of the journal");
    }
    first.shutdown(Duration::from_secs(5)).await;
    second.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_activations_appending_at_one_sequence_exactly_one_wins() {
    let db = TestDatabase::create().await;
    let (first, second) = (start(Some(&db)).await, start(Some(&db)).await);
    two_activations_at_one_sequence(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_two_activations_appending_at_one_sequence_exactly_one_wins() {
    let shared = EventStorage::memory();
    let silo = || async {
        Silo::builder()
            .config(grains_tests::test_config())
            .event_storage(shared.clone())
            .start()
            .await
            .expect("silo starts")
    };
    let (first, second) = (silo().await, silo().await);
    two_activations_at_one_sequence(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_declared_dead_appends_no_event() {
    const CLUSTER: &str = "es-fencing";
    let db = TestDatabase::create().await;
    let config = SiloConfig {
        membership: MembershipKind::Postgres,
        cluster_id: CLUSTER.to_owned(),
        ..postgres_config(db.url())
    };
    let silo = Silo::builder().config(config).start().await.expect("silo starts");
    let ledger = silo.grain::<Ledger>("fenced");
    assert_eq!(ledger.add(1).await.unwrap().unwrap(), 1);

    // A peer declares it dead; the silo has not noticed yet.
    let pool = db.pool().await;
    let table = PostgresMembershipTable::new(pool.clone(), CLUSTER);
    let snapshot = table.read_all().await.unwrap();
    let row = snapshot.row(silo.address()).expect("its row").clone();
    let dead = MembershipEntry { status: SiloStatus::Dead, ..row.entry };
    assert!(table.update_row(&dead, &row.etag, snapshot.version).await.unwrap());
    match ledger.add(2).await {
        Ok(Err(StorageError::Fenced { .. })) => {}
        Err(CallError::Unavailable(_) | CallError::Protocol(_)) => {} // it noticed and stopped serving
        other => panic!("a dead silo's append must not commit: {other:?}"),
    }
    let stored: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM grains_journal WHERE grain_type = 'Ledger' ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored, vec![1], "only the acknowledged event is in the journal");
    silo.shutdown(Duration::from_secs(5)).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_rows_operators_can_read() {
    let db = TestDatabase::create().await;
    let silo = start(Some(&db)).await;
    silo.grain::<Ledger>(42i64).add_all(vec![5, 6]).await.unwrap().unwrap();
    let pool = db.pool().await;
    let rows: Vec<(String, String, i64, String, serde_json::Value, Vec<String>)> = sqlx::query_as(
        "SELECT grain_key, stream, seq, event_type, payload, tags FROM grains_journal
         WHERE grain_type = 'Ledger' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let tags = vec!["ledger".to_owned()];
    assert_eq!(
        rows,
        vec![
            ("i:42".into(), "ledger".into(), 1, "Added".into(), serde_json::json!({"Added": 5}), tags.clone()),
            ("i:42".into(), "ledger".into(), 2, "Added".into(), serde_json::json!({"Added": 6}), tags),
        ]
    );
    silo.shutdown(Duration::from_secs(5)).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sourced_grain_recovers_exactly_after_its_silo_is_killed() {
    let db = TestDatabase::create().await;
    let launch = || {
        SiloLauncher::new(env!("CARGO_BIN_EXE_grains-test-silo"))
            .args(["--port", "0", "--storage", "postgres", "--database-url", db.url(), "--log", "warn"])
            .keep_log()
            .start()
    };
    let mut silo = launch();
    let client = Client::connect(silo.url()).await.expect("client connects");
    let values = random_values(4, 200);
    let mut acknowledged = Vec::new();
    for (i, chunk) in values.chunks(4).enumerate() {
        let (snapped, plain) = (client.grain::<SnappedLedger>("killed"), client.grain::<Ledger>("killed"));
        if i % 2 == 0 {
            snapped.add_all(chunk.to_vec()).await.unwrap().unwrap();
            plain.add_all(chunk.to_vec()).await.unwrap().unwrap();
        } else {
            for value in chunk {
                snapped.add(*value).await.unwrap().unwrap();
                plain.add(*value).await.unwrap().unwrap();
            }
        }
        acknowledged.extend_from_slice(chunk);
    }
    silo.signal("-KILL");
    assert!(silo.wait_exit(Duration::from_secs(10)).await.is_some(), "the silo died");
    drop(client);

    let silo = launch();
    let client = Client::connect(silo.url()).await.expect("client connects to the new silo");
    let snapped = client.grain::<SnappedLedger>("killed").view().await.unwrap();
    let plain = client.grain::<Ledger>("killed").view().await.unwrap();
    assert_eq!(plain.state, folded(&acknowledged), "every acknowledged event, once, in order");
    assert_eq!((plain.version, plain.replayed), (200, 200));
    assert_eq!(snapped.state, plain.state);
    assert!(snapped.snapshot.is_some_and(|s| s >= 193) && snapped.replayed < 7, "{snapped:?}");
    drop(silo);
}
