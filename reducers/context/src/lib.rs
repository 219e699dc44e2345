//! A reducer that keeps what it is fed: each diff (any JSON value) is appended to the
//! state with its context (offset, timestamp, headers, the model's hash before it). The
//! host's tests use it to show that a reducer is fed the same context on every replica and
//! every path (live fold, rebuild after eviction, deploy, replay, `verify`'s refold).
//!
//! Reactions, for the relay's tests: a diff `{"emit": TOPIC, ...}` emits to TOPIC, keyed by
//! the model, `{"n": N, "diff": DIFF}` (N: the diffs the model holds with this one). A diff
//! with `"refuse": true` is refused, after emitting (what a refused diff emitted is dropped).

use serde::{Deserialize, Serialize};
use statefold_guest::{Context, Reducer, Refusal};

pub struct Contexts;

/// One applied diff as the reducer saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    pub offset: u64,
    pub timestamp_ms: Option<i64>,
    /// (name, value as lowercase hex), in log order.
    pub headers: Vec<(String, String)>,
    /// The model's hash before the diff, lowercase hex.
    pub prev: String,
    pub diff: serde_json::Value,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Reducer for Contexts {
    const NAME: &'static str = "context";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = Vec<Seen>;
    type Diff = serde_json::Value;

    fn apply(state: &mut Vec<Seen>, diff: serde_json::Value, ctx: &Context) -> Result<(), Refusal> {
        if let Some(topic) = diff.get("emit").and_then(|t| t.as_str()) {
            ctx.emit(topic, ctx.model, &serde_json::json!({ "n": state.len() + 1, "diff": diff }));
        }
        if diff.get("refuse") == Some(&serde_json::Value::Bool(true)) {
            return Err(Refusal::new("asked to refuse"));
        }
        state.push(Seen {
            offset: ctx.offset,
            timestamp_ms: ctx.timestamp_ms,
            headers: ctx.headers.iter().map(|(name, value)| (name.clone(), hex(value))).collect(),
            prev: hex(ctx.prev_hash),
            diff,
        });
        Ok(())
    }
}

statefold_guest::export!(Contexts);
