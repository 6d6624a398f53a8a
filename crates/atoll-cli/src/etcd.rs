//! The sandbox's etcd cluster (`atoll up --control-replicas N`): N members
//! of Debian's etcd-server on loopback ports from the port base.

use std::path::{Path, PathBuf};

use crate::client::CliError;
use crate::client::exit;

/// The etcd program: `$ATOLL_ETCD_BIN`, else `etcd` on the PATH, else
/// `/usr/bin/etcd`.
pub(crate) fn binary() -> Result<PathBuf, CliError> {
    if let Some(path) = std::env::var_os("ATOLL_ETCD_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("etcd");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let fallback = PathBuf::from("/usr/bin/etcd");
    if fallback.is_file() {
        return Ok(fallback);
    }
    let mut error = CliError::new(
        exit::FAILURE,
        "--control-replicas needs etcd, and it is not installed",
    );
    error.details.push(
        "install Debian's etcd-server (apt-get install etcd-server; the README's test command does), or set ATOLL_ETCD_BIN"
            .into(),
    );
    Err(error)
}

/// One member's command line.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) client_url: String,
    pub(crate) args: Vec<String>,
    pub(crate) log: PathBuf,
}

/// The members of a new cluster on `host`, one per (client, peer) port.
pub(crate) fn members(
    host: &str,
    clients: &[u16],
    peers: &[u16],
    state_dir: &Path,
    logs: &Path,
) -> Vec<Member> {
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| format!("etcd-{}=http://{host}:{peer}", i + 1))
        .collect();
    let token = format!("atoll-up-{}", std::process::id());
    clients
        .iter()
        .zip(peers)
        .enumerate()
        .map(|(i, (client, peer))| {
            let name = format!("etcd-{}", i + 1);
            let client_url = format!("http://{host}:{client}");
            let peer_url = format!("http://{host}:{peer}");
            let args = vec![
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                state_dir.join("etcd").join(&name).display().to_string(),
                "--listen-client-urls".into(),
                client_url.clone(),
                "--advertise-client-urls".into(),
                client_url.clone(),
                "--listen-peer-urls".into(),
                peer_url.clone(),
                "--initial-advertise-peer-urls".into(),
                peer_url,
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                token.clone(),
                // No metrics or pprof listeners beyond the client port.
                "--log-level".into(),
                "warn".into(),
            ];
            Member {
                log: logs.join(format!("{name}.log")),
                name,
                client_url,
                args,
            }
        })
        .collect()
}
