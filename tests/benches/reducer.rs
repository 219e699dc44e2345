//! Reducer runtime benchmark: `cargo bench -p statefold-tests --bench reducer`.
//!
//! Prints one table, every row measured in this run, side by side:
//! - per-diff apply cost with a 100-byte state vs a 1-MiB state (resident state keeps the
//!   large one within 2x of the small one), and what shipping the state per diff would
//!   cost instead;
//! - the same reducer logic natively vs as wasm (through the host runtime, which also
//!   computes the hash chain and copies each diff across the boundary).
//!
//! And a second: one reducer (`totals`) in Rust, JavaScript (componentize-js) and Python
//! (componentize-py): module size, cold compile, per-diff cost in batches of 200 and of 1,
//! and the fuel one diff takes (the least `reducer_diff_fuel_max` that folds it).
//!
//! Figures are medians over rounds; ratios compare rows measured in the same process.

use std::hint::black_box;
use std::time::{Duration, Instant};

use counter::Counter;
use document::Document;
use serde_json::json;
use statefold::chain::Hash;
use statefold::model::DiffRecord;
use statefold::reducer::{Checkpoints, MemoryCheckpoints, Models, Outcome, ReducerLimits, Runtime};
use statefold_guest::native;
use statefold_tests::bench::median;

const BATCH: usize = 200;

/// `cargo bench` passes `--bench`; under `cargo test` the bench only smoke-runs.
fn rounds() -> usize {
    statefold_tests::bench::rounds(21)
}

/// Median per-diff time of `round`, which applies `per_round` diffs.
fn per_diff(rounds: usize, per_round: usize, mut round: impl FnMut(usize)) -> Duration {
    round(0); // warm-up
    let samples = (1..=rounds)
        .map(|r| {
            let start = Instant::now();
            round(r);
            start.elapsed() / per_round as u32
        })
        .collect();
    median(samples)
}

fn diffs(round: usize, n: usize, make: impl Fn(usize) -> String) -> Vec<DiffRecord> {
    (0..n).map(|i| DiffRecord::new((round * n + i) as u64, make(round * n + i))).collect()
}

/// Wasm: batches of `batch` diffs to one resident model.
fn wasm_rounds(models: &mut Models, model: &str, batch: usize, make: impl Fn(usize) -> String + Copy) -> Duration {
    let mut checkpoints = MemoryCheckpoints::default();
    let hash = Hash::genesis("bench", model);
    per_diff(rounds(), BATCH, |r| {
        for chunk in diffs(r, BATCH, make).chunks(batch) {
            black_box(models.apply(model, hash, chunk, &mut checkpoints).expect("apply"));
        }
    })
}

fn document_with(bytes: usize) -> String {
    // Keys of ~1 KiB values, or one small object for the 100-byte case.
    if bytes < 1024 {
        return json!({"title": "a small document", "owner": "ana", "team": "core", "tags": ["x", "y", "z"], "version": 3, "n": 0})
            .to_string();
    }
    let value = "v".repeat(1000);
    let doc: serde_json::Map<String, serde_json::Value> =
        (0..bytes / 1010).map(|i| (format!("key{i:05}"), json!(value))).collect();
    serde_json::Value::Object(doc).to_string()
}

struct Row {
    name: String,
    per_diff: Duration,
    baseline: Option<(usize, &'static str)>,
}

fn main() {
    let runtime = Runtime::new(ReducerLimits::default(), None).expect("runtime");
    let document = runtime.load_file(&statefold_tests::wasm("document")).expect("document.wasm");
    let counter = runtime.load_file(&statefold_tests::wasm("counter")).expect("counter.wasm");
    let patch = |i: usize| format!(r#"{{"n":{i}}}"#);
    let add = |i: usize| format!(r#"{{"add":{}}}"#, i % 7);
    let mut rows: Vec<Row> = Vec::new();

    // --- State-size independence (document, wasm, resident) ---
    let small_doc = document_with(100);
    let large_doc = document_with(1 << 20);
    let mut models = document.models();
    let mut checkpoints = MemoryCheckpoints::default();
    for (model, doc) in [("small", &small_doc), ("large", &large_doc)] {
        checkpoints.save(model, doc.clone().into_bytes()).expect("in memory");
        models.snapshot(model, &mut checkpoints).expect("restore");
    }
    let small = rows.len();
    rows.push(Row {
        name: format!("document, {} B state, wasm, batch {BATCH}", small_doc.len()),
        per_diff: wasm_rounds(&mut models, "small", BATCH, patch),
        baseline: None,
    });
    rows.push(Row {
        name: format!("document, {:.1} MiB state, wasm, batch {BATCH}", large_doc.len() as f64 / (1 << 20) as f64),
        per_diff: wasm_rounds(&mut models, "large", BATCH, patch),
        baseline: Some((small, "goal <= 2x")),
    });
    // What per-diff cost would be if the state crossed the boundary for every diff.
    let shipped = {
        let mut fresh = MemoryCheckpoints::default();
        let hash = Hash::genesis("bench", "shipped");
        let mut state = large_doc.clone().into_bytes();
        per_diff(5, 4, |r| {
            for d in diffs(r, 4, patch) {
                fresh.save("shipped", std::mem::take(&mut state)).expect("in memory");
                models.apply("shipped", hash, std::slice::from_ref(&d), &mut fresh).expect("apply");
                state = models.snapshot("shipped", &mut fresh).expect("snapshot");
                models.evict("shipped", &mut fresh).expect("evict");
            }
        })
    };
    rows.push(Row {
        name: "document, 1 MiB state shipped per diff (restore+apply+snapshot)".into(),
        per_diff: shipped,
        baseline: Some((small, "why state stays resident")),
    });

    // --- Native vs wasm, same reducer logic ---
    let native_counter = rows.len();
    let mut m = native::Model::<Counter>::new("m");
    rows.push(Row {
        name: "counter, native".into(),
        per_diff: per_diff(rounds(), BATCH, |r| {
            for d in diffs(r, BATCH, add) {
                m.apply(&d.payload, d.offset, &[0; 32]).expect("apply");
            }
        }),
        baseline: None,
    });
    let mut counters = counter.models();
    rows.push(Row {
        name: format!("counter, wasm, batch {BATCH}"),
        per_diff: wasm_rounds(&mut counters, "m", BATCH, add),
        baseline: Some((native_counter, "wasm / native")),
    });
    rows.push(Row {
        name: "counter, wasm, batch 1".into(),
        per_diff: wasm_rounds(&mut counters, "m1", 1, add),
        baseline: Some((native_counter, "wasm / native")),
    });
    let native_doc = rows.len();
    let mut d = native::Model::<Document>::restore("m", small_doc.as_bytes()).expect("restore");
    rows.push(Row {
        name: format!("document, {} B state, native", small_doc.len()),
        per_diff: per_diff(rounds(), BATCH, |r| {
            for diff in diffs(r, BATCH, patch) {
                d.apply(&diff.payload, diff.offset, &[0; 32]).expect("apply");
            }
        }),
        baseline: None,
    });
    rows.push(Row {
        name: format!("document, {} B state, wasm, batch {BATCH}", small_doc.len()),
        per_diff: wasm_rounds(&mut models, "small", BATCH, patch),
        baseline: Some((native_doc, "wasm / native")),
    });

    println!();
    println!("reducer runtime, {} rounds of {BATCH} diffs, median per diff ({} cores)", rounds(), cores());
    println!("{:<66} {:>12} {:>8}  vs", "case", "per diff", "ratio");
    for row in &rows {
        let (ratio, vs) = match row.baseline {
            Some((i, label)) => (
                format!("{:.2}x", row.per_diff.as_secs_f64() / rows[i].per_diff.as_secs_f64()),
                format!("{} ({label})", rows[i].name),
            ),
            None => ("1.00x".into(), "baseline".into()),
        };
        println!("{:<66} {:>12} {:>8}  {}", row.name, format!("{:.2?}", row.per_diff), ratio, vs);
    }
    languages();
}

/// The least `reducer_diff_fuel_max` under which `module` folds `diff` (after a first diff
/// on the same model), by bisection; compiled code comes from `cache`.
fn fuel_per_diff(module: &std::path::Path, cache: &std::path::Path, diff: &str, steps: usize) -> u64 {
    let folds = |fuel: u64| {
        let limits = ReducerLimits { diff_fuel_max: fuel, ..ReducerLimits::default() };
        let runtime = Runtime::new(limits, Some(cache.to_owned())).expect("runtime");
        let mut models = runtime.load_file(module).expect("module").models();
        let mut checkpoints = MemoryCheckpoints::default();
        let hash = Hash::genesis("bench", "m");
        let first = DiffRecord::new(0, diff.to_owned());
        let second = DiffRecord::new(1, diff.to_owned());
        let applied = |outcomes: Vec<Outcome>| match outcomes.as_slice() {
            [Outcome::Applied(hash, _)] => Some(*hash),
            _ => None,
        };
        let first = models.apply("m", hash, &[first], &mut checkpoints).ok().and_then(applied);
        first.is_some_and(|hash| models.apply("m", hash, &[second], &mut checkpoints).ok().and_then(applied).is_some())
    };
    let (mut low, mut high) = (1u64, ReducerLimits::default().diff_fuel_max);
    assert!(folds(high), "{}: a diff does not fold within the default budget", module.display());
    for _ in 0..steps {
        if high - low <= high / 100 {
            break;
        }
        let mid = low + (high - low) / 2;
        if folds(mid) { high = mid } else { low = mid }
    }
    high
}

/// `totals` in the three languages, side by side.
fn languages() {
    let cache = tempfile::tempdir().expect("temp dir");
    let add = |i: usize| format!(r#"{{"add":{{"k{}":{}}}}}"#, i % 8, i % 7 + 1);
    let steps = if rounds() > 1 { 30 } else { 3 };
    let mut rows: Vec<(String, u64, Duration, Duration, Duration, u64)> = Vec::new();
    for (language, name) in [("Rust", "totals"), ("JavaScript", "totals_js"), ("Python", "totals_py")] {
        let path = statefold_tests::wasm(name);
        let bytes = std::fs::metadata(&path).expect("module").len();
        let runtime = Runtime::new(ReducerLimits::default(), Some(cache.path().to_owned())).expect("runtime");
        let started = Instant::now();
        let reducer = runtime.load_file(&path).expect("module");
        let compile = started.elapsed();
        let mut models = reducer.models();
        let batch = wasm_rounds(&mut models, "m", BATCH, add);
        let single = wasm_rounds(&mut models, "m1", 1, add);
        let fuel = fuel_per_diff(&path, cache.path(), &add(3), steps);
        rows.push((format!("{name} ({language})"), bytes, compile, batch, single, fuel));
    }
    println!();
    println!("one reducer (totals) in three languages, {} rounds of {BATCH} diffs, median per diff", rounds());
    println!(
        "{:<26} {:>10} {:>14} {:>16} {:>8} {:>14} {:>14}",
        "reducer", "module", "cold compile", "per diff, b 200", "ratio", "per diff, b 1", "fuel per diff"
    );
    let rust = rows[0].3;
    for (name, bytes, compile, batch, single, fuel) in &rows {
        println!(
            "{:<26} {:>10} {:>14} {:>16} {:>8} {:>14} {:>14}",
            name,
            format!("{:.1} MB", *bytes as f64 / 1e6),
            format!("{:.2?}", compile),
            format!("{:.2?}", batch),
            format!("{:.1}x", batch.as_secs_f64() / rust.as_secs_f64()),
            format!("{:.2?}", single),
            fuel,
        );
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
