//! lockd-bench: a load generator that measures lockd against plain redis-rs locking.
//!
//! Targets: `redis-direct` (redis-rs on multiplexed connections, the naive `SET NX` lock),
//! `lockd` (gRPC, Redis backend) and `lockd-memory` (gRPC, in-memory backend). Scenarios:
//! uncontended, contended, mixed, keepalive (lease renewals), memory, scale (held locks) and waiters (lockd's RSS). See
//! `lockd-bench --help` and `scripts/bench.sh`.

mod cli;
mod error;
mod memory;
mod procfs;
mod report;
mod scale;
mod scenario;
mod stats;
mod target;
mod waiters;

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser as _;

use crate::cli::{Args, Scenario, Target, format_duration};
use crate::error::{Error, Result};
use crate::procfs::Pids;
use crate::report::{Report, megabytes, micros, thousands};
use crate::scenario::Plan;
use crate::target::Session;

/// Pause between runs, so that cancelled waits and their streams are gone before the next.
const BETWEEN_RUNS: Duration = Duration::from_millis(100);

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match bench(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where `target` is reached, from the options.
fn address(args: &Args, target: Target) -> Result<&str> {
    let (addr, flag) = match target {
        Target::RedisDirect => (&args.redis_url, "--redis-url"),
        Target::Lockd | Target::LockdSession => (&args.lockd_addr, "--lockd-addr"),
        Target::LockdMemory => (&args.lockd_memory_addr, "--lockd-memory-addr"),
        Target::Etcd => (&args.etcd_addr, "--etcd-addr"),
    };
    addr.as_deref()
        .ok_or_else(|| Error::Usage(format!("--target {} needs {flag}", target.name())))
}

async fn bench(args: Args) -> Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) {
        return Err(Error::Usage("--clients needs positive numbers".into()));
    }
    let targets = args.targets();
    let scenarios = args.scenarios();
    if scenarios.contains(&Scenario::Memory) && args.redis_url.is_none() {
        return Err(Error::Usage(
            "--scenario memory reads INFO memory: it needs --redis-url".into(),
        ));
    }
    if scenarios.contains(&Scenario::Scale) && args.redis_url.is_none() {
        return Err(Error::Usage(
            "--scenario scale writes its held locks into Redis: it needs --redis-url".into(),
        ));
    }
    if args.scale_clients == 0 || args.waiters == 0 {
        return Err(Error::Usage(
            "--scale-clients and --waiters need positive numbers".into(),
        ));
    }
    let pids = Pids::from_args(&args);
    let program = std::env::args()
        .next()
        .unwrap_or_else(|| "lockd-bench".to_owned());
    let command = args.reproduce(&program);
    let run_id = run_id();
    eprintln!("lockd-bench: {command}");

    let mut sessions = Vec::new();
    for &target in &targets {
        let addr = address(&args, target)?;
        sessions.push(Session::connect(target, addr, args.connections, args.poll_interval).await?);
    }
    let plan = Plan {
        warmup: args.warmup,
        duration: args.duration,
        ops: args.ops,
        ttl: args.ttl,
        wait_timeout: args.wait_timeout,
    };

    let load = [
        Scenario::Uncontended,
        Scenario::Contended,
        Scenario::Mixed,
        Scenario::Keepalive,
    ];
    let mut runs = Vec::new();
    for &scenario in scenarios.iter().filter(|s| load.contains(s)) {
        for &clients in &args.clients {
            // Per target, its runs at this level; the median one is reported.
            let mut repeats: Vec<Vec<scenario::RunResult>> =
                sessions.iter().map(|_| Vec::new()).collect();
            for _ in 0..args.repeat {
                for (session, repeats) in sessions.iter().zip(&mut repeats) {
                    if session.target() == Target::Etcd
                        && !matches!(scenario, Scenario::Uncontended | Scenario::Contended)
                    {
                        continue;
                    }
                    let r = scenario::run(
                        scenario,
                        session,
                        args.connections,
                        clients,
                        &plan,
                        &run_id,
                        &pids.serving(session.target()),
                    )
                    .await?;
                    let rpc = if scenario == Scenario::Keepalive {
                        "renew"
                    } else {
                        "acquire"
                    };
                    let p99 = r
                        .latency_of(rpc)
                        .map_or_else(|| "-".to_owned(), |l| micros(l.p99_us));
                    eprintln!(
                        "[{}] {:<12} clients={:<5} {:>9} ops/s  {rpc} p99 {:>8}  errors {}  \
                     server CPU {}",
                        scenario.name(),
                        session.target().name(),
                        clients,
                        thousands(r.ops_per_second),
                        p99,
                        r.errors.values().sum::<u64>() + r.unexpected,
                        r.server_us_per_op()
                            .map_or_else(|| "-".to_owned(), |us| format!("{}/op", micros(us))),
                    );
                    repeats.push(r);
                    tokio::time::sleep(BETWEEN_RUNS).await;
                }
            }
            runs.extend(repeats.into_iter().filter_map(median_run));
        }
    }

    let timed = scenarios
        .iter()
        .any(|s| load.contains(s) || *s == Scenario::Scale);
    let mut notes = Vec::new();
    if timed {
        notes.extend(load_notes(&args));
    }
    if scenarios.contains(&Scenario::Waiters) {
        notes.push(
            "waiters: RSS is VmRSS of /proc/<pid>/status, read once lockd has been quiet (CPU \
             and RSS unchanged) for 0.75 s; 'per call' = (RSS open - RSS before) / open calls."
                .to_owned(),
        );
    }
    let mut memory = Vec::new();
    if scenarios.contains(&Scenario::Memory) {
        let url = args.redis_url.as_deref().unwrap_or_default();
        for session in &sessions {
            if session.target() == Target::LockdMemory {
                notes.push("memory: not measured for lockd-memory (no Redis).".to_owned());
                continue;
            }
            if matches!(session.target(), Target::LockdSession | Target::Etcd) {
                // The same layout in the same Redis as the lockd target (plus the renewer field).
                continue;
            }
            let m = memory::run(session, url, args.memory_locks, &run_id).await?;
            eprintln!(
                "[memory] {:<12} {:.0} bytes per held lock, {:.0} bytes per released resource",
                session.target().name(),
                m.bytes_per_held_lock,
                m.bytes_per_released_resource
            );
            memory.push(m);
        }
        if targets.contains(&Target::Lockd) {
            notes.push(
                "memory: --redis-url must be the Redis the lockd target uses, or its figures \
                 are meaningless (check 'keys' above: 1 per held lock, since the measured leases \
                 are long and unwatched, and 1 per released resource)."
                    .to_owned(),
            );
        }
    }

    let mut scale = None;
    if scenarios.contains(&Scenario::Scale) {
        let opts = scale::Options {
            redis_url: args.redis_url.clone().unwrap_or_default(),
            key_prefix: args.key_prefix.clone(),
            levels: args.scale_locks.clone(),
            clients: args.scale_clients,
            connections: args.connections,
        };
        let (scale_runs, result) = scale::run(&sessions, &opts, &plan, &run_id, &pids).await?;
        runs.extend(scale_runs);
        scale = Some(result);
        if targets.contains(&Target::LockdMemory) {
            notes.push(
                "scale: not run for lockd-memory (its locks live in its own process, where \
                 the bench cannot pre-load them)."
                    .to_owned(),
            );
        }
        if targets.contains(&Target::Lockd) {
            notes.push(format!(
                "scale: the held locks are written straight into Redis in lockd's layout \
                 (hash {}:{{<resource>}} with t, o, f, a and a TTL; a lease that long needs no :fence counter), \
                 then deleted; --key-prefix must be lockd's.",
                args.key_prefix
            ));
        }
    }

    let mut waiters = Vec::new();
    if scenarios.contains(&Scenario::Waiters) {
        let mut kinds = args.waiter_kinds.clone();
        kinds.sort();
        kinds.dedup();
        for &target in targets
            .iter()
            .filter(|t| !matches!(t, Target::RedisDirect | Target::LockdSession | Target::Etcd))
        {
            let Some(server) = pids.server(target) else {
                notes.push(format!(
                    "waiters: not run for {}: its RSS needs --{}-pid.",
                    target.name(),
                    target.name()
                ));
                continue;
            };
            let opts = waiters::Options {
                address: address(&args, target)?.to_owned(),
                calls: args.waiters,
                connections: args.waiter_connections,
                wait: args.waiter_wait,
            };
            for &kind in &kinds {
                let w = waiters::run(target, server, kind, &opts, &run_id).await?;
                eprintln!(
                    "[waiters] {:<12} {:<17} {}/{} open: RSS {} before, {} open, {} after \
                     ({:.0} bytes per call){}",
                    target.name(),
                    kind.describe(),
                    w.open,
                    w.calls,
                    megabytes(w.rss_before),
                    megabytes(w.rss_open),
                    megabytes(w.rss_after),
                    w.bytes_per_call,
                    if w.errors > 0 {
                        format!(", {} errors", w.errors)
                    } else {
                        String::new()
                    },
                );
                waiters.push(w);
                tokio::time::sleep(BETWEEN_RUNS).await;
            }
        }
        if targets.contains(&Target::RedisDirect) {
            notes.push("waiters: not run for redis-direct (no server of its own).".to_owned());
        }
    }
    if pids.is_empty() {
        notes.push(
            "server CPU per op: not measured (pass --redis-pid, --lockd-pid, \
             --lockd-memory-pid)."
                .to_owned(),
        );
    } else {
        notes.push(
            "server CPU per op: utime + stime of /proc/<pid>/stat (10 ms ticks) of the \
             processes that serve the target (redis-direct: redis; lockd: lockd + redis; \
             lockd-memory: itself) over the measured window, divided by the measured ops."
                .to_owned(),
        );
    }

    let report = Report::new(command, run_id, runs, memory, scale, waiters, notes);
    let table = report.table();
    if args.json {
        eprint!("{table}");
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Definitions and caveats of the timed scenarios.
/// The run with the median ops/s (the upper one of an even count), or `None` for no runs.
fn median_run(mut runs: Vec<scenario::RunResult>) -> Option<scenario::RunResult> {
    runs.sort_by(|a, b| a.ops_per_second.total_cmp(&b.ops_per_second));
    let mid = runs.len() / 2;
    (mid < runs.len()).then(|| runs.swap_remove(mid))
}

fn load_notes(args: &Args) -> Vec<String> {
    let mut notes = vec![format!(
        "{} run(s) per scenario, concurrency and target, targets interleaved; with more than \
         one, each row is the run with the median ops/s.",
        args.repeat
    )];
    notes.extend([
        "keepalive: each client holds one lease and renews it back-to-back, one renewal in \
         flight: lockd, an empty heartbeat on the client's own KeepAlive stream (opened during \
         the warm-up) and its reply; redis-direct, a compare-and-PEXPIRE script (EVALSHA). A \
         reply that does not say OK is counted as an error (renew_lost)."
            .to_owned(),
        "lockd Acquire requests use the defaults of the newer fields: a plain mutex (limit 0), \
         non-fair waiting, no minimum hold on Release."
            .to_owned(),
        "lockd-session: the same lockd, with every Acquire and Release on one Session stream \
         per connection (shared by that connection's clients, replies routed by request id); \
         its leases are bound to the session."
            .to_owned(),
        "etcd: v3lock Lock (blocking; with no wait, a 1 s deadline) and Unlock, each client \
         holding its locks with a lease of its own granted on first use; only uncontended and \
         contended run against it. Its server CPU is etcd's alone."
            .to_owned(),
        "latency is measured by the load generator, per call, from send to reply; ops/s counts \
         operations completing inside the measured window."
            .to_owned(),
        format!(
            "contended redis-direct is the naive baseline: SET NX retried every {} until \
             wait-timeout, with no queue and no fairness.",
            format_duration(args.poll_interval)
        ),
        "contended gaps: 'from Release reply' = next holder's Acquire reply minus the previous \
         holder's Release reply (both stamped in the load generator, negative counted as 0); \
         'from Release sent' also includes the Release round trip."
            .to_owned(),
        format!(
            "{} connections per target (HTTP/2 channels for lockd, multiplexed connections for \
             redis-direct); client i uses connection i mod {}.",
            args.connections, args.connections
        ),
    ]);
    notes
}

/// A short prefix for this invocation's resource names, so runs never share a lock.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "b{:06x}",
        (u64::from(nanos) ^ u64::from(std::process::id()) << 8) & 0xff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn run_at(ops_per_second: f64) -> scenario::RunResult {
        scenario::RunResult {
            scenario: Scenario::Uncontended,
            target: Target::Lockd,
            clients: 16,
            connections: 4,
            elapsed_s: 1.0,
            ops: 0,
            ops_per_second,
            latency: Vec::new(),
            errors: BTreeMap::new(),
            first_error: None,
            unexpected: 0,
            contention: None,
            server_cpu: Vec::new(),
            held_locks: None,
            scale_repeat: false,
        }
    }

    #[test]
    fn the_median_run_by_ops_per_second_is_reported() {
        let runs = vec![run_at(300.0), run_at(100.0), run_at(200.0)];
        assert_eq!(median_run(runs).unwrap().ops_per_second, 200.0);
        assert_eq!(median_run(vec![run_at(7.0)]).unwrap().ops_per_second, 7.0);
        assert!(median_run(Vec::new()).is_none());
    }
}
