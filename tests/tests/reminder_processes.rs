//! A durable reminder across a `kill -9` of the silo that fired it: three silo processes with membership, grain
//! state and reminders in Postgres; a grain counts its 1 s reminder's ticks (and the missed ticks they report)
//! in its persistent state; the silo owning the reminder's ring range is killed; its successor picks the range
//! up and the reminder keeps firing, reporting what it missed as a count.
//!
//! The figures (detection, the gap in ticks the grain saw, the missed ticks reported) are printed: run with
//! `--nocapture`. Waits for an outcome stretch with `GRAINS_TEST_TIME_FACTOR` on a slow machine.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grains::GrainId;
use grains_silo::{Client, ClusterView};
use grains_storage::postgres::PostgresMembershipTable;
use grains_storage::{MembershipTable, SiloStatus};
use grains_tests::pg::TestDatabase;
use grains_tests::process::{SiloLauncher, SiloProcess};
use grains_tests::{Remindful, RemindfulState, scaled};

const SILO_BINARY: &str = env!("CARGO_BIN_EXE_grains-test-silo");

const PERIOD_MS: u64 = 1_000;

fn start_silo(db: &TestDatabase, cluster: &str) -> SiloProcess {
    SiloLauncher::new(SILO_BINARY)
        .args(["--port", "0", "--storage", "postgres", "--membership", "postgres"])
        .args(["--database-url", db.url(), "--cluster-id", cluster, "--failure-detection", "fast"])
        .args(["--log", "info", "--call-timeout", "5s"])
        .keep_log()
        .start()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn view(table: &PostgresMembershipTable) -> ClusterView {
    ClusterView::from_snapshot(&table.read_all().await.unwrap())
}

async fn wait_for(table: &PostgresMembershipTable, what: &str, done: impl Fn(&ClusterView) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let view = view(table).await;
        if done(&view) {
            return started.elapsed();
        }
        assert!(started.elapsed() < scaled(Duration::from_secs(30)), "{what}: {:#?}", view.rows());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The grain's stored counts, asking again while its activation moves (a call may fail meanwhile).
async fn stored(client: &Client, key: &str) -> RemindfulState {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        match client.grain::<Remindful>(key).stored().await {
            Ok(state) => return state,
            Err(error) => {
                assert!(Instant::now() < deadline, "the grain stays unreachable: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_second_reminder_keeps_firing_across_a_kill_9_of_the_silo_that_owned_it() {
    let db = TestDatabase::create().await;
    let cluster = "reminder-kill9";
    let silos: Vec<SiloProcess> = (0..3).map(|_| start_silo(&db, cluster)).collect();
    let table = PostgresMembershipTable::new(db.pool().await, cluster);
    wait_for(&table, "three active silos", |v| v.active().len() == 3).await;

    // The reminder's ring range belongs to one of the three; the client talks to the other two.
    let key = "heartbeat";
    let owner = view(&table).await.directory_owner(&GrainId::new("Remindful", key)).cloned().unwrap();
    let victim = silos.iter().position(|s| owner.endpoint.ends_with(&format!(":{}", s.port()))).unwrap();
    let others: Vec<String> = silos.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, s)| s.url()).collect();
    let client = Client::connect_cluster(&others, Default::default()).await.unwrap();

    let grain = client.grain::<Remindful>(key);
    let first_due = grain.remind("beat".into(), PERIOD_MS, PERIOD_MS).await.unwrap().unwrap();
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while stored(&client, key).await.ticks < 5 {
        assert!(Instant::now() < deadline, "the reminder fires: {:?}", stored(&client, key).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = stored(&client, key).await;
    assert_eq!(before.missed, 0, "nothing missed before the kill: {before:?}");

    let killed_at = unix_ms();
    silos[victim].signal("-KILL");
    let detected =
        wait_for(&table, "the killed silo declared dead", |v| v.status(&owner) == Some(SiloStatus::Dead)).await;

    // Ticks resume on the successor: at least five more, counted in the grain's persistent state.
    let deadline = Instant::now() + scaled(Duration::from_secs(60));
    let mut resumed_at = None;
    let after = loop {
        let state = stored(&client, key).await;
        if resumed_at.is_none() && state.last_delivered_ms > killed_at && state.ticks > before.ticks {
            resumed_at = Some(state.last_delivered_ms);
        }
        if state.ticks >= before.ticks + 5 {
            break state;
        }
        assert!(Instant::now() < deadline, "the reminder fires again after the kill: {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let resumed_after = Duration::from_millis(resumed_at.unwrap_or(after.last_delivered_ms) - killed_at);
    let gap = Duration::from_millis(after.longest_gap_ms);
    println!(
        "reminder failover, kill -9 of the silo owning a {PERIOD_MS} ms reminder: declared dead after {detected:?}; \
         first tick after the kill {resumed_after:?} after it (longest gap between ticks {gap:?}); {} ticks \
         reported missed ({} at most by one tick); {} ticks before the kill, {} after",
        after.missed,
        after.most_missed,
        before.ticks,
        after.ticks - before.ticks,
    );
    assert!(after.most_missed >= 1, "ticks fell due while no silo fired them, and were reported: {after:?}");
    assert!(
        after.most_missed <= 15 * grains_tests::time_factor().ceil() as u64,
        "a few periods missed, not more: {after:?}"
    );
    // Every period since the first due time is accounted for: delivered, or reported missed (a tick whose
    // progress the dead silo had not written yet may come twice).
    let periods = (after.last_due_ms - first_due) / PERIOD_MS + 1;
    let accounted = after.ticks + after.missed;
    assert!(accounted >= periods, "{accounted} ticks delivered or missed for {periods} periods: {after:?}");
    assert!(accounted <= periods + 3, "{accounted} ticks delivered or missed for {periods} periods: {after:?}");
}
