//! Committing a folded batch: one WriteBatch with everything the batch changed and the
//! source positions after it, checked before it is written (`check_folded`).

use super::*;

impl Store {
    /// Commits one folded batch and the source positions after it, atomically. Returns what
    /// the WriteBatch held.
    pub fn commit(&self, folded: &Folded, positions: &[(String, Position)]) -> Result<Committed, StoreError> {
        self.commit_with(folded, positions, &[])
    }

    /// [`Store::commit`], with the version records the batch's deploy records make.
    pub fn commit_with(
        &self,
        folded: &Folded,
        positions: &[(String, Position)],
        versions: &[VersionRecord],
    ) -> Result<Committed, StoreError> {
        check_folded(folded)?;
        let mut batch = WriteBatch::default();
        for record in versions {
            batch.put_cf(self.cf(REDUCERS), version_key(&record.name, &record.id), encode_version(record));
        }
        for model in &folded.replaced {
            // A replayed model's history is rewritten whole: what it had goes first.
            let prefix = model_prefix(&model.kind, &model.id);
            let end = prefix_end(&prefix);
            for cf in [DIFFS, STATES, HASHES] {
                batch.delete_range_cf(self.cf(cf), &prefix, &end);
            }
        }
        for applied in &folded.applied {
            let prefix = model_prefix(&applied.model.kind, &applied.model.id);
            batch.put_cf(self.cf(DIFFS), offset_key(&prefix, applied.offset), encode_diff(applied));
            let mut key = prefix;
            key.extend_from_slice(applied.hash.as_bytes());
            batch.put_cf(self.cf(HASHES), key, Enc::value().u64(applied.seq).u64(applied.offset).done());
        }
        for cp in &folded.checkpoints {
            let prefix = model_prefix(&cp.model.kind, &cp.model.id);
            let value = Enc::value().u64(cp.seq).hash(&cp.hash).module(&cp.reducer).bytes(&cp.snapshot).done();
            batch.put_cf(self.cf(STATES), offset_key(&prefix, cp.offset), value);
            // A checkpoint's hash resolves even where its diff is gone (a replay's base).
            let mut key = prefix;
            key.extend_from_slice(cp.hash.as_bytes());
            batch.put_cf(self.cf(HASHES), key, Enc::value().u64(cp.seq).u64(cp.offset).done());
        }
        for prune in &folded.prunes {
            let prefix = model_prefix(&prune.model.kind, &prune.model.id);
            batch.delete_range_cf(self.cf(DIFFS), offset_key(&prefix, 0), offset_key(&prefix, prune.diffs_through + 1));
            batch.delete_range_cf(
                self.cf(STATES),
                offset_key(&prefix, 0),
                offset_key(&prefix, prune.checkpoints_before),
            );
        }
        for (model, head) in &folded.heads {
            batch.put_cf(self.cf(HEADS), head_key(&model.kind, &model.id), encode_head(head));
        }
        for rejected in &folded.rejected {
            let key = offset_key(&partition_prefix(&rejected.topic, rejected.partition), rejected.offset);
            batch.put_cf(self.cf(REJECTS), key, encode_reject(rejected));
        }
        if let Some(job) = &folded.replay {
            batch.put_cf(self.cf(REDUCERS), replay_key(&job.kind), encode_replay(job));
        }
        let mut modules: Vec<ModuleHash> = Vec::new();
        for deploy in &folded.deploys {
            if !modules.contains(&deploy.version) {
                modules.push(deploy.version);
                batch.put_cf(self.cf(REDUCERS), module_key(&deploy.version), &deploy.module);
            }
        }
        for chunk in &folded.chunks {
            batch.put_cf(self.cf(REDUCERS), chunk_key(&chunk.module, chunk.index), &chunk.bytes);
        }
        for id in &folded.chunks_done {
            batch.delete_range_cf(self.cf(REDUCERS), chunk_key(id, 0), chunk_keys_end(id));
        }
        for (kind, versions) in &folded.kind_versions {
            batch.put_cf(self.cf(REDUCERS), kind_versions_key(kind), encode_kind_versions(versions));
        }
        for keyed in &folded.keyed {
            let mut key = model_prefix(&keyed.model.kind, &keyed.model.id);
            key.extend_from_slice(keyed.key.as_bytes());
            batch.put_cf(self.cf(KEYS), key, Enc::value().u64(keyed.seq).u64(keyed.offset).hash(&keyed.hash).done());
        }
        for outgoing in &folded.outbox {
            batch.put_cf(
                self.cf(OUTBOX),
                super::outbox::outbox_key(outgoing),
                super::outbox::encode_outgoing(outgoing),
            );
        }
        for (source, position) in positions {
            let key = progress_key(source, &position.topic, position.partition);
            batch.put_cf(self.cf(PROGRESS), key, encode_progress(position));
        }
        let committed = Committed { entries: batch.len() as u64, bytes: batch.size_in_bytes() as u64 };
        self.db.write_opt(batch, &self.write)?;
        Ok(committed)
    }
}

/// Checks a batch before it is written: each model's applied diffs chain from its previous
/// head, seqs and offsets increase, heads agree with the last diff.
pub(super) fn check_folded(folded: &Folded) -> Result<(), StoreError> {
    let invalid = |detail: String| StoreError::Invalid { what: "batch", detail };
    let mut last: HashMap<&ModelKey, &Applied> = HashMap::new();
    for applied in &folded.applied {
        if applied.prev.next(&applied.payload) != applied.hash {
            return Err(invalid(format!("{:?} offset {}: hash is not the chain's", applied.model, applied.offset)));
        }
        if let Some(before) = last.get(&applied.model)
            && (before.hash != applied.prev || before.seq + 1 != applied.seq || before.offset >= applied.offset)
        {
            return Err(invalid(format!(
                "{:?} offset {}: does not follow offset {}",
                applied.model, applied.offset, before.offset
            )));
        }
        last.insert(&applied.model, applied);
    }
    for (model, head) in &folded.heads {
        check_head(head).map_err(|detail| invalid(format!("head of {model:?}: {detail}")))?;
        if let Some(applied) = last.get(model)
            && (applied.hash != head.hash || applied.seq != head.seq)
        {
            return Err(invalid(format!("head of {model:?} does not match its last diff")));
        }
    }
    // A head left unwritten is read back from its last diff: it must be this batch's.
    for (model, head) in &folded.advanced {
        check_head(head).map_err(|detail| invalid(format!("head of {model:?}: {detail}")))?;
        let matches = last.get(model).is_some_and(|applied| {
            (applied.hash, applied.seq, Some(applied.offset), applied.reducer, applied.tail_bytes)
                == (head.hash, head.seq, head.offset, head.reducer, head.tail_bytes)
        });
        if !matches {
            return Err(invalid(format!(
                "unwritten head of {model:?} is not where its last diff in the batch leaves it"
            )));
        }
    }
    Ok(())
}
