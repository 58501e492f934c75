//! The lock semantics, proved on both backends (embedded memory and Redis) through gRPC.

use std::time::Duration;

use crate::support::*;

crate::conformance_ha! {
    // The design note's first case: acquire, then release, and the lock is free again.
    async fn acquire_then_release_frees_the_lock(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 30.0).await;
        assert!(is_locked(&mut c, "job-1").await.locked);
        let r = release(&mut c, &lease).await;
        assert!(r.released);
        assert_eq!(r.status(), lockd_client::proto::LeaseStatus::Ok);
        assert!(!is_locked(&mut c, "job-1").await.locked);
        assert!(owner(&mut c, "job-1").await.is_none());
        acquire_ok(&mut c, "job-1", 30.0).await;
    }

    // The design note's second case: a second acquire is refused while the lock is held, and
    // says who holds it.
    async fn second_acquire_is_refused_and_names_the_holder(store: Store) {
        let s = Setup::new(store).await;
        let mut a = s.client().await;
        let mut b = s.client().await;
        let mut req = acquire_req("job-1", 30.0);
        req.owner = "scheduler-1 on host-a".into();
        req.labels.insert("job".into(), "nightly-scan".into());
        let lease = a.acquire(req).await.unwrap().into_inner().lease.unwrap();
        let refused = try_acquire(&mut b, "job-1", 30.0).await;
        assert!(!refused.acquired);
        assert!(refused.lease.is_none());
        let holder = refused.holder.expect("holder reported");
        assert_eq!(holder.owner, "scheduler-1 on host-a");
        assert_eq!(holder.fencing_token, lease.fencing_token);
        assert_eq!(holder.labels.get("job").map(String::as_str), Some("nightly-scan"));
    }

    // The design note's third case: a lock frees itself after its TTL.
    async fn lock_expires_after_its_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let first = acquire_ok(&mut c, "job-1", 0.3).await;
        assert!(!try_acquire(&mut c, "job-1", 30.0).await.acquired);
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(!is_locked(&mut c, "job-1").await.locked);
        let second = acquire_ok(&mut c, "job-1", 30.0).await;
        assert!(second.fencing_token > first.fencing_token);
        // The expired holder can no longer release or extend.
        assert_eq!(
            release(&mut c, &first).await.status(),
            lockd_client::proto::LeaseStatus::HeldByOther
        );
    }

    // The design note's fourth case, scoped use: whatever the job does, the lock is released
    // at the end of the scope.
    async fn scoped_use_releases_the_lock_even_when_the_job_fails(store: Store) {
        let s = Setup::new(store).await;
        let mut c = lockd_client::connect(s.lockd.endpoint()).await.unwrap();
        async fn with_lock<T>(
            c: &mut Client,
            resource: &str,
            job: impl std::future::Future<Output = Result<T, String>>,
        ) -> Option<Result<T, String>> {
            let reply = try_acquire(c, resource, 30.0).await;
            let lease = reply.lease?;
            let out = job.await;
            release(c, &lease).await;
            Some(out)
        }
        let failed = with_lock(&mut c, "job-1", async { Err::<(), _>("boom".to_string()) }).await;
        assert_eq!(failed, Some(Err("boom".to_string())));
        assert!(!is_locked(&mut c, "job-1").await.locked);
        let ran = with_lock(&mut c, "job-1", async { Ok(7) }).await;
        assert_eq!(ran, Some(Ok(7)));
    }

    async fn fencing_tokens_strictly_increase_across_release_and_expiry(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut last = 0;
        for round in 0..6 {
            let lease = acquire_ok(&mut c, "job-1", if round % 2 == 0 { 30.0 } else { 0.05 }).await;
            assert!(lease.fencing_token > last, "{} after {last}", lease.fencing_token);
            last = lease.fencing_token;
            if round % 2 == 0 {
                release(&mut c, &lease).await;
            } else {
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
        }
    }

    async fn reacquire_with_the_current_token_keeps_the_fencing_token_and_refreshes_the_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut req = acquire_req("job-1", 1.0);
        req.token = "client-chosen-token-1".into();
        let first = c.acquire(req.clone()).await.unwrap().into_inner().lease.unwrap();
        assert_eq!(first.token, "client-chosen-token-1");
        tokio::time::sleep(Duration::from_millis(300)).await;
        req.ttl = Some(secs(30.0));
        let again = c.acquire(req).await.unwrap().into_inner();
        assert!(again.acquired, "the retry with the same token must succeed");
        let again = again.lease.unwrap();
        assert_eq!(again.fencing_token, first.fencing_token);
        let remaining = to_std(&is_locked(&mut c, "job-1").await.remaining.unwrap());
        assert!(remaining > Duration::from_secs(25), "TTL refreshed, got {remaining:?}");
        // Another token is still refused.
        assert!(!try_acquire(&mut c, "job-1", 30.0).await.acquired);
    }

    async fn release_and_extend_with_a_wrong_token_change_nothing(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 30.0).await;
        let mut forged = lease.clone();
        forged.token = "not-the-token".into();
        let r = release(&mut c, &forged).await;
        assert!(!r.released);
        assert_eq!(r.status(), lockd_client::proto::LeaseStatus::HeldByOther);
        let before = to_std(&is_locked(&mut c, "job-1").await.remaining.unwrap());
        let e = extend(&mut c, &forged, 600.0, true).await;
        assert!(!e.extended);
        assert!(e.lease.is_none());
        assert_eq!(e.status(), lockd_client::proto::LeaseStatus::HeldByOther);
        let after = to_std(&is_locked(&mut c, "job-1").await.remaining.unwrap());
        assert!(after <= before, "a wrong token must not extend ({before:?} -> {after:?})");
        assert_eq!(owner(&mut c, "job-1").await.unwrap().fencing_token, lease.fencing_token);
        // The real token still works.
        assert!(release(&mut c, &lease).await.released);
    }

    async fn release_and_extend_of_a_free_lock_report_not_held(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 30.0).await;
        assert!(release(&mut c, &lease).await.released);
        let again = release(&mut c, &lease).await;
        assert!(!again.released);
        assert_eq!(again.status(), lockd_client::proto::LeaseStatus::NotHeld);
        let e = extend(&mut c, &lease, 10.0, false).await;
        assert_eq!(e.status(), lockd_client::proto::LeaseStatus::NotHeld);
        assert!(!is_locked(&mut c, "job-1").await.locked, "extend must not revive a lock");
    }

    async fn extend_adds_to_the_remaining_time_or_replaces_it(store: Store) {
        let s = Setup::with_env(store, &[("LOCKD_MAX_TTL", "1m")]).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 10.0).await;
        let added = extend(&mut c, &lease, 20.0, false).await;
        assert!(added.extended);
        let ttl = to_std(added.lease.as_ref().unwrap().ttl.as_ref().unwrap());
        assert!(ttl > Duration::from_secs(29) && ttl <= Duration::from_secs(30), "{ttl:?}");
        let added = added.lease.unwrap();
        assert_eq!(added.fencing_token, lease.fencing_token);
        assert_eq!(added.token, "", "only Acquire returns tokens");
        let replaced = extend(&mut c, &lease, 5.0, true).await;
        assert_eq!(to_std(replaced.lease.unwrap().ttl.as_ref().unwrap()), Duration::from_secs(5));
        // Added time is capped at the server's maximum TTL.
        let capped = extend(&mut c, &lease, 59.0, false).await;
        assert_eq!(to_std(capped.lease.unwrap().ttl.as_ref().unwrap()), Duration::from_secs(60));
        let remaining = to_std(&is_locked(&mut c, "job-1").await.remaining.unwrap());
        assert!(remaining > Duration::from_secs(55), "{remaining:?}");
    }

    async fn inspection_reports_the_holder_and_time_left_but_never_the_token(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut req = acquire_req("job-1", 20.0);
        req.owner = "scheduler-2".into();
        let reply = c.acquire(req).await.unwrap().into_inner();
        let lease = reply.lease.unwrap();
        let expires = lease.expires_at.unwrap();
        let locked = is_locked(&mut c, "job-1").await;
        assert!(locked.locked);
        let remaining = to_std(&locked.remaining.unwrap());
        assert!(remaining > Duration::from_secs(18) && remaining <= Duration::from_secs(20));
        let holder = owner(&mut c, "job-1").await.unwrap();
        assert_eq!(holder.owner, "scheduler-2");
        assert_eq!(holder.resource, "job-1");
        assert_eq!(holder.fencing_token, lease.fencing_token);
        let h_exp = holder.expires_at.unwrap();
        assert!((h_exp.seconds - expires.seconds).abs() <= 1);
        let acquired_at = holder.acquired_at.unwrap();
        assert!(acquired_at.seconds <= h_exp.seconds && h_exp.seconds - acquired_at.seconds <= 20);
        // LockInfo has no token field; make sure it is not smuggled through another one.
        assert!(!format!("{holder:?}").contains(&lease.token));
        let refused = try_acquire(&mut c, "job-1", 1.0).await;
        assert!(!format!("{refused:?}").contains(&lease.token));
    }

    async fn generated_tokens_name_the_instance_and_are_unique(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let a = acquire_ok(&mut c, "job-a", 30.0).await;
        let b = acquire_ok(&mut c, "job-b", 30.0).await;
        let prefix = format!("test-{}:", s.lockd.port);
        assert!(a.token.starts_with(&prefix), "{}", a.token);
        assert_ne!(a.token, b.token);
        let uuid = a.token.strip_prefix(&prefix).unwrap();
        assert_eq!(uuid.len(), 36);
    }

    async fn a_crashed_holders_lock_frees_itself_after_the_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut holder = s.client().await;
        acquire_ok(&mut holder, "job-1", 0.4).await;
        drop(holder); // the holder goes away without releasing
        let mut other = s.client().await;
        let r = wait_acquire(&mut other, "job-1", 30.0, 5.0).await;
        assert!(r.acquired);
    }
}
