//! lockd's connections to Redis: TLS with a private CA (`rediss://`, REDIS_TLS, REDIS_TLS_CA)
//! and ACL users, without a password ever reaching the log; Sentinel and Cluster modes over TLS.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use deadpool_redis::redis;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

/// A Redis that also listens with TLS (certificate from `ca`), with an ACL user `lockd`.
struct TlsRedis {
    redis: RedisServer,
    tls_port: u16,
    ca: TestCa,
}

const ACL_PASSWORD: &str = "s3cret-acl-password";

/// redis-server (or redis-sentinel) arguments for a TLS port with the certificate `files` issued
/// by `ca`, followed by `more`. Clients need no certificate of their own.
fn with_tls(tls_port: u16, files: &CertFiles, ca: &TestCa, more: &[&str]) -> Vec<String> {
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let mut args: Vec<String> = vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        path(&files.cert),
        "--tls-key-file".into(),
        path(&files.key),
        "--tls-ca-cert-file".into(),
        path(&ca.cert_path()),
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    args.extend(more.iter().map(|a| (*a).to_owned()));
    args
}

/// A redis-server with `args`.
async fn redis_with(args: &[String]) -> RedisServer {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RedisServer::start_with_args(&args).await
}

impl TlsRedis {
    async fn start() -> Self {
        let ca = TestCa::new("redis");
        let files = ca.issue("redis", &["localhost", "127.0.0.1"]);
        let tls_port = free_port();
        let redis = redis_with(&with_tls(tls_port, &files, &ca, &[])).await;
        let _: () = redis_cmd(
            redis.port,
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg("lockd")
                .arg("on")
                .arg(format!(">{ACL_PASSWORD}"))
                .arg("~*")
                .arg("&*")
                .arg("+@all"),
        )
        .await
        .unwrap();
        Self {
            redis,
            tls_port,
            ca,
        }
    }

    fn ca_path(&self) -> String {
        self.ca.cert_path().to_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockd_serves_over_rediss_with_a_private_ca_and_an_acl_user() {
    let redis = TlsRedis::start().await;
    let url = format!(
        "rediss://lockd:{ACL_PASSWORD}@127.0.0.1:{}/0",
        redis.tls_port
    );
    let lockd = Lockd::start_with(
        None,
        &[("REDIS_URL", &url), ("REDIS_TLS_CA", &redis.ca_path())],
    )
    .await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "over-tls", 10.0).await;
    assert!(release(&mut c, &lease).await.released);
    let keys = redis.redis.keys().await;
    assert!(keys.iter().any(|k| k.contains("over-tls")), "{keys:?}");
    assert!(
        !lockd.log_text().contains(ACL_PASSWORD),
        "the password reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_host_mode_takes_tls_an_acl_user_and_a_private_ca_from_settings() {
    let redis = TlsRedis::start().await;
    let port = redis.tls_port.to_string();
    let ca = redis.ca_path();
    let lockd = Lockd::start_with(
        None,
        &[
            ("REDIS_HOST", "127.0.0.1"),
            ("REDIS_PORT", &port),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CA", &ca),
            ("REDIS_USERNAME", "lockd"),
            ("REDIS_PASSWORD", ACL_PASSWORD),
        ],
    )
    .await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    assert!(try_acquire(&mut c, "host-mode", 10.0).await.acquired);
    assert!(
        !lockd.log_text().contains(ACL_PASSWORD),
        "the password reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_or_a_wrong_acl_password_is_unavailable_and_never_logged() {
    let redis = TlsRedis::start().await;
    // The system's roots do not know the test CA.
    let url = format!(
        "rediss://lockd:{ACL_PASSWORD}@127.0.0.1:{}/0",
        redis.tls_port
    );
    let untrusted = Lockd::start_with(None, &[("REDIS_URL", &url)]).await;
    let wrong = format!(
        "rediss://lockd:not-the-password@127.0.0.1:{}/0",
        redis.tls_port
    );
    let refused = Lockd::start_with(
        None,
        &[("REDIS_URL", &wrong), ("REDIS_TLS_CA", &redis.ca_path())],
    )
    .await;
    for lockd in [&untrusted, &refused] {
        let mut c = lockd.client().await;
        let status = c.acquire(acquire_req("x", 5.0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(health(lockd).await, ServingStatus::NotServing);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for lockd in [&untrusted, &refused] {
        let log = lockd.log_text();
        assert!(
            !log.contains(ACL_PASSWORD),
            "a password reached the log:\n{log}"
        );
        assert!(
            !log.contains("not-the-password"),
            "a password reached the log:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tls_settings_that_would_be_ignored_are_refused_at_start() {
    let redis = RedisServer::start().await;
    let (status, log) = lockd_exits(&redis.url(), &[("REDIS_TLS", "true")]).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("rediss://"), "{log}");
    let (status, log) = lockd_exits(&redis.url(), &[("REDIS_TLS_CA", "/tmp/ca.pem")]).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("REDIS_TLS_CA"), "{log}");
}

/// A master and a sentinel that both speak TLS (certificates from `ca`) besides their plain
/// ports, which only the harness uses. The sentinel monitors the master's TLS port and reaches
/// it with TLS (`tls-replication yes`), so it names that port to lockd.
struct TlsSentinel {
    master: RedisServer,
    sentinel: Child,
    sentinel_port: u16,
    sentinel_tls_port: u16,
    ca: TestCa,
}

const TLS_MASTER_NAME: &str = "lockd-tls";

impl TlsSentinel {
    async fn start() -> Self {
        require("redis-sentinel", "sudo apt-get install -y redis-sentinel");
        let ca = TestCa::new("sentinel");
        let files = ca.issue("redis", &["localhost", "127.0.0.1"]);
        let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
        let ca_path = ca.cert_path().to_str().unwrap().to_owned();
        let master_tls_port = free_port();
        let master = redis_with(&with_tls(master_tls_port, &files, &ca, &[])).await;
        let (sentinel_port, sentinel_tls_port) = (free_port(), free_port());
        let sentinel = spawn_sentinel(
            sentinel_port,
            &format!(
                "tls-port {sentinel_tls_port}\ntls-cert-file {cert}\ntls-key-file {key}\n\
                 tls-ca-cert-file {ca_path}\ntls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor {TLS_MASTER_NAME} 127.0.0.1 {master_tls_port} 1\n"
            ),
        );
        let group = Self {
            master,
            sentinel,
            sentinel_port,
            sentinel_tls_port,
            ca,
        };
        eventually(
            Duration::from_secs(30),
            "the sentinel monitors the master over TLS",
            || async {
                let addr: redis::RedisResult<(String, u16)> = redis_cmd(
                    group.sentinel_port,
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg(TLS_MASTER_NAME),
                )
                .await;
                addr.is_ok_and(|(_, port)| port == master_tls_port)
                    && sentinel_sees_master_up(group.sentinel_port).await
            },
        )
        .await;
        group
    }
}

/// Whether the sentinel has a live link to the master (its flags say `master`, not `s_down`).
async fn sentinel_sees_master_up(sentinel_port: u16) -> bool {
    let fields: redis::RedisResult<Vec<String>> = redis_cmd(
        sentinel_port,
        redis::cmd("SENTINEL").arg("master").arg(TLS_MASTER_NAME),
    )
    .await;
    let Ok(fields) = fields else { return false };
    let flags = fields
        .chunks(2)
        .find(|kv| kv[0] == "flags")
        .map(|kv| kv[1].clone())
        .unwrap_or_default();
    flags == "master"
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_mode_reaches_the_sentinels_and_the_master_over_tls() {
    let group = TlsSentinel::start().await;
    let sentinels = format!("127.0.0.1:{}", group.sentinel_tls_port);
    let ca = group.ca.cert_path().to_str().unwrap().to_owned();
    let lockd = Lockd::start_with(
        None,
        &[
            ("REDIS_SENTINELS", &sentinels),
            ("REDIS_SENTINEL_MASTER", TLS_MASTER_NAME),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CA", &ca),
        ],
    )
    .await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "via-tls-sentinel", 10.0).await;
    let keys = group.master.keys().await;
    assert!(
        keys.iter().any(|k| k.contains("via-tls-sentinel")),
        "{keys:?}"
    );
    // Both ports lockd could use, the sentinel's and the one it names for the master, speak
    // only TLS: the grant went over TLS, and the certificate was checked against REDIS_TLS_CA.
    assert!(release(&mut c, &lease).await.released);
}

/// Three cluster masters that speak TLS besides their plain ports, with the cluster bus over
/// TLS too (`tls-cluster yes`). A TLS client is told the TLS ports of the slots' owners.
struct TlsCluster {
    nodes: Vec<RedisServer>,
    tls_ports: Vec<u16>,
    ca: TestCa,
}

impl TlsCluster {
    async fn start() -> Self {
        require("redis-cli", "sudo apt-get install -y redis-tools");
        let ca = TestCa::new("cluster");
        let files = ca.issue("redis", &["localhost", "127.0.0.1"]);
        let ca_path = ca.cert_path().to_str().unwrap().to_owned();
        let (mut nodes, mut tls_ports) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let tls_port = free_port();
            let cluster = [
                "--tls-cluster",
                "yes",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "{dir}/nodes.conf",
            ];
            nodes.push(redis_with(&with_tls(tls_port, &files, &ca, &cluster)).await);
            tls_ports.push(tls_port);
        }
        let mut create = Command::new("redis-cli");
        create.args(["--tls", "--cacert", &ca_path, "--cluster", "create"]);
        for port in &tls_ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create over TLS failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            cluster_becomes_ok(n.port).await;
        }
        Self {
            nodes,
            tls_ports,
            ca,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_reaches_every_master_over_tls() {
    let cluster = TlsCluster::start().await;
    let seeds: Vec<String> = cluster
        .tls_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let ca = cluster.ca.cert_path().to_str().unwrap().to_owned();
    let lockd = Lockd::start_with(
        None,
        &[
            ("REDIS_CLUSTER_NODES", &seeds.join(",")),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CA", &ca),
        ],
    )
    .await;
    health_becomes(&lockd, ServingStatus::Serving).await;
    let mut c = lockd.client().await;
    // Enough resources that every master owns some: each grant went over TLS to its owner.
    let mut leases = Vec::new();
    for i in 0..30 {
        leases.push(acquire_ok(&mut c, &format!("tls-cluster-{i}"), 10.0).await);
    }
    for n in &cluster.nodes {
        let keys = n.keys().await;
        assert!(
            keys.iter().any(|k| k.contains("tls-cluster-")),
            "a master holds none of the 30 locks: {keys:?}"
        );
    }
    for lease in &leases {
        assert!(release(&mut c, lease).await.released);
    }
}
