//! Statefold: folds streams of diffs into live per-model state with reducers compiled to
//! WebAssembly. See ARCHITECTURE.md for the map.

pub mod chain;
pub mod reducer;
