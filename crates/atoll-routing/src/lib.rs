//! Atoll's routing: resources compiled into an immutable [`RoutingTable`] for
//! one data-plane node, and the per-request decision (route → service → cell
//! → endpoint, or a refusal: no route, missing or invalid key, fenced shard,
//! no endpoint, misroute loop).
//!
//! It does no I/O: the gateway (and later the sidecar and the SDK) own
//! sockets, health and pools, and pass their view of endpoint health in
//! through [`Health`]. The common path (a header key, a flat shard → cell
//! array, round robin) does not allocate. `docs/design/gateway.md` explains
//! the rules.

mod call;
mod decide;
mod matcher;
mod path;
mod table;

pub use call::Call;
pub use decide::{AllAvailable, Decision, HeaderSource, Health, Refusal, RequestInfo, Target, Via};
pub use matcher::host_without_port;
pub use path::{PathError, normalize_path};
pub use table::{Cell, Endpoint, Peer, Route, RoutingTable, Scope, Service, Zone};

/// Index of a cell in a table.
pub type CellId = u16;
/// Index of an upstream (service endpoint or gateway) in a table.
pub type EndpointId = u32;
/// Index of a service in a table.
pub type ServiceId = u32;
/// Index of a route in a table.
pub type RouteId = u32;

#[cfg(test)]
mod tests;
