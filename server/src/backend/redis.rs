//! The Redis backend: locks as Redis hashes changed only through Lua scripts, and wake-ups and
//! events through one pub/sub subscription per lockd process.
//!
//! Keys, all sharing the Redis Cluster hash tag `{<tag>}` so one script's keys share a slot:
//! `<prefix>:{<tag>}` (the lock or semaphore), `<prefix>:{<tag>}:fence` (the fencing counter,
//! which outlives the lock by [`FENCE_GRACE`]; while a mutex is held, only where the lock hash
//! cannot stand for it), and `<prefix>:{<tag>}:queue` / `:qexp` (the
//! fair queue, only while fair waiters exist). The tag is the resource name with `%`, `{` and
//! `}` escaped as `%25`, `%7B` and `%7D` (see [`tag`]), so every name gets one non-empty tag of
//! its own; names without those characters keep the keys they always had. The key prefix must
//! not contain `{` or `}`, or Redis Cluster would hash some other part of the key. Channels: `<prefix>:released` (wake-ups) and
//! `<prefix>:events` (for Watch), plus Redis keyspace notifications for expirations.
//!
//! Connections: the backend keeps a few multiplexed connections that every request shares. A
//! per-request pool checkout would cost a `PING` round trip each time; a multiplexed
//! connection pipelines concurrent requests on its own. A connection that fails is dropped and
//! replaced on next use, so lockd recovers by itself when Redis comes back. Where connections
//! lead (one Redis, Sentinel's master, a Cluster) is [`topology`]'s business.
//!
//! Batches (`--redis-batch`): while the shared connections already carry two script calls each,
//! further lock scripts leave together in one call ([`batch`]).
//!
//! Replica acknowledgements (`--min-replica-acks N`): after each script that changed a lock,
//! `WAIT N timeout` on the same connection. A grant that too few replicas acknowledged is
//! undone and answered `UNAVAILABLE`, since a failover could lose it.

mod batch;
mod reply;
mod scripts;
mod sentinel;
mod subscriber;
mod topology;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::redis::{self, AsyncConnectionConfig, Cmd, RedisError, Script, Value};
use tokio_util::sync::CancellationToken;

use self::batch::{Batcher, Call, Kind, evalsha};
use self::reply::{AcquireReply, ExtendReply, ReleaseReply, decode_inspect};
use self::scripts::Scripts;
use self::subscriber::Subscriber;
use self::topology::{Conn, Topology};
use super::{Backend, ExtendParams, Page, millis, mismatch, since_epoch};
use crate::config::RedisConfig;
use crate::error::{Error, Result};
use crate::events::Events;
use crate::lock::{
    AcquireOutcome, AcquireParams, Busy, ExtendOutcome, Holders, Lease, LeaseStatus,
    ReleaseOutcome, ReleaseParams,
};
use crate::locks::waiters::Waiters;
use crate::metrics;

/// A shared connection and the Sentinel epoch it was opened in.
type Shared = (Conn, u64);

/// Locks in Redis. Shared behind an `Arc`.
pub struct RedisBackend {
    /// Where connections lead.
    topology: Topology,
    /// Connect and reply time limits of new connections.
    conn_config: AsyncConnectionConfig,
    /// Time limit for opening a connection, checks included.
    timeout: Duration,
    /// The shared connections, each with the Sentinel epoch it was opened in (see
    /// [`Topology::current`]); `None` until first use or after a failure.
    conns: Box<[Mutex<Option<Shared>>]>,
    /// One per slot, held while that slot connects, so a burst of requests (at start, or when
    /// Redis comes back) opens one connection per slot, not one per request.
    connecting: Box<[tokio::sync::Mutex<()>]>,
    /// Round-robin cursor over `conns`.
    next: AtomicUsize,
    scripts: Scripts,
    /// Batches lock scripts while Redis is busy; `None` in Cluster mode or with
    /// `--redis-batch 1`.
    batcher: Option<Batcher>,
    prefix: String,
    /// `<prefix>:released`: release.lua and dequeue.lua publish wake-ups here.
    released_channel: String,
    /// `<prefix>:events`: every script that changes a lock publishes its event here.
    events_channel: String,
    /// Why the wake-up subscription is down, or `None` while it works. While it is down,
    /// blocking acquires are only woken by TTLs, so health reports `NOT_SERVING`.
    wakeups_down: Mutex<Option<String>>,
    /// Serve even when Redis may evict lock keys (`--allow-evicting-redis`).
    allow_evicting: bool,
    /// What the last check of Redis's `maxmemory-policy` found (see [`Policy`]).
    policy: Mutex<Policy>,
    /// Set while `policy` is [`Policy::Refused`]: lock calls then fail at once. An atomic, since
    /// every call reads it.
    refusing: AtomicBool,
    /// Replicas that must acknowledge each change; 0 for none.
    min_replica_acks: u32,
    /// How long a change waits for them.
    replica_ack_timeout: Duration,
}

/// What lockd knows of Redis's `maxmemory-policy`. Any policy but `noeviction` lets Redis evict
/// a lock key when it runs out of memory, which silently frees the lock for anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Policy {
    /// Not checked yet: Redis was not reachable.
    Unknown,
    /// `noeviction`.
    Safe,
    /// An evicting policy, accepted with `--allow-evicting-redis`.
    Allowed(String),
    /// An evicting policy: lock calls are refused with this message.
    Refused(String),
    /// Redis refused `CONFIG GET` (as managed services do), with this error.
    Unverified(String),
}

impl Policy {
    /// How bad a verdict is, to keep the worst of several masters'.
    fn severity(&self) -> u8 {
        match self {
            Self::Safe => 0,
            Self::Unknown => 1,
            Self::Allowed(_) => 2,
            Self::Unverified(_) => 3,
            Self::Refused(_) => 4,
        }
    }
}

/// The explanation of a refused `maxmemory-policy`, naming the fix.
fn eviction_refusal(policy: &str) -> String {
    format!(
        "Redis maxmemory-policy is `{policy}`: when Redis reaches maxmemory it may evict lock \
         keys, and an evicted lock is silently free for anyone to take. Set maxmemory-policy to \
         noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf), or start lockd \
         with --allow-evicting-redis (LOCKD_ALLOW_EVICTING_REDIS=true) to accept that risk"
    )
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .field("connections", &self.conns.len())
            .finish()
    }
}

/// How long a resource's fencing counter (`:fence`) outlives its last lease. Fencing tokens
/// are `max(counter + 1, Redis TIME in µs)` (see acquire.lua): while the counter exists, tokens
/// grow whatever Redis's clock does; once it is gone (expired, evicted, or lost with Redis's
/// data), they grow as long as Redis's clock never steps back by more than this (and, after a
/// failover, the new primary's clock does not lag the old one's by more than the failover took).
/// The counter then costs memory for this long after a resource was last used.
pub const FENCE_GRACE: Duration = Duration::from_secs(10);

/// Whether the connection that gave `e` should be dropped: it failed, or its node is no longer
/// a master (a replica refuses writes with `READONLY`; `MASTERDOWN` while it lost its master).
fn is_connection_failure(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

/// Awaits one Redis call, recording its latency and, on failure, its kind of error.
async fn timed<T>(
    command: &'static str,
    call: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    let started = std::time::Instant::now();
    let r = call.await;
    metrics::redis_call(command, started.elapsed());
    if let Err(e) = &r {
        metrics::redis_error(if e.is_timeout() {
            "timeout"
        } else if is_connection_failure(e) {
            "connection"
        } else {
            "response"
        });
    }
    r
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn from_ms(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0).unsigned_abs())
}

/// The hash tag of a resource's keys: the name with `%`, `{` and `}` escaped as `%25`, `%7B`
/// and `%7D`. Injective (`%` only starts an escape), never empty for a valid (non-empty) name,
/// free of braces (so Redis Cluster hashes exactly the tag), and prefix-preserving (the tag of a
/// prefix is a prefix of the tag), so `ListLocks` can still match a prefix with `SCAN`.
fn tag(resource: &str) -> std::borrow::Cow<'_, str> {
    if !resource.contains(['%', '{', '}']) {
        return resource.into();
    }
    let mut out = String::with_capacity(resource.len() + 8);
    for c in resource.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out.into()
}

/// The resource name of a hash tag made by [`tag`], or `None` when `tag` is not one.
fn untag(tag: &str) -> Option<String> {
    if tag.contains(['{', '}']) {
        return None;
    }
    let mut out = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3)?;
        out.push(match escape {
            "%25" => '%',
            "%7B" => '{',
            "%7D" => '}',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// Escapes the glob characters of `s` for `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisBackend {
    /// Builds the backend and starts its subscriber, which reports releases to `waiters` and,
    /// while anyone watches, events to `events`, until `shutdown` is cancelled. Nothing connects
    /// yet: a Redis that is down at start makes calls fail with `UNAVAILABLE` until it is up.
    ///
    /// # Errors
    /// Fails when the URL is invalid.
    pub fn start(
        config: &RedisConfig,
        waiters: Arc<Waiters>,
        events: Arc<Events>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, Box<dyn std::error::Error + Send + Sync>> {
        let timeout = Some(config.timeout);
        let pool_size = match config.pool_size {
            0 => tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()),
            n => n,
        };
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let topology = Topology::new(config)?;
        let cluster = topology.is_cluster();
        let (batcher, queue) = if cluster || config.batch <= 1 {
            (None, None)
        } else {
            let (b, q) = Batcher::new(pool_size * batch::SLOTS_PER_CONNECTION);
            (Some(b), Some(q))
        };
        let sentinel = match &topology {
            Topology::Sentinel(s) => Some(s.clone()),
            _ => None,
        };
        let released_channel = format!("{}:released", config.key_prefix);
        let events_channel = format!("{}:events", config.key_prefix);
        let backend = Arc::new(Self {
            topology,
            conn_config,
            timeout: config.timeout,
            conns: (0..pool_size).map(|_| Mutex::new(None)).collect(),
            connecting: (0..pool_size)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            next: AtomicUsize::new(0),
            scripts: Scripts::new(cluster, &events_channel, &released_channel),
            batcher,
            prefix: config.key_prefix.clone(),
            released_channel,
            events_channel,
            wakeups_down: Mutex::new(Some("not subscribed yet".to_owned())),
            allow_evicting: config.allow_evicting,
            policy: Mutex::new(Policy::Unknown),
            refusing: AtomicBool::new(false),
            min_replica_acks: config.min_replica_acks,
            replica_ack_timeout: config.replica_ack_timeout,
        });
        if let Some(queue) = queue {
            tokio::spawn(batch::run(Arc::downgrade(&backend), queue, config.batch));
        }
        if let Some(sentinel) = sentinel {
            let b = backend.clone();
            tokio::spawn(sentinel.follow(move || b.forget_all(), shutdown.clone()));
        }
        metrics::redis_errors_zero();
        // The batch counter starts at zero, so it is exported before the first batch.
        metrics::redis_batched(0);
        metrics::redis_subscription(false);
        backend.report_connections();
        let subscriber = Subscriber::new(backend.clone(), waiters, events, config.timeout);
        tokio::spawn(subscriber.run(shutdown));
        Ok(backend)
    }

    /// The key of `resource` with `suffix` ("" for the lock itself, ":fence", ":queue", ":qexp").
    fn key(&self, resource: &str, suffix: &str) -> String {
        format!("{}:{{{}}}{suffix}", self.prefix, tag(resource))
    }

    /// The resource of a lock key, or `None` for any other key.
    fn resource_of(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":{")?;
        untag(rest.strip_suffix('}')?)
    }

    /// Checks, at start, that Redis will not evict lock keys: its `maxmemory-policy` must be
    /// `noeviction`, unless `--allow-evicting-redis` accepts the risk. A Redis that cannot be
    /// reached yet is checked on the first connection instead, and lock calls are refused
    /// (`UNAVAILABLE`, health `NOT_SERVING`) if its policy turns out unsafe then. A Redis that
    /// refuses `CONFIG` cannot be checked: that is logged, and lockd serves.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`], naming the setting and the fix, when the policy evicts.
    pub async fn check_safe(&self) -> Result<()> {
        match self.any_conn().await {
            Ok(_) => match &*self.policy.lock().unwrap_or_else(PoisonError::into_inner) {
                Policy::Refused(why) => Err(Error::FailedPrecondition(why.clone())),
                _ => Ok(()),
            },
            Err(e) => {
                tracing::warn!(error = %e, "Redis is not reachable at start; its maxmemory-policy \
                    will be checked on the first connection");
                Ok(())
            }
        }
    }

    /// Reads `maxmemory-policy` through `conn` (on every master of a cluster) and records
    /// the verdict: the worst one found. Fails only when the connection does.
    async fn check_policy(&self, conn: &mut Conn) -> Result<()> {
        let mut verdict = Policy::Safe;
        for node in self.topology.masters(conn).await? {
            let mut get = redis::cmd("CONFIG");
            get.arg("GET").arg("maxmemory-policy");
            let reply: Result<HashMap<String, String>, RedisError> =
                conn.on_node(node.as_ref(), get).await;
            let found = match reply {
                Err(e) if is_connection_failure(&e) => return Err(e.into()),
                Err(e) => Policy::Unverified(e.to_string()),
                Ok(config) => match config.get("maxmemory-policy") {
                    Some(p) if p == "noeviction" => Policy::Safe,
                    Some(p) if self.allow_evicting => Policy::Allowed(p.clone()),
                    Some(p) => Policy::Refused(eviction_refusal(p)),
                    None => {
                        Policy::Unverified("CONFIG GET maxmemory-policy answered nothing".into())
                    }
                },
            };
            if found.severity() > verdict.severity() {
                verdict = found;
            }
        }
        let mut policy = self.policy.lock().unwrap_or_else(PoisonError::into_inner);
        if *policy == verdict {
            return Ok(());
        }
        match &verdict {
            Policy::Unknown => {}
            Policy::Safe => tracing::info!("Redis maxmemory-policy is noeviction"),
            Policy::Allowed(p) => tracing::warn!(
                policy = %p,
                "Redis may evict lock keys (maxmemory-policy is not noeviction), which silently \
                 frees locks; serving anyway, as --allow-evicting-redis asks"
            ),
            Policy::Refused(why) => tracing::error!("refusing lock calls: {why}"),
            Policy::Unverified(e) => tracing::warn!(
                error = %e,
                "cannot read Redis maxmemory-policy; make sure it is noeviction, or Redis may \
                 evict lock keys and silently free locks"
            ),
        }
        self.refusing
            .store(matches!(verdict, Policy::Refused(_)), Ordering::Relaxed);
        *policy = verdict;
        Ok(())
    }

    /// The error for lock calls while Redis may evict lock keys.
    fn refusal(&self) -> Error {
        match &*self.policy.lock().unwrap_or_else(PoisonError::into_inner) {
            Policy::Refused(why) => Error::Unavailable(why.clone()),
            // Only reached in a race with a check that found the policy fixed.
            _ => Error::Unavailable("Redis maxmemory-policy is being checked".into()),
        }
    }

    /// One of the shared connections, connecting it first if needed; refused while Redis may
    /// evict lock keys.
    async fn conn(&self) -> Result<(Conn, u64)> {
        let conn = self.any_conn().await?;
        if self.refusing.load(Ordering::Relaxed) {
            return Err(self.refusal());
        }
        Ok(conn)
    }

    /// One of the shared connections and its Sentinel epoch, connecting it first if needed (or
    /// when Sentinel switched masters since it was opened). Each new connection checks Redis's
    /// `maxmemory-policy` first, since Redis may have been replaced.
    async fn any_conn(&self) -> Result<(Conn, u64)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let slot = &self.conns[i];
        let usable = || {
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .filter(|(_, epoch)| self.topology.current(*epoch))
        };
        if let Some(c) = usable() {
            return Ok(c);
        }
        let _connecting = self.connecting[i].lock().await;
        // Another request may have connected the slot while this one waited.
        if let Some(c) = usable() {
            return Ok(c);
        }
        // Boxed: connecting is rare, and its future would otherwise enlarge every call's.
        let connected = async {
            let (mut c, epoch) = self.topology.connect(&self.conn_config).await?;
            self.check_policy(&mut c).await?;
            Ok::<_, Error>((c, epoch))
        };
        let c = match tokio::time::timeout(self.timeout, Box::pin(connected)).await {
            Ok(c) => c?,
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "cannot connect to {} within {:?}",
                    self.topology.name(),
                    self.timeout
                )));
            }
        };
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(c.clone());
        self.report_connections();
        Ok(c)
    }

    /// Records how many shared connections are open, for metrics.
    fn report_connections(&self) {
        let open = self
            .conns
            .iter()
            .filter(|s| s.lock().unwrap_or_else(PoisonError::into_inner).is_some())
            .count();
        metrics::redis_connections(open, self.conns.len());
    }

    /// Forgets every shared connection, so that the next calls reconnect.
    fn forget_all(&self) {
        for slot in &*self.conns {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        self.report_connections();
    }

    /// After a connection failure, forgets every shared connection: they all lead to the same
    /// Redis, which most likely restarted, went away or was demoted, so the next calls
    /// reconnect instead of each finding its own dead connection.
    fn forget_on_failure<T>(&self, r: Result<T, RedisError>) -> Result<T, RedisError> {
        if let Err(e) = &r
            && is_connection_failure(e)
        {
            self.forget_all();
        }
        r
    }

    /// Refuses a reply that came from a master Sentinel has replaced since the call started:
    /// whatever it says will be lost with the old master's data.
    fn unless_master_switched<T>(&self, epoch: u64, r: T) -> Result<T> {
        if self.topology.current(epoch) {
            Ok(r)
        } else {
            Err(Error::Unavailable(
                "the Redis master was replaced (Sentinel failover) during this call; its \
                 outcome on the old master will be lost: retry"
                    .into(),
            ))
        }
    }

    /// Runs `cmd`, an `EVALSHA` of `script` (`command`, for metrics), on a shared connection.
    async fn run(
        &self,
        command: &'static str,
        script: &Script,
        cmd: &Cmd,
    ) -> Result<(Value, Conn)> {
        let (mut conn, epoch) = self.conn().await?;
        let v = self.forget_on_failure(timed(command, evalsha(&mut conn, script, cmd)).await)?;
        self.unless_master_switched(epoch, (v, conn))
    }

    /// Runs a script that may safely run twice (a read, or an acquire: its token finds the
    /// lease a first run may have granted). When its connection turns out dead (Redis
    /// restarted), it is retried once on a fresh connection instead of failing the caller.
    /// Not after a timeout: Redis may be slow, and a second wait would double the delay.
    async fn run_idempotent(
        &self,
        command: &'static str,
        script: &Script,
        cmd: &Cmd,
    ) -> Result<(Value, Conn)> {
        let (mut conn, epoch) = self.conn().await?;
        match self.forget_on_failure(timed(command, evalsha(&mut conn, script, cmd)).await) {
            Err(e) if is_connection_failure(&e) && !e.is_timeout() => {
                self.run(command, script, cmd).await
            }
            r => self.unless_master_switched(epoch, (r?, conn)),
        }
    }

    /// Runs a lock script call: alone and at once while a slot is free (or batching is off),
    /// otherwise in the next batch ([`batch`]).
    async fn script(&self, call: Call) -> Result<(Value, Conn)> {
        let Some(batcher) = &self.batcher else {
            return self.run_alone(&call).await;
        };
        match batcher.free_slot() {
            Some(_slot) => self.run_alone(&call).await,
            None => batcher.queue(call).await,
        }
    }

    /// Runs one lock script call by itself; an acquire as [`Self::run_idempotent`].
    async fn run_alone(&self, call: &Call) -> Result<(Value, Conn)> {
        let script = match call.kind {
            Kind::Acquire => &self.scripts.acquire,
            Kind::Release => &self.scripts.release,
            Kind::Extend => &self.scripts.extend,
        };
        let cmd = call.evalsha(script);
        match call.kind {
            Kind::Acquire => self.run_idempotent(call.kind.name(), script, &cmd).await,
            _ => self.run(call.kind.name(), script, &cmd).await,
        }
    }

    /// Runs a plain command or pipeline on a shared connection.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Pipeline) -> Result<T> {
        let (mut conn, _) = self.conn().await?;
        Ok(self.forget_on_failure(timed("pipeline", cmd.query_async(&mut conn)).await)?)
    }

    /// With `--min-replica-acks N`: waits until N replicas acknowledged the change just made
    /// on `conn` to `resource`'s keys. `Ok(false)` when too few did in time.
    async fn replicated(&self, conn: &mut Conn, resource: &str) -> Result<bool> {
        if self.min_replica_acks == 0 {
            return Ok(true);
        }
        let acks = conn
            .wait_replicas(
                &self.key(resource, ""),
                self.min_replica_acks,
                self.replica_ack_timeout,
            )
            .await;
        Ok(self.forget_on_failure(acks)? >= self.min_replica_acks)
    }

    /// Undoes a grant that too few replicas acknowledged. If this fails too, the lease stays
    /// until its TTL: nobody else gets it meanwhile, and the caller was told it failed.
    async fn undo_grant(&self, p: &AcquireParams) {
        let undo = ReleaseParams {
            resource: p.resource.clone(),
            token: p.token.clone(),
            keep_until: None,
            min_hold: Duration::ZERO,
            max_ttl: p.ttl,
            only_if_renewer: None,
        };
        if let Err(e) = self.run_alone(&self.release_call(&undo)).await {
            tracing::warn!(resource = %p.resource, error = %e, "cannot undo an unacknowledged \
                grant; it stays until its TTL");
        }
    }

    /// Checks that every master has at least `--min-replica-acks` connected replicas.
    async fn check_replicas(&self, conn: &mut Conn) -> Result<()> {
        for node in self.topology.masters(conn).await? {
            let role: Vec<Value> = conn.on_node(node.as_ref(), redis::cmd("ROLE")).await?;
            let replicas = match role.get(2) {
                Some(Value::Array(r)) => r.len(),
                _ => 0,
            };
            if replicas < self.min_replica_acks as usize {
                return Err(Error::Unavailable(format!(
                    "a Redis master has {replicas} connected replica(s); LOCKD_MIN_REPLICA_ACKS \
                     asks for {}",
                    self.min_replica_acks
                )));
            }
        }
        Ok(())
    }

    /// The error for a change that too few replicas acknowledged.
    fn unreplicated(&self, what: &str) -> Error {
        Error::Unavailable(format!(
            "{what} not acknowledged by {} replica(s) within {:?} (LOCKD_MIN_REPLICA_ACKS); a \
             failover could lose it",
            self.min_replica_acks, self.replica_ack_timeout
        ))
    }

    /// The call of acquire.lua for `p`.
    fn acquire_call(&self, p: &AcquireParams) -> Call {
        let mut call = Call::new(Kind::Acquire, self.key(&p.resource, ""));
        call.key(self.key(&p.resource, ":fence"))
            .key(self.key(&p.resource, ":queue"))
            .key(self.key(&p.resource, ":qexp"))
            .arg(p.token.expose())
            .arg(ms(p.ttl))
            .arg(&p.owner)
            .arg(p.limit)
            .arg(p.fair.as_deref().unwrap_or(""))
            .arg(&p.resource)
            .arg(if p.waiting { "1" } else { "0" })
            .arg(p.renewer.as_deref().unwrap_or(""));
        for (name, value) in &p.labels {
            call.arg(name).arg(value);
        }
        call
    }

    /// The call of extend.lua for `p`.
    fn extend_call(&self, p: &ExtendParams) -> Call {
        let mut call = Call::new(Kind::Extend, self.key(&p.resource, ""));
        call.key(self.key(&p.resource, ":fence"))
            .key(self.key(&p.resource, ":queue"))
            .arg(p.token.expose())
            .arg(ms(p.ttl))
            .arg(if p.replace_ttl { "1" } else { "0" })
            .arg(ms(p.max_ttl))
            .arg(&p.resource)
            .arg(p.renewer.as_deref().unwrap_or(""));
        call
    }

    /// The call of release.lua for `p`.
    fn release_call(&self, p: &ReleaseParams) -> Call {
        let mut call = Call::new(Kind::Release, self.key(&p.resource, ""));
        call.key(self.key(&p.resource, ":queue"))
            .key(self.key(&p.resource, ":fence"))
            .arg(p.token.expose())
            .arg(&p.resource)
            .arg(p.keep_until.unwrap_or(0))
            .arg(ms(p.min_hold))
            .arg(ms(p.max_ttl))
            .arg(if p.only_if_renewer.is_some() {
                "1"
            } else {
                "0"
            })
            .arg(p.only_if_renewer.as_deref().unwrap_or(""));
        call
    }

    async fn inspect_key(&self, resource: &str) -> Result<Option<Holders>> {
        let script = &self.scripts.inspect;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(1)
            .arg(self.key(resource, ""));
        decode_inspect(
            self.run_idempotent("inspect", script, &cmd).await?.0,
            resource,
        )
    }
}

impl Backend for RedisBackend {
    async fn acquire(&self, p: &AcquireParams) -> Result<AcquireOutcome> {
        let since = tokio::time::Instant::now();
        let (reply, mut conn) = self.script(self.acquire_call(p)).await?;
        match AcquireReply::decode(reply, &p.resource)? {
            AcquireReply::Granted {
                fencing_token,
                now,
                new,
            } => {
                if !self.replicated(&mut conn, &p.resource).await? {
                    if new {
                        self.undo_grant(p).await;
                    }
                    return Err(self.unreplicated("the grant"));
                }
                Ok(AcquireOutcome::Acquired(Lease {
                    resource: p.resource.clone(),
                    token: p.token.clone(),
                    fencing_token,
                    expires_at: now.saturating_add(millis(p.ttl)),
                    ttl: p.ttl,
                    since,
                }))
            }
            AcquireReply::Busy { retry_in, holder } => {
                Ok(AcquireOutcome::Busy(Busy { holder, retry_in }))
            }
            AcquireReply::LimitMismatch { limit } => Err(mismatch(&p.resource, limit, p.limit)),
        }
    }

    async fn release(&self, p: &ReleaseParams) -> Result<ReleaseOutcome> {
        let (reply, mut conn) = self.script(self.release_call(p)).await?;
        let (status, frees_at) = match ReleaseReply::decode(reply)? {
            ReleaseReply::Released { frees_at } => {
                if !self.replicated(&mut conn, &p.resource).await? {
                    return Err(self.unreplicated(
                        "the release (it took effect on the master, but a failover may bring \
                         the lease back until its TTL)",
                    ));
                }
                // Freed at once, unstamped by the script: lockd's clock.
                (
                    LeaseStatus::Ok,
                    Some(frees_at.unwrap_or_else(|| millis(since_epoch()))),
                )
            }
            ReleaseReply::NotHeld => (LeaseStatus::NotHeld, None),
            ReleaseReply::HeldByOther => (LeaseStatus::HeldByOther, None),
        };
        Ok(ReleaseOutcome { status, frees_at })
    }

    async fn extend(&self, p: &ExtendParams) -> Result<ExtendOutcome> {
        let not = |status| ExtendOutcome {
            status,
            lease: None,
        };
        let since = tokio::time::Instant::now();
        let (reply, mut conn) = self.script(self.extend_call(p)).await?;
        match ExtendReply::decode(reply)? {
            ExtendReply::Extended {
                fencing_token,
                now,
                ttl_ms,
            } if !self.replicated(&mut conn, &p.resource).await? => {
                let _ = (fencing_token, now, ttl_ms);
                Err(self.unreplicated(
                    "the extension (a failover may bring back the lease's earlier expiry)",
                ))
            }
            ExtendReply::Extended {
                fencing_token,
                now,
                ttl_ms,
            } => Ok(ExtendOutcome {
                status: LeaseStatus::Ok,
                lease: Some(Lease {
                    resource: p.resource.clone(),
                    token: p.token.clone(),
                    fencing_token,
                    expires_at: now.saturating_add(ttl_ms),
                    ttl: from_ms(ttl_ms),
                    since,
                }),
            }),
            ExtendReply::NotHeld => Ok(not(LeaseStatus::NotHeld)),
            ExtendReply::HeldByOther => Ok(not(LeaseStatus::HeldByOther)),
        }
    }

    async fn inspect(&self, resource: &str) -> Result<Option<Holders>> {
        self.inspect_key(resource).await
    }

    /// Walks the masters one after the other (one on a single Redis), each with `SCAN`. The
    /// page token is `<master index>:<cursor>` (the masters sorted by address), or the bare
    /// cursor on a single Redis. A reshard or failover between pages may repeat or skip locks
    /// that moved, as `SCAN` itself may.
    async fn list(&self, prefix: &str, page_size: usize, cursor: &str) -> Result<Page> {
        let bad = || Error::invalid("page_token", "is not a token returned by ListLocks");
        let (node, cursor): (usize, u64) = match cursor.split_once(':') {
            _ if cursor.is_empty() => (0, 0),
            Some((n, c)) => (n.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?),
            None => (0, cursor.parse().map_err(|_| bad())?),
        };
        // Tags are prefix-preserving: the tags of the names under `prefix` start with its tag.
        let pattern = format!(
            "{}:{{{}*}}",
            glob_escape(&self.prefix),
            glob_escape(&tag(prefix))
        );
        let (mut conn, _) = self.conn().await?;
        let masters = self.topology.masters(&mut conn).await?;
        let Some(master) = masters.get(node) else {
            return Err(bad());
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(page_size);
        let scanned = conn.on_node(master.as_ref(), scan).await;
        let (next, keys): (u64, Vec<String>) = self.forget_on_failure(scanned)?;
        let mut resources: Vec<String> = keys.iter().filter_map(|k| self.resource_of(k)).collect();
        // SCAN may repeat a key while Redis resizes its table; never within one page.
        resources.sort();
        resources.dedup();
        // Concurrent calls are pipelined on the multiplexed connections.
        let found =
            futures_util::future::join_all(resources.iter().map(|r| self.inspect_key(r))).await;
        let mut locks = Vec::new();
        for holders in found {
            if let Some(h) = holders? {
                locks.extend(h.holders);
            }
        }
        let next = match (next, node + 1 < masters.len()) {
            (0, false) => String::new(),
            (0, true) => format!("{}:0", node + 1),
            (c, _) if masters.len() == 1 => c.to_string(),
            (c, _) => format!("{node}:{c}"),
        };
        Ok(Page { locks, next })
    }

    async fn leave_queue(&self, resource: &str, waiter: &str) -> Result<()> {
        let script = &self.scripts.dequeue;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(2)
            .arg(self.key(resource, ":queue"))
            .arg(self.key(resource, ":qexp"))
            .arg(waiter)
            .arg(&self.released_channel)
            .arg(resource);
        self.run("dequeue", script, &cmd).await.map(drop)
    }

    /// Fails while Redis does not answer, while its `maxmemory-policy` may evict lock keys,
    /// while the wake-up subscription is down, and while a master has fewer replicas than
    /// `--min-replica-acks` asks for.
    async fn ping(&self) -> Result<()> {
        let (mut conn, _) = self.any_conn().await?;
        if self.refusing.load(Ordering::Relaxed) {
            // Look again, so a Redis whose policy was fixed is served without a restart.
            if let Err(e) = self.check_policy(&mut conn).await {
                self.forget_all();
                return Err(e);
            }
            if self.refusing.load(Ordering::Relaxed) {
                return Err(self.refusal());
            }
        }
        let pong = timed("ping", redis::cmd("PING").query_async::<Value>(&mut conn)).await;
        self.forget_on_failure(pong)?;
        if self.min_replica_acks > 0 {
            self.check_replicas(&mut conn).await?;
        }
        let down = self
            .wakeups_down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match down {
            Some(cause) => Err(Error::Unavailable(format!(
                "wake-up subscription down: {cause}"
            ))),
            None => Ok(()),
        }
    }

    fn name(&self) -> &'static str {
        self.topology.name()
    }
}

#[cfg(test)]
mod tests {
    use super::subscriber::parse_event;
    use super::*;
    use crate::backend::checks;
    use crate::config::RedisTarget;
    use crate::lock::EventKind;

    fn start_with_pool_size(pool_size: usize) -> Arc<RedisBackend> {
        let config = RedisConfig {
            // Never reached: starting does not connect.
            target: RedisTarget::Single {
                url: "redis://127.0.0.1:1".into(),
            },
            pool_size,
            batch: 32,
            timeout: Duration::from_secs(1),
            key_prefix: "lockd".into(),
            allow_evicting: false,
            min_replica_acks: 0,
            replica_ack_timeout: Duration::from_millis(500),
            username: None,
            tls: false,
            tls_ca: None,
        };
        let shutdown = CancellationToken::new();
        let backend =
            RedisBackend::start(&config, Arc::default(), Arc::default(), shutdown.clone()).unwrap();
        shutdown.cancel();
        backend
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pool_size_zero_means_one_connection_per_worker_thread() {
        assert_eq!(start_with_pool_size(0).conns.len(), 2);
        assert_eq!(start_with_pool_size(3).conns.len(), 3);
    }

    #[tokio::test]
    async fn a_single_threaded_runtime_shares_one_connection() {
        assert_eq!(start_with_pool_size(0).conns.len(), 1);
    }

    /// A redis-server on a free port for one test, killed when dropped.
    struct LocalRedis {
        child: std::process::Child,
        port: u16,
    }

    impl LocalRedis {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is needed: sudo apt-get install -y redis-server");
            for _ in 0..500 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Self { child, port }
        }

        fn backend(&self) -> (Arc<RedisBackend>, CancellationToken) {
            let config = RedisConfig {
                target: RedisTarget::Single {
                    url: format!("redis://127.0.0.1:{}", self.port),
                },
                pool_size: 1,
                batch: 32,
                timeout: Duration::from_secs(5),
                key_prefix: "lockd".into(),
                allow_evicting: false,
                min_replica_acks: 0,
                replica_ack_timeout: Duration::from_millis(500),
                username: None,
                tls: false,
                tls_ca: None,
            };
            let shutdown = CancellationToken::new();
            let backend =
                RedisBackend::start(&config, Arc::default(), Arc::default(), shutdown.clone())
                    .unwrap();
            (backend, shutdown)
        }
    }

    impl Drop for LocalRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn release_on_close_spares_a_renewal_made_elsewhere() {
        let redis = LocalRedis::start();
        let (b, shutdown) = redis.backend();
        checks::release_on_close_spares_a_renewal_made_elsewhere(&*b, 1).await;
        checks::release_on_close_spares_a_renewal_made_elsewhere(&*b, 3).await;
        checks::an_acquire_through_a_session_binds_the_lease_to_it(&*b, 1).await;
        checks::an_acquire_through_a_session_binds_the_lease_to_it(&*b, 3).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_fair_queue_head_in_the_way_reports_when_it_goes_stale() {
        let redis = LocalRedis::start();
        let (b, shutdown) = redis.backend();
        checks::a_fair_queue_head_in_the_way_reports_when_it_goes_stale(&*b, 1).await;
        checks::a_fair_queue_head_in_the_way_reports_when_it_goes_stale(&*b, 2).await;
        shutdown.cancel();
    }

    fn acquire(resource: &str, token: &str) -> AcquireParams {
        AcquireParams {
            resource: resource.into(),
            token: crate::lock::Token::new(token.into()),
            owner: "batch-test".into(),
            ttl: Duration::from_secs(30),
            labels: Default::default(),
            limit: 1,
            fair: None,
            waiting: false,
            new_token: false,
            renewer: None,
        }
    }

    fn release(resource: &str, token: &str) -> ReleaseParams {
        ReleaseParams {
            resource: resource.into(),
            token: crate::lock::Token::new(token.into()),
            keep_until: None,
            min_hold: Duration::ZERO,
            max_ttl: Duration::from_secs(3600),
            only_if_renewer: None,
        }
    }

    #[tokio::test]
    async fn operations_in_one_batch_answer_as_if_sent_one_after_another() {
        let redis = LocalRedis::start();
        let (b, shutdown) = redis.backend();
        // A foreign value under a lock key: its acquire fails with WRONGTYPE inside the batch.
        let _: () = b
            .query(redis::pipe().cmd("SET").arg(b.key("odd", "")).arg("x"))
            .await
            .unwrap();
        let extend = ExtendParams {
            resource: "x".into(),
            token: crate::lock::Token::new("A".into()),
            ttl: Duration::from_secs(30),
            replace_ttl: true,
            max_ttl: Duration::from_secs(3600),
            renewer: None,
        };
        let mut labelled = acquire("y", "A");
        labelled.labels = [("team", "sre"), ("job", "nightly")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let calls = vec![
            b.acquire_call(&acquire("x", "A")),
            b.acquire_call(&acquire("x", "B")),
            b.release_call(&release("x", "A")),
            b.acquire_call(&acquire("x", "B")),
            b.extend_call(&extend),
            b.acquire_call(&acquire("odd", "A")),
            b.acquire_call(&labelled),
        ];
        let mut replies = batch::send_together(&b, calls).await.into_iter();
        let mut next = || replies.next().unwrap();
        let first = match AcquireReply::decode(next().unwrap().0, "x").unwrap() {
            AcquireReply::Granted {
                fencing_token, new, ..
            } => {
                assert!(new);
                fencing_token
            }
            other => panic!("A's acquire: {other:?}"),
        };
        assert!(matches!(
            AcquireReply::decode(next().unwrap().0, "x").unwrap(),
            AcquireReply::Busy { .. }
        ));
        assert!(matches!(
            ReleaseReply::decode(next().unwrap().0).unwrap(),
            ReleaseReply::Released { .. }
        ));
        match AcquireReply::decode(next().unwrap().0, "x").unwrap() {
            AcquireReply::Granted { fencing_token, .. } => assert!(fencing_token > first),
            other => panic!("B's acquire after A's release: {other:?}"),
        }
        assert_eq!(
            ExtendReply::decode(next().unwrap().0).unwrap(),
            ExtendReply::HeldByOther
        );
        match next() {
            Err(Error::Internal(m)) => assert!(m.contains("WRONGTYPE"), "{m}"),
            other => panic!("the acquire of a foreign key: {:?}", other.map(|r| r.0)),
        }
        assert!(matches!(
            AcquireReply::decode(next().unwrap().0, "y").unwrap(),
            AcquireReply::Granted { new: true, .. }
        ));
        let holders = b.inspect("x").await.unwrap().unwrap();
        assert_eq!(holders.holders.len(), 1);
        assert_eq!(holders.holders[0].fencing_token, first + 1);
        let y = b.inspect("y").await.unwrap().unwrap();
        assert_eq!(y.holders[0].labels, labelled.labels);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn scripts_flushed_from_redis_are_loaded_again_alone_and_in_batches() {
        let redis = LocalRedis::start();
        let (b, shutdown) = redis.backend();
        let flush = || async {
            let _: () = b
                .query(redis::pipe().cmd("SCRIPT").arg("FLUSH"))
                .await
                .unwrap();
        };
        flush().await;
        assert!(matches!(
            b.acquire(&acquire("a", "A")).await.unwrap(),
            AcquireOutcome::Acquired(_)
        ));
        flush().await;
        let calls = vec![
            b.release_call(&release("a", "A")),
            b.acquire_call(&acquire("a", "B")),
        ];
        let replies = batch::send_together(&b, calls).await;
        assert!(matches!(
            ReleaseReply::decode(replies[0].as_ref().unwrap().0.clone()).unwrap(),
            ReleaseReply::Released { .. }
        ));
        assert!(b.inspect("a").await.unwrap().is_some());
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_beyond_the_free_slots_go_in_batches_and_one_holder_wins() {
        let redis = LocalRedis::start();
        let (b, shutdown) = redis.backend();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let own = format!("own-{i}");
                let token = format!("t{i}");
                let took = matches!(
                    b.acquire(&acquire(&own, &token)).await.unwrap(),
                    AcquireOutcome::Acquired(_)
                );
                assert!(took, "{own} is free");
                let freed = b.release(&release(&own, &token)).await.unwrap();
                assert_eq!(freed.status, LeaseStatus::Ok);
                matches!(
                    b.acquire(&acquire("shared", &token)).await.unwrap(),
                    AcquireOutcome::Acquired(_)
                )
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1, "one holder of the shared lock");
        let batched = b.batcher.as_ref().unwrap().batched();
        assert!(
            batched > 0,
            "200 concurrent calls over 2 slots: none went in a batch"
        );
        shutdown.cancel();
    }

    /// Requests still finishing in the shutdown grace period (a closing Session releases its
    /// leases) need their calls made, batched or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_in_the_shutdown_grace_period_still_reach_redis_in_batches() {
        let redis = LocalRedis::start();
        let (b, shutdown) = redis.backend();
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let (own, token) = (format!("late-{i}"), format!("t{i}"));
                b.acquire(&acquire(&own, &token)).await.unwrap();
                b.release(&release(&own, &token)).await.unwrap().status
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), LeaseStatus::Ok);
        }
        assert!(b.batcher.as_ref().unwrap().batched() > 0);
    }

    #[test]
    fn hash_tags_escape_braces_and_decode_back() {
        let names = [
            "}x", "a}b", "{c}", "%7D", "}", "{", "%", "%25", "plain", "a%b", "é{",
        ];
        let tags: Vec<_> = names.iter().map(|n| tag(n).into_owned()).collect();
        for (name, t) in names.iter().zip(&tags) {
            assert!(!t.is_empty() && !t.contains(['{', '}']), "{name}: {t}");
            assert_eq!(untag(t).as_deref(), Some(*name));
            // Prefix-preserving, for ListLocks.
            assert!(tag(&format!("{name}tail")).starts_with(t.as_str()));
        }
        let distinct: std::collections::HashSet<_> = tags.iter().collect();
        assert_eq!(distinct.len(), names.len());
        assert_eq!(tag("job-1"), "job-1");
        assert_eq!(untag("%7"), None);
        assert_eq!(untag("%41"), None);
        assert_eq!(untag("a}"), None);
    }

    #[test]
    fn glob_characters_are_escaped_for_scan() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn events_parse_from_script_payloads() {
        let e = parse_event("A\njob-1\nscheduler-2\n7\n1000\n31000").unwrap();
        assert_eq!(e.kind, EventKind::Acquired);
        assert_eq!(
            (e.resource.as_str(), e.owner.as_str()),
            ("job-1", "scheduler-2")
        );
        assert_eq!(
            (e.fencing_token, e.time, e.expires_at),
            (7, 1000, Some(31000))
        );
        assert!(parse_event("Z\nx").is_none());
    }
}
