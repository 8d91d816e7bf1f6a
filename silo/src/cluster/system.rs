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

/// Which membership view a directory request was decided under: the table version, and an id of the view's
/// ring (two views with the same active silos have the same ring id, whatever their versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ViewStamp {
    pub(crate) version: i64,
    pub(crate) ring_id: u64,
}

/// Why a directory partition did not answer; the caller retries (after catching up, for `StaleView`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum Refusal {
    /// The caller's view is older than the partition's (`version`): it must re-read membership.
    #[error("the caller's membership view is older than version {version}")]
    StaleView { version: i64 },
    /// The partition's view is older than the caller's: it is re-reading membership.
    #[error("the directory partition's membership view is behind the caller's")]
    Behind,
    /// The partition has just taken over the grain's range and is still recovering it.
    #[error("the directory partition is still recovering this range")]
    NotReady,
    /// The grain's registration names a silo declared dead that may still be serving until its lease ends.
    #[error("the grain's silo was declared dead and its lease has not run out yet")]
    Fenced,
}

/// A request to a silo's system target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum SystemRequest {
    /// A membership probe ("are you alive?").
    Ping,
    /// The gateway addresses of the active silos.
    Gateways,
    /// Tier two of placement, at the grain's directory owner: where is `grain`? If nowhere, place it.
    LookupOrPlace { grain: GrainId, caller: SiloAddress, placement: Placement, view: ViewStamp },
    /// Registers activations (first writer wins); answers the winning registration of each.
    Register { entries: Vec<(GrainId, Registration)>, view: ViewStamp },
    /// Removes `grain`'s entry if it is still `registration`.
    Unregister { grain: GrainId, registration: Registration },
    /// From a silo that gained directory ranges in view `view`: hand over your directory entries in its ranges
    /// and report your activations in them.
    Recover { requester: SiloAddress, view: ViewStamp },
    /// The directory found this activation to be a duplicate: it must stop before another turn.
    Evict { grain: GrainId, registration: Registration },
    /// `silo` is stopping: place no new activations on it.
    Draining { silo: SiloAddress },
    /// The membership table changed: re-read it now.
    MembershipChanged,
    /// The grain ids active on the silo (diagnostics and tests).
    Activations,
    /// An operation on the membership table a seed silo holds (development clustering).
    #[cfg(feature = "silo")]
    Table(super::seed::TableOp),
    /// The silo's stats, for the dashboard.
    #[cfg(feature = "silo")]
    Stats,
    /// Reminder `name` of `grain`, in the receiver's ring ranges, was registered or removed: read it again.
    ReminderChanged { grain: GrainId, name: String },
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
    /// Answer to `Register`: the winner for each entry (or why the partition did not decide), in order.
    Registered(Vec<Result<Registration, Refusal>>),
    /// A directory partition did not answer.
    Refused(Refusal),
    /// Answer to `Recover`: the directory entries handed over, and the sender's activations.
    Recovered { entries: Vec<(GrainId, Registration)>, activations: Vec<(GrainId, Registration)> },
    /// Answer to `Activations`.
    Activations(Vec<GrainId>),
    /// Answer to `Table`.
    #[cfg(feature = "silo")]
    Table(super::seed::TableAnswer),
    /// Answer to `Stats`.
    #[cfg(feature = "silo")]
    Stats(Box<crate::stats::SiloStats>),
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
