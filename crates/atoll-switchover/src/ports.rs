//! What the driver needs from the world, behind traits: the store that
//! holds switchovers, the fleet (barriers over the nodes, standby picks
//! among the cells), the replication probes, the ownership leases and the
//! clock. The control plane implements them over its writer, node registry,
//! lease book and HTTP probes; tests implement them in memory with a fake
//! clock.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use atoll_api::rest::BarrierResponse;
use atoll_model::{ShardMapSpec, ShardMove, ShardPosition, SwitchoverSpec};
use time::OffsetDateTime;

use crate::machine::{Loaded, ProbeProblem, Save};

/// Why a load or a save did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The switchover or its shard map was deleted: a load that finds so
    /// stops the driver (a save that does is retried, and the load after
    /// it stops).
    Gone(String),
    /// The store refused the change as invalid: retrying cannot help.
    Invalid(String),
    /// Anything else (a conflict, the store unreachable, a deposed leader):
    /// the step is retried from the stored phase.
    Failed(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Gone(text) | RecordError::Invalid(text) | RecordError::Failed(text) => {
                f.write_str(text)
            }
        }
    }
}

/// Where switchovers are stored: every phase change is a commit.
pub trait Record: Send + Sync {
    /// The switchover and its shard map as stored now.
    fn load(&self, name: &str) -> impl Future<Output = Result<Loaded, RecordError>> + Send;
    /// Commits `save` at the revisions `loaded` was read at (refused when
    /// either changed meanwhile, or when this leader's term is over).
    fn save(
        &self,
        loaded: &Loaded,
        save: &Save,
    ) -> impl Future<Output = Result<(), RecordError>> + Send;
}

/// The nodes and cells.
pub trait Fleet: Send + Sync {
    /// Waits (up to the switchover's barrier timeout) until the nodes the
    /// switchover counts run `version`; `lost` are the cells a failover
    /// does not wait for.
    fn barrier(
        &self,
        spec: &SwitchoverSpec,
        lost: &[String],
        version: u64,
    ) -> impl Future<Output = BarrierResponse> + Send;
    /// A live standby for each owner, none of them in `lost`.
    fn standbys(
        &self,
        owners: &BTreeSet<String>,
        lost: &[String],
    ) -> BTreeMap<String, Option<String>>;
}

/// The replication probes of the services on the map's shard rule.
pub trait Probes: Send + Sync {
    /// Positions of the moving shards at their source cells, read under
    /// config version `since` or later: the sync gate's own record, which
    /// was committed after the fence barrier, so that no write of a moving
    /// shard can follow such a read. (The fenced map's version is not
    /// enough: an instance may read it early, while another instance of
    /// its cell still writes under the map before, until the barrier.)
    fn positions(
        &self,
        map: &ShardMapSpec,
        moves: &[ShardMove],
        since: u64,
    ) -> impl Future<Output = Result<Vec<ShardPosition>, ProbeProblem>> + Send;
}

/// The ownership leases of the cells.
pub trait Leases: Send + Sync {
    /// `cell` gets no lease (nor a renewal) until restored.
    fn revoke(&self, cell: &str);
    /// `cell` may get leases again.
    fn restore(&self, cell: &str);
    /// How long until every lease granted to `cells` has expired (zero
    /// when none is left), including those a predecessor granted.
    fn expires_in(&self, cells: &[String]) -> Duration;
}

/// Time.
pub trait Clock: Send + Sync {
    /// The wall clock (phase records and deadlines are stored in it).
    fn now(&self) -> OffsetDateTime;
    /// Waits this long.
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send;
}

/// The system's clock and tokio's timer.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

// A world shared behind an `Arc` (a service that drives several
// switchovers, a test that changes the world while it is driven) is one.

impl<T: Record> Record for Arc<T> {
    fn load(&self, name: &str) -> impl Future<Output = Result<Loaded, RecordError>> + Send {
        T::load(self, name)
    }

    fn save(
        &self,
        loaded: &Loaded,
        save: &Save,
    ) -> impl Future<Output = Result<(), RecordError>> + Send {
        T::save(self, loaded, save)
    }
}

impl<T: Fleet> Fleet for Arc<T> {
    fn barrier(
        &self,
        spec: &SwitchoverSpec,
        lost: &[String],
        version: u64,
    ) -> impl Future<Output = BarrierResponse> + Send {
        T::barrier(self, spec, lost, version)
    }

    fn standbys(
        &self,
        owners: &BTreeSet<String>,
        lost: &[String],
    ) -> BTreeMap<String, Option<String>> {
        T::standbys(self, owners, lost)
    }
}

impl<T: Probes> Probes for Arc<T> {
    fn positions(
        &self,
        map: &ShardMapSpec,
        moves: &[ShardMove],
        since: u64,
    ) -> impl Future<Output = Result<Vec<ShardPosition>, ProbeProblem>> + Send {
        T::positions(self, map, moves, since)
    }
}

impl<T: Leases> Leases for Arc<T> {
    fn revoke(&self, cell: &str) {
        T::revoke(self, cell);
    }

    fn restore(&self, cell: &str) {
        T::restore(self, cell);
    }

    fn expires_in(&self, cells: &[String]) -> Duration {
        T::expires_in(self, cells)
    }
}

impl<T: Clock> Clock for Arc<T> {
    fn now(&self) -> OffsetDateTime {
        T::now(self)
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send {
        T::sleep(self, duration)
    }
}
