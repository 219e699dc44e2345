//! The service behind the HTTP API: versions, states, catch-up plans and appends, over the
//! store, the reducers and the log. Blocking (RocksDB, wasm): the API calls it from
//! `spawn_blocking`. Wire formats are the API's business, not this module's.

mod deploys;
mod error;
mod reads;
mod writes;

use deploys::deploy_headers;
pub use error::AppError;
use reads::StateCache;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::chain::Hash;
use crate::config::Limits;
pub use crate::config::RouteMode;
use crate::deploy::{DeployError, Deployed, Deployer, Prepared};
use crate::fold::Versions;
use crate::fold::{CatchUp, plan_catch_up};
use crate::hub::{Full, Hub, Subscription};
use crate::metrics::{Gauges, Metrics};
use crate::model::{
    Applied, CREATE_HEADER, DEPLOY_HEADER, DEPLOY_ORIGIN_HEADER, DEPLOY_PARTITIONS_HEADER, Head, Keyed, KindVersions,
    ModelKey, ModuleHash, REPLAY_HEADER, Rejection, ReplayJob, SUBJECT_HEADER, VersionRecord, VersionStatus,
    partition_of,
};
use crate::reducer::ReducerError;
use crate::source::attest::Replicas;
use crate::source::cluster::Cluster;
pub use crate::source::cluster::{ClusterView, Route};
use crate::source::relay::Relay;
use crate::source::{PartitionStatus, SourceStatus, WriteError, Writer};
use crate::store::{HashAt, Reader, Store, StoreError, StoredRejection};

/// Sharded listing: the partitions each server lists (`None`: this one, else its URL).
pub type ListSources = BTreeMap<Option<String>, Vec<u32>>;

/// The module a deploy installs.
pub enum Module {
    Bytes(Vec<u8>),
    /// A stored version, by id (a rollback).
    Stored(String),
}

/// A kind being served.
pub struct Kind {
    pub name: Arc<str>,
    pub topic: Arc<str>,
    /// The reducer's name (its versions are deployed under it).
    pub reducer: String,
    /// Instances for reads (materializing past versions, merge, delta), apart from the
    /// fold engine's so that reads never stall folding; one per version read.
    readers: Mutex<Versions>,
}

impl Kind {
    pub fn new(name: &str, topic: &str, reducer: &str, readers: Versions) -> Kind {
        Kind { name: name.into(), topic: topic.into(), reducer: reducer.to_owned(), readers: Mutex::new(readers) }
    }
}

/// Process status: readiness, fatal failure, the stop signal. Counters are in
/// [`Metrics`].
#[derive(Default)]
pub struct Status {
    pub caught_up: AtomicBool,
    fatal: Mutex<Option<String>>,
    /// Why the store stopped taking writes (disk full, an I/O error), once it has.
    unwritable: Mutex<Option<String>>,
    pub stop: CancellationToken,
}

impl Status {
    /// The store failed a write (ENOSPC, EIO): RocksDB takes no more writes until it is
    /// reopened. Folding stops (nothing is acknowledged past what was committed), writes
    /// answer 503 `store_unwritable`, reads go on, `/readyz` says why. A restart, once
    /// the disk has room, continues from the last commit.
    pub fn unwritable(&self, reason: String) {
        let mut slot = self.unwritable.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(%reason, "the store cannot write: folding stops, writes are refused; restart once the disk has room");
            *slot = Some(reason);
        }
    }

    pub fn unwritable_reason(&self) -> Option<String> {
        self.unwritable.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the process: a bug or corruption was found.
    pub fn fatal(&self, reason: String) {
        tracing::error!(%reason, "fatal: stopping");
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(reason);
        self.stop.cancel();
    }

    pub fn fatal_reason(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a client's hash is replaced by a snapshot (the SSE `reset` event's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// Not a version of this model (made up, from before a replay, or not folded here yet).
    Unknown,
    /// A version no longer retained.
    Pruned,
}

impl Reset {
    pub fn as_str(self) -> &'static str {
        match self {
            Reset::Unknown => "unknown",
            Reset::Pruned => "pruned",
        }
    }
}

/// What a client at a version is sent to reach the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The whole state (no `since`, or `since` unknown or pruned: then `reset` says which);
    /// `reducer`: the version that applied its last diff.
    Snapshot { reset: Option<Reset>, state: Arc<[u8]>, hash: Hash, seq: u64, reducer: ModuleHash },
    /// One diff from `from` to the head, composed by (and to be applied with) `reducer`.
    Patch { from: Hash, to: Hash, seq: u64, diff: Bytes, reducer: ModuleHash },
    /// The missed diffs one by one (the reducer can neither merge nor delta them).
    Diffs(Vec<Applied>),
    /// Nothing missed.
    UpToDate { hash: Hash, seq: u64 },
}

impl Plan {
    /// The version the client is at after this plan.
    pub fn version(&self) -> (Hash, u64) {
        match self {
            Plan::Snapshot { hash, seq, .. } | Plan::UpToDate { hash, seq } => (*hash, *seq),
            Plan::Patch { to, seq, .. } => (*to, *seq),
            Plan::Diffs(diffs) => {
                let last = diffs.last().expect("a Diffs plan is never empty");
                (last.hash, last.seq)
            }
        }
    }
}

/// A version of a model's state.
pub struct StateAt {
    pub state: Arc<[u8]>,
    pub hash: Hash,
    pub seq: u64,
    pub offset: Option<u64>,
}

/// A model's version after an appended record was folded.
pub struct Version {
    pub offset: u64,
    pub seq: u64,
    pub hash: Hash,
}

/// The log the app appends to and the fold loop reads.
pub struct Log {
    pub writer: Writer,
    /// The source positions are stored under.
    pub source_name: &'static str,
    pub source: Arc<SourceStatus>,
    /// Writes refused (`read_only = true`).
    pub read_only: bool,
    /// Compares this server's partition digests with the other replicas' (Kafka only).
    pub attestor: Option<Arc<crate::source::attest::Attestor>>,
    /// Sharded mode: which server serves which partition.
    pub cluster: Option<Arc<Cluster>>,
    /// The outbox's relay: what is pending, what keeps it.
    pub relay: Arc<Relay>,
}

/// What the fold thread and the process share with the service.
pub struct Process {
    /// Ticks after each commit of the fold thread.
    pub committed: watch::Receiver<u64>,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
}

/// The service. Its parts are the crate's (the fold thread and the wiring use them); the
/// API and everything outside the crate go through its methods.
pub struct App {
    pub(crate) limits: Limits,
    pub(crate) store: Arc<Store>,
    kinds: HashMap<String, Kind>,
    pub(crate) hub: Hub,
    pub(crate) status: Arc<Status>,
    pub(crate) metrics: Arc<Metrics>,
    writer: Writer,
    source_name: &'static str,
    pub(crate) source: Arc<SourceStatus>,
    committed: watch::Receiver<u64>,
    states: Mutex<StateCache>,
    pub(crate) deployer: Arc<Deployer>,
    /// Writes (creates, appends, deploys, replays) refused.
    read_only: bool,
    attestor: Option<Arc<crate::source::attest::Attestor>>,
    cluster: Option<Arc<Cluster>>,
    pub(crate) relay: Arc<Relay>,
    /// The latest replay of each kind, running or finished.
    replays: Mutex<BTreeMap<String, ReplayJob>>,
    /// Bearer tokens (`None`: access control off).
    auth: Option<crate::auth::Auth>,
}

impl App {
    pub fn new(
        limits: Limits,
        store: Arc<Store>,
        kinds: Vec<Kind>,
        log: Log,
        process: Process,
        deployer: Arc<Deployer>,
    ) -> Result<App, StoreError> {
        let Log { writer, source_name, source, read_only, attestor, cluster, relay } = log;
        let Process { committed, status, metrics } = process;
        let hub = Hub::new(limits.sse_queue_events_max, limits.sse_subscribers_max);
        let states = Mutex::new(StateCache::new(limits.state_cache_bytes_max));
        let mut replays = BTreeMap::new();
        for kind in &kinds {
            if let Some(job) = store.read().replay(&kind.name)? {
                if job.finished_ms.is_none() {
                    tracing::info!(kind = %job.kind, done = job.done, total = job.total, "resuming the replay");
                }
                replays.insert(job.kind.clone(), job);
            }
        }
        let kinds = kinds.into_iter().map(|k| (k.name.to_string(), k)).collect();
        let replays = Mutex::new(replays);
        Ok(App {
            limits,
            store,
            kinds,
            hub,
            status,
            metrics,
            writer,
            source_name,
            source,
            committed,
            states,
            deployer,
            read_only,
            replays,
            attestor,
            cluster,
            relay,
            auth: None,
        })
    }

    /// Where a request for `model` goes: here, unless sharded mode says another server
    /// serves its partition (or none can yet). A request another server sent here
    /// (`hopped`) is served here or not at all (see [`Cluster::route_of`]).
    pub fn route(&self, model: &ModelKey, hopped: bool) -> Result<Route, AppError> {
        let Some(cluster) = &self.cluster else { return Ok(Route::Local) };
        Ok(cluster.route_of(&self.kind(&model.kind)?.topic, model.id.as_bytes(), hopped))
    }

    /// Sharded mode: whether a request for a model served elsewhere is redirected or
    /// forwarded.
    pub fn route_mode(&self) -> Option<RouteMode> {
        self.cluster.as_ref().map(|c| c.mode())
    }

    /// Sharded mode: this server's name in the cluster.
    pub fn member(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.member())
    }

    /// Sharded mode: the cluster's map as this server sees it.
    pub fn cluster(&self) -> Option<ClusterView> {
        self.cluster.as_ref().map(|c| c.view())
    }

    /// Sharded mode: ticks when a route may have moved (`None`: not sharded).
    pub fn route_changes(&self) -> Option<watch::Receiver<u64>> {
        self.cluster.as_ref().map(|c| c.route_changes())
    }

    /// Sharded mode: writes a genesis deploy record (the kind's active version) to each
    /// empty partition the group assigned to this server, so that every member folds a
    /// partition from its first record with the same version, whatever file it was started
    /// with. Waits for the first assignment; a partition that is not empty is left alone
    /// (see docs/operators.md, "Sharded mode").
    pub async fn write_genesis(self: &Arc<App>) {
        let Some(cluster) = &self.cluster else { return };
        if self.read_only {
            return;
        }
        let owned = loop {
            if self.status.stop.is_cancelled() {
                return;
            }
            let owned = cluster.owned();
            if !owned.is_empty() {
                break owned;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut kinds: Vec<&Kind> = self.kinds.values().collect();
        kinds.sort_by(|a, b| a.name.cmp(&b.name));
        for kind in kinds {
            let ends = loop {
                if self.status.stop.is_cancelled() {
                    return;
                }
                let ends: Vec<Option<u64>> = self
                    .source
                    .partitions()
                    .into_iter()
                    .filter(|((t, _), _)| *t == *kind.topic)
                    .map(|(_, p)| p.end)
                    .collect();
                if !ends.is_empty() && ends.iter().all(Option::is_some) {
                    break ends;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let (app, reducer) = (self.clone(), kind.reducer.clone());
            let module = tokio::task::spawn_blocking(move || -> Result<Option<(ModuleHash, Vec<u8>)>, DeployError> {
                let versions = app.deployer.versions(&reducer)?;
                let Some(active) = versions.into_iter().find(|v| v.status == VersionStatus::Active) else {
                    return Ok(None);
                };
                Ok(Some((active.id, app.deployer.stored(&reducer, &active.id.to_string())?)))
            })
            .await;
            let Ok(Ok(Some((version, module)))) = module else {
                tracing::warn!(kind = %kind.name, "no active version to record as the genesis deploy");
                continue;
            };
            let mut headers = deploy_headers(&kind.reducer, "genesis", None);
            headers.push((DEPLOY_PARTITIONS_HEADER.to_owned(), ends.len().to_string().into_bytes()));
            let records = crate::deploy::records(&module, &headers, self.limits.deploy_record_bytes_max);
            for (partition, end) in ends.iter().enumerate() {
                if *end != Some(0) || !owned.contains(&(kind.topic.to_string(), partition as u32)) {
                    continue;
                }
                match self.append_all(&kind.topic, partition as u32, kind.reducer.as_bytes(), &records).await {
                    Ok(offset) => {
                        tracing::info!(kind = %kind.name, partition, offset, %version, "genesis deploy record written")
                    }
                    Err(e) => {
                        tracing::warn!(kind = %kind.name, partition, error = %e, "genesis deploy record not written")
                    }
                }
            }
        }
    }

    /// Access control with `auth` (`None`: off).
    /// Whether requests carry tokens (`[auth]`).
    pub fn auth_on(&self) -> bool {
        self.auth.is_some()
    }

    pub fn with_auth(mut self, auth: Option<crate::auth::Auth>) -> App {
        self.auth = auth;
        self
    }

    /// The caller a request's `Authorization` header or cookies name; everyone without
    /// access control.
    pub fn caller(
        &self,
        authorization: Option<&str>,
        cookies: Option<&str>,
    ) -> Result<crate::auth::Caller, crate::auth::AuthError> {
        match &self.auth {
            None => Ok(crate::auth::Caller::Anyone),
            Some(auth) => auth.caller(authorization, cookies),
        }
    }

    /// Why a request is refused as cross-site (see [`crate::auth::Auth::cross_site`]);
    /// `None` without access control.
    pub fn cross_site(
        &self,
        unsafe_method: bool,
        by_cookie: bool,
        from: &crate::auth::RequestOrigin<'_>,
    ) -> Option<String> {
        self.auth.as_ref()?.cross_site(unsafe_method, by_cookie, from)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Stops the process: the store failed or is corrupted (see [`Status::fatal`]).
    pub fn fatal(&self, reason: String) {
        self.status.fatal(reason);
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Cancelled when the process stops (a signal, `Running::stop`, or a fatal error).
    pub fn stopping(&self) -> &CancellationToken {
        &self.status.stop
    }

    /// Subscribes to a model's live diffs from now on.
    pub fn subscribe(&self, model: &ModelKey) -> Result<Subscription, Full> {
        self.hub.subscribe(model)
    }

    /// The partitions this server reads (sharded: the ones it folds now), with where each
    /// stands.
    pub fn partitions(&self) -> Vec<((String, u32), PartitionStatus)> {
        let all = self.source.partitions();
        match &self.cluster {
            None => all,
            Some(_) => all.into_iter().filter(|(_, p)| p.folding).collect(),
        }
    }

    /// How this replica compares with the others (Kafka with an attestation topic).
    pub fn replicas(&self) -> Option<Replicas> {
        self.attestor.as_ref().map(|a| a.replicas())
    }

    /// Reducer names and the kinds each folds.
    pub fn reducer_names(&self) -> &BTreeMap<String, Vec<Arc<str>>> {
        self.deployer.names()
    }

    /// Every recorded version of reducer `name`, active first.
    pub fn reducer_versions(&self, name: &str) -> Result<Vec<VersionRecord>, DeployError> {
        self.deployer.versions(name)
    }

    /// The module of version `id` of reducer `name` (a version recorded for that reducer
    /// and stored: an active or a past one; a refused one has no module here).
    pub fn reducer_module(&self, name: &str, id: &str) -> Result<Vec<u8>, DeployError> {
        if !self.deployer.versions(name)?.iter().any(|v| v.id.to_string() == id) {
            return Err(DeployError::UnknownVersion { name: name.to_owned(), id: id.to_owned() });
        }
        self.deployer.stored(name, id)
    }

    /// Which version folds each partition of `kind` (`None`: a kind this store has not
    /// folded).
    pub fn kind_versions(&self, kind: &str) -> Result<Option<KindVersions>, StoreError> {
        self.store.read().kind_versions(kind)
    }

    /// `/metrics`: every series, the state-describing gauges as they stand now.
    pub fn metrics_text(&self) -> String {
        let replicas = self.replicas().map(|r| (r.peers.iter().filter(|p| !p.agrees).count(), r.diverged.is_some()));
        let partitions =
            self.partitions().into_iter().map(|((topic, partition), p)| (topic, partition, p.next, p.lag())).collect();
        let stopped = self.kinds_stopped();
        let kinds_stopped =
            self.kinds.keys().map(|kind| (kind.clone(), stopped.iter().any(|(k, _)| k == kind))).collect();
        self.metrics.encode(Gauges {
            ready: self.ready(),
            kinds_stopped,
            sse_subscribers: self.hub.subscribers(),
            partitions,
            replicas,
            cluster: self.cluster.as_ref().map(|cluster| {
                let (members, owned, served) = cluster.summary();
                let folded = self.source.partitions().iter().filter(|(_, p)| p.folding).count();
                crate::metrics::ClusterGauges { members, owned, folded, served }
            }),
            outbox_pending: self.relay.pending(),
        })
    }

    pub fn kind(&self, kind: &str) -> Result<&Kind, AppError> {
        self.kinds.get(kind).ok_or_else(|| AppError::UnknownKind(kind.to_owned()))
    }

    /// `Err(ReadOnly)` on a read-only server, `Err(StoreUnwritable)` once the store
    /// failed a write.
    pub fn writable(&self) -> Result<(), AppError> {
        if self.read_only {
            return Err(AppError::ReadOnly);
        }
        match self.status.unwritable_reason() {
            Some(reason) => Err(AppError::StoreUnwritable(reason)),
            None => Ok(()),
        }
    }

    /// An append's outcome: a store that failed the write stops taking writes.
    fn appended<T>(&self, result: Result<T, WriteError>) -> Result<T, AppError> {
        match result {
            Err(WriteError::Store(e)) if !e.is_fatal() => {
                let reason = format!("appending to the embedded log: {e}");
                self.status.unwritable(reason.clone());
                Err(AppError::StoreUnwritable(reason))
            }
            other => Ok(other?),
        }
    }

    /// A kind that takes writes: this server is writable and folds the kind.
    fn writable_kind(&self, kind: &str) -> Result<&Kind, AppError> {
        self.writable()?;
        let kind = self.kind(kind)?;
        if let Some(reason) = self.source.stopped_reason(&kind.topic) {
            return Err(AppError::KindStopped { kind: kind.name.to_string(), reason });
        }
        Ok(kind)
    }

    /// Kinds whose folding is stopped, and why (sorted by kind).
    pub fn kinds_stopped(&self) -> Vec<(String, String)> {
        let stopped = self.source.stopped();
        let mut out: Vec<(String, String)> = self
            .kinds
            .values()
            .filter_map(|kind| Some((kind.name.to_string(), stopped.get(&*kind.topic)?.clone())))
            .collect();
        out.sort();
        out
    }

    /// Ticks after every commit of the fold loop.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// `None` when ready; otherwise why not.
    pub fn unready_reason(&self) -> Option<String> {
        if let Some(fatal) = self.status.fatal_reason() {
            return Some(fatal);
        }
        if let Some(reason) = self.status.unwritable_reason() {
            return Some(format!("the store cannot write ({reason}): folding stopped; restart once the disk has room"));
        }
        if let Some(problem) = self.source.problem() {
            return Some(problem);
        }
        if let Some(problem) = self.cluster.as_ref().and_then(|c| c.problem()) {
            return Some(problem);
        }
        if self.relay.full() {
            return Some(format!(
                "the outbox holds outbox_records_max ({}) reactions not relayed: folding waits for the relay{}",
                self.limits.outbox_records_max,
                self.relay.problem().map(|p| format!(" ({p})")).unwrap_or_default()
            ));
        }
        if let Some(problem) = self.relay.problem() {
            return Some(format!("the relay of reactions is held up: {problem}"));
        }
        if let Some((kind, reason)) = self.kinds_stopped().into_iter().next() {
            return Some(format!("folding kind {kind} is stopped: {reason}; `statefold reset {kind}` refolds it"));
        }
        if !self.status.caught_up.load(Ordering::Relaxed) {
            return Some("catching up with the log".into());
        }
        None
    }

    /// The outbox as `/readyz` shows it: reactions not relayed yet, and what holds the relay
    /// up.
    pub fn outbox(&self) -> serde_json::Value {
        let mut outbox = serde_json::json!({"pending": self.relay.pending()});
        if let Some(problem) = self.relay.problem() {
            outbox["problem"] = problem.into();
        }
        outbox
    }

    /// Ready to serve: caught up, and not diverged from the other replicas.
    pub fn ready(&self) -> bool {
        if self.attestor.as_ref().is_some_and(|a| a.replicas().diverged.is_some()) {
            return false;
        }
        self.unready_reason().is_none()
    }
}

fn unknown(model: &ModelKey) -> AppError {
    AppError::UnknownModel { kind: model.kind.to_string(), id: model.id.to_string() }
}
