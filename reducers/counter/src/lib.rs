//! `counter`: an integer that diffs add to or subtract from.
//!
//! State: a JSON integer (`0` for a new model). Diffs: `{"add": 5}` or `{"sub": 3}`.
//! A diff that would overflow the 64-bit state is refused. Composable: a run of diffs that
//! all applied is one `add` (or `sub`) of their sum.

use serde::{Deserialize, Serialize};
use statefold_guest::{Compose, Context, Reducer, Refusal};

pub struct Counter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Diff {
    Add(i64),
    Sub(i64),
}

impl Diff {
    fn signed(self) -> i128 {
        match self {
            Diff::Add(n) => i128::from(n),
            Diff::Sub(n) => -i128::from(n),
        }
    }
}

impl Reducer for Counter {
    const NAME: &'static str = "counter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const MERGE: bool = true;

    type State = i64;
    type Diff = Diff;

    fn apply(state: &mut i64, diff: Diff, _ctx: &Context) -> Result<(), Refusal> {
        let next = i64::try_from(i128::from(*state) + diff.signed())
            .map_err(|_| Refusal::new(format!("counter would overflow: {state} {diff:?}")))?;
        *state = next;
        Ok(())
    }

    fn merge(diffs: Vec<Diff>) -> Compose<Diff> {
        // Every state the run passes through fits in i64, so the sum of n diffs fits in
        // i128 and, because the run applied from some state s, s + sum fits in i64 too.
        let total: i128 = diffs.into_iter().map(Diff::signed).sum();
        if let Ok(n) = i64::try_from(total) {
            Compose::Composed(Diff::Add(n))
        } else if let Ok(n) = i64::try_from(-total) {
            Compose::Composed(Diff::Sub(n))
        } else {
            Compose::NotComposable(format!("net change {total} does not fit in one diff"))
        }
    }
}

statefold_guest::export!(Counter);
