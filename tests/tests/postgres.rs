//! Silos on Postgres: state rows operators can read, concurrent start-up, the duplicate-activation backstop.

use std::time::Duration;

use grains::StorageError;
use grains_silo::{Silo, SiloConfig, StorageKind};
use grains_tests::Counter;
use grains_tests::pg::TestDatabase;
use sqlx::Row;

fn postgres_config(url: &str) -> SiloConfig {
    SiloConfig { storage: StorageKind::Postgres, database_url: Some(url.to_owned()), ..grains_tests::test_config() }
}

async fn start(config: SiloConfig) -> Silo {
    Silo::builder().config(config).start().await.expect("silo starts on postgres")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grain_state_is_stored_as_jsonb_rows_operators_can_read() {
    let db = TestDatabase::create().await;
    let silo = start(postgres_config(db.url())).await;
    let counter = silo.grain::<Counter>("psql-readable");
    for expected in 1..=3 {
        assert_eq!(counter.increment().await.unwrap().unwrap(), expected);
    }
    let pool = db.pool().await;
    let row = sqlx::query(
        "SELECT (document->>'value')::bigint AS value, etag, updated_at IS NOT NULL AS stamped
         FROM grains_state WHERE grain_type = 'Counter' AND grain_key = 's:psql-readable' AND state_name = 'state'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("value"), 3);
    assert!(row.get::<bool, _>("stamped"));
    assert_eq!(Some(row.get::<i64, _>("etag").to_string()), counter.etag().await.unwrap());
    silo.shutdown(Duration::from_secs(5)).await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integer_key_and_its_digits_as_a_string_key_are_two_rows() {
    let db = TestDatabase::create().await;
    let silo = start(postgres_config(db.url())).await;
    let (int, string) = (silo.grain::<Counter>(5i64), silo.grain::<Counter>("5"));
    assert_eq!(int.increment().await.unwrap().unwrap(), 1);
    assert_eq!(int.increment().await.unwrap().unwrap(), 2);
    assert_eq!(string.increment().await.unwrap().unwrap(), 1, "Str(\"5\") does not read Int(5)'s row");
    assert_eq!(int.increment().await.unwrap().unwrap(), 3, "Int(5) does not see Str(\"5\")'s write");
    let pool = db.pool().await;
    let mut rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT grain_key, (document->>'value')::bigint FROM grains_state WHERE grain_type = 'Counter'")
            .fetch_all(&pool)
            .await
            .unwrap();
    rows.sort();
    assert_eq!(rows, vec![("i:5".to_owned(), 3), ("s:5".to_owned(), 1)], "each key's shape is in its stored form");
    pool.close().await;
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_silos_starting_at_once_on_an_empty_database_all_come_up() {
    let db = TestDatabase::create().await;
    let starts: Vec<_> = (0..3)
        .map(|i| {
            let config = SiloConfig { name: format!("silo-{i}"), ..postgres_config(db.url()) };
            tokio::spawn(async move { Silo::builder().config(config).start().await })
        })
        .collect();
    let mut silos = Vec::new();
    for start in starts {
        silos.push(start.await.unwrap().expect("every silo comes up"));
    }
    let pool = db.pool().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM grains_schema_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Counted from the source tree, so a new migration does not need this test changed.
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../storage/migrations"))
        .expect("the storage crate's migrations")
        .filter(|entry| entry.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql")))
        .count();
    assert!(migrations >= 4);
    assert_eq!(applied, migrations as i64, "each migration applied exactly once");
    for (i, silo) in silos.iter().enumerate() {
        assert_eq!(silo.grain::<Counter>(format!("start-{i}")).increment().await.unwrap().unwrap(), 1);
    }
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_activations_of_one_grain_the_stale_writer_is_refused_and_deactivated() {
    let db = TestDatabase::create().await;
    // Two silos with no directory between them: each activates the grain, a forced duplicate.
    let first = start(postgres_config(db.url())).await;
    let second = start(postgres_config(db.url())).await;
    let key = "duplicated";
    let a = first.grain::<Counter>(key);
    let b = second.grain::<Counter>(key);
    assert_eq!(a.get().await.unwrap(), 0);
    assert_eq!(b.get().await.unwrap(), 0);

    assert_eq!(a.increment().await.unwrap().unwrap(), 1, "a writes first and wins");
    let stale = b.increment().await.unwrap();
    assert!(matches!(stale, Err(StorageError::Conflict { .. })), "b holds a stale etag: {stale:?}");
    // b's activation left after its failed turn; its next call reloads a's state.
    assert_eq!(b.increment().await.unwrap().unwrap(), 2);
    // Now a is the stale one.
    assert!(matches!(a.increment().await.unwrap(), Err(StorageError::Conflict { .. })));
    assert_eq!(a.increment().await.unwrap().unwrap(), 3);

    let stored = db.counter_values().await;
    assert_eq!(stored[key], 3, "the row holds the last acknowledged write, nothing was overwritten");
    first.shutdown(Duration::from_secs(5)).await;
    second.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn postgres_without_a_url_is_a_configuration_error() {
    let config = SiloConfig { storage: StorageKind::Postgres, ..grains_tests::test_config() };
    let error = Silo::builder().config(config).start().await.unwrap_err();
    assert!(error.to_string().contains("database_url"), "{error}");
}
