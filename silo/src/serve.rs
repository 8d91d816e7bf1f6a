//! Serving the silo's endpoint: requests from clients and peers, and the server side of system calls.
//!
//! A grain call arriving on a connection is checked (type, method, arguments decoded, deadline capped),
//! filtered where it enters the cluster, and handed to routing in the mode its sender chose: routed afresh,
//! to a cached location, or to a placement the directory just made. A system call (directory, membership,
//! recovery) is answered here; the gateway serves system calls only to authenticated peers.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use grains::__private::runtime::{Call, Payload, RequestMetadata};
use grains::{CallError, GrainId};
use grains_storage::SiloStatus;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::activation::{Drainer, Invocation};
use crate::cluster::LocalActivations;
use crate::cluster::system::{Refusal, SystemRequest, SystemResponse};
use crate::filter::{CallInfo, CallerIdentity};
use crate::routing::{Beside, wait_reply};
use crate::silo::SiloInner;
use crate::wire::{Envelope, Mode};

/// A served request's reply payload, and for a client's call that went on to another silo, that silo's gateway
/// (see `Envelope::location`).
#[derive(Debug)]
pub(crate) struct Served {
    pub(crate) payload: Bytes,
    pub(crate) location: Option<String>,
}

impl Served {
    /// A reply from this silo.
    fn here(payload: Bytes) -> Self {
        Self { payload, location: None }
    }
}

impl SiloInner {
    /// Runs the call filters on a call entering the silo from `caller`.
    pub(crate) fn filter(&self, caller: &CallerIdentity, call: &Call) -> Result<(), CallError> {
        self.filters.check(&CallInfo { caller, grain: &call.target, method: &call.method, metadata: &call.metadata })
    }

    /// Serves a request that arrived on the silo's endpoint from `caller` (a client, or a peer).
    pub(crate) async fn serve_request(
        self: Arc<Self>,
        envelope: Envelope,
        caller: &CallerIdentity,
    ) -> Result<Served, CallError> {
        let target =
            envelope.target.as_ref().ok_or_else(|| CallError::Protocol("request without a target".to_owned()))?;
        if target.grain_type == crate::wire::SYSTEM_TYPE {
            let request: SystemRequest = grains::codec::decode_named(&envelope.payload)?;
            let response = self.serve_system(request).await?;
            return Ok(Served::here(Bytes::from(grains::codec::encode_named(&response)?)));
        }
        if self.is_shutting_down() {
            // Refused before running: the caller may safely send it elsewhere.
            return Err(CallError::ShuttingDown);
        }
        let registration = self.registration_of(&target.grain_type)?;
        let id = target.to_grain_id(Some(registration.type_name))?;
        let chain = envelope
            .call_chain
            .iter()
            .map(|id| id.to_grain_id(self.grain_type(&id.grain_type).map(|r| r.type_name)))
            .collect::<Result<Vec<_>, _>>()?;
        // A client-chosen deadline is capped: a call never holds resources past `max_call_timeout`.
        let issued = Instant::now();
        let deadline = envelope.deadline(self.config.call_timeout)?.min(issued + self.config.max_call_timeout);
        let mut call = Call {
            target: id,
            method: envelope.method.into(),
            payload: Payload::Encoded(envelope.payload),
            deadline,
            issued,
            chain: chain.into(),
            metadata: RequestMetadata::from_map(envelope.metadata),
        };
        if call.method.starts_with('$') && !matches!(caller, CallerIdentity::Member(_)) {
            // Reserved methods (reminder ticks) come from the cluster's silos only.
            return Err(CallError::PermissionDenied(format!(
                "{}.{} is called by the cluster's silos only",
                call.target, call.method
            )));
        }
        self.admit(&call)?;
        crate::silo::decode_arguments(&mut call, registration)?;
        let mode = Mode::try_from(envelope.mode).unwrap_or(Mode::Route);
        // A call enters the cluster routed; one delivered here by a peer was filtered where it entered.
        if mode == Mode::Route && !self.filters.is_empty() {
            self.filter(caller, &call)?;
        }
        if let Some(claim) = self.table.claim_idle(&call.target) {
            // Its activation is here and idle (whatever the mode said): the turn runs on this task.
            return Ok(Served::here(self.run_inline(claim, call, true).await?.into_bytes()?));
        }
        let (reply, waiter) = oneshot::channel();
        let (id, invocation) = Invocation::of(call, reply);
        let deadline = invocation.deadline;
        // This request's task routes the call itself, and runs the drain its delivery starts, while it waits.
        let beside = match mode {
            Mode::Route => match self.try_local(&id, invocation, Drainer::Sender) {
                Ok(drain) => Beside::drain(drain),
                Err(invocation) => Beside::work(self.clone().route(id.clone(), invocation)),
            },
            Mode::Cached => match self.try_local(&id, invocation, Drainer::Sender) {
                Ok(drain) => Beside::drain(drain),
                Err(_) => return Err(CallError::NotHere(format!("{id} is not active on {}", self.me()))),
            },
            Mode::Placed => match self.deliver_here(&id, invocation, Drainer::Sender) {
                Ok(drain) => Beside::drain(drain),
                Err(_) => {
                    return Err(CallError::Unavailable(format!("{id}: activation kept closing under the call")));
                }
            },
        };
        let payload = wait_reply(waiter, deadline, beside).await?.into_bytes()?;
        // A client's call that was not served by an activation here (now confirmed) — routed to another silo,
        // or handed on by an activation here that was leaving — gets a reply naming the grain's silo, so the
        // client's next calls go there.
        let forwarded =
            mode == Mode::Route && matches!(caller, CallerIdentity::Client(_)) && !self.table.is_confirmed(&id);
        let location = if forwarded {
            self.metrics.gateway_forwards.fetch_add(1, Ordering::Relaxed);
            self.activation_gateway(&id)
        } else {
            None
        };
        Ok(Served { payload, location })
    }

    /// The gateway of the silo that holds `id`'s activation as far as this silo knows (its routing cache), when
    /// that is another active silo with a gateway.
    fn activation_gateway(&self, id: &GrainId) -> Option<String> {
        let silo = self.cluster.cache.get(id)?.silo.clone();
        let view = self.cluster.view();
        let row = view.rows().iter().find(|row| row.silo == silo && row.status == SiloStatus::Active)?;
        row.gateway.clone()
    }

    /// Answers a system request.
    async fn serve_system(&self, request: SystemRequest) -> Result<SystemResponse, CallError> {
        Ok(match request {
            SystemRequest::Ping => {
                SystemResponse::Pong { silo: self.me().clone(), activations: self.table.len() as u64 }
            }
            SystemRequest::Gateways => SystemResponse::Gateways(self.cluster.view().gateways()),
            SystemRequest::LookupOrPlace { grain, caller, placement, view } => {
                match self.cluster.local_lookup_or_place(&grain, &caller, placement, Some(&view)) {
                    Ok(registration) => SystemResponse::Placed(registration),
                    Err(refusal) => self.refused(refusal),
                }
            }
            SystemRequest::Register { entries, view } => SystemResponse::Registered(
                entries
                    .into_iter()
                    .map(|(grain, registration)| {
                        let decided = self.cluster.local_register(&grain, registration, Some(&view));
                        if decided == Err(Refusal::Behind) {
                            self.cluster.refresh_now.notify_one();
                        }
                        decided
                    })
                    .collect(),
            ),
            SystemRequest::Unregister { grain, registration } => {
                self.cluster.directory.unregister(&grain, &registration);
                SystemResponse::Done
            }
            SystemRequest::Recover { requester, view } => self.cluster.answer_recover(&requester, &view),
            SystemRequest::Evict { grain, registration } => {
                self.table.evict(&grain, &registration);
                SystemResponse::Done
            }
            SystemRequest::Draining { silo } => {
                self.cluster.mark_draining(silo);
                SystemResponse::Done
            }
            SystemRequest::MembershipChanged => {
                self.cluster.refresh_now.notify_one();
                SystemResponse::Done
            }
            SystemRequest::Activations => SystemResponse::Activations(self.table.confirmed()),
            SystemRequest::ReminderChanged { grain, name } => {
                self.reminders.changed(&grain, &name).await.map_err(|e| CallError::Unavailable(e.to_string()))?;
                SystemResponse::Done
            }
            SystemRequest::Table(op) => {
                let answer = crate::cluster::seed::serve(self.cluster.table.as_ref(), op)
                    .await
                    .map_err(|e| CallError::Unavailable(e.to_string()))?;
                SystemResponse::Table(answer)
            }
            SystemRequest::Stats => SystemResponse::Stats(Box::new(crate::stats::local(self))),
        })
    }

    /// A partition's refusal, as an answer; a partition behind its caller re-reads membership at once.
    fn refused(&self, refusal: Refusal) -> SystemResponse {
        if refusal == Refusal::Behind {
            self.cluster.refresh_now.notify_one();
        }
        SystemResponse::Refused(refusal)
    }
}
