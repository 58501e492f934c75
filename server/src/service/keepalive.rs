//! `KeepAlive`: leases bound to a bidirectional stream. Each client message is a heartbeat that
//! renews every lease of the stream; a lease that is lost is reported at once. When the client
//! ends the stream without a release, its leases are released (or left to expire, if asked);
//! when the stream breaks (reset, crash, partition), they end at their TTL, since the client
//! may still be acting on them.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt as _;
use lockd_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::info;

use super::request::KeptLease;
use super::response;
use crate::auth::{Caller, Namespace};
use crate::backend::{Backend, ExtendParams};
use crate::error::{Error, Result};
use crate::lock::{LeaseStatus, ReleaseParams};
use crate::locks::{Locks, ReleaseVia};
use crate::metrics::{self, OpenStream};
use crate::overload::StreamPermit;

/// Backend calls one stream makes at once when it renews or releases its leases, so one
/// message cannot flood the backend however many leases it names.
pub(super) const CALLS_IN_FLIGHT: usize = 32;

/// One KeepAlive stream's state, owned by its task.
pub struct Session<B> {
    locks: Arc<Locks<B>>,
    /// This stream's id, recorded on the leases it renews: on close it releases a lease only
    /// if no other stream (or Extend, or re-Acquire) renewed it since.
    id: String,
    /// The stream's leases by (resource, token secret), with when each ends unless renewed.
    leases: HashMap<(String, String), (KeptLease, Instant)>,
    /// Let leases expire instead of releasing them when the stream ends (from the first message).
    expire_on_close: Option<bool>,
    /// Whose key opened the stream: checked on every message, and the stream ends when it is
    /// revoked (the leases are then left to their TTL, as for a broken stream).
    caller: Caller,
    ns: Namespace,
    tx: mpsc::Sender<Result<pb::KeepAliveResponse, Status>>,
    /// The stream's place under the stream caps, freed when the task ends.
    _permit: StreamPermit,
    /// Counts the stream in `lockd_open_streams` while it lives.
    _open: OpenStream,
}

fn lost(ns: &Namespace, resource: &str, status: LeaseStatus) -> pb::LeaseState {
    pb::LeaseState {
        resource: ns.unqualify(resource.to_owned()),
        status: response::lease_status(status) as i32,
        ..Default::default()
    }
}

impl<B: Backend> Session<B> {
    /// Starts the session task and returns the response stream.
    pub fn start(
        locks: Arc<Locks<B>>,
        inbound: Streaming<pb::KeepAliveRequest>,
        caller: Caller,
        permit: StreamPermit,
    ) -> impl Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send + 'static {
        let (tx, rx) = mpsc::channel(16);
        let session = Self {
            id: locks.new_id(),
            locks,
            leases: HashMap::new(),
            expire_on_close: None,
            ns: caller.namespace(),
            caller,
            tx,
            _permit: permit,
            _open: OpenStream::new("keepalive"),
        };
        tokio::spawn(session.run(inbound));
        ReceiverStream::new(rx)
    }

    async fn run(mut self, mut inbound: Streaming<pb::KeepAliveRequest>) {
        let shutdown = self.locks.shutdown().clone();
        loop {
            let next_end = self.leases.values().map(|(_, end)| *end).min();
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(msg)) => {
                        if let Err(e) = self.heartbeat(msg).await {
                            // A bad message or a backend failure ends the stream, but does not
                            // release: the client is alive and will keep its leases again on a
                            // new stream; otherwise they expire at their TTL.
                            let _ = self.tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                    // The client ended its side of the stream: it knows its leases are done.
                    None => break,
                    // The stream broke: a reset connection, a crashed or partitioned client. A
                    // client that is still alive may believe it holds its leases until the
                    // expiry its last heartbeat reply promised, and it may learn of the break
                    // later than lockd does: releasing now could grant its lock to another
                    // client while it still acts on it. Its leases end at their TTL instead.
                    Some(Err(status)) if super::bad_message(&status) => {
                        // The client sent a message that cannot be decoded or is too large:
                        // it is told why, and its leases are left to their TTL as above.
                        let _ = self.tx.send(Err(status)).await;
                        return self.abandon("bad_message_left_to_ttl");
                    }
                    Some(Err(_)) => return self.abandon("stream_broken_left_to_ttl"),
                },
                _ = sleep_until(next_end.unwrap_or_else(Instant::now)), if next_end.is_some() => {
                    self.report_expired().await;
                }
                // The client dropped the call without ending its stream: as above.
                () = self.tx.closed() => return self.abandon("call_dropped_left_to_ttl"),
                e = self.caller.revoked() => {
                    self.abandon("key_revoked_left_to_ttl");
                    let _ = self.tx.send(Err(e.into())).await;
                    return;
                }
                _ = shutdown.cancelled() => {
                    // Another lockd can take the stream over: keep the leases, end the stream.
                    let _ = self.tx.send(Err(Error::ShuttingDown.into())).await;
                    return;
                }
            }
        }
        self.close().await;
    }

    /// Applies one client message, then renews every lease and reports their states.
    async fn heartbeat(&mut self, msg: pb::KeepAliveRequest) -> Result<()> {
        self.caller.check()?;
        let limits = *self.locks.limits();
        let max = limits.max_stream_leases;
        if msg.keep.len() > max || msg.release.len() > max {
            return Err(Error::invalid(
                "keep",
                format!(
                    "a message may name at most {max} leases in `keep` and in `release` (LOCKD_MAX_STREAM_LEASES)"
                ),
            ));
        }
        self.expire_on_close.get_or_insert(msg.expire_on_close);
        let mut releases = Vec::with_capacity(msg.release.len());
        for r in msg.release {
            let lease = KeptLease::parse(r, &limits, &self.ns)?;
            self.leases
                .remove(&(lease.resource.clone(), lease.token.expose().to_owned()));
            releases.push(self.release_params(&lease, None));
        }
        for k in msg.keep {
            let lease = KeptLease::parse(k, &limits, &self.ns)?;
            let key = (lease.resource.clone(), lease.token.expose().to_owned());
            // Until the renewal below answers, the lease is trusted for no time at all.
            self.leases.insert(key, (lease, Instant::now()));
        }
        if self.leases.len() > max {
            return Err(Error::ResourceExhausted(format!(
                "keep: a stream may keep at most {max} leases (LOCKD_MAX_STREAM_LEASES={max})"
            )));
        }
        let mut states = Vec::new();
        let released: Vec<_> = futures_util::stream::iter(releases)
            .map(|p| {
                let locks = self.locks.clone();
                async move {
                    let outcome = locks.release(&p, ReleaseVia::KeepAlive).await;
                    (p, outcome)
                }
            })
            .buffer_unordered(CALLS_IN_FLIGHT)
            .collect()
            .await;
        for (params, outcome) in released {
            let outcome = outcome?;
            states.push(pb::LeaseState {
                released: outcome.status == LeaseStatus::Ok,
                ..lost(&self.ns, &params.resource, outcome.status)
            });
        }
        let renewals: Vec<_> = self
            .leases
            .values()
            .map(|(lease, _)| ExtendParams {
                resource: lease.resource.clone(),
                token: lease.token.clone(),
                ttl: lease.ttl,
                replace_ttl: true,
                max_ttl: limits.max_ttl,
                renewer: Some(self.id.clone()),
            })
            .collect();
        let renewed: Vec<_> = futures_util::stream::iter(renewals)
            .map(|params| {
                let locks = self.locks.clone();
                async move {
                    let started = Instant::now();
                    let outcome = locks.extend(&params).await;
                    (params, started, outcome)
                }
            })
            .buffer_unordered(CALLS_IN_FLIGHT)
            .collect()
            .await;
        for (params, started, outcome) in renewed {
            let outcome = outcome?;
            let key = (params.resource.clone(), params.token.expose().to_owned());
            match outcome.lease {
                Some(lease) if outcome.status == LeaseStatus::Ok => {
                    if let Some(entry) = self.leases.get_mut(&key) {
                        entry.1 = started + lease.ttl;
                    }
                    states.push(pb::LeaseState {
                        resource: self.ns.unqualify(params.resource),
                        status: pb::LeaseStatus::Ok as i32,
                        fencing_token: lease.fencing_token,
                        expires_at: Some(response::timestamp(lease.expires_at)),
                        released: false,
                    });
                }
                _ => {
                    self.leases.remove(&key);
                    info!(resource = %params.resource, outcome = "lost", "keepalive");
                    metrics::lease_lost("keepalive");
                    states.push(lost(&self.ns, &params.resource, outcome.status));
                }
            }
        }
        self.send(states).await;
        Ok(())
    }

    /// The stream ended abnormally: its leases are left to their TTL (see [`Session::run`]).
    fn abandon(&self, why: &'static str) {
        for (lease, _) in self.leases.values() {
            info!(resource = %lease.resource, outcome = why, "keepalive");
        }
    }

    /// Reports and drops the leases whose time ran out without a renewal.
    async fn report_expired(&mut self) {
        let now = Instant::now();
        let mut states = Vec::new();
        let ns = &self.ns;
        self.leases.retain(|_, (lease, end)| {
            if *end > now {
                return true;
            }
            info!(resource = %lease.resource, outcome = "expired", "keepalive");
            metrics::lease_lost("keepalive");
            states.push(lost(ns, &lease.resource, LeaseStatus::NotHeld));
            false
        });
        self.send(states).await;
    }

    async fn send(&self, leases: Vec<pb::LeaseState>) {
        if !leases.is_empty() {
            let _ = self.tx.send(Ok(pb::KeepAliveResponse { leases })).await;
        }
    }

    fn release_params(&self, lease: &KeptLease, only_if_renewer: Option<String>) -> ReleaseParams {
        ReleaseParams {
            resource: lease.resource.clone(),
            token: lease.token.clone(),
            keep_until: None,
            min_hold: std::time::Duration::ZERO,
            max_ttl: self.locks.limits().max_ttl,
            only_if_renewer,
        }
    }

    /// The client ended the stream without releasing: release its leases at once, unless it
    /// asked for them to expire at their TTL. A lease renewed since by another stream (the
    /// client reconnected), by Extend or by a re-Acquire is left alone: releasing it would undo
    /// that renewal.
    async fn close(self) {
        if self.expire_on_close == Some(true) {
            return;
        }
        let releases: Vec<_> = self
            .leases
            .values()
            .map(|(lease, _)| self.release_params(lease, Some(self.id.clone())))
            .collect();
        release_on_close(&self.locks, releases, ReleaseVia::StreamClosed).await;
    }
}

/// Releases the leases of a stream the client ended, [`CALLS_IN_FLIGHT`] at a time; each
/// release is logged, and one that fails leaves its lease to its TTL.
pub(super) async fn release_on_close<B: Backend>(
    locks: &Arc<Locks<B>>,
    releases: Vec<ReleaseParams>,
    via: ReleaseVia,
) {
    futures_util::stream::iter(releases)
        .for_each_concurrent(CALLS_IN_FLIGHT, |p| {
            let locks = locks.clone();
            async move {
                let _ = locks.release(&p, via).await;
            }
        })
        .await;
}
