//! Hot reload: reducer versions and the deploy path (the directory watcher that feeds it is
//! [`crate::watch`]).
//!
//! A new module arrives by file ([`crate::watch`]) or by `PUT /v1/reducers/{name}`; both call
//! [`crate::app::App::deploy`]. The module is compiled and checked on the caller's thread
//! (never the fold thread) by [`Deployer::prepare`]: a compatible `statefold:reducer`
//! component, json formats, `restore` of stored checkpoints. Anything that fails is
//! recorded as a refused version with its reason; the running version goes on.
//!
//! A checked module is written to the log as a deploy record
//! ([`crate::model::DEPLOY_HEADER`]) in every partition of each of the reducer's topics.
//! Each partition folds with the new version from its record on, on every replica alike:
//! the log, not the moment a server was told, decides where versions switch. Models move
//! to the new version one by one at their next diff; the fold loop moves the rest between
//! batches ([`crate::fold::Engine::retire`]). Every replica records the version as active
//! in the batch that folds the record ([`Deployer::records`]).
//!
//! Versions are content-addressed (blake3 of the module) and kept in the `reducers` column
//! family: the module bytes of every version that was ever active (past diffs name them),
//! and per reducer name each version's status and times.

use crate::code::Code;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fold::Resolve;
use crate::model::{DEPLOY_CHUNK_HEADER, DEPLOY_MODULE_HEADER, DeployFolded, ModuleHash, VersionRecord, VersionStatus};
use crate::reducer::{LoadError, Reducer, Runtime};
use crate::source::now_ms;
use crate::store::{Store, StoreError};

/// Why a deploy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("no kind uses a reducer named {0:?}")]
    UnknownReducer(String),
    #[error("no stored version {id} of reducer {name:?}")]
    UnknownVersion { name: String, id: String },
    /// Refused: recorded as a refused version. `code` is stable.
    #[error("{message}")]
    Refused { code: Code, message: String },
    #[error("the server is shutting down")]
    Stopped,
    #[error("this server is read-only: deploy through a writable replica")]
    ReadOnly,
    /// The log did not take a deploy record, or this server did not fold it in time.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a deploy did.
#[derive(Debug, Clone)]
pub struct Deployed {
    pub version: VersionRecord,
    /// The version was already active: nothing changed.
    pub unchanged: bool,
    /// Deploy records written (one per partition of each of the reducer's topics).
    pub partitions: usize,
    /// From the deploy records written to this server folding all of them.
    pub took: Duration,
}

/// A deploy that passed its checks, ready to be written to the log.
pub enum Prepared {
    /// The version is already active.
    Unchanged(VersionRecord),
    Ready {
        record: VersionRecord,
        module: Vec<u8>,
        kinds: Vec<Arc<str>>,
    },
}

/// The origin of the version a reducer file gave a kind at its first start.
pub const STARTUP_ORIGIN: &str = "startup";

/// Limits of the deploy path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployLimits {
    /// Stored checkpoints restored into a new version before it is deployed.
    pub check_models_max: usize,
    /// Refused versions remembered per reducer (oldest forgotten first).
    pub refused_kept_max: usize,
    /// Largest deploy record value (within the log's message size limit): a larger module
    /// goes in chunks of this size ([`records`]).
    pub record_bytes_max: usize,
    /// Largest module deployed.
    pub module_bytes_max: usize,
}

/// A record to append: its value and headers.
pub type Append<'a> = (&'a [u8], Vec<(String, Vec<u8>)>);

/// The records that carry `module` to one partition as a deploy, in order: one deploy
/// record with the module as its value when it fits `record_bytes_max`; else its chunks
/// ([`DEPLOY_CHUNK_HEADER`]), then a deploy record naming the module
/// ([`DEPLOY_MODULE_HEADER`]) that every replica folds from them. Each is (value, headers),
/// every one with the deploy's `headers` ([`DEPLOY_HEADER`] among them: a server that does
/// not know chunks refuses each as a module that does not load, and keeps its version).
pub fn records<'a>(module: &'a [u8], headers: &[(String, Vec<u8>)], record_bytes_max: usize) -> Vec<Append<'a>> {
    if module.len() <= record_bytes_max {
        return vec![(module, headers.to_vec())];
    }
    let id = ModuleHash::of(module);
    let count = module.len().div_ceil(record_bytes_max);
    let with = |name: &str, value: String| {
        let mut headers = headers.to_vec();
        headers.push((name.to_owned(), value.into_bytes()));
        headers
    };
    let mut records: Vec<_> = module
        .chunks(record_bytes_max)
        .enumerate()
        .map(|(index, chunk)| (chunk, with(DEPLOY_CHUNK_HEADER, format!("{id} {index} {count}"))))
        .collect();
    records.push((&[][..], with(DEPLOY_MODULE_HEADER, format!("{id} {count}"))));
    records
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

    fn load(&self, module: &[u8]) -> Result<Arc<Reducer>, String> {
        let reducer = match self.runtime.cached(ModuleHash::of(module)) {
            Some(reducer) => reducer,
            None => self.runtime.load(module).map_err(|e| format!("{}: {e}", e.code()))?,
        };
        check_formats(&reducer).map_err(|(code, message)| format!("{code}: {message}"))?;
        Ok(reducer)
    }
}

/// The HTTP API serves json states and diffs only.
fn check_formats(reducer: &Reducer) -> Result<(), (Code, String)> {
    let info = reducer.info();
    if info.diff_format != "json" || info.state_format != "json" {
        let message = format!(
            "the reducer declares {}/{} diffs/states; the HTTP API serves json only",
            info.diff_format, info.state_format
        );
        return Err((Code::UnsupportedFormat, message));
    }
    Ok(())
}

/// The checks of the deploy path, and the records of versions. Writing the deploy records
/// to the log and waiting for them is [`crate::app::App::deploy`].
pub struct Deployer {
    registry: Arc<Registry>,
    /// Reducer name → the kinds it folds.
    names: BTreeMap<String, Vec<Arc<str>>>,
    /// One deploy at a time.
    serial: tokio::sync::Mutex<()>,
    limits: DeployLimits,
}

impl Deployer {
    pub fn new(registry: Arc<Registry>, names: BTreeMap<String, Vec<Arc<str>>>, limits: DeployLimits) -> Deployer {
        Deployer { registry, names, serial: tokio::sync::Mutex::new(()), limits }
    }

    /// The reducer names and the kinds each folds.
    pub fn names(&self) -> &BTreeMap<String, Vec<Arc<str>>> {
        &self.names
    }

    /// Held for the whole of a deploy: one at a time, so deploy records of two deploys
    /// are in the same order in every partition.
    pub async fn serial(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.serial.lock().await
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

    /// The module of a stored version (to deploy it again: a rollback).
    pub fn stored(&self, name: &str, id: &str) -> Result<Vec<u8>, DeployError> {
        let unknown = || DeployError::UnknownVersion { name: name.to_owned(), id: id.to_owned() };
        let hash = ModuleHash::parse(id).ok_or_else(unknown)?;
        // One of this reducer's versions: another reducer's module is stored too, but is
        // no rollback of this one.
        if !self.registry.store.read().versions(name)?.iter().any(|v| v.id == hash) {
            return Err(unknown());
        }
        self.registry.store.module(&hash)?.ok_or_else(unknown)
    }

    /// Checks `module` as the next version of `name`, on the caller's thread (it compiles:
    /// never the fold thread). A refusal is recorded with its reason.
    pub fn prepare(
        &self,
        name: &str,
        module: Vec<u8>,
        origin: &str,
        subject: Option<&str>,
    ) -> Result<Prepared, DeployError> {
        let kinds = self.names.get(name).ok_or_else(|| DeployError::UnknownReducer(name.to_owned()))?.clone();
        let id = ModuleHash::of(&module);
        let now = now_ms();
        let versions = self.registry.store.read().versions(name)?;
        // Active, and every partition of every kind folds with it. (A deploy whose records
        // reached only some partitions, the writer having failed half way, is deployed
        // again: partitions already switched are unaffected.)
        if let Some(active) = versions.iter().find(|v| v.status == VersionStatus::Active)
            && active.id == id
            && self.everywhere(&kinds, id)?
        {
            return Ok(Prepared::Unchanged(active.clone()));
        }
        let first_ms = versions.iter().find(|v| v.id == id).map_or(now, |v| v.first_ms);
        let mut record = VersionRecord {
            name: name.to_owned(),
            id,
            status: VersionStatus::Active,
            refusal: None,
            origin: origin.to_owned(),
            subject: subject.map(str::to_owned),
            declared: None,
            bytes: module.len() as u64,
            first_ms,
            changed_ms: now,
        };
        if module.len() > self.limits.module_bytes_max {
            let message = format!(
                "the module is {} bytes, over reducer_module_bytes_max ({})",
                module.len(),
                self.limits.module_bytes_max
            );
            return self.refuse(record, &versions, Code::TooLarge, message).map(|never| match never {});
        }
        let started = Instant::now();
        let reducer = match self.check(&kinds, &module) {
            Ok(reducer) => reducer,
            Err((code, message)) => return self.refuse(record, &versions, code, message).map(|never| match never {}),
        };
        record.declared = Some((reducer.info().name.clone(), reducer.info().version.clone()));
        tracing::info!(reducer = name, version = %id, checked_ms = started.elapsed().as_millis() as u64, "deploy checked; writing its deploy records to the log");
        Ok(Prepared::Ready { record, module, kinds })
    }

    /// Whether every partition of every kind in `kinds` folds with version `id`.
    fn everywhere(&self, kinds: &[Arc<str>], id: ModuleHash) -> Result<bool, DeployError> {
        let reader = self.registry.store.read();
        for kind in kinds {
            if reader.kind_versions(kind)?.is_none_or(|v| v.in_use() != [id]) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The version records deploy records make active (on every replica that folds them):
    /// the new one active, the one before retired, both changed at the record's timestamp.
    /// A record older than the one that made the active version active (sharded mode: a
    /// partition newly folded from its start, behind the others) changes nothing; its
    /// version, if new here, is recorded retired. Committed with the batch that folds them.
    pub fn records(&self, deploys: &[DeployFolded]) -> Result<Vec<VersionRecord>, DeployError> {
        let mut out = Vec::new();
        let mut seen: Vec<(&str, ModuleHash)> = Vec::new();
        for deploy in deploys {
            if seen.contains(&(&deploy.name, deploy.version)) || !self.names.contains_key(&deploy.name) {
                continue;
            }
            seen.push((&deploy.name, deploy.version));
            let versions = self.registry.store.read().versions(&deploy.name)?;
            let active = versions.iter().find(|v| v.status == VersionStatus::Active);
            if active.is_some_and(|a| a.id == deploy.version) {
                continue;
            }
            let at = deploy.timestamp_ms.unwrap_or_else(now_ms);
            let known = versions.iter().find(|v| v.id == deploy.version);
            let first_ms = known.map_or(at, |v| v.first_ms);
            let record = VersionRecord {
                name: deploy.name.clone(),
                id: deploy.version,
                status: VersionStatus::Active,
                refusal: None,
                origin: deploy.origin.clone(),
                subject: deploy.subject.clone(),
                declared: Some(deploy.declared.clone()),
                bytes: deploy.module.len() as u64,
                first_ms,
                changed_ms: at,
            };
            // (The version recorded at first start, from the file, is not from the log: any
            // deploy record supersedes it.)
            if let Some(active) = active.filter(|a| a.origin != STARTUP_ORIGIN && at < a.changed_ms) {
                tracing::info!(reducer = %deploy.name, version = %deploy.version, active = %active.id, "an older deploy record folded: the active version stays");
                if known.is_none() {
                    out.push(VersionRecord { status: VersionStatus::Retired, ..record });
                }
                continue;
            }
            let mut records = vec![record];
            if let Some(old) = active {
                records.push(VersionRecord { status: VersionStatus::Retired, changed_ms: at, ..old.clone() });
            }
            tracing::info!(reducer = %deploy.name, version = %deploy.version, origin = %deploy.origin, "deployed");
            out.extend(records);
        }
        Ok(out)
    }

    /// Compiles and checks a module for `kinds`; the refusal code and message if it is not fit.
    fn check(&self, kinds: &[Arc<str>], module: &[u8]) -> Result<Arc<Reducer>, (Code, String)> {
        let reducer = self.registry.runtime.load(module).map_err(|e: LoadError| (e.code(), e.to_string()))?;
        check_formats(&reducer)?;
        self.check_restore(kinds, &reducer).map_err(|message| (Code::RestoreFailed, message))?;
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
                    let model = crate::model::ModelKey::new(kind, &id);
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
        code: Code,
        message: String,
    ) -> Result<std::convert::Infallible, DeployError> {
        tracing::warn!(reducer = %record.name, version = %record.id, %code, %message, "deploy refused; the active version goes on");
        record.status = VersionStatus::Refused;
        record.refusal = Some((code.as_str().to_owned(), message.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DEPLOY_HEADER, DeployChunk};

    fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
        headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    #[test]
    fn a_module_larger_than_a_record_goes_in_chunks_that_join_to_it() {
        let headers = vec![(DEPLOY_HEADER.to_owned(), b"totals".to_vec())];
        // Within one record: the module itself.
        let small = vec![1u8; 100];
        let one = records(&small, &headers, 100);
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].0, one[0].1.clone()), (&small[..], headers.clone()));
        // One byte over, and an exact multiple: 2 and 3 chunks, then the deploy record.
        for (len, chunks) in [(101, 2), (300, 3)] {
            let module: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let id = ModuleHash::of(&module);
            let written = records(&module, &headers, 100);
            assert_eq!(written.len(), chunks + 1);
            let mut joined = Vec::new();
            for (index, (value, headers)) in written[..chunks].iter().enumerate() {
                assert!(value.len() <= 100);
                assert_eq!(header(headers, DEPLOY_HEADER), Some(&b"totals"[..]), "a chunk is a deploy record too");
                let parsed = DeployChunk::parse_header(header(headers, DEPLOY_CHUNK_HEADER).unwrap()).unwrap();
                assert_eq!(parsed, (id, index as u32, chunks as u32));
                joined.extend_from_slice(value);
            }
            assert_eq!(joined, module);
            let (value, last) = &written[chunks];
            assert!(value.is_empty() && header(last, DEPLOY_CHUNK_HEADER).is_none());
            let named = DeployChunk::parse_module_header(header(last, DEPLOY_MODULE_HEADER).unwrap()).unwrap();
            assert_eq!(named, (id, chunks as u32));
        }
    }

    #[test]
    fn chunk_headers_that_do_not_parse_are_refused() {
        let id = ModuleHash::of(b"m");
        for bad in [
            "".to_owned(),
            "x 0 1".to_owned(),
            format!("{id} 1 1"),
            format!("{id} 0"),
            format!("{id} 0 1 2"),
            format!("{id} -1 2"),
        ] {
            assert!(DeployChunk::parse_header(bad.as_bytes()).is_err(), "{bad:?}");
        }
        for bad in ["".to_owned(), format!("{id} 0"), format!("{id}"), format!("{id} 2 3")] {
            assert!(DeployChunk::parse_module_header(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert_eq!(DeployChunk::parse_header(format!("{id} 2 3").as_bytes()), Ok((id, 2, 3)));
    }
}
