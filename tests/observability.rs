//! Observability (issue 12): the metrics a running lockd exports cover the alert rules and the
//! dashboard in deploy/, resource names stay out of labels, piped logs carry no colour, and a
//! traced request reaches an OTLP receiver as a span of the caller's trace.

use std::collections::BTreeSet;
use std::time::Duration;

use lockd_client::proto::{KeepAliveRequest, LeaseRef, LeaseStatus, WatchRequest};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::*;

/// The body of `GET /metrics`.
async fn scrape(port: u16) -> String {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "{reply}"
    );
    reply.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The metric names in a Prometheus text exposition, histograms under their base name too.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap().to_owned();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                names.insert(base.to_owned());
            }
        }
        names.insert(name);
    }
    names
}

/// Every `lockd_*` metric name a file of deploy/ uses.
fn names_used_in(path: &str) -> BTreeSet<String> {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    let text = std::fs::read_to_string(&file).unwrap();
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("lockd_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Prose such as "lockd_*" names no metric.
        if !tail[..end].ends_with('_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    assert!(!names.is_empty(), "no lockd_ metric in {path}");
    names
}

#[tokio::test]
async fn a_running_lockd_exports_every_metric_of_the_alert_rules_and_the_dashboard() {
    let redis = RedisServer::start().await;
    let metrics_port = free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let lockd = Lockd::start_with(
        Some(&redis),
        &[
            ("LOCKD_METRICS_LISTEN", listen.as_str()),
            ("LOCKD_METRICS_RESOURCE_PREFIXES", "nightly-,report-"),
        ],
    )
    .await;
    let mut c = lockd.client().await;

    // A workload that touches every metric: a grant, a contended acquire, a wait that times
    // out, an extend, a release, a hand-off to a waiter, a lease left to expire, open streams.
    let lease = acquire_ok(&mut c, "nightly-secret-job-name", 30.0).await;
    assert!(
        !try_acquire(&mut c, "nightly-secret-job-name", 30.0)
            .await
            .acquired
    );
    assert!(
        !wait_acquire(&mut c, "nightly-secret-job-name", 30.0, 0.05)
            .await
            .acquired
    );
    extend(&mut c, &lease, 30.0, true).await;
    let mut waiter = c.clone();
    let handed = tokio::spawn(async move {
        wait_acquire(&mut waiter, "nightly-secret-job-name", 30.0, 10.0).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    release(&mut c, &lease).await;
    let handed = handed.await.unwrap();
    assert!(handed.acquired);
    release(&mut c, &handed.lease.unwrap()).await;
    acquire_ok(&mut c, "user-4711-unbounded", 0.2).await;
    let _watch = c
        .watch(WatchRequest {
            prefix: "nightly-".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A KeepAlive stream keeps a lease that a Release then frees: its next heartbeat loses it.
    let (keepalive_tx, keepalive_rx) = tokio::sync::mpsc::channel::<KeepAliveRequest>(1);
    let mut keepalive = c
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(keepalive_rx))
        .await
        .unwrap()
        .into_inner();
    let kept = acquire_ok(&mut c, "report-kept", 30.0).await;
    let heartbeat = KeepAliveRequest {
        keep: vec![LeaseRef {
            resource: kept.resource.clone(),
            token: kept.token.clone(),
            ttl: Some(secs(30.0)),
        }],
        ..Default::default()
    };
    keepalive_tx.send(heartbeat.clone()).await.unwrap();
    keepalive.message().await.unwrap().unwrap();
    release(&mut c, &kept).await;
    keepalive_tx.send(heartbeat).await.unwrap();
    let lost = keepalive.message().await.unwrap().unwrap();
    assert_ne!(lost.leases[0].status, LeaseStatus::Ok as i32, "{lost:?}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(metrics_port).await;
        if text.contains("lockd_leases_expired_total{prefix=\"\"} 1")
            && text.contains("lockd_open_streams{kind=\"keepalive\"} 1")
            && text.contains("lockd_leases_lost_total{stream=\"keepalive\"} 1")
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expiry and the streams are not counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let exported = exported_names(&text);
    for path in ["deploy/prometheus/alerts.yml", "deploy/grafana/lockd.json"] {
        let missing: Vec<_> = names_used_in(path).difference(&exported).cloned().collect();
        assert!(
            missing.is_empty(),
            "{path} uses {missing:?}, not exported:\n{text}"
        );
    }
    let missing: Vec<_> = lockd::metrics::ALL
        .iter()
        .filter(|n| !exported.contains(**n))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");

    // Resource names and tokens never become labels; an opted-in prefix does. The default
    // owner (the client's address) is counted by host.
    assert!(
        text.contains("lockd_contended_acquires_total{owner=\"127.0.0.1\",prefix=\"nightly-\"} 2"),
        "{text}"
    );
    // Resource names and tokens never become labels; an opted-in prefix does.
    assert!(
        !text.contains("secret-job-name") && !text.contains("user-4711"),
        "{text}"
    );
    assert!(!text.contains(&lease.token), "{text}");
    assert!(
        text.contains(
            "lockd_acquires_total{outcome=\"acquired_after_wait\",prefix=\"nightly-\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("lockd_acquires_total{outcome=\"wait_timeout\",prefix=\"nightly-\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("lockd_lock_hold_seconds_count{ended=\"released\",prefix=\"nightly-\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_are_not_served_unless_asked_for() {
    let lockd = Lockd::start(None).await;
    let log = lockd.log_text();
    assert!(!log.contains("/metrics"), "{log}");
}

#[tokio::test]
async fn decisions_logged_at_debug_leave_only_state_changes_at_info() {
    let lockd = Lockd::start_with(None, &[("LOCKD_LOG_DECISIONS", "debug")]).await;
    let mut c = lockd.client().await;
    let lease = acquire_ok(&mut c, "quiet-logs", 5.0).await;
    release(&mut c, &lease).await;
    let log = lockd.log_text();
    assert!(log.contains("lockd listening"), "{log}");
    assert!(
        !log.contains("quiet-logs"),
        "a decision logged at info:\n{log}"
    );
}

#[tokio::test]
async fn logs_piped_to_a_file_carry_no_colour_codes() {
    let lockd = Lockd::start(None).await;
    let mut c = lockd.client().await;
    acquire_ok(&mut c, "plain-logs", 5.0).await;
    let log = lockd.log_text();
    assert!(log.contains("acquire"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a piped log:\n{log:?}"
    );
}

#[tokio::test]
async fn a_traced_acquire_reaches_the_otlp_receiver_as_a_span_of_the_callers_trace() {
    #[cfg(not(feature = "otlp"))]
    panic!(
        "this test needs lockd built with OTLP export: \
         cargo test -p lockd --features otlp --test e2e observability"
    );
    #[cfg(feature = "otlp")]
    traced::acquire_arrives_as_a_span().await;
}

#[tokio::test]
async fn the_rust_clients_calls_join_the_applications_opentelemetry_trace() {
    #[cfg(not(feature = "otlp"))]
    panic!(
        "this test needs lockd built with OTLP export: \
         cargo test -p lockd --features otlp --test e2e observability"
    );
    #[cfg(feature = "otlp")]
    traced::client_call_joins_the_applications_trace().await;
}

/// Needs the `otlp` feature (scripts/test turns it on).
#[cfg(feature = "otlp")]
mod traced {
    use super::*;

    /// The trace id of the caller's W3C traceparent.
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    pub(super) async fn acquire_arrives_as_a_span() {
        let receiver = crate::support::otlp::OtlpReceiver::start().await;
        let endpoint = receiver.endpoint();
        let mut lockd = Lockd::start_with(
            None,
            &[
                ("LOCKD_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
        .await;
        let mut raw = lockd_client::proto::LockServiceClient::connect(lockd.endpoint())
            .await
            .unwrap();
        let mut request = tonic::Request::new(acquire_req("traced-job", 30.0));
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
                .parse()
                .unwrap(),
        );
        let lease = raw
            .acquire(request)
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (spans, span) = loop {
            let spans = receiver.spans();
            if let Some(span) = spans.iter().find(|s| hex(&s.trace_id) == TRACE_ID) {
                break (spans.clone(), span.clone());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no span of trace {TRACE_ID} arrived; lockd's log:\n{}",
                lockd.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(span.name, "lockd.v1.LockService/Acquire");
        assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
        let attr = |k| crate::support::otlp::attribute(&span, k);
        assert_eq!(attr("resource").as_deref(), Some("traced-job"));
        assert_eq!(attr("outcome").as_deref(), Some("acquired"));
        assert_eq!(attr("fencing_token"), Some(lease.fencing_token.to_string()));
        // The lock token appears nowhere in what was exported.
        let everything = format!("{spans:?}");
        assert!(!everything.contains(&lease.token), "{everything}");
        assert!(lockd.terminate(Duration::from_secs(10)).await);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// An application that traces with OpenTelemetry: the client's calls join its trace.
    pub(super) async fn client_call_joins_the_applications_trace() {
        use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
        use tracing::Instrument as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        use tracing_subscriber::layer::SubscriberExt as _;

        let receiver = crate::support::otlp::OtlpReceiver::start().await;
        let endpoint = receiver.endpoint();
        let lockd = Lockd::start_with(
            None,
            &[
                ("LOCKD_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
        .await;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let app = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("app")));
        let _app = tracing::subscriber::set_default(app);
        let job = tracing::info_span!("nightly job");
        let trace_id = job.context().span().span_context().trace_id().to_string();
        let client = lockd_client::LockClient::builder(lockd.endpoint())
            .sessions(false)
            .connect()
            .await
            .unwrap();
        let attempt = client
            .try_lock("client-traced", Duration::from_secs(30))
            .instrument(job)
            .await
            .unwrap();
        assert!(matches!(attempt, lockd_client::TryLock::Acquired(_)));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !receiver
            .spans()
            .iter()
            .any(|s| hex(&s.trace_id) == trace_id && s.name == "lockd.v1.LockService/Acquire")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no Acquire span of the application's trace {trace_id}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
