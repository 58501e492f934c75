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
use support::{Lockd, RedisServer};
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
    for id in 0..CLIENTS {
        let endpoint = topology.client_proxies[id % topology.client_proxies.len()].url("http");
        let mut client = Client::new(
            id,
            endpoint,
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
    let injector = tokio::spawn(faults::inject(rng.fork(), rec.clone(), topology, until));
    for t in tasks {
        t.await.unwrap();
    }
    let topology = injector.await.unwrap();
    println!(
        "history: {} calls on Session streams (by the odd-numbered clients; LOCKD_HISTORY_SESSIONS=off for none), {} KeepAlive and Session streams",
        session_calls.load(std::sync::atomic::Ordering::Relaxed),
        streams.load(std::sync::atomic::Ordering::Relaxed)
    );
    (rec.take(), topology)
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

/// Three lockd replicas on one durable Redis, under lockd kills, Redis pauses and restarts, and
/// proxy latency, resets and black-holes; then a shorter phase on one lockd with the embedded
/// backend (no lockd restarts there: its locks live in the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_faults_has_no_double_grant_or_sleeping_waiter() {
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
