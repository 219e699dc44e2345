//! A small fold loop over the real runtime, for tests: applies diffs to models of one
//! reducer, keeps each model's hash and next offset, and records applied diffs as the
//! store will (in `MemoryCheckpoints`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use statefold::chain::Hash;
use statefold::model::DiffRecord;
use statefold::reducer::{MemoryCheckpoints, Models, Outcome, Reducer, ReducerLimits, Runtime};

pub fn runtime(limits: ReducerLimits) -> Runtime {
    Runtime::new(limits, None).expect("runtime")
}

pub fn load(runtime: &Runtime, name: &str) -> Arc<Reducer> {
    runtime.load_file(&statefold_tests::wasm(name)).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

pub struct Fold {
    pub kind: String,
    pub models: Models,
    pub checkpoints: MemoryCheckpoints,
    heads: HashMap<String, (Hash, u64)>,
}

impl Fold {
    pub fn new(runtime: &Runtime, name: &str) -> Fold {
        Fold {
            kind: name.to_owned(),
            models: load(runtime, name).models(),
            checkpoints: MemoryCheckpoints::default(),
            heads: HashMap::new(),
        }
    }

    pub fn hash(&self, model: &str) -> Hash {
        self.heads.get(model).map(|(h, _)| *h).unwrap_or_else(|| Hash::genesis(&self.kind, model))
    }

    /// Applies JSON diffs (as text) in order; offsets count up per model.
    pub fn apply(&mut self, model: &str, diffs: &[&str]) -> Vec<Outcome> {
        let (hash, mut offset) = self.heads.get(model).copied().unwrap_or((Hash::genesis(&self.kind, model), 0));
        let records: Vec<DiffRecord> = diffs
            .iter()
            .map(|d| {
                offset += 1;
                DiffRecord::new(offset, d.as_bytes())
            })
            .collect();
        let outcomes = self.models.apply(model, hash, &records, &mut self.checkpoints).expect("apply");
        assert_eq!(outcomes.len(), records.len());
        self.checkpoints.record(model, hash, &records, &outcomes);
        let head = outcomes
            .iter()
            .rev()
            .find_map(|o| match o {
                Outcome::Applied(h, _) => Some(*h),
                _ => None,
            })
            .unwrap_or(hash);
        self.heads.insert(model.to_owned(), (head, offset));
        outcomes
    }

    /// Applies diffs and returns the payloads that applied, in order.
    pub fn apply_keep(&mut self, model: &str, diffs: &[String]) -> Vec<String> {
        let refs: Vec<&str> = diffs.iter().map(String::as_str).collect();
        let outcomes = self.apply(model, &refs);
        diffs.iter().zip(&outcomes).filter(|(_, o)| matches!(o, Outcome::Applied(..))).map(|(d, _)| d.clone()).collect()
    }

    pub fn snapshot(&mut self, model: &str) -> Vec<u8> {
        self.models.snapshot(model, &mut self.checkpoints).expect("snapshot")
    }

    pub fn state(&mut self, model: &str) -> Value {
        let bytes = self.snapshot(model);
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("snapshot is not JSON ({e}): {bytes:?}"))
    }
}

pub fn applied(outcomes: &[Outcome]) -> Vec<bool> {
    outcomes.iter().map(|o| matches!(o, Outcome::Applied(..))).collect()
}

/// The hash chain over `diffs`, computed independently of the runtime.
pub fn chain(kind: &str, model: &str, diffs: &[&str]) -> Hash {
    diffs.iter().fold(Hash::genesis(kind, model), |h, d| h.next(d.as_bytes()))
}
