use grains::prelude::*;

#[grain]
pub struct Counter<T> {
    value: T,
}

fn main() {}
