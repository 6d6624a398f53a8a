//! `--ca`, `--cert`, `--key`: the TLS material of this process, for every
//! command. A client trusts servers that chain to `--ca` and presents
//! `--cert` when asked; `atoll control` serves with `--cert` and verifies
//! client certificates against `--ca`. The certificate and key files are
//! read again when they change, so a renewed certificate is used without a
//! restart (connections already open keep theirs).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use atoll_transport::{ClientTls, Identity, ServerTls, Transport, Trust};
use clap::Args;

use crate::client::{CliError, exit};

/// How often the files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Default, Args)]
pub(crate) struct TlsArgs {
    /// The CA bundle (PEM) the control plane's certificate chains to:
    /// needed for https:// URLs (for `atoll control`: the roots client
    /// certificates must chain to).
    #[arg(long, global = true, env = "ATOLL_CA", value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// This process's certificate chain (PEM, leaf first), presented to the
    /// control plane (for `atoll control`: its serving certificate).
    #[arg(long, global = true, env = "ATOLL_CERT", value_name = "FILE")]
    pub(crate) cert: Option<PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, global = true, env = "ATOLL_KEY", value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::new(exit::USAGE, message)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl TlsArgs {
    fn identity(&self) -> Result<Option<(Identity, PathBuf, PathBuf)>, CliError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((
                Identity::from_files(cert, key).map_err(|e| usage(e.to_string()))?,
                cert.clone(),
                key.clone(),
            ))),
            (None, None) => Ok(None),
            _ => Err(usage("--cert and --key go together: give both, or neither")),
        }
    }

    fn trust(&self) -> Result<Option<Trust>, CliError> {
        self.ca
            .as_deref()
            .map(|ca| Trust::from_file(ca).map_err(|e| usage(e.to_string())))
            .transpose()
    }

    /// The client side: plain without `--ca`.
    pub(crate) fn transport(&self) -> Result<Transport, CliError> {
        let identity = self.identity()?;
        let Some(trust) = self.trust()? else {
            if identity.is_some() {
                return Err(usage(
                    "--cert needs --ca: the CA bundle the control plane's certificate chains to",
                ));
            }
            return Ok(Transport::plain());
        };
        let tls = ClientTls::new(&trust, identity.as_ref().map(|(i, _, _)| i))
            .map_err(|e| usage(e.to_string()))?;
        Ok(Transport::with_tls(tls))
    }

    /// The server side of `atoll control`: none without `--cert`.
    pub(crate) fn server(&self) -> Result<Option<ServerTls>, CliError> {
        let Some((identity, _, _)) = self.identity()? else {
            return Ok(None);
        };
        let trust = self.trust()?.ok_or_else(|| {
            usage("serving TLS needs --ca as well: the roots client certificates must chain to (and that other replicas' certificates chain to)")
        })?;
        ServerTls::new(&identity, Some(&trust))
            .map(Some)
            .map_err(|e| usage(e.to_string()))
    }

    /// Reads the certificate, key and CA again whenever one of the files
    /// changes, and swaps them into `client` and `server`. A file that does
    /// not read (half written) is tried again at the next check.
    pub(crate) fn follow(&self, client: Option<ClientTls>, server: Option<ServerTls>) {
        if client.is_none() && server.is_none() {
            return;
        }
        let args = self.clone();
        tokio::spawn(async move {
            let files: Vec<PathBuf> = [&args.cert, &args.key, &args.ca]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let mut seen: Vec<Option<SystemTime>> = files.iter().map(|f| modified(f)).collect();
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let now: Vec<Option<SystemTime>> = files.iter().map(|f| modified(f)).collect();
                if now == seen {
                    continue;
                }
                let identity = match args.identity() {
                    Ok(identity) => identity,
                    Err(error) => {
                        tracing::warn!(error = %error.message, "cannot read the new certificate yet; keeping the current one");
                        continue;
                    }
                };
                let trust = match args.trust() {
                    Ok(trust) => trust,
                    Err(error) => {
                        tracing::warn!(error = %error.message, "cannot read the new CA bundle yet; keeping the current one");
                        continue;
                    }
                };
                if let Some((identity, cert, _)) = &identity {
                    if let Some(client) = &client {
                        client.set_identity(identity);
                    }
                    if let Some(server) = &server {
                        server.set_identity(identity);
                    }
                    tracing::info!(certificate = %cert.display(), "using the renewed certificate for new connections");
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
