//! Semaphores: up to `limit` holders, each with its own token and fencing token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockd_client::proto::{AcquireRequest, LeaseStatus};
use tokio::time::Instant;

use crate::support::*;

fn sem_req(resource: &str, limit: u32, ttl: f64) -> AcquireRequest {
    AcquireRequest {
        limit,
        ..acquire_req(resource, ttl)
    }
}

/// The most holders at once, from windows that each lie inside a real holding time.
fn max_concurrent(windows: &[(Instant, Instant)]) -> usize {
    let mut points: Vec<(Instant, i32)> = Vec::new();
    for (from, to) in windows {
        points.push((*from, 1));
        points.push((*to, -1));
    }
    // At equal instants, ends come before starts: touching windows do not overlap.
    points.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in points {
        now += d;
        max = max.max(now);
    }
    max as usize
}

crate::conformance_ha! {
    async fn a_semaphore_admits_up_to_its_limit_and_reports_its_holders(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut leases = Vec::new();
        for i in 0..3 {
            let mut r = sem_req("pool", 3, 30.0);
            r.owner = format!("worker-{i}");
            let reply = c.acquire(r).await.unwrap().into_inner();
            assert!(reply.acquired);
            leases.push(reply.lease.unwrap());
        }
        let fences: Vec<_> = leases.iter().map(|l| l.fencing_token).collect();
        assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
        let full = c.acquire(sem_req("pool", 3, 30.0)).await.unwrap().into_inner();
        assert!(!full.acquired);
        assert_eq!(full.holder.unwrap().owner, "worker-0");
        let locked = is_locked(&mut c, "pool").await;
        assert!(locked.locked);
        assert_eq!((locked.holders, locked.limit), (3, 3));
        let owners = c
            .get_owner(lockd_client::proto::GetOwnerRequest { resource: "pool".into() })
            .await
            .unwrap()
            .into_inner();
        let names: Vec<_> = owners.holders.iter().map(|h| h.owner.as_str()).collect();
        assert_eq!(names, vec!["worker-0", "worker-1", "worker-2"]);
        assert_eq!(owners.limit, 3);
        // Releasing one slot admits one more; extend works per holder.
        assert!(extend(&mut c, &leases[1], 10.0, true).await.extended);
        assert!(release(&mut c, &leases[0]).await.released);
        assert!(c.acquire(sem_req("pool", 3, 30.0)).await.unwrap().into_inner().acquired);
        assert_eq!(release(&mut c, &leases[0]).await.status(), LeaseStatus::NotHeld);
    }

    async fn expired_semaphore_holders_free_their_slots(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        c.acquire(sem_req("pool", 2, 0.3)).await.unwrap();
        c.acquire(sem_req("pool", 2, 30.0)).await.unwrap();
        assert!(!c.acquire(sem_req("pool", 2, 30.0)).await.unwrap().into_inner().acquired);
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(c.acquire(sem_req("pool", 2, 30.0)).await.unwrap().into_inner().acquired);
        assert_eq!(is_locked(&mut c, "pool").await.holders, 2);
    }

    async fn a_resource_is_either_a_mutex_or_a_semaphore_with_one_limit(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        acquire_ok(&mut c, "mutex", 30.0).await;
        let status = c.acquire(sem_req("mutex", 4, 30.0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("is a mutex"), "{status:?}");
        c.acquire(sem_req("sem", 4, 30.0)).await.unwrap();
        let status = c.acquire(acquire_req("sem", 30.0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("semaphore with limit 4"), "{status:?}");
        let status = c.acquire(sem_req("sem", 5, 30.0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }

    async fn a_semaphore_of_three_never_has_four_holders_under_32_clients(store: Store) {
        let s = Setup::new(store).await;
        let windows = Arc::new(Mutex::new(Vec::new()));
        let stop_at = Instant::now() + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let mut c = s.client().await;
            let windows = windows.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop_at {
                    let mut r = sem_req("pool", 3, 5.0);
                    r.wait_timeout = Some(secs(1.0));
                    let reply = c.acquire(r).await.unwrap().into_inner();
                    let Some(lease) = reply.lease else { continue };
                    let from = Instant::now();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let to = Instant::now();
                    assert!(release(&mut c, &lease).await.released);
                    windows.lock().unwrap().push((from, to));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let windows = windows.lock().unwrap();
        assert!(windows.len() > 100, "only {} leases", windows.len());
        let max = max_concurrent(&windows);
        assert!(max <= 3, "{max} holders at once");
        assert!(max >= 2, "the test never saw concurrent holders ({max})");
    }
}

#[test]
fn the_checker_counts_overlapping_windows() {
    let t = Instant::now();
    let ms = |n| t + Duration::from_millis(n);
    assert_eq!(
        max_concurrent(&[(ms(0), ms(10)), (ms(5), ms(15)), (ms(10), ms(20))]),
        2
    );
    assert_eq!(
        max_concurrent(&[(ms(0), ms(10)), (ms(1), ms(9)), (ms(2), ms(8))]),
        3
    );
}
