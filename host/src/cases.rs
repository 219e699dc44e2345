//! `statefold test`: folds JSON-lines cases through a reducer in the server's runtime,
//! sandbox and limits, and checks what each line expects. With laws on, it also checks
//! merge and delta (the laws catch-up relies on) on the cases' runs and on runs generated
//! from their diffs.
//!
//! A case file has one JSON object per line (blank lines and lines starting with `//` or
//! `#` are skipped):
//!
//! ```text
//! {"diff": {"add": 2}, "state": 2}
//! {"diff": {"add": 3}, "state": 5, "hash": "9d1c…"}
//! {"diff": {"sub": 9223372036854775807}, "refused": "overflow"}
//! {"model": "other", "diff": {"add": 1}}
//! ```
//!
//! `diff` is applied to `model` (default `case`) as its exact text, so `hash` is the hash
//! a server gives the same diff appended as that text to a model with that id; `state` is
//! the expected state after the line (JSON compared as values), `refused` that the reducer
//! refuses the diff (`true`, or a text its reason must contain).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;
use serde_json::value::RawValue;

use crate::chain::Hash;
use crate::model::DiffRecord;
use crate::reducer::{Checkpoints, Composed, MemoryCheckpoints, Models, Outcome, Reducer, ReducerError};

/// One line of a case file.
#[derive(Debug)]
pub struct Case {
    /// Its line number (from 1).
    pub line: usize,
    pub model: String,
    pub diff: Option<Box<RawValue>>,
    pub state: Option<Value>,
    pub hash: Option<String>,
    /// `Some("")`: refused for any reason; `Some(text)`: a reason containing `text`.
    pub refused: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    model: Option<String>,
    diff: Option<Box<RawValue>>,
    state: Option<Value>,
    hash: Option<String>,
    refused: Option<Value>,
}

/// Reads a case file; the error names the line.
pub fn parse(text: &str) -> Result<Vec<Case>, String> {
    let mut cases = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("//") || trimmed.starts_with('#') {
            continue;
        }
        let parsed: Line = serde_json::from_str(trimmed).map_err(|e| format!("line {}: {e}", n + 1))?;
        let refused = match parsed.refused {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(String::new()),
            Some(Value::String(text)) => Some(text),
            Some(other) => return Err(format!("line {}: `refused` is true or a text, not {other}", n + 1)),
        };
        if parsed.diff.is_none() && refused.is_some() {
            return Err(format!("line {}: `refused` needs a `diff`", n + 1));
        }
        cases.push(Case {
            line: n + 1,
            model: parsed.model.unwrap_or_else(|| "case".to_owned()),
            diff: parsed.diff,
            state: parsed.state,
            hash: parsed.hash,
            refused,
        });
    }
    Ok(cases)
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: usize,
    pub applied: usize,
    pub refused: usize,
    /// Each failure, readable: the line, what was expected, what came.
    pub failures: Vec<String>,
    pub laws: Option<Laws>,
}

/// What the laws checked.
#[derive(Debug, Default)]
pub struct Laws {
    pub merges: usize,
    pub not_composable: usize,
    pub deltas: usize,
    pub generated_runs: usize,
}

/// The longest run of consecutive diffs whose merge is checked.
const MERGE_RUN_MAX: usize = 8;
/// Pairs of states whose delta is checked, per model.
const DELTA_PAIRS_MAX: usize = 64;
/// Runs generated from the cases' diffs when laws are checked.
const GENERATED_RUNS: usize = 32;

/// A model's applied diffs, and its state before the first and after each.
#[derive(Default)]
struct Run {
    diffs: Vec<(usize, Vec<u8>)>,
    states: Vec<Vec<u8>>,
}

/// Folds `cases` through `reducer` as models of `kind`; with `laws` (a seed for the
/// generated runs), checks merge and delta too.
pub fn run(reducer: &Arc<Reducer>, kind: &str, cases: &[Case], laws: Option<u64>) -> Result<Report, ReducerError> {
    let mut models = reducer.models();
    let mut checkpoints = MemoryCheckpoints::default();
    let mut heads: BTreeMap<String, Hash> = BTreeMap::new();
    let mut runs: BTreeMap<String, Run> = BTreeMap::new();
    let mut report = Report { lines: cases.len(), ..Report::default() };
    for case in cases {
        let head = *heads.entry(case.model.clone()).or_insert_with(|| Hash::genesis(kind, &case.model));
        let run = runs.entry(case.model.clone()).or_default();
        if run.states.is_empty() {
            run.states.push(models.snapshot(&case.model, &mut checkpoints)?);
        }
        let at = format!("line {} (model {:?})", case.line, case.model);
        if let Some(diff) = &case.diff {
            let payload = diff.get().as_bytes().to_vec();
            let outcome = apply_one(&mut models, &mut checkpoints, &case.model, head, case.line, &payload)?;
            match (&outcome, &case.refused) {
                (Outcome::Applied(hash, _), expected) => {
                    if expected.is_some() {
                        report.failures.push(format!("{at}: expected the diff refused; it was applied"));
                    } else {
                        report.applied += 1;
                    }
                    heads.insert(case.model.clone(), *hash);
                    run.diffs.push((case.line, payload));
                    run.states.push(models.snapshot(&case.model, &mut checkpoints)?);
                }
                (Outcome::Refused(reason), Some(expected)) if reason.contains(expected.as_str()) => report.refused += 1,
                (Outcome::Refused(reason), Some(expected)) => report
                    .failures
                    .push(format!("{at}: refused \"{reason}\", expected a reason containing \"{expected}\"")),
                (Outcome::Refused(reason), None) => report.failures.push(format!("{at}: refused: {reason}")),
                (Outcome::Failed(reason), _) => report.failures.push(format!("{at}: the reducer failed: {reason}")),
            }
        }
        if let Some(expected) = &case.state {
            let actual = models.snapshot(&case.model, &mut checkpoints)?;
            compare_state(&at, expected, &actual, &mut report.failures);
        }
        if let Some(expected) = &case.hash {
            let actual = heads[&case.model].to_string();
            if *expected != actual {
                report.failures.push(format!("{at}: hash {actual}, expected {expected}"));
            }
        }
    }
    if let Some(seed) = laws {
        let mut laws = Laws::default();
        let info = reducer.info().clone();
        let mut scratch = Scratch { models: reducer.models(), checkpoints: MemoryCheckpoints::default(), n: 0 };
        for (model, run) in &runs {
            check_run(&mut scratch, &info, &format!("model {model:?}"), run, &mut laws, &mut report.failures)?;
        }
        // Runs generated from every diff the cases applied, in random orders, from a new
        // model's state.
        let pool: Vec<(usize, Vec<u8>)> = runs.values().flat_map(|r| r.diffs.iter().cloned()).collect();
        let mut rng = seed.max(1);
        for n in 0..if pool.len() >= 2 { GENERATED_RUNS } else { 0 } {
            let length = 2 + (next(&mut rng) as usize) % (MERGE_RUN_MAX - 1);
            let picked: Vec<(usize, Vec<u8>)> =
                (0..length).map(|_| pool[next(&mut rng) as usize % pool.len()].clone()).collect();
            let model = format!("generated-{n}");
            let mut run =
                Run { diffs: Vec::new(), states: vec![scratch.models.snapshot(&model, &mut scratch.checkpoints)?] };
            let mut head = Hash::genesis(kind, &model);
            for (line, diff) in picked {
                let outcome = apply_one(&mut scratch.models, &mut scratch.checkpoints, &model, head, line, &diff)?;
                if let Outcome::Applied(hash, _) = outcome {
                    head = hash;
                    run.diffs.push((line, diff));
                    run.states.push(scratch.models.snapshot(&model, &mut scratch.checkpoints)?);
                }
            }
            let lines: Vec<String> = run.diffs.iter().map(|(l, _)| l.to_string()).collect();
            let name = format!("generated run {n} (the diffs of lines {})", lines.join(", "));
            check_run(&mut scratch, &info, &name, &run, &mut laws, &mut report.failures)?;
            laws.generated_runs += 1;
        }
        report.laws = Some(laws);
    }
    Ok(report)
}

/// Applies one diff (`offset`: its line) to `model` at `head`, and records it if applied.
fn apply_one(
    models: &mut Models,
    checkpoints: &mut MemoryCheckpoints,
    model: &str,
    head: Hash,
    offset: usize,
    payload: &[u8],
) -> Result<Outcome, ReducerError> {
    let record =
        DiffRecord { offset: offset as u64, timestamp_ms: None, headers: Vec::new(), payload: payload.to_vec() };
    let records = std::slice::from_ref(&record);
    let mut outcomes = models.apply(model, head, records, checkpoints)?;
    checkpoints.record(model, head, records, &outcomes);
    Ok(outcomes.remove(0))
}

/// xorshift64: the generated runs are the same for the same seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Models for the laws' applications, apart from the cases' own.
struct Scratch {
    models: Models,
    checkpoints: MemoryCheckpoints,
    n: usize,
}

impl Scratch {
    /// `diff` applied to a new model whose state is `from`: the state it gives, or why not.
    fn apply_to(&mut self, from: &[u8], diff: &[u8]) -> Result<Result<Vec<u8>, String>, ReducerError> {
        self.n += 1;
        let model = format!("law-{}", self.n);
        self.checkpoints
            .save(&model, from.to_vec())
            .map_err(|source| ReducerError::Checkpoints { model: model.clone(), source })?;
        let start = Hash::from_bytes([0; 32]);
        let state = match apply_one(&mut self.models, &mut self.checkpoints, &model, start, 0, diff)? {
            Outcome::Applied(..) => Ok(self.models.snapshot(&model, &mut self.checkpoints)?),
            Outcome::Refused(reason) => Err(format!("refused: {reason}")),
            Outcome::Failed(reason) => Err(format!("failed: {reason}")),
        };
        self.models.forget(&model)?;
        Ok(state)
    }
}

/// Merge on every run of 2 to [`MERGE_RUN_MAX`] consecutive diffs of `run`, delta on pairs
/// of its states (up to [`DELTA_PAIRS_MAX`]), as the reducer declares them.
fn check_run(
    scratch: &mut Scratch,
    info: &crate::reducer::ReducerInfo,
    name: &str,
    run: &Run,
    laws: &mut Laws,
    failures: &mut Vec<String>,
) -> Result<(), ReducerError> {
    let count = run.diffs.len();
    if info.merge {
        for i in 0..count {
            for j in (i + 2)..=(i + MERGE_RUN_MAX).min(count) {
                let diffs: Vec<Vec<u8>> = run.diffs[i..j].iter().map(|(_, d)| d.clone()).collect();
                let lines = format!("lines {} to {}", run.diffs[i].0, run.diffs[j - 1].0);
                match scratch.models.merge(&diffs)? {
                    Composed::NotComposable(_) => laws.not_composable += 1,
                    Composed::Diff(composed) => {
                        laws.merges += 1;
                        let text = String::from_utf8_lossy(&composed).into_owned();
                        match scratch.apply_to(&run.states[i], &composed)? {
                            Err(why) => failures.push(format!(
                                "merge law, {name}, {lines}: their merge {text} was not applied: {why}"
                            )),
                            Ok(state) if !same(&state, &run.states[j]) => failures.push(format!(
                                "merge law, {name}, {lines}: their merge {text} gives {}; applied one by one they give {}",
                                String::from_utf8_lossy(&state),
                                String::from_utf8_lossy(&run.states[j])
                            )),
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
    }
    if info.delta {
        let states = &run.states;
        let pairs = (0..states.len()).flat_map(|i| ((i + 1)..states.len()).map(move |j| (i, j)));
        for (i, j) in pairs.take(DELTA_PAIRS_MAX) {
            laws.deltas += 1;
            let delta = scratch.models.delta(&states[i], &states[j])?;
            let (from, to) = (String::from_utf8_lossy(&states[i]), String::from_utf8_lossy(&states[j]));
            match scratch.apply_to(&states[i], &delta)? {
                Err(why) => failures.push(format!("delta law, {name}: delta({from}, {to}) was not applied: {why}")),
                Ok(state) if !same(&state, &states[j]) => failures.push(format!(
                    "delta law, {name}: delta({from}, {to}) = {} applied to {from} gives {}",
                    String::from_utf8_lossy(&delta),
                    String::from_utf8_lossy(&state)
                )),
                Ok(_) => {}
            }
        }
    }
    Ok(())
}

/// Two states: equal as JSON values when both are JSON, else byte for byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    match (serde_json::from_slice::<Value>(a), serde_json::from_slice::<Value>(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn compare_state(at: &str, expected: &Value, actual: &[u8], failures: &mut Vec<String>) {
    let Ok(actual) = serde_json::from_slice::<Value>(actual) else {
        failures.push(format!("{at}: the state is not JSON: {}", String::from_utf8_lossy(actual)));
        return;
    };
    if *expected == actual {
        return;
    }
    let mut differences = Vec::new();
    differ("", expected, &actual, &mut differences);
    let shown: Vec<&String> = differences.iter().take(10).collect();
    let more = differences.len().saturating_sub(shown.len());
    let mut text = format!("{at}: the state differs from the expected one:");
    for line in shown {
        text.push_str("\n    ");
        text.push_str(line);
    }
    if more > 0 {
        text.push_str(&format!("\n    ... and {more} more"));
    }
    text.push_str(&format!("\n  expected {expected}\n  actual   {actual}"));
    failures.push(text);
}

/// The JSON pointers where `expected` and `actual` differ, each with both values.
fn differ(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, ev) in e {
                let at = format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"));
                match a.get(key) {
                    Some(av) => differ(&at, ev, av, out),
                    None => out.push(format!("{at}: expected {ev}, missing")),
                }
            }
            for (key, av) in a {
                if !e.contains_key(key) {
                    out.push(format!("{path}/{}: not expected, got {av}", key.replace('~', "~0").replace('/', "~1")));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                differ(&format!("{path}/{i}"), ev, av, out);
            }
        }
        _ if expected != actual => {
            out.push(format!("{}: expected {expected}, got {actual}", if path.is_empty() { "/" } else { path }))
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_file_is_read_line_by_line_and_its_errors_name_the_line() {
        let cases = parse("# a comment\n{\"diff\": {\"add\": 1}, \"state\": 1}\n\n{\"model\": \"m\", \"diff\": 2, \"refused\": \"too\"}\n").unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(
            (cases[0].line, cases[0].model.as_str(), cases[0].diff.as_ref().unwrap().get()),
            (2, "case", "{\"add\": 1}")
        );
        assert_eq!((cases[1].line, cases[1].refused.as_deref()), (4, Some("too")));
        assert!(parse("{\"diff\": 1}\n{\"dif\": 2}").unwrap_err().starts_with("line 2: unknown field `dif`"));
        assert!(parse("{\"refused\": true}").unwrap_err().contains("needs a `diff`"));
    }

    #[test]
    fn state_differences_are_listed_by_path() {
        let mut out = Vec::new();
        differ(
            "",
            &serde_json::json!({"a": 1, "b": {"c": [1, 2]}, "d": 0}),
            &serde_json::json!({"a": 1, "b": {"c": [1, 3]}, "e": 0}),
            &mut out,
        );
        assert_eq!(out, ["/b/c/1: expected 2, got 3", "/d: expected 0, missing", "/e: not expected, got 0"]);
    }
}
