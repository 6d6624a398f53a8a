//! Data-plane nodes known to the control plane, their applied versions, and
//! barriers that wait on them.
//!
//! A node that disconnects stays known because it may still be serving with
//! the config it had. A switchover's barrier waits for it only as long as it
//! could still be *writing*: until every lease (or "leases are off" answer)
//! it got has run out. After that, whatever it still routes by an old shard
//! map reaches an app that refuses it (not the owner, fenced, or a stale
//! epoch), and it cannot write itself. A generic barrier (`atoll barrier`)
//! waits for disconnected nodes as laggards. Disconnected nodes are
//! forgotten after the node expiry, or on request (`atoll nodes forget
//! NAME`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_api::rest::{
    BarrierResponse, Laggard, NackInfo, NodeInfo, NodeSelector, ReportedPositions, ReportedShard,
    SkippedNode,
};
use atoll_store::{Coordination, KeyEvent, Write};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};

/// Where replicas publish the nodes they serve.
pub(crate) const NODES: &str = "nodes/";
/// Where each replica says it is alive, under a lease of its own
/// (`Control::announce`).
pub(crate) const REPLICAS: &str = "replicas/";

/// How long node changes gather before they are published together.
const PUBLISH_COALESCE: Duration = Duration::from_millis(5);

/// Positions that only moved on (the same version, the same shards caught
/// up) are published to the other replicas at most this often: an app
/// reports them at its write rate, and the leader needs them at once only
/// when they say something new (read under a new version, a standby caught up).
const POSITIONS_PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// A replica's URL as a key segment.
pub(crate) fn replica_key(url: &str) -> String {
    url.replace("://", "-").replace(['/', ':'], "-")
}

/// The URL in a replica's report (`replicas/` value).
fn replica_url(value: &[u8]) -> Option<String> {
    serde_json::from_slice::<atoll_api::rest::ReplicaInfo>(value)
        .ok()
        .map(|r| r.url)
}

/// A node as a replica publishes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Published {
    info: NodeInfo,
    /// When its stream ended (RFC 3339), while it is disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disconnected: Option<String>,
}

/// A node as another replica published it.
#[derive(Clone, Debug)]
struct Remote {
    published: Published,
    identity: Identity,
}

/// The identity a node gives in `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) zone: String,
    pub(crate) cell: String,
}

#[derive(Debug)]
struct Record {
    identity: Identity,
    connection: u64,
    connected: bool,
    peer: Option<String>,
    applied_version: u64,
    sent_version: u64,
    last_nack: Option<NackInfo>,
    /// Why it cannot receive the configuration (its word on connecting, or
    /// the stream's), until it acknowledges a version.
    problem: Option<String>,
    last_seen: OffsetDateTime,
    disconnected_at: Option<Instant>,
    /// Closes the current stream when a newer one takes the name.
    kick: Option<oneshot::Sender<()>>,
    /// The replication positions it reported last.
    positions: Option<ReportedPositions>,
    /// When its positions were last published.
    positions_published: Option<Instant>,
}

impl Record {
    fn info(&self, replica: &str) -> NodeInfo {
        NodeInfo {
            name: self.identity.name.clone(),
            role: self.identity.role.clone(),
            zone: self.identity.zone.clone(),
            cell: self.identity.cell.clone(),
            connected: self.connected,
            peer: self.peer.clone(),
            applied_version: self.applied_version,
            sent_version: self.sent_version,
            last_nack: self.last_nack.clone(),
            problem: self.problem.clone(),
            last_seen: rfc3339(self.last_seen),
            replica: Some(replica.to_owned()),
            positions: self.positions.clone(),
        }
    }

    fn seen(&self, replica: &str) -> Seen {
        Seen {
            identity: self.identity.clone(),
            connected: self.connected,
            applied_version: self.applied_version,
            last_nack: self.last_nack.clone(),
            problem: self.problem.clone(),
            disconnected_at: self.disconnected_at,
            last_seen: self.last_seen,
            info: self.info(replica),
        }
    }
}

/// A node as this replica sees it, from its own streams or from what
/// another replica published.
#[derive(Clone, Debug)]
struct Seen {
    identity: Identity,
    connected: bool,
    applied_version: u64,
    last_nack: Option<NackInfo>,
    problem: Option<String>,
    /// Since when it is not connected (this replica's clock).
    disconnected_at: Option<Instant>,
    last_seen: OffsetDateTime,
    info: NodeInfo,
}

impl Seen {
    fn matches(&self, selector: &NodeSelector) -> bool {
        let id = &self.identity;
        selector.matches(&id.name, &id.role, &id.zone, &id.cell)
    }
}

pub(crate) fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// `at` (wall clock) as an instant of this process, for "how long ago".
pub(crate) fn instant_of(at: OffsetDateTime) -> Instant {
    let ago: Duration = (OffsetDateTime::now_utc() - at)
        .try_into()
        .unwrap_or(Duration::ZERO);
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// The shards whose standby holds everything written.
fn caught_up(positions: &ReportedPositions) -> Vec<u32> {
    positions
        .shards
        .iter()
        .filter(|s| s.standby.is_some() && s.acknowledged >= s.written)
        .map(|s| s.shard)
        .collect()
}

/// RFC 3339 text of a time.
pub(crate) fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Nodes a barrier waits for even when they are not registered, and when a
/// node that is not connected stops counting.
struct Expected<'a> {
    names: &'a [String],
    expiry: Duration,
    /// Whether a node (by name) that is not connected can no longer write
    /// (none: disconnected nodes always count).
    released: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
}

impl Expected<'_> {
    const NONE: Expected<'static> = Expected {
        names: &[],
        expiry: Duration::ZERO,
        released: None,
    };
}

/// How long ago, in words.
fn ago(instant: Instant) -> String {
    let elapsed = instant.elapsed();
    if elapsed < Duration::from_secs(10) {
        format!("{:.1} s ago", elapsed.as_secs_f64())
    } else {
        format!("{} s ago", elapsed.as_secs())
    }
}

/// What forgetting a node found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Forget {
    Forgotten,
    Connected,
    Unknown,
}

/// Every node, and a signal that fires on any change of their versions.
#[derive(Debug)]
pub(crate) struct NodeRegistry {
    /// This replica's URL (what it publishes its nodes under).
    replica: String,
    nodes: Mutex<BTreeMap<String, Record>>,
    /// What the other replicas published: name -> replica -> node.
    remote: Mutex<BTreeMap<String, BTreeMap<String, Remote>>>,
    /// The replicas alive (by URL), and since when a replica that was is
    /// gone (its nodes count as disconnected from then).
    replicas: Mutex<Replicas>,
    /// Local nodes changed since they were last published.
    dirty: Mutex<BTreeSet<String>>,
    publish: tokio::sync::Notify,
    /// Whether anyone publishes (replicas on etcd): if not, no change is
    /// kept for it.
    publishing: std::sync::atomic::AtomicBool,
    /// When this control plane started: a node a switchover expects that
    /// has not connected since counts as disconnected from then.
    started: Instant,
    /// Names forgotten by request, never waited for as expected nodes.
    forgotten: Mutex<std::collections::HashSet<String>>,
    next_connection: Mutex<u64>,
    changed: watch::Sender<u64>,
}

/// The replicas alive, as the `replicas/` keys say.
#[derive(Debug, Default)]
struct Replicas {
    /// Key -> URL.
    alive: HashMap<String, String>,
    /// URL -> when its key went.
    gone: HashMap<String, Instant>,
}

impl NodeRegistry {
    /// A registry of one replica alone (tests).
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::for_replica("http://127.0.0.1:7400".into())
    }

    pub(crate) fn for_replica(replica: String) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            replica,
            remote: Mutex::new(BTreeMap::new()),
            replicas: Mutex::new(Replicas::default()),
            dirty: Mutex::new(BTreeSet::new()),
            publish: tokio::sync::Notify::new(),
            publishing: std::sync::atomic::AtomicBool::new(false),
            nodes: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            forgotten: Mutex::new(std::collections::HashSet::new()),
            next_connection: Mutex::new(0),
            changed,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// `name` changed here: publish it.
    fn touch(&self, name: &str) {
        if !self.publishing.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.dirty.lock().insert(name.to_owned());
        self.publish.notify_one();
    }

    /// Every node known, local or published by another replica, one entry
    /// per name: a connected stream first, else the latest heard of.
    fn fleet(&self) -> BTreeMap<String, Seen> {
        let mut out: BTreeMap<String, Seen> = BTreeMap::new();
        for (name, record) in self.nodes.lock().iter() {
            out.insert(name.clone(), record.seen(&self.replica));
        }
        let replicas = self.replicas.lock();
        let alive = |url: &str| replicas.alive.values().any(|u| u == url);
        for (name, by_replica) in self.remote.lock().iter() {
            for (url, remote) in by_replica {
                let info = &remote.published.info;
                let live = info.connected && alive(url);
                let disconnected_at = if live {
                    None
                } else if info.connected {
                    // Its replica went while it was connected.
                    Some(replicas.gone.get(url).copied().unwrap_or(self.started))
                } else {
                    remote
                        .published
                        .disconnected
                        .as_deref()
                        .and_then(parse_time)
                        .map(instant_of)
                        .or(Some(self.started))
                };
                let mut shown = info.clone();
                shown.connected = live;
                let candidate = Seen {
                    identity: remote.identity.clone(),
                    connected: live,
                    applied_version: info.applied_version,
                    last_nack: info.last_nack.clone(),
                    problem: info.problem.clone(),
                    disconnected_at,
                    last_seen: parse_time(&info.last_seen).unwrap_or(OffsetDateTime::UNIX_EPOCH),
                    info: shown,
                };
                let better = out.get(name).is_none_or(|current| {
                    (candidate.connected, candidate.last_seen)
                        > (current.connected, current.last_seen)
                });
                if better {
                    out.insert(name.clone(), candidate);
                }
            }
        }
        out
    }

    /// Publishes local changes under `nodes/` until the process ends: one
    /// batch in flight at a time, each with every node changed meanwhile.
    pub(crate) async fn publish(self: Arc<Self>, coordination: Arc<dyn Coordination>) {
        let me = replica_key(&self.replica);
        self.publishing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Whatever is known already goes out first.
        self.dirty.lock().extend(self.nodes.lock().keys().cloned());
        self.publish.notify_one();
        loop {
            self.publish.notified().await;
            // A new version is ACKed by every node within milliseconds:
            // one batch for all of them rather than one write each.
            tokio::time::sleep(PUBLISH_COALESCE).await;
            let names: Vec<String> = std::mem::take(&mut *self.dirty.lock())
                .into_iter()
                .collect();
            for chunk in names.chunks(atoll_store::MAX_WRITES_PER_BATCH) {
                let writes: Vec<Write> = {
                    let nodes = self.nodes.lock();
                    chunk
                        .iter()
                        .map(|name| {
                            let key = format!("{NODES}{name}/{me}");
                            match nodes.get(name) {
                                Some(record) => {
                                    let published = Published {
                                        info: record.info(&self.replica),
                                        disconnected: record.disconnected_at.map(|at| {
                                            rfc3339(OffsetDateTime::now_utc() - at.elapsed())
                                        }),
                                    };
                                    Write::put(
                                        key,
                                        serde_json::to_vec(&published).unwrap_or_default(),
                                    )
                                }
                                None => Write::delete(key),
                            }
                        })
                        .collect()
                };
                if let Err(error) = coordination.write_keys(writes, None).await {
                    tracing::warn!(%error, "cannot publish node states; retrying");
                    self.dirty.lock().extend(chunk.iter().cloned());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.publish.notify_one();
                }
            }
        }
    }

    /// Follows what the other replicas publish, and which replicas are
    /// alive, until the process ends.
    pub(crate) async fn follow(self: Arc<Self>, coordination: Arc<dyn Coordination>) {
        loop {
            if let Err(error) = self.follow_once(coordination.as_ref()).await {
                tracing::warn!(%error, "cannot follow the other replicas' nodes; resuming");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn follow_once(
        &self,
        coordination: &dyn Coordination,
    ) -> Result<(), atoll_store::StoreError> {
        let replicas = coordination.list_keys(REPLICAS).await?;
        let nodes = coordination.list_keys(NODES).await?;
        {
            let mut state = self.replicas.lock();
            let before: Vec<String> = state.alive.values().cloned().collect();
            state.alive.clear();
            for entry in &replicas.entries {
                if let Some(url) = replica_url(&entry.value) {
                    state.gone.remove(&url);
                    state.alive.insert(entry.key.clone(), url);
                }
            }
            for url in before {
                if !state.alive.values().any(|u| *u == url) {
                    state.gone.entry(url).or_insert_with(Instant::now);
                }
            }
        }
        {
            let mut remote = self.remote.lock();
            remote.clear();
            for entry in &nodes.entries {
                self.insert_remote(&mut remote, &entry.value);
            }
        }
        self.bump();
        let own = format!("/{}", replica_key(&self.replica));
        let mut replica_events = coordination.watch_keys(REPLICAS, replicas.revision).await?;
        let mut node_events = coordination.watch_keys(NODES, nodes.revision).await?;
        loop {
            tokio::select! {
                event = replica_events.next() => {
                    let Some(event) = event else { return Ok(()) };
                    let mut state = self.replicas.lock();
                    match event? {
                        KeyEvent::Put(entry) => {
                            if let Some(url) = replica_url(&entry.value) {
                                state.gone.remove(&url);
                                state.alive.insert(entry.key, url);
                            }
                        }
                        KeyEvent::Deleted { key, .. } => {
                            if let Some(url) = state.alive.remove(&key) {
                                tracing::warn!(replica = %url, "a control-plane replica is gone: its nodes count as disconnected");
                                state.gone.insert(url, Instant::now());
                            }
                        }
                    }
                }
                event = node_events.next() => {
                    let Some(event) = event else { return Ok(()) };
                    let event = event?;
                    // Our own records: the local ones say more, and sooner.
                    if event.key().ends_with(&own) {
                        continue;
                    }
                    let mut remote = self.remote.lock();
                    match event {
                        KeyEvent::Put(entry) => self.insert_remote(&mut remote, &entry.value),
                        KeyEvent::Deleted { key, .. } => {
                            // nodes/<name>/<replica key>
                            if let Some((name, replica)) = key
                                .strip_prefix(NODES)
                                .and_then(|rest| rest.rsplit_once('/'))
                                && let Some(by_replica) = remote.get_mut(name)
                            {
                                by_replica.retain(|url, _| replica_key(url) != replica);
                                if by_replica.is_empty() {
                                    remote.remove(name);
                                }
                            }
                        }
                    }
                }
            }
            self.bump();
        }
    }

    fn insert_remote(&self, remote: &mut BTreeMap<String, BTreeMap<String, Remote>>, value: &[u8]) {
        let Ok(published) = serde_json::from_slice::<Published>(value) else {
            return;
        };
        let Some(url) = published.info.replica.clone() else {
            return;
        };
        if url == self.replica {
            // Our own nodes: the local records say more, and sooner.
            return;
        }
        let info = &published.info;
        let identity = Identity {
            name: info.name.clone(),
            role: info.role.clone(),
            zone: info.zone.clone(),
            cell: info.cell.clone(),
        };
        remote.entry(info.name.clone()).or_default().insert(
            url,
            Remote {
                published,
                identity,
            },
        );
    }

    /// Registers a new stream for `identity`, closing an older stream of the
    /// same name. Returns the connection id and a signal that fires when a
    /// newer stream replaces this one.
    /// How long the agents of `zone` have been silent: the shortest
    /// silence among them (since its last message while connected, since it
    /// disconnected otherwise), never more than this control plane's age
    /// (which is the answer when no agent of the zone is known).
    pub(crate) fn agent_silence(&self, zone: &str) -> Duration {
        let now = OffsetDateTime::now_utc();
        let since_start = self.started.elapsed();
        self.fleet()
            .values()
            .filter(|r| r.identity.role == "agent" && r.identity.zone == zone)
            .map(|r| {
                if r.connected {
                    (now - r.last_seen).try_into().unwrap_or(Duration::ZERO)
                } else {
                    r.disconnected_at.map_or(since_start, |at| at.elapsed())
                }
            })
            .min()
            .unwrap_or(since_start)
            .min(since_start)
    }

    /// The names of every node known now (connected or not): what a
    /// switchover expects to hear from, also after a restart.
    pub(crate) fn names(&self) -> Vec<String> {
        self.fleet().into_keys().collect()
    }

    pub(crate) fn connect(
        &self,
        identity: Identity,
        applied_version: u64,
        peer: Option<String>,
        problem: Option<String>,
    ) -> (u64, oneshot::Receiver<()>) {
        let connection = {
            let mut next = self.next_connection.lock();
            *next += 1;
            *next
        };
        let (kick, kicked) = oneshot::channel();
        let name = identity.name.clone();
        self.forgotten.lock().remove(&identity.name);
        let mut nodes = self.nodes.lock();
        // What it reported before stands until it reports again.
        let positions = nodes.get(&identity.name).and_then(|r| r.positions.clone());
        let previous = nodes.insert(
            identity.name.clone(),
            Record {
                identity,
                connection,
                connected: true,
                peer,
                applied_version,
                sent_version: 0,
                last_nack: None,
                problem,
                last_seen: OffsetDateTime::now_utc(),
                disconnected_at: None,
                kick: Some(kick),
                positions,
                positions_published: None,
            },
        );
        if let Some(mut previous) = previous
            && let Some(kick) = previous.kick.take()
        {
            let _ = kick.send(());
        }
        drop(nodes);
        self.touch(&name);
        self.bump();
        (connection, kicked)
    }

    /// Runs `update` on the node's record if `connection` is still its stream.
    fn update(&self, name: &str, connection: u64, update: impl FnOnce(&mut Record)) {
        let mut nodes = self.nodes.lock();
        let mut updated = false;
        if let Some(record) = nodes.get_mut(name)
            && record.connection == connection
        {
            update(record);
            record.last_seen = OffsetDateTime::now_utc();
            updated = true;
        }
        drop(nodes);
        if updated {
            self.touch(name);
        }
        self.bump();
    }

    pub(crate) fn sent(&self, name: &str, connection: u64, version: u64) {
        self.update(name, connection, |r| r.sent_version = version);
    }

    pub(crate) fn acked(&self, name: &str, connection: u64, version: u64) {
        self.update(name, connection, |r| {
            r.applied_version = version;
            r.problem = None;
        });
    }

    /// The control plane could not send the node a version.
    pub(crate) fn problem(&self, name: &str, connection: u64, problem: String) {
        self.update(name, connection, |r| r.problem = Some(problem));
    }

    pub(crate) fn nacked(&self, name: &str, connection: u64, version: u64, reason: String) {
        self.update(name, connection, |r| {
            r.last_nack = Some(NackInfo {
                version,
                reason,
                time: rfc3339(OffsetDateTime::now_utc()),
            });
        });
    }

    /// A heartbeat arrived.
    /// A heartbeat names the version the node runs: a version it refused
    /// and then installed on a retry counts as applied from then on.
    pub(crate) fn reported(&self, name: &str, connection: u64, version: u64) {
        let newer = self
            .nodes
            .lock()
            .get(name)
            .is_some_and(|r| r.connection == connection && r.applied_version < version);
        if newer {
            self.update(name, connection, |r| {
                r.applied_version = r.applied_version.max(version);
                if r.last_nack.as_ref().is_some_and(|n| n.version <= version) {
                    r.last_nack = None;
                }
            });
        } else {
            self.seen(name, connection);
        }
    }

    /// Replication positions arrived: kept at once (the leader's own
    /// streams are read live), published to the other replicas at once
    /// when they say something new, else at most once per second.
    pub(crate) fn positions(
        &self,
        name: &str,
        connection: u64,
        report: atoll_api::config::Positions,
    ) {
        let now = OffsetDateTime::now_utc();
        let reported = ReportedPositions {
            service: report.service,
            applied_version: report.applied_version,
            received: rfc3339(now),
            shards: report
                .shards
                .into_iter()
                .map(|s| ReportedShard {
                    shard: s.shard,
                    written: s.written,
                    acknowledged: s.acknowledged,
                    standby: (!s.standby.is_empty()).then_some(s.standby),
                })
                .collect(),
        };
        let mut nodes = self.nodes.lock();
        let Some(record) = nodes.get_mut(name).filter(|r| r.connection == connection) else {
            return;
        };
        record.last_seen = now;
        let news = record.positions.as_ref().is_none_or(|before| {
            before.applied_version != reported.applied_version
                || before.service != reported.service
                || caught_up(before) != caught_up(&reported)
        });
        let due = news
            || record
                .positions_published
                .is_none_or(|at| at.elapsed() >= POSITIONS_PUBLISH_EVERY);
        record.positions = Some(reported);
        if due {
            record.positions_published = Some(Instant::now());
        }
        drop(nodes);
        if due {
            self.touch(name);
        }
    }

    /// The latest positions reported by the instances of `service` in
    /// `cell`, as this replica sees the fleet (its own streams live, the
    /// others' as published), the latest received first.
    pub(crate) fn reported_positions(&self, service: &str, cell: &str) -> Vec<ReportedPositions> {
        let mut out: Vec<ReportedPositions> = self
            .fleet()
            .into_values()
            .filter(|seen| seen.identity.cell == cell)
            .filter_map(|seen| seen.info.positions)
            .filter(|p| p.service == service)
            .collect();
        out.sort_by_cached_key(|p| std::cmp::Reverse(parse_time(&p.received)));
        out
    }

    pub(crate) fn seen(&self, name: &str, connection: u64) {
        let mut nodes = self.nodes.lock();
        if let Some(record) = nodes.get_mut(name)
            && record.connection == connection
        {
            record.last_seen = OffsetDateTime::now_utc();
        }
    }

    pub(crate) fn disconnected(&self, name: &str, connection: u64) {
        self.update(name, connection, |r| {
            r.connected = false;
            r.disconnected_at = Some(Instant::now());
            r.kick = None;
        });
    }

    /// Every node of the fleet, as this replica sees it.
    pub(crate) fn list(&self) -> Vec<NodeInfo> {
        self.fleet().into_values().map(|s| s.info).collect()
    }

    /// Nodes whose streams this replica holds.
    pub(crate) fn connected_count(&self) -> usize {
        self.nodes.lock().values().filter(|r| r.connected).count()
    }

    /// Connected and disconnected nodes of the fleet.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let seen = self.fleet();
        let connected = seen.values().filter(|r| r.connected).count();
        (connected, seen.len() - connected)
    }

    /// Forgets a disconnected node; returns the keys other replicas
    /// published it under, to delete.
    pub(crate) fn forget(&self, name: &str) -> (Forget, Vec<String>) {
        let connected = self.fleet().get(name).map(|s| s.connected);
        if connected != Some(true) {
            self.forgotten.lock().insert(name.to_owned());
        }
        let result = match connected {
            None => Forget::Unknown,
            Some(true) => Forget::Connected,
            Some(false) => {
                self.nodes.lock().remove(name);
                Forget::Forgotten
            }
        };
        let mut keys = Vec::new();
        if result == Forget::Forgotten {
            self.touch(name);
            if let Some(by_replica) = self.remote.lock().remove(name) {
                keys.extend(
                    by_replica
                        .keys()
                        .map(|url| format!("{NODES}{name}/{}", replica_key(url))),
                );
            }
        }
        self.bump();
        (result, keys)
    }

    /// Forgets nodes disconnected for longer than `expiry`; returns how
    /// many, and the keys of other replicas' nodes to delete.
    pub(crate) fn expire(&self, expiry: Duration) -> (usize, Vec<String>) {
        let mut nodes = self.nodes.lock();
        let gone: Vec<String> = nodes
            .iter()
            .filter(|(_, r)| r.disconnected_at.is_some_and(|at| at.elapsed() >= expiry))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            nodes.remove(name);
        }
        drop(nodes);
        for name in &gone {
            self.touch(name);
        }
        let mut keys = Vec::new();
        let stale: Vec<(String, String)> = self
            .fleet()
            .values()
            .filter(|s| !s.connected && s.disconnected_at.is_some_and(|at| at.elapsed() >= expiry))
            .filter_map(|s| s.info.replica.clone().map(|r| (s.identity.name.clone(), r)))
            .filter(|(_, replica)| *replica != self.replica)
            .collect();
        let mut remote = self.remote.lock();
        for (name, _) in &stale {
            if let Some(by_replica) = remote.remove(name) {
                keys.extend(
                    by_replica
                        .keys()
                        .map(|url| format!("{NODES}{name}/{}", replica_key(url))),
                );
            }
        }
        drop(remote);
        let removed = gone.len() + stale.len();
        if removed > 0 {
            self.bump();
        }
        (removed, keys)
    }

    /// Nodes passing `filter` below `version`, how many passed, and the
    /// disconnected ones not waited for since they can no longer write.
    fn laggards_where(
        &self,
        filter: &dyn Fn(&Seen) -> bool,
        expected: &Expected<'_>,
        version: u64,
    ) -> (usize, Vec<Laggard>, Vec<SkippedNode>) {
        let nodes = self.fleet();
        let mut matched = 0;
        let mut laggards = Vec::new();
        let mut skipped = Vec::new();
        let released = |name: &str| expected.released.is_some_and(|r| r(name));
        // Expected but not heard from since this control plane started: a
        // node that was known before a restart may still run an old map.
        if self.started.elapsed() < expected.expiry {
            let forgotten = self.forgotten.lock();
            for name in expected.names {
                if !nodes.contains_key(name) && !forgotten.contains(name) {
                    if released(name) {
                        skipped.push(SkippedNode {
                            name: name.clone(),
                            reason: format!(
                                "not heard from since the control plane started {}; any lease it held has ended",
                                ago(self.started)
                            ),
                        });
                        continue;
                    }
                    matched += 1;
                    laggards.push(Laggard {
                        name: name.clone(),
                        connected: false,
                        applied_version: 0,
                        last_nack: None,
                        problem: None,
                    });
                }
            }
        }
        for record in nodes.values().filter(|r| filter(r)) {
            if record.applied_version < version
                && !record.connected
                && released(&record.identity.name)
            {
                skipped.push(SkippedNode {
                    name: record.identity.name.clone(),
                    reason: format!(
                        "disconnected {}; any lease it held has ended",
                        record
                            .disconnected_at
                            .map_or_else(|| "a while ago".into(), ago)
                    ),
                });
                continue;
            }
            matched += 1;
            if record.applied_version < version {
                laggards.push(Laggard {
                    name: record.identity.name.clone(),
                    connected: record.connected,
                    applied_version: record.applied_version,
                    last_nack: record.last_nack.clone(),
                    problem: record.problem.clone(),
                });
            }
        }
        (matched, laggards, skipped)
    }

    /// A failover's barrier: every *connected* node that routes or serves,
    /// except those of `lost_cells` (a lost cell's nodes cannot answer; its
    /// lease keeps it from writing instead). Agents are left out: they run
    /// instances but route nothing, and the lost zone's agent is often what
    /// was lost.
    pub(crate) async fn barrier_except(
        &self,
        lost_cells: &[String],
        version: u64,
        timeout: Duration,
    ) -> BarrierResponse {
        let filter = |record: &Seen| {
            record.connected
                && record.identity.role != "agent"
                && !lost_cells.contains(&record.identity.cell)
        };
        self.barrier_with(&filter, &Expected::NONE, version, 0, timeout)
            .await
    }

    /// A planned switchover's barrier: every node known now, and every node
    /// of `expected` (known when the switchover started) that has not come
    /// back since a restart, until `expiry` after the start.
    ///
    /// A node that is not connected stops counting once `released` says it
    /// can no longer write (every lease it got has ended): what it may
    /// still route by an older map is refused by the app's ownership and
    /// epoch checks. Nodes of `gone_cells` (cells lost and past their
    /// lease) are not waited for while disconnected either.
    pub(crate) async fn barrier_expecting(
        &self,
        expected: &[String],
        expiry: Duration,
        gone_cells: &[String],
        released: &(dyn Fn(&str) -> bool + Sync),
        version: u64,
        timeout: Duration,
    ) -> BarrierResponse {
        let expected = Expected {
            names: expected,
            expiry,
            released: Some(released),
        };
        let filter =
            |record: &Seen| record.connected || !gone_cells.contains(&record.identity.cell);
        self.barrier_with(&filter, &expected, version, 0, timeout)
            .await
    }

    /// Waits until every node matching `selector` has applied `version`, at
    /// least `min_nodes` match, or `timeout` passes.
    pub(crate) async fn barrier(
        &self,
        selector: &NodeSelector,
        version: u64,
        min_nodes: usize,
        timeout: Duration,
    ) -> BarrierResponse {
        let filter = |record: &Seen| record.matches(selector);
        self.barrier_with(&filter, &Expected::NONE, version, min_nodes, timeout)
            .await
    }

    async fn barrier_with(
        &self,
        filter: &(dyn Fn(&Seen) -> bool + Sync),
        expected: &Expected<'_>,
        version: u64,
        min_nodes: usize,
        timeout: Duration,
    ) -> BarrierResponse {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let (matched, laggards, skipped) = self.laggards_where(filter, expected, version);
            let reached = laggards.is_empty() && matched >= min_nodes;
            if reached || tokio::time::Instant::now() >= deadline {
                return BarrierResponse {
                    reached,
                    version,
                    matched,
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    laggards,
                    skipped,
                };
            }
            // Any version change wakes us; so does time, which releases
            // disconnected nodes; the deadline bounds the wait.
            let wake = if expected.released.is_some() {
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100))
            } else {
                deadline
            };
            let _ = tokio::time::timeout_at(wake, changed.changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: &str, role: &str) -> Identity {
        Identity {
            name: name.into(),
            role: role.into(),
            zone: "hz-a".into(),
            cell: String::new(),
        }
    }

    fn positions_report(version: u64, shards: &[(u32, i64, i64)]) -> atoll_api::config::Positions {
        atoll_api::config::Positions {
            applied_version: version,
            service: "bank".into(),
            shards: shards
                .iter()
                .map(
                    |&(shard, written, acknowledged)| atoll_api::config::ShardPositionReport {
                        shard,
                        written,
                        acknowledged,
                        standby: "rz02".into(),
                    },
                )
                .collect(),
        }
    }

    #[test]
    fn positions_are_kept_at_once_and_published_when_they_say_something_new() {
        let registry = NodeRegistry::new();
        registry
            .publishing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let app = Identity {
            cell: "rz01".into(),
            ..identity("bank-rz01-0", "app")
        };
        let (connection, _) = registry.connect(app, 5, None, None);
        let published = || std::mem::take(&mut *registry.dirty.lock()).len();
        assert_eq!(published(), 1, "connecting publishes the node");

        registry.positions(
            "bank-rz01-0",
            connection,
            positions_report(5, &[(1, 10, 9)]),
        );
        assert_eq!(published(), 1, "the first report is news");
        // Moved on, the same shards behind: kept, not published.
        registry.positions(
            "bank-rz01-0",
            connection,
            positions_report(5, &[(1, 12, 11)]),
        );
        assert_eq!(published(), 0);
        let seen = registry.reported_positions("bank", "rz01");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].shards[0].written, 12, "the latest is kept at once");
        // Caught up: news.
        registry.positions(
            "bank-rz01-0",
            connection,
            positions_report(5, &[(1, 12, 12)]),
        );
        assert_eq!(published(), 1);
        // Read under another version (a fence): news.
        registry.positions(
            "bank-rz01-0",
            connection,
            positions_report(6, &[(1, 12, 12)]),
        );
        assert_eq!(published(), 1);
        // Once a second at the latest, news or not.
        registry
            .nodes
            .lock()
            .get_mut("bank-rz01-0")
            .expect("record")
            .positions_published = Instant::now().checked_sub(POSITIONS_PUBLISH_EVERY);
        registry.positions(
            "bank-rz01-0",
            connection,
            positions_report(6, &[(1, 13, 13)]),
        );
        assert_eq!(published(), 1);

        // Only this service, only this cell; a stale stream's report is
        // dropped, and a new stream keeps what was reported until it
        // reports again.
        assert!(registry.reported_positions("ledger", "rz01").is_empty());
        assert!(registry.reported_positions("bank", "rz02").is_empty());
        let app = Identity {
            cell: "rz01".into(),
            ..identity("bank-rz01-0", "app")
        };
        let (newer, _) = registry.connect(app, 6, None, None);
        registry.positions(
            "bank-rz01-0",
            connection,
            positions_report(9, &[(1, 99, 0)]),
        );
        let seen = registry.reported_positions("bank", "rz01");
        assert_eq!(seen[0].applied_version, 6, "{seen:?}");
        assert_eq!(seen[0].shards[0].written, 13);
        registry.positions("bank-rz01-0", newer, positions_report(7, &[(1, 14, 14)]));
        assert_eq!(
            registry.reported_positions("bank", "rz01")[0].applied_version,
            7
        );
        let listed = registry.list();
        let info = listed
            .iter()
            .find(|n| n.name == "bank-rz01-0")
            .expect("listed");
        assert_eq!(
            info.positions
                .as_ref()
                .map(|p| p.shards[0].standby.as_deref()),
            Some(Some("rz02")),
            "atoll nodes shows them"
        );
    }

    #[tokio::test]
    async fn a_barrier_waits_for_every_matching_node() {
        let registry = std::sync::Arc::new(NodeRegistry::new());
        let (a, _) = registry.connect(identity("gw-1", "gateway"), 0, None, None);
        let (b, _) = registry.connect(identity("gw-2", "gateway"), 0, None, None);
        registry.connect(identity("agent-1", "agent"), 0, None, None);
        let selector = NodeSelector {
            role: Some("gateway".into()),
            ..NodeSelector::default()
        };
        let waiter = {
            let registry = registry.clone();
            let selector = selector.clone();
            tokio::spawn(async move {
                registry
                    .barrier(&selector, 5, 0, Duration::from_secs(5))
                    .await
            })
        };
        registry.acked("gw-1", a, 5);
        registry.acked("gw-2", b, 6);
        let result = waiter.await.expect("barrier task");
        assert!(result.reached, "{result:?}");
        assert_eq!(result.matched, 2, "the agent does not match");
    }

    #[tokio::test]
    async fn a_barrier_names_laggards_at_the_deadline() {
        let registry = NodeRegistry::new();
        let (a, _) = registry.connect(identity("gw-1", "gateway"), 0, None, None);
        registry.connect(identity("gw-2", "gateway"), 3, None, None);
        registry.acked("gw-1", a, 5);
        registry.nacked("gw-1", a, 6, "cannot compile".into());
        let result = registry
            .barrier(&NodeSelector::default(), 6, 0, Duration::from_millis(50))
            .await;
        assert!(!result.reached);
        let names: Vec<&str> = result.laggards.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["gw-1", "gw-2"]);
        assert_eq!(
            result.laggards[0]
                .last_nack
                .as_ref()
                .map(|n| n.reason.as_str()),
            Some("cannot compile")
        );
    }

    #[tokio::test]
    async fn disconnected_nodes_lag_until_forgotten() {
        let registry = NodeRegistry::new();
        let (a, _) = registry.connect(identity("gw-1", "gateway"), 2, None, None);
        registry.disconnected("gw-1", a);
        let result = registry
            .barrier(&NodeSelector::default(), 3, 0, Duration::from_millis(10))
            .await;
        assert!(!result.reached && !result.laggards[0].connected);
        assert_eq!(registry.forget("gw-1").0, Forget::Forgotten);
        let result = registry
            .barrier(&NodeSelector::default(), 3, 1, Duration::from_millis(10))
            .await;
        assert!(!result.reached, "min_nodes 1 with no node matching");
    }

    #[tokio::test]
    async fn a_restarted_control_plane_waits_for_the_nodes_a_switchover_expects() {
        // After a restart the registry is empty; the switchover remembers
        // who was there.
        let never = |_: &str| false;
        let registry = NodeRegistry::new();
        let expected = vec!["gw-1".to_owned()];
        let expiry = Duration::from_secs(600);
        let result = registry
            .barrier_expecting(&expected, expiry, &[], &never, 5, Duration::from_millis(20))
            .await;
        assert!(!result.reached, "an empty registry is not everybody");
        assert_eq!(result.laggards[0].name, "gw-1");
        let (a, _) = registry.connect(identity("gw-1", "gateway"), 0, None, None);
        registry.acked("gw-1", a, 5);
        let result = registry
            .barrier_expecting(&expected, expiry, &[], &never, 5, Duration::from_millis(20))
            .await;
        assert!(result.reached, "{result:?}");
        // A node gone for good is forgotten by request.
        let registry = NodeRegistry::new();
        assert_eq!(registry.forget("gw-1").0, Forget::Unknown);
        let result = registry
            .barrier_expecting(&expected, expiry, &[], &never, 5, Duration::from_millis(20))
            .await;
        assert!(result.reached, "forgotten: {result:?}");
        // And after the node expiry, as any disconnected node.
        let registry = NodeRegistry::new();
        let result = registry
            .barrier_expecting(
                &expected,
                Duration::ZERO,
                &[],
                &never,
                5,
                Duration::from_millis(20),
            )
            .await;
        assert!(result.reached, "expired: {result:?}");
    }

    #[tokio::test]
    async fn a_disconnected_node_of_a_cell_gone_past_its_lease_is_not_waited_for() {
        let never = |_: &str| false;
        let registry = NodeRegistry::new();
        let mut app = identity("bank-rz03-0", "app");
        app.cell = "rz03".into();
        let (a, _) = registry.connect(app, 1, None, None);
        registry.disconnected("bank-rz03-0", a);
        let expiry = Duration::from_secs(600);
        let timeout = Duration::from_millis(20);
        let lagging = registry
            .barrier_expecting(&[], expiry, &[], &never, 5, timeout)
            .await;
        assert!(!lagging.reached, "a disconnected node lags");
        let gone = ["rz03".to_owned()];
        let passed = registry
            .barrier_expecting(&[], expiry, &gone, &never, 5, timeout)
            .await;
        assert!(passed.reached, "unless its cell is gone: {passed:?}");
    }

    #[tokio::test]
    async fn regression_a_vanished_node_stops_counting_once_it_cannot_write() {
        // gw-1 connected once and vanished; bank-0 is connected and applies.
        let registry = std::sync::Arc::new(NodeRegistry::new());
        let (gw, _) = registry.connect(identity("gw-1", "gateway"), 4, None, None);
        registry.disconnected("gw-1", gw);
        let (bank, _) = registry.connect(identity("bank-0", "app"), 4, None, None);
        registry.acked("bank-0", bank, 5);
        let released = std::sync::atomic::AtomicBool::new(false);
        let release =
            |name: &str| name == "gw-1" && released.load(std::sync::atomic::Ordering::SeqCst);
        let expiry = Duration::from_secs(600);
        let held = registry
            .barrier_expecting(&[], expiry, &[], &release, 5, Duration::from_millis(50))
            .await;
        assert!(
            !held.reached,
            "it counts while it may still write: {held:?}"
        );
        assert_eq!(held.laggards[0].name, "gw-1");
        // Released (its lease ran out) while the barrier waits: it passes
        // without a version change, naming who was not waited for.
        let waiting = {
            let registry = registry.clone();
            tokio::spawn(async move {
                let release = |name: &str| name == "gw-1";
                let started = Instant::now();
                let result = registry
                    .barrier_expecting(&[], expiry, &[], &release, 5, Duration::from_secs(5))
                    .await;
                (result, started.elapsed())
            })
        };
        released.store(true, std::sync::atomic::Ordering::SeqCst);
        let (passed, took) = waiting.await.expect("barrier");
        assert!(passed.reached, "{passed:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(passed.matched, 1);
        assert_eq!(passed.skipped[0].name, "gw-1");
        assert!(
            passed.skipped[0].reason.contains("disconnected"),
            "{passed:?}"
        );
        // A connected laggard is waited for whatever its lease.
        let (slow, _) = registry.connect(identity("gw-2", "gateway"), 4, None, None);
        let all = |_: &str| true;
        let lagging = registry
            .barrier_expecting(&[], expiry, &[], &all, 5, Duration::from_millis(50))
            .await;
        assert!(
            !lagging.reached && lagging.laggards[0].name == "gw-2",
            "{lagging:?}"
        );
        registry.acked("gw-2", slow, 5);
        // A generic barrier still names the disconnected node as a laggard.
        let generic = registry
            .barrier(&NodeSelector::default(), 5, 0, Duration::from_millis(20))
            .await;
        assert_eq!(generic.laggards.len(), 1, "{generic:?}");
    }

    /// With the real lease rule: a disconnected app instance that holds a
    /// lease (it may still be renewing) holds the barrier until that lease
    /// has run out, and no longer.
    #[tokio::test]
    async fn regression_a_disconnected_instance_is_waited_for_while_its_lease_lasts() {
        let duration = Duration::from_millis(300);
        let leases = std::sync::Arc::new(crate::leases::Leases::new_started_before(
            duration,
            Duration::from_secs(60),
        ));
        let registry = std::sync::Arc::new(NodeRegistry::new());
        let mut app = identity("bank-rz01-0", "app");
        app.cell = "rz01".into();
        let (connection, _) = registry.connect(app, 4, None, None);
        registry.disconnected("bank-rz01-0", connection);
        // Cut off from the stream but not from RenewLease: it holds a
        // lease, and renews it for 600 ms (it runs version 5, which the
        // leases are granted against).
        assert!(matches!(
            leases.renew("bank-rz01-0", "rz01", 5, 5),
            crate::leases::Renewal::Granted(_)
        ));
        let renewing = {
            let leases = leases.clone();
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_millis(600);
                let mut last = Instant::now();
                while Instant::now() < until {
                    last = Instant::now();
                    leases.renew("bank-rz01-0", "rz01", 5, 5);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                last
            })
        };
        let started = Instant::now();
        let released = |node: &str| leases.node_released_at(node) <= Instant::now();
        let result = registry
            .barrier_expecting(
                &[],
                Duration::from_secs(600),
                &[],
                &released,
                5,
                Duration::from_secs(5),
            )
            .await;
        let last_renewal = renewing.await.expect("renewer");
        assert!(result.reached, "{result:?}");
        assert_eq!(result.skipped.len(), 1, "{result:?}");
        // Not before its last lease ended: last renewal + duration + margin.
        let ended = last_renewal + duration + crate::leases::margin(duration);
        assert!(
            Instant::now() >= ended,
            "passed {:?} before the lease ended",
            ended - Instant::now()
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    fn report(url: &str) -> Vec<u8> {
        serde_json::to_vec(&atoll_api::rest::ReplicaInfo {
            url: url.into(),
            role: "follower".into(),
            revision: 0,
            lag: 0,
            connected_nodes: 0,
            started: String::new(),
            reported: String::new(),
        })
        .expect("json")
    }

    /// Two replicas on one keyspace: a node on one is in the other's
    /// barriers and list, and counts as disconnected once its replica is
    /// gone.
    #[tokio::test]
    async fn every_replica_sees_the_whole_fleet() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Coordination> =
            Arc::new(atoll_store::EmbeddedStore::open(dir.path()).expect("store"));
        let (a_url, b_url) = ("http://10.0.0.1:7400", "http://10.0.0.2:7400");
        let lease = store.grant(Duration::from_secs(30)).await.expect("lease");
        for url in [a_url, b_url] {
            store
                .put_key(
                    Write::put(format!("{REPLICAS}{}", replica_key(url)), report(url))
                        .with_lease(lease),
                    None,
                )
                .await
                .expect("report");
        }
        let a = Arc::new(NodeRegistry::for_replica(a_url.into()));
        let b = Arc::new(NodeRegistry::for_replica(b_url.into()));
        for registry in [&a, &b] {
            tokio::spawn(registry.clone().publish(store.clone()));
            tokio::spawn(registry.clone().follow(store.clone()));
        }
        let (connection, _) = a.connect(identity("gw-1", "gateway"), 3, None, None);
        // B waits for gw-1, which A serves, and passes once it applies 5.
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move {
                b.barrier(&NodeSelector::default(), 5, 1, Duration::from_secs(5))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "gw-1 runs 3, not 5");
        a.acked("gw-1", connection, 5);
        let result = waiting.await.expect("barrier");
        assert!(result.reached, "{result:?}");
        assert_eq!(result.matched, 1);
        let listed = b.list();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].connected);
        assert_eq!(listed[0].replica.as_deref(), Some(a_url));
        // A's replica goes (its key runs out): gw-1 is disconnected to B.
        store
            .put_key(
                Write::delete(format!("{REPLICAS}{}", replica_key(a_url))),
                None,
            )
            .await
            .expect("delete");
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.list().first().is_some_and(|n| n.connected) {
            assert!(Instant::now() < deadline, "still connected: {:?}", b.list());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // It moves to B: connected again, at the version it says it runs.
        a.disconnected("gw-1", connection);
        let (_, _) = b.connect(identity("gw-1", "gateway"), 5, None, None);
        let listed = b.list();
        assert!(
            listed[0].connected && listed[0].replica.as_deref() == Some(b_url),
            "{listed:?}"
        );
        assert_eq!(b.counts(), (1, 0));
    }

    #[tokio::test]
    async fn a_newer_stream_replaces_the_old_one() {
        let registry = NodeRegistry::new();
        let (old, kicked) = registry.connect(identity("gw-1", "gateway"), 0, None, None);
        let (new, _) = registry.connect(identity("gw-1", "gateway"), 0, None, None);
        kicked.await.expect("the old stream is told to close");
        registry.acked("gw-1", old, 9); // ignored: not the current stream
        registry.disconnected("gw-1", old); // ignored too
        let info = &registry.list()[0];
        assert!(info.connected);
        assert_eq!(info.applied_version, 0);
        registry.acked("gw-1", new, 9);
        assert_eq!(registry.list()[0].applied_version, 9);
    }
}
