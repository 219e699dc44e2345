//! FAULTY ON PURPOSE, for host tests: a counter whose `describe` names no reducer (an
//! empty name), which the host refuses to load (`describe_failed`).

use statefold_guest::{Context, Reducer, Refusal};

pub struct Nameless;

impl Reducer for Nameless {
    const NAME: &'static str = "";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = i64;
    type Diff = i64;

    fn apply(state: &mut i64, diff: i64, _ctx: &Context) -> Result<(), Refusal> {
        *state = state.checked_add(diff).ok_or_else(|| Refusal::new("would overflow"))?;
        Ok(())
    }
}

statefold_guest::export!(Nameless);
