//! Projection offsets in `grains_projection_offsets`, committed in the read model's own transaction, and the
//! claim that lets one process at a time run a projection.

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use super::storage_error;
use crate::StorageError;

/// How long a claim's session may sit idle (in or out of a transaction) before Postgres ends it, releasing
/// the claim: a runner that froze (SIGSTOP, a VM pause) hands its projection on after this long. A live
/// runner touches its session more often than this ([`PostgresProjectionClaim::check`]).
pub const CLAIM_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The right to run one projection: a session-level advisory lock on a connection of its own, which also
/// carries every transaction the runner commits. Released when dropped (the connection closes, and Postgres
/// releases a session's locks when it ends).
///
/// Because the lock and the work share one session, whoever commits a projection's offset holds its lock at
/// that moment: a runner whose session ended (the network failed, the server restarted, the idle timeout
/// fired) cannot commit anything more, and the next claimant starts from the last committed offset. The
/// offset update is also checked (`WHERE position = <the offset the batch started from>`), so even two
/// holders could not both apply one event.
///
/// The lock key is a 64-bit hash of the projection's name (`hashtextextended`); two names colliding would
/// only make those two projections take turns.
#[derive(Debug)]
pub struct PostgresProjectionClaim {
    conn: PgConnection,
    projection: String,
}

impl PostgresProjectionClaim {
    /// Claims `projection` unless another session holds it; `Ok(None)` while one does.
    pub async fn try_claim(pool: &PgPool, projection: &str) -> Result<Option<Self>, StorageError> {
        let subject = format_args!("the claim of projection {projection}").to_string();
        let mut conn = pool.acquire().await.map_err(storage_error(&subject))?;
        let claimed: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(lock_name(projection))
            .fetch_one(&mut *conn)
            .await
            .map_err(storage_error(&subject))?;
        if !claimed {
            return Ok(None); // the connection goes back to the pool holding nothing
        }
        // Keep the session out of the pool: its lock lives as long as it does.
        let mut conn = conn.detach();
        let timeout = format!("{}ms", CLAIM_IDLE_TIMEOUT.as_millis());
        sqlx::query(
            "SELECT set_config('idle_session_timeout', $1, false),
                    set_config('idle_in_transaction_session_timeout', $1, false)",
        )
        .bind(&timeout)
        .execute(&mut conn)
        .await
        .map_err(storage_error(&subject))?;
        sqlx::query("INSERT INTO grains_projection_offsets (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(projection)
            .execute(&mut conn)
            .await
            .map_err(storage_error(&subject))?;
        Ok(Some(Self { conn, projection: projection.to_owned() }))
    }

    /// The projection this claim is for.
    pub fn projection(&self) -> &str {
        &self.projection
    }

    /// The projection's committed offset: the position of the last event whose effect is committed.
    pub async fn offset(&mut self) -> Result<u64, StorageError> {
        let position: i64 = sqlx::query_scalar("SELECT position FROM grains_projection_offsets WHERE name = $1")
            .bind(&self.projection)
            .fetch_one(&mut self.conn)
            .await
            .map_err(storage_error(format_args!("the offset of projection {}", self.projection)))?;
        Ok(position as u64)
    }

    /// Whether the claim still holds: its session answers. Call it while idle, to keep the session alive.
    pub async fn check(&mut self) -> Result<(), StorageError> {
        self.conn.ping().await.map_err(storage_error(format_args!("the claim of projection {}", self.projection)))
    }

    /// Begins a transaction on the claim's session: the read model's writes go through
    /// [`PostgresProjectionUnit::conn`], and [`PostgresProjectionUnit::commit`] commits them with the offset.
    pub async fn begin(&mut self) -> Result<PostgresProjectionUnit<'_>, StorageError> {
        let projection = self.projection.as_str();
        let tx = self.conn.begin().await.map_err(storage_error(format_args!("projection {projection}")))?;
        Ok(PostgresProjectionUnit { tx, projection })
    }

    /// Releases the claim now (dropping it does the same, a little later).
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// The committed offset of `projection` (0 when it never committed), read without claiming it.
pub async fn projection_offset(pool: &PgPool, projection: &str) -> Result<u64, StorageError> {
    let position: Option<i64> = sqlx::query_scalar("SELECT position FROM grains_projection_offsets WHERE name = $1")
        .bind(projection)
        .fetch_optional(pool)
        .await
        .map_err(storage_error(format_args!("the offset of projection {projection}")))?;
    Ok(position.unwrap_or(0) as u64)
}

/// The advisory-lock name of a projection.
fn lock_name(projection: &str) -> String {
    format!("grains.projection:{projection}")
}

/// One transaction of a projection: read-model writes, then the offset, committed together. Dropped without
/// [`commit`](Self::commit), it rolls back.
#[derive(Debug)]
pub struct PostgresProjectionUnit<'c> {
    tx: Transaction<'c, Postgres>,
    projection: &'c str,
}

impl PostgresProjectionUnit<'_> {
    /// The connection, inside the transaction, for the read model's writes.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Moves the offset from `from` to `to` and commits it with the read-model writes. When the stored offset
    /// is not `from` (another runner moved it), nothing is committed and this is [`StorageError::Conflict`].
    pub async fn commit(mut self, from: u64, to: u64) -> Result<(), StorageError> {
        let subject = format!("the offset of projection {}", self.projection);
        let moved = sqlx::query(
            "UPDATE grains_projection_offsets SET position = $3, updated_at = now() WHERE name = $1 AND position = $2",
        )
        .bind(self.projection)
        .bind(i64::try_from(from).unwrap_or(i64::MAX))
        .bind(i64::try_from(to).unwrap_or(i64::MAX))
        .execute(&mut *self.tx)
        .await
        .map_err(storage_error(&subject))?;
        if moved.rows_affected() != 1 {
            return Err(StorageError::Conflict { key: subject, expected: Some(from.to_string()), actual: None });
        }
        self.tx.commit().await.map_err(storage_error(&subject))
    }
}
