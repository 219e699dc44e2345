//! The WebAssembly runtime for reducers (wasmtime, component model).
//!
//! One [`Runtime`] per process holds the `Engine`, the `Linker` (locked-down WASI plus the
//! `meter` import) and the compiled-code cache keyed by the module's blake3. Loading a
//! component checks that it is a compatible `statefold:reducer` and yields a [`Reducer`]
//! (one version: what it declares, and its `InstancePre` behind the core's
//! [`Instantiate`]); the core's [`Models`] keeps models' states resident in one instance of
//! it, through [`wasm::WasmGuest`].

mod bindings;
mod inspect;
mod sandbox;
mod wasm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

pub use statefold_core::reducer::*;

use statefold_core::code::Code;

use sandbox::GuestData;

use statefold_core::model::ModuleHash;

/// The version of the `statefold:reducer` WIT package this host speaks.
pub const WIT_VERSION: semver::Version = semver::Version::new(0, 2, 0);
/// Every version it loads reducers of: the current one and those before it.
pub use bindings::WIT_VERSIONS;
const REDUCER_INTERFACE: &str = "statefold:reducer/reducer";

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
    pub fn code(&self) -> Code {
        match self {
            LoadError::Read { .. } => Code::Unreadable,
            LoadError::NotWasm => Code::NotWasm,
            LoadError::CoreModule => Code::CoreModule,
            LoadError::Truncated { .. } => Code::Truncated,
            LoadError::Invalid(_) => Code::InvalidComponent,
            LoadError::WrongWorld { .. } => Code::WrongWorld,
            LoadError::IncompatibleVersion { .. } => Code::IncompatibleVersion,
            LoadError::Contract(_) => Code::ContractMismatch,
            LoadError::Imports(_) => Code::UnsupportedImports,
            LoadError::Describe(_) => Code::DescribeFailed,
        }
    }
}

/// The process-wide reducer runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestData>,
    limits: ReducerLimits,
    compiled: Mutex<HashMap<ModuleHash, Arc<Reducer>>>,
    cache_dir: Option<PathBuf>,
    natives: Natives,
    call_timer: Option<CallTimer>,
}

/// Native stand-ins by module, for benchmarks (see [`Native`]).
pub type Natives = HashMap<ModuleHash, Arc<dyn Native>>;

impl Runtime {
    /// Builds the engine and linker. `cache_dir`, if given, keeps compiled code across
    /// restarts (`<blake3>-<engine>.cwasm`).
    pub fn new(limits: ReducerLimits, cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        limits.validate()?;
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
            call_timer: None,
        })
    }

    /// Tells `timer` the time of every `apply` call of the reducers it loads from now on
    /// (the server's `statefold_reducer_call_seconds`).
    pub fn with_call_timer(mut self, timer: CallTimer) -> Runtime {
        self.call_timer = Some(timer);
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
        let instances: Arc<dyn Instantiate> = match self.natives.get(&id) {
            Some(native) => {
                tracing::warn!(reducer = %id, "running natively: no sandbox, no fuel, no memory cap");
                Arc::new(Natively(native.clone()))
            }
            None => Arc::new(wasm::Component { pre, engine: self.engine.clone() }),
        };
        let reducer = Reducer::new(id, info, self.limits.clone(), instances);
        let reducer = Arc::new(match &self.call_timer {
            Some(timer) => reducer.with_call_timer(timer.clone()),
            None => reducer,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated_before_the_engine_is_built() {
        let tiny = ReducerLimits { memory_bytes_max: 1000, ..ReducerLimits::default() };
        let err = Runtime::new(tiny, None).err().expect("refused");
        assert!(err.to_string().contains("at least 1 MiB"), "{err}");
    }
}
