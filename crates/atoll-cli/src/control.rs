//! `atoll control`: runs the control plane in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use atoll_api::discovery::{DEFAULT_LISTEN, Discovery, discovery_path};
use atoll_control::{ControlOptions, ControlServer, StoreOptions};
use atoll_store::EtcdOptions;
use clap::{Args, ValueEnum};

use crate::client::{CliError, state_dir};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// A redb file in --data-dir.
    Embedded,
    /// An etcd cluster at --etcd-endpoints.
    Etcd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct ControlArgs {
    /// Address for the REST API and the config stream (one port serves both).
    #[arg(long, env = "ATOLL_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,

    /// Store backend.
    #[arg(long, value_enum, default_value_t = Backend::Embedded)]
    store: Backend,

    /// Data directory of the embedded store [default: $XDG_STATE_HOME/atoll/control].
    #[arg(long, env = "ATOLL_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// etcd client URLs, comma-separated (with --store etcd).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        value_name = "URLS"
    )]
    etcd_endpoints: Vec<String>,

    /// Key prefix in etcd (with --store etcd).
    #[arg(long, default_value = "/atoll/", value_name = "PREFIX")]
    etcd_prefix: String,

    /// Forget data-plane nodes that have been disconnected this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    node_expiry: Duration,

    /// How long a stop waits for requests in flight.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    drain_timeout: Duration,

    /// Drop a node's stream after this long without a message from it
    /// (nodes heartbeat every 5s).
    #[arg(long, default_value = "15s", value_parser = parse_heartbeat_timeout, value_name = "DURATION")]
    heartbeat_timeout: Duration,

    /// How long an ownership lease lasts (app instances renew theirs every
    /// third of it and refuse writes once it ends); 0s turns leases off:
    /// writes then go on without the control plane, but a failover cannot
    /// know that a lost cell stopped writing.
    #[arg(long, default_value = "3s", value_parser = parse_lease, value_name = "DURATION")]
    lease_duration: Duration,

    /// The URL other replicas and clients reach this replica at (replicas
    /// pass writes on to the leader's) [default: http:// and --listen].
    #[arg(long, env = "ATOLL_ADVERTISE", value_name = "URL")]
    advertise: Option<String>,

    /// The TTL of the leader's election lease, kept alive every third of
    /// it: a leader that dies is replaced within about this long (etcd
    /// counts whole seconds, at least 2).
    #[arg(long, default_value = "2s", value_parser = parse_election_ttl, value_name = "DURATION")]
    election_ttl: Duration,

    /// Log format (the level comes from $RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Do not write the discovery file that lets other commands find this
    /// control plane without flags.
    #[arg(long)]
    no_discovery: bool,

    /// Serve plain HTTP with access control off: anyone who reaches the
    /// port may change everything, and the audit log records the name a
    /// client claims (`--as`). For a trial on one machine only; without
    /// it, `atoll control` needs --cert and --key (see docs/security.md).
    #[arg(long)]
    insecure: bool,

    /// A file holding the fleet admin's API token (user `admin`, group
    /// `atoll:admins`): the way in before any other token exists. Made
    /// (mode 0600) with a new token when the file does not exist.
    #[arg(long, env = "ATOLL_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// Issue node certificates (`atoll join`, `atoll renew`) with the
    /// intermediate of this CA directory (`atoll ca init`; root.key need
    /// not be there). Read again for every certificate, so a rotation is
    /// used at once.
    #[arg(long, env = "ATOLL_CA_DIR", value_name = "DIR")]
    ca_dir: Option<PathBuf>,

    /// How long a node certificate it issues is valid.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    node_cert_lifetime: Duration,
}

/// Reads the admin token from `path`, or makes one there (0600).
pub(crate) fn admin_token(path: &std::path::Path) -> Result<atoll_identity::Token, CliError> {
    use atoll_identity::{Token, TokenKind};
    match std::fs::read_to_string(path) {
        Ok(text) => Token::parse(&text)
            .map_err(|e| crate::client::CliError::new(crate::client::exit::USAGE, format!("--admin-token-file {}: {e}", path.display())))
            .and_then(|token| {
                if token.kind == TokenKind::Api {
                    Ok(token)
                } else {
                    Err(crate::client::CliError::new(crate::client::exit::USAGE, format!(
                        "--admin-token-file {}: holds a bootstrap token (atb_); it needs an API token (atk_)",
                        path.display()
                    )))
                }
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = Token::generate(TokenKind::Api);
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    crate::client::CliError::new(
                        crate::client::exit::FAILURE,
                        format!("cannot make {}: {e}", parent.display()),
                    )
                })?;
            }
            crate::ca::write_private(path, &format!("{token}\n"))?;
            tracing::info!(path = %path.display(), "made a new admin token");
            Ok(token)
        }
        Err(e) => Err(crate::client::CliError::new(crate::client::exit::USAGE, format!(
            "cannot read --admin-token-file {}: {e}",
            path.display()
        ))),
    }
}

fn parse_heartbeat_timeout(text: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if value < Duration::from_secs(6) {
        return Err("at least 6s: nodes heartbeat every 5s".into());
    }
    Ok(value)
}

pub(crate) fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn parse_election_ttl(text: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if value < Duration::from_secs(2) || value > Duration::from_secs(60) {
        return Err("the election TTL is from 2s to 1m".into());
    }
    Ok(value)
}

fn parse_lease(text: &str) -> Result<Duration, String> {
    let value = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !value.is_zero() && (value < Duration::from_millis(500) || value > Duration::from_secs(300))
    {
        return Err("a lease lasts from 500ms to 5m (0s turns leases off)".into());
    }
    Ok(value)
}

pub(crate) async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

pub(crate) async fn run(args: ControlArgs, tls: &crate::tls::TlsArgs) -> Result<u8, CliError> {
    init_logging(args.log_format);
    let state = state_dir();
    let store = match args.store {
        Backend::Embedded => StoreOptions::Embedded {
            dir: args.data_dir.unwrap_or_else(|| state.join("control")),
        },
        Backend::Etcd => {
            let mut options = EtcdOptions::new(args.etcd_endpoints);
            options.prefix = args.etcd_prefix;
            StoreOptions::Etcd(options)
        }
    };
    let description = store.describe();
    let transport = tls.transport()?;
    let serving = tls.server()?;
    tls.follow(transport.tls().cloned(), serving.clone());
    // Its own renewals use the same (followed) material.
    let renewal_transport = transport.clone();
    let scheme = if serving.is_some() { "https" } else { "http" };
    let access = match (&serving, args.insecure) {
        (None, false) => {
            return Err(crate::client::CliError::new(
                crate::client::exit::USAGE,
                "atoll control serves plain HTTP only with --insecure: anyone who reaches the port could then change everything. Give it --ca, --cert and --key (`atoll ca init`, then `atoll ca issue --id atoll://default/control/-/NAME --host ADDRESS --out FILE`; docs/security.md#getting-in), or pass --insecure for a trial on one machine",
            ));
        }
        (Some(_), true) => {
            return Err(crate::client::CliError::new(
                crate::client::exit::USAGE,
                "--insecure turns access control off and serves plain HTTP; it cannot be combined with --cert/--key. Drop one of them",
            ));
        }
        (None, true) => {
            tracing::warn!(
                "--insecure: plain HTTP and no access control; anyone who reaches {} may change everything, and the audit log records unverified names",
                args.listen
            );
            atoll_control::AccessOptions {
                enforce: false,
                admin_token: None,
            }
        }
        (Some(_), false) => atoll_control::AccessOptions {
            enforce: true,
            admin_token: None,
        },
    };
    let issuer = match &args.ca_dir {
        Some(dir) => {
            // Refuse at start what would fail every join later.
            atoll_identity::Authority::load(dir).map_err(|e| {
                crate::client::CliError::new(
                    crate::client::exit::USAGE,
                    format!("--ca-dir {}: {e}", dir.display()),
                )
            })?;
            if serving.is_none() {
                return Err(crate::client::CliError::new(
                    crate::client::exit::USAGE,
                    "--ca-dir issues certificates, which needs TLS (--ca, --cert, --key); a node's key would otherwise be signed for anyone who reaches the port",
                ));
            }
            Some(atoll_control::IssuerOptions {
                ca_dir: dir.clone(),
                lifetime: args.node_cert_lifetime,
            })
        }
        None => None,
    };
    let access = match &args.admin_token_file {
        Some(path) => atoll_control::AccessOptions {
            admin_token: Some(admin_token(path)?),
            ..access
        },
        None => access,
    };
    let server = ControlServer::bind(ControlOptions {
        listen: args.listen,
        store,
        node_expiry: args.node_expiry,
        drain_timeout: args.drain_timeout,
        heartbeat_timeout: args.heartbeat_timeout,
        lease_duration: args.lease_duration,
        advertise: args.advertise.clone(),
        election_ttl: args.election_ttl,
        transport,
        tls: serving.clone(),
        access,
        issuer,
    })
    .await?;
    let address = server.local_addr()?;
    let host = if address.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else if address.is_ipv6() {
        format!("[{}]", address.ip())
    } else {
        address.ip().to_string()
    };
    let url = format!("{scheme}://{host}:{}", address.port());
    // A replica renews its own certificate as nodes do, through its own
    // port (the replica that issues may be another): with a third of its
    // life left, or at once after the intermediate was rotated.
    let replica_certificate = tls
        .cert
        .as_ref()
        .and_then(|c| std::fs::read_to_string(c).ok())
        .and_then(|pem| atoll_identity::id_of_pem(&pem).ok())
        .is_some_and(|id| id.role == atoll_identity::Role::Control);
    if !replica_certificate && serving.is_some() {
        tracing::info!(
            "the serving certificate is not an Atoll replica's (atoll://WORKSPACE/control/-/NAME); renew it yourself"
        );
    }
    if let (Some(cert), Some(key), Some(_), true) =
        (&tls.cert, &tls.key, &serving, replica_certificate)
    {
        let own = args.advertise.clone().unwrap_or_else(|| url.clone());
        let client = crate::client::Client::for_node(
            crate::client::Endpoint {
                url: own,
                origin: "this replica".into(),
            },
            Some(std::time::Duration::from_secs(10)),
            &renewal_transport,
        )?;
        crate::join::renew_in_background(client, cert.clone(), key.clone());
    }
    let others: Vec<String> = crate::client::running()
        .into_iter()
        .filter(|r| r.url != url)
        .map(|r| format!("{} ({})", r.url, r.origin))
        .collect();
    if !others.is_empty() && !args.no_discovery {
        tracing::warn!(
            others = %others.join(", "),
            "other control planes run here too; commands without --control will ask which one to use"
        );
    }
    let discovery = (!args.no_discovery).then(|| discovery_path(&state));
    let written = discovery.clone();
    let discovery_body = Discovery {
        url: url.clone(),
        pid: std::process::id(),
        store: description,
    };
    let ready = move || {
        if let Some(path) = &written {
            let text = serde_json::to_string_pretty(&discovery_body).unwrap_or_default();
            let result = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(path, text));
            if let Err(error) = result {
                tracing::warn!(path = %path.display(), %error, "cannot write the discovery file; other commands need --control");
            }
        }
        tracing::info!(%url, "ready: `atoll apply -f examples/topology` to load the example");
    };
    let result = server.run(shutdown_signal(), ready).await;
    if let Some(path) = discovery {
        // Remove the file only if it is still ours.
        let ours = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Discovery>(&t).ok())
            .is_some_and(|d| d.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(&path);
        }
    }
    result?;
    Ok(0)
}
