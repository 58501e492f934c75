//! The crate's one error type, and the one place that turns it into a `tonic::Status`.

use tonic::Status;

/// Why a lockd request failed. Contention and "not held" are outcomes, never errors.
#[derive(Debug, thiserror::Error)]
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
            Error::Unavailable(_) | Error::ShuttingDown => Status::unavailable(err.to_string()),
            Error::Internal(_) => Status::internal(err.to_string()),
        }
    }
}

impl From<deadpool_redis::redis::RedisError> for Error {
    fn from(err: deadpool_redis::redis::RedisError) -> Self {
        // Every Redis failure means "no answer we can trust": the client may retry the call.
        // A script error would also land here; it never turns into a wrong answer.
        Self::Unavailable(err.to_string())
    }
}

impl From<deadpool_redis::PoolError> for Error {
    fn from(err: deadpool_redis::PoolError) -> Self {
        Self::Unavailable(err.to_string())
    }
}
