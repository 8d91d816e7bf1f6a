use grains::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct Count(u64);

#[derive(Serialize, Deserialize)]
pub struct Added;

impl EventSourced for Count {
    type Event = Added;
    fn apply(&mut self, _: &Added) {
        self.0 += 1;
    }
}

#[grain]
pub struct Counter {
    #[journal(snapshot_every = 10)]
    state: PersistentState<Count>,
    #[state(name = "events")]
    events: Journaled<Count>,
}

fn main() {}
