//! A silo that runs out of file descriptors: the real silo binary under `ulimit -n 96`, flooded with far more
//! connections than it can hold. It must keep serving the clients it has, close the connections it cannot take
//! (not leave them in the listen backlog), stay idle while doing so, and take new clients once descriptors free
//! up again.

#[cfg(not(target_os = "linux"))]
#[test]
fn a_silo_out_of_file_descriptors_keeps_serving_closes_the_rest_and_does_not_spin() {
    eprintln!("SKIPPED: the descriptor-limit test runs on Linux only (it reads /proc and sets `ulimit -n`)");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use grains_silo::{Client, ClientConfig};
    use grains_tests::Counter;
    use grains_tests::process::{SiloLauncher, SiloProcess};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The silo's descriptor limit.
    const FD_LIMIT: u64 = 96;
    /// Connections opened at once: three times what the silo can hold.
    const FLOOD: usize = 300;
    /// How long the silo's CPU time is measured under pressure.
    const CPU_WINDOW: Duration = Duration::from_secs(3);
    /// The most of one core the silo may use while refusing connections (a spinning accept loop uses all of it).
    const MAX_CORE_SHARE: f64 = 0.25;

    /// The HTTP/2 client preface and an empty SETTINGS frame: a silo that accepted the connection answers with
    /// its own SETTINGS.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

    /// What became of one connection of the flood.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fate {
        /// The silo accepted it and speaks HTTP/2 on it.
        Served,
        /// The silo closed it (EOF or reset), or the kernel refused it.
        Closed,
        /// Connected, but nothing came back and it was not closed: left in the listen backlog.
        Hanging,
    }

    /// Opens a connection, sends the preface, and waits up to `within` to see what the silo does with it. The
    /// stream is handed back (still open when served) so that the caller holds the silo's descriptor.
    async fn flood_one(addr: &str, within: Duration) -> (Fate, Option<TcpStream>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) => return (Fate::Closed, None),
            Err(_) => return (Fate::Hanging, None), // the backlog is full: the SYN goes unanswered
        };
        if stream.write_all(PREFACE).await.is_err() {
            return (Fate::Closed, None);
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => (Fate::Closed, None),
            Ok(Ok(_)) => (Fate::Served, Some(stream)),
            Err(_) => (Fate::Hanging, Some(stream)),
        }
    }

    /// Opens `n` connections at once and sorts them by fate.
    async fn flood(addr: &str, n: usize, within: Duration) -> (Vec<Fate>, Vec<TcpStream>) {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let addr = addr.to_owned();
                tokio::spawn(async move { flood_one(&addr, within).await })
            })
            .collect();
        let mut fates = Vec::new();
        let mut held = Vec::new();
        for task in tasks {
            let (fate, stream) = task.await.unwrap();
            fates.push(fate);
            held.extend(stream);
        }
        (fates, held)
    }

    fn count(fates: &[Fate], fate: Fate) -> usize {
        fates.iter().filter(|f| **f == fate).count()
    }

    /// Calls one grain over and over, counting successes and failures.
    struct Caller {
        ok: Arc<AtomicU64>,
        failed: Arc<AtomicU64>,
        last_error: Arc<std::sync::Mutex<Option<String>>>,
        stop: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Caller {
        fn start(client: &Client) -> Caller {
            let grain = client.grain::<Counter>("fd-limit");
            let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let stop = Arc::new(AtomicBool::new(false));
            let last_error = Arc::new(std::sync::Mutex::new(None));
            let task = tokio::spawn({
                let (ok, failed, stop, last_error) = (ok.clone(), failed.clone(), stop.clone(), last_error.clone());
                async move {
                    while !stop.load(Ordering::Relaxed) {
                        match grain.increment().await {
                            Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                *last_error.lock().unwrap() = Some(format!("{other:?}"));
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
            Caller { ok, failed, last_error, stop, task }
        }

        fn counts(&self) -> (u64, u64) {
            (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
        }

        async fn stop(self) {
            self.stop.store(true, Ordering::Relaxed);
            self.task.await.unwrap();
        }
    }

    fn start_silo() -> SiloProcess {
        // `exec` keeps the pid: the child is the silo itself, so /proc/<pid> is the silo's.
        let limited = format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\"");
        SiloLauncher::new("sh")
            .args(["-c", &limited, env!("CARGO_BIN_EXE_grains-test-silo")])
            // Accepted connections stay open (and hold their descriptors) for the whole test.
            .args(["--port", "0", "--log", "warn", "--handshake-timeout", "10m"])
            .keep_log()
            .start()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silo_out_of_file_descriptors_keeps_serving_closes_the_rest_and_does_not_spin() {
        let silo = start_silo();
        assert_eq!(silo.open_files_limit(), FD_LIMIT, "the silo runs under the lowered limit");
        let client = Client::connect_with(silo.url(), ClientConfig::default()).await.unwrap();
        let caller = Caller::start(&client);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(caller.counts().0 > 0, "the client calls before the flood");
        let idle_fds = silo.open_files();

        // The flood: every connection is served or closed within a few seconds, none is left hanging.
        let within = grains_tests::scaled(Duration::from_secs(5));
        let (fates, mut held) = flood(&silo.addr, FLOOD, within).await;
        let (served, closed, hanging) =
            (count(&fates, Fate::Served), count(&fates, Fate::Closed), count(&fates, Fate::Hanging));
        println!(
            "{FLOOD} connections against a limit of {FD_LIMIT} descriptors ({idle_fds} open before): {served} served, \
             {closed} closed, {hanging} hanging; the silo holds {} descriptors",
            silo.open_files()
        );
        assert_eq!(hanging, 0, "connections past the descriptor limit were left hanging, neither served nor closed");
        assert!(served < FD_LIMIT as usize, "{served} connections served with {FD_LIMIT} descriptors");
        assert!(closed > 0, "the silo never ran out of descriptors");

        // While the silo is out of descriptors and connections keep coming, it stays idle, and the client's
        // calls keep succeeding.
        let (ok_before, failed_before) = caller.counts();
        let cpu_before = silo.cpu_time();
        let started = std::time::Instant::now();
        let mut more_fates = Vec::new();
        while started.elapsed() < CPU_WINDOW {
            let (fates, streams) = flood(&silo.addr, 10, within).await;
            more_fates.extend(fates);
            held.extend(streams);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cpu = silo.cpu_time() - cpu_before;
        let share = cpu.as_secs_f64() / started.elapsed().as_secs_f64();
        let (ok_after, failed_after) = caller.counts();
        println!(
            "silo CPU time over {:.1} s out of descriptors, {} more connections ({} closed, {} hanging): {} ms \
             ({:.1}% of one core); client calls meanwhile: {} ok, {} failed",
            started.elapsed().as_secs_f64(),
            more_fates.len(),
            count(&more_fates, Fate::Closed),
            count(&more_fates, Fate::Hanging),
            cpu.as_millis(),
            share * 100.0,
            ok_after - ok_before,
            failed_after - failed_before,
        );
        assert!(share < MAX_CORE_SHARE, "the silo used {:.0}% of a core refusing connections", share * 100.0);
        assert_eq!(count(&more_fates, Fate::Hanging), 0, "connections left hanging under continued pressure");
        assert!(ok_after - ok_before >= 20, "the client's calls stalled: {} in {CPU_WINDOW:?}", ok_after - ok_before);
        let (_, failed) = caller.counts();
        assert_eq!(failed, 0, "client calls failed during the flood: {:?}", caller.last_error.lock().unwrap());

        // The flood goes away: a new client connects and calls.
        drop(held);
        let deadline = tokio::time::Instant::now() + grains_tests::scaled(Duration::from_secs(10));
        let fresh = loop {
            let attempt = async {
                let fresh = Client::connect(silo.url()).await.map_err(|e| e.to_string())?;
                fresh.grain::<Counter>("fd-limit-after").increment().await.map_err(|e| e.to_string())?.unwrap();
                Ok::<_, String>(fresh)
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(fresh)) => break fresh,
                other => assert!(tokio::time::Instant::now() < deadline, "no new client got through: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(fresh.grain::<Counter>("fd-limit-after").get().await.unwrap(), 1);
        let (calls, failed) = caller.counts();
        let last_error = caller.last_error.lock().unwrap().clone();
        caller.stop().await;
        assert_eq!(failed, 0, "the first client's calls failed ({calls} ok): {last_error:?}");
        let log = silo.log();
        let warnings = log.lines().filter(|l| l.contains("file descriptors")).count();
        println!("descriptor warnings logged: {warnings}\n{log}");
        assert!((1..=3).contains(&warnings), "the descriptor shortage is logged once per burst, not per connection");
    }
}
