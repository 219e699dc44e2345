//! The engine alone: records in, `Folded` out, against an in-memory [`View`] that commits
//! what each fold returns (as the store would) and a counter reducer run natively (no
//! wasm to build). Fast; `tests/tests/fold.rs` covers the engine over the real store and
//! real `.wasm` reducers.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::model::{
    CREATE_HEADER, Checkpoint, DiffRecord, EXPECTED_HASH_HEADER, IDEMPOTENCY_KEY_HEADER, Keyed, ModelKey, Reaction,
    partition_of,
};
use crate::reducer::{Composed, Native, NativeModel, ReducerInfo};

/// A counter: the state is an integer, a diff is an integer added to it; a diff that would
/// take it below zero is refused.
struct Counter;

struct CounterModel(i64);

fn number(bytes: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("not a number: {bytes:?}"))
}

impl Native for Counter {
    fn create(&self, _model: &str, snapshot: Option<&[u8]>) -> Result<Box<dyn NativeModel>, String> {
        Ok(Box::new(CounterModel(snapshot.map(number).transpose()?.unwrap_or(0))))
    }

    fn merge(&self, diffs: &[Vec<u8>]) -> Result<Composed, String> {
        let sum: i64 = diffs.iter().map(|d| number(d)).sum::<Result<_, _>>()?;
        Ok(Composed::Diff(sum.to_string().into_bytes()))
    }

    fn delta(&self, from: &[u8], to: &[u8]) -> Result<Vec<u8>, String> {
        Ok((number(to)? - number(from)?).to_string().into_bytes())
    }
}

impl NativeModel for CounterModel {
    /// Emits a reaction to `hundreds` each time the count passes a multiple of 100.
    fn apply(&mut self, payload: &[u8], _offset: u64, _prev_hash: &[u8]) -> Result<Vec<Reaction>, String> {
        let next = self.0 + number(payload)?;
        if next < 0 {
            return Err(format!("{} would go below zero", self.0));
        }
        let passed = (self.0.div_euclid(100) + 1..=next.div_euclid(100)).map(|h| Reaction {
            topic: "hundreds".into(),
            key: "counter".into(),
            value: (h * 100).to_string().into_bytes(),
            headers: Vec::new(),
        });
        let reactions = passed.collect();
        self.0 = next;
        Ok(reactions)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.to_string().into_bytes()
    }
}

fn counter() -> Arc<Reducer> {
    let info = ReducerInfo {
        name: "counter".into(),
        version: "1.0.0".into(),
        diff_format: "json".into(),
        state_format: "json".into(),
        merge: true,
        delta: true,
        wit_version: semver::Version::new(0, 1, 0),
        imports: Vec::new(),
    };
    Reducer::native(ModuleHash::of(b"native counter"), info, Arc::new(Counter))
}

/// What the store keeps, in memory: heads, checkpoints and retained diffs, committed from
/// each `Folded` as `Store::commit` would.
#[derive(Default)]
struct FakeView {
    heads: HashMap<ModelKey, Head>,
    /// Per model: (offset, snapshot, version) of each checkpoint.
    checkpoints: HashMap<ModelKey, Vec<(u64, Vec<u8>, ModuleHash)>>,
    /// Per model: (offset, hash before, diff, version) of each retained diff.
    diffs: HashMap<ModelKey, Vec<(u64, Hash, DiffRecord, ModuleHash)>>,
    /// Diffs applied under idempotency keys.
    keyed: Vec<Keyed>,
}

impl FakeView {
    fn commit(&mut self, folded: &Folded) {
        for applied in &folded.applied {
            let entry = (applied.offset, applied.prev, DiffRecord::from(applied), applied.reducer);
            self.diffs.entry(applied.model.clone()).or_default().push(entry);
        }
        for cp in &folded.checkpoints {
            self.checkpoints.entry(cp.model.clone()).or_default().push((cp.offset, cp.snapshot.clone(), cp.reducer));
        }
        for prune in &folded.prunes {
            if let Some(diffs) = self.diffs.get_mut(&prune.model) {
                diffs.retain(|(offset, ..)| *offset > prune.diffs_through);
            }
            if let Some(checkpoints) = self.checkpoints.get_mut(&prune.model) {
                checkpoints.retain(|(offset, ..)| *offset >= prune.checkpoints_before);
            }
        }
        // (The store reads an advanced head back from its stored head and last diff.)
        for (model, head) in folded.heads.iter().chain(&folded.advanced) {
            self.heads.insert(model.clone(), head.clone());
        }
        self.keyed.extend(folded.keyed.iter().cloned());
    }
}

impl View for FakeView {
    fn head(&self, model: &ModelKey) -> Result<Option<Head>, ViewError> {
        Ok(self.heads.get(model).cloned())
    }

    // (Deploy records need modules that load: tests/tests/deploy.rs, with real `.wasm`.)
    fn deploy_chunk(&self, _: &ModuleHash, _: u32) -> Result<Option<Bytes>, ViewError> {
        Ok(None)
    }

    fn module(&self, _: &ModuleHash) -> Result<Option<Bytes>, ViewError> {
        Ok(None)
    }

    fn keyed(&self, model: &ModelKey, key: &str) -> Result<Option<Keyed>, ViewError> {
        Ok(self.keyed.iter().find(|k| k.model == *model && k.key == key).cloned())
    }

    fn checkpoint(&self, model: &ModelKey, head: &Head) -> Result<History, ViewError> {
        let latest = head
            .checkpoint()
            .and_then(|(_, offset)| self.checkpoints.get(model)?.iter().find(|(o, ..)| *o == offset).cloned());
        let after = latest.as_ref().map_or(0, |(offset, ..)| *offset);
        let tail: Vec<_> = self
            .diffs
            .get(model)
            .map(|diffs| diffs.iter().filter(|(offset, ..)| *offset > after || latest.is_none()).cloned().collect())
            .unwrap_or_default();
        Ok(History {
            snapshot_by: latest.as_ref().map(|(_, _, by)| *by),
            applied_by: tail.iter().map(|(.., by)| *by).collect(),
            checkpoint: Checkpoint {
                snapshot: latest.map(|(_, snapshot, _)| snapshot),
                tail: tail.into_iter().map(|(_, prev, diff, _)| (prev, diff)).collect(),
            },
        })
    }
}

fn engine(reducer: &Arc<Reducer>, limits: FoldLimits) -> Engine {
    let versions = Versions::new(Arc::new(Known(vec![reducer.clone()])), 4);
    Engine::new(vec![KindSpec::new("counter", "counter", reducer)], limits, versions)
}

fn record(offset: u64, key: &str, value: &str) -> Record {
    Record {
        topic: "counter".into(),
        partition: 0,
        offset,
        key: Some(key.as_bytes().to_vec()),
        value: Bytes::from(value.to_owned()),
        timestamp_ms: None,
        headers: Vec::new(),
    }
}

fn chain(id: &str, diffs: &[&str]) -> Hash {
    diffs.iter().fold(Hash::genesis("counter", id), |h, d| h.next(d.as_bytes()))
}

fn state(engine: &mut Engine, view: &FakeView, id: &str) -> i64 {
    // A read through a replay of its history: what a reader rebuilds from the view.
    let model = ModelKey::new("counter", id);
    let head = view.head(&model).unwrap().expect("a head");
    let history = view.checkpoint(&model, &head).unwrap();
    let snapshot = engine.versions.materialize(id, history, head.reducer).expect("materialized");
    number(&snapshot).unwrap()
}

#[test]
fn a_batch_applies_each_models_diffs_in_offset_order_and_chains_their_hashes() {
    let reducer = counter();
    let mut engine = engine(&reducer, FoldLimits::default());
    let mut view = FakeView::default();
    let records = [record(0, "a", "1"), record(1, "b", "10"), record(2, "a", "2"), record(3, "b", "20")];
    let folded = engine.fold(&records, &view).unwrap();
    assert_eq!(folded.consumed, 4);
    assert!(folded.rejected.is_empty(), "{:?}", folded.rejected);
    let applied: Vec<(&str, u64, u64)> = folded.applied.iter().map(|a| (&*a.model.id, a.offset, a.seq)).collect();
    assert_eq!(applied, [("a", 0, 1), ("a", 2, 2), ("b", 1, 1), ("b", 3, 2)]);
    let mut created: Vec<&str> = folded.created.iter().map(|m| &*m.id).collect();
    created.sort();
    assert_eq!(created, ["a", "b"]);
    view.commit(&folded);
    let a = view.heads[&ModelKey::new("counter", "a")].clone();
    assert_eq!((a.seq, a.offset, a.hash), (2, Some(2), chain("a", &["1", "2"])));
    assert_eq!(view.heads[&ModelKey::new("counter", "b")].hash, chain("b", &["10", "20"]));
    assert_eq!(folded.marks.len(), 4, "one digest mark per record");
    assert!(folded.marks.iter().all(|m| m.what == Became::Applied));
    assert_eq!((state(&mut engine, &view, "a"), state(&mut engine, &view, "b")), (3, 30));
}

#[test]
fn a_refused_diff_is_rejected_leaves_the_chain_and_state_alone_and_the_rest_apply() {
    let reducer = counter();
    let mut engine = engine(&reducer, FoldLimits::default());
    let mut view = FakeView::default();
    let folded = engine.fold(&[record(0, "a", "5"), record(1, "a", "-9"), record(2, "a", "1")], &view).unwrap();
    assert_eq!(folded.applied.len(), 2);
    assert_eq!(folded.rejected.len(), 1);
    let rejected = &folded.rejected[0];
    assert_eq!((rejected.offset, rejected.reason.code().as_str()), (1, "refused"));
    assert!(rejected.reason.message().contains("below zero"), "{}", rejected.reason.message());
    view.commit(&folded);
    assert_eq!(view.heads[&ModelKey::new("counter", "a")].hash, chain("a", &["5", "1"]));
    assert_eq!(state(&mut engine, &view, "a"), 6);
}

#[test]
fn reactions_of_applied_diffs_go_to_the_outbox_with_their_identity_and_a_refused_diffs_do_not() {
    let reducer = counter();
    let mut engine = engine(&reducer, FoldLimits::default());
    let mut view = FakeView::default();
    // a: 0 -> 150 (passes 100) -> refused -> 250 (passes 200); b: 0 -> 300 (passes 100, 200, 300).
    let records = [record(0, "a", "150"), record(1, "a", "-900"), record(2, "b", "300"), record(3, "a", "100")];
    let folded = engine.fold(&records, &view).unwrap();
    let outbox: Vec<(&str, u64, u64, u32, &[u8])> =
        folded.outbox.iter().map(|o| (&*o.model.id, o.offset, o.seq, o.index, o.reaction.value.as_slice())).collect();
    assert_eq!(
        outbox,
        [
            ("a", 0, 1, 0, &b"100"[..]),
            ("a", 3, 2, 0, b"200"),
            ("b", 2, 1, 0, b"100"),
            ("b", 2, 1, 1, b"200"),
            ("b", 2, 1, 2, b"300")
        ]
    );
    assert!(folded.outbox.iter().all(|o| &*o.source == "counter" && o.partition == 0));
    assert_eq!(folded.outbox[3].id(), "counter/1/1/b");
    view.commit(&folded);
    // Rebuilding a model (here: reading its state) applies its diffs again and emits nothing.
    assert_eq!(state(&mut engine, &view, "a"), 250);
    let folded = engine.fold(&[record(4, "a", "1")], &view).unwrap();
    assert!(folded.outbox.is_empty(), "{:?}", folded.outbox);
}

fn with_header(mut record: Record, name: &str, value: &str) -> Record {
    record.headers.push((name.to_owned(), value.as_bytes().to_vec()));
    record
}

#[test]
fn an_idempotency_key_applies_once_and_an_expected_hash_must_be_the_models() {
    let reducer = counter();
    let mut engine = engine(&reducer, FoldLimits::default());
    let mut view = FakeView::default();
    let keyed = |offset, value, key| with_header(record(offset, "a", value), IDEMPOTENCY_KEY_HEADER, key);
    // The same key twice in one batch, and a keyed diff refused (not recorded: a retry may apply).
    let records = [keyed(0, "5", "k1"), keyed(1, "5", "k1"), keyed(2, "-99", "k2"), keyed(3, "1", "k2")];
    let folded = engine.fold(&records, &view).unwrap();
    let codes: Vec<(u64, &str)> = folded.rejected.iter().map(|r| (r.offset, r.reason.code().as_str())).collect();
    assert_eq!(codes, [(1, "duplicate"), (2, "refused")]);
    assert_eq!(folded.rejected[0].reason, Rejection::Duplicate { seq: 1 });
    let keys: Vec<(&str, u64)> = folded.keyed.iter().map(|k| (k.key.as_str(), k.seq)).collect();
    assert_eq!(keys, [("k1", 1), ("k2", 2)]);
    view.commit(&folded);
    // In a later batch, from the view.
    let folded = engine.fold(&[keyed(4, "7", "k1")], &view).unwrap();
    assert_eq!(folded.rejected[0].reason, Rejection::Duplicate { seq: 1 });
    view.commit(&folded);

    let at = chain("a", &["5", "1"]);
    let expecting =
        |offset, value, hash: &Hash| with_header(record(offset, "a", value), EXPECTED_HASH_HEADER, &hash.to_string());
    // Two writers expecting the same hash: the first applies, the second is told.
    let folded = engine.fold(&[expecting(5, "10", &at), expecting(6, "20", &at)], &view).unwrap();
    assert_eq!(folded.applied.len(), 1);
    assert_eq!((folded.rejected[0].offset, folded.rejected[0].reason.code().as_str()), (6, "hash_mismatch"));
    assert!(folded.rejected[0].reason.message().contains(&chain("a", &["5", "1", "10"]).to_string()));
    view.commit(&folded);
    assert_eq!(state(&mut engine, &view, "a"), 16);
    // A new model is at its genesis hash.
    let genesis = ModelKey::new("counter", "b").genesis();
    let new = with_header(record(7, "b", "1"), EXPECTED_HASH_HEADER, &genesis.to_string());
    assert!(engine.fold(&[new], &view).unwrap().rejected.is_empty());
}

#[test]
fn bad_keys_oversized_values_and_foreign_topics_are_rejected_and_the_batch_goes_on() {
    let reducer = counter();
    let limits = FoldLimits { diff_bytes_max: 8, ..FoldLimits::default() };
    let mut engine = engine(&reducer, limits);
    let view = FakeView::default();
    let mut no_key = record(0, "x", "1");
    no_key.key = None;
    let control = record(1, "bad\u{1}id", "1");
    let empty = record(2, "", "1");
    let large = record(3, "a", "123456789");
    let mut foreign = record(4, "a", "1");
    foreign.topic = "elsewhere".into();
    let fine = record(5, "a", "1");
    let folded = engine.fold(&[no_key, control, empty, large, foreign, fine], &view).unwrap();
    let codes: Vec<(u64, &str)> = folded.rejected.iter().map(|r| (r.offset, r.reason.code().as_str())).collect();
    assert_eq!(
        codes,
        [(0, "invalid_key"), (1, "invalid_key"), (2, "invalid_key"), (3, "too_large"), (4, "unknown_topic")]
    );
    assert_eq!(folded.rejected[3].reason, Rejection::TooLarge { bytes: 9 });
    assert_eq!(folded.applied.len(), 1);
    assert_eq!(folded.marks.len(), 6, "every record is marked, rejected or not");
}

#[test]
fn an_offset_at_or_before_the_head_is_never_folded() {
    let reducer = counter();
    let mut engine = engine(&reducer, FoldLimits::default());
    let mut view = FakeView::default();
    view.commit(&engine.fold(&[record(10, "a", "1")], &view).unwrap());
    // A new engine (a restart) reads the head from the view.
    let mut engine = self::engine(&reducer, FoldLimits::default());
    let folded = engine.fold(&[record(7, "a", "1"), record(10, "a", "1"), record(11, "a", "2")], &view).unwrap();
    let rejected: Vec<_> = folded.rejected.iter().map(|r| (r.offset, r.reason.clone())).collect();
    assert_eq!(
        rejected,
        [(7, Rejection::OffsetRegressed { head_offset: 10 }), (10, Rejection::OffsetRegressed { head_offset: 10 })]
    );
    view.commit(&folded);
    assert_eq!(view.heads[&ModelKey::new("counter", "a")].hash, chain("a", &["1", "2"]));
}

#[test]
fn create_records_make_a_model_once() {
    let reducer = counter();
    let mut engine = engine(&reducer, FoldLimits::default());
    let view = FakeView::default();
    let mut create = record(0, "a", "");
    create.headers.push((CREATE_HEADER.into(), Vec::new()));
    let mut again = create.clone();
    again.offset = 1;
    let folded = engine.fold(&[create, again, record(2, "a", "4")], &view).unwrap();
    assert_eq!(folded.created, [ModelKey::new("counter", "a")]);
    let codes: Vec<(u64, &str)> = folded.rejected.iter().map(|r| (r.offset, r.reason.code().as_str())).collect();
    assert_eq!(codes, [(1, "model_exists")]);
    let head = &folded.heads[0].1;
    assert_eq!((head.seq, head.hash), (1, chain("a", &["4"])));
}

#[test]
fn checkpoints_come_every_interval_and_retention_prunes_behind_them() {
    let reducer = counter();
    let limits = FoldLimits {
        checkpoint_interval_diffs: 3,
        checkpoint_tail_percent: 0,
        retain_checkpoints: 1,
        ..FoldLimits::default()
    };
    let mut engine = engine(&reducer, limits.clone());
    let mut view = FakeView::default();
    let mut all = Vec::new();
    for batch in 0..4u64 {
        let records: Vec<Record> = (0..2).map(|i| record(batch * 2 + i, "a", "1")).collect();
        let folded = engine.fold(&records, &view).unwrap();
        all.extend(folded.checkpoints.iter().map(|c| (c.seq, c.offset, c.snapshot.clone())));
        view.commit(&folded);
    }
    // 8 diffs of 1: checkpoints after the 3rd (seq 3, offset 2) and the 6th... at a batch end.
    assert!(!all.is_empty(), "no checkpoint in 8 diffs at an interval of 3");
    for (seq, _, snapshot) in &all {
        assert_eq!(number(snapshot).unwrap(), *seq as i64, "a checkpoint holds the state at its seq");
    }
    let head = view.heads[&ModelKey::new("counter", "a")].clone();
    assert_eq!(head.checkpoints.len(), 1, "retain_checkpoints = 1");
    let kept = &view.diffs[&ModelKey::new("counter", "a")];
    assert!(kept.iter().all(|(offset, ..)| *offset > head.checkpoint().unwrap().1), "diffs behind it pruned");
    // A fresh engine rebuilds the model from the checkpoint and the diffs after it.
    let mut restarted = self::engine(&reducer, limits);
    let folded = restarted.fold(&[record(100, "a", "1")], &view).unwrap();
    view.commit(&folded);
    assert_eq!(view.heads[&ModelKey::new("counter", "a")].hash, chain("a", &["1"; 9]));
    assert_eq!(state(&mut restarted, &view, "a"), 9);
}

#[test]
fn an_offset_going_back_within_a_batch_is_rejected_not_applied() {
    // A model's records from two partitions (a producer with another partitioner): in one
    // batch its offsets can go back. The diff that goes back is rejected; the batch stays
    // one the store accepts.
    let reducer = counter();
    let mut engine = engine(&reducer, FoldLimits::default());
    let mut view = FakeView::default();
    let mut other = record(10, "a", "5");
    other.partition = 1;
    let records = [record(15, "a", "1"), other, record(16, "a", "2")];
    let folded = engine.fold(&records, &view).unwrap();
    let rejected: Vec<_> = folded.rejected.iter().map(|r| (r.partition, r.offset, r.reason.clone())).collect();
    assert_eq!(rejected, [(1, 10, Rejection::OffsetRegressed { head_offset: 15 })]);
    assert_eq!(rejected[0].2.code().as_str(), "offset_regressed");
    let applied: Vec<u64> = folded.applied.iter().map(|a| a.offset).collect();
    assert_eq!(applied, [15, 16]);
    view.commit(&folded);
    assert_eq!(view.heads[&ModelKey::new("counter", "a")].hash, chain("a", &["1", "2"]));
}

#[test]
fn a_record_off_its_models_partition_is_rejected_wherever_it_is_folded() {
    // Once the source has said how many partitions the topic has, a model's records belong
    // to its key's partition; one on another (a producer with another partitioner) is
    // rejected, whatever the order the partitions are fetched in.
    let reducer = counter();
    let home = partition_of(b"a", 3);
    let away = (home + 1) % 3;
    let at = |partition: u32, offset: u64, value: &str| Record { partition, ..record(offset, "a", value) };
    let orders = [
        [at(home, 5, "1"), at(away, 2, "10"), at(home, 6, "2")],
        [at(away, 2, "10"), at(home, 5, "1"), at(home, 6, "2")],
    ];
    for records in orders {
        let mut engine = engine(&reducer, FoldLimits::default());
        engine.set_partitions("counter", 3);
        let view = FakeView::default();
        let folded = engine.fold(&records, &view).unwrap();
        let rejected: Vec<_> =
            folded.rejected.iter().map(|r| (r.partition, r.offset, r.reason.code().as_str())).collect();
        assert_eq!(rejected, [(away, 2, "wrong_partition")]);
        assert_eq!(folded.heads[0].1.hash, chain("a", &["1", "2"]));
    }
}
