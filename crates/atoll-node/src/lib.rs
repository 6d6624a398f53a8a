//! The config-stream client that every Atoll data-plane node (gateway,
//! sidecar, agent) runs: it follows the control plane, hands each version to
//! the node's [`Installer`], answers ACK or NACK, and keeps the last version
//! that installed on disk so the node starts and serves while the control
//! plane is unreachable (static stability).
//!
//! It does not route traffic or interpret resources beyond decoding them:
//! what a version means is the installer's business.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atoll_api::config::config_stream_client::ConfigStreamClient;
use atoll_api::config::{
    Ack, ConfigUpdate, Heartbeat, Hello, Nack, NodeIdentity, NodeMessage, Positions, node_message,
};

/// How often a node tells the control plane it is alive (the control plane
/// drops a node silent for three intervals).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// An HTTP/2 PING on the config stream's connection when nothing arrived
/// for this long, and how long its answer may take: a replica on a frozen
/// host or behind a partition answers nothing (TCP says nothing either), and
/// the node moves to the next replica within about 3 s instead of running
/// behind it (missing a switchover's fence and flip, and its lease
/// renewals) until the replica comes back.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// After a refused version: the first retry, and the longest wait between
/// retries.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
use atoll_model::{Kind, Located, Origin, Resource, ResourceKey, validate};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// One version of the configuration, as a node receives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// The store revision.
    pub version: u64,
    /// Every resource, in dependency order then by name.
    pub resources: Vec<Resource>,
}

impl NodeConfig {
    /// Validates the whole configuration with the model's rules, so that a
    /// node never runs one that does not pass them (an older control plane,
    /// a hand-edited cache). The error is a NACK reason.
    pub fn validate(&self) -> Result<(), String> {
        let located: Vec<Located> = self
            .resources
            .iter()
            .map(|r| Located {
                resource: r.clone(),
                origin: Origin::Stored {
                    revision: r.metadata.resource_version.unwrap_or(0),
                },
            })
            .collect();
        validate(&located).map_err(|issues| format!("invalid configuration: {issues}"))
    }
}

/// Turns a version into what the node runs. Implemented by the gateway.
pub trait Installer: Send + Sync + 'static {
    /// Compiles and installs `config`, or says why it cannot (that becomes
    /// the NACK reason, and the node keeps what it ran).
    fn install(&self, config: &NodeConfig) -> Result<(), String>;

    /// Called after `install` succeeded for a version from the stream, and
    /// before the node acknowledges it: the ACK (and so a barrier) waits for
    /// it. The SDK uses it to let writes admitted under the previous version
    /// finish, and the app take over newly owned shards, before the new view
    /// takes effect. An error becomes the NACK reason.
    fn activate(&self, _version: u64) -> Activation<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// What [`Installer::activate`] returns.
pub type Activation<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// Who the node is and where its control plane is.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Base URL of the control plane, e.g. `http://127.0.0.1:7400`; for
    /// replicas, several, comma-separated: the node moves to the next one
    /// when its stream ends.
    pub control: String,
    /// Unique node name.
    pub name: String,
    /// `gateway`, `sidecar`, `agent`...
    pub role: String,
    /// The node's zone.
    pub zone: String,
    /// The node's cell, if any.
    pub cell: String,
    /// The node's workspace (empty: `default`): it receives the fleet's
    /// resources and this workspace's.
    pub workspace: String,
    /// Where the last installed version is kept; none disables the cache.
    pub cache: Option<PathBuf>,
    /// How to reach the control plane (TLS material for `https://` URLs).
    pub transport: atoll_transport::Transport,
}

/// What the node knows about its own state, for readiness and status pages.
#[derive(Debug, Default)]
pub struct NodeStatus {
    connected: AtomicBool,
    applied: AtomicU64,
    has_config: AtomicBool,
    from_cache: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl NodeStatus {
    /// Whether the stream to the control plane is open.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The version the node runs (0 if none).
    pub fn applied_version(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Whether the node runs any configuration.
    pub fn has_config(&self) -> bool {
        self.has_config.load(Ordering::Relaxed)
    }

    /// Whether what it runs came from the disk cache (not yet confirmed by
    /// the control plane).
    pub fn from_cache(&self) -> bool {
        self.from_cache.load(Ordering::Relaxed)
    }

    /// The last problem: a refused version or a connection error.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn error(&self, text: String) {
        *self.last_error.lock() = Some(text);
    }

    /// Records a problem of the node's own (shown with [`Self::last_error`]).
    pub fn set_error(&self, text: String) {
        self.error(text);
    }
}

/// What the disk cache holds.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    /// Format marker.
    atoll_config_cache: u32,
    node: String,
    config: NodeConfig,
}

/// Follows the control plane for one node.
pub struct NodeClient {
    options: NodeOptions,
    installer: Arc<dyn Installer>,
    status: Arc<NodeStatus>,
    heartbeat: Duration,
    /// Why the last stream ended, when it could not receive an update:
    /// said in the next Hello, so that `atoll nodes` shows it.
    problem: Mutex<Option<String>>,
    /// The replicas, and the one in use.
    urls: Result<atoll_transport::ControlUrls, String>,
    /// Channels to the replicas.
    channels: atoll_transport::Channels,
    /// The latest replication positions to report (app instances).
    positions: watch::Sender<Option<Positions>>,
}

/// Reports what a node observes on its config stream, to whichever replica
/// holds it: only the latest report counts, so a report waiting to be
/// sent is replaced by a newer one, and a new stream starts with the
/// latest.
#[derive(Clone, Debug)]
pub struct Reporter {
    positions: watch::Sender<Option<Positions>>,
}

impl Reporter {
    /// Reports replication positions.
    pub fn positions(&self, positions: Positions) {
        self.positions.send_replace(Some(positions));
    }
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why a session with the control plane ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Protocol(String),
}

impl NodeClient {
    /// A client for `options` that installs versions with `installer`.
    pub fn new(options: NodeOptions, installer: Arc<dyn Installer>) -> Self {
        Self {
            urls: atoll_transport::ControlUrls::parse(&options.control),
            channels: options.transport.channels(atoll_transport::ChannelOptions {
                connect_timeout: Some(Duration::from_secs(3)),
                timeout: None,
                keepalive: Some((PING_EVERY, PING_TIMEOUT)),
            }),
            options,
            installer,
            status: Arc::new(NodeStatus::default()),
            heartbeat: HEARTBEAT_INTERVAL,
            problem: Mutex::new(None),
            positions: watch::channel(None).0,
        }
    }

    /// Sends reports on the stream.
    pub fn reporter(&self) -> Reporter {
        Reporter {
            positions: self.positions.clone(),
        }
    }

    /// Heartbeats this often instead of [`HEARTBEAT_INTERVAL`] (an agent
    /// beats every second: its silence is part of how the control plane
    /// tells that a cell is lost).
    pub fn set_heartbeat(&mut self, interval: Duration) {
        self.heartbeat = interval.max(Duration::from_millis(100));
    }

    /// Sets the zone the node announces (known only after reading the
    /// cache or asking the control plane).
    pub fn set_zone(&mut self, zone: String) {
        self.options.zone = zone;
    }

    /// The node's status, shared.
    pub fn status(&self) -> Arc<NodeStatus> {
        self.status.clone()
    }

    /// Installs the version in the disk cache, if there is one and it
    /// installs. Returns its version.
    pub fn load_cache(&self) -> Option<u64> {
        let path = self.options.cache.as_ref()?;
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the config cache");
                self.status.error(format!(
                    "cannot read the config cache {}: {e}",
                    path.display()
                ));
                return None;
            }
        };
        let cache: CacheFile = match serde_json::from_slice(&text) {
            Ok(cache) => cache,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable config cache");
                self.status.error(format!(
                    "ignored the config cache {}: it is not a cache file ({e})",
                    path.display()
                ));
                return None;
            }
        };
        if cache.node != self.options.name {
            tracing::warn!(path = %path.display(), cached = %cache.node, "ignoring the config cache of another node");
            self.status.error(format!(
                "ignored the config cache {}: it is node {}'s",
                path.display(),
                cache.node
            ));
            return None;
        }
        match self.installer.install(&cache.config) {
            Ok(()) => {
                let version = cache.config.version;
                self.status.applied.store(version, Ordering::Relaxed);
                self.status.has_config.store(true, Ordering::Relaxed);
                self.status.from_cache.store(true, Ordering::Relaxed);
                tracing::info!(version, path = %path.display(), "running the cached config until the control plane answers");
                Some(version)
            }
            Err(reason) => {
                tracing::warn!(%reason, "the cached config does not install; ignoring it");
                self.status.error(format!(
                    "ignored the config cache: it does not install ({reason})"
                ));
                None
            }
        }
    }

    /// Follows the control plane until `shutdown` turns true, reconnecting
    /// with backoff.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let replicas = self.urls.as_ref().map_or(1, |u| u.all().len());
        let mut tried = 0usize;
        loop {
            let started = Instant::now();
            let url = self
                .urls
                .as_ref()
                .map(|u| u.current().to_owned())
                .unwrap_or_default();
            let result = tokio::select! {
                result = self.session(&url) => result,
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
            };
            self.status.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    tracing::info!("the control plane closed the config stream; reconnecting")
                }
                Err(error) => {
                    tracing::warn!(%error, control = %url, "config stream down; reconnecting");
                    self.status.error(format!("config stream: {error}"));
                }
            }
            // The next replica, at once while some of the list is untried.
            if let Ok(urls) = &self.urls {
                urls.failed(&url);
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
                tried = 0;
            }
            tried += 1;
            if !tried.is_multiple_of(replicas) {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
                }
                continue;
            }
            // Jitter so that a fleet does not reconnect in lockstep.
            let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
            tokio::select! {
                () = tokio::time::sleep(backoff + jitter) => {}
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(&self, url: &str) -> Result<(), SessionError> {
        if let Err(problem) = &self.urls {
            return Err(SessionError::Protocol(problem.clone()));
        }
        // A new channel per session: a stream that ended may have ended
        // with its connection.
        let channel = self
            .channels
            .connect(url)
            .await
            .map_err(SessionError::Connect)?;
        // Any configuration the control plane accepts fits in one message.
        let mut client = ConfigStreamClient::new(channel)
            .max_decoding_message_size(atoll_api::MAX_MESSAGE_BYTES);
        let (outbound, receiver) = mpsc::channel(16);
        let hello = NodeMessage {
            message: Some(node_message::Message::Hello(Hello {
                node: Some(NodeIdentity {
                    name: self.options.name.clone(),
                    role: self.options.role.clone(),
                    zone: self.options.zone.clone(),
                    cell: self.options.cell.clone(),
                    workspace: self.options.workspace.clone(),
                }),
                applied_version: self.status.applied_version(),
                problem: self.problem.lock().clone().unwrap_or_default(),
            })),
        };
        outbound
            .send(hello)
            .await
            .map_err(|_| SessionError::Protocol("stream closed".into()))?;
        let mut inbound = client
            .subscribe(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        self.status.connected.store(true, Ordering::Relaxed);
        tracing::info!(control = %url, "config stream open");
        // The latest report goes to this replica too, right away.
        let mut positions = self.positions.subscribe();
        positions.mark_changed();

        let mut received = Received::default();
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        // After a NACK: when to try installing what was received again (an
        // installer may fail for a passing reason, e.g. a busy database),
        // and the next backoff. A success is reported by a heartbeat.
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let retry_at = retry.map(|(at, _)| at);
            let answer = tokio::select! {
                update = inbound.message() => match update.map_err(|status| self.receive_failed(status))? {
                    Some(update) => {
                        *self.problem.lock() = None;
                        let answer = self.on_update(&mut received, &update).await?;
                        retry = matches!(answer.message, Some(node_message::Message::Nack(_)))
                            .then(|| (tokio::time::Instant::now() + RETRY_FIRST, RETRY_FIRST));
                        answer
                    }
                    None => return Ok(()),
                },
                () = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let backoff = retry.map_or(RETRY_FIRST, |(_, b)| b);
                    match self.install_received(&received).await {
                        Ok(()) => {
                            retry = None;
                            tracing::info!(version = received.version, "config installed on retry");
                        }
                        Err(reason) => {
                            let next = (backoff * 2).min(RETRY_MAX);
                            tracing::warn!(version = received.version, %reason, "config still refused; retrying in {next:?}");
                            retry = Some((tokio::time::Instant::now() + next, next));
                        }
                    }
                    NodeMessage {
                        message: Some(node_message::Message::Heartbeat(Heartbeat {
                            applied_version: self.status.applied_version(),
                        })),
                    }
                }
                _ = heartbeat.tick() => NodeMessage {
                    message: Some(node_message::Message::Heartbeat(Heartbeat {
                        applied_version: self.status.applied_version(),
                    })),
                },
                Ok(()) = positions.changed() => {
                    let Some(report) = positions.borrow_and_update().clone() else {
                        continue;
                    };
                    NodeMessage {
                        message: Some(node_message::Message::Positions(report)),
                    }
                }
            };
            outbound
                .send(answer)
                .await
                .map_err(|_| SessionError::Protocol("stream closed".into()))?;
        }
    }

    /// Notes why receiving failed when the update itself was the trouble
    /// (too large for this node, or undecodable), to say so on the next
    /// Hello: such a stream fails the same way every time.
    fn receive_failed(&self, status: tonic::Status) -> tonic::Status {
        if matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal
        ) {
            let problem = format!("cannot receive an update: {}", status.message());
            self.status.error(problem.clone());
            *self.problem.lock() = Some(problem);
        }
        status
    }

    /// Applies one update to what was received, installs it, and says ACK
    /// or NACK.
    async fn on_update(
        &self,
        received: &mut Received,
        update: &ConfigUpdate,
    ) -> Result<NodeMessage, SessionError> {
        if update.snapshot {
            received.resources.clear();
            received.broken.clear();
        } else if update.base_version != received.version {
            // We missed something: a fresh stream brings a snapshot.
            return Err(SessionError::Protocol(format!(
                "delta from version {} but we hold {}; resyncing",
                update.base_version, received.version
            )));
        }
        received.version = update.version;
        for removed in &update.removed {
            if let Some(kind) = Kind::parse(&removed.kind) {
                let key = ResourceKey::new(kind, removed.name.clone());
                received.resources.remove(&key);
                received.broken.remove(&key);
            }
        }
        for wire in &update.resources {
            let key = Kind::parse(&wire.kind).map(|kind| ResourceKey::new(kind, wire.name.clone()));
            match (key, serde_json::from_slice::<Resource>(&wire.json)) {
                (Some(key), Ok(resource)) => {
                    received.broken.remove(&key);
                    received.resources.insert(key, resource);
                }
                (Some(key), Err(error)) => {
                    received.resources.remove(&key);
                    received.broken.insert(key, error.to_string());
                }
                (None, _) => {
                    tracing::warn!(kind = %wire.kind, "ignoring a resource of a kind this node does not know");
                }
            }
        }
        let result = self.install_received(received).await;
        Ok(match result {
            Ok(()) => {
                tracing::info!(version = update.version, "config installed");
                NodeMessage {
                    message: Some(node_message::Message::Ack(Ack {
                        version: update.version,
                        nonce: update.nonce.clone(),
                    })),
                }
            }
            Err(reason) => {
                tracing::warn!(version = update.version, %reason, "config refused; keeping version {}", self.status.applied_version());
                self.status
                    .error(format!("version {} refused: {reason}", update.version));
                NodeMessage {
                    message: Some(node_message::Message::Nack(Nack {
                        version: update.version,
                        nonce: update.nonce.clone(),
                        reason,
                    })),
                }
            }
        })
    }

    /// Installs and activates what was received; on success it is what the
    /// node runs (and caches).
    async fn install_received(&self, received: &Received) -> Result<(), String> {
        if let Some((key, error)) = received.broken.iter().next() {
            return Err(format!(
                "{key} cannot be decoded by this node ({error}); is the node older than the control plane?"
            ));
        }
        let config = NodeConfig {
            version: received.version,
            resources: received.resources.values().cloned().collect(),
        };
        self.installer.install(&config)?;
        self.installer.activate(config.version).await?;
        let version = config.version;
        self.save_cache(config).await;
        self.status.applied.store(version, Ordering::Relaxed);
        self.status.has_config.store(true, Ordering::Relaxed);
        self.status.from_cache.store(false, Ordering::Relaxed);
        Ok(())
    }

    async fn save_cache(&self, config: NodeConfig) {
        let Some(path) = self.options.cache.clone() else {
            return;
        };
        let cache = CacheFile {
            atoll_config_cache: 1,
            node: self.options.name.clone(),
            config,
        };
        let result = tokio::task::spawn_blocking(move || write_atomically(&path, &cache)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot write the config cache"),
            Err(error) => tracing::warn!(%error, "config cache task failed"),
        }
    }
}

/// What the stream delivered so far (not necessarily installed).
#[derive(Default)]
struct Received {
    version: u64,
    resources: BTreeMap<ResourceKey, Resource>,
    /// Resources this node could not decode, with the error.
    broken: BTreeMap<ResourceKey, String>,
}

/// Writes `cache` to `path` so that a crash leaves the old file or the new
/// one, never half of one: a temporary file, fsync, rename.
fn write_atomically(path: &Path, cache: &CacheFile) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&serde_json::to_vec(cache).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Mutex<Vec<u64>>, bool);

    impl Installer for Recorder {
        fn install(&self, config: &NodeConfig) -> Result<(), String> {
            if self.1 {
                return Err("refused".into());
            }
            self.0.lock().push(config.version);
            Ok(())
        }
    }

    fn options(cache: PathBuf) -> NodeOptions {
        NodeOptions {
            control: "http://127.0.0.1:1".into(),
            name: "gw-1".into(),
            role: "gateway".into(),
            zone: "hz-a".into(),
            cell: String::new(),
            workspace: String::new(),
            cache: Some(cache),
            transport: atoll_transport::Transport::plain(),
        }
    }

    #[test]
    fn the_cache_round_trips_and_names_its_node() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.json");
        let cache = CacheFile {
            atoll_config_cache: 1,
            node: "gw-1".into(),
            config: NodeConfig {
                version: 7,
                resources: Vec::new(),
            },
        };
        write_atomically(&path, &cache).expect("written");
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new()), false));
        let client = NodeClient::new(options(path.clone()), recorder.clone());
        assert_eq!(client.load_cache(), Some(7));
        assert!(client.status().from_cache());
        assert_eq!(*recorder.0.lock(), [7]);

        let mut other = options(path);
        other.name = "gw-2".into();
        let client = NodeClient::new(other, recorder);
        assert_eq!(client.load_cache(), None, "another node's cache is ignored");
    }

    #[test]
    fn a_cache_that_does_not_install_is_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, b"{not json").expect("written");
        let refusing = Arc::new(Recorder(Mutex::new(Vec::new()), true));
        let client = NodeClient::new(options(path.clone()), refusing.clone());
        assert_eq!(client.load_cache(), None);
        let cache = CacheFile {
            atoll_config_cache: 1,
            node: "gw-1".into(),
            config: NodeConfig {
                version: 3,
                resources: Vec::new(),
            },
        };
        write_atomically(&path, &cache).expect("written");
        assert_eq!(client.load_cache(), None);
        assert!(!client.status().has_config());
    }
}
