//! The gRPC adapter: `lockd.v1.LockService` over the lock core ([`Locks`]). Each handler
//! parses the request into domain types, makes one call to the core, and converts the result.

#[cfg(test)]
mod fuzz;
mod keepalive;
mod request;
mod response;
mod session;

use std::pin::Pin;
use std::sync::Arc;

use lockd_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, Auth, Caller};
use crate::backend::Backend;
use crate::locks::{Locks, ReleaseVia};
use crate::overload::{Gate, StreamKind, StreamPermit};

/// The `LockService` implementation, generic over the lock store.
#[derive(Debug)]
pub struct LockService<B> {
    locks: Arc<Locks<B>>,
    auth: Auth,
    /// Caps the open streams.
    gate: Arc<Gate>,
}

impl<B: Backend> LockService<B> {
    /// A service over the lock core, letting in the callers `auth` admits, with its streams
    /// capped by `gate`.
    pub fn new(locks: Arc<Locks<B>>, auth: Auth, gate: Arc<Gate>) -> Self {
        Self { locks, auth, gate }
    }

    /// The caller of `request`, if its key may make `rpc` (which needs `access`).
    fn caller<T>(&self, request: &Request<T>, access: Access, rpc: &str) -> Result<Caller, Status> {
        let caller = self.auth.caller(request.metadata(), access, rpc)?;
        if let Some(name) = caller.name() {
            tracing::Span::current().record("api_key", name);
        }
        Ok(caller)
    }
}

/// Whether a stream's inbound error is a bad message from the client (not protobuf for its type,
/// or over `LOCKD_MAX_MESSAGE_BYTES`) rather than a broken stream: the client is then told why.
fn bad_message(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange
    )
}

/// A boxed server stream, as tonic wants it.
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> pb::lock_service_server::LockService for LockService<B> {
    type KeepAliveStream = BoxStream<pb::KeepAliveResponse>;
    type WatchStream = BoxStream<pb::WatchResponse>;
    type SessionStream = BoxStream<pb::SessionResponse>;

    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let ns = self.caller(&request, Access::Write, "Acquire")?.namespace();
        let peer = request.remote_addr();
        let req = request::Acquire::parse(request.into_inner(), &self.locks, peer, &ns)?;
        let outcome = self.locks.acquire(&req.params, req.wait).await?;
        Ok(Response::new(response::acquire(outcome, &ns)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ns = self.caller(&request, Access::Write, "Release")?.namespace();
        let params = request::release(request.into_inner(), self.locks.limits(), &ns)?;
        let outcome = self.locks.release(&params, ReleaseVia::Rpc).await?;
        Ok(Response::new(response::release(outcome)))
    }

    async fn extend(
        &self,
        request: Request<pb::ExtendRequest>,
    ) -> Result<Response<pb::ExtendResponse>, Status> {
        let ns = self.caller(&request, Access::Write, "Extend")?.namespace();
        let params = request::extend(request.into_inner(), self.locks.limits(), &ns)?;
        let outcome = self.locks.extend(&params).await?;
        Ok(Response::new(response::extend(outcome, &ns)))
    }

    async fn is_locked(
        &self,
        request: Request<pb::IsLockedRequest>,
    ) -> Result<Response<pb::IsLockedResponse>, Status> {
        let ns = self.caller(&request, Access::Read, "IsLocked")?.namespace();
        let resource = ns.qualify(request::resource(request.into_inner().resource)?);
        let found = self.locks.inspect(&resource).await?;
        Ok(Response::new(response::is_locked(found)))
    }

    async fn get_owner(
        &self,
        request: Request<pb::GetOwnerRequest>,
    ) -> Result<Response<pb::GetOwnerResponse>, Status> {
        let ns = self.caller(&request, Access::Read, "GetOwner")?.namespace();
        let resource = ns.qualify(request::resource(request.into_inner().resource)?);
        let found = self.locks.inspect(&resource).await?;
        Ok(Response::new(response::get_owner(found, &ns)))
    }

    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let caller = self.caller(&request, Access::Write, "KeepAlive")?;
        let permit = self
            .gate
            .stream(StreamKind::KeepAlive, request.remote_addr())?;
        let stream =
            keepalive::Session::start(self.locks.clone(), request.into_inner(), caller, permit);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = self.caller(&request, Access::Write, "Session")?;
        let peer = request.remote_addr();
        let permit = self.gate.stream(StreamKind::Session, peer)?;
        let stream = session::Session::start(
            self.locks.clone(),
            request.into_inner(),
            peer,
            caller,
            permit,
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&request, Access::Read, "Watch")?;
        let peer = request.remote_addr();
        let scope = request::WatchScope::parse(request.into_inner(), &caller.namespace())?;
        let permit = self.gate.stream(StreamKind::Watch, peer)?;
        Ok(Response::new(Box::pin(watch_stream(
            &self.locks,
            scope,
            caller,
            permit,
        ))))
    }

    async fn list_locks(
        &self,
        request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        let ns = self
            .caller(&request, Access::Read, "ListLocks")?
            .namespace();
        let req = request::List::parse(request.into_inner(), &ns)?;
        let page = self
            .locks
            .list(&req.prefix, req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(pb::ListLocksResponse {
            locks: page
                .locks
                .into_iter()
                .map(|l| response::lock_info(l, &ns))
                .collect(),
            next_page_token: page.next,
        }))
    }
}

/// The events under `scope`, as a Watch response stream. A task per watcher, so a watcher that
/// went away is noticed (`tx.closed`) even when no events flow, and shutdown ends the stream,
/// as does the revocation of the caller's key. The task holds the stream's `permit` until it
/// ends.
fn watch_stream<B: Backend>(
    locks: &Locks<B>,
    scope: request::WatchScope,
    mut caller: Caller,
    permit: StreamPermit,
) -> ReceiverStream<Result<pb::WatchResponse, Status>> {
    let (mut rx, guard) = locks.watch();
    let (tx, out) = tokio::sync::mpsc::channel(16);
    let shutdown = locks.shutdown().clone();
    let ns = caller.namespace();
    tokio::spawn(async move {
        let _watching = (guard, permit);
        loop {
            let reply = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                e = caller.revoked() => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                event = rx.recv() => match event {
                    Ok(e) if scope.covers(&e.resource) => pb::WatchResponse {
                        event: Some(response::event(&e, &ns)),
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
    ReceiverStream::new(out)
}
