//! The example silo binary started while Postgres is down: it retries with backoff, says so in its log, and
//! comes up once Postgres does.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use grains_examples::Hello;
use grains_silo::Client;
use grains_tests::pg::{TestDatabase, ThrowawayPostgres};

fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line containing {needle:?} within {within:?}"),
        }
    }
}

fn forward_lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test]
async fn a_silo_started_while_postgres_is_down_retries_and_comes_up_when_it_returns() {
    let cluster = ThrowawayPostgres::start();
    cluster.wait_ready().await;
    let db = TestDatabase::create_on(&cluster.admin_url()).await;
    cluster.stop();

    let mut child = Command::new(env!("CARGO_BIN_EXE_grains-example-silo"))
        .args(["--gateway-port", "0", "--storage", "postgres", "--database-url", db.url()])
        .env("GRAINS_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = forward_lines(child.stdout.take().unwrap());
    let stderr = forward_lines(child.stderr.take().unwrap());

    let retry = wait_for_line(&stderr, "postgres unavailable, retrying", Duration::from_secs(20));
    assert!(retry.contains("retry_in"), "the log says when it retries: {retry}");
    let second = wait_for_line(&stderr, "postgres unavailable, retrying", Duration::from_secs(20));
    assert!(second.contains("attempt=2"), "it keeps retrying: {second}");

    cluster.resume();
    let line = wait_for_line(&stdout, "gateway listening on ", Duration::from_secs(30));
    let addr = line.trim_start_matches("gateway listening on ").to_owned();
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    let greeting = client.grain::<Hello>("pg").greet("test".into()).await.unwrap().unwrap();
    assert!(greeting.contains("greeting number 1"), "{greeting}");

    let _ = child.kill();
    let _ = child.wait();
    drop(db);
}
