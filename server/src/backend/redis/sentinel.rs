//! Redis Sentinel: finding the master, and leaving a demoted one at once.
//!
//! After a failover the old master stays a writable master for about ten seconds, until
//! Sentinel reconfigures it, and every write it takes meanwhile is lost. So lockd does not wait
//! for it to refuse writes:
//! - it subscribes to `+switch-master` on every sentinel, and also asks them every second;
//! - on a switch it bumps an epoch: every connection remembers the epoch it was opened in, and
//!   a reply that arrives on a connection of an older epoch is answered `UNAVAILABLE`, never
//!   as a grant; the shared connections are dropped, and the subscriber moves;
//! - among the sentinels' answers it believes the one with the highest config epoch, and never
//!   goes back to a lower one, so a lagging sentinel cannot send it back to the old master;
//! - a new connection checks with `ROLE` that it reached a master.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::redis::aio::{MultiplexedConnection, PubSub};
use deadpool_redis::redis::{self, AsyncConnectionConfig, ConnectionInfo, Value};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::topology::NodeAccess;
use crate::error::{Error, Result};

/// How often the sentinels are asked for the master, besides listening for switches.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// The master as the sentinels describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Master {
    addr: (String, u16),
    /// Sentinel's configuration epoch: every failover raises it.
    config_epoch: u64,
}

/// The sentinels of one master, and what lockd last learned from them.
pub(crate) struct Sentinel {
    sentinels: Vec<ConnectionInfo>,
    /// How to reach the sentinels.
    sentinel_access: NodeAccess,
    name: String,
    /// How to reach the master.
    access: NodeAccess,
    db: u32,
    timeout: Duration,
    /// Counts the master switches seen; connections remember the epoch they were opened in.
    epoch: AtomicU64,
    /// The master in use, once known.
    master: Mutex<Option<Master>>,
    /// Carries the epoch to the subscriber, which resubscribes on the new master.
    switched: tokio::sync::watch::Sender<u64>,
}

impl Sentinel {
    pub(super) fn new(
        sentinels: Vec<ConnectionInfo>,
        sentinel_access: NodeAccess,
        name: String,
        access: NodeAccess,
        db: u32,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            sentinels,
            sentinel_access,
            name,
            access,
            db,
            timeout,
            epoch: AtomicU64::new(0),
            master: Mutex::new(None),
            switched: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The number of master switches seen so far.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Changes at every master switch.
    pub(super) fn switches(&self) -> tokio::sync::watch::Receiver<u64> {
        self.switched.subscribe()
    }

    /// Asks one sentinel for the master, with `SENTINEL MASTER`.
    async fn ask_one(&self, info: &ConnectionInfo) -> Result<Master> {
        let asked = async {
            let mut conn = self
                .sentinel_access
                .client(info.clone())?
                .get_multiplexed_async_connection()
                .await?;
            let fields: HashMap<String, String> = redis::cmd("SENTINEL")
                .arg("MASTER")
                .arg(&self.name)
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(fields)
        };
        let fields = tokio::time::timeout(self.timeout, asked)
            .await
            .map_err(|_| Error::Unavailable(format!("no answer within {:?}", self.timeout)))??;
        let field = |name: &str| fields.get(name).map(String::as_str).unwrap_or_default();
        if field("flags").contains("o_down") {
            return Err(Error::Unavailable(format!(
                "master `{}` is down ({})",
                self.name,
                field("flags")
            )));
        }
        let port = field("port").parse().ok();
        match (field("ip"), port) {
            (ip, Some(port)) if !ip.is_empty() => Ok(Master {
                addr: (ip.to_owned(), port),
                config_epoch: field("config-epoch").parse().unwrap_or(0),
            }),
            _ => Err(Error::Unavailable(format!(
                "no address for master `{}`",
                self.name
            ))),
        }
    }

    /// Asks every sentinel at once and believes the answer with the highest config epoch, so
    /// that a sentinel that has not heard of a failover yet cannot point at the old master.
    /// Records a switch when the master moved.
    async fn ask(&self) -> Result<Master> {
        let answers =
            futures_util::future::join_all(self.sentinels.iter().map(|s| self.ask_one(s))).await;
        let mut best: Option<Master> = None;
        let mut errors = Vec::new();
        for a in answers {
            match a {
                Ok(m)
                    if best
                        .as_ref()
                        .is_none_or(|b| m.config_epoch > b.config_epoch) =>
                {
                    best = Some(m);
                }
                Ok(_) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some(found) = best else {
            return Err(Error::Unavailable(format!(
                "no sentinel named a master `{}`: {}",
                self.name,
                errors.join("; ")
            )));
        };
        Ok(self.learn(found))
    }

    /// Records what a sentinel said of the master, and returns the master to use: the newer
    /// of `found` and what was known. A new address is a switch: the epoch moves on, so that
    /// no connection to the old master is used again.
    fn learn(&self, found: Master) -> Master {
        let mut master = self.master.lock().unwrap_or_else(PoisonError::into_inner);
        match &*master {
            Some(known) if known.config_epoch > found.config_epoch => {
                // A sentinel that lags behind one heard before: keep to the newer master.
                return known.clone();
            }
            Some(known) if known.addr != found.addr => {
                let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                tracing::warn!(
                    from = %format!("{}:{}", known.addr.0, known.addr.1),
                    to = %format!("{}:{}", found.addr.0, found.addr.1),
                    config_epoch = found.config_epoch,
                    "Redis master switched (Sentinel failover): dropping every connection to \
                     the old master"
                );
                self.switched.send_replace(epoch);
            }
            None => tracing::info!(
                master = %format!("{}:{}", found.addr.0, found.addr.1),
                "Sentinel named the Redis master"
            ),
            Some(_) => {}
        }
        *master = Some(found.clone());
        found
    }

    /// A sentinel announced `+switch-master` to `addr`: switch at once, before asking the
    /// sentinels again, since every write meanwhile would go to a master that is no longer one.
    /// A failover raises the config epoch by at least one.
    fn heard_switch(&self, addr: (String, u16)) {
        let known = match &*self.master.lock().unwrap_or_else(PoisonError::into_inner) {
            // Already followed (asked, or announced by another sentinel).
            Some(m) if m.addr == addr => return,
            Some(m) => m.config_epoch,
            None => 0,
        };
        self.learn(Master {
            addr,
            config_epoch: known + 1,
        });
    }

    /// A connection to the master, checked with `ROLE`, and the epoch it belongs to.
    pub(super) async fn connect_master(
        &self,
        config: &AsyncConnectionConfig,
    ) -> Result<(MultiplexedConnection, u64)> {
        let master = self.ask().await?;
        let epoch = self.epoch();
        let (host, port) = &master.addr;
        let client = self
            .access
            .client(self.access.info(host, *port, self.db)?)?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(config)
            .await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        let role = match role.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        };
        if role != "master" {
            return Err(Error::Unavailable(format!(
                "{host}:{port}, named master by Sentinel, is a {role}: failover in progress"
            )));
        }
        if self.epoch() != epoch {
            return Err(Error::Unavailable(
                "the Redis master switched while connecting".into(),
            ));
        }
        Ok((conn, epoch))
    }

    /// A pub/sub connection to the master.
    pub(super) async fn master_pubsub(&self) -> Result<PubSub> {
        let master = self.ask().await?;
        let (host, port) = &master.addr;
        let info = self.access.info(host, *port, self.db)?;
        Ok(self.access.client(info)?.get_async_pubsub().await?)
    }

    /// Follows failovers until `shutdown`: listens for `+switch-master` on every sentinel and
    /// asks them every second. A switch bumps the epoch and calls `on_switch`.
    pub(super) async fn follow(
        self: std::sync::Arc<Self>,
        on_switch: impl Fn() + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        let (heard_tx, mut heard) = tokio::sync::mpsc::channel::<()>(16);
        for info in self.sentinels.clone() {
            tokio::spawn(listen(
                self.clone(),
                info,
                heard_tx.clone(),
                shutdown.clone(),
            ));
        }
        let mut switches = self.switches();
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll.tick() => {}
                Some(()) = heard.recv() => {}
            }
            if let Err(e) = self.ask().await {
                tracing::debug!(error = %e, "cannot ask the sentinels for the master");
            }
            if switches.has_changed().unwrap_or(false) {
                switches.borrow_and_update();
                on_switch();
            }
        }
    }
}

/// Listens for `+switch-master` of the master on one sentinel, reconnecting with backoff:
/// switches at once, and reports it to `heard` so that the sentinels are asked again.
async fn listen(
    sentinel: std::sync::Arc<Sentinel>,
    info: ConnectionInfo,
    heard: tokio::sync::mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = sentinel
                .sentinel_access
                .client(info.clone())?
                .get_async_pubsub()
                .await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        if let Ok(mut pubsub) = subscribed.await {
            backoff = Duration::from_millis(100);
            let mut messages = pubsub.on_message();
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    msg = messages.next() => msg,
                };
                let Some(msg) = msg else { break };
                // "<master name> <old ip> <old port> <new ip> <new port>"
                let payload = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                let parts: Vec<&str> = payload.split(' ').collect();
                if let [name, _, _, ip, port] = parts[..]
                    && name == sentinel.name
                    && let Ok(port) = port.parse()
                {
                    sentinel.heard_switch((ip.to_owned(), port));
                    let _ = heard.try_send(());
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
