//! Running lockd: restarts, Redis outages, health, shutdown, and the operator's grpcurl.

use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_keep_increasing_across_a_lockd_restart() {
    let redis = RedisServer::start().await;
    let mut lockd = Lockd::start(Some(&redis)).await;
    let mut c = lockd.client().await;
    let first = acquire_ok(&mut c, "job-1", 30.0).await;
    release(&mut c, &first).await;
    let held = acquire_ok(&mut c, "job-1", 30.0).await;
    lockd.restart().await;
    let mut c = lockd.client().await;
    // The lease survives the restart (it lives in Redis), with its token.
    assert_eq!(
        owner(&mut c, "job-1").await.unwrap().fencing_token,
        held.fencing_token
    );
    assert!(release(&mut c, &held).await.released);
    let after = acquire_ok(&mut c, "job-1", 30.0).await;
    assert!(after.fencing_token > held.fencing_token && held.fencing_token > first.fencing_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_gives_unavailable_and_not_serving_then_recovers_without_restart() {
    let mut redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut c = lockd.client().await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    acquire_ok(&mut c, "job-1", 30.0).await;

    redis.kill();
    for rpc in 0..4 {
        let status = match rpc {
            0 => c.acquire(acquire_req("job-2", 30.0)).await.map(|_| ()),
            1 => c
                .release(lockd_client::proto::ReleaseRequest {
                    resource: "job-1".into(),
                    token: "t".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            2 => c
                .is_locked(lockd_client::proto::IsLockedRequest {
                    resource: "job-1".into(),
                })
                .await
                .map(|_| ()),
            _ => c
                .get_owner(lockd_client::proto::GetOwnerRequest {
                    resource: "job-1".into(),
                })
                .await
                .map(|_| ()),
        }
        .expect_err("no answer while Redis is down");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    // A blocking acquire fails too, rather than waiting on a store it cannot reach.
    let mut req = acquire_req("job-2", 30.0);
    req.wait_timeout = Some(secs(5.0));
    assert_eq!(
        c.acquire(req).await.unwrap_err().code(),
        tonic::Code::Unavailable
    );
    health_becomes(&lockd, ServingStatus::NotServing).await;

    redis.restart().await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    // Same lockd process, same client connection: normal service again.
    let lease = acquire_ok(&mut c, "job-2", 30.0).await;
    assert!(release(&mut c, &lease).await.released);
    assert!(lockd.log_text().contains("NOT_SERVING"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_still_woken_after_the_redis_subscription_reconnects() {
    let mut redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    redis.restart().await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "job-1", 60.0).await;
    // Give the subscriber time to come back (it retries with a backoff of at most 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut waiter = lockd.client().await;
    let wait = tokio::spawn(async move { wait_acquire(&mut waiter, "job-1", 30.0, 20.0).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released_at = Instant::now();
    release(&mut c, &lease).await;
    assert!(wait.await.unwrap().acquired);
    assert!(released_at.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_waiters_with_unavailable_and_exits_promptly() {
    let redis = RedisServer::start().await;
    let mut lockd = Lockd::start(Some(&redis)).await;
    let mut holder = lockd.client().await;
    acquire_ok(&mut holder, "job-1", 60.0).await;
    let mut waiter = lockd.client().await;
    let wait = tokio::spawn(async move {
        let mut req = acquire_req("job-1", 30.0);
        req.wait_timeout = Some(secs(60.0));
        waiter.acquire(req).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert!(
        lockd.terminate(Duration::from_secs(8)).await,
        "lockd did not exit after SIGTERM"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let status = wait.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend_warns_that_locks_are_local() {
    let lockd = Lockd::start(None).await;
    let log = lockd.log_text();
    assert!(log.contains("embedded in-memory backend"), "{log}");
    health_becomes(&lockd, ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn design_note_redis_variables_configure_the_backend_and_secrets_stay_out_of_logs() {
    let redis = RedisServer::start().await;
    let port = redis.port.to_string();
    let lockd = Lockd::start_with(
        None,
        &[
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PORT", &port),
            ("REDIS_DB", "0"),
            ("LOCKD_LOG_FORMAT", "json"),
        ],
    )
    .await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "job-1", 30.0).await;
    release(&mut c, &lease).await;
    // The lock went to this Redis.
    let keys = redis.keys().await;
    assert_eq!(keys, vec!["lockd:{job-1}:fence"]);
    let log = lockd.log_text();
    assert!(
        log.lines()
            .all(|l| l.trim().is_empty() || l.starts_with('{')),
        "JSON lines: {log}"
    );
    assert!(log.contains("\"outcome\":\"acquired\""), "{log}");
    assert!(!log.contains(&lease.token), "a token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_can_list_and_use_the_service_with_grpcurl() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let addr = lockd.addr();
    let list = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(list.lines().any(|l| l == "lockd.v1.LockService"), "{list}");
    assert!(list.lines().any(|l| l == "grpc.health.v1.Health"), "{list}");
    let acquired = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"resource": "nightly-scan", "ttl": "30s", "owner": "ops-laptop"}"#,
        &addr,
        "lockd.v1.LockService/Acquire",
    ]);
    assert!(acquired.contains(r#""acquired": true"#), "{acquired}");
    assert!(acquired.contains(r#""ttl": "30s""#), "{acquired}");
    let owner = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"resource": "nightly-scan"}"#,
        &addr,
        "lockd.v1.LockService/GetOwner",
    ]);
    assert!(owner.contains(r#""owner": "ops-laptop""#), "{owner}");
    assert!(owner.contains(r#""fencingToken": ""#), "{owner}");
    assert!(
        !owner.contains("token\": \"test-"),
        "GetOwner must not show the token: {owner}"
    );
    let described = grpcurl(&["-plaintext", &addr, "describe", "lockd.v1.AcquireRequest"]);
    assert!(described.contains("wait_timeout"), "{described}");
    let listed = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"prefix": "nightly"}"#,
        &addr,
        "lockd.v1.LockService/ListLocks",
    ]);
    assert!(listed.contains(r#""resource": "nightly-scan""#), "{listed}");
    assert!(
        !listed.contains("test-"),
        "ListLocks must not show tokens: {listed}"
    );

    // Watch through grpcurl: it prints the events until its deadline ends the stream.
    let watch_addr = addr.clone();
    let watcher = tokio::task::spawn_blocking(move || {
        Command::new("grpcurl")
            .args([
                "-plaintext",
                "-max-time",
                "5",
                "-d",
                r#"{"prefix": "nightly"}"#,
            ])
            .args([watch_addr.as_str(), "lockd.v1.LockService/Watch"])
            .output()
            .unwrap()
    });
    // grpcurl starts its Watch after reflection, which may take a while on a busy machine:
    // take and release the lock until its deadline has passed, so some events come after it.
    let mut c = lockd.client().await;
    let mut tokens = Vec::new();
    while !watcher.is_finished() {
        let lease = acquire_ok(&mut c, "nightly-report", 30.0).await;
        assert!(release(&mut c, &lease).await.released);
        tokens.push(lease.token);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = watcher.await.unwrap();
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(events.contains("LOCK_EVENT_TYPE_ACQUIRED"), "{events}");
    assert!(
        events.contains(r#""resource": "nightly-report""#),
        "{events}"
    );
    assert!(tokens.iter().all(|t| !events.contains(t.as_str())));
}
