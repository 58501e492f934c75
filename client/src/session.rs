//! The shared `Session` stream: every `Acquire`, `Release` and `Extend` of a [`LockClient`]
//! (and of all its clones) travels on one bidirectional stream, tagged with a request id, and
//! a task routes each reply back to its caller.
//!
//! lockd binds the leases an Acquire or an Extend on the session grants to it, so a lease whose
//! client went away (the process died, the connection broke) ends by its TTL, and one whose
//! client ended the session (every clone of the client dropped) is released at once. Guards
//! renew their leases with `Extend` on the session (see `renew.rs`), which also binds a lease to
//! a new session after the old one broke.
//!
//! **Failures.** When the stream ends or fails, every call waiting on it fails with
//! `UNAVAILABLE` (the client's retry policy applies, and an Acquire is retried with the same
//! token), and the next call opens a new stream. A call that gets no reply within its time limit
//! fails with `DEADLINE_EXCEEDED`.
//!
//! **Cancellation.** A call whose future is dropped (or times out) before its reply sends a
//! `cancel` naming it, so lockd gives up a wait as it would for a cancelled unary call. If the
//! Acquire was granted before the cancel arrived, the reply task releases that lease on the
//! stream, so a lock nobody waits for any more is not held until its TTL.
//!
//! [`LockClient`]: crate::LockClient

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lockd_proto::v1::session_request::Op;
use lockd_proto::v1::session_response::Reply;
use lockd_proto::v1::{
    AcquireResponse, ReleaseRequest, SessionCancel, SessionRequest, SessionResponse,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::AuthedClient as Client;

/// Requests that may wait to be sent on the stream (HTTP/2 flow control holds the rest back).
const SEND_BUFFER: usize = 256;

/// Who waits for a reply.
enum Waiter {
    /// A caller.
    Call(oneshot::Sender<Result<Reply, Status>>),
    /// A caller that went away: a lease its Acquire was granted is released.
    Abandoned,
}

/// Replies awaited, by request id.
type Pending = Mutex<HashMap<u64, Waiter>>;

/// One open stream.
struct Live {
    /// Dropping it ends the stream (a half-close): lockd then releases the session's leases.
    tx: mpsc::Sender<SessionRequest>,
    pending: Arc<Pending>,
    /// Set by the reply task when the stream ended or failed.
    dead: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
}

/// The shared session of a client and its clones.
pub(crate) struct Mux {
    raw: Client,
    /// The current stream; replaced (under this lock) when it has died.
    live: tokio::sync::Mutex<Option<Arc<Live>>>,
}

/// A call sent and not answered yet: dropped before its reply (cancelled, or timed out), it
/// cancels the operation at lockd and has a granted lease released.
struct InFlight {
    live: Arc<Live>,
    id: u64,
    rx: oneshot::Receiver<Result<Reply, Status>>,
    answered: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let waiting = match self
            .live
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&self.id)
        {
            Some(waiter) => {
                *waiter = Waiter::Abandoned;
                true
            }
            None => false,
        };
        if waiting {
            let cancel = SessionRequest {
                request_id: self.id,
                expire_on_close: false,
                op: Some(Op::Cancel(SessionCancel {})),
            };
            // Full: lockd is not reading; the reply task then releases a granted lease.
            let _ = self.live.tx.try_send(cancel);
        } else if let Ok(Ok(reply)) = self.rx.try_recv() {
            // Answered just before the caller went away.
            release_granted(&self.live.tx, &self.live.next_id, reply);
        }
    }
}

/// Releases the lease of a granted Acquire that nobody waits for, without waiting for the
/// answer (the lease's TTL is the backstop).
fn release_granted(tx: &mpsc::Sender<SessionRequest>, next_id: &AtomicU64, reply: Reply) {
    let Reply::Acquire(AcquireResponse {
        acquired: true,
        lease: Some(lease),
        ..
    }) = reply
    else {
        return;
    };
    let release = SessionRequest {
        request_id: next_id.fetch_add(1, Ordering::Relaxed),
        expire_on_close: false,
        op: Some(Op::Release(ReleaseRequest {
            resource: lease.resource,
            token: lease.token,
            ..Default::default()
        })),
    };
    let _ = tx.try_send(release);
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux").finish_non_exhaustive()
    }
}

impl Mux {
    /// A session over `raw`'s connection, opened on first use.
    pub(crate) fn new(raw: Client) -> Self {
        Self {
            raw,
            live: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `op` and waits up to `limit` for its reply. An error reply is returned as the
    /// `Status` the unary call would have failed with.
    pub(crate) async fn call(&self, op: Op, limit: Duration) -> Result<Reply, Status> {
        let live = tokio::time::timeout(limit, self.live())
            .await
            .map_err(|_| Status::deadline_exceeded("the Session stream did not open in time"))??;
        let id = live.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        live.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Waiter::Call(tx));
        // The reply task may have died between the check in `live()` and the insert above.
        if live.dead.load(Ordering::Acquire) {
            forget(&live.pending, id);
            return Err(Status::unavailable("the Session stream ended"));
        }
        let request = SessionRequest {
            request_id: id,
            expire_on_close: false,
            op: Some(op),
        };
        if live.tx.send(request).await.is_err() {
            forget(&live.pending, id);
            return Err(Status::unavailable("the Session stream is closed"));
        }
        let mut call = InFlight {
            live,
            id,
            rx,
            answered: false,
        };
        let result = match tokio::time::timeout(limit, &mut call.rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable("the Session stream ended")),
            // Dropping `call` below gives the operation up at lockd.
            Err(_) => return Err(Status::deadline_exceeded("lockd did not answer in time")),
        };
        call.answered = true;
        result
    }

    /// The open stream, opening one when there is none or it died.
    async fn live(&self) -> Result<Arc<Live>, Status> {
        let mut slot = self.live.lock().await;
        if let Some(live) = slot.as_ref()
            && !live.dead.load(Ordering::Acquire)
        {
            return Ok(live.clone());
        }
        let (tx, rx) = mpsc::channel(SEND_BUFFER);
        let replies = self
            .raw
            .clone()
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let live = Arc::new(Live {
            tx,
            pending: Arc::default(),
            dead: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
        });
        tokio::spawn(route(replies, live.clone_parts()));
        *slot = Some(live.clone());
        Ok(live)
    }
}

/// What the reply task needs of a stream: not its sender, whose drop ends the stream.
struct Parts {
    pending: Arc<Pending>,
    dead: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
    tx: mpsc::WeakSender<SessionRequest>,
}

impl Live {
    fn clone_parts(&self) -> Parts {
        Parts {
            pending: self.pending.clone(),
            dead: self.dead.clone(),
            next_id: self.next_id.clone(),
            tx: self.tx.downgrade(),
        }
    }
}

fn forget(pending: &Pending, id: u64) {
    pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
}

/// Routes each reply to its caller until the stream ends, then fails every call still waiting.
/// Loss reports (request id 0) have no caller: guards learn of a loss from their renewals.
async fn route(mut replies: Streaming<SessionResponse>, parts: Parts) {
    let why = loop {
        match replies.message().await {
            Ok(Some(SessionResponse {
                request_id,
                reply: Some(reply),
            })) => {
                let waiter = parts
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&request_id);
                match waiter {
                    Some(Waiter::Call(caller)) => {
                        let result = match reply {
                            Reply::Error(e) => Err(Status::new(Code::from(e.code), e.message)),
                            reply => Ok(reply),
                        };
                        let _ = caller.send(result);
                    }
                    Some(Waiter::Abandoned) => {
                        if let Some(tx) = parts.tx.upgrade() {
                            release_granted(&tx, &parts.next_id, reply);
                        }
                    }
                    None => {}
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break Status::unavailable("lockd ended the Session stream"),
            Err(status) => {
                break Status::unavailable(format!("the Session stream failed: {status}"));
            }
        }
    };
    parts.dead.store(true, Ordering::Release);
    let waiters: Vec<_> = parts
        .pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .collect();
    for (_, waiter) in waiters {
        if let Waiter::Call(caller) = waiter {
            let _ = caller.send(Err(why.clone()));
        }
    }
}
