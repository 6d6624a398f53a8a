//! Finding the control plane without flags.
//!
//! `atoll control` writes [`Discovery`] as JSON to `control.json` in its state
//! directory (by default `$XDG_STATE_HOME/atoll`, i.e. `~/.local/state/atoll`)
//! once it listens, and removes it on a clean stop. `atoll up` writes a
//! [`SandboxEntry`] to `sandboxes/<pid>.json` there once its sandbox is
//! ready, and removes it when it stops. Other commands read both when neither
//! `--control` nor `$ATOLL_CONTROL` is given, and refuse to guess when more
//! than one control plane is running.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The environment variable that names the control plane's URL.
pub const CONTROL_ENV: &str = "ATOLL_CONTROL";

/// The environment variable that overrides the state directory.
pub const STATE_DIR_ENV: &str = "ATOLL_STATE_DIR";

/// The default address of `atoll control`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";

/// What a running control plane tells other commands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Discovery {
    /// Base URL of the REST API and the config stream, e.g. `http://127.0.0.1:7400`.
    pub url: String,
    /// The server's process id.
    pub pid: u32,
    /// Its store, e.g. `embedded:/home/me/.local/state/atoll/control` or `etcd:http://...`.
    pub store: String,
}

/// The file name inside the state directory.
pub const DISCOVERY_FILE: &str = "control.json";

/// The discovery file inside `state_dir`.
pub fn discovery_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DISCOVERY_FILE)
}

/// What a running `atoll up` tells other commands (`sandboxes/<pid>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxEntry {
    /// The `atoll up` process.
    pub pid: u32,
    /// Base URL of the sandbox's control plane.
    pub control: String,
    /// The sandbox's state directory (its `up.json`, logs, drill files).
    pub state_dir: String,
    /// The CA bundle its control plane's certificate chains to (none: it
    /// runs `--insecure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// The file of its admin token, used by commands given no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

/// The folder of sandbox entries inside `state_dir`.
pub fn sandboxes_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sandboxes")
}
