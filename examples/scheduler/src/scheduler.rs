//! The scheduling loop: one task per job that sleeps until each tick, and one task per tick that
//! runs the job inside `run_exclusive`, so across all instances each tick runs at most once.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lockd_client::{Error, LockClient, Outcome};
use tokio::task::JoinSet;
use tokio::time::sleep;
use tracing::{info, warn};

use crate::job::{Job, MinHold};

/// What every job of this instance shares.
#[derive(Debug)]
pub struct Scheduler {
    /// Shared by all jobs and ticks: one connection to lockd.
    pub client: LockClient,
    /// This instance's name: the lock's owner, shown to the instances that skip a tick.
    pub instance: String,
    /// The lease TTL of jobs that give none: how long a crashed instance's lock could last if
    /// lockd did not release it when the instance's connection drops.
    pub ttl: Duration,
    /// The minimum hold of jobs that give none.
    pub min_hold: MinHold,
    /// How far behind this instance's timer runs (a clock-skew simulation).
    pub skew: Duration,
    /// A tick whose timer fires later than this is missed rather than run late, so a very late
    /// instance never competes after the minimum hold of the tick's run has passed.
    pub misfire: Duration,
    /// Ticks this instance skipped because another instance ran them, by job.
    pub skips: Skips,
}

/// A scheduler's own count of skipped ticks per job (lockd counts the same contended acquires
/// per owner in `lockd_contended_acquires_total`).
#[derive(Debug, Default)]
pub struct Skips(Mutex<HashMap<String, u64>>);

impl Skips {
    /// Counts one more skip of `job`; returns the job's total.
    pub fn count(&self, job: &str) -> u64 {
        let mut skips = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = skips.entry(job.to_owned()).or_default();
        *n += 1;
        *n
    }
}

impl Scheduler {
    /// Runs every job's schedule until there are no more ticks (for cron expressions with a
    /// year) or forever.
    pub async fn run(self: Arc<Self>, jobs: Vec<Job>) {
        let mut schedules = JoinSet::new();
        for job in jobs {
            schedules.spawn(self.clone().schedule(Arc::new(job)));
        }
        while schedules.join_next().await.is_some() {}
    }

    /// Sleeps until each tick of `job` (plus the skew) and starts its run on a task of its own,
    /// so a run that lasts longer than the interval never delays the next tick.
    async fn schedule(self: Arc<Self>, job: Arc<Job>) {
        let skew = chrono::Duration::from_std(self.skew).unwrap_or_default();
        // This instance's clock runs `skew` behind: it believes it is `now - skew`.
        let mut last = Utc::now() - skew;
        loop {
            let Some(tick) = job.schedule.after(last) else {
                info!(job = %job.name, "no more ticks");
                return;
            };
            last = tick;
            let fire_at = tick + skew;
            sleep((fire_at - Utc::now()).to_std().unwrap_or_default()).await;
            let late = (Utc::now() - fire_at).to_std().unwrap_or_default();
            if late > self.misfire {
                warn!(
                    "missed {} tick {}: woke {late:?} late",
                    job.name,
                    tick.timestamp_millis()
                );
                continue;
            }
            let next = job.schedule.after(tick);
            tokio::spawn(self.clone().run_tick(job.clone(), tick, next));
        }
    }

    /// Runs one tick of `job` if this instance gets the job's lock, and logs what happened.
    async fn run_tick(
        self: Arc<Self>,
        job: Arc<Job>,
        tick: DateTime<Utc>,
        next: Option<DateTime<Utc>>,
    ) {
        let ttl = job.ttl.unwrap_or(self.ttl);
        let min_hold = job.min_hold.unwrap_or(self.min_hold).resolve(tick, next);
        let tick = tick.timestamp_millis();
        // --- README example start ---
        let outcome = self
            .client
            .lock_options(&job.name)
            .ttl(ttl)
            .min_hold(min_hold) // kept after a quick run, so a late timer finds it held
            .owner(&self.instance)
            .run(|lease| run_command(&job, tick, &self.instance, lease.fencing_token))
            .await;
        match outcome {
            Ok(Outcome::Ran(Ok(status))) => info!("ran {} tick {tick}: {status}", job.name),
            Ok(Outcome::Ran(Err(error))) => warn!("could not start {}: {error}", job.name),
            Ok(Outcome::Skipped(holder)) => {
                let owner = holder.map_or_else(|| "?".to_owned(), |h| h.owner);
                let skipped = self.skips.count(&job.name);
                info!(
                    "skipping {}: already running on {owner} ({skipped} skipped)",
                    job.name
                );
            }
            // The lock could not be renewed: run_exclusive dropped the job, killing its process.
            Err(Error::LockLost { reason, .. }) => warn!("{} stopped: {reason}", job.name),
            Err(error) => warn!("could not run {}: {error}", job.name),
        }
        // --- README example end ---
    }
}

/// Runs the job's command with `sh -c`, telling it which tick it runs and with which fencing
/// token (`LOCKD_JOB`, `LOCKD_TICK_MS`, `LOCKD_INSTANCE`, `LOCKD_FENCING_TOKEN`). Dropping the
/// returned future kills the shell (not its own children: `exec` the real program).
async fn run_command(
    job: &Job,
    tick: i64,
    instance: &str,
    fencing_token: u64,
) -> std::io::Result<ExitStatus> {
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&job.command)
        .env("LOCKD_JOB", &job.name)
        .env("LOCKD_TICK_MS", tick.to_string())
        .env("LOCKD_INSTANCE", instance)
        .env("LOCKD_FENCING_TOKEN", fencing_token.to_string())
        .kill_on_drop(true)
        .status()
        .await
}
