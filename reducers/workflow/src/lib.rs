//! `workflow`: the state of one workflow run (the seed's `POST /workflows`).
//!
//! State: the run's status, its steps (status, times, output, error) and when it finished.
//! Diffs are transitions, tagged by `op`; timestamps (`at`, milliseconds) travel in the
//! diffs, so folding is deterministic:
//!
//! | op | valid when | effect |
//! |---|---|---|
//! | `plan {steps}` | none of the steps exists | adds them as `pending` |
//! | `start {step, at}` | step absent, `pending` or `failed` (a retry) | `running`, fresh record |
//! | `output {step, patch}` | step `running` | merge-patches (RFC 7396) the step's output |
//! | `complete {step, at, output?}` | step `running`, `at` ≥ its start | `succeeded` |
//! | `fail {step, at, error}` | step `running`, `at` ≥ its start | `failed` |
//! | `skip {step}` | step absent or `pending` | `skipped` |
//! | `finish {status, at}` | no step `running`, final status | run `succeeded`/`failed`/`cancelled` |
//! | `composite {steps, finish?}` | (produced by merge) | the effect of a run of the above |
//!
//! A `finish` (or a composite that finishes) emits a **reaction** to the topic
//! `workflow-finished`, keyed by the run: `{run, status, finished_at, steps: {name: status}}`
//! (see [`FINISHED_TOPIC`]).
//!
//! Every step transition is refused once the run has finished. Transitions do not commute
//! (`complete` before `start` is refused), yet a run of them composes: a step the run
//! (re)starts ends in a record that does not depend on the base, and a step it only
//! advances becomes one `update`. What cannot compose is two output patches that merge
//! patches cannot compose (see [`statefold_guest::merge_patch`]); merge says so.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use statefold_guest::{Compose, Context, Reducer, Refusal, merge_patch};

pub struct Workflow;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub status: RunStatus,
    pub steps: BTreeMap<String, Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    #[default]
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Step {
    fn new(status: StepStatus) -> Self {
        Step { status, started_at: None, finished_at: None, output: Value::Null, error: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Diff {
    Plan {
        steps: Vec<String>,
    },
    Start {
        step: String,
        at: u64,
    },
    Output {
        step: String,
        patch: Value,
    },
    Complete {
        step: String,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
        output: Option<Value>,
    },
    Fail {
        step: String,
        at: u64,
        error: String,
    },
    Skip {
        step: String,
    },
    Finish {
        status: RunStatus,
        at: u64,
    },
    Composite {
        steps: BTreeMap<String, StepChange>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish: Option<Finish>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finish {
    pub status: RunStatus,
    pub at: u64,
}

/// The effect of a run of diffs on one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepChange {
    /// The step ends as exactly this record (the run planned, started or skipped it).
    Set(Step),
    /// The step was running and the run advanced it: merge-patch its output, then end it.
    Update {
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
        output: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        end: Option<End>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "as", rename_all = "snake_case")]
pub enum End {
    Complete { at: u64 },
    Fail { at: u64, error: String },
}

/// An output patch that is present, even as `null` (which clears the output); serde's
/// `Option` would read `null` as absent.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

fn refuse<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(reason))
}

/// The new record of `name` after `change`, or the refusal. Reads `run`, never writes it.
fn changed_step(run: &Run, name: &str, change: &StepChange) -> Result<Step, Refusal> {
    if run.status != RunStatus::Running {
        return refuse(format!("run already finished; cannot change step {name:?}"));
    }
    let current = run.steps.get(name);
    let status = current.map(|s| s.status);
    match change {
        StepChange::Set(step) => Ok(step.clone()),
        StepChange::Update { output, end } => {
            let Some(step) = current.filter(|s| s.status == StepStatus::Running) else {
                return refuse(format!("step {name:?} is not running (it is {status:?})"));
            };
            let mut step = step.clone();
            if let Some(patch) = output {
                merge_patch::apply(&mut step.output, patch);
            }
            match end {
                None => {}
                Some(End::Complete { at }) | Some(End::Fail { at, .. }) if step.started_at > Some(*at) => {
                    return refuse(format!("step {name:?} cannot end at {at}, before it started"));
                }
                Some(End::Complete { at }) => {
                    step.status = StepStatus::Succeeded;
                    step.finished_at = Some(*at);
                }
                Some(End::Fail { at, error }) => {
                    step.status = StepStatus::Failed;
                    step.finished_at = Some(*at);
                    step.error = Some(error.clone());
                }
            }
            Ok(step)
        }
    }
}

/// The single-step diffs as changes, after checking what only they require.
fn as_change(run: &Run, diff: Diff) -> Result<Result<(String, StepChange), Diff>, Refusal> {
    let status = |name: &str| run.steps.get(name).map(|s| s.status);
    Ok(Ok(match diff {
        Diff::Start { step, at } => match status(&step) {
            None | Some(StepStatus::Pending | StepStatus::Failed) => {
                let mut record = Step::new(StepStatus::Running);
                record.started_at = Some(at);
                (step, StepChange::Set(record))
            }
            Some(s) => return refuse(format!("cannot start step {step:?}: it is {s:?}")),
        },
        Diff::Skip { step } => match status(&step) {
            None | Some(StepStatus::Pending) => (step, StepChange::Set(Step::new(StepStatus::Skipped))),
            Some(s) => return refuse(format!("cannot skip step {step:?}: it is {s:?}")),
        },
        Diff::Output { step, patch } => (step, StepChange::Update { output: Some(patch), end: None }),
        Diff::Complete { step, at, output } => (step, StepChange::Update { output, end: Some(End::Complete { at }) }),
        Diff::Fail { step, at, error } => {
            (step, StepChange::Update { output: None, end: Some(End::Fail { at, error }) })
        }
        other => return Ok(Err(other)),
    }))
}

/// The topic a run's end is announced on (a reaction: see [`finished`]).
pub const FINISHED_TOPIC: &str = "workflow-finished";

/// Emits the reaction of a run that just finished, keyed by the run: its status, when, and
/// each step's status. Downstream services (billing, notifications) read it from
/// [`FINISHED_TOPIC`], exactly once per run.
fn finished(run: &Run, ctx: &Context) {
    let steps: BTreeMap<&str, StepStatus> = run.steps.iter().map(|(name, step)| (name.as_str(), step.status)).collect();
    let announcement = serde_json::json!({
        "run": ctx.model,
        "status": run.status,
        "finished_at": run.finished_at,
        "steps": steps,
    });
    ctx.emit(FINISHED_TOPIC, ctx.model, &announcement);
}

fn check_finish(run: &Run, steps: &BTreeMap<&str, Step>, finish: &Finish) -> Result<(), Refusal> {
    if run.status != RunStatus::Running {
        return refuse("run already finished");
    }
    if finish.status == RunStatus::Running {
        return refuse("finish needs a final status: succeeded, failed or cancelled");
    }
    let running = run
        .steps
        .iter()
        .map(|(name, step)| (name.as_str(), steps.get(name.as_str()).unwrap_or(step)))
        .chain(steps.iter().map(|(name, step)| (*name, step)))
        .find(|(_, step)| step.status == StepStatus::Running);
    match running {
        Some((name, _)) => refuse(format!("cannot finish: step {name:?} is still running")),
        None => Ok(()),
    }
}

impl Reducer for Workflow {
    const NAME: &'static str = "workflow";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const MERGE: bool = true;

    type State = Run;
    type Diff = Diff;

    fn apply(run: &mut Run, diff: Diff, ctx: &Context) -> Result<(), Refusal> {
        if run.status != RunStatus::Running {
            return refuse(format!("run already finished as {:?}; it takes no more diffs", run.status));
        }
        // Validate everything against the unchanged run, then commit.
        let diff = match as_change(run, diff)? {
            Ok((name, change)) => {
                let step = changed_step(run, &name, &change)?;
                run.steps.insert(name, step);
                return Ok(());
            }
            Err(diff) => diff,
        };
        match diff {
            Diff::Plan { steps } => {
                if run.status != RunStatus::Running {
                    return refuse("run already finished; cannot plan steps");
                }
                for (i, name) in steps.iter().enumerate() {
                    if run.steps.contains_key(name) || steps[..i].contains(name) {
                        return refuse(format!("step {name:?} already exists"));
                    }
                }
                for name in steps {
                    run.steps.insert(name, Step::new(StepStatus::Pending));
                }
                Ok(())
            }
            Diff::Finish { status, at } => {
                let finish = Finish { status, at };
                check_finish(run, &BTreeMap::new(), &finish)?;
                run.status = status;
                run.finished_at = Some(at);
                finished(run, ctx);
                Ok(())
            }
            Diff::Composite { steps, finish } => {
                let mut changed = BTreeMap::new();
                for (name, change) in &steps {
                    changed.insert(name.as_str(), changed_step(run, name, change)?);
                }
                if let Some(finish) = &finish {
                    check_finish(run, &changed, finish)?;
                }
                for (name, step) in changed {
                    run.steps.insert(name.to_owned(), step);
                }
                if let Some(Finish { status, at }) = finish {
                    run.status = status;
                    run.finished_at = Some(at);
                    finished(run, ctx);
                }
                Ok(())
            }
            Diff::Start { .. }
            | Diff::Output { .. }
            | Diff::Complete { .. }
            | Diff::Fail { .. }
            | Diff::Skip { .. } => {
                unreachable!("single-step diffs were handled by as_change")
            }
        }
    }

    fn merge(diffs: Vec<Diff>) -> Compose<Diff> {
        let mut steps: BTreeMap<String, StepChange> = BTreeMap::new();
        let mut finish = None;
        let mut changes = Vec::new();
        for diff in diffs {
            if finish.is_some() {
                return Compose::NotComposable("a diff after `finish` cannot have applied".into());
            }
            match diff {
                Diff::Plan { steps: names } => {
                    changes.extend(names.into_iter().map(|n| (n, StepChange::Set(Step::new(StepStatus::Pending)))));
                }
                Diff::Finish { status, at } => finish = Some(Finish { status, at }),
                Diff::Composite { steps: more, finish: f } => {
                    changes.extend(more);
                    finish = f;
                }
                single => {
                    // Start and skip become `set`s of the record they produce, whatever
                    // the base; the base only decides validity, which the run already passed.
                    let empty = Run::default();
                    match as_change(&empty, single) {
                        Ok(Ok(change)) => changes.push(change),
                        Ok(Err(_)) => unreachable!("plan, finish and composite are matched above"),
                        Err(refusal) => {
                            return Compose::NotComposable(format!("run cannot have applied: {}", refusal.reason()));
                        }
                    }
                }
            }
            for (name, change) in changes.drain(..) {
                let merged = match (steps.remove(&name), change) {
                    (None, change) | (Some(_), change @ StepChange::Set(_)) => Ok(change),
                    (Some(StepChange::Set(step)), update) => {
                        let run = Run { steps: BTreeMap::from([(name.clone(), step)]), ..Run::default() };
                        changed_step(&run, &name, &update).map(StepChange::Set).map_err(|r| r.reason().to_owned())
                    }
                    (Some(StepChange::Update { output, end: None }), StepChange::Update { output: more, end }) => {
                        match (output, more) {
                            (Some(a), Some(b)) => merge_patch::compose(&a, &b)
                                .map(|o| StepChange::Update { output: Some(o), end })
                                .map_err(|e| format!("outputs of step {name:?}: {e}")),
                            (a, b) => Ok(StepChange::Update { output: a.or(b), end }),
                        }
                    }
                    (Some(StepChange::Update { end: Some(_), .. }), StepChange::Update { .. }) => {
                        Err(format!("step {name:?} changed after it ended without a restart"))
                    }
                };
                match merged {
                    Ok(change) => {
                        steps.insert(name, change);
                    }
                    Err(reason) => return Compose::NotComposable(reason),
                }
            }
        }
        Compose::Composed(Diff::Composite { steps, finish })
    }
}

statefold_guest::export!(Workflow);
