//! # Grains: virtual actors for Rust
//!
//! A **grain** is an entity with an identity (a cart, a player, a device) that lives in memory on one silo of a
//! cluster, handles its calls one at a time, and keeps its state in durable storage. You never create or destroy
//! grains: calling a grain id activates it on demand, an idle grain is passivated, and if its silo dies the next
//! call activates it again elsewhere from storage. This is the virtual actor model of Microsoft Orleans.
//!
//! ## Write a grain
//!
//! Put `#[grain]` on a struct and on its impl block. Public `async fn`s taking `&self` or `&mut self` become the
//! grain's methods; `on_activate` and `on_deactivate` are lifecycle hooks. Fields of type
//! [`PersistentState<T>`] are loaded from storage on activation, fields of type [`Journaled<S>`] (event-sourced
//! state, see [`journaled`]) are recovered from the grain's event journal, [`GrainContext`] fields receive the
//! context, and every other field starts at its `Default`.
//!
//! ```
//! use std::collections::BTreeMap;
//! use grains::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct CartState {
//!     items: BTreeMap<String, u32>,
//! }
//!
//! #[derive(Debug, Serialize, Deserialize, thiserror::Error)]
//! pub enum CartError {
//!     #[error("quantity must be positive")]
//!     ZeroQuantity,
//!     #[error("storage: {0}")]
//!     Storage(String),
//! }
//!
//! impl From<StorageError> for CartError {
//!     fn from(e: StorageError) -> Self {
//!         CartError::Storage(e.to_string())
//!     }
//! }
//!
//! #[grain(idle_timeout = "10m")]
//! pub struct Cart {
//!     state: PersistentState<CartState>,
//! }
//!
//! #[grain]
//! impl Cart {
//!     /// Adds `qty` of `item`; returns the new quantity of that item.
//!     pub async fn add(&mut self, item: String, qty: u32) -> Result<u32, CartError> {
//!         if qty == 0 {
//!             return Err(CartError::ZeroQuantity);
//!         }
//!         let n = self.state.items.entry(item).or_default();
//!         *n += qty;
//!         let n = *n;
//!         self.state.write().await?;
//!         Ok(n)
//!     }
//!
//!     /// The cart's items.
//!     pub async fn items(&self) -> Vec<(String, u32)> {
//!         self.state.items.iter().map(|(k, v)| (k.clone(), *v)).collect()
//!     }
//! }
//! ```
//!
//! ## Lifecycle hooks
//!
//! Three optional methods of the impl block, with these signatures (the macro reports any other at the hook):
//!
//! - `async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError>` runs after the state is
//!   loaded, before the first call; an `Err` fails that call with [`CallError::ActivationFailed`] and leaves
//!   no activation behind.
//! - `async fn on_deactivate(&mut self, ctx: &GrainContext) -> Result<(), GrainError>` runs when the grain is
//!   passivated (idle past its `idle_timeout`, [`GrainContext::deactivate_on_idle`], or silo shutdown).
//! - `async fn on_reminder(&mut self, tick: ReminderTick) -> Result<(), GrainError>` receives the grain's
//!   durable reminders (see [`reminder`]).
//!
//! ## Call it
//!
//! `#[grain]` generates `CartRef`, a typed reference with one async method per grain method. Get one from a
//! silo or an external client (`grains_silo::Client`; a process that only calls grains depends on
//! `grains-silo` with `default-features = false`, which compiles the client and none of the runtime), or
//! from inside a grain through its [`GrainContext`]:
//! `ctx.grain::<Cart>("alice")`. Every call returns `Result<R, CallError>`, where `R` is what the grain method
//! returns and [`CallError`] is a failure of the call itself (timeout, unknown grain type, codec, ...).
//!
//! For a method returning `Result<T, E>`, [`flatten_call`](CallResultExt::flatten_call) gives
//! `Result<T, GrainCallError<E>>`: one `?` reaches `T`, while [`GrainCallError::Call`] and
//! [`GrainCallError::Grain`] keep "the call failed" apart from "the grain said no". Calls time out after 30 s
//! unless the reference sets its own deadline (`cart.with_timeout(...)`).
//!
//! ```
//! # use grains::prelude::*;
//! # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
//! # pub enum CartError { #[error("no such item")] UnknownItem }
//! # #[grain] pub struct Cart;
//! # #[grain] impl Cart {
//! #     pub async fn add(&mut self, item: String, qty: u32) -> Result<u32, CartError> { Ok(qty) }
//! #     pub async fn items(&self) -> Vec<(String, u32)> { Vec::new() }
//! # }
//! /// Adds two apples, unless the catalog has none; any other failure goes to the caller.
//! async fn two_apples(cart: &CartRef) -> Result<bool, GrainCallError<CartError>> {
//!     match cart.add("apple".into(), 2).await.flatten_call() {
//!         Ok(_) => Ok(true),
//!         Err(GrainCallError::Grain(CartError::UnknownItem)) => Ok(false), // the grain said no
//!         Err(failed) => Err(failed), // the call failed: see `may_have_run` before retrying
//!     }
//! }
//!
//! /// A method that cannot fail on its own needs one `?`, for the call.
//! async fn count(cart: &CartRef) -> Result<usize, CallError> {
//!     Ok(cart.items().await?.len())
//! }
//! ```
//!
//! ## State
//!
//! A [`PersistentState<T>`] field derefs to `T`. It is read once at activation; [`PersistentState::write`]
//! stores it when the grain decides (write-through per call, or batched), [`PersistentState::clear`] deletes
//! it, and [`PersistentState::read`] reloads it. Every write carries the etag it read: a write that finds
//! another in the store fails with [`StorageError::Conflict`] instead of overwriting it. Event-sourced state
//! ([`Journaled<S>`]) records events instead (see [`journaled`]).
//!
//! ## Errors
//!
//! - [`CallError`]: the call failed; [`CallError::may_have_run`] says whether the grain may have run it
//!   anyway (a timeout, a lost connection), so that a retry could run it twice.
//! - Your method's own error type, inside `Ok`: the grain ran and said no. It crosses the wire, so it derives
//!   `Serialize` and `Deserialize`.
//! - [`GrainError`]: a lifecycle hook failed; [`StorageError`]: a state operation failed;
//!   [`MissingService`]: the silo was not given a service the grain asked for.
//!
//! ## Application services
//!
//! Grains reach shared resources — a database pool, a client of another system, settings — through
//! [`GrainContext::service`], by type, after Orleans' dependency injection. The silo's `main` registers them
//! (`SiloBuilder::service(value)`, also through `grains_silo::cli::run_customized`).
//!
//! ## Run it
//!
//! A silo binary is a `main` that calls `grains_silo::cli::run()`; it hosts every `#[grain]` type linked into
//! it. If the grains live in a library crate, the linker keeps their registrations only when `main` calls
//! something of that crate: give it a `pub fn link() {}` and call it from `main` (a call to a type no silo
//! hosts fails with [`CallError::UnknownGrainType`]). One silo with in-memory storage is a whole development
//! cluster; a production cluster is several silos sharing a Postgres membership table and storage
//! (`--membership postgres --storage postgres --database-url ...`). See the `grains-silo` crate and its
//! `README`.
//!
//! ## Semantics
//! - **Single activation.** A grain id has at most one activation in a silo; concurrent first calls queue
//!   behind the one activation being built.
//! - **Turn-based.** An activation runs one call at a time, to completion, so `&mut self` needs no locks.
//!   A grain that calls back into a grain waiting on it (A → B → A) gets [`CallError::Deadlock`] at once.
//! - **At most once.** The runtime never retries a call that may have reached a grain; a timeout means the
//!   outcome is unknown.
//! - **Timers and reminders.** [`GrainContext::register_timer`] runs a callback as a turn of the activation
//!   (it ends with the activation); [`GrainContext::register_reminder`] stores a durable periodic wake-up,
//!   delivered to the grain's `on_reminder` hook at least once per period wherever it lives (see [`timer`] and
//!   [`reminder`]).

pub mod codec;
mod context;
pub mod duration;
mod error;
mod grain;
mod id;
pub mod journaled;
mod reference;
pub mod reminder;
mod runtime;
mod state;
pub mod timer;

pub use context::GrainContext;
pub use error::{CallError, CallResultExt, GrainCallError, GrainError, MissingService, StorageError};
pub use grain::{Grain, GrainType, Placement};
pub use grains_macros::grain;
pub use id::{GrainId, GrainKey};
pub use journaled::{EventSourced, Journaled, Recovery};
pub use reference::GrainRef;
pub use reminder::{Reminder, ReminderError, ReminderTick};
pub use runtime::RequestMetadata;
pub use state::PersistentState;
pub use timer::{TimerError, TimerHandle};
pub use uuid::Uuid;

/// The names a grain author needs: `use grains::prelude::*;`.
pub mod prelude {
    pub use crate::{
        CallError, CallResultExt, EventSourced, Grain, GrainCallError, GrainContext, GrainError, GrainId, GrainKey,
        GrainRef, GrainType, Journaled, PersistentState, ReminderTick, StorageError, grain,
    };
    pub use serde::{Deserialize, Serialize};
}

/// Items used by code that `#[grain]` generates, and by the runtime (`grains-silo`). Not public API: names
/// and shapes change without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::codec::{ValueCodec, begin_args, json_args, json_result, json_value, read_args};
    pub use crate::context::{ActivationServices, Services};
    pub use crate::grain::{
        BuildFn, DecodeRequestFn, ErasedGrain, GrainOptions, GrainRegistration, HttpMethods, TurnOutcome, TurnScope,
        WireMessage,
    };
    pub use crate::reference::{RefCore, mismatched_reply};
    pub use crate::reminder::{REMINDER_METHOD, ReminderAck, ReminderRegistry};
    pub use crate::timer::{TimerCallback, TimerHost};
    pub use crate::{
        CallError, Grain, GrainContext, GrainError, GrainRef, GrainType, Journaled, PersistentState, Placement,
        ReminderTick, codec::CodecError,
    };

    /// The seam between grain references and runtimes: calls, payloads, call chains (see the module's docs).
    pub mod runtime {
        pub use crate::runtime::*;
    }

    /// Whether a grain method's `Result` return value is its own error (for the silo's error counts).
    pub fn result_is_err<T, E>(value: &std::result::Result<T, E>) -> bool {
        value.is_err()
    }
    pub use inventory;
    pub use serde;
    pub use std::future::Future;
    pub use std::result::Result;
    pub use std::time::Duration;
    pub use uuid::Uuid;

    /// A type that can cross the wire as a grain method's argument.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be a grain method argument",
        label = "grain arguments must implement `Serialize + DeserializeOwned + Send + 'static`",
        note = "derive `serde::Serialize` and `serde::Deserialize` for `{Self}`, or pass an owned type that does"
    )]
    pub trait GrainArgument: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
    #[diagnostic::do_not_recommend]
    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> GrainArgument for T {}

    /// A type that can cross the wire as a grain method's return value.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be returned from a grain method",
        label = "grain return types must implement `Serialize + DeserializeOwned + Send + 'static`",
        note = "derive `serde::Serialize` and `serde::Deserialize` for `{Self}`"
    )]
    pub trait GrainReturn: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
    #[diagnostic::do_not_recommend]
    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> GrainReturn for T {}

    /// The codec of an argument type: every use in generated code goes through here, so an argument type that
    /// cannot cross the wire is reported once, at the type.
    pub const fn arg<T: GrainArgument>() -> crate::codec::ValueCodec<T> {
        crate::codec::ValueCodec::new()
    }

    /// The codec of a return type (see [`arg`]).
    pub const fn ret<T: GrainReturn>() -> crate::codec::ValueCodec<T> {
        crate::codec::ValueCodec::new()
    }
}
