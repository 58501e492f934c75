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
    /// The KeepAlive stream renewing the lease (its id), recorded on the lease so that a
    /// release when that stream closes cannot undo a later renewal through another stream (see
    /// [`ReleaseParams::only_if_renewer`]). `None` for a plain Extend RPC, which clears it.
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

/// This process's wall clock, as time since the Unix epoch.
fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A duration in whole milliseconds (a timestamp, or an offset to one).
fn millis(d: Duration) -> crate::lock::UnixMillis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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

/// Behaviour checks that the unit tests of every backend run against it.
#[cfg(test)]
pub(crate) mod checks {
    use std::collections::BTreeMap;

    use super::*;
    use crate::lock::{Lease, LeaseStatus};

    /// A 30 s acquire of `resource` by `token`, with `limit` slots.
    pub(crate) fn acquire_params(resource: &str, token: &str, limit: u32) -> AcquireParams {
        AcquireParams {
            resource: resource.into(),
            token: Token::new(token.into()),
            owner: format!("owner-{token}"),
            ttl: Duration::from_secs(30),
            labels: BTreeMap::new(),
            limit,
            fair: None,
            waiting: false,
            new_token: false,
            renewer: None,
        }
    }

    /// A 30 s extension (replacing the remaining time), through `renewer` if given.
    pub(crate) fn extend_params(
        resource: &str,
        token: &str,
        renewer: Option<&str>,
    ) -> ExtendParams {
        ExtendParams {
            resource: resource.into(),
            token: Token::new(token.into()),
            ttl: Duration::from_secs(30),
            replace_ttl: true,
            max_ttl: Duration::from_secs(3600),
            renewer: renewer.map(str::to_owned),
        }
    }

    /// An immediate release, only by `renewer`'s stream if given.
    pub(crate) fn release_params(
        resource: &str,
        token: &str,
        renewer: Option<&str>,
    ) -> ReleaseParams {
        ReleaseParams {
            resource: resource.into(),
            token: Token::new(token.into()),
            keep_until: None,
            min_hold: Duration::ZERO,
            max_ttl: Duration::from_secs(3600),
            only_if_renewer: renewer.map(str::to_owned),
        }
    }

    async fn granted<B: Backend>(b: &B, p: &AcquireParams) -> Lease {
        match b.acquire(p).await.unwrap() {
            AcquireOutcome::Acquired(lease) => lease,
            AcquireOutcome::Busy(busy) => panic!("{} not granted: {busy:?}", p.resource),
        }
    }

    async fn busy<B: Backend>(b: &B, p: &AcquireParams) -> crate::lock::Busy {
        match b.acquire(p).await.unwrap() {
            AcquireOutcome::Busy(busy) => busy,
            AcquireOutcome::Acquired(_) => panic!("{} granted", p.resource),
        }
    }

    async fn release_status<B: Backend>(b: &B, p: &ReleaseParams) -> LeaseStatus {
        b.release(p).await.unwrap().status
    }

    /// A release on KeepAlive close (`only_if_renewer`) changes nothing when the lease was
    /// renewed since through another stream, a plain Extend, or an idempotent re-acquire.
    pub(crate) async fn release_on_close_spares_a_renewal_made_elsewhere<B: Backend>(
        b: &B,
        limit: u32,
    ) {
        let r = format!("renewed-{limit}");
        let acquire = acquire_params(&r, "T", limit);
        granted(b, &acquire).await;
        b.extend(&extend_params(&r, "T", Some("s1"))).await.unwrap();
        b.extend(&extend_params(&r, "T", Some("s2"))).await.unwrap();
        // Stream s1 closes: s2 renewed the lease since, so it stays.
        let close_s1 = release_params(&r, "T", Some("s1"));
        assert_eq!(release_status(b, &close_s1).await, LeaseStatus::HeldByOther);
        assert!(b.inspect(&r).await.unwrap().is_some());
        // A plain Extend clears the renewer.
        b.extend(&extend_params(&r, "T", None)).await.unwrap();
        let close_s2 = release_params(&r, "T", Some("s2"));
        assert_eq!(release_status(b, &close_s2).await, LeaseStatus::HeldByOther);
        // So does an idempotent re-acquire.
        b.extend(&extend_params(&r, "T", Some("s2"))).await.unwrap();
        granted(b, &acquire).await;
        assert_eq!(release_status(b, &close_s2).await, LeaseStatus::HeldByOther);
        assert!(b.inspect(&r).await.unwrap().is_some());
        // The stream that renewed it last releases it.
        b.extend(&extend_params(&r, "T", Some("s2"))).await.unwrap();
        assert_eq!(release_status(b, &close_s2).await, LeaseStatus::Ok);
        assert!(b.inspect(&r).await.unwrap().is_none());
        // A plain release ignores renewers.
        granted(b, &acquire).await;
        b.extend(&extend_params(&r, "T", Some("s1"))).await.unwrap();
        let plain = release_params(&r, "T", None);
        assert_eq!(release_status(b, &plain).await, LeaseStatus::Ok);
    }

    /// An acquire through a Session stream (`renewer`) binds the lease to it, as a renewal
    /// through that stream would: the session's close releases it, another's does not, and a
    /// plain re-acquire clears the binding.
    pub(crate) async fn an_acquire_through_a_session_binds_the_lease_to_it<B: Backend>(
        b: &B,
        limit: u32,
    ) {
        let r = format!("bound-{limit}");
        let mut bound = acquire_params(&r, "T", limit);
        bound.renewer = Some("s1".into());
        granted(b, &bound).await;
        let close = |s| release_params(&r, "T", Some(s));
        assert_eq!(
            release_status(b, &close("s2")).await,
            LeaseStatus::HeldByOther
        );
        assert_eq!(release_status(b, &close("s1")).await, LeaseStatus::Ok);
        // A re-acquire through another session moves the binding; a plain one clears it.
        granted(b, &bound).await;
        bound.renewer = Some("s2".into());
        granted(b, &bound).await;
        assert_eq!(
            release_status(b, &close("s1")).await,
            LeaseStatus::HeldByOther
        );
        granted(b, &acquire_params(&r, "T", limit)).await;
        assert_eq!(
            release_status(b, &close("s2")).await,
            LeaseStatus::HeldByOther
        );
        assert!(b.inspect(&r).await.unwrap().is_some());
    }

    /// A free slot refused only because a fair waiter is first in line reports, as its
    /// `retry_in`, when that waiter's queue entry goes stale.
    pub(crate) async fn a_fair_queue_head_in_the_way_reports_when_it_goes_stale<B: Backend>(
        b: &B,
        limit: u32,
    ) {
        let r = format!("queued-{limit}");
        for i in 0..limit {
            granted(b, &acquire_params(&r, &format!("H{i}"), limit)).await;
        }
        let mut fair = acquire_params(&r, "W", limit);
        fair.fair = Some("waiter-1".into());
        busy(b, &fair).await;
        assert_eq!(
            release_status(b, &release_params(&r, "H0", None)).await,
            LeaseStatus::Ok
        );
        let refused = busy(b, &acquire_params(&r, "X", limit)).await;
        let retry = refused.retry_in.expect("retry_in");
        assert!(
            retry <= FAIR_ENTRY_TTL && retry > FAIR_ENTRY_TTL - Duration::from_secs(2),
            "retry in {retry:?}"
        );
        // The head itself is granted.
        granted(b, &fair).await;
    }
}
