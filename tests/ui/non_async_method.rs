use grains::prelude::*;

#[grain]
pub struct Counter;

#[grain]
impl Counter {
    pub fn get(&self) -> u64 {
        0
    }
}

fn main() {}
