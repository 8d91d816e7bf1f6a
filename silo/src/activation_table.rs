//! The activation table: which grains have an activation in this silo, and the mailbox of each.
//!
//! The table is the one place that knows the silo's activations. Routing puts calls into it ([`send`] for
//! "only if it is here", [`send_or_activate`] for "here, activating it if need be"); activations remove
//! themselves when they end; the directory's recovery reads it and evicts duplicates through
//! [`LocalActivations`]; the idle collector and shutdown signal every entry. It depends on no other part of
//! the silo: an activation is started by a closure the caller passes in.
//!
//! [`send`]: ActivationTable::send
//! [`send_or_activate`]: ActivationTable::send_or_activate

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use grains::GrainId;

use crate::activation::{ActivationHandle, Drain, Drainer, IdleClaim, Invocation, Mail};
use crate::cluster::{LocalActivations, Registration};
use crate::maps::FastHash;

/// Shards of the activation table (a power of two).
const SHARDS: usize = 256;

/// How many times a call is re-aimed at a mailbox that closed under it before routing it afresh.
const MAX_DELIVERY_ATTEMPTS: usize = 16;

/// The activations of one silo, by grain id.
#[derive(Debug)]
pub(crate) struct ActivationTable {
    map: DashMap<GrainId, ActivationHandle, FastHash>,
    next_activation_id: AtomicU64,
}

impl Default for ActivationTable {
    fn default() -> Self {
        // Every call reads this map, taking its shard's lock (an atomic write): many shards keep two cores
        // calling different grains off each other's cache lines.
        let map = DashMap::with_hasher_and_shard_amount(FastHash::default(), SHARDS);
        Self { map, next_activation_id: AtomicU64::new(1) }
    }
}

impl ActivationTable {
    /// A fresh activation id: never one an earlier activation of this silo used.
    pub(crate) fn next_activation_id(&self) -> u64 {
        self.next_activation_id.fetch_add(1, Ordering::Relaxed)
    }

    /// How many activations the table holds (confirmed or not).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The activation of `id` here with its turn lock, if it can run a call on the caller's task right now
    /// (see [`ActivationShared::claim_idle`](crate::activation::ActivationShared::claim_idle)).
    pub(crate) fn claim_idle(&self, id: &GrainId) -> Option<IdleClaim> {
        let guard = self.map.get(id)?.shared.claim_idle()?;
        Some(IdleClaim { guard })
    }

    /// Puts the call in the mailbox of `id`'s activation if it has one here; else hands the call back. A drain
    /// the call starts is run by `drainer` (see [`Drainer`]).
    pub(crate) fn send(
        &self,
        id: &GrainId,
        invocation: Invocation,
        drainer: Drainer,
    ) -> Result<Option<Drain>, Invocation> {
        let mut mail = Mail::Call(invocation);
        for _ in 0..MAX_DELIVERY_ATTEMPTS {
            let Some(handle) = self.map.get(id) else { break };
            match handle.shared.deliver(mail, drainer) {
                Ok(drain) => return Ok(drain),
                Err(back) => {
                    drop(handle);
                    // That activation closed its mailbox (it failed or is leaving); drop its stale entry.
                    self.map.remove_if(id, |_, h| h.shared.mailbox.is_closed());
                    mail = back;
                }
            }
        }
        match mail {
            Mail::Call(invocation) => Err(invocation),
            _ => unreachable!("only calls are delivered"),
        }
    }

    /// Puts the call in the mailbox of `id`'s activation here, first creating one with `activate` if there is
    /// none. The slot is claimed and the activation created in one step, so concurrent first calls all land in
    /// the one mailbox being built. A drain the call starts (always, for a new activation) is run by `drainer`.
    /// Hands the call back if mailboxes keep closing under it.
    pub(crate) fn send_or_activate(
        &self,
        id: &GrainId,
        invocation: Invocation,
        drainer: Drainer,
        mut activate: impl FnMut() -> ActivationHandle,
    ) -> Result<Option<Drain>, Invocation> {
        let mut invocation = invocation;
        for _ in 0..MAX_DELIVERY_ATTEMPTS {
            let mail = Mail::Call(invocation);
            let sent = match self.map.entry(id.clone()) {
                Entry::Occupied(slot) => slot.get().shared.deliver(mail, drainer),
                Entry::Vacant(slot) => {
                    let handle = activate();
                    let sent = handle.shared.deliver(mail, drainer);
                    slot.insert(handle);
                    sent
                }
            };
            match sent {
                Ok(drain) => return Ok(drain),
                Err(Mail::Call(back)) => {
                    self.map.remove_if(id, |_, h| h.shared.mailbox.is_closed());
                    invocation = back;
                }
                Err(_) => unreachable!("only calls are delivered"),
            }
        }
        Err(invocation)
    }

    /// Removes the entry of `id` if it still belongs to activation `activation_id`.
    pub(crate) fn remove(&self, id: &GrainId, activation_id: u64) {
        self.map.remove_if(id, |_, h| h.activation_id == activation_id);
    }

    /// Every entry, for inspection (stats): one shard locked at a time.
    pub(crate) fn iter(&self) -> dashmap::iter::Iter<'_, GrainId, ActivationHandle, FastHash> {
        self.map.iter()
    }

    /// Whether `id` has an activation here that the directory has confirmed.
    pub(crate) fn is_confirmed(&self, id: &GrainId) -> bool {
        self.map.get(id).is_some_and(|h| h.shared.is_confirmed())
    }

    /// The grains with a confirmed activation here.
    pub(crate) fn confirmed(&self) -> Vec<GrainId> {
        self.map.iter().filter(|e| e.shared.is_confirmed()).map(|e| e.key().clone()).collect()
    }

    /// Asks every activation to leave: those idle at `now_ms`, or all of them if `force`.
    pub(crate) fn signal(&self, now_ms: u64, force: bool) {
        for entry in self.map.iter() {
            if force || entry.shared.is_idle(now_ms) {
                let _ = entry.shared.send(Mail::Deactivate { force });
            }
        }
    }

    /// Stops every activation before its next turn, without `on_deactivate`: their grains may live elsewhere
    /// by now (the silo was declared dead).
    pub(crate) fn evict_all(&self) {
        for entry in self.map.iter() {
            entry.shared.evict();
            let _ = entry.shared.send(Mail::Deactivate { force: true });
        }
    }

    /// Stops every activation where it stands and empties the table (a shutdown past its grace period).
    /// Returns how many there were.
    pub(crate) fn abort_all(&self) -> usize {
        let mut aborted = 0;
        self.map.retain(|_, handle| {
            handle.shared.evict();
            handle.shared.abort_drainer();
            aborted += 1;
            false
        });
        aborted
    }
}

impl LocalActivations for ActivationTable {
    fn activations_where(&self, keep: &dyn Fn(&GrainId) -> bool) -> Vec<(GrainId, Registration)> {
        self.map
            .iter()
            .filter(|e| e.shared.is_confirmed() && keep(e.key()))
            .map(|e| (e.key().clone(), e.registration.clone()))
            .collect()
    }

    /// Stops the activation of `grain` registered as `registration` (a duplicate) before its next turn; its
    /// queued calls go to the grain's one activation.
    fn evict(&self, grain: &GrainId, registration: &Registration) {
        if let Some(handle) = self.map.get(grain).filter(|h| &h.registration == registration) {
            handle.shared.evict();
            let _ = handle.shared.send(Mail::Deactivate { force: true });
        }
    }

    fn evict_all(&self) {
        ActivationTable::evict_all(self);
    }
}
