//! Example grains for Grains, hosted by the `grains-example-silo` binary and called by `grains-demo-client`.
//!
//! - [`hello`]: the smallest useful grain, a greeter with a counter in persistent state.
//! - [`cart`]: a shopping cart with typed errors, persistent state, and a grain-to-grain call.
//! - [`shopping`]: the cart again, event-sourced, with a projection keeping a "popular items" table.
//! - [`bank`]: event-sourced bank accounts, and transfers between them as a saga grain.
//! - [`auth`]: a call filter that admits clients by bearer token.
//! - [`abandoned_cart`]: a cart that empties itself when left alone, with a durable reminder.

pub mod abandoned_cart;
pub mod auth;
pub mod bank;
pub mod cart;
pub mod hello;
pub mod shopping;

pub use abandoned_cart::{AbandonableCart, AbandonableCartRef};
pub use bank::{Account, AccountRef, BankError, Transfer, TransferRef};
pub use cart::{Cart, CartError, CartRef, Catalog, CatalogRef};
pub use hello::{Hello, HelloRef};
pub use shopping::{PopularItems, ShoppingCart, ShoppingCartRef, ShoppingError};

/// What the example silo adds to its builder: the [`PopularItems`] projection.
pub fn silo_setup(builder: grains_silo::SiloBuilder, _: &grains_silo::SiloConfig) -> grains_silo::SiloBuilder {
    builder.projection(PopularItems::new())
}

/// Makes sure the linker keeps this crate's grain registrations in a binary that names nothing else from it.
pub fn link() {}
