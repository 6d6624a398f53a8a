//! One HTTP client for every call to the control plane: plain HTTP for
//! `http://` URLs, TLS (with this process's certificate, when it has one)
//! for `https://` URLs; HTTP/2 where the server offers it by ALPN.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::tls::ClientTls;

/// A request: method, URL, headers and a whole body.
pub type HttpRequest = http::Request<Full<Bytes>>;

/// An answer with its whole body.
pub type HttpResponse = http::Response<Bytes>;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No connection could be made: nothing was sent, so the request may
    /// go to another replica.
    #[error("{0}")]
    Connect(String),
    /// No answer within the time given. The request may have been acted
    /// on.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was sent, or the answer
    /// could not be read. The request may have been acted on.
    #[error("{0}")]
    Failed(String),
    /// The request itself is wrong (a bad URL, an `https://` URL without
    /// TLS material).
    #[error("{0}")]
    Invalid(String),
}

/// A shared, pooled HTTP client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpClient {
    plain: Client<HttpConnector, Full<Bytes>>,
    tls: Option<Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>>,
}

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false);
    http
}

impl HttpClient {
    /// A client; `tls` serves `https://` URLs (without it, they are
    /// refused with a clear error).
    pub fn new(tls: Option<&ClientTls>, connect_timeout: Duration) -> Self {
        let plain = Client::builder(TokioExecutor::new()).build(connector(connect_timeout));
        let tls = tls.map(|tls| {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.config())
                .https_only()
                .enable_all_versions()
                .wrap_connector(connector(connect_timeout));
            Client::builder(TokioExecutor::new()).build(https)
        });
        Self { plain, tls }
    }

    /// Sends `request` and returns the answer as soon as its head arrives;
    /// the body is read by the caller as it comes (a watch).
    pub async fn open(
        &self,
        request: HttpRequest,
    ) -> Result<http::Response<hyper::body::Incoming>, HttpError> {
        let https = request.uri().scheme_str() == Some("https");
        let answer = if https {
            let Some(tls) = &self.tls else {
                return Err(no_ca(request.uri()));
            };
            tls.request(request).await
        } else {
            self.plain.request(request).await
        };
        answer.map_err(|e| {
            let cause = cause(&e);
            if e.is_connect() {
                HttpError::Connect(cause)
            } else {
                HttpError::Failed(cause)
            }
        })
    }

    /// Sends `request` and reads the whole answer, all within `timeout`.
    pub async fn send(
        &self,
        request: HttpRequest,
        timeout: Option<Duration>,
    ) -> Result<HttpResponse, HttpError> {
        let work = async {
            let answer = self.open(request).await?;
            let (parts, body) = answer.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| HttpError::Failed(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body))
        };
        match timeout {
            Some(limit) => tokio::time::timeout(limit, work)
                .await
                .map_err(|_| HttpError::Timeout(limit))?,
            None => work.await,
        }
    }
}

fn no_ca(uri: &http::Uri) -> HttpError {
    HttpError::Invalid(no_ca_bundle(&uri.to_string()))
}

/// Why an `https://` URL cannot be used without TLS material.
pub(crate) fn no_ca_bundle(url: &str) -> String {
    format!(
        "{url} is an https:// URL, but no CA bundle was given to verify it (--ca, or the sandbox's state directory)"
    )
}

/// The innermost cause of an error: "connection refused" rather than
/// "client error (Connect)".
pub(crate) fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    cause
}
