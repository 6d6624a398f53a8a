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
pub async fn follow(hub: Hub, coordination: Arc<dyn Coordination>) {
    loop {
        match follow_once(&hub, coordination.as_ref()).await {
            Ok(()) => tracing::debug!("the registry watch ended; listing again"),
            Err(error) => {
                tracing::warn!(%error, "cannot follow the service registry; listing again")
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn follow_once(
    hub: &Hub,
    coordination: &dyn Coordination,
) -> Result<(), atoll_store::StoreError> {
    let listing = coordination.list_keys(crate::keys::PREFIX).await?;
    hub.reset(&listing.entries, listing.revision);
    let mut events = coordination
        .watch_keys(crate::keys::PREFIX, listing.revision)
        .await?;
    while let Some(event) = events.next().await {
        hub.apply(&event?);
    }
    Ok(())
}
