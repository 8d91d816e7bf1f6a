//! Membership, the Orleans way: join by writing a row, heartbeat it, probe peers directly, write suspicion
//! votes with compare-and-swap, and declare a silo dead once enough peers suspect it within a window.
//!
//! The decision rules are pure functions ([`decide_vote`], [`votes_needed`], [`probe_targets`]) over table rows
//! and the time, passed in; the agent loop around them does the I/O and reads the time from [`now_ms`], which
//! a simulator drives (`crate::sim`). Every table change is written with the table
//! version and the row etag, so concurrent voters cannot lose each other's votes: a voter that loses the race
//! re-reads and votes again.
//!
//! Who may vote, and how many votes kill, decide whether a partition can empty the cluster:
//! - only a silo whose own row is Active votes, and only Active silos' votes count: a silo declared dead (a
//!   zombie that was frozen, or cut off from its peers but not from the table) cannot take anyone down with it,
//!   and a voter that finds itself Dead stops;
//! - the votes needed are `min(votes_for_death, ceil(active / 2))` over the Active silos, suspect included: a
//!   minority smaller than that can never declare a member of the majority dead (for clusters of up to
//!   `2 × votes_for_death` silos, no minority at all can). Of two silos that suspect each other, one vote
//!   suffices, and the table's compare-and-swap lets exactly one of them land it; the other then finds itself
//!   Dead and never votes.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use grains::CallError;
use grains_storage::{
    MembershipEntry, MembershipSnapshot, MembershipTable, SiloAddress, SiloStatus, StorageError, Suspicion,
};

use super::system::{self, SystemResponse};
use super::{Cluster, ClusterView};
use crate::config::ClusterTimings;

/// Wall-clock milliseconds since the Unix epoch (the membership table's clock).
pub(crate) fn now_ms() -> i64 {
    crate::sim::unix_ms() as i64
}

/// How many votes declare a silo dead, with `active` silos Active in the table (the suspect included): the
/// configured number, but never more than half the active silos (rounded up), so a small cluster can still
/// remove a dead member.
pub(crate) fn votes_needed(timings: &ClusterTimings, active: usize) -> usize {
    timings.votes_for_death.min(active.div_ceil(2)).max(1)
}

/// `row` with `voter`'s vote added at `now_ms` (replacing its older vote, dropping expired ones and those of
/// voters for which `counts` is false) and its status set to Dead when the votes reach `needed`.
pub(crate) fn add_vote(
    row: &MembershipEntry,
    voter: &SiloAddress,
    now_ms: i64,
    expiration: Duration,
    needed: usize,
    counts: impl Fn(&SiloAddress) -> bool,
) -> MembershipEntry {
    let oldest = now_ms - expiration.as_millis() as i64;
    let mut entry = row.clone();
    entry.suspicions.retain(|s| s.at_ms >= oldest && &s.by != voter && counts(&s.by));
    entry.suspicions.push(Suspicion { by: voter.clone(), at_ms: now_ms });
    if entry.suspicions.len() >= needed {
        entry.status = SiloStatus::Dead;
    }
    entry
}

/// What a voter does about a suspect, decided from one table snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Vote {
    /// The voter's own row is not Active (Dead, or missing): it does not vote.
    VoterNotActive(Option<SiloStatus>),
    /// The suspect is already Dead, or not in the table: nothing to write.
    Moot,
    /// Write this row over the suspect's: the vote added, and the status Dead if the votes now suffice.
    Write(MembershipEntry),
}

/// The vote `voter` casts against `suspect` at `now_ms`, given `snapshot`.
pub(crate) fn decide_vote(
    snapshot: &MembershipSnapshot,
    voter: &SiloAddress,
    suspect: &SiloAddress,
    now_ms: i64,
    timings: &ClusterTimings,
) -> Vote {
    let status = |silo: &SiloAddress| snapshot.row(silo).map(|r| r.entry.status);
    let voter_status = status(voter);
    if voter_status != Some(SiloStatus::Active) {
        return Vote::VoterNotActive(voter_status);
    }
    let Some(row) = snapshot.row(suspect).filter(|r| r.entry.status != SiloStatus::Dead) else { return Vote::Moot };
    let active = snapshot.rows.iter().filter(|r| r.entry.status == SiloStatus::Active).count();
    let needed = votes_needed(timings, active);
    let counts = |silo: &SiloAddress| status(silo) == Some(SiloStatus::Active);
    Vote::Write(add_vote(&row.entry, voter, now_ms, timings.vote_expiration, needed, counts))
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

/// What one suspicion attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suspected {
    /// A vote was written; the suspect stays (for now).
    Voted,
    /// The vote declared the suspect Dead.
    DeclaredDead,
    /// Nothing to do: the suspect is already Dead or gone, or the table kept changing under the vote.
    Nothing,
    /// The voter is not Active in the table (Dead: it must stop), so it did not vote.
    VoterNotActive(Option<SiloStatus>),
}

/// `voter` votes `suspect` dead-suspect, declaring it Dead if the votes suffice (compare-and-swap, re-read and
/// retried when the table changed under it).
pub(crate) async fn suspect(
    table: &dyn MembershipTable,
    voter: &SiloAddress,
    suspect: &SiloAddress,
    timings: &ClusterTimings,
    now_ms: impl Fn() -> i64,
) -> Result<Suspected, StorageError> {
    for _ in 0..10 {
        let snapshot = table.read_all().await?;
        let entry = match decide_vote(&snapshot, voter, suspect, now_ms(), timings) {
            Vote::VoterNotActive(status) => return Ok(Suspected::VoterNotActive(status)),
            Vote::Moot => return Ok(Suspected::Nothing),
            Vote::Write(entry) => entry,
        };
        let Some(etag) = snapshot.row(suspect).map(|r| &r.etag) else { return Ok(Suspected::Nothing) };
        if table.update_row(&entry, etag, snapshot.version).await? {
            if entry.status == SiloStatus::Dead {
                tracing::warn!(silo = %suspect, votes = entry.suspicions.len(), "declared dead");
                return Ok(Suspected::DeclaredDead);
            }
            tracing::info!(silo = %suspect, votes = entry.suspicions.len(), "suspected");
            return Ok(Suspected::Voted);
        }
    }
    Ok(Suspected::Nothing)
}

/// The membership agent of one silo: table refresh, heartbeats, probes. Ends when the silo is dropped or
/// stops.
pub(crate) async fn run_agent(cluster: Weak<Cluster>) {
    let Some((timings, health)) = cluster.upgrade().map(|c| (c.timings, c.health.clone())) else { return };
    tokio::spawn(super::health::run_watchdog(cluster.clone(), health));
    let mut refresh = tokio::time::interval(timings.table_refresh_interval);
    let mut probe = tokio::time::interval(timings.probe_interval);
    let mut heartbeat = tokio::time::interval(timings.heartbeat_interval);
    for ticker in [&mut refresh, &mut probe, &mut heartbeat] {
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut misses: HashMap<SiloAddress, u32> = HashMap::new();
    loop {
        let Some(notified) = cluster.upgrade() else { return };
        let wake = notified.refresh_now.notified();
        tokio::select! {
            biased; // no random branch order: a simulated run repeats exactly
            _ = refresh.tick() => {}
            () = wake => {}
            _ = heartbeat.tick() => {
                let Some(cluster) = cluster.upgrade() else { return };
                if cluster.is_stopped() { return; }
                if let Err(error) = cluster.table.heartbeat(&cluster.me, now_ms()).await {
                    tracing::warn!(%error, "heartbeat not written");
                }
                continue;
            }
            _ = probe.tick() => {
                let Some(cluster) = cluster.upgrade() else { return };
                if cluster.is_stopped() { return; }
                if probe_round(&cluster, &mut misses).await {
                    cluster.broadcast_membership_changed();
                    refresh_view(&cluster).await;
                }
                continue;
            }
        }
        let Some(cluster) = cluster.upgrade() else { return };
        if cluster.is_stopped() {
            return;
        }
        refresh_view(&cluster).await;
    }
}

/// Reads the table and installs the view it describes.
pub(crate) async fn refresh_view(cluster: &Arc<Cluster>) {
    let started = tokio::time::Instant::now();
    match cluster.table.read_all().await {
        Ok(snapshot) => {
            let view = ClusterView::from_snapshot(&snapshot);
            // The read confirms this silo is still a member as of when it started: the lease runs from there.
            if view.status(&cluster.me).is_some_and(|s| s != SiloStatus::Dead) {
                cluster.lease.renew(started);
            }
            cluster.apply_view(view)
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
    let started = tokio::time::Instant::now();
    let probes = targets.iter().map(|target| async move {
        let deadline = system::deadline_in(cluster.timings.probe_timeout);
        let answer = match tokio::time::timeout_at(deadline, cluster.probe(target, deadline)).await {
            Ok(answer) => answer,
            Err(_) => Err(CallError::Timeout(cluster.timings.probe_timeout)),
        };
        (target, answer)
    });
    let answers = futures_util::future::join_all(probes).await;
    // Timeouts seen while this silo's own runtime ran late say nothing about the peers (Orleans' local health
    // monitor); a refused connection or an error answer still counts.
    let degraded = cluster.health.degraded_since(started);
    let mut changed = false;
    for (target, answer) in answers {
        match answer {
            Ok(SystemResponse::Pong { silo, activations }) if &silo == target => {
                cluster.loads.insert(silo, activations);
                misses.remove(target);
            }
            Err(CallError::Timeout(_)) if degraded.is_some() => {
                tracing::info!(silo = %target, lag = ?degraded, "probe timed out while this silo ran late; not counted");
            }
            other => {
                let missed = misses.entry(target.clone()).or_default();
                *missed += 1;
                tracing::debug!(silo = %target, missed = *missed, answer = ?other.map(|_| ()), "probe missed");
                if *missed >= cluster.timings.missed_probes_limit {
                    *missed = 0;
                    match suspect(cluster.table.as_ref(), &cluster.me, target, &cluster.timings, now_ms).await {
                        Ok(Suspected::Voted | Suspected::DeclaredDead) => changed = true,
                        Ok(Suspected::Nothing) => {}
                        Ok(Suspected::VoterNotActive(status)) => {
                            // Dead: the view refresh that follows stops this silo.
                            tracing::warn!(?status, silo = %target, "not voting: this silo is not active in the table");
                            return true;
                        }
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

    fn every_vote(_: &SiloAddress) -> bool {
        true
    }

    #[test]
    fn one_vote_suspects_and_the_second_declares_dead() {
        let expiration = Duration::from_secs(30);
        let once = add_vote(&row(3), &silo(1), 1_000, expiration, 2, every_vote);
        assert_eq!(once.status, SiloStatus::Active);
        let again = add_vote(&once, &silo(1), 2_000, expiration, 2, every_vote);
        assert_eq!((again.status, again.suspicions.len()), (SiloStatus::Active, 1), "one voter counts once");
        let twice = add_vote(&again, &silo(2), 3_000, expiration, 2, every_vote);
        assert_eq!(twice.status, SiloStatus::Dead);
    }

    #[test]
    fn expired_votes_do_not_count() {
        let expiration = Duration::from_secs(30);
        let old = add_vote(&row(3), &silo(1), 0, expiration, 2, every_vote);
        let later = add_vote(&old, &silo(2), 31_000, expiration, 2, every_vote);
        assert_eq!((later.status, later.suspicions.len()), (SiloStatus::Active, 1));
    }

    #[test]
    fn the_votes_needed_are_capped_at_half_the_active_silos() {
        let timings = ClusterTimings::fast();
        let needed: Vec<usize> = (1..=6).map(|active| votes_needed(&timings, active)).collect();
        assert_eq!(needed, [1, 1, 2, 2, 2, 2]);
        let many = ClusterTimings { votes_for_death: 9, ..timings };
        assert_eq!(votes_needed(&many, 5), 3);
    }

    /// A table snapshot of silos `1..=n` with the given statuses (Active unless listed).
    fn snapshot(n: u16, statuses: &[(u16, SiloStatus)]) -> MembershipSnapshot {
        let rows = (1..=n)
            .map(|port| {
                let status = statuses.iter().find(|(p, _)| *p == port).map_or(SiloStatus::Active, |(_, s)| *s);
                grains_storage::MembershipRow { entry: MembershipEntry { status, ..row(port) }, etag: port.to_string() }
            })
            .collect();
        MembershipSnapshot { version: 1, rows }
    }

    /// `snapshot` with `written` in place of its silo's row.
    fn with_row(mut snapshot: MembershipSnapshot, written: MembershipEntry) -> MembershipSnapshot {
        if let Some(row) = snapshot.rows.iter_mut().find(|r| r.entry.silo == written.silo) {
            row.entry = written;
        }
        snapshot
    }

    #[test]
    fn a_dead_silo_never_votes() {
        let timings = ClusterTimings::fast();
        // Silo 1 was declared dead by 2 and 3, but is cut off from them and still reads the table.
        let table = snapshot(3, &[(1, SiloStatus::Dead)]);
        assert_eq!(
            decide_vote(&table, &silo(1), &silo(2), 1_000, &timings),
            Vote::VoterNotActive(Some(SiloStatus::Dead))
        );
        let gone = MembershipSnapshot { rows: table.rows[1..].to_vec(), ..table.clone() };
        assert_eq!(decide_vote(&gone, &silo(1), &silo(2), 1_000, &timings), Vote::VoterNotActive(None));
        // A vote it cast while alive no longer counts towards a death.
        let Vote::Write(voted_by_1) = decide_vote(&snapshot(4, &[]), &silo(1), &silo(2), 1_000, &timings) else {
            panic!("an active silo votes")
        };
        let four = with_row(snapshot(4, &[(1, SiloStatus::Dead)]), voted_by_1);
        let Vote::Write(voted_by_3) = decide_vote(&four, &silo(3), &silo(2), 2_000, &timings) else {
            panic!("an active silo votes")
        };
        assert_eq!(voted_by_3.status, SiloStatus::Active, "2 of 3 active silos needed; the dead one's vote is void");
        assert_eq!(voted_by_3.suspicions.iter().map(|s| s.by.clone()).collect::<Vec<_>>(), [silo(3)]);
    }

    #[test]
    fn a_minority_cannot_declare_the_majority_dead() {
        // Each cluster size, with failure detection that needs (up to) as many votes as the minority could cast
        // plus one: every minority of silos votes against one member of the majority.
        for n in 1..=8u16 {
            let timings = ClusterTimings { votes_for_death: 4, ..ClusterTimings::fast() };
            let minority = (n - 1) / 2;
            let mut table = snapshot(n, &[]);
            let target = silo(n);
            for voter in 1..=minority {
                match decide_vote(&table, &silo(voter), &target, 1_000, &timings) {
                    Vote::Write(entry) => {
                        assert_eq!(entry.status, SiloStatus::Active, "{minority} of {n} silos declared one dead");
                        table = with_row(table, entry);
                    }
                    other => panic!("an active silo votes: {other:?}"),
                }
            }
            // The majority can: silos minority+1.. vote against silo 1.
            let mut table = snapshot(n, &[]);
            let dead = (minority + 1..=n).filter(|&v| v != 1).any(|voter| {
                let Vote::Write(entry) = decide_vote(&table, &silo(voter), &silo(1), 1_000, &timings) else {
                    return false;
                };
                let dead = entry.status == SiloStatus::Dead;
                table = with_row(table.clone(), entry);
                dead
            });
            assert!(dead || n == 1, "the majority of {n} silos could not remove one");
        }
        // With the fast profile (2 votes), 3 and 4 silos: one silo alone never removes another.
        for n in [3, 4] {
            let one = decide_vote(&snapshot(n, &[]), &silo(1), &silo(2), 1_000, &ClusterTimings::fast());
            assert!(matches!(one, Vote::Write(ref e) if e.status == SiloStatus::Active), "{n} silos: {one:?}");
        }
    }

    /// Two silos that each voted the other suspect, racing with `order`: which silo's read (`r`) or write (`w`)
    /// step comes next (silo 1 or 2).
    async fn race(order: &[(u16, char)]) -> (SiloStatus, SiloStatus) {
        let timings = ClusterTimings::fast();
        let table = grains_storage::MemoryMembershipTable::new();
        for port in [1, 2] {
            let version = table.read_all().await.unwrap().version;
            assert!(table.insert_row(&row(port), version).await.unwrap());
        }
        let other = |me: u16| 3 - me;
        let mut read: [Option<MembershipSnapshot>; 3] = Default::default();
        for &(me, step) in order {
            match step {
                'r' => read[me as usize] = Some(table.read_all().await.unwrap()),
                _ => {
                    let snapshot = read[me as usize].take().expect("read before write");
                    if let Vote::Write(entry) = decide_vote(&snapshot, &silo(me), &silo(other(me)), 1_000, &timings) {
                        let etag = &snapshot.row(&silo(other(me))).unwrap().etag;
                        table.update_row(&entry, etag, snapshot.version).await.unwrap();
                    }
                }
            }
        }
        // Then each tries to completion, as the agent would on its next missed probes.
        for me in [1, 2] {
            suspect(&table, &silo(me), &silo(other(me)), &timings, || 2_000).await.unwrap();
        }
        let snapshot = table.read_all().await.unwrap();
        let status = |port| snapshot.row(&silo(port)).unwrap().entry.status;
        (status(1), status(2))
    }

    #[tokio::test]
    async fn of_two_silos_that_suspect_each_other_one_survives() {
        let interleavings: [&[(u16, char)]; 6] = [
            &[(1, 'r'), (1, 'w'), (2, 'r'), (2, 'w')],
            &[(1, 'r'), (2, 'r'), (1, 'w'), (2, 'w')],
            &[(1, 'r'), (2, 'r'), (2, 'w'), (1, 'w')],
            &[(2, 'r'), (1, 'r'), (1, 'w'), (2, 'w')],
            &[(2, 'r'), (2, 'w'), (1, 'r'), (1, 'w')],
            &[],
        ];
        for order in interleavings {
            let (one, two) = race(order).await;
            let dead = [one, two].iter().filter(|s| **s == SiloStatus::Dead).count();
            assert_eq!(dead, 1, "{order:?}: silo 1 {one:?}, silo 2 {two:?}");
            assert!([one, two].contains(&SiloStatus::Active), "{order:?}: silo 1 {one:?}, silo 2 {two:?}");
        }
    }

    #[tokio::test]
    async fn a_voter_that_finds_itself_dead_says_so_instead_of_voting() {
        let timings = ClusterTimings::fast();
        let table = grains_storage::MemoryMembershipTable::new();
        for (port, status) in [(1, SiloStatus::Dead), (2, SiloStatus::Active), (3, SiloStatus::Active)] {
            let version = table.read_all().await.unwrap().version;
            table.insert_row(&MembershipEntry { status, ..row(port) }, version).await.unwrap();
        }
        for target in [2, 3] {
            let outcome = suspect(&table, &silo(1), &silo(target), &timings, || 1_000).await.unwrap();
            assert_eq!(outcome, Suspected::VoterNotActive(Some(SiloStatus::Dead)));
        }
        let snapshot = table.read_all().await.unwrap();
        assert!(snapshot.rows.iter().all(|r| r.entry.suspicions.is_empty()), "nothing written");
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
