//! Deterministic simulation of a cluster under faults (turmoil): three silos and a client in one thread, on a
//! simulated network and clock, with a seeded schedule of crashes and restarts, partitions between silos, silos
//! cut off from the membership table and storage, and message delays — under continuous calls from many workers
//! on a few contended keys.
//!
//! The oracle is the product's promise, checked throughout each run:
//! - no two activations of one grain run turns in overlapping (simulated) time;
//! - no increment is acknowledged twice with the same value (a lost update: two activations, or a stale one,
//!   both wrote), and every acknowledged increment is in storage at the end;
//! - every call ends (reply, error or timeout) by its deadline plus a small slack: none hangs.
//!
//! `GRAINS_SIM_SEEDS=N` runs N seeds (CI runs the default), from `GRAINS_SIM_FIRST_SEED` (1) on; `GRAINS_SIM_SEED=S` replays one seed, and a failing
//! run prints that command. The silos reach the network and the wall clock through `grains_silo::sim`, so the
//! runtime code under test is the production code.
//!
//! A seed replayed alone repeats exactly: the same calls, faults and outcomes, run after run. What it takes:
//! turmoil seeds its network and, under `--cfg tokio_unstable` (set in `.cargo/config.toml`), each host's
//! tokio runtime; the silo draws placement and registration ids, and seeds its hash maps, from the
//! simulation's seed (`grains_silo::sim::seed_randomness`); each seed runs on a fresh thread. Seeds run side by
//! side (the default run) can still differ from their replay by a few calls in one seed of several — some state
//! is still shared between simultaneous runs in one process; a failing seed's schedule of faults is always
//! the same.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use grains::__private::runtime::BoxFuture;
use grains::prelude::*;
use grains_silo::sim::{Io, Listener, Network, Seams};
use grains_silo::{Client, ClientConfig, FailureDetection, GrainTypeConfig, Silo, SiloConfig};
use grains_storage::{
    ETag, GrainStateStore, MembershipEntry, MembershipSnapshot, MembershipTable, MemoryMembershipTable,
    MemoryStateStore, SiloAddress, StateKey, StorageError, StoredState,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SILOS: usize = 3;
const KEYS: usize = 12;
const WORKERS: usize = 6;
const LOCAL_WORKERS: usize = 2;
const PORT: u16 = 30_000;
/// Simulated time under load (faults happen during it), then a quiet phase to settle and check.
const LOAD: Duration = Duration::from_secs(24);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

// ---- the grain under test, and the turn oracle ----

static NEXT_ACTIVATION: AtomicU64 = AtomicU64::new(1);

/// A unique number per activation (its grain struct).
#[derive(Debug)]
pub struct ActivationToken(u64);

impl Default for ActivationToken {
    fn default() -> Self {
        Self(NEXT_ACTIVATION.fetch_add(1, Ordering::Relaxed))
    }
}

/// Which activation of each grain is in a turn now, and the overlaps seen.
#[derive(Default)]
struct TurnOracle {
    running: Mutex<HashMap<String, u64>>,
    overlaps: Mutex<Vec<String>>,
}

thread_local! {
    /// Per thread: a simulation runs on one thread, and seeds run on several threads side by side.
    static TURNS: TurnOracle = TurnOracle::default();
}

struct InTurn {
    key: String,
    token: u64,
}

impl TurnOracle {
    fn enter(key: &str, token: u64) -> InTurn {
        TURNS.with(|turns| {
            if let Some(other) = turns.running.lock().unwrap().insert(key.to_owned(), token) {
                turns.overlaps.lock().unwrap().push(format!(
                    "{key}: activation {token} began a turn while activation {other} was in one (at {:?})",
                    turmoil::sim_elapsed()
                ));
            }
        });
        InTurn { key: key.to_owned(), token }
    }

    fn reset(&self) {
        self.running.lock().unwrap().clear();
        self.overlaps.lock().unwrap().clear();
    }
}

impl Drop for InTurn {
    fn drop(&mut self) {
        // A crashed host's tasks are dropped while the thread's oracle may already be gone: nothing to undo then.
        let _ = TURNS.try_with(|turns| {
            let mut running = turns.running.lock().unwrap();
            if running.get(&self.key) == Some(&self.token) {
                running.remove(&self.key);
            }
        });
    }
}

/// The counter's stored state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Count {
    /// The count.
    pub value: u64,
}

/// A persisted counter whose turns take simulated time, so that two activations' turns would overlap.
#[grain]
pub struct SimCounter {
    state: PersistentState<Count>,
    token: ActivationToken,
    key: String,
}

#[grain]
impl SimCounter {
    /// Adds one, stores it, returns it.
    pub async fn increment(&mut self) -> Result<u64, StorageError> {
        let _turn = TurnOracle::enter(&self.key, self.token.0);
        let next = self.state.value + 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
        self.state.value = next;
        self.state.write().await?;
        Ok(next)
    }

    /// The stored count this activation holds.
    pub async fn get(&self) -> u64 {
        let _turn = TurnOracle::enter(&self.key, self.token.0);
        self.state.value
    }

    async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        self.key = ctx.id().key().to_string();
        Ok(())
    }
}

// ---- the simulated network and clock ----

struct TurmoilNetwork;

struct TurmoilListener(turmoil::net::TcpListener);

impl Listener for TurmoilListener {
    fn accept(&mut self) -> BoxFuture<'_, std::io::Result<(Box<dyn Io>, SocketAddr)>> {
        Box::pin(async move {
            let (stream, remote) = self.0.accept().await?;
            Ok((Box::new(stream) as Box<dyn Io>, remote))
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Network for TurmoilNetwork {
    fn connect(&self, host: String, port: u16) -> BoxFuture<'static, std::io::Result<Box<dyn Io>>> {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }

    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let listener = turmoil::net::TcpListener::bind(addr).await?;
            Ok(Box::new(TurmoilListener(listener)) as Box<dyn Listener>)
        })
    }
}

fn simulated_wall_clock_ms() -> u64 {
    turmoil::since_epoch().map_or(0, |d| d.as_millis() as u64)
}

// ---- the "database": one membership table and one store, which a silo can be cut off from ----

/// Silos currently cut off from the database.
#[derive(Clone, Default)]
struct DatabaseCuts(Arc<Mutex<HashSet<String>>>);

impl DatabaseCuts {
    fn check(&self, silo: &str) -> Result<(), StorageError> {
        if self.0.lock().unwrap().contains(silo) {
            return Err(StorageError::Unavailable(format!("{silo} is cut off from the database")));
        }
        Ok(())
    }
}

struct CutTable {
    inner: Arc<MemoryMembershipTable>,
    silo: String,
    cuts: DatabaseCuts,
}

#[async_trait]
impl MembershipTable for CutTable {
    async fn read_all(&self) -> Result<MembershipSnapshot, StorageError> {
        self.cuts.check(&self.silo)?;
        self.inner.read_all().await
    }

    async fn insert_row(&self, entry: &MembershipEntry, expected_version: i64) -> Result<bool, StorageError> {
        self.cuts.check(&self.silo)?;
        self.inner.insert_row(entry, expected_version).await
    }

    async fn update_row(
        &self,
        entry: &MembershipEntry,
        etag: &str,
        expected_version: i64,
    ) -> Result<bool, StorageError> {
        self.cuts.check(&self.silo)?;
        self.inner.update_row(entry, etag, expected_version).await
    }

    async fn heartbeat(&self, silo: &SiloAddress, at_ms: i64) -> Result<(), StorageError> {
        self.cuts.check(&self.silo)?;
        self.inner.heartbeat(silo, at_ms).await
    }

    async fn delete_all(&self) -> Result<(), StorageError> {
        self.inner.delete_all().await
    }
}

struct CutStore {
    inner: Arc<MemoryStateStore>,
    silo: String,
    cuts: DatabaseCuts,
}

#[async_trait]
impl GrainStateStore for CutStore {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn read(&self, key: &StateKey) -> Result<Option<StoredState>, StorageError> {
        self.cuts.check(&self.silo)?;
        self.inner.read(key).await
    }

    async fn write(
        &self,
        key: &StateKey,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<ETag, StorageError> {
        self.cuts.check(&self.silo)?;
        self.inner.write(key, document, expected).await
    }

    async fn clear(&self, key: &StateKey, expected: Option<&str>) -> Result<(), StorageError> {
        self.cuts.check(&self.silo)?;
        self.inner.clear(key, expected).await
    }
}

// ---- one run ----

/// Calls `increment` on the counters until the load phase ends, recording what it sees in `ledger`.
async fn work(runtime: Arc<dyn grains::__private::runtime::GrainRuntime>, first: usize, ledger: Arc<Mutex<Ledger>>) {
    let mut k = first % KEYS;
    while turmoil::sim_elapsed().is_some_and(|t| t < LOAD) {
        k = (k + 5) % KEYS;
        let counter = <SimCounter as grains::Grain>::Ref::from_core(grains::__private::RefCore::new(
            grains::GrainId::new("SimCounter", format!("k{k}")),
            runtime.clone(),
        ));
        *ledger.lock().unwrap().started.entry(k).or_default() += 1;
        let call_started = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(CALL_TIMEOUT * 2, counter.increment()).await;
        {
            let mut ledger = ledger.lock().unwrap();
            ledger.calls += 1;
            match outcome {
                Ok(Ok(Ok(value))) => ledger.acked.entry(k).or_default().push(value),
                Ok(_) => ledger.errors += 1,
                Err(_) => ledger.hangs.push(format!("k{k}: no answer after {:?}", call_started.elapsed())),
            }
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

/// What the client saw.
#[derive(Default)]
struct Ledger {
    /// Per key: every value an increment was acknowledged with.
    acked: BTreeMap<usize, Vec<u64>>,
    /// Per key: increments started (an increment not acknowledged may still have been applied).
    started: BTreeMap<usize, u64>,
    hangs: Vec<String>,
    final_values: BTreeMap<usize, u64>,
    calls: u64,
    errors: u64,
}

fn silo_name(i: usize) -> String {
    format!("silo-{i}")
}

/// The faults of one run: (when, what), drawn from the seed.
#[derive(Debug, Clone)]
enum Fault {
    /// Crash a silo and restart it (a new incarnation) after the pause.
    CrashRestart(usize, Duration),
    /// Cut the network between two silos, heal it after the pause.
    Partition(usize, usize, Duration),
    /// Cut a silo off from the database, restore it after the pause.
    DatabaseCut(usize, Duration),
    /// Hold every message between two silos, release them after the pause.
    Delay(usize, usize, Duration),
    /// Cut a silo off from every other silo (its clients still reach it), heal after the pause.
    Isolate(usize, Duration),
    /// Cut a silo off from every other silo and from the database, so it cannot learn that it was declared
    /// dead (as when it is on the wrong side of a partition); its clients still reach it.
    CutOff(usize, Duration),
    /// As if the silo's process were frozen (a long pause, a VM freeze): every message to and from it is held,
    /// and its database calls fail, until it "wakes" and everything held arrives at once.
    Freeze(usize, Duration),
}

fn schedule(rng: &mut SmallRng) -> Vec<(Duration, Fault)> {
    let mut at = Duration::from_secs(3);
    let mut faults = Vec::new();
    while at < LOAD - Duration::from_secs(6) {
        let silo = rng.random_range(0..SILOS);
        let other = (silo + rng.random_range(1..SILOS)) % SILOS;
        let pause = Duration::from_millis(rng.random_range(200..6_000));
        let fault = match rng.random_range(0..7) {
            0 => Fault::CrashRestart(silo, pause),
            1 => Fault::Partition(silo, other, pause),
            2 => Fault::DatabaseCut(silo, pause),
            3 => Fault::Delay(silo, other, pause.min(Duration::from_millis(1_500))),
            4 => Fault::Isolate(silo, pause),
            5 => Fault::CutOff(silo, pause),
            _ => Fault::Freeze(silo, pause.max(Duration::from_secs(4))),
        };
        faults.push((at, fault));
        at += pause + Duration::from_millis(rng.random_range(500..4_000));
    }
    faults
}

/// A change to the simulated world, applied between steps.
type Action = Box<dyn FnOnce(&mut turmoil::Sim<'_>)>;

/// One seed's totals: calls, acknowledged, failed; or why it broke the guarantee.
type SeedOutcome = (u64, Result<(u64, usize, u64), String>);

fn run(seed: u64) -> Result<Ledger, String> {
    TURNS.with(TurnOracle::reset);
    grains_silo::sim::seed_randomness(seed);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(LOAD + Duration::from_secs(120))
        .tick_duration(Duration::from_millis(5))
        .ephemeral_ports(1024..=65535)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(Duration::from_millis(rng.random_range(1..20)))
        .rng_seed(seed)
        .build();
    let table = Arc::new(MemoryMembershipTable::new());
    let store = Arc::new(MemoryStateStore::new());
    let cuts = DatabaseCuts::default();
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    for i in 0..SILOS {
        let (table, store, cuts, ledger) = (table.clone(), store.clone(), cuts.clone(), ledger.clone());
        sim.host(silo_name(i), move || {
            let (table, store, cuts, ledger) = (table.clone(), store.clone(), cuts.clone(), ledger.clone());
            async move {
                let name = silo_name(i);
                let ip: IpAddr = turmoil::lookup(name.as_str());
                let mut config = SiloConfig {
                    name: name.clone(),
                    host: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    advertise_host: Some(ip),
                    port: PORT,
                    insecure: true,
                    failure_detection: FailureDetection::Fast,
                    call_timeout: CALL_TIMEOUT,
                    collection_interval: Duration::from_millis(200),
                    ..SiloConfig::default()
                };
                // Counters passivate quickly, so calls keep re-activating them wherever placement says.
                config
                    .grain
                    .insert("SimCounter".into(), GrainTypeConfig { idle_timeout: Some(Duration::from_millis(800)) });
                // As a supervisor would: a silo that cannot start (its database is cut off) tries again.
                let silo = loop {
                    let started = Silo::builder()
                        .config(config.clone())
                        .membership_table(Arc::new(CutTable {
                            inner: table.clone(),
                            silo: name.clone(),
                            cuts: cuts.clone(),
                        }))
                        .state_store(Arc::new(CutStore {
                            inner: store.clone(),
                            silo: name.clone(),
                            cuts: cuts.clone(),
                        }))
                        .start()
                        .await;
                    match started {
                        Ok(silo) => break silo,
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                };
                // Callers in the silo's own process (an application hosted with it): they keep calling through
                // this silo whatever the cluster thinks of it — what a zombie silo would serve.
                for w in 0..LOCAL_WORKERS {
                    tokio::spawn(work(silo.runtime(), i * 7 + w, ledger.clone()));
                }
                silo.stopped().await;
                Ok(())
            }
        });
    }

    {
        let ledger = ledger.clone();
        sim.client("client", async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let urls: Vec<String> = (0..SILOS).map(|i| format!("http://{}:{PORT}", silo_name(i))).collect();
            let config = ClientConfig { call_timeout: CALL_TIMEOUT, ..ClientConfig::default() };
            let client = loop {
                match Client::connect_cluster(&urls, config.clone()).await {
                    Ok(client) => break client,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let workers: Vec<_> =
                (0..WORKERS).map(|w| tokio::spawn(work(client.runtime(), w, ledger.clone()))).collect();
            for worker in workers {
                worker.await?;
            }
            // Quiet phase: every fault is healed by now; the cluster settles; then read every counter.
            tokio::time::sleep(Duration::from_secs(8)).await;
            for k in 0..KEYS {
                let counter = client.grain::<SimCounter>(format!("k{k}"));
                let mut value = None;
                for _ in 0..20 {
                    if let Ok(v) = counter.get().await {
                        value = Some(v);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let value = value.ok_or_else(|| format!("k{k} could not be read after the faults healed"))?;
                ledger.lock().unwrap().final_values.insert(k, value);
            }
            Ok(())
        });
    }

    let faults = schedule(&mut rng);
    let mut pending: Vec<(Duration, Action)> = Vec::new();
    for (at, fault) in faults.clone() {
        match fault.clone() {
            Fault::CrashRestart(s, pause) => {
                pending.push((at, Box::new(move |sim| sim.crash(silo_name(s)))));
                pending.push((at + pause, Box::new(move |sim| sim.bounce(silo_name(s)))));
            }
            Fault::Partition(a, b, pause) => {
                pending.push((at, Box::new(move |sim| sim.partition(silo_name(a), silo_name(b)))));
                pending.push((at + pause, Box::new(move |sim| sim.repair(silo_name(a), silo_name(b)))));
            }
            Fault::DatabaseCut(s, pause) => {
                let (cut, heal) = (cuts.clone(), cuts.clone());
                pending.push((
                    at,
                    Box::new(move |_| {
                        cut.0.lock().unwrap().insert(silo_name(s));
                    }),
                ));
                pending.push((
                    at + pause,
                    Box::new(move |_| {
                        heal.0.lock().unwrap().remove(&silo_name(s));
                    }),
                ));
            }
            Fault::Isolate(a, pause) | Fault::CutOff(a, pause) => {
                let others = move || (0..SILOS).filter(move |o| *o != a).map(silo_name);
                let database = matches!(fault, Fault::CutOff(..));
                let (cut, heal) = (cuts.clone(), cuts.clone());
                pending.push((
                    at,
                    Box::new(move |sim| {
                        for other in others() {
                            sim.partition(silo_name(a), other);
                        }
                        if database {
                            cut.0.lock().unwrap().insert(silo_name(a));
                        }
                    }),
                ));
                pending.push((
                    at + pause,
                    Box::new(move |sim| {
                        for other in others() {
                            sim.repair(silo_name(a), other);
                        }
                        heal.0.lock().unwrap().remove(&silo_name(a));
                    }),
                ));
            }
            Fault::Freeze(a, pause) => {
                let everyone = move || (0..SILOS).filter(move |o| *o != a).map(silo_name).chain(["client".to_owned()]);
                let (cut, heal) = (cuts.clone(), cuts.clone());
                pending.push((
                    at,
                    Box::new(move |sim| {
                        for other in everyone() {
                            sim.hold(silo_name(a), other);
                        }
                        cut.0.lock().unwrap().insert(silo_name(a));
                    }),
                ));
                pending.push((
                    at + pause,
                    Box::new(move |sim| {
                        for other in everyone() {
                            sim.release(silo_name(a), other);
                        }
                        heal.0.lock().unwrap().remove(&silo_name(a));
                    }),
                ));
            }
            Fault::Delay(a, b, pause) => {
                pending.push((at, Box::new(move |sim| sim.hold(silo_name(a), silo_name(b)))));
                pending.push((at + pause, Box::new(move |sim| sim.release(silo_name(a), silo_name(b)))));
            }
        }
    }
    pending.sort_by_key(|(at, _)| *at);
    pending.reverse();
    loop {
        while pending.last().is_some_and(|(at, _)| *at <= sim.elapsed()) {
            if let Some((_, apply)) = pending.pop() {
                apply(&mut sim);
            }
        }
        // A silo that stopped itself (declared dead) comes back as a new incarnation, as a supervisor would.
        for i in 0..SILOS {
            if !sim.is_host_running(silo_name(i)) {
                sim.bounce(silo_name(i));
            }
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => return Err(format!("simulation failed: {error} (faults: {faults:?})")),
        }
    }
    let overlaps = TURNS.with(|turns| turns.overlaps.lock().unwrap().clone());
    if !overlaps.is_empty() {
        return Err(format!("two activations ran turns at once: {overlaps:?} (faults: {faults:?})"));
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    check(&ledger).map_err(|e| format!("{e} (faults: {faults:?})"))?;
    Ok(ledger)
}

/// The write and liveness oracle over what the client saw.
fn check(ledger: &Ledger) -> Result<(), String> {
    if !ledger.hangs.is_empty() {
        return Err(format!("calls hung past their deadline: {:?}", ledger.hangs));
    }
    for (k, values) in &ledger.acked {
        let mut seen = HashSet::new();
        for v in values {
            if !seen.insert(*v) {
                return Err(format!("k{k}: the value {v} was acknowledged twice (a lost update)"));
            }
        }
        let stored = ledger.final_values.get(k).copied().unwrap_or(0);
        let highest = values.iter().copied().max().unwrap_or(0);
        if stored < highest {
            return Err(format!("k{k}: an acknowledged write was lost: stored {stored}, acknowledged up to {highest}"));
        }
        let started = ledger.started.get(k).copied().unwrap_or(0);
        if stored > started {
            return Err(format!("k{k}: stored {stored} exceeds the {started} increments ever started (applied twice)"));
        }
    }
    Ok(())
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("GRAINS_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let n: u64 = std::env::var("GRAINS_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let first: u64 = std::env::var("GRAINS_SIM_FIRST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    (first..first + n).collect()
}

#[test]
fn one_activation_per_grain_and_no_acknowledged_write_lost_under_seeded_faults() {
    grains_silo::sim::install(Seams { network: Arc::new(TurmoilNetwork), wall_clock_ms: simulated_wall_clock_ms });
    let seeds = seeds();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(seeds.len()).max(1);
    let wall = std::time::Instant::now();
    // Seeds run side by side, each wholly on one thread (turmoil's world and the turn oracle are per thread).
    let queue = Arc::new(Mutex::new(seeds.clone()));
    let verbose = seeds.len() <= 10;
    let results: Vec<Vec<SeedOutcome>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let queue = queue.clone();
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let Some(seed) = queue.lock().unwrap().pop() else { return done };
                        let started = std::time::Instant::now();
                        // Each seed on a fresh thread: nothing thread-local is left over from the seed before, so
                        // a seed runs here exactly as it does replayed alone.
                        let outcome = std::thread::spawn(move || run(seed))
                            .join()
                            .unwrap_or_else(|_| Err("the simulation panicked".to_owned()));
                        let outcome = outcome.map(|ledger| {
                            if verbose {
                                println!(
                                    "seed {seed}: {} calls in {:.1} s",
                                    ledger.calls,
                                    started.elapsed().as_secs_f64()
                                );
                            }
                            (ledger.calls, ledger.acked.values().map(Vec::len).sum::<usize>(), ledger.errors)
                        });
                        let failed = outcome.is_err();
                        done.push((seed, outcome));
                        if failed {
                            queue.lock().unwrap().clear();
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a simulation thread panicked")).collect()
    });
    let (mut calls, mut acked, mut errors) = (0, 0, 0);
    for (seed, outcome) in results.into_iter().flatten() {
        match outcome {
            Ok((c, a, e)) => {
                calls += c;
                acked += a;
                errors += e;
            }
            Err(failure) => panic!(
                "seed {seed} broke the guarantee: {failure}\nreplay: GRAINS_SIM_SEED={seed} cargo test -p grains-tests --test simulation -- --nocapture"
            ),
        }
    }
    println!(
        "{} seeds on {threads} threads: {calls} calls, {acked} acknowledged, {errors} failed or refused, in {:.1} s",
        seeds.len(),
        wall.elapsed().as_secs_f64()
    );
}
