//! One replica's index of the registry and its subscribers.
//!
//! Changes are not queued per subscriber: each subscriber holds the set of
//! instance keys that changed since it was last sent anything, and its
//! sender reads their current state when it sends. A slow subscriber costs
//! at most one entry per instance of the services it watches, and is sent
//! the latest state of each, never every step in between.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use atoll_api::registry::{Instance, InstanceKey, RegistryUpdate};
use atoll_store::{Entry, KeyEvent};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{Notify, watch};

use crate::keys::ServiceKey;

/// An instance in its service: (zone, name).
type Slot = (String, String);

/// The registry as one replica knows it, and who watches what.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// True once the registry was listed: before that a snapshot would say
    /// "no instances" for a service that has some.
    ready: watch::Sender<bool>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    services: HashMap<ServiceKey, ServiceEntry>,
    /// The keyspace revision the index reflects.
    revision: i64,
    instances: usize,
}

#[derive(Debug, Default)]
struct ServiceEntry {
    instances: BTreeMap<Slot, Arc<Instance>>,
    watchers: HashMap<u64, Arc<Shared>>,
}

/// What a subscriber has to be sent.
#[derive(Debug, Default)]
struct Shared {
    dirty: Mutex<HashMap<ServiceKey, Dirty>>,
    notify: Notify,
}

#[derive(Debug)]
enum Dirty {
    /// Every instance of the service (it was just added, or the index was
    /// listed again).
    Snapshot,
    /// These instances changed.
    Instances(HashSet<Slot>),
}

impl Shared {
    fn mark(&self, service: &ServiceKey, slot: Option<&Slot>) {
        let mut dirty = self.dirty.lock();
        match (dirty.get_mut(service), slot) {
            (Some(Dirty::Snapshot), _) => return,
            (Some(Dirty::Instances(slots)), Some(slot)) => {
                slots.insert(slot.clone());
            }
            (_, None) => {
                dirty.insert(service.clone(), Dirty::Snapshot);
            }
            (None, Some(slot)) => {
                dirty.insert(
                    service.clone(),
                    Dirty::Instances(HashSet::from([slot.clone()])),
                );
            }
        }
        drop(dirty);
        self.notify.notify_one();
    }
}

/// Counts for metrics and `atoll registry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubCounts {
    /// Instances registered.
    pub instances: usize,
    /// Services with at least one instance or watcher.
    pub services: usize,
    /// The revision the index reflects.
    pub revision: i64,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub, not ready until [`Hub::reset`] gives it a listing.
    pub fn new() -> Self {
        let (ready, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                ready,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Whether the registry was listed once.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Marks the index as no longer followed (the keyspace cannot be
    /// reached): subscriptions should end, so that their subscribers watch
    /// a replica that can, rather than be served a frozen view. The next
    /// [`Hub::reset`] makes it ready again.
    pub fn lost(&self) {
        self.inner
            .ready
            .send_if_modified(|ready| std::mem::replace(ready, false));
    }

    /// Waits until the index is not ready (never listed, or
    /// [`Hub::lost`]).
    pub async fn until_lost(&self) {
        let mut ready = self.inner.ready.subscribe();
        let _ = ready.wait_for(|ready| !*ready).await;
    }

    /// Waits until the registry was listed once.
    pub async fn ready(&self) {
        let mut ready = self.inner.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Replaces the index with a full listing (at start, and after a watch
    /// could not resume): every subscriber is sent what differs.
    pub fn reset(&self, entries: &[Entry], revision: i64) {
        let mut fresh: HashMap<ServiceKey, BTreeMap<Slot, Arc<Instance>>> = HashMap::new();
        for entry in entries {
            if let Some((service, slot, instance)) = decode(entry) {
                fresh.entry(service).or_default().insert(slot, instance);
            }
        }
        let mut state = self.inner.state.lock();
        let mut keys: HashSet<ServiceKey> = state.services.keys().cloned().collect();
        keys.extend(fresh.keys().cloned());
        for service in keys {
            let new = fresh.remove(&service).unwrap_or_default();
            let entry = state.services.entry(service.clone()).or_default();
            let mut changed: Vec<Slot> = Vec::new();
            for (slot, old) in &entry.instances {
                if new.get(slot) != Some(old) {
                    changed.push(slot.clone());
                }
            }
            for slot in new.keys() {
                if !entry.instances.contains_key(slot) {
                    changed.push(slot.clone());
                }
            }
            entry.instances = new;
            for slot in &changed {
                for watcher in entry.watchers.values() {
                    watcher.mark(&service, Some(slot));
                }
            }
        }
        state
            .services
            .retain(|_, e| !e.instances.is_empty() || !e.watchers.is_empty());
        state.revision = state.revision.max(revision);
        state.instances = state.services.values().map(|e| e.instances.len()).sum();
        drop(state);
        self.inner.ready.send_replace(true);
    }

    /// Applies one change of the keyspace.
    pub fn apply(&self, event: &KeyEvent) {
        let mut state = self.inner.state.lock();
        state.revision = state.revision.max(event.revision());
        match event {
            KeyEvent::Put(entry) => {
                let Some((service, slot, instance)) = decode(entry) else {
                    return;
                };
                let service_entry = state.services.entry(service.clone()).or_default();
                let added = service_entry
                    .instances
                    .insert(slot.clone(), instance)
                    .is_none();
                for watcher in service_entry.watchers.values() {
                    watcher.mark(&service, Some(&slot));
                }
                if added {
                    state.instances += 1;
                }
            }
            KeyEvent::Deleted { key, .. } => {
                let Some((service, instance)) = crate::keys::parse(key) else {
                    return;
                };
                let slot = (instance.zone, instance.name);
                let Some(service_entry) = state.services.get_mut(&service) else {
                    return;
                };
                let removed = service_entry.instances.remove(&slot).is_some();
                for watcher in service_entry.watchers.values() {
                    watcher.mark(&service, Some(&slot));
                }
                let empty = service_entry.instances.is_empty() && service_entry.watchers.is_empty();
                if empty {
                    state.services.remove(&service);
                }
                if removed {
                    state.instances -= 1;
                }
            }
        }
    }

    /// A new subscriber, watching nothing yet.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            hub: self.clone(),
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            shared: Arc::new(Shared::default()),
            services: Mutex::new(HashSet::new()),
        }
    }

    /// The instances of every service `filter` keeps, in key order.
    pub fn instances(
        &self,
        mut filter: impl FnMut(&ServiceKey, &Instance) -> bool,
    ) -> Vec<(ServiceKey, Instance)> {
        let state = self.inner.state.lock();
        let mut out: Vec<(ServiceKey, Instance)> = state
            .services
            .iter()
            .flat_map(|(service, entry)| {
                entry
                    .instances
                    .values()
                    .map(move |instance| (service, instance))
            })
            .filter(|(service, instance)| filter(service, instance))
            .map(|(service, instance)| (service.clone(), instance.as_ref().clone()))
            .collect();
        drop(state);
        out.sort_by(|a, b| (&a.0, &a.1.zone, &a.1.name).cmp(&(&b.0, &b.1.zone, &b.1.name)));
        out
    }

    /// How much the hub holds.
    pub fn counts(&self) -> HubCounts {
        let state = self.inner.state.lock();
        HubCounts {
            instances: state.instances,
            services: state.services.len(),
            revision: state.revision,
        }
    }
}

fn decode(entry: &Entry) -> Option<(ServiceKey, Slot, Arc<Instance>)> {
    let (service, key) = crate::keys::parse(&entry.key)?;
    let instance = match Instance::decode(entry.value.as_slice()) {
        Ok(instance) => instance,
        Err(error) => {
            tracing::warn!(key = %entry.key, %error, "a registry entry does not decode; skipped");
            return None;
        }
    };
    Some((service, (key.zone, key.name), Arc::new(instance)))
}

/// One subscriber of a [`Hub`]: the services it watches, and what it has
/// still to be sent. Dropping it stops the watch.
#[derive(Debug)]
pub struct Subscription {
    hub: Hub,
    id: u64,
    shared: Arc<Shared>,
    services: Mutex<HashSet<ServiceKey>>,
}

/// One update of a subscription.
pub type Update = RegistryUpdate;

/// The instances of some service to send to one subscriber, as pointers
/// into the index: made into updates part by part as they are sent.
#[derive(Debug)]
pub struct Pending {
    service: String,
    snapshot: bool,
    present: Vec<Arc<Instance>>,
    gone: Vec<Slot>,
    revision: i64,
}

/// The most instances in one update: a large service's snapshot is sent in
/// parts of this size.
pub const UPDATE_PART: usize = 500;

impl Pending {
    /// The service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The updates, each of at most `part` instances and removals; every
    /// one but the last of a snapshot says `more`.
    pub fn into_updates(self, part: usize) -> impl Iterator<Item = Update> {
        let part = part.max(1);
        let Pending {
            service,
            snapshot,
            present,
            gone,
            revision,
        } = self;
        let mut removed: Vec<InstanceKey> = gone
            .into_iter()
            .map(|(zone, name)| InstanceKey {
                service: service.clone(),
                zone,
                name,
            })
            .collect();
        let parts = present
            .len()
            .div_ceil(part)
            .max(removed.len().div_ceil(part))
            .max(1);
        let mut present = present.into_iter();
        (0..parts).map(move |index| {
            let take_removed = removed.len().min(part);
            RegistryUpdate {
                service: service.clone(),
                snapshot: snapshot && index == 0,
                instances: present
                    .by_ref()
                    .take(part)
                    .map(|i| i.as_ref().clone())
                    .collect(),
                removed: removed.drain(..take_removed).collect(),
                revision,
                more: snapshot && index + 1 < parts,
            }
        })
    }
}

impl Subscription {
    /// Starts watching `service`: its snapshot is sent next.
    pub fn add(&self, service: ServiceKey) {
        if !self.services.lock().insert(service.clone()) {
            return;
        }
        let mut state = self.hub.inner.state.lock();
        state
            .services
            .entry(service.clone())
            .or_default()
            .watchers
            .insert(self.id, self.shared.clone());
        drop(state);
        self.shared.mark(&service, None);
    }

    /// Stops watching `service`.
    pub fn remove(&self, service: &ServiceKey) {
        if !self.services.lock().remove(service) {
            return;
        }
        let mut state = self.hub.inner.state.lock();
        if let Some(entry) = state.services.get_mut(service) {
            entry.watchers.remove(&self.id);
            if entry.watchers.is_empty() && entry.instances.is_empty() {
                state.services.remove(service);
            }
        }
        drop(state);
        self.shared.dirty.lock().remove(service);
    }

    /// The services watched.
    pub fn services(&self) -> HashSet<ServiceKey> {
        self.services.lock().clone()
    }

    /// Waits until something changed for a watched service (and the
    /// registry was listed), then returns what to send: one [`Pending`]
    /// per service that changed, holding the latest state of each instance
    /// that did.
    pub async fn next(&self) -> Vec<Pending> {
        self.hub.ready().await;
        loop {
            let notified = self.shared.notify.notified();
            let pending = self.take();
            if !pending.is_empty() {
                return pending;
            }
            notified.await;
        }
    }

    /// What is to be sent now, if anything, without waiting.
    pub fn take(&self) -> Vec<Pending> {
        let dirty = std::mem::take(&mut *self.shared.dirty.lock());
        if dirty.is_empty() {
            return Vec::new();
        }
        let watched = self.services.lock().clone();
        // Under the lock only pointers are taken: the copies for the wire
        // are made as each part is sent, so that a snapshot of a large
        // service neither holds up the registry's changes nor sits in
        // memory whole.
        let mut taken: Vec<Pending> = Vec::with_capacity(dirty.len());
        let state = self.hub.inner.state.lock();
        let revision = state.revision;
        for (service, what) in dirty {
            if !watched.contains(&service) {
                continue;
            }
            let entry = state.services.get(&service);
            let mut pending = Pending {
                service: service.service,
                snapshot: false,
                present: Vec::new(),
                gone: Vec::new(),
                revision,
            };
            match what {
                Dirty::Snapshot => {
                    pending.snapshot = true;
                    pending.present = entry
                        .map(|e| e.instances.values().cloned().collect())
                        .unwrap_or_default();
                }
                Dirty::Instances(slots) => {
                    let mut slots: Vec<Slot> = slots.into_iter().collect();
                    slots.sort();
                    for slot in slots {
                        match entry.and_then(|e| e.instances.get(&slot)) {
                            Some(instance) => pending.present.push(instance.clone()),
                            None => pending.gone.push(slot),
                        }
                    }
                }
            }
            taken.push(pending);
        }
        drop(state);
        taken.sort_by(|a, b| a.service.cmp(&b.service));
        taken
    }

    /// [`Subscription::take`] as updates of at most `part` instances each.
    pub fn take_updates(&self, part: usize) -> Vec<Update> {
        self.take()
            .into_iter()
            .flat_map(|pending| pending.into_updates(part))
            .collect()
    }

    /// The encoded size of `updates` on the wire, for metrics and tests.
    pub fn wire_bytes(updates: &[Update]) -> usize {
        updates.iter().map(Message::encoded_len).sum()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let services = std::mem::take(&mut *self.services.lock());
        let mut state = self.hub.inner.state.lock();
        for service in &services {
            if let Some(entry) = state.services.get_mut(service) {
                entry.watchers.remove(&self.id);
                if entry.watchers.is_empty() && entry.instances.is_empty() {
                    state.services.remove(service);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
