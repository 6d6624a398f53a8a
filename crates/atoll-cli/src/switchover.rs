//! `atoll switchover plan|start|status|abort`: planned moves of shard
//! ranges between cells, run by the control plane (docs/switchover.md).

use std::time::{Duration, Instant};

use atoll_api::rest::{ApprovalInfo, SwitchoverPlan, SwitchoverRequest};
use atoll_model::{Resource, Spec, SwitchoverSpec, decode_resource};
use clap::{Args, Subcommand};

use crate::client::{CliError, Client, Outcome, exit, segment};
use crate::output::Format;

#[derive(Debug, Args)]
pub(crate) struct SwitchoverArgs {
    #[command(subcommand)]
    command: SwitchoverCommand,
}

#[derive(Debug, Subcommand)]
enum SwitchoverCommand {
    /// Show what a switchover would do: the shard map diff, the checks of the
    /// targets and the fence window to expect. Changes nothing.
    Plan(MoveArgs),
    /// Start a switchover and follow it until it completes or aborts.
    Start(StartArgs),
    /// Show a switchover's phases with their timings.
    Status(StatusArgs),
    /// Stop a switchover before its flip; the shards serve at their old
    /// owners again.
    Abort(AbortArgs),
    /// Let a failover that waits for approval (emergency plan with
    /// `approval: manual`) run, and follow it.
    Approve(AbortArgs),
}

#[derive(Debug, Args)]
struct MoveArgs {
    /// Move every shard this cell owns (to each shard's standby, or --to).
    #[arg(long, value_name = "CELL")]
    from: Option<String>,
    /// Move these shards, e.g. 0-9 or 7 (from whoever owns them).
    #[arg(long, value_name = "RANGE")]
    shards: Option<String>,
    /// The new owner [default: each shard's standby].
    #[arg(long, value_name = "CELL")]
    to: Option<String>,
    /// The shard map [default: the only one].
    #[arg(long, value_name = "NAME")]
    shard_map: Option<String>,
    /// How long each barrier waits for every node.
    #[arg(long, value_name = "DURATION")]
    barrier_timeout: Option<String>,
    /// How long the sync gate waits for the targets to catch up.
    #[arg(long, value_name = "DURATION")]
    sync_timeout: Option<String>,
    /// Do not wait for replication (stateless services only: writes not yet
    /// replicated are lost).
    #[arg(long)]
    skip_sync_gate: bool,
    /// Fail over a lost cell (--from): no sync gate, the flip waits for its
    /// ownership lease to expire, and the writes it had not replicated are
    /// reported.
    #[arg(long, requires = "from")]
    failover: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

impl MoveArgs {
    fn request(
        &self,
        dry_run: bool,
        name: Option<String>,
        reason: Option<String>,
    ) -> SwitchoverRequest {
        SwitchoverRequest {
            shard_map: self.shard_map.clone(),
            from: self.from.clone(),
            shards: self.shards.clone(),
            to: self.to.clone(),
            name,
            reason,
            barrier_timeout: self.barrier_timeout.clone(),
            sync_timeout: self.sync_timeout.clone(),
            skip_sync_gate: self.skip_sync_gate,
            failover: self.failover,
            dry_run,
            hold: false,
            approval: None,
        }
    }
}

#[derive(Debug, Args)]
struct StartArgs {
    #[command(flatten)]
    moves: MoveArgs,
    /// The Switchover's name [default: <map>-<unix time>].
    #[arg(long)]
    name: Option<String>,
    /// Why (kept in the Switchover and the audit log).
    #[arg(long, short = 'm')]
    reason: Option<String>,
    /// Return once it started instead of following it (or, where it needs
    /// a second person's approval, once that is asked for).
    #[arg(long)]
    no_wait: bool,
    /// Where switchovers need a second person's approval: ask for it now,
    /// to start later with --approval (a change window, a drill).
    #[arg(long, conflicts_with = "approval")]
    hold: bool,
    /// Start it with this held approval (approved by a second person, for
    /// these very moves).
    #[arg(long, value_name = "ID")]
    approval: Option<String>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The Switchover.
    name: String,
    /// Follow it until it completes or aborts.
    #[arg(long, short = 'w')]
    watch: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
struct AbortArgs {
    /// The Switchover.
    name: String,
}

pub(crate) async fn run(client: &Client, args: SwitchoverArgs) -> Result<u8, CliError> {
    match args.command {
        SwitchoverCommand::Plan(moves) => {
            let plan: SwitchoverPlan = client
                .post("/v1/switchovers", &moves.request(true, None, None))
                .await?;
            print_plan(&plan, moves.output)?;
            Ok(0)
        }
        SwitchoverCommand::Start(start) => {
            let mut request = start
                .moves
                .request(false, start.name.clone(), start.reason.clone());
            request.hold = start.hold;
            request.approval = start.approval.clone();
            let table = start.moves.output == Format::Table;
            let plan: SwitchoverPlan =
                match client.post_or_pending("/v1/switchovers", &request).await? {
                    Outcome::Done(plan) => plan,
                    Outcome::Pending(pending) if start.hold => {
                        println!("{}", pending.message);
                        return Ok(0);
                    }
                    Outcome::Pending(pending) if start.no_wait => {
                        eprintln!("{}", pending.message);
                        return Ok(exit::AWAITING_APPROVAL);
                    }
                    Outcome::Pending(pending) => {
                        let info = crate::approval::wait_for_decision(client, &pending).await?;
                        return follow_approved(client, &info, table).await;
                    }
                };
            if table {
                println!(
                    "switchover/{} started: {} shards of shardmap/{} ({})",
                    plan.name,
                    plan.shard_count,
                    plan.shard_map,
                    moves_text(&plan)
                );
            } else {
                print_plan(&plan, start.moves.output)?;
            }
            if start.no_wait {
                return Ok(0);
            }
            follow(client, &plan.name, start.moves.output == Format::Table).await
        }
        SwitchoverCommand::Status(status) => {
            if status.watch {
                return follow(client, &status.name, status.output == Format::Table).await;
            }
            let (resource, spec) = fetch(client, &status.name).await?;
            match status.output {
                Format::Table => print_status(&resource, &spec),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&resource).unwrap_or_default()
                ),
                Format::Yaml => print!("{}", atoll_model::resource_yaml(&resource)),
            }
            Ok(final_code(&spec))
        }
        SwitchoverCommand::Abort(abort) => {
            let _: serde_json::Value = client
                .post(
                    &format!("/v1/switchovers/{}/abort", segment(&abort.name)),
                    &serde_json::json!({}),
                )
                .await?;
            println!("switchover/{}: abort requested", abort.name);
            follow(client, &abort.name, true).await
        }
        SwitchoverCommand::Approve(approve) => {
            let answer: serde_json::Value = match client
                .post_or_pending(
                    &format!("/v1/switchovers/{}/approve", segment(&approve.name)),
                    &serde_json::json!({}),
                )
                .await?
            {
                Outcome::Done(answer) => answer,
                // Failovers need two people here: this was the first.
                Outcome::Pending(pending) => {
                    eprintln!("{}", pending.message);
                    return Ok(exit::AWAITING_APPROVAL);
                }
            };
            match serde_json::from_value::<ApprovalInfo>(answer) {
                Ok(info) => println!(
                    "approval {} approved: {} ({})",
                    info.id,
                    info.summary,
                    info.result.as_deref().unwrap_or("?")
                ),
                Err(_) => println!("switchover/{}: approved", approve.name),
            }
            follow(client, &approve.name, true).await
        }
    }
}

/// Follows the switchover an approval started, or says why it did not.
async fn follow_approved(
    client: &Client,
    info: &ApprovalInfo,
    table: bool,
) -> Result<u8, CliError> {
    if info.state != "approved" {
        return Err(crate::approval::not_approved(info));
    }
    let name = info
        .result
        .as_deref()
        .and_then(|r| r.strip_prefix("started switchover/"))
        .unwrap_or_default()
        .to_owned();
    println!(
        "approval {} approved by {}: switchover/{name} started",
        info.id,
        info.decided_by.as_deref().unwrap_or("?")
    );
    if name.is_empty() {
        return Ok(0);
    }
    follow(client, &name, table).await
}

/// 0 when completed, `SWITCHOVER_ABORTED` when aborted, 0 while running.
fn final_code(spec: &SwitchoverSpec) -> u8 {
    match spec.phase {
        atoll_model::SwitchoverPhase::Aborted => exit::SWITCHOVER_ABORTED,
        _ => 0,
    }
}

async fn fetch(client: &Client, name: &str) -> Result<(Resource, SwitchoverSpec), CliError> {
    let value: serde_json::Value = client
        .get(&format!("/v1/resources/switchovers/{}", segment(name)))
        .await?;
    let resource = decode_resource(value).map_err(|errors| {
        CliError::new(
            exit::FAILURE,
            format!(
                "cannot read switchover/{name}: {}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
    })?;
    match &resource.spec {
        Spec::Switchover(spec) => {
            let spec = spec.clone();
            Ok((resource, spec))
        }
        _ => Err(CliError::new(exit::FAILURE, "not a Switchover")),
    }
}

/// Prints each phase as it ends, until the switchover is over.
async fn follow(client: &Client, name: &str, table: bool) -> Result<u8, CliError> {
    let started = Instant::now();
    let mut printed = 0usize;
    let mut last_message: Option<String> = None;
    loop {
        let (resource, spec) = fetch(client, name).await?;
        if table {
            // Phases that ended since the last look.
            let done = spec.timeline.iter().filter(|r| r.millis.is_some()).count();
            for record in spec
                .timeline
                .iter()
                .filter(|r| r.millis.is_some())
                .skip(printed)
            {
                println!(
                    "  {:<13} {:>8}  {}",
                    record.phase.to_string(),
                    took(record.millis),
                    record.detail.as_deref().unwrap_or("")
                );
            }
            printed = done;
            if !spec.phase.is_final() && spec.message != last_message {
                if let Some(message) = &spec.message {
                    println!("  ... {message}");
                }
                last_message = spec.message.clone();
            }
        }
        if spec.phase.is_final() {
            if table {
                if spec.mode == atoll_model::SwitchoverMode::Failover {
                    println!("  RPO: {}", rpo_text(&spec));
                }
                let total: u64 = spec.timeline.iter().filter_map(|r| r.millis).sum();
                println!(
                    "switchover/{} {} in {:.2}s{}",
                    resource.name(),
                    spec.phase,
                    total as f64 / 1000.0,
                    spec.message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                );
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&resource).unwrap_or_default()
                );
            }
            return Ok(final_code(&spec));
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "switchover/{name} is still {} after an hour; see `atoll switchover status {name}`",
                    spec.phase
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// "shard 3: positions 120-140 (20)" for each shard a failover could not
/// carry, or "nothing unreplicated".
fn rpo_text(spec: &SwitchoverSpec) -> String {
    if spec.unreplicated.is_empty() {
        return "nothing unreplicated at the last probe".into();
    }
    let total: i64 = spec
        .unreplicated
        .iter()
        .map(|p| p.written - p.acknowledged)
        .sum();
    let shards: Vec<String> = spec
        .unreplicated
        .iter()
        .take(10)
        .map(|p| {
            format!(
                "shard {} positions {}..={}",
                p.shard,
                p.acknowledged + 1,
                p.written
            )
        })
        .collect();
    format!(
        "{total} log positions not replicated: {}",
        shards.join(", ")
    )
}

fn took(millis: Option<u64>) -> String {
    match millis {
        Some(ms) if ms < 10_000 => format!("{ms}ms"),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "...".into(),
    }
}

/// The moves of a plan, e.g. `0-33 rz01 -> rz02, 34-49 rz02 -> rz03`.
pub(crate) fn moves_text(plan: &SwitchoverPlan) -> String {
    plan.moves
        .iter()
        .map(|m| {
            format!(
                "{} {} -> {}",
                m["shards"].as_str().unwrap_or("?"),
                m["from"].as_str().unwrap_or("?"),
                m["to"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_plan(plan: &SwitchoverPlan, format: Format) -> Result<(), CliError> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(plan).unwrap_or_default()),
        Format::Yaml | Format::Table => {
            println!(
                "switchover of shardmap/{} (epoch {} -> {}): {} shards: {}",
                plan.shard_map,
                plan.epoch,
                plan.epoch + 1,
                plan.shard_count,
                moves_text(plan)
            );
            println!("checks:");
            for check in &plan.checks {
                println!("  {:<8} {}: {}", check.result, check.check, check.detail);
            }
            println!("fence window: {}", plan.expected_fence_window);
            println!(
                "phases: fence, barrier, sync gate, flip (epoch {}), barrier, unfence",
                plan.epoch + 1
            );
            println!("shard map after the flip (the moved shards unfence last):");
            print!("{}", plan.diff);
            if let Some(rule) = &plan.needs_approval {
                println!(
                    "approval: {rule}s need a second person's approval here: `atoll switchover start` asks for it and runs once approved (--hold: start later with --approval)"
                );
            }
            if plan.dry_run {
                println!(
                    "(dry run: nothing changed; `atoll switchover start` with the same flags runs it)"
                );
            }
        }
    }
    Ok(())
}

fn print_status(resource: &Resource, spec: &SwitchoverSpec) {
    println!("switchover/{}: {}", resource.name(), spec.phase);
    println!("  shard map:  {}", spec.shard_map);
    for m in &spec.moves {
        println!("  moves:      {} {} -> {}", m.shards, m.from, m.to);
    }
    if let Some(reason) = &spec.reason {
        println!("  reason:     {reason}");
    }
    if let Some(message) = &spec.message {
        println!("  message:    {message}");
    }
    println!("  {:<13} {:<26} {:>8}  DETAIL", "PHASE", "STARTED", "TOOK");
    for record in &spec.timeline {
        println!(
            "  {:<13} {:<26} {:>8}  {}",
            record.phase.to_string(),
            record.started,
            took(record.millis),
            record.detail.as_deref().unwrap_or("")
        );
    }
    if spec.mode == atoll_model::SwitchoverMode::Failover {
        println!(
            "  RPO:        {} (last probe answered {})",
            rpo_text(spec),
            spec.last_seen.as_deref().unwrap_or("never")
        );
    }
    let caught: Vec<String> = spec
        .positions
        .iter()
        .take(5)
        .map(|p| format!("{}@{}/{}", p.shard, p.acknowledged, p.written))
        .collect();
    if !caught.is_empty() {
        println!(
            "  sync gate:  {} shards; first: {} (shard@acknowledged/written)",
            spec.positions.len(),
            caught.join(" ")
        );
    }
}
