//! The gRPC adapter: `lockd.v1.LockService` over any [`Backend`]. Handlers validate the
//! request, make one backend call (or a wait), log one decision line, and convert the result.

mod keepalive;
mod request;
mod response;

use std::pin::Pin;
use std::sync::Arc;

use lockd_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::backend::{Backend, ExtendParams};
use crate::config::Limits;
use crate::events::Events;
use crate::lock::{AcquireOutcome, LeaseStatus, ReleaseParams, Token};
use crate::wait;
use crate::waiters::Waiters;

/// The `LockService` implementation, generic over the lock store.
#[derive(Debug)]
pub struct LockService<B> {
    backend: Arc<B>,
    waiters: Arc<Waiters>,
    events: Arc<Events>,
    limits: Limits,
    /// Prefix of generated tokens, so an operator can tell which lockd granted a lease.
    instance_id: Arc<str>,
    /// Cancelled on shutdown: ends every wait and stream with UNAVAILABLE.
    shutdown: CancellationToken,
}

impl<B: Backend> LockService<B> {
    /// A service over `backend`. `waiters` and `events` must be the ones the backend reports to.
    pub fn new(
        backend: Arc<B>,
        waiters: Arc<Waiters>,
        events: Arc<Events>,
        limits: Limits,
        instance_id: String,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            backend,
            waiters,
            events,
            limits,
            instance_id: instance_id.into(),
            shutdown,
        }
    }
}

fn status_name(s: LeaseStatus) -> &'static str {
    match s {
        LeaseStatus::Ok => "ok",
        LeaseStatus::NotHeld => "not_held",
        LeaseStatus::HeldByOther => "held_by_other",
    }
}

/// A boxed server stream, as tonic wants it.
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> pb::lock_service_server::LockService for LockService<B> {
    type KeepAliveStream = BoxStream<pb::KeepAliveResponse>;
    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let peer = request.remote_addr();
        let req = request::Acquire::parse(request.into_inner(), &self.limits, peer, || {
            Token::generate(&self.instance_id)
        })?;
        // Shared with the waiter's registration, which a release may hand the lock to.
        let params = Arc::new(req.params);
        let outcome = wait::acquire(
            &self.backend,
            &self.waiters,
            &params,
            req.wait,
            &self.shutdown,
        )
        .await?;
        match &outcome {
            AcquireOutcome::Acquired(lease) => info!(
                resource = %lease.resource,
                owner = %params.owner,
                fencing_token = lease.fencing_token,
                outcome = "acquired",
                "acquire"
            ),
            AcquireOutcome::Busy(busy) => info!(
                resource = %params.resource,
                owner = %params.owner,
                holder = busy.holder.as_ref().map_or("", |h| h.owner.as_str()),
                fencing_token = busy.holder.as_ref().map_or(0, |h| h.fencing_token),
                outcome = "busy",
                "acquire"
            ),
        }
        Ok(Response::new(response::acquire(outcome)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = request::Release::parse(request.into_inner())?;
        let params = ReleaseParams {
            resource: req.resource,
            token: req.token,
            keep_until: req.keep_until,
            min_hold: req.min_hold,
            max_ttl: self.limits.max_ttl,
            only_if_renewer: None,
        };
        // Backends no longer hand the lock to a waiter: a release wakes the next one instead.
        let outcome = self.backend.release(&params).await?;
        info!(
            resource = %params.resource,
            outcome = status_name(outcome.status),
            frees_at = outcome.frees_at,
            "release"
        );
        Ok(Response::new(pb::ReleaseResponse {
            released: outcome.status == LeaseStatus::Ok,
            status: response::lease_status(outcome.status) as i32,
            frees_at: outcome.frees_at.map(response::timestamp),
        }))
    }

    async fn extend(
        &self,
        request: Request<pb::ExtendRequest>,
    ) -> Result<Response<pb::ExtendResponse>, Status> {
        let req = request::Extend::parse(request.into_inner(), &self.limits)?;
        let params = ExtendParams {
            resource: req.resource,
            token: req.token,
            ttl: req.ttl,
            replace_ttl: req.replace_ttl,
            max_ttl: self.limits.max_ttl,
            renewer: None,
        };
        let outcome = self.backend.extend(&params).await?;
        info!(resource = %params.resource, outcome = status_name(outcome.status), "extend");
        Ok(Response::new(pb::ExtendResponse {
            extended: outcome.status == LeaseStatus::Ok,
            status: response::lease_status(outcome.status) as i32,
            // Only Acquire returns tokens: the caller of Extend already has it.
            lease: outcome.lease.map(response::lease_without_token),
        }))
    }

    async fn is_locked(
        &self,
        request: Request<pb::IsLockedRequest>,
    ) -> Result<Response<pb::IsLockedResponse>, Status> {
        let resource = request::resource(request.into_inner().resource)?;
        let found = self.backend.inspect(&resource).await?;
        Ok(Response::new(match found {
            None => pb::IsLockedResponse::default(),
            Some(h) => pb::IsLockedResponse {
                locked: true,
                remaining: h
                    .holders
                    .iter()
                    .map(|x| x.remaining)
                    .max()
                    .map(response::duration),
                holders: u32::try_from(h.holders.len()).unwrap_or(u32::MAX),
                limit: h.limit,
            },
        }))
    }

    async fn get_owner(
        &self,
        request: Request<pb::GetOwnerRequest>,
    ) -> Result<Response<pb::GetOwnerResponse>, Status> {
        let resource = request::resource(request.into_inner().resource)?;
        let found = self.backend.inspect(&resource).await?;
        Ok(Response::new(match found {
            None => pb::GetOwnerResponse::default(),
            Some(h) => {
                let holders: Vec<_> = h.holders.into_iter().map(response::lock_info).collect();
                pb::GetOwnerResponse {
                    holder: holders.first().cloned(),
                    holders,
                    limit: h.limit,
                }
            }
        }))
    }

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let stream = keepalive::Session::start(
            self.backend.clone(),
            self.limits,
            self.shutdown.clone(),
            request.into_inner(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let scope = request::WatchScope::parse(request.into_inner())?;
        let (mut rx, guard) = self.events.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(16);
        let shutdown = self.shutdown.clone();
        // A task per watcher, so a watcher that went away is noticed (tx.closed) even when no
        // events flow, and shutdown ends the stream.
        tokio::spawn(async move {
            let _watching = guard;
            loop {
                let reply = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    event = rx.recv() => match event {
                        Ok(e) if scope.covers(&e.resource) => pb::WatchResponse {
                            event: Some(response::event(&e)),
                            missed: 0,
                        },
                        Ok(_) => continue,
                        Err(RecvError::Lagged(n)) => pb::WatchResponse { event: None, missed: n },
                        Err(RecvError::Closed) => return,
                    },
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        let stream = ReceiverStream::new(out);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_locks(
        &self,
        request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        let req = request::List::parse(request.into_inner())?;
        let page = self
            .backend
            .list(&req.prefix, req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(pb::ListLocksResponse {
            locks: page.locks.into_iter().map(response::lock_info).collect(),
            next_page_token: page.next,
        }))
    }
}
