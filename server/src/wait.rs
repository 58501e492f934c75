//! Blocking `Acquire`: attempts woken by releases (through [`Waiters`]) and by the holder's
//! expiry, never by polling.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, FAIR_ENTRY_TTL};
use crate::error::{Error, Result};
use crate::lock::{AcquireOutcome, AcquireParams, Busy, Lease, ReleaseParams};
use crate::waiters::{Attempt, Registration, Waiters, Wake};

/// Slack after the holder's reported expiry before the head waiter looks again, so that Redis
/// has certainly expired the key.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);

/// Tries to acquire, waiting up to `wait` for the lock if it is held.
///
/// The waiter joins the resource's local queue before its first attempt, so a release between a
/// failed attempt and the wait still wakes it. A non-fair mutex waiter with a generated token
/// that joins behind others waits for its turn without a first attempt. A release on this lockd
/// may hand the lock to the waiter directly (see [`Waiters::offer`]). Only the head of the queue (and fair waiters)
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
    params: &Arc<AcquireParams>,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<AcquireOutcome> {
    if wait.is_zero() {
        // Boxed here too: a future is as large as its largest state.
        return Box::pin(backend.acquire(params)).await;
    }
    let deadline = Instant::now() + wait;
    let registration = waiters.register(&params.resource, params.fair.as_deref());
    let leave_queue = params.fair.as_ref().map(|id| LeaveQueue {
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
    let mut retry_at = None;
    loop {
        let started = Instant::now();
        if attempt {
            match registration.begin_attempt() {
                Attempt::Go => {
                    // Boxed: a parked waiter then keeps a pointer, not the backend call's whole
                    // state (several KiB for Redis), which matters with thousands of waiters.
                    let outcome = Box::pin(backend.acquire(params)).await;
                    registration.end_attempt();
                    match outcome? {
                        AcquireOutcome::Acquired(lease) => {
                            return Ok(granted(registration, leave_queue, started, lease));
                        }
                        AcquireOutcome::Busy(busy) => {
                            retry_at = busy.retry_in.map(|d| started + d + EXPIRY_SLACK);
                            last = Some(busy);
                        }
                    }
                }
                Attempt::Granted(lease) => {
                    return Ok(granted(registration, leave_queue, started, lease));
                }
                // A release is handing the lock to this waiter; it wakes the waiter when done.
                Attempt::Wait => {}
            }
        }
        attempt = true;
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
                    Wake::HeldUntil(until) if !registration.has_lease() => {
                        retry_at = Some(until + EXPIRY_SLACK);
                    }
                    // A release, or a hand-off that settled: look again.
                    _ => break,
                },
                _ = sleep_until(timer.unwrap_or(deadline)), if timer.is_some() => break,
                _ = sleep_until(deadline) => {
                    // A lease handed over just before the deadline is still this waiter's.
                    if let Some(lease) = registration.take_lease() {
                        return Ok(granted(registration, leave_queue, Instant::now(), lease));
                    }
                    let Some(busy) = last else {
                        // Never tried: one last attempt, which also describes the holder.
                        return final_attempt(backend, params, registration, leave_queue).await;
                    };
                    return Ok(AcquireOutcome::Busy(busy));
                }
                _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            }
        }
    }
}

/// At the deadline, a waiter that never called the backend tries once, after any hand-off to it
/// in flight has settled.
async fn final_attempt<B: Backend>(
    backend: &Arc<B>,
    params: &AcquireParams,
    registration: Registration,
    leave_queue: Option<LeaveQueue<B>>,
) -> Result<AcquireOutcome> {
    loop {
        match registration.begin_attempt() {
            Attempt::Go => {
                let started = Instant::now();
                let outcome = Box::pin(backend.acquire(params)).await;
                registration.end_attempt();
                return match outcome? {
                    AcquireOutcome::Acquired(lease) => {
                        Ok(granted(registration, leave_queue, started, lease))
                    }
                    busy => Ok(busy),
                };
            }
            Attempt::Granted(lease) => {
                return Ok(granted(registration, leave_queue, Instant::now(), lease));
            }
            // Settling always wakes a waiter held back like this one.
            Attempt::Wait => {
                registration.woken().await;
            }
        }
    }
}

/// The waiter got `lease` (from its own attempt or a hand-off) and leaves its queues.
fn granted<B: Backend>(
    registration: Registration,
    mut leave_queue: Option<LeaveQueue<B>>,
    started: Instant,
    lease: Lease,
) -> AcquireOutcome {
    // The grant already took the waiter out of the fair queue.
    if let Some(l) = leave_queue.as_mut() {
        l.waiter.clear();
    }
    registration.granted(started + lease.ttl);
    AcquireOutcome::Acquired(lease)
}

/// Releases the leases handed to waiters that left before taking them (see
/// [`Waiters::take_orphans`]), until `shutdown`. Their release wakes the next waiter as usual.
pub async fn release_orphans<B: Backend>(
    backend: Arc<B>,
    waiters: Arc<Waiters>,
    max_ttl: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = waiters.orphaned() => {}
            () = shutdown.cancelled() => return,
        }
        for lease in waiters.take_orphans() {
            let params = ReleaseParams {
                resource: lease.resource.clone(),
                token: lease.token,
                keep_until: None,
                min_hold: Duration::ZERO,
                max_ttl,
                only_if_renewer: None,
            };
            if let Err(e) = backend.release(&params).await {
                tracing::warn!(resource = %lease.resource, error = %e, "cannot release a lease handed to a waiter that left; it ends at its TTL");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::events::Events;
    use crate::lock::Token;

    #[tokio::test]
    async fn a_lease_handed_to_a_waiter_that_left_is_released() {
        let waiters = Arc::new(Waiters::default());
        let backend = Arc::new(MemoryBackend::new(
            waiters.clone(),
            Arc::new(Events::default()),
        ));
        let params = AcquireParams {
            resource: "r".into(),
            token: Token::generate("test"),
            owner: "gone".into(),
            ttl: Duration::from_secs(60),
            labels: Default::default(),
            limit: 1,
            fair: None,
            waiting: true,
            new_token: true,
        };
        let AcquireOutcome::Acquired(lease) = backend.acquire(&params).await.unwrap() else {
            panic!("the lock is free");
        };
        // A release hands the lease to a waiter that leaves before taking it.
        let waiter = waiters.register("r", None);
        waiter.accept_hand_offs(Arc::new(params.clone()));
        let offer = waiters.offer("r").unwrap();
        drop(waiter);
        offer.settle(Some(lease));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(release_orphans(
            backend.clone(),
            waiters.clone(),
            Duration::from_secs(60),
            shutdown.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(2);
        while backend.inspect("r").await.unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "the orphaned lease was not released"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        task.await.unwrap();
    }
}
