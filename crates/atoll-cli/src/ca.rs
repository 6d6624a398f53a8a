//! `atoll ca init|rotate|issue|show`: Atoll's own certificate authority
//! (atoll-identity), kept in a directory (docs/security.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use atoll_identity::{AtollId, Authority, CaOptions, IssueRequest, KeySource};
use clap::{Args, Subcommand};

use crate::client::{CliError, exit, state_dir};

#[derive(Debug, Args)]
pub(crate) struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make a root and an intermediate (or take an intermediate you bring).
    Init(InitArgs),
    /// Replace the intermediate with a new one signed by the same root
    /// (needs root.key); nodes trust the root, so they keep working.
    Rotate(RotateArgs),
    /// Issue a certificate and its key for one identity, e.g. a
    /// control-plane replica's.
    Issue(IssueArgs),
    /// Show the CA: its root, its intermediate and when they end.
    Show(DirArgs),
}

#[derive(Debug, Args)]
struct DirArgs {
    /// The CA directory [default: ~/.local/state/atoll/ca].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl DirArgs {
    fn dir(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| state_dir().join("ca"))
    }
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// How long the root is valid.
    #[arg(long, default_value = "10y", value_parser = humantime::parse_duration, value_name = "DURATION")]
    root_lifetime: Duration,
    /// How long the intermediate is valid.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration, value_name = "DURATION")]
    intermediate_lifetime: Duration,
    /// Your own intermediate's certificate (PEM), with --intermediate-key
    /// and --root-cert: Atoll signs with it and makes no root.
    #[arg(long, value_name = "FILE", requires_all = ["intermediate_key", "root_cert"])]
    intermediate_cert: Option<PathBuf>,
    /// Your own intermediate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "intermediate_cert")]
    intermediate_key: Option<PathBuf>,
    /// The root your intermediate chains to (PEM): what nodes will trust.
    #[arg(long, value_name = "FILE", requires = "intermediate_cert")]
    root_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RotateArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// How long the new intermediate is valid.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration, value_name = "DURATION")]
    intermediate_lifetime: Duration,
}

#[derive(Debug, Args)]
struct IssueArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The identity, e.g. atoll://default/control/-/replica-1.
    #[arg(long, value_name = "ATOLL_ID")]
    id: String,
    /// A DNS name or IP address the holder serves at (repeat).
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// How long the certificate is valid.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    lifetime: Duration,
    /// Writes OUT.pem (the certificate, then the intermediate) and OUT.key (0600).
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
}

fn failed(error: impl std::fmt::Display) -> CliError {
    CliError::new(exit::FAILURE, error.to_string())
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::new(exit::USAGE, format!("cannot read {}: {e}", path.display())))
}

fn describe(ca: &Authority, dir: &Path) {
    println!("CA in {}", dir.display());
    println!(
        "  trust (give to nodes): {}",
        dir.join("root.pem").display()
    );
    println!(
        "  intermediate ends: {}",
        ca.intermediate_not_after()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    );
    println!(
        "  root key here: {}",
        if dir.join("root.key").exists() {
            "yes (move it offline once the CA is set up; `atoll ca rotate` needs it back)"
        } else {
            "no"
        }
    );
}

pub(crate) fn run(args: CaArgs) -> Result<u8, CliError> {
    match args.command {
        CaCommand::Init(args) => {
            let dir = args.dir.dir();
            let ca = match (
                &args.intermediate_cert,
                &args.intermediate_key,
                &args.root_cert,
            ) {
                (Some(cert), Some(key), Some(root)) => {
                    Authority::bring_your_own(&dir, &read(root)?, &read(cert)?, &read(key)?)
                }
                _ => Authority::init(
                    &dir,
                    &CaOptions {
                        root_lifetime: args.root_lifetime,
                        intermediate_lifetime: args.intermediate_lifetime,
                        ..CaOptions::default()
                    },
                ),
            }
            .map_err(failed)?;
            describe(&ca, &dir);
        }
        CaCommand::Rotate(args) => {
            let dir = args.dir.dir();
            let ca = Authority::rotate(&dir, args.intermediate_lifetime).map_err(failed)?;
            println!(
                "a new intermediate signs from now on; nodes move to it at their next renewal"
            );
            describe(&ca, &dir);
        }
        CaCommand::Issue(args) => {
            let id: AtollId = args
                .id
                .parse()
                .map_err(|e: atoll_identity::IdError| CliError::new(exit::USAGE, e.to_string()))?;
            let ca = Authority::load(&args.dir.dir()).map_err(failed)?;
            let issued = ca
                .issue(&IssueRequest {
                    id: &id,
                    key: KeySource::Generate,
                    lifetime: args.lifetime,
                    hosts: &args.hosts,
                })
                .map_err(failed)?;
            let certificate = args.out.with_extension("pem");
            let key = args.out.with_extension("key");
            write_private(&key, issued.key_pem.as_deref().unwrap_or_default())?;
            std::fs::write(&certificate, &issued.chain_pem)
                .map_err(|e| failed(format!("cannot write {}: {e}", certificate.display())))?;
            println!(
                "{id}: {} and {} (serial {}, until {})",
                certificate.display(),
                key.display(),
                issued.serial,
                issued
                    .not_after
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            );
        }
        CaCommand::Show(args) => {
            let dir = args.dir();
            let ca = Authority::load(&dir).map_err(failed)?;
            describe(&ca, &dir);
        }
    }
    Ok(0)
}

/// Writes a secret file readable by its owner only.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
}
