//! The merge and delta laws, checked on random diff sequences through the real `.wasm`
//! reducers:
//!
//! - merge: if `merge(d1..dn)` composes to `d`, then for the base states generated,
//!   applying `d` gives the same state as applying `d1..dn` one by one (the run being the
//!   diffs that applied, which is what the host composes for catch-up);
//! - delta: applying `delta(a, b)` to `a` gives `b`.
//!
//! The generators produce the non-composable cases (a merge patch that replaces or deletes
//! a member, then an object patch over it) and the tests check they are reported as such.

mod common;

use std::cell::RefCell;

use common::{Fold, runtime};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use statefold::reducer::{Composed, ReducerLimits, Runtime};

/// Cases per law; `PROPTEST_CASES` raises it for a longer hunt.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256)
}

struct Law<'a> {
    fold: RefCell<Fold>,
    next_model: RefCell<u64>,
    composed: RefCell<u32>,
    not_composable: RefCell<Vec<String>>,
    _runtime: &'a Runtime,
}

impl<'a> Law<'a> {
    fn new(runtime: &'a Runtime, kind: &str) -> Law<'a> {
        Law {
            fold: RefCell::new(Fold::new(runtime, kind)),
            next_model: RefCell::new(0),
            composed: RefCell::new(0),
            not_composable: RefCell::new(Vec::new()),
            _runtime: runtime,
        }
    }

    fn fresh_model(&self) -> String {
        let mut n = self.next_model.borrow_mut();
        *n += 1;
        format!("m{n}")
    }

    /// Folds `base` then `run` one by one; if the applied part of `run` composes, checks
    /// that the composed diff on the same base gives the same state.
    fn check_merge(&self, base: &[String], run: &[String]) -> Result<(), TestCaseError> {
        let mut fold = self.fold.borrow_mut();
        let one_by_one = self.fresh_model();
        fold.apply_keep(&one_by_one, base);
        let applied = fold.apply_keep(&one_by_one, run);
        if applied.len() < 2 {
            return Ok(());
        }
        let payloads: Vec<Vec<u8>> = applied.iter().map(|d| d.as_bytes().to_vec()).collect();
        match fold.models.merge(&payloads).map_err(|e| TestCaseError::fail(e.to_string()))? {
            Composed::NotComposable(reason) => {
                self.not_composable.borrow_mut().push(reason);
            }
            Composed::Diff(d) => {
                *self.composed.borrow_mut() += 1;
                let composed = String::from_utf8(d).expect("json");
                let at_once = self.fresh_model();
                fold.apply_keep(&at_once, base);
                let took = fold.apply_keep(&at_once, std::slice::from_ref(&composed));
                prop_assert_eq!(took.len(), 1, "composed diff {} was refused", composed);
                prop_assert_eq!(
                    fold.state(&at_once),
                    fold.state(&one_by_one),
                    "run {:?} composed to {}",
                    applied,
                    composed
                );
            }
        }
        Ok(())
    }
}

fn run_cases<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

// ---- counter ----

fn counter_diff() -> impl Strategy<Value = String> {
    (any::<bool>(), -1_000_000_000i64..1_000_000_000)
        .prop_map(|(add, n)| if add { format!(r#"{{"add":{n}}}"#) } else { format!(r#"{{"sub":{n}}}"#) })
}

#[test]
fn counter_merge_law() {
    let runtime = runtime(ReducerLimits::default());
    let law = Law::new(&runtime, "counter");
    let base = prop::collection::vec(counter_diff(), 0..4);
    let run = prop::collection::vec(counter_diff(), 2..20);
    run_cases((base, run), |(base, run)| law.check_merge(&base, &run));
    assert!(*law.composed.borrow() >= cases() / 2, "counter composed only {} runs", law.composed.borrow());
}

// ---- document ----

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (0i64..4).prop_map(Value::from),
        "[xy]{0,2}".prop_map(Value::from),
        prop::collection::vec(0i64..3, 0..3).prop_map(|v| json!(v)),
    ]
}

/// Values over a few keys, so patches often touch the same members.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 16, 3, |inner| {
        prop::collection::btree_map(prop::sample::select(vec!["a", "b", "k"]), inner, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    })
}

/// Merge patches: mostly objects, sometimes a whole-document replacement.
fn patch() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::collection::btree_map(prop::sample::select(vec!["a", "b", "k"]), value(), 1..3)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        1 => value(),
    ]
    .prop_map(|v| v.to_string())
}

#[test]
fn document_merge_law() {
    let runtime = runtime(ReducerLimits::default());
    let law = Law::new(&runtime, "document");
    let base = prop::collection::vec(patch(), 0..4);
    let run = prop::collection::vec(patch(), 2..6);
    run_cases((base, run), |(base, run)| law.check_merge(&base, &run));
    let (composed, refused) = (*law.composed.borrow(), law.not_composable.borrow().len());
    assert!(composed >= cases() / 4, "document composed only {composed} runs");
    assert!(refused >= cases() as usize / 10, "the generator produced only {refused} non-composable runs");
}

#[test]
fn document_refuses_to_compose_the_issue_example() {
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "document");
    let reason = match fold.models.merge(&[br#"{"k":5}"#.to_vec(), br#"{"k":{"a":1}}"#.to_vec()]).unwrap() {
        Composed::NotComposable(reason) => reason,
        other => panic!("composed {other:?}"),
    };
    assert!(reason.contains("/k"), "{reason}");
    // The naive composition would be wrong on this base; the sequence is exact.
    fold.apply("d", &[r#"{"k":{"b":2}}"#, r#"{"k":5}"#, r#"{"k":{"a":1}}"#]);
    assert_eq!(fold.state("d"), json!({"k":{"a":1}}));
    // Where composition is exact, it composes.
    match fold.models.merge(&[br#"{"k":{"a":1}}"#.to_vec(), br#"{"k":{"b":null},"x":1}"#.to_vec()]).unwrap() {
        Composed::Diff(d) => {
            assert_eq!(serde_json::from_slice::<Value>(&d).unwrap(), json!({"k":{"a":1,"b":null},"x":1}))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn document_delta_law() {
    let runtime = runtime(ReducerLimits::default());
    let fold = RefCell::new(Fold::new(&runtime, "document"));
    let n = RefCell::new(0u64);
    let patches = || prop::collection::vec(patch(), 0..6);
    run_cases((patches(), patches()), |(to_a, to_b)| {
        let mut fold = fold.borrow_mut();
        *n.borrow_mut() += 1;
        let (a, b, c) = (format!("a{}", n.borrow()), format!("b{}", n.borrow()), format!("c{}", n.borrow()));
        fold.apply_keep(&a, &to_a);
        fold.apply_keep(&b, &to_b);
        let (snap_a, snap_b) = (fold.snapshot(&a), fold.snapshot(&b));
        let delta = fold.models.delta(&snap_a, &snap_b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let delta = String::from_utf8(delta).expect("json");
        fold.apply_keep(&c, &to_a);
        let took = fold.apply_keep(&c, std::slice::from_ref(&delta));
        prop_assert_eq!(took.len(), 1);
        prop_assert_eq!(fold.state(&c), fold.state(&b), "delta {}", delta);
        Ok(())
    });
}

// ---- workflow ----

fn workflow_diff() -> impl Strategy<Value = String> {
    let step = || prop::sample::select(vec!["a", "b", "c"]);
    let at = || 0u64..100;
    prop_oneof![
        prop::collection::vec(step(), 1..3).prop_map(|s| json!({"op":"plan","steps":s})),
        (step(), at()).prop_map(|(s, at)| json!({"op":"start","step":s,"at":at})),
        (step(), value()).prop_map(|(s, p)| json!({"op":"output","step":s,"patch":p})),
        (step(), at(), prop::option::of(value())).prop_map(|(s, at, o)| match o {
            Some(o) => json!({"op":"complete","step":s,"at":at,"output":o}),
            None => json!({"op":"complete","step":s,"at":at}),
        }),
        (step(), at()).prop_map(|(s, at)| json!({"op":"fail","step":s,"at":at,"error":"e"})),
        step().prop_map(|s| json!({"op":"skip","step":s})),
        (prop::sample::select(vec!["succeeded", "failed", "cancelled"]), at())
            .prop_map(|(st, at)| json!({"op":"finish","status":st,"at":at})),
    ]
    .prop_map(|v| v.to_string())
}

#[test]
fn workflow_merge_law_where_it_composes() {
    let runtime = runtime(ReducerLimits::default());
    let law = Law::new(&runtime, "workflow");
    let base = prop::collection::vec(workflow_diff(), 0..8);
    let run = prop::collection::vec(workflow_diff(), 2..30);
    run_cases((base, run), |(base, run)| law.check_merge(&base, &run));
    let composed = *law.composed.borrow();
    assert!(composed >= cases() / 4, "workflow composed only {composed} runs");
    // Runs whose step outputs cannot be composed are reported, never guessed.
    let reasons = law.not_composable.borrow();
    assert!(reasons.iter().all(|r| r.contains("outputs of step")), "{reasons:?}");
}

#[test]
fn workflow_composes_a_run_into_one_diff() {
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "workflow");
    let run = [
        r#"{"op":"plan","steps":["build","test"]}"#,
        r#"{"op":"start","step":"build","at":1}"#,
        r#"{"op":"output","step":"build","patch":{"log":"x"}}"#,
        r#"{"op":"complete","step":"build","at":2}"#,
        r#"{"op":"skip","step":"test"}"#,
        r#"{"op":"finish","status":"succeeded","at":3}"#,
    ];
    let payloads: Vec<Vec<u8>> = run.iter().map(|d| d.as_bytes().to_vec()).collect();
    let Composed::Diff(d) = fold.models.merge(&payloads).unwrap() else { panic!("not composed") };
    assert_eq!(
        serde_json::from_slice::<Value>(&d).unwrap(),
        json!({"op":"composite",
               "steps":{"build":{"set":{"status":"succeeded","started_at":1,"finished_at":2,"output":{"log":"x"}}},
                        "test":{"set":{"status":"skipped"}}},
               "finish":{"status":"succeeded","at":3}})
    );
    // A step running in the base whose outputs cannot compose: reported, not guessed.
    let outputs = [
        br#"{"op":"output","step":"build","patch":{"k":5}}"#.to_vec(),
        br#"{"op":"output","step":"build","patch":{"k":{"a":1}}}"#.to_vec(),
    ];
    assert!(
        matches!(fold.models.merge(&outputs).unwrap(), Composed::NotComposable(r) if r.contains("outputs of step \"build\""))
    );
}
