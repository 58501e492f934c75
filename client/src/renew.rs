//! The renewal mechanism, kept in this one place: a task per guard that calls `Extend` (with
//! `replace_ttl`) at about a third of the TTL, and reports a loss through a `watch` channel.
//!
//! A later version may switch this to a bidirectional `KeepAlive` stream; the guard only sees
//! [`spawn`] and the [`LeaseState`] channel.

use std::time::{Duration, SystemTime};

use lockd_proto::v1::{ExtendRequest, ExtendResponse, LeaseStatus};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tonic::Status;

use crate::client::{LockClient, from_timestamp, to_proto_duration, to_std_duration};
use crate::error::{LostReason, is_definite};
use crate::guard::{LeaseState, Token};

/// The smallest TTL worth asking for; below it the maximum hold counts as reached.
const MIN_TTL: Duration = Duration::from_millis(1);

/// Everything the renewal task needs about one lease.
pub(crate) struct Renewal {
    pub(crate) client: LockClient,
    pub(crate) resource: String,
    pub(crate) token: Token,
    /// The TTL each renewal asks for.
    pub(crate) ttl: Duration,
    /// When the last successful grant or renewal was sent: renewals are timed from it.
    pub(crate) anchor: Instant,
    /// `anchor` plus the TTL granted then: the lease surely lasts until this instant, and
    /// cannot be trusted after it without a renewal.
    pub(crate) deadline: Instant,
    /// With a maximum hold: no renewal extends the lease past this instant.
    pub(crate) hold_until: Option<Instant>,
    /// Tells the guard about renewals and the loss.
    pub(crate) state: watch::Sender<LeaseState>,
}

/// Starts renewing in the background. Aborting the returned handle stops renewal at once
/// (the guard does so on release and on drop).
pub(crate) fn spawn(renewal: Renewal) -> AbortHandle {
    tokio::spawn(renewal.run()).abort_handle()
}

impl Renewal {
    async fn run(mut self) {
        let reason = self.renew_until_lost().await;
        tracing::warn!(resource = %self.resource, %reason, "lock lost");
        self.state.send_modify(|s| s.lost = Some(reason));
    }

    /// Renews until the lock is lost, and says why.
    async fn renew_until_lost(&mut self) -> LostReason {
        loop {
            sleep_until(self.anchor + period(self.ttl)).await;
            let mut ttl = self.ttl;
            let mut last = false;
            if let Some(until) = self.hold_until {
                let left = until.saturating_duration_since(Instant::now());
                if left < ttl {
                    (ttl, last) = (left, true);
                }
                if ttl < MIN_TTL {
                    sleep_until(self.deadline).await;
                    return LostReason::MaxHold;
                }
            }
            if let Err(reason) = self.renew(ttl).await {
                return reason;
            }
            if last {
                sleep_until(self.deadline).await;
                return LostReason::MaxHold;
            }
        }
    }

    /// One renewal to `ttl`, retried (when the answer is not definite) until the deadline.
    async fn renew(&mut self, ttl: Duration) -> Result<(), LostReason> {
        let mut retry = 0;
        loop {
            let sent = Instant::now();
            let reply = tokio::select! {
                reply = self.extend(ttl) => reply,
                () = sleep_until(self.deadline) => return Err(LostReason::Expired),
            };
            match reply {
                Ok(reply) if reply.extended => {
                    let lease = reply.lease.unwrap_or_default();
                    let granted = lease.ttl.and_then(to_std_duration).unwrap_or(ttl).min(ttl);
                    self.anchor = sent;
                    self.deadline = sent + granted;
                    let expires_at = lease
                        .expires_at
                        .and_then(from_timestamp)
                        .unwrap_or_else(|| SystemTime::now() + granted);
                    self.state.send_modify(|s| s.expires_at = expires_at);
                    return Ok(());
                }
                Ok(reply) => {
                    return Err(match reply.status() {
                        LeaseStatus::HeldByOther => LostReason::HeldByOther,
                        _ => LostReason::NotHeld,
                    });
                }
                Err(status) if is_definite(&status) => {
                    return Err(LostReason::Rejected(status.message().to_owned()));
                }
                Err(status) => {
                    let delay = self.client.retry_policy().backoff(retry).min(self.ttl / 6);
                    retry = retry.saturating_add(1);
                    tracing::debug!(
                        resource = %self.resource, error = %status.message(), ?delay,
                        "renewal failed; retrying until the lease's deadline"
                    );
                    tokio::select! {
                        () = sleep(delay) => {}
                        () = sleep_until(self.deadline) => return Err(LostReason::Expired),
                    }
                }
            }
        }
    }

    /// The `Extend` call, with a time limit no longer than a renewal period, so a hung call
    /// leaves time for another try before the deadline.
    #[allow(
        clippy::needless_update,
        reason = "fields added to the proto later must not break this"
    )]
    async fn extend(&self, ttl: Duration) -> Result<ExtendResponse, Status> {
        let request = ExtendRequest {
            resource: self.resource.clone(),
            token: self.token.0.clone(),
            ttl: Some(to_proto_duration(ttl)),
            replace_ttl: true,
            ..Default::default()
        };
        let limit = self.client.request_timeout().min(period(self.ttl));
        let mut request = tonic::Request::new(request);
        request.set_timeout(limit);
        Ok(self.client.raw().extend(request).await?.into_inner())
    }
}

/// The time between renewals: a third of the TTL (at least 1 ms).
pub(crate) fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_TTL)
}
