//! Atoll's zone agent (`atoll agent --zone Z`).
//!
//! The agent connects out to the control plane over the config stream (the
//! control plane holds no credentials for the zone), works out which
//! instances of which App resources belong in its zone, runs them through a
//! [`Runtime`] driver, restarts them with backoff when they exit, checks
//! their health, and reports them as the zone's Endpoints resources (on the
//! config stream's service, as the principal `agent/<zone>`), which
//! the gateways route to. Its config stream is its heartbeat: the control
//! plane marks the zone's cells unhealthy when the agent is gone.
//!
//! `docs/agent.md` is the user's guide; `docs/design/cells.md` the design.

mod credentials;
pub mod runtime;
mod supervisor;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use atoll_api::config::config_stream_client::ConfigStreamClient;
use atoll_model::{
    AppSpec, EndpointsSpec, HealthCheck, Kind, Metadata, ReportedEndpoint, Resource, Spec,
};
use atoll_node::{Installer, NodeClient, NodeConfig, NodeOptions, NodeStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::runtime::{InstanceSpec, LocalRuntime, Runtime};
use crate::supervisor::Board;

/// How often an agent heartbeats: a second, so that the control plane's
/// emergency plan can tell a silent zone within its `lostAfter`.
pub const AGENT_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
pub use crate::supervisor::InstanceState;

/// How an agent is set up.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Control plane URL.
    pub control: String,
    /// The zone it runs.
    pub zone: String,
    /// The workspace whose apps it runs in the zone (empty: `default`).
    pub workspace: String,
    /// Its node name (unique), `agent-<zone>` by default.
    pub name: String,
    /// Where instance data, logs and the config cache live.
    pub state_dir: PathBuf,
    /// The address instances listen on and are reported at.
    pub host: String,
    /// The zone's gateway URL, given to instances as `ATOLL_GATEWAY_URL`.
    pub gateway: Option<String>,
    /// How long a stopping instance gets before SIGKILL.
    pub stop_grace: Duration,
    /// Where to serve `/healthz` and `/instances`, if anywhere.
    pub admin: Option<SocketAddr>,
    /// How to reach the control plane (TLS material for `https://` URLs).
    pub transport: atoll_transport::Transport,
    /// Whether instances may run as root (a zone's `runAs: root`, or none
    /// named while the agent runs as root); logged at every such start.
    pub allow_root_instances: bool,
}

/// What the zone should run, from one config version.
#[derive(Clone, Debug, Default, PartialEq)]
struct Desired {
    version: u64,
    /// The zone's region; none when the zone does not exist (yet).
    region: Option<String>,
    /// The zone's `runAs`.
    run_as: Option<String>,
    /// App name -> (spec, cells of this zone it runs in).
    apps: BTreeMap<String, (AppSpec, Vec<String>)>,
    /// Endpoints resources this zone reported before.
    reported: BTreeSet<String>,
}

struct DesiredInstaller {
    zone: String,
    desired: watch::Sender<Desired>,
}

impl Installer for DesiredInstaller {
    fn install(&self, config: &NodeConfig) -> Result<(), String> {
        config.validate()?;
        let mut desired = Desired {
            version: config.version,
            ..Desired::default()
        };
        let mut cells = BTreeSet::new();
        for resource in &config.resources {
            match &resource.spec {
                Spec::Zone(zone) if resource.name() == self.zone => {
                    desired.region = Some(zone.region.clone());
                    desired.run_as.clone_from(&zone.run_as);
                }
                Spec::Cell(cell) if cell.zone == self.zone => {
                    cells.insert(resource.name().to_owned());
                }
                Spec::Endpoints(endpoints) if endpoints.zone == self.zone => {
                    desired.reported.insert(resource.name().to_owned());
                }
                _ => {}
            }
        }
        for resource in &config.resources {
            if let Spec::App(app) = &resource.spec {
                let here: Vec<String> = app
                    .cells
                    .iter()
                    .filter(|c| cells.contains(*c))
                    .cloned()
                    .collect();
                if !here.is_empty() {
                    desired
                        .apps
                        .insert(resource.name().to_owned(), (app.clone(), here));
                }
            }
        }
        if desired.region.is_none() {
            tracing::warn!(zone = %self.zone, version = config.version, "zone `{}` is not defined; running nothing until it is", self.zone);
        }
        self.desired.send_replace(desired);
        Ok(())
    }
}

/// What a report says about the zone's instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    /// As they are.
    Running,
    /// Listed, none ready: the agent is about to stop them.
    Draining,
    /// None: the agent stopped them.
    Stopped,
}

/// A supervised instance.
struct Running {
    spec: InstanceSpec,
    check: Option<HealthCheck>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The agent of one zone.
pub struct Agent<R: Runtime> {
    options: AgentOptions,
    runtime: Arc<R>,
    board: Arc<Board>,
    status: Arc<NodeStatus>,
    client: Option<NodeClient>,
    desired: watch::Receiver<Desired>,
    /// Channels for endpoint reports, one per replica.
    reports: atoll_transport::Channels,
    /// Certificates of the instances, when the agent has one itself.
    credentials: Option<Arc<credentials::Credentials>>,
    /// Keeps the zone's ready instances in the service registry (started
    /// by `run`).
    registrar: Option<atoll_registry::client::Registrar>,
    /// The program run as `<program> sidecar` beside instances of Apps
    /// with `mesh: sidecar`: the agent's own `atoll`.
    sidecar_program: PathBuf,
}

impl<R: Runtime> std::fmt::Debug for Agent<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Agent<R> {
    /// An agent for `options.zone` with `runtime`.
    pub fn new(options: AgentOptions, runtime: R) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.state_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", options.state_dir.display()))?;
        let (sender, desired) = watch::channel(Desired::default());
        let mut client = NodeClient::new(
            NodeOptions {
                control: options.control.clone(),
                name: options.name.clone(),
                role: "agent".into(),
                zone: options.zone.clone(),
                cell: String::new(),
                workspace: options.workspace.clone(),
                cache: Some(options.state_dir.join("config-cache.json")),
                transport: options.transport.clone(),
            },
            Arc::new(DesiredInstaller {
                zone: options.zone.clone(),
                desired: sender,
            }),
        );
        client.set_heartbeat(AGENT_HEARTBEAT);
        let status = client.status();
        let reports = options.transport.channels(atoll_transport::ChannelOptions {
            connect_timeout: Some(Duration::from_secs(2)),
            timeout: Some(Duration::from_secs(10)),
            keepalive: None,
        });
        let credentials = credentials::Credentials::new(&options).map(Arc::new);
        Ok(Self {
            reports,
            credentials,
            registrar: None,
            sidecar_program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("atoll")),
            options,
            runtime: Arc::new(runtime),
            board: Arc::new(Board::default()),
            status,
            client: Some(client),
            desired,
        })
    }

    /// The config stream's status.
    pub fn status(&self) -> Arc<NodeStatus> {
        self.status.clone()
    }

    /// Runs until `shutdown` turns true, then stops every instance and
    /// reports them gone.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        if let Some(admin) = self.options.admin {
            let listener = tokio::net::TcpListener::bind(admin).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot serve the agent's admin API on {admin}: {e}; pick another with --admin"
                )
            })?;
            let board = self.board.clone();
            let status = self.status.clone();
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                let app = admin_router(board, status);
                let _ = axum_serve(listener, app, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            });
        }
        // Instance certificates are renewed with a third of their life left,
        // whether the instance runs or waits to start again.
        if let Some(credentials) = self.credentials.clone() {
            let board = self.board.clone();
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let names: Vec<String> = board.states.lock().keys().cloned().collect();
                    for name in names {
                        if let Err(error) = credentials.ensure(&name).await {
                            tracing::warn!(instance = %name, %error, "cannot renew the instance's certificate yet");
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            });
        }
        // Instances survive a control plane outage: the cached config runs
        // them at once, and nothing stops while the stream is down.
        if let Some(client) = self.client.take() {
            client.load_cache();
            tokio::spawn(client.run(shutdown.clone()));
        }
        match atoll_transport::ControlUrls::parse(&self.options.control) {
            Ok(urls) => {
                self.registrar = Some(atoll_registry::client::Registrar::start(
                    self.reports.clone(),
                    urls,
                    atoll_api::registry::Registrant {
                        name: self.options.name.clone(),
                        role: "agent".into(),
                        zone: self.options.zone.clone(),
                        workspace: self.options.workspace.clone(),
                    },
                    atoll_registry::DEFAULT_TTL,
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "not registering instances in the service registry")
            }
        }
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut stopping: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
        let mut ports: BTreeMap<String, Vec<(String, u16)>> = BTreeMap::new();
        let mut reported: BTreeMap<String, EndpointsSpec> = BTreeMap::new();
        let mut report_failed = false;
        let mut shutdown_rx = shutdown.clone();
        let mut desired = self.desired.clone();
        loop {
            let plan = desired.borrow_and_update().clone();
            self.reconcile(&plan, &mut running, &mut stopping, &mut ports, &shutdown);
            match self
                .report(&plan, &running, &mut reported, Report::Running)
                .await
            {
                Ok(()) => report_failed = false,
                Err(e) => {
                    if !report_failed {
                        tracing::warn!("cannot report endpoints yet: {e:#}");
                    }
                    report_failed = true;
                }
            }
            let retry = if report_failed {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(30)
            };
            tokio::select! {
                _ = desired.changed() => {}
                () = self.board.changed.notified() => {
                    // Let a burst of changes settle into one report.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                () = tokio::time::sleep(retry) => {}
                _ = shutdown_rx.wait_for(|s| *s) => break,
            }
        }
        tracing::info!(
            instances = running.len(),
            "agent stopping: taking its instances out of rotation, then stopping them"
        );
        let plan = self.desired.borrow().clone();
        // Out of rotation first, so gateways stop sending before SIGTERM.
        let draining = self.report(&plan, &running, &mut reported, Report::Draining);
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(3), draining).await {
            tracing::warn!("cannot report this zone's instances draining: {e:#}");
        }
        for instance in running.values() {
            let _ = instance.stop.send(true);
        }
        let mut tasks: Vec<JoinHandle<()>> = std::mem::take(&mut running)
            .into_values()
            .map(|r| r.task)
            .collect();
        tasks.extend(std::mem::take(&mut stopping).into_values());
        for task in tasks {
            let _ = task.await;
        }
        let none = BTreeMap::new();
        let final_report = self.report(&plan, &none, &mut reported, Report::Stopped);
        match tokio::time::timeout(Duration::from_secs(3), final_report).await {
            Ok(Ok(())) => tracing::info!("reported this zone's instances stopped"),
            Ok(Err(e)) => tracing::warn!("cannot report this zone's instances stopped: {e:#}"),
            Err(_) => tracing::warn!("the control plane did not take the final report in 3s"),
        }
        if let Some(registrar) = self.registrar.take() {
            registrar.close().await;
        }
        Ok(())
    }

    /// Starts what is missing, stops what is no longer wanted, replaces
    /// what changed.
    fn reconcile(
        &self,
        plan: &Desired,
        running: &mut BTreeMap<String, Running>,
        stopping: &mut BTreeMap<String, JoinHandle<()>>,
        ports: &mut BTreeMap<String, Vec<(String, u16)>>,
        shutdown: &watch::Receiver<bool>,
    ) {
        let mut taken: std::collections::HashSet<u16> =
            ports.values().flatten().map(|(_, port)| *port).collect();
        let mut pick = || {
            let port = free_port(&taken);
            taken.insert(port);
            port
        };
        let mut wanted: BTreeMap<String, (InstanceSpec, Option<HealthCheck>)> = BTreeMap::new();
        let run_as = runtime::RunAs::of_zone(
            &self.options.zone,
            plan.run_as.as_deref(),
            self.options.allow_root_instances,
        );
        if let Some(region) = &plan.region {
            for (app, (spec, cells)) in &plan.apps {
                for cell in cells {
                    for replica in 0..spec.replicas {
                        let name = format!("{app}-{cell}-{replica}");
                        // The App's ports, then the sidecar's (inbound,
                        // outbound, admin) when it has one.
                        let sidecar = spec.mesh == Some(atoll_model::MeshMode::Sidecar);
                        let wanted_ports = spec.ports.len() + if sidecar { 4 } else { 0 };
                        let assigned = ports.entry(name.clone()).or_default();
                        // A port that became fixed (or changed) in the App wins.
                        for (slot, port) in assigned.iter_mut().zip(&spec.ports) {
                            if let Some(fixed) = port.port {
                                slot.1 = fixed;
                            }
                            slot.0.clone_from(&port.name);
                        }
                        assigned.truncate(wanted_ports);
                        while assigned.len() < wanted_ports {
                            let next = assigned.len();
                            let slot = match spec.ports.get(next) {
                                Some(port) => {
                                    (port.name.clone(), port.port.unwrap_or_else(&mut pick))
                                }
                                None => (
                                    [
                                        "sidecar-inbound",
                                        "sidecar-outbound",
                                        "sidecar-admin",
                                        "sidecar-outbound-bolt",
                                    ][next - spec.ports.len()]
                                    .to_owned(),
                                    pick(),
                                ),
                            };
                            assigned.push(slot);
                        }
                        let mut app_ports = assigned.clone();
                        let sidecar_ports = app_ports.split_off(spec.ports.len());
                        let mut instance =
                            self.instance_spec(app, spec, cell, region, replica, app_ports);
                        if let [(_, inbound), (_, outbound), (_, admin), (_, bolt)] =
                            sidecar_ports[..]
                        {
                            instance.env.insert(
                                "ATOLL_SIDECAR_URL".into(),
                                format!("http://127.0.0.1:{outbound}"),
                            );
                            instance
                                .env
                                .insert("ATOLL_SIDECAR_BOLT".into(), format!("127.0.0.1:{bolt}"));
                            instance.sidecar = Some(runtime::SidecarSpec {
                                program: self.sidecar_program.clone(),
                                inbound,
                                outbound,
                                admin,
                                outbound_bolt: bolt,
                                protocol: spec.protocol.as_str().to_owned(),
                                calls: Vec::new(),
                                log: self
                                    .options
                                    .state_dir
                                    .join("logs")
                                    .join(format!("{name}.sidecar.log")),
                            });
                        }
                        instance.run_as = run_as.clone();
                        wanted.insert(name, (instance, spec.health_check.clone()));
                    }
                }
            }
        }
        // Instances that finished stopping: forget those no longer wanted.
        let finished: Vec<String> = stopping
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(name, _)| name.clone())
            .collect();
        for name in finished {
            stopping.remove(&name);
            if !wanted.contains_key(&name) && !running.contains_key(&name) {
                self.board.states.lock().remove(&name);
                if let Some(credentials) = &self.credentials {
                    credentials.forget(&name);
                }
                self.board.changed.notify_one();
            }
        }
        // Stop what is gone or changed.
        let stale: Vec<String> = running
            .iter()
            .filter(|(name, r)| {
                wanted
                    .get(*name)
                    .is_none_or(|(spec, check)| *spec != r.spec || *check != r.check)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(instance) = running.remove(&name) {
                tracing::info!(instance = %name, "instance no longer wanted as it runs; stopping it");
                let _ = instance.stop.send(true);
                stopping.insert(name, instance.task);
            }
        }
        ports.retain(|name, _| wanted.contains_key(name));
        // Start what is missing.
        for (name, (spec, check)) in wanted {
            // A replacement starts once its predecessor has stopped (it
            // holds the port); the stop's end wakes this loop again.
            if running.contains_key(&name) || stopping.contains_key(&name) {
                continue;
            }
            self.board.states.lock().insert(
                name.clone(),
                InstanceState {
                    name: name.clone(),
                    app: spec.app.clone(),
                    cell: spec.cell.clone(),
                    address: spec.address(),
                    log: spec.log.display().to_string(),
                    ..InstanceState::default()
                },
            );
            self.board.changed.notify_one();
            let (stop, stopped) = watch::channel(*shutdown.borrow());
            let supervised = supervisor::supervise(
                self.runtime.clone(),
                spec.clone(),
                check.clone(),
                self.board.clone(),
                stopped,
                self.options.stop_grace,
            );
            let board = self.board.clone();
            let credentials = self.credentials.clone();
            let mut waiting = stop.subscribe();
            let spec_name = spec.name.clone();
            let owner = match &spec.run_as {
                runtime::RunAs::User(user) => Some((user.uid, user.gid)),
                _ => None,
            };
            let task = tokio::spawn(async move {
                // An instance of a TLS control plane starts with its
                // certificate, or not at all (it could not renew its lease).
                if let Some(credentials) = credentials {
                    credentials.own(&spec_name, owner);
                    let mut backoff = Duration::from_millis(200);
                    while let Err(error) = credentials.ensure(&spec_name).await {
                        tracing::error!(instance = %spec_name, %error, "cannot start the instance without its certificate; trying again");
                        board.update(&spec_name, |s| s.last_exit = Some(error.clone()));
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            _ = waiting.wait_for(|s| *s) => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
                supervised.await;
                board.changed.notify_one();
            });
            running.insert(
                name,
                Running {
                    spec,
                    check,
                    stop,
                    task,
                },
            );
        }
    }

    fn instance_spec(
        &self,
        app: &str,
        spec: &AppSpec,
        cell: &str,
        region: &str,
        replica: u32,
        ports: Vec<(String, u16)>,
    ) -> InstanceSpec {
        let name = format!("{app}-{cell}-{replica}");
        let data_dir = self.options.state_dir.join("cells").join(cell).join(app);
        let mut env = spec.env.clone();
        let mut set = |key: &str, value: String| {
            env.insert(key.to_owned(), value);
        };
        set("ATOLL_APP", app.to_owned());
        set("ATOLL_SERVICE", spec.service.clone());
        set("ATOLL_CELL", cell.to_owned());
        set("ATOLL_ZONE", self.options.zone.clone());
        if !self.options.workspace.is_empty() {
            set("ATOLL_WORKSPACE", self.options.workspace.clone());
        }
        set("ATOLL_REGION", region.to_owned());
        set("ATOLL_INSTANCE", name.clone());
        set("ATOLL_REPLICA", replica.to_string());
        set("ATOLL_HOST", self.options.host.clone());
        set("ATOLL_CONTROL", self.options.control.clone());
        if let Some(credentials) = &self.credentials {
            let files = credentials.files(&name);
            for (key, path) in [
                ("ATOLL_CA", files.ca),
                ("ATOLL_CERT", files.cert),
                ("ATOLL_KEY", files.key),
            ] {
                if let Some(path) = path {
                    set(key, path.display().to_string());
                }
            }
        }
        set("ATOLL_DATA_DIR", data_dir.display().to_string());
        if let Some(gateway) = &self.options.gateway {
            set("ATOLL_GATEWAY_URL", gateway.clone());
        }
        if let Some(version) = &spec.version {
            set("ATOLL_VERSION", version.clone());
        }
        if let Some((_, port)) = ports.first() {
            set("ATOLL_PORT", port.to_string());
        }
        for (port_name, port) in &ports {
            set(
                &format!(
                    "ATOLL_PORT_{}",
                    port_name.to_ascii_uppercase().replace('-', "_")
                ),
                port.to_string(),
            );
        }
        InstanceSpec {
            log: self
                .options
                .state_dir
                .join("logs")
                .join(format!("{name}.log")),
            name,
            app: app.to_owned(),
            service: spec.service.clone(),
            cell: cell.to_owned(),
            zone: self.options.zone.clone(),
            region: region.to_owned(),
            replica,
            command: spec.command.clone(),
            image: spec.image.clone(),
            env,
            ports,
            host: self.options.host.clone(),
            passage: vec![
                self.options.state_dir.clone(),
                self.options.state_dir.join("cells"),
                self.options.state_dir.join("cells").join(cell),
                self.options.state_dir.join("credentials"),
            ],
            data_dir,
            run_as: runtime::RunAs::Agent,
            protocol: spec.protocol.as_str().to_owned(),
            sidecar: None,
        }
    }

    /// Writes the zone's Endpoints resources when they differ from what was
    /// last reported (and deletes those of apps gone from the zone).
    async fn report(
        &self,
        plan: &Desired,
        running: &BTreeMap<String, Running>,
        reported: &mut BTreeMap<String, EndpointsSpec>,
        mode: Report,
    ) -> anyhow::Result<()> {
        let zone = &self.options.zone;
        let states = self.board.states.lock().clone();
        let mut current: BTreeMap<String, EndpointsSpec> = BTreeMap::new();
        for (app, (spec, _)) in &plan.apps {
            let mut endpoints: Vec<ReportedEndpoint> = running
                .values()
                .filter(|r| r.spec.app == *app)
                .map(|r| ReportedEndpoint {
                    cell: r.spec.cell.clone(),
                    address: r.spec.served_at(),
                    instance: r.spec.name.clone(),
                    ready: states.get(&r.spec.name).is_some_and(|s| s.ready),
                    labels: spec
                        .version
                        .iter()
                        .map(|v| ("version".to_owned(), v.clone()))
                        .collect(),
                })
                .collect();
            endpoints.sort_by(|a, b| a.instance.cmp(&b.instance));
            current.insert(
                format!("{app}-{zone}"),
                EndpointsSpec {
                    service: spec.service.clone(),
                    zone: zone.clone(),
                    endpoints,
                },
            );
        }
        match mode {
            Report::Running => {}
            Report::Draining => {
                for spec in current.values_mut() {
                    for endpoint in &mut spec.endpoints {
                        endpoint.ready = false;
                    }
                }
            }
            Report::Stopped => {
                for (name, spec) in reported.iter() {
                    current
                        .entry(name.clone())
                        .or_insert_with(|| EndpointsSpec {
                            endpoints: Vec::new(),
                            ..spec.clone()
                        });
                }
                for spec in current.values_mut() {
                    spec.endpoints.clear();
                }
            }
        }
        self.register(&current, running);
        let changed: Vec<(&String, &EndpointsSpec)> = current
            .iter()
            .filter(|(name, spec)| reported.get(*name) != Some(*spec))
            .collect();
        // Delete only what the control plane has (a delete of something
        // already gone would fail the whole report).
        let gone: Vec<String> = if mode == Report::Running {
            plan.reported
                .iter()
                .filter(|name| !current.contains_key(*name))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        reported.retain(|name, _| current.contains_key(name) || plan.reported.contains(name));
        if changed.is_empty() && gone.is_empty() {
            return Ok(());
        }
        let mut endpoints = Vec::new();
        for (name, spec) in &changed {
            let resource = Resource {
                metadata: Metadata {
                    name: (*name).clone(),
                    workspace: (!self.options.workspace.is_empty())
                        .then(|| self.options.workspace.clone()),
                    labels: BTreeMap::from([(
                        "atoll.dev/reported-by".to_owned(),
                        format!("agent-{zone}"),
                    )]),
                    annotations: BTreeMap::new(),
                    resource_version: None,
                },
                spec: Spec::Endpoints((*spec).clone()),
            };
            endpoints.push(atoll_api::config::Resource {
                kind: Kind::Endpoints.as_str().to_owned(),
                name: (*name).clone(),
                resource_version: 0,
                json: serde_json::to_vec(&resource)?.into(),
            });
        }
        let ready: usize = current
            .values()
            .map(|s| s.endpoints.iter().filter(|e| e.ready).count())
            .sum();
        let total: usize = current.values().map(|s| s.endpoints.len()).sum();
        let request = atoll_api::config::EndpointsReport {
            node: Some(atoll_api::config::NodeIdentity {
                // Its own name: over TLS, the name in its certificate.
                name: self.options.name.clone(),
                role: "agent".into(),
                zone: zone.clone(),
                cell: String::new(),
                workspace: self.options.workspace.clone(),
            }),
            endpoints,
            gone: gone.clone(),
            message: format!("agent {zone}: {ready} of {total} instances ready"),
        };
        // On the config stream's service, not the user's apply path: any
        // replica takes it (a follower passes it on to the leader); one
        // that does not answer is left for the next.
        let urls = atoll_transport::ControlUrls::parse(&self.options.control)
            .map_err(anyhow::Error::msg)?;
        let mut attempt = 0;
        loop {
            let url = urls.current().to_owned();
            let channel = self.reports.to(&url).map_err(anyhow::Error::msg)?;
            let mut client = ConfigStreamClient::new(channel);
            match client.report_endpoints(request.clone()).await {
                Ok(_) => break,
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    urls.failed(&url);
                    attempt += 1;
                    if attempt >= urls.all().len() {
                        anyhow::bail!("{url}: {}", status.message());
                    }
                }
                Err(status) => {
                    anyhow::bail!("{url} refused the report: {}", status.message())
                }
            }
        }
        tracing::info!(ready, total, "reported endpoints");
        for (name, spec) in changed {
            reported.insert(name.clone(), spec.clone());
        }
        for name in gone {
            reported.remove(&name);
        }
        Ok(())
    }
}

impl<R: Runtime> Agent<R> {
    /// Keeps the ready instances of `current` in the service registry; the
    /// others (starting, failing their check, draining, stopped) out.
    fn register(
        &self,
        current: &BTreeMap<String, EndpointsSpec>,
        running: &BTreeMap<String, Running>,
    ) {
        let Some(registrar) = &self.registrar else {
            return;
        };
        let mut instances = Vec::new();
        for spec in current.values() {
            for endpoint in spec.endpoints.iter().filter(|e| e.ready) {
                let Some(instance) = running.get(&endpoint.instance) else {
                    continue;
                };
                // A sidecar registers its instance itself (at its inbound
                // address, once it can serve).
                if instance.spec.sidecar.is_some() {
                    continue;
                }
                instances.push(atoll_api::registry::Instance {
                    service: spec.service.clone(),
                    name: endpoint.instance.clone(),
                    zone: spec.zone.clone(),
                    cell: endpoint.cell.clone(),
                    address: instance.spec.host.clone(),
                    port: u32::from(instance.spec.ports.first().map_or(0, |p| p.1)),
                    protocol: instance.spec.protocol.clone(),
                    version: endpoint.labels.get("version").cloned().unwrap_or_default(),
                    labels: endpoint.labels.clone().into_iter().collect(),
                    ..atoll_api::registry::Instance::default()
                });
            }
        }
        registrar.set(instances);
    }
}

/// A port that is free now (the kernel's pick), not among `taken`.
fn free_port(taken: &std::collections::HashSet<u16>) -> u16 {
    let mut last = 0;
    for _ in 0..64 {
        if let Ok(port) = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
        {
            last = port;
            if port != 0 && !taken.contains(&port) {
                return port;
            }
        }
    }
    last
}

fn admin_router(board: Arc<Board>, status: Arc<NodeStatus>) -> axum::Router {
    use axum::routing::get;
    let states = board.clone();
    axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let status = status.clone();
                async move {
                    if status.has_config() {
                        (axum::http::StatusCode::OK, "ok\n")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "no configuration yet\n",
                        )
                    }
                }
            }),
        )
        .route(
            "/instances",
            get(move || {
                let board = states.clone();
                async move {
                    let list: Vec<InstanceState> = board.states.lock().values().cloned().collect();
                    axum::Json(list)
                }
            }),
        )
}

async fn axum_serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}
