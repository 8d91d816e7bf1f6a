//! A shopping cart: the grain from the Grains README.
//!
//! Shows typed grain errors beside call errors, persistent state with etags (write-through on every change),
//! a lifecycle hook, and a grain-to-grain call: the cart asks a `Catalog` grain for prices at checkout.

use std::collections::BTreeMap;

use grains::prelude::*;

/// What a cart remembers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CartState {
    /// Item name → quantity.
    pub items: BTreeMap<String, u32>,
}

/// What can go wrong with a cart operation (returned inside `Ok` of a call: the call itself worked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CartError {
    /// Adding nothing is refused.
    #[error("quantity must be at least 1")]
    ZeroQuantity,
    /// The item is not in the catalog.
    #[error("no such item: {0}")]
    UnknownItem(String),
    /// The cart state could not be stored; the change was not applied.
    #[error("storage: {0}")]
    Storage(String),
    /// The catalog grain could not be reached.
    #[error("catalog unavailable: {0}")]
    Catalog(String),
}

impl From<StorageError> for CartError {
    fn from(e: StorageError) -> Self {
        CartError::Storage(e.to_string())
    }
}

/// A shopping cart, one per customer.
#[grain(idle_timeout = "10m")]
pub struct Cart {
    state: PersistentState<CartState>,
    ctx: GrainContext,
}

#[grain(http)]
impl Cart {
    /// Adds `qty` of `item`; returns the new quantity of that item. The change is stored before the reply.
    pub async fn add(&mut self, item: String, qty: u32) -> Result<u32, CartError> {
        if qty == 0 {
            return Err(CartError::ZeroQuantity);
        }
        let catalog = self.ctx.grain::<Catalog>("default");
        if catalog.price(item.clone()).await.map_err(|e| CartError::Catalog(e.to_string()))?.is_none() {
            return Err(CartError::UnknownItem(item));
        }
        let n = {
            let n = self.state.items.entry(item).or_default();
            *n += qty;
            *n
        };
        if let Err(e) = self.state.write().await {
            // Keep memory equal to what is stored: reload on failure.
            let _ = self.state.read().await;
            return Err(e.into());
        }
        Ok(n)
    }

    /// The cart's items and quantities.
    pub async fn items(&self) -> Vec<(String, u32)> {
        self.state.items.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The total price in cents, priced by the catalog grain.
    pub async fn total(&self) -> Result<u64, CartError> {
        let catalog = self.ctx.grain::<Catalog>("default");
        let mut total = 0;
        for (item, qty) in self.state.items.iter() {
            let price = catalog.price(item.clone()).await.map_err(|e| CartError::Catalog(e.to_string()))?;
            total += price.ok_or_else(|| CartError::UnknownItem(item.clone()))? * u64::from(*qty);
        }
        Ok(total)
    }

    /// Empties the cart (removes its stored state). Not served over HTTP.
    #[http(skip)]
    pub async fn clear(&mut self) -> Result<(), CartError> {
        self.state.clear().await?;
        Ok(())
    }

    /// On activation, drops lines a previous version may have stored with quantity zero.
    async fn on_activate(&mut self, _ctx: &GrainContext) -> Result<(), GrainError> {
        self.state.items.retain(|_, qty| *qty > 0);
        Ok(())
    }
}

/// A fixed price list (cents), called by carts.
#[grain]
pub struct Catalog;

#[grain]
impl Catalog {
    /// The price of `item` in cents, if the catalog sells it.
    #[http]
    pub async fn price(&self, item: String) -> Option<u64> {
        match item.as_str() {
            "apple" => Some(50),
            "bread" => Some(250),
            "cheese" => Some(700),
            "milk" => Some(120),
            _ => None,
        }
    }
}
