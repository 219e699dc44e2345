//! FAULTY ON PURPOSE, for host tests. A counter (same diffs as `counter`) that panics (a
//! wasm trap) restoring any saved state: new models work, existing ones cannot move to it.

use serde::{Deserialize, Deserializer, Serialize};
use statefold_guest::{Context, Reducer, Refusal};

pub struct Faulty;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Diff {
    Add(i64),
    Sub(i64),
}

#[derive(Debug, Default, Serialize)]
pub struct State(i64);

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<State, D::Error> {
        panic!("faulty reducer: trapping on purpose in restore")
    }
}

impl Reducer for Faulty {
    const NAME: &'static str = "faulty-restore";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = State;
    type Diff = Diff;

    fn apply(state: &mut State, diff: Diff, _ctx: &Context) -> Result<(), Refusal> {
        state.0 = match diff {
            Diff::Add(n) => state.0.checked_add(n),
            Diff::Sub(n) => state.0.checked_sub(n),
        }
        .ok_or_else(|| Refusal::new("overflow"))?;
        Ok(())
    }
}

statefold_guest::export!(Faulty);
