//! lockd: distributed locks as a gRPC service, kept in Redis and changed only by Lua scripts.
//!
//! # Layout
//! - [`config`]: the one `Config` struct, from flags and environment.
//! - [`lock`]: domain types (tokens, leases, outcomes), free of gRPC and Redis.
//! - [`locks`]: the lock core, the one owner of lock semantics: acquire (and waiting, woken by
//!   releases and expiries, never polled), release on every path, extend, inspect, watch.
//! - [`backend`]: the `Backend` trait, with the in-memory and Redis implementations.
//! - [`events`]: lock events for `Watch`.
//! - [`service`]: the gRPC adapter: parse the request, call the core, convert the result.
//! - [`error`]: the crate's error and its one mapping to `tonic::Status`.
//! - [`auth`]: API keys, namespaces and access levels; [`tls`]: TLS and mutual TLS.
//! - [`overload`]: the caps on requests, waiters, streams and connections.
//! - [`health`], [`shutdown`], [`telemetry`]: running as a well-behaved server.
//! - [`metrics`]: the Prometheus metrics (`--metrics-listen`); the lock core records them.
//!
//! [`run`] binds the configured address; [`serve`] takes a listener, which is the seam tests use.

pub mod auth;
pub mod backend;
pub mod config;
pub mod error;
pub mod events;
pub mod health;
pub mod lock;
pub mod locks;
pub mod metrics;
pub mod overload;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use lockd_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::auth::Auth;
use crate::backend::{Backend, MemoryBackend, RedisBackend};
pub use crate::config::Config;
use crate::events::Events;
use crate::locks::Locks;
use crate::locks::held::HeldLeases;
use crate::locks::waiters::Waiters;
use crate::overload::{Connections, Gate, InFlightLayer};
use crate::service::LockService;
use crate::tls::{Tls, TlsFiles};

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
/// Fails when the configuration is unsafe (see [`Config::validate`]), the Redis URL is invalid,
/// or the server fails.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    config.validate()?;
    if let Some(listen) = config.metrics_listen {
        metrics::install(listen)?;
    }
    let auth = match &config.auth_file {
        Some(file) => Auth::load(file).map_err(|e| format!("refusing to start: {e}"))?,
        None => {
            tracing::warn!(
                "no auth file (LOCKD_AUTH_FILE): lockd is open; anyone who can reach it can \
                 take, release and watch every lock"
            );
            Auth::open()
        }
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(
            Tls::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca.clone(),
            })
            .map_err(|e| format!("refusing to start: {e}"))?,
        ),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    let hub = Hub {
        waiters: Arc::default(),
        events: Arc::default(),
        auth,
        tls,
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
            tracing::info!(redis = %redis.describe(), prefix = %redis.key_prefix, "using Redis");
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

/// What the service and the backend share: wake-ups, events, the keys, and the shutdown
/// signal.
struct Hub {
    waiters: Arc<Waiters>,
    events: Arc<Events>,
    auth: Auth,
    tls: Option<Tls>,
    shutdown: CancellationToken,
}

/// Reloads the auth file and the TLS certificates on each SIGHUP until shutdown. A file that
/// fails to load leaves the settings in force and is logged.
async fn reload_on_sighup(auth: Auth, tls: Option<Tls>, shutdown: CancellationToken) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!(
            "cannot listen for SIGHUP: the auth file and certificates will not be reloaded"
        );
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        if auth.enabled() {
            match auth.reload() {
                Ok(keys) => tracing::info!(keys, "SIGHUP: auth file reloaded"),
                Err(e) => tracing::error!("SIGHUP: {e}; the keys loaded before stay in force"),
            }
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                Err(e) => {
                    tracing::error!("SIGHUP: {e}; the certificates loaded before stay in force");
                }
            }
        }
    }
}

/// The accepted connections, with Nagle's algorithm off. The builder's `tcp_nodelay` does not
/// reach sockets served from our own listener: with Nagle on, a reply written in two parts
/// waited about 40 ms for the client's delayed ACK (a Watch event: 42 ms instead of 0.1 ms).
/// TCP keepalive finds clients that vanished without closing, such as a KeepAlive stream's
/// host that lost power.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}

/// Largest header block a client may send (names, values and their overhead): room for an
/// `authorization` header and tracing metadata, far from a memory problem.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Streams a client may reset before the server has accepted them (the HTTP/2 "rapid reset"
/// attack); beyond it the connection is closed.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// HTTP/2 ping interval on a connection, and how long an answer may take before the connection
/// is closed: finds peers that stopped answering without closing.
const HTTP2_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const HTTP2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP/2 settings that stop one client from opening endless streams or holding the
/// server with stalled ones (see docs/limits.md).
fn http2_limits(builder: tonic::transport::Server, config: &Config) -> tonic::transport::Server {
    builder
        .max_concurrent_streams(config.http2_max_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_keepalive_interval(Some(HTTP2_PING_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_PING_TIMEOUT))
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
        auth,
        tls,
        shutdown,
    } = hub;
    tokio::spawn(reload_on_sighup(
        auth.clone(),
        tls.clone(),
        shutdown.clone(),
    ));
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set(&reporter, ServingStatus::NotServing).await;
    tokio::spawn(health::probe(
        backend.clone(),
        reporter.clone(),
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

    let held = HeldLeases::new(
        config.metrics_listen.is_some(),
        metrics::Prefixes::new(&config.metrics_resource_prefixes),
    );
    let caps = config.caps();
    let gate = Arc::new(Gate::new(caps));
    let locks = Locks::new(
        backend,
        waiters,
        events,
        config.limits(),
        config.instance_id(),
        shutdown.clone(),
        Arc::new(held),
        gate.clone(),
    );
    let service = LockService::new(Arc::new(locks), auth, gate);
    let addr = listener.local_addr()?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let tls_mode = match &tls {
        None => "off",
        Some(t) if t.mutual() => "mutual",
        Some(_) => "on",
    };
    tracing::info!(%addr, workers, tls = tls_mode, "lockd listening");
    let router = http2_limits(tonic::transport::Server::builder(), &config)
        .layer(telemetry::RpcLayer)
        .layer(InFlightLayer::new(caps.in_flight))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::lock_service_server::LockServiceServer::new(service)
                .max_decoding_message_size(config.max_message_bytes as usize),
        );
    let stop = shutdown.clone().cancelled_owned();
    let connections = Connections::new(caps.connections);
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > =
        match tls {
            None => Box::pin(
                router.serve_with_incoming_shutdown(connections.cap(incoming(listener)), stop),
            ),
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                connections.cap(tls.incoming(incoming(listener))),
                stop,
            )),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = accepted.next().await.unwrap().unwrap();
        assert!(
            server_side.nodelay().unwrap(),
            "TCP_NODELAY must be set on every accepted connection"
        );
    }
}
