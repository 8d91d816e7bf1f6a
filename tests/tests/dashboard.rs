//! The dashboard, in a real browser: headless Chromium loads the page from one silo of a 3-silo cluster under
//! load, and the test reads the rendered DOM (every silo listed, activation counts equal to what the cluster
//! reports, a chart drawn) and saves a screenshot (`target/dashboard.png`).
//!
//! Chromium comes from Debian's `chromium` package (`scripts/test` installs it when it can); `CHROMIUM` names
//! another binary. Where there is none, the test says so loudly and passes without running.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use grains::__private::RefCore;
use grains::GrainRef;
use grains_examples::{Cart, CartRef, Hello};
use grains_tests::http_client::request;

/// The Chromium binary, if one is installed.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Runs headless Chromium on `url` with `args`, letting the page's timers run for `budget_ms` of virtual time.
async fn run_chromium(browser: &PathBuf, url: &str, budget_ms: u64, args: &[String]) -> String {
    let profile = std::env::temp_dir().join(format!("grains-dashboard-{}-{budget_ms}", std::process::id()));
    let mut command = tokio::process::Command::new(browser);
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg("--hide-scrollbars")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The values of attribute `name` on the elements whose opening tag contains `marker`, in document order.
fn attribute_values(dom: &str, marker: &str, name: &str) -> Vec<String> {
    dom.match_indices('<')
        .filter_map(|(start, _)| {
            let tag = &dom[start..start + dom[start..].find('>')?];
            tag.contains(marker).then_some(tag)
        })
        .filter_map(|tag| {
            let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            Some(tag[at..at + tag[at..].find('"')?].to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_in_a_browser() {
    let Some(browser) = chromium() else {
        eprintln!(
            "\n\n!!!!!!!!!! SKIPPED: no Chromium found (install Debian's `chromium` package, or set CHROMIUM); the \
             dashboard was NOT tested in a browser !!!!!!!!!!\n\n"
        );
        return;
    };
    grains_examples::link();
    let silos = grains_tests::start_cluster(3).await;
    let addr = silos[0].gateway_addr().unwrap();

    // Activate a fixed set of grains, then keep calling them (and a few failing calls) until the page is read:
    // the activation counts hold still while the calls go on.
    for i in 0..40 {
        silos[i % 3].grain::<Cart>(format!("cart-{i}")).add("apple".into(), 1).await.unwrap().unwrap();
        silos[i % 3].grain::<Hello>(format!("hello-{i}")).count().await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for worker in 0..6 {
        let silo_runtime = silos[worker % 3].runtime();
        let (stop, calls) = (stop.clone(), calls.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0usize;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                let key = format!("cart-{}", (n * 7 + worker) % 40);
                let id = grains::GrainId::new("Cart", key);
                let cart: CartRef = GrainRef::from_core(RefCore::new(id, silo_runtime.clone()));
                let qty = if n.is_multiple_of(10) { 0 } else { 1 }; // some of the grain's own errors
                let _ = cart.add("milk".into(), qty).await;
                let _ = cart.items().await;
                calls.fetch_add(2, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let url = format!("http://{addr}/dashboard");
    let dom = run_chromium(&browser, &url, 6000, &["--dump-dom".to_owned()]).await;

    // What the cluster reports, read while the load goes on (it activates nothing new).
    let reported = request(addr, "GET", "/cluster/activations", &[], b"").await.unwrap().json();
    let screenshot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    run_chromium(
        &browser,
        &url,
        8000,
        &["--window-size=1400,1300".to_owned(), format!("--screenshot={}", screenshot.display())],
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(calls.load(Ordering::Relaxed) > 100, "the cluster was under load");

    assert!(dom.contains(r#"data-ready="true""#), "the page rendered data: {dom}");
    let polls: u32 = attribute_values(&dom, "<body", "data-polls")[0].parse().unwrap();
    assert!(polls >= 3, "the page kept polling ({polls} polls)");

    // Every silo listed, active, with the activation count the cluster reports for it.
    let listed = attribute_values(&dom, "data-silo=", "data-silo");
    for silo in &silos {
        let name = silo.address().to_string();
        assert!(listed.contains(&name), "{name} is listed: {listed:?}");
        let row = format!(r#"data-silo="{name}" data-status="active""#);
        assert!(dom.contains(&row), "{name} is listed as active");
        let shown: u64 = attribute_values(&dom, &row, "data-activations")[0].parse().unwrap();
        let answer = reported["silos"].as_array().unwrap().iter().find(|s| s["silo"] == name.as_str()).unwrap();
        assert_eq!(shown, answer["count"].as_u64().unwrap(), "activations shown for {name}");
        assert_eq!(shown, silo.active_grains().len() as u64, "activations shown for {name}");
    }
    // The per-type table agrees with the cluster: 40 carts, 40 greeters, one catalog.
    let totals: Vec<String> = attribute_values(&dom, "class=\"num total\"", "data-count");
    assert_eq!(totals, ["40", "1", "40"], "Cart, Catalog, Hello totals");
    assert_eq!(reported["total"], 81);

    // A chart drawn from several polls, and the methods under load with their latencies.
    let points: u32 = attribute_values(&dom, "id=\"chart-calls\"", "data-points")[0].parse().unwrap();
    assert!(points >= 2, "the chart has points ({points})");
    let methods = attribute_values(&dom, "<tr data-method=", "data-method");
    assert!(methods.contains(&"Cart.add".to_owned()) && methods.contains(&"Cart.items".to_owned()), "{methods:?}");
    assert!(dom.contains("µs") || dom.contains(" ms"), "latencies are shown");
    assert!(dom.contains(r#"data-event="active""#), "membership events are listed");

    let png = std::fs::read(&screenshot).expect("a screenshot was saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a real screenshot ({} bytes)", png.len());
    eprintln!("dashboard screenshot: {}", screenshot.display());

    for silo in silos {
        silo.shutdown(Duration::from_secs(5)).await;
    }
}
