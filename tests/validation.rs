//! Every validation rule gets INVALID_ARGUMENT naming the field, and nothing invalid reaches
//! Redis.

use lockd_client::proto::{
    AcquireRequest, ExtendRequest, GetOwnerRequest, IsLockedRequest, ReleaseRequest,
};
use tonic::Code;

use crate::support::*;

fn expect_invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str, rule: &str) {
    let status = r.expect_err("the request must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let msg = status.message();
    assert!(
        msg.starts_with(&format!("{field}:")),
        "message must name `{field}`: {msg}"
    );
    assert!(
        msg.contains(rule),
        "message must state the rule ({rule}): {msg}"
    );
}

fn acquire(resource: &str) -> AcquireRequest {
    AcquireRequest {
        resource: resource.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_request_is_refused_with_invalid_argument_and_never_reaches_redis() {
    let s = Setup::with_env(
        Store::Redis,
        &[("LOCKD_MAX_TTL", "1h"), ("LOCKD_MAX_WAIT", "1m")],
    )
    .await;
    let redis = s.redis.as_ref().unwrap();
    let mut c = s.client().await;
    let before = redis.script_calls().await;

    // resource: 1 to 256 bytes, no control characters; on every RPC.
    expect_invalid(c.acquire(acquire("")).await, "resource", "required");
    expect_invalid(
        c.acquire(acquire(&"r".repeat(257))).await,
        "resource",
        "at most 256 bytes",
    );
    expect_invalid(
        c.acquire(acquire("job\n1")).await,
        "resource",
        "control characters",
    );
    expect_invalid(
        c.acquire(acquire("job\u{7f}")).await,
        "resource",
        "control characters",
    );
    expect_invalid(
        c.release(ReleaseRequest {
            resource: "".into(),
            token: "t".into(),
            ..Default::default()
        })
        .await,
        "resource",
        "required",
    );
    expect_invalid(
        c.is_locked(IsLockedRequest {
            resource: "".into(),
        })
        .await,
        "resource",
        "required",
    );
    expect_invalid(
        c.get_owner(GetOwnerRequest {
            resource: "a\tb".into(),
        })
        .await,
        "resource",
        "control characters",
    );

    // ttl: 1ms to the maximum.
    let mut r = acquire("job");
    r.ttl = Some(secs(0.0));
    expect_invalid(c.acquire(r.clone()).await, "ttl", "at least 1ms");
    r.ttl = Some(prost_types::Duration {
        seconds: 0,
        nanos: 500_000,
    });
    expect_invalid(c.acquire(r.clone()).await, "ttl", "at least 1ms");
    r.ttl = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    expect_invalid(c.acquire(r.clone()).await, "ttl", "non-negative");
    r.ttl = Some(secs(3601.0));
    expect_invalid(c.acquire(r.clone()).await, "ttl", "at most 3600000ms");

    // wait_timeout: non-negative, at most the maximum wait.
    let mut r = acquire("job");
    r.wait_timeout = Some(secs(61.0));
    expect_invalid(
        c.acquire(r.clone()).await,
        "wait_timeout",
        "at most 60000ms",
    );
    r.wait_timeout = Some(prost_types::Duration {
        seconds: -5,
        nanos: 0,
    });
    expect_invalid(c.acquire(r).await, "wait_timeout", "non-negative");

    // token: at most 128 bytes; required for release and extend.
    let mut r = acquire("job");
    r.token = "t".repeat(129);
    expect_invalid(c.acquire(r).await, "token", "at most 128 bytes");
    expect_invalid(
        c.release(ReleaseRequest {
            resource: "job".into(),
            token: "".into(),
            ..Default::default()
        })
        .await,
        "token",
        "required",
    );
    expect_invalid(
        c.release(ReleaseRequest {
            resource: "job".into(),
            token: "t".repeat(129),
            ..Default::default()
        })
        .await,
        "token",
        "at most 128 bytes",
    );

    // labels: at most 16, keys and values at most 128 bytes, keys not empty.
    let mut r = acquire("job");
    r.labels = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    expect_invalid(c.acquire(r).await, "labels", "at most 16 entries");
    let mut r = acquire("job");
    r.labels.insert("k".repeat(129), "v".into());
    expect_invalid(c.acquire(r).await, "labels", "at most 128 bytes");
    let mut r = acquire("job");
    r.labels.insert("k".into(), "v".repeat(129));
    expect_invalid(c.acquire(r).await, "labels", "at most 128 bytes");
    let mut r = acquire("job");
    r.labels.insert("".into(), "v".into());
    expect_invalid(c.acquire(r).await, "labels", "must not be empty");

    // owner: at most 256 bytes, no control characters.
    let mut r = acquire("job");
    r.owner = "o".repeat(257);
    expect_invalid(c.acquire(r).await, "owner", "at most 256 bytes");
    let mut r = acquire("job");
    r.owner = "bad\u{0}owner".into();
    expect_invalid(c.acquire(r).await, "owner", "control characters");

    // extend: ttl required and in range.
    let ext = |ttl| ExtendRequest {
        resource: "job".into(),
        token: "t".into(),
        ttl,
        replace_ttl: false,
    };
    expect_invalid(c.extend(ext(None)).await, "ttl", "required");
    expect_invalid(c.extend(ext(Some(secs(0.0)))).await, "ttl", "at least 1ms");
    expect_invalid(
        c.extend(ext(Some(secs(7200.0)))).await,
        "ttl",
        "at most 3600000ms",
    );
    expect_invalid(
        c.extend(ExtendRequest {
            resource: "job".into(),
            token: "".into(),
            ttl: Some(secs(1.0)),
            replace_ttl: false,
        })
        .await,
        "token",
        "required",
    );

    assert_eq!(
        redis.script_calls().await,
        before,
        "an invalid request reached Redis"
    );

    // The limits are inclusive: exactly 256 bytes, 16 labels, 128-byte token, maximum TTL.
    let mut r = acquire(&"r".repeat(256));
    r.labels = (0..16)
        .map(|i| (format!("k{i}"), "v".repeat(128)))
        .collect();
    r.token = "t".repeat(128);
    r.ttl = Some(secs(3600.0));
    r.wait_timeout = Some(secs(60.0));
    assert!(c.acquire(r).await.unwrap().into_inner().acquired);
}
