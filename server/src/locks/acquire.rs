//! Blocking `Acquire`: attempts woken by releases (through [`Waiters`]) and by timers at the
//! holder's expiry or a stale fair-queue entry, never by polling.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::waiters::{Registration, Waiters, Wake};
use crate::backend::{Backend, FAIR_ENTRY_TTL};
use crate::error::{Error, Result};
use crate::lock::{AcquireOutcome, AcquireParams, Busy};

/// Slack after the holder's reported expiry before the head waiter looks again, so that Redis
/// has certainly expired the key.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);

/// Tries to acquire, waiting until `deadline` for the lock if it is held.
///
/// The waiter joins the resource's local queue before its first attempt, so a release between a
/// failed attempt and the wait still wakes it. A non-fair mutex waiter with a generated token
/// that joins behind others waits for its turn without a first attempt. Only the head of the
/// queue (and fair waiters) arm a timer for when the lock may free by itself (the holder's
/// expiry, or a stale fair-queue entry ahead); the others wait for the head to move on. A fair
/// waiter also refreshes its place in the backend's queue a few times per [`FAIR_ENTRY_TTL`],
/// and leaves the queue when it gives up. If the caller goes away (the future is dropped), the
/// local registration drops with it, and a fair waiter's queue entry is removed by a
/// background task.
///
/// # Errors
/// Backend failures, and [`Error::ShuttingDown`] when `shutdown` fires during the wait.
pub(super) async fn acquire<B: Backend>(
    backend: &Arc<B>,
    waiters: &Arc<Waiters>,
    params: &AcquireParams,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Result<AcquireOutcome> {
    let registration = waiters.register(&params.resource, params.fair.as_deref());
    let mut leave_queue = params.fair.as_ref().map(|id| LeaveQueue {
        backend: backend.clone(),
        resource: params.resource.clone(),
        waiter: id.clone(),
    });
    // Behind another local waiter, a mutex waiter skips its first attempt: the lock was busy
    // when that waiter tried, and it is first in line anyway. Under contention this saves a
    // backend call per blocking Acquire. Fair waiters always try, to take their place in the
    // backend's queue; so do semaphore waiters, since a slot may be free, and callers with
    // their own token, which may hold the lock already (an idempotent retry).
    let mut attempt =
        params.fair.is_some() || params.limit != 1 || !params.new_token || registration.is_head();
    let mut last: Option<Busy> = None;
    let mut retry_at: Option<Instant> = None;
    loop {
        let started = Instant::now();
        if attempt {
            // Boxed: a parked waiter then keeps a pointer, not the backend call's whole state
            // (several KiB for Redis), which matters with thousands of waiters.
            match Box::pin(backend.acquire(params)).await? {
                AcquireOutcome::Acquired(lease) => {
                    // The grant took the waiter out of the backend's fair queue.
                    if let Some(l) = leave_queue.as_mut() {
                        l.waiter.clear();
                    }
                    let held_until = (params.limit == 1).then(|| started + lease.ttl);
                    registration.granted(held_until);
                    return Ok(AcquireOutcome::Acquired(lease));
                }
                AcquireOutcome::Busy(busy) => {
                    retry_at = Some(started + retry_in(&busy) + EXPIRY_SLACK);
                    last = Some(busy);
                }
            }
        }
        attempt = true;
        let refresh_at = params.fair.as_ref().map(|_| started + FAIR_ENTRY_TTL / 3);
        // Wait for a reason to try again: a release, the head position with the lock due to
        // free, a fair queue refresh, the end of the wait, or shutdown.
        loop {
            let timer = if registration.is_head() || params.fair.is_some() {
                earliest(retry_at, refresh_at)
            } else {
                refresh_at
            };
            tokio::select! {
                wake = registration.woken() => match wake {
                    Wake::MutexHeldUntil(until) => retry_at = Some(until + EXPIRY_SLACK),
                    Wake::Retry => break,
                },
                () = sleep_until(timer.unwrap_or(deadline)), if timer.is_some() => break,
                () = sleep_until(deadline) => {
                    return match last {
                        Some(busy) => Ok(AcquireOutcome::Busy(busy)),
                        // Never tried: one last attempt, which also describes the holder.
                        None => final_attempt(backend, params, registration, leave_queue).await,
                    };
                }
                () = shutdown.cancelled() => return Err(Error::ShuttingDown),
            }
        }
    }
}

/// How long until the lock may free by itself, as far as this attempt saw: the first holder's
/// expiry, or the fair-queue entry ahead going stale. Without either (which a backend should
/// not answer), a fair entry's lifetime bounds the wait.
fn retry_in(busy: &Busy) -> Duration {
    busy.retry_in.unwrap_or(FAIR_ENTRY_TTL)
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// At the deadline, a waiter that never called the backend tries once.
async fn final_attempt<B: Backend>(
    backend: &Arc<B>,
    params: &AcquireParams,
    registration: Registration,
    mut leave_queue: Option<LeaveQueue<B>>,
) -> Result<AcquireOutcome> {
    let started = Instant::now();
    let outcome = Box::pin(backend.acquire(params)).await?;
    if let AcquireOutcome::Acquired(lease) = &outcome {
        if let Some(l) = leave_queue.as_mut() {
            l.waiter.clear();
        }
        registration.granted((params.limit == 1).then(|| started + lease.ttl));
    }
    Ok(outcome)
}

/// Removes a fair waiter's queue entry when its wait ends in any way. The entry would go stale
/// by itself after [`FAIR_ENTRY_TTL`]; removing it at once lets the next waiter go first.
struct LeaveQueue<B: Backend> {
    backend: Arc<B>,
    resource: String,
    /// Emptied once the waiter is out of the queue anyway.
    waiter: String,
}

impl<B: Backend> Drop for LeaveQueue<B> {
    fn drop(&mut self) {
        let backend = self.backend.clone();
        let resource = std::mem::take(&mut self.resource);
        let waiter = std::mem::take(&mut self.waiter);
        if waiter.is_empty() {
            return;
        }
        // A drop cannot await; a failure only leaves an entry that goes stale on its own.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = backend.leave_queue(&resource, &waiter).await;
            });
        }
    }
}
