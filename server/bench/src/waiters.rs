//! The waiters scenario: lockd's resident memory while it holds many calls open.
//!
//! For each kind it opens `--waiters` calls over `--waiter-connections` HTTP/2 connections of
//! its own, waits until lockd is quiet (its CPU time stops moving and its RSS stops growing),
//! reads lockd's `VmRSS`, then cancels everything and reads it again once lockd is quiet:
//! - acquire: one lock is held (TTL beyond the wait), and every call is a blocking Acquire of
//!   it with a long `wait_timeout`;
//! - watch: every call is a Watch stream on its own resource (no events flow);
//! - keepalive: every call is a KeepAlive stream keeping one lease of its own, taken just
//!   before; the stream counts as open once its first heartbeat is answered. Cancelling the
//!   streams makes lockd release their leases.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lockd_proto::v1 as pb;
use lockd_proto::v1::lock_service_client::LockServiceClient;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::codegen::tokio_stream::{self, StreamExt as _};
use tonic::transport::Channel;

use crate::cli::{Target, WaiterKind};
use crate::error::{Error, Result};
use crate::procfs::{self, Process};
use crate::target::{grpc_channel, proto_duration};

/// How often lockd's CPU time and RSS are sampled while waiting for it to be quiet.
const SAMPLE: Duration = Duration::from_millis(250);

/// lockd counts as quiet when it used at most this much CPU during one sample (20 ms in
/// 250 ms, two clock ticks) and its RSS moved by less than 1%.
const QUIET_CPU_S: f64 = 0.02;

/// Consecutive quiet samples needed.
const QUIET_SAMPLES: usize = 3;

/// Longest wait for lockd to be quiet; the reading is taken anyway, and flagged.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// Acquires in flight while taking the keepalive kind's leases.
const SETUP_IN_FLIGHT: usize = 256;

/// How the waiters scenario runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address of the target.
    pub address: String,
    /// Calls kept open at once.
    pub calls: usize,
    /// HTTP/2 connections they are spread over.
    pub connections: u32,
    /// wait_timeout of the blocking Acquires.
    pub wait: Duration,
}

/// lockd's RSS with one kind of call held open.
#[derive(Debug, Clone, Serialize)]
pub struct WaitersResult {
    /// lockd or lockd-memory.
    pub target: Target,
    /// What was held open.
    pub kind: WaiterKind,
    /// Calls opened.
    pub calls: usize,
    /// HTTP/2 connections they were spread over.
    pub connections: u32,
    /// Calls still open (waiting, or streaming) when the RSS was read.
    pub open: usize,
    /// Calls that ended before they were cancelled (an Acquire answered, a stream closed).
    pub ended_early: usize,
    /// Calls that failed.
    pub errors: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// lockd's VmRSS before opening anything, in bytes.
    pub rss_before: u64,
    /// lockd's VmRSS with every call open.
    pub rss_open: u64,
    /// lockd's VmRSS after the calls were cancelled and lockd was quiet again.
    pub rss_after: u64,
    /// (rss_open - rss_before) / open.
    pub bytes_per_call: f64,
    /// Seconds from the first call to the reading with every call open.
    pub open_s: f64,
    /// Whether lockd was quiet when the RSS was read with the calls open.
    pub settled: bool,
}

/// How one call ended.
enum Outcome {
    /// Still open when cancelled.
    Cancelled,
    /// Answered or closed by lockd before the cancel.
    Ended,
    /// Failed.
    Failed(String),
}

/// Holds `opts.calls` calls of `kind` open on `target` and reads `server`'s RSS.
///
/// # Errors
/// Fails when lockd cannot be reached, its RSS cannot be read, the lock of the acquire kind
/// cannot be taken, or a task panics.
pub async fn run(
    target: Target,
    server: Process,
    kind: WaiterKind,
    opts: &Options,
    run_id: &str,
) -> Result<WaitersResult> {
    let mut channels = Vec::new();
    for _ in 0..opts.connections {
        channels.push(grpc_channel(&opts.address).await?);
    }
    procfs::wait_quiet(server.pid, SETTLE_LIMIT).await?;
    let rss_before = procfs::rss_bytes(server.pid)?;

    let cancel = CancellationToken::new();
    let ready = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut held = None;
    let mut set = JoinSet::new();
    match kind {
        WaiterKind::Acquire => {
            let resource = format!("{run_id}-waited");
            let mut holder = channels[0].clone();
            let reply = holder
                .acquire(pb::AcquireRequest {
                    resource: resource.clone(),
                    ttl: Some(proto_duration(opts.wait + Duration::from_secs(60))),
                    owner: "bench-waiters-holder1".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let token = reply
                .lease
                .filter(|_| reply.acquired)
                .map(|l| l.token)
                .ok_or_else(|| Error::Unexpected(format!("{resource} is already held")))?;
            held = Some((holder, resource.clone(), token));
            for i in 0..opts.calls {
                let mut client = channels[i % channels.len()].clone();
                let (cancel, resource, wait) = (cancel.clone(), resource.clone(), opts.wait);
                let finished = finished.clone();
                set.spawn(async move {
                    let request = pb::AcquireRequest {
                        resource,
                        ttl: Some(proto_duration(Duration::from_secs(30))),
                        wait_timeout: Some(proto_duration(wait)),
                        owner: format!("bench-waiter-{i:08}"),
                        ..Default::default()
                    };
                    let outcome = tokio::select! {
                        r = client.acquire(request) => match r {
                            Ok(_) => Outcome::Ended,
                            Err(e) => Outcome::Failed(format!("acquire: {}", Error::from(e))),
                        },
                        () = cancel.cancelled() => Outcome::Cancelled,
                    };
                    finish(outcome, &finished)
                });
            }
        }
        WaiterKind::Watch => {
            for i in 0..opts.calls {
                let client = channels[i % channels.len()].clone();
                let (cancel, ready) = (cancel.clone(), ready.clone());
                let resource = format!("{run_id}-watched-{i:06}");
                let finished = finished.clone();
                set.spawn(async move {
                    let request = pb::WatchRequest {
                        resource,
                        prefix: String::new(),
                    };
                    let outcome = tokio::select! {
                        o = watch_one(client, request, &ready) => o,
                        () = cancel.cancelled() => Outcome::Cancelled,
                    };
                    finish(outcome, &finished)
                });
            }
        }
        WaiterKind::Keepalive => {
            let setup = Arc::new(Semaphore::new(SETUP_IN_FLIGHT));
            for i in 0..opts.calls {
                let client = channels[i % channels.len()].clone();
                let (cancel, ready, setup) = (cancel.clone(), ready.clone(), setup.clone());
                let resource = format!("{run_id}-kept-{i:06}");
                let finished = finished.clone();
                set.spawn(async move {
                    let outcome = tokio::select! {
                        o = keep_one(client, resource, i, &setup, &ready) => o,
                        () = cancel.cancelled() => Outcome::Cancelled,
                    };
                    finish(outcome, &finished)
                });
            }
        }
    }

    let settled = settle(server.pid, kind, &ready, &finished, opts.calls).await?;
    let open_s = started.elapsed().as_secs_f64();
    let rss_open = procfs::rss_bytes(server.pid)?;
    let finished_before = finished.load(Ordering::Relaxed).min(opts.calls);
    let ready_before = ready.load(Ordering::Relaxed);
    cancel.cancel();
    let (mut ended, mut errors, mut first_error) = (0, 0, None);
    while let Some(joined) = set.join_next().await {
        match joined? {
            Outcome::Cancelled => {}
            Outcome::Ended => ended += 1,
            Outcome::Failed(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    // A blocking Acquire is open as long as it has not been answered; a stream once it has
    // opened, unless it has ended since (those are reported as errors or ended_early).
    let open = match kind {
        WaiterKind::Acquire => opts.calls - finished_before,
        _ => ready_before.min(opts.calls - finished_before),
    };
    if let Some((mut holder, resource, token)) = held {
        holder
            .release(pb::ReleaseRequest {
                resource,
                token,
                ..Default::default()
            })
            .await?;
    }
    drop(channels);
    procfs::wait_quiet(server.pid, SETTLE_LIMIT).await?;
    let rss_after = procfs::rss_bytes(server.pid)?;
    Ok(WaitersResult {
        target,
        kind,
        calls: opts.calls,
        connections: opts.connections,
        open,
        ended_early: ended,
        errors,
        first_error,
        rss_before,
        rss_open,
        rss_after,
        bytes_per_call: (rss_open as f64 - rss_before as f64) / open.max(1) as f64,
        open_s,
        settled,
    })
}

/// Counts a call that ended on its own (not cancelled) in `finished`.
fn finish(outcome: Outcome, finished: &AtomicUsize) -> Outcome {
    if !matches!(outcome, Outcome::Cancelled) {
        finished.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

/// Opens a Watch stream and reads it until it ends; counts itself in `ready` once open.
async fn watch_one(
    mut client: LockServiceClient<Channel>,
    request: pb::WatchRequest,
    ready: &AtomicUsize,
) -> Outcome {
    let mut stream = match client.watch(request).await {
        Ok(s) => s.into_inner(),
        Err(e) => return Outcome::Failed(format!("watch: {}", Error::from(e))),
    };
    ready.fetch_add(1, Ordering::Relaxed);
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Outcome::Ended,
            Err(e) => return Outcome::Failed(format!("watch: {}", Error::from(e))),
        }
    }
}

/// Takes a lease on `resource` and keeps it on a KeepAlive stream until cancelled; counts
/// itself in `ready` once lockd answered the stream's first heartbeat.
async fn keep_one(
    mut client: LockServiceClient<Channel>,
    resource: String,
    i: usize,
    setup: &Semaphore,
    ready: &AtomicUsize,
) -> Outcome {
    let ttl = proto_duration(Duration::from_secs(60));
    let token = {
        let Ok(_permit) = setup.acquire().await else {
            return Outcome::Failed("setup semaphore closed".into());
        };
        let request = pb::AcquireRequest {
            resource: resource.clone(),
            ttl: Some(ttl),
            owner: format!("bench-kept-{i:010}"),
            ..Default::default()
        };
        match client.acquire(request).await {
            Ok(r) => {
                let r = r.into_inner();
                match r.lease.filter(|_| r.acquired) {
                    Some(lease) => lease.token,
                    None => return Outcome::Failed(format!("{resource} is already held")),
                }
            }
            Err(e) => return Outcome::Failed(format!("acquire: {}", Error::from(e))),
        }
    };
    let first = pb::KeepAliveRequest {
        keep: vec![pb::LeaseRef {
            resource,
            token,
            ttl: Some(ttl),
        }],
        ..Default::default()
    };
    // One heartbeat, then the request side stays open without sending.
    let outbound = tokio_stream::once(first).chain(tokio_stream::pending());
    let mut stream = match client.keep_alive(outbound).await {
        Ok(s) => s.into_inner(),
        Err(e) => return Outcome::Failed(format!("keepalive: {}", Error::from(e))),
    };
    let mut counted = false;
    loop {
        match stream.message().await {
            Ok(Some(_)) if !counted => {
                counted = true;
                ready.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Outcome::Ended,
            Err(e) => return Outcome::Failed(format!("keepalive: {}", Error::from(e))),
        }
    }
}

/// Waits until every stream is ready (stream kinds), or every call has ended, and lockd is
/// quiet. Returns whether that happened within [`SETTLE_LIMIT`].
async fn settle(
    pid: u32,
    kind: WaiterKind,
    ready: &AtomicUsize,
    finished: &AtomicUsize,
    calls: usize,
) -> Result<bool> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let (mut cpu, mut rss) = (procfs::cpu_seconds(pid)?, procfs::rss_bytes(pid)?);
    let mut quiet_samples = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(SAMPLE).await;
        let (cpu1, rss1) = (procfs::cpu_seconds(pid)?, procfs::rss_bytes(pid)?);
        let all_in = kind == WaiterKind::Acquire
            || ready.load(Ordering::Relaxed) + finished.load(Ordering::Relaxed) >= calls;
        let still = cpu1 - cpu <= QUIET_CPU_S && rss1.abs_diff(rss) * 100 < rss.max(1);
        quiet_samples = if all_in && still {
            quiet_samples + 1
        } else {
            0
        };
        (cpu, rss) = (cpu1, rss1);
        if quiet_samples >= QUIET_SAMPLES {
            return Ok(true);
        }
    }
    Ok(false)
}
