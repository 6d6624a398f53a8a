//! Atoll's control plane: the source of truth that every data-plane node
//! follows.
//!
//! It serves, on one port:
//! - the REST API (axum) to apply, read, delete, roll back and audit
//!   resources, list nodes and run barriers (`docs/api.md`);
//! - the config stream (tonic, gRPC) that pushes versioned snapshots and
//!   deltas to gateways, sidecars and agents and collects their ACKs and NACKs
//!   (`docs/config-stream.md`);
//! - `/metrics` for Prometheus, `/healthz`, `/readyz`, `/openapi.json`.
//!
//! It never writes an invalid whole to the store, and it holds no state that
//! the store does not: node connections are soft state that nodes rebuild by
//! reconnecting. It does not run workloads or route traffic.

mod access;
mod approvals;
mod audit;
mod control;
mod health;
mod join;
mod leadership;
mod leases;
mod metrics;
mod nodes;
mod openapi;
mod peer;
mod registry;
mod rest;
mod state;
mod stream;
mod switchover;
mod tokens;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use atoll_api::config::config_stream_server::ConfigStreamServer;
use atoll_api::registry::registry_server::RegistryServer;
use atoll_store::{Coordination, EmbeddedStore, EtcdOptions, EtcdStore, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use access::AccessOptions;
pub use join::IssuerOptions;

/// Where the control plane keeps its state.
#[derive(Clone, Debug)]
pub enum StoreOptions {
    /// The embedded redb store in this directory.
    Embedded {
        /// The data directory.
        dir: PathBuf,
    },
    /// An etcd cluster.
    Etcd(EtcdOptions),
}

impl StoreOptions {
    /// A short description, e.g. `embedded:/var/lib/atoll`.
    pub fn describe(&self) -> String {
        match self {
            StoreOptions::Embedded { dir } => format!("embedded:{}", dir.display()),
            StoreOptions::Etcd(options) => format!("etcd:{}", options.endpoints.join(",")),
        }
    }

    /// Opens the store: the resource store and the coordination keyspace
    /// of the same backend.
    pub async fn open(&self) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn Coordination>)> {
        Ok(match self {
            StoreOptions::Embedded { dir } => {
                let store =
                    Arc::new(EmbeddedStore::open(dir).with_context(|| {
                        format!("opening the embedded store in {}", dir.display())
                    })?);
                (store.clone(), store)
            }
            StoreOptions::Etcd(options) => {
                let store = Arc::new(
                    EtcdStore::connect(options.clone())
                        .await
                        .context("connecting to etcd")?,
                );
                (store.clone(), store)
            }
        })
    }
}

/// How to run the control plane.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// Address for the REST API and the config stream.
    pub listen: SocketAddr,
    /// The store.
    pub store: StoreOptions,
    /// Disconnected nodes are forgotten after this long.
    pub node_expiry: Duration,
    /// How long a graceful stop waits for requests in flight.
    pub drain_timeout: Duration,
    /// A node silent this long (no heartbeat, ACK or NACK) is dropped.
    pub heartbeat_timeout: Duration,
    /// How long an ownership lease lasts; zero turns leases off (writes
    /// then continue without the control plane, and a failover cannot know
    /// that a lost cell stopped writing).
    pub lease_duration: Duration,
    /// The URL other replicas and clients reach this one at (default:
    /// `http://` and the listen address).
    pub advertise: Option<String>,
    /// The TTL of the election lease: a leader that dies is replaced within
    /// about this long.
    pub election_ttl: Duration,
    /// How this replica reaches the others (passing changes and lease
    /// renewals on to the leader).
    pub transport: atoll_transport::Transport,
    /// TLS for every connection (the REST API and the config stream); the
    /// peer's verified certificate reaches every handler. None: plain HTTP.
    pub tls: Option<atoll_transport::ServerTls>,
    /// Who may do what on the REST API (`docs/security.md`).
    pub access: AccessOptions,
    /// Issue node certificates (`/v1/join`, `/v1/renew`) with this CA.
    pub issuer: Option<IssuerOptions>,
}

/// A bound, not yet serving, control plane.
#[derive(Debug)]
pub struct ControlServer {
    listener: TcpListener,
    options: ControlOptions,
}

impl ControlServer {
    /// Binds the listen address. Fails with a clear message when the port is
    /// in use.
    pub async fn bind(options: ControlOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(options.listen).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                anyhow::anyhow!(
                    "{} is already in use (another `atoll control`?); choose another address with --listen",
                    options.listen
                )
            } else {
                anyhow::anyhow!("cannot listen on {}: {e}", options.listen)
            }
        })?;
        Ok(Self { listener, options })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Opens the store and serves until `shutdown` completes, then drains.
    /// `ready` is called once the server accepts requests.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        ready: impl FnOnce() + Send,
    ) -> anyhow::Result<()> {
        let (store, coordination) = self.options.store.open().await?;
        let (cache, follower) = state::ConfigCache::start(store.clone())
            .await
            .context("loading the configuration from the store")?;
        let (stop, stopping) = watch::channel(false);
        let metrics = Arc::new(metrics::Metrics::new());
        let address = self.local_addr()?;
        let advertise = self.options.advertise.clone().unwrap_or_else(|| {
            let host = match address.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            };
            let scheme = if self.options.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{host}:{}", address.port())
        });
        let nodes = Arc::new(nodes::NodeRegistry::for_replica(advertise.clone()));
        // Only replicas share node records: the embedded store is one
        // process, and its registry already is the whole fleet.
        let shared = store.backend() != "embedded";
        let publisher = shared.then(|| tokio::spawn(nodes.clone().publish(coordination.clone())));
        let fleet = shared.then(|| tokio::spawn(nodes.clone().follow(coordination.clone())));
        let leadership = leadership::Leadership::new(
            coordination.clone(),
            advertise,
            self.options.election_ttl,
            metrics.clone(),
        );
        let writer = Arc::new(writer::Writer {
            store: store.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            leadership: leadership.clone(),
            turn: tokio::sync::Mutex::new(()),
            parsing: tokio::sync::Semaphore::new(crate::writer::PARSERS),
        });
        let control = control::Control::new(
            writer,
            coordination,
            nodes.clone(),
            metrics.clone(),
            stopping.clone(),
            self.options.node_expiry,
            self.options.lease_duration,
            leadership.clone(),
            &self.options.transport,
            self.options.access.clone(),
            self.options.issuer.clone(),
        );
        let elector = tokio::spawn(leadership.clone().run(stopping.clone()));
        let terms = tokio::spawn(control.clone().follow_leadership());
        let announcer = tokio::spawn(control.clone().announce());
        let config_stream = stream::ConfigStreamService {
            cache,
            nodes: nodes.clone(),
            metrics,
            shutdown: stopping.clone(),
            heartbeat_timeout: self.options.heartbeat_timeout,
            control: control.clone(),
            leader: Arc::new(stream::LeaderChannel::new(&self.options.transport)),
        };
        // gRPC shares the port: its paths are `/atoll.config.v1.ConfigStream/...`.
        let registry_follower = tokio::spawn(atoll_registry::follow(
            control.registry.clone(),
            control.coordination.clone(),
        ));
        let registry_gauge = {
            let control = control.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let counts = control.registry.counts();
                    control
                        .metrics
                        .registry_instances
                        .set(i64::try_from(counts.instances).unwrap_or(i64::MAX));
                }
            })
        };
        let registry_service = registry::RegistryService {
            control: control.clone(),
        };
        let app = rest::router(control.clone())
            .route_service(
                "/atoll.config.v1.ConfigStream/{*method}",
                ConfigStreamServer::new(config_stream)
                    .max_encoding_message_size(atoll_api::MAX_MESSAGE_BYTES),
            )
            .route_service(
                "/atoll.registry.v1.Registry/{*method}",
                RegistryServer::new(registry_service)
                    .max_encoding_message_size(atoll_api::MAX_MESSAGE_BYTES),
            );

        let expiry = self.options.node_expiry;
        let expiring = control.coordination.clone();
        let expirer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(
                Duration::from_secs(5)
                    .min(expiry)
                    .max(Duration::from_millis(100)),
            );
            loop {
                tick.tick().await;
                let (removed, published) = nodes.expire(expiry);
                if !published.is_empty() {
                    for chunk in published.chunks(atoll_store::MAX_WRITES_PER_BATCH) {
                        let writes = chunk
                            .iter()
                            .cloned()
                            .map(atoll_store::Write::delete)
                            .collect();
                        if let Err(error) = expiring.write_keys(writes, None).await {
                            tracing::debug!(%error, "cannot delete expired node records");
                        }
                    }
                }
                if removed > 0 {
                    tracing::info!(
                        removed,
                        "forgot nodes disconnected for longer than the node expiry"
                    );
                }
            }
        });

        // Ready once this replica leads (and runs its term), or knows who
        // does: before that, every write would be refused.
        let waiting = Instant::now();
        while control.leading().is_err()
            && leadership.view().url.is_none()
            && waiting.elapsed() < self.options.election_ttl * 2
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(%address, store = %self.options.store.describe(), revision = store.revision().await.unwrap_or(0), "control plane serving");
        ready();

        let drain = self.options.drain_timeout;
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let graceful = async move {
            shutdown.await;
            tracing::info!("stopping: closing config streams and watches, draining requests");
            let _ = stop.send(true);
            let _ = drained_tx.send(());
        };
        let tls = self.options.tls.clone();
        let server = atoll_transport::serve(self.listener, app, tls, graceful);
        let server = tokio::spawn(server);
        let result = tokio::select! {
            result = server => result.context("server task")?.context("serving"),
            () = async {
                let _ = drained_rx.await;
                tokio::time::sleep(drain).await;
            } => {
                tracing::warn!(?drain, "requests still open after the drain timeout; stopping anyway");
                Ok(())
            }
        };
        expirer.abort();
        registry_follower.abort();
        registry_gauge.abort();
        follower.abort();
        if let Some(fleet) = fleet {
            fleet.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), elector).await;
        terms.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), announcer).await;
        // The last node changes (streams closed by the stop) are published.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(publisher) = publisher {
            publisher.abort();
        }
        tracing::info!("control plane stopped");
        result
    }
}
