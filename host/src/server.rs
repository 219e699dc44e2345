//! Wires a running Statefold: store, reducers, source, the fold loop (its own thread) and
//! the HTTP server. The binary and the integration tests start it the same way.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::app::{App, Kind, Log, Status};
use crate::config::Config;
use crate::fold::{Engine, KindSpec, Record};
use crate::reducer::Runtime;
use crate::source::{EmbeddedLog, KafkaSource, KafkaWriter, Source, SourceStatus, Writer};
use crate::store::{Position, Store, StoreOptions};

/// A running Statefold.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    server: tokio::task::JoinHandle<io::Result<()>>,
    fold: std::thread::JoinHandle<()>,
    writer: Writer,
}

impl Running {
    /// Stops and waits until everything has stopped.
    pub async fn stop(self) -> Result<(), String> {
        self.app.status.stop.cancel();
        self.wait().await
    }

    /// Runs until stopped (by [`Running::stop`], a signal wired by the caller, or a fatal
    /// error); returns the fatal error if there was one.
    pub async fn wait(self) -> Result<(), String> {
        self.app.status.stop.cancelled().await;
        let served = self.server.await;
        let fold = self.fold;
        let _ = tokio::task::spawn_blocking(move || fold.join()).await;
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
    config.validate().map_err(anyhow::Error::msg)?;
    let limits = config.limits.clone();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir.join("db"), &StoreOptions { fsync: limits.store_fsync })
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let store = Arc::new(store);
    let runtime = Runtime::new(limits.reducer(), Some(config.data_dir.join("compiled")))?;

    let mut kinds = Vec::new();
    let mut specs = Vec::new();
    for kind in &config.kinds {
        let path = config.reducer_path(kind);
        let reducer = runtime
            .load_file(&path)
            .with_context(|| format!("kind {:?}: cannot load reducer {}", kind.name, path.display()))?;
        let info = reducer.info();
        anyhow::ensure!(
            info.diff_format == "json" && info.state_format == "json",
            "kind {:?}: reducer {} declares {}/{} diffs/states; the HTTP API serves json only",
            kind.name,
            path.display(),
            info.diff_format,
            info.state_format
        );
        tracing::info!(kind = %kind.name, topic = kind.topic(), reducer = %reducer.id(), name = %info.name, version = %info.version, "kind loaded");
        specs.push(KindSpec { name: kind.name.as_str().into(), topic: kind.topic().into(), reducer: reducer.clone() });
        kinds.push(Kind::new(&kind.name, kind.topic(), reducer));
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
    let engine = Engine::new(specs, limits.fold());
    let (committed_tx, committed_rx) = watch::channel(0u64);
    let status = Arc::new(Status::default());
    let log = Log { writer: writer.clone(), source_name: source.name(), source: source_status };
    let app = Arc::new(App::new(limits.clone(), store, kinds, log, committed_rx, status));

    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let fold = {
        let app = app.clone();
        std::thread::Builder::new().name("fold".into()).spawn(move || fold_loop(source, engine, &app, &committed_tx))?
    };
    let listener = DeadlineListener { inner: listener, timeout: Duration::from_millis(limits.http_write_timeout_ms) };
    let router = crate::api::router(app.clone());
    let stop = app.status.stop.clone();
    let server =
        tokio::spawn(axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).into_future());
    tracing::info!(%addr, "serving");
    Ok(Running { addr, app, server, fold, writer })
}

/// Reads batches from the source, folds them, commits each in one WriteBatch with the
/// source position, then publishes. Any error here is fatal: the process stops rather than
/// fold past something it could not store.
fn fold_loop(mut source: Box<dyn Source>, mut engine: Engine, app: &App, committed: &watch::Sender<u64>) {
    let status = &app.status;
    let batch_max = app.limits.batch_records_max;
    while !status.stop.is_cancelled() {
        let records = match source.poll(batch_max, Duration::from_millis(100)) {
            Ok(records) => records,
            Err(e) => return status.fatal(format!("source {}: {e}", source.name())),
        };
        if !records.is_empty() {
            let folded = match engine.fold(&records, &*app.store) {
                Ok(folded) => folded,
                Err(e) => return status.fatal(format!("fold: {e}")),
            };
            let positions = positions(source.name(), &records);
            if let Err(e) = app.store.commit(&folded, &positions) {
                return status.fatal(format!("commit: {e}"));
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
        }
        if source.caught_up() && !status.caught_up.swap(true, Ordering::Relaxed) {
            tracing::info!("caught up with the log: ready");
        }
    }
}

/// The next offset of every partition a batch read from.
fn positions(source: &str, records: &[Record]) -> Vec<(String, Position)> {
    let mut next: HashMap<(&str, u32), u64> = HashMap::new();
    for record in records {
        let slot = next.entry((&*record.topic, record.partition)).or_default();
        *slot = (*slot).max(record.offset + 1);
    }
    next.into_iter()
        .map(|((topic, partition), next_offset)| {
            (source.to_owned(), Position { topic: topic.to_owned(), partition, next_offset })
        })
        .collect()
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
