//! Planned switchovers: moving shard ranges between cells without losing or
//! repeating an acknowledged write (docs/architecture.md, "The switchover protocol";
//! docs/switchover.md).
//!
//! A switchover is a `Switchover` resource in the store; every phase change
//! is a commit, and the commits that change the shard map (fence, flip,
//! unfence, abort) change the Switchover in the same commit, so the stored
//! phase always says what the map holds. A control plane that restarts finds
//! the unfinished ones and drives them on from their phase:
//!
//! ```text
//! Pending -> Fence -> FenceBarrier -> SyncGate -> Flip -> FlipBarrier -> Unfence -> Completed
//!               \___________\____________\___ (abort, timeout) ___> Aborted
//! ```
//!
//! Barriers wait for every node the control plane knows (gateways, app
//! instances through the SDK, agents), connected or not: a disconnected node
//! may still serve with the map it had. Before the flip, a barrier or sync
//! gate that times out aborts (the shards serve at their old owner again,
//! nothing was lost); after the flip there is no way back, so the flip
//! barrier keeps waiting and names its laggards.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_api::rest::{PlanCheck, SwitchoverPlan, SwitchoverRequest};
use atoll_model::{
    Assignment, DurationValue, Kind, Located, Metadata, Origin, PhaseRecord, Resource, ResourceKey,
    ShardMapSpec, ShardMove, ShardPosition, ShardRange, ShardState, Spec, SwitchoverMode,
    SwitchoverPhase, SwitchoverSpec, diff,
};
use parking_lot::Mutex;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::leases::Leases;
use crate::nodes::NodeRegistry;
use crate::nodes::rfc3339;
use crate::writer::{Author, ChangeSet, ControlError, Writer};

/// How often the sync gate reads the replication probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs switchovers, for one term of the leader.
pub(crate) struct Switchovers {
    writer: Arc<Writer>,
    nodes: Arc<NodeRegistry>,
    leases: Arc<Leases>,
    /// Turns true when the term ends (or the process stops).
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// How long a disconnected node is remembered (and waited for).
    node_expiry: Duration,
    http: reqwest::Client,
    running: Mutex<HashSet<String>>,
    /// Cell -> when it last answered its replication probe, and what.
    probed: Mutex<BTreeMap<String, Probed>>,
    /// Cells the emergency plan found lost in its last round.
    lost: Mutex<std::collections::BTreeSet<String>>,
}

impl std::fmt::Debug for Switchovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switchovers")
            .field("running", &*self.running.lock())
            .finish_non_exhaustive()
    }
}

/// A cell's last answered probe: when (monotonic and wall clock), and the
/// positions of its shards.
type Probed = (Instant, OffsetDateTime, Vec<ShardPosition>);

/// The shard map and switchover as stored, with their revisions.
struct Loaded {
    switchover: Resource,
    spec: SwitchoverSpec,
    map: Resource,
    map_spec: ShardMapSpec,
}

impl Switchovers {
    pub(crate) fn new(
        writer: Arc<Writer>,
        nodes: Arc<NodeRegistry>,
        leases: Arc<Leases>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        node_expiry: Duration,
    ) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .no_proxy()
            .build()
            .unwrap_or_default();
        Arc::new(Self {
            writer,
            nodes,
            leases,
            shutdown,
            node_expiry,
            http,
            running: Mutex::new(HashSet::new()),
            probed: Mutex::new(BTreeMap::new()),
            lost: Mutex::new(std::collections::BTreeSet::new()),
        })
    }

    /// The emergency plan: watches the cells that own shards of maps with a
    /// `failover` policy, and fails over a cell lost for `lostAfter`: none of
    /// its instances renewed its lease, and none answered its replication
    /// probe (whose last answer gives the RPO).
    pub(crate) fn watch_cells(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut shutdown = this.shutdown.clone();
            loop {
                if let Err(error) = this.watch_once().await {
                    tracing::warn!(%error, "emergency plan: cannot check the cells");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    async fn watch_once(self: &Arc<Self>) -> Result<(), ControlError> {
        // From the config cache, not the store: every 250 ms, on every leader.
        let resources = &self.writer.cache.current().resources();
        self.lost.lock().clear();
        for map in resources {
            let Spec::ShardMap(spec) = &map.spec else {
                continue;
            };
            let Some(policy) = &spec.failover else {
                continue;
            };
            // Owners and standbys: a lost standby stalls the writes of a
            // bank that replicates synchronously.
            let cells: std::collections::BTreeSet<&str> = spec
                .assignments
                .iter()
                .flat_map(|a| std::iter::once(a.cell.as_str()).chain(a.standby.as_deref()))
                .collect();
            // Probe every cell at once (a frozen cell must not slow the
            // others down).
            let probes = futures::future::join_all(cells.iter().map(|cell| async move {
                (*cell, self.positions_loose(resources, spec, cell).await)
            }))
            .await;
            let now = Instant::now();
            let mut lost: Vec<String> = Vec::new();
            for (cell, answer) in probes {
                if let Some(positions) = answer {
                    self.probed
                        .lock()
                        .insert(cell.to_owned(), (now, OffsetDateTime::now_utc(), positions));
                }
                // Alive: answered its probe (when a service declares one) or
                // asked for a lease, lately.
                let last_probe = self.probed.lock().get(cell).map(|p| p.0);
                let last_lease = self.leases.last_asked(cell);
                let alive = [last_probe, last_lease, Some(self.leases.started())]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(now);
                // And its zone's agent silent as long (agents beat every
                // second): a cell whose agent is alive is being healed.
                let zone = resources.iter().find_map(|r| match &r.spec {
                    Spec::Cell(c) if r.name() == cell => Some(c.zone.as_str()),
                    _ => None,
                });
                let agent_silent =
                    zone.is_none_or(|zone| self.nodes.agent_silence(zone) >= policy.lost_after.0);
                if now.duration_since(alive) >= policy.lost_after.0 && agent_silent {
                    lost.push(cell.to_owned());
                }
            }
            self.lost.lock().extend(lost.iter().cloned());
            if lost.is_empty()
                || active_on(resources, map.name()).is_some()
                || !self.leases.enabled()
            {
                continue;
            }
            // One at a time per map: the next loss is handled next round.
            let cell = lost[0].clone();
            if spec.assignments.iter().any(|a| a.cell == cell) {
                self.fail_over(
                    resources,
                    map.name(),
                    spec,
                    &cell,
                    &lost,
                    policy.approval == atoll_model::Approval::Automatic,
                )
                .await?;
            } else {
                self.replace_standby(resources, map, spec, &cell, &lost)
                    .await?;
            }
        }
        Ok(())
    }

    /// Creates the failover of `cell`'s shards to their standbys.
    async fn fail_over(
        self: &Arc<Self>,
        resources: &[Resource],
        map_name: &str,
        map: &ShardMapSpec,
        cell: &str,
        lost: &[String],
        approved: bool,
    ) -> Result<(), ControlError> {
        // Not to a standby that is lost too (a region lost at once).
        let moves: Vec<ShardMove> = map
            .assignments
            .iter()
            .filter(|a| a.cell == cell && a.standby.as_ref().is_some_and(|s| !lost.contains(s)))
            .map(|a| ShardMove {
                shards: a.shards,
                from: cell.to_owned(),
                to: a.standby.clone().unwrap_or_default(),
            })
            .collect();
        if moves.is_empty() {
            tracing::warn!(%cell, map = map_name, "cell lost, but none of its shards has a live standby: nothing to fail over to");
            return Ok(());
        }
        let name = unused_name(
            resources,
            &format!(
                "failover-{cell}-{}",
                OffsetDateTime::now_utc().unix_timestamp()
            ),
        );
        tracing::warn!(%cell, map = map_name, switchover = %name, approved, "cell lost: failing over its shards to their standbys");
        let _ = resources;
        let spec = self.failover_spec(
            (map_name, map.epoch),
            cell,
            moves,
            approved,
            Duration::from_secs(2),
            format!(
                "emergency plan of shardmap/{map_name}: cell {cell} lost (no lease renewal, no probe answer, its agent silent)"
            ),
        );
        self.create(&name, spec, "emergency plan").await
    }

    /// A failover of `cell`'s `moves`, carrying the RPO its last answered
    /// probe shows (shards with positions the standby never confirmed).
    /// `map` is its name and epoch; `why` becomes the reason.
    fn failover_spec(
        &self,
        (map_name, epoch): (&str, u64),
        cell: &str,
        moves: Vec<ShardMove>,
        approved: bool,
        barrier_timeout: Duration,
        why: String,
    ) -> SwitchoverSpec {
        let (last_seen, positions) = match self.probed.lock().get(cell) {
            Some((_, at, positions)) => (Some(rfc3339(*at)), positions.clone()),
            None => (None, Vec::new()),
        };
        SwitchoverSpec {
            shard_map: map_name.to_owned(),
            moves,
            mode: SwitchoverMode::Failover,
            barrier_timeout: DurationValue(barrier_timeout),
            sync_timeout: DurationValue(Duration::from_secs(10)),
            skip_sync_gate: true,
            reason: Some(why.clone()),
            phase: SwitchoverPhase::Pending,
            abort_requested: false,
            expected_nodes: self.nodes.names(),
            approved,
            timeline: vec![PhaseRecord {
                phase: SwitchoverPhase::Pending,
                started: now(),
                millis: None,
                detail: Some(why),
            }],
            epoch_before: Some(epoch),
            fence_revision: None,
            flip_revision: None,
            positions: Vec::new(),
            unreplicated: positions
                .into_iter()
                .filter(|p| p.written > p.acknowledged)
                .collect(),
            last_seen,
            message: None,
        }
    }

    /// Stores a new Switchover (refused if the map has a running one) and
    /// drives it.
    async fn create(
        self: &Arc<Self>,
        name: &str,
        spec: SwitchoverSpec,
        what: &str,
    ) -> Result<(), ControlError> {
        let resource = Resource {
            metadata: Metadata {
                name: name.to_owned(),
                resource_version: Some(0),
                ..Metadata::default()
            },
            spec: Spec::Switchover(spec),
        };
        self.commit(vec![resource], name, what).await?;
        self.spawn(name.to_owned());
        Ok(())
    }

    /// Positions of the moves' shards, or none when the cell does not answer
    /// (or no service declares a probe).
    async fn positions_loose(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        cell: &str,
    ) -> Option<Vec<ShardPosition>> {
        let services = replicated_services(resources, map);
        if services.is_empty() {
            // Nothing to probe: leases alone say whether the cell lives.
            return None;
        }
        let mut out = Vec::new();
        for (service, probe) in services {
            let answer = self
                .probe(resources, service, cell, probe, Duration::from_millis(400))
                .await
                .ok()?;
            for entry in &answer.shards {
                let owned = map
                    .assignments
                    .iter()
                    .any(|a| a.cell == cell && a.shards.contains(entry.shard));
                if owned {
                    out.push(ShardPosition {
                        shard: entry.shard,
                        service: service.to_owned(),
                        written: entry.written,
                        acknowledged: entry.acknowledged,
                    });
                }
            }
        }
        Some(out)
    }

    /// A lost cell that owns nothing but stands by for others: their shards
    /// get another standby (no owner changes, no fence).
    async fn replace_standby(
        &self,
        resources: &[Resource],
        map: &Resource,
        spec: &ShardMapSpec,
        cell: &str,
        lost: &[String],
    ) -> Result<(), ControlError> {
        let status = crate::health::cell_status(resources, &self.nodes.list());
        let mut next = spec.clone();
        for a in &mut next.assignments {
            if a.standby.as_deref() == Some(cell) {
                a.standby = pick_standby(resources, &status, &a.cell, lost);
            }
        }
        tracing::warn!(%cell, map = map.name(), "standby cell lost: its shards get another standby");
        let mut resource = map.clone();
        resource.spec = Spec::ShardMap(next);
        let name = format!("emergency-plan-{}", map.name());
        self.commit(
            vec![resource],
            &name,
            &format!("standby {cell} lost: new standbys"),
        )
        .await
        .map(|_| ())
    }

    /// Approves a failover waiting for approval.
    pub(crate) async fn approve(
        self: &Arc<Self>,
        name: &str,
        author: &Author,
    ) -> Result<Resource, ControlError> {
        let message = format!("approved by {}", author.name());
        self.request(name, "approved", |spec| {
            if spec.mode != SwitchoverMode::Failover {
                return Err(format!(
                    "switchover/{name} is planned: it needs no approval"
                ));
            }
            if spec.approved || spec.phase.is_final() {
                return Err(format!(
                    "switchover/{name} is {} and needs no approval",
                    spec.phase
                ));
            }
            spec.approved = true;
            spec.message = Some(message.clone());
            Ok(())
        })
        .await
    }

    /// Resumes every unfinished switchover (after a restart).
    pub(crate) async fn resume(self: &Arc<Self>) -> Result<(), ControlError> {
        let snapshot = self.writer.store.snapshot().await?;
        for resource in &snapshot.resources {
            if let Spec::Switchover(spec) = &resource.spec
                && !spec.phase.is_final()
            {
                tracing::info!(switchover = resource.name(), phase = %spec.phase, "resuming a switchover");
                self.spawn(resource.name().to_owned());
            }
        }
        Ok(())
    }

    fn spawn(self: &Arc<Self>, name: String) {
        if !self.running.lock().insert(name.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.drive(&name).await;
            this.running.lock().remove(&name);
        });
    }

    /// Plans, and unless a dry run, starts.
    pub(crate) async fn start(
        self: &Arc<Self>,
        request: SwitchoverRequest,
        author: &Author,
    ) -> Result<SwitchoverPlan, ControlError> {
        let snapshot = self.writer.store.snapshot().await?;
        let resources = &snapshot.resources;
        let maps: Vec<&Resource> = resources
            .iter()
            .filter(|r| r.kind() == Kind::ShardMap)
            .collect();
        let map = match &request.shard_map {
            Some(name) => maps
                .iter()
                .find(|m| m.name() == name)
                .copied()
                .ok_or_else(|| {
                    ControlError::NotFound(format!(
                        "shardmap/{name} does not exist; `atoll get shardmaps` lists them"
                    ))
                })?,
            None => match maps.as_slice() {
                [only] => *only,
                [] => {
                    return Err(ControlError::BadRequest(
                        "there is no ShardMap to switch over".into(),
                    ));
                }
                _ => {
                    return Err(ControlError::BadRequest(format!(
                        "there are {} shard maps; name one with --shard-map",
                        maps.len()
                    )));
                }
            },
        };
        let Spec::ShardMap(map_spec) = &map.spec else {
            return Err(ControlError::Unavailable(
                "a ShardMap without its spec".into(),
            ));
        };
        if let Some(active) = active_on(resources, map.name()) {
            return Err(ControlError::Conflict(format!(
                "switchover/{active} is still running on shardmap/{}; wait for it (atoll switchover status {active}) or abort it",
                map.name()
            )));
        }
        let moves = moves_for(map_spec, &request, resources)?;
        let barrier_timeout = duration(&request.barrier_timeout, "barrierTimeout", 10)?;
        let sync_timeout = duration(&request.sync_timeout, "syncTimeout", 10)?;
        let name = match &request.name {
            Some(name) => name.clone(),
            // Two in the same second (a drill putting several ranges back)
            // get `-2`, `-3`...: a generated name never clashes.
            None => unused_name(
                resources,
                &format!(
                    "{}-{}",
                    map.name(),
                    OffsetDateTime::now_utc().unix_timestamp()
                ),
            ),
        };
        if let Some(problem) = atoll_model::names::dns_label_problem(&name) {
            return Err(ControlError::BadRequest(format!(
                "switchover name `{name}`: {problem}"
            )));
        }
        if resources
            .iter()
            .any(|r| r.kind() == Kind::Switchover && r.name() == name)
        {
            return Err(ControlError::Conflict(format!(
                "switchover/{name} exists already; choose another --name"
            )));
        }

        // The plan: the diff, the checks, the window to expect.
        let mut flipped = map_spec.clone();
        for m in &moves {
            set_range(&mut flipped, m.shards, |a| {
                a.cell = m.to.clone();
                a.standby = Some(m.from.clone());
            });
        }
        flipped.epoch = map_spec.epoch + 1;
        let after = Resource {
            metadata: map.metadata.clone(),
            spec: Spec::ShardMap(flipped),
        };
        let mut checks = self.checks(resources, map_spec, &moves, &request).await;
        if !request.failover {
            // The map after the flip must be valid, or the switchover would
            // fence and then stop: say so now.
            let set = ChangeSet {
                puts: vec![Located {
                    resource: after.clone(),
                    origin: Origin::Generated {
                        what: Arc::from(format!("the flip of switchover/{name}")),
                    },
                }],
                ..ChangeSet::default()
            };
            let planner = Author::control_plane(format!("switchover/{name}"), None);
            match self.writer.apply(set, true, &planner).await {
                Err(ControlError::Invalid { issues, .. }) => checks.push(PlanCheck {
                    check: "shard map after the flip".into(),
                    result: "blocking".into(),
                    detail: issues
                        .iter()
                        .map(|i| i.reason.clone())
                        .collect::<Vec<_>>()
                        .join("; "),
                }),
                Err(other) => checks.push(PlanCheck {
                    check: "shard map after the flip".into(),
                    result: "warning".into(),
                    detail: format!("could not be checked: {other}"),
                }),
                Ok(_) => checks.push(PlanCheck {
                    check: "shard map after the flip".into(),
                    result: "ok".into(),
                    detail: "valid".into(),
                }),
            }
        }
        let probes = self.positions(resources, map_spec, &moves).await;
        let lag: i64 = probes
            .as_ref()
            .map(|p| p.iter().map(|s| (s.written - s.acknowledged).max(0)).sum())
            .unwrap_or(0);
        match (&probes, request.skip_sync_gate) {
            _ if request.failover => checks.push(PlanCheck {
                check: "failover".into(),
                result: "warning".into(),
                detail: format!(
                    "no sync gate: writes the source had not replicated are lost (at its last probe: {}); the flip waits until its lease has expired",
                    match self.probed.lock().get(request.from.as_deref().unwrap_or_default()) {
                        Some((_, at, positions)) => format!(
                            "{} log positions behind on {} shards, {}",
                            positions.iter().map(|p| (p.written - p.acknowledged).max(0)).sum::<i64>(),
                            positions.iter().filter(|p| p.written > p.acknowledged).count(),
                            rfc3339(*at)
                        ),
                        None => "never probed".into(),
                    }
                ),
            }),
            (_, true) => checks.push(PlanCheck {
                check: "sync gate".into(),
                result: "warning".into(),
                detail:
                    "skipped on request: writes not yet replicated when the shards flip are lost"
                        .into(),
            }),
            (Ok(positions), false) => checks.push(PlanCheck {
                check: "replication".into(),
                result: "ok".into(),
                detail: format!(
                    "{} shards probed; the targets are {lag} log positions behind in all",
                    positions.len()
                ),
            }),
            (Err(problem), false) => checks.push(PlanCheck {
                check: "replication".into(),
                result: if problem.blocking {
                    "blocking"
                } else {
                    "warning"
                }
                .into(),
                detail: problem.text.clone(),
            }),
        }
        let shard_count: u32 = moves
            .iter()
            .map(|m| m.shards.end - m.shards.start + 1)
            .sum();
        let plan = SwitchoverPlan {
            name: name.clone(),
            shard_map: map.name().to_owned(),
            epoch: map_spec.epoch,
            moves: moves
                .iter()
                .map(|m| serde_json::json!({"shards": m.shards.to_string(), "from": m.from, "to": m.to}))
                .collect(),
            shard_count,
            diff: diff(&map.key().to_string(), Some(map), Some(&after)),
            checks,
            expected_fence_window: format!(
                "two barriers over {} nodes (milliseconds each when every node is connected) plus the sync gate: {lag} log positions to replicate now; the sync gate gives up after {}",
                self.nodes.list().len(),
                humantime::format_duration(sync_timeout)
            ),
            dry_run: request.dry_run,
        };
        if request.dry_run {
            return Ok(plan);
        }
        if request.failover {
            let Some(from) = request.from.as_deref() else {
                return Err(ControlError::BadRequest(
                    "a failover moves every shard of a lost cell: give --from CELL".into(),
                ));
            };
            if !self.leases.enabled() {
                return Err(ControlError::Conflict(
                    "this control plane runs without ownership leases (--lease-duration 0s), so nothing stops the lost cell from writing on: stop it for certain, then move its shards with a planned switchover and --skip-sync-gate".into(),
                ));
            }
            let spec = self.failover_spec(
                (map.name(), map_spec.epoch),
                from,
                moves,
                true,
                barrier_timeout,
                request.reason.clone().unwrap_or_else(|| {
                    format!("failover of {from} requested by {}", author.name())
                }),
            );
            self.create(&name, spec, "failover requested").await?;
            return Ok(plan);
        }
        let blocking: Vec<String> = plan
            .checks
            .iter()
            .filter(|c| c.result == "blocking")
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect();
        if !blocking.is_empty() {
            return Err(ControlError::Conflict(format!(
                "the switchover cannot start: {}",
                blocking.join("; ")
            )));
        }
        let spec = SwitchoverSpec {
            shard_map: map.name().to_owned(),
            moves,
            barrier_timeout: DurationValue(barrier_timeout),
            sync_timeout: DurationValue(sync_timeout),
            skip_sync_gate: request.skip_sync_gate,
            reason: request.reason.clone(),
            mode: SwitchoverMode::Planned,
            phase: SwitchoverPhase::Pending,
            abort_requested: false,
            expected_nodes: self.nodes.names(),
            approved: false,
            unreplicated: Vec::new(),
            last_seen: None,
            timeline: vec![PhaseRecord {
                phase: SwitchoverPhase::Pending,
                started: now(),
                millis: None,
                detail: Some(format!("requested by {}", author.name())),
            }],
            epoch_before: Some(map_spec.epoch),
            fence_revision: None,
            flip_revision: None,
            positions: Vec::new(),
            message: None,
        };
        self.create(&name, spec, "requested").await?;
        Ok(plan)
    }

    /// Asks a running switchover to stop; refused after the flip.
    pub(crate) async fn abort(
        self: &Arc<Self>,
        name: &str,
        author: &Author,
    ) -> Result<Resource, ControlError> {
        let message = format!("abort requested by {}", author.name());
        self.request(name, "abort requested", |spec| {
            if spec.phase.is_final() {
                return Err(format!("switchover/{name} is {} already", spec.phase));
            }
            if spec.phase.flipped() {
                return Err(format!(
                    "switchover/{name} has flipped the owners already ({}): it can only complete; a switchover back is a new switchover",
                    spec.phase
                ));
            }
            spec.abort_requested = true;
            spec.message = Some(message.clone());
            Ok(())
        })
        .await
    }

    /// Records an operator's request on a switchover (`change` says no with
    /// a reason: 409), retrying when the switchover moved meanwhile, and
    /// makes sure it is being driven.
    async fn request(
        self: &Arc<Self>,
        name: &str,
        what: &str,
        change: impl Fn(&mut SwitchoverSpec) -> Result<(), String>,
    ) -> Result<Resource, ControlError> {
        for _ in 0..8 {
            let mut resource = self
                .writer
                .store
                .get(&ResourceKey::new(Kind::Switchover, name))
                .await?
                .ok_or_else(|| {
                    ControlError::NotFound(format!("switchover/{name} does not exist"))
                })?;
            let Spec::Switchover(spec) = &mut resource.spec else {
                return Err(ControlError::Unavailable(
                    "a Switchover without its spec".into(),
                ));
            };
            change(spec).map_err(ControlError::Conflict)?;
            match self.commit(vec![resource.clone()], name, what).await {
                Ok(_) => {
                    self.spawn(name.to_owned());
                    return Ok(resource);
                }
                Err(ControlError::Conflict(_)) => continue,
                Err(other) => return Err(other),
            }
        }
        Err(ControlError::Unavailable(format!(
            "switchover/{name} kept changing; try again"
        )))
    }

    /// Commits resources (each at the revision it was read at), as the
    /// switchover; returns the revision.
    async fn commit(
        &self,
        resources: Vec<Resource>,
        name: &str,
        what: &str,
    ) -> Result<u64, ControlError> {
        let origin: Arc<str> = Arc::from(format!("switchover/{name}"));
        let set = ChangeSet {
            puts: resources
                .into_iter()
                .map(|resource| Located {
                    resource,
                    origin: Origin::Generated {
                        what: origin.clone(),
                    },
                })
                .collect(),
            ..ChangeSet::default()
        };
        let author = Author::control_plane(format!("switchover/{name}"), Some(what.to_owned()));
        let response = self.writer.apply(set, false, &author).await?;
        Ok(response.revision)
    }

    async fn load(&self, name: &str) -> Result<Loaded, ControlError> {
        let switchover = self
            .writer
            .store
            .get(&ResourceKey::new(Kind::Switchover, name))
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("switchover/{name} was deleted")))?;
        let Spec::Switchover(spec) = switchover.spec.clone() else {
            return Err(ControlError::Unavailable(
                "a Switchover without its spec".into(),
            ));
        };
        let map = self
            .writer
            .store
            .get(&ResourceKey::new(Kind::ShardMap, spec.shard_map.clone()))
            .await?
            .ok_or_else(|| {
                ControlError::NotFound(format!("shardmap/{} was deleted", spec.shard_map))
            })?;
        let Spec::ShardMap(map_spec) = map.spec.clone() else {
            return Err(ControlError::Unavailable(
                "a ShardMap without its spec".into(),
            ));
        };
        Ok(Loaded {
            switchover,
            spec,
            map,
            map_spec,
        })
    }

    /// Drives one switchover to a final phase (or until the control plane
    /// stops; a restart resumes it).
    async fn drive(&self, name: &str) {
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let loaded = match self.load(name).await {
                Ok(loaded) => loaded,
                Err(ControlError::NotFound(text)) => {
                    tracing::warn!(switchover = name, "stopping: {text}");
                    return;
                }
                Err(error) => {
                    tracing::warn!(switchover = name, %error, "cannot read the switchover; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if loaded.spec.phase.is_final() {
                return;
            }
            let phase = loaded.spec.phase;
            let step = tokio::select! {
                step = self.step(loaded) => step,
                _ = shutdown.changed() => return,
            };
            if let Err(error) = step {
                tracing::warn!(switchover = name, %phase, %error, "switchover step failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Does what the phase says, and persists the next phase.
    async fn step(&self, mut loaded: Loaded) -> Result<(), ControlError> {
        let name = loaded.switchover.name().to_owned();
        let spec = &mut loaded.spec;
        let failover = spec.mode == SwitchoverMode::Failover;
        let lost: Vec<String> = spec.moves.iter().map(|m| m.from.clone()).collect();
        if failover && spec.approved && !spec.phase.is_final() {
            // Again after a restart: a lost cell gets no lease from the
            // approval until the failover is over.
            for cell in &lost {
                self.leases.revoke(cell);
            }
        }
        if spec.abort_requested && !spec.phase.flipped() {
            let message = spec
                .message
                .clone()
                .unwrap_or_else(|| "abort requested".into());
            return self.abort_now(loaded, message).await;
        }
        match spec.phase {
            SwitchoverPhase::Pending => {
                let next = if failover && !spec.approved {
                    SwitchoverPhase::AwaitingApproval
                } else {
                    SwitchoverPhase::Fence
                };
                enter(spec, next, None);
                self.save(loaded, &name, "start").await
            }
            SwitchoverPhase::AwaitingApproval => {
                if !spec.approved {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Ok(());
                }
                enter(spec, SwitchoverPhase::Fence, Some("approved".into()));
                self.save(loaded, &name, "approved").await
            }
            SwitchoverPhase::LeaseExpiry => {
                let until = lost
                    .iter()
                    .map(|cell| self.leases.expires_at(cell))
                    .max()
                    .unwrap_or_else(Instant::now);
                let waited = until.saturating_duration_since(Instant::now());
                tokio::time::sleep(waited).await;
                let detail = format!(
                    "the leases of {} have expired (waited {} ms)",
                    lost.join(", "),
                    waited.as_millis()
                );
                enter(spec, SwitchoverPhase::Flip, Some(detail));
                self.save(loaded, &name, "leases expired").await
            }
            SwitchoverPhase::Fence => {
                let moves = spec.moves.clone();
                for m in &moves {
                    let owned = owners_in(&loaded.map_spec, m.shards);
                    if owned.iter().any(|(cell, _)| *cell != m.from) {
                        let message = format!(
                            "shards {} are no longer all owned by {}; nothing was fenced",
                            m.shards, m.from
                        );
                        return self.abort_now(loaded, message).await;
                    }
                    set_range(&mut loaded.map_spec, m.shards, |a| {
                        a.state = ShardState::Fenced
                    });
                }
                enter(spec, SwitchoverPhase::FenceBarrier, None);
                self.save_with_map(loaded, &name, "fence the moving shards")
                    .await
            }
            SwitchoverPhase::FenceBarrier => {
                let version = loaded.map.metadata.resource_version.unwrap_or(0);
                let result = self.barrier(spec, &lost, version).await;
                if failover {
                    // The lost cell's lease, not this barrier, keeps it from
                    // writing: go on, and say who lagged.
                    spec.fence_revision = Some(version);
                    let detail = if result.reached {
                        format!("{} connected nodes run version {version}", result.matched)
                    } else {
                        format!(
                            "went on after {}: {}",
                            humantime::format_duration(spec.barrier_timeout.0),
                            laggards(&result.laggards)
                        )
                    };
                    enter(spec, SwitchoverPhase::LeaseExpiry, Some(detail));
                    return self.save(loaded, &name, "fence barrier (failover)").await;
                }
                if !result.reached {
                    let message = format!(
                        "the fence barrier on version {version} timed out after {}: {}; nothing moved",
                        humantime::format_duration(spec.barrier_timeout.0),
                        laggards(&result.laggards)
                    );
                    return self.abort_now(loaded, message).await;
                }
                spec.fence_revision = Some(version);
                let detail = format!(
                    "{} nodes run version {version}{}",
                    result.matched,
                    skipped(&result.skipped)
                );
                let next = if spec.skip_sync_gate {
                    SwitchoverPhase::Flip
                } else {
                    SwitchoverPhase::SyncGate
                };
                enter(spec, next, Some(detail));
                self.save(loaded, &name, "fence barrier reached").await
            }
            SwitchoverPhase::SyncGate => {
                let started = phase_started(spec);
                let deadline = started + spec.sync_timeout.0;
                loop {
                    // Where to probe comes from the config cache (polled every
                    // 50 ms); the positions themselves are probed live.
                    let resources = self.writer.cache.current().resources();
                    let positions = self
                        .positions(&resources, &loaded.map_spec, &spec.moves)
                        .await;
                    match positions {
                        Ok(positions) if positions.iter().all(|p| p.acknowledged >= p.written) => {
                            let detail =
                                format!("{} shards caught up at their standby", positions.len());
                            spec.positions = positions;
                            enter(spec, SwitchoverPhase::Flip, Some(detail));
                            return self.save(loaded, &name, "sync gate passed").await;
                        }
                        Ok(positions) if Instant::now() >= deadline => {
                            let behind: Vec<String> = positions
                                .iter()
                                .filter(|p| p.acknowledged < p.written)
                                .take(10)
                                .map(|p| {
                                    format!(
                                        "shard {} ({} at {}, standby at {})",
                                        p.shard, p.service, p.written, p.acknowledged
                                    )
                                })
                                .collect();
                            let message = format!(
                                "the sync gate timed out after {}: the targets are behind on {}; nothing moved",
                                humantime::format_duration(spec.sync_timeout.0),
                                behind.join(", ")
                            );
                            spec.positions = positions;
                            return self.abort_now(loaded, message).await;
                        }
                        Err(problem) if Instant::now() >= deadline => {
                            let message = format!(
                                "the sync gate timed out after {}: {}; nothing moved",
                                humantime::format_duration(spec.sync_timeout.0),
                                problem.text
                            );
                            return self.abort_now(loaded, message).await;
                        }
                        _ => {}
                    }
                    tokio::time::sleep(PROBE_INTERVAL).await;
                    // An abort asked meanwhile is seen on the next step.
                    if self.abort_asked(&name).await {
                        return Ok(());
                    }
                }
            }
            SwitchoverPhase::Flip => {
                let moves = spec.moves.clone();
                // A failover's new owner gets a live standby: the lost cell
                // cannot confirm anything (a bank that replicates
                // synchronously would stop taking writes).
                let standby_for = if failover {
                    let resources = self.writer.cache.current().resources();
                    let status = crate::health::cell_status(&resources, &self.nodes.list());
                    let owners: std::collections::BTreeSet<String> = loaded
                        .map_spec
                        .assignments
                        .iter()
                        .map(|a| a.cell.clone())
                        .chain(moves.iter().map(|m| m.to.clone()))
                        .collect();
                    let picks: BTreeMap<String, Option<String>> = owners
                        .into_iter()
                        .map(|owner| {
                            let pick = pick_standby(&resources, &status, &owner, &lost);
                            (owner, pick)
                        })
                        .collect();
                    picks
                } else {
                    BTreeMap::new()
                };
                if failover {
                    // Shards whose standby was the lost cell get another one
                    // (no owner changes: their writers carry on).
                    for a in &mut loaded.map_spec.assignments {
                        if a.standby.as_ref().is_some_and(|s| lost.contains(s)) {
                            a.standby = standby_for.get(&a.cell).cloned().flatten();
                        }
                    }
                }
                for m in &moves {
                    let owners = owners_in(&loaded.map_spec, m.shards);
                    if owners
                        .iter()
                        .any(|(cell, state)| *cell != m.from || *state != ShardState::Fenced)
                    {
                        let message = format!(
                            "shards {} are no longer fenced at {}; the flip did not happen",
                            m.shards, m.from
                        );
                        return self.abort_now(loaded, message).await;
                    }
                    let standby = if failover {
                        standby_for.get(&m.to).cloned().flatten()
                    } else {
                        Some(m.from.clone())
                    };
                    set_range(&mut loaded.map_spec, m.shards, |a| {
                        a.cell = m.to.clone();
                        a.standby = standby.clone();
                    });
                }
                // The control plane assigns epoch + 1 to an ownership change.
                spec.epoch_before = Some(loaded.map_spec.epoch);
                loaded.map_spec.epoch = 0;
                enter(spec, SwitchoverPhase::FlipBarrier, None);
                let unflipped = self.load(&name).await?;
                match self.save_with_map(loaded, &name, "flip the owners").await {
                    // The new map is not valid (nothing was written): no
                    // retry can fix that, so stop before the flip.
                    Err(ControlError::Invalid { message, issues }) => {
                        let detail: Vec<String> = issues.iter().map(ToString::to_string).collect();
                        self.abort_now(
                            unflipped,
                            format!(
                                "the flipped shard map is invalid ({message}: {})",
                                detail.join("; ")
                            ),
                        )
                        .await
                    }
                    other => other,
                }
            }
            SwitchoverPhase::FlipBarrier => {
                let version = loaded.map.metadata.resource_version.unwrap_or(0);
                let result = self.barrier(spec, &lost, version).await;
                if !result.reached {
                    // No way back after the flip: keep waiting, say for whom.
                    let message = format!(
                        "waiting for every node to run version {version} (the new owners): {}; the moving shards stay fenced meanwhile (`atoll nodes forget` a node that is gone for good)",
                        laggards(&result.laggards)
                    );
                    if spec.message.as_deref() != Some(message.as_str()) {
                        spec.message = Some(message);
                        self.save(loaded, &name, "flip barrier waiting").await?;
                    }
                    return Ok(());
                }
                spec.flip_revision = Some(version);
                spec.message = None;
                let detail = format!(
                    "{} nodes run version {version}, epoch {}{}",
                    result.matched,
                    loaded.map_spec.epoch,
                    skipped(&result.skipped)
                );
                enter(spec, SwitchoverPhase::Unfence, Some(detail));
                self.save(loaded, &name, "flip barrier reached").await
            }
            SwitchoverPhase::Unfence => {
                for m in &spec.moves.clone() {
                    set_range(&mut loaded.map_spec, m.shards, |a| {
                        if a.cell == m.to {
                            a.state = ShardState::Serving;
                        }
                    });
                }
                enter(spec, SwitchoverPhase::Completed, None);
                self.save_with_map(loaded, &name, "unfence at the new owners")
                    .await?;
                if failover {
                    // They own none of these shards now, and a lease only
                    // ever goes to a node that runs the new map.
                    for cell in &lost {
                        self.leases.restore(cell);
                    }
                }
                Ok(())
            }
            SwitchoverPhase::Completed | SwitchoverPhase::Aborted => Ok(()),
        }
    }

    /// The barrier of a phase: a planned switchover waits for every node
    /// (and those it expected, after a restart); a failover for the
    /// connected nodes outside the lost cells.
    async fn barrier(
        &self,
        spec: &SwitchoverSpec,
        lost: &[String],
        version: u64,
    ) -> atoll_api::rest::BarrierResponse {
        let nodes = &self.nodes;
        match spec.mode {
            SwitchoverMode::Failover => {
                nodes
                    .barrier_except(lost, version, spec.barrier_timeout.0)
                    .await
            }
            SwitchoverMode::Planned => {
                // A cell lost meanwhile, whose lease has run out, cannot hold
                // up a planned switchover (the emergency plan acts on it once
                // this one is over).
                let now = Instant::now();
                let gone: Vec<String> = self
                    .lost
                    .lock()
                    .iter()
                    .filter(|cell| self.leases.expires_at(cell) <= now)
                    .cloned()
                    .collect();
                // A node that is not connected stops counting once nothing
                // it was granted lets it write (docs/switchover.md), and
                // only once the config the leases are granted against has
                // this version: before that, a lease could still go to a
                // node that runs the version before.
                let leases = &self.leases;
                let cache = &self.writer.cache;
                let released = |node: &str| {
                    cache.current().revision >= version
                        && leases.node_released_at(node) <= Instant::now()
                };
                nodes
                    .barrier_expecting(
                        &spec.expected_nodes,
                        self.node_expiry,
                        &gone,
                        &released,
                        version,
                        spec.barrier_timeout.0,
                    )
                    .await
            }
        }
    }

    async fn abort_asked(&self, name: &str) -> bool {
        matches!(
            self.writer
                .store
                .get(&ResourceKey::new(Kind::Switchover, name))
                .await,
            Ok(Some(Resource { spec: Spec::Switchover(spec), .. })) if spec.abort_requested
        )
    }

    /// Unfences what this switchover fenced and ends it as Aborted.
    async fn abort_now(&self, mut loaded: Loaded, message: String) -> Result<(), ControlError> {
        let name = loaded.switchover.name().to_owned();
        tracing::warn!(switchover = %name, %message, "switchover aborted");
        let spec = &mut loaded.spec;
        let mut unfence = false;
        for m in &spec.moves.clone() {
            set_range(&mut loaded.map_spec, m.shards, |a| {
                if a.cell == m.from && a.state == ShardState::Fenced {
                    a.state = ShardState::Serving;
                    unfence = true;
                }
            });
        }
        spec.message = Some(message.clone());
        enter(spec, SwitchoverPhase::Aborted, Some(message));
        let lost: Vec<String> = if spec.mode == SwitchoverMode::Failover {
            spec.moves.iter().map(|m| m.from.clone()).collect()
        } else {
            Vec::new()
        };
        if unfence && phase_fenced(&loaded) {
            self.save_with_map(loaded, &name, "abort: unfence").await?;
        } else {
            self.save(loaded, &name, "abort").await?;
        }
        for cell in &lost {
            self.leases.restore(cell);
        }
        Ok(())
    }

    async fn save(&self, loaded: Loaded, name: &str, what: &str) -> Result<(), ControlError> {
        let mut switchover = loaded.switchover;
        switchover.spec = Spec::Switchover(loaded.spec);
        self.commit(vec![switchover], name, what).await.map(|_| ())
    }

    async fn save_with_map(
        &self,
        loaded: Loaded,
        name: &str,
        what: &str,
    ) -> Result<(), ControlError> {
        let mut switchover = loaded.switchover;
        switchover.spec = Spec::Switchover(loaded.spec);
        let mut map = loaded.map;
        map.spec = Spec::ShardMap(loaded.map_spec);
        self.commit(vec![map, switchover], name, what)
            .await
            .map(|_| ())
    }

    /// Health and capacity of the targets.
    async fn checks(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        moves: &[ShardMove],
        request: &SwitchoverRequest,
    ) -> Vec<PlanCheck> {
        let status = crate::health::cell_status(resources, &self.nodes.list());
        let mut checks = Vec::new();
        let targets: std::collections::BTreeSet<&str> =
            moves.iter().map(|m| m.to.as_str()).collect();
        for target in targets {
            let incoming: u32 = moves
                .iter()
                .filter(|m| m.to == target)
                .map(|m| m.shards.end - m.shards.start + 1)
                .sum();
            let owned: u32 = map
                .assignments
                .iter()
                .filter(|a| a.cell == target)
                .map(|a| a.shards.end - a.shards.start + 1)
                .sum();
            match status.get(target) {
                Some(s) if s.health == "Unhealthy" => checks.push(PlanCheck {
                    check: format!("health of {target}"),
                    result: "blocking".into(),
                    detail: format!(
                        "{target} is unhealthy: {}",
                        s.reason.clone().unwrap_or_default()
                    ),
                }),
                Some(s) => {
                    let ready = s.ready_instances;
                    let detail = if s.health == "Unmanaged" {
                        format!(
                            "{target} runs no App Atoll manages: its capacity is unknown; it goes from {owned} to {} shards",
                            owned + incoming
                        )
                    } else {
                        format!(
                            "{target} has {ready} ready instances and goes from {owned} to {} shards ({:.1} shards per instance)",
                            owned + incoming,
                            f64::from(owned + incoming) / ready.max(1) as f64
                        )
                    };
                    // Taking on more than twice its shards is worth a look.
                    let heavy = owned > 0 && owned + incoming > owned * 2 + 1;
                    checks.push(PlanCheck {
                        check: format!("capacity of {target}"),
                        result: if heavy { "warning" } else { "ok" }.into(),
                        detail: if heavy {
                            format!("{detail}: more than twice its load today; check its headroom")
                        } else {
                            detail
                        },
                    });
                }
                None => checks.push(PlanCheck {
                    check: format!("health of {target}"),
                    result: "blocking".into(),
                    detail: format!("cell {target} does not exist"),
                }),
            }
        }
        let (connected, disconnected) = self.nodes.counts();
        checks.push(PlanCheck {
            check: "nodes".into(),
            result: if disconnected > 0 { "warning" } else { "ok" }.into(),
            detail: if disconnected > 0 {
                format!("{disconnected} known nodes are disconnected: the barriers wait for each until any lease it held has ended ({} at most), then go on without it (atoll nodes)", humantime::format_duration(self.leases.reach()))
            } else {
                format!("{connected} nodes connected; the barriers wait for all of them")
            },
        });
        let _ = request;
        checks
    }

    /// Replication positions of the moving shards, read from the source
    /// cells' probes, for every service that declares one on this map's
    /// rule.
    async fn positions(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        moves: &[ShardMove],
    ) -> Result<Vec<ShardPosition>, ProbeProblem> {
        let services = replicated_services(resources, map);
        if services.is_empty() {
            return Err(ProbeProblem {
                blocking: true,
                text: format!(
                    "no service on shard rule `{}` declares `replication.probe`, so nothing says the targets hold the data; declare it, or pass --skip-sync-gate for stateless services",
                    map.rule
                ),
            });
        }
        let mut out = Vec::new();
        for (service, probe) in services {
            let mut by_cell: BTreeMap<&str, Vec<&ShardMove>> = BTreeMap::new();
            for m in moves {
                by_cell.entry(m.from.as_str()).or_default().push(m);
            }
            for (cell, cell_moves) in by_cell {
                let answer = self
                    .probe(resources, service, cell, probe, PROBE_TIMEOUT)
                    .await?;
                for m in cell_moves {
                    for shard in m.shards.start..=m.shards.end {
                        let Some(entry) = answer.shards.iter().find(|s| s.shard == shard) else {
                            return Err(ProbeProblem {
                                blocking: false,
                                text: format!(
                                    "the probe of {service} in {cell} does not list shard {shard}; its instances may not run the current map yet"
                                ),
                            });
                        };
                        if entry.standby.as_deref() != Some(m.to.as_str()) {
                            return Err(ProbeProblem {
                                blocking: true,
                                text: format!(
                                    "{service} in {cell} replicates shard {shard} to {}, not to {}: make {} its standby and wait until it caught up",
                                    entry.standby.as_deref().unwrap_or("no cell"),
                                    m.to,
                                    m.to
                                ),
                            });
                        }
                        out.push(ShardPosition {
                            shard,
                            service: service.to_owned(),
                            written: entry.written,
                            acknowledged: entry.acknowledged,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Asks the ready instances of `service` in `cell`, one after the other,
    /// until one answers.
    async fn probe(
        &self,
        resources: &[Resource],
        service: &str,
        cell: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<ProbeAnswer, ProbeProblem> {
        let mut addresses: Vec<&str> = Vec::new();
        for r in resources {
            match &r.spec {
                Spec::Endpoints(e) if e.service == service => addresses.extend(
                    e.endpoints
                        .iter()
                        .filter(|x| x.cell == cell && x.ready)
                        .map(|x| x.address.as_str()),
                ),
                Spec::Service(s) if r.name() == service => addresses.extend(
                    s.endpoints
                        .iter()
                        .filter(|x| x.cell == cell)
                        .map(|x| x.address.as_str()),
                ),
                _ => {}
            }
        }
        if addresses.is_empty() {
            return Err(ProbeProblem {
                blocking: false,
                text: format!(
                    "{service} has no ready instance in {cell} to ask for its replication positions"
                ),
            });
        }
        let mut last = String::new();
        for address in addresses {
            let url = format!("http://{address}{path}");
            match self.http.get(&url).timeout(timeout).send().await {
                Ok(response) if response.status().is_success() => {
                    match response.json::<ProbeAnswer>().await {
                        Ok(answer) => return Ok(answer),
                        Err(e) => {
                            last = format!("{url} answered something else than positions: {e}")
                        }
                    }
                }
                Ok(response) => last = format!("{url} answered {}", response.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(ProbeProblem {
            blocking: false,
            text: format!(
                "no instance of {service} in {cell} answered its replication probe ({last})"
            ),
        })
    }
}

/// A standby for `owner`'s shards: an rzone in another zone (what
/// validation asks), not `owner`, not one of `excluded` (lost cells),
/// healthy ones first.
fn pick_standby(
    resources: &[Resource],
    status: &BTreeMap<String, crate::health::CellStatus>,
    owner: &str,
    excluded: &[String],
) -> Option<String> {
    let zone_of = |name: &str| {
        resources.iter().find_map(|r| match &r.spec {
            Spec::Cell(c) if r.name() == name => Some(c.zone.clone()),
            _ => None,
        })
    };
    let owner_zone = zone_of(owner);
    resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Cell(c) if c.cell_type == atoll_model::CellType::Rzone => {
                Some((r.name(), c.zone.clone()))
            }
            _ => None,
        })
        .filter(|(c, zone)| {
            *c != owner && !excluded.iter().any(|l| l == c) && Some(zone) != owner_zone.as_ref()
        })
        .map(|(c, _)| c)
        .min_by_key(|c| status.get(*c).map(|s| s.health != "Healthy"))
        .map(str::to_owned)
}

/// `(service, probe path)` of the services on `map`'s rule that declare a
/// replication probe.
fn replicated_services<'a>(
    resources: &'a [Resource],
    map: &ShardMapSpec,
) -> Vec<(&'a str, &'a str)> {
    resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Service(s) if s.shard_rule.as_deref() == Some(map.rule.as_str()) => {
                Some((r.name(), s))
            }
            _ => None,
        })
        .filter_map(|(name, s)| s.replication.as_ref().map(|rep| (name, rep.probe.as_str())))
        .collect()
}

#[derive(Debug)]
struct ProbeProblem {
    /// Whether waiting cannot help.
    blocking: bool,
    text: String,
}

#[derive(Debug, Deserialize)]
struct ProbeAnswer {
    shards: Vec<ProbeShard>,
}

#[derive(Debug, Deserialize)]
struct ProbeShard {
    shard: u32,
    written: i64,
    acknowledged: i64,
    #[serde(default)]
    standby: Option<String>,
}

fn now() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// Closes the current phase record and opens `next`.
fn enter(spec: &mut SwitchoverSpec, next: SwitchoverPhase, detail: Option<String>) {
    let now_time = OffsetDateTime::now_utc();
    if let Some(last) = spec.timeline.last_mut() {
        if last.millis.is_none() {
            let started = OffsetDateTime::parse(
                &last.started,
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap_or(now_time);
            last.millis =
                Some(u64::try_from((now_time - started).whole_milliseconds()).unwrap_or(0));
        }
        if detail.is_some() {
            last.detail = detail;
        }
    }
    spec.phase = next;
    spec.timeline.push(PhaseRecord {
        phase: next,
        started: rfc3339(now_time),
        millis: next.is_final().then_some(0),
        detail: None,
    });
}

/// When the current phase started, as an `Instant` (for deadlines that
/// survive a restart: a resumed sync gate keeps its deadline).
fn phase_started(spec: &SwitchoverSpec) -> Instant {
    let started = spec
        .timeline
        .last()
        .and_then(|r| {
            OffsetDateTime::parse(&r.started, &time::format_description::well_known::Rfc3339).ok()
        })
        .unwrap_or_else(OffsetDateTime::now_utc);
    let ago = (OffsetDateTime::now_utc() - started)
        .try_into()
        .unwrap_or(Duration::ZERO);
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// Whether the map may hold this switchover's fence (it fenced already).
fn phase_fenced(loaded: &Loaded) -> bool {
    loaded
        .spec
        .timeline
        .iter()
        .any(|r| r.phase == SwitchoverPhase::FenceBarrier)
}

/// The nodes a barrier did not wait for, for a phase's detail.
fn skipped(list: &[atoll_api::rest::SkippedNode]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let names: Vec<String> = list
        .iter()
        .take(5)
        .map(|n| format!("{} ({})", n.name, n.reason))
        .collect();
    let more = list.len().saturating_sub(names.len());
    format!(
        "; not waited for: {}{}",
        names.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// `base`, or `base-2`, `base-3`... whichever no Switchover has.
fn unused_name(resources: &[Resource], base: &str) -> String {
    let taken = |name: &str| {
        resources
            .iter()
            .any(|r| r.kind() == Kind::Switchover && r.name() == name)
    };
    if !taken(base) {
        return base.to_owned();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|name| !taken(name))
        .unwrap_or_else(|| base.to_owned())
}

fn laggards(list: &[atoll_api::rest::Laggard]) -> String {
    let names: Vec<String> = list
        .iter()
        .take(10)
        .map(|l| {
            format!(
                "{} ({}, at {}{})",
                l.name,
                if l.connected {
                    "connected"
                } else {
                    "disconnected"
                },
                l.applied_version,
                l.problem
                    .as_deref()
                    .map(|p| format!("; {p}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    let more = list.len().saturating_sub(names.len());
    if more > 0 {
        format!("{} and {more} more lag", names.join(", "))
    } else {
        format!("{} lag", names.join(", "))
    }
}

fn duration(text: &Option<String>, field: &str, default: u64) -> Result<Duration, ControlError> {
    match text {
        None => Ok(Duration::from_secs(default)),
        Some(text) => {
            let value = humantime::parse_duration(text).map_err(|e| {
                ControlError::BadRequest(format!(
                    "{field} `{text}` is not a duration ({e}); write it like 10s"
                ))
            })?;
            if value < Duration::from_millis(100) || value > Duration::from_secs(600) {
                return Err(ControlError::BadRequest(format!(
                    "{field} must be between 100ms and 10m, not {text}"
                )));
            }
            Ok(value)
        }
    }
}

/// The name of the unfinished switchover on `map`, if any.
pub(crate) fn active_on(resources: &[Resource], map: &str) -> Option<String> {
    resources.iter().find_map(|r| match &r.spec {
        Spec::Switchover(s) if s.shard_map == map && !s.phase.is_final() => {
            Some(r.name().to_owned())
        }
        _ => None,
    })
}

/// `(owner, state)` of every shard in `range`.
fn owners_in(map: &ShardMapSpec, range: ShardRange) -> Vec<(String, ShardState)> {
    (range.start..=range.end)
        .filter_map(|shard| {
            map.assignments
                .iter()
                .find(|a| a.shards.contains(shard))
                .map(|a| (a.cell.clone(), a.state))
        })
        .collect()
}

/// Applies `change` to the assignments of the shards in `range`, splitting
/// ranges where needed, then merges neighbours that became equal.
fn set_range(map: &mut ShardMapSpec, range: ShardRange, mut change: impl FnMut(&mut Assignment)) {
    let mut out: Vec<Assignment> = Vec::with_capacity(map.assignments.len() + 2);
    let mut assignments = std::mem::take(&mut map.assignments);
    assignments.sort_by_key(|a| a.shards.start);
    for a in assignments {
        let (start, end) = (a.shards.start, a.shards.end);
        if end < range.start || start > range.end {
            out.push(a);
            continue;
        }
        if start < range.start {
            let mut before = a.clone();
            before.shards = ShardRange {
                start,
                end: range.start - 1,
            };
            out.push(before);
        }
        let mut inside = a.clone();
        inside.shards = ShardRange {
            start: start.max(range.start),
            end: end.min(range.end),
        };
        change(&mut inside);
        out.push(inside);
        if end > range.end {
            let mut after = a;
            after.shards = ShardRange {
                start: range.end + 1,
                end,
            };
            out.push(after);
        }
    }
    // Merge adjacent equal assignments.
    let mut merged: Vec<Assignment> = Vec::with_capacity(out.len());
    for a in out {
        if let Some(last) = merged.last_mut()
            && last.shards.end + 1 == a.shards.start
            && last.cell == a.cell
            && last.standby == a.standby
            && last.state == a.state
        {
            last.shards.end = a.shards.end;
            continue;
        }
        merged.push(a);
    }
    map.assignments = merged;
}

/// What moves where, from a request.
fn moves_for(
    map: &ShardMapSpec,
    request: &SwitchoverRequest,
    resources: &[Resource],
) -> Result<Vec<ShardMove>, ControlError> {
    let cell_exists = |name: &str| {
        resources
            .iter()
            .any(|r| r.kind() == Kind::Cell && r.name() == name)
    };
    for (flag, cell) in [("--from", &request.from), ("--to", &request.to)] {
        if let Some(cell) = cell
            && !cell_exists(cell)
        {
            return Err(ControlError::BadRequest(format!(
                "{flag} {cell}: no such cell; `atoll get cells` lists them"
            )));
        }
    }
    let range = match &request.shards {
        Some(text) => Some(text.parse::<ShardRange>().map_err(|e| {
            ControlError::BadRequest(format!("--shards {text}: {e}; write it like 0-9 or 7"))
        })?),
        None => None,
    };
    if range.is_none() && request.from.is_none() {
        return Err(ControlError::BadRequest(
            "say what moves: --from CELL (all its shards) or --shards RANGE (with --to CELL or to their standbys)".into(),
        ));
    }
    let total = map
        .assignments
        .iter()
        .map(|a| a.shards.end)
        .max()
        .map_or(0, |m| m + 1);
    if let Some(r) = range
        && r.end >= total
    {
        return Err(ControlError::BadRequest(format!(
            "--shards {r}: the map has shards 0-{}",
            total.saturating_sub(1)
        )));
    }
    let mut moves: Vec<ShardMove> = Vec::new();
    for a in &map.assignments {
        let (mut start, mut end) = (a.shards.start, a.shards.end);
        if let Some(r) = range {
            if end < r.start || start > r.end {
                continue;
            }
            start = start.max(r.start);
            end = end.min(r.end);
        }
        if let Some(from) = &request.from
            && &a.cell != from
        {
            continue;
        }
        if a.state == ShardState::Fenced {
            return Err(ControlError::Conflict(format!(
                "shards {}-{} are fenced already; unfence them (atoll apply) before a switchover",
                start, end
            )));
        }
        let to = match (&request.to, &a.standby) {
            (Some(to), _) => to.clone(),
            (None, Some(standby)) => standby.clone(),
            (None, None) => {
                return Err(ControlError::BadRequest(format!(
                    "shards {start}-{end} of {} have no standby; say where they go with --to",
                    a.cell
                )));
            }
        };
        if to == a.cell {
            if range.is_some() && request.from.is_none() {
                // A range that spans shards the target owns already: those stay.
                continue;
            }
            return Err(ControlError::BadRequest(format!(
                "shards {start}-{end} are owned by {to} already"
            )));
        }
        let shards = ShardRange { start, end };
        match moves.last_mut() {
            Some(last) if last.from == a.cell && last.to == to && last.shards.end + 1 == start => {
                last.shards.end = end;
            }
            _ => moves.push(ShardMove {
                shards,
                from: a.cell.clone(),
                to,
            }),
        }
    }
    if moves.is_empty() {
        return Err(ControlError::BadRequest(match (&request.from, range) {
            (Some(from), Some(r)) => format!("{from} owns none of shards {r}"),
            (Some(from), None) => format!("{from} owns no shard of this map"),
            (None, Some(r)) => format!("shards {r} are owned by the target already"),
            (None, None) => "nothing moves".into(),
        }));
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_generated_name_never_clashes() {
        let switchover = |name: &str| {
            let text = format!(
                "apiVersion: atoll/v1\nkind: Switchover\nmetadata: {{name: {name}}}\nspec:\n  shardMap: users\n  moves: [{{shards: \"0-4\", from: rz01, to: rz02}}]\n"
            );
            atoll_model::load("t.yaml", &text).expect("a Switchover")[0]
                .resource
                .clone()
        };
        assert_eq!(super::unused_name(&[], "users-7"), "users-7");
        let taken = [switchover("users-7"), switchover("users-7-2")];
        assert_eq!(super::unused_name(&taken, "users-7"), "users-7-3");
    }

    use super::*;

    fn map() -> ShardMapSpec {
        ShardMapSpec {
            rule: "users".into(),
            epoch: 1,
            assignments: vec![
                Assignment {
                    shards: ShardRange { start: 0, end: 49 },
                    cell: "rz01".into(),
                    standby: Some("rz02".into()),
                    state: ShardState::Serving,
                },
                Assignment {
                    shards: ShardRange { start: 50, end: 99 },
                    cell: "rz02".into(),
                    standby: Some("rz01".into()),
                    state: ShardState::Serving,
                },
            ],
            failover: None,
        }
    }

    #[test]
    fn set_range_splits_and_merges_back() {
        let mut m = map();
        let range = ShardRange { start: 10, end: 19 };
        set_range(&mut m, range, |a| a.state = ShardState::Fenced);
        let ranges: Vec<String> = m.assignments.iter().map(|a| a.shards.to_string()).collect();
        assert_eq!(ranges, ["0-9", "10-19", "20-49", "50-99"]);
        assert_eq!(m.assignments[1].state, ShardState::Fenced);
        set_range(&mut m, range, |a| a.state = ShardState::Serving);
        assert_eq!(m, map(), "unfencing restores the map exactly");
    }

    #[test]
    fn moves_follow_the_request() {
        let cells: Vec<Resource> = ["rz01", "rz02", "rz03"]
            .iter()
            .map(|name| Resource {
                metadata: Metadata {
                    name: (*name).into(),
                    ..Metadata::default()
                },
                spec: Spec::Cell(atoll_model::CellSpec {
                    zone: "hz-a".into(),
                    cell_type: atoll_model::CellType::Rzone,
                    weight: 100,
                }),
            })
            .collect();
        let whole = moves_for(
            &map(),
            &SwitchoverRequest {
                from: Some("rz01".into()),
                ..SwitchoverRequest::default()
            },
            &cells,
        )
        .expect("moves");
        assert_eq!(whole.len(), 1);
        assert_eq!(
            (whole[0].shards.to_string(), whole[0].to.as_str()),
            ("0-49".into(), "rz02")
        );
        let range = moves_for(
            &map(),
            &SwitchoverRequest {
                shards: Some("40-59".into()),
                to: Some("rz03".into()),
                ..SwitchoverRequest::default()
            },
            &cells,
        )
        .expect("moves");
        let described: Vec<String> = range
            .iter()
            .map(|m| format!("{}:{}->{}", m.shards, m.from, m.to))
            .collect();
        assert_eq!(described, ["40-49:rz01->rz03", "50-59:rz02->rz03"]);
        let unknown = moves_for(
            &map(),
            &SwitchoverRequest {
                from: Some("rz09".into()),
                ..SwitchoverRequest::default()
            },
            &cells,
        )
        .expect_err("no such cell");
        assert!(unknown.to_string().contains("no such cell"), "{unknown}");
        let nothing = moves_for(&map(), &SwitchoverRequest::default(), &cells).expect_err("empty");
        assert!(nothing.to_string().contains("say what moves"), "{nothing}");
    }
}
