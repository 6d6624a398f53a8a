//! Atoll's HTTP data path, shared by the gateway (and later the sidecar):
//! tokio + hyper 1 listeners (HTTP/1.1 with keep-alive, chunked bodies and
//! upgrades; HTTP/2 cleartext and over TLS with ALPN via rustls), routing by
//! an atomically swapped [`atoll_routing::RoutingTable`], upstream connection
//! pools, timeouts, retries, mirroring, active health checks, passive outlier
//! ejection, Prometheus metrics and a JSON access log.
//!
//! It does not talk to the control plane: the node that embeds it installs
//! each table with [`Proxy::install`].

mod access_log;
mod body;
mod chunked;
mod fast;
mod handler;
mod headers;
mod health;
mod listener;
mod metrics;
mod rewind;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use atoll_routing::{EndpointId, Health, RoutingTable};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{Semaphore, watch};

pub use access_log::AccessLogTarget;
pub use body::ResponseBody;
pub use headers::{
    ADDED_HEADERS, BAGGAGE, CELL, EPOCH, HOP, KEY, MAX_CLIENT_HEADERS, MIRROR, SHARD,
};
pub use listener::{Listener, Tls, serve};
pub use metrics::ProxyMetrics;
pub use upstream::Upstream;

use crate::access_log::AccessLog;
use crate::body::RequestBody;
use crate::health::HealthChecks;
use crate::metrics::TableMetrics;
use crate::upstream::Registry;

/// Tunables of the data path.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// The most body bytes buffered to find a routing key in a JSON body.
    pub max_buffered_body: usize,
    /// The most body bytes copied for a mirror; larger bodies are not mirrored.
    pub mirror_body_limit: usize,
    /// Mirrored copies in flight at once; more are dropped (and counted).
    pub mirror_concurrency: usize,
    /// Time allowed for a mirrored copy.
    pub mirror_timeout: Duration,
    /// Time allowed to connect to an upstream.
    pub connect_timeout: Duration,
    /// Idle upstream connections are closed after this long.
    pub upstream_idle_timeout: Duration,
    /// Where the access log goes; none turns it off.
    pub access_log: Option<AccessLogTarget>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            max_buffered_body: 1024 * 1024,
            mirror_body_limit: 256 * 1024,
            mirror_concurrency: 512,
            mirror_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            upstream_idle_timeout: Duration::from_secs(60),
            access_log: None,
        }
    }
}

/// A routing table with the runtime state of its upstreams.
#[derive(Debug)]
pub struct Snapshot {
    /// The table.
    pub table: RoutingTable,
    /// One per table endpoint, same order.
    pub upstreams: Vec<Arc<Upstream>>,
    pub(crate) metrics: TableMetrics,
    /// The addresses of the deployment's gateways that take forwarded
    /// requests on a public listener (they advertise one and have no
    /// `peer` listener): a request they forward keeps the
    /// `X-Forwarded-Proto` they set. Those with a `peer` listener forward
    /// over mutual TLS and are believed on the peer listener only.
    peers: Vec<std::net::IpAddr>,
}

impl Snapshot {
    /// Whether a request that says it was forwarded by a gateway (`hop`)
    /// comes from the address of one.
    pub(crate) fn trusted_hop(&self, hop: bool, remote: std::net::IpAddr) -> bool {
        hop && self.peers.contains(&remote)
    }

    /// Whether the upstream of `endpoint` is a gateway reached over mutual
    /// TLS.
    pub(crate) fn over_peer_tls(&self, endpoint: EndpointId) -> bool {
        self.table
            .endpoints
            .get(endpoint as usize)
            .is_some_and(|e| e.peer.is_some())
    }

    /// Whether ejecting `endpoint` (serving `service`, for `cell`) keeps the
    /// share of ejected endpoints of its group within the service's limit.
    pub(crate) fn may_eject(&self, service: u32, cell: u16, endpoint: EndpointId) -> bool {
        let table = &self.table;
        let spec = &table.services[service as usize];
        let group: &[EndpointId] = match table.endpoints[endpoint as usize].cell {
            Some(endpoint_cell) => table.endpoints_of(service, endpoint_cell),
            None => &table.zones[usize::from(table.cells[usize::from(cell)].zone)].gateways,
        };
        if group.is_empty() {
            return false;
        }
        let ejected = group
            .iter()
            .filter(|e| self.upstreams[**e as usize].ejected())
            .count();
        (ejected + 1) * 100 <= group.len() * spec.outlier_detection.max_ejected_percent as usize
    }

    /// Counts a refusal and gives the facts its JSON body carries besides
    /// the code and message (shard, epoch, cell).
    pub(crate) fn refusal_facts(
        &self,
        refusal: &atoll_routing::Refusal,
    ) -> Vec<(&'static str, serde_json::Value)> {
        use atoll_routing::Refusal;
        self.metrics.refused(refusal.code()).inc();
        let cell_name = |cell: u16| -> Option<serde_json::Value> {
            self.table
                .cells
                .get(usize::from(cell))
                .map(|c| c.name.clone().into())
        };
        let mut facts = Vec::new();
        match refusal {
            Refusal::Fenced {
                shard,
                epoch,
                cell,
                service,
            } => {
                if let Some(counter) = self.metrics.fenced.get(*service as usize) {
                    counter.inc();
                }
                facts.push(("shard", (*shard).into()));
                facts.push(("epoch", (*epoch).into()));
                facts.extend(cell_name(*cell).map(|c| ("cell", c)));
            }
            Refusal::Loop { cell }
            | Refusal::NoEndpoint {
                cell: Some(cell), ..
            } => {
                facts.extend(cell_name(*cell).map(|c| ("cell", c)));
            }
            _ => {}
        }
        facts
    }
}

impl Health for Snapshot {
    fn available(&self, endpoint: EndpointId) -> bool {
        self.upstreams
            .get(endpoint as usize)
            .is_some_and(|u| u.available())
    }

    fn load(&self, endpoint: EndpointId) -> u32 {
        self.upstreams
            .get(endpoint as usize)
            .map_or(0, |u| u.load())
    }
}

/// How a gateway reaches and accepts other gateways: its node certificate
/// and the roots (a client for forwarding), and its workspace (the peers'
/// certificates must be gateways of it).
#[derive(Clone, Debug)]
pub struct PeerTls {
    /// The node's certificate and the roots, as it reaches the control
    /// plane with them (renewed under it).
    pub client: atoll_transport::ClientTls,
    /// The node's workspace (`default` when empty).
    pub workspace: String,
}

type PeerClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, RequestBody>;

/// The data path of one node.
pub struct Proxy {
    name: String,
    snapshot: ArcSwapOption<Snapshot>,
    versions: watch::Sender<u64>,
    registry: Registry,
    health_checks: HealthChecks,
    client: Client<HttpConnector, RequestBody>,
    /// Mutual TLS to other gateways, when the node has a certificate.
    peer_tls: ArcSwapOption<PeerTls>,
    /// One client per gateway reached over TLS: its certificate must name
    /// that gateway (address, zone, name).
    peer_clients:
        parking_lot::Mutex<std::collections::HashMap<(String, String, String), PeerClient>>,
    metrics: Arc<ProxyMetrics>,
    settings: ProxySettings,
    mirrors: Arc<Semaphore>,
    access_log: Option<AccessLog>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("name", &self.name)
            .field("version", &*self.versions.borrow())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy with no table yet (it answers 503 until one is installed).
    /// `name` identifies the node in logs.
    pub fn new(
        name: &str,
        settings: ProxySettings,
        metrics: Arc<ProxyMetrics>,
    ) -> std::io::Result<Arc<Self>> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(30)));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.upstream_idle_timeout)
            .pool_max_idle_per_host(1024)
            .build(connector);
        let access_log = match &settings.access_log {
            Some(target) => Some(AccessLog::start(
                target,
                metrics.access_log_dropped.clone(),
            )?),
            None => None,
        };
        let (versions, _) = watch::channel(0);
        Ok(Arc::new(Self {
            name: name.to_owned(),
            snapshot: ArcSwapOption::empty(),
            versions,
            registry: Registry::default(),
            health_checks: HealthChecks::default(),
            client,
            peer_tls: ArcSwapOption::empty(),
            peer_clients: parking_lot::Mutex::new(std::collections::HashMap::new()),
            mirrors: Arc::new(Semaphore::new(settings.mirror_concurrency)),
            metrics,
            settings,
            access_log,
        }))
    }

    /// Serves `table` from now on: requests already routed finish with the
    /// table they started with. Upstream state (health, ejection, pools) is
    /// kept for addresses the new table still uses.
    pub fn install(&self, table: RoutingTable) -> Result<(), String> {
        let addresses: Vec<&str> = table.endpoints.iter().map(|e| e.address.as_str()).collect();
        let upstreams = self.registry.resolve(&addresses)?;
        let mut checks = Vec::new();
        for (endpoint, upstream) in table.endpoints.iter().zip(&upstreams) {
            if let Some(check) = endpoint
                .service
                .and_then(|s| table.services[s as usize].health_check.clone())
            {
                checks.push((upstream.clone(), check));
            }
        }
        let metrics = TableMetrics::new(&self.metrics, &table);
        let version = table.version;
        let mut peers: Vec<std::net::IpAddr> = table
            .zones
            .iter()
            .flat_map(|z| &z.gateways)
            .filter(|e| table.endpoints[**e as usize].peer.is_none())
            .filter_map(|e| {
                table.endpoints[*e as usize]
                    .address
                    .parse::<std::net::SocketAddr>()
                    .ok()
            })
            .map(|a| a.ip())
            .collect();
        peers.sort();
        peers.dedup();
        // TLS clients of gateways the new table no longer forwards to go.
        self.peer_clients.lock().retain(|(address, zone, name), _| {
            table.endpoints.iter().any(|e| {
                e.address == *address
                    && e.peer
                        .as_ref()
                        .is_some_and(|p| p.zone == *zone && p.name == *name)
            })
        });
        self.snapshot.store(Some(Arc::new(Snapshot {
            table,
            upstreams,
            metrics,
            peers,
        })));
        self.health_checks.reconcile(checks);
        self.metrics
            .table_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.versions.send_replace(version);
        Ok(())
    }

    /// Forward to gateways with a `peer` listener over mutual TLS with
    /// this material (set once the node knows its certificate).
    pub fn set_peer_tls(&self, peer: PeerTls) {
        self.peer_clients.lock().clear();
        self.peer_tls.store(Some(Arc::new(peer)));
    }

    /// Whether the node forwards over mutual TLS.
    pub fn has_peer_tls(&self) -> bool {
        self.peer_tls.load().is_some()
    }

    /// The client for the gateway `peer` at `address`: TLS with this node's
    /// certificate, and the other side's must be
    /// `atoll://<workspace>/gateway/<peer.zone>/<peer.name>`.
    pub(crate) fn peer_client(
        &self,
        address: &str,
        peer: &atoll_routing::Peer,
    ) -> Result<PeerClient, String> {
        let key = (address.to_owned(), peer.zone.clone(), peer.name.clone());
        if let Some(client) = self.peer_clients.lock().get(&key) {
            return Ok(client.clone());
        }
        let tls = self.peer_tls.load_full().ok_or_else(|| {
            format!(
                "gateway {} takes forwarded requests over mutual TLS only, and this node has no certificate",
                peer.name
            )
        })?;
        let workspace = if tls.workspace.is_empty() {
            atoll_model::DEFAULT_WORKSPACE.to_owned()
        } else {
            tls.workspace.clone()
        };
        let expected = format!("atoll://{workspace}/gateway/{}/{}", peer.zone, peer.name);
        let check: atoll_transport::PeerCheck = Arc::new(move |der| {
            let id = atoll_identity::id_of_certificate(der)?;
            if id.to_string() == expected {
                Ok(())
            } else {
                Err(format!("the gateway's certificate is {id}, not {expected}"))
            }
        });
        let config = tls.client.peer_config(check);
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.settings.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(30)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client: PeerClient = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.settings.upstream_idle_timeout)
            .pool_max_idle_per_host(1024)
            .build(connector);
        self.peer_clients.lock().insert(key, client.clone());
        Ok(client)
    }

    /// The snapshot being served, if any.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.load_full()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }
}
