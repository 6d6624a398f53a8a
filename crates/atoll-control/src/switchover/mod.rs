//! Switchovers as the control plane runs them, for one term of the leader:
//! the requests (plan, start, approve, abort), the emergency plan that
//! fails over a lost cell, and the ports through which atoll-switchover's
//! driver acts (docs/switchover.md). Every decision of the protocol itself
//! is atoll-switchover's state machine.
//!
//! - `mod.rs`: the requests and the driving of each switchover;
//! - `plan.rs`: what a request moves and the checks of its plan;
//! - `emergency.rs`: the emergency plan (lost cells, failovers);
//! - `probe.rs`: the replication probes of the apps;
//! - `ports.rs`: the store, fleet, probes, leases and clock of the driver.

mod emergency;
mod plan;
mod ports;
mod probe;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_model::{
    Kind, Located, Metadata, Origin, Resource, ResourceKey, ShardPosition, Spec, SwitchoverMode,
    SwitchoverSpec,
};
use atoll_switchover::Driver;
use parking_lot::Mutex;
use time::OffsetDateTime;

use crate::leases::Leases;
use crate::nodes::NodeRegistry;
use crate::writer::{Author, ChangeSet, ControlError, Writer};

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
pub(super) type Probed = (Instant, OffsetDateTime, Vec<ShardPosition>);

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

    /// Stores a new Switchover (refused if the map has a running one) and
    /// drives it.
    pub(super) async fn create(
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

    /// What approving failover `name` would let run, if it waits for
    /// approval (else why not: 409).
    pub(crate) async fn approvable(&self, name: &str) -> Result<String, ControlError> {
        let resource = self
            .writer
            .store
            .get(&ResourceKey::new(Kind::Switchover, name))
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("switchover/{name} does not exist")))?;
        let Spec::Switchover(spec) = &resource.spec else {
            return Err(ControlError::Unavailable(
                "a Switchover without its spec".into(),
            ));
        };
        if spec.mode != SwitchoverMode::Failover {
            return Err(ControlError::Conflict(format!(
                "switchover/{name} is planned: it needs no approval"
            )));
        }
        if spec.approved || spec.phase.is_final() {
            return Err(ControlError::Conflict(format!(
                "switchover/{name} is {} and needs no approval",
                spec.phase
            )));
        }
        let cells: std::collections::BTreeSet<&str> =
            spec.moves.iter().map(|m| m.from.as_str()).collect();
        Ok(format!(
            "letting failover switchover/{name} of {} (ShardMap {}) run",
            cells.into_iter().collect::<Vec<_>>().join(", "),
            spec.shard_map
        ))
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

    pub(super) fn spawn(self: &Arc<Self>, name: String) {
        if !self.running.lock().insert(name.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let driver = Driver::new(ports::Live(this.clone()));
            driver.drive(&name, this.shutdown.clone()).await;
            this.running.lock().remove(&name);
        });
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
    pub(super) async fn commit(
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
}

fn now() -> String {
    crate::nodes::rfc3339(OffsetDateTime::now_utc())
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
