//! The example reducers, built to real `.wasm` components and run in the host runtime:
//! fixed diff sequences fold to exact states and hashes; refusals change nothing.

mod common;

use common::{Fold, applied, chain, runtime};
use serde_json::json;
use statefold::reducer::{Composed, Outcome, ReducerLimits};

#[test]
fn counter_folds_a_fixed_sequence() {
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "counter");
    let diffs = [r#"{"add":5}"#, r#"{"sub":2}"#, r#"{"mul":3}"#, r#"{"add":10}"#, r#"{"sub":3}"#, "not json"];
    let outcomes = fold.apply("c1", &diffs);
    assert_eq!(applied(&outcomes), [true, true, false, true, true, false]);
    assert!(matches!(&outcomes[2], Outcome::Refused(r) if r.contains("malformed diff")), "{outcomes:?}");
    assert_eq!(fold.state("c1"), json!(10));
    // The chain covers applied diffs only.
    let want = chain("counter", "c1", &[r#"{"add":5}"#, r#"{"sub":2}"#, r#"{"add":10}"#, r#"{"sub":3}"#]);
    assert_eq!(fold.hash("c1"), want);
    assert_eq!(outcomes[4], Outcome::Applied(want, vec![]));
}

#[test]
fn counter_refuses_overflow_and_keeps_its_state() {
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "counter");
    let max = i64::MAX.to_string();
    let add_max = format!(r#"{{"add":{max}}}"#);
    let outcomes = fold.apply("c", &[&add_max, r#"{"add":1}"#, r#"{"sub":1}"#]);
    assert_eq!(applied(&outcomes), [true, false, true]);
    assert!(matches!(&outcomes[1], Outcome::Refused(r) if r.contains("overflow")), "{outcomes:?}");
    assert_eq!(fold.state("c"), json!(i64::MAX - 1));
}

#[test]
fn document_folds_merge_patches() {
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "document");
    let outcomes = fold.apply(
        "d",
        &[
            r#"{"title":"Q3 plan","owner":{"name":"ana","team":"core"},"tags":["a"]}"#,
            r#"{"owner":{"team":null,"since":2024},"tags":["a","b"]}"#,
            r#"{"k":5}"#,
            r#"{"k":{"a":1}}"#,
            r#"{"title":null}"#,
            r#"[1,2"#,
        ],
    );
    assert_eq!(applied(&outcomes), [true, true, true, true, true, false]);
    assert_eq!(fold.state("d"), json!({"owner":{"name":"ana","since":2024},"tags":["a","b"],"k":{"a":1}}));
}

#[test]
fn workflow_folds_transitions_and_refuses_invalid_ones() {
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "workflow");
    let diffs = [
        r#"{"op":"plan","steps":["build","test","deploy"]}"#,
        r#"{"op":"complete","step":"build","at":5}"#, // never started: refused
        r#"{"op":"start","step":"build","at":10}"#,
        r#"{"op":"output","step":"build","patch":{"log":"compiling"}}"#,
        r#"{"op":"complete","step":"build","at":20,"output":{"artifact":"app.tar"}}"#,
        r#"{"op":"start","step":"build","at":21}"#, // already succeeded: refused
        r#"{"op":"start","step":"test","at":30}"#,
        r#"{"op":"finish","status":"succeeded","at":31}"#, // test still running: refused
        r#"{"op":"fail","step":"test","at":25,"error":"flaky"}"#, // ends before it started: refused
        r#"{"op":"fail","step":"test","at":40,"error":"flaky"}"#,
        r#"{"op":"start","step":"test","at":41}"#, // retry
        r#"{"op":"complete","step":"test","at":50}"#,
        r#"{"op":"skip","step":"deploy"}"#,
        r#"{"op":"finish","status":"succeeded","at":60}"#,
        r#"{"op":"start","step":"deploy","at":61}"#, // run finished: refused
    ];
    let outcomes = fold.apply("run-1", &diffs);
    assert_eq!(
        applied(&outcomes),
        [true, false, true, true, true, false, true, false, false, true, true, true, true, true, false]
    );
    let reasons: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Refused(r) => Some(r.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            r#"step "build" is not running (it is Some(Pending))"#,
            r#"cannot start step "build": it is Succeeded"#,
            r#"cannot finish: step "test" is still running"#,
            r#"step "test" cannot end at 25, before it started"#,
            "run already finished as Succeeded; it takes no more diffs",
        ]
    );
    assert_eq!(
        fold.state("run-1"),
        json!({
            "status": "succeeded",
            "finished_at": 60,
            "steps": {
                "build": {"status":"succeeded","started_at":10,"finished_at":20,
                          "output":{"log":"compiling","artifact":"app.tar"}},
                "test": {"status":"succeeded","started_at":41,"finished_at":50},
                "deploy": {"status":"skipped"}
            }
        })
    );
}

#[test]
fn refusals_do_not_change_state() {
    let runtime = runtime(ReducerLimits::default());
    for (kind, setup, refused) in [
        ("counter", vec![r#"{"add":7}"#], vec![r#"{"add":9223372036854775807}"#, r#"{"div":2}"#, "[]"]),
        ("document", vec![r#"{"a":{"b":1}}"#], vec!["{", r#""unterminated"#]),
        (
            "workflow",
            vec![r#"{"op":"plan","steps":["a"]}"#, r#"{"op":"start","step":"a","at":1}"#],
            vec![
                r#"{"op":"plan","steps":["a"]}"#,
                r#"{"op":"start","step":"a","at":2}"#,
                r#"{"op":"skip","step":"a"}"#,
                r#"{"op":"finish","status":"failed","at":3}"#,
                r#"{"op":"finish","status":"running","at":3}"#,
                r#"{"op":"composite","steps":{"a":{"update":{"end":{"as":"complete","at":0}}}}}"#,
                r#"{"op":"warp"}"#,
            ],
        ),
    ] {
        let mut fold = Fold::new(&runtime, kind);
        assert!(applied(&fold.apply("m", &setup)).iter().all(|a| *a));
        let (before, hash) = (fold.snapshot("m"), fold.hash("m"));
        for diff in refused {
            let outcomes = fold.apply("m", &[diff]);
            assert!(matches!(outcomes[0], Outcome::Refused(_)), "{kind}: {diff} gave {outcomes:?}");
            assert_eq!(fold.snapshot("m"), before, "{kind}: {diff} changed the state");
            assert_eq!(fold.hash("m"), hash);
        }
    }
}

#[test]
fn each_diff_sees_its_context() {
    // The hash each diff sees as `prev-hash` is the chain over the diffs applied before it,
    // including across a refusal inside one batch: the workflow fixture above would not
    // fold to the same hash otherwise. Here the chain is checked against an independent
    // computation after a refusal in the middle of a batch.
    let runtime = runtime(ReducerLimits::default());
    let mut fold = Fold::new(&runtime, "counter");
    let outcomes = fold.apply("c", &[r#"{"add":1}"#, "bad", r#"{"add":2}"#, r#"{"add":3}"#]);
    let want = [
        chain("counter", "c", &[r#"{"add":1}"#]),
        chain("counter", "c", &[r#"{"add":1}"#, r#"{"add":2}"#]),
        chain("counter", "c", &[r#"{"add":1}"#, r#"{"add":2}"#, r#"{"add":3}"#]),
    ];
    assert_eq!(outcomes[0], Outcome::Applied(want[0], vec![]));
    assert_eq!(outcomes[2], Outcome::Applied(want[1], vec![]));
    assert_eq!(outcomes[3], Outcome::Applied(want[2], vec![]));
}

/// `totals` in Rust, JavaScript (componentize-js) and Python (componentize-py), loaded by
/// the same runtime: the same diffs fold to the same states and hashes, the same ones are
/// refused, and merge and delta agree.
#[test]
fn totals_folds_alike_in_rust_javascript_and_python() {
    let runtime = runtime(ReducerLimits::default());
    let diffs = [
        r#"{"add": {"apples": 3}}"#,
        r#"{"add": {"apples": 2, "pears": 1}}"#,
        r#"{"add": ["apples"]}"#,
        "not json",
        r#"{"add": {"pears": -1}}"#,
        r#"{"add": {"plums": 4}, "more": 1}"#,
        r#"{"add": {"plums": 4}}"#,
    ];
    let mut seen = Vec::new();
    for name in ["totals", "totals_js", "totals_py"] {
        let mut fold = Fold::new(&runtime, name);
        fold.kind = "baskets".into(); // (one kind for the three: the same genesis hash)
        let outcomes = fold.apply("basket", &diffs);
        assert_eq!(applied(&outcomes), [true, true, false, false, true, false, true], "{name}: {outcomes:?}");
        let merged = fold.models.merge(&[br#"{"add":{"a":1}}"#.to_vec(), br#"{"add":{"a":2,"b":1}}"#.to_vec()]);
        let merged: serde_json::Value = match merged.expect("merge") {
            Composed::Diff(diff) => serde_json::from_slice(&diff).unwrap(),
            other => panic!("{name}: {other:?}"),
        };
        let delta = fold.models.delta(br#"{"a":1}"#, br#"{"b":2}"#).expect("delta");
        let delta: serde_json::Value = serde_json::from_slice(&delta).unwrap();
        seen.push((name, fold.state("basket"), fold.hash("basket"), merged, delta));
    }
    assert_eq!(seen[0].1, json!({"apples": 5, "plums": 4}));
    assert_eq!(seen[0].3, json!({"add": {"a": 3, "b": 1}}));
    assert_eq!(seen[0].4, json!({"add": {"a": -1, "b": 2}}));
    for other in &seen[1..] {
        assert_eq!((&other.1, &other.2), (&seen[0].1, &seen[0].2), "{} folds like {}", other.0, seen[0].0);
        assert_eq!((&other.3, &other.4), (&seen[0].3, &seen[0].4), "{}: merge and delta", other.0);
    }
}
