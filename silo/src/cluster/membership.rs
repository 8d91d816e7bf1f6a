//! Membership, the Orleans way: join by writing a row, heartbeat it, probe peers directly, write suspicion
//! votes with compare-and-swap, and declare a silo dead once enough peers suspect it within a window.
//!
//! The decision rules are pure functions ([`add_vote`], [`probe_targets`]) over table rows and an injected
//! clock; the agent loop around them does the I/O. Every table change is written with the table version and
//! the row etag, so concurrent voters cannot lose each other's votes: a voter that loses the race re-reads
//! and votes again.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use grains_storage::{MembershipEntry, SiloAddress, SiloStatus, StorageError, Suspicion};

use super::system::{self, SystemResponse};
use super::{Cluster, ClusterView};
use crate::config::ClusterTimings;
use crate::silo::SiloInner;

/// Wall-clock milliseconds since the Unix epoch (the membership table's clock).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// How many votes declare a silo dead: the configured number, or every other active silo when fewer.
pub(crate) fn votes_needed(timings: &ClusterTimings, active_others: usize) -> usize {
    timings.votes_for_death.min(active_others.max(1))
}

/// `row` with `voter`'s vote added at `now_ms` (replacing its older vote, dropping expired ones) and its
/// status set to Dead when the fresh votes reach `needed`.
pub(crate) fn add_vote(
    row: &MembershipEntry,
    voter: &SiloAddress,
    now_ms: i64,
    expiration: Duration,
    needed: usize,
) -> MembershipEntry {
    let oldest = now_ms - expiration.as_millis() as i64;
    let mut entry = row.clone();
    entry.suspicions.retain(|s| s.at_ms >= oldest && &s.by != voter);
    entry.suspicions.push(Suspicion { by: voter.clone(), at_ms: now_ms });
    if entry.suspicions.len() >= needed {
        entry.status = SiloStatus::Dead;
    }
    entry
}

/// The peers `me` probes: the `count` silos following it on a ring of silo identities, so that every silo is
/// watched by the `count` silos preceding it.
pub(crate) fn probe_targets(me: &SiloAddress, active: &[SiloAddress], count: usize) -> Vec<SiloAddress> {
    let position = |s: &SiloAddress| (xxhash_rust::xxh3::xxh3_64(s.to_string().as_bytes()), s.clone());
    let mut ring: Vec<(u64, SiloAddress)> = active.iter().filter(|s| *s != me).map(position).collect();
    ring.sort();
    let mine = position(me);
    let start = ring.partition_point(|p| *p < mine);
    (0..ring.len().min(count)).map(|i| ring[(start + i) % ring.len()].1.clone()).collect()
}

/// Registers this silo: marks older incarnations of its endpoint dead, inserts its row as Joining, then
/// turns it Active.
pub(crate) async fn join(cluster: &Cluster, name: &str, gateway: Option<String>) -> Result<(), StorageError> {
    let now = now_ms();
    let entry = MembershipEntry {
        silo: cluster.me.clone(),
        name: name.to_owned(),
        status: SiloStatus::Joining,
        gateway,
        started_at_ms: cluster.me.epoch,
        heartbeat_at_ms: now,
        suspicions: Vec::new(),
    };
    loop {
        let snapshot = cluster.table.read_all().await?;
        if let Some(stale) = snapshot.rows.iter().find(|r| {
            r.entry.silo.endpoint == cluster.me.endpoint
                && r.entry.silo.epoch < cluster.me.epoch
                && r.entry.status != SiloStatus::Dead
        }) {
            let dead = MembershipEntry { status: SiloStatus::Dead, ..stale.entry.clone() };
            tracing::info!(previous = %stale.entry.silo, "declaring this endpoint's previous incarnation dead");
            cluster.table.update_row(&dead, &stale.etag, snapshot.version).await?;
            continue;
        }
        if snapshot.row(&cluster.me).is_some() || cluster.table.insert_row(&entry, snapshot.version).await? {
            break;
        }
    }
    set_status(cluster, SiloStatus::Active).await
}

/// Writes this silo's status (compare-and-swap, retried until it lands).
pub(crate) async fn set_status(cluster: &Cluster, status: SiloStatus) -> Result<(), StorageError> {
    for _ in 0..100 {
        let snapshot = cluster.table.read_all().await?;
        let Some(row) = snapshot.row(&cluster.me) else { return Ok(()) };
        if row.entry.status == status || row.entry.status == SiloStatus::Dead {
            return Ok(());
        }
        let entry = MembershipEntry { status, heartbeat_at_ms: now_ms(), ..row.entry.clone() };
        if cluster.table.update_row(&entry, &row.etag, snapshot.version).await? {
            tracing::info!(silo = %cluster.me, ?status, "membership status written");
            return Ok(());
        }
    }
    Err(StorageError::Unavailable("membership table kept changing under the status update".into()))
}

/// Votes `peer` dead-suspect; declares it Dead if the votes suffice. Returns whether the table changed.
async fn suspect(cluster: &Cluster, peer: &SiloAddress) -> Result<bool, StorageError> {
    for _ in 0..10 {
        let snapshot = cluster.table.read_all().await?;
        let Some(row) = snapshot.row(peer) else { return Ok(false) };
        if row.entry.status == SiloStatus::Dead {
            return Ok(false);
        }
        let active_others =
            snapshot.rows.iter().filter(|r| r.entry.status == SiloStatus::Active && &r.entry.silo != peer).count();
        let needed = votes_needed(&cluster.timings, active_others);
        let entry = add_vote(&row.entry, &cluster.me, now_ms(), cluster.timings.vote_expiration, needed);
        if cluster.table.update_row(&entry, &row.etag, snapshot.version).await? {
            if entry.status == SiloStatus::Dead {
                tracing::warn!(silo = %peer, votes = entry.suspicions.len(), "declared dead");
            } else {
                tracing::info!(silo = %peer, votes = entry.suspicions.len(), needed, "suspected");
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// The membership agent of one silo: table refresh, heartbeats, probes. Ends when the silo is dropped or
/// stops.
pub(crate) async fn run_agent(silo: Weak<SiloInner>) {
    let Some(timings) = silo.upgrade().map(|s| s.cluster.timings) else { return };
    let mut refresh = tokio::time::interval(timings.table_refresh_interval);
    let mut probe = tokio::time::interval(timings.probe_interval);
    let mut heartbeat = tokio::time::interval(timings.heartbeat_interval);
    for ticker in [&mut refresh, &mut probe, &mut heartbeat] {
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut misses: HashMap<SiloAddress, u32> = HashMap::new();
    loop {
        let notified = match silo.upgrade() {
            Some(s) => s.cluster.clone(),
            None => return,
        };
        let wake = notified.refresh_now.notified();
        tokio::select! {
            _ = refresh.tick() => {}
            () = wake => {}
            _ = heartbeat.tick() => {
                let Some(silo) = silo.upgrade() else { return };
                if silo.is_stopped() { return; }
                if let Err(error) = silo.cluster.table.heartbeat(&silo.cluster.me, now_ms()).await {
                    tracing::warn!(%error, "heartbeat not written");
                }
                continue;
            }
            _ = probe.tick() => {
                let Some(silo) = silo.upgrade() else { return };
                if silo.is_stopped() { return; }
                if probe_round(&silo.cluster, &mut misses).await {
                    silo.cluster.broadcast_membership_changed();
                    refresh_view(&silo).await;
                }
                continue;
            }
        }
        let Some(silo) = silo.upgrade() else { return };
        if silo.is_stopped() {
            return;
        }
        refresh_view(&silo).await;
    }
}

/// Reads the table and installs the view it describes.
pub(crate) async fn refresh_view(silo: &Arc<SiloInner>) {
    let started = std::time::Instant::now();
    match silo.cluster.table.read_all().await {
        Ok(snapshot) => {
            let view = ClusterView::from_snapshot(&snapshot);
            // The read confirms this silo is still a member as of when it started: the lease runs from there.
            if view.status(&silo.cluster.me).is_some_and(|s| s != SiloStatus::Dead) {
                silo.cluster.lease.renew(started);
            }
            silo.apply_view(view)
        }
        Err(error) => tracing::warn!(%error, "membership table not readable"),
    }
}

/// Probes this silo's targets once; suspects those that missed too many probes. Returns whether the table
/// changed.
async fn probe_round(cluster: &Cluster, misses: &mut HashMap<SiloAddress, u32>) -> bool {
    let view = cluster.view();
    let targets = probe_targets(&cluster.me, &view.active, cluster.timings.probed_peers);
    misses.retain(|silo, _| targets.contains(silo));
    let probes = targets.iter().map(|target| async move {
        let deadline = system::deadline_in(cluster.timings.probe_timeout);
        let answer = tokio::time::timeout_at(deadline, cluster.probe(target, deadline)).await;
        (target, answer)
    });
    let mut changed = false;
    for (target, answer) in futures_util::future::join_all(probes).await {
        match answer {
            Ok(Ok(SystemResponse::Pong { silo, activations })) if &silo == target => {
                cluster.loads.insert(silo, activations);
                misses.remove(target);
            }
            other => {
                let missed = misses.entry(target.clone()).or_default();
                *missed += 1;
                tracing::debug!(silo = %target, missed = *missed, answer = ?other.map(|r| r.map(|_| ())), "probe missed");
                if *missed >= cluster.timings.missed_probes_limit {
                    *missed = 0;
                    match suspect(cluster, target).await {
                        Ok(wrote) => changed |= wrote,
                        Err(error) => tracing::warn!(%error, "suspicion not written"),
                    }
                }
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silo(port: u16) -> SiloAddress {
        SiloAddress { endpoint: format!("127.0.0.1:{port}"), epoch: 1 }
    }

    fn row(port: u16) -> MembershipEntry {
        MembershipEntry {
            silo: silo(port),
            name: "s".into(),
            status: SiloStatus::Active,
            gateway: None,
            started_at_ms: 0,
            heartbeat_at_ms: 0,
            suspicions: Vec::new(),
        }
    }

    #[test]
    fn one_vote_suspects_and_the_second_declares_dead() {
        let expiration = Duration::from_secs(30);
        let once = add_vote(&row(3), &silo(1), 1_000, expiration, 2);
        assert_eq!(once.status, SiloStatus::Active);
        let again = add_vote(&once, &silo(1), 2_000, expiration, 2);
        assert_eq!((again.status, again.suspicions.len()), (SiloStatus::Active, 1), "one voter counts once");
        let twice = add_vote(&again, &silo(2), 3_000, expiration, 2);
        assert_eq!(twice.status, SiloStatus::Dead);
    }

    #[test]
    fn expired_votes_do_not_count() {
        let expiration = Duration::from_secs(30);
        let old = add_vote(&row(3), &silo(1), 0, expiration, 2);
        let later = add_vote(&old, &silo(2), 31_000, expiration, 2);
        assert_eq!((later.status, later.suspicions.len()), (SiloStatus::Active, 1));
    }

    #[test]
    fn with_fewer_silos_than_votes_every_other_silo_suffices() {
        let timings = ClusterTimings::fast();
        assert_eq!(votes_needed(&timings, 1), 1);
        assert_eq!(votes_needed(&timings, 2), 2);
        assert_eq!(votes_needed(&timings, 9), 2);
    }

    #[test]
    fn each_silo_probes_distinct_others_and_every_silo_is_probed() {
        let active: Vec<SiloAddress> = (1..=6).map(silo).collect();
        let mut probed: HashMap<SiloAddress, usize> = HashMap::new();
        for me in &active {
            let targets = probe_targets(me, &active, 3);
            assert_eq!(targets.len(), 3);
            assert!(!targets.contains(me));
            for t in targets {
                *probed.entry(t).or_default() += 1;
            }
        }
        assert_eq!(probed.len(), 6, "nobody goes unwatched: {probed:?}");
        assert_eq!(probe_targets(&silo(1), &[silo(1)], 3), Vec::<SiloAddress>::new());
        assert_eq!(probe_targets(&silo(1), &[silo(1), silo(2)], 3), vec![silo(2)]);
    }
}
