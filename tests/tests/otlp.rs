//! Traces over OTLP: a call chain across two silos reaches an in-process OTLP/HTTP collector as one trace, each
//! span the child of the one that made its call (client → turn on one silo → turn on another), and an HTTP call
//! continues the trace its caller sent in `traceparent`. Each silo's metrics reach the collector too.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grains::GrainId;
use grains_examples::Cart;
use grains_silo::{Client, SiloConfig};
use grains_tests::http_client::request;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Kept = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP collector (JSON encoding) that keeps every span and every metrics export it is sent.
async fn collector() -> (SocketAddr, Kept, Kept) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let metrics = Arc::new(Mutex::new(Vec::new()));
    let (kept, kept_metrics) = (spans.clone(), metrics.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let (kept, kept_metrics) = (kept.clone(), kept_metrics.clone());
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 65536];
                let (is_metrics, body) = loop {
                    let Ok(n) = stream.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                    let is_metrics = head.starts_with("post /v1/metrics ");
                    assert!(is_metrics || head.starts_with("post /v1/traces "), "{head}");
                    assert!(head.contains("content-type: application/json"), "{head}");
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap();
                    if raw.len() >= end + 4 + length {
                        break (is_metrics, raw[end + 4..end + 4 + length].to_vec());
                    }
                };
                let export: Value = serde_json::from_slice(&body).unwrap();
                if is_metrics {
                    kept_metrics.lock().unwrap().push(export);
                    let _ =
                        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").await;
                    return;
                }
                for resource in export["resourceSpans"].as_array().unwrap() {
                    let service = &resource["resource"]["attributes"][0];
                    assert_eq!(
                        (service["key"].as_str(), service["value"]["stringValue"].as_str()),
                        (Some("service.name"), Some("grains-silo"))
                    );
                    for scope in resource["scopeSpans"].as_array().unwrap() {
                        kept.lock().unwrap().extend(scope["spans"].as_array().unwrap().iter().cloned());
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").await;
            });
        }
    });
    (addr, spans, metrics)
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["attributes"].as_array()?.iter().find(|a| a["key"] == key)?["value"]["stringValue"].as_str()
}

/// Waits (up to 10 s) for a span that `matches`.
async fn span_where(spans: &Arc<Mutex<Vec<Value>>>, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(span) = spans.lock().unwrap().iter().find(|s| matches(s)) {
            return span.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no span {what} reached the collector");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_chain_across_two_silos_is_one_trace_of_linked_spans() {
    grains_examples::link();
    let (collector, spans, metrics) = collector().await;
    let endpoint = format!("http://{collector}");
    let silos = grains_tests::start_cluster_with(3, |c| SiloConfig {
        otlp_endpoint: Some(endpoint.clone()),
        otlp_metrics_interval: Duration::from_millis(200),
        ..c
    })
    .await;
    let client = Client::connect(&format!("http://{}", silos[0].gateway_addr().unwrap())).await.unwrap();

    // Carts land on all three silos; the one catalog they ask for prices lives on one of them.
    for i in 0..12 {
        client.grain::<Cart>(format!("warm-{i}")).add("apple".into(), 1).await.unwrap().unwrap();
    }
    let host = |id: &GrainId| silos.iter().position(|s| s.is_active(id)).unwrap();
    let catalog_silo = host(&GrainId::new("Catalog", "default"));
    let key =
        (0..12).map(|i| format!("warm-{i}")).find(|k| host(&GrainId::new("Cart", k.as_str())) != catalog_silo).unwrap();
    let cart_silo = host(&GrainId::new("Cart", key.as_str()));
    spans.lock().unwrap().clear();

    client.grain::<Cart>(key.clone()).add("milk".into(), 2).await.unwrap().unwrap();
    let grain = format!("Cart/{key}");
    let call =
        span_where(&spans, "client Cart.add", |s| s["kind"] == 3 && attribute(s, "grains.grain") == Some(&grain)).await;
    let trace = call["traceId"].as_str().unwrap().to_owned();
    assert_eq!(trace.len(), 32);
    assert!(call.get("parentSpanId").is_none(), "the client's call starts the trace: {call}");
    let turn = span_where(&spans, "turn Cart.add", |s| {
        s["kind"] == 2 && s["name"] == "Cart.add" && s["traceId"] == trace.as_str()
    })
    .await;
    assert_eq!(turn["parentSpanId"], call["spanId"], "the turn is the client call's child");
    assert_eq!(attribute(&turn, "grains.silo"), Some(silos[cart_silo].address().to_string().as_str()));
    let price =
        span_where(&spans, "turn Catalog.price", |s| s["name"] == "Catalog.price" && s["traceId"] == trace.as_str())
            .await;
    assert_eq!(price["parentSpanId"], turn["spanId"], "the catalog's turn is the cart's turn's child");
    assert_eq!(attribute(&price, "grains.silo"), Some(silos[catalog_silo].address().to_string().as_str()));
    assert_ne!(cart_silo, catalog_silo, "the chain crossed silos");
    for span in [&call, &turn, &price] {
        assert_eq!(span["status"]["code"], 1, "{span}");
        let (start, end): (u64, u64) = (
            span["startTimeUnixNano"].as_str().unwrap().parse().unwrap(),
            span["endTimeUnixNano"].as_str().unwrap().parse().unwrap(),
        );
        assert!(start > 0 && end >= start, "{span}");
    }

    // The grain's own error marks its turn's span as failed.
    client.grain::<Cart>(key.clone()).add("milk".into(), 0).await.unwrap().unwrap_err();
    span_where(&spans, "failed turn", |s| s["name"] == "Cart.add" && s["status"]["code"] == 2).await;

    // An HTTP caller's trace context is continued: its span → the HTTP span → the turn.
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let addr = silos[1].gateway_addr().unwrap();
    let answer = request(addr, "POST", "/grains/Cart/http-traced/add", &[("traceparent", parent)], br#"["apple", 1]"#)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let http = span_where(&spans, "HTTP span", |s| {
        s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
            && s["kind"] == 2
            && s.get("parentSpanId").is_some_and(|p| p == "00f067aa0ba902b7")
    })
    .await;
    assert!(http["name"].as_str().unwrap().starts_with("POST /grains/Cart/"), "{http}");
    let turn = span_where(&spans, "HTTP turn", |s| {
        s["name"] == "Cart.add" && s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    })
    .await;
    assert_eq!(turn["parentSpanId"], http["spanId"]);

    // Metrics: the cart's silo posts Cart.add's duration histogram (cumulative, buckets adding up to the count)
    // and its error count, labelled with the silo.
    let cart_silo_name = silos[cart_silo].address().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let point = loop {
        let found = metrics.lock().unwrap().iter().rev().find_map(|export| {
            let resource = &export["resourceMetrics"][0];
            let silo = resource["resource"]["attributes"].as_array()?.iter().find(|a| a["key"] == "grains.silo")?;
            (silo["value"]["stringValue"] == cart_silo_name.as_str()).then_some(())?;
            let all = resource["scopeMetrics"][0]["metrics"].as_array()?;
            let durations = all.iter().find(|m| m["name"] == "grains.grain.call.duration")?;
            let errors = all.iter().find(|m| m["name"] == "grains.grain.errors")?;
            let is_add = |p: &&Value| {
                p["attributes"].as_array().is_some_and(|a| a.iter().any(|a| a["value"]["stringValue"] == "add"))
            };
            let point = durations["histogram"]["dataPoints"].as_array()?.iter().find(is_add)?.clone();
            let failed = errors["sum"]["dataPoints"].as_array()?.iter().find(is_add)?["asInt"].as_str()?;
            (failed.parse::<u64>().ok()? >= 1).then_some(point)
        });
        if let Some(point) = found {
            break point;
        }
        assert!(tokio::time::Instant::now() < deadline, "no metrics export with Cart.add's histogram and error");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let count: u64 = point["count"].as_str().unwrap().parse().unwrap();
    let counts = point["bucketCounts"].as_array().unwrap();
    let buckets: u64 = counts.iter().map(|c| c.as_str().unwrap().parse::<u64>().unwrap()).sum();
    assert!(count >= 2 && buckets == count, "{point}");
    assert_eq!(counts.len(), point["explicitBounds"].as_array().unwrap().len() + 1);

    drop(client);
    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
