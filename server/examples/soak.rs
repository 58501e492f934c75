//! The load of `scripts/soak`: a steady mix against one lockd, with lockd's resident memory and
//! open file descriptors sampled from `/proc` after a warm-up and at the end.
//!
//! `soak ENDPOINT PID SECS [WARMUP_SECS]`: locks and releases, blocking waits on hot resources,
//! Watch, KeepAlive and Session streams that open and close (some ended cleanly, some dropped),
//! invalid and oversize requests, and connections that come and go. It prints a sample every 30
//! seconds and the growth between the warm-up sample and the last one, and exits 1 when the
//! growth is over the bound (`SOAK_MAX_RSS_GROWTH_MIB`, default 16; `SOAK_MAX_FD_GROWTH`,
//! default 16), or when lockd gave an unexpected answer (INTERNAL, UNKNOWN, ...).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lockd_client::proto::{
    AcquireRequest, KeepAliveRequest, LeaseRef, ReleaseRequest, SessionRequest, WatchRequest,
    session_request,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

type Client = lockd_client::Client;

/// Counts of what the load did.
#[derive(Default)]
struct Counts {
    ops: AtomicU64,
    streams: AtomicU64,
    invalid: AtomicU64,
    /// Answers no request should get (INTERNAL, UNKNOWN, or a refusal of a valid request).
    unexpected: AtomicU64,
}

fn dur(secs: f64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs.trunc() as i64,
        nanos: (secs.fract() * 1e9) as i32,
    })
}

/// A status that a valid request may get under load: contention is an answer, not an error,
/// and a resource may be busy in the other mode.
fn expected(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::FailedPrecondition | Code::DeadlineExceeded | Code::Cancelled
    )
}

fn note(counts: &Counts, r: Result<(), tonic::Status>) {
    match r {
        Ok(()) => {
            counts.ops.fetch_add(1, Ordering::Relaxed);
        }
        Err(s) if expected(&s) => {
            counts.ops.fetch_add(1, Ordering::Relaxed);
        }
        Err(s) => {
            eprintln!("soak: unexpected answer: {s:?}");
            counts.unexpected.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn connect(endpoint: &str) -> Client {
    lockd_client::connect(endpoint.to_owned()).await.unwrap()
}

/// Acquires with `req`, and when granted holds the lock for `hold`, then releases it.
async fn acquire_hold_release(
    c: &mut Client,
    req: AcquireRequest,
    hold: Duration,
) -> Result<(), tonic::Status> {
    let resource = req.resource.clone();
    let reply = c.acquire(req).await?.into_inner();
    if let Some(lease) = reply.lease {
        sleep(hold).await;
        c.release(ReleaseRequest {
            resource,
            token: lease.token,
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// Acquire, hold a moment, release, on 200 resources.
async fn locker(endpoint: String, id: u64, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut c = connect(&endpoint).await;
    let mut i = id;
    while !stop.load(Ordering::Relaxed) {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let req = AcquireRequest {
            resource: format!("soak/lock/{}", (i >> 33) % 200),
            ttl: dur(5.0),
            owner: format!("locker-{id}"),
            labels: [("job".to_owned(), "soak".to_owned())].into(),
            ..Default::default()
        };
        let r = acquire_hold_release(&mut c, req, Duration::from_millis(1)).await;
        note(&counts, r);
    }
}

/// Blocking waits on a few hot resources, each holder keeping the lock a few milliseconds.
async fn waiter(endpoint: String, id: u64, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut c = connect(&endpoint).await;
    while !stop.load(Ordering::Relaxed) {
        let req = AcquireRequest {
            resource: format!("soak/hot/{}", id % 4),
            ttl: dur(5.0),
            wait_timeout: dur(0.3),
            fair: id.is_multiple_of(2),
            ..Default::default()
        };
        let r = acquire_hold_release(&mut c, req, Duration::from_millis(3)).await;
        note(&counts, r);
    }
}

/// Watch streams on the whole soak prefix, read for a while, then dropped.
async fn watcher(endpoint: String, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut c = connect(&endpoint).await;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let r = async {
            let mut events = c
                .watch(WatchRequest {
                    resource: String::new(),
                    prefix: "soak/".into(),
                })
                .await?
                .into_inner();
            let until = Instant::now() + Duration::from_millis(200 + (n % 5) * 200);
            while let Ok(next) = tokio::time::timeout_at(until, events.message()).await {
                next?;
            }
            Ok(())
        }
        .await;
        counts.streams.fetch_add(1, Ordering::Relaxed);
        note(&counts, r);
    }
}

/// KeepAlive streams over three leases each: heartbeats for a second, then the stream is ended
/// (its leases released) or dropped (left to their 2 s TTL).
async fn keeper(endpoint: String, id: u64, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut c = connect(&endpoint).await;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let r = async {
            let mut leases = Vec::new();
            for k in 0..3 {
                // Fresh names each round: a dropped stream's leases live on for their TTL.
                let resource = format!("soak/kept/{id}/{}/{k}", n % 16);
                let reply = c
                    .acquire(AcquireRequest {
                        resource: resource.clone(),
                        ttl: dur(2.0),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if let Some(lease) = reply.lease {
                    leases.push(LeaseRef {
                        resource,
                        token: lease.token,
                        ttl: dur(2.0),
                    });
                }
            }
            if leases.is_empty() {
                return Ok(());
            }
            let (tx, rx) = mpsc::channel(4);
            let mut replies = c.keep_alive(ReceiverStream::new(rx)).await?.into_inner();
            for _ in 0..5 {
                let _ = tx
                    .send(KeepAliveRequest {
                        keep: leases.clone(),
                        ..Default::default()
                    })
                    .await;
                replies.message().await?;
                sleep(Duration::from_millis(200)).await;
            }
            if n.is_multiple_of(2) {
                // End the stream: lockd releases the leases.
                drop(tx);
                while replies.message().await?.is_some() {}
            }
            Ok(())
        }
        .await;
        counts.streams.fetch_add(1, Ordering::Relaxed);
        note(&counts, r);
    }
}

/// Session streams: an acquire, a heartbeat and a release on each, then the stream ends.
async fn sessions(endpoint: String, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut c = connect(&endpoint).await;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let r = async {
            let (tx, rx) = mpsc::channel(4);
            let mut replies = c.session(ReceiverStream::new(rx)).await?.into_inner();
            let resource = format!("soak/session/{}", n % 50);
            let op = |id, op| SessionRequest {
                request_id: id,
                op: Some(op),
                ..Default::default()
            };
            let _ = tx
                .send(op(
                    1,
                    session_request::Op::Acquire(AcquireRequest {
                        resource: resource.clone(),
                        ttl: dur(3.0),
                        ..Default::default()
                    }),
                ))
                .await;
            let reply = replies.message().await?;
            let token = match reply.and_then(|r| r.reply) {
                Some(lockd_client::proto::session_response::Reply::Acquire(a)) => {
                    a.lease.map(|l| l.token)
                }
                _ => None,
            };
            let _ = tx
                .send(op(2, session_request::Op::Heartbeat(Default::default())))
                .await;
            replies.message().await?;
            if let Some(token) = token {
                let _ = tx
                    .send(op(
                        3,
                        session_request::Op::Release(ReleaseRequest {
                            resource,
                            token,
                            ..Default::default()
                        }),
                    ))
                    .await;
                replies.message().await?;
            }
            drop(tx);
            while replies.message().await?.is_some() {}
            Ok(())
        }
        .await;
        counts.streams.fetch_add(1, Ordering::Relaxed);
        note(&counts, r);
        sleep(Duration::from_millis(20)).await;
    }
}

/// Invalid and oversize requests, on a new connection every 50 requests.
async fn invalid(endpoint: String, counts: Arc<Counts>, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut c = connect(&endpoint).await;
        for _ in 0..50 {
            n += 1;
            let req = match n % 5 {
                0 => AcquireRequest::default(),
                1 => AcquireRequest {
                    resource: "soak/bad".into(),
                    ttl: dur(-1.0),
                    ..Default::default()
                },
                2 => AcquireRequest {
                    resource: "x".repeat(300),
                    ..Default::default()
                },
                3 => AcquireRequest {
                    resource: "soak/bad".into(),
                    labels: (0..100).map(|i| (format!("k{i}"), "v".into())).collect(),
                    ..Default::default()
                },
                _ => AcquireRequest {
                    resource: "soak/bad".into(),
                    owner: "o".repeat(2 << 20),
                    ..Default::default()
                },
            };
            match c.acquire(req).await {
                Err(s) if matches!(s.code(), Code::InvalidArgument | Code::OutOfRange) => {
                    counts.invalid.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    eprintln!("soak: an invalid request got {other:?}");
                    counts.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
            sleep(Duration::from_millis(5)).await;
        }
    }
}

/// lockd's resident memory (MiB) and open file descriptors.
fn sample(pid: u32) -> (f64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (kib / 1024.0, fds)
}

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: soak ENDPOINT PID SECS [WARMUP_SECS]");
        return std::process::ExitCode::from(2);
    }
    let endpoint = args[1].clone();
    let pid: u32 = args[2].parse().unwrap();
    let secs: u64 = args[3].parse().unwrap();
    let warmup: u64 = args.get(4).map_or(30, |w| w.parse().unwrap()).min(secs / 2);
    let max_rss = env_or("SOAK_MAX_RSS_GROWTH_MIB", 16.0);
    let max_fds = env_or("SOAK_MAX_FD_GROWTH", 16.0);

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in 0..8 {
        tasks.push(tokio::spawn(locker(
            endpoint.clone(),
            id,
            counts.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(waiter(
            endpoint.clone(),
            id,
            counts.clone(),
            stop.clone(),
        )));
    }
    for id in 0..4 {
        tasks.push(tokio::spawn(keeper(
            endpoint.clone(),
            id,
            counts.clone(),
            stop.clone(),
        )));
    }
    for _ in 0..2 {
        tasks.push(tokio::spawn(watcher(
            endpoint.clone(),
            counts.clone(),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(sessions(
        endpoint.clone(),
        counts.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(invalid(
        endpoint.clone(),
        counts.clone(),
        stop.clone(),
    )));

    let started = Instant::now();
    let report = |label: &str, (rss, fds): (f64, usize)| {
        println!(
            "soak: {label} t={:>4}s  rss {rss:.1} MiB  fds {fds}  ops {}  streams {}  invalid {}  unexpected {}",
            started.elapsed().as_secs(),
            counts.ops.load(Ordering::Relaxed),
            counts.streams.load(Ordering::Relaxed),
            counts.invalid.load(Ordering::Relaxed),
            counts.unexpected.load(Ordering::Relaxed),
        );
    };
    report("start", sample(pid));
    sleep(Duration::from_secs(warmup)).await;
    let first = sample(pid);
    report("after warm-up", first);
    let end = started + Duration::from_secs(secs);
    while Instant::now() + Duration::from_secs(30) < end {
        sleep(Duration::from_secs(30)).await;
        report("", sample(pid));
    }
    tokio::time::sleep_until(end).await;
    let last = sample(pid);
    report("end", last);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let rss_growth = last.0 - first.0;
    let fd_growth = last.1 as f64 - first.1 as f64;
    println!(
        "soak: growth from the warm-up ({warmup} s) to the end ({secs} s): rss {rss_growth:+.1} MiB \
         (bound {max_rss} MiB), fds {fd_growth:+} (bound {max_fds})"
    );
    let unexpected = counts.unexpected.load(Ordering::Relaxed);
    if rss_growth > max_rss || fd_growth > max_fds || unexpected > 0 {
        println!("soak: FAILED ({unexpected} unexpected answers)");
        return std::process::ExitCode::FAILURE;
    }
    println!("soak: ok");
    std::process::ExitCode::SUCCESS
}
