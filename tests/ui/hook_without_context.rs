use grains::prelude::*;

#[grain]
pub struct Cart;

#[grain]
impl Cart {
    async fn on_activate(&mut self) -> Result<(), GrainError> {
        Ok(())
    }

    pub async fn get(&self) -> u32 {
        0
    }
}

fn main() {}
