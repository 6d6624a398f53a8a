//! `atoll up`: the local multi-cell sandbox. One process starts, as its
//! children, a control plane (embedded store), three cells in two regions
//! with an agent and a gateway per zone, and the demo bank in every cell;
//! it prints where everything is, and Ctrl-C stops all of it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use atoll_api::rest::{ApplyRequest, ManifestFile};
use clap::Args;
use serde::Serialize;

use crate::client::{CliError, exit};
use crate::control::shutdown_signal;

/// Exit code of a usage error.
const USAGE: u8 = 2;

/// The sandbox's zones: (zone, region, region display name, cell).
const ZONES: [(&str, &str, &str, &str); 3] = [
    ("hz-a", "hz", "Hangzhou", "rz01"),
    ("hz-b", "hz", "Hangzhou", "rz02"),
    ("sh-a", "sh", "Shanghai", "rz03"),
];

/// Shard ranges: (first, last, owner, standby).
const SHARDS: [(u32, u32, &str, &str); 3] = [
    (0, 33, "rz01", "rz02"),
    (34, 66, "rz02", "rz03"),
    (67, 99, "rz03", "rz01"),
];

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Keep state and logs here (kept after exit) [default: a temporary
    /// directory, removed on exit].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// First port: the control plane takes it, the gateways of hz-a, hz-b
    /// and sh-a the next three, their admin APIs +11..+13, the agents'
    /// +21..+23. 0 takes free ports.
    #[arg(long, default_value_t = 7400, value_name = "PORT")]
    port_base: u16,

    /// The demo bank program [default: atoll-bank next to this program,
    /// built with cargo when run from a checkout].
    #[arg(long, value_name = "PATH")]
    bank: Option<PathBuf>,

    /// Bank instances per cell.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
    replicas: u32,

    /// How long to wait for everything to be ready.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    ready_timeout: Duration,

    /// Run this zone's agent and bank instances in their own network
    /// namespace, joined to the rest by a veth pair, so that `atoll drill
    /// fault --fault partition` can cut the zone off (Linux, root). The
    /// sandbox then listens on the veth's host address instead of 127.0.0.1.
    #[arg(long, value_name = "ZONE", value_parser = ["hz-a", "hz-b", "sh-a"])]
    isolate_zone: Option<String>,

    /// Control-plane replicas: 1 runs one process on the embedded store; 3
    /// or 5 start an etcd cluster of as many members (Debian's
    /// etcd-server) and as many `atoll control` replicas on it, one of
    /// them elected leader. Replica 1 takes the port base, the others
    /// +31..+34; etcd members take +41..+45 (clients) and +51..+55 (peers).
    #[arg(long, default_value_t = 1, value_parser = parse_control_replicas, value_name = "N")]
    control_replicas: usize,

    /// Run each control-plane replica in its own network namespace, their
    /// veth pairs joined by a bridge, so that `atoll drill control-plane
    /// --fault partition` can cut the leader off (Linux, root; needs
    /// --control-replicas 3 or 5). The rest of the sandbox then listens on
    /// the bridge's address instead of 127.0.0.1.
    #[arg(long, conflicts_with = "isolate_zone")]
    isolate_control: bool,

    /// Plain HTTP between the sandbox's parts and no access control, as
    /// before Atoll had a CA. By default the sandbox makes a CA, an admin
    /// token and a certificate for every part in its state directory, and
    /// every control connection is mutual TLS.
    #[arg(long)]
    insecure: bool,

    /// How long the certificates of the sandbox's parts are valid; each
    /// renews its own with a third of it left (a short one shows
    /// rotation under load).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    node_cert_lifetime: Duration,

    /// The user the bank's instances run as (every Zone's spec.runAs)
    /// [default: `nobody` when run as root, else the user running this].
    /// `root` starts the agents with --allow-root-instances.
    #[arg(long, value_name = "USER")]
    run_as: Option<String>,
}

fn parse_control_replicas(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        _ => Err("1, 3 or 5: a quorum store needs an odd number of members".into()),
    }
}

/// The sandbox's ports.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Ports {
    control: u16,
    gateways: [u16; 3],
    gateway_admins: [u16; 3],
    /// The gateways' peer listeners (mutual TLS, for what other gateways
    /// forward; not used with --insecure).
    gateway_peers: [u16; 3],
    agent_admins: [u16; 3],
    /// The replicas after the first (with --control-replicas).
    more_controls: Vec<u16>,
    /// etcd members: client and peer ports (with --control-replicas).
    etcd_clients: Vec<u16>,
    etcd_peers: Vec<u16>,
}

/// What `up.json` in the state directory says once everything is ready.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct UpFile {
    pid: u32,
    /// The control plane: one URL, or every replica's, comma-separated.
    control: String,
    /// Each control-plane replica (one unless --control-replicas).
    control_replicas: Vec<String>,
    /// The etcd members' client URLs (with --control-replicas).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    etcd: Vec<String>,
    state_dir: String,
    /// Zone -> gateway URL.
    gateways: BTreeMap<String, String>,
    /// Zone -> gateway admin URL.
    gateway_admins: BTreeMap<String, String>,
    /// Zone -> agent admin URL.
    agents: BTreeMap<String, String>,
    /// Cell -> zone.
    cells: BTreeMap<String, String>,
    /// Seconds from start to ready.
    ready_seconds: f64,
    /// Child process -> pid (the agents' instances are in their /instances).
    processes: BTreeMap<String, u32>,
    /// With --isolate-zone: the zone's network namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    isolated: Option<crate::netns::Isolation>,
    /// With --isolate-control: the replicas' network namespaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    isolated_control: Option<crate::netns::ControlNetwork>,
    /// The CA bundle to trust the control plane with (none: --insecure).
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<String>,
    /// The file of the admin token (none: --insecure).
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_token_file: Option<String>,
    /// The user the bank's instances run as (none: the agents' own).
    #[serde(skip_serializing_if = "Option::is_none")]
    run_as: Option<String>,
}

/// The sandbox's own CA (`<state>/pki`, 0700), the certificates it issues
/// its parts from it, and its admin token (`<state>/admin.token`, 0600):
/// what makes the sandbox secure by default.
struct Pki {
    dir: PathBuf,
    admin_token_file: PathBuf,
    admin_token: String,
    lifetime: Duration,
}

impl Pki {
    fn create(state_dir: &Path, lifetime: Duration) -> Result<Self, CliError> {
        let dir = state_dir.join("pki");
        let failed = |e: atoll_identity::CaError| {
            CliError::new(
                exit::FAILURE,
                format!("the sandbox's CA in {}: {e}", dir.display()),
            )
        };
        if !dir.join("root.pem").exists() {
            atoll_identity::Authority::init(&dir, &atoll_identity::CaOptions::default())
                .map_err(failed)?;
        }
        let admin_token_file = state_dir.join("admin.token");
        let admin_token = crate::control::admin_token(&admin_token_file)?.to_string();
        Ok(Self {
            dir,
            admin_token_file,
            admin_token,
            lifetime,
        })
    }

    /// The root every part trusts.
    fn ca(&self) -> PathBuf {
        self.dir.join("root.pem")
    }

    /// A certificate and key for `id`; the flags that give them to a part.
    fn issue(
        &self,
        id: &atoll_identity::AtollId,
        hosts: &[String],
    ) -> Result<Vec<String>, CliError> {
        let failed = |e: atoll_identity::CaError| {
            CliError::new(
                exit::FAILURE,
                format!("issuing the certificate of {id}: {e}"),
            )
        };
        let authority = atoll_identity::Authority::load(&self.dir).map_err(failed)?;
        // Replicas do not renew their own certificates yet: theirs last a
        // day at least, whatever --node-cert-lifetime says.
        let lifetime = if id.role == atoll_identity::Role::Control {
            self.lifetime.max(Duration::from_secs(24 * 3600))
        } else {
            self.lifetime
        };
        let issued = authority
            .issue(&atoll_identity::IssueRequest {
                id,
                key: atoll_identity::KeySource::Generate,
                lifetime,
                hosts,
            })
            .map_err(failed)?;
        let base = self.dir.join(format!("{}-{}", id.role, id.name));
        let cert = base.with_extension("pem");
        let key = base.with_extension("key");
        crate::ca::write_private(&key, issued.key_pem.as_deref().unwrap_or_default())?;
        std::fs::write(&cert, &issued.chain_pem).map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot write {}: {e}", cert.display()),
            )
        })?;
        Ok(vec![
            "--ca".into(),
            self.ca().display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ])
    }

    /// How `atoll up` itself reaches the control plane: trusting the root.
    fn transport(&self) -> Result<atoll_transport::Transport, CliError> {
        let tls = atoll_transport::TlsFiles {
            ca: Some(self.ca()),
            ..atoll_transport::TlsFiles::default()
        }
        .client()
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?
        .ok_or_else(|| CliError::new(exit::FAILURE, "the sandbox's CA has no root"))?;
        Ok(atoll_transport::Transport::with_tls(tls))
    }
}

/// An identity of the sandbox's default workspace.
fn sandbox_id(
    role: atoll_identity::Role,
    zone: &str,
    name: &str,
) -> Result<atoll_identity::AtollId, CliError> {
    atoll_identity::AtollId::new(atoll_model::DEFAULT_WORKSPACE, role, zone, name)
        .map_err(|e| CliError::new(exit::FAILURE, format!("the identity of {name}: {e}")))
}

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn pick_ports(base: u16, replicas: usize) -> Result<Ports, CliError> {
    let extra = if replicas > 1 { replicas } else { 0 };
    if base == 0 {
        let mut taken = Vec::new();
        let mut next = || -> Result<u16, CliError> {
            // Hold each listener until all are picked so none repeats.
            let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| {
                CliError::new(exit::FAILURE, format!("cannot find a free port: {e}"))
            })?;
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            taken.push(listener);
            Ok(port)
        };
        return Ok(Ports {
            control: next()?,
            gateways: [next()?, next()?, next()?],
            gateway_admins: [next()?, next()?, next()?],
            gateway_peers: [next()?, next()?, next()?],
            agent_admins: [next()?, next()?, next()?],
            more_controls: (1..extra.max(1))
                .map(|_| next())
                .collect::<Result<_, _>>()?,
            etcd_clients: (0..extra).map(|_| next()).collect::<Result<_, _>>()?,
            etcd_peers: (0..extra).map(|_| next()).collect::<Result<_, _>>()?,
        });
    }
    let at = |offset: u16| -> Result<u16, CliError> {
        base.checked_add(offset).ok_or_else(|| {
            CliError::new(
                USAGE,
                format!("--port-base {base} leaves no room for 56 ports; pick a lower one"),
            )
        })
    };
    let offsets = |first: u16, count: usize| -> Result<Vec<u16>, CliError> {
        (0..count)
            .map(|i| at(first + u16::try_from(i).unwrap_or(0)))
            .collect()
    };
    let ports = Ports {
        control: at(0)?,
        gateways: [at(1)?, at(2)?, at(3)?],
        gateway_admins: [at(11)?, at(12)?, at(13)?],
        gateway_peers: [at(14)?, at(15)?, at(16)?],
        agent_admins: [at(21)?, at(22)?, at(23)?],
        more_controls: offsets(31, extra.saturating_sub(1))?,
        etcd_clients: offsets(41, extra)?,
        etcd_peers: offsets(51, extra)?,
    };
    let mut named = vec![(ports.control, "the control plane".to_owned())];
    for (i, port) in ports.more_controls.iter().enumerate() {
        named.push((*port, format!("control-plane replica {}", i + 2)));
    }
    for (i, (client, peer)) in ports.etcd_clients.iter().zip(&ports.etcd_peers).enumerate() {
        named.push((*client, format!("etcd member {} (clients)", i + 1)));
        named.push((*peer, format!("etcd member {} (peers)", i + 1)));
    }
    for (i, (zone, ..)) in ZONES.iter().enumerate() {
        named.push((ports.gateways[i], format!("the gateway of {zone}")));
        named.push((
            ports.gateway_admins[i],
            format!("the admin API of the gateway of {zone}"),
        ));
        named.push((
            ports.gateway_peers[i],
            format!("the peer listener of the gateway of {zone}"),
        ));
        named.push((
            ports.agent_admins[i],
            format!("the admin API of the agent of {zone}"),
        ));
    }
    for (port, what) in named {
        if !free(port) {
            let mut error = CliError::new(exit::FAILURE, format!("port {port} ({what}) is in use"));
            error.details.push(format!(
                "pass --port-base N to move every port (now {base}), or --port-base 0 to take free ones; is another `atoll up` running?"
            ));
            return Err(error);
        }
    }
    Ok(ports)
}

/// Finds the bank program; from a checkout, builds it.
fn find_bank(flag: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(path) = flag {
        if path.is_file() {
            return Ok(std::fs::canonicalize(&path).unwrap_or(path));
        }
        return Err(CliError::new(
            USAGE,
            format!("--bank {}: no such file", path.display()),
        ));
    }
    let me = std::env::current_exe()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot locate this program: {e}")))?;
    let dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidate = dir.join("atoll-bank");
    // Under `cargo run`, build the bank with the same profile, so a fresh
    // checkout needs one command (cargo only builds what changed).
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        eprintln!(
            "building atoll-bank ({} profile)...",
            if release { "release" } else { "dev" }
        );
        let mut build = std::process::Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "-p",
            "atoll-bank",
            "--bin",
            "atoll-bank",
        ]);
        if release {
            build.arg("--release");
        }
        if let Ok(manifest) = std::env::var("CARGO_MANIFEST_DIR") {
            build.current_dir(manifest);
        }
        let status = build.status().map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot run cargo to build atoll-bank: {e}"),
            )
        })?;
        if !status.success() {
            return Err(CliError::new(
                exit::FAILURE,
                "building atoll-bank failed (see above)",
            ));
        }
    }
    if candidate.is_file() {
        return Ok(candidate);
    }
    let mut error = CliError::new(
        exit::FAILURE,
        format!("atoll-bank is not next to atoll ({})", candidate.display()),
    );
    error
        .details
        .push("build it with `cargo build --release -p atoll-bank`, or pass --bank PATH".into());
    Err(error)
}

/// The sandbox topology as manifest files.
fn topology(
    ports: &Ports,
    bank: &Path,
    replicas: u32,
    host: &str,
    run_as: Option<&str>,
    secure: bool,
) -> Vec<(String, String)> {
    let mut places =
        String::from("# Two regions: two zones in Hangzhou (same city), one in Shanghai.\n");
    let mut regions = Vec::new();
    for (_, region, display, _) in ZONES {
        if !regions.contains(&region) {
            regions.push(region);
            let _ = write!(
                places,
                "---\napiVersion: atoll/v1\nkind: Region\nmetadata: {{name: {region}}}\nspec: {{displayName: {display}}}\n"
            );
        }
    }
    if let Some(user) = run_as {
        let _ = writeln!(
            places,
            "# Each zone's agent runs its instances as `{user}`."
        );
    }
    for (zone, region, ..) in ZONES {
        let run_as = run_as.map_or_else(String::new, |user| format!(", runAs: {user}"));
        let _ = write!(
            places,
            "---\napiVersion: atoll/v1\nkind: Zone\nmetadata: {{name: {zone}}}\nspec: {{region: {region}{run_as}}}\n"
        );
    }
    let mut cells = String::from("# One rzone per zone: each owns a third of the users.\n");
    for (zone, _, _, cell) in ZONES {
        let _ = write!(
            cells,
            "---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {{name: {cell}}}\nspec: {{zone: {zone}, type: rzone}}\n"
        );
    }
    let mut sharding = String::from(
        "# Users are sharded by the last two digits of their id: 100 shards.\n\
         apiVersion: atoll/v1\nkind: ShardRule\nmetadata: {name: users}\nspec:\n  shards: 100\n  key:\n    sources:\n      - header: x-user-id\n      - path: /accounts/{uid}\n    transform: {decimalSuffix: 2}\n    onMissing: reject\n\
         ---\n# Each cell owns a range; its standby receives its changes.\napiVersion: atoll/v1\nkind: ShardMap\nmetadata: {name: users}\nspec:\n  rule: users\n  # The emergency plan: a cell lost for 5 s fails over to its standbys.\n  failover: {approval: automatic, lostAfter: 5s}\n  assignments:\n",
    );
    for (first, last, owner, standby) in SHARDS {
        let _ = writeln!(
            sharding,
            "    - {{shards: \"{first}-{last}\", cell: {owner}, standby: {standby}}}"
        );
    }
    let bank = format!(
        "# The demo bank: unitized by user, run by the agents in every cell.\n\
         apiVersion: atoll/v1\nkind: Service\nmetadata: {{name: bank}}\nspec:\n  kind: unitized\n  shardRule: users\n  writes: {{methods: [POST, PUT, PATCH, DELETE]}}\n  replication: {{probe: /internal/replication/positions}}\n\
         ---\napiVersion: atoll/v1\nkind: Route\nmetadata: {{name: bank}}\nspec:\n  match: [{{pathPrefix: /accounts/}}]\n  service: bank\n  timeout: 10s\n  retries: {{attempts: 2, on: [connectFailure, reset]}}\n\
         ---\napiVersion: atoll/v1\nkind: App\nmetadata: {{name: bank}}\nspec:\n  service: bank\n  cells: [{}]\n  replicas: {replicas}\n  command: [{}]\n  healthCheck: {{path: /healthz, interval: 1s, timeout: 1s}}\n  version: v1\n",
        ZONES.iter().map(|z| z.3).collect::<Vec<_>>().join(", "),
        serde_json::to_string(&bank.display().to_string()).unwrap_or_default(),
    );
    let mut gateways = String::from("# One gateway per zone; a request may enter any of them.\n");
    for (i, (zone, ..)) in ZONES.iter().enumerate() {
        let port = ports.gateways[i];
        // Secure, gateways forward to each other over mutual TLS on a
        // listener of their own; else to the public listener.
        let forwarding = if secure {
            let peer = ports.gateway_peers[i];
            format!("  peer: {{port: {peer}, address: {host}}}\n  advertise: \"{host}:{peer}\"\n")
        } else {
            format!("  advertise: \"{host}:{port}\"\n")
        };
        let _ = write!(
            gateways,
            "---\napiVersion: atoll/v1\nkind: Gateway\nmetadata: {{name: gw-{zone}}}\nspec:\n  zone: {zone}\n  listeners: [{{port: {port}, protocol: http, address: {host}}}]\n{forwarding}"
        );
    }
    vec![
        ("00-places.yaml".into(), places),
        ("10-cells.yaml".into(), cells),
        ("20-sharding.yaml".into(), sharding),
        ("30-bank.yaml".into(), bank),
        ("40-gateways.yaml".into(), gateways),
    ]
}

/// The sandbox's shared secret for calls between bank instances:
/// `<state>/bank-secret`, 32 random bytes in hex, readable by its owner
/// only; kept when it exists already (a `--state-dir` used again).
fn bank_secret(state_dir: &Path) -> Result<PathBuf, CliError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = state_dir.join("bank-secret");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= 32) {
        return Ok(path);
    }
    let failed = |e: std::io::Error| {
        CliError::new(
            exit::FAILURE,
            format!("cannot make {}: {e}", path.display()),
        )
    };
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(failed)?;
    let mut text: String = random.iter().map(|b| format!("{b:02x}")).collect();
    text.push('\n');
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(failed)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(failed)?;
    Ok(path)
}

/// Whom the bank's instances run as, and what they are given to run.
struct Instances {
    /// Every Zone's `runAs` (none: the agents' own user, not root).
    run_as: Option<String>,
    /// Root, by `--run-as root`: the agents allow it.
    root: bool,
    /// The bank program as the instances reach it.
    bank: PathBuf,
}

impl Instances {
    /// Works out the instances' user (`nobody` when run as root) and, when
    /// the agents switch to it, lets it reach what an instance needs and
    /// nothing else: the state directory and `agents/` become searchable
    /// (0710) by its group, not listable; the bank's secret readable by it
    /// (0640); the bank program copied to `bin/` (the checkout it was built
    /// in may sit in a home directory it cannot enter). The CA's keys, the
    /// admin token, the store and the other parts' files stay 0700/0600.
    fn prepare(
        run_as: Option<&str>,
        state_dir: &Path,
        bank: &Path,
        secret: &Path,
    ) -> Result<Instances, CliError> {
        use atoll_agent::runtime::RunAs;
        use std::os::unix::fs::PermissionsExt as _;
        let root = nix::unistd::geteuid().is_root();
        let run_as = match run_as {
            Some(user) => Some(user.to_owned()),
            None if root => Some("nobody".to_owned()),
            None => None,
        };
        let user = match RunAs::of_zone(
            "(every zone)",
            run_as.as_deref(),
            run_as.as_deref() == Some("root"),
        ) {
            RunAs::Refused(why) => {
                return Err(CliError::new(exit::USAGE, format!("--run-as: {why}")));
            }
            RunAs::Agent => None,
            RunAs::User(user) => Some(user),
        };
        let as_root = root && user.is_none();
        if as_root {
            eprintln!(
                "warning: the bank's instances run as root (--run-as root); the agents start with --allow-root-instances"
            );
        }
        let Some(user) = user else {
            return Ok(Instances {
                run_as: run_as.filter(|_| root),
                root: as_root,
                bank: bank.to_owned(),
            });
        };
        let failed = |path: &Path, e: std::io::Error| {
            CliError::new(
                exit::FAILURE,
                format!(
                    "cannot share {} with user `{}` ({}:{}), whom the instances run as: {e}",
                    path.display(),
                    user.name,
                    user.uid,
                    user.gid
                ),
            )
        };
        let share = |path: &Path, mode: u32| {
            std::os::unix::fs::chown(path, None, Some(user.gid))
                .and_then(|()| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|e| failed(path, e))
        };
        let agents = state_dir.join("agents");
        let bin = state_dir.join("bin");
        for dir in [&agents, &bin] {
            std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
        }
        atoll_agent::runtime::keep_private(state_dir, &["agents", "bin", "bank-secret"])
            .map_err(|why| CliError::new(exit::FAILURE, why))?;
        share(state_dir, 0o710)?;
        share(&agents, 0o710)?;
        share(&bin, 0o710)?;
        share(secret, 0o640)?;
        let copy = bin.join("atoll-bank");
        let temporary = bin.join("atoll-bank.new");
        std::fs::copy(bank, &temporary).map_err(|e| failed(bank, e))?;
        share(&temporary, 0o750)?;
        std::fs::rename(&temporary, &copy).map_err(|e| failed(&copy, e))?;
        atoll_agent::runtime::reachable(&user, &copy, true).map_err(|why| {
            CliError::new(
                exit::FAILURE,
                format!("the bank's instances could not start: {why}; or pick another user with --run-as"),
            )
        })?;
        Ok(Instances {
            run_as,
            root: false,
            bank: copy,
        })
    }
}

/// A child process of the sandbox.
struct Child {
    name: String,
    child: tokio::process::Child,
    log: PathBuf,
    /// How it was started, to start it again when it dies.
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    restarts: u32,
}

impl Child {
    fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        env: &[(&str, String)],
    ) -> Result<Child, CliError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let child = Self::start_process(name, program, args, log, &env)?;
        Ok(Child {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            program: program.to_owned(),
            args: args.to_vec(),
            env,
            restarts: 0,
        })
    }

    /// Starts it again (after it died).
    fn respawn(&mut self) -> Result<(), CliError> {
        self.child =
            Self::start_process(&self.name, &self.program, &self.args, &self.log, &self.env)?;
        self.restarts += 1;
        Ok(())
    }

    fn start_process(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        env: &[(String, String)],
    ) -> Result<tokio::process::Child, CliError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| {
                CliError::new(exit::FAILURE, format!("cannot open {}: {e}", log.display()))
            })?;
        let err = file.try_clone().map_err(|e| {
            CliError::new(exit::FAILURE, format!("cannot open {}: {e}", log.display()))
        })?;
        let mut command = std::process::Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .env_remove("ATOLL_CONTROL")
            .env_remove("ATOLL_GATEWAY")
            .env_remove("ATOLL_ZONE")
            .env_remove("ATOLL_DATA_DIR")
            .env_remove("ATOLL_LISTEN");
        for (key, value) in env {
            command.env(key, value);
        }
        // Own process group (Ctrl-C reaches only `atoll up`, which stops
        // children in order) and SIGTERM if `atoll up` dies.
        atoll_agent::runtime::dies_with_parent(&mut command);
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        command
            .spawn()
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot start {name}: {e}")))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = self.child.id() {
            atoll_agent::runtime::signal_group(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("  {} did not stop within {grace:?}; killing it", self.name);
            if let Some(pid) = self.child.id() {
                atoll_agent::runtime::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = self.child.wait().await;
        }
    }

    /// If it has exited: how.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(atoll_agent::runtime::describe_exit(status)),
            _ => None,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Everything started so far, stopped in reverse order on drop paths.
struct Sandbox {
    children: Vec<Child>,
    state_dir: PathBuf,
    temporary: bool,
    isolation: Option<crate::netns::Isolation>,
    control_network: Option<crate::netns::ControlNetwork>,
}

impl Sandbox {
    async fn stop(&mut self) {
        // Gateways first (stop taking traffic), then agents (they stop the
        // bank instances and report them gone), then the control plane.
        while let Some(mut child) = self.children.pop() {
            eprintln!("  stopping {}", child.name);
            child.stop(Duration::from_secs(15)).await;
        }
        if let Some(isolation) = self.isolation.take() {
            // A drill may have left it cut off; nothing runs in it now.
            isolation.remove();
        }
        if let Some(network) = self.control_network.take() {
            network.remove();
        }
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }

    fn check_children(&mut self) -> Result<(), CliError> {
        for child in &mut self.children {
            if let Some(how) = child.exited() {
                let mut error = CliError::new(
                    exit::FAILURE,
                    format!("{} {how} while starting", child.name),
                );
                error.details.push(format!(
                    "its log ({}) ends with:\n{}",
                    child.log.display(),
                    child.log_tail()
                ));
                return Err(error);
            }
        }
        Ok(())
    }
}

pub(crate) async fn run(args: UpArgs) -> Result<u8, CliError> {
    if args.isolate_control && args.control_replicas < 3 {
        return Err(CliError::new(
            USAGE,
            "--isolate-control puts each control-plane replica in a network namespace of its own: give --control-replicas 3 or 5 with it",
        ));
    }
    let started = Instant::now();
    let bank = find_bank(args.bank.clone())?;
    let started_after_build = Instant::now();
    let ports = pick_ports(args.port_base, args.control_replicas)?;
    let (state_dir, temporary) = match &args.state_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("atoll-up-{}", std::process::id())),
            true,
        ),
    };
    let logs = state_dir.join("logs");
    // It holds the sandbox's CA key, admin token and certificates' keys:
    // what this and its parts write is private unless shared on purpose
    // (`Instances::prepare`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(&logs).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot create {}: {e}", logs.display()),
        )
    })?;
    let state_dir = std::fs::canonicalize(&state_dir).unwrap_or(state_dir);
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |e| {
                CliError::new(
                    exit::FAILURE,
                    format!("cannot make {} private (0700): {e}", state_dir.display()),
                )
            },
        )?;
    }
    let logs = state_dir.join("logs");
    let _ = std::fs::remove_file(state_dir.join("up.json"));
    let isolation = match &args.isolate_zone {
        Some(zone) => Some(crate::netns::Isolation::create(zone)?),
        None => None,
    };
    let control_network = if args.isolate_control {
        match crate::netns::ControlNetwork::create(args.control_replicas) {
            Ok(network) => Some(network),
            Err(error) => {
                if let Some(isolation) = &isolation {
                    isolation.remove();
                }
                return Err(error);
            }
        }
    } else {
        None
    };
    let mut sandbox = Sandbox {
        children: Vec::new(),
        state_dir: state_dir.clone(),
        temporary,
        isolation,
        control_network,
    };
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let result = tokio::select! {
        result = start(&args, &ports, &bank, &state_dir, &logs, &mut sandbox, started_after_build) => result,
        _ = stopped.wait_for(|s| *s) => Err(CliError::new(exit::FAILURE, "interrupted while starting")),
    };
    match result {
        Ok(up) => {
            // Other commands find this sandbox (and its state directory)
            // without flags, and refuse to guess if other control planes run.
            let registered = register(&up);
            print_summary(
                &up,
                &ports,
                &bank,
                &logs,
                args.replicas,
                started.elapsed(),
                temporary,
            );
            // Serve until Ctrl-C; a part that dies meanwhile is started
            // again a second later (as an agent restarts the bank), so a
            // drill can kill the control plane or an agent and watch the
            // rest carry on.
            let mut up = up;
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        let mut changed = false;
                        let held = state_dir.join("hold");
                        for child in &mut sandbox.children {
                            // `atoll drill fault --fault kill` holds what it killed.
                            if held.join(&child.name).exists() {
                                continue;
                            }
                            if let Some(how) = child.exited() {
                                eprintln!("warning: {} {how}; starting it again (restart {}, its log is {})", child.name, child.restarts + 1, child.log.display());
                                match child.respawn() {
                                    Ok(()) => changed = true,
                                    Err(error) => eprintln!("warning: {}", error.message),
                                }
                            }
                        }
                        if changed {
                            up.processes = processes(&sandbox);
                            if let Err(error) = write_up_file(&state_dir, &up) {
                                eprintln!("warning: {}", error.message);
                            }
                        }
                    }
                }
            }
            eprintln!("\nstopping the sandbox...");
            if let Some(path) = registered {
                let _ = std::fs::remove_file(path);
            }
            sandbox.stop().await;
            eprintln!("stopped.");
            Ok(0)
        }
        Err(error) => {
            eprintln!("atoll up failed; stopping what started...");
            sandbox.stop().await;
            Err(error)
        }
    }
}

async fn start(
    args: &UpArgs,
    ports: &Ports,
    bank: &Path,
    state_dir: &Path,
    logs: &Path,
    sandbox: &mut Sandbox,
    build_finished: Instant,
) -> Result<UpFile, CliError> {
    let me = std::env::current_exe()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot locate this program: {e}")))?;
    // Where everything listens: loopback, or with an isolated zone the
    // host end of its veth pair (reachable from both sides).
    // With isolated replicas, the bridge's address: the replicas reach
    // everything there, and everything reaches them on the bridge.
    let isolation = sandbox.isolation.clone();
    let control_network = sandbox.control_network.clone();
    let host = match (&isolation, &control_network) {
        (Some(i), _) => i.host_address.clone(),
        (None, Some(network)) => network.host_address.clone(),
        (None, None) => "127.0.0.1".to_owned(),
    };
    let replica_host = |i: usize| {
        control_network
            .as_ref()
            .and_then(|n| n.replicas.get(i))
            .map_or_else(|| host.clone(), |r| r.address.clone())
    };
    // Secure by default: a CA, an admin token and a certificate for every
    // part; with --insecure plain HTTP as before.
    let pki = if args.insecure {
        None
    } else {
        eprintln!(
            "making the sandbox's CA, admin token and certificates ({})...",
            state_dir.join("pki").display()
        );
        Some(Pki::create(state_dir, args.node_cert_lifetime)?)
    };
    let scheme = if pki.is_some() { "https" } else { "http" };
    let transport = match &pki {
        Some(pki) => pki.transport()?,
        None => atoll_transport::Transport::plain(),
    };
    // A REST client of the control plane as the sandbox's admin (or, with
    // --insecure, as `atoll-up`).
    let control_rest = |urls: &str| -> Result<atoll_transport::RestClient, CliError> {
        let urls = atoll_transport::ControlUrls::parse_in_order(urls)
            .map_err(|e| CliError::new(exit::FAILURE, e))?;
        let rest = transport.rest(urls, Some(Duration::from_secs(5)));
        match &pki {
            Some(pki) => rest.with_token(pki.admin_token.trim()),
            None => rest.with_header(atoll_transport::USER_HEADER, "atoll-up"),
        }
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))
    };
    let control = format!("{scheme}://{}:{}", replica_host(0), ports.control);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| CliError::new(exit::FAILURE, format!("building the HTTP client: {e}")))?;
    let deadline = Instant::now() + args.ready_timeout;
    let env = [("ATOLL_STATE_DIR", state_dir.display().to_string())];
    // The bank's instances sign the calls they make to each other (credits,
    // replication) with a secret of this sandbox; they inherit it from
    // their agents.
    let secret = bank_secret(state_dir)?;
    let instances = Instances::prepare(args.run_as.as_deref(), state_dir, bank, &secret)?;
    let agent_env = [
        ("ATOLL_STATE_DIR", state_dir.display().to_string()),
        ("BANK_SECRET_FILE", secret.display().to_string()),
    ];

    let replicas: Vec<String> = std::iter::once(ports.control)
        .chain(ports.more_controls.iter().copied())
        .enumerate()
        .map(|(i, port)| format!("{scheme}://{}:{port}", replica_host(i)))
        .collect();
    let mut etcd_urls = Vec::new();
    if args.control_replicas > 1 {
        let program = crate::etcd::binary()?;
        let members = crate::etcd::members(
            &host,
            &ports.etcd_clients,
            &ports.etcd_peers,
            state_dir,
            logs,
        );
        eprintln!(
            "starting an etcd cluster of {} members ({})...",
            members.len(),
            program.display()
        );
        for member in members {
            sandbox.children.push(Child::spawn(
                &member.name,
                &program,
                &member.args,
                &member.log,
                &[],
            )?);
            etcd_urls.push(member.client_url);
        }
        for url in &etcd_urls {
            let health = format!("{url}/health");
            wait_for(sandbox, &format!("etcd at {url}"), deadline, || {
                let http = http.clone();
                let health = health.clone();
                async move {
                    match http.get(&health).send().await {
                        Ok(r) => r
                            .text()
                            .await
                            .is_ok_and(|t| t.contains("\"health\":\"true\"")),
                        Err(_) => false,
                    }
                }
            })
            .await?;
        }
    }
    for (i, url) in replicas.iter().enumerate() {
        let listen = url
            .split_once("://")
            .map_or(url.as_str(), |(_, address)| address)
            .to_owned();
        let mut control_args: Vec<String> = vec!["control".into(), "--listen".into(), listen];
        match &pki {
            Some(pki) => {
                let mut hosts = vec![
                    replica_host(i),
                    host.clone(),
                    "127.0.0.1".to_owned(),
                    "localhost".to_owned(),
                ];
                hosts.dedup();
                let id = sandbox_id(
                    atoll_identity::Role::Control,
                    atoll_identity::NO_ZONE,
                    &format!("control-{}", i + 1),
                )?;
                control_args.extend(pki.issue(&id, &hosts)?);
                control_args.extend([
                    "--admin-token-file".into(),
                    pki.admin_token_file.display().to_string(),
                    "--ca-dir".into(),
                    pki.dir.display().to_string(),
                    "--node-cert-lifetime".into(),
                    humantime::format_duration(pki.lifetime).to_string(),
                ]);
            }
            None => control_args.push("--insecure".into()),
        }
        if etcd_urls.is_empty() {
            control_args.extend([
                "--data-dir".into(),
                state_dir.join("control").display().to_string(),
            ]);
            eprintln!("starting the control plane on {url}...");
        } else {
            control_args.extend([
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd_urls.join(","),
                "--advertise".into(),
                url.clone(),
                "--data-dir".into(),
                state_dir
                    .join(format!("control-{}", i + 1))
                    .display()
                    .to_string(),
            ]);
            eprintln!("starting control-plane replica {} on {url}...", i + 1);
        }
        let name = if replicas.len() == 1 {
            "control plane".to_owned()
        } else {
            format!("control plane {}", i + 1)
        };
        let log = if replicas.len() == 1 {
            logs.join("control.log")
        } else {
            logs.join(format!("control-{}.log", i + 1))
        };
        // An isolated replica runs in its namespace: `ip netns exec` execs
        // it, keeping its pid (what a freeze or a kill signals).
        let (program, control_args) = match control_network.as_ref().and_then(|n| n.replicas.get(i))
        {
            Some(replica) => {
                let mut wrapped: Vec<String> = vec![
                    "netns".into(),
                    "exec".into(),
                    replica.netns.clone(),
                    me.display().to_string(),
                ];
                wrapped.extend(control_args);
                (PathBuf::from("ip"), wrapped)
            }
            None => (me.clone(), control_args),
        };
        sandbox
            .children
            .push(Child::spawn(&name, &program, &control_args, &log, &env)?);
    }
    for url in &replicas {
        wait_for(
            sandbox,
            &format!("the control plane at {url}"),
            deadline,
            || {
                let rest = control_rest(url);
                async move {
                    match rest {
                        Ok(rest) => rest
                            .send(reqwest::Method::GET, "/readyz", None)
                            .await
                            .is_ok_and(|r| r.status.is_success()),
                        Err(_) => false,
                    }
                }
            },
        )
        .await?;
    }
    // Everything else takes every replica and moves on when one dies.
    let control_list = replicas.join(",");

    let files = topology(
        ports,
        &instances.bank,
        args.replicas,
        &host,
        instances.run_as.as_deref(),
        pki.is_some(),
    );
    let topology_dir = state_dir.join("topology");
    std::fs::create_dir_all(&topology_dir).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot create {}: {e}", topology_dir.display()),
        )
    })?;
    for (name, content) in &files {
        let path = topology_dir.join(name);
        std::fs::write(&path, content).map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
    }
    eprintln!("loading the topology ({})...", topology_dir.display());
    let request = ApplyRequest {
        manifests: files
            .iter()
            .map(|(name, content)| ManifestFile {
                source: topology_dir.join(name).display().to_string(),
                content: content.clone(),
            })
            .collect(),
        message: Some("atoll up: the sandbox topology".into()),
        ..ApplyRequest::default()
    };
    control_rest(&control)?
        .post::<_, serde_json::Value>("/v1/apply", &request)
        .await
        .map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("the control plane did not take the topology: {e}"),
            )
        })?;

    let global = |args: &mut Vec<String>| {
        args.insert(0, control_list.clone());
        args.insert(0, "--control".into());
    };
    for (i, (zone, ..)) in ZONES.iter().enumerate() {
        let inside = isolation.as_ref().filter(|iso| iso.zone == *zone);
        let agent_host = agent_host(isolation.as_ref(), zone);
        let mut agent_args = vec![
            "agent".into(),
            "--zone".into(),
            (*zone).into(),
            "--state-dir".into(),
            state_dir.join("agents").join(zone).display().to_string(),
            "--gateway-url".into(),
            format!("http://{host}:{}", ports.gateways[i]),
            "--host".into(),
            agent_host.clone(),
            "--admin".into(),
            format!("{agent_host}:{}", ports.agent_admins[i]),
            "--stop-grace".into(),
            "5s".into(),
        ];
        if instances.root {
            agent_args.push("--allow-root-instances".into());
        }
        if let Some(pki) = &pki {
            let id = sandbox_id(atoll_identity::Role::Agent, zone, &format!("agent-{zone}"))?;
            agent_args.extend(pki.issue(&id, &[])?);
        }
        global(&mut agent_args);
        // An isolated zone's agent (and so its instances) runs in the
        // zone's namespace: `ip netns exec` execs it, keeping its pid.
        let (program, agent_args) = match inside {
            Some(iso) => {
                let mut wrapped: Vec<String> = vec![
                    "netns".into(),
                    "exec".into(),
                    iso.netns.clone(),
                    me.display().to_string(),
                ];
                wrapped.extend(agent_args);
                (PathBuf::from("ip"), wrapped)
            }
            None => (me.clone(), agent_args),
        };
        eprintln!(
            "starting the agent of {zone}{}...",
            if inside.is_some() {
                " in its own network namespace"
            } else {
                ""
            }
        );
        sandbox.children.push(Child::spawn(
            &format!("agent {zone}"),
            &program,
            &agent_args,
            &logs.join(format!("agent-{zone}.log")),
            &agent_env,
        )?);
    }
    for (i, (zone, ..)) in ZONES.iter().enumerate() {
        let mut gateway_args = vec![
            "gateway".into(),
            "--name".into(),
            format!("gw-{zone}"),
            "--workers".into(),
            "1".into(),
            "--admin".into(),
            format!("127.0.0.1:{}", ports.gateway_admins[i]),
            "--state-dir".into(),
            state_dir.join("gateways").join(zone).display().to_string(),
        ];
        if let Some(pki) = &pki {
            let id = sandbox_id(atoll_identity::Role::Gateway, zone, &format!("gw-{zone}"))?;
            gateway_args.extend(pki.issue(&id, &[])?);
        }
        global(&mut gateway_args);
        eprintln!(
            "starting the gateway of {zone} on {host}:{}...",
            ports.gateways[i]
        );
        sandbox.children.push(Child::spawn(
            &format!("gateway {zone}"),
            &me,
            &gateway_args,
            &logs.join(format!("gateway-{zone}.log")),
            &env,
        )?);
    }

    for (i, (zone, ..)) in ZONES.iter().enumerate() {
        let url = format!("http://127.0.0.1:{}/readyz", ports.gateway_admins[i]);
        let waited = wait_for(sandbox, &format!("the gateway of {zone}"), deadline, || {
            let http = http.clone();
            let url = url.clone();
            async move {
                http.get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        if let Err(mut error) = waited {
            // What it says, and what it logged last: why it is not ready.
            let said = match http.get(&url).send().await {
                Ok(response) => format!(
                    "{url} answers {}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default().trim()
                ),
                Err(e) => format!("{url} does not answer: {e}"),
            };
            error.details.insert(0, said);
            let log = logs.join(format!("gateway-{zone}.log"));
            if let Some(tail) = last_lines(&log, 8) {
                error
                    .details
                    .insert(1, format!("the end of {}:\n{tail}", log.display()));
            }
            return Err(error);
        }
    }
    eprintln!("waiting for the bank in every cell...");
    wait_for(sandbox, "every cell to be healthy", deadline, || {
        let rest = control_rest(&control);
        async move {
            let Ok(rest) = rest else {
                return false;
            };
            let Ok(body) = rest.get::<serde_json::Value>("/v1/resources/cells").await else {
                return false;
            };
            body["items"].as_array().is_some_and(|items| {
                !items.is_empty()
                    && items.iter().all(|c| {
                        c.pointer("/status/health").and_then(|h| h.as_str()) == Some("Healthy")
                    })
            })
        }
    })
    .await?;
    // End to end: a read for a user of every cell, through every gateway.
    for (i, (zone, ..)) in ZONES.iter().enumerate() {
        for (first, ..) in SHARDS {
            let url = format!(
                "http://{host}:{}/accounts/{}",
                ports.gateways[i],
                1000 + first
            );
            wait_for(
                sandbox,
                &format!("the bank through the gateway of {zone}"),
                deadline,
                || {
                    let http = http.clone();
                    let url = url.clone();
                    async move {
                        http.get(&url)
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                    }
                },
            )
            .await?;
        }
    }
    let ready_seconds = build_finished.elapsed().as_secs_f64();
    let up = UpFile {
        pid: std::process::id(),
        control: control_list.clone(),
        control_replicas: replicas.clone(),
        etcd: etcd_urls,
        state_dir: state_dir.display().to_string(),
        gateways: ZONES
            .iter()
            .enumerate()
            .map(|(i, z)| {
                (
                    z.0.to_owned(),
                    format!("http://{host}:{}", ports.gateways[i]),
                )
            })
            .collect(),
        gateway_admins: ZONES
            .iter()
            .enumerate()
            .map(|(i, z)| {
                (
                    z.0.to_owned(),
                    format!("http://127.0.0.1:{}", ports.gateway_admins[i]),
                )
            })
            .collect(),
        agents: ZONES
            .iter()
            .enumerate()
            .map(|(i, z)| {
                (
                    z.0.to_owned(),
                    format!(
                        "http://{}:{}",
                        agent_host(isolation.as_ref(), z.0),
                        ports.agent_admins[i]
                    ),
                )
            })
            .collect(),
        cells: ZONES
            .iter()
            .map(|z| (z.3.to_owned(), z.0.to_owned()))
            .collect(),
        ready_seconds,
        processes: processes(sandbox),
        isolated: isolation.clone(),
        isolated_control: control_network.clone(),
        ca: pki.as_ref().map(|p| p.ca().display().to_string()),
        admin_token_file: pki
            .as_ref()
            .map(|p| p.admin_token_file.display().to_string()),
        run_as: instances.run_as.clone(),
    };
    write_up_file(state_dir, &up)?;
    Ok(up)
}

/// Where a zone's agent and instances listen: loopback, or with an
/// isolated zone the address of its end of the veth (for that zone) or of
/// the host end (for the others, so the isolated zone reaches them).
fn agent_host(isolation: Option<&crate::netns::Isolation>, zone: &str) -> String {
    match isolation {
        None => "127.0.0.1".into(),
        Some(iso) if iso.zone == zone => iso.zone_address.clone(),
        Some(iso) => iso.host_address.clone(),
    }
}

fn processes(sandbox: &Sandbox) -> BTreeMap<String, u32> {
    sandbox
        .children
        .iter()
        .filter_map(|c| Some((c.name.clone(), c.child.id()?)))
        .collect()
}

/// Writes this sandbox's entry in the state directory's `sandboxes/`, for
/// commands to find it; where, if it could.
fn register(up: &UpFile) -> Option<PathBuf> {
    let state = crate::client::state_dir();
    let others = crate::client::running();
    let dir = atoll_api::discovery::sandboxes_dir(&state);
    let path = dir.join(format!("{}.json", up.pid));
    let entry = atoll_api::discovery::SandboxEntry {
        pid: up.pid,
        control: up.control.clone(),
        state_dir: up.state_dir.clone(),
        ca: up.ca.clone(),
        token_file: up.admin_token_file.clone(),
    };
    let text = serde_json::to_string_pretty(&entry).unwrap_or_default();
    let temporary = path.with_extension("json.tmp");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&temporary, text))
        .and_then(|()| std::fs::rename(&temporary, &path));
    if let Err(error) = written {
        eprintln!(
            "warning: cannot write {} ({error}); other commands need --control {}",
            path.display(),
            up.control
        );
        return None;
    }
    let others: Vec<String> = others
        .iter()
        .filter(|r| r.url != up.control)
        .map(|r| format!("{} ({})", r.url, r.origin))
        .collect();
    if !others.is_empty() {
        eprintln!(
            "note: other control planes run here too: {}; commands without --control will ask which one to use",
            others.join(", ")
        );
    }
    Some(path)
}

/// Writes `up.json` (atomically: tests and tools read it while it changes).
fn write_up_file(state_dir: &Path, up: &UpFile) -> Result<(), CliError> {
    let path = state_dir.join("up.json");
    let temporary = state_dir.join("up.json.tmp");
    let text = serde_json::to_string_pretty(up).unwrap_or_default();
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot write {}: {e}", path.display()),
            )
        })
}

/// The last `count` lines of a file, if it has any.
fn last_lines(path: &Path, count: usize) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return None;
    }
    Some(lines[lines.len().saturating_sub(count)..].join("\n"))
}

/// Polls `check` every 100 ms until it holds, a child dies, or `deadline`.
async fn wait_for<F, Fut>(
    sandbox: &mut Sandbox,
    what: &str,
    deadline: Instant,
    mut check: F,
) -> Result<(), CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return Ok(());
        }
        sandbox.check_children()?;
        if Instant::now() >= deadline {
            let mut error = CliError::new(exit::FAILURE, format!("timed out waiting for {what}"));
            error.details.push(format!(
                "logs are in {}; raise --ready-timeout on a slow machine",
                sandbox.state_dir.join("logs").display()
            ));
            return Err(error);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_summary(
    up: &UpFile,
    ports: &Ports,
    bank: &Path,
    logs: &Path,
    replicas: u32,
    took: Duration,
    temporary: bool,
) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nAtoll is up: 3 cells in 2 regions, ready {:.1}s after the build ({:.1}s in all).\n",
        up.ready_seconds,
        took.as_secs_f64()
    );
    if up.control_replicas.len() > 1 {
        let _ = writeln!(
            out,
            "  control plane  {} replicas on an etcd cluster of {}: {}   (atoll get controlplane, atoll nodes)",
            up.control_replicas.len(),
            up.etcd.len(),
            up.control_replicas.join(" ")
        );
        if let Some(network) = &up.isolated_control {
            let _ = writeln!(
                out,
                "                 each in its own network namespace ({}), joined by bridge {} ({})",
                network
                    .replicas
                    .iter()
                    .map(|r| r.netns.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                network.bridge,
                network.host_address
            );
        }
    } else {
        let _ = writeln!(
            out,
            "  control plane  {}   (atoll get cells, atoll nodes, atoll audit)",
            up.control
        );
    }
    for (i, (zone, _, display, cell)) in ZONES.iter().enumerate() {
        let (first, last, _, standby) = SHARDS[i];
        let _ = writeln!(
            out,
            "  zone {zone:<5}     gateway {:<22} cell {cell} ({display}), shards {first}-{last}, standby {standby}{}",
            up.gateways.get(*zone).cloned().unwrap_or_default(),
            match &up.isolated {
                Some(iso) if iso.zone == *zone => format!(", in network namespace {}", iso.netns),
                _ => String::new(),
            }
        );
    }
    let list = |ports: &[u16; 3]| {
        ports
            .iter()
            .map(|p| format!(":{p}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        out,
        "  admin APIs     gateways {} (/readyz /metrics /config), agents {} (/instances)",
        list(&ports.gateway_admins),
        list(&ports.agent_admins)
    );
    let _ = writeln!(
        out,
        "  bank           {replicas} instances per cell of {}{}",
        bank.display(),
        up.run_as
            .as_ref()
            .map_or_else(String::new, |user| format!(", run as {user}"))
    );
    let _ = writeln!(
        out,
        "  state & logs   {}{}",
        logs.parent().unwrap_or(logs).display(),
        if temporary {
            " (removed on exit; --state-dir keeps them)"
        } else {
            ""
        }
    );
    let gateway = up.gateways.get("hz-a").cloned().unwrap_or_default();
    let far = up.gateways.get("sh-a").cloned().unwrap_or_default();
    let control_flag = if ports.control == 7400 {
        String::new()
    } else {
        format!(" --control {}", up.control)
    };
    let _ = writeln!(
        out,
        "\nTry it (any gateway takes any user; the cell that owns the user answers):"
    );
    let _ = writeln!(
        out,
        "  curl -X POST -H 'Idempotency-Key: dep-1' -d '{{\"amount\": 100}}' {gateway}/accounts/1001/deposit"
    );
    let _ = writeln!(
        out,
        "  curl -X POST -H 'Idempotency-Key: tr-1' -d '{{\"to\": \"1070\", \"amount\": 30}}' {gateway}/accounts/1001/transfer"
    );
    let _ = writeln!(
        out,
        "  curl -i {far}/accounts/1070        # the x-bank-cell header says who answered"
    );
    let _ = writeln!(
        out,
        "  atoll{control_flag} load --duration 30s   # a bank workload with live progress"
    );
    let _ = writeln!(
        out,
        "  atoll{control_flag} get cells         # health of every cell"
    );
    let _ = writeln!(out, "\nPress Ctrl-C to stop everything.");
    println!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_topology_is_valid() {
        let ports = pick_ports(0, 1).expect("ports");
        let files = topology(
            &ports,
            Path::new("/opt/atoll/atoll-bank"),
            2,
            "127.0.0.1",
            Some("nobody"),
            true,
        );
        let mut located = Vec::new();
        for (name, content) in &files {
            let parsed = atoll_model::load(name, content).expect("parses");
            located.extend(parsed);
        }
        atoll_model::validate(&located).expect("valid");
        assert_eq!(
            located.len(),
            2 + 3 + 3 + 2 + 3 + 3,
            "regions, zones, cells, sharding, bank, gateways"
        );
    }

    #[test]
    fn replicas_take_ports_of_their_own() {
        let ports = pick_ports(0, 3).expect("ports");
        assert_eq!(ports.more_controls.len(), 2);
        assert_eq!((ports.etcd_clients.len(), ports.etcd_peers.len()), (3, 3));
        let mut all: Vec<u16> = [ports.control]
            .into_iter()
            .chain(ports.more_controls.iter().copied())
            .chain(ports.etcd_clients.iter().copied())
            .chain(ports.etcd_peers.iter().copied())
            .chain(ports.gateways)
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 12, "no port twice");
        let single = pick_ports(0, 1).expect("ports");
        assert!(single.more_controls.is_empty() && single.etcd_clients.is_empty());
        assert!(parse_control_replicas("2").is_err());
        assert_eq!(parse_control_replicas("5"), Ok(5));
    }

    #[test]
    fn a_port_in_use_is_named_with_the_flag_to_change_it() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let error = pick_ports(port, 1).expect_err("in use");
        assert!(
            error
                .message
                .contains(&format!("port {port} (the control plane) is in use")),
            "{}",
            error.message
        );
        assert!(
            error.details[0].contains("--port-base"),
            "{:?}",
            error.details
        );
    }
}
