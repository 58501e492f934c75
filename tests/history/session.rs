//! A workload client's Session stream: its Acquire, Release and Extend calls travel on one
//! stream (in session mode), and the leases they grant are bound to it.
//!
//! The checker knows nothing of sessions; the workload records what a session does in the terms
//! it knows. Session calls are recorded as the unary calls they mirror; a session heartbeat as a
//! KeepAlive heartbeat of a stream numbered like the KeepAlive streams; and ending the session
//! as a KeepAlive close or kill of every lease it bound (lockd may release them then). A session
//! heartbeat renews every lease bound to it, so the workload ends the session whenever a lease
//! it bound could outlive the client's belief (an unknown outcome, walking away): otherwise a
//! later heartbeat would keep alive a lease the checker counts as gone at its TTL.

use std::time::Duration;

use lockd_client::proto::session_request::Op as SessionOp;
use lockd_client::proto::session_response::Reply;
use lockd_client::proto::{LockServiceClient, SessionRequest, SessionResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::model::Micros;

/// A lease bound to the session: resource, token, the TTL heartbeats renew it to, and the
/// request that bound it (which names it in loss reports).
#[derive(Debug, Clone)]
pub struct BoundLease {
    pub resource: String,
    pub token: String,
    pub ttl: Micros,
    pub bound_by: u64,
}

/// An open Session stream.
pub struct Session {
    /// The stream's number in the history (shared with KeepAlive streams).
    pub id: usize,
    pub expire_on_close: bool,
    /// The leases a reply said were bound to the session, and not released through it since.
    pub bound: Vec<BoundLease>,
    tx: mpsc::Sender<SessionRequest>,
    replies: tonic::Streaming<SessionResponse>,
    next_request: u64,
    /// The client (and connection) the stream runs on, dropped with it.
    _raw: LockServiceClient<Channel>,
}

impl Session {
    /// Opens a Session stream on `raw`, within `budget`.
    pub async fn open(
        mut raw: LockServiceClient<Channel>,
        id: usize,
        expire_on_close: bool,
        budget: Duration,
    ) -> Result<Self, String> {
        let (tx, rx) = mpsc::channel(4);
        let opened = tokio::time::timeout(budget, raw.session(ReceiverStream::new(rx))).await;
        let replies = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(format!("{:?}", status.code())),
            Err(_) => return Err("local deadline".into()),
        };
        Ok(Self {
            id,
            expire_on_close,
            bound: Vec::new(),
            tx,
            replies,
            next_request: 0,
            _raw: raw,
        })
    }

    /// The id of the last request sent.
    pub fn last_request(&self) -> u64 {
        self.next_request
    }

    /// Sends `op` and waits up to `budget` for its reply; loss reports on the way unbind their
    /// leases. An error reply is an error (its code).
    pub async fn call(&mut self, op: SessionOp, budget: Duration) -> Result<Reply, String> {
        self.next_request += 1;
        let id = self.next_request;
        let request = SessionRequest {
            request_id: id,
            expire_on_close: self.expire_on_close,
            op: Some(op),
        };
        if self.tx.send(request).await.is_err() {
            return Err("request stream closed".into());
        }
        let Self { replies, bound, .. } = self;
        let reply = tokio::time::timeout(budget, async move {
            loop {
                match replies.message().await {
                    Ok(Some(r)) if r.request_id == id => return Ok(r.reply),
                    Ok(Some(SessionResponse {
                        reply: Some(Reply::Lost(lost)),
                        ..
                    })) => {
                        bound.retain(|b| !lost.leases.iter().any(|l| l.bound_by == b.bound_by));
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("stream ended".to_owned()),
                    Err(status) => return Err(format!("{:?}", status.code())),
                }
            }
        })
        .await
        .map_err(|_| "local deadline".to_owned())??;
        match reply {
            Some(Reply::Error(e)) => Err(format!("{:?}", tonic::Code::from(e.code))),
            Some(r) => Ok(r),
            None => Err("reply without an answer".into()),
        }
    }

    /// Records that `lease` is bound to the session (again).
    pub fn bind(&mut self, lease: BoundLease) {
        self.unbind(&lease.resource, &lease.token);
        self.bound.push(lease);
    }

    pub fn unbind(&mut self, resource: &str, token: &str) {
        self.bound
            .retain(|b| !(b.resource == resource && b.token == token));
    }

    /// `resource`/`token`'s binding, if it is bound.
    pub fn binding(&self, resource: &str, token: &str) -> Option<BoundLease> {
        self.bound
            .iter()
            .find(|b| b.resource == resource && b.token == token)
            .cloned()
    }

    /// Ends the session from the client's side (half-close), reading to lockd's end so that it
    /// sees an orderly close.
    pub async fn close(self) {
        let Self {
            tx, mut replies, ..
        } = self;
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(Some(_)) = replies.message().await {}
        })
        .await;
    }
}
