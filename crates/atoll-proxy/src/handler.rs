//! One request through the proxy: route, refuse or forward, retry, mirror,
//! log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_model::RetryOn;
use atoll_routing::{Decision, EndpointId, Refusal, RequestInfo, Target, Via, host_without_port};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::access_log::Entry;
use crate::body::{BufferError, Capture, RequestBody, ResponseBody, buffer};
use crate::headers::{
    HOP, MAX_CLIENT_HEADERS, MIRROR, Propagation, counted, forwarded_for, is_upgrade, propagate,
    strip_hop_by_hop, strip_internal, too_many_headers,
};
use crate::{Proxy, Snapshot};

/// How long a client may take to send a body its routing key is read from,
/// on a route without a time limit.
const BODY_BUFFER_LIMIT: Duration = Duration::from_secs(60);

/// What the listener knows about the connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Connection {
    pub(crate) remote: SocketAddr,
    pub(crate) tls: bool,
    /// On a peer listener: the client is a gateway of this workspace (its
    /// certificate said so).
    pub(crate) peer: bool,
}

/// The routing result, owned so that the request can be changed after.
struct Routed {
    route: u32,
    service: u32,
    cell: u16,
    endpoint: EndpointId,
    via: Via,
    key: Option<HeaderValue>,
    shard: Option<u32>,
    subset: Option<u16>,
    write: bool,
    mirror: Option<EndpointId>,
}

impl Routed {
    fn target(&self) -> Target<'static> {
        Target {
            route: self.route,
            service: self.service,
            cell: self.cell,
            endpoint: self.endpoint,
            via: self.via,
            write: self.write,
            key: None,
            shard: self.shard,
            subset: self.subset,
        }
    }
}

/// A JSON answer of the proxy itself.
fn answer(
    status: StatusCode,
    code: &str,
    message: &str,
    extra: &[(&str, serde_json::Value)],
) -> Response<ResponseBody> {
    let mut body = serde_json::Map::new();
    body.insert("error".into(), code.into());
    body.insert("message".into(), message.into());
    for (key, value) in extra {
        body.insert((*key).into(), value.clone());
    }
    let mut text = serde_json::to_vec(&body).unwrap_or_default();
    text.push(b'\n');
    let mut response = Response::new(ResponseBody::full(text));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Facts for the access log.
struct Outcome<'a> {
    status: u16,
    route: Option<&'a str>,
    service: Option<&'a str>,
    cell: Option<&'a str>,
    shard: Option<u32>,
    upstream: Option<&'a str>,
    via: Option<&'static str>,
    error: Option<&'a str>,
}

impl Proxy {
    /// Handles one request.
    pub(crate) async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        connection: Connection,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let Some(mut snapshot) = self.snapshot() else {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "notReady",
                "this node has no configuration yet",
                &[],
            );
        };
        let (mut parts, body) = request.into_parts();
        let host: Option<String> =
            parts
                .uri
                .authority()
                .map(|a| a.host().to_owned())
                .or_else(|| {
                    parts
                        .headers
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(|h| host_without_port(h).to_owned())
                });
        let forwarded = parts.headers.contains_key(HOP);
        let client_headers = parts
            .headers
            .keys()
            .filter(|name| counted(name.as_str().as_bytes()))
            .map(|name| parts.headers.get_all(name).iter().count())
            .sum::<usize>();
        // An answer of the gateway's own before routing, logged.
        let early = |status: StatusCode, code: &str, message: &str| {
            self.log(
                &parts.method,
                host.as_deref(),
                parts.uri.path(),
                parts.version,
                &connection,
                started,
                &Outcome::refused(status.as_u16(), None, code),
            );
            answer(status, code, message, &[])
        };
        if client_headers > MAX_CLIENT_HEADERS {
            snapshot.metrics.refused("headersTooLarge").inc();
            return early(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headersTooLarge",
                &too_many_headers(client_headers),
            );
        }
        // Routes see, and the upstream gets, the path in one form.
        let path = match atoll_routing::normalize_path(parts.uri.path()) {
            Ok(path) => path,
            Err(error) => {
                snapshot.metrics.refused("badPath").inc();
                return early(StatusCode::BAD_REQUEST, "badPath", &error.to_string());
            }
        };

        // Match a route; buffer the body if the key is in it.
        let matched = {
            let info = RequestInfo {
                method: &parts.method,
                host: host.as_deref(),
                path: &path,
                query: parts.uri.query(),
                headers: &parts.headers,
                body: None,
                forwarded,
            };
            snapshot.table.match_route(&info)
        };
        let Some(route) = matched else {
            snapshot.metrics.refused("noRoute").inc();
            let response = answer(
                StatusCode::NOT_FOUND,
                "noRoute",
                "no route matches this request",
                &[],
            );
            self.log(
                &parts.method,
                host.as_deref(),
                &path,
                parts.version,
                &connection,
                started,
                &Outcome::refused(404, None, "noRoute"),
            );
            return response;
        };
        let (mut body, buffered) = if snapshot.table.needs_body(route) {
            // The client has the route's time limit (else a minute) to send
            // the body the key is read from.
            let limit = snapshot.table.routes[route as usize]
                .timeout
                .unwrap_or(BODY_BUFFER_LIMIT);
            let buffered = match tokio::time::timeout(
                limit,
                buffer(body, self.settings.max_buffered_body),
            )
            .await
            {
                Ok(buffered) => buffered,
                Err(_) => {
                    snapshot.metrics.client_error(Some(408));
                    return early(
                        StatusCode::REQUEST_TIMEOUT,
                        "requestTimeout",
                        &format!(
                            "the request body (its routing key is read from it) did not arrive within {}",
                            format_duration(limit)
                        ),
                    );
                }
            };
            match buffered {
                Ok(bytes) => (RequestBody::Full(Some(bytes.clone())), Some(bytes)),
                Err(BufferError::TooLarge) => {
                    snapshot.metrics.refused("badRequest").inc();
                    return early(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "bodyTooLarge",
                        &format!(
                            "the routing key is read from the body, which may be at most {} bytes",
                            self.settings.max_buffered_body
                        ),
                    );
                }
                Err(BufferError::Failed(error)) => {
                    snapshot.metrics.client_error(Some(400));
                    return early(
                        StatusCode::BAD_REQUEST,
                        "badRequest",
                        &format!("reading the request body failed: {error}"),
                    );
                }
            }
        } else if body.is_end_stream() {
            (RequestBody::Empty, None)
        } else {
            (RequestBody::stream(body), None)
        };

        // Decide, holding a fenced write for a while if the gateway says so.
        let hold_until = Instant::now() + snapshot.table.write_fence_hold;
        let mut versions = self.versions.subscribe();
        let routed = loop {
            let decision = {
                let info = RequestInfo {
                    method: &parts.method,
                    host: host.as_deref(),
                    path: &path,
                    query: parts.uri.query(),
                    headers: &parts.headers,
                    body: buffered.as_deref(),
                    forwarded,
                };
                let route = match snapshot.table.match_route(&info) {
                    Some(route) => route,
                    None => break Err(Refusal::NoRoute),
                };
                match snapshot.table.decide(route, &info, &*snapshot) {
                    Decision::Upstream(target) => {
                        let mirror = snapshot.table.mirror(&target, &info, &*snapshot);
                        Ok(Routed {
                            route: target.route,
                            service: target.service,
                            cell: target.cell,
                            endpoint: target.endpoint,
                            via: target.via,
                            key: target
                                .key
                                .as_deref()
                                .and_then(|k| HeaderValue::from_str(k).ok()),
                            shard: target.shard,
                            subset: target.subset,
                            write: target.write,
                            mirror,
                        })
                    }
                    Decision::Refuse(refusal) => Err(refusal),
                }
            };
            match decision {
                Err(Refusal::Fenced { .. }) if Instant::now() < hold_until => {
                    versions.borrow_and_update();
                    let wait = hold_until.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(wait, versions.changed()).await;
                    if let Some(newer) = self.snapshot() {
                        snapshot = newer;
                    }
                }
                other => break other,
            }
        };
        let routed = match routed {
            Ok(routed) => routed,
            Err(refusal) => {
                let response = self.refuse(&snapshot, &refusal);
                let cell_name = match &refusal {
                    Refusal::Fenced { cell, .. } | Refusal::Loop { cell } => snapshot
                        .table
                        .cells
                        .get(usize::from(*cell))
                        .map(|c| c.name.as_str()),
                    _ => None,
                };
                self.log(
                    &parts.method,
                    host.as_deref(),
                    &path,
                    parts.version,
                    &connection,
                    started,
                    &Outcome {
                        cell: cell_name,
                        ..Outcome::refused(refusal.status(), None, refusal.code())
                    },
                );
                return response;
            }
        };

        // Rewrite the request for the upstream.
        let upgrade = parts.version == Version::HTTP_11 && is_upgrade(&parts.headers);
        let on_upgrade = if upgrade {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let client_baggage = strip_internal(&mut parts.headers);
        let table = &snapshot.table;
        let cell = &table.cells[usize::from(routed.cell)];
        propagate(
            &mut parts.headers,
            &Propagation {
                key: routed.key.as_ref(),
                shard: routed.shard.map(|s| table.shard_header(routed.service, s)),
                cell: &cell.header,
                epoch: routed
                    .shard
                    .and_then(|_| table.epoch_header(routed.service)),
            },
            &client_baggage,
        );
        if routed.via == Via::Gateway {
            parts.headers.insert(HOP, HeaderValue::from_static("1"));
            snapshot.metrics.misroutes[usize::from(routed.cell)].inc();
        }
        forwarded_for(
            &mut parts.headers,
            connection.remote.ip(),
            connection.tls,
            (forwarded && connection.peer)
                || snapshot.trusted_hop(forwarded, connection.remote.ip()),
        );
        if !parts.headers.contains_key(HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(HOST, value);
        }
        // One allocation, as before normalising: the original when it was
        // normal already.
        let path_and_query = match (&path, parts.uri.query()) {
            (std::borrow::Cow::Borrowed(_), _) => parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            (std::borrow::Cow::Owned(path), Some(query)) => format!("{path}?{query}"),
            (std::borrow::Cow::Owned(path), None) => path.clone(),
        };

        // Mirror: a copy of the request, sent when its body is complete.
        if let Some(endpoint) = routed.mirror {
            self.mirror(
                &snapshot,
                endpoint,
                &parts.method,
                &path_and_query,
                &parts.headers,
                &mut body,
            );
        }

        let route_spec = &table.routes[routed.route as usize];
        let replayable = body.replay().is_some();
        let watch = body.watch();
        let attempts = if replayable {
            1 + route_spec.retries
        } else {
            1
        };
        let deadline = route_spec.timeout.map(|t| started + t);
        let mut endpoint = routed.endpoint;
        let mut body = Some(body);
        let mut headers = Some(parts.headers);
        let mut last_error = (
            StatusCode::BAD_GATEWAY,
            "upstreamUnavailable",
            String::new(),
        );
        // The exchange failed for the client's fault (its body): not an
        // upstream response, so not counted in the (route, cell) metrics.
        let mut client_fault = false;
        for attempt in 0..attempts {
            let upstream = snapshot.upstreams[endpoint as usize].clone();
            let last = attempt + 1 == attempts;
            let this_body = if last {
                body.take()
            } else {
                body.as_ref().and_then(RequestBody::replay)
            };
            let this_headers = if last {
                headers.take()
            } else {
                headers.clone()
            };
            let (Some(this_body), Some(this_headers)) = (this_body, this_headers) else {
                break;
            };
            // A gateway with a peer listener is reached over mutual TLS.
            let peer = snapshot.table.endpoints[endpoint as usize].peer.as_ref();
            let peer_client = match peer.map(|p| self.peer_client(&upstream.address, p)) {
                None => None,
                Some(Ok(client)) => Some(client),
                Some(Err(why)) => {
                    last_error = (StatusCode::BAD_GATEWAY, "upstreamUnavailable", why);
                    break;
                }
            };
            let uri = match Uri::builder()
                .scheme(if peer.is_some() { "https" } else { "http" })
                .authority(upstream.authority.clone())
                .path_and_query(path_and_query.as_str())
                .build()
            {
                Ok(uri) => uri,
                Err(error) => {
                    last_error = (
                        StatusCode::BAD_REQUEST,
                        "badRequest",
                        format!("cannot build the upstream URI: {error}"),
                    );
                    break;
                }
            };
            let mut upstream_request = Request::new(this_body);
            *upstream_request.method_mut() = parts.method.clone();
            *upstream_request.uri_mut() = uri;
            *upstream_request.version_mut() = Version::HTTP_11;
            *upstream_request.headers_mut() = this_headers;
            let in_flight = upstream.start();
            let per_try = route_spec.per_try_timeout;
            let limit = match (per_try, deadline) {
                (Some(t), Some(d)) => Some(t.min(d.saturating_duration_since(Instant::now()))),
                (Some(t), None) => Some(t),
                (None, Some(d)) => Some(d.saturating_duration_since(Instant::now())),
                (None, None) => None,
            };
            let sent = match &peer_client {
                Some(client) => client.request(upstream_request),
                None => self.client.request(upstream_request),
            };
            let result = match limit {
                Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| ()),
                None => Ok(sent.await),
            };
            let outlier = &table.services[routed.service as usize].outlier_detection;
            let may_eject = || snapshot.may_eject(routed.service, routed.cell, endpoint);
            // Whether the client's body is why the try failed: it broke
            // (`Some(Some(why))`), the client went away (`Some(None)`), or
            // the limit ran out while waiting for it.
            let client_failure: Option<Option<String>> = match &result {
                Ok(Err(_)) => watch
                    .as_ref()
                    .and_then(|w| w.failure())
                    .map(|f| f.map(str::to_owned)),
                _ => None,
            };
            let client_slow =
                result.is_err() && watch.as_ref().is_some_and(|w| w.waiting_for_client());
            match result {
                Ok(Ok(mut response)) => {
                    let status = response.status();
                    let failed = status.is_server_error();
                    if upstream.record(!failed, outlier, may_eject) {
                        self.metrics.ejections.inc();
                    }
                    let retry_status = matches!(status.as_u16(), 502..=504)
                        && route_spec.retry_on.contains(&RetryOn::GatewayError)
                        && is_idempotent(&parts.method);
                    if failed {
                        snapshot.metrics.upstream_status.inc();
                    }
                    if retry_status
                        && !last
                        && let Some(next) =
                            table.retry_endpoint(&routed.target(), endpoint, &*snapshot)
                    {
                        self.metrics.retries.inc();
                        endpoint = next;
                        continue;
                    }
                    strip_hop_by_hop(
                        response.headers_mut(),
                        status == StatusCode::SWITCHING_PROTOCOLS,
                    );
                    if status == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(downstream) = on_upgrade
                    {
                        let upstream_upgrade = hyper::upgrade::on(&mut response);
                        tokio::spawn(async move {
                            match tokio::try_join!(downstream, upstream_upgrade) {
                                Ok((client, server)) => {
                                    let mut client = TokioIo::new(client);
                                    let mut server = TokioIo::new(server);
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server)
                                        .await;
                                }
                                Err(error) => tracing::debug!(%error, "upgrade failed"),
                            }
                        });
                    }
                    let elapsed = started.elapsed();
                    snapshot
                        .metrics
                        .path(routed.route, routed.cell)
                        .observe(status.as_u16(), elapsed.as_secs_f64());
                    self.log(
                        &parts.method,
                        host.as_deref(),
                        &path_and_query,
                        parts.version,
                        &connection,
                        started,
                        &Outcome {
                            status: status.as_u16(),
                            route: Some(&route_spec.name),
                            service: Some(&table.services[routed.service as usize].name),
                            cell: Some(&cell.name),
                            shard: routed.shard,
                            upstream: Some(&upstream.address),
                            via: Some(if routed.via == Via::Gateway {
                                "gateway"
                            } else {
                                "direct"
                            }),
                            error: None,
                        },
                    );
                    let (mut response_parts, incoming) = response.into_parts();
                    // Answer in the client's protocol, whatever the upstream spoke.
                    response_parts.version = parts.version;
                    return Response::from_parts(
                        response_parts,
                        ResponseBody::upstream(incoming, in_flight),
                    );
                }
                Ok(Err(_)) if client_failure.is_some() => {
                    // The client's body failed, not the upstream: nothing is
                    // held against it.
                    drop(in_flight);
                    let (status, message) = match client_failure.flatten() {
                        Some(why) => (
                            Some(StatusCode::BAD_REQUEST),
                            format!("the request body is malformed: {why}"),
                        ),
                        None => (None, "the client went away mid-body".to_owned()),
                    };
                    snapshot.metrics.client_error(status.map(|s| s.as_u16()));
                    last_error = (
                        status.unwrap_or(StatusCode::BAD_REQUEST),
                        "badRequest",
                        message,
                    );
                    client_fault = true;
                    break;
                }
                Err(()) if client_slow => {
                    drop(in_flight);
                    snapshot.metrics.client_error(Some(408));
                    last_error = (
                        StatusCode::REQUEST_TIMEOUT,
                        "requestTimeout",
                        format!(
                            "the request body did not arrive within the route's {} limit",
                            format_duration(limit_or_zero(per_try, deadline, started))
                        ),
                    );
                    client_fault = true;
                    break;
                }
                Ok(Err(error)) => {
                    drop(in_flight);
                    if upstream.record(false, outlier, may_eject) {
                        self.metrics.ejections.inc();
                    }
                    let connect = error.is_connect();
                    if connect {
                        snapshot.metrics.upstream_connect.inc();
                    } else {
                        snapshot.metrics.upstream_reset.inc();
                    }
                    let mut cause = error.to_string();
                    let mut source = std::error::Error::source(&error);
                    while let Some(inner) = source {
                        cause = format!("{cause}: {inner}");
                        source = inner.source();
                    }
                    last_error = (
                        StatusCode::BAD_GATEWAY,
                        "upstreamUnavailable",
                        format!(
                            "upstream {} (cell {}) failed: {cause}",
                            upstream.address, cell.name
                        ),
                    );
                    let retry = (connect && route_spec.retry_on.contains(&RetryOn::ConnectFailure))
                        || (!connect
                            && route_spec.retry_on.contains(&RetryOn::Reset)
                            && is_idempotent(&parts.method));
                    if retry
                        && !last
                        && let Some(next) =
                            table.retry_endpoint(&routed.target(), endpoint, &*snapshot)
                    {
                        self.metrics.retries.inc();
                        endpoint = next;
                        continue;
                    }
                    break;
                }
                Err(()) => {
                    drop(in_flight);
                    if upstream.record(false, outlier, may_eject) {
                        self.metrics.ejections.inc();
                    }
                    snapshot.metrics.upstream_timeout.inc();
                    last_error = (
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstreamTimeout",
                        format!(
                            "upstream {} (cell {}) did not answer within {}",
                            upstream.address,
                            cell.name,
                            format_duration(limit_or_zero(per_try, deadline, started))
                        ),
                    );
                    break;
                }
            }
        }
        let (status, code, message) = last_error;
        if !client_fault {
            snapshot
                .metrics
                .path(routed.route, routed.cell)
                .observe(status.as_u16(), started.elapsed().as_secs_f64());
        }
        self.log(
            &parts.method,
            host.as_deref(),
            &path_and_query,
            parts.version,
            &connection,
            started,
            &Outcome {
                status: status.as_u16(),
                route: Some(&route_spec.name),
                service: Some(&table.services[routed.service as usize].name),
                cell: Some(&cell.name),
                shard: routed.shard,
                upstream: None,
                via: None,
                error: Some(&message),
            },
        );
        answer(
            status,
            code,
            &message,
            &[("cell", cell.name.clone().into())],
        )
    }

    fn refuse(&self, snapshot: &Snapshot, refusal: &Refusal) -> Response<ResponseBody> {
        let status =
            StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let facts = snapshot.refusal_facts(refusal);
        let mut response = answer(
            status,
            refusal.code(),
            &refusal.message(&snapshot.table),
            &facts,
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// Sends a copy of the request to `endpoint` once its body is complete,
    /// from a task of its own; never delays the primary.
    fn mirror(
        &self,
        snapshot: &Snapshot,
        endpoint: EndpointId,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &mut RequestBody,
    ) {
        let Ok(permit) = self.mirrors.clone().try_acquire_owned() else {
            snapshot.metrics.mirror_dropped.inc();
            return;
        };
        let copy_body: tokio::sync::oneshot::Receiver<Bytes> = match body {
            RequestBody::Empty => {
                let (sender, receiver) = tokio::sync::oneshot::channel();
                let _ = sender.send(Bytes::new());
                receiver
            }
            RequestBody::Full(Some(bytes)) => {
                let (sender, receiver) = tokio::sync::oneshot::channel();
                let _ = sender.send(bytes.clone());
                receiver
            }
            RequestBody::Full(None) | RequestBody::Tee(..) => {
                snapshot.metrics.mirror_dropped.inc();
                return;
            }
            RequestBody::Stream(..) => {
                let (capture, receiver) = Capture::new(self.settings.mirror_body_limit);
                let RequestBody::Stream(incoming, watch) =
                    std::mem::replace(body, RequestBody::Empty)
                else {
                    return;
                };
                *body = RequestBody::Tee(incoming, capture, watch);
                receiver
            }
        };
        let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(snapshot.upstreams[endpoint as usize].authority.clone())
            .path_and_query(path_and_query)
            .build()
        else {
            snapshot.metrics.mirror_failed.inc();
            return;
        };
        let mut headers = headers.clone();
        headers.remove(http::header::CONTENT_LENGTH);
        headers.insert(MIRROR, HeaderValue::from_static("true"));
        let method = method.clone();
        let client = self.client.clone();
        let timeout = self.settings.mirror_timeout;
        let sent = snapshot.metrics.mirror_sent.clone();
        let failed = snapshot.metrics.mirror_failed.clone();
        let dropped = snapshot.metrics.mirror_dropped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let body = match tokio::time::timeout(timeout, copy_body).await {
                Ok(Ok(body)) => body,
                _ => {
                    // Body too large, failed, or the client went away.
                    dropped.inc();
                    return;
                }
            };
            let mut request = Request::new(if body.is_empty() {
                RequestBody::Empty
            } else {
                RequestBody::Full(Some(body))
            });
            *request.method_mut() = method;
            *request.uri_mut() = uri;
            *request.headers_mut() = headers;
            match tokio::time::timeout(timeout, client.request(request)).await {
                Ok(Ok(response)) => {
                    sent.inc();
                    // Drain so the connection goes back to the pool.
                    let _ = tokio::time::timeout(
                        timeout,
                        http_body_util::BodyExt::collect(response.into_body()),
                    )
                    .await;
                }
                _ => {
                    failed.inc();
                }
            }
        });
    }

    #[expect(clippy::too_many_arguments, reason = "the facts of one log line")]
    fn log(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        version: Version,
        connection: &Connection,
        started: Instant,
        outcome: &Outcome<'_>,
    ) {
        let Some(log) = &self.access_log else { return };
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let protocol = match version {
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_11 => "HTTP/1.1",
            Version::HTTP_2 => "HTTP/2",
            _ => "other",
        };
        log.write(&Entry {
            time,
            remote: connection.remote.to_string(),
            method: method.as_str(),
            host: host.unwrap_or(""),
            path,
            protocol,
            status: outcome.status,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            route: outcome.route,
            service: outcome.service,
            cell: outcome.cell,
            shard: outcome.shard,
            upstream: outcome.upstream,
            via: outcome.via,
            error: outcome.error,
        });
    }
}

impl<'a> Outcome<'a> {
    fn refused(status: u16, route: Option<&'a str>, code: &'a str) -> Self {
        Self {
            status,
            route,
            service: None,
            cell: None,
            shard: None,
            upstream: None,
            via: None,
            error: Some(code),
        }
    }
}

fn limit_or_zero(
    per_try: Option<Duration>,
    deadline: Option<Instant>,
    started: Instant,
) -> Duration {
    match (per_try, deadline) {
        (Some(t), _) => t,
        (None, Some(d)) => d.saturating_duration_since(started),
        (None, None) => Duration::ZERO,
    }
}

fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
