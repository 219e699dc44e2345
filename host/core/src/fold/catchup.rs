//! Catch-up: what a client at an old version is sent to reach the head, as one diff where
//! the reducer can produce it exactly.

use bytes::Bytes;

use super::Versions;
use crate::model::ModuleHash;
use crate::reducer::{Composed, Models, ReducerError};

/// How a client catches up over a run of missed diffs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// One diff that takes the client's state to the head.
    Patch { diff: Bytes, how: &'static str },
    /// The reducer can neither merge this run nor compute a delta: send the diffs one by one
    /// (still lossless).
    Diffs,
}

/// Plans the catch-up over a run of `len` missed diffs: a single diff as is; else one
/// composed diff: the reducer's `merge` (a pass over every missed diff, read by `missed`,
/// oldest first) for runs up to `merge_diffs_max` long, `delta` between the two states
/// (two rebuilds from checkpoints, computed by `states`; the missed diffs are not read)
/// for longer ones, each falling back to the other; else the diffs themselves. A reducer
/// failing in merge or delta falls back to the next way: a client is never stuck on a
/// faulty reducer.
///
/// Composition is a reducer's: every missed diff must have been applied by `reducer`
/// (the caller sends the diffs one by one across a deploy).
pub fn plan_catch_up<S: AsRef<[u8]>, E: std::fmt::Display + From<ReducerError>>(
    versions: &mut Versions,
    reducer: ModuleHash,
    len: usize,
    merge_diffs_max: usize,
    mut missed: impl FnMut() -> Result<Vec<Bytes>, E>,
    states: impl FnOnce(&mut Versions) -> Result<(S, S), E>,
) -> CatchUp {
    let mut merged = |versions: &mut Versions| match missed() {
        Ok(missed) => merge(versions, reducer, &missed),
        Err(error) => {
            tracing::warn!(%error, "cannot read the missed diffs");
            None
        }
    };
    if len == 1 {
        return match missed() {
            Ok(mut only) if only.len() == 1 => CatchUp::Patch { diff: only.remove(0), how: "single" },
            _ => CatchUp::Diffs,
        };
    }
    let info = match versions.models(reducer) {
        Ok(models) => models.reducer().info().clone(),
        Err(error) => {
            tracing::warn!(%error, "cannot load the version to compose with");
            return CatchUp::Diffs;
        }
    };
    let merge_first = len <= merge_diffs_max || !info.delta;
    if info.merge
        && merge_first
        && let Some(diff) = merged(versions)
    {
        return CatchUp::Patch { diff, how: "merge" };
    }
    if info.delta {
        let delta = states(versions).and_then(|(from, to)| {
            Ok(versions.models(reducer).and_then(|models| models.delta(from.as_ref(), to.as_ref()))?)
        });
        match delta {
            Ok(diff) => return CatchUp::Patch { diff: diff.into(), how: "delta" },
            Err(error) => tracing::warn!(%error, "delta failed"),
        }
    }
    if info.merge
        && !merge_first
        && let Some(diff) = merged(versions)
    {
        return CatchUp::Patch { diff, how: "merge" };
    }
    CatchUp::Diffs
}

fn merge(versions: &mut Versions, reducer: ModuleHash, missed: &[Bytes]) -> Option<Bytes> {
    let run: Vec<Vec<u8>> = missed.iter().map(|d| d.to_vec()).collect();
    match versions.models(reducer).and_then(|models: &mut Models| models.merge(&run)) {
        Ok(Composed::Diff(diff)) => Some(diff.into()),
        Ok(Composed::NotComposable(reason)) => {
            tracing::debug!(%reason, "run not composable");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "merge failed");
            None
        }
    }
}
