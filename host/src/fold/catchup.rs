//! Catch-up: what a client at an old version is sent to reach the head, as one diff where
//! the reducer can produce it exactly.

use bytes::Bytes;

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

/// Plans the catch-up over `missed` (consecutive diffs, oldest first): a single diff as is;
/// else the reducer's `merge` if it declares it and the run is at most `merge_diffs_max`
/// long; else `delta` between the two states (computed by `states` only then); else the
/// diffs themselves. A reducer failing in merge or delta falls back to the next way: a
/// client is never stuck on a faulty reducer.
pub fn plan_catch_up(
    models: &mut Models,
    missed: &[Bytes],
    merge_diffs_max: usize,
    states: impl FnOnce(&mut Models) -> Result<(Vec<u8>, Vec<u8>), ReducerError>,
) -> CatchUp {
    if let [only] = missed {
        return CatchUp::Patch { diff: only.clone(), how: "single" };
    }
    let info = models.reducer().info().clone();
    if info.merge && missed.len() <= merge_diffs_max {
        let run: Vec<Vec<u8>> = missed.iter().map(|d| d.to_vec()).collect();
        match models.merge(&run) {
            Ok(Composed::Diff(diff)) => return CatchUp::Patch { diff: diff.into(), how: "merge" },
            Ok(Composed::NotComposable(reason)) => tracing::debug!(%reason, "run not composable; trying delta"),
            Err(error) => tracing::warn!(%error, "merge failed; trying delta"),
        }
    }
    if info.delta {
        match states(models).and_then(|(from, to)| models.delta(&from, &to)) {
            Ok(diff) => return CatchUp::Patch { diff: diff.into(), how: "delta" },
            Err(error) => tracing::warn!(%error, "delta failed; sending the diffs one by one"),
        }
    }
    CatchUp::Diffs
}
