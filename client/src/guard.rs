//! [`LockGuard`]: a held lock that renews itself in the background and releases on drop.

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};

use crate::client::LockClient;
use crate::error::{Error, LostReason};
use crate::renew::Stop;

/// A lease's secret. Its `Debug` is redacted and it has no `Display`, so it cannot reach a log
/// line by accident.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token(pub(crate) String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What the renewal task tells the guard: the current expiry, and whether the lock was lost.
#[derive(Debug, Clone)]
pub(crate) struct LeaseState {
    /// When the lease ends unless renewed, by lockd's clock (from the last grant or renewal).
    pub(crate) expires_at: SystemTime,
    /// Set once, when the lock stops being trustworthy.
    pub(crate) lost: Option<LostReason>,
}

/// What a job run under a lock may know about its lease: what to hand to the systems it writes
/// to. It never contains the token.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The locked resource.
    pub resource: String,
    /// The lease's fencing token: greater than that of every earlier lease of the resource.
    /// Pass it along with every write so stale holders can be rejected.
    pub fencing_token: u64,
}

/// A held lock. While it lives, a background task keeps the lease alive (an `Extend` on the
/// client's shared `Session` stream at about a third of the TTL, or, with sessions turned off or
/// [`expire_on_close`](crate::LockOptions::expire_on_close), heartbeats on a `KeepAlive` stream
/// of its own), so a job longer than the TTL keeps the lock. lockd binds the lease to that
/// stream: a client that crashes leaves it to its TTL.
///
/// - **Release.** [`release`](Self::release) releases (through the `Release` RPC, retried per
///   the client's [`RetryPolicy`](crate::RetryPolicy)) and tells whether the lease was still
///   held; it consumes the guard, so a double release cannot compile.
/// - **Drop and cancellation.** Dropping the guard, or cancelling the task that holds it (an
///   aborted `JoinHandle`, a dropped future, a panic), stops renewal at once and releases the
///   lease in the background, with its minimum hold if any: a `Release` on the session, or,
///   on a `KeepAlive` stream of its own, by ending the stream (lockd then releases the lease
///   because the stream ended without a release). It never blocks. If the whole process dies,
///   its connection breaks and lockd leaves the lease to its TTL. Whatever is lost, the lease
///   still ends by its TTL: the lock never stays held past it.
/// - **Loss.** [`lost`](Self::lost) resolves when the lock can no longer be trusted: lockd
///   reported the lease lost (it ended, someone else holds it, or the request was refused), or
///   the lease's local deadline passed without a successful renewal (lockd or Redis
///   unreachable), or the maximum hold was reached. Renewal stops then; it is never resumed.
///   A renewal that fails with `UNAVAILABLE` or a dropped connection is retried, with backoff,
///   on a new stream, until that deadline: lockd leaves the leases of a broken stream to their
///   TTL, so a guard that renews before then carries on (as after a lockd restart).
/// - **Deadline.** The local deadline is counted from the moment the last successful grant or
///   renewal was *sent* plus the TTL it granted, so it never falls after the server's expiry
///   (clock rates aside).
/// - **Minimum hold.** With [`LockOptions::min_hold`](crate::LockOptions::min_hold), every
///   release asks lockd to keep the lock until that time after the grant.
/// - **Maximum hold.** With [`LockOptions::max_hold`](crate::LockOptions::max_hold), renewals
///   never extend the lease past that time after the grant.
///
/// Its `Debug` output never shows the token.
#[must_use = "dropping a LockGuard releases the lock at once"]
pub struct LockGuard {
    /// Releases the lease; a clone of the client that acquired it.
    pub(crate) client: LockClient,
    pub(crate) resource: String,
    pub(crate) token: Token,
    pub(crate) fencing_token: u64,
    /// The TTL renewals ask for.
    pub(crate) ttl: Duration,
    /// Sent with every release: the lock stays held at least this long after the grant.
    pub(crate) min_hold: Option<Duration>,
    /// Fed by the renewal task: expiry and loss.
    pub(crate) state: watch::Receiver<LeaseState>,
    /// Stops the renewal task: [`Stop::Release`] from `release`, or dropped with the guard.
    /// `None` only once `release` has taken it.
    pub(crate) stop: Option<oneshot::Sender<Stop>>,
}

impl LockGuard {
    /// The locked resource.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The lease's fencing token: greater than that of every earlier lease of this resource.
    /// It stays the same across renewals.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// The TTL the lease is renewed to.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When the lease ends unless renewed, by lockd's clock, as of the last successful grant or
    /// renewal (it moves forward with each renewal).
    pub fn expires_at(&self) -> SystemTime {
        self.state.borrow().expires_at
    }

    /// The resource and fencing token, to hand to a job.
    pub fn info(&self) -> LeaseInfo {
        LeaseInfo {
            resource: self.resource.clone(),
            fencing_token: self.fencing_token,
        }
    }

    /// Whether the lock has been lost (see [`lost`](Self::lost)).
    pub fn is_lost(&self) -> bool {
        self.state.borrow().lost.is_some()
    }

    /// A future that resolves, with the reason, once the lock can no longer be trusted (see the
    /// type's documentation). It does not borrow the guard, so it can be moved into another
    /// task or `select!`ed against the job; if the guard is released or dropped first it
    /// resolves with [`LostReason::Released`].
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            match state.wait_for(|s| s.lost.is_some()).await {
                Ok(s) => s.lost.clone().unwrap_or(LostReason::Released),
                // The renewal task is gone without reporting a loss: released or dropped.
                Err(_) => LostReason::Released,
            }
        }
    }

    /// Stops renewal and releases the lock. Returns `true` when this lease was still held and is
    /// now free (or kept until the minimum hold has passed), `false` when it had already ended
    /// (expired, or lost to another holder); a `false` means the job ran for a while without
    /// the lock. `UNAVAILABLE` is retried per the client's [`RetryPolicy`](crate::RetryPolicy).
    /// The release is carried out by the renewal task, so it completes even if this future is
    /// dropped half-way.
    ///
    /// # Errors
    /// [`Error::Unavailable`] or [`Error::Timeout`] when lockd could not be reached; the lease
    /// then ends by its TTL, since renewal has stopped.
    pub async fn release(mut self) -> Result<bool, Error> {
        if let Some(stop) = self.stop.take() {
            let (reply_tx, reply_rx) = oneshot::channel();
            if stop.send(Stop::Release(reply_tx)).is_ok()
                && let Ok(result) = reply_rx.await
            {
                return result;
            }
        }
        // The renewal task is gone (its runtime is shutting down): release from here.
        self.client
            .release(&self.resource, &self.token, self.min_hold)
            .await
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.borrow();
        f.debug_struct("LockGuard")
            .field("resource", &self.resource)
            .field("token", &self.token)
            .field("fencing_token", &self.fencing_token)
            .field("ttl", &self.ttl)
            .field("expires_at", &state.expires_at)
            .field("lost", &state.lost)
            .finish()
    }
}

/// Releases `token`'s lease on a background task, once, if a tokio runtime is running; errors
/// are ignored (the TTL is the backstop). Used by the guard's drop and after a failed acquire
/// whose reply may have been lost.
pub(crate) fn release_in_background(
    client: &LockClient,
    resource: &str,
    token: &Token,
    min_hold: Option<Duration>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (client, resource, token) = (client.clone(), resource.to_owned(), token.clone());
    runtime.spawn(async move {
        if let Err(error) = client.release_once(&resource, &token, min_hold).await {
            tracing::debug!(%resource, %error, "background release failed; the lease ends by its TTL");
        }
    });
}
