//! The Redis backend: locks as Redis hashes changed only through Lua scripts, and wake-ups
//! through one pub/sub subscription per lockd process.
//!
//! Keys are `<prefix>:{<resource>}` (the lock) and `<prefix>:{<resource>}:fence` (the fencing
//! counter, which never expires). The braces are a Redis Cluster hash tag, so both keys of a
//! script share a slot.
//!
//! Connections: deadpool-redis creates them (with connect, reply and pool timeouts), and the
//! backend keeps a few multiplexed connections that every request shares. A per-request pool
//! checkout would cost a `PING` round trip each time; a multiplexed connection pipelines
//! concurrent requests on its own. A connection that fails is dropped and replaced on next use,
//! so lockd recovers by itself when Redis comes back.

mod scripts;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, AsyncConnectionConfig, RedisError, Value};
use deadpool_redis::{Manager, Pool, Runtime};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use self::scripts::Scripts;
use super::{Backend, ExtendParams};
use crate::config::RedisConfig;
use crate::error::{Error, Result};
use crate::lock::{
    AcquireOutcome, AcquireParams, ExtendOutcome, Lease, LeaseStatus, LockInfo, Token,
};
use crate::waiters::Waiters;

/// Locks in Redis. Cheap to share behind an `Arc`.
pub struct RedisBackend {
    /// Creates connections, with explicit timeouts.
    pool: Pool,
    /// The shared multiplexed connections; `None` until first use or after a failure.
    conns: Box<[Mutex<Option<MultiplexedConnection>>]>,
    /// Round-robin cursor over `conns`.
    next: AtomicUsize,
    scripts: Scripts,
    prefix: String,
    /// `<prefix>:released`: release.lua publishes the resource name here.
    channel: String,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl RedisBackend {
    /// Builds the backend and starts its wake-up subscriber, which reports every release to
    /// `waiters` until `shutdown` is cancelled. Nothing connects yet: a Redis that is down at
    /// start makes calls fail with `UNAVAILABLE` until it is up.
    ///
    /// # Errors
    /// Fails when the URL is invalid.
    pub fn new(
        config: &RedisConfig,
        waiters: Arc<Waiters>,
        shutdown: CancellationToken,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let timeout = Some(config.timeout);
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let pool = Pool::builder(Manager::new_with_config(config.url.as_str(), conn_config)?)
            .max_size(config.pool_size)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .runtime(Runtime::Tokio1)
            .build()?;
        let channel = format!("{}:released", config.key_prefix);
        let client = redis::Client::open(config.url.as_str())?;
        tokio::spawn(subscribe(client, channel.clone(), waiters, shutdown));
        Ok(Self {
            pool,
            conns: (0..config.pool_size).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            scripts: Scripts::new(),
            prefix: config.key_prefix.clone(),
            channel,
        })
    }

    fn lock_key(&self, resource: &str) -> String {
        format!("{}:{{{resource}}}", self.prefix)
    }

    fn fence_key(&self, resource: &str) -> String {
        format!("{}:{{{resource}}}:fence", self.prefix)
    }

    /// One of the shared connections, connecting it first if needed.
    async fn conn(&self) -> Result<(usize, MultiplexedConnection)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let slot = &self.conns[i];
        if let Some(c) = slot.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Ok((i, c));
        }
        let c = deadpool_redis::Connection::take(self.pool.get().await?);
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(c.clone());
        Ok((i, c))
    }

    /// Runs a script invocation on a shared connection, dropping the connection if it failed.
    async fn run(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<Value> {
        let (i, mut conn) = self.conn().await?;
        match invocation.invoke_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if is_connection_failure(&e) {
                    *self.conns[i].lock().unwrap_or_else(PoisonError::into_inner) = None;
                }
                Err(e.into())
            }
        }
    }
}

fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Backend for RedisBackend {
    async fn acquire(&self, p: &AcquireParams) -> Result<AcquireOutcome> {
        let mut inv = self.scripts.acquire.key(self.lock_key(&p.resource));
        inv.key(self.fence_key(&p.resource))
            .arg(p.token.expose())
            .arg(ms(p.ttl))
            .arg(&p.owner);
        for (name, value) in &p.labels {
            inv.arg(name).arg(value);
        }
        let reply = Reply::new(self.run(&inv).await?)?;
        if reply.int(0)? == 1 {
            let fencing_token = reply.uint(1)?;
            let now = reply.int(3)?;
            Ok(AcquireOutcome::Acquired(Lease {
                resource: p.resource.clone(),
                token: p.token.clone(),
                fencing_token,
                expires_at: now.saturating_add(ms(p.ttl).try_into().unwrap_or(i64::MAX)),
                ttl: p.ttl,
            }))
        } else {
            Ok(AcquireOutcome::Held(reply.holder(1, &p.resource)?))
        }
    }

    async fn release(&self, resource: &str, token: &Token) -> Result<LeaseStatus> {
        let mut inv = self.scripts.release.key(self.lock_key(resource));
        inv.arg(token.expose()).arg(&self.channel).arg(resource);
        match self.run(&inv).await? {
            Value::Int(1) => Ok(LeaseStatus::Ok),
            Value::Int(0) => Ok(LeaseStatus::NotHeld),
            Value::Int(-1) => Ok(LeaseStatus::HeldByOther),
            other => Err(Error::Internal(format!("release.lua answered {other:?}"))),
        }
    }

    async fn extend(&self, p: &ExtendParams) -> Result<ExtendOutcome> {
        let mut inv = self.scripts.extend.key(self.lock_key(&p.resource));
        inv.arg(p.token.expose())
            .arg(ms(p.ttl))
            .arg(if p.replace_ttl { "1" } else { "0" })
            .arg(ms(p.max_ttl));
        let reply = Reply::new(self.run(&inv).await?)?;
        let status = match reply.int(0)? {
            1 => LeaseStatus::Ok,
            0 => LeaseStatus::NotHeld,
            _ => LeaseStatus::HeldByOther,
        };
        if status != LeaseStatus::Ok {
            return Ok(ExtendOutcome {
                status,
                lease: None,
            });
        }
        let ttl_ms = reply.int(3)?;
        Ok(ExtendOutcome {
            status,
            lease: Some(Lease {
                resource: p.resource.clone(),
                token: p.token.clone(),
                fencing_token: reply.uint(1)?,
                expires_at: reply.int(2)?.saturating_add(ttl_ms),
                ttl: Duration::from_millis(ttl_ms.max(0).unsigned_abs()),
            }),
        })
    }

    async fn inspect(&self, resource: &str) -> Result<Option<LockInfo>> {
        let inv = self.scripts.inspect.key(self.lock_key(resource));
        let reply = Reply::new(self.run(&inv).await?)?;
        if reply.0.is_empty() {
            return Ok(None);
        }
        Ok(Some(reply.holder(0, resource)?))
    }

    async fn ping(&self) -> Result<()> {
        let (i, mut conn) = self.conn().await?;
        let pong: Result<String, RedisError> = redis::cmd("PING").query_async(&mut conn).await;
        if let Err(e) = pong {
            if is_connection_failure(&e) {
                *self.conns[i].lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
            return Err(e.into());
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// A script's array reply, read field by field.
struct Reply(Vec<Value>);

impl Reply {
    fn new(v: Value) -> Result<Self> {
        match v {
            Value::Array(items) => Ok(Self(items)),
            other => Err(Error::Internal(format!("expected an array, got {other:?}"))),
        }
    }

    fn int(&self, i: usize) -> Result<i64> {
        match self.0.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(Error::Internal(format!(
                "field {i}: expected an integer, got {other:?}"
            ))),
        }
    }

    fn uint(&self, i: usize) -> Result<u64> {
        u64::try_from(self.int(i)?).map_err(|_| Error::Internal(format!("field {i}: negative")))
    }

    fn text(&self, i: usize) -> Result<String> {
        match self.0.get(i) {
            Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            other => Err(Error::Internal(format!(
                "field {i}: expected a string, got {other:?}"
            ))),
        }
    }

    /// The holder layout shared by acquire.lua and inspect.lua, starting at `at`:
    /// fencing token, acquired-at, now, remaining ms, owner, then label pairs.
    fn holder(&self, at: usize, resource: &str) -> Result<LockInfo> {
        let now = self.int(at + 2)?;
        let remaining = self.int(at + 3)?.max(0);
        let mut labels = BTreeMap::new();
        let mut i = at + 5;
        while i + 1 < self.0.len() {
            labels.insert(self.text(i)?, self.text(i + 1)?);
            i += 2;
        }
        Ok(LockInfo {
            resource: resource.to_owned(),
            owner: self.text(at + 4)?,
            fencing_token: self.uint(at)?,
            acquired_at: self.int(at + 1)?,
            expires_at: now.saturating_add(remaining),
            remaining: Duration::from_millis(remaining.unsigned_abs()),
            labels,
        })
    }
}

/// The one wake-up subscription of this process: every release published on `channel` wakes
/// the head local waiter of that resource. Reconnects with backoff; after a reconnect every
/// queue head retries, since releases may have been missed meanwhile.
async fn subscribe(
    client: redis::Client,
    channel: String,
    waiters: Arc<Waiters>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut connected_before = false;
    loop {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match pubsub {
            Ok(pubsub) => {
                backoff = Duration::from_millis(50);
                if connected_before {
                    tracing::info!("wake-up subscription restored");
                    waiters.released_all();
                }
                connected_before = true;
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    waiters.released(&String::from_utf8_lossy(msg.get_payload_bytes()));
                }
                tracing::warn!("wake-up subscription lost; reconnecting");
            }
            Err(e) => {
                tracing::debug!(error = %e, "wake-up subscription failed; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
