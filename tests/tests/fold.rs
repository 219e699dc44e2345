//! The fold engine over the real RocksDB store, without HTTP: random batches with refusals,
//! traps, invalid keys, create records and replayed offsets, checkpoints and pruning, a
//! tiny resident budget (constant eviction) and restarts (a fresh engine on the same
//! store). Every model must end where a reference fold says.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::prelude::*;
use statefold::chain::Hash;
use statefold::fold::{Engine, FoldLimits, KindSpec, Known, Versions};
use statefold::model::{CREATE_HEADER, ModelKey, Record, Rejection};
use statefold::reducer::ReducerLimits;
use statefold::store::{Position, Store, StoreOptions};

fn record(offset: u64, key: Option<&str>, value: &str, create: bool) -> Record {
    Record {
        topic: "trap".into(),
        partition: 0,
        offset,
        key: key.map(|k| k.as_bytes().to_vec()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        timestamp_ms: Some(offset as i64),
        headers: if create { vec![(CREATE_HEADER.to_owned(), Vec::new())] } else { Vec::new() },
    }
}

#[test]
fn random_batches_restarts_and_faults_fold_to_the_reference() {
    let runtime = common::runtime(ReducerLimits { resident_models_max: 2, ..ReducerLimits::default() });
    // The faulty `trap` reducer: "inc" adds one, "trap" panics, anything else is refused.
    let reducer = common::load(&runtime, "trap");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let limits = FoldLimits {
        checkpoint_interval_diffs: 5,
        retain_checkpoints: 2,
        head_cache_models_max: 1000,
        ..FoldLimits::default()
    };
    let engine = || {
        let spec = KindSpec::new("trap", "trap", &reducer);
        let versions = Versions::new(std::sync::Arc::new(Known(vec![reducer.clone()])), 2);
        Engine::new(vec![spec], limits.clone(), versions)
    };
    let mut rng = StdRng::seed_from_u64(7);
    let mut reference: BTreeMap<String, (i64, Hash)> = BTreeMap::new();
    let mut expected_rejections: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fold = engine();
    let mut offset = 0u64;
    for batch_no in 0..60 {
        if batch_no % 20 == 19 {
            fold = engine(); // a restart: nothing resident, heads and checkpoints from the store
        }
        let mut records = Vec::new();
        for _ in 0..rng.random_range(1..40) {
            let id = format!("m{}", rng.random_range(0..6));
            let (value, create) = match rng.random_range(0..20) {
                0 => ("\"trap\"", false),
                1 => ("\"dec\"", false),
                2 => ("", true),
                3 => {
                    records.push(record(offset, None, "\"inc\"", false));
                    *expected_rejections.entry("invalid_key").or_default() += 1;
                    offset += 1;
                    continue;
                }
                _ => ("\"inc\"", false),
            };
            let entry = reference.get(&id).copied();
            match (create, value, entry) {
                (true, _, Some(_)) => *expected_rejections.entry("model_exists").or_default() += 1,
                (true, _, None) => {
                    reference.insert(id.clone(), (0, Hash::genesis("trap", &id)));
                }
                (false, "\"inc\"", _) => {
                    let (n, h) = entry.unwrap_or((0, Hash::genesis("trap", &id)));
                    reference.insert(id.clone(), (n + 1, h.next(value.as_bytes())));
                }
                (false, "\"trap\"", _) => {
                    *expected_rejections.entry("reducer_failed").or_default() += 1;
                    reference.entry(id.clone()).or_insert((0, Hash::genesis("trap", &id)));
                }
                _ => {
                    *expected_rejections.entry("refused").or_default() += 1;
                    reference.entry(id.clone()).or_insert((0, Hash::genesis("trap", &id)));
                }
            }
            records.push(record(offset, Some(&id), value, create));
            offset += 1;
        }
        let folded = fold.fold(&records, &store).unwrap();
        let position =
            Position { topic: "trap".into(), partition: 0, next_offset: offset, digest: None, witness: None };
        store.commit(&folded, &[("test".to_owned(), position)]).unwrap();
    }
    // A record replayed at an old offset is refused, never folded out of order.
    let replayed = fold.fold(&[record(1, Some("m0"), "\"inc\"", false)], &store).unwrap();
    assert!(matches!(replayed.rejected[0].reason, Rejection::OffsetRegressed { .. }), "{replayed:?}");

    let reader = store.read();
    let mut rejections: BTreeMap<&str, usize> = BTreeMap::new();
    for o in 0..offset {
        if let Some(rejection) = reader.rejection("trap", 0, o).unwrap() {
            *rejections.entry(rejection.code().as_str()).or_default() += 1;
        }
    }
    assert_eq!(rejections, expected_rejections);
    let mut models = reducer.models();
    let mut pruned = 0;
    for (id, (n, hash)) in &reference {
        let model = ModelKey::new("trap", id);
        let head = reader.head(&model).unwrap().expect("stored");
        assert_eq!(head.hash, *hash, "{id}");
        assert_eq!(head.seq, *n as u64, "{id}");
        pruned += usize::from(head.pruned_through.is_some());
        let checkpoint = reader.checkpoint_for(&model, &head, head.offset.unwrap_or(0)).unwrap();
        let state = models.materialize(id, &checkpoint.checkpoint).unwrap();
        assert_eq!(String::from_utf8(state).unwrap(), n.to_string(), "{id}");
    }
    assert!(pruned > 0, "retention pruned some model's old diffs");
    // The replayed record's rejection survives the store round trip, with its detail.
    store.commit(&replayed, &[]).unwrap();
    assert_eq!(store.read().rejection("trap", 0, 1).unwrap(), Some(replayed.rejected[0].reason.clone()));
    assert_eq!(store.position("test", "trap", 0).unwrap(), Some(offset));
}

/// Checkpoints wait for the diffs since the last one to add up to `checkpoint_tail_percent`
/// of its size: a 100 KB document is snapshotted about every 100 diffs of 100 bytes, a
/// small one every `checkpoint_interval_diffs`; both fold exactly.
#[test]
fn a_large_state_is_checkpointed_once_its_diffs_add_up_to_a_share_of_it() {
    let runtime = common::runtime(ReducerLimits::default());
    let reducer = common::load(&runtime, "document");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let limits = FoldLimits { checkpoint_interval_diffs: 5, checkpoint_tail_percent: 10, ..FoldLimits::default() };
    let spec = KindSpec::new("document", "document", &reducer);
    let versions = Versions::new(std::sync::Arc::new(Known(vec![reducer.clone()])), 2);
    let mut fold = Engine::new(vec![spec], limits, versions);
    let mut offset = 0u64;
    // One record per batch, so that the rule is checked after every diff.
    let mut fold_one = |id: &str, value: String, create: bool| {
        let mut record = record(offset, Some(id), &value, create);
        record.topic = "document".into();
        let folded = fold.fold(&[record], &store).unwrap();
        assert!(folded.rejected.is_empty(), "{:?}", folded.rejected);
        offset += 1;
        let position =
            Position { topic: "document".into(), partition: 0, next_offset: offset, digest: None, witness: None };
        store.commit(&folded, &[("test".to_owned(), position)]).unwrap();
        (offset - 1, store.read().head(&ModelKey::new("document", id)).unwrap().expect("stored"))
    };
    for id in ["big", "small"] {
        fold_one(id, String::new(), true);
    }
    // The rule, followed diff by diff: (seq, diffs since, bytes since, the latest
    // checkpoint's size).
    let mut expected = BTreeMap::from([("big", (0u64, 0u64, 0u64, 0u64)), ("small", (0, 0, 0, 0))]);
    let mut checkpoints = BTreeMap::from([("big", 0), ("small", 0)]);
    let blob = format!(r#"{{"blob":"{}"}}"#, "x".repeat(100_000));
    for i in 0..400 {
        for id in ["big", "small"] {
            let diff = if i == 0 && id == "big" { blob.clone() } else { format!(r#"{{"n":"{i:0>90}"}}"#) };
            let (at, head) = fold_one(id, diff.clone(), false);
            let (seq, since, tail, size) = expected.get_mut(id).unwrap();
            *seq += 1;
            *since += 1;
            *tail += diff.len() as u64;
            if *since >= 5 && *tail >= *size * 10 / 100 {
                assert_eq!(head.checkpoint(), Some((*seq, at)), "{id} is due at seq {seq}");
                let model = ModelKey::new("document", id);
                let saved = store.read().checkpoint_for(&model, &head, at).unwrap();
                *size = saved.checkpoint.snapshot.expect("a snapshot").len() as u64;
                assert_eq!(head.checkpoint_bytes, *size);
                (*since, *tail) = (0, 0);
                *checkpoints.get_mut(id).unwrap() += 1;
            } else {
                assert_eq!(head.seq - head.checkpoint().map_or(0, |(seq, _)| seq), *since, "{id} at seq {seq}");
                // Read back from the last diff where the batch left the stored head as it was.
                assert_eq!(head.tail_bytes, *tail, "{id} at seq {seq}");
            }
        }
    }
    assert_eq!(checkpoints["small"], 80, "every 5 diffs");
    assert!((2..=6).contains(&checkpoints["big"]), "about every 100 diffs: {checkpoints:?}");
    // Both still rebuild from their latest checkpoint to the folded state.
    let mut models = reducer.models();
    for id in ["big", "small"] {
        let model = ModelKey::new("document", id);
        let head = store.read().head(&model).unwrap().unwrap();
        let history = store.read().checkpoint_for(&model, &head, head.offset.unwrap()).unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&models.materialize(id, &history.checkpoint).unwrap()).unwrap();
        assert_eq!(state["n"], format!("{:0>90}", 399), "{id}");
        assert_eq!(state.get("blob").is_some(), id == "big");
    }
}
