//! The storage seam: one trait that every lock store implements (in memory, Redis; later
//! Redis Cluster, Sentinel, Redlock), and one conformance suite that all of them pass.
//!
//! A backend performs single atomic attempts. Waiting, validation and gRPC live above it.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::error::Result;
use crate::lock::{AcquireOutcome, AcquireParams, ExtendOutcome, LeaseStatus, LockInfo, Token};

pub use self::memory::MemoryBackend;
pub use self::redis::RedisBackend;

/// What is asked of [`Backend::extend`].
#[derive(Debug, Clone)]
pub struct ExtendParams {
    /// The locked resource.
    pub resource: String,
    /// The token that must hold it.
    pub token: Token,
    /// Added to the remaining time, or replacing it when `replace_ttl`.
    pub ttl: Duration,
    /// Replace the remaining time instead of adding to it.
    pub replace_ttl: bool,
    /// The remaining time is capped here.
    pub max_ttl: Duration,
}

/// A lock store. Every method is one atomic step, so a request cancelled at any `.await`
/// leaves either the old state or the new one, never a half-done change.
///
/// Implementations must report each successful release to the [`Waiters`](crate::waiters::Waiters)
/// they were built with, on every lockd that shares the store.
pub trait Backend: Send + Sync + 'static {
    /// One attempt to take the lock. Granted when free or already held by the same token (the
    /// TTL is then refreshed and the fencing token kept); otherwise reports the holder.
    fn acquire(
        &self,
        params: &AcquireParams,
    ) -> impl Future<Output = Result<AcquireOutcome>> + Send;

    /// Frees the lock if `token` holds it.
    fn release(
        &self,
        resource: &str,
        token: &Token,
    ) -> impl Future<Output = Result<LeaseStatus>> + Send;

    /// Lengthens the lease if the token holds it.
    fn extend(&self, params: &ExtendParams) -> impl Future<Output = Result<ExtendOutcome>> + Send;

    /// Describes the current holder, or `None` when the resource is free.
    fn inspect(&self, resource: &str) -> impl Future<Output = Result<Option<LockInfo>>> + Send;

    /// Checks that the store answers, for the health service.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// A short name for logs: "memory" or "redis".
    fn name(&self) -> &'static str;
}
