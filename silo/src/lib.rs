//! # grains-silo: the Grains runtime
//!
//! A **silo** hosts grain activations: it routes each call by grain id to the grain's one activation
//! (activating it on demand), runs calls one at a time per activation, passivates idle grains, and serves
//! external clients through a gateway. Every `#[grain]` type linked into the binary is hosted; there is no list
//! to maintain.
//!
//! ```no_run
//! # use grains::prelude::*;
//! # #[grain] pub struct Hello;
//! # #[grain] impl Hello { pub async fn hi(&self, name: String) -> String { format!("hi {name}") } }
//! use std::time::Duration;
//! use grains_silo::{Client, Silo, SiloConfig};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! // In the silo process (or use `grains_silo::cli::run()` as your `main`):
//! let silo = Silo::builder().config(SiloConfig::default()).start().await?;
//! let greeting = silo.grain::<Hello>("world").hi("you".into()).await?;
//!
//! // In another process:
//! let client = Client::connect("http://127.0.0.1:30000").await?;
//! let greeting = client.grain::<Hello>("world").hi("you".into()).await?;
//!
//! silo.shutdown(Duration::from_secs(10)).await;
//! # Ok(()) }
//! ```
//!
//! Public modules: [`config`] (settings), [`cli`] (the silo binary's `main`), [`events`] (the event journal
//! and projections), [`filter`] (call filters), [`http`] (the HTTP/JSON API and dashboard), [`tls`] (TLS on the
//! port), [`gateway`] (the client gateway), [`cluster`] (membership, ring, directory), [`sim`] (the seam a
//! deterministic simulator drives), [`wire`] (the envelope protocol). The activation table, mailboxes, idle
//! collector and connections are internal.
//!
//! Features: `postgres` (default) — the Postgres providers and sqlx; `otlp` — OpenTelemetry export.

mod activation;
mod activation_table;
mod admission;
mod builder;
pub mod cli;
mod client;
pub mod cluster;
pub mod config;
mod connection;
pub mod events;
mod fencing;
pub mod filter;
pub mod gateway;
pub mod http;
mod metrics;
#[cfg(feature = "otlp")]
mod otlp;
mod peer_auth;
mod reminders;
mod routing;
mod serve;
mod silo;
pub mod sim;
mod stats;
mod timers;
pub mod tls;
pub mod wire;

pub use builder::{SiloBuilder, SiloError};
pub use cli::CliError;
pub use client::{Client, ClientConfig, ConnectError};
pub use cluster::ClusterView;
pub use config::{ClusterTimings, FailureDetection, GrainTypeConfig, MembershipKind, SiloConfig, StorageKind};
pub use events::{EventStorage, Projection, ProjectionError, ReadModel};
pub use filter::{BearerToken, CallInfo, CallerIdentity, ClientIdentity};
pub use metrics::MetricsSnapshot;
pub use peer_auth::{ClusterCredentials, ClusterSecret, PROOF_WINDOW};
pub use reminders::ReminderStats;
pub use silo::Silo;
pub use tls::PemSource;

/// Exports this process's spans (turns, client calls, HTTP calls) to an OpenTelemetry collector over OTLP/HTTP
/// (`http://host:4318`), unless it already does (a silo with `otlp_endpoint` installs the exporter itself; a
/// process that only runs a [`Client`] calls this). Must run inside a tokio runtime.
#[cfg(feature = "otlp")]
pub fn export_traces(endpoint: &str, service_name: &str) -> Result<(), String> {
    otlp::install(endpoint, service_name)
}
