//! Blocking `Acquire`: attempts woken by releases (through [`Waiters`]) and by the holder's
//! expiry, never by polling.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, FAIR_ENTRY_TTL};
use crate::error::{Error, Result};
use crate::lock::{AcquireOutcome, AcquireParams, Busy};
use crate::waiters::{Waiters, Wake};

/// Slack after the holder's reported expiry before the head waiter looks again, so that Redis
/// has certainly expired the key.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);

/// Tries to acquire, waiting up to `wait` for the lock if it is held.
///
/// The waiter joins the resource's local queue before its first attempt, so a release between a
/// failed attempt and the wait still wakes it. Only the head of the queue (and fair waiters)
/// watch the holder's expiry; the others wait for the head to hand over. A fair waiter also
/// refreshes its place in the backend's queue a few times per [`FAIR_ENTRY_TTL`], and leaves
/// the queue when it gives up. If the caller goes away (the future is dropped), the local
/// registration drops with it, and a fair waiter's queue entry is removed by a background task.
///
/// # Errors
/// Backend failures, and [`Error::ShuttingDown`] when `shutdown` fires during the wait.
pub async fn acquire<B: Backend>(
    backend: &Arc<B>,
    waiters: &Arc<Waiters>,
    params: &AcquireParams,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<AcquireOutcome> {
    if wait.is_zero() {
        // Boxed here too: a future is as large as its largest state.
        return Box::pin(backend.acquire(params)).await;
    }
    let deadline = Instant::now() + wait;
    let registration = waiters.register(&params.resource, params.fair.as_deref());
    let mut leave_queue = params.fair.as_ref().map(|id| LeaveQueue {
        backend: backend.clone(),
        resource: params.resource.clone(),
        waiter: id.clone(),
    });
    loop {
        let started = Instant::now();
        // Boxed: a parked waiter then keeps a pointer, not the backend call's whole state
        // (several KiB for Redis), which matters with thousands of waiters.
        let busy: Busy = match Box::pin(backend.acquire(params)).await? {
            AcquireOutcome::Acquired(lease) => {
                // The grant already took the waiter out of the fair queue.
                if let Some(l) = leave_queue.as_mut() {
                    l.waiter.clear();
                }
                registration.granted(started + lease.ttl);
                return Ok(AcquireOutcome::Acquired(lease));
            }
            AcquireOutcome::Busy(busy) => busy,
        };
        let mut retry_at = busy.retry_in.map(|d| started + d + EXPIRY_SLACK);
        let refresh_at = params.fair.as_ref().map(|_| started + FAIR_ENTRY_TTL / 3);
        // Wait for a reason to try again: a release, the head position with the holder's expiry
        // passing, a fair queue refresh, the end of the wait, or shutdown.
        loop {
            let timer = match (registration.is_head() || params.fair.is_some(), retry_at) {
                (true, Some(at)) => Some(refresh_at.map_or(at, |r| r.min(at))),
                _ => refresh_at,
            };
            tokio::select! {
                wake = registration.woken() => match wake {
                    Wake::Retry => break,
                    Wake::HeldUntil(until) => retry_at = Some(until + EXPIRY_SLACK),
                },
                _ = sleep_until(timer.unwrap_or(deadline)), if timer.is_some() => break,
                _ = sleep_until(deadline) => return Ok(AcquireOutcome::Busy(busy)),
                _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            }
        }
    }
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
