use grains::prelude::*;

#[grain]
pub struct Counter;

#[grain]
impl Counter {
    pub async fn consume(self) -> u64 {
        0
    }
}

fn main() {}
