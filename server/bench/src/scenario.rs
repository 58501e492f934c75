//! The load scenarios: uncontended, contended, mixed and keepalive. Each run spawns one task per client,
//! each with one request in flight, and merges what the tasks measured.
//!
//! Timing: a run warms up for `warmup`, then measures until `duration` has passed (or `ops`
//! operations have completed). A call counts when it *completes* inside the measured window.
//! Waits still blocked when the window closes are cancelled (the contended scenario); other
//! calls in flight finish but do not count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::{Scenario, Target};
use crate::error::Result;
use crate::procfs::{self, CpuUse, Process};
use crate::stats::{self, Latency, Recorder};
use crate::target::{Client, Session};

/// A run in `--ops` mode stops after this long even if the count is not reached.
const OPS_MODE_LIMIT: Duration = Duration::from_secs(600);

/// Pause after a failed call, so that a target that is down is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(5);

/// Resources held for the whole mixed run, so that half of its reads find a holder.
const MIXED_HELD: usize = 16;

/// How long a run lasts and what its operations look like.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Unmeasured time at the start.
    pub warmup: Duration,
    /// Measured time (ignored when `ops` is set).
    pub duration: Duration,
    /// Measured operations instead of a duration.
    pub ops: Option<u64>,
    /// TTL of every lock.
    pub ttl: Duration,
    /// wait_timeout of the contended scenario's Acquire.
    pub wait_timeout: Duration,
}

/// The measured window of one run, shared by its workers.
struct Clock {
    from: Instant,
    end: Instant,
    ops: Option<u64>,
    done: AtomicU64,
    /// When the `ops`-th operation completed.
    finished: Mutex<Option<Instant>>,
    /// Cancelled when the window closes.
    stop: CancellationToken,
}

impl Clock {
    fn start(plan: &Plan) -> Arc<Self> {
        let from = Instant::now() + plan.warmup;
        let end = from + plan.ops.map_or(plan.duration, |_| OPS_MODE_LIMIT);
        let clock = Arc::new(Self {
            from,
            end,
            ops: plan.ops,
            done: AtomicU64::new(0),
            finished: Mutex::new(None),
            stop: CancellationToken::new(),
        });
        let stop = clock.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(end) => stop.cancel(),
                () = stop.cancelled() => {}
            }
        });
        clock
    }

    fn is_over(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Whether a call completing at `at` is measured.
    fn counts(&self, at: Instant) -> bool {
        at >= self.from && at <= self.end && !self.stop.is_cancelled()
    }

    /// Whether an operation completing at `at` is measured; in `--ops` mode, claims one of the
    /// operations and closes the window on the last one.
    fn op_done(&self, at: Instant) -> bool {
        if !self.counts(at) {
            return false;
        }
        let Some(limit) = self.ops else {
            return true;
        };
        let n = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if n == limit {
            *self.finished.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
            self.stop.cancel();
        }
        n <= limit
    }

    /// The end of the measured window: the last counted operation in `--ops` mode.
    fn window_end(&self) -> Instant {
        self.finished
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unwrap_or(self.end)
            .min(self.end)
    }

    fn elapsed(&self) -> Duration {
        self.window_end().saturating_duration_since(self.from)
    }
}

/// The outcome of one (scenario, target, concurrency) run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// The scenario.
    pub scenario: Scenario,
    /// The target.
    pub target: Target,
    /// Concurrent clients.
    pub clients: usize,
    /// Connections the clients were spread over.
    pub connections: u32,
    /// Measured time, in seconds.
    pub elapsed_s: f64,
    /// Measured operations (see the scenario for what one operation is).
    pub ops: u64,
    /// Operations per second.
    pub ops_per_second: f64,
    /// Per-RPC latencies, and `op` for a whole operation.
    pub latency: Vec<Latency>,
    /// Failed calls per RPC.
    pub errors: BTreeMap<String, u64>,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Replies the scenario did not expect (an own lock found held, a release that freed
    /// nothing).
    pub unexpected: u64,
    /// The contended scenario's hand-off figures.
    pub contention: Option<Contention>,
    /// CPU time of the server processes inside the measured window (those with a known pid).
    pub server_cpu: Vec<CpuUse>,
    /// The scale scenario: locks held in Redis (pre-loaded) during this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_locks: Option<u64>,
    /// The scale scenario: this run repeats the smallest level, after the largest.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub scale_repeat: bool,
}

impl RunResult {
    fn new(
        scenario: Scenario,
        session: &Session,
        clients: usize,
        connections: u32,
        clock: &Clock,
        rec: &Recorder,
    ) -> Self {
        let elapsed = clock.elapsed();
        let ops = rec.count("op");
        Self {
            scenario,
            target: session.target(),
            clients,
            connections,
            elapsed_s: elapsed.as_secs_f64(),
            ops,
            ops_per_second: ops as f64 / elapsed.as_secs_f64().max(1e-9),
            latency: rec.summaries(elapsed),
            errors: rec
                .errors
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            first_error: rec.first_error.clone(),
            unexpected: rec.unexpected,
            contention: None,
            server_cpu: Vec::new(),
            held_locks: None,
            scale_repeat: false,
        }
    }

    /// CPU microseconds per operation of all the server processes together, if measured.
    pub fn server_us_per_op(&self) -> Option<f64> {
        (!self.server_cpu.is_empty()).then(|| self.server_cpu.iter().map(|c| c.us_per_op).sum())
    }

    /// The latency summary of `name`, if it was measured.
    pub fn latency_of(&self, name: &str) -> Option<&Latency> {
        self.latency.iter().find(|l| l.name == name)
    }
}

/// How the lock passed between clients in the contended scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Contention {
    /// Grants inside the window.
    pub acquisitions: u64,
    /// Grants to a client other than the previous holder.
    pub handoffs_to_other: u64,
    /// `handoffs_to_other` per second.
    pub handoffs_per_second: f64,
    /// From the previous holder's Release *reply* to the next (other) holder's Acquire reply,
    /// both as the load generator saw them. Negative gaps (the next grant was seen before the
    /// release reply) count as 0 and are counted in `acquired_before_release_reply`.
    pub gap_from_release_reply: Option<Latency>,
    /// From the moment the previous holder *sent* its Release to the next holder's Acquire
    /// reply: the full hand-off cost, including the Release round trip.
    pub gap_from_release_send: Option<Latency>,
    /// Hand-offs whose grant arrived before the previous holder saw its Release reply.
    pub acquired_before_release_reply: u64,
    /// Blocking Acquires that ended without the lock (wait_timeout passed).
    pub wait_timeouts: u64,
    /// Clients that got the lock at least once inside the window.
    pub clients_served: usize,
    /// Fewest grants to one client inside the window.
    pub min_per_client: u64,
    /// Most grants to one client inside the window.
    pub max_per_client: u64,
}

/// Contended runs so far in this invocation, to give each its own resource.
static CONTENDED_RUNS: AtomicU64 = AtomicU64::new(0);

/// A resource name unique to this invocation, scenario, concurrency level and client.
fn resource(run_id: &str, tag: &str, clients: usize, i: usize) -> String {
    format!("{run_id}-{tag}{clients}-{i}")
}

/// Runs `scenario` (uncontended, contended, mixed or keepalive; scale runs the uncontended load) with
/// `clients` clients on `session`, and measures the CPU time `servers` use in the window.
///
/// # Errors
/// Fails when a worker panics, or the mixed scenario cannot take its held resources.
pub async fn run(
    scenario: Scenario,
    session: &Session,
    connections: u32,
    clients: usize,
    plan: &Plan,
    run_id: &str,
    servers: &[Process],
) -> Result<RunResult> {
    let clock = Clock::start(plan);
    let probe = {
        let (clock, servers) = (clock.clone(), servers.to_vec());
        tokio::spawn(async move {
            tokio::time::sleep_until(clock.from).await;
            let before = procfs::cpu_snapshot(&servers);
            clock.stop.cancelled().await;
            (before, procfs::cpu_snapshot(&servers))
        })
    };
    let mut result = match scenario {
        Scenario::Contended => contended(session, connections, clients, plan, run_id, &clock).await,
        Scenario::Mixed => mixed(session, connections, clients, plan, run_id, &clock).await,
        Scenario::Keepalive => keepalive(session, connections, clients, plan, run_id, &clock).await,
        Scenario::Scale => {
            let mut r = uncontended(session, connections, clients, plan, run_id, &clock, "s").await;
            if let Ok(r) = &mut r {
                r.scenario = Scenario::Scale;
            }
            r
        }
        _ => uncontended(session, connections, clients, plan, run_id, &clock, "u").await,
    };
    clock.stop.cancel();
    let (before, after) = probe.await?;
    if let Ok(r) = &mut result {
        r.server_cpu = procfs::cpu_between(&before, &after, r.ops);
    }
    result
}

/// One operation = Acquire (no wait) then Release, each client on its own resource.
async fn uncontended(
    session: &Session,
    connections: u32,
    clients: usize,
    plan: &Plan,
    run_id: &str,
    clock: &Arc<Clock>,
    tag: &str,
) -> Result<RunResult> {
    let mut set = JoinSet::new();
    for i in 0..clients {
        let mut client = session.client(i);
        let clock = clock.clone();
        let res = resource(run_id, tag, clients, i);
        let ttl = plan.ttl;
        set.spawn(async move {
            let mut rec = Recorder::default();
            while !clock.is_over() {
                lock_unlock(&mut client, &res, ttl, &clock, &mut rec).await;
            }
            rec
        });
    }
    let rec = join(set).await?;
    Ok(RunResult::new(
        Scenario::Uncontended,
        session,
        clients,
        connections,
        clock,
        &rec,
    ))
}

/// Takes the client's own (uncontended) resource without waiting. A refusal or an error is
/// recorded and followed by a short pause; the caller then moves on.
async fn take_own(
    client: &mut Client,
    res: &str,
    ttl: Duration,
    rec: &mut Recorder,
) -> Option<String> {
    match client.acquire(res, ttl, None).await {
        Ok(Some(token)) => Some(token),
        Ok(None) => {
            rec.unexpected += 1;
            tokio::time::sleep(ERROR_PAUSE).await;
            None
        }
        Err(e) => {
            rec.error("acquire", &e);
            tokio::time::sleep(ERROR_PAUSE).await;
            None
        }
    }
}

/// Acquire (no wait) then Release of `res`, recorded as `acquire`, `release` and `op`.
async fn lock_unlock(
    client: &mut Client,
    res: &str,
    ttl: Duration,
    clock: &Clock,
    rec: &mut Recorder,
) {
    let t0 = Instant::now();
    let Some(token) = take_own(client, res, ttl, rec).await else {
        return;
    };
    let t1 = Instant::now();
    if clock.counts(t1) {
        rec.latency("acquire", t1 - t0);
    }
    match client.release(res, &token).await {
        Ok(true) => {}
        Ok(false) => rec.unexpected += 1,
        Err(e) => {
            rec.error("release", &e);
            tokio::time::sleep(ERROR_PAUSE).await;
            return;
        }
    }
    let t2 = Instant::now();
    if clock.counts(t2) {
        rec.latency("release", t2 - t1);
    }
    if clock.op_done(t2) {
        rec.latency("op", t2 - t0);
    }
}

/// One grant, as its holder saw it.
#[derive(Debug, Clone, Copy)]
struct Grant {
    /// Order of the grant: taken while holding the lock, so grants are numbered in the order
    /// they happened.
    seq: u64,
    client: usize,
    /// When the Acquire reply arrived.
    acquired: Instant,
    /// When the Release was sent (right after `acquired`: the lock is held for no time).
    release_sent: Instant,
    /// When the Release reply arrived, if it succeeded.
    release_replied: Option<Instant>,
}

/// One operation = a blocking Acquire of the one shared resource, then its Release.
async fn contended(
    session: &Session,
    connections: u32,
    clients: usize,
    plan: &Plan,
    run_id: &str,
    clock: &Arc<Clock>,
) -> Result<RunResult> {
    // A resource of its own per run: a wait cancelled as the window closes may still have been
    // granted (a SET NX, or an Acquire, answered after the caller gave up), and that lease would
    // block the next run on the same resource for its whole TTL.
    let run = CONTENDED_RUNS.fetch_add(1, Ordering::Relaxed);
    let res: Arc<str> = resource(run_id, &format!("c{run}-"), clients, 0).into();
    let seq = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for i in 0..clients {
        let mut client = session.client(i);
        let (clock, res, seq) = (clock.clone(), res.clone(), seq.clone());
        let (ttl, wait) = (plan.ttl, plan.wait_timeout);
        set.spawn(async move {
            let mut rec = Recorder::default();
            let mut grants = Vec::new();
            let mut timeouts = 0;
            while !clock.is_over() {
                let t0 = Instant::now();
                let acquired = tokio::select! {
                    r = client.acquire(&res, ttl, Some(wait)) => r,
                    () = clock.stop.cancelled() => break,
                };
                let t1 = Instant::now();
                let token = match acquired {
                    Ok(Some(token)) => token,
                    Ok(None) => {
                        timeouts += 1;
                        continue;
                    }
                    Err(e) => {
                        rec.error("acquire", &e);
                        tokio::time::sleep(ERROR_PAUSE).await;
                        continue;
                    }
                };
                let n = seq.fetch_add(1, Ordering::Relaxed);
                if clock.counts(t1) {
                    rec.latency("acquire", t1 - t0);
                }
                let sent = Instant::now();
                let released = client.release(&res, &token).await;
                let t2 = Instant::now();
                let release_replied = match released {
                    Ok(true) => Some(t2),
                    Ok(false) => {
                        rec.unexpected += 1;
                        None
                    }
                    Err(e) => {
                        rec.error("release", &e);
                        None
                    }
                };
                grants.push(Grant {
                    seq: n,
                    client: i,
                    acquired: t1,
                    release_sent: sent,
                    release_replied,
                });
                if release_replied.is_some() && clock.counts(t2) {
                    rec.latency("release", t2 - sent);
                }
                if clock.op_done(t2) {
                    rec.latency("op", t2 - t0);
                }
            }
            (rec, grants, timeouts)
        });
    }
    let mut rec = Recorder::default();
    let mut grants = Vec::new();
    let mut timeouts = 0;
    while let Some(joined) = set.join_next().await {
        let (r, g, t) = joined?;
        rec.merge(r);
        grants.extend(g);
        timeouts += t;
    }
    let mut result = RunResult::new(
        Scenario::Contended,
        session,
        clients,
        connections,
        clock,
        &rec,
    );
    result.contention = Some(handoffs(
        grants,
        clients,
        timeouts,
        clock.from,
        clock.window_end(),
    ));
    Ok(result)
}

/// Pairs each grant with the one before it to measure hand-offs inside `[from, to]`.
fn handoffs(
    mut grants: Vec<Grant>,
    clients: usize,
    wait_timeouts: u64,
    from: Instant,
    to: Instant,
) -> Contention {
    grants.sort_by_key(|g| g.seq);
    let elapsed = to.saturating_duration_since(from);
    let inside = |at: Instant| at >= from && at <= to;
    let mut per_client = vec![0_u64; clients];
    let mut acquisitions = 0;
    for g in grants.iter().filter(|g| inside(g.acquired)) {
        acquisitions += 1;
        per_client[g.client] += 1;
    }
    let mut from_reply = stats::histogram();
    let mut from_send = stats::histogram();
    let mut handoffs_to_other = 0;
    let mut early = 0;
    for pair in grants.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        let consecutive = next.seq == prev.seq + 1;
        if !consecutive || prev.client == next.client || !inside(next.acquired) {
            continue;
        }
        if prev.release_sent < from {
            continue;
        }
        handoffs_to_other += 1;
        stats::record(
            &mut from_send,
            next.acquired.saturating_duration_since(prev.release_sent),
        );
        if let Some(replied) = prev.release_replied {
            if next.acquired < replied {
                early += 1;
            }
            stats::record(
                &mut from_reply,
                next.acquired.saturating_duration_since(replied),
            );
        }
    }
    let summary = |name: &str, h: &hdrhistogram::Histogram<u64>| {
        (!h.is_empty()).then(|| Latency::of(name, h, elapsed))
    };
    Contention {
        acquisitions,
        handoffs_to_other,
        handoffs_per_second: handoffs_to_other as f64 / elapsed.as_secs_f64().max(1e-9),
        gap_from_release_reply: summary("gap_from_release_reply", &from_reply),
        gap_from_release_send: summary("gap_from_release_send", &from_send),
        acquired_before_release_reply: early,
        wait_timeouts,
        clients_served: per_client.iter().filter(|n| **n > 0).count(),
        min_per_client: per_client.iter().copied().min().unwrap_or(0),
        max_per_client: per_client.iter().copied().max().unwrap_or(0),
    }
}

/// One operation = IsLocked (40%) or GetOwner (40%) of a random resource, or Acquire + Release
/// of the client's own resource (20%). Half the reads go to one of 16 resources held for the
/// whole run, half to the clients' own resources (usually free).
async fn mixed(
    session: &Session,
    connections: u32,
    clients: usize,
    plan: &Plan,
    run_id: &str,
    clock: &Arc<Clock>,
) -> Result<RunResult> {
    let mut setup = session.client(clients);
    let held: Vec<String> = (0..MIXED_HELD)
        .map(|i| resource(run_id, "mh", clients, i))
        .collect();
    let hold_for = plan
        .ttl
        .max(plan.warmup + plan.duration + Duration::from_secs(60));
    let mut tokens = Vec::new();
    for r in &held {
        if let Some(t) = setup.acquire(r, hold_for, None).await? {
            tokens.push((r.clone(), t));
        }
    }
    let held = Arc::new(held);
    let mut set = JoinSet::new();
    for i in 0..clients {
        let mut client = session.client(i);
        let (clock, held) = (clock.clone(), held.clone());
        let own = resource(run_id, "m", clients, i);
        let run_id = run_id.to_owned();
        let ttl = plan.ttl;
        set.spawn(async move {
            let mut rec = Recorder::default();
            let mut rng = Rng::new(i as u64);
            while !clock.is_over() {
                let roll = rng.below(100);
                if roll >= 80 {
                    lock_unlock(&mut client, &own, ttl, &clock, &mut rec).await;
                    continue;
                }
                let target = if rng.below(2) == 0 {
                    held[rng.below(held.len() as u64) as usize].clone()
                } else {
                    resource(&run_id, "m", clients, rng.below(clients as u64) as usize)
                };
                let t0 = Instant::now();
                let (rpc, outcome) = if roll < 40 {
                    ("is_locked", client.is_locked(&target).await)
                } else {
                    ("get_owner", client.get_owner(&target).await)
                };
                let t1 = Instant::now();
                match outcome {
                    Ok(_) => {
                        if clock.counts(t1) {
                            rec.latency(rpc, t1 - t0);
                        }
                        if clock.op_done(t1) {
                            rec.latency("op", t1 - t0);
                        }
                    }
                    Err(e) => {
                        rec.error(rpc, &e);
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            rec
        });
    }
    let rec = join(set).await?;
    for (r, t) in &tokens {
        setup.release(r, t).await?;
    }
    Ok(RunResult::new(
        Scenario::Mixed,
        session,
        clients,
        connections,
        clock,
        &rec,
    ))
}

/// One operation = one renewal of the client's own held lease, its reply awaited before the
/// next: a heartbeat on the client's KeepAlive stream (lockd), or the compare-and-PEXPIRE
/// script (redis-direct). Each client takes its lease and opens its stream during the warm-up;
/// a renewal that reports the lease lost counts as an error (`renew_lost`), and the client
/// takes a new lease. At the end the leases are released (lockd: through the stream).
async fn keepalive(
    session: &Session,
    connections: u32,
    clients: usize,
    plan: &Plan,
    run_id: &str,
    clock: &Arc<Clock>,
) -> Result<RunResult> {
    let mut set = JoinSet::new();
    for i in 0..clients {
        let mut client = session.client(i);
        let clock = clock.clone();
        let res = resource(run_id, "k", clients, i);
        let ttl = plan.ttl;
        set.spawn(async move {
            let mut rec = Recorder::default();
            while !clock.is_over() {
                let Some(token) = take_own(&mut client, &res, ttl, &mut rec).await else {
                    continue;
                };
                let mut renewal = match client.keep_alive(&res, &token, ttl).await {
                    Ok(r) => r,
                    Err(e) => {
                        rec.error("keepalive_open", &e);
                        let _ = client.release(&res, &token).await;
                        tokio::time::sleep(ERROR_PAUSE).await;
                        continue;
                    }
                };
                let mut held = true;
                while held && !clock.is_over() {
                    let t0 = Instant::now();
                    let renewed = renewal.renew().await;
                    let t1 = Instant::now();
                    match renewed {
                        Ok(true) => {
                            if clock.counts(t1) {
                                rec.latency("renew", t1 - t0);
                            }
                            if clock.op_done(t1) {
                                rec.latency("op", t1 - t0);
                            }
                        }
                        Ok(false) => {
                            *rec.errors.entry("renew_lost").or_default() += 1;
                            if rec.first_error.is_none() {
                                rec.first_error = Some(format!("renew: lease on {res} lost"));
                            }
                            held = false;
                        }
                        Err(e) => {
                            rec.error("renew", &e);
                            held = false;
                        }
                    }
                }
                // Free the lease: lockd through the stream, redis-direct with its script. A
                // lost lease has nothing to free (lockd closes the stream on drop).
                if held {
                    let released = if renewal.is_stream() {
                        renewal.release().await
                    } else {
                        client.release(&res, &token).await
                    };
                    match released {
                        Ok(true) => {}
                        Ok(false) => rec.unexpected += 1,
                        Err(e) => rec.error("release", &e),
                    }
                } else {
                    drop(renewal);
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
            rec
        });
    }
    let rec = join(set).await?;
    Ok(RunResult::new(
        Scenario::Keepalive,
        session,
        clients,
        connections,
        clock,
        &rec,
    ))
}

async fn join(mut set: JoinSet<Recorder>) -> Result<Recorder> {
    let mut rec = Recorder::default();
    while let Some(r) = set.join_next().await {
        rec.merge(r?);
    }
    Ok(rec)
}

/// xorshift64*: enough randomness to pick operations, without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoffs_pair_consecutive_grants_to_different_clients() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        let grant = |seq, client, at: u64| Grant {
            seq,
            client,
            acquired: ms(at),
            release_sent: ms(at),
            release_replied: Some(ms(at + 1)),
        };
        // 0 -> 1 same client (not a hand-off); 1 -> 2 and 2 -> 3 are hand-offs.
        let grants = vec![
            grant(3, 2, 10),
            grant(0, 1, 0),
            grant(1, 1, 2),
            grant(2, 0, 5),
        ];
        let c = handoffs(grants, 3, 0, t, ms(1000));
        assert_eq!(c.acquisitions, 4);
        assert_eq!(c.handoffs_to_other, 2);
        assert_eq!(c.clients_served, 3);
        assert_eq!((c.min_per_client, c.max_per_client), (1, 2));
        assert_eq!(c.acquired_before_release_reply, 0);
        let gap = c.gap_from_release_reply.unwrap();
        assert_eq!(gap.count, 2);
        assert!((gap.max_us - 4000.0).abs() < 10.0, "{}", gap.max_us);
    }

    #[test]
    fn rng_stays_below_its_bound() {
        let mut r = Rng::new(7);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            seen[r.below(5) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
