//! Overload caps: going over one is answered RESOURCE_EXHAUSTED at once, naming the setting and
//! its value, and every place is given back when its request or stream ends in any way (client
//! gone, gRPC deadline passed), so a full cap frees up again.

use std::time::Duration;

use lockd_client::proto::{
    AcquireRequest, IsLockedRequest, KeepAliveRequest, SessionRequest, WatchRequest,
    session_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::*;

fn exhausted<T: std::fmt::Debug>(r: Result<T, tonic::Status>, setting: &str) {
    let status = r.expect_err("over the cap, the call must be refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(setting),
        "the message must name {setting}: {}",
        status.message()
    );
}

fn watch_req(resource: &str) -> WatchRequest {
    WatchRequest {
        resource: resource.into(),
        prefix: String::new(),
    }
}

fn waiting(resource: &str, wait: f64) -> AcquireRequest {
    AcquireRequest {
        resource: resource.into(),
        ttl: Some(secs(30.0)),
        wait_timeout: Some(secs(wait)),
        ..Default::default()
    }
}

/// Retries `open` until it succeeds: a freed place is given back when the server notices the
/// stream or call has ended, a moment after the client drops it.
async fn opens_again<T, F, Fut>(what: &str, mut open: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open().await {
            Ok(v) => return v,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: the cap never freed up: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_per_connection_and_in_total_and_free_up_when_they_end() {
    let s = Setup::with_env(
        Store::Memory,
        &[
            ("LOCKD_MAX_STREAMS", "3"),
            ("LOCKD_MAX_STREAMS_PER_CONNECTION", "2"),
        ],
    )
    .await;
    let mut one = s.client().await;
    let mut two = s.client().await;

    // Connection one: a Watch and a KeepAlive fill its two places; a Session is refused.
    let watch = one.watch(watch_req("a")).await.unwrap().into_inner();
    let (ka_tx, ka_rx) = mpsc::channel::<KeepAliveRequest>(1);
    let keepalive = one.keep_alive(ReceiverStream::new(ka_rx)).await.unwrap();
    let (_s_tx, s_rx) = mpsc::channel::<SessionRequest>(1);
    exhausted(
        one.session(ReceiverStream::new(s_rx)).await,
        "LOCKD_MAX_STREAMS_PER_CONNECTION=2",
    );

    // Connection two: one place left in total.
    let _other = two.watch(watch_req("b")).await.unwrap().into_inner();
    exhausted(two.watch(watch_req("c")).await, "LOCKD_MAX_STREAMS=3");

    // The client drops its Watch: its places come back, on its connection and in total.
    drop(watch);
    let _again = opens_again("watch after a dropped watch", || {
        let mut c = one.clone();
        async move { c.watch(watch_req("a")).await }
    })
    .await;
    exhausted(two.watch(watch_req("c")).await, "LOCKD_MAX_STREAMS=3");

    // The client ends its KeepAlive stream: likewise.
    drop(ka_tx);
    drop(keepalive);
    let _session = opens_again("session after an ended keepalive", || {
        let mut c = one.clone();
        async move {
            let (tx, rx) = mpsc::channel::<SessionRequest>(1);
            std::mem::forget(tx);
            c.session(ReceiverStream::new(rx)).await
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_waiters_are_capped_and_a_waiter_that_leaves_frees_its_place() {
    let s = Setup::with_env(
        Store::Memory,
        &[("LOCKD_MAX_WAITERS", "2"), ("LOCKD_MAX_IN_FLIGHT", "10")],
    )
    .await;
    let mut c = s.client().await;
    acquire_ok(&mut c, "busy", 60.0).await;
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let mut w = s.client().await;
        waiters.push(tokio::spawn(async move {
            w.acquire(waiting("busy", 60.0)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    exhausted(
        c.acquire(waiting("busy", 60.0)).await,
        "LOCKD_MAX_WAITERS=2",
    );
    // A single attempt is not a waiter.
    assert!(!try_acquire(&mut c, "busy", 1.0).await.acquired);

    // The same cap holds for waits on a Session stream.
    let (tx, rx) = mpsc::channel(4);
    let mut replies = c
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(SessionRequest {
        request_id: 7,
        op: Some(session_request::Op::Acquire(waiting("busy", 60.0))),
        ..Default::default()
    })
    .await
    .unwrap();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(lockd_client::proto::session_response::Reply::Error(e)) = reply.reply else {
        panic!("expected an error reply: {reply:?}");
    };
    assert_eq!(e.code, Code::ResourceExhausted as i32);
    assert!(e.message.contains("LOCKD_MAX_WAITERS=2"), "{}", e.message);

    // A waiter whose client goes away gives its place back.
    waiters.pop().unwrap().abort();
    opens_again("waiter after a client left", || {
        let mut w = c.clone();
        async move {
            let mut req = tonic::Request::new(waiting("busy", 60.0));
            req.set_timeout(Duration::from_millis(500));
            match w.acquire(req).await {
                // Admitted, then stopped by its deadline: that is the success sought here.
                Err(e) if e.code() != Code::ResourceExhausted => Ok(()),
                Err(e) => Err(e),
                Ok(r) => panic!("the lock is held: {r:?}"),
            }
        }
    })
    .await;
}

crate::conformance! {
    async fn a_waiter_stops_at_its_grpc_deadline_and_leaves_nothing_behind(store: Store) {
        let s = Setup::with_env(
            store,
            &[("LOCKD_MAX_WAITERS", "1"), ("LOCKD_MAX_IN_FLIGHT", "10")],
        )
        .await;
        let mut c = s.client().await;
        acquire_ok(&mut c, "deadline", 60.0).await;
        for fair in [false, true] {
            // The previous round's waiter may still be leaving (its client gave up at the same
            // moment as lockd): retry while the one place is taken.
            let (err, took) = opens_again("waiter", || {
                let mut w = c.clone();
                async move {
                    let mut req = tonic::Request::new(AcquireRequest {
                        fair,
                        ..waiting("deadline", 60.0)
                    });
                    req.set_timeout(Duration::from_millis(400));
                    let started = tokio::time::Instant::now();
                    let err = w.acquire(req).await.expect_err("the deadline ends the wait");
                    match err.code() {
                        Code::ResourceExhausted => Err(err),
                        _ => Ok((err, started.elapsed())),
                    }
                }
            })
            .await;
            assert!(
                matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{err:?}"
            );
            assert!(took < Duration::from_secs(5), "the wait outlived its deadline: {took:?}");
            // Its place under LOCKD_MAX_WAITERS=1 is free again: the next waiter is admitted
            // (and stopped by its own deadline).
            opens_again("waiter after a deadline", || {
                let mut w = c.clone();
                async move {
                    let mut req = tonic::Request::new(waiting("deadline", 60.0));
                    req.set_timeout(Duration::from_millis(200));
                    match w.acquire(req).await {
                        Err(e) if e.code() == Code::ResourceExhausted => Err(e),
                        _ => Ok(()),
                    }
                }
            })
            .await;
        }
        // No fair-queue entry is left in Redis.
        if let Some(redis) = &s.redis {
            eventually(Duration::from_secs(5), "the fair queue entry is removed", || async {
                !redis.keys().await.iter().any(|k| k.ends_with(":queue"))
            })
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_in_flight_cap_lockd_answers_at_once_and_health_still_answers() {
    let s = Setup::with_env(
        Store::Redis,
        &[
            ("LOCKD_MAX_IN_FLIGHT", "3"),
            ("LOCKD_MAX_WAITERS", "2"),
            ("LOCKD_REDIS_TIMEOUT", "10s"),
        ],
    )
    .await;
    let redis = s.redis.as_ref().unwrap();
    let mut c = s.client().await;
    redis.pause();
    let mut stuck = Vec::new();
    for i in 0..3 {
        let mut c = c.clone();
        stuck.push(tokio::spawn(async move {
            c.is_locked(IsLockedRequest {
                resource: format!("r{i}"),
            })
            .await
        }));
    }
    // Long enough for the three calls to reach lockd on a loaded machine (one that had not yet
    // arrived once let the fourth through, to wait for the paused Redis).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = tokio::time::Instant::now();
    exhausted(
        c.is_locked(IsLockedRequest {
            resource: "more".into(),
        })
        .await,
        "LOCKD_MAX_IN_FLIGHT=3",
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal must not wait for a place"
    );
    // Health checks are exempt: an orchestrator must not restart a busy lockd.
    let _ = health(&s.lockd).await;
    redis.resume();
    for t in stuck {
        t.await.unwrap().unwrap();
    }
    c.is_locked(IsLockedRequest {
        resource: "more".into(),
    })
    .await
    .expect("the cap frees up when the calls end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_stream_over_its_lease_cap_is_told_resource_exhausted() {
    let s = Setup::with_env(Store::Memory, &[("LOCKD_MAX_STREAM_LEASES", "2")]).await;
    let mut c = s.client().await;
    let lease = |i: usize| lockd_client::proto::LeaseRef {
        resource: format!("kept/{i}"),
        token: format!("t{i}"),
        ttl: Some(secs(5.0)),
    };
    for i in 0..3 {
        let granted = c
            .acquire(AcquireRequest {
                resource: format!("kept/{i}"),
                token: format!("t{i}"),
                ttl: Some(secs(5.0)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(granted.acquired);
    }
    let (tx, rx) = mpsc::channel(4);
    let mut replies = c
        .keep_alive(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Two leases fit; a third, in a later message, goes over the stream's cap.
    tx.send(KeepAliveRequest {
        keep: vec![lease(0), lease(1)],
        ..Default::default()
    })
    .await
    .unwrap();
    replies.message().await.unwrap();
    tx.send(KeepAliveRequest {
        keep: vec![lease(2)],
        ..Default::default()
    })
    .await
    .unwrap();
    exhausted(replies.message().await, "LOCKD_MAX_STREAM_LEASES=2");
}
