//! The fold engine: records in, new versions out. Free of I/O: it reads what it needs
//! through [`View`] and returns every write as data ([`Folded`]) for the store to commit
//! in one batch. It does not know which source fed the records.
//!
//! Per model, records are folded in offset order; the hash chain covers applied diffs only
//! (see [`crate::chain`]). Each model's diffs in a batch go to the reducer in one call.

mod catchup;
mod deploy;
mod instances;
mod overlay;
mod replay;
#[cfg(test)]
mod tests;
mod versions;

use instances::{instance, move_to};
use overlay::{Overlay, Pending};

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use bytes::Bytes;
use lru::LruCache;

use crate::chain::Hash;
use crate::model::{
    Applied, Became, CheckpointWrite, DEPLOY_CHUNK_HEADER, DEPLOY_HEADER, DEPLOY_MODULE_HEADER, DEPLOY_ORIGIN_HEADER,
    DEPLOY_PARTITIONS_HEADER, DeployChunk, DeployFolded, Folded, Head, KindVersions, ModelKey, ModuleHash, Prune,
    REPLAY_HEADER, Record, Rejected, Rejection, SUBJECT_HEADER, partition_of, validate_id,
};
use crate::model::{Checkpoint, DiffRecord, Outgoing, Reaction};
use crate::model::{EXPECTED_HASH_HEADER, IDEMPOTENCY_KEY_HEADER, Keyed};
use crate::reducer::{Checkpoints, Models, Outcome, Reducer, ReducerError};

pub use catchup::{CatchUp, plan_catch_up};
pub use versions::{History, Known, Resolve, Versions};

/// Failure to read what the engine needs from the store.
pub type ViewError = Box<dyn std::error::Error + Send + Sync>;

/// What the engine reads from the store: committed heads and checkpoints.
pub trait View {
    fn head(&self, model: &ModelKey) -> Result<Option<Head>, ViewError>;
    /// The diff applied to `model` under idempotency key `key`, if one was.
    fn keyed(&self, model: &ModelKey, key: &str) -> Result<Option<Keyed>, ViewError>;
    /// The model's latest checkpoint and the diffs after it, with the versions that wrote them.
    fn checkpoint(&self, model: &ModelKey, head: &Head) -> Result<History, ViewError>;
    /// A stored chunk of a module a deploy record carries in parts.
    fn deploy_chunk(&self, module: &ModuleHash, index: u32) -> Result<Option<Bytes>, ViewError>;
    /// A stored module (of a version that was deployed).
    fn module(&self, id: &ModuleHash) -> Result<Option<Bytes>, ViewError>;
}

/// Why a model could not be rebuilt for a replay (it keeps its history).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotReplayed(pub String);

/// What [`Engine::replay_model`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Rebuilt for its partition's latest replay record (into the `Folded` given).
    Rebuilt,
    /// Nothing to do: already rebuilt, no replay record in its partition, or a head stored
    /// before partitions were recorded (rebuilt at its next diff).
    Unchanged,
    /// Not rebuilt: why. It keeps its history and is not tried again for this replay.
    Kept(NotReplayed),
}

/// Why a batch could not be folded. The batch is not committed; the caller stops.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("reading the store: {0}")]
    View(ViewError),
    #[error(transparent)]
    Reducer(#[from] ReducerError),
}

/// Settings of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldLimits {
    /// A checkpoint of a model's state every this many applied diffs...
    pub checkpoint_interval_diffs: u64,
    /// ... once their bytes reach this percent of the latest checkpoint's size.
    pub checkpoint_tail_percent: u64,
    /// Checkpoints kept per model (at least 1); older diffs and checkpoints are pruned.
    pub retain_checkpoints: usize,
    /// Heads kept in memory (per kind).
    pub head_cache_models_max: usize,
    /// Largest diff, in bytes; a larger record is rejected (`too_large`). Every replica
    /// must use the same value to reach the same hashes.
    pub diff_bytes_max: usize,
}

impl Default for FoldLimits {
    fn default() -> Self {
        FoldLimits {
            checkpoint_interval_diffs: 1000,
            checkpoint_tail_percent: 10,
            retain_checkpoints: 2,
            head_cache_models_max: 100_000,
            diff_bytes_max: 1 << 20,
        }
    }
}

/// A kind as the engine folds it.
pub struct KindSpec {
    pub name: Arc<str>,
    pub topic: Arc<str>,
    /// Its versions as stored (or, for a new kind, its first version alone).
    pub versions: KindVersions,
}

impl KindSpec {
    /// A kind that folds every partition with `reducer` until a deploy record says otherwise.
    pub fn new(name: &str, topic: &str, reducer: &Reducer) -> KindSpec {
        KindSpec { name: name.into(), topic: topic.into(), versions: KindVersions::new(reducer.id()) }
    }
}

struct KindState {
    name: Arc<str>,
    versions: KindVersions,
    /// One instance per version in use (created when first needed). A model is resident in
    /// at most one; it moves (snapshot on one version, restore on the other) when its
    /// partition's version is not the one holding it.
    instances: Vec<Models>,
    heads: LruCache<Arc<str>, Head>,
    /// The partitions of the kind's topic, once the source has said: a model's records
    /// belong to [`partition_of`] its key among them.
    partitions: Option<u32>,
}

/// The fold engine: reducer instances per kind, and the heads of recently used models.
pub struct Engine {
    kinds: Vec<KindState>,
    by_topic: HashMap<Arc<str>, usize>,
    limits: FoldLimits,
    /// Past versions, for models whose stored history another version applied; also how
    /// the engine finds the versions it folds with.
    versions: Versions,
    /// The instance replays rebuild models on.
    replayer: Option<Models>,
}

impl Engine {
    /// `versions` finds reducer versions by id (see [`Versions`]); it must know every
    /// version `kinds` name.
    pub fn new(kinds: Vec<KindSpec>, limits: FoldLimits, versions: Versions) -> Engine {
        let cache = NonZeroUsize::new(limits.head_cache_models_max.max(1)).expect("max(1)");
        let mut by_topic = HashMap::new();
        let kinds = kinds
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                by_topic.insert(spec.topic.clone(), i);
                KindState {
                    name: spec.name,
                    versions: spec.versions,
                    instances: Vec::new(),
                    heads: LruCache::new(cache),
                    partitions: None,
                }
            })
            .collect();
        Engine { kinds, by_topic, limits, versions, replayer: None }
    }

    /// The number of partitions of `topic`, as the source reads it. From then on a record
    /// of a model on another partition than its key's is rejected `wrong_partition`. The
    /// source keeps the count fixed while it folds the topic, so every replica decides alike.
    pub fn set_partitions(&mut self, topic: &str, partitions: u32) {
        if let Some(&kind) = self.by_topic.get(topic) {
            self.kinds[kind].partitions = Some(partitions);
        }
    }

    /// Models resident per kind, over all its instances, and the number of instances.
    pub fn resident(&self, kind: &str) -> Option<(usize, usize)> {
        let state = self.kinds.iter().find(|k| &*k.name == kind)?;
        Some((state.instances.iter().map(Models::resident).sum(), state.instances.len()))
    }

    /// Folds one batch. Nothing is written: the result is committed by the caller, and
    /// must be before the next call.
    pub fn fold(&mut self, records: &[Record], view: &dyn View) -> Result<Folded, FoldError> {
        let mut folded = Folded::default();
        // A replay record ends the batch: models rebuilt for it read their committed history.
        let replay_at =
            records.iter().position(|r| r.header(REPLAY_HEADER).is_some() && self.by_topic.contains_key(&r.topic));
        let (records, replay) = match replay_at {
            Some(i) => (&records[..i], Some(&records[i])),
            None => (records, None),
        };
        folded.consumed = records.len() + usize::from(replay.is_some());
        // Per kind, per model: the records in offset order, each with the version its
        // partition folds with at its offset (deploy records in the batch change it).
        let mut groups: Vec<(usize, Arc<str>, Vec<Versioned>)> = Vec::new();
        let mut index: HashMap<(usize, &[u8]), usize> = HashMap::new();
        for record in records {
            let reject = |reason| Rejected::new(record, None, reason);
            let Some(&kind) = self.by_topic.get(&record.topic) else {
                folded.reject(reject(Rejection::UnknownTopic));
                continue;
            };
            if let Some(name) = record.header(DEPLOY_HEADER) {
                self.deploy(kind, record, name, view, &mut folded)?;
                continue;
            }
            let id = match record.key.as_deref().map(validate_id) {
                Some(Ok(id)) => id,
                None => {
                    folded.reject(reject(Rejection::InvalidKey("record has no key".into())));
                    continue;
                }
                Some(Err(reason)) => {
                    folded.reject(reject(Rejection::InvalidKey(reason.to_string())));
                    continue;
                }
            };
            if let Some(partitions) = self.kinds[kind].partitions {
                let expected = partition_of(id.as_bytes(), partitions);
                if expected != record.partition {
                    let model = ModelKey { kind: self.kinds[kind].name.clone(), id: id.into() };
                    let reason = Rejection::WrongPartition { expected, partitions };
                    folded.reject(Rejected::new(record, Some(model), reason));
                    continue;
                }
            }
            if record.value.len() > self.limits.diff_bytes_max {
                let bytes = record.value.len() as u64;
                let model = ModelKey { kind: self.kinds[kind].name.clone(), id: id.into() };
                folded.reject(Rejected::new(record, Some(model), Rejection::TooLarge { bytes }));
                continue;
            }
            let slot = *index.entry((kind, id.as_bytes())).or_insert_with(|| {
                groups.push((kind, Arc::from(id), Vec::new()));
                groups.len() - 1
            });
            groups[slot].2.push((record, self.kinds[kind].versions.of(record.partition)));
        }
        for (kind, id, records) in groups {
            // The first diff of a model after its partition's replay record rebuilds it first.
            let partition = records[0].0.partition;
            let generation = self.kinds[kind].versions.replayed(partition);
            let mut rebuilt = false;
            // (No replay record in this partition yet: nothing to look up.)
            if generation > 0 {
                let model = ModelKey { kind: self.kinds[kind].name.clone(), id: id.clone() };
                let head = match self.kinds[kind].heads.get(&id) {
                    Some(head) if head.replayed >= generation => None,
                    Some(head) => Some(head.clone()),
                    None => view.head(&model).map_err(FoldError::View)?.filter(|h| h.replayed < generation),
                };
                if let Some(mut head) = head {
                    // (A head stored before partitions were recorded: it is in this one.)
                    head.partition = Some(partition);
                    self.kinds[kind].heads.put(id.clone(), head);
                    if let Err(reason) = self.replay_model_at(kind, &model, partition, view, &mut folded)? {
                        tracing::warn!(kind = %model.kind, id = %model.id, %reason, "model not replayed; it keeps its history");
                    }
                    rebuilt = true;
                }
            }
            self.fold_model(kind, id, &records, view, &mut folded, rebuilt)?;
        }
        if let Some(record) = replay {
            let kind = self.by_topic[&record.topic];
            let state = &mut self.kinds[kind];
            let version = state.versions.of(record.partition);
            let generation = state.versions.replayed(record.partition) + 1;
            state.versions.replays.insert(record.partition, (generation, version));
            tracing::info!(kind = %state.name, partition = record.partition, offset = record.offset, generation, "replay record folded: the partition's models are rebuilt");
            folded.mark(record, Became::Replay, generation, version);
            let subject = record.header(SUBJECT_HEADER).map(|v| String::from_utf8_lossy(v).into_owned());
            folded.replays.push((state.name.clone(), version, subject));
            folded.kind_versions.retain(|(k, _)| *k != state.name);
            folded.kind_versions.push((state.name.clone(), state.versions.clone()));
        }
        Ok(folded)
    }

    fn fold_model(
        &mut self,
        kind: usize,
        id: Arc<str>,
        records: &[Versioned],
        view: &dyn View,
        folded: &mut Folded,
        rebuilt: bool,
    ) -> Result<(), FoldError> {
        let limits = self.limits.clone();
        let state = &mut self.kinds[kind];
        let versions = &mut self.versions;
        let model = ModelKey { kind: state.name.clone(), id: id.clone() };
        let mut head = match state.heads.get(&id) {
            Some(head) => Some(head.clone()),
            None => view.head(&model).map_err(FoldError::View)?,
        };
        // The head as the store gives it now (a rebuilt one: as this batch leaves it).
        let stored = head.clone();
        let partition = records[0].0.partition;
        let generation = state.versions.replayed(partition);
        if let Some(head) = &mut head {
            head.partition = Some(partition);
        }
        let mut pending = Pending::default();
        if rebuilt {
            // Its rebuilt state is this batch's last checkpoint of it, not in the store yet.
            let checkpoint = folded.checkpoints.iter().rev().find(|c| c.model == model);
            pending.snapshot = checkpoint.map(|c| (c.snapshot.clone(), c.reducer));
        }
        let mut i = 0;
        while i < records.len() {
            let (record, version) = records[i];
            let reject = |reason| Rejected::new(record, Some(model.clone()), reason);
            if let Some(head_offset) = head.as_ref().and_then(|h| h.offset)
                && record.offset <= head_offset
            {
                tracing::error!(kind = %model.kind, id = %model.id, offset = record.offset, head_offset, "offset regressed; record not folded");
                folded.reject(reject(Rejection::OffsetRegressed { head_offset }));
                i += 1;
                continue;
            }
            if record.is_create() {
                if head.is_some() {
                    folded.reject(reject(Rejection::Exists));
                } else {
                    head = Some(Head::new(&model, version, partition, generation));
                    folded.created.push(model.clone());
                    folded.mark(record, Became::Created, 0, version);
                }
                i += 1;
                continue;
            }
            if let Some(rejection) = precondition(record, head.as_ref(), &model, folded, view)? {
                folded.reject(reject(rejection));
                i += 1;
                continue;
            }
            let current = head.get_or_insert_with(|| {
                folded.created.push(model.clone());
                Head::new(&model, version, partition, generation)
            });
            let run_end = run_end(records, i);
            let run = &records[i..run_end];
            let diffs: Vec<DiffRecord> = run.iter().map(|(record, _)| DiffRecord::from(*record)).collect();
            let to = instance(state, versions, version)?;
            let moved = move_to(&mut state.instances, &id, to);
            let mut overlay = Overlay {
                model: &model,
                head: current,
                reducer: version,
                versions: &mut *versions,
                view,
                pending: &mut pending,
                folded: &mut *folded,
                limits: &limits,
            };
            apply_run(&mut state.instances, to, run, diffs, moved, &mut overlay)?;
            i = run_end;
        }
        if let Some(head) = head {
            state.heads.put(id, head.clone());
            match &stored {
                // Unchanged (every record rejected): nothing to write.
                Some(before) if !rebuilt && *before == head => {}
                Some(before) if !rebuilt && head.advanced_from(before) => folded.advanced.push((model, head)),
                _ => folded.heads.push((model, head)),
            }
        }
        Ok(())
    }
}

/// Applies one run of diffs (see [`run_end`]) to the model in instance `to` in one reducer
/// call (`moved`: whether moving it there from another version's instance worked), records
/// each diff's outcome in `overlay`, and checkpoints the model if it is due.
fn apply_run(
    instances: &mut [Models],
    to: usize,
    run: &[Versioned],
    diffs: Vec<DiffRecord>,
    moved: Result<(), ReducerError>,
    overlay: &mut Overlay,
) -> Result<(), FoldError> {
    let (model, id, version) = (overlay.model, &*overlay.model.id, overlay.reducer);
    let applied = moved.and_then(|()| instances[to].apply(id, overlay.head.hash, &diffs, overlay));
    let outcomes = match applied {
        Ok(outcomes) => outcomes,
        // The model cannot be rebuilt under this version (its state does not
        // restore, or moving it failed): its diffs fail, others go on.
        Err(e @ (ReducerError::Restore { .. } | ReducerError::Trap { .. } | ReducerError::Contract { .. })) => {
            tracing::error!(kind = %model.kind, id = %model.id, error = %e, "model cannot be rebuilt; its diffs fail");
            for models in instances.iter_mut() {
                models.forget(id)?;
            }
            vec![Outcome::Failed(format!("cannot rebuild the model: {e}")); diffs.len()]
        }
        Err(e) => return Err(e.into()),
    };
    for (((record, _), diff), outcome) in run.iter().zip(diffs).zip(outcomes) {
        match outcome {
            Outcome::Applied(hash, reactions) => overlay.applied(record, diff, hash, version, reactions),
            Outcome::Refused(reason) => overlay.reject(record, Rejection::Refused(reason)),
            Outcome::Failed(reason) => overlay.reject(record, Rejection::Failed(reason)),
        }
    }
    if checkpoint_due(overlay.head, overlay.limits) {
        match instances[to].snapshot(id, overlay) {
            Ok(snapshot) => overlay.checkpoint(snapshot),
            // A reducer that cannot snapshot keeps its models resident; the
            // diffs stay retained and the next interval tries again.
            Err(ReducerError::Trap { .. } | ReducerError::Contract { .. }) => {
                tracing::warn!(kind = %model.kind, id = %model.id, "checkpoint skipped: the reducer failed to snapshot")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether a model's state is due for a checkpoint: `checkpoint_interval_diffs` applied since
/// the latest one, and their bytes at least `checkpoint_tail_percent` of its size. A
/// snapshot costs in proportion to the state, so a large state is snapshotted less
/// often and the cost per diff byte does not grow with it; the replay it saves stays
/// at most that fraction of loading it.
fn checkpoint_due(head: &Head, limits: &FoldLimits) -> bool {
    let since = head.seq - head.checkpoint().map_or(0, |(seq, _)| seq);
    let share = head.checkpoint_bytes.saturating_mul(limits.checkpoint_tail_percent) / 100;
    since >= limits.checkpoint_interval_diffs && head.tail_bytes >= share
}

/// A record and the version its partition folds with at its offset.
type Versioned<'a> = (&'a Record, ModuleHash);

/// The end of the run of diffs that starts at `start`: up to the next create record,
/// version change, or offset that does not follow the one before it. A run goes to the
/// reducer in one call. (A model's records on two partitions of a topic can go back in a
/// batch: the record that does starts the next run, is checked against the head, and is
/// rejected.)
fn run_end(records: &[Versioned], start: usize) -> usize {
    let version = records[start].1;
    (start + 1..records.len())
        .find(|&j| {
            let (record, v) = records[j];
            record.is_create() || v != version || record.offset <= records[j - 1].0.offset || conditional(record)
        })
        .unwrap_or(records.len())
}

/// Whether a record carries a condition ([`precondition`]): it starts a run of its own,
/// checked against the head the diffs before it left.
fn conditional(record: &Record) -> bool {
    record.header(IDEMPOTENCY_KEY_HEADER).is_some() || record.header(EXPECTED_HASH_HEADER).is_some()
}

/// Why a diff is not applied before the reducer sees it: its idempotency key was applied to
/// the model already (in this batch or before), or the model is not at the hash it
/// expects. Both follow from the log alone: every replica decides alike.
fn precondition(
    record: &Record,
    head: Option<&Head>,
    model: &ModelKey,
    folded: &Folded,
    view: &dyn View,
) -> Result<Option<Rejection>, FoldError> {
    if let Some(key) = record.header(IDEMPOTENCY_KEY_HEADER) {
        let key = String::from_utf8_lossy(key);
        let here = folded.keyed.iter().rev().find(|k| k.model == *model && k.key == key).map(|k| k.seq);
        let seq = match here {
            Some(seq) => Some(seq),
            None => view.keyed(model, &key).map_err(FoldError::View)?.map(|k| k.seq),
        };
        if let Some(seq) = seq {
            return Ok(Some(Rejection::Duplicate { seq }));
        }
    }
    if let Some(expected) = record.header(EXPECTED_HASH_HEADER) {
        let current = head.map_or_else(|| model.genesis(), |h| h.hash).to_string();
        if !expected.eq_ignore_ascii_case(current.as_bytes()) {
            let expected = String::from_utf8_lossy(expected);
            return Ok(Some(Rejection::HashMismatch(format!(
                "the model is at {current}, not at the expected {expected}: another diff came first"
            ))));
        }
    }
    Ok(None)
}
