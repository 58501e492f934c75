//! lockd's connections to Redis: TLS with a private CA (`rediss://`, REDIS_TLS, REDIS_TLS_CA)
//! and ACL users, without a password ever reaching the log.

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

impl TlsRedis {
    async fn start() -> Self {
        let ca = TestCa::new("redis");
        let files = ca.issue("redis", &["localhost", "127.0.0.1"]);
        let tls_port = free_port();
        let tls_port_text = tls_port.to_string();
        let redis = RedisServer::start_with_args(&[
            "--tls-port",
            &tls_port_text,
            "--tls-cert-file",
            files.cert.to_str().unwrap(),
            "--tls-key-file",
            files.key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.cert_path().to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ])
        .await;
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
