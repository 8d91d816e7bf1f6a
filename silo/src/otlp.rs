//! OpenTelemetry traces, exported over OTLP/HTTP in its JSON encoding (feature `otlp`, setting
//! `otlp_endpoint`, e.g. `http://127.0.0.1:4318`).
//!
//! Every turn is a span (`Cart.add`, kind server, with the grain id and the silo), and so is every call a
//! [`crate::Client`] makes (kind client) and every HTTP grain call (kind server). The trace context travels in
//! the call's request metadata under the W3C key `traceparent`: a turn takes the caller's as its parent and
//! puts its own in the metadata it runs under, which every call it makes carries on (in-process, and across
//! silos in the envelope), so one trace holds a whole call chain across silos. A call that arrives without a
//! `traceparent` starts a trace; an HTTP call may bring one (the `traceparent` header).
//!
//! Each silo with an endpoint also posts its metrics to `{otlp_endpoint}/v1/metrics` every
//! `otlp_metrics_interval` (default 10 s): per grain type and method the call-duration histogram (the same
//! buckets as `/metrics`, cumulative) and the error count, storage-operation durations, activations by type,
//! and queued calls, each point labelled with the silo.
//!
//! Spans are queued (at most 8192; past that they are dropped and counted) and posted in batches of up to 512,
//! at least once a second, to `{otlp_endpoint}/v1/traces` over plain HTTP/1.1. One exporter serves the process:
//! the first silo (or client) that starts with an endpoint installs it. Without an endpoint nothing is
//! recorded, and a turn pays one atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grains::__private::runtime::Call;
use grains::RequestMetadata;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The request metadata key of the W3C trace context.
pub(crate) const TRACEPARENT: &str = "traceparent";

const QUEUE: usize = 8192;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Span kinds, as OTLP numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Serving a call (a turn, an HTTP request).
    Server = 2,
    /// Making a call.
    Client = 3,
}

/// A W3C trace context: trace id, span id, sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SpanContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Reads `00-<trace id>-<span id>-<flags>`; `None` for anything else, or all-zero ids.
fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.trim().split('-');
    let (version, trace, span, _flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() {
        return None;
    }
    let context = SpanContext { trace_id: unhex(trace)?, span_id: unhex(span)? };
    (context.trace_id != [0; 16] && context.span_id != [0; 8]).then_some(context)
}

fn format_traceparent(context: &SpanContext) -> String {
    format!("00-{}-{}-01", hex(&context.trace_id), hex(&context.span_id))
}

/// A fresh non-zero id: splitmix64 over a counter seeded from the clock and the process id.
fn random_u64() -> u64 {
    static STATE: OnceLock<AtomicU64> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        AtomicU64::new(now ^ (u64::from(std::process::id()) << 32))
    });
    let mut z = state.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The process's exporter.
struct Exporter {
    queue: mpsc::Sender<Value>,
    dropped: AtomicU64,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Whether spans are being exported.
pub(crate) fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Starts exporting spans to `endpoint` (`http://host:port`, or a full `.../v1/traces` URL), unless this process
/// already exports. Must run inside a tokio runtime.
pub(crate) fn install(endpoint: &str, service: &str) -> Result<(), String> {
    if EXPORTER.get().is_some() {
        return Ok(());
    }
    let target = Target::parse(endpoint)?;
    let (queue, spans) = mpsc::channel(QUEUE);
    if EXPORTER.set(Exporter { queue, dropped: AtomicU64::new(0) }).is_ok() {
        tokio::spawn(export(target, service.to_owned(), spans));
        tracing::info!(endpoint, "exporting traces over OTLP/HTTP");
    }
    Ok(())
}

/// Where spans are posted.
#[derive(Debug, Clone)]
struct Target {
    host_port: String,
    path: String,
}

/// Posts `silo`'s metrics to `endpoint` every `interval`, for as long as the silo runs.
pub(crate) fn start_metrics(
    silo: std::sync::Weak<crate::silo::SiloInner>,
    endpoint: &str,
    interval: Duration,
) -> Result<(), String> {
    let traces = Target::parse(endpoint)?;
    let target = Target { path: traces.path.trim_end_matches("/v1/traces").to_owned() + "/v1/metrics", ..traces };
    let started = unix_nanos();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let body = {
                let Some(silo) = silo.upgrade() else { return };
                if silo.is_stopped() {
                    return;
                }
                metrics_body(&crate::stats::local(&silo), started)
            };
            if let Err(error) = post(&target, body.to_string().as_bytes()).await {
                tracing::warn!(%error, "could not export metrics over OTLP");
            }
        }
    });
    Ok(())
}

/// One silo's metrics as an OTLP/JSON `ExportMetricsServiceRequest`.
fn metrics_body(stats: &crate::stats::SiloStats, start: u64) -> Value {
    use crate::metrics::{BUCKETS, HistogramSnapshot, bucket_upper};
    let now = unix_nanos().to_string();
    let start = start.to_string();
    // Explicit bounds at each power of two from 1.024 µs to 34 s, in seconds, as in the Prometheus output.
    let bounds: Vec<f64> = (10..=35u32).map(|p| (1u64 << p) as f64 / 1e9).collect();
    let histogram_point = |histogram: &HistogramSnapshot, attributes: Vec<Value>| {
        let mut counts = vec![0u64; bounds.len() + 1];
        for &(i, n) in &histogram.buckets {
            let upper = bucket_upper(usize::from(i).min(BUCKETS - 1)) as f64 / 1e9;
            let slot = bounds.iter().position(|b| upper <= *b).unwrap_or(bounds.len());
            counts[slot] += n;
        }
        json!({
            "attributes": attributes,
            "startTimeUnixNano": start, "timeUnixNano": now,
            "count": histogram.count.to_string(),
            "sum": histogram.sum_nanos as f64 / 1e9,
            "bucketCounts": counts.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "explicitBounds": bounds,
        })
    };
    let method_attributes = |m: &crate::metrics::MethodSnapshot| {
        vec![attribute("grain_type", &m.grain_type), attribute("method", &m.method)]
    };
    let durations: Vec<Value> =
        stats.methods.iter().map(|m| histogram_point(&m.latency, method_attributes(m))).collect();
    let errors: Vec<Value> = stats
        .methods
        .iter()
        .map(|m| json!({ "attributes": method_attributes(m), "startTimeUnixNano": start, "timeUnixNano": now, "asInt": m.errors.to_string() }))
        .collect();
    let storage: Vec<Value> =
        [("read", &stats.storage.read), ("write", &stats.storage.write), ("clear", &stats.storage.clear)]
            .into_iter()
            .map(|(op, h)| histogram_point(h, vec![attribute("op", op)]))
            .collect();
    let activations: Vec<Value> = stats
        .activations_by_type
        .iter()
        .map(
            |(t, n)| json!({ "attributes": [attribute("grain_type", t)], "timeUnixNano": now, "asInt": n.to_string() }),
        )
        .collect();
    json!({
        "resourceMetrics": [{
            "resource": { "attributes": [attribute("service.name", "grains-silo"), attribute("grains.silo", &stats.silo)] },
            "scopeMetrics": [{
                "scope": { "name": "grains" },
                "metrics": [
                    { "name": "grains.grain.call.duration", "unit": "s",
                      "description": "Time a call's turn took, by grain type and method.",
                      "histogram": { "aggregationTemporality": 2, "dataPoints": durations } },
                    { "name": "grains.grain.errors", "unit": "1",
                      "description": "Calls that ended in a call error or the method's own Err.",
                      "sum": { "aggregationTemporality": 2, "isMonotonic": true, "dataPoints": errors } },
                    { "name": "grains.storage.duration", "unit": "s",
                      "description": "Latency of grain-state operations.",
                      "histogram": { "aggregationTemporality": 2, "dataPoints": storage } },
                    { "name": "grains.activations", "unit": "1", "description": "Activations by grain type.",
                      "gauge": { "dataPoints": activations } },
                    { "name": "grains.mailbox.queued", "unit": "1", "description": "Calls waiting in mailboxes.",
                      "gauge": { "dataPoints": [{ "timeUnixNano": now, "asInt": stats.mailbox_queued.to_string() }] } },
                ],
            }],
        }]
    })
}

impl Target {
    fn parse(endpoint: &str) -> Result<Self, String> {
        let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
            format!("otlp_endpoint must be an http:// URL (OTLP/HTTP without TLS, e.g. a local collector): {endpoint}")
        })?;
        let (host_port, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = match path.trim_end_matches('/') {
            "" => "/v1/traces".to_owned(),
            p if p.ends_with("/v1/traces") => p.to_owned(),
            p => format!("{p}/v1/traces"),
        };
        if host_port.is_empty() {
            return Err(format!("otlp_endpoint has no host: {endpoint}"));
        }
        Ok(Target { host_port: host_port.to_owned(), path })
    }
}

/// Batches spans and posts them.
async fn export(target: Target, service: String, mut spans: mpsc::Receiver<Value>) {
    loop {
        let Some(first) = spans.recv().await else { return };
        let mut batch = vec![first];
        let flush_at = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(flush_at, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let body = json!({
            "resourceSpans": [{
                "resource": { "attributes": [attribute("service.name", &service)] },
                "scopeSpans": [{ "scope": { "name": "grains" }, "spans": batch }],
            }]
        });
        if let Err(error) = post(&target, body.to_string().as_bytes()).await {
            tracing::warn!(%error, spans = batch.len(), "could not export spans over OTLP");
        }
    }
}

/// Posts one JSON body and checks for a 2xx answer.
async fn post(target: &Target, body: &[u8]) -> Result<(), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&target.host_port).await.map_err(|e| e.to_string())?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            target.path,
            target.host_port,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
        stream.write_all(body).await.map_err(|e| e.to_string())?;
        let mut status = [0u8; 12];
        stream.read_exact(&mut status).await.map_err(|e| e.to_string())?;
        match &status[9..10] {
            b"2" => Ok(()),
            _ => Err(format!("the collector answered {}", String::from_utf8_lossy(&status))),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| "timed out".to_owned())?
}

fn attribute(key: &str, value: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": value } })
}

/// A span being timed; exported when ended.
#[derive(Debug)]
pub(crate) struct ActiveSpan {
    context: SpanContext,
    parent: Option<[u8; 8]>,
    name: String,
    kind: Kind,
    start: u64,
    attributes: Vec<(&'static str, String)>,
}

/// Starts a span named `name` whose parent is the `traceparent` in `metadata` (a new trace if there is none),
/// and returns `metadata` carrying the new span as the context of whatever runs under it. `None` (and the
/// metadata unchanged) when no exporter is installed.
pub(crate) fn start(
    name: impl FnOnce() -> String,
    kind: Kind,
    metadata: RequestMetadata,
    attributes: impl FnOnce() -> Vec<(&'static str, String)>,
) -> (RequestMetadata, Option<ActiveSpan>) {
    if !enabled() {
        return (metadata, None);
    }
    let parent = metadata.get(TRACEPARENT).and_then(parse_traceparent);
    let trace_id = match parent {
        Some(parent) => parent.trace_id,
        None => {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&random_u64().to_be_bytes());
            id[8..].copy_from_slice(&random_u64().to_be_bytes());
            id
        }
    };
    let context = SpanContext { trace_id, span_id: random_u64().to_be_bytes() };
    let span = ActiveSpan {
        context,
        parent: parent.map(|p| p.span_id),
        name: name(),
        kind,
        start: unix_nanos(),
        attributes: attributes(),
    };
    (metadata.with(TRACEPARENT, format_traceparent(&context)), Some(span))
}

/// Starts a client span for `call` (see [`start`]), putting its context in the call's metadata.
pub(crate) fn start_call(call: &mut Call, kind: Kind) -> Option<ActiveSpan> {
    if !enabled() {
        return None;
    }
    let metadata = std::mem::take(&mut call.metadata);
    let (target, method) = (&call.target, &call.method);
    let (metadata, span) = start(
        || format!("{}.{method}", target.grain_type()),
        kind,
        metadata,
        || vec![("grains.grain", target.to_string()), ("rpc.method", method.to_string())],
    );
    call.metadata = metadata;
    span
}

impl ActiveSpan {
    /// Ends the span, with `error` if the work failed, and queues it for export.
    pub(crate) fn end(self, error: Option<String>) {
        let Some(exporter) = EXPORTER.get() else { return };
        let mut span = json!({
            "traceId": hex(&self.context.trace_id),
            "spanId": hex(&self.context.span_id),
            "name": self.name,
            "kind": self.kind as u8,
            "startTimeUnixNano": self.start.to_string(),
            "endTimeUnixNano": unix_nanos().max(self.start).to_string(),
            "attributes": self.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
            "status": match &error {
                Some(message) => json!({ "code": 2, "message": message }),
                None => json!({ "code": 1 }),
            },
        });
        if let Some(parent) = self.parent {
            span["parentSpanId"] = Value::String(hex(&parent));
        }
        if exporter.queue.try_send(span).is_err() && exporter.dropped.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
            tracing::warn!("the OTLP export queue is full; spans are being dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_written() {
        let context = SpanContext { trace_id: [7; 16], span_id: [9; 8] };
        let text = format_traceparent(&context);
        assert_eq!(text, "00-07070707070707070707070707070707-0909090909090909-01");
        assert_eq!(parse_traceparent(&text), Some(context));
        for bad in ["", "00-0707-0909-01", "01-07070707070707070707070707070707-0909090909090909-01", "garbage"] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        assert_eq!(parse_traceparent("00-00000000000000000000000000000000-0909090909090909-01"), None);
    }

    #[test]
    fn endpoints_are_read_as_otlp_http_urls() {
        let t = Target::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!((t.host_port.as_str(), t.path.as_str()), ("127.0.0.1:4318", "/v1/traces"));
        assert_eq!(Target::parse("http://c:4318/otlp/").unwrap().path, "/otlp/v1/traces");
        assert_eq!(Target::parse("http://c:4318/v1/traces").unwrap().path, "/v1/traces");
        assert!(Target::parse("https://c:4318").is_err() && Target::parse("http://").is_err());
    }

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let ids: std::collections::HashSet<u64> = (0..10_000).map(|_| random_u64()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(!ids.contains(&0));
    }
}
