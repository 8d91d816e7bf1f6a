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
//! port), [`gateway`] (the client gateway), [`cluster`] (the membership view), [`sim`] (the seam a
//! deterministic simulator drives), [`wire`] (the envelope protocol). The activation table, mailboxes, idle
//! collector and connections are internal.
//!
//! Features:
//! - `silo` (default): the runtime — everything that hosts grains. Without it the crate is the [`Client`]
//!   alone, for a process that only calls grains (a web application, a CLI): no activations, cluster,
//!   storage providers, configuration files or sqlx.
//! - `postgres` (default; implies `silo`): the Postgres providers and sqlx;
//! - `otlp` (implies `silo`): OpenTelemetry export.
//!
//! ```toml
//! # a web application that only calls grains:
//! grains-silo = { version = "0.1", default-features = false }
//! ```

// Without the runtime, the modules the client shares with it (connections, TLS, peer authentication, the
// simulation seam) carry server-side items nothing calls.
#![cfg_attr(not(feature = "silo"), allow(dead_code, unreachable_pub))]

// The client side: what a process that only calls grains compiles (`default-features = false`).
mod client;
mod connection;
pub mod filter;
mod framed;
mod maps;
mod peer_auth;
pub mod sim;
pub mod tls;
pub mod wire;

pub use client::{Client, ClientConfig, ConnectError, Transport};
pub use filter::{BearerToken, CallInfo, CallerIdentity, ClientIdentity};
pub use peer_auth::{ClusterCredentials, ClusterSecret, PROOF_WINDOW};
pub use tls::PemSource;

// The silo runtime (feature `silo`, on by default).
#[cfg(feature = "silo")]
mod activation;
#[cfg(feature = "silo")]
mod activation_table;
#[cfg(feature = "silo")]
mod admission;
#[cfg(feature = "silo")]
mod builder;
#[cfg(feature = "silo")]
pub mod cli;
#[cfg(feature = "silo")]
pub mod cluster;
/// Without the runtime, a client still speaks the system protocol (gateway lists, probes).
#[cfg(not(feature = "silo"))]
mod cluster {
    pub(crate) mod system;
}
#[cfg(feature = "silo")]
pub mod config;
#[cfg(feature = "silo")]
pub mod events;
#[cfg(feature = "silo")]
mod fencing;
#[cfg(feature = "silo")]
pub mod gateway;
#[cfg(feature = "silo")]
pub mod http;
#[cfg(feature = "silo")]
mod metrics;
#[cfg(feature = "otlp")]
mod otlp;
#[cfg(feature = "silo")]
mod reminders;
#[cfg(feature = "silo")]
mod routing;
#[cfg(feature = "silo")]
mod serve;
#[cfg(feature = "silo")]
mod silo;
#[cfg(feature = "silo")]
mod stats;
#[cfg(feature = "silo")]
mod timers;

#[cfg(feature = "silo")]
pub use builder::{SiloBuilder, SiloError};
#[cfg(feature = "silo")]
pub use cli::CliError;
#[cfg(feature = "silo")]
pub use cluster::ClusterView;
#[cfg(feature = "silo")]
pub use config::{ClusterTimings, FailureDetection, GrainTypeConfig, MembershipKind, SiloConfig, StorageKind};
#[cfg(feature = "silo")]
pub use events::{EventStorage, Projection, ProjectionError, ReadModel};
#[cfg(feature = "silo")]
pub use metrics::MetricsSnapshot;
#[cfg(feature = "silo")]
pub use reminders::ReminderStats;
#[cfg(feature = "silo")]
pub use silo::Silo;

/// Internals this workspace's own tests and simulator reach into; not part of the API, may change at any time.
#[cfg(feature = "silo")]
#[doc(hidden)]
pub mod __private {
    pub use crate::cluster::ring::{HashRing, VIRTUAL_NODES, grain_hash};
    pub use crate::framed::FrameReader;
}

/// Exports this process's spans (turns, client calls, HTTP calls) to an OpenTelemetry collector over OTLP/HTTP
/// (`http://host:4318`), unless it already does (a silo with `otlp_endpoint` installs the exporter itself; a
/// process that only runs a [`Client`] calls this). Must run inside a tokio runtime.
#[cfg(feature = "otlp")]
pub fn export_traces(endpoint: &str, service_name: &str) -> Result<(), String> {
    otlp::install(endpoint, service_name)
}
