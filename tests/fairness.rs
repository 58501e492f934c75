//! Fair (FIFO) waiting: waiters are served in arrival order, across lockd replicas, and one
//! waiter giving up does not block the ones behind it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockd_client::proto::AcquireRequest;
use tokio::time::Instant;

use crate::support::*;

fn fair_req(resource: &str, wait: f64) -> AcquireRequest {
    AcquireRequest {
        fair: true,
        wait_timeout: Some(secs(wait)),
        ..acquire_req(resource, 30.0)
    }
}

/// Starts `n` fair waiters, one every 100 ms, spread over `endpoints`; waiter `cancel` gives up
/// (its client task is aborted) after all have arrived. Returns the order in which they got the
/// lock, after the holder releases it.
async fn serve_in_order(endpoints: &[String], n: usize, cancel: usize) -> Vec<usize> {
    let mut holder = lockd_client::connect(endpoints[0].clone()).await.unwrap();
    let lease = acquire_ok(&mut holder, "queue", 30.0).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = lockd_client::connect(endpoints[i % endpoints.len()].clone())
            .await
            .unwrap();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let reply = c
                .acquire(fair_req("queue", 60.0))
                .await
                .unwrap()
                .into_inner();
            let lease = reply.lease.expect("every fair waiter is served");
            order.lock().unwrap().push(i);
            // A newcomer that does not wait fairly cannot jump the queue.
            assert!(!try_acquire(&mut c, "queue", 30.0).await.acquired);
            release(&mut c, &lease).await;
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tasks[cancel].abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    release(&mut holder, &lease).await;
    // With the lock free, a newcomer that does not wait fairly still cannot jump the queue.
    let mut newcomer = lockd_client::connect(endpoints[0].clone()).await.unwrap();
    let jumped = try_acquire(&mut newcomer, "queue", 30.0).await;
    if let Some(l) = jumped.lease {
        release(&mut newcomer, &l).await;
        panic!("a newcomer took the lock ahead of the fair queue");
    }
    for (i, t) in tasks.into_iter().enumerate() {
        if i != cancel {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .unwrap()
                .unwrap();
        }
    }
    Arc::try_unwrap(order).unwrap().into_inner().unwrap()
}

crate::conformance_ha! {
    async fn twenty_fair_waiters_are_served_in_arrival_order(store: Store) {
        let s = Setup::new(store).await;
        let order = serve_in_order(&[s.lockd.endpoint()], 20, 7).await;
        let expected: Vec<usize> = (0..20).filter(|&i| i != 7).collect();
        assert_eq!(order, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_waiters_on_two_replicas_are_served_in_arrival_order() {
    let redis = RedisServer::start().await;
    let a = Lockd::start(Some(&redis)).await;
    let b = Lockd::start(Some(&redis)).await;
    let order = serve_in_order(&[a.endpoint(), b.endpoint()], 12, 3).await;
    let expected: Vec<usize> = (0..12).filter(|&i| i != 3).collect();
    assert_eq!(order, expected);
    // Nothing is left in the queue.
    let keys = redis.keys().await;
    assert!(keys.iter().all(|k| !k.ends_with(":queue")), "{keys:?}");
}

/// A lockd that crashes while one of its clients waits fairly leaves a queue entry behind. The
/// entry goes stale (it is no longer refreshed) and stops blocking the waiters behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_lockds_queue_entry_goes_stale_and_stops_blocking_the_queue() {
    let redis = RedisServer::start().await;
    let a = Lockd::start(Some(&redis)).await;
    let mut doomed = Lockd::start(Some(&redis)).await;
    let mut holder = a.client().await;
    let lease = acquire_ok(&mut holder, "queue", 60.0).await;

    // First in the queue: a waiter on the lockd that will crash.
    let mut early = doomed.client().await;
    let early_wait = tokio::spawn(async move { early.acquire(fair_req("queue", 60.0)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Second: a waiter on the surviving lockd.
    let mut late = a.client().await;
    let late_wait = tokio::spawn(async move { late.acquire(fair_req("queue", 60.0)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The first waiter's lockd dies (SIGKILL): its queue entry stays in Redis, unrefreshed.
    let started = Instant::now();
    doomed.kill();
    assert!(early_wait.await.unwrap().is_err());
    release(&mut holder, &lease).await;
    let r = tokio::time::timeout(Duration::from_secs(20), late_wait)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(r.into_inner().acquired);
    let waited = started.elapsed();
    eprintln!(
        "fair queue: the waiter behind a crashed lockd's entry got the lock after {waited:?}"
    );
    // The entry goes stale 6 s after its last refresh; the survivor looks again at least every 2 s.
    assert!(waited < Duration::from_secs(10), "{waited:?}");
}
