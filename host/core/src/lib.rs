//! Statefold's core: the blake3 hash chain ([`chain`]), the data model ([`model`]), and
//! the fold engine ([`fold`]) that drives reducers through the [`reducer::Guest`] trait.
//!
//! It does no I/O and names no runtime: the WebAssembly runtime (wasmtime), the store
//! (RocksDB), the logs (Kafka) and the server (tokio, axum) are crates above it, and Cargo
//! holds that line (`tests/tests/architecture.rs` checks this crate's dependency tree).

pub mod chain;
pub mod code;
pub mod fold;
pub mod model;
pub mod reducer;
