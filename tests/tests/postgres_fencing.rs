//! Fencing grain-state writes by membership: once the membership table says a silo is dead, a state store
//! fenced to that silo commits nothing more, even when the silo itself has not noticed (a frozen process
//! waking up with writes queued).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use grains::CallError;
use grains_silo::{MembershipKind, Silo, SiloConfig, StorageKind};
use grains_storage::postgres::{PgPool, PostgresMembershipTable, PostgresStateStore};
use grains_storage::{
    GrainStateStore, MembershipEntry, MembershipTable, SiloAddress, SiloStatus, StateKey, StorageError,
};
use grains_tests::Counter;
use grains_tests::pg::TestDatabase;
use serde_json::json;

const CLUSTER: &str = "fencing";

fn silo(port: u16) -> MembershipEntry {
    MembershipEntry {
        silo: SiloAddress { endpoint: format!("127.0.0.1:{port}"), epoch: 1 },
        name: format!("silo-{port}"),
        status: SiloStatus::Active,
        gateway: None,
        started_at_ms: 1_700_000_000_000,
        heartbeat_at_ms: 1_700_000_000_000,
        suspicions: Vec::new(),
    }
}

fn key(name: &str) -> StateKey {
    StateKey::new("Cart", format!("s:{name}"), "state")
}

/// Writes the membership row of `silo`'s next version with `status`, as a peer declaring it would.
async fn set_status(table: &PostgresMembershipTable, silo: &SiloAddress, status: SiloStatus) {
    let snapshot = table.read_all().await.unwrap();
    let row = snapshot.row(silo).expect("the silo has a row").clone();
    let entry = MembershipEntry { status, ..row.entry };
    assert!(table.update_row(&entry, &row.etag, snapshot.version).await.unwrap(), "the status update applies");
}

/// The membership table with `silos` joined, and a store fenced to each.
async fn cluster(pool: &PgPool, silos: &[MembershipEntry]) -> (PostgresMembershipTable, Vec<PostgresStateStore>) {
    let table = PostgresMembershipTable::new(pool.clone(), CLUSTER);
    let mut stores = Vec::new();
    for entry in silos {
        let version = table.read_all().await.unwrap().version;
        assert!(table.insert_row(entry, version).await.unwrap());
        stores.push(PostgresStateStore::fenced(pool.clone(), CLUSTER, entry.silo.clone()));
    }
    (table, stores)
}

fn assert_fenced<T: std::fmt::Debug>(result: Result<T, StorageError>, what: &str) {
    assert!(matches!(result, Err(StorageError::Fenced { .. })), "{what}: expected Fenced, got {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_declared_dead_commits_no_state_write() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    let (table, stores) = cluster(&pool, &[silo(1), silo(2)]).await;
    let (dead, alive) = (&stores[0], &stores[1]);

    let etag = dead.write(&key("a"), &json!(1), None).await.expect("alive: the write commits");
    let cleared = dead.write(&key("to-clear"), &json!(1), None).await.unwrap();
    set_status(&table, &silo(1).silo, SiloStatus::ShuttingDown).await;
    let etag = dead.write(&key("a"), &json!(2), Some(&etag)).await.expect("shutting down: still writes");

    set_status(&table, &silo(1).silo, SiloStatus::Dead).await;
    assert_fenced(dead.write(&key("a"), &json!(3), Some(&etag)).await, "update");
    assert_fenced(dead.write(&key("new"), &json!(3), None).await, "first write");
    assert_fenced(dead.clear(&key("to-clear"), Some(&cleared)).await, "clear");
    // Reads are not fenced; nothing of the refused writes is stored.
    let stored = dead.read(&key("a")).await.unwrap().unwrap();
    assert_eq!((stored.document, stored.etag), (json!(2), etag.clone()));
    assert_eq!(dead.read(&key("new")).await.unwrap(), None);
    assert!(dead.read(&key("to-clear")).await.unwrap().is_some());

    // The other silo's fence is its own row: it goes on writing, also the grain the dead silo held.
    alive.write(&key("a"), &json!(4), Some(&etag)).await.expect("a live silo writes");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_without_a_membership_row_commits_no_state_write() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    let stranger = SiloAddress { endpoint: "127.0.0.1:9".into(), epoch: 7 };
    let store = PostgresStateStore::fenced(pool.clone(), CLUSTER, stranger);
    assert_fenced(store.write(&key("a"), &json!(1), None).await, "no row: not proven alive");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_flight_while_a_silo_is_declared_dead_commit_before_the_declaration_or_fail() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    let (table, stores) = cluster(&pool, &[silo(1)]).await;
    let store: Arc<dyn GrainStateStore> = Arc::new(stores.into_iter().next().unwrap());

    // 100 writers update their own key in a loop until fenced: batches are in flight all the time.
    let writers: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let k = key(&format!("racing-{i}"));
                let mut acked: Option<(u64, String)> = None;
                let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
                for n in 0.. {
                    assert!(tokio::time::Instant::now() < give_up, "writer {i} was never fenced");
                    let expected = acked.as_ref().map(|(_, etag)| etag.clone());
                    match store.write(&k, &json!(n), expected.as_deref()).await {
                        Ok(etag) => acked = Some((n, etag)),
                        Err(StorageError::Fenced { .. }) => {
                            // Fenced once, fenced for good.
                            let again = store.write(&k, &json!(-1), expected.as_deref()).await;
                            assert!(matches!(again, Err(StorageError::Fenced { .. })), "{again:?}");
                            return acked;
                        }
                        Err(other) => panic!("writer {i}: unexpected {other:?}"),
                    }
                }
                unreachable!("the loop returns when fenced")
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    set_status(&table, &silo(1).silo, SiloStatus::Dead).await;
    // The declaration has committed: whatever is stored now is all that will ever be stored.
    let at_declaration = stored_states(&pool).await;

    let mut acked_writes = 0;
    for (i, writer) in writers.into_iter().enumerate() {
        let acked = writer.await.expect("writer task");
        let k = key(&format!("racing-{i}")).grain_key;
        match acked {
            Some((n, etag)) => {
                acked_writes += n + 1;
                assert_eq!(at_declaration.get(&k), Some(&(json!(n), etag)), "{k}: the last acked write is stored");
            }
            None => assert_eq!(at_declaration.get(&k), None, "{k}: nothing acked, nothing stored"),
        }
    }
    assert!(acked_writes > 0, "writes were committed before the declaration");
    assert_eq!(stored_states(&pool).await, at_declaration, "nothing committed after the declaration");
    pool.close().await;
}

/// Every stored state row: grain key → (document, etag).
async fn stored_states(pool: &PgPool) -> HashMap<String, (serde_json::Value, String)> {
    let rows: Vec<(String, serde_json::Value, i64)> =
        sqlx::query_as("SELECT grain_key, document, etag FROM grains_state").fetch_all(pool).await.unwrap();
    rows.into_iter().map(|(key, document, etag)| (key, (document, etag.to_string()))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_meets_an_uncommitted_declaration_waits_for_it_and_is_fenced_when_it_commits() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    let (_table, stores) = cluster(&pool, &[silo(1)]).await;
    let store = Arc::new(stores.into_iter().next().unwrap());
    let etag = store.write(&key("pending"), &json!(1), None).await.unwrap();

    // A peer's declaration, caught between its UPDATE of the row and its COMMIT (as in `update_row`).
    let mut declaration = pool.begin().await.unwrap();
    sqlx::query("UPDATE grains_membership SET status = 'dead' WHERE cluster_id = $1 AND endpoint = $2 AND epoch = $3")
        .bind(CLUSTER)
        .bind(&silo(1).silo.endpoint)
        .bind(silo(1).silo.epoch)
        .execute(&mut *declaration)
        .await
        .unwrap();

    let write = {
        let store = store.clone();
        tokio::spawn(async move { store.write(&key("pending"), &json!(2), Some(&etag)).await })
    };
    // Not yet committed, the row still reads `active`: a fence that only looked would let the write through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "the write waits for the declaration to end");
    declaration.commit().await.unwrap();

    let result = tokio::time::timeout(Duration::from_secs(60), write).await.expect("the write ends").unwrap();
    assert_fenced(result, "a write ordered after the declaration");
    assert_eq!(store.read(&key("pending")).await.unwrap().unwrap().document, json!(1));
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_with_state_and_membership_in_postgres_stops_writing_state_once_declared_dead() {
    let db = TestDatabase::create().await;
    let config = SiloConfig {
        storage: StorageKind::Postgres,
        membership: MembershipKind::Postgres,
        database_url: Some(db.url().to_owned()),
        cluster_id: CLUSTER.to_owned(),
        ..grains_tests::test_config()
    };
    let silo = Silo::builder().config(config).start().await.expect("silo starts");
    let counter = silo.grain::<Counter>("fenced");
    assert_eq!(counter.increment().await.unwrap().unwrap(), 1);

    // A peer declares it dead; the silo has not noticed yet (its next table read is seconds away).
    let pool = db.pool().await;
    let table = PostgresMembershipTable::new(pool.clone(), CLUSTER);
    set_status(&table, silo.address(), SiloStatus::Dead).await;
    match counter.increment().await {
        Ok(Err(StorageError::Fenced { .. })) => {}
        // It noticed after all and stopped serving: the call fails without running.
        Err(CallError::Unavailable(_) | CallError::Protocol(_)) => {}
        other => panic!("a dead silo's write must not commit: {other:?}"),
    }
    assert_eq!(db.counter_values().await["fenced"], 1, "the stored value is the last one acknowledged");
    silo.shutdown(Duration::from_secs(5)).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silo_declared_dead_commits_no_reminder_write() {
    use grains_storage::postgres::PostgresReminderTable;
    use grains_storage::{ReminderEntry, ReminderProgress, ReminderTable};

    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    let (table, _) = cluster(&pool, &[silo(1), silo(2)]).await;
    let dead = PostgresReminderTable::fenced(pool.clone(), CLUSTER, silo(1).silo);
    let entry = |name: &str| ReminderEntry {
        grain_type: "Cart".into(),
        grain_key: "s:a".into(),
        name: name.into(),
        grain_hash: 7,
        start_at_ms: 1_700_000_000_000,
        period_ms: 1_000,
    };
    let etag = dead.upsert(&entry("kept")).await.expect("alive: the registration commits");
    let step = |next_due_ms| ReminderProgress {
        grain_type: "Cart".into(),
        grain_key: "s:a".into(),
        name: "kept".into(),
        etag: etag.clone(),
        next_due_ms,
    };
    dead.advance(&[step(1_700_000_001_000)]).await.expect("alive: progress commits");

    set_status(&table, &silo(1).silo, SiloStatus::Dead).await;
    assert_fenced(dead.upsert(&entry("new")).await, "registration");
    assert_fenced(dead.advance(&[step(1_700_000_009_000)]).await, "progress");
    assert_fenced(dead.remove("Cart", "s:a", "kept", &etag).await, "removal");
    let row = dead.read_row("Cart", "s:a", "kept").await.unwrap().expect("reads are not fenced; the row stays");
    assert_eq!(row.next_due_ms, 1_700_000_001_000, "the refused progress is not stored");
    assert_eq!(dead.read_row("Cart", "s:a", "new").await.unwrap(), None);
    let alive = PostgresReminderTable::fenced(pool, CLUSTER, silo(2).silo);
    assert!(alive.remove("Cart", "s:a", "kept", &etag).await.unwrap(), "a live silo still writes");
}
