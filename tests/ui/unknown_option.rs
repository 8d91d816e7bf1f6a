use grains::prelude::*;

#[grain(idle = "10m")]
pub struct Cart;

fn main() {}
