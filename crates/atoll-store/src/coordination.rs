//! The coordination keyspace: small, unaudited keys for what replicas of the
//! control plane agree on at run time (the leader, node records, lease
//! settings), beside the audited resource store.
//!
//! It has what etcd has and a resource store must not: values that change
//! many times a second without a history, compare-and-swap on a key's
//! version, TTL leases that delete their keys when they run out, prefix
//! watches, and an election. Both backends implement it: etcd for replicas,
//! an in-memory keyspace for the single embedded process.
//!
//! Every write can carry a [`Fence`]: it lands only while the fence's leader
//! key still exists with the term the writer was elected with. A write from a
//! deposed leader fails with [`StoreError::Fenced`], never retried.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// An etcd-style lease: keys written with it are deleted when it runs out.
pub type LeaseId = i64;

/// A key with its value and versions. Revisions are the keyspace's own
/// (etcd's, for the etcd backend): they grow with every write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key, as the caller named it (without the backend's prefix).
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (it changes only when the key is
    /// deleted and created again).
    pub created: i64,
    /// The revision of its last write.
    pub modified: i64,
    /// The lease it lives under, if any.
    pub lease: Option<LeaseId>,
}

/// Every key under a prefix, at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// The keys, sorted.
    pub entries: Vec<Entry>,
    /// The revision read: watch from here to miss nothing.
    pub revision: i64,
}

/// What a key must be for a write to land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Anything, or absent.
    Any,
    /// Absent (create only).
    Absent,
    /// Present, last written at this revision.
    Modified(i64),
}

/// One write of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The key.
    pub key: String,
    /// The new value; `None` deletes the key.
    pub value: Option<Vec<u8>>,
    /// What the key must be.
    pub expect: Expect,
    /// The lease the key lives under (puts only).
    pub lease: Option<LeaseId>,
}

impl Write {
    /// Puts `value` at `key`, whatever is there.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            value: Some(value.into()),
            expect: Expect::Any,
            lease: None,
        }
    }

    /// Deletes `key` (nothing happens if it is absent and nothing is
    /// expected).
    pub fn delete(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: None,
            expect: Expect::Any,
            lease: None,
        }
    }

    /// Only if the key is as `expect` says.
    pub fn expecting(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    /// Under `lease`.
    pub fn with_lease(mut self, lease: LeaseId) -> Self {
        self.lease = Some(lease);
        self
    }
}

/// Proof of leadership that a write carries: the leader's key and the
/// revision that created it (its **term**).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    /// The leader's election key, as the backend names it.
    pub key: String,
    /// The create revision of that key: the term.
    pub term: i64,
}

/// The current leader of an election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// What the leader campaigned with (a replica's advertised URL).
    pub value: Vec<u8>,
    /// Its fence (key and term).
    pub fence: Fence,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyEvent {
    /// Created or replaced.
    Put(Entry),
    /// Deleted (also when its lease ran out).
    Deleted {
        /// The key.
        key: String,
        /// The revision of the delete.
        revision: i64,
    },
}

impl KeyEvent {
    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            KeyEvent::Put(entry) => entry.modified,
            KeyEvent::Deleted { revision, .. } => *revision,
        }
    }

    /// The key it changed.
    pub fn key(&self) -> &str {
        match self {
            KeyEvent::Put(entry) => &entry.key,
            KeyEvent::Deleted { key, .. } => key,
        }
    }
}

/// The most writes one batch may carry (etcd's default `--max-txn-ops` is
/// 128, and a fence takes none of them).
pub const MAX_WRITES_PER_BATCH: usize = 120;

/// The coordination keyspace.
#[async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// One key.
    async fn get_key(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Every key that starts with `prefix`, at one revision.
    async fn list_keys(&self, prefix: &str) -> Result<Listing, StoreError>;

    /// Applies every write of `writes` atomically, or none of them (a key
    /// not as expected: [`StoreError::KeyConflict`]; a fence that no longer
    /// holds: [`StoreError::Fenced`]). Returns the revision of the batch.
    async fn write_keys(
        &self,
        writes: Vec<Write>,
        fence: Option<&Fence>,
    ) -> Result<i64, StoreError>;

    /// Every change under `prefix` after revision `after`, in order, until
    /// the stream is dropped. A backend that cannot replay from `after` any
    /// more (compacted) ends the stream with an error: list again.
    async fn watch_keys(
        &self,
        prefix: &str,
        after: i64,
    ) -> Result<BoxStream<'static, Result<KeyEvent, StoreError>>, StoreError>;

    /// A new lease of `ttl` (a backend may round it up).
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews `lease` for its TTL; returns the TTL. A lease that ran out:
    /// [`StoreError::LeaseExpired`].
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Ends `lease` now and deletes its keys.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Campaigns in `election` with `value`, holding `lease`; returns once
    /// this campaigner leads (the oldest campaigner leads). Dropping the
    /// future leaves the candidacy in place until the lease ends or
    /// [`Coordination::resign`].
    async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Fence, StoreError>;

    /// The leader of `election`, if any.
    async fn leader(&self, election: &str) -> Result<Option<Leader>, StoreError>;

    /// Gives up leadership (and candidacy) held with `fence`.
    async fn resign(&self, fence: &Fence) -> Result<(), StoreError>;

    /// Puts one key; returns the revision of the write.
    async fn put_key(&self, write: Write, fence: Option<&Fence>) -> Result<i64, StoreError> {
        self.write_keys(vec![write], fence).await
    }
}

/// Checks a batch before a backend applies it.
pub(crate) fn check_batch(writes: &[Write]) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Err(StoreError::Invalid(
            "a batch needs at least one write".into(),
        ));
    }
    if writes.len() > MAX_WRITES_PER_BATCH {
        return Err(StoreError::Invalid(format!(
            "{} writes in one batch; the limit is {MAX_WRITES_PER_BATCH}",
            writes.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for write in writes {
        if write.key.is_empty() {
            return Err(StoreError::Invalid("a write names no key".into()));
        }
        if !seen.insert(write.key.as_str()) {
            return Err(StoreError::Invalid(format!(
                "key {} appears twice in one batch",
                write.key
            )));
        }
        if write.value.is_none() && write.lease.is_some() {
            return Err(StoreError::Invalid(format!(
                "a delete of {} carries a lease",
                write.key
            )));
        }
    }
    Ok(())
}

/// The conflict error for `key`.
pub(crate) fn key_conflict(key: &str, expect: Expect, actual: Option<i64>) -> StoreError {
    let detail = match (expect, actual) {
        (Expect::Absent, Some(modified)) => format!("exists (last written at {modified})"),
        (Expect::Modified(expected), Some(modified)) => {
            format!("was written at {modified}, not {expected}: it changed since it was read")
        }
        (Expect::Modified(expected), None) => {
            format!("no longer exists (expected it as written at {expected})")
        }
        (_, _) => "is not as expected".into(),
    };
    StoreError::KeyConflict {
        key: key.to_owned(),
        detail,
    }
}
