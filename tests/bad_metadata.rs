//! Bad metadata: malformed `authorization` headers, over-long and non-ASCII metadata keys and
//! values, malformed `grpc-timeout`. A malformed key is answered `UNAUTHENTICATED` (or
//! `INVALID_ARGUMENT`); other odd metadata is ignored or refused by HTTP/2's header limit
//! (`16 KiB`); nothing panics, and lockd serves on.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tonic::Code;
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};
use tonic::metadata::MetadataMap;

use crate::auth::{Key, write_auth_file};
use crate::support::*;

const KEY: Key<'static> = ("fuzz-writer", "fuzz", "write", "lockd_fuzz_key_0001");

/// A lockd over Redis that admits `KEY` only.
async fn lockd_with_key(redis: &RedisServer) -> Lockd {
    let file = scratch_dir("auth").join("auth.toml");
    write_auth_file(&file, &[KEY]);
    Lockd::start_with(Some(redis), &[("LOCKD_AUTH_FILE", file.to_str().unwrap())]).await
}

/// An IsLocked call with `headers` as its metadata: the code it got.
async fn call(c: &mut Client, headers: HeaderMap) -> Code {
    let mut req = tonic::Request::new(lockd_client::proto::IsLockedRequest {
        resource: "r".into(),
    });
    *req.metadata_mut() = MetadataMap::from_headers(headers);
    c.is_locked(req)
        .await
        .map_or_else(|s| s.code(), |_| Code::Ok)
}

fn header(name: &str, value: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.append(
        HeaderName::from_bytes(name.as_bytes()).unwrap(),
        HeaderValue::from_bytes(value).unwrap(),
    );
    h
}

fn with_key(mut h: HeaderMap) -> HeaderMap {
    h.append(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", KEY.3)).unwrap(),
    );
    h
}

fn assert_no_panic(lockd: &Lockd) {
    let log = lockd.log_text();
    assert!(!log.contains("panicked"), "lockd panicked:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorization_headers_are_unauthenticated_and_odd_metadata_is_harmless() {
    let redis = RedisServer::start().await;
    let lockd = lockd_with_key(&redis).await;
    let mut c = lockd.client().await;
    let key = KEY.3;

    let unauthenticated: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"Bearer".to_vec(),
        b"Bearer ".to_vec(),
        b"Basic Zm9vOmJhcg==".to_vec(),
        b"Bearer not-a-key".to_vec(),
        format!("Bearer {key} trailing").into_bytes(),
        format!("Bearer\t{key}").into_bytes(),
        format!("Token {key}").into_bytes(),
        [b"Bearer ".as_slice(), &[0xff, 0xfe, 0x80]].concat(),
        [b"Bearer ".as_slice(), "ключ".as_bytes()].concat(),
        format!("Bearer {}", "k".repeat(8 * 1024)).into_bytes(),
    ];
    for value in &unauthenticated {
        let code = call(&mut c, header("authorization", value)).await;
        assert!(
            matches!(code, Code::Unauthenticated | Code::InvalidArgument),
            "authorization {:?}: {code:?}",
            String::from_utf8_lossy(&value[..value.len().min(40)])
        );
    }
    // The right key, in the accepted spellings.
    for value in [format!("Bearer {key}"), format!("bearer  {key} ")] {
        assert_eq!(
            call(&mut c, header("authorization", value.as_bytes())).await,
            Code::Ok
        );
    }

    // Odd metadata beside a good key: ignored.
    let ignored = [
        header("x-note", &[0xff, 0x80, b'a']),
        header("x-note", "ключ".as_bytes()),
        header("x-long", "v".repeat(12 * 1024).as_bytes()),
        header("x-data-bin", b"!!! not base64 !!!"),
        header("grpc-timeout", b"soon"),
        header("grpc-timeout", b"99999999999H"),
        header("grpc-timeout", b"-1S"),
        header(&format!("x-{}", "k".repeat(4000)), b"v"),
    ];
    for h in ignored {
        let what = format!("{h:?}");
        let code = call(&mut c, with_key(h)).await;
        eprintln!("{}: {code:?}", &what[..what.len().min(60)]);
        assert!(
            matches!(code, Code::Ok | Code::InvalidArgument),
            "{}: {code:?}",
            &what[..what.len().min(80)]
        );
    }

    // Over HTTP/2's header list limit (16 KiB): refused before lockd sees the call, by a
    // stream reset (which the client reports with a code of its own).
    for h in [
        header("x-huge", "v".repeat(64 * 1024).as_bytes()),
        (0..2000)
            .map(|i| {
                (
                    HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                )
            })
            .collect(),
    ] {
        let code = call(&mut c, with_key(h)).await;
        eprintln!("header list over 16 KiB: {code:?}");
        assert_ne!(code, Code::Ok, "a header list over 16 KiB was accepted");
    }

    let mut c = lockd.client().await;
    let ok = header("authorization", format!("Bearer {key}").as_bytes());
    assert_eq!(call(&mut c, ok).await, Code::Ok, "lockd still serves");
    assert_no_panic(&lockd);
}

#[test]
fn random_authorization_and_metadata_bytes_never_panic_lockd() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (redis, lockd) = rt.block_on(async {
        let redis = RedisServer::start().await;
        let lockd = lockd_with_key(&redis).await;
        (redis, lockd)
    });
    let client = rt.block_on(lockd.client());
    // Header value bytes: anything HTTP allows (no control characters but tab).
    let value = prop::collection::vec(
        prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff],
        0..600,
    );
    let strategy = (
        value.clone(),
        prop::option::of(("x-[a-z0-9-]{1,40}", value)),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(auth, extra, bearer)| {
        let auth = if bearer {
            [b"Bearer ".as_slice(), &auth].concat()
        } else {
            auth
        };
        let mut h = header("authorization", &auth);
        if let Some((name, value)) = extra {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(&value).unwrap(),
            );
        }
        let mut c = client.clone();
        let code = rt.block_on(call(&mut c, h));
        // Only the one key is admitted, and random bytes are not it.
        prop_assert!(
            matches!(code, Code::Unauthenticated | Code::InvalidArgument),
            "{code:?}"
        );
        Ok::<(), TestCaseError>(())
    });
    if let Err(e) = result {
        panic!("{e}\nlockd log:\n{}", lockd.log_text());
    }
    assert_no_panic(&lockd);
    drop(redis);
}
