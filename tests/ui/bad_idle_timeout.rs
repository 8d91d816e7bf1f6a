use grains::prelude::*;

#[grain(idle_timeout = "10 minutes")]
pub struct Cart;

#[grain]
impl Cart {
    pub async fn get(&self) -> u32 {
        0
    }
}

fn main() {}
