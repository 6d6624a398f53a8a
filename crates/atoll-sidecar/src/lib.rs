//! `atoll sidecar`: the east-west data path beside one app instance
//! (docs/mesh.md, docs/design/east-west.md).
//!
//! - **Outbound** ([`outbound`]): the app calls `127.0.0.1:<outbound>`
//!   naming the service in the Host header (or the HTTP/2 `:authority`).
//!   The sidecar decides the cell with `atoll-routing` (a unitized
//!   service's shard owner by the call's key or the key propagated from
//!   the inbound request; a local service's nearest cell; a global
//!   service's gzone for writes and czone for reads) and the instance
//!   from its endpoint sets, which the service registry keeps current.
//! - **Inbound** ([`inbound`]): callers reach the app through the
//!   sidecar, which re-checks ownership as the SDK does: a call for a
//!   shard this cell does not own, a write to a fenced shard, routed at an
//!   older epoch, or without the cell's ownership lease is refused with an
//!   error the caller sees, and counted. An admitted write holds an SDK
//!   write permit until its response is done, so a new shard map takes
//!   effect here only after the writes admitted under the old one ended.
//! - It registers its instance (the inbound address) in the registry
//!   while the app accepts connections, and watches the services the app
//!   calls (named up front, or learned at the first call).

mod bolt;
mod http;
mod inbound;
mod metrics;
mod outbound;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use atoll_registry::client::Registrar;
use atoll_registry::{Instance, Registrant};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// How a sidecar is set up.
#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// The instance it sits beside (its control plane, cell, zone,
    /// service, workspace and TLS material), as the agent gives it in
    /// `ATOLL_*`.
    pub identity: atoll_sdk::Identity,
    /// Where the app listens (inbound calls go there).
    pub app: SocketAddr,
    /// What the app speaks: `http`, `http2`, `grpc` or `bolt` (then the
    /// inbound side speaks Bolt too).
    pub app_protocol: String,
    /// Where inbound calls are taken.
    pub inbound: SocketAddr,
    /// The host callers connect to for `inbound` (registered).
    pub advertise: String,
    /// Where the app's outbound calls are taken (loopback).
    pub outbound: SocketAddr,
    /// Where the app's outbound Bolt calls are taken, if it makes any.
    pub outbound_bolt: Option<SocketAddr>,
    /// `/metrics` and `/healthz`, if anywhere.
    pub admin: Option<SocketAddr>,
    /// Services the app calls, watched from the start (others are watched
    /// from their first call).
    pub calls: Vec<String>,
    /// The version the instance runs (registered).
    pub version: String,
    /// The registry session's TTL.
    pub session_ttl: Duration,
    /// Time allowed to connect to an upstream.
    pub connect_timeout: Duration,
    /// At shutdown, how long the sidecar keeps serving after it
    /// deregistered, while callers learn it is gone.
    pub drain: Duration,
}

/// What the two sides share.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) options: SidecarOptions,
    pub(crate) cell: atoll_sdk::Cell,
    pub(crate) router: atoll_mesh::Router,
    pub(crate) metrics: Metrics,
    pub(crate) clients: http::Clients,
    pub(crate) bolt: bolt::Pools,
}

/// Runs a sidecar until `shutdown` turns true: then it stops taking calls,
/// deregisters its instance, and lets calls in flight finish.
pub async fn run(options: SidecarOptions, shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let identity = options.identity.clone();
    let inbound = tokio::net::TcpListener::bind(options.inbound)
        .await
        .map_err(|e| format!("inbound {}: {e}", options.inbound))?;
    let outbound = tokio::net::TcpListener::bind(options.outbound)
        .await
        .map_err(|e| format!("outbound {}: {e}", options.outbound))?;
    let outbound_bolt = match options.outbound_bolt {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| format!("outbound Bolt {address}: {e}"))?,
        ),
        None => None,
    };
    let inbound_port = inbound.local_addr().map_err(|e| e.to_string())?.port();
    let urls = atoll_transport::ControlUrls::parse(&identity.control)?;
    let channels = identity
        .transport
        .channels(atoll_transport::ChannelOptions {
            connect_timeout: Some(Duration::from_secs(2)),
            timeout: None,
            keepalive: Some((Duration::from_secs(5), Duration::from_secs(5))),
        });
    let me = Registrant {
        name: identity.instance.clone(),
        role: "sidecar".into(),
        zone: identity.zone.clone(),
        workspace: identity.workspace.clone(),
    };
    let router = atoll_mesh::Router::start(
        channels.clone(),
        urls.clone(),
        me.clone(),
        options.calls.iter().cloned(),
    );
    let mut identity_as_sidecar = identity.clone();
    identity_as_sidecar.role = "sidecar".into();
    // Its own cache: the app beside it (with the SDK) may keep one too.
    identity_as_sidecar.cache = identity
        .cache
        .as_ref()
        .map(|path| path.with_extension("sidecar.json"));
    let cell = atoll_sdk::Cell::start(identity_as_sidecar, shutdown.clone());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let state = Arc::new(State {
        clients: http::Clients::new(options.connect_timeout),
        bolt: bolt::Pools::default(),
        options: options.clone(),
        cell,
        router,
        metrics,
    });

    let registrar = Registrar::start(channels, urls, me, options.session_ttl);
    let own = Instance {
        service: identity.service.clone(),
        name: identity.instance.clone(),
        zone: identity.zone.clone(),
        cell: identity.cell.clone(),
        address: options.advertise.clone(),
        port: u32::from(inbound_port),
        protocol: options.app_protocol.clone(),
        version: options.version.clone(),
        mode: "sidecar".into(),
        ..Instance::default()
    };
    let probe = tokio::spawn(register_while_ready(
        state.clone(),
        own,
        registrar,
        shutdown.clone(),
    ));

    let registry = Arc::new(registry);
    let admin = options.admin.map(|address| {
        tokio::spawn(serve_admin(
            address,
            registry.clone(),
            state.clone(),
            shutdown.clone(),
        ))
    });
    tracing::info!(
        inbound = %options.inbound, outbound = %options.outbound, app = %options.app,
        instance = %identity.instance, cell = %identity.cell, service = %identity.service,
        "sidecar started"
    );
    let (stop, stopping) = watch::channel(false);
    let inbound_task = if options.app_protocol == "bolt" {
        tokio::spawn(bolt::serve(inbound, state.clone(), true, stopping.clone()))
    } else {
        tokio::spawn(http::serve(
            inbound,
            state.clone(),
            inbound::handle,
            stopping.clone(),
        ))
    };
    let bolt_task = outbound_bolt.map(|listener| {
        tokio::spawn(bolt::serve(
            listener,
            state.clone(),
            false,
            stopping.clone(),
        ))
    });
    let outbound_task = tokio::spawn(http::serve(
        outbound,
        state.clone(),
        outbound::handle,
        stopping,
    ));
    // Shutdown: deregister, keep serving while callers learn it, then
    // stop taking calls and let those in flight finish.
    let _ = probe.await;
    tokio::time::sleep(options.drain).await;
    stop.send_replace(true);
    let _ = inbound_task.await;
    if let Some(task) = bolt_task {
        let _ = task.await;
    }
    let _ = outbound_task.await;
    if let Some(admin) = admin {
        admin.abort();
    }
    Ok(())
}

/// Keeps the instance registered while the app accepts connections, and
/// ends the session at shutdown (before the listeners stop: callers move
/// on first). It is first registered once the sidecar can serve: the app
/// accepts connections, the shard map is here, and, for a unitized
/// service, the cell's ownership lease is held.
async fn register_while_ready(
    state: Arc<State>,
    own: Instance,
    registrar: Registrar,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = state.options.app;
    let mut failures = 0u32;
    let mut registered = false;
    loop {
        let up = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(app))
            .await
            .is_ok_and(|c| c.is_ok());
        let serves = registered
            || state.cell.view().is_some_and(|view| {
                view.table.kind(view.service) != Some(atoll_model::ServiceKind::Unitized)
                    || state.cell.lease().is_ok()
            });
        if up && serves {
            failures = 0;
            if !registered {
                registrar.put(own.clone());
                registered = true;
                tracing::info!(app = %app, "the app accepts connections; instance registered");
            }
        } else {
            failures += 1;
            if registered && failures >= 3 {
                registrar.remove(&own.service, &own.zone, &own.name);
                registered = false;
                tracing::warn!(app = %app, "the app stopped accepting connections; instance deregistered");
            }
        }
        let every = if registered {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                registrar.close().await;
                return;
            }
        }
    }
}

async fn serve_admin(
    address: SocketAddr,
    registry: Arc<prometheus_client::registry::Registry>,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    use axum::routing::get;
    let metrics_state = state.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                let state = metrics_state.clone();
                async move {
                    state
                        .metrics
                        .endpoints
                        .set(i64::try_from(state.router.instances()).unwrap_or(i64::MAX));
                    let mut text = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let state = state.clone();
                async move {
                    if state.cell.view().is_some() {
                        (axum::http::StatusCode::OK, "ok\n")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "no configuration yet\n",
                        )
                    }
                }
            }),
        );
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%address, %error, "cannot serve the sidecar's admin address");
            return;
        }
    };
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
}
