//! One step of a switchover as a pure function: the stored phase and what
//! was observed for it go in, the effects to carry out come out. No I/O,
//! no clock: the driver (crate::driver) observes, passes the time, and acts.
//!
//! ```text
//! prepare(loaded)                      -> leases to revoke, what to observe
//! step(loaded, observation, now)       -> effects (save, restore, wait)
//! abort(loaded, message, now)          -> the effects of ending it as Aborted
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use atoll_api::rest::{BarrierResponse, Laggard, SkippedNode};
use atoll_model::{
    PhaseRecord, Resource, ShardMapSpec, ShardPosition, ShardState, SwitchoverMode,
    SwitchoverPhase, SwitchoverSpec,
};
use time::OffsetDateTime;

use crate::shards::{owners_in, set_range};

/// How long the sync gate waits between two readings of the probes.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long a failover waiting for approval waits between two looks.
pub const APPROVAL_INTERVAL: Duration = Duration::from_millis(200);

/// A switchover and its shard map as stored (with their revisions, which
/// a save compares).
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The Switchover resource as read.
    pub switchover: Resource,
    /// Its spec.
    pub spec: SwitchoverSpec,
    /// The ShardMap resource as read.
    pub map: Resource,
    /// Its spec.
    pub map_spec: ShardMapSpec,
}

impl Loaded {
    /// The switchover's name.
    pub fn name(&self) -> &str {
        self.switchover.name()
    }

    /// The stored version of the shard map (what a barrier waits for).
    pub fn map_version(&self) -> u64 {
        self.map.metadata.resource_version.unwrap_or(0)
    }

    /// The stored version of the Switchover record. In the sync gate it is
    /// the commit that began the gate (or a later one), made after the
    /// fence barrier: every node receives that version, so positions read
    /// under it were read after every write of a moving shard ended.
    pub fn record_version(&self) -> u64 {
        self.switchover.metadata.resource_version.unwrap_or(0)
    }

    /// The cells the shards move away from (the lost cells of a failover).
    pub fn sources(&self) -> Vec<String> {
        sources(&self.spec)
    }

    fn failover(&self) -> bool {
        self.spec.mode == SwitchoverMode::Failover
    }
}

/// The cells `spec`'s shards move away from, each once.
fn sources(spec: &SwitchoverSpec) -> Vec<String> {
    let mut cells: Vec<String> = spec.moves.iter().map(|m| m.from.clone()).collect();
    cells.sort();
    cells.dedup();
    cells
}

/// Why the probes could not give the positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeProblem {
    /// Whether waiting cannot help.
    pub blocking: bool,
    /// What went wrong, for the operator.
    pub text: String,
}

/// What the driver must observe before a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the stored state is enough.
    Nothing,
    /// The phase's barrier on this version of the shard map.
    Barrier {
        /// The shard map's stored version.
        version: u64,
    },
    /// The replication positions of the moving shards.
    Positions,
    /// How long until every lease of the lost cells has expired.
    LeaseExpiry,
    /// A live standby for each of these owners (none of them a lost cell).
    Standbys {
        /// The owners after the flip.
        owners: BTreeSet<String>,
    },
}

/// What to do before observing: the leases to revoke first (so a lease
/// read afterwards cannot be renewed behind the read), and what to observe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    /// Cells that get no lease until restored.
    pub revoke: Vec<String>,
    /// What the step needs.
    pub need: Need,
}

/// What the driver observed, answering a [`Need`].
#[derive(Clone, Debug)]
pub enum Observation {
    /// Answers [`Need::Nothing`].
    Nothing,
    /// Answers [`Need::Barrier`].
    Barrier(BarrierResponse),
    /// Answers [`Need::Positions`].
    Positions(Result<Vec<ShardPosition>, ProbeProblem>),
    /// Answers [`Need::LeaseExpiry`]: how long until the last lease ends.
    LeaseExpiry(Duration),
    /// Answers [`Need::Standbys`]: owner -> its new standby.
    Standbys(BTreeMap<String, Option<String>>),
}

/// A commit of the switchover (and of its shard map when it changed), at
/// the revisions they were loaded at.
#[derive(Clone, Debug, PartialEq)]
pub struct Save {
    /// The switchover's new spec.
    pub spec: SwitchoverSpec,
    /// The shard map's new spec, when it changes in the same commit.
    pub map: Option<ShardMapSpec>,
    /// What the commit does, for the audit log.
    pub what: &'static str,
    /// The flip: when the store finds the new map invalid, the switchover
    /// aborts instead (no retry can fix it).
    pub flip: bool,
}

/// What a step asks the driver to do, in order; a failed save stops the
/// rest (the step is retried from the stored phase).
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Commit (boxed: a spec and a map are large).
    Save(Box<Save>),
    /// These cells may get leases again.
    Restore(Vec<String>),
    /// Nothing to do before this much time has passed.
    Wait(Duration),
}

/// What to revoke and observe before the step of `loaded`'s phase.
pub fn prepare(loaded: &Loaded) -> Prepare {
    let spec = &loaded.spec;
    // A lost cell gets no lease from the approval until the failover is
    // over (again after a restart or a change of leader).
    let revoke = if loaded.failover() && spec.approved && !spec.phase.is_final() {
        loaded.sources()
    } else {
        Vec::new()
    };
    let need = if spec.abort_requested && !spec.phase.flipped() {
        Need::Nothing
    } else {
        match spec.phase {
            SwitchoverPhase::FenceBarrier | SwitchoverPhase::FlipBarrier => Need::Barrier {
                version: loaded.map_version(),
            },
            SwitchoverPhase::SyncGate => Need::Positions,
            SwitchoverPhase::LeaseExpiry => Need::LeaseExpiry,
            SwitchoverPhase::Flip if loaded.failover() => Need::Standbys {
                owners: loaded
                    .map_spec
                    .assignments
                    .iter()
                    .map(|a| a.cell.clone())
                    .chain(spec.moves.iter().map(|m| m.to.clone()))
                    .collect(),
            },
            _ => Need::Nothing,
        }
    };
    Prepare { revoke, need }
}

/// Does what the phase says with what was observed; returns the effects
/// (the next phase is in the save).
pub fn step(loaded: &Loaded, observation: Observation, now: OffsetDateTime) -> Vec<Effect> {
    let spec = &loaded.spec;
    let failover = loaded.failover();
    let lost = loaded.sources();
    if spec.abort_requested && !spec.phase.flipped() {
        let message = spec
            .message
            .clone()
            .unwrap_or_else(|| "abort requested".into());
        return abort(loaded, message, now);
    }
    let mut next = spec.clone();
    let mut map = loaded.map_spec.clone();
    match (spec.phase, observation) {
        (SwitchoverPhase::Pending, _) => {
            let phase = if failover && !spec.approved {
                SwitchoverPhase::AwaitingApproval
            } else {
                SwitchoverPhase::Fence
            };
            enter(&mut next, phase, None, now);
            vec![save(next, None, "start")]
        }
        (SwitchoverPhase::AwaitingApproval, _) => {
            if !spec.approved {
                return vec![Effect::Wait(APPROVAL_INTERVAL)];
            }
            enter(
                &mut next,
                SwitchoverPhase::Fence,
                Some("approved".into()),
                now,
            );
            vec![save(next, None, "approved")]
        }
        (SwitchoverPhase::LeaseExpiry, Observation::LeaseExpiry(left)) => {
            if !left.is_zero() {
                return vec![Effect::Wait(left)];
            }
            // Since the phase began (across a change of leader, too).
            let waited = phase_started(spec, now).map_or(Duration::ZERO, |at| elapsed(at, now));
            let detail = format!(
                "the leases of {} have expired (waited {} ms)",
                lost.join(", "),
                waited.as_millis()
            );
            enter(&mut next, SwitchoverPhase::Flip, Some(detail), now);
            vec![save(next, None, "leases expired")]
        }
        (SwitchoverPhase::Fence, _) => {
            for m in &spec.moves {
                let owned = owners_in(&map, m.shards);
                if owned.iter().any(|(cell, _)| *cell != m.from) {
                    let message = format!(
                        "shards {} are no longer all owned by {}; nothing was fenced",
                        m.shards, m.from
                    );
                    return abort(loaded, message, now);
                }
                set_range(&mut map, m.shards, |a| a.state = ShardState::Fenced);
            }
            enter(&mut next, SwitchoverPhase::FenceBarrier, None, now);
            vec![save(next, Some(map), "fence the moving shards")]
        }
        (SwitchoverPhase::FenceBarrier, Observation::Barrier(result)) => {
            let version = loaded.map_version();
            if failover {
                // The lost cell's lease, not this barrier, keeps it from
                // writing: go on, and say who lagged.
                next.fence_revision = Some(version);
                let detail = if result.reached {
                    format!("{} connected nodes run version {version}", result.matched)
                } else {
                    format!(
                        "went on after {}: {}",
                        humantime::format_duration(spec.barrier_timeout.0),
                        laggards(&result.laggards)
                    )
                };
                enter(&mut next, SwitchoverPhase::LeaseExpiry, Some(detail), now);
                return vec![save(next, None, "fence barrier (failover)")];
            }
            if !result.reached {
                let message = format!(
                    "the fence barrier on version {version} timed out after {}: {}; nothing moved",
                    humantime::format_duration(spec.barrier_timeout.0),
                    laggards(&result.laggards)
                );
                return abort(loaded, message, now);
            }
            next.fence_revision = Some(version);
            let detail = format!(
                "{} nodes run version {version}{}",
                result.matched,
                skipped(&result.skipped)
            );
            let phase = if spec.skip_sync_gate {
                SwitchoverPhase::Flip
            } else {
                SwitchoverPhase::SyncGate
            };
            enter(&mut next, phase, Some(detail), now);
            vec![save(next, None, "fence barrier reached")]
        }
        (SwitchoverPhase::SyncGate, Observation::Positions(positions)) => {
            // The deadline counts from the phase's stored start: a sync gate
            // resumed by a restart or a new leader keeps it. One whose start
            // cannot be read has no deadline to keep: it is over.
            let timed_out =
                phase_started(spec, now).is_none_or(|at| now >= at + spec.sync_timeout.0);
            let gave_up = || humantime::format_duration(spec.sync_timeout.0);
            match positions {
                Ok(positions) if positions.iter().all(|p| p.acknowledged >= p.written) => {
                    let detail = format!("{} shards caught up at their standby", positions.len());
                    next.positions = positions;
                    enter(&mut next, SwitchoverPhase::Flip, Some(detail), now);
                    vec![save(next, None, "sync gate passed")]
                }
                Ok(positions) if timed_out => {
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
                        gave_up(),
                        behind.join(", ")
                    );
                    next.positions = positions;
                    abort_spec(next, map, message, now)
                }
                Err(problem) if timed_out => {
                    let message = format!(
                        "the sync gate timed out after {}: {}; nothing moved",
                        gave_up(),
                        problem.text
                    );
                    abort(loaded, message, now)
                }
                _ => vec![Effect::Wait(PROBE_INTERVAL)],
            }
        }
        (SwitchoverPhase::Flip, observation) => {
            let standby_for = match observation {
                Observation::Standbys(picks) if failover => picks,
                _ if failover => return mismatch(spec.phase),
                _ => BTreeMap::new(),
            };
            if failover {
                // Shards whose standby was the lost cell get another one
                // (no owner changes: their writers carry on). A failover's
                // new owner gets a live standby: the lost cell cannot confirm
                // anything (a bank that replicates synchronously would stop
                // taking writes).
                for a in &mut map.assignments {
                    if a.standby.as_ref().is_some_and(|s| lost.contains(s)) {
                        a.standby = standby_for.get(&a.cell).cloned().flatten();
                    }
                }
            }
            for m in &spec.moves {
                let owners = owners_in(&map, m.shards);
                if owners
                    .iter()
                    .any(|(cell, state)| *cell != m.from || *state != ShardState::Fenced)
                {
                    let message = format!(
                        "shards {} are no longer fenced at {}; the flip did not happen",
                        m.shards, m.from
                    );
                    return abort(loaded, message, now);
                }
                let standby = if failover {
                    standby_for.get(&m.to).cloned().flatten()
                } else {
                    Some(m.from.clone())
                };
                set_range(&mut map, m.shards, |a| {
                    a.cell = m.to.clone();
                    a.standby = standby.clone();
                });
            }
            // The control plane assigns epoch + 1 to an ownership change.
            next.epoch_before = Some(map.epoch);
            map.epoch = 0;
            enter(&mut next, SwitchoverPhase::FlipBarrier, None, now);
            vec![Effect::Save(Box::new(Save {
                spec: next,
                map: Some(map),
                what: "flip the owners",
                flip: true,
            }))]
        }
        (SwitchoverPhase::FlipBarrier, Observation::Barrier(result)) => {
            let version = loaded.map_version();
            if !result.reached {
                // No way back after the flip: keep waiting, say for whom.
                let message = format!(
                    "waiting for every node to run version {version} (the new owners): {}; the moving shards stay fenced meanwhile (`atoll nodes forget` a node that is gone for good)",
                    laggards(&result.laggards)
                );
                if spec.message.as_deref() == Some(message.as_str()) {
                    return vec![Effect::Wait(PROBE_INTERVAL)];
                }
                next.message = Some(message);
                return vec![save(next, None, "flip barrier waiting")];
            }
            next.flip_revision = Some(version);
            next.message = None;
            let detail = format!(
                "{} nodes run version {version}, epoch {}{}",
                result.matched,
                map.epoch,
                skipped(&result.skipped)
            );
            enter(&mut next, SwitchoverPhase::Unfence, Some(detail), now);
            vec![save(next, None, "flip barrier reached")]
        }
        (SwitchoverPhase::Unfence, _) => {
            for m in &spec.moves {
                set_range(&mut map, m.shards, |a| {
                    if a.cell == m.to {
                        a.state = ShardState::Serving;
                    }
                });
            }
            enter(&mut next, SwitchoverPhase::Completed, None, now);
            let mut effects = vec![save(next, Some(map), "unfence at the new owners")];
            if failover {
                // They own none of these shards now, and a lease only ever
                // goes to a node that runs the new map.
                effects.push(Effect::Restore(lost));
            }
            effects
        }
        (SwitchoverPhase::Completed | SwitchoverPhase::Aborted, _) => Vec::new(),
        (phase, _) => mismatch(phase),
    }
}

/// Unfences what the switchover fenced and ends it as Aborted (the lost
/// cells of a failover get leases again).
pub fn abort(loaded: &Loaded, message: String, now: OffsetDateTime) -> Vec<Effect> {
    abort_spec(loaded.spec.clone(), loaded.map_spec.clone(), message, now)
}

fn abort_spec(
    mut spec: SwitchoverSpec,
    mut map: ShardMapSpec,
    message: String,
    now: OffsetDateTime,
) -> Vec<Effect> {
    let mut unfence = false;
    for m in &spec.moves {
        set_range(&mut map, m.shards, |a| {
            if a.cell == m.from && a.state == ShardState::Fenced {
                a.state = ShardState::Serving;
                unfence = true;
            }
        });
    }
    let lost = if spec.mode == SwitchoverMode::Failover {
        sources(&spec)
    } else {
        Vec::new()
    };
    spec.message = Some(message.clone());
    enter(&mut spec, SwitchoverPhase::Aborted, Some(message), now);
    // Only what this switchover fenced (an operator's fence stays).
    let fenced_here = spec
        .timeline
        .iter()
        .any(|r| r.phase == SwitchoverPhase::FenceBarrier);
    let mut effects = vec![if unfence && fenced_here {
        save(spec, Some(map), "abort: unfence")
    } else {
        save(spec, None, "abort")
    }];
    if !lost.is_empty() {
        effects.push(Effect::Restore(lost));
    }
    effects
}

fn save(spec: SwitchoverSpec, map: Option<ShardMapSpec>, what: &'static str) -> Effect {
    Effect::Save(Box::new(Save {
        spec,
        map,
        what,
        flip: false,
    }))
}

/// An observation that does not answer the phase's need (a driver bug):
/// nothing happens, the next step observes again.
fn mismatch(phase: SwitchoverPhase) -> Vec<Effect> {
    tracing::error!(%phase, "switchover step: the observation does not answer the phase");
    vec![Effect::Wait(PROBE_INTERVAL)]
}

/// Closes the current phase record and opens `next`, at `now`.
pub fn enter(
    spec: &mut SwitchoverSpec,
    next: SwitchoverPhase,
    detail: Option<String>,
    now: OffsetDateTime,
) {
    if let Some(last) = spec.timeline.last_mut() {
        if last.millis.is_none() {
            let started = parse(&last.started).unwrap_or(now);
            last.millis = Some(u64::try_from((now - started).whole_milliseconds()).unwrap_or(0));
        }
        if detail.is_some() {
            last.detail = detail;
        }
    }
    spec.phase = next;
    spec.timeline.push(PhaseRecord {
        phase: next,
        started: rfc3339(now),
        millis: next.is_final().then_some(0),
        detail: None,
    });
}

/// When the current phase started, from the stored timeline (none when it
/// cannot be read); never later than `now` (a predecessor's clock ahead of
/// this one's does not stretch a deadline).
pub fn phase_started(spec: &SwitchoverSpec, now: OffsetDateTime) -> Option<OffsetDateTime> {
    spec.timeline
        .last()
        .and_then(|r| parse(&r.started))
        .map(|at| at.min(now))
}

fn elapsed(since: OffsetDateTime, now: OffsetDateTime) -> Duration {
    (now - since).try_into().unwrap_or(Duration::ZERO)
}

fn parse(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// A time as RFC 3339 (what the timeline stores).
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The nodes a barrier did not wait for, for a phase's detail.
fn skipped(list: &[SkippedNode]) -> String {
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

fn laggards(list: &[Laggard]) -> String {
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
