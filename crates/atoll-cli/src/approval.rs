//! `atoll approval list|show|approve|reject`: operations that a Workspace's
//! rules make wait for a second person (docs/security.md#approvals).

use std::time::Duration;

use atoll_api::rest::{ApprovalDecision, ApprovalInfo, ApprovalList, ApprovalPending};
use clap::{Args, Subcommand};

use crate::client::{CliError, Client, exit, segment};
use crate::commands::print_json;
use crate::output::{Format, table};

#[derive(Debug, Args)]
pub(crate) struct ApprovalArgs {
    #[command(subcommand)]
    command: ApprovalCommand,
}

#[derive(Debug, Subcommand)]
enum ApprovalCommand {
    /// List approval requests of the workspaces you read, and your own.
    List(ListArgs),
    /// Show one approval request.
    Show(ShowArgs),
    /// Approve someone else's request: it runs now, as they asked it (a
    /// held one: they may start it).
    Approve(DecideArgs),
    /// Reject a pending request (or withdraw your own).
    Reject(DecideArgs),
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only requests in this state: pending, approved, rejected, expired,
    /// failed.
    #[arg(long)]
    state: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The request's id (apr-...).
    id: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
struct DecideArgs {
    /// The request's id (apr-...).
    id: String,
    /// Why (kept in the request and the audit log).
    #[arg(long, short = 'm')]
    comment: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub(crate) async fn run(client: &Client, args: ApprovalArgs) -> Result<u8, CliError> {
    match args.command {
        ApprovalCommand::List(list) => {
            let path = match &list.state {
                Some(state) => format!("/v1/approvals?state={}", segment(state)),
                None => "/v1/approvals".to_owned(),
            };
            let answer: ApprovalList = client.get(&path).await?;
            match list.output {
                Format::Table => print!("{}", approval_table(&answer.approvals)),
                _ => print_as(&answer, list.output),
            }
            Ok(0)
        }
        ApprovalCommand::Show(show) => {
            let info: ApprovalInfo = client
                .get(&format!("/v1/approvals/{}", segment(&show.id)))
                .await?;
            match show.output {
                Format::Table => print_info(&info),
                _ => print_as(&info, show.output),
            }
            Ok(0)
        }
        ApprovalCommand::Approve(decide) => decide_on(client, decide, "approve").await,
        ApprovalCommand::Reject(decide) => decide_on(client, decide, "reject").await,
    }
}

async fn decide_on(client: &Client, decide: DecideArgs, verb: &str) -> Result<u8, CliError> {
    let info: ApprovalInfo = client
        .post(
            &format!("/v1/approvals/{}/{verb}", segment(&decide.id)),
            &ApprovalDecision {
                comment: decide.comment,
            },
        )
        .await?;
    match decide.output {
        Format::Table => println!(
            "approval {} {} by {}: {}{}",
            info.id,
            info.state,
            info.decided_by.as_deref().unwrap_or("?"),
            info.summary,
            info.result
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        _ => print_as(&info, decide.output),
    }
    Ok(0)
}

fn print_as(value: &impl serde::Serialize, format: Format) {
    match format {
        Format::Yaml => print!(
            "{}",
            atoll_model::to_yaml(&serde_json::to_value(value).unwrap_or_default())
        ),
        _ => print_json(value),
    }
}

fn print_info(info: &ApprovalInfo) {
    println!("approval:     {}", info.id);
    println!("state:        {}", info.state);
    println!("workspace:    {}", info.workspace);
    println!("operation:    {}", info.operation);
    println!("what:         {}", info.summary);
    println!("requested by: {} at {}", info.requested_by, info.created);
    if let Some(reason) = &info.reason {
        println!("reason:       {reason}");
    }
    println!(
        "expires:      {}{}",
        info.expires,
        if info.hold {
            " (held: its requester starts it, once)"
        } else {
            ""
        }
    );
    if let Some(by) = &info.decided_by {
        println!(
            "decided by:   {by} at {}",
            info.decided.as_deref().unwrap_or("?")
        );
    }
    if let Some(comment) = &info.comment {
        println!("comment:      {comment}");
    }
    if let Some(result) = &info.result {
        println!("result:       {result}");
    }
}

fn approval_table(approvals: &[ApprovalInfo]) -> String {
    if approvals.is_empty() {
        return "no approval requests\n".to_owned();
    }
    let rows: Vec<Vec<String>> = approvals
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.state.clone(),
                a.workspace.clone(),
                a.operation.clone(),
                a.requested_by.clone(),
                a.decided_by.clone().unwrap_or_default(),
                a.summary.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "WORKSPACE",
            "OPERATION",
            "REQUESTED BY",
            "DECIDED BY",
            "WHAT",
        ],
        &rows,
    )
}

/// Says a request waits for a second person, then waits until it is
/// decided (or expires); the request as it was decided.
pub(crate) async fn wait_for_decision(
    client: &Client,
    pending: &ApprovalPending,
) -> Result<ApprovalInfo, CliError> {
    let id = &pending.approval.id;
    eprintln!("{}", pending.message);
    eprintln!(
        "waiting for the decision (until {}; Ctrl-C stops waiting, the request stays pending)",
        pending.approval.expires
    );
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let info: ApprovalInfo = match client.get(&format!("/v1/approvals/{}", segment(id))).await {
            Ok(info) => info,
            // A replica going away is waited out like the decision.
            Err(error) if error.code == exit::UNREACHABLE => continue,
            Err(error) => return Err(error),
        };
        if info.state != "pending" {
            return Ok(info);
        }
    }
}

/// The error for a request that was not approved.
pub(crate) fn not_approved(info: &ApprovalInfo) -> CliError {
    CliError::new(
        exit::AWAITING_APPROVAL,
        format!(
            "approval {} is {}{}{}: {} did not run",
            info.id,
            info.state,
            info.decided_by
                .as_deref()
                .map(|by| format!(" by {by}"))
                .unwrap_or_default(),
            info.comment
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default(),
            info.summary
        ),
    )
}
