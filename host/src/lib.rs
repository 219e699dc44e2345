//! Statefold: folds streams of diffs into live per-model state with reducers compiled to
//! WebAssembly. See ARCHITECTURE.md for the map.
//!
//! The core ([`chain`], [`fold`]) does no I/O; [`store`] (RocksDB), [`source`] (logs),
//! [`reducer`] (wasmtime) and [`api`] (HTTP/SSE) are adapters; [`server`] wires them.

pub mod api;
pub mod app;
pub mod auth;
pub mod cases;
pub mod chain;
pub mod config;
pub mod deploy;
pub mod fold;
pub mod hub;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod reducer;
pub mod remote;
pub mod scaffold;
pub mod server;
pub mod source;
pub mod store;
pub mod tls;
pub mod verify;
pub mod watch;
