//! The crate's one error type.

use deadpool_redis::redis::RedisError;

/// Why a benchmark step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options do not describe a run (a missing address, an empty list).
    #[error("{0}")]
    Usage(String),
    /// Redis refused or failed a command.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// A lockd RPC failed.
    #[error("lockd: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// A lockd channel could not be set up.
    #[error("lockd connection: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// A reply did not have the expected shape.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    /// The results could not be written as JSON.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A worker task panicked or was cancelled.
    #[error("worker: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
