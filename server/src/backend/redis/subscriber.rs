//! The one pub/sub subscription of a lockd process: wake-ups for waiters, always; lock events
//! and expirations for `Watch`, while anyone watches.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::aio::PubSubSink;
use deadpool_redis::redis::{self, RedisError};
use futures_util::StreamExt as _;
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

/// The one subscription of this process: wake-ups always, events while anyone watches.
pub(super) struct Subscriber {
    pub(super) backend: Arc<RedisBackend>,
    pub(super) client: redis::Client,
    pub(super) waiters: Arc<Waiters>,
    pub(super) events: Arc<Events>,
}

impl Subscriber {
    /// Subscribes, reconnecting with backoff. After a reconnect every queue head retries, since
    /// releases may have been missed meanwhile.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut connected_before = false;
        let mut watchers = self.events.watchers();
        loop {
            let attempt = async {
                let pubsub = self.client.get_async_pubsub().await?;
                let (mut sink, stream) = pubsub.split();
                sink.subscribe(&self.backend.released_channel).await?;
                Ok::<_, RedisError>((sink, stream))
            };
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = attempt => r,
            };
            match connected {
                Ok((mut sink, mut stream)) => {
                    backoff = Duration::from_millis(50);
                    if connected_before {
                        tracing::info!("wake-up subscription restored");
                        self.waiters.released_all();
                    }
                    connected_before = true;
                    let mut watching = false;
                    loop {
                        let want = *watchers.borrow_and_update() > 0;
                        if want != watching {
                            if let Err(e) = self.watch_events(&mut sink, want).await {
                                tracing::warn!(error = %e, "cannot (un)subscribe lock events");
                                break;
                            }
                            watching = want;
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = watchers.changed() => {}
                            msg = stream.next() => match msg {
                                Some(msg) => self.handle(&msg),
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("wake-up subscription lost; reconnecting");
                }
                Err(e) => tracing::debug!(error = %e, "wake-up subscription failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Starts or stops listening for lock events and expirations.
    async fn watch_events(&self, sink: &mut PubSubSink, on: bool) -> Result<(), RedisError> {
        if on {
            self.enable_expiry_notifications().await;
            sink.subscribe(&self.backend.events_channel).await?;
            sink.psubscribe(EXPIRED_PATTERN).await
        } else {
            sink.unsubscribe(&self.backend.events_channel).await?;
            sink.punsubscribe(EXPIRED_PATTERN).await
        }
    }

    /// Turns on Redis's expired-key notifications (`notify-keyspace-events` E and x) if they are
    /// off. Managed Redis services may refuse CONFIG: expirations are then not reported.
    async fn enable_expiry_notifications(&self) {
        let mut get = redis::pipe();
        get.cmd("CONFIG").arg("GET").arg("notify-keyspace-events");
        let flags = match self.backend.query::<((String, String),)>(&get).await {
            Ok(((_, flags),)) => flags,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read notify-keyspace-events; Watch will not see expirations");
                return;
            }
        };
        let has = |c| flags.contains(c);
        if has('E') && (has('x') || has('A')) {
            return;
        }
        let mut set = redis::pipe();
        set.cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(format!("{flags}Ex"));
        match self.backend.query::<(String,)>(&set).await {
            Ok(_) => tracing::info!("enabled Redis keyspace notifications for expired keys (Ex)"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot enable notify-keyspace-events Ex; Watch will not see expirations")
            }
        }
    }

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
        } else if msg.get_channel_name() == self.backend.released_channel {
            let (resource, next) = payload.split_once('\n').unwrap_or((&payload, ""));
            self.waiters
                .released(resource, (!next.is_empty()).then_some(next));
        } else if let Some(event) = parse_event(&payload) {
            self.events.publish(event);
        }
    }
}

/// Reports an expiration seen through keyspace notifications. The lock's record is gone, so
/// the event carries the resource's latest fencing token and Redis's current time.
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
