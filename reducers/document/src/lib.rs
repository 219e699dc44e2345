//! `document`: a JSON document edited with RFC 7396 JSON Merge Patch diffs.
//!
//! State: a JSON value, `{}` for a new model. Diffs: merge patches. Every patch applies
//! (a non-object patch replaces the whole document, as the RFC says), so this reducer
//! refuses only malformed JSON.
//!
//! Merge patches are not closed under composition (see
//! [`statefold_guest::merge_patch`]): runs are composed where the result is exact and
//! reported as not composable where it is not. `delta` is always exact for documents
//! built by patches, so catch-up never needs more than one diff.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use statefold_guest::{Compose, Context, Reducer, Refusal, merge_patch};

pub struct Document;

/// The document. A new model holds the empty object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Doc(pub Value);

impl Default for Doc {
    fn default() -> Self {
        Doc(Value::Object(Map::new()))
    }
}

impl Reducer for Document {
    const NAME: &'static str = "document";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const MERGE: bool = true;
    const DELTA: bool = true;

    type State = Doc;
    type Diff = Value;

    fn apply(state: &mut Doc, patch: Value, _ctx: &Context) -> Result<(), Refusal> {
        merge_patch::apply(&mut state.0, &patch);
        Ok(())
    }

    fn merge(patches: Vec<Value>) -> Compose<Value> {
        let mut patches = patches.into_iter();
        let Some(mut composed) = patches.next() else {
            return Compose::Composed(Value::Object(Map::new()));
        };
        for (i, next) in patches.enumerate() {
            match merge_patch::compose(&composed, &next) {
                Ok(c) => composed = c,
                Err(reason) => return Compose::NotComposable(format!("patch {}: {reason}", i + 1)),
            }
        }
        Compose::Composed(composed)
    }

    fn delta(from: &Doc, to: &Doc) -> Result<Value, String> {
        merge_patch::delta(&from.0, &to.0)
    }
}

statefold_guest::export!(Document);
