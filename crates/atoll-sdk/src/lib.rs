//! Atoll for application code. An app instance that serves a unitized service
//! uses [`Cell`] to follow the control plane (a config-stream node of role
//! `app`), and asks it:
//!
//! - which shard a key belongs to, which cell owns it, at which epoch;
//! - [`Cell::check_write`]: may this instance accept a write for shard S
//!   that a router sent at epoch E? Only if its cell owns S now, S is not
//!   fenced, and E is the current epoch. A write routed by a stale map is
//!   refused, so two cells never both accept writes for one shard.
//! - where the instances of another cell are (for replication).
//!
//! An app that replicates its data to standby cells reports its replication
//! positions through [`Cell::report_positions`]: the SDK sends them on the
//! config stream, and a switchover's sync gate reads them there, so the
//! control plane never dials an app instance.
//!
//! It does no I/O of its own beyond the config stream, and it is not a data
//! path: requests reach the app through a gateway or a sidecar.

pub mod mesh;

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
pub use atoll_node::Activation;
use atoll_node::{Installer, NodeClient, NodeConfig, NodeOptions, NodeStatus};
use atoll_routing::{CellId, RoutingTable, Scope, ServiceId};
use std::time::{Duration, Instant};

use atoll_api::config::config_stream_client::ConfigStreamClient;
use atoll_api::config::{LeaseRequest, NodeIdentity};
use tokio::sync::{OwnedRwLockReadGuard, RwLock, watch};

/// What an instance is, usually from the environment the agent sets
/// (`ATOLL_*`).
#[derive(Clone, Debug)]
pub struct Identity {
    /// Control plane URL.
    pub control: String,
    /// Instance name (unique).
    pub instance: String,
    /// The cell it serves.
    pub cell: String,
    /// Its zone.
    pub zone: String,
    /// The unitized service it implements.
    pub service: String,
    /// Its workspace (`ATOLL_WORKSPACE`; empty: `default`).
    pub workspace: String,
    /// Where to cache the last config (static stability).
    pub cache: Option<PathBuf>,
    /// How to reach the control plane (TLS material for `https://` URLs).
    pub transport: atoll_transport::Transport,
    /// The files `transport`'s TLS material came from, followed while the
    /// instance runs (its agent renews the certificate in them).
    pub tls_files: atoll_transport::TlsFiles,
    /// The role it follows the config stream as: `app` for an app with the
    /// SDK, `sidecar` for the sidecar beside one.
    pub role: String,
}

impl Identity {
    /// Reads `ATOLL_CONTROL`, `ATOLL_INSTANCE`, `ATOLL_CELL`, `ATOLL_ZONE`,
    /// `ATOLL_SERVICE`, `ATOLL_DATA_DIR` (for the cache) and, for a control
    /// plane that serves TLS, `ATOLL_CA`, `ATOLL_CERT` and `ATOLL_KEY` (the
    /// files the agent wrote for this instance).
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| {
            std::env::var(name)
                .map_err(|_| format!("{name} is not set; run this under an Atoll agent or set it"))
        };
        let file = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let tls_files = atoll_transport::TlsFiles {
            ca: file("ATOLL_CA"),
            cert: file("ATOLL_CERT"),
            key: file("ATOLL_KEY"),
        };
        let transport = match tls_files
            .client()
            .map_err(|e| format!("ATOLL_CA, ATOLL_CERT, ATOLL_KEY: {e}"))?
        {
            Some(tls) => atoll_transport::Transport::with_tls(tls),
            None => atoll_transport::Transport::plain(),
        };
        Ok(Self {
            control: var("ATOLL_CONTROL")?,
            instance: var("ATOLL_INSTANCE")?,
            cell: var("ATOLL_CELL")?,
            zone: var("ATOLL_ZONE")?,
            service: var("ATOLL_SERVICE")?,
            workspace: std::env::var("ATOLL_WORKSPACE").unwrap_or_default(),
            cache: std::env::var_os("ATOLL_DATA_DIR").map(|dir| {
                PathBuf::from(dir).join(format!(
                    "atoll-config-{}.json",
                    var("ATOLL_INSTANCE").unwrap_or_default()
                ))
            }),
            transport,
            tls_files,
            role: "app".into(),
        })
    }
}

/// Why a write is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No configuration yet.
    #[error("this instance has not received the shard map yet")]
    NotReady,
    /// Another cell owns the shard now.
    #[error("shard {shard} belongs to cell {owner}, not {cell} (epoch {epoch})")]
    NotOwner {
        /// The shard.
        shard: u32,
        /// Its owner now.
        owner: String,
        /// This cell.
        cell: String,
        /// The current epoch.
        epoch: u64,
    },
    /// The shard is fenced for a switchover.
    #[error("shard {shard} is fenced for a switchover (epoch {epoch})")]
    Fenced {
        /// The shard.
        shard: u32,
        /// The current epoch.
        epoch: u64,
    },
    /// The router used another epoch than this instance knows.
    #[error("the request was routed at epoch {request} but the shard map is at epoch {current}")]
    StaleEpoch {
        /// The epoch the request carries.
        request: u64,
        /// The epoch this instance knows.
        current: u64,
    },
    /// The cell holds no ownership lease: it cannot reach the control
    /// plane, or the control plane is failing it over.
    #[error("cell {cell} holds no ownership lease ({reason})")]
    NoLease {
        /// This cell.
        cell: String,
        /// Why.
        reason: String,
    },
}

impl Refused {
    /// A stable code for programs (what a sidecar answers with).
    pub fn code(&self) -> &'static str {
        match self {
            Refused::NotReady => "notReady",
            Refused::NotOwner { .. } => "notOwner",
            Refused::Fenced { .. } => "shardFenced",
            Refused::StaleEpoch { .. } => "staleEpoch",
            Refused::NoLease { .. } => "noLease",
        }
    }

    /// The HTTP status that says it: 421 for another cell's shard (route
    /// again), 409 for a stale epoch, 503 (retry) for the rest.
    pub fn status(&self) -> u16 {
        match self {
            Refused::NotOwner { .. } => 421,
            Refused::StaleEpoch { .. } => 409,
            Refused::NotReady | Refused::Fenced { .. } | Refused::NoLease { .. } => 503,
        }
    }
}

/// The ownership lease of this instance's cell, kept by a renewal task.
#[derive(Debug)]
struct Lease {
    state: parking_lot::Mutex<LeaseState>,
}

#[derive(Debug)]
enum LeaseState {
    /// No answer from the control plane yet.
    Unknown(String),
    /// Held until then.
    Until(Instant),
    /// Refused or lapsed, and why.
    None(String),
    /// The control plane ran without leases when it last answered (then):
    /// believed only for [`OFF_TRUST`], so a control plane that restarts
    /// with leases is not ignored by an instance that cannot reach it.
    Off(Instant),
}

/// How long "leases are off" is believed without a new answer.
const OFF_TRUST: Duration = atoll_api::LEASES_OFF_TRUST;

impl Lease {
    /// `Ok(Some(end))` while a lease is held, or while "leases are off" is
    /// believed (until [`OFF_TRUST`] after the answer: a write admitted
    /// then must commit by that time too), or why there is none.
    fn check(&self, cell: &str) -> Result<Option<Instant>, Refused> {
        let refused = |reason: String| Refused::NoLease {
            cell: cell.to_owned(),
            reason,
        };
        match &*self.state.lock() {
            LeaseState::Off(at) if at.elapsed() < OFF_TRUST => Ok(Some(*at + OFF_TRUST)),
            LeaseState::Off(at) => Err(refused(format!(
                "the control plane said leases are off, but has not answered for {} s",
                at.elapsed().as_secs()
            ))),
            LeaseState::Until(until) if Instant::now() < *until => Ok(Some(*until)),
            LeaseState::Until(until) => Err(refused(format!(
                "it lapsed {} ms ago without a renewal from the control plane",
                until.elapsed().as_millis()
            ))),
            LeaseState::Unknown(reason) | LeaseState::None(reason) => Err(refused(reason.clone())),
        }
    }

    /// Renews the lease until `shutdown`: every third of its duration, and
    /// quickly while there is none.
    async fn renew(
        self: Arc<Self>,
        identity: Identity,
        status: Arc<NodeStatus>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Any replica takes a renewal (a follower passes it on to the
        // leader); when the one in use fails, every replica is asked at
        // once and the first to answer is used from then on.
        let urls = match atoll_transport::ControlUrls::parse(&identity.control) {
            Ok(urls) => urls,
            Err(problem) => {
                *self.state.lock() = LeaseState::None(problem);
                return;
            }
        };
        // Short: a renewal stuck at a frozen replica is given up in time to
        // reach another one.
        let channels = identity
            .transport
            .channels(atoll_transport::ChannelOptions {
                connect_timeout: Some(Duration::from_millis(500)),
                timeout: Some(Duration::from_millis(500)),
                keepalive: None,
            });
        let mut clients = std::collections::HashMap::new();
        for url in urls.all() {
            match channels.connect_lazy(url) {
                Ok(channel) => {
                    clients.insert(url.clone(), ConfigStreamClient::new(channel));
                }
                Err(problem) => {
                    *self.state.lock() = LeaseState::None(problem);
                    return;
                }
            }
        }
        loop {
            let url = urls.current().to_owned();
            let Some(client) = clients.get(&url).cloned() else {
                return;
            };
            let sent = Instant::now();
            let request = LeaseRequest {
                node: Some(NodeIdentity {
                    name: identity.instance.clone(),
                    role: "app".into(),
                    zone: identity.zone.clone(),
                    cell: identity.cell.clone(),
                    workspace: identity.workspace.clone(),
                }),
                applied_version: status.applied_version(),
            };
            let mut answer = ask(client, request.clone()).await;
            if answer.is_err() {
                urls.failed(&url);
                // Every replica at once, right away: while the leader
                // changes, whichever leads (or reaches the new leader) first
                // answers, so the lease carries on without a gap.
                if urls.all().len() > 1
                    && let Some((from, grant)) = hedge(&clients, &request).await
                {
                    urls.prefer(&from);
                    answer = Ok(grant);
                }
            }
            let next = match answer {
                Ok(grant) => self.take(grant, sent),
                Err(status) => {
                    let mut state = self.state.lock();
                    if !matches!(*state, LeaseState::Until(until) if until > Instant::now())
                        && !matches!(*state, LeaseState::Off(at) if at.elapsed() < OFF_TRUST)
                    {
                        *state = LeaseState::None(format!(
                            "the control plane does not answer ({url}): {}",
                            status.message()
                        ));
                    }
                    UNANSWERED_RETRY
                }
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Records a grant (or a refusal); returns when to renew next.
    fn take(&self, grant: atoll_api::config::LeaseGrant, sent: Instant) -> Duration {
        let mut state = self.state.lock();
        match (grant.granted, grant.duration_ms) {
            (true, 0) => {
                *state = LeaseState::Off(Instant::now());
                Duration::from_secs(5)
            }
            (true, ms) => {
                let duration = Duration::from_millis(ms);
                *state = LeaseState::Until(sent + duration);
                duration / 3
            }
            (false, _) => {
                // A lease held goes on until it ends; no new one.
                if !matches!(*state, LeaseState::Until(until) if until > Instant::now()) {
                    *state =
                        LeaseState::None(format!("the control plane refused it: {}", grant.reason));
                }
                Duration::from_millis(200)
            }
        }
    }
}

/// How soon a renewal that no replica answered is tried again.
const UNANSWERED_RETRY: Duration = Duration::from_millis(100);

type LeaseClient = ConfigStreamClient<tonic::transport::Channel>;

/// One renewal, bounded by the endpoint's timeout.
async fn ask(
    mut client: LeaseClient,
    request: LeaseRequest,
) -> Result<atoll_api::config::LeaseGrant, tonic::Status> {
    client
        .renew_lease(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The renewal sent to every replica at once: the first answer, and who
/// gave it (none when every replica failed).
async fn hedge(
    clients: &std::collections::HashMap<String, LeaseClient>,
    request: &LeaseRequest,
) -> Option<(String, atoll_api::config::LeaseGrant)> {
    let mut asking = tokio::task::JoinSet::new();
    for (url, client) in clients {
        let (url, client, request) = (url.clone(), client.clone(), request.clone());
        asking.spawn(async move { (url, ask(client, request).await) });
    }
    while let Some(done) = asking.join_next().await {
        if let Ok((url, Ok(grant))) = done {
            return Some((url, grant));
        }
    }
    None
}

/// The current view, immutable.
#[derive(Debug)]
pub struct View {
    /// The routing table, compiled for this instance's zone.
    pub table: RoutingTable,
    /// This instance's service in the table.
    pub service: ServiceId,
    /// This instance's cell in the table.
    pub cell: CellId,
}

impl View {
    /// The current epoch of the service's shard map.
    pub fn epoch(&self) -> u64 {
        self.table.epoch(self.service).unwrap_or(0)
    }

    /// The shard of a key.
    pub fn shard_of(&self, key: &str) -> Option<u32> {
        self.table.shard_of_key(self.service, key)?.ok()
    }

    /// The owner of a shard (cell name) and whether it is fenced.
    pub fn owner(&self, shard: u32) -> Option<(&str, bool)> {
        let (cell, fenced) = self.table.owner(self.service, shard)?;
        Some((self.table.cells[usize::from(cell)].name.as_str(), fenced))
    }

    /// Whether this cell owns `shard`.
    pub fn owns(&self, shard: u32) -> bool {
        self.table
            .owner(self.service, shard)
            .is_some_and(|(c, _)| c == self.cell)
    }

    /// The shards this cell owns.
    pub fn owned_shards(&self) -> Vec<u32> {
        let shards = self.table.shards(self.service).unwrap_or(0);
        (0..shards).filter(|s| self.owns(*s)).collect()
    }

    /// The standby cell (name) of a shard.
    pub fn standby(&self, shard: u32) -> Option<&str> {
        self.table
            .standby(self.service, shard)
            .map(|c| self.table.cells[usize::from(c)].name.as_str())
    }

    /// The addresses of the service's instances in a cell (static and ready
    /// reported ones).
    pub fn endpoints(&self, cell: &str) -> Vec<&str> {
        match self.table.cell_id(cell) {
            Some(id) => self
                .table
                .endpoints_of(self.service, id)
                .iter()
                .map(|e| self.table.endpoints[*e as usize].address.as_str())
                .collect(),
            None => Vec::new(),
        }
    }
}

/// What an app does when its cell's view of ownership changes: called with
/// the current view (none at start) and the next one, while no write is
/// admitted, before the next view takes effect and before the control plane
/// hears that this instance runs it. A bank takes over the data of shards
/// its cell now owns here (from what replication brought it). An error
/// keeps the current view and is reported to the control plane (NACK).
pub trait Ownership: Send + Sync + 'static {
    /// Prepares for `next`.
    fn prepare(&self, current: Option<Arc<View>>, next: Arc<View>) -> Activation<'_>;
}

/// An [`Ownership`] that has nothing to prepare.
#[derive(Debug, Default)]
pub struct NoPreparation;

impl Ownership for NoPreparation {
    fn prepare(&self, _: Option<Arc<View>>, _: Arc<View>) -> Activation<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
}

struct ViewInstaller {
    identity: Identity,
    view: Arc<ArcSwapOption<View>>,
    /// Compiled by `install`, not yet in effect.
    staged: parking_lot::Mutex<Option<(u64, Arc<View>)>>,
    /// Held shared by every admitted write until it finishes; held
    /// exclusively while a view changes.
    gate: Arc<RwLock<()>>,
    /// One activation at a time.
    activating: tokio::sync::Mutex<()>,
    ownership: Arc<dyn Ownership>,
    changed: watch::Sender<u64>,
}

impl ViewInstaller {
    /// Puts the staged view in effect: waits for the writes admitted under
    /// the current view, lets the app prepare, then swaps.
    async fn activate_staged(&self) -> Result<(), String> {
        let _one = self.activating.lock().await;
        let Some((version, next)) = self.staged.lock().take() else {
            return Ok(());
        };
        let _exclusive = self.gate.write().await;
        let current = self.view.load_full();
        self.ownership.prepare(current, next.clone()).await?;
        self.view.store(Some(next));
        self.changed.send_replace(version);
        Ok(())
    }
}

impl Installer for ViewInstaller {
    fn install(&self, config: &NodeConfig) -> Result<(), String> {
        config.validate()?;
        let table = RoutingTable::compile(
            config.version,
            &config.resources,
            &Scope {
                zone: self.identity.zone.clone(),
                gateway: None,
                peer_tls: false,
            },
        )?;
        let service = table
            .service_id(&self.identity.service)
            .ok_or_else(|| format!("service `{}` does not exist", self.identity.service))?;
        let cell = table
            .cell_id(&self.identity.cell)
            .ok_or_else(|| format!("cell `{}` does not exist", self.identity.cell))?;
        *self.staged.lock() = Some((
            config.version,
            Arc::new(View {
                table,
                service,
                cell,
            }),
        ));
        Ok(())
    }

    fn activate(&self, _version: u64) -> Activation<'_> {
        Box::pin(self.activate_staged())
    }
}

/// Leave to write, from [`Cell::admit_write`]: hold it until the write is
/// committed (or abandoned). While any permit taken under a view is held,
/// the next view does not take effect, so once an instance has acknowledged
/// a version (what a barrier waits for), no write admitted under an older
/// version is still in flight.
#[derive(Debug)]
pub struct WritePermit {
    view: Arc<View>,
    lease_until: Option<Instant>,
    _shared: OwnedRwLockReadGuard<()>,
}

impl WritePermit {
    /// The view the write was admitted under.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// When the cell's ownership lease ends (or, with leases off, when the
    /// control plane's "off" stops being believed). A write must not
    /// commit after it: check [`WritePermit::still_valid`] right before the
    /// commit, inside the transaction.
    pub fn lease_until(&self) -> Option<Instant> {
        self.lease_until
    }

    /// Whether the lease the write was admitted under still holds.
    pub fn still_valid(&self) -> bool {
        self.lease_until.is_none_or(|until| Instant::now() < until)
    }
}

/// A cell's view of the world, kept current.
#[derive(Clone)]
pub struct Cell {
    identity: Identity,
    view: Arc<ArcSwapOption<View>>,
    gate: Arc<RwLock<()>>,
    lease: Arc<Lease>,
    status: Arc<NodeStatus>,
    changed: watch::Receiver<u64>,
    reporter: atoll_node::Reporter,
    /// Wakes the positions reporter (see [`Cell::positions_changed`]).
    positions_changed: Arc<tokio::sync::Notify>,
    shutdown: watch::Receiver<bool>,
}

/// At most one read of the positions per this long on changes (a view
/// change is read at once: the sync gate waits for it).
const POSITIONS_MIN_INTERVAL: Duration = Duration::from_millis(50);
/// A report goes out at least this often, changed or not.
const POSITIONS_EVERY: Duration = Duration::from_secs(1);

/// Where an app's replication positions come from (see
/// [`Cell::report_positions`]).
pub trait PositionSource: Send + Sync + 'static {
    /// Per shard that `view` says this cell owns: the last log position
    /// written and the position its standby confirmed. Read it after this
    /// call starts: the SDK stamps the report with the view's version, and
    /// the writes admitted under older views are all done by then.
    fn read(&self, view: Arc<View>) -> PositionsRead<'_>;
}

/// What [`PositionSource::read`] returns.
pub type PositionsRead<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<ShardReport>, String>> + Send + 'a>,
>;

/// The replication of one shard, as the app reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardReport {
    /// The shard.
    pub shard: u32,
    /// The last log position that changed it here.
    pub written: i64,
    /// The position its standby confirmed.
    pub acknowledged: i64,
    /// The standby cell it replicates to.
    pub standby: Option<String>,
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cell")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Cell {
    /// Starts following the control plane (from the cache at once, if there
    /// is one) until `shutdown` turns true.
    pub fn start(identity: Identity, shutdown: watch::Receiver<bool>) -> Cell {
        Cell::start_with(identity, shutdown, Arc::new(NoPreparation))
    }

    /// Like [`Cell::start`], with `ownership` called before every change of
    /// view (the first included).
    pub fn start_with(
        identity: Identity,
        shutdown: watch::Receiver<bool>,
        ownership: Arc<dyn Ownership>,
    ) -> Cell {
        identity
            .tls_files
            .follow(identity.transport.tls().cloned(), None);
        let view = Arc::new(ArcSwapOption::empty());
        let gate = Arc::new(RwLock::new(()));
        let (changed, receiver) = watch::channel(0);
        let installer = Arc::new(ViewInstaller {
            identity: identity.clone(),
            view: view.clone(),
            staged: parking_lot::Mutex::new(None),
            gate: gate.clone(),
            activating: tokio::sync::Mutex::new(()),
            ownership,
            changed,
        });
        let client = NodeClient::new(
            NodeOptions {
                control: identity.control.clone(),
                name: identity.instance.clone(),
                role: identity.role.clone(),
                zone: identity.zone.clone(),
                cell: identity.cell.clone(),
                workspace: identity.workspace.clone(),
                cache: identity.cache.clone(),
                transport: identity.transport.clone(),
            },
            installer.clone(),
        );
        if client.load_cache().is_some() {
            let installer = installer.clone();
            tokio::spawn(async move {
                if let Err(reason) = installer.activate_staged().await {
                    tracing::warn!(%reason, "the cached shard map could not take effect; waiting for the control plane");
                }
            });
        }
        let status = client.status();
        let lease = Arc::new(Lease {
            state: parking_lot::Mutex::new(LeaseState::Unknown(
                "no answer from the control plane yet".into(),
            )),
        });
        tokio::spawn(
            lease
                .clone()
                .renew(identity.clone(), status.clone(), shutdown.clone()),
        );
        let reporter = client.reporter();
        tokio::spawn(client.run(shutdown.clone()));
        Cell {
            identity,
            view,
            gate,
            lease,
            status,
            changed: receiver,
            reporter,
            positions_changed: Arc::new(tokio::sync::Notify::new()),
            shutdown,
        }
    }

    /// Reports the app's replication positions on the config stream until
    /// shutdown: read from `source` when the view changes (every new
    /// config version is answered by a report read under it, at once),
    /// every second, and, while shards of this cell are fenced and the last
    /// report had a standby behind, when [`Cell::positions_changed`] says
    /// so (at most one read per 50 ms): a sync gate waiting for a standby
    /// hears at once that it caught up, and a busy app is read once a
    /// second. A switchover's sync gate waits for positions read
    /// under the version that began it (committed after its fence barrier)
    /// that show the standby caught up.
    pub fn report_positions(&self, source: Arc<dyn PositionSource>) {
        let view = self.view.clone();
        let mut versions = self.changed.clone();
        let wake = self.positions_changed.clone();
        let reporter = self.reporter.clone();
        let mut shutdown = self.shutdown.clone();
        let service = self.identity.service.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(POSITIONS_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            // Whether the last report had a standby behind: only then, and
            // only while shards of this cell are fenced, is a change worth
            // a read before the next view or the next second.
            let mut behind = true;
            // Whether the view last read fences shards of this cell: only a
            // sync gate waits for a standby to catch up, and only on those.
            // Every view change is read, so this follows the view.
            let mut gated = true;
            let mut last_read = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = wake.notified() => {
                        if !(gated && (behind || failing)) {
                            continue;
                        }
                        tokio::select! {
                            () = tokio::time::sleep_until(last_read + POSITIONS_MIN_INTERVAL) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                    Ok(()) = versions.changed() => {}
                    _ = every.tick() => {}
                    _ = shutdown.changed() => return,
                }
                // The version first: the view read next is this one or a
                // newer one, never older.
                let version = *versions.borrow_and_update();
                let Some(current) = view.load_full() else {
                    continue;
                };
                last_read = tokio::time::Instant::now();
                gated = current
                    .owned_shards()
                    .into_iter()
                    .any(|shard| current.owner(shard).is_some_and(|(_, fenced)| fenced));
                match source.read(current).await {
                    Ok(shards) => {
                        failing = false;
                        behind = shards
                            .iter()
                            .any(|s| s.standby.is_some() && s.acknowledged < s.written);
                        reporter.positions(atoll_api::config::Positions {
                            applied_version: version,
                            service: service.clone(),
                            shards: shards
                                .into_iter()
                                .map(|s| atoll_api::config::ShardPositionReport {
                                    shard: s.shard,
                                    written: s.written,
                                    acknowledged: s.acknowledged,
                                    standby: s.standby.unwrap_or_default(),
                                })
                                .collect(),
                        });
                    }
                    Err(reason) => {
                        if !failing {
                            tracing::warn!(%reason, "cannot read the replication positions to report them; the last report stands");
                        }
                        failing = true;
                    }
                }
            }
        });
    }

    /// The app's replication positions changed (a write, a standby's
    /// confirmation): while shards of this cell are fenced and the last
    /// report had a standby behind, a report goes out within 50 ms.
    pub fn positions_changed(&self) {
        self.positions_changed.notify_one();
    }

    /// The identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The current view, once there is one.
    pub fn view(&self) -> Option<Arc<View>> {
        self.view.load_full()
    }

    /// Waits for the first view.
    pub async fn ready(&self) -> Arc<View> {
        let mut changed = self.changed.clone();
        loop {
            if let Some(view) = self.view() {
                return view;
            }
            if changed.changed().await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }

    /// The config stream's status (connected, applied version).
    pub fn status(&self) -> &NodeStatus {
        &self.status
    }

    /// Admits a write for `shard` routed at `epoch` (the `x-atoll-epoch` a
    /// gateway adds; `None` when the request did not come through one, then
    /// only ownership is checked), or says why not (see
    /// [`Cell::check_write`]). Hold the permit until the write is committed.
    pub async fn admit_write(
        &self,
        shard: u32,
        epoch: Option<u64>,
    ) -> Result<WritePermit, Refused> {
        let shared = self.gate.clone().read_owned().await;
        let view = self.check_write(shard, epoch)?;
        let lease_until = self.lease.check(&self.identity.cell)?;
        Ok(WritePermit {
            view,
            lease_until,
            _shared: shared,
        })
    }

    /// Whether the cell's ownership lease is held now (or the control plane
    /// runs without leases), and until when; why not, when it is not.
    pub fn lease(&self) -> Result<Option<Instant>, Refused> {
        self.lease.check(&self.identity.cell)
    }

    /// Whether this instance may accept a write for `shard` routed at
    /// `epoch`: only if its cell owns the shard now, the shard is not fenced,
    /// and `epoch` (when given) is the current epoch. A check, not a permit:
    /// a write must use [`Cell::admit_write`], which keeps the next view
    /// from taking effect until the write is done.
    pub fn check_write(&self, shard: u32, epoch: Option<u64>) -> Result<Arc<View>, Refused> {
        let view = self.view().ok_or(Refused::NotReady)?;
        let current = view.epoch();
        let (owner, fenced) = view.owner(shard).ok_or(Refused::NotReady)?;
        if owner != self.identity.cell {
            return Err(Refused::NotOwner {
                shard,
                owner: owner.to_owned(),
                cell: self.identity.cell.clone(),
                epoch: current,
            });
        }
        if fenced {
            return Err(Refused::Fenced {
                shard,
                epoch: current,
            });
        }
        if let Some(request) = epoch
            && request != current
        {
            return Err(Refused::StaleEpoch { request, current });
        }
        self.lease.check(&self.identity.cell)?;
        Ok(view)
    }
}
