//! Application services: values given to the silo's builder that its grains read by type.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use grains::prelude::*;
use grains_silo::Silo;
use grains_tests::test_config;

/// A service: shared by every activation, so what one grain does through it another sees.
#[derive(Default)]
struct VisitCounter {
    visits: AtomicU64,
}

/// A service no silo in this file registers.
struct NeverRegistered;

/// Reads the services of its silo.
#[grain]
pub struct Visitor {
    ctx: GrainContext,
}

#[grain]
impl Visitor {
    /// Counts a visit on the shared service; returns the total so far.
    pub async fn visit(&self) -> Result<u64, String> {
        let counter = self.ctx.service::<VisitCounter>().map_err(|e| e.to_string())?;
        Ok(counter.visits.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Asks for a service that is not there.
    pub async fn ask_for_the_missing_one(&self) -> Result<(), String> {
        self.ctx.service::<NeverRegistered>().map(|_| ()).map_err(|e| e.to_string())
    }
}

/// A grain that cannot activate without its service.
#[grain]
pub struct NeedsService;

#[grain]
impl NeedsService {
    async fn on_activate(&mut self, ctx: &GrainContext) -> Result<(), GrainError> {
        ctx.service::<NeverRegistered>()?;
        Ok(())
    }

    /// Never reached.
    pub async fn ping(&self) -> bool {
        true
    }
}

async fn start_with_counter() -> Silo {
    match Silo::builder().config(test_config()).service(VisitCounter::default()).start().await {
        Ok(silo) => silo,
        Err(e) => panic!("silo failed to start: {e}"),
    }
}

#[tokio::test]
async fn grains_share_the_service_registered_on_the_builder() {
    let silo = start_with_counter().await;
    assert_eq!(silo.grain::<Visitor>("a").visit().await.flatten_call(), Ok(1));
    assert_eq!(silo.grain::<Visitor>("b").visit().await.flatten_call(), Ok(2), "one instance for every grain");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_missing_service_is_an_error_naming_its_type() {
    let silo = start_with_counter().await;
    let error = match silo.grain::<Visitor>("a").ask_for_the_missing_one().await.flatten_call() {
        Err(GrainCallError::Grain(message)) => message,
        other => panic!("expected the grain's error, got {other:?}"),
    };
    assert!(error.contains("services::NeverRegistered"), "{error}");
    assert!(error.contains("SiloBuilder::service"), "says how to register it: {error}");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_grain_whose_service_is_missing_does_not_activate() {
    let silo = start_with_counter().await;
    match silo.grain::<NeedsService>("x").ping().await {
        Err(CallError::ActivationFailed { reason, .. }) => assert!(reason.contains("NeverRegistered"), "{reason}"),
        other => panic!("expected ActivationFailed, got {other:?}"),
    }
    silo.shutdown(Duration::from_secs(5)).await;
}
