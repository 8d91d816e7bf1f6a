//! Grain state in `grains_state`: JSONB documents with etag-checked writes, group-committed, optionally fenced
//! by the writing silo's membership row.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use serde_json::value::RawValue;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::{Fence, storage_error};
use crate::{ETag, GrainStateStore, SiloAddress, StateKey, StorageError, StoredState};

/// Grain state in Postgres: one row per (grain type, grain key, state name).
///
/// - The first write of a key is an `INSERT … ON CONFLICT DO NOTHING`: of writers racing to create the row,
///   exactly one inserts; the others get a conflict.
/// - Later writes are `UPDATE … WHERE etag = $expected`: a writer holding a stale etag matches no row and
///   gets a conflict.
/// - Every write takes a fresh etag from `grains_etag_seq`, so etags are never reused.
///
/// **Group commit.** Writes from many grains that arrive together are applied by one statement — an
/// `INSERT … ON CONFLICT DO NOTHING` and an `UPDATE … WHERE etag = expected` over the same `unnest(…)` of the
/// batch, each row still checked against its own etag — and committed once. Each writer is answered only after that commit, so an acknowledged write is
/// durable exactly as with one commit per write, while the commit (the fsync) is paid once per batch instead
/// of once per grain. A single writer sees the latency of one small transaction. Two batches may be committed
/// at once, but a second is sent beside a first only with 32 writes or more; fewer wait for the first to end
/// (at most 5 ms), so that under load batches stay large instead of alternating with a batch of one or two
/// writes.
///
/// **One bad write fails alone.** A statement is all or nothing, so a record Postgres refuses (a string with
/// U+0000, which JSONB cannot hold; a key too long for the index) would fail every write batched with it. When a
/// batch is refused as [`StorageError::Rejected`], nothing of it was applied, so the writer splits it in halves
/// and commits each apart, recursively, until each refused write stands alone: its writer gets `Rejected`
/// naming its key, every other writer its etag. With `k` bad writes in a batch of `n` that costs about
/// `2·k·log2(n)` extra statements, paid only when something was refused.
///
/// # Fencing
/// A silo that its peers declared dead may not know it yet (a frozen process, a partition), and its grains
/// are already active elsewhere; writes it still commits would overwrite the new owners' state (or, with
/// etags, at least make them fail). A store made with [`fenced`](Self::fenced) for the silo's own membership
/// row, in the same database as the membership table, commits a write only while that row exists and is not
/// `dead`: each batch (and each clear) runs in a transaction that first takes
/// `SELECT … FROM grains_membership WHERE <this silo> AND status <> 'dead' FOR SHARE`, then writes, then
/// commits. A refused write fails with [`StorageError::Fenced`] and changes nothing.
///
/// Why that serializes a write with a dead-declaration: declaring a silo dead is an `UPDATE` of its row, which
/// needs the row's `FOR NO KEY UPDATE` lock, and that conflicts with `FOR SHARE` (not with `FOR KEY SHARE`,
/// which would not do: `status` is no key column).
/// - A batch that holds the share lock first commits its writes before the declaration's `UPDATE` can go on;
///   the declaration commits after them.
/// - A batch that asks for the lock while the declaration's `UPDATE` holds it waits for that transaction; once
///   it commits, Postgres re-checks the `WHERE` on the new row version (read committed re-checks locked rows),
///   finds `dead`, returns no row, and the batch rolls back. If the declaration rolled back instead (it lost the
///   table-version race), the batch goes on.
///
/// So no write commits after the declaration has committed. Reads are not fenced. Costs: a fenced batch takes
/// four round trips (`BEGIN`, the lock, the write, `COMMIT`) instead of one, still once per batch, not per
/// write; and the silo's heartbeat (an `UPDATE` of the same row) waits for in-flight batches to commit.
#[derive(Debug, Clone)]
pub struct PostgresStateStore {
    pool: PgPool,
    fence: Option<Arc<Fence>>,
    batcher: Arc<OnceLock<mpsc::UnboundedSender<PendingWrite>>>,
}

/// The most writes one transaction carries.
const MAX_BATCH: usize = 512;

/// How many batches of each size the group-commit writers of this process have committed: bucket `i` counts
/// batches of at most `2^i` writes (and more than `2^(i-1)`), up to [`MAX_BATCH`].
static BATCH_SIZES: [std::sync::atomic::AtomicU64; 10] = [const { std::sync::atomic::AtomicU64::new(0) }; 10];

/// The group-commit batch sizes of every Postgres state store in this process, for metrics: pairs of (at most
/// this many writes, batches), ascending, cumulative counts not included (each bucket counts its own batches).
pub fn batch_sizes() -> Vec<(usize, u64)> {
    BATCH_SIZES
        .iter()
        .enumerate()
        .map(|(i, count)| (1usize << i, count.load(std::sync::atomic::Ordering::Relaxed)))
        .collect()
}

fn record_batch(writes: usize) {
    let bucket = writes.max(1).next_power_of_two().trailing_zeros() as usize;
    BATCH_SIZES[bucket.min(BATCH_SIZES.len() - 1)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Writer tasks committing batches concurrently.
const WRITERS: usize = 2;

#[derive(Debug)]
struct PendingWrite {
    key: StateKey,
    /// The document, serialized by its writer (not by the writer task that commits the batch) and sent as is.
    document: Box<RawValue>,
    expected: Option<i64>,
    reply: oneshot::Sender<Result<ETag, StorageError>>,
}

impl PostgresStateStore {
    /// A store over `pool` (migrated with [`super::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool, fence: None, batcher: Arc::new(OnceLock::new()) }
    }

    /// A store over `pool` whose writes commit only while `silo` is not dead in the membership table of
    /// `cluster_id` (see [fencing](Self#fencing)).
    pub fn fenced(pool: PgPool, cluster_id: impl Into<String>, silo: SiloAddress) -> Self {
        Self { fence: Some(Arc::new(Fence::new(cluster_id.into(), silo))), ..Self::new(pool) }
    }

    /// The queue of the group-commit writers, started on first use (inside the runtime).
    fn batcher(&self) -> &mpsc::UnboundedSender<PendingWrite> {
        self.batcher.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(Mutex::new(BatchQueue::new(rx)));
            for _ in 0..WRITERS {
                tokio::spawn(run_writer(self.pool.clone(), self.fence.clone(), rx.clone()));
            }
            tx
        })
    }
}

/// Pending writes, plus those deferred from a batch that already held a write of the same key.
struct BatchQueue {
    rx: mpsc::UnboundedReceiver<PendingWrite>,
    deferred: VecDeque<PendingWrite>,
    in_flight: Arc<InFlight>,
}

/// The fewest writes a batch is sent with while another batch is being committed. Fewer wait, for more writes
/// to join them or for that batch to end (at most [`BESIDE_WAIT`]): a batch of a few writes sent beside a large
/// one costs a statement and a commit of its own and leaves the writes that follow it a smaller batch.
/// Measured with the cart bench (64 callers, two writers): a second batch sent at once, however small, gave
/// 30.7k–38.9k adds/s; one that waits for 32 writes, 39.5k–41.6k.
const MIN_BESIDE: usize = 32;

/// The longest a small batch waits beside one being committed (a commit held up by a lock does not hold up
/// the writes queued behind it for longer).
const BESIDE_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// How many batches are being committed, and a signal each time one ends.
#[derive(Default)]
struct InFlight {
    batches: AtomicUsize,
    ended: Notify,
}

/// One batch being committed: counted in [`InFlight`] until dropped.
struct Committing(Arc<InFlight>);

impl Drop for Committing {
    fn drop(&mut self) {
        self.0.batches.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

impl BatchQueue {
    fn new(rx: mpsc::UnboundedReceiver<PendingWrite>) -> Self {
        BatchQueue { rx, deferred: VecDeque::new(), in_flight: Arc::default() }
    }

    /// Waits for at least one write, then takes what is ready, one write per key; while another batch is being
    /// committed, waits for [`MIN_BESIDE`] writes (or that batch's end, or [`BESIDE_WAIT`]). The batch counts as
    /// being committed until the returned guard is dropped.
    async fn next_batch(&mut self) -> Option<(Vec<PendingWrite>, Committing)> {
        let mut candidates: Vec<PendingWrite> = self.deferred.drain(..).collect();
        let mut wait_until = None;
        loop {
            if candidates.is_empty() {
                candidates.push(self.rx.recv().await?);
            }
            let room = MAX_BATCH.saturating_sub(candidates.len());
            candidates.extend(std::iter::from_fn(|| self.rx.try_recv().ok()).take(room));
            if candidates.len() >= MIN_BESIDE {
                break;
            }
            let ended = self.in_flight.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable(); // registered before the count is read: an end after it still wakes us
            if self.in_flight.batches.load(Ordering::SeqCst) == 0 {
                break;
            }
            let deadline = *wait_until.get_or_insert_with(|| Instant::now() + BESIDE_WAIT);
            tokio::select! {
                write = self.rx.recv() => match write {
                    Some(write) => candidates.push(write),
                    None => break,
                },
                () = ended => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.in_flight.batches.fetch_add(1, Ordering::SeqCst);
        let committing = Committing(self.in_flight.clone());
        let mut keys = HashSet::new();
        let mut batch = Vec::with_capacity(candidates.len());
        for write in candidates {
            if keys.insert(write.key.clone()) {
                batch.push(write);
            } else {
                self.deferred.push_back(write); // same key twice: the second goes in the next batch
            }
        }
        Some((batch, committing))
    }
}

async fn run_writer(pool: PgPool, fence: Option<Arc<Fence>>, queue: Arc<Mutex<BatchQueue>>) {
    loop {
        let (batch, committing) = {
            let mut queue = queue.lock().await;
            match queue.next_batch().await {
                Some(next) => next,
                None => return,
            }
        };
        record_batch(batch.len());
        let outcomes = commit_isolating_rejections(&pool, fence.as_deref(), &batch).await;
        drop(committing);
        for (write, outcome) in batch.into_iter().zip(outcomes) {
            let result = match outcome {
                Ok(Some(etag)) => Ok(etag.to_string()),
                Ok(None) => {
                    let actual = current_etag(&pool, &write.key).await;
                    Err(conflict(&write.key, write.expected.map(|e| e.to_string()).as_deref(), actual))
                }
                Err(error) => Err(error),
            };
            let _ = write.reply.send(result);
        }
    }
}

/// What became of one write: its new etag, `None` when its etag check failed, or why it failed.
type Outcome = Result<Option<i64>, StorageError>;

/// Commits `batch`, one outcome per write in order. When Postgres refuses the batch for a record in it,
/// nothing was applied: the halves are committed apart, down to single writes, so only refused writes fail.
async fn commit_isolating_rejections(pool: &PgPool, fence: Option<&Fence>, batch: &[PendingWrite]) -> Vec<Outcome> {
    match commit_batch(pool, fence, batch).await {
        Ok(etags) => batch.iter().map(|write| Ok(etags.get(&write.key).copied())).collect(),
        Err(StorageError::Rejected { reason, .. }) if batch.len() > 1 => {
            tracing::debug!(writes = batch.len(), %reason, "batch refused; committing its halves apart");
            let (left, right) = batch.split_at(batch.len() / 2);
            let mut outcomes = Box::pin(commit_isolating_rejections(pool, fence, left)).await;
            outcomes.extend(Box::pin(commit_isolating_rejections(pool, fence, right)).await);
            outcomes
        }
        Err(error) => vec![Err(error); batch.len()],
    }
}

/// Commits a batch (distinct keys) atomically; behind `fence`, only while the silo's membership row is not
/// dead. Returns the new etag of every key that was written.
async fn commit_batch(
    pool: &PgPool,
    fence: Option<&Fence>,
    batch: &[PendingWrite],
) -> Result<HashMap<StateKey, i64>, StorageError> {
    let n = batch.len();
    let Some(fence) = fence else {
        let mut conn = pool.acquire().await.map_err(storage_error(format_args!("a batch of {n} writes")))?;
        return apply_batch(&mut conn, batch).await;
    };
    let mut tx = pool.begin().await.map_err(storage_error(format_args!("a batch of {n} writes")))?;
    fence.hold(&mut tx).await?;
    let etags = apply_batch(&mut tx, batch).await?; // on an error, dropping `tx` rolls it back
    tx.commit().await.map_err(storage_error(format_args!("a batch of {n} writes")))?;
    Ok(etags)
}

/// Applies a batch (distinct keys) in one statement — first writes and etag-checked updates as two
/// data-modifying CTEs — so a batch costs one round trip. Returns the new etag of every key that was written.
async fn apply_batch(conn: &mut PgConnection, batch: &[PendingWrite]) -> Result<HashMap<StateKey, i64>, StorageError> {
    if let [write] = batch {
        // Alone: the plain one-row statement plans and runs faster than the batch form.
        let etag = write_one(conn, &write.key, &write.document, write.expected).await?;
        return Ok(etag.map(|etag| (write.key.clone(), etag)).into_iter().collect());
    }
    let n = batch.len();
    let (mut types, mut keys, mut names, mut documents, mut expected) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for write in batch {
        types.push(write.key.grain_type.as_str());
        keys.push(write.key.grain_key.as_str());
        names.push(write.key.state_name.as_str());
        documents.push(Json(&*write.document));
        expected.push(write.expected);
    }
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "WITH t AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bigint[])
                 AS t(grain_type, grain_key, state_name, document, expected)
         ),
         inserted AS (
             INSERT INTO grains_state (grain_type, grain_key, state_name, document, etag)
             SELECT grain_type, grain_key, state_name, document, nextval('grains_etag_seq')
             FROM t WHERE expected IS NULL
             ON CONFLICT DO NOTHING
             RETURNING grain_type, grain_key, state_name, etag
         ),
         updated AS (
             UPDATE grains_state AS s
             SET document = t.document, etag = nextval('grains_etag_seq'), updated_at = now()
             FROM t
             WHERE t.expected IS NOT NULL AND s.grain_type = t.grain_type AND s.grain_key = t.grain_key
               AND s.state_name = t.state_name AND s.etag = t.expected
             RETURNING s.grain_type, s.grain_key, s.state_name, s.etag
         )
         SELECT * FROM inserted UNION ALL SELECT * FROM updated",
    )
    .bind(types)
    .bind(keys)
    .bind(names)
    .bind(documents)
    .bind(expected)
    .fetch_all(conn)
    .await
    .map_err(storage_error(format_args!("a batch of {n} writes")))?;
    Ok(rows.into_iter().map(|(t, k, n, etag)| (StateKey::new(t, k, n), etag)).collect())
}

/// One write as one statement: `INSERT … ON CONFLICT DO NOTHING` or `UPDATE … WHERE etag = $expected`.
async fn write_one(
    conn: &mut PgConnection,
    key: &StateKey,
    document: &RawValue,
    expected: Option<i64>,
) -> Result<Option<i64>, StorageError> {
    let insert = "INSERT INTO grains_state (grain_type, grain_key, state_name, document, etag)
                  VALUES ($1, $2, $3, $4, nextval('grains_etag_seq'))
                  ON CONFLICT DO NOTHING
                  RETURNING etag";
    let update = "UPDATE grains_state SET document = $4, etag = nextval('grains_etag_seq'), updated_at = now()
                  WHERE grain_type = $1 AND grain_key = $2 AND state_name = $3 AND etag = $5
                  RETURNING etag";
    let query = sqlx::query_scalar(if expected.is_some() { update } else { insert })
        .bind(&key.grain_type)
        .bind(&key.grain_key)
        .bind(&key.state_name)
        .bind(Json(document));
    let query = match expected {
        Some(etag) => query.bind(etag),
        None => query,
    };
    query.fetch_optional(conn).await.map_err(storage_error(key))
}

fn conflict(key: &StateKey, expected: Option<&str>, actual: Option<String>) -> StorageError {
    StorageError::Conflict { key: key.to_string(), expected: expected.map(str::to_owned), actual }
}

/// The etag stored for `key` now, for a conflict's report: `None` when there is no row, or when it cannot be
/// read (the conflict stands either way).
async fn current_etag(pool: &PgPool, key: &StateKey) -> Option<String> {
    sqlx::query_scalar::<_, i64>(
        "SELECT etag FROM grains_state WHERE grain_type = $1 AND grain_key = $2 AND state_name = $3",
    )
    .bind(&key.grain_type)
    .bind(&key.grain_key)
    .bind(&key.state_name)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
    .map(|etag| etag.to_string())
}

fn parse_etag(key: &StateKey, expected: Option<&str>) -> Result<Option<i64>, StorageError> {
    // Etags this store hands out are integers: another text cannot be the stored one.
    expected.map(|e| e.parse::<i64>().map_err(|_| conflict(key, expected, None))).transpose()
}

#[async_trait]
impl GrainStateStore for PostgresStateStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn read(&self, key: &StateKey) -> Result<Option<StoredState>, StorageError> {
        let row: Option<(serde_json::Value, i64)> = sqlx::query_as(
            "SELECT document, etag FROM grains_state WHERE grain_type = $1 AND grain_key = $2 AND state_name = $3",
        )
        .bind(&key.grain_type)
        .bind(&key.grain_key)
        .bind(&key.state_name)
        .fetch_optional(&self.pool)
        .await
        .map_err(storage_error(key))?;
        Ok(row.map(|(document, etag)| StoredState { document, etag: etag.to_string() }))
    }

    async fn write(
        &self,
        key: &StateKey,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<ETag, StorageError> {
        let expected_etag = parse_etag(key, expected)?;
        let (reply, answer) = oneshot::channel();
        let document =
            serde_json::value::to_raw_value(document).map_err(|e| StorageError::Codec(format!("{key}: {e}")))?;
        let write = PendingWrite { key: key.clone(), document, expected: expected_etag, reply };
        if self.batcher().send(write).is_err() {
            return Err(StorageError::Unavailable("the state writer stopped".to_owned()));
        }
        answer.await.map_err(|_| StorageError::Unavailable("the state writer stopped".to_owned()))?
    }

    async fn clear(&self, key: &StateKey, expected: Option<&str>) -> Result<(), StorageError> {
        match parse_etag(key, expected)? {
            // Nothing expected: clearing is a no-op if there is no row, a conflict if there is one.
            None => match self.read(key).await? {
                None => Ok(()),
                Some(stored) => Err(conflict(key, expected, Some(stored.etag))),
            },
            Some(expected_etag) => {
                let delete = sqlx::query(
                    "DELETE FROM grains_state
                     WHERE grain_type = $1 AND grain_key = $2 AND state_name = $3 AND etag = $4",
                )
                .bind(&key.grain_type)
                .bind(&key.grain_key)
                .bind(&key.state_name)
                .bind(expected_etag);
                let deleted = match self.fence.as_deref() {
                    None => delete.execute(&self.pool).await.map_err(storage_error(key))?,
                    Some(fence) => {
                        let mut tx = self.pool.begin().await.map_err(storage_error(key))?;
                        fence.hold(&mut tx).await?;
                        let deleted = delete.execute(&mut *tx).await.map_err(storage_error(key))?;
                        tx.commit().await.map_err(storage_error(key))?;
                        deleted
                    }
                };
                if deleted.rows_affected() == 1 {
                    Ok(())
                } else {
                    Err(conflict(key, expected, current_etag(&self.pool, key).await))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn write(key: &str) -> PendingWrite {
        let (reply, _) = oneshot::channel();
        PendingWrite {
            key: StateKey::new("T", key, "state"),
            document: RawValue::NULL.to_owned(),
            expected: None,
            reply,
        }
    }

    /// A queue with one batch (of one write) being committed until its guard is dropped.
    async fn queue_beside_a_commit() -> (mpsc::UnboundedSender<PendingWrite>, BatchQueue, Committing) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut queue = BatchQueue::new(rx);
        tx.send(write("first")).unwrap();
        let (first, committing) = queue.next_batch().await.expect("open");
        assert_eq!(first.len(), 1, "nothing in flight: a lone write goes at once");
        (tx, queue, committing)
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_writes_wait_beside_a_batch_being_committed_until_it_ends() {
        let (tx, mut queue, committing) = queue_beside_a_commit().await;
        for key in ["a", "b", "c"] {
            tx.send(write(key)).unwrap();
        }
        let mut next = std::pin::pin!(queue.next_batch());
        assert!(tokio::time::timeout(Duration::from_millis(1), next.as_mut()).await.is_err(), "sent beside it");
        tx.send(write("d")).unwrap(); // a write that comes meanwhile joins them
        drop(committing);
        let started = Instant::now();
        let (batch, _) = next.await.expect("open");
        assert_eq!(batch.len(), 4);
        assert_eq!(started.elapsed(), Duration::ZERO, "sent as soon as the other batch ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_writes_beside_a_commit_that_does_not_end_go_after_the_wait() {
        let (tx, mut queue, _committing) = queue_beside_a_commit().await;
        let started = Instant::now();
        tx.send(write("a")).unwrap();
        let (batch, _) = queue.next_batch().await.expect("open");
        assert_eq!(batch.len(), 1);
        assert_eq!(started.elapsed(), BESIDE_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn enough_writes_go_at_once_beside_a_batch_being_committed() {
        let (tx, mut queue, _committing) = queue_beside_a_commit().await;
        for i in 0..MIN_BESIDE {
            tx.send(write(&i.to_string())).unwrap();
        }
        let started = Instant::now();
        let (batch, second) = queue.next_batch().await.expect("open");
        assert_eq!(batch.len(), MIN_BESIDE);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(queue.in_flight.batches.load(Ordering::SeqCst), 2);
        drop(second);
        assert_eq!(queue.in_flight.batches.load(Ordering::SeqCst), 1);
    }
}
