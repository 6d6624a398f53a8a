//! The audit chain of the replica set (`atoll-audit`), kept in the
//! coordination keyspace: `audit/entries/<seq>` (20 digits) and
//! `audit/head`. Every replica appends the calls it answers; a batch puts
//! the entry (absent before) and the head (as it was read), so replicas
//! racing to append take turns and the chain has one order.
//!
//! What is recorded: every call that is not a read or a barrier, dry runs
//! included, whatever its outcome, and every refusal (401, 403), reads
//! included. A follower passes writes on to the leader, which records them;
//! the follower records only what it answers itself.

use std::time::Duration;

use atoll_api::rest::ErrorBody;
use atoll_audit::{AuditEntry, AuditHead, ChainPage};
use atoll_store::{Expect, StoreError, Write};
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::access::Caller;
use crate::control::Control;
use crate::rest::{ApiError, ApiResult, Shared};

const ENTRIES: &str = "audit/entries/";
const HEAD: &str = "audit/head";

/// How long an answer's body may be for its detail to be read. Longer
/// answers (an apply of many megabytes answers with every change) are
/// passed on whole and recorded by their status alone.
const MAX_READ: usize = 1024 * 1024;

/// The longest detail kept in an entry.
const MAX_DETAIL: usize = 2000;

fn entry_key(seq: u64) -> String {
    format!("{ENTRIES}{seq:020}")
}

/// The head this replica last wrote or read, with the revision it was
/// written at: the next append expects it unchanged, and reads it again
/// only when another replica appended since.
#[derive(Debug, Default)]
pub(crate) struct ChainHead(Mutex<Option<(AuditHead, i64)>>);

/// What one call was, for its entry.
pub(crate) struct Call<'a> {
    pub(crate) caller: &'a Caller,
    pub(crate) method: &'a Method,
    pub(crate) path: &'a str,
    pub(crate) status: StatusCode,
    pub(crate) outcome: String,
    pub(crate) detail: String,
}

fn truncated(mut text: String) -> String {
    if text.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl Control {
    async fn read_head(&self) -> Result<Option<(AuditHead, i64)>, StoreError> {
        let Some(entry) = self.coordination.get_key(HEAD).await? else {
            return Ok(None);
        };
        let head: AuditHead = serde_json::from_slice(&entry.value).map_err(|e| {
            StoreError::Invalid(format!("the audit chain's head does not parse: {e}"))
        })?;
        Ok(Some((head, entry.modified)))
    }

    /// Appends one entry to the chain; a failure is logged and counted,
    /// never returned: the call it records has happened.
    pub(crate) async fn record(&self, call: Call<'_>) {
        let entry = AuditEntry {
            v: atoll_audit::VERSION,
            seq: 0,
            prev: String::new(),
            time: crate::nodes::rfc3339(time::OffsetDateTime::now_utc()),
            replica: self.leadership.advertise().to_owned(),
            caller: call.caller.name(),
            credential: call.caller.credential.clone(),
            remote: call.caller.remote.map(|r| r.to_string()),
            method: call.method.to_string(),
            path: call.path.to_owned(),
            status: call.status.as_u16(),
            outcome: call.outcome,
            detail: truncated(call.detail),
            hash: String::new(),
        };
        let mut last_error = None;
        for attempt in 0..20u32 {
            let known = self.audit_head.0.lock().clone();
            let known = match known {
                Some(known) => Some(known),
                None => match self.read_head().await {
                    Ok(head) => head,
                    Err(error) => {
                        last_error = Some(error);
                        break;
                    }
                },
            };
            let sealed = entry.clone().seal(known.as_ref().map(|(h, _)| h));
            let head = sealed.head();
            let writes = vec![
                Write::put(
                    entry_key(sealed.seq),
                    serde_json::to_vec(&sealed).unwrap_or_default(),
                )
                .expecting(Expect::Absent),
                Write::put(HEAD, serde_json::to_vec(&head).unwrap_or_default()).expecting(
                    match &known {
                        Some((_, modified)) => Expect::Modified(*modified),
                        None => Expect::Absent,
                    },
                ),
            ];
            match self.coordination.write_keys(writes, None).await {
                Ok(revision) => {
                    *self.audit_head.0.lock() = Some((head, revision));
                    return;
                }
                Err(StoreError::KeyConflict { .. }) => {
                    // Another replica appended: read the head again.
                    *self.audit_head.0.lock() = None;
                    if attempt > 2 {
                        tokio::time::sleep(Duration::from_millis(
                            u64::from(attempt) * 5 + fastrand::u64(0..10),
                        ))
                        .await;
                    }
                }
                Err(error) => {
                    *self.audit_head.0.lock() = None;
                    last_error = Some(error);
                    break;
                }
            }
        }
        self.metrics.audit_failures.inc();
        tracing::error!(
            caller = %entry.caller,
            method = %entry.method,
            path = %entry.path,
            status = entry.status,
            error = %last_error.map_or_else(|| "other replicas kept appending first".to_owned(), |e| e.to_string()),
            "cannot append to the audit chain; the call is not recorded there"
        );
    }
}

/// Whether a call is recorded whatever its outcome: everything but reads
/// and barriers.
fn changes_or_could(method: &Method, path: &str) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) && path != "/v1/barrier"
}

/// What an answer says about what happened: the revision and changes of an
/// apply, a switchover's name, a token's id; an error's code and message.
fn outcome_of(status: StatusCode, body: &[u8]) -> (String, String) {
    if !status.is_success() {
        return match serde_json::from_slice::<ErrorBody>(body) {
            Ok(error) => (
                serde_json::to_value(error.error)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| status.as_u16().to_string()),
                error.message,
            ),
            Err(_) => (status.as_u16().to_string(), String::new()),
        };
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ("ok".to_owned(), String::new());
    };
    // Stored for a second person's approval (202), or an approval decided.
    if status == StatusCode::ACCEPTED
        && let Some(id) = value["approval"]["id"].as_str()
    {
        return (
            "awaiting approval".to_owned(),
            format!(
                "approval {id}: {}",
                value["approval"]["summary"].as_str().unwrap_or_default()
            ),
        );
    }
    if let (Some(id), Some(state)) = (value["id"].as_str(), value["state"].as_str())
        && id.starts_with("apr-")
    {
        return (
            "ok".to_owned(),
            format!(
                "approval {id} {state}: {}{}",
                value["summary"].as_str().unwrap_or_default(),
                value["result"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        );
    }
    let mut parts = Vec::new();
    if value["dryRun"].as_bool() == Some(true) {
        parts.push("dry run".to_owned());
    }
    if let Some(revision) = value["revision"].as_u64() {
        parts.push(format!("revision {revision}"));
    }
    if let Some(changes) = value["changes"].as_array() {
        let changed: Vec<String> = changes
            .iter()
            .filter(|c| c["action"].as_str() != Some("unchanged"))
            .map(|c| {
                let workspace = c["workspace"]
                    .as_str()
                    .filter(|w| !w.is_empty() && *w != atoll_model::DEFAULT_WORKSPACE)
                    .map(|w| format!("@{w}"))
                    .unwrap_or_default();
                format!(
                    "{} {}/{}{workspace}",
                    c["action"].as_str().unwrap_or("changed"),
                    c["kind"].as_str().unwrap_or("?"),
                    c["name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        parts.push(if changed.is_empty() {
            "nothing changed".to_owned()
        } else {
            changed.join(", ")
        });
    }
    // A switchover (its plan, or the resource).
    if let Some(name) = value["name"]
        .as_str()
        .or_else(|| value["metadata"]["name"].as_str())
        && value.get("changes").is_none()
    {
        parts.push(name.to_owned());
    }
    // A certificate issued: whose, and its serial.
    if let (Some(identity), Some(serial)) = (value["identity"].as_str(), value["serial"].as_str()) {
        parts.push(format!("issued {identity} (serial {serial})"));
    }
    // A token: its id only (the answer also holds its secret).
    if let Some(id) = value["info"]["id"].as_str().or_else(|| {
        value["kind"]
            .as_str()
            .filter(|k| *k == "api" || *k == "bootstrap")
            .and(value["id"].as_str())
    }) {
        parts.push(format!("token {id}"));
    }
    ("ok".to_owned(), parts.join(": "))
}

/// Records the calls this replica answers (see the module's doc).
pub(crate) async fn record_calls(
    State(control): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let caller = request.extensions().get::<Caller>().cloned();
    let response = next.run(request).await;
    let status = response.status();
    let passed_on = response.headers().contains_key(crate::rest::SERVED_BY);
    let refused = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
    let Some(caller) = caller else {
        return response;
    };
    if passed_on || !(refused || changes_or_could(&method, request_path(&path))) {
        return response;
    }
    let (parts, body) = response.into_parts();
    // The answer is already in memory (a JSON body): reading it whole costs
    // nothing more, and it must reach the caller whole whatever its length.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::error!(%error, %path, "could not read an answer to record it");
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                atoll_api::rest::ErrorCode::Internal,
                format!("the answer could not be read: {error}"),
            )
            .into_response();
        }
    };
    let (outcome, detail) = if bytes.len() <= MAX_READ {
        outcome_of(status, &bytes)
    } else {
        (
            status.as_u16().to_string(),
            format!("(answer of {} bytes, not read)", bytes.len()),
        )
    };
    let body = Body::from(bytes);
    control
        .record(Call {
            caller: &caller,
            method: &method,
            path: &path,
            status,
            outcome,
            detail,
        })
        .await;
    Response::from_parts(parts, body)
}

fn request_path(path_and_query: &str) -> &str {
    path_and_query.split('?').next().unwrap_or(path_and_query)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ChainQuery {
    /// Entries after this one (default 0: from the first).
    #[serde(default)]
    after: u64,
    /// At most this many (default 500, at most 5000).
    limit: Option<usize>,
}

/// The audit chain, in stored order, with its head: verify it with
/// `atoll audit verify`.
#[utoipa::path(get, path = "/v1/audit/chain", params(ChainQuery),
    responses((status = 200, body = ChainPage), (status = 403, body = ErrorBody)))]
pub(crate) async fn chain(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ChainQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<ChainPage> {
    control.authorize(&caller, atoll_access::Action::ReadFleet)?;
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(500).clamp(1, 5000);
    // The head first: entries appended meanwhile are past it, and the
    // verifier stops at the head it was given.
    let head = control.read_head().await?.map(|(h, _)| h);
    let listing = control.coordination.list_keys(ENTRIES).await?;
    let mut entries = Vec::new();
    let mut next = None;
    let mut last_position = 0;
    for entry in listing.entries {
        let position = entry
            .key
            .strip_prefix(ENTRIES)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if position <= query.after {
            continue;
        }
        if head.as_ref().is_some_and(|h| position > h.seq) {
            break;
        }
        if entries.len() == limit {
            next = Some(last_position);
            break;
        }
        last_position = position;
        match serde_json::from_slice::<AuditEntry>(&entry.value) {
            Ok(parsed) => entries.push(parsed),
            Err(error) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    atoll_api::rest::ErrorCode::Invalid,
                    format!(
                        "audit entry {position} does not parse ({error}): it was edited outside Atoll"
                    ),
                ));
            }
        }
    }
    Ok(Json(ChainPage {
        head,
        entries,
        next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_says_what_changed_and_never_a_secret() {
        let apply = br#"{"revision": 7, "dryRun": false, "changes": [
            {"kind": "Cell", "name": "rz01", "action": "created"},
            {"kind": "Zone", "name": "hz-a", "action": "unchanged"},
            {"kind": "Cell", "name": "pay01", "workspace": "payments", "action": "configured"}]}"#;
        assert_eq!(
            outcome_of(StatusCode::OK, apply),
            (
                "ok".to_owned(),
                "revision 7: created Cell/rz01, configured Cell/pay01@payments".to_owned()
            )
        );
        let token = br#"{"token": "atk_0123456789abcdef_secret", "info": {"id": "0123456789abcdef", "kind": "api"}}"#;
        let (_, detail) = outcome_of(StatusCode::OK, token);
        assert_eq!(detail, "token 0123456789abcdef");
        let refused = br#"{"status": 403, "error": "forbidden", "message": "olga may not"}"#;
        assert_eq!(
            outcome_of(StatusCode::FORBIDDEN, refused),
            ("forbidden".to_owned(), "olga may not".to_owned())
        );
    }

    #[test]
    fn details_are_cut_on_a_character() {
        let long = "é".repeat(MAX_DETAIL);
        let cut = truncated(long);
        assert!(cut.len() <= MAX_DETAIL + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn entry_keys_sort_by_seq() {
        assert!(entry_key(9) < entry_key(10));
        assert_eq!(entry_key(12), "audit/entries/00000000000000000012");
    }
}
