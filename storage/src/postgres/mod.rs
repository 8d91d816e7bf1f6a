//! Postgres providers: grain state, the event journal and projection offsets, membership and reminders over
//! one `sqlx` pool.
//!
//! Queries are checked at run time, so building never needs a database. The schema ships inside the binary
//! as migrations ([`migrate`]), applied under a Postgres advisory lock so that several silos starting at once
//! against an empty database all come up; the migrations are tracked in `grains_schema_migrations`, apart
//! from any `_sqlx_migrations` table the application keeps in the same database.
//!
//! Errors map onto [`StorageError`] by what a retry would do:
//! - [`StorageError::Rejected`]: the server refused the record for what it holds, and will refuse it again —
//!   SQLSTATE class 22 (data exception: U+0000 in a string, a malformed value), 23 (a constraint the row breaks)
//!   and 54 (a program limit: a key too long for its index); and a value the driver cannot encode.
//! - [`StorageError::Unavailable`]: everything else — a lost or refused connection (class 08), a server
//!   shutting down (57P0x), a pool that cannot hand out a connection in time, a serialization failure or
//!   deadlock (40), a full disk (53), and also a schema or privilege problem (42), which no record causes and
//!   an operator fixes. The operation may or may not have been applied when the connection broke mid-commit.
//! - [`StorageError::Codec`]: a stored value the code cannot decode.
//!
//! An etag or version mismatch is a conflict, never an overwrite.

/// SQL text: Unix milliseconds in parameter `$n` (BIGINT) as a TIMESTAMPTZ.
macro_rules! ms_to_timestamp {
    ($param:literal) => {
        concat!("to_timestamp(", $param, "::double precision / 1000)")
    };
}

/// SQL text: a TIMESTAMPTZ column as Unix milliseconds.
macro_rules! timestamp_to_ms {
    ($column:literal) => {
        concat!("(extract(epoch from ", $column, ") * 1000)::bigint")
    };
}

mod journal;
mod membership;
mod projection;
mod reminders;
pub(crate) mod state;

use std::fmt;
use std::time::Duration;

pub use journal::PostgresJournal;
pub use membership::PostgresMembershipTable;
pub use projection::{CLAIM_IDLE_TIMEOUT, PostgresProjectionClaim, PostgresProjectionUnit, projection_offset};
pub use reminders::PostgresReminderTable;
pub use sqlx::PgConnection;
pub use sqlx::postgres::PgPool;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions};
pub use state::PostgresStateStore;

use crate::{SiloAddress, StorageError};

/// The membership row a fenced store's writes depend on.
#[derive(Debug)]
pub(crate) struct Fence {
    cluster_id: String,
    silo: SiloAddress,
}

impl Fence {
    pub(crate) fn new(cluster_id: String, silo: SiloAddress) -> Self {
        Self { cluster_id, silo }
    }

    /// Share-locks the silo's membership row in `tx` if it is not dead, until `tx` ends; `Fenced` otherwise.
    ///
    /// The transaction also gets an idle timeout: a writer frozen between this lock and its commit (SIGSTOP, a
    /// VM pause) would otherwise hold the lock for as long as it is frozen, and the peers' dead declaration —
    /// an UPDATE of this row, holding the table's version row meanwhile — would wait on it, stopping every
    /// membership change in the cluster. After 3 s idle, Postgres ends the frozen writer's session: its batch
    /// is not committed (its callers see an unavailable store) and the declaration goes through.
    pub(crate) async fn hold(&self, tx: &mut PgConnection) -> Result<(), StorageError> {
        let alive = sqlx::query(
            "SELECT set_config('idle_in_transaction_session_timeout', '3s', true) FROM grains_membership
             WHERE cluster_id = $1 AND endpoint = $2 AND epoch = $3 AND status <> 'dead'
             FOR SHARE",
        )
        .bind(&self.cluster_id)
        .bind(&self.silo.endpoint)
        .bind(self.silo.epoch)
        .fetch_optional(tx)
        .await
        .map_err(storage_error(format_args!("the membership row of {}", self.silo)))?;
        match alive {
            Some(_) => Ok(()),
            None => Err(StorageError::Fenced { silo: self.silo.to_string() }),
        }
    }
}

/// How to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Maximum connections in the pool.
    pub pool_size: u32,
    /// How long an operation waits for a pooled connection before failing with `Unavailable`.
    pub acquire_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self { pool_size: 16, acquire_timeout: Duration::from_secs(3) }
    }
}

/// Maps a sqlx error onto the storage contract (see the module docs); `subject` names the record the
/// statement was about, for [`StorageError::Rejected`]. Use as `.map_err(storage_error(&key))`.
pub(crate) fn storage_error(subject: impl fmt::Display) -> impl FnOnce(sqlx::Error) -> StorageError {
    move |error| match &error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StorageError::Codec(error.to_string()),
        sqlx::Error::Encode(reason) => StorageError::Rejected { key: subject.to_string(), reason: reason.to_string() },
        sqlx::Error::Database(db) if db.code().is_some_and(|code| rejects_the_record(&code)) => {
            let reason = match db.try_downcast_ref::<PgDatabaseError>().and_then(PgDatabaseError::detail) {
                Some(detail) => format!("{} ({detail})", db.message()),
                None => db.message().to_owned(),
            };
            StorageError::Rejected { key: subject.to_string(), reason }
        }
        _ => StorageError::Unavailable(error.to_string()),
    }
}

/// Whether SQLSTATE `code` says the record itself was refused: a data exception (22), an integrity constraint
/// (23), or a program limit such as an index row too large (54).
fn rejects_the_record(code: &str) -> bool {
    matches!(code.get(..2), Some("22" | "23" | "54"))
}

/// Opens a pool to `url` and checks that the server answers.
pub async fn connect(url: &str, options: &PostgresOptions) -> Result<PgPool, StorageError> {
    let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| StorageError::Unavailable(e.to_string()))?;
    PgPoolOptions::new()
        .max_connections(options.pool_size)
        .acquire_timeout(options.acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(storage_error("the connection"))
}

/// Opens a pool to `url`, retrying with exponential backoff (up to 5 s between attempts) until `give_up_after`
/// has passed; each failed attempt is logged with the delay before the next.
pub async fn connect_with_retry(
    url: &str,
    options: &PostgresOptions,
    give_up_after: Duration,
) -> Result<PgPool, StorageError> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        match connect(url, options).await {
            Ok(pool) => {
                if attempt > 1 {
                    tracing::info!(attempt, "connected to postgres");
                }
                return Ok(pool);
            }
            Err(error) if started.elapsed() + delay < give_up_after => {
                tracing::warn!(attempt, %error, retry_in = ?delay, "postgres unavailable, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Applies the embedded migrations that `pool`'s database lacks, under an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), StorageError> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name("grains_schema_migrations");
    migrator.run(pool).await.map_err(|e| StorageError::Unavailable(format!("migrations: {e}")))
}
