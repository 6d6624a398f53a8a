//! The typed client of the control plane's REST API (`docs/api.md`).
//!
//! It sends to one replica of the list and moves on to the next when a
//! replica cannot be reached (nothing was sent, so nothing can happen
//! twice); any replica answers, since followers pass changes on to the
//! leader. Errors keep the API's error body, so callers can tell an invalid
//! manifest from a conflict from a control plane without a leader.

use std::time::Duration;

use atoll_api::rest::{ApprovalPending, ErrorBody};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::http::{HttpClient, HttpError};

/// How long a call answered `notLeader` is asked again: three election
/// TTLs of the default 2 s, as a follower waits out an election.
pub const NOT_LEADER_WAIT: Duration = Duration::from_secs(6);
use crate::urls::ControlUrls;

/// The header that names the person or program making a change, until API
/// tokens replace it.
pub const USER_HEADER: &str = "x-atoll-user";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// No replica of the list could be reached.
    #[error("cannot reach the control plane at {urls}: {cause}")]
    Unreachable {
        /// The replicas tried, comma-separated.
        urls: String,
        /// The last replica's reason.
        cause: String,
    },
    /// The replica asked did not answer in time (the request may have been
    /// acted on).
    #[error("the control plane at {url} did not answer within {after:?}")]
    Timeout {
        /// The replica asked.
        url: String,
        /// How long it was given.
        after: Duration,
    },
    /// The connection broke after the request was sent (it may have been
    /// acted on).
    #[error("the control plane at {url} did not finish answering: {cause}")]
    Broken {
        /// The replica asked.
        url: String,
        /// Why.
        cause: String,
    },
    /// The API refused, with its error body.
    #[error("{}", .body.message)]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The API's error body (`error` says what kind).
        body: ErrorBody,
    },
    /// An answer that is not the API's (a proxy, another server).
    #[error("the control plane at {url} answered {status}: {text}")]
    Unexpected {
        /// The replica asked.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the body.
        text: String,
    },
    /// The call needs a second person's approval (202): it did not act;
    /// it is stored as an approval request.
    #[error("{}", .0.message)]
    AwaitingApproval(Box<ApprovalPending>),
    /// A successful answer whose body is not what was expected.
    #[error(
        "unexpected answer from the control plane ({0}); are the client and the server the same version?"
    )]
    Decode(String),
    /// The request could not be made (bad URL, no TLS material for an
    /// `https://` URL, a body that does not serialize).
    #[error("{0}")]
    Invalid(String),
}

/// An answer, whatever its status.
#[derive(Debug)]
pub struct RestResponse {
    /// The replica that answered (the one asked; `x-atoll-served-by` says
    /// whether a leader answered for it).
    pub url: String,
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl RestResponse {
    /// The body as `T` when the status is a success, else the API's error.
    pub fn json<T: DeserializeOwned>(self) -> Result<T, RestError> {
        if !self.status.is_success() {
            return Err(self.error());
        }
        if self.status == StatusCode::ACCEPTED
            && let Ok(pending) = serde_json::from_slice::<ApprovalPending>(&self.body)
        {
            return Err(RestError::AwaitingApproval(Box::new(pending)));
        }
        serde_json::from_slice(&self.body).map_err(|e| RestError::Decode(e.to_string()))
    }

    /// The error this answer stands for (an API error body, or the text of
    /// whatever else answered).
    pub fn error(self) -> RestError {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(body) => RestError::Api {
                status: self.status,
                body,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(&self.body);
                let mut text = text.trim().to_owned();
                if text.len() > 512 {
                    let mut end = 512;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                    text.push('…');
                }
                RestError::Unexpected {
                    url: self.url,
                    status: self.status,
                    text,
                }
            }
        }
    }
}

/// A body that streams, read a chunk at a time.
#[derive(Debug)]
pub struct RestStream {
    url: String,
    body: hyper::body::Incoming,
}

impl RestStream {
    /// The next chunk; `None` when the server ended the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, RestError> {
        use http_body_util::BodyExt as _;
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
                Some(Err(e)) => {
                    return Err(RestError::Broken {
                        url: self.url.clone(),
                        cause: e.to_string(),
                    });
                }
            }
        }
    }
}

/// A REST client of one control plane (any of its replicas). Cheap to
/// clone; clones share connections and the replica in use.
#[derive(Clone, Debug)]
pub struct RestClient {
    http: HttpClient,
    urls: ControlUrls,
    headers: HeaderMap,
    timeout: Option<Duration>,
}

impl RestClient {
    /// A client of the replicas `urls` over `http`, each request given at
    /// most `timeout` (none: as long as it takes, e.g. a barrier).
    pub fn new(http: HttpClient, urls: ControlUrls, timeout: Option<Duration>) -> Self {
        Self {
            http,
            urls,
            headers: HeaderMap::new(),
            timeout,
        }
    }

    /// Sends `name: value` with every request (e.g. the user making
    /// changes).
    pub fn with_header(mut self, name: &'static str, value: &str) -> Result<Self, RestError> {
        let value = HeaderValue::from_str(value)
            .map_err(|_| RestError::Invalid(format!("`{value}` cannot be sent as {name}")))?;
        self.headers.insert(HeaderName::from_static(name), value);
        Ok(self)
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: &str) -> Result<Self, RestError> {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| RestError::Invalid("the API token holds characters a header cannot carry; copy it again from `atoll token create`".into()))?;
        self.headers.insert(header::AUTHORIZATION, value);
        Ok(self)
    }

    /// The same client with another time limit per request.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The replicas.
    pub fn urls(&self) -> &ControlUrls {
        &self.urls
    }

    /// Opens `GET path` and returns as soon as the answer's head arrives,
    /// for a body that streams (`/v1/watch`); an error status is returned
    /// as the error it stands for.
    pub async fn stream(&self, path: &str) -> Result<RestStream, RestError> {
        let (url, answer) = self
            .to_any(&Method::GET, path, None, |request| self.http.open(request))
            .await?;
        let (parts, body) = answer.into_parts();
        let mut stream = RestStream { url, body };
        if !parts.status.is_success() {
            let mut bytes = Vec::new();
            while let Ok(Some(chunk)) = stream.chunk().await {
                bytes.extend_from_slice(&chunk);
            }
            return Err(RestResponse {
                url: stream.url,
                status: parts.status,
                headers: parts.headers,
                body: bytes.into(),
            }
            .error());
        }
        Ok(stream)
    }

    /// Makes the request for the replica in use and hands it to `call`,
    /// moving on to the next replica while one cannot be reached (nothing
    /// was sent); returns the replica that answered and its answer.
    async fn to_any<R, F, Fut>(
        &self,
        method: &Method,
        path: &str,
        json: Option<&Bytes>,
        call: F,
    ) -> Result<(String, R), RestError>
    where
        F: Fn(crate::http::HttpRequest) -> Fut,
        Fut: std::future::Future<Output = Result<R, HttpError>>,
    {
        let mut last = None;
        for _ in 0..self.urls.all().len() {
            let base = self.urls.current().to_owned();
            let request = self.request(&base, method, path, json)?;
            match call(request).await {
                Ok(answer) => return Ok((base, answer)),
                Err(HttpError::Connect(cause)) => {
                    self.urls.failed(&base);
                    last = Some(cause);
                }
                Err(HttpError::Timeout(after)) => {
                    return Err(RestError::Timeout { url: base, after });
                }
                Err(HttpError::Failed(cause)) => {
                    return Err(RestError::Broken { url: base, cause });
                }
                Err(HttpError::Invalid(text)) => return Err(RestError::Invalid(text)),
            }
        }
        Err(RestError::Unreachable {
            urls: self.urls.joined(),
            cause: last.unwrap_or_else(|| "no replica given".into()),
        })
    }

    fn request(
        &self,
        base: &str,
        method: &Method,
        path: &str,
        json: Option<&Bytes>,
    ) -> Result<crate::http::HttpRequest, RestError> {
        let url = format!("{base}{path}");
        let mut request = http::Request::builder().method(method.clone()).uri(&url);
        if let Some(headers) = request.headers_mut() {
            headers.extend(self.headers.clone());
            headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            if json.is_some() {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        request
            .body(Full::new(json.cloned().unwrap_or_default()))
            .map_err(|e| RestError::Invalid(format!("cannot make a request to {url}: {e}")))
    }

    /// Sends `method path` (path and query, e.g. `/v1/resources?kind=Cell`)
    /// with an optional JSON body, to the replica in use, moving on to the
    /// next replica while one cannot be reached. Any status is returned.
    ///
    /// A `503 notLeader` (the replica that took the call stopped leading
    /// as it did; nothing was changed) is asked again every 200 ms for up to
    /// [`NOT_LEADER_WAIT`], while an election ends.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        json: Option<Bytes>,
    ) -> Result<RestResponse, RestError> {
        let deadline = std::time::Instant::now() + NOT_LEADER_WAIT;
        loop {
            let (url, answer) = self
                .to_any(&method, path, json.as_ref(), |request| {
                    self.http.send(request, self.timeout)
                })
                .await?;
            let (parts, body) = answer.into_parts();
            let response = RestResponse {
                url,
                status: parts.status,
                headers: parts.headers,
                body,
            };
            if response.status == StatusCode::SERVICE_UNAVAILABLE
                && std::time::Instant::now() < deadline
                && serde_json::from_slice::<ErrorBody>(&response.body)
                    .is_ok_and(|e| e.error == atoll_api::rest::ErrorCode::NotLeader)
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            return Ok(response);
        }
    }

    /// The fingerprint of the intermediate the control plane issues
    /// certificates with now (`GET /v1/ca`); None when it cannot say (it
    /// issues none, or cannot be reached: the next look will tell).
    pub async fn issuing_intermediate(&self) -> Option<String> {
        match self.get::<atoll_api::rest::CaInfo>("/v1/ca").await {
            Ok(info) => Some(info.intermediate_fingerprint).filter(|f| !f.is_empty()),
            Err(error) => {
                tracing::debug!(%error, "cannot ask the control plane for its intermediate");
                None
            }
        }
    }

    /// `GET path`, the answer as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, RestError> {
        self.send(Method::GET, path, None).await?.json()
    }

    /// `POST path` with `body` as JSON, the answer as `T`.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, RestError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| RestError::Invalid(format!("cannot encode the request: {e}")))?;
        self.send(Method::POST, path, Some(body.into()))
            .await?
            .json()
    }

    /// `DELETE path`, the answer as `T`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, RestError> {
        self.send(Method::DELETE, path, None).await?.json()
    }
}
