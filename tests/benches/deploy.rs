//! Hot-reload benchmark: `cargo bench -p statefold-tests --bench deploy`.
//!
//! The pause a deploy causes in folding, with 10,000 models resident. The fold thread's
//! part of a deploy is what `continue_swap` in `server.rs` runs between two batches:
//! `Engine::continue_swap` moves up to `deploy_move_models_max` resident models (snapshot
//! on the old version, restore on the new) per step, then copies again the models folded
//! meanwhile, switches, and the version records are committed. Compiling the module is not
//! part of it: the deployer compiles and checks on its own thread before asking for the
//! swap. Beside it, in the same run: the fold batches between steps, the same move done in
//! one step, and the compile time.
//!
//! Swaps alternate between two builds of `counter` v2 (the second with a custom section,
//! so another version with the same behaviour), over the real RocksDB store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use statefold::deploy::{Registry, VersionRecord, VersionStatus};
use statefold::fold::{Engine, FoldLimits, KindSpec, Record, Versions};
use statefold::reducer::{Limits, Runtime};
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
    let store = Arc::new(Store::open(&dir.path().join("db"), &StoreOptions { fsync: false }).expect("store"));
    let limits = Limits { resident_models_max: 2 * MODELS, ..Limits::default() };
    let runtime = Arc::new(Runtime::new(limits, None).expect("runtime"));
    let registry = Arc::new(Registry { runtime: runtime.clone(), store: store.clone() });
    let v1 = runtime.load_file(&statefold_tests::wasm("counter")).expect("counter");
    let v2_bytes = std::fs::read(statefold_tests::wasm("counter_v2")).expect("counter_v2");
    let builds: Vec<Vec<u8>> = (0..2).map(|tag| with_custom_section(v2_bytes.clone(), tag)).collect();
    // Compile time, off the fold path (no cache: a fresh runtime per sample).
    let compile = median(
        (0..rounds().min(5))
            .map(|_| {
                let fresh = Runtime::new(Limits::default(), None).expect("runtime");
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
            declared: None,
            bytes: bytes.len() as u64,
            first_ms: 0,
            changed_ms: 0,
        };
        store.put_versions(&[record], Some((reducer.id(), bytes))).expect("stored");
    }

    let spec = KindSpec { name: "counter".into(), topic: "counter".into(), reducer: v1.clone() };
    let fold_limits = FoldLimits { head_cache_models_max: 2 * MODELS, ..FoldLimits::default() };
    let mut engine = Engine::new(vec![spec], fold_limits, Versions::new(registry, 4));
    let mut offset = 0u64;
    let mut fold_batch = |engine: &mut Engine, ids: &mut dyn Iterator<Item = usize>| {
        let records: Vec<Record> = ids
            .map(|id| {
                offset += 1;
                record(offset, id)
            })
            .collect();
        let start = Instant::now();
        let folded = engine.fold(&records, &*store).expect("fold");
        store.commit(&folded, &[]).expect("commit");
        start.elapsed()
    };
    for chunk in (0..MODELS).collect::<Vec<_>>().chunks(1000) {
        fold_batch(&mut engine, &mut chunk.iter().copied());
    }

    // Each deploy as the fold loop runs it: between two batches of 1,000 diffs, one step
    // of up to MOVE models (snapshot old, restore new); at the end, the models folded during
    // the move are copied again and the version records committed.
    let kinds: Vec<Arc<str>> = vec!["counter".into()];
    let (mut steps, mut longest, mut totals, mut batches) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut moved = 0;
    let mut steps_per_deploy = 0;
    for round in 0..=rounds() {
        let next = &versions[round % 2];
        let record = VersionRecord {
            name: "counter".into(),
            id: next.id(),
            status: VersionStatus::Active,
            refusal: None,
            origin: "bench".into(),
            declared: None,
            bytes: builds[round % 2].len() as u64,
            first_ms: 0,
            changed_ms: 0,
        };
        let started = Instant::now();
        engine.begin_swap(&kinds, next);
        let mut worst = Duration::ZERO;
        let mut n = 0;
        loop {
            let batch = fold_batch(&mut engine, &mut (0..1000).map(|i| (i * 7 + round * 13 + n * 31) % MODELS));
            let step = Instant::now();
            let done = engine.continue_swap(MOVE);
            if let Some(result) = &done {
                moved = *result.as_ref().expect("swap");
                store
                    .put_versions(std::slice::from_ref(&record), Some((next.id(), &builds[round % 2])))
                    .expect("commit");
            }
            let took = step.elapsed();
            n += 1;
            if round > 0 {
                steps.push(took);
                batches.push(batch);
            }
            worst = worst.max(took);
            if done.is_some() {
                break;
            }
        }
        if round > 0 {
            longest.push(worst);
            totals.push(started.elapsed());
            steps_per_deploy = n;
        }
    }
    let max = *longest.iter().max().expect("rounds");
    // The same 10,000 models moved in one step, as a single-pause swap would.
    let one_step = median(
        (0..rounds().min(5))
            .map(|round| {
                engine.begin_swap(&kinds, &versions[(round + rounds() + 1) % 2]);
                let start = Instant::now();
                engine.continue_swap(usize::MAX).expect("one step").expect("swap");
                start.elapsed()
            })
            .collect(),
    );
    // Replay: every model rebuilt with the active version, a page of 64 per WriteBatch.
    let started = Instant::now();
    let mut after: Option<String> = None;
    let mut replayed = 0;
    loop {
        let page = store.read().list("counter", after.as_deref(), 64).expect("list");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let mut folded = statefold::fold::Folded::default();
        for (id, _) in &page {
            engine.replay_model("counter", id, &*store, &mut folded).expect("replay").expect("rebuilt");
            replayed += 1;
        }
        store.commit(&folded, &[]).expect("commit");
    }
    let replay = started.elapsed();

    println!();
    println!("deploy swap with {MODELS} resident models, {} deploys ({} cores)", rounds(), cores());
    println!("{:<62} {:>10}  note", "case", "time");
    let row = |name: &str, time: Duration, note: String| println!("{name:<62} {:>10}  {note}", format!("{time:.2?}"));
    row("longest fold pause of a deploy, median over deploys", median(longest), format!("{moved} models moved"));
    row("longest fold pause of a deploy, worst deploy", max, "goal < 50 ms".into());
    row(
        &format!("  one step (up to {MOVE} models), median"),
        median(steps),
        format!("{steps_per_deploy} steps per deploy"),
    );
    row("  whole deploy, first step to switch, median", median(totals), "folding goes on meanwhile".into());
    row("fold batch, 1,000 diffs over 1,000 models, median", median(batches), "between two steps".into());
    row("all 10,000 models moved in one step (no chunking), median", one_step, "what a one-pause swap costs".into());
    row("compile v2 (off the fold path), median", compile, "not part of any pause".into());
    row(
        &format!("replay of {replayed} models, pages of 64"),
        replay,
        format!("{:.0} models/s", replayed as f64 / replay.as_secs_f64()),
    );
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
