//! `counter` version 2: how a reducer evolves without a restart.
//!
//! Same diffs as `counter` (`{"add": 5}`, `{"sub": 3}`); the state gains the highest value
//! the counter ever reached: `{"value": 2, "max": 5}`. Deployed over version 1, each live
//! model is moved by snapshot/restore: `restore` accepts a version-1 state (a bare integer)
//! and starts `max` at the current value, the best it can know. Replaying the kind's
//! retained diffs with this version computes `max` over the whole history instead.
//!
//! No merge: a run's net sum does not tell its peak, so a client that fell behind gets the
//! missed diffs one by one.

use serde::{Deserialize, Serialize};
use statefold_guest::{Context, Reducer, Refusal};

pub struct Counter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Diff {
    Add(i64),
    Sub(i64),
}

/// The state, written as an object; version 1's bare integer is read too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct State {
    pub value: i64,
    pub max: i64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    V1(i64),
    V2 { value: i64, max: i64 },
}

impl From<Stored> for State {
    fn from(stored: Stored) -> State {
        match stored {
            Stored::V1(value) => State { value, max: value.max(0) },
            Stored::V2 { value, max } => State { value, max },
        }
    }
}

impl Reducer for Counter {
    const NAME: &'static str = "counter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = State;
    type Diff = Diff;

    fn apply(state: &mut State, diff: Diff, _ctx: &Context) -> Result<(), Refusal> {
        let change = match diff {
            Diff::Add(n) => i128::from(n),
            Diff::Sub(n) => -i128::from(n),
        };
        let next = i64::try_from(i128::from(state.value) + change)
            .map_err(|_| Refusal::new(format!("counter would overflow: {} {diff:?}", state.value)))?;
        state.value = next;
        state.max = state.max.max(next);
        Ok(())
    }
}

statefold_guest::export!(Counter);
