//! One conformance suite for every storage provider: each test body runs against the in-memory provider and
//! against Postgres (a fresh database per test), so both honour the same contract, races included.

use std::collections::HashSet;
use std::sync::Arc;

use grains_storage::postgres::{PostgresMembershipTable, PostgresReminderTable, PostgresStateStore};
use grains_storage::{
    GrainStateStore, MembershipEntry, MembershipTable, MemoryMembershipTable, MemoryReminderTable, MemoryStateStore,
    ReminderEntry, ReminderProgress, ReminderTable, RingRange, SiloAddress, SiloStatus, StateKey, StorageError,
    Suspicion,
};
use grains_tests::pg::TestDatabase;
use serde_json::json;

/// The providers under test, and the database that backs them (dropped after the test).
struct Providers {
    state: Arc<dyn GrainStateStore>,
    membership: Arc<dyn MembershipTable>,
    reminders: Arc<dyn ReminderTable>,
    _database: Option<TestDatabase>,
}

impl Providers {
    fn memory() -> Self {
        Providers {
            state: Arc::new(MemoryStateStore::new()),
            membership: Arc::new(MemoryMembershipTable::new()),
            reminders: Arc::new(MemoryReminderTable::new()),
            _database: None,
        }
    }

    async fn postgres() -> Self {
        let database = TestDatabase::create().await;
        let pool = database.pool().await;
        Providers {
            state: Arc::new(PostgresStateStore::new(pool.clone())),
            membership: Arc::new(PostgresMembershipTable::new(pool.clone(), "conformance")),
            reminders: Arc::new(PostgresReminderTable::new(pool)),
            _database: Some(database),
        }
    }
}

/// Runs each named test body once per provider.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Providers::memory()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Providers::postgres().await).await;
                }
            )*
        }
    };
}

conformance!(
    state_of_a_key_never_written_is_none,
    state_writes_chain_by_etag,
    state_write_with_a_stale_etag_is_a_conflict_and_changes_nothing,
    state_first_write_expecting_an_etag_is_a_conflict,
    state_second_first_write_is_a_conflict,
    state_clear_is_etag_checked,
    state_etags_are_not_reused_after_clear,
    state_documents_round_trip,
    state_twenty_concurrent_first_writes_have_exactly_one_winner,
    state_twenty_concurrent_updates_from_one_etag_have_exactly_one_winner,
    state_many_concurrent_writers_of_distinct_keys_all_land_with_distinct_etags,
    state_a_document_the_store_cannot_hold_fails_only_its_own_write_among_concurrent_writers,
    state_a_key_the_store_cannot_hold_fails_only_its_own_write_among_concurrent_writers,
    membership_empty_table_is_at_version_zero,
    membership_insert_bumps_the_version,
    membership_insert_at_a_stale_version_is_refused,
    membership_second_insert_of_one_silo_is_refused,
    membership_update_checks_etag_and_version,
    membership_heartbeat_does_not_bump_the_version,
    membership_twenty_concurrent_inserts_at_one_version_have_exactly_one_winner,
    membership_delete_all_empties_the_table,
    reminders_upsert_and_read_back,
    reminders_upsert_replaces_and_changes_the_etag,
    reminders_remove_is_etag_checked,
    reminders_read_range_handles_wrap_around,
    reminders_read_due_returns_what_is_due_in_the_ranges_by_due_time,
    reminders_a_reminder_due_in_60_days_keeps_its_due_time_and_stays_out_of_near_reads,
    reminders_advance_moves_the_next_tick_forward_only_for_its_definition,
    reminders_upsert_restarts_the_progress,
);

fn key(name: &str) -> StateKey {
    StateKey::new("Cart", name, "state")
}

async fn state_of_a_key_never_written_is_none(p: Providers) {
    assert_eq!(p.state.read(&key("nobody")).await.unwrap(), None);
}

async fn state_writes_chain_by_etag(p: Providers) {
    let k = key("chain");
    let e1 = p.state.write(&k, &json!({"n": 1}), None).await.unwrap();
    let e2 = p.state.write(&k, &json!({"n": 2}), Some(&e1)).await.unwrap();
    assert_ne!(e1, e2);
    let stored = p.state.read(&k).await.unwrap().unwrap();
    assert_eq!(stored.document, json!({"n": 2}));
    assert_eq!(stored.etag, e2);
}

async fn state_write_with_a_stale_etag_is_a_conflict_and_changes_nothing(p: Providers) {
    let k = key("stale");
    let e1 = p.state.write(&k, &json!(1), None).await.unwrap();
    let e2 = p.state.write(&k, &json!(2), Some(&e1)).await.unwrap();
    let refused = p.state.write(&k, &json!(3), Some(&e1)).await;
    assert!(
        matches!(&refused, Err(StorageError::Conflict { actual: Some(actual), .. }) if *actual == e2),
        "the conflict reports the stored etag: {refused:?}"
    );
    let stored = p.state.read(&k).await.unwrap().unwrap();
    assert_eq!((stored.document, stored.etag), (json!(2), e2));
}

async fn state_first_write_expecting_an_etag_is_a_conflict(p: Providers) {
    let k = key("phantom");
    let refused = p.state.write(&k, &json!(1), Some("12345")).await;
    assert!(matches!(refused, Err(StorageError::Conflict { actual: None, .. })), "no record: {refused:?}");
    assert_eq!(p.state.read(&k).await.unwrap(), None);
}

async fn state_second_first_write_is_a_conflict(p: Providers) {
    let k = key("twice");
    let first = p.state.write(&k, &json!("first"), None).await.unwrap();
    let refused = p.state.write(&k, &json!("second"), None).await;
    assert!(
        matches!(&refused, Err(StorageError::Conflict { actual: Some(actual), .. }) if *actual == first),
        "the conflict reports the stored etag: {refused:?}"
    );
    assert_eq!(p.state.read(&k).await.unwrap().unwrap().document, json!("first"));
}

async fn state_clear_is_etag_checked(p: Providers) {
    let k = key("clear");
    let etag = p.state.write(&k, &json!(1), None).await.unwrap();
    for expected in [Some("999999"), None] {
        let refused = p.state.clear(&k, expected).await;
        assert!(
            matches!(&refused, Err(StorageError::Conflict { actual: Some(actual), .. }) if *actual == etag),
            "the conflict reports the stored etag: {refused:?}"
        );
    }
    p.state.clear(&k, Some(&etag)).await.unwrap();
    assert_eq!(p.state.read(&k).await.unwrap(), None);
    p.state.clear(&k, None).await.unwrap();
}

async fn state_etags_are_not_reused_after_clear(p: Providers) {
    let k = key("aba");
    let first = p.state.write(&k, &json!(1), None).await.unwrap();
    p.state.clear(&k, Some(&first)).await.unwrap();
    let again = p.state.write(&k, &json!(2), None).await.unwrap();
    assert_ne!(first, again, "an activation holding the old etag must not match the new record");
    assert!(matches!(p.state.write(&k, &json!(3), Some(&first)).await, Err(StorageError::Conflict { .. })));
}

async fn state_documents_round_trip(p: Providers) {
    let k = StateKey::new("Player", "42+eu", "inventory");
    let doc = json!({"items": {"sword": 1, "shield": 2}, "tags": ["a", "b"], "gold": 12.5, "nested": {"x": null}});
    p.state.write(&k, &doc, None).await.unwrap();
    assert_eq!(p.state.read(&k).await.unwrap().unwrap().document, doc);
    // Other state names of the same grain are separate records.
    assert_eq!(p.state.read(&StateKey::new("Player", "42+eu", "other")).await.unwrap(), None);
}

async fn state_twenty_concurrent_first_writes_have_exactly_one_winner(p: Providers) {
    let k = key("race-insert");
    let writes: Vec<_> = (0..20)
        .map(|i| {
            let store = p.state.clone();
            let k = k.clone();
            tokio::spawn(async move { (i, store.write(&k, &json!({"writer": i}), None).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for write in writes {
        let (i, result) = write.await.unwrap();
        match result {
            Ok(_) => winners.push(i),
            Err(StorageError::Conflict { .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(p.state.read(&k).await.unwrap().unwrap().document, json!({"writer": winners[0]}));
}

async fn state_twenty_concurrent_updates_from_one_etag_have_exactly_one_winner(p: Providers) {
    let k = key("race-update");
    let etag = p.state.write(&k, &json!(0), None).await.unwrap();
    let writes: Vec<_> = (1..=20)
        .map(|i| {
            let store = p.state.clone();
            let (k, etag) = (k.clone(), etag.clone());
            tokio::spawn(async move { (i, store.write(&k, &json!(i), Some(&etag)).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for write in writes {
        let (i, result) = write.await.unwrap();
        if result.is_ok() {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(p.state.read(&k).await.unwrap().unwrap().document, json!(winners[0]));
}

async fn state_many_concurrent_writers_of_distinct_keys_all_land_with_distinct_etags(p: Providers) {
    // Many grains writing at once (the Postgres provider commits them in shared transactions).
    let writes: Vec<_> = (0..200)
        .map(|i| {
            let store = p.state.clone();
            tokio::spawn(async move {
                let k = key(&format!("many-{i}"));
                let first = store.write(&k, &json!({"n": i, "round": 1}), None).await.unwrap();
                let second = store.write(&k, &json!({"n": i, "round": 2}), Some(&first)).await.unwrap();
                let stale = store.write(&k, &json!({"n": i, "round": 3}), Some(&first)).await;
                assert!(matches!(stale, Err(StorageError::Conflict { .. })), "{stale:?}");
                (first, second)
            })
        })
        .collect();
    let mut etags = HashSet::new();
    for (i, write) in writes.into_iter().enumerate() {
        let (first, second) = write.await.unwrap();
        assert!(etags.insert(first) && etags.insert(second.clone()), "etags are never shared");
        let stored = p.state.read(&key(&format!("many-{i}"))).await.unwrap().unwrap();
        assert_eq!((stored.document, stored.etag), (json!({"n": i, "round": 2}), second));
    }
}

/// Writes 200 good keys beside a write of `bad` twice, all at once: first writes, then etag-checked updates
/// (of `bad` with its etag if its first write landed, else with a made-up one). Checks that every good write
/// landed and reads back; returns what became of the two writes of `bad`.
async fn write_beside_many(
    p: &Providers,
    label: &str,
    bad: &StateKey,
    bad_document: serde_json::Value,
) -> [Result<String, StorageError>; 2] {
    let good_key = |i: usize| key(&format!("{label}-{i}"));
    let first_writes: Vec<_> = (0..200)
        .map(|i| {
            let (store, k) = (p.state.clone(), good_key(i));
            tokio::spawn(async move { store.write(&k, &json!({"n": i}), None).await })
        })
        .collect();
    let bad_first = {
        let (store, bad, document) = (p.state.clone(), bad.clone(), bad_document.clone());
        tokio::spawn(async move { store.write(&bad, &document, None).await })
    };
    let mut etags = Vec::new();
    for write in first_writes {
        etags.push(write.await.unwrap().expect("a good first write beside a bad one succeeds"));
    }
    let bad_first = bad_first.await.unwrap();

    let bad_etag = bad_first.clone().unwrap_or_else(|_| "1".to_owned());
    let updates: Vec<_> = etags
        .iter()
        .enumerate()
        .map(|(i, etag)| {
            let (store, k, etag) = (p.state.clone(), good_key(i), etag.clone());
            tokio::spawn(async move { store.write(&k, &json!({"n": i, "round": 2}), Some(&etag)).await })
        })
        .collect();
    let bad_update = {
        let (store, bad) = (p.state.clone(), bad.clone());
        tokio::spawn(async move { store.write(&bad, &bad_document, Some(&bad_etag)).await })
    };
    for (i, update) in updates.into_iter().enumerate() {
        let etag = update.await.unwrap().expect("a good update beside a bad one succeeds");
        let stored = p.state.read(&good_key(i)).await.unwrap().expect("the good write is stored");
        assert_eq!((stored.document, stored.etag), (json!({"n": i, "round": 2}), etag));
    }
    [bad_first, bad_update.await.unwrap()]
}

/// Whether the store refuses what Postgres cannot hold: U+0000 in a JSONB string or in a key, and a key
/// longer than its primary-key index allows. The in-memory store holds any string and any `serde_json::Value`,
/// so it accepts these; apart from that, both providers behave the same below.
fn refuses_what_postgres_cannot_hold(store: &dyn GrainStateStore) -> bool {
    store.name() == "postgres"
}

fn assert_rejected(result: &Result<String, StorageError>, bad: &StateKey) {
    match result {
        Err(StorageError::Rejected { key, reason }) => {
            assert_eq!(key, &bad.to_string(), "the rejection names the refused record");
            assert!(!reason.is_empty());
        }
        other => panic!("expected Rejected (not Unavailable: retrying cannot help), got {other:?}"),
    }
}

async fn state_a_document_the_store_cannot_hold_fails_only_its_own_write_among_concurrent_writers(p: Providers) {
    let bad = key("nul-document");
    let [first, update] = write_beside_many(&p, "beside-document", &bad, json!({"text": "before\u{0}after"})).await;
    if refuses_what_postgres_cannot_hold(&*p.state) {
        assert_rejected(&first, &bad);
        assert_rejected(&update, &bad);
        assert_eq!(p.state.read(&bad).await.unwrap(), None);
    } else {
        assert!(first.is_ok() && update.is_ok(), "{first:?} {update:?}");
    }
}

async fn state_a_key_the_store_cannot_hold_fails_only_its_own_write_among_concurrent_writers(p: Providers) {
    let with_nul = key("nul\u{0}key");
    let [first, update] = write_beside_many(&p, "beside-nul-key", &with_nul, json!({"n": 1})).await;
    if refuses_what_postgres_cannot_hold(&*p.state) {
        assert_rejected(&first, &with_nul);
        assert_rejected(&update, &with_nul);
        assert_rejected(&p.state.read(&with_nul).await.map(|_| String::new()), &with_nul);
    } else {
        assert!(first.is_ok() && update.is_ok(), "{first:?} {update:?}");
    }

    // Longer than the primary-key index holds, and not compressible below it: hex of a pseudo-random sequence.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let long = key(&(0..1_000)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            format!("{x:016x}")
        })
        .collect::<String>());
    let [first, update] = write_beside_many(&p, "beside-long-key", &long, json!({"n": 2})).await;
    if refuses_what_postgres_cannot_hold(&*p.state) {
        assert_rejected(&first, &long);
        // Nothing to update: no row has the key, so the etag check fails before any index entry is formed.
        assert!(matches!(update, Err(StorageError::Conflict { .. })), "{update:?}");
    } else {
        assert!(first.is_ok() && update.is_ok(), "{first:?} {update:?}");
    }
}

fn silo(port: u16, epoch: i64) -> MembershipEntry {
    MembershipEntry {
        silo: SiloAddress { endpoint: format!("127.0.0.1:{port}"), epoch },
        name: format!("silo-{port}"),
        status: SiloStatus::Joining,
        gateway: Some(format!("127.0.0.1:{}", port + 1000)),
        started_at_ms: 1_700_000_000_000 + epoch,
        heartbeat_at_ms: 1_700_000_000_000 + epoch,
        suspicions: Vec::new(),
    }
}

async fn membership_empty_table_is_at_version_zero(p: Providers) {
    let snapshot = p.membership.read_all().await.unwrap();
    assert_eq!(snapshot.version, 0);
    assert!(snapshot.rows.is_empty());
}

async fn membership_insert_bumps_the_version(p: Providers) {
    assert!(p.membership.insert_row(&silo(1, 1), 0).await.unwrap());
    assert!(p.membership.insert_row(&silo(2, 1), 1).await.unwrap());
    let snapshot = p.membership.read_all().await.unwrap();
    assert_eq!(snapshot.version, 2);
    assert_eq!(snapshot.rows.len(), 2);
    assert_eq!(snapshot.row(&silo(1, 1).silo).unwrap().entry, silo(1, 1));
}

async fn membership_insert_at_a_stale_version_is_refused(p: Providers) {
    assert!(p.membership.insert_row(&silo(1, 1), 0).await.unwrap());
    assert!(!p.membership.insert_row(&silo(2, 1), 0).await.unwrap());
    let snapshot = p.membership.read_all().await.unwrap();
    assert_eq!((snapshot.version, snapshot.rows.len()), (1, 1));
}

async fn membership_second_insert_of_one_silo_is_refused(p: Providers) {
    assert!(p.membership.insert_row(&silo(1, 1), 0).await.unwrap());
    assert!(!p.membership.insert_row(&silo(1, 1), 1).await.unwrap());
    assert_eq!(p.membership.read_all().await.unwrap().version, 1, "a refused insert does not bump the version");
    // The same endpoint with a new epoch is a new incarnation.
    assert!(p.membership.insert_row(&silo(1, 2), 1).await.unwrap());
}

async fn membership_update_checks_etag_and_version(p: Providers) {
    assert!(p.membership.insert_row(&silo(1, 1), 0).await.unwrap());
    let snapshot = p.membership.read_all().await.unwrap();
    let row = snapshot.row(&silo(1, 1).silo).unwrap().clone();
    let mut active = row.entry.clone();
    active.status = SiloStatus::Active;
    active.suspicions.push(Suspicion { by: silo(2, 1).silo, at_ms: 1_700_000_000_500 });

    assert!(!p.membership.update_row(&active, "424242", snapshot.version).await.unwrap(), "stale etag");
    assert!(!p.membership.update_row(&active, &row.etag, snapshot.version + 7).await.unwrap(), "stale version");
    assert!(p.membership.update_row(&active, &row.etag, snapshot.version).await.unwrap());

    let after = p.membership.read_all().await.unwrap();
    assert_eq!(after.version, snapshot.version + 1);
    let updated = after.row(&active.silo).unwrap();
    assert_eq!(updated.entry, active);
    assert_ne!(updated.etag, row.etag);
    assert!(!p.membership.update_row(&active, &row.etag, after.version).await.unwrap(), "the old etag is spent");
}

async fn membership_heartbeat_does_not_bump_the_version(p: Providers) {
    assert!(p.membership.insert_row(&silo(1, 1), 0).await.unwrap());
    p.membership.heartbeat(&silo(1, 1).silo, 1_800_000_000_123).await.unwrap();
    let snapshot = p.membership.read_all().await.unwrap();
    assert_eq!(snapshot.version, 1);
    assert_eq!(snapshot.rows[0].entry.heartbeat_at_ms, 1_800_000_000_123);
}

async fn membership_twenty_concurrent_inserts_at_one_version_have_exactly_one_winner(p: Providers) {
    let inserts: Vec<_> = (0..20u16)
        .map(|i| {
            let table = p.membership.clone();
            tokio::spawn(async move { table.insert_row(&silo(100 + i, 1), 0).await })
        })
        .collect();
    let mut wins = 0;
    for insert in inserts {
        if insert.await.unwrap().unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    let snapshot = p.membership.read_all().await.unwrap();
    assert_eq!((snapshot.version, snapshot.rows.len()), (1, 1));
}

async fn membership_delete_all_empties_the_table(p: Providers) {
    assert!(p.membership.insert_row(&silo(1, 1), 0).await.unwrap());
    p.membership.delete_all().await.unwrap();
    assert_eq!(p.membership.read_all().await.unwrap(), Default::default());
}

fn reminder(key: &str, name: &str, hash: u32) -> ReminderEntry {
    ReminderEntry {
        grain_type: "Cart".into(),
        grain_key: key.into(),
        name: name.into(),
        grain_hash: hash,
        start_at_ms: 1_700_000_000_000,
        period_ms: 60_000,
    }
}

async fn reminders_upsert_and_read_back(p: Providers) {
    let r = reminder("alice", "expire", 7);
    let etag = p.reminders.upsert(&r).await.unwrap();
    let row = p.reminders.read_row("Cart", "alice", "expire").await.unwrap().unwrap();
    assert_eq!((row.entry, row.etag), (r.clone(), etag));
    p.reminders.upsert(&reminder("alice", "nag", 7)).await.unwrap();
    p.reminders.upsert(&reminder("bob", "expire", 9)).await.unwrap();
    let names: Vec<_> =
        p.reminders.read_grain("Cart", "alice").await.unwrap().into_iter().map(|r| r.entry.name).collect();
    assert_eq!(names, vec!["expire", "nag"]);
    assert_eq!(p.reminders.read_row("Cart", "carol", "expire").await.unwrap(), None);
}

async fn reminders_upsert_replaces_and_changes_the_etag(p: Providers) {
    let first = p.reminders.upsert(&reminder("alice", "expire", 7)).await.unwrap();
    let mut changed = reminder("alice", "expire", 7);
    changed.period_ms = 5_000;
    let second = p.reminders.upsert(&changed).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(p.reminders.read_row("Cart", "alice", "expire").await.unwrap().unwrap().entry.period_ms, 5_000);
}

async fn reminders_remove_is_etag_checked(p: Providers) {
    let etag = p.reminders.upsert(&reminder("alice", "expire", 7)).await.unwrap();
    assert!(!p.reminders.remove("Cart", "alice", "expire", "31337").await.unwrap());
    assert!(p.reminders.remove("Cart", "alice", "expire", &etag).await.unwrap());
    assert!(!p.reminders.remove("Cart", "alice", "expire", &etag).await.unwrap());
    assert_eq!(p.reminders.read_row("Cart", "alice", "expire").await.unwrap(), None);
}

async fn reminders_read_range_handles_wrap_around(p: Providers) {
    for (key, hash) in [("a", 10u32), ("b", 1_000), ("c", 4_000_000_000), ("d", u32::MAX)] {
        p.reminders.upsert(&reminder(key, "r", hash)).await.unwrap();
    }
    let keys = |rows: Vec<grains_storage::ReminderRow>| -> HashSet<String> {
        rows.into_iter().map(|r| r.entry.grain_key).collect()
    };
    let set = |ks: &[&str]| -> HashSet<String> { ks.iter().map(|k| k.to_string()).collect() };
    assert_eq!(keys(p.reminders.read_range(10, 4_000_000_000).await.unwrap()), set(&["b", "c"]));
    assert_eq!(keys(p.reminders.read_range(4_000_000_000, 10).await.unwrap()), set(&["d", "a"]));
    assert_eq!(keys(p.reminders.read_range(5, 5).await.unwrap()), set(&["a", "b", "c", "d"]));
}

fn due_at(key: &str, hash: u32, due_ms: i64) -> ReminderEntry {
    ReminderEntry { start_at_ms: due_ms, ..reminder(key, "r", hash) }
}

fn progress(key: &str, etag: &str, next_due_ms: i64) -> ReminderProgress {
    ReminderProgress {
        grain_type: "Cart".into(),
        grain_key: key.into(),
        name: "r".into(),
        etag: etag.into(),
        next_due_ms,
    }
}

async fn reminders_read_due_returns_what_is_due_in_the_ranges_by_due_time(p: Providers) {
    let t = 1_700_000_000_000;
    for (key, hash, due) in [
        ("a", 10u32, t + 30),
        ("b", 1_000, t + 10),
        ("c", 4_000_000_000, t + 20),
        ("d", u32::MAX, t),
        ("late", 1_500, t + 1_000_000),
        ("elsewhere", 2_000_000_000, t),
    ] {
        p.reminders.upsert(&due_at(key, hash, due)).await.unwrap();
    }
    let keys = |rows: Vec<grains_storage::ReminderRow>| -> Vec<String> {
        rows.into_iter().map(|r| r.entry.grain_key).collect()
    };
    // (3_000_000_000, 2_000] wraps around zero; (500, 1_000] is a second range.
    let ranges = [RingRange::new(3_000_000_000, 2_000), RingRange::new(500, 1_000)];
    assert_eq!(keys(p.reminders.read_due(&ranges, t + 100).await.unwrap()), ["d", "b", "c", "a"], "by due time");
    assert_eq!(keys(p.reminders.read_due(&ranges, t + 15).await.unwrap()), ["d", "b"], "due by then only");
    let all = keys(p.reminders.read_due(&ranges, t + 2_000_000).await.unwrap());
    assert_eq!(all, ["d", "b", "c", "a", "late"]);
    let whole = [RingRange::new(7, 7)];
    assert_eq!(p.reminders.read_due(&whole, t).await.unwrap().len(), 2, "the whole ring: d and elsewhere");
    let overlapping = [RingRange::new(0, 2_000), RingRange::new(5, 1_000)];
    assert_eq!(keys(p.reminders.read_due(&overlapping, t + 100).await.unwrap()), ["b", "a"], "each row once");
    assert!(p.reminders.read_due(&[], t + 100).await.unwrap().is_empty());
}

async fn reminders_a_reminder_due_in_60_days_keeps_its_due_time_and_stays_out_of_near_reads(p: Providers) {
    let now = 1_700_000_000_123;
    let sixty_days = 60 * 86_400_000;
    let entry = ReminderEntry { period_ms: 86_400_000, ..due_at("far", 42, now + sixty_days) };
    p.reminders.upsert(&entry).await.unwrap();
    let row = p.reminders.read_row("Cart", "far", "r").await.unwrap().unwrap();
    assert_eq!((row.entry.start_at_ms, row.next_due_ms), (now + sixty_days, now + sixty_days), "to the millisecond");
    let whole = [RingRange::new(0, 0)];
    assert!(p.reminders.read_due(&whole, now + 60_000).await.unwrap().is_empty(), "not due within a minute");
    assert_eq!(p.reminders.read_due(&whole, now + sixty_days).await.unwrap().len(), 1);
}

async fn reminders_advance_moves_the_next_tick_forward_only_for_its_definition(p: Providers) {
    let t = 1_700_000_000_000;
    let a = p.reminders.upsert(&due_at("a", 1, t)).await.unwrap();
    let b = p.reminders.upsert(&due_at("b", 2, t)).await.unwrap();
    let next_due = |key: &'static str| {
        let reminders = p.reminders.clone();
        async move { reminders.read_row("Cart", key, "r").await.unwrap().unwrap().next_due_ms }
    };
    // One batch: a twice (the later wins), b once.
    let batch = [progress("a", &a, t + 120_000), progress("a", &a, t + 60_000), progress("b", &b, t + 60_000)];
    p.reminders.advance(&batch).await.unwrap();
    assert_eq!((next_due("a").await, next_due("b").await), (t + 120_000, t + 60_000));
    p.reminders.advance(&[progress("a", &a, t + 60_000)]).await.unwrap();
    assert_eq!(next_due("a").await, t + 120_000, "progress never goes back");
    p.reminders.advance(&[progress("a", "31337", t + 600_000), progress("gone", &a, t)]).await.unwrap();
    assert_eq!(next_due("a").await, t + 120_000, "another definition's progress does not apply");
    let row = p.reminders.read_row("Cart", "a", "r").await.unwrap().unwrap();
    assert_eq!(row.etag, a, "progress leaves the etag alone");
    assert!(
        p.reminders
            .read_due(&[RingRange::new(0, 0)], t + 100_000)
            .await
            .unwrap()
            .iter()
            .all(|r| r.entry.grain_key == "b")
    );
    p.reminders.advance(&[]).await.unwrap();
}

async fn reminders_upsert_restarts_the_progress(p: Providers) {
    let t = 1_700_000_000_000;
    let first = p.reminders.upsert(&due_at("a", 1, t)).await.unwrap();
    p.reminders.advance(&[progress("a", &first, t + 600_000)]).await.unwrap();
    let second = p.reminders.upsert(&due_at("a", 1, t + 5_000)).await.unwrap();
    let row = p.reminders.read_row("Cart", "a", "r").await.unwrap().unwrap();
    assert_eq!((row.etag, row.next_due_ms), (second, t + 5_000), "registered again: due at its new start");
    p.reminders.advance(&[progress("a", &first, t + 900_000)]).await.unwrap();
    assert_eq!(p.reminders.read_row("Cart", "a", "r").await.unwrap().unwrap().next_due_ms, t + 5_000);
}
