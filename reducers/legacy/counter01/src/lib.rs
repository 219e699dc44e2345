//! A counter built against the frozen `statefold:reducer@0.1.0` (`wit/0.1.0/`), with
//! wit-bindgen alone: what a reducer shipped before 0.2.0 looks like to the host. State: an
//! integer (JSON); a diff: an integer added to it (JSON); a diff taking it below zero is
//! refused. The host's tests load it beside 0.2.0 reducers.

#[cfg(target_family = "wasm")]
mod guest {
    use std::cell::Cell;

    wit_bindgen::generate!({ world: "guest", path: "../../../wit/0.1.0" });

    use exports::statefold::reducer::reducer::{ApplyResult, Composed, Diff, Guest, GuestModel, Info, Model};
    use statefold::reducer::types::{Capabilities, Refusal};

    struct Counter;

    struct Total(Cell<i64>);

    fn number(bytes: &[u8]) -> Result<i64, String> {
        std::str::from_utf8(bytes).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| "not an integer".to_owned())
    }

    impl Guest for Counter {
        type Model = Total;

        fn describe() -> Info {
            Info {
                name: "counter01".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                diff_format: "json".into(),
                state_format: "json".into(),
                capabilities: Capabilities::MERGE,
            }
        }

        fn merge(diffs: Vec<Vec<u8>>) -> Result<Composed, String> {
            let sum: i64 = diffs.iter().map(|d| number(d)).sum::<Result<_, _>>()?;
            Ok(Composed::Diff(sum.to_string().into_bytes()))
        }

        fn delta(_from: Vec<u8>, _to: Vec<u8>) -> Result<Vec<u8>, String> {
            Err("counter01 does not compute deltas".into())
        }

        fn heap_bytes() -> u64 {
            0
        }
    }

    impl GuestModel for Total {
        fn new(_id: String) -> Self {
            Total(Cell::new(0))
        }

        fn restore(_id: String, snapshot: Vec<u8>) -> Result<Model, String> {
            Ok(Model::new(Total(Cell::new(number(&snapshot)?))))
        }

        fn apply(&self, diffs: Vec<Diff>) -> ApplyResult {
            for (index, diff) in diffs.iter().enumerate() {
                statefold::reducer::meter::start_diff();
                let next = number(&diff.payload).map(|n| self.0.get().checked_add(n));
                match next {
                    Ok(Some(next)) if next >= 0 => self.0.set(next),
                    _ => {
                        let reason = "not an integer, or the total would go below zero".to_owned();
                        return ApplyResult {
                            applied: index as u32,
                            refusal: Some(Refusal { index: index as u32, reason }),
                        };
                    }
                }
            }
            ApplyResult { applied: diffs.len() as u32, refusal: None }
        }

        fn snapshot(&self) -> Vec<u8> {
            self.0.get().to_string().into_bytes()
        }
    }

    export!(Counter);
}
