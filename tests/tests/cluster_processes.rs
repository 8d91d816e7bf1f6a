//! Silos as separate OS processes, with membership and grain state in Postgres: kill -9 under load, restart,
//! graceful stop, a frozen (SIGSTOP) silo that must stop itself once declared dead, a silo joining under load,
//! two silos cut apart by the network but not from Postgres, and a client that must route around a frozen
//! gateway.
//!
//! What they check is the cluster's promise while membership changes: one activation per grain at any
//! instant, and no acknowledged write lost. So the load is shaped to break it: several workers call the same
//! counter at once (a second activation, or a retried call applied twice, shows in the values acknowledged);
//! every acknowledged value is kept and checked against what Postgres holds; and duplicate activations are
//! sampled on every live silo *during* the load, not only once the cluster has settled.
//!
//! The figures are printed (run with `--nocapture` to see them); the assertions are about correctness, never
//! about speed. Waits for an outcome stretch with `GRAINS_TEST_TIME_FACTOR` on a slow machine.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grains::{CallError, GrainId, StorageError};
use grains_silo::{Client, ClientConfig, ClusterCredentials};
use grains_storage::postgres::PostgresMembershipTable;
use grains_storage::{MembershipTable, SiloStatus};
use grains_tests::netns::IsolatedNetwork;
use grains_tests::pg::TestDatabase;
use grains_tests::process::{SiloLauncher, SiloProcess};
use grains_tests::{Counter, scaled};

const KEYS: usize = 1000;
const WORKERS: usize = 128;
/// Workers that call each key. They walk their keys in the same order from the same start, so calls on one
/// counter overlap: two activations of it, or one call applied twice, would show in the values acknowledged.
const WRITERS_PER_KEY: usize = 4;
/// 100 ms slots of the load's timeline: ten minutes.
const TIMELINE_SLOTS: usize = 6_000;
/// How often the sampler asks every live silo for its activations.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// These tests each run several silo processes under load with fast failure detection; run side by side on a
/// small machine they would starve each other into false suspicions, so they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SILO_BINARY: &str = env!("CARGO_BIN_EXE_grains-test-silo");

/// A silo process of `cluster` on 127.0.0.1 with the named failure-detection profile (`fast` or
/// `production`), membership and state in `db`.
fn start_silo(db: &TestDatabase, cluster: &str, port: u16, failure_detection: &str) -> SiloProcess {
    SiloLauncher::new(SILO_BINARY)
        .args(["--port", &port.to_string(), "--storage", "postgres", "--membership", "postgres"])
        .args(["--database-url", db.url(), "--cluster-id", cluster, "--failure-detection", failure_detection])
        .args(["--log", "info", "--call-timeout", "5s"])
        .keep_log()
        .start()
}

async fn membership(db: &TestDatabase, cluster: &str) -> PostgresMembershipTable {
    PostgresMembershipTable::new(db.pool().await, cluster)
}

/// Starts `n` silo processes of `cluster` and waits until all are active.
async fn start_cluster(
    db: &TestDatabase,
    cluster: &str,
    n: usize,
    failure_detection: &str,
) -> (Vec<SiloProcess>, PostgresMembershipTable) {
    let silos = (0..n).map(|_| start_silo(db, cluster, 0, failure_detection)).collect();
    let table = membership(db, cluster).await;
    wait_for_active(&table, n).await;
    (silos, table)
}

async fn wait_for_active(table: &PostgresMembershipTable, n: usize) {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        let snapshot = table.read_all().await.unwrap();
        let active = snapshot.rows.iter().filter(|r| r.entry.status == SiloStatus::Active).count();
        if active == n {
            return;
        }
        assert!(Instant::now() < deadline, "{active} active silos, expected {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the silo listening on `port` is Dead in the table; returns how long that took.
async fn wait_for_dead(table: &PostgresMembershipTable, port: u16, what: &str) -> Duration {
    let started = Instant::now();
    let suffix = format!(":{port}");
    loop {
        let snapshot = table.read_all().await.unwrap();
        if snapshot.rows.iter().any(|r| r.entry.silo.endpoint.ends_with(&suffix) && r.entry.status == SiloStatus::Dead)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < scaled(Duration::from_secs(30)),
            "{what} was never declared dead: {:#?}",
            snapshot.rows.iter().map(|r| &r.entry).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What callers were told about one counter.
#[derive(Debug, Default)]
struct KeyLedger {
    /// Every value an increment acknowledged (each is the counter after that increment).
    acked: Vec<u64>,
    /// Increments whose outcome the caller cannot know (the call failed in flight, or its write failed).
    unknown: u64,
}

/// What the load was told, key by key, to be checked against what Postgres holds.
#[derive(Debug)]
struct Ledger {
    keys: Vec<String>,
    entries: Vec<Mutex<KeyLedger>>,
    /// Writes refused by the etag check: another activation wrote the state since this one read it.
    conflicts: AtomicU64,
    /// Writes refused because the writing silo is no longer alive in the membership table (nothing applied).
    fenced: AtomicU64,
}

impl Ledger {
    fn new(keys: Vec<String>) -> Self {
        let entries = keys.iter().map(|_| Mutex::default()).collect();
        Ledger { keys, entries, conflicts: AtomicU64::new(0), fenced: AtomicU64::new(0) }
    }

    fn acknowledged(&self, key: usize, value: u64) {
        self.entries[key].lock().unwrap().acked.push(value);
    }

    fn unknown(&self, key: usize) {
        self.entries[key].lock().unwrap().unknown += 1;
    }

    /// Compares what was acknowledged with the counters stored in `db`.
    async fn verdict(&self, db: &TestDatabase) -> Verdict {
        let stored = db.counter_values().await;
        let mut verdict = Verdict::default();
        for (key, entry) in self.keys.iter().zip(&self.entries) {
            let entry = entry.lock().unwrap();
            let stored = stored.get(key).copied().unwrap_or(0);
            let distinct: BTreeSet<u64> = entry.acked.iter().copied().collect();
            let acked = entry.acked.len() as u64;
            let lost = distinct.range(stored + 1..).count() as u64;
            let twice = acked - distinct.len() as u64;
            // Increments stored that no caller was told of, beyond the calls whose outcome is unknown.
            let unexplained = stored as i64 - distinct.len() as i64 - entry.unknown as i64;
            verdict.acknowledged += acked;
            verdict.unknown += entry.unknown;
            verdict.stored_minus_acknowledged += stored as i64 - acked as i64;
            verdict.lost += lost;
            verdict.acknowledged_twice += twice;
            verdict.applied_unasked += unexplained.max(0) as u64;
            if (lost > 0 || twice > 0 || unexplained > 0) && verdict.examples.len() < 5 {
                let highest = distinct.last().copied().unwrap_or(0);
                verdict.examples.push(format!(
                    "{key}: stored {stored}, {acked} acknowledged (highest {highest}, {} distinct), {} unknown",
                    distinct.len(),
                    entry.unknown
                ));
            }
        }
        verdict.conflicts = self.conflicts.load(Ordering::Relaxed);
        verdict.fenced = self.fenced.load(Ordering::Relaxed);
        verdict
    }
}

/// Acknowledged increments against stored counters, summed over the keys.
#[derive(Debug, Default)]
struct Verdict {
    acknowledged: u64,
    unknown: u64,
    /// Signed: negative means writes were lost; positive up to `unknown` is calls that failed after applying.
    stored_minus_acknowledged: i64,
    /// Acknowledged values above what is stored: acknowledged writes lost.
    lost: u64,
    /// Values acknowledged more than once: two increments applied to the same stored value.
    acknowledged_twice: u64,
    /// Increments stored beyond those acknowledged and those of unknown outcome: a call applied twice.
    applied_unasked: u64,
    conflicts: u64,
    /// Writes refused by fencing: known not applied, so not among the unknown.
    fenced: u64,
    examples: Vec<String>,
}

impl Verdict {
    fn summary(&self) -> String {
        format!(
            "{} increments acknowledged, {} of unknown outcome, stored - acknowledged = {:+}; {} acknowledged lost, \
             {} acknowledged twice, {} applied beyond the unknown, {} etag conflicts, {} writes fenced",
            self.acknowledged,
            self.unknown,
            self.stored_minus_acknowledged,
            self.lost,
            self.acknowledged_twice,
            self.applied_unasked,
            self.conflicts,
            self.fenced
        )
    }

    fn assert_nothing_lost_or_doubled(&self) {
        assert!(
            self.lost == 0 && self.acknowledged_twice == 0 && self.applied_unasked == 0 && self.conflicts == 0,
            "{}; e.g. {:?}",
            self.summary(),
            self.examples
        );
    }
}

/// Closed-loop load: groups of workers increment the same counters, and the ledger records what each call
/// was told.
struct Load {
    state: Arc<LoadState>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// What the workers of one load share.
struct LoadState {
    ledger: Ledger,
    /// Per key, when it was last acknowledged (ms since `epoch`, plus one; 0: never).
    last_ok_ms: Vec<AtomicU64>,
    /// Acknowledgements per 100 ms since `epoch` (the last slot takes everything past the end).
    timeline: Vec<AtomicU64>,
    ok: AtomicU64,
    errors: Mutex<Vec<LoadError>>,
    stop: AtomicBool,
    epoch: Instant,
}

impl Load {
    fn start(client: &Client) -> Self {
        Self::start_on(client, (0..KEYS).map(|key| format!("k-{key}")).collect())
    }

    /// Load on the counters named `keys`.
    fn start_on(client: &Client, keys: Vec<String>) -> Self {
        let state = Arc::new(LoadState {
            last_ok_ms: keys.iter().map(|_| AtomicU64::new(0)).collect(),
            ledger: Ledger::new(keys),
            timeline: (0..TIMELINE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            ok: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
        });
        let groups = WORKERS / WRITERS_PER_KEY;
        let workers = (0..WORKERS)
            .map(|w| tokio::spawn(Self::worker(state.clone(), client.clone(), w % groups, groups)))
            .collect();
        Load { state, workers }
    }

    /// A worker of `group`: calls keys `group`, `group + groups`, … round-robin, like every worker of its group.
    async fn worker(state: Arc<LoadState>, client: Client, group: usize, groups: usize) {
        let ledger = &state.ledger;
        let mine: Vec<usize> = (group..ledger.keys.len()).step_by(groups).collect();
        let mut i = 0;
        while !state.stop.load(Ordering::Relaxed) && !mine.is_empty() {
            let key = mine[i % mine.len()];
            i += 1;
            let name = &ledger.keys[key];
            match client.grain::<Counter>(name.as_str()).increment().await {
                Ok(Ok(value)) => {
                    ledger.acknowledged(key, value);
                    let now = state.epoch.elapsed().as_millis() as u64;
                    state.last_ok_ms[key].store(now + 1, Ordering::Relaxed);
                    state.timeline[((now / 100) as usize).min(TIMELINE_SLOTS - 1)].fetch_add(1, Ordering::Relaxed);
                    state.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(error)) => {
                    if matches!(error, StorageError::Fenced { .. }) {
                        ledger.fenced.fetch_add(1, Ordering::Relaxed);
                    } else {
                        ledger.unknown(key);
                    }
                    if matches!(error, StorageError::Conflict { .. }) {
                        ledger.conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    state.errors.lock().unwrap().push(LoadError::State(name.clone(), error));
                }
                Err(error) => {
                    ledger.unknown(key);
                    state.errors.lock().unwrap().push(LoadError::Call(name.clone(), error));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn ok(&self) -> u64 {
        self.state.ok.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.state.epoch.elapsed().as_millis() as u64
    }

    /// Acknowledgements per second between `from_ms` and `to_ms`: on average, and in the worst whole second.
    fn rates_between(&self, from_ms: u64, to_ms: u64) -> (f64, u64) {
        let slots: Vec<u64> = self.state.timeline[(from_ms / 100) as usize..(to_ms / 100) as usize]
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        let average = slots.iter().sum::<u64>() as f64 / (slots.len().max(1) as f64 / 10.0);
        let worst = slots.windows(10).map(|second| second.iter().sum()).min().unwrap_or(0);
        (average, worst)
    }

    /// The throughput in the 2 s before `event_ms` and from it to now, in words.
    fn throughput_around(&self, event_ms: u64) -> String {
        let (before, worst_before) = self.rates_between(event_ms.saturating_sub(2_000), event_ms);
        let (after, worst_after) = self.rates_between(event_ms, self.now_ms());
        format!(
            "{before:.0} calls/s in the 2 s before (worst second {worst_before}), {after:.0} calls/s from then to the \
             end (worst second {worst_after})"
        )
    }

    /// Waits until every key has been acknowledged once (each grain is active), and returns how long one
    /// pass over the keys took.
    async fn warm_up(&self) -> Duration {
        let all_ok = self.wait_all_keys_ok_after(0, scaled(Duration::from_secs(60))).await;
        Duration::from_millis(all_ok)
    }

    async fn wait_all_keys_ok_after(&self, since_ms: u64, within: Duration) -> u64 {
        let all_ok = self.all_keys_ok_after(since_ms, within).await;
        all_ok.unwrap_or_else(|| panic!("not every key answered again within {within:?}"))
    }

    /// When every key had been acknowledged after `since_ms`, if that happens `within` from now.
    async fn all_keys_ok_after(&self, since_ms: u64, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            if self.state.last_ok_ms.iter().all(|t| t.load(Ordering::Relaxed) > since_ms) {
                return Some(self.now_ms());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> LoadOutcome {
        self.state.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let errors = self.state.errors.lock().unwrap().clone();
        let ok = self.state.ok.load(Ordering::Relaxed);
        LoadOutcome { ok, state: self.state, errors }
    }
}

/// A failed call of the load, on the key it names: the call machinery's error, or the counter's own (its state
/// write refused).
#[derive(Debug, Clone)]
enum LoadError {
    Call(String, CallError),
    State(String, StorageError),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Call(key, error) => write!(f, "{key}: {error:?}"),
            LoadError::State(key, error) => write!(f, "{key}: state {error:?}"),
        }
    }
}

impl LoadError {
    /// Whether a lost silo may cause this: a call of unknown outcome, a storage provider out of reach, or a
    /// write its fencing refused. Anything else (a conflict, a refused call, a protocol error) is a bug.
    fn is_unknown_outcome_or_fenced(&self) -> bool {
        match self {
            LoadError::Call(_, error) => matches!(
                error,
                CallError::Timeout(_) | CallError::Unavailable(_) | CallError::StorageUnavailable { .. }
            ),
            LoadError::State(_, error) => {
                matches!(error, StorageError::Unavailable(_) | StorageError::Fenced { .. })
            }
        }
    }
}

struct LoadOutcome {
    state: Arc<LoadState>,
    ok: u64,
    errors: Vec<LoadError>,
}

impl LoadOutcome {
    async fn verdict(&self, db: &TestDatabase) -> Verdict {
        self.state.ledger.verdict(db).await
    }

    /// Fails on any error but those a lost silo may cause: calls of unknown outcome, and writes its fencing
    /// refused.
    fn assert_only_unknown_outcome_errors(&self, around: &str) {
        for error in &self.errors {
            assert!(
                error.is_unknown_outcome_or_fenced(),
                "only unknown-outcome or fenced errors are allowed around {around}: {error}"
            );
        }
    }
}

/// Samples every live silo's activations during the load, looking for a grain active on two silos at once.
///
/// A grain seen on two silos in one pass over them may just have moved between the two queries, so a round
/// that sees one asks every silo again, in the same order, at once, and counts a duplicate only if the same
/// two silos list the grain both times. For one activation to produce that, it would have to move X → Y → X → Y
/// between four queries a few milliseconds apart; a counter moves only when membership changes, and a move is
/// a full deactivation and activation. So what this reports is a duplicate, never a move.
struct DuplicateSampler {
    silos: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<SamplerReport>,
}

#[derive(Debug, Default)]
struct SamplerReport {
    /// Rounds that heard from every live silo.
    rounds: u64,
    /// Rounds abandoned because a silo did not answer.
    void_rounds: u64,
    /// Grains seen on two silos in a first pass but not confirmed by the second: moves (or a duplicate that
    /// ended within milliseconds).
    unconfirmed: u64,
    /// Confirmed duplicates: grain, silos, and when (ms since the sampler started).
    duplicates: Vec<(GrainId, Vec<String>, u64)>,
}

impl SamplerReport {
    fn summary(&self) -> String {
        format!(
            "{} duplicate activations sampled in {} rounds ({} rounds without every silo, {} single-pass sightings \
             not confirmed)",
            self.duplicates.len(),
            self.rounds,
            self.void_rounds,
            self.unconfirmed
        )
    }
}

impl DuplicateSampler {
    /// Starts sampling `silos` (`host:port`) through `client`, a member client.
    fn start(client: Client, silos: &[&SiloProcess]) -> Self {
        let silos = Arc::new(Mutex::new(silos.iter().map(|s| s.addr.clone()).collect::<Vec<_>>()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(Self::run(client, silos.clone(), stop.clone()));
        DuplicateSampler { silos, stop, task }
    }

    /// Stops sampling `silo` (before it is killed, stopped or frozen: a silo that cannot serve hosts nothing).
    fn forget(&self, silo: &SiloProcess) {
        self.silos.lock().unwrap().retain(|addr| *addr != silo.addr);
    }

    /// Starts sampling `silo` too.
    fn add(&self, silo: &SiloProcess) {
        self.silos.lock().unwrap().push(silo.addr.clone());
    }

    async fn stop(self) -> SamplerReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }

    async fn run(client: Client, silos: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) -> SamplerReport {
        let started = Instant::now();
        let mut report = SamplerReport::default();
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(SAMPLE_EVERY).await;
            let round: Vec<String> = silos.lock().unwrap().clone();
            let Some(first) = Self::pass(&client, &round).await else {
                report.void_rounds += 1;
                continue;
            };
            let suspects = Self::on_two_or_more(&first);
            if suspects.is_empty() {
                report.rounds += 1;
                continue;
            }
            let Some(second) = Self::pass(&client, &round).await else {
                report.void_rounds += 1;
                continue;
            };
            report.rounds += 1;
            let again = Self::on_two_or_more(&second);
            for (grain, holders) in suspects {
                let confirmed: Vec<String> = again
                    .get(&grain)
                    .map_or(Vec::new(), |h| holders.iter().filter(|s| h.contains(s)).cloned().collect());
                if confirmed.len() >= 2 {
                    report.duplicates.push((grain, confirmed, started.elapsed().as_millis() as u64));
                } else {
                    report.unconfirmed += 1;
                }
            }
        }
        report
    }

    /// Each silo's activations, asked one after the other in `silos` order; `None` if one did not answer.
    async fn pass(client: &Client, silos: &[String]) -> Option<Vec<(String, HashSet<GrainId>)>> {
        let mut pass = Vec::new();
        for silo in silos {
            let asked = tokio::time::timeout(scaled(Duration::from_secs(2)), client.active_grains(silo)).await;
            let Ok(Ok(grains)) = asked else { return None };
            pass.push((silo.clone(), grains.into_iter().collect()));
        }
        Some(pass)
    }

    /// The grains listed by two or more silos, with the silos listing them.
    fn on_two_or_more(pass: &[(String, HashSet<GrainId>)]) -> HashMap<GrainId, Vec<String>> {
        let mut holders: HashMap<GrainId, Vec<String>> = HashMap::new();
        for (silo, grains) in pass {
            for grain in grains {
                holders.entry(grain.clone()).or_default().push(silo.clone());
            }
        }
        holders.retain(|_, silos| silos.len() > 1);
        holders
    }
}

/// Grain ids active on more than one of the live silos, once the load has stopped (nothing moves then).
async fn duplicates_at_rest(client: &Client, silos: &[&SiloProcess]) -> usize {
    let mut seen = HashSet::<GrainId>::new();
    let mut duplicates = 0;
    for silo in silos {
        for id in client.active_grains(&silo.addr).await.unwrap() {
            if !seen.insert(id) {
                duplicates += 1;
            }
        }
    }
    duplicates
}

/// A client that may ask silos for their activations: it declares itself a member (the silos here run on
/// loopback without a cluster secret, so the declaration needs no proof).
fn client_config() -> ClientConfig {
    ClientConfig {
        call_timeout: Duration::from_secs(10),
        gateway_refresh_interval: Duration::from_millis(500),
        member: Some(ClusterCredentials::default()),
        ..Default::default()
    }
}

async fn connect(silos: &[&SiloProcess], config: ClientConfig) -> Client {
    let urls: Vec<String> = silos.iter().map(|s| s.url()).collect();
    Client::connect_cluster(&urls, config).await.unwrap()
}

/// A cluster of `n` silos under the load on `keys` keys, watched by a duplicate sampler: where the tests below
/// start (one at a time: each holds the turn while it runs).
struct UnderLoad {
    turn: tokio::sync::MutexGuard<'static, ()>,
    db: TestDatabase,
    silos: Vec<SiloProcess>,
    table: PostgresMembershipTable,
    client: Client,
    sampler: DuplicateSampler,
    load: Load,
    /// How long one pass over the keys took while warming up.
    pass: Duration,
}

impl UnderLoad {
    async fn start(cluster: &str, n: usize, keys: usize) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let db = TestDatabase::create().await;
        let (silos, table) = start_cluster(&db, cluster, n, "fast").await;
        let all: Vec<&SiloProcess> = silos.iter().collect();
        let client = connect(&all, client_config()).await;
        let sampler = DuplicateSampler::start(connect(&all, client_config()).await, &all);
        let load = Load::start_on(&client, (0..keys).map(|key| format!("k-{key}")).collect());
        let pass = load.warm_up().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Self { turn, db, silos, table, client, sampler, load, pass }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_of_three_silos_under_load_loses_no_acknowledged_write() {
    let cluster = "kill9";
    let UnderLoad { turn: _turn, db, mut silos, table, client, sampler, load, pass } =
        UnderLoad::start(cluster, 3, KEYS).await;

    let victim = silos.remove(1);
    let victim_port = victim.port();
    sampler.forget(&victim);
    let killed_at = load.now_ms();
    drop(victim); // SIGKILL
    let dead_after = wait_for_dead(&table, victim_port, "the killed silo").await;
    let all_back_ms = load.wait_all_keys_ok_after(killed_at, scaled(Duration::from_secs(60))).await;
    let all_back_after = Duration::from_millis(all_back_ms - killed_at);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let throughput = load.throughput_around(killed_at);
    let outcome = load.stop().await;
    let sampled = sampler.stop().await;

    let verdict = outcome.verdict(&db).await;
    let live: Vec<&SiloProcess> = silos.iter().collect();
    let at_rest = duplicates_at_rest(&client, &live).await;
    println!(
        "kill -9 of 1 of 3 silos under load on {KEYS} keys ({WRITERS_PER_KEY} writers per key, a pass over the keys \
         {:.2} s): dead after {:.2} s, every key answered again after {:.2} s; {throughput}; {}; {}; {at_rest} \
         duplicates at rest; {} calls failed",
        pass.as_secs_f64(),
        dead_after.as_secs_f64(),
        all_back_after.as_secs_f64(),
        verdict.summary(),
        sampled.summary(),
        outcome.errors.len()
    );
    verdict.assert_nothing_lost_or_doubled();
    assert!(sampled.duplicates.is_empty(), "duplicate activations during the load: {:?}", sampled.duplicates);
    assert!(sampled.rounds > 0, "the sampler never heard from every silo");
    assert_eq!(at_rest, 0, "duplicate activations after convergence");
    outcome.assert_only_unknown_outcome_errors("the kill");

    // The killed silo comes back on its port with a new epoch and receives new grains.
    let restarted = start_silo(&db, cluster, victim_port, "fast");
    wait_for_active(&table, 3).await;
    let snapshot = table.read_all().await.unwrap();
    let incarnations: Vec<_> =
        snapshot.rows.iter().filter(|r| r.entry.silo.endpoint.ends_with(&format!(":{victim_port}"))).collect();
    assert_eq!(incarnations.len(), 2, "old and new incarnation both recorded");
    assert!(incarnations.iter().any(|r| r.entry.status == SiloStatus::Active));
    let client = connect(&live, client_config()).await;
    for i in 0..300 {
        client.grain::<Counter>(format!("fresh-{i}")).increment().await.unwrap().unwrap();
    }
    let on_restarted = client.active_grains(&restarted.addr).await.unwrap();
    assert!(
        on_restarted.iter().filter(|g| g.key().to_string().starts_with("fresh-")).count() > 30,
        "the restarted silo receives new grains"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_under_load_shows_callers_no_errors() {
    let UnderLoad { turn: _turn, db, mut silos, table, client: _client, sampler, load, pass } =
        UnderLoad::start("graceful", 3, KEYS).await;

    let mut stopping = silos.remove(2);
    sampler.forget(&stopping);
    let stopped_at = load.now_ms();
    stopping.signal("-TERM");
    let status = stopping.wait_exit(scaled(Duration::from_secs(30))).await;
    assert!(status.is_some_and(|s| s.success()), "the silo stopped cleanly ({status:?}):\n{}", stopping.log());
    wait_for_active(&table, 2).await;
    let since = load.now_ms();
    load.wait_all_keys_ok_after(since, scaled(Duration::from_secs(60))).await;
    let throughput = load.throughput_around(stopped_at);
    let outcome = load.stop().await;
    let sampled = sampler.stop().await;
    let verdict = outcome.verdict(&db).await;
    println!(
        "graceful stop of 1 of 3 silos under load on {KEYS} keys ({WRITERS_PER_KEY} writers per key, a pass over the \
         keys {:.2} s): {throughput}; {} calls acknowledged, {} failed; {}; {}",
        pass.as_secs_f64(),
        outcome.ok,
        outcome.errors.len(),
        verdict.summary(),
        sampled.summary()
    );
    assert!(outcome.errors.is_empty(), "callers saw errors: {:?}", &outcome.errors[..outcome.errors.len().min(10)]);
    verdict.assert_nothing_lost_or_doubled();
    assert!(sampled.duplicates.is_empty(), "duplicate activations during the load: {:?}", sampled.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_silo_declared_dead_under_load_stops_itself_when_it_wakes_and_loses_nothing() {
    let UnderLoad { turn: _turn, db, mut silos, table, client, sampler, load, pass } =
        UnderLoad::start("zombie", 3, KEYS).await;

    let mut frozen = silos.remove(0);
    sampler.forget(&frozen);
    let frozen_at = load.now_ms();
    frozen.signal("-STOP");
    let dead_after = wait_for_dead(&table, frozen.port(), "the frozen silo").await;
    // It wakes while the others may already host its grains: it must stop before running a turn.
    frozen.signal("-CONT");
    let status = frozen.wait_exit(scaled(Duration::from_secs(20))).await;
    let status = status.unwrap_or_else(|| panic!("the zombie did not stop itself:\n{}", frozen.log()));
    assert!(!status.success(), "a silo declared dead exits with an error status");
    assert!(frozen.log().contains("declared dead"), "it says why:\n{}", frozen.log());
    let all_back_ms = load.wait_all_keys_ok_after(frozen_at, scaled(Duration::from_secs(60))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let throughput = load.throughput_around(frozen_at);
    let outcome = load.stop().await;
    let sampled = sampler.stop().await;
    let verdict = outcome.verdict(&db).await;
    println!(
        "SIGSTOP of 1 of 3 silos under load on {KEYS} keys ({WRITERS_PER_KEY} writers per key, a pass over the keys \
         {:.2} s): declared dead after {:.2} s, every key answered again after {:.2} s; {throughput}; {}; {}; {} \
         calls failed",
        pass.as_secs_f64(),
        dead_after.as_secs_f64(),
        (all_back_ms - frozen_at) as f64 / 1000.0,
        verdict.summary(),
        sampled.summary(),
        outcome.errors.len()
    );
    verdict.assert_nothing_lost_or_doubled();
    assert!(sampled.duplicates.is_empty(), "duplicate activations during the load: {:?}", sampled.duplicates);
    outcome.assert_only_unknown_outcome_errors("the freeze");
    // The rest of the cluster serves on.
    let result = client.grain::<Counter>("after-zombie").increment().await;
    assert!(matches!(result, Ok(Ok(1))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silo_joining_two_under_load_causes_no_duplicate_and_loses_nothing() {
    const JOIN_KEYS: usize = 2000;
    let cluster = "join";
    let UnderLoad { turn: _turn, db, mut silos, table, client, sampler, load, pass } =
        UnderLoad::start(cluster, 2, JOIN_KEYS).await;

    let joining_at = load.now_ms();
    let join_from = Instant::now();
    silos.push(start_silo(&db, cluster, 0, "fast"));
    wait_for_active(&table, 3).await;
    let joined_after = join_from.elapsed();
    sampler.add(&silos[2]);
    let all_back_ms = load.wait_all_keys_ok_after(joining_at, scaled(Duration::from_secs(60))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let throughput = load.throughput_around(joining_at);
    let outcome = load.stop().await;
    let sampled = sampler.stop().await;
    let verdict = outcome.verdict(&db).await;
    let all: Vec<&SiloProcess> = silos.iter().collect();
    let at_rest = duplicates_at_rest(&client, &all).await;
    let placed_on_new = client.active_grains(&silos[2].addr).await.unwrap().len();
    println!(
        "a third silo joins 2 under load on {JOIN_KEYS} keys ({WRITERS_PER_KEY} writers per key, a pass over the \
         keys {:.2} s): active after {:.2} s, every key answered again after {:.2} s; {throughput}; {}; {}; \
         {at_rest} duplicates at rest; {placed_on_new} activations on the new silo; {} calls failed",
        pass.as_secs_f64(),
        joined_after.as_secs_f64(),
        (all_back_ms - joining_at) as f64 / 1000.0,
        verdict.summary(),
        sampled.summary(),
        outcome.errors.len()
    );
    verdict.assert_nothing_lost_or_doubled();
    assert!(sampled.duplicates.is_empty(), "duplicate activations during the join: {:?}", sampled.duplicates);
    assert!(sampled.rounds > 0, "the sampler never heard from every silo");
    assert_eq!(at_rest, 0, "duplicate activations after the join");
    outcome.assert_only_unknown_outcome_errors("a join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_silos_cut_apart_but_sharing_postgres_at_most_one_survives_and_nothing_acknowledged_is_lost() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::create().await;
    let network = match IsolatedNetwork::create(2, db.url()).await {
        Ok(network) => network,
        Err(why) => {
            eprintln!(
                "\n!!!! SKIPPED the partition test: it needs network namespaces (root and iproute2), and this \
                 machine refused: {why} !!!!\n"
            );
            return;
        }
    };
    let (cluster, secret) = ("partition", "partition-test-secret");
    let database_url = network.database_url(db.url());
    // Each silo listens on its own namespace's address (not loopback, so it needs the cluster secret).
    let mut silos: Vec<SiloProcess> = (0..2)
        .map(|i| {
            let namespace = network.namespace(i);
            SiloLauncher::in_namespace(SILO_BINARY, &namespace.name)
                .args(["--host", &namespace.ip.to_string(), "--port", "0", "--cluster-id", cluster])
                .args(["--storage", "postgres", "--membership", "postgres", "--database-url", &database_url])
                .args(["--failure-detection", "fast", "--cluster-secret", secret])
                .args(["--log", "info", "--call-timeout", "5s"])
                .keep_log()
                .start()
        })
        .collect();
    let table = membership(&db, cluster).await;
    wait_for_active(&table, 2).await;
    let config = ClientConfig {
        member: Some(ClusterCredentials { cluster_id: cluster.into(), secret: Some(secret.into()) }),
        ..client_config()
    };
    let both: Vec<&SiloProcess> = silos.iter().collect();
    let client = connect(&both, config.clone()).await;
    let sampler = DuplicateSampler::start(connect(&both, config).await, &both);
    let load = Load::start(&client);
    let pass = load.warm_up().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut_at = load.now_ms();
    let cut = Instant::now();
    network.partition().expect("bridge port isolation");
    // One of them must lose: it reads itself Dead and exits. Its grains then come back on the other.
    let mut exited = [false, false];
    let first_exit = loop {
        for (i, silo) in silos.iter_mut().enumerate() {
            if !exited[i] && silo.exited().is_some() {
                exited[i] = true;
                sampler.forget(silo);
            }
        }
        if exited.contains(&true) {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < scaled(Duration::from_secs(60)),
            "both silos still run a minute after the partition:\n{}\n---\n{}",
            silos[0].log(),
            silos[1].log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Long enough for the survivor to be declared dead too, were a dead silo's vote counted.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5) {
        for (i, silo) in silos.iter_mut().enumerate() {
            if !exited[i] && silo.exited().is_some() {
                exited[i] = true;
                sampler.forget(silo);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let survivors = exited.iter().filter(|e| !**e).count();
    let all_back = match survivors {
        1 => Some(load.wait_all_keys_ok_after(cut_at, scaled(Duration::from_secs(60))).await),
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let throughput = load.throughput_around(cut_at);
    let outcome = load.stop().await;
    let sampled = sampler.stop().await;
    let verdict = outcome.verdict(&db).await;
    let snapshot = table.read_all().await.unwrap();
    let statuses: Vec<SiloStatus> = silos
        .iter()
        .map(|s| snapshot.rows.iter().find(|r| r.entry.silo.endpoint == s.addr).map(|r| r.entry.status).unwrap())
        .collect();
    println!(
        "two silos cut apart (not from Postgres) under load on {KEYS} keys ({WRITERS_PER_KEY} writers per key, a \
         pass over the keys {:.2} s): first exit {:.2} s after the cut, {survivors} survivor(s), statuses \
         {statuses:?}, every key answered again {}; {throughput}; {}; {}; {} calls failed",
        pass.as_secs_f64(),
        first_exit.as_secs_f64(),
        all_back.map_or("never (no survivor)".to_owned(), |at| format!("after {:.2} s", (at - cut_at) as f64 / 1000.0)),
        verdict.summary(),
        sampled.summary(),
        outcome.errors.len()
    );
    assert!(survivors <= 1, "both silos survived the partition");
    for (exited, status) in exited.iter().zip(&statuses) {
        if *exited {
            assert_eq!(*status, SiloStatus::Dead, "a silo that stopped is dead in the table: {statuses:?}");
        } else {
            assert_eq!(*status, SiloStatus::Active, "the survivor is active: {statuses:?}");
        }
    }
    verdict.assert_nothing_lost_or_doubled();
    assert!(sampled.duplicates.is_empty(), "duplicate activations during the partition: {:?}", sampled.duplicates);
    outcome.assert_only_unknown_outcome_errors("the partition");
    drop(silos);
    drop(network);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_routes_around_a_frozen_gateway() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::create().await;
    // Production failure detection: the frozen silo stays Active in the table for the whole test, so only the
    // client's own judgement of its gateways can route around it.
    let (mut silos, table) = start_cluster(&db, "frozen-gateway", 3, "production").await;
    let all: Vec<&SiloProcess> = silos.iter().collect();
    let client = connect(&all, client_config()).await;
    for key in 0..KEYS {
        client.grain::<Counter>(format!("k-{key}")).increment().await.unwrap().unwrap();
    }
    let frozen = silos.remove(0);
    let frozen_port = format!(":{}", frozen.port());
    // The load runs on grains neither hosted nor looked up on the silo to be frozen: every call it makes can be
    // answered by the other two, if the client sends it to them.
    let hosted_there: HashSet<GrainId> = client.active_grains(&frozen.addr).await.unwrap().into_iter().collect();
    let view = grains_silo::ClusterView::from_snapshot(&table.read_all().await.unwrap());
    let keys: Vec<String> = (0..KEYS)
        .map(|key| format!("k-{key}"))
        .filter(|key| {
            let id = GrainId::new(<Counter as grains::GrainType>::TYPE_NAME, key.as_str());
            let owner = view.directory_owner(&id).expect("three active silos");
            !hosted_there.contains(&id) && !owner.endpoint.ends_with(&frozen_port)
        })
        .collect();
    assert!(keys.len() > KEYS / 5, "only {} keys avoid the silo to be frozen", keys.len());
    let load = Load::start_on(&client, keys);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let warm = load.ok();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let frozen_at = load.now_ms();
    let before = load.ok() - warm;

    frozen.signal("-STOP");
    let state = load.state.clone();
    let three_seconds_later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        state.ok.load(Ordering::Relaxed)
    });
    // Every grain of the load answers again through the other gateways within a few seconds of the freeze
    // (calls stuck on the frozen gateway have a 10 s deadline: waiting them out would take longer).
    let within = scaled(Duration::from_secs(8));
    let all_back = load.all_keys_ok_after(frozen_at, within).await;
    let after = three_seconds_later.await.unwrap() - warm - before;
    frozen.signal("-CONT");
    let outcome = load.stop().await;
    println!(
        "frozen gateway: {:.0} calls/s in the 3 s before the freeze, {:.0} calls/s in the 3 s after it; every key \
         answered again: {}; {} calls acknowledged, {} failed",
        before as f64 / 3.0,
        after as f64 / 3.0,
        all_back.map_or("no".to_owned(), |at| format!("{:.2} s after the freeze", (at - frozen_at) as f64 / 1000.0)),
        outcome.ok,
        outcome.errors.len()
    );
    assert!(all_back.is_some(), "the grains not on the frozen silo did not all answer within {within:?} of the freeze");
    outcome.assert_only_unknown_outcome_errors("the freeze");
}

fn start_dev_silo(seed: Option<&str>) -> SiloProcess {
    let launcher = SiloLauncher::new(SILO_BINARY).args(["--port", "0", "--failure-detection", "fast", "--log", "info"]);
    match seed {
        Some(seed) => launcher.args(["--seed", seed]).start(),
        None => launcher.start(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_silos_joined_through_a_seed_form_a_cluster_a_client_spreads_over_and_survives_a_gateway_leaving() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed = start_dev_silo(None);
    let second = start_dev_silo(Some(&seed.addr));
    let mut third = start_dev_silo(Some(&seed.addr));

    // The client is given one gateway and learns the others from the cluster.
    let config = ClientConfig { gateway_refresh_interval: Duration::from_millis(200), ..client_config() };
    let client = Client::connect_cluster([third.url()], config).await.unwrap();
    let deadline = Instant::now() + scaled(Duration::from_secs(20));
    while client.gateways().len() < 3 {
        assert!(Instant::now() < deadline, "the client never learned all gateways: {:?}", client.gateways());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..600 {
        client.grain::<Counter>(format!("seeded-{i}")).increment().await.unwrap().unwrap();
    }
    for silo in [&seed, &second, &third] {
        let here = client.active_grains(&silo.addr).await.unwrap().len();
        assert!(here > 60, "{} holds only {here} of 600 grains", silo.addr);
    }

    // The gateway the client started from leaves; calls go on through the others.
    third.signal("-TERM");
    let _ = third.wait_exit(scaled(Duration::from_secs(30))).await;
    for i in 0..200 {
        let result = client.grain::<Counter>(format!("after-{i}")).increment().await;
        assert!(matches!(result, Ok(Ok(1))), "call {i} after the gateway left: {result:?}");
    }
}

/// The sampler can fail: two silos of different clusters each host a grain of the same id, which is what a
/// duplicate activation looks like from outside, and the sampler reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_duplicate_sampler_reports_a_grain_active_on_two_silos() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (first, second) = (start_dev_silo(None), start_dev_silo(None));
    for silo in [&first, &second] {
        let alone = Client::connect_cluster([silo.url()], client_config()).await.unwrap();
        alone.grain::<Counter>("twice").increment().await.unwrap().unwrap();
    }
    let sampler = DuplicateSampler::start(connect(&[&first], client_config()).await, &[&first, &second]);
    tokio::time::sleep(SAMPLE_EVERY * 10).await;
    let sampled = sampler.stop().await;
    let twice = GrainId::new("Counter", "twice");
    assert!(sampled.duplicates.iter().any(|(grain, silos, _)| *grain == twice && silos.len() == 2), "{sampled:?}");
}
