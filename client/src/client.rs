//! [`LockClient`]: connecting, acquiring, releasing, and running jobs under a lock.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use lockd_proto::v1::session_request::Op;
use lockd_proto::v1::session_response::Reply;
use lockd_proto::v1::{
    AcquireRequest, AcquireResponse, ExtendRequest, ExtendResponse, GetOwnerRequest,
    GetOwnerResponse, LeaseStatus, ListLocksRequest, LockInfo, ReleaseRequest,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, LostReason};
use crate::guard::{LeaseInfo, LeaseState, LockGuard, Token, release_in_background};
use crate::options::{LockOptions, LockRequest};
use crate::renew::{self, Renewal};
use crate::retry::RetryPolicy;
use crate::session::Mux;
use crate::{ApiKey, AuthedClient, proto};

/// The default connect timeout: 5 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default per-request timeout: 10 s (a waiting `Acquire` gets its wait on top).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The page size [`LockClient::list_locks`] asks for.
const LIST_PAGE_SIZE: u32 = 500;

/// A lockd client: cheap to clone (all clones share one connection), safe to share between
/// tasks.
///
/// Made by [`LockClient::connect`], [`LockClient::builder`] or [`LockClient::from_channel`].
#[derive(Debug, Clone)]
pub struct LockClient {
    endpoints: Arc<Endpoints>,
    config: Arc<Config>,
}

/// The lockd replicas a client may call, and the one it calls now. A call that fails with a
/// retryable error moves the client on to the next one before it retries.
#[derive(Debug)]
pub(crate) struct Endpoints {
    clients: Vec<AuthedClient>,
    current: AtomicUsize,
}

impl Endpoints {
    /// The index of the endpoint in use now.
    pub(crate) fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// The endpoint at `index` failed: move on to the next one, unless another call already
    /// did.
    pub(crate) fn failed(&self, index: usize) {
        let next = (index + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Settings shared by all clones of a client.
#[derive(Debug)]
struct Config {
    request_timeout: Duration,
    retry: RetryPolicy,
    /// Used when a lock's options name no owner.
    owner: Option<String>,
    /// The shared Session stream for Acquire, Release and Extend, one per endpoint (in the
    /// order of [`Endpoints`]); empty: unary calls.
    sessions: Vec<Mux>,
}

/// The result of an attempt to take a lock.
///
/// Contention is an answer, not an error: `Held` carries who holds the lock.
#[derive(Debug)]
#[must_use = "dropping TryLock::Acquired releases the lock at once"]
pub enum TryLock {
    /// The lock was granted; the guard renews it until released or dropped.
    Acquired(LockGuard),
    /// Someone else holds the lock: the holder (never its token). `None` only when a wait
    /// ended just as the lock was free but before it could be taken.
    Held(Option<LockInfo>),
}

impl TryLock {
    /// The guard, if the lock was acquired.
    pub fn into_guard(self) -> Option<LockGuard> {
        match self {
            Self::Acquired(guard) => Some(guard),
            Self::Held(_) => None,
        }
    }

    /// Whether the lock was acquired.
    pub fn is_acquired(&self) -> bool {
        matches!(self, Self::Acquired(_))
    }

    /// The holder, if the lock was held by someone else.
    pub fn holder(&self) -> Option<&LockInfo> {
        match self {
            Self::Acquired(_) => None,
            Self::Held(holder) => holder.as_ref(),
        }
    }
}

/// What [`LockClient::run_exclusive`] did.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Outcome<T> {
    /// The lock was got and the job ran to completion: its output.
    Ran(T),
    /// The lock was held by someone else, so the job did not run: the holder (`None` only when
    /// a wait ended just as the lock was free but before it could be taken).
    Skipped(Option<LockInfo>),
}

/// Connection settings for a [`LockClient`]: made by [`LockClient::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::{LockClient, RetryPolicy};
///
/// let client = LockClient::builder("http://127.0.0.1:50051")
///     .connect_timeout(Duration::from_secs(2))
///     .request_timeout(Duration::from_secs(5))
///     .retry(RetryPolicy::default().max_attempts(5))
///     .owner("scheduler-2 on host-a")
///     .connect()
///     .await?;
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a ClientBuilder does nothing until connect() or connect_lazy()"]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry: RetryPolicy,
    owner: Option<String>,
    sessions: bool,
    api_key: ApiKey,
    /// Why the key given to `api_key` is unusable; `connect` reports it.
    api_key_error: Option<String>,
    #[cfg(feature = "tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClientBuilder {
    /// Whether `Acquire`, `Release` and `Extend` travel on one `Session` stream shared by the
    /// client and its clones (default `true`). lockd binds the leases to that session: a lease
    /// whose client dies ends by its TTL, and guards renew with `Extend` on it. Multiplexing
    /// every call on one stream costs lockd less CPU per operation than a unary call each.
    ///
    /// `false` sends one unary RPC per call and keeps each guard alive on its own `KeepAlive`
    /// stream, as lockd servers without the `Session` RPC need. Guards with
    /// [`expire_on_close`](crate::LockOptions::expire_on_close) always use their own
    /// `KeepAlive` stream.
    pub fn sessions(mut self, enabled: bool) -> Self {
        self.sessions = enabled;
        self
    }

    /// The limit on establishing the connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The limit on each request (default 10 s). An `Acquire` that waits gets its wait on top,
    /// and renewals use at most a third of the TTL. The limit is also sent to lockd as the
    /// gRPC deadline.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How `UNAVAILABLE` is retried (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The owner named by locks whose options give none (default: lockd uses the peer address).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// The API key sent with every call (`authorization: Bearer <key>`), for a lockd with an
    /// auth file. The key must be printable ASCII; [`ClientBuilder::connect`] fails otherwise.
    pub fn api_key(mut self, key: impl AsRef<str>) -> Self {
        self.api_key_error = None;
        match ApiKey::new(key.as_ref()) {
            Ok(k) => self.api_key = k,
            Err(e) => self.api_key_error = Some(e.to_string()),
        }
        self
    }

    /// TLS settings, as tonic takes them (the endpoint should then start with `https://`).
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// More lockd replicas to fall back on: when a call to the replica in use fails with
    /// `UNAVAILABLE` (it stopped, or lost Redis), the client moves on to the next one before
    /// it retries. The endpoint given to [`LockClient::builder`] may also list several,
    /// separated by commas.
    pub fn fallback(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// Connects now: to the first endpoint that answers (the others connect when first used).
    ///
    /// # Errors
    /// [`Error::Connect`] when an endpoint is invalid or no connection can be made.
    pub async fn connect(self) -> Result<LockClient, Error> {
        let mut channels = Vec::new();
        let mut first = None;
        let mut last_error = None;
        for (i, address) in self.endpoints.iter().enumerate() {
            let endpoint = self.endpoint(address)?;
            if first.is_some() {
                channels.push(endpoint.connect_lazy());
                continue;
            }
            match endpoint.connect().await {
                Ok(channel) => {
                    first = Some(i);
                    channels.push(channel);
                }
                Err(e) => {
                    last_error = Some(e);
                    channels.push(endpoint.connect_lazy());
                }
            }
        }
        match (first, last_error) {
            (Some(i), _) => Ok(self.client(channels, i)),
            (None, Some(e)) => Err(e.into()),
            // `builder` keeps at least one endpoint, even an empty (invalid) one.
            (None, None) => Err(self
                .endpoint("")
                .err()
                .unwrap_or_else(|| Error::Protocol("no endpoint given".into()))),
        }
    }

    /// Returns a client at once and connects on first use (and reconnects after failures).
    ///
    /// # Errors
    /// [`Error::Connect`] when an endpoint is invalid.
    pub fn connect_lazy(self) -> Result<LockClient, Error> {
        let channels = self
            .endpoints
            .iter()
            .map(|e| Ok(self.endpoint(e)?.connect_lazy()))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(self.client(channels, 0))
    }

    /// A client over a channel you built yourself (its endpoint and TLS settings are the
    /// channel's), with this builder's other settings.
    ///
    /// # Errors
    /// [`Error::Protocol`] when the API key is not printable ASCII.
    pub fn on_channel(self, channel: Channel) -> Result<LockClient, Error> {
        if let Some(e) = &self.api_key_error {
            return Err(Error::Protocol(e.clone()));
        }
        Ok(self.client(vec![channel], 0))
    }

    fn endpoint(&self, address: &str) -> Result<Endpoint, Error> {
        if let Some(e) = &self.api_key_error {
            return Err(Error::Protocol(e.clone()));
        }
        let endpoint = Endpoint::from_shared(address.to_owned())?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        #[cfg(feature = "tls")]
        let endpoint = match &self.tls {
            Some(tls) => endpoint.tls_config(tls.clone())?,
            None => endpoint,
        };
        Ok(endpoint)
    }

    fn client(self, channels: Vec<Channel>, current: usize) -> LockClient {
        let clients: Vec<AuthedClient> = channels
            .into_iter()
            .map(|c| proto::LockServiceClient::with_interceptor(c, self.api_key.clone()))
            .collect();
        LockClient {
            config: Arc::new(Config {
                request_timeout: self.request_timeout,
                retry: self.retry,
                owner: self.owner,
                sessions: if self.sessions {
                    clients.iter().map(|c| Mux::new(c.clone())).collect()
                } else {
                    Vec::new()
                },
            }),
            endpoints: Arc::new(Endpoints {
                clients,
                current: AtomicUsize::new(current),
            }),
        }
    }
}

impl LockClient {
    /// Connects to lockd at `endpoint` (such as `http://127.0.0.1:50051`) with the default
    /// settings; see [`builder`](Self::builder) for the others.
    ///
    /// # Errors
    /// [`Error::Connect`] when the endpoint is invalid or the connection cannot be made.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, Error> {
        Self::builder(endpoint).connect().await
    }

    /// Settings for a connection to `endpoint`: timeouts, retries, default owner, TLS. Several
    /// lockd replicas may be given, separated by commas (`http://a:50051,http://b:50051`): see
    /// [`ClientBuilder::fallback`].
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        let endpoint: String = endpoint.into();
        let mut endpoints: Vec<String> = endpoint
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            // Refused by `connect` as an invalid endpoint, naming it.
            endpoints.push(endpoint);
        }
        ClientBuilder {
            endpoints,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry: RetryPolicy::default(),
            owner: None,
            sessions: true,
            api_key: ApiKey::default(),
            api_key_error: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A client over a channel you built yourself, with the default settings.
    pub fn from_channel(channel: Channel) -> Self {
        Self::builder(String::new()).client(vec![channel], 0)
    }

    /// The generated client over the connection in use, for calls this layer does not wrap.
    pub fn raw(&self) -> AuthedClient {
        self.endpoints.clients[self.endpoints.current()].clone()
    }

    /// The endpoints, for the retry loop and KeepAlive renewals.
    pub(crate) fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Options for a lock on `resource`, set builder-style and finished with
    /// [`LockRequest::acquire`] or [`LockRequest::run`].
    pub fn lock_options(&self, resource: impl Into<String>) -> LockRequest<'_> {
        LockRequest::new(self, resource.into())
    }

    /// Tries once to take the lock on `resource` for `ttl` (renewed while the guard lives).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`], [`Error::Unavailable`] (after retries) or [`Error::Timeout`].
    pub async fn try_lock(
        &self,
        resource: impl Into<String>,
        ttl: Duration,
    ) -> Result<TryLock, Error> {
        self.lock_options(resource).ttl(ttl).acquire().await
    }

    /// Takes the lock on `resource` for `ttl`, waiting up to `wait` while it is held (lockd
    /// wakes the waiter on release or on the holder's expiry: no polling).
    ///
    /// # Errors
    /// As [`try_lock`](Self::try_lock).
    pub async fn lock(
        &self,
        resource: impl Into<String>,
        ttl: Duration,
        wait: Duration,
    ) -> Result<TryLock, Error> {
        self.lock_options(resource)
            .ttl(ttl)
            .wait(wait)
            .acquire()
            .await
    }

    /// Runs `job` only if the lock on `resource` is got (one try, no wait), renewing it while
    /// the job runs and releasing it afterwards. The job receives the lease's [`LeaseInfo`]
    /// (resource and fencing token). For more options use
    /// [`lock_options`](Self::lock_options)`(..).run(job)`.
    ///
    /// **When the lock is lost mid-run, the job is cancelled**: its future is dropped at its
    /// next `.await`, and this returns [`Error::LockLost`]. So a job never keeps running once
    /// its lock can no longer be trusted; a job with side effects that must not be cut short
    /// should take a guard with [`lock_options`](Self::lock_options) and watch
    /// [`LockGuard::lost`] itself. A loss noticed at the same time as the job's completion
    /// counts as a loss (the output is dropped). A failed release after a completed job is only
    /// logged: the job's output is returned and the lease ends by its TTL.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::LockClient) -> Result<(), lockd_client::Error> {
    /// use std::time::Duration;
    /// use lockd_client::Outcome;
    ///
    /// match client
    ///     .run_exclusive("nightly-scan", Duration::from_secs(30), |lease| async move {
    ///         // ... write with lease.fencing_token ...
    ///         lease.fencing_token
    ///     })
    ///     .await?
    /// {
    ///     Outcome::Ran(fence) => println!("ran with fencing token {fence}"),
    ///     Outcome::Skipped(holder) => println!(
    ///         "skipping: already running on {}",
    ///         holder.map(|h| h.owner).unwrap_or_default()
    ///     ),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`try_lock`](Self::try_lock), plus [`Error::LockLost`].
    pub async fn run_exclusive<T, F, Fut>(
        &self,
        resource: impl Into<String>,
        ttl: Duration,
        job: F,
    ) -> Result<Outcome<T>, Error>
    where
        F: FnOnce(LeaseInfo) -> Fut,
        Fut: Future<Output = T>,
    {
        self.lock_options(resource).ttl(ttl).run(job).await
    }

    /// [`run_exclusive`](Self::run_exclusive) with [`LockOptions`].
    ///
    /// # Errors
    /// As [`run_exclusive`](Self::run_exclusive).
    pub async fn run_exclusive_with<T, F, Fut>(
        &self,
        resource: impl Into<String>,
        options: &LockOptions,
        job: F,
    ) -> Result<Outcome<T>, Error>
    where
        F: FnOnce(LeaseInfo) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = match self.acquire(resource.into(), options).await? {
            TryLock::Acquired(guard) => guard,
            TryLock::Held(holder) => return Ok(Outcome::Skipped(holder)),
        };
        let lost = guard.lost();
        let job = job(guard.info());
        tokio::select! {
            biased;
            reason = lost => {
                let resource = guard.resource().to_owned();
                drop(guard);
                Err(Error::LockLost { resource, reason })
            }
            output = job => {
                let resource = guard.resource().to_owned();
                match guard.release().await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(%resource, "the lease had ended before the release"),
                    Err(error) => tracing::warn!(%resource, %error, "release failed; the lease ends by its TTL"),
                }
                Ok(Outcome::Ran(output))
            }
        }
    }

    /// The current holder of `resource`, or `None` when it is free.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`], [`Error::Unavailable`] (after retries) or [`Error::Timeout`].
    pub async fn holder(&self, resource: impl Into<String>) -> Result<Option<LockInfo>, Error> {
        Ok(self.get_owner(resource.into()).await?.holder)
    }

    /// Every current holder of `resource`, by fencing token: none when it is free, one for a
    /// mutex, up to the limit for a semaphore (see [`LockOptions::limit`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`], [`Error::Unavailable`] (after retries) or [`Error::Timeout`].
    pub async fn holders(&self, resource: impl Into<String>) -> Result<Vec<LockInfo>, Error> {
        let reply = self.get_owner(resource.into()).await?;
        // A server that predates semaphores only fills in `holder`.
        Ok(match (reply.holders.is_empty(), reply.holder) {
            (true, Some(holder)) => vec![holder],
            _ => reply.holders,
        })
    }

    /// `GetOwner`, retried on UNAVAILABLE.
    async fn get_owner(&self, resource: String) -> Result<GetOwnerResponse, Error> {
        let reply = self
            .config
            .retry
            .run_on(&self.endpoints, || {
                let request = self.request(
                    GetOwnerRequest {
                        resource: resource.clone(),
                    },
                    Duration::ZERO,
                );
                let mut raw = self.raw();
                async move { raw.get_owner(request).await }
            })
            .await?;
        Ok(reply.into_inner())
    }

    /// The locks held right now under `prefix` (all of them for `""`), without tokens: every
    /// page of `ListLocks`, in lockd's order (not sorted). A lock taken or released during the
    /// listing may or may not appear.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`], [`Error::Unavailable`] (after retries) or [`Error::Timeout`].
    pub async fn list_locks(&self, prefix: impl Into<String>) -> Result<Vec<LockInfo>, Error> {
        let prefix = prefix.into();
        let mut locks = Vec::new();
        let mut page_token = String::new();
        loop {
            let reply = self
                .config
                .retry
                .run_on(&self.endpoints, || {
                    let request = self.request(
                        ListLocksRequest {
                            prefix: prefix.clone(),
                            page_size: LIST_PAGE_SIZE,
                            page_token: page_token.clone(),
                        },
                        Duration::ZERO,
                    );
                    let mut raw = self.raw();
                    async move { raw.list_locks(request).await }
                })
                .await?
                .into_inner();
            locks.extend(reply.locks);
            if reply.next_page_token.is_empty() {
                return Ok(locks);
            }
            page_token = reply.next_page_token;
        }
    }

    /// Takes the lock per `options`; the heart of every acquiring method.
    ///
    /// The token is chosen here (or taken from the options) and sent on every retry, so a
    /// retried `Acquire` whose earlier attempt was granted gets that same lease back. If the
    /// acquire fails in the end, a background `Release` with that token removes any lease an
    /// unanswered attempt may have left.
    pub(crate) async fn acquire(
        &self,
        resource: String,
        options: &LockOptions,
    ) -> Result<TryLock, Error> {
        let token = Token(
            options
                .token
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        );
        let ttl = match options.max_hold {
            Some(max_hold) => options.ttl.min(max_hold),
            None => options.ttl,
        };
        let wait_until = options.wait.map(|wait| Instant::now() + wait);
        loop {
            let (sent, reply) = match self
                .acquire_once(&resource, options, &token, ttl, wait_until)
                .await
            {
                Ok(reply) => reply,
                Err(error) => {
                    if !matches!(error, Error::InvalidArgument(_)) {
                        release_in_background(self, &resource, &token, None);
                    }
                    return Err(error);
                }
            };
            if !reply.acquired {
                return Ok(TryLock::Held(reply.holder));
            }
            let lease = reply.lease.ok_or_else(|| {
                Error::Protocol("Acquire answered acquired without a lease".into())
            })?;
            let mut granted = lease.ttl.and_then(to_std_duration).unwrap_or(ttl).min(ttl);
            let mut anchor = sent;
            let mut expires_at = lease.expires_at.and_then(from_timestamp);
            // The grant happened somewhere between `sent` and now. After a long wait, the
            // deadline counted from `sent` may be near or past although the lease is fresh, so
            // renew once now to count from a known moment.
            if sent.elapsed() > renew::period(granted) {
                let sent = Instant::now();
                match self.extend_now(&resource, &token, ttl).await {
                    Ok(Some((renewed, renewed_expiry))) => {
                        (anchor, granted) = (sent, renewed);
                        expires_at = renewed_expiry.or(expires_at);
                    }
                    // The fresh lease ended before we could renew it: try again, within the
                    // wait if there is any left.
                    Ok(None) => {
                        if wait_until.is_some_and(|until| until > Instant::now()) {
                            continue;
                        }
                        return Ok(TryLock::Held(None));
                    }
                    Err(error) => {
                        release_in_background(self, &resource, &token, None);
                        return Err(error);
                    }
                }
            }
            let (state_tx, state_rx) = watch::channel(LeaseState {
                expires_at: expires_at.unwrap_or_else(|| SystemTime::now() + granted),
                lost: None::<LostReason>,
            });
            let stop = renew::spawn(Renewal {
                client: self.clone(),
                resource: resource.clone(),
                token: token.clone(),
                ttl,
                deadline: anchor + granted,
                hold_until: options.max_hold.map(|max_hold| sent + max_hold),
                min_hold: options.min_hold,
                expire_on_close: options.expire_on_close,
                state: state_tx,
            });
            return Ok(TryLock::Acquired(LockGuard {
                client: self.clone(),
                resource,
                token,
                fencing_token: lease.fencing_token,
                ttl,
                min_hold: options.min_hold,
                state: state_rx,
                stop: Some(stop),
            }));
        }
    }

    /// One `Acquire`, with `UNAVAILABLE` retried (same token, the wait shrinking to what is
    /// left); returns when the successful attempt was sent, and the reply.
    #[allow(
        clippy::needless_update,
        reason = "fields added to the proto later must not break this"
    )]
    async fn acquire_once(
        &self,
        resource: &str,
        options: &LockOptions,
        token: &Token,
        ttl: Duration,
        wait_until: Option<Instant>,
    ) -> Result<(Instant, AcquireResponse), Error> {
        let owner = options
            .owner
            .clone()
            .or_else(|| self.config.owner.clone())
            .unwrap_or_default();
        let result = self
            .config
            .retry
            .run_on(&self.endpoints, || {
                let wait = wait_until
                    .map(|until| until.saturating_duration_since(Instant::now()))
                    .filter(|wait| !wait.is_zero());
                let message = AcquireRequest {
                    resource: resource.to_owned(),
                    ttl: Some(to_proto_duration(ttl)),
                    wait_timeout: wait.map(to_proto_duration),
                    owner: owner.clone(),
                    token: token.0.clone(),
                    labels: options.labels.clone(),
                    limit: options.limit,
                    fair: options.fair,
                    ..Default::default()
                };
                let extra = wait.unwrap_or_default();
                async move {
                    let sent = Instant::now();
                    let reply = match self.session_call(Op::Acquire(message.clone()), extra) {
                        Some(call) => match call.await? {
                            Reply::Acquire(reply) => reply,
                            other => return Err(unexpected(&other)),
                        },
                        None => self
                            .raw()
                            .acquire(self.request(message, extra))
                            .await?
                            .into_inner(),
                    };
                    Ok((sent, reply))
                }
            })
            .await?;
        Ok(result)
    }

    /// Renews `token`'s lease to `ttl` now (retrying `UNAVAILABLE`): the granted TTL and new
    /// expiry, or `None` when the lease is no longer held.
    #[allow(
        clippy::needless_update,
        reason = "fields added to the proto later must not break this"
    )]
    async fn extend_now(
        &self,
        resource: &str,
        token: &Token,
        ttl: Duration,
    ) -> Result<Option<(Duration, Option<SystemTime>)>, Error> {
        let reply = self
            .config
            .retry
            .run_on(&self.endpoints, || self.extend_once(resource, token, ttl))
            .await?;
        if !reply.extended {
            return Ok(None);
        }
        let lease = reply.lease.unwrap_or_default();
        let granted = lease.ttl.and_then(to_std_duration).unwrap_or(ttl).min(ttl);
        Ok(Some((granted, lease.expires_at.and_then(from_timestamp))))
    }

    /// One `Extend` of `token`'s lease to `ttl` (replacing the remaining time), on the session
    /// when there is one (which binds the lease to it), without retries.
    #[allow(
        clippy::needless_update,
        reason = "fields added to the proto later must not break this"
    )]
    pub(crate) async fn extend_once(
        &self,
        resource: &str,
        token: &Token,
        ttl: Duration,
    ) -> Result<ExtendResponse, tonic::Status> {
        let message = ExtendRequest {
            resource: resource.to_owned(),
            token: token.0.clone(),
            ttl: Some(to_proto_duration(ttl)),
            replace_ttl: true,
            ..Default::default()
        };
        match self.session_call(Op::Extend(message.clone()), Duration::ZERO) {
            Some(call) => match call.await? {
                Reply::Extend(reply) => Ok(reply),
                other => Err(unexpected(&other)),
            },
            None => Ok(self
                .raw()
                .extend(self.request(message, Duration::ZERO))
                .await?
                .into_inner()),
        }
    }

    /// Releases `token`'s lease (keeping it `min_hold` after the grant), retrying
    /// `UNAVAILABLE`: whether it was still held.
    pub(crate) async fn release(
        &self,
        resource: &str,
        token: &Token,
        min_hold: Option<Duration>,
    ) -> Result<bool, Error> {
        self.release_with(resource, token, min_hold, &self.config.retry)
            .await
    }

    /// [`release`](Self::release) with one attempt.
    pub(crate) async fn release_once(
        &self,
        resource: &str,
        token: &Token,
        min_hold: Option<Duration>,
    ) -> Result<bool, Error> {
        self.release_with(resource, token, min_hold, &RetryPolicy::none())
            .await
    }

    #[allow(
        clippy::needless_update,
        reason = "fields added to the proto later must not break this"
    )]
    async fn release_with(
        &self,
        resource: &str,
        token: &Token,
        min_hold: Option<Duration>,
        retry: &RetryPolicy,
    ) -> Result<bool, Error> {
        let reply = retry
            .run_on(&self.endpoints, || {
                let message = ReleaseRequest {
                    resource: resource.to_owned(),
                    token: token.0.clone(),
                    min_hold: min_hold.map(to_proto_duration),
                    ..Default::default()
                };
                async move {
                    match self.session_call(Op::Release(message.clone()), Duration::ZERO) {
                        Some(call) => match call.await? {
                            Reply::Release(reply) => Ok(reply),
                            other => Err(unexpected(&other)),
                        },
                        None => Ok(self
                            .raw()
                            .release(self.request(message, Duration::ZERO))
                            .await?
                            .into_inner()),
                    }
                }
            })
            .await?;
        Ok(reply.released || reply.status() == LeaseStatus::Ok)
    }

    /// `op` on the shared session, within the request timeout plus `extra`; `None` when the
    /// client sends unary calls.
    fn session_call(
        &self,
        op: Op,
        extra: Duration,
    ) -> Option<impl Future<Output = Result<Reply, tonic::Status>> + '_> {
        let limit = self.config.request_timeout.saturating_add(extra);
        self.config
            .sessions
            .get(self.endpoints.current())
            .map(move |mux| mux.call(op, limit))
    }

    /// Whether guards renew through the shared session (with `Extend`) rather than a
    /// `KeepAlive` stream each.
    pub(crate) fn has_session(&self) -> bool {
        !self.config.sessions.is_empty()
    }

    /// A request carrying the request timeout plus `extra` as its deadline.
    fn request<T>(&self, message: T, extra: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.config.request_timeout.saturating_add(extra));
        #[cfg(feature = "otel")]
        crate::trace::inject(request.metadata_mut());
        request
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.config.request_timeout
    }

    pub(crate) fn retry_policy(&self) -> &RetryPolicy {
        &self.config.retry
    }
}

/// The error for a Session reply that answers another kind of request.
fn unexpected(reply: &Reply) -> tonic::Status {
    tonic::Status::internal(format!("unexpected Session reply: {reply:?}"))
}

/// A std duration as a protobuf one (saturating at the protobuf range).
pub(crate) fn to_proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

/// A protobuf duration as a std one; `None` when negative or invalid.
pub(crate) fn to_std_duration(d: prost_types::Duration) -> Option<Duration> {
    Duration::try_from(d).ok()
}

/// A protobuf timestamp as a `SystemTime`; `None` when out of range.
pub(crate) fn from_timestamp(t: prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(t).ok()
}
