//! A counter whose merge breaks its law: it composes a run into its first diff only, so a
//! client caught up by the merge would hold another state than the one folded diff by
//! diff. For `statefold test --laws`, which must catch it.

use serde::{Deserialize, Serialize};
use statefold_guest::{Compose, Context, Reducer, Refusal};

pub struct BadMerge;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Diff {
    Add(i64),
}

impl Reducer for BadMerge {
    const NAME: &'static str = "badmerge";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const MERGE: bool = true;

    type State = i64;
    type Diff = Diff;

    fn apply(state: &mut i64, diff: Diff, _ctx: &Context) -> Result<(), Refusal> {
        let Diff::Add(n) = diff;
        *state = state.checked_add(n).ok_or_else(|| Refusal::new("would overflow"))?;
        Ok(())
    }

    fn merge(diffs: Vec<Diff>) -> Compose<Diff> {
        // Wrong on purpose: the rest of the run is dropped.
        Compose::Composed(diffs[0])
    }
}

statefold_guest::export!(BadMerge);
