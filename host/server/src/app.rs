//! The service behind the HTTP API: versions, states, catch-up plans and appends, over the
//! store, the reducers and the log. Blocking (RocksDB, wasm): the API calls it from
//! `spawn_blocking`. Wire formats are the API's business, not this module's.

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

/// Why a request failed, in domain terms (the API maps each to a status and code).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("unknown kind {0:?}")]
    UnknownKind(String),
    #[error("unknown model {kind}/{id}")]
    UnknownModel { kind: String, id: String },
    #[error("model {kind}/{id} already exists")]
    Exists { kind: String, id: String },
    #[error("hash {0} is not a version of this model")]
    UnknownHash(Hash),
    #[error("version {0} is no longer retained")]
    Pruned(Hash),
    #[error("invalid model id: {0}")]
    InvalidId(String),
    /// A `PARTITION:OFFSET` that names no record of the log.
    #[error("{0}")]
    BadPosition(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Rejected(Rejection),
    #[error("not folded within {0:?}; the diff is in the log at offset {1} and will be folded")]
    WaitTimeout(Duration, u64),
    #[error("reducer failed: {0}")]
    Reducer(#[from] ReducerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("shutting down")]
    ShuttingDown,
    /// The log did not take an append.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Deploy(Box<crate::deploy::DeployError>),
    #[error("this server is read-only (read_only = true): send writes to a server that takes them")]
    ReadOnly,
    #[error("a replay of kind {} is running ({} of {} models)", .0.kind, .0.done, .0.total)]
    ReplayRunning(Box<ReplayJob>),
    /// The caller's token does not grant this.
    #[error("{0}")]
    Forbidden(String),
    /// The store failed a write; it takes none until the process restarts.
    #[error(
        "the store cannot write ({0}); nothing was written: retry once the server has restarted with room on its disk"
    )]
    StoreUnwritable(String),
    /// The kind's topic is not the log this store folded (see `SourceStatus::stop_topic`).
    #[error("folding kind {kind} is stopped: {reason}; nothing was written (`statefold reset {kind}` refolds it)")]
    KindStopped { kind: String, reason: String },
    /// Sharded mode: no server can answer for a partition now (a rebalance under way).
    #[error("{0}")]
    PartitionUnavailable(String),
}

impl AppError {
    /// The stable code of the error, the same over HTTP and over Kafka (request/reply).
    pub fn code(&self) -> &'static str {
        self.status_code().1
    }

    /// The HTTP status that goes with it.
    pub fn status(&self) -> u16 {
        self.status_code().0
    }

    /// The message a client sees: a rejection's own.
    pub fn message(&self) -> String {
        match self {
            AppError::Rejected(rejection) => rejection.message(),
            other => other.to_string(),
        }
    }

    fn status_code(&self) -> (u16, &'static str) {
        match self {
            AppError::UnknownKind(_) => (404, "unknown_kind"),
            AppError::UnknownModel { .. } => (404, "unknown_model"),
            AppError::Exists { .. } => (409, "model_exists"),
            AppError::UnknownHash(_) => (404, "unknown_hash"),
            AppError::Pruned(_) => (410, "pruned"),
            AppError::InvalidId(_) => (400, "invalid_id"),
            AppError::BadPosition(_) => (400, "bad_query"),
            AppError::Rejected(rejection) => match rejection {
                Rejection::Refused(_) => (409, "refused"),
                Rejection::Exists => (409, "model_exists"),
                Rejection::HashMismatch(_) => (409, "hash_mismatch"),
                Rejection::Failed(_) => (422, "reducer_failed"),
                other => (422, other.code()),
            },
            AppError::WaitTimeout(..) => (504, "wait_timeout"),
            AppError::Reducer(_) => (500, "reducer_failed"),
            AppError::Store(_) => (500, "store"),
            AppError::ShuttingDown => (503, "shutting_down"),
            AppError::Unavailable(_) => (503, "unavailable"),
            AppError::ReplayRunning(_) => (409, "replay_running"),
            AppError::ReadOnly => (403, "read_only"),
            AppError::KindStopped { .. } => (503, "kind_stopped"),
            AppError::Forbidden(_) => (403, "forbidden"),
            AppError::StoreUnwritable(_) => (503, "store_unwritable"),
            AppError::PartitionUnavailable(_) => (503, "partition_unavailable"),
            AppError::Deploy(_) => (500, "deploy"),
        }
    }
}

impl From<WriteError> for AppError {
    fn from(error: WriteError) -> AppError {
        match error {
            WriteError::Store(e) => AppError::Store(e),
            unavailable @ WriteError::Unavailable(_) => AppError::Unavailable(unavailable.to_string()),
        }
    }
}

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
    /// (see the README).
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

    /// Deploys a version of reducer `name`: checks it (off the async runtime), writes a
    /// deploy record carrying it to every partition of each of its kinds' topics, and
    /// answers once this server has folded them all. Every replica switches each
    /// partition at its record.
    pub async fn deploy(
        self: &Arc<App>,
        name: &str,
        module: Module,
        origin: &str,
        subject: Option<&str>,
    ) -> Result<Deployed, DeployError> {
        if self.read_only {
            return Err(DeployError::ReadOnly);
        }
        let _serial = self.deployer.serial().await;
        let (app, name_owned, origin_owned) = (self.clone(), name.to_owned(), origin.to_owned());
        let subject_owned = subject.map(str::to_owned);
        let prepared = tokio::task::spawn_blocking(move || {
            let module = match module {
                Module::Bytes(bytes) => bytes,
                Module::Stored(id) => app.deployer.stored(&name_owned, &id)?,
            };
            app.deployer.prepare(&name_owned, module, &origin_owned, subject_owned.as_deref())
        })
        .await
        .map_err(|_| DeployError::Stopped)??;
        let (record, module, kinds) = match prepared {
            Prepared::Unchanged(version) => {
                return Ok(Deployed { version, unchanged: true, partitions: 0, took: Duration::ZERO });
            }
            Prepared::Ready { record, module, kinds } => (record, module, kinds),
        };
        let started = Instant::now();
        let mut written = 0;
        for kind in &kinds {
            let topic = &self.kind(kind).map_err(|e| DeployError::Unavailable(e.to_string()))?.topic;
            let headers = deploy_headers(name, origin, subject);
            let records = crate::deploy::records(&module, &headers, self.limits.deploy_record_bytes_max);
            written += self.in_every_partition(topic, name.as_bytes(), &records).await.map_err(|e| match e {
                AppError::ShuttingDown => DeployError::Stopped,
                AppError::WaitTimeout(..) => DeployError::Unavailable(format!(
                    "the deploy records are in the log and every replica will fold them, but this server did not within wait_applied_ms_max: {e}"
                )),
                e => DeployError::Unavailable(format!("writing the deploy records: {e}")),
            })?;
        }
        let versions = self.deployer.versions(name)?;
        let version = versions.into_iter().find(|v| v.id == record.id).unwrap_or(record);
        Ok(Deployed { version, unchanged: false, partitions: written, took: started.elapsed() })
    }

    /// Writes records (each a value and headers; [`DEPLOY_PARTITIONS_HEADER`] is added) to
    /// every partition of `topic`, in order, and waits until this server has folded them
    /// all: how deploy and replay records reach every replica at one place in each
    /// partition. Returns the number of partitions.
    async fn in_every_partition(
        &self,
        topic: &str,
        key: &[u8],
        records: &[crate::deploy::Append<'_>],
    ) -> Result<usize, AppError> {
        let count = self.writer.partitions(topic).await?;
        let partitions = (DEPLOY_PARTITIONS_HEADER.to_owned(), count.to_string().into_bytes());
        let records: Vec<_> = records
            .iter()
            .map(|(value, headers)| (*value, headers.iter().cloned().chain([partitions.clone()]).collect()))
            .collect();
        let mut written = Vec::new();
        for partition in 0..count {
            written.push((partition, self.append_all(topic, partition, key, &records).await?));
        }
        let timeout = Duration::from_millis(self.limits.wait_applied_ms_max);
        for &(partition, offset) in &written {
            // Sharded: the partitions folded here; the others' servers fold theirs.
            if self.cluster.is_some() && !self.source.is_folding(topic, partition) {
                continue;
            }
            self.wait_stored(topic, partition, offset, timeout).await?;
        }
        Ok(written.len())
    }

    /// Appends records to one partition in order; the offset of the last.
    async fn append_all(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        records: &[crate::deploy::Append<'_>],
    ) -> Result<u64, AppError> {
        let mut last = 0;
        for (value, headers) in records {
            (_, last) = self.appended(self.writer.append_to(topic, Some(partition), key, value, headers).await)?;
        }
        Ok(last)
    }

    /// Starts rebuilding a kind's states from the retained diffs with its active reducer.
    pub async fn start_replay(self: &Arc<App>, kind: &str, subject: Option<&str>) -> Result<ReplayJob, AppError> {
        let topic = self.writable_kind(kind)?.topic.clone();
        if let Some(job) = self.replays_running().into_iter().find(|job| job.kind == kind) {
            return Err(AppError::ReplayRunning(Box::new(job)));
        }
        // A replay record in every partition: each replica rebuilds each partition's models
        // for it, at the same place in the log.
        let mut headers = vec![(REPLAY_HEADER.to_owned(), kind.as_bytes().to_vec())];
        if let Some(subject) = subject {
            headers.push((SUBJECT_HEADER.to_owned(), subject.as_bytes().to_vec()));
        }
        self.in_every_partition(&topic, kind.as_bytes(), &[(&b""[..], headers)]).await?;
        let job = self.replays.lock().unwrap_or_else(|p| p.into_inner()).get(kind).cloned();
        job.ok_or_else(|| AppError::Unavailable("the replay records were folded but no replay started".into()))
    }

    /// The kind's latest replay.
    pub fn replay(&self, kind: &str) -> Result<Option<ReplayJob>, AppError> {
        self.kind(kind)?;
        Ok(self.replays.lock().unwrap_or_else(|p| p.into_inner()).get(kind).cloned())
    }

    /// Replays still running (for the fold loop).
    pub fn replays_running(&self) -> Vec<ReplayJob> {
        let replays = self.replays.lock().unwrap_or_else(|p| p.into_inner());
        replays.values().filter(|job| job.finished_ms.is_none()).cloned().collect()
    }

    /// Progress committed by the fold loop.
    pub fn replay_progress(&self, job: ReplayJob) {
        self.replays.lock().unwrap_or_else(|p| p.into_inner()).insert(job.kind.clone(), job);
    }

    /// The model's committed head.
    pub fn head(&self, model: &ModelKey) -> Result<Head, AppError> {
        self.kind(&model.kind)?;
        self.store.read().head(model)?.ok_or_else(|| unknown(model))
    }

    /// The state at the head, or at `at` while it is retained.
    pub fn state(&self, model: &ModelKey, at: Option<Hash>) -> Result<StateAt, AppError> {
        self.kind(&model.kind)?;
        let reader = self.store.read();
        let head = reader.head(model)?.ok_or_else(|| unknown(model))?;
        let (hash, seq, offset) = match at {
            None => (head.hash, head.seq, head.offset),
            Some(hash) => match reader.find_hash(model, &hash)? {
                None => return Err(AppError::UnknownHash(hash)),
                Some(at) if is_pruned(&head, at) => return Err(AppError::Pruned(hash)),
                Some(HashAt::Genesis) => (hash, 0, None),
                Some(HashAt::Diff { seq, offset }) => (hash, seq, Some(offset)),
            },
        };
        let state = self.materialize(&reader, model, &head, hash, offset)?;
        Ok(StateAt { state, hash, seq, offset })
    }

    fn materialize(
        &self,
        reader: &Reader<'_>,
        model: &ModelKey,
        head: &Head,
        hash: Hash,
        offset: Option<u64>,
    ) -> Result<Arc<[u8]>, AppError> {
        // A cached state is served without waiting for the reader instance.
        if let Some(state) = self.states.lock().unwrap_or_else(|p| p.into_inner()).get(model, &hash) {
            return Ok(state);
        }
        let kind = self.kind(&model.kind)?;
        let mut versions = kind.readers.lock().unwrap_or_else(|p| p.into_inner());
        self.materialize_with(&mut versions, reader, model, head, hash, offset)
    }

    /// The state at (`hash`, `offset`) rebuilt on `models` from the nearest retained
    /// checkpoint, through the cache.
    fn materialize_with(
        &self,
        versions: &mut Versions,
        reader: &Reader<'_>,
        model: &ModelKey,
        head: &Head,
        hash: Hash,
        offset: Option<u64>,
    ) -> Result<Arc<[u8]>, AppError> {
        if let Some(state) = self.states.lock().unwrap_or_else(|p| p.into_inner()).get(model, &hash) {
            return Ok(state);
        }
        let history = match offset {
            None => Default::default(),
            Some(offset) => reader.checkpoint_for(model, head, offset)?,
        };
        let state: Arc<[u8]> = versions.materialize(&model.id, history, head.reducer)?.into();
        self.states.lock().unwrap_or_else(|p| p.into_inner()).put(model, hash, state.clone());
        Ok(state)
    }

    /// Ticks after every commit of the fold loop.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Waits until this server has folded the record at (`partition`, `offset`) of `kind`'s
    /// topic, however it was produced (through another replica, by another service).
    pub async fn wait_position(&self, kind: &str, partition: u32, offset: u64) -> Result<(), AppError> {
        let topic = self.kind(kind)?.topic.clone();
        // A position that cannot be in the log is the client's mistake: said at once,
        // rather than after a wait that cannot end well.
        let partitions = self.writer.partitions(&topic).await?;
        if partition >= partitions {
            return Err(AppError::BadPosition(format!(
                "{topic} has {partitions} partition(s): there is no partition {partition}"
            )));
        }
        if let Some(end) = self.writer.known_end(&topic, partition)?
            && offset >= end
        {
            return Err(AppError::BadPosition(format!(
                "{topic} partition {partition} ends at offset {end}: there is no record at {offset}"
            )));
        }
        self.wait_stored(&topic, partition, offset, Duration::from_millis(self.limits.wait_applied_ms_max)).await
    }

    /// Waits until the stored position of (`topic`, `partition`) passes `offset`: checked
    /// after each commit of the fold loop.
    async fn wait_stored(&self, topic: &str, partition: u32, offset: u64, timeout: Duration) -> Result<(), AppError> {
        let deadline = Instant::now() + timeout;
        let mut committed = self.committed.clone();
        loop {
            committed.borrow_and_update();
            if self.store.position(self.source_name, topic, partition)?.unwrap_or(0) > offset {
                return Ok(());
            }
            let stopped = || match self.status.unwritable_reason() {
                Some(reason) => AppError::StoreUnwritable(reason),
                None => AppError::ShuttingDown,
            };
            if self.status.unwritable_reason().is_some() {
                return Err(stopped());
            }
            match tokio::time::timeout_at(deadline.into(), committed.changed()).await {
                Err(_) => return Err(AppError::WaitTimeout(timeout, offset)),
                // The fold thread ended: the process stops, or the store failed a write.
                Ok(Err(_)) => return Err(stopped()),
                Ok(Ok(())) => {}
            }
        }
    }

    /// What a client holding `since` (or nothing) needs to reach the committed head.
    pub fn plan(&self, model: &ModelKey, since: Option<Hash>) -> Result<Plan, AppError> {
        let started = Instant::now();
        let plan = self.plan_uncounted(model, since);
        self.metrics.catchup_plan_seconds.observe(started.elapsed().as_secs_f64());
        plan
    }

    fn plan_uncounted(&self, model: &ModelKey, since: Option<Hash>) -> Result<Plan, AppError> {
        let kind = self.kind(&model.kind)?;
        let reader = self.store.read();
        let head = reader.head(model)?.ok_or_else(|| unknown(model))?;
        let snapshot = |reset| -> Result<Plan, AppError> {
            let state = self.materialize(&reader, model, &head, head.hash, head.offset)?;
            Ok(Plan::Snapshot { reset, state, hash: head.hash, seq: head.seq, reducer: head.reducer })
        };
        let Some(since) = since else { return snapshot(None) };
        if since == head.hash {
            return Ok(Plan::UpToDate { hash: head.hash, seq: head.seq });
        }
        let at = match reader.find_hash(model, &since)? {
            None => return snapshot(Some(Reset::Unknown)),
            Some(at) if is_pruned(&head, at) => return snapshot(Some(Reset::Pruned)),
            Some(at) => at,
        };
        let (after, since_seq) = match at {
            HashAt::Genesis => (None, 0),
            HashAt::Diff { seq, offset } => (Some(offset), seq),
        };
        let through = head.offset.expect("a model past its genesis hash has applied a diff");
        // Summed up first: a patch by `delta` needs only the two states, not the diffs. The
        // head says how many there are and whether one version applied them all; a head
        // stored before it recorded that has them counted from the store (a scan).
        let (len, one_version) = match head.run_since {
            Some(_) if since_seq >= head.seq => {
                return Err(StoreError::Corrupt {
                    what: "hashes",
                    key: format!("{model:?}"),
                    detail: format!("{since} is at seq {since_seq}, not before the head's {}", head.seq),
                }
                .into());
            }
            Some(run_since) => ((head.seq - since_seq) as usize, since_seq + 1 >= run_since),
            None => {
                let run = reader.run(model, after, through, since_seq)?;
                if run.last != Some(head.hash) {
                    return Err(StoreError::Corrupt {
                        what: "diffs",
                        key: format!("{model:?}"),
                        detail: format!("the diffs after {since} do not lead to the head {}", head.hash),
                    }
                    .into());
                }
                (run.len, run.reducers == [head.reducer])
            }
        };
        let missed = || reader.diffs(model, after, through, since, since_seq);
        let plan = if !one_version {
            // Missed diffs span a deploy: composition is one version's, so one by one.
            CatchUp::Diffs
        } else {
            let mut versions = kind.readers.lock().unwrap_or_else(|p| p.into_inner());
            let max = self.limits.catchup_merge_diffs_max;
            let payloads = || Ok::<_, AppError>(missed()?.into_iter().map(|d| d.payload).collect());
            plan_catch_up(&mut versions, head.reducer, len, max, payloads, |versions| {
                let from = self.materialize_with(versions, &reader, model, &head, since, after)?;
                let to = self.materialize_with(versions, &reader, model, &head, head.hash, head.offset)?;
                Ok::<_, AppError>((from, to))
            })
        };
        Ok(match plan {
            CatchUp::Patch { diff, how } => {
                tracing::debug!(kind = %model.kind, id = %model.id, missed = len, how, "catch-up patch");
                Plan::Patch { from: since, to: head.hash, seq: head.seq, diff, reducer: head.reducer }
            }
            CatchUp::Diffs => Plan::Diffs(missed()?),
        })
    }

    /// Sharded mode: who lists each partition of `kind`'s topic, as this server routes:
    /// `None` for this server, else the serving server's URL (`Ok(None)`: not sharded).
    /// A partition no server can serve now is `PartitionUnavailable`.
    pub fn list_sources(&self, kind: &str) -> Result<Option<ListSources>, AppError> {
        let topic = self.kind(kind)?.topic.clone();
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let count = cluster.partition_count(&topic);
        if count == 0 {
            return Err(AppError::PartitionUnavailable(format!(
                "the partitions of topic {topic:?} are not known yet; retry shortly"
            )));
        }
        let mut sources: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
        for partition in 0..count {
            let source = match cluster.route(&topic, partition) {
                Route::Local => None,
                Route::Elsewhere { url, .. } => Some(url),
                Route::Unavailable(reason) => return Err(AppError::PartitionUnavailable(reason)),
            };
            sources.entry(source).or_default().push(partition);
        }
        Ok(Some(sources))
    }

    /// Models of a kind, after the id `after`, at most `limit`. Sharded: the models of
    /// `partitions` (which this server must serve or fold and have caught up on), or of the
    /// partitions served here when `None`.
    pub fn list(
        &self,
        kind: &str,
        after: Option<&str>,
        limit: usize,
        partitions: Option<&[u32]>,
    ) -> Result<Vec<(String, Head)>, AppError> {
        let topic = self.kind(kind)?.topic.clone();
        let limit = limit.min(self.limits.list_page_max);
        let reader = self.store.read();
        let Some(served) = self.listed_partitions(&topic, partitions)? else {
            return Ok(reader.list(kind, after, limit)?);
        };
        let count = served.len() as u32;
        let (mut out, mut cursor) = (Vec::new(), after.map(str::to_owned));
        while out.len() < limit && count > 0 {
            let page = reader.list(kind, cursor.as_deref(), limit)?;
            let done = page.len() < limit;
            cursor = page.last().map(|(id, _)| id.clone());
            out.extend(page.into_iter().filter(|(id, _)| served[partition_of(id.as_bytes(), count) as usize]));
            if done {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Sharded mode: which partitions of `topic` a listing here covers (indexed by
    /// partition; `None`: not sharded, every one). The store may also hold partitions folded
    /// here before and no longer followed: only `partitions` (each served here, or folded
    /// and caught up on) are listed, or the partitions served here when `None`.
    fn listed_partitions(&self, topic: &str, partitions: Option<&[u32]>) -> Result<Option<Vec<bool>>, AppError> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let count = cluster.partition_count(topic);
        let Some(partitions) = partitions else {
            return Ok(Some((0..count).map(|p| cluster.route(topic, p) == Route::Local).collect()));
        };
        let mut listed = vec![false; count as usize];
        for &p in partitions {
            if p >= count || !(cluster.route(topic, p) == Route::Local || self.source.is_ready(topic, p)) {
                return Err(AppError::PartitionUnavailable(format!(
                    "partition {p} of topic {topic:?} is not served here; retry shortly"
                )));
            }
            listed[p as usize] = true;
        }
        Ok(Some(listed))
    }

    /// Checks that a model can be created; returns its kind's topic.
    pub fn check_create(&self, kind: &str, id: &str) -> Result<Arc<str>, AppError> {
        let kind = self.writable_kind(kind)?;
        crate::model::validate_id(id.as_bytes()).map_err(AppError::InvalidId)?;
        let model = ModelKey { kind: kind.name.clone(), id: id.into() };
        if self.store.read().head(&model)?.is_some() {
            return Err(AppError::Exists { kind: model.kind.to_string(), id: id.to_owned() });
        }
        Ok(kind.topic.clone())
    }

    /// Checks that a model exists; returns its kind's topic.
    pub fn check_append(&self, model: &ModelKey) -> Result<Arc<str>, AppError> {
        let kind = self.writable_kind(&model.kind)?;
        // Sharded: a model served elsewhere is not in this store (or not up to date): the
        // server that folds it checks it (an unknown model is a rejection there).
        if self.route(model, false)? == Route::Local {
            self.store.read().head(model)?.ok_or_else(|| unknown(model))?;
        }
        Ok(kind.topic.clone())
    }

    /// Appends a record for `id` to the log (a create record when `diff` is `None`); returns
    /// (partition, offset) once the log has it.
    pub async fn write(
        &self,
        topic: &str,
        id: &str,
        diff: Option<&[u8]>,
        extra: &[(String, Vec<u8>)],
    ) -> Result<(u32, u64), AppError> {
        let mut headers = match diff {
            None => vec![(CREATE_HEADER.to_owned(), Vec::new())],
            Some(_) => Vec::new(),
        };
        headers.extend_from_slice(extra);
        self.appended(self.writer.append(topic, id.as_bytes(), diff.unwrap_or_default(), &headers).await)
    }

    /// The diff applied to `model` under idempotency key `key`, if one was.
    pub fn keyed(&self, model: &ModelKey, key: &str) -> Result<Option<Keyed>, AppError> {
        Ok(self.store.read().keyed(model, key)?)
    }

    /// Rejected records of a kind's topic, after (partition, offset).
    /// Sharded: those of `partitions`, or of the partitions served here (see `list`).
    pub fn rejections(
        &self,
        kind: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        partitions: Option<&[u32]>,
    ) -> Result<Vec<StoredRejection>, AppError> {
        let topic = self.kind(kind)?.topic.clone();
        let limit = limit.min(self.limits.list_page_max);
        let reader = self.store.read();
        let Some(listed) = self.listed_partitions(&topic, partitions)? else {
            return Ok(reader.rejections(&topic, after, limit)?);
        };
        let (mut out, mut cursor) = (Vec::new(), after);
        while out.len() < limit && !listed.is_empty() {
            let page = reader.rejections(&topic, cursor, limit)?;
            let done = page.len() < limit;
            cursor = page.last().map(|r| (r.partition, r.offset));
            out.extend(page.into_iter().filter(|r| listed.get(r.partition as usize).copied().unwrap_or(false)));
            if done {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Waits until the record at `offset` is folded, then says what became of it.
    pub async fn wait_folded(
        &self,
        model: &ModelKey,
        topic: &str,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<Version, AppError> {
        self.wait_stored(topic, partition, offset, timeout).await?;
        let reader = self.store.read();
        if let Some(rejection) = reader.rejection(topic, partition, offset)? {
            return Err(AppError::Rejected(rejection));
        }
        if let Some((seq, hash)) = reader.diff_at(model, offset)? {
            return Ok(Version { offset, seq, hash });
        }
        // A create record that was not rejected: the model's first version.
        Ok(Version { offset, seq: 0, hash: model.genesis() })
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

/// The headers of a deploy record of reducer `name` (the partition count is added per
/// write).
fn deploy_headers(name: &str, origin: &str, subject: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let mut headers = vec![
        (DEPLOY_HEADER.to_owned(), name.as_bytes().to_vec()),
        (DEPLOY_ORIGIN_HEADER.to_owned(), origin.as_bytes().to_vec()),
    ];
    if let Some(subject) = subject {
        headers.push((SUBJECT_HEADER.to_owned(), subject.as_bytes().to_vec()));
    }
    headers
}

fn unknown(model: &ModelKey) -> AppError {
    AppError::UnknownModel { kind: model.kind.to_string(), id: model.id.to_string() }
}

fn is_pruned(head: &Head, at: HashAt) -> bool {
    match (head.pruned_through, at) {
        (None, _) => false,
        (Some(_), HashAt::Genesis) => true,
        (Some(pruned), HashAt::Diff { offset, .. }) => offset < pruned,
    }
}

/// Materialized states by (model, hash), bounded in bytes.
struct StateCache {
    entries: LruCache<(ModelKey, Hash), Arc<[u8]>>,
    bytes: u64,
    bytes_max: u64,
}

impl StateCache {
    fn new(bytes_max: u64) -> StateCache {
        StateCache { entries: LruCache::unbounded(), bytes: 0, bytes_max }
    }

    fn get(&mut self, model: &ModelKey, hash: &Hash) -> Option<Arc<[u8]>> {
        self.entries.get(&(model.clone(), *hash)).cloned()
    }

    fn put(&mut self, model: &ModelKey, hash: Hash, state: Arc<[u8]>) {
        if state.len() as u64 > self.bytes_max / 4 {
            return;
        }
        self.bytes += state.len() as u64;
        if let Some((_, old)) = self.entries.push((model.clone(), hash), state) {
            self.bytes -= old.len() as u64;
        }
        while self.bytes > self.bytes_max {
            let Some((_, old)) = self.entries.pop_lru() else { break };
            self.bytes -= old.len() as u64;
        }
    }
}
