//! The fold engine: records in, new versions out. Free of I/O: it reads what it needs
//! through [`View`] and returns every write as data ([`Folded`]) for the store to commit
//! in one batch. It does not know which source fed the records.
//!
//! Per model, records are folded in offset order; the hash chain covers applied diffs only
//! (see [`crate::chain`]). Each model's diffs in a batch go to the reducer in one call.

mod catchup;
#[cfg(test)]
mod tests;
mod versions;

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

    /// Moves up to `budget` resident models off instances whose version no partition
    /// folds with any more (after a deploy reached every partition) to the version that
    /// does, and frees such instances once empty. Called between batches, so no pause
    /// grows with the number of resident models. Returns the models handled.
    pub fn retire(&mut self, budget: usize) -> usize {
        let mut left = budget.max(1);
        for state in &mut self.kinds {
            let in_use = state.versions.in_use();
            let mut i = state.instances.len();
            while i > 0 {
                i -= 1;
                let version = state.instances[i].reducer().id();
                if in_use.contains(&version) {
                    continue;
                }
                // Models go to the one version left; with several (a deploy that did not
                // reach every partition), they are dropped: each is rebuilt from its
                // history by its partition's version when next used.
                let target = match in_use.as_slice() {
                    [only] => match instance(state, &mut self.versions, *only) {
                        Ok(target) => Some(target),
                        Err(e) => {
                            tracing::warn!(kind = %state.name, error = %e, "cannot load the version to move models to; dropping them");
                            None
                        }
                    },
                    _ => None,
                };
                // Creating the target may have shifted nothing before `i`: instances are
                // only ever pushed at the end.
                let mut ids = state.instances[i].resident_ids();
                while left > 0
                    && let Some(id) = ids.pop()
                {
                    left -= 1;
                    let moved = match target {
                        Some(to) => move_model(&mut state.instances, &id, i, to),
                        None => Ok(()),
                    };
                    if let Err(e) = moved.and_then(|()| state.instances[i].forget(&id)) {
                        tracing::warn!(kind = %state.name, id, error = %e, "model not moved off a retired version; it is rebuilt from its history when next used");
                        for models in &mut state.instances {
                            let _ = models.forget(&id);
                        }
                    }
                }
                if state.instances[i].resident() == 0 {
                    let retired = state.instances.remove(i);
                    tracing::info!(kind = %state.name, version = %version, "instance of a retired version freed");
                    // Freeing an instance that held many models takes milliseconds.
                    let freed =
                        std::thread::Builder::new().name("retired-instance".into()).spawn(move || drop(retired));
                    if let Err(e) = freed {
                        tracing::warn!(error = %e, "cannot free the retired instance on its own thread; freeing it here");
                    }
                }
                if left == 0 {
                    return budget;
                }
            }
        }
        budget.max(1) - left
    }

    /// Rebuilds one model for its partition's latest replay record (see [`REPLAY_HEADER`]),
    /// if it was not rebuilt for it yet, into `folded`. [`Replayed::Kept`]: why it cannot
    /// be rebuilt; it keeps its history, and is not tried again for this replay.
    /// The fold rebuilds a model at its first diff after the replay record, and the fold
    /// loop the others between batches: either way the result is the same, so every
    /// replica reaches the same hashes.
    pub fn replay_model(
        &mut self,
        kind: &str,
        id: &str,
        view: &dyn View,
        folded: &mut Folded,
    ) -> Result<Replayed, FoldError> {
        let Some(index) = self.kinds.iter().position(|k| &*k.name == kind) else {
            return Ok(Replayed::Kept(NotReplayed("unknown kind".into())));
        };
        let model = ModelKey::new(kind, id);
        let Some(head) = view.head(&model).map_err(FoldError::View)? else {
            return Ok(Replayed::Kept(NotReplayed("no such model".into())));
        };
        let Some(partition) = head.partition else { return Ok(Replayed::Unchanged) };
        if head.replayed >= self.kinds[index].versions.replayed(partition) {
            return Ok(Replayed::Unchanged);
        }
        self.kinds[index].heads.put(model.id.clone(), head);
        let outcome = self.replay_model_at(index, &model, partition, view, folded)?;
        let head = self.kinds[index].heads.get(&model.id).expect("put above").clone();
        folded.heads.push((model, head));
        Ok(match outcome {
            Ok(()) => Replayed::Rebuilt,
            Err(reason) => Replayed::Kept(reason),
        })
    }

    /// Rebuilds a model (its head in the heads cache) for `partition`'s latest replay into
    /// `folded` (diffs, checkpoints, replaced; the new head goes to the cache only).
    fn replay_model_at(
        &mut self,
        index: usize,
        model: &ModelKey,
        partition: u32,
        view: &dyn View,
        folded: &mut Folded,
    ) -> Result<Result<(), NotReplayed>, FoldError> {
        let Some(&(generation, version)) = self.kinds[index].versions.replays.get(&partition) else {
            return Ok(Ok(()));
        };
        let mut head = self.kinds[index].heads.get(&model.id).expect("the caller cached the head").clone();
        // Written only if the whole rebuild succeeds.
        let mut rebuilt = Folded::default();
        let result = self.rebuild(index, model, &head, version, view, &mut rebuilt)?;
        let outcome = match result {
            Ok(new_head) => {
                head = new_head;
                folded.applied.extend(rebuilt.applied);
                folded.checkpoints.extend(rebuilt.checkpoints);
                folded.replaced.extend(rebuilt.replaced);
                Ok(())
            }
            Err(reason) => Err(reason),
        };
        head.replayed = generation;
        self.kinds[index].heads.put(model.id.clone(), head);
        Ok(outcome)
    }

    /// Rebuilds one model from its oldest retained version with version `reducer` (see
    /// [`crate::model::ReplayJob`]) into `folded`; its new head. The oldest retained version (its oldest checkpoint, or
    /// its first diff) becomes the base of a new chain ([`Hash::rebase`]); the diffs after
    /// it are applied again, keeping their offsets and seqs. Returns why a model cannot be
    /// rebuilt (it keeps its history): a diff the reducer now refuses or fails on, a state
    /// it cannot restore.
    fn rebuild(
        &mut self,
        index: usize,
        model: &ModelKey,
        head: &Head,
        reducer: ModuleHash,
        view: &dyn View,
        folded: &mut Folded,
    ) -> Result<Result<Head, NotReplayed>, FoldError> {
        let model = model.clone();
        let id: &str = &model.id;
        let Some(last_offset) = head.offset else { return Ok(Ok(head.clone())) }; // no diffs: nothing to rebuild
        // While nothing was pruned, every diff is retained: rebuild from the empty state.
        let oldest = head.pruned_through.and(head.checkpoints.first().copied());
        let mut probe = head.clone();
        probe.checkpoints = oldest.into_iter().collect();
        let history = view.checkpoint(&model, &probe).map_err(FoldError::View)?;
        let replayer = &mut self.replayer;
        let state = &mut self.kinds[index];
        // One instance rebuilds model after model (creating one per model costs more than
        // the rebuild); a model is dropped from it when done, and before, in case an
        // earlier attempt left it there.
        if replayer.as_ref().is_none_or(|m| m.reducer().id() != reducer) {
            *replayer = Some(self.versions.reducer(reducer)?.models());
        }
        let models = replayer.as_mut().expect("set above");
        models.forget(id)?;
        let mut memory = crate::reducer::MemoryCheckpoints::default();
        let Checkpoint { snapshot, tail } = history.checkpoint;
        let mut tail = tail.into_iter();
        // The base: (seq, offset, old hash) of the oldest retained version.
        let (base_seq, base_offset, old_base) = match (oldest, &snapshot) {
            (Some((seq, offset)), Some(snapshot)) => {
                if let Err(e) = models.adopt(id, snapshot) {
                    return Ok(Err(NotReplayed(format!("cannot restore the oldest retained checkpoint: {e}"))));
                }
                let prev = tail.as_slice().first().map(|(prev, _)| *prev);
                (seq, offset, prev.unwrap_or(head.hash))
            }
            _ => {
                let Some((genesis, first)) = tail.next() else { return Ok(Ok(head.clone())) };
                match models.apply(id, genesis, std::slice::from_ref(&first), &mut memory)?.pop() {
                    Some(Outcome::Applied(hash, _)) => (1, first.offset, hash),
                    other => {
                        return Ok(Err(NotReplayed(format!(
                            "the first diff (offset {}) no longer applies: {other:?}",
                            first.offset
                        ))));
                    }
                }
            }
        };
        let base = old_base.rebase(&reducer.0);
        let snapshot_now =
            |models: &mut Models, memory: &mut crate::reducer::MemoryCheckpoints| models.snapshot(id, memory);
        let base_state = match snapshot_now(models, &mut memory) {
            Ok(state) => state,
            Err(e) => return Ok(Err(NotReplayed(format!("cannot snapshot the rebuilt base: {e}")))),
        };
        let rest: Vec<(Hash, DiffRecord)> = tail.collect();
        let diffs: Vec<DiffRecord> = rest.iter().map(|(_, d)| d.clone()).collect();
        let outcomes = if diffs.is_empty() { Vec::new() } else { models.apply(id, base, &diffs, &mut memory)? };
        let mut new_head = Head {
            seq: base_seq,
            offset: Some(base_offset),
            hash: base,
            reducer,
            checkpoints: vec![(base_seq, base_offset)],
            pruned_through: Some(base_offset),
            partition: head.partition,
            replayed: head.replayed,
            checkpoint_bytes: base_state.len() as u64,
            tail_bytes: 0,
            // The base and every diff after it: the replay's version.
            run_since: Some(base_seq + 1),
        };
        let mut applied = Vec::with_capacity(diffs.len());
        for (diff, outcome) in diffs.into_iter().zip(outcomes) {
            // A replay rebuilds history: its reactions went out when the diffs were first folded.
            let Outcome::Applied(hash, _) = outcome else {
                return Ok(Err(NotReplayed(format!(
                    "the diff at offset {} no longer applies: {outcome:?}",
                    diff.offset
                ))));
            };
            applied.push(Applied {
                model: model.clone(),
                offset: diff.offset,
                seq: new_head.seq + 1,
                prev: new_head.hash,
                hash,
                reducer,
                timestamp_ms: diff.timestamp_ms,
                tail_bytes: new_head.tail_bytes + diff.payload.len() as u64,
                headers: diff.headers,
                payload: Bytes::from(diff.payload),
            });
            new_head.tail_bytes = applied.last().map_or(0, |a| a.tail_bytes);
            new_head.seq += 1;
            new_head.offset = Some(diff.offset);
            new_head.hash = hash;
        }
        debug_assert_eq!((new_head.seq, new_head.offset), (head.seq, Some(last_offset)));
        folded.checkpoints.push(CheckpointWrite {
            model: model.clone(),
            seq: base_seq,
            offset: base_offset,
            hash: base,
            reducer,
            snapshot: base_state,
        });
        if new_head.offset != Some(base_offset) {
            let state_now = match snapshot_now(models, &mut memory) {
                Ok(state) => state,
                Err(e) => return Ok(Err(NotReplayed(format!("cannot snapshot the rebuilt head: {e}")))),
            };
            new_head.checkpoint_bytes = state_now.len() as u64;
            folded.checkpoints.push(CheckpointWrite {
                model: model.clone(),
                seq: new_head.seq,
                offset: last_offset,
                hash: new_head.hash,
                reducer,
                snapshot: state_now,
            });
            new_head.checkpoints.push((new_head.seq, last_offset));
        }
        models.forget(id)?;
        folded.applied.extend(applied);
        folded.replaced.push(model.clone());
        // The fold instance rebuilds the model from its new checkpoint on next use.
        for models in &mut state.instances {
            models.forget(id)?;
        }
        Ok(Ok(new_head))
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
            let key = record.key.as_deref().ok_or_else(|| "record has no key".to_owned());
            let id = match key.and_then(validate_id) {
                Ok(id) => id,
                Err(reason) => {
                    folded.reject(reject(Rejection::InvalidKey(reason)));
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

    /// A deploy record: its partition folds with the module it carries from the next
    /// offset on (in its value, or in chunks before it). A module that cannot load here is
    /// rejected (`invalid_deploy`) and the partition keeps its version.
    fn deploy(
        &mut self,
        kind: usize,
        record: &Record,
        name: &[u8],
        view: &dyn View,
        folded: &mut Folded,
    ) -> Result<(), FoldError> {
        let reject = |reason: String| Rejected::new(record, None, Rejection::InvalidDeploy(reason));
        let refused = |folded: &mut Folded, reason: String| {
            let kind = &self.kinds[kind].name;
            tracing::error!(%kind, partition = record.partition, offset = record.offset, %reason, "deploy record refused; the partition keeps its version");
            folded.reject(reject(reason));
        };
        if let Some(header) = record.header(DEPLOY_CHUNK_HEADER) {
            match DeployChunk::parse_header(header) {
                Ok((module, index, _)) => {
                    folded.chunks.push(DeployChunk { module, index, bytes: record.value.clone() });
                    folded.mark(record, Became::DeployChunk, u64::from(index), module);
                }
                Err(reason) => refused(folded, reason),
            }
            return Ok(());
        }
        let module = match record.header(DEPLOY_MODULE_HEADER) {
            None => Ok(record.value.clone()),
            Some(header) => assemble(header, view, folded)?,
        };
        let (reducer, module) = match module.and_then(|m| Ok((self.versions.load(&m)?, m))) {
            Ok(loaded) => loaded,
            Err(reason) => {
                refused(folded, reason);
                return Ok(());
            }
        };
        let state = &mut self.kinds[kind];
        let text = |header| record.header(header).map(|v| String::from_utf8_lossy(v).into_owned());
        let count = text(DEPLOY_PARTITIONS_HEADER).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
        let versions = &mut state.versions;
        versions.partitions.insert(record.partition, reducer.id());
        versions.partition_count = versions.partition_count.max(count);
        let info = reducer.info();
        tracing::info!(kind = %state.name, partition = record.partition, offset = record.offset, version = %reducer.id(), "deploy record folded: the partition folds with this version from here");
        folded.deploys.push(DeployFolded {
            kind: state.name.clone(),
            name: String::from_utf8_lossy(name).into_owned(),
            version: reducer.id(),
            origin: text(DEPLOY_ORIGIN_HEADER).unwrap_or_else(|| "log".into()),
            subject: text(SUBJECT_HEADER),
            declared: (info.name.clone(), info.version.clone()),
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            module,
        });
        folded.mark(record, Became::Deployed, 0, reducer.id());
        folded.kind_versions.retain(|(k, _)| *k != state.name);
        folded.kind_versions.push((state.name.clone(), state.versions.clone()));
        Ok(())
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
            let applied = moved.and_then(|()| state.instances[to].apply(&id, overlay.head.hash, &diffs, &mut overlay));
            let outcomes = match applied {
                Ok(outcomes) => outcomes,
                // The model cannot be rebuilt under this version (its state does not
                // restore, or moving it failed): its diffs fail, others go on.
                Err(e @ (ReducerError::Restore { .. } | ReducerError::Trap { .. } | ReducerError::Contract { .. })) => {
                    tracing::error!(kind = %model.kind, id = %model.id, error = %e, "model cannot be rebuilt; its diffs fail");
                    for models in &mut state.instances {
                        models.forget(&id)?;
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
            if checkpoint_due(overlay.head, &limits) {
                match state.instances[to].snapshot(&id, &mut overlay) {
                    Ok(snapshot) => overlay.checkpoint(snapshot),
                    // A reducer that cannot snapshot keeps its models resident; the
                    // diffs stay retained and the next interval tries again.
                    Err(ReducerError::Trap { .. } | ReducerError::Contract { .. }) => {
                        tracing::warn!(kind = %model.kind, id = %model.id, "checkpoint skipped: the reducer failed to snapshot")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
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

/// Moves model `id` into instance `to` from whichever other instance holds it (its
/// partition switched versions since): snapshot there, restore here, as `Versions`
/// defines its state.
fn move_to(instances: &mut [Models], id: &str, to: usize) -> Result<(), ReducerError> {
    for from in 0..instances.len() {
        if from != to {
            move_model(instances, id, from, to)?;
            instances[from].forget(id)?;
        }
    }
    Ok(())
}

/// The index of the kind's instance of `version`, created if there is none.
fn instance(state: &mut KindState, versions: &mut Versions, version: ModuleHash) -> Result<usize, ReducerError> {
    if let Some(i) = state.instances.iter().position(|m| m.reducer().id() == version) {
        return Ok(i);
    }
    state.instances.push(versions.reducer(version)?.models());
    Ok(state.instances.len() - 1)
}

/// Copies a model resident in instance `from` into instance `to` (snapshot on one
/// version, restore on the other); nothing if it is not resident there.
fn move_model(instances: &mut [Models], id: &str, from: usize, to: usize) -> Result<(), ReducerError> {
    match instances[from].snapshot_resident(id)? {
        Some(snapshot) => instances[to].adopt(id, &snapshot),
        None => Ok(()),
    }
}

/// What this batch changed for one model that the store does not have yet.
#[derive(Default)]
struct Pending {
    /// A snapshot and the version that wrote it.
    snapshot: Option<(Vec<u8>, ModuleHash)>,
    tail: Vec<(Hash, DiffRecord)>,
    /// The version that applied each diff of `tail` (a batch may cross a deploy record).
    tail_by: Vec<ModuleHash>,
}

/// The store's checkpoints as of this batch: committed ones plus this batch's writes.
struct Overlay<'a> {
    model: &'a ModelKey,
    head: &'a mut Head,
    /// The version folding the model now.
    reducer: ModuleHash,
    versions: &'a mut Versions,
    view: &'a dyn View,
    pending: &'a mut Pending,
    folded: &'a mut Folded,
    limits: &'a FoldLimits,
}

impl Overlay<'_> {
    /// Records a diff the reducer applied (`diff` is `record` as the reducer got it); the
    /// model's hash is now `hash`.
    fn applied(
        &mut self,
        record: &Record,
        diff: DiffRecord,
        hash: Hash,
        reducer: ModuleHash,
        reactions: Vec<Reaction>,
    ) {
        let applied = Applied {
            model: self.model.clone(),
            offset: record.offset,
            seq: self.head.seq + 1,
            prev: self.head.hash,
            hash,
            reducer,
            timestamp_ms: record.timestamp_ms,
            headers: record.headers.clone(),
            payload: record.value.clone(),
            tail_bytes: self.head.tail_bytes + record.value.len() as u64,
        };
        self.pending.tail.push((self.head.hash, diff));
        self.pending.tail_by.push(reducer);
        self.head.seq = applied.seq;
        self.head.tail_bytes = applied.tail_bytes;
        self.head.offset = Some(applied.offset);
        self.head.hash = hash;
        if reducer != self.head.reducer {
            self.head.run_since = Some(applied.seq);
        }
        self.head.reducer = reducer;
        self.folded.mark(record, Became::Applied, applied.seq, reducer);
        if let Some(key) = record.header(IDEMPOTENCY_KEY_HEADER) {
            self.folded.keyed.push(Keyed {
                model: self.model.clone(),
                key: String::from_utf8_lossy(key).into_owned(),
                seq: applied.seq,
                offset: applied.offset,
                hash,
            });
        }
        self.folded.outbox.extend(reactions.into_iter().enumerate().map(|(index, reaction)| Outgoing {
            source: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            model: self.model.clone(),
            seq: applied.seq,
            index: index as u32,
            reaction,
        }));
        self.folded.applied.push(applied);
    }

    fn reject(&mut self, record: &Record, reason: Rejection) {
        self.folded.reject(Rejected::new(record, Some(self.model.clone()), reason));
    }

    /// Saves the model's current state (at its head) as a checkpoint.
    fn checkpoint(&mut self, snapshot: Vec<u8>) {
        let Some(offset) = self.head.offset else { return };
        self.head.checkpoint_bytes = snapshot.len() as u64;
        self.head.tail_bytes = 0;
        self.pending.snapshot = Some((snapshot.clone(), self.reducer));
        self.pending.tail.clear();
        self.pending.tail_by.clear();
        if self.head.checkpoint().is_some_and(|(_, at)| at == offset) {
            return;
        }
        self.folded.checkpoints.push(CheckpointWrite {
            model: self.model.clone(),
            seq: self.head.seq,
            offset,
            hash: self.head.hash,
            reducer: self.head.reducer,
            snapshot,
        });
        self.head.checkpoints.push((self.head.seq, offset));
        let retain = self.limits.retain_checkpoints.max(1);
        if self.head.checkpoints.len() > retain {
            let drop = self.head.checkpoints.len() - retain;
            self.head.checkpoints.drain(..drop);
            let (_, oldest) = self.head.checkpoints[0];
            self.head.pruned_through = Some(oldest);
            self.folded.prunes.push(Prune {
                model: self.model.clone(),
                diffs_through: oldest,
                checkpoints_before: oldest,
            });
        }
    }
}

impl Checkpoints for Overlay<'_> {
    fn load(&mut self, id: &str) -> Result<Checkpoint, ViewError> {
        debug_assert_eq!(id, &*self.model.id, "the engine applies one model at a time");
        // Committed history (or this batch's snapshot) plus this batch's diffs, each run by
        // the version that applied it, brought to the version folding now.
        let Pending { snapshot, tail, tail_by } = &*self.pending;
        let mut history = match snapshot {
            Some((snapshot, by)) => History {
                checkpoint: Checkpoint { snapshot: Some(snapshot.clone()), tail: Vec::new() },
                snapshot_by: Some(*by),
                applied_by: Vec::new(),
            },
            None => self.view.checkpoint(self.model, self.head)?,
        };
        history.checkpoint.tail.extend(tail.iter().cloned());
        history.applied_by.extend(tail_by.iter().copied());
        Ok(self.versions.settle(&self.model.id, history, self.reducer)?)
    }

    fn save(&mut self, id: &str, snapshot: Vec<u8>) -> Result<(), ViewError> {
        // Eviction of another model is rare within a batch; its state is at its committed
        // head, so saving it is optional: it will be rebuilt from its checkpoint.
        if id == &*self.model.id {
            self.checkpoint(snapshot);
        }
        Ok(())
    }
}

/// The module a deploy record names in its [`DEPLOY_MODULE_HEADER`]: its chunks (this
/// batch's, else stored ones) joined and checked against the hash; or, when they are gone
/// (an earlier deploy record of the same module, in another partition, assembled them and
/// they were deleted), the stored module. Either way the same bytes on every replica.
/// The module's chunks are deleted with this batch.
fn assemble(header: &[u8], view: &dyn View, folded: &mut Folded) -> Result<Result<Bytes, String>, FoldError> {
    let (id, count) = match DeployChunk::parse_module_header(header) {
        Ok(parsed) => parsed,
        Err(reason) => return Ok(Err(reason)),
    };
    if !folded.chunks_done.contains(&id) {
        folded.chunks_done.push(id);
    }
    let mut parts = Vec::new();
    for index in 0..count {
        let part = match folded.chunks.iter().rev().find(|c| c.module == id && c.index == index) {
            Some(chunk) => Some(chunk.bytes.clone()),
            None => view.deploy_chunk(&id, index).map_err(FoldError::View)?,
        };
        match part {
            Some(part) => parts.push(part),
            None => break,
        }
    }
    if parts.len() == count as usize {
        let module = Bytes::from(parts.concat());
        return Ok(if ModuleHash::of(&module) == id {
            Ok(module)
        } else {
            Err(format!("the {count} chunks of module {id} do not hash to it"))
        });
    }
    let missing = parts.len();
    if let Some(deployed) = folded.deploys.iter().find(|d| d.version == id) {
        return Ok(Ok(deployed.module.clone()));
    }
    Ok(view.module(&id).map_err(FoldError::View)?.ok_or_else(|| {
        format!("module {id}: chunk {missing} of {count} is not in the partition before its deploy record")
    }))
}
