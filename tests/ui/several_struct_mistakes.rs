use grains::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct Items(Vec<String>);

// Two mistakes, both reported: an unknown option and an unknown `#[state]` option.
#[grain(idle = "10m")]
pub struct Cart {
    #[state(nom = "items")]
    items: PersistentState<Items>,
}

fn main() {}
