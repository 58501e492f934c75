//! Bad input over the wire, as a property: every request field of every RPC gets empty strings,
//! 10 MB strings, NUL and other control characters, invalid UTF-8 (sent as raw protobuf bytes,
//! which no generated client can send), negative, malformed, huge and out-of-range durations and
//! timestamps, absent messages and unknown fields. (No request has an enum field; an unknown
//! field number stands in for an unknown value.)
//!
//! The oracle knows the validation rules (`server/src/service/request.rs`): a request that
//! breaks one is answered `INVALID_ARGUMENT` naming a field, one larger than
//! `LOCKD_MAX_MESSAGE_BYTES` is answered `OUT_OF_RANGE` (tonic's code for it, with a message
//! giving the size and the limit), and a valid one is never answered
//! `INVALID_ARGUMENT`. Nothing is ever answered `INTERNAL`, `UNKNOWN` or `UNAVAILABLE` (a panic
//! would show as one of them), so an invalid request is never granted.

use std::marker::PhantomData;

use lockd_client::proto as pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message as _;
use prost::bytes::BufMut as _;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::support::*;

/// lockd's default `LOCKD_MAX_MESSAGE_BYTES`.
const MAX_MESSAGE: usize = 1 << 20;
/// A string far over every limit, and over the message limit.
const HUGE: usize = 10 * 1024 * 1024;

// ---- A gRPC client that sends raw bytes -------------------------------------------------

/// Sends `Vec<u8>` as the message bytes, decodes replies as `U`.
struct Raw<U>(PhantomData<U>);

impl<U> Default for Raw<U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

struct ReplyDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for ReplyDecoder<U> {
    type Item = U;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, tonic::Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl<U: prost::Message + Default + Send + 'static> Codec for Raw<U> {
    type Encode = Vec<u8>;
    type Decode = U;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder<U>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder<U> {
        ReplyDecoder(PhantomData)
    }
}

async fn unary<U: prost::Message + Default + Send + 'static>(
    channel: &tonic::transport::Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<U, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(tonic::Request::new(body), path, Raw::<U>::default())
        .await
        .map(tonic::Response::into_inner)
}

/// Sends one message on a bidirectional stream and ends the client side; returns the first
/// reply (or the end of the stream).
async fn stream_once<U: prost::Message + Default + Send + 'static>(
    channel: &tonic::transport::Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Option<U>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let outbound = tokio_stream::iter([body]);
    let mut replies = grpc
        .streaming(tonic::Request::new(outbound), path, Raw::<U>::default())
        .await?
        .into_inner();
    replies.message().await
}

// ---- Hand-encoded protobuf ----------------------------------------------------------------

fn key(buf: &mut Vec<u8>, field: u32, wire_type: u32) {
    prost::encoding::encode_varint(u64::from(field << 3 | wire_type), buf);
}

fn bytes_field(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
    key(buf, field, 2);
    prost::encoding::encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

fn varint_field(buf: &mut Vec<u8>, field: u32, value: u64) {
    key(buf, field, 0);
    prost::encoding::encode_varint(value, buf);
}

/// Bytes that are not UTF-8 (a truncated two-byte sequence, then a lone continuation byte).
const NOT_UTF8: &[u8] = &[b'a', 0xC3, 0x28, 0x80];

// ---- Field values and what the rules say of them ----------------------------------------

/// What the validation rules say of a field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Valid,
    /// Valid or not depending on the server's state (a page token).
    Either,
    Invalid,
}

/// A string field's value.
#[derive(Debug, Clone)]
enum Text {
    Empty,
    Plain(String),
    Unicode,
    Nul,
    Control,
    /// 300 bytes: over the 256-byte name and owner limits and the 128-byte token limit.
    Long,
    /// 10 MB: over the message limit.
    Huge,
    NotUtf8,
}

fn text() -> impl Strategy<Value = Text> {
    prop_oneof![
        3 => Just(Text::Empty),
        6 => "[a-z0-9/_.-]{1,24}".prop_map(Text::Plain),
        2 => Just(Text::Unicode),
        2 => Just(Text::Nul),
        2 => Just(Text::Control),
        2 => Just(Text::Long),
        1 => Just(Text::Huge),
        2 => Just(Text::NotUtf8),
    ]
}

impl Text {
    /// The value as a string; `NotUtf8` is sent raw by [`Text::encode`].
    fn string(&self) -> String {
        match self {
            Self::Empty | Self::NotUtf8 => String::new(),
            Self::Plain(s) => s.clone(),
            Self::Unicode => "ключ/🔒/锁".into(),
            Self::Nul => "a\0b".into(),
            Self::Control => "a\u{1b}[31mb".into(),
            Self::Long => "x".repeat(300),
            Self::Huge => "x".repeat(HUGE),
        }
    }

    /// Appends the field as raw bytes (after the message, where it overrides any earlier value).
    fn encode(&self, buf: &mut Vec<u8>, field: u32) {
        match self {
            Self::NotUtf8 => bytes_field(buf, field, NOT_UTF8),
            other => bytes_field(buf, field, other.string().as_bytes()),
        }
    }

    /// A resource name: 1 to 256 bytes, no control characters.
    fn resource(&self) -> Verdict {
        match self {
            Self::Plain(_) | Self::Unicode => Verdict::Valid,
            _ => Verdict::Invalid,
        }
    }

    /// A prefix (Watch, ListLocks): like a resource name, but may be empty.
    fn prefix(&self) -> Verdict {
        match self {
            Self::Empty => Verdict::Valid,
            other => other.resource(),
        }
    }

    /// A token: at most 128 bytes, required unless `optional`.
    fn token(&self, optional: bool) -> Verdict {
        match self {
            Self::Empty if optional => Verdict::Valid,
            Self::Empty | Self::Long | Self::Huge | Self::NotUtf8 => Verdict::Invalid,
            _ => Verdict::Valid,
        }
    }

    /// An owner: at most 256 bytes, no control characters, may be empty.
    fn owner(&self) -> Verdict {
        self.prefix()
    }
}

/// A Duration field's value.
#[derive(Debug, Clone)]
enum Dur {
    Absent,
    Zero,
    /// Under a millisecond.
    Micros,
    /// 1 to 50 ms: short, so a valid wait does not hold the test up.
    Ms(u64),
    Negative,
    NanosOutOfRange,
    NegativeNanos,
    /// 400 days: over every maximum.
    OverMax,
    /// i64::MAX seconds.
    Huge,
}

fn dur() -> impl Strategy<Value = Dur> {
    prop_oneof![
        2 => Just(Dur::Absent),
        1 => Just(Dur::Zero),
        1 => Just(Dur::Micros),
        3 => (1u64..=50).prop_map(Dur::Ms),
        1 => Just(Dur::Negative),
        1 => Just(Dur::NanosOutOfRange),
        1 => Just(Dur::NegativeNanos),
        1 => Just(Dur::OverMax),
        1 => Just(Dur::Huge),
    ]
}

impl Dur {
    fn value(&self) -> Option<prost_types::Duration> {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        match self {
            Self::Absent => None,
            Self::Zero => d(0, 0),
            Self::Micros => d(0, 500_000),
            Self::Ms(ms) => d(0, i32::try_from(ms * 1_000_000).unwrap()),
            Self::Negative => d(-5, 0),
            Self::NanosOutOfRange => d(1, 1_000_000_000),
            Self::NegativeNanos => d(1, -1),
            Self::OverMax => d(400 * 86_400, 0),
            Self::Huge => d(i64::MAX, 999_999_999),
        }
    }

    fn malformed(&self) -> bool {
        matches!(
            self,
            Self::Negative | Self::NanosOutOfRange | Self::NegativeNanos
        )
    }

    /// A TTL: 1 ms to the maximum TTL; `None` is valid unless `required`.
    fn ttl(&self, required: bool) -> Verdict {
        match self {
            Self::Absent if required => Verdict::Invalid,
            Self::Absent | Self::Ms(_) => Verdict::Valid,
            _ => Verdict::Invalid,
        }
    }

    /// A wait: non-negative, at most the maximum wait.
    fn wait(&self) -> Verdict {
        match self {
            Self::Absent | Self::Zero | Self::Micros | Self::Ms(_) => Verdict::Valid,
            _ => Verdict::Invalid,
        }
    }

    /// A minimum hold: any well-formed duration (the backend caps it).
    fn min_hold(&self) -> Verdict {
        if self.malformed() {
            Verdict::Invalid
        } else {
            Verdict::Valid
        }
    }
}

/// A Timestamp field's value (Release.keep_until).
#[derive(Debug, Clone)]
enum Time {
    Absent,
    Epoch,
    Soon,
    FarFuture,
    FarPast,
    NanosOutOfRange,
    NegativeNanos,
}

fn time() -> impl Strategy<Value = Time> {
    prop_oneof![
        Just(Time::Absent),
        Just(Time::Epoch),
        Just(Time::Soon),
        Just(Time::FarFuture),
        Just(Time::FarPast),
        Just(Time::NanosOutOfRange),
        Just(Time::NegativeNanos),
    ]
}

impl Time {
    fn value(&self) -> Option<prost_types::Timestamp> {
        let t = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        match self {
            Self::Absent => None,
            Self::Epoch => t(0, 0),
            Self::Soon => t(now + 1, 0),
            Self::FarFuture => t(i64::MAX, 999_999_999),
            Self::FarPast => t(i64::MIN, 0),
            Self::NanosOutOfRange => t(now, 1_000_000_000),
            Self::NegativeNanos => t(now, -1),
        }
    }

    fn verdict(&self) -> Verdict {
        match self {
            Self::NanosOutOfRange | Self::NegativeNanos => Verdict::Invalid,
            _ => Verdict::Valid,
        }
    }
}

/// An Acquire's labels.
#[derive(Debug, Clone)]
enum Labels {
    None,
    Few,
    TooMany,
    EmptyKey,
    LongValue,
    NulValue,
    NotUtf8Key,
    /// 100,000 labels: over the count limit, and a large map to decode.
    Thousands,
}

fn labels() -> impl Strategy<Value = Labels> {
    prop_oneof![
        3 => Just(Labels::None),
        3 => Just(Labels::Few),
        1 => Just(Labels::TooMany),
        1 => Just(Labels::EmptyKey),
        1 => Just(Labels::LongValue),
        1 => Just(Labels::NulValue),
        1 => Just(Labels::NotUtf8Key),
        1 => Just(Labels::Thousands),
    ]
}

impl Labels {
    fn map(&self) -> std::collections::HashMap<String, String> {
        let n = |count: usize, value: &str| {
            (0..count)
                .map(|i| (format!("k{i}"), value.to_owned()))
                .collect()
        };
        match self {
            Self::None | Self::NotUtf8Key => Default::default(),
            Self::Few => n(3, "v"),
            Self::TooMany => n(17, "v"),
            Self::EmptyKey => [(String::new(), "v".to_owned())].into(),
            Self::LongValue => n(1, &"v".repeat(129)),
            Self::NulValue => n(1, "a\0b"),
            Self::Thousands => n(100_000, "v"),
        }
    }

    fn encode_raw(&self, buf: &mut Vec<u8>) {
        if let Self::NotUtf8Key = self {
            // A map entry: key (1) and value (2), in field 6.
            let mut entry = Vec::new();
            bytes_field(&mut entry, 1, NOT_UTF8);
            bytes_field(&mut entry, 2, b"v");
            bytes_field(buf, 6, &entry);
        }
    }

    fn verdict(&self) -> Verdict {
        match self {
            Self::None | Self::Few | Self::NulValue => Verdict::Valid,
            _ => Verdict::Invalid,
        }
    }
}

fn limit() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(3),
        Just(1024),
        Just(1025),
        Just(u32::MAX)
    ]
}

/// Appends a field number no message has (with `unknown`): it must be ignored.
fn unknown_field(buf: &mut Vec<u8>, unknown: bool) {
    if unknown {
        varint_field(buf, 99, u64::MAX);
        bytes_field(buf, 98, NOT_UTF8);
    }
}

/// Every case: the bytes to send, and the verdict of the rules.
#[derive(Debug)]
struct Case {
    bytes: Vec<u8>,
    verdict: Verdict,
}

impl Case {
    fn new(
        message: &impl prost::Message,
        raw: impl FnOnce(&mut Vec<u8>),
        verdicts: &[Verdict],
    ) -> Self {
        let mut bytes = message.encode_to_vec();
        raw(&mut bytes);
        Self {
            bytes,
            verdict: verdicts.iter().copied().max().unwrap_or(Verdict::Valid),
        }
    }
}

// ---- The requests -------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Acquire {
    resource: Text,
    ttl: Dur,
    wait: Dur,
    owner: Text,
    token: Text,
    labels: Labels,
    limit: u32,
    fair: bool,
    unknown: bool,
}

fn acquire() -> impl Strategy<Value = Acquire> {
    (
        text(),
        dur(),
        dur(),
        text(),
        text(),
        labels(),
        limit(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(resource, ttl, wait, owner, token, labels, limit, fair, unknown)| Acquire {
                resource,
                ttl,
                wait,
                owner,
                token,
                labels,
                limit,
                fair,
                unknown,
            },
        )
}

impl Acquire {
    fn case(&self) -> Case {
        let message = pb::AcquireRequest {
            resource: self.resource.string(),
            ttl: self.ttl.value(),
            wait_timeout: self.wait.value(),
            owner: self.owner.string(),
            token: self.token.string(),
            labels: self.labels.map(),
            limit: self.limit,
            fair: self.fair,
        };
        Case::new(
            &message,
            |buf| {
                for (text, field) in [(&self.resource, 1), (&self.owner, 4), (&self.token, 5)] {
                    if let Text::NotUtf8 = text {
                        text.encode(buf, field);
                    }
                }
                self.labels.encode_raw(buf);
                unknown_field(buf, self.unknown);
            },
            &[
                self.resource.resource(),
                self.ttl.ttl(false),
                self.wait.wait(),
                self.owner.owner(),
                self.token.token(true),
                self.labels.verdict(),
                if self.limit > 1024 {
                    Verdict::Invalid
                } else {
                    Verdict::Valid
                },
            ],
        )
    }
}

/// A request naming a lease: Release, Extend, and the KeepAlive's LeaseRef.
#[derive(Debug, Clone)]
struct LeaseFields {
    resource: Text,
    token: Text,
    duration: Dur,
    time: Time,
    flag: bool,
    unknown: bool,
}

fn lease_fields() -> impl Strategy<Value = LeaseFields> {
    (text(), text(), dur(), time(), any::<bool>(), any::<bool>()).prop_map(
        |(resource, token, duration, time, flag, unknown)| LeaseFields {
            resource,
            token,
            duration,
            time,
            flag,
            unknown,
        },
    )
}

impl LeaseFields {
    fn raw(&self, buf: &mut Vec<u8>) {
        for (text, field) in [(&self.resource, 1), (&self.token, 2)] {
            if let Text::NotUtf8 = text {
                text.encode(buf, field);
            }
        }
        unknown_field(buf, self.unknown);
    }

    fn release(&self) -> Case {
        let message = pb::ReleaseRequest {
            resource: self.resource.string(),
            token: self.token.string(),
            keep_until: self.time.value(),
            min_hold: self.duration.value(),
        };
        Case::new(
            &message,
            |buf| self.raw(buf),
            &[
                self.resource.resource(),
                self.token.token(false),
                self.time.verdict(),
                self.duration.min_hold(),
            ],
        )
    }

    fn extend(&self) -> Case {
        let message = pb::ExtendRequest {
            resource: self.resource.string(),
            token: self.token.string(),
            ttl: self.duration.value(),
            replace_ttl: self.flag,
        };
        Case::new(
            &message,
            |buf| self.raw(buf),
            &[
                self.resource.resource(),
                self.token.token(false),
                self.duration.ttl(true),
            ],
        )
    }

    fn lease_ref(&self) -> (pb::LeaseRef, Verdict) {
        let verdict = [
            self.resource.resource(),
            self.token.token(false),
            self.duration.ttl(false),
        ]
        .into_iter()
        .max()
        .unwrap_or(Verdict::Valid);
        (
            pb::LeaseRef {
                resource: self.resource.string(),
                token: self.token.string(),
                ttl: self.duration.value(),
            },
            verdict,
        )
    }
}

// ---- Checking an answer -------------------------------------------------------------------

/// Field names a validation message may start with.
const FIELDS: &[&str] = &[
    "resource",
    "ttl",
    "wait_timeout",
    "owner",
    "token",
    "labels",
    "limit",
    "keep_until",
    "min_hold",
    "prefix",
    "page_size",
    "page_token",
    "keep",
];

/// Checks a call's status against the case. `Ok(())` stands for any answer without an error.
fn check(case: &Case, answer: Result<(), (Code, String)>) -> Result<(), TestCaseError> {
    let oversize = case.bytes.len() > MAX_MESSAGE;
    match answer {
        Err((code, message)) => {
            prop_assert!(
                !matches!(code, Code::Internal | Code::Unknown | Code::Unavailable),
                "a server fault ({code:?}: {message}) for {} bytes",
                case.bytes.len()
            );
            if oversize {
                prop_assert_eq!(code, Code::OutOfRange, "{}", message);
                prop_assert!(message.contains("limit is: 1048576"), "{}", message);
                return Ok(());
            }
            if code == Code::InvalidArgument {
                prop_assert!(
                    case.verdict != Verdict::Valid,
                    "a valid request was refused: {}",
                    message
                );
                let names_field = FIELDS.iter().any(|f| message.contains(f));
                prop_assert!(names_field, "the message names no field: {}", message);
            } else {
                prop_assert!(
                    case.verdict != Verdict::Invalid,
                    "an invalid request got {code:?}: {message}"
                );
                // A valid request may find the resource in another mode (semaphore/mutex).
                prop_assert!(
                    matches!(code, Code::FailedPrecondition),
                    "unexpected {code:?}: {message}"
                );
            }
        }
        Ok(()) => {
            prop_assert!(!oversize, "a message over the size limit was accepted");
            prop_assert!(
                case.verdict != Verdict::Invalid,
                "an invalid request was answered (and may have been granted)"
            );
        }
    }
    Ok(())
}

fn status<T>(r: Result<T, tonic::Status>) -> Result<(), (Code, String)> {
    r.map(|_| ())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

/// Runs `cases` generated cases of `strategy` against one lockd.
fn property<S: Strategy>(
    cases: u32,
    strategy: S,
    run: impl Fn(
        &tokio::runtime::Runtime,
        &tonic::transport::Channel,
        S::Value,
    ) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let setup = rt.block_on(Setup::new(Store::Redis));
    let channel = rt.block_on(async {
        tonic::transport::Endpoint::from_shared(setup.lockd.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |value| run(&rt, &channel, value));
    if let Err(e) = result {
        panic!("{e}\nlockd log:\n{}", setup.lockd.log_text());
    }
    // lockd is still alive and serving.
    rt.block_on(async {
        let mut c = setup.client().await;
        assert!(try_acquire(&mut c, "still-serving", 1.0).await.acquired);
    });
}

/// Cases per property; `PROPTEST_CASES` sets more for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64)
}

#[test]
fn acquire_answers_every_bad_field_with_the_right_code() {
    property(cases(), acquire(), |rt, ch, a| {
        let case = a.case();
        let answer = rt.block_on(unary::<pb::AcquireResponse>(
            ch,
            "/lockd.v1.LockService/Acquire",
            case.bytes.clone(),
        ));
        check(&case, status(answer))
    });
}

#[test]
fn release_and_extend_answer_every_bad_field_with_the_right_code() {
    property(cases(), lease_fields(), |rt, ch, f| {
        let case = f.release();
        let answer = rt.block_on(unary::<pb::ReleaseResponse>(
            ch,
            "/lockd.v1.LockService/Release",
            case.bytes.clone(),
        ));
        check(&case, status(answer))?;
        let case = f.extend();
        let answer = rt.block_on(unary::<pb::ExtendResponse>(
            ch,
            "/lockd.v1.LockService/Extend",
            case.bytes.clone(),
        ));
        check(&case, status(answer))
    });
}

#[test]
fn inspection_watch_and_listing_answer_every_bad_field_with_the_right_code() {
    let strategy = (text(), text(), any::<u32>(), text(), any::<bool>());
    property(
        cases(),
        strategy,
        |rt, ch, (resource, prefix, page_size, page_token, unknown)| {
            let raw = |buf: &mut Vec<u8>, fields: &[(&Text, u32)]| {
                for (text, field) in fields {
                    if let Text::NotUtf8 = text {
                        text.encode(buf, *field);
                    }
                }
                unknown_field(buf, unknown);
            };
            for method in [
                "/lockd.v1.LockService/IsLocked",
                "/lockd.v1.LockService/GetOwner",
            ] {
                let message = pb::IsLockedRequest {
                    resource: resource.string(),
                };
                let case = Case::new(
                    &message,
                    |b| raw(b, &[(&resource, 1)]),
                    &[resource.resource()],
                );
                let answer = if method.ends_with("IsLocked") {
                    status(rt.block_on(unary::<pb::IsLockedResponse>(
                        ch,
                        method,
                        case.bytes.clone(),
                    )))
                } else {
                    status(rt.block_on(unary::<pb::GetOwnerResponse>(
                        ch,
                        method,
                        case.bytes.clone(),
                    )))
                };
                check(&case, answer)?;
            }

            // Watch: exactly one of resource and prefix.
            let message = pb::WatchRequest {
                resource: resource.string(),
                prefix: prefix.string(),
            };
            let watch_verdict = match (&resource, &prefix) {
                (Text::Empty, Text::Empty) => Verdict::Invalid,
                (Text::Empty, p) => p.prefix(),
                (r, Text::Empty) => r.resource(),
                _ => Verdict::Invalid,
            };
            let case = Case::new(
                &message,
                |b| raw(b, &[(&resource, 1), (&prefix, 2)]),
                &[watch_verdict],
            );
            let answer = rt.block_on(async {
                let mut grpc = tonic::client::Grpc::new(ch.clone());
                grpc.ready()
                    .await
                    .map_err(|e| tonic::Status::unknown(e.to_string()))?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/lockd.v1.LockService/Watch",
                );
                // The stream opens (headers) or is refused; its events are not needed.
                grpc.server_streaming(
                    tonic::Request::new(case.bytes.clone()),
                    path,
                    Raw::<pb::WatchResponse>::default(),
                )
                .await
                .map(|_| ())
            });
            check(&case, status(answer))?;

            // ListLocks: a page token that ListLocks did not return may be refused.
            let message = pb::ListLocksRequest {
                prefix: prefix.string(),
                page_size: page_size % 2000,
                page_token: page_token.string(),
            };
            let token_verdict = match page_token {
                Text::Empty => Verdict::Valid,
                Text::NotUtf8 | Text::Huge => Verdict::Invalid,
                _ => Verdict::Either,
            };
            let size_verdict = if page_size % 2000 > 1000 {
                Verdict::Invalid
            } else {
                Verdict::Valid
            };
            let case = Case::new(
                &message,
                |b| raw(b, &[(&prefix, 1), (&page_token, 3)]),
                &[prefix.prefix(), token_verdict, size_verdict],
            );
            let answer = rt.block_on(unary::<pb::ListLocksResponse>(
                ch,
                "/lockd.v1.LockService/ListLocks",
                case.bytes.clone(),
            ));
            check(&case, status(answer))
        },
    );
}

#[test]
fn keepalive_answers_every_bad_lease_with_the_right_code() {
    let strategy = (
        prop::collection::vec(lease_fields(), 0..3),
        prop::collection::vec(lease_fields(), 0..2),
        any::<bool>(),
    );
    property(
        cases(),
        strategy,
        |rt, ch, (keep, release, expire_on_close)| {
            let mut verdicts = Vec::new();
            let mut message = pb::KeepAliveRequest {
                expire_on_close,
                ..Default::default()
            };
            let mut raw = Vec::new();
            for (list, fields, number) in [
                (&mut message.keep, &keep, 1),
                (&mut message.release, &release, 2),
            ] {
                for f in fields {
                    let (lease, verdict) = f.lease_ref();
                    verdicts.push(verdict);
                    if matches!(f.resource, Text::NotUtf8) || matches!(f.token, Text::NotUtf8) {
                        // Sent raw: a LeaseRef with the bad bytes, appended to the list.
                        let mut bytes = lease.encode_to_vec();
                        f.raw(&mut bytes);
                        raw.push((number, bytes));
                    } else {
                        list.push(lease);
                    }
                }
            }
            let case = Case::new(
                &message,
                |buf| {
                    for (number, bytes) in &raw {
                        bytes_field(buf, *number, bytes);
                    }
                },
                &verdicts,
            );
            let answer = rt.block_on(stream_once::<pb::KeepAliveResponse>(
                ch,
                "/lockd.v1.LockService/KeepAlive",
                case.bytes.clone(),
            ));
            check(&case, status(answer))
        },
    );
}

#[test]
fn a_session_answers_every_bad_operation_with_the_right_code() {
    let strategy = (prop::option::of(acquire()), any::<u64>(), any::<bool>());
    property(
        cases(),
        strategy,
        |rt, ch, (acquire, request_id, unknown)| {
            // An absent op is a heartbeat; an Acquire op carries the Acquire's fields.
            let mut bytes = Vec::new();
            varint_field(&mut bytes, 1, request_id);
            let inner = acquire.as_ref().map(Acquire::case);
            if let Some(inner) = &inner {
                bytes_field(&mut bytes, 3, &inner.bytes);
            }
            unknown_field(&mut bytes, unknown);
            let case = Case {
                bytes,
                verdict: inner.as_ref().map_or(Verdict::Valid, |c| c.verdict),
            };
            let answer = rt.block_on(stream_once::<pb::SessionResponse>(
                ch,
                "/lockd.v1.LockService/Session",
                case.bytes.clone(),
            ));
            // A Session answers a bad operation in a reply (the stream goes on), and a message it
            // cannot decode with an error that ends the stream.
            let answer = match answer {
                Ok(Some(pb::SessionResponse {
                    reply: Some(pb::session_response::Reply::Error(e)),
                    ..
                })) => Err((Code::from_i32(e.code), e.message)),
                other => status(other),
            };
            check(&case, answer)
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_message_is_an_absent_request_and_is_refused_naming_the_field() {
    let s = Setup::new(Store::Memory).await;
    let channel = tonic::transport::Endpoint::from_shared(s.lockd.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = unary::<pb::AcquireResponse>(&channel, "/lockd.v1.LockService/Acquire", vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("resource:"), "{}", err.message());
    let err = unary::<pb::ExtendResponse>(
        &channel,
        "/lockd.v1.LockService/Extend",
        pb::ExtendRequest {
            resource: "r".into(),
            token: "t".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await
    .unwrap_err();
    assert!(err.message().starts_with("ttl:"), "{}", err.message());
    // Not protobuf at all.
    let err =
        unary::<pb::AcquireResponse>(&channel, "/lockd.v1.LockService/Acquire", vec![0xff; 64])
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}
