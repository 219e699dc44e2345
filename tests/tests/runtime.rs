//! The host runtime: faulty reducers fail only themselves, bad files are refused with a
//! specific reason, cold models are evicted and restored exactly, and the CLI says so.

mod common;

use common::{Fold, applied, load, runtime};
use serde_json::json;
use statefold::reducer::{LoadError, Outcome, ReducerLimits};

/// Small limits so the faulty reducers hit them quickly.
fn tight() -> ReducerLimits {
    ReducerLimits {
        memory_bytes_max: 64 << 20,
        diff_fuel_max: 20_000_000,
        call_fuel_max: 200_000_000,
        resident_bytes_max: 32 << 20,
        ..ReducerLimits::default()
    }
}

#[test]
fn each_faulty_reducer_fails_only_the_diff_that_trips_it() {
    let runtime = runtime(tight());
    let mut healthy = Fold::new(&runtime, "counter");
    let cases = [
        ("trap", r#""trap""#, "trapping on purpose"),
        ("spin", r#""spin""#, "exceeded its CPU budget"),
        ("bomb", r#""bomb""#, "exceeded its memory limit"),
        ("spin", r#""sleep""#, "may not sleep"),
    ];
    for (name, trigger, reason) in cases {
        let mut fold = Fold::new(&runtime, name);
        // Another model of the same reducer, resident in the instance that will trap.
        assert_eq!(applied(&fold.apply("bystander", &[r#""inc""#, r#""inc""#])), [true, true]);
        let outcomes = fold.apply("m", &[r#""inc""#, r#""inc""#, trigger, r#""inc""#]);
        assert_eq!(applied(&outcomes), [true, true, false, true], "{name}: {outcomes:?}");
        match &outcomes[2] {
            Outcome::Failed(r) => assert!(r.contains(reason), "{name}: {r}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(fold.models.stats().traps >= 2, "{name}: the batch trap and the isolated one");
        // The failed diff left no trace; the model and the bystander were rebuilt exactly.
        assert_eq!(fold.state("m"), json!(3), "{name}");
        assert_eq!(applied(&fold.apply("bystander", &[r#""inc""#])), [true]);
        assert_eq!(fold.state("bystander"), json!(3), "{name}");
        // A healthy reducer in the same process never noticed.
        assert_eq!(applied(&healthy.apply("c", &[r#"{"add":1}"#])), [true]);
    }
    assert_eq!(healthy.state("c"), json!(cases.len()));
}

#[test]
fn a_reducer_that_breaks_the_contract_fails_its_diffs_not_the_host() {
    let runtime = runtime(tight());
    let mut fold = Fold::new(&runtime, "garbage");
    // The batch's answer breaks the contract; one diff at a time, only "lie" does.
    let outcomes = fold.apply("m", &["1", "2", r#""lie""#, "3"]);
    assert_eq!(applied(&outcomes), [true, true, false, true], "{outcomes:?}");
    assert!(
        matches!(&outcomes[2], Outcome::Failed(r) if r.contains("broke the contract") || r.contains("apply of 1 diffs answered applied=8")),
        "{outcomes:?}"
    );
    // Its heap-bytes report (u64::MAX) is clamped to its memory, so it cannot force the
    // host to evict everything: the model stays resident.
    assert_eq!(fold.models.resident(), 1);
    assert_eq!(fold.models.stats().evictions, 0);
    let mut healthy = Fold::new(&runtime, "counter");
    assert_eq!(applied(&healthy.apply("c", &[r#"{"add":1}"#])), [true]);
}

#[test]
fn a_healthy_batch_is_one_call_on_one_instance() {
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "counter");
    let outcomes = fold.apply("c", &[r#"{"add":1}"#, r#"{"add":2}"#, r#"{"add":3}"#]);
    assert_eq!(applied(&outcomes), [true, true, true], "{outcomes:?}");
    let stats = fold.models.stats();
    assert_eq!((stats.instances, stats.traps), (1, 0), "no batch was retried one diff at a time: {stats:?}");
}

/// Each diff of a batch gets its own CPU budget (`meter.start-diff` resets the fuel as it
/// returns to the guest): 40 diffs that each burn about half of a diff's budget, together
/// ten times what one call may, apply in one call, without a trap; so a diff's verdict
/// does not depend on its batch.
#[test]
fn each_diff_of_a_batch_gets_its_own_cpu_budget() {
    let limits = ReducerLimits { diff_fuel_max: 1_000_000, call_fuel_max: 2_000_000, ..ReducerLimits::default() };
    let runtime = runtime(limits);
    let mut fold = Fold::new(&runtime, "spin");
    let diffs = vec![r#""burn""#; 40];
    let outcomes = fold.apply("m", &diffs);
    assert_eq!(applied(&outcomes), vec![true; 40], "{outcomes:?}");
    let stats = fold.models.stats();
    assert_eq!((stats.instances, stats.traps), (1, 0), "the batch ran out of fuel and was retried: {stats:?}");
    assert_eq!(fold.state("m"), json!(40));
}

#[test]
fn bad_files_are_refused_with_a_specific_reason() {
    let runtime = runtime(ReducerLimits::default());
    let not_wasm = runtime.load(b"#!/bin/sh\necho hello\n").unwrap_err();
    assert!(matches!(not_wasm, LoadError::NotWasm), "{not_wasm}");

    let core = runtime.load(&wat::parse_str("(module (func (export \"apply\")))").unwrap()).unwrap_err();
    assert!(matches!(core, LoadError::CoreModule), "{core}");
    assert!(core.to_string().contains("wasm32-wasip2"), "{core}");

    let empty = runtime.load(&wat::parse_str("(component)").unwrap()).unwrap_err();
    assert!(matches!(&empty, LoadError::WrongWorld { exports } if exports == "nothing"), "{empty}");

    let other_world = wat::parse_str(r#"(component (instance $i) (export "acme:shop/cart@1.0.0" (instance $i)))"#);
    let other_world = runtime.load(&other_world.unwrap()).unwrap_err();
    assert!(
        matches!(&other_world, LoadError::WrongWorld { exports } if exports.contains("acme:shop/cart")),
        "{other_world}"
    );

    for version in ["9.0.0", "0.3.0", "1.2.0", "0.2.0-rc1"] {
        let text = format!(r#"(component (instance $i) (export "statefold:reducer/reducer@{version}" (instance $i)))"#);
        let err = runtime.load(&wat::parse_str(text).unwrap()).unwrap_err();
        assert!(matches!(&err, LoadError::IncompatibleVersion { found, .. } if found.to_string() == version), "{err}");
    }

    let hollow =
        wat::parse_str(r#"(component (instance $i) (export "statefold:reducer/reducer@0.1.0" (instance $i)))"#);
    let hollow = runtime.load(&hollow.unwrap()).unwrap_err();
    assert!(matches!(hollow, LoadError::Contract(_)), "{hollow}");

    let whole = std::fs::read(statefold_tests::wasm("counter")).unwrap();
    for cut in [9, 100, whole.len() / 2, whole.len() - 1] {
        let truncated = runtime.load(&whole[..cut]).unwrap_err();
        assert!(matches!(truncated, LoadError::Truncated { bytes } if bytes == cut), "{cut}: {truncated}");
        assert_eq!(truncated.code().as_str(), "truncated");
    }
    // A file that cannot be read.
    let dir = tempfile::tempdir().unwrap();
    let unreadable = runtime.load_file(&dir.path().join("absent.wasm")).unwrap_err();
    assert!(matches!(unreadable, LoadError::Read { .. }), "{unreadable}");
    assert_eq!(unreadable.code().as_str(), "unreadable");
    // Complete sections with garbage inside: invalid, not truncated.
    let mut garbled = whole.clone();
    let middle = garbled.len() / 2;
    garbled[middle..middle + 64].fill(0xff);
    let garbled = runtime.load(&garbled).unwrap_err();
    assert!(matches!(garbled, LoadError::Invalid(_)), "{garbled}");
}

#[test]
fn loading_is_cached_by_module_hash() {
    let runtime = runtime(ReducerLimits::default());
    let a = load(&runtime, "counter");
    let b = load(&runtime, "counter");
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(
        a.id().to_string(),
        blake3::hash(&std::fs::read(statefold_tests::wasm("counter")).unwrap()).to_hex().as_str()
    );
    let info = a.info();
    assert_eq!(
        (info.name.as_str(), info.diff_format.as_str(), info.merge, info.delta),
        ("counter", "json", true, false)
    );
}

#[test]
fn compiled_code_survives_restarts_in_the_cache_dir() {
    let dir = std::env::temp_dir().join(format!("statefold-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bytes = std::fs::read(statefold_tests::wasm("document")).unwrap();
    let first = statefold::reducer::Runtime::new(ReducerLimits::default(), Some(dir.clone())).unwrap();
    let id = first.load(&bytes).unwrap().id();
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 1);
    assert!(entries[0].to_string_lossy().starts_with(&id.to_string()));
    // A new runtime (a restart) loads from the cache and works the same.
    let second = statefold::reducer::Runtime::new(ReducerLimits::default(), Some(dir.clone())).unwrap();
    let reducer = second.load(&bytes).unwrap();
    let mut models = reducer.models();
    let mut checkpoints = statefold::reducer::MemoryCheckpoints::default();
    assert_eq!(models.snapshot("x", &mut checkpoints).unwrap(), b"{}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cold_models_are_evicted_by_count_and_restored_exactly() {
    let runtime = runtime(ReducerLimits { resident_models_max: 8, ..ReducerLimits::default() });
    let mut fold = Fold::new(&runtime, "counter");
    for round in 1..=3i64 {
        for m in 0..40i64 {
            let diff = format!(r#"{{"add":{}}}"#, m * round);
            assert_eq!(applied(&fold.apply(&format!("m{m}"), &[&diff])), [true]);
            assert!(fold.models.resident() <= 8);
        }
    }
    assert!(fold.models.stats().evictions >= 100, "{:?}", fold.models.stats());
    for m in 0..40i64 {
        assert_eq!(fold.state(&format!("m{m}")), json!(m * 6), "m{m}");
    }
}

#[test]
fn cold_models_are_evicted_by_heap_budget() {
    let runtime = runtime(ReducerLimits { resident_bytes_max: 4 << 20, ..ReducerLimits::default() });
    let mut fold = Fold::new(&runtime, "document");
    let blob = "x".repeat(256 << 10);
    for m in 0..40 {
        let diff = json!({"blob": blob, "n": m}).to_string();
        assert_eq!(applied(&fold.apply(&format!("d{m}"), &[&diff])), [true]);
    }
    let stats = fold.models.stats();
    assert!(stats.evictions >= 20, "{stats:?}");
    assert!(fold.models.resident() < 20, "{}", fold.models.resident());
    for m in 0..40 {
        assert_eq!(fold.state(&format!("d{m}")), json!({"blob": blob, "n": m}));
    }
}

#[test]
fn the_sandbox_shows_a_reducer_nothing_but_fixed_clocks_and_seeded_randomness() {
    let probe = || {
        let runtime = runtime(ReducerLimits::default());
        let mut fold = Fold::new(&runtime, "probe");
        assert_eq!(applied(&fold.apply("p", &[r#""probe""#])), [true]);
        fold.state("p")
    };
    let seen = probe();
    // Another runtime, another instance: the same observations, random seed included.
    assert_eq!(probe(), seen);
    assert_eq!(seen["env"], "[]");
    assert_eq!(seen["args"], "[]");
    assert_eq!(seen["wall clock"], "Ok(0)");
    assert_eq!(seen["monotonic elapsed"], "0ns");
    for denied in ["read_dir /", "read /etc/passwd", "write /tmp/x", "tcp connect"] {
        let outcome = seen[denied].as_str().unwrap();
        assert!(outcome.starts_with("error: "), "{denied}: {outcome}");
    }
}
