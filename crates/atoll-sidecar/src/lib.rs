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
mod transparent;
mod upgrade;

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
    /// Where it offers its sockets to a new sidecar (hot upgrade).
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// Take the sockets of the sidecar at `upgrade_socket` over instead
    /// of binding them.
    pub take_over: bool,
    /// Transparent mode: TCP connections to these addresses (IPv4 CIDRs)
    /// are redirected to the outbound port with iptables, in the app's
    /// network namespace.
    pub transparent: Vec<String>,
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
    /// Set when a new sidecar took over: Bolt connections go there.
    pub(crate) handoff:
        parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedSender<bolt::Handed>>>,
}

/// Runs a sidecar until `shutdown` turns true: then it stops taking calls,
/// deregisters its instance, and lets calls in flight finish.
pub async fn run(options: SidecarOptions, shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let identity = options.identity.clone();
    // The listening sockets: taken over from the sidecar being replaced,
    // or bound.
    let taken = match (&options.upgrade_socket, options.take_over) {
        (Some(path), true) => {
            let path = path.clone();
            Some(
                tokio::task::spawn_blocking(move || upgrade::take_over(&path))
                    .await
                    .map_err(|e| e.to_string())??,
            )
        }
        (None, true) => {
            return Err(
                "--take-over needs the upgrade socket of the sidecar to replace (--upgrade-socket)"
                    .into(),
            );
        }
        _ => None,
    };
    let listen = |fd: Option<std::os::fd::OwnedFd>, address: SocketAddr, what: &str| {
        let what = what.to_owned();
        async move {
            match fd {
                Some(fd) => {
                    let std = std::net::TcpListener::from(fd);
                    std.set_nonblocking(true)
                        .map_err(|e| format!("{what}: {e}"))?;
                    tokio::net::TcpListener::from_std(std).map_err(|e| format!("{what}: {e}"))
                }
                None => tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|e| format!("{what} {address}: {e}")),
            }
        }
    };
    let (taken_sockets, taken_stream) = match taken {
        Some(taken) => {
            let (sockets, rest) = taken.split();
            (Some(sockets), Some(rest))
        }
        None => (None, None),
    };
    let (fd_in, fd_out, fd_bolt, fd_admin) = match taken_sockets {
        Some(s) => (Some(s.inbound), Some(s.outbound), s.outbound_bolt, s.admin),
        None => (None, None, None, None),
    };
    let inbound = listen(fd_in, options.inbound, "inbound").await?;
    let outbound = listen(fd_out, options.outbound, "outbound").await?;
    let outbound_bolt = match options.outbound_bolt {
        Some(address) => Some(listen(fd_bolt, address, "outbound Bolt").await?),
        None => None,
    };
    let admin_listener = match options.admin {
        Some(address) => Some(listen(fd_admin, address, "admin").await?),
        None => None,
    };
    let dup = |l: &tokio::net::TcpListener| {
        use std::os::fd::AsFd;
        l.as_fd().try_clone_to_owned().map_err(|e| e.to_string())
    };
    let sockets = upgrade::Sockets {
        inbound: dup(&inbound)?,
        outbound: dup(&outbound)?,
        outbound_bolt: outbound_bolt.as_ref().map(dup).transpose()?,
        admin: admin_listener.as_ref().map(dup).transpose()?,
    };
    let inbound_port = inbound.local_addr().map_err(|e| e.to_string())?.port();
    let outbound_port = outbound.local_addr().map_err(|e| e.to_string())?.port();
    // Kept for as long as the sidecar runs; its rules go with it.
    let _redirect = if options.transparent.is_empty() {
        None
    } else {
        Some(transparent::Redirect::install(
            &options.transparent,
            outbound_port,
        )?)
    };
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
        handoff: parking_lot::Mutex::new(None),
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

    let (stop, stopping) = watch::channel(false);
    let registry = Arc::new(registry);
    let admin = admin_listener.map(|listener| {
        tokio::spawn(serve_admin(
            listener,
            registry.clone(),
            state.clone(),
            stopping.clone(),
        ))
    });
    tracing::info!(
        inbound = %options.inbound, outbound = %options.outbound, app = %options.app,
        instance = %identity.instance, cell = %identity.cell, service = %identity.service,
        took_over = taken_stream.is_some(),
        "sidecar started"
    );
    // A replacement serves the sockets it took only once it can: its
    // shard map is here and, for a unitized service, its cell's lease is
    // held (the old sidecar keeps serving until then).
    if taken_stream.is_some() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !can_serve(&state) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !can_serve(&state) {
            tracing::warn!("not ready to serve within 30 s; taking the old sidecar's calls anyway");
        }
    }
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
        stopping.clone(),
    ));

    // Took over: once this sidecar can route, the old one drains and
    // hands its Bolt connections over.
    if let Some(taken) = taken_stream {
        let ready = state.cell.ready();
        if tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .is_err()
        {
            tracing::warn!("no configuration within 30 s; taking the old sidecar's calls anyway");
        }
        let handle = tokio::runtime::Handle::current();
        let adopter = state.clone();
        let adopt_stop = stopping.clone();
        let adopted = tokio::task::spawn_blocking(move || {
            taken.ready(|handed| {
                let _guard = handle.enter();
                bolt::adopt(handed, adopter.clone(), adopt_stop.clone());
            })
        })
        .await
        .map_err(|e| e.to_string())?;
        match adopted {
            Ok(count) => tracing::info!(bolt_connections = count, "took over from the old sidecar"),
            Err(error) => tracing::warn!(%error, "the old sidecar's handover ended early"),
        }
    }

    // Offers its own sockets to the next upgrade.
    let (upgraded_tx, upgraded) = tokio::sync::oneshot::channel();
    let (handoff, handed) = tokio::sync::mpsc::unbounded_channel();
    let offer = options
        .upgrade_socket
        .clone()
        .map(|path| tokio::spawn(upgrade::offer(path, sockets, upgraded_tx, handed)));

    let mut shutdown_signal = shutdown.clone();
    let mut was_upgraded = false;
    tokio::select! {
        () = async { let _ = shutdown_signal.wait_for(|s| *s).await; } => {
            // Shutdown: deregister, keep serving while callers learn it,
            // then stop taking calls and let those in flight finish.
            let _ = probe.await;
            tokio::time::sleep(options.drain).await;
        }
        Ok(()) = upgraded => {
            // Upgraded: the new sidecar serves the same sockets and has
            // registered the instance. Stop accepting; hand Bolt
            // connections over; the session runs out by itself.
            *state.handoff.lock() = Some(handoff);
            probe.abort();
            was_upgraded = true;
        }
    }
    stop.send_replace(true);
    let _ = inbound_task.await;
    if let Some(task) = bolt_task {
        let _ = task.await;
    }
    let _ = outbound_task.await;
    // Every Bolt connection is handed over or closed: say done.
    state.handoff.lock().take();
    if let Some(offer) = offer {
        if was_upgraded {
            let _ = tokio::time::timeout(Duration::from_secs(5), offer).await;
        } else {
            offer.abort();
        }
    }
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(Duration::from_secs(5), admin).await;
    }
    Ok(())
}

/// Whether the sidecar can take calls: its shard map is here and, for a
/// unitized service, the cell's ownership lease is held.
fn can_serve(state: &State) -> bool {
    state.cell.view().is_some_and(|view| {
        view.table.kind(view.service) != Some(atoll_model::ServiceKind::Unitized)
            || state.cell.lease().is_ok()
    })
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
        let serves = registered || can_serve(&state);
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
    listener: tokio::net::TcpListener,
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
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
}
