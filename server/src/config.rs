//! Configuration: one struct, filled from flags and environment variables by clap.
//!
//! `lockd --help` is the reference; the README's table agrees with it. Only this module reads
//! the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// lockd: distributed locks as a gRPC service, kept in Redis (or in memory when no Redis is
/// configured).
#[derive(Debug, Clone, Parser)]
#[command(name = "lockd", version, about, long_about = None)]
pub struct Config {
    /// Address the gRPC server listens on. Use 0.0.0.0:50051 to accept remote clients.
    #[arg(long, env = "LOCKD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Redis URL, such as redis://:password@host:6379/0 or redis+unix:///path/redis.sock.
    /// When neither this nor REDIS_HOST is set, lockd uses its embedded in-memory backend.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis host (the original design note's variables); ignored when REDIS_URL is set.
    #[arg(long, env = "REDIS_HOST")]
    pub redis_host: Option<String>,

    /// Redis port, used with REDIS_HOST.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,

    /// Redis database number, used with REDIS_HOST.
    #[arg(long, env = "REDIS_DB", default_value_t = 0)]
    pub redis_db: u32,

    /// Redis password, used with REDIS_HOST, and for the Redis nodes in Sentinel and Cluster
    /// modes. Never logged.
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// Sentinel mode: the sentinels, as host:port,host:port,... lockd asks them for the master
    /// of REDIS_SENTINEL_MASTER and follows its failovers. Excludes REDIS_URL, REDIS_HOST and
    /// REDIS_CLUSTER_NODES.
    #[arg(long, env = "REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,

    /// Sentinel mode: the name of the master the sentinels monitor.
    #[arg(long, env = "REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Sentinel mode: the sentinels' own password, if they require one. Never logged.
    #[arg(long, env = "REDIS_SENTINEL_PASSWORD", hide_env_values = true)]
    pub redis_sentinel_password: Option<String>,

    /// Cluster mode: some nodes of the Redis Cluster (seeds), as host:port,host:port,...
    /// lockd discovers the rest. Excludes REDIS_URL, REDIS_HOST and REDIS_SENTINELS.
    #[arg(long, env = "REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,

    /// Replicas that must acknowledge every grant, extend and release (Redis WAIT) before
    /// lockd answers. A grant they do not acknowledge in time is undone and answered
    /// UNAVAILABLE, so a failover cannot lose it. 0 (the default): lockd answers once the
    /// master has it, and a failover may lose the latest grants.
    #[arg(long, env = "LOCKD_MIN_REPLICA_ACKS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub min_replica_acks: u32,

    /// How long a change waits for LOCKD_MIN_REPLICA_ACKS acknowledgements; less than
    /// LOCKD_REDIS_TIMEOUT.
    #[arg(long, env = "LOCKD_REPLICA_ACK_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub replica_ack_timeout: Duration,

    /// Number of multiplexed Redis connections shared by all requests; 0 means one per runtime
    /// worker thread. Fewer connections batch more commands into each write.
    #[arg(long, env = "LOCKD_REDIS_POOL_SIZE", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub redis_pool_size: u32,

    /// The most lock operations sent to Redis as one script call. While every connection
    /// already has two script calls in flight, further operations queue and leave together in
    /// one call of a batch script, which saves Redis its per-call work; 1 turns batching off.
    /// Never in Cluster mode, where one script's keys must share a hash slot.
    #[arg(long, env = "LOCKD_REDIS_BATCH", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub redis_batch: u32,

    /// Time limit for connecting to Redis and for each Redis reply (e.g. 2s, 500ms).
    #[arg(long, env = "LOCKD_REDIS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Prefix of every Redis key: keys are <prefix>:{<resource>} and <prefix>:{<resource>}:fence.
    #[arg(long, env = "LOCKD_KEY_PREFIX", default_value = "lockd")]
    pub key_prefix: String,

    /// This server's name in generated tokens ("<instance id>:<uuid>"). Default: hostname-pid.
    #[arg(long, env = "LOCKD_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// TTL of a lease when Acquire gives none.
    #[arg(long, env = "LOCKD_DEFAULT_TTL", default_value = "30s", value_parser = parse_duration)]
    pub default_ttl: Duration,

    /// Largest TTL a request may ask for; longer ones are refused with INVALID_ARGUMENT.
    #[arg(long, env = "LOCKD_MAX_TTL", default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// Longest wait_timeout an Acquire may ask for; longer ones are refused with INVALID_ARGUMENT.
    #[arg(long, env = "LOCKD_MAX_WAIT", default_value = "5m", value_parser = parse_duration)]
    pub max_wait: Duration,

    /// Most leases one KeepAlive stream may keep, and most entries one message may name.
    #[arg(long, env = "LOCKD_MAX_STREAM_LEASES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_stream_leases: u32,

    /// Requests handled at once (until their response headers; a blocking Acquire for its
    /// whole wait); beyond it lockd answers RESOURCE_EXHAUSTED at once. Health checks are exempt.
    #[arg(long, env = "LOCKD_MAX_IN_FLIGHT", default_value_t = 30_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,

    /// Blocking Acquires (unary and on Session streams) waiting at once; more are answered
    /// RESOURCE_EXHAUSTED. Less than LOCKD_MAX_IN_FLIGHT.
    #[arg(long, env = "LOCKD_MAX_WAITERS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_waiters: u32,

    /// Watch, KeepAlive and Session streams open at once, together; more are answered
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "LOCKD_MAX_STREAMS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams: u32,

    /// Watch, KeepAlive and Session streams open at once on one client connection.
    #[arg(long, env = "LOCKD_MAX_STREAMS_PER_CONNECTION", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams_per_connection: u32,

    /// HTTP/2 streams (calls of any kind) open at once on one connection; a client waits for a
    /// free one. More than LOCKD_MAX_STREAMS_PER_CONNECTION.
    #[arg(long, env = "LOCKD_HTTP2_MAX_STREAMS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http2_max_streams: u32,

    /// Client connections open at once; lockd closes more at once.
    #[arg(long, env = "LOCKD_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Largest request message, in bytes; larger ones are answered OUT_OF_RANGE (tonic's code).
    #[arg(long, env = "LOCKD_MAX_MESSAGE_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(4096..=(64 << 20)))]
    pub max_message_bytes: u32,

    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish before lockd exits.
    #[arg(long, env = "LOCKD_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format. Filter with RUST_LOG (default: info).
    #[arg(long, env = "LOCKD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The level of the one log line per lock decision (acquire, release, extend). With
    /// `debug`, the default `info` log keeps only state changes (Redis up or down, health,
    /// lost leases); RUST_LOG=debug shows the decisions again.
    #[arg(long, env = "LOCKD_LOG_DECISIONS", value_enum, default_value_t = Level::Info)]
    pub log_decisions: Level,

    /// Runtime worker threads; 0 means one per CPU this process may run on. With one, lockd
    /// runs on a single-threaded runtime, which serves more requests per CPU (no work
    /// stealing, and Redis commands from many requests go out in one write).
    #[arg(long, env = "LOCKD_WORKER_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub worker_threads: u32,

    /// Serve even when Redis's maxmemory-policy is not noeviction. RISK: when such a Redis
    /// reaches maxmemory it may evict lock keys, which silently frees held locks (two clients
    /// then both hold one). Without this flag lockd refuses to start against such a Redis.
    #[arg(long, env = "LOCKD_ALLOW_EVICTING_REDIS", value_parser = clap::builder::FalseyValueParser::new())]
    pub allow_evicting_redis: bool,

    /// API keys (TOML: name, namespace, access, sha256 of each key; `lockd keygen` prints
    /// entries). Without it lockd lets every caller in. SIGHUP reloads it.
    #[arg(long, env = "LOCKD_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Server certificate chain (PEM): serve gRPC over TLS. Needs --tls-key. SIGHUP reloads it.
    #[arg(long, env = "LOCKD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The server certificate's private key (PEM).
    #[arg(long, env = "LOCKD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) for client certificates: mutual TLS. A client without a
    /// certificate signed by one of them is refused during the handshake. Needs --tls-cert.
    #[arg(long, env = "LOCKD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Redis ACL user (with REDIS_PASSWORD) for REDIS_HOST, Sentinel and Cluster modes; with
    /// REDIS_URL, put it in the URL (redis://user:password@host).
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// Connect to Redis over TLS in REDIS_HOST, Sentinel and Cluster modes (with REDIS_URL, use
    /// a rediss:// URL).
    #[arg(long, env = "REDIS_TLS", value_parser = clap::builder::FalseyValueParser::new())]
    pub redis_tls: bool,

    /// CA certificates (PEM) that sign Redis's TLS certificate, for a private CA (default: the
    /// system's roots).
    #[arg(long, env = "REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,

    /// Serve Prometheus metrics on http://<this address>/metrics (e.g. 0.0.0.0:9090). Off by
    /// default.
    #[arg(long, env = "LOCKD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Resource-name prefixes that label lock metrics (e.g. nightly-,report-): a resource is
    /// counted under the first one it starts with. Resource names never become labels
    /// otherwise (they are unbounded).
    #[arg(long, env = "LOCKD_METRICS_RESOURCE_PREFIXES", value_delimiter = ',')]
    pub metrics_resource_prefixes: Vec<String>,

    /// Export each RPC's trace span over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317). Off by default; needs a lockd built with the `otlp` feature.
    #[arg(long, env = "LOCKD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// A command instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands other than serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print a new random API key and the auth-file entry that admits it (the file stores only
    /// the key's SHA-256).
    Keygen {
        /// The key's name, shown in logs.
        #[arg(long)]
        name: String,
        /// The namespace its locks live in.
        #[arg(long)]
        namespace: String,
        /// `read` (IsLocked, GetOwner, ListLocks, Watch) or `write` (everything).
        #[arg(long, default_value = "write")]
        access: String,
    },
}

/// A log level for a kind of line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Level {
    /// Shown by the default filter (RUST_LOG=info).
    Info,
    /// Shown with RUST_LOG=debug.
    Debug,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The largest duration setting accepted: far beyond any sensible value, and far from the
/// overflow of time arithmetic.
const MAX_DURATION_SETTING: Duration = Duration::from_secs(365 * 24 * 3600);

/// The limits every request is validated against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TTL used when a request gives none.
    pub default_ttl: Duration,
    /// Largest TTL allowed.
    pub max_ttl: Duration,
    /// Largest wait allowed.
    pub max_wait: Duration,
    /// Most leases per KeepAlive stream.
    pub max_stream_leases: usize,
}

/// Which Redis deployment lockd uses, and where it is.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (REDIS_URL, or REDIS_HOST and friends). The URL may contain a password: log
    /// [`RedisConfig::describe`] instead.
    Single {
        /// The connection URL.
        url: String,
    },
    /// A master found through Redis Sentinel (REDIS_SENTINELS, REDIS_SENTINEL_MASTER).
    Sentinel {
        /// The sentinels, host:port.
        sentinels: Vec<String>,
        /// The monitored master's name.
        master: String,
        /// The sentinels' password.
        sentinel_password: Option<String>,
        /// The Redis nodes' password.
        password: Option<String>,
        /// The database number.
        db: u32,
    },
    /// A Redis Cluster (REDIS_CLUSTER_NODES).
    Cluster {
        /// Seed nodes, host:port.
        nodes: Vec<String>,
        /// The nodes' password.
        password: Option<String>,
    },
}

/// How to reach Redis, already resolved from the REDIS_* settings.
#[derive(Clone)]
pub struct RedisConfig {
    /// The deployment and its addresses.
    pub target: RedisTarget,
    /// Number of multiplexed connections; 0 means one per runtime worker thread.
    pub pool_size: usize,
    /// The most operations in one batch script call; 1 for none (`--redis-batch`).
    pub batch: usize,
    /// Connect and reply time limit.
    pub timeout: Duration,
    /// Key prefix.
    pub key_prefix: String,
    /// Serve even when Redis may evict lock keys (`--allow-evicting-redis`).
    pub allow_evicting: bool,
    /// Replicas that must acknowledge each change (`WAIT`); 0 for none.
    pub min_replica_acks: u32,
    /// How long to wait for them.
    pub replica_ack_timeout: Duration,
    /// The Redis ACL user (REDIS_USERNAME), outside REDIS_URL.
    pub username: Option<String>,
    /// TLS to the nodes (REDIS_TLS), outside REDIS_URL (which says it with rediss://).
    pub tls: bool,
    /// The private CA that signs the nodes' certificates (REDIS_TLS_CA).
    pub tls_ca: Option<PathBuf>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("target", &self.describe())
            .field("pool_size", &self.pool_size)
            .field("batch", &self.batch)
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .field("allow_evicting", &self.allow_evicting)
            .field("min_replica_acks", &self.min_replica_acks)
            .field("replica_ack_timeout", &self.replica_ack_timeout)
            .field("username", &self.username)
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

impl RedisConfig {
    /// The deployment and its addresses, without passwords: safe to log.
    pub fn describe(&self) -> String {
        match &self.target {
            RedisTarget::Single { url } => redact_url(url),
            RedisTarget::Sentinel {
                sentinels, master, ..
            } => format!("sentinel master `{master}` via {}", sentinels.join(",")),
            RedisTarget::Cluster { nodes, .. } => format!("cluster via {}", nodes.join(",")),
        }
    }
}

impl Config {
    /// The async runtime: single-threaded when one worker thread is asked for, or when the
    /// process may run on one CPU only (for instance pinned with `taskset`), else multi-threaded.
    ///
    /// # Errors
    /// Fails when the operating system refuses the runtime's threads or I/O driver.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let workers = match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n as usize,
        };
        let mut builder = if workers == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers);
            b
        };
        builder.enable_all().build()
    }

    /// The validation limits.
    pub fn limits(&self) -> Limits {
        Limits {
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            max_wait: self.max_wait,
            max_stream_leases: self.max_stream_leases as usize,
        }
    }

    /// Refuses settings that would break lockd's guarantees or its arithmetic, naming the
    /// setting and the rule. Called before anything starts.
    ///
    /// # Errors
    /// The first broken rule, as a message for the operator.
    pub fn validate(&self) -> Result<(), String> {
        let rule = |setting: &str, rule: &str| Err(format!("{setting}: {rule}"));
        if self.otlp_endpoint.is_some() && !cfg!(feature = "otlp") {
            return rule(
                "LOCKD_OTLP_ENDPOINT (--otlp-endpoint)",
                "this lockd was built without the `otlp` feature (cargo build --features otlp)",
            );
        }
        if self.metrics_resource_prefixes.len() > 100 {
            return rule(
                "LOCKD_METRICS_RESOURCE_PREFIXES (--metrics-resource-prefixes)",
                "at most 100 prefixes (each one multiplies the lock metrics' series)",
            );
        }
        if self.max_ttl < Duration::from_millis(1) || self.max_ttl > MAX_DURATION_SETTING {
            return rule(
                "LOCKD_MAX_TTL (--max-ttl)",
                "must be between 1ms and 365 days",
            );
        }
        if self.default_ttl < Duration::from_millis(1) {
            // A zero TTL makes a lease that is expired when granted: two callers would both
            // get the lock.
            return rule(
                "LOCKD_DEFAULT_TTL (--default-ttl)",
                "must be at least 1ms (a zero TTL grants leases that are already expired)",
            );
        }
        if self.default_ttl > self.max_ttl {
            return Err(format!(
                "LOCKD_DEFAULT_TTL (--default-ttl): must be at most LOCKD_MAX_TTL ({}ms), got {}ms",
                self.max_ttl.as_millis(),
                self.default_ttl.as_millis()
            ));
        }
        if self.max_wait > MAX_DURATION_SETTING {
            return rule("LOCKD_MAX_WAIT (--max-wait)", "must be at most 365 days");
        }
        if self.redis_timeout < Duration::from_millis(1)
            || self.redis_timeout > Duration::from_secs(3600)
        {
            return rule(
                "LOCKD_REDIS_TIMEOUT (--redis-timeout)",
                "must be between 1ms and 1h (zero would fail every Redis call)",
            );
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            return rule(
                "LOCKD_SHUTDOWN_GRACE (--shutdown-grace)",
                "must be at most 1h",
            );
        }
        self.validate_redis_mode()?;
        self.validate_caps()?;
        self.validate_tls()?;
        if self.key_prefix.is_empty()
            || self.key_prefix.contains(['{', '}'])
            || self.key_prefix.chars().any(char::is_control)
        {
            return rule(
                "LOCKD_KEY_PREFIX (--key-prefix)",
                "must be non-empty, without `{`, `}` or control characters (they would break the \
                 Redis Cluster hash tag that keeps a resource's keys in one slot)",
            );
        }
        Ok(())
    }

    /// The overload caps.
    pub fn caps(&self) -> crate::overload::Caps {
        crate::overload::Caps {
            in_flight: self.max_in_flight as usize,
            waiters: self.max_waiters as usize,
            streams: self.max_streams as usize,
            streams_per_connection: self.max_streams_per_connection as usize,
            connections: self.max_connections as usize,
        }
    }

    /// Refuses caps that contradict each other: waiters that would fill the in-flight cap, or
    /// per-connection streams that HTTP/2 would never let open.
    fn validate_caps(&self) -> Result<(), String> {
        if self.max_waiters >= self.max_in_flight {
            return Err(format!(
                "LOCKD_MAX_WAITERS (--max-waiters): must be less than LOCKD_MAX_IN_FLIGHT ({}), \
                 since a blocking Acquire is in flight while it waits; got {}",
                self.max_in_flight, self.max_waiters
            ));
        }
        if self.max_streams_per_connection >= self.http2_max_streams {
            return Err(format!(
                "LOCKD_MAX_STREAMS_PER_CONNECTION (--max-streams-per-connection): must be less \
                 than LOCKD_HTTP2_MAX_STREAMS ({}), which counts every call on a connection; got {}",
                self.http2_max_streams, self.max_streams_per_connection
            ));
        }
        Ok(())
    }

    /// Refuses half a TLS setup: a certificate without its key or the reverse, mutual TLS
    /// without server TLS, and Redis TLS settings that would be ignored.
    fn validate_tls(&self) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(
                    "LOCKD_TLS_CERT (--tls-cert) and LOCKD_TLS_KEY (--tls-key): \
                            TLS needs both"
                        .into(),
                );
            }
            (None, None) if self.tls_client_ca.is_some() => {
                return Err("LOCKD_TLS_CLIENT_CA (--tls-client-ca): mutual TLS needs \
                            LOCKD_TLS_CERT and LOCKD_TLS_KEY too"
                    .into());
            }
            _ => {}
        }
        let url = self.redis_url.as_deref().filter(|u| !u.is_empty());
        if url.is_some() && (self.redis_tls || self.redis_username.is_some()) {
            return Err(
                "REDIS_TLS and REDIS_USERNAME: with REDIS_URL, put them in the URL \
                        (rediss://user:password@host:port)"
                    .into(),
            );
        }
        let tls = self.redis_tls || url.is_some_and(|u| u.starts_with("rediss://"));
        if self.redis_tls_ca.is_some() && !tls {
            return Err(
                "REDIS_TLS_CA (--redis-tls-ca): needs REDIS_TLS=true or a rediss:// \
                        REDIS_URL"
                    .into(),
            );
        }
        Ok(())
    }

    /// Refuses more than one Redis mode, an incomplete one, and replica acknowledgements that
    /// cannot work.
    fn validate_redis_mode(&self) -> Result<(), String> {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        let single = set(&self.redis_url) || set(&self.redis_host);
        let sentinel = !self.redis_sentinels.is_empty() || set(&self.redis_sentinel_master);
        let cluster = !self.redis_cluster_nodes.is_empty();
        let modes = [
            (single, "REDIS_URL/REDIS_HOST"),
            (sentinel, "REDIS_SENTINELS/REDIS_SENTINEL_MASTER"),
            (cluster, "REDIS_CLUSTER_NODES"),
        ];
        let chosen: Vec<&str> = modes.iter().filter(|m| m.0).map(|m| m.1).collect();
        if chosen.len() > 1 {
            return Err(format!(
                "Redis mode: set only one of REDIS_URL/REDIS_HOST (one Redis), REDIS_SENTINELS \
                 with REDIS_SENTINEL_MASTER (Sentinel), or REDIS_CLUSTER_NODES (Cluster); got {}",
                chosen.join(" and ")
            ));
        }
        if sentinel && (self.redis_sentinels.is_empty() || !set(&self.redis_sentinel_master)) {
            return Err(
                "REDIS_SENTINELS (--redis-sentinels) and REDIS_SENTINEL_MASTER \
                 (--redis-sentinel-master): Sentinel mode needs both"
                    .into(),
            );
        }
        for (setting, list) in [
            ("REDIS_SENTINELS (--redis-sentinels)", &self.redis_sentinels),
            (
                "REDIS_CLUSTER_NODES (--redis-cluster-nodes)",
                &self.redis_cluster_nodes,
            ),
        ] {
            if let Some(bad) = list.iter().find(|a| parse_host_port(a).is_none()) {
                return Err(format!(
                    "{setting}: `{bad}` is not host:port (a comma-separated list of them)"
                ));
            }
        }
        if self.min_replica_acks > 0 {
            if chosen.is_empty() {
                return Err(
                    "LOCKD_MIN_REPLICA_ACKS (--min-replica-acks): needs Redis; the \
                     embedded in-memory backend has no replicas"
                        .into(),
                );
            }
            if self.replica_ack_timeout < Duration::from_millis(1)
                || self.replica_ack_timeout >= self.redis_timeout
            {
                return Err(format!(
                    "LOCKD_REPLICA_ACK_TIMEOUT (--replica-ack-timeout): must be at least 1ms and \
                     less than LOCKD_REDIS_TIMEOUT ({}ms), got {}ms",
                    self.redis_timeout.as_millis(),
                    self.replica_ack_timeout.as_millis()
                ));
            }
        }
        Ok(())
    }

    /// The Redis settings, or `None` when no Redis is configured (embedded backend).
    pub fn redis(&self) -> Option<RedisConfig> {
        let password = self.redis_password.clone().filter(|p| !p.is_empty());
        let target = if !self.redis_cluster_nodes.is_empty() {
            RedisTarget::Cluster {
                nodes: self.redis_cluster_nodes.clone(),
                password,
            }
        } else if !self.redis_sentinels.is_empty() {
            RedisTarget::Sentinel {
                sentinels: self.redis_sentinels.clone(),
                master: self.redis_sentinel_master.clone().unwrap_or_default(),
                sentinel_password: self
                    .redis_sentinel_password
                    .clone()
                    .filter(|p| !p.is_empty()),
                password,
                db: self.redis_db,
            }
        } else {
            let url = match (&self.redis_url, &self.redis_host) {
                (Some(url), _) if !url.is_empty() => url.clone(),
                (_, Some(host)) if !host.is_empty() => {
                    let user = self.redis_username.as_deref().map(percent_encode);
                    let auth = match (&user, &password) {
                        (user, Some(p)) => {
                            format!("{}:{}@", user.as_deref().unwrap_or(""), percent_encode(p))
                        }
                        (Some(u), None) => format!("{u}@"),
                        (None, None) => String::new(),
                    };
                    let scheme = if self.redis_tls { "rediss" } else { "redis" };
                    format!(
                        "{scheme}://{auth}{host}:{}/{}",
                        self.redis_port, self.redis_db
                    )
                }
                _ => return None,
            };
            RedisTarget::Single { url }
        };
        Some(RedisConfig {
            target: target.clone(),
            pool_size: self.redis_pool_size as usize,
            batch: self.redis_batch as usize,
            timeout: self.redis_timeout,
            key_prefix: self.key_prefix.clone(),
            allow_evicting: self.allow_evicting_redis,
            min_replica_acks: self.min_replica_acks,
            replica_ack_timeout: self.replica_ack_timeout,
            // In single mode the URL carries both (rediss://user:password@...).
            username: match &target {
                RedisTarget::Single { .. } => None,
                _ => self.redis_username.clone().filter(|u| !u.is_empty()),
            },
            tls: self.redis_tls && !matches!(target, RedisTarget::Single { .. }),
            tls_ca: self.redis_tls_ca.clone(),
        })
    }

    /// The instance id used in generated tokens: the flag, or `<hostname>-<pid>`.
    pub fn instance_id(&self) -> String {
        if let Some(id) = self.instance_id.as_ref().filter(|id| !id.is_empty()) {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "lockd".to_owned());
        format!("{host}-{}", std::process::id())
    }
}

/// Parses durations such as `500ms`, `30s`, `5m`, `24h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 30s, 5m or 24h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    Ok(d)
}

/// Splits `host:port` (the host may be a bracketed IPv6 address), or `None` when it is not one.
pub fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.trim().rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

/// Encodes a password for the userinfo part of a URL.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Replaces the password in `scheme://user:password@host` with `***`.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn one_worker_thread_gives_a_single_threaded_runtime() {
        let one = Config::parse_from(["lockd", "--worker-threads", "1"]);
        let runtime = one.runtime().unwrap();
        assert_eq!(
            runtime.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        let three = Config::parse_from(["lockd", "--worker-threads", "3"]);
        let runtime = three.runtime().unwrap();
        assert_eq!(
            runtime.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(runtime.metrics().num_workers(), 3);
    }

    fn validated(args: &[&str]) -> Result<(), String> {
        let mut all = vec!["lockd"];
        all.extend_from_slice(args);
        Config::parse_from(all).validate()
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(validated(&[]), Ok(()));
    }

    #[test]
    fn a_zero_default_ttl_is_refused_naming_the_setting() {
        let err = validated(&["--default-ttl", "0s"]).unwrap_err();
        assert!(err.contains("LOCKD_DEFAULT_TTL"), "{err}");
        assert!(err.contains("at least 1ms"), "{err}");
    }

    #[test]
    fn a_default_ttl_above_the_maximum_is_refused() {
        let err = validated(&["--default-ttl", "2h", "--max-ttl", "1h"]).unwrap_err();
        assert!(
            err.contains("LOCKD_DEFAULT_TTL") && err.contains("LOCKD_MAX_TTL"),
            "{err}"
        );
    }

    #[test]
    fn a_huge_max_wait_is_refused_before_it_can_overflow_a_deadline() {
        let err = validated(&["--max-wait", "18446744073709551615s"]).unwrap_err();
        assert!(err.contains("LOCKD_MAX_WAIT"), "{err}");
        assert_eq!(validated(&["--max-wait", "24h"]), Ok(()));
    }

    #[test]
    fn unsafe_redis_settings_are_refused() {
        assert!(
            validated(&["--redis-timeout", "0s"])
                .unwrap_err()
                .contains("LOCKD_REDIS_TIMEOUT")
        );
        assert!(
            validated(&["--key-prefix", "a{b"])
                .unwrap_err()
                .contains("LOCKD_KEY_PREFIX")
        );
        assert!(
            validated(&["--max-ttl", "0s"])
                .unwrap_err()
                .contains("LOCKD_MAX_TTL")
        );
    }

    #[test]
    fn two_redis_modes_at_once_are_refused_naming_both() {
        let err =
            validated(&["--redis-url", "redis://h:1", "--redis-cluster-nodes", "h:2"]).unwrap_err();
        assert!(
            err.contains("REDIS_URL") && err.contains("REDIS_CLUSTER_NODES"),
            "{err}"
        );
        let err = validated(&[
            "--redis-sentinels",
            "h:1",
            "--redis-sentinel-master",
            "m",
            "--redis-cluster-nodes",
            "h:2",
        ])
        .unwrap_err();
        assert!(err.contains("REDIS_SENTINELS"), "{err}");
    }

    #[test]
    fn an_incomplete_sentinel_setting_is_refused() {
        let err = validated(&["--redis-sentinels", "h:1"]).unwrap_err();
        assert!(err.contains("REDIS_SENTINEL_MASTER"), "{err}");
        let err = validated(&["--redis-sentinel-master", "m"]).unwrap_err();
        assert!(err.contains("needs both"), "{err}");
        let err = validated(&[
            "--redis-sentinels",
            "h1,h:2",
            "--redis-sentinel-master",
            "m",
        ])
        .unwrap_err();
        assert!(err.contains("`h1` is not host:port"), "{err}");
        assert_eq!(
            validated(&[
                "--redis-sentinels",
                "h:1,[::1]:2",
                "--redis-sentinel-master",
                "m"
            ]),
            Ok(())
        );
    }

    #[test]
    fn replica_acks_need_redis_and_a_timeout_below_the_redis_timeout() {
        let err = validated(&["--min-replica-acks", "1"]).unwrap_err();
        assert!(err.contains("LOCKD_MIN_REPLICA_ACKS"), "{err}");
        let redis = ["--redis-url", "redis://h:1", "--min-replica-acks", "1"];
        let mut slow = redis.to_vec();
        slow.extend(["--replica-ack-timeout", "2s", "--redis-timeout", "2s"]);
        assert!(
            validated(&slow)
                .unwrap_err()
                .contains("LOCKD_REPLICA_ACK_TIMEOUT")
        );
        assert_eq!(validated(&redis), Ok(()));
    }

    #[test]
    fn contradictory_caps_are_refused_naming_the_setting() {
        let err = validated(&["--max-waiters", "100", "--max-in-flight", "100"]).unwrap_err();
        assert!(err.contains("LOCKD_MAX_WAITERS"), "{err}");
        let err = validated(&["--max-streams-per-connection", "4096"]).unwrap_err();
        assert!(err.contains("LOCKD_MAX_STREAMS_PER_CONNECTION"), "{err}");
        assert!(Config::try_parse_from(["lockd", "--max-message-bytes", "100"]).is_err());
    }

    #[test]
    fn otlp_export_needs_the_feature_and_prefixes_are_bounded() {
        let otlp = validated(&["--otlp-endpoint", "http://127.0.0.1:4317"]);
        if cfg!(feature = "otlp") {
            assert_eq!(otlp, Ok(()));
        } else {
            assert!(otlp.unwrap_err().contains("--features otlp"));
        }
        let many = (0..101)
            .map(|i| format!("p{i}-"))
            .collect::<Vec<_>>()
            .join(",");
        let err = validated(&["--metrics-resource-prefixes", &many]).unwrap_err();
        assert!(err.contains("LOCKD_METRICS_RESOURCE_PREFIXES"), "{err}");
        assert_eq!(
            validated(&["--metrics-resource-prefixes", "nightly-,report-"]),
            Ok(())
        );
    }

    #[test]
    fn redacted_url_hides_the_password() {
        assert_eq!(redact_url("redis://:s3cret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://u:p@h:1"), "redis://u:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn redis_host_variables_build_a_url_with_an_encoded_password() {
        let cfg = Config::parse_from([
            "lockd",
            "--redis-host",
            "db",
            "--redis-port",
            "6380",
            "--redis-password",
            "p@ss word",
        ]);
        let redis = cfg.redis().expect("redis configured");
        assert!(
            redis.target
                == RedisTarget::Single {
                    url: "redis://:p%40ss%20word@db:6380/0".into()
                }
        );
        assert!(!format!("{redis:?}").contains("p%40ss"));
    }
}
