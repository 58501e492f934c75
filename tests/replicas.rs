//! Several lockd replicas on one store (a single Redis, a Sentinel group, a cluster) serve the
//! same locks: wake-ups cross replicas, a lease taken through one is kept through another, and
//! a client given several replicas moves on when the one it uses dies.

use std::time::Duration;

use lockd_client::proto::{KeepAliveRequest, LeaseRef, LeaseStatus};
use lockd_client::{LockClient, TryLock};
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

crate::replicas! {
    async fn a_release_through_one_replica_wakes_a_waiter_on_another(store: Store) {
        let s = Setup::new(store).await;
        let b = s.another_lockd().await;
        let mut holder = s.client().await;
        // The holder's TTL (60 s) outlasts the wait (20 s): only a wake-up can serve the waiter.
        let lease = acquire_ok(&mut holder, "job-1", 60.0).await;
        let mut waiter = b.client().await;
        let wait = tokio::spawn(async move { wait_acquire(&mut waiter, "job-1", 30.0, 20.0).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        release(&mut holder, &lease).await;
        let r = wait.await.unwrap();
        assert!(r.acquired, "the waiter on the other replica was not woken");
        s.remove_keys().await;
    }

    async fn a_lease_taken_through_one_replica_is_extended_kept_alive_and_released_through_another(store: Store) {
        let s = Setup::new(store).await;
        let b = s.another_lockd().await;
        let mut through_a = s.client().await;
        let mut through_b = b.client().await;
        let lease = acquire_ok(&mut through_a, "job-1", 30.0).await;
        let extended = extend(&mut through_b, &lease, 60.0, true).await;
        assert!(extended.extended);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = through_b
            .keep_alive(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let keep = LeaseRef {
            resource: lease.resource.clone(),
            token: lease.token.clone(),
            ttl: Some(secs(30.0)),
        };
        tx.send(KeepAliveRequest { keep: vec![keep], expire_on_close: true, ..Default::default() })
            .await
            .unwrap();
        let kept = replies.message().await.unwrap().unwrap();
        assert_eq!(kept.leases[0].status(), LeaseStatus::Ok);
        assert_eq!(kept.leases[0].fencing_token, lease.fencing_token);
        drop(tx);
        let released = release(&mut through_b, &lease).await;
        assert!(released.released);
        assert!(!is_locked(&mut through_a, "job-1").await.locked);
    }

    async fn a_client_given_several_replicas_moves_on_when_its_replica_is_killed(store: Store) {
        let mut s = Setup::new(store).await;
        let b = s.another_lockd().await;
        let client = LockClient::builder(format!("{},{}", s.lockd.endpoint(), b.endpoint()))
            .connect()
            .await
            .unwrap();
        let TryLock::Acquired(guard) =
            client.try_lock("held-across", Duration::from_secs(2)).await.unwrap()
        else {
            panic!("not granted");
        };
        // The replica in use dies: the next call, and the guard's renewals, go to the other.
        s.lockd.kill();
        let TryLock::Acquired(second) =
            client.try_lock("after-the-kill", Duration::from_secs(30)).await.unwrap()
        else {
            panic!("not granted after the kill");
        };
        // Two TTLs later, the first lease is still the guard's: its renewal moved too.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!guard.is_lost(), "the guard lost its lease when its replica died");
        let mut direct = b.client().await;
        assert_eq!(
            owner(&mut direct, "held-across").await.map(|h| h.fencing_token),
            Some(guard.fencing_token())
        );
        assert!(guard.release().await.unwrap());
        assert!(second.release().await.unwrap());
    }
}
