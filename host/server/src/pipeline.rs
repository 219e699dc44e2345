//! The data path's driver: the fold thread and its commit thread. The fold thread polls
//! the source and folds each batch with the engine; the commit thread commits it in one
//! WriteBatch with the source position (and the partitions' digests and any deploy's
//! version records), then publishes it to the hub, while the fold thread folds the next.
//! Between batches the fold thread moves models off retired reducer versions and rebuilds
//! a page of each running replay. `server` starts it; nothing else calls it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use crate::app::App;
use crate::fold::{Engine, FoldError, History, Replayed, View, ViewError};
use crate::model::{Folded, Head, Keyed, ModelKey, ModuleHash, Record, ReplayJob, VersionRecord};
use crate::source::attest::{Attestor, Digests, Point};
use crate::source::{Source, positions};
use crate::store::{Position, Store, StoreError};

/// What the fold thread does besides folding.
pub struct Control {
    pub replay_page_models: usize,
    pub deploy_move_models_max: usize,
    /// Each partition's digest, committed with its position.
    pub digests: Digests,
    /// Publishes the digests' attestation points to the other replicas.
    pub attestor: Option<Arc<Attestor>>,
}

/// Reads batches from the source, folds them, commits each in one WriteBatch with the
/// source position, then publishes. Between batches: a step moving models off retired
/// reducer versions, and a page of each running replay. Any error ends folding rather than
/// fold past something it could not store: the process stops, except on a failed store
/// write (see [`stop_on`]).
///
/// Two threads, so that both cores work: this one polls and folds, a `commit` thread
/// writes each folded batch and publishes it. Folding batch N+1 overlaps committing batch
/// N, and no more: one commit in flight, one batch folded ahead (memory bounded by two
/// batches). Batches are committed in order, each in its one WriteBatch with its
/// positions, so what a crash leaves is what it left before (a prefix of the batches).
/// Whatever reads the store on this thread waits for the commit in flight first: the
/// engine's reads (through [`Settled`]), the source's (it is polled only with nothing in
/// flight), replays, deploys' version records. A failed commit stops folding before
/// anything after it is committed.
pub fn fold_loop(
    mut source: Box<dyn Source>,
    mut engine: Engine,
    app: &App,
    committed: &watch::Sender<u64>,
    mut control: Control,
) {
    let flight = InFlight::default();
    let attestor = control.attestor.take();
    let (to_commit, batches) = std::sync::mpsc::sync_channel::<Batch>(1);
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("commit".into())
            .spawn_scoped(scope, || commit_loop(batches, app, committed, attestor.as_deref(), &flight));
        if let Err(e) = spawned {
            return app.status.fatal(format!("cannot start the commit thread: {e}"));
        }
        let mut folder = Folder { source: &mut *source, app, flight: &flight, to_commit, committing: None };
        folder.run(&mut engine, &mut control, committed);
        // Dropping the sender ends the commit thread after the batch it has.
    });
}

/// The fold thread's side of [`fold_loop`].
struct Folder<'a> {
    source: &'a mut dyn Source,
    app: &'a App,
    flight: &'a InFlight,
    to_commit: std::sync::mpsc::SyncSender<Batch>,
    /// The positions of the batch in flight, for the source once it is committed.
    committing: Option<Vec<(String, Position)>>,
}

/// Folding ended; why has been reported.
struct Ended;

impl Folder<'_> {
    fn run(&mut self, engine: &mut Engine, control: &mut Control, committed: &watch::Sender<u64>) {
        let (app, status) = (self.app, &self.app.status);
        let batch_max = app.limits.batch_records_max;
        // A batch folded and not yet handed to the commit thread: it goes after the next
        // poll (which does not wait while it is here), so the next fold overlaps its commit.
        let mut ready: Option<Batch> = None;
        loop {
            // Nothing in flight from here to the poll: the source reads the store as committed.
            if self.settle().is_err() {
                return;
            }
            if status.stop.is_cancelled() {
                let _ = self.flush(&mut ready);
                return;
            }
            let retiring = engine.retire(control.deploy_move_models_max) > 0;
            let replays = app.replays_running();
            // While models move or a replay runs, come back to it soon even when the log is idle.
            let busy = retiring || !replays.is_empty();
            // A replay page reads the store and commits on this thread: after every batch.
            if !replays.is_empty() && self.flush(&mut ready).and_then(|()| self.settle()).is_err() {
                return;
            }
            for job in replays {
                match replay_page(engine, app, job, control.replay_page_models, committed) {
                    Ok(()) => {}
                    Err(ReplayError::Store(e)) => return stop_on(app, "replay", &e),
                    Err(e) => return status.fatal(format!("replay: {e}")),
                }
            }
            if app.relay.full() {
                // The outbox is full: fold nothing more until the relay has caught up (the
                // log keeps what is not folded; `/readyz` says why).
                if self.flush(&mut ready).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let wait = Duration::from_millis(match (&ready, busy) {
                (Some(_), _) => 0,
                (None, true) => 1,
                (None, false) => 100,
            });
            let records = match self.source.poll(batch_max, wait) {
                Ok(records) => records,
                Err(e) => return status.fatal(format!("source {}: {e}", self.source.name())),
            };
            for (topic, partitions) in self.source.partitions() {
                engine.set_partitions(&topic, partitions);
            }
            if self.flush(&mut ready).is_err() {
                return;
            }
            // A replay record ends what one fold takes: the rest is folded after its commit.
            let mut rest = &records[..];
            while !rest.is_empty() {
                let Ok((batch, later)) = self.fold(engine, control, rest) else { return };
                rest = later;
                ready = Some(batch);
                if !rest.is_empty() && self.flush(&mut ready).is_err() {
                    return;
                }
            }
        }
    }

    /// Folds the records of one batch (up to a replay record); the batch to commit, and
    /// the records after it.
    fn fold<'r>(
        &mut self,
        engine: &mut Engine,
        control: &mut Control,
        records: &'r [Record],
    ) -> Result<(Batch, &'r [Record]), Ended> {
        let (app, status) = (self.app, &self.app.status);
        let started = Instant::now();
        let view = Settled { store: &app.store, flight: self.flight };
        let mut folded = match engine.fold(records, &view) {
            Ok(folded) => folded,
            // The commit before it failed, and said so.
            Err(_) if self.flight.failed() => return Err(Ended),
            Err(e) => {
                status.fatal(format!("fold: {e}"));
                return Err(Ended);
            }
        };
        app.metrics.fold_batch_seconds.observe(started.elapsed().as_secs_f64());
        let (done, later) = records.split_at(folded.consumed);
        if let Some((kind, reducer, subject)) = folded.replays.first() {
            // The replay's progress is committed with its record, so a restart resumes it.
            self.settle()?;
            match replay_started(app, kind, *reducer, subject.clone()) {
                Ok(job) => folded.replay = Some(job),
                Err(e) => {
                    status.fatal(format!("starting a replay: {e}"));
                    return Err(Ended);
                }
            }
        }
        let mut positions = positions(self.source.name(), done);
        // (It reads the store only for a partition it has never seen: no batch in flight
        // holds one.)
        let points = match control.digests.advance(&app.store, self.source.name(), &folded.marks, &mut positions) {
            Ok(points) => points,
            Err(e) => {
                status.fatal(format!("reading digests: {e}"));
                return Err(Ended);
            }
        };
        if !folded.deploys.is_empty() {
            self.settle()?;
        }
        let versions = match app.deployer.records(&folded.deploys) {
            Ok(versions) => versions,
            Err(e) => {
                status.fatal(format!("recording deployed versions: {e}"));
                return Err(Ended);
            }
        };
        let ages = if tracing::enabled!(tracing::Level::DEBUG) {
            // Where a record's latency goes: the batch's records' ages (log timestamp to
            // now) against what this server took from poll to publish.
            let (now, stamps) = (crate::source::now_ms(), done.iter().filter_map(|r| r.timestamp_ms));
            Some((done.len(), stamps.clone().min().map(|t| now - t), stamps.max().map(|t| now - t)))
        } else {
            None
        };
        Ok((Batch { folded, positions, versions, points, started, ages }, later))
    }

    /// Waits for the batch in flight to be committed, and tells the source.
    fn settle(&mut self) -> Result<(), Ended> {
        self.flight.settle()?;
        if let Some(positions) = self.committing.take() {
            self.source.committed(&positions);
        }
        if self.source.caught_up() && !self.app.status.caught_up.swap(true, Ordering::Relaxed) {
            tracing::info!("caught up with the log: ready");
        }
        Ok(())
    }

    /// Hands the ready batch, if any, to the commit thread (after the one in flight), and
    /// returns without waiting for its commit.
    fn flush(&mut self, ready: &mut Option<Batch>) -> Result<(), Ended> {
        let Some(batch) = ready.take() else { return Ok(()) };
        self.settle()?;
        self.committing = Some(batch.positions.clone());
        self.flight.submitted();
        self.to_commit.send(batch).map_err(|_| Ended)
    }
}

/// A folded batch on its way to the store.
struct Batch {
    folded: Folded,
    positions: Vec<(String, Position)>,
    versions: Vec<VersionRecord>,
    points: Vec<Point>,
    /// When its fold began (just after its poll).
    started: Instant,
    /// Records, and the oldest and newest record's age when folded (ms), if logged.
    ages: Option<(usize, Option<i64>, Option<i64>)>,
}

/// The commit thread: commits each batch, then publishes it. Ends at the first failed
/// commit (reported by [`stop_on`]), or when the fold thread is done.
fn commit_loop(
    batches: std::sync::mpsc::Receiver<Batch>,
    app: &App,
    committed: &watch::Sender<u64>,
    attestor: Option<&Attestor>,
    flight: &InFlight,
) {
    // A panic here must not leave the fold thread waiting, nor the process serving as if
    // it folded.
    let _failed_unless_done = FailOnUnwind(flight, app);
    let metrics = &app.metrics;
    for mut batch in batches {
        let folded = &batch.folded;
        if let Err(e) = commit(app, folded, &batch.positions, &batch.versions) {
            stop_on(app, "commit", &e);
            return flight.finished(false);
        }
        if let Some(attestor) = attestor {
            attestor.own(std::mem::take(&mut batch.points));
        }
        if let Some(job) = batch.folded.replay.take() {
            app.replay_progress(job);
        }
        let folded = &batch.folded;
        if !folded.deploys.is_empty() {
            // The batch that switched versions: its time includes compiling a version
            // this server had not seen (a deploy made through another replica).
            metrics.deploys_folded(folded.deploys.len(), batch.started.elapsed());
        }
        for (_, position) in &batch.positions {
            app.source.set_next(&position.topic, position.partition, position.next_offset);
        }
        app.relay.added(folded.outbox.len());
        metrics.fold_batches.inc();
        metrics.diffs_applied.inc_by(folded.applied.len() as u64);
        for rejected in &folded.rejected {
            metrics.rejected(rejected.reason.code().as_str());
            tracing::info!(topic = %rejected.topic, partition = rejected.partition, offset = rejected.offset, code = %rejected.reason.code(), reason = %rejected.reason.message(), "record rejected");
        }
        app.hub.publish(folded);
        committed.send_modify(|n| *n += 1);
        if let Some((records, oldest_ms, newest_ms)) = batch.ages {
            let took_us = batch.started.elapsed().as_micros() as u64;
            tracing::debug!(records, took_us, oldest_ms, newest_ms, "batch published");
        }
        flight.finished(true);
    }
}

/// Batches handed to the commit thread and committed (see [`fold_loop`]).
#[derive(Default)]
struct InFlight {
    state: Mutex<Flight>,
    changed: Condvar,
}

#[derive(Default)]
struct Flight {
    submitted: u64,
    finished: u64,
    failed: bool,
}

impl InFlight {
    fn submitted(&self) {
        self.state.lock().expect("not poisoned").submitted += 1;
    }

    fn finished(&self, ok: bool) {
        let mut state = self.state.lock().expect("not poisoned");
        state.finished += 1;
        state.failed |= !ok;
        self.changed.notify_all();
    }

    /// Waits until every batch handed over is committed; `Err` if one failed (reported).
    fn settle(&self) -> Result<(), Ended> {
        let mut state = self.state.lock().expect("not poisoned");
        while state.finished < state.submitted && !state.failed {
            state = self.changed.wait(state).expect("not poisoned");
        }
        if state.failed { Err(Ended) } else { Ok(()) }
    }

    fn failed(&self) -> bool {
        self.state.lock().expect("not poisoned").failed
    }
}

/// Marks the flight failed, and the process fatally stopped, if the commit thread unwinds.
struct FailOnUnwind<'a>(&'a InFlight, &'a App);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.1.status.fatal("the commit thread panicked".to_owned());
            self.0.finished(false);
        }
    }
}

/// The store as the fold reads it: after the commit in flight.
struct Settled<'a> {
    store: &'a Store,
    flight: &'a InFlight,
}

impl Settled<'_> {
    fn settled(&self) -> Result<&Store, ViewError> {
        match self.flight.settle() {
            Ok(()) => Ok(self.store),
            Err(Ended) => Err("the commit of the batch before failed".into()),
        }
    }
}

impl View for Settled<'_> {
    fn head(&self, model: &ModelKey) -> Result<Option<Head>, ViewError> {
        self.settled()?.head(model)
    }
    fn keyed(&self, model: &ModelKey, key: &str) -> Result<Option<Keyed>, ViewError> {
        self.settled()?.keyed(model, key)
    }
    fn checkpoint(&self, model: &ModelKey, head: &Head) -> Result<History, ViewError> {
        self.settled()?.checkpoint(model, head)
    }
    fn deploy_chunk(&self, module: &ModuleHash, index: u32) -> Result<Option<Bytes>, ViewError> {
        self.settled()?.deploy_chunk(module, index)
    }
    fn module(&self, id: &ModuleHash) -> Result<Option<Bytes>, ViewError> {
        View::module(self.settled()?, id)
    }
}

/// Ends the fold thread on a store error: the process stops on corruption or a broken
/// invariant; on a failed write (disk full, I/O error) folding stops and the process
/// serves reads, refuses writes and says why until it is restarted.
fn stop_on(app: &App, what: &str, error: &StoreError) {
    if error.is_fatal() {
        app.status.fatal(format!("{what}: {error}"));
    } else {
        app.status.unwritable(format!("{what}: {error}"));
    }
}

/// Commits a batch (or a replay's page) in one WriteBatch, timed and counted.
fn commit(
    app: &App,
    folded: &Folded,
    positions: &[(String, Position)],
    versions: &[VersionRecord],
) -> Result<(), StoreError> {
    let started = Instant::now();
    let committed = app.store.commit_with(folded, positions, versions)?;
    app.metrics.committed(committed, started.elapsed());
    Ok(())
}

/// Why a page of a replay could not be rebuilt and committed (fatal, as for a batch).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fold(#[from] FoldError),
}

/// The job a replay record starts (or starts again: another partition's record of the same
/// replay rescans the kind; models already rebuilt are skipped).
fn replay_started(
    app: &App,
    kind: &str,
    reducer: ModuleHash,
    subject: Option<String>,
) -> Result<ReplayJob, StoreError> {
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
        subject,
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
) -> Result<(), ReplayError> {
    let page = app.store.read().list(&job.kind, job.cursor.as_deref(), page_models)?;
    let mut folded = Folded::default();
    for (id, _) in &page {
        match engine.replay_model(&job.kind, id, &*app.store, &mut folded)? {
            // Rebuilt now, or already (at its first diff after the replay record).
            Replayed::Rebuilt | Replayed::Unchanged => job.done += 1,
            Replayed::Kept(reason) => {
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
    commit(app, &folded, &[], &[])?;
    app.hub.publish(&folded);
    committed.send_modify(|n| *n += 1);
    app.replay_progress(job);
    Ok(())
}
