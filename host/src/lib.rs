//! Statefold: folds streams of diffs into live per-model state with reducers compiled to
//! WebAssembly. See ARCHITECTURE.md for the map.
//!
//! This crate is the `statefold` command: the reducer author's tools ([`scaffold`],
//! [`cases`]), the client of a running server ([`remote`]) and [`verify`]. It re-exports
//! the server crate, which re-exports the crates below it: the core ([`chain`], [`model`],
//! [`fold`]: no I/O), the runtime ([`reducer`]: wasmtime), the store ([`store`]: RocksDB)
//! and the logs ([`source`]: the embedded log, Kafka).

pub use statefold_server::*;

pub mod cases;
pub mod remote;
pub mod scaffold;
pub mod verify;
