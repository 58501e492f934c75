//! lockd: distributed locks as a gRPC service, kept in Redis and changed only by Lua scripts.
//!
//! # Layout
//! - [`config`]: the one `Config` struct, from flags and environment.
//! - [`lock`]: domain types (tokens, leases, outcomes), free of gRPC and Redis.
//! - [`backend`]: the `Backend` trait, with the in-memory and Redis implementations.
//! - [`waiters`] and [`wait`]: blocking acquires, woken by releases and expiries, never polled.
//! - [`events`]: lock events for `Watch`.
//! - [`service`]: the gRPC adapter, with request validation and response conversion.
//! - [`error`]: the crate's error and its one mapping to `tonic::Status`.
//! - [`health`], [`shutdown`], [`telemetry`]: running as a well-behaved server.
//!
//! [`run`] binds the configured address; [`serve`] takes a listener, which is the seam tests use.

pub mod backend;
pub mod config;
pub mod error;
pub mod events;
pub mod health;
pub mod lock;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod wait;
pub mod waiters;

use std::future::Future;
use std::sync::Arc;

use lockd_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::backend::{Backend, MemoryBackend, RedisBackend};
pub use crate::config::Config;
use crate::events::Events;
use crate::service::LockService;
use crate::waiters::Waiters;

/// Any error that stops the server.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Binds `config.listen` and serves until `signal` resolves.
///
/// # Errors
/// Fails when the address cannot be bound, the Redis URL is invalid, or the server fails.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<(), BoxError> {
    let listener = TcpListener::bind(config.listen).await?;
    serve(config, listener, signal).await
}

/// Serves lockd on `listener` until `signal` resolves, then shuts down gracefully: health turns
/// `NOT_SERVING`, waits end with `UNAVAILABLE`, no new connection is accepted, and in-flight
/// requests get `config.shutdown_grace` to finish.
///
/// # Errors
/// Fails when the Redis URL is invalid or the server fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    let shutdown = CancellationToken::new();
    let hub = Hub {
        waiters: Arc::default(),
        events: Arc::default(),
        shutdown,
    };
    match config.redis() {
        None => {
            tracing::warn!(
                "no Redis configured (REDIS_URL / REDIS_HOST): using the embedded in-memory \
                 backend; locks are local to this process and lost when it stops"
            );
            let backend = Arc::new(MemoryBackend::new(hub.waiters.clone(), hub.events.clone()));
            tokio::spawn(backend.clone().sweep(hub.shutdown.clone()));
            serve_backend(backend, hub, config, listener, signal).await
        }
        Some(redis) => {
            tracing::info!(url = %redis.redacted_url(), prefix = %redis.key_prefix, "using Redis");
            let backend = RedisBackend::start(
                &redis,
                hub.waiters.clone(),
                hub.events.clone(),
                hub.shutdown.clone(),
            )?;
            // Refuses a Redis that may evict lock keys (unless allowed); one that is not
            // reachable yet is checked on its first connection instead.
            backend.check_safe().await?;
            serve_backend(backend, hub, config, listener, signal).await
        }
    }
}

/// What the service and the backend share: wake-ups, events, and the shutdown signal.
struct Hub {
    waiters: Arc<Waiters>,
    events: Arc<Events>,
    shutdown: CancellationToken,
}

async fn serve_backend<B: Backend>(
    backend: Arc<B>,
    hub: Hub,
    config: Config,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    let Hub {
        waiters,
        events,
        shutdown,
    } = hub;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set(&reporter, ServingStatus::NotServing).await;
    tokio::spawn(health::probe(
        backend.clone(),
        reporter.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(wait::release_orphans(
        backend.clone(),
        waiters.clone(),
        config.max_ttl,
        shutdown.clone(),
    ));

    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure()).build_v1()?;
    // grpcurl releases before 1.9 only speak v1alpha.
    let reflection_v1alpha =
        reflection(tonic_reflection::server::Builder::configure()).build_v1alpha()?;

    let service = LockService::new(
        backend,
        waiters,
        events,
        config.limits(),
        config.instance_id(),
        shutdown.clone(),
    );
    let addr = listener.local_addr()?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(%addr, workers, "lockd listening");
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::lock_service_server::LockServiceServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        () = signal => {}
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    health::set(&reporter, ServingStatus::NotServing).await;
    shutdown.cancel();
    match tokio::time::timeout(config.shutdown_grace, server).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => {
            tracing::warn!("grace period over with requests still in flight; exiting");
            Ok(())
        }
    }
}
