//! Where the Redis backend's connections lead: one Redis, the master that Redis Sentinel names
//! (followed across failovers), or a Redis Cluster. The scripts, replies and subscriber are the
//! same for all three; only connecting, pub/sub and walking the nodes differ, and they live
//! here.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use deadpool_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo as _, RedisError, RedisFuture, Value,
};

use super::sentinel::Sentinel;
use crate::config::{RedisConfig, RedisTarget, parse_host_port};
use crate::error::{Error, Result};

/// A shared connection: a multiplexed connection to one node, or the cluster client, which
/// routes each command to the master of its key's slot and follows `MOVED` and `ASK`.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis, or Sentinel's current master.
    Node(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Runs `cmd` on the node at `addr` (a cluster master), or on the one node.
    pub(super) async fn on_node<T: redis::FromRedisValue>(
        &mut self,
        addr: Option<&(String, u16)>,
        cmd: Cmd,
    ) -> Result<T, RedisError> {
        match (self, addr) {
            (Self::Cluster(c), Some((host, port))) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                redis::from_redis_value(c.route_command(cmd, route).await?)
                    .map_err(RedisError::from)
            }
            (c, _) => cmd.query_async(c).await,
        }
    }

    /// Waits until `replicas` replicas acknowledged every earlier write of this connection to
    /// the master that holds `key`, or `timeout`; returns how many did.
    pub(super) async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, RedisError> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        match self {
            Self::Node(c) => wait.query_async(c).await,
            Self::Cluster(c) => {
                // WAIT has no key: send it to the master of the key's slot, over the same node
                // connection the script used.
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot_of(key), SlotAddr::Master),
                ));
                redis::from_redis_value(c.route_command(wait, route).await?)
                    .map_err(RedisError::from)
            }
        }
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the
/// first `{` and the next `}`, when not empty; else the whole key), modulo 16384.
fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = key
        .find('{')
        .and_then(|open| {
            let close = key[open + 1..].find('}')? + open + 1;
            (close > open + 1).then(|| &bytes[open + 1..close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc & 0x3FFF
}

/// The deployment, and how to reach it.
pub(super) enum Topology {
    /// One Redis.
    Single(redis::Client),
    /// The master named by Redis Sentinel.
    Sentinel(Arc<Sentinel>),
    /// A Redis Cluster.
    Cluster {
        /// Connects to the cluster.
        client: Box<ClusterClient>,
        /// The seed nodes, for pub/sub (classic `PUBLISH` reaches every node of a cluster, so
        /// a subscription through any one node hears every lockd's messages).
        seeds: Vec<ConnectionInfo>,
        /// How to reach the nodes.
        access: NodeAccess,
    },
}

/// How lockd reaches a set of Redis nodes (the data nodes, or the sentinels): their ACL user
/// and password, and TLS. Debug never shows the password.
#[derive(Clone, Default)]
pub(crate) struct NodeAccess {
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// Connect over TLS.
    pub(crate) tls: bool,
    /// The CA certificates (PEM) that sign the nodes' certificates, instead of the system's.
    pub(crate) ca: Option<Vec<u8>>,
}

impl NodeAccess {
    /// The connection settings of node `host:port` in database `db`.
    pub(crate) fn info(
        &self,
        host: &str,
        port: u16,
        db: u32,
    ) -> Result<ConnectionInfo, RedisError> {
        let addr = if self.tls {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        };
        let mut settings = redis::RedisConnectionInfo::default().set_db(i64::from(db));
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p);
        }
        Ok(addr.into_connection_info()?.set_redis_settings(settings))
    }

    /// A client for `info`, trusting the private CA when one is set.
    pub(crate) fn client(
        &self,
        info: impl redis::IntoConnectionInfo,
    ) -> Result<redis::Client, RedisError> {
        match &self.ca {
            Some(ca) => redis::Client::build_with_tls(info, self.certificates(ca)),
            None => redis::Client::open(info),
        }
    }

    fn certificates(&self, ca: &[u8]) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.to_vec()),
        }
    }
}

impl Topology {
    /// Resolves the configured target. Nothing connects yet.
    pub(super) fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let bad = |what: &str, addr: &str| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "not host:port",
                format!("{what} `{addr}`"),
            ))
        };
        let ca = match &config.tls_ca {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "cannot read REDIS_TLS_CA",
                    format!("{}: {e}", path.display()),
                ))
            })?),
            None => None,
        };
        let access = |password: &Option<String>| NodeAccess {
            username: config.username.clone(),
            password: password.clone(),
            tls: config.tls,
            ca: ca.clone(),
        };
        Ok(match &config.target {
            RedisTarget::Single { url } => Self::Single(access(&None).client(url.as_str())?),
            RedisTarget::Sentinel {
                sentinels,
                master,
                sentinel_password,
                password,
                db,
            } => {
                // Sentinels take no ACL user here: only their password (`requirepass`).
                let sentinel_access = NodeAccess {
                    username: None,
                    ..access(sentinel_password)
                };
                let mut infos = Vec::new();
                for s in sentinels {
                    let (host, port) = parse_host_port(s).ok_or_else(|| bad("sentinel", s))?;
                    infos.push(sentinel_access.info(&host, port, 0)?);
                }
                Self::Sentinel(Arc::new(Sentinel::new(
                    infos,
                    sentinel_access,
                    master.clone(),
                    access(password),
                    *db,
                    config.timeout,
                )?))
            }
            RedisTarget::Cluster { nodes, password } => {
                let access = access(password);
                let mut seeds = Vec::new();
                for n in nodes {
                    let (host, port) = parse_host_port(n).ok_or_else(|| bad("cluster node", n))?;
                    seeds.push(access.info(&host, port, 0)?);
                }
                let mut builder = ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(config.timeout)
                    .response_timeout(config.timeout);
                if access.tls {
                    builder = builder.tls(redis::cluster::TlsMode::Secure);
                }
                if let Some(ca) = &access.ca {
                    builder = builder.certs(access.certificates(ca));
                }
                Self::Cluster {
                    client: Box::new(builder.build()?),
                    seeds,
                    access,
                }
            }
        })
    }

    /// Opens a shared connection, and says at which Sentinel epoch (see
    /// [`Sentinel::epoch`]); 0 outside Sentinel mode.
    pub(super) async fn connect(&self, config: &AsyncConnectionConfig) -> Result<(Conn, u64)> {
        match self {
            Self::Single(client) => Ok((
                Conn::Node(
                    client
                        .get_multiplexed_async_connection_with_config(config)
                        .await?,
                ),
                0,
            )),
            Self::Sentinel(s) => {
                let (conn, epoch) = s.connect_master(config).await?;
                Ok((Conn::Node(conn), epoch))
            }
            Self::Cluster { client, .. } => {
                Ok((Conn::Cluster(client.get_async_connection().await?), 0))
            }
        }
    }

    /// A pub/sub connection for the subscriber. `attempt` counts the failed attempts so far,
    /// so that a cluster's subscription moves to the next seed node when one fails.
    pub(super) async fn pubsub(&self, attempt: usize) -> Result<PubSub> {
        match self {
            Self::Single(client) => Ok(client.get_async_pubsub().await?),
            Self::Sentinel(s) => s.master_pubsub().await,
            Self::Cluster { seeds, access, .. } => {
                let info = seeds[attempt % seeds.len()].clone();
                Ok(access.client(info)?.get_async_pubsub().await?)
            }
        }
    }

    /// A pub/sub connection to the cluster node at `host:port`.
    pub(super) async fn node_pubsub(&self, host: &str, port: u16) -> Result<PubSub> {
        let access = match self {
            Self::Cluster { access, .. } => access.clone(),
            _ => NodeAccess::default(),
        };
        let info = access.info(host, port, 0)?;
        Ok(access.client(info)?.get_async_pubsub().await?)
    }

    /// Whether this is a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// Whether a connection opened at `epoch` may still be used: false once Sentinel switched
    /// masters since.
    pub(super) fn current(&self, epoch: u64) -> bool {
        match self {
            Self::Sentinel(s) => s.epoch() == epoch,
            _ => true,
        }
    }

    /// Changes at every Sentinel master switch; `None` outside Sentinel mode.
    pub(super) fn switches(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Self::Sentinel(s) => Some(s.switches()),
            _ => None,
        }
    }

    /// The masters to walk for `SCAN` and checks, as (host, port); `None` stands for the one
    /// node outside Cluster mode.
    pub(super) async fn masters(&self, conn: &mut Conn) -> Result<Vec<Option<(String, u16)>>> {
        let Conn::Cluster(_) = conn else {
            return Ok(vec![None]);
        };
        let nodes: String = conn
            .on_node(None, redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        let mut masters = parse_masters(&nodes);
        if masters.is_empty() {
            return Err(Error::Unavailable("the cluster reports no master".into()));
        }
        masters.sort();
        Ok(masters.into_iter().map(Some).collect())
    }

    /// "redis", "redis-sentinel" or "redis-cluster", for logs.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Single(_) => "redis",
            Self::Sentinel(_) => "redis-sentinel",
            Self::Cluster { .. } => "redis-cluster",
        }
    }
}

/// The live masters of a `CLUSTER NODES` reply that serve slots, as (host, port).
fn parse_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let serves_slots = fields.len() > 8;
            if !flags.split(',').any(|f| f == "master")
                || flags.contains("fail")
                || flags.contains("noaddr")
                || !serves_slots
            {
                return None;
            }
            // ip:port@cport[,hostname]; the ip is empty on a node that never met another.
            let addr = fields.get(1)?.split('@').next()?;
            match addr.strip_prefix(':') {
                Some(port) => Some((String::new(), port.parse().ok()?)),
                None => parse_host_port(addr),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag_as_redis_computes_them() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("lockd:{foo}"), 12182);
        assert_eq!(slot_of("lockd:{foo}:fence"), 12182);
        assert_eq!(slot_of("123456789"), 0x31C3 & 0x3FFF);
        assert_eq!(slot_of("a{}b"), slot_of("a{}b"));
        assert_ne!(slot_of("a{}b"), slot_of(""));
    }

    #[test]
    fn cluster_nodes_lists_the_live_masters_that_serve_slots() {
        let nodes = "\
a 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
c 127.0.0.1:7003@17003 master,fail - 0 0 3 connected 10923-16383
d 127.0.0.1:7004@17004 slave a 0 0 1 connected
e 127.0.0.1:7005@17005 master - 0 0 5 connected
";
        assert_eq!(
            parse_masters(nodes),
            vec![("127.0.0.1".into(), 7001), ("127.0.0.1".into(), 7002)]
        );
        let alone = "a :7001@17001 myself,master - 0 0 0 connected 0-16383\n";
        assert_eq!(parse_masters(alone), vec![(String::new(), 7001)]);
    }
}
