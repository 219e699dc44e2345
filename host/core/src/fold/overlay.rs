//! What a batch has changed for one model and the store does not hold yet, seen by the
//! runtime as the store's checkpoints plus this batch's writes.

use super::*;

/// What this batch changed for one model that the store does not have yet.
#[derive(Default)]
pub(super) struct Pending {
    /// A snapshot and the version that wrote it.
    pub(super) snapshot: Option<(Vec<u8>, ModuleHash)>,
    pub(super) tail: Vec<(Hash, DiffRecord)>,
    /// The version that applied each diff of `tail` (a batch may cross a deploy record).
    pub(super) tail_by: Vec<ModuleHash>,
}

/// The store's checkpoints as of this batch: committed ones plus this batch's writes.
pub(super) struct Overlay<'a> {
    pub(super) model: &'a ModelKey,
    pub(super) head: &'a mut Head,
    /// The version folding the model now.
    pub(super) reducer: ModuleHash,
    pub(super) versions: &'a mut Versions,
    pub(super) view: &'a dyn View,
    pub(super) pending: &'a mut Pending,
    pub(super) folded: &'a mut Folded,
    pub(super) limits: &'a FoldLimits,
}

impl Overlay<'_> {
    /// Records a diff the reducer applied (`diff` is `record` as the reducer got it); the
    /// model's hash is now `hash`.
    pub(super) fn applied(
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

    pub(super) fn reject(&mut self, record: &Record, reason: Rejection) {
        self.folded.reject(Rejected::new(record, Some(self.model.clone()), reason));
    }

    /// Saves the model's current state (at its head) as a checkpoint.
    pub(super) fn checkpoint(&mut self, snapshot: Vec<u8>) {
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
