//! Atoll's service registry: which instances of which Service run where,
//! for east-west calls (docs/mesh.md, docs/design/east-west.md).
//!
//! - [`keys`]: where an instance lives in the coordination keyspace
//!   (`registry/<workspace>/<service>/<zone>/<instance>`).
//! - [`check`]: what a registrant may register, against the topology
//!   (cells of its zone, Services of its workspace).
//! - [`Hub`]: one replica's index of the registry, fed by one keyspace
//!   watch ([`follow`]), fanned out to subscribers as per-instance deltas
//!   for the services each calls, coalesced per subscriber.
//! - [`client`]: registering with heartbeats ([`client::Registrar`]) and
//!   watching ([`client::Watcher`]), failing over between replicas.
//!
//! It must not hold configuration (that is the audited resource store) nor
//! route: routing is `atoll-routing`'s, fed by what a watcher holds.

pub mod check;
pub mod client;
mod follow;
mod hub;
pub mod keys;

pub use follow::{LOST_AFTER, follow};
pub use hub::{Hub, HubCounts, Pending, Subscription, UPDATE_PART, Update};

pub use atoll_api::registry::{Instance, InstanceKey, Registrant, RegistryUpdate};

/// A new session's TTL when the registrant names none.
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// The shortest session TTL: below it, a heartbeat delayed by one slow
/// scheduler tick would end a healthy session.
pub const MIN_TTL: std::time::Duration = std::time::Duration::from_secs(3);
/// The longest session TTL: a dead instance must not linger for minutes.
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(120);
/// The most instances one registration may carry.
pub const MAX_INSTANCES_PER_CALL: usize = 1_000;

/// The protocols an instance may speak.
pub const PROTOCOLS: &[&str] = &["http", "http2", "grpc", "bolt"];

/// The weight of an instance registered with none.
pub const DEFAULT_WEIGHT: u32 = 100;
