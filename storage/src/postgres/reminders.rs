//! Reminders in `grains_reminders`.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::storage_error;
use crate::{ETag, ReminderEntry, ReminderRow, ReminderTable, StorageError};

/// Reminders in Postgres.
#[derive(Debug, Clone)]
pub struct PostgresReminderTable {
    pool: PgPool,
}

impl PostgresReminderTable {
    /// The table over `pool` (migrated with [`super::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// A `SELECT` of whole reminder rows with the given `WHERE` condition, as a `'static` SQL string.
macro_rules! select {
    ($filter:literal) => {
        concat!(
            "SELECT grain_type, grain_key, name, grain_hash, ",
            timestamp_to_ms!("start_at"),
            ", period_ms, etag FROM grains_reminders WHERE ",
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
    })
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
        let sql = match begin.cmp(&end) {
            std::cmp::Ordering::Less => select!("grain_hash > $1 AND grain_hash <= $2"),
            std::cmp::Ordering::Greater => select!("(grain_hash > $1 OR grain_hash <= $2)"),
            std::cmp::Ordering::Equal => select!("($1::bigint IS NOT NULL AND $2::bigint IS NOT NULL)"),
        };
        let rows = sqlx::query(sql)
            .bind(i64::from(begin))
            .bind(i64::from(end))
            .fetch_all(&self.pool)
            .await
            .map_err(storage_error(format!("reminders in ({begin}, {end}]")))?;
        rows.iter().map(decode).collect()
    }

    async fn upsert(&self, entry: &ReminderEntry) -> Result<ETag, StorageError> {
        let sql = concat!(
            "INSERT INTO grains_reminders (grain_type, grain_key, name, grain_hash, start_at, period_ms, etag)
             VALUES ($1, $2, $3, $4, ",
            ms_to_timestamp!("$5"),
            ", $6, nextval('grains_etag_seq'))
             ON CONFLICT (grain_type, grain_key, name) DO UPDATE
             SET grain_hash = EXCLUDED.grain_hash, start_at = EXCLUDED.start_at, period_ms = EXCLUDED.period_ms,
                 etag = EXCLUDED.etag
             RETURNING etag"
        );
        let etag: i64 = sqlx::query_scalar(sql)
            .bind(&entry.grain_type)
            .bind(&entry.grain_key)
            .bind(&entry.name)
            .bind(i64::from(entry.grain_hash))
            .bind(entry.start_at_ms)
            .bind(entry.period_ms)
            .fetch_one(&self.pool)
            .await
            .map_err(storage_error(reminder(&entry.grain_type, &entry.grain_key, &entry.name)))?;
        Ok(etag.to_string())
    }

    async fn remove(&self, grain_type: &str, grain_key: &str, name: &str, etag: &str) -> Result<bool, StorageError> {
        let Ok(etag) = etag.parse::<i64>() else { return Ok(false) };
        let deleted = sqlx::query(
            "DELETE FROM grains_reminders WHERE grain_type = $1 AND grain_key = $2 AND name = $3 AND etag = $4",
        )
        .bind(grain_type)
        .bind(grain_key)
        .bind(name)
        .bind(etag)
        .execute(&self.pool)
        .await
        .map_err(storage_error(reminder(grain_type, grain_key, name)))?;
        Ok(deleted.rows_affected() == 1)
    }
}
