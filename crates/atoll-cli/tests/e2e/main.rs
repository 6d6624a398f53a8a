//! End-to-end tests through the real `atoll` binary: a control plane on a free
//! loopback port, driven by the CLI and by a config-stream client.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests fail loudly"
)]
#![allow(unreachable_pub, reason = "test modules")]

mod access;
mod agent;
mod approvals;
mod bolt;
mod cli;
mod data_path;
mod gateway;
mod harness;
mod manifests;
mod registry;
mod regressions;
mod replicas;
mod restart;
mod sidecar;
mod stream;
mod switchover;
mod tls;
mod transparent;
mod up;
mod upgrade;
mod workspaces;
