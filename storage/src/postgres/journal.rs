//! The event journal in `grains_journal`: group-committed appends with optimistic sequence checks, serialized
//! by an advisory lock so that positions follow commit order, optionally fenced by the writer's membership row.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Fence, storage_error};
use crate::journal::sequence_conflict;
use crate::{EventJournal, EventSelector, NewEvent, SiloAddress, Snapshot, StateKey, StorageError, StoredEvent};

/// The advisory lock every journal batch takes for its transaction ("grainsJ\x01"): one appender commits at
/// a time, cluster-wide.
const APPEND_LOCK: i64 = 0x6772_6169_6e73_4a01;

/// The most appends one transaction carries.
const MAX_BATCH: usize = 512;

/// The most events one transaction carries (an append larger than this still goes alone).
const MAX_BATCH_EVENTS: usize = 4096;

/// Writer tasks: one commits while the other gathers the next batch and waits for the lock.
const WRITERS: usize = 1;

/// An event journal in Postgres: one row per event, JSONB payloads readable with psql.
///
/// ```sql
/// SELECT grain_key, seq, position, event_type, payload, tags, recorded_at
/// FROM grains_journal WHERE grain_type = 'BankAccount' ORDER BY position;
/// ```
///
/// **Sequence checks.** The primary key `(grain_type, grain_key, stream, seq)` makes two events at one `seq`
/// impossible; an append lands only if the stream's highest `seq` is still the one its writer expects, and
/// otherwise fails with [`StorageError::Conflict`] having appended none of its events.
///
/// **Positions in commit order.** A projection keeps one number, the position of the last event it applied;
/// that is sound only if an event never becomes visible behind a position already read. Sequence-assigned
/// ids do not promise that (a transaction that took id 7 may commit after one that took id 8). So every batch
/// takes a transaction-scoped advisory lock before it writes, and numbers its events after the highest
/// position stored: appends commit one at a time, cluster-wide, and positions are gap-free and follow commit
/// order. (Postgres makes a transaction visible before it releases its locks, so the next batch's snapshot
/// sees the previous one.)
///
/// **Group commit.** Serialized commits would cap the journal at one fsync per append; instead, appends from
/// many grains that arrive together are written by one statement and committed once, each still checked
/// against its own stream. A writer is answered only after the commit. Appends to one stream in one batch
/// would be checked against the same snapshot, so the second waits for the next batch. A batch that Postgres
/// refuses for a record in it is split in halves until the refused append stands alone and fails alone (as
/// in [`PostgresStateStore`](super::PostgresStateStore)).
///
/// **Fencing.** A journal made with [`fenced`](Self::fenced) commits a batch only while the silo's membership
/// row is not dead (the same `FOR SHARE` lock as the state store's, taken before the append lock); a refused
/// append fails with [`StorageError::Fenced`]. Snapshots are not fenced: a snapshot only restates events
/// already in the journal, whoever writes it.
///
/// Costs: a batch is four round trips (`BEGIN`, the locks, the write, `COMMIT`) and holds the append lock for
/// the last two; a writer frozen while holding it stalls every append until its idle-in-transaction timeout
/// (3 s) ends its session.
#[derive(Debug, Clone)]
pub struct PostgresJournal {
    pool: PgPool,
    fence: Option<Arc<Fence>>,
    batcher: Arc<OnceLock<mpsc::UnboundedSender<PendingAppend>>>,
}

#[derive(Debug)]
struct PendingAppend {
    stream: StateKey,
    expected: i64,
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<u64, StorageError>>,
}

impl PostgresJournal {
    /// A journal over `pool` (migrated with [`super::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool, fence: None, batcher: Arc::new(OnceLock::new()) }
    }

    /// A journal over `pool` whose appends commit only while `silo` is not dead in the membership table of
    /// `cluster_id`.
    pub fn fenced(pool: PgPool, cluster_id: impl Into<String>, silo: SiloAddress) -> Self {
        Self { fence: Some(Arc::new(Fence::new(cluster_id.into(), silo))), ..Self::new(pool) }
    }

    /// The pool this journal writes through.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn batcher(&self) -> &mpsc::UnboundedSender<PendingAppend> {
        self.batcher.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(Mutex::new(AppendQueue { rx, deferred: VecDeque::new() }));
            for _ in 0..WRITERS {
                tokio::spawn(run_writer(self.pool.clone(), self.fence.clone(), rx.clone()));
            }
            tx
        })
    }
}

/// Pending appends, plus those deferred from a batch that already held an append to the same stream.
struct AppendQueue {
    rx: mpsc::UnboundedReceiver<PendingAppend>,
    deferred: VecDeque<PendingAppend>,
}

impl AppendQueue {
    /// Waits for at least one append, then takes what is ready: one append per stream, within the limits.
    async fn next_batch(&mut self) -> Option<Vec<PendingAppend>> {
        let mut candidates: VecDeque<PendingAppend> = self.deferred.drain(..).collect();
        if candidates.is_empty() {
            candidates.push_back(self.rx.recv().await?);
        }
        let room = MAX_BATCH.saturating_sub(candidates.len());
        candidates.extend(std::iter::from_fn(|| self.rx.try_recv().ok()).take(room));
        let mut streams = HashSet::new();
        let mut batch = Vec::with_capacity(candidates.len());
        let mut events = 0;
        while let Some(append) = candidates.pop_front() {
            let fits = batch.is_empty() || events + append.events.len() <= MAX_BATCH_EVENTS;
            if fits && streams.insert(append.stream.clone()) {
                events += append.events.len();
                batch.push(append);
            } else {
                self.deferred.push_back(append); // same stream twice, or over the limit: the next batch
            }
        }
        Some(batch)
    }
}

async fn run_writer(pool: PgPool, fence: Option<Arc<Fence>>, queue: Arc<Mutex<AppendQueue>>) {
    loop {
        let batch = {
            let mut queue = queue.lock().await;
            match queue.next_batch().await {
                Some(batch) => batch,
                None => return,
            }
        };
        let span = tracing::debug_span!("journal.batch", appends = batch.len());
        let outcomes =
            tracing::Instrument::instrument(commit_isolating_rejections(&pool, fence.as_deref(), &batch), span).await;
        let answered = batch.len();
        for (append, outcome) in batch.into_iter().zip(outcomes) {
            let _ = append.reply.send(outcome);
        }
        if answered > 1 {
            // Many writers are waiting on this journal: let the ones just answered append again before the
            // next batch is cut, so that they join it instead of waiting a whole commit for the one after.
            for _ in 0..answered.min(8) {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// What became of one append: the stream's new last `seq`, or why it was not appended.
type Outcome = Result<u64, StorageError>;

/// Commits `batch`, one outcome per append in order; a refused batch is committed in halves (see the type).
async fn commit_isolating_rejections(pool: &PgPool, fence: Option<&Fence>, batch: &[PendingAppend]) -> Vec<Outcome> {
    match commit_batch(pool, fence, batch).await {
        Ok(heads) => batch
            .iter()
            .zip(heads)
            .map(|(append, head)| {
                if head == append.expected {
                    Ok(append.expected as u64 + append.events.len() as u64)
                } else {
                    Err(sequence_conflict(&append.stream, append.expected as u64, Some(head as u64)))
                }
            })
            .collect(),
        Err(StorageError::Rejected { reason, .. }) if batch.len() > 1 => {
            tracing::debug!(appends = batch.len(), %reason, "journal batch refused; committing its halves apart");
            let (left, right) = batch.split_at(batch.len() / 2);
            let mut outcomes = Box::pin(commit_isolating_rejections(pool, fence, left)).await;
            outcomes.extend(Box::pin(commit_isolating_rejections(pool, fence, right)).await);
            outcomes
        }
        Err(StorageError::Rejected { reason, .. }) => {
            vec![Err(StorageError::Rejected { key: batch[0].stream.to_string(), reason })]
        }
        Err(error) => vec![Err(error); batch.len()],
    }
}

/// Commits a batch (distinct streams) in one transaction under the append lock (and the fence); returns each
/// stream's last `seq` as found before the write: equal to the append's `expected` exactly when it landed.
async fn commit_batch(pool: &PgPool, fence: Option<&Fence>, batch: &[PendingAppend]) -> Result<Vec<i64>, StorageError> {
    let what = format!("a batch of {} appends", batch.len());
    let mut tx = pool.begin().await.map_err(storage_error(&what))?;
    if let Some(fence) = fence {
        fence.hold(&mut tx).await?;
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(storage_error(&what))?;
    let heads = append_batch(&mut tx, batch).await?; // on an error, dropping `tx` rolls it back
    tx.commit().await.map_err(storage_error(&what))?;
    Ok(heads)
}

/// The batch's appends as one statement, run after the append lock is held (so its snapshot sees every
/// earlier batch): each stream's head is checked, and the events of the appends whose check passed are
/// inserted with their `seq` and the next positions. Returns each append's head as found.
async fn append_batch(conn: &mut PgConnection, batch: &[PendingAppend]) -> Result<Vec<i64>, StorageError> {
    let n = batch.len();
    let (mut types, mut keys, mut streams, mut expected) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut owners, mut event_types, mut payloads, mut tags) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, append) in batch.iter().enumerate() {
        types.push(append.stream.grain_type.as_str());
        keys.push(append.stream.grain_key.as_str());
        streams.push(append.stream.state_name.as_str());
        expected.push(append.expected);
        for event in &append.events {
            owners.push(i as i64 + 1);
            event_types.push(event.event_type.as_str());
            payloads.push(&event.payload);
            tags.push(serde_json::Value::from(event.tags.clone()));
        }
    }
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "WITH a AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY
                 AS a(grain_type, grain_key, stream, expected, idx)
         ),
         heads AS (
             SELECT a.*, coalesce((SELECT max(j.seq) FROM grains_journal j
                                   WHERE j.grain_type = a.grain_type AND j.grain_key = a.grain_key
                                     AND j.stream = a.stream), 0) AS head
             FROM a
         ),
         e AS (
             SELECT * FROM unnest($5::bigint[], $6::text[], $7::jsonb[], $8::jsonb[]) WITH ORDINALITY
                 AS e(owner, event_type, payload, tags, n)
         ),
         accepted AS (
             SELECT h.grain_type, h.grain_key, h.stream, e.event_type, e.payload,
                    ARRAY(SELECT jsonb_array_elements_text(e.tags)) AS tags,
                    h.expected + row_number() OVER (PARTITION BY e.owner ORDER BY e.n) AS seq,
                    (SELECT coalesce(max(position), 0) FROM grains_journal)
                        + row_number() OVER (ORDER BY e.n) AS position
             FROM e JOIN heads h ON h.idx = e.owner
             WHERE h.head = h.expected
         ),
         inserted AS (
             INSERT INTO grains_journal (grain_type, grain_key, stream, seq, position, event_type, payload, tags)
             SELECT grain_type, grain_key, stream, seq, position, event_type, payload, tags FROM accepted
         ),
         tagged AS (
             INSERT INTO grains_journal_tags (tag, position)
             SELECT DISTINCT t.tag, accepted.position FROM accepted CROSS JOIN LATERAL unnest(accepted.tags) AS t(tag)
         )
         SELECT idx, head FROM heads ORDER BY idx",
    )
    .bind(types)
    .bind(keys)
    .bind(streams)
    .bind(expected)
    .bind(owners)
    .bind(event_types)
    .bind(payloads)
    .bind(tags)
    .fetch_all(conn)
    .await
    .map_err(storage_error(format_args!("a batch of {n} appends")))?;
    if rows.len() != n {
        return Err(StorageError::Unavailable(format!("a batch of {n} appends returned {} heads", rows.len())));
    }
    Ok(rows.into_iter().map(|(_, head)| head).collect())
}

/// The columns of an event row, in the order [`event_from_row`] reads them.
const EVENT_COLUMNS: &str = concat!(
    "j.position, j.grain_type, j.grain_key, j.stream, j.seq, j.event_type, j.payload, j.tags, ",
    timestamp_to_ms!("j.recorded_at")
);

type EventRow = (i64, String, String, String, i64, String, serde_json::Value, Vec<String>, i64);

fn event_from_row(row: EventRow) -> StoredEvent {
    let (position, grain_type, grain_key, stream, seq, event_type, payload, tags, recorded_at_ms) = row;
    StoredEvent {
        position: position as u64,
        stream: StateKey::new(grain_type, grain_key, stream),
        seq: seq as u64,
        event_type,
        payload,
        tags,
        recorded_at_ms,
    }
}

/// A count or number from the caller as a BIGINT (saturating: no stored value is that large).
fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventJournal for PostgresJournal {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn append(&self, stream: &StateKey, expected: u64, events: &[NewEvent]) -> Result<u64, StorageError> {
        if events.is_empty() {
            return Ok(expected);
        }
        let Ok(expected_seq) = i64::try_from(expected) else {
            return Err(sequence_conflict(stream, expected, None));
        };
        let (reply, answer) = oneshot::channel();
        let append = PendingAppend { stream: stream.clone(), expected: expected_seq, events: events.to_vec(), reply };
        if self.batcher().send(append).is_err() {
            return Err(StorageError::Unavailable("the journal writer stopped".to_owned()));
        }
        answer.await.map_err(|_| StorageError::Unavailable("the journal writer stopped".to_owned()))?
    }

    async fn read_stream(&self, stream: &StateKey, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StorageError> {
        let rows: Vec<EventRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM grains_journal j
             WHERE j.grain_type = $1 AND j.grain_key = $2 AND j.stream = $3 AND j.seq > $4
             ORDER BY j.seq LIMIT $5"
        )))
        .bind(&stream.grain_type)
        .bind(&stream.grain_key)
        .bind(&stream.state_name)
        .bind(bigint(after))
        .bind(bigint(limit as u64))
        .fetch_all(&self.pool)
        .await
        .map_err(storage_error(stream))?;
        Ok(rows.into_iter().map(event_from_row).collect())
    }

    async fn read_all(
        &self,
        selector: &EventSelector,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StorageError> {
        let (sql, value) = match selector {
            EventSelector::GrainType(grain_type) => (
                format!(
                    "SELECT {EVENT_COLUMNS} FROM grains_journal j
                     WHERE j.grain_type = $1 AND j.position > $2 ORDER BY j.position LIMIT $3"
                ),
                grain_type,
            ),
            EventSelector::Tag(tag) => (
                format!(
                    "SELECT {EVENT_COLUMNS} FROM grains_journal_tags t JOIN grains_journal j ON j.position = t.position
                     WHERE t.tag = $1 AND t.position > $2 ORDER BY t.position LIMIT $3"
                ),
                tag,
            ),
        };
        let rows: Vec<EventRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(value)
            .bind(bigint(after))
            .bind(bigint(limit as u64))
            .fetch_all(&self.pool)
            .await
            .map_err(storage_error(format_args!("the events of {selector:?}")))?;
        Ok(rows.into_iter().map(event_from_row).collect())
    }

    async fn read_snapshot(&self, stream: &StateKey) -> Result<Option<Snapshot>, StorageError> {
        let row: Option<(i64, serde_json::Value)> = sqlx::query_as(
            "SELECT seq, document FROM grains_journal_snapshots
             WHERE grain_type = $1 AND grain_key = $2 AND stream = $3",
        )
        .bind(&stream.grain_type)
        .bind(&stream.grain_key)
        .bind(&stream.state_name)
        .fetch_optional(&self.pool)
        .await
        .map_err(storage_error(stream))?;
        Ok(row.map(|(seq, document)| Snapshot { seq: seq as u64, document }))
    }

    async fn save_snapshot(&self, stream: &StateKey, snapshot: &Snapshot) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO grains_journal_snapshots (grain_type, grain_key, stream, seq, document)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (grain_type, grain_key, stream) DO UPDATE
                 SET seq = excluded.seq, document = excluded.document, taken_at = now()
                 WHERE grains_journal_snapshots.seq < excluded.seq",
        )
        .bind(&stream.grain_type)
        .bind(&stream.grain_key)
        .bind(&stream.state_name)
        .bind(bigint(snapshot.seq))
        .bind(&snapshot.document)
        .execute(&self.pool)
        .await
        .map_err(storage_error(stream))?;
        Ok(())
    }
}
