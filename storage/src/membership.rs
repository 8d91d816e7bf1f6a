//! The cluster membership table: who is in the cluster, in what state, and who suspects whom.
//!
//! This is the Orleans membership protocol's storage contract. Every row belongs to one silo incarnation
//! (address + epoch). The table has a **version**: every insert and every update names the version it read
//! and, for updates, the row's etag; the store applies the change and bumps the version only if both still
//! match, in one atomic step. Two silos that race to change the table (to declare the same silo dead, or to
//! join at once) therefore cannot both win; the loser re-reads and tries again. Heartbeats are the exception:
//! they touch only their own row's heartbeat time and do not bump the version.
//!
//! Times are Unix milliseconds chosen by the caller, so protocol code can run on an injected clock.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{ETag, StorageError};

/// One incarnation of a silo: where it listens, and the epoch it started with (a new epoch every start).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SiloAddress {
    /// `host:port` of the silo-to-silo endpoint.
    pub endpoint: String,
    /// Distinguishes restarts of a silo on the same endpoint (e.g. start time in milliseconds).
    pub epoch: i64,
}

impl fmt::Display for SiloAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.endpoint, self.epoch)
    }
}

/// Where a silo is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SiloStatus {
    /// Starting: registered, not yet serving.
    Joining,
    /// Serving grains.
    Active,
    /// Leaving gracefully: deactivating its grains.
    ShuttingDown,
    /// Gone for good (stopped, or declared dead by its peers). A dead incarnation never comes back.
    Dead,
}

impl SiloStatus {
    /// The status's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            SiloStatus::Joining => "joining",
            SiloStatus::Active => "active",
            SiloStatus::ShuttingDown => "shutting_down",
            SiloStatus::Dead => "dead",
        }
    }

    /// Parses a stored status name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "joining" => SiloStatus::Joining,
            "active" => SiloStatus::Active,
            "shutting_down" => SiloStatus::ShuttingDown,
            "dead" => SiloStatus::Dead,
            _ => return None,
        })
    }
}

/// A vote that a silo seems dead, cast by another silo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspicion {
    /// The voter.
    pub by: SiloAddress,
    /// When the vote was cast (Unix ms).
    pub at_ms: i64,
}

/// One silo incarnation's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipEntry {
    /// The incarnation.
    pub silo: SiloAddress,
    /// A human-readable name.
    pub name: String,
    /// Its status.
    pub status: SiloStatus,
    /// The client gateway address, if it runs one.
    pub gateway: Option<String>,
    /// When it started (Unix ms).
    pub started_at_ms: i64,
    /// Its last heartbeat (Unix ms).
    pub heartbeat_at_ms: i64,
    /// Votes that it is dead.
    pub suspicions: Vec<Suspicion>,
}

/// A row as read, with its etag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipRow {
    /// The row.
    pub entry: MembershipEntry,
    /// Its etag, for [`MembershipTable::update_row`].
    pub etag: ETag,
}

/// The whole table as read at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipSnapshot {
    /// The table version the rows were read at (0 for a table never written).
    pub version: i64,
    /// Every row.
    pub rows: Vec<MembershipRow>,
}

impl MembershipSnapshot {
    /// The row of `silo`, if any.
    pub fn row(&self, silo: &SiloAddress) -> Option<&MembershipRow> {
        self.rows.iter().find(|r| &r.entry.silo == silo)
    }
}

/// The membership table of one cluster.
#[async_trait]
pub trait MembershipTable: Send + Sync + 'static {
    /// Reads every row and the table version, consistently.
    async fn read_all(&self) -> Result<MembershipSnapshot, StorageError>;

    /// Inserts `entry` if the table is still at `expected_version` and the silo has no row; bumps the
    /// version. `Ok(false)` when either check fails (nothing changed).
    async fn insert_row(&self, entry: &MembershipEntry, expected_version: i64) -> Result<bool, StorageError>;

    /// Replaces the row of `entry.silo` if its etag is `etag` and the table is at `expected_version`; bumps the
    /// version. `Ok(false)` when either check fails (nothing changed).
    async fn update_row(
        &self,
        entry: &MembershipEntry,
        etag: &str,
        expected_version: i64,
    ) -> Result<bool, StorageError>;

    /// Records a heartbeat of `silo` at `at_ms` (no version bump, no etag check).
    async fn heartbeat(&self, silo: &SiloAddress, at_ms: i64) -> Result<(), StorageError>;

    /// Removes every row and the version of this cluster (tests, and operators retiring a cluster).
    async fn delete_all(&self) -> Result<(), StorageError>;
}
