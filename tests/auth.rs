//! API keys, namespaces and access levels (`LOCKD_AUTH_FILE`): who may call lockd, what each
//! key sees, and reloading the file on SIGHUP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lockd_client::proto::session_request::Op;
use lockd_client::proto::session_response::Reply;
use lockd_client::proto::{
    GetOwnerRequest, IsLockedRequest, ListLocksRequest, ReleaseRequest, SessionRequest,
    WatchRequest,
};
use lockd_client::{AuthedClient, LockClient};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::*;

/// One `[[keys]]` entry: name, namespace, access, and the key itself (the file gets its hash).
pub(crate) type Key<'a> = (&'a str, &'a str, &'a str, &'a str);

pub(crate) fn write_auth_file(path: &Path, keys: &[Key<'_>]) {
    let text: String = keys
        .iter()
        .map(|(name, ns, access, key)| {
            let digest: String = Sha256::digest(key.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!(
                "[[keys]]\nname = {name:?}\nnamespace = {ns:?}\naccess = {access:?}\nsha256 = {digest:?}\n"
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

const KEY_A: Key<'static> = (
    "team-a-scheduler",
    "team-a",
    "write",
    "lockd_test_key_a_0001",
);
const KEY_A2: Key<'static> = ("team-a-second", "team-a", "write", "lockd_test_key_a_0002");
const KEY_B: Key<'static> = (
    "team-b-scheduler",
    "team-b",
    "write",
    "lockd_test_key_b_0001",
);
const KEY_A_READ: Key<'static> = (
    "team-a-dashboard",
    "team-a",
    "read",
    "lockd_test_key_a_read",
);

/// A lockd over Redis with an auth file holding `keys`.
async fn with_keys(redis: &RedisServer, keys: &[Key<'_>]) -> (Lockd, PathBuf) {
    let file = scratch_dir("auth").join("auth.toml");
    write_auth_file(&file, keys);
    let lockd =
        Lockd::start_with(Some(redis), &[("LOCKD_AUTH_FILE", file.to_str().unwrap())]).await;
    (lockd, file)
}

async fn client_with(lockd: &Lockd, key: &str) -> LockClient {
    LockClient::builder(lockd.endpoint())
        .api_key(key)
        .connect()
        .await
        .unwrap()
}

async fn raw_with(lockd: &Lockd, key: &str) -> AuthedClient {
    client_with(lockd, key).await.raw()
}

async fn watch_prefix(
    c: &mut AuthedClient,
    prefix: &str,
) -> tonic::Streaming<lockd_client::proto::WatchResponse> {
    c.watch(WatchRequest {
        prefix: prefix.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_known_key_are_unauthenticated_and_read_keys_cannot_write() {
    let redis = RedisServer::start().await;
    let (lockd, _file) = with_keys(&redis, &[KEY_A, KEY_A_READ]).await;

    let mut anonymous = lockd.client().await;
    let status = anonymous
        .acquire(acquire_req("job", 10.0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("Bearer"), "{status:?}");
    let listed = anonymous.list_locks(ListLocksRequest::default()).await;
    assert_eq!(code(listed), Code::Unauthenticated);

    let mut stranger = raw_with(&lockd, "lockd_not_in_the_file").await;
    assert_eq!(
        code(stranger.acquire(acquire_req("job", 10.0)).await),
        Code::Unauthenticated
    );

    let mut reader = raw_with(&lockd, KEY_A_READ.3).await;
    let status = reader.acquire(acquire_req("job", 10.0)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("team-a-dashboard"), "{status:?}");
    let is_locked = IsLockedRequest {
        resource: "job".into(),
    };
    assert_eq!(code(reader.is_locked(is_locked.clone()).await), Code::Ok);
    assert_eq!(
        code(reader.list_locks(ListLocksRequest::default()).await),
        Code::Ok
    );

    let mut writer = raw_with(&lockd, KEY_A.3).await;
    let granted = writer.acquire(acquire_req("job", 10.0)).await.unwrap();
    assert!(granted.into_inner().acquired);
    assert!(
        reader
            .is_locked(is_locked)
            .await
            .unwrap()
            .into_inner()
            .locked
    );

    // Neither key reached the log; the refused read key is named.
    let log = lockd.log_text();
    for key in [KEY_A.3, KEY_A_READ.3, "lockd_not_in_the_file"] {
        assert!(!log.contains(key), "an API key reached the log:\n{log}");
    }
    assert!(log.contains("team-a-dashboard"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_namespaces_never_see_or_touch_each_others_locks() {
    let redis = RedisServer::start().await;
    let (lockd, _file) = with_keys(&redis, &[KEY_A, KEY_B]).await;
    let mut a = raw_with(&lockd, KEY_A.3).await;
    let mut b = raw_with(&lockd, KEY_B.3).await;
    let mut b_watch = watch_prefix(&mut b, "j").await;

    // The same name in two namespaces is two locks.
    let lease_a = a
        .acquire(acquire_req("job", 30.0))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(
        lease_a.resource, "job",
        "names come back as the caller gave them"
    );
    let lease_b = b
        .acquire(acquire_req("job", 30.0))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert!(lease_b.fencing_token > 0);

    // b cannot release a's lock, even with its token.
    let released = b
        .release(ReleaseRequest {
            resource: "job".into(),
            token: lease_a.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!released.released);
    let owner = a
        .get_owner(GetOwnerRequest {
            resource: "job".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .holder
        .unwrap();
    assert_eq!(
        (owner.resource.as_str(), owner.fencing_token),
        ("job", lease_a.fencing_token)
    );

    // Each lists only its own lock, under the name it gave.
    for (c, fencing) in [
        (&mut a, lease_a.fencing_token),
        (&mut b, lease_b.fencing_token),
    ] {
        let listed = c
            .list_locks(ListLocksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .locks;
        let names: Vec<_> = listed
            .iter()
            .map(|l| (l.resource.as_str(), l.fencing_token))
            .collect();
        assert_eq!(names, [("job", fencing)]);
    }

    // b's watcher saw its own acquire only: a's acquire came first, and b's is the first event.
    let first = tokio::time::timeout(Duration::from_secs(5), b_watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .event
        .unwrap();
    assert_eq!(
        (first.resource.as_str(), first.fencing_token),
        ("job", lease_b.fencing_token)
    );

    // The namespace is part of every Redis key.
    let keys = redis.keys().await;
    assert!(keys.iter().any(|k| k.contains("team-a:job")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("team-b:job")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("{job}")), "{keys:?}");
}

/// A Session stream with `key`, and a sender for its requests.
async fn open_session(
    lockd: &Lockd,
    key: &str,
) -> (
    mpsc::Sender<SessionRequest>,
    tonic::Streaming<lockd_client::proto::SessionResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    let replies = raw_with(lockd, key)
        .await
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, replies)
}

async fn session_acquire(
    tx: &mpsc::Sender<SessionRequest>,
    replies: &mut tonic::Streaming<lockd_client::proto::SessionResponse>,
    id: u64,
    resource: &str,
) -> Result<bool, tonic::Status> {
    tx.send(SessionRequest {
        request_id: id,
        op: Some(Op::Acquire(acquire_req(resource, 30.0))),
        ..Default::default()
    })
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("a session reply")
        .expect("the session is open")?;
    match reply.reply {
        Some(Reply::Acquire(a)) => Ok(a.acquired),
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_revokes_a_removed_key_at_once_even_on_open_streams() {
    let redis = RedisServer::start().await;
    let (lockd, file) = with_keys(&redis, &[KEY_A, KEY_A2]).await;

    let (tx, mut replies) = open_session(&lockd, KEY_A.3).await;
    assert!(
        session_acquire(&tx, &mut replies, 1, "first")
            .await
            .unwrap()
    );
    let mut watch_a = watch_prefix(&mut raw_with(&lockd, KEY_A.3).await, "w").await;
    // A stream of a key that stays, on the same kind of connection.
    let (tx2, mut replies2) = open_session(&lockd, KEY_A2.3).await;
    assert!(
        session_acquire(&tx2, &mut replies2, 1, "second")
            .await
            .unwrap()
    );

    // KEY_A leaves the file, KEY_B joins it.
    write_auth_file(&file, &[KEY_A2, KEY_B]);
    signal(lockd.pid(), "HUP");

    // The watch of the removed key ends with UNAUTHENTICATED without any event.
    let ended = tokio::time::timeout(Duration::from_secs(5), watch_a.next())
        .await
        .expect("the revoked watch ends")
        .expect("with a status");
    assert_eq!(ended.unwrap_err().code(), Code::Unauthenticated);
    // The removed key's session fails its next message (if the revocation has not ended it).
    let _ = tx.try_send(SessionRequest {
        request_id: 2,
        op: Some(Op::Acquire(acquire_req("after", 30.0))),
        ..Default::default()
    });
    let end = tokio::time::timeout(Duration::from_secs(5), replies.next())
        .await
        .expect("the revoked session ends");
    assert_eq!(end.unwrap().unwrap_err().code(), Code::Unauthenticated);
    // Nothing was taken after the revocation.
    let mut a2 = raw_with(&lockd, KEY_A2.3).await;
    let after = a2
        .is_locked(IsLockedRequest {
            resource: "after".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!after.locked);

    // New calls with the removed key are refused; the added key works; the kept key's open
    // session goes on.
    let mut removed = raw_with(&lockd, KEY_A.3).await;
    assert_eq!(
        code(removed.acquire(acquire_req("x", 10.0)).await),
        Code::Unauthenticated
    );
    let mut added = raw_with(&lockd, KEY_B.3).await;
    assert!(
        added
            .acquire(acquire_req("x", 10.0))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
    assert!(
        session_acquire(&tx2, &mut replies2, 2, "third")
            .await
            .unwrap()
    );

    // A broken file leaves the keys in force.
    std::fs::write(&file, "[[keys]\nbroken").unwrap();
    signal(lockd.pid(), "HUP");
    eventually(
        Duration::from_secs(5),
        "the reload error is logged",
        || async { lockd.log_text().contains("stay in force") },
    )
    .await;
    assert!(
        session_acquire(&tx2, &mut replies2, 3, "fourth")
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_holds_locks_with_its_api_key_in_its_namespace() {
    let redis = RedisServer::start().await;
    let (lockd, _file) = with_keys(&redis, &[KEY_A, KEY_B]).await;
    let a = client_with(&lockd, KEY_A.3).await;
    let b = client_with(&lockd, KEY_B.3).await;
    let guard = a
        .try_lock("nightly", Duration::from_secs(30))
        .await
        .unwrap()
        .into_guard()
        .unwrap();
    // The same name in another namespace is free.
    let other = b
        .try_lock("nightly", Duration::from_secs(30))
        .await
        .unwrap()
        .into_guard()
        .unwrap();
    let holder = a.holder("nightly").await.unwrap().unwrap();
    assert_eq!(holder.fencing_token, guard.fencing_token());
    assert_eq!(a.list_locks("").await.unwrap().len(), 1);
    guard.release().await.unwrap();
    other.release().await.unwrap();
    assert!(a.holder("nightly").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockd_keygen_prints_a_key_that_its_entry_admits() {
    let out = Command::new(env!("CARGO_BIN_EXE_lockd"))
        .args(["keygen", "--name", "ci", "--namespace", "builds"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().next().unwrap().to_owned();
    assert!(key.len() >= 60, "{key}");
    assert!(
        !text.split_once('\n').unwrap().1.contains(&key),
        "the file entry holds the key"
    );
    let file = scratch_dir("keygen").join("auth.toml");
    std::fs::write(&file, &text[key.len()..]).unwrap();
    let redis = RedisServer::start().await;
    let lockd =
        Lockd::start_with(Some(&redis), &[("LOCKD_AUTH_FILE", file.to_str().unwrap())]).await;
    let client = client_with(&lockd, &key).await;
    assert!(
        client
            .try_lock("build-1", Duration::from_secs(30))
            .await
            .unwrap()
            .is_acquired()
    );
    let keys = redis.keys().await;
    assert!(
        keys.iter().any(|k| k.contains("builds:build-1")),
        "{keys:?}"
    );

    let bad = Command::new(env!("CARGO_BIN_EXE_lockd"))
        .args(["keygen", "--name", "ci", "--namespace", "a:b"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("namespace"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_file_that_breaks_a_rule_is_refused_at_start() {
    let redis = RedisServer::start().await;
    let file = scratch_dir("auth-bad").join("auth.toml");
    std::fs::write(
        &file,
        "[[keys]]\nname = \"x\"\nnamespace = \"a\"\naccess = \"admin\"\nsha256 = \"00\"\n",
    )
    .unwrap();
    let (status, log) =
        lockd_exits(&redis.url(), &[("LOCKD_AUTH_FILE", file.to_str().unwrap())]).await;
    assert!(!status.success());
    assert!(log.contains("keys[0]") && log.contains("access"), "{log}");
    let (status, log) = lockd_exits(
        &redis.url(),
        &[("LOCKD_AUTH_FILE", "/nonexistent/auth.toml")],
    )
    .await;
    assert!(!status.success());
    assert!(log.contains("/nonexistent/auth.toml"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_auth_file_lockd_serves_everyone_and_warns_that_it_is_open() {
    let lockd = Lockd::start(None).await;
    let mut c = lockd.client().await;
    assert!(try_acquire(&mut c, "open", 5.0).await.acquired);
    let log = lockd.log_text();
    assert_eq!(log.matches("lockd is open").count(), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_stay_open_and_grpcurl_sends_the_key() {
    let redis = RedisServer::start().await;
    let (lockd, _file) = with_keys(&redis, &[KEY_A]).await;
    health_becomes(
        &lockd,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let services = grpcurl(&["-plaintext", &lockd.addr(), "list"]);
    assert!(services.contains("lockd.v1.LockService"), "{services}");
    let header = format!("authorization: Bearer {}", KEY_A.3);
    let reply = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        r#"{"resource":"grpcurl-job","ttl":"10s"}"#,
        &lockd.addr(),
        "lockd.v1.LockService/Acquire",
    ]);
    assert!(reply.contains("\"acquired\": true"), "{reply}");
}
