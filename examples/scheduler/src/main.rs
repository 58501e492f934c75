//! `lockd-scheduler-example`: a small cron/interval scheduler whose instances share their jobs
//! through lockd.
//!
//! Start the same jobs on several instances: at every tick each instance tries the job's lock
//! with `run_exclusive`; the one that gets it runs the job's shell command, the others log
//! "skipping <job>: already running on <owner>". Each run keeps the lock for a minimum time
//! (`--min-hold`, by default 80% of the time to the next tick), so an instance whose clock or
//! timer is late by less than that finds the lock still held after a quick run instead of
//! running the tick a second time. The lock is bound to the instance's connection to lockd:
//! if the instance dies, lockd releases the lock at once and another instance takes over the
//! job at its next tick.
//!
//! ```sh
//! lockd-scheduler-example --endpoint http://127.0.0.1:50051 --instance sched-a \
//!   --job 'name=nightly-scan;cron=0 30 2 * * *;cmd=./scan.sh' \
//!   --job 'name=heartbeat;every=10s;min_hold=8s;cmd=echo "tick $LOCKD_TICK_MS"'
//! ```

mod job;
mod scheduler;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lockd_client::LockClient;

use crate::job::{Job, MinHold, parse_duration};
use crate::scheduler::Scheduler;

/// A cron/interval scheduler whose instances share their jobs through lockd: each tick of a job
/// runs on exactly one instance.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// lockd's address.
    #[arg(long, env = "LOCKD_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// The API key, for a lockd with an auth file (sent as `authorization: Bearer <key>`).
    #[arg(long, env = "LOCKD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// This instance's name, shown to the others when they skip a job. Default: <host>-<pid>.
    #[arg(long, env = "SCHEDULER_INSTANCE")]
    instance: Option<String>,
    /// A job (repeat for more): `name=<name>;cron=<sec min hour day month weekday>;cmd=<shell
    /// command>`, or `every=<duration>` instead of `cron=`; optional `ttl=` and `min_hold=`
    /// before `cmd=`, which comes last. The command gets LOCKD_JOB, LOCKD_TICK_MS,
    /// LOCKD_INSTANCE and LOCKD_FENCING_TOKEN.
    #[arg(long = "job", required = true, value_parser = str::parse::<Job>)]
    jobs: Vec<Job>,
    /// The lease TTL of jobs that give none; renewed while a job runs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ttl: Duration,
    /// How long a run keeps its lock at least, from the grant: a duration, or `auto` (80% of
    /// the time to the job's next tick).
    #[arg(long, default_value = "auto", value_parser = str::parse::<MinHold>)]
    min_hold: MinHold,
    /// Delays this instance's timer, to simulate a clock that is this far behind.
    #[arg(long, default_value_t = 0)]
    skew_ms: u64,
    /// A tick whose timer fires later than this is missed instead of run late.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    misfire: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(false)
        .init();
    let instance = args.instance.unwrap_or_else(default_instance);
    let mut builder = LockClient::builder(args.endpoint).owner(instance.clone());
    if let Some(key) = &args.api_key {
        builder = builder.api_key(key);
    }
    let client = match builder.connect_lazy() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "bad lockd endpoint or API key");
            return ExitCode::FAILURE;
        }
    };
    let scheduler = Arc::new(Scheduler {
        client,
        instance: instance.clone(),
        ttl: args.ttl,
        min_hold: args.min_hold,
        skew: Duration::from_millis(args.skew_ms),
        misfire: args.misfire,
        skips: Default::default(),
    });
    tracing::info!(%instance, jobs = args.jobs.len(), skew_ms = args.skew_ms, "scheduler started");
    tokio::select! {
        () = scheduler.run(args.jobs) => {}
        () = shutdown_signal() => tracing::info!("shutting down"),
    }
    ExitCode::SUCCESS
}

/// `<hostname>-<pid>`.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "scheduler".to_owned());
    format!("{host}-{}", std::process::id())
}

/// SIGINT or SIGTERM. Exiting drops the running jobs (killing their commands) and their lock
/// guards, whose lockd streams end, so lockd releases their locks.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
