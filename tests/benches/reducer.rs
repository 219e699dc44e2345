//! Reducer runtime benchmark: `cargo bench -p statefold-tests --bench reducer`.
//!
//! Prints one table, every row measured in this run, side by side:
//! - per-diff apply cost with a 100-byte state vs a 1-MiB state (resident state keeps the
//!   large one within 2x of the small one), and what shipping the state per diff would
//!   cost instead;
//! - the same reducer logic natively vs as wasm (through the host runtime, which also
//!   computes the hash chain and copies each diff across the boundary).
//!
//! Figures are medians over rounds; ratios compare rows measured in the same process.

use std::hint::black_box;
use std::time::{Duration, Instant};

use counter::Counter;
use document::Document;
use serde_json::json;
use statefold::chain::Hash;
use statefold::model::DiffRecord;
use statefold::reducer::{Checkpoints, MemoryCheckpoints, Models, ReducerLimits, Runtime};
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
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
