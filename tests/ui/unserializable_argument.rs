use grains::prelude::*;

pub struct Opaque(u32);

#[grain]
pub struct Cart;

#[grain]
impl Cart {
    pub async fn add(&mut self, item: Opaque) -> u32 {
        item.0
    }
}

fn main() {}
