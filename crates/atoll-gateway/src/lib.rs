//! Atoll's unit-aware gateway: runs one Gateway resource. It follows the
//! control plane as a config-stream node (role `gateway`), validates and
//! compiles each version into a routing table, binds the Gateway's
//! listeners, and serves them with `atoll-proxy`; it keeps serving from its
//! disk cache while the control plane is unreachable. An admin listener
//! serves `/metrics`, `/healthz`, `/readyz` and `/config`.
//!
//! It holds no routing logic of its own (that is `atoll-routing`) and no data
//! path (that is `atoll-proxy`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use atoll_model::{Kind, Protocol, Resource, Spec};
use atoll_node::{Installer, NodeClient, NodeConfig, NodeOptions};
use atoll_proxy::{Listener, Proxy, ProxyMetrics, ProxySettings, Tls};
use atoll_routing::{RoutingTable, Scope};
use parking_lot::Mutex;
use tokio::sync::watch;

/// How to run a gateway.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// The Gateway resource to run.
    pub name: String,
    /// Its workspace (empty: `default`).
    pub workspace: String,
    /// Base URL of the control plane.
    pub control: String,
    /// Where the gateway keeps its config cache.
    pub state_dir: PathBuf,
    /// Address of the admin listener.
    pub admin: SocketAddr,
    /// How long a stop waits for requests in flight.
    pub drain_timeout: Duration,
    /// Data path tunables.
    pub proxy: ProxySettings,
    /// How to reach the control plane (TLS material for `https://` URLs).
    pub transport: atoll_transport::Transport,
    /// The peer listener's TLS (the node's certificate, client
    /// certificates of the CA required), when the gateway has a
    /// certificate: it then serves a Gateway's `peer` listener and forwards
    /// to other gateways' over mutual TLS.
    pub peer_tls: Option<atoll_transport::ServerTls>,
}

/// One bound listener and the signal that stops it.
struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What a listener is: its address and TLS files, or the peer listener.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ListenerKey {
    address: SocketAddr,
    tls: Option<(String, String)>,
    peer: bool,
}

/// Installs versions: validate, compile, bind listeners, swap.
struct GatewayInstaller {
    name: String,
    workspace: String,
    peer_tls: Option<atoll_transport::ServerTls>,
    proxy: Arc<Proxy>,
    drain: Duration,
    listeners: Mutex<HashMap<ListenerKey, Running>>,
    zone: Mutex<Option<String>>,
}

impl GatewayInstaller {
    fn listener_keys(&self, resources: &[Resource]) -> Result<(String, Vec<ListenerKey>), String> {
        let gateway = resources
            .iter()
            .find(|r| r.kind() == Kind::Gateway && r.name() == self.name)
            .ok_or_else(|| format!("Gateway `{}` does not exist", self.name))?;
        let Spec::Gateway(spec) = &gateway.spec else {
            return Err("not a gateway".into());
        };
        let mut keys = Vec::new();
        for listener in &spec.listeners {
            let ip: IpAddr = match &listener.address {
                Some(text) => text
                    .parse()
                    .map_err(|_| format!("listener address `{text}` is not an IP address"))?,
                None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            let tls = match (listener.protocol, &listener.tls) {
                (Protocol::Https, Some(tls)) => {
                    Some((tls.certificate.clone(), tls.private_key.clone()))
                }
                (Protocol::Https, None) => {
                    return Err(format!(
                        "listener {} is https without tls files",
                        listener.port
                    ));
                }
                (Protocol::Http, _) => None,
            };
            keys.push(ListenerKey {
                address: SocketAddr::new(ip, listener.port),
                tls,
                peer: false,
            });
        }
        if let Some(peer) = &spec.peer {
            let ip: IpAddr = match &peer.address {
                Some(text) => text
                    .parse()
                    .map_err(|_| format!("peer listener address `{text}` is not an IP address"))?,
                None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            if self.peer_tls.is_some() {
                keys.push(ListenerKey {
                    address: SocketAddr::new(ip, peer.port),
                    tls: None,
                    peer: true,
                });
            } else {
                // Other gateways reach it over mutual TLS only, and this one
                // has no certificate to serve it with: they go to the
                // cells' endpoints instead.
                tracing::error!(
                    port = peer.port,
                    "Gateway {} has a peer listener, but this gateway runs without a certificate (a control plane run --insecure?); not serving it",
                    self.name
                );
            }
        }
        Ok((spec.zone.clone(), keys))
    }
}

impl Installer for GatewayInstaller {
    fn install(&self, config: &NodeConfig) -> Result<(), String> {
        let result = self.try_install(config);
        self.proxy.metrics().record_install(result.is_ok());
        result
    }
}

impl GatewayInstaller {
    fn try_install(&self, config: &NodeConfig) -> Result<(), String> {
        // The control plane validated this version; validating again means a
        // gateway never runs a config that does not pass its own rules
        // either (an older control plane, a hand-edited cache).
        config.validate()?;
        let (zone, keys) = self.listener_keys(&config.resources)?;
        let table = RoutingTable::compile(
            config.version,
            &config.resources,
            &Scope {
                zone: zone.clone(),
                gateway: Some(self.name.clone()),
                peer_tls: self.proxy.has_peer_tls(),
            },
        )?;

        // Bind new listeners first: if one cannot be bound, nothing changes.
        let mut listeners = self.listeners.lock();
        let mut bound = Vec::new();
        for key in &keys {
            if listeners.contains_key(key) {
                continue;
            }
            let tls = match (&key.tls, &self.peer_tls) {
                (Some((certificate, private_key)), _) => {
                    Some(Tls::from_files(certificate.as_ref(), private_key.as_ref())?)
                }
                (None, Some(server)) if key.peer => Some(Tls::peer(server, &self.workspace)),
                _ => None,
            };
            let socket = std::net::TcpListener::bind(key.address)
                .map_err(|e| format!("cannot listen on {}: {e}", key.address))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("listener {}: {e}", key.address))?;
            let socket = tokio::net::TcpListener::from_std(socket)
                .map_err(|e| format!("listener {}: {e}", key.address))?;
            bound.push((key.clone(), Listener { socket, tls }));
        }
        self.proxy.install(table)?;
        for (key, listener) in bound {
            let (stop, stopped) = watch::channel(false);
            tracing::info!(address = %key.address, tls = key.tls.is_some(), peer = key.peer, "listening");
            let task = tokio::spawn(atoll_proxy::serve(
                self.proxy.clone(),
                listener,
                stopped,
                self.drain,
            ));
            listeners.insert(key, Running { stop, task });
        }
        let unwanted: Vec<ListenerKey> = listeners
            .keys()
            .filter(|k| !keys.contains(k))
            .cloned()
            .collect();
        for key in unwanted {
            if let Some(running) = listeners.remove(&key) {
                tracing::info!(address = %key.address, "listener removed from the Gateway; draining it");
                let _ = running.stop.send(true);
            }
        }
        *self.zone.lock() = Some(zone);
        Ok(())
    }

    /// Stops every listener and waits for them to drain.
    async fn stop(&self) {
        let running: Vec<Running> = self.listeners.lock().drain().map(|(_, r)| r).collect();
        for listener in &running {
            let _ = listener.stop.send(true);
        }
        for listener in running {
            let _ = listener.task.await;
        }
    }
}

/// Finds the zone of Gateway `name` from the control plane's REST API (any
/// replica answers a read: the first of the list that can be reached).
async fn zone_from_control(
    transport: &atoll_transport::Transport,
    control: &str,
    workspace: &str,
    name: &str,
) -> Result<String, String> {
    let urls = atoll_transport::ControlUrls::parse_in_order(control)?;
    let rest = transport.rest(urls, Some(Duration::from_secs(5)));
    let path = if workspace.is_empty() {
        format!("/v1/resources/gateways/{name}")
    } else {
        format!("/v1/resources/gateways/{name}?workspace={workspace}")
    };
    let value: serde_json::Value = match rest.get(&path).await {
        Ok(value) => value,
        Err(atoll_transport::RestError::Api { status, .. })
            if status == hyper::StatusCode::NOT_FOUND =>
        {
            return Err(format!(
                "Gateway `{name}` does not exist; apply a Gateway resource named {name} (see docs/manifests.md#gateway)"
            ));
        }
        Err(error) => return Err(error.to_string()),
    };
    value["spec"]["zone"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "the Gateway has no zone".to_owned())
}

/// A running gateway.
pub struct Gateway {
    options: GatewayOptions,
    proxy: Arc<Proxy>,
    installer: Arc<GatewayInstaller>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("name", &self.options.name)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Prepares a gateway (nothing listens yet).
    pub fn new(options: GatewayOptions) -> anyhow::Result<Self> {
        let metrics = Arc::new(ProxyMetrics::new("atoll_gateway"));
        let proxy = Proxy::new(&options.name, options.proxy.clone(), metrics)
            .context("starting the data path")?;
        if let (Some(client), Some(_)) = (
            options
                .transport
                .tls()
                .filter(|tls| tls.has_identity())
                .cloned(),
            &options.peer_tls,
        ) {
            proxy.set_peer_tls(atoll_proxy::PeerTls {
                client,
                workspace: options.workspace.clone(),
            });
        }
        let installer = Arc::new(GatewayInstaller {
            name: options.name.clone(),
            workspace: options.workspace.clone(),
            peer_tls: options.peer_tls.clone(),
            proxy: proxy.clone(),
            drain: options.drain_timeout,
            listeners: Mutex::new(HashMap::new()),
            zone: Mutex::new(None),
        });
        Ok(Self {
            options,
            proxy,
            installer,
        })
    }

    /// Runs until `shutdown` turns true: serves the cached config at once
    /// if there is one, follows the control plane, then drains.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let admin = tokio::net::TcpListener::bind(self.options.admin)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot serve the admin API on {}: {e}; choose another address with --admin",
                    self.options.admin
                )
            })?;
        let cache = self.options.state_dir.join("config.json");
        let mut client = NodeClient::new(
            NodeOptions {
                control: self.options.control.clone(),
                name: self.options.name.clone(),
                role: "gateway".into(),
                zone: String::new(),
                cell: String::new(),
                workspace: self.options.workspace.clone(),
                cache: Some(cache),
                transport: self.options.transport.clone(),
            },
            self.installer.clone(),
        );
        let from_cache = client.load_cache();
        if let Some(version) = from_cache {
            tracing::info!(
                version,
                "serving the cached configuration until the control plane answers"
            );
        }
        // Health and readiness answer from now on, also while the zone is
        // still unknown (no usable cache, control plane down).
        let status = client.status();
        let admin_task = tokio::spawn(admin::serve(
            admin,
            admin::State {
                name: self.options.name.clone(),
                proxy: self.proxy.clone(),
                status: status.clone(),
                cached_version: from_cache,
            },
            shutdown.clone(),
        ));
        // The zone goes in the node's Hello: from the cache, else ask.
        let cached_zone = self.installer.zone.lock().clone();
        let zone = match cached_zone {
            Some(zone) => zone,
            None => {
                let mut shutdown = shutdown.clone();
                let cache_problem = status
                    .last_error()
                    .unwrap_or_else(|| "no config cache yet".into());
                loop {
                    match zone_from_control(
                        &self.options.transport,
                        &self.options.control,
                        &self.options.workspace,
                        &self.options.name,
                    )
                    .await
                    {
                        Ok(zone) => break zone,
                        Err(reason) => {
                            tracing::warn!(%reason, "waiting for the control plane to know this gateway");
                            status.set_error(format!(
                                "{cache_problem}; waiting for the control plane to know this gateway: {reason}"
                            ));
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                                () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                                    let _ = admin_task.await;
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
            }
        };
        client.set_zone(zone.clone());
        tracing::info!(gateway = %self.options.name, %zone, control = %self.options.control, admin = %self.options.admin, "gateway starting");
        client.run(shutdown.clone()).await;
        tracing::info!("stopping: draining listeners");
        self.installer.stop().await;
        let _ = admin_task.await;
        Ok(())
    }

    /// The data path (for tests and tools).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }
}

mod admin;
