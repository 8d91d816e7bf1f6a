use grains::prelude::*;

pub struct Opaque(u32);

#[grain]
pub struct Cart;

#[grain]
impl Cart {
    pub async fn peek(&self) -> Opaque {
        Opaque(1)
    }
}

fn main() {}
