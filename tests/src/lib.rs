//! Grains used by the integration tests, and helpers to start silos for them.
//!
//! Each grain exists to make one behaviour observable: how many activations ran, whether turns overlapped,
//! what a panic or a failed activation does, how a call cycle ends.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use grains::RequestMetadata;
use grains::prelude::*;
use grains_silo::{Silo, SiloConfig};
use grains_storage::GrainStateStore;

pub mod es;
pub mod http_client;
pub mod netns;
pub mod pg;
pub mod process;
pub mod raw_stream;
pub mod tls;

/// How much slower than an idle machine this one may be: `GRAINS_TEST_TIME_FACTOR` (default 1). Waits for
/// something to happen scale with it ([`scaled`]), so a busy machine makes a test slower, not red.
pub fn time_factor() -> f64 {
    static FACTOR: LazyLock<f64> = LazyLock::new(|| {
        std::env::var("GRAINS_TEST_TIME_FACTOR")
            .ok()
            .and_then(|f| f.parse().ok())
            .filter(|f: &f64| *f >= 1.0)
            .unwrap_or(1.0)
    });
    *FACTOR
}

/// `limit` stretched by [`time_factor`]: the longest a test waits for an outcome.
pub fn scaled(limit: Duration) -> Duration {
    limit.mul_f64(time_factor())
}

/// Activation and deactivation counts per grain key, recorded by the test grains' hooks.
#[derive(Debug, Default)]
pub struct LifecycleLog {
    activations: Mutex<HashMap<String, usize>>,
    deactivations: Mutex<HashMap<String, usize>>,
    /// Activations alive now (activated, not yet deactivated) per key, and the most ever alive at once.
    live: Mutex<HashMap<String, (usize, usize)>>,
}

fn bump(map: &Mutex<HashMap<String, usize>>, key: String) {
    *map.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
}

fn read(map: &Mutex<HashMap<String, usize>>, key: &str) -> usize {
    map.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
}

impl LifecycleLog {
    /// How many times the grain with this key (text form) was activated.
    pub fn activations(&self, key: &str) -> usize {
        read(&self.activations, key)
    }

    /// How many times the grain with this key (text form) was deactivated.
    pub fn deactivations(&self, key: &str) -> usize {
        read(&self.deactivations, key)
    }

    /// The most activations of the grain with this key that were ever alive at the same time (between their
    /// `on_activate` and `on_deactivate`) in this process: more than 1 means two activations coexisted.
    pub fn most_alive_at_once(&self, key: &str) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).get(key).map_or(0, |&(_, most)| most)
    }

    fn activated(&self, key: String) {
        bump(&self.activations, key.clone());
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let (now, most) = live.entry(key).or_default();
        *now += 1;
        *most = (*most).max(*now);
    }

    fn deactivated(&self, key: String) {
        bump(&self.deactivations, key.clone());
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let (now, _) = live.entry(key).or_default();
        *now = now.saturating_sub(1);
    }
}

/// The lifecycle log shared by all test grains (tests use distinct keys, so they never see each other).
pub static LIFECYCLE: LazyLock<LifecycleLog> = LazyLock::new(LifecycleLog::default);

/// A counter whose state is persisted, and whose lifecycle is logged.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CounterState {
    /// The count.
    pub value: u64,
}

/// A persisted counter that awaits between reading and writing its value: if two turns ever overlapped,
/// increments would be lost.
#[grain(idle_timeout = "10m")]
pub struct Counter {
    state: PersistentState<CounterState>,
}

#[grain]
impl Counter {
    /// Reads the value, yields to the runtime for `pause_ms`, then stores value + 1 and returns it.
    pub async fn increment_slowly(&mut self, pause_ms: u64) -> Result<u64, StorageError> {
        let seen = self.state.value;
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        self.state.value = seen + 1;
        self.state.write().await?;
        Ok(self.state.value)
    }

    /// Adds one and stores it.
    pub async fn increment(&mut self) -> Result<u64, StorageError> {
        self.state.value += 1;
        self.state.write().await?;
        Ok(self.state.value)
    }

    /// The value held by this activation.
    pub async fn get(&self) -> u64 {
        self.state.value
    }

    /// The etag of the stored version this activation knows.
    pub async fn etag(&self) -> Option<String> {
        self.state.etag().map(str::to_owned)
    }

    /// Sleeps for `ms` milliseconds inside a turn.
    pub async fn sleep(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// The id of the tokio task running this turn.
    pub async fn task(&self) -> String {
        format!("{:?}", tokio::task::try_id())
    }

    /// Panics inside a turn.
    pub async fn explode(&mut self) -> u64 {
        panic!("counter exploded on purpose")
    }

    async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        LIFECYCLE.activated(ctx.id().key().to_string());
        Ok(())
    }

    async fn on_deactivate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        LIFECYCLE.deactivated(ctx.id().key().to_string());
        Ok(())
    }
}

/// A grain whose activation fails when its key starts with `fail`, and which can call other grains.
#[grain]
pub struct Peer {
    ctx: GrainContext,
}

#[grain]
impl Peer {
    /// Calls `Peer(peer).echo_back(me)`, which calls this grain back: a cycle.
    pub async fn call_peer(&self, peer: String) -> Result<String, CallError> {
        let me = self.ctx.id().key().to_string();
        self.ctx.grain::<Peer>(peer).echo_back(me).await?
    }

    /// Calls `Peer(caller).name()`.
    pub async fn echo_back(&self, caller: String) -> Result<String, CallError> {
        self.ctx.grain::<Peer>(caller).name().await
    }

    /// This grain's key.
    pub async fn name(&self) -> String {
        self.ctx.id().key().to_string()
    }

    /// Calls `Peer(peer).name()`: a plain grain-to-grain call.
    pub async fn ask_name(&self, peer: String) -> Result<String, CallError> {
        self.ctx.grain::<Peer>(peer).name().await
    }

    /// Asks the runtime to deactivate this grain after this turn.
    pub async fn deactivate(&self) {
        self.ctx.deactivate_on_idle();
    }

    /// Echoes a payload (for size-limit tests).
    pub async fn echo(&self, bytes: Vec<u8>) -> usize {
        bytes.len()
    }

    async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        LIFECYCLE.activated(ctx.id().key().to_string());
        if ctx.id().key().to_string().starts_with("fail") {
            return Err(GrainError::failed("this grain refuses to activate"));
        }
        Ok(())
    }

    async fn on_deactivate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        LIFECYCLE.deactivated(ctx.id().key().to_string());
        Ok(())
    }
}

/// A grain whose `on_activate` takes as long as its key's number says (`"300-x"`: 300 ms) and remembers the
/// request metadata it saw, and which can call others of its kind: what a cold call's caller runs for it.
#[grain]
pub struct SlowStart {
    ctx: GrainContext,
    metadata_on_activate: Vec<(String, String)>,
}

#[grain]
impl SlowStart {
    /// Answers at once.
    pub async fn ping(&self) -> String {
        self.ctx.id().key().to_string()
    }

    /// Sleeps for `ms` milliseconds inside a turn.
    pub async fn sleep(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// The request metadata `on_activate` saw.
    pub async fn metadata_on_activate(&self) -> Vec<(String, String)> {
        self.metadata_on_activate.clone()
    }

    /// Calls `SlowStart(other).metadata_on_activate()` from this turn.
    pub async fn ask_metadata_on_activate(&self, other: String) -> Result<Vec<(String, String)>, CallError> {
        self.ctx.grain::<SlowStart>(other).metadata_on_activate().await
    }

    async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        let key = ctx.id().key().to_string();
        LIFECYCLE.activated(key.clone());
        self.metadata_on_activate =
            RequestMetadata::current().iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        let ms = key.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(())
    }
}

/// A silo config for tests: no gateway, fast idle collection.
pub fn test_config() -> SiloConfig {
    init_logging();
    SiloConfig { gateway: false, collection_interval: Duration::from_millis(50), ..SiloConfig::default() }
}

/// Starts an in-process silo with `config` and the in-memory store.
pub async fn start_silo(config: SiloConfig) -> Silo {
    match Silo::builder().config(config).start().await {
        Ok(silo) => silo,
        Err(e) => panic!("silo failed to start: {e}"),
    }
}

/// Starts an in-process silo with `config` over `store`.
pub async fn start_silo_with_store(config: SiloConfig, store: Arc<dyn GrainStateStore>) -> Silo {
    match Silo::builder().config(config).state_store(store).start().await {
        Ok(silo) => silo,
        Err(e) => panic!("silo failed to start: {e}"),
    }
}

/// Sends the silos' `tracing` output to stderr when `GRAINS_TEST_LOG` holds a filter (for example
/// `GRAINS_TEST_LOG=grains_silo=info`): a failing test's log shows what the cluster saw.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("GRAINS_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Makes sure the linker keeps this crate's grain registrations in a binary that names nothing else from it.
pub fn link() {}

/// Starts `n` silos in this process that form one cluster: one shared in-memory membership table and state
/// store, fast failure detection, each listening on a free port. Returns once every silo sees all `n` active.
pub async fn start_cluster(n: usize) -> Vec<Silo> {
    start_cluster_with(n, |config| config).await
}

/// [`start_cluster`] with each silo's configuration adjusted by `adjust`.
pub async fn start_cluster_with(n: usize, adjust: impl Fn(SiloConfig) -> SiloConfig) -> Vec<Silo> {
    let shared = SharedCluster::new();
    let mut silos = Vec::new();
    for i in 0..n {
        silos.push(shared.start_member(i, &adjust).await);
    }
    wait_for_active(&silos, n).await;
    silos
}

/// The membership table, state store and reminders table that in-process silos of one test cluster share, so
/// that a test can add silos to a running cluster.
#[derive(Clone)]
pub struct SharedCluster {
    /// The membership table.
    pub table: Arc<dyn grains_storage::MembershipTable>,
    /// The grain state store.
    pub store: Arc<dyn GrainStateStore>,
    /// The reminders table.
    pub reminders: Arc<dyn grains_storage::ReminderTable>,
}

impl Default for SharedCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedCluster {
    /// An empty in-memory membership table, state store and reminders table.
    pub fn new() -> Self {
        Self {
            table: Arc::new(grains_storage::MemoryMembershipTable::new()),
            store: Arc::new(grains_storage::MemoryStateStore::new()),
            reminders: Arc::new(grains_storage::MemoryReminderTable::new()),
        }
    }

    /// Starts silo number `i` of this cluster (fast failure detection, a gateway on a free port), its
    /// configuration adjusted by `adjust`; returns once it has joined.
    pub async fn start_member(&self, i: usize, adjust: impl Fn(SiloConfig) -> SiloConfig) -> Silo {
        let config = SiloConfig {
            name: format!("silo-{i}"),
            port: 0,
            failure_detection: grains_silo::FailureDetection::Fast,
            ..test_config()
        };
        let config = adjust(SiloConfig { gateway: true, ..config });
        Silo::builder()
            .config(config)
            .state_store(self.store.clone())
            .membership_table(self.table.clone())
            .reminder_table(self.reminders.clone())
            .start()
            .await
            .unwrap_or_else(|e| panic!("silo {i} failed to start: {e}"))
    }
}

/// Waits (up to 20 s) until every silo in `silos` sees `n` active silos.
pub async fn wait_for_active(silos: &[Silo], n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while silos.iter().any(|s| s.cluster_view().active().len() != n) {
        assert!(tokio::time::Instant::now() < deadline, "the cluster did not converge on {n} active silos");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A grain placed next to its caller (`placement = "prefer_local"`).
#[grain(placement = "prefer_local")]
pub struct Sticky;

#[grain]
impl Sticky {
    /// Nothing: the test looks at where the activation lands.
    pub async fn touch(&self) {}
}

/// A grain placed by hashing its id over the active silos (`placement = "hash"`).
#[grain(placement = "hash")]
pub struct Hashed;

#[grain]
impl Hashed {
    /// Nothing: the test looks at where the activation lands.
    pub async fn touch(&self) {}
}

/// When each turn of a grain (by key) began and ended, and what it was: the timer tests check that no two
/// overlap.
pub static TURNS: LazyLock<Mutex<HashMap<String, Vec<TurnRecord>>>> = LazyLock::new(Mutex::default);

/// One turn of a [`Ticker`].
#[derive(Debug, Clone, Copy)]
pub struct TurnRecord {
    /// `"timer"` or `"method"`.
    pub kind: &'static str,
    /// When it began.
    pub began: std::time::Instant,
    /// When it ended.
    pub ended: std::time::Instant,
}

/// Timer ticks run per grain key, over every activation (a timer's own count dies with its activation).
pub static TIMER_TICKS: LazyLock<Mutex<HashMap<String, u64>>> = LazyLock::new(Mutex::default);

/// How many timer ticks the grain with this key has run, over all its activations.
pub fn timer_ticks(key: &str) -> u64 {
    TIMER_TICKS.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
}

/// A grain with a timer, whose turns (timer and method alike) hold `busy` and yield to the runtime mid-turn:
/// two turns overlapping would find it set. Every turn is logged in [`TURNS`].
#[grain(idle_timeout = "10m")]
pub struct Ticker {
    ctx: GrainContext,
    busy: bool,
    ticks: u64,
    overlaps: u64,
    timer: Option<grains::TimerHandle>,
}

impl Ticker {
    /// One turn: marks the grain busy, yields for `pause_ms`, and logs the turn.
    async fn turn(&mut self, kind: &'static str, pause_ms: u64) {
        let began = std::time::Instant::now();
        if self.busy {
            self.overlaps += 1;
        }
        self.busy = true;
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        self.busy = false;
        let record = TurnRecord { kind, began, ended: std::time::Instant::now() };
        TURNS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(self.ctx.id().key().to_string())
            .or_default()
            .push(record);
    }

    async fn tick(&mut self) {
        self.turn("timer", 3).await;
        self.ticks += 1;
        *TIMER_TICKS.lock().unwrap_or_else(|e| e.into_inner()).entry(self.ctx.id().key().to_string()).or_default() += 1;
    }
}

#[grain]
impl Ticker {
    /// Starts a timer ticking every `every_ms` (first after `every_ms`); `keep_alive`: its ticks count as
    /// activity.
    pub async fn start(&mut self, every_ms: u64, keep_alive: bool) -> Result<(), String> {
        let every = Duration::from_millis(every_ms);
        let timer = self
            .ctx
            .register_timer(every, Some(every), |ticker: &mut Ticker| Box::pin(ticker.tick()))
            .map_err(|e| e.to_string())?;
        timer.keep_grain_alive(keep_alive);
        self.timer = Some(timer);
        Ok(())
    }

    /// Starts a one-shot timer firing after `after_ms`.
    pub async fn start_once(&mut self, after_ms: u64) -> Result<(), String> {
        let after = Duration::from_millis(after_ms);
        self.ctx
            .register_timer(after, None, |ticker: &mut Ticker| Box::pin(ticker.tick()))
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Starts a timer whose first tick panics.
    pub async fn start_panicking(&mut self, after_ms: u64) -> Result<(), String> {
        let after = Duration::from_millis(after_ms);
        self.ctx
            .register_timer(after, Some(after), |_: &mut Ticker| {
                Box::pin(async { panic!("timer exploded on purpose") })
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Registers a timer written for another grain type: refused.
    pub async fn start_for_another_type(&mut self) -> Result<(), String> {
        let every = Some(Duration::from_millis(10));
        match self.ctx.register_timer(Duration::ZERO, every, |_: &mut Counter| Box::pin(async {})) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Tries to register a reminder, which this grain (no `on_reminder`) cannot receive.
    pub async fn try_reminder(&self) -> Result<(), String> {
        let second = Duration::from_secs(1);
        self.ctx.register_reminder("never", second, second).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Cancels the timer started by `start`; whether it was running.
    pub async fn stop(&mut self) -> bool {
        self.timer.take().is_some_and(|t| t.cancel())
    }

    /// A method turn lasting `ms`.
    pub async fn work(&mut self, ms: u64) {
        self.turn("method", ms).await;
    }

    /// (ticks this activation ran, overlapping turns it saw).
    pub async fn counts(&self) -> (u64, u64) {
        (self.ticks, self.overlaps)
    }

    /// Asks to be deactivated after this turn.
    pub async fn leave(&self) {
        self.ctx.deactivate_on_idle();
    }

    async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        LIFECYCLE.activated(ctx.id().key().to_string());
        Ok(())
    }

    async fn on_deactivate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        LIFECYCLE.deactivated(ctx.id().key().to_string());
        Ok(())
    }
}

/// What a [`Remindful`] grain stores: its reminder ticks, counted.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RemindfulState {
    /// Ticks delivered.
    pub ticks: u64,
    /// Missed ticks reported by the delivered ones.
    pub missed: u64,
    /// The most missed ticks one delivery reported.
    pub most_missed: u64,
    /// The longest wall-clock gap between two delivered ticks, in ms.
    pub longest_gap_ms: u64,
    /// When the last tick was delivered (Unix ms).
    pub last_delivered_ms: u64,
    /// The due time of the last tick delivered (Unix ms).
    pub last_due_ms: u64,
    /// How many of the next ticks to refuse (to test retries).
    pub refuse: u32,
}

/// One reminder tick as a [`Remindful`] grain saw it (in-process tests read these from [`REMINDER_TICKS`]).
#[derive(Debug, Clone)]
pub struct TickRecord {
    /// The reminder.
    pub name: String,
    /// When the tick was due.
    pub due: std::time::SystemTime,
    /// When it arrived.
    pub at: std::time::SystemTime,
    /// The missed ticks it reported.
    pub missed: u64,
    /// Whether the grain refused it.
    pub refused: bool,
}

/// Every reminder tick [`Remindful`] grains received in this process, by grain key.
pub static REMINDER_TICKS: LazyLock<Mutex<HashMap<String, Vec<TickRecord>>>> = LazyLock::new(Mutex::default);

/// The ticks the [`Remindful`] grain with this key received in this process.
pub fn reminder_ticks(key: &str) -> Vec<TickRecord> {
    REMINDER_TICKS.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned().unwrap_or_default()
}

fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A grain that registers reminders and counts their ticks in persistent state.
#[grain(idle_timeout = "10m")]
pub struct Remindful {
    ctx: GrainContext,
    state: PersistentState<RemindfulState>,
}

#[grain]
impl Remindful {
    /// Registers reminder `name`: first due in `due_ms`, then every `period_ms`. Returns its next due time
    /// (Unix ms).
    pub async fn remind(&self, name: String, due_ms: u64, period_ms: u64) -> Result<u64, String> {
        let due = Duration::from_millis(due_ms);
        let reminder = self
            .ctx
            .register_reminder(&name, due, Duration::from_millis(period_ms))
            .await
            .map_err(|e| e.to_string())?;
        Ok(unix_ms(reminder.next_due))
    }

    /// Unregisters reminder `name`; whether it existed.
    pub async fn forget(&self, name: String) -> Result<bool, String> {
        self.ctx.unregister_reminder(&name).await.map_err(|e| e.to_string())
    }

    /// The grain's reminders: (name, next due in Unix ms, period in ms).
    pub async fn reminders(&self) -> Result<Vec<(String, u64, u64)>, String> {
        let listed = self.ctx.reminders().await.map_err(|e| e.to_string())?;
        Ok(listed.into_iter().map(|r| (r.name, unix_ms(r.next_due), r.period.as_millis() as u64)).collect())
    }

    /// What the grain has stored about its ticks.
    pub async fn stored(&self) -> RemindfulState {
        self.state.get().clone()
    }

    /// Refuses the next `n` ticks (their `on_reminder` fails).
    pub async fn refuse(&mut self, n: u32) -> Result<(), StorageError> {
        self.state.refuse = n;
        self.state.write().await
    }

    async fn on_reminder(&mut self, tick: ReminderTick) -> Result<(), GrainError> {
        let at = std::time::SystemTime::now();
        let refused = self.state.refuse > 0;
        let record = TickRecord { name: tick.name.clone(), due: tick.due, at, missed: tick.missed, refused };
        let key = self.ctx.id().key().to_string();
        REMINDER_TICKS.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().push(record);
        if refused {
            self.state.refuse -= 1;
            self.state.write().await?;
            return Err(GrainError::failed("refused on purpose"));
        }
        let now = unix_ms(at);
        let state = self.state.get_mut();
        if state.last_delivered_ms > 0 {
            state.longest_gap_ms = state.longest_gap_ms.max(now.saturating_sub(state.last_delivered_ms));
        }
        state.ticks += 1;
        state.missed += tick.missed;
        state.most_missed = state.most_missed.max(tick.missed);
        state.last_delivered_ms = now;
        state.last_due_ms = unix_ms(tick.due);
        self.state.write().await?;
        Ok(())
    }
}

/// A stateless grain for reminder load: each tick is logged in [`BEACON_TICKS`] (grain key, due, arrival).
#[grain(idle_timeout = "10m")]
pub struct Beacon {
    ctx: GrainContext,
}

/// `(grain key, tick due, tick arrived)` for every tick a [`Beacon`] received in this process.
pub static BEACON_TICKS: LazyLock<Mutex<Vec<(i64, std::time::SystemTime, std::time::SystemTime)>>> =
    LazyLock::new(Mutex::default);

#[grain]
impl Beacon {
    /// Registers reminder `beacon`, first due in `due_ms`, then every `period_ms`.
    pub async fn arm(&self, due_ms: u64, period_ms: u64) -> Result<(), String> {
        let (due, period) = (Duration::from_millis(due_ms), Duration::from_millis(period_ms));
        self.ctx.register_reminder("beacon", due, period).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Unregisters reminder `beacon`.
    pub async fn disarm(&self) -> Result<bool, String> {
        self.ctx.unregister_reminder("beacon").await.map_err(|e| e.to_string())
    }

    async fn on_reminder(&mut self, tick: ReminderTick) -> Result<(), GrainError> {
        let key = match self.ctx.id().key() {
            GrainKey::Int(i) => *i,
            _ => -1,
        };
        BEACON_TICKS.lock().unwrap_or_else(|e| e.into_inner()).push((key, tick.due, std::time::SystemTime::now()));
        Ok(())
    }
}
