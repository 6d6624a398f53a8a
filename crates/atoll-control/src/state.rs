//! The configuration the config stream serves: the store's resources at one
//! revision, kept current by following the store's watch.
//!
//! Each revision is an immutable [`ConfigState`] behind an `Arc`; streams
//! compare the state they last sent with the newest one to build deltas, so a
//! slow node skips intermediate revisions instead of queueing them.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use atoll_model::{Resource, ResourceKey};
use atoll_store::{Revision, Store};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

/// A resource ready to send: its JSON encoded once for every node.
#[derive(Debug)]
pub(crate) struct WireResource {
    pub(crate) key: ResourceKey,
    pub(crate) resource_version: u64,
    pub(crate) json: Bytes,
    /// The resource itself, for the control plane's own readers (the emergency plan, the
    /// sync gate), which read the cache instead of the store.
    pub(crate) resource: Resource,
}

impl WireResource {
    fn new(resource: &Resource) -> Self {
        let json = serde_json::to_vec(resource).unwrap_or_default();
        Self {
            key: resource.key(),
            resource_version: resource.metadata.resource_version.unwrap_or(0),
            json: Bytes::from(json),
            resource: resource.clone(),
        }
    }
}

/// Every resource at one revision.
#[derive(Debug, Default)]
pub(crate) struct ConfigState {
    pub(crate) revision: Revision,
    pub(crate) resources: BTreeMap<ResourceKey, Arc<WireResource>>,
    /// Who may do what, from the Workspaces of this revision (made when
    /// first asked).
    policy: OnceLock<atoll_access::Policy>,
    /// What registry registrations are checked against (made when first
    /// asked).
    topology: OnceLock<atoll_registry::check::Topology>,
}

impl ConfigState {
    /// The access policy of this revision's Workspaces.
    pub(crate) fn policy(&self) -> &atoll_access::Policy {
        self.policy.get_or_init(|| {
            atoll_access::Policy::from_resources(
                self.resources
                    .iter()
                    .filter(|(key, _)| key.kind == atoll_model::Kind::Workspace)
                    .map(|(_, wire)| &wire.resource),
            )
        })
    }

    /// The zones, cells, Services and Apps of this revision, for the registry.
    pub(crate) fn topology(&self) -> &atoll_registry::check::Topology {
        self.topology.get_or_init(|| {
            atoll_registry::check::Topology::from_resources(
                self.resources
                    .iter()
                    .filter(|(key, _)| {
                        matches!(
                            key.kind,
                            atoll_model::Kind::Zone
                                | atoll_model::Kind::Cell
                                | atoll_model::Kind::Service
                                | atoll_model::Kind::App
                        )
                    })
                    .map(|(_, wire)| &wire.resource),
            )
        })
    }

    /// Every resource, in key order (what `Store::snapshot` returns, without asking the store).
    pub(crate) fn resources(&self) -> Vec<Resource> {
        self.resources
            .values()
            .map(|w| w.resource.clone())
            .collect()
    }
}

/// Holds the newest [`ConfigState`] and tells subscribers when it changes.
#[derive(Clone, Debug)]
pub(crate) struct ConfigCache {
    sender: Arc<watch::Sender<Arc<ConfigState>>>,
}

impl ConfigCache {
    /// Loads the current state and starts following the store.
    pub(crate) async fn start(
        store: Arc<dyn Store>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), atoll_store::StoreError> {
        let snapshot = store.snapshot().await?;
        let state = ConfigState {
            revision: snapshot.revision,
            resources: snapshot
                .resources
                .iter()
                .map(|r| (r.key(), Arc::new(WireResource::new(r))))
                .collect(),
            policy: OnceLock::new(),
            topology: OnceLock::new(),
        };
        let (sender, _) = watch::channel(Arc::new(state));
        let cache = Self {
            sender: Arc::new(sender),
        };
        let follower = cache.clone();
        let task = tokio::spawn(async move { follower.follow(store).await });
        Ok((cache, task))
    }

    async fn follow(self, store: Arc<dyn Store>) {
        loop {
            let from = self.current().revision;
            let mut commits = match store.watch(from).await {
                Ok(commits) => commits,
                Err(error) => {
                    tracing::error!(%error, "cannot watch the store; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(next) = commits.next().await {
                match next {
                    Ok(commit) => {
                        let current = self.current();
                        if commit.revision <= current.revision {
                            continue;
                        }
                        let mut resources = current.resources.clone();
                        for change in &commit.changes {
                            match &change.resource {
                                Some(resource) => {
                                    resources.insert(
                                        change.key.clone(),
                                        Arc::new(WireResource::new(resource)),
                                    );
                                }
                                None => {
                                    resources.remove(&change.key);
                                }
                            }
                        }
                        self.sender.send_replace(Arc::new(ConfigState {
                            revision: commit.revision,
                            resources,
                            policy: OnceLock::new(),
                            topology: OnceLock::new(),
                        }));
                    }
                    Err(error) => {
                        tracing::error!(%error, "store watch failed; resuming");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The newest state.
    pub(crate) fn current(&self) -> Arc<ConfigState> {
        self.sender.borrow().clone()
    }

    /// A receiver that wakes on every new state.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<ConfigState>> {
        self.sender.subscribe()
    }

    /// Waits until the cache has reached `revision` (the store committed it
    /// and the watch delivered it), or the timeout passes.
    pub(crate) async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut receiver = self.subscribe();
        let reached = receiver.wait_for(|state| state.revision >= revision);
        matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
    }
}
