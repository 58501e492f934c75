//! TLS and mutual TLS on lockd's gRPC port, with certificates made at test time, and their
//! reload on SIGHUP.

use std::time::Duration;

use lockd_client::LockClient;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::support::*;

fn https(lockd: &Lockd) -> String {
    format!("https://127.0.0.1:{}", lockd.port)
}

fn trusting(ca: &TestCa) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.cert_pem()))
}

fn identity(files: &CertFiles) -> Identity {
    Identity::from_pem(
        std::fs::read(&files.cert).unwrap(),
        std::fs::read(&files.key).unwrap(),
    )
}

/// Whether a client with `tls` can take a lock on `lockd` (a fresh connection each time).
async fn can_lock(endpoint: String, tls: Option<ClientTlsConfig>) -> bool {
    let mut builder = LockClient::builder(endpoint)
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(3))
        .retry(lockd_client::RetryPolicy::none());
    if let Some(tls) = tls {
        builder = builder.tls_config(tls);
    }
    let Ok(client) = builder.connect().await else {
        return false;
    };
    let resource = format!("tls-{}", uuid::Uuid::new_v4());
    matches!(
        client.try_lock(resource, Duration::from_secs(5)).await,
        Ok(t) if t.is_acquired()
    )
}

async fn lockd_with_tls(server: &CertFiles, client_ca: Option<&TestCa>) -> Lockd {
    let mut env = vec![
        ("LOCKD_TLS_CERT", server.cert.to_str().unwrap().to_owned()),
        ("LOCKD_TLS_KEY", server.key.to_str().unwrap().to_owned()),
    ];
    if let Some(ca) = client_ca {
        env.push((
            "LOCKD_TLS_CLIENT_CA",
            ca.cert_path().to_str().unwrap().to_owned(),
        ));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Lockd::start_with(None, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_its_ca_and_refuses_plaintext() {
    let ca = TestCa::new("server");
    let lockd = lockd_with_tls(&ca.issue("server", &["localhost", "127.0.0.1"]), None).await;
    assert!(can_lock(https(&lockd), Some(trusting(&ca))).await);
    assert!(
        !can_lock(lockd.endpoint(), None).await,
        "plaintext was served"
    );
    let stranger = TestCa::new("stranger");
    assert!(
        !can_lock(https(&lockd), Some(trusting(&stranger))).await,
        "a client trusting another CA connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_its_client_ca() {
    let server_ca = TestCa::new("mtls-server");
    let client_ca = TestCa::new("mtls-clients");
    let other_ca = TestCa::new("mtls-other");
    let lockd = lockd_with_tls(&server_ca.issue("server", &["127.0.0.1"]), Some(&client_ca)).await;
    let good = identity(&client_ca.issue("scheduler", &["scheduler"]));
    let forged = identity(&other_ca.issue("scheduler", &["scheduler"]));
    assert!(can_lock(https(&lockd), Some(trusting(&server_ca).identity(good))).await);
    assert!(
        !can_lock(https(&lockd), Some(trusting(&server_ca))).await,
        "no certificate"
    );
    assert!(
        !can_lock(https(&lockd), Some(trusting(&server_ca).identity(forged))).await,
        "a certificate from another CA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_for_new_connections() {
    let old_ca = TestCa::new("reload-old");
    let new_ca = TestCa::new("reload-new");
    let files = old_ca.issue("server", &["127.0.0.1"]);
    let lockd = lockd_with_tls(&files, None).await;
    assert!(can_lock(https(&lockd), Some(trusting(&old_ca))).await);
    assert!(!can_lock(https(&lockd), Some(trusting(&new_ca))).await);

    // Renewed in place, as cert-manager or certbot would.
    let renewed = new_ca.issue("renewed", &["127.0.0.1"]);
    std::fs::copy(&renewed.cert, &files.cert).unwrap();
    std::fs::copy(&renewed.key, &files.key).unwrap();
    signal(lockd.pid(), "HUP");
    eventually(
        Duration::from_secs(10),
        "the new certificate is served",
        || can_lock(https(&lockd), Some(trusting(&new_ca))),
    )
    .await;
    assert!(!can_lock(https(&lockd), Some(trusting(&old_ca))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_tls_setup_is_refused_at_start() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new("half");
    let files = ca.issue("server", &["127.0.0.1"]);
    let cert = files.cert.to_str().unwrap();
    let (status, log) = lockd_exits(&redis.url(), &[("LOCKD_TLS_CERT", cert)]).await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("LOCKD_TLS_KEY"), "{log}");
    // A key that is not the certificate's.
    let other = ca.issue("other", &["127.0.0.1"]);
    let (status, log) = lockd_exits(
        &redis.url(),
        &[
            ("LOCKD_TLS_CERT", cert),
            ("LOCKD_TLS_KEY", other.key.to_str().unwrap()),
        ],
    )
    .await;
    assert!(!status.success());
    assert!(log.contains("LOCKD_TLS_CERT"), "{log}");
}
