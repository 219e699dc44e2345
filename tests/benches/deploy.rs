//! Hot-reload benchmark: `cargo bench -p statefold-tests --bench deploy`.
//!
//! The pause a deploy causes in folding, with 10,000 models resident. A deploy is a record
//! in the log: the batch that holds it switches its partition to the new version, and
//! each model moves (snapshot on the old version, restore on the new) at its next diff;
//! between batches, `Engine::retire` moves up to `deploy_move_models_max` of the rest,
//! until the old instance is freed. Compiling is not part of the pause on the server that
//! took the deploy (it compiled while checking); a replica that meets the record first
//! compiles in that batch (a row below). Beside it, in the same run: plain fold batches.
//!
//! Deploys alternate between two builds of `counter` v2 (the second with a custom section,
//! so another version with the same behaviour), over the real RocksDB store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use statefold::deploy::Registry;
use statefold::fold::{Engine, FoldLimits, KindSpec, Replayed, Versions};
use statefold::model::{DEPLOY_HEADER, DEPLOY_PARTITIONS_HEADER, REPLAY_HEADER, Record};
use statefold::model::{VersionRecord, VersionStatus};
use statefold::reducer::{ReducerLimits, Runtime};
use statefold::store::{Store, StoreOptions};
use statefold_tests::bench::median;

const MODELS: usize = 10_000;
/// Models moved per step (`deploy_move_models_max`'s default).
const MOVE: usize = 1000;

fn rounds() -> usize {
    statefold_tests::bench::rounds(11)
}

fn with_custom_section(mut module: Vec<u8>, tag: u8) -> Vec<u8> {
    module.extend([0, 3, 1, b't', tag]);
    module
}

fn record(offset: u64, id: usize) -> Record {
    Record {
        topic: "counter".into(),
        partition: 0,
        offset,
        key: Some(format!("m{id}").into_bytes()),
        value: Bytes::from_static(br#"{"add":3}"#),
        timestamp_ms: None,
        headers: Vec::new(),
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(Store::open(&dir.path().join("db"), &StoreOptions::default()).expect("store"));
    let limits = ReducerLimits { resident_models_max: 2 * MODELS, ..ReducerLimits::default() };
    let runtime = Arc::new(Runtime::new(limits, None).expect("runtime"));
    let registry = Arc::new(Registry { runtime: runtime.clone(), store: store.clone() });
    let v1 = runtime.load_file(&statefold_tests::wasm("counter")).expect("counter");
    let v2_bytes = std::fs::read(statefold_tests::wasm("counter_v2")).expect("counter_v2");
    let builds: Vec<Vec<u8>> = (0..2).map(|tag| with_custom_section(v2_bytes.clone(), tag)).collect();
    // Compile time, off the fold path (no cache: a fresh runtime per sample).
    let compile = median(
        (0..rounds().min(5))
            .map(|_| {
                let fresh = Runtime::new(ReducerLimits::default(), None).expect("runtime");
                let start = Instant::now();
                fresh.load(&builds[0]).expect("v2 loads");
                start.elapsed()
            })
            .collect(),
    );
    let versions: Vec<_> = builds.iter().map(|b| runtime.load(b).expect("v2 loads")).collect();
    for (reducer, bytes) in std::iter::once((&v1, &std::fs::read(statefold_tests::wasm("counter")).unwrap()))
        .chain(versions.iter().zip(&builds))
    {
        let record = VersionRecord {
            name: "counter".into(),
            id: reducer.id(),
            status: VersionStatus::Retired,
            refusal: None,
            origin: "bench".into(),
            subject: None,
            declared: None,
            bytes: bytes.len() as u64,
            first_ms: 0,
            changed_ms: 0,
        };
        store.put_versions(&[record], Some((reducer.id(), bytes))).expect("stored");
    }

    let spec = KindSpec::new("counter", "counter", &v1);
    let fold_limits = FoldLimits { head_cache_models_max: 2 * MODELS, ..FoldLimits::default() };
    let mut engine = Engine::new(vec![spec], fold_limits, Versions::new(registry, 4));
    let mut offset = 0u64;
    let mut fold_batch = |engine: &mut Engine, deploy: Option<&[u8]>, ids: &mut dyn Iterator<Item = usize>| {
        let mut records: Vec<Record> = Vec::new();
        if let Some(module) = deploy {
            offset += 1;
            records.push(deploy_record(offset, module));
        }
        records.extend(ids.map(|id| {
            offset += 1;
            record(offset, id)
        }));
        let start = Instant::now();
        let folded = engine.fold(&records, &*store).expect("fold");
        store.commit(&folded, &[]).expect("commit");
        start.elapsed()
    };
    for chunk in (0..MODELS).collect::<Vec<_>>().chunks(1000) {
        fold_batch(&mut engine, None, &mut chunk.iter().copied());
    }

    // Each deploy as the fold loop runs it: a batch holding the deploy record and 1,000
    // diffs (each model it touches moves to the new version first), then steps of up to
    // MOVE models off the old version between batches until its instance is freed.
    let mut rows = Rows::default();
    let mut steps_per_deploy = 0;
    for round in 0..=rounds() {
        let module = &builds[round % 2];
        let mix = |n: usize| move |i: usize| (i * 7 + round * 13 + n * 31) % MODELS;
        let started = Instant::now();
        let with_record = fold_batch(&mut engine, Some(module), &mut (0..1000).map(mix(0)));
        let mut worst = with_record;
        let mut n = 1;
        let mut steps = Vec::new();
        let mut after = Vec::new();
        loop {
            after.push(fold_batch(&mut engine, None, &mut (0..1000).map(mix(n))));
            let step = Instant::now();
            engine.retire(MOVE);
            let took = step.elapsed();
            steps.push(took);
            worst = worst.max(took).max(*after.last().unwrap());
            n += 1;
            if engine.resident("counter").expect("kind").1 == 1 {
                break;
            }
        }
        let plain = fold_batch(&mut engine, None, &mut (0..1000).map(mix(n)));
        if round > 0 {
            rows.record_batch.push(with_record);
            rows.steps.extend(steps);
            rows.after.extend(after);
            rows.plain.push(plain);
            rows.longest.push(worst);
            rows.totals.push(started.elapsed());
            steps_per_deploy = n - 1;
        }
    }
    let resident = engine.resident("counter").expect("kind").0;
    let max = *rows.longest.iter().max().expect("rounds");
    // Replay: a replay record, then every model rebuilt with the partition's version, a
    // page of 64 per WriteBatch (as the fold loop does between batches).
    offset += 1;
    let replay_record =
        Record { headers: vec![(REPLAY_HEADER.into(), b"counter".to_vec())], value: Bytes::new(), ..record(offset, 0) };
    let folded = engine.fold(&[replay_record], &*store).expect("fold");
    store.commit(&folded, &[]).expect("commit");
    let started = Instant::now();
    let mut after: Option<String> = None;
    let mut replayed = 0;
    loop {
        let page = store.read().list("counter", after.as_deref(), 64).expect("list");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let mut folded = statefold::model::Folded::default();
        for (id, _) in &page {
            assert_eq!(engine.replay_model("counter", id, &*store, &mut folded).expect("replay"), Replayed::Rebuilt);
            replayed += 1;
        }
        store.commit(&folded, &[]).expect("commit");
    }
    let replay = started.elapsed();

    println!();
    println!("deploy with {MODELS} resident models, {} deploys ({} cores)", rounds(), cores());
    println!("{:<62} {:>10}  note", "case", "time");
    let row = |name: &str, time: Duration, note: String| println!("{name:<62} {:>10}  {note}", format!("{time:.2?}"));
    row(
        "longest fold pause of a deploy, median over deploys",
        median(rows.longest),
        format!("{resident} models resident"),
    );
    row("longest fold pause of a deploy, worst deploy", max, "goal < 50 ms".into());
    row(
        "  batch with the deploy record + 1,000 diffs, median",
        median(rows.record_batch),
        "its models move first".into(),
    );
    row("  batch of 1,000 diffs after it, median", median(rows.after), "models not moved yet move".into());
    row(
        &format!("  step moving up to {MOVE} models off the old version, median"),
        median(rows.steps),
        format!("{steps_per_deploy} steps per deploy"),
    );
    row(
        "  whole deploy, record to old instance freed, median",
        median(rows.totals),
        "folding goes on meanwhile".into(),
    );
    row("fold batch, 1,000 diffs, no deploy under way, median", median(rows.plain), "baseline".into());
    row("compile v2 (a replica meeting the record uncached)", compile, "in that replica's batch".into());
    row(
        &format!("replay of {replayed} models, pages of 64"),
        replay,
        format!("{:.0} models/s", replayed as f64 / replay.as_secs_f64()),
    );
}

#[derive(Default)]
struct Rows {
    record_batch: Vec<Duration>,
    after: Vec<Duration>,
    steps: Vec<Duration>,
    plain: Vec<Duration>,
    longest: Vec<Duration>,
    totals: Vec<Duration>,
}

fn deploy_record(offset: u64, module: &[u8]) -> Record {
    Record {
        topic: "counter".into(),
        partition: 0,
        offset,
        key: Some(b"counter".to_vec()),
        value: Bytes::copy_from_slice(module),
        timestamp_ms: None,
        headers: vec![(DEPLOY_HEADER.into(), b"counter".to_vec()), (DEPLOY_PARTITIONS_HEADER.into(), b"1".to_vec())],
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
