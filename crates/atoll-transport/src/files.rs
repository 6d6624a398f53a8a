//! TLS material kept in files (a CA bundle, a certificate chain and its
//! key), read at start and read again whenever one of them changes, so a
//! renewed certificate or a new CA bundle is used without a restart.
//! Connections already open keep what they were made with.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::tls::{ClientTls, Identity, ServerTls, TlsError, Trust};

/// How often the files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The files of one process's TLS material.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA bundle (PEM) peers' certificates chain to.
    pub ca: Option<PathBuf>,
    /// This process's certificate chain (PEM, leaf first).
    pub cert: Option<PathBuf>,
    /// The key of `cert` (PEM).
    pub key: Option<PathBuf>,
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl TlsFiles {
    /// The certificate and key, if both are given.
    pub fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Identity::from_files(cert, key).map(Some),
            (None, None) => Ok(None),
            _ => Err(TlsError(
                "a certificate and its key go together: give both, or neither".into(),
            )),
        }
    }

    /// The CA bundle, if given.
    pub fn trust(&self) -> Result<Option<Trust>, TlsError> {
        self.ca.as_deref().map(Trust::from_file).transpose()
    }

    /// The client side: none without a CA bundle (plain HTTP).
    pub fn client(&self) -> Result<Option<ClientTls>, TlsError> {
        let identity = self.identity()?;
        let Some(trust) = self.trust()? else {
            if identity.is_some() {
                return Err(TlsError(
                    "a certificate needs the CA bundle the control plane's certificate chains to as well".into(),
                ));
            }
            return Ok(None);
        };
        ClientTls::new(&trust, identity.as_ref()).map(Some)
    }

    /// Reads the files again whenever one changes and swaps what they hold
    /// into `client` and `server`, on a task of the current runtime. A file
    /// that does not read (half written) is tried again at the next check.
    pub fn follow(&self, client: Option<ClientTls>, server: Option<ServerTls>) {
        if client.is_none() && server.is_none() {
            return;
        }
        let files = self.clone();
        tokio::spawn(async move {
            let paths: Vec<PathBuf> = [&files.cert, &files.key, &files.ca]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let mut seen: Vec<Option<SystemTime>> = paths.iter().map(modified).collect();
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let now: Vec<Option<SystemTime>> = paths.iter().map(modified).collect();
                if now == seen {
                    continue;
                }
                let identity = match files.identity() {
                    Ok(identity) => identity,
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the new certificate yet; keeping the current one");
                        continue;
                    }
                };
                let trust = match files.trust() {
                    Ok(trust) => trust,
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the new CA bundle yet; keeping the current one");
                        continue;
                    }
                };
                if let Some(identity) = &identity {
                    if let Some(client) = &client {
                        client.set_identity(identity);
                    }
                    if let Some(server) = &server {
                        server.set_identity(identity);
                    }
                    if let Some(cert) = &files.cert {
                        tracing::info!(certificate = %cert.display(), "using the renewed certificate for new connections");
                    }
                }
                if let Some(trust) = &trust {
                    if let Some(client) = &client
                        && let Err(error) = client.set_trust(trust)
                    {
                        tracing::warn!(%error, "cannot use the new CA bundle");
                    }
                    if let Some(server) = &server
                        && let Err(error) = server.set_client_trust(trust)
                    {
                        tracing::warn!(%error, "cannot use the new CA bundle");
                    }
                }
                seen = now;
            }
        });
    }
}
