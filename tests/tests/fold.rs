//! The fold engine over the real RocksDB store, without HTTP: random batches with refusals,
//! traps, invalid keys, create records and replayed offsets, checkpoints and pruning, a
//! tiny resident budget (constant eviction) and restarts (a fresh engine on the same
//! store). Every model must end where a reference fold says.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::prelude::*;
use statefold::chain::Hash;
use statefold::fold::{CREATE_HEADER, Engine, FoldLimits, KindSpec, Known, ModelKey, Record, Rejection, Versions};
use statefold::reducer::Limits;
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
    let runtime = common::runtime(Limits { resident_models_max: 2, ..Limits::default() });
    // The faulty `trap` reducer: "inc" adds one, "trap" panics, anything else is refused.
    let reducer = common::load(&runtime, "trap");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions { fsync: false }).unwrap();
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
        let position = Position { topic: "trap".into(), partition: 0, next_offset: offset, digest: None };
        store.commit(&folded, &[("test".to_owned(), position)]).unwrap();
    }
    // A record replayed at an old offset is refused, never folded out of order.
    let replayed = fold.fold(&[record(1, Some("m0"), "\"inc\"", false)], &store).unwrap();
    assert!(matches!(replayed.rejected[0].reason, Rejection::OffsetRegressed { .. }), "{replayed:?}");

    let reader = store.read();
    let mut rejections: BTreeMap<&str, usize> = BTreeMap::new();
    for o in 0..offset {
        if let Some(rejection) = reader.rejection("trap", 0, o).unwrap() {
            *rejections.entry(rejection.code()).or_default() += 1;
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
