//! Replays: a model rebuilt from its oldest retained version with the version a replay
//! record names (see [`crate::model::REPLAY_HEADER`]).

use super::*;

impl Engine {
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
    pub(super) fn replay_model_at(
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
    pub(super) fn rebuild(
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
            _ => match first_diff_as_base(models, id, &mut tail, &mut memory)? {
                Some(Ok(base)) => base,
                Some(Err(reason)) => return Ok(Err(reason)),
                None => return Ok(Ok(head.clone())),
            },
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
        let mut new_head = base_head(head, (base_seq, base_offset, base), reducer, base_state.len() as u64);
        let applied = match reapplied(&model, &mut new_head, diffs, outcomes) {
            Ok(applied) => applied,
            Err(reason) => return Ok(Err(reason)),
        };
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
}

/// The head of a model rebuilt up to its base (`(seq, offset, new hash)`), whose state is
/// `state_bytes` long; the diffs after it follow ([`reapplied`]).
fn base_head(head: &Head, (seq, offset, hash): Base, reducer: ModuleHash, state_bytes: u64) -> Head {
    Head {
        seq,
        offset: Some(offset),
        hash,
        reducer,
        checkpoints: vec![(seq, offset)],
        pruned_through: Some(offset),
        partition: head.partition,
        replayed: head.replayed,
        checkpoint_bytes: state_bytes,
        tail_bytes: 0,
        // The base and every diff after it: the replay's version.
        run_since: Some(seq + 1),
    }
}

/// The base of a rebuilt chain: (seq, offset, old hash) of the oldest retained version.
type Base = (u64, u64, Hash);

/// The base of a rebuilt chain where no checkpoint is retained: the first diff, applied to
/// the empty state (`None`: there is none).
fn first_diff_as_base(
    models: &mut Models,
    id: &str,
    tail: &mut std::vec::IntoIter<(Hash, DiffRecord)>,
    memory: &mut crate::reducer::MemoryCheckpoints,
) -> Result<Option<Result<Base, NotReplayed>>, FoldError> {
    let Some((genesis, first)) = tail.next() else { return Ok(None) };
    Ok(Some(match models.apply(id, genesis, std::slice::from_ref(&first), memory)?.pop() {
        Some(Outcome::Applied(hash, _)) => Ok((1, first.offset, hash)),
        other => Err(NotReplayed(format!("the first diff (offset {}) no longer applies: {other:?}", first.offset))),
    }))
}

/// The diffs after a rebuilt base, as applied again: each keeps its offset and seq and
/// gets its new hash; `head` follows them. Why not, if one no longer applies.
fn reapplied(
    model: &ModelKey,
    new_head: &mut Head,
    diffs: Vec<DiffRecord>,
    outcomes: Vec<Outcome>,
) -> Result<Vec<Applied>, NotReplayed> {
    let reducer = new_head.reducer;
    let mut applied = Vec::with_capacity(diffs.len());
    for (diff, outcome) in diffs.into_iter().zip(outcomes) {
        // A replay rebuilds history: its reactions went out when the diffs were first folded.
        let Outcome::Applied(hash, _) = outcome else {
            return Err(NotReplayed(format!("the diff at offset {} no longer applies: {outcome:?}", diff.offset)));
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
    Ok(applied)
}
