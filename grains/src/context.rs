//! What a grain knows about its own activation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use grains_storage::{EventJournal, GrainStateStore};

use crate::grain::Grain;
use crate::id::{GrainId, GrainKey};
use crate::reference::{GrainRef, RefCore};
use crate::reminder::ReminderRegistry;
use crate::runtime::{GrainRuntime, RequestMetadata};
use crate::timer::TimerHost;

/// The activation's view of itself and the cluster: its id, a way to call other grains, and lifecycle requests.
///
/// Put a `GrainContext` field in a `#[grain]` struct to keep it; lifecycle hooks also receive it.
#[derive(Clone)]
pub struct GrainContext {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    id: GrainId,
    runtime: Arc<dyn GrainRuntime>,
    store: Arc<dyn GrainStateStore>,
    journal: Option<Arc<dyn EventJournal>>,
    deactivate_requested: AtomicBool,
    services: ActivationServices,
}

/// What a runtime offers an activation beyond calls and state: its timers and the reminder service.
#[derive(Clone, Default)]
pub struct ActivationServices {
    /// Runs the activation's timers as its turns (see [`GrainContext::register_timer`]).
    pub timers: Option<Arc<dyn TimerHost>>,
    /// The reminder service (see [`GrainContext::register_reminder`]).
    pub reminders: Option<Arc<dyn ReminderRegistry>>,
}

impl std::fmt::Debug for ActivationServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationServices")
            .field("timers", &self.timers.is_some())
            .field("reminders", &self.reminders.is_some())
            .finish()
    }
}

impl std::fmt::Debug for GrainContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrainContext").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

impl GrainContext {
    /// A context for the activation of `id`. Called by the runtime.
    pub fn new(id: GrainId, runtime: Arc<dyn GrainRuntime>, store: Arc<dyn GrainStateStore>) -> Self {
        Self::with_services(id, runtime, store, ActivationServices::default())
    }

    /// A context for the activation of `id` with timers and reminders. Called by the runtime.
    pub fn with_services(
        id: GrainId,
        runtime: Arc<dyn GrainRuntime>,
        store: Arc<dyn GrainStateStore>,
        services: ActivationServices,
    ) -> Self {
        let deactivate_requested = AtomicBool::new(false);
        Self { inner: Arc::new(ContextInner { id, runtime, store, journal: None, deactivate_requested, services }) }
    }

    /// This context with `journal` as the event journal of its `Journaled` fields. Called by the runtime.
    pub fn with_journal(self, journal: Arc<dyn EventJournal>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(ContextInner {
                id: inner.id.clone(),
                runtime: inner.runtime.clone(),
                store: inner.store.clone(),
                journal: Some(journal),
                deactivate_requested: AtomicBool::new(inner.deactivate_requested.load(Ordering::Relaxed)),
                services: inner.services.clone(),
            }),
        }
    }

    /// The activation's timer host, if it runs timers.
    pub(crate) fn timer_host(&self) -> Option<&Arc<dyn TimerHost>> {
        self.inner.services.timers.as_ref()
    }

    /// The reminder service, if the runtime has one.
    pub(crate) fn reminder_service(&self) -> Option<&Arc<dyn ReminderRegistry>> {
        self.inner.services.reminders.as_ref()
    }

    /// This grain's id.
    pub fn id(&self) -> &GrainId {
        &self.inner.id
    }

    /// A reference to another grain (or this one), for grain-to-grain calls.
    pub fn grain<G: Grain>(&self, key: impl Into<GrainKey>) -> G::Ref {
        G::Ref::from_core(RefCore::new(GrainId::new(G::TYPE_NAME, key), self.inner.runtime.clone()))
    }

    /// The runtime this grain runs on.
    pub fn runtime(&self) -> &Arc<dyn GrainRuntime> {
        &self.inner.runtime
    }

    /// The storage provider for this grain's persistent state.
    pub fn state_store(&self) -> &Arc<dyn GrainStateStore> {
        &self.inner.store
    }

    /// The event journal of this grain's `Journaled` fields (`None` outside a runtime that provides one).
    pub fn journal(&self) -> Option<&Arc<dyn EventJournal>> {
        self.inner.journal.as_ref()
    }

    /// The request metadata of the call this grain is serving now (see [`RequestMetadata`]); every call the
    /// grain makes while serving it carries the same.
    pub fn request_metadata(&self) -> RequestMetadata {
        RequestMetadata::current()
    }

    /// Asks the runtime to deactivate this grain as soon as the current turn ends.
    pub fn deactivate_on_idle(&self) {
        self.inner.deactivate_requested.store(true, Ordering::Relaxed);
    }

    /// Whether [`deactivate_on_idle`](Self::deactivate_on_idle) was called. Read by the runtime.
    pub fn deactivation_requested(&self) -> bool {
        self.inner.deactivate_requested.load(Ordering::Relaxed)
    }
}
