//! Builder-style lock options: [`LockOptions`] (a reusable value) and [`LockRequest`] (options
//! bound to a client and a resource, ready to acquire or run a job).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use crate::client::{LockClient, Outcome, TryLock};
use crate::error::Error;
use crate::guard::LeaseInfo;

/// The TTL used when none is given: 30 s, the server's default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How to take a lock: TTL, wait, owner, labels, token, semaphore limit, fair waiting, and the
/// minimum and maximum hold.
///
/// Every field is optional; the defaults are a 30 s TTL, no wait (try once), the client's default
/// owner (or the server's: the peer address), no labels, a fresh random token, a plain mutex
/// (limit 1), arrival order not enforced, no minimum and no maximum hold, and a lease that
/// lockd releases as soon as the guard's `KeepAlive` stream breaks. A `LockOptions` is a plain value: build it once and reuse it for many locks with
/// [`LockRequest::options`] or [`LockClient::run_exclusive_with`].
///
/// ```
/// use std::time::Duration;
/// use lockd_client::LockOptions;
///
/// let options = LockOptions::new()
///     .ttl(Duration::from_secs(10))
///     .owner("scheduler-2 on host-a")
///     .label("job", "nightly-scan")
///     .max_hold(Duration::from_secs(3600));
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOptions {
    pub(crate) ttl: Duration,
    pub(crate) wait: Option<Duration>,
    pub(crate) owner: Option<String>,
    pub(crate) labels: HashMap<String, String>,
    pub(crate) token: Option<String>,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) min_hold: Option<Duration>,
    /// 0 (the server's default, a mutex) or the semaphore's limit.
    pub(crate) limit: u32,
    pub(crate) fair: bool,
    pub(crate) expire_on_close: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            wait: None,
            owner: None,
            labels: HashMap::new(),
            token: None,
            max_hold: None,
            min_hold: None,
            limit: 0,
            fair: false,
            expire_on_close: false,
        }
    }
}

impl LockOptions {
    /// The defaults (see the type's documentation).
    pub fn new() -> Self {
        Self::default()
    }

    /// The lease's time to live. The guard renews it at about a third of this, so a crashed
    /// holder blocks others for at most this long.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait for a held lock (server-side, woken by the release or the holder's
    /// expiry). Zero, the default, tries once.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Free text naming the holder, shown to others by `GetOwner` and in [`TryLock::Held`].
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Adds one label stored with the lease (at most 16).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds labels stored with the lease (at most 16 in all).
    pub fn labels<K, V>(mut self, labels: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.labels
            .extend(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// The lease's secret token (at most 128 bytes). Without one, a random UUID v4 is used.
    /// Either way the same token is sent on every retry of the acquire, so a retry whose
    /// earlier attempt was granted gets that lease back. Give your own only to find a lease
    /// again after a restart; keep it secret.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The longest time the lock may be held (default: no limit). The TTL is clamped to it and
    /// renewals never extend the lease past `max_hold` after the grant, so a stuck job cannot
    /// hold the lock forever; [`LockGuard::lost`](crate::LockGuard::lost) then fires with
    /// [`LostReason::MaxHold`](crate::LostReason::MaxHold) when the lease runs out.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// The shortest time the lock stays held, counted from the grant (ShedLock's
    /// `lockAtLeastFor`; default: none). Every release of the lease (explicit, on drop, or at
    /// the end of [`LockClient::run_exclusive_with`]) asks lockd to keep the lock until then,
    /// so a job that finishes in 50 ms is not run again by an instance whose timer is a
    /// little late. Zero means none.
    pub fn min_hold(mut self, min_hold: Duration) -> Self {
        self.min_hold = (!min_hold.is_zero()).then_some(min_hold);
        self
    }

    /// Makes the resource a semaphore with up to `limit` holders at once (at most 1024), each
    /// with its own guard, token and fencing token. 0 or 1, the default, is a plain mutex. A
    /// resource is either a mutex or a semaphore with one limit while it is held: an acquire
    /// with another limit fails with [`Error::Rpc`](crate::Error::Rpc) `FAILED_PRECONDITION`.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// Waits in arrival order (default: no): lockd queues the waiters of the resource in Redis,
    /// across all its replicas, and grants the lock to the longest-waiting one, so a waiter
    /// never starves behind a stream of newcomers. Only meaningful with a [`wait`](Self::wait);
    /// a waiter that gives up (or is cancelled) leaves the queue.
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// When the guard's `KeepAlive` stream breaks without a release (the process died, or its
    /// connection dropped), leave the lease to expire at its TTL instead of having lockd
    /// release it at once (default: release at once). A dropped guard is still released.
    /// Use it when a job that may have finished must never run again before the TTL, even
    /// after a crash; the price is that a crashed holder blocks others for up to the TTL.
    pub fn expire_on_close(mut self, expire_on_close: bool) -> Self {
        self.expire_on_close = expire_on_close;
        self
    }
}

/// Options for one lock on one resource, bound to a client: made by
/// [`LockClient::lock_options`], finished by [`acquire`](Self::acquire) or [`run`](Self::run).
///
/// ```no_run
/// # async fn demo(client: lockd_client::LockClient) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
///
/// let attempt = client
///     .lock_options("nightly-scan")
///     .ttl(Duration::from_secs(10))
///     .owner("scheduler-2")
///     .label("job", "scan")
///     .wait(Duration::from_secs(5))
///     .acquire()
///     .await?;
/// # let _ = attempt;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a LockRequest does nothing until acquire() or run() is awaited"]
pub struct LockRequest<'c> {
    client: &'c LockClient,
    resource: String,
    options: LockOptions,
}

impl<'c> LockRequest<'c> {
    pub(crate) fn new(client: &'c LockClient, resource: String) -> Self {
        Self {
            client,
            resource,
            options: LockOptions::default(),
        }
    }

    /// Replaces all options with `options`.
    pub fn options(mut self, options: LockOptions) -> Self {
        self.options = options;
        self
    }

    /// See [`LockOptions::ttl`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options = self.options.ttl(ttl);
        self
    }

    /// See [`LockOptions::wait`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.options = self.options.wait(wait);
        self
    }

    /// See [`LockOptions::owner`].
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.options = self.options.owner(owner);
        self
    }

    /// See [`LockOptions::label`].
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options = self.options.label(key, value);
        self
    }

    /// See [`LockOptions::labels`].
    pub fn labels<K, V>(mut self, labels: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.options = self.options.labels(labels);
        self
    }

    /// See [`LockOptions::token`].
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.options = self.options.token(token);
        self
    }

    /// See [`LockOptions::max_hold`].
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.options = self.options.max_hold(max_hold);
        self
    }

    /// See [`LockOptions::min_hold`].
    pub fn min_hold(mut self, min_hold: Duration) -> Self {
        self.options = self.options.min_hold(min_hold);
        self
    }

    /// See [`LockOptions::limit`].
    pub fn limit(mut self, limit: u32) -> Self {
        self.options = self.options.limit(limit);
        self
    }

    /// See [`LockOptions::fair`].
    pub fn fair(mut self, fair: bool) -> Self {
        self.options = self.options.fair(fair);
        self
    }

    /// See [`LockOptions::expire_on_close`].
    pub fn expire_on_close(mut self, expire_on_close: bool) -> Self {
        self.options = self.options.expire_on_close(expire_on_close);
        self
    }

    /// Takes the lock (waiting up to the `wait` option): [`TryLock::Acquired`] with a renewing
    /// guard, or [`TryLock::Held`] with the holder.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a rejected option, [`Error::Unavailable`] when lockd could
    /// not be reached within the retry policy, [`Error::Timeout`] when it did not answer in time.
    pub async fn acquire(self) -> Result<TryLock, Error> {
        self.client.acquire(self.resource, &self.options).await
    }

    /// Runs `job` only if the lock is got; see [`LockClient::run_exclusive`].
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire), plus [`Error::LockLost`] when the lock was lost mid-run
    /// (the job is then cancelled).
    pub async fn run<T, F, Fut>(self, job: F) -> Result<Outcome<T>, Error>
    where
        F: FnOnce(LeaseInfo) -> Fut,
        Fut: Future<Output = T>,
    {
        self.client
            .run_exclusive_with(self.resource, &self.options, job)
            .await
    }
}
