//! What a silo reports about itself and gathers about its cluster, for the dashboard and the HTTP API.
//!
//! A silo's [`SiloStats`] is read from its counters and its activation table when asked (never kept up to
//! date on the call path). The cluster's is gathered on demand: the asking silo sends each active peer the
//! `Stats` system call over the authenticated peer connections, concurrently, and waits a bounded time; a
//! silo that does not answer is listed with the error instead of its stats.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use grains_storage::{MembershipEntry, SiloStatus};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterView;
use crate::cluster::system::{self, SystemRequest, SystemResponse};
use crate::metrics::{HistogramSnapshot, MethodSnapshot, StorageSnapshot};
use crate::silo::SiloInner;

/// How many membership events a silo remembers.
const EVENTS_KEPT: usize = 200;

/// How long the cluster's stats wait for a silo's answer.
const PEER_STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// A change in the membership view, as one silo saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MembershipEvent {
    /// When it was seen (Unix ms).
    pub(crate) at_ms: i64,
    /// The view version it was seen in.
    pub(crate) version: i64,
    /// The silo whose status changed (`endpoint@epoch`).
    pub(crate) silo: String,
    /// Its name.
    pub(crate) name: String,
    /// Its status before (`None`: not in the previous view).
    pub(crate) from: Option<String>,
    /// Its status now.
    pub(crate) to: String,
}

/// The membership events a silo has seen, newest last, at most [`EVENTS_KEPT`].
#[derive(Debug, Default)]
pub(crate) struct MembershipEvents(std::sync::Mutex<VecDeque<MembershipEvent>>);

impl MembershipEvents {
    /// Records the status changes between two views.
    pub(crate) fn record(&self, old: &ClusterView, new: &ClusterView) {
        let at_ms = crate::cluster::membership::now_ms();
        let changes: Vec<MembershipEvent> = new
            .rows
            .iter()
            .filter_map(|row| {
                let before = old.status(&row.silo);
                (before != Some(row.status)).then(|| MembershipEvent {
                    at_ms,
                    version: new.version,
                    silo: row.silo.to_string(),
                    name: row.name.clone(),
                    from: before.map(|s| s.as_str().to_owned()),
                    to: row.status.as_str().to_owned(),
                })
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        let mut events = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for change in changes {
            if events.len() == EVENTS_KEPT {
                events.pop_front();
            }
            events.push_back(change);
        }
    }

    /// The events remembered, oldest first.
    pub(crate) fn list(&self) -> Vec<MembershipEvent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
}

/// What one silo reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SiloStats {
    /// `endpoint@epoch`.
    pub(crate) silo: String,
    /// Where it listens.
    pub(crate) endpoint: String,
    /// Its incarnation (start time, Unix ms).
    pub(crate) epoch: i64,
    /// Its name.
    pub(crate) name: String,
    /// Its status in its own view.
    pub(crate) status: String,
    /// Milliseconds since it started.
    pub(crate) uptime_ms: u64,
    /// Activations in its table.
    pub(crate) activations: u64,
    /// Activations by grain type.
    pub(crate) activations_by_type: BTreeMap<String, u64>,
    /// Calls waiting in its mailboxes, all told.
    pub(crate) mailbox_queued: u64,
    /// Calls waiting in its longest mailbox.
    pub(crate) mailbox_longest: u64,
    /// Calls accepted for delivery since start.
    pub(crate) calls: u64,
    /// Calls refused before delivery since start.
    pub(crate) call_errors: u64,
    /// Directory entries it owns.
    pub(crate) directory_entries: u64,
    /// Per grain type and method: calls, errors, latency.
    pub(crate) methods: Vec<MethodSnapshot>,
    /// Storage latency.
    pub(crate) storage: StorageSnapshot,
    /// Its recent membership events, oldest first.
    pub(crate) events: Vec<MembershipEvent>,
    /// Its Postgres pool, if it has one.
    pub(crate) pool: Option<PoolStats>,
    /// Group-commit batch sizes of the Postgres state stores in its process: (at most this many writes,
    /// batches).
    pub(crate) batch_sizes: Vec<(usize, u64)>,
}

/// The usage of a silo's Postgres pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PoolStats {
    /// Connections open.
    pub(crate) size: u32,
    /// Connections open and idle.
    pub(crate) idle: u32,
    /// The most it opens (`database_pool_size`).
    pub(crate) max: u32,
}

#[cfg(feature = "postgres")]
fn pool_stats(silo: &SiloInner) -> Option<PoolStats> {
    let pool = silo.metrics.pool.get()?;
    Some(PoolStats { size: pool.size(), idle: pool.num_idle() as u32, max: silo.config.database_pool_size })
}

/// No pool in a build without the `postgres` feature.
#[cfg(not(feature = "postgres"))]
fn pool_stats(_: &SiloInner) -> Option<PoolStats> {
    None
}

/// The group-commit batch sizes of this process's Postgres state stores, by bucket.
#[cfg(feature = "postgres")]
fn batch_sizes() -> Vec<(usize, u64)> {
    grains_storage::__private::batch_sizes()
}

/// No Postgres state stores in a build without the `postgres` feature.
#[cfg(not(feature = "postgres"))]
fn batch_sizes() -> Vec<(usize, u64)> {
    Vec::new()
}

/// The activations of a silo's table by grain type, and its mailboxes' (total, longest) queue lengths.
pub(crate) fn activations_and_mailboxes(silo: &SiloInner) -> (BTreeMap<String, u64>, (u64, u64)) {
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let (mut queued, mut longest) = (0u64, 0u64);
    for entry in silo.table.iter() {
        if !entry.shared.is_confirmed() {
            continue;
        }
        match by_type.get_mut(entry.key().grain_type()) {
            Some(count) => *count += 1,
            None => {
                by_type.insert(entry.key().grain_type().to_owned(), 1);
            }
        }
        let length = entry.shared.mailbox.len() as u64;
        queued += length;
        longest = longest.max(length);
    }
    (by_type, (queued, longest))
}

/// This silo's stats now.
pub(crate) fn local(silo: &SiloInner) -> SiloStats {
    let me = silo.me();
    let view = silo.cluster.view();
    let (activations_by_type, (mailbox_queued, mailbox_longest)) = activations_and_mailboxes(silo);
    let counters = silo.metrics_snapshot();
    SiloStats {
        silo: me.to_string(),
        endpoint: me.endpoint.clone(),
        epoch: me.epoch,
        name: silo.config.name.clone(),
        status: view.status(me).unwrap_or(SiloStatus::Joining).as_str().to_owned(),
        uptime_ms: silo.metrics.started.elapsed().as_millis() as u64,
        activations: activations_by_type.values().sum(),
        activations_by_type,
        mailbox_queued,
        mailbox_longest,
        calls: counters.calls,
        call_errors: counters.call_errors,
        directory_entries: counters.directory_entries,
        methods: silo.metrics.methods(),
        storage: silo.metrics.storage(),
        events: silo.cluster.events.list(),
        pool: pool_stats(silo),
        batch_sizes: batch_sizes(),
    }
}

/// The silo's metrics in the Prometheus text format (`GET /metrics`): the silo-wide counters, then per grain
/// type and method, storage, activations by type and mailboxes.
pub(crate) fn prometheus(silo: &SiloInner) -> String {
    let mut text = silo.metrics_snapshot().to_prometheus();
    let (by_type, mailboxes) = activations_and_mailboxes(silo);
    text.push_str(&crate::metrics::detailed_prometheus(
        &silo.metrics.methods(),
        &silo.metrics.storage(),
        &by_type,
        mailboxes,
    ));
    silo.reminders.write_prometheus(&mut text);
    let name = "grains_storage_batch_size";
    let _ = writeln!(
        text,
        "# HELP {name} Writes per group-commit batch of the Postgres state stores in this process.\n# TYPE {name} histogram"
    );
    let mut batches = 0u64;
    for (le, count) in batch_sizes() {
        batches += count;
        let _ = writeln!(text, "{name}_bucket{{le=\"{le}\"}} {batches}");
    }
    let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {batches}\n{name}_count {batches}");
    if let Some(pool) = pool_stats(silo) {
        for (name, help, value) in [
            ("grains_storage_pool_connections", "Postgres connections open.", pool.size),
            ("grains_storage_pool_idle", "Postgres connections open and idle.", pool.idle),
            ("grains_storage_pool_max", "The most Postgres connections the pool opens.", pool.max),
        ] {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
    }
    text
}

/// Starts exporting traces if the configuration names an OTLP endpoint (see the `otlp` module).
pub(crate) fn start_trace_export(config: &crate::config::SiloConfig) -> Result<(), String> {
    let Some(endpoint) = &config.otlp_endpoint else { return Ok(()) };
    #[cfg(feature = "otlp")]
    {
        crate::otlp::install(endpoint, "grains-silo")
    }
    #[cfg(not(feature = "otlp"))]
    {
        tracing::warn!(%endpoint, "otlp_endpoint is set, but this binary was built without the `otlp` feature: no traces are exported");
        Ok(())
    }
}

/// Starts posting `silo`'s metrics over OTLP if its configuration names an endpoint (feature `otlp`).
pub(crate) fn start_metrics_export(silo: &Arc<SiloInner>) -> Result<(), String> {
    #[cfg(feature = "otlp")]
    if let Some(endpoint) = &silo.config.otlp_endpoint {
        crate::otlp::start_metrics(Arc::downgrade(silo), endpoint, silo.config.otlp_metrics_interval)?;
    }
    let _ = silo;
    Ok(())
}

/// A membership row, as the HTTP API shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Member {
    silo: String,
    endpoint: String,
    epoch: i64,
    name: String,
    status: &'static str,
    gateway: Option<String>,
    started_at_ms: i64,
    heartbeat_at_ms: i64,
    suspicions: usize,
}

impl From<&MembershipEntry> for Member {
    fn from(row: &MembershipEntry) -> Self {
        Member {
            silo: row.silo.to_string(),
            endpoint: row.silo.endpoint.clone(),
            epoch: row.silo.epoch,
            name: row.name.clone(),
            status: row.status.as_str(),
            gateway: row.gateway.clone(),
            started_at_ms: row.started_at_ms,
            heartbeat_at_ms: row.heartbeat_at_ms,
            suspicions: row.suspicions.len(),
        }
    }
}

/// The membership as this silo sees it (`GET /cluster`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Membership {
    /// The silo that answered.
    pub(crate) answered_by: String,
    /// The membership table version of its view.
    pub(crate) version: i64,
    /// Every row, oldest incarnation first.
    pub(crate) silos: Vec<Member>,
}

/// The membership view of `silo`.
pub(crate) fn membership(silo: &SiloInner) -> Membership {
    let view = silo.cluster.view();
    let mut silos: Vec<Member> = view.rows.iter().map(Member::from).collect();
    silos.sort_by(|a, b| (a.started_at_ms, &a.silo).cmp(&(b.started_at_ms, &b.silo)));
    Membership { answered_by: silo.me().to_string(), version: view.version, silos }
}

/// One silo's report in the cluster's stats: its stats, or why they could not be had.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SiloReport {
    pub(crate) silo: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stats: Option<SiloStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// One grain method across the cluster: counters summed and histograms merged over the silos that answered.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MethodTotal {
    pub(crate) grain_type: String,
    pub(crate) method: String,
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    /// Median latency since start, milliseconds.
    pub(crate) p50_ms: Option<f64>,
    /// 99th percentile latency since start, milliseconds.
    pub(crate) p99_ms: Option<f64>,
    pub(crate) latency: HistogramSnapshot,
}

/// The cluster's stats (`GET /dashboard/api/cluster`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClusterStats {
    /// When gathered (Unix ms).
    pub(crate) at_ms: i64,
    /// The membership, as the answering silo sees it.
    pub(crate) membership: Membership,
    /// Each active or stopping silo's report.
    pub(crate) silos: Vec<SiloReport>,
    /// Activations by grain type, over the silos that answered.
    pub(crate) activations_by_type: BTreeMap<String, u64>,
    /// Every method called, over the silos that answered.
    pub(crate) methods: Vec<MethodTotal>,
}

/// Asks `target` for its stats (this silo answers itself without a hop).
async fn stats_of(silo: &Arc<SiloInner>, target: &grains_storage::SiloAddress) -> Result<SiloStats, String> {
    if target == silo.me() {
        return Ok(local(silo));
    }
    let ask = async {
        let connection = silo.cluster.peer(target).await?;
        system::call(&connection, &SystemRequest::Stats, system::deadline_in(PEER_STATS_TIMEOUT)).await
    };
    match tokio::time::timeout(PEER_STATS_TIMEOUT, ask).await {
        Ok(Ok(SystemResponse::Stats(stats))) => Ok(*stats),
        Ok(Ok(other)) => Err(format!("unexpected answer: {other:?}")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {PEER_STATS_TIMEOUT:?}")),
    }
}

/// Gathers the stats of every silo that is active or shutting down in `silo`'s view.
pub(crate) async fn cluster(silo: &Arc<SiloInner>) -> ClusterStats {
    let view = silo.cluster.view();
    let membership = membership(silo);
    let mut targets: Vec<grains_storage::SiloAddress> = view
        .rows
        .iter()
        .filter(|r| matches!(r.status, SiloStatus::Active | SiloStatus::ShuttingDown))
        .map(|r| r.silo.clone())
        .collect();
    if !targets.contains(silo.me()) {
        targets.push(silo.me().clone());
    }
    targets.sort();
    let answers = futures_util::future::join_all(targets.iter().map(|t| stats_of(silo, t))).await;
    let mut activations_by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut methods: BTreeMap<(String, String), MethodTotal> = BTreeMap::new();
    let mut silos = Vec::with_capacity(targets.len());
    for (target, answer) in targets.iter().zip(answers) {
        match answer {
            Ok(stats) => {
                for (grain_type, count) in &stats.activations_by_type {
                    *activations_by_type.entry(grain_type.clone()).or_default() += count;
                }
                for m in &stats.methods {
                    let total =
                        methods.entry((m.grain_type.clone(), m.method.clone())).or_insert_with(|| MethodTotal {
                            grain_type: m.grain_type.clone(),
                            method: m.method.clone(),
                            calls: 0,
                            errors: 0,
                            p50_ms: None,
                            p99_ms: None,
                            latency: HistogramSnapshot::default(),
                        });
                    total.calls += m.calls;
                    total.errors += m.errors;
                    total.latency.merge(&m.latency);
                }
                silos.push(SiloReport { silo: target.to_string(), stats: Some(stats), error: None });
            }
            Err(error) => silos.push(SiloReport { silo: target.to_string(), stats: None, error: Some(error) }),
        }
    }
    let methods = methods
        .into_values()
        .map(|mut m| {
            m.p50_ms = m.latency.quantile(0.5).map(|ns| ns / 1e6);
            m.p99_ms = m.latency.quantile(0.99).map(|ns| ns / 1e6);
            m
        })
        .collect();
    ClusterStats { at_ms: crate::cluster::membership::now_ms(), membership, silos, activations_by_type, methods }
}

/// The grain ids active on one silo, or why they could not be had.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SiloActivations {
    pub(crate) silo: String,
    pub(crate) count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) grains: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// The activations of every active silo, of grain type `grain_type` if given (`GET /cluster/activations`).
/// The grain ids are listed when `list` is set; otherwise only counted.
pub(crate) async fn activations(silo: &Arc<SiloInner>, grain_type: Option<&str>, list: bool) -> Vec<SiloActivations> {
    let view = silo.cluster.view();
    let mut targets = view.active.clone();
    if !targets.contains(silo.me()) {
        targets.push(silo.me().clone());
    }
    targets.sort();
    let ask = |target: grains_storage::SiloAddress| async move {
        let grains = if &target == silo.me() {
            Ok(silo.table.confirmed())
        } else {
            let call = async {
                let connection = silo.cluster.peer(&target).await?;
                system::call(&connection, &SystemRequest::Activations, system::deadline_in(PEER_STATS_TIMEOUT)).await
            };
            match tokio::time::timeout(PEER_STATS_TIMEOUT, call).await {
                Ok(Ok(SystemResponse::Activations(grains))) => Ok(grains),
                Ok(Ok(other)) => Err(format!("unexpected answer: {other:?}")),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no answer within {PEER_STATS_TIMEOUT:?}")),
            }
        };
        match grains {
            Ok(grains) => {
                let mut ids: Vec<String> = grains
                    .iter()
                    .filter(|g| grain_type.is_none_or(|t| g.grain_type() == t))
                    .map(ToString::to_string)
                    .collect();
                ids.sort();
                SiloActivations { silo: target.to_string(), count: ids.len(), grains: list.then_some(ids), error: None }
            }
            Err(error) => SiloActivations { silo: target.to_string(), count: 0, grains: None, error: Some(error) },
        }
    };
    futures_util::future::join_all(targets.into_iter().map(ask)).await
}
