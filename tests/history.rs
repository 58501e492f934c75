//! The randomized history checker under faults: a black-box test of lockd's one promise, that a
//! lock is never held by two clients at once and a waiter never sleeps while the lock is free.
//!
//! Topology: one durable redis-server (append-only file, fsync on every write: without it a Redis
//! restart loses locks, and no lock service on that Redis could stay safe), three lockd replicas
//! on it, each reaching Redis through its own fault-injecting TCP proxy, and clients reaching
//! each lockd through another such proxy. Client tasks run random operations (seeded) and record
//! every call; a fault injector kills and restarts lockd, pauses and restarts Redis, and adds
//! latency, resets and black-holes to the proxies. The checker (`history/checker.rs`) then
//! judges the recorded history offline.
//!
//! `LOCKD_HISTORY_SEED` and `LOCKD_HISTORY_SECS` (default 60) replay or lengthen a run;
//! `scripts/history [SECS] [SEED]` runs a long one. Each run prints its seed and figures, and
//! writes the whole history to `$TMPDIR/lockd-history-<seed>-<phase>.txt` to read a violation
//! against.

// A test harness: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

#[path = "history/checker.rs"]
mod checker;
#[path = "history/faults.rs"]
mod faults;
#[path = "history/ha.rs"]
mod ha;
#[path = "history/model.rs"]
mod model;
#[path = "history/proxy.rs"]
mod proxy;
#[path = "history/session.rs"]
mod session;
#[path = "history/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use checker::{Kind, Report};
use faults::Topology;
use model::*;
use proxy::Proxy;
use support::{Cluster, Lockd, RedisServer, SentinelGroup};
use workload::{Client, Recorder, Resource, Rng};

const CLIENTS: usize = 12;
const LOCKDS: usize = 3;

fn resources() -> Vec<Resource> {
    let mut r: Vec<Resource> = (0..3)
        .map(|i| Resource {
            name: format!("history-mutex-{i}"),
            limit: 1,
        })
        .collect();
    r.push(Resource {
        name: "history-semaphore".into(),
        limit: 2,
    });
    r
}

/// `LOCKD_HISTORY_SESSIONS=off` makes every client use unary calls; by default every other
/// client sends its Acquire, Release and Extend calls on a Session stream.
fn sessions() -> bool {
    std::env::var("LOCKD_HISTORY_SESSIONS").map_or(true, |v| v != "off")
}

/// `LOCKD_HISTORY_HANDOVER=off` leaves KeepAlive stream hand-overs out of the workload, to look
/// past the violations they cause.
fn handover() -> bool {
    std::env::var("LOCKD_HISTORY_HANDOVER").map_or(true, |v| v != "off")
}

fn settings() -> (u64, u64) {
    let seed = std::env::var("LOCKD_HISTORY_SEED")
        .ok()
        .map(|s| s.trim().parse().expect("LOCKD_HISTORY_SEED: a u64"))
        .unwrap_or_else(|| {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        });
    let secs = std::env::var("LOCKD_HISTORY_SECS")
        .ok()
        .map(|s| s.trim().parse().expect("LOCKD_HISTORY_SECS: whole seconds"))
        .unwrap_or(60);
    (seed, secs)
}

async fn start_topology() -> Topology {
    let redis = RedisServer::start_durable().await;
    let mut lockds = Vec::new();
    let mut redis_proxies = Vec::new();
    let mut client_proxies = Vec::new();
    for i in 0..LOCKDS {
        let rp = Proxy::start(
            &format!("redis proxy of lockd {i}"),
            format!("127.0.0.1:{}", redis.port),
        )
        .await;
        let url = rp.url("redis");
        let lockd = Lockd::start_with(
            None,
            &[
                ("REDIS_URL", url.as_str()),
                ("LOCKD_REDIS_TIMEOUT", "500ms"),
                ("LOCKD_SHUTDOWN_GRACE", "1s"),
                // One Redis connection, so two script calls in flight: with four clients per
                // lockd, further calls go out in batches (--redis-batch), which the history
                // then covers.
                ("LOCKD_REDIS_POOL_SIZE", "1"),
            ],
        )
        .await;
        let cp = Proxy::start(&format!("client proxy of lockd {i}"), lockd.addr()).await;
        lockds.push(lockd);
        redis_proxies.push(rp);
        client_proxies.push(cp);
    }
    Topology {
        redis: Some(redis),
        lockds,
        redis_proxies,
        client_proxies,
    }
}

/// Runs the workload with faults for `secs` and returns the history and what is left running.
async fn run(seed: u64, secs: u64, topology: Topology) -> (History, Topology) {
    let endpoints: Vec<String> = topology
        .client_proxies
        .iter()
        .map(|p| p.url("http"))
        .collect();
    run_with(seed, secs, CLIENTS, endpoints, |rng, rec, until| {
        faults::inject(rng, rec, topology, until)
    })
    .await
}

/// Runs `clients` workload clients for `secs`, spread over `endpoints`, while `inject` (given
/// its own random stream, the recorder and the end time) injects faults; returns the history
/// and what `inject` returned.
async fn run_with<T, F, Fut>(
    seed: u64,
    secs: u64,
    clients: usize,
    endpoints: Vec<String>,
    inject: F,
) -> (History, T)
where
    F: FnOnce(Rng, Recorder, Instant) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut rng = Rng::new(seed);
    let resources = resources();
    let limits: Vec<(String, u32)> = resources
        .iter()
        .map(|r| (r.name.clone(), r.limit))
        .collect();
    let rec = Recorder::new(&limits);
    let until = Instant::now() + Duration::from_secs(secs);
    let streams = Arc::new(AtomicUsize::new(0));
    let session_calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in 0..clients {
        let mut client = Client::new(
            id,
            endpoints[id % endpoints.len()].clone(),
            rng.fork(),
            rec.clone(),
            resources.clone(),
            until,
            streams.clone(),
        );
        client.handover = handover();
        client.sessions = sessions() && id % 2 == 1;
        client.session_calls = session_calls.clone();
        tasks.push(tokio::spawn(client.run()));
    }
    let injector = tokio::spawn(inject(rng.fork(), rec.clone(), until));
    for t in tasks {
        t.await.unwrap();
    }
    let left = injector.await.unwrap();
    println!(
        "history: {} calls on Session streams (by the odd-numbered clients; LOCKD_HISTORY_SESSIONS=off for none), {} KeepAlive and Session streams",
        session_calls.load(std::sync::atomic::Ordering::Relaxed),
        streams.load(std::sync::atomic::Ordering::Relaxed)
    );
    (rec.take(), left)
}

/// The figures a run prints.
fn figures(seed: u64, secs: u64, h: &History, r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "history: seed {seed}, {secs} s, {} calls",
        h.calls.len()
    );
    let mut ops: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for c in &h.calls {
        let e = ops.entry(c.kind()).or_default();
        e.0 += 1;
        match c.outcome {
            Outcome::Granted(_) | Outcome::Released { .. } | Outcome::Sent => e.1 += 1,
            Outcome::Failed(_) => e.2 += 1,
            _ => {}
        }
    }
    let _ = writeln!(
        out,
        "  operations (calls / granted or done / unknown outcome):"
    );
    for (k, (n, ok, failed)) in &ops {
        let _ = writeln!(out, "    {k:32} {n:6} {ok:6} {failed:6}");
    }
    let mut faults: BTreeMap<&str, usize> = faults::KINDS.iter().map(|k| (*k, 0)).collect();
    for f in &h.faults {
        *faults.entry(f.kind).or_default() += 1;
    }
    let _ = writeln!(out, "  faults injected ({}):", h.faults.len());
    for (k, n) in &faults {
        let _ = writeln!(out, "    {k:32} {n:6}");
    }
    let _ = writeln!(out, "  leases believed by clients: {}", r.beliefs);
    let _ = writeln!(
        out,
        "  overlaps found: {} ({} after a KeepAlive stream hand-over, {} more with a KeepAlive stream broken by a fault)",
        r.count(Kind::Overlap),
        r.overlaps_after_handover,
        r.overlaps_with_broken_stream
    );
    let _ = writeln!(out, "  fencing violations: {}", r.count(Kind::Fencing));
    let _ = writeln!(
        out,
        "  sleeping waiters (free > {} ms): {} of {} waits judged",
        checker::WAKE_BOUND / MS,
        r.count(Kind::SleepingWaiter),
        r.waits_judged
    );
    if let Some((d, call)) = r.longest_unserved_free {
        let _ = writeln!(
            out,
            "  longest free stretch a waiter slept through outside faults: {} ms (call #{call})",
            d / MS
        );
    }
    let _ = match r.longest_wakeup {
        Some((d, call)) => writeln!(
            out,
            "  longest wake-up delay outside faults: {} ms (call #{call})",
            d / MS
        ),
        None => writeln!(out, "  longest wake-up delay: none observed"),
    };
    let _ = writeln!(
        out,
        "  late calls (> wait + {} ms, outside faults): {}",
        checker::CALL_GRACE / MS,
        r.count(Kind::LateCall)
    );
    out
}

/// Writes the whole history to a file, one line per call and fault, to read a violation against.
fn dump(seed: u64, label: &str, h: &History) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("lockd-history-{seed}-{label}.txt"));
    let mut out = String::new();
    for f in &h.faults {
        let _ = writeln!(
            out,
            "fault {} .. {} {} on {}",
            fmt_t(f.start),
            fmt_t(f.end),
            f.kind,
            f.target
        );
    }
    for c in &h.calls {
        let _ = writeln!(
            out,
            "#{} c{} {} {} .. {} {:?} -> {:?}",
            c.id,
            c.client,
            c.resource,
            fmt_t(c.send),
            fmt_t(c.reply),
            c.op,
            c.outcome
        );
    }
    std::fs::write(&path, out).unwrap();
    path
}

fn judge(seed: u64, secs: u64, label: &str, h: &History) -> Option<String> {
    let report = checker::check(h);
    let path = dump(seed, label, h);
    println!(
        "== {label}\n{}  history written to {}",
        figures(seed, secs, h, &report),
        path.display()
    );
    (!report.violations.is_empty()).then(|| {
        format!(
            "{label}: {} violations (seed {seed}; replay with LOCKD_HISTORY_SEED={seed} LOCKD_HISTORY_SECS={secs}):\n{}",
            report.violations.len(),
            report.describe()
        )
    })
}

/// The history tests run one at a time: each loads both CPUs, and the checker judges timing.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three lockd replicas on one durable Redis, under lockd kills, Redis pauses and restarts, and
/// proxy latency, resets and black-holes; then a shorter phase on one lockd with the embedded
/// backend (no lockd restarts there: its locks live in the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_faults_has_no_double_grant_or_sleeping_waiter() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (seed, secs) = settings();
    println!("history: seed {seed} (LOCKD_HISTORY_SEED), {secs} s (LOCKD_HISTORY_SECS)");
    let topology = start_topology().await;
    let (history, topology) = run(seed, secs, topology).await;
    drop(topology);
    let mut failures: Vec<String> = judge(seed, secs, "redis", &history).into_iter().collect();

    // The embedded backend: one lockd, client-side faults only.
    let mem_secs = (secs / 4).max(5);
    let lockd = Lockd::start_with(None, &[("LOCKD_SHUTDOWN_GRACE", "1s")]).await;
    let proxy = Proxy::start("client proxy of the memory lockd", lockd.addr()).await;
    let topology = Topology {
        redis: None,
        lockds: vec![lockd],
        redis_proxies: Vec::new(),
        client_proxies: vec![proxy],
    };
    let (history, topology) = run(seed ^ 0x6d65_6d6f_7279, mem_secs, topology).await;
    drop(topology);
    failures.extend(judge(seed, mem_secs, "memory", &history));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The length of each high-availability run: `LOCKD_HISTORY_HA_SECS`, default 30 (a failover,
/// the old master's demotion about 10 s later, its resync, and time to see service resume).
fn ha_secs() -> u64 {
    std::env::var("LOCKD_HISTORY_HA_SECS")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .expect("LOCKD_HISTORY_HA_SECS: whole seconds")
        })
        .unwrap_or(30)
}

/// Clients and lockd replicas of the high-availability runs.
const HA_CLIENTS: usize = 16;
const HA_LOCKDS: usize = 2;

/// Starts the lockd replicas on `env` (a Sentinel group's or a cluster's settings), with
/// replica acknowledgements when `acks`.
async fn ha_lockds(mut env: Vec<(String, String)>, acks: bool) -> Vec<Lockd> {
    env.push(("LOCKD_REDIS_TIMEOUT".into(), "500ms".into()));
    env.push(("LOCKD_SHUTDOWN_GRACE".into(), "1s".into()));
    // As in start_topology: batches form.
    env.push(("LOCKD_REDIS_POOL_SIZE".into(), "1".into()));
    if acks {
        env.push(("LOCKD_MIN_REPLICA_ACKS".into(), "1".into()));
        env.push(("LOCKD_REPLICA_ACK_TIMEOUT".into(), "200ms".into()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut lockds = Vec::new();
    for _ in 0..HA_LOCKDS {
        lockds.push(Lockd::start_with(None, &env).await);
    }
    lockds
}

/// Judges a high-availability run: with `overlaps_allowed` (no replica acknowledgements,
/// where a failover may lose a grant) double grants are counted, not failed; every other
/// violation fails.
fn judge_ha(seed: u64, secs: u64, label: &str, h: &History, overlaps_allowed: bool) -> Report {
    let report = checker::check(h);
    let path = dump(seed, label, h);
    let (outage, worst, resource) = ha::longest_outage(h);
    println!(
        "== {label}\n{}  longest time without service (no grant, extension or release): \
         {outage:.0} ms on all resources, {worst:.0} ms on one ({resource})\n  history \
         written to {}",
        figures(seed, secs, h, &report),
        path.display()
    );
    let failing: Vec<_> = report
        .violations
        .iter()
        .filter(|v| !(overlaps_allowed && v.kind == Kind::Overlap))
        .collect();
    assert!(
        failing.is_empty(),
        "{label}: {} violations (seed {seed}; replay with LOCKD_HISTORY_SEED={seed}):\n{}",
        failing.len(),
        report.describe()
    );
    report
}

async fn sentinel_failover_run(acks: bool) {
    let _one = ONE_AT_A_TIME.lock().await;
    let (seed, _) = settings();
    let secs = ha_secs();
    let label = if acks {
        "sentinel-acks"
    } else {
        "sentinel-no-acks"
    };
    println!("{label}: seed {seed}, {secs} s");
    let group = SentinelGroup::start().await;
    let lockds = ha_lockds(group.env(), acks).await;
    let endpoints = lockds.iter().map(Lockd::endpoint).collect();
    let (h, (_group, old)) = run_with(seed, secs, HA_CLIENTS, endpoints, |rng, rec, until| {
        ha::sentinel_failover(rng, rec, group, until)
    })
    .await;
    drop(lockds);
    let report = judge_ha(seed, secs, label, &h, !acks);
    let stale = old.stale_writes();
    println!(
        "  double grants: {}\n  writes on the old master: {} in all; {} after the switch \
         (+{} ms) and before its demotion; last write {:?} ms after the switch",
        report.count(Kind::Overlap),
        old.writes.len(),
        stale.len(),
        ha::STALE_MARGIN / 1000,
        old.last_write_after_switch_ms()
    );
    assert!(old.switched.is_some(), "no +switch-master seen");
    assert!(
        !old.writes.is_empty(),
        "no write seen on the old master before the failover: the check sees nothing"
    );
    assert!(
        stale.is_empty(),
        "{label}: lockd wrote to the demoted master after the switch: {stale:?}"
    );
}

/// Sentinel (a master, a replica, three sentinels), two lockd replicas and 16 clients; the
/// master fails over under load. With replica acknowledgements, no grant is lost: no double
/// grant. And lockd writes nothing to the old master once Sentinel switched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_with_replica_acks_has_no_double_grant_and_no_write_on_the_old_master() {
    sentinel_failover_run(true).await;
}

/// The same without replica acknowledgements: grants the replica had not received yet are lost
/// in the failover, so double grants are possible and counted; nothing else may go wrong, and
/// lockd still writes nothing to the old master once Sentinel switched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_without_replica_acks_writes_nothing_on_the_old_master() {
    sentinel_failover_run(false).await;
}

async fn cluster_kill_run(acks: bool) {
    let _one = ONE_AT_A_TIME.lock().await;
    let (seed, _) = settings();
    let secs = ha_secs();
    let label = if acks {
        "cluster-kill-acks"
    } else {
        "cluster-kill-no-acks"
    };
    println!("{label}: seed {seed}, {secs} s");
    let cluster = Cluster::start(3, 1).await;
    let lockds = ha_lockds(cluster.env(), acks).await;
    let endpoints = lockds.iter().map(Lockd::endpoint).collect();
    let (h, _cluster) = run_with(seed, secs, HA_CLIENTS, endpoints, |rng, rec, until| {
        ha::cluster_master_kill(rng, rec, cluster, until)
    })
    .await;
    drop(lockds);
    let report = judge_ha(seed, secs, label, &h, !acks);
    println!("  double grants: {}", report.count(Kind::Overlap));
}

/// A 3-master cluster with a replica each, two lockd replicas and 16 clients; the master that
/// holds a live lock is SIGKILLed and its replica takes over. With replica acknowledgements:
/// no double grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_kill_with_replica_acks_has_no_double_grant() {
    cluster_kill_run(true).await;
}

/// The same without replica acknowledgements: double grants are counted, nothing else may go
/// wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_kill_without_replica_acks_breaks_nothing_but_may_lose_grants() {
    cluster_kill_run(false).await;
}

/// A 3-master cluster, two lockd replicas and 16 clients; every slot of the master that holds
/// a live lock moves to another master (`redis-cli --cluster reshard`) while the clients use
/// it. Nothing is lost: no double grant, no sleeping waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reshard_under_load_loses_no_lock() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (seed, _) = settings();
    let secs = ha_secs().min(20);
    println!("cluster-reshard: seed {seed}, {secs} s");
    let cluster = Cluster::start(3, 0).await;
    let lockds = ha_lockds(cluster.env(), false).await;
    let endpoints = lockds.iter().map(Lockd::endpoint).collect();
    let (h, _cluster) = run_with(seed, secs, HA_CLIENTS, endpoints, |rng, rec, until| {
        ha::cluster_reshard(rng, rec, cluster, until)
    })
    .await;
    drop(lockds);
    judge_ha(seed, secs, "cluster-reshard", &h, false);
}
