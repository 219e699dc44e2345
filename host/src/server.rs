//! Wires a running Statefold: store, reducers, source, the fold loop (its own thread) and
//! the HTTP server. The binary and the integration tests start it the same way.

use std::collections::{BTreeMap, HashMap};
use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::app::{App, Kind, Log, Status};
use crate::attest::{Attestor, Digests};
use crate::config::Config;
use crate::deploy::{Deployer, Registry, VersionRecord, VersionStatus, watch as reducer_watch};
use crate::fold::{Engine, Folded, KindSpec, KindVersions, ReplayJob, Resolve, Versions};
use crate::reducer::{ModuleHash, Natives, Reducer, Runtime};
use crate::source::{EmbeddedLog, KafkaSource, KafkaWriter, Source, SourceStatus, Writer, positions};
use crate::store::{Store, StoreError, StoreOptions};

/// A running Statefold.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    server: tokio::task::JoinHandle<io::Result<()>>,
    threads: Threads,
    writer: Writer,
}

/// The threads of a running Statefold; each ends on `stop`.
struct Threads {
    fold: std::thread::JoinHandle<()>,
    watcher: std::thread::JoinHandle<()>,
    attest: Option<std::thread::JoinHandle<()>>,
}

impl Threads {
    /// Waits for all of them (a panic in any is already reported by the panic hook).
    fn join(self) {
        let _ = (self.fold.join(), self.watcher.join(), self.attest.map(|a| a.join()));
    }
}

impl Running {
    /// Stops and waits until everything has stopped.
    pub async fn stop(self) -> Result<(), String> {
        self.app.status.stop.cancel();
        self.wait().await
    }

    /// Stops from where one cannot await (a destructor): waits up to `timeout` for the
    /// fold, watcher and attest threads, so that none still holds the store when the
    /// caller goes on (RocksDB aborts a process that exits while a thread closes it). The
    /// HTTP server's tasks end with their runtime. False if the threads were not done.
    pub fn stop_threads(self, timeout: Duration) -> bool {
        self.app.status.stop.cancel();
        let (done, finished) = std::sync::mpsc::channel();
        let threads = self.threads;
        std::thread::spawn(move || {
            threads.join();
            let _ = done.send(());
        });
        finished.recv_timeout(timeout).is_ok()
    }

    /// Runs until stopped (by [`Running::stop`], a signal wired by the caller, or a fatal
    /// error); returns the fatal error if there was one.
    pub async fn wait(self) -> Result<(), String> {
        self.app.status.stop.cancelled().await;
        let served = self.server.await;
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || threads.join()).await;
        if let Writer::Kafka(producer) = self.writer {
            let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        }
        if let Some(reason) = self.app.status.fatal_reason() {
            return Err(reason);
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("HTTP server: {e}")),
            Err(e) => Err(format!("HTTP server task: {e}")),
        }
    }
}

/// Opens everything the config names and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, Natives::new()).await
}

/// [`start`], running the modules in `natives` through native stand-ins: how the
/// benchmark suite measures what the wasm sandbox costs in the whole pipeline.
pub async fn start_with(config: Config, natives: Natives) -> anyhow::Result<Running> {
    config.validate().map_err(anyhow::Error::msg)?;
    let limits = config.limits.clone();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir.join("db"), &StoreOptions { fsync: limits.store_fsync })
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let store = Arc::new(store);
    let runtime = Runtime::new(limits.reducer(), Some(config.data_dir.join("compiled")))?.with_natives(natives);
    let runtime = Arc::new(runtime);
    let registry = Arc::new(Registry { runtime: runtime.clone(), store: store.clone() });

    let mut kinds = Vec::new();
    let mut specs = Vec::new();
    let mut names: BTreeMap<String, Vec<Arc<str>>> = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut active = HashMap::new();
    for kind in &config.kinds {
        let name = kind.reducer_name();
        let path = config.reducer_path(kind);
        let reducer = match active.get(&name) {
            Some(reducer) => Arc::clone(reducer),
            None => {
                let reducer = active_version(&registry, &name, &path)?;
                active.insert(name.clone(), reducer.clone());
                reducer
            }
        };
        // Which version folds each partition: the deploy records folded so far. A new
        // kind starts every partition with the active version.
        let versions = match store.read().kind_versions(&kind.name)? {
            Some(versions) => versions,
            None => {
                let versions = KindVersions::new(reducer.id());
                store.put_kind_versions(&kind.name, &versions)?;
                versions
            }
        };
        let info = reducer.info();
        tracing::info!(kind = %kind.name, topic = kind.topic(), reducer = %name, versions = %versions.in_use().iter().map(ToString::to_string).collect::<Vec<_>>().join(","), declared = %format!("{}@{}", info.name, info.version), partitions_deployed = versions.partitions.len(), "kind loaded");
        specs.push(KindSpec { name: kind.name.as_str().into(), topic: kind.topic().into(), versions });
        let readers = Versions::new(registry.clone(), limits.reducer_versions_resident_max);
        kinds.push(Kind::new(&kind.name, kind.topic(), &name, readers));
        names.entry(name.clone()).or_default().push(kind.name.as_str().into());
        if let Some(other) = files.insert(name.clone(), path.clone()) {
            anyhow::ensure!(
                other == path,
                "two files are both reducer {name:?} ({} and {}): a reducer's name is its file name, and names must be unique",
                other.display(),
                path.display()
            );
        }
    }

    let topics: Vec<String> = config.kinds.iter().map(|k| k.topic().to_owned()).collect();
    let source_status = Arc::new(SourceStatus::default());
    let (source, writer): (Box<dyn Source>, Writer) = match &config.kafka {
        Some(kafka) => {
            let writer = KafkaWriter::new(kafka, &limits, source_status.clone()).map_err(anyhow::Error::msg)?;
            let source = KafkaSource::start(kafka, &limits, store.clone(), topics, source_status.clone())?;
            (Box::new(source), Writer::Kafka(Arc::new(writer)))
        }
        None => {
            let log = Arc::new(EmbeddedLog::new(store.clone(), source_status.clone()));
            (Box::new(log.source(topics, limits.batch_bytes_max)?), Writer::Embedded(log))
        }
    };
    let others: Vec<String> = store.sources()?.into_iter().filter(|s| s != source.name()).collect();
    anyhow::ensure!(
        others.is_empty(),
        "the store in {} was folded from {} and this configuration reads {}: offsets of different logs do not mix; use another data_dir",
        config.data_dir.display(),
        others.join(", "),
        source.name()
    );
    let engine =
        Engine::new(specs, limits.fold(), Versions::new(registry.clone(), limits.reducer_versions_resident_max));
    let deployer = Arc::new(Deployer::new(registry, names, limits.deploy()));
    let (committed_tx, committed_rx) = watch::channel(0u64);
    let status = Arc::new(Status::default());
    let (attestor, attest_thread) = match &config.kafka {
        Some(kafka) => Attestor::start(kafka, &limits, &config.data_dir, status.stop.clone())?.unzip(),
        None => (None, None),
    };
    let log = Log {
        writer: writer.clone(),
        source_name: source.name(),
        source: source_status,
        read_only: config.read_only,
        attestor: attestor.clone(),
    };
    let app = Arc::new(App::new(limits.clone(), store, kinds, log, committed_rx, status, deployer)?);

    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let fold = {
        let app = app.clone();
        let control = Control {
            replay_page_models: limits.replay_page_models,
            deploy_move_models_max: limits.deploy_move_models_max,
            digests: Digests::new(limits.attest_interval_records),
            attestor,
        };
        std::thread::Builder::new()
            .name("fold".into())
            .spawn(move || fold_loop(source, engine, &app, &committed_tx, control))?
    };
    let interval = Duration::from_millis(limits.reducer_watch_interval_ms);
    let runtime = tokio::runtime::Handle::current();
    let watcher =
        reducer_watch::spawn(app.clone(), runtime, files.into_iter().collect(), interval, app.status.stop.clone())?;
    let listener = DeadlineListener { inner: listener, timeout: Duration::from_millis(limits.http_write_timeout_ms) };
    let router = crate::api::router(app.clone());
    let stop = app.status.stop.clone();
    // `into_make_service`: each connection shares the one router (an `Arc`), where serving
    // a `Router` itself rebuilds its route table per connection (kilobytes each).
    let serve = axum::serve(listener, router.into_make_service());
    let server = tokio::spawn(serve.with_graceful_shutdown(stop.cancelled_owned()).into_future());
    tracing::info!(%addr, "serving");
    let threads = Threads { fold, watcher, attest: attest_thread };
    Ok(Running { addr, app, server, threads, writer })
}

/// The version of reducer `name` to start with: the store's active one (whatever the
/// directory holds now: the store is the record of what folded), else the file, which
/// becomes the first active version.
fn active_version(registry: &Registry, name: &str, path: &Path) -> anyhow::Result<Arc<Reducer>> {
    let file = std::fs::read(path).ok();
    let versions = registry.store.read().versions(name)?;
    if let Some(active) = versions.iter().find(|v| v.status == VersionStatus::Active) {
        let reducer = registry
            .reducer(active.id)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("reducer {name:?}: cannot load its active version {}", active.id))?;
        match file.as_deref().map(ModuleHash::of) {
            Some(id) if id == active.id => {}
            Some(id) => tracing::warn!(
                reducer = name, active = %active.id, file = %path.display(), found = %id,
                "the reducers directory holds another version than the active one; keeping the active version (deploy the file with PUT /v1/reducers/{name} or by replacing it)"
            ),
            None => {
                tracing::warn!(reducer = name, active = %active.id, file = %path.display(), "the reducer file is missing; keeping the active version from the store")
            }
        }
        return Ok(reducer);
    }
    let bytes = file.with_context(|| format!("reducer {name:?}: cannot read {}", path.display()))?;
    let reducer =
        registry.runtime.load(&bytes).with_context(|| format!("reducer {name:?}: cannot load {}", path.display()))?;
    let info = reducer.info();
    anyhow::ensure!(
        info.diff_format == "json" && info.state_format == "json",
        "reducer {name:?} ({}) declares {}/{} diffs/states; the HTTP API serves json only",
        path.display(),
        info.diff_format,
        info.state_format
    );
    let now = crate::source::now_ms();
    let record = VersionRecord {
        name: name.to_owned(),
        id: reducer.id(),
        status: VersionStatus::Active,
        refusal: None,
        origin: "startup".into(),
        declared: Some((info.name.clone(), info.version.clone())),
        bytes: bytes.len() as u64,
        first_ms: now,
        changed_ms: now,
    };
    registry.store.put_versions(&[record], Some((reducer.id(), &bytes)))?;
    tracing::info!(reducer = name, version = %reducer.id(), file = %path.display(), "first version recorded as active");
    Ok(reducer)
}

/// What the fold thread does besides folding.
struct Control {
    replay_page_models: usize,
    deploy_move_models_max: usize,
    /// Each partition's digest, committed with its position.
    digests: Digests,
    /// Publishes the digests' attestation points to the other replicas.
    attestor: Option<Arc<Attestor>>,
}

/// Reads batches from the source, folds them, commits each in one WriteBatch with the
/// source position, then publishes. Between batches: a step moving models off retired
/// reducer versions, and a page of each running replay. Any error here is fatal: the
/// process stops rather than fold past something it could not store.
fn fold_loop(
    mut source: Box<dyn Source>,
    mut engine: Engine,
    app: &App,
    committed: &watch::Sender<u64>,
    mut control: Control,
) {
    let status = &app.status;
    let batch_max = app.limits.batch_records_max;
    while !status.stop.is_cancelled() {
        let retiring = engine.retire(control.deploy_move_models_max) > 0;
        let replays = app.replays_running();
        // While models move or a replay runs, come back to it soon even when the log is idle.
        let busy = retiring || !replays.is_empty();
        for job in replays {
            if let Err(e) = replay_page(&mut engine, app, job, control.replay_page_models, committed) {
                return status.fatal(format!("replay: {e}"));
            }
        }
        let wait = Duration::from_millis(if busy { 1 } else { 100 });
        let records = match source.poll(batch_max, wait) {
            Ok(records) => records,
            Err(e) => return status.fatal(format!("source {}: {e}", source.name())),
        };
        // A replay record ends what one fold takes: the rest is folded after its commit.
        let mut rest = &records[..];
        while !rest.is_empty() {
            let started = Instant::now();
            let mut folded = match engine.fold(rest, &*app.store) {
                Ok(folded) => folded,
                Err(e) => return status.fatal(format!("fold: {e}")),
            };
            let (done, later) = rest.split_at(folded.consumed);
            rest = later;
            if let Some((kind, reducer)) = folded.replays.first() {
                // The replay's progress is committed with its record, so a restart resumes it.
                match replay_started(app, kind, *reducer) {
                    Ok(job) => folded.replay = Some(job),
                    Err(e) => return status.fatal(format!("starting a replay: {e}")),
                }
            }
            let mut positions = positions(source.name(), done);
            let points = match control.digests.advance(&app.store, source.name(), &folded.marks, &mut positions) {
                Ok(points) => points,
                Err(e) => return status.fatal(format!("reading digests: {e}")),
            };
            let versions = match app.deployer.records(&folded.deploys) {
                Ok(versions) => versions,
                Err(e) => return status.fatal(format!("recording deployed versions: {e}")),
            };
            if let Err(e) = app.store.commit_with(&folded, &positions, &versions) {
                return status.fatal(format!("commit: {e}"));
            }
            if let Some(attestor) = &control.attestor {
                attestor.own(points);
            }
            if let Some(job) = folded.replay.take() {
                app.replay_progress(job);
            }
            if !folded.deploys.is_empty() {
                // The batch that switched versions: its time includes compiling a version
                // this server had not seen (a deploy made through another replica).
                status.deploys_folded(folded.deploys.len(), started.elapsed());
            }
            for (_, position) in &positions {
                app.source.set_next(&position.topic, position.partition, position.next_offset);
            }
            source.committed(&positions);
            status.batches_total.fetch_add(1, Ordering::Relaxed);
            status.applied_total.fetch_add(folded.applied.len() as u64, Ordering::Relaxed);
            for rejected in &folded.rejected {
                status.rejected(rejected.reason.code());
                tracing::info!(topic = %rejected.topic, partition = rejected.partition, offset = rejected.offset, code = rejected.reason.code(), reason = %rejected.reason.message(), "record rejected");
            }
            app.hub.publish(&folded);
            committed.send_modify(|n| *n += 1);
            if tracing::enabled!(tracing::Level::DEBUG) {
                // Where a record's latency goes: the batch's records' ages (log timestamp to
                // now) against what this server took from poll to publish.
                let (now, stamps) = (crate::source::now_ms(), done.iter().filter_map(|r| r.timestamp_ms));
                let oldest_ms = stamps.clone().min().map(|t| now - t);
                let newest_ms = stamps.max().map(|t| now - t);
                let took_us = started.elapsed().as_micros() as u64;
                tracing::debug!(records = done.len(), took_us, oldest_ms, newest_ms, "batch published");
            }
        }
        if source.caught_up() && !status.caught_up.swap(true, Ordering::Relaxed) {
            tracing::info!("caught up with the log: ready");
        }
    }
}

/// The job a replay record starts (or starts again: another partition's record of the same
/// replay rescans the kind; models already rebuilt are skipped).
fn replay_started(app: &App, kind: &str, reducer: ModuleHash) -> Result<ReplayJob, StoreError> {
    let job = ReplayJob {
        kind: kind.to_owned(),
        reducer,
        started_ms: crate::source::now_ms(),
        finished_ms: None,
        total: app.store.read().count(kind)?,
        done: 0,
        failed: 0,
        first_error: None,
        cursor: None,
    };
    tracing::info!(kind, reducer = %reducer, models = job.total, "replay started");
    Ok(job)
}

/// Rebuilds the next page of a replay's models and commits them with its progress.
fn replay_page(
    engine: &mut Engine,
    app: &App,
    mut job: ReplayJob,
    page_models: usize,
    committed: &watch::Sender<u64>,
) -> Result<(), String> {
    let page = app.store.read().list(&job.kind, job.cursor.as_deref(), page_models).map_err(|e| e.to_string())?;
    let mut folded = Folded::default();
    for (id, _) in &page {
        match engine.replay_model(&job.kind, id, &*app.store, &mut folded).map_err(|e| e.to_string())? {
            // Rebuilt now, or already (at its first diff after the replay record).
            Ok(_) => job.done += 1,
            Err(reason) => {
                tracing::warn!(kind = %job.kind, id, %reason, "model not replayed; it keeps its history");
                job.failed += 1;
                job.first_error.get_or_insert_with(|| format!("model {id:?}: {reason}"));
            }
        }
        job.cursor = Some(id.clone());
    }
    if page.len() < page_models {
        job.finished_ms = Some(crate::source::now_ms());
        tracing::info!(kind = %job.kind, done = job.done, failed = job.failed, "replay finished");
    }
    folded.replay = Some(job.clone());
    app.store.commit(&folded, &[]).map_err(|e| e.to_string())?;
    app.hub.publish(&folded);
    committed.send_modify(|n| *n += 1);
    app.replay_progress(job);
    Ok(())
}

/// Accepts TCP connections whose writes have a deadline.
struct DeadlineListener {
    inner: TcpListener,
    timeout: Duration,
}

impl axum::serve::Listener for DeadlineListener {
    type Io = DeadlineIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (DeadlineIo, SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        (DeadlineIo { io, timeout: self.timeout, stalled: None }, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails a write the peer has not taken within the timeout: a client
/// that stops reading is disconnected (it resumes later with its last hash) instead of
/// holding buffers forever.
struct DeadlineIo {
    io: TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl DeadlineIo {
    fn deadline<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client took no bytes for {timeout:?} (http_write_timeout_ms)"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncRead for DeadlineIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeadlineIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.deadline(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.deadline(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.deadline(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
