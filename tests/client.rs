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

/// The lockd log lines (colours removed) with message `what` (such as `extend`, `release` or
/// `keepalive`) about `resource`.
fn log_lines(setup: &Setup, resource: &str, what: &str) -> Vec<String> {
    let mut plain = String::new();
    let mut in_escape = false;
    for c in setup.lockd.log_text().chars() {
        match c {
            '\x1b' => in_escape = true,
            'm' if in_escape => in_escape = false,
            _ if !in_escape => plain.push(c),
            _ => {}
        }
    }
    plain
        .lines()
        .filter(|l| l.contains(&format!(": {what} ")))
        .filter(|l| {
            l.split(' ')
                .any(|field| field == format!("resource={resource}"))
        })
        .map(str::to_owned)
        .collect()
}

/// Waits (up to 2 s) for a lockd log line with message `what` about `resource` that contains
/// `text`: lockd logs a decision just after making it, so a test may see its effect first.
async fn wait_for_log(setup: &Setup, resource: &str, what: &str, text: &str) {
    let start = Instant::now();
    while !log_lines(setup, resource, what)
        .iter()
        .any(|l| l.contains(text))
    {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no `{what}` line with {text} for {resource}:\n{}",
            setup.lockd.log_text()
        );
        sleep(10 * MS).await;
    }
}

/// Waits until `guard` has been renewed at least once (its expiry moved).
async fn wait_until_renewed(guard: &LockGuard) {
    let first = guard.expires_at();
    let start = Instant::now();
    while guard.expires_at() == first {
        assert!(start.elapsed() < Duration::from_secs(2), "never renewed");
        sleep(5 * MS).await;
    }
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
    assert!(guard.fencing_token() > 0);
    assert!(guard.expires_at() > SystemTime::now() + Duration::from_secs(8));
    assert!(!format!("{guard:?}").contains(&lock_field(&setup, "job-1", "t").await.unwrap()));

    let attempt = b.try_lock("job-1", Duration::from_secs(10)).await.unwrap();
    assert!(!attempt.is_acquired());
    let holder = attempt.holder().cloned().expect("the holder is reported");
    assert_eq!(holder.owner, "scheduler-a");
    assert_eq!(holder.fencing_token, guard.fencing_token());
    assert_eq!(
        holder.labels.get("job").map(String::as_str),
        Some("nightly")
    );

    assert!(guard.release().await.unwrap());
    let again = acquired(b.try_lock("job-1", Duration::from_secs(10)).await.unwrap());
    assert!(again.fencing_token() > holder.fencing_token);
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
    let first_fence = first.fencing_token();
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
    assert!(second.fencing_token() > first_fence);
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
    // Renewed by heartbeats on a KeepAlive stream: not one Extend call.
    assert_eq!(
        log_lines(&setup, "long-job", "extend"),
        Vec::<String>::new()
    );
    assert!(guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_of_one_client_and_its_clones_share_one_session() {
    let setup = redis_setup().await;
    let a = lock_client(&setup).await;
    let clone = a.clone();
    let ttl = Duration::from_secs(3);
    let first = acquired(a.try_lock("shared-1", ttl).await.unwrap());
    let second = acquired(clone.try_lock("shared-2", ttl).await.unwrap());
    // Both leases are bound to the same Session stream (lockd records it as their renewer),
    // from the grant on, and stay so through renewals.
    let bound = lock_field(&setup, "shared-1", "k")
        .await
        .expect("bound to a session");
    assert_eq!(
        lock_field(&setup, "shared-2", "k").await.as_ref(),
        Some(&bound)
    );
    wait_until_renewed(&first).await;
    wait_until_renewed(&second).await;
    assert_eq!(
        lock_field(&setup, "shared-1", "k").await.as_ref(),
        Some(&bound)
    );
    // A client without sessions binds nothing at acquire time.
    let unary = LockClient::builder(setup.lockd.endpoint())
        .sessions(false)
        .connect()
        .await
        .unwrap();
    let third = acquired(unary.try_lock("unary-1", ttl).await.unwrap());
    assert_ne!(
        lock_field(&setup, "unary-1", "k").await.as_ref(),
        Some(&bound)
    );
    assert!(first.release().await.unwrap());
    assert!(second.release().await.unwrap());
    assert!(third.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_given_up_by_the_caller_is_given_up_at_lockd() {
    // A waiting lock() whose future is dropped must not be granted later and hold the lock for
    // its TTL with nobody to release it (on the session, the drop sends a cancel).
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let ttl = Duration::from_secs(30);
    let holder = acquired(a.try_lock("given-up", ttl).await.unwrap());
    let gave_up = timeout(300 * MS, b.lock("given-up", ttl, Duration::from_secs(10))).await;
    assert!(gave_up.is_err(), "the wait should still be running");
    sleep(200 * MS).await;
    assert!(holder.release().await.unwrap());
    sleep(300 * MS).await;
    let mut raw = setup.client().await;
    assert!(
        !is_locked(&mut raw, "given-up").await.locked,
        "the abandoned wait took the lock"
    );
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
    // Let the release's own aftermath settle first: when a released guard's KeepAlive stream
    // ends, lockd's session may still try to release the lease once (answered NOT_HELD).
    sleep(Duration::from_millis(300)).await;
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
    // Let the release's own aftermath settle first: when a released guard's KeepAlive stream
    // ends, lockd's session may still try to release the lease once (answered NOT_HELD).
    sleep(Duration::from_millis(300)).await;
    let calls = redis.script_calls().await;
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        redis.script_calls().await,
        calls,
        "the cancelled task kept renewing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_task_frees_the_lock_at_once_because_its_keepalive_stream_ends() {
    // Without sessions, each guard has its own KeepAlive stream, which its drop ends.
    aborted_task_frees_the_lock_at_once(false, "stream_closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_task_frees_the_lock_at_once_through_a_release_on_the_session() {
    // With the shared session (the default), the drop releases on the session.
    aborted_task_frees_the_lock_at_once(true, "session").await;
}

async fn aborted_task_frees_the_lock_at_once(sessions: bool, via: &str) {
    // The TTL is 30 s: only a release on the guard's drop explains a takeover within a second.
    let setup = redis_setup().await;
    let a = LockClient::builder(setup.lockd.endpoint())
        .sessions(sessions)
        .connect()
        .await
        .unwrap();
    let b = lock_client(&setup).await;
    let ttl = Duration::from_secs(30);
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let guard = acquired(a.try_lock("session-bound", ttl).await.unwrap());
        got_tx.send(()).unwrap();
        sleep(Duration::from_secs(3600)).await; // a stuck job
        drop(guard);
    });
    got_rx.await.unwrap();
    let waiter = tokio::spawn(async move {
        let attempt = b
            .lock("session-bound", ttl, Duration::from_secs(20))
            .await
            .unwrap();
        (acquired(attempt), Instant::now())
    });
    sleep(500 * MS).await;
    assert!(!waiter.is_finished(), "the waiter got the lock while held");

    let aborted_at = Instant::now();
    task.abort();
    let (other, got_at) = timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    let took = got_at.duration_since(aborted_at);
    eprintln!(
        "session-bound: the waiter got the lock {took:?} after the holder's task was aborted (TTL {ttl:?})"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Freed by lockd when the stream ended, or on the session; not by a Release call.
    wait_for_log(
        &setup,
        "session-bound",
        "release",
        &format!("via=\"{via}\""),
    )
    .await;
    assert!(
        log_lines(&setup, "session-bound", "release")
            .iter()
            .all(|l| !l.contains("via=\"rpc\"")),
        "released by a Release call"
    );
    assert!(other.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_guard_with_min_hold_keeps_the_lock_until_the_minimum_hold() {
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let start = Instant::now();
    let guard = acquired(
        a.lock_options("quick-tick")
            .ttl(Duration::from_secs(30))
            .min_hold(Duration::from_millis(1500))
            .acquire()
            .await
            .unwrap(),
    );
    drop(guard); // the job took no time at all

    sleep(300 * MS).await;
    assert!(
        !b.try_lock("quick-tick", Duration::from_secs(5))
            .await
            .unwrap()
            .is_acquired(),
        "the stream's end freed the lock before the minimum hold"
    );
    let later = acquired(
        b.lock("quick-tick", Duration::from_secs(5), Duration::from_secs(5))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_guard_with_expire_on_close_is_still_released_at_once() {
    // expire_on_close only spares a lease whose stream breaks; a dropped guard releases it.
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let ttl = Duration::from_secs(30);
    let guard = acquired(
        a.lock_options("kept-on-crash")
            .ttl(ttl)
            .expire_on_close(true)
            .acquire()
            .await
            .unwrap(),
    );
    wait_until_renewed(&guard).await;
    drop(guard);
    let (other, took) = acquire_within(&b, "kept-on-crash", ttl, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Through a Release call, since lockd was told to keep the lease when the stream ends.
    wait_for_log(&setup, "kept-on-crash", "release", "outcome=\"ok\"").await;
    assert_eq!(log_lines(&setup, "kept-on-crash", "release").len(), 1);
    assert!(other.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_survives_a_lockd_restart_by_opening_a_new_stream() {
    let mut setup = redis_setup().await;
    let a = lock_client(&setup).await;
    let ttl = Duration::from_secs(3);
    let guard = acquired(a.try_lock("restart", ttl).await.unwrap());
    let fence = guard.fencing_token();
    sleep(300 * MS).await;
    // SIGKILL: lockd's sessions die without releasing anything, and the lease stays in Redis.
    setup.lockd.restart().await;

    // Past the TTL counted from before the restart: only renewals on a new stream explain this.
    sleep(ttl + 500 * MS).await;
    assert!(!guard.is_lost(), "lost: {:?}", guard);
    let mut raw = setup.client().await;
    assert_eq!(
        owner(&mut raw, "restart").await.unwrap().fencing_token,
        fence
    );
    assert!(guard.release().await.unwrap());
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
    assert!(other.fencing_token() > guard.fencing_token());
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
    // The guard's stream renews once at once; steal the lock between two heartbeats.
    wait_until_renewed(&guard).await;
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
    // The closure's result: the lease's fencing token (which follows the clock) times ten.
    assert!(
        matches!(outcome, Outcome::Ran(n) if n > 10 && n % 10 == 0),
        "{outcome:?}"
    );
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
    assert_eq!(
        lock_field(&setup, "after-outage", "f").await,
        Some(guard.fencing_token().to_string()),
        "exactly one lease was granted"
    );
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

// ---- semaphores, fair waiting, listing ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_makes_a_semaphore_whose_guards_each_renew() {
    let setup = redis_setup().await;
    let (a, b, c) = (
        lock_client(&setup).await,
        lock_client(&setup).await,
        lock_client(&setup).await,
    );
    let ttl = Duration::from_secs(1);
    async fn take(client: &LockClient, owner: &str) -> Result<TryLock, Error> {
        client
            .lock_options("pool")
            .ttl(Duration::from_secs(1))
            .limit(2)
            .owner(owner)
            .acquire()
            .await
    }
    let first = acquired(take(&a, "a").await.unwrap());
    let second = acquired(take(&b, "b").await.unwrap());
    assert_ne!(first.fencing_token(), second.fencing_token());
    let third = take(&c, "c").await.unwrap();
    assert!(!third.is_acquired(), "a third holder of a semaphore of 2");

    // Both kept alive past the TTL, each by its own stream.
    sleep(Duration::from_millis(1500)).await;
    assert!(!first.is_lost() && !second.is_lost());
    let mut owners: Vec<String> = c
        .holders("pool")
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.owner)
        .collect();
    owners.sort();
    assert_eq!(owners, ["a", "b"]);

    // A mutex request on a semaphore is refused, not granted.
    match c.try_lock("pool", ttl).await {
        Err(Error::Rpc { code, .. }) => assert_eq!(code, tonic::Code::FailedPrecondition),
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }

    assert!(first.release().await.unwrap());
    let third = acquired(take(&c, "c").await.unwrap());
    assert_eq!(c.holders("pool").await.unwrap().len(), 2);
    assert!(second.release().await.unwrap());
    assert!(third.release().await.unwrap());
    assert!(c.holders("pool").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_waiters_get_the_lock_in_arrival_order_and_newcomers_cannot_jump_the_queue() {
    let setup = redis_setup().await;
    let holder = lock_client(&setup).await;
    let first = acquired(
        holder
            .try_lock("fifo", Duration::from_secs(30))
            .await
            .unwrap(),
    );
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..5 {
        let client = lock_client(&setup).await;
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let guard = acquired(
                client
                    .lock_options("fifo")
                    .ttl(Duration::from_secs(30))
                    .wait(Duration::from_secs(20))
                    .fair(true)
                    .acquire()
                    .await
                    .unwrap(),
            );
            order.lock().unwrap().push(i);
            sleep(50 * MS).await;
            assert!(guard.release().await.unwrap());
        }));
        sleep(100 * MS).await; // a clear arrival order
    }
    assert!(first.release().await.unwrap());
    // The lock is free, but the queue is not empty: a newcomer that does not wait fairly is
    // refused.
    let newcomer = lock_client(&setup).await;
    let jumped = newcomer
        .try_lock("fifo", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(!jumped.is_acquired(), "a newcomer jumped the fair queue");
    for waiter in waiters {
        timeout(Duration::from_secs(20), waiter)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_locks_returns_the_held_locks_under_a_prefix_without_tokens() {
    let setup = redis_setup().await;
    let a = lock_client(&setup).await;
    let mut guards = Vec::new();
    for resource in ["jobs/scan", "jobs/report", "other"] {
        guards.push(acquired(
            a.lock_options(resource)
                .owner("lister")
                .acquire()
                .await
                .unwrap(),
        ));
    }
    let mut listed: Vec<String> = a
        .list_locks("jobs/")
        .await
        .unwrap()
        .into_iter()
        .map(|l| {
            assert_eq!(l.owner, "lister");
            l.resource
        })
        .collect();
    listed.sort();
    assert_eq!(listed, ["jobs/report", "jobs/scan"]);
    assert_eq!(a.list_locks("").await.unwrap().len(), 3);
    for guard in guards {
        assert!(guard.release().await.unwrap());
    }
    assert!(a.list_locks("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_ended_while_their_stream_opens_release_their_own_lease_and_no_other() {
    // Dropping or releasing a guard at once races with its KeepAlive stream being opened: the
    // release must still happen (lockd may not have seen the stream's `keep` yet), and the end
    // of that stream must not take the next holder's lease with it.
    let setup = redis_setup().await;
    let (a, b) = (lock_client(&setup).await, lock_client(&setup).await);
    let ttl = Duration::from_secs(30);
    for i in 0..40 {
        let resource = format!("brief-{i}");
        drop(acquired(a.try_lock(&resource, ttl).await.unwrap()));
        let (other, took) = acquire_within(&b, &resource, ttl, Duration::from_secs(2)).await;
        assert!(took < Duration::from_secs(1), "{resource}: took {took:?}");
        assert!(
            other.release().await.unwrap(),
            "{resource}: the lease was gone"
        );
    }
}
