//! The membership table in `grains_membership` + `grains_membership_version`.

use async_trait::async_trait;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::storage_error;
use crate::{
    MembershipEntry, MembershipRow, MembershipSnapshot, MembershipTable, SiloAddress, SiloStatus, StorageError,
    Suspicion,
};

/// One cluster's membership table in Postgres.
///
/// Inserts and updates run in a transaction that first bumps the cluster's version row with
/// `UPDATE … SET version = version + 1 WHERE version = $expected`. Concurrent writers serialize on that row:
/// the first commits, the others re-check the condition against the new version, match nothing, and roll back.
#[derive(Debug, Clone)]
pub struct PostgresMembershipTable {
    pool: PgPool,
    cluster_id: String,
}

impl PostgresMembershipTable {
    /// The table of cluster `cluster_id` over `pool` (migrated with [`super::migrate`]).
    pub fn new(pool: PgPool, cluster_id: impl Into<String>) -> Self {
        Self { pool, cluster_id: cluster_id.into() }
    }

    /// What a rejected statement was about, for [`StorageError::Rejected`].
    fn subject(&self) -> String {
        format!("membership of cluster {}", self.cluster_id)
    }

    /// Starts a transaction and claims the next table version if the table is still at `expected`.
    async fn claim_version(&self, expected: i64) -> Result<Option<Transaction<'static, Postgres>>, StorageError> {
        let mut tx = self.pool.begin().await.map_err(storage_error(self.subject()))?;
        sqlx::query(
            "INSERT INTO grains_membership_version (cluster_id, version) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        )
        .bind(&self.cluster_id)
        .execute(&mut *tx)
        .await
        .map_err(storage_error(self.subject()))?;
        let bumped = sqlx::query(
            "UPDATE grains_membership_version SET version = version + 1 WHERE cluster_id = $1 AND version = $2",
        )
        .bind(&self.cluster_id)
        .bind(expected)
        .execute(&mut *tx)
        .await
        .map_err(storage_error(self.subject()))?;
        Ok((bumped.rows_affected() == 1).then_some(tx))
    }
}

/// Binds `$1`–`$9` of the insert and update statements: cluster, silo, name, status, gateway, times, votes.
fn bind_entry<'q>(
    query: Query<'q, Postgres, PgArguments>,
    cluster_id: &'q str,
    entry: &'q MembershipEntry,
) -> Result<Query<'q, Postgres, PgArguments>, StorageError> {
    let suspicions = serde_json::to_value(&entry.suspicions).map_err(|e| StorageError::Codec(e.to_string()))?;
    Ok(query
        .bind(cluster_id)
        .bind(&entry.silo.endpoint)
        .bind(entry.silo.epoch)
        .bind(&entry.name)
        .bind(entry.status.as_str())
        .bind(&entry.gateway)
        .bind(entry.started_at_ms)
        .bind(entry.heartbeat_at_ms)
        .bind(suspicions))
}

#[async_trait]
impl MembershipTable for PostgresMembershipTable {
    async fn read_all(&self) -> Result<MembershipSnapshot, StorageError> {
        // One statement, so the rows and the version are one consistent snapshot.
        let sql = concat!(
            "SELECT v.version, m.endpoint, m.epoch, m.name, m.status, m.gateway, ",
            timestamp_to_ms!("m.started_at"),
            ", ",
            timestamp_to_ms!("m.heartbeat_at"),
            ", m.suspicions, m.etag
             FROM grains_membership_version v
             LEFT JOIN grains_membership m ON m.cluster_id = v.cluster_id
             WHERE v.cluster_id = $1
             ORDER BY m.endpoint, m.epoch"
        );
        let rows = sqlx::query(sql)
            .bind(&self.cluster_id)
            .fetch_all(&self.pool)
            .await
            .map_err(storage_error(self.subject()))?;
        let mut snapshot = MembershipSnapshot::default();
        for row in rows {
            snapshot.version = row.try_get(0).map_err(storage_error("a membership row"))?;
            let endpoint: Option<String> = row.try_get(1).map_err(storage_error("a membership row"))?;
            let Some(endpoint) = endpoint else { continue };
            let status: String = row.try_get(4).map_err(storage_error("a membership row"))?;
            let suspicions: serde_json::Value = row.try_get(8).map_err(storage_error("a membership row"))?;
            let etag: i64 = row.try_get(9).map_err(storage_error("a membership row"))?;
            let entry = MembershipEntry {
                silo: SiloAddress { endpoint, epoch: row.try_get(2).map_err(storage_error("a membership row"))? },
                name: row.try_get(3).map_err(storage_error("a membership row"))?,
                status: SiloStatus::parse(&status)
                    .ok_or_else(|| StorageError::Codec(format!("unknown silo status {status:?}")))?,
                gateway: row.try_get(5).map_err(storage_error("a membership row"))?,
                started_at_ms: row.try_get(6).map_err(storage_error("a membership row"))?,
                heartbeat_at_ms: row.try_get(7).map_err(storage_error("a membership row"))?,
                suspicions: serde_json::from_value::<Vec<Suspicion>>(suspicions)
                    .map_err(|e| StorageError::Codec(e.to_string()))?,
            };
            snapshot.rows.push(MembershipRow { entry, etag: etag.to_string() });
        }
        Ok(snapshot)
    }

    async fn insert_row(&self, entry: &MembershipEntry, expected_version: i64) -> Result<bool, StorageError> {
        let Some(mut tx) = self.claim_version(expected_version).await? else { return Ok(false) };
        let sql = concat!(
            "INSERT INTO grains_membership
               (cluster_id, endpoint, epoch, name, status, gateway, started_at, heartbeat_at, suspicions, etag)
             VALUES ($1, $2, $3, $4, $5, $6, ",
            ms_to_timestamp!("$7"),
            ", ",
            ms_to_timestamp!("$8"),
            ", $9, nextval('grains_etag_seq'))
             ON CONFLICT DO NOTHING"
        );
        let inserted = bind_entry(sqlx::query(sql), &self.cluster_id, entry)?
            .execute(&mut *tx)
            .await
            .map_err(storage_error(self.subject()))?;
        if inserted.rows_affected() != 1 {
            return Ok(false); // the transaction rolls back on drop: the version is untouched
        }
        tx.commit().await.map_err(storage_error(self.subject()))?;
        Ok(true)
    }

    async fn update_row(
        &self,
        entry: &MembershipEntry,
        etag: &str,
        expected_version: i64,
    ) -> Result<bool, StorageError> {
        let Ok(etag) = etag.parse::<i64>() else { return Ok(false) };
        let Some(mut tx) = self.claim_version(expected_version).await? else { return Ok(false) };
        let sql = concat!(
            "UPDATE grains_membership SET name = $4, status = $5, gateway = $6, started_at = ",
            ms_to_timestamp!("$7"),
            ", heartbeat_at = ",
            ms_to_timestamp!("$8"),
            ", suspicions = $9, etag = nextval('grains_etag_seq')
             WHERE cluster_id = $1 AND endpoint = $2 AND epoch = $3 AND etag = $10"
        );
        let updated = bind_entry(sqlx::query(sql), &self.cluster_id, entry)?
            .bind(etag)
            .execute(&mut *tx)
            .await
            .map_err(storage_error(self.subject()))?;
        if updated.rows_affected() != 1 {
            return Ok(false);
        }
        tx.commit().await.map_err(storage_error(self.subject()))?;
        Ok(true)
    }

    async fn heartbeat(&self, silo: &SiloAddress, at_ms: i64) -> Result<(), StorageError> {
        let sql = concat!(
            "UPDATE grains_membership SET heartbeat_at = ",
            ms_to_timestamp!("$4"),
            " WHERE cluster_id = $1 AND endpoint = $2 AND epoch = $3"
        );
        sqlx::query(sql)
            .bind(&self.cluster_id)
            .bind(&silo.endpoint)
            .bind(silo.epoch)
            .bind(at_ms)
            .execute(&self.pool)
            .await
            .map_err(storage_error(self.subject()))?;
        Ok(())
    }

    async fn delete_all(&self) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM grains_membership_version WHERE cluster_id = $1")
            .bind(&self.cluster_id)
            .execute(&self.pool)
            .await
            .map_err(storage_error(self.subject()))?;
        Ok(())
    }
}
