//! Grain state in `grains_state`: JSONB documents with etag-checked writes.

use async_trait::async_trait;
use sqlx::PgPool;

use super::unavailable;
use crate::{ETag, GrainStateStore, StateKey, StorageError, StoredState};

/// Grain state in Postgres: one row per (grain type, grain key, state name).
///
/// - The first write of a key is an `INSERT … ON CONFLICT DO NOTHING`: of writers racing to create the row,
///   exactly one inserts; the others get a conflict.
/// - Later writes are `UPDATE … WHERE etag = $expected`: a writer holding a stale etag matches no row and
///   gets a conflict.
/// - Every write takes a fresh etag from `grains_etag_seq`, so etags are never reused.
#[derive(Debug, Clone)]
pub struct PostgresStateStore {
    pool: PgPool,
}

impl PostgresStateStore {
    /// A store over `pool` (migrated with [`super::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn conflict(key: &StateKey, expected: Option<&str>) -> StorageError {
    StorageError::Conflict { key: key.to_string(), expected: expected.map(str::to_owned), actual: None }
}

fn parse_etag(key: &StateKey, expected: Option<&str>) -> Result<Option<i64>, StorageError> {
    expected.map(|e| e.parse::<i64>().map_err(|_| conflict(key, expected))).transpose()
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
        .map_err(unavailable)?;
        Ok(row.map(|(document, etag)| StoredState { document, etag: etag.to_string() }))
    }

    async fn write(
        &self,
        key: &StateKey,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<ETag, StorageError> {
        let new_etag: Option<i64> = match parse_etag(key, expected)? {
            None => sqlx::query_scalar(
                "INSERT INTO grains_state (grain_type, grain_key, state_name, document, etag)
                 VALUES ($1, $2, $3, $4, nextval('grains_etag_seq'))
                 ON CONFLICT DO NOTHING
                 RETURNING etag",
            )
            .bind(&key.grain_type)
            .bind(&key.grain_key)
            .bind(&key.state_name)
            .bind(document)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?,
            Some(expected_etag) => sqlx::query_scalar(
                "UPDATE grains_state SET document = $4, etag = nextval('grains_etag_seq'), updated_at = now()
                 WHERE grain_type = $1 AND grain_key = $2 AND state_name = $3 AND etag = $5
                 RETURNING etag",
            )
            .bind(&key.grain_type)
            .bind(&key.grain_key)
            .bind(&key.state_name)
            .bind(document)
            .bind(expected_etag)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?,
        };
        new_etag.map(|e| e.to_string()).ok_or_else(|| conflict(key, expected))
    }

    async fn clear(&self, key: &StateKey, expected: Option<&str>) -> Result<(), StorageError> {
        match parse_etag(key, expected)? {
            // Nothing expected: clearing is a no-op if there is no row, a conflict if there is one.
            None => {
                let exists: Option<i64> = sqlx::query_scalar(
                    "SELECT etag FROM grains_state WHERE grain_type = $1 AND grain_key = $2 AND state_name = $3",
                )
                .bind(&key.grain_type)
                .bind(&key.grain_key)
                .bind(&key.state_name)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
                match exists {
                    None => Ok(()),
                    Some(_) => Err(conflict(key, expected)),
                }
            }
            Some(expected_etag) => {
                let deleted = sqlx::query(
                    "DELETE FROM grains_state
                     WHERE grain_type = $1 AND grain_key = $2 AND state_name = $3 AND etag = $4",
                )
                .bind(&key.grain_type)
                .bind(&key.grain_key)
                .bind(&key.state_name)
                .bind(expected_etag)
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
                if deleted.rows_affected() == 1 { Ok(()) } else { Err(conflict(key, expected)) }
            }
        }
    }
}
