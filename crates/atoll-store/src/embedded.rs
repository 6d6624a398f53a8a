//! The default store: one redb file in the control plane's data directory.
//!
//! redb gives serializable write transactions and crash safety (a commit is on
//! disk when it returns), so a commit here is one write transaction. Reads run
//! on MVCC snapshots and never block writers. Calls run on tokio's blocking
//! pool because redb does synchronous file I/O.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::watch;

use crate::coordination::{Coordination, Entry, Fence, KeyEvent, Leader, LeaseId, Listing, Write};
use crate::keyspace::Keyspace;
use crate::types::{key_text, prepare, sort_resources};
use crate::{Commit, CommitRequest, HistoryEntry, Revision, Snapshot, Store, StoreError};
use atoll_model::{Resource, ResourceKey};

const BACKEND: &str = "embedded";

/// `revision` → the last committed revision.
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// `Kind/name` → resource JSON.
const RESOURCES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("resources");
/// (`Kind/name`, revision) → history entry JSON.
const HISTORY: TableDefinition<'static, (&str, u64), &[u8]> = TableDefinition::new("history");
/// revision → commit JSON (the audit log).
const COMMITS: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("commits");
/// The coordination keyspace's keys without a lease → created and
/// modified revisions (8 bytes each, big-endian), then the value.
const KEYS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("keys");
/// The name in [`META`] of the coordination keyspace's revision.
const KEY_REVISION: &str = "key_revision";

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// The last committed revision, for watchers.
    revision: watch::Sender<Revision>,
    /// The coordination keyspace (in memory: one process).
    keyspace: Keyspace,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn backend_error(context: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        detail: format!("{context}: {error}"),
    }
}

fn corrupt(at: impl Into<String>, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        backend: BACKEND,
        at: at.into(),
        detail: error.to_string(),
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file `atoll.redb` in `dir`, creating the
    /// directory if needed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| backend_error(&format!("creating data directory {}", dir.display()), e))?;
        let path = dir.join("atoll.redb");
        let db = Database::create(&path).map_err(|e| {
            backend_error(
                &format!(
                    "opening {} (is another control plane using this data directory?)",
                    path.display()
                ),
                e,
            )
        })?;
        // Create the tables so that readers never meet a missing table.
        let write = db.begin_write().map_err(|e| backend_error("begin", e))?;
        {
            write
                .open_table(META)
                .map_err(|e| backend_error("meta table", e))?;
            write
                .open_table(RESOURCES)
                .map_err(|e| backend_error("resources table", e))?;
            write
                .open_table(HISTORY)
                .map_err(|e| backend_error("history table", e))?;
            write
                .open_table(COMMITS)
                .map_err(|e| backend_error("commits table", e))?;
            write
                .open_table(KEYS)
                .map_err(|e| backend_error("keys table", e))?;
        }
        write.commit().map_err(|e| backend_error("commit", e))?;
        let (revision, keys, key_revision) = {
            let read = db
                .begin_read()
                .map_err(|e| backend_error("begin read", e))?;
            let (keys, key_revision) = read_keys(&read)?;
            (read_revision(&read)?, keys, key_revision)
        };
        let keyspace = Keyspace::new();
        keyspace.restore(keys, key_revision);
        let (sender, _) = watch::channel(revision);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path,
                revision: sender,
                keyspace,
            }),
        })
    }

    /// Writes what durable keys of the coordination keyspace become, and
    /// its revision, in one redb transaction (on disk when it returns).
    fn persist_keys(
        &self,
        revision: i64,
        keys: &[(String, Option<Entry>)],
    ) -> Result<(), StoreError> {
        let write = self
            .inner
            .db
            .begin_write()
            .map_err(|e| backend_error("begin", e))?;
        {
            let mut table = write
                .open_table(KEYS)
                .map_err(|e| backend_error("keys table", e))?;
            for (key, entry) in keys {
                match entry {
                    Some(entry) => {
                        let mut bytes = Vec::with_capacity(16 + entry.value.len());
                        bytes.extend_from_slice(&entry.created.to_be_bytes());
                        bytes.extend_from_slice(&entry.modified.to_be_bytes());
                        bytes.extend_from_slice(&entry.value);
                        table
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(|e| backend_error("writing key", e))?;
                    }
                    None => {
                        table
                            .remove(key.as_str())
                            .map_err(|e| backend_error("deleting key", e))?;
                    }
                }
            }
            let mut meta = write
                .open_table(META)
                .map_err(|e| backend_error("meta table", e))?;
            meta.insert(KEY_REVISION, u64::try_from(revision).unwrap_or(0))
                .map_err(|e| backend_error("writing key revision", e))?;
        }
        write.commit().map_err(|e| backend_error("commit", e))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| backend_error("store task", e))?
    }
}

fn read_revision(read: &ReadTransaction) -> Result<Revision, StoreError> {
    let meta = read
        .open_table(META)
        .map_err(|e| backend_error("meta table", e))?;
    Ok(meta
        .get("revision")
        .map_err(|e| backend_error("reading revision", e))?
        .map(|v| v.value())
        .unwrap_or(0))
}

/// The durable keys of the coordination keyspace, and its revision.
fn read_keys(read: &ReadTransaction) -> Result<(Vec<Entry>, i64), StoreError> {
    let table = read
        .open_table(KEYS)
        .map_err(|e| backend_error("keys table", e))?;
    let mut entries = Vec::new();
    for item in table.iter().map_err(|e| backend_error("reading keys", e))? {
        let (key, value) = item.map_err(|e| backend_error("reading keys", e))?;
        let (key, bytes) = (key.value().to_owned(), value.value());
        if bytes.len() < 16 {
            return Err(corrupt(format!("key {key}"), "shorter than its header"));
        }
        let number = |at: usize| {
            let mut buffer = [0u8; 8];
            buffer.copy_from_slice(&bytes[at..at + 8]);
            i64::from_be_bytes(buffer)
        };
        entries.push(Entry {
            created: number(0),
            modified: number(8),
            value: bytes[16..].to_vec(),
            key,
            lease: None,
        });
    }
    let meta = read
        .open_table(META)
        .map_err(|e| backend_error("meta table", e))?;
    let revision = meta
        .get(KEY_REVISION)
        .map_err(|e| backend_error("reading key revision", e))?
        .map_or(0, |v| v.value());
    let revision = i64::try_from(revision).unwrap_or(i64::MAX);
    let newest = entries.iter().map(|e| e.modified).max().unwrap_or(0);
    Ok((entries, revision.max(newest)))
}

fn decode<T: serde::de::DeserializeOwned>(at: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(at, e))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| backend_error("encoding", e))
}

fn get_resource(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &ResourceKey,
) -> Result<Option<Resource>, StoreError> {
    let text = key_text(key);
    match table
        .get(text.as_str())
        .map_err(|e| backend_error("reading resource", e))?
    {
        Some(bytes) => decode(&text, bytes.value()).map(Some),
        None => Ok(None),
    }
}

fn write_commit(write: &WriteTransaction, request: &CommitRequest) -> Result<Commit, StoreError> {
    let revision = {
        let meta = write
            .open_table(META)
            .map_err(|e| backend_error("meta table", e))?;

        meta.get("revision")
            .map_err(|e| backend_error("reading revision", e))?
            .map(|v| v.value())
            .unwrap_or(0)
    };
    let prepared = {
        let resources = write
            .open_table(RESOURCES)
            .map_err(|e| backend_error("resources table", e))?;
        prepare(request, revision, |key| get_resource(&resources, key))?
    };
    {
        let mut resources = write
            .open_table(RESOURCES)
            .map_err(|e| backend_error("resources table", e))?;
        for (key, resource) in &prepared.writes {
            let text = key_text(key);
            match resource {
                Some(resource) => {
                    resources
                        .insert(text.as_str(), encode(resource)?.as_slice())
                        .map_err(|e| backend_error("writing resource", e))?;
                }
                None => {
                    resources
                        .remove(text.as_str())
                        .map_err(|e| backend_error("deleting resource", e))?;
                }
            }
        }
        let mut history = write
            .open_table(HISTORY)
            .map_err(|e| backend_error("history table", e))?;
        for (key, entry) in &prepared.history {
            history
                .insert(
                    (key_text(key).as_str(), entry.revision),
                    encode(entry)?.as_slice(),
                )
                .map_err(|e| backend_error("writing history", e))?;
        }
        let mut commits = write
            .open_table(COMMITS)
            .map_err(|e| backend_error("commits table", e))?;
        commits
            .insert(
                prepared.commit.revision,
                encode(&prepared.commit)?.as_slice(),
            )
            .map_err(|e| backend_error("writing commit", e))?;
        let mut meta = write
            .open_table(META)
            .map_err(|e| backend_error("meta table", e))?;
        meta.insert("revision", prepared.commit.revision)
            .map_err(|e| backend_error("writing revision", e))?;
    }
    Ok(prepared.commit)
}

fn read_commits(inner: &Inner, after: Revision, limit: usize) -> Result<Vec<Commit>, StoreError> {
    let read = inner
        .db
        .begin_read()
        .map_err(|e| backend_error("begin read", e))?;
    let commits = read
        .open_table(COMMITS)
        .map_err(|e| backend_error("commits table", e))?;
    let mut out = Vec::new();
    for item in commits
        .range(after.saturating_add(1)..)
        .map_err(|e| backend_error("reading commits", e))?
        .take(limit)
    {
        let (revision, bytes) = item.map_err(|e| backend_error("reading commits", e))?;
        out.push(decode(
            &format!("commit {}", revision.value()),
            bytes.value(),
        )?);
    }
    Ok(out)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking(|inner| {
            let read = inner
                .db
                .begin_read()
                .map_err(|e| backend_error("begin read", e))?;
            read_revision(&read)
        })
        .await
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.blocking(|inner| {
            let read = inner
                .db
                .begin_read()
                .map_err(|e| backend_error("begin read", e))?;
            let revision = read_revision(&read)?;
            let table = read
                .open_table(RESOURCES)
                .map_err(|e| backend_error("resources table", e))?;
            let mut resources = Vec::new();
            for item in table
                .iter()
                .map_err(|e| backend_error("reading resources", e))?
            {
                let (key, bytes) = item.map_err(|e| backend_error("reading resources", e))?;
                resources.push(decode(key.value(), bytes.value())?);
            }
            sort_resources(&mut resources);
            Ok(Snapshot {
                revision,
                resources,
            })
        })
        .await
    }

    async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>, StoreError> {
        let key = key.clone();
        self.blocking(move |inner| {
            let read = inner
                .db
                .begin_read()
                .map_err(|e| backend_error("begin read", e))?;
            let table = read
                .open_table(RESOURCES)
                .map_err(|e| backend_error("resources table", e))?;
            get_resource(&table, &key)
        })
        .await
    }

    async fn commit(&self, request: CommitRequest) -> Result<Commit, StoreError> {
        self.blocking(move |inner| {
            // The fence is checked, and holds, until the commit is on disk.
            inner
                .keyspace
                .under_fence(request.fence.as_ref(), || {
                    let write = inner
                        .db
                        .begin_write()
                        .map_err(|e| backend_error("begin write", e))?;
                    match write_commit(&write, &request) {
                        Ok(commit) => {
                            write.commit().map_err(|e| backend_error("commit", e))?;
                            Ok(commit)
                        }
                        Err(error) => {
                            write.abort().map_err(|e| backend_error("abort", e))?;
                            Err(error)
                        }
                    }
                })
                .inspect(|commit| {
                    inner.revision.send_replace(commit.revision);
                })
        })
        .await
    }

    async fn history(&self, key: &ResourceKey) -> Result<Vec<HistoryEntry>, StoreError> {
        let text = key_text(key);
        self.blocking(move |inner| {
            let read = inner
                .db
                .begin_read()
                .map_err(|e| backend_error("begin read", e))?;
            let table = read
                .open_table(HISTORY)
                .map_err(|e| backend_error("history table", e))?;
            let mut entries = Vec::new();
            for item in table
                .range((text.as_str(), 0)..=(text.as_str(), u64::MAX))
                .map_err(|e| backend_error("reading history", e))?
            {
                let (_, bytes) = item.map_err(|e| backend_error("reading history", e))?;
                entries.push(decode(&text, bytes.value())?);
            }
            Ok(entries)
        })
        .await
    }

    async fn commits(&self, after: Revision, limit: usize) -> Result<Vec<Commit>, StoreError> {
        self.blocking(move |inner| read_commits(inner, after, limit))
            .await
    }

    async fn watch(
        &self,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<Commit, StoreError>>, StoreError> {
        let store = self.clone();
        let receiver = self.inner.revision.subscribe();
        let stream = futures::stream::unfold(
            (store, receiver, after, std::collections::VecDeque::new()),
            |(store, mut receiver, mut last, mut buffer)| async move {
                loop {
                    if let Some(commit) = buffer.pop_front() {
                        let commit: Commit = commit;
                        last = commit.revision;
                        return Some((Ok(commit), (store, receiver, last, buffer)));
                    }
                    // Mark the current value seen before reading, so a commit
                    // made after the read wakes us up.
                    receiver.borrow_and_update();
                    match store.commits(last, 256).await {
                        Ok(commits) if !commits.is_empty() => buffer.extend(commits),
                        Ok(_) => {
                            if receiver.changed().await.is_err() {
                                return None;
                            }
                        }
                        Err(error) => return Some((Err(error), (store, receiver, last, buffer))),
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }
}

#[async_trait]
impl Coordination for EmbeddedStore {
    async fn get_key(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.inner.keyspace.get(key))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Listing, StoreError> {
        Ok(self.inner.keyspace.list(prefix))
    }

    async fn write_keys(
        &self,
        writes: Vec<Write>,
        fence: Option<&Fence>,
    ) -> Result<i64, StoreError> {
        // A batch of leased keys only (node records, leases) stays in
        // memory; one that may touch a durable key waits for the disk, on
        // the blocking pool.
        let durable = writes.iter().any(|w| w.lease.is_none());
        let store = self.clone();
        let apply = move |fence: Option<Fence>| {
            store
                .inner
                .keyspace
                .apply_durably(writes, fence.as_ref(), |revision, keys| {
                    store.persist_keys(revision, keys)
                })
        };
        let fence = fence.cloned();
        if durable {
            tokio::task::spawn_blocking(move || apply(fence))
                .await
                .map_err(|e| backend_error("store task", e))?
        } else {
            apply(fence)
        }
    }

    async fn watch_keys(
        &self,
        prefix: &str,
        after: i64,
    ) -> Result<BoxStream<'static, Result<KeyEvent, StoreError>>, StoreError> {
        Ok(self.inner.keyspace.watch(prefix, after))
    }

    async fn grant(&self, ttl: std::time::Duration) -> Result<LeaseId, StoreError> {
        self.inner.keyspace.grant(ttl)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<std::time::Duration, StoreError> {
        self.inner.keyspace.keep_alive(lease)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keyspace.revoke(lease);
        Ok(())
    }

    async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Fence, StoreError> {
        self.inner.keyspace.campaign(election, value, lease).await
    }

    async fn leader(&self, election: &str) -> Result<Option<Leader>, StoreError> {
        Ok(self.inner.keyspace.leader(election))
    }

    async fn resign(&self, fence: &Fence) -> Result<(), StoreError> {
        self.inner.keyspace.resign(fence);
        Ok(())
    }
}
