//! The outbound side: the app's calls to other services.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;

use crate::State;
use crate::http::{Body, boxed, empty_body, propagated_key, refusal, strip_hop_by_hop};

pub(crate) fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
    Box::pin(async move {
        let started = Instant::now();
        let (service, cell, response) = call(&state, request).await;
        state
            .metrics
            .http_call("outbound", service, cell, started, &response);
        response
    })
}

fn refused(state: &State, service: &str, status: u16, code: &str, message: &str) -> Response<Body> {
    state.metrics.refusal("outbound", service, code);
    refusal(status, code, message)
}

/// Routes one call; returns the service and cell for the metrics.
async fn call(state: &State, request: Request<Incoming>) -> (String, String, Response<Body>) {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(authority) = authority else {
        return (
            String::new(),
            String::new(),
            refused(
                state,
                "",
                400,
                "noService",
                "name the service you call in the Host header (or the HTTP/2 authority), as `http://<service>/...` through the sidecar",
            ),
        );
    };
    let service = atoll_routing::host_without_port(&authority).to_owned();
    let Some(view) = state.cell.view() else {
        return (
            service.clone(),
            String::new(),
            refused(
                state,
                &service,
                503,
                "notReady",
                "the sidecar has no configuration from the control plane yet",
            ),
        );
    };
    let table = &view.table;
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let routed = state
        .router
        .route(
            table,
            view.cell,
            &atoll_mesh::Call {
                service: &service,
                method: &parts.method,
                path: &path,
                query: query.as_deref(),
                headers: &parts.headers,
                propagated: propagated_key(&parts.headers),
            },
        )
        .await;
    let routed = match routed {
        Ok(routed) => routed,
        Err(refusal) => {
            return (
                service.clone(),
                String::new(),
                refused(
                    state,
                    &service,
                    refusal.status,
                    refusal.code,
                    &refusal.message,
                ),
            );
        }
    };
    let cell = routed.cell_name.clone();
    let set = routed.set.clone();
    let service_id = routed.service;
    let (key, shard, epoch) = (routed.key.clone(), routed.shard, routed.epoch);
    let cell_id = routed.cell;
    strip_hop_by_hop(&mut parts.headers);
    if let Some(key) = key.as_deref().and_then(|k| HeaderValue::from_str(k).ok()) {
        parts.headers.insert(atoll_proxy::KEY, key);
    }
    if let Some(shard) = shard {
        parts
            .headers
            .insert(atoll_proxy::SHARD, table.shard_header(service_id, shard));
        if let Some(epoch) = epoch {
            parts
                .headers
                .insert(atoll_proxy::EPOCH, HeaderValue::from(epoch));
        }
    }
    parts.headers.insert(
        atoll_proxy::CELL,
        table.cells[usize::from(cell_id)].header.clone(),
    );
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let policy = routed.outlier.clone();
    // A call with an empty body is tried once more on another instance of
    // the cell when it cannot connect (nothing reached the first).
    let retry = empty_body(&body);
    let mut body = Some(boxed(body));
    let mut exclude: Option<String> = None;
    for attempt in 0..2 {
        let Some(member) = set.pick(exclude.as_deref()) else {
            break;
        };
        let upstream = member.upstream.clone();
        let Ok(uri) = format!("http://{}{}", upstream.address, path_and_query).parse::<Uri>()
        else {
            break;
        };
        let mut outgoing = Request::from_parts(parts.clone(), Body::default());
        *outgoing.uri_mut() = uri;
        *outgoing.body_mut() = body.take().unwrap_or_default();
        let client = state
            .clients
            .for_protocol(&member.instance.protocol)
            .clone();
        let _in_flight = upstream.start();
        match client.request(outgoing).await {
            Ok(response) => {
                let status = response.status().as_u16();
                // A provider's refusal (fenced, not owner) is no failure
                // of the instance.
                let healthy =
                    status < 500 || response.headers().contains_key(crate::http::REFUSED_BY);
                upstream.record(healthy, &policy, || true);
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                return (service, cell, Response::from_parts(head, boxed(body)));
            }
            Err(error) => {
                upstream.record(false, &policy, || true);
                let connect = error.is_connect();
                tracing::debug!(upstream = %upstream.address, %error, attempt, "outbound call failed");
                if connect && retry && attempt == 0 {
                    exclude = Some(upstream.address.clone());
                    continue;
                }
                let message = format!(
                    "instance `{}` of service `{service}` in cell `{cell}` failed: {error}",
                    member.instance.name
                );
                return (
                    service.clone(),
                    cell,
                    refused(
                        state,
                        &service,
                        502,
                        if connect {
                            "upstreamConnect"
                        } else {
                            "upstreamReset"
                        },
                        &message,
                    ),
                );
            }
        }
    }
    let message = format!("service `{service}` has no instance to call in cell `{cell}`");
    (
        service.clone(),
        cell,
        refused(state, &service, 503, "noEndpoint", &message),
    )
}
