//! The silo binary's command line: a user's silo is `fn main() -> ExitCode { grains_silo::cli::run() }`,
//! hosting every `#[grain]` type linked into that binary.
//!
//! A silo whose grains need application services (a database pool, a client of another system) registers them
//! on the builder that [`run_customized`] and [`run_with_builder`] pass through; a service that takes `.await`
//! to build is built in the binary's own runtime before [`run_with_builder`]:
//!
//! ```no_run
//! use std::process::ExitCode;
//! use grains_silo::cli::{self, SiloArgs};
//!
//! /// Shared by every grain of the silo; a grain reads it with `ctx.service::<Prices>()`.
//! pub struct Prices { pub vat_percent: u32 }
//!
//! #[tokio::main]
//! async fn main() -> ExitCode {
//!     let prices = Prices { vat_percent: 20 }; // or a pool: `sqlx::PgPool::connect(url).await?`
//!     match cli::run_with_builder(SiloArgs::from_command_line(), |builder, _| builder.service(prices)).await {
//!         Ok(()) => ExitCode::SUCCESS,
//!         Err(e) => {
//!             eprintln!("silo failed: {e}");
//!             ExitCode::FAILURE
//!         }
//!     }
//! }
//! ```
//!
//! Settings come from defaults, then a TOML file (`--config`), then `GRAINS_*` environment variables, then
//! flags; the effective configuration is printed at start-up. The silo runs until Ctrl-C or SIGTERM, then
//! shuts down gracefully (grains deactivate and may flush their state).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::builder::{SiloBuilder, SiloError};
use crate::config::{FailureDetection, MembershipKind, SiloConfig, StorageKind};
use crate::peer_auth::ClusterSecret;
use crate::silo::Silo;
use crate::tls::PemSource;

/// Why a silo run from the command line did not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A file named by a flag (`--config`, `--cluster-secret-file`) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for [`SiloConfig`].
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: toml::de::Error,
    },
    /// The cluster secret file holds no secret.
    #[error("the cluster secret file {0} is empty")]
    EmptySecret(PathBuf),
    /// The silo could not start.
    #[error(transparent)]
    Start(#[from] SiloError),
    /// The cluster declared this silo dead; it stopped serving (its grains now live elsewhere).
    #[error("this silo was declared dead by the cluster and stopped serving")]
    DeclaredDead,
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    grains::duration::parse_duration(text).map_err(str::to_owned)
}

/// `Type=duration`, as in `--grain-idle-timeout Cart=1m`.
fn type_duration_arg(text: &str) -> Result<(String, Duration), String> {
    let (grain_type, duration) =
        text.split_once('=').ok_or_else(|| format!("expected `Type=duration` (e.g. `Cart=1m`), got `{text}`"))?;
    if grain_type.trim().is_empty() {
        return Err(format!("no grain type before `=` in `{text}`"));
    }
    Ok((grain_type.trim().to_owned(), duration_arg(duration.trim())?))
}

/// Command-line flags of a silo. Every flag can also be set through its `GRAINS_*` environment variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "grains-silo", version, about = "A Grains silo: hosts virtual grains and serves clients")]
pub struct SiloArgs {
    /// A TOML configuration file (keys as printed at start-up).
    #[arg(long, env = "GRAINS_CONFIG")]
    pub config: Option<PathBuf>,
    /// A name for logs.
    #[arg(long, env = "GRAINS_NAME")]
    pub name: Option<String>,
    /// The address to bind.
    #[arg(long, env = "GRAINS_HOST")]
    pub host: Option<IpAddr>,
    /// The address to advertise to peers and clients (when binding 0.0.0.0).
    #[arg(long, env = "GRAINS_ADVERTISE_HOST")]
    pub advertise_host: Option<IpAddr>,
    /// The silo's port, for clients and peer silos (0: any free port).
    #[arg(long, env = "GRAINS_PORT", alias = "gateway-port")]
    pub port: Option<u16>,
    /// The cluster to join (silos sharing a membership table and cluster id form one cluster).
    #[arg(long, env = "GRAINS_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Where the membership table lives (`postgres` for a multi-silo cluster).
    #[arg(long, env = "GRAINS_MEMBERSHIP", value_enum)]
    pub membership: Option<MembershipKind>,
    /// Development clustering: join the in-memory membership table of the seed silo at `host:port`.
    #[arg(long, env = "GRAINS_SEED")]
    pub seed: Option<String>,
    /// Failure-detection timings.
    #[arg(long, env = "GRAINS_FAILURE_DETECTION", value_enum)]
    pub failure_detection: Option<FailureDetection>,
    /// Whether the silo listens on its port (`false`: an in-process silo that serves no clients or peers).
    #[arg(long, env = "GRAINS_GATEWAY")]
    pub gateway: Option<bool>,
    /// How many grain locations the directory cache keeps.
    #[arg(long, env = "GRAINS_DIRECTORY_CACHE_SIZE")]
    pub directory_cache_size: Option<usize>,
    /// How often the reminder service re-reads the reminders of the ring ranges it owns (e.g. 1m).
    #[arg(long, env = "GRAINS_REMINDER_REFRESH_INTERVAL", value_parser = duration_arg)]
    pub reminder_refresh_interval: Option<Duration>,
    /// Whether the HTTP/JSON API and dashboard are served on the port.
    #[arg(long, env = "GRAINS_HTTP_API")]
    pub http_api: Option<bool>,
    /// How often metrics are exported over OTLP (e.g. 10s).
    #[arg(long, env = "GRAINS_OTLP_METRICS_INTERVAL", value_parser = duration_arg)]
    pub otlp_metrics_interval: Option<Duration>,
    /// A grain type's own idle timeout, `Type=duration` (e.g. `Cart=1m`); repeat the flag, or separate
    /// pairs with commas in the variable (`GRAINS_GRAIN_IDLE_TIMEOUT=Cart=1m,Hello=30s`).
    #[arg(long, env = "GRAINS_GRAIN_IDLE_TIMEOUT", value_parser = type_duration_arg, value_delimiter = ',')]
    pub grain_idle_timeout: Vec<(String, Duration)>,
    /// Idle time before passivation for grain types without their own (e.g. 15m).
    #[arg(long, env = "GRAINS_DEFAULT_IDLE_TIMEOUT", value_parser = duration_arg)]
    pub default_idle_timeout: Option<Duration>,
    /// How often the idle collector runs (e.g. 1m).
    #[arg(long, env = "GRAINS_COLLECTION_INTERVAL", value_parser = duration_arg)]
    pub collection_interval: Option<Duration>,
    /// The default call deadline (e.g. 30s).
    #[arg(long, env = "GRAINS_CALL_TIMEOUT", value_parser = duration_arg)]
    pub call_timeout: Option<Duration>,
    /// The largest payload accepted, in bytes.
    #[arg(long, env = "GRAINS_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// The most calls waiting in one activation's mailbox; past it calls are answered `Overloaded`.
    #[arg(long, env = "GRAINS_MAX_MAILBOX_LENGTH")]
    pub max_mailbox_length: Option<usize>,
    /// The longest deadline a caller may ask for (e.g. 5m).
    #[arg(long, env = "GRAINS_MAX_CALL_TIMEOUT", value_parser = duration_arg)]
    pub max_call_timeout: Option<Duration>,
    /// The most connections kept open at once.
    #[arg(long, env = "GRAINS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// How long a new connection may take to open its first request (e.g. 10s).
    #[arg(long, env = "GRAINS_HANDSHAKE_TIMEOUT", value_parser = duration_arg)]
    pub handshake_timeout: Option<Duration>,
    /// How long a connection may send nothing before it is closed (e.g. 10m).
    #[arg(long, env = "GRAINS_CONNECTION_IDLE_TIMEOUT", value_parser = duration_arg)]
    pub connection_idle_timeout: Option<Duration>,
    /// The most calls a client connection may have in flight.
    #[arg(long, env = "GRAINS_MAX_CALLS_PER_CONNECTION")]
    pub max_calls_per_connection: Option<usize>,
    /// The grain-state storage provider.
    #[arg(long, env = "GRAINS_STORAGE", value_enum)]
    pub storage: Option<StorageKind>,
    /// The Postgres URL for `--storage postgres` (e.g. postgres://user@127.0.0.1:5432/grains).
    #[arg(long, env = "GRAINS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Maximum Postgres connections.
    #[arg(long, env = "GRAINS_DATABASE_POOL_SIZE")]
    pub database_pool_size: Option<u32>,
    /// How long a storage operation waits for a free Postgres connection (e.g. 5s).
    #[arg(long, env = "GRAINS_DATABASE_ACQUIRE_TIMEOUT", value_parser = duration_arg)]
    pub database_acquire_timeout: Option<Duration>,
    /// How long to keep retrying to reach Postgres at start-up (e.g. 2m).
    #[arg(long, env = "GRAINS_DATABASE_START_TIMEOUT", value_parser = duration_arg)]
    pub database_start_timeout: Option<Duration>,
    /// The secret the cluster's silos prove membership with (prefer `--cluster-secret-file`: a flag's value
    /// is visible to other users of the machine).
    #[arg(long, env = "GRAINS_CLUSTER_SECRET", hide_env_values = true, conflicts_with = "cluster_secret_file")]
    pub cluster_secret: Option<String>,
    /// A file holding the cluster secret (one line; a trailing newline is ignored).
    #[arg(long, env = "GRAINS_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Listen on a non-loopback address without a cluster secret (anyone who reaches the port can then run
    /// the cluster's system calls).
    #[arg(long, env = "GRAINS_INSECURE")]
    pub insecure: bool,
    /// The token operators present for operator actions (`POST /silo/shutdown`).
    #[arg(long, env = "GRAINS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Serve the HTTP/JSON API and the dashboard to other hosts, not only to loopback callers.
    #[arg(long, env = "GRAINS_HTTP_REMOTE")]
    pub http_remote: bool,
    /// Export traces to this OpenTelemetry collector over OTLP/HTTP (`http://host:4318`; needs the `otlp`
    /// feature).
    #[arg(long, env = "GRAINS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The certificate chain to serve TLS with: a PEM file, or PEM text.
    #[arg(long, env = "GRAINS_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// The private key of `--tls-cert`: a PEM file, or PEM text.
    #[arg(long, env = "GRAINS_TLS_KEY", hide_env_values = true)]
    pub tls_key: Option<String>,
    /// The cluster CA peer silos' certificates must chain to (default: the system's roots).
    #[arg(long, env = "GRAINS_TLS_CA")]
    pub tls_ca: Option<String>,
    /// Ask clients for a certificate chaining to this CA (optional for them; call filters see its subject).
    #[arg(long, env = "GRAINS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<String>,
    /// The name peer silos' certificates are checked against (default: each peer's advertised IP address).
    #[arg(long, env = "GRAINS_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax (e.g. `info`, `grains_silo=debug`).
    #[arg(long, env = "GRAINS_LOG", default_value = "info")]
    pub log: String,
}

impl SiloArgs {
    /// The flags of this process's command line (and their `GRAINS_*` variables); prints help or an error and
    /// exits on `--help` or a bad flag.
    pub fn from_command_line() -> Self {
        Self::parse()
    }

    /// The effective configuration: defaults, then the file, then these flags (which include env vars).
    pub fn to_config(&self) -> Result<SiloConfig, CliError> {
        let mut config = match &self.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| CliError::Read { path: path.clone(), source })?;
                SiloConfig::from_toml(&text).map_err(|source| CliError::Parse { path: path.clone(), source })?
            }
            None => SiloConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { config.$field = v.clone(); } )* };
        }
        set!(
            name,
            host,
            port,
            cluster_id,
            membership,
            failure_detection,
            default_idle_timeout,
            collection_interval,
            call_timeout,
            max_payload_bytes,
            max_mailbox_length,
            max_call_timeout,
            max_connections,
            handshake_timeout,
            connection_idle_timeout,
            max_calls_per_connection,
            storage,
            database_pool_size,
            database_start_timeout,
            database_acquire_timeout,
            gateway,
            directory_cache_size,
            reminder_refresh_interval,
            http_api,
            otlp_metrics_interval
        );
        for (grain_type, timeout) in &self.grain_idle_timeout {
            config.grain.entry(grain_type.clone()).or_default().idle_timeout = Some(*timeout);
        }
        if let Some(url) = &self.database_url {
            config.database_url = Some(url.clone());
        }
        if let Some(host) = self.advertise_host {
            config.advertise_host = Some(host);
        }
        if let Some(seed) = &self.seed {
            config.seed = Some(seed.clone());
        }
        if let Some(secret) = &self.cluster_secret {
            config.cluster_secret = Some(ClusterSecret::new(secret.clone()));
        }
        if let Some(path) = &self.cluster_secret_file {
            let text = std::fs::read_to_string(path).map_err(|source| CliError::Read { path: path.clone(), source })?;
            let secret = text.trim_end_matches(['\r', '\n']);
            if secret.is_empty() {
                return Err(CliError::EmptySecret(path.clone()));
            }
            config.cluster_secret = Some(ClusterSecret::new(secret));
        }
        if let Some(token) = &self.admin_token {
            config.admin_token = Some(ClusterSecret::new(token.clone()));
        }
        if self.http_remote {
            config.http_remote = true;
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            config.otlp_endpoint = Some(endpoint.clone());
        }
        if self.insecure {
            config.insecure = true;
        }
        for (flag, key) in [
            (&self.tls_cert, &mut config.tls_cert),
            (&self.tls_key, &mut config.tls_key),
            (&self.tls_ca, &mut config.tls_ca),
            (&self.tls_client_ca, &mut config.tls_client_ca),
        ] {
            if let Some(source) = flag {
                *key = Some(PemSource::new(source.clone()));
            }
        }
        if let Some(name) = &self.tls_server_name {
            config.tls_server_name = Some(name.clone());
        }
        Ok(config)
    }
}

/// Parses the process's arguments and runs a silo until Ctrl-C or SIGTERM. The whole `main` of a silo binary.
pub fn run() -> ExitCode {
    run_customized(|builder, _| builder)
}

/// [`run`], with the silo's builder passed through `customize` before the silo starts: a silo binary adds its
/// projections, call filters, storage or application services
/// ([`SiloBuilder::service`](crate::SiloBuilder::service)) there, seeing the effective configuration.
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     grains_silo::cli::run_customized(|builder, config| {
///         let _ = config.storage; // e.g. register a Postgres-only projection only with Postgres storage
///         builder
///     })
/// }
/// ```
pub fn run_customized(customize: impl FnOnce(SiloBuilder, &SiloConfig) -> SiloBuilder) -> ExitCode {
    let args = SiloArgs::from_command_line();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_with_builder(args, customize)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("silo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a silo with `args` until Ctrl-C or SIGTERM (for binaries that build their own runtime).
pub async fn run_with(args: SiloArgs) -> Result<(), CliError> {
    run_with_builder(args, |builder, _| builder).await
}

/// [`run_with`], with the builder passed through `customize` (see [`run_customized`]).
pub async fn run_with_builder(
    args: SiloArgs,
    customize: impl FnOnce(SiloBuilder, &SiloConfig) -> SiloBuilder,
) -> Result<(), CliError> {
    init_logging(&args.log);
    let config = args.to_config()?;
    println!("# effective silo configuration\n{}", config.to_toml());
    let builder = customize(Silo::builder(), &config);
    let silo = builder.config(config).start().await?;
    if let Some(addr) = silo.gateway_addr() {
        // A line scripts and tests wait for.
        println!("gateway listening on {addr}");
    }
    let declared_dead = silo.stopped();
    let operator_stop = silo.shutdown_requested();
    tokio::select! {
        () = wait_for_stop_signal() => {
            silo.shutdown(Duration::from_secs(30)).await;
            Ok(())
        }
        () = operator_stop => {
            tracing::info!("an operator asked this silo to stop (POST /silo/shutdown)");
            silo.shutdown(Duration::from_secs(30)).await;
            Ok(())
        }
        () = declared_dead => {
            // Zombie safety: the cluster has moved this silo's grains elsewhere; it must not serve them.
            Err(CliError::DeclaredDead)
        }
    }
}

/// Installs a `tracing` subscriber writing to stderr, unless one is installed already.
pub fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    /// Parses `args` as the flags alone: the `GRAINS_*` variables of the machine running the tests are not read.
    fn try_flags<const N: usize>(args: [&str; N]) -> Result<SiloArgs, clap::Error> {
        let command = SiloArgs::command().mut_args(|arg| arg.env(None::<&str>));
        SiloArgs::from_arg_matches(&command.try_get_matches_from(args)?)
    }

    fn flags<const N: usize>(args: [&str; N]) -> SiloArgs {
        try_flags(args).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("grains-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("silo.toml");
        std::fs::write(&file, "port = 4100\nname = \"from-file\"\ncall_timeout = \"5s\"\n").unwrap();
        let args = flags(["silo", "--config", file.to_str().unwrap(), "--gateway-port", "4200"]);
        let config = args.to_config().unwrap();
        assert_eq!(config.port, 4200);
        assert_eq!(config.name, "from-file");
        assert_eq!(config.call_timeout, Duration::from_secs(5));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_configuration_key_has_a_grains_variable() {
        let command = SiloArgs::command();
        let variables: Vec<String> = command
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .collect();
        let mut config = SiloConfig::default();
        config.grain.insert("Cart".into(), crate::config::GrainTypeConfig { idle_timeout: Some(Duration::ZERO) });
        let printed: toml::Table = toml::from_str(&config.to_toml()).unwrap();
        let missing: Vec<_> = printed
            .keys()
            .map(|key| match key.as_str() {
                "grain" => "GRAINS_GRAIN_IDLE_TIMEOUT".to_owned(),
                key => format!("GRAINS_{}", key.to_uppercase()),
            })
            .filter(|variable| !variables.contains(variable))
            .collect();
        assert_eq!(missing, Vec::<String>::new(), "configuration keys without a variable");
    }

    #[test]
    fn idle_timeouts_per_type_come_from_flags_and_lists() {
        let args = flags([
            "silo",
            "--gateway",
            "false",
            "--grain-idle-timeout",
            "Cart=1m",
            "--grain-idle-timeout",
            "Hello=30s,Cart=2m",
        ]);
        let config = args.to_config().unwrap();
        assert!(!config.gateway);
        assert_eq!(config.idle_timeout_for("Cart", None), Duration::from_secs(120), "the last one wins");
        assert_eq!(config.idle_timeout_for("Hello", None), Duration::from_secs(30));
        assert!(try_flags(["silo", "--grain-idle-timeout", "Cart"]).is_err());
        assert!(try_flags(["silo", "--grain-idle-timeout", "Cart=soon"]).is_err());
    }

    #[test]
    fn the_cluster_secret_is_read_from_a_file_and_insecure_from_a_flag() {
        let dir = std::env::temp_dir().join(format!("grains-cli-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let args = flags(["silo", "--cluster-secret-file", file.to_str().unwrap(), "--insecure"]);
        let config = args.to_config().unwrap();
        assert_eq!(config.cluster_secret, Some(ClusterSecret::new("s3cret")));
        assert!(config.insecure);
        assert!(try_flags(["silo", "--cluster-secret", "a", "--cluster-secret-file", "b"]).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
