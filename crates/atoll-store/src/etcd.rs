//! The etcd store, for control planes that must survive the loss of a host.
//!
//! Layout under a prefix (default `/atoll/`):
//!
//! | key | value |
//! |---|---|
//! | `meta/revision` | the last revision, decimal |
//! | `resources/{Kind}/{name}` | resource JSON (the fleet's kinds and the default workspace) |
//! | `resources/{Kind}/{name}@{workspace}` | resource JSON (another workspace) |
//! | `history/{key}/{revision:020}` | history entry JSON (`{key}` as above) |
//! | `commits/{revision:020}` | commit JSON (the audit log) |
//! | `coord/{key}` | the coordination keyspace ([`Coordination`]) |
//! | `coord/{election}/{lease:x}` | a candidacy in an election (etcd's election API) |
//!
//! Every commit writes `meta/revision`, and its transaction succeeds only if
//! that key's etcd `mod_revision` is the one read before preparing: commits are
//! serialized through it, so several control planes can share one etcd. The
//! revision numbers are Atoll's own (+1 per commit), independent of etcd's.
//! etcd limits the operations of one transaction (`--max-txn-ops`, default
//! 128): a commit of N resources takes 2N+2.
//!
//! A commit or coordination write with a [`Fence`] also compares the
//! leader key's create revision with the fence's term, in the same
//! transaction: a deposed leader's write cannot land.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions,
};
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use crate::coordination::{
    Coordination, Entry, Expect, Fence, KeyEvent, Leader, LeaseId, Listing, Write, check_batch,
    key_conflict,
};
use crate::types::{key_text, prepare, sort_resources};
use crate::{Commit, CommitRequest, HistoryEntry, Revision, Snapshot, Store, StoreError};
use atoll_model::{Resource, ResourceKey};

const BACKEND: &str = "etcd";

/// How often a commit is retried when another writer got in first.
const MAX_ATTEMPTS: usize = 64;

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix for everything Atoll writes; ends with `/`.
    pub prefix: String,
    /// Timeout for connecting and for each request.
    pub timeout: Duration,
}

impl EtcdOptions {
    /// Options for `endpoints` with the default prefix `/atoll/`.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/atoll/".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The etcd store. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// Without a request timeout: a campaign waits as long as it takes.
    campaigns: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
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

fn decode<T: serde::de::DeserializeOwned>(at: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(String::from_utf8_lossy(at), e))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| backend_error("encoding", e))
}

/// Whether an etcd error means the request never reached a member (one is
/// down): safe to send again, and the client's balancer then picks another.
fn unreached(error: &etcd_client::Error) -> bool {
    let text = error.to_string();
    text.contains("tcp connect error")
        || text.contains("Connection refused")
        || text.contains("error trying to connect")
}

/// Whether a read failed only because etcd's leader changed while it was
/// in flight (killing the member that led, say): a read has no effect, so
/// it is sent again. A write is not: it may have been applied.
fn leader_changed(error: &etcd_client::Error) -> bool {
    error.to_string().contains("leader changed")
}

/// How often a request that reached no member is sent again.
const UNREACHED_ATTEMPTS: u32 = 8;

/// Runs `call` again while it reaches no member (at most
/// [`UNREACHED_ATTEMPTS`] times, backing off): it was not applied, and the
/// client's balancer sends it to another member.
async fn resend<T, Fut>(call: impl FnMut() -> Fut) -> Result<T, etcd_client::Error>
where
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    resend_if(call, unreached).await
}

/// [`resend`], also while `retry` says the failure was transient.
async fn resend_if<T, Fut>(
    mut call: impl FnMut() -> Fut,
    retry: impl Fn(&etcd_client::Error) -> bool,
) -> Result<T, etcd_client::Error>
where
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(e) if retry(&e) && attempt < UNREACHED_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// `LeaseExpired` when etcd says it does not know `lease`, else a backend
/// error of `context`.
fn lease_error(lease: LeaseId, context: &str, error: etcd_client::Error) -> StoreError {
    if error.to_string().contains("lease not found") {
        StoreError::LeaseExpired(lease)
    } else {
        backend_error(context, error)
    }
}

/// KV calls that go to another member when one is down.
struct Kv<'a> {
    client: &'a Client,
}

impl Kv<'_> {
    async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let key = key.into();
        resend_if(
            || {
                let mut kv = self.client.kv_client();
                let (key, options) = (key.clone(), options.clone());
                async move { kv.get(key, options).await }
            },
            |e| unreached(e) || leader_changed(e),
        )
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        resend(|| {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }
}

/// The smallest key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "no etcd endpoints given; pass e.g. http://127.0.0.1:2379".into(),
            ));
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.timeout)
            .with_timeout(options.timeout);
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|e| {
                backend_error(&format!("connecting to {}", options.endpoints.join(",")), e)
            })?;
        let campaigns = Client::connect(
            &options.endpoints,
            Some(
                ConnectOptions::new()
                    .with_connect_timeout(options.timeout)
                    .with_keep_alive(Duration::from_secs(2), options.timeout),
            ),
        )
        .await
        .map_err(|e| backend_error(&format!("connecting to {}", options.endpoints.join(",")), e))?;
        let mut prefix = options.prefix;
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let store = Self {
            client,
            campaigns,
            prefix,
        };
        // Fail now, with the endpoint in the message, rather than on first use.
        store.revision().await.map_err(|e| match e {
            StoreError::Backend { detail, .. } => backend_error(
                &format!("etcd at {} does not answer", options.endpoints.join(",")),
                detail,
            ),
            other => other,
        })?;
        Ok(store)
    }

    fn kv(&self) -> Kv<'_> {
        Kv {
            client: &self.client,
        }
    }

    /// The etcd key of coordination key `key`.
    fn coord_key(&self, key: &str) -> String {
        format!("{}coord/{key}", self.prefix)
    }

    /// The coordination key of etcd key `key`.
    fn coord_name(&self, key: &[u8]) -> String {
        let text = String::from_utf8_lossy(key);
        text.strip_prefix(&format!("{}coord/", self.prefix))
            .unwrap_or(&text)
            .to_owned()
    }

    fn entry(&self, kv: &etcd_client::KeyValue) -> Entry {
        Entry {
            key: self.coord_name(kv.key()),
            value: kv.value().to_vec(),
            created: kv.create_revision(),
            modified: kv.mod_revision(),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        }
    }

    fn fence_compare(&self, fence: &Fence) -> Compare {
        Compare::create_revision(self.coord_key(&fence.key), CompareOp::Equal, fence.term)
    }

    /// `Err(Fenced)` when `fence` no longer holds.
    async fn check_fence(&self, fence: &Fence) -> Result<(), StoreError> {
        let kv = self.kv();
        let response = kv
            .get(self.coord_key(&fence.key), None)
            .await
            .map_err(|e| backend_error("reading the leader key", e))?;
        match response.kvs().first() {
            Some(item) if item.create_revision() == fence.term => Ok(()),
            Some(item) => Err(StoreError::Fenced {
                term: fence.term,
                detail: format!("the leader key is now of term {}", item.create_revision()),
            }),
            None => Err(StoreError::Fenced {
                term: fence.term,
                detail: "the leader key is gone".into(),
            }),
        }
    }

    async fn pump_keys(
        self,
        prefix: String,
        after: i64,
        sender: mpsc::Sender<Result<KeyEvent, StoreError>>,
    ) {
        let mut watch = self.client.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1);
        let mut stream = match watch.watch(self.coord_key(&prefix), Some(options)).await {
            Ok(stream) => stream,
            Err(e) => {
                let _ = sender.send(Err(backend_error("watching", e))).await;
                return;
            }
        };
        loop {
            tokio::select! {
                () = sender.closed() => return,
                message = stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            let _ = sender.send(Err(backend_error("watching", "etcd closed the watch"))).await;
                            return;
                        }
                        Err(e) => {
                            let _ = sender.send(Err(backend_error("watching", e))).await;
                            return;
                        }
                    };
                    if response.compact_revision() > 0 {
                        let _ = sender.send(Err(backend_error("watching", format!("revision {after} is compacted (etcd keeps changes after {}); list again", response.compact_revision())))).await;
                        return;
                    }
                    if response.canceled() {
                        let _ = sender.send(Err(backend_error("watching", format!("watch canceled: {}", response.cancel_reason())))).await;
                        return;
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let item = match event.event_type() {
                            EventType::Put => KeyEvent::Put(self.entry(kv)),
                            EventType::Delete => KeyEvent::Deleted {
                                key: self.coord_name(kv.key()),
                                revision: kv.mod_revision(),
                            },
                        };
                        if sender.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }

    fn meta_key(&self) -> String {
        format!("{}meta/revision", self.prefix)
    }

    fn resources_prefix(&self) -> String {
        format!("{}resources/", self.prefix)
    }

    fn resource_key(&self, key: &ResourceKey) -> String {
        format!("{}resources/{}", self.prefix, key_text(key))
    }

    fn history_prefix(&self, key: &ResourceKey) -> String {
        format!("{}history/{}/", self.prefix, key_text(key))
    }

    fn commits_prefix(&self) -> String {
        format!("{}commits/", self.prefix)
    }

    fn commit_key(&self, revision: Revision) -> String {
        format!("{}commits/{revision:020}", self.prefix)
    }

    /// Reads the revision and the meta key's etcd mod_revision (0 if absent),
    /// and the etcd revision of the read.
    async fn read_meta(&self) -> Result<(Revision, i64, i64), StoreError> {
        let kv = self.kv();
        let response = kv
            .get(self.meta_key(), None)
            .await
            .map_err(|e| backend_error("reading revision", e))?;
        let header = response.header().map(|h| h.revision()).unwrap_or(0);
        match response.kvs().first() {
            None => Ok((0, 0, header)),
            Some(kv) => {
                let text =
                    std::str::from_utf8(kv.value()).map_err(|e| corrupt(self.meta_key(), e))?;
                let revision = text
                    .parse()
                    .map_err(|e| corrupt(self.meta_key(), format!("{e}: {text:?}")))?;
                Ok((revision, kv.mod_revision(), header))
            }
        }
    }

    async fn try_commit(&self, request: &CommitRequest) -> Result<Option<Commit>, StoreError> {
        let (revision, meta_mod, _) = self.read_meta().await?;
        let kv = self.kv();
        let mut current = std::collections::HashMap::new();
        for change in &request.changes {
            let key = change.key();
            let response = kv
                .get(self.resource_key(&key), None)
                .await
                .map_err(|e| backend_error("reading resource", e))?;
            let resource: Option<Resource> = match response.kvs().first() {
                Some(item) => Some(decode(item.key(), item.value())?),
                None => None,
            };
            current.insert(key, resource);
        }
        let prepared = prepare(request, revision, |key| {
            Ok(current.get(key).cloned().flatten())
        })?;
        let mut operations = Vec::with_capacity(prepared.writes.len() * 2 + 2);
        operations.push(TxnOp::put(
            self.meta_key(),
            prepared.commit.revision.to_string(),
            None,
        ));
        for (key, resource) in &prepared.writes {
            match resource {
                Some(resource) => {
                    operations.push(TxnOp::put(self.resource_key(key), encode(resource)?, None))
                }
                None => operations.push(TxnOp::delete(self.resource_key(key), None)),
            }
        }
        for (key, entry) in &prepared.history {
            operations.push(TxnOp::put(
                format!("{}{:020}", self.history_prefix(key), entry.revision),
                encode(entry)?,
                None,
            ));
        }
        operations.push(TxnOp::put(
            self.commit_key(prepared.commit.revision),
            encode(&prepared.commit)?,
            None,
        ));
        let guard = if meta_mod == 0 {
            Compare::create_revision(self.meta_key(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(self.meta_key(), CompareOp::Equal, meta_mod)
        };
        let mut compares = vec![guard];
        if let Some(fence) = &request.fence {
            compares.push(self.fence_compare(fence));
        }
        let txn = Txn::new().when(compares).and_then(operations);
        let response = kv.txn(txn).await.map_err(|e| {
            let text = e.to_string();
            if text.contains("too many operations") {
                backend_error(
                    "committing",
                    format!("{text}; this commit needs {} operations: raise etcd's --max-txn-ops or apply in smaller batches", prepared.writes.len() * 2 + 2),
                )
            } else {
                backend_error("committing", e)
            }
        })?;
        Ok(response.succeeded().then_some(prepared.commit))
    }

    /// Reads commits after `after` at one etcd revision; returns them with that
    /// etcd revision.
    async fn read_commits(
        &self,
        after: Revision,
        limit: usize,
    ) -> Result<(Vec<Commit>, i64), StoreError> {
        let kv = self.kv();
        let mut options = GetOptions::new()
            .with_range(prefix_end(&self.commits_prefix()))
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        if limit > 0 {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let response = kv
            .get(self.commit_key(after.saturating_add(1)), Some(options))
            .await
            .map_err(|e| backend_error("reading commits", e))?;
        let header = response.header().map(|h| h.revision()).unwrap_or(0);
        let commits = response
            .kvs()
            .iter()
            .map(|item| decode(item.key(), item.value()))
            .collect::<Result<Vec<Commit>, _>>()?;
        Ok((commits, header))
    }

    /// Feeds `sender` with every commit after `last`, forever, reconnecting
    /// the etcd watch when it breaks.
    async fn pump(self, mut last: Revision, sender: mpsc::Sender<Result<Commit, StoreError>>) {
        let mut failures = 0u32;
        loop {
            if sender.is_closed() {
                return;
            }
            let before = last;
            match self.pump_once(&mut last, &sender).await {
                Ok(()) => return, // receiver gone
                Err(error) => {
                    // A watch that delivered something was healthy: count anew.
                    if last > before {
                        failures = 0;
                    }
                    failures += 1;
                    tracing::warn!(%error, failures, "etcd watch broke; resuming");
                    if failures == 10 && sender.send(Err(error)).await.is_err() {
                        return;
                    }
                    let backoff = Duration::from_millis(100 * u64::from(failures.min(20)));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// Catches up from `last`, then follows the etcd watch. Returns `Ok` only
    /// when the receiver is gone.
    async fn pump_once(
        &self,
        last: &mut Revision,
        sender: &mpsc::Sender<Result<Commit, StoreError>>,
    ) -> Result<(), StoreError> {
        let etcd_revision = loop {
            let (commits, header) = self.read_commits(*last, 512).await?;
            let full = commits.len() == 512;
            for commit in commits {
                *last = commit.revision;
                if sender.send(Ok(commit)).await.is_err() {
                    return Ok(());
                }
            }
            if !full {
                break header;
            }
        };
        let mut watch = self.client.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(etcd_revision + 1);
        let mut stream = watch
            .watch(self.commits_prefix(), Some(options))
            .await
            .map_err(|e| backend_error("watching", e))?;
        loop {
            tokio::select! {
                () = sender.closed() => return Ok(()),
                message = stream.message() => {
                    let Some(response) = message.map_err(|e| backend_error("watching", e))? else {
                        return Err(backend_error("watching", "etcd closed the watch"));
                    };
                    if response.canceled() {
                        return Err(backend_error("watching", format!("watch canceled: {}", response.cancel_reason())));
                    }
                    for event in response.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(item) = event.kv() else { continue };
                        let commit: Commit = decode(item.key(), item.value())?;
                        if commit.revision <= *last {
                            continue;
                        }
                        if commit.revision != *last + 1 {
                            // A gap means we missed something: catch up by reading.
                            return Err(backend_error("watching", format!("gap after revision {last}")));
                        }
                        *last = commit.revision;
                        if sender.send(Ok(commit)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.read_meta().await?.0)
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let (revision, _, etcd_revision) = self.read_meta().await?;
        let kv = self.kv();
        let response = kv
            .get(
                self.resources_prefix(),
                Some(GetOptions::new().with_prefix().with_revision(etcd_revision)),
            )
            .await
            .map_err(|e| backend_error("reading resources", e))?;
        let mut resources = response
            .kvs()
            .iter()
            .map(|item| decode(item.key(), item.value()))
            .collect::<Result<Vec<Resource>, _>>()?;
        sort_resources(&mut resources);
        Ok(Snapshot {
            revision,
            resources,
        })
    }

    async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>, StoreError> {
        let kv = self.kv();
        let response = kv
            .get(self.resource_key(key), None)
            .await
            .map_err(|e| backend_error("reading resource", e))?;
        match response.kvs().first() {
            Some(item) => decode(item.key(), item.value()).map(Some),
            None => Ok(None),
        }
    }

    async fn commit(&self, request: CommitRequest) -> Result<Commit, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            if let Some(commit) = self.try_commit(&request).await? {
                return Ok(commit);
            }
            // A fence that no longer holds is final: never retried.
            if let Some(fence) = &request.fence {
                self.check_fence(fence).await?;
            }
            // Another writer committed between our read and our transaction:
            // read again. Expectations and the base revision are re-checked.
        }
        Err(backend_error(
            "committing",
            format!("gave up after {MAX_ATTEMPTS} attempts: other writers keep getting in first"),
        ))
    }

    async fn history(&self, key: &ResourceKey) -> Result<Vec<HistoryEntry>, StoreError> {
        let kv = self.kv();
        let response = kv
            .get(
                self.history_prefix(key),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Ascend),
                ),
            )
            .await
            .map_err(|e| backend_error("reading history", e))?;
        response
            .kvs()
            .iter()
            .map(|item| decode(item.key(), item.value()))
            .collect()
    }

    async fn commits(&self, after: Revision, limit: usize) -> Result<Vec<Commit>, StoreError> {
        Ok(self.read_commits(after, limit.max(1)).await?.0)
    }

    async fn watch(
        &self,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<Commit, StoreError>>, StoreError> {
        let (sender, receiver) = mpsc::channel(256);
        tokio::spawn(self.clone().pump(after, sender));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

#[async_trait]
impl Coordination for EtcdStore {
    async fn get_key(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let kv = self.kv();
        let response = kv
            .get(self.coord_key(key), None)
            .await
            .map_err(|e| backend_error("reading a key", e))?;
        Ok(response.kvs().first().map(|item| self.entry(item)))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Listing, StoreError> {
        let kv = self.kv();
        let response = kv
            .get(
                self.coord_key(prefix),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Ascend),
                ),
            )
            .await
            .map_err(|e| backend_error("listing keys", e))?;
        Ok(Listing {
            entries: response.kvs().iter().map(|item| self.entry(item)).collect(),
            revision: response.header().map(|h| h.revision()).unwrap_or(0),
        })
    }

    async fn write_keys(
        &self,
        writes: Vec<Write>,
        fence: Option<&Fence>,
    ) -> Result<i64, StoreError> {
        check_batch(&writes)?;
        let mut compares = Vec::new();
        if let Some(fence) = fence {
            compares.push(self.fence_compare(fence));
        }
        let mut operations = Vec::with_capacity(writes.len());
        for write in &writes {
            let key = self.coord_key(&write.key);
            match write.expect {
                Expect::Any => {}
                Expect::Absent => {
                    compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                }
                Expect::Modified(v) => {
                    compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, v));
                }
            }
            operations.push(match &write.value {
                Some(value) => TxnOp::put(
                    key,
                    value.clone(),
                    write
                        .lease
                        .map(|lease| etcd_client::PutOptions::new().with_lease(lease)),
                ),
                None => TxnOp::delete(key, None),
            });
        }
        let kv = self.kv();
        let response = kv
            .txn(Txn::new().when(compares).and_then(operations))
            .await
            .map_err(|e| {
                let text = e.to_string();
                match writes.iter().find_map(|w| w.lease) {
                    Some(lease) if text.contains("lease not found") => {
                        StoreError::LeaseExpired(lease)
                    }
                    _ => backend_error("writing keys", e),
                }
            })?;
        if response.succeeded() {
            return Ok(response.header().map(|h| h.revision()).unwrap_or(0));
        }
        // Say which compare failed: the fence first, then the first key.
        if let Some(fence) = fence {
            self.check_fence(fence).await?;
        }
        for write in &writes {
            if write.expect == Expect::Any {
                continue;
            }
            let actual = self.get_key(&write.key).await?.map(|e| e.modified);
            let holds = match write.expect {
                Expect::Any => true,
                Expect::Absent => actual.is_none(),
                Expect::Modified(v) => actual == Some(v),
            };
            if !holds {
                return Err(key_conflict(&write.key, write.expect, actual));
            }
        }
        Err(StoreError::KeyConflict {
            key: writes[0].key.clone(),
            detail: "changed while the batch was written".into(),
        })
    }

    async fn watch_keys(
        &self,
        prefix: &str,
        after: i64,
    ) -> Result<BoxStream<'static, Result<KeyEvent, StoreError>>, StoreError> {
        let (sender, receiver) = mpsc::channel(256);
        tokio::spawn(self.clone().pump_keys(prefix.to_owned(), after, sender));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        // etcd counts whole seconds.
        let seconds = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
        let response = resend(|| {
            let mut leases = self.client.lease_client();
            async move { leases.grant(seconds, None).await }
        })
        .await
        .map_err(|e| backend_error("granting a lease", e))?;
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let failed = |e| lease_error(lease, "keeping a lease alive", e);
        let (mut keeper, mut stream) = resend(|| {
            let mut leases = self.client.lease_client();
            async move { leases.keep_alive(lease).await }
        })
        .await
        .map_err(failed)?;
        keeper.keep_alive().await.map_err(failed)?;
        let answer = stream
            .message()
            .await
            .map_err(failed)?
            .ok_or_else(|| backend_error("keeping a lease alive", "etcd closed the stream"))?;
        if answer.ttl() <= 0 {
            return Err(StoreError::LeaseExpired(lease));
        }
        Ok(Duration::from_secs(
            u64::try_from(answer.ttl()).unwrap_or(0),
        ))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) => match lease_error(lease, "revoking a lease", e) {
                // Gone already: what revoking asks.
                StoreError::LeaseExpired(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Fence, StoreError> {
        let name = self.coord_key(election.trim_end_matches('/'));
        let mut client = self.campaigns.election_client();
        let response = client
            .campaign(name, value, lease)
            .await
            .map_err(|e| lease_error(lease, "campaigning", e))?;
        let leader = response
            .leader()
            .ok_or_else(|| backend_error("campaigning", "etcd elected nobody"))?;
        Ok(Fence {
            key: self.coord_name(leader.key()),
            term: leader.rev(),
        })
    }

    async fn leader(&self, election: &str) -> Result<Option<Leader>, StoreError> {
        // What etcd's election does: the oldest candidacy leads.
        let prefix = format!("{}/", self.coord_key(election.trim_end_matches('/')));
        let kv = self.kv();
        let response = kv
            .get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            )
            .await
            .map_err(|e| backend_error("reading the leader", e))?;
        Ok(response.kvs().first().map(|item| Leader {
            value: item.value().to_vec(),
            fence: Fence {
                key: self.coord_name(item.key()),
                term: item.create_revision(),
            },
        }))
    }

    async fn resign(&self, fence: &Fence) -> Result<(), StoreError> {
        let key = self.coord_key(&fence.key);
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                fence.term,
            )])
            .and_then([TxnOp::delete(key, None)]);
        self.kv()
            .txn(txn)
            .await
            .map_err(|e| backend_error("resigning", e))?;
        Ok(())
    }
}
