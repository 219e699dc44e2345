//! Why a request to the service fails ([`AppError`]): each reason with its HTTP status and
//! machine-readable code.

use super::*;
use crate::code::Code;

/// Why a request failed, in domain terms (the API maps each to a status and code).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("unknown kind {0:?}")]
    UnknownKind(String),
    #[error("unknown model {kind}/{id}")]
    UnknownModel { kind: String, id: String },
    #[error("model {kind}/{id} already exists")]
    Exists { kind: String, id: String },
    #[error("hash {0} is not a version of this model")]
    UnknownHash(Hash),
    #[error("version {0} is no longer retained")]
    Pruned(Hash),
    #[error("invalid model id: {0}")]
    InvalidId(#[from] crate::model::InvalidId),
    /// A `PARTITION:OFFSET` that names no record of the log.
    #[error("{0}")]
    BadPosition(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Rejected(Rejection),
    #[error("not folded within {0:?}; the diff is in the log at offset {1} and will be folded")]
    WaitTimeout(Duration, u64),
    #[error("reducer failed: {0}")]
    Reducer(#[from] ReducerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("shutting down")]
    ShuttingDown,
    /// The log did not take an append.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Deploy(Box<crate::deploy::DeployError>),
    #[error("this server is read-only (read_only = true): send writes to a server that takes them")]
    ReadOnly,
    #[error("a replay of kind {} is running ({} of {} models)", .0.kind, .0.done, .0.total)]
    ReplayRunning(Box<ReplayJob>),
    /// The caller's token does not grant this.
    #[error("{0}")]
    Forbidden(String),
    /// The store failed a write; it takes none until the process restarts.
    #[error(
        "the store cannot write ({0}); nothing was written: retry once the server has restarted with room on its disk"
    )]
    StoreUnwritable(String),
    /// The kind's topic is not the log this store folded (see `SourceStatus::stop_topic`).
    #[error("folding kind {kind} is stopped: {reason}; nothing was written (`statefold reset {kind}` refolds it)")]
    KindStopped { kind: String, reason: String },
    /// Sharded mode: no server can answer for a partition now (a rebalance under way).
    #[error("{0}")]
    PartitionUnavailable(String),
}

impl AppError {
    /// The stable code of the error, the same over HTTP and over Kafka (request/reply).
    pub fn code(&self) -> Code {
        self.status_code().1
    }

    /// The HTTP status that goes with it.
    pub fn status(&self) -> u16 {
        self.status_code().0
    }

    /// The message a client sees: a rejection's own.
    pub fn message(&self) -> String {
        match self {
            AppError::Rejected(rejection) => rejection.message(),
            other => other.to_string(),
        }
    }

    fn status_code(&self) -> (u16, Code) {
        match self {
            AppError::UnknownKind(_) => (404, Code::UnknownKind),
            AppError::UnknownModel { .. } => (404, Code::UnknownModel),
            AppError::Exists { .. } => (409, Code::ModelExists),
            AppError::UnknownHash(_) => (404, Code::UnknownHash),
            AppError::Pruned(_) => (410, Code::Pruned),
            AppError::InvalidId(_) => (400, Code::InvalidId),
            AppError::BadPosition(_) => (404, Code::UnknownPosition),
            AppError::Rejected(rejection) => match rejection {
                Rejection::Refused(_) => (409, Code::Refused),
                Rejection::Exists => (409, Code::ModelExists),
                Rejection::HashMismatch(_) => (409, Code::HashMismatch),
                Rejection::Failed(_) => (422, Code::ReducerFailed),
                other => (422, other.code()),
            },
            AppError::WaitTimeout(..) => (504, Code::WaitTimeout),
            AppError::Reducer(_) => (500, Code::ReducerFailed),
            AppError::Store(_) => (500, Code::Store),
            AppError::ShuttingDown => (503, Code::ShuttingDown),
            AppError::Unavailable(_) => (503, Code::Unavailable),
            AppError::ReplayRunning(_) => (409, Code::ReplayRunning),
            AppError::ReadOnly => (403, Code::ReadOnly),
            AppError::KindStopped { .. } => (503, Code::KindStopped),
            AppError::Forbidden(_) => (403, Code::Forbidden),
            AppError::StoreUnwritable(_) => (503, Code::StoreUnwritable),
            AppError::PartitionUnavailable(_) => (503, Code::PartitionUnavailable),
            AppError::Deploy(_) => (500, Code::Deploy),
        }
    }
}

impl From<WriteError> for AppError {
    fn from(error: WriteError) -> AppError {
        match error {
            WriteError::Store(e) => AppError::Store(e),
            unavailable @ WriteError::Unavailable(_) => AppError::Unavailable(unavailable.to_string()),
        }
    }
}
