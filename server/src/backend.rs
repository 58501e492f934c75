//! The storage seam: one trait that every lock store implements (in memory, Redis; later
//! Redis Cluster, Sentinel, Redlock), and one conformance suite that all of them pass.
//!
//! A backend performs single atomic attempts. Waiting, validation and gRPC live above it.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::lock::{
    AcquireOutcome, AcquireParams, ExtendOutcome, Holders, LockInfo, ReleaseOutcome, ReleaseParams,
    Token,
};

pub use self::memory::MemoryBackend;
pub use self::redis::RedisBackend;

/// How long a fair waiter's place in the queue stays live without a refresh. Waiters refresh
/// it three times per period, so the entries of a crashed lockd go stale after this long.
pub const FAIR_ENTRY_TTL: Duration = Duration::from_secs(6);

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
    /// Who renews: a KeepAlive stream's id, recorded on the lease; `None` (a plain Extend)
    /// clears the record.
    pub renewer: Option<String>,
}

/// One page of [`Backend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Held locks (for semaphores: one entry per holder).
    pub locks: Vec<LockInfo>,
    /// Where the next page starts; empty when the listing is complete.
    pub next: String,
}

/// The error for a request whose `limit` does not match the resource (mutex vs semaphore).
fn mismatch(resource: &str, existing: u32, asked: u32) -> Error {
    let what = |n: u32| {
        if n <= 1 {
            "a mutex".to_owned()
        } else {
            format!("a semaphore with limit {n}")
        }
    };
    Error::FailedPrecondition(format!(
        "resource `{resource}` is {}; this request asks for {}",
        what(existing),
        what(asked)
    ))
}

/// A lock store. Every method is one atomic step, so a request cancelled at any `.await`
/// leaves either the old state or the new one, never a half-done change.
///
/// Implementations report each release to the [`Waiters`](crate::waiters::Waiters) and every
/// change to the [`Events`](crate::events::Events) they were built with, on every lockd that
/// shares the store.
pub trait Backend: Send + Sync + 'static {
    /// One attempt to take the lock (or a semaphore slot). Granted when free (and no earlier
    /// fair waiter is queued) or already held by the same token (the TTL is then refreshed and
    /// the fencing token kept). A fair waiter that is not granted joins (or refreshes its place
    /// in) the resource's queue.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`](crate::error::Error::FailedPrecondition) when the resource
    /// is a mutex and `limit` asks for a semaphore, or the other way round.
    fn acquire(
        &self,
        params: &AcquireParams,
    ) -> impl Future<Output = Result<AcquireOutcome>> + Send;

    /// Frees the lease if the token holds it, now or at the minimum-hold point.
    fn release(
        &self,
        params: &ReleaseParams,
    ) -> impl Future<Output = Result<ReleaseOutcome>> + Send;

    /// Lengthens the lease if the token holds it.
    fn extend(&self, params: &ExtendParams) -> impl Future<Output = Result<ExtendOutcome>> + Send;

    /// Describes the current holders, or `None` when the resource is free.
    fn inspect(&self, resource: &str) -> impl Future<Output = Result<Option<Holders>>> + Send;

    /// One page of the locks held under `prefix`, starting at `cursor` ("" for the first).
    fn list(
        &self,
        prefix: &str,
        page_size: usize,
        cursor: &str,
    ) -> impl Future<Output = Result<Page>> + Send;

    /// Removes a fair waiter that gave up from the resource's queue.
    fn leave_queue(&self, resource: &str, waiter: &str) -> impl Future<Output = Result<()>> + Send;

    /// Checks that the store answers, for the health service.
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// A short name for logs: "memory" or "redis".
    fn name(&self) -> &'static str;
}
