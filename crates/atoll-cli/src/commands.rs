//! The commands that drive a control plane over its REST API.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use atoll_api::rest::{
    ApplyRequest, ApplyResponse, AuditResponse, BarrierRequest, BarrierResponse, ChangeAction,
    CommitRecord, HistoryResponse, ListResponse, ManifestFile, NodeSelector, NodesResponse,
    ResourceRef, RollbackRequest, StatusResponse,
};
use atoll_model::{Kind, Resource};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::client::{CliError, Client, exit, segment};
use crate::output::{Format, Statuses, resource_table, table, yaml_documents};

/// Usage errors exit 2, like clap's.
const USAGE: u8 = 2;

pub(crate) fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn parse_kind(text: &str) -> Result<Kind, CliError> {
    Kind::parse(text).ok_or_else(|| {
        CliError::new(
            USAGE,
            format!(
                "unknown kind `{text}`; expected one of {}",
                Kind::expected()
            ),
        )
    })
}

/// `KIND/NAME`, or `KIND` and `NAME` as two arguments.
fn parse_target(first: &str, second: Option<&str>) -> Result<(Kind, String), CliError> {
    match (first.split_once('/'), second) {
        (Some((kind, name)), None) if !name.is_empty() => Ok((parse_kind(kind)?, name.to_owned())),
        (None, Some(name)) => Ok((parse_kind(first)?, name.to_owned())),
        _ => Err(CliError::new(
            USAGE,
            format!("name a resource as KIND/NAME, e.g. shardmap/users (got `{first}`)"),
        )),
    }
}

fn lower(kind: &str) -> String {
    kind.to_ascii_lowercase()
}

// === apply ===

#[derive(Debug, Args)]
pub(crate) struct ApplyArgs {
    /// A manifest file, a directory of them (*.yaml, *.yml, *.json), or `-`
    /// for stdin. Repeat for several.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Also read the subdirectories of directories.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Validate and print the diff of every change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Why: kept in the audit log.
    #[arg(short, long)]
    message: Option<String>,
    /// `json` prints the API's answer.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn collect(
    path: &Path,
    recursive: bool,
    top: bool,
    out: &mut Vec<PathBuf>,
) -> Result<(), CliError> {
    let metadata = std::fs::metadata(path).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if metadata.is_dir() {
        if !top && !recursive {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| {
                CliError::new(
                    exit::FAILURE,
                    format!("cannot list {}: {e}", path.display()),
                )
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            if entry.is_dir() {
                collect(&entry, recursive, false, out)?;
            } else if is_manifest(&entry) {
                out.push(entry);
            }
        }
    } else {
        out.push(path.to_owned());
    }
    Ok(())
}

/// Reads every manifest named by `-f`.
fn read_manifests(paths: &[PathBuf], recursive: bool) -> Result<Vec<ManifestFile>, CliError> {
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut content = String::new();
            std::io::stdin()
                .read_to_string(&mut content)
                .map_err(|e| CliError::new(exit::FAILURE, format!("reading stdin: {e}")))?;
            files.push(ManifestFile {
                source: "<stdin>".into(),
                content,
            });
            continue;
        }
        let mut found = Vec::new();
        collect(path, recursive, true, &mut found)?;
        if found.is_empty() {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "{} holds no manifests (*.yaml, *.yml, *.json)",
                    path.display()
                ),
            ));
        }
        for file in found {
            let content = std::fs::read_to_string(&file).map_err(|e| {
                CliError::new(
                    exit::FAILURE,
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            files.push(ManifestFile {
                source: file.display().to_string(),
                content,
            });
        }
    }
    Ok(files)
}

fn print_changes(response: &ApplyResponse) {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for change in &response.changes {
        *counts.entry(change.action.to_string()).or_default() += 1;
        let suffix = if response.dry_run { " (dry run)" } else { "" };
        println!(
            "{}/{} {}{suffix}",
            lower(&change.kind),
            change.name,
            change.action
        );
        if response.dry_run && !change.diff.is_empty() {
            print!("{}", change.diff);
        }
    }
    let summary = counts
        .iter()
        .map(|(action, n)| format!("{n} {action}"))
        .collect::<Vec<_>>()
        .join(", ");
    if response.dry_run {
        eprintln!(
            "dry run: nothing was changed (store at revision {}): {summary}",
            response.revision
        );
    } else {
        eprintln!("revision {}: {summary}", response.revision);
    }
}

pub(crate) async fn apply(client: &Client, args: ApplyArgs) -> Result<u8, CliError> {
    let manifests = read_manifests(&args.files, args.recursive)?;
    let request = ApplyRequest {
        manifests,
        delete: Vec::new(),
        dry_run: args.dry_run,
        message: args.message,
        workspace: client.workspace(),
    };
    let response: ApplyResponse = client.post("/v1/apply", &request).await?;
    match args.output {
        Format::Json => print_json(&response),
        _ => print_changes(&response),
    }
    Ok(0)
}

// === get ===

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Kind, singular or plural (`cell`, `cells`, `shardmap`), `all`, or
    /// `controlplane` (the replicas and the leader).
    kind: String,
    /// One resource's name.
    name: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

fn decode_items(items: &[Value]) -> Vec<Resource> {
    items
        .iter()
        .filter_map(|v| serde_json::from_value(v.clone()).ok())
        .collect()
}

/// The observed `status` of each item that has one (cells), by name.
fn statuses(items: &[Value]) -> Statuses {
    items
        .iter()
        .filter_map(|v| {
            let name = v.pointer("/metadata/name")?.as_str()?;
            Some((name.to_owned(), v.get("status")?.clone()))
        })
        .collect()
}

/// `atoll get controlplane`: the replicas, the leader and its term.
async fn get_control_plane(client: &Client, args: &GetArgs) -> Result<u8, CliError> {
    if args.name.is_some() {
        return Err(CliError::new(USAGE, "`get controlplane` takes no name"));
    }
    let view: atoll_api::rest::LeaderResponse = client.get("/v1/leader").await?;
    match args.output {
        Format::Json => print_json(&view),
        Format::Yaml => print!(
            "{}",
            yaml_documents(&[serde_json::to_value(&view).unwrap_or_default()])
        ),
        Format::Table => {
            let rows: Vec<Vec<String>> = view
                .replicas
                .iter()
                .map(|r| {
                    vec![
                        r.url.clone(),
                        r.role.clone(),
                        r.revision.to_string(),
                        r.lag.to_string(),
                        r.connected_nodes.to_string(),
                        r.started.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::output::table(
                    &["REPLICA", "ROLE", "REVISION", "LAG", "NODES", "STARTED"],
                    &rows
                )
            );
            match (&view.leader, view.term) {
                (Some(leader), Some(term)) => println!("leader {leader}, term {term}"),
                _ => println!(
                    "no leader right now: an election is under way, or the store has no quorum"
                ),
            }
        }
    }
    Ok(0)
}

pub(crate) async fn get(client: &Client, args: GetArgs) -> Result<u8, CliError> {
    if ["controlplane", "control-plane", "replicas"]
        .iter()
        .any(|k| args.kind.eq_ignore_ascii_case(k))
    {
        return get_control_plane(client, &args).await;
    }
    if args.kind.eq_ignore_ascii_case("all") {
        if args.name.is_some() {
            return Err(CliError::new(USAGE, "`get all` takes no name"));
        }
        let list: ListResponse = client.get("/v1/resources").await?;
        match args.output {
            Format::Json => print_json(&list),
            Format::Yaml => print!("{}", yaml_documents(&list.items)),
            Format::Table => {
                let resources = decode_items(&list.items);
                let mut first = true;
                for kind in Kind::ALL {
                    let of_kind: Vec<Resource> = resources
                        .iter()
                        .filter(|r| r.kind() == kind)
                        .cloned()
                        .collect();
                    if of_kind.is_empty() {
                        continue;
                    }
                    if !first {
                        println!();
                    }
                    first = false;
                    println!("== {} ==", kind.plural());
                    print!("{}", resource_table(kind, &of_kind, &statuses(&list.items)));
                }
                if first {
                    eprintln!("no resources (revision {})", list.revision);
                }
            }
        }
        return Ok(0);
    }
    let kind = parse_kind(&args.kind)?;
    match args.name {
        Some(name) => {
            let item: Value = client
                .get(&format!(
                    "/v1/resources/{}/{}",
                    kind.plural(),
                    segment(&name)
                ))
                .await?;
            match args.output {
                Format::Json => print_json(&item),
                Format::Yaml => print!("{}", yaml_documents(std::slice::from_ref(&item))),
                Format::Table => print!(
                    "{}",
                    resource_table(
                        kind,
                        &decode_items(std::slice::from_ref(&item)),
                        &statuses(&[item])
                    )
                ),
            }
        }
        None => {
            let list: ListResponse = client
                .get(&format!("/v1/resources/{}", kind.plural()))
                .await?;
            match args.output {
                Format::Json => print_json(&list),
                Format::Yaml => print!("{}", yaml_documents(&list.items)),
                Format::Table if list.items.is_empty() => {
                    eprintln!("no {} (revision {})", kind.plural(), list.revision);
                }
                Format::Table => print!(
                    "{}",
                    resource_table(kind, &decode_items(&list.items), &statuses(&list.items))
                ),
            }
        }
    }
    Ok(0)
}

// === delete ===

#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// `KIND/NAME` or `KIND NAME`; or use -f.
    #[arg(required_unless_present = "files", conflicts_with = "files")]
    target: Option<String>,
    /// The name, when the kind is given alone.
    name: Option<String>,
    /// Delete every resource of these manifests, in one revision.
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Also read subdirectories.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Only if the resource is still at this revision.
    #[arg(long, conflicts_with = "files")]
    resource_version: Option<u64>,
    /// Validate and show what would be deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Why: kept in the audit log.
    #[arg(short, long)]
    message: Option<String>,
}

pub(crate) async fn delete(client: &Client, args: DeleteArgs) -> Result<u8, CliError> {
    let delete = if let Some(target) = &args.target {
        let (kind, name) = parse_target(target, args.name.as_deref())?;
        vec![ResourceRef {
            kind: kind.as_str().into(),
            name,
            workspace: None,
            resource_version: args.resource_version,
        }]
    } else {
        let mut refs = Vec::new();
        let mut issues = Vec::new();
        for file in read_manifests(&args.files, args.recursive)? {
            match atoll_model::load(&file.source, &file.content) {
                Ok(found) => refs.extend(found.into_iter().map(|l| ResourceRef {
                    kind: l.resource.kind().as_str().into(),
                    name: l.resource.name().into(),
                    workspace: l.resource.metadata.workspace.clone(),
                    resource_version: None,
                })),
                Err(found) => issues.extend(found.0.iter().map(ToString::to_string)),
            }
        }
        if !issues.is_empty() {
            let mut error = CliError::new(
                exit::INVALID,
                "the manifests are invalid; nothing was deleted",
            );
            error.details = issues;
            return Err(error);
        }
        refs
    };
    let request = ApplyRequest {
        manifests: Vec::new(),
        delete,
        dry_run: args.dry_run,
        message: args.message,
        workspace: client.workspace(),
    };
    let response: ApplyResponse = client.post("/v1/apply", &request).await?;
    print_changes(&response);
    Ok(0)
}

// === history and rollback ===

#[derive(Debug, Args)]
pub(crate) struct HistoryArgs {
    /// `KIND/NAME`, e.g. `shardmap/users`.
    target: String,
    /// The name, when the kind is given alone.
    name: Option<String>,
    /// Also print each change's diff.
    #[arg(long)]
    diff: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub(crate) async fn history(client: &Client, args: HistoryArgs) -> Result<u8, CliError> {
    let (kind, name) = parse_target(&args.target, args.name.as_deref())?;
    let response: HistoryResponse = client
        .get(&format!(
            "/v1/resources/{}/{}/history",
            kind.plural(),
            segment(&name)
        ))
        .await?;
    match args.output {
        Format::Json => print_json(&response),
        Format::Yaml => {
            let value = serde_json::to_value(&response).unwrap_or_default();
            print!("{}", atoll_model::to_yaml(&value));
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = response
                .entries
                .iter()
                .map(|e| {
                    vec![
                        e.revision.to_string(),
                        e.time.clone(),
                        e.author.clone(),
                        e.action.clone(),
                        e.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["REVISION", "TIME", "AUTHOR", "ACTION", "MESSAGE"], &rows)
            );
            if args.diff {
                for entry in &response.entries {
                    println!("\n== revision {} ==", entry.revision);
                    print!("{}", entry.diff);
                }
            }
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub(crate) struct RollbackArgs {
    /// `KIND/NAME`, e.g. `shardmap/users`.
    target: String,
    /// The name, when the kind is given alone.
    name: Option<String>,
    /// The revision whose content to restore (see `atoll history`).
    #[arg(long, alias = "revision", value_name = "REVISION")]
    to_revision: u64,
    /// Validate and print the diff; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Why: kept in the audit log.
    #[arg(short, long)]
    message: Option<String>,
}

pub(crate) async fn rollback(client: &Client, args: RollbackArgs) -> Result<u8, CliError> {
    let (kind, name) = parse_target(&args.target, args.name.as_deref())?;
    let request = RollbackRequest {
        revision: args.to_revision,
        dry_run: args.dry_run,
        message: args.message,
    };
    let response: ApplyResponse = client
        .post(
            &format!(
                "/v1/resources/{}/{}/rollback",
                kind.plural(),
                segment(&name)
            ),
            &request,
        )
        .await?;
    print_changes(&response);
    if response
        .changes
        .iter()
        .any(|c| c.action == ChangeAction::Unchanged)
        && !args.dry_run
    {
        eprintln!(
            "the resource already has the content of revision {}",
            args.to_revision
        );
    }
    Ok(0)
}

// === nodes and barriers ===

#[derive(Debug, Args)]
pub(crate) struct NodesArgs {
    #[command(subcommand)]
    action: Option<NodesAction>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Subcommand)]
enum NodesAction {
    /// Forget a disconnected node so that barriers stop waiting for it.
    Forget {
        /// The node's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct RegistryArgs {
    #[command(subcommand)]
    action: RegistryAction,
}

#[derive(Debug, Subcommand)]
enum RegistryAction {
    /// List registered instances: of every service, or of SERVICE.
    List {
        /// Only this Service's instances.
        service: Option<String>,
        /// Only instances in this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only instances serving this cell.
        #[arg(long)]
        cell: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

pub(crate) async fn registry(client: &Client, args: RegistryArgs) -> Result<u8, CliError> {
    let RegistryAction::List {
        service,
        zone,
        cell,
        output,
    } = args.action;
    let workspace = client.workspace();
    let mut query: Vec<String> = Vec::new();
    for (name, value) in [
        ("service", &service),
        ("zone", &zone),
        ("cell", &cell),
        ("workspace", &workspace),
    ] {
        if let Some(value) = value {
            query.push(format!("{name}={}", segment(value)));
        }
    }
    let path = if query.is_empty() {
        "/v1/registry".to_owned()
    } else {
        format!("/v1/registry?{}", query.join("&"))
    };
    let response: atoll_api::rest::RegistryResponse = client.get(&path).await?;
    match output {
        Format::Json => print_json(&response),
        Format::Yaml => print!(
            "{}",
            atoll_model::to_yaml(&serde_json::to_value(&response).unwrap_or_default())
        ),
        Format::Table => {
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            let rows: Vec<Vec<String>> = response
                .instances
                .iter()
                .map(|i| {
                    vec![
                        i.service.clone(),
                        i.name.clone(),
                        i.zone.clone(),
                        i.cell.clone(),
                        i.address.clone(),
                        i.protocol.clone(),
                        dash(&i.version),
                        i.weight.to_string(),
                        dash(&i.mode),
                        i.registered_by.clone(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                eprintln!(
                    "no instances registered{}",
                    match &service {
                        Some(service) => format!(" for {service}"),
                        None => String::new(),
                    }
                );
            } else {
                print!(
                    "{}",
                    table(
                        &[
                            "SERVICE",
                            "NAME",
                            "ZONE",
                            "CELL",
                            "ADDRESS",
                            "PROTOCOL",
                            "VERSION",
                            "WEIGHT",
                            "MODE",
                            "REGISTERED BY"
                        ],
                        &rows
                    )
                );
            }
        }
    }
    Ok(0)
}

pub(crate) async fn nodes(client: &Client, args: NodesArgs) -> Result<u8, CliError> {
    if let Some(NodesAction::Forget { name }) = args.action {
        client
            .delete(&format!("/v1/nodes/{}", segment(&name)))
            .await?;
        println!("node {name} forgotten");
        return Ok(0);
    }
    let response: NodesResponse = client.get("/v1/nodes").await?;
    match args.output {
        Format::Json => print_json(&response),
        Format::Yaml => print!(
            "{}",
            atoll_model::to_yaml(&serde_json::to_value(&response).unwrap_or_default())
        ),
        Format::Table => {
            let rows: Vec<Vec<String>> = response
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.role.clone(),
                        if n.zone.is_empty() {
                            "-".into()
                        } else {
                            n.zone.clone()
                        },
                        if n.cell.is_empty() {
                            "-".into()
                        } else {
                            n.cell.clone()
                        },
                        if n.connected {
                            "connected".into()
                        } else {
                            "disconnected".into()
                        },
                        n.applied_version.to_string(),
                        n.sent_version.to_string(),
                        // A version it cannot receive at all, else the last
                        // one it refused.
                        match (&n.problem, &n.last_nack) {
                            (Some(problem), _) => problem.clone(),
                            (None, Some(nack)) => format!("v{}: {}", nack.version, nack.reason),
                            (None, None) => "-".into(),
                        },
                    ]
                })
                .collect();
            println!("config version {}", response.version);
            if rows.is_empty() {
                eprintln!("no data-plane nodes have connected");
            } else {
                print!(
                    "{}",
                    table(
                        &[
                            "NAME", "ROLE", "ZONE", "CELL", "STATE", "APPLIED", "SENT", "PROBLEM"
                        ],
                        &rows
                    )
                );
            }
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub(crate) struct BarrierArgs {
    /// The config version to wait for [default: the current revision].
    #[arg(long)]
    version: Option<u64>,
    /// Only nodes with this role (gateway, agent...).
    #[arg(long)]
    role: Option<String>,
    /// Only nodes in this zone.
    #[arg(long)]
    zone: Option<String>,
    /// Only nodes of this cell.
    #[arg(long)]
    cell: Option<String>,
    /// Only the node with this name.
    #[arg(long)]
    name: Option<String>,
    /// How long to wait.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// Fail unless at least this many nodes match.
    #[arg(long, default_value_t = 0)]
    min_nodes: usize,
    /// `json` prints the API's answer.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub(crate) async fn barrier(client: &Client, args: BarrierArgs) -> Result<u8, CliError> {
    let request = BarrierRequest {
        selector: NodeSelector {
            role: args.role,
            zone: args.zone,
            cell: args.cell,
            name: args.name,
        },
        version: args.version,
        timeout: Some(args.timeout.clone()),
        min_nodes: args.min_nodes,
    };
    let response: BarrierResponse = client.post("/v1/barrier", &request).await?;
    if args.output == Format::Json {
        print_json(&response);
    } else if response.reached {
        println!(
            "version {} reached by {} node(s) in {} ms",
            response.version, response.matched, response.waited_ms
        );
        if response.matched == 0 {
            eprintln!("no node matched the selector; use --min-nodes to require some");
        }
    } else {
        println!(
            "version {} not reached within {} by {} of {} node(s):",
            response.version,
            args.timeout,
            response.laggards.len(),
            response.matched
        );
        for laggard in &response.laggards {
            let nack = laggard
                .last_nack
                .as_ref()
                .map(|n| format!(", last NACK of v{}: {}", n.version, n.reason))
                .unwrap_or_default();
            let problem = laggard
                .problem
                .as_ref()
                .map(|p| format!(", {p}"))
                .unwrap_or_default();
            println!(
                "  {} (applied {}, {}{nack}{problem})",
                laggard.name,
                laggard.applied_version,
                if laggard.connected {
                    "connected"
                } else {
                    "disconnected"
                }
            );
        }
        if response.matched < args.min_nodes {
            println!(
                "  only {} node(s) matched; --min-nodes is {}",
                response.matched, args.min_nodes
            );
        }
    }
    Ok(if response.reached {
        0
    } else {
        exit::BARRIER_NOT_REACHED
    })
}

// === audit, watch, status ===

#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    #[command(subcommand)]
    command: Option<crate::audit::AuditCommand>,
    /// Commits after this revision.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Also print each commit's diffs.
    #[arg(long)]
    diff: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

fn describe_changes(commit: &CommitRecord) -> String {
    commit
        .changes
        .iter()
        .map(|c| format!("{}/{} {}", lower(&c.kind), c.name, c.action))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) async fn audit(client: &Client, args: AuditArgs) -> Result<u8, CliError> {
    if let Some(command) = args.command {
        return crate::audit::run(client, command).await;
    }
    let response: AuditResponse = client
        .get(&format!(
            "/v1/audit?after={}&limit={}",
            args.after, args.limit
        ))
        .await?;
    match args.output {
        Format::Json => print_json(&response),
        Format::Yaml => print!(
            "{}",
            atoll_model::to_yaml(&serde_json::to_value(&response).unwrap_or_default())
        ),
        Format::Table => {
            let rows: Vec<Vec<String>> = response
                .commits
                .iter()
                .map(|c| {
                    let mut changes = describe_changes(c);
                    if changes.len() > 60 {
                        changes = format!("{} changes", c.changes.len());
                    }
                    vec![
                        c.revision.to_string(),
                        c.time.clone(),
                        c.author.clone(),
                        changes,
                        c.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["REVISION", "TIME", "AUTHOR", "CHANGES", "MESSAGE"], &rows)
            );
            if args.diff {
                for commit in &response.commits {
                    for change in &commit.changes {
                        println!(
                            "\n== revision {} {}/{} ==",
                            commit.revision,
                            lower(&change.kind),
                            change.name
                        );
                        print!("{}", change.diff);
                    }
                }
            }
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Start after this revision [default: now].
    #[arg(long)]
    after: Option<u64>,
    /// `json`: one CommitRecord per line, as the API sends it.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

pub(crate) async fn watch(client: &Client, args: WatchArgs) -> Result<u8, CliError> {
    let path = match args.after {
        Some(after) => format!("/v1/watch?after={after}"),
        None => "/v1/watch".to_owned(),
    };
    let mut response = client.stream(&path).await?;
    let mut buffer = Vec::new();
    loop {
        let chunk = response.chunk().await?;
        let Some(chunk) = chunk else {
            eprintln!("the control plane closed the watch");
            return Ok(0);
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            if args.output == Format::Json {
                print!("{text}");
                continue;
            }
            match serde_json::from_str::<CommitRecord>(&text) {
                Ok(commit) => println!(
                    "revision {} {} by {}: {}",
                    commit.revision,
                    commit.time,
                    commit.author,
                    describe_changes(&commit)
                ),
                Err(_) => print!("{text}"),
            }
        }
    }
}

pub(crate) async fn status(client: &Client, output: Format) -> Result<u8, CliError> {
    let response: StatusResponse = client.get("/v1/status").await?;
    match output {
        Format::Json => print_json(&response),
        Format::Yaml => print!(
            "{}",
            atoll_model::to_yaml(&serde_json::to_value(&response).unwrap_or_default())
        ),
        Format::Table => println!(
            "control plane {}: atoll {}, {} store at revision {}, {} node(s) connected, up {}",
            client.url(),
            response.version,
            response.store,
            response.revision,
            response.connected_nodes,
            humantime::format_duration(std::time::Duration::from_secs(response.uptime_seconds))
        ),
    }
    Ok(0)
}
