//! Blocking acquires: woken by release or expiry, never by polling; cancelled waiters leave
//! nothing behind; one release wakes one waiter.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::*;

crate::conformance! {
    async fn a_waiting_retry_with_the_holders_token_succeeds_at_once_while_others_wait(store: Store) {
        let s = Setup::new(store).await;
        let mut holder = s.client().await;
        let mut req = acquire_req("job-1", 60.0);
        req.token = "scheduler-7-token".into();
        let lease = holder.acquire(req.clone()).await.unwrap().into_inner().lease.unwrap();
        let mut other = s.client().await;
        let queued = tokio::spawn(async move { wait_acquire(&mut other, "job-1", 60.0, 20.0).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The holder retries its Acquire (say, after a lost reply), as a waiting request.
        req.wait_timeout = Some(secs(20.0));
        let retry = tokio::time::timeout(Duration::from_secs(2), holder.acquire(req))
            .await
            .expect("the retry must not queue behind the other waiter")
            .unwrap()
            .into_inner();
        assert!(retry.acquired);
        assert_eq!(retry.lease.unwrap().fencing_token, lease.fencing_token);
        assert!(!queued.is_finished());
        queued.abort();
    }

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
        // Fencing tokens follow the clock now (no longer +1 per grant), so this only checks
        // that the token grew.
        assert!(new_lease.fencing_token > lease.fencing_token);
        if let Some(redis) = &s.redis {
            assert_eq!(redis.keys().await, vec!["lockd:{job-1}", "lockd:{job-1}:fence"]);
        }
    }
}

/// With 20 waiters on one resource, only the first asks Redis while the lock is held (the others
/// queue behind it in lockd), and a release wakes that waiter alone: the release and one
/// attempt, and no herd. Counted as script calls in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_waiters_cost_one_attempt_and_a_release_wakes_only_one_of_them() {
    let s = Setup::new(Store::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let mut holder = s.client().await;
    // Redis loads each script on its first call (NOSCRIPT, then a retry): load them now.
    let warm_up = acquire_ok(&mut holder, "warm-up", 60.0).await;
    release(&mut holder, &warm_up).await;
    let lease = acquire_ok(&mut holder, "job-1", 60.0).await;
    let start = redis.script_calls().await;
    let mut waiters = Vec::new();
    for _ in 0..20 {
        let mut c = s.client().await;
        waiters.push(tokio::spawn(async move {
            wait_acquire(&mut c, "job-1", 60.0, 30.0).await
        }));
    }
    // The first waiter has tried; give the others time to queue behind it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.script_calls().await == start {
        assert!(Instant::now() < deadline, "no waiter tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = redis.script_calls().await;
    assert_eq!(before - start, 1, "only the first waiter may ask Redis");
    release(&mut holder, &lease).await;
    // Wait for the new holder, then let any herd show up.
    let deadline = Instant::now() + Duration::from_secs(5);
    let winner = loop {
        if let Some(i) = waiters.iter().position(|w| w.is_finished()) {
            break waiters.remove(i);
        }
        assert!(Instant::now() < deadline, "no waiter got the lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = redis.script_calls().await - before;
    assert_eq!(
        calls, 2,
        "the release and one attempt; got {calls} script calls"
    );
    let got = winner.await.unwrap();
    assert!(got.acquired);
    assert!(got.lease.unwrap().fencing_token > lease.fencing_token);
    assert!(waiters.iter().all(|w| !w.is_finished()));
    for w in waiters {
        w.abort();
    }
}

/// A release with a waiter on the same lockd publishes one wake-up, and the waiter takes the
/// lock with its own attempt: its owner, a greater fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_local_waiter_with_one_message_and_it_takes_the_lock() {
    use futures_util::StreamExt as _;
    let s = Setup::new(Store::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let mut messages = wake_up_messages(redis).await;
    let mut holder = s.client().await;
    let lease = acquire_ok(&mut holder, "job-1", 30.0).await;
    let mut waiter = s.client().await;
    let wait = tokio::spawn(async move {
        let mut req = acquire_req("job-1", 30.0);
        req.owner = "next-in-line".into();
        req.wait_timeout = Some(secs(10.0));
        waiter.acquire(req).await.unwrap().into_inner()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(release(&mut holder, &lease).await.released);
    let got = tokio::time::timeout(Duration::from_secs(2), wait)
        .await
        .unwrap()
        .unwrap();
    assert!(got.acquired);
    let new_lease = got.lease.unwrap();
    assert!(new_lease.fencing_token > lease.fencing_token);
    let info = owner(&mut holder, "job-1").await.unwrap();
    assert_eq!(
        (info.owner.as_str(), info.fencing_token),
        ("next-in-line", new_lease.fencing_token)
    );
    let first = tokio::time::timeout(Duration::from_millis(300), messages.next()).await;
    assert!(first.is_ok(), "the release published no wake-up");
    let second = tokio::time::timeout(Duration::from_millis(300), messages.next()).await;
    assert!(
        second.is_err(),
        "one release published more than one wake-up"
    );
    let mut c = s.client().await;
    assert!(release(&mut c, &new_lease).await.released);
    assert!(owner(&mut c, "job-1").await.is_none());
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
    let mut messages = wake_up_messages(redis).await;
    let mut c = s.client().await;

    let lease = acquire_ok(&mut c, "quiet", 30.0).await;
    release(&mut c, &lease).await;
    let none = tokio::time::timeout(Duration::from_millis(300), messages.next()).await;
    assert!(none.is_err(), "an uncontended release published a wake-up");

    // The waiter is on another lockd replica: the release wakes it through Redis.
    let lease = acquire_ok(&mut c, "busy", 30.0).await;
    let replica = Lockd::start(Some(redis)).await;
    let mut waiter = replica.client().await;
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

/// The wake-up messages lockd publishes on `lockd:released`, from now on.
async fn wake_up_messages(
    redis: &RedisServer,
) -> impl futures_util::Stream<Item = deadpool_redis::redis::Msg> {
    let client = deadpool_redis::redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("lockd:released").await.unwrap();
    pubsub.into_on_message()
}
