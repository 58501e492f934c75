//! Running over a Redis that is not quite right: a wake-up subscription that is refused or goes
//! silent, a foreign value under a lock key, and a Redis that may evict lock keys.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::redis;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

/// Waits until lockd's log contains `text`.
async fn log_shows(lockd: &Lockd, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lockd.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "the log never showed {text:?}:\n{}",
            lockd.log_text()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

async fn redis_cmd<T: redis::FromRedisValue>(redis: &RedisServer, cmd: &mut redis::Cmd) -> T {
    let mut c = redis.connection().await.unwrap();
    cmd.query_async(&mut c).await.unwrap()
}

// ---- the wake-up subscription ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_wake_up_subscription_is_not_serving_and_logs_the_cause() {
    let redis = RedisServer::start().await;
    // Scripts run (and publish), but this user may not subscribe.
    let _: String = redis_cmd(
        &redis,
        redis::cmd("ACL").arg(&["SETUSER", "default", "-subscribe", "-psubscribe"]),
    )
    .await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "job-1", 30.0).await;
    log_shows(&lockd, "wake-up subscription down").await;
    assert!(
        lockd.log_text().contains("NOPERM") || lockd.log_text().contains("NoPerm"),
        "the log names the cause:\n{}",
        lockd.log_text()
    );
    // Locks answer, but waiters would only be woken by TTLs: not a healthy server.
    for _ in 0..10 {
        assert_eq!(health(&lockd).await, ServingStatus::NotServing);
        sleep(Duration::from_millis(200)).await;
    }
    // The cause is logged once, not at every retry.
    let logged = lockd.log_text().matches("only woken by TTLs").count();
    assert_eq!(logged, 1, "{}", lockd.log_text());

    // Once the operator fixes the ACL, lockd subscribes by itself and serves.
    let _: String = redis_cmd(
        &redis,
        redis::cmd("ACL").arg(&["SETUSER", "default", "+subscribe", "+psubscribe"]),
    )
    .await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    log_shows(&lockd, "wake-up subscription restored").await;
    assert!(release(&mut c, &lease).await.released);
}

/// A TCP proxy to Redis that can silence the connections that subscribed: they stay open, but
/// nothing goes through any more in either direction, as after a network partition that left
/// them half-open.
struct SilencingProxy {
    port: u16,
    /// The silence switch of each connection that sent SUBSCRIBE.
    subscribers: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SilencingProxy {
    async fn start(redis_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let subscribers: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let subs = subscribers.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                let silenced = Arc::new(AtomicBool::new(false));
                let (client_r, client_w) = client.into_split();
                let (server_r, server_w) = server.into_split();
                let to_server = pump(client_r, server_w, silenced.clone(), Some(subs.clone()));
                tokio::spawn(to_server);
                tokio::spawn(pump(server_r, client_w, silenced, None));
            }
        });
        Self {
            port,
            subscribers,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Silences every connection that has subscribed so far; returns how many.
    fn silence_subscribers(&self) -> usize {
        let subs = self.subscribers.lock().unwrap();
        for s in subs.iter() {
            s.store(true, Ordering::SeqCst);
        }
        subs.len()
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes one way until either side closes; drops them while `silenced`. With
/// `subscribers`, registers the connection there when its client sends SUBSCRIBE.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silenced: Arc<AtomicBool>,
    subscribers: Option<Arc<Mutex<Vec<Arc<AtomicBool>>>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut registered = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = &buf[..n];
        if let Some(subs) = &subscribers
            && !registered
            && data
                .windows(b"SUBSCRIBE\r\n".len())
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE\r\n"))
        {
            subs.lock().unwrap().push(silenced.clone());
            registered = true;
        }
        if silenced.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(data).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_replaced_and_its_waiters_look_again() {
    let redis = RedisServer::start().await;
    let proxy = SilencingProxy::start(redis.port).await;
    // `a` reaches Redis through the proxy; `b` directly.
    let a = Lockd::start_with(None, &[("REDIS_URL", proxy.url().as_str())]).await;
    let b = Lockd::start(Some(&redis)).await;
    health_becomes(&a, ServingStatus::Serving).await;
    let mut holder = b.client().await;
    let lease = acquire_ok(&mut holder, "job-1", 60.0).await;
    let mut waiter = a.client().await;
    let wait = tokio::spawn(async move {
        let r = wait_acquire(&mut waiter, "job-1", 30.0, 40.0).await;
        (r, Instant::now())
    });
    sleep(Duration::from_millis(500)).await;
    assert!(
        !wait.is_finished(),
        "the waiter must wait while the lock is held"
    );

    // The partition: `a`'s subscription stays open but hears nothing; its other connections work.
    assert_eq!(proxy.silence_subscribers(), 1);
    sleep(Duration::from_millis(300)).await;
    // Released through `b`: the wake-up it publishes never reaches `a`'s waiter.
    let released_at = Instant::now();
    assert!(release(&mut holder, &lease).await.released);

    // `a` notices the silence within seconds, subscribes again, and its waiter looks again and
    // finds the lock free, long before its wait (40 s) or the old lease's TTL (60 s) ends.
    let (r, got_at) = tokio::time::timeout(Duration::from_secs(15), wait)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the waiter slept on while the lock was free; log of a:\n{}",
                a.log_text()
            )
        })
        .unwrap();
    assert!(r.acquired, "{:?}", r.holder);
    let after = got_at.saturating_duration_since(released_at);
    assert!(
        after < Duration::from_secs(10),
        "woken {after:?} after the release"
    );
    log_shows(&a, "half-open").await;
    log_shows(&a, "wake-up subscription restored").await;
    health_becomes(&a, ServingStatus::Serving).await;

    // The new subscription delivers wake-ups again.
    let second = r.lease.unwrap();
    let mut waiter = a.client().await;
    let wait = tokio::spawn(async move { wait_acquire(&mut waiter, "job-1", 30.0, 40.0).await });
    sleep(Duration::from_millis(300)).await;
    let mut c = b.client().await;
    let taken_at = Instant::now();
    // Released through `b` again, so the wake-up must come through `a`'s new subscription.
    assert!(release(&mut c, &second).await.released);
    let r = tokio::time::timeout(Duration::from_secs(3), wait)
        .await
        .expect("woken by the release")
        .unwrap();
    assert!(r.acquired);
    assert!(taken_at.elapsed() < Duration::from_secs(3));
}

// ---- script errors ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_error_answers_internal_not_unavailable() {
    let redis = RedisServer::start().await;
    // A foreign string where lockd keeps the lock hash: every script on it fails with WRONGTYPE.
    let _: String = redis_cmd(&redis, redis::cmd("SET").arg("lockd:{x}").arg("a string")).await;
    let lockd = Lockd::start(Some(&redis)).await;
    let mut c = lockd.client().await;
    let status = c.acquire(acquire_req("x", 30.0)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("WRONGTYPE"), "{status:?}");
    // Other resources are fine, and so is the server.
    acquire_ok(&mut c, "y", 30.0).await;
    health_becomes(&lockd, ServingStatus::Serving).await;
}

// ---- Redis that may evict lock keys ----

/// A redis-server with extra arguments, on `port`, killed when dropped.
struct CustomRedis {
    child: Child,
    dir: std::path::PathBuf,
}

impl CustomRedis {
    async fn start(port: u16, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lockd-test-{}-custom-redis-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        // Killed by `Drop` if it never answers.
        let server = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return server;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for CustomRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockd_refuses_to_start_over_a_redis_that_may_evict_lock_keys() {
    let port = free_port();
    let _redis = CustomRedis::start(port, &["--maxmemory-policy", "allkeys-lru"]).await;
    let (status, log) = lockd_exits(&format!("redis://127.0.0.1:{port}"), &[]).await;
    assert!(!status.success(), "{status:?}\n{log}");
    assert!(log.contains("maxmemory-policy"), "{log}");
    assert!(
        log.contains("allkeys-lru") && log.contains("noeviction"),
        "{log}"
    );
    assert!(log.contains("--allow-evicting-redis"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_evicting_redis_serves_over_a_redis_that_may_evict_lock_keys() {
    let port = free_port();
    let _redis = CustomRedis::start(port, &["--maxmemory-policy", "allkeys-lru"]).await;
    let url = format!("redis://127.0.0.1:{port}");
    let lockd = Lockd::start_with(
        None,
        &[
            ("REDIS_URL", url.as_str()),
            ("LOCKD_ALLOW_EVICTING_REDIS", "true"),
        ],
    )
    .await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "job-1", 30.0).await;
    assert!(release(&mut c, &lease).await.released);
    assert!(
        lockd.log_text().contains("allow-evicting-redis"),
        "{}",
        lockd.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_found_after_start_is_refused_until_fixed() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    // Nothing listens yet: lockd starts anyway, and answers UNAVAILABLE.
    let lockd = Lockd::start_with(None, &[("REDIS_URL", url.as_str())]).await;
    let redis = CustomRedis::start(port, &["--maxmemory-policy", "volatile-lru"]).await;
    let mut c = lockd.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = c.acquire(acquire_req("job-1", 30.0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        if status.message().contains("maxmemory-policy") {
            assert!(status.message().contains("volatile-lru"), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never refused: {status:?}");
        sleep(Duration::from_millis(100)).await;
    }
    health_becomes(&lockd, ServingStatus::NotServing).await;
    // Still running, and it serves once the policy is fixed, without a restart.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory-policy", "noeviction"])
        .query_async(&mut conn)
        .await
        .unwrap();
    health_becomes(&lockd, ServingStatus::Serving).await;
    let lease = acquire_ok(&mut c, "job-1", 30.0).await;
    assert!(release(&mut c, &lease).await.released);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockd_refuses_to_start_with_two_redis_modes_naming_both() {
    let redis = RedisServer::start().await;
    let (status, log) =
        lockd_exits(&redis.url(), &[("REDIS_CLUSTER_NODES", "127.0.0.1:7000")]).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("REDIS_URL") && log.contains("REDIS_CLUSTER_NODES"),
        "{log}"
    );
}

/// Sentinel mode while the sentinels know no master of that name: no wrong answer, only
/// `UNAVAILABLE` and `NOT_SERVING`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_know_no_such_master_give_not_serving_and_unavailable() {
    let group = shared_sentinel().await;
    let mut env = group.env();
    env.retain(|(k, _)| k != "REDIS_SENTINEL_MASTER");
    env.push(("REDIS_SENTINEL_MASTER".into(), "no-such-master".into()));
    env.push(("LOCKD_REDIS_TIMEOUT".into(), "500ms".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let lockd = Lockd::start_with(None, &env).await;
    health_becomes(&lockd, ServingStatus::NotServing).await;
    let mut c = lockd.client().await;
    let err = c.acquire(acquire_req("job-1", 30.0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("no-such-master"),
        "{}",
        err.message()
    );
}

/// With replica acknowledgements asked for and no replica: every grant is undone and answered
/// `UNAVAILABLE`, the lock stays free, and health is `NOT_SERVING`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_replicas_asked_for_a_grant_is_undone_and_unavailable() {
    let redis = RedisServer::start().await;
    let lockd = Lockd::start_with(
        Some(&redis),
        &[
            ("LOCKD_MIN_REPLICA_ACKS", "1"),
            ("LOCKD_REPLICA_ACK_TIMEOUT", "100ms"),
        ],
    )
    .await;
    health_becomes(&lockd, ServingStatus::NotServing).await;
    let mut c = lockd.client().await;
    let err = c.acquire(acquire_req("job-1", 30.0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("not acknowledged"),
        "{}",
        err.message()
    );
    assert!(
        !is_locked(&mut c, "job-1").await.locked,
        "the unacknowledged grant stayed"
    );
    assert!(redis.keys().await.iter().all(|k| !k.ends_with("{job-1}")));
}

/// With a replica, the same settings grant, extend and release as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_replicas_asked_for_grants_extends_and_releases_succeed() {
    let group = shared_sentinel().await;
    let mut env = group.env();
    env.push(("LOCKD_MIN_REPLICA_ACKS".into(), "1".into()));
    env.push(("LOCKD_KEY_PREFIX".into(), "acks".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let lockd = Lockd::start_with(None, &env).await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "job-1", 30.0).await;
    assert!(extend(&mut c, &lease, 60.0, true).await.extended);
    assert!(release(&mut c, &lease).await.released);
}

/// Cluster mode: the wake-up subscription goes through one node (classic `PUBLISH` reaches
/// every node). When that node dies, the subscription moves to another, health comes back,
/// and a release wakes a waiter again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_subscription_moves_to_another_node_when_its_node_dies() {
    let mut cluster = Cluster::start(3, 1).await;
    let masters = cluster.master_ports().await;
    let replica = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .find(|p| !masters.contains(p))
        .unwrap();
    // The replica first among the seeds: the subscription goes through it.
    let mut seeds = vec![format!("127.0.0.1:{replica}")];
    seeds.extend(masters.iter().map(|p| format!("127.0.0.1:{p}")));
    let seeds = seeds.join(",");
    let lockd = Lockd::start_with(
        None,
        &[
            ("REDIS_CLUSTER_NODES", &seeds),
            ("LOCKD_REDIS_TIMEOUT", "500ms"),
        ],
    )
    .await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let i = cluster
        .nodes
        .iter()
        .position(|n| n.port == replica)
        .unwrap();
    cluster.nodes[i].kill();
    // Lost, then moved to the next seed.
    log_shows(&lockd, "wake-up subscription down").await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    // The holder's TTL (60 s) outlasts the wait (20 s): only a wake-up can serve the waiter.
    let lease = acquire_ok(&mut c, "job-1", 60.0).await;
    let mut waiter = lockd.client().await;
    let wait = tokio::spawn(async move { wait_acquire(&mut waiter, "job-1", 30.0, 20.0).await });
    sleep(Duration::from_millis(300)).await;
    release(&mut c, &lease).await;
    assert!(wait.await.unwrap().acquired, "the waiter was not woken");
}
