//! The emergency plan: watches the cells that own shards of maps with a
//! `failover` policy and fails over a lost one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_model::{
    DurationValue, PhaseRecord, Resource, ShardMapSpec, ShardMove, Spec, SwitchoverMode,
    SwitchoverPhase, SwitchoverSpec,
};
use time::OffsetDateTime;

use super::{Switchovers, active_on, now, unused_name};
use crate::nodes::rfc3339;
use crate::writer::ControlError;

impl Switchovers {
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
            // Failover runs in the default workspace (docs/manifests.md#workspace).
            if !map.key().in_default() {
                continue;
            }
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
                if let Some(heard) = answer {
                    let mut probed = self.probed.lock();
                    if probed.get(cell).is_none_or(|before| before.0 <= heard.0) {
                        probed.insert(cell.to_owned(), heard);
                    }
                }
                // Alive: reported its positions or answered its probe (when
                // a service declares replication), or asked for a lease,
                // lately.
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
    pub(super) fn failover_spec(
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
}

/// A standby for `owner`'s shards: an rzone in another zone (what
/// validation asks), not `owner`, not one of `excluded` (lost cells),
/// healthy ones first.
pub(super) fn pick_standby(
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
