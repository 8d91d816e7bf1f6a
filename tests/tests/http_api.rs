//! The HTTP/JSON API on the silo's port: grain calls with every argument shape of the example grains, typed
//! errors as problem documents, exposure, limits, the cluster endpoints, the operator action, and `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use grains_examples::auth::require_bearer_token;
use grains_silo::{Silo, SiloConfig};
use grains_tests::http_client::{HttpResponse, request};
use serde_json::json;

const TOKEN: &str = "s3cret";
const ADMIN: &str = "admin-token";

/// A silo with the example grains, a bearer-token filter on client calls, an admin token and a small payload
/// limit, listening on a free loopback port.
async fn silo() -> (Silo, SocketAddr) {
    grains_examples::link();
    let config =
        SiloConfig { port: 0, max_payload_bytes: 16 * 1024, admin_token: Some(ADMIN.into()), ..SiloConfig::default() };
    let silo = Silo::builder().config(config).incoming_filter(require_bearer_token([TOKEN])).start().await.unwrap();
    let addr = silo.gateway_addr().unwrap();
    (silo, addr)
}

async fn call(addr: SocketAddr, path: &str, body: &str) -> HttpResponse {
    let auth = format!("Bearer {TOKEN}");
    request(addr, "POST", path, &[("authorization", &auth), ("content-type", "application/json")], body.as_bytes())
        .await
        .unwrap()
}

/// Asserts `response` is a problem document with `status` and `kind`, and returns it.
fn problem(response: &HttpResponse, status: u16, kind: &str) -> serde_json::Value {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/problem+json"));
    let body = response.json();
    assert_eq!(body["type"], format!("urn:grains:problem:{kind}"), "{body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    body
}

#[tokio::test]
async fn grain_methods_are_called_with_json_arguments_in_every_shape() {
    let (silo, addr) = silo().await;

    // One string argument, as an array and as an object; a Result return value.
    let greeted = call(addr, "/grains/Hello/alice/greet", r#"["bob"]"#).await;
    assert_eq!(greeted.status, 200, "{}", greeted.text());
    assert_eq!(greeted.header("content-type"), Some("application/json"));
    assert_eq!(greeted.json(), json!({"Ok": "hello bob, this is alice: greeting number 1"}));
    let greeted = call(addr, "/grains/Hello/alice/greet", r#"{"from": "carol"}"#).await;
    assert_eq!(greeted.json(), json!({"Ok": "hello carol, this is alice: greeting number 2"}));

    // No arguments: an empty array, an empty object, an empty body; a plain return value.
    for body in ["[]", "{}", ""] {
        let count = call(addr, "/grains/Hello/alice/count", body).await;
        assert_eq!((count.status, count.json()), (200, json!(2)), "body {body:?}");
    }

    // Two arguments of two types, by position and by name; a typed grain error comes back as the method's
    // own result (the call worked), not as a problem.
    assert_eq!(call(addr, "/grains/Cart/alice/add", r#"["apple", 2]"#).await.json(), json!({"Ok": 2}));
    assert_eq!(call(addr, "/grains/Cart/alice/add", r#"{"qty": 3, "item": "milk"}"#).await.json(), json!({"Ok": 3}));
    let zero = call(addr, "/grains/Cart/alice/add", r#"["apple", 0]"#).await;
    assert_eq!((zero.status, zero.json()), (200, json!({"Err": "ZeroQuantity"})));
    let unknown = call(addr, "/grains/Cart/alice/add", r#"["caviar", 1]"#).await;
    assert_eq!(unknown.json(), json!({"Err": {"UnknownItem": "caviar"}}));
    // A list of tuples, and a Result of a number.
    assert_eq!(call(addr, "/grains/Cart/alice/items", "[]").await.json(), json!([["apple", 2], ["milk", 3]]));
    assert_eq!(call(addr, "/grains/Cart/alice/total", "").await.json(), json!({"Ok": 2 * 50 + 3 * 120}));
    // An Option result, on a method exposed by itself (`#[http]`); keys with spaces are percent-decoded.
    assert_eq!(call(addr, "/grains/Catalog/default/price", r#"["cheese"]"#).await.json(), json!(700));
    assert_eq!(call(addr, "/grains/Catalog/default/price", r#"{"item": "caviar"}"#).await.json(), json!(null));
    let spaced = call(addr, "/grains/Hello/ann%20lee/greet", r#"["x"]"#).await;
    assert_eq!(spaced.json(), json!({"Ok": "hello x, this is ann lee: greeting number 1"}));
    // A key in its tagged form is that kind of key: `i:7` is the integer 7, not the string "i:7".
    assert_eq!(call(addr, "/grains/Hello/i:7/count", "").await.json(), json!(0));
    assert_eq!(silo.grain::<grains_examples::Hello>(7).count().await.unwrap(), 0);
    call(addr, "/grains/Hello/i:7/greet", r#"["x"]"#).await;
    assert_eq!(silo.grain::<grains_examples::Hello>(7).count().await.unwrap(), 1, "the same grain as Rust's key 7");

    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn failures_are_problem_documents_with_the_status_of_their_call_error() {
    let (silo, addr) = silo().await;

    // A call error: the call filter refuses a client without the bearer token.
    let refused = request(addr, "POST", "/grains/Hello/alice/count", &[], b"[]").await.unwrap();
    let body = problem(&refused, 403, "permission-denied");
    assert_eq!(body["error"], "PermissionDenied");
    assert!(body["detail"].as_str().unwrap().contains("no bearer token"), "{body}");
    let wrong = request(addr, "POST", "/grains/Hello/alice/count", &[("authorization", "Bearer nope")], b"[]").await;
    problem(&wrong.unwrap(), 403, "permission-denied");

    // Unknown type and method, and a method that exists but is not served over HTTP.
    assert_eq!(
        problem(&call(addr, "/grains/Nope/a/count", "[]").await, 404, "unknown-grain-type")["error"],
        "UnknownGrainType"
    );
    assert_eq!(
        problem(&call(addr, "/grains/Cart/a/remove", "[]").await, 404, "unknown-method")["error"],
        "UnknownMethod"
    );
    let hidden = problem(&call(addr, "/grains/Cart/a/clear", "[]").await, 404, "not-exposed");
    assert!(hidden["detail"].as_str().unwrap().contains("#[grain(http)]"), "{hidden}");

    // Malformed JSON, the wrong number of arguments, an argument of the wrong type, an unknown argument name.
    for body in [r#"["apple", 2"#, r#"["apple"]"#, r#"["apple", "two"]"#, r#"{"item": "a", "quantity": 1}"#, "7"] {
        let answer = call(addr, "/grains/Cart/alice/add", body).await;
        assert_eq!(problem(&answer, 400, "invalid-arguments")["error"], "Codec", "body {body}");
    }
    assert!(call(addr, "/grains/Cart/alice/add", "[1,").await.json()["detail"].as_str().unwrap().contains("not JSON"));

    // A body over max_payload_bytes.
    let big = format!(r#"["{}", 1]"#, "x".repeat(20 * 1024));
    assert_eq!(
        problem(&call(addr, "/grains/Cart/alice/add", &big).await, 413, "payload-too-large")["error"],
        "PayloadTooLarge"
    );

    // Wrong HTTP method, no such path, a path that is not type/key/method.
    problem(&request(addr, "GET", "/grains/Hello/alice/count", &[], b"").await.unwrap(), 405, "method-not-allowed");
    problem(&request(addr, "GET", "/cluster/nothing", &[], b"").await.unwrap(), 404, "not-found");
    problem(&call(addr, "/grains/Hello/alice", "[]").await, 404, "not-found");

    // None of these activated anything or ran a turn.
    assert_eq!(silo.activation_count(), 0);
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_cluster_endpoints_report_membership_and_activations() {
    let (silo, addr) = silo().await;
    for key in ["a", "b", "c"] {
        assert_eq!(call(addr, &format!("/grains/Cart/{key}/add"), r#"["apple", 1]"#).await.status, 200);
    }
    call(addr, "/grains/Hello/h/count", "").await;

    let cluster = request(addr, "GET", "/cluster", &[], b"").await.unwrap();
    assert_eq!(cluster.status, 200);
    let cluster = cluster.json();
    assert_eq!(cluster["answered_by"], silo.address().to_string());
    let silos = cluster["silos"].as_array().unwrap();
    assert_eq!(silos.len(), 1, "{cluster}");
    assert_eq!(silos[0]["status"], "active");
    assert_eq!(silos[0]["epoch"], silo.address().epoch);

    let carts = request(addr, "GET", "/cluster/activations?type=Cart&list=true", &[], b"").await.unwrap().json();
    assert_eq!(carts["total"], 3, "{carts}");
    assert_eq!(carts["silos"][0]["grains"], json!(["Cart/a", "Cart/b", "Cart/c"]), "{carts}");
    let all = request(addr, "GET", "/cluster/activations", &[], b"").await.unwrap().json();
    // The carts, the catalog they asked for prices, and the greeter.
    assert_eq!(all["total"], 5, "{all}");
    assert!(all["silos"][0].get("grains").is_none(), "ids are listed only on request");

    let stats = request(addr, "GET", "/dashboard/api/cluster", &[], b"").await.unwrap().json();
    assert_eq!(stats["activations_by_type"], json!({"Cart": 3, "Catalog": 1, "Hello": 1}), "{stats}");
    let add = stats["methods"].as_array().unwrap().iter().find(|m| m["method"] == "add").unwrap().clone();
    assert_eq!((add["grain_type"].clone(), add["calls"].clone()), (json!("Cart"), json!(3)), "{add}");
    assert!(add["p99_ms"].as_f64().unwrap() > 0.0, "{add}");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn metrics_include_latency_histograms_per_grain_type_and_method() {
    let (silo, addr) = silo().await;
    call(addr, "/grains/Cart/alice/add", r#"["apple", 1]"#).await;
    call(addr, "/grains/Cart/alice/add", r#"["apple", 0]"#).await;
    let text = request(addr, "GET", "/metrics", &[], b"").await.unwrap().text();
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    assert_eq!(
        line(r#"grains_grain_calls_total{grain_type="Cart",method="add"}"#).as_deref(),
        Some(r#"grains_grain_calls_total{grain_type="Cart",method="add"} 2"#)
    );
    // The method's own Err counts as an error.
    assert!(line(r#"grains_grain_errors_total{grain_type="Cart",method="add"} 1"#).is_some(), "{text}");
    assert!(
        line(r#"grains_grain_call_duration_seconds_bucket{grain_type="Cart",method="add",le="+Inf"} 2"#).is_some(),
        "{text}"
    );
    assert!(
        line(r#"grains_grain_call_duration_seconds_count{grain_type="Catalog",method="price"} 1"#).is_some(),
        "{text}"
    );
    assert!(line(r#"grains_storage_duration_seconds_count{op="write"} 1"#).is_some(), "{text}");
    assert!(line(r#"grains_activations_by_type{grain_type="Cart"} 1"#).is_some(), "{text}");
    assert!(line("grains_mailbox_queued 0").is_some(), "{text}");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_typed_local_calls_own_err_counts_as_an_error_of_its_method() {
    // A typed reference's call carries its request, and brings its response back, in one cell: the method's
    // own `Err` in it still counts as the method's error.
    let (silo, addr) = silo().await;
    let cart = silo.grain::<grains_examples::cart::Cart>("typed");
    assert_eq!(cart.add("apple".to_owned(), 1).await.unwrap(), Ok(1));
    assert!(cart.add("apple".to_owned(), 0).await.unwrap().is_err());
    let text = request(addr, "GET", "/metrics", &[], b"").await.unwrap().text();
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    assert_eq!(
        line(r#"grains_grain_calls_total{grain_type="Cart",method="add"}"#).as_deref(),
        Some(r#"grains_grain_calls_total{grain_type="Cart",method="add"} 2"#)
    );
    assert_eq!(
        line(r#"grains_grain_errors_total{grain_type="Cart",method="add"}"#).as_deref(),
        Some(r#"grains_grain_errors_total{grain_type="Cart",method="add"} 1"#),
        "{text}"
    );
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn stopping_a_silo_over_http_needs_the_admin_token_or_the_cluster_secret() {
    let (silo, addr) = silo().await;
    let requested = silo.shutdown_requested();
    tokio::pin!(requested);

    let none = request(addr, "POST", "/silo/shutdown", &[], b"").await.unwrap();
    problem(&none, 401, "unauthenticated");
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    // The client's bearer token opens grain calls, not operator actions.
    let client = request(addr, "POST", "/silo/shutdown", &[("authorization", "Bearer s3cret")], b"").await.unwrap();
    problem(&client, 403, "forbidden");
    problem(&request(addr, "GET", "/silo/shutdown", &[], b"").await.unwrap(), 405, "method-not-allowed");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut requested).await.is_err(),
        "refused requests do not stop the silo"
    );

    let admin = format!("Bearer {ADMIN}");
    let accepted = request(addr, "POST", "/silo/shutdown", &[("authorization", &admin)], b"").await.unwrap();
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    assert_eq!(accepted.json()["status"], "shutting_down");
    tokio::time::timeout(Duration::from_secs(5), requested).await.expect("the owner is told to stop the silo");
    silo.shutdown(Duration::from_secs(5)).await;

    // A silo with neither an admin token nor a cluster secret takes no operator action at all.
    let open = Silo::builder().config(SiloConfig { port: 0, ..SiloConfig::default() }).start().await.unwrap();
    let answer =
        request(open.gateway_addr().unwrap(), "POST", "/silo/shutdown", &[("authorization", "Bearer x")], b"").await;
    let body = problem(&answer.unwrap(), 403, "forbidden");
    assert!(body["detail"].as_str().unwrap().contains("admin_token"), "{body}");
    // With the cluster secret instead of an admin token, the secret opens it.
    let secret = Silo::builder()
        .config(SiloConfig { port: 0, cluster_secret: Some("cluster-s".into()), ..SiloConfig::default() })
        .start()
        .await
        .unwrap();
    let answer = request(
        secret.gateway_addr().unwrap(),
        "POST",
        "/silo/shutdown",
        &[("authorization", "Bearer cluster-s")],
        b"",
    )
    .await;
    assert_eq!(answer.unwrap().status, 202);
    open.shutdown(Duration::from_secs(5)).await;
    secret.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_http_api_can_be_turned_off() {
    grains_examples::link();
    let config = SiloConfig { port: 0, http_api: false, ..SiloConfig::default() };
    let silo = Silo::builder().config(config).start().await.unwrap();
    let addr = silo.gateway_addr().unwrap();
    let answer = request(addr, "POST", "/grains/Hello/a/count", &[], b"[]").await.unwrap();
    // Answered as any unknown path is: a gRPC "unimplemented" status, not a call.
    assert_eq!(answer.header("grpc-status"), Some("12"), "{answer:?}");
    assert_eq!(silo.activation_count(), 0);
    assert_eq!(request(addr, "GET", "/metrics", &[], b"").await.unwrap().status, 200, "metrics stay on");
    silo.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_operator_stops_a_silo_process_gracefully_over_http() {
    let mut silo = grains_tests::process::SiloLauncher::new(env!("CARGO_BIN_EXE_grains-test-silo"))
        .args(["--port", "0", "--admin-token", "op", "--log", "info"])
        .keep_log()
        .start();
    let addr: SocketAddr = format!("127.0.0.1:{}", silo.port()).parse().unwrap();
    let refused = request(addr, "POST", "/silo/shutdown", &[("authorization", "Bearer nope")], b"").await.unwrap();
    problem(&refused, 403, "forbidden");
    assert!(silo.wait_exit(Duration::from_millis(500)).await.is_none(), "a refused request does not stop it");

    let accepted = request(addr, "POST", "/silo/shutdown", &[("authorization", "Bearer op")], b"").await.unwrap();
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let status = silo.wait_exit(Duration::from_secs(30)).await.expect("the silo process exits");
    let log = silo.log();
    assert!(status.success(), "a graceful stop exits 0: {status}\n{log}");
    assert!(log.contains("an operator asked this silo to stop") && log.contains("silo stopped"), "{log}");
}

/// This machine's address on its default route, if it has one that is not loopback. No packet is sent: a UDP
/// socket's `connect` only picks the route.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// A caller from a non-loopback address gets 403 for the API and the dashboard unless `http_remote` is set;
/// the same silo serves a loopback caller. Over a real interface address, end to end.
#[tokio::test]
async fn a_caller_from_another_host_is_forbidden_unless_http_remote_is_set() {
    let Some(ip) = non_loopback_address() else {
        eprintln!("WARNING: this machine has no non-loopback address; the remote-caller test cannot run here");
        return;
    };
    grains_examples::link();
    for http_remote in [false, true] {
        let config = SiloConfig { host: ip, port: 0, insecure: true, http_remote, ..SiloConfig::default() };
        let silo = Silo::builder().config(config).start().await.unwrap();
        let addr = silo.gateway_addr().unwrap();
        assert_eq!(addr.ip(), ip);
        for path in ["/cluster", "/dashboard"] {
            let response = request(addr, "GET", path, &[], b"").await.unwrap();
            if http_remote {
                assert_eq!(response.status, 200, "{path} with http_remote: {}", response.text());
            } else {
                let body = problem(&response, 403, "forbidden");
                assert!(body["detail"].as_str().unwrap().contains("http_remote"), "{body}");
            }
        }
        let json = [("content-type", "application/json")];
        let call = request(addr, "POST", "/grains/Hello/x/greet", &json, b"[\"a\"]").await.unwrap();
        assert_eq!(call.status, if http_remote { 200 } else { 403 }, "a grain call over HTTP: {}", call.text());
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
