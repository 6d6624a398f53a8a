//! Two-person approvals (docs/design/identity-and-access.md, "Two-person
//! approvals"; docs/security.md#approvals).
//!
//! A Workspace's `approvals` rules name the operations that need a second
//! person. A call that would do one is checked as if it would act, then
//! stored as an approval request (`approvals/<id>` in the coordination
//! keyspace, durable on both backends) and answered 202. Someone else who
//! holds the role the operation needs approves it, and it runs then, as the
//! requester, "approved by" the approver; the requester cannot approve
//! their own. A held request (`hold`) does not run on approval: the
//! requester starts it later, naming it, once.

use std::time::Duration;

use atoll_access::{Action, Principal};
use atoll_api::rest::{
    ApprovalDecision, ApprovalInfo, ApprovalList, ApprovalPending, ErrorCode, SwitchoverRequest,
};
use atoll_model::{ApprovalRule, DEFAULT_WORKSPACE, ResourceKey};
use atoll_store::{Entry, Expect, Write};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::access::Caller;
use crate::control::Control;
use crate::nodes::rfc3339;
use crate::rest::{ApiError, ApiResult, Shared};
use crate::writer::Author;

/// Where approval requests live in the coordination keyspace.
const PREFIX: &str = "approvals/";
/// How long a request waits for its second person.
pub(crate) const PENDING_TTL: Duration = Duration::from_secs(3600);
/// How long a held request may wait and, once approved, be used: a change
/// window later in the day.
pub(crate) const HELD_TTL: Duration = Duration::from_secs(24 * 3600);

fn key_of(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// What an approved request does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub(crate) enum Operation {
    /// `POST /v1/switchovers` as it was asked.
    StartSwitchover { request: SwitchoverRequest },
    /// `POST /v1/switchovers/{name}/approve` of a failover.
    ApproveFailover { switchover: String },
    /// `POST /v1/resources/shardmaps/{name}/rollback`.
    Rollback {
        key: ResourceKey,
        revision: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A token made unusable until approved: approval makes it usable.
    /// `fleet`: one only the fleet's admins may make (an API token for
    /// someone else, a control plane's bootstrap token); else a bootstrap
    /// token of `workspace`'s admins.
    Token { id: String, fleet: bool },
}

/// Who asked, as their credential said then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Requester {
    name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    /// A name claimed on a control plane without access control.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    unverified: bool,
}

impl Requester {
    fn of(principal: &Principal) -> Option<Self> {
        match principal {
            Principal::User { name, groups } => Some(Self {
                name: name.clone(),
                groups: groups.clone(),
                unverified: false,
            }),
            Principal::Unverified(name) => Some(Self {
                name: name.clone(),
                groups: Vec::new(),
                unverified: true,
            }),
            Principal::Node(_) | Principal::Anonymous => None,
        }
    }

    fn principal(&self) -> Principal {
        if self.unverified {
            Principal::Unverified(self.name.clone())
        } else {
            Principal::User {
                name: self.name.clone(),
                groups: self.groups.clone(),
            }
        }
    }

    /// Whether `principal` is this person (by user name: two tokens of one
    /// user are one person).
    fn is(&self, principal: &Principal) -> bool {
        principal.user() == Some(self.name.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Decision {
    Pending,
    Approved,
    Rejected,
    Failed,
}

/// A stored approval request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ApprovalRecord {
    id: String,
    workspace: String,
    rule: ApprovalRule,
    summary: String,
    operation: Operation,
    requester: Requester,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Unix seconds.
    created: i64,
    expires: i64,
    state: Decision,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    hold: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decided: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<String>,
    /// A held request: when its requester used it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used: Option<i64>,
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn time_text(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map(rfc3339)
        .unwrap_or_else(|_| seconds.to_string())
}

fn internal(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        message,
    )
}

fn conflict(message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
}

impl ApprovalRecord {
    fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The state as a reader sees it now: a pending request past its
    /// expiry is expired.
    fn state_at(&self, now: i64) -> &'static str {
        match self.state {
            Decision::Pending if now >= self.expires => "expired",
            Decision::Pending => "pending",
            Decision::Approved => "approved",
            Decision::Rejected => "rejected",
            Decision::Failed => "failed",
        }
    }

    fn info(&self) -> ApprovalInfo {
        ApprovalInfo {
            id: self.id.clone(),
            workspace: self.workspace.clone(),
            operation: self.rule.as_str().to_owned(),
            summary: self.summary.clone(),
            requested_by: self.requester.principal().name(),
            reason: self.reason.clone(),
            created: time_text(self.created),
            expires: time_text(self.expires),
            state: self.state_at(now()).to_owned(),
            hold: self.hold,
            decided_by: self.decided_by.clone(),
            decided: self.decided.map(time_text),
            comment: self.comment.clone(),
            result: self.result.clone(),
        }
    }

    /// What the requester must still be allowed when it runs (and what the
    /// approver must be allowed, for a token: the same authority).
    fn requester_action(&self) -> Action<'_> {
        match &self.operation {
            Operation::StartSwitchover { .. } => Action::Switchover(&self.workspace),
            Operation::ApproveFailover { .. } => Action::Approve(&self.workspace),
            Operation::Rollback { key, .. } => Action::Rollback(key),
            Operation::Token { fleet: true, .. } => Action::AdministerFleet,
            Operation::Token { fleet: false, .. } => Action::BootstrapToken(&self.workspace),
        }
    }

    fn approver_action(&self) -> Action<'_> {
        match &self.operation {
            Operation::Token { .. } => self.requester_action(),
            _ => Action::Approve(&self.workspace),
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    fn pending_at(&self, now: i64) -> bool {
        self.state == Decision::Pending && now < self.expires
    }
}

/// What a guarded call asks for, before it is stored.
pub(crate) struct Ask {
    pub(crate) workspace: String,
    pub(crate) rule: ApprovalRule,
    pub(crate) summary: String,
    pub(crate) operation: Operation,
    pub(crate) reason: Option<String>,
    pub(crate) hold: bool,
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/approvals", axum::routing::get(list_approvals))
        .route("/v1/approvals/{id}", axum::routing::get(get_approval))
        .route(
            "/v1/approvals/{id}/approve",
            axum::routing::post(approve_approval),
        )
        .route(
            "/v1/approvals/{id}/reject",
            axum::routing::post(reject_approval),
        )
}

/// A new request's id: `apr-` and 12 hex digits.
fn new_id() -> String {
    format!("apr-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

impl Control {
    /// Whether `rule` needs a second person in `workspace` now.
    pub(crate) fn needs_approval(&self, workspace: &str, rule: ApprovalRule) -> bool {
        self.cache
            .current()
            .policy()
            .needs_approval(workspace, rule)
    }

    /// Stores the request of `ask` for `caller` and returns the 202 answer.
    pub(crate) async fn ask_approval(
        &self,
        caller: &Caller,
        ask: Ask,
        token: Option<String>,
    ) -> Result<Response, ApiError> {
        let record = self.new_request(caller, ask)?;
        self.store_new(&record).await?;
        Ok(pending_answer(&record, token))
    }

    /// The record of a new request (not stored yet).
    pub(crate) fn new_request(
        &self,
        caller: &Caller,
        ask: Ask,
    ) -> Result<ApprovalRecord, ApiError> {
        let requester = Requester::of(&caller.principal).ok_or_else(|| {
            forbidden(format!(
                "{} may not ask for approvals; a person or a program with an API token does",
                caller.principal
            ))
        })?;
        let created = now();
        let ttl = if ask.hold { HELD_TTL } else { PENDING_TTL };
        Ok(ApprovalRecord {
            id: new_id(),
            workspace: ask.workspace,
            rule: ask.rule,
            summary: ask.summary,
            operation: ask.operation,
            requester,
            reason: ask.reason,
            created,
            expires: created + i64::try_from(ttl.as_secs()).unwrap_or(3600),
            state: Decision::Pending,
            hold: ask.hold,
            decided_by: None,
            decided: None,
            comment: None,
            result: None,
            used: None,
        })
    }

    /// Stores a new request.
    pub(crate) async fn store_new(&self, record: &ApprovalRecord) -> Result<(), ApiError> {
        let fence = self.leadership.fence()?;
        self.coordination
            .put_key(record.creation(), Some(&fence))
            .await
            .map_err(|e| self.leadership.check(&fence, e))
            .map_err(ApiError::from)?;
        tracing::info!(
            id = %record.id,
            rule = record.rule.as_str(),
            workspace = %record.workspace,
            by = %record.requester.name,
            summary = %record.summary,
            "approval requested"
        );
        Ok(())
    }

    async fn read_request(&self, id: &str) -> Result<(ApprovalRecord, Entry), ApiError> {
        let entry = self
            .coordination
            .get_key(&key_of(id))
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no approval request has id `{id}`; `atoll approval list` shows them"
                ))
            })?;
        let record = ApprovalRecord::decode(&entry.value)
            .map_err(|e| internal(format!("the record of approval {id} does not parse: {e}")))?;
        Ok((record, entry))
    }

    async fn requests(&self) -> Result<Vec<ApprovalRecord>, ApiError> {
        let listing = self
            .coordination
            .list_keys(PREFIX)
            .await
            .map_err(ApiError::from)?;
        let mut records = Vec::new();
        for entry in listing.entries {
            match ApprovalRecord::decode(&entry.value) {
                Ok(record) => records.push(record),
                Err(error) => {
                    tracing::warn!(key = %entry.key, %error, "an approval record does not parse");
                }
            }
        }
        Ok(records)
    }

    /// Writes `record` over the version read at `modified`; `Ok(false)`
    /// when someone else changed it first.
    async fn replace(&self, record: &ApprovalRecord, modified: i64) -> Result<bool, ApiError> {
        let fence = self.leadership.fence()?;
        match self
            .coordination
            .put_key(
                Write::put(key_of(&record.id), record.encode())
                    .expecting(Expect::Modified(modified)),
                Some(&fence),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(atoll_store::StoreError::KeyConflict { .. }) => Ok(false),
            Err(e) => Err(self.leadership.check(&fence, e).into()),
        }
    }

    /// A refusal of the approval rules: logged and counted like the
    /// policy's own.
    fn refuse(&self, caller: &Caller, message: String) -> ApiError {
        tracing::info!(caller = %caller.name(), credential = %caller.credential, remote = ?caller.remote, reason = %message, "refused");
        self.metrics.refused.inc();
        forbidden(message)
    }

    /// The pending request of a failover approval, if someone asked.
    async fn pending_failover(&self, name: &str) -> Result<Option<ApprovalRecord>, ApiError> {
        let now = now();
        Ok(self.requests().await?.into_iter().find(|r| {
            r.pending_at(now)
                && matches!(&r.operation, Operation::ApproveFailover { switchover } if switchover == name)
        }))
    }

    /// `approve` of a failover where failovers need two people: the first
    /// person's call asks, a second person's approves that request.
    pub(crate) async fn approve_failover_by_two(
        &self,
        caller: &Caller,
        name: &str,
        ask: Ask,
    ) -> Result<Response, ApiError> {
        match self.pending_failover(name).await? {
            Some(request) => {
                let info = self.approve(caller, &request.id, None).await?;
                Ok(Json(info).into_response())
            }
            None => self.ask_approval(caller, ask, None).await,
        }
    }

    /// Approves request `id` as `caller` and runs it (unless held).
    pub(crate) async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        comment: Option<String>,
    ) -> Result<ApprovalInfo, ApiError> {
        let (mut record, entry) = self.read_request(id).await?;
        let now = now();
        if !record.pending_at(now) {
            return Err(conflict(format!(
                "approval {id} is {}{}; nothing to approve (ask again if it is still needed)",
                record.state_at(now),
                record
                    .decided_by
                    .as_deref()
                    .map(|by| format!(" (by {by})"))
                    .unwrap_or_default()
            )));
        }
        if record.requester.is(&caller.principal) {
            return Err(self.refuse(
                caller,
                format!(
                    "{} asked for approval {id} ({}) and cannot approve it: a second person must, someone else who may {}",
                    record.requester.name,
                    record.summary,
                    record.approver_action()
                ),
            ));
        }
        self.authorize(caller, record.approver_action())?;
        // The requester's right is decided again, with today's bindings.
        let still = self
            .cache
            .current()
            .policy()
            .decide(&record.requester.principal(), record.requester_action());
        if let Err(denied) = still {
            record.state = Decision::Failed;
            record.decided_by = Some(caller.name());
            record.decided = Some(now);
            record.result = Some(format!(
                "not run: the requester no longer may: {}",
                denied.message
            ));
            self.replace(&record, entry.modified).await?;
            return Err(forbidden(format!(
                "approval {id} cannot run: its requester no longer may: {}",
                denied.message
            )));
        }
        record.state = Decision::Approved;
        record.decided_by = Some(caller.name());
        record.decided = Some(now);
        record.comment = comment;
        if record.hold {
            record.result = Some(format!(
                "held for {} to start until {}",
                record.requester.name,
                time_text(record.expires)
            ));
        }
        // Marked approved first, so that two approvers cannot both run it.
        if !self.replace(&record, entry.modified).await? {
            return Err(conflict(format!(
                "approval {id} was decided by someone else meanwhile; `atoll approval show {id}` says how"
            )));
        }
        tracing::info!(%id, by = %caller.name(), summary = %record.summary, "approval granted");
        if record.hold {
            return Ok(record.info());
        }
        let author = Author::user(
            format!("{}, approved by {}", record.requester.name, caller.name()),
            record.reason.clone(),
        );
        let outcome = self.run(&record.operation, &author).await;
        let (mut record, _) = self.reread(id).await?;
        let answer = match outcome {
            Ok(result) => {
                record.result = Some(result);
                Ok(())
            }
            Err(error) => {
                record.state = Decision::Failed;
                record.result = Some(format!("failed: {}", error.message()));
                Err(error)
            }
        };
        self.overwrite(&record).await;
        match answer {
            Ok(()) => Ok(record.info()),
            Err(error) => Err(ApiError::new(
                error.status(),
                error.code(),
                format!(
                    "approval {id} was granted but the operation failed: {}; the request is closed, ask again once that is fixed",
                    error.message()
                ),
            )),
        }
    }

    async fn reread(&self, id: &str) -> Result<(ApprovalRecord, i64), ApiError> {
        let (record, entry) = self.read_request(id).await?;
        Ok((record, entry.modified))
    }

    /// Records what an approved request did; only its runner writes it now.
    async fn overwrite(&self, record: &ApprovalRecord) {
        let written = match self.leadership.fence() {
            Ok(fence) => self
                .coordination
                .put_key(
                    Write::put(key_of(&record.id), record.encode()),
                    Some(&fence),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(error) = written {
            tracing::warn!(id = %record.id, %error, "cannot record what an approved request did");
        }
    }

    /// Runs an approved operation; the sentence for its record.
    async fn run(&self, operation: &Operation, author: &Author) -> Result<String, ApiError> {
        match operation {
            Operation::StartSwitchover { request } => {
                let request = SwitchoverRequest {
                    dry_run: false,
                    hold: false,
                    approval: None,
                    ..request.clone()
                };
                let switchovers = self.leading()?.switchovers.clone();
                let plan = switchovers.start(request, author).await?;
                Ok(format!("started switchover/{}", plan.name))
            }
            Operation::ApproveFailover { switchover } => {
                let switchovers = self.leading()?.switchovers.clone();
                switchovers.approve(switchover, author).await?;
                Ok(format!("failover switchover/{switchover} may run"))
            }
            Operation::Rollback {
                key,
                revision,
                message,
            } => {
                let author = Author::user(author.name().to_owned(), message.clone());
                let applied = self.writer.rollback(key, *revision, false, &author).await?;
                Ok(format!(
                    "rolled {key} back to the content of revision {revision}: revision {}",
                    applied.revision
                ))
            }
            Operation::Token { id, .. } => {
                self.activate_token(id).await?;
                Ok(format!("token {id} may be used"))
            }
        }
    }

    /// Rejects (or, by its requester, withdraws) request `id`.
    async fn reject(
        &self,
        caller: &Caller,
        id: &str,
        comment: Option<String>,
    ) -> Result<ApprovalInfo, ApiError> {
        let (mut record, entry) = self.read_request(id).await?;
        let now = now();
        if !record.pending_at(now) {
            return Err(conflict(format!(
                "approval {id} is {}; only a pending request can be rejected",
                record.state_at(now)
            )));
        }
        if !record.requester.is(&caller.principal) {
            self.authorize(caller, record.approver_action())?;
        }
        record.state = Decision::Rejected;
        record.decided_by = Some(caller.name());
        record.decided = Some(now);
        record.comment = comment;
        if !self.replace(&record, entry.modified).await? {
            return Err(conflict(format!(
                "approval {id} was decided by someone else meanwhile; `atoll approval show {id}` says how"
            )));
        }
        if let Operation::Token { id: token, .. } = &record.operation
            && let Err(error) = self.revoke_unapproved(token, &caller.name()).await
        {
            tracing::warn!(%token, error = %error.message(), "cannot revoke the token of a rejected approval");
        }
        tracing::info!(%id, by = %caller.name(), "approval rejected");
        Ok(record.info())
    }

    /// A held switchover approval for `request`, checked (and, `consume`,
    /// used up): approved, for this very switchover, by a second person,
    /// for this caller, not used, not expired.
    pub(crate) async fn use_held(
        &self,
        caller: &Caller,
        id: &str,
        request: &SwitchoverRequest,
        consume: bool,
    ) -> Result<(), ApiError> {
        let (mut record, entry) = self.read_request(id).await?;
        let now = now();
        let Operation::StartSwitchover { request: asked } = &record.operation else {
            return Err(ApiError::bad_request(format!(
                "approval {id} is for {}, not for starting a switchover",
                record.summary
            )));
        };
        if !record.hold {
            return Err(ApiError::bad_request(format!(
                "approval {id} is not a held one: it ran when it was approved ({})",
                record
                    .result
                    .as_deref()
                    .unwrap_or("see `atoll approval show`")
            )));
        }
        if !record.requester.is(&caller.principal) {
            return Err(self.refuse(
                caller,
                format!(
                    "approval {id} was asked by {} and only they may use it",
                    record.requester.name
                ),
            ));
        }
        if !asked.same_moves(request) {
            return Err(ApiError::bad_request(format!(
                "approval {id} covers {}, not this switchover; ask for an approval of this one",
                record.summary
            )));
        }
        if record.state != Decision::Approved {
            return Err(conflict(format!(
                "approval {id} is {}: a second person must approve it first (`atoll approval approve {id}`)",
                record.state_at(now)
            )));
        }
        if let Some(used) = record.used {
            return Err(conflict(format!(
                "approval {id} was used at {}; each starts one switchover",
                time_text(used)
            )));
        }
        if now >= record.expires {
            return Err(conflict(format!(
                "approval {id} expired at {}; ask again",
                time_text(record.expires)
            )));
        }
        if !consume {
            return Ok(());
        }
        record.used = Some(now);
        record.result = Some(format!("used by {} at {}", caller.name(), time_text(now)));
        if !self.replace(&record, entry.modified).await? {
            return Err(conflict(format!(
                "approval {id} changed meanwhile (used by another call?); `atoll approval show {id}`"
            )));
        }
        Ok(())
    }
}

impl Control {
    /// Gives a held approval back when the switchover it was used for did
    /// not start.
    pub(crate) async fn release_held(&self, id: &str) {
        let Ok((mut record, entry)) = self.read_request(id).await else {
            return;
        };
        record.used = None;
        record.result = Some(format!(
            "held for {} to start until {}",
            record.requester.name,
            time_text(record.expires)
        ));
        if let Err(error) = self.replace(&record, entry.modified).await {
            tracing::warn!(%id, error = %error.message(), "cannot give a held approval back");
        }
    }
}

impl ApprovalRecord {
    /// The write that stores this new request.
    pub(crate) fn creation(&self) -> Write {
        Write::put(key_of(&self.id), self.encode()).expecting(Expect::Absent)
    }
}

/// The 202 answer for a stored request.
pub(crate) fn pending_answer(record: &ApprovalRecord, token: Option<String>) -> Response {
    let next = if record.hold {
        format!(
            "once approved, start it with `--approval {}` before {}",
            record.id,
            time_text(record.expires)
        )
    } else {
        "it runs when approved".to_owned()
    };
    let message = format!(
        "{} needs a second person's approval in workspace {}: approval {} is pending; someone else who may approve there runs `atoll approval approve {}` ({next})",
        record.summary, record.workspace, record.id, record.id
    );
    (
        StatusCode::ACCEPTED,
        Json(ApprovalPending {
            message,
            approval: record.info(),
            token,
        }),
    )
        .into_response()
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ApprovalQuery {
    /// Only requests in this state (`pending`, `approved`, `rejected`,
    /// `expired`, `failed`).
    state: Option<String>,
}

/// Approval requests the caller may see (of workspaces they read, and
/// their own), newest first.
#[utoipa::path(get, path = "/v1/approvals", params(ApprovalQuery),
    responses((status = 200, body = ApprovalList), (status = 401, body = atoll_api::rest::ErrorBody)))]
pub(crate) async fn list_approvals(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ApprovalQuery>, QueryRejection>,
) -> ApiResult<ApprovalList> {
    control.authorize(&caller, Action::Observe)?;
    let Query(query) = query?;
    if let Some(state) = &query.state
        && !["pending", "approved", "rejected", "expired", "failed"].contains(&state.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "state `{state}` is not one of pending, approved, rejected, expired, failed"
        )));
    }
    let now = now();
    let mut records: Vec<ApprovalRecord> = control
        .requests()
        .await?
        .into_iter()
        .filter(|r| {
            r.requester.is(&caller.principal) || control.may_read(&caller, Some(&r.workspace))
        })
        .filter(|r| query.state.as_deref().is_none_or(|s| r.state_at(now) == s))
        .collect();
    records.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    Ok(Json(ApprovalList {
        approvals: records.iter().map(ApprovalRecord::info).collect(),
    }))
}

/// One approval request.
#[utoipa::path(get, path = "/v1/approvals/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ApprovalInfo), (status = 404, body = atoll_api::rest::ErrorBody)))]
pub(crate) async fn get_approval(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<ApprovalInfo> {
    let (record, _) = control.read_request(&id).await?;
    if !record.requester.is(&caller.principal) {
        control.authorize(&caller, Action::Read(Some(&record.workspace)))?;
    }
    Ok(Json(record.info()))
}

fn decision(
    body: Result<Json<ApprovalDecision>, JsonRejection>,
) -> Result<Option<String>, ApiError> {
    // An empty body is a decision without a comment.
    let comment = match body {
        Ok(Json(decision)) => decision.comment,
        Err(JsonRejection::MissingJsonContentType(_)) => None,
        Err(rejection) => return Err(rejection.into()),
    };
    if let Some(comment) = &comment
        && (comment.len() > 512 || comment.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "comment is at most 512 printable characters on one line",
        ));
    }
    Ok(comment)
}

/// Approves a request and runs it (a held one: lets its requester start
/// it). The requester cannot approve their own.
#[utoipa::path(post, path = "/v1/approvals/{id}/approve", params(("id" = String, Path)),
    request_body = ApprovalDecision,
    responses((status = 200, body = ApprovalInfo), (status = 403, body = atoll_api::rest::ErrorBody, description = "The requester, or no role to approve"),
        (status = 404, body = atoll_api::rest::ErrorBody), (status = 409, body = atoll_api::rest::ErrorBody, description = "Not pending")))]
pub(crate) async fn approve_approval(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<ApprovalDecision>, JsonRejection>,
) -> ApiResult<ApprovalInfo> {
    let comment = decision(body)?;
    Ok(Json(control.approve(&caller, &id, comment).await?))
}

/// Rejects a pending request; its requester may withdraw it.
#[utoipa::path(post, path = "/v1/approvals/{id}/reject", params(("id" = String, Path)),
    request_body = ApprovalDecision,
    responses((status = 200, body = ApprovalInfo), (status = 403, body = atoll_api::rest::ErrorBody),
        (status = 404, body = atoll_api::rest::ErrorBody), (status = 409, body = atoll_api::rest::ErrorBody, description = "Not pending")))]
pub(crate) async fn reject_approval(
    State(control): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<ApprovalDecision>, JsonRejection>,
) -> ApiResult<ApprovalInfo> {
    let comment = decision(body)?;
    Ok(Json(control.reject(&caller, &id, comment).await?))
}

/// The workspace whose rule guards a token request (`None`: unguarded, a
/// token for oneself with no more than one's groups).
pub(crate) fn token_workspace(fleet: bool, workspace: Option<&str>) -> String {
    if fleet {
        DEFAULT_WORKSPACE.to_owned()
    } else {
        workspace.unwrap_or(DEFAULT_WORKSPACE).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: Decision, expires: i64) -> ApprovalRecord {
        ApprovalRecord {
            id: "apr-000000000001".to_owned(),
            workspace: "default".to_owned(),
            rule: ApprovalRule::Switchover,
            summary: "a switchover".to_owned(),
            operation: Operation::StartSwitchover {
                request: SwitchoverRequest::default(),
            },
            requester: Requester {
                name: "alice".to_owned(),
                groups: vec!["ops".to_owned()],
                unverified: false,
            },
            reason: None,
            created: 1_000,
            expires,
            state,
            hold: false,
            decided_by: None,
            decided: None,
            comment: None,
            result: None,
            used: None,
        }
    }

    #[test]
    fn a_pending_request_reads_as_expired_past_its_expiry() {
        let pending = record(Decision::Pending, 2_000);
        assert_eq!(pending.state_at(1_999), "pending");
        assert!(pending.pending_at(1_999));
        assert_eq!(pending.state_at(2_000), "expired");
        assert!(!pending.pending_at(2_000));
        // Decided requests keep their state.
        assert_eq!(
            record(Decision::Approved, 2_000).state_at(5_000),
            "approved"
        );
    }

    #[test]
    fn the_requester_is_the_same_user_whatever_their_token() {
        let asked = record(Decision::Pending, 2_000);
        let same = Principal::User {
            name: "alice".to_owned(),
            groups: Vec::new(),
        };
        let other = Principal::User {
            name: "bob".to_owned(),
            groups: vec!["ops".to_owned()],
        };
        assert!(asked.requester.is(&same));
        assert!(!asked.requester.is(&other));
        assert!(!asked.requester.is(&Principal::Anonymous));
        // Unverified names (no access control) are compared as claimed.
        assert!(
            asked
                .requester
                .is(&Principal::Unverified("alice".to_owned()))
        );
    }

    #[test]
    fn a_record_reads_back_as_it_was_stored() {
        let mut stored = record(Decision::Pending, 2_000);
        stored.operation = Operation::Rollback {
            key: ResourceKey::in_workspace(atoll_model::Kind::ShardMap, "default", "bank"),
            revision: 7,
            message: Some("bad edit".to_owned()),
        };
        let back = ApprovalRecord::decode(&stored.encode()).expect("it parses");
        assert_eq!(back, stored);
    }
}
