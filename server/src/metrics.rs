//! Metrics: every metric lockd exports, recorded through the `metrics` facade and served in the
//! Prometheus text format on `--metrics-listen` (off by default).
//!
//! Without `--metrics-listen` no recorder is installed and each recording is a no-op call (the
//! cost of both is measured in `docs/observability.md`). The names are defined here, once, so
//! `docs/observability.md`, `deploy/` and the test that checks them agree with the code.
//!
//! Resource names are unbounded, so they never become label values: a resource is labelled
//! with the first `--metrics-resource-prefixes` entry it starts with (see [`Prefixes::of`]),
//! or `""` (no label) when it matches none. Owners (free text) label only the contended-acquire
//! counter, and at most [`MAX_OWNERS`] distinct ones per process.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::lock::LeaseStatus;

/// RPCs by `method` and gRPC `code` (for a streaming RPC, the code it opened with).
pub const RPCS: &str = "lockd_rpc_requests_total";
/// Time to answer an RPC, by `method` (for a streaming RPC, until the stream opens).
pub const RPC_SECONDS: &str = "lockd_rpc_duration_seconds";
/// Acquire requests by `outcome`: `acquired`, `acquired_after_wait`, `contended`,
/// `wait_timeout`, `error`.
pub const ACQUIRES: &str = "lockd_acquires_total";
/// Contended acquires (a scheduler's skipped jobs), by `owner` and `prefix`.
pub const CONTENDED: &str = "lockd_contended_acquires_total";
/// Releases by `status` (`ok`, `not_held`, `held_by_other`, `error`) and `via`.
pub const RELEASES: &str = "lockd_releases_total";
/// Extends (Extend RPCs and stream renewals) by `status` and `via` (`rpc`, `stream`).
pub const EXTENDS: &str = "lockd_extends_total";
/// How long leases granted by this lockd were held, by how they `ended` (`released`,
/// `expired`).
pub const HOLD_SECONDS: &str = "lockd_lock_hold_seconds";
/// Leases that reached their TTL instead of being released: jobs that overran their TTL, or
/// holders that died.
pub const EXPIRED: &str = "lockd_leases_expired_total";
/// Leases a KeepAlive or Session stream could not renew, by `stream`.
pub const LOST: &str = "lockd_leases_lost_total";
/// Acquires waiting for a lock on this lockd now.
pub const WAITERS: &str = "lockd_waiters";
/// Open streams by `kind` (`watch`, `keepalive`, `session`).
pub const STREAMS: &str = "lockd_open_streams";
/// Releases that woke an Acquire waiting on this lockd.
pub const HANDOFFS: &str = "lockd_handoffs_total";
/// Redis call latency by `command` (the script or command name).
pub const REDIS_SECONDS: &str = "lockd_redis_command_duration_seconds";
/// Lock operations sent to Redis in batches of two or more (`--redis-batch`); the batches
/// themselves are the `batch` command of [`REDIS_SECONDS`].
pub const REDIS_BATCHED: &str = "lockd_redis_batched_operations_total";
/// Redis errors by `kind` (`timeout`, `connection`, `response`, `other`).
pub const REDIS_ERRORS: &str = "lockd_redis_errors_total";
/// Open shared Redis connections.
pub const REDIS_CONNECTIONS: &str = "lockd_redis_connections";
/// Most shared Redis connections (`LOCKD_REDIS_POOL_SIZE`, resolved).
pub const REDIS_CONNECTIONS_MAX: &str = "lockd_redis_connections_max";
/// 1 while the wake-up subscription to Redis works, 0 while it is down.
pub const REDIS_SUBSCRIPTION_UP: &str = "lockd_redis_subscription_up";
/// 1 while the backend answers its health ping (health `SERVING`), 0 otherwise.
pub const BACKEND_UP: &str = "lockd_backend_up";

/// Every metric name, for documentation tests.
pub const ALL: [&str; 20] = [
    RPCS,
    RPC_SECONDS,
    ACQUIRES,
    CONTENDED,
    RELEASES,
    EXTENDS,
    HOLD_SECONDS,
    EXPIRED,
    LOST,
    WAITERS,
    STREAMS,
    HANDOFFS,
    REDIS_SECONDS,
    REDIS_BATCHED,
    REDIS_ERRORS,
    REDIS_CONNECTIONS,
    REDIS_CONNECTIONS_MAX,
    REDIS_SUBSCRIPTION_UP,
    BACKEND_UP,
    "lockd_build_info",
];

/// Distinct owners the contended counter labels; later ones are counted as `other`.
pub const MAX_OWNERS: usize = 100;

/// Histogram buckets for RPC and Redis latencies: 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// Hold-time buckets: 10 ms to a day.
const HOLD_BUCKETS: [f64; 14] = [
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
];

/// Installs the global recorder and serves `/metrics` on `listen`. Call once per process, from
/// within the runtime.
///
/// # Errors
/// When the address cannot be bound or a recorder is installed already.
pub fn install(listen: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Full(HOLD_SECONDS.into()), &HOLD_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        })
        .and_then(PrometheusBuilder::install)
        .map_err(|e| format!("LOCKD_METRICS_LISTEN (--metrics-listen) {listen}: {e}"))?;
    gauge!("lockd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Series that exist before their first event, so that rates and alerts see a zero.
    gauge!(WAITERS).set(0.0);
    for kind in ["watch", "keepalive", "session"] {
        gauge!(STREAMS, "kind" => kind).set(0.0);
    }
    for stream in ["keepalive", "session"] {
        counter!(LOST, "stream" => stream).absolute(0);
    }
    counter!(HANDOFFS).absolute(0);
    counter!(EXPIRED, "prefix" => "").absolute(0);
    for end in [
        AcquireEnd::Acquired,
        AcquireEnd::Contended,
        AcquireEnd::WaitTimeout,
    ] {
        counter!(ACQUIRES, "outcome" => end.name(), "prefix" => "").absolute(0);
    }
    tracing::info!(%listen, "serving Prometheus metrics on /metrics");
    Ok(())
}

/// The resource prefixes an operator chose to label metrics with, and the owners seen so far.
#[derive(Debug, Default)]
pub struct Prefixes {
    prefixes: Vec<&'static str>,
    owners: Mutex<HashSet<String>>,
}

impl Prefixes {
    /// Labels by these prefixes (`--metrics-resource-prefixes`); the first match wins.
    pub fn new(prefixes: &[String]) -> Self {
        Self {
            // Leaked once at start (the configuration lives as long as the process), so that
            // each recording borrows the label instead of copying it.
            prefixes: prefixes
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| &*Box::leak(p.clone().into_boxed_str()))
                .collect(),
            owners: Mutex::default(),
        }
    }

    /// The label value for `resource`: the first opted-in prefix it starts with, or `""`.
    /// With API keys, the core's names are `<namespace>:<name>` (see [`crate::auth`]): a prefix
    /// matches the whole name (`billing:nightly-`) or the name after its namespace
    /// (`nightly-`, in every namespace).
    ///
    /// The one place that decides which part of a resource name may become a label.
    pub fn of(&self, resource: &str) -> &'static str {
        let unqualified = resource.split_once(':').map(|(_, name)| name);
        self.prefixes
            .iter()
            .find(|p| resource.starts_with(**p) || unqualified.is_some_and(|n| n.starts_with(**p)))
            .copied()
            .unwrap_or("")
    }

    /// The label value for `owner`: itself while fewer than [`MAX_OWNERS`] were seen, else
    /// `other`. The default owner, the client's address, counts by host (its port changes
    /// with every connection).
    fn owner(&self, owner: &str) -> String {
        let host;
        let owner = match owner.parse::<SocketAddr>() {
            Ok(addr) => {
                host = addr.ip().to_string();
                host.as_str()
            }
            Err(_) => owner,
        };
        let mut seen = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(owner) {
            return owner.to_owned();
        }
        if seen.len() < MAX_OWNERS {
            seen.insert(owner.to_owned());
            return owner.to_owned();
        }
        "other".to_owned()
    }
}

/// How an Acquire ended, for [`ACQUIRES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireEnd {
    /// Granted at the first attempt (no wait asked, or none needed).
    Acquired,
    /// Granted after waiting.
    AcquiredAfterWait,
    /// Not granted, without a wait.
    Contended,
    /// Not granted within the wait.
    WaitTimeout,
    /// A backend failure, a mismatch, or shutdown.
    Error,
}

impl AcquireEnd {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Acquired => "acquired",
            Self::AcquiredAfterWait => "acquired_after_wait",
            Self::Contended => "contended",
            Self::WaitTimeout => "wait_timeout",
            Self::Error => "error",
        }
    }
}

/// Records one RPC: its method, its status code's name, and how long it took.
pub fn rpc(method: &'static str, code: &'static str, took: Duration) {
    counter!(RPCS, "method" => method, "code" => code).increment(1);
    histogram!(RPC_SECONDS, "method" => method).record(took.as_secs_f64());
}

/// Records an Acquire's end; a contended one or a timed-out wait also counts for its owner.
pub fn acquire(prefixes: &Prefixes, resource: &str, owner: &str, end: AcquireEnd) {
    let prefix = prefixes.of(resource);
    counter!(ACQUIRES, "outcome" => end.name(), "prefix" => prefix).increment(1);
    if matches!(end, AcquireEnd::Contended | AcquireEnd::WaitTimeout) {
        counter!(CONTENDED, "owner" => prefixes.owner(owner), "prefix" => prefix).increment(1);
    }
}

/// The label value of a lease status.
pub fn status_name(s: LeaseStatus) -> &'static str {
    match s {
        LeaseStatus::Ok => "ok",
        LeaseStatus::NotHeld => "not_held",
        LeaseStatus::HeldByOther => "held_by_other",
    }
}

/// Records a release (`status` `None` for an error) through `via`.
pub fn release(prefix: &'static str, status: Option<LeaseStatus>, via: &'static str) {
    let status = status.map_or("error", status_name);
    counter!(RELEASES, "status" => status, "via" => via, "prefix" => prefix).increment(1);
}

/// Records an extend (`status` `None` for an error); `renewal` for a stream's heartbeat.
pub fn extend(prefix: &'static str, status: Option<LeaseStatus>, renewal: bool) {
    let status = status.map_or("error", status_name);
    let via = if renewal { "stream" } else { "rpc" };
    counter!(EXTENDS, "status" => status, "via" => via, "prefix" => prefix).increment(1);
}

/// Records how long a lease was held, and whether it expired instead of being released.
pub fn held(prefix: &'static str, held: Duration, expired: bool) {
    let ended = if expired { "expired" } else { "released" };
    histogram!(HOLD_SECONDS, "ended" => ended, "prefix" => prefix).record(held.as_secs_f64());
    if expired {
        counter!(EXPIRED, "prefix" => prefix).increment(1);
    }
}

/// Records a lease that a KeepAlive (`keepalive`) or Session (`session`) stream lost.
pub fn lease_lost(stream: &'static str) {
    counter!(LOST, "stream" => stream).increment(1);
}

/// One more (`+1.0`) or one fewer (`-1.0`) waiting Acquire.
pub fn waiters(delta: f64) {
    gauge!(WAITERS).increment(delta);
}

/// A release woke a waiting Acquire.
pub fn handoff() {
    counter!(HANDOFFS).increment(1);
}

/// Counts an open stream of `kind` while it lives.
#[derive(Debug)]
pub struct OpenStream(&'static str);

impl OpenStream {
    /// Counts a stream of `kind` (`watch`, `keepalive`, `session`) until dropped.
    pub fn new(kind: &'static str) -> Self {
        gauge!(STREAMS, "kind" => kind).increment(1.0);
        Self(kind)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        gauge!(STREAMS, "kind" => self.0).decrement(1.0);
    }
}

/// Records one Redis call's latency.
pub fn redis_call(command: &'static str, took: Duration) {
    histogram!(REDIS_SECONDS, "command" => command).record(took.as_secs_f64());
}

/// Counts `ops` lock operations sent in one batch.
pub fn redis_batched(ops: usize) {
    counter!(REDIS_BATCHED).increment(ops as u64);
}

/// Starts the Redis error counters at zero, so that an alert on their rate has a series.
pub fn redis_errors_zero() {
    for kind in ["timeout", "connection", "response"] {
        counter!(REDIS_ERRORS, "kind" => kind).absolute(0);
    }
}

/// Records a Redis error by kind.
pub fn redis_error(kind: &'static str) {
    counter!(REDIS_ERRORS, "kind" => kind).increment(1);
}

/// Records how many shared Redis connections are open, of `max`.
pub fn redis_connections(open: usize, max: usize) {
    gauge!(REDIS_CONNECTIONS).set(open as f64);
    gauge!(REDIS_CONNECTIONS_MAX).set(max as f64);
}

/// Records whether the wake-up subscription is up.
pub fn redis_subscription(up: bool) {
    gauge!(REDIS_SUBSCRIPTION_UP).set(if up { 1.0 } else { 0.0 });
}

/// Records whether the backend answers its health ping.
pub fn backend_up(up: bool) {
    gauge!(BACKEND_UP).set(if up { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_is_labelled_by_its_first_matching_prefix_only() {
        let p = Prefixes::new(&["nightly-".into(), "report-".into(), "nightly-big-".into()]);
        assert_eq!(p.of("nightly-backup"), "nightly-");
        assert_eq!(p.of("nightly-big-job"), "nightly-");
        assert_eq!(p.of("report-42"), "report-");
        assert_eq!(p.of("user-1234"), "");
        assert_eq!(Prefixes::default().of("nightly-backup"), "");
    }

    #[test]
    fn a_namespaced_resource_matches_a_prefix_with_or_without_its_namespace() {
        let p = Prefixes::new(&["billing:report-".into(), "nightly-".into()]);
        assert_eq!(p.of("billing:nightly-backup"), "nightly-");
        assert_eq!(p.of("billing:report-1"), "billing:report-");
        assert_eq!(p.of("ops:report-1"), "");
    }

    #[test]
    fn owners_beyond_the_cap_share_one_label() {
        let p = Prefixes::default();
        for i in 0..MAX_OWNERS {
            assert_eq!(p.owner(&format!("o{i}")), format!("o{i}"));
        }
        assert_eq!(p.owner("late"), "other");
        assert_eq!(p.owner("o1"), "o1");
        assert_eq!(p.owner("10.0.0.7:51234"), "other");
        let fresh = Prefixes::default();
        assert_eq!(fresh.owner("10.0.0.7:51234"), "10.0.0.7");
        assert_eq!(fresh.owner("[::1]:80"), "::1");
    }
}
