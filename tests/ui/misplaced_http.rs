use grains::prelude::*;

#[grain]
pub struct Cart;

#[grain(http, reentrant)]
impl Cart {
    #[http]
    pub fn make() -> u32 {
        1
    }

    #[http(always)]
    pub async fn count(&self) -> u32 {
        1
    }
}

fn main() {}
