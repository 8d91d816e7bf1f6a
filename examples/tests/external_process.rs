//! The example silo binary in its own OS process, called by a client in this one.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use grains::CallError;
use grains_examples::{Cart, CartError, Hello};
use grains_silo::Client;

/// A silo process that is killed when dropped.
struct SiloProcess {
    child: Child,
    url: String,
}

impl SiloProcess {
    fn start(extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_grains-example-silo"))
            .args(["--gateway-port", "0", "--log", "warn"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the example silo binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut printed = String::new();
        let addr = loop {
            let line = lines.next().expect("the silo prints its gateway address").expect("readable stdout");
            if let Some(addr) = line.strip_prefix("gateway listening on ") {
                break addr.to_owned();
            }
            printed.push_str(&line);
            printed.push('\n');
        };
        assert!(printed.contains("call_timeout = \"30s\""), "the effective config is printed:\n{printed}");
        // Keep draining stdout so the silo never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        SiloProcess { child, url: format!("http://{addr}") }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SiloProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_client_in_another_process_calls_the_example_silo() {
    let silo = SiloProcess::start(&[]);
    let client = Client::connect(&silo.url).await.unwrap();

    let hello = client.grain::<Hello>("world");
    let first = hello.greet("test".into()).await.unwrap().unwrap();
    assert!(first.contains("greeting number 1"), "{first}");
    assert_eq!(hello.count().await.unwrap(), 1);

    let cart = client.grain::<Cart>("alice");
    assert_eq!(cart.add("apple".into(), 2).await.unwrap(), Ok(2));
    assert_eq!(cart.add("apple".into(), 3).await.unwrap(), Ok(5));
    assert_eq!(cart.add("caviar".into(), 1).await.unwrap(), Err(CartError::UnknownItem("caviar".into())));
    assert_eq!(cart.add("bread".into(), 0).await.unwrap(), Err(CartError::ZeroQuantity));
    assert_eq!(cart.items().await.unwrap(), vec![("apple".to_owned(), 5)]);
    assert_eq!(cart.total().await.unwrap(), Ok(250), "the cart priced its items by calling the catalog grain");
}

#[tokio::test]
async fn the_demo_client_binary_calls_the_example_silo_from_a_third_process() {
    // What `scripts/demo` runs: the silo binary and the client binary, each a process of its own.
    let silo = SiloProcess::start(&[]);
    let demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_grains-demo-client")).arg(&silo.url).output();
    let demo = tokio::time::timeout(Duration::from_secs(60), demo).await.expect("the demo ends").unwrap();
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "{}\n{stdout}\n{}", demo.status, String::from_utf8_lossy(&demo.stderr));
    for line in [
        "Cart/alice.add(apple, 3)  -> 5",
        "Cart/alice.add(caviar, 1) -> refused",
        "Cart/alice.items()        -> [(\"apple\", 5), (\"bread\", 1)]",
        "100 carts keyed 0..99 each added one milk: 100 succeeded",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

#[tokio::test]
async fn a_call_in_flight_when_the_silo_process_dies_ends_in_an_error_not_a_hang() {
    let mut silo = SiloProcess::start(&[]);
    let client = Client::connect(&silo.url).await.unwrap();
    let cart = client.grain::<Cart>("doomed");
    assert_eq!(cart.add("milk".into(), 1).await.unwrap(), Ok(1));

    // Many calls in flight, then the process is killed with SIGKILL.
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let cart = client.grain::<Cart>(format!("doomed-{i}"));
            tokio::spawn(async move { cart.add("milk".into(), 1).await })
        })
        .collect();
    silo.kill();
    for call in calls {
        let result = tokio::time::timeout(Duration::from_secs(10), call).await.expect("no hang").unwrap();
        // Each call either completed before the kill or failed with a typed error.
        match result {
            Ok(Ok(1)) | Err(CallError::Unavailable(_)) => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    let after = cart.items().await;
    assert!(matches!(after, Err(CallError::Unavailable(_))), "got {after:?}");
}

#[tokio::test]
async fn the_silo_reads_a_config_file_and_environment() {
    let dir = std::env::temp_dir().join(format!("grains-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("silo.toml");
    std::fs::write(&file, "call_timeout = \"7s\"\nname = \"from-file\"\n[grain.Cart]\nidle_timeout = \"1m\"\n")
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grains-example-silo"))
        .args(["--gateway-port", "0", "--log", "warn", "--config", file.to_str().unwrap()])
        .env("GRAINS_NAME", "from-env")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut printed = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.starts_with("gateway listening on ") {
            break;
        }
        printed.push_str(&line);
        printed.push('\n');
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(printed.contains("call_timeout = \"7s\""), "{printed}");
    assert!(printed.contains("name = \"from-env\""), "the environment overrides the file:\n{printed}");
    assert!(printed.contains("[grain.Cart]\nidle_timeout = \"1m\""), "{printed}");
}
