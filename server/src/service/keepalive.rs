//! `KeepAlive`: leases bound to a bidirectional stream. Each client message is a heartbeat that
//! renews every lease of the stream; a lease that is lost is reported at once; when the stream
//! ends without a release, its leases are released (or left to expire, if asked).

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::join_all;
use lockd_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::info;

use super::request::KeptLease;
use super::response;
use crate::backend::{Backend, ExtendParams};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::lock::{LeaseStatus, ReleaseParams};

/// One KeepAlive stream's state, owned by its task.
pub struct Session<B> {
    backend: Arc<B>,
    limits: Limits,
    /// The stream's leases by (resource, token secret), with when each ends unless renewed.
    leases: HashMap<(String, String), (KeptLease, Instant)>,
    /// Let leases expire instead of releasing them when the stream ends (from the first message).
    expire_on_close: Option<bool>,
    tx: mpsc::Sender<Result<pb::KeepAliveResponse, Status>>,
}

fn lost(resource: &str, status: LeaseStatus) -> pb::LeaseState {
    pb::LeaseState {
        resource: resource.to_owned(),
        status: response::lease_status(status) as i32,
        ..Default::default()
    }
}

impl<B: Backend> Session<B> {
    /// Starts the session task and returns the response stream.
    pub fn start(
        backend: Arc<B>,
        limits: Limits,
        shutdown: CancellationToken,
        inbound: Streaming<pb::KeepAliveRequest>,
    ) -> impl Stream<Item = Result<pb::KeepAliveResponse, Status>> + Send + 'static {
        let (tx, rx) = mpsc::channel(16);
        let session = Self {
            backend,
            limits,
            leases: HashMap::new(),
            expire_on_close: None,
            tx,
        };
        tokio::spawn(session.run(inbound, shutdown));
        ReceiverStream::new(rx)
    }

    async fn run(
        mut self,
        mut inbound: Streaming<pb::KeepAliveRequest>,
        shutdown: CancellationToken,
    ) {
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
                    // The client closed its side, crashed, or its connection dropped.
                    Some(Err(_)) | None => break,
                },
                _ = sleep_until(next_end.unwrap_or_else(Instant::now)), if next_end.is_some() => {
                    self.report_expired().await;
                }
                _ = self.tx.closed() => break,
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
        self.expire_on_close.get_or_insert(msg.expire_on_close);
        let mut states = Vec::new();
        for r in msg.release {
            let lease = KeptLease::parse(r, &self.limits)?;
            self.leases
                .remove(&(lease.resource.clone(), lease.token.expose().to_owned()));
            // Boxed: a rare step, whose state would otherwise enlarge every session's task.
            let outcome = Box::pin(self.backend.release(&self.release_params(&lease))).await?;
            info!(resource = %lease.resource, outcome = "released", "keepalive");
            states.push(pb::LeaseState {
                released: outcome.status == LeaseStatus::Ok,
                ..lost(&lease.resource, outcome.status)
            });
        }
        for k in msg.keep {
            let lease = KeptLease::parse(k, &self.limits)?;
            let key = (lease.resource.clone(), lease.token.expose().to_owned());
            // Until the renewal below answers, the lease is trusted for no time at all.
            self.leases.insert(key, (lease, Instant::now()));
        }
        let renewals = self.leases.values().map(|(lease, _)| {
            let params = ExtendParams {
                resource: lease.resource.clone(),
                token: lease.token.clone(),
                ttl: lease.ttl,
                replace_ttl: true,
                max_ttl: self.limits.max_ttl,
                renewer: None,
            };
            let started = Instant::now();
            let backend = self.backend.clone();
            async move {
                let outcome = backend.extend(&params).await;
                (params, started, outcome)
            }
        });
        for (params, started, outcome) in join_all(renewals).await {
            let outcome = outcome?;
            let key = (params.resource.clone(), params.token.expose().to_owned());
            match outcome.lease {
                Some(lease) if outcome.status == LeaseStatus::Ok => {
                    if let Some(entry) = self.leases.get_mut(&key) {
                        entry.1 = started + lease.ttl;
                    }
                    states.push(pb::LeaseState {
                        resource: params.resource,
                        status: pb::LeaseStatus::Ok as i32,
                        fencing_token: lease.fencing_token,
                        expires_at: Some(response::timestamp(lease.expires_at)),
                        released: false,
                    });
                }
                _ => {
                    self.leases.remove(&key);
                    info!(resource = %params.resource, outcome = "lost", "keepalive");
                    states.push(lost(&params.resource, outcome.status));
                }
            }
        }
        self.send(states).await;
        Ok(())
    }

    /// Reports and drops the leases whose time ran out without a renewal.
    async fn report_expired(&mut self) {
        let now = Instant::now();
        let mut states = Vec::new();
        self.leases.retain(|_, (lease, end)| {
            if *end > now {
                return true;
            }
            info!(resource = %lease.resource, outcome = "expired", "keepalive");
            states.push(lost(&lease.resource, LeaseStatus::NotHeld));
            false
        });
        self.send(states).await;
    }

    async fn send(&self, leases: Vec<pb::LeaseState>) {
        if !leases.is_empty() {
            let _ = self.tx.send(Ok(pb::KeepAliveResponse { leases })).await;
        }
    }

    fn release_params(&self, lease: &KeptLease) -> ReleaseParams {
        ReleaseParams {
            resource: lease.resource.clone(),
            token: lease.token.clone(),
            keep_until: None,
            min_hold: std::time::Duration::ZERO,
            max_ttl: self.limits.max_ttl,
            only_if_renewer: None,
        }
    }

    /// The stream ended without the client releasing: release its leases at once, unless it
    /// asked for them to expire at their TTL.
    async fn close(self) {
        if self.expire_on_close == Some(true) {
            return;
        }
        let releases = self.leases.values().map(|(lease, _)| {
            let params = self.release_params(lease);
            let backend = self.backend.clone();
            async move {
                let outcome = backend.release(&params).await;
                info!(
                    resource = %params.resource,
                    outcome = if outcome.is_ok() { "released_on_close" } else { "release_on_close_failed" },
                    "keepalive"
                );
            }
        });
        join_all(releases).await;
    }
}
