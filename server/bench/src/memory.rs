//! The memory scenario: Redis `used_memory` per held lock, and per resource once released.
//!
//! A lock held through lockd is its lock hash `lockd:{<resource>}` (with a TTL); a lease as
//! long as the measured ones, taken while nobody watches, has no fencing counter key. A release
//! leaves the counter `lockd:{<resource>}:fence` for ten seconds, so a released resource costs
//! it until then. redis-direct keeps one string key while held and nothing after.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::Target;
use crate::error::{Error, Result};
use crate::stats::Recorder;
use crate::target::{Session, redis_connection};

/// Requests in flight while filling and emptying Redis.
const IN_FLIGHT: usize = 256;

/// Lease of the measured locks: long enough that none expires while measuring.
const HOLD: Duration = Duration::from_secs(600);

/// Pause before each reading, so that Redis's cron (10 times a second) has resized its
/// dictionaries, as it would in steady state.
const SETTLE: Duration = Duration::from_secs(1);

/// What the memory scenario measured for one target.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    /// The target.
    pub target: Target,
    /// Locks taken.
    pub locks: u64,
    /// Locks actually granted.
    pub granted: u64,
    /// Length of each resource name, in bytes.
    pub resource_bytes: usize,
    /// Length of each owner string, in bytes (not stored by redis-direct).
    pub owner_bytes: usize,
    /// Mean length of the tokens, in bytes (lockd generates them).
    pub token_bytes: f64,
    /// `used_memory` before, in bytes.
    pub used_memory_before: i64,
    /// `used_memory` with every lock held.
    pub used_memory_held: i64,
    /// `used_memory` after releasing them all.
    pub used_memory_released: i64,
    /// Keys added while held (DBSIZE difference).
    pub keys_held: i64,
    /// Keys left after release (DBSIZE difference).
    pub keys_released: i64,
    /// (held - before) / granted.
    pub bytes_per_held_lock: f64,
    /// (released - before) / granted.
    pub bytes_per_released_resource: f64,
    /// Grants per second while filling.
    pub acquire_per_second: f64,
    /// Failed calls.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

/// Takes `locks` locks through `session`, reading Redis memory at `redis_url` before, while
/// they are held, and after they are released.
///
/// # Errors
/// Fails when Redis cannot be read, or a worker panics.
pub async fn run(
    session: &Session,
    redis_url: &str,
    locks: u64,
    run_id: &str,
) -> Result<MemoryResult> {
    let mut info = redis_connection(redis_url).await?;
    let resource = |i: u64| format!("{run_id}-m-{i:06}");
    let (mem0, keys0) = (used_memory(&mut info).await?, dbsize(&mut info).await?);

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for w in 0..IN_FLIGHT {
        let mut client = session.client(w);
        let next = next.clone();
        let run_id = run_id.to_owned();
        set.spawn(async move {
            let mut rec = Recorder::default();
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= locks {
                    break;
                }
                let res = format!("{run_id}-m-{i:06}");
                match client.acquire(&res, HOLD, None).await {
                    Ok(Some(token)) => held.push((res, token)),
                    Ok(None) => rec.unexpected += 1,
                    Err(e) => rec.error("acquire", &e),
                }
            }
            (client, rec, held)
        });
    }
    let mut workers = Vec::new();
    let mut rec = Recorder::default();
    while let Some(joined) = set.join_next().await {
        let (client, r, held) = joined?;
        rec.merge(r);
        workers.push((client, held));
    }
    let fill = started.elapsed();
    let granted: u64 = workers.iter().map(|(_, h)| h.len() as u64).sum();
    let token_bytes: usize = workers
        .iter()
        .flat_map(|(_, h)| h.iter().map(|(_, t)| t.len()))
        .sum();
    let (mem1, keys1) = (used_memory(&mut info).await?, dbsize(&mut info).await?);

    let mut set = JoinSet::new();
    for (mut client, held) in workers {
        set.spawn(async move {
            let mut rec = Recorder::default();
            for (res, token) in held {
                match client.release(&res, &token).await {
                    Ok(true) => {}
                    Ok(false) => rec.unexpected += 1,
                    Err(e) => rec.error("release", &e),
                }
            }
            rec
        });
    }
    while let Some(joined) = set.join_next().await {
        rec.merge(joined?);
    }
    let (mem2, keys2) = (used_memory(&mut info).await?, dbsize(&mut info).await?);

    let per = |bytes: i64| bytes as f64 / granted.max(1) as f64;
    Ok(MemoryResult {
        target: session.target(),
        locks,
        granted,
        resource_bytes: resource(0).len(),
        owner_bytes: session.client(0).owner().len(),
        token_bytes: token_bytes as f64 / granted.max(1) as f64,
        used_memory_before: mem0,
        used_memory_held: mem1,
        used_memory_released: mem2,
        keys_held: keys1 - keys0,
        keys_released: keys2 - keys0,
        bytes_per_held_lock: per(mem1 - mem0),
        bytes_per_released_resource: per(mem2 - mem0),
        acquire_per_second: granted as f64 / fill.as_secs_f64().max(1e-9),
        errors: rec.total_errors() + rec.unexpected,
        first_error: rec.first_error,
    })
}

/// `used_memory` from `INFO memory`, after [`SETTLE`].
async fn used_memory(conn: &mut MultiplexedConnection) -> Result<i64> {
    tokio::time::sleep(SETTLE).await;
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Unexpected("INFO memory has no used_memory".into()))
}

async fn dbsize(conn: &mut MultiplexedConnection) -> Result<i64> {
    Ok(redis::cmd("DBSIZE").query_async(conn).await?)
}
