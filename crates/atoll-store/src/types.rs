//! The values a store takes and returns, and the checks both backends share.

use std::collections::HashSet;
use std::fmt;

use atoll_model::{Resource, ResourceKey};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A store revision: 0 for an empty store, +1 per commit.
pub type Revision = u64;

/// One change of a commit.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// What to do.
    pub op: Op,
    /// When set, the resource must be at this revision (`0`: must not exist).
    pub expected: Option<Revision>,
}

impl Change {
    /// Creates or replaces a resource, whatever its current version.
    pub fn put(resource: Resource) -> Self {
        Self {
            op: Op::Put(resource),
            expected: None,
        }
    }

    /// Deletes a resource, whatever its current version.
    pub fn delete(key: ResourceKey) -> Self {
        Self {
            op: Op::Delete(key),
            expected: None,
        }
    }

    /// Only if the resource is at `revision` (`0`: must not exist).
    pub fn expecting(mut self, revision: Revision) -> Self {
        self.expected = Some(revision);
        self
    }

    /// The key the change touches.
    pub fn key(&self) -> ResourceKey {
        match &self.op {
            Op::Put(resource) => resource.key(),
            Op::Delete(key) => key.clone(),
        }
    }
}

/// Create-or-replace, or delete.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a handful per commit; boxing would only add noise"
)]
pub enum Op {
    /// Create or replace the resource.
    Put(Resource),
    /// Delete the resource.
    Delete(ResourceKey),
}

/// A batch of changes applied as one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitRequest {
    /// The changes; each key at most once.
    pub changes: Vec<Change>,
    /// When set, the store must still be at this revision: the caller
    /// validated the change against that state.
    pub base_revision: Option<Revision>,
    /// Who made the change (for the audit log).
    pub author: String,
    /// Why, if the author said.
    pub message: Option<String>,
    /// When set, the commit lands only while this leadership holds (a
    /// deposed leader's commit fails with [`StoreError::Fenced`]).
    pub fence: Option<crate::Fence>,
}

/// What a change did to a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The resource did not exist before.
    Created,
    /// The resource was replaced.
    Updated,
    /// The resource was deleted.
    Deleted,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Deleted => "deleted",
        })
    }
}

/// One change as recorded in a commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeRecord {
    /// Kind and name.
    pub key: ResourceKey,
    /// Created, updated or deleted.
    pub action: Action,
    /// The revision the resource was at before, if it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revision: Option<Revision>,
    /// The resource after the change (absent for a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
    /// Unified diff of the resource's YAML.
    pub diff: String,
}

/// A commit: the audit record of one revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Commit {
    /// The revision this commit made.
    pub revision: Revision,
    /// When it was made (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Who made it.
    pub author: String,
    /// Why, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What changed.
    pub changes: Vec<ChangeRecord>,
}

/// One entry of a resource's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The revision of the change.
    pub revision: Revision,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Who.
    pub author: String,
    /// Why, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Created, updated or deleted.
    pub action: Action,
    /// The resource as it was after this change (absent for a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
    /// Unified diff from the previous version.
    pub diff: String,
}

/// Every resource at one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The revision read.
    pub revision: Revision,
    /// The resources, sorted by kind (dependency order) then name.
    pub resources: Vec<Resource>,
}

/// A resource whose version was not what a change expected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conflict {
    /// The resource.
    pub key: ResourceKey,
    /// The revision the change expected (`0`: not to exist).
    pub expected: Revision,
    /// The revision it is at (absent: it does not exist).
    pub actual: Option<Revision>,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.expected, self.actual) {
            (0, Some(actual)) => {
                write!(f, "{} already exists (resourceVersion {actual})", self.key)
            }
            (expected, Some(actual)) => write!(
                f,
                "{} is at resourceVersion {actual}, not {expected}: it changed since you read it",
                self.key
            ),
            (expected, None) => write!(
                f,
                "{} no longer exists (expected resourceVersion {expected})",
                self.key
            ),
        }
    }
}

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Some resources were not at the versions the change expected; nothing
    /// was changed.
    #[error("{}; read the resources again and retry", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Conflict(Vec<Conflict>),
    /// The store moved on since the caller read it; nothing was changed.
    #[error("the store moved from revision {expected} to {actual} while the change was prepared")]
    StaleBase {
        /// The revision the caller read.
        expected: Revision,
        /// The revision now.
        actual: Revision,
    },
    /// A delete named a resource that does not exist.
    #[error("{0} does not exist")]
    NotFound(ResourceKey),
    /// The request itself is wrong (empty, too large, a key twice).
    #[error("invalid commit: {0}")]
    Invalid(String),
    /// The backend failed (I/O, network, etcd error).
    #[error("{backend} store: {detail}")]
    Backend {
        /// `embedded` or `etcd`.
        backend: &'static str,
        /// What failed.
        detail: String,
    },
    /// The commit or write carried a fence that no longer holds: the leader
    /// that made it was deposed. Nothing was changed; retrying cannot help.
    #[error("fenced: the leadership of term {term} has ended ({detail}); nothing was changed")]
    Fenced {
        /// The term the writer held.
        term: i64,
        /// What holds the leader key now.
        detail: String,
    },
    /// A coordination key was not as a write expected; nothing was changed.
    #[error("key {key} {detail}; read it again and retry")]
    KeyConflict {
        /// The key.
        key: String,
        /// How it differed.
        detail: String,
    },
    /// A coordination lease ran out (or never existed).
    #[error("lease {0:x} has expired or does not exist")]
    LeaseExpired(i64),
    /// Data in the store could not be read back.
    #[error("{backend} store holds unreadable data at {at}: {detail}")]
    Corrupt {
        /// `embedded` or `etcd`.
        backend: &'static str,
        /// Which key or record.
        at: String,
        /// Why.
        detail: String,
    },
}

/// A commit ready to be written: checked, with diffs and versions computed.
pub(crate) struct Prepared {
    pub(crate) commit: Commit,
    /// New state per key: `Some` to write, `None` to delete.
    pub(crate) writes: Vec<(ResourceKey, Option<Resource>)>,
    pub(crate) history: Vec<(ResourceKey, HistoryEntry)>,
}

/// Checks `request` against the current state and builds what to write.
/// `current` gives the stored resource of a key (with its version).
pub(crate) fn prepare(
    request: &CommitRequest,
    revision: Revision,
    mut current: impl FnMut(&ResourceKey) -> Result<Option<Resource>, StoreError>,
) -> Result<Prepared, StoreError> {
    if request.changes.is_empty() {
        return Err(StoreError::Invalid(
            "a commit needs at least one change".into(),
        ));
    }
    if request.changes.len() > crate::MAX_CHANGES_PER_COMMIT {
        return Err(StoreError::Invalid(format!(
            "{} changes in one commit; the limit is {}",
            request.changes.len(),
            crate::MAX_CHANGES_PER_COMMIT
        )));
    }
    if let Some(base) = request.base_revision
        && base != revision
    {
        return Err(StoreError::StaleBase {
            expected: base,
            actual: revision,
        });
    }
    let mut seen = HashSet::new();
    for change in &request.changes {
        let key = change.key();
        if !seen.insert(key.clone()) {
            return Err(StoreError::Invalid(format!(
                "{key} appears twice in one commit"
            )));
        }
    }

    let next = revision + 1;
    let time = OffsetDateTime::now_utc();
    let mut conflicts = Vec::new();
    let mut records = Vec::with_capacity(request.changes.len());
    let mut writes = Vec::with_capacity(request.changes.len());
    let mut history = Vec::with_capacity(request.changes.len());
    for change in &request.changes {
        let key = change.key();
        let stored = current(&key)?;
        let stored_version = stored.as_ref().and_then(|r| r.metadata.resource_version);
        if let Some(expected) = change.expected {
            let matches = match stored_version {
                None => expected == 0,
                Some(actual) => expected == actual,
            };
            if !matches {
                conflicts.push(Conflict {
                    key: key.clone(),
                    expected,
                    actual: stored_version,
                });
                continue;
            }
        }
        let label = key.to_string();
        let (action, new) = match &change.op {
            Op::Put(resource) => {
                let mut resource = resource.clone();
                resource.metadata.resource_version = Some(next);
                let action = if stored.is_some() {
                    Action::Updated
                } else {
                    Action::Created
                };
                (action, Some(resource))
            }
            Op::Delete(_) => {
                if stored.is_none() {
                    return Err(StoreError::NotFound(key));
                }
                (Action::Deleted, None)
            }
        };
        let diff = atoll_model::diff(&label, stored.as_ref(), new.as_ref());
        records.push(ChangeRecord {
            key: key.clone(),
            action,
            previous_revision: stored_version,
            resource: new.clone(),
            diff: diff.clone(),
        });
        history.push((
            key.clone(),
            HistoryEntry {
                revision: next,
                time,
                author: request.author.clone(),
                message: request.message.clone(),
                action,
                resource: new.clone(),
                diff,
            },
        ));
        writes.push((key, new));
    }
    if !conflicts.is_empty() {
        return Err(StoreError::Conflict(conflicts));
    }
    Ok(Prepared {
        commit: Commit {
            revision: next,
            time,
            author: request.author.clone(),
            message: request.message.clone(),
            changes: records,
        },
        writes,
        history,
    })
}

/// `Kind/name`, the key used by both backends.
/// `Kind/name` for the fleet's kinds and the default workspace,
/// `Kind/name@workspace` for the others: the layout of stores written
/// before workspaces stays as it was.
pub(crate) fn key_text(key: &ResourceKey) -> String {
    key.to_string()
}

/// Sorts resources by kind (dependency order), workspace, then name.
pub(crate) fn sort_resources(resources: &mut [Resource]) {
    resources.sort_by(|a, b| {
        (a.kind(), a.workspace(), a.name()).cmp(&(b.kind(), b.workspace(), b.name()))
    });
}
