//! A reducer's logic compiled into the host instead of run as WebAssembly.
//!
//! This exists to measure what the sandbox costs in the real pipeline: the benchmark suite
//! folds the same log through the same engine, store and hash chain with the reducer's
//! crate linked natively, beside its `.wasm`. A native reducer stands in for one module
//! (by its blake3) that the runtime still compiles and describes, so versions, deploys
//! and checkpoints are unchanged; only the calls differ. It has no fuel, no memory cap and
//! no trap isolation (a panic is the host's): never a way to run untrusted code.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Applied, Composed, Guest, Handle, Instantiate, ReducerLimits, Trap};
use crate::chain::Hash;
use crate::model::{DiffRecord, Reaction};

/// The stand-in for one reducer module.
pub trait Native: Send + Sync {
    /// A new model, empty (`snapshot` `None`) or restored; `Err` refuses the snapshot.
    fn create(&self, model: &str, snapshot: Option<&[u8]>) -> Result<Box<dyn NativeModel>, String>;
    /// As the export `merge`; `Err` means the input was malformed.
    fn merge(&self, diffs: &[Vec<u8>]) -> Result<Composed, String>;
    /// As the export `delta`.
    fn delta(&self, from: &[u8], to: &[u8]) -> Result<Vec<u8>, String>;
}

/// One model held natively.
pub trait NativeModel: Send {
    /// Applies one diff and returns the reactions it emitted; `Err` is the refusal reason
    /// (the state is unchanged).
    fn apply(&mut self, payload: &[u8], offset: u64, prev_hash: &[u8]) -> Result<Vec<Reaction>, String>;
    fn snapshot(&self) -> Vec<u8>;
}

/// Instances of a [`Native`] stand-in.
pub struct Natively(pub Arc<dyn Native>);

impl Instantiate for Natively {
    fn instantiate(&self, _limits: &ReducerLimits) -> Result<Box<dyn Guest>, Trap> {
        Ok(Box::new(NativeGuest { native: self.0.clone(), models: HashMap::new(), next: 0 }))
    }
}

/// One native "instance": the models it holds by handle.
struct NativeGuest {
    native: Arc<dyn Native>,
    models: HashMap<Handle, Box<dyn NativeModel>>,
    next: Handle,
}

impl NativeGuest {
    fn model(&mut self, handle: Handle) -> Result<&mut Box<dyn NativeModel>, Trap> {
        self.models.get_mut(&handle).ok_or_else(|| Trap(format!("no native model {handle}")))
    }
}

impl Guest for NativeGuest {
    fn create(&mut self, model: &str, snapshot: Option<&[u8]>) -> Result<Result<Handle, String>, Trap> {
        Ok(self.native.create(model, snapshot).map(|created| {
            self.next += 1;
            self.models.insert(self.next, created);
            self.next
        }))
    }

    fn apply(&mut self, handle: Handle, prevs: &[Hash], batch: &[DiffRecord]) -> Result<Applied, Trap> {
        let model = self.model(handle)?;
        let mut emitted = Vec::new();
        for (index, (d, prev)) in batch.iter().zip(prevs).enumerate() {
            match model.apply(&d.payload, d.offset, prev.as_bytes()) {
                Ok(reactions) => emitted.extend(reactions.into_iter().map(|r| (index as u32, r))),
                Err(reason) => {
                    return Ok(Applied { applied: index as u32, refusal: Some((index as u32, reason)), emitted });
                }
            }
        }
        Ok(Applied { applied: batch.len() as u32, refusal: None, emitted })
    }

    fn snapshot(&mut self, handle: Handle) -> Result<Vec<u8>, Trap> {
        Ok(self.model(handle)?.snapshot())
    }

    fn drop_model(&mut self, handle: Handle) -> Result<(), Trap> {
        self.models.remove(&handle);
        Ok(())
    }

    fn merge(&mut self, diffs: &[Vec<u8>]) -> Result<Result<Composed, String>, Trap> {
        Ok(self.native.merge(diffs))
    }

    fn delta(&mut self, from: &[u8], to: &[u8]) -> Result<Result<Vec<u8>, String>, Trap> {
        Ok(self.native.delta(from, to))
    }
}
