//! Atoll's HTTP data path (work in progress: not used by any binary yet).
#![allow(
    dead_code,
    unreachable_pub,
    unused_imports,
    reason = "being built; wired into the gateway next"
)]

mod metrics;
mod upstream;
