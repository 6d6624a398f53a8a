//! JSON bodies of the REST API (`/v1/...`). Field names are camelCase.
//! `docs/api.md` describes every endpoint; the server also serves an OpenAPI
//! document at `/openapi.json`.

use atoll_model::Issue;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A manifest file sent for apply: its name (for error messages) and text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestFile {
    /// The file name as the user knows it; errors name it.
    pub source: String,
    /// Multi-document YAML (JSON is YAML too).
    pub content: String,
}

/// A resource named by kind and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRef {
    /// Any spelling `atoll get` takes: `cell`, `cells`, `Cell`.
    pub kind: String,
    /// The resource name.
    pub name: String,
    /// Its workspace (default: the request's, else `default`; ignored for
    /// the fleet's kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Only if the resource is still at this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
}

/// `POST /v1/apply`: create or replace resources and delete others, all in
/// one revision, or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplyRequest {
    /// Manifests to create or replace.
    #[serde(default)]
    pub manifests: Vec<ManifestFile>,
    /// Resources to delete in the same revision.
    #[serde(default)]
    pub delete: Vec<ResourceRef>,
    /// Validate and diff only; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Why: kept in the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The workspace of every manifest and delete that names none
    /// (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
}

/// What an apply did (or, for a dry run, would do) to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeAction {
    /// It did not exist.
    Created,
    /// Its content changed.
    Configured,
    /// Same content as stored: nothing written.
    Unchanged,
    /// Deleted.
    Deleted,
}

impl std::fmt::Display for ChangeAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChangeAction::Created => "created",
            ChangeAction::Configured => "configured",
            ChangeAction::Unchanged => "unchanged",
            ChangeAction::Deleted => "deleted",
        })
    }
}

/// One resource's change in an apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangeSummary {
    /// `ShardMap`.
    pub kind: String,
    /// The name.
    pub name: String,
    /// What happened.
    pub action: ChangeAction,
    /// The resource's revision after the change (absent for deletes and dry runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
    /// Unified diff of the YAML (empty when unchanged).
    pub diff: String,
}

/// Answer to apply, delete and rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    /// The store revision after the change (the current one if nothing changed
    /// or for a dry run).
    pub revision: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Per resource, in the order given.
    pub changes: Vec<ChangeSummary>,
}

/// `GET /v1/resources[/{kind}]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse {
    /// The store revision the list was read at.
    pub revision: u64,
    /// Resources (`apiVersion`, `kind`, `metadata`, `spec`), in dependency
    /// order then by name.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<Value>,
}

/// One change in a resource's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem {
    /// The revision of the change.
    pub revision: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Who made it.
    pub author: String,
    /// Why, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `created`, `updated` or `deleted`.
    pub action: String,
    /// The resource after the change (absent for a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resource: Option<Value>,
    /// Unified diff from the previous version.
    pub diff: String,
}

/// `GET /v1/resources/{kind}/{name}/history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryResponse {
    /// `Kind/name`.
    pub resource: String,
    /// Oldest first.
    pub entries: Vec<HistoryItem>,
}

/// `POST /v1/resources/{kind}/{name}/rollback`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollbackRequest {
    /// The revision whose content to restore (from the history).
    pub revision: u64,
    /// Validate and diff only.
    #[serde(default)]
    pub dry_run: bool,
    /// Why: kept in the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One resource change in an audit record or a watch event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitChange {
    /// `Cell`.
    pub kind: String,
    /// The name.
    pub name: String,
    /// `created`, `updated` or `deleted`.
    pub action: String,
    /// The resource after the change (absent for a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resource: Option<Value>,
    /// Unified diff.
    pub diff: String,
}

/// One commit: an audit record (`GET /v1/audit`) or a watch event
/// (`GET /v1/watch`, one JSON object per line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitRecord {
    /// The revision it made.
    pub revision: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Who.
    pub author: String,
    /// Why, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What changed.
    pub changes: Vec<CommitChange>,
}

/// `GET /v1/audit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditResponse {
    /// Oldest first.
    pub commits: Vec<CommitRecord>,
}

/// The last NACK of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NackInfo {
    /// The version refused.
    pub version: u64,
    /// The node's reason.
    pub reason: String,
    /// RFC 3339 UTC time.
    pub time: String,
}

/// A data-plane node known to the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Unique node name.
    pub name: String,
    /// `gateway`, `sidecar`, `sdk`, `agent`...
    pub role: String,
    /// Its zone (may be empty).
    pub zone: String,
    /// Its cell (may be empty).
    pub cell: String,
    /// Whether its stream is open now.
    pub connected: bool,
    /// The peer address of its stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The version it last ACKed (or said it runs when connecting).
    pub applied_version: u64,
    /// The version last sent to it.
    pub sent_version: u64,
    /// The last NACK, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<NackInfo>,
    /// Why the node could not receive the configuration, if it could not:
    /// what it said when it connected again (an update too large for it,
    /// one it could not decode), or what the control plane found sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// RFC 3339 time of the last message either way.
    pub last_seen: String,
    /// The control-plane replica that holds (or last held) its stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The replication positions it reported last on its stream (app
    /// instances whose SDK reports them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<ReportedPositions>,
}

/// Replication positions an app instance reported on its config stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportedPositions {
    /// The service it runs.
    pub service: String,
    /// The config version in effect when it read them.
    pub applied_version: u64,
    /// RFC 3339 time the control plane received them.
    pub received: String,
    /// Per shard its cell owns.
    pub shards: Vec<ReportedShard>,
}

/// One shard of [`ReportedPositions`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportedShard {
    /// The shard.
    pub shard: u32,
    /// The last log position that changed it at its owner.
    pub written: i64,
    /// The position its standby confirmed.
    pub acknowledged: i64,
    /// The standby cell it replicates to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
}

/// `GET /v1/registry`: registered instances, as this replica's index of
/// the service registry holds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryResponse {
    /// The coordination keyspace revision the index reflects.
    pub revision: i64,
    /// The instances, by service, zone and name.
    pub instances: Vec<RegisteredInstance>,
}

/// One registered instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredInstance {
    /// The workspace.
    pub workspace: String,
    /// The Service it serves.
    pub service: String,
    /// Its name, unique in its zone.
    pub name: String,
    /// The region of its zone.
    pub region: String,
    /// The zone it runs in.
    pub zone: String,
    /// The cell it serves.
    pub cell: String,
    /// `host:port` callers connect to.
    pub address: String,
    /// `http`, `http2`, `grpc` or `bolt`.
    pub protocol: String,
    /// The version it runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Relative share of its cell's traffic.
    pub weight: u32,
    /// `sidecar`, `sdk`, or empty (direct).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Who registered it: `<role>/<zone>/<name>`.
    pub registered_by: String,
    /// The session it lives under (hexadecimal).
    pub session: String,
}

/// `GET /v1/nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodesResponse {
    /// The current config version (store revision).
    pub version: u64,
    /// Every known node, by name.
    pub nodes: Vec<NodeInfo>,
}

/// Which nodes a barrier waits for: all given fields must match. An empty
/// selector matches every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSelector {
    /// Node role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Node zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Node cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// Node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl NodeSelector {
    /// Whether a node with these attributes matches.
    pub fn matches(&self, name: &str, role: &str, zone: &str, cell: &str) -> bool {
        let ok = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        ok(&self.name, name) && ok(&self.role, role) && ok(&self.zone, zone) && ok(&self.cell, cell)
    }
}

/// `POST /v1/barrier`: wait until every matching node has applied at least
/// `version`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BarrierRequest {
    /// Which nodes; all when empty.
    #[serde(default)]
    pub selector: NodeSelector,
    /// The version to reach; the current revision when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// How long to wait, e.g. `5s` (default 10s, at most 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Fail unless at least this many nodes match (guards against waiting on
    /// nobody). Default 0.
    #[serde(default)]
    pub min_nodes: usize,
}

/// A node that has not applied the barrier's version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Laggard {
    /// Node name.
    pub name: String,
    /// Whether it is connected.
    pub connected: bool,
    /// What it has applied.
    pub applied_version: u64,
    /// Its last NACK, which often says why it lags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<NackInfo>,
    /// Why it cannot receive the configuration, if it said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A node a barrier did not wait for, and why that is safe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedNode {
    /// Node name.
    pub name: String,
    /// Why it was not waited for.
    pub reason: String,
}

/// Answer to a barrier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BarrierResponse {
    /// Whether every matching node reached the version in time.
    pub reached: bool,
    /// The version waited for.
    pub version: u64,
    /// How many nodes matched the selector.
    pub matched: usize,
    /// How long the barrier waited, in milliseconds.
    pub waited_ms: u64,
    /// Matching nodes below the version when the barrier returned, by name.
    pub laggards: Vec<Laggard>,
    /// Nodes not waited for: disconnected, and unable to write any more
    /// (any lease they held has ended), so the app's epoch check keeps
    /// whatever they still route from landing in the wrong cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedNode>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    /// Atoll's version.
    pub version: String,
    /// `embedded` or `etcd`.
    pub store: String,
    /// The current store revision.
    pub revision: u64,
    /// Connected data-plane nodes.
    pub connected_nodes: usize,
    /// Seconds since start.
    pub uptime_seconds: u64,
}

/// `GET /v1/leader`: the control-plane replicas and which one leads, as the
/// replica that answers sees them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderResponse {
    /// The leader's URL; absent while no replica leads (an election, or the
    /// store has no quorum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The leader's term: the revision that created its election key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<i64>,
    /// The replica that answered.
    pub served_by: String,
    /// Every replica alive, the leader among them.
    pub replicas: Vec<ReplicaInfo>,
}

/// One control-plane replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    /// Its advertised URL.
    pub url: String,
    /// `leader` or `follower`.
    pub role: String,
    /// The store revision its config cache serves.
    pub revision: u64,
    /// How many revisions it is behind the newest it reported seeing.
    pub lag: u64,
    /// Data-plane nodes connected to it.
    pub connected_nodes: usize,
    /// When it started (RFC 3339).
    pub started: String,
    /// When it last reported (RFC 3339).
    pub reported: String,
}

/// The kind of an API error, for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// The request is malformed (bad JSON, unknown kind, bad parameter).
    BadRequest,
    /// The manifests or the state they produce are invalid; see `issues`.
    Invalid,
    /// A resource changed since it was read; read again and retry.
    Conflict,
    /// No such resource, revision or node.
    NotFound,
    /// No credential, or one that is unknown, expired or revoked (401):
    /// log in again (`atoll login`).
    Unauthenticated,
    /// The caller may not do this (403): the message names the role it
    /// needs and where.
    Forbidden,
    /// The request body is too large.
    TooLarge,
    /// The store is unreachable or failing.
    Unavailable,
    /// No replica may make changes right now (a leader is being elected,
    /// or the store has no quorum); nothing was changed: retry.
    NotLeader,
    /// A bug: please report it.
    Internal,
}

/// Every API error has this body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// The HTTP status, repeated.
    pub status: u16,
    /// The kind of error.
    pub error: ErrorCode,
    /// One sentence saying what went wrong and what to do.
    pub message: String,
    /// For `invalid`: every problem, each with file, line, resource, field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issues: Vec<Issue>,
}

/// `POST /v1/switchovers`: plan (dry run) or start a planned switchover.
/// Either `from` (every shard the cell owns) or `shards` (a range), or both;
/// each moving shard goes to `to`, or to its standby when `to` is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SwitchoverRequest {
    /// The ShardMap; may be left out when there is only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_map: Option<String>,
    /// Move every shard this cell owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Move these shards, e.g. `0-9` or `7`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<String>,
    /// The new owner; each shard's standby when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The Switchover's name; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Why (kept in the Switchover and the audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Per barrier, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barrier_timeout: Option<String>,
    /// For the sync gate, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_timeout: Option<String>,
    /// Do not read replication positions.
    #[serde(default)]
    pub skip_sync_gate: bool,
    /// An emergency failover of a lost cell (`from`): no sync gate; the
    /// flip waits until the cell's ownership lease has expired; what it had
    /// not replicated at its last probe is reported.
    #[serde(default)]
    pub failover: bool,
    /// Only plan.
    #[serde(default)]
    pub dry_run: bool,
    /// Where switchovers need a second person's approval: ask for it now
    /// and start later, with `approval` (a change window, a drill).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    /// An approval held for this very switchover (same map, cells and
    /// shards), approved by a second person: start it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
}

impl SwitchoverRequest {
    /// Whether `other` asks for the same moves (what an approval covers):
    /// the map, the cells, the shards and the kind; names, reasons,
    /// timeouts and the approval itself aside.
    pub fn same_moves(&self, other: &SwitchoverRequest) -> bool {
        self.shard_map == other.shard_map
            && self.from == other.from
            && self.shards == other.shards
            && self.to == other.to
            && self.failover == other.failover
            && self.skip_sync_gate == other.skip_sync_gate
    }
}

/// One check of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanCheck {
    /// What was checked.
    pub check: String,
    /// `ok`, `warning` (it may start) or `blocking` (it may not).
    pub result: String,
    /// What was found.
    pub detail: String,
}

/// The answer to `POST /v1/switchovers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverPlan {
    /// The Switchover's name (created unless a dry run).
    pub name: String,
    /// The ShardMap.
    pub shard_map: String,
    /// Its epoch now; the flip makes it `epoch + 1`.
    pub epoch: u64,
    /// What moves: `{shards, from, to}`.
    #[schema(value_type = Vec<Object>)]
    pub moves: Vec<Value>,
    /// Shards moving.
    pub shard_count: u32,
    /// The shard map's diff (fenced and flipped owners), as YAML.
    pub diff: String,
    /// Capacity, health and replication checks.
    pub checks: Vec<PlanCheck>,
    /// What the writes to moving shards should expect: two barriers plus the
    /// replication lag.
    pub expected_fence_window: String,
    /// True when it was only planned.
    pub dry_run: bool,
    /// Set when starting it needs a second person's approval in its
    /// workspace (and the request names no approved one): the rule, e.g.
    /// `switchover`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_approval: Option<String>,
}

/// An operation waiting for (or decided by) a second person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalInfo {
    /// Its id, `apr-` and 12 hex digits.
    pub id: String,
    /// The workspace whose rule asks for it.
    pub workspace: String,
    /// The rule: `switchover`, `failover`, `shardMapRollback` or `token`.
    pub operation: String,
    /// What it does, in one line.
    pub summary: String,
    /// Who asked (verified identity); they cannot approve it.
    pub requested_by: String,
    /// Why, as the requester said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339: a pending request past it is `expired`.
    pub expires: String,
    /// `pending`, `approved` (and run, or held for the requester),
    /// `rejected`, `expired` or `failed` (approved, but the operation
    /// failed when it ran).
    pub state: String,
    /// Held: on approval it does not run, the requester starts it later
    /// naming this approval, once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    /// Who approved or rejected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<String>,
    /// The approver's or rejecter's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// What happened when it ran (or, held, when it was used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// The answer (202) to a call that needs a second person's approval: it
/// did not act; it is stored as an approval request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPending {
    /// What to do next, in one sentence.
    pub message: String,
    /// The request.
    pub approval: ApprovalInfo,
    /// For a token under approval: the token, shown once, unusable until
    /// the request is approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `GET /v1/approvals`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalList {
    /// Newest first.
    pub approvals: Vec<ApprovalInfo>,
}

/// `POST /v1/approvals/{id}/approve` and `/reject`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalDecision {
    /// Why (kept in the request and the audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// `POST /v1/tokens`: a new API token for a user, or a bootstrap token for
/// a node to join.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// For an API token: the user it acts as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// For an API token: the groups of its user (bound to roles in
    /// Workspaces; `atoll:admins` and `atoll:viewers` span the fleet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// For a bootstrap token: the role of the node that may join with it
    /// (`gateway`, `agent`, `sidecar`, `sdk`, `control`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// For a bootstrap token: the zone of that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// For a bootstrap token: the workspace of that node (default:
    /// `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// How long it is valid, as `90s`, `1h`, `30d` (default: 1h for a
    /// bootstrap token, 90d for an API token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A stored token, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// Its id (the part after `atk_` or `atb_`), safe to show.
    pub id: String,
    /// `api` or `bootstrap`.
    pub kind: String,
    /// An API token's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// An API token's groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// A bootstrap token's node: `atoll://<workspace>/<role>/<zone>/*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Who made it (verified identity).
    pub created_by: String,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339.
    pub expires: String,
    /// RFC 3339, when revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
    /// Who revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
    /// RFC 3339, when a bootstrap token was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<String>,
    /// The approval request a second person must approve before the token
    /// may be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_approval: Option<String>,
}

/// The answer to `POST /v1/tokens`: the whole token, shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenCreated {
    /// The secret token (`atk_...` or `atb_...`): store it now, it cannot
    /// be read again.
    pub token: String,
    /// What was stored.
    pub info: TokenInfo,
}

/// `GET /v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenList {
    /// Every token the caller may see, newest first.
    pub tokens: Vec<TokenInfo>,
}

/// `GET /v1/whoami`: the caller as the control plane verified it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    /// The name the audit log records.
    pub name: String,
    /// `user`, `node`, `unverified` (access control is off) or `anonymous`.
    pub kind: String,
    /// Its groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// How it was verified: `token <id>`, `certificate <serial>`, `none`.
    pub credential: String,
    /// Its role in each workspace it has one in.
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, String>,
    /// Whether the control plane enforces access control.
    pub access_control: bool,
}

/// `POST /v1/join`: a node's first certificate, against a bootstrap token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    /// The bootstrap token (`atb_...`), used up by this join.
    pub token: String,
    /// The node's name (its certificate says
    /// `atoll://<workspace>/<role>/<zone>/<name>`, the rest from the token).
    pub name: String,
    /// A certificate signing request (PEM) for the node's own key: only its
    /// public key is used.
    pub csr: String,
    /// For a control-plane replica only: the host names and addresses it
    /// serves at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// `POST /v1/renew`: a new certificate for the identity of the caller's
/// certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewRequest {
    /// A certificate signing request (PEM) for the key to use next (the
    /// same key or a new one).
    pub csr: String,
    /// For a control-plane replica only: the host names and addresses it
    /// serves at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// `POST /v1/instance-certificates`: an agent asks a certificate for an
/// instance it runs (`atoll://<workspace>/sdk/<the agent's zone>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceCertificateRequest {
    /// The instance's name (`ATOLL_INSTANCE`).
    pub name: String,
    /// A certificate signing request (PEM) for the instance's key: only its
    /// public key is used.
    pub csr: String,
}

/// How often a node asks `GET /v1/ca` whether the intermediate was rotated
/// (one small read per node: 50 a second for a fleet of 1,000 nodes).
pub const CA_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);

/// `GET /v1/ca`: what the control plane issues certificates with now.
/// Nodes compare `intermediateFingerprint` with the intermediate of their
/// own chain and renew at once when it changed (`atoll ca rotate`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaInfo {
    /// The root to trust, PEM.
    pub trust: String,
    /// The intermediate new certificates are signed by, PEM.
    pub intermediate: String,
    /// The SHA-256 of the intermediate's DER, hex.
    pub intermediate_fingerprint: String,
    /// When the intermediate ends (RFC 3339).
    pub intermediate_expires: String,
}

/// A certificate the control plane issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    /// The identity in it.
    pub identity: String,
    /// The certificate then the intermediate, PEM.
    pub chain: String,
    /// The root to trust, PEM.
    pub trust: String,
    /// When it stops being valid (RFC 3339).
    pub expires: String,
    /// Its serial number, hex.
    pub serial: String,
}
