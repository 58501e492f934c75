//! Trace propagation (the `otel` feature): a call made inside a traced span carries that
//! span's context as W3C `traceparent` metadata, so lockd's span of the call joins the trace.
//!
//! The context is the current `tracing` span's (through `tracing-opentelemetry`), or else
//! OpenTelemetry's current context, for applications that use its API directly.

use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use tonic::metadata::{MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The current span's context, if there is a valid one.
fn current() -> Option<SpanContext> {
    let from_tracing = tracing::Span::current().context();
    let from_tracing = from_tracing.span().span_context().clone();
    if from_tracing.is_valid() {
        return Some(from_tracing);
    }
    let from_otel = opentelemetry::Context::current()
        .span()
        .span_context()
        .clone();
    from_otel.is_valid().then_some(from_otel)
}

/// Adds `traceparent` (and `tracestate`, when set) for the current span, if any.
pub(crate) fn inject(metadata: &mut MetadataMap) {
    let Some(cx) = current() else { return };
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    );
    if let Ok(v) = MetadataValue::try_from(traceparent) {
        metadata.insert("traceparent", v);
    }
    let state = cx.trace_state().header();
    if !state.is_empty()
        && let Ok(v) = MetadataValue::try_from(state)
    {
        metadata.insert("tracestate", v);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn a_call_outside_any_trace_carries_no_traceparent() {
        let mut m = MetadataMap::new();
        inject(&mut m);
        assert!(m.get("traceparent").is_none());
    }

    #[test]
    fn a_call_inside_an_opentelemetry_context_carries_its_traceparent() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _attached = opentelemetry::Context::current()
            .with_remote_span_context(sc)
            .attach();
        let mut m = MetadataMap::new();
        inject(&mut m);
        assert_eq!(
            m.get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }
}
