//! Wires a running Statefold: store, reducers, source, the fold loop ([`crate::pipeline`],
//! its own thread) and the HTTP server (a write deadline on every connection). The binary and the integration tests start it the same way.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::app::{App, Kind, Log, Process, Status};
use crate::auth::Auth;
use crate::config::Config;
use crate::deploy::{Deployer, Registry};
use crate::fold::{Engine, KindSpec, Resolve, Versions};
use crate::metrics::Metrics;
use crate::model::KindVersions;
use crate::model::ModuleHash;
use crate::model::{VersionRecord, VersionStatus};
use crate::reducer::{Natives, Reducer, Runtime};
use crate::source::attest::{Attestor, Digests};
use crate::source::cluster::Cluster;
use crate::source::relay::{Relay, Sink};
use crate::source::{EmbeddedLog, KafkaSource, KafkaWriter, Source, SourceStatus, Writer};
use crate::store::{Store, StoreOptions};
use crate::watch as reducer_watch;

/// A running Statefold.
pub struct Running {
    pub addr: SocketAddr,
    /// `http://ADDR` or `https://ADDR`.
    pub url: String,
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
    cluster: Option<std::thread::JoinHandle<()>>,
    relay: std::thread::JoinHandle<()>,
}

impl Threads {
    /// Waits for all of them (a panic in any is already reported by the panic hook).
    fn join(self) {
        let _ = (self.fold.join(), self.watcher.join(), self.attest.map(|a| a.join()), self.cluster.map(|c| c.join()));
        let _ = self.relay.join();
    }
}

/// Why a running Statefold stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// A store error on the fold path, or corruption found by a read: the reason.
    #[error("{0}")]
    Fatal(String),
    #[error("HTTP server: {0}")]
    Server(#[from] io::Error),
    #[error("HTTP server task: {0}")]
    ServerTask(#[from] tokio::task::JoinError),
}

impl Running {
    /// Stops and waits until everything has stopped.
    pub async fn stop(self) -> Result<(), Stopped> {
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
    pub async fn wait(self) -> Result<(), Stopped> {
        self.app.status.stop.cancelled().await;
        let served = self.server.await;
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || threads.join()).await;
        if let Writer::Kafka(producer) = self.writer {
            let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        }
        if let Some(reason) = self.app.status.fatal_reason() {
            return Err(Stopped::Fatal(reason));
        }
        Ok(served??)
    }
}

/// Opens everything the config names and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, Natives::new()).await
}

/// [`start`], running the modules in `natives` through native stand-ins: how the
/// benchmark suite measures what the wasm sandbox costs in the whole pipeline.
pub async fn start_with(config: Config, natives: Natives) -> anyhow::Result<Running> {
    config.validate()?;
    // Read before anything is opened, so that a bad file fails the start alone.
    let tls = config.tls.as_ref().map(crate::tls::load).transpose()?;
    let limits = config.limits.clone();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir.join("db"), &limits.store())
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let store = Arc::new(store);
    let metrics = Arc::new(Metrics::new());
    let runtime = Runtime::new(limits.reducer(), Some(config.data_dir.join("compiled")))?
        .with_natives(natives)
        .with_call_timer({
            let call_seconds = metrics.reducer_call_seconds.clone();
            Arc::new(move |seconds| call_seconds.observe(seconds))
        });
    let runtime = Arc::new(runtime);
    let registry = Arc::new(Registry { runtime: runtime.clone(), store: store.clone() });

    let Kinds { kinds, specs, names, files } = load_kinds(&config, &store, &registry)?;

    let source_status = Arc::new(SourceStatus::default());
    let status = Arc::new(Status::default());
    let stop = status.stop.clone();
    let (source, writer, cluster) = open_log(&config, &store, &source_status, &stop)?;
    let engine =
        Engine::new(specs, limits.fold(), Versions::new(registry.clone(), limits.reducer_versions_resident_max));
    let deployer = Arc::new(Deployer::new(registry, names, limits.deploy()));
    let (committed_tx, committed_rx) = watch::channel(0u64);
    let (cluster, cluster_thread) = cluster.unzip();
    let (attestor, attest_thread) = match &config.kafka {
        Some(kafka) => {
            let compared = metrics.replica_digests_compared.clone();
            Attestor::start(kafka, &limits.source(), &config.data_dir, status.stop.clone(), compared)?.unzip()
        }
        None => (None, None),
    };
    let relay = Relay::new(store.outbox_len()?, &limits.source(), metrics.reactions_relayed.clone());
    let relay_thread = start_relay(&config, &relay, &store, &writer, &source_status, cluster.clone(), &status.stop)?;
    let log = Log {
        relay,
        writer: writer.clone(),
        source_name: source.name(),
        source: source_status,
        read_only: config.read_only,
        attestor: attestor.clone(),
        cluster,
    };
    let auth = auth_of(&config)?;
    let app = Arc::new(
        App::new(limits.clone(), store, kinds, log, Process { committed: committed_rx, status, metrics }, deployer)?
            .with_auth(auth),
    );

    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("{}://{addr}", if config.tls.is_some() { "https" } else { "http" });
    let fold = {
        let app = app.clone();
        let control = crate::pipeline::Control {
            replay_page_models: limits.replay_page_models,
            deploy_move_models_max: limits.deploy_move_models_max,
            digests: Digests::new(limits.attest_interval_records),
            attestor,
        };
        std::thread::Builder::new()
            .name("fold".into())
            .spawn(move || crate::pipeline::fold_loop(source, engine, &app, &committed_tx, control))?
    };
    let interval = Duration::from_millis(limits.reducer_watch_interval_ms);
    let runtime = tokio::runtime::Handle::current();
    let watcher =
        reducer_watch::spawn(app.clone(), runtime, files.into_iter().collect(), interval, app.status.stop.clone())?;
    let router = crate::api::router(app.clone());
    let router = match &config.cors {
        Some(cors) => router.layer(cors_layer(cors)),
        None => router,
    };
    let stop = app.status.stop.clone();
    let server = serve(listener, router, &config, tls, stop);
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, "serving");
    start_requests(&app, &config)?;
    let threads = Threads { fold, watcher, attest: attest_thread, cluster: cluster_thread, relay: relay_thread };
    tokio::spawn({
        let app = app.clone();
        async move { app.write_genesis().await }
    });
    Ok(Running { addr, url, app, server, threads, writer })
}

/// What the configured kinds need: each kind's service side and engine spec, the kinds of
/// each reducer, and the file of each reducer the watch follows.
struct Kinds {
    kinds: Vec<Kind>,
    specs: Vec<KindSpec>,
    names: BTreeMap<String, Vec<Arc<str>>>,
    files: BTreeMap<String, std::path::PathBuf>,
}

/// Loads each configured kind's active reducer version and the version each of its
/// partitions folds with.
fn load_kinds(config: &Config, store: &Arc<Store>, registry: &Arc<Registry>) -> anyhow::Result<Kinds> {
    let limits = &config.limits;
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
                let reducer = active_version(registry, &name, &path)?;
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

    Ok(Kinds { kinds, specs, names, files })
}

/// The cluster a sharded server joined, and its thread.
type Joined = (Arc<Cluster>, std::thread::JoinHandle<()>);

/// The log the fold reads and appends go to: Kafka (sharded if `[cluster]`: the cluster
/// joined, and its thread) or the embedded log.
fn open_log(
    config: &Config,
    store: &Arc<Store>,
    source_status: &Arc<SourceStatus>,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<(Box<dyn Source>, Writer, Option<Joined>)> {
    let (limits, topics) = (&config.limits, config.kinds.iter().map(|k| k.topic().to_owned()).collect::<Vec<_>>());
    let mut cluster = None;
    let (source, writer): (Box<dyn Source>, Writer) = match &config.kafka {
        Some(kafka) => {
            let writer = KafkaWriter::new(kafka, &limits.source(), source_status.clone())?;
            let source =
                KafkaSource::start(kafka, &limits.source(), store.clone(), topics.clone(), source_status.clone())?;
            let source = match &config.cluster {
                Some(cluster_config) => {
                    let member = crate::source::attest::server_id(&config.data_dir)?;
                    let (joined, thread) = Cluster::start(
                        cluster_config,
                        kafka,
                        &limits.source(),
                        member,
                        topics,
                        source_status.clone(),
                        stop.clone(),
                    )?;
                    cluster = Some((joined.clone(), thread));
                    source.sharded(joined)
                }
                None => source,
            };
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
    Ok((source, writer, cluster))
}

/// The relay's thread: reactions from the outbox to Kafka, or to the embedded log.
fn start_relay(
    config: &Config,
    relay: &Arc<Relay>,
    store: &Arc<Store>,
    writer: &Writer,
    source_status: &Arc<SourceStatus>,
    cluster: Option<Arc<Cluster>>,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let sink = match (&config.kafka, writer) {
        (Some(kafka), _) => Sink::Kafka { config: kafka.clone(), transactional: config.reactions.transactional },
        (None, Writer::Embedded(log)) => Sink::Embedded(log.clone()),
        (None, Writer::Kafka(_)) => unreachable!("a Kafka writer comes with [kafka]"),
    };
    let (relay, store, source) = (relay.clone(), store.clone(), source_status.clone());
    let (relays, limits, stop) = (config.reactions.relay, config.limits.source(), stop.clone());
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            crate::source::relay::run(relay, store, sink, source, cluster, relays, limits, || stop.is_cancelled())
        })
        .map_err(Into::into)
}

/// Request/reply over Kafka, if `[requests]`.
fn start_requests(app: &Arc<App>, config: &Config) -> anyhow::Result<()> {
    let limits = &config.limits;
    if let (Some(requests), Some(kafka)) = (&config.requests, &config.kafka) {
        let group =
            requests.group.clone().unwrap_or_else(|| format!("{}.requests.{}", kafka.group_id, requests.target));
        let (consumer, producer) = crate::source::request_clients(kafka, &limits.source(), &requests.topic, &group)?;
        let settings = crate::api::requests::Settings {
            target: requests.target.clone(),
            in_flight_max: limits.requests_in_flight_max,
            produce_timeout: Duration::from_millis(limits.kafka_produce_timeout_ms),
        };
        tracing::info!(topic = %requests.topic, target = %requests.target, %group, "serving request/reply over Kafka");
        tokio::spawn(crate::api::requests::serve(app.clone(), consumer, producer, settings, app.status.stop.clone()));
    }
    Ok(())
}

/// Access control, if `[auth]`; a warning when a server without it listens beyond
/// loopback.
fn auth_of(config: &Config) -> anyhow::Result<Option<Auth>> {
    Ok(match &config.auth {
        Some(auth) => {
            let origins = config.cors.as_ref().map(|c| c.allowed_origins.clone()).unwrap_or_default();
            Some(Auth::new(auth, &origins)?)
        }
        None => {
            if !config.listen.ip().is_loopback() {
                tracing::warn!(listen = %config.listen, "SERVING WITHOUT ACCESS CONTROL on a non-loopback address: anyone who reaches it can read, write, deploy and replay; configure [auth]");
            }
            None
        }
    })
}

/// Serves `router` on `listener` until `stop`: HTTP/1.1 and HTTP/2 (over TLS as ALPN picks;
/// in the clear, HTTP/2 with prior knowledge), each connection's writes under the write
/// deadline, TLS handshakes in the connection's own task (a slow one holds up no other
/// accept), HTTP/2's streams and buffers bounded by `[limits]`. On `stop`, connections get
/// `http_write_timeout_ms` to finish.
fn serve(
    listener: TcpListener,
    router: axum::Router,
    config: &Config,
    tls: Option<rustls::ServerConfig>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<io::Result<()>> {
    let limits = &config.limits;
    let write_timeout = Duration::from_millis(limits.http_write_timeout_ms);
    let handle = axum_server::Handle::<SocketAddr>::new();
    let mut server = axum_server::Server::from_listener(listener).handle(handle.clone());
    server
        .http_builder()
        .http2()
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_send_buf_size(limits.http2_stream_send_buffer_bytes)
        .initial_stream_window_size(limits.http2_stream_window_bytes)
        .initial_connection_window_size(limits.http2_connection_window_bytes);
    let deadline = DeadlineAcceptor { timeout: write_timeout };
    // `into_make_service`: each connection shares the one router (an `Arc`), where serving
    // a `Router` itself rebuilds its route table per connection (kilobytes each).
    let make_service = router.into_make_service();
    let serving = match config.tls.as_ref().zip(tls) {
        Some((files, first)) => {
            let rustls = crate::tls::reloading(files, first, stop.clone());
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(rustls)
                .handshake_timeout(Duration::from_millis(files.handshake_timeout_ms))
                .acceptor(deadline);
            tokio::spawn(server.acceptor(acceptor).serve(make_service))
        }
        None => tokio::spawn(server.acceptor(deadline).serve(make_service)),
    };
    tokio::spawn(async move {
        stop.cancelled().await;
        handle.graceful_shutdown(Some(write_timeout));
    });
    serving
}

/// The CORS layer `[cors]` configures (tower-http): its origins, the methods and headers
/// the API takes, the headers a page may read (`ETag`, `WWW-Authenticate`), credentials if
/// allowed, and how long a preflight may be cached.
fn cors_layer(config: &crate::config::CorsConfig) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    let origins: Vec<HeaderValue> =
        config.allowed_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::PUT])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_NONE_MATCH,
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([header::ETAG, header::WWW_AUTHENTICATE])
        .allow_credentials(config.allow_credentials)
        .max_age(Duration::from_secs(config.max_age_s))
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
        origin: crate::deploy::STARTUP_ORIGIN.into(),
        subject: None,
        declared: Some((info.name.clone(), info.version.clone())),
        bytes: bytes.len() as u64,
        first_ms: now,
        changed_ms: now,
    };
    registry.store.put_versions(&[record], Some((reducer.id(), &bytes)))?;
    tracing::info!(reducer = name, version = %reducer.id(), file = %path.display(), "first version recorded as active");
    Ok(reducer)
}

/// Gives each accepted TCP connection a write deadline ([`DeadlineIo`]), under TLS where
/// that is on.
#[derive(Clone)]
struct DeadlineAcceptor {
    timeout: Duration,
}

impl<S> axum_server::accept::Accept<TcpStream, S> for DeadlineAcceptor {
    type Stream = DeadlineIo;
    type Service = S;
    type Future = std::future::Ready<io::Result<(DeadlineIo, S)>>;

    fn accept(&self, io: TcpStream, service: S) -> Self::Future {
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        std::future::ready(Ok((DeadlineIo { io, timeout: self.timeout, stalled: None }, service)))
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

/// `statefold reset KIND`: forgets everything this data dir folded for `kind`
/// ([`Store::reset_kind`]), so that its next start folds the kind's topic from its first
/// record with the configured reducer. For a kind whose folding stopped because its topic
/// is not the log the store folded. The server must be stopped (RocksDB's lock says so).
/// Returns the models forgotten.
pub fn reset(config: &Config, kind: &str) -> anyhow::Result<u64> {
    let spec = config.kinds.iter().find(|k| k.name == kind).with_context(|| {
        let names: Vec<&str> = config.kinds.iter().map(|k| k.name.as_str()).collect();
        format!("no kind {kind:?} in the configuration (kinds: {})", names.join(", "))
    })?;
    let db = config.data_dir.join("db");
    anyhow::ensure!(db.exists(), "no store in {}", config.data_dir.display());
    let store = Store::open(&db, &StoreOptions { fsync: true, ..config.limits.store() })
        .with_context(|| format!("cannot open the store in {} (stop its server first)", config.data_dir.display()))?;
    let models = store.read().count(kind)?;
    store.reset_kind(kind, spec.topic())?;
    tracing::info!(kind, topic = spec.topic(), models, "kind reset: its next start refolds the topic from its start");
    Ok(models)
}
