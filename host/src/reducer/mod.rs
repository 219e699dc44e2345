//! The WebAssembly runtime for reducers (wasmtime, component model).
//!
//! One [`Runtime`] per process holds the `Engine`, the `Linker` (locked-down WASI plus the
//! `meter` import) and the compiled-code cache keyed by the module's blake3. Loading a
//! component checks that it is a compatible `statefold:reducer` and yields a [`Reducer`]
//! (one version: an `InstancePre` plus what it declares). [`Models`] keeps models' states
//! resident in one instance of it.

mod bindings;
mod inspect;
mod models;
mod native;
mod sandbox;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::histogram::Histogram;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store};

pub use models::{Checkpoints, Composed, MemoryCheckpoints, Models, Outcome};
pub use native::{Native, NativeModel};

use sandbox::GuestData;

use crate::model::ModuleHash;

/// The version of the `statefold:reducer` WIT package this host speaks.
pub const WIT_VERSION: semver::Version = semver::Version::new(0, 2, 0);
/// Every version it loads reducers of: the current one and those before it.
pub const WIT_VERSIONS: [&str; 2] = ["0.1.0", "0.2.0"];
const REDUCER_INTERFACE: &str = "statefold:reducer/reducer";

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

impl ReducerLimits {
    /// Checks that the limits make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.memory_bytes_max < 1 << 20 {
            return Err("reducer_memory_bytes_max must be at least 1 MiB".into());
        }
        if self.resident_bytes_max >= self.memory_bytes_max as u64 {
            return Err(format!(
                "reducer_resident_bytes_max ({}) must be below reducer_memory_bytes_max ({})",
                self.resident_bytes_max, self.memory_bytes_max
            ));
        }
        if self.diff_fuel_max == 0 || self.call_fuel_max == 0 {
            return Err("reducer fuel limits must be positive".into());
        }
        if self.resident_models_max == 0 {
            return Err("reducer_resident_models_max must be positive".into());
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

/// Why a file cannot be loaded as a reducer.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("not a WebAssembly file (no \\0asm header)")]
    NotWasm,
    #[error(
        "a core WebAssembly module, not a component: build the reducer for wasm32-wasip2 \
         (`cargo build --target wasm32-wasip2 --release`), or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("the file ends inside a section after {bytes} bytes: cut short (half-written or truncated)")]
    Truncated { bytes: usize },
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error("wrong world: the component does not export {REDUCER_INTERFACE} (it exports: {exports})")]
    WrongWorld { exports: String },
    #[error(
        "incompatible version: the component was built against {REDUCER_INTERFACE}@{found}, this host speaks {supported} and loads components built against 0.1.x or 0.2.x"
    )]
    IncompatibleVersion { found: semver::Version, supported: semver::Version },
    #[error("the component's {REDUCER_INTERFACE} export does not match the contract: {0}")]
    Contract(String),
    #[error("imports that the sandbox does not provide: {0}")]
    Imports(String),
    #[error("describe failed: {0}")]
    Describe(String),
}

impl LoadError {
    /// A stable machine-readable code for each reason.
    pub fn code(&self) -> &'static str {
        match self {
            LoadError::Read { .. } => "unreadable",
            LoadError::NotWasm => "not_wasm",
            LoadError::CoreModule => "core_module",
            LoadError::Truncated { .. } => "truncated",
            LoadError::Invalid(_) => "invalid_component",
            LoadError::WrongWorld { .. } => "wrong_world",
            LoadError::IncompatibleVersion { .. } => "incompatible_version",
            LoadError::Contract(_) => "contract_mismatch",
            LoadError::Imports(_) => "unsupported_imports",
            LoadError::Describe(_) => "describe_failed",
        }
    }
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

/// The process-wide reducer runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestData>,
    limits: ReducerLimits,
    compiled: Mutex<HashMap<ModuleHash, Arc<Reducer>>>,
    cache_dir: Option<PathBuf>,
    natives: Natives,
    call_seconds: Histogram,
}

/// Native stand-ins by module, for benchmarks (see [`Native`]).
pub type Natives = HashMap<ModuleHash, Arc<dyn Native>>;

impl Runtime {
    /// Builds the engine and linker. `cache_dir`, if given, keeps compiled code across
    /// restarts (`<blake3>-<engine>.cwasm`).
    pub fn new(limits: ReducerLimits, cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        limits.validate().map_err(anyhow::Error::msg)?;
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(true);
        config.cranelift_nan_canonicalization(true);
        config.relaxed_simd_deterministic(true);
        config.parallel_compilation(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        sandbox::link(&mut linker)?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Runtime {
            engine,
            linker,
            limits,
            compiled: Mutex::new(HashMap::new()),
            cache_dir,
            natives: Natives::new(),
            call_seconds: Histogram::new([]),
        })
    }

    /// Records the time of every `apply` call of the reducers it loads from now on.
    pub fn with_call_seconds(mut self, call_seconds: Histogram) -> Runtime {
        self.call_seconds = call_seconds;
        self
    }

    /// Runs the modules in `natives` through their native stand-ins (benchmarks only).
    pub fn with_natives(mut self, natives: Natives) -> Runtime {
        self.natives = natives;
        self
    }

    pub fn limits(&self) -> &ReducerLimits {
        &self.limits
    }

    /// A version loaded before, if this process still holds it.
    pub fn cached(&self, id: ModuleHash) -> Option<Arc<Reducer>> {
        self.compiled.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Loads a reducer from a file; see [`Runtime::load`].
    pub fn load_file(&self, path: &Path) -> Result<Arc<Reducer>, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        self.load(&bytes)
    }

    /// Checks, compiles (or takes from the cache) and describes a reducer component.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Reducer>, LoadError> {
        let id = ModuleHash::of(bytes);
        if let Some(reducer) = self.compiled.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(reducer.clone());
        }
        inspect::check_header(bytes)?;
        let component = self.compile(id, bytes)?;
        let (wit_version, imports) = inspect::check_world(&self.engine, &component)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::Imports(format!("{e:#}")))?;
        let pre = bindings::GuestPre::new(wit_version.minor, pre).map_err(|e| LoadError::Contract(format!("{e:#}")))?;
        let info = inspect::describe(&pre, &self.limits, wit_version, imports)?;
        let native = self.natives.get(&id).cloned();
        if native.is_some() {
            tracing::warn!(reducer = %id, "running natively: no sandbox, no fuel, no memory cap");
        }
        let reducer = Arc::new(Reducer {
            id,
            info,
            wasm: Some((pre, self.engine.clone())),
            limits: self.limits.clone(),
            native,
            call_seconds: self.call_seconds.clone(),
        });
        self.compiled.lock().unwrap_or_else(|p| p.into_inner()).insert(id, reducer.clone());
        Ok(reducer)
    }

    fn compile(&self, id: ModuleHash, bytes: &[u8]) -> Result<Component, LoadError> {
        let cached = self.cache_dir.as_ref().map(|dir| {
            let mut engine_hash = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut engine_hash);
            dir.join(format!("{id}-{:016x}.cwasm", std::hash::Hasher::finish(&engine_hash)))
        });
        if let Some(path) = &cached
            && path.exists()
        {
            // SAFETY: the file was written by `Component::serialize` of this same engine
            // configuration (its compatibility hash is in the name) into a directory
            // Statefold owns; wasmtime still checks the header and engine settings.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unusable compiled-code cache entry")
                }
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        if let Some(path) = &cached {
            let written =
                component.serialize().map_err(std::io::Error::other).and_then(|code| write_atomically(path, &code));
            if let Err(e) = written {
                // The cache only saves compile time; a failed write costs nothing else.
                tracing::warn!(path = %path.display(), error = %e, "cannot write compiled-code cache entry");
            }
        }
        Ok(component)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// One loaded reducer version.
pub struct Reducer {
    id: ModuleHash,
    info: ReducerInfo,
    /// The compiled component, ready to instantiate (`None`: a native-only reducer).
    wasm: Option<(bindings::GuestPre<GuestData>, Engine)>,
    limits: ReducerLimits,
    /// Runs the calls in place of the component (benchmarks, the engine's unit tests).
    native: Option<Arc<dyn Native>>,
    /// Time of each `apply` call (`statefold_reducer_call_seconds`).
    call_seconds: Histogram,
}

impl Reducer {
    /// A reducer with no module: `native` answers every call, `info` stands for what it
    /// would declare, `id` names the version. For tests of what drives reducers (the fold
    /// engine) without compiling wasm; never a way to run untrusted code (no sandbox).
    pub fn native(id: ModuleHash, info: ReducerInfo, native: Arc<dyn Native>) -> Arc<Reducer> {
        Arc::new(Reducer {
            id,
            info,
            wasm: None,
            limits: ReducerLimits::default(),
            native: Some(native),
            call_seconds: Histogram::new([]),
        })
    }

    /// blake3 of the module: this version's identity.
    pub fn id(&self) -> ModuleHash {
        self.id
    }

    pub fn info(&self) -> &ReducerInfo {
        &self.info
    }

    /// A fresh set of resident models on this reducer (one instance, created lazily).
    pub fn models(self: &Arc<Self>) -> Models {
        Models::new(self.clone())
    }

    /// A store and an instance of the component, with `fuel`.
    fn instantiate(&self, fuel: u64) -> wasmtime::Result<(Store<GuestData>, bindings::Guest)> {
        let (pre, engine) = self.wasm.as_ref().expect("a reducer without native calls has a module");
        let mut store = Store::new(engine, GuestData::new(&self.limits));
        store.limiter(|data| &mut data.limiter);
        store.set_fuel(fuel)?;
        let guest = pre.instantiate(&mut store)?;
        Ok((store, guest))
    }

    fn label(&self) -> String {
        format!("{}@{}", self.info.name, self.info.version)
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
        assert_eq!(tiny.validate(), Err("reducer_memory_bytes_max must be at least 1 MiB".into()));
        let inverted =
            ReducerLimits { resident_bytes_max: 1 << 30, memory_bytes_max: 1 << 29, ..ReducerLimits::default() };
        assert!(inverted.validate().unwrap_err().contains("must be below reducer_memory_bytes_max"));
        assert!(ReducerLimits { diff_fuel_max: 0, ..ReducerLimits::default() }.validate().is_err());
        assert!(ReducerLimits { resident_models_max: 0, ..ReducerLimits::default() }.validate().is_err());
        let err = Runtime::new(tiny, None).err().expect("refused");
        assert!(err.to_string().contains("at least 1 MiB"), "{err}");
    }
}
