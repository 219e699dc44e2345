//! The data path's driver: the fold thread. It polls the source, folds each batch with
//! the engine, commits it in one WriteBatch with the source position (and the partitions'
//! digests and any deploy's version records), then publishes it to the hub. Between
//! batches it moves models off retired reducer versions and rebuilds a page of each
//! running replay. `server` starts it; nothing else calls it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::app::App;
use crate::fold::{Engine, FoldError, Replayed};
use crate::model::{Folded, ModuleHash, ReplayJob, VersionRecord};
use crate::source::attest::{Attestor, Digests};
use crate::source::{Source, positions};
use crate::store::{Position, StoreError};

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
pub fn fold_loop(
    mut source: Box<dyn Source>,
    mut engine: Engine,
    app: &App,
    committed: &watch::Sender<u64>,
    mut control: Control,
) {
    let (status, metrics) = (&app.status, &app.metrics);
    let batch_max = app.limits.batch_records_max;
    while !status.stop.is_cancelled() {
        let retiring = engine.retire(control.deploy_move_models_max) > 0;
        let replays = app.replays_running();
        // While models move or a replay runs, come back to it soon even when the log is idle.
        let busy = retiring || !replays.is_empty();
        for job in replays {
            match replay_page(&mut engine, app, job, control.replay_page_models, committed) {
                Ok(()) => {}
                Err(ReplayError::Store(e)) => return stop_on(app, "replay", &e),
                Err(e) => return status.fatal(format!("replay: {e}")),
            }
        }
        if app.relay.full() {
            // The outbox is full: fold nothing more until the relay has caught up (the
            // log keeps what is not folded; `/readyz` says why).
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let wait = Duration::from_millis(if busy { 1 } else { 100 });
        let records = match source.poll(batch_max, wait) {
            Ok(records) => records,
            Err(e) => return status.fatal(format!("source {}: {e}", source.name())),
        };
        for (topic, partitions) in source.partitions() {
            engine.set_partitions(&topic, partitions);
        }
        // A replay record ends what one fold takes: the rest is folded after its commit.
        let mut rest = &records[..];
        while !rest.is_empty() {
            let started = Instant::now();
            let mut folded = match engine.fold(rest, &*app.store) {
                Ok(folded) => folded,
                Err(e) => return status.fatal(format!("fold: {e}")),
            };
            metrics.fold_batch_seconds.observe(started.elapsed().as_secs_f64());
            let (done, later) = rest.split_at(folded.consumed);
            rest = later;
            if let Some((kind, reducer, subject)) = folded.replays.first() {
                // The replay's progress is committed with its record, so a restart resumes it.
                match replay_started(app, kind, *reducer, subject.clone()) {
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
            if let Err(e) = commit(app, &folded, &positions, &versions) {
                return stop_on(app, "commit", &e);
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
                metrics.deploys_folded(folded.deploys.len(), started.elapsed());
            }
            for (_, position) in &positions {
                app.source.set_next(&position.topic, position.partition, position.next_offset);
            }
            source.committed(&positions);
            app.relay.added(folded.outbox.len());
            metrics.fold_batches.inc();
            metrics.diffs_applied.inc_by(folded.applied.len() as u64);
            for rejected in &folded.rejected {
                metrics.rejected(rejected.reason.code());
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
