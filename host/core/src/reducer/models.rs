//! Models resident in one reducer instance.
//!
//! A model's state lives in the guest between calls (a `model` resource), so applying a
//! diff never ships the state across the boundary. Cold models are snapshotted into the
//! [`Checkpoints`] store and evicted when the instance passes its heap or model budget,
//! and restored on their next use. A trap discards the whole instance: every model it held
//! is rebuilt on its next use from its checkpoint plus the diffs applied after it.

use std::collections::HashMap;
use std::sync::Arc;

use lru::LruCache;

use super::{Applied, Guest, Handle, Reducer, ReducerError, Trap};
use crate::chain::Hash;
use crate::model::Reaction;
use crate::model::{Checkpoint, DiffRecord};

/// What happened to one diff of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the model's hash is now this, and the diff emitted these reactions.
    Applied(Hash, Vec<Reaction>),
    /// The reducer refused it; the state is as before it.
    Refused(String),
    /// The reducer failed on it alone, on a fresh instance (trap, CPU budget, memory cap,
    /// broken contract); the state is as before it.
    Failed(String),
}

/// Where evicted and lost models come back from. The store implements it over RocksDB;
/// [`MemoryCheckpoints`] keeps it in memory.
pub trait Checkpoints {
    /// The model's latest checkpoint and the diffs applied after it; `Checkpoint::default()`
    /// for a model never seen.
    fn load(&mut self, model: &str) -> Result<Checkpoint, Box<dyn std::error::Error + Send + Sync>>;
    /// The model's current state, as it is evicted from the guest.
    fn save(&mut self, model: &str, snapshot: Vec<u8>) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// [`Checkpoints`] in memory: the caller records every applied diff with
/// [`MemoryCheckpoints::record`]; eviction snapshots shorten the tail.
#[derive(Debug, Default)]
pub struct MemoryCheckpoints {
    models: HashMap<String, Checkpoint>,
}

impl MemoryCheckpoints {
    /// Records diffs that were applied to `model` (the outcomes of one `apply`).
    pub fn record(&mut self, model: &str, mut prev: Hash, diffs: &[DiffRecord], outcomes: &[Outcome]) {
        let entry = self.models.entry(model.to_owned()).or_default();
        for (diff, outcome) in diffs.iter().zip(outcomes) {
            if let Outcome::Applied(hash, _) = outcome {
                entry.tail.push((prev, diff.clone()));
                prev = *hash;
            }
        }
    }
}

impl Checkpoints for MemoryCheckpoints {
    fn load(&mut self, model: &str) -> Result<Checkpoint, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.models.get(model).cloned().unwrap_or_default())
    }

    fn save(&mut self, model: &str, snapshot: Vec<u8>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.models.insert(model.to_owned(), Checkpoint { snapshot: Some(snapshot), tail: Vec::new() });
        Ok(())
    }
}

/// Outcome of composing diffs through the reducer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Composed {
    Diff(Vec<u8>),
    NotComposable(String),
}

struct Live {
    instance: Box<dyn Guest>,
    resident: LruCache<String, Handle>,
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub instances: u64,
    pub traps: u64,
    pub evictions: u64,
    pub restores: u64,
}

/// Models resident in one instance of one reducer version. Not shared between threads:
/// the fold engine drives one `Models` per kind.
pub struct Models {
    reducer: Arc<Reducer>,
    live: Option<Live>,
    stats: Stats,
}

/// Where a call failed, before it is turned into a [`ReducerError`].
enum CallError {
    Trap(String),
    Contract(String),
}

impl Models {
    pub(crate) fn new(reducer: Arc<Reducer>) -> Models {
        Models { reducer, live: None, stats: Stats::default() }
    }

    pub fn reducer(&self) -> &Arc<Reducer> {
        &self.reducer
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Number of models resident in the guest now.
    pub fn resident(&self) -> usize {
        self.live.as_ref().map_or(0, |live| live.resident.len())
    }

    /// Applies consecutive diffs to `model`, whose hash is `hash`. Every diff gets an
    /// [`Outcome`]; the hash chain covers the applied ones only. A trap anywhere is
    /// isolated to the one diff that causes it on a fresh instance.
    ///
    /// The caller must persist the applied diffs (so that `checkpoints.load` returns them
    /// from now on) before the next call that may rebuild this model.
    pub fn apply(
        &mut self,
        model: &str,
        hash: Hash,
        diffs: &[DiffRecord],
        checkpoints: &mut dyn Checkpoints,
    ) -> Result<Vec<Outcome>, ReducerError> {
        let mut outcomes = Vec::with_capacity(diffs.len());
        // Diffs applied by this call, for rebuilding the model after a trap.
        let mut applied_here: Vec<(Hash, &DiffRecord)> = Vec::new();
        let mut head = hash;
        let mut isolate = false;
        while outcomes.len() < diffs.len() {
            let start = outcomes.len();
            let end = if isolate { start + 1 } else { diffs.len() };
            let batch = &diffs[start..end];
            let handle = self.resident_handle(model, checkpoints, &applied_here)?;
            match self.call_apply(handle, head, batch) {
                Ok((result, hashes)) => {
                    let mut emitted = result.emitted.into_iter().peekable();
                    for (index, (diff, hash)) in batch.iter().zip(hashes).take(result.applied as usize).enumerate() {
                        applied_here.push((head, diff));
                        head = hash;
                        let mut reactions = Vec::new();
                        while let Some((_, reaction)) = emitted.next_if(|(at, _)| *at as usize == index) {
                            reactions.push(reaction);
                        }
                        outcomes.push(Outcome::Applied(head, reactions));
                    }
                    // What the refused diff emitted before refusing is dropped with it.
                    if let Some((_, reason)) = result.refusal {
                        outcomes.push(Outcome::Refused(reason));
                    }
                }
                Err(error) => {
                    self.discard();
                    if isolate {
                        // One diff, on an instance created for this model alone: the
                        // verdict depends on (state, diff) only, as on every replica.
                        let (CallError::Trap(reason) | CallError::Contract(reason)) = error;
                        tracing::warn!(reducer = %self.reducer.label(), model, offset = batch[0].offset, %reason, "diff failed in isolation");
                        outcomes.push(Outcome::Failed(reason));
                        isolate = false;
                    } else {
                        // Somewhere in the batch, or caused by what else the instance
                        // held; find it one diff at a time on a fresh instance.
                        let (CallError::Trap(reason) | CallError::Contract(reason)) = error;
                        tracing::debug!(reducer = %self.reducer.label(), model, diffs = batch.len(), %reason, "batch failed; isolating");
                        isolate = true;
                    }
                }
            }
        }
        self.enforce_budget(model, checkpoints)?;
        Ok(outcomes)
    }

    /// The model's state, serialized by the reducer.
    pub fn snapshot(&mut self, model: &str, checkpoints: &mut dyn Checkpoints) -> Result<Vec<u8>, ReducerError> {
        let handle = self.resident_handle(model, checkpoints, &[])?;
        let result = self.arm(0)?.instance.snapshot(handle);
        result.map_err(|e| self.trap("snapshot", e))
    }

    /// Ids of the resident models, least recently used first.
    pub fn resident_ids(&self) -> Vec<String> {
        self.live.as_ref().map_or_else(Vec::new, |live| live.resident.iter().rev().map(|(id, _)| id.clone()).collect())
    }

    /// The state of a resident model (`None` if it is not resident).
    pub fn snapshot_resident(&mut self, model: &str) -> Result<Option<Vec<u8>>, ReducerError> {
        let Some(handle) = self.live.as_mut().and_then(|live| live.resident.peek(model).copied()) else {
            return Ok(None);
        };
        let result = self.arm(0)?.instance.snapshot(handle);
        result.map_err(|e| self.trap("snapshot", e)).map(Some)
    }

    /// Makes `model` resident with the state `snapshot` (taken from another version: the
    /// move of a deploy). Its later diffs apply to it here.
    pub fn adopt(&mut self, model: &str, snapshot: &[u8]) -> Result<(), ReducerError> {
        self.restore(model, Some(snapshot), &[]).map(|_| ())
    }

    /// Drops `model` from the guest without saving it (its stored history is the truth).
    pub fn forget(&mut self, model: &str) -> Result<(), ReducerError> {
        let Some(handle) = self.live.as_mut().and_then(|live| live.resident.pop(model)) else { return Ok(()) };
        let dropped = self.arm(0)?.instance.drop_model(handle);
        dropped.map_err(|e| self.trap("model destructor", e))
    }

    /// The state a checkpoint describes (its snapshot plus the diffs after it), computed on
    /// the side: the model is not left resident, so this `Models` can serve any version.
    pub fn materialize(&mut self, model: &str, checkpoint: &Checkpoint) -> Result<Vec<u8>, ReducerError> {
        let replay: Vec<(Hash, &DiffRecord)> = checkpoint.tail.iter().map(|(h, d)| (*h, d)).collect();
        let handle = self.restore(model, checkpoint.snapshot.as_deref(), &replay)?;
        let live = self.arm(0)?;
        live.resident.pop(model);
        let snapshot = live.instance.snapshot(handle);
        let snapshot = snapshot.map_err(|e| self.trap("snapshot", e))?;
        let dropped = self.arm(0)?.instance.drop_model(handle);
        dropped.map_err(|e| self.trap("model destructor", e))?;
        Ok(snapshot)
    }

    /// Snapshots `model` into `checkpoints` and drops it from the guest.
    pub fn evict(&mut self, model: &str, checkpoints: &mut dyn Checkpoints) -> Result<(), ReducerError> {
        let Some(live) = self.live.as_mut() else { return Ok(()) };
        let Some(handle) = live.resident.pop(model) else { return Ok(()) };
        let snapshot = self.arm(0)?.instance.snapshot(handle);
        let snapshot = snapshot.map_err(|e| self.trap("snapshot", e))?;
        checkpoints
            .save(model, snapshot)
            .map_err(|source| ReducerError::Checkpoints { model: model.to_owned(), source })?;
        let dropped = self.arm(0)?.instance.drop_model(handle);
        dropped.map_err(|e| self.trap("model destructor", e))?;
        self.stats.evictions += 1;
        tracing::debug!(reducer = %self.reducer.label(), model, "model evicted");
        Ok(())
    }

    /// Composes consecutive diffs into one, if the reducer can do it exactly.
    pub fn merge(&mut self, diffs: &[Vec<u8>]) -> Result<Composed, ReducerError> {
        self.require(self.reducer.info.merge, "merge")?;
        let result = self.arm(0)?.instance.merge(diffs);
        result.map_err(|e| self.trap("merge", e))?.map_err(|reason| self.refused("merge", reason))
    }

    /// The diff that takes snapshot `from` to snapshot `to`.
    pub fn delta(&mut self, from: &[u8], to: &[u8]) -> Result<Vec<u8>, ReducerError> {
        self.require(self.reducer.info.delta, "delta")?;
        let result = self.arm(0)?.instance.delta(from, to);
        result.map_err(|e| self.trap("delta", e))?.map_err(|reason| self.refused("delta", reason))
    }

    fn require(&self, supported: bool, capability: &'static str) -> Result<(), ReducerError> {
        match supported {
            true => Ok(()),
            false => Err(ReducerError::Unsupported { reducer: self.reducer.label(), capability }),
        }
    }

    fn refused(&self, during: &'static str, reason: String) -> ReducerError {
        ReducerError::Refused { reducer: self.reducer.label(), during, reason }
    }

    /// The live instance, created if needed, with fuel for one call and `starts` diffs.
    fn arm(&mut self, starts: u32) -> Result<&mut Live, ReducerError> {
        if self.live.is_none() {
            let instance = self
                .reducer
                .instantiate()
                .map_err(|Trap(reason)| ReducerError::Instantiate { reducer: self.reducer.label(), reason })?;
            self.stats.instances += 1;
            tracing::debug!(reducer = %self.reducer.label(), instances = self.stats.instances, "instance created");
            self.live = Some(Live { instance, resident: LruCache::unbounded() });
        }
        let fuel = self.reducer.limits.call_fuel_max;
        let (live, reducer) = (self.live.as_mut().expect("created above"), &self.reducer);
        live.instance
            .arm(starts, fuel)
            .map_err(|Trap(reason)| ReducerError::Instantiate { reducer: reducer.label(), reason })?;
        Ok(live)
    }

    /// Discards the instance (after a trap): all its models are rebuilt on next use.
    fn discard(&mut self) {
        if self.live.take().is_some() {
            self.stats.traps += 1;
        }
    }

    /// Turns a trap into a [`ReducerError`], discarding the instance.
    fn trap(&mut self, during: &'static str, Trap(reason): Trap) -> ReducerError {
        self.discard();
        ReducerError::Trap { reducer: self.reducer.label(), during, reason }
    }

    /// The model's resource handle, restoring the model if it is not resident.
    fn resident_handle(
        &mut self,
        model: &str,
        checkpoints: &mut dyn Checkpoints,
        applied_here: &[(Hash, &DiffRecord)],
    ) -> Result<Handle, ReducerError> {
        if let Some(handle) = self.live.as_mut().and_then(|live| live.resident.get(model)) {
            return Ok(*handle);
        }
        let checkpoint =
            checkpoints.load(model).map_err(|source| ReducerError::Checkpoints { model: model.to_owned(), source })?;
        let replay: Vec<(Hash, &DiffRecord)> =
            checkpoint.tail.iter().map(|(h, d)| (*h, d)).chain(applied_here.iter().copied()).collect();
        self.restore(model, checkpoint.snapshot.as_deref(), &replay)
    }

    /// Rebuilds `model` (resident afterwards): the replay in one batch; if that fails,
    /// again one diff per call (the rule by which they applied in the first place) before
    /// calling it a divergence.
    fn restore(
        &mut self,
        model: &str,
        snapshot: Option<&[u8]>,
        replay: &[(Hash, &DiffRecord)],
    ) -> Result<Handle, ReducerError> {
        match self.rebuild(model, snapshot, replay, false) {
            Err(ReducerError::Diverged { .. }) if replay.len() > 1 => self.rebuild(model, snapshot, replay, true),
            other => other,
        }
    }

    /// Restores `model` from `snapshot` (or new), replays `replay`, makes it resident.
    fn rebuild(
        &mut self,
        model: &str,
        snapshot: Option<&[u8]>,
        replay: &[(Hash, &DiffRecord)],
        one_at_a_time: bool,
    ) -> Result<Handle, ReducerError> {
        let created = self.arm(0)?.instance.create(model, snapshot);
        let handle = match created {
            Ok(Ok(handle)) => handle,
            Ok(Err(reason)) => {
                return Err(ReducerError::Restore { reducer: self.reducer.label(), model: model.to_owned(), reason });
            }
            Err(e) => return Err(self.trap("restore", e)),
        };
        self.stats.restores += 1;
        tracing::debug!(reducer = %self.reducer.label(), model, replay = replay.len(), one_at_a_time, "model restored");
        // What applied before must apply again, identically.
        let mut done = 0;
        while done < replay.len() {
            let (prev, _) = replay[done];
            let end = if one_at_a_time { done + 1 } else { replay.len() };
            let batch: Vec<DiffRecord> = replay[done..end].iter().map(|(_, d)| (*d).clone()).collect();
            let offset = batch[0].offset;
            // Diffs applied again emit nothing: their reactions went out when first folded.
            let (result, _) = self.call_apply(handle, prev, &batch).map_err(|e| {
                self.discard();
                let (CallError::Trap(reason) | CallError::Contract(reason)) = e;
                ReducerError::Diverged { model: model.to_owned(), offset, reason }
            })?;
            if let Some((index, reason)) = result.refusal {
                let offset = batch[index as usize].offset;
                self.discard();
                return Err(ReducerError::Diverged {
                    model: model.to_owned(),
                    offset,
                    reason: format!("a diff that applied before is now refused: {reason}"),
                });
            }
            done += result.applied as usize;
        }
        let live = self.live.as_mut().expect("no trap since arm");
        live.resident.put(model.to_owned(), handle);
        Ok(handle)
    }

    /// One `model.apply` call, with the hashes chained from `prev` and the result checked
    /// against the contract. Also returns the hash after each diff of the batch, were it
    /// applied.
    fn call_apply(
        &mut self,
        handle: Handle,
        prev: Hash,
        batch: &[DiffRecord],
    ) -> Result<(Applied, Vec<Hash>), CallError> {
        // prevs[i] is the hash before batch[i]; hashes[i] the one after it.
        let (mut prevs, mut hash) = (Vec::with_capacity(batch.len()), prev);
        let hashes: Vec<Hash> = batch
            .iter()
            .map(|d| {
                prevs.push(hash);
                hash = hash.next(&d.payload);
                hash
            })
            .collect();
        let n = u32::try_from(batch.len()).map_err(|_| CallError::Contract("batch too large".into()))?;
        let live = self.arm(n).map_err(|e| CallError::Trap(e.to_string()))?;
        let started = std::time::Instant::now();
        let result = live.instance.apply(handle, &prevs, batch);
        self.reducer.observe_call(started.elapsed().as_secs_f64());
        let result = result.map_err(|Trap(reason)| CallError::Trap(reason))?;
        let refused_index = result.refusal.as_ref().map(|(index, _)| *index);
        let valid = match refused_index {
            None => result.applied == n,
            Some(index) => index == result.applied && index < n,
        };
        if !valid {
            return Err(CallError::Contract(format!(
                "apply of {n} diffs answered applied={} refusal index={refused_index:?}",
                result.applied
            )));
        }
        Ok((result, hashes))
    }

    /// Evicts least recently used models (never `keep`) while the instance is over its
    /// heap or model budget.
    fn enforce_budget(&mut self, keep: &str, checkpoints: &mut dyn Checkpoints) -> Result<(), ReducerError> {
        let limits = self.reducer.limits.clone();
        loop {
            let Some(live) = self.live.as_mut() else { return Ok(()) };
            let over_count = live.resident.len() > limits.resident_models_max;
            // The heap cannot exceed linear memory: below the budget, no need to ask.
            let memory_bytes = live.instance.memory_bytes() as u64;
            let over_bytes = if over_count || memory_bytes <= limits.resident_bytes_max {
                false
            } else {
                let heap = self.arm(0)?.instance.heap_bytes();
                let heap = heap.map_err(|e| self.trap("heap-bytes", e))?;
                // Clamped: the guest cannot use more heap than its memory holds.
                heap.min(memory_bytes) > limits.resident_bytes_max
            };
            if !over_count && !over_bytes {
                return Ok(());
            }
            let live = self.live.as_mut().expect("checked above");
            let coldest = live.resident.iter().rev().map(|(m, _)| m.clone()).find(|m| m != keep);
            let Some(coldest) = coldest else { return Ok(()) };
            self.evict(&coldest, checkpoints)?;
        }
    }
}
