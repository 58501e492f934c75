//! A slow or malicious client cannot make lockd's memory grow without bound: streams that are
//! never read, huge label maps and oversize messages, thousands of idle connections. Each test
//! starts lockd as a process and asserts a stated bound on the growth of its resident memory
//! (`VmRSS`), and that lockd still serves afterwards.

use std::time::Duration;

use lockd_client::proto::{AcquireRequest, WatchRequest};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tonic::Code;

use crate::support::*;

/// lockd's resident memory, in MiB.
fn rss_mib(lockd: &Lockd) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", lockd.pid())).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024.0
}

fn assert_growth(what: &str, before: f64, after: f64, bound_mib: f64) {
    let growth = after - before;
    eprintln!("{what}: lockd RSS {before:.1} MiB -> {after:.1} MiB (+{growth:.1} MiB)");
    assert!(
        growth < bound_mib,
        "{what}: lockd's memory grew by {growth:.1} MiB, over the {bound_mib} MiB bound"
    );
}

async fn still_serves(lockd: &Lockd) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut c = lockd.client().await;
    let resource = format!("still-serving/{n}");
    assert!(try_acquire(&mut c, &resource, 1.0).await.acquired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_that_are_never_read_hold_bounded_memory() {
    let s = Setup::new(Store::Memory).await;
    let mut c = s.client().await;
    // Warm up: the first events and connections allocate lockd's steady buffers.
    for i in 0..200 {
        let lease = acquire_ok(&mut c, &format!("m/{i}"), 30.0).await;
        release(&mut c, &lease).await;
    }
    let before = rss_mib(&s.lockd);
    // 500 streams on 5 connections, never read.
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut w = s.client().await;
        for _ in 0..100 {
            let watch = w
                .watch(WatchRequest {
                    resource: String::new(),
                    prefix: "m/".into(),
                })
                .await
                .unwrap();
            streams.push(watch);
        }
    }
    // 16,000 events (8,000 acquire and release pairs) that every stream should receive.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = s.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..1_000 {
                let lease = acquire_ok(&mut c, &format!("m/{t}/{i}"), 30.0).await;
                release(&mut c, &lease).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = rss_mib(&s.lockd);
    // Per stream, lockd holds at most its 16-message channel and what HTTP/2 flow control lets
    // it send ahead (the client's window); events beyond are dropped and counted as missed.
    assert_growth(
        "500 unread Watch streams, 16,000 events",
        before,
        after,
        64.0,
    );
    drop(streams);
    still_serves(&s.lockd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_label_maps_and_oversize_messages_are_refused_without_memory_growth() {
    let s = Setup::new(Store::Memory).await;
    let c = s.client().await;
    let before = rss_mib(&s.lockd);
    // Label maps just under the 1 MiB message limit (40,000 labels), 8 at a time: each is
    // decoded and refused.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let req = AcquireRequest {
                    resource: format!("labels/{t}/{i}"),
                    labels: (0..40_000)
                        .map(|k| (format!("k{k:06}"), "v".repeat(12)))
                        .collect(),
                    ..Default::default()
                };
                let err = c.acquire(req).await.unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
                assert!(err.message().starts_with("labels:"), "{}", err.message());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 64 MB messages: refused by their length, before lockd buffers them.
    let mut c2 = c.clone();
    for _ in 0..4 {
        let req = AcquireRequest {
            resource: "x".into(),
            owner: "o".repeat(64 << 20),
            ..Default::default()
        };
        let err = c2.acquire(req).await.unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    }
    let after = rss_mib(&s.lockd);
    assert_growth(
        "80 maps of 40,000 labels, 4 messages of 64 MB",
        before,
        after,
        64.0,
    );
    still_serves(&s.lockd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_hold_bounded_memory_and_are_capped() {
    let s = Setup::with_env(Store::Memory, &[("LOCKD_MAX_CONNECTIONS", "3000")]).await;
    still_serves(&s.lockd).await;
    let before = rss_mib(&s.lockd);
    // 2,500 connections that never say anything, and 400 idle HTTP/2 clients.
    let mut idle = Vec::new();
    for _ in 0..2_500 {
        idle.push(TcpStream::connect(s.lockd.addr()).await.unwrap());
    }
    let mut clients = Vec::new();
    for _ in 0..400 {
        let mut c = s.client().await;
        c.is_locked(lockd_client::proto::IsLockedRequest {
            resource: "r".into(),
        })
        .await
        .unwrap();
        clients.push(c);
    }
    let after = rss_mib(&s.lockd);
    assert_growth(
        "2,500 silent connections and 400 idle clients",
        before,
        after,
        100.0,
    );

    // The cap: 2,900 are open (and possibly the still-serving client's); beyond 3,000 lockd
    // closes new connections at once.
    let mut over = Vec::new();
    for _ in 0..200 {
        over.push(TcpStream::connect(s.lockd.addr()).await.unwrap());
    }
    let mut closed = 0;
    for conn in &mut over {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(
        closed >= 90,
        "only {closed} of 200 connections over LOCKD_MAX_CONNECTIONS were closed"
    );
    assert!(
        s.lockd.log_text().contains("LOCKD_MAX_CONNECTIONS"),
        "the refusal is logged naming the setting"
    );

    // Silent connections are closed once the handshake time (10 s) is over, which frees their
    // places.
    // (lockd sends its HTTP/2 settings first: read past them to the end.)
    let mut first = idle.remove(0);
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 256];
        while let Ok(n) = first.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection that never started HTTP/2 was not closed"
    );
    drop((idle, over));
    still_serves(&s.lockd).await;
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_zero_flow_control_windows_holds_bounded_memory() {
    let s = Setup::new(Store::Memory).await;
    still_serves(&s.lockd).await;
    let before = rss_mib(&s.lockd);
    // A client that grants lockd no window at all: every answer stalls after its headers.
    let channel = tonic::transport::Endpoint::from_shared(s.lockd.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(0))
        .initial_connection_window_size(Some(0))
        .connect()
        .await
        .unwrap();
    let stalled = lockd_client::proto::LockServiceClient::new(channel);
    let mut calls = Vec::new();
    for i in 0..1_000 {
        let mut c = stalled.clone();
        calls.push(tokio::spawn(async move {
            c.is_locked(lockd_client::proto::IsLockedRequest {
                resource: format!("z/{i}"),
            })
            .await
        }));
    }
    let mut watches = Vec::new();
    for _ in 0..200 {
        let mut c = stalled.clone();
        watches.push(tokio::spawn(async move {
            c.watch(WatchRequest {
                resource: String::new(),
                prefix: "z/".into(),
            })
            .await
        }));
    }
    // Events for the stalled watchers.
    let mut c = s.client().await;
    for i in 0..2_000 {
        let lease = acquire_ok(&mut c, &format!("z/{i}"), 30.0).await;
        release(&mut c, &lease).await;
    }
    let after = rss_mib(&s.lockd);
    assert_growth(
        "1,000 calls and 200 Watch streams stalled by zero windows, 4,000 events",
        before,
        after,
        64.0,
    );
    // Other clients are served meanwhile, and dropping the stalled client frees everything.
    still_serves(&s.lockd).await;
    for call in calls {
        call.abort();
    }
    for watch in watches {
        watch.abort();
    }
    drop(stalled);
    still_serves(&s.lockd).await;
}
