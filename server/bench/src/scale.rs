//! The scale scenario: does the time per operation grow with the number of locks held?
//!
//! For each level N (1,000 then 1,000,000 by default) it fills Redis with N held locks, written
//! straight into Redis in lockd's own layout (see the header of the server's `acquire.lua`): a
//! hash `<prefix>:{<resource>}` with `t` (token), `o` (a 20-byte owner), `f` (fencing token)
//! and `a` (acquired-at), with a TTL. Like a lease of that length taken while nobody watches,
//! it has no fencing counter key `<prefix>:{<resource>}:fence`.
//! Then it runs the uncontended load (every client on its own resource) against redis-direct
//! and lockd, which share that Redis. Writing through Redis pipelines takes seconds where
//! acquiring a million locks through lockd would take minutes; lockd cannot tell the
//! difference, because it keeps no per-lock state of its own with the Redis backend.
//! lockd-memory is not run: its locks live in its own process, out of reach of Redis.
//!
//! Before measuring, it waits until Redis has finished growing its key tables (an incremental
//! rehash slows every command while it lasts; it starts whenever the key count passes a power
//! of two, so it may still run after the pre-load).
//!
//! The pre-loaded keys are deleted at the end, also when a run fails. Then the smallest level
//! is loaded and measured again: a drift of the machine between the first and the last run
//! shows up as a difference between the two measurements of that level.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{Scenario, Target};
use crate::error::{Error, Result};
use crate::procfs::{self, Pids};
use crate::scenario::{self, Plan, RunResult};
use crate::target::{Session, redis_connection};

/// Locks per pipeline (three commands each).
const BATCH: u64 = 2_000;

/// Pipelines in flight, each on its own connection.
const PIPELINES: usize = 4;

/// Keys per UNLINK when cleaning up.
const UNLINK_KEYS: usize = 1_000;

/// TTL of the pre-loaded locks: they outlive the run, and vanish on their own if it dies.
const PRELOAD_TTL: Duration = Duration::from_secs(900);

/// Pause after filling, for Redis's cron.
const SETTLE: Duration = Duration::from_millis(500);

/// Longest wait for Redis to finish growing its key tables.
const REHASH_LIMIT: Duration = Duration::from_secs(30);

/// Redis's cron frequency while waiting for a rehash (it rehashes for 1 ms per cron tick; 500
/// is its maximum).
const REHASH_HZ: u32 = 500;

/// How the scale scenario runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Redis shared by redis-direct and lockd.
    pub redis_url: String,
    /// lockd's key prefix.
    pub key_prefix: String,
    /// Numbers of held locks, in any order.
    pub levels: Vec<u64>,
    /// Concurrent clients of the uncontended load.
    pub clients: usize,
    /// Connections per target.
    pub connections: u32,
}

/// What Redis held at one level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Pre-loaded locks held during the runs of this level.
    pub held_locks: u64,
    /// The smallest level measured again, after the largest.
    pub repeat: bool,
    /// Seconds it took to add this level's locks to the previous level's.
    pub preload_s: f64,
    /// Seconds waited after the pre-load for Redis to finish rehashing its key tables (growing
    /// a table past a power of two rehashes it incrementally, which slows every command
    /// meanwhile); `None` when Redis refused `DEBUG HTSTATS`, so this was not checked.
    pub rehash_wait_s: Option<f64>,
    /// Keys in the Redis database (DBSIZE) before the runs.
    pub keys: i64,
    /// Redis `used_memory` before the runs, in bytes.
    pub used_memory: i64,
}

/// The scale scenario's setup figures (its runs are ordinary [`RunResult`]s).
#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    /// Clients of the uncontended load.
    pub clients: usize,
    /// One entry per level, in increasing order.
    pub levels: Vec<Level>,
    /// Keys deleted at the end.
    pub keys_deleted: u64,
    /// Seconds the deletions took.
    pub cleanup_s: f64,
}

/// Runs the uncontended load at every level against the sessions that use Redis, then once
/// more at the smallest level after the others were deleted, to show the drift of the machine
/// over the scenario.
///
/// # Errors
/// Fails when Redis cannot be written or read, or a run fails (after cleaning up).
pub async fn run(
    sessions: &[Session],
    opts: &Options,
    plan: &Plan,
    run_id: &str,
    pids: &Pids,
) -> Result<(Vec<RunResult>, ScaleResult)> {
    let mut levels = opts.levels.clone();
    levels.sort_unstable();
    levels.dedup();
    let mut conns = Vec::new();
    for _ in 0..PIPELINES {
        conns.push(redis_connection(&opts.redis_url).await?);
    }
    let keys = Keys {
        prefix: opts.key_prefix.clone(),
        run_id: run_id.to_owned(),
    };
    let level = Measure {
        sessions,
        opts,
        plan,
        run_id,
        pids,
        conns: &conns,
        keys: &keys,
    };
    let mut runs = Vec::new();
    let mut done = Vec::new();
    let mut loaded = 0;
    let outcome = async {
        for &n in &levels {
            let (l, r) = level.measure(loaded, n, false).await?;
            loaded = loaded.max(n);
            done.push(l);
            runs.extend(r);
        }
        Ok::<_, Error>(())
    }
    .await;
    let started = Instant::now();
    let mut deleted = cleanup(&conns, &keys, loaded).await;
    let mut cleanup_s = started.elapsed().as_secs_f64();
    outcome?;
    if let (Some(&first), true) = (levels.first(), levels.len() >= 2) {
        let outcome = level.measure(0, first, true).await;
        let started = Instant::now();
        let again = cleanup(&conns, &keys, first).await;
        cleanup_s += started.elapsed().as_secs_f64();
        let (l, r) = outcome?;
        deleted = deleted.and_then(|d| again.map(|a| d + a));
        done.push(l);
        runs.extend(r);
    }
    Ok((
        runs,
        ScaleResult {
            clients: opts.clients,
            levels: done,
            keys_deleted: deleted?,
            cleanup_s,
        },
    ))
}

/// Everything one level needs.
struct Measure<'a> {
    sessions: &'a [Session],
    opts: &'a Options,
    plan: &'a Plan,
    run_id: &'a str,
    pids: &'a Pids,
    conns: &'a [MultiplexedConnection],
    keys: &'a Keys,
}

impl Measure<'_> {
    /// Adds locks `loaded..n`, lets Redis settle, and runs the load against every session
    /// but lockd-memory.
    async fn measure(&self, loaded: u64, n: u64, repeat: bool) -> Result<(Level, Vec<RunResult>)> {
        let started = Instant::now();
        preload(self.conns, self.keys, loaded, n).await?;
        let preload_s = started.elapsed().as_secs_f64();
        let mut info = self.conns[0].clone();
        let rehash_wait_s = wait_for_rehash(&mut info).await?;
        tokio::time::sleep(SETTLE).await;
        // Redis may still be busy after a large deletion (freeing memory, shrinking its
        // tables), on the CPU the servers share: wait until it is idle.
        if let Some(pid) = self.pids.redis() {
            procfs::wait_quiet(pid, REHASH_LIMIT).await?;
        }
        let level = Level {
            held_locks: n,
            repeat,
            preload_s,
            rehash_wait_s,
            keys: redis::cmd("DBSIZE").query_async(&mut info).await?,
            used_memory: used_memory(&mut info).await?,
        };
        eprintln!(
            "[scale] {n} locks held{} ({preload_s:.1}s to add, rehash wait {}), {} keys in Redis",
            if repeat { ", again" } else { "" },
            rehash_wait_s.map_or_else(|| "not checked".to_owned(), |s| format!("{s:.1}s")),
            level.keys
        );
        let mut runs = Vec::new();
        for session in self.sessions.iter().filter(|s| {
            !matches!(
                s.target(),
                Target::LockdMemory | Target::LockdSession | Target::Etcd
            )
        }) {
            let tag_id = format!("{}-n{n}{}", self.run_id, if repeat { "r" } else { "" });
            let mut r = scenario::run(
                Scenario::Scale,
                session,
                self.opts.connections,
                self.opts.clients,
                self.plan,
                &tag_id,
                &self.pids.serving(session.target()),
            )
            .await?;
            r.held_locks = Some(n);
            r.scale_repeat = repeat;
            eprintln!(
                "[scale] {:<12} held={n:<8} {:>9.0} ops/s  op p50 {:>8.0}us  p99 {:>8.0}us  \
                 server CPU {}",
                session.target().name(),
                r.ops_per_second,
                r.latency_of("op").map_or(0.0, |l| l.p50_us),
                r.latency_of("op").map_or(0.0, |l| l.p99_us),
                r.server_us_per_op()
                    .map_or_else(|| "-".to_owned(), |us| format!("{us:.0}us/op")),
            );
            runs.push(r);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok((level, runs))
    }
}

/// Names of the pre-loaded keys.
#[derive(Clone)]
struct Keys {
    prefix: String,
    run_id: String,
}

impl Keys {
    /// The lock hash of pre-loaded lock `i`.
    fn lock(&self, i: u64) -> String {
        format!("{}:{{{}-held-{i:07}}}", self.prefix, self.run_id)
    }
}

/// Adds locks `from..to` (none when `to <= from`), `BATCH` per pipeline, `PIPELINES` in flight.
async fn preload(conns: &[MultiplexedConnection], keys: &Keys, from: u64, to: u64) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let ttl_ms = PRELOAD_TTL.as_millis();
    let next = Arc::new(AtomicU64::new(from));
    let mut set = JoinSet::new();
    for conn in conns {
        let mut conn = conn.clone();
        let next = next.clone();
        let keys = keys.clone();
        set.spawn(async move {
            loop {
                let start = next.fetch_add(BATCH, Ordering::Relaxed);
                if start >= to {
                    return Ok::<_, Error>(());
                }
                let mut pipe = redis::pipe();
                for i in start..(start + BATCH).min(to) {
                    let key = keys.lock(i);
                    // A 44-byte token and a 20-byte owner, like lockd's.
                    pipe.cmd("HSET")
                        .arg(&key)
                        .arg("t")
                        .arg(format!("preload:{i:036x}"))
                        .arg("o")
                        .arg(format!("bench-preload-{:06}", i % 1_000_000))
                        .arg("f")
                        .arg(1)
                        .arg("a")
                        .arg(now_ms.to_string())
                        .ignore();
                    pipe.cmd("PEXPIRE")
                        .arg(&key)
                        .arg(ttl_ms.to_string())
                        .ignore();
                }
                pipe.exec_async(&mut conn).await?;
            }
        });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    Ok(())
}

/// Deletes the hashes and fencing counters of locks `0..count`; returns the keys deleted.
async fn cleanup(conns: &[MultiplexedConnection], keys: &Keys, count: u64) -> Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let per_batch = (UNLINK_KEYS / 2) as u64;
    let mut set = JoinSet::new();
    for conn in conns {
        let mut conn = conn.clone();
        let next = next.clone();
        let keys = keys.clone();
        set.spawn(async move {
            let mut deleted = 0_u64;
            loop {
                // 20 UNLINKs of 1,000 keys per pipeline.
                let start = next.fetch_add(per_batch * 20, Ordering::Relaxed);
                if start >= count {
                    return Ok::<_, Error>(deleted);
                }
                let end = (start + per_batch * 20).min(count);
                let mut pipe = redis::pipe();
                let mut i = start;
                while i < end {
                    let cmd = pipe.cmd("UNLINK");
                    for j in i..(i + per_batch).min(end) {
                        let key = keys.lock(j);
                        cmd.arg(format!("{key}:fence")).arg(key);
                    }
                    i += per_batch;
                }
                let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
                deleted += counts.iter().sum::<u64>();
            }
        });
    }
    let mut deleted = 0;
    while let Some(joined) = set.join_next().await {
        deleted += joined??;
    }
    Ok(deleted)
}

/// Waits until Redis has finished rehashing the tables of the connection's database, with its
/// cron sped up meanwhile. Returns the seconds waited, or `None` when `DEBUG HTSTATS` is refused
/// (redis-server needs `--enable-debug-command local`, as `scripts/bench.sh` starts it).
async fn wait_for_rehash(conn: &mut MultiplexedConnection) -> Result<Option<f64>> {
    let client: String = redis::cmd("CLIENT").arg("INFO").query_async(conn).await?;
    let db = client
        .split_whitespace()
        .find_map(|f| f.strip_prefix("db="))
        .unwrap_or("0")
        .to_owned();
    let rehashing = |stats: &str| stats.contains("rehashing target");
    let stats: redis::RedisResult<String> = redis::cmd("DEBUG")
        .arg("HTSTATS")
        .arg(&db)
        .query_async(conn)
        .await;
    let Ok(stats) = stats else {
        return Ok(None);
    };
    let started = Instant::now();
    if !rehashing(&stats) {
        return Ok(Some(0.0));
    }
    let hz: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("hz")
        .query_async(conn)
        .await?;
    let set_hz = |hz: String| redis::cmd("CONFIG").arg("SET").arg("hz").arg(hz).clone();
    set_hz(REHASH_HZ.to_string()).exec_async(conn).await?;
    let waited = async {
        while started.elapsed() < REHASH_LIMIT {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let stats: String = redis::cmd("DEBUG")
                .arg("HTSTATS")
                .arg(&db)
                .query_async(conn)
                .await?;
            if !rehashing(&stats) {
                break;
            }
        }
        Ok::<_, Error>(started.elapsed().as_secs_f64())
    }
    .await;
    if let Some(old) = hz.get(1) {
        set_hz(old.clone()).exec_async(conn).await?;
    }
    waited.map(Some)
}

async fn used_memory(conn: &mut MultiplexedConnection) -> Result<i64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Unexpected("INFO memory has no used_memory".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preloaded_keys_follow_lockds_layout() {
        let keys = Keys {
            prefix: "lockd".into(),
            run_id: "b123456".into(),
        };
        assert_eq!(keys.lock(42), "lockd:{b123456-held-0000042}");
        assert_eq!(format!("preload:{:036x}", 7).len(), 44);
        assert_eq!(format!("bench-preload-{:06}", 999_999).len(), 20);
    }
}
