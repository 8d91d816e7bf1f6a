//! An event-sourced shopping cart, and a projection of every cart into a "popular items" table.
//!
//! The cart records what happened — an item added, an item removed, the cart checked out — instead of its
//! current contents; its contents are the fold of those events. Every event is also tagged `shop`, and the
//! [`PopularItems`] projection turns the events of all carts into one read model: per item, how many sit in
//! carts now and how many were bought. With Postgres that read model is a table, written in the same
//! transaction as the projection's offset:
//!
//! ```sql
//! SELECT item, purchased, in_carts FROM popular_items ORDER BY purchased DESC, item LIMIT 10;
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use grains::prelude::*;
use grains_silo::{Projection, ProjectionError, ReadModel};
use grains_storage::postgres::PgPool;
use grains_storage::{EventSelector, StoredEvent};

use crate::cart::Catalog;

/// What a shopping cart holds: the fold of its events.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartContents {
    /// Item → quantity.
    pub items: BTreeMap<String, u32>,
    /// Whether the cart was checked out (it takes no more changes).
    pub checked_out: bool,
}

/// What happens to a shopping cart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CartEvent {
    /// `qty` of `item` went into the cart.
    ItemAdded {
        /// The item.
        item: String,
        /// How many.
        qty: u32,
    },
    /// `qty` of `item` came out of the cart.
    ItemRemoved {
        /// The item.
        item: String,
        /// How many.
        qty: u32,
    },
    /// The cart was bought with these contents.
    CheckedOut {
        /// Item → quantity bought.
        items: BTreeMap<String, u32>,
    },
}

impl EventSourced for CartContents {
    type Event = CartEvent;

    fn apply(&mut self, event: &CartEvent) {
        match event {
            CartEvent::ItemAdded { item, qty } => *self.items.entry(item.clone()).or_default() += qty,
            CartEvent::ItemRemoved { item, qty } => {
                if let Some(n) = self.items.get_mut(item) {
                    *n = n.saturating_sub(*qty);
                    if *n == 0 {
                        self.items.remove(item);
                    }
                }
            }
            CartEvent::CheckedOut { .. } => self.checked_out = true,
        }
    }

    fn tags(_: &CartEvent) -> Vec<String> {
        vec![SHOP_TAG.to_owned()]
    }
}

/// The tag every cart event carries.
pub const SHOP_TAG: &str = "shop";

/// What can go wrong with a shopping-cart operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ShoppingError {
    /// Adding or removing nothing is refused.
    #[error("quantity must be at least 1")]
    ZeroQuantity,
    /// The item is not in the catalog.
    #[error("no such item: {0}")]
    UnknownItem(String),
    /// Fewer of the item are in the cart than asked to remove.
    #[error("the cart holds only {held} of {item}")]
    NotInCart {
        /// The item.
        item: String,
        /// How many the cart holds.
        held: u32,
    },
    /// The cart is empty: nothing to check out.
    #[error("the cart is empty")]
    Empty,
    /// The cart was checked out and takes no more changes.
    #[error("the cart was checked out")]
    CheckedOut,
    /// The catalog grain could not be reached.
    #[error("catalog unavailable: {0}")]
    Catalog(String),
    /// The journal refused or failed the append; nothing changed.
    #[error("storage: {0}")]
    Storage(String),
}

impl From<StorageError> for ShoppingError {
    fn from(e: StorageError) -> Self {
        ShoppingError::Storage(e.to_string())
    }
}

/// An event-sourced shopping cart, one per customer, snapshotted every 50 events.
#[grain(idle_timeout = "10m")]
pub struct ShoppingCart {
    #[journal(name = "cart", snapshot_every = 50)]
    cart: Journaled<CartContents>,
    ctx: GrainContext,
}

#[grain]
impl ShoppingCart {
    /// Adds `qty` of `item` (a catalog item); returns the quantity now in the cart.
    pub async fn add(&mut self, item: String, qty: u32) -> Result<u32, ShoppingError> {
        self.check_open(qty)?;
        let catalog = self.ctx.grain::<Catalog>("default");
        if catalog.price(item.clone()).await.map_err(|e| ShoppingError::Catalog(e.to_string()))?.is_none() {
            return Err(ShoppingError::UnknownItem(item));
        }
        self.cart.persist(CartEvent::ItemAdded { item: item.clone(), qty }).await?;
        Ok(self.cart.items[&item])
    }

    /// Removes `qty` of `item`; returns the quantity left in the cart.
    pub async fn remove(&mut self, item: String, qty: u32) -> Result<u32, ShoppingError> {
        self.check_open(qty)?;
        let held = self.cart.items.get(&item).copied().unwrap_or(0);
        if held < qty {
            return Err(ShoppingError::NotInCart { item, held });
        }
        self.cart.persist(CartEvent::ItemRemoved { item: item.clone(), qty }).await?;
        Ok(self.cart.items.get(&item).copied().unwrap_or(0))
    }

    /// Buys what is in the cart; returns what was bought. The cart takes no more changes.
    pub async fn checkout(&mut self) -> Result<BTreeMap<String, u32>, ShoppingError> {
        self.check_open(1)?;
        if self.cart.items.is_empty() {
            return Err(ShoppingError::Empty);
        }
        let items = self.cart.items.clone();
        self.cart.persist(CartEvent::CheckedOut { items: items.clone() }).await?;
        Ok(items)
    }

    /// The cart's contents.
    pub async fn contents(&self) -> CartContents {
        self.cart.state().clone()
    }

    /// The cart's events, oldest first, with their sequence numbers.
    pub async fn history(&self) -> Result<Vec<(u64, CartEvent)>, ShoppingError> {
        Ok(self.cart.events(0, usize::MAX).await?)
    }

    fn check_open(&self, qty: u32) -> Result<(), ShoppingError> {
        if self.cart.checked_out {
            return Err(ShoppingError::CheckedOut);
        }
        if qty == 0 {
            return Err(ShoppingError::ZeroQuantity);
        }
        Ok(())
    }
}

/// One row of the popular-items read model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Popularity {
    /// How many sit in carts not yet checked out.
    pub in_carts: i64,
    /// How many were bought.
    pub purchased: i64,
}

/// Projects every cart event (tag `shop`) into a "popular items" read model: per item, how many are in carts
/// and how many were bought.
///
/// With Postgres storage the read model is the table `popular_items (item, in_carts, purchased)`, created on
/// first use and written in the projection's transaction; with in-memory storage it is a map in this value
/// (clones share it), read with [`top`](Self::top).
#[derive(Debug, Clone, Default)]
pub struct PopularItems {
    memory: Arc<Mutex<BTreeMap<String, Popularity>>>,
}

impl PopularItems {
    /// The projection's name (its offset row and claim).
    pub const NAME: &'static str = "popular-items";

    /// A projection with an empty in-memory read model.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `n` most bought items of the in-memory read model (most first, then by name).
    pub fn top(&self, n: usize) -> Vec<(String, Popularity)> {
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        rank(memory.iter().map(|(item, p)| (item.clone(), *p)).collect(), n)
    }

    /// The `n` most bought items of the Postgres read model.
    pub async fn top_in_postgres(pool: &PgPool, n: usize) -> Result<Vec<(String, Popularity)>, sqlx::Error> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT item, in_carts, purchased FROM popular_items ORDER BY purchased DESC, item LIMIT $1",
        )
        .bind(n as i64)
        .fetch_all(pool)
        .await?;
        Ok(rows.into_iter().map(|(item, in_carts, purchased)| (item, Popularity { in_carts, purchased })).collect())
    }

    /// The changes `event` makes: (item, in carts, purchased).
    fn changes(event: &CartEvent) -> Vec<(&str, i64, i64)> {
        match event {
            CartEvent::ItemAdded { item, qty } => vec![(item, i64::from(*qty), 0)],
            CartEvent::ItemRemoved { item, qty } => vec![(item, -i64::from(*qty), 0)],
            CartEvent::CheckedOut { items } => {
                items.iter().map(|(item, qty)| (item.as_str(), -i64::from(*qty), i64::from(*qty))).collect()
            }
        }
    }
}

fn rank(mut items: Vec<(String, Popularity)>, n: usize) -> Vec<(String, Popularity)> {
    items.sort_by(|a, b| b.1.purchased.cmp(&a.1.purchased).then_with(|| a.0.cmp(&b.0)));
    items.truncate(n);
    items
}

#[async_trait::async_trait]
impl Projection for PopularItems {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn selector(&self) -> EventSelector {
        EventSelector::Tag(SHOP_TAG.to_owned())
    }

    async fn apply(&self, read_model: ReadModel<'_>, event: &StoredEvent) -> Result<(), ProjectionError> {
        let event: CartEvent = serde_json::from_value(event.payload.clone()).map_err(ProjectionError::read_model)?;
        match read_model {
            ReadModel::Postgres(conn) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS popular_items (
                         item TEXT PRIMARY KEY, in_carts BIGINT NOT NULL, purchased BIGINT NOT NULL)",
                )
                .execute(&mut *conn)
                .await
                .map_err(ProjectionError::read_model)?;
                for (item, in_carts, purchased) in Self::changes(&event) {
                    sqlx::query(
                        "INSERT INTO popular_items (item, in_carts, purchased) VALUES ($1, $2, $3)
                         ON CONFLICT (item) DO UPDATE SET in_carts = popular_items.in_carts + excluded.in_carts,
                                                          purchased = popular_items.purchased + excluded.purchased",
                    )
                    .bind(item)
                    .bind(in_carts)
                    .bind(purchased)
                    .execute(&mut *conn)
                    .await
                    .map_err(ProjectionError::read_model)?;
                }
            }
            ReadModel::Memory => {
                let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
                for (item, in_carts, purchased) in Self::changes(&event) {
                    let row = memory.entry(item.to_owned()).or_default();
                    row.in_carts += in_carts;
                    row.purchased += purchased;
                }
            }
            other => return Err(ProjectionError::unsupported(&other)),
        }
        Ok(())
    }
}
