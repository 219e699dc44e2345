//! FAULTY ON PURPOSE, for host tests. Allocates without bound on the diff `"bomb"`: only the host's memory cap stops it.
//! Otherwise a counter: `"inc"` adds one; anything else is refused.

use statefold_guest::{Context, Reducer, Refusal};

pub struct Faulty;

impl Reducer for Faulty {
    const NAME: &'static str = "faulty-bomb";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = i64;
    type Diff = String;

    fn apply(state: &mut i64, diff: String, _ctx: &Context) -> Result<(), Refusal> {
        match diff.as_str() {
            "inc" => {
                *state += 1;
                Ok(())
            }
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Reserve without touching: memory grows, fuel is barely spent.
                    let mut block = Vec::<u8>::with_capacity(1 << 20);
                    block.push(1);
                    hoard.push(std::hint::black_box(block));
                }
            }
            other => Err(Refusal::new(format!("unknown diff {other:?}"))),
        }
    }
}

statefold_guest::export!(Faulty);
