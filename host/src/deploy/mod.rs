//! Hot reload: reducer versions, the deploy path and the reducers-directory watcher.
//!
//! A new module arrives by file ([`watch`]) or by `PUT /v1/reducers/{name}`; both call
//! [`Deployer::deploy`]. The module is compiled and checked on the caller's thread (never
//! the fold thread): a compatible `statefold:reducer` component, json formats, and
//! `restore` of stored checkpoints. Then the fold thread moves the resident models to it in
//! steps between batches while the old version folds, switches at one batch boundary
//! ([`crate::fold::Engine::begin_swap`], [`crate::fold::Engine::continue_swap`]) and
//! commits the version records. Anything that fails is recorded as a refused version with
//! its reason; the running version goes on.
//!
//! Versions are content-addressed (blake3 of the module) and kept in the `reducers` column
//! family: the module bytes of every version that was ever active (past diffs name them),
//! and per reducer name each version's status and times.

pub mod watch;

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fold::{Resolve, SwapError};
use crate::reducer::{LoadError, ModuleHash, Reducer, Runtime};
use crate::source::now_ms;
use crate::store::{Store, StoreError};

/// Where a version stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionStatus {
    /// Folding the reducer's kinds now.
    Active,
    /// Was active; its module is kept (stored diffs name it; deploy it again to roll back).
    Retired,
    /// A deploy that did not happen.
    Refused,
}

impl VersionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Active => "active",
            VersionStatus::Retired => "retired",
            VersionStatus::Refused => "refused",
        }
    }
}

/// One version of a reducer, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// The reducer's name: its file name in the reducers directory without `.wasm`.
    pub name: String,
    pub id: ModuleHash,
    pub status: VersionStatus,
    /// Why it was refused: (code, message).
    pub refusal: Option<(String, String)>,
    /// How it arrived: `startup`, `directory`, `http`.
    pub origin: String,
    /// What the module declares (`describe`): (name, version).
    pub declared: Option<(String, String)>,
    pub bytes: u64,
    /// When this version was first seen, and when its status last changed (ms since epoch).
    pub first_ms: i64,
    pub changed_ms: i64,
}

/// Why a deploy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("no kind uses a reducer named {0:?}")]
    UnknownReducer(String),
    #[error("no stored version {id} of reducer {name:?}")]
    UnknownVersion { name: String, id: String },
    /// Refused: recorded as a refused version. `code` is stable.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    #[error("the fold loop is not running")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a deploy did.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub version: VersionRecord,
    /// The version was already active: nothing changed.
    pub unchanged: bool,
    /// Resident models moved to the new instance.
    pub moved: usize,
    /// How long folding paused for the swap.
    pub pause: Duration,
}

/// A version for the fold thread to swap in (resident models moved in steps between
/// batches, then one switch).
pub struct Swap {
    pub kinds: Vec<Arc<str>>,
    pub reducer: Arc<Reducer>,
    /// Written once the engine has swapped: the new version active, the old one retired.
    pub records: Vec<VersionRecord>,
    pub module: Vec<u8>,
    pub reply: SyncSender<Result<(usize, Duration), SwapError>>,
}

/// Limits of the deploy path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployLimits {
    /// Stored checkpoints restored into a new version before it is swapped in.
    pub check_models_max: usize,
    /// Refused versions remembered per reducer (oldest forgotten first).
    pub refused_kept_max: usize,
}

/// Finds versions by id: the process's compile cache, else the stored module.
pub struct Registry {
    pub runtime: Arc<Runtime>,
    pub store: Arc<Store>,
}

impl Resolve for Registry {
    fn reducer(&self, id: ModuleHash) -> Result<Arc<Reducer>, String> {
        if let Some(reducer) = self.runtime.cached(id) {
            return Ok(reducer);
        }
        let bytes = self.store.module(&id).map_err(|e| e.to_string())?;
        let bytes = bytes.ok_or_else(|| format!("module {id} is not in the store"))?;
        self.runtime.load(&bytes).map_err(|e| e.to_string())
    }
}

/// The one deploy path.
pub struct Deployer {
    registry: Arc<Registry>,
    /// Reducer name → the kinds it folds.
    names: BTreeMap<String, Vec<Arc<str>>>,
    swaps: SyncSender<Swap>,
    /// One deploy at a time.
    serial: Mutex<()>,
    limits: DeployLimits,
}

impl Deployer {
    /// A deployer and the receiving end of its swaps, for the fold loop.
    pub fn new(
        registry: Arc<Registry>,
        names: BTreeMap<String, Vec<Arc<str>>>,
        limits: DeployLimits,
    ) -> (Deployer, Receiver<Swap>) {
        let (swaps, receiver) = sync_channel(1);
        (Deployer { registry, names, swaps, serial: Mutex::new(()), limits }, receiver)
    }

    /// The reducer names and the kinds each folds.
    pub fn names(&self) -> &BTreeMap<String, Vec<Arc<str>>> {
        &self.names
    }

    /// Every recorded version of `name`, most recently changed first.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, DeployError> {
        if !self.names.contains_key(name) {
            return Err(DeployError::UnknownReducer(name.to_owned()));
        }
        let mut versions = self.registry.store.read().versions(name)?;
        versions.sort_by(|a, b| {
            (b.status == VersionStatus::Active, b.changed_ms).cmp(&(a.status == VersionStatus::Active, a.changed_ms))
        });
        Ok(versions)
    }

    /// Deploys a stored version again (a rollback).
    pub fn redeploy(&self, name: &str, id: &str, origin: &str) -> Result<Deployed, DeployError> {
        let unknown = || DeployError::UnknownVersion { name: name.to_owned(), id: id.to_owned() };
        let hash = hex::decode(id).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(unknown)?;
        let bytes = self.registry.store.module(&ModuleHash(hash))?.ok_or_else(unknown)?;
        self.deploy(name, bytes, origin)
    }

    /// Checks `module` and makes it the active version of `name`, or refuses it (recorded,
    /// with its reason) and changes nothing.
    pub fn deploy(&self, name: &str, module: Vec<u8>, origin: &str) -> Result<Deployed, DeployError> {
        let kinds = self.names.get(name).ok_or_else(|| DeployError::UnknownReducer(name.to_owned()))?.clone();
        let _serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let id = ModuleHash::of(&module);
        let now = now_ms();
        let versions = self.registry.store.read().versions(name)?;
        let active = versions.iter().find(|v| v.status == VersionStatus::Active).cloned();
        if let Some(active) = &active
            && active.id == id
        {
            return Ok(Deployed { version: active.clone(), unchanged: true, moved: 0, pause: Duration::ZERO });
        }
        let first_ms = versions.iter().find(|v| v.id == id).map_or(now, |v| v.first_ms);
        let mut record = VersionRecord {
            name: name.to_owned(),
            id,
            status: VersionStatus::Active,
            refusal: None,
            origin: origin.to_owned(),
            declared: None,
            bytes: module.len() as u64,
            first_ms,
            changed_ms: now,
        };
        let started = Instant::now();
        let reducer = match self.check(&kinds, &module) {
            Ok(reducer) => reducer,
            Err((code, message)) => return self.refuse(record, &versions, code, message),
        };
        record.declared = Some((reducer.info().name.clone(), reducer.info().version.clone()));
        tracing::info!(reducer = name, version = %id, checked_ms = started.elapsed().as_millis() as u64, "deploy checked; swapping at the next batch boundary");
        let mut records = vec![record.clone()];
        if let Some(mut old) = active {
            old.status = VersionStatus::Retired;
            old.changed_ms = now;
            records.push(old);
        }
        let (reply, answer) = sync_channel(1);
        let swap = Swap { kinds, reducer, records, module, reply };
        self.swaps.send(swap).map_err(|_| DeployError::Stopped)?;
        match answer.recv().map_err(|_| DeployError::Stopped)? {
            Ok((moved, pause)) => {
                tracing::info!(reducer = name, version = %id, moved, pause_ms = pause.as_secs_f64() * 1e3, "deployed");
                Ok(Deployed { version: record, unchanged: false, moved, pause })
            }
            Err(e) => self.refuse(
                record,
                &versions,
                "restore_failed",
                format!("a live model cannot move to this version: {e}"),
            ),
        }
    }

    /// Compiles and checks a module for `kinds`; the refusal code and message if it is not fit.
    fn check(&self, kinds: &[Arc<str>], module: &[u8]) -> Result<Arc<Reducer>, (&'static str, String)> {
        let reducer = self.registry.runtime.load(module).map_err(|e: LoadError| (e.code(), e.to_string()))?;
        let info = reducer.info();
        if info.diff_format != "json" || info.state_format != "json" {
            let message = format!(
                "the reducer declares {}/{} diffs/states; the HTTP API serves json only",
                info.diff_format, info.state_format
            );
            return Err(("unsupported_format", message));
        }
        self.check_restore(kinds, &reducer).map_err(|message| ("restore_failed", message))?;
        Ok(reducer)
    }

    /// Restores stored checkpoints (up to `check_models_max`) into a scratch instance of
    /// the new version, off the fold thread: a version that cannot read the live states is
    /// refused before folding pauses for it. Resident models are checked again at the swap.
    fn check_restore(&self, kinds: &[Arc<str>], reducer: &Arc<Reducer>) -> Result<(), String> {
        let mut scratch = reducer.models();
        let mut checked = 0;
        let reader = self.registry.store.read();
        for kind in kinds {
            let mut after: Option<String> = None;
            while checked < self.limits.check_models_max {
                let page = reader.list(kind, after.as_deref(), 256).map_err(|e| e.to_string())?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                for (id, head) in page {
                    let Some((_, offset)) = head.checkpoint() else { continue };
                    let model = crate::fold::ModelKey::new(kind, &id);
                    let history = reader.checkpoint_for(&model, &head, offset).map_err(|e| e.to_string())?;
                    let Some(snapshot) = history.checkpoint.snapshot else { continue };
                    scratch
                        .adopt(&id, &snapshot)
                        .and_then(|()| scratch.forget(&id))
                        .map_err(|e| format!("kind {kind}, model {id:?}: {e}"))?;
                    checked += 1;
                }
            }
        }
        Ok(())
    }

    fn refuse(
        &self,
        mut record: VersionRecord,
        versions: &[VersionRecord],
        code: &'static str,
        message: String,
    ) -> Result<Deployed, DeployError> {
        tracing::warn!(reducer = %record.name, version = %record.id, code, %message, "deploy refused; the active version goes on");
        record.status = VersionStatus::Refused;
        record.refusal = Some((code.to_owned(), message.clone()));
        let known = versions.iter().any(|v| v.id == record.id && v.status != VersionStatus::Refused);
        if !known {
            // A version that was active once keeps its record as retired.
            self.registry.store.put_versions(std::slice::from_ref(&record), None)?;
            let mut refused: Vec<&VersionRecord> =
                versions.iter().filter(|v| v.status == VersionStatus::Refused && v.id != record.id).collect();
            refused.sort_by_key(|v| std::cmp::Reverse(v.changed_ms));
            let forget: Vec<ModuleHash> =
                refused.iter().skip(self.limits.refused_kept_max.saturating_sub(1)).map(|v| v.id).collect();
            self.registry.store.delete_versions(&record.name, &forget)?;
        }
        Err(DeployError::Refused { code, message })
    }
}
