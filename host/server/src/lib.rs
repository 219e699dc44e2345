//! The Statefold server: the application state ([`app`]), the HTTP/SSE API ([`api`]), the
//! fold pipeline ([`pipeline`]), hot reload ([`deploy`], [`watch`]), access control
//! ([`auth`]), the configuration that composes every crate's settings ([`config`]), and
//! [`server`], which wires them over the crates below: the core ([`chain`], [`model`],
//! [`fold`]), the runtime ([`reducer`]), the store ([`store`]) and the logs ([`source`]).

pub use statefold_core::{chain, code, fold, model};
pub use statefold_runtime as reducer;
pub use statefold_source as source;
pub use statefold_store as store;

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod deploy;
pub mod hub;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod tls;
pub mod watch;
