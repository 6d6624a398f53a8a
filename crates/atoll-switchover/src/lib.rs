//! The switchover state machine (docs/architecture.md, "The switchover
//! protocol"; docs/switchover.md).
//!
//! A switchover is a `Switchover` resource; every phase change is a commit,
//! and the commits that change the shard map (fence, flip, unfence, abort)
//! change the Switchover in the same commit, so the stored phase always says
//! what the map holds. Whoever leads finds the unfinished ones and drives
//! them on from their phase:
//!
//! ```text
//! Pending -> Fence -> FenceBarrier -> SyncGate -> Flip -> FlipBarrier -> Unfence -> Completed
//!               \___________\____________\___ (abort, timeout) ___> Aborted
//! ```
//!
//! A failover waits for approval (unless automatic) and, instead of the
//! sync gate, for the lost cell's leases to run out (LeaseExpiry).
//!
//! - [`machine`]: one step as a pure function (phase + observations ->
//!   effects); every decision of the protocol is there.
//! - [`driver`]: the loop that loads, observes, steps and acts.
//! - [`ports`]: the store, fleet, probes, leases and clock it acts through.
//! - [`shards`]: the shard-map edits (fence, flip, unfence a range).

pub mod driver;
pub mod machine;
pub mod ports;
pub mod shards;

pub use driver::Driver;
pub use machine::{Effect, Loaded, Need, Observation, ProbeProblem, Save};
pub use ports::{Clock, Fleet, Leases, Probes, Record, RecordError, SystemClock};
