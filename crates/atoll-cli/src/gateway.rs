//! `atoll gateway`: runs one Gateway resource in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use atoll_gateway::{Gateway, GatewayOptions};
use atoll_proxy::{AccessLogTarget, ProxySettings};
use clap::Args;

use crate::client::{CliError, Endpoint, state_dir};
use crate::control::{LogFormat, init_logging, shutdown_signal};

#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// The Gateway resource to run (its zone and listeners come from the
    /// control plane).
    #[arg(long, env = "ATOLL_GATEWAY")]
    name: String,

    /// Worker threads of the data path [default: the number of CPUs].
    #[arg(long)]
    workers: Option<usize>,

    /// Address of the admin API (/metrics, /healthz, /readyz, /config).
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,

    /// Where the config cache is kept [default: <state dir>/gateway-NAME].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// JSON access log: `-` for stdout, a file path, or `off`.
    #[arg(long, default_value = "off", value_name = "TARGET")]
    access_log: String,

    /// How long a stop waits for requests in flight.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,

    /// The most body bytes buffered to read a routing key from a JSON body.
    #[arg(long, default_value_t = 1024 * 1024, value_name = "BYTES")]
    max_buffered_body: usize,

    /// Log format (the level comes from $RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl GatewayArgs {
    pub(crate) fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

pub(crate) async fn run(
    args: GatewayArgs,
    control: Endpoint,
    workspace: String,
    transport: atoll_transport::Transport,
    peer_tls: Option<atoll_transport::ServerTls>,
) -> Result<u8, CliError> {
    init_logging(args.log_format);
    let access_log = match args.access_log.as_str() {
        "off" => None,
        "-" => Some(AccessLogTarget::Stdout),
        path => Some(AccessLogTarget::File(PathBuf::from(path))),
    };
    let options = GatewayOptions {
        control: control.url.clone(),
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| state_dir().join(format!("gateway-{}", args.name))),
        name: args.name.clone(),
        workspace,
        admin: args.admin,
        drain_timeout: args.drain_timeout,
        proxy: ProxySettings {
            max_buffered_body: args.max_buffered_body,
            access_log,
            ..ProxySettings::default()
        },
        transport,
        peer_tls,
    };
    tracing::info!(workers = args.workers(), control = %control.url, from = %control.origin, "starting gateway {}", args.name);
    let gateway = Gateway::new(options)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    gateway.run(stopped).await?;
    Ok(0)
}
