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

mod health;
mod leases;
mod metrics;
mod nodes;
mod openapi;
mod rest;
mod service;
mod state;
mod stream;
mod switchover;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use atoll_api::config::config_stream_server::ConfigStreamServer;
use atoll_store::{EmbeddedStore, EtcdOptions, EtcdStore, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

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

    /// Opens the store.
    pub async fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match self {
            StoreOptions::Embedded { dir } => Arc::new(
                EmbeddedStore::open(dir)
                    .with_context(|| format!("opening the embedded store in {}", dir.display()))?,
            ),
            StoreOptions::Etcd(options) => Arc::new(
                EtcdStore::connect(options.clone())
                    .await
                    .context("connecting to etcd")?,
            ),
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
        let store = self.options.store.open().await?;
        let (cache, follower) = state::ConfigCache::start(store.clone())
            .await
            .context("loading the configuration from the store")?;
        let (stop, stopping) = watch::channel(false);
        let nodes = Arc::new(nodes::NodeRegistry::new());
        let leases = Arc::new(leases::Leases::new(self.options.lease_duration));
        let metrics = Arc::new(metrics::Metrics::new());
        let control = Arc::new(service::Control {
            store: store.clone(),
            cache: cache.clone(),
            nodes: nodes.clone(),
            metrics: metrics.clone(),
            started: Instant::now(),
            shutdown: stopping.clone(),
            writer: tokio::sync::Mutex::new(()),
            parsing: tokio::sync::Semaphore::new(crate::service::PARSERS),
            switchovers: std::sync::OnceLock::new(),
            leases: leases.clone(),
            node_expiry: self.options.node_expiry,
        });
        let switchovers = switchover::Switchovers::new(control.clone());
        let _ = control.switchovers.set(switchovers.clone());
        switchovers
            .resume()
            .await
            .context("resuming unfinished switchovers")?;
        switchovers.watch_cells();
        let config_stream = stream::ConfigStreamService {
            cache,
            nodes: nodes.clone(),
            metrics,
            shutdown: stopping.clone(),
            heartbeat_timeout: self.options.heartbeat_timeout,
            leases,
        };
        // gRPC shares the port: its paths are `/atoll.config.v1.ConfigStream/...`.
        let app = rest::router(control).route_service(
            "/atoll.config.v1.ConfigStream/{*method}",
            ConfigStreamServer::new(config_stream)
                .max_encoding_message_size(atoll_api::MAX_MESSAGE_BYTES),
        );

        let expiry = self.options.node_expiry;
        let expirer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(
                Duration::from_secs(5)
                    .min(expiry)
                    .max(Duration::from_millis(100)),
            );
            loop {
                tick.tick().await;
                let removed = nodes.expire(expiry);
                if removed > 0 {
                    tracing::info!(
                        removed,
                        "forgot nodes disconnected for longer than the node expiry"
                    );
                }
            }
        });

        let address = self.local_addr()?;
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
        let server = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(graceful);
        let server = tokio::spawn(async move { server.await });
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
        follower.abort();
        tracing::info!("control plane stopped");
        result
    }
}
