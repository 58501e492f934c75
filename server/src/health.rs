//! Health: a probe loop that pings the backend and keeps the standard `grpc.health.v1.Health`
//! service in step, so load balancers see `NOT_SERVING` while Redis is down (or cannot be used
//! safely: see [`Backend::ping`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::backend::Backend;
use crate::error::Error;

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
        let result = match tokio::time::timeout(PROBE_EVERY * 4, backend.ping()).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "no answer to the health ping within {:?}",
                PROBE_EVERY * 4
            ))),
        };
        let ok = result.is_ok();
        crate::metrics::backend_up(ok);
        if last != Some(ok) {
            match result {
                Ok(()) => {
                    tracing::info!(backend = backend.name(), "backend reachable: SERVING");
                    set(&reporter, ServingStatus::Serving).await;
                }
                Err(e) => {
                    tracing::warn!(backend = backend.name(), error = %e, "backend unusable: NOT_SERVING");
                    set(&reporter, ServingStatus::NotServing).await;
                }
            }
            last = Some(ok);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}
