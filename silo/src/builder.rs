//! Starting a silo: the builder, and the wiring of its parts (storage, membership table, cluster, activation
//! table, endpoint, background tasks).

use std::net::SocketAddr;
use std::sync::Arc;

use grains::__private::GrainRegistration;
use grains::CallError;
#[cfg(feature = "postgres")]
use grains_storage::postgres::{self, PostgresMembershipTable, PostgresOptions, PostgresReminderTable};
use grains_storage::{
    GrainStateStore, MembershipTable, MemoryMembershipTable, MemoryReminderTable, MemoryStateStore, ReminderTable,
    SiloAddress,
};

use crate::activation_table::ActivationTable;
use crate::cluster::{Cluster, LocalActivations, membership};
use crate::config::{MembershipKind, SiloConfig, StorageKind};
use crate::filter::{CallFilter, CallFilters, CallInfo};
use crate::gateway;
use crate::metrics::Metrics;
use crate::peer_auth::{ClusterCredentials, PeerIdentity};
use crate::reminders::{self, ReminderService, ReminderSettings};
use crate::silo::{HostedTypes, Silo, SiloInner, SiloParts, collect_idle};

/// The database pool of a silo with Postgres storage or membership.
#[cfg(feature = "postgres")]
pub(crate) type Pool = postgres::PgPool;
/// No pool: this build has no Postgres providers (the `postgres` feature is off).
#[cfg(not(feature = "postgres"))]
pub(crate) type Pool = std::convert::Infallible;

/// Why a silo could not start.
#[derive(Debug, thiserror::Error)]
pub enum SiloError {
    /// The configuration is incomplete or inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// The storage provider or membership table could not be reached or prepared.
    #[error("storage: {0}")]
    Storage(#[from] grains_storage::StorageError),
    /// The TLS settings (`tls_cert`, `tls_key`, `tls_ca`, `tls_client_ca`) cannot be used.
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The silo could not bind its address.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Configures and starts a [`Silo`].
pub struct SiloBuilder {
    config: SiloConfig,
    store: Option<Arc<dyn GrainStateStore>>,
    membership: Option<Arc<dyn MembershipTable>>,
    reminders: Option<Arc<dyn ReminderTable>>,
    filters: CallFilters,
    services: grains::__private::Services,
    pub(crate) events: crate::events::EventsSetup,
}

impl Silo {
    /// A builder with the default configuration (in-memory storage and membership, port 30000).
    pub fn builder() -> SiloBuilder {
        SiloBuilder {
            config: SiloConfig::default(),
            store: None,
            membership: None,
            reminders: None,
            filters: CallFilters::default(),
            services: Default::default(),
            events: Default::default(),
        }
    }
}

impl SiloBuilder {
    /// Adds an incoming call filter: it sees every call entering this silo — from clients, from its grains,
    /// from its process — and may refuse it (see [`crate::filter`]). Filters run in the order added.
    pub fn incoming_filter(
        mut self,
        filter: impl Fn(&CallInfo<'_>) -> Result<(), CallError> + Send + Sync + 'static,
    ) -> Self {
        self.filters.incoming.push(Arc::new(filter) as CallFilter);
        self
    }

    /// Adds an outgoing call filter: it sees every call a grain on this silo makes, before the incoming
    /// filters, and may refuse it (see [`crate::filter`]).
    pub fn outgoing_filter(
        mut self,
        filter: impl Fn(&CallInfo<'_>) -> Result<(), CallError> + Send + Sync + 'static,
    ) -> Self {
        self.filters.outgoing.push(Arc::new(filter) as CallFilter);
        self
    }

    /// Gives this silo's grains `value` as the application service of type `T`: a grain reads it with
    /// [`GrainContext::service::<T>()`](grains::GrainContext::service) (after Orleans' dependency injection).
    /// Register a handle that is cheap to share — a connection pool, a client, settings; a second service of
    /// the same type replaces the first.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), grains_silo::SiloError> {
    /// /// What grains read from the silo's environment.
    /// pub struct Prices { pub vat_percent: u32 }
    ///
    /// let silo = grains_silo::Silo::builder().service(Prices { vat_percent: 20 }).start().await?;
    /// # Ok(()) }
    /// ```
    pub fn service<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.services.insert(value);
        self
    }

    /// Uses `config` instead of the defaults.
    pub fn config(mut self, config: SiloConfig) -> Self {
        self.config = config;
        self
    }

    /// Uses `store` for grain state instead of the provider named in the config.
    pub fn state_store(mut self, store: Arc<dyn GrainStateStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses `table` as the membership table instead of the one named in the config (e.g. one in-memory table
    /// shared by several silos in one process).
    pub fn membership_table(mut self, table: Arc<dyn MembershipTable>) -> Self {
        self.membership = Some(table);
        self
    }

    /// Uses `table` as the reminders table instead of the one the config implies (Postgres with
    /// `storage = "postgres"`, else in memory), e.g. one in-memory table shared by several silos in one
    /// process.
    pub fn reminder_table(mut self, table: Arc<dyn ReminderTable>) -> Self {
        self.reminders = Some(table);
        self
    }

    /// Starts the silo: binds its endpoint, joins the cluster, starts the idle collector, the membership
    /// agent and the reminder service.
    pub async fn start(self) -> Result<Silo, SiloError> {
        let config = self.config;
        config.check_exposure().map_err(SiloError::Config)?;
        crate::stats::start_trace_export(&config).map_err(SiloError::Config)?;
        let server_tls = crate::tls::server_config(&config)?;
        let peer_tls = crate::tls::peer_config(&config)?;
        let advertised_host = config.advertised_host().map_err(|e| SiloError::Config(e.to_string()))?;
        let pool = match (config.storage, config.membership) {
            (StorageKind::Postgres, _) | (_, MembershipKind::Postgres) => Some(open_pool(&config).await?),
            _ => None,
        };
        // State and membership in one Postgres: state writes are fenced by this silo's membership row.
        let fenced = self.membership.is_none() && config.membership == MembershipKind::Postgres;
        let types = GrainRegistration::all()
            .map(|r| (r.type_name, (r, config.idle_timeout_for(r.type_name, r.options.idle_timeout))))
            .collect::<HostedTypes>();

        let listener = if config.gateway {
            let addr = SocketAddr::new(config.host, config.port);
            let bound = match crate::sim::network() {
                Some(network) => network.bind(addr).await,
                None => tokio::net::TcpListener::bind(addr).await.map(crate::sim::TcpNetwork::listener),
            };
            Some(bound.map_err(|source| SiloError::Bind { addr, source })?)
        } else {
            None
        };
        let endpoint = match &listener {
            Some(l) => {
                let bound = l
                    .local_addr()
                    .map_err(|source| SiloError::Bind { addr: SocketAddr::new(config.host, config.port), source })?;
                SocketAddr::new(advertised_host, bound.port()).to_string()
            }
            None => format!("in-process-{}", std::process::id()),
        };
        let me = SiloAddress { endpoint, epoch: membership::now_ms() };
        let identity = PeerIdentity {
            credentials: ClusterCredentials {
                cluster_id: config.cluster_id.clone(),
                secret: config.cluster_secret.clone(),
            },
            endpoint: me.endpoint.clone(),
            tls: peer_tls,
        };
        let table_of_members: Arc<dyn MembershipTable> = match (self.membership, config.membership, &pool) {
            (Some(table), _, _) => table,
            (None, MembershipKind::Memory, _) if config.seed.is_some() => {
                Arc::new(crate::cluster::seed::SeedMembershipTable::new(
                    config.seed.clone().unwrap_or_default(),
                    identity.clone(),
                ))
            }
            #[cfg(feature = "postgres")]
            (None, MembershipKind::Postgres, Some(pool)) => {
                Arc::new(PostgresMembershipTable::new(pool.clone(), config.cluster_id.clone()))
            }
            (None, _, _) => Arc::new(MemoryMembershipTable::new()),
        };
        let store: Arc<dyn GrainStateStore> = match (self.store, config.storage, &pool) {
            (Some(store), _, _) => store,
            #[cfg(feature = "postgres")]
            (None, StorageKind::Postgres, Some(pool)) if fenced => {
                Arc::new(postgres::PostgresStateStore::fenced(pool.clone(), config.cluster_id.clone(), me.clone()))
            }
            #[cfg(feature = "postgres")]
            (None, StorageKind::Postgres, Some(pool)) => Arc::new(postgres::PostgresStateStore::new(pool.clone())),
            (None, _, _) => Arc::new(MemoryStateStore::new()),
        };
        let table = Arc::new(ActivationTable::default());
        let activations = table.clone() as Arc<dyn LocalActivations>;
        let timings = config.failure_detection.timings();
        let cluster = Arc::new(Cluster::new(me.clone(), timings, table_of_members, identity, activations));
        let metrics = Metrics::default();
        let store: Arc<dyn GrainStateStore> =
            Arc::new(crate::fencing::FencedStore::new(store, cluster.clone(), metrics.storage.clone()));
        let reminder_table: Arc<dyn ReminderTable> = match (self.reminders, config.storage, &pool) {
            (Some(table), _, _) => table,
            #[cfg(feature = "postgres")]
            (None, StorageKind::Postgres, Some(pool)) if fenced => {
                Arc::new(PostgresReminderTable::fenced(pool.clone(), config.cluster_id.clone(), me.clone()))
            }
            #[cfg(feature = "postgres")]
            (None, StorageKind::Postgres, Some(pool)) => Arc::new(PostgresReminderTable::new(pool.clone())),
            (None, _, _) => Arc::new(MemoryReminderTable::new()),
        };
        let reminder_table = Arc::new(crate::fencing::FencedReminderTable::new(reminder_table, cluster.clone()));
        let remindable = types.values().filter(|(r, _)| r.remindable).map(|(r, _)| r.type_name);
        let settings =
            ReminderSettings { refresh_interval: config.reminder_refresh_interval, call_timeout: config.call_timeout };
        let reminder_service = ReminderService::new(cluster.clone(), reminder_table, remindable, settings);
        let events = self.events.open(&config, pool.as_ref(), fenced, &me);
        let journal = events.journal_for_grains(cluster.clone());
        let filters = self.filters;
        let inner = SiloInner::new(SiloParts {
            services: self.services,
            config,
            types,
            table,
            store,
            journal,
            cluster,
            reminders: reminder_service.clone(),
            filters,
            metrics,
        });
        #[cfg(feature = "postgres")]
        if let Some(pool) = &pool {
            let _ = inner.metrics.pool.set(pool.clone());
        }
        crate::stats::start_metrics_export(&inner).map_err(SiloError::Config)?;
        let mut names: Vec<_> = inner.types.keys().copied().collect();
        names.sort_unstable();
        if names.is_empty() {
            tracing::warn!(
                "this silo hosts no grain types: every call to it will fail with UnknownGrainType. A silo hosts the \
                 #[grain] types linked into its binary; if they live in a library crate, make main call a function \
                 of that crate (e.g. `my_grains::link()`) so that the linker keeps their registrations"
            );
        }
        tracing::info!(silo = %inner.config.name, address = %inner.me(), cluster = %inner.config.cluster_id, grain_types = ?names, "silo starting");
        tracing::info!(provider = inner.store.name(), membership = ?inner.config.membership, "storage");

        let gateway = match listener {
            Some(listener) => Some(gateway::start(inner.clone(), listener, server_tls).map_err(|source| {
                SiloError::Bind { addr: SocketAddr::new(inner.config.host, inner.config.port), source }
            })?),
            None => None,
        };
        let gateway_address = gateway.as_ref().map(|_| inner.me().endpoint.clone());
        membership::join(&inner.cluster, &inner.config.name, gateway_address).await?;
        membership::refresh_view(&inner.cluster).await;
        inner.cluster.broadcast_membership_changed();
        let runtime: std::sync::Weak<dyn grains::__private::runtime::GrainRuntime> = Arc::downgrade(&inner) as _;
        let mut tasks = vec![
            tokio::spawn(collect_idle(Arc::downgrade(&inner))),
            tokio::spawn(membership::run_agent(Arc::downgrade(&inner.cluster))),
            tokio::spawn(reminders::run(reminder_service, runtime)),
        ];
        tasks.extend(events.spawn_projections(&inner));
        Ok(Silo { inner, tasks, gateway })
    }
}

/// Opens the Postgres pool the configuration names: connect with retries, then migrate.
#[cfg(feature = "postgres")]
async fn open_pool(config: &SiloConfig) -> Result<Pool, SiloError> {
    let url = config.database_url.as_deref().ok_or_else(|| {
        SiloError::Config("postgres storage or membership needs database_url (or GRAINS_DATABASE_URL)".into())
    })?;
    let options =
        PostgresOptions { pool_size: config.database_pool_size, acquire_timeout: config.database_acquire_timeout };
    let pool = postgres::connect_with_retry(url, &options, config.database_start_timeout).await?;
    postgres::migrate(&pool).await?;
    Ok(pool)
}

/// Refuses a configuration that needs Postgres in a build without it.
#[cfg(not(feature = "postgres"))]
async fn open_pool(_: &SiloConfig) -> Result<Pool, SiloError> {
    Err(SiloError::Config(
        "storage or membership \"postgres\" needs grains-silo's `postgres` feature, which this build leaves out".into(),
    ))
}

#[cfg(all(test, not(feature = "postgres")))]
mod tests {
    use crate::config::{SiloConfig, StorageKind};
    use crate::{Silo, SiloError};

    #[tokio::test]
    async fn a_build_without_postgres_refuses_postgres_storage_naming_the_feature() {
        let config = SiloConfig { storage: StorageKind::Postgres, gateway: false, ..SiloConfig::default() };
        match Silo::builder().config(config).start().await {
            Err(SiloError::Config(message)) => assert!(message.contains("`postgres` feature"), "{message}"),
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("a silo without the postgres feature started with postgres storage"),
        }
    }
}
