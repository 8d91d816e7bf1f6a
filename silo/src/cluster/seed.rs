//! Development clustering without a database: one seed silo keeps the membership table in its memory and the
//! other silos read and write it through system calls (`--seed host:port`).
//!
//! This is Orleans' development clustering: simple to start three silos in three terminals, but the seed is a
//! single point of failure — if it dies, the others cannot change membership. Production clusters use the
//! Postgres membership table.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use grains::CallError;
use grains_storage::{MembershipEntry, MembershipSnapshot, MembershipTable, SiloAddress, StorageError};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::system::{self, SystemRequest, SystemResponse};
use crate::connection::{Connection, PeerKind};
use crate::peer_auth::PeerIdentity;

/// A membership table operation sent to the seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum TableOp {
    ReadAll,
    Insert { entry: MembershipEntry, expected_version: i64 },
    Update { entry: MembershipEntry, etag: String, expected_version: i64 },
    Heartbeat { silo: SiloAddress, at_ms: i64 },
}

/// The seed's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum TableAnswer {
    Snapshot { version: i64, rows: Vec<(MembershipEntry, String)> },
    Applied(bool),
    Done,
}

/// Runs `op` against the seed's own table.
pub(crate) async fn serve(table: &dyn MembershipTable, op: TableOp) -> Result<TableAnswer, StorageError> {
    Ok(match op {
        TableOp::ReadAll => {
            let snapshot = table.read_all().await?;
            TableAnswer::Snapshot {
                version: snapshot.version,
                rows: snapshot.rows.into_iter().map(|r| (r.entry, r.etag)).collect(),
            }
        }
        TableOp::Insert { entry, expected_version } => {
            TableAnswer::Applied(table.insert_row(&entry, expected_version).await?)
        }
        TableOp::Update { entry, etag, expected_version } => {
            TableAnswer::Applied(table.update_row(&entry, &etag, expected_version).await?)
        }
        TableOp::Heartbeat { silo, at_ms } => {
            table.heartbeat(&silo, at_ms).await?;
            TableAnswer::Done
        }
    })
}

/// The membership table of a seed silo, reached over the network.
pub(crate) struct SeedMembershipTable {
    seed: String,
    identity: PeerIdentity,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl SeedMembershipTable {
    /// The table held by the silo at `seed` (`host:port`), reached as the member `identity`.
    pub(crate) fn new(seed: impl Into<String>, identity: PeerIdentity) -> Self {
        Self { seed: seed.into(), identity, connection: Mutex::new(None) }
    }

    async fn ask(&self, op: TableOp) -> Result<TableAnswer, StorageError> {
        let unavailable = |e: CallError| StorageError::Unavailable(format!("seed {}: {e}", self.seed));
        let conn = {
            let mut slot = self.connection.lock().await;
            match slot.as_ref().filter(|c| c.is_alive()) {
                Some(conn) => conn.clone(),
                None => {
                    let conn = Connection::open(
                        &self.seed,
                        PeerKind::Silo,
                        Duration::from_secs(2),
                        Some(&self.identity),
                        crate::connection::KeepAlive::BETWEEN_SILOS,
                    )
                    .await
                    .map_err(unavailable)?;
                    *slot = Some(conn.clone());
                    conn
                }
            }
        };
        let deadline = system::deadline_in(Duration::from_secs(5));
        match system::call(&conn, &SystemRequest::Table(op), deadline).await.map_err(unavailable)? {
            SystemResponse::Table(answer) => Ok(answer),
            other => Err(StorageError::Unavailable(format!("seed answered {other:?}"))),
        }
    }
}

fn unexpected(answer: TableAnswer) -> StorageError {
    StorageError::Unavailable(format!("unexpected seed answer {answer:?}"))
}

#[async_trait]
impl MembershipTable for SeedMembershipTable {
    async fn read_all(&self) -> Result<MembershipSnapshot, StorageError> {
        match self.ask(TableOp::ReadAll).await? {
            TableAnswer::Snapshot { version, rows } => Ok(MembershipSnapshot {
                version,
                rows: rows.into_iter().map(|(entry, etag)| grains_storage::MembershipRow { entry, etag }).collect(),
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn insert_row(&self, entry: &MembershipEntry, expected_version: i64) -> Result<bool, StorageError> {
        match self.ask(TableOp::Insert { entry: entry.clone(), expected_version }).await? {
            TableAnswer::Applied(applied) => Ok(applied),
            other => Err(unexpected(other)),
        }
    }

    async fn update_row(
        &self,
        entry: &MembershipEntry,
        etag: &str,
        expected_version: i64,
    ) -> Result<bool, StorageError> {
        let op = TableOp::Update { entry: entry.clone(), etag: etag.to_owned(), expected_version };
        match self.ask(op).await? {
            TableAnswer::Applied(applied) => Ok(applied),
            other => Err(unexpected(other)),
        }
    }

    async fn heartbeat(&self, silo: &SiloAddress, at_ms: i64) -> Result<(), StorageError> {
        self.ask(TableOp::Heartbeat { silo: silo.clone(), at_ms }).await.map(|_| ())
    }

    async fn delete_all(&self) -> Result<(), StorageError> {
        Err(StorageError::Unavailable("a seed's table is deleted with the seed".into()))
    }
}
