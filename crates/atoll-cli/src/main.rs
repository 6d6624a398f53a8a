//! `atoll`: runs Atoll's control plane and drives it.
//!
//! Every command but `control` talks to a control plane over its REST API,
//! found by `--control`, `$ATOLL_CONTROL`, or the discovery file a local
//! `atoll control` writes. `docs/cli.md` is the reference, including exit codes.

use std::time::Duration;

mod agent;
mod approval;
mod audit;
mod auth;
mod ca;
mod client;
mod commands;
mod control;
mod drill;
mod etcd;
mod gateway;
mod join;
mod load;
mod netns;
mod output;
mod sidecar;
mod switchover;
mod tls;
mod up;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::CliError;
use crate::output::Format;

/// Atoll: multi-active, cell-based architecture.
///
/// Exit codes: 0 success, 1 failure, 2 usage error, 3 invalid manifests,
/// 4 conflict, 5 not found, 6 control plane unreachable, 7 barrier not reached,
/// 8 switchover aborted, 9 the checker found an anomaly, 10 a drill failed,
/// 11 no or a bad credential, 12 not allowed, 13 the audit chain does not
/// verify.
#[derive(Debug, Parser)]
#[command(name = "atoll", version, max_term_width = 100)]
struct Cli {
    /// URL of the control plane [default: from the discovery file of a local
    /// `atoll control`, else http://127.0.0.1:7400].
    #[arg(long, global = true, env = "ATOLL_CONTROL", value_name = "URL")]
    control: Option<String>,

    /// Who you are, for the audit log, on a control plane started
    /// `--insecure` only (elsewhere your token or certificate says who you
    /// are) [default: $USER].
    #[arg(long = "as", global = true, value_name = "USER")]
    user: Option<String>,

    /// The API token to send [default: the one `atoll login` saved for
    /// the control plane's URL].
    #[arg(
        long,
        global = true,
        env = "ATOLL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// The workspace to work in [default: `default`]: what `get`, `delete`
    /// and `history` look at, and where manifests that name none go.
    /// `--workspace '*'` lists every workspace.
    #[arg(long, global = true, env = "ATOLL_WORKSPACE", value_name = "NAME")]
    workspace: Option<String>,

    #[command(flatten)]
    tls: tls::TlsArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (REST API, config stream, metrics) until Ctrl-C.
    Control(control::ControlArgs),
    /// Run a gateway: serve a Gateway resource's listeners, routing every
    /// request to the cell that owns it.
    Gateway(gateway::GatewayArgs),
    /// Start a local sandbox: a control plane, three cells in two regions
    /// with their agents and gateways, and the demo bank. Ctrl-C stops it.
    Up(up::UpArgs),
    /// Drive a bank workload through the gateways, with live progress and
    /// a check that money is conserved.
    Load(load::LoadArgs),
    /// Check a history recorded by `atoll load --history` for lost or
    /// doubled writes, negative balances and money not conserved.
    Check(load::CheckArgs),
    /// Atoll's own certificate authority: make it, rotate its intermediate,
    /// issue a certificate by hand.
    Ca(ca::CaArgs),
    /// Move shard ranges between cells without losing a write: plan, start,
    /// status, abort.
    Switchover(switchover::SwitchoverArgs),
    /// Run a switchover or lose a cell under a bank workload, and report
    /// RTO, RPO, failed requests, fence window and the checker's verdict.
    Drill(drill::DrillArgs),
    /// Run the agent of a zone: run the zone's App instances, restart them,
    /// report their endpoints.
    Agent(agent::AgentArgs),
    /// Run the east-west sidecar beside one app instance: outbound calls
    /// routed to the owning cell, inbound calls re-checked (docs/mesh.md).
    Sidecar(sidecar::SidecarArgs),
    /// Create or replace resources from manifest files or directories.
    Apply(commands::ApplyArgs),
    /// Show resources of a kind (`cells`, `shardmap`...), or `all`.
    Get(commands::GetArgs),
    /// Delete resources, by kind and name or from manifests.
    Delete(commands::DeleteArgs),
    /// Show every change of a resource: `atoll history shardmap/users`.
    History(commands::HistoryArgs),
    /// Restore a resource's content from a past revision, as a new revision.
    Rollback(commands::RollbackArgs),
    /// List data-plane nodes and their applied config versions.
    Nodes(commands::NodesArgs),
    /// Show the service registry: which instances of which service run
    /// where, registered by agents, sidecars and SDK processes.
    Registry(commands::RegistryArgs),
    /// Wait until data-plane nodes have applied a config version.
    Barrier(commands::BarrierArgs),
    /// Show the log of commits (who changed what, and when); `audit calls`
    /// and `audit verify`: the hash-chained record of every call and
    /// refusal, and its check.
    Audit(commands::AuditArgs),
    /// Print commits as they happen, one JSON object per line.
    Watch(commands::WatchArgs),
    /// Show the control plane's version, store and revision.
    Status(OutputArgs),
    /// Check an API token with the control plane and save it for its URL
    /// (in ~/.config/atoll/credentials.json, mode 0600).
    Login(auth::LoginArgs),
    /// Forget the token saved for the control plane.
    Logout,
    /// Show who the control plane takes you for, and your roles.
    Whoami(OutputArgs),
    /// Make, list and revoke API tokens and bootstrap tokens.
    Token(auth::TokenArgs),
    /// List, approve and reject operations waiting for a second person.
    Approval(approval::ApprovalArgs),
    /// Get this node's certificate against a bootstrap token: the key is
    /// made here and never leaves this machine.
    Join(join::JoinArgs),
    /// Get a new certificate for the identity of --cert (before it
    /// expires), written over --cert and --key.
    Renew(join::RenewArgs),
}

/// `-o` for commands that print data.
#[derive(Debug, Args)]
struct OutputArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = match &cli.command {
        // The data path runs on exactly the threads asked for.
        Command::Gateway(args) if args.workers() == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Gateway(args) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(args.workers());
            builder
        }
        Command::Sidecar(args) if args.workers() == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Sidecar(args) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(args.workers());
            builder
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(client::exit::FAILURE);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {}", error.message);
            for detail in &error.details {
                eprintln!("  {detail}");
            }
            ExitCode::from(error.code)
        }
    };
    // Do not wait for blocking tasks (a stdin reader, the access log).
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn run(cli: Cli) -> Result<u8, CliError> {
    let user = cli
        .user
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "anonymous".into());
    let transport = cli.tls.transport()?;
    let connect = |timeout| {
        let endpoint = client::resolve(cli.control.as_deref())?;
        // A sandbox's control plane is trusted with the sandbox's CA when
        // no --ca is given.
        let sandbox_ca = cli
            .tls
            .ca
            .is_none()
            .then(|| client::sandbox_serving(&endpoint.url).and_then(|s| s.ca))
            .flatten();
        let transport = match sandbox_ca {
            Some(ca) => tls::TlsArgs {
                ca: Some(ca.into()),
                ..cli.tls.clone()
            }
            .transport()?,
            None => transport.clone(),
        };
        client::Client::new(
            endpoint,
            user.clone(),
            cli.token.clone(),
            timeout,
            &transport,
        )
        .map(|c| c.in_workspace(cli.workspace.clone()))
    };
    let default_timeout = Some(std::time::Duration::from_secs(60));
    match cli.command {
        Command::Control(args) => control::run(args, &cli.tls).await,
        Command::Gateway(args) => {
            let endpoint = client::resolve(cli.control.as_deref())?;
            let peer_tls = cli.tls.peer_server()?;
            keep_certificate_fresh(
                &cli.tls,
                &transport,
                peer_tls.clone(),
                client::Client::for_node(
                    endpoint.clone(),
                    Some(Duration::from_secs(10)),
                    &transport,
                )?,
            );
            gateway::run(
                args,
                endpoint,
                cli.workspace.clone().unwrap_or_default(),
                transport.clone(),
                peer_tls,
            )
            .await
        }
        Command::Up(args) => up::run(args).await,
        Command::Load(args) => load::run(&connect(default_timeout)?, args).await,
        Command::Check(args) => load::check(&args),
        Command::Ca(args) => ca::run(args),
        Command::Agent(args) => {
            let endpoint = client::resolve(cli.control.as_deref())?;
            keep_certificate_fresh(
                &cli.tls,
                &transport,
                None,
                client::Client::for_node(
                    endpoint.clone(),
                    Some(Duration::from_secs(10)),
                    &transport,
                )?,
            );
            agent::run(
                args,
                endpoint,
                cli.workspace.clone().unwrap_or_default(),
                transport.clone(),
            )
            .await
        }
        Command::Sidecar(args) => {
            let endpoint = client::resolve(cli.control.as_deref())?;
            sidecar::run(
                args,
                endpoint,
                cli.workspace.clone().unwrap_or_default(),
                &cli.tls,
                transport.clone(),
            )
            .await
        }
        Command::Apply(args) => commands::apply(&connect(default_timeout)?, args).await,
        Command::Get(args) => commands::get(&connect(default_timeout)?, args).await,
        Command::Delete(args) => commands::delete(&connect(default_timeout)?, args).await,
        Command::History(args) => commands::history(&connect(default_timeout)?, args).await,
        Command::Rollback(args) => commands::rollback(&connect(default_timeout)?, args).await,
        Command::Nodes(args) => commands::nodes(&connect(default_timeout)?, args).await,
        Command::Registry(args) => commands::registry(&connect(default_timeout)?, args).await,
        Command::Barrier(args) => commands::barrier(&connect(None)?, args).await,
        Command::Switchover(args) => switchover::run(&connect(default_timeout)?, args).await,
        Command::Drill(args) => drill::run(&connect(default_timeout)?, args).await,
        Command::Audit(args) => commands::audit(&connect(default_timeout)?, args).await,
        Command::Watch(args) => commands::watch(&connect(None)?, args).await,
        Command::Status(args) => commands::status(&connect(default_timeout)?, args.output).await,
        Command::Login(args) => auth::login(&connect(default_timeout)?, args).await,
        Command::Logout => auth::logout(&connect(default_timeout)?),
        Command::Whoami(args) => auth::whoami(&connect(default_timeout)?, args.output).await,
        Command::Token(args) => auth::token(&connect(default_timeout)?, args).await,
        Command::Approval(args) => approval::run(&connect(default_timeout)?, args).await,
        Command::Join(args) => join::join(&connect(default_timeout)?, args).await,
        Command::Renew(args) => join::renew(&connect(default_timeout)?, &cli.tls, args).await,
    }
}

/// For a long-running node: use renewed certificate files as they appear,
/// and renew the certificate before it expires.
fn keep_certificate_fresh(
    tls: &tls::TlsArgs,
    transport: &atoll_transport::Transport,
    server: Option<atoll_transport::ServerTls>,
    client: client::Client,
) {
    tls.follow(transport.tls().cloned(), server);
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        join::renew_in_background(client, cert.clone(), key.clone());
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
