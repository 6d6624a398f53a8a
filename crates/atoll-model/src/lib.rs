//! Atoll's domain model: the resources of `apiVersion: atoll/v1` (regions,
//! zones, cells, shard rules and maps, services, routes, gateways), reading
//! them from YAML manifests with positions, validating a whole set of them,
//! and the pure functions that turn a routing key into a shard.
//!
//! This crate does no I/O: it takes text and values and returns values, so the
//! control plane, the data plane and the tests all share one definition of
//! what is valid and where a user's request belongs. File reading, storage and
//! networking live in the crates that depend on it.
//!
//! The manifest contract is documented in `docs/manifests.md`, the key rules in
//! `docs/sharding.md`.

mod codec;
mod epoch;
mod issue;
pub mod key;
pub mod limits;
mod manifest;
pub mod names;
mod render;
mod resource;
mod shards;
mod validate;

pub use codec::{DecodeError, decode_resource};
pub use epoch::assign_epoch;
pub use issue::{Issue, Issues, Origin, Position, SpanIndex};
pub use manifest::{
    Document, Loaded, Located, MAX_ALIAS_NODES, MAX_DEPTH, MAX_NODES, ParseBudget, decode_document,
    load, load_all, load_all_within, parse_documents,
};
pub use render::{diff, resource_yaml, to_yaml};
pub use resource::*;
pub use shards::{ShardRange, ShardRangeError, ShardSet};
pub use validate::{MAX_RETRIES, MAX_SHARDS, validate, validate_with_pending};
