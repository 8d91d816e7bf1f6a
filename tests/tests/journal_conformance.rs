//! One conformance suite for both event journals: each test body runs against the in-memory journal and
//! against Postgres (a fresh database per test), so both honour the same contract, races included.
//! Projection offsets and claims, and the Postgres journal's fencing, are checked at the end.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use grains_storage::postgres::{PostgresJournal, PostgresMembershipTable, PostgresProjectionClaim};
use grains_storage::{
    EventJournal, EventSelector, MembershipEntry, MembershipTable, MemoryJournal, MemoryProjectionStore, NewEvent,
    SiloAddress, SiloStatus, Snapshot, StateKey, StorageError, StoredEvent,
};
use grains_tests::pg::TestDatabase;
use serde_json::json;

/// The journal under test, and the database that backs it (dropped after the test).
struct Journal {
    journal: Arc<dyn EventJournal>,
    _database: Option<TestDatabase>,
}

impl Journal {
    fn memory() -> Self {
        Journal { journal: Arc::new(MemoryJournal::new()), _database: None }
    }

    async fn postgres() -> Self {
        let database = TestDatabase::create().await;
        let pool = database.pool().await;
        Journal { journal: Arc::new(PostgresJournal::new(pool)), _database: Some(database) }
    }
}

/// Runs each named test body once per journal.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Journal::memory()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Journal::postgres().await).await;
                }
            )*
        }
    };
}

conformance!(
    a_stream_never_written_reads_empty,
    appends_chain_by_seq_and_read_back_in_order,
    an_append_at_a_stale_seq_is_a_conflict_and_appends_none_of_its_events,
    an_empty_append_appends_nothing,
    twenty_concurrent_appends_at_one_seq_have_exactly_one_winner,
    many_concurrent_appenders_each_land_every_event_once_in_seq_order,
    a_reader_following_positions_during_concurrent_appends_misses_nothing,
    read_all_selects_by_grain_type_and_by_tag,
    reads_page_by_limit,
    snapshots_keep_the_highest_seq,
    an_event_the_store_cannot_hold_fails_only_its_own_append_among_concurrent_appenders,
);

fn stream(grain_type: &str, key: &str) -> StateKey {
    StateKey::new(grain_type, format!("s:{key}"), "events")
}

fn event(n: u64) -> NewEvent {
    NewEvent { event_type: "Added".to_owned(), payload: json!({"n": n}), tags: Vec::new() }
}

fn tagged(n: u64, tags: &[&str]) -> NewEvent {
    NewEvent { tags: tags.iter().map(|t| (*t).to_owned()).collect(), ..event(n) }
}

fn seqs(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

async fn a_stream_never_written_reads_empty(j: Journal) {
    let s = stream("Cart", "nobody");
    assert!(j.journal.read_stream(&s, 0, 100).await.unwrap().is_empty());
    assert_eq!(j.journal.read_snapshot(&s).await.unwrap(), None);
    assert!(j.journal.read_all(&EventSelector::GrainType("Cart".into()), 0, 100).await.unwrap().is_empty());
}

async fn appends_chain_by_seq_and_read_back_in_order(j: Journal) {
    let s = stream("Cart", "alice");
    assert_eq!(j.journal.append(&s, 0, &[tagged(1, &["a"]), event(2)]).await.unwrap(), 2);
    assert_eq!(j.journal.append(&s, 2, &[event(3)]).await.unwrap(), 3);
    let events = j.journal.read_stream(&s, 0, 100).await.unwrap();
    assert_eq!(seqs(&events), vec![1, 2, 3]);
    assert_eq!(
        events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
        vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]
    );
    assert!(events.iter().all(|e| e.stream == s && e.event_type == "Added" && e.recorded_at_ms > 1_600_000_000_000));
    assert_eq!(events[0].tags, vec!["a".to_owned()]);
    assert!(events.windows(2).all(|w| w[0].position < w[1].position), "positions follow seq within a stream");
    assert_eq!(seqs(&j.journal.read_stream(&s, 1, 100).await.unwrap()), vec![2, 3]);
    // Another journal name of the same grain, and the same key of another grain type, are other streams.
    assert!(j.journal.read_stream(&StateKey::new("Cart", "s:alice", "other"), 0, 100).await.unwrap().is_empty());
    assert!(j.journal.read_stream(&stream("Player", "alice"), 0, 100).await.unwrap().is_empty());
}

async fn an_append_at_a_stale_seq_is_a_conflict_and_appends_none_of_its_events(j: Journal) {
    let s = stream("Cart", "stale");
    j.journal.append(&s, 0, &[event(1), event(2)]).await.unwrap();
    // A writer that saw only event 1 appends three events: none may land (event 2 exists, 3 and 4 do not).
    let stale = j.journal.append(&s, 1, &[event(20), event(30), event(40)]).await;
    match stale {
        Err(StorageError::Conflict { expected, actual, .. }) => {
            assert_eq!(expected.as_deref(), Some("1"));
            assert_eq!(actual.as_deref(), Some("2"), "the conflict says where the stream ends");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Ahead of the stream is a conflict too: no gaps.
    assert!(matches!(j.journal.append(&s, 5, &[event(6)]).await, Err(StorageError::Conflict { .. })));
    let events = j.journal.read_stream(&s, 0, 100).await.unwrap();
    assert_eq!(events.iter().map(|e| e.payload["n"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
}

async fn an_empty_append_appends_nothing(j: Journal) {
    let s = stream("Cart", "empty");
    assert_eq!(j.journal.append(&s, 0, &[]).await.unwrap(), 0);
    assert!(j.journal.read_stream(&s, 0, 10).await.unwrap().is_empty());
}

async fn twenty_concurrent_appends_at_one_seq_have_exactly_one_winner(j: Journal) {
    let s = stream("Cart", "race");
    j.journal.append(&s, 0, &[event(0)]).await.unwrap();
    let appends: Vec<_> = (1..=20)
        .map(|i| {
            let (journal, s) = (j.journal.clone(), s.clone());
            tokio::spawn(async move { (i, journal.append(&s, 1, &[event(i), event(i * 100)]).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for append in appends {
        match append.await.unwrap() {
            (i, Ok(3)) => winners.push(i),
            (_, Err(StorageError::Conflict { .. })) => {}
            (_, other) => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let w = winners[0];
    let events = j.journal.read_stream(&s, 0, 100).await.unwrap();
    assert_eq!(events.iter().map(|e| e.payload["n"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, w, w * 100]);
}

async fn many_concurrent_appenders_each_land_every_event_once_in_seq_order(j: Journal) {
    // 100 grains appending 10 times each, one or three events at a time, all at once.
    let appenders: Vec<_> = (0..100u64)
        .map(|g| {
            let journal = j.journal.clone();
            tokio::spawn(async move {
                let s = stream("Many", &g.to_string());
                let mut last = 0;
                for round in 0..10u64 {
                    let events: Vec<_> = (0..1 + 2 * (round % 2)).map(|k| event(g * 1000 + round * 10 + k)).collect();
                    last = journal.append(&s, last, &events).await.unwrap();
                }
                last
            })
        })
        .collect();
    for appender in appenders {
        assert_eq!(appender.await.unwrap(), 20);
    }
    let all = j.journal.read_all(&EventSelector::GrainType("Many".into()), 0, 10_000).await.unwrap();
    assert_eq!(all.len(), 2000);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position), "read_all is in position order");
    let mut per_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &all {
        per_stream.entry(e.stream.grain_key.clone()).or_default().push(e.seq);
    }
    assert_eq!(per_stream.len(), 100);
    for (key, seqs) in per_stream {
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "{key}: each stream's events in seq order, once each");
    }
}

async fn a_reader_following_positions_during_concurrent_appends_misses_nothing(j: Journal) {
    // A projection keeps one number: the last position it read. If an event could become visible behind a
    // position already read, this reader would skip it.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (journal, done) = (j.journal.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut offset = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                let batch = journal.read_all(&EventSelector::Tag("follow".into()), offset, 50).await.unwrap();
                if let Some(last) = batch.last() {
                    offset = last.position;
                }
                let empty = batch.is_empty();
                seen.extend(batch.into_iter().map(|e| (e.stream.grain_key, e.seq)));
                if finished && empty {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let appenders: Vec<_> = (0..40u64)
        .map(|g| {
            let journal = j.journal.clone();
            tokio::spawn(async move {
                let s = stream("Follow", &g.to_string());
                let mut last = 0;
                for n in 0..15 {
                    last = journal.append(&s, last, &[tagged(n, &["follow"])]).await.unwrap();
                }
            })
        })
        .collect();
    for appender in appenders {
        appender.await.unwrap();
    }
    done.store(true, Ordering::Release);
    let seen = reader.await.unwrap();
    let distinct: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(distinct.len(), seen.len(), "no event read twice");
    assert_eq!(seen.len(), 600, "the reader saw every event of the 40 × 15 appended");
}

async fn read_all_selects_by_grain_type_and_by_tag(j: Journal) {
    let cart = stream("Cart", "c1");
    let other_cart = stream("Cart", "c2");
    let account = stream("Account", "a1");
    j.journal.append(&cart, 0, &[tagged(1, &["shop"]), event(2)]).await.unwrap();
    j.journal.append(&account, 0, &[tagged(3, &["shop", "money"])]).await.unwrap();
    j.journal.append(&other_cart, 0, &[event(4)]).await.unwrap();
    let n = |events: Vec<StoredEvent>| events.iter().map(|e| e.payload["n"].as_u64().unwrap()).collect::<Vec<_>>();
    let carts = j.journal.read_all(&EventSelector::GrainType("Cart".into()), 0, 100).await.unwrap();
    assert_eq!(n(carts.clone()), vec![1, 2, 4]);
    let shop = j.journal.read_all(&EventSelector::Tag("shop".into()), 0, 100).await.unwrap();
    assert_eq!(n(shop.clone()), vec![1, 3]);
    assert_eq!(n(j.journal.read_all(&EventSelector::Tag("money".into()), 0, 100).await.unwrap()), vec![3]);
    assert!(j.journal.read_all(&EventSelector::Tag("none".into()), 0, 100).await.unwrap().is_empty());
    // After a position: only what follows it.
    assert_eq!(
        n(j.journal.read_all(&EventSelector::GrainType("Cart".into()), carts[1].position, 100).await.unwrap()),
        vec![4]
    );
    assert_eq!(
        n(j.journal.read_all(&EventSelector::Tag("shop".into()), shop[0].position, 100).await.unwrap()),
        vec![3]
    );
}

async fn reads_page_by_limit(j: Journal) {
    let s = stream("Paged", "p");
    let events: Vec<_> = (1..=25).map(event).collect();
    j.journal.append(&s, 0, &events).await.unwrap();
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = j.journal.read_stream(&s, after, 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().unwrap().seq;
        pages.push(page.len());
    }
    assert_eq!(pages, vec![10, 10, 5]);
    let page = j.journal.read_all(&EventSelector::GrainType("Paged".into()), 0, 7).await.unwrap();
    assert_eq!(seqs(&page), (1..=7).collect::<Vec<_>>());
}

async fn snapshots_keep_the_highest_seq(j: Journal) {
    let s = stream("Snap", "s");
    j.journal.save_snapshot(&s, &Snapshot { seq: 10, document: json!({"at": 10}) }).await.unwrap();
    j.journal.save_snapshot(&s, &Snapshot { seq: 20, document: json!({"at": 20}) }).await.unwrap();
    j.journal.save_snapshot(&s, &Snapshot { seq: 15, document: json!({"at": 15}) }).await.unwrap();
    assert_eq!(j.journal.read_snapshot(&s).await.unwrap(), Some(Snapshot { seq: 20, document: json!({"at": 20}) }));
    assert_eq!(j.journal.read_snapshot(&stream("Snap", "other")).await.unwrap(), None);
}

async fn an_event_the_store_cannot_hold_fails_only_its_own_append_among_concurrent_appenders(j: Journal) {
    // Postgres cannot hold U+0000 in a JSONB string; the in-memory journal holds any value.
    let refuses = j.journal.name() == "postgres";
    let bad = stream("Nul", "bad");
    let good: Vec<_> = (0..100u64)
        .map(|g| {
            let journal = j.journal.clone();
            tokio::spawn(async move { journal.append(&stream("Nul", &g.to_string()), 0, &[event(g), event(g)]).await })
        })
        .collect();
    let nul = NewEvent { payload: json!({"text": "before\u{0}after"}), ..event(0) };
    let refused = j.journal.append(&bad, 0, &[event(1), nul]).await;
    for append in good {
        assert_eq!(append.await.unwrap().expect("a good append beside a bad one lands"), 2);
    }
    if refuses {
        match refused {
            Err(StorageError::Rejected { key, .. }) => assert_eq!(key, bad.to_string()),
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert!(j.journal.read_stream(&bad, 0, 10).await.unwrap().is_empty(), "none of its events landed");
    } else {
        assert_eq!(refused.unwrap(), 2);
    }
}

// Projection offsets and claims.

#[tokio::test]
async fn memory_projection_claims_are_exclusive_and_offsets_checked() {
    let store = Arc::new(MemoryProjectionStore::new());
    let claim = store.try_claim("popular").expect("free");
    assert!(store.try_claim("popular").is_none());
    claim.commit(0, 7).unwrap();
    assert!(matches!(claim.commit(3, 9), Err(StorageError::Conflict { .. })));
    drop(claim);
    assert_eq!(store.try_claim("popular").expect("released").offset(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_projection_claims_are_exclusive_and_commit_the_offset_with_the_read_model() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    sqlx::query("CREATE TABLE model (n BIGINT NOT NULL)").execute(&pool).await.unwrap();
    let mut claim = PostgresProjectionClaim::try_claim(&pool, "model").await.unwrap().expect("free");
    assert!(PostgresProjectionClaim::try_claim(&pool, "model").await.unwrap().is_none(), "held by a session");
    assert!(PostgresProjectionClaim::try_claim(&pool, "another").await.unwrap().is_some());
    assert_eq!(claim.offset().await.unwrap(), 0);

    let mut unit = claim.begin().await.unwrap();
    sqlx::query("INSERT INTO model VALUES (1)").execute(unit.conn()).await.unwrap();
    unit.commit(0, 5).await.unwrap();
    // A batch that starts from a stale offset commits nothing, read model included.
    let mut unit = claim.begin().await.unwrap();
    sqlx::query("INSERT INTO model VALUES (2)").execute(unit.conn()).await.unwrap();
    assert!(matches!(unit.commit(0, 6).await, Err(StorageError::Conflict { .. })));
    // A batch dropped before its commit (a crash) leaves nothing either.
    let mut unit = claim.begin().await.unwrap();
    sqlx::query("INSERT INTO model VALUES (3)").execute(unit.conn()).await.unwrap();
    drop(unit);
    assert_eq!(claim.offset().await.unwrap(), 5);
    let rows: Vec<i64> = sqlx::query_scalar("SELECT n FROM model").fetch_all(&pool).await.unwrap();
    assert_eq!(rows, vec![1]);

    claim.release().await;
    let mut next = None;
    for _ in 0..50 {
        next = PostgresProjectionClaim::try_claim(&pool, "model").await.unwrap();
        if next.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(next.expect("released").offset().await.unwrap(), 5);
    pool.close().await;
}

// Fencing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_fenced_to_a_silo_declared_dead_appends_nothing() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    let table = PostgresMembershipTable::new(pool.clone(), "fencing");
    let me = SiloAddress { endpoint: "127.0.0.1:1".into(), epoch: 1 };
    let entry = MembershipEntry {
        silo: me.clone(),
        name: "silo-1".into(),
        status: SiloStatus::Active,
        gateway: None,
        started_at_ms: 1_700_000_000_000,
        heartbeat_at_ms: 1_700_000_000_000,
        suspicions: Vec::new(),
    };
    assert!(table.insert_row(&entry, 0).await.unwrap());
    let journal = PostgresJournal::fenced(pool.clone(), "fencing", me.clone());
    let s = stream("Cart", "fenced");
    assert_eq!(journal.append(&s, 0, &[event(1)]).await.unwrap(), 1, "alive: the append commits");

    let snapshot = table.read_all().await.unwrap();
    let row = snapshot.row(&me).unwrap().clone();
    let dead = MembershipEntry { status: SiloStatus::Dead, ..row.entry };
    assert!(table.update_row(&dead, &row.etag, snapshot.version).await.unwrap());
    let refused = journal.append(&s, 1, &[event(2)]).await;
    assert!(matches!(refused, Err(StorageError::Fenced { .. })), "{refused:?}");
    assert_eq!(seqs(&journal.read_stream(&s, 0, 10).await.unwrap()), vec![1], "reads are not fenced");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_journals_racing_at_one_seq_have_exactly_one_winner_each_round() {
    // Two silos' journals (two pools, two group-commit writers) over one database.
    let db = TestDatabase::create().await;
    let (a, b) = (PostgresJournal::new(db.pool().await), PostgresJournal::new(db.pool().await));
    let s = stream("Race", "shared");
    let mut last = 0;
    for round in 0..30u64 {
        let (two, one) = ([event(round), event(round)], [event(round)]);
        let (ra, rb) = tokio::join!(a.append(&s, last, &two), b.append(&s, last, &one));
        match (ra, rb) {
            (Ok(n), Err(StorageError::Conflict { .. })) | (Err(StorageError::Conflict { .. }), Ok(n)) => last = n,
            other => panic!("round {round}: expected one winner, got {other:?}"),
        }
    }
    let events = a.read_stream(&s, 0, 1000).await.unwrap();
    assert_eq!(seqs(&events), (1..=last).collect::<Vec<_>>());
}
