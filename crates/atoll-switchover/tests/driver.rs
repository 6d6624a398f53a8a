//! The switchover driver over an in-memory world with a fake clock: every
//! phase, timeout, abort and failover path, in milliseconds of real time.

#![allow(clippy::expect_used, reason = "tests fail loudly")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atoll_api::rest::{BarrierResponse, Laggard};
use atoll_model::{
    Resource, ShardMapSpec, ShardMove, ShardPosition, ShardState, Spec, SwitchoverMode,
    SwitchoverPhase, SwitchoverSpec,
};
use atoll_switchover::machine::{self, Need, rfc3339};
use atoll_switchover::{
    Clock, Driver, Fleet, Leases, Loaded, ProbeProblem, Probes, Record, RecordError, Save,
};
use parking_lot::Mutex;
use time::OffsetDateTime;

type BarrierFn = Box<dyn FnMut(&SwitchoverSpec, u64) -> BarrierResponse + Send>;
type PositionsFn = Box<dyn FnMut(Duration) -> Result<Vec<ShardPosition>, ProbeProblem> + Send>;

/// The store, fleet, probes, leases and clock, in memory.
struct World {
    start: OffsetDateTime,
    now: Mutex<OffsetDateTime>,
    switchover: Mutex<Resource>,
    map: Mutex<Resource>,
    revision: Mutex<u64>,
    /// What happened, in order: "save fence the moving shards -> fenceBarrier", "revoke rz01"...
    log: Mutex<Vec<String>>,
    barrier: Mutex<BarrierFn>,
    /// A barrier that never returns (a leader stuck in one).
    barriers_hang: AtomicBool,
    /// Positions given the time since the world started.
    positions: Mutex<PositionsFn>,
    /// When the lost cells' leases run out; renewed while not revoked.
    lease_until: Mutex<OffsetDateTime>,
    revoked: Mutex<BTreeSet<String>>,
    /// The next saves that fail (a conflict, a store away).
    failing_saves: Mutex<usize>,
    /// The store finds a flipped map invalid.
    invalid_flips: AtomicBool,
    /// The next save of this (its `what`) fails, once.
    fail_what: Mutex<Option<&'static str>>,
    /// The switchover was deleted.
    gone: AtomicBool,
}

const LEASE: Duration = Duration::from_secs(2);

/// The phases of a planned switchover that completes.
const PLANNED: [SwitchoverPhase; 8] = [
    SwitchoverPhase::Pending,
    SwitchoverPhase::Fence,
    SwitchoverPhase::FenceBarrier,
    SwitchoverPhase::SyncGate,
    SwitchoverPhase::Flip,
    SwitchoverPhase::FlipBarrier,
    SwitchoverPhase::Unfence,
    SwitchoverPhase::Completed,
];

impl World {
    fn new(switchover: SwitchoverSpec, map: ShardMapSpec) -> Self {
        let start = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("a time");
        let mut switchover = switchover;
        // What came before (a resumed one's earlier phases), then its
        // current phase, started now.
        switchover.timeline.push(atoll_model::PhaseRecord {
            phase: switchover.phase,
            started: rfc3339(start),
            millis: None,
            detail: None,
        });
        Self {
            start,
            now: Mutex::new(start),
            switchover: Mutex::new(resource("users-1", Spec::Switchover(switchover), 1)),
            map: Mutex::new(resource("users", Spec::ShardMap(map), 1)),
            revision: Mutex::new(1),
            log: Mutex::new(Vec::new()),
            barrier: Mutex::new(Box::new(|_, version| reached(version))),
            barriers_hang: AtomicBool::new(false),
            positions: Mutex::new(Box::new(|_| Ok(vec![position(0, 10, 10)]))),
            lease_until: Mutex::new(start + LEASE),
            revoked: Mutex::new(BTreeSet::new()),
            failing_saves: Mutex::new(0),
            invalid_flips: AtomicBool::new(false),
            fail_what: Mutex::new(None),
            gone: AtomicBool::new(false),
        }
    }

    fn note(&self, line: String) {
        let mut log = self.log.lock();
        assert!(
            log.len() < 20_000,
            "the driver does not stop: {:?}",
            &log[..50]
        );
        log.push(line);
    }

    fn elapsed(&self) -> Duration {
        (*self.now.lock() - self.start)
            .try_into()
            .unwrap_or_default()
    }

    fn spec(&self) -> SwitchoverSpec {
        match &self.switchover.lock().spec {
            Spec::Switchover(spec) => spec.clone(),
            _ => unreachable!(),
        }
    }

    fn map_spec(&self) -> ShardMapSpec {
        match &self.map.lock().spec {
            Spec::ShardMap(spec) => spec.clone(),
            _ => unreachable!(),
        }
    }

    /// What an operator (or a predecessor) changes on the stored switchover.
    fn edit(&self, change: impl FnOnce(&mut SwitchoverSpec)) {
        let mut revision = self.revision.lock();
        *revision += 1;
        let mut stored = self.switchover.lock();
        if let Spec::Switchover(spec) = &mut stored.spec {
            change(spec);
        }
        stored.metadata.resource_version = Some(*revision);
    }

    fn saves(&self) -> Vec<String> {
        self.log
            .lock()
            .iter()
            .filter(|l| l.starts_with("save "))
            .cloned()
            .collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.log
            .lock()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    fn position_of(&self, prefix: &str) -> Option<usize> {
        self.log.lock().iter().position(|l| l.starts_with(prefix))
    }

    fn loaded(&self) -> Loaded {
        let switchover = self.switchover.lock().clone();
        let map = self.map.lock().clone();
        let (Spec::Switchover(spec), Spec::ShardMap(map_spec)) =
            (switchover.spec.clone(), map.spec.clone())
        else {
            unreachable!()
        };
        Loaded {
            switchover,
            spec,
            map,
            map_spec,
        }
    }
}

impl Record for World {
    async fn load(&self, _name: &str) -> Result<Loaded, RecordError> {
        if self.gone.load(Ordering::SeqCst) {
            self.note("load gone".into());
            return Err(RecordError::Gone("switchover/users-1 was deleted".into()));
        }
        Ok(self.loaded())
    }

    async fn save(&self, loaded: &Loaded, save: &Save) -> Result<(), RecordError> {
        {
            let mut failing = self.failing_saves.lock();
            if *failing > 0 {
                *failing -= 1;
                drop(failing);
                self.note(format!("save refused {}", save.what));
                return Err(RecordError::Failed("the store did not answer".into()));
            }
        }
        {
            let mut fail = self.fail_what.lock();
            if *fail == Some(save.what) {
                *fail = None;
                drop(fail);
                self.note(format!("save refused {}", save.what));
                return Err(RecordError::Failed("the store did not answer".into()));
            }
        }
        if save.flip && self.invalid_flips.load(Ordering::SeqCst) {
            self.note(format!("save invalid {}", save.what));
            return Err(RecordError::Invalid(
                "the shard map is invalid: shards 0-9: standby rz02 is the owner".into(),
            ));
        }
        let mut revision = self.revision.lock();
        let mut stored = self.switchover.lock();
        let mut map = self.map.lock();
        // Compare the revisions it was read at, as the store does.
        if stored.metadata.resource_version != loaded.switchover.metadata.resource_version
            || (save.map.is_some()
                && map.metadata.resource_version != loaded.map.metadata.resource_version)
        {
            drop((stored, map, revision));
            self.note(format!("save conflict {}", save.what));
            return Err(RecordError::Failed("changed meanwhile".into()));
        }
        *revision += 1;
        if let Some(next) = &save.map {
            let mut next = next.clone();
            // The control plane assigns epoch + 1 to an ownership change.
            if next.epoch == 0 {
                next.epoch = loaded.map_spec.epoch + 1;
            }
            map.spec = Spec::ShardMap(next);
            map.metadata.resource_version = Some(*revision);
        }
        stored.spec = Spec::Switchover(save.spec.clone());
        stored.metadata.resource_version = Some(*revision);
        drop((stored, map, revision));
        self.note(format!("save {} -> {}", save.what, save.spec.phase));
        Ok(())
    }
}

impl Fleet for World {
    async fn barrier(
        &self,
        spec: &SwitchoverSpec,
        lost: &[String],
        version: u64,
    ) -> BarrierResponse {
        self.note(format!("barrier v{version} {} lost={lost:?}", spec.phase));
        if self.barriers_hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let result = (self.barrier.lock())(spec, version);
        if !result.reached {
            // A barrier that is not reached waits its whole timeout.
            *self.now.lock() += spec.barrier_timeout.0;
        }
        result
    }

    fn standbys(
        &self,
        owners: &BTreeSet<String>,
        lost: &[String],
    ) -> BTreeMap<String, Option<String>> {
        self.note(format!("standbys {owners:?}"));
        owners
            .iter()
            .map(|owner| {
                let pick = ["rz03", "rz02", "rz01"]
                    .into_iter()
                    .find(|c| c != owner && !lost.iter().any(|l| l == c));
                (owner.clone(), pick.map(str::to_owned))
            })
            .collect()
    }
}

impl Probes for World {
    async fn positions(
        &self,
        _map: &ShardMapSpec,
        _moves: &[ShardMove],
        since: u64,
    ) -> Result<Vec<ShardPosition>, ProbeProblem> {
        self.note(format!("positions since v{since}"));
        let elapsed = self.elapsed();
        (self.positions.lock())(elapsed)
    }
}

impl Leases for World {
    fn revoke(&self, cell: &str) {
        if self.revoked.lock().insert(cell.to_owned()) {
            self.note(format!("revoke {cell}"));
        }
    }

    fn restore(&self, cell: &str) {
        self.revoked.lock().remove(cell);
        self.note(format!("restore {cell}"));
    }

    fn expires_in(&self, cells: &[String]) -> Duration {
        self.note(format!("lease {cells:?}"));
        let now = *self.now.lock();
        let mut until = self.lease_until.lock();
        if cells.iter().any(|c| !self.revoked.lock().contains(c)) {
            // Not revoked: the cell renewed its lease meanwhile.
            *until = now + LEASE;
        }
        (*until - now).try_into().unwrap_or_default()
    }
}

impl Clock for World {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock()
    }

    async fn sleep(&self, duration: Duration) {
        *self.now.lock() += duration;
        self.note(format!("sleep {}", duration.as_millis()));
        tokio::task::yield_now().await;
    }
}

fn resource(name: &str, spec: Spec, version: u64) -> Resource {
    let mut resource = Resource {
        metadata: atoll_model::Metadata {
            name: name.into(),
            ..atoll_model::Metadata::default()
        },
        spec,
    };
    resource.metadata.resource_version = Some(version);
    resource
}

fn reached(version: u64) -> BarrierResponse {
    BarrierResponse {
        reached: true,
        version,
        matched: 9,
        waited_ms: 3,
        laggards: Vec::new(),
        skipped: Vec::new(),
    }
}

fn not_reached(version: u64) -> BarrierResponse {
    BarrierResponse {
        reached: false,
        version,
        matched: 9,
        waited_ms: 2000,
        laggards: vec![Laggard {
            name: "gw-1".into(),
            connected: false,
            applied_version: version - 1,
            last_nack: None,
            problem: None,
        }],
        skipped: Vec::new(),
    }
}

fn position(shard: u32, written: i64, acknowledged: i64) -> ShardPosition {
    ShardPosition {
        shard,
        service: "bank".into(),
        written,
        acknowledged,
    }
}

/// 0-9 rz01 (standby rz02), 10-19 rz02 (standby rz01), 20-29 rz03
/// (standby rz01), epoch 1.
fn map() -> ShardMapSpec {
    let text = "apiVersion: atoll/v1\nkind: ShardMap\nmetadata: {name: users}\nspec:\n  rule: users\n  epoch: 1\n  assignments:\n  - {shards: \"0-9\", cell: rz01, standby: rz02}\n  - {shards: \"10-19\", cell: rz02, standby: rz01}\n  - {shards: \"20-29\", cell: rz03, standby: rz01}\n";
    match &atoll_model::load("map.yaml", text).expect("a ShardMap")[0]
        .resource
        .spec
    {
        Spec::ShardMap(spec) => spec.clone(),
        _ => unreachable!(),
    }
}

/// [`map`] with shards 0-9 fenced (at rz01).
fn fenced_map() -> ShardMapSpec {
    let mut fenced = map();
    atoll_switchover::shards::set_range(
        &mut fenced,
        atoll_model::ShardRange { start: 0, end: 9 },
        |a| a.state = ShardState::Fenced,
    );
    fenced
}

/// Shards 0-9 from rz01 to rz02.
fn planned() -> SwitchoverSpec {
    let text = "apiVersion: atoll/v1\nkind: Switchover\nmetadata: {name: users-1}\nspec:\n  shardMap: users\n  barrierTimeout: 2s\n  syncTimeout: 10s\n  moves: [{shards: \"0-9\", from: rz01, to: rz02}]\n";
    match &atoll_model::load("switchover.yaml", text).expect("a Switchover")[0]
        .resource
        .spec
    {
        Spec::Switchover(spec) => spec.clone(),
        _ => unreachable!(),
    }
}

fn failover(approved: bool) -> SwitchoverSpec {
    let mut spec = planned();
    spec.mode = SwitchoverMode::Failover;
    spec.skip_sync_gate = true;
    spec.approved = approved;
    spec
}

/// Drives the switchover of `world` to its end (at once: the clock is fake).
async fn drive(world: &Arc<World>) {
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let driver = Driver::new(world.clone());
    tokio::time::timeout(Duration::from_secs(20), driver.drive("users-1", shutdown))
        .await
        .expect("the driver finishes (on the fake clock, at once)");
}

/// When `phase` started, as recorded.
fn started(spec: &SwitchoverSpec, phase: SwitchoverPhase) -> OffsetDateTime {
    let text = spec
        .timeline
        .iter()
        .find(|r| r.phase == phase)
        .map(|r| r.started.clone())
        .unwrap_or_default();
    OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 time")
}

/// A failover of rz01 (approved) resumed at `phase`, its shards fenced.
fn failover_at(phase: SwitchoverPhase) -> World {
    let fenced = fenced_map();
    let mut spec = failover(true);
    spec.phase = phase;
    // It fenced them itself.
    spec.timeline.push(atoll_model::PhaseRecord {
        phase: SwitchoverPhase::FenceBarrier,
        started: "2027-01-15T08:00:00Z".into(),
        millis: Some(200),
        detail: None,
    });
    World::new(spec, fenced)
}

fn phases(spec: &SwitchoverSpec) -> Vec<SwitchoverPhase> {
    spec.timeline.iter().map(|r| r.phase).collect()
}

fn owner_of(map: &ShardMapSpec, shard: u32) -> (String, Option<String>, ShardState) {
    let a = map
        .assignments
        .iter()
        .find(|a| a.shards.contains(shard))
        .expect("every shard is assigned");
    (a.cell.clone(), a.standby.clone(), a.state)
}

async fn until(world: &World, what: impl Fn(&World) -> bool) {
    for _ in 0..10_000 {
        if what(world) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {:?}", world.log.lock());
}

#[tokio::test]
async fn a_planned_switchover_walks_every_phase_once_and_moves_the_shards() {
    let world = Arc::new(World::new(planned(), map()));
    drive(&world).await;
    let spec = world.spec();
    assert_eq!(phases(&spec), PLANNED);
    assert_eq!(
        world.saves(),
        [
            "save start -> fence",
            "save fence the moving shards -> fenceBarrier",
            "save fence barrier reached -> syncGate",
            "save sync gate passed -> flip",
            "save flip the owners -> flipBarrier",
            "save flip barrier reached -> unfence",
            "save unfence at the new owners -> completed",
        ]
    );
    let map = world.map_spec();
    assert_eq!(map.epoch, 2, "the flip is a new epoch");
    assert_eq!(
        owner_of(&map, 0),
        ("rz02".into(), Some("rz01".into()), ShardState::Serving)
    );
    assert_eq!(owner_of(&map, 9).0, "rz02");
    assert_eq!(
        owner_of(&map, 10).0,
        "rz02",
        "shards that did not move stay"
    );
    assert_eq!(owner_of(&map, 20).0, "rz03");
    assert_eq!(spec.epoch_before, Some(1));
    // Each barrier waited for the map version its phase wrote.
    assert_eq!(spec.fence_revision, Some(3));
    assert_eq!(spec.flip_revision, Some(6));
    assert_eq!(spec.positions, [position(0, 10, 10)]);
    assert_eq!(
        world.count("revoke"),
        0,
        "a planned switchover revokes no lease"
    );
    assert!(spec.timeline.iter().all(|r| r.millis.is_some()));
}

#[tokio::test]
async fn the_sync_gate_polls_the_probes_until_the_standby_caught_up() {
    let world = Arc::new(World::new(planned(), map()));
    *world.positions.lock() = Box::new(|elapsed| {
        let acknowledged = if elapsed >= Duration::from_millis(300) {
            10
        } else {
            7
        };
        Ok(vec![position(3, 10, acknowledged)])
    });
    drive(&world).await;
    assert_eq!(world.spec().phase, SwitchoverPhase::Completed);
    // Every 50 ms on the fake clock: at 0, 50, ... 300.
    assert_eq!(world.count("positions"), 7);
    // Only positions read after the fence barrier count: under a version
    // newer than the fenced map's (the gate's own record's).
    let fenced: u64 = world
        .log
        .lock()
        .iter()
        .find_map(|l| {
            l.strip_prefix("barrier v")
                .filter(|rest| rest.contains(" fenceBarrier"))
                .and_then(|rest| rest.split(' ').next())
                .and_then(|v| v.parse().ok())
        })
        .expect("a fence barrier");
    let since: Vec<u64> = world
        .log
        .lock()
        .iter()
        .filter_map(|l| l.strip_prefix("positions since v")?.parse().ok())
        .collect();
    assert_eq!(since.len(), 7);
    assert!(
        since.iter().all(|v| *v > fenced),
        "positions since {since:?}, the fence barrier on {fenced}: {:?}",
        world.log.lock()
    );
    let gate = world
        .spec()
        .timeline
        .into_iter()
        .find(|r| r.phase == SwitchoverPhase::SyncGate)
        .expect("a sync gate");
    assert_eq!(gate.millis, Some(300));
    assert_eq!(
        gate.detail.as_deref(),
        Some("1 shards caught up at their standby")
    );
}

#[tokio::test]
async fn a_sync_gate_that_never_catches_up_aborts_at_its_timeout_and_unfences() {
    let world = Arc::new(World::new(planned(), map()));
    *world.positions.lock() = Box::new(|_| Ok(vec![position(3, 10, 7)]));
    drive(&world).await;
    let spec = world.spec();
    assert_eq!(spec.phase, SwitchoverPhase::Aborted);
    let message = spec.message.clone().unwrap_or_default();
    assert_eq!(
        message,
        "the sync gate timed out after 10s: the targets are behind on shard 3 (bank at 10, standby at 7); nothing moved"
    );
    assert_eq!(world.map_spec(), map(), "the map is as before, unfenced");
    assert_eq!(
        world.saves().last().map(String::as_str),
        Some("save abort: unfence -> aborted")
    );
    // It gave up at the deadline, not before, not long after.
    assert!(
        world.elapsed() >= Duration::from_secs(10),
        "{:?}",
        world.elapsed()
    );
    assert!(
        world.elapsed() < Duration::from_millis(10_100),
        "{:?}",
        world.elapsed()
    );
    assert_eq!(
        spec.positions,
        [position(3, 10, 7)],
        "the abort records how far behind"
    );
}

#[tokio::test]
async fn a_sync_gate_resumed_by_a_new_leader_keeps_its_deadline() {
    // The previous leader fenced, and entered the sync gate 30 s ago.
    let fenced = fenced_map();
    let mut spec = planned();
    spec.phase = SwitchoverPhase::SyncGate;
    let world = Arc::new(World::new(spec, fenced));
    let start = world.start;
    world.edit(|spec| {
        spec.timeline[0].started = rfc3339(start - Duration::from_secs(30));
        spec.timeline.insert(
            0,
            atoll_model::PhaseRecord {
                phase: SwitchoverPhase::FenceBarrier,
                started: rfc3339(start - Duration::from_secs(31)),
                millis: Some(1000),
                detail: None,
            },
        );
    });
    *world.positions.lock() = Box::new(|_| Ok(vec![position(3, 10, 7)]));
    drive(&world).await;
    assert_eq!(world.spec().phase, SwitchoverPhase::Aborted);
    assert_eq!(world.count("positions"), 1, "aborted on the first reading");
    assert_eq!(world.elapsed(), Duration::ZERO);
    assert_eq!(
        world.map_spec(),
        map(),
        "and unfenced what its predecessor fenced"
    );
}

#[tokio::test]
async fn a_fence_barrier_that_times_out_aborts_and_nothing_moves() {
    let world = Arc::new(World::new(planned(), map()));
    *world.barrier.lock() = Box::new(|_, version| not_reached(version));
    drive(&world).await;
    let spec = world.spec();
    assert_eq!(spec.phase, SwitchoverPhase::Aborted);
    assert_eq!(
        spec.message.as_deref(),
        Some(
            "the fence barrier on version 3 timed out after 2s: gw-1 (disconnected, at 2) lag; nothing moved"
        )
    );
    assert_eq!(world.map_spec(), map());
    assert_eq!(world.count("save flip"), 0);
    assert_eq!(
        world.count("positions"),
        0,
        "no sync gate after a failed barrier"
    );
}

#[tokio::test]
async fn after_the_flip_there_is_no_way_back() {
    let world = Arc::new(World::new(planned(), map()));
    let seen = Arc::downgrade(&world);
    let mut flip_barriers = 0;
    *world.barrier.lock() = Box::new(move |spec, version| {
        if spec.phase == SwitchoverPhase::FenceBarrier {
            return reached(version);
        }
        flip_barriers += 1;
        if flip_barriers == 2
            && let Some(world) = seen.upgrade()
        {
            // An operator asks for an abort while the flip barrier waits.
            world.edit(|spec| spec.abort_requested = true);
        }
        if flip_barriers <= 4 {
            not_reached(version)
        } else {
            reached(version)
        }
    });
    drive(&world).await;
    let spec = world.spec();
    assert_eq!(
        spec.phase,
        SwitchoverPhase::Completed,
        "{:?}",
        world.saves()
    );
    assert_eq!(
        world.count("save flip barrier waiting"),
        1,
        "the message is saved once, not on every wait"
    );
    assert_eq!(owner_of(&world.map_spec(), 0).0, "rz02");
    assert_eq!(
        spec.message, None,
        "the wait's message is cleared once reached"
    );
}

#[tokio::test]
async fn an_abort_asked_during_the_sync_gate_unfences_the_shards() {
    let world = Arc::new(World::new(planned(), map()));
    let seen = Arc::downgrade(&world);
    let mut reads = 0;
    *world.positions.lock() = Box::new(move |_| {
        reads += 1;
        if reads == 3
            && let Some(world) = seen.upgrade()
        {
            world.edit(|spec| {
                spec.abort_requested = true;
                spec.message = Some("abort requested by alice".into());
            });
        }
        Ok(vec![position(3, 10, 7)])
    });
    drive(&world).await;
    let spec = world.spec();
    assert_eq!(spec.phase, SwitchoverPhase::Aborted);
    assert_eq!(spec.message.as_deref(), Some("abort requested by alice"));
    assert_eq!(world.map_spec(), map());
    assert_eq!(world.count("positions"), 3, "seen on the next step");
}

#[tokio::test]
async fn a_failover_waits_for_approval_then_revokes_the_lost_cell_and_outwaits_its_lease() {
    let world = Arc::new(World::new(failover(false), map()));
    let run = tokio::spawn({
        let world = world.clone();
        async move { drive(&world).await }
    });
    // Waiting for approval on the fake clock, revoking nothing meanwhile.
    until(&world, |w| w.count("sleep 200") >= 5).await;
    assert_eq!(world.spec().phase, SwitchoverPhase::AwaitingApproval);
    assert_eq!(
        world.count("revoke"),
        0,
        "no revocation before the approval"
    );
    world.edit(|spec| spec.approved = true);
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("finishes")
        .expect("no panic");
    let spec = world.spec();
    use SwitchoverPhase::*;
    assert_eq!(
        phases(&spec),
        [
            Pending,
            AwaitingApproval,
            Fence,
            FenceBarrier,
            LeaseExpiry,
            Flip,
            FlipBarrier,
            Unfence,
            Completed
        ]
    );
    // Revoked before the lease is read (a renewal cannot slip in between),
    // and the flip waits until the lease ran out on the fake clock.
    let revoked = world.position_of("revoke rz01").expect("revoked");
    let read = world.position_of("lease").expect("read");
    assert!(revoked < read, "{:?}", world.log.lock());
    let flipped_at = started(&spec, Flip);
    let lease_end = *world.lease_until.lock();
    assert!(
        flipped_at >= lease_end,
        "flipped at {flipped_at}, the lease ran until {lease_end}"
    );
    // Its barriers did not wait for the lost cell.
    assert!(
        world
            .log
            .lock()
            .iter()
            .filter(|l| l.starts_with("barrier"))
            .all(|l| l.contains("lost=[\"rz01\"]"))
    );
    // The new owner got a live standby; shards rz01 stood by for got another.
    let map = world.map_spec();
    assert_eq!(
        owner_of(&map, 0),
        ("rz02".into(), Some("rz03".into()), ShardState::Serving)
    );
    assert_eq!(owner_of(&map, 10).1.as_deref(), Some("rz03"));
    assert_eq!(owner_of(&map, 20).1.as_deref(), Some("rz02"));
    // Leases again once it owns nothing: after the last save.
    let restored = world.position_of("restore rz01").expect("restored");
    let completed = world.position_of("save unfence").expect("completed");
    assert!(completed < restored);
}

#[tokio::test]
async fn a_flip_the_store_finds_invalid_aborts_before_the_flip() {
    let world = Arc::new(World::new(planned(), map()));
    world.invalid_flips.store(true, Ordering::SeqCst);
    drive(&world).await;
    let spec = world.spec();
    assert_eq!(spec.phase, SwitchoverPhase::Aborted);
    assert_eq!(
        spec.message.as_deref(),
        Some(
            "the flipped shard map is invalid (the shard map is invalid: shards 0-9: standby rz02 is the owner)"
        )
    );
    assert_eq!(world.map_spec(), map(), "unfenced, nothing flipped");
    assert_eq!(world.count("save invalid"), 1, "not retried");
}

#[tokio::test]
async fn a_failed_save_is_retried_from_the_stored_phase() {
    let world = Arc::new(World::new(planned(), map()));
    *world.failing_saves.lock() = 3;
    drive(&world).await;
    let spec = world.spec();
    assert_eq!(spec.phase, SwitchoverPhase::Completed);
    assert_eq!(world.count("save refused"), 3);
    assert_eq!(world.count("sleep 200"), 3, "each retried after 200 ms");
    let mut seen = BTreeSet::new();
    assert!(
        phases(&spec).into_iter().all(|p| seen.insert(p)),
        "each phase once: {:?}",
        phases(&spec)
    );
}

#[tokio::test]
async fn shards_that_changed_owner_meanwhile_abort_the_fence() {
    let mut moved = map();
    moved.assignments[0].cell = "rz03".into();
    let world = Arc::new(World::new(planned(), moved.clone()));
    drive(&world).await;
    assert_eq!(world.spec().phase, SwitchoverPhase::Aborted);
    assert_eq!(
        world.spec().message.as_deref(),
        Some("shards 0-9 are no longer all owned by rz01; nothing was fenced")
    );
    assert_eq!(world.map_spec(), moved);
}

#[tokio::test]
async fn the_term_ending_stops_the_driver_and_the_next_leader_resumes_at_the_stored_phase() {
    let world = Arc::new(World::new(planned(), map()));
    world.barriers_hang.store(true, Ordering::SeqCst);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = tokio::spawn({
        let world = world.clone();
        async move {
            Driver::new(world).drive("users-1", shutdown).await;
        }
    });
    until(&world, |w| w.count("barrier") > 0).await;
    assert_eq!(world.spec().phase, SwitchoverPhase::FenceBarrier);
    stop.send(true).expect("the driver listens");
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("it stops at once, even inside a barrier")
        .expect("no panic");
    // The next leader, over the same store.
    world.barriers_hang.store(false, Ordering::SeqCst);
    drive(&world).await;
    assert_eq!(phases(&world.spec()), PLANNED);
    assert_eq!(
        world.count("save fence the moving shards"),
        1,
        "not fenced twice"
    );
}

#[test]
fn prepare_asks_for_what_each_phase_needs() {
    let world = World::new(planned(), map());
    let at = |phase: SwitchoverPhase, mode: SwitchoverMode| {
        let mut loaded = world.loaded();
        loaded.spec.phase = phase;
        loaded.spec.mode = mode;
        loaded.spec.approved = true;
        machine::prepare(&loaded)
    };
    use SwitchoverMode::{Failover, Planned};
    use SwitchoverPhase::*;
    assert_eq!(at(FenceBarrier, Planned).need, Need::Barrier { version: 1 });
    assert_eq!(at(SyncGate, Planned).need, Need::Positions);
    assert_eq!(at(Flip, Planned).need, Need::Nothing);
    assert_eq!(at(LeaseExpiry, Failover).need, Need::LeaseExpiry);
    assert_eq!(
        at(Flip, Failover).need,
        Need::Standbys {
            owners: ["rz01", "rz02", "rz03"].map(String::from).into()
        }
    );
    assert!(at(SyncGate, Planned).revoke.is_empty());
    assert_eq!(at(Fence, Failover).revoke, ["rz01"]);
    assert!(
        at(Completed, Failover).revoke.is_empty(),
        "nothing revoked once over"
    );
}

#[tokio::test]
async fn a_failover_resumed_at_lease_expiry_revokes_before_it_reads_the_lease() {
    let world = Arc::new(failover_at(SwitchoverPhase::LeaseExpiry));
    drive(&world).await;
    let log = world.log.lock().clone();
    assert_eq!(log[0], "revoke rz01", "{log:?}");
    assert!(log[1].starts_with("lease"), "{log:?}");
    assert_eq!(
        *world.lease_until.lock(),
        world.start + LEASE,
        "no renewal slipped in between"
    );
    assert_eq!(log[2], "sleep 2000", "it waits out the lease: {log:?}");
    let spec = world.spec();
    assert_eq!(spec.phase, SwitchoverPhase::Completed);
    assert_eq!(started(&spec, SwitchoverPhase::Flip), world.start + LEASE);
    let expiry = spec
        .timeline
        .iter()
        .find(|r| r.phase == SwitchoverPhase::LeaseExpiry)
        .and_then(|r| r.detail.clone());
    assert_eq!(
        expiry.as_deref(),
        Some("the leases of rz01 have expired (waited 2000 ms)")
    );
}

#[tokio::test]
async fn a_refused_unfence_restores_no_lease_before_it_lands() {
    let world = Arc::new(failover_at(SwitchoverPhase::Unfence));
    *world.fail_what.lock() = Some("unfence at the new owners");
    drive(&world).await;
    let refused = world.position_of("save refused").expect("refused once");
    let landed = world
        .position_of("save unfence at the new owners")
        .expect("saved on the retry");
    let restored = world.position_of("restore rz01").expect("restored");
    assert!(
        refused < landed && landed < restored,
        "{:?}",
        world.log.lock()
    );
    assert_eq!(world.count("restore"), 1);
}

#[tokio::test]
async fn an_aborted_failover_gives_the_lost_cell_its_leases_back() {
    let world = Arc::new(failover_at(SwitchoverPhase::Flip));
    world.invalid_flips.store(true, Ordering::SeqCst);
    drive(&world).await;
    assert_eq!(world.spec().phase, SwitchoverPhase::Aborted);
    let aborted = world.position_of("save abort").expect("aborted");
    let restored = world.position_of("restore rz01").expect("restored");
    assert!(aborted < restored, "{:?}", world.log.lock());
    assert_eq!(
        owner_of(&world.map_spec(), 0),
        ("rz01".into(), Some("rz02".into()), ShardState::Serving),
        "unfenced at the lost cell, standby as before"
    );
}

#[tokio::test]
async fn a_deleted_switchover_stops_the_driver() {
    let world = Arc::new(World::new(planned(), map()));
    world.gone.store(true, Ordering::SeqCst);
    drive(&world).await;
    assert_eq!(*world.log.lock(), ["load gone"]);
}

#[tokio::test]
async fn a_sync_gate_whose_start_cannot_be_read_is_over() {
    let mut spec = planned();
    spec.phase = SwitchoverPhase::SyncGate;
    let world = Arc::new(World::new(spec, map()));
    world.edit(|spec| spec.timeline[0].started = "yesterday".into());
    *world.positions.lock() = Box::new(|_| Ok(vec![position(3, 10, 7)]));
    drive(&world).await;
    assert_eq!(world.spec().phase, SwitchoverPhase::Aborted);
    assert_eq!(world.count("positions"), 1);
}
