//! `Session`: many lock operations multiplexed on one bidirectional stream, with the leases they
//! grant bound to the stream as KeepAlive binds them.
//!
//! Each request carries an id that its reply echoes; operations run concurrently, so replies
//! may come out of order. A lease that an Acquire or an Extend on the session grants is recorded
//! in the backend with the session's id as its renewer (the KeepAlive mechanism, see
//! `docs/lock-core.md`), and every heartbeat renews all of the session's leases. How the stream
//! ends decides what happens to them, exactly as for KeepAlive:
//!
//! - the client ends it: lockd finishes the operations in flight, then releases every lease the
//!   session is still the last renewer of (unless `expire_on_close`), then ends its side;
//! - it breaks (reset, crash, partition): operations in flight are cancelled and the leases end
//!   at their TTL, since the client may still be acting on them.
//!
//! Limits, so that no stream makes lockd do unbounded work: at most [`OPS_IN_FLIGHT`] quick
//! operations (one attempt, release, extend, heartbeat) run at once, and lockd reads the next
//! request only when one finishes (HTTP/2 flow control then holds the client back); waiting
//! acquires do not count there, so a release is never stuck behind waits for the lock it frees,
//! but every acquire in flight reserves one of the session's `LOCKD_MAX_STREAM_LEASES` lease
//! slots, and one beyond them fails with `RESOURCE_EXHAUSTED`. A heartbeat renews at most that
//! many leases, with [`CALLS_IN_FLIGHT`] backend calls at once, and heartbeats that arrive while
//! one runs share the next renewal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lockd_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::info;

use super::keepalive::{CALLS_IN_FLIGHT, release_on_close};
use super::{request, response};
use crate::auth::{Caller, Namespace};
use crate::backend::{Backend, ExtendParams};
use crate::error::{Error, Result};
use crate::lock::{AcquireOutcome, ExtendOutcome, LeaseStatus, ReleaseParams, Token};
use crate::locks::{Locks, ReleaseVia};
use crate::metrics::{self, OpenStream};
use crate::overload::StreamPermit;

/// Quick operations one session runs at once; lockd reads no further request until one ends.
pub const OPS_IN_FLIGHT: usize = 128;

/// Replies buffered for a client that reads slowly; beyond them the session waits for it.
const REPLY_BUFFER: usize = 64;

/// A lease by (resource, token secret).
type Key = (String, String);

/// A lease bound to the session.
struct Bound {
    /// The request that bound it (an Acquire or an Extend): names it in loss reports, and tells
    /// a renewal's result apart from one for an older binding of the same lease.
    bound_by: u64,
    token: Token,
    /// The TTL each heartbeat renews it to.
    ttl: Duration,
    /// When it ends unless renewed, by the time lockd sent the call that last renewed it.
    end: Instant,
    /// A heartbeat's renewal of it is in flight: its result, not the timer, decides whether it
    /// is lost (the timer would report a loss that the renewal may undo in the backend).
    renewing: bool,
}

/// What a finished operation hands back to the session loop, which alone changes its state.
enum Done {
    Acquired {
        id: u64,
        waited: bool,
        result: Result<AcquireOutcome>,
    },
    Released {
        id: u64,
        result: Result<pb::ReleaseResponse>,
    },
    Extended {
        id: u64,
        ttl: Duration,
        /// Whether it reserved a lease slot (the lease was not bound yet).
        reserved: bool,
        result: Result<ExtendOutcome>,
    },
    Renewed {
        /// The heartbeats this renewal answers.
        ids: Vec<u64>,
        started: Instant,
        results: Vec<(Key, u64, Result<ExtendOutcome>)>,
    },
}

/// One Session stream's state, owned by its task.
pub struct Session<B> {
    locks: Arc<Locks<B>>,
    /// Recorded as the renewer of every lease the session binds.
    id: String,
    peer: Option<SocketAddr>,
    leases: HashMap<Key, Bound>,
    /// Acquires (and binding Extends) in flight: each reserves a lease slot.
    reserved: usize,
    /// Quick operations in flight (see [`OPS_IN_FLIGHT`]).
    quick: usize,
    /// Acquires in flight by request id, to give them up on a cancel.
    cancels: HashMap<u64, CancellationToken>,
    /// Whether a renewal of all leases runs now, and the heartbeats waiting for the next one.
    renewing: bool,
    heartbeats: Vec<u64>,
    /// Let leases expire instead of releasing them when the client ends the session.
    expire_on_close: Option<bool>,
    /// Whose key opened the session: checked on every request, and the session ends when it
    /// is revoked (its leases are then left to their TTL, as for a broken stream).
    caller: Caller,
    ns: Namespace,
    tx: mpsc::Sender<Result<pb::SessionResponse, Status>>,
    /// The stream's place under the stream caps, freed when the task ends.
    _permit: StreamPermit,
    /// Counts the stream in `lockd_open_streams` while it lives.
    _open: OpenStream,
}

fn reply(id: u64, r: pb::session_response::Reply) -> pb::SessionResponse {
    pb::SessionResponse {
        request_id: id,
        reply: Some(r),
    }
}

fn session_error(e: Error) -> pb::SessionError {
    let status = Status::from(e);
    pb::SessionError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

fn error_reply(id: u64, e: Error) -> pb::SessionResponse {
    reply(id, pb::session_response::Reply::Error(session_error(e)))
}

fn lost(ns: &Namespace, bound_by: u64, resource: &str, status: LeaseStatus) -> pb::SessionLease {
    info!(resource = %resource, outcome = "lost", "session");
    metrics::lease_lost("session");
    pb::SessionLease {
        bound_by,
        resource: ns.unqualify(resource.to_owned()),
        status: response::lease_status(status) as i32,
    }
}

impl<B: Backend> Session<B> {
    /// Starts the session task and returns the response stream.
    pub fn start(
        locks: Arc<Locks<B>>,
        inbound: Streaming<pb::SessionRequest>,
        peer: Option<SocketAddr>,
        caller: Caller,
        permit: StreamPermit,
    ) -> impl Stream<Item = Result<pb::SessionResponse, Status>> + Send + 'static {
        let (tx, rx) = mpsc::channel(REPLY_BUFFER);
        let session = Self {
            id: locks.new_id(),
            locks,
            peer,
            leases: HashMap::new(),
            reserved: 0,
            quick: 0,
            cancels: HashMap::new(),
            renewing: false,
            heartbeats: Vec::new(),
            expire_on_close: None,
            ns: caller.namespace(),
            caller,
            tx,
            _permit: permit,
            _open: OpenStream::new("session"),
        };
        tokio::spawn(session.run(inbound));
        ReceiverStream::new(rx)
    }

    async fn run(mut self, mut inbound: Streaming<pb::SessionRequest>) {
        let shutdown = self.locks.shutdown().clone();
        let mut ops: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        let mut ended = false;
        loop {
            if ended && ops.is_empty() {
                break;
            }
            let next_end = self
                .leases
                .values()
                .filter(|b| !b.renewing)
                .map(|b| b.end)
                .min();
            tokio::select! {
                msg = inbound.next(), if !ended && self.quick < OPS_IN_FLIGHT => match msg {
                    Some(Ok(msg)) => {
                        // A revoked key ends the session before its request does anything.
                        if let Err(e) = self.caller.check() {
                            return self.revoked(e).await;
                        }
                        self.begin(msg, &mut ops).await;
                    }
                    // The client ended its side: finish what is in flight, then close.
                    None => ended = true,
                    // The stream broke: as for KeepAlive, the leases are left to their TTL
                    // (the client may still be acting on them); operations in flight are
                    // cancelled with the task.
                    Some(Err(status)) if super::bad_message(&status) => {
                        // The client sent a message that cannot be decoded or is too large:
                        // it is told why, and its leases are left to their TTL as above.
                        let _ = self.tx.send(Err(status)).await;
                        return self.abandon("bad_message_left_to_ttl");
                    }
                    Some(Err(_)) => return self.abandon("stream_broken_left_to_ttl"),
                },
                Some(done) = ops.next(), if !ops.is_empty() => self.finish(done, &mut ops).await,
                _ = sleep_until(next_end.unwrap_or_else(Instant::now)), if next_end.is_some() => {
                    self.report_expired().await;
                }
                () = self.tx.closed() => return self.abandon("call_dropped_left_to_ttl"),
                e = self.caller.revoked() => return self.revoked(e).await,
                _ = shutdown.cancelled() => {
                    // Another lockd can take the leases over (an Extend on a new session).
                    let _ = self.tx.send(Err(Error::ShuttingDown.into())).await;
                    return;
                }
            }
        }
        self.close().await;
    }

    /// Validates one request and starts it, or answers it at once when it is invalid.
    async fn begin(
        &mut self,
        msg: pb::SessionRequest,
        ops: &mut FuturesUnordered<BoxFuture<'static, Done>>,
    ) {
        self.expire_on_close.get_or_insert(msg.expire_on_close);
        let id = msg.request_id;
        let started = match msg.op {
            Some(pb::session_request::Op::Acquire(r)) => self.begin_acquire(id, r),
            Some(pb::session_request::Op::Release(r)) => self.begin_release(id, r),
            Some(pb::session_request::Op::Extend(r)) => self.begin_extend(id, r),
            Some(pb::session_request::Op::Cancel(_)) => {
                if let Some(cancel) = self.cancels.get(&id) {
                    cancel.cancel();
                }
                Ok(None)
            }
            Some(pb::session_request::Op::Heartbeat(_)) | None => {
                self.heartbeats.push(id);
                self.quick += 1;
                Ok(self.begin_renewal())
            }
        };
        match started {
            Ok(Some(op)) => ops.push(op),
            Ok(None) => {}
            Err(e) => self.send(error_reply(id, e)).await,
        }
    }

    /// Reserves a lease slot for an operation that may bind a lease.
    fn reserve(&mut self) -> Result<()> {
        let max = self.locks.limits().max_stream_leases;
        if self.leases.len() + self.reserved >= max {
            return Err(Error::ResourceExhausted(format!(
                "a session may hold at most {max} leases, counting acquires in flight \
                 (LOCKD_MAX_STREAM_LEASES)"
            )));
        }
        self.reserved += 1;
        Ok(())
    }

    fn begin_acquire(
        &mut self,
        id: u64,
        r: pb::AcquireRequest,
    ) -> Result<Option<BoxFuture<'static, Done>>> {
        let mut req = request::Acquire::parse(r, &self.locks, self.peer, &self.ns)?;
        self.reserve()?;
        req.params.renewer = Some(self.id.clone());
        let waited = !req.wait.is_zero();
        if !waited {
            self.quick += 1;
        }
        let cancel = CancellationToken::new();
        self.cancels.insert(id, cancel.clone());
        let locks = self.locks.clone();
        Ok(Some(Box::pin(async move {
            // A cancel drops the acquire, as tonic drops a unary call whose client went away.
            let result = tokio::select! {
                r = locks.acquire(&req.params, req.wait) => r,
                () = cancel.cancelled() => Err(Error::Cancelled),
            };
            Done::Acquired { id, waited, result }
        })))
    }

    fn begin_release(
        &mut self,
        id: u64,
        r: pb::ReleaseRequest,
    ) -> Result<Option<BoxFuture<'static, Done>>> {
        let params = request::release(r, self.locks.limits(), &self.ns)?;
        // No longer kept: a heartbeat or the close must not touch it from now on.
        self.leases
            .remove(&(params.resource.clone(), params.token.expose().to_owned()));
        self.quick += 1;
        let locks = self.locks.clone();
        Ok(Some(Box::pin(async move {
            let result = locks
                .release(&params, ReleaseVia::Session)
                .await
                .map(response::release);
            Done::Released { id, result }
        })))
    }

    fn begin_extend(
        &mut self,
        id: u64,
        r: pb::ExtendRequest,
    ) -> Result<Option<BoxFuture<'static, Done>>> {
        let mut params = request::extend(r, self.locks.limits(), &self.ns)?;
        let key = (params.resource.clone(), params.token.expose().to_owned());
        let reserved = !self.leases.contains_key(&key);
        if reserved {
            self.reserve()?;
        }
        params.renewer = Some(self.id.clone());
        self.quick += 1;
        let locks = self.locks.clone();
        Ok(Some(Box::pin(async move {
            let ttl = params.ttl;
            let result = locks.extend(&params).await;
            Done::Extended {
                id,
                ttl,
                reserved,
                result,
            }
        })))
    }

    /// Starts renewing every lease for the heartbeats waiting, unless a renewal runs already
    /// (they then wait for the next one).
    fn begin_renewal(&mut self) -> Option<BoxFuture<'static, Done>> {
        if self.renewing || self.heartbeats.is_empty() {
            return None;
        }
        self.renewing = true;
        let ids = std::mem::take(&mut self.heartbeats);
        let max_ttl = self.locks.limits().max_ttl;
        let renewals: Vec<_> = self
            .leases
            .iter_mut()
            .map(|(key, b)| {
                b.renewing = true;
                let params = ExtendParams {
                    resource: key.0.clone(),
                    token: b.token.clone(),
                    ttl: b.ttl,
                    replace_ttl: true,
                    max_ttl,
                    renewer: Some(self.id.clone()),
                };
                (key.clone(), b.bound_by, params)
            })
            .collect();
        let locks = self.locks.clone();
        Some(Box::pin(async move {
            let started = Instant::now();
            let results = futures_util::stream::iter(renewals)
                .map(|(key, bound_by, params)| {
                    let locks = locks.clone();
                    async move { (key, bound_by, locks.extend(&params).await) }
                })
                .buffer_unordered(CALLS_IN_FLIGHT)
                .collect()
                .await;
            Done::Renewed {
                ids,
                started,
                results,
            }
        }))
    }

    /// Records what an operation did and answers it.
    async fn finish(&mut self, done: Done, ops: &mut FuturesUnordered<BoxFuture<'static, Done>>) {
        match done {
            Done::Acquired { id, waited, result } => {
                self.reserved -= 1;
                self.cancels.remove(&id);
                if !waited {
                    self.quick -= 1;
                }
                let msg = match result {
                    Ok(outcome) => {
                        if let AcquireOutcome::Acquired(lease) = &outcome {
                            self.bind(id, lease, lease.ttl);
                        }
                        reply(
                            id,
                            pb::session_response::Reply::Acquire(response::acquire(
                                outcome, &self.ns,
                            )),
                        )
                    }
                    Err(e) => error_reply(id, e),
                };
                self.send(msg).await;
            }
            Done::Released { id, result } => {
                self.quick -= 1;
                let msg = match result {
                    Ok(r) => reply(id, pb::session_response::Reply::Release(r)),
                    Err(e) => error_reply(id, e),
                };
                self.send(msg).await;
            }
            Done::Extended {
                id,
                ttl,
                reserved,
                result,
            } => {
                self.reserved -= usize::from(reserved);
                self.quick -= 1;
                let msg = match result {
                    Ok(outcome) => {
                        if let (LeaseStatus::Ok, Some(lease)) = (outcome.status, &outcome.lease) {
                            self.bind(id, lease, ttl);
                        }
                        reply(
                            id,
                            pb::session_response::Reply::Extend(response::extend(
                                outcome, &self.ns,
                            )),
                        )
                    }
                    Err(e) => error_reply(id, e),
                };
                self.send(msg).await;
            }
            Done::Renewed {
                ids,
                started,
                results,
            } => {
                self.renewing = false;
                self.quick -= ids.len();
                let answer = self.renewed(started, results);
                for id in ids {
                    let msg = match &answer {
                        Ok(r) => reply(id, pb::session_response::Reply::Heartbeat(r.clone())),
                        Err(e) => reply(id, pb::session_response::Reply::Error(e.clone())),
                    };
                    self.send(msg).await;
                }
                if let Some(op) = self.begin_renewal() {
                    ops.push(op);
                }
            }
        }
    }

    /// Binds a granted or extended lease to the session (again, if it was bound already).
    fn bind(&mut self, id: u64, lease: &crate::lock::Lease, ttl: Duration) {
        let key = (lease.resource.clone(), lease.token.expose().to_owned());
        self.leases.insert(
            key,
            Bound {
                bound_by: id,
                token: lease.token.clone(),
                ttl,
                // From the backend call that granted it, not from the request, which may
                // have waited.
                end: lease.since + lease.ttl,
                renewing: false,
            },
        );
    }

    /// Applies a renewal's results; a lease that could not be renewed is dropped and reported.
    /// A failed backend call fails the heartbeat (its lease stays kept, and its time runs).
    fn renewed(
        &mut self,
        started: Instant,
        results: Vec<(Key, u64, Result<ExtendOutcome>)>,
    ) -> Result<pb::SessionHeartbeatResponse, pb::SessionError> {
        let mut answer = pb::SessionHeartbeatResponse::default();
        let mut failure = None;
        for (key, bound_by, result) in results {
            // Released, or bound again since the renewal started: that result is stale.
            let Some(bound) = self.leases.get_mut(&key).filter(|b| b.bound_by == bound_by) else {
                continue;
            };
            bound.renewing = false;
            match result {
                Ok(ExtendOutcome {
                    status: LeaseStatus::Ok,
                    lease: Some(lease),
                }) => {
                    bound.end = started + lease.ttl;
                    answer.renewed += 1;
                }
                Ok(outcome) => {
                    self.leases.remove(&key);
                    answer
                        .lost
                        .push(lost(&self.ns, bound_by, &key.0, outcome.status));
                }
                Err(e) => failure = Some(session_error(e)),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(answer),
        }
    }

    /// Reports and drops the leases whose time ran out without a renewal.
    async fn report_expired(&mut self) {
        let now = Instant::now();
        let mut leases = Vec::new();
        let ns = &self.ns;
        self.leases.retain(|key, b| {
            if b.end > now || b.renewing {
                return true;
            }
            leases.push(lost(ns, b.bound_by, &key.0, LeaseStatus::NotHeld));
            false
        });
        if !leases.is_empty() {
            let msg = reply(
                0,
                pb::session_response::Reply::Lost(pb::SessionLeasesLost { leases }),
            );
            self.send(msg).await;
        }
    }

    async fn send(&self, msg: pb::SessionResponse) {
        let _ = self.tx.send(Ok(msg)).await;
    }

    /// The caller's key was revoked: the session ends with `UNAUTHENTICATED`, its operations
    /// in flight are cancelled, and its leases are left to their TTL.
    async fn revoked(&self, e: Error) {
        self.abandon("key_revoked_left_to_ttl");
        let _ = self.tx.send(Err(e.into())).await;
    }

    /// The stream ended abnormally: its leases are left to their TTL.
    fn abandon(&self, why: &'static str) {
        for key in self.leases.keys() {
            info!(resource = %key.0, outcome = why, "session");
        }
    }

    /// The client ended the session: release its leases at once (unless it asked for them to
    /// expire), each only if the session renewed or acquired it last.
    async fn close(self) {
        if self.expire_on_close == Some(true) {
            return;
        }
        let max_ttl = self.locks.limits().max_ttl;
        let releases: Vec<_> = self
            .leases
            .iter()
            .map(|(key, b)| ReleaseParams {
                resource: key.0.clone(),
                token: b.token.clone(),
                keep_until: None,
                min_hold: Duration::ZERO,
                max_ttl,
                only_if_renewer: Some(self.id.clone()),
            })
            .collect();
        release_on_close(&self.locks, releases, ReleaseVia::SessionClosed).await;
    }
}
