//! `atoll sidecar`: runs the east-west sidecar beside one app instance in
//! the foreground (the agent starts it for an App with `mesh: sidecar`;
//! it can be run by hand too).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use atoll_sidecar::SidecarOptions;
use clap::Args;

use crate::client::{CliError, Endpoint, exit};
use crate::control::{LogFormat, init_logging, shutdown_signal};
use crate::tls::TlsArgs;

#[derive(Debug, Args)]
pub(crate) struct SidecarArgs {
    /// The instance it sits beside (`<app>-<cell>-<replica>`).
    #[arg(long, env = "ATOLL_INSTANCE")]
    instance: String,
    /// The instance's cell.
    #[arg(long, env = "ATOLL_CELL")]
    cell: String,
    /// The instance's zone.
    #[arg(long, env = "ATOLL_ZONE")]
    zone: String,
    /// The Service the instance serves.
    #[arg(long, env = "ATOLL_SERVICE")]
    service: String,
    /// Where the app listens: inbound calls are passed there.
    #[arg(long, env = "ATOLL_SIDECAR_APP", value_name = "ADDR")]
    app: SocketAddr,
    /// What the app speaks: http, http2 or grpc.
    #[arg(long, env = "ATOLL_SIDECAR_APP_PROTOCOL", default_value = "http", value_parser = ["http", "http2", "grpc", "bolt"])]
    app_protocol: String,
    /// Where callers reach the app through the sidecar.
    #[arg(long, env = "ATOLL_SIDECAR_INBOUND", value_name = "ADDR")]
    inbound: SocketAddr,
    /// The host registered for --inbound [default: its IP].
    #[arg(long, value_name = "HOST")]
    advertise: Option<String>,
    /// Where the app's outbound calls are taken (`http://<service>/...`
    /// with this as the proxy, or the Host header naming the service).
    #[arg(
        long,
        env = "ATOLL_SIDECAR_OUTBOUND",
        value_name = "ADDR",
        default_value = "127.0.0.1:15001"
    )]
    outbound: SocketAddr,
    /// Where the app's outbound SOFA Bolt calls are taken (the `service`
    /// header names the Atoll Service called).
    #[arg(long, env = "ATOLL_SIDECAR_OUTBOUND_BOLT", value_name = "ADDR")]
    outbound_bolt: Option<SocketAddr>,
    /// Serve /metrics and /healthz here.
    #[arg(long, env = "ATOLL_SIDECAR_ADMIN", value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Services the app calls, watched from the start (comma-separated;
    /// others are watched from their first call).
    #[arg(
        long,
        env = "ATOLL_SIDECAR_CALLS",
        value_delimiter = ',',
        value_name = "SERVICE"
    )]
    calls: Vec<String>,
    /// The version the instance runs (registered).
    #[arg(long, env = "ATOLL_VERSION", default_value = "")]
    version: String,
    /// The registry session's TTL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    session_ttl: Duration,
    /// At shutdown, how long to keep serving after deregistering.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain: Duration,
    /// The Unix socket where this sidecar offers its listening sockets to
    /// the one that replaces it (hot upgrade) [default:
    /// <data dir>/<instance>.sidecar.sock when --data-dir is given].
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
    /// Take the listening sockets of the sidecar serving --upgrade-socket
    /// over, instead of binding them: the old one drains and exits (a hot
    /// upgrade with no failed call).
    #[arg(long)]
    take_over: bool,
    /// Transparent mode: redirect the app's TCP connections to these
    /// addresses (IPv4 CIDRs of the services' addresses, comma-separated)
    /// to --outbound with iptables (needs root in the app's network
    /// namespace). The Host header still names the service.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    transparent: Vec<String>,
    /// Where the last configuration is cached (static stability).
    #[arg(long, env = "ATOLL_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Threads of the data path (one: a sidecar serves one instance, and
    /// on one thread it wakes no other).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Log format (the level comes from $RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl SidecarArgs {
    /// The data path's threads.
    pub(crate) fn workers(&self) -> usize {
        usize::from(self.workers)
    }
}

pub(crate) async fn run(
    args: SidecarArgs,
    control: Endpoint,
    workspace: String,
    tls: &TlsArgs,
    transport: atoll_transport::Transport,
) -> Result<u8, CliError> {
    init_logging(args.log_format);
    if args.inbound.port() == 0 || args.outbound.port() == 0 {
        return Err(CliError::new(
            exit::USAGE,
            "--inbound and --outbound need fixed ports: callers and the app must know them",
        ));
    }
    let identity = atoll_sdk::Identity {
        control: control.url.clone(),
        instance: args.instance.clone(),
        cell: args.cell.clone(),
        zone: args.zone.clone(),
        service: args.service.clone(),
        workspace,
        cache: args
            .data_dir
            .as_ref()
            .map(|dir| dir.join(format!("atoll-config-{}.json", args.instance))),
        transport,
        tls_files: atoll_transport::TlsFiles {
            ca: tls.ca.clone(),
            cert: tls.cert.clone(),
            key: tls.key.clone(),
        },
        role: "sidecar".into(),
    };
    let options = SidecarOptions {
        identity,
        app: args.app,
        app_protocol: args.app_protocol,
        inbound: args.inbound,
        advertise: args
            .advertise
            .unwrap_or_else(|| args.inbound.ip().to_string()),
        outbound: args.outbound,
        outbound_bolt: args.outbound_bolt,
        admin: args.admin,
        calls: args.calls.into_iter().filter(|c| !c.is_empty()).collect(),
        version: args.version,
        session_ttl: args.session_ttl,
        connect_timeout: Duration::from_secs(2),
        drain: args.drain,
        upgrade_socket: args.upgrade_socket.or_else(|| {
            args.data_dir
                .as_ref()
                .map(|dir| dir.join(format!("{}.sidecar.sock", args.instance)))
        }),
        take_over: args.take_over,
        transparent: args.transparent,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    atoll_sidecar::run(options, stopped)
        .await
        .map_err(|e| CliError::new(exit::FAILURE, e))?;
    Ok(0)
}
