//! `--ca`, `--cert`, `--key`: the TLS material of this process, for every
//! command. A client trusts servers that chain to `--ca` and presents
//! `--cert` when asked; `atoll control` serves with `--cert` and verifies
//! client certificates against `--ca`. The certificate and key files are
//! read again when they change (`atoll_transport::TlsFiles`), so a renewed
//! certificate is used without a restart (connections already open keep
//! theirs).

use std::path::PathBuf;

use atoll_transport::{ClientTls, Identity, ServerTls, Transport, Trust};
use clap::Args;

use crate::client::{CliError, exit};

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

    /// A gateway's peer listener: its node certificate, client
    /// certificates of `--ca` required. None without `--cert`.
    pub(crate) fn peer_server(&self) -> Result<Option<ServerTls>, CliError> {
        let Some((identity, _, _)) = self.identity()? else {
            return Ok(None);
        };
        let Some(trust) = self.trust()? else {
            return Ok(None);
        };
        ServerTls::mutual(&identity, &trust)
            .map(Some)
            .map_err(|e| usage(e.to_string()))
    }

    /// The files, for what follows them.
    pub(crate) fn files(&self) -> atoll_transport::TlsFiles {
        atoll_transport::TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// Reads the certificate, key and CA again whenever one of the files
    /// changes, and swaps them into `client` and `server`.
    pub(crate) fn follow(&self, client: Option<ClientTls>, server: Option<ServerTls>) {
        self.files().follow(client, server);
    }
}
