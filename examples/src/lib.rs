//! Example grains for Grains, hosted by the `grains-example-silo` binary and called by `grains-demo-client`.
//!
//! - [`hello`]: the smallest useful grain, a greeter with a counter in persistent state.
//! - [`cart`]: a shopping cart with typed errors, persistent state, and a grain-to-grain call.
//! - [`auth`]: a call filter that admits clients by bearer token.

pub mod auth;
pub mod cart;
pub mod hello;

pub use cart::{Cart, CartError, CartRef, Catalog, CatalogRef};
pub use hello::{Hello, HelloRef};

/// Makes sure the linker keeps this crate's grain registrations in a binary that names nothing else from it.
pub fn link() {}
