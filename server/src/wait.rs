//! Blocking `Acquire`: attempts woken by releases (through [`Waiters`]) and by the holder's
//! expiry, never by polling.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::lock::{AcquireOutcome, AcquireParams};
use crate::waiters::{Waiters, Wake};

/// Slack after the holder's reported expiry before the head waiter looks again, so that Redis
/// has certainly expired the key.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);

/// Tries to acquire, waiting up to `wait` for the lock if it is held.
///
/// The waiter joins the resource's queue before its first attempt, so a release between a
/// failed attempt and the wait still wakes it. Only the head of the queue watches the holder's
/// expiry; the others wait for the head to hand over. If the caller goes away (the future is
/// dropped), the registration drops with it and nothing is left behind.
///
/// # Errors
/// Backend failures, and [`Error::ShuttingDown`] when `shutdown` fires during the wait.
pub async fn acquire<B: Backend>(
    backend: &B,
    waiters: &Arc<Waiters>,
    params: &AcquireParams,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<AcquireOutcome> {
    if wait.is_zero() {
        return backend.acquire(params).await;
    }
    let deadline = Instant::now() + wait;
    let registration = waiters.register(&params.resource);
    loop {
        let started = Instant::now();
        let holder = match backend.acquire(params).await? {
            AcquireOutcome::Acquired(lease) => {
                registration.granted(started + lease.ttl);
                return Ok(AcquireOutcome::Acquired(lease));
            }
            AcquireOutcome::Held(holder) => holder,
        };
        let mut held_until = started + holder.remaining + EXPIRY_SLACK;
        // Wait for a reason to try again: a release, the head position with the holder's expiry
        // passing, the end of the wait, or shutdown.
        loop {
            let expiry = registration.is_head().then_some(held_until);
            tokio::select! {
                wake = registration.woken() => match wake {
                    Wake::Retry => break,
                    Wake::HeldUntil(until) => held_until = until + EXPIRY_SLACK,
                },
                _ = sleep_until(expiry.unwrap_or(deadline)), if expiry.is_some() => break,
                _ = sleep_until(deadline) => return Ok(AcquireOutcome::Held(holder)),
                _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            }
        }
    }
}
