//! `atoll join` and `atoll renew`: a node's certificate from the control
//! plane, for a key made here that never leaves this machine.

use std::path::{Path, PathBuf};

use atoll_api::rest::{IssuedCertificate, JoinRequest, RenewRequest};
use atoll_identity::{AtollId, Role};
use clap::Args;

use crate::client::{CliError, Client, exit};

#[derive(Debug, Args)]
pub(crate) struct JoinArgs {
    /// The bootstrap token (`atoll token create --role R --zone Z`); it
    /// decides the workspace, role and zone [default: the first line of
    /// stdin].
    #[arg(
        long = "bootstrap-token",
        value_name = "TOKEN",
        env = "ATOLL_BOOTSTRAP_TOKEN",
        hide_env_values = true
    )]
    bootstrap_token: Option<String>,
    /// This node's name (a gateway: its Gateway resource's name).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// For a control-plane replica: a host name or address it serves at
    /// (repeat for several).
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// Write OUT.key (0600), OUT.pem (the certificate then the
    /// intermediate) and OUT-ca.pem (the root to trust).
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct RenewArgs {
    /// Where to write the new OUT.key and OUT.pem [default: over --key
    /// and --cert].
    #[arg(long, value_name = "OUT")]
    out: Option<PathBuf>,
    /// For a control-plane replica: a host name or address it serves at.
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
}

fn failed(message: impl Into<String>) -> CliError {
    CliError::new(exit::FAILURE, message)
}

/// A key and a request for it. The request's subject is not used by the
/// control plane (only the public key is), so a placeholder names it.
pub(crate) fn key_and_csr(name: &str) -> Result<(String, String), CliError> {
    let placeholder = AtollId::new("default", Role::Sdk, atoll_identity::NO_ZONE, name)
        .map_err(|e| CliError::new(exit::USAGE, format!("--name: {e}")))?;
    atoll_identity::key_and_request(&placeholder).map_err(|e| failed(e.to_string()))
}

/// Writes a file by a rename, so that a process reading it (every node
/// rereads its certificate every second) never sees half of it.
fn replace(path: &Path, text: &str, private: bool) -> Result<(), CliError> {
    let temporary = path.with_extension("new");
    if private {
        crate::ca::write_private(&temporary, text)?;
    } else {
        std::fs::write(&temporary, text)
            .map_err(|e| failed(format!("cannot write {}: {e}", temporary.display())))?;
    }
    std::fs::rename(&temporary, path)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
}

pub(crate) fn write_issued(
    key: &Path,
    certificate: &Path,
    trust: Option<&Path>,
    key_pem: &str,
    issued: &IssuedCertificate,
) -> Result<(), CliError> {
    if let Some(parent) = key.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| failed(format!("cannot make {}: {e}", parent.display())))?;
    }
    // The key first: a crash between leaves a new key beside the old
    // certificate, refused at once, rather than a certificate without its key.
    replace(key, key_pem, true)?;
    replace(certificate, &issued.chain, false)?;
    if let Some(trust) = trust {
        replace(trust, &issued.trust, false)?;
    }
    Ok(())
}

pub(crate) async fn join(client: &Client, args: JoinArgs) -> Result<u8, CliError> {
    let token = match args.bootstrap_token {
        Some(token) => token,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| failed(format!("cannot read the token from stdin: {e}")))?;
            line
        }
    };
    let (key_pem, csr) = key_and_csr(&args.name)?;
    let issued: IssuedCertificate = client
        .post(
            "/v1/join",
            &JoinRequest {
                token: token.trim().to_owned(),
                name: args.name,
                csr,
                hosts: args.hosts,
            },
        )
        .await?;
    let key = args.out.with_extension("key");
    let certificate = args.out.with_extension("pem");
    let trust = PathBuf::from(format!("{}-ca.pem", args.out.display()));
    write_issued(&key, &certificate, Some(&trust), &key_pem, &issued)?;
    println!(
        "joined as {}, valid until {}: {} and {} (trust {})",
        issued.identity,
        issued.expires,
        certificate.display(),
        key.display(),
        trust.display()
    );
    Ok(0)
}

pub(crate) async fn renew(
    client: &Client,
    tls: &crate::tls::TlsArgs,
    args: RenewArgs,
) -> Result<u8, CliError> {
    let (Some(current_cert), Some(current_key)) = (&tls.cert, &tls.key) else {
        return Err(CliError::new(
            exit::USAGE,
            "renewing needs the current certificate: --cert FILE --key FILE",
        ));
    };
    let (key_pem, csr) = key_and_csr("renewal")?;
    let issued: IssuedCertificate = client
        .post(
            "/v1/renew",
            &RenewRequest {
                csr,
                hosts: args.hosts,
            },
        )
        .await?;
    let (key, certificate) = match &args.out {
        Some(out) => (out.with_extension("key"), out.with_extension("pem")),
        None => (current_key.clone(), current_cert.clone()),
    };
    write_issued(&key, &certificate, None, &key_pem, &issued)?;
    println!(
        "renewed {}, valid until {}: {}",
        issued.identity,
        issued.expires,
        certificate.display()
    );
    Ok(0)
}

/// When a certificate of this life is renewed: with a third of it left.
fn renew_at(issued: time::OffsetDateTime, expires: time::OffsetDateTime) -> time::OffsetDateTime {
    expires - (expires - issued) / 3
}

/// The fingerprint of the intermediate the control plane issues with now,
/// when it is not the one that signed `chain` (`atoll ca rotate`). None
/// when they are the same, or the control plane cannot say (it issues no
/// certificates, or cannot be reached: the next look will tell).
async fn rotated(client: &Client, chain: &str) -> Option<String> {
    let ours = atoll_identity::intermediate_of_chain(chain)?;
    client
        .rest()
        .issuing_intermediate()
        .await
        .filter(|current| *current != ours)
}

/// Renews the certificate of `--cert`/`--key` by itself, with a third of
/// its life left, over the connection that certificate opens; the files are
/// replaced by renames and the transport picks them up (`TlsArgs::follow`),
/// so nothing restarts and open connections stay. A failure is retried
/// every tenth of what is left, at least every 5 s, and logged.
pub(crate) fn renew_in_background(client: Client, cert: PathBuf, key: PathBuf) {
    tokio::spawn(async move {
        // The intermediate a rotation renewal was for: if the certificate
        // that came back is still of another (the replica that issued has
        // not got the new one yet), wait before asking again.
        let mut renewed_for: Option<String> = None;
        loop {
            let pem = match std::fs::read_to_string(&cert) {
                Ok(pem) => pem,
                Err(error) => {
                    tracing::warn!(path = %cert.display(), %error, "cannot read the certificate to renew it");
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    continue;
                }
            };
            let (issued, expires) = match atoll_identity::validity_of_pem(&pem) {
                Ok(validity) => validity,
                Err(error) => {
                    tracing::warn!(path = %cert.display(), %error, "cannot read the certificate's validity; not renewing it");
                    return;
                }
            };
            let now = time::OffsetDateTime::now_utc();
            let due = renew_at(issued, expires);
            if now < due {
                let rotation = rotated(&client, &pem).await;
                if let Some(current) = rotation
                    .as_ref()
                    .filter(|c| renewed_for.as_ref() != Some(*c))
                {
                    // Renewed at once, so that the old intermediate can be
                    // retired without waiting out every node's certificate.
                    tracing::info!(intermediate = %current, "the CA's intermediate was rotated; renewing the certificate now");
                    renewed_for = Some(current.clone());
                } else {
                    if rotation.is_none() {
                        renewed_for = None;
                    }
                    // Look again soon: the intermediate may be rotated, or
                    // someone renew the files by hand.
                    let wait = std::time::Duration::try_from(due - now)
                        .unwrap_or_default()
                        .min(atoll_api::rest::CA_CHECK_INTERVAL);
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            let result = async {
                let (key_pem, csr) = key_and_csr("renewal")?;
                // A replica keeps the names it is reached by; a node has none.
                let renewed: IssuedCertificate = client
                    .post(
                        "/v1/renew",
                        &RenewRequest {
                            csr,
                            hosts: atoll_identity::hosts_of_pem(&pem),
                        },
                    )
                    .await?;
                write_issued(&key, &cert, None, &key_pem, &renewed)?;
                // Used at once for new connections, not at the files' next
                // check: a short-lived certificate has little time left.
                if let Some(tls) = client.transport().tls() {
                    match atoll_transport::Identity::from_pem(
                        renewed.chain.as_bytes(),
                        key_pem.as_bytes(),
                        "the renewed certificate",
                    ) {
                        Ok(identity) => tls.set_identity(&identity),
                        Err(error) => tracing::warn!(%error, "cannot use the renewed certificate"),
                    }
                }
                Ok::<_, CliError>(renewed)
            }
            .await;
            match result {
                Ok(renewed) => {
                    tracing::info!(identity = %renewed.identity, expires = %renewed.expires, "renewed the certificate");
                    // A moment before looking again (the files are read back).
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(error) if error.message.contains("does not issue certificates") => {
                    tracing::warn!(error = %error.message, expires = %expires, "the control plane does not renew certificates; renew this one by hand (`atoll renew`) before it expires");
                    return;
                }
                Err(error) => {
                    let left: time::Duration = (expires - now).max(time::Duration::ZERO);
                    let retry: time::Duration = (left / 10_i32).max(time::Duration::seconds(5));
                    tracing::warn!(error = %error.message, expires = %expires, "cannot renew the certificate; trying again in {retry}");
                    tokio::time::sleep(retry.try_into().unwrap_or_default()).await;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_certificate_is_renewed_with_a_third_of_its_life_left() {
        let issued = time::OffsetDateTime::UNIX_EPOCH;
        let expires = issued + time::Duration::hours(24);
        assert_eq!(
            super::renew_at(issued, expires),
            issued + time::Duration::hours(16)
        );
    }
}
