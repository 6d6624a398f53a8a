//! The ports of atoll-switchover's driver, over this control plane: the
//! store through the writer (every save a fenced, audited commit), the
//! node registry's barriers, the apps' replication probes, the lease book
//! and the system clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_api::rest::BarrierResponse;
use atoll_model::{
    Kind, Resource, ResourceKey, ShardMapSpec, ShardMove, ShardPosition, Spec, SwitchoverMode,
    SwitchoverSpec,
};
use atoll_switchover::{
    Clock, Fleet, Leases, Loaded, ProbeProblem, Probes, Record, RecordError, Save, SystemClock,
};
use time::OffsetDateTime;

use super::Switchovers;
use super::emergency::pick_standby;
use crate::writer::ControlError;

/// The driver's world: this term's switchovers service.
pub(super) struct Live(pub(super) Arc<Switchovers>);

impl From<ControlError> for RecordError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::NotFound(text) => RecordError::Gone(text),
            ControlError::Invalid { message, issues } => {
                let detail: Vec<String> = issues.iter().map(ToString::to_string).collect();
                RecordError::Invalid(format!("{message}: {}", detail.join("; ")))
            }
            other => RecordError::Failed(other.to_string()),
        }
    }
}

impl Record for Live {
    async fn load(&self, name: &str) -> Result<Loaded, RecordError> {
        let store = &self.0.writer.store;
        let switchover = store
            .get(&ResourceKey::new(Kind::Switchover, name))
            .await
            .map_err(ControlError::from)?
            .ok_or_else(|| RecordError::Gone(format!("switchover/{name} was deleted")))?;
        let Spec::Switchover(spec) = switchover.spec.clone() else {
            return Err(RecordError::Failed("a Switchover without its spec".into()));
        };
        let map = store
            .get(&ResourceKey::new(Kind::ShardMap, spec.shard_map.clone()))
            .await
            .map_err(ControlError::from)?
            .ok_or_else(|| RecordError::Gone(format!("shardmap/{} was deleted", spec.shard_map)))?;
        let Spec::ShardMap(map_spec) = map.spec.clone() else {
            return Err(RecordError::Failed("a ShardMap without its spec".into()));
        };
        Ok(Loaded {
            switchover,
            spec,
            map,
            map_spec,
        })
    }

    async fn save(&self, loaded: &Loaded, save: &Save) -> Result<(), RecordError> {
        let mut switchover = loaded.switchover.clone();
        switchover.spec = Spec::Switchover(save.spec.clone());
        let mut resources: Vec<Resource> = Vec::with_capacity(2);
        if let Some(map_spec) = &save.map {
            let mut map = loaded.map.clone();
            map.spec = Spec::ShardMap(map_spec.clone());
            resources.push(map);
        }
        resources.push(switchover);
        self.0
            .commit(resources, loaded.name(), save.what)
            .await
            .map(|_| ())
            .map_err(RecordError::from)
    }
}

impl Fleet for Live {
    /// A planned switchover waits for every node (and those it expected,
    /// after a restart); a failover for the connected nodes outside the
    /// lost cells.
    async fn barrier(
        &self,
        spec: &SwitchoverSpec,
        lost: &[String],
        version: u64,
    ) -> BarrierResponse {
        let this = &self.0;
        let nodes = &this.nodes;
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
                let gone: Vec<String> = this
                    .lost
                    .lock()
                    .iter()
                    .filter(|cell| this.leases.expires_at(cell) <= now)
                    .cloned()
                    .collect();
                // A node that is not connected stops counting once nothing
                // it was granted lets it write (docs/switchover.md), and
                // only once the config the leases are granted against has
                // this version: before that, a lease could still go to a
                // node that runs the version before.
                let leases = &this.leases;
                let cache = &this.writer.cache;
                let released = |node: &str| {
                    cache.current().revision >= version
                        && leases.node_released_at(node) <= Instant::now()
                };
                nodes
                    .barrier_expecting(
                        &spec.expected_nodes,
                        this.node_expiry,
                        &gone,
                        &released,
                        version,
                        spec.barrier_timeout.0,
                    )
                    .await
            }
        }
    }

    fn standbys(
        &self,
        owners: &BTreeSet<String>,
        lost: &[String],
    ) -> BTreeMap<String, Option<String>> {
        let resources = self.0.writer.cache.current().resources();
        let status = crate::health::cell_status(&resources, &self.0.nodes.list());
        owners
            .iter()
            .map(|owner| {
                (
                    owner.clone(),
                    pick_standby(&resources, &status, owner, lost),
                )
            })
            .collect()
    }
}

impl Probes for Live {
    async fn positions(
        &self,
        map: &ShardMapSpec,
        moves: &[ShardMove],
        since: u64,
    ) -> Result<Vec<ShardPosition>, ProbeProblem> {
        // The services from the config cache; the positions from what the
        // instances reported on their streams.
        let resources = self.0.writer.cache.current().resources();
        self.0.positions(&resources, map, moves, since).await
    }
}

impl Leases for Live {
    fn revoke(&self, cell: &str) {
        self.0.leases.revoke(cell);
    }

    fn restore(&self, cell: &str) {
        self.0.leases.restore(cell);
    }

    fn expires_in(&self, cells: &[String]) -> Duration {
        let now = Instant::now();
        cells
            .iter()
            .map(|cell| self.0.leases.expires_at(cell))
            .max()
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }
}

impl Clock for Live {
    fn now(&self) -> OffsetDateTime {
        SystemClock.now()
    }

    async fn sleep(&self, duration: Duration) {
        SystemClock.sleep(duration).await;
    }
}
