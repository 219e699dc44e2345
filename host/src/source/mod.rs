//! Sources of records: the embedded log (here) and Kafka (next). The fold loop reads a
//! source through [`Source`] only; the engine never sees it.

mod embedded;

use std::time::Duration;

pub use embedded::{EmbeddedLog, EmbeddedSource};

use crate::fold::Record;

/// Why a source could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A log that the fold loop consumes. It starts each partition at the position stored with
/// the state (never at a position kept elsewhere), and delivers each partition's records in
/// offset order.
pub trait Source: Send {
    /// The name positions are stored under.
    fn name(&self) -> &'static str;
    /// At most `max` records, waiting up to `timeout` when none are there.
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>, SourceError>;
    /// Whether every partition has been read up to the end it had when the source started.
    fn caught_up(&self) -> bool;
}
