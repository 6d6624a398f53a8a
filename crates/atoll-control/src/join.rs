//! Certificates for nodes: `POST /v1/join` issues a node its first
//! certificate against a one-use bootstrap token (the token decides the
//! workspace, role and zone; the node only names itself and sends the public
//! key of a key it made), and `POST /v1/renew` issues a new one for the
//! identity of the certificate the caller connected with.
//! `POST /v1/instance-certificates` issues an agent's instances theirs
//! (`atoll://<workspace>/sdk/<zone>/<instance>`, in the agent's own zone
//! and workspace: an agent vouches for what it starts, as a SPIRE agent
//! does for its workloads).
//!
//! The replica signs with the intermediate of its `--ca-dir`, read again for
//! every certificate, so a rotated intermediate is used at once.

use std::path::PathBuf;
use std::time::Duration;

use atoll_access::Principal;
use atoll_api::rest::{
    CaInfo, ErrorCode, InstanceCertificateRequest, IssuedCertificate, JoinRequest, RenewRequest,
};
use atoll_identity::{AtollId, Authority, IssueRequest, KeySource, Role, Token, TokenKind};
use atoll_store::{Expect, StoreError, Write};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::{Json, Router};
use time::OffsetDateTime;

use crate::access::Caller;
use crate::rest::{ApiError, ApiResult, Shared};
use crate::tokens::{TokenRecord, token_key};

/// How a replica issues node certificates.
#[derive(Clone, Debug)]
pub struct IssuerOptions {
    /// The CA directory (`atoll ca init`): `root.pem`, `intermediate.pem`,
    /// `intermediate.key`.
    pub ca_dir: PathBuf,
    /// How long a node certificate is valid.
    pub lifetime: Duration,
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/ca", axum::routing::get(ca))
        .route("/v1/join", axum::routing::post(join))
        .route("/v1/renew", axum::routing::post(renew))
        .route(
            "/v1/instance-certificates",
            axum::routing::post(instance_certificate),
        )
}

fn unavailable_issuer() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        ErrorCode::Unavailable,
        "this control plane does not issue certificates: start it with --ca-dir (the directory of `atoll ca init`, holding the intermediate's key)",
    )
}

fn unauthenticated(message: String) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthenticated,
        message,
    )
}

async fn issue(
    issuer: &IssuerOptions,
    id: AtollId,
    csr: String,
    hosts: Vec<String>,
) -> Result<IssuedCertificate, ApiError> {
    if !hosts.is_empty() && id.role != Role::Control {
        return Err(ApiError::bad_request(format!(
            "only a control-plane replica's certificate names hosts; {id} is a {} (remove `hosts`)",
            id.role
        )));
    }
    let issuer = issuer.clone();
    tokio::task::spawn_blocking(move || {
        let authority = load_authority(&issuer)?;
        let issued = authority
            .issue(&IssueRequest {
                id: &id,
                key: KeySource::Csr(&csr),
                lifetime: issuer.lifetime,
                hosts: &hosts,
            })
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(IssuedCertificate {
            identity: id.to_string(),
            chain: issued.chain_pem,
            trust: authority.trust_pem().to_owned(),
            expires: crate::nodes::rfc3339(issued.not_after),
            serial: issued.serial,
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("issuing failed: {e}"),
        )
    })?
}

/// The CA of `--ca-dir` as it is on disk now. Read for every certificate,
/// so `atoll ca rotate` takes effect at once; a read caught between the
/// rotation's two writes is tried again.
fn load_authority(issuer: &IssuerOptions) -> Result<Authority, ApiError> {
    let mut tries = 0;
    loop {
        match Authority::load(&issuer.ca_dir) {
            Ok(authority) => return Ok(authority),
            Err(e) if tries < 5 && e.to_string().contains("is not the key of") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    format!("cannot load the CA to issue with: {e}"),
                ));
            }
        }
    }
}

/// The root and the intermediate this replica issues with now: certificates
/// are public, so anyone may ask. Nodes ask it to learn that the
/// intermediate was rotated, and renew then.
#[utoipa::path(get, path = "/v1/ca",
    responses((status = 200, body = CaInfo),
        (status = 501, body = atoll_api::rest::ErrorBody, description = "This replica does not issue certificates (no --ca-dir)")))]
pub(crate) async fn ca(State(control): State<Shared>) -> ApiResult<CaInfo> {
    let issuer = control
        .issuer
        .as_ref()
        .ok_or_else(unavailable_issuer)?
        .clone();
    // Every node asks every `CA_CHECK_INTERVAL`: the answer is kept until
    // the intermediate's file changes.
    type Cached = Option<(PathBuf, std::time::SystemTime, u64, CaInfo)>;
    static CACHE: parking_lot::Mutex<Cached> = parking_lot::Mutex::new(None);
    let file = issuer.ca_dir.join("intermediate.pem");
    let stamp = std::fs::metadata(&file)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    if let (Some((modified, len)), Some((path, at, size, info))) = (stamp, &*CACHE.lock())
        && *path == file
        && *at == modified
        && *size == len
    {
        return Ok(Json(info.clone()));
    }
    tokio::task::spawn_blocking(move || {
        let authority = load_authority(&issuer)?;
        let intermediate = authority.intermediate_pem().to_owned();
        let intermediate_fingerprint = atoll_identity::fingerprints_of_pem(&intermediate)
            .into_iter()
            .next()
            .unwrap_or_default();
        let info = CaInfo {
            trust: authority.trust_pem().to_owned(),
            intermediate,
            intermediate_fingerprint,
            intermediate_expires: crate::nodes::rfc3339(authority.intermediate_not_after()),
        };
        if let Some((modified, len)) = stamp {
            *CACHE.lock() = Some((file, modified, len, info.clone()));
        }
        Ok(info)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("reading the CA failed: {e}"),
        )
    })?
    .map(Json)
}

/// A node's first certificate, against a bootstrap token (used up).
#[utoipa::path(post, path = "/v1/join", request_body = JoinRequest,
    responses((status = 200, body = IssuedCertificate), (status = 400, body = atoll_api::rest::ErrorBody),
        (status = 401, body = atoll_api::rest::ErrorBody, description = "The bootstrap token is unknown, used, expired or revoked")))]
pub(crate) async fn join(
    State(control): State<Shared>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> ApiResult<IssuedCertificate> {
    let Json(request) = body?;
    let issuer = control.issuer.as_ref().ok_or_else(unavailable_issuer)?;
    let token = Token::parse(&request.token).map_err(|e| unauthenticated(e.to_string()))?;
    if token.kind != TokenKind::Bootstrap {
        return Err(unauthenticated(format!(
            "token {} is an API token; joining takes a bootstrap token (`atoll token create --role R --zone Z`)",
            token.id
        )));
    }
    let key = token_key(&token.id);
    let entry = control.coordination.get_key(&key).await?.ok_or_else(|| {
        unauthenticated(format!("bootstrap token {} is not known here", token.id))
    })?;
    let mut record = TokenRecord::decode(&entry.value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("the record of token {} does not parse: {e}", token.id),
        )
    })?;
    let now = OffsetDateTime::now_utc();
    record.usable_by(&token, now).map_err(unauthenticated)?;
    let scope = record
        .node
        .clone()
        .ok_or_else(|| unauthenticated(format!("token {} is not a bootstrap token", token.id)))?;
    let role = Role::parse(&scope.role).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("token {} names an unknown role `{}`", token.id, scope.role),
        )
    })?;
    let id = AtollId::new(&scope.workspace, role, &scope.zone, &request.name)
        .map_err(|e| ApiError::bad_request(format!("name `{}`: {e}", request.name)))?;
    // Used up before the certificate is made: two joins with one token
    // cannot both get one.
    record.used = Some(now.unix_timestamp());
    let used = control
        .coordination
        .write_keys(
            vec![
                Write::put(key, serde_json::to_vec(&record).unwrap_or_default())
                    .expecting(Expect::Modified(entry.modified)),
            ],
            None,
        )
        .await;
    match used {
        Ok(_) => {}
        Err(StoreError::KeyConflict { .. }) => {
            return Err(unauthenticated(format!(
                "bootstrap token {} was used by another join just now; each joins one node",
                token.id
            )));
        }
        Err(error) => return Err(error.into()),
    }
    let issued = issue(issuer, id, request.csr, request.hosts).await?;
    tracing::info!(identity = %issued.identity, token = %token.id, "a node joined");
    Ok(Json(issued))
}

/// A new certificate for the identity the caller's certificate has.
#[utoipa::path(post, path = "/v1/renew", request_body = RenewRequest,
    responses((status = 200, body = IssuedCertificate), (status = 401, body = atoll_api::rest::ErrorBody),
        (status = 403, body = atoll_api::rest::ErrorBody)))]
pub(crate) async fn renew(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<RenewRequest>, JsonRejection>,
) -> ApiResult<IssuedCertificate> {
    let Json(request) = body?;
    let issuer = control.issuer.as_ref().ok_or_else(unavailable_issuer)?;
    let Principal::Node(id) = &caller.principal else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "renewing needs a node's certificate on the connection, and {} is not one; a node without a certificate joins with a bootstrap token (POST /v1/join)",
                caller.principal
            ),
        ));
    };
    let issued = issue(issuer, id.clone(), request.csr, request.hosts).await?;
    tracing::info!(identity = %issued.identity, "a node renewed its certificate");
    Ok(Json(issued))
}

/// A certificate for an instance an agent runs: in the agent's workspace
/// and zone, with the role `sdk`, named as the agent says.
#[utoipa::path(post, path = "/v1/instance-certificates", request_body = InstanceCertificateRequest,
    responses((status = 200, body = IssuedCertificate), (status = 400, body = atoll_api::rest::ErrorBody),
        (status = 403, body = atoll_api::rest::ErrorBody, description = "The caller is not an agent's certificate")))]
pub(crate) async fn instance_certificate(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<InstanceCertificateRequest>, JsonRejection>,
) -> ApiResult<IssuedCertificate> {
    let Json(request) = body?;
    let issuer = control.issuer.as_ref().ok_or_else(unavailable_issuer)?;
    let agent = match &caller.principal {
        Principal::Node(id) if id.role == Role::Agent => id,
        other => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!(
                    "only an agent's certificate asks certificates for instances, and {other} is not one"
                ),
            ));
        }
    };
    let id = AtollId::new(&agent.workspace, Role::Sdk, &agent.zone, &request.name)
        .map_err(|e| ApiError::bad_request(format!("name `{}`: {e}", request.name)))?;
    let issued = issue(issuer, id, request.csr, Vec::new()).await?;
    tracing::info!(identity = %issued.identity, agent = %agent, "an agent's instance got a certificate");
    Ok(Json(issued))
}
