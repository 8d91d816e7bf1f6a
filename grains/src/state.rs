//! Persistent grain state with optimistic concurrency.
//!
//! A `PersistentState<T>` field is loaded when the grain activates and written only when the grain asks
//! ([`write`](PersistentState::write)), so a grain chooses write-through per call or batching. Every write and
//! clear carries the etag of the version this activation last saw; a store that holds a newer version refuses
//! with [`StorageError::Conflict`](crate::StorageError::Conflict). On a conflict the activation has lost the race
//! to another writer (a duplicate activation, or a stale one), so it asks to be deactivated, as Orleans does:
//! the next call reloads the winner's state.
//!
//! Any other failed write also deactivates the grain after the current turn: the value in memory then holds
//! changes storage may not have (or, if the connection broke mid-commit, may have), and only a reload tells.
//! So a change is either acknowledged and stored, or it is not seen by any later call. That includes a value
//! the store refuses to hold ([`StorageError::Rejected`], e.g. a string with U+0000 in Postgres): the write
//! fails alone, with that typed error rather than `Unavailable`, since retrying the same value cannot succeed.
//! And a silo the cluster has declared dead gets [`StorageError::Fenced`] from a store fenced by membership
//! (Postgres state and membership in one database): its grains live elsewhere now.
//!
//! ## Evolving a state type
//! State is stored as a JSON document (serde_json). Adding a field with `#[serde(default)]` keeps old records
//! readable; removing a field is fine (unknown fields are ignored unless the type denies them); renaming needs
//! `#[serde(alias = "old")]`.

use std::ops::{Deref, DerefMut};

use grains_storage::{ETag, StateKey, StorageError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::GrainContext;

/// A grain's persistent state of type `T`, loaded at activation; dereferences to `T`.
#[derive(Debug)]
pub struct PersistentState<T> {
    value: T,
    etag: Option<ETag>,
    key: StateKey,
    ctx: GrainContext,
}

impl<T> PersistentState<T>
where
    T: Serialize + DeserializeOwned + Default + Send + Sync + 'static,
{
    #[doc(hidden)]
    /// Loads the state called `name` of the grain behind `ctx` (default `T` when none is stored).
    pub async fn load(ctx: &GrainContext, name: &str) -> Result<Self, StorageError> {
        let key = ctx.id().state_key(name);
        let mut state = Self { value: T::default(), etag: None, key, ctx: ctx.clone() };
        state.read().await?;
        Ok(state)
    }

    /// Re-reads the state from storage, replacing the value held in memory.
    pub async fn read(&mut self) -> Result<(), StorageError> {
        match self.ctx.state_store().read(&self.key).await? {
            Some(stored) => {
                self.value = serde_json::from_value(stored.document)
                    .map_err(|e| StorageError::Codec(format!("{}: {e}", self.key)))?;
                self.etag = Some(stored.etag);
            }
            None => {
                self.value = T::default();
                self.etag = None;
            }
        }
        Ok(())
    }

    /// Writes the value to storage. Returns once the store has committed it.
    pub async fn write(&mut self) -> Result<(), StorageError> {
        let document =
            serde_json::to_value(&self.value).map_err(|e| StorageError::Codec(format!("{}: {e}", self.key)))?;
        let result = self.ctx.state_store().write(&self.key, &document, self.etag.as_deref()).await;
        let etag = self.on_failure_deactivate(result)?;
        self.etag = Some(etag);
        Ok(())
    }

    /// Removes the state from storage and resets the value to `T::default()`.
    pub async fn clear(&mut self) -> Result<(), StorageError> {
        let result = self.ctx.state_store().clear(&self.key, self.etag.as_deref()).await;
        self.on_failure_deactivate(result)?;
        self.value = T::default();
        self.etag = None;
        Ok(())
    }

    /// On a failed write, leaves it to the next activation to reload the truth from storage.
    fn on_failure_deactivate<R>(&self, result: Result<R, StorageError>) -> Result<R, StorageError> {
        match &result {
            Err(StorageError::Conflict { .. }) => {
                tracing::warn!(state = %self.key, "state write refused by etag check; deactivating this activation");
                self.ctx.deactivate_on_idle();
            }
            Err(error) => {
                tracing::warn!(state = %self.key, %error, "state write failed; deactivating this activation");
                self.ctx.deactivate_on_idle();
            }
            Ok(_) => {}
        }
        result
    }

    /// The etag of the stored version this activation last read or wrote (`None`: nothing stored).
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// Whether a record exists in storage for this state.
    pub fn record_exists(&self) -> bool {
        self.etag.is_some()
    }

    /// The state value.
    pub fn get(&self) -> &T {
        &self.value
    }

    /// The state value, for changing it (call [`write`](Self::write) to persist).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T> Deref for PersistentState<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for PersistentState<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}
