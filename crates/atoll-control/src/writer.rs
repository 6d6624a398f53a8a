//! The writer: applies, deletes and rolls back resources so that the store
//! only ever holds a valid whole. The REST API and the orchestrators
//! (switchovers) write through it alike; a [`Principal`] says who writes, and
//! every commit carries the fence of this replica's leadership.
//!
//! Every change is validated against the state it would produce (stored
//! resources plus the change) and committed with the revision it was validated
//! against as its base: if the store moved meanwhile, the change is validated
//! again. So two concurrent applies can never together produce an invalid
//! state, even though each was valid alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use atoll_api::rest::{
    ApplyResponse, ChangeAction, ChangeSummary, CommitChange, CommitRecord, HistoryItem,
    ManifestFile,
};
use atoll_model::limits::{MAX_CONFIG_BYTES, MAX_RESOURCE_BYTES, human_bytes};
use atoll_model::{
    DEFAULT_WORKSPACE, Issue, Kind, Located, Origin, ParseBudget, Resource, ResourceKey, Spec,
    assign_epoch, diff, load_all_within, validate_with_pending,
};
use atoll_store::{Change, Commit, CommitRequest, HistoryEntry, Store, StoreError};

use crate::leadership::Leadership;
use crate::metrics::{Metrics, ResultLabels};
use crate::nodes::rfc3339;
use crate::state::ConfigCache;

/// How often an apply is re-validated when other writers keep committing.
const MAX_ATTEMPTS: usize = 8;

/// Requests whose manifests are parsed at once (the others wait their turn).
pub(crate) const PARSERS: usize = 2;

/// Errors of the control plane's operations; the REST layer maps them to
/// statuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("{message}")]
    Invalid { message: String, issues: Vec<Issue> },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The principal may not make this change.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
    /// This replica cannot act for the control plane (not the leader, or a
    /// leader that was deposed while acting).
    #[error("{0}")]
    NotLeader(String),
}

impl From<StoreError> for ControlError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(_) | StoreError::StaleBase { .. } => {
                ControlError::Conflict(error.to_string())
            }
            StoreError::NotFound(key) => ControlError::NotFound(format!("{key} does not exist")),
            StoreError::Invalid(text) => ControlError::BadRequest(text),
            StoreError::KeyConflict { .. } => ControlError::Conflict(error.to_string()),
            StoreError::Fenced { .. } => ControlError::NotLeader(format!(
                "{error}: this replica is no longer the leader; retry and the new leader answers"
            )),
            StoreError::Backend { backend, .. } => ControlError::Unavailable(format!(
                "{error}; the store must answer before the control plane reads or changes anything{}",
                if backend == "etcd" {
                    " (etcd answers only while a majority of its members reach each other): bring the members back, and it resumes by itself"
                } else {
                    ""
                }
            )),
            StoreError::Corrupt { .. } | StoreError::LeaseExpired(_) => {
                ControlError::Unavailable(error.to_string())
            }
        }
    }
}

fn invalid(mut issues: Vec<Issue>) -> ControlError {
    // File order, then line order, reads best; stored resources come last.
    issues.sort_by(|a, b| {
        let stored = |i: &Issue| i.source.as_deref().is_some_and(|s| s.starts_with("stored"));
        (stored(a), &a.source, a.line, a.column).cmp(&(stored(b), &b.source, b.line, b.column))
    });
    let count = issues.len();
    let message = if count == 1 {
        "the change is invalid: 1 problem; nothing was changed".to_owned()
    } else {
        format!("the change is invalid: {count} problems; nothing was changed")
    };
    ControlError::Invalid { message, issues }
}

/// Resources to create or replace and to delete, in one revision.
#[derive(Debug, Default)]
pub(crate) struct ChangeSet {
    pub(crate) puts: Vec<Located>,
    pub(crate) deletes: Vec<(ResourceKey, Option<u64>)>,
    /// Problems already found while reading the manifests.
    pub(crate) issues: Vec<Issue>,
    /// Resources of the manifests that did not decode.
    pub(crate) pending: Vec<ResourceKey>,
}

impl ChangeSet {
    /// Puts every resource of a workspace kind whose manifest names no
    /// workspace into `workspace` (none or `default`: the default one).
    pub(crate) fn in_workspace(&mut self, workspace: Option<&str>) {
        let Some(workspace) = workspace.filter(|w| !w.is_empty() && *w != DEFAULT_WORKSPACE) else {
            return;
        };
        for put in &mut self.puts {
            let metadata = &mut put.resource.metadata;
            if !put.resource.spec.kind().is_fleet() && metadata.workspace.is_none() {
                metadata.workspace = Some(workspace.to_owned());
            }
        }
    }

    /// The default workspace is stored as no workspace, so that a manifest
    /// that names it and one that does not are the same resource.
    fn normalize(&mut self) {
        for put in &mut self.puts {
            let metadata = &mut put.resource.metadata;
            if metadata
                .workspace
                .as_deref()
                .is_some_and(|w| w.is_empty() || w == DEFAULT_WORKSPACE)
            {
                metadata.workspace = None;
            }
        }
    }
}

/// An agent's change writes and deletes only Endpoints of its own zone
/// (`agent/<zone>`), replacing only Endpoints of that zone.
fn guard_agent(
    set: &ChangeSet,
    principal: &str,
    stored: &BTreeMap<ResourceKey, &Resource>,
) -> Result<(), ControlError> {
    let zone = principal.strip_prefix("agent/").unwrap_or(principal);
    let zone_of = |resource: &Resource| match &resource.spec {
        Spec::Endpoints(e) => Some(e.zone.clone()),
        _ => None,
    };
    for put in &set.puts {
        let key = put.resource.key();
        if zone_of(&put.resource).as_deref() != Some(zone) {
            return Err(ControlError::Forbidden(format!(
                "{principal} may write only Endpoints of zone {zone}, not {key}"
            )));
        }
        if let Some(current) = stored.get(&key)
            && zone_of(current).as_deref() != Some(zone)
        {
            return Err(ControlError::Forbidden(format!(
                "{key} belongs to another zone or is not reported by agents: {principal} may not replace it"
            )));
        }
    }
    for (key, _) in &set.deletes {
        if let Some(current) = stored.get(key)
            && zone_of(current).as_deref() != Some(zone)
        {
            return Err(ControlError::Forbidden(format!(
                "{principal} may delete only Endpoints of zone {zone}, not {key}"
            )));
        }
    }
    Ok(())
}

/// A user's change may not write a Switchover (the control plane runs
/// them), delete one still running, or change a shard map under one.
fn guard_switchovers(set: &ChangeSet, stored: &[Resource]) -> Result<(), ControlError> {
    let keys = set
        .puts
        .iter()
        .map(|l| l.resource.key())
        .chain(set.deletes.iter().map(|(k, _)| k.clone()));
    for key in keys {
        match key.kind {
            atoll_model::Kind::Switchover => {
                let running = stored.iter().any(|r| {
                    r.key() == key && matches!(&r.spec, Spec::Switchover(s) if !s.phase.is_final())
                });
                let deleting = set.deletes.iter().any(|(k, _)| *k == key);
                if !deleting {
                    return Err(ControlError::BadRequest(format!(
                        "{key}: Switchovers are written by the control plane; start one with `atoll switchover start` (POST /v1/switchovers)"
                    )));
                }
                if running {
                    return Err(ControlError::Conflict(format!(
                        "{key} is still running; abort it (atoll switchover abort {}) or wait for it before deleting it",
                        key.name
                    )));
                }
            }
            atoll_model::Kind::ShardMap => {
                if let Some(active) = crate::switchover::active_on(stored, &key.name) {
                    return Err(ControlError::Conflict(format!(
                        "{key} is being switched over by switchover/{active}; wait for it (atoll switchover status {active}) or abort it, then apply"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Who writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Principal {
    /// A person or a tool on the API (the name it gives).
    User(String),
    /// The control plane itself, for an orchestrator (`switchover/NAME`,
    /// `emergency-plan-MAP`): it may write Switchovers and the shard maps
    /// they run on.
    ControlPlane(String),
    /// A zone's agent (`agent/<zone>`), reporting on the config stream: it
    /// may write only the Endpoints of its zone.
    Agent(String),
}

impl Principal {
    /// The name the audit log records.
    pub(crate) fn name(&self) -> &str {
        match self {
            Principal::User(name) | Principal::ControlPlane(name) | Principal::Agent(name) => name,
        }
    }
}

/// Who changes what, and why.
#[derive(Clone, Debug)]
pub(crate) struct Author {
    pub(crate) principal: Principal,
    pub(crate) message: Option<String>,
}

impl Author {
    /// A user's change.
    pub(crate) fn user(name: String, message: Option<String>) -> Self {
        Self {
            principal: Principal::User(name),
            message,
        }
    }

    /// The control plane's own change.
    pub(crate) fn agent(zone: &str, message: Option<String>) -> Self {
        Self {
            principal: Principal::Agent(format!("agent/{zone}")),
            message,
        }
    }

    pub(crate) fn control_plane(name: String, message: Option<String>) -> Self {
        Self {
            principal: Principal::ControlPlane(name),
            message,
        }
    }

    /// The name the audit log records.
    pub(crate) fn name(&self) -> &str {
        self.principal.name()
    }
}

/// Validates and commits changes: one per replica, used by the REST API
/// and the orchestrators alike.
pub(crate) struct Writer {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) cache: ConfigCache,
    pub(crate) metrics: Arc<Metrics>,
    /// Gives the fence every commit carries (and refuses when this replica
    /// does not lead).
    pub(crate) leadership: Arc<Leadership>,
    /// Applies from this process take turns: each validates against the
    /// state the previous one produced instead of racing it and retrying.
    /// (Another writer on the same etcd, a deposed leader, is stopped by
    /// the fence; a race is still caught by the base revision.)
    pub(crate) turn: tokio::sync::Mutex<()>,
    /// Turns for parsing manifests ([`PARSERS`] at once).
    pub(crate) parsing: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("store", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Parses manifest files into a change set. Broken YAML is refused at
    /// once; documents that do not decode are kept as issues, so that the
    /// apply reports them together with the validation of the rest.
    pub(crate) fn parse(files: &[ManifestFile]) -> Result<ChangeSet, ControlError> {
        let mut set = ChangeSet::default();
        let mut syntax_error = false;
        // One budget for the whole request: however many files it has, it
        // cannot make the reader build more than the limits allow.
        let mut budget = ParseBudget::default();
        for file in files {
            let mut loaded = load_all_within(&file.source, &file.content, &mut budget);
            syntax_error |= loaded.syntax_error;
            set.puts.append(&mut loaded.resources);
            set.issues.append(&mut loaded.issues);
            set.pending.append(&mut loaded.pending);
        }
        if syntax_error {
            return Err(invalid(std::mem::take(&mut set.issues)));
        }
        Ok(set)
    }

    /// Applies a change set atomically (or, for a dry run, says what it would do).
    pub(crate) async fn apply(
        &self,
        mut set: ChangeSet,
        dry_run: bool,
        author: &Author,
    ) -> Result<ApplyResponse, ControlError> {
        set.normalize();
        if set.puts.is_empty() && set.deletes.is_empty() && set.issues.is_empty() {
            return Err(ControlError::BadRequest(
                "nothing to apply: give at least one manifest or resource to delete".into(),
            ));
        }
        for (key, _) in &set.deletes {
            if set.puts.iter().any(|p| &p.resource.key() == key) {
                return Err(ControlError::BadRequest(format!(
                    "{key} is both applied and deleted in one change"
                )));
            }
        }
        let _turn = if dry_run {
            None
        } else {
            Some(self.turn.lock().await)
        };
        for _ in 0..MAX_ATTEMPTS {
            match self.try_apply(&set, dry_run, author).await {
                Err(ControlError::Conflict(text)) if text.contains("the store moved") => continue,
                other => {
                    if let Err(error) = &other {
                        let result = match error {
                            ControlError::Invalid { .. } => "invalid",
                            ControlError::Conflict(_) => "conflict",
                            _ => "other",
                        };
                        self.metrics
                            .rejected
                            .get_or_create(&ResultLabels {
                                result: result.into(),
                            })
                            .inc();
                    }
                    return other;
                }
            }
        }
        Err(ControlError::Unavailable(format!(
            "other changes kept landing first ({MAX_ATTEMPTS} attempts); try again"
        )))
    }

    /// Problems with the sizes the change would give: a resource over
    /// [`MAX_RESOURCE_BYTES`], or a configuration (what nodes receive) over
    /// [`MAX_CONFIG_BYTES`].
    fn size_issues(
        &self,
        puts: &[(Located, Option<u64>)],
        deletes: &[(ResourceKey, Option<u64>)],
        snapshot: &atoll_store::Snapshot,
    ) -> Vec<Issue> {
        let mut issues = Vec::new();
        let cache = self.cache.current();
        let json_len = |resource: &Resource| serde_json::to_vec(resource).map_or(0, |j| j.len());
        let mut sizes: BTreeMap<ResourceKey, usize> = BTreeMap::new();
        for resource in &snapshot.resources {
            if resource.kind() == Kind::Switchover {
                continue;
            }
            let key = resource.key();
            let size = cache
                .resources
                .get(&key)
                .filter(|w| Some(w.resource_version) == resource.metadata.resource_version)
                .map_or_else(|| json_len(resource), |w| w.json.len());
            sizes.insert(key, size);
        }
        for (key, _) in deletes {
            sizes.remove(key);
        }
        for (located, _) in puts {
            let key = located.resource.key();
            let size = json_len(&located.resource);
            if size > MAX_RESOURCE_BYTES {
                issues.push(located.origin.issue(
                    Some(key.to_string()),
                    "",
                    format!(
                        "this resource is {} as JSON; a resource may be at most {}: split it (several resources of the kind) or remove what it does not need",
                        human_bytes(size),
                        human_bytes(MAX_RESOURCE_BYTES)
                    ),
                ));
            }
            if key.kind != Kind::Switchover {
                sizes.insert(key, size);
            }
        }
        let total: usize = sizes.values().sum();
        if total > MAX_CONFIG_BYTES {
            issues.push(Issue::new(format!(
                "the configuration would be {} as JSON; it may be at most {}, since every node receives all of it: remove resources or make them smaller",
                human_bytes(total),
                human_bytes(MAX_CONFIG_BYTES)
            )));
        }
        issues
    }

    async fn try_apply(
        &self,
        set: &ChangeSet,
        dry_run: bool,
        author: &Author,
    ) -> Result<ApplyResponse, ControlError> {
        let snapshot = self.store.snapshot().await?;
        let stored: BTreeMap<ResourceKey, &Resource> =
            snapshot.resources.iter().map(|r| (r.key(), r)).collect();
        match &author.principal {
            Principal::User(_) => guard_switchovers(set, &snapshot.resources)?,
            Principal::Agent(name) => guard_agent(set, name, &stored)?,
            Principal::ControlPlane(_) => {}
        }
        // One switchover at a time per map, decided against the state this
        // commit is based on (a planned start and the emergency plan may
        // race).
        for put in &set.puts {
            if let Spec::Switchover(new) = &put.resource.spec
                && !stored.contains_key(&put.resource.key())
                && let Some(active) =
                    crate::switchover::active_on(&snapshot.resources, &new.shard_map)
            {
                return Err(ControlError::Conflict(format!(
                    "switchover/{active} is still running on shardmap/{}; wait for it or abort it",
                    new.shard_map
                )));
            }
        }

        let mut conflicts = Vec::new();
        let mut issues = set.issues.clone();
        let mut puts: Vec<(Located, Option<u64>)> = Vec::with_capacity(set.puts.len());
        for located in &set.puts {
            let mut located = located.clone();
            let key = located.resource.key();
            let expected = located.resource.metadata.resource_version.take();
            let current = stored.get(&key).and_then(|r| r.metadata.resource_version);
            if let Some(expected) = expected
                && ((expected == 0 && current.is_some())
                    || (expected != 0 && current != Some(expected)))
            {
                conflicts.push(conflict_text(&key, expected, current));
            }
            if let Spec::ShardMap(map) = &mut located.resource.spec {
                let previous = stored.get(&key).and_then(|r| match &r.spec {
                    Spec::ShardMap(m) => Some(m),
                    _ => None,
                });
                let needs_history = previous.is_none_or(|p| p.ownership_differs(map));
                let highest = if needs_history {
                    self.highest_epoch(&key).await?
                } else {
                    0
                };
                if let Err(reason) = assign_epoch(map, previous, highest) {
                    issues.push(
                        located
                            .origin
                            .issue(Some(key.to_string()), "spec.epoch", reason),
                    );
                }
            }
            puts.push((located, expected));
        }
        for (key, expected) in &set.deletes {
            let current = stored.get(key).and_then(|r| r.metadata.resource_version);
            match (current, expected) {
                (None, _) => {
                    return Err(ControlError::NotFound(format!(
                        "{key} does not exist, so it cannot be deleted"
                    )));
                }
                (Some(actual), Some(expected)) if actual != *expected => {
                    conflicts.push(conflict_text(key, *expected, Some(actual)));
                }
                _ => {}
            }
        }
        if !conflicts.is_empty() {
            if set.issues.is_empty() {
                return Err(ControlError::Conflict(format!(
                    "{}; nothing was changed: read again (atoll get -o yaml) and retry",
                    conflicts.join("; ")
                )));
            }
            // Reported with the manifests' problems, so that fixing those
            // does not reveal a second round of errors.
            issues.extend(conflicts.into_iter().map(Issue::new));
        }

        issues.extend(self.size_issues(&puts, &set.deletes, &snapshot));

        // The state the change would produce.
        let replaced: std::collections::HashSet<ResourceKey> = puts
            .iter()
            .map(|(l, _)| l.resource.key())
            .chain(set.deletes.iter().map(|(k, _)| k.clone()))
            .collect();
        let mut proposed: Vec<Located> = snapshot
            .resources
            .iter()
            .filter(|r| !replaced.contains(&r.key()))
            .map(|r| Located {
                resource: r.clone(),
                origin: Origin::Stored {
                    revision: r.metadata.resource_version.unwrap_or(0),
                },
            })
            .collect();
        proposed.extend(puts.iter().map(|(l, _)| l.clone()));
        // Validation is CPU work proportional to the whole state: off the
        // async workers.
        let pending = set.pending.clone();
        let validated =
            tokio::task::spawn_blocking(move || validate_with_pending(&proposed, &pending))
                .await
                .map_err(|e| ControlError::Unavailable(format!("validation task failed: {e}")))?;
        if let Err(found) = validated {
            issues.extend(found.0);
        }
        if !issues.is_empty() {
            return Err(invalid(issues));
        }

        let mut summaries = Vec::new();
        let mut changes = Vec::new();
        for (located, expected) in &puts {
            let key = located.resource.key();
            let previous = stored.get(&key).copied();
            let (action, text) = match previous {
                None => (
                    ChangeAction::Created,
                    diff(&key.to_string(), None, Some(&located.resource)),
                ),
                Some(previous) if previous.without_version() == located.resource => {
                    let mut unchanged = summary(&key, ChangeAction::Unchanged, String::new());
                    unchanged.resource_version = previous.metadata.resource_version;
                    summaries.push(unchanged);
                    continue;
                }
                Some(previous) => (
                    ChangeAction::Configured,
                    diff(&key.to_string(), Some(previous), Some(&located.resource)),
                ),
            };
            let change = Change::put(located.resource.clone());
            changes.push(match expected {
                Some(v) => change.expecting(*v),
                None => change,
            });
            summaries.push(summary(&key, action, text));
        }
        for (key, expected) in &set.deletes {
            let text = diff(&key.to_string(), stored.get(key).copied(), None);
            let change = Change::delete(key.clone());
            changes.push(match expected {
                Some(v) => change.expecting(*v),
                None => change,
            });
            summaries.push(summary(key, ChangeAction::Deleted, text));
        }

        if dry_run || changes.is_empty() {
            return Ok(ApplyResponse {
                revision: snapshot.revision,
                dry_run,
                changes: summaries,
            });
        }
        let fence = self.leadership.fence()?;
        let commit = self
            .store
            .commit(CommitRequest {
                changes,
                base_revision: Some(snapshot.revision),
                author: author.name().to_owned(),
                message: author.message.clone(),
                fence: Some(fence.clone()),
            })
            .await
            .map_err(|e| match e {
                StoreError::StaleBase { .. } => {
                    ControlError::Conflict(format!("the store moved: {e}"))
                }
                other => self.leadership.check(&fence, other),
            })?;
        self.committed(&commit).await;
        for summary in &mut summaries {
            if matches!(
                summary.action,
                ChangeAction::Created | ChangeAction::Configured
            ) {
                summary.resource_version = Some(commit.revision);
            }
        }
        Ok(ApplyResponse {
            revision: commit.revision,
            dry_run: false,
            changes: summaries,
        })
    }

    /// After a commit: metrics, and wait (briefly) until the config stream
    /// serves it, so that a barrier right after an apply waits for the new
    /// version and not for one the streams do not know yet.
    async fn committed(&self, commit: &Commit) {
        self.metrics.commits.inc();
        self.metrics
            .revision
            .set(i64::try_from(commit.revision).unwrap_or(i64::MAX));
        tracing::info!(
            revision = commit.revision,
            author = %commit.author,
            changes = commit.changes.len(),
            "committed"
        );
        if !self
            .cache
            .wait_for(commit.revision, Duration::from_secs(5))
            .await
        {
            tracing::warn!(
                revision = commit.revision,
                "the config stream did not see the commit within 5s"
            );
        }
    }

    async fn highest_epoch(&self, key: &ResourceKey) -> Result<u64, ControlError> {
        let history = self.store.history(key).await?;
        Ok(history
            .iter()
            .filter_map(|entry| match entry.resource.as_ref().map(|r| &r.spec) {
                Some(Spec::ShardMap(map)) => Some(map.epoch),
                _ => None,
            })
            .max()
            .unwrap_or(0))
    }

    /// Restores the content a resource had at `revision` as a new revision.
    pub(crate) async fn rollback(
        &self,
        key: &ResourceKey,
        revision: u64,
        dry_run: bool,
        author: &Author,
    ) -> Result<ApplyResponse, ControlError> {
        let history = self.store.history(key).await?;
        if history.is_empty() {
            return Err(ControlError::NotFound(format!("{key} has no history")));
        }
        let Some(entry) = history.iter().find(|e| e.revision == revision) else {
            let known: Vec<String> = history.iter().map(|e| e.revision.to_string()).collect();
            return Err(ControlError::NotFound(format!(
                "{key} did not change at revision {revision}; its revisions are {} (see `atoll history {}/{}`)",
                known.join(", "),
                key.kind.as_str().to_ascii_lowercase(),
                key.name
            )));
        };
        let author = Author {
            principal: author.principal.clone(),
            message: Some(
                author
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("rollback of {key} to revision {revision}")),
            ),
        };
        let set = match &entry.resource {
            Some(resource) => {
                let mut resource = resource.clone();
                resource.metadata.resource_version = None;
                if let Spec::ShardMap(map) = &mut resource.spec {
                    // The epoch is recomputed: it never goes back.
                    map.epoch = 0;
                }
                ChangeSet {
                    puts: vec![Located {
                        resource,
                        origin: Origin::Generated {
                            what: Arc::from(format!("rollback of {key} to revision {revision}")),
                        },
                    }],
                    ..ChangeSet::default()
                }
            }
            None => {
                if self.store.get(key).await?.is_none() {
                    return Ok(ApplyResponse {
                        revision: self.store.revision().await?,
                        dry_run,
                        changes: vec![summary(key, ChangeAction::Unchanged, String::new())],
                    });
                }
                ChangeSet {
                    deletes: vec![(key.clone(), None)],
                    ..ChangeSet::default()
                }
            }
        };
        self.apply(set, dry_run, &author).await
    }
}

fn conflict_text(key: &ResourceKey, expected: u64, actual: Option<u64>) -> String {
    match (expected, actual) {
        (0, Some(actual)) => format!("{key} already exists (resourceVersion {actual})"),
        (expected, Some(actual)) => format!(
            "{key} is at resourceVersion {actual}, not {expected}: someone changed it since you read it"
        ),
        (expected, None) => {
            format!("{key} no longer exists (you expected resourceVersion {expected})")
        }
    }
}

fn summary(key: &ResourceKey, action: ChangeAction, diff: String) -> ChangeSummary {
    ChangeSummary {
        kind: key.kind.as_str().to_owned(),
        name: key.name.clone(),
        action,
        resource_version: None,
        diff,
    }
}

/// A history entry as the API shows it.
pub(crate) fn history_item(entry: &HistoryEntry) -> HistoryItem {
    HistoryItem {
        revision: entry.revision,
        time: rfc3339(entry.time),
        author: entry.author.clone(),
        message: entry.message.clone(),
        action: entry.action.to_string(),
        resource: entry
            .resource
            .as_ref()
            .and_then(|r| serde_json::to_value(r).ok()),
        diff: entry.diff.clone(),
    }
}

/// A commit as the API shows it.
pub(crate) fn commit_record(commit: &Commit, with_resources: bool) -> CommitRecord {
    CommitRecord {
        revision: commit.revision,
        time: rfc3339(commit.time),
        author: commit.author.clone(),
        message: commit.message.clone(),
        changes: commit
            .changes
            .iter()
            .map(|c| CommitChange {
                kind: c.key.kind.as_str().to_owned(),
                name: c.key.name.clone(),
                action: c.action.to_string(),
                resource: if with_resources {
                    c.resource
                        .as_ref()
                        .and_then(|r| serde_json::to_value(r).ok())
                } else {
                    None
                },
                diff: c.diff.clone(),
            })
            .collect(),
    }
}
