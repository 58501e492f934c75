//! The lock core: the one owner of lock semantics between the gRPC adapter and the backend.
//!
//! Every operation goes through [`Locks`]: acquire (one attempt, or a wait woken by releases and
//! expiries), release (every path: the Release RPC, a KeepAlive release, a KeepAlive stream
//! closing, all through [`Locks::release`]), extend, inspect, list and watch. The gRPC layer
//! only parses requests into the domain types of [`crate::lock`] and converts the outcomes.
//!
//! - [`waiters`]: the local wait queues that releases wake.
//! - `acquire`: the blocking acquire loop over them.
//! - [`held`]: the leases this lockd granted, for the hold-time and expiry metrics.
//!
//! The core records the lock metrics ([`crate::metrics`]) and the RPC span's fields (resource,
//! outcome, fencing token; never the lock token), so every path is counted once whichever
//! handler or stream it came through.
//!
//! There are no hand-offs: a release frees the lock and wakes the next waiter, which takes it
//! with its own attempt. Granting inside the release (tried in issue 3) saved a backend call per
//! contended hand-over but needed a protocol spread over six places, and a lease granted to a
//! waiter that had left had to be released again by token, which could free a lease the same
//! token had re-acquired meanwhile (a double grant). What removing them cost is measured in
//! `docs/benchmarks.md`.

mod acquire;
pub mod held;
pub mod waiters;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use self::held::HeldLeases;
use self::waiters::Waiters;
use crate::backend::{Backend, ExtendParams, Page};
use crate::config::Limits;
use crate::decision;
use crate::error::Result;
use crate::events::{Events, WatcherGuard};
use crate::lock::{
    AcquireOutcome, AcquireParams, ExtendOutcome, Holders, LeaseStatus, LockEvent, ReleaseOutcome,
    ReleaseParams, Token,
};
use crate::metrics::{self, AcquireEnd, status_name};
use crate::overload::Gate;

/// Which path a release came by, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseVia {
    /// The Release RPC.
    Rpc,
    /// A `release` entry of a KeepAlive message.
    KeepAlive,
    /// The client ended a KeepAlive stream without releasing its lease (only if that stream
    /// renewed the lease last).
    StreamClosed,
    /// A Release operation on a Session stream.
    Session,
    /// The client ended a Session stream: its leases are released (only those it renewed or
    /// acquired last).
    SessionClosed,
}

impl ReleaseVia {
    fn name(self) -> &'static str {
        match self {
            Self::Rpc => "rpc",
            Self::KeepAlive => "keepalive",
            Self::StreamClosed => "stream_closed",
            Self::Session => "session",
            Self::SessionClosed => "session_closed",
        }
    }
}

/// The lock service's semantics over one backend. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Locks<B> {
    backend: Arc<B>,
    waiters: Arc<Waiters>,
    events: Arc<Events>,
    limits: Limits,
    /// Prefix of generated tokens, so an operator can tell which lockd granted a lease.
    instance_id: Arc<str>,
    /// Cancelled on shutdown: ends every wait and stream with UNAVAILABLE.
    shutdown: CancellationToken,
    /// The leases granted here, for the hold-time and expiry metrics; and the label prefixes.
    held: Arc<HeldLeases>,
    /// Caps the blocking waits (`LOCKD_MAX_WAITERS`).
    gate: Arc<Gate>,
}

/// Records the current RPC span's outcome (a no-op when spans are off).
fn record_outcome(outcome: &'static str) {
    Span::current().record("outcome", outcome);
}

impl<B: Backend> Locks<B> {
    /// The core over `backend`, which must report releases to `waiters` and changes to `events`.
    // Each argument is a separate part the server shares with the core; a struct holding them
    // would only move the list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: Arc<B>,
        waiters: Arc<Waiters>,
        events: Arc<Events>,
        limits: Limits,
        instance_id: String,
        shutdown: CancellationToken,
        held: Arc<HeldLeases>,
        gate: Arc<Gate>,
    ) -> Self {
        tokio::spawn(held.clone().sweep(backend.clone(), shutdown.clone()));
        Self {
            backend,
            waiters,
            events,
            limits,
            instance_id: instance_id.into(),
            shutdown,
            held,
            gate,
        }
    }

    /// The limits requests are validated against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Cancelled when the server shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A fresh token for a caller that chose none.
    pub fn new_token(&self) -> Token {
        Token::generate(&self.instance_id)
    }

    /// A fresh id, unique across lockd processes (for KeepAlive streams and fair waiters).
    pub fn new_id(&self) -> String {
        format!("{}:{}", self.instance_id, uuid::Uuid::new_v4())
    }

    /// Takes the lock, or a semaphore slot: one attempt, or with a `wait`, attempts woken by
    /// releases and expiries until the wait ends.
    ///
    /// # Errors
    /// Backend failures, a mutex/semaphore mismatch, shutdown during a wait, and a wait beyond
    /// `LOCKD_MAX_WAITERS`.
    pub async fn acquire(&self, params: &AcquireParams, wait: Duration) -> Result<AcquireOutcome> {
        Span::current().record("resource", params.resource.as_str());
        let started = Instant::now();
        let outcome = self.attempt(params, wait).await;
        let end = match &outcome {
            Ok(AcquireOutcome::Acquired(lease)) => {
                Span::current().record("fencing_token", lease.fencing_token);
                self.held.granted(
                    &lease.resource,
                    &lease.token,
                    lease.fencing_token,
                    lease.since,
                    lease.ttl,
                );
                // A wait that did not need to wait counts as acquired at once.
                if wait.is_zero() || lease.since.duration_since(started) < Duration::from_millis(1)
                {
                    AcquireEnd::Acquired
                } else {
                    AcquireEnd::AcquiredAfterWait
                }
            }
            Ok(AcquireOutcome::Busy(_)) if wait.is_zero() => AcquireEnd::Contended,
            Ok(AcquireOutcome::Busy(_)) => AcquireEnd::WaitTimeout,
            Err(_) => AcquireEnd::Error,
        };
        record_outcome(end.name());
        metrics::acquire(self.held.prefixes(), &params.resource, &params.owner, end);
        outcome
    }

    /// [`Self::acquire`] without the metrics.
    async fn attempt(&self, params: &AcquireParams, wait: Duration) -> Result<AcquireOutcome> {
        let outcome = if wait.is_zero() {
            // Boxed here too: a future is as large as its largest state.
            Box::pin(self.backend.acquire(params)).await?
        } else {
            // Held while waiting; dropped with this future on every path, including a client
            // that goes away or a gRPC deadline that passes.
            let _waiting = self.gate.waiter()?;
            // The configuration caps the wait, so the deadline cannot overflow; saturate anyway.
            let now = Instant::now();
            let deadline = now.checked_add(wait).unwrap_or(now + self.limits.max_wait);
            acquire::acquire(
                &self.backend,
                &self.waiters,
                params,
                deadline,
                &self.shutdown,
            )
            .await?
        };
        match &outcome {
            AcquireOutcome::Acquired(lease) => decision!(
                resource = %lease.resource,
                owner = %params.owner,
                fencing_token = lease.fencing_token,
                outcome = "acquired",
                "acquire"
            ),
            AcquireOutcome::Busy(busy) => decision!(
                resource = %params.resource,
                owner = %params.owner,
                holder = busy.holder.as_ref().map_or("", |h| h.owner.as_str()),
                fencing_token = busy.holder.as_ref().map_or(0, |h| h.fencing_token),
                outcome = "busy",
                "acquire"
            ),
        }
        Ok(outcome)
    }

    /// Frees a lease, now or at its minimum-hold point. Every release takes this path; the
    /// backend wakes the next waiter (on every lockd).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn release(&self, params: &ReleaseParams, via: ReleaseVia) -> Result<ReleaseOutcome> {
        Span::current().record("resource", params.resource.as_str());
        let result = self.backend.release(params).await;
        let status = result.as_ref().ok().map(|o| o.status);
        let ended = match status {
            Some(LeaseStatus::Ok) => Some(true),
            // Only a check of another stream's renewal that changed nothing.
            Some(LeaseStatus::HeldByOther) if params.only_if_renewer.is_some() => None,
            // The lease is gone: it expired (and may have been taken since).
            Some(LeaseStatus::NotHeld | LeaseStatus::HeldByOther) => Some(false),
            None => None,
        };
        self.held.ended(&params.resource, &params.token, ended);
        let prefix = self.held.prefixes().of(&params.resource);
        metrics::release(prefix, status, via.name());
        record_outcome(status.map_or("error", status_name));
        match &result {
            Ok(outcome) => decision!(
                resource = %params.resource,
                via = via.name(),
                outcome = status_name(outcome.status),
                frees_at = outcome.frees_at,
                "release"
            ),
            Err(e) => {
                decision!(resource = %params.resource, via = via.name(), error = %e, "release")
            }
        }
        result
    }

    /// Lengthens a lease. An Extend call is logged; a KeepAlive heartbeat's renewal (with a
    /// `renewer`) is not, since it repeats every few seconds for every kept lease (the session
    /// logs the lease's loss instead).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn extend(&self, params: &ExtendParams) -> Result<ExtendOutcome> {
        Span::current().record("resource", params.resource.as_str());
        let started = Instant::now();
        let result = self.backend.extend(params).await;
        let status = result.as_ref().ok().map(|o| o.status);
        let prefix = self.held.prefixes().of(&params.resource);
        metrics::extend(prefix, status, params.renewer.is_some());
        record_outcome(status.map_or("error", status_name));
        let outcome = result?;
        if let Some(lease) = &outcome.lease {
            Span::current().record("fencing_token", lease.fencing_token);
            self.held
                .renewed(&params.resource, &params.token, started, lease.ttl);
        }
        if params.renewer.is_none() {
            decision!(resource = %params.resource, outcome = status_name(outcome.status), "extend");
        }
        Ok(outcome)
    }

    /// The holders of `resource`, or `None` when it is free.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn inspect(&self, resource: &str) -> Result<Option<Holders>> {
        self.backend.inspect(resource).await
    }

    /// One page of the locks held under `prefix`.
    ///
    /// # Errors
    /// Backend failures, or a page token that ListLocks did not return.
    pub async fn list(&self, prefix: &str, page_size: usize, cursor: &str) -> Result<Page> {
        self.backend.list(prefix, page_size, cursor).await
    }

    /// Subscribes to every lock event, in publication order, while the guard lives.
    pub fn watch(&self) -> (broadcast::Receiver<Arc<LockEvent>>, WatcherGuard) {
        self.events.subscribe()
    }
}
