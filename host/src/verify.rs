//! `statefold verify`: refolds the kinds from Kafka, the source of truth, into a scratch
//! store, up to the positions the live store has folded, and compares every model's head
//! (seq, offset, hash) and its state at the head (materialized on both sides) with the
//! live store's. `--repair` then replaces each diverged
//! model's history and head with the refolded ones.
//!
//! The refold starts each kind with the live store's first version (`genesis`); deploy
//! records in the log switch versions as they did when the live store folded them. The
//! live store is opened read-only (beside a running server) to verify; a repair writes to
//! it, so its server must be stopped.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::config::Config;
use crate::deploy::Registry;
use crate::fold::{Engine, KindSpec, Versions};
use crate::model::{Head, KindVersions, ModelKey};
use crate::reducer::Runtime;
use crate::source::{KafkaSource, Source, SourceStatus, positions};
use crate::store::{Reader, Store, StoreOptions};

/// Where a refold stands, for progress reports.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Records refolded so far, and in all (up to the live store's positions).
    pub records: u64,
    pub total: u64,
    pub elapsed: Duration,
}

/// A model whose live head or state is not what the log folds to.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub model: ModelKey,
    pub what: Difference,
    /// `None`: the model is missing on that side.
    pub live: Option<Head>,
    pub log: Option<Head>,
}

/// What differs between the live store and the log's refold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// The log folds a model the store does not have.
    Missing,
    /// The store has a model the log does not fold.
    Extra,
    /// Seq, offset or hash.
    Head,
    /// Same chain, another state: a corrupted checkpoint, or a reducer that is not
    /// deterministic.
    State,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Difference::Missing => "missing",
            Difference::Extra => "extra",
            Difference::Head => "head",
            Difference::State => "state",
        })
    }
}

/// What a verify found.
#[derive(Debug, Default)]
pub struct Report {
    pub records: u64,
    pub models: u64,
    pub mismatches: Vec<Mismatch>,
    /// Models replaced by `--repair`.
    pub repaired: usize,
}

/// Verifies (and with `repair`, repairs) the store `config` names against its Kafka
/// topics. `progress` is called about once a second while refolding.
pub fn verify(config: &Config, repair: bool, progress: &mut dyn FnMut(Progress)) -> anyhow::Result<Report> {
    let kafka = config.kafka.as_ref().context(
        "verify refolds from Kafka: configure [kafka] brokers (the embedded log lives in the store it would check)",
    )?;
    let limits = &config.limits;
    let db = config.data_dir.join("db");
    anyhow::ensure!(db.exists(), "no store in {}", config.data_dir.display());
    let live = Arc::new(if repair {
        Store::open(&db, &limits.store()).with_context(|| {
            format!("cannot open {} to repair it (stop the server that uses it first)", db.display())
        })?
    } else {
        Store::open_read_only(&db).with_context(|| format!("cannot open {} to read", db.display()))?
    });
    let scratch_dir = scratch_dir(&config.data_dir);
    let _ = std::fs::remove_dir_all(&scratch_dir);
    let scratch = Arc::new(Store::open(&scratch_dir, &StoreOptions::default())?);
    let result = refold_and_compare(config, kafka, &live, &scratch, progress).and_then(|mut report| {
        if repair && !report.mismatches.is_empty() {
            let models: Vec<ModelKey> = report.mismatches.iter().map(|m| m.model.clone()).collect();
            live.replace_models(&scratch, &models)?;
            report.repaired = models.len();
        }
        Ok(report)
    });
    drop(scratch);
    if let Err(e) = std::fs::remove_dir_all(&scratch_dir) {
        tracing::warn!(dir = %scratch_dir.display(), error = %e, "cannot remove the scratch store");
    }
    result
}

fn scratch_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("verify.scratch")
}

fn refold_and_compare(
    config: &Config,
    kafka: &crate::config::KafkaConfig,
    live: &Arc<Store>,
    scratch: &Arc<Store>,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<Report> {
    let limits = &config.limits;
    let source_name = crate::source::KAFKA_SOURCE_NAME;
    // Targets: what the live store has folded, per partition.
    let mut targets: HashMap<(String, u32), u64> = HashMap::new();
    for position in live.positions(source_name)? {
        targets.insert((position.topic, position.partition), position.next_offset);
    }
    anyhow::ensure!(
        !targets.is_empty() || live.sources()?.is_empty(),
        "the store in {} was not folded from Kafka: nothing to verify against",
        config.data_dir.display()
    );
    let runtime = Arc::new(Runtime::new(limits.reducer(), None)?);
    let registry = Arc::new(Registry { runtime: runtime.clone(), store: scratch.clone() });
    let (specs, topics, kinds) = scratch_kinds(config, live, scratch)?;
    targets.retain(|(topic, _), _| topics.contains(topic));
    for kind in &kinds {
        if live.read().replay(kind)?.is_some_and(|job| job.finished_ms.is_none()) {
            anyhow::bail!("a replay of kind {kind} is running on this store: verify once it has finished");
        }
    }
    let total: u64 = targets.values().sum();
    let mut engine = Engine::new(specs, limits.fold(), Versions::new(registry, limits.reducer_versions_resident_max));
    // Its own consumer group: positions come from the scratch store, and the commits (for
    // monitoring) must not move the live servers' group.
    let mut kafka = kafka.clone();
    kafka.group_id = format!("{}.verify", kafka.group_id);
    let status = Arc::new(SourceStatus::default());
    let mut source = KafkaSource::start(&kafka, &limits.source(), scratch.clone(), topics, status.clone())?;
    let mut next: HashMap<(String, u32), u64> = HashMap::new();
    let mut done = 0u64;
    let started = Instant::now();
    let mut reported = Instant::now();
    let remaining = |next: &HashMap<(String, u32), u64>| {
        targets.iter().any(|(partition, target)| next.get(partition).copied().unwrap_or(0) < *target)
    };
    while remaining(&next) {
        let records = source.poll(limits.batch_records_max, Duration::from_millis(100))?;
        for (topic, partitions) in source.partitions() {
            engine.set_partitions(&topic, partitions);
        }
        let records: Vec<_> = records
            .into_iter()
            .filter(|r| r.offset < targets.get(&(r.topic.to_string(), r.partition)).copied().unwrap_or(0))
            .collect();
        if records.is_empty() {
            if let Some(problem) = status.problem() {
                tracing::warn!(%problem, "waiting for the log");
            } else if source.caught_up() && remaining(&next) {
                let behind: Vec<String> = targets
                    .iter()
                    .filter(|(p, t)| next.get(*p).copied().unwrap_or(0) < **t)
                    .map(|((topic, partition), target)| format!("{topic}/{partition} ends before {target}"))
                    .collect();
                anyhow::bail!("the log holds less than the live store folded: {}", behind.join(", "));
            }
        } else {
            let mut rest = &records[..];
            while !rest.is_empty() {
                let folded = engine.fold(rest, &**scratch)?;
                let (folded_now, later) = rest.split_at(folded.consumed);
                rest = later;
                let positions = positions(source_name, folded_now);
                scratch.commit(&folded, &positions)?;
                for (_, position) in &positions {
                    next.insert((position.topic.clone(), position.partition), position.next_offset);
                }
            }
            done += records.len() as u64;
        }
        if reported.elapsed() >= Duration::from_secs(1) {
            reported = Instant::now();
            progress(Progress { records: done, total, elapsed: started.elapsed() });
        }
    }
    drop(source);
    progress(Progress { records: done, total, elapsed: started.elapsed() });
    finish_replays(&mut engine, &kinds, scratch)?;

    // States are compared too: the chain covers which diffs applied, not what the
    // reducer made of them.
    let versions = |store: &Arc<Store>| {
        let registry = Arc::new(Registry { runtime: runtime.clone(), store: store.clone() });
        Versions::new(registry, limits.reducer_versions_resident_max)
    };
    let mut states = (versions(live), versions(scratch));
    let mut report = Report { records: done, ..Report::default() };
    for kind in &kinds {
        compare(kind, (live, scratch), &mut states, &mut report)?;
    }
    Ok(report)
}

/// The kinds the live store folded, each set up in the scratch store with its first
/// version: the engine's specs, their topics and their names.
fn scratch_kinds(
    config: &Config,
    live: &Arc<Store>,
    scratch: &Arc<Store>,
) -> anyhow::Result<(Vec<KindSpec>, Vec<String>, Vec<String>)> {
    let mut specs = Vec::new();
    let mut topics = Vec::new();
    let mut kinds = Vec::new();
    for kind in &config.kinds {
        let Some(versions) = live.read().kind_versions(&kind.name)? else {
            tracing::info!(kind = %kind.name, "the live store never folded this kind; skipped");
            continue;
        };
        let genesis = versions.genesis;
        let module = live.module(&genesis)?.with_context(|| format!("kind {}: module {genesis} missing", kind.name))?;
        scratch.put_versions(&[], Some((genesis, &module)))?;
        specs.push(KindSpec {
            name: kind.name.as_str().into(),
            topic: kind.topic().into(),
            versions: KindVersions::new(genesis),
        });
        topics.push(kind.topic().to_owned());
        kinds.push(kind.name.clone());
    }
    Ok((specs, topics, kinds))
}

/// Replay records rebuild a model at its next diff or between batches: the models the
/// fold did not reach are rebuilt now, as the live server's replay did.
fn finish_replays(engine: &mut Engine, kinds: &[String], scratch: &Arc<Store>) -> anyhow::Result<()> {
    for kind in kinds {
        let mut after: Option<String> = None;
        loop {
            let page = scratch.read().list(kind, after.as_deref(), 256)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let mut folded = crate::model::Folded::default();
            for (id, _) in &page {
                // A model the replay could not rebuild keeps its history on every replica,
                // so the refold keeps it too: either outcome is what the log folds to.
                let _rebuilt_or_kept = engine.replay_model(kind, id, &**scratch, &mut folded)?;
            }
            scratch.commit(&folded, &[])?;
        }
    }
    Ok(())
}

/// A kind's heads in id order, read a page at a time.
struct Heads<'a> {
    reader: Reader<'a>,
    kind: &'a str,
    after: Option<String>,
    page: std::vec::IntoIter<(String, Head)>,
}

impl<'a> Heads<'a> {
    fn new(store: &'a Store, kind: &'a str) -> Heads<'a> {
        Heads { reader: store.read(), kind, after: None, page: Vec::new().into_iter() }
    }

    fn next(&mut self) -> anyhow::Result<Option<(String, Head)>> {
        if let Some(item) = self.page.next() {
            return Ok(Some(item));
        }
        let page = self.reader.list(self.kind, self.after.as_deref(), 1000)?;
        self.after = page.last().map(|(id, _)| id.clone());
        self.page = page.into_iter();
        Ok(self.page.next())
    }
}

/// The state at a model's head, as the store holds it.
fn state(store: &Store, versions: &mut Versions, model: &ModelKey, head: &Head) -> anyhow::Result<Vec<u8>> {
    let history = crate::fold::View::checkpoint(store, model, head).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(versions.materialize(&model.id, history, head.reducer)?)
}

/// Compares the heads of every model of `kind`, in id order on both sides.
fn compare(
    kind: &str,
    (live, scratch): (&Store, &Store),
    states: &mut (Versions, Versions),
    report: &mut Report,
) -> anyhow::Result<()> {
    let (mut live_heads, mut log_heads) = (Heads::new(live, kind), Heads::new(scratch, kind));
    let (mut a, mut b) = (live_heads.next()?, log_heads.next()?);
    loop {
        let order = match (&a, &b) {
            (None, None) => return Ok(()),
            (Some((x, _)), Some((y, _))) => x.cmp(y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
        };
        let (live_head, log_head) = match order {
            Ordering::Equal => (a.take(), b.take()),
            Ordering::Less => (a.take(), None),
            Ordering::Greater => (None, b.take()),
        };
        let id = live_head.as_ref().or(log_head.as_ref()).map(|(id, _)| id.clone()).expect("one side");
        report.models += 1;
        let model = ModelKey::new(kind, &id);
        let what = match (&live_head, &log_head) {
            (Some((_, l)), Some((_, r))) if (l.seq, l.offset, l.hash) != (r.seq, r.offset, r.hash) => {
                Some(Difference::Head)
            }
            (Some((_, l)), Some((_, r))) => {
                // A state that cannot be rebuilt on one side differs from the other.
                let left = state(live, &mut states.0, &model, l).map_err(|e| e.to_string());
                let right = state(scratch, &mut states.1, &model, r).map_err(|e| e.to_string());
                (left != right).then_some(Difference::State)
            }
            (Some(_), None) => Some(Difference::Extra),
            (None, _) => Some(Difference::Missing),
        };
        if let Some(what) = what {
            report.mismatches.push(Mismatch {
                model,
                what,
                live: live_head.map(|(_, h)| h),
                log: log_head.map(|(_, h)| h),
            });
        }
        if a.is_none() {
            a = live_heads.next()?;
        }
        if b.is_none() {
            b = log_heads.next()?;
        }
    }
}
