//! `atoll drill`: a switchover or a fault under a bank workload, with a
//! steady-state probe, automatic abort, and a report: RTO, RPO, failed
//! requests by class, fence window, switchover time, and the zero-loss
//! checker's verdict (docs/drills.md).
//!
//! The workload is `atoll load --history` (a child process, so the drill
//! measures what any client sees); the probe writes to a user of a moving
//! shard every 50 ms and notes which cell answered; the fault acts on the
//! processes of a local sandbox (`atoll up`), found through its `up.json`.
//! A drill finds the sandbox of the control plane it talks to by itself,
//! keeps its history in the sandbox's state directory, shows its progress
//! (phase, req/s, errors, the probe) on stderr as it runs, and ends by
//! saying how to put the shard map back (`--restore` does it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_api::rest::{ListResponse, SwitchoverPlan, SwitchoverRequest};
use atoll_model::{
    Resource, Spec, SwitchoverMode, SwitchoverPhase, SwitchoverSpec, decode_resource,
};
use clap::{Args, Subcommand, ValueEnum};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;

use crate::client::{CliError, Client, exit, segment};
use crate::output::Format;

#[derive(Debug, Args)]
pub(crate) struct DrillArgs {
    #[command(subcommand)]
    kind: DrillKind,
}

#[derive(Debug, Subcommand)]
enum DrillKind {
    /// A planned switchover under load (it aborts itself if it does not
    /// complete within --deadline).
    Switchover(SwitchoverDrill),
    /// Lose a cell under load and watch its emergency plan fail it over.
    Fault(FaultDrill),
    /// Take the control plane's leader out under load (a sandbox of `atoll up
    /// --control-replicas 3`), optionally in the middle of a planned
    /// switchover, and watch another replica take over.
    ControlPlane(ControlPlaneDrill),
}

#[derive(Debug, Args)]
struct Common {
    /// Requests per second of the workload.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// How long the workload runs in all.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    duration: Duration,
    /// When, after the workload starts, the switchover or fault begins.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    start_after: Duration,
    /// Steady state: give up (abort the switchover, end the fault) when the
    /// new owner does not serve the probe within this long of the start.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    deadline: Duration,
    /// Keep the workload's history here [default: drills/ in the sandbox's
    /// state directory].
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
    /// The sandbox's state directory (its `up.json`) [default: the sandbox
    /// of the control plane the drill talks to, found by itself].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Afterwards, move the shards back to the cells that owned them before
    /// (a planned switchover per former owner, once the workload is over).
    #[arg(long)]
    restore: bool,
    /// Report format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
struct SwitchoverDrill {
    /// Move every shard this cell owns.
    #[arg(long, value_name = "CELL")]
    from: Option<String>,
    /// Move these shards, e.g. 0-49.
    #[arg(long, value_name = "RANGE")]
    shards: Option<String>,
    /// The new owner [default: each shard's standby].
    #[arg(long, value_name = "CELL")]
    to: Option<String>,
    /// Kill the control plane (SIGKILL) while the switchover runs; the
    /// sandbox starts it again and it must resume.
    #[arg(long)]
    kill_control_plane: bool,
    /// Where switchovers need a second person's approval: a held approval
    /// of these very moves (`atoll switchover start --hold`, approved by
    /// someone else), used when the switchover starts.
    #[arg(long, value_name = "ID")]
    approval: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Fault {
    /// SIGSTOP the cell's agent and instances: alive but silent, as behind
    /// a partition (SIGCONT at the end).
    Freeze,
    /// SIGKILL them, and keep the sandbox from starting them again until
    /// the end.
    Kill,
    /// Cut the cell's zone off the network (needs `atoll up --isolate-zone
    /// ZONE`): its processes run on and would write if they could.
    Partition,
}

#[derive(Debug, Args)]
struct FaultDrill {
    /// The cell to lose.
    #[arg(long, value_name = "CELL")]
    cell: String,
    /// How to lose it.
    #[arg(long, value_enum, default_value_t = Fault::Freeze)]
    fault: Fault,
    /// How long the cell stays lost [default: until its failover completed,
    /// plus 2 s].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    hold: Option<Duration>,
    /// Also kill the control plane's leader (SIGKILL) right after the cell
    /// is lost (a replicated sandbox): the replica elected next watches the
    /// cell for a full `lostAfter` itself, then fails it over, once.
    #[arg(long)]
    kill_control_plane: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LeaderFault {
    /// SIGKILL the leader (`atoll up` starts it again, as a follower).
    Kill,
    /// SIGSTOP the leader for --hold, then SIGCONT it: it must find itself
    /// deposed and change nothing.
    Freeze,
    /// Cut the leader off the network for --hold (needs `atoll up
    /// --isolate-control`): it runs on, on its own clock, reaching neither
    /// etcd nor any node; it must stop acting before its election lease
    /// can expire, and change nothing once joined again.
    Partition,
}

impl LeaderFault {
    fn name(self) -> &'static str {
        match self {
            LeaderFault::Kill => "kill",
            LeaderFault::Freeze => "freeze",
            LeaderFault::Partition => "partition",
        }
    }
}

#[derive(Debug, Args)]
struct ControlPlaneDrill {
    /// How to take the leader out.
    #[arg(long, value_enum, default_value_t = LeaderFault::Kill)]
    fault: LeaderFault,
    /// With --fault freeze or partition: how long the leader stays frozen
    /// or cut off (longer than the election TTL, so that another replica
    /// is elected meanwhile).
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    hold: Duration,
    /// Take the leader out in the middle of a planned switchover of every
    /// shard this cell owns.
    #[arg(long, value_name = "CELL")]
    from: Option<String>,
    /// ... or of these shards, e.g. 0-49.
    #[arg(long, value_name = "RANGE")]
    shards: Option<String>,
    /// The switchover's new owner [default: each shard's standby].
    #[arg(long, value_name = "CELL")]
    to: Option<String>,
    /// Take the leader out once the switchover reaches this phase
    /// [default: right after it starts].
    #[arg(long, value_enum, value_name = "PHASE")]
    at: Option<AtPhase>,
    #[command(flatten)]
    common: Common,
}

/// A phase of a switchover at which to take the leader out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AtPhase {
    Pending,
    Fence,
    FenceBarrier,
    SyncGate,
    Flip,
    FlipBarrier,
    Unfence,
}

impl AtPhase {
    fn phase(self) -> SwitchoverPhase {
        match self {
            AtPhase::Pending => SwitchoverPhase::Pending,
            AtPhase::Fence => SwitchoverPhase::Fence,
            AtPhase::FenceBarrier => SwitchoverPhase::FenceBarrier,
            AtPhase::SyncGate => SwitchoverPhase::SyncGate,
            AtPhase::Flip => SwitchoverPhase::Flip,
            AtPhase::FlipBarrier => SwitchoverPhase::FlipBarrier,
            AtPhase::Unfence => SwitchoverPhase::Unfence,
        }
    }
}

/// What a control-plane drill measured.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct LeaderChange {
    fault: String,
    /// The leader taken out, and its term.
    old_leader: String,
    old_term: i64,
    /// The replica that led next, and its term.
    new_leader: Option<String>,
    new_term: Option<i64>,
    /// Fault to another replica leading (serving /v1/leader as the leader), ms.
    leaderless_ms: Option<u64>,
    /// The switchover's phase when the leader was taken out.
    #[serde(skip_serializing_if = "Option::is_none")]
    phase_at_fault: Option<String>,
    /// Fault to the switchover's next phase (the new leader carried on), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    went_on_ms: Option<u64>,
    /// The replica taken out, once back (thawed, or started again by
    /// `atoll up`): `follower`, or `leader` when it claims its old term.
    #[serde(skip_serializing_if = "Option::is_none")]
    returned_role: Option<String>,
    /// Fault to the replica answering again, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    returned_ms: Option<u64>,
    /// After a freeze or a partition: the writes the replica tried that
    /// the store refused because another replica had been elected
    /// (`atoll_control_fenced_writes_total`).
    #[serde(skip_serializing_if = "Option::is_none")]
    deposed_writes_refused: Option<u64>,
}

/// The drill's report.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    drill: String,
    /// Completed, aborted (by the drill or the control plane), or failed.
    outcome: String,
    switchover: Option<String>,
    phase: Option<String>,
    /// Fault (or switchover start) to the first probe write served by the
    /// new owner, in ms.
    rto_ms: Option<u64>,
    /// For a failover: when the control plane declared the cell lost, ms
    /// after the fault.
    detected_ms: Option<u64>,
    /// Detection to completion of the failover, ms.
    failover_ms: Option<u64>,
    /// Fence to unfence, from the Switchover's timeline, ms.
    fence_window_ms: Option<u64>,
    /// The whole switchover, ms.
    switchover_ms: Option<u64>,
    /// With replicas, after the leader was killed: how long no replica
    /// led (kill to another replica elected and serving), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    leaderless_ms: Option<u64>,
    /// A fault drill: the failover Switchovers of the lost cell (one).
    #[serde(skip_serializing_if = "Option::is_none")]
    failovers: Option<usize>,
    /// A control-plane drill: the leader change.
    #[serde(skip_serializing_if = "Option::is_none")]
    leader_change: Option<LeaderChange>,
    /// The Switchover's phases with their durations, in order.
    phases: Vec<String>,
    /// Log positions the failover reported unreplicated.
    rpo_positions: i64,
    /// Shards they concern.
    rpo_shards: Vec<u32>,
    /// Acknowledged writes the checker found lost.
    lost_acknowledged_writes: u64,
    /// The probe: writes tried, failed, and failures by class.
    probe_writes: u64,
    probe_failures: u64,
    probe_failures_by_class: std::collections::BTreeMap<String, u64>,
    /// Successful probe writes by the cell that answered.
    probe_served_by: std::collections::BTreeMap<String, u64>,
    /// The workload's summary (`atoll load -o json`): requests, errors by
    /// cause, failed operations, latency, and the checker's report.
    workload: Value,
    /// Whether the checker found nothing wrong.
    clean: bool,
    history: String,
    /// Commands that put the shard map back as it was before the drill.
    restore_commands: Vec<String>,
    /// With --restore: how moving the shards back ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    restored: Option<String>,
    notes: Vec<String>,
}

/// What the probe saw.
#[derive(Debug, Default)]
struct Probe {
    writes: u64,
    failures: u64,
    by_class: std::collections::BTreeMap<String, u64>,
    /// First success from the target after `armed`.
    served_by_target: Option<Instant>,
    /// Successful writes by answering cell.
    by_cell: std::collections::BTreeMap<String, u64>,
    /// The cell that answered the last successful write.
    last_cell: Option<String>,
}

pub(crate) async fn run(client: &Client, args: DrillArgs) -> Result<u8, CliError> {
    match args.kind {
        DrillKind::Switchover(drill) => switchover(client, drill).await,
        DrillKind::Fault(drill) => fault(client, drill).await,
        DrillKind::ControlPlane(drill) => control_plane(client, drill).await,
    }
}

/// Where the drill keeps its files, and whether a sandbox runs there.
#[derive(Debug)]
struct Place {
    state_dir: PathBuf,
    /// Its `up.json` exists: a sandbox's processes can be acted on.
    sandbox: bool,
}

/// The sandbox of the control plane the drill talks to: `--state-dir`, else
/// the running `atoll up` whose control plane it is, else the state
/// directory's own `up.json`; without one, the state directory.
fn locate(client: &Client, common: &Common) -> Place {
    let has_up = |dir: &Path| dir.join("up.json").is_file();
    if let Some(dir) = &common.state_dir {
        return Place {
            sandbox: has_up(dir),
            state_dir: dir.clone(),
        };
    }
    let home = crate::client::state_dir();
    let url = client.url();
    if let Some((entry, _)) = crate::client::sandboxes(&home)
        .into_iter()
        .find(|(entry, _)| is_replica(&entry.control, url))
    {
        let dir = PathBuf::from(entry.state_dir);
        return Place {
            sandbox: has_up(&dir),
            state_dir: dir,
        };
    }
    let own = std::fs::read_to_string(home.join("up.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|up| up["control"].as_str().is_some_and(|c| is_replica(c, url)));
    Place {
        sandbox: own,
        state_dir: home,
    }
}

/// Whether `url` is one of the replicas of a sandbox's `control` (one URL,
/// or every replica's, comma-separated).
fn is_replica(control: &str, url: &str) -> bool {
    crate::client::normalize(control)
        .split(',')
        .any(|r| r == url)
}

fn history_path(common: &Common, place: &Place, kind: &str) -> PathBuf {
    common.history.clone().unwrap_or_else(|| {
        let dir = place.state_dir.join("drills");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!(
            "{kind}-{}.jsonl",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ))
    })
}

/// What the progress line shows, updated by the drill's parts.
#[derive(Debug, Default)]
struct Live {
    phase: String,
    tick: Option<crate::load::Tick>,
    /// What the workload says it does when it is not sending (reading
    /// balances first, settling, checking).
    workload_note: Option<String>,
    /// When the switchover or fault starts (for the countdown a phase
    /// shows where it says `{countdown}`).
    starts_at: Option<Instant>,
}

/// Wakes the progress printer at a phase change.
static PHASE_CHANGED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Prints the progress once a second on stderr (in place on a terminal;
/// elsewhere every 5 s and at every phase change) until `stop`.
fn start_progress(
    live: Arc<Mutex<Live>>,
    probe: Arc<Mutex<Probe>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    use std::io::{IsTerminal as _, Write as _};
    tokio::spawn(async move {
        let terminal = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut last_phase = String::new();
        let mut ticks = 0u64;
        let mut next_tick = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let timed = tokio::select! {
                () = tokio::time::sleep_until(next_tick) => true,
                () = PHASE_CHANGED.notified() => false,
                _ = stop.changed() => break,
            };
            if timed {
                ticks += 1;
                next_tick += Duration::from_secs(1);
            }
            let (phase, tick, note) = {
                let live = live.lock();
                (
                    live.phase.clone(),
                    live.tick.clone(),
                    live.workload_note.clone(),
                )
            };
            if !timed && (terminal || phase == last_phase) {
                continue;
            }
            let (writes, failures, last_cell) = {
                let p = probe.lock();
                (p.writes, p.failures, p.last_cell.clone())
            };
            // A countdown reads better than a phase set seconds ago.
            let phase = match phase.split_once("{countdown}") {
                Some((before, after)) => {
                    let left = live.lock().starts_at.map_or(0, |at| {
                        at.saturating_duration_since(Instant::now()).as_secs()
                    });
                    format!("{before}{left}s{after}")
                }
                None => phase,
            };
            let load = match (note, tick) {
                (Some(note), _) => note,
                (None, Some(t)) => format!(
                    "{:>5.0} req/s  errors {}  retries {}",
                    t.req_per_sec, t.errors, t.retries
                ),
                (None, None) => "workload starting".to_owned(),
            };
            let line = format!(
                "{:>4}s  {phase:<40} {load}  probe {writes} writes, {failures} failed{}",
                started.elapsed().as_secs(),
                last_cell.map_or_else(String::new, |cell| format!(", last answered by {cell}"))
            );
            if terminal {
                eprint!("\r\x1b[2K{line}");
            } else if phase != last_phase || (timed && ticks.is_multiple_of(5)) {
                eprintln!("{line}");
            }
            last_phase = phase;
            let _ = std::io::stderr().flush();
        }
        if terminal {
            eprintln!();
        }
    })
}

fn set_phase(live: &Mutex<Live>, phase: impl Into<String>) {
    let phase = phase.into();
    let mut live = live.lock();
    if live.phase != phase {
        live.phase = phase;
        PHASE_CHANGED.notify_one();
    }
}

/// Starts `atoll load --history` for the drill.
fn start_load(
    client: &Client,
    common: &Common,
    history: &Path,
    live: &Arc<Mutex<Live>>,
) -> Result<tokio::process::Child, CliError> {
    let me = std::env::current_exe()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot locate this program: {e}")))?;
    let mut command = tokio::process::Command::new(me);
    command
        .args([
            "--control",
            client.urls(),
            "load",
            "--output",
            "json",
            "--rate",
        ])
        .arg(common.rate.to_string())
        // Enough workers that the rate holds while requests are slow (a
        // fence hold, a debug build on a busy machine): each worker is
        // paced at concurrency / rate, so 16 workers at 250/s fell behind
        // as soon as requests took over 64 ms.
        .arg("--concurrency")
        .arg((common.rate / 5).max(16).to_string())
        .arg("--duration")
        .arg(format!("{}ms", common.duration.as_millis()))
        .arg("--history")
        .arg(history)
        .args(["--progress", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot start the workload: {e}")))?;
    // Its progress, one JSON object a second, for the drill's own line.
    if let Some(stderr) = child.stderr.take() {
        let live = live.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<crate::load::Tick>(&line) {
                    Ok(tick) => {
                        let mut live = live.lock();
                        live.tick = Some(tick);
                        live.workload_note = None;
                    }
                    Err(_) if !line.trim().is_empty() => {
                        // What the workload does before and after sending
                        // (reading balances, settling, checking).
                        live.lock().workload_note = Some(format!(
                            "workload: {}",
                            line.trim().chars().take(70).collect::<String>()
                        ));
                    }
                    Err(_) => {}
                }
            }
        });
    }
    Ok(child)
}

async fn finish_load(child: tokio::process::Child, report: &mut Report) {
    match child.wait_with_output().await {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout);
            // The summary is the last JSON document on stdout.
            let start = text.find('{').unwrap_or(0);
            report.workload = serde_json::from_str(&text[start..]).unwrap_or(Value::Null);
            if report.workload.is_null() {
                report.notes.push(format!(
                    "the workload ended with {} and no summary",
                    output.status
                ));
            }
        }
        Err(e) => report.notes.push(format!("the workload: {e}")),
    }
    let check = &report.workload["check"];
    report.clean = check["clean"].as_bool().unwrap_or(false);
    report.lost_acknowledged_writes = check["anomalies"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["kind"].as_str() == Some("lostWrite"))
                .count() as u64
        })
        .unwrap_or(0);
}

/// Writes to `user` every 50 ms through `gateway`, noting who answers.
fn start_probe(
    gateway: String,
    user: String,
    target: String,
    armed: Arc<Mutex<Option<Instant>>>,
    probe: Arc<Mutex<Probe>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .unwrap_or_default();
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut n = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            n += 1;
            let url = format!("{gateway}/accounts/{user}/deposit");
            let answer = http
                .post(&url)
                .header("idempotency-key", format!("drill-probe-{run}-{n}"))
                .json(&serde_json::json!({"amount": 1}))
                .send()
                .await;
            // Ok(cell) or Err(class), decided before taking the lock.
            let result: Result<String, String> = match answer {
                Ok(response) if response.status().is_success() => Ok(response
                    .headers()
                    .get("x-bank-cell")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()),
                Ok(response) => {
                    let status = response.status().as_u16();
                    let code = response
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|b| b["error"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    Err(format!("{status} {code}").trim().to_owned())
                }
                Err(e) if e.is_timeout() => Err("timeout".into()),
                Err(_) => Err("connection".into()),
            };
            {
                let mut p = probe.lock();
                p.writes += 1;
                match result {
                    Ok(cell) => {
                        *p.by_cell.entry(cell.clone()).or_default() += 1;
                        p.last_cell = Some(cell.clone());
                        if cell == target && p.served_by_target.is_none() && armed.lock().is_some()
                        {
                            p.served_by_target = Some(Instant::now());
                        }
                    }
                    Err(class) => {
                        p.failures += 1;
                        *p.by_class.entry(class).or_default() += 1;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn first_gateway(client: &Client) -> Result<String, CliError> {
    let list: ListResponse = client.get("/v1/resources/gateways").await?;
    list.items
        .iter()
        .find_map(crate::load::client_url)
        .ok_or_else(|| {
            CliError::new(
                exit::FAILURE,
                "no Gateway advertises an address; the drill sends through a gateway",
            )
        })
}

async fn switchovers(client: &Client) -> Result<Vec<(Resource, SwitchoverSpec)>, CliError> {
    let list: ListResponse = client.get("/v1/resources/switchovers").await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|v| decode_resource(v).ok())
        .filter_map(|r| match &r.spec {
            Spec::Switchover(s) => {
                let s = s.clone();
                Some((r, s))
            }
            _ => None,
        })
        .collect())
}

async fn switchover_named(client: &Client, name: &str) -> Option<SwitchoverSpec> {
    let value: Value = client
        .get(&format!("/v1/resources/switchovers/{}", segment(name)))
        .await
        .ok()?;
    match decode_resource(value).ok()?.spec {
        Spec::Switchover(s) => Some(s),
        _ => None,
    }
}

/// Fills the report from a finished Switchover.
fn describe(report: &mut Report, name: &str, spec: &SwitchoverSpec) {
    report.switchover = Some(name.to_owned());
    report.phase = Some(spec.phase.to_string());
    report.phases = spec
        .timeline
        .iter()
        .map(|r| match r.millis {
            Some(ms) => format!("{} {ms} ms", r.phase),
            None => r.phase.to_string(),
        })
        .collect();
    report.switchover_ms = Some(spec.timeline.iter().filter_map(|r| r.millis).sum());
    let fenced = spec
        .timeline
        .iter()
        .skip_while(|r| r.phase != SwitchoverPhase::Fence)
        .take_while(|r| {
            r.phase != SwitchoverPhase::Completed && r.phase != SwitchoverPhase::Aborted
        });
    let window: u64 = fenced.filter_map(|r| r.millis).sum();
    report.fence_window_ms = (window > 0).then_some(window);
    report.rpo_positions = spec
        .unreplicated
        .iter()
        .map(|p| (p.written - p.acknowledged).max(0))
        .sum();
    report.rpo_shards = spec.unreplicated.iter().map(|p| p.shard).collect();
    report.outcome = match spec.phase {
        SwitchoverPhase::Completed => "completed".into(),
        SwitchoverPhase::Aborted => {
            format!("aborted: {}", spec.message.clone().unwrap_or_default())
        }
        other => format!("stopped in {other}"),
    };
}

/// A probe user in `shard` (the sandbox's rule takes the last two digits).
fn probe_user(shard: u32) -> String {
    format!("9{:06}{:02}", std::process::id() % 1_000_000, shard % 100)
}

async fn switchover(client: &Client, drill: SwitchoverDrill) -> Result<u8, CliError> {
    let common = &drill.common;
    let place = locate(client, common);
    let history = history_path(common, &place, "switchover");
    let mut report = Report {
        drill: "switchover".into(),
        history: history.display().to_string(),
        ..Report::default()
    };
    let request = SwitchoverRequest {
        from: drill.from.clone(),
        shards: drill.shards.clone(),
        to: drill.to.clone(),
        reason: Some("atoll drill".into()),
        approval: drill.approval.clone(),
        ..SwitchoverRequest::default()
    };
    // The plan first: a drill that cannot start should not load anything
    // (a held approval is checked here, and used when it starts).
    let plan: SwitchoverPlan = client
        .post(
            "/v1/switchovers",
            &SwitchoverRequest {
                dry_run: true,
                ..request.clone()
            },
        )
        .await?;
    if let Some(rule) = &plan.needs_approval {
        let mut flags = Vec::new();
        for (flag, value) in [
            ("--from", &drill.from),
            ("--shards", &drill.shards),
            ("--to", &drill.to),
        ] {
            if let Some(value) = value {
                flags.push(format!("{flag} {value}"));
            }
        }
        return Err(CliError::new(
            exit::AWAITING_APPROVAL,
            format!(
                "{rule}s need a second person's approval here, and a drill cannot wait for one mid-run: ask for it first with `atoll switchover start --hold {}`, have someone else approve it (`atoll approval approve ID`), then run the drill with --approval ID",
                flags.join(" ")
            ),
        ));
    }
    let first = &plan.moves[0];
    let shard: u32 = first["shards"]
        .as_str()
        .and_then(|s| s.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let target = first["to"].as_str().unwrap_or_default().to_owned();
    if drill.kill_control_plane && !place.sandbox {
        return Err(no_sandbox(client, &place));
    }
    let gateway = first_gateway(client).await?;
    let moves = crate::switchover::moves_text(&plan);
    report.drill = format!("switchover of {moves}");
    eprintln!(
        "atoll drill switchover: {moves}, under {} req/s for {} (history {})",
        common.rate,
        humantime::format_duration(common.duration),
        history.display()
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let armed = Arc::new(Mutex::new(None));
    let probe = Arc::new(Mutex::new(Probe::default()));
    let live = Arc::new(Mutex::new(Live {
        starts_at: Some(Instant::now() + common.start_after),
        ..Live::default()
    }));
    set_phase(&live, "warming up: switchover in {countdown}");
    let load = start_load(client, common, &history, &live)?;
    let prober = start_probe(
        gateway,
        probe_user(shard),
        target,
        armed.clone(),
        probe.clone(),
        stopped.clone(),
    );
    let progress = start_progress(live.clone(), probe.clone(), stopped);
    tokio::time::sleep(common.start_after).await;
    let started = Instant::now();
    *armed.lock() = Some(started);
    let plan: SwitchoverPlan = client.post("/v1/switchovers", &request).await?;
    set_phase(&live, format!("switchover {}: pending", plan.name));
    if drill.kill_control_plane {
        kill_control_plane(client, &place, &mut report).await;
    }
    let spec = wait_final(
        client,
        &plan.name,
        started + common.deadline,
        true,
        &mut report,
        &live,
    )
    .await;
    set_phase(&live, "steady state after the switchover");
    // The probe goes on while the workload runs: the steady state after
    // the switchover counts too.
    finish_load(load, &mut report).await;
    let _ = stop.send(true);
    let _ = prober.await;
    let _ = progress.await;
    if let Some(spec) = &spec {
        describe(&mut report, &plan.name, spec);
        if spec.phase == SwitchoverPhase::Completed {
            report.restore_commands = restore_commands(spec);
            if common.restore {
                report.restored = Some(restore(client, spec, &mut report).await);
            }
        }
    }
    finish_probe(&mut report, &probe, started);
    print_report(&report, common.output);
    Ok(code(&report))
}

/// The planned switchovers that give the moved shards back to the cells
/// that owned them before: one per former owner and range.
fn restore_requests(spec: &SwitchoverSpec) -> Vec<SwitchoverRequest> {
    spec.moves
        .iter()
        .map(|m| SwitchoverRequest {
            shard_map: Some(spec.shard_map.clone()),
            shards: Some(m.shards.to_string()),
            to: Some(m.from.clone()),
            reason: Some("atoll drill --restore: the shards go back".into()),
            ..SwitchoverRequest::default()
        })
        .collect()
}

fn restore_commands(spec: &SwitchoverSpec) -> Vec<String> {
    restore_requests(spec)
        .iter()
        .map(|r| {
            format!(
                "atoll switchover start --shards {} --to {}",
                r.shards.as_deref().unwrap_or_default(),
                r.to.as_deref().unwrap_or_default()
            )
        })
        .collect()
}

/// After a failover: makes the lost cell the standby of the shards it
/// lost again, then moves them back once it has caught up.
async fn restore_after_failover(
    client: &Client,
    spec: &SwitchoverSpec,
    stood_by: &[atoll_model::ShardRange],
    report: &mut Report,
) -> String {
    let path = format!("/v1/resources/shardmaps/{}", segment(&spec.shard_map));
    let mut map: Value = match client.get(&path).await {
        Ok(map) => map,
        Err(error) => return format!("not restored: {}", error.message),
    };
    let mut changed = false;
    if let Some(assignments) = map["spec"]["assignments"].as_array_mut() {
        let lost = spec
            .moves
            .first()
            .map(|m| m.from.clone())
            .unwrap_or_default();
        for assignment in assignments {
            let Some(range) = assignment_range(assignment) else {
                continue;
            };
            let inside = |outer: &atoll_model::ShardRange| {
                range.start >= outer.start && range.end <= outer.end
            };
            let moved = spec
                .moves
                .iter()
                .any(|m| inside(&m.shards) && assignment["cell"].as_str() == Some(m.to.as_str()));
            if moved || stood_by.iter().any(inside) {
                assignment["standby"] = Value::String(lost.clone());
                changed = true;
            }
        }
    }
    if changed {
        eprintln!("restoring: the lost cells stand by for their shards again...");
        let request = atoll_api::rest::ApplyRequest {
            manifests: vec![atoll_api::rest::ManifestFile {
                source: format!("shardmap/{} (atoll drill --restore)", spec.shard_map),
                content: map.to_string(),
            }],
            message: Some("atoll drill --restore: the lost cells stand by again".into()),
            ..atoll_api::rest::ApplyRequest::default()
        };
        if let Err(error) = client
            .post::<_, atoll_api::rest::ApplyResponse>("/v1/apply", &request)
            .await
        {
            return format!("not restored: {}", error.message);
        }
    }
    restore_with(client, spec, report, Some("60s".into())).await
}

/// The shard range of an assignment (`"0-33"`, or a single shard).
fn assignment_range(assignment: &Value) -> Option<atoll_model::ShardRange> {
    assignment["shards"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| assignment["shards"].as_u64().map(|n| n.to_string()))
        .and_then(|text| text.parse().ok())
}

/// Moves the shards back, one switchover after the other; how it ended.
async fn restore(client: &Client, spec: &SwitchoverSpec, report: &mut Report) -> String {
    restore_with(client, spec, report, None).await
}

async fn restore_with(
    client: &Client,
    spec: &SwitchoverSpec,
    report: &mut Report,
    sync_timeout: Option<String>,
) -> String {
    for mut request in restore_requests(spec) {
        request.sync_timeout = sync_timeout.clone();
        eprintln!(
            "restoring: shards {} back to {}...",
            request.shards.as_deref().unwrap_or_default(),
            request.to.as_deref().unwrap_or_default()
        );
        let plan: SwitchoverPlan = match client.post("/v1/switchovers", &request).await {
            Ok(plan) => plan,
            Err(error) => return format!("not restored: {}", error.message),
        };
        let live = Mutex::new(Live::default());
        let deadline = Instant::now() + Duration::from_secs(90);
        match wait_final(client, &plan.name, deadline, false, report, &live).await {
            Some(done) if done.phase == SwitchoverPhase::Completed => {}
            Some(done) => {
                return format!(
                    "not restored: switchover/{} ended {}: {}",
                    plan.name,
                    done.phase,
                    done.message.unwrap_or_default()
                );
            }
            None => return format!("not restored: switchover/{} did not finish", plan.name),
        }
    }
    "completed".into()
}

fn no_sandbox(client: &Client, place: &Place) -> CliError {
    let mut error = CliError::new(
        exit::FAILURE,
        format!(
            "this drill acts on the processes of a local sandbox, and none runs for the control plane at {}",
            client.url()
        ),
    );
    error.details.push(format!(
        "start one with `atoll up` (it registers itself in {}), or give its --state-dir",
        crate::client::state_dir().display()
    ));
    if !place.state_dir.as_os_str().is_empty() {
        error
            .details
            .push(format!("looked in {}", place.state_dir.display()));
    }
    error
}

/// SIGKILLs the sandbox's control plane (it is started again by `atoll
/// up`); with replicas, the leader, and measures how long none led.
async fn kill_control_plane(client: &Client, place: &Place, report: &mut Report) {
    let replicas: Vec<String> = up_file(place)
        .ok()
        .and_then(|up| serde_json::from_value(up["controlReplicas"].clone()).ok())
        .unwrap_or_default();
    let leader: Option<atoll_api::rest::LeaderResponse> = if replicas.len() > 1 {
        client.get("/v1/leader").await.ok()
    } else {
        None
    };
    let (process, what) = match leader
        .as_ref()
        .and_then(|l| l.leader.as_ref())
        .and_then(|url| replicas.iter().position(|r| r == url).map(|i| (i, url)))
    {
        Some((i, url)) => (
            format!("control plane {}", i + 1),
            format!(
                "the leader ({url}, term {})",
                leader.as_ref().and_then(|l| l.term).unwrap_or(0)
            ),
        ),
        None => ("control plane".to_owned(), "the control plane".to_owned()),
    };
    match sandbox_pid(place, &process) {
        Ok(pid) => {
            let killed = Instant::now();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            report
                .notes
                .push(format!("killed {what} (pid {pid}) right after the start"));
            let Some(old_term) = leader.and_then(|l| l.leader.and(l.term)) else {
                return;
            };
            // A leader of a later term leads (the client moves past the
            // dead replica). It may be the one killed, started again by
            // `atoll up` and elected: a URL says nothing, a term does.
            while killed.elapsed() < Duration::from_secs(30) {
                if let Ok(view) = client
                    .get::<atoll_api::rest::LeaderResponse>("/v1/leader")
                    .await
                    && new_leader(&view, old_term).is_some()
                {
                    let took = u64::try_from(killed.elapsed().as_millis()).unwrap_or(u64::MAX);
                    report.leaderless_ms = Some(took);
                    report.notes.push(format!(
                        "{} leads after {took} ms (term {})",
                        view.leader.unwrap_or_default(),
                        view.term.unwrap_or(0)
                    ));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            report
                .notes
                .push("no other replica led within 30 s of the kill".into());
        }
        Err(e) => report
            .notes
            .push(format!("could not kill the control plane: {}", e.message)),
    }
}

/// The leader `view` names when its term is later than `old_term`: a new
/// election was won, by whichever replica (a replica killed and started
/// again keeps its URL; a term is never reused).
fn new_leader(view: &atoll_api::rest::LeaderResponse, old_term: i64) -> Option<String> {
    view.leader
        .clone()
        .filter(|_| view.term.is_some_and(|term| term > old_term))
}

fn up_file(place: &Place) -> Result<Value, CliError> {
    let path = place.state_dir.join("up.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!(
                "cannot read {} ({e}): a fault drill acts on a local sandbox (atoll up); start one, or give its --state-dir",
                path.display()
            ),
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", path.display())))
}

fn sandbox_pid(place: &Place, process: &str) -> Result<i32, CliError> {
    let up = up_file(place)?;
    up["processes"][process]
        .as_u64()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| {
            CliError::new(
                exit::FAILURE,
                format!("up.json names no process `{process}`"),
            )
        })
}

/// Polls until the switchover is final or `deadline`; at the deadline,
/// aborts it (before its flip) when `abort`.
async fn wait_final(
    client: &Client,
    name: &str,
    deadline: Instant,
    abort: bool,
    report: &mut Report,
    live: &Mutex<Live>,
) -> Option<SwitchoverSpec> {
    let mut aborted = false;
    loop {
        // The control plane may be restarting: errors are retried.
        if let Some(spec) = switchover_named(client, name).await {
            set_phase(live, format!("switchover {name}: {}", spec.phase));
            if spec.phase.is_final() {
                return Some(spec);
            }
            if Instant::now() >= deadline && !aborted {
                if abort && !spec.phase.flipped() {
                    report.notes.push(format!(
                        "steady state lost: not completed within the deadline; aborting in {}",
                        spec.phase
                    ));
                    let _: Result<Value, _> = client
                        .post(
                            &format!("/v1/switchovers/{}/abort", segment(name)),
                            &serde_json::json!({}),
                        )
                        .await;
                    aborted = true;
                } else {
                    report.notes.push(format!(
                        "not completed within the deadline ({})",
                        spec.phase
                    ));
                    return Some(spec);
                }
            }
        }
        if Instant::now() >= deadline + Duration::from_secs(30) {
            report
                .notes
                .push("gave up waiting for the switchover".into());
            return switchover_named(client, name).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn finish_probe(report: &mut Report, probe: &Mutex<Probe>, started: Instant) {
    let p = probe.lock();
    report.probe_writes = p.writes;
    report.probe_failures = p.failures;
    report.probe_failures_by_class = p.by_class.clone();
    report.probe_served_by = p.by_cell.clone();
    report.rto_ms = p
        .served_by_target
        .map(|t| u64::try_from(t.duration_since(started).as_millis()).unwrap_or(u64::MAX));
}

async fn fault(client: &Client, drill: FaultDrill) -> Result<u8, CliError> {
    let common = &drill.common;
    let place = locate(client, common);
    if !place.sandbox {
        return Err(no_sandbox(client, &place));
    }
    let history = history_path(common, &place, "fault");
    let mut report = Report {
        drill: format!("fault ({:?}) of {}", drill.fault, drill.cell).to_lowercase(),
        history: history.display().to_string(),
        ..Report::default()
    };
    // Where the cell's shards go: their standby in the current map.
    let maps: ListResponse = client.get("/v1/resources/shardmaps").await?;
    let assignments: Vec<&Value> = maps
        .items
        .iter()
        .filter_map(|m| m["spec"]["assignments"].as_array())
        .flatten()
        .collect();
    let (shard, target) = assignments
        .iter()
        .find(|a| a["cell"].as_str() == Some(drill.cell.as_str()))
        .and_then(|a| {
            Some((
                assignment_range(a)?.start,
                a["standby"].as_str()?.to_owned(),
            ))
        })
        .ok_or_else(|| {
            CliError::new(
                exit::FAILURE,
                format!(
                    "cell {} owns no shard with a standby: nothing would fail over",
                    drill.cell
                ),
            )
        })?;
    // The ranges the cell stands by for now: the failover gives them
    // another standby, and putting the map back gives them this one again.
    let stood_by: Vec<atoll_model::ShardRange> = assignments
        .iter()
        .filter(|a| a["standby"].as_str() == Some(drill.cell.as_str()))
        .filter_map(|a| assignment_range(a))
        .collect();
    let up = up_file(&place)?;
    let zone = up["cells"][&drill.cell]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| {
            CliError::new(
                exit::FAILURE,
                format!("the sandbox has no cell {}", drill.cell),
            )
        })?;
    let agent_name = format!("agent {zone}");
    let gateway = first_gateway(client).await?;
    let known: std::collections::HashSet<String> = switchovers(client)
        .await?
        .into_iter()
        .map(|(r, _)| r.name().to_owned())
        .collect();
    eprintln!(
        "atoll drill fault: {:?} {} under {} req/s for {} (history {})",
        drill.fault,
        drill.cell,
        common.rate,
        humantime::format_duration(common.duration),
        history.display()
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let armed = Arc::new(Mutex::new(None));
    let probe = Arc::new(Mutex::new(Probe::default()));
    let live = Arc::new(Mutex::new(Live {
        starts_at: Some(Instant::now() + common.start_after),
        ..Live::default()
    }));
    set_phase(&live, "warming up: fault in {countdown}");
    let load = start_load(client, common, &history, &live)?;
    let prober = start_probe(
        gateway,
        probe_user(shard),
        target.clone(),
        armed.clone(),
        probe.clone(),
        stopped.clone(),
    );
    let progress = start_progress(live.clone(), probe.clone(), stopped);
    tokio::time::sleep(common.start_after).await;

    // The cell's processes: its zone's agent and the instances it runs.
    let agent = sandbox_pid(&place, &agent_name)?;
    let admin = up["agents"][&zone].as_str().unwrap_or_default().to_owned();
    let listed = match reqwest::get(format!("{admin}/instances")).await {
        Ok(response) => response.json::<Value>().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let instances: Vec<i32> = listed
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|i| i["cell"].as_str() == Some(drill.cell.as_str()))
                .filter_map(|i| i["process"].as_str()?.strip_prefix("pid ")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut pids = vec![agent];
    pids.extend(&instances);
    let hold = place.state_dir.join("hold");
    let isolation: Option<crate::netns::Isolation> =
        serde_json::from_value(up["isolated"].clone()).ok();
    if drill.fault == Fault::Partition && isolation.as_ref().is_none_or(|i| i.zone != zone) {
        let _ = stop.send(true);
        return Err(CliError::new(
            exit::FAILURE,
            format!(
                "zone {zone} of {} is not in its own network namespace: start the sandbox with `atoll up --isolate-zone {zone}`",
                drill.cell
            ),
        ));
    }
    let started = Instant::now();
    *armed.lock() = Some(started);
    set_phase(
        &live,
        format!("{} lost: waiting for its emergency plan", drill.cell),
    );
    match (&drill.fault, &isolation) {
        (Fault::Partition, Some(isolation)) => {
            isolation.partition()?;
            report.notes.push(format!(
                "cut zone {zone} off the network ({} down; its agent and instances run on)",
                isolation.host_interface
            ));
        }
        (fault, _) => {
            let signal = if *fault == Fault::Kill {
                // Keep `atoll up` from starting the agent again meanwhile.
                let _ = std::fs::create_dir_all(&hold);
                let _ = std::fs::write(hold.join(&agent_name), "held by atoll drill\n");
                nix::sys::signal::Signal::SIGKILL
            } else {
                nix::sys::signal::Signal::SIGSTOP
            };
            for pid in &pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
            }
            report.notes.push(format!(
                "{} {} (agent pid {agent}, instances {:?})",
                if *fault == Fault::Kill {
                    "killed"
                } else {
                    "froze"
                },
                drill.cell,
                instances
            ));
        }
    }

    if drill.kill_control_plane {
        kill_control_plane(client, &place, &mut report).await;
    }
    // The emergency plan's Switchover.
    let mut found: Option<(String, Instant)> = None;
    let deadline = started + common.deadline;
    while found.is_none() && Instant::now() < deadline {
        if let Ok(list) = switchovers(client).await {
            found = list
                .into_iter()
                .find(|(r, s)| {
                    !known.contains(r.name())
                        && s.mode == SwitchoverMode::Failover
                        && s.moves.iter().any(|m| m.from == drill.cell)
                })
                .map(|(r, _)| (r.name().to_owned(), Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spec = match &found {
        Some((name, seen)) => {
            report.detected_ms =
                Some(u64::try_from(seen.duration_since(started).as_millis()).unwrap_or(0));
            let spec = wait_final(client, name, deadline, false, &mut report, &live).await;
            if let Some(s) = &spec
                && s.phase.is_final()
            {
                report.failover_ms = Some(u64::try_from(seen.elapsed().as_millis()).unwrap_or(0));
            }
            spec
        }
        None => {
            report.notes.push(format!(
                "no failover within {} of the fault: is there an emergency plan (ShardMap.spec.failover)?",
                humantime::format_duration(common.deadline)
            ));
            None
        }
    };
    // Hold the fault a little longer, then end it.
    let hold_for = drill.hold.unwrap_or(Duration::from_secs(2));
    let until = if drill.hold.is_some() {
        started + hold_for
    } else {
        Instant::now() + hold_for
    };
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    match drill.fault {
        Fault::Freeze => {
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
        }
        Fault::Kill => {
            let _ = std::fs::remove_file(hold.join(&agent_name));
        }
        Fault::Partition => {
            if let Some(isolation) = &isolation
                && let Err(e) = isolation.heal()
            {
                report
                    .notes
                    .push(format!("could not join the zone again: {}", e.message));
            }
        }
    }
    report.notes.push(format!(
        "ended the fault after {} ms",
        started.elapsed().as_millis()
    ));
    set_phase(&live, format!("{} back; steady state", drill.cell));
    // The probe goes on while the workload runs: the steady state after
    // the switchover counts too.
    finish_load(load, &mut report).await;
    let _ = stop.send(true);
    let _ = prober.await;
    let _ = progress.await;
    // One failover of the cell, whoever led meanwhile.
    let failovers = switchovers(client).await.map(|list| {
        list.into_iter()
            .filter(|(r, s)| {
                !known.contains(r.name())
                    && s.mode == SwitchoverMode::Failover
                    && s.moves.iter().any(|m| m.from == drill.cell)
            })
            .count()
    });
    report.failovers = failovers.as_ref().ok().copied();
    if let (Some((name, _)), Some(spec)) = (&found, &spec) {
        describe(&mut report, name, spec);
        if let Ok(n @ 2..) = failovers {
            report.outcome = format!("{} was failed over {n} times", drill.cell);
        }
        if report.rpo_positions > 0 && report.lost_acknowledged_writes == 0 && report.clean {
            report.notes.push(
                "the unreplicated positions were writes the lost cell had committed but not yet answered (its replication is synchronous): their clients retried them at the new owner, and the checker found no acknowledged write lost".into(),
            );
        }
        if spec.phase == SwitchoverPhase::Completed {
            // The lost cell is the standby of none of them now: it must be
            // again, and catch up, before they can move back.
            let mut ranges: Vec<String> = spec.moves.iter().map(|m| m.shards.to_string()).collect();
            ranges.extend(stood_by.iter().map(ToString::to_string));
            report.restore_commands = vec![format!(
                "atoll get shardmap {} -o yaml > map.yaml   # then set `standby: {}` on shards {} (those it owned and those it stood by for), and `atoll apply -f map.yaml`",
                spec.shard_map,
                drill.cell,
                ranges.join(", ")
            )];
            report.restore_commands.extend(
                restore_commands(spec)
                    .into_iter()
                    .map(|c| format!("{c} --sync-timeout 60s")),
            );
            if common.restore {
                report.restored =
                    Some(restore_after_failover(client, spec, &stood_by, &mut report).await);
            }
        }
    } else {
        report.outcome = "no failover".into();
    }
    finish_probe(&mut report, &probe, started);
    print_report(&report, common.output);
    Ok(code(&report))
}

/// Where the control-plane drill's probe writes, and the cell that should
/// answer it in the end: a shard that moves, to its new owner, or without
/// a switchover, the first shard of the first map at its owner.
async fn control_plane_target(
    client: &Client,
    request: Option<&SwitchoverRequest>,
) -> Result<(u32, String, Option<String>), CliError> {
    if let Some(request) = request {
        let plan: SwitchoverPlan = client
            .post(
                "/v1/switchovers",
                &SwitchoverRequest {
                    dry_run: true,
                    ..request.clone()
                },
            )
            .await?;
        let first = &plan.moves[0];
        let shard = first["shards"]
            .as_str()
            .and_then(|s| s.split('-').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let target = first["to"].as_str().unwrap_or_default().to_owned();
        return Ok((shard, target, Some(crate::switchover::moves_text(&plan))));
    }
    let maps: ListResponse = client.get("/v1/resources/shardmaps").await?;
    let shard = maps
        .items
        .iter()
        .filter_map(|m| m["spec"]["assignments"].as_array())
        .flatten()
        .find_map(assignment_range)
        .map_or(0, |range| range.start);
    // No switchover: nothing moves, so no write "reaches a new owner" (no RTO).
    Ok((shard, String::new(), None))
}

/// The replica leading now, by its place in the sandbox: (index, URL, term).
async fn sandbox_leader(
    client: &Client,
    replicas: &[String],
) -> Result<(usize, String, i64), CliError> {
    let view: atoll_api::rest::LeaderResponse = client.get("/v1/leader").await?;
    let Some(url) = view.leader else {
        return Err(CliError::new(
            exit::FAILURE,
            "no control-plane replica leads now (an election, or etcd has no quorum); try again in a few seconds",
        ));
    };
    let index = replicas.iter().position(|r| *r == url).ok_or_else(|| {
        CliError::new(
            exit::FAILURE,
            format!(
                "the leader {url} is none of the sandbox's replicas ({})",
                replicas.join(", ")
            ),
        )
    })?;
    Ok((index, url, view.term.unwrap_or(0)))
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A counter's value in a Prometheus text exposition.
fn counter(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name)
            .then(|| value.trim().parse::<f64>().ok())?
            .map(|v| v as u64)
    })
}

async fn control_plane(client: &Client, drill: ControlPlaneDrill) -> Result<u8, CliError> {
    let common = &drill.common;
    let place = locate(client, common);
    if !place.sandbox {
        return Err(no_sandbox(client, &place));
    }
    let up = up_file(&place)?;
    let replicas: Vec<String> =
        serde_json::from_value(up["controlReplicas"].clone()).unwrap_or_default();
    if replicas.len() < 2 {
        let mut error = CliError::new(
            exit::FAILURE,
            format!(
                "the sandbox in {} runs one control-plane replica: no other would take over from it",
                place.state_dir.display()
            ),
        );
        error.details.push(
            "start a replicated one with `atoll up --control-replicas 3` (three replicas on a three-member etcd)".into(),
        );
        return Err(error);
    }
    let network: Option<crate::netns::ControlNetwork> =
        serde_json::from_value(up["isolatedControl"].clone()).ok();
    if drill.fault == LeaderFault::Partition && network.is_none() {
        let mut error = CliError::new(
            exit::FAILURE,
            format!(
                "the control-plane replicas of the sandbox in {} share the host's network: a partition cannot cut one off",
                place.state_dir.display()
            ),
        );
        error.details.push(format!(
            "start it with `atoll up --control-replicas {} --isolate-control` (each replica in its own network namespace; Linux, root)",
            replicas.len()
        ));
        return Err(error);
    }
    let moving = drill.from.is_some() || drill.shards.is_some();
    if !moving && (drill.at.is_some() || drill.to.is_some()) {
        return Err(CliError::new(
            exit::USAGE,
            "--at and --to are about a switchover: give --from CELL or --shards RANGE to start one",
        ));
    }
    let request = moving.then(|| SwitchoverRequest {
        from: drill.from.clone(),
        shards: drill.shards.clone(),
        to: drill.to.clone(),
        reason: Some("atoll drill control-plane".into()),
        ..SwitchoverRequest::default()
    });
    // The plan first: a drill that cannot start should not load anything.
    let (shard, target, moves) = control_plane_target(client, request.as_ref()).await?;
    let gateway = first_gateway(client).await?;
    let history = history_path(common, &place, "control-plane");
    let fault = drill.fault.name();
    let mut report = Report {
        drill: match &moves {
            Some(moves) => {
                format!("control plane ({fault} the leader) during a switchover of {moves}")
            }
            None => format!("control plane ({fault} the leader)"),
        },
        history: history.display().to_string(),
        ..Report::default()
    };
    eprintln!(
        "atoll drill control-plane: {fault} the leader of {} replicas{}, under {} req/s for {} (history {})",
        replicas.len(),
        moves
            .as_ref()
            .map_or_else(String::new, |m| format!(" during a switchover of {m}")),
        common.rate,
        humantime::format_duration(common.duration),
        history.display()
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let armed = Arc::new(Mutex::new(None));
    let probe = Arc::new(Mutex::new(Probe::default()));
    let live = Arc::new(Mutex::new(Live {
        starts_at: Some(Instant::now() + common.start_after),
        ..Live::default()
    }));
    set_phase(&live, "warming up: the leader goes in {countdown}");
    let load = start_load(client, common, &history, &live)?;
    let prober = start_probe(
        gateway,
        probe_user(shard),
        target,
        armed.clone(),
        probe.clone(),
        stopped.clone(),
    );
    let progress = start_progress(live.clone(), probe.clone(), stopped);
    tokio::time::sleep(common.start_after).await;
    let started = Instant::now();
    *armed.lock() = Some(started);
    let name = match &request {
        Some(request) => {
            let plan: SwitchoverPlan = client.post("/v1/switchovers", request).await?;
            set_phase(&live, format!("switchover {}: pending", plan.name));
            Some(plan.name)
        }
        None => None,
    };
    // Until the switchover reaches the phase asked for.
    if let (Some(name), Some(at)) = (&name, drill.at) {
        let until = started + common.deadline;
        loop {
            let phase = switchover_named(client, name).await.map(|s| s.phase);
            if let Some(phase) = phase {
                set_phase(&live, format!("switchover {name}: {phase}"));
                if phase >= at.phase() || phase.is_final() {
                    if phase.is_final() || phase > at.phase() {
                        report.notes.push(format!(
                            "the switchover was in {phase} already when the drill saw it; the leader went then"
                        ));
                    }
                    break;
                }
            }
            if Instant::now() >= until {
                report.notes.push(format!(
                    "the switchover did not reach {} within the deadline; the leader went anyway",
                    at.phase()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (index, old, old_term) = sandbox_leader(client, &replicas).await?;
    let process = format!("control plane {}", index + 1);
    let pid = sandbox_pid(&place, &process)?;
    let others: Vec<String> = replicas.iter().filter(|r| **r != old).cloned().collect();
    let elsewhere = client.elsewhere(&others, Duration::from_secs(2))?;
    let mut change = LeaderChange {
        fault: fault.into(),
        old_leader: old.clone(),
        old_term,
        ..LeaderChange::default()
    };
    let faulted = Instant::now();
    match (drill.fault, &network) {
        (LeaderFault::Partition, Some(network)) => {
            let cut = network.partition(index)?;
            report.notes.push(format!(
                "cut the leader {old} (term {old_term}, {process}, pid {pid}) off the network ({} down; it runs on)",
                cut.host_interface
            ));
        }
        (fault, _) => {
            let signal = if fault == LeaderFault::Kill {
                nix::sys::signal::Signal::SIGKILL
            } else {
                nix::sys::signal::Signal::SIGSTOP
            };
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(|e| {
                CliError::new(
                    exit::FAILURE,
                    format!("cannot signal {process} (pid {pid}): {e}"),
                )
            })?;
            report.notes.push(format!(
                "{} the leader {old} (term {old_term}, {process}, pid {pid})",
                if fault == LeaderFault::Kill {
                    "killed"
                } else {
                    "froze"
                }
            ));
        }
    }
    set_phase(
        &live,
        format!("leader {old} {fault}: waiting for another to lead"),
    );
    if let Some(name) = &name {
        change.phase_at_fault = switchover_named(&elsewhere, name)
            .await
            .map(|s| s.phase.to_string());
    }
    // Another replica leads once one of those left says a later term
    // began (killed, the old one may win it, started again by `atoll up`).
    while faulted.elapsed() < Duration::from_secs(30) {
        if let Ok(view) = elsewhere
            .get::<atoll_api::rest::LeaderResponse>("/v1/leader")
            .await
            && let Some(leader) = new_leader(&view, old_term)
        {
            change.leaderless_ms = Some(elapsed_ms(faulted));
            set_phase(
                &live,
                format!("{leader} leads (term {})", view.term.unwrap_or(0)),
            );
            change.new_leader = Some(leader);
            change.new_term = view.term;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new leader carries the switchover on from its stored phase.
    if let (Some(name), Some(at_fault)) = (&name, &change.phase_at_fault) {
        let until = faulted + common.deadline;
        while Instant::now() < until {
            if let Some(spec) = switchover_named(&elsewhere, name).await
                && (spec.phase.to_string() != *at_fault || spec.phase.is_final())
            {
                change.went_on_ms = Some(elapsed_ms(faulted));
                set_phase(&live, format!("switchover {name}: {}", spec.phase));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The replica taken out comes back: thawed or joined again after
    // --hold, or started again by `atoll up`.
    if drill.fault != LeaderFault::Kill {
        tokio::time::sleep((faulted + drill.hold).saturating_duration_since(Instant::now())).await;
    }
    match (drill.fault, &network) {
        (LeaderFault::Freeze, _) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
            report.notes.push(format!(
                "thawed {old} after {} ms",
                faulted.elapsed().as_millis()
            ));
        }
        (LeaderFault::Partition, Some(network)) => {
            if let Err(error) = network.heal(index) {
                report
                    .notes
                    .push(format!("could not join {old} again: {}", error.message));
            } else {
                report.notes.push(format!(
                    "joined {old} to the network again after {} ms",
                    faulted.elapsed().as_millis()
                ));
            }
        }
        _ => {}
    }
    set_phase(&live, format!("{old} back: which role?"));
    let returned = client.elsewhere(std::slice::from_ref(&old), Duration::from_secs(2))?;
    let back_by = Instant::now() + Duration::from_secs(30);
    while Instant::now() < back_by {
        if let Ok(view) = returned
            .get::<atoll_api::rest::LeaderResponse>("/v1/leader")
            .await
            && view.served_by == old
        {
            change.returned_ms = Some(elapsed_ms(faulted));
            let claims_old_term =
                view.leader.as_deref() == Some(old.as_str()) && view.term.unwrap_or(0) <= old_term;
            change.returned_role = Some(if view.leader.as_deref() == Some(old.as_str()) {
                "leader".into()
            } else {
                "follower".into()
            });
            if claims_old_term {
                report.notes.push(format!(
                    "{old} came back and still says it leads in term {old_term}"
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if drill.fault != LeaderFault::Kill
        && let Some(text) = client
            .text_at(&old, "/metrics", Duration::from_secs(2))
            .await
    {
        change.deposed_writes_refused = counter(&text, "atoll_control_fenced_writes_total");
    }
    let spec = match &name {
        Some(name) => {
            let all = client.elsewhere(
                &[others.clone(), vec![old.clone()]].concat(),
                Duration::from_secs(5),
            )?;
            wait_final(
                &all,
                name,
                started + common.deadline,
                true,
                &mut report,
                &live,
            )
            .await
        }
        None => None,
    };
    set_phase(&live, "steady state after the leader change");
    finish_load(load, &mut report).await;
    let _ = stop.send(true);
    let _ = prober.await;
    let _ = progress.await;
    if let (Some(name), Some(spec)) = (&name, &spec) {
        describe(&mut report, name, spec);
        if spec.phase == SwitchoverPhase::Completed {
            report.restore_commands = restore_commands(spec);
            if common.restore {
                report.restored = Some(restore(&elsewhere, spec, &mut report).await);
            }
        }
    } else if name.is_some() {
        report.outcome = "the switchover could not be read after the leader change".into();
    } else {
        report.outcome = "completed".into();
    }
    if change.new_leader.is_none() {
        report.outcome = "no other replica led within 30 s".into();
    } else if change.returned_role.as_deref() == Some("leader")
        && report
            .notes
            .iter()
            .any(|n| n.contains("still says it leads"))
    {
        report.outcome = format!("the deposed leader {old} still leads in its old term");
    }
    report.leaderless_ms = change.leaderless_ms;
    report.leader_change = Some(change);
    finish_probe(&mut report, &probe, started);
    print_report(&report, common.output);
    Ok(code(&report))
}

/// 0 when the drill completed and the checker found nothing; else 10.
fn code(report: &Report) -> u8 {
    let restored = report.restored.as_deref().is_none_or(|r| r == "completed");
    if report.outcome == "completed" && report.clean && restored {
        0
    } else {
        exit::DRILL_FAILED
    }
}

fn ms(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v} ms"))
}

fn print_report(report: &Report, format: Format) {
    if format != Format::Table {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        return;
    }
    println!("atoll drill: {}", report.drill);
    println!("  outcome          {}", report.outcome);
    if let Some(name) = &report.switchover {
        println!(
            "  switchover       {name} ({})",
            report.phase.as_deref().unwrap_or("-")
        );
    }
    // A control-plane drill without a switchover moves nothing.
    let moved = report.switchover.is_some() || report.leader_change.is_none();
    if moved {
        println!(
            "  RTO              {}  ({} to the first write served by the new owner)",
            ms(report.rto_ms),
            if report.detected_ms.is_some() || report.drill.starts_with("fault") {
                "fault"
            } else {
                "start"
            }
        );
    }
    if let Some(change) = &report.leader_change {
        println!(
            "  leader           {} (term {}) {}; {} led after {} (term {})",
            change.old_leader,
            change.old_term,
            match change.fault.as_str() {
                "kill" => "killed",
                "freeze" => "frozen",
                _ => "cut off",
            },
            change.new_leader.as_deref().unwrap_or("no other replica"),
            ms(change.leaderless_ms),
            change
                .new_term
                .map_or_else(|| "-".into(), |t| t.to_string())
        );
        if let Some(phase) = &change.phase_at_fault {
            println!(
                "  switchover went  on {} after the fault (it was in {phase})",
                ms(change.went_on_ms)
            );
        }
        println!(
            "  came back        {} after {}{}",
            change.returned_role.as_deref().unwrap_or("not"),
            ms(change.returned_ms),
            change
                .deposed_writes_refused
                .map_or_else(String::new, |n| format!(
                    "; {n} write{} of its old term refused by the store",
                    if n == 1 { "" } else { "s" }
                ))
        );
    }
    if report.detected_ms.is_some() {
        println!("  detected after   {}", ms(report.detected_ms));
        println!(
            "  failover took    {}  (detection to completion)",
            ms(report.failover_ms)
        );
        if let Some(n) = report.failovers {
            println!("  failovers        {n} of the lost cell");
        }
    }
    if moved {
        println!("  fence window     {}", ms(report.fence_window_ms));
        println!("  switchover time  {}", ms(report.switchover_ms));
    }
    if !report.phases.is_empty() {
        println!("  phases           {}", report.phases.join(", "));
    }
    println!(
        "  RPO              {} log position{} unreplicated at the last probe{}; {} acknowledged writes lost (checker)",
        report.rpo_positions,
        if report.rpo_positions == 1 { "" } else { "s" },
        if report.rpo_shards.is_empty() {
            String::new()
        } else {
            format!(" (shards {:?})", report.rpo_shards)
        },
        report.lost_acknowledged_writes
    );
    println!(
        "  probe            {} writes, {} failed {:?}, served by {:?}",
        report.probe_writes,
        report.probe_failures,
        report.probe_failures_by_class,
        report.probe_served_by
    );
    let w = &report.workload;
    println!(
        "  workload         {} requests, {} errors {}, {} operations failed",
        w["requests"], w["errors"], w["errorsByCause"], w["failed"]
    );
    println!(
        "  checker          {}",
        if report.clean {
            "clean: money conserved, no acknowledged write lost or applied twice".to_owned()
        } else {
            w["check"]["first"]
                .as_str()
                .unwrap_or("not clean (see the history)")
                .to_owned()
        }
    );
    println!("  history          {}", report.history);
    match &report.restored {
        Some(outcome) => {
            if outcome == "completed" {
                println!("  restored         completed: the shards went back to their owners");
            } else {
                println!("  restored         {outcome}");
                for command in &report.restore_commands {
                    println!("                     {command}");
                }
            }
        }
        None if !report.restore_commands.is_empty() => {
            println!(
                "  put it back      the moved shards stay where they went; to move them back:"
            );
            for command in &report.restore_commands {
                println!("                     {command}");
            }
            println!("                   (or run the drill with --restore)");
        }
        None => {}
    }
    for note in &report.notes {
        println!("  note: {note}");
    }
}
