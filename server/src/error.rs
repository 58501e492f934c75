//! The crate's one error type, and the one place that turns it into a `tonic::Status`.

use tonic::Status;

/// Why a lockd request failed. Contention and "not held" are outcomes, never errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request broke a validation rule; the message names the field and the rule.
    #[error("{0}")]
    InvalidArgument(String),
    /// The backend (Redis) could not be reached or did not answer in time. Safe to retry.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The request does not fit the resource's state (a mutex request on a semaphore, or a
    /// semaphore request with another limit). Retrying will not help.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A per-stream limit was reached (leases or waits on one Session); the message names it.
    /// Retrying after the stream has fewer may succeed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The call carries no API key, a malformed one, or one that is not (or no longer) in the
    /// auth file.
    #[error("{0}")]
    Unauthenticated(String),
    /// The API key may not make this call (a read key on a write call).
    #[error("{0}")]
    PermissionDenied(String),
    /// The client gave the operation up (a cancel on a Session stream).
    #[error("cancelled by the client")]
    Cancelled,
    /// The server is shutting down and ended the request.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The backend answered something lockd does not understand (such as a foreign key type).
    #[error("unexpected backend reply: {0}")]
    Internal(String),
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `field`, stating the broken `rule`.
    pub fn invalid(field: &str, rule: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {rule}"))
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(msg) => Status::invalid_argument(msg),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::ResourceExhausted(msg) => Status::resource_exhausted(msg),
            Error::Unauthenticated(msg) => Status::unauthenticated(msg),
            Error::PermissionDenied(msg) => Status::permission_denied(msg),
            Error::Cancelled => Status::cancelled(err.to_string()),
            Error::Unavailable(_) | Error::ShuttingDown => Status::unavailable(err.to_string()),
            Error::Internal(_) => Status::internal(err.to_string()),
        }
    }
}

impl From<deadpool_redis::redis::RedisError> for Error {
    fn from(err: deadpool_redis::redis::RedisError) -> Self {
        if redis_is_transient(&err) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(err.to_string())
        }
    }
}

/// Whether a Redis failure may go away by itself, so the client may retry the call: no answer
/// (connection, timeout, I/O), or a server that cannot serve right now (loading, failing over,
/// out of memory, a script running too long). Anything else is an answer Redis gave on purpose
/// and will give again, such as a Lua runtime error or a WRONGTYPE inside a script (a foreign
/// value under a lock key): retrying it as a network blip would only hide the bug.
fn redis_is_transient(err: &deadpool_redis::redis::RedisError) -> bool {
    use deadpool_redis::redis::{ErrorKind, ServerErrorKind};
    match err.kind() {
        ErrorKind::Io
        | ErrorKind::AuthenticationFailed
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::MasterNameNotFoundBySentinel
        | ErrorKind::NoValidReplicasFoundBySentinel => true,
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::BusyLoading
                // Still missing after redis-rs loaded the script and retried: Redis was flushed
                // or replaced in between.
                | ServerErrorKind::NoScript
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        ),
        // Codes redis-rs has no kind for. Inside a script, Redis passes on the code of the
        // command that failed, so a script that hits OOM or READONLY is still transient.
        ErrorKind::Extension => matches!(
            err.code(),
            Some("BUSY" | "OOM" | "MISCONF" | "NOREPLICAS" | "LOADING" | "NOAUTH")
        ),
        _ => err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal(),
    }
}

impl From<deadpool_redis::PoolError> for Error {
    fn from(err: deadpool_redis::PoolError) -> Self {
        Self::Unavailable(err.to_string())
    }
}
