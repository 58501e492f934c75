//! Health: a probe loop that pings the backend and keeps the standard `grpc.health.v1.Health`
//! service in step, so load balancers see `NOT_SERVING` while Redis is down.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::backend::Backend;

/// How often the backend is pinged.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// The names reported: the whole server ("") and `lockd.v1.LockService`.
const SERVICES: [&str; 2] = ["", "lockd.v1.LockService"];

/// Sets every service's status.
pub async fn set(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// Pings the backend every half second and reports the result until `shutdown`.
pub async fn probe<B: Backend>(
    backend: Arc<B>,
    reporter: HealthReporter,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        let ok = matches!(
            tokio::time::timeout(PROBE_EVERY * 4, backend.ping()).await,
            Ok(Ok(()))
        );
        if last != Some(ok) {
            if ok {
                tracing::info!(backend = backend.name(), "backend reachable: SERVING");
                set(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!(backend = backend.name(), "backend unreachable: NOT_SERVING");
                set(&reporter, ServingStatus::NotServing).await;
            }
            last = Some(ok);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}
