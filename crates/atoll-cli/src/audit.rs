//! `atoll audit calls` and `atoll audit verify`: the audit chain of every
//! call that changed or could change state and every refusal, and its
//! verification.

use atoll_audit::{Anchor, AuditEntry, ChainPage, Verifier};
use clap::{Args, Subcommand};

use crate::client::{CliError, Client, exit};
use crate::commands::print_json;
use crate::output::{Format, table};

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// The audit chain: every call that changed or could change state, and
    /// every refusal, with the verified caller, credential and address.
    Calls(CallsArgs),
    /// Check the audit chain: name the first entry removed, reordered or
    /// edited (exit 13), else print its head as an anchor to keep.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CallsArgs {
    /// Entries after this one.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Only refusals (401, 403).
    #[arg(long)]
    refused: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// An entry written down before (`SEQ:HASH`, as verify prints the
    /// head): the chain must still hold it unchanged, which shows entries
    /// cut from the end together with a rewritten head.
    #[arg(long, value_name = "SEQ:HASH")]
    anchor: Option<Anchor>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub(crate) async fn run(client: &Client, command: AuditCommand) -> Result<u8, CliError> {
    match command {
        AuditCommand::Calls(args) => calls(client, args).await,
        AuditCommand::Verify(args) => verify(client, args).await,
    }
}

async fn calls(client: &Client, args: CallsArgs) -> Result<u8, CliError> {
    let mut entries: Vec<AuditEntry> = Vec::new();
    let mut after = args.after;
    // Refusals are filtered here: page until enough are found.
    loop {
        let page: ChainPage = client
            .get(&format!("/v1/audit/chain?after={after}&limit=1000"))
            .await?;
        entries.extend(
            page.entries
                .into_iter()
                .filter(|e| !args.refused || matches!(e.status, 401 | 403)),
        );
        match page.next {
            Some(next) if entries.len() < args.limit => after = next,
            _ => break,
        }
    }
    entries.truncate(args.limit);
    match args.output {
        Format::Json => print_json(&entries),
        Format::Yaml => print!(
            "{}",
            atoll_model::to_yaml(&serde_json::to_value(&entries).unwrap_or_default())
        ),
        Format::Table => {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.seq.to_string(),
                        e.time.clone(),
                        e.caller.clone(),
                        e.credential.clone(),
                        e.remote.clone().unwrap_or_default(),
                        format!("{} {}", e.method, e.path),
                        format!("{} {}", e.status, e.outcome),
                        e.detail.chars().take(80).collect(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "SEQ",
                        "TIME",
                        "CALLER",
                        "CREDENTIAL",
                        "FROM",
                        "CALL",
                        "OUTCOME",
                        "DETAIL"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(0)
}

async fn verify(client: &Client, args: VerifyArgs) -> Result<u8, CliError> {
    let mut verifier = Verifier::new(args.anchor.clone());
    let mut after = 0;
    // The head of the first page: later pages stop there too, so entries
    // appended while this runs are left for the next verification.
    let mut head = None;
    let mut first = true;
    let verdict = loop {
        let page: ChainPage = client
            .get(&format!("/v1/audit/chain?after={after}&limit=2000"))
            .await?;
        if first {
            head = page.head.clone();
            first = false;
        }
        let mut found = None;
        let mut past_head = false;
        for entry in page.entries {
            if head.as_ref().is_some_and(|h| entry.seq > h.seq) {
                past_head = true;
                break;
            }
            if let Err(problem) = verifier.push(entry) {
                found = Some(problem);
                break;
            }
        }
        if let Some(problem) = found {
            break Err(problem);
        }
        match page.next {
            Some(next) if !past_head => after = next,
            _ => break verifier.finish(head.as_ref()),
        }
    };
    let report = serde_json::json!({
        "verified": verdict.is_ok(),
        "checked": verifier.checked(),
        "head": head.as_ref().map(|h| format!("{}:{}", h.seq, h.hash)),
        "problem": verdict.as_ref().err().map(|p| serde_json::json!({
            "entry": p.seq,
            "kind": p.kind.as_str(),
            "message": p.message,
        })),
    });
    match args.output {
        Format::Json => print_json(&report),
        Format::Yaml => print!("{}", atoll_model::to_yaml(&report)),
        Format::Table => match (&verdict, &head) {
            (Ok(()), Some(head)) => println!(
                "the audit chain of {} verifies: {} entries, each linked to the one before; head {}:{} (keep it, and check later with --anchor)",
                client.urls(),
                verifier.checked(),
                head.seq,
                head.hash
            ),
            (Ok(()), None) => println!("the audit chain of {} is empty", client.urls()),
            (Err(_), _) => {}
        },
    }
    match verdict {
        Ok(()) => Ok(0),
        Err(problem) => {
            let mut error = CliError::new(
                exit::AUDIT_TAMPERED,
                format!(
                    "the audit chain does not verify: entry {} {} ({} entries before it verified)",
                    problem.seq,
                    problem.kind.as_str(),
                    verifier.checked().min(problem.seq.saturating_sub(1))
                ),
            );
            error.details.push(problem.message);
            Err(error)
        }
    }
}
