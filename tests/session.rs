//! Session: many lock operations on one stream, with the leases bound to it.

use std::time::Duration;

use lockd_client::proto::session_request::Op;
use lockd_client::proto::session_response::Reply;
use lockd_client::proto::{
    AcquireResponse, ExtendRequest, LeaseStatus, ReleaseRequest, SessionCancel, SessionHeartbeat,
    SessionRequest, SessionResponse,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

/// An open Session stream: a sender for requests and the server's replies.
struct Open {
    tx: mpsc::Sender<SessionRequest>,
    replies: tonic::Streaming<SessionResponse>,
}

impl Open {
    async fn new(c: &mut Client) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let replies = c
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, replies }
    }

    async fn send(&self, request_id: u64, op: Op) {
        let req = SessionRequest {
            request_id,
            op: Some(op),
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }

    async fn next(&mut self) -> SessionResponse {
        tokio::time::timeout(Duration::from_secs(10), self.replies.message())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("the session is open")
    }

    async fn acquire(&mut self, id: u64, resource: &str, ttl: f64) -> AcquireResponse {
        self.send(id, Op::Acquire(acquire_req(resource, ttl))).await;
        let r = self.next().await;
        assert_eq!(r.request_id, id);
        match r.reply {
            Some(Reply::Acquire(a)) => a,
            other => panic!("expected an acquire reply, got {other:?}"),
        }
    }

    async fn heartbeat(&mut self, id: u64) -> SessionResponse {
        self.send(id, Op::Heartbeat(SessionHeartbeat {})).await;
        self.next().await
    }
}

fn release_op(lease: &lockd_client::proto::Lease) -> Op {
    Op::Release(ReleaseRequest {
        resource: lease.resource.clone(),
        token: lease.token.clone(),
        ..Default::default()
    })
}

crate::conformance! {
    async fn operations_on_one_session_are_answered_by_request_id(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        for (id, resource) in [(1, "job-a"), (2, "job-b"), (3, "job-a")] {
            session.send(id, Op::Acquire(acquire_req(resource, 30.0))).await;
        }
        let mut granted = std::collections::HashMap::new();
        for _ in 0..3 {
            let r = session.next().await;
            let Some(Reply::Acquire(a)) = r.reply else { panic!("{r:?}") };
            granted.insert(r.request_id, a.acquired);
        }
        // Ids 1 and 3 race for job-a: exactly one of them wins.
        assert!(granted[&2]);
        assert!(granted[&1] ^ granted[&3], "{granted:?}");
        assert!(is_locked(&mut c, "job-a").await.locked);
    }

    async fn a_session_releases_and_extends_like_the_unary_calls(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        let lease = session.acquire(1, "job-1", 30.0).await.lease.unwrap();
        session.send(2, Op::Extend(ExtendRequest {
            resource: "job-1".into(),
            token: lease.token.clone(),
            ttl: Some(secs(50.0)),
            replace_ttl: true,
        })).await;
        let Some(Reply::Extend(e)) = session.next().await.reply else { panic!() };
        assert!(e.extended);
        assert!(e.lease.unwrap().token.is_empty(), "Extend never returns the token");
        session.send(3, release_op(&lease)).await;
        let Some(Reply::Release(r)) = session.next().await.reply else { panic!() };
        assert!(r.released);
        assert!(!is_locked(&mut c, "job-1").await.locked);
        // Releasing again: not held, and the session goes on.
        session.send(4, release_op(&lease)).await;
        let Some(Reply::Release(r)) = session.next().await.reply else { panic!() };
        assert_eq!(r.status(), LeaseStatus::NotHeld);
    }

    async fn an_invalid_operation_fails_alone_and_the_session_goes_on(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        session.send(1, Op::Acquire(acquire_req("", 30.0))).await;
        let r = session.next().await;
        let Some(Reply::Error(e)) = r.reply else { panic!("{r:?}") };
        assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
        assert!(e.message.contains("resource"), "{}", e.message);
        assert!(session.acquire(2, "job-1", 30.0).await.acquired);
    }

    async fn heartbeats_keep_a_session_lease_alive_past_its_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        let lease = session.acquire(1, "job-1", 0.6).await.lease.unwrap();
        for id in 2..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = session.heartbeat(id).await;
            let Some(Reply::Heartbeat(h)) = r.reply else { panic!("{r:?}") };
            assert_eq!((r.request_id, h.renewed), (id, 1));
            assert!(h.lost.is_empty());
        }
        let holder = owner(&mut c, "job-1").await.unwrap();
        assert_eq!(holder.fencing_token, lease.fencing_token);
    }

    async fn a_session_the_client_ends_releases_its_leases_at_once(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        session.acquire(1, "job-1", 60.0).await;
        session.acquire(2, "job-2", 60.0).await;
        let mut other = s.client().await;
        let wait = tokio::spawn(async move { wait_acquire(&mut other, "job-1", 30.0, 20.0).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(session.tx);
        // lockd ends its side once it has released.
        assert!(session.replies.message().await.unwrap().is_none());
        let r = tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap().unwrap();
        assert!(r.acquired, "the TTL is 60 s: only the release on close can explain this");
        assert!(!is_locked(&mut c, "job-2").await.locked);
    }

    async fn a_broken_session_leaves_its_leases_to_their_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut streaming = s.client().await;
        let mut session = Open::new(&mut streaming).await;
        session.acquire(1, "job-1", 1.5).await;
        let broke_at = Instant::now();
        let Open { tx, replies } = session;
        drop(replies);
        drop(streaming);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!try_acquire(&mut c, "job-1", 30.0).await.acquired, "released before its TTL");
        let r = wait_acquire(&mut c, "job-1", 30.0, 5.0).await;
        assert!(r.acquired, "the lease must end at its TTL");
        assert!(broke_at.elapsed() >= Duration::from_millis(1400), "{:?}", broke_at.elapsed());
        drop(tx);
    }

    async fn expire_on_close_leaves_session_leases_to_their_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        session.tx.send(SessionRequest {
            request_id: 1,
            expire_on_close: true,
            op: Some(Op::Acquire(acquire_req("job-1", 0.8))),
        }).await.unwrap();
        session.next().await;
        drop(session.tx);
        assert!(session.replies.message().await.unwrap().is_none());
        assert!(is_locked(&mut c, "job-1").await.locked, "not released on close");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!is_locked(&mut c, "job-1").await.locked, "expired at its TTL");
    }

    async fn a_session_lease_without_heartbeats_is_reported_lost_when_it_expires(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        session.acquire(7, "job-1", 0.5).await;
        let r = session.next().await;
        let Some(Reply::Lost(lost)) = r.reply else { panic!("{r:?}") };
        assert_eq!(r.request_id, 0);
        assert_eq!(lost.leases[0].bound_by, 7);
        assert_eq!(lost.leases[0].status(), LeaseStatus::NotHeld);
    }

    // Regression (found by the history checker under replica acks): a lease granted after a
    // wait was reported lost at the request's start plus its TTL, too soon by the wait, while
    // it was still held.
    async fn a_lease_granted_after_a_wait_is_not_reported_lost_before_its_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut holder = s.client().await;
        let first = acquire_ok(&mut holder, "job-1", 30.0).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        let mut wait = acquire_req("job-1", 1.5);
        wait.wait_timeout = Some(secs(10.0));
        session.send(1, Op::Acquire(wait)).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        release(&mut holder, &first).await;
        let r = session.next().await;
        let Some(Reply::Acquire(granted)) = r.reply else { panic!("{r:?}") };
        assert!(granted.acquired);
        let granted_at = Instant::now();
        // Counted from the request, the 1.5 s TTL would end 0.3 s after the grant.
        let early = tokio::time::timeout(Duration::from_millis(1000), session.replies.message()).await;
        assert!(early.is_err(), "reported before its TTL: {early:?}");
        assert!(is_locked(&mut holder, "job-1").await.locked);
        // It is reported once its TTL, counted from the grant, has run out.
        let r = session.next().await;
        let Some(Reply::Lost(lost)) = r.reply else { panic!("{r:?}") };
        assert_eq!(lost.leases[0].bound_by, 1);
        assert!(granted_at.elapsed() >= Duration::from_millis(1400));
    }

    async fn a_session_lease_taken_over_is_reported_lost_on_the_next_heartbeat(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        let lease = session.acquire(3, "job-1", 5.0).await.lease.unwrap();
        release(&mut c, &lease).await;
        acquire_ok(&mut c, "job-1", 30.0).await;
        let r = session.heartbeat(4).await;
        let Some(Reply::Heartbeat(h)) = r.reply else { panic!("{r:?}") };
        assert_eq!(h.renewed, 0);
        assert_eq!(h.lost[0].bound_by, 3);
        assert_eq!(h.lost[0].status(), LeaseStatus::HeldByOther);
    }

    async fn closing_a_session_spares_a_lease_renewed_elsewhere_since(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        let lease = session.acquire(1, "job-1", 30.0).await.lease.unwrap();
        // The client renewed the lease through another session (after a reconnect, say).
        let mut second = Open::new(&mut c).await;
        second.send(1, Op::Extend(ExtendRequest {
            resource: "job-1".into(),
            token: lease.token.clone(),
            ttl: Some(secs(30.0)),
            replace_ttl: true,
        })).await;
        let Some(Reply::Extend(e)) = second.next().await.reply else { panic!() };
        assert!(e.extended);
        drop(session.tx);
        assert!(session.replies.message().await.unwrap().is_none());
        assert!(is_locked(&mut c, "job-1").await.locked, "the second session keeps it");
        drop(second.tx);
        assert!(second.replies.message().await.unwrap().is_none());
        assert!(!is_locked(&mut c, "job-1").await.locked, "released by the last binder");
    }

    async fn a_waiting_acquire_does_not_hold_up_a_release_on_the_same_session(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        let lease = session.acquire(1, "job-1", 30.0).await.lease.unwrap();
        let mut wait = acquire_req("job-1", 30.0);
        wait.wait_timeout = Some(secs(10.0));
        session.send(2, Op::Acquire(wait)).await;
        session.send(3, release_op(&lease)).await;
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = session.next().await;
            match r.reply {
                Some(Reply::Release(rel)) => assert!(rel.released),
                Some(Reply::Acquire(a)) => assert!(a.acquired, "woken by the release"),
                other => panic!("{other:?}"),
            }
            seen.push(r.request_id);
        }
        seen.sort_unstable();
        assert_eq!(seen, [2, 3]);
    }

    async fn a_cancelled_wait_is_answered_cancelled_and_never_granted(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 30.0).await;
        let mut session = Open::new(&mut c).await;
        let mut wait = acquire_req("job-1", 30.0);
        wait.wait_timeout = Some(secs(10.0));
        session.send(5, Op::Acquire(wait)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        session.send(5, Op::Cancel(SessionCancel {})).await;
        let r = session.next().await;
        assert_eq!(r.request_id, 5);
        let Some(Reply::Error(e)) = r.reply else { panic!("{r:?}") };
        assert_eq!(e.code, tonic::Code::Cancelled as i32);
        // The lock frees and nobody on the session takes it.
        release(&mut c, &lease).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!is_locked(&mut c, "job-1").await.locked);
    }

    async fn a_session_holds_at_most_the_per_stream_lease_limit(store: Store) {
        let s = Setup::with_env(store, &[("LOCKD_MAX_STREAM_LEASES", "2")]).await;
        let mut c = s.client().await;
        let mut session = Open::new(&mut c).await;
        assert!(session.acquire(1, "job-1", 30.0).await.acquired);
        assert!(session.acquire(2, "job-2", 30.0).await.acquired);
        session.send(3, Op::Acquire(acquire_req("job-3", 30.0))).await;
        let r = session.next().await;
        let Some(Reply::Error(e)) = r.reply else { panic!("{r:?}") };
        assert_eq!(e.code, tonic::Code::ResourceExhausted as i32);
        assert!(e.message.contains("LOCKD_MAX_STREAM_LEASES"), "{}", e.message);
        assert!(!is_locked(&mut c, "job-3").await.locked);
    }
}
