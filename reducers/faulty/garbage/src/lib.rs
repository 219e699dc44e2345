//! FAULTY ON PURPOSE, for host tests: speaks the raw WIT and returns nonsense that the
//! canonical ABI accepts but the contract forbids: a batch with the diff `"lie"` claims
//! more diffs applied than were passed, other batches of several diffs refuse an index past
//! the end (single diffs pass), snapshots are not JSON, heap-bytes is absurd, and merge
//! "composes" into bytes that are no diff.

use statefold_guest::__private::exports::statefold::reducer::reducer::{
    ApplyResult, Composed, Diff, Guest, GuestModel, Info, Model,
};
use statefold_guest::__private::statefold::reducer::types::{Capabilities, Refusal};

pub struct Garbage;

impl Guest for Garbage {
    type Model = Garbage;

    fn describe() -> Info {
        Info {
            name: "faulty-garbage".into(),
            version: "0.0.0".into(),
            diff_format: "json".into(),
            state_format: "json".into(),
            capabilities: Capabilities::MERGE | Capabilities::DELTA,
        }
    }

    fn merge(_diffs: Vec<Vec<u8>>) -> Result<Composed, String> {
        Ok(Composed::Diff(vec![0xff, 0xfe, 0x00]))
    }

    fn delta(_from: Vec<u8>, _to: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(vec![0xde, 0xad])
    }

    fn heap_bytes() -> u64 {
        u64::MAX
    }
}

impl GuestModel for Garbage {
    fn new(_id: String) -> Self {
        Garbage
    }

    fn restore(_id: String, _snapshot: Vec<u8>) -> Result<Model, String> {
        Ok(Model::new(Garbage))
    }

    fn apply(&self, diffs: Vec<Diff>) -> ApplyResult {
        let n = diffs.len() as u32;
        if diffs.iter().any(|d| d.payload == br#""lie""#) {
            // Claims more diffs than it was given.
            ApplyResult { applied: n + 7, refusal: None }
        } else if n > 1 {
            // Refuses a diff past the end of the batch.
            ApplyResult { applied: 0, refusal: Some(Refusal { index: n + 3, reason: "garbage".into() }) }
        } else {
            ApplyResult { applied: n, refusal: None }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        vec![0x00, 0x9f, 0x92, 0x96]
    }
}

#[cfg(target_family = "wasm")]
statefold_guest::__private::__export_reducer!(Garbage with_types_in statefold_guest::__private);
