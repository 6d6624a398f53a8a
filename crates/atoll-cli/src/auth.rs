//! `atoll login`, `logout`, `whoami` and `token`: API tokens, and where the
//! CLI keeps them.
//!
//! The token a command sends is, in order: `--token` (or `$ATOLL_TOKEN`),
//! then the one `atoll login` saved for the control plane's URL in the
//! credentials file (`$ATOLL_CONFIG_DIR/credentials.json`, default
//! `~/.config/atoll/`), kept readable by its owner only (0600 in a 0700
//! directory).

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use atoll_api::rest::{TokenCreated, TokenInfo, TokenList, TokenRequest, WhoAmI};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::client::{CliError, Client, exit};
use crate::commands::print_json;
use crate::output::{Format, table};

/// Overrides where the CLI keeps its configuration.
pub(crate) const CONFIG_DIR_ENV: &str = "ATOLL_CONFIG_DIR";

/// The CLI's configuration directory.
pub(crate) fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CONFIG_DIR_ENV) {
        return PathBuf::from(dir);
    }
    dirs::config_dir()
        .or_else(|| dirs::home_dir().map(|h| h.join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("atoll")
}

fn credentials_path() -> PathBuf {
    config_dir().join("credentials.json")
}

/// What `atoll login` saved: a token per control plane URL.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Credentials {
    #[serde(default)]
    controls: BTreeMap<String, Saved>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    token: String,
    /// Who the control plane said it is, when saved.
    user: String,
}

fn failed(message: impl Into<String>) -> CliError {
    CliError::new(exit::FAILURE, message)
}

impl Credentials {
    fn read(path: &Path) -> Result<Self, CliError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                failed(format!(
                    "{} does not parse ({e}); remove it and `atoll login` again",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(failed(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Writes the file for its owner only, replacing it in one rename.
    fn write(&self, path: &Path) -> Result<(), CliError> {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| failed(format!("cannot make {}: {e}", dir.display())))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        let temporary = path.with_extension("json.new");
        crate::ca::write_private(&temporary, &text)?;
        std::fs::rename(&temporary, path)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
    }
}

/// The token saved for `url` by `atoll login`, if any. A file that cannot
/// be read counts as none (the command then says it needs a credential).
pub(crate) fn saved_token(url: &str) -> Option<String> {
    let credentials = Credentials::read(&credentials_path()).ok()?;
    credentials.controls.get(url).map(|s| s.token.clone())
}

#[derive(Debug, Args)]
pub(crate) struct LoginArgs {
    /// The API token; without it, read from the first line of stdin (so
    /// that it stays out of the shell's history).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

/// `atoll login`: checks the token with the control plane, then saves it.
pub(crate) async fn login(client: &Client, args: LoginArgs) -> Result<u8, CliError> {
    let text = match args.token {
        Some(token) => token,
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!("API token for {}: ", client.urls());
            }
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| failed(format!("cannot read the token from stdin: {e}")))?;
            line
        }
    };
    let token = atoll_identity::Token::parse(&text)
        .map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let me: WhoAmI = client
        .with_token(&token.to_string())?
        .get("/v1/whoami")
        .await?;
    if me.kind != "user" {
        return Err(CliError::new(
            exit::UNAUTHENTICATED,
            format!(
                "the control plane at {} does not take this token as a user (it says: {} {}); nothing was saved",
                client.urls(),
                me.kind,
                me.name
            ),
        ));
    }
    let path = credentials_path();
    let mut credentials = Credentials::read(&path)?;
    credentials.controls.insert(
        client.urls().to_owned(),
        Saved {
            token: token.to_string(),
            user: me.name.clone(),
        },
    );
    credentials.write(&path)?;
    println!(
        "logged in to {} as {}{}; the token is saved in {}",
        client.urls(),
        me.name,
        describe_roles(&me),
        path.display()
    );
    Ok(0)
}

fn describe_roles(me: &WhoAmI) -> String {
    let mut text = String::new();
    if !me.groups.is_empty() {
        text.push_str(&format!(" (groups {})", me.groups.join(", ")));
    }
    if !me.roles.is_empty() {
        let roles: Vec<String> = me
            .roles
            .iter()
            .map(|(workspace, role)| format!("{role} of {workspace}"))
            .collect();
        text.push_str(&format!(", {}", roles.join(", ")));
    }
    text
}

/// `atoll logout`: forgets the token saved for this control plane.
pub(crate) fn logout(client: &Client) -> Result<u8, CliError> {
    let path = credentials_path();
    let mut credentials = Credentials::read(&path)?;
    if credentials.controls.remove(client.urls()).is_some() {
        credentials.write(&path)?;
        println!("logged out of {}", client.urls());
    } else {
        println!("no token was saved for {}", client.urls());
    }
    Ok(0)
}

/// `atoll whoami`.
pub(crate) async fn whoami(client: &Client, output: Format) -> Result<u8, CliError> {
    let me: WhoAmI = client.get("/v1/whoami").await?;
    match output {
        Format::Json => print_json(&me),
        Format::Yaml => print!(
            "{}",
            atoll_model::to_yaml(&serde_json::to_value(&me).unwrap_or_default())
        ),
        Format::Table => {
            println!(
                "{} ({}, by {}) at {}{}",
                me.name,
                me.kind,
                me.credential,
                client.urls(),
                describe_roles(&me)
            );
            if !me.access_control {
                println!(
                    "access control is off on this control plane (--insecure): every caller may do everything"
                );
            }
        }
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make an API token for a user (yourself by default), or a bootstrap
    /// token for a node to join (`--role`, `--zone`). The token is printed
    /// once.
    Create(CreateArgs),
    /// List your tokens (a fleet admin: every token).
    List(ListArgs),
    /// Revoke a token by its id (or the whole token): it stops working at
    /// once.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// The user the API token acts as [default: you].
    #[arg(long, value_name = "USER", conflicts_with_all = ["role", "zone"])]
    user: Option<String>,
    /// A group of the user (repeat for several); `atoll:admins` and
    /// `atoll:viewers` span the fleet, others are bound in Workspaces.
    #[arg(long = "group", value_name = "GROUP")]
    groups: Vec<String>,
    /// For a bootstrap token: the role of the node that joins with it
    /// (gateway, agent, sidecar, sdk, control).
    #[arg(long, value_name = "ROLE")]
    role: Option<String>,
    /// For a bootstrap token: the zone the node runs in.
    #[arg(long, value_name = "ZONE")]
    zone: Option<String>,
    /// How long the token is valid (`1h`, `30d`) [default: 90d for an API
    /// token, 1h for a bootstrap token].
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// What it is for (shown in `atoll token list`).
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Debug, Args)]
struct RevokeArgs {
    /// The token's id (16 hex digits), or the whole token.
    id: String,
}

pub(crate) async fn token(client: &Client, args: TokenArgs) -> Result<u8, CliError> {
    match args.command {
        TokenCommand::Create(args) => {
            let node = args.role.is_some() || args.zone.is_some();
            let request = TokenRequest {
                user: args.user,
                groups: args.groups,
                role: args.role,
                zone: args.zone,
                workspace: node.then(|| client.workspace()).flatten(),
                ttl: args.ttl,
                description: args.description,
            };
            let created: TokenCreated = match client.post_or_pending("/v1/tokens", &request).await?
            {
                crate::client::Outcome::Done(created) => created,
                crate::client::Outcome::Pending(pending) => {
                    match args.output {
                        Format::Json => print_json(&pending),
                        Format::Yaml => print!(
                            "{}",
                            atoll_model::to_yaml(
                                &serde_json::to_value(&pending).unwrap_or_default()
                            )
                        ),
                        Format::Table => {
                            if let Some(token) = &pending.token {
                                println!("{token}");
                            }
                            eprintln!(
                                "the token is shown only now and works once approved: {}",
                                pending.message
                            );
                        }
                    }
                    return Ok(exit::AWAITING_APPROVAL);
                }
            };
            match args.output {
                Format::Json => print_json(&created),
                Format::Yaml => print!(
                    "{}",
                    atoll_model::to_yaml(&serde_json::to_value(&created).unwrap_or_default())
                ),
                Format::Table => {
                    println!("{}", created.token);
                    let info = &created.info;
                    let whom = info
                        .user
                        .clone()
                        .or_else(|| info.node.clone())
                        .unwrap_or_default();
                    eprintln!(
                        "{} token {} for {whom}, valid until {}; it is shown only now: {}",
                        info.kind,
                        info.id,
                        info.expires,
                        if info.kind == "api" {
                            "`atoll login` with it, or send it as `Authorization: Bearer`"
                        } else {
                            "give it to the node that joins"
                        }
                    );
                }
            }
            Ok(0)
        }
        TokenCommand::List(args) => {
            let list: TokenList = client.get("/v1/tokens").await?;
            match args.output {
                Format::Json => print_json(&list),
                Format::Yaml => print!(
                    "{}",
                    atoll_model::to_yaml(&serde_json::to_value(&list).unwrap_or_default())
                ),
                Format::Table => print!("{}", token_table(&list.tokens)),
            }
            Ok(0)
        }
        TokenCommand::Revoke(args) => {
            let info: TokenInfo = client
                .delete_json(&format!("/v1/tokens/{}", crate::client::segment(&args.id)))
                .await?;
            println!(
                "token {} revoked by {} at {}",
                info.id,
                info.revoked_by.as_deref().unwrap_or("?"),
                info.revoked.as_deref().unwrap_or("?")
            );
            Ok(0)
        }
    }
}

fn token_table(tokens: &[TokenInfo]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let state = if t.revoked.is_some() {
                "revoked".to_owned()
            } else if let Some(approval) = &t.awaiting_approval {
                format!("awaiting {approval}")
            } else if t.used.is_some() {
                "used".to_owned()
            } else {
                let expired = time::OffsetDateTime::parse(
                    &t.expires,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_ok_and(|at| at <= time::OffsetDateTime::now_utc());
                if expired { "expired" } else { "valid" }.to_owned()
            };
            vec![
                t.id.clone(),
                t.kind.clone(),
                t.user
                    .clone()
                    .or_else(|| t.node.clone())
                    .unwrap_or_default(),
                t.groups.join(","),
                state,
                t.expires.clone(),
                t.created_by.clone(),
                t.description.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "KIND",
            "FOR",
            "GROUPS",
            "STATE",
            "EXPIRES",
            "CREATED BY",
            "DESCRIPTION",
        ],
        &rows,
    )
}
