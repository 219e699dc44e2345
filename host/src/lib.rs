//! Statefold: folds streams of diffs into live per-model state with reducers compiled to
//! WebAssembly. See ARCHITECTURE.md for the map.
//!
//! The core ([`chain`], [`model`], [`fold`]: the crate `statefold-core`) does no I/O;
//! [`store`] (RocksDB), [`source`] (logs), [`reducer`] (wasmtime) and [`api`] (HTTP/SSE)
//! are adapters; [`server`] wires them.

pub use statefold_core::{chain, fold, model};
pub use statefold_runtime as reducer;
pub use statefold_source as source;
pub use statefold_store as store;

pub mod api;
pub mod app;
pub mod auth;
pub mod cases;
pub mod config;
pub mod deploy;
pub mod hub;
pub mod metrics;
pub mod pipeline;
pub mod remote;
pub mod scaffold;
pub mod server;
pub mod tls;
pub mod verify;
pub mod watch;
