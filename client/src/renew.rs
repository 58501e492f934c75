//! Renewal, kept in this one place: one task per guard.
//!
//! **On the shared session** (the default; see `session.rs`): the lease was bound to the
//! client's `Session` stream by its Acquire, and the task sends an `Extend` on that stream at
//! about a third of the TTL (which also binds the lease to a new stream after the old one
//! broke). A reply that the lease is not held fires `lost()`; `UNAVAILABLE` is retried until the
//! local deadline. `release()` and a dropped guard release through a `Release` on the session
//! (a dropped guard: one attempt, with the minimum hold if any), since ending the shared stream
//! would release every guard's lease. If the whole process dies, the connection breaks and lockd
//! leaves the lease to its TTL.
//!
//! **On a `KeepAlive` stream per guard** (sessions turned off with
//! [`ClientBuilder::sessions`](crate::ClientBuilder::sessions), or a guard with
//! `expire_on_close`), the rest of this note applies. The task opens a `KeepAlive` stream whose first message names the lease (`keep`, with the
//! guard's TTL), then sends an empty message (a heartbeat, which renews every lease of the
//! stream) at about a third of the TTL. lockd answers each message with the lease's state:
//! `OK` with the new expiry, or a loss (`NOT_HELD`, `HELD_BY_OTHER`), which it also reports by
//! itself when the lease's time runs out without a renewal. A loss, or the local deadline
//! passing without a renewal, fires the guard's `lost()` through a `watch` channel.
//!
//! **One stream per guard**, not one per client: lockd's replies name a lease by its resource
//! only, so two guards on one semaphore could not be told apart on a shared stream, and a
//! stream per guard makes "this guard is gone" the same thing as "this stream ended". Streams
//! are cheap: they all share the client's one HTTP/2 connection.
//!
//! **Errors.** A stream that fails (`UNAVAILABLE`, a dropped connection, lockd restarting) is
//! opened again, with backoff, and names the lease again, until the local deadline: the send
//! time of the last successful renewal plus the TTL it granted. A definite error (such as
//! `INVALID_ARGUMENT`) stops renewal at once.
//!
//! **The end.** The guard holds the sending half of a oneshot channel:
//! - `release()` sends [`Stop::Release`]: the task releases through the `Release` RPC (with the
//!   minimum hold, if any, and the client's retries), answers, then ends the stream; lockd's
//!   release-on-close then finds nothing left to release.
//! - Dropping the guard (or cancelling the task that holds it) closes the channel: the task
//!   stops renewing at once and ends the stream (a half-close), and lockd releases the lease
//!   because the client ended the stream without a release. With a minimum hold (or `expire_on_close`), or before
//!   lockd has answered for the lease on an open stream, it first calls `Release` (one
//!   attempt, with the minimum hold), so the lock is kept until the minimum hold has passed.
//!   A stream still being opened is opened fully first and ended only after the release, so
//!   lockd never releases the lease early because of it. If the whole process dies, the
//!   connection breaks and lockd leaves the lease to its TTL: it cannot tell a crash from a
//!   network fault, after which this process could still be acting on the lease.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use lockd_proto::v1::{KeepAliveRequest, KeepAliveResponse, LeaseRef, LeaseStatus};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::client::{LockClient, from_timestamp, to_proto_duration};
use crate::error::{Error, LostReason, is_definite};
use crate::guard::{LeaseState, Token};

/// The smallest TTL worth asking for; below it the maximum hold counts as reached.
const MIN_TTL: Duration = Duration::from_millis(1);

/// Heartbeats that may wait in the stream's send buffer; more means lockd is not reading, and
/// a heartbeat is skipped (the deadline still protects the lease).
const SEND_BUFFER: usize = 4;

/// What the guard asks of its renewal task before going away.
pub(crate) enum Stop {
    /// Release through the `Release` RPC, answer whether the lease was still held, end.
    Release(oneshot::Sender<Result<bool, Error>>),
}

/// Everything the renewal task needs about one lease.
pub(crate) struct Renewal {
    pub(crate) client: LockClient,
    pub(crate) resource: String,
    pub(crate) token: Token,
    /// The TTL each renewal asks for.
    pub(crate) ttl: Duration,
    /// When the lease is known to last until, without a renewal: the send time of the last
    /// successful grant or renewal plus the TTL it granted.
    pub(crate) deadline: Instant,
    /// With a maximum hold: no renewal extends the lease past this instant.
    pub(crate) hold_until: Option<Instant>,
    /// Sent with every release: the lock stays held at least this long after the grant.
    pub(crate) min_hold: Option<Duration>,
    /// Asks lockd to leave the lease to its TTL, not release it, when the stream breaks.
    pub(crate) expire_on_close: bool,
    /// Tells the guard about renewals and the loss.
    pub(crate) state: watch::Sender<LeaseState>,
}

/// Starts renewing in the background. Sending [`Stop`] on the returned channel, or dropping
/// it, ends renewal (see the module's documentation).
pub(crate) fn spawn(renewal: Renewal) -> oneshot::Sender<Stop> {
    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(renewal.run(stop_rx));
    stop_tx
}

/// An open `KeepAlive` stream: dropping it ends the stream.
struct Session {
    /// The request stream; lockd reads each message as a heartbeat.
    tx: mpsc::Sender<KeepAliveRequest>,
    replies: Streaming<KeepAliveResponse>,
    /// The TTL the stream's lease was last named with (a heartbeat renews to it).
    ttl: Duration,
    /// Send time and TTL of each message not yet answered, oldest first: an answer renews the
    /// lease from the send time of the oldest one, which is never later than the real one.
    pending: VecDeque<(Instant, Duration)>,
    /// Whether lockd has answered for the lease on this stream: only then does ending the
    /// stream release it (before, lockd may never have seen the `keep`).
    bound: bool,
}

impl Session {
    /// Ends the stream from this side and waits (up to `limit`) for lockd to end its side,
    /// which it does after releasing the stream's lease. Only a stream ended this way is
    /// released at once: a stream that breaks (dropped without ending) is left to its TTL,
    /// since lockd cannot tell a crash from a network fault.
    async fn end(self, limit: Duration) {
        let Self {
            tx, mut replies, ..
        } = self;
        drop(tx);
        let _ = timeout(limit, async {
            while let Ok(Some(_)) = replies.message().await {}
        })
        .await;
    }
}

/// Why the keep-alive loop stopped.
enum End {
    /// The lock can no longer be trusted.
    Lost(LostReason),
    /// The guard sent a [`Stop`] (`Some`) or was dropped (`None`); the stream, if one is open.
    Stopped(Option<Stop>, Option<Box<Session>>),
}

/// How a stream stopped being useful.
enum Broken {
    /// The loop is over.
    End(End),
    /// The stream failed: open another. `renewed` tells whether it renewed the lease at least
    /// once (then the backoff starts over).
    Failed { status: Status, renewed: bool },
}

impl Renewal {
    async fn run(mut self, mut stop: oneshot::Receiver<Stop>) {
        let kept = if self.client.has_session() && !self.expire_on_close {
            self.keep_on_session(&mut stop).await
        } else {
            self.keep_alive(&mut stop).await
        };
        let (stop, session) = match kept {
            End::Stopped(stop, session) => (stop, session),
            End::Lost(reason) => {
                tracing::warn!(resource = %self.resource, %reason, "lock lost");
                self.state.send_modify(|s| s.lost = Some(reason));
                // Nothing to renew any more; wait for the guard to release it or go away.
                ((&mut stop).await.ok(), None)
            }
        };
        self.finish(stop, session).await;
    }

    /// Keeps the lease alive until it is lost or the guard stops it.
    async fn keep_alive(&mut self, stop: &mut oneshot::Receiver<Stop>) -> End {
        let mut retry = 0u32;
        loop {
            match stop.try_recv() {
                Ok(s) => return End::Stopped(Some(s), None),
                Err(oneshot::error::TryRecvError::Closed) => return End::Stopped(None, None),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let Some(ttl) = self.next_ttl() else {
                // The maximum hold is reached: no stream would renew the lease any more.
                return tokio::select! {
                    biased;
                    s = &mut *stop => End::Stopped(s.ok(), None),
                    () = sleep_until(self.deadline) => End::Lost(LostReason::MaxHold),
                };
            };
            let used = self.client.endpoints().current();
            let opened = {
                let open = self.open(ttl);
                tokio::pin!(open);
                tokio::select! {
                biased;
                s = &mut *stop => {
                    // The stream being opened may already name the lease at lockd, and ending
                    // it would release the lease there: finish opening it, so that it ends
                    // only after the release (and its minimum hold) has been asked for.
                    let session = open.await.ok().map(Box::new);
                    return End::Stopped(s.ok(), session);
                }
                () = sleep_until(self.deadline) => return End::Lost(self.deadline_reason()),
                opened = &mut open => opened,
                }
            };
            let status = match opened {
                Ok(session) => match self.heartbeat(session, stop).await {
                    Broken::End(end) => return end,
                    Broken::Failed { status, renewed } => {
                        if renewed {
                            retry = 0;
                        }
                        status
                    }
                },
                Err(status) => status,
            };
            if is_definite(&status) {
                return End::Lost(LostReason::Rejected(status.message().to_owned()));
            }
            // Try the next lockd replica, if there are others.
            self.client.endpoints().failed(used);
            let delay = self.retry_delay(&mut retry);
            tracing::debug!(
                resource = %self.resource, error = %status.message(), ?delay,
                "KeepAlive stream failed; opening another until the lease's deadline"
            );
            tokio::select! {
                biased;
                s = &mut *stop => return End::Stopped(s.ok(), None),
                () = sleep_until(self.deadline) => return End::Lost(self.deadline_reason()),
                () = sleep(delay) => {}
            }
        }
    }

    /// Keeps the lease alive with an `Extend` on the client's shared session at a third of the
    /// TTL (each also binds the lease to the session, a new one after the old one broke), until
    /// it is lost or the guard stops it. A renewal in flight is awaited before a stop is read,
    /// so a release never overtakes it on the session.
    async fn keep_on_session(&mut self, stop: &mut oneshot::Receiver<Stop>) -> End {
        let mut retry = 0u32;
        // `None` once the last renewal allowed by the maximum hold has been made (lockd rounds
        // its TTL down to whole ms, so the deadline may then fall a little before the hold's end).
        let mut next = Some(Instant::now() + period(self.ttl));
        loop {
            tokio::select! {
                biased;
                s = &mut *stop => return End::Stopped(s.ok(), None),
                () = sleep_until(self.deadline) => {
                    let reason = match next {
                        None if self.hold_until.is_some() => LostReason::MaxHold,
                        _ => self.deadline_reason(),
                    };
                    return End::Lost(reason);
                }
                () = sleep_until(next.unwrap_or(self.deadline)), if next.is_some() => {}
            }
            let Some(ttl) = self.next_ttl() else {
                next = None;
                continue;
            };
            let sent = Instant::now();
            let used = self.client.endpoints().current();
            match self
                .client
                .extend_once(&self.resource, &self.token, ttl)
                .await
            {
                Ok(reply) if reply.extended => {
                    retry = 0;
                    let lease = reply.lease.unwrap_or_default();
                    let granted = lease
                        .ttl
                        .and_then(crate::client::to_std_duration)
                        .unwrap_or(ttl)
                        .min(ttl);
                    self.deadline = sent + granted;
                    let expires_at = lease
                        .expires_at
                        .and_then(from_timestamp)
                        .unwrap_or_else(|| SystemTime::now() + granted);
                    self.state.send_modify(|s| s.expires_at = expires_at);
                    // Only the last renewal before the maximum hold is shorter than the TTL.
                    next = (ttl == self.ttl).then(|| sent + period(self.ttl));
                }
                Ok(reply) => {
                    return End::Lost(match reply.status() {
                        _ if self.hold_reached() => LostReason::MaxHold,
                        LeaseStatus::HeldByOther => LostReason::HeldByOther,
                        _ => LostReason::NotHeld,
                    });
                }
                Err(status) if is_definite(&status) => {
                    return End::Lost(LostReason::Rejected(status.message().to_owned()));
                }
                Err(status) => {
                    // Try the next lockd replica's session, if there are others.
                    self.client.endpoints().failed(used);
                    let delay = self.retry_delay(&mut retry);
                    tracing::debug!(
                        resource = %self.resource, error = %status.message(), ?delay,
                        "renewal on the Session stream failed; retrying until the lease's deadline"
                    );
                    next = Some(Instant::now() + delay);
                }
            }
        }
    }

    /// Opens a stream whose first message names the lease with `ttl`.
    #[allow(
        clippy::needless_update,
        reason = "fields added to the proto later must not break this"
    )]
    async fn open(&self, ttl: Duration) -> Result<Session, Status> {
        let (tx, rx) = mpsc::channel(SEND_BUFFER);
        let first = KeepAliveRequest {
            keep: vec![self.lease_ref(ttl)],
            expire_on_close: self.expire_on_close,
            ..Default::default()
        };
        let sent = Instant::now();
        tx.try_send(first)
            .map_err(|_| Status::internal("a new KeepAlive stream's buffer is full"))?;
        // No deadline on the stream itself, which lives as long as the guard; only on opening.
        let mut raw = self.client.raw();
        let call = raw.keep_alive(ReceiverStream::new(rx));
        let replies = timeout(self.client.request_timeout(), call)
            .await
            .map_err(|_| Status::deadline_exceeded("KeepAlive was not answered in time"))??
            .into_inner();
        Ok(Session {
            tx,
            replies,
            ttl,
            pending: VecDeque::from([(sent, ttl)]),
            bound: false,
        })
    }

    /// Sends heartbeats on `session` and reads its replies until the stream fails, the lease is
    /// lost, or the guard stops it.
    #[allow(
        clippy::needless_update,
        reason = "fields added to the proto later must not break this"
    )]
    async fn heartbeat(
        &mut self,
        mut session: Session,
        stop: &mut oneshot::Receiver<Stop>,
    ) -> Broken {
        let mut renewed = false;
        // `None` once the last renewal allowed by the maximum hold has been sent.
        let mut next_beat = Some(Instant::now() + period(self.ttl));
        loop {
            tokio::select! {
                biased;
                s = &mut *stop => return Broken::End(End::Stopped(s.ok(), Some(Box::new(session)))),
                () = sleep_until(self.deadline) => {
                    return Broken::End(End::Lost(self.deadline_reason()));
                }
                reply = session.replies.message() => {
                    let reply = match reply {
                        Ok(Some(reply)) => reply,
                        Ok(None) => {
                            let status = Status::unavailable("lockd ended the KeepAlive stream");
                            return Broken::Failed { status, renewed };
                        }
                        Err(status) => return Broken::Failed { status, renewed },
                    };
                    for lease in reply.leases.iter().filter(|l| l.resource == self.resource) {
                        if lease.status() != LeaseStatus::Ok || lease.released {
                            let reason = match lease.status() {
                                _ if self.hold_reached() => LostReason::MaxHold,
                                LeaseStatus::HeldByOther => LostReason::HeldByOther,
                                _ => LostReason::NotHeld,
                            };
                            return Broken::End(End::Lost(reason));
                        }
                        let Some((sent, ttl)) = session.pending.pop_front() else {
                            continue; // an answer to nothing we sent: ignore it
                        };
                        renewed = true;
                        session.bound = true;
                        self.deadline = sent + ttl;
                        let expires_at = lease
                            .expires_at
                            .and_then(from_timestamp)
                            .unwrap_or_else(|| SystemTime::now() + ttl);
                        self.state.send_modify(|s| s.expires_at = expires_at);
                    }
                }
                () = sleep_until(next_beat.unwrap_or_else(Instant::now)), if next_beat.is_some() => {
                    let Some(ttl) = self.next_ttl() else {
                        next_beat = None;
                        continue;
                    };
                    // Only the last renewal before the maximum hold changes the TTL: it names
                    // the lease again with what is left.
                    let message = if ttl == session.ttl {
                        KeepAliveRequest::default()
                    } else {
                        KeepAliveRequest { keep: vec![self.lease_ref(ttl)], ..Default::default() }
                    };
                    let sent = Instant::now();
                    match session.tx.try_send(message) {
                        Ok(()) => {
                            session.ttl = ttl;
                            session.pending.push_back((sent, ttl));
                        }
                        // lockd is not reading: skip this heartbeat, the deadline still holds.
                        Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            let status = Status::unavailable("the KeepAlive stream is closed");
                            return Broken::Failed { status, renewed };
                        }
                    }
                    next_beat = (ttl == self.ttl).then(|| sent + period(self.ttl));
                }
            }
        }
    }

    /// Releases or lets go of the lease once the guard is done with it.
    async fn finish(&self, stop: Option<Stop>, session: Option<Box<Session>>) {
        match stop {
            Some(Stop::Release(reply)) => {
                let result = self
                    .client
                    .release(&self.resource, &self.token, self.min_hold)
                    .await;
                drop(session);
                let _ = reply.send(result);
            }
            // The guard was dropped. Ending a stream on which lockd holds the lease makes it
            // release the lease at once, unless a minimum hold must be kept or lockd was told to
            // leave the lease to its TTL.
            None if session.as_ref().is_some_and(|s| s.bound)
                && self.min_hold.is_none()
                && !self.expire_on_close =>
            {
                if let Some(session) = session {
                    session.end(self.client.request_timeout()).await;
                }
            }
            None => {
                let released = self
                    .client
                    .release_once(&self.resource, &self.token, self.min_hold)
                    .await;
                if let Err(error) = released {
                    tracing::debug!(
                        resource = %self.resource, %error,
                        "release of a dropped guard failed; the lease ends by its TTL"
                    );
                }
                drop(session);
            }
        }
    }

    /// The TTL the next renewal asks for: the guard's TTL, or less near the maximum hold;
    /// `None` once the maximum hold leaves nothing worth asking for.
    fn next_ttl(&self) -> Option<Duration> {
        let Some(until) = self.hold_until else {
            return Some(self.ttl);
        };
        let left = until.saturating_duration_since(Instant::now());
        (left >= MIN_TTL).then_some(left.min(self.ttl))
    }

    /// The pause before retry number `retry` (counted up) of a failed renewal: the client's
    /// backoff, at most half a renewal period.
    fn retry_delay(&self, retry: &mut u32) -> Duration {
        let delay = self
            .client
            .retry_policy()
            .backoff(*retry)
            .min(period(self.ttl) / 2);
        *retry = retry.saturating_add(1);
        delay
    }

    /// Whether the maximum hold allows no renewal beyond the current lease.
    fn hold_reached(&self) -> bool {
        self.hold_until.is_some_and(|until| self.deadline >= until)
    }

    /// Why the lease is lost when its deadline passes.
    fn deadline_reason(&self) -> LostReason {
        if self.hold_reached() {
            LostReason::MaxHold
        } else {
            LostReason::Expired
        }
    }

    fn lease_ref(&self, ttl: Duration) -> LeaseRef {
        LeaseRef {
            resource: self.resource.clone(),
            token: self.token.0.clone(),
            ttl: Some(to_proto_duration(ttl)),
        }
    }
}

/// The time between renewals: a third of the TTL (at least 1 ms).
pub(crate) fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_TTL)
}
