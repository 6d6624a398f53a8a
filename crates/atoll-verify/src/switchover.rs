//! The switchover and failover protocol of docs/architecture.md as a [`stateright::Model`].
//!
//! One shard, two cells (`A` owns it first, `B` stands by and applies `A`'s change log with
//! lag), one or two gateways, and the control plane's orchestrator. Every step that happens
//! on its own in the real system is a separate action here, so the checker tries every
//! interleaving of them: a client write, its delivery to a cell, each node applying the next
//! map version, each change-log entry shipped, each orchestrator step, a lease running out, a
//! control-plane restart. See `docs/design/model-check.md` for what is abstracted away.

use std::fmt;

use stateright::{Model, Property};

/// A client write, numbered in the order clients send them.
pub type WriteId = u8;

/// Gateways the model allows at most; with one app instance per cell, four nodes.
const MAX_GATEWAYS: u8 = 2;
const MAX_NODES: usize = MAX_GATEWAYS as usize + 2;

/// Names of the properties, for tests and reports.
pub mod property {
    /// `always`: for every epoch, writes accepted in it were accepted by one cell.
    pub const ONE_WRITER_PER_EPOCH: &str = "one writer per epoch";
    /// `always`: once a write was accepted in an epoch, none is accepted in an older one (no
    /// second writer at the same time, even in different epochs).
    pub const NO_WRITER_BEHIND_NEWER_EPOCH: &str = "no write accepted behind a newer epoch";
    /// `always`: no cell accepts a write while the shard is fenced in its view.
    pub const NO_WRITE_WHILE_FENCED: &str = "no write accepted while fenced";
    /// `always`: no cell accepts a write stamped with an epoch other than its view's.
    pub const NO_WRITE_FROM_ANOTHER_EPOCH: &str = "no write accepted from another epoch";
    /// `always`: no cell holds a write twice.
    pub const NO_WRITE_APPLIED_TWICE: &str = "no write applied twice";
    /// `always` (planned): once the switchover completed (or aborted), the owner in the latest
    /// map holds every acknowledged write.
    pub const NO_ACKNOWLEDGED_WRITE_LOST: &str = "no acknowledged write lost";
    /// `always` (planned): at every instant, the owner in the latest published map holds
    /// every acknowledged write (stronger than the one above: no window where the map points
    /// at a cell that lacks one).
    pub const OWNER_HOLDS_EVERY_WRITE: &str =
        "the owner in the latest map holds every acknowledged write";
    /// `always` (failover): from the moment the RPO report is made (the flip barrier) on, the
    /// acknowledged writes the new owner lacks are exactly the ones it names.
    pub const RPO_REPORT_TRUTHFUL: &str = "lost writes are exactly the reported ones";
    /// `sometimes` (planned): the switchover completes after both cells accepted writes.
    pub const COMPLETED_WITH_WRITES_AT_BOTH: &str = "completed with writes accepted at both cells";
    /// `sometimes`: the orchestrator completes after a control-plane restart.
    pub const COMPLETED_AFTER_RESTART: &str = "completed after a control-plane restart";
    /// `sometimes`: the orchestrator aborts and unfences after some writes were accepted.
    pub const ABORTED: &str = "aborted after accepting writes";
    /// `sometimes` (failover): the failover completes with writes lost, and reports them.
    pub const COMPLETED_WITH_REPORTED_LOSS: &str = "completed with a reported loss";
    /// `sometimes`: the orchestrator completes after a leader change in which the deposed
    /// leader still had a write on its way.
    pub const COMPLETED_AFTER_LEADER_CHANGE: &str =
        "completed after a leader change with a deposed leader's write on its way";
}

// === Configuration ===

/// A planned switchover or an unplanned failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Both cells are reachable; the orchestrator waits for the sync gate, so nothing is lost.
    Planned,
    /// Cell `A` is partitioned from the control plane from the start: it receives no config
    /// and cannot renew its lease, but gateways with an old view may still send it writes.
    /// The orchestrator skips the sync gate, waits for `A`'s lease to expire, and reports
    /// what it could not carry.
    Failover,
}

/// Deliberate mistakes in the protocol. With any of them set the checker must find a
/// counterexample; that is what shows the step it removes is needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flaws {
    /// The orchestrator leaves the fence barrier without waiting for every node to apply
    /// the fenced version.
    pub skip_fence_barrier: bool,
    /// The orchestrator flips without waiting for the target's replication position.
    pub skip_sync_gate: bool,
    /// Failover flips without waiting for the lost cell's lease to expire.
    pub skip_lease_wait: bool,
    /// App instances accept a write whatever epoch its router stamped on it.
    pub skip_epoch_check: bool,
    /// An app instance applies (and acknowledges) a new map version while a write admitted
    /// under the old one is still being committed: no write permit (`atoll-sdk`'s
    /// `WritePermit`) holds the view.
    pub apply_during_write: bool,
    /// Barriers count only the nodes the control plane's (in-memory) registry knows, which
    /// is empty right after a restart; the correct barrier counts an unknown node as a laggard.
    pub barrier_over_known_nodes: bool,
    /// Store writes do not compare the writer's term with the leader key's: a deposed
    /// leader's write lands.
    pub skip_term_compare: bool,
    /// A leader goes on acting after its election lease could have expired (no acting
    /// window): a new leader is elected while the old one still acts, and the old one, on the
    /// lost cell's side of a partition, renews its lease.
    pub skip_acting_window: bool,
}

/// The bounds and variant of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Planned switchover or failover.
    pub kind: Kind,
    /// Gateways, 1 or 2.
    pub gateways: u8,
    /// Client writes sent in all (each through any gateway, at any time).
    pub writes: u8,
    /// Control-plane restarts that may happen while the orchestrator runs.
    pub restarts: u8,
    /// Leader changes of a replicated control plane that may happen while the orchestrator
    /// runs: a new leader takes over at the persisted phase, and the deposed one may still
    /// have one write on its way (decided inside its acting window, sent after it).
    pub leader_changes: u8,
    /// Whether the orchestrator may abort before the flip.
    pub abort: bool,
    /// Failover with two gateways: the second one is in the lost cell's zone, partitioned
    /// with it: it keeps routing by the map it had, and barriers cannot count it.
    pub partitioned_gateway: bool,
    /// Planned, with two gateways: the second one may vanish at any moment (it crashed, or
    /// its host was cut off) and never come back, while whatever it routed is still on its
    /// way and, cut off but alive, it goes on routing by the map it had. Barriers stop
    /// counting it once it is disconnected: it holds no lease, so it cannot write, and the
    /// cells' own checks refuse what it routes by an older map.
    pub vanishing_gateway: bool,
    /// Switchovers run one after the other: 1 (A to B) or 2 (A to B, then back to A).
    /// Failover allows 1.
    pub switchovers: u8,
    /// Deliberate mistakes; none by default.
    pub flaws: Flaws,
}

impl Config {
    /// A planned switchover with two gateways, three writes, two control-plane restarts and
    /// abort allowed.
    pub fn planned() -> Self {
        Self {
            kind: Kind::Planned,
            gateways: 2,
            writes: 3,
            restarts: 2,
            leader_changes: 0,
            abort: true,
            partitioned_gateway: false,
            vanishing_gateway: false,
            switchovers: 1,
            flaws: Flaws::default(),
        }
    }

    /// A failover of cell `A` with two gateways (one partitioned with `A`), four writes, two
    /// control-plane restarts and abort allowed.
    pub fn failover() -> Self {
        Self {
            kind: Kind::Failover,
            writes: 4,
            partitioned_gateway: true,
            ..Self::planned()
        }
    }
}

/// A [`Config`] outside what the model supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig(pub &'static str);

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid model configuration: {}", self.0)
    }
}

impl std::error::Error for InvalidConfig {}

// === State ===

/// One of the two cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cell {
    /// The first owner.
    A,
    /// The first standby.
    B,
}

impl Cell {
    const ALL: [Cell; 2] = [Cell::A, Cell::B];

    const fn index(self) -> usize {
        match self {
            Cell::A => 0,
            Cell::B => 1,
        }
    }

    /// The other cell.
    pub const fn other(self) -> Cell {
        match self {
            Cell::A => Cell::B,
            Cell::B => Cell::A,
        }
    }
}

/// A data-plane node that follows the config stream and acknowledges what it applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// A gateway: routes a write by its view of the shard map.
    Gateway(u8),
    /// A cell's app instance: accepts or refuses a write by its own view (the SDK's guard).
    Instance(Cell),
}

/// The one shard's entry in one version of the shard map.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapVersion {
    /// The cell that owns the shard.
    pub owner: Cell,
    /// Whether writes are refused (during a switchover).
    pub fenced: bool,
    /// Increases on every ownership change.
    pub epoch: u8,
}

impl fmt::Debug for MapVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.fenced { "fenced" } else { "serving" };
        write!(f, "{:?} {} e{}", self.owner, state, self.epoch)
    }
}

/// The orchestrator's phase; persisted, so a restarted control plane resumes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Publish the fenced version.
    Fence,
    /// Wait until every node applied the fenced version.
    FenceBarrier,
    /// Read the source's written position, wait until the target's replicated position
    /// reaches it (planned only).
    SyncGate,
    /// Wait until the lost cell's lease expired (failover only).
    LeaseWait,
    /// Publish the version where the target owns the shard, still fenced, at epoch + 1.
    Flip,
    /// Wait until every node applied the flipped version.
    FlipBarrier,
    /// Publish the version where the target serves.
    Unfence,
    /// Finished: the target serves.
    Completed,
    /// Abort requested (persisted); publish the source serving again, then end.
    Aborting,
    /// Finished without moving the shard.
    Aborted,
}

impl Phase {
    fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Aborted)
    }
}

/// A routed write on its way from a gateway to a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Which write.
    pub write: WriteId,
    /// The owner in the gateway's view.
    pub cell: Cell,
    /// The epoch of the gateway's view, stamped on the request.
    pub epoch: u8,
}

/// Ghost record of a write a cell accepted (appended to its log and acknowledged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Acceptance {
    /// Which write.
    pub write: WriteId,
    /// The cell that accepted it.
    pub cell: Cell,
    /// The epoch of that cell's view when it accepted.
    pub view_epoch: u8,
    /// The epoch the router stamped.
    pub stamp_epoch: u8,
    /// Whether the shard was fenced in that cell's view.
    pub view_fenced: bool,
}

/// A write to the store by the orchestrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Write {
    /// A new map version.
    Publish(MapVersion),
    /// The next phase.
    Advance(Phase),
    /// The abort request.
    Abort,
}

/// A replica that was the leader, has been deposed, and does not know it yet (it was
/// frozen or cut off): what it still holds in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Deposed {
    /// The phase and round it last read or wrote.
    pub phase: Phase,
    /// Which switchover it was driving.
    pub round: u8,
    /// Its sync gate's target.
    pub sync_target: Option<u8>,
    /// A write it decided on while it still led, not yet sent.
    pub pending: Option<Write>,
}

/// What an orchestrator holds in memory while it drives: the phase and round it last read
/// or wrote, and its sync gate's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Driver {
    phase: Phase,
    round: u8,
    sync_target: Option<u8>,
}

/// The whole system at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The control plane's store: every published version, the index is the version.
    pub published: Vec<MapVersion>,
    /// The version each node has applied (and acknowledged), by node index.
    pub applied: [u8; MAX_NODES],
    /// Bit per node index: the control plane's registry has heard from it since its last
    /// restart (in memory).
    pub known: u8,
    /// Persisted orchestrator phase.
    pub phase: Phase,
    /// Which switchover is running (0, or 1 for the move back).
    pub round: u8,
    /// The source's written position read after the fence barrier (in memory).
    pub sync_target: Option<u8>,
    /// Control-plane restarts so far.
    pub restarts: u8,
    /// The leader's term (the create revision of its election key): each election adds one.
    pub term: u8,
    /// Leader changes so far.
    pub elections: u8,
    /// The deposed leader, while it still believes it leads.
    pub deposed: Option<Deposed>,
    /// Ghost: a deposed leader's write reached the store and was refused.
    pub refused_deposed_write: bool,
    /// Whether the lost cell's lease has run out (failover).
    pub lease_expired: bool,
    /// Whether the vanishing gateway has vanished (its stream is gone for good).
    pub vanished: bool,
    /// Client writes sent so far; the next write's id.
    pub sent: u8,
    /// Routed writes not yet delivered, by write id.
    pub in_flight: Vec<Request>,
    /// Writes a cell admitted (it holds a write permit) and has not committed yet.
    pub admitted: Vec<Request>,
    /// Each cell's log for the shard: its own accepted writes and the entries it applied
    /// from the owner's change log, in order.
    pub data: [Vec<WriteId>; 2],
    /// Each cell's log length when it last took ownership (its replicated position then).
    pub promoted_at: [Option<u8>; 2],
    /// Ghost: every accepted write, in the order accepted.
    pub accepted: Vec<Acceptance>,
    /// Failover's RPO report (persisted at the flip barrier): the writes of the lost cell
    /// past the position the new owner took over at.
    pub reported_lost: Option<Vec<WriteId>>,
}

impl State {
    /// One line: phase, published versions, each node's applied version, each cell's log,
    /// requests in flight.
    pub fn summary(&self, model: &Switchover) -> String {
        let mut views = Vec::new();
        for node in model.nodes() {
            let name = match node {
                Node::Gateway(g) => format!("g{g}"),
                Node::Instance(cell) => format!("{cell:?}"),
            };
            let known = if model.gone(self, node) {
                " gone"
            } else if self.known & model.bit(node) != 0 {
                ""
            } else {
                "?"
            };
            views.push(format!(
                "{name}=V{}{known}",
                self.applied[model.node_index(node)]
            ));
        }
        let requests = |requests: &[Request]| -> String {
            let text: Vec<String> = requests
                .iter()
                .map(|r| format!("w{}->{:?}@e{}", r.write, r.cell, r.epoch))
                .collect();
            text.join(" ")
        };
        let deposed = match self.deposed {
            Some(d) => format!(
                " | deposed leader at {:?} (round {}){}",
                d.phase,
                d.round,
                d.pending
                    .map_or(String::new(), |w| format!(", sending {w:?}"))
            ),
            None => String::new(),
        };
        format!(
            "phase {:?} (round {}, term {}){deposed} | map {:?} | views {} | logs A={:?} B={:?} | in flight [{}] | admitted [{}]",
            self.phase,
            self.round,
            self.term,
            self.published,
            views.join(" "),
            self.data[0],
            self.data[1],
            requests(&self.in_flight),
            requests(&self.admitted),
        )
    }

    fn latest(&self) -> usize {
        self.published.len() - 1
    }
}

// === Actions ===

/// One step of one participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A client sends the next write through this gateway, which routes it by its view.
    Send(u8),
    /// A routed write reaches its cell, which admits it (taking a write permit) or refuses it
    /// by its own view.
    Deliver(WriteId),
    /// A cell commits an admitted write to its log and acknowledges it, releasing the permit;
    /// a cell whose lease ran out meanwhile abandons it instead.
    Commit(WriteId),
    /// A node applies the next map version and acknowledges it.
    Apply(Node),
    /// After a control-plane restart, a node reconnects and reports its applied version.
    Reconnect(Node),
    /// A standby cell applies the next entry of the owner's change log.
    Ship(Cell),
    /// The lost cell's lease runs out; its renewals stopped when it was partitioned.
    LeaseExpires,
    /// The vanishing gateway's stream goes away for good.
    Vanish,
    /// The orchestrator publishes the version its phase calls for.
    Publish(MapVersion),
    /// The orchestrator reads the source's written position (the sync gate's target).
    ReadSourcePosition,
    /// The orchestrator persists its next phase.
    Advance(Phase),
    /// The orchestrator decides to abort (before the flip).
    Abort,
    /// The control plane crashes and restarts: the phase and the store survive, the node
    /// registry and the sync target (in memory) do not.
    Restart,
    /// The leader's acting window closes (it is frozen or cut off from the store) and another
    /// replica is elected with the next term. It resumes at the persisted phase with an empty
    /// registry and no sync target. The old leader may have decided on one write that it has
    /// not sent yet.
    Elect(Option<Write>),
    /// The deposed leader sends the write it had decided on. The store compares its term
    /// with the leader key's and refuses it; the deposed leader steps down.
    DeposedSends,
    /// (Flaw `skip_acting_window`.) The deposed leader takes the next step of its own
    /// (stale) phase.
    DeposedStep(Write),
    /// (Flaw `skip_acting_window`.) The deposed leader reads the source's position.
    DeposedReadsPosition,
    /// (Flaw `skip_acting_window`, failover.) The deposed leader, on the lost cell's side of
    /// the partition, renews the lost cell's lease.
    DeposedRenews,
}

impl Action {
    /// The orchestrator's store write this action is, if it is one.
    fn write(self) -> Option<Write> {
        match self {
            Action::Publish(version) => Some(Write::Publish(version)),
            Action::Advance(phase) => Some(Write::Advance(phase)),
            Action::Abort => Some(Write::Abort),
            _ => None,
        }
    }
}

// === impl Switchover ===

/// The model: a [`Config`] and the protocol's rules.
#[derive(Clone, Debug)]
pub struct Switchover {
    config: Config,
}

impl Switchover {
    /// A model for `config`.
    pub fn new(config: Config) -> Result<Self, InvalidConfig> {
        if config.gateways == 0 || config.gateways > MAX_GATEWAYS {
            return Err(InvalidConfig("gateways must be 1 or 2"));
        }
        if config.switchovers == 0 || config.switchovers > 2 {
            return Err(InvalidConfig("switchovers must be 1 or 2"));
        }
        if config.kind == Kind::Failover && config.switchovers != 1 {
            return Err(InvalidConfig("failover runs one switchover"));
        }
        if config.partitioned_gateway && (config.kind != Kind::Failover || config.gateways != 2) {
            return Err(InvalidConfig(
                "a partitioned gateway needs a failover with two gateways",
            ));
        }
        if config.vanishing_gateway && (config.kind != Kind::Planned || config.gateways != 2) {
            return Err(InvalidConfig(
                "a vanishing gateway needs a planned switchover with two gateways",
            ));
        }
        if config.writes > 16 {
            return Err(InvalidConfig("at most 16 writes"));
        }
        Ok(Self { config })
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn nodes(&self) -> impl Iterator<Item = Node> + use<> {
        (0..self.config.gateways)
            .map(Node::Gateway)
            .chain(Cell::ALL.map(Node::Instance))
    }

    fn node_index(&self, node: Node) -> usize {
        match node {
            Node::Gateway(g) => usize::from(g),
            Node::Instance(cell) => usize::from(self.config.gateways) + cell.index(),
        }
    }

    fn bit(&self, node: Node) -> u8 {
        1 << self.node_index(node)
    }

    fn all_known(&self) -> u8 {
        self.nodes().fold(0, |bits, node| bits | self.bit(node))
    }

    /// The cell partitioned from the control plane, in a failover.
    fn lost(&self) -> Option<Cell> {
        match self.config.kind {
            Kind::Planned => None,
            Kind::Failover => Some(Cell::A),
        }
    }

    /// Whether the control plane reaches `node`: it delivers config to it and counts it in
    /// barriers. The lost cell's nodes are left out of barriers (forgotten, in Atoll's terms);
    /// its lease stands in for them.
    fn reachable(&self, node: Node) -> bool {
        let Some(lost) = self.lost() else {
            return true;
        };
        let partitioned_gateway =
            self.config.partitioned_gateway && node == Node::Gateway(self.config.gateways - 1);
        node != Node::Instance(lost) && !partitioned_gateway
    }

    /// Whether `node` is the vanishing gateway and has vanished: it receives no config, and
    /// barriers do not wait for it (a disconnected node without a lease).
    fn gone(&self, state: &State, node: Node) -> bool {
        state.vanished && node == Node::Gateway(self.config.gateways - 1)
    }

    fn view(&self, state: &State, node: Node) -> MapVersion {
        state.published[usize::from(state.applied[self.node_index(node)])]
    }

    fn source(round: u8) -> Cell {
        if round.is_multiple_of(2) {
            Cell::A
        } else {
            Cell::B
        }
    }

    /// Every node the barrier waits for has applied `version`. The lost cell cannot
    /// acknowledge anything; its lease stands in for it. A node the registry does not know
    /// (after a restart, until it reconnects) is a laggard.
    fn barrier_passed(&self, state: &State, version: usize) -> bool {
        self.nodes()
            .filter(|node| self.reachable(*node) && !self.gone(state, *node))
            .all(|node| {
                if state.known & self.bit(node) == 0 {
                    return self.config.flaws.barrier_over_known_nodes;
                }
                usize::from(state.applied[self.node_index(node)]) >= version
            })
    }

    fn after_fence_barrier(&self) -> Phase {
        match self.config.kind {
            Kind::Failover => Phase::LeaseWait,
            Kind::Planned if self.config.flaws.skip_sync_gate => Phase::Flip,
            Kind::Planned => Phase::SyncGate,
        }
    }

    /// The leader's steps, and the control plane's restarts and leader changes.
    fn orchestrator_actions(&self, state: &State, actions: &mut Vec<Action>) {
        let driver = Driver {
            phase: state.phase,
            round: state.round,
            sync_target: state.sync_target,
        };
        let first = actions.len();
        self.driver_actions(state, driver, actions);
        if state.elections < self.config.leader_changes
            && state.deposed.is_none()
            && !state.phase.is_final()
        {
            // The old leader may be between deciding on a write and sending it.
            let decided: Vec<Write> = actions[first..]
                .iter()
                .filter_map(|action| action.write())
                .collect();
            actions.push(Action::Elect(None));
            actions.extend(decided.into_iter().map(|write| Action::Elect(Some(write))));
        }
        if state.restarts < self.config.restarts && !state.phase.is_final() {
            actions.push(Action::Restart);
        }
        if let Some(deposed) = state.deposed {
            if deposed.pending.is_some() {
                actions.push(Action::DeposedSends);
            }
            if self.config.flaws.skip_acting_window && !deposed.phase.is_final() {
                let driver = Driver {
                    phase: deposed.phase,
                    round: deposed.round,
                    sync_target: deposed.sync_target,
                };
                let mut own = Vec::new();
                self.driver_actions(state, driver, &mut own);
                actions.extend(own.into_iter().filter_map(|action| match action {
                    Action::ReadSourcePosition => Some(Action::DeposedReadsPosition),
                    other => other.write().map(Action::DeposedStep),
                }));
                if self.lost().is_some() {
                    actions.push(Action::DeposedRenews);
                }
            }
        }
    }

    /// What an orchestrator at `driver`'s phase does next, over the store as it is now.
    fn driver_actions(&self, state: &State, driver: Driver, actions: &mut Vec<Action>) {
        let base = 3 * usize::from(driver.round);
        let latest = state.latest();
        let source = Self::source(driver.round);
        let target = source.other();
        let epoch = state.published[base].epoch;
        let flaws = self.config.flaws;
        let abortable = matches!(
            driver.phase,
            Phase::Fence | Phase::FenceBarrier | Phase::SyncGate | Phase::LeaseWait
        );
        match driver.phase {
            Phase::Fence => {
                if latest == base {
                    actions.push(Action::Publish(MapVersion {
                        owner: source,
                        fenced: true,
                        epoch,
                    }));
                } else {
                    actions.push(Action::Advance(Phase::FenceBarrier));
                }
            }
            Phase::FenceBarrier => {
                if flaws.skip_fence_barrier || self.barrier_passed(state, base + 1) {
                    actions.push(Action::Advance(self.after_fence_barrier()));
                }
            }
            Phase::SyncGate => match driver.sync_target {
                None => actions.push(Action::ReadSourcePosition),
                Some(position) => {
                    if state.data[target.index()].len() >= usize::from(position) {
                        actions.push(Action::Advance(Phase::Flip));
                    }
                }
            },
            Phase::LeaseWait => {
                if flaws.skip_lease_wait || state.lease_expired {
                    actions.push(Action::Advance(Phase::Flip));
                }
            }
            Phase::Flip => {
                if latest == base + 1 {
                    actions.push(Action::Publish(MapVersion {
                        owner: target,
                        fenced: true,
                        epoch: epoch + 1,
                    }));
                } else {
                    actions.push(Action::Advance(Phase::FlipBarrier));
                }
            }
            Phase::FlipBarrier => {
                if self.barrier_passed(state, base + 2) {
                    actions.push(Action::Advance(Phase::Unfence));
                }
            }
            Phase::Unfence => {
                if latest == base + 2 {
                    actions.push(Action::Publish(MapVersion {
                        owner: target,
                        fenced: false,
                        epoch: epoch + 1,
                    }));
                } else if driver.round + 1 < self.config.switchovers {
                    actions.push(Action::Advance(Phase::Fence));
                } else {
                    actions.push(Action::Advance(Phase::Completed));
                }
            }
            Phase::Aborting => {
                if latest == base + 1 {
                    actions.push(Action::Publish(MapVersion {
                        owner: source,
                        fenced: false,
                        epoch,
                    }));
                } else {
                    actions.push(Action::Advance(Phase::Aborted));
                }
            }
            Phase::Completed | Phase::Aborted => {}
        }
        if self.config.abort && abortable {
            actions.push(Action::Abort);
        }
    }

    fn lease_held(&self, state: &State, cell: Cell) -> bool {
        !(self.lost() == Some(cell) && state.lease_expired)
    }

    /// The SDK's guard: the cell owns the shard in its view, the shard is not fenced, the
    /// router's epoch is the view's, and (failover) the cell holds its lease.
    fn deliver(&self, state: &mut State, request: Request) {
        let view = self.view(state, Node::Instance(request.cell));
        let epoch_matches = self.config.flaws.skip_epoch_check || request.epoch == view.epoch;
        if view.owner == request.cell
            && !view.fenced
            && epoch_matches
            && self.lease_held(state, request.cell)
        {
            state.admitted.push(request);
        }
    }

    /// The ghost records the view the cell has when it commits: with write permits it is
    /// the view the write was admitted under.
    fn commit(&self, state: &mut State, request: Request) {
        if !self.lease_held(state, request.cell) {
            return;
        }
        let view = self.view(state, Node::Instance(request.cell));
        state.data[request.cell.index()].push(request.write);
        state.accepted.push(Acceptance {
            write: request.write,
            cell: request.cell,
            view_epoch: view.epoch,
            stamp_epoch: request.epoch,
            view_fenced: view.fenced,
        });
    }

    /// A write permit held at this node keeps its next view from taking effect.
    fn permit_held(&self, state: &State, node: Node) -> bool {
        !self.config.flaws.apply_during_write
            && state
                .admitted
                .iter()
                .any(|r| node == Node::Instance(r.cell))
    }

    /// Persists `next` as the phase of the orchestrator at `driver`: the store's phase and
    /// round become its (a blind write, as far as the model goes: only the term is compared).
    fn advance(&self, state: &mut State, driver: &mut Driver, next: Phase) {
        if driver.phase == Phase::Unfence && next == Phase::Fence {
            driver.round += 1;
        }
        if driver.phase == Phase::FlipBarrier && self.config.kind == Kind::Failover {
            // The new owner reported, with its acknowledgement of the flipped version, the
            // position it took over at; everything the lost cell wrote past it is not carried.
            let source = Self::source(driver.round);
            let target = source.other();
            let written = &state.data[source.index()];
            let position = state.promoted_at[target.index()]
                .map_or(state.data[target.index()].len(), usize::from)
                .min(written.len());
            state.reported_lost = Some(written[position..].to_vec());
        }
        driver.phase = next;
        // The target is read again in a new sync gate; outside it, it means nothing.
        driver.sync_target = None;
        state.phase = driver.phase;
        state.round = driver.round;
    }

    /// Applies an orchestrator's write to the store.
    fn write(&self, state: &mut State, driver: &mut Driver, write: Write) {
        match write {
            Write::Publish(version) => state.published.push(version),
            Write::Advance(next) => self.advance(state, driver, next),
            Write::Abort => {
                driver.phase = Phase::Aborting;
                driver.sync_target = None;
                state.phase = Phase::Aborting;
                state.round = driver.round;
            }
        }
    }

    /// The leader's write.
    fn leader_writes(&self, state: &mut State, write: Write) {
        let mut driver = Driver {
            phase: state.phase,
            round: state.round,
            sync_target: state.sync_target,
        };
        self.write(state, &mut driver, write);
        state.sync_target = driver.sync_target;
    }

    /// The deposed leader's write reaches the store. The store compares its term with the
    /// leader key's: refused, and the replica steps down. With `skip_term_compare` it lands;
    /// then, without `skip_acting_window`, the replica finds its window closed before its
    /// next step and stops.
    fn deposed_writes(&self, state: &mut State, write: Write) {
        let Some(mut deposed) = state.deposed else {
            return;
        };
        deposed.pending = None;
        if !self.config.flaws.skip_term_compare {
            state.deposed = None;
            state.refused_deposed_write = true;
            return;
        }
        let mut driver = Driver {
            phase: deposed.phase,
            round: deposed.round,
            sync_target: deposed.sync_target,
        };
        self.write(state, &mut driver, write);
        deposed.phase = driver.phase;
        deposed.round = driver.round;
        deposed.sync_target = driver.sync_target;
        state.deposed = self.config.flaws.skip_acting_window.then_some(deposed);
    }

    /// The model's `always` and `sometimes` properties' names, with whether each is `always`.
    pub fn property_names(&self) -> Vec<(&'static str, bool)> {
        self.properties()
            .iter()
            .map(|p| (p.name, p.expectation == stateright::Expectation::Always))
            .collect()
    }
}

impl Model for Switchover {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            published: vec![MapVersion {
                owner: Cell::A,
                fenced: false,
                epoch: 1,
            }],
            applied: [0; MAX_NODES],
            known: self.all_known(),
            phase: Phase::Fence,
            round: 0,
            sync_target: None,
            restarts: 0,
            term: 1,
            elections: 0,
            deposed: None,
            refused_deposed_write: false,
            lease_expired: false,
            vanished: false,
            sent: 0,
            in_flight: Vec::new(),
            admitted: Vec::new(),
            data: [Vec::new(), Vec::new()],
            promoted_at: [Some(0), None],
            accepted: Vec::new(),
            reported_lost: None,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        // Clients and gateways: a gateway refuses a write fenced in its view, so it sends
        // nothing then.
        if state.sent < self.config.writes {
            for g in 0..self.config.gateways {
                if !self.view(state, Node::Gateway(g)).fenced {
                    actions.push(Action::Send(g));
                }
            }
        }
        for request in &state.in_flight {
            actions.push(Action::Deliver(request.write));
        }
        for request in &state.admitted {
            actions.push(Action::Commit(request.write));
        }
        // Config delivery, one version at a time, to every node the control plane reaches.
        for node in self
            .nodes()
            .filter(|node| self.reachable(*node) && !self.gone(state, *node))
        {
            if usize::from(state.applied[self.node_index(node)]) < state.latest()
                && !self.permit_held(state, node)
            {
                actions.push(Action::Apply(node));
            }
            if state.known & self.bit(node) == 0 {
                actions.push(Action::Reconnect(node));
            }
        }
        // Replication: a cell that does not own the shard in its view applies the owner's
        // change log, one entry at a time; once it owns it, it stops.
        for cell in Cell::ALL {
            let owner = self.view(state, Node::Instance(cell)).owner;
            if owner != cell && state.data[cell.index()].len() < state.data[owner.index()].len() {
                actions.push(Action::Ship(cell));
            }
        }
        if self.lost().is_some() && !state.lease_expired {
            actions.push(Action::LeaseExpires);
        }
        if self.config.vanishing_gateway && !state.vanished {
            actions.push(Action::Vanish);
        }
        self.orchestrator_actions(state, actions);
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Send(g) => {
                let view = self.view(&state, Node::Gateway(g));
                state.in_flight.push(Request {
                    write: state.sent,
                    cell: view.owner,
                    epoch: view.epoch,
                });
                state.sent += 1;
            }
            Action::Deliver(write) => {
                let at = state.in_flight.iter().position(|r| r.write == write)?;
                let request = state.in_flight.remove(at);
                self.deliver(&mut state, request);
            }
            Action::Commit(write) => {
                let at = state.admitted.iter().position(|r| r.write == write)?;
                let request = state.admitted.remove(at);
                self.commit(&mut state, request);
            }
            Action::Apply(node) => {
                let before = self.view(&state, node);
                state.applied[self.node_index(node)] += 1;
                state.known |= self.bit(node);
                if let Node::Instance(cell) = node {
                    let after = self.view(&state, node);
                    if after.owner == cell && before.owner != cell {
                        let position = state.data[cell.index()].len();
                        state.promoted_at[cell.index()] = u8::try_from(position).ok();
                    }
                }
            }
            Action::Reconnect(node) => state.known |= self.bit(node),
            Action::Ship(cell) => {
                let owner = cell.other();
                let position = state.data[cell.index()].len();
                let entry = *state.data[owner.index()].get(position)?;
                state.data[cell.index()].push(entry);
            }
            Action::LeaseExpires => state.lease_expired = true,
            Action::Vanish => state.vanished = true,
            Action::Publish(_) | Action::Advance(_) | Action::Abort => {
                self.leader_writes(&mut state, action.write()?);
            }
            Action::ReadSourcePosition => {
                let source = Self::source(state.round);
                state.sync_target = u8::try_from(state.data[source.index()].len()).ok();
            }
            Action::Restart => {
                state.known = 0;
                state.sync_target = None;
                state.restarts += 1;
            }
            Action::Elect(pending) => {
                state.deposed = Some(Deposed {
                    phase: state.phase,
                    round: state.round,
                    sync_target: state.sync_target,
                    pending,
                });
                state.term += 1;
                state.elections += 1;
                // The new leader reads the phase from the store; what it knows of the nodes
                // it learns again (a node it has not heard from is a laggard), and it reads
                // the sync gate's target itself.
                state.known = 0;
                state.sync_target = None;
            }
            Action::DeposedSends => {
                let write = state.deposed?.pending?;
                self.deposed_writes(&mut state, write);
            }
            Action::DeposedStep(write) => self.deposed_writes(&mut state, write),
            Action::DeposedReadsPosition => {
                let mut deposed = state.deposed?;
                let source = Self::source(deposed.round);
                deposed.sync_target = u8::try_from(state.data[source.index()].len()).ok();
                state.deposed = Some(deposed);
            }
            Action::DeposedRenews => state.lease_expired = false,
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        use property::*;
        let mut properties = vec![
            Property::always(ONE_WRITER_PER_EPOCH, |_, s: &State| {
                s.accepted.iter().all(|a| {
                    s.accepted.iter().all(|b| {
                        a.cell == b.cell
                            || (a.view_epoch != b.view_epoch && a.stamp_epoch != b.stamp_epoch)
                    })
                })
            }),
            Property::always(NO_WRITER_BEHIND_NEWER_EPOCH, |_, s: &State| {
                s.accepted
                    .windows(2)
                    .all(|pair| pair[0].view_epoch <= pair[1].view_epoch)
            }),
            Property::always(NO_WRITE_WHILE_FENCED, |_, s: &State| {
                s.accepted.iter().all(|a| !a.view_fenced)
            }),
            Property::always(NO_WRITE_FROM_ANOTHER_EPOCH, |_, s: &State| {
                s.accepted.iter().all(|a| a.stamp_epoch == a.view_epoch)
            }),
            Property::always(NO_WRITE_APPLIED_TWICE, |_, s: &State| {
                s.data.iter().all(|log| {
                    log.iter()
                        .enumerate()
                        .all(|(i, w)| !log[i + 1..].contains(w))
                })
            }),
        ];
        match self.config.kind {
            Kind::Planned => {
                properties.push(Property::always(
                    NO_ACKNOWLEDGED_WRITE_LOST,
                    |_, s: &State| {
                        if !s.phase.is_final() {
                            return true;
                        }
                        let owner = s.published[s.latest()].owner;
                        let log = &s.data[owner.index()];
                        s.accepted.iter().all(|a| log.contains(&a.write))
                    },
                ));
                properties.push(Property::always(OWNER_HOLDS_EVERY_WRITE, |_, s: &State| {
                    let owner = s.published[s.latest()].owner;
                    let log = &s.data[owner.index()];
                    s.accepted.iter().all(|a| log.contains(&a.write))
                }));
                properties.push(Property::sometimes(
                    COMPLETED_WITH_WRITES_AT_BOTH,
                    |_, s: &State| {
                        s.phase == Phase::Completed
                            && s.accepted.iter().any(|a| a.cell == Cell::A)
                            && s.accepted.iter().any(|a| a.cell == Cell::B)
                    },
                ));
            }
            Kind::Failover => {
                properties.push(Property::always(RPO_REPORT_TRUTHFUL, |_, s: &State| {
                    // From the report on (the flip barrier), and it must exist once completed.
                    let Some(reported) = &s.reported_lost else {
                        return s.phase != Phase::Completed;
                    };
                    let owner = &s.data[Cell::B.index()];
                    let lost = s.accepted.iter().filter(|a| !owner.contains(&a.write));
                    lost.clone().count() == reported.len()
                        && lost.clone().all(|a| reported.contains(&a.write))
                }));
                properties.push(Property::sometimes(
                    COMPLETED_WITH_REPORTED_LOSS,
                    |_, s: &State| {
                        s.phase == Phase::Completed
                            && s.reported_lost.as_ref().is_some_and(|r| !r.is_empty())
                    },
                ));
            }
        }
        if self.config.restarts > 0 {
            properties.push(Property::sometimes(
                COMPLETED_AFTER_RESTART,
                |_, s: &State| s.phase == Phase::Completed && s.restarts > 0,
            ));
        }
        if self.config.leader_changes > 0 {
            properties.push(Property::sometimes(
                COMPLETED_AFTER_LEADER_CHANGE,
                |_, s: &State| s.phase == Phase::Completed && s.refused_deposed_write,
            ));
        }
        if self.config.abort {
            properties.push(Property::sometimes(ABORTED, |_, s: &State| {
                s.phase == Phase::Aborted && !s.accepted.is_empty()
            }));
        }
        properties
    }
}
