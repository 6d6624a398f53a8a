//! The admin listener: metrics, health, readiness and what the gateway runs.

use std::sync::Arc;

use atoll_node::NodeStatus;
use atoll_proxy::Proxy;
use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

/// What the admin handlers read.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) name: String,
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) status: Arc<NodeStatus>,
    pub(crate) cached_version: Option<u64>,
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: State,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .with_state(state);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(%error, "admin listener failed");
    }
}

/// Ready once a configuration is installed (from the control plane or the
/// disk cache) and its listeners are bound.
async fn readyz(Extract(state): Extract<State>) -> Response {
    match state.proxy.snapshot() {
        Some(snapshot) => (
            StatusCode::OK,
            format!("ready: version {}\n", snapshot.table.version),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            match state.status.last_error() {
                Some(error) => format!(
                    "not ready: no configuration yet (waiting for the control plane; {error})\n"
                ),
                None => "not ready: no configuration yet (waiting for the control plane)\n".into(),
            },
        )
            .into_response(),
    }
}

async fn metrics(Extract(state): Extract<State>) -> Response {
    let mut text = state.proxy.metrics().encode();
    // Node facts, appended before the EOF marker.
    let connected = u8::from(state.status.connected());
    let facts = format!(
        "# HELP atoll_gateway_control_connected Whether the config stream is open.\n# TYPE atoll_gateway_control_connected gauge\natoll_gateway_control_connected {connected}\n"
    );
    match text.rfind("# EOF") {
        Some(at) => text.insert_str(at, &facts),
        None => text.push_str(&facts),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn config(Extract(state): Extract<State>) -> Response {
    let snapshot = state.proxy.snapshot();
    let upstreams: Vec<serde_json::Value> = snapshot
        .as_ref()
        .map(|s| {
            s.upstreams
                .iter()
                .map(|u| {
                    serde_json::json!({
                        "address": u.address,
                        "healthy": u.healthy(),
                        "ejected": u.ejected(),
                        "inFlight": u.load(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let body = serde_json::json!({
        "gateway": state.name,
        "version": snapshot.as_ref().map(|s| s.table.version),
        "zone": snapshot.as_ref().map(|s| s.table.zone().name.clone()),
        "controlConnected": state.status.connected(),
        "appliedVersion": state.status.applied_version(),
        "fromCache": state.status.from_cache(),
        "cachedVersionAtStart": state.cached_version,
        "lastError": state.status.last_error(),
        "upstreams": upstreams,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    )
        .into_response()
}
