//! Grains used by the integration tests, and helpers to start silos for them.
//!
//! Each grain exists to make one behaviour observable: how many activations ran, whether turns overlapped,
//! what a panic or a failed activation does, how a call cycle ends.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

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
    pub async fn increment_slowly(&mut self, pause_ms: u64) -> Result<u64, StateError> {
        let seen = self.state.value;
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        self.state.value = seen + 1;
        self.state.write().await?;
        Ok(self.state.value)
    }

    /// Adds one and stores it.
    pub async fn increment(&mut self) -> Result<u64, StateError> {
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

/// A silo config for tests: no gateway, fast idle collection.
pub fn test_config() -> SiloConfig {
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

/// The membership table and state store that in-process silos of one test cluster share, so that a test can
/// add silos to a running cluster.
#[derive(Clone)]
pub struct SharedCluster {
    /// The membership table.
    pub table: Arc<dyn grains_storage::MembershipTable>,
    /// The grain state store.
    pub store: Arc<dyn GrainStateStore>,
}

impl Default for SharedCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedCluster {
    /// An empty in-memory table and store.
    pub fn new() -> Self {
        Self {
            table: Arc::new(grains_storage::MemoryMembershipTable::new()),
            store: Arc::new(grains_storage::MemoryStateStore::new()),
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
            .start()
            .await
            .unwrap_or_else(|e| panic!("silo {i} failed to start: {e}"))
    }
}

/// Waits (up to 20 s) until every silo in `silos` sees `n` active silos.
pub async fn wait_for_active(silos: &[Silo], n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while silos.iter().any(|s| s.cluster_view().active.len() != n) {
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
