//! Postgres for tests: a fresh database per test on the server named by `DATABASE_URL`, and throw-away
//! Postgres clusters that a test can stop and start to inject faults.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};

/// The admin URL of the server tests use: `DATABASE_URL`, else the local default on 127.0.0.1:5432.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A database created for one test and dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    admin: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates a uniquely named, empty database on the server at [`admin_url`].
    pub async fn create() -> Self {
        Self::create_on(&admin_url()).await
    }

    /// Creates a uniquely named, empty database on the server at `admin`.
    pub async fn create_on(admin: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = format!("grains_test_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut conn = PgConnection::connect(admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach the test Postgres at {admin}: {e} (run tests with scripts/test)"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        let url = with_database(admin, &name);
        TestDatabase { admin: admin.to_owned(), name, url }
    }

    /// The URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The value of every `Counter` grain stored in this database, by grain key in its text form (`alice`; the
    /// tests' counters have string keys, so these never collide).
    pub async fn counter_values(&self) -> std::collections::HashMap<String, u64> {
        let pool = self.pool().await;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT grain_key, (document->>'value')::bigint FROM grains_state WHERE grain_type = 'Counter'",
        )
        .fetch_all(&pool)
        .await
        .expect("read the stored counters");
        pool.close().await;
        rows.into_iter()
            .map(|(stored, value)| {
                let key = grains::GrainKey::from_storage_key(&stored).unwrap_or_else(|| panic!("row key {stored:?}"));
                (key.to_string(), value as u64)
            })
            .collect()
    }

    /// A migrated pool on this database.
    pub async fn pool(&self) -> PgPool {
        let options = grains_storage::postgres::PostgresOptions::default();
        let pool = grains_storage::postgres::connect(&self.url, &options).await.expect("connect to the test database");
        grains_storage::postgres::migrate(&pool).await.expect("migrate the test database");
        pool
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime: do the async cleanup on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        });
        let _ = cleanup.join();
    }
}

/// A private Postgres cluster in a temporary directory (`initdb` + `pg_ctl`), stopped and removed on drop.
/// Run as root, it runs the server as the `postgres` user, since Postgres refuses to run as root.
#[derive(Debug)]
pub struct ThrowawayPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

fn postgres_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("GRAINS_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    candidates.into_iter().rev().find(|d| d.join("initdb").exists()).unwrap_or_else(|| PathBuf::from("/usr/bin"))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl ThrowawayPostgres {
    /// Creates and starts a cluster on a free port.
    pub fn start() -> Self {
        let bin = postgres_bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "grains-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cluster = ThrowawayPostgres { dir, bin, port: free_port() };
        if is_root() {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&cluster.dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown the cluster dir to postgres");
        }
        let data = cluster.data_dir();
        cluster.run(&cluster.bin.join("initdb"), &["-D", path(&data), "-A", "trust", "-U", "postgres", "--no-sync"]);
        cluster.resume();
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command running a Postgres tool, as the `postgres` user when we are root.
    fn tool(&self, program: &Path) -> Command {
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.current_dir(&self.dir);
        command
    }

    fn run(&self, program: &Path, args: &[&str]) {
        let output = self.tool(program).args(args).output().expect("run a postgres tool");
        assert!(
            output.status.success(),
            "{} {:?} failed: {}{}",
            program.display(),
            args,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The admin URL of this cluster.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&self) {
        let data = self.data_dir();
        self.run(&self.bin.join("pg_ctl"), &["-D", path(&data), "-m", "fast", "-w", "stop"]);
    }

    /// Starts the server again (or for the first time).
    pub fn resume(&self) {
        let data = self.data_dir();
        let log = self.dir.join("server.log");
        let options = format!("-p {} -k {} -h 127.0.0.1 -c fsync=off", self.port, path(&self.dir));
        self.run(&self.bin.join("pg_ctl"), &["-D", path(&data), "-l", path(&log), "-o", &options, "-w", "start"]);
    }

    /// Waits until the server accepts connections.
    pub async fn wait_ready(&self) {
        let url = self.admin_url();
        for _ in 0..100 {
            if PgConnection::connect(&url).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("throw-away postgres on port {} did not come up", self.port);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.tool(&self.bin.join("pg_ctl")).args(["-D", path(&data), "-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h/postgres?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
