//! Silos as separate OS processes, for tests that need what one process cannot give: a `kill -9`, a
//! `SIGSTOP`, a network namespace, or memory measured for the silo alone.
//!
//! The test silo binary prints `gateway listening on <addr>` once it serves; [`SiloLauncher::start`] waits for
//! that line, so a [`SiloProcess`] is always reachable when handed over. The process is killed when dropped,
//! so a failing test leaves no silo behind.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How to start one silo process: the binary, its arguments, and where it runs.
#[derive(Debug)]
pub struct SiloLauncher {
    command: Command,
    keep_log: bool,
}

impl SiloLauncher {
    /// The silo binary at `binary` (in an integration test: `env!("CARGO_BIN_EXE_grains-test-silo")`), with
    /// colourless logs.
    pub fn new(binary: impl AsRef<OsStr>) -> Self {
        let mut command = Command::new(binary);
        command.env("NO_COLOR", "1");
        SiloLauncher { command, keep_log: false }
    }

    /// The silo binary run inside the network namespace `namespace` (`ip netns exec`, which execs in place:
    /// the child's pid is the silo's, so signals reach it).
    pub fn in_namespace(binary: impl AsRef<OsStr>, namespace: &str) -> Self {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", namespace]).arg(binary).env("NO_COLOR", "1");
        SiloLauncher { command, keep_log: false }
    }

    /// Adds command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    /// Sets an environment variable of the silo process.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Keeps what the silo writes to stderr (its log), for [`SiloProcess::log`]; otherwise it is discarded.
    pub fn keep_log(mut self) -> Self {
        self.keep_log = true;
        self
    }

    /// Starts the silo and returns once it listens. Panics, with its log, if it exits first.
    pub fn start(mut self) -> SiloProcess {
        let stderr = if self.keep_log { Stdio::piped() } else { Stdio::null() };
        let mut child =
            self.command.stdout(Stdio::piped()).stderr(stderr).spawn().expect("the test silo binary starts");
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("gateway listening on ") {
                        break addr.to_owned();
                    }
                }
                _ => {
                    let _ = child.wait();
                    // The stderr reader may still be copying the last lines.
                    std::thread::sleep(Duration::from_millis(100));
                    panic!("the silo exited before listening:\n{}", log.lock().unwrap_or_else(|e| e.into_inner()));
                }
            }
        };
        // Keep draining stdout so the silo never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        SiloProcess { child, addr, log }
    }
}

/// A running silo process, killed (`SIGKILL`) when dropped.
#[derive(Debug)]
pub struct SiloProcess {
    child: Child,
    /// The `host:port` it listens on (and advertises).
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl SiloProcess {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("the silo printed host:port")
    }

    /// The silo's URL for a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (as `kill` spells it: `-STOP`, `-CONT`, `-TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} {}", self.child.id());
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait on the silo process")
    }

    /// Waits up to `within` for it to exit, without blocking the async runtime.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What it wrote to stderr so far (empty unless started with [`SiloLauncher::keep_log`]).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// CPU time the process has used so far (user + system, all threads), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("/proc/<pid>/stat");
        // The command name, in parentheses, may hold spaces: the fields are counted after its closing one.
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|t| t.parse::<u64>().ok()).expect("utime and stime in stat");
        // Fields 14 and 15 of stat(5): the first after the name is field 3.
        let total = ticks(14 - 3) + ticks(15 - 3);
        Duration::from_secs_f64(total as f64 / clock_ticks_per_second() as f64)
    }

    /// The limit on open file descriptors the process runs under (`Max open files` in `/proc/<pid>/limits`).
    pub fn open_files_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id())).expect("/proc/<pid>/limits");
        limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|soft| soft.parse().ok())
            .expect("Max open files in /proc/<pid>/limits")
    }

    /// How many file descriptors the process has open now.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, |fds| fds.count())
    }

    /// Resident memory, in MiB, from /proc.
    pub fn rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("/proc/<pid>/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib / 1024
    }
}

impl Drop for SiloProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's clock ticks per second, in which `/proc/<pid>/stat` counts CPU time (`getconf CLK_TCK`; 100
/// on every Linux configuration in practice).
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100)
    })
}
