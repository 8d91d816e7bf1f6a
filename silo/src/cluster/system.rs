//! System calls between silos (and from clients): probes, directory operations, gateway lists.
//!
//! They travel as ordinary request envelopes addressed to the reserved grain type [`SYSTEM_TYPE`], with a
//! MessagePack-encoded [`SystemRequest`] as payload, so they share the peer connections, correlation and
//! deadlines of grain calls.

use std::time::Duration;

use bytes::Bytes;
use grains::{CallError, GrainId, Placement};
use grains_storage::SiloAddress;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::connection::Connection;
use crate::wire::{Envelope, SYSTEM_TYPE, WireGrainId};

/// A directory registration: which silo holds (or is to hold) a grain's activation, under which id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Registration {
    /// The silo.
    pub silo: SiloAddress,
    /// Unique per registration, so a stale unregister cannot remove a newer entry.
    pub id: u64,
}

/// A request to a silo's system target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SystemRequest {
    /// A membership probe ("are you alive?").
    Ping,
    /// The gateway addresses of the active silos.
    Gateways,
    /// Tier two of placement, at the grain's directory owner: where is `grain`? If nowhere, place it.
    LookupOrPlace { grain: GrainId, caller: SiloAddress, placement: Placement },
    /// Registers activations (first writer wins); answers the winning registration of each.
    Register { entries: Vec<(GrainId, Registration)> },
    /// Removes `grain`'s entry if it is still `registration`.
    Unregister { grain: GrainId, registration: Registration },
    /// The membership table changed: re-read it now.
    MembershipChanged,
    /// The grain ids active on the silo (diagnostics and tests).
    Activations,
    /// An operation on the membership table a seed silo holds (development clustering).
    Table(super::seed::TableOp),
}

/// The answer of a system target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SystemResponse {
    /// Answer to `Ping`: the responder's address and activation count.
    Pong { silo: SiloAddress, activations: u64 },
    /// Answer to `Gateways`.
    Gateways(Vec<String>),
    /// Answer to `LookupOrPlace`.
    Placed(Registration),
    /// Answer to `Register`: the winner for each entry, in order.
    Registered(Vec<Registration>),
    /// Answer to `Activations`.
    Activations(Vec<GrainId>),
    /// Answer to `Table`.
    Table(super::seed::TableAnswer),
    /// Done.
    Done,
}

/// Sends a system request on `conn` and decodes the answer.
pub(crate) async fn call(
    conn: &Connection,
    request: &SystemRequest,
    deadline: Instant,
) -> Result<SystemResponse, CallError> {
    let payload = grains::codec::encode_named(request)?;
    let envelope = Envelope {
        target: Some(WireGrainId::from(&GrainId::new(SYSTEM_TYPE, "system"))),
        method: "system".to_owned(),
        payload: Bytes::from(payload),
        ..Default::default()
    };
    let bytes = conn.call(envelope, deadline).await?;
    Ok(grains::codec::decode_named(&bytes)?)
}

/// A deadline `timeout` from now.
pub(crate) fn deadline_in(timeout: Duration) -> Instant {
    Instant::now() + timeout
}
