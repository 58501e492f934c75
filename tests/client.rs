//! The Rust client crate (`lockd-client`) against a real lockd and Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use deadpool_redis::redis;
use lockd_client::{Error, LockClient, LockGuard, LostReason, Outcome, TryLock};
use tokio::time::{Instant, sleep, timeout};

use crate::support::*;

// ---- helpers ----

const MS: Duration = Duration::from_millis(1);

async fn redis_setup() -> Setup {
    Setup::new(Store::Redis).await
}

/// A `LockClient` with its own connection to the setup's lockd.
async fn lock_client(setup: &Setup) -> LockClient {
    LockClient::connect(setup.lockd.endpoint()).await.unwrap()
}

fn acquired(attempt: TryLock) -> LockGuard {
    match attempt {
        TryLock::Acquired(guard) => guard,
        TryLock::Held(holder) => panic!("expected to acquire, held by {holder:?}"),
    }
}

fn redis_of(setup: &Setup) -> &RedisServer {
    setup.redis.as_ref().unwrap()
}

/// Deletes the lock's key behind lockd's back, as a Redis restart without persistence would.
async fn delete_lock_key(setup: &Setup, resource: &str) {
    let mut conn = redis_of(setup).connection().await.unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg(format!("lockd:{{{resource}}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the lock key should have existed");
}

/// A field of the lock's hash in Redis (`t` token, `o` owner, `f` fencing token).
async fn lock_field(setup: &Setup, resource: &str, field: &str) -> Option<String> {
    let mut conn = redis_of(setup).connection().await.unwrap();
    redis::cmd("HGET")
        .arg(format!("lockd:{{{resource}}}"))
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Polls `try_lock` until it succeeds or `limit` passes; returns the guard and the time taken.
async fn acquire_within(
    client: &LockClient,
    resource: &str,
    ttl: Duration,
    limit: Duration,
) -> (LockGuard, Duration) {
    let start = Instant::now();
    loop {
        if let TryLock::Acquired(guard) = client.try_lock(resource, ttl).await.unwrap() {
            return (guard, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "{resource} was not free within {limit:?}"
        );
        sleep(20 * MS).await;
    }
}

// ---- try_lock, lock ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_returns_the_holder_when_taken() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);

    let guard = acquired(
        a.lock_options("job-1")
            .ttl(Duration::from_secs(10))
            .owner("scheduler-a")
            .label("job", "nightly")
            .acquire()
            .await
            .unwrap(),
    );
    assert_eq!(guard.resource(), "job-1");
    assert_eq!(guard.fencing_token(), 1);
    assert!(guard.expires_at() > SystemTime::now() + Duration::from_secs(8));
    assert!(!format!("{guard:?}").contains(&lock_field(&setup, "job-1", "t").await.unwrap()));

    let attempt = b.try_lock("job-1", Duration::from_secs(10)).await.unwrap();
    assert!(!attempt.is_acquired());
    let holder = attempt.holder().cloned().expect("the holder is reported");
    assert_eq!(holder.owner, "scheduler-a");
    assert_eq!(holder.fencing_token, 1);
    assert_eq!(
        holder.labels.get("job").map(String::as_str),
        Some("nightly")
    );

    assert!(guard.release().await.unwrap());
    let again = acquired(b.try_lock("job-1", Duration::from_secs(10)).await.unwrap());
    assert_eq!(again.fencing_token(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waits_and_gets_it_after_release() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let first = acquired(a.try_lock("job-2", Duration::from_secs(30)).await.unwrap());

    let waiter = tokio::spawn(async move {
        let attempt = b
            .lock("job-2", Duration::from_secs(30), Duration::from_secs(10))
            .await
            .unwrap();
        (acquired(attempt), Instant::now())
    });
    sleep(500 * MS).await;
    assert!(!waiter.is_finished(), "the waiter got the lock while held");
    let released_at = Instant::now();
    assert!(first.release().await.unwrap());

    let (second, got_at) = timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(
        got_at.duration_since(released_at) < Duration::from_secs(1),
        "the waiter took {:?} after the release",
        got_at.duration_since(released_at)
    );
    assert_eq!(second.fencing_token(), 2);
    second.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_that_waits_past_the_ttl_gets_a_guard_that_is_not_lost() {
    // The waiter's TTL is shorter than its wait, so the renewal deadline must be counted from
    // the grant, not from when the waiting request was sent.
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let first = acquired(a.try_lock("job-3", Duration::from_secs(30)).await.unwrap());
    let waiter = tokio::spawn(async move {
        b.lock("job-3", Duration::from_secs(1), Duration::from_secs(10))
            .await
            .unwrap()
    });
    sleep(Duration::from_millis(1500)).await;
    first.release().await.unwrap();
    let second = acquired(waiter.await.unwrap());
    sleep(Duration::from_millis(1500)).await;
    assert!(!second.is_lost(), "the guard should still be renewing");
    assert!(second.release().await.unwrap());
}

// ---- renewal ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_renews_so_a_job_longer_than_the_ttl_keeps_the_lock() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let guard = acquired(
        a.try_lock("long-job", Duration::from_secs(1))
            .await
            .unwrap(),
    );
    let fence = guard.fencing_token();
    let first_expiry = guard.expires_at();

    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let attempt = b
            .try_lock("long-job", Duration::from_secs(1))
            .await
            .unwrap();
        let holder = attempt
            .holder()
            .cloned()
            .expect("another client got the lock while the guard was held");
        assert_eq!(holder.fencing_token, fence);
        sleep(200 * MS).await;
    }
    assert!(!guard.is_lost());
    assert_eq!(guard.fencing_token(), fence);
    assert!(guard.expires_at() > first_expiry + Duration::from_secs(1));
    assert!(guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_guard_releases_promptly_and_stops_renewal() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let ttl = Duration::from_secs(3);
    let guard = acquired(a.try_lock("drop-me", ttl).await.unwrap());
    drop(guard);

    // Released well before the TTL.
    let (other, took) = acquire_within(&b, "drop-me", ttl, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(other.release().await.unwrap());

    // No renewal outlives the guard: nothing calls a script any more, over more than two of
    // the dropped guard's renewal periods.
    let redis = redis_of(&setup);
    let calls = redis.script_calls().await;
    sleep(Duration::from_millis(2500)).await;
    assert_eq!(redis.script_calls().await, calls, "something kept renewing");
    assert!(redis.keys().await.iter().all(|k| !k.ends_with("{drop-me}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_task_stops_renewal_and_the_lock_frees() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let ttl = Duration::from_secs(2);
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let guard = acquired(a.try_lock("cancel-me", ttl).await.unwrap());
        got_tx.send(()).unwrap();
        sleep(Duration::from_secs(3600)).await; // a stuck job
        drop(guard);
    });
    got_rx.await.unwrap();
    sleep(Duration::from_millis(1000)).await; // at least one renewal happened
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    // Free by the TTL at the latest (in fact at once: the drop releases).
    let (other, took) = acquire_within(&b, "cancel-me", ttl, ttl + 500 * MS).await;
    assert!(took <= ttl, "took {took:?}");
    assert!(other.release().await.unwrap());
    let redis = redis_of(&setup);
    let calls = redis.script_calls().await;
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        redis.script_calls().await,
        calls,
        "the cancelled task kept renewing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hold_caps_renewals() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let start = Instant::now();
    let guard = acquired(
        a.lock_options("capped")
            .ttl(Duration::from_secs(1))
            .max_hold(Duration::from_millis(2500))
            .acquire()
            .await
            .unwrap(),
    );
    let lost = guard.lost();

    // Renewed past the first TTL...
    sleep(Duration::from_millis(1600)).await;
    assert!(
        !b.try_lock("capped", Duration::from_secs(1))
            .await
            .unwrap()
            .is_acquired()
    );
    // ...but not past the maximum hold.
    let reason = timeout(Duration::from_secs(3), lost).await.unwrap();
    assert_eq!(reason, LostReason::MaxHold);
    let at = start.elapsed();
    assert!(
        at >= Duration::from_millis(2000) && at < Duration::from_millis(3500),
        "lost at {at:?}"
    );
    let other = acquired(
        b.lock("capped", Duration::from_secs(1), Duration::from_secs(2))
            .await
            .unwrap(),
    );
    assert!(start.elapsed() < Duration::from_millis(3500));
    assert_eq!(other.fencing_token(), guard.fencing_token() + 1);
    assert!(
        !guard.release().await.unwrap(),
        "the capped lease had ended"
    );
}

// ---- loss ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_when_the_lease_is_taken_away() {
    let setup = redis_setup().await;
    let a = lock_client(&setup).await;
    let guard = acquired(
        a.try_lock("taken", Duration::from_millis(1500))
            .await
            .unwrap(),
    );
    let lost = guard.lost();
    delete_lock_key(&setup, "taken").await;
    let deleted_at = Instant::now();

    // The next renewal (within a third of the TTL) answers NOT_HELD.
    let reason = timeout(Duration::from_secs(2), lost).await.unwrap();
    assert_eq!(reason, LostReason::NotHeld);
    assert!(deleted_at.elapsed() < Duration::from_millis(1200));
    assert!(guard.is_lost());
    assert!(!guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_when_the_lease_is_taken_over_by_another_holder() {
    let setup = redis_setup().await;
    let (a, mut raw) = (lock_client(&setup).await, setup.client().await);
    let guard = acquired(
        a.try_lock("stolen", Duration::from_millis(1500))
            .await
            .unwrap(),
    );
    delete_lock_key(&setup, "stolen").await;
    acquire_ok(&mut raw, "stolen", 30.0).await;
    let reason = timeout(Duration::from_secs(2), guard.lost()).await.unwrap();
    assert_eq!(reason, LostReason::HeldByOther);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_by_the_deadline_when_redis_is_gone() {
    let mut setup = redis_setup().await;
    let a = lock_client(&setup).await;
    let ttl = Duration::from_millis(1500);
    let guard = acquired(a.try_lock("orphan", ttl).await.unwrap());
    let acquired_at = Instant::now();
    setup.redis.as_mut().unwrap().kill();

    // Renewals get UNAVAILABLE and are retried, but the lease cannot be trusted past its TTL.
    let reason = timeout(Duration::from_secs(3), guard.lost()).await.unwrap();
    assert_eq!(reason, LostReason::Expired);
    let at = acquired_at.elapsed();
    assert!(at <= ttl + 500 * MS, "lost only after {at:?}");
    assert!(at >= ttl / 3, "lost too early: {at:?}");
}

// ---- run_exclusive ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exclusive_skips_with_the_holder_when_held_and_runs_otherwise() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let guard = acquired(
        a.lock_options("report")
            .owner("scheduler-a")
            .acquire()
            .await
            .unwrap(),
    );

    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let outcome = b
        .run_exclusive("report", Duration::from_secs(5), |_| async move {
            flag.store(true, Ordering::SeqCst);
        })
        .await
        .unwrap();
    match outcome {
        Outcome::Skipped(Some(holder)) => assert_eq!(holder.owner, "scheduler-a"),
        other => panic!("expected Skipped with the holder, got {other:?}"),
    }
    assert!(!ran.load(Ordering::SeqCst));

    guard.release().await.unwrap();
    let outcome = b
        .run_exclusive("report", Duration::from_secs(5), |lease| async move {
            assert_eq!(lease.resource, "report");
            sleep(200 * MS).await;
            lease.fencing_token * 10
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Ran(20));
    // Released afterwards.
    assert!(b.holder("report").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exclusive_cancels_the_job_when_the_lock_is_lost() {
    let setup = redis_setup().await;
    let a = lock_client(&setup).await;
    let finished = Arc::new(AtomicBool::new(false));
    let flag = finished.clone();
    let run = a
        .lock_options("fragile")
        .ttl(Duration::from_millis(900))
        .run(|_| async move {
            sleep(Duration::from_secs(5)).await;
            flag.store(true, Ordering::SeqCst);
        });
    let deleter = async {
        sleep(200 * MS).await;
        delete_lock_key(&setup, "fragile").await;
    };
    let start = Instant::now();
    let (result, ()) = tokio::join!(run, deleter);
    match result {
        Err(Error::LockLost { resource, reason }) => {
            assert_eq!(resource, "fragile");
            assert_eq!(reason, LostReason::NotHeld);
        }
        other => panic!("expected LockLost, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    sleep(200 * MS).await;
    assert!(!finished.load(Ordering::SeqCst), "the job kept running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exclusive_with_min_hold_keeps_the_lock_after_a_quick_job() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let start = Instant::now();
    let outcome = a
        .lock_options("tick")
        .ttl(Duration::from_secs(5))
        .min_hold(Duration::from_millis(1500))
        .run(|_| async { sleep(50 * MS).await })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Ran(()));

    // A late instance's tick finds the lock still held...
    assert!(
        !b.try_lock("tick", Duration::from_secs(5))
            .await
            .unwrap()
            .is_acquired()
    );
    // ...until the minimum hold has passed.
    let later = acquired(
        b.lock("tick", Duration::from_secs(5), Duration::from_secs(4))
            .await
            .unwrap(),
    );
    let at = start.elapsed();
    assert!(
        at >= Duration::from_millis(1400) && at < Duration::from_millis(3000),
        "free again at {at:?}"
    );
    later.release().await.unwrap();
}

// ---- retries and tokens ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_retries_unavailable_with_the_same_token_and_gets_a_lease() {
    let mut setup = redis_setup().await;
    let a = lock_client(&setup).await;
    setup.redis.as_mut().unwrap().kill();

    let start = Instant::now();
    let attempt = tokio::spawn(async move {
        a.lock_options("after-outage")
            .ttl(Duration::from_secs(10))
            .token("client-chosen-token")
            .acquire()
            .await
    });
    sleep(Duration::from_millis(1000)).await;
    assert!(
        !attempt.is_finished(),
        "the acquire gave up during the outage"
    );
    setup.redis.as_mut().unwrap().restart().await;

    let guard = acquired(attempt.await.unwrap().unwrap());
    assert!(start.elapsed() >= Duration::from_millis(1000));
    assert_eq!(guard.fencing_token(), 1, "exactly one lease was granted");
    assert_eq!(
        lock_field(&setup, "after-outage", "t").await.as_deref(),
        Some("client-chosen-token")
    );
    assert!(guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_gives_up_after_the_retry_policy() {
    let mut setup = redis_setup().await;
    let a = LockClient::builder(setup.lockd.endpoint())
        .retry(
            lockd_client::RetryPolicy::default()
                .max_attempts(3)
                .initial_backoff(50 * MS),
        )
        .connect()
        .await
        .unwrap();
    setup.redis.as_mut().unwrap().kill();
    let err = a
        .try_lock("never", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_with_the_current_token_gets_the_same_lease_back() {
    // What makes retried acquires safe: a repeat with the same token is the same grant.
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let first = acquired(
        a.lock_options("idempotent")
            .token("token-1")
            .acquire()
            .await
            .unwrap(),
    );
    let second = acquired(
        b.lock_options("idempotent")
            .token("token-1")
            .acquire()
            .await
            .unwrap(),
    );
    assert_eq!(second.fencing_token(), first.fencing_token());
    assert!(first.release().await.unwrap());
    assert!(!second.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_options_are_reported_not_retried() {
    let setup = redis_setup().await;
    let a = lock_client(&setup).await;
    let err = a
        .lock_options("bad")
        .owner("bad\nowner")
        .acquire()
        .await
        .unwrap_err();
    match err {
        Error::InvalidArgument(msg) => assert!(msg.contains("owner"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}
