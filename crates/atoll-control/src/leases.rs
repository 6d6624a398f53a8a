//! Ownership leases (docs/architecture.md, "The switchover protocol"): an app instance
//! accepts writes for its cell's shards only while it holds a lease it
//! renewed through the control plane. A failover flips a lost cell's shards
//! only once every lease the cell may hold has expired, so a cell cut off
//! from the control plane stops writing by itself before another cell
//! starts: never two writers.
//!
//! Time: the node counts its lease from when it *sent* the request, the
//! control plane from when it *answered*, plus a margin for clock rate
//! differences, so the node's lease always ends first. A lease is granted
//! only to a node that runs the current shard maps, and only by a leader
//! inside its acting window. Grants live in the leader's memory, one
//! [`Leases`] per term: a new leader takes every cell as holding a lease
//! granted at the start of its term, of the longest duration any leader
//! used. Every grant of an earlier term was made inside that leader's acting
//! window, which closed before this term began, so none outlives the bound
//! (docs/design/replicated-control-plane.md).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Margin added to a lease on the control plane's side.
pub(crate) fn margin(duration: Duration) -> Duration {
    (duration / 4).max(Duration::from_millis(250))
}

/// What `renew` decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Renewal {
    Granted(Duration),
    /// Leases are off.
    Off,
    Refused(String),
}

#[derive(Debug)]
pub(crate) struct Leases {
    /// Zero: leases are off.
    duration: Duration,
    /// The longest duration a leader of an earlier term may have granted.
    longest: Duration,
    /// When this term began: nothing before it was granted by this term.
    started: Instant,
    /// Cell -> when its latest lease ends (control plane's clock, margin
    /// included).
    until: Mutex<HashMap<String, Instant>>,
    /// Cells that get no lease (a failover is taking their shards).
    revoked: Mutex<HashSet<String>>,
    /// Cell -> when one of its nodes last asked (granted or not): a sign
    /// of life for the emergency plan.
    asked: Mutex<HashMap<String, Instant>>,
    /// Node -> when the latest lease (or "leases are off" answer) it got
    /// from this process stops letting it write, margin included.
    nodes: Mutex<HashMap<String, Instant>>,
}

impl Leases {
    #[cfg(test)]
    pub(crate) fn new(duration: Duration) -> Self {
        Self::for_term(duration, duration, Instant::now())
    }

    /// The leases of a term that began at `started`, after terms that may
    /// have granted leases of up to `longest`.
    pub(crate) fn for_term(duration: Duration, longest: Duration, started: Instant) -> Self {
        Self {
            duration,
            longest: longest.max(duration),
            started,
            until: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashSet::new()),
            asked: Mutex::new(HashMap::new()),
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// Leases of a control plane that started `ago` (for tests).
    #[cfg(test)]
    pub(crate) fn new_started_before(duration: Duration, ago: Duration) -> Self {
        Self {
            started: Instant::now() - ago,
            ..Self::new(duration)
        }
    }

    /// How long after an answer a node may go on writing on its strength:
    /// the lease (with its margin), or how long an instance believes
    /// "leases are off" (`LEASES_OFF_TRUST`, with a margin too).
    pub(crate) fn reach(&self) -> Duration {
        if self.enabled() {
            self.duration + margin(self.duration)
        } else {
            atoll_api::LEASES_OFF_TRUST + margin(atoll_api::LEASES_OFF_TRUST)
        }
    }

    /// Notes an answer that lets `node` write for a while. Entries whose
    /// time has passed mean nothing any more and are pruned, so the map
    /// holds only the nodes answered within the last reach.
    fn answered(&self, node: &str) {
        let now = Instant::now();
        let until = now + self.reach();
        let mut nodes = self.nodes.lock();
        if nodes.len() >= 4096 {
            nodes.retain(|_, until| *until > now);
        }
        let entry = nodes.entry(node.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// When node `node` can no longer be writing on the strength of any
    /// answer a control plane gave it: its latest lease (or "leases are
    /// off") from this process has run out, and so has anything a previous
    /// process may have granted before this one started, whether it ran
    /// with leases (of this process's duration) or without (believed for
    /// `LEASES_OFF_TRUST`). A previous process with a longer lease duration
    /// than this one is not accounted for (docs/switchover.md).
    pub(crate) fn node_released_at(&self, node: &str) -> Instant {
        let off = atoll_api::LEASES_OFF_TRUST + margin(atoll_api::LEASES_OFF_TRUST);
        let longest = self.longest + margin(self.longest);
        let since_start = self.started + self.reach().max(off).max(longest);
        self.nodes
            .lock()
            .get(node)
            .copied()
            .map_or(since_start, |until| until.max(since_start))
    }

    /// When a node of `cell` last asked for a lease.
    pub(crate) fn last_asked(&self, cell: &str) -> Option<Instant> {
        self.asked.lock().get(cell).copied()
    }

    /// When this term began (nothing was asked before).
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.duration.is_zero()
    }

    /// Node `node` of `cell` running config `applied` asks; `current` is
    /// the version that last changed a shard map. With leases off, the
    /// answer "off" also goes only to a node that runs the current maps: it
    /// lets the node write for [`atoll_api::LEASES_OFF_TRUST`].
    pub(crate) fn renew(&self, node: &str, cell: &str, applied: u64, current: u64) -> Renewal {
        if cell.is_empty() {
            return Renewal::Refused("only a node of a cell holds a lease; set its cell".into());
        }
        if !self.enabled() {
            if applied < current {
                return Renewal::Refused(format!(
                    "this node runs config version {applied}, the shard maps changed at {current}: apply it first"
                ));
            }
            self.answered(node);
            return Renewal::Off;
        }
        self.asked.lock().insert(cell.to_owned(), Instant::now());
        if self.revoked.lock().contains(cell) {
            return Renewal::Refused(format!(
                "cell {cell} is being failed over: its shards move to their standbys"
            ));
        }
        if applied < current {
            return Renewal::Refused(format!(
                "this node runs config version {applied}, the shard maps changed at {current}: apply it first"
            ));
        }
        let until = Instant::now() + self.duration + margin(self.duration);
        let mut leases = self.until.lock();
        let entry = leases.entry(cell.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
        drop(leases);
        self.answered(node);
        Renewal::Granted(self.duration)
    }

    /// No more leases for `cell` until `restore`.
    pub(crate) fn revoke(&self, cell: &str) {
        self.revoked.lock().insert(cell.to_owned());
    }

    pub(crate) fn restore(&self, cell: &str) {
        self.revoked.lock().remove(cell);
    }

    /// When every lease `cell` may hold has ended (including leases a
    /// previous control plane granted before this one started).
    pub(crate) fn expires_at(&self, cell: &str) -> Instant {
        let since_start = self.started + self.longest + margin(self.longest);
        self.until
            .lock()
            .get(cell)
            .copied()
            .map_or(since_start, |until| until.max(since_start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_goes_only_to_a_current_node_of_a_cell_not_revoked() {
        let leases = Leases::new(Duration::from_secs(3));
        assert_eq!(
            leases.renew("n", "rz01", 7, 7),
            Renewal::Granted(Duration::from_secs(3))
        );
        assert!(
            matches!(leases.renew("n", "rz01", 6, 7), Renewal::Refused(r) if r.contains("apply it first"))
        );
        assert!(matches!(leases.renew("n", "", 7, 7), Renewal::Refused(_)));
        leases.revoke("rz01");
        assert!(
            matches!(leases.renew("n", "rz01", 7, 7), Renewal::Refused(r) if r.contains("failed over"))
        );
        leases.restore("rz01");
        assert!(matches!(
            leases.renew("n", "rz01", 7, 7),
            Renewal::Granted(_)
        ));
        assert_eq!(
            Leases::new(Duration::ZERO).renew("n", "rz01", 7, 7),
            Renewal::Off
        );
    }

    #[test]
    fn the_control_plane_outwaits_the_node() {
        let duration = Duration::from_secs(3);
        let leases = Leases::new(duration);
        let asked = Instant::now();
        assert!(matches!(
            leases.renew("n", "rz01", 1, 1),
            Renewal::Granted(_)
        ));
        // The node's lease ends at `asked + duration` at the latest.
        assert!(leases.expires_at("rz01") >= asked + duration + margin(duration));
        // A cell never seen still waits out leases of a previous control plane.
        assert!(leases.expires_at("rz09") >= leases.started + duration);
    }

    #[test]
    fn a_node_is_released_once_its_own_lease_has_run_out() {
        let duration = Duration::from_millis(40);
        let leases = Leases::new(duration);
        // Never answered: only what a previous process may have granted,
        // with leases or without.
        let unknown = leases.node_released_at("gw-1");
        let off = atoll_api::LEASES_OFF_TRUST + margin(atoll_api::LEASES_OFF_TRUST);
        assert_eq!(unknown, leases.started + off);
        // A control plane that started long ago: what it granted is exact.
        let leases = Leases {
            started: Instant::now() - Duration::from_secs(60),
            ..Leases::new(duration)
        };
        assert!(
            leases.node_released_at("gw-1") < Instant::now(),
            "never answered: released"
        );
        let asked = Instant::now();
        assert!(matches!(
            leases.renew("bank-0", "rz01", 1, 1),
            Renewal::Granted(_)
        ));
        let released = leases.node_released_at("bank-0");
        assert!(released >= asked + duration + margin(duration));
        assert!(released <= Instant::now() + duration + margin(duration));
        // A refused renewal extends nothing.
        let before = leases.node_released_at("bank-0");
        assert!(matches!(
            leases.renew("bank-0", "rz01", 0, 1),
            Renewal::Refused(_)
        ));
        assert_eq!(leases.node_released_at("bank-0"), before);
        // "Leases are off" lets an instance write for LEASES_OFF_TRUST, and
        // goes only to a node that runs the current maps.
        let off = Leases::new(Duration::ZERO);
        assert_eq!(off.renew("bank-0", "rz01", 7, 7), Renewal::Off);
        assert!(off.node_released_at("bank-0") >= asked + atoll_api::LEASES_OFF_TRUST);
        assert!(
            matches!(off.renew("bank-1", "rz01", 6, 7), Renewal::Refused(r) if r.contains("apply it first"))
        );
    }
}
