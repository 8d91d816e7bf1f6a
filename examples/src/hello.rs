//! Hello, grains: a greeter that counts how often it has been greeted.
//!
//! Shows the basics: `#[grain]` on a struct and on its impl, a `PersistentState` field loaded on activation
//! and written on demand, a `GrainContext` field (the grain's own id), and `&self` vs `&mut self` methods.

use grains::prelude::*;

/// The greeter's durable state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HelloState {
    /// How many times this greeter has greeted.
    pub greetings: u64,
}

/// A greeter, one per name.
#[grain(idle_timeout = "5m")]
pub struct Hello {
    state: PersistentState<HelloState>,
    ctx: GrainContext,
}

#[grain(http)]
impl Hello {
    /// Greets `from`, counts the greeting durably, and says how many there have been.
    pub async fn greet(&mut self, from: String) -> Result<String, String> {
        self.state.greetings += 1;
        self.state.write().await.map_err(|e| e.to_string())?;
        Ok(format!("hello {from}, this is {}: greeting number {}", self.ctx.id().key(), self.state.greetings))
    }

    /// How many greetings so far.
    pub async fn count(&self) -> u64 {
        self.state.greetings
    }
}
