//! States across reducer versions.
//!
//! Every stored diff records the version that applied it, and every checkpoint the version
//! that wrote it. The state at a version of a model is defined by those records: each run
//! of diffs is applied by its own version, and the state moves from one version to the next
//! through `snapshot` (old) and `restore` (new), exactly as a deploy moves a resident model.
//! So a model rebuilt after a deploy (evicted, lost to a trap, or never loaded since a
//! restart) reaches the same state as one that was resident when the deploy happened.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use crate::model::Checkpoint;
use crate::model::ModuleHash;
use crate::reducer::{Models, Reducer, ReducerError};

/// A model's latest checkpoint and the diffs after it, with the versions that wrote them.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub checkpoint: Checkpoint,
    /// The version that wrote the snapshot (`None`: no snapshot, the empty state).
    pub snapshot_by: Option<ModuleHash>,
    /// The version that applied each diff of `checkpoint.tail`, in order.
    pub applied_by: Vec<ModuleHash>,
}

impl History {
    /// A history all written by one version (or holding no versioned data).
    pub fn of(checkpoint: Checkpoint, by: ModuleHash) -> History {
        let applied_by = vec![by; checkpoint.tail.len()];
        let snapshot_by = checkpoint.snapshot.as_ref().map(|_| by);
        History { checkpoint, snapshot_by, applied_by }
    }

    /// The version whose state this history ends in (`None`: the empty state).
    pub fn last_version(&self) -> Option<ModuleHash> {
        self.applied_by.last().copied().or(self.snapshot_by)
    }
}

/// Finds a reducer version by its id (from the compile cache or the stored module).
pub trait Resolve: Send + Sync {
    fn reducer(&self, id: ModuleHash) -> Result<Arc<Reducer>, String>;
    /// Loads the module a deploy record carries (a version this process may not have
    /// seen); why it cannot fold here otherwise.
    fn load(&self, module: &[u8]) -> Result<Arc<Reducer>, String>;
}

/// A fixed set of versions (tests and tools that load their reducers themselves).
pub struct Known(pub Vec<Arc<Reducer>>);

impl Resolve for Known {
    fn reducer(&self, id: ModuleHash) -> Result<Arc<Reducer>, String> {
        self.0.iter().find(|r| r.id() == id).cloned().ok_or_else(|| format!("version {id} is not loaded"))
    }

    fn load(&self, module: &[u8]) -> Result<Arc<Reducer>, String> {
        self.reducer(ModuleHash::of(module))
    }
}

/// Scratch instances of past versions, to replay runs of diffs they applied.
pub struct Versions {
    resolve: Arc<dyn Resolve>,
    scratch: LruCache<ModuleHash, Models>,
}

impl Versions {
    /// `instances_max` scratch instances are kept (least recently used go first).
    pub fn new(resolve: Arc<dyn Resolve>, instances_max: usize) -> Versions {
        let max = NonZeroUsize::new(instances_max.max(1)).expect("max(1)");
        Versions { resolve, scratch: LruCache::new(max) }
    }

    /// Version `id`.
    pub fn reducer(&self, id: ModuleHash) -> Result<Arc<Reducer>, ReducerError> {
        self.resolve.reducer(id).map_err(|reason| ReducerError::Instantiate {
            reducer: format!("version {id}"),
            reason: format!("cannot load a version the log deployed: {reason}"),
        })
    }

    /// The version a deploy record carries.
    pub fn load(&self, module: &[u8]) -> Result<Arc<Reducer>, String> {
        self.resolve.load(module)
    }

    /// A scratch instance of version `id`.
    pub fn models(&mut self, id: ModuleHash) -> Result<&mut Models, ReducerError> {
        if !self.scratch.contains(&id) {
            let reducer = self.resolve.reducer(id).map_err(|reason| ReducerError::Instantiate {
                reducer: format!("version {id}"),
                reason: format!("cannot load a version that applied stored diffs: {reason}"),
            })?;
            self.scratch.put(id, reducer.models());
        }
        Ok(self.scratch.get_mut(&id).expect("inserted above"))
    }

    /// The checkpoint to restore into version `current`: every run of diffs that another
    /// version applied (and any run before it) is replayed by its own version first; the
    /// tail left holds diffs `current` applied.
    pub fn settle(&mut self, model: &str, history: History, current: ModuleHash) -> Result<Checkpoint, ReducerError> {
        let Some(last_other) = history.applied_by.iter().rposition(|by| *by != current) else {
            return Ok(history.checkpoint);
        };
        let Checkpoint { mut snapshot, mut tail } = history.checkpoint;
        let rest = tail.split_off(last_other + 1);
        let mut runs = tail.into_iter().zip(history.applied_by).peekable();
        while let Some((first, by)) = runs.next() {
            let mut run = vec![first];
            while let Some((diff, _)) = runs.next_if(|(_, next)| *next == by) {
                run.push(diff);
            }
            let checkpoint = Checkpoint { snapshot: snapshot.take(), tail: run };
            snapshot = Some(self.models(by)?.materialize(model, &checkpoint)?);
        }
        Ok(Checkpoint { snapshot, tail: rest })
    }

    /// The state a history ends in, serialized by the version that applied its last diff
    /// (`empty_by` for a history with no data: the version the model was created under).
    pub fn materialize(
        &mut self,
        model: &str,
        history: History,
        empty_by: ModuleHash,
    ) -> Result<Vec<u8>, ReducerError> {
        let last = history.last_version().unwrap_or(empty_by);
        let checkpoint = self.settle(model, history, last)?;
        self.models(last)?.materialize(model, &checkpoint)
    }
}
