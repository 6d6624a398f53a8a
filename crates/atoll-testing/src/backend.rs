//! A test backend that says who it is: every answer is JSON naming the
//! backend, its cell, and what it received (method, path, the routing headers
//! Atoll adds). It can be slow, fail, report unhealthy, and echo upgrades.
//!
//! Paths: `/slow/MS` waits MS milliseconds; `/status/CODE` answers CODE;
//! `/healthz` answers 200 or 503 by [`Backend::set_healthy`]; a request with
//! `Upgrade: echo` gets 101 and its bytes echoed back. Anything else: 200.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::TcpListener;

/// Headers a backend reports back.
const REPORTED: [&str; 11] = [
    "host",
    "x-atoll-key",
    "x-atoll-shard",
    "x-atoll-cell",
    "x-atoll-epoch",
    "x-atoll-hop",
    "x-atoll-mirror",
    "baggage",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-user-id",
];

#[derive(Debug)]
struct Inner {
    name: String,
    cell: String,
    healthy: AtomicBool,
    requests: AtomicU64,
    last: Mutex<Option<serde_json::Value>>,
}

/// A running backend; stops when dropped.
#[derive(Debug)]
pub struct Backend {
    inner: Arc<Inner>,
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts a backend named `name` for `cell` on a free port of `ip`
    /// (any 127.x.y.z works on Linux).
    pub async fn start(name: &str, cell: &str, ip: &str) -> Backend {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind a backend port");
        let address = listener.local_addr().expect("backend address");
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            cell: cell.to_owned(),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            last: Mutex::new(None),
        });
        let shared = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let inner = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(answer(&inner, request).await) }
                    });
                    // As many headers as a gateway may pass on (hyper's
                    // default is 100).
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder.http1().max_headers(128);
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            inner,
            address,
            task,
        }
    }

    /// `ip:port`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// What the last request looked like.
    pub fn last(&self) -> Option<serde_json::Value> {
        self.inner.last.lock().clone()
    }

    /// Makes `/healthz` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.inner.healthy.store(healthy, Ordering::SeqCst);
    }
}

async fn answer(inner: &Inner, mut request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    if path == "/healthz" {
        let status = if inner.healthy.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"health\n")))
            .unwrap_or_default();
    }
    inner.requests.fetch_add(1, Ordering::SeqCst);
    if request
        .headers()
        .get("upgrade")
        .is_some_and(|v| v == "echo")
    {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut reader, mut writer) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    let mut headers = serde_json::Map::new();
    for name in REPORTED {
        let values: Vec<&str> = request
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            headers.insert(name.into(), values.join(", ").into());
        }
    }
    let header_count = request.headers().len();
    let method = request.method().to_string();
    let query = request.uri().query().unwrap_or("").to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let report = serde_json::json!({
        "backend": inner.name,
        "cell": inner.cell,
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "headerCount": header_count,
        "bodyBytes": body.len(),
    });
    *inner.last.lock() = Some(report.clone());
    let mut status = StatusCode::OK;
    if let Some(rest) = path.strip_prefix("/slow/") {
        let ms: u64 = rest
            .split('/')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|t| t.parse::<u16>().ok())
    {
        status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    }
    let mut text = serde_json::to_vec(&report).unwrap_or_default();
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_default()
}
