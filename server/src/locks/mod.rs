//! The lock core: the one owner of lock semantics between the gRPC adapter and the backend.
//!
//! Every operation goes through [`Locks`]: acquire (one attempt, or a wait woken by releases and
//! expiries), release (every path: the Release RPC, a KeepAlive release, a KeepAlive stream
//! closing, all through [`Locks::release`]), extend, inspect, list and watch. The gRPC layer
//! only parses requests into the domain types of [`crate::lock`] and converts the outcomes.
//!
//! - [`waiters`]: the local wait queues that releases wake.
//! - `acquire`: the blocking acquire loop over them.
//!
//! There are no hand-offs: a release frees the lock and wakes the next waiter, which takes it
//! with its own attempt. Granting inside the release (tried in issue 3) saved a backend call per
//! contended hand-over but needed a protocol spread over six places, and a lease granted to a
//! waiter that had left had to be released again by token, which could free a lease the same
//! token had re-acquired meanwhile (a double grant). What removing them cost is measured in
//! `docs/benchmarks.md`.

mod acquire;
pub mod waiters;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use self::waiters::Waiters;
use crate::backend::{Backend, ExtendParams, Page};
use crate::config::Limits;
use crate::error::Result;
use crate::events::{Events, WatcherGuard};
use crate::lock::{
    AcquireOutcome, AcquireParams, ExtendOutcome, Holders, LeaseStatus, LockEvent, ReleaseOutcome,
    ReleaseParams, Token,
};
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
    /// Caps the blocking waits (`LOCKD_MAX_WAITERS`).
    gate: Arc<Gate>,
}

fn status_name(s: LeaseStatus) -> &'static str {
    match s {
        LeaseStatus::Ok => "ok",
        LeaseStatus::NotHeld => "not_held",
        LeaseStatus::HeldByOther => "held_by_other",
    }
}

impl<B: Backend> Locks<B> {
    /// The core over `backend`, which must report releases to `waiters` and changes to `events`.
    pub fn new(
        backend: Arc<B>,
        waiters: Arc<Waiters>,
        events: Arc<Events>,
        limits: Limits,
        instance_id: String,
        shutdown: CancellationToken,
        gate: Arc<Gate>,
    ) -> Self {
        Self {
            backend,
            waiters,
            events,
            limits,
            instance_id: instance_id.into(),
            shutdown,
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
            AcquireOutcome::Acquired(lease) => info!(
                resource = %lease.resource,
                owner = %params.owner,
                fencing_token = lease.fencing_token,
                outcome = "acquired",
                "acquire"
            ),
            AcquireOutcome::Busy(busy) => info!(
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
        let result = self.backend.release(params).await;
        match &result {
            Ok(outcome) => info!(
                resource = %params.resource,
                via = via.name(),
                outcome = status_name(outcome.status),
                frees_at = outcome.frees_at,
                "release"
            ),
            Err(e) => info!(resource = %params.resource, via = via.name(), error = %e, "release"),
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
        let outcome = self.backend.extend(params).await?;
        if params.renewer.is_none() {
            info!(resource = %params.resource, outcome = status_name(outcome.status), "extend");
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
