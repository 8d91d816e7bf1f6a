use grains::prelude::*;

#[grain(placement = "closest")]
pub struct Cart;

fn main() {}
