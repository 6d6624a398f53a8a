//! Keeps a [`Hub`] current from the coordination keyspace: one listing,
//! then one watch of the whole registry prefix, whatever the number of
//! subscribers.

use std::sync::Arc;
use std::time::Duration;

use atoll_store::Coordination;
use futures::StreamExt;

use crate::Hub;

/// Follows the registry in `coordination` into `hub` until the task is
/// dropped. A watch that ends (a compaction, the store restarting) is
/// followed by a listing again, and subscribers are sent what differs.
///
/// When the keyspace cannot be followed for [`LOST_AFTER`], the hub is
/// marked [`Hub::lost`]: its subscribers are sent away to a replica that
/// can, instead of being served a view that no longer moves.
pub async fn follow(hub: Hub, coordination: Arc<dyn Coordination>) {
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        match follow_once(&hub, coordination.as_ref(), &mut failing_since).await {
            Ok(()) => {
                failing_since = None;
                tracing::debug!("the registry watch ended; listing again");
            }
            Err(error) => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= LOST_AFTER && hub.is_ready() {
                    tracing::warn!(%error, "the service registry cannot be followed; ending its watches here");
                    hub.lost();
                } else {
                    tracing::warn!(%error, "cannot follow the service registry; listing again");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long the registry may go unfollowed before the hub is lost.
pub const LOST_AFTER: Duration = Duration::from_secs(2);

async fn follow_once(
    hub: &Hub,
    coordination: &dyn Coordination,
    failing_since: &mut Option<tokio::time::Instant>,
) -> Result<(), atoll_store::StoreError> {
    let listing = coordination.list_keys(crate::keys::PREFIX).await?;
    hub.reset(&listing.entries, listing.revision);
    // Listed: a failure from here on starts its own count.
    *failing_since = None;
    let mut events = coordination
        .watch_keys(crate::keys::PREFIX, listing.revision)
        .await?;
    while let Some(event) = events.next().await {
        hub.apply(&event?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use atoll_store::{
        Coordination, EmbeddedStore, Entry, Fence, KeyEvent, Leader, LeaseId, Listing, StoreError,
        Write,
    };
    use futures::StreamExt;
    use futures::stream::BoxStream;

    use crate::Hub;

    /// A keyspace that can be cut off, as a replica's etcd is when the
    /// replica is partitioned from it.
    struct Cut {
        store: EmbeddedStore,
        down: tokio::sync::watch::Sender<bool>,
    }

    impl Cut {
        fn check(&self) -> Result<(), StoreError> {
            if *self.down.borrow() {
                return Err(StoreError::Backend {
                    backend: "embedded",
                    detail: "cut off".into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl Coordination for Cut {
        async fn get_key(&self, key: &str) -> Result<Option<Entry>, StoreError> {
            self.check()?;
            self.store.get_key(key).await
        }
        async fn list_keys(&self, prefix: &str) -> Result<Listing, StoreError> {
            self.check()?;
            self.store.list_keys(prefix).await
        }
        async fn write_keys(
            &self,
            writes: Vec<Write>,
            fence: Option<&Fence>,
        ) -> Result<i64, StoreError> {
            self.check()?;
            self.store.write_keys(writes, fence).await
        }
        async fn watch_keys(
            &self,
            prefix: &str,
            after: i64,
        ) -> Result<BoxStream<'static, Result<KeyEvent, StoreError>>, StoreError> {
            self.check()?;
            let mut down = self.down.subscribe();
            let events = self.store.watch_keys(prefix, after).await?;
            let cut = async move {
                let _ = down.wait_for(|down| *down).await;
            };
            Ok(events
                .take_until(cut)
                .chain(futures::stream::once(async {
                    Err(StoreError::Backend {
                        backend: "embedded",
                        detail: "cut off".into(),
                    })
                }))
                .boxed())
        }
        async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            self.store.grant(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
            self.store.keep_alive(lease).await
        }
        async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.store.revoke(lease).await
        }
        async fn campaign(
            &self,
            election: &str,
            value: Vec<u8>,
            lease: LeaseId,
        ) -> Result<Fence, StoreError> {
            self.store.campaign(election, value, lease).await
        }
        async fn leader(&self, election: &str) -> Result<Option<Leader>, StoreError> {
            self.store.leader(election).await
        }
        async fn resign(&self, fence: &Fence) -> Result<(), StoreError> {
            self.store.resign(fence).await
        }
    }

    #[tokio::test]
    async fn a_hub_that_cannot_follow_its_keyspace_is_lost_and_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (down, _) = tokio::sync::watch::channel(false);
        let cut = Arc::new(Cut {
            store: EmbeddedStore::open(dir.path()).expect("store"),
            down,
        });
        let hub = Hub::new();
        let follower = tokio::spawn(super::follow(hub.clone(), cut.clone()));
        tokio::time::timeout(Duration::from_secs(5), hub.ready())
            .await
            .expect("listed");
        cut.down.send_replace(true);
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), hub.until_lost())
            .await
            .expect("lost once the keyspace stays out of reach");
        assert!(
            started.elapsed() >= super::LOST_AFTER,
            "{:?}",
            started.elapsed()
        );
        assert!(!hub.is_ready());
        cut.down.send_replace(false);
        tokio::time::timeout(Duration::from_secs(5), hub.ready())
            .await
            .expect("ready again once it can list");
        follower.abort();
    }
}
