//! API and bootstrap tokens: records in the coordination keyspace
//! (`tokens/<id>`, kept durably on both backends), holding the SHA-256 of
//! the secret, never the secret; and the REST endpoints that make, list and
//! revoke them.
//!
//! Who may do what: anyone with a credential may make an API token for
//! themselves with at most their own groups; a token for someone else, or
//! with more groups, is the fleet admins' (`atoll:admins`). A bootstrap
//! token for a node of a workspace needs the admin role there. Everyone
//! lists and revokes their own; fleet admins every one.

use std::collections::BTreeMap;
use std::time::Duration;

use atoll_access::{Action, Principal};
use atoll_api::rest::{ErrorCode, TokenCreated, TokenInfo, TokenList, TokenRequest, WhoAmI};
use atoll_identity::{AtollId, Role, Token, TokenKind};
use atoll_model::DEFAULT_WORKSPACE;
use atoll_store::{Expect, Write};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::access::Caller;
use crate::nodes::rfc3339;
use crate::rest::{ApiError, ApiResult, Shared};

/// Where token records live in the coordination keyspace.
const PREFIX: &str = "tokens/";

/// An API token lives this long unless the request says otherwise.
const API_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// The longest an API token may live.
const API_MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// A bootstrap token lives this long unless the request says otherwise.
const BOOTSTRAP_TTL: Duration = Duration::from_secs(3600);
/// The longest a bootstrap token may live.
const BOOTSTRAP_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub(crate) fn token_key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// A stored token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TokenRecord {
    pub(crate) id: String,
    /// `api` or `bootstrap`.
    pub(crate) kind: String,
    /// SHA-256 of the secret, hex.
    pub(crate) hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) groups: Vec<String>,
    /// A bootstrap token's node: `atoll://<workspace>/<role>/<zone>/*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<NodeScope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
    pub(crate) created_by: String,
    /// Unix seconds.
    pub(crate) created: i64,
    pub(crate) expires: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) revoked_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) used: Option<i64>,
    /// Made where tokens need a second person: the approval request that
    /// must be approved before it may be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) awaiting: Option<String>,
}

/// The node a bootstrap token lets join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NodeScope {
    pub(crate) workspace: String,
    pub(crate) role: String,
    pub(crate) zone: String,
}

fn time_text(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map(rfc3339)
        .unwrap_or_else(|_| seconds.to_string())
}

impl TokenRecord {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether `token` may be used now: its secret, not revoked, not
    /// expired. The error is the whole sentence for the caller.
    pub(crate) fn usable_by(&self, token: &Token, now: OffsetDateTime) -> Result<(), String> {
        if !token.matches(&self.hash) {
            return Err(format!(
                "token {} does not match its record (a wrong or altered secret); use the whole token as `atoll token create` printed it",
                self.id
            ));
        }
        if let Some(revoked) = self.revoked {
            return Err(format!(
                "token {} was revoked by {} at {}; ask an admin for a new one",
                self.id,
                self.revoked_by.as_deref().unwrap_or("someone"),
                time_text(revoked)
            ));
        }
        if now.unix_timestamp() >= self.expires {
            return Err(format!(
                "token {} expired at {}; make a new one (`atoll token create`) and `atoll login` with it",
                self.id,
                time_text(self.expires)
            ));
        }
        if let Some(approval) = &self.awaiting {
            return Err(format!(
                "token {} awaits a second person's approval ({approval}); it works once someone else runs `atoll approval approve {approval}`",
                self.id
            ));
        }
        if self.used.is_some() {
            return Err(format!(
                "bootstrap token {} was already used; each joins one node",
                self.id
            ));
        }
        Ok(())
    }

    fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            kind: self.kind.clone(),
            user: self.user.clone(),
            groups: self.groups.clone(),
            node: self
                .node
                .as_ref()
                .map(|n| format!("atoll://{}/{}/{}/*", n.workspace, n.role, n.zone)),
            description: self.description.clone(),
            created_by: self.created_by.clone(),
            created: time_text(self.created),
            expires: time_text(self.expires),
            revoked: self.revoked.map(time_text),
            revoked_by: self.revoked_by.clone(),
            used: self.used.map(time_text),
            awaiting_approval: self.awaiting.clone(),
        }
    }
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/tokens",
            axum::routing::post(create_token).get(list_tokens),
        )
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/whoami", axum::routing::get(whoami))
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

fn ttl_of(
    request: &TokenRequest,
    default: Duration,
    (max, max_text): (Duration, &str),
) -> Result<Duration, ApiError> {
    let ttl = match &request.ttl {
        None => default,
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            bad(format!(
                "ttl `{text}` is not a duration ({e}); write it like 1h, 30d or 90s"
            ))
        })?,
    };
    if ttl < Duration::from_secs(1) || ttl > max {
        return Err(bad(format!(
            "ttl {} is out of range; a token of this kind lives 1s to {max_text}",
            request.ttl.as_deref().unwrap_or_default()
        )));
    }
    Ok(ttl)
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(bad(format!(
            "{what} `{name}` is not a name; use 1 to 128 printable characters"
        )));
    }
    Ok(())
}

/// What a token request makes, once checked: the record without its hash
/// and times.
enum Made {
    Api { user: String, groups: Vec<String> },
    Bootstrap(NodeScope),
}

/// Which approval rule guards a token: of the fleet's admins (checked
/// against `default`'s rule) or of a workspace's.
struct Guard {
    fleet: bool,
    workspace: String,
}

/// Checks a request and the caller's right to it; the guard is `None` for
/// a token for oneself with no more than one's own groups.
fn check_request(
    control: &crate::control::Control,
    caller: &Caller,
    request: &TokenRequest,
) -> Result<(Made, Duration, Option<Guard>), ApiError> {
    let node = request.role.is_some() || request.zone.is_some() || request.workspace.is_some();
    if node && (request.user.is_some() || !request.groups.is_empty()) {
        return Err(bad(
            "a token is either for a user (`user`, `groups`) or for a node to join (`role`, `zone`, `workspace`), not both",
        ));
    }
    if node {
        let role_text = request.role.as_deref().ok_or_else(|| {
            bad("a bootstrap token needs `role` (gateway, agent, sidecar, sdk, control)")
        })?;
        let role = Role::parse(role_text)
            .filter(|r| *r != Role::User)
            .ok_or_else(|| {
                bad(format!(
                    "role `{role_text}` is not a node role; use gateway, agent, sidecar, sdk or control (people use API tokens: `user`)"
                ))
            })?;
        let workspace = request
            .workspace
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| DEFAULT_WORKSPACE.to_owned());
        let zone = match (role, request.zone.as_deref()) {
            (Role::Control, None) => atoll_identity::NO_ZONE.to_owned(),
            (_, Some(zone)) => zone.to_owned(),
            (_, None) => {
                return Err(bad(format!(
                    "a bootstrap token for a {role_text} needs `zone`: the zone the node runs in"
                )));
            }
        };
        // The identity it will be issued must be a valid one.
        AtollId::new(&workspace, role, &zone, "node").map_err(|e| bad(e.to_string()))?;
        let fleet = role == Role::Control;
        if fleet {
            control.authorize(caller, Action::AdministerFleet)?;
        } else {
            control.authorize(caller, Action::BootstrapToken(&workspace))?;
        }
        let ttl = ttl_of(request, BOOTSTRAP_TTL, (BOOTSTRAP_MAX_TTL, "7d"))?;
        let guard = Guard {
            fleet,
            workspace: crate::approvals::token_workspace(fleet, Some(&workspace)),
        };
        return Ok((
            Made::Bootstrap(NodeScope {
                workspace,
                role: role.as_str().to_owned(),
                zone,
            }),
            ttl,
            Some(guard),
        ));
    }
    let own = caller.principal.user().map(str::to_owned);
    let user = match (&request.user, &own) {
        (Some(user), _) => user.clone(),
        (None, Some(own)) => own.clone(),
        (None, None) => {
            return Err(bad(
                "say whom the token is for (`user`), or for which node (`role`, `zone`)",
            ));
        }
    };
    check_name("user", &user)?;
    for group in &request.groups {
        check_name("group", group)?;
    }
    // Making a token for oneself with no more than one's own groups is
    // everyone's; anything else is the fleet admins'.
    let for_self = match &caller.principal {
        Principal::User { name, groups } => {
            *name == user && request.groups.iter().all(|g| groups.contains(g))
        }
        _ => false,
    };
    if !for_self {
        control.authorize(caller, Action::AdministerFleet)?;
    }
    let ttl = ttl_of(request, API_TTL, (API_MAX_TTL, "366d"))?;
    let mut groups = request.groups.clone();
    groups.sort();
    groups.dedup();
    let guard = (!for_self).then(|| Guard {
        fleet: true,
        workspace: crate::approvals::token_workspace(true, None),
    });
    Ok((Made::Api { user, groups }, ttl, guard))
}

/// Makes an API token for a user, or a bootstrap token for a node to join.
/// The secret is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", request_body = TokenRequest,
    responses((status = 200, body = TokenCreated), (status = 400, body = atoll_api::rest::ErrorBody),
        (status = 401, body = atoll_api::rest::ErrorBody), (status = 403, body = atoll_api::rest::ErrorBody)))]
pub(crate) async fn create_token(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body?;
    let (made, ttl, guard) = check_request(&control, &caller, &request)?;
    let guard =
        guard.filter(|g| control.needs_approval(&g.workspace, atoll_model::ApprovalRule::Token));
    if let Some(description) = &request.description
        && (description.len() > 512 || description.chars().any(char::is_control))
    {
        return Err(bad(
            "description is at most 512 printable characters on one line",
        ));
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let expires = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    let (token, user, groups, node) = match made {
        Made::Api { user, groups } => (Token::generate(TokenKind::Api), Some(user), groups, None),
        Made::Bootstrap(scope) => (
            Token::generate(TokenKind::Bootstrap),
            None,
            Vec::new(),
            Some(scope),
        ),
    };
    let record = TokenRecord {
        id: token.id.clone(),
        kind: match token.kind {
            TokenKind::Api => "api",
            TokenKind::Bootstrap => "bootstrap",
        }
        .to_owned(),
        hash: token.hash(),
        user,
        groups,
        node,
        description: request.description.clone(),
        created_by: caller.name(),
        created: now,
        expires,
        revoked: None,
        revoked_by: None,
        used: None,
        awaiting: None,
    };
    if let Some(guard) = guard {
        return ask_for(&control, &caller, record, token, guard, &request).await;
    }
    let fence = control.leadership.fence()?;
    control
        .coordination
        .put_key(
            Write::put(token_key(&token.id), record.encode()).expecting(Expect::Absent),
            Some(&fence),
        )
        .await
        .map_err(|e| control.leadership.check(&fence, e))
        .map_err(ApiError::from)?;
    tracing::info!(
        id = %token.id,
        kind = %record.kind,
        by = %caller.name(),
        "token created"
    );
    Ok(Json(TokenCreated {
        token: token.to_string(),
        info: record.info(),
    })
    .into_response())
}

/// Stores a token that needs a second person, unusable, with its approval
/// request, in one batch; the 202 answer holds the token.
async fn ask_for(
    control: &crate::control::Control,
    caller: &Caller,
    mut record: TokenRecord,
    token: Token,
    guard: Guard,
    request: &TokenRequest,
) -> Result<Response, ApiError> {
    let summary = match &record.node {
        Some(n) => format!(
            "a bootstrap token {} for a {} of zone {} (workspace {})",
            record.id, n.role, n.zone, n.workspace
        ),
        None => format!(
            "an API token {} for {}{}",
            record.id,
            record.user.as_deref().unwrap_or("?"),
            if record.groups.is_empty() {
                String::new()
            } else {
                format!(" (groups {})", record.groups.join(", "))
            }
        ),
    };
    let approval = control.new_request(
        caller,
        crate::approvals::Ask {
            workspace: guard.workspace,
            rule: atoll_model::ApprovalRule::Token,
            summary,
            operation: crate::approvals::Operation::Token {
                id: record.id.clone(),
                fleet: guard.fleet,
            },
            reason: request.description.clone(),
            hold: false,
        },
    )?;
    record.awaiting = Some(approval.id().to_owned());
    let fence = control.leadership.fence()?;
    control
        .coordination
        .write_keys(
            vec![
                Write::put(token_key(&token.id), record.encode()).expecting(Expect::Absent),
                approval.creation(),
            ],
            Some(&fence),
        )
        .await
        .map_err(|e| control.leadership.check(&fence, e))
        .map_err(ApiError::from)?;
    tracing::info!(id = %token.id, approval = %approval.id(), by = %caller.name(), "token created, awaiting approval");
    Ok(crate::approvals::pending_answer(
        &approval,
        Some(token.to_string()),
    ))
}

impl crate::control::Control {
    async fn token_record(&self, id: &str) -> Result<(TokenRecord, i64), ApiError> {
        let entry = self
            .coordination
            .get_key(&token_key(id))
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::not_found(format!("token {id} no longer exists")))?;
        let record = TokenRecord::decode(&entry.value).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                format!("the record of token {id} does not parse: {e}"),
            )
        })?;
        Ok((record, entry.modified))
    }

    async fn put_token(&self, record: &TokenRecord, modified: i64) -> Result<(), ApiError> {
        let fence = self.leadership.fence()?;
        self.coordination
            .put_key(
                Write::put(token_key(&record.id), record.encode())
                    .expecting(Expect::Modified(modified)),
                Some(&fence),
            )
            .await
            .map_err(|e| self.leadership.check(&fence, e))
            .map_err(ApiError::from)?;
        Ok(())
    }

    /// Makes a token approved by a second person usable.
    pub(crate) async fn activate_token(&self, id: &str) -> Result<(), ApiError> {
        let (mut record, modified) = self.token_record(id).await?;
        if record.revoked.is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::Conflict,
                format!("token {id} was revoked meanwhile; make a new one"),
            ));
        }
        record.awaiting = None;
        self.put_token(&record, modified).await
    }

    /// Revokes a token whose approval was rejected.
    pub(crate) async fn revoke_unapproved(&self, id: &str, by: &str) -> Result<(), ApiError> {
        let (mut record, modified) = self.token_record(id).await?;
        if record.revoked.is_some() {
            return Ok(());
        }
        record.revoked = Some(OffsetDateTime::now_utc().unix_timestamp());
        record.revoked_by = Some(format!("{by} (approval rejected)"));
        self.put_token(&record, modified).await
    }
}

async fn records(control: &crate::control::Control) -> Result<Vec<(TokenRecord, i64)>, ApiError> {
    let listing = control
        .coordination
        .list_keys(PREFIX)
        .await
        .map_err(ApiError::from)?;
    let mut records = Vec::new();
    for entry in listing.entries {
        match TokenRecord::decode(&entry.value) {
            Ok(record) => records.push((record, entry.modified)),
            Err(error) => tracing::warn!(key = %entry.key, %error, "a token record does not parse"),
        }
    }
    Ok(records)
}

/// The caller's own tokens; a fleet admin's: every token.
#[utoipa::path(get, path = "/v1/tokens",
    responses((status = 200, body = TokenList), (status = 401, body = atoll_api::rest::ErrorBody)))]
pub(crate) async fn list_tokens(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<TokenList> {
    control.authorize(&caller, Action::Observe)?;
    let admin = caller.principal.is_fleet_admin();
    let me = caller.name();
    let mut tokens: Vec<_> = records(&control)
        .await?
        .into_iter()
        .filter(|(r, _)| {
            admin || r.created_by == me || r.user.as_deref() == caller.principal.user()
        })
        .map(|(r, _)| r)
        .collect();
    tokens.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    Ok(Json(TokenList {
        tokens: tokens.iter().map(TokenRecord::info).collect(),
    }))
}

/// Revokes a token: it stops working at once, on every replica.
#[utoipa::path(delete, path = "/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 200, body = TokenInfo), (status = 404, body = atoll_api::rest::ErrorBody),
        (status = 403, body = atoll_api::rest::ErrorBody)))]
pub(crate) async fn revoke_token(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<TokenInfo> {
    control.authorize(&caller, Action::Observe)?;
    // `atk_<id>_<secret>` pasted whole: take the id, never keep the rest.
    let id = match Token::parse(&id) {
        Ok(token) => token.id,
        Err(_) => id,
    };
    let key = token_key(&id);
    let entry = control
        .coordination
        .get_key(&key)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no token has id `{id}`; `atoll token list` shows them"
            ))
        })?;
    let mut record = TokenRecord::decode(&entry.value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("the record of token {id} does not parse: {e}"),
        )
    })?;
    let own = record
        .user
        .as_deref()
        .is_some_and(|u| Some(u) == caller.principal.user())
        || record.created_by == caller.name();
    if !own {
        control.authorize(&caller, Action::AdministerFleet)?;
    }
    if record.revoked.is_none() {
        record.revoked = Some(OffsetDateTime::now_utc().unix_timestamp());
        record.revoked_by = Some(caller.name());
        let fence = control.leadership.fence()?;
        control
            .coordination
            .put_key(
                Write::put(key, record.encode()).expecting(Expect::Modified(entry.modified)),
                Some(&fence),
            )
            .await
            .map_err(|e| control.leadership.check(&fence, e))
            .map_err(ApiError::from)?;
        tracing::info!(%id, by = %caller.name(), "token revoked");
    }
    Ok(Json(record.info()))
}

/// The caller as the control plane verified it, and its roles.
#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = WhoAmI)))]
pub(crate) async fn whoami(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<WhoAmI> {
    let state = control.cache.current();
    let policy = state.policy();
    let mut roles = BTreeMap::new();
    for workspace in state
        .resources
        .keys()
        .filter(|k| k.kind == atoll_model::Kind::Workspace)
        .map(|k| k.name.as_str())
        .chain([DEFAULT_WORKSPACE])
    {
        if let Some(role) = policy.role(&caller.principal, workspace) {
            roles.insert(workspace.to_owned(), role.as_str().to_owned());
        }
    }
    let (kind, groups) = match &caller.principal {
        Principal::User { groups, .. } => ("user", groups.clone()),
        Principal::Node(_) => ("node", Vec::new()),
        Principal::Unverified(_) => ("unverified", Vec::new()),
        Principal::Anonymous => ("anonymous", Vec::new()),
    };
    Ok(Json(WhoAmI {
        name: caller.name(),
        kind: kind.to_owned(),
        groups,
        credential: caller.credential.clone(),
        roles,
        access_control: control.access.enforce,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(token: &Token) -> TokenRecord {
        TokenRecord {
            id: token.id.clone(),
            kind: "api".to_owned(),
            hash: token.hash(),
            user: Some("olga".to_owned()),
            groups: Vec::new(),
            node: None,
            description: None,
            created_by: "admin".to_owned(),
            created: 1_000,
            expires: 2_000,
            revoked: None,
            revoked_by: None,
            used: None,
            awaiting: None,
        }
    }

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(seconds).expect("a time")
    }

    #[test]
    fn a_token_is_usable_until_it_expires_or_is_revoked() {
        let token = Token::generate(TokenKind::Api);
        let mut stored = record(&token);
        assert!(stored.usable_by(&token, at(1_500)).is_ok());
        let expired = stored.usable_by(&token, at(2_000)).expect_err("expired");
        assert!(
            expired.contains("expired at 1970-01-01T00:33:20Z"),
            "{expired}"
        );
        let other = Token::generate(TokenKind::Api);
        assert!(stored.usable_by(&other, at(1_500)).is_err());
        stored.revoked = Some(1_200);
        stored.revoked_by = Some("ada".to_owned());
        let revoked = stored.usable_by(&token, at(1_500)).expect_err("revoked");
        assert!(revoked.contains("revoked by ada"), "{revoked}");
    }

    #[test]
    fn a_record_never_holds_the_secret() {
        let token = Token::generate(TokenKind::Api);
        let stored = String::from_utf8(record(&token).encode()).expect("utf-8");
        let secret = token.to_string();
        let secret = secret.rsplit('_').next().expect("a secret");
        assert!(!stored.contains(secret));
        assert!(stored.contains(&token.hash()));
    }
}
