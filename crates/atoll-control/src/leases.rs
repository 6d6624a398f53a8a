//! Ownership leases (ARCHITECTURE.md, "Ownership leases"): an app instance
//! accepts writes for its cell's shards only while it holds a lease it
//! renewed through the control plane. A failover flips a lost cell's shards
//! only once every lease the cell may hold has expired, so a cell cut off
//! from the control plane stops writing by itself before another cell
//! starts: never two writers.
//!
//! Time: the node counts its lease from when it *sent* the request, the
//! control plane from when it *answered*, plus a margin for clock rate
//! differences, so the node's lease always ends first. A lease is granted
//! only to a node that runs the current shard maps. Grants live in memory:
//! a control plane that starts takes every cell as holding a lease granted
//! at its start.

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
    started: Instant,
    /// Cell -> when its latest lease ends (control plane's clock, margin
    /// included).
    until: Mutex<HashMap<String, Instant>>,
    /// Cells that get no lease (a failover is taking their shards).
    revoked: Mutex<HashSet<String>>,
    /// Cell -> when one of its nodes last asked (granted or not): a sign
    /// of life for the emergency plan.
    asked: Mutex<HashMap<String, Instant>>,
}

impl Leases {
    pub(crate) fn new(duration: Duration) -> Self {
        Self {
            duration,
            started: Instant::now(),
            until: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashSet::new()),
            asked: Mutex::new(HashMap::new()),
        }
    }

    /// When a node of `cell` last asked for a lease.
    pub(crate) fn last_asked(&self, cell: &str) -> Option<Instant> {
        self.asked.lock().get(cell).copied()
    }

    /// When this control plane started (nothing was asked before).
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.duration.is_zero()
    }

    /// A node of `cell` running config `applied` asks; `current` is the
    /// version that last changed a shard map.
    pub(crate) fn renew(&self, cell: &str, applied: u64, current: u64) -> Renewal {
        if !self.enabled() {
            return Renewal::Off;
        }
        if cell.is_empty() {
            return Renewal::Refused("only a node of a cell holds a lease; set its cell".into());
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
        let since_start = self.started + self.duration + margin(self.duration);
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
            leases.renew("rz01", 7, 7),
            Renewal::Granted(Duration::from_secs(3))
        );
        assert!(
            matches!(leases.renew("rz01", 6, 7), Renewal::Refused(r) if r.contains("apply it first"))
        );
        assert!(matches!(leases.renew("", 7, 7), Renewal::Refused(_)));
        leases.revoke("rz01");
        assert!(
            matches!(leases.renew("rz01", 7, 7), Renewal::Refused(r) if r.contains("failed over"))
        );
        leases.restore("rz01");
        assert!(matches!(leases.renew("rz01", 7, 7), Renewal::Granted(_)));
        assert_eq!(
            Leases::new(Duration::ZERO).renew("rz01", 0, 7),
            Renewal::Off
        );
    }

    #[test]
    fn the_control_plane_outwaits_the_node() {
        let duration = Duration::from_secs(3);
        let leases = Leases::new(duration);
        let asked = Instant::now();
        assert!(matches!(leases.renew("rz01", 1, 1), Renewal::Granted(_)));
        // The node's lease ends at `asked + duration` at the latest.
        assert!(leases.expires_at("rz01") >= asked + duration + margin(duration));
        // A cell never seen still waits out leases of a previous control plane.
        assert!(leases.expires_at("rz09") >= leases.started + duration);
    }
}
