//! Silo configuration: one typed struct with defaults, read from a TOML file, `GRAINS_*` environment variables
//! and command-line flags (in rising precedence), and printed at start-up.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::peer_auth::ClusterSecret;
use crate::tls::PemSource;

/// Which grain-state storage provider a silo uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// In-process memory: the embedded default; state lives as long as the silo process.
    #[default]
    Memory,
    /// PostgreSQL at `database_url`: state as JSONB rows, schema migrated at start-up.
    Postgres,
}

/// Where the cluster's membership table lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MembershipKind {
    /// In this process: a single-silo development cluster.
    #[default]
    Memory,
    /// PostgreSQL at `database_url`: silos sharing the database and `cluster_id` form one cluster.
    Postgres,
}

/// How quickly silos detect a dead peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailureDetection {
    /// Orleans-like production timings: probe every 5 s, suspect after 3 missed probes.
    #[default]
    Production,
    /// Test timings: probe every 500 ms.
    Fast,
}

/// The timings of membership and failure detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterTimings {
    /// How often each silo probes its peers.
    pub probe_interval: Duration,
    /// How long a probe may take before it counts as missed.
    pub probe_timeout: Duration,
    /// Consecutive missed probes before a silo votes its peer suspect.
    pub missed_probes_limit: u32,
    /// Suspicion votes (within `vote_expiration`) that declare a silo dead (or every other active silo, when
    /// fewer).
    pub votes_for_death: usize,
    /// How long a suspicion vote counts.
    pub vote_expiration: Duration,
    /// How often each silo re-reads the membership table (it also re-reads when told of a change).
    pub table_refresh_interval: Duration,
    /// How often each silo writes its heartbeat to the table.
    pub heartbeat_interval: Duration,
    /// How many peers each silo probes.
    pub probed_peers: usize,
    /// How long to wait for a connection to a peer.
    pub connect_timeout: Duration,
    /// How long a silo serves after its last confirmation (a membership table read) that it is still a member;
    /// peers wait this long (plus a tenth) after declaring a silo dead before they re-place its grains. Longer
    /// than several `table_refresh_interval`s, so that one slow read does not stop a healthy silo.
    pub lease: Duration,
}

impl ClusterTimings {
    /// Production timings, after Orleans' defaults.
    pub fn production() -> Self {
        Self {
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(5),
            missed_probes_limit: 3,
            votes_for_death: 2,
            vote_expiration: Duration::from_secs(180),
            table_refresh_interval: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(30),
            probed_peers: 3,
            connect_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(20),
        }
    }

    /// Fast timings for tests and demos.
    pub fn fast() -> Self {
        Self {
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(500),
            missed_probes_limit: 3,
            votes_for_death: 2,
            vote_expiration: Duration::from_secs(30),
            table_refresh_interval: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(1),
            probed_peers: 3,
            connect_timeout: Duration::from_secs(1),
            lease: Duration::from_secs(3),
        }
    }
}

impl FailureDetection {
    /// The timings of this profile.
    pub fn timings(self) -> ClusterTimings {
        match self {
            FailureDetection::Production => ClusterTimings::production(),
            FailureDetection::Fast => ClusterTimings::fast(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A clustered silo bound to every interface, with no address to advertise: it would tell its peers
    /// 127.0.0.1, and silos on different hosts with the same port would take each other for older
    /// incarnations of themselves and declare each other dead.
    #[error(
        "host = {host} binds every interface, so this clustered silo cannot tell its peers where to reach it: set \
         advertise_host (flag --advertise-host, env GRAINS_ADVERTISE_HOST) to an address the other silos and \
         clients can reach"
    )]
    NoAdvertisedAddress {
        /// The unspecified address bound.
        host: IpAddr,
    },
}

/// Per-grain-type settings that override what the grain type declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrainTypeConfig {
    /// Idle time before an activation of this type is passivated.
    #[serde(with = "duration_text::option", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

/// Everything a silo needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiloConfig {
    /// A name for logs.
    pub name: String,
    /// The cluster this silo joins: silos sharing a membership table and cluster id form one cluster.
    pub cluster_id: String,
    /// The address the silo binds to, and advertises to peers and clients.
    pub host: IpAddr,
    /// The address peers and clients are told to use, when it differs from `host` (e.g. `host = "0.0.0.0"`).
    /// Default: `host`; when `host` is unspecified, 127.0.0.1 for a silo alone, and required for a silo that
    /// clusters (`membership = "postgres"`, or `seed` set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_host: Option<IpAddr>,
    /// The silo's one port, for clients and peer silos alike (0: any free port; the bound address is
    /// printed).
    #[serde(alias = "gateway_port")]
    pub port: u16,
    /// Whether to listen at all (a silo that does not listen is a cluster of one, reachable in-process only).
    pub gateway: bool,
    /// Where the membership table lives.
    pub membership: MembershipKind,
    /// Development clustering without a database: the `host:port` of a seed silo whose in-memory membership
    /// table this silo joins (the seed itself runs without `seed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    /// Failure-detection timings.
    pub failure_detection: FailureDetection,
    /// How many remote grain locations the routing cache keeps (default 100 000); past it half of the entries
    /// are dropped (one half of the grain-hash space, alternating), to be asked of the directory again.
    pub directory_cache_size: usize,
    /// Idle time before an activation is passivated, for grain types that do not set their own (default 15m).
    #[serde(with = "duration_text")]
    pub default_idle_timeout: Duration,
    /// How often the idle collector looks for activations to passivate (default 1m).
    #[serde(with = "duration_text")]
    pub collection_interval: Duration,
    /// How often the reminder service reads the reminders due in the ring ranges this silo owns (default 30s;
    /// also at once whenever the ranges change). It holds in memory those due within twice this; a reminder
    /// whose owner was not told of its registration starts firing within this (file only).
    #[serde(with = "duration_text")]
    pub reminder_refresh_interval: Duration,
    /// The deadline of calls that do not set their own (default 30s).
    #[serde(with = "duration_text")]
    pub call_timeout: Duration,
    /// The largest request or reply payload accepted, in bytes (default 4 MiB). A larger one is answered
    /// `PayloadTooLarge`; a frame whose header announces more than this plus 64 KiB ends its stream before any
    /// of it is buffered, so each stream holds at most that much of a frame in memory.
    pub max_payload_bytes: usize,
    /// The most calls waiting in one activation's mailbox (default 10 000); a call past it is answered
    /// `Overloaded` at once and does not run.
    pub max_mailbox_length: usize,
    /// The longest deadline a caller may ask for (default 5m); a longer `timeout_ms` is cut to it.
    #[serde(with = "duration_text")]
    pub max_call_timeout: Duration,
    /// The most connections the silo keeps open at once (default 10 000); past it a new connection is closed
    /// at once (and logged once a minute at most). Keep it below the process's file-descriptor limit
    /// (`ulimit -n`, often 1024) so that this limit is the one that refuses connections; a connection that
    /// finds the descriptors exhausted first is closed at once as well, and the clients connected carry on.
    pub max_connections: usize,
    /// How long a new connection may take to open its first request (default 10s) before it is closed.
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    /// How long a connection may send nothing before it is closed (default 10m, above `max_call_timeout`;
    /// the Grains client pings after half its `gateway_liveness_timeout` of silence, silos every 10 s).
    #[serde(with = "duration_text")]
    pub connection_idle_timeout: Duration,
    /// The most calls a client connection may have in flight (default 10 000); past it a call is answered
    /// `Overloaded` at once. Connections from the cluster's silos are not limited.
    pub max_calls_per_connection: usize,
    /// The grain-state storage provider.
    pub storage: StorageKind,
    /// The Postgres URL, for `storage = "postgres"` (printed with its password masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Maximum Postgres connections (default 16); past it storage operations wait for one, up to
    /// `database_acquire_timeout`.
    pub database_pool_size: u32,
    /// How long storage operations wait for a Postgres connection before failing as unavailable (default 3s).
    #[serde(with = "duration_text")]
    pub database_acquire_timeout: Duration,
    /// How long the silo keeps retrying (with backoff) to reach Postgres at start-up before giving up
    /// (default 2m).
    #[serde(with = "duration_text")]
    pub database_start_timeout: Duration,
    /// The secret the cluster's silos prove membership with when they connect to each other (see the
    /// `gateway` module). Without it, any connection that declares itself a silo is taken as one: fine on
    /// loopback, refused on other addresses unless `insecure` (printed as `***`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_secret: Option<ClusterSecret>,
    /// Listen on a non-loopback address without a `cluster_secret`, letting whoever reaches the port run the
    /// cluster's system calls (membership, directory). Off by default: such a silo refuses to start.
    pub insecure: bool,
    /// The certificate chain the silo serves TLS with (PEM, inline or the path of a file). With `tls_key`, the
    /// port speaks TLS only, and the silo dials its peers over TLS too (see the `tls` module).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PemSource>,
    /// The private key of `tls_cert` (PEM, inline or a path; printed as a path, or masked when inline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PemSource>,
    /// The cluster CA: peer silos' certificates must chain to it (default: the system's roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PemSource>,
    /// Ask clients for a certificate chaining to this CA. Optional for the client; its subject is the caller
    /// identity call filters see.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PemSource>,
    /// The name peer silos' certificates are checked against (default: the host of the endpoint each one
    /// advertises, an IP address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Serve the HTTP/JSON API (`/grains/...`, `/cluster`, `/silo/shutdown`) and the dashboard (`/dashboard`)
    /// on the silo's port (default: on). See the `http` module.
    pub http_api: bool,
    /// Serve the HTTP/JSON API and the dashboard to callers on other hosts too (default: off, loopback
    /// callers only). JSON grain calls pass the call filters either way.
    pub http_remote: bool,
    /// The token an operator presents (`Authorization: Bearer ...`) for operator actions such as
    /// `POST /silo/shutdown`; the cluster secret is accepted too. With neither, operator actions are refused
    /// (printed as `***`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<ClusterSecret>,
    /// Where to export traces, over OTLP/HTTP (`http://host:4318`); needs the `otlp` feature, and is ignored
    /// with a warning without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// How often metrics are posted to `otlp_endpoint` (default 10s).
    #[serde(with = "duration_text")]
    pub otlp_metrics_interval: Duration,
    /// Per-grain-type overrides, keyed by grain type name: `[grain.Cart] idle_timeout = "1m"`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub grain: BTreeMap<String, GrainTypeConfig>,
}

/// The default silo port.
pub const DEFAULT_PORT: u16 = 30_000;

impl Default for SiloConfig {
    fn default() -> Self {
        Self {
            name: "silo".to_owned(),
            cluster_id: "dev".to_owned(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_host: None,
            port: DEFAULT_PORT,
            gateway: true,
            membership: MembershipKind::Memory,
            seed: None,
            failure_detection: FailureDetection::Production,
            directory_cache_size: 100_000,
            default_idle_timeout: Duration::from_secs(15 * 60),
            collection_interval: Duration::from_secs(60),
            reminder_refresh_interval: Duration::from_secs(30),
            call_timeout: grains::__private::runtime::DEFAULT_CALL_TIMEOUT,
            max_payload_bytes: 4 * 1024 * 1024,
            max_mailbox_length: 10_000,
            max_call_timeout: Duration::from_secs(5 * 60),
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(10 * 60),
            max_calls_per_connection: 10_000,
            storage: StorageKind::Memory,
            database_url: None,
            database_pool_size: 16,
            database_acquire_timeout: Duration::from_secs(3),
            database_start_timeout: Duration::from_secs(120),
            cluster_secret: None,
            insecure: false,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_client_ca: None,
            tls_server_name: None,
            http_api: true,
            http_remote: false,
            admin_token: None,
            otlp_endpoint: None,
            otlp_metrics_interval: Duration::from_secs(10),
            grain: BTreeMap::new(),
        }
    }
}

impl SiloConfig {
    /// Reads a TOML configuration file; missing keys keep their defaults.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The configuration as TOML, as printed at start-up (any password in `database_url` masked).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = shown.database_url.as_deref().map(mask_password);
        shown.cluster_secret = shown.cluster_secret.map(|_| ClusterSecret::new("***"));
        shown.admin_token = shown.admin_token.map(|_| ClusterSecret::new("***"));
        shown.tls_key = shown.tls_key.as_ref().map(PemSource::masked);
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }

    /// The host peers and clients should connect to. A silo bound to every interface must be told it
    /// (`advertise_host`) when it clusters; a silo alone advertises 127.0.0.1.
    pub fn advertised_host(&self) -> Result<IpAddr, ConfigError> {
        let clusters = self.membership == MembershipKind::Postgres || self.seed.is_some();
        match self.advertise_host {
            Some(host) => Ok(host),
            None if self.host.is_unspecified() && clusters => Err(ConfigError::NoAdvertisedAddress { host: self.host }),
            None if self.host.is_unspecified() => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            None => Ok(self.host),
        }
    }

    /// Refuses a configuration that would let anyone who reaches the silo's port run the cluster's system
    /// calls: listening on a non-loopback address with no `cluster_secret`, unless `insecure` says so.
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.gateway && self.cluster_secret.is_none() && !self.insecure && !self.host.is_loopback() {
            return Err(format!(
                "refusing to listen on {} without a cluster secret: anyone who reaches the port could rewrite the \
                 cluster's membership and directory; set cluster_secret (GRAINS_CLUSTER_SECRET, --cluster-secret, \
                 --cluster-secret-file), bind 127.0.0.1, or pass --insecure (GRAINS_INSECURE=true) to accept that",
                self.host
            ));
        }
        Ok(())
    }

    /// The idle timeout for a grain type: silo override, else the type's own, else the silo default.
    pub fn idle_timeout_for(&self, grain_type: &str, declared: Option<Duration>) -> Duration {
        self.grain.get(grain_type).and_then(|g| g.idle_timeout).or(declared).unwrap_or(self.default_idle_timeout)
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let rest = &url[scheme_end..];
    let Some(at) = rest.find('@') else { return url.to_owned() };
    match rest[..at].find(':') {
        Some(colon) => format!("{}{}:***{}", &url[..scheme_end], &rest[..colon], &rest[at..]),
        None => url.to_owned(),
    }
}

/// Serde for durations written as text (`30s`, `10m`), via `grains::duration`.
pub(crate) mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&grains::duration::format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        grains::duration::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let config =
            SiloConfig::from_toml("port = 4000\ndefault_idle_timeout = \"2m\"\n[grain.Cart]\nidle_timeout = \"30s\"\n")
                .unwrap();
        assert_eq!(config.port, 4000);
        assert_eq!(config.call_timeout, Duration::from_secs(30));
        assert_eq!(config.idle_timeout_for("Cart", Some(Duration::from_secs(600))), Duration::from_secs(30));
        assert_eq!(config.idle_timeout_for("Hello", Some(Duration::from_secs(600))), Duration::from_secs(600));
        assert_eq!(config.idle_timeout_for("Other", None), Duration::from_secs(120));
    }

    #[test]
    fn the_printed_config_reads_back_the_same() {
        let mut config = SiloConfig::default();
        config.grain.insert("Cart".into(), GrainTypeConfig { idle_timeout: Some(Duration::from_secs(5)) });
        assert_eq!(SiloConfig::from_toml(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn passwords_are_masked_when_printed() {
        let config = SiloConfig {
            database_url: Some("postgres://grains:s3cret@db:5432/grains".into()),
            ..SiloConfig::default()
        };
        let printed = config.to_toml();
        assert!(printed.contains("postgres://grains:***@db:5432/grains"), "{printed}");
        assert!(!printed.contains("s3cret"));
        assert_eq!(mask_password("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn a_silo_bound_to_every_interface_advertises_a_reachable_address() {
        let any = SiloConfig { host: "0.0.0.0".parse().unwrap(), ..SiloConfig::default() };
        assert_eq!(any.advertised_host(), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)), "a silo alone");
        let told = SiloConfig { advertise_host: Some("10.1.2.3".parse().unwrap()), ..any.clone() };
        assert_eq!(told.advertised_host().unwrap().to_string(), "10.1.2.3");
        assert_eq!(SiloConfig::default().advertised_host(), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let bound = SiloConfig { host: "10.0.0.7".parse().unwrap(), membership: MembershipKind::Postgres, ..any };
        assert_eq!(bound.advertised_host().unwrap().to_string(), "10.0.0.7");
    }

    #[test]
    fn a_clustered_silo_bound_to_every_interface_must_be_told_what_to_advertise() {
        let any = SiloConfig { host: "0.0.0.0".parse().unwrap(), ..SiloConfig::default() };
        let postgres = SiloConfig { membership: MembershipKind::Postgres, ..any.clone() };
        let seeded = SiloConfig { seed: Some("10.0.0.1:30000".into()), ..any.clone() };
        let ipv6 = SiloConfig { host: "::".parse().unwrap(), ..postgres.clone() };
        for config in [&postgres, &seeded, &ipv6] {
            let error = config.advertised_host().unwrap_err();
            let message = error.to_string();
            for names in ["advertise_host", "--advertise-host", "GRAINS_ADVERTISE_HOST"] {
                assert!(message.contains(names), "the error names {names}: {message}");
            }
        }
        let told = SiloConfig { advertise_host: Some("10.1.2.3".parse().unwrap()), ..postgres };
        assert_eq!(told.advertised_host().unwrap().to_string(), "10.1.2.3");
    }

    #[test]
    fn the_cluster_secret_is_masked_when_printed() {
        let config = SiloConfig { cluster_secret: Some("hunter2".into()), ..SiloConfig::default() };
        let printed = config.to_toml();
        assert!(printed.contains("cluster_secret = \"***\""), "{printed}");
        assert!(!printed.contains("hunter2"));
    }

    #[test]
    fn an_inline_tls_key_is_masked_when_printed_and_a_path_is_shown() {
        let inline = SiloConfig {
            tls_cert: Some("/etc/grains/silo.pem".into()),
            tls_key: Some("-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n".into()),
            ..SiloConfig::default()
        };
        let printed = inline.to_toml();
        assert!(printed.contains("tls_key = \"(inline PEM)\"") && !printed.contains("secret"), "{printed}");
        assert!(printed.contains("tls_cert = \"/etc/grains/silo.pem\""), "{printed}");
    }

    #[test]
    fn a_public_address_needs_a_secret_or_an_explicit_insecure() {
        let public = SiloConfig { host: "0.0.0.0".parse().unwrap(), ..SiloConfig::default() };
        let refused = public.check_exposure().unwrap_err();
        assert!(refused.contains("--insecure") && refused.contains("cluster_secret"), "{refused}");
        assert!(SiloConfig { insecure: true, ..public.clone() }.check_exposure().is_ok());
        assert!(SiloConfig { cluster_secret: Some("s".into()), ..public.clone() }.check_exposure().is_ok());
        assert!(SiloConfig { gateway: false, ..public }.check_exposure().is_ok());
        assert!(SiloConfig::default().check_exposure().is_ok(), "loopback is fine without a secret");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(SiloConfig::from_toml("gateway_prot = 1").is_err());
        assert_eq!(SiloConfig::from_toml("gateway_port = 7").unwrap().port, 7, "the old name still reads");
    }
}
