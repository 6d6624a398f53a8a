//! `atoll agent`: runs the agent of one zone in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use atoll_agent::{Agent, AgentOptions, LocalRuntime};
use clap::Args;

use crate::client::{CliError, Endpoint, state_dir};
use crate::control::{LogFormat, init_logging, shutdown_signal};

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The zone this agent runs (a Zone resource).
    #[arg(long, env = "ATOLL_ZONE")]
    zone: String,

    /// Node name [default: agent-ZONE].
    #[arg(long)]
    name: Option<String>,

    /// Where instance data, logs and the config cache live
    /// [default: <state dir>/agent-ZONE].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// The address instances listen on and are reported at.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// The zone's gateway URL, given to instances as $ATOLL_GATEWAY_URL
    /// (for calls that must be routed by key, like cross-cell credits).
    #[arg(long, value_name = "URL")]
    gateway_url: Option<String>,

    /// How long a stopping instance gets before it is killed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    stop_grace: Duration,

    /// Serve /healthz and /instances here.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,

    /// Let instances run as root: of a zone whose spec.runAs is `root`
    /// (or uid 0), or names no user while the agent runs as root. Without
    /// it such instances are refused; with it, every start is logged as a
    /// warning.
    #[arg(long)]
    allow_root_instances: bool,

    /// Log format (the level comes from $RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) async fn run(
    args: AgentArgs,
    control: Endpoint,
    workspace: String,
    transport: atoll_transport::Transport,
) -> Result<u8, CliError> {
    init_logging(args.log_format);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("agent-{}", args.zone));
    let options = AgentOptions {
        control: control.url.clone(),
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| state_dir().join(format!("agent-{}", args.zone))),
        zone: args.zone.clone(),
        workspace,
        name,
        host: args.host.clone(),
        gateway: args.gateway_url.clone(),
        stop_grace: args.stop_grace,
        admin: args.admin,
        transport,
        allow_root_instances: args.allow_root_instances,
    };
    // What the agent writes is its own (0600, 0700): its state directory
    // is passable by the instances' group, so nothing in it may be readable
    // by others. Instances inherit the mask; they can set their own.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if args.allow_root_instances {
        tracing::warn!(zone = %args.zone, "--allow-root-instances: instances of zones whose runAs is root, or names no user, run as root");
    }
    tracing::info!(zone = %options.zone, control = %control.url, from = %control.origin, state = %options.state_dir.display(), "starting agent {}", options.name);
    let agent = Agent::new(options, LocalRuntime)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    agent.run(stopped).await?;
    Ok(0)
}
