//! Reminders in `grains_reminders`, read by ring range and due time through the `(grain_hash, next_due)`
//! index, written (optionally) fenced by the writing silo's membership row.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::Fence;
use super::storage_error;
use crate::{ETag, ReminderEntry, ReminderProgress, ReminderRow, ReminderTable, RingRange, SiloAddress, StorageError};

/// Reminders in Postgres.
///
/// With [`fenced`](Self::fenced), every write (a registration, a removal, recorded progress) commits only
/// while the writing silo's membership row is alive, exactly as fenced grain-state writes do (see
/// [`PostgresStateStore`](super::PostgresStateStore#fencing)): a silo declared dead cannot move a reminder's
/// progress under its new owner, nor register one for a grain that lives elsewhere now.
#[derive(Debug, Clone)]
pub struct PostgresReminderTable {
    pool: PgPool,
    fence: Option<std::sync::Arc<Fence>>,
}

impl PostgresReminderTable {
    /// The table over `pool` (migrated with [`super::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool, fence: None }
    }

    /// The table over `pool`, whose writes commit only while `silo` is not dead in the membership table of
    /// `cluster_id`.
    pub fn fenced(pool: PgPool, cluster_id: impl Into<String>, silo: SiloAddress) -> Self {
        Self { pool, fence: Some(std::sync::Arc::new(Fence::new(cluster_id.into(), silo))) }
    }

    /// Runs `write` on a connection: inside a transaction holding the fence when there is one.
    async fn write<T>(
        &self,
        subject: &str,
        write: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        match self.fence.as_deref() {
            None => {
                let mut conn = self.pool.acquire().await.map_err(storage_error(subject))?;
                write(&mut conn).await
            }
            Some(fence) => {
                let mut tx = self.pool.begin().await.map_err(storage_error(subject))?;
                fence.hold(&mut tx).await?;
                let result = write(&mut tx).await?; // on an error, dropping `tx` rolls it back
                tx.commit().await.map_err(storage_error(subject))?;
                Ok(result)
            }
        }
    }
}

/// The columns of a whole reminder row (of table alias `$t`, e.g. `"r."`, or `""`), in the order [`decode`]
/// reads them; times as Unix milliseconds (as `timestamp_to_ms!` writes them).
macro_rules! columns {
    ($t:literal) => {
        concat!(
            $t,
            "grain_type, ",
            $t,
            "grain_key, ",
            $t,
            "name, ",
            $t,
            "grain_hash, ",
            "(extract(epoch from ",
            $t,
            "start_at) * 1000)::bigint, ",
            $t,
            "period_ms, ",
            $t,
            "etag, ",
            "(extract(epoch from ",
            $t,
            "next_due) * 1000)::bigint"
        )
    };
}

/// A `SELECT` of whole reminder rows with the given `WHERE` condition, as a `'static` SQL string.
macro_rules! select {
    ($filter:literal) => {
        concat!(
            "SELECT ",
            columns!(""),
            " FROM grains_reminders WHERE ",
            $filter,
            " ORDER BY grain_type, grain_key, name"
        )
    };
}

/// Names one reminder, for [`StorageError::Rejected`].
fn reminder(grain_type: &str, grain_key: &str, name: &str) -> String {
    format!("reminder {grain_type}/{grain_key}#{name}")
}

fn decode(row: &PgRow) -> Result<ReminderRow, StorageError> {
    let hash: i64 = row.try_get(3).map_err(storage_error("a reminder row"))?;
    let etag: i64 = row.try_get(6).map_err(storage_error("a reminder row"))?;
    Ok(ReminderRow {
        entry: ReminderEntry {
            grain_type: row.try_get(0).map_err(storage_error("a reminder row"))?,
            grain_key: row.try_get(1).map_err(storage_error("a reminder row"))?,
            name: row.try_get(2).map_err(storage_error("a reminder row"))?,
            grain_hash: u32::try_from(hash).map_err(|e| StorageError::Codec(e.to_string()))?,
            start_at_ms: row.try_get(4).map_err(storage_error("a reminder row"))?,
            period_ms: row.try_get(5).map_err(storage_error("a reminder row"))?,
        },
        etag: etag.to_string(),
        next_due_ms: row.try_get(7).map_err(storage_error("a reminder row"))?,
    })
}

/// The `(bucket, low, high)` seeks that cover `ranges`, as the three arrays the queries unnest.
fn bucket_intervals(ranges: &[RingRange]) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    debug_assert_eq!(crate::RING_BUCKET_SHIFT, 22, "the SQL and the index shift by 22");
    let (mut buckets, mut lows, mut highs) = (Vec::new(), Vec::new(), Vec::new());
    for (bucket, low, high) in ranges.iter().flat_map(RingRange::bucket_intervals) {
        buckets.push(i64::from(bucket));
        lows.push(i64::from(low));
        highs.push(i64::from(high));
    }
    (buckets, lows, highs)
}

#[async_trait]
impl ReminderTable for PostgresReminderTable {
    async fn read_grain(&self, grain_type: &str, grain_key: &str) -> Result<Vec<ReminderRow>, StorageError> {
        let rows = sqlx::query(select!("grain_type = $1 AND grain_key = $2"))
            .bind(grain_type)
            .bind(grain_key)
            .fetch_all(&self.pool)
            .await
            .map_err(storage_error(format!("reminders of {grain_type}/{grain_key}")))?;
        rows.iter().map(decode).collect()
    }

    async fn read_row(
        &self,
        grain_type: &str,
        grain_key: &str,
        name: &str,
    ) -> Result<Option<ReminderRow>, StorageError> {
        let row = sqlx::query(select!("grain_type = $1 AND grain_key = $2 AND name = $3"))
            .bind(grain_type)
            .bind(grain_key)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(storage_error(reminder(grain_type, grain_key, name)))?;
        row.as_ref().map(decode).transpose()
    }

    async fn read_range(&self, begin: u32, end: u32) -> Result<Vec<ReminderRow>, StorageError> {
        let sql = concat!(
            "SELECT ",
            columns!("r."),
            " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS q(bucket, low, high)
             CROSS JOIN LATERAL (
                 SELECT * FROM grains_reminders
                 WHERE (grain_hash >> 22) = q.bucket AND grain_hash BETWEEN q.low AND q.high
                 OFFSET 0
             ) AS r
             ORDER BY r.grain_type, r.grain_key, r.name"
        );
        let (buckets, lows, highs) = bucket_intervals(&[RingRange::new(begin, end)]);
        let rows = sqlx::query(sql)
            .bind(buckets)
            .bind(lows)
            .bind(highs)
            .fetch_all(&self.pool)
            .await
            .map_err(storage_error(format!("reminders in ({begin}, {end}]")))?;
        rows.iter().map(decode).collect()
    }

    async fn read_due(&self, ranges: &[RingRange], due_by_ms: i64) -> Result<Vec<ReminderRow>, StorageError> {
        // One statement for every range: each (bucket, hash interval) is an index seek on
        // ((grain_hash >> 22), next_due) that stops at the due time, so only what is due is read. `OFFSET 0`
        // keeps the planner from flattening the lateral subquery into a hash join over a scan of the table
        // (which it prefers for a small table, and which grows with every reminder however far ahead).
        let sql = concat!(
            "SELECT ",
            columns!("r."),
            " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS q(bucket, low, high)
             CROSS JOIN LATERAL (
                 SELECT * FROM grains_reminders
                 WHERE (grain_hash >> 22) = q.bucket AND next_due <= ",
            ms_to_timestamp!("$4"),
            " AND grain_hash BETWEEN q.low AND q.high
                 OFFSET 0
             ) AS r
             ORDER BY r.next_due"
        );
        let (buckets, lows, highs) = bucket_intervals(ranges);
        let rows = sqlx::query(sql)
            .bind(buckets)
            .bind(lows)
            .bind(highs)
            .bind(due_by_ms)
            .fetch_all(&self.pool)
            .await
            .map_err(storage_error(format!("reminders due by {due_by_ms} in {} ranges", ranges.len())))?;
        let mut seen = HashSet::new();
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let row = decode(row)?;
            // Ranges that overlap would name a row twice.
            if seen.insert((row.entry.grain_type.clone(), row.entry.grain_key.clone(), row.entry.name.clone())) {
                due.push(row);
            }
        }
        Ok(due)
    }

    async fn upsert(&self, entry: &ReminderEntry) -> Result<ETag, StorageError> {
        let sql = concat!(
            "INSERT INTO grains_reminders (grain_type, grain_key, name, grain_hash, start_at, period_ms, etag, next_due)
             VALUES ($1, $2, $3, $4, ",
            ms_to_timestamp!("$5"),
            ", $6, nextval('grains_etag_seq'), ",
            ms_to_timestamp!("$5"),
            ")
             ON CONFLICT (grain_type, grain_key, name) DO UPDATE
             SET grain_hash = EXCLUDED.grain_hash, start_at = EXCLUDED.start_at, period_ms = EXCLUDED.period_ms,
                 etag = EXCLUDED.etag, next_due = EXCLUDED.next_due
             RETURNING etag"
        );
        let subject = reminder(&entry.grain_type, &entry.grain_key, &entry.name);
        let etag: i64 = self
            .write(&subject, async |conn| {
                sqlx::query_scalar(sql)
                    .bind(&entry.grain_type)
                    .bind(&entry.grain_key)
                    .bind(&entry.name)
                    .bind(i64::from(entry.grain_hash))
                    .bind(entry.start_at_ms)
                    .bind(entry.period_ms)
                    .fetch_one(conn)
                    .await
                    .map_err(storage_error(&subject))
            })
            .await?;
        Ok(etag.to_string())
    }

    async fn remove(&self, grain_type: &str, grain_key: &str, name: &str, etag: &str) -> Result<bool, StorageError> {
        let Ok(etag) = etag.parse::<i64>() else { return Ok(false) };
        let subject = reminder(grain_type, grain_key, name);
        let deleted = self
            .write(&subject, async |conn| {
                sqlx::query(
                    "DELETE FROM grains_reminders
                     WHERE grain_type = $1 AND grain_key = $2 AND name = $3 AND etag = $4",
                )
                .bind(grain_type)
                .bind(grain_key)
                .bind(name)
                .bind(etag)
                .execute(conn)
                .await
                .map_err(storage_error(&subject))
            })
            .await?;
        Ok(deleted.rows_affected() == 1)
    }

    async fn advance(&self, progress: &[ReminderProgress]) -> Result<(), StorageError> {
        if progress.is_empty() {
            return Ok(());
        }
        let n = progress.len();
        let (mut types, mut keys, mut names, mut etags, mut due) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
        for step in progress {
            // An etag this provider never issued matches no row.
            let Ok(etag) = step.etag.parse::<i64>() else { continue };
            types.push(step.grain_type.as_str());
            keys.push(step.grain_key.as_str());
            names.push(step.name.as_str());
            etags.push(etag);
            due.push(step.next_due_ms);
        }
        let sql = concat!(
            "UPDATE grains_reminders AS r SET next_due = ",
            ms_to_timestamp!("t.next_due_ms"),
            " FROM (SELECT grain_type, grain_key, name, etag, max(next_due_ms) AS next_due_ms
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
                       AS u(grain_type, grain_key, name, etag, next_due_ms)
                   GROUP BY grain_type, grain_key, name, etag) AS t
             WHERE r.grain_type = t.grain_type AND r.grain_key = t.grain_key AND r.name = t.name
               AND r.etag = t.etag AND r.next_due < ",
            ms_to_timestamp!("t.next_due_ms")
        );
        let subject = format!("progress of {n} reminders");
        self.write(&subject, async |conn| {
            sqlx::query(sql)
                .bind(&types)
                .bind(&keys)
                .bind(&names)
                .bind(&etags)
                .bind(&due)
                .execute(conn)
                .await
                .map(|_| ())
                .map_err(storage_error(&subject))
        })
        .await
    }
}
