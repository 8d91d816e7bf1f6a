use grains::prelude::*;

#[grain]
pub struct Cart;

#[grain]
impl Cart {
    pub async fn add(&mut self, qty: u32) -> u32 {
        qty
    }

    pub async fn add(&mut self, item: String) -> u32 {
        item.len() as u32
    }
}

fn main() {}
