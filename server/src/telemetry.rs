//! Logs and traces: tracing to stderr, filtered by `RUST_LOG` (default `info`), as text or
//! JSON, with ANSI colour only when stderr is a terminal; each RPC a span (see [`RpcLayer`]),
//! exported over OTLP when built with the `otlp` feature and given `--otlp-endpoint`.
//!
//! The RPC span is at `debug` level (target `lockd::rpc`): with the default `info` filter and no
//! OTLP export it is never created, so the default path pays one level check per RPC. The lock
//! core records the span's `resource`, `outcome` and `fencing_token` (never the lock token).

use std::future::Future;
use std::io::IsTerminal as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

use crate::config::{Config, Level, LogFormat};
use crate::metrics;

/// Whether lock decisions are logged at `debug` (`--log-decisions debug`) instead of `info`.
static DECISIONS_AT_DEBUG: AtomicBool = AtomicBool::new(false);

/// True when lock decisions are logged at `debug` (see [`decision!`](crate::decision)).
pub fn decisions_at_debug() -> bool {
    DECISIONS_AT_DEBUG.load(Ordering::Relaxed)
}

/// Logs one lock decision (an acquire, release or extend outcome): at `info`, or at `debug`
/// with `--log-decisions debug`, so that a busy lockd's `info` log keeps only state changes.
#[macro_export]
macro_rules! decision {
    ($($arg:tt)+) => {
        if $crate::telemetry::decisions_at_debug() {
            ::tracing::debug!($($arg)+)
        } else {
            ::tracing::info!($($arg)+)
        }
    };
}

/// Keeps the trace exporter alive; dropping it flushes the spans not exported yet.
#[must_use = "dropping the guard stops the trace export"]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            // At exit: a collector that is gone only loses these last spans.
            let _ = provider.shutdown();
        }
    }
}

type BoxLayer = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;

/// The log lines' layer: text or JSON on stderr, colour only on a terminal.
fn log_layer(format: LogFormat, ansi: bool) -> BoxLayer {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_filter(filter).boxed(),
    }
}

/// Installs the global subscriber. Call once, from `main`, inside the runtime (the OTLP
/// exporter's gRPC channel needs it).
///
/// # Errors
/// When the OTLP exporter cannot be built (an invalid endpoint).
pub fn init(config: &Config) -> Result<Guard, String> {
    DECISIONS_AT_DEBUG.store(config.log_decisions == Level::Debug, Ordering::Relaxed);
    let logs = log_layer(config.log_format, std::io::stderr().is_terminal());
    #[cfg(feature = "otlp")]
    if let Some(endpoint) = &config.otlp_endpoint {
        let (layer, provider) = otlp::layer(endpoint)?;
        tracing_subscriber::registry()
            .with(vec![logs, layer])
            .init();
        tracing::info!(%endpoint, "exporting traces over OTLP");
        return Ok(Guard {
            provider: Some(provider),
        });
    }
    tracing_subscriber::registry().with(logs).init();
    Ok(Guard {
        #[cfg(feature = "otlp")]
        provider: None,
    })
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tonic::codegen::http::HeaderMap;
    use tracing::Level;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::Targets;

    use super::BoxLayer;

    /// The layer that turns the RPC spans (and the lock decisions in them) into OTLP spans.
    pub(super) fn layer(endpoint: &str) -> Result<(BoxLayer, SdkTracerProvider), String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("LOCKD_OTLP_ENDPOINT (--otlp-endpoint) {endpoint}: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("lockd")
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("lockd");
        let targets = Targets::new()
            .with_target("lockd", Level::INFO)
            .with_target("lockd::rpc", Level::DEBUG);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(targets)
            .boxed();
        Ok((layer, provider))
    }

    struct Headers<'a>(&'a HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }

    /// Makes the caller's trace (W3C `traceparent`) the span's parent.
    pub(super) fn set_parent(span: &tracing::Span, headers: &HeaderMap) {
        let cx = TraceContextPropagator::new().extract(&Headers(headers));
        // Fails only without the OpenTelemetry layer (export off): nothing to link then.
        let _ = span.set_parent(cx);
    }
}

/// The trace id of a W3C `traceparent` value (`00-<trace id>-<parent id>-<flags>`), if valid.
fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    valid.then_some(trace)
}

/// The `method` label of a request path: the RPC's name for lockd's own service, the full
/// path for health checks, and a fixed word for anything else (paths come from the network, so
/// they never become labels as they are).
fn method_label(path: &str) -> &'static str {
    const LOCKD: [&str; 9] = [
        "Acquire",
        "Release",
        "Extend",
        "IsLocked",
        "GetOwner",
        "KeepAlive",
        "Session",
        "Watch",
        "ListLocks",
    ];
    if let Some(name) = path.strip_prefix("/lockd.v1.LockService/") {
        return LOCKD
            .iter()
            .find(|m| **m == name)
            .copied()
            .unwrap_or("unknown");
    }
    match path {
        "/grpc.health.v1.Health/Check" => "grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch" => "grpc.health.v1.Health/Watch",
        p if p.starts_with("/grpc.reflection.") => "reflection",
        _ => "unknown",
    }
}

/// The gRPC status code's name, from a response's headers: an error answered at once carries
/// it there; a success (and a stream's later end) carries it in the trailers, so no code there
/// means the call (or the stream) started well.
fn code_of(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .map_or(tonic::Code::Ok, |v| tonic::Code::from_bytes(v.as_bytes()))
}

/// The label value of a status code, as gRPC names it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A tower layer around every gRPC service: counts each RPC by method and status code, times
/// it, and runs it in a span that continues the caller's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Rpc<S> {
        Rpc { inner }
    }
}

/// The service [`RpcLayer`] wraps around another.
#[derive(Debug, Clone)]
pub struct Rpc<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Rpc<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let span = tracing::debug_span!(
            target: "lockd::rpc",
            "rpc",
            otel.name = request.uri().path().trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            resource = tracing::field::Empty,
            outcome = tracing::field::Empty,
            fencing_token = tracing::field::Empty,
            // The caller's API key by name (never the key), when lockd has an auth file.
            api_key = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let traceparent = request.headers().get("traceparent");
            if let Some(id) = traceparent.and_then(|v| trace_id(v.to_str().ok()?)) {
                span.record("trace_id", id);
            }
            #[cfg(feature = "otlp")]
            otlp::set_parent(&span, request.headers());
        }
        let started = Instant::now();
        let call = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => code_of(response.headers()),
                Err(_) => tonic::Code::Unknown,
            };
            span.record("rpc.grpc.status_code", code as i32);
            metrics::rpc(method, code_name(code), started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_gives_its_trace_id() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{id}-00f067aa0ba902b7-01")), Some(id));
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("00-4bf92f35-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id("garbage"), None);
    }

    #[test]
    fn only_known_paths_become_method_labels() {
        assert_eq!(method_label("/lockd.v1.LockService/Acquire"), "Acquire");
        assert_eq!(method_label("/lockd.v1.LockService/Nope"), "unknown");
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/evil/∞"), "unknown");
    }

    #[test]
    fn every_lockd_method_is_a_known_label() {
        use prost::Message as _;
        let set =
            prost_types::FileDescriptorSet::decode(lockd_proto::v1::FILE_DESCRIPTOR_SET).unwrap();
        let service = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .find(|s| s.name() == "LockService")
            .unwrap();
        for m in &service.method {
            let path = format!("/lockd.v1.LockService/{}", m.name());
            assert_eq!(method_label(&path), m.name());
        }
    }
}
