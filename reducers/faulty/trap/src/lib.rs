//! FAULTY ON PURPOSE, for host tests. Panics (a wasm trap) on the diff `"trap"`.
//! Otherwise a counter: `"inc"` adds one; anything else is refused.

use statefold_guest::{Context, Reducer, Refusal};

pub struct Faulty;

impl Reducer for Faulty {
    const NAME: &'static str = "faulty-trap";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = i64;
    type Diff = String;

    fn apply(state: &mut i64, diff: String, ctx: &Context) -> Result<(), Refusal> {
        match diff.as_str() {
            "inc" => {
                *state += 1;
                Ok(())
            }
            "trap" => {
                panic!("faulty reducer: trapping on purpose at offset {}", ctx.offset)
            }
            other => Err(Refusal::new(format!("unknown diff {other:?}"))),
        }
    }
}

statefold_guest::export!(Faulty);
