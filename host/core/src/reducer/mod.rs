//! Reducers as the fold engine sees them: a version ([`Reducer`]: its id, what it declares,
//! its limits) whose instances ([`Guest`]) hold models and apply diffs to them.
//!
//! How an instance runs is not this crate's business: the host's runtime implements
//! [`Instantiate`] and [`Guest`] over wasmtime, and [`Native`] stands a reducer's logic
//! compiled into the host in its place (benchmarks, the engine's tests). Everything above
//! those calls (batches, trap isolation, rebuilds, the eviction budget, the hash chain)
//! is [`Models`], the same for both.

mod guest;
mod models;
mod native;

use std::fmt;
use std::sync::Arc;

pub use guest::{Applied, Guest, Handle, Instantiate, Trap};
pub use models::{Checkpoints, Composed, MemoryCheckpoints, Models, Outcome, Stats};
pub use native::{Native, NativeModel, Natively};

use crate::model::ModuleHash;

/// Limits on every reducer instance. Each has a default; all are configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReducerLimits {
    /// Linear memory cap of one instance; growing past it traps that instance.
    pub memory_bytes_max: usize,
    /// CPU budget of one diff, in wasmtime fuel (about one unit per wasm instruction).
    pub diff_fuel_max: u64,
    /// CPU budget of any other call (snapshot, restore, merge, delta, describe).
    pub call_fuel_max: u64,
    /// Guest heap an instance may hold before cold models are snapshotted and evicted.
    pub resident_bytes_max: u64,
    /// Models resident in one instance before cold ones are evicted.
    pub resident_models_max: usize,
    /// How much of the guest's stderr is kept for error messages.
    pub stderr_bytes_max: usize,
    /// Reactions one diff may emit; one more traps (fails) that diff.
    pub reactions_per_diff_max: usize,
    /// Bytes of one reaction (key, value, headers); more traps (fails) the diff.
    pub reaction_bytes_max: usize,
}

impl Default for ReducerLimits {
    fn default() -> Self {
        ReducerLimits {
            memory_bytes_max: 512 << 20,
            diff_fuel_max: 100_000_000,
            call_fuel_max: 4_000_000_000,
            resident_bytes_max: 256 << 20,
            resident_models_max: 100_000,
            stderr_bytes_max: 4096,
            reactions_per_diff_max: 64,
            reaction_bytes_max: 1 << 20,
        }
    }
}

/// Why a set of [`ReducerLimits`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidLimits(pub String);

impl ReducerLimits {
    /// Checks that the limits make sense together.
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        let invalid = |reason: String| Err(InvalidLimits(reason));
        if self.memory_bytes_max < 1 << 20 {
            return invalid("reducer_memory_bytes_max must be at least 1 MiB".into());
        }
        if self.resident_bytes_max >= self.memory_bytes_max as u64 {
            return invalid(format!(
                "reducer_resident_bytes_max ({}) must be below reducer_memory_bytes_max ({})",
                self.resident_bytes_max, self.memory_bytes_max
            ));
        }
        if self.diff_fuel_max == 0 || self.call_fuel_max == 0 {
            return invalid("reducer fuel limits must be positive".into());
        }
        if self.resident_models_max == 0 {
            return invalid("reducer_resident_models_max must be positive".into());
        }
        Ok(())
    }
}

/// What a reducer declares about itself (`describe`), plus what the host found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReducerInfo {
    pub name: String,
    pub version: String,
    pub diff_format: String,
    pub state_format: String,
    pub merge: bool,
    pub delta: bool,
    /// The `statefold:reducer` version the component was built against.
    pub wit_version: semver::Version,
    /// Interfaces the component imports (WASI, the meter).
    pub imports: Vec<String>,
}

/// Why a call into a reducer failed. Each fails only the call (and, for traps, that
/// instance); other models and reducers go on.
#[derive(Debug, thiserror::Error)]
pub enum ReducerError {
    /// The guest trapped, ran out of its CPU budget, or hit its memory cap. The instance
    /// was discarded; the next call works on a fresh one.
    #[error("reducer {reducer} trapped in {during}: {reason}")]
    Trap { reducer: String, during: &'static str, reason: String },
    /// The guest returned something the contract forbids. The instance was discarded.
    #[error("reducer {reducer} broke the contract in {during}: {reason}")]
    Contract { reducer: String, during: &'static str, reason: String },
    /// The guest could not restore a model from its snapshot.
    #[error("reducer {reducer} cannot restore model {model:?}: {reason}")]
    Restore { reducer: String, model: String, reason: String },
    /// Replaying stored diffs did not reproduce what was applied before.
    #[error("replaying model {model:?} diverged at offset {offset}: {reason}")]
    Diverged { model: String, offset: u64, reason: String },
    /// The guest answered a merge or delta with an error.
    #[error("reducer {reducer} refused {during}: {reason}")]
    Refused { reducer: String, during: &'static str, reason: String },
    /// The reducer does not declare this capability.
    #[error("reducer {reducer} does not support {capability}")]
    Unsupported { reducer: String, capability: &'static str },
    /// Loading or saving a checkpoint failed.
    #[error("checkpoint store failed for model {model:?}: {source}")]
    Checkpoints { model: String, source: Box<dyn std::error::Error + Send + Sync> },
    /// Creating an instance failed.
    #[error("cannot instantiate reducer {reducer}: {reason}")]
    Instantiate { reducer: String, reason: String },
}

/// Told the time of every `apply` call, in seconds (the runtime's histogram).
pub type CallTimer = Arc<dyn Fn(f64) + Send + Sync>;

/// One loaded reducer version: its identity, what it declares, its limits, and what makes
/// its instances.
pub struct Reducer {
    id: ModuleHash,
    info: ReducerInfo,
    limits: ReducerLimits,
    instances: Arc<dyn Instantiate>,
    call_timer: Option<CallTimer>,
}

impl Reducer {
    /// Version `id`, whose instances `instances` makes.
    pub fn new(id: ModuleHash, info: ReducerInfo, limits: ReducerLimits, instances: Arc<dyn Instantiate>) -> Reducer {
        Reducer { id, info, limits, instances, call_timer: None }
    }

    /// Tells `timer` the time of every `apply` call.
    pub fn with_call_timer(mut self, timer: CallTimer) -> Reducer {
        self.call_timer = Some(timer);
        self
    }

    /// A reducer with no module: `native` answers every call, `info` stands for what it
    /// would declare, `id` names the version. For tests of what drives reducers (the fold
    /// engine) without compiling wasm; never a way to run untrusted code (no sandbox).
    pub fn native(id: ModuleHash, info: ReducerInfo, native: Arc<dyn Native>) -> Arc<Reducer> {
        Arc::new(Reducer::new(id, info, ReducerLimits::default(), Arc::new(Natively(native))))
    }

    /// blake3 of the module: this version's identity.
    pub fn id(&self) -> ModuleHash {
        self.id
    }

    pub fn info(&self) -> &ReducerInfo {
        &self.info
    }

    pub fn limits(&self) -> &ReducerLimits {
        &self.limits
    }

    /// A fresh set of resident models on this reducer (one instance, created lazily).
    pub fn models(self: &Arc<Self>) -> Models {
        Models::new(self.clone())
    }

    /// `name@version`, for messages.
    pub fn label(&self) -> String {
        format!("{}@{}", self.info.name, self.info.version)
    }

    fn instantiate(&self) -> Result<Box<dyn Guest>, Trap> {
        self.instances.instantiate(&self.limits)
    }

    fn observe_call(&self, seconds: f64) {
        if let Some(timer) = &self.call_timer {
            timer(seconds);
        }
    }
}

impl fmt::Debug for Reducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reducer").field("id", &self.id).field("info", &self.info).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated_together() {
        assert_eq!(ReducerLimits::default().validate(), Ok(()));
        let tiny = ReducerLimits { memory_bytes_max: 1000, ..ReducerLimits::default() };
        assert_eq!(tiny.validate(), Err(InvalidLimits("reducer_memory_bytes_max must be at least 1 MiB".into())));
        let inverted =
            ReducerLimits { resident_bytes_max: 1 << 30, memory_bytes_max: 1 << 29, ..ReducerLimits::default() };
        assert!(inverted.validate().unwrap_err().0.contains("must be below reducer_memory_bytes_max"));
        assert!(ReducerLimits { diff_fuel_max: 0, ..ReducerLimits::default() }.validate().is_err());
        assert!(ReducerLimits { resident_models_max: 0, ..ReducerLimits::default() }.validate().is_err());
    }
}
