//! The HTTP/JSON API and the dashboard, served on the silo's one port beside the gRPC gateway and `/metrics`
//! (HTTP/1.1 or HTTP/2, over TLS when the port speaks TLS).
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /grains/{type}/{key}/{method}` | the method's return value as JSON |
//! | `GET /cluster` | the membership, as this silo sees it |
//! | `GET /cluster/activations?type=Cart&list=true` | activations per silo (of one type; ids listed on request) |
//! | `POST /silo/shutdown` | 202: this silo leaves the cluster gracefully (operator action) |
//! | `GET /dashboard` | the dashboard page (assets in the binary; works offline) |
//! | `GET /dashboard/api/cluster` | what the dashboard draws: every silo's stats, merged per method |
//! | `GET /dashboard/api/silo` | this silo's stats |
//!
//! # Grain calls
//!
//! The body is the method's arguments as a JSON array in order or an object by name (as
//! its parameters are named); the answer is `200` with the return value as JSON. Only methods a grain type
//! exposes (`#[grain(http)]` on its impl block, or `#[http]` on the method) are served. A key in the path is a
//! string key, unless it is written in its tagged storage form (`i:42`, `u:<uuid>`, `c:42:eu`, `s:text`;
//! see [`grains::GrainKey::storage_key`]); path segments are percent-decoded. A call is a client's call like one
//! through the gateway: routed, filtered by the silo's incoming call filters, which see the caller's bearer
//! token (`Authorization: Bearer ...`) and TLS client certificate, and bounded by `max_payload_bytes`
//! and the call timeout (`grains-timeout-ms` header to ask for a shorter or longer one, capped at
//! `max_call_timeout`).
//!
//! # Errors
//!
//! Failures are [RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) problem documents
//! (`application/problem+json`): `type` (`urn:grains:problem:<kind>`), `title`, `status`, `detail`, and for a
//! failed call `error`, the [`grains::CallError`] variant. The status says the same as the error:
//!
//! | problem | status |
//! | --- | --- |
//! | malformed JSON, wrong arguments (`invalid-arguments`), `Codec`, `Protocol` | 400 |
//! | no token for an operator action (`unauthenticated`) | 401 |
//! | `PermissionDenied`, a non-loopback caller without `http_remote` (`forbidden`) | 403 |
//! | `UnknownGrainType`, `UnknownMethod`, a method not served over HTTP (`not-exposed`), no such path | 404 |
//! | wrong HTTP method | 405 |
//! | `PayloadTooLarge`, a body over `max_payload_bytes` | 413 |
//! | `Overloaded` (with `Retry-After`) | 429 |
//! | `ActivationFailed`, `Panicked` | 500 |
//! | `Unavailable`, `NotHere`, `StorageUnavailable`, `ShuttingDown` (with `Retry-After`) | 503 |
//! | `Timeout` (outcome unknown) | 504 |
//! | `Deadlock` (a call cycle) | 508 |
//!
//! # Who may call
//!
//! Only loopback callers, unless `http_remote` is set. JSON grain calls pass the incoming call filters
//! (a bearer-token filter applies to them as to gateway clients). The operator action needs
//! `Authorization: Bearer <admin_token or cluster_secret>`; a silo with neither refuses it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use grains::__private::runtime::BoxFuture;
use grains::{CallError, GrainId, GrainKey};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use serde::Serialize;
use tonic::body::Body;
use tracing::Instrument;

use crate::filter::{BearerToken, CallerIdentity, ClientIdentity};
use crate::silo::SiloInner;
use crate::wire::{Envelope, Kind, Mode, WireGrainId};

/// The dashboard page: one file, styles and script inline, no external resource.
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");

/// Whether the HTTP API serves `path` (the gateway hands it these requests).
pub(crate) fn serves(path: &str) -> bool {
    path.starts_with("/grains/")
        || path == "/cluster"
        || path.starts_with("/cluster/")
        || path.starts_with("/silo/")
        || path == "/dashboard"
        || path.starts_with("/dashboard/")
}

/// Who sent an HTTP request, as the gateway knows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpCaller {
    /// The connection's remote address.
    pub(crate) remote: Option<SocketAddr>,
    /// The subject of the TLS client certificate, if one was presented.
    pub(crate) certificate_subject: Option<String>,
}

/// A problem document (RFC 9457) and its status.
#[derive(Debug)]
pub(crate) struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    error: Option<&'static str>,
    retry_after: Option<u32>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Problem {
    fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Problem { status, kind, title, detail: detail.into(), error: None, retry_after: None }
    }

    fn into_response(self) -> http::Response<Body> {
        let body = ProblemBody {
            kind: format!("urn:grains:problem:{}", self.kind),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            error: self.error,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = respond(self.status, "application/problem+json", json);
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The problem a failed call is answered with.
pub(crate) fn call_problem(error: &CallError) -> Problem {
    use StatusCode as S;
    let (status, kind, title, variant, retry_after) = match error {
        CallError::Timeout(_) => (S::GATEWAY_TIMEOUT, "timeout", "The call timed out", "Timeout", None),
        CallError::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "unavailable", "Unavailable", "Unavailable", Some(1)),
        CallError::NotHere(_) => (S::SERVICE_UNAVAILABLE, "not-here", "Grain not hosted here", "NotHere", Some(1)),
        CallError::UnknownGrainType(_) => {
            (S::NOT_FOUND, "unknown-grain-type", "Unknown grain type", "UnknownGrainType", None)
        }
        CallError::UnknownMethod { .. } => (S::NOT_FOUND, "unknown-method", "Unknown method", "UnknownMethod", None),
        CallError::Codec(_) => (S::BAD_REQUEST, "codec", "Codec error", "Codec", None),
        CallError::PayloadTooLarge { .. } => {
            (S::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large", "PayloadTooLarge", None)
        }
        CallError::ActivationFailed { .. } => {
            (S::INTERNAL_SERVER_ERROR, "activation-failed", "Activation failed", "ActivationFailed", None)
        }
        CallError::StorageUnavailable { .. } => {
            (S::SERVICE_UNAVAILABLE, "storage-unavailable", "Storage unavailable", "StorageUnavailable", Some(1))
        }
        CallError::Panicked { .. } => {
            (S::INTERNAL_SERVER_ERROR, "panicked", "The grain method panicked", "Panicked", None)
        }
        CallError::Deadlock { .. } => {
            (S::LOOP_DETECTED, "deadlock", "Deadlock: the call would wait for itself", "Deadlock", None)
        }
        CallError::Protocol(_) => (S::BAD_REQUEST, "protocol", "Protocol error", "Protocol", None),
        CallError::ShuttingDown => {
            (S::SERVICE_UNAVAILABLE, "shutting-down", "Silo shutting down", "ShuttingDown", Some(1))
        }
        CallError::PermissionDenied(_) => {
            (S::FORBIDDEN, "permission-denied", "Permission denied", "PermissionDenied", None)
        }
        CallError::Overloaded(_) => (S::TOO_MANY_REQUESTS, "overloaded", "Overloaded", "Overloaded", Some(1)),
        _ => (S::INTERNAL_SERVER_ERROR, "call-failed", "The call failed", "Other", None),
    };
    Problem { status, kind, title, detail: error.to_string(), error: Some(variant), retry_after }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json<T: Serialize>(value: &T) -> http::Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", e.to_string()).into_response()
        }
    }
}

/// Serves one HTTP API request.
pub(crate) fn serve<B>(
    silo: Arc<SiloInner>,
    caller: HttpCaller,
    request: http::Request<B>,
) -> BoxFuture<'static, http::Response<Body>>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    Box::pin(async move {
        let path = request.uri().path().to_owned();
        let span = tracing::debug_span!("http.request", method = %request.method(), %path);
        match route(silo, caller, request).instrument(span).await {
            Ok(response) => response,
            Err(problem) => problem.into_response(),
        }
    })
}

async fn route<B>(
    silo: Arc<SiloInner>,
    caller: HttpCaller,
    request: http::Request<B>,
) -> Result<http::Response<Body>, Problem>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    if !admits(&silo.config, caller.remote) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "this silo serves its HTTP API and dashboard to loopback callers only (see http_remote)",
        ));
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(parse_query).unwrap_or_default();
    let method = request.method().clone();
    let only = |allowed: Method| -> Result<(), Problem> {
        if method == allowed {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                format!("{path} answers {allowed} only"),
            ))
        }
    };
    if let Some(rest) = path.strip_prefix("/grains/") {
        only(Method::POST)?;
        return grain_call(silo, caller, rest, request).await;
    }
    match path.as_str() {
        "/cluster" => {
            only(Method::GET)?;
            Ok(json(&crate::stats::membership(&silo)))
        }
        "/cluster/activations" => {
            only(Method::GET)?;
            let list = query.get("list").is_some_and(|v| v == "true" || v == "1");
            let answers = crate::stats::activations(&silo, query.get("type").map(String::as_str), list).await;
            let total: usize = answers.iter().map(|a| a.count).sum();
            Ok(json(&serde_json::json!({ "grain_type": query.get("type"), "total": total, "silos": answers })))
        }
        "/silo/shutdown" => {
            only(Method::POST)?;
            authorize_operator(&silo, request.headers())?;
            tracing::warn!(silo = %silo.me(), remote = ?caller.remote, "an operator asked this silo to stop");
            silo.shutdown_requested.send_replace(true);
            let mut response = json(&serde_json::json!({ "silo": silo.me().to_string(), "status": "shutting_down" }));
            *response.status_mut() = StatusCode::ACCEPTED;
            Ok(response)
        }
        "/dashboard" | "/dashboard/" => {
            only(Method::GET)?;
            Ok(respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD_HTML))
        }
        "/dashboard/api/cluster" => {
            only(Method::GET)?;
            Ok(json(&crate::stats::cluster(&silo).await))
        }
        "/dashboard/api/silo" => {
            only(Method::GET)?;
            Ok(json(&crate::stats::local(&silo)))
        }
        _ => Err(Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", format!("nothing is served at {path}"))),
    }
}

/// Whether the HTTP API and dashboard serve a caller from `remote`: loopback callers always, others only with
/// `http_remote` (a connection whose address the accept loop did not record is not taken for a local one).
fn admits(config: &crate::config::SiloConfig, remote: Option<SocketAddr>) -> bool {
    config.http_remote || remote.is_some_and(|r| r.ip().is_loopback())
}

/// Checks that an operator action carries `Authorization: Bearer` with the admin token or the cluster secret.
fn authorize_operator(silo: &SiloInner, headers: &http::HeaderMap) -> Result<(), Problem> {
    let accepted: Vec<_> = silo.config.admin_token.iter().chain(silo.config.cluster_secret.iter()).collect();
    if accepted.is_empty() {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Operator actions are off",
            "this silo has neither an admin_token nor a cluster_secret, so it takes no operator action",
        ));
    }
    let presented = bearer(headers).ok_or_else(|| {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Unauthenticated",
            "an operator action needs Authorization: Bearer <admin_token or cluster_secret>",
        )
    })?;
    // Every candidate is compared, so the time taken does not tell which one matched.
    let valid = accepted.iter().fold(false, |found, secret| secret.matches(presented.as_str()) | found);
    if valid {
        Ok(())
    } else {
        Err(Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", "the bearer token is not the admin token"))
    }
}

/// The bearer token of an `Authorization` header.
fn bearer(headers: &http::HeaderMap) -> Option<BearerToken> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(BearerToken::new(token.trim()))
}

/// Reads a request body of at most `limit` bytes.
async fn read_body<B>(request: http::Request<B>, limit: usize) -> Result<(http::request::Parts, Bytes), Problem>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let too_large = |size: Option<u64>| {
        let size = size.map_or_else(|| "more".to_owned(), |s| s.to_string());
        let mut problem = Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            format!("a body of {size} bytes exceeds the limit of {limit} bytes"),
        );
        problem.error = Some("PayloadTooLarge");
        problem
    };
    let (parts, body) = request.into_parts();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(declared));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok((parts, collected.to_bytes())),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large(None)),
        Err(error) => Err(Problem::new(StatusCode::BAD_REQUEST, "bad-body", "Unreadable body", error.to_string())),
    }
}

/// `POST /grains/{type}/{key}/{method}`.
async fn grain_call<B>(
    silo: Arc<SiloInner>,
    caller: HttpCaller,
    rest: &str,
    request: http::Request<B>,
) -> Result<http::Response<Body>, Problem>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let segments: Vec<&str> = rest.split('/').collect();
    let [grain_type, key, method] = segments[..] else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "a grain call is POST /grains/{type}/{key}/{method}",
        ));
    };
    let bad_path = |what: &str| Problem::new(StatusCode::BAD_REQUEST, "bad-path", "Bad path", what.to_owned());
    let grain_type =
        percent_decode(grain_type).ok_or_else(|| bad_path("the grain type is not percent-encoded UTF-8"))?;
    let key = percent_decode(key).ok_or_else(|| bad_path("the key is not percent-encoded UTF-8"))?;
    let method = percent_decode(method).ok_or_else(|| bad_path("the method is not percent-encoded UTF-8"))?;
    let Some(registration) = silo.grain_type(&grain_type) else {
        return Err(call_problem(&CallError::UnknownGrainType(grain_type)));
    };
    if !registration.methods.contains(&method.as_str()) {
        return Err(call_problem(&CallError::UnknownMethod { grain_type, method }));
    }
    let Some(http_methods) = registration.http.filter(|h| h.exposes(&method)) else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-exposed",
            "Method not served over HTTP",
            format!(
                "{grain_type}.{method} is not served over HTTP: its grain type opts in with #[grain(http)] on its \
                 impl block, or the method with #[http]"
            ),
        ));
    };
    let span = tracing::info_span!("http.grain_call", grain_type = registration.type_name, %method, %key);
    async move {
        let (parts, body) = read_body(request, silo.config.max_payload_bytes).await?;
        let arguments = (http_methods.json_to_args)(&method, &body).map_err(|e| {
            let mut problem = Problem::new(StatusCode::BAD_REQUEST, "invalid-arguments", "Invalid arguments", e.0);
            problem.error = Some("Codec");
            problem
        })?;
        let key = GrainKey::from_storage_key(&key).unwrap_or_else(|| GrainKey::from(key));
        let id = GrainId::new(registration.type_name, key);
        let timeout_ms =
            parts.headers.get("grains-timeout-ms").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(0);
        // A W3C trace context the caller sends continues its trace (feature `otlp`).
        let metadata = match parts.headers.get("traceparent").and_then(|v| v.to_str().ok()) {
            Some(traceparent) => grains::RequestMetadata::new().with("traceparent", traceparent),
            None => grains::RequestMetadata::new(),
        };
        #[cfg(feature = "otlp")]
        let (metadata, trace) = crate::otlp::start(
            || format!("POST /grains/{}/{{key}}/{method}", registration.type_name),
            crate::otlp::Kind::Server,
            metadata,
            || vec![("grains.grain", id.to_string()), ("http.request.method", "POST".to_owned())],
        );
        let envelope = Envelope {
            kind: Kind::Request as i32,
            target: Some(WireGrainId::from(&id)),
            method: method.clone(),
            payload: Bytes::from(arguments),
            timeout_ms,
            mode: Mode::Route as i32,
            metadata: metadata.to_map(),
            ..Default::default()
        };
        let identity = CallerIdentity::Client(ClientIdentity::new(caller.certificate_subject, bearer(&parts.headers)));
        let reply = silo.clone().serve_request(envelope, &identity).await;
        #[cfg(feature = "otlp")]
        if let Some(trace) = trace {
            trace.end(reply.as_ref().err().map(ToString::to_string));
        }
        let reply = reply.map_err(|e| {
            tracing::debug!(error = %e, "HTTP grain call failed");
            call_problem(&e)
        })?;
        let result = (http_methods.result_to_json)(&method, &reply.payload).map_err(|e| {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "codec", "The result cannot be written as JSON", e.0)
        })?;
        Ok(respond(StatusCode::OK, "application/json", result))
    }
    .instrument(span)
    .await
}

/// Decodes `%XX` escapes (and nothing else); `None` for a bad escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `a=1&b=x%20y` as a map (a `+` is a space, as forms write it).
fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(&name.replace('+', " "))?, percent_decode(&value.replace('+', " "))?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%E2%9C%93").as_deref(), Some("✓"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%FF"), None, "not UTF-8");
        let query = parse_query("type=Cart&list=true&x=a+b");
        assert_eq!(query.get("type").map(String::as_str), Some("Cart"));
        assert_eq!(query.get("x").map(String::as_str), Some("a b"));
    }

    #[test]
    fn call_errors_keep_their_meaning_as_statuses() {
        let status = |e: CallError| call_problem(&e).status.as_u16();
        assert_eq!(status(CallError::Timeout(std::time::Duration::ZERO)), 504);
        assert_eq!(status(CallError::UnknownGrainType("X".into())), 404);
        assert_eq!(status(CallError::PermissionDenied("no".into())), 403);
        assert_eq!(status(CallError::Overloaded("full".into())), 429);
        assert_eq!(status(CallError::ShuttingDown), 503);
        assert_eq!(status(CallError::PayloadTooLarge { size: 2, limit: 1 }), 413);
        assert_eq!(status(CallError::Deadlock { chain: vec![] }), 508);
        assert_eq!(call_problem(&CallError::Overloaded("full".into())).retry_after, Some(1));
    }

    #[test]
    fn only_loopback_callers_are_served_unless_http_remote_is_set() {
        let config = crate::config::SiloConfig::default();
        let addr = |text: &str| Some(text.parse::<SocketAddr>().unwrap());
        assert!(admits(&config, addr("127.0.0.1:5000")) && admits(&config, addr("[::1]:5000")));
        assert!(!admits(&config, addr("10.1.2.3:5000")) && !admits(&config, addr("[2001:db8::1]:5000")));
        assert!(!admits(&config, None));
        let remote = crate::config::SiloConfig { http_remote: true, ..config };
        assert!(admits(&remote, addr("10.1.2.3:5000")));
    }

    #[test]
    fn the_api_paths_are_recognised_and_nothing_else() {
        for path in ["/grains/Cart/a/add", "/cluster", "/cluster/activations", "/silo/shutdown", "/dashboard"] {
            assert!(serves(path), "{path}");
        }
        for path in ["/metrics", "/grains.Gateway/Connect", "/clusterx", "/"] {
            assert!(!serves(path), "{path}");
        }
    }
}
