use grains::prelude::*;

#[grain]
pub struct Cart;

#[grain]
impl Cart {
    pub async fn add(&mut self, item: &str, qty: u32) -> u32 {
        qty + item.len() as u32
    }
}

fn main() {}
