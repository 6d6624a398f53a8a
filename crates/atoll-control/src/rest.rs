//! The REST API (axum). Every error is a JSON [`ErrorBody`] with a status;
//! `docs/api.md` documents the endpoints and `/openapi.json` describes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_access::Action;
use atoll_api::rest::{
    ApplyRequest, ApplyResponse, AuditResponse, BarrierRequest, BarrierResponse, ErrorBody,
    ErrorCode, HistoryResponse, LeaderResponse, ListResponse, NodesResponse, RegistryResponse,
    RollbackRequest, StatusResponse, SwitchoverPlan, SwitchoverRequest,
};
use atoll_model::{ApprovalRule, Kind, ResourceKey};
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;

use crate::access::{Caller, FORWARDED_CALLER};
use crate::control::Control;
use crate::metrics::{HttpLabels, ResultLabels, RouteLabels};
use crate::nodes::Forget;
use crate::writer::{Author, ChangeSet, ControlError, commit_record, history_item};

/// The largest request body accepted (a large topology is far below this).
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;

/// The longest barrier a request may ask for.
const MAX_BARRIER: Duration = Duration::from_secs(600);

/// An API error: a status and a JSON body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, error: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                status: status.as_u16(),
                error,
                message: message.into(),
                issues: Vec::new(),
            },
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }
}

impl ApiError {
    /// The sentence for the caller.
    pub(crate) fn message(&self) -> &str {
        &self.body.message
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The kind of error.
    pub(crate) fn code(&self) -> ErrorCode {
        self.body.error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::Invalid { message, issues } => {
                let mut api = Self::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorCode::Invalid,
                    message,
                );
                api.body.issues = issues;
                api
            }
            ControlError::Conflict(m) => Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, m),
            ControlError::NotFound(m) => Self::not_found(m),
            ControlError::BadRequest(m) => Self::bad_request(m),
            ControlError::Forbidden(m) => Self::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, m),
            ControlError::Unavailable(m) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m)
            }
            ControlError::NotLeader(m) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NotLeader, m)
            }
        }
    }
}

impl From<atoll_store::StoreError> for ApiError {
    fn from(error: atoll_store::StoreError) -> Self {
        ControlError::from(error).into()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // 422 is kept for invalid manifests (with `issues`); a body of the
        // wrong shape is a bad request.
        let (status, code) = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::BadRequest)
            }
            _ => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        };
        let message = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                "send the body as JSON with `Content-Type: application/json`".to_owned()
            }
            other => format!("the request body is not valid: {}", other.body_text()),
        };
        Self::new(status, code, message)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(format!("bad query parameters: {}", rejection.body_text()))
    }
}

pub(crate) type Shared = Arc<Control>;
pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

fn parse_kind(text: &str) -> Result<Kind, ApiError> {
    Kind::parse(text).ok_or_else(|| {
        ApiError::not_found(format!(
            "unknown kind `{text}`; expected one of {}",
            Kind::expected()
        ))
    })
}

fn author(caller: &Caller, message: Option<String>) -> Author {
    Author::user(caller.name(), message)
}

/// Builds the REST router.
pub(crate) fn router(control: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/status", get(status))
        .route("/v1/leader", get(leader))
        .route("/v1/apply", post(apply))
        .route("/v1/resources", get(list_all))
        .route("/v1/resources/{kind}", get(list))
        .route(
            "/v1/resources/{kind}/{name}",
            get(get_one).delete(delete_one),
        )
        .route("/v1/resources/{kind}/{name}/history", get(history))
        .route("/v1/resources/{kind}/{name}/rollback", post(rollback))
        .route("/v1/audit", get(audit))
        .route("/v1/watch", get(watch))
        .route("/v1/nodes", get(nodes))
        .route("/v1/registry", get(registry))
        .route("/v1/nodes/{name}", delete(forget_node))
        .route("/v1/barrier", post(barrier))
        .route("/v1/switchovers", post(start_switchover))
        .route("/v1/switchovers/{name}/abort", post(abort_switchover))
        .route("/v1/switchovers/{name}/approve", post(approve_switchover))
        .route("/v1/audit/chain", get(crate::audit::chain))
        .merge(crate::tokens::routes())
        .merge(crate::approvals::routes())
        .merge(crate::join::routes())
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            forward_to_leader,
        ))
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            crate::audit::record_calls,
        ))
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            crate::access::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            observe,
        ))
        .with_state(control)
}

/// Counts and times every request by its route template.
async fn observe(State(control): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    control
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route: route.clone(),
            status,
        })
        .inc();
    control
        .metrics
        .http_duration
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A request a follower passed on to the leader carries this header; the
/// answer names the replica that served it.
const FORWARDED: &str = "x-atoll-forwarded";
pub(crate) const SERVED_BY: &str = "x-atoll-served-by";

/// Whether a request must be answered by the leader: every change. Reads,
/// and barriers (every replica sees the whole fleet), are answered here.
fn for_the_leader(method: &axum::http::Method, path: &str) -> bool {
    let reads = matches!(
        *method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    !reads && path != "/v1/barrier"
}

/// On a replica that does not lead, passes what the leader must answer on
/// to the leader's advertised URL, headers and body as they came, and
/// returns the leader's answer as it is.
///
/// An election is waited out, up to three election TTLs: while no
/// leader is known, while the leader cannot be reached, and while the
/// replica named leader answers `notLeader` (it lost its term, or has not
/// started leading yet), the request is tried again every 200 ms. Each of
/// those is an answer that nothing was changed, so a retry cannot apply a
/// change twice. Past the wait, the reason is returned (503).
async fn forward_to_leader(
    State(control): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    if !for_the_leader(request.method(), &path)
        || request.headers().contains_key(FORWARDED)
        || control.leadership.acting()
    {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(e) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                format!("reading the request to pass it on to the leader: {e}"),
            )
            .into_response();
        }
    };
    let deadline = Instant::now() + control.leadership.election_wait();
    let mut last = None;
    loop {
        if control.leadership.acting() {
            return next.run(Request::from_parts(parts, Body::from(body))).await;
        }
        let leader = match control.leadership.read_leader().await {
            Ok(view) => view.url,
            Err(error) => {
                // The store cannot say who leads: its reason is the answer
                // if the wait ends here.
                last = Some(ApiError::from(error).into_response());
                None
            }
        }
        .filter(|url| url != control.leadership.advertise());
        let answer = match &leader {
            Some(leader) => Some(forward(&control.http, leader, &parts, body.clone()).await),
            None => None,
        };
        let done = match &answer {
            Some(Forwarded::Answer(response)) => !response.not_leader(),
            Some(Forwarded::Unreachable(_)) | None => false,
            Some(Forwarded::Failed(_)) => true,
        };
        if done || Instant::now() >= deadline {
            return match (answer, last) {
                (Some(Forwarded::Answer(response)), _) => response.into_response(leader.as_deref()),
                (Some(Forwarded::Unreachable(m) | Forwarded::Failed(m)), _) => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m)
                        .into_response()
                }
                // No leader now: the reason, from this replica (or the
                // last leader's refusal).
                (None, Some(response)) => response,
                (None, None) => next.run(Request::from_parts(parts, Body::from(body))).await,
            };
        }
        last = match answer {
            Some(Forwarded::Answer(response)) => Some(response.into_response(leader.as_deref())),
            Some(Forwarded::Unreachable(m)) => Some(
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m)
                    .into_response(),
            ),
            _ => last,
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What came of passing a request on.
enum Forwarded {
    /// The leader answered.
    Answer(LeaderAnswer),
    /// The leader could not be reached: nothing was sent.
    Unreachable(String),
    /// The request was sent but its answer was lost: not to be retried.
    Failed(String),
}

struct LeaderAnswer {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl LeaderAnswer {
    /// Whether the replica asked refused because it does not lead (nothing
    /// was changed).
    fn not_leader(&self) -> bool {
        self.status == StatusCode::SERVICE_UNAVAILABLE
            && serde_json::from_slice::<ErrorBody>(&self.body)
                .is_ok_and(|body| body.error == ErrorCode::NotLeader)
    }

    fn into_response(self, leader: Option<&str>) -> Response {
        let mut response = Response::builder().status(self.status);
        for (name, value) in &self.headers {
            if !matches!(
                name.as_str(),
                "connection" | "content-length" | "transfer-encoding" | "keep-alive"
            ) {
                response = response.header(name, value);
            }
        }
        if let Some(leader) = leader {
            response = response.header(SERVED_BY, leader);
        }
        response.body(Body::from(self.body)).unwrap_or_else(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Internal,
                format!("passing the leader's answer on: {e}"),
            )
            .into_response()
        })
    }
}

async fn forward(
    http: &atoll_transport::HttpClient,
    leader: &str,
    parts: &axum::http::request::Parts,
    body: bytes::Bytes,
) -> Forwarded {
    let target = format!(
        "{}{}",
        leader.trim_end_matches('/'),
        parts
            .uri
            .path_and_query()
            .map_or("/", axum::http::uri::PathAndQuery::as_str)
    );
    let mut outgoing = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(&target);
    // Over TLS the leader takes the caller this replica verified, from a
    // replica's certificate; over plain HTTP it checks the credential again.
    let tls = leader.starts_with("https://");
    let caller = parts
        .extensions
        .get::<Caller>()
        .and_then(Caller::to_header)
        .filter(|_| tls);
    for (name, value) in &parts.headers {
        let passed_on =
            name == FORWARDED_CALLER || (caller.is_some() && name == header::AUTHORIZATION);
        if !passed_on
            && !matches!(
                name.as_str(),
                "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive"
            )
        {
            outgoing = outgoing.header(name, value);
        }
    }
    if let Some(caller) = caller {
        outgoing = outgoing.header(FORWARDED_CALLER, caller);
    }
    let outgoing = match outgoing
        .header(FORWARDED, "1")
        .body(http_body_util::Full::new(body))
    {
        Ok(outgoing) => outgoing,
        Err(e) => return Forwarded::Failed(format!("cannot pass the request on to {target}: {e}")),
    };
    // The longest request: a barrier of 10 minutes.
    match http
        .send(outgoing, Some(Duration::from_secs(11 * 60)))
        .await
    {
        Ok(answer) => {
            let (parts, body) = answer.into_parts();
            Forwarded::Answer(LeaderAnswer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        }
        Err(atoll_transport::HttpError::Connect(cause)) => Forwarded::Unreachable(format!(
            "this replica does not lead, and the leader {leader} did not answer: {cause}"
        )),
        Err(error) => Forwarded::Failed(format!(
            "this replica does not lead, and the leader {leader} did not finish answering: {error}"
        )),
    }
}

/// Reading one resource (or its history): its workspace's, or the fleet's.
fn authorize_read(control: &Control, caller: &Caller, key: &ResourceKey) -> Result<(), ApiError> {
    let workspace = (!key.kind.is_fleet()).then_some(match key.workspace.as_str() {
        "" => atoll_model::DEFAULT_WORKSPACE,
        name => name,
    });
    control.authorize(caller, Action::Read(workspace))
}

async fn fallback(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no endpoint {} {}; see /openapi.json or docs/api.md",
        request.method(),
        request.uri().path()
    ))
}

/// The control-plane replicas and which one leads.
#[utoipa::path(get, path = "/v1/leader", responses(
    (status = 200, body = LeaderResponse, description = "The replicas, the leader and its term"),
    (status = 503, body = ErrorBody, description = "The store does not answer")))]
async fn leader(State(control): State<Shared>) -> ApiResult<LeaderResponse> {
    Ok(Json(control.replicas().await?))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is alive")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "The store answers"),
    (status = 503, body = ErrorBody, description = "The store does not answer")))]
async fn readyz(State(control): State<Shared>) -> Result<&'static str, ApiError> {
    control.store.revision().await?;
    Ok("ready\n")
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Metrics", content_type = "text/plain")))]
async fn metrics(State(control): State<Shared>) -> Response {
    let (connected, disconnected) = control.nodes.counts();
    for (state, count) in [("connected", connected), ("disconnected", disconnected)] {
        control
            .metrics
            .nodes
            .get_or_create(&crate::metrics::StateLabels {
                state: state.into(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    control
        .metrics
        .revision
        .set(i64::try_from(control.cache.current().revision).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        control.metrics.encode(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

/// Version, store and revision.
#[utoipa::path(get, path = "/v1/status", responses((status = 200, body = StatusResponse)))]
async fn status(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<StatusResponse> {
    control.authorize(&caller, Action::Read(None))?;
    Ok(Json(StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        store: control.store.backend().to_owned(),
        revision: control.store.revision().await?,
        connected_nodes: control.nodes.connected_count(),
        uptime_seconds: control.started.elapsed().as_secs(),
    }))
}

/// Creates or replaces the resources of the manifests and deletes the listed
/// ones, all in one revision or not at all.
#[utoipa::path(post, path = "/v1/apply", request_body = ApplyRequest, responses(
    (status = 200, body = ApplyResponse, description = "Applied (or, for a dry run, what would change)"),
    (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "A resource to delete does not exist"),
    (status = 409, body = ErrorBody, description = "A resource changed since it was read"),
    (status = 422, body = ErrorBody, description = "Invalid manifests or resulting state; `issues` lists every problem")),
    params(("x-atoll-user" = Option<String>, Header, description = "Only on a control plane started `--insecure`: who makes the change, for the audit log (marked unverified)")))]
async fn apply(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<ApplyRequest>, JsonRejection>,
) -> ApiResult<ApplyResponse> {
    // A caller with no role anywhere is refused before its manifests are
    // parsed; each resource is checked once they are.
    if !caller.principal.is_fleet_admin() {
        control.authorize(&caller, Action::Observe)?;
    }
    let Json(request) = body?;
    // Parsing is CPU work proportional to the input: off the async workers,
    // and a few at a time, so that many large requests at once cannot add
    // up to more memory than a few.
    let manifests = request.manifests;
    let permit = control
        .writer
        .parsing
        .acquire()
        .await
        .map_err(|e| ControlError::Unavailable(format!("parsing: {e}")))?;
    let mut set = tokio::task::spawn_blocking(move || crate::writer::Writer::parse(&manifests))
        .await
        .map_err(|e| ControlError::Unavailable(format!("parsing task failed: {e}")))??;
    drop(permit);
    set.in_workspace(request.workspace.as_deref());
    for item in &request.delete {
        let kind = parse_kind(&item.kind)?;
        let workspace = item
            .workspace
            .as_deref()
            .or(request.workspace.as_deref())
            .unwrap_or_default();
        set.deletes.push((
            ResourceKey::in_workspace(kind, workspace, item.name.clone()),
            item.resource_version,
        ));
    }
    for key in set
        .puts
        .iter()
        .map(|l| l.resource.key())
        .chain(set.pending.iter().cloned())
        .chain(set.deletes.iter().map(|(key, _)| key.clone()))
    {
        control.authorize(&caller, Action::Write(&key))?;
    }
    let author = author(&caller, request.message);
    let response = control.writer.apply(set, request.dry_run, &author).await?;
    Ok(Json(response))
}

/// `?workspace=`: which workspace a resource path is about.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkspaceQuery {
    /// The workspace (default: `default`); in a list, `*` for every
    /// workspace. The fleet's kinds (Workspace, Region, Zone) are listed
    /// with every workspace.
    workspace: Option<String>,
}

impl WorkspaceQuery {
    fn name(&self) -> &str {
        self.workspace.as_deref().unwrap_or_default()
    }

    /// Whether a list shows `resource`.
    fn shows(&self, resource: &atoll_model::Resource) -> bool {
        match self.workspace.as_deref() {
            Some("*") => true,
            Some(name) if !name.is_empty() => {
                resource.kind().is_fleet() || resource.workspace() == name
            }
            _ => {
                resource.kind().is_fleet() || resource.workspace() == atoll_model::DEFAULT_WORKSPACE
            }
        }
    }
}

async fn list_items(
    control: &Control,
    caller: &Caller,
    kind: Option<Kind>,
    workspace: &WorkspaceQuery,
) -> ApiResult<ListResponse> {
    // One workspace: refused if the caller may not read it; every
    // workspace (`*`): those it may read.
    match workspace.workspace.as_deref() {
        Some("*") => control.authorize(caller, Action::Read(None))?,
        _ if kind.is_some_and(Kind::is_fleet) => control.authorize(caller, Action::Read(None))?,
        _ => control.authorize(
            caller,
            Action::Read(Some(match workspace.name() {
                "" => atoll_model::DEFAULT_WORKSPACE,
                name => name,
            })),
        )?,
    }
    let mut readable = std::collections::HashMap::new();
    let mut may_read = |resource: &atoll_model::Resource| {
        let scope = (!resource.kind().is_fleet()).then(|| resource.workspace().to_owned());
        *readable
            .entry(scope.clone())
            .or_insert_with(|| control.may_read(caller, scope.as_deref()))
    };
    let snapshot = control.store.snapshot().await?;
    let status = kind
        .is_none_or(|k| k == Kind::Cell)
        .then(|| crate::health::cell_status(&snapshot.resources, &control.nodes.list()));
    let items = snapshot
        .resources
        .iter()
        .filter(|r| kind.is_none_or(|k| r.kind() == k) && workspace.shows(r))
        .filter(|r| may_read(r))
        .filter_map(|r| {
            let mut value = serde_json::to_value(r).ok()?;
            with_status(&mut value, r, status.as_ref());
            Some(value)
        })
        .collect();
    Ok(Json(ListResponse {
        revision: snapshot.revision,
        items,
    }))
}

/// Adds `status` (observed, not stored) to a resource that has one: cells.
fn with_status(
    value: &mut serde_json::Value,
    resource: &atoll_model::Resource,
    status: Option<&std::collections::BTreeMap<String, crate::health::CellStatus>>,
) {
    if let (Some(status), serde_json::Value::Object(map)) = (status, value)
        && let Some(cell) = status.get(resource.name())
        && let Ok(cell) = serde_json::to_value(cell)
    {
        map.insert("status".to_owned(), cell);
    }
}

/// Every resource of every kind, of the fleet and one workspace.
#[utoipa::path(get, path = "/v1/resources", params(WorkspaceQuery), responses((status = 200, body = ListResponse)))]
async fn list_all(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<WorkspaceQuery>, QueryRejection>,
) -> ApiResult<ListResponse> {
    let Query(query) = query?;
    list_items(&control, &caller, None, &query).await
}

/// Every resource of one kind (`cells`, `cell`, `Cell`...).
#[utoipa::path(get, path = "/v1/resources/{kind}", params(("kind" = String, Path, description = "Kind, any case, singular or plural"), WorkspaceQuery),
    responses((status = 200, body = ListResponse), (status = 404, body = ErrorBody, description = "Unknown kind")))]
async fn list(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(kind): Path<String>,
    query: Result<Query<WorkspaceQuery>, QueryRejection>,
) -> ApiResult<ListResponse> {
    let Query(query) = query?;
    let kind = parse_kind(&kind)?;
    list_items(&control, &caller, Some(kind), &query).await
}

/// One resource, with `metadata.resourceVersion`.
#[utoipa::path(get, path = "/v1/resources/{kind}/{name}", params(("kind" = String, Path), ("name" = String, Path), WorkspaceQuery),
    responses((status = 200, description = "The resource", body = Object), (status = 404, body = ErrorBody)))]
async fn get_one(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    query: Result<Query<WorkspaceQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query?;
    let key = ResourceKey::in_workspace(parse_kind(&kind)?, query.name(), name);
    authorize_read(&control, &caller, &key)?;
    if key.kind == Kind::Cell {
        let snapshot = control.store.snapshot().await?;
        let status = crate::health::cell_status(&snapshot.resources, &control.nodes.list());
        return match snapshot.resources.iter().find(|r| r.key() == key) {
            Some(resource) => {
                let mut value = serde_json::to_value(resource).unwrap_or_default();
                with_status(&mut value, resource, Some(&status));
                Ok(Json(value))
            }
            None => Err(ApiError::not_found(format!("{key} does not exist"))),
        };
    }
    match control.store.get(&key).await? {
        Some(resource) => Ok(Json(serde_json::to_value(&resource).unwrap_or_default())),
        None => Err(ApiError::not_found(format!("{key} does not exist"))),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeleteQuery {
    /// The workspace (default: `default`).
    workspace: Option<String>,
    /// Only if the resource is at this revision.
    resource_version: Option<u64>,
    /// Validate and diff only.
    #[serde(default)]
    dry_run: bool,
    /// Why: kept in the audit log.
    message: Option<String>,
}

/// Deletes one resource, if the remaining resources stay valid.
#[utoipa::path(delete, path = "/v1/resources/{kind}/{name}", params(("kind" = String, Path), ("name" = String, Path), DeleteQuery),
    responses((status = 200, body = ApplyResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
    (status = 422, body = ErrorBody, description = "Other resources refer to it")))]
async fn delete_one(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult<ApplyResponse> {
    let Query(query) = query?;
    let key = ResourceKey::in_workspace(
        parse_kind(&kind)?,
        query.workspace.as_deref().unwrap_or_default(),
        name,
    );
    control.authorize(&caller, Action::Write(&key))?;
    let author = author(&caller, query.message);
    let set = ChangeSet {
        deletes: vec![(key, query.resource_version)],
        ..ChangeSet::default()
    };
    Ok(Json(
        control.writer.apply(set, query.dry_run, &author).await?,
    ))
}

/// Every change of a resource, oldest first, also after it was deleted.
#[utoipa::path(get, path = "/v1/resources/{kind}/{name}/history", params(("kind" = String, Path), ("name" = String, Path), WorkspaceQuery),
    responses((status = 200, body = HistoryResponse), (status = 404, body = ErrorBody)))]
async fn history(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    query: Result<Query<WorkspaceQuery>, QueryRejection>,
) -> ApiResult<HistoryResponse> {
    let Query(query) = query?;
    let key = ResourceKey::in_workspace(parse_kind(&kind)?, query.name(), name);
    authorize_read(&control, &caller, &key)?;
    let entries = control.store.history(&key).await?;
    if entries.is_empty() {
        return Err(ApiError::not_found(format!("{key} has never existed")));
    }
    Ok(Json(HistoryResponse {
        resource: key.to_string(),
        entries: entries.iter().map(history_item).collect(),
    }))
}

/// Restores a resource's content from a past revision, as a new revision.
#[utoipa::path(post, path = "/v1/resources/{kind}/{name}/rollback", params(("kind" = String, Path), ("name" = String, Path), WorkspaceQuery),
    request_body = RollbackRequest,
    responses((status = 200, body = ApplyResponse), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn rollback(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((kind, name)): Path<(String, String)>,
    query: Result<Query<WorkspaceQuery>, QueryRejection>,
    body: Result<Json<RollbackRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let Json(request) = body?;
    let key = ResourceKey::in_workspace(parse_kind(&kind)?, query.name(), name);
    control.authorize(&caller, Action::Rollback(&key))?;
    let author = author(&caller, request.message.clone());
    let guarded = key.kind == Kind::ShardMap
        && !request.dry_run
        && control.needs_approval(&key.workspace, ApprovalRule::ShardMapRollback);
    if !guarded {
        return Ok(Json(
            control
                .writer
                .rollback(&key, request.revision, request.dry_run, &author)
                .await?,
        )
        .into_response());
    }
    // Checked as if it would act (the revision exists, the content is
    // valid today), then asked for.
    let dry = control
        .writer
        .rollback(&key, request.revision, true, &author)
        .await?;
    let changed = dry
        .changes
        .iter()
        .any(|c| c.action != atoll_api::rest::ChangeAction::Unchanged);
    if !changed {
        return Ok(Json(dry).into_response());
    }
    control
        .ask_approval(
            &caller,
            crate::approvals::Ask {
                workspace: key.workspace.clone(),
                rule: ApprovalRule::ShardMapRollback,
                summary: format!(
                    "rolling {key} back to the content of revision {}",
                    request.revision
                ),
                reason: request.message.clone(),
                hold: false,
                operation: crate::approvals::Operation::Rollback {
                    key: key.clone(),
                    revision: request.revision,
                    message: request.message,
                },
            },
            None,
        )
        .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuditQuery {
    /// Commits after this revision (default 0).
    #[serde(default)]
    after: u64,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
}

/// The audit log: who changed what, when, and the diffs.
#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), responses((status = 200, body = AuditResponse)))]
async fn audit(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<AuditResponse> {
    control.authorize(&caller, Action::ReadFleet)?;
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let commits = control.store.commits(query.after, limit).await?;
    Ok(Json(AuditResponse {
        commits: commits.iter().map(|c| commit_record(c, false)).collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WatchQuery {
    /// Stream commits after this revision (default: the current one, so only new commits).
    after: Option<u64>,
}

/// Streams commits as newline-delimited JSON, one `CommitRecord` per line,
/// with the new resources. The stream stays open.
#[utoipa::path(get, path = "/v1/watch", params(WatchQuery), responses((status = 200, description = "One CommitRecord per line", content_type = "application/x-ndjson")))]
async fn watch(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<WatchQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    control.authorize(&caller, Action::ReadFleet)?;
    let Query(query) = query?;
    let after = match query.after {
        Some(after) => after,
        None => control.store.revision().await?,
    };
    let commits = control.store.watch(after).await?;
    let mut shutdown = control.shutdown.clone();
    let stopped = async move {
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    };
    let lines = commits.take_until(stopped).map(|commit| {
        let commit = commit.map_err(std::io::Error::other)?;
        let mut line =
            serde_json::to_vec(&commit_record(&commit, true)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        Ok::<_, std::io::Error>(line)
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Data-plane nodes: identity, connection, applied version, last NACK.
#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = NodesResponse)))]
async fn nodes(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<NodesResponse> {
    control.authorize(&caller, Action::ReadFleet)?;
    Ok(Json(NodesResponse {
        version: control.cache.current().revision,
        nodes: control.nodes.list(),
    }))
}

/// `?service=&zone=&cell=&workspace=`: which registered instances to list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RegistryQuery {
    /// Only this Service's instances.
    service: Option<String>,
    /// Only instances in this zone.
    zone: Option<String>,
    /// Only instances serving this cell.
    cell: Option<String>,
    /// The workspace (default: `default`).
    workspace: Option<String>,
}

/// The service registry's instances, as this replica follows them.
#[utoipa::path(get, path = "/v1/registry", params(RegistryQuery), responses((status = 200, body = RegistryResponse),
    (status = 503, body = ErrorBody, description = "This replica cannot read the registry now")))]
async fn registry(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<RegistryQuery>, QueryRejection>,
) -> ApiResult<RegistryResponse> {
    let Query(query) = query?;
    let workspace = match query.workspace.as_deref() {
        None | Some("") => atoll_model::DEFAULT_WORKSPACE,
        Some(name) => name,
    };
    control.authorize(&caller, Action::Read(Some(workspace)))?;
    if !control.registry.is_ready() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this replica has not read the registry from its keyspace (starting, or the keyspace cannot be reached); try again or ask another replica",
        ));
    }
    let keep = |field: &Option<String>, value: &str| field.as_deref().is_none_or(|f| f == value);
    let instances = control
        .registry
        .instances(|service, instance| {
            service.workspace == workspace
                && keep(&query.service, &service.service)
                && keep(&query.zone, &instance.zone)
                && keep(&query.cell, &instance.cell)
        })
        .into_iter()
        .map(|(service, i)| atoll_api::rest::RegisteredInstance {
            workspace: service.workspace,
            service: service.service,
            address: if i.address.contains(':') {
                format!("[{}]:{}", i.address, i.port)
            } else {
                format!("{}:{}", i.address, i.port)
            },
            name: i.name,
            region: i.region,
            zone: i.zone,
            cell: i.cell,
            protocol: i.protocol,
            version: i.version,
            weight: i.weight,
            mode: i.mode,
            labels: i.labels.into_iter().collect(),
            registered_by: i.registered_by,
            session: format!("{:x}", i.session),
        })
        .collect();
    Ok(Json(atoll_api::rest::RegistryResponse {
        revision: control.registry.counts().revision,
        instances,
    }))
}

/// Forgets a disconnected node so that barriers stop waiting for it.
#[utoipa::path(delete, path = "/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "The node is connected")))]
async fn forget_node(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    control.authorize(&caller, Action::AdministerFleet)?;
    let (forgotten, published) = control.nodes.forget(&name);
    if !published.is_empty() {
        let writes = published
            .into_iter()
            .map(atoll_store::Write::delete)
            .collect();
        control.coordination.write_keys(writes, None).await?;
    }
    match forgotten {
        Forget::Forgotten => Ok(StatusCode::NO_CONTENT),
        Forget::Unknown => Err(ApiError::not_found(format!(
            "no node named `{name}` is registered; switchovers will not wait for it"
        ))),
        Forget::Connected => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            format!("node `{name}` is connected; only disconnected nodes can be forgotten"),
        )),
    }
}

fn switchovers(control: &Control) -> Result<Arc<crate::switchover::Switchovers>, ApiError> {
    Ok(control.leading()?.switchovers.clone())
}

/// Plans a switchover (`dryRun`) or starts it; read its progress at
/// `/v1/resources/switchovers/{name}`.
#[utoipa::path(post, path = "/v1/switchovers", request_body = SwitchoverRequest,
    responses((status = 200, body = SwitchoverPlan, description = "Planned (dry run) or started"),
        (status = 202, body = atoll_api::rest::ApprovalPending, description = "Needs a second person's approval: stored as an approval request"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A blocking check failed, or another switchover runs on the map")))]
async fn start_switchover(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<SwitchoverRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    // Switchovers act on the default workspace's shard maps.
    let workspace = atoll_model::DEFAULT_WORKSPACE;
    control.authorize(&caller, Action::Switchover(workspace))?;
    let Json(request) = body?;
    let author = author(&caller, request.reason.clone());
    let switchovers = switchovers(&control)?;
    let rule = if request.failover {
        ApprovalRule::Failover
    } else {
        ApprovalRule::Switchover
    };
    let guarded = control.needs_approval(workspace, rule);
    if let Some(id) = &request.approval {
        control
            .use_held(&caller, id, &request, !request.dry_run)
            .await?;
        let started = switchovers.start(request.clone(), &author).await;
        if started.is_err() && !request.dry_run {
            control.release_held(id).await;
        }
        return Ok(Json(started?).into_response());
    }
    if request.hold && !guarded {
        return Err(ApiError::bad_request(format!(
            "`hold` asks for a second person's approval to use later, and {}s need none in workspace {workspace}: start it without `hold`",
            rule.as_str()
        )));
    }
    if !guarded {
        return Ok(Json(switchovers.start(request, &author).await?).into_response());
    }
    // Checked as if it would start (the plan and its blocking checks),
    // then asked for.
    let dry = SwitchoverRequest {
        dry_run: true,
        ..request.clone()
    };
    let mut plan = switchovers.start(dry, &author).await?;
    let blocking: Vec<String> = plan
        .checks
        .iter()
        .filter(|c| c.result == "blocking")
        .map(|c| format!("{}: {}", c.check, c.detail))
        .collect();
    if !blocking.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            format!("the switchover cannot start: {}", blocking.join("; ")),
        ));
    }
    if request.dry_run {
        plan.needs_approval = Some(rule.as_str().to_owned());
        return Ok(Json(plan).into_response());
    }
    let moves: Vec<String> = plan
        .moves
        .iter()
        .map(|m| {
            format!(
                "shards {} {} → {}",
                m["shards"].as_str().unwrap_or("?"),
                m["from"].as_str().unwrap_or("?"),
                m["to"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let summary = format!(
        "{} of ShardMap {} ({})",
        if request.failover {
            "a failover"
        } else {
            "a switchover"
        },
        plan.shard_map,
        moves.join(", ")
    );
    control
        .ask_approval(
            &caller,
            crate::approvals::Ask {
                workspace: workspace.to_owned(),
                rule,
                summary,
                reason: request.reason.clone(),
                hold: request.hold,
                operation: crate::approvals::Operation::StartSwitchover { request },
            },
            None,
        )
        .await
}

/// Stops a switchover before its flip: the moving shards serve at their old
/// owners again.
#[utoipa::path(post, path = "/v1/switchovers/{name}/abort", params(("name" = String, Path)),
    responses((status = 200, description = "Abort requested: the Switchover", content_type = "application/json"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Finished, or past the flip")))]
async fn abort_switchover(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    control.authorize(&caller, Action::Switchover(atoll_model::DEFAULT_WORKSPACE))?;
    let author = author(&caller, None);
    let resource = switchovers(&control)?.abort(&name, &author).await?;
    Ok(Json(serde_json::to_value(&resource).unwrap_or_default()))
}

/// Lets a failover that waits for approval run.
#[utoipa::path(post, path = "/v1/switchovers/{name}/approve", params(("name" = String, Path)),
    responses((status = 200, description = "Approved: the Switchover (or, where failovers need two people, the approval request it approved)", content_type = "application/json"),
        (status = 202, body = atoll_api::rest::ApprovalPending, description = "Where failovers need two people: the first approval, stored as an approval request"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Not a failover waiting for approval")))]
async fn approve_switchover(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let workspace = atoll_model::DEFAULT_WORKSPACE;
    control.authorize(&caller, Action::Approve(workspace))?;
    let switchovers = switchovers(&control)?;
    if control.needs_approval(workspace, ApprovalRule::Failover) {
        // Two people: the first asks, the second approves that request.
        let summary = switchovers.approvable(&name).await?;
        return control
            .approve_failover_by_two(
                &caller,
                &name,
                crate::approvals::Ask {
                    workspace: workspace.to_owned(),
                    rule: ApprovalRule::Failover,
                    summary,
                    operation: crate::approvals::Operation::ApproveFailover {
                        switchover: name.clone(),
                    },
                    reason: None,
                    hold: false,
                },
            )
            .await;
    }
    let author = author(&caller, None);
    let resource = switchovers.approve(&name, &author).await?;
    Ok(Json(serde_json::to_value(&resource).unwrap_or_default()).into_response())
}

/// Waits until every matching node has applied at least `version`; on
/// timeout, names the laggards.
#[utoipa::path(post, path = "/v1/barrier", request_body = BarrierRequest,
    responses((status = 200, body = BarrierResponse, description = "`reached` says whether every node got there in time"), (status = 400, body = ErrorBody)))]
async fn barrier(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<BarrierRequest>, JsonRejection>,
) -> ApiResult<BarrierResponse> {
    control.authorize(&caller, Action::Observe)?;
    let Json(request) = body?;
    let timeout = match &request.timeout {
        None => Duration::from_secs(10),
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            ApiError::bad_request(format!(
                "timeout `{text}` is not a duration ({e}); write it like 5s or 500ms"
            ))
        })?,
    };
    if timeout > MAX_BARRIER {
        return Err(ApiError::bad_request("a barrier waits at most 10m"));
    }
    let version = match request.version {
        Some(version) => version,
        None => control.cache.current().revision,
    };
    let result = control
        .nodes
        .barrier(&request.selector, version, request.min_nodes, timeout)
        .await;
    let label = if result.reached { "reached" } else { "timeout" };
    control
        .metrics
        .barriers
        .get_or_create(&ResultLabels {
            result: label.into(),
        })
        .inc();
    control
        .metrics
        .barrier_duration
        .observe(Duration::from_millis(result.waited_ms).as_secs_f64());
    Ok(Json(result))
}
