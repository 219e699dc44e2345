//! `totals`: totals by key, e.g. items in a basket.
//!
//! State: `{"apples": 5, "pears": 1}` (a key whose total comes back to 0 is dropped).
//! Diff: `{"add": {"apples": 2, "pears": -1}}`. A diff that would overflow a total is
//! refused, and changes nothing. Diffs compose (`merge`: the sums per key) and the diff
//! between two states is computed (`delta`), so clients catch up in one step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use statefold_guest::{Compose, Context, Reducer, Refusal};

pub struct Totals;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Diff {
    pub add: BTreeMap<String, i64>,
}

impl Reducer for Totals {
    const NAME: &'static str = "totals";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const MERGE: bool = true;
    const DELTA: bool = true;

    type State = BTreeMap<String, i64>;
    type Diff = Diff;

    fn apply(state: &mut Self::State, diff: Diff, _ctx: &Context) -> Result<(), Refusal> {
        // Every new total first: a refused diff must leave the state as it was.
        let mut totals = Vec::with_capacity(diff.add.len());
        for (key, n) in diff.add {
            let before = state.get(&key).copied().unwrap_or(0);
            let total = before.checked_add(n).ok_or_else(|| Refusal::new(format!("{key} would overflow")))?;
            totals.push((key, total));
        }
        for (key, total) in totals {
            if total == 0 {
                state.remove(&key);
            } else {
                state.insert(key, total);
            }
        }
        Ok(())
    }

    fn merge(diffs: Vec<Diff>) -> Compose<Diff> {
        let mut add: BTreeMap<String, i64> = BTreeMap::new();
        for diff in diffs {
            for (key, n) in diff.add {
                let sum = add.get(&key).copied().unwrap_or(0).checked_add(n);
                match sum {
                    Some(sum) => add.insert(key, sum),
                    None => return Compose::NotComposable(format!("the changes to {key} do not fit in one diff")),
                };
            }
        }
        Compose::Composed(Diff { add })
    }

    fn delta(from: &Self::State, to: &Self::State) -> Result<Diff, String> {
        let mut add = BTreeMap::new();
        for key in from.keys().chain(to.keys()) {
            let (a, b) = (from.get(key).copied().unwrap_or(0), to.get(key).copied().unwrap_or(0));
            let change = b.checked_sub(a).ok_or_else(|| format!("the change to {key} does not fit in one diff"))?;
            if change != 0 {
                add.insert(key.clone(), change);
            }
        }
        Ok(Diff { add })
    }
}

statefold_guest::export!(Totals);

#[cfg(test)]
mod tests {
    use statefold_guest::native::Model;

    use super::Totals;

    #[test]
    fn diffs_add_up_and_an_overflow_is_refused() {
        let mut model = Model::<Totals>::new("basket");
        model.apply(br#"{"add": {"apples": 3}}"#, 0, &[]).unwrap();
        model.apply(br#"{"add": {"apples": -3, "pears": 1}}"#, 1, &[]).unwrap();
        assert_eq!(model.snapshot(), br#"{"pears":1}"#);
        let refused = model.apply(br#"{"add": {"pears": 9223372036854775807}}"#, 2, &[]);
        assert!(refused.unwrap_err().contains("overflow"));
        assert_eq!(model.snapshot(), br#"{"pears":1}"#);
    }
}
