//! The crate's one error type, and the one place that turns a `tonic::Status` into it.

use std::fmt;

use tonic::{Code, Status};

/// Why a lockd call failed.
///
/// Contention is not an error: a lock held by someone else is [`TryLock::Held`] or
/// [`Outcome::Skipped`]. Errors are what the caller cannot treat as an answer.
///
/// [`TryLock::Held`]: crate::TryLock::Held
/// [`Outcome::Skipped`]: crate::Outcome::Skipped
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint was invalid, or the connection (or TLS setup) could not be made.
    #[error("cannot connect to lockd: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// lockd refused the request as invalid; the message names the field and the rule.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// lockd, or the Redis behind it, could not be reached, even after the configured retries.
    #[error("lockd unavailable: {0}")]
    Unavailable(String),
    /// No reply came within the request timeout (see [`ClientBuilder::request_timeout`]).
    ///
    /// [`ClientBuilder::request_timeout`]: crate::ClientBuilder::request_timeout
    #[error("lockd did not answer in time: {0}")]
    Timeout(String),
    /// The lock could no longer be trusted while a job was running under it
    /// ([`LockClient::run_exclusive`] cancels the job and returns this).
    ///
    /// [`LockClient::run_exclusive`]: crate::LockClient::run_exclusive
    #[error("lock on {resource:?} lost: {reason}")]
    LockLost {
        /// The resource whose lock was lost.
        resource: String,
        /// Why it was lost.
        reason: LostReason,
    },
    /// lockd answered with another gRPC error.
    #[error("lockd answered {code:?}: {message}")]
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
    /// lockd answered something this client does not understand (such as `acquired` without a
    /// lease): a version mismatch or a bug, never guessed at.
    #[error("unexpected reply from lockd: {0}")]
    Protocol(String),
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::DeadlineExceeded => Self::Timeout(message),
            // tonic reports its own client-side timeout as CANCELLED "Timeout expired".
            Code::Cancelled if message == TIMEOUT_EXPIRED => Self::Timeout(message),
            code => Self::Rpc { code, message },
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(err: tonic::transport::Error) -> Self {
        Self::Connect(err)
    }
}

/// The message of tonic's `TimeoutExpired`, which tonic turns into a CANCELLED status.
const TIMEOUT_EXPIRED: &str = "Timeout expired";

/// Whether a failed call may be repeated as it is: only `UNAVAILABLE` (lockd or its Redis could
/// not be reached, or lockd is shutting down). Every lockd RPC is safe to repeat, and `Acquire`
/// is repeated with the same token, so a retry never takes a second lease.
pub(crate) fn is_retryable(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

/// Whether a failed call is a definite "no" rather than "no answer": a renewal that gets one
/// stops, because repeating it cannot succeed.
pub(crate) fn is_definite(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::OutOfRange
    )
}

/// Why a [`LockGuard`](crate::LockGuard) stopped being trustworthy.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// A renewal found the lock free: the lease expired or its key was removed (such as a Redis
    /// restart without persistence).
    NotHeld,
    /// A renewal found the lock held by another token: the lease expired and someone else took it.
    HeldByOther,
    /// The lease's local deadline passed without a successful renewal (lockd or Redis could not
    /// be reached in time).
    Expired,
    /// The maximum hold time was reached, so renewals stopped and the lease ran out.
    MaxHold,
    /// A renewal was refused with a definite error (the message); renewing again cannot help.
    Rejected(String),
    /// The guard was released or dropped: this guard no longer holds anything.
    Released,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotHeld => f.write_str("the lease ended (the lock is free)"),
            Self::HeldByOther => f.write_str("the lease ended and another holder took the lock"),
            Self::Expired => f.write_str("the lease expired without a successful renewal"),
            Self::MaxHold => f.write_str("the maximum hold time was reached"),
            Self::Rejected(msg) => write!(f, "a renewal was refused: {msg}"),
            Self::Released => f.write_str("the guard was released"),
        }
    }
}
