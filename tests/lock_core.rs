//! Regression tests for the lock core's less-travelled paths: semaphore waiters, stale fair
//! queue entries, KeepAlive release-on-close, stream limits, and unsafe configuration. Each
//! failed before its fix.

use std::process::{Command, Stdio};
use std::time::Duration;

use deadpool_redis::redis as redis_cmd;
use lockd_client::proto::{AcquireRequest, KeepAliveRequest, LeaseRef, LeaseStatus};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

fn sem_req(resource: &str, limit: u32, ttl: f64, wait: f64) -> AcquireRequest {
    AcquireRequest {
        limit,
        wait_timeout: (wait > 0.0).then(|| secs(wait)),
        ..acquire_req(resource, ttl)
    }
}

fn lease_ref(lease: &lockd_client::proto::Lease, ttl: f64) -> LeaseRef {
    LeaseRef {
        resource: lease.resource.clone(),
        token: lease.token.clone(),
        ttl: Some(secs(ttl)),
    }
}

/// Starts a waiting semaphore Acquire on its own connection; resolves to whether it was granted.
async fn waiter(s: &Setup, resource: &str, limit: u32, wait: f64) -> tokio::task::JoinHandle<bool> {
    let mut c = s.client().await;
    let req = sem_req(resource, limit, 60.0, wait);
    tokio::spawn(async move { c.acquire(req).await.unwrap().into_inner().acquired })
}

crate::conformance! {
    async fn a_semaphore_waiter_takes_a_slot_freed_by_expiry_after_another_waiter_was_served(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let a = c.acquire(sem_req("slots", 2, 1.5, 0.0)).await.unwrap().into_inner();
        let b = c.acquire(sem_req("slots", 2, 60.0, 0.0)).await.unwrap().into_inner();
        assert!(a.acquired && b.acquired);
        let w1 = waiter(&s, "slots", 2, 10.0).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let w2 = waiter(&s, "slots", 2, 10.0).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        release(&mut c, b.lease.as_ref().unwrap()).await;
        assert!(w1.await.unwrap(), "the released slot goes to the first waiter");
        // A's lease expires at 1.5 s: its slot must go to the second waiter, long before the
        // 10 s wait ends.
        assert!(w2.await.unwrap(), "the second waiter slept through a free slot");
    }

    async fn two_quick_semaphore_releases_fill_two_slots(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let a = c.acquire(sem_req("pair", 2, 60.0, 0.0)).await.unwrap().into_inner();
        let b = c.acquire(sem_req("pair", 2, 60.0, 0.0)).await.unwrap().into_inner();
        let w1 = waiter(&s, "pair", 2, 10.0).await;
        let w2 = waiter(&s, "pair", 2, 10.0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (ra, rb) = tokio::join!(
            release(&mut c, a.lease.as_ref().unwrap()),
            async {
                let mut c2 = s.client().await;
                release(&mut c2, b.lease.as_ref().unwrap()).await
            }
        );
        assert!(ra.released && rb.released);
        let started = Instant::now();
        assert!(w1.await.unwrap() && w2.await.unwrap(), "both freed slots must be filled");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    async fn release_on_close_spares_a_lease_renewed_by_a_newer_stream(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "guarded", 3.0).await;
        // S1 keeps the lease, then the client opens S2, which renews the same token.
        let (tx1, rx1) = mpsc::channel(4);
        let mut replies1 = c.keep_alive(ReceiverStream::new(rx1)).await.unwrap().into_inner();
        tx1.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 3.0)], ..Default::default() }).await.unwrap();
        assert_eq!(replies1.message().await.unwrap().unwrap().leases[0].status(), LeaseStatus::Ok);
        let mut c2 = s.client().await;
        let (tx2, rx2) = mpsc::channel(4);
        let mut replies2 = c2.keep_alive(ReceiverStream::new(rx2)).await.unwrap().into_inner();
        tx2.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 3.0)], ..Default::default() }).await.unwrap();
        assert_eq!(replies2.message().await.unwrap().unwrap().leases[0].status(), LeaseStatus::Ok);
        // lockd now notices that S1 ended: it must not undo S2's renewal.
        drop(tx1);
        drop(replies1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut other = s.client().await;
        assert!(!try_acquire(&mut other, "guarded", 30.0).await.acquired, "S1's close released a lease S2 keeps");
        tx2.send(KeepAliveRequest::default()).await.unwrap();
        let r = replies2.message().await.unwrap().unwrap();
        assert_eq!(r.leases[0].status(), LeaseStatus::Ok);
        assert_eq!(r.leases[0].fencing_token, lease.fencing_token);
    }

    async fn a_waiter_takes_the_lock_when_the_holder_shortens_its_lease(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "shortened", 60.0).await;
        let w = waiter(&s, "shortened", 1, 4.0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The waiter armed its timer for the 60 s expiry; the lease now ends in 0.3 s.
        assert!(extend(&mut c, &lease, 0.3, true).await.extended);
        assert!(w.await.unwrap(), "the waiter slept through the shortened lease's end");
    }

    async fn a_semaphore_waiter_takes_a_slot_whose_holder_shortened_its_lease(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let a = c.acquire(sem_req("shortened-slots", 2, 60.0, 0.0)).await.unwrap().into_inner();
        let b = c.acquire(sem_req("shortened-slots", 2, 60.0, 0.0)).await.unwrap().into_inner();
        assert!(a.acquired && b.acquired);
        let w = waiter(&s, "shortened-slots", 2, 4.0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A re-acquire with its own token and a shorter TTL shortens the lease too.
        let mut again = sem_req("shortened-slots", 2, 0.3, 0.0);
        again.token = b.lease.as_ref().unwrap().token.clone();
        assert!(c.acquire(again).await.unwrap().into_inner().acquired);
        assert!(w.await.unwrap(), "the waiter slept through the shortened lease's end");
    }

    async fn a_keepalive_stream_may_keep_only_so_many_leases(store: Store) {
        let s = Setup::with_env(store, &[("LOCKD_MAX_STREAM_LEASES", "10")]).await;
        let mut c = s.client().await;
        let refs: Vec<_> = (0..11)
            .map(|i| LeaseRef { resource: format!("r{i}"), token: format!("t{i}"), ttl: Some(secs(5.0)) })
            .collect();
        let (tx, rx) = mpsc::channel(4);
        let mut replies = c.keep_alive(ReceiverStream::new(rx)).await.unwrap().into_inner();
        tx.send(KeepAliveRequest { keep: refs, ..Default::default() }).await.unwrap();
        let err = replies.message().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("keep") && err.message().contains("10"), "{}", err.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_fair_queue_entry_does_not_keep_a_plain_waiter_asleep() {
    let s = Setup::new(Store::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let mut conn = redis.connection().await.unwrap();
    // A fair waiter of a lockd that died: its entry goes stale in 2 s and nobody removes it.
    let (secs_now, micros): (i64, i64) =
        redis_cmd::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs_now * 1000 + micros / 1000;
    let _: () = redis_cmd::pipe()
        .cmd("ZADD")
        .arg("lockd:{stale-q}:queue")
        .arg(now_ms)
        .arg("dead-waiter")
        .ignore()
        .cmd("HSET")
        .arg("lockd:{stale-q}:qexp")
        .arg("dead-waiter")
        .arg(now_ms + 2000)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut c = s.client().await;
    let started = Instant::now();
    let r = wait_acquire(&mut c, "stale-q", 30.0, 10.0).await;
    assert!(
        r.acquired,
        "the waiter slept to its deadline while the lock was free"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the entry went stale at 2 s, but the waiter got the lock only after {:?}",
        started.elapsed()
    );
}

/// Runs the lockd binary with `env` and returns its exit code and log, failing if it keeps
/// running (it accepted the configuration).
async fn refused(env: &[(&str, &str)]) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!(
        "lockd-config-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("lockd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockd"))
        .env_clear()
        .env("LOCKD_LISTEN", format!("127.0.0.1:{}", free_port()))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (
                status.code().unwrap_or(-1),
                std::fs::read_to_string(&log).unwrap_or_default(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lockd started with {env:?}; it must refuse this configuration");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn unsafe_configuration_is_refused_at_start_naming_the_setting() {
    for (env, setting) in [
        (&[("LOCKD_DEFAULT_TTL", "0s")][..], "LOCKD_DEFAULT_TTL"),
        (
            &[("LOCKD_DEFAULT_TTL", "2h"), ("LOCKD_MAX_TTL", "1h")][..],
            "LOCKD_DEFAULT_TTL",
        ),
        (
            &[("LOCKD_MAX_WAIT", "18446744073709551615s")][..],
            "LOCKD_MAX_WAIT",
        ),
    ] {
        let (code, log) = refused(env).await;
        assert_ne!(code, 0, "{env:?}");
        assert!(log.contains(setting), "the log must name {setting}: {log}");
    }
}

/// Fair waiters on two replicas: when the one ahead is granted, the one behind it (which only
/// knew when the first one's queue entry would go stale) must learn when its lease ends, and
/// take the lock then. Found by the history checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_waiter_takes_the_lock_when_the_lease_of_the_fair_waiter_ahead_ends() {
    let redis = RedisServer::start().await;
    let a = Lockd::start(Some(&redis)).await;
    let b = Lockd::start(Some(&redis)).await;
    let mut holder = a.client().await;
    let lease = acquire_ok(&mut holder, "fifo", 60.0).await;
    let fair = |ttl: f64, wait: f64| AcquireRequest {
        fair: true,
        wait_timeout: Some(secs(wait)),
        ..acquire_req("fifo", ttl)
    };
    let mut first = a.client().await;
    let first_req = fair(0.5, 10.0);
    let first = tokio::spawn(async move { first.acquire(first_req).await.unwrap().into_inner() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = b.client().await;
    // Its wait ends before its first queue refresh (every 2 s), which would also look again.
    let second_req = fair(30.0, 1.8);
    let second =
        tokio::spawn(async move { second.acquire(second_req).await.unwrap().into_inner() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Replica A stops for a moment, so B's waiter sees the lock free but the first waiter ahead
    // of it in the queue: it can only wait for that entry to go stale (6 s)...
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, &a.pid().to_string()])
            .status()
            .unwrap();
    };
    signal("-STOP");
    let mut releaser = b.client().await;
    assert!(release(&mut releaser, &lease).await.released);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal("-CONT");
    // ...until A's waiter takes the lock for 0.5 s, which must wake it.
    assert!(first.await.unwrap().acquired);
    let started = Instant::now();
    let got = second.await.unwrap();
    assert!(
        got.acquired,
        "the second fair waiter slept through the first one's expiry"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A waiter with its own token whose wait ends while a release of the lock is in flight, and
/// which then retries with the same token (which the docs call safe), keeps what it got: no
/// background task releases that token's lease behind its back. (Before issue 9, the release
/// handed the lock to the departed waiter, and an orphan task released the handed lease by
/// token, freeing the lease the retry had just been given: a double grant.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_token_after_a_wait_ends_mid_release_keeps_its_lease() {
    // One Redis connection, so Redis runs lockd's calls in the order lockd sends them.
    let s = Setup::with_env(Store::Redis, &[("LOCKD_REDIS_POOL_SIZE", "1")]).await;
    let redis = s.redis.as_ref().unwrap();
    let mut holder = s.client().await;
    // Redis loads each script on its first call (NOSCRIPT, then a retry): load them now.
    let warm_up = acquire_ok(&mut holder, "warm-up", 60.0).await;
    release(&mut holder, &warm_up).await;
    let lease = acquire_ok(&mut holder, "retried", 60.0).await;
    let token = "client-chosen-token".to_owned();
    let own = |wait: f64| AcquireRequest {
        token: token.clone(),
        wait_timeout: (wait > 0.0).then(|| secs(wait)),
        ..acquire_req("retried", 30.0)
    };
    let mut waiter = s.client().await;
    let first = own(1.0);
    let wait = tokio::spawn(async move {
        let r = waiter.acquire(first).await.unwrap().into_inner();
        (r, waiter)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Redis stops answering; the release is sent and stays in flight past the waiter's deadline.
    redis.pause();
    let release = tokio::spawn(async move { release(&mut holder, &lease).await });
    let (r, mut waiter) = wait.await.unwrap();
    assert!(!r.acquired, "the wait ended at its deadline");
    // The client retries with its token; then Redis answers again.
    let retry_req = own(0.0);
    let retry = tokio::spawn(async move { waiter.acquire(retry_req).await.unwrap().into_inner() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.resume();
    assert!(release.await.unwrap().released);
    let retried = retry.await.unwrap();
    assert!(
        retried.acquired,
        "the lock was free for the retry: {retried:?}"
    );
    // The retry's lease (30 s) must still hold: nobody else may take the lock now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut third = s.client().await;
    let r = try_acquire(&mut third, "retried", 30.0).await;
    assert!(
        !r.acquired,
        "a third client got the lock the retry holds: a double grant"
    );
}
