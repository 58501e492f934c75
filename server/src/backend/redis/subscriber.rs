//! The one pub/sub subscription of a lockd process: wake-ups for waiters, always; lock events
//! and expirations for `Watch`, while anyone watches.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use deadpool_redis::redis::aio::{PubSubSink, PubSubStream};
use deadpool_redis::redis::{self, RedisError};
use futures_util::StreamExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::RedisBackend;
use crate::error::Result;
use crate::events::Events;
use crate::lock::{EventKind, LockEvent};
use crate::locks::waiters::Waiters;

/// The keyspace-notification pattern for expired keys, in any database.
const EXPIRED_PATTERN: &str = "__keyevent@*__:expired";

/// Parses an event published by a script: "<kind>\n<resource>\n<owner>\n<fence>\n<time>\n<expires>".
pub(super) fn parse_event(payload: &str) -> Option<LockEvent> {
    let mut parts = payload.split('\n');
    let kind = match parts.next()? {
        "A" => EventKind::Acquired,
        "E" => EventKind::Extended,
        "R" => EventKind::Released,
        _ => return None,
    };
    Some(LockEvent {
        kind,
        resource: parts.next()?.to_owned(),
        owner: parts.next()?.to_owned(),
        fencing_token: parts.next()?.parse().ok()?,
        time: parts.next()?.parse().ok()?,
        expires_at: parts.next()?.parse().ok(),
    })
}

/// How often the subscriber publishes a heartbeat to itself, through a normal connection.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A subscription that delivers nothing, not even its own heartbeats, for this long is dead:
/// half-open after a network partition, or silenced some other way. It is replaced.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// The one subscription of this process: wake-ups always, events while anyone watches.
pub(super) struct Subscriber {
    backend: Arc<RedisBackend>,
    waiters: Arc<Waiters>,
    events: Arc<Events>,
    /// Time limit for connecting and for each subscription command.
    timeout: Duration,
    /// `<prefix>:heartbeat:<uuid>`, this process's own: proof that messages still arrive.
    heartbeat_channel: String,
}

/// Why the subscription ended or could not be made.
type Cause = String;

/// What the subscriber last logged, so that each change is logged once, not every retry.
#[derive(PartialEq, Eq)]
enum Logged {
    Nothing,
    Up,
    Down(Cause),
}

impl Subscriber {
    pub(super) fn new(
        backend: Arc<RedisBackend>,
        waiters: Arc<Waiters>,
        events: Arc<Events>,
        timeout: Duration,
    ) -> Self {
        let heartbeat_channel = format!("{}:heartbeat:{}", backend.prefix, uuid::Uuid::new_v4());
        Self {
            backend,
            waiters,
            events,
            timeout,
            heartbeat_channel,
        }
    }

    /// Subscribes, reconnecting with backoff, until `shutdown`. While the subscription is down,
    /// [`RedisBackend::ping`] fails with the cause (health is `NOT_SERVING`), and each new cause
    /// is logged once. After every subscription every queue head tries again, since releases
    /// may have been missed meanwhile.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut logged = Logged::Nothing;
        let mut watchers = self.events.watchers();
        let mut failures = 0;
        loop {
            let attempt = async {
                let pubsub = self.backend.topology.pubsub(failures).await?;
                let (mut sink, stream) = pubsub.split();
                sink.subscribe(&[
                    self.backend.released_channel.as_str(),
                    self.heartbeat_channel.as_str(),
                ])
                .await?;
                Ok::<_, crate::error::Error>((sink, stream))
            };
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(self.timeout, attempt) => r,
            };
            let cause = match connected {
                Ok(Ok((sink, stream))) => {
                    backoff = Duration::from_millis(50);
                    failures = 0;
                    self.set_down(None);
                    if matches!(logged, Logged::Down(_)) {
                        tracing::info!("wake-up subscription restored");
                    } else {
                        tracing::debug!("wake-up subscription up");
                    }
                    logged = Logged::Up;
                    self.waiters.released_all();
                    match self.listen(sink, stream, &mut watchers, &shutdown).await {
                        Some(cause) => cause,
                        None => return,
                    }
                }
                Ok(Err(e)) => format!("cannot subscribe: {e}"),
                Err(_) => format!("cannot subscribe: no answer within {:?}", self.timeout),
            };
            failures += 1;
            self.set_down(Some(cause.clone()));
            let down = Logged::Down(cause);
            if logged == down {
                tracing::debug!("wake-up subscription still down; retrying");
            } else {
                if let Logged::Down(cause) = &down {
                    tracing::warn!(
                        cause = %cause,
                        "wake-up subscription down: blocking acquires are only woken by TTLs, \
                         and health is NOT_SERVING until it is back; retrying"
                    );
                }
                logged = down;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Handles messages until the subscription fails, which returns why, or `shutdown`, which
    /// returns `None`.
    async fn listen(
        &self,
        mut sink: PubSubSink,
        mut stream: PubSubStream,
        watchers: &mut tokio::sync::watch::Receiver<usize>,
        shutdown: &CancellationToken,
    ) -> Option<Cause> {
        let mut watching = false;
        // Cluster mode only: the per-master expiry subscriptions, cancelled when dropped.
        let mut expiry_listeners = ExpiryListeners::default();
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let mut switches = self.backend.topology.switches();
        loop {
            let want = *watchers.borrow_and_update() > 0;
            if want != watching {
                match tokio::time::timeout(self.timeout, self.watch_events(&mut sink, want)).await {
                    Ok(Ok(())) => {
                        watching = want;
                        if !want {
                            expiry_listeners.0.clear();
                        } else if self.backend.topology.is_cluster() {
                            self.follow_masters(&mut expiry_listeners).await;
                        }
                    }
                    Ok(Err(e)) => return Some(format!("cannot (un)subscribe lock events: {e}")),
                    Err(_) => {
                        return Some(format!(
                            "no answer to (un)subscribing lock events within {:?}",
                            self.timeout
                        ));
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = watchers.changed() => {}
                _ = master_switch(&mut switches) => {
                    return Some("the Redis master switched (Sentinel failover)".to_owned());
                }
                _ = heartbeat.tick() => {
                    if watching && self.backend.topology.is_cluster() {
                        self.follow_masters(&mut expiry_listeners).await;
                    }
                    let silent = heard.elapsed();
                    if silent >= HEARTBEAT_TIMEOUT {
                        return Some(format!(
                            "no message for {silent:?}, not even this process's heartbeats: the \
                             connection is half-open or silenced"
                        ));
                    }
                    tokio::spawn(publish_heartbeat(
                        self.backend.clone(),
                        self.heartbeat_channel.clone(),
                    ));
                }
                msg = stream.next() => match msg {
                    Some(msg) => {
                        heard = Instant::now();
                        self.handle(&msg);
                    }
                    None => return Some("connection closed".to_owned()),
                },
            }
        }
    }

    /// Records the subscription's state for [`RedisBackend::ping`].
    fn set_down(&self, cause: Option<Cause>) {
        crate::metrics::redis_subscription(cause.is_none());
        *self
            .backend
            .wakeups_down
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = cause;
    }

    /// Starts or stops listening for lock events and expirations. Lock events are published
    /// with classic `PUBLISH`, which a cluster sends to every node, so this one subscription
    /// hears them all; expirations are only told on the node where the key expired, so in
    /// Cluster mode [`Self::follow_masters`] listens on every master instead.
    async fn watch_events(&self, sink: &mut PubSubSink, on: bool) -> Result<(), RedisError> {
        let cluster = self.backend.topology.is_cluster();
        if on {
            sink.subscribe(&self.backend.events_channel).await?;
            if !cluster {
                enable_expiry_notifications(&self.backend, None).await;
                sink.psubscribe(EXPIRED_PATTERN).await?;
            }
            Ok(())
        } else {
            sink.unsubscribe(&self.backend.events_channel).await?;
            if !cluster {
                sink.punsubscribe(EXPIRED_PATTERN).await?;
            }
            Ok(())
        }
    }

    /// Cluster mode, while anyone watches: keeps one expiry subscription per current master,
    /// starting those of new masters and dropping those of nodes that are no longer masters.
    async fn follow_masters(&self, listeners: &mut ExpiryListeners) {
        let masters = async {
            let (mut conn, _) = self.backend.any_conn().await?;
            self.backend.topology.masters(&mut conn).await
        };
        let Ok(masters) = masters.await else {
            return;
        };
        let masters: Vec<(String, u16)> = masters.into_iter().flatten().collect();
        listeners.0.retain(|addr, _| masters.contains(addr));
        for addr in masters {
            if listeners.0.contains_key(&addr) {
                continue;
            }
            let stop = CancellationToken::new();
            tokio::spawn(listen_for_expiries(
                self.backend.clone(),
                self.events.clone(),
                addr.clone(),
                stop.clone(),
            ));
            listeners.0.insert(addr, stop.drop_guard());
        }
    }
}

/// Cluster mode: the expiry subscriptions, one per master, each stopped when dropped.
#[derive(Default)]
struct ExpiryListeners(std::collections::HashMap<(String, u16), tokio_util::sync::DropGuard>);

/// Listens for expired lock keys on one cluster master until `stop`, reconnecting with a pause
/// after a failure (the master list is checked again every second meanwhile).
async fn listen_for_expiries(
    backend: Arc<RedisBackend>,
    events: Arc<Events>,
    addr: (String, u16),
    stop: CancellationToken,
) {
    loop {
        enable_expiry_notifications(&backend, Some(&addr)).await;
        let subscribed = async {
            let mut pubsub = backend.topology.node_pubsub(&addr.0, addr.1).await?;
            pubsub.psubscribe(EXPIRED_PATTERN).await?;
            Ok::<_, crate::error::Error>(pubsub)
        };
        if let Ok(mut pubsub) = subscribed.await {
            let mut messages = pubsub.on_message();
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    msg = messages.next() => msg,
                };
                let Some(msg) = msg else { break };
                let key = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                if let Some(resource) = backend.resource_of(&key) {
                    tokio::spawn(report_expiry(backend.clone(), events.clone(), resource));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Turns on Redis's expired-key notifications (`notify-keyspace-events` E and x) if they are
/// off, on `node` (a cluster master) or the one Redis. Managed Redis services may refuse
/// CONFIG: expirations are then not reported.
async fn enable_expiry_notifications(backend: &RedisBackend, node: Option<&(String, u16)>) {
    let Ok((mut conn, _)) = backend.any_conn().await else {
        return;
    };
    let mut get = redis::cmd("CONFIG");
    get.arg("GET").arg("notify-keyspace-events");
    let flags = match conn.on_node::<(String, String)>(node, get).await {
        Ok((_, flags)) => flags,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read notify-keyspace-events; Watch will not see expirations");
            return;
        }
    };
    let has = |c| flags.contains(c);
    if has('E') && (has('x') || has('A')) {
        return;
    }
    let mut set = redis::cmd("CONFIG");
    set.arg("SET")
        .arg("notify-keyspace-events")
        .arg(format!("{flags}Ex"));
    match conn.on_node::<String>(node, set).await {
        Ok(_) => tracing::info!("enabled Redis keyspace notifications for expired keys (Ex)"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot enable notify-keyspace-events Ex; Watch will not see expirations")
        }
    }
}

impl Subscriber {
    fn handle(&self, msg: &redis::Msg) {
        let payload = String::from_utf8_lossy(msg.get_payload_bytes());
        if msg.from_pattern() {
            if let Some(resource) = self.backend.resource_of(&payload) {
                tokio::spawn(report_expiry(
                    self.backend.clone(),
                    self.events.clone(),
                    resource,
                ));
            }
        } else if msg.get_channel_name() == self.heartbeat_channel {
            // Only proof of life, already noted.
        } else if msg.get_channel_name() == self.backend.released_channel {
            let (resource, next) = payload.split_once('\n').unwrap_or((&payload, ""));
            self.waiters
                .released(resource, (!next.is_empty()).then_some(next));
        } else if let Some(event) = parse_event(&payload) {
            self.events.publish(event);
        }
    }
}

/// Completes when Sentinel switches masters; never outside Sentinel mode.
async fn master_switch(switches: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    let changed = match switches {
        Some(s) => s.changed().await.is_ok(),
        None => false,
    };
    if !changed {
        std::future::pending::<()>().await;
    }
}

/// Publishes one heartbeat through a shared connection (not refused while Redis may evict
/// keys: the subscription is still worth keeping). A failure shows as a missing heartbeat.
async fn publish_heartbeat(backend: Arc<RedisBackend>, channel: String) {
    let published = async {
        let (mut conn, _) = backend.any_conn().await?;
        let r = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg("")
            .query_async::<i64>(&mut conn)
            .await;
        Ok::<_, crate::error::Error>(backend.forget_on_failure(r)?)
    };
    if let Err(e) = published.await {
        tracing::debug!(error = %e, "cannot publish the wake-up subscription's heartbeat");
    }
}

/// Reports an expiration seen through keyspace notifications. The lock's record is gone, so
/// the event carries the resource's latest fencing token from its counter key, and Redis's
/// current time. A long mutex lease granted and renewed while nobody watched has no counter key
/// (common.lua's keep_fence): its token is reported as 0, unknown.
async fn report_expiry(backend: Arc<RedisBackend>, events: Arc<Events>, resource: String) {
    let mut pipe = redis::pipe();
    pipe.cmd("GET")
        .arg(backend.key(&resource, ":fence"))
        .cmd("TIME");
    let Ok((fence, (secs, micros))): Result<(Option<u64>, (i64, i64))> = backend.query(&pipe).await
    else {
        return;
    };
    events.publish(LockEvent {
        kind: EventKind::Expired,
        resource,
        owner: String::new(),
        fencing_token: fence.unwrap_or(0),
        time: secs * 1000 + micros / 1000,
        expires_at: None,
    });
}
