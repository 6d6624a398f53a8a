//! The east-west caller's core, shared by `atoll sidecar` and the SDK's
//! client (SDK mode): the endpoint sets of the services a process calls,
//! kept current from the service registry, and the routing of one call to
//! an instance of the cell that owns it (docs/mesh.md).
//!
//! The routing table (from the config stream) decides the cell with
//! [`atoll_routing::RoutingTable::decide_call`]; the [`Router`]'s endpoint
//! sets say which cells have an instance in rotation and pick it, by
//! weight, skipping ejected ones. A caller in sidecar mode and one in SDK
//! mode run this same code, so a provider cannot tell them apart and
//! neither can an operator reading the metrics.

mod endpoints;

use std::sync::Arc;
use std::time::Duration;

use atoll_registry::Registrant;
use atoll_registry::client::Watcher;
use atoll_routing::{CellId, HeaderSource, RequestInfo, RoutingTable};
use http::Method;

pub use endpoints::{EndpointSet, Member, ServiceSets};

use crate::endpoints::Directory;

/// How long a first call to a service waits for the registry's answer.
pub const FIRST_CALL_WAIT: Duration = Duration::from_secs(3);

/// A call the router would not send, as an answer for the caller: an HTTP
/// status, a stable code and a sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The HTTP status to answer with.
    pub status: u16,
    /// `unknownService`, `missingKey`, `shardFenced`, `noEndpoint`...
    pub code: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// Where a call goes.
#[derive(Clone, Debug)]
pub struct Routed {
    /// The service in the table.
    pub service: atoll_routing::ServiceId,
    /// The cell chosen.
    pub cell: CellId,
    /// Its name.
    pub cell_name: String,
    /// The cell's instances of the service.
    pub set: Arc<EndpointSet>,
    /// The routing key, for unitized services.
    pub key: Option<String>,
    /// The shard, for unitized services.
    pub shard: Option<u32>,
    /// The shard map's epoch the call was routed at.
    pub epoch: Option<u64>,
    /// Passive ejection settings of the service.
    pub outlier: atoll_model::OutlierDetection,
}

/// What a call offers to routing.
#[derive(Debug)]
pub struct Call<'a, H: ?Sized> {
    /// The service called.
    pub service: &'a str,
    /// The method (a Bolt call: `POST` unless marked a read).
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The query.
    pub query: Option<&'a str>,
    /// The call's headers.
    pub headers: &'a H,
    /// The key the inbound request carried (`x-atoll-key`, `atoll.key`
    /// baggage), or the key the app passes.
    pub propagated: Option<&'a str>,
}

/// The endpoint sets of the services a process calls, and the routing of
/// its calls.
#[derive(Debug)]
pub struct Router {
    directory: Arc<Directory>,
    watcher: Arc<Watcher>,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for Router {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl Router {
    /// Starts watching `calls` (more are watched from their first call)
    /// for `subscriber`, on the replicas of `urls`.
    pub fn start(
        channels: atoll_transport::Channels,
        urls: atoll_transport::ControlUrls,
        subscriber: Registrant,
        calls: impl IntoIterator<Item = String>,
    ) -> Router {
        let watcher = Arc::new(Watcher::start(channels, urls, subscriber, calls));
        let directory = Arc::new(Directory::default());
        let follower = {
            let watcher = watcher.clone();
            let directory = directory.clone();
            tokio::spawn(async move {
                let mut changed = watcher.subscribe();
                loop {
                    changed.borrow_and_update();
                    watcher.read(|view| directory.refresh(view));
                    if changed.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        Router {
            directory,
            watcher,
            follower,
        }
    }

    /// How many instances it knows, over every service it calls.
    pub fn instances(&self) -> usize {
        self.directory.instances()
    }

    /// A receiver woken after every registry update.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watcher.subscribe()
    }

    /// The endpoint sets of `service`, watching it first if it is new
    /// (waiting for its snapshot, at most `within`).
    pub async fn sets(&self, service: &str, within: Duration) -> Option<Arc<ServiceSets>> {
        if let Some(sets) = self.directory.get(service) {
            return Some(sets);
        }
        self.watcher.add(service);
        let mut changed = self.watcher.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            changed.borrow_and_update();
            self.watcher.read(|view| self.directory.refresh(view));
            if let Some(sets) = self.directory.get(service) {
                return Some(sets);
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Routes one call of a caller in `own_cell` with `table`.
    pub async fn route<H: HeaderSource + ?Sized>(
        &self,
        table: &RoutingTable,
        own_cell: CellId,
        call: &Call<'_, H>,
    ) -> Result<Routed, Refused> {
        let service = call.service;
        let Some(service_id) = table.service_id(service) else {
            return Err(Refused {
                status: 404,
                code: "unknownService",
                message: format!(
                    "service `{service}` does not exist; call a Service of this workspace by its name"
                ),
            });
        };
        let Some(sets) = self.sets(service, FIRST_CALL_WAIT).await else {
            return Err(Refused {
                status: 503,
                code: "noRegistry",
                message: format!(
                    "the registry did not answer for service `{service}` within {FIRST_CALL_WAIT:?}"
                ),
            });
        };
        let info = RequestInfo {
            method: call.method,
            host: Some(service),
            path: call.path,
            query: call.query,
            headers: call.headers,
            body: None,
            forwarded: false,
        };
        let serves = |cell: CellId| {
            table
                .cells
                .get(usize::from(cell))
                .is_some_and(|c| sets.serves(&c.name))
        };
        let decided = table
            .decide_call(service_id, &info, call.propagated, Some(own_cell), &serves)
            .map_err(|refusal| Refused {
                status: refusal.status(),
                code: refusal.code(),
                message: refusal.message(table),
            })?;
        let cell_name = table.cells[usize::from(decided.cell)].name.clone();
        let Some(set) = sets.cells.get(&cell_name).cloned() else {
            return Err(Refused {
                status: 503,
                code: "noEndpoint",
                message: format!("service `{service}` has no instance in cell `{cell_name}`"),
            });
        };
        Ok(Routed {
            service: service_id,
            cell: decided.cell,
            cell_name,
            set,
            key: decided.key.map(|k| k.into_owned()),
            shard: decided.shard,
            epoch: decided.epoch,
            outlier: table
                .services
                .get(service_id as usize)
                .map(|s| s.outlier_detection.clone())
                .unwrap_or_default(),
        })
    }
}
