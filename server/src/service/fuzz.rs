//! A fuzz harness for the request path, in-process: random and mutated protobuf bytes are decoded
//! as every request type, validated by this module's parent, and what passes validation is run
//! against the embedded backend. It fails on a panic, or on a validated request that breaks a
//! rule validation promises (with the input's bytes in hex, and the seed to replay the run).
//!
//! `cargo fuzz` needs nightly Rust, which lockd's toolchain and CI do not have, so this is the
//! equivalent: a seeded mutation loop over a corpus of valid requests. It runs for
//! `LOCKD_FUZZ_SECS` seconds (2 by default, in CI with the unit tests); `scripts/fuzz SECS`
//! runs it longer in release mode. `LOCKD_FUZZ_SEED` replays a run.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_proto::v1 as pb;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::request::{self, MAX_LABEL_BYTES, MAX_LABELS, MAX_LIMIT, MAX_OWNER_BYTES};
use crate::auth::Namespace;
use crate::backend::MemoryBackend;
use crate::config::{Config, Limits};
use crate::lock::AcquireParams;
use crate::locks::held::HeldLeases;
use crate::locks::{Locks, ReleaseVia};
use crate::metrics::Prefixes;
use crate::overload::Gate;

/// xorshift64*: small, seeded, and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Valid requests of every type, as the mutations' starting points.
fn corpus() -> Vec<Vec<u8>> {
    let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    let acquire = pb::AcquireRequest {
        resource: "jobs/nightly".into(),
        ttl: d(30, 0),
        wait_timeout: d(0, 5_000_000),
        owner: "host-1".into(),
        token: "tok-1".into(),
        labels: [("team".to_owned(), "data".to_owned())].into(),
        limit: 3,
        fair: true,
    };
    let release = pb::ReleaseRequest {
        resource: "jobs/nightly".into(),
        token: "tok-1".into(),
        keep_until: Some(prost_types::Timestamp {
            seconds: 1_900_000_000,
            nanos: 5,
        }),
        min_hold: d(1, 0),
    };
    let extend = pb::ExtendRequest {
        resource: "jobs/nightly".into(),
        token: "tok-1".into(),
        ttl: d(10, 0),
        replace_ttl: true,
    };
    let lease = pb::LeaseRef {
        resource: "a".into(),
        token: "t".into(),
        ttl: d(5, 0),
    };
    let session = |op| pb::SessionRequest {
        request_id: 7,
        expire_on_close: true,
        op: Some(op),
    };
    vec![
        acquire.encode_to_vec(),
        release.encode_to_vec(),
        extend.encode_to_vec(),
        pb::IsLockedRequest {
            resource: "r".into(),
        }
        .encode_to_vec(),
        pb::WatchRequest {
            resource: String::new(),
            prefix: "jobs/".into(),
        }
        .encode_to_vec(),
        pb::ListLocksRequest {
            prefix: "jobs/".into(),
            page_size: 10,
            page_token: "0".into(),
        }
        .encode_to_vec(),
        pb::KeepAliveRequest {
            keep: vec![lease.clone(), lease.clone()],
            release: vec![lease],
            expire_on_close: true,
        }
        .encode_to_vec(),
        session(pb::session_request::Op::Acquire(acquire)).encode_to_vec(),
        session(pb::session_request::Op::Release(release)).encode_to_vec(),
        session(pb::session_request::Op::Extend(extend)).encode_to_vec(),
        session(pb::session_request::Op::Heartbeat(pb::SessionHeartbeat {})).encode_to_vec(),
    ]
}

/// Values that find edge cases in varints and lengths.
const EDGES: &[u64] = &[
    0,
    1,
    127,
    128,
    255,
    256,
    1000,
    1024,
    1025,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
];

/// Changes `input` in one of several ways.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = input.len();
    match rng.below(10) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next() as u8;
        }
        2 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(16)).min(len);
            input.drain(from..to);
        }
        4 if len > 0 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(32)).min(len);
            let copy = input[from..to].to_vec();
            let at = rng.below(input.len() + 1);
            input.splice(at..at, copy);
        }
        5 => input.truncate(rng.below(len + 1)),
        6 => {
            // A field of any number and wire type, with an edge value.
            let field = 1 + rng.below(20) as u64;
            let wire = rng.below(6) as u64;
            prost::encoding::encode_varint(field << 3 | wire, input);
            prost::encoding::encode_varint(EDGES[rng.below(EDGES.len())], input);
        }
        7 => {
            // A string field that is not UTF-8.
            let field = 1 + rng.below(8) as u64;
            prost::encoding::encode_varint(field << 3 | 2, input);
            input.extend_from_slice(&[3, b'a', 0xC3, 0x28]);
        }
        8 => {
            let other = &corpus[rng.below(corpus.len())];
            let from = rng.below(other.len());
            input.extend_from_slice(&other[from..]);
        }
        _ => {
            // A long run of one byte, as a length-delimited field (a large string or map).
            let field = 1 + rng.below(8) as u64;
            let n = rng.below(4096);
            prost::encoding::encode_varint(field << 3 | 2, input);
            prost::encoding::encode_varint(n as u64, input);
            input.extend(std::iter::repeat_n(rng.next() as u8, n));
        }
    }
}

/// The rules a validated string must keep.
fn check_text(what: &str, s: &str, max: usize, may_be_empty: bool) {
    assert!(
        s.len() <= max,
        "{what}: {} bytes passed validation",
        s.len()
    );
    assert!(
        may_be_empty || !s.is_empty(),
        "{what}: empty passed validation"
    );
    assert!(
        !s.chars().any(char::is_control),
        "{what}: a control character passed validation"
    );
}

fn check_acquire(p: &AcquireParams, wait: Duration, limits: &Limits) {
    check_text("resource", &p.resource, request::MAX_RESOURCE_BYTES, false);
    check_text("owner", &p.owner, MAX_OWNER_BYTES, false);
    assert!(p.token.expose().len() <= request::MAX_TOKEN_BYTES);
    assert!(p.ttl >= Duration::from_millis(1) && p.ttl <= limits.max_ttl);
    assert!(
        p.ttl.subsec_nanos().is_multiple_of(1_000_000),
        "ttl is whole ms"
    );
    assert!(wait <= limits.max_wait);
    assert!(p.labels.len() <= MAX_LABELS);
    for (k, v) in &p.labels {
        assert!(!k.is_empty() && k.len() <= MAX_LABEL_BYTES && v.len() <= MAX_LABEL_BYTES);
    }
    assert!((1..=MAX_LIMIT).contains(&p.limit));
}

/// Counts, for the report.
#[derive(Debug, Default)]
struct Counts {
    inputs: u64,
    decoded: u64,
    validated: u64,
    executed: u64,
}

/// Decodes `bytes` as every request type; validates what decodes; runs what validates.
async fn exercise(bytes: &[u8], locks: &Arc<Locks<MemoryBackend>>, counts: &mut Counts) {
    let limits = *locks.limits();
    // lockd without an auth file: names are not qualified, so the length rules apply as they are.
    let ns = Namespace::open();
    let mut acquires = Vec::new();
    let mut releases = Vec::new();
    let mut extends = Vec::new();

    let acquire = pb::AcquireRequest::decode(bytes);
    counts.decoded += u64::from(acquire.is_ok());
    acquires.extend(acquire.ok());
    let release = pb::ReleaseRequest::decode(bytes);
    counts.decoded += u64::from(release.is_ok());
    releases.extend(release.ok());
    let extend = pb::ExtendRequest::decode(bytes);
    counts.decoded += u64::from(extend.is_ok());
    extends.extend(extend.ok());
    if let Ok(r) = pb::IsLockedRequest::decode(bytes) {
        counts.decoded += 1;
        if let Ok(name) = request::resource(r.resource) {
            check_text("resource", &name, request::MAX_RESOURCE_BYTES, false);
            let _ = locks.inspect(&name).await;
        }
    }
    if let Ok(r) = pb::WatchRequest::decode(bytes) {
        counts.decoded += 1;
        if let Ok(scope) = request::WatchScope::parse(r, &ns) {
            match scope {
                request::WatchScope::Resource(r) => {
                    check_text("resource", &r, request::MAX_RESOURCE_BYTES, false);
                }
                request::WatchScope::Prefix(p) => {
                    check_text("prefix", &p, request::MAX_RESOURCE_BYTES, false);
                }
            }
        }
    }
    if let Ok(r) = pb::ListLocksRequest::decode(bytes) {
        counts.decoded += 1;
        if let Ok(list) = request::List::parse(r, &ns) {
            check_text("prefix", &list.prefix, request::MAX_RESOURCE_BYTES, true);
            assert!((1..=request::MAX_PAGE_SIZE as usize).contains(&list.page_size));
            counts.executed += 1;
            let _ = locks
                .list(&list.prefix, list.page_size, &list.page_token)
                .await;
        }
    }
    if let Ok(r) = pb::KeepAliveRequest::decode(bytes) {
        counts.decoded += 1;
        for lease in r.keep.into_iter().chain(r.release) {
            if let Ok(kept) = request::KeptLease::parse(lease, &limits, &ns) {
                counts.validated += 1;
                check_text(
                    "resource",
                    &kept.resource,
                    request::MAX_RESOURCE_BYTES,
                    false,
                );
                assert!(!kept.token.expose().is_empty());
                assert!(kept.ttl >= Duration::from_millis(1) && kept.ttl <= limits.max_ttl);
            }
        }
    }
    if let Ok(r) = pb::SessionRequest::decode(bytes) {
        counts.decoded += 1;
        match r.op {
            Some(pb::session_request::Op::Acquire(a)) => acquires.push(a),
            Some(pb::session_request::Op::Release(r)) => releases.push(r),
            Some(pb::session_request::Op::Extend(e)) => extends.push(e),
            _ => {}
        }
    }

    for a in acquires {
        if let Ok(req) = request::Acquire::parse(a, locks, None, &ns) {
            counts.validated += 1;
            check_acquire(&req.params, req.wait, &limits);
            counts.executed += 1;
            // One attempt: a wait would only sleep.
            let _ = locks.acquire(&req.params, Duration::ZERO).await;
        }
    }
    for r in releases {
        if let Ok(params) = request::release(r, &limits, &ns) {
            counts.validated += 1;
            check_text(
                "resource",
                &params.resource,
                request::MAX_RESOURCE_BYTES,
                false,
            );
            assert!(!params.token.expose().is_empty());
            counts.executed += 1;
            let _ = locks.release(&params, ReleaseVia::Rpc).await;
        }
    }
    for e in extends {
        if let Ok(params) = request::extend(e, &limits, &ns) {
            counts.validated += 1;
            check_text(
                "resource",
                &params.resource,
                request::MAX_RESOURCE_BYTES,
                false,
            );
            assert!(params.ttl >= Duration::from_millis(1) && params.ttl <= limits.max_ttl);
            counts.executed += 1;
            let _ = locks.extend(&params).await;
        }
    }
}

/// The lock core over a new embedded backend, with the default settings.
fn fresh_locks() -> Arc<Locks<MemoryBackend>> {
    let config = <Config as clap::Parser>::parse_from(["lockd"]);
    let waiters = Arc::default();
    let events = Arc::default();
    let backend = Arc::new(MemoryBackend::new(
        Arc::clone(&waiters),
        Arc::clone(&events),
    ));
    Arc::new(Locks::new(
        backend,
        waiters,
        events,
        config.limits(),
        "fuzz".into(),
        CancellationToken::new(),
        Arc::new(HeldLeases::new(false, Prefixes::default())),
        Arc::new(Gate::new(config.caps())),
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn random_and_mutated_requests_never_panic_and_validation_keeps_its_rules() {
    use futures_util::FutureExt as _;

    let secs: u64 = std::env::var("LOCKD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("LOCKD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut locks = fresh_locks();
    let corpus = corpus();
    let mut rng = Rng(seed);
    let mut counts = Counts::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        let mut input = if rng.below(10) == 0 {
            (0..rng.below(256)).map(|_| rng.next() as u8).collect()
        } else {
            corpus[rng.below(corpus.len())].clone()
        };
        for _ in 0..=rng.below(8) {
            mutate(&mut rng, &mut input, &corpus);
        }
        counts.inputs += 1;
        if counts.inputs.is_multiple_of(50_000) {
            // The locks granted so far would only grow the backend's memory over a long run.
            locks = fresh_locks();
        }
        let run = AssertUnwindSafe(exercise(&input, &locks, &mut counts))
            .catch_unwind()
            .await;
        assert!(
            run.is_ok(),
            "panic on input {} (LOCKD_FUZZ_SEED={seed})",
            hex(&input)
        );
    }
    println!(
        "fuzz: {secs} s, seed {seed}: {} inputs, {} decodes, {} validated, {} run on the backend",
        counts.inputs, counts.decoded, counts.validated, counts.executed
    );
}
