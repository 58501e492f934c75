//! The gRPC adapter: `lockd.v1.LockService` over any [`Backend`]. Handlers validate the
//! request, make one backend call (or a wait), log one decision line, and convert the result.

mod request;
mod response;

use std::sync::Arc;

use lockd_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::backend::{Backend, ExtendParams};
use crate::config::Limits;
use crate::lock::{AcquireOutcome, LeaseStatus, Token};
use crate::wait;
use crate::waiters::Waiters;

/// The `LockService` implementation, generic over the lock store.
#[derive(Debug)]
pub struct LockService<B> {
    backend: Arc<B>,
    waiters: Arc<Waiters>,
    limits: Limits,
    /// Prefix of generated tokens, so an operator can tell which lockd granted a lease.
    instance_id: Arc<str>,
    /// Cancelled on shutdown: ends every wait with UNAVAILABLE.
    shutdown: CancellationToken,
}

impl<B: Backend> LockService<B> {
    /// A service over `backend`. `waiters` must be the registry the backend reports releases to.
    pub fn new(
        backend: Arc<B>,
        waiters: Arc<Waiters>,
        limits: Limits,
        instance_id: String,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            backend,
            waiters,
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

#[tonic::async_trait]
impl<B: Backend> pb::lock_service_server::LockService for LockService<B> {
    type KeepAliveStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send>,
    >;
    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>,
    >;

    async fn keep_alive(
        &self,
        _request: Request<tonic::Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        Err(Status::unimplemented("KeepAlive: in progress"))
    }

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("Watch: in progress"))
    }

    async fn list_locks(
        &self,
        _request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        Err(Status::unimplemented("ListLocks: in progress"))
    }

    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let peer = request.remote_addr();
        let req = request::Acquire::parse(request.into_inner(), &self.limits, peer, || {
            Token::generate(&self.instance_id)
        })?;
        let outcome = wait::acquire(
            &*self.backend,
            &self.waiters,
            &req.params,
            req.wait,
            &self.shutdown,
        )
        .await?;
        match &outcome {
            AcquireOutcome::Acquired(lease) => info!(
                resource = %lease.resource,
                owner = %req.params.owner,
                fencing_token = lease.fencing_token,
                outcome = "acquired",
            ),
            AcquireOutcome::Held(holder) => info!(
                resource = %holder.resource,
                owner = %req.params.owner,
                holder = %holder.owner,
                fencing_token = holder.fencing_token,
                outcome = "held",
            ),
        }
        Ok(Response::new(response::acquire(outcome)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = request::Release::parse(request.into_inner())?;
        let status = self.backend.release(&req.resource, &req.token).await?;
        info!(resource = %req.resource, outcome = status_name(status), "release");
        Ok(Response::new(pb::ReleaseResponse {
            released: status == LeaseStatus::Ok,
            status: response::lease_status(status) as i32,
            ..Default::default()
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
        };
        let outcome = self.backend.extend(&params).await?;
        info!(resource = %params.resource, outcome = status_name(outcome.status), "extend");
        Ok(Response::new(pb::ExtendResponse {
            extended: outcome.status == LeaseStatus::Ok,
            status: response::lease_status(outcome.status) as i32,
            // Only Acquire returns tokens: the caller of Extend already has it.
            lease: outcome.lease.map(|l| pb::Lease {
                token: String::new(),
                ..response::lease(l)
            }),
        }))
    }

    async fn is_locked(
        &self,
        request: Request<pb::IsLockedRequest>,
    ) -> Result<Response<pb::IsLockedResponse>, Status> {
        let resource = request::resource(request.into_inner().resource)?;
        let holder = self.backend.inspect(&resource).await?;
        Ok(Response::new(pb::IsLockedResponse {
            locked: holder.is_some(),
            remaining: holder.map(|h| response::duration(h.remaining)),
            ..Default::default()
        }))
    }

    async fn get_owner(
        &self,
        request: Request<pb::GetOwnerRequest>,
    ) -> Result<Response<pb::GetOwnerResponse>, Status> {
        let resource = request::resource(request.into_inner().resource)?;
        let holder = self.backend.inspect(&resource).await?;
        Ok(Response::new(pb::GetOwnerResponse {
            holder: holder.map(response::lock_info),
            ..Default::default()
        }))
    }
}
