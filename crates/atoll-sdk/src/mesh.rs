//! SDK mode: east-west calls made in-process, routed exactly as a sidecar
//! routes them (the same `atoll-mesh` code), and the instance registered
//! by the app itself.
//!
//! ```no_run
//! # async fn example(cell: atoll_sdk::Cell) -> Result<(), atoll_sdk::mesh::CallError> {
//! let client = atoll_sdk::mesh::Client::start(cell.clone());
//! // A unitized call: to the cell that owns user 42.
//! let request = http::Request::post("/api/credit")
//!     .body(http_body_util::Full::new(bytes::Bytes::from("{}")))
//!     .expect("request");
//! let response = client.call("bank", request, Some("42")).await?;
//! # let _ = response;
//! # Ok(())
//! # }
//! ```
//!
//! A provider in SDK mode registers its own instance with
//! [`register`]; callers see the same registry record a sidecar writes
//! (only `mode` differs, for operators), so they cannot tell the two apart,
//! and a provider can move between the modes with no caller change.

use std::sync::Arc;
use std::time::Duration;

use atoll_registry::client::Registrar;
use atoll_registry::{Instance, Registrant};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::Cell;

/// Why a call was not answered by a provider.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The router would not send it (no such service, no key, fenced
    /// shard, no instance): the same refusal a sidecar answers with.
    #[error("{code} ({status}): {message}")]
    Refused {
        /// The HTTP status a sidecar would answer with.
        status: u16,
        /// A stable code.
        code: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// The instance chosen could not be reached.
    #[error("instance `{instance}` ({address}) failed: {reason}")]
    Upstream {
        /// Its name.
        instance: String,
        /// Its address.
        address: String,
        /// What failed.
        reason: String,
    },
}

/// Calls other services in-process, as a sidecar would.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cell: Cell,
    router: atoll_mesh::Router,
    http1: HyperClient<HttpConnector, Full<Bytes>>,
    http2: HyperClient<HttpConnector, Full<Bytes>>,
}

/// Channels to the control plane for `cell`'s identity.
fn channels(
    cell: &Cell,
) -> Result<(atoll_transport::Channels, atoll_transport::ControlUrls), String> {
    let identity = cell.identity();
    let urls = atoll_transport::ControlUrls::parse(&identity.control)?;
    let channels = identity
        .transport
        .channels(atoll_transport::ChannelOptions {
            connect_timeout: Some(Duration::from_secs(2)),
            timeout: None,
            keepalive: Some((Duration::from_secs(5), Duration::from_secs(5))),
        });
    Ok((channels, urls))
}

fn registrant(cell: &Cell) -> Registrant {
    let identity = cell.identity();
    Registrant {
        name: identity.instance.clone(),
        role: "sdk".into(),
        zone: identity.zone.clone(),
        workspace: identity.workspace.clone(),
    }
}

impl Client {
    /// A client for the app `cell` belongs to. Services are watched from
    /// their first call. Panics only if the control plane URL of the
    /// identity does not parse, which [`crate::Identity::from_env`]
    /// already refused.
    pub fn start(cell: Cell) -> Client {
        #[expect(
            clippy::expect_used,
            reason = "the identity's URL was parsed when it was made"
        )]
        let (channels, urls) = channels(&cell).expect("the control plane URL parses");
        let router = atoll_mesh::Router::start(channels, urls, registrant(&cell), []);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let http1 = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let http2 = HyperClient::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Client {
            inner: Arc::new(Inner {
                cell,
                router,
                http1,
                http2,
            }),
        }
    }

    /// Calls `service` with `request` (its URI: a path and query). `key`
    /// is the routing key to propagate (the one the app's inbound request
    /// carried), for a unitized service whose rule finds none in the call
    /// itself. The call gets `x-atoll-key`, `x-atoll-shard`,
    /// `x-atoll-epoch` and `x-atoll-cell` as from a sidecar. A call with no
    /// body that cannot connect is tried once more on another instance of
    /// the cell.
    pub async fn call(
        &self,
        service: &str,
        request: Request<Full<Bytes>>,
        key: Option<&str>,
    ) -> Result<Response<Incoming>, CallError> {
        let inner = &self.inner;
        let Some(view) = inner.cell.view() else {
            return Err(CallError::Refused {
                status: 503,
                code: "notReady",
                message: "this instance has no configuration from the control plane yet".into(),
            });
        };
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);
        let routed = inner
            .router
            .route(
                &view.table,
                view.cell,
                &atoll_mesh::Call {
                    service,
                    method: &parts.method,
                    path: &path,
                    query: query.as_deref(),
                    headers: &parts.headers,
                    propagated: key,
                },
            )
            .await
            .map_err(|r| CallError::Refused {
                status: r.status,
                code: r.code,
                message: r.message,
            })?;
        if let Some(key) = routed
            .key
            .as_deref()
            .and_then(|k| HeaderValue::from_str(k).ok())
        {
            parts.headers.insert("x-atoll-key", key);
        }
        if let Some(shard) = routed.shard {
            parts
                .headers
                .insert("x-atoll-shard", HeaderValue::from(shard));
            if let Some(epoch) = routed.epoch {
                parts
                    .headers
                    .insert("x-atoll-epoch", HeaderValue::from(epoch));
            }
        }
        if let Ok(cell) = HeaderValue::from_str(&routed.cell_name) {
            parts.headers.insert("x-atoll-cell", cell);
        }
        if !parts.headers.contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::from_str(service)
        {
            parts.headers.insert(http::header::HOST, host);
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let retry = http_body::Body::size_hint(&body).exact() == Some(0);
        let mut exclude: Option<String> = None;
        let mut last = None;
        for attempt in 0..2 {
            let Some(member) = routed.set.pick(exclude.as_deref()) else {
                break;
            };
            let upstream = member.upstream.clone();
            let Ok(uri) = format!("http://{}{}", upstream.address, path_and_query).parse::<Uri>()
            else {
                break;
            };
            let mut outgoing = Request::from_parts(parts.clone(), body.clone());
            *outgoing.uri_mut() = uri;
            let client = match member.instance.protocol.as_str() {
                "http2" | "grpc" => &inner.http2,
                _ => &inner.http1,
            };
            let _in_flight = upstream.start();
            match client.request(outgoing).await {
                Ok(response) => {
                    let healthy = response.status().as_u16() < 500
                        || response.headers().contains_key("x-atoll-refused-by");
                    upstream.record(healthy, &routed.outlier, || true);
                    return Ok(response);
                }
                Err(error) => {
                    upstream.record(false, &routed.outlier, || true);
                    let connect = error.is_connect();
                    last = Some(CallError::Upstream {
                        instance: member.instance.name.clone(),
                        address: upstream.address.clone(),
                        reason: error.to_string(),
                    });
                    if connect && retry && attempt == 0 {
                        exclude = Some(upstream.address.clone());
                        continue;
                    }
                    break;
                }
            }
        }
        Err(last.unwrap_or_else(|| CallError::Refused {
            status: 503,
            code: "noEndpoint",
            message: format!(
                "service `{service}` has no instance to call in cell `{}`",
                routed.cell_name
            ),
        }))
    }
}

/// Registers the instance of `cell` (SDK mode) at `address:port`, speaking
/// `protocol`, for as long as the returned registrar lives; close it to
/// deregister at once. The record is the one a sidecar would write, with
/// `mode: sdk`.
pub fn register(
    cell: &Cell,
    address: &str,
    port: u16,
    protocol: &str,
    ttl: Duration,
) -> Result<Registrar, String> {
    let (channels, urls) = channels(cell)?;
    let identity = cell.identity();
    let registrar = Registrar::start(channels, urls, registrant(cell), ttl);
    registrar.put(Instance {
        service: identity.service.clone(),
        name: identity.instance.clone(),
        zone: identity.zone.clone(),
        cell: identity.cell.clone(),
        address: address.to_owned(),
        port: u32::from(port),
        protocol: protocol.to_owned(),
        version: std::env::var("ATOLL_VERSION").unwrap_or_default(),
        mode: "sdk".into(),
        ..Instance::default()
    });
    Ok(registrar)
}
