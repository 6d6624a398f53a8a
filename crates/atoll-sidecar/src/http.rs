//! What both sides share: the listeners (HTTP/1.1 and HTTP/2 cleartext on
//! one port, as gRPC needs), the upstream clients, bodies and refusals.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use crate::State;

/// An error of a body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the sidecar sends.
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// Upstream clients: HTTP/1.1 (keep-alive pools) and HTTP/2 with prior
/// knowledge (gRPC, `http2`).
#[derive(Debug, Clone)]
pub(crate) struct Clients {
    pub(crate) http1: Client<HttpConnector, Body>,
    pub(crate) http2: Client<HttpConnector, Body>,
}

impl Clients {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self { http1, http2 }
    }

    /// The client for an upstream speaking `protocol`.
    pub(crate) fn for_protocol(&self, protocol: &str) -> &Client<HttpConnector, Body> {
        match protocol {
            "http2" | "grpc" => &self.http2,
            _ => &self.http1,
        }
    }
}

/// A handler of one side.
pub(crate) type Handler =
    fn(Arc<State>, Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Serves `listener` with `handler` until `stop` turns true, then lets the
/// connections finish what they are doing (HTTP/2 with GOAWAY).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    handler: Handler,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    // While draining, HTTP/1 answers say `Connection: close`: a keep-alive
    // client opens its next connection (to the socket's new owner after a
    // hot upgrade) instead of racing a close of an idle one.
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let draining = draining.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let http1 = request.version() < http::Version::HTTP_2;
                    let response = handler(state.clone(), request);
                    let draining = draining.clone();
                    async move {
                        let mut response = response.await;
                        if http1 && draining.load(std::sync::atomic::Ordering::SeqCst) {
                            response
                                .headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
        }
    }
    drop(listener);
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(DRAIN_WINDOW).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
}

/// How long connections are served with `Connection: close` before the
/// idle ones are closed.
const DRAIN_WINDOW: Duration = Duration::from_secs(1);

/// A body that holds `guard` until the body ends (or is dropped): an
/// inbound write's permit lives until its response is done.
pub(crate) struct Held<G> {
    body: Body,
    guard: Option<G>,
}

impl<G> Held<G> {
    pub(crate) fn new(body: Body, guard: G) -> Self {
        Self {
            body,
            guard: Some(guard),
        }
    }
}

impl<G: Send + Sync + Unpin + 'static> http_body::Body for Held<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An incoming body as the sidecar's body type.
pub(crate) fn boxed(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// A refusal: the status, and a JSON body with a stable code and a
/// sentence, as the gateway answers (`{"code": ..., "message": ...}`),
/// marked `x-atoll-refused-by: sidecar`.
pub(crate) fn refusal(status: u16, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(REFUSED_BY, HeaderValue::from_static("sidecar"));
    if status == 503 {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// Marks an answer the sidecar gave itself.
pub(crate) const REFUSED_BY: HeaderName = HeaderName::from_static("x-atoll-refused-by");

/// Removes the hop-by-hop headers of a request or response being passed
/// on (the ones `Connection` names too). `te: trailers` stays: gRPC needs
/// it.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(http::header::TE);
    }
}

/// The routing key the inbound request carried, as the gateway set it:
/// `x-atoll-key`, else the `atoll.key` member of W3C `baggage`.
pub(crate) fn propagated_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers
        .get(atoll_proxy::KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
    {
        return Some(key);
    }
    headers
        .get_all(atoll_proxy::BAGGAGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|member| {
            let (name, value) = member.split_once('=')?;
            (name.trim() == "atoll.key")
                .then(|| value.split(';').next().unwrap_or("").trim())
                .filter(|v| !v.is_empty())
        })
}

/// Whether a request's body is known to be empty (it can be sent again).
pub(crate) fn empty_body(body: &Incoming) -> bool {
    body.is_end_stream() || body.size_hint().exact() == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_comes_from_the_header_then_from_baggage() {
        let mut headers = HeaderMap::new();
        assert_eq!(propagated_key(&headers), None);
        headers.insert(
            "baggage",
            HeaderValue::from_static("userId=x, atoll.key=u-42;prop=1, other=y"),
        );
        assert_eq!(propagated_key(&headers), Some("u-42"));
        headers.insert("x-atoll-key", HeaderValue::from_static("u-7"));
        assert_eq!(propagated_key(&headers), Some("u-7"));
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.get("x-private").is_none());
        assert!(headers.get("keep-alive").is_none());
        assert!(headers.get("connection").is_none());
        assert_eq!(
            headers.get("te").map(HeaderValue::as_bytes),
            Some(&b"trailers"[..])
        );
        assert!(headers.get("x-kept").is_some());
    }
}
