//! A reducer's logic compiled into the host instead of run as WebAssembly.
//!
//! This exists to measure what the sandbox costs in the real pipeline: the benchmark suite
//! folds the same log through the same engine, store and hash chain with the reducer's
//! crate linked natively, beside its `.wasm`. A native reducer stands in for one module
//! (by its blake3) that the runtime still compiles and describes, so versions, deploys
//! and checkpoints are unchanged; only the calls differ. It has no fuel, no memory cap and
//! no trap isolation (a panic is the host's): never a way to run untrusted code.

use super::Composed;
use crate::model::Reaction;

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
