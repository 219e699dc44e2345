//! What an instance of a reducer answers: the calls of the `statefold:reducer` contract,
//! one model at a time, as the fold engine makes them.

use super::{Composed, ReducerLimits};
use crate::chain::Hash;
use crate::model::{DiffRecord, Reaction};

/// A model held by one instance (the instance's own numbering).
pub type Handle = u64;

/// Why a call trapped (failed in the guest: a trap, its CPU budget, its memory cap),
/// described for people: the instance is discarded after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Trap(pub String);

/// What `model.apply` of a batch answered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// How many diffs, from the first, applied.
    pub applied: u32,
    /// The diff refused (its index, `applied` if the contract is kept) and why.
    pub refusal: Option<(u32, String)>,
    /// The reactions emitted by the applied diffs, each with its diff's index.
    pub emitted: Vec<(u32, Reaction)>,
}

/// Makes instances of one reducer version.
pub trait Instantiate: Send + Sync {
    /// A fresh instance under `limits`.
    fn instantiate(&self, limits: &ReducerLimits) -> Result<Box<dyn Guest>, Trap>;
}

/// One instance of a reducer: it holds models between calls. An `Err(Trap)` from any call
/// means the instance is no longer usable; the engine drops it.
pub trait Guest: Send {
    /// A new model, empty or restored from `snapshot`; the inner `Err` is the reducer's
    /// refusal of the snapshot.
    fn create(&mut self, model: &str, snapshot: Option<&[u8]>) -> Result<Result<Handle, String>, Trap>;
    /// `model.apply` of `batch`; `prevs[i]` is the model's hash before `batch[i]`.
    fn apply(&mut self, model: Handle, prevs: &[Hash], batch: &[DiffRecord]) -> Result<Applied, Trap>;
    /// The model's state, serialized by the reducer.
    fn snapshot(&mut self, model: Handle) -> Result<Vec<u8>, Trap>;
    /// Drops the model.
    fn drop_model(&mut self, model: Handle) -> Result<(), Trap>;
    /// Composes consecutive diffs; the inner `Err` means the input was malformed.
    fn merge(&mut self, diffs: &[Vec<u8>]) -> Result<Result<Composed, String>, Trap>;
    /// The diff from snapshot `from` to snapshot `to`.
    fn delta(&mut self, from: &[u8], to: &[u8]) -> Result<Result<Vec<u8>, String>, Trap>;
    /// Bytes of memory the instance holds now (0: no per-instance budget).
    fn memory_bytes(&self) -> usize {
        0
    }
    /// Bytes of heap the guest's allocator uses (at most `memory_bytes`).
    fn heap_bytes(&mut self) -> Result<u64, Trap> {
        Ok(0)
    }
    /// Sets the budget of the next call: `fuel`, and `starts` diffs (nothing where calls
    /// are not metered).
    fn arm(&mut self, _starts: u32, _fuel: u64) -> Result<(), Trap> {
        Ok(())
    }
}
