//! Blocking acquires: woken by release or expiry, never by polling; cancelled waiters leave
//! nothing behind; one release wakes one waiter.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::*;

crate::conformance! {
    async fn blocking_waiter_is_woken_by_the_release(store: Store) {
        let s = Setup::new(store).await;
        let mut holder = s.client().await;
        let lease = acquire_ok(&mut holder, "job-1", 60.0).await;
        let mut waiter = s.client().await;
        let wait = tokio::spawn(async move {
            let r = wait_acquire(&mut waiter, "job-1", 30.0, 20.0).await;
            (r, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!wait.is_finished(), "the waiter must wait while the lock is held");
        let released_at = Instant::now();
        assert!(release(&mut holder, &lease).await.released);
        let (r, got_at) = wait.await.unwrap();
        assert!(r.acquired);
        assert!(r.lease.unwrap().fencing_token > lease.fencing_token);
        // Woken by the release itself: the holder's TTL (60 s) and the wait (20 s) are far away.
        let woken_after = got_at.saturating_duration_since(released_at);
        assert!(woken_after < Duration::from_secs(2), "woken {woken_after:?} after the release");
    }

    async fn blocking_waiter_gets_the_lock_when_the_holder_expires(store: Store) {
        let s = Setup::new(store).await;
        let mut holder = s.client().await;
        acquire_ok(&mut holder, "job-1", 0.5).await;
        let mut waiter = s.client().await;
        let started = Instant::now();
        let r = wait_acquire(&mut waiter, "job-1", 30.0, 10.0).await;
        assert!(r.acquired, "expiry must wake the waiter: {:?}", r.holder);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    async fn wait_that_times_out_answers_not_acquired_with_the_holder(store: Store) {
        let s = Setup::new(store).await;
        let mut holder = s.client().await;
        let mut req = acquire_req("job-1", 60.0);
        req.owner = "long-job".into();
        holder.acquire(req).await.unwrap();
        let mut waiter = s.client().await;
        let started = Instant::now();
        let r = wait_acquire(&mut waiter, "job-1", 30.0, 0.4).await;
        assert!(!r.acquired);
        assert_eq!(r.holder.unwrap().owner, "long-job");
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    async fn waiters_that_give_up_leave_nothing_behind(store: Store) {
        let s = Setup::new(store).await;
        let mut holder = s.client().await;
        let lease = acquire_ok(&mut holder, "job-1", 60.0).await;
        // Five waiters whose gRPC deadline passes, and five whose client task is aborted.
        let mut tasks = Vec::new();
        for i in 0..10 {
            let mut c = s.client().await;
            tasks.push(tokio::spawn(async move {
                let mut req = tonic::Request::new({
                    let mut r = acquire_req("job-1", 30.0);
                    r.wait_timeout = Some(secs(30.0));
                    r
                });
                if i % 2 == 0 {
                    req.set_timeout(Duration::from_millis(200));
                }
                c.acquire(req).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        for (i, t) in tasks.into_iter().enumerate() {
            if i % 2 == 0 {
                // tonic's server answers an expired grpc-timeout with CANCELLED "Timeout expired".
                let code = t.await.unwrap().unwrap_err().code();
                assert!(matches!(code, tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{code:?}");
            } else {
                t.abort();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A new waiter, behind the departed ones, is still woken at once by the release.
        let mut waiter = s.client().await;
        let wait = tokio::spawn(async move { wait_acquire(&mut waiter, "job-1", 30.0, 20.0).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        release(&mut holder, &lease).await;
        let r = tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap().unwrap();
        assert!(r.acquired);
        let new_lease = r.lease.unwrap();
        // Nobody else got the lock in between: the departed waiters did not acquire.
        assert_eq!(new_lease.fencing_token, lease.fencing_token + 1);
        if let Some(redis) = &s.redis {
            assert_eq!(redis.keys().await, vec!["lockd:{job-1}", "lockd:{job-1}:fence"]);
        }
    }
}

/// With 20 waiters on one resource, one release costs one retry (plus the release itself), not
/// twenty: counted as script calls in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_one_waiter_not_all_of_them() {
    let s = Setup::new(Store::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let mut holder = s.client().await;
    let lease = acquire_ok(&mut holder, "job-1", 60.0).await;
    let mut waiters = Vec::new();
    for _ in 0..20 {
        let mut c = s.client().await;
        waiters.push(tokio::spawn(async move {
            wait_acquire(&mut c, "job-1", 60.0, 30.0).await
        }));
    }
    // Every waiter has made its first attempt.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.script_calls().await < 21 {
        assert!(Instant::now() < deadline, "waiters did not all try");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = redis.script_calls().await;
    release(&mut holder, &lease).await;
    // Wait for the new holder, then let any herd show up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !waiters.iter().any(|w| w.is_finished()) {
        assert!(Instant::now() < deadline, "no waiter got the lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = redis.script_calls().await - before;
    // 1 release + 1 acquire by the woken waiter. The woken waiter hands its place on with the
    // new lease's expiry, so the next waiter does not need to ask Redis.
    assert!(calls <= 3, "one release caused {calls} script calls");
    assert_eq!(waiters.iter().filter(|w| w.is_finished()).count(), 1);
    for w in waiters {
        w.abort();
    }
}

/// Waiters on two lockd replicas sharing one Redis are woken through Redis pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_on_one_replica_wakes_a_waiter_on_another() {
    let redis = RedisServer::start().await;
    let a = Lockd::start(Some(&redis)).await;
    let b = Lockd::start(Some(&redis)).await;
    let mut holder = a.client().await;
    let lease = acquire_ok(&mut holder, "job-1", 60.0).await;
    let mut waiter = b.client().await;
    let wait = tokio::spawn(async move { wait_acquire(&mut waiter, "job-1", 30.0, 20.0).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released_at = Instant::now();
    release(&mut holder, &lease).await;
    let r = wait.await.unwrap();
    assert!(r.acquired);
    assert!(released_at.elapsed() < Duration::from_secs(2));
}

/// Uncontended releases cost no wake-up message: release.lua publishes one only when a waiting
/// request has seen the lease (or a fair queue exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_publishes_a_wake_up_only_when_someone_waited() {
    use futures_util::StreamExt as _;
    let s = Setup::new(Store::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let client = deadpool_redis::redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("lockd:released").await.unwrap();
    let mut messages = pubsub.into_on_message();
    let mut c = s.client().await;

    let lease = acquire_ok(&mut c, "quiet", 30.0).await;
    release(&mut c, &lease).await;
    let none = tokio::time::timeout(Duration::from_millis(300), messages.next()).await;
    assert!(none.is_err(), "an uncontended release published a wake-up");

    let lease = acquire_ok(&mut c, "busy", 30.0).await;
    let mut waiter = s.client().await;
    let wait = tokio::spawn(async move { wait_acquire(&mut waiter, "busy", 30.0, 10.0).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    release(&mut c, &lease).await;
    let msg = tokio::time::timeout(Duration::from_secs(2), messages.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.get_payload::<String>().unwrap(), "busy\n");
    assert!(wait.await.unwrap().acquired);
}
