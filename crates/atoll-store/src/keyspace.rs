//! The embedded store's coordination keyspace: in memory, for the one
//! process that uses a redb file. It behaves as etcd does for what Atoll
//! uses (versions, TTL leases, prefix watches, an election by oldest
//! candidacy), so the control plane runs the same code on both backends.
//! Keys under a lease live in memory only: nothing under a lease survives
//! the process that keeps the lease alive. Keys without a lease (tokens,
//! the audit chain, settings) are also written through to the store's
//! file by the embedded store, inside the same lock, and restored when it
//! opens, as etcd keeps them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::StoreError;
use crate::coordination::{
    Entry, Expect, Fence, KeyEvent, Leader, LeaseId, Listing, Write, check_batch, key_conflict,
};

/// Changes kept for watches that fall behind.
const LOG: usize = 65_536;
/// How often leases are checked for expiry.
const SWEEP: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    revision: i64,
    entries: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
    log: VecDeque<KeyEvent>,
    /// Changes at or before this revision are no longer in the log.
    compacted: i64,
}

impl State {
    fn record(&mut self, event: KeyEvent) {
        self.log.push_back(event);
        while self.log.len() > LOG {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.revision();
            }
        }
    }

    fn remove(&mut self, key: &str, revision: i64) {
        if let Some(entry) = self.entries.remove(key) {
            if let Some(lease) = entry.lease.and_then(|id| self.leases.get_mut(&id)) {
                lease.keys.remove(key);
            }
            self.record(KeyEvent::Deleted {
                key: key.to_owned(),
                revision,
            });
        }
    }

    /// Ends the leases whose time has passed; their keys go in one
    /// revision. Returns whether anything changed.
    fn expire(&mut self, now: Instant) -> bool {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut changed = false;
        for id in expired {
            changed |= self.end_lease(id);
        }
        changed
    }

    fn end_lease(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        if lease.keys.is_empty() {
            return false;
        }
        self.revision += 1;
        let revision = self.revision;
        for key in lease.keys {
            if self.entries.get(&key).is_some_and(|e| e.lease == Some(id)) {
                self.entries.remove(&key);
                self.record(KeyEvent::Deleted { key, revision });
            }
        }
        true
    }

    fn check_fence(&self, fence: &Fence) -> Result<(), StoreError> {
        match self.entries.get(&fence.key) {
            Some(entry) if entry.created == fence.term => Ok(()),
            Some(entry) => Err(StoreError::Fenced {
                term: fence.term,
                detail: format!("the leader key is now of term {}", entry.created),
            }),
            None => Err(StoreError::Fenced {
                term: fence.term,
                detail: "the leader key is gone".into(),
            }),
        }
    }

    fn leader(&self, election: &str) -> Option<(&Entry, Fence)> {
        let prefix = election_prefix(election);
        self.entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, e)| e)
            .min_by_key(|e| e.created)
            .map(|e| {
                (
                    e,
                    Fence {
                        key: e.key.clone(),
                        term: e.created,
                    },
                )
            })
    }
}

fn election_prefix(election: &str) -> String {
    format!("{}/", election.trim_end_matches('/'))
}

/// The in-memory keyspace. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Keyspace {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The newest revision, for watches and campaigns.
    changed: watch::Sender<i64>,
    sweeping: std::sync::atomic::AtomicBool,
}

impl Keyspace {
    pub(crate) fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Shared {
                state: Mutex::new(State {
                    next_lease: 1,
                    ..State::default()
                }),
                changed,
                sweeping: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Runs `f` on the state after expiring leases, and wakes watchers if
    /// anything changed.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.inner.state.lock();
        let before = state.revision;
        state.expire(Instant::now());
        let out = f(&mut state);
        let after = state.revision;
        drop(state);
        if after != before {
            self.inner.changed.send_replace(after);
        }
        out
    }

    /// Checks `fence` and, while the state stays locked, runs `then`: the
    /// resource commit of the embedded store is made under the fence.
    pub(crate) fn under_fence<T>(
        &self,
        fence: Option<&Fence>,
        then: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = self.inner.state.lock();
        state.expire(Instant::now());
        if let Some(fence) = fence {
            state.check_fence(fence)?;
        }
        then()
    }

    fn start_sweeping(&self) {
        if self
            .inner
            .sweeping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.inner
                .sweeping
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return;
        };
        let weak: Weak<Shared> = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                Keyspace { inner }.with(|_| ());
            }
        });
    }

    pub(crate) fn get(&self, key: &str) -> Option<Entry> {
        self.with(|state| state.entries.get(key).cloned())
    }

    pub(crate) fn list(&self, prefix: &str) -> Listing {
        self.with(|state| Listing {
            entries: state
                .entries
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, e)| e.clone())
                .collect(),
            revision: state.revision,
        })
    }

    /// Restores durable keys read back from disk, and the revision the
    /// keyspace had reached: revisions keep growing across restarts.
    pub(crate) fn restore(&self, entries: Vec<Entry>, revision: i64) {
        self.with(|state| {
            state.revision = state.revision.max(revision);
            state.compacted = state.revision;
            for entry in entries {
                state.entries.insert(entry.key.clone(), entry);
            }
        });
    }

    /// Applies a batch; once every check has passed and before anything
    /// changes in memory, `persist` is given the batch's revision and what
    /// each durable key becomes (`None`: deleted, or now under a lease), and
    /// its error leaves everything as it was.
    pub(crate) fn apply_durably(
        &self,
        writes: Vec<Write>,
        fence: Option<&Fence>,
        persist: impl FnOnce(i64, &[(String, Option<Entry>)]) -> Result<(), StoreError>,
    ) -> Result<i64, StoreError> {
        check_batch(&writes)?;
        self.with(|state| {
            if let Some(fence) = fence {
                state.check_fence(fence)?;
            }
            for write in &writes {
                let actual = state.entries.get(&write.key).map(|e| e.modified);
                let ok = match write.expect {
                    Expect::Any => true,
                    Expect::Absent => actual.is_none(),
                    Expect::Modified(v) => actual == Some(v),
                };
                if !ok {
                    return Err(key_conflict(&write.key, write.expect, actual));
                }
                if let Some(lease) = write.lease
                    && !state.leases.contains_key(&lease)
                {
                    return Err(StoreError::LeaseExpired(lease));
                }
            }
            let revision = state.revision + 1;
            let durable: Vec<(String, Option<Entry>)> = writes
                .iter()
                .filter_map(|write| {
                    let before = state.entries.get(&write.key);
                    let was_durable = before.is_some_and(|e| e.lease.is_none());
                    match (&write.value, write.lease) {
                        (Some(value), None) => Some((
                            write.key.clone(),
                            Some(Entry {
                                key: write.key.clone(),
                                value: value.clone(),
                                created: before.map_or(revision, |e| e.created),
                                modified: revision,
                                lease: None,
                            }),
                        )),
                        _ if was_durable => Some((write.key.clone(), None)),
                        _ => None,
                    }
                })
                .collect();
            if !durable.is_empty() {
                persist(revision, &durable)?;
            }
            state.revision = revision;
            for write in writes {
                match write.value {
                    None => state.remove(&write.key, revision),
                    Some(value) => {
                        let previous = state.entries.get(&write.key);
                        let created = previous.map_or(revision, |e| e.created);
                        if let Some(old) = previous.and_then(|e| e.lease)
                            && Some(old) != write.lease
                            && let Some(lease) = state.leases.get_mut(&old)
                        {
                            lease.keys.remove(&write.key);
                        }
                        if let Some(lease) = write.lease.and_then(|id| state.leases.get_mut(&id)) {
                            lease.keys.insert(write.key.clone());
                        }
                        let entry = Entry {
                            key: write.key.clone(),
                            value,
                            created,
                            modified: revision,
                            lease: write.lease,
                        };
                        state.entries.insert(write.key, entry.clone());
                        state.record(KeyEvent::Put(entry));
                    }
                }
            }
            Ok(revision)
        })
    }

    pub(crate) fn watch(
        &self,
        prefix: &str,
        after: i64,
    ) -> BoxStream<'static, Result<KeyEvent, StoreError>> {
        self.start_sweeping();
        let receiver = self.inner.changed.subscribe();
        let stream = futures::stream::unfold(
            (
                self.clone(),
                receiver,
                after,
                prefix.to_owned(),
                VecDeque::new(),
                false,
            ),
            |(space, mut receiver, mut last, prefix, mut buffer, failed)| async move {
                if failed {
                    return None;
                }
                loop {
                    if let Some(event) = buffer.pop_front() {
                        let event: KeyEvent = event;
                        last = event.revision();
                        return Some((Ok(event), (space, receiver, last, prefix, buffer, false)));
                    }
                    receiver.borrow_and_update();
                    let found = {
                        let state = space.inner.state.lock();
                        if last < state.compacted {
                            Err(state.compacted)
                        } else {
                            // The log is in revision order: start after `last`.
                            let from = state.log.partition_point(|e| e.revision() <= last);
                            let events = state
                                .log
                                .range(from..)
                                .filter(|e| e.key().starts_with(&prefix))
                                .cloned()
                                .collect::<Vec<_>>();
                            if events.is_empty() {
                                // Nothing of this prefix up to here.
                                last = last.max(state.revision);
                            }
                            Ok(events)
                        }
                    };
                    match found {
                        Err(compacted) => {
                            let error = StoreError::Backend {
                                backend: "embedded",
                                detail: format!(
                                    "watching {prefix}: revision {last} is compacted (the keyspace keeps changes after {compacted}); list again"
                                ),
                            };
                            return Some((
                                Err(error),
                                (space, receiver, last, prefix, buffer, true),
                            ));
                        }
                        Ok(events) if !events.is_empty() => buffer.extend(events),
                        Ok(_) => {
                            if receiver.changed().await.is_err() {
                                return None;
                            }
                        }
                    }
                }
            },
        );
        Box::pin(stream)
    }

    pub(crate) fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        self.start_sweeping();
        Ok(self.with(|state| {
            let id = state.next_lease;
            state.next_lease += 1;
            state.leases.insert(
                id,
                LeaseState {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        }))
    }

    pub(crate) fn keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError> {
        self.with(|state| match state.leases.get_mut(&id) {
            Some(lease) => {
                lease.deadline = Instant::now() + lease.ttl;
                Ok(lease.ttl)
            }
            None => Err(StoreError::LeaseExpired(id)),
        })
    }

    pub(crate) fn revoke(&self, id: LeaseId) {
        self.with(|state| {
            state.end_lease(id);
        });
    }

    pub(crate) async fn campaign(
        &self,
        election: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Fence, StoreError> {
        let key = format!("{}{lease:x}", election_prefix(election));
        self.with(|state| {
            if !state.leases.contains_key(&lease) {
                return Err(StoreError::LeaseExpired(lease));
            }
            if !state.entries.contains_key(&key) {
                state.revision += 1;
                let revision = state.revision;
                let entry = Entry {
                    key: key.clone(),
                    value,
                    created: revision,
                    modified: revision,
                    lease: Some(lease),
                };
                if let Some(l) = state.leases.get_mut(&lease) {
                    l.keys.insert(key.clone());
                }
                state.entries.insert(key.clone(), entry.clone());
                state.record(KeyEvent::Put(entry));
            }
            Ok(())
        })?;
        let mut changed = self.inner.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let outcome = self.with(|state| {
                let mine = state.entries.get(&key).map(|e| e.created);
                match (mine, state.leader(election)) {
                    (None, _) => Some(Err(StoreError::LeaseExpired(lease))),
                    (Some(_), Some((_, fence))) if fence.key == key => Some(Ok(fence)),
                    _ => None,
                }
            });
            if let Some(outcome) = outcome {
                return outcome;
            }
            // A predecessor's lease ends by time: look again at the sweep.
            let _ = tokio::time::timeout(SWEEP, changed.changed()).await;
        }
    }

    pub(crate) fn leader(&self, election: &str) -> Option<Leader> {
        self.with(|state| {
            state.leader(election).map(|(entry, fence)| Leader {
                value: entry.value.clone(),
                fence,
            })
        })
    }

    pub(crate) fn resign(&self, fence: &Fence) {
        self.with(|state| {
            if state
                .entries
                .get(&fence.key)
                .is_some_and(|e| e.created == fence.term)
            {
                state.revision += 1;
                let revision = state.revision;
                state.remove(&fence.key, revision);
            }
        });
    }
}
