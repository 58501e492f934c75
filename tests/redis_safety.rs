//! Running over a Redis that is not quite right: a foreign value under a lock key.

use std::time::Duration;

use deadpool_redis::redis;
use tokio::time::{Instant, sleep};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::support::*;

async fn health(lockd: &Lockd) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(lockd.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "lockd.v1.LockService".into(),
        })
        .await
        .unwrap();
    reply.into_inner().status()
}

async fn health_becomes(lockd: &Lockd, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(lockd).await != want {
        assert!(
            Instant::now() < deadline,
            "health never became {want:?}; log:\n{}",
            lockd.log_text()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

async fn redis_cmd<T: redis::FromRedisValue>(redis: &RedisServer, cmd: &mut redis::Cmd) -> T {
    let mut c = redis.connection().await.unwrap();
    cmd.query_async(&mut c).await.unwrap()
}

// ---- script errors ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_error_answers_internal_not_unavailable() {
    let redis = RedisServer::start().await;
    // A foreign string where lockd keeps the lock hash: every script on it fails with WRONGTYPE.
    let _: String = redis_cmd(&redis, redis::cmd("SET").arg("lockd:{x}").arg("a string")).await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut c = lockd.client().await;
    let status = c.acquire(acquire_req("x", 30.0)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("WRONGTYPE"), "{status:?}");
    // Other resources are fine, and so is the server.
    acquire_ok(&mut c, "y", 30.0).await;
    health_becomes(&lockd, ServingStatus::Serving).await;
}
