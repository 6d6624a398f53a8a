//! Atoll's versioned resource store: one [`Store`] trait and two backends that
//! pass the same conformance suite (`tests/conformance.rs`):
//!
//! - [`EmbeddedStore`], the default: a redb file in a data directory.
//! - [`EtcdStore`]: a real etcd cluster, for control-plane replicas.
//!
//! Beside the resources, each backend has a [`Coordination`] keyspace: small
//! unaudited keys with compare-and-swap, TTL leases, prefix watches and an
//! election, for what control-plane replicas agree on at run time.
//!
//! The store keeps resources, a full history per resource and an audit log of
//! commits. Every commit is atomic, gets the next revision, and can be
//! conditioned on resource versions (optimistic concurrency) and on the store
//! revision the caller read. It does not validate resources: the control plane
//! validates the state a change produces before committing it.

mod coordination;
mod embedded;
mod etcd;
mod keyspace;
mod types;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use atoll_model::{Resource, ResourceKey};
pub use coordination::{
    Coordination, Entry, Expect, Fence, KeyEvent, Leader, LeaseId, Listing, MAX_WRITES_PER_BATCH,
    Write,
};
pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore};
pub use types::*;

/// A versioned store of resources.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `embedded` or `etcd`, for status pages and metrics.
    fn backend(&self) -> &'static str;

    /// The revision of the last commit (0 for an empty store).
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// Every resource, at one revision.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// One resource, with its `resourceVersion` set.
    async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>, StoreError>;

    /// Applies all changes of `request` atomically as the next revision, or
    /// none of them.
    async fn commit(&self, request: CommitRequest) -> Result<Commit, StoreError>;

    /// Every change of one resource, oldest first (also after it was deleted).
    async fn history(&self, key: &ResourceKey) -> Result<Vec<HistoryEntry>, StoreError>;

    /// Commits (the audit log) with revision greater than `after`, oldest
    /// first, at most `limit`.
    async fn commits(&self, after: Revision, limit: usize) -> Result<Vec<Commit>, StoreError>;

    /// Every commit after `after`, oldest first: the ones already made, then
    /// new ones as they happen. The stream ends only when dropped; a backend
    /// that loses its connection resumes where it was.
    async fn watch(
        &self,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<Commit, StoreError>>, StoreError>;
}

/// The most changes one commit may carry.
pub const MAX_CHANGES_PER_COMMIT: usize = 1000;
