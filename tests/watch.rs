//! Watch: lock events in order, expirations included, and slow watchers told they lagged.

use std::time::Duration;

use lockd_client::proto::{LockEventType, WatchRequest, WatchResponse};
use tokio::time::Instant;

use crate::support::*;

async fn watch(c: &mut Client, resource: &str, prefix: &str) -> tonic::Streaming<WatchResponse> {
    let s = c
        .watch(WatchRequest {
            resource: resource.into(),
            prefix: prefix.into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The Redis backend subscribes to events when the first watcher arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s
}

async fn next_event(s: &mut tonic::Streaming<WatchResponse>) -> lockd_client::proto::LockEvent {
    let r = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .unwrap();
    r.event.expect("an event, not a lag notice")
}

/// 6,000 acquire/release pairs from 16 clients on resources `<prefix>-…`; returns the time taken.
async fn hammer(s: &Setup, prefix: &str) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = s.client().await;
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in 0..375 {
                let lease = acquire_ok(&mut c, &format!("{prefix}-{t}-{i}"), 30.0).await;
                release(&mut c, &lease).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    started.elapsed()
}

crate::conformance_ha! {
    async fn watch_sees_acquire_extend_release_and_expire_in_order(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut events = watch(&mut c, "job-1", "").await;
        let mut req = acquire_req("job-1", 30.0);
        req.owner = "scheduler-1".into();
        let sent = Instant::now();
        let lease = c.acquire(req).await.unwrap().into_inner().lease.unwrap();
        let e = next_event(&mut events).await;
        eprintln!("watch: acquired event {:?} after the Acquire was sent", sent.elapsed());
        assert_eq!((e.r#type(), e.owner.as_str(), e.fencing_token), (LockEventType::Acquired, "scheduler-1", lease.fencing_token));
        extend(&mut c, &lease, 10.0, false).await;
        release(&mut c, &lease).await;
        let second = acquire_ok(&mut c, "job-1", 0.3).await;
        // Another resource: not watched.
        acquire_ok(&mut c, "job-2", 30.0).await;

        assert_eq!(e.resource, "job-1");
        assert!(e.expires_at.is_some() && e.time.is_some());
        let e = next_event(&mut events).await;
        assert_eq!((e.r#type(), e.fencing_token), (LockEventType::Extended, lease.fencing_token));
        let e = next_event(&mut events).await;
        assert_eq!((e.r#type(), e.fencing_token), (LockEventType::Released, lease.fencing_token));
        let e = next_event(&mut events).await;
        assert_eq!((e.r#type(), e.fencing_token), (LockEventType::Acquired, second.fencing_token));
        let started = Instant::now();
        let e = next_event(&mut events).await;
        assert_eq!(e.r#type(), LockEventType::Expired);
        assert_eq!((e.resource.as_str(), e.fencing_token), ("job-1", second.fencing_token));
        eprintln!("watch: expired event {:?} after the grant of a 300 ms lease", started.elapsed());
        assert!(!format!("{e:?}").contains(&lease.token));
    }

    async fn prefix_watch_sees_every_resource_under_it(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let mut events = watch(&mut c, "", "nightly/").await;
        acquire_ok(&mut c, "daily/a", 30.0).await;
        acquire_ok(&mut c, "nightly/a", 30.0).await;
        acquire_ok(&mut c, "nightly/b", 30.0).await;
        assert_eq!(next_event(&mut events).await.resource, "nightly/a");
        assert_eq!(next_event(&mut events).await.resource, "nightly/b");
    }

    async fn a_watcher_that_reads_too_slowly_is_told_it_lagged_and_does_not_slow_locking(store: Store) {
        let s = Setup::new(store).await;
        // The same load without a watcher, for comparison.
        let baseline = hammer(&s, "cold").await;
        // A watcher on a connection with a small HTTP/2 window (64 KiB), which nobody reads
        // while 12,000 events are produced: every buffer on the way fills up.
        let channel = tonic::transport::Endpoint::from_shared(s.lockd.endpoint())
            .unwrap()
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .unwrap();
        let mut c = lockd_client::proto::LockServiceClient::new(channel);
        let mut stalled = watch(&mut c, "", "hot").await;
        // Locking goes on at full speed: if a slow watcher could block lock operations, this
        // would stall once the buffers are full.
        let elapsed = hammer(&s, "hot").await;
        eprintln!("6,000 acquire/release pairs: {baseline:?} without a watcher, {elapsed:?} with a stalled one");
        // Now read: somewhere in the stream the watcher is told how many events it missed.
        let mut missed = 0;
        let mut seen = 0;
        while let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_secs(2), stalled.message()).await.map(|m| m.transpose()) {
            missed += r.missed;
            seen += u64::from(r.event.is_some());
            if seen + missed >= 12_000 {
                break;
            }
        }
        assert!(missed > 0, "the stalled watcher was never told it lagged (saw {seen})");
        assert_eq!(seen + missed, 12_000, "every event is either delivered or counted as missed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_needs_exactly_one_of_resource_and_prefix() {
    let lockd = Lockd::start(None).await;
    let mut c = lockd.client().await;
    for (resource, prefix) in [("", ""), ("a", "b")] {
        let status = c
            .watch(WatchRequest {
                resource: resource.into(),
                prefix: prefix.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .contains("exactly one of `resource` and `prefix`")
        );
    }
}

/// Lock scripts publish Watch events only while some lockd subscribes to them (PUBSUB NUMSUB
/// counts the subscribers); a pattern subscription, which that count leaves out, shows what
/// was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_events_are_published_only_while_a_lockd_watches() {
    use futures_util::StreamExt;
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let client = deadpool_redis::redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("lockd:event[s]").await.unwrap();
    let mut published = pubsub.into_on_message();
    let mut c = lockd.client().await;

    let lease = acquire_ok(&mut c, "unwatched", 30.0).await;
    extend(&mut c, &lease, 10.0, false).await;
    release(&mut c, &lease).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), published.next()).await;
    assert!(
        quiet.is_err(),
        "an event was published with no Watch open: {quiet:?}"
    );

    let mut events = watch(&mut c, "watched", "").await;
    let lease = acquire_ok(&mut c, "watched", 30.0).await;
    release(&mut c, &lease).await;
    assert_eq!(
        next_event(&mut events).await.r#type(),
        LockEventType::Acquired
    );
    assert_eq!(
        next_event(&mut events).await.r#type(),
        LockEventType::Released
    );
    for kind in ["A", "R"] {
        let msg = tokio::time::timeout(Duration::from_secs(5), published.next())
            .await
            .expect("the event, published while the Watch is open")
            .unwrap();
        let payload: String = msg.get_payload().unwrap();
        assert!(
            payload.starts_with(&format!("{kind}\nwatched\n")),
            "{payload}"
        );
    }

    drop(events);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lease = acquire_ok(&mut c, "watched", 30.0).await;
    release(&mut c, &lease).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), published.next()).await;
    assert!(
        quiet.is_err(),
        "an event was published after the Watch closed: {quiet:?}"
    );
}

/// A lease of ten seconds or more keeps its fencing token only in its lock hash unless a Watch
/// was open when it was granted or renewed (see docs/design.md, fencing tokens). Its EXPIRED
/// event then carries the token; one granted with no Watch open carries 0, unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lease_granted_under_a_watch_expires_with_its_fencing_token() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut c = lockd.client().await;
    acquire_ok(&mut c, "long/unwatched", 10.0).await;
    let mut events = watch(&mut c, "", "long/").await;
    let watched = acquire_ok(&mut c, "long/watched", 10.0).await;
    assert_eq!(
        next_event(&mut events).await.r#type(),
        LockEventType::Acquired
    );
    let mut expired = Vec::new();
    while expired.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(15), events.message())
            .await
            .expect("both leases expire within 15 s")
            .unwrap()
            .unwrap()
            .event
            .expect("an event, not a lag notice");
        assert_eq!(e.r#type(), LockEventType::Expired, "{e:?}");
        expired.push((e.resource, e.fencing_token));
    }
    expired.sort();
    assert_eq!(
        expired,
        vec![
            ("long/unwatched".to_owned(), 0),
            ("long/watched".to_owned(), watched.fencing_token)
        ]
    );
}
