//! Minimum hold (ShedLock's lockAtLeastFor): a released lease keeps the lock until its
//! minimum-hold point, then frees itself.

use std::time::Duration;

use lockd_client::proto::{LeaseStatus, ReleaseRequest};
use tokio::time::Instant;

use crate::support::*;

crate::conformance_ha! {
    async fn lock_released_with_a_minimum_hold_stays_held_until_then(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let acquired = Instant::now();
        let lease = acquire_ok(&mut c, "tick-job", 30.0).await;
        // The job takes 50 ms; the lock must be held at least 1 s after acquisition.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = c
            .release(ReleaseRequest {
                resource: "tick-job".into(),
                token: lease.token.clone(),
                min_hold: Some(secs(1.0)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.released);
        let frees_at = r.frees_at.unwrap();
        let expires = lease.expires_at.unwrap();
        // acquired + 1 s = expires_at - 30 s + 1 s (same clock).
        assert!((frees_at.seconds - (expires.seconds - 29)).abs() <= 1, "{frees_at:?}");
        // Refused to every token meanwhile, even its own, and it cannot be extended.
        assert!(!try_acquire(&mut c, "tick-job", 30.0).await.acquired);
        assert_eq!(extend(&mut c, &lease, 30.0, false).await.status(), LeaseStatus::NotHeld);
        let mut again = acquire_req("tick-job", 30.0);
        again.token = lease.token.clone();
        assert!(!c.acquire(again).await.unwrap().into_inner().acquired);
        assert!(is_locked(&mut c, "tick-job").await.locked);
        // A waiter gets it just after the minimum-hold point.
        let r = wait_acquire(&mut c, "tick-job", 30.0, 5.0).await;
        let got = acquired.elapsed();
        assert!(r.acquired);
        assert!(got >= Duration::from_millis(950), "too early: {got:?}");
        assert!(got < Duration::from_millis(2500), "too late: {got:?}");
    }

    async fn keep_until_in_the_past_releases_at_once(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 30.0).await;
        let r = c
            .release(ReleaseRequest {
                resource: "job-1".into(),
                token: lease.token.clone(),
                keep_until: Some(prost_types::Timestamp { seconds: 1_000, nanos: 0 }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.released);
        assert!(!is_locked(&mut c, "job-1").await.locked);
    }

    async fn keep_until_holds_the_lock_until_that_time(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 30.0).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let until = now + Duration::from_millis(700);
        c.release(ReleaseRequest {
            resource: "job-1".into(),
            token: lease.token.clone(),
            keep_until: Some(prost_types::Timestamp {
                seconds: until.as_secs() as i64,
                nanos: until.subsec_nanos() as i32,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(!try_acquire(&mut c, "job-1", 30.0).await.acquired);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(try_acquire(&mut c, "job-1", 30.0).await.acquired);
    }
}
