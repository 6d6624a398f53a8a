//! The inbound side: calls to the app, re-checked against the shard map
//! the sidecar follows (the provider re-check).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use atoll_model::ServiceKind;
use atoll_routing::RequestInfo;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::State;
use crate::http::{Body, Held, boxed, propagated_key, refusal, strip_hop_by_hop};

pub(crate) fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
    Box::pin(async move {
        let started = Instant::now();
        let response = serve(&state, request).await;
        let identity = &state.options.identity;
        state.metrics.http_call(
            "inbound",
            identity.service.clone(),
            identity.cell.clone(),
            started,
            &response,
        );
        response
    })
}

fn refused(state: &State, status: u16, code: &str, message: &str) -> Response<Body> {
    state
        .metrics
        .refusal("inbound", &state.options.identity.service, code);
    refusal(status, code, message)
}

/// A write permit, counted while held.
struct Permit {
    _permit: atoll_sdk::WritePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn serve(state: &State, request: Request<Incoming>) -> Response<Body> {
    let Some(view) = state.cell.view() else {
        return refused(
            state,
            503,
            "notReady",
            "this instance's sidecar has no shard map yet; try another instance",
        );
    };
    let table = &view.table;
    let service = view.service;
    let (mut parts, body) = request.into_parts();
    let mut permit = None;
    if table.kind(service) == Some(ServiceKind::Unitized) {
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);
        let info = RequestInfo {
            method: &parts.method,
            host: None,
            path: &path,
            query: query.as_deref(),
            headers: &parts.headers,
            body: None,
            forwarded: false,
        };
        // The shard from the key, as the caller's router computed it;
        // a caller that sent only `x-atoll-shard` is taken at its word.
        let decided = table.decide_call(
            service,
            &info,
            propagated_key(&parts.headers),
            None,
            &|_| true,
        );
        let from_header = parts
            .headers
            .get(atoll_proxy::SHARD)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        let (shard, write) = match decided {
            Ok(call) => (call.shard.or(from_header), call.write),
            // No key: nothing to re-check (health checks, calls the app
            // itself answers or refuses); a caller that sent only the
            // shard is checked by it.
            Err(atoll_routing::Refusal::MissingKey { .. }) => {
                (from_header, table.is_write(service, &parts.method))
            }
            Err(refusal) => {
                let message = refusal.message(table);
                return refused(state, refusal.status(), refusal.code(), &message);
            }
        };
        let epoch = parts
            .headers
            .get(atoll_proxy::EPOCH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(shard) = shard {
            if write {
                match state.cell.admit_write(shard, epoch).await {
                    Ok(held) => {
                        state.metrics.permits.inc();
                        permit = Some(Permit {
                            _permit: held,
                            gauge: state.metrics.permits.clone(),
                        });
                    }
                    Err(why) => return refused_write(state, &why),
                }
            } else if !view.owns(shard) {
                let owner = view.owner(shard).map_or("?", |(cell, _)| cell);
                let message = format!(
                    "shard {shard} belongs to cell {owner}, not {} (epoch {}): call through a router that follows the shard map",
                    state.options.identity.cell,
                    view.epoch()
                );
                return refused(state, 421, "notOwner", &message);
            }
        }
    }

    strip_hop_by_hop(&mut parts.headers);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Ok(uri) = format!("http://{}{}", state.options.app, path_and_query).parse::<Uri>() else {
        return refused(
            state,
            400,
            "badPath",
            "the request's path cannot be passed on",
        );
    };
    parts.uri = uri;
    let outgoing = Request::from_parts(parts, boxed(body));
    let client = state
        .clients
        .for_protocol(&state.options.app_protocol)
        .clone();
    match client.request(outgoing).await {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            let body = boxed(body);
            let body = match permit {
                Some(permit) => Held::new(body, permit).boxed(),
                None => body,
            };
            Response::from_parts(head, body)
        }
        Err(error) => refused(
            state,
            502,
            "appUnavailable",
            &format!("the app at {} did not answer: {error}", state.options.app),
        ),
    }
}

fn refused_write(state: &State, why: &atoll_sdk::Refused) -> Response<Body> {
    refused(state, why.status(), why.code(), &why.to_string())
}
