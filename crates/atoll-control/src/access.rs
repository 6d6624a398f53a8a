//! Who calls the REST API, from credentials only, and whether they may.
//!
//! Every request passes [`authenticate`] first: a bearer token (an API
//! token, checked against its hashed record in the coordination keyspace,
//! or the static admin token the replica was started with), else the TLS
//! client certificate (a `user` certificate is a user, any other a node),
//! else nobody. The [`Caller`] it finds rides on the request; handlers ask
//! [`Control::authorize`] before they act, and the policy comes from the
//! Workspace resources every replica holds.
//!
//! With access control off (a control plane started `--insecure`), a
//! caller without a credential is the name it claims in `x-atoll-user`,
//! marked unverified in the audit log, and may do everything.

use std::net::SocketAddr;

use atoll_access::{Action, Denied, Principal};
use atoll_api::rest::ErrorCode;
use atoll_identity::{AtollId, Role, Token, TokenKind};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::control::Control;
use crate::rest::{ApiError, Shared};
use crate::tokens::{TokenRecord, token_key};

/// The header a replica passes the caller it verified on in, when it
/// forwards a request to the leader; taken only from another replica.
pub(crate) const FORWARDED_CALLER: &str = "x-atoll-caller";

/// How a replica decides who may do what.
#[derive(Clone, Debug, Default)]
pub struct AccessOptions {
    /// Whether every call needs a credential and a role. Off only for a
    /// control plane started `--insecure`.
    pub enforce: bool,
    /// A token that acts as the fleet's admin (`admin`, group
    /// `atoll:admins`), read from `--admin-token-file`: the way in before
    /// any token exists.
    pub admin_token: Option<Token>,
}

/// The verified caller of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) principal: Principal,
    /// How it was verified: `token <id>`, `certificate <id>`, `none`.
    pub(crate) credential: String,
    /// Where the request came from (for a forwarded one: where it came to
    /// the first replica).
    pub(crate) remote: Option<SocketAddr>,
}

impl Caller {
    fn nobody(remote: Option<SocketAddr>) -> Self {
        Self {
            principal: Principal::Anonymous,
            credential: "none".to_owned(),
            remote,
        }
    }

    /// The name the audit log records.
    pub(crate) fn name(&self) -> String {
        self.principal.name()
    }
}

/// A caller as one replica passes it on to another.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Passed {
    kind: String,
    name: String,
    #[serde(default)]
    groups: Vec<String>,
    credential: String,
    #[serde(default)]
    remote: Option<SocketAddr>,
}

impl Caller {
    pub(crate) fn to_header(&self) -> Option<HeaderValue> {
        let (kind, name, groups) = match &self.principal {
            Principal::User { name, groups } => ("user", name.clone(), groups.clone()),
            Principal::Node(id) => ("node", id.to_string(), Vec::new()),
            Principal::Unverified(name) => ("unverified", name.clone(), Vec::new()),
            Principal::Anonymous => ("anonymous", String::new(), Vec::new()),
        };
        let passed = Passed {
            kind: kind.to_owned(),
            name,
            groups,
            credential: self.credential.clone(),
            remote: self.remote,
        };
        let json = serde_json::to_vec(&passed).ok()?;
        HeaderValue::from_bytes(&json).ok()
    }

    fn from_header(value: &HeaderValue) -> Result<Self, String> {
        let passed: Passed = serde_json::from_slice(value.as_bytes())
            .map_err(|e| format!("the caller passed on by a replica does not parse: {e}"))?;
        let principal = match passed.kind.as_str() {
            "user" => Principal::User {
                name: passed.name,
                groups: passed.groups,
            },
            "node" => Principal::Node(passed.name.parse().map_err(|e| format!("{e}"))?),
            "unverified" => Principal::Unverified(passed.name),
            "anonymous" => Principal::Anonymous,
            other => return Err(format!("unknown caller kind `{other}`")),
        };
        Ok(Self {
            principal,
            credential: passed.credential,
            remote: passed.remote,
        })
    }
}

fn unauthenticated(message: String) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthenticated,
        message,
    )
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        if denied.authenticated {
            ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, denied.message)
        } else {
            unauthenticated(denied.message)
        }
    }
}

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(unauthenticated(
            "the Authorization header is not `Bearer <token>`; send an API token as `Authorization: Bearer atk_...`".to_owned(),
        )),
    }
}

/// The certificate identity of the connection, if its client sent one.
fn certified(peer: Option<&atoll_transport::Peer>) -> Result<Option<AtollId>, ApiError> {
    let Some(leaf) = peer
        .and_then(|peer| peer.certificates.as_ref())
        .and_then(|chain| chain.first().cloned())
    else {
        return Ok(None);
    };
    atoll_identity::id_of_certificate(&leaf)
        .map(Some)
        .map_err(|e| unauthenticated(format!("the client certificate is not usable: {e}")))
}

impl Control {
    /// Who a token is, from its record.
    async fn token_user(&self, text: &str) -> Result<Principal, ApiError> {
        let token = Token::parse(text).map_err(|e| unauthenticated(e.to_string()))?;
        if token.kind == TokenKind::Bootstrap {
            return Err(unauthenticated(format!(
                "token {} is a bootstrap token, for a node to join; the API takes API tokens (atk_...)",
                token.id
            )));
        }
        if let Some(admin) = &self.access.admin_token
            && admin.id == token.id
        {
            return if token.matches(&admin.hash()) {
                Ok(Principal::User {
                    name: "admin".to_owned(),
                    groups: vec![atoll_access::ADMINS.to_owned()],
                })
            } else {
                Err(unauthenticated(format!(
                    "token {} does not match the admin token this control plane was started with",
                    token.id
                )))
            };
        }
        let entry = self
            .coordination
            .get_key(&token_key(&token.id))
            .await
            .map_err(ApiError::from)?;
        let Some(entry) = entry else {
            return Err(unauthenticated(format!(
                "token {} is not known here (never made by this control plane, or deleted); log in with a valid token (`atoll login`)",
                token.id
            )));
        };
        let record = TokenRecord::decode(&entry.value).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("the record of token {} does not parse: {e}", token.id),
            )
        })?;
        record
            .usable_by(&token, time::OffsetDateTime::now_utc())
            .map_err(unauthenticated)?;
        Ok(Principal::User {
            name: record.user.clone().unwrap_or_default(),
            groups: record.groups.clone(),
        })
    }

    /// Whether `caller` may take `action`; a refusal is logged and counted
    /// here, and becomes the answer.
    pub(crate) fn authorize(&self, caller: &Caller, action: Action<'_>) -> Result<(), ApiError> {
        let state = self.cache.current();
        match state.policy().decide(&caller.principal, action) {
            Ok(()) => Ok(()),
            Err(denied) => {
                tracing::info!(
                    caller = %caller.name(),
                    credential = %caller.credential,
                    remote = ?caller.remote,
                    %action,
                    reason = %denied.message,
                    "refused"
                );
                self.metrics.refused.inc();
                Err(denied.into())
            }
        }
    }

    /// Whether `caller` may see resources of `workspace` (the fleet's for
    /// `None`): for filtering lists, without logging.
    pub(crate) fn may_read(&self, caller: &Caller, workspace: Option<&str>) -> bool {
        self.cache
            .current()
            .policy()
            .decide(&caller.principal, Action::Read(workspace))
            .is_ok()
    }
}

/// Finds the caller of a request from its credentials and puts it on the
/// request; a credential that does not check out is refused here (401).
pub(crate) async fn authenticate(
    State(control): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request.extensions().get::<atoll_transport::Peer>().cloned();
    match identify(&control, request.headers(), peer.as_ref()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => {
            control.metrics.refused.inc();
            tracing::info!(
                path = %request.uri().path(),
                remote = ?peer.as_ref().map(|p| p.remote),
                "refused a credential"
            );
            // Recorded here: the chain's own layer sees only callers that
            // were identified.
            let credential = match bearer(request.headers()) {
                Ok(Some(text)) => match text.split('_').nth(1) {
                    Some(id) if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
                        format!("token {id}")
                    }
                    _ => "a malformed token".to_owned(),
                },
                Ok(None) => "none".to_owned(),
                Err(_) => "a malformed Authorization header".to_owned(),
            };
            let caller = Caller {
                credential,
                ..Caller::nobody(peer.as_ref().map(|p| p.remote))
            };
            let path = request.uri().path_and_query().map_or_else(
                || request.uri().path().to_owned(),
                |p| p.as_str().to_owned(),
            );
            let message = error.message().to_owned();
            let response = error.into_response();
            control
                .record(crate::audit::Call {
                    caller: &caller,
                    method: request.method(),
                    path: &path,
                    status: response.status(),
                    outcome: "unauthenticated".to_owned(),
                    detail: message,
                })
                .await;
            response
        }
    }
}

async fn identify(
    control: &Control,
    headers: &HeaderMap,
    peer: Option<&atoll_transport::Peer>,
) -> Result<Caller, ApiError> {
    let remote = peer.map(|p| p.remote);
    let tls = peer.is_some_and(|p| p.tls);
    let certificate = certified(peer)?;
    if let Some(passed) = headers.get(FORWARDED_CALLER) {
        // Only another replica may say who the caller is: over TLS, one
        // whose certificate is a control plane's.
        let from_replica = if tls {
            certificate
                .as_ref()
                .is_some_and(|id| id.role == Role::Control)
        } else {
            !control.access.enforce
        };
        if !from_replica {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!(
                    "only a control-plane replica may pass a caller on ({FORWARDED_CALLER}); remove the header"
                ),
            ));
        }
        return Caller::from_header(passed).map_err(unauthenticated);
    }
    if let Some(text) = bearer(headers)? {
        let principal = control.token_user(text).await?;
        let id = text.split('_').nth(1).unwrap_or_default().to_owned();
        return Ok(Caller {
            principal,
            credential: format!("token {id}"),
            remote,
        });
    }
    if let Some(id) = certificate {
        let credential = format!("certificate {id}");
        let principal = if id.role == Role::User {
            Principal::User {
                name: id.name.clone(),
                groups: Vec::new(),
            }
        } else {
            Principal::Node(id)
        };
        return Ok(Caller {
            principal,
            credential,
            remote,
        });
    }
    if !control.access.enforce {
        let name = headers
            .get("x-atoll-user")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| v.chars().take(128).collect())
            .unwrap_or_else(|| "anonymous".to_owned());
        return Ok(Caller {
            principal: Principal::Unverified(name),
            credential: "none".to_owned(),
            remote,
        });
    }
    Ok(Caller::nobody(remote))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_caller_reads_back_as_it_was() {
        for principal in [
            Principal::User {
                name: "ölga".to_owned(),
                groups: vec!["atoll:admins".to_owned(), "ops".to_owned()],
            },
            Principal::Node(
                AtollId::new("default", Role::Gateway, "hz-a", "gw-1").expect("a valid id"),
            ),
            Principal::Unverified("bob".to_owned()),
            Principal::Anonymous,
        ] {
            let caller = Caller {
                principal,
                credential: "token 0123456789abcdef".to_owned(),
                remote: Some("127.0.0.1:4000".parse().expect("an address")),
            };
            let header = caller.to_header().expect("a header value");
            assert_eq!(Caller::from_header(&header).expect("it parses"), caller);
        }
    }
}
