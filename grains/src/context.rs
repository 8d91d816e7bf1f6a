//! What a grain knows about its own activation.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use grains_storage::{EventJournal, GrainStateStore};

use crate::error::MissingService;
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
    /// The application's services (see [`GrainContext::service`]).
    pub app: Services,
}

/// Application services by type: what a silo's builder was given to hand its grains (see
/// [`GrainContext::service`]). Cheap to clone.
#[derive(Clone, Default)]
pub struct Services {
    by_type: Arc<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Services {
    /// Adds `value` as the service of type `T`, replacing an earlier one of that type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        Arc::make_mut(&mut self.by_type).insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The service of type `T`.
    pub fn get<T: Send + Sync + 'static>(&self) -> Result<Arc<T>, MissingService> {
        self.by_type
            .get(&TypeId::of::<T>())
            .and_then(|service| service.clone().downcast::<T>().ok())
            .ok_or(MissingService { type_name: std::any::type_name::<T>() })
    }

    /// How many services there are.
    pub fn len(&self) -> usize {
        self.by_type.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("len", &self.len()).finish()
    }
}

impl std::fmt::Debug for ActivationServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationServices")
            .field("timers", &self.timers.is_some())
            .field("reminders", &self.reminders.is_some())
            .field("app", &self.app)
            .finish()
    }
}

impl std::fmt::Debug for GrainContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrainContext").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

impl GrainContext {
    #[doc(hidden)]
    /// A context for the activation of `id`. Called by the runtime.
    pub fn new(id: GrainId, runtime: Arc<dyn GrainRuntime>, store: Arc<dyn GrainStateStore>) -> Self {
        Self::with_services(id, runtime, store, ActivationServices::default())
    }

    #[doc(hidden)]
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

    #[doc(hidden)]
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

    /// The application service of type `T` that the silo was given (`SiloBuilder::service`): a database
    /// pool, an HTTP client, settings — whatever grains share and the silo's `main` builds. After Orleans'
    /// dependency injection, looked up by type.
    ///
    /// A missing service is an error naming the type, which `?` turns into a [`GrainError`](crate::GrainError)
    /// in a lifecycle hook:
    ///
    /// ```
    /// use grains::prelude::*;
    ///
    /// /// Shared by every grain of the silo.
    /// pub struct Prices { pub vat_percent: u32 }
    ///
    /// #[grain]
    /// pub struct Till { ctx: GrainContext }
    ///
    /// #[grain]
    /// impl Till {
    ///     pub async fn gross(&self, net_cents: u64) -> Result<u64, String> {
    ///         let prices = self.ctx.service::<Prices>().map_err(|e| e.to_string())?;
    ///         Ok(net_cents * (100 + u64::from(prices.vat_percent)) / 100)
    ///     }
    /// }
    /// ```
    pub fn service<T: Send + Sync + 'static>(&self) -> Result<Arc<T>, MissingService> {
        self.inner.services.app.get::<T>()
    }

    #[doc(hidden)]
    /// The runtime this grain runs on.
    pub fn runtime(&self) -> &Arc<dyn GrainRuntime> {
        &self.inner.runtime
    }

    #[doc(hidden)]
    /// The storage provider for this grain's persistent state.
    pub fn state_store(&self) -> &Arc<dyn GrainStateStore> {
        &self.inner.store
    }

    #[doc(hidden)]
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

    #[doc(hidden)]
    /// Whether [`deactivate_on_idle`](Self::deactivate_on_idle) was called. Read by the runtime.
    pub fn deactivation_requested(&self) -> bool {
        self.inner.deactivate_requested.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_found_by_exact_type() {
        let mut services = Services::default();
        services.insert(Arc::new(7_u32));
        services.insert("settings");
        assert_eq!(services.get::<Arc<u32>>().map(|s| **s), Ok(7));
        assert_eq!(services.get::<&str>().map(|s| *s), Ok("settings"));
        assert_eq!(services.get::<u32>().err().map(|e| e.type_name), Some("u32"), "an Arc<u32> is not a u32");
    }

    #[test]
    fn a_later_service_of_a_type_replaces_the_earlier() {
        let mut services = Services::default();
        services.insert(1_u8);
        let snapshot = services.clone();
        services.insert(2_u8);
        assert_eq!(services.get::<u8>().map(|s| *s), Ok(2));
        assert_eq!(snapshot.get::<u8>().map(|s| *s), Ok(1), "a clone taken earlier keeps what it had");
        assert_eq!(services.len(), 1);
    }
}
