//! `lockctl run`: a command under a lock, as flock(1) and `consul lock` run one.
//!
//! The lock is a [`lockd_client::LockGuard`], so it is renewed the way every Rust client renews
//! (a `KeepAlive` stream, a heartbeat at about a third of the TTL) and reports a loss at once.
//! The command runs in a process group of its own, so that a lost lock stops all of it (a shell
//! and what it started), not only its first process: SIGTERM to the group, SIGKILL after the
//! grace period. SIGINT, SIGTERM and SIGHUP sent to lockctl are passed on to the group, and
//! lockctl releases the lock once the command has exited.

use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::time::Duration;

use lockd_client::{LockGuard, TryLock};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::LockArgs;
use crate::commands::{Context, busy};
use crate::error::{Error, code};

/// What `lockctl run` was asked to do.
pub struct Run {
    pub resource: String,
    pub lock: LockArgs,
    pub min_hold: Option<Duration>,
    pub grace: Duration,
    pub command: Vec<String>,
}

/// Takes the lock, runs the command, and returns lockctl's exit code.
pub async fn run(ctx: &Context, run: Run) -> Result<u8, Error> {
    let client = ctx.conn.lock_client()?;
    let mut request = client
        .lock_options(run.resource.clone())
        .ttl(run.lock.ttl)
        .owner(run.lock.owner())
        .labels(run.lock.labels.clone());
    if let Some(wait) = run.lock.wait {
        request = request.wait(wait);
    }
    if let Some(min_hold) = run.min_hold {
        request = request.min_hold(min_hold);
    }
    let guard = match request.acquire().await? {
        TryLock::Acquired(guard) => guard,
        TryLock::Held(holder) => {
            busy(ctx, &run.resource, holder.as_ref());
            return Ok(code::BUSY);
        }
    };
    let child = match spawn(&run, &guard) {
        Ok(child) => child,
        Err(error) => {
            eprintln!("lockctl: cannot run {:?}: {error}", run.command[0]);
            release(guard).await;
            return Ok(match error.kind() {
                std::io::ErrorKind::NotFound => code::NOT_FOUND,
                _ => code::CANNOT_EXECUTE,
            });
        }
    };
    supervise(child, guard, &run).await
}

/// Starts the command in its own process group, with the lock's resource and fencing token
/// in its environment (never the lock's token: the command has no use for it).
fn spawn(run: &Run, guard: &LockGuard) -> std::io::Result<Child> {
    let (program, args) = run
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command"))?;
    Command::new(program)
        .args(args)
        .env("LOCKD_RESOURCE", &run.resource)
        .env("LOCKD_FENCING_TOKEN", guard.fencing_token().to_string())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// Waits for the command or the loss of the lock, whichever comes first, passing signals on.
async fn supervise(mut child: Child, guard: LockGuard, run: &Run) -> Result<u8, Error> {
    let io = |e: std::io::Error| Error::Io(format!("waiting for the command: {e}"));
    // A process group's id is its leader's pid; the child is the leader (process_group(0)).
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    let mut interrupt = signal(SignalKind::interrupt()).map_err(io)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(io)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(io)?;
    let lost = guard.lost();
    tokio::pin!(lost);
    loop {
        let forward = tokio::select! {
            biased;
            reason = &mut lost => {
                eprintln!("lockctl: lock on {} lost: {reason}; stopping the command", run.resource);
                stop(&mut child, group, run.grace).await;
                drop(guard);
                return Ok(code::LOST);
            }
            status = child.wait() => {
                let status = status.map_err(io)?;
                release(guard).await;
                return Ok(exit_code(status));
            }
            _ = interrupt.recv() => Signal::SIGINT,
            _ = terminate.recv() => Signal::SIGTERM,
            _ = hangup.recv() => Signal::SIGHUP,
        };
        if let Some(group) = group {
            let _ = killpg(group, forward);
        }
    }
}

/// SIGTERM to the command's group, SIGKILL after `grace` (and to whatever of the group is
/// left once its leader has exited: nothing may go on working without the lock).
async fn stop(child: &mut Child, group: Option<Pid>, grace: Duration) {
    let Some(group) = group else {
        // Already reaped: nothing left to stop.
        return;
    };
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        eprintln!("lockctl: the command did not stop within {grace:?}; killing it");
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait().await;
}

/// Releases the lock (kept until the minimum hold, if any); a failure only warns, since the
/// lease ends by its TTL anyway.
async fn release(guard: LockGuard) {
    let resource = guard.resource().to_owned();
    match guard.release().await {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("lockctl: warning: the lease on {resource} had ended before the release")
        }
        Err(error) => {
            eprintln!("lockctl: warning: releasing {resource} failed ({error}); it ends at its TTL")
        }
    }
}

/// The command's exit code, or 128 + the signal that killed it, as shells report it.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(code::SOFTWARE),
        (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(code::SOFTWARE),
        (None, None) => code::SOFTWARE,
    }
}
