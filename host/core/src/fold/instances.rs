//! The instances of each kind: one per version in use; models move to their partition's
//! version, and versions no partition uses are retired.

use super::*;

impl Engine {
    /// Moves up to `budget` resident models off instances whose version no partition
    /// folds with any more (after a deploy reached every partition) to the version that
    /// does, and frees such instances once empty. Called between batches, so no pause
    /// grows with the number of resident models. Returns the models handled.
    pub fn retire(&mut self, budget: usize) -> usize {
        let mut left = budget.max(1);
        for state in &mut self.kinds {
            let in_use = state.versions.in_use();
            let mut i = state.instances.len();
            while i > 0 {
                i -= 1;
                let version = state.instances[i].reducer().id();
                if in_use.contains(&version) {
                    continue;
                }
                // Models go to the one version left; with several (a deploy that did not
                // reach every partition), they are dropped: each is rebuilt from its
                // history by its partition's version when next used.
                let target = match in_use.as_slice() {
                    [only] => match instance(state, &mut self.versions, *only) {
                        Ok(target) => Some(target),
                        Err(e) => {
                            tracing::warn!(kind = %state.name, error = %e, "cannot load the version to move models to; dropping them");
                            None
                        }
                    },
                    _ => None,
                };
                // Creating the target may have shifted nothing before `i`: instances are
                // only ever pushed at the end.
                let mut ids = state.instances[i].resident_ids();
                while left > 0
                    && let Some(id) = ids.pop()
                {
                    left -= 1;
                    let moved = match target {
                        Some(to) => move_model(&mut state.instances, &id, i, to),
                        None => Ok(()),
                    };
                    if let Err(e) = moved.and_then(|()| state.instances[i].forget(&id)) {
                        tracing::warn!(kind = %state.name, id, error = %e, "model not moved off a retired version; it is rebuilt from its history when next used");
                        for models in &mut state.instances {
                            let _ = models.forget(&id);
                        }
                    }
                }
                if state.instances[i].resident() == 0 {
                    let retired = state.instances.remove(i);
                    tracing::info!(kind = %state.name, version = %version, "instance of a retired version freed");
                    // Freeing an instance that held many models takes milliseconds.
                    let freed =
                        std::thread::Builder::new().name("retired-instance".into()).spawn(move || drop(retired));
                    if let Err(e) = freed {
                        tracing::warn!(error = %e, "cannot free the retired instance on its own thread; freeing it here");
                    }
                }
                if left == 0 {
                    return budget;
                }
            }
        }
        budget.max(1) - left
    }
}

/// Moves model `id` into instance `to` from whichever other instance holds it (its
/// partition switched versions since): snapshot there, restore here, as `Versions`
/// defines its state.
pub(super) fn move_to(instances: &mut [Models], id: &str, to: usize) -> Result<(), ReducerError> {
    for from in 0..instances.len() {
        if from != to {
            move_model(instances, id, from, to)?;
            instances[from].forget(id)?;
        }
    }
    Ok(())
}

/// The index of the kind's instance of `version`, created if there is none.
pub(super) fn instance(
    state: &mut KindState,
    versions: &mut Versions,
    version: ModuleHash,
) -> Result<usize, ReducerError> {
    if let Some(i) = state.instances.iter().position(|m| m.reducer().id() == version) {
        return Ok(i);
    }
    state.instances.push(versions.reducer(version)?.models());
    Ok(state.instances.len() - 1)
}

/// Copies a model resident in instance `from` into instance `to` (snapshot on one
/// version, restore on the other); nothing if it is not resident there.
pub(super) fn move_model(instances: &mut [Models], id: &str, from: usize, to: usize) -> Result<(), ReducerError> {
    match instances[from].snapshot_resident(id)? {
        Some(snapshot) => instances[to].adopt(id, &snapshot),
        None => Ok(()),
    }
}
