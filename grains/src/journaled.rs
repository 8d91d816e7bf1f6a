//! Event-sourced grain state: the state is a fold of the grain's events.
//!
//! A state type implements [`EventSourced`]: its `Event` type and `apply`, which folds one event into the
//! state. A grain holds it in a [`Journaled<S>`] field, the event-sourced sibling of `PersistentState<T>`:
//!
//! ```
//! use grains::prelude::*;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Balance { cents: i64 }
//!
//! #[derive(Serialize, Deserialize)]
//! pub enum BalanceEvent { Deposited { cents: i64 }, Withdrawn { cents: i64 } }
//!
//! impl EventSourced for Balance {
//!     type Event = BalanceEvent;
//!     fn apply(&mut self, event: &BalanceEvent) {
//!         match event {
//!             BalanceEvent::Deposited { cents } => self.cents += cents,
//!             BalanceEvent::Withdrawn { cents } => self.cents -= cents,
//!         }
//!     }
//! }
//!
//! #[grain]
//! pub struct Wallet {
//!     #[journal(snapshot_every = 100)]
//!     balance: Journaled<Balance>,
//! }
//!
//! #[grain]
//! impl Wallet {
//!     pub async fn withdraw(&mut self, cents: i64) -> Result<i64, String> {
//!         if self.balance.cents < cents {
//!             return Err("insufficient funds".into()); // decide on the state, then record the fact
//!         }
//!         self.balance.persist(BalanceEvent::Withdrawn { cents }).await.map_err(|e| e.to_string())?;
//!         Ok(self.balance.cents)
//!     }
//! }
//! ```
//!
//! # What it promises
//! - **Activation recovers the state exactly**: the latest snapshot (if any), then every later event in order,
//!   folded with `apply`. The same events always give the same state, so `apply` must be deterministic and
//!   must not fail: validate in the grain method, before you raise, and record only what happened.
//! - **Memory never runs ahead of the journal.** [`raise`](Journaled::raise) only queues an event;
//!   [`confirm`](Journaled::confirm) appends every queued event in one atomic append and applies them once the
//!   journal has them ([`persist`](Journaled::persist) and [`persist_all`](Journaled::persist_all) do both).
//!   The state a grain reads is always the confirmed one.
//! - **One writer per stream.** An append names the sequence number of the last event this activation knows;
//!   the journal refuses it with [`StorageError::Conflict`] if another activation appended meanwhile. The
//!   stale activation then deactivates after its turn, and the next call recovers the winner's events. The
//!   same happens after an append whose outcome is unknown (the store became unavailable mid-commit), and
//!   after [`StorageError::Fenced`] (the silo was declared dead). A retry in the same turn is safe either way:
//!   an append that did land makes the retry conflict.
//! - **Snapshots** every `snapshot_every` events (`#[journal(snapshot_every = N)]`, per grain type; 0, the
//!   default, takes none) bound recovery to the snapshot plus fewer than N events. A snapshot that no longer
//!   decodes (the state type changed incompatibly) is skipped with a warning, and the whole journal replayed.
//!
//! Events are stored as JSON (serde_json), with a type name ([`EventSourced::event_type`]; by default the
//! variant name of an enum) and tags ([`EventSourced::tags`]) that projections select them by. Evolve event
//! types as you would any serde type: old events must stay readable.

use std::ops::Deref;

use grains_storage::{NewEvent, Snapshot, StateKey, StorageError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::context::GrainContext;

/// How many events recovery reads per round trip.
const REPLAY_PAGE: usize = 1000;

/// A state that is the fold of its events: what a [`Journaled`] field holds.
pub trait EventSourced: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The events that change it.
    type Event: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Folds one event into the state. Deterministic and infallible: it runs again on every recovery.
    fn apply(&mut self, event: &Self::Event);

    /// The name stored with an event, for operators and projections. `None` (the default) derives it from
    /// the serialized event: the variant name of an enum in serde's default (externally tagged) form, else
    /// the Rust type's name.
    fn event_type(event: &Self::Event) -> Option<String> {
        let _ = event;
        None
    }

    /// Tags stored with an event; a projection can select events by tag across grain types.
    fn tags(event: &Self::Event) -> Vec<String> {
        let _ = event;
        Vec::new()
    }
}

/// How an activation recovered its journaled state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The sequence number of the snapshot it started from, if it used one.
    pub snapshot: Option<u64>,
    /// How many events it folded after that.
    pub replayed: u64,
}

/// An event-sourced state `S`, recovered from the grain's journal at activation; dereferences to `S`.
///
/// Declare it as a field of a `#[grain]` struct, optionally with `#[journal(name = "...", snapshot_every =
/// N)]` (the journal's name defaults to the field name). See the [module docs](self).
#[derive(Debug)]
pub struct Journaled<S: EventSourced> {
    state: S,
    version: u64,
    raised: Vec<S::Event>,
    snapshot_every: u64,
    snapshot_seq: u64,
    recovery: Recovery,
    key: StateKey,
    ctx: GrainContext,
}

impl<S: EventSourced> Journaled<S> {
    #[doc(hidden)]
    /// Recovers the journal called `name` of the grain behind `ctx`: the latest snapshot, then the events after
    /// it. Snapshots are taken every `snapshot_every` events (0: never).
    pub async fn load(ctx: &GrainContext, name: &str, snapshot_every: u64) -> Result<Self, StorageError> {
        let key = ctx.id().state_key(name);
        let span = tracing::debug_span!("journal.recover", stream = %key);
        let mut journaled = Self {
            state: S::default(),
            version: 0,
            raised: Vec::new(),
            snapshot_every,
            snapshot_seq: 0,
            recovery: Recovery::default(),
            key,
            ctx: ctx.clone(),
        };
        journaled.recover().instrument(span).await?;
        Ok(journaled)
    }

    async fn recover(&mut self) -> Result<(), StorageError> {
        let journal = journal_of(&self.ctx)?;
        if let Some(snapshot) = journal.read_snapshot(&self.key).await? {
            match serde_json::from_value::<S>(snapshot.document) {
                Ok(state) => {
                    self.state = state;
                    self.version = snapshot.seq;
                    self.snapshot_seq = snapshot.seq;
                    self.recovery.snapshot = Some(snapshot.seq);
                }
                Err(error) => tracing::warn!(
                    stream = %self.key, seq = snapshot.seq, %error,
                    "snapshot does not decode; replaying the whole journal"
                ),
            }
        }
        let (state, version, replayed) =
            fold_from(&self.ctx, &self.key, std::mem::take(&mut self.state), self.version).await?;
        self.state = state;
        self.version = version;
        self.recovery.replayed = replayed;
        tracing::debug!(stream = %self.key, version, snapshot = ?self.recovery.snapshot, replayed, "journal recovered");
        Ok(())
    }

    /// Queues `event` for the next [`confirm`](Self::confirm). The state does not change until then.
    pub fn raise(&mut self, event: S::Event) {
        self.raised.push(event);
    }

    /// Appends every raised event to the journal in one atomic append, then applies them to the state; returns
    /// the new version. Nothing raised: returns the version at once.
    ///
    /// On an error none of them is applied, and they are dropped. A conflict (another activation appended), an
    /// unknown outcome or a fenced silo also deactivate this activation after its turn (see the
    /// [module docs](self)).
    pub async fn confirm(&mut self) -> Result<u64, StorageError> {
        if self.raised.is_empty() {
            return Ok(self.version);
        }
        let raised = std::mem::take(&mut self.raised);
        let events = raised.iter().map(|event| self.encode(event)).collect::<Result<Vec<_>, _>>()?;
        let journal = journal_of(&self.ctx)?;
        let span =
            tracing::debug_span!("journal.append", stream = %self.key, expected = self.version, events = events.len());
        match journal.append(&self.key, self.version, &events).instrument(span).await {
            Ok(version) => {
                for event in &raised {
                    self.state.apply(event);
                }
                self.version = version;
                self.snapshot_if_due().await;
                Ok(version)
            }
            Err(error) => {
                match &error {
                    // Refused for what it holds: nothing was appended, memory still equals the journal.
                    StorageError::Rejected { .. } | StorageError::Codec(_) => {
                        tracing::warn!(stream = %self.key, %error, "append refused");
                    }
                    StorageError::Conflict { .. } => {
                        tracing::warn!(stream = %self.key, %error, "append refused by the sequence check; deactivating this activation");
                        self.ctx.deactivate_on_idle();
                    }
                    _ => {
                        tracing::warn!(stream = %self.key, %error, "append failed; deactivating this activation");
                        self.ctx.deactivate_on_idle();
                    }
                }
                Err(error)
            }
        }
    }

    /// Appends `event` and applies it: [`raise`](Self::raise) then [`confirm`](Self::confirm).
    pub async fn persist(&mut self, event: S::Event) -> Result<u64, StorageError> {
        self.raise(event);
        self.confirm().await
    }

    /// Appends `events` atomically (all or none) and applies them; with anything raised before, in order.
    pub async fn persist_all(&mut self, events: impl IntoIterator<Item = S::Event>) -> Result<u64, StorageError> {
        self.raised.extend(events);
        self.confirm().await
    }

    fn encode(&self, event: &S::Event) -> Result<NewEvent, StorageError> {
        let payload = serde_json::to_value(event).map_err(|e| StorageError::Codec(format!("{}: {e}", self.key)))?;
        let event_type = S::event_type(event).unwrap_or_else(|| type_name_of(event));
        Ok(NewEvent { event_type, payload, tags: S::tags(event) })
    }

    /// Saves a snapshot when `snapshot_every` events have been confirmed since the last one. A failure is
    /// logged and costs only a longer recovery.
    async fn snapshot_if_due(&mut self) {
        if self.snapshot_every == 0 || self.version - self.snapshot_seq < self.snapshot_every {
            return;
        }
        let document = match serde_json::to_value(&self.state) {
            Ok(document) => document,
            Err(error) => {
                tracing::warn!(stream = %self.key, %error, "state does not serialize; no snapshot");
                return;
            }
        };
        let snapshot = Snapshot { seq: self.version, document };
        let Ok(journal) = journal_of(&self.ctx) else { return };
        match journal.save_snapshot(&self.key, &snapshot).await {
            Ok(()) => self.snapshot_seq = self.version,
            Err(error) => tracing::warn!(stream = %self.key, %error, "snapshot not saved"),
        }
    }

    /// The state as of the last confirmed event.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The sequence number of the last confirmed event (0: none).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many raised events wait for [`confirm`](Self::confirm).
    pub fn pending(&self) -> usize {
        self.raised.len()
    }

    /// How this activation recovered the state.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// The journal's stream key (grain type, shape-tagged grain key, journal name).
    pub fn key(&self) -> &StateKey {
        &self.key
    }

    /// The confirmed events after `after`, at most `limit`, with their sequence numbers.
    pub async fn events(&self, after: u64, limit: usize) -> Result<Vec<(u64, S::Event)>, StorageError> {
        let journal = journal_of(&self.ctx)?;
        let stored =
            journal.read_stream(&self.key, after, limit.min(self.version.saturating_sub(after) as usize)).await?;
        stored.into_iter().map(|e| Ok((e.seq, decode::<S>(&self.key, e.seq, e.payload)?))).collect()
    }

    /// Folds the whole journal from the default state, ignoring snapshots: what recovery without snapshots
    /// gives (e.g. to check a snapshot, or after changing `apply`). Does not change this activation.
    pub async fn replay_all(&self) -> Result<S, StorageError> {
        Ok(fold_from(&self.ctx, &self.key, S::default(), 0).await?.0)
    }
}

/// Folds the events of `key` after `version` into `state`; returns the state, the new version, and how many
/// events were folded.
async fn fold_from<S: EventSourced>(
    ctx: &GrainContext,
    key: &StateKey,
    mut state: S,
    mut version: u64,
) -> Result<(S, u64, u64), StorageError> {
    let journal = journal_of(ctx)?;
    let mut folded = 0;
    loop {
        let page = journal.read_stream(key, version, REPLAY_PAGE).await?;
        let full = page.len() == REPLAY_PAGE;
        for stored in page {
            if stored.seq != version + 1 {
                return Err(StorageError::Codec(format!("{key}: event {} follows event {version}", stored.seq)));
            }
            state.apply(&decode::<S>(key, stored.seq, stored.payload)?);
            version = stored.seq;
            folded += 1;
        }
        if !full {
            return Ok((state, version, folded));
        }
    }
}

fn decode<S: EventSourced>(key: &StateKey, seq: u64, payload: serde_json::Value) -> Result<S::Event, StorageError> {
    serde_json::from_value(payload).map_err(|e| StorageError::Codec(format!("{key}: event {seq}: {e}")))
}

fn journal_of(ctx: &GrainContext) -> Result<&std::sync::Arc<dyn grains_storage::EventJournal>, StorageError> {
    ctx.journal().ok_or_else(|| StorageError::Unavailable("this runtime has no event journal".to_owned()))
}

/// The default event type name: the variant of an enum in serde's default (externally tagged) form, the name
/// of a struct, else the last segment of the Rust type's name.
fn type_name_of<E: Serialize>(event: &E) -> String {
    if let Err(NameFound(Some(name))) = event.serialize(NameOf) {
        return name.to_owned();
    }
    let full = std::any::type_name::<E>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_owned()
}

/// A serializer that stops at the first thing it is given, reporting the variant or struct name serde passes.
struct NameOf;

/// How [`NameOf`] stops: with the name it found, if any.
#[derive(Debug)]
struct NameFound(Option<&'static str>);

impl std::fmt::Display for NameFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for NameFound {}

impl serde::ser::Error for NameFound {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        NameFound(None)
    }
}

/// Serializer methods for values that carry no name.
macro_rules! nameless {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<(), NameFound> { Err(NameFound(None)) })*
    };
}

impl serde::Serializer for NameOf {
    type Ok = ();
    type Error = NameFound;
    type SerializeSeq = serde::ser::Impossible<(), NameFound>;
    type SerializeTuple = serde::ser::Impossible<(), NameFound>;
    type SerializeTupleStruct = serde::ser::Impossible<(), NameFound>;
    type SerializeTupleVariant = serde::ser::Impossible<(), NameFound>;
    type SerializeMap = serde::ser::Impossible<(), NameFound>;
    type SerializeStruct = serde::ser::Impossible<(), NameFound>;
    type SerializeStructVariant = serde::ser::Impossible<(), NameFound>;

    nameless!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
    );

    fn serialize_none(self) -> Result<(), NameFound> {
        Err(NameFound(None))
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), NameFound> {
        Err(NameFound(None))
    }

    fn serialize_unit(self) -> Result<(), NameFound> {
        Err(NameFound(None))
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<(), NameFound> {
        Err(NameFound(Some(name)))
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<(), NameFound> {
        Err(NameFound(Some(variant)))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, name: &'static str, _: &T) -> Result<(), NameFound> {
        Err(NameFound(Some(name)))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: &T,
    ) -> Result<(), NameFound> {
        Err(NameFound(Some(variant)))
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NameFound> {
        Err(NameFound(None))
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NameFound> {
        Err(NameFound(None))
    }

    fn serialize_tuple_struct(self, name: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, NameFound> {
        Err(NameFound(Some(name)))
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NameFound> {
        Err(NameFound(Some(variant)))
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NameFound> {
        Err(NameFound(None))
    }

    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Self::SerializeStruct, NameFound> {
        Err(NameFound(Some(name)))
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NameFound> {
        Err(NameFound(Some(variant)))
    }
}

impl<S: EventSourced> Deref for Journaled<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    enum Ev {
        Added { n: u32 },
        Cleared,
        Pair(u32, u32),
    }

    #[derive(Serialize)]
    struct Plain {
        n: u32,
    }

    #[test]
    fn event_type_names_come_from_the_variant_or_the_type() {
        assert_eq!(type_name_of(&Ev::Added { n: 1 }), "Added");
        assert_eq!(type_name_of(&Ev::Cleared), "Cleared");
        assert_eq!(type_name_of(&Ev::Pair(1, 2)), "Pair");
        assert_eq!(type_name_of(&Plain { n: 1 }), "Plain", "a struct with one field is not a variant");
        assert_eq!(type_name_of(&vec![1u32]), "Vec");
        assert_eq!(type_name_of(&7u8), "u8");
    }
}
