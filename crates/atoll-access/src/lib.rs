//! Who may do what in Atoll.
//!
//! A [`Principal`] comes from a credential only (an API token, a client
//! certificate), never from what a client writes. [`Policy::decide`] answers
//! whether it may take an [`Action`]: deny by default, roles (`viewer`,
//! `operator`, `admin`) bound to users and groups per workspace in the
//! Workspace resources, plus two built-in groups for the whole fleet:
//! [`ADMINS`] (everything) and [`VIEWERS`] (read everything).
//!
//! A small table of our own rather than a policy language (casbin): the
//! rules are role × action, the bindings are in resources every replica
//! already holds, and a second language would give users something more to
//! review and nothing they could use.
//!
//! Nodes (gateways, agents, sidecars, SDK processes) only read their own
//! workspace on the REST API: what they may receive and report on the
//! config stream is decided where the stream is served, from their
//! certificate's role and zone.

use std::collections::HashMap;
use std::fmt;

use atoll_identity::{AtollId, Role};
use atoll_model::{AccessRole, ApprovalRule, Kind, Resource, ResourceKey, Spec, WorkspaceSpec};

/// The group whose members may do everything everywhere.
pub const ADMINS: &str = "atoll:admins";
/// The group whose members may read everything everywhere.
pub const VIEWERS: &str = "atoll:viewers";

/// Who is calling, as its credential says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A person or a program: an API token's user, or a user certificate's
    /// name.
    User {
        /// The user name.
        name: String,
        /// The groups (an API token's).
        groups: Vec<String>,
    },
    /// A node, by its certificate.
    Node(AtollId),
    /// A control plane that runs without access control (`--insecure`):
    /// the name is what the client claimed, and everything is allowed.
    Unverified(String),
    /// No credential at all.
    Anonymous,
}

impl Principal {
    /// The name the audit log records: `alice`, `atoll://default/gateway/hz-a/gw-1`,
    /// `bob (unverified)`, `anonymous`.
    pub fn name(&self) -> String {
        match self {
            Principal::User { name, .. } => name.clone(),
            Principal::Node(id) => id.to_string(),
            Principal::Unverified(name) => format!("{name} (unverified)"),
            Principal::Anonymous => "anonymous".to_owned(),
        }
    }

    /// The user name, for a person or a program.
    pub fn user(&self) -> Option<&str> {
        match self {
            Principal::User { name, .. } => Some(name),
            Principal::Unverified(name) => Some(name),
            _ => None,
        }
    }

    fn in_group(&self, group: &str) -> bool {
        matches!(self, Principal::User { groups, .. } if groups.iter().any(|g| g == group))
    }

    /// Whether this is a fleet admin (or access control is off).
    pub fn is_fleet_admin(&self) -> bool {
        matches!(self, Principal::Unverified(_)) || self.in_group(ADMINS)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User { name, groups } if groups.is_empty() => write!(f, "user {name}"),
            Principal::User { name, groups } => {
                write!(f, "user {name} (groups {})", groups.join(", "))
            }
            Principal::Node(id) => write!(f, "node {id}"),
            Principal::Unverified(name) => write!(f, "{name} (unverified)"),
            Principal::Anonymous => f.write_str("an anonymous caller"),
        }
    }
}

/// What a caller asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Read resources of a workspace; `None`: of the fleet (workspaces,
    /// regions, zones).
    Read(Option<&'a str>),
    /// Create, replace or delete this resource.
    Write(&'a ResourceKey),
    /// Roll this resource back to a past revision.
    Rollback(&'a ResourceKey),
    /// Start or abort a switchover in a workspace.
    Switchover(&'a str),
    /// Approve a switchover or failover waiting for a second person.
    Approve(&'a str),
    /// Create a bootstrap token for a node of a workspace.
    BootstrapToken(&'a str),
    /// Read what spans every workspace: the audit log and chain, the watch
    /// of every commit, the node list.
    ReadFleet,
    /// Forget a node, create or revoke other users' API tokens.
    AdministerFleet,
    /// Wait (a barrier) or ask who one is: anyone with a credential.
    Observe,
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Read(Some(ws)) => write!(f, "read workspace {ws}"),
            Action::Read(None) => f.write_str("read the fleet's workspaces, regions and zones"),
            Action::Write(key) => write!(f, "change {key}"),
            Action::Rollback(key) => write!(f, "roll back {key}"),
            Action::Switchover(ws) => write!(f, "run switchovers in workspace {ws}"),
            Action::Approve(ws) => write!(f, "approve in workspace {ws}"),
            Action::BootstrapToken(ws) => {
                write!(f, "create bootstrap tokens for nodes of workspace {ws}")
            }
            Action::ReadFleet => f.write_str("read the audit log, the watch and the node list"),
            Action::AdministerFleet => f.write_str("administer the fleet"),
            Action::Observe => f.write_str("wait for a barrier"),
        }
    }
}

/// Why an action is refused: the whole sentence for the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// Whether any credential was given (no: 401, yes: 403).
    pub authenticated: bool,
    /// What, who and what to do.
    pub message: String,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The bindings and approval rules of every workspace, read from the
/// Workspace resources.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    workspaces: HashMap<String, WorkspaceSpec>,
}

impl Policy {
    /// The policy of these resources (only the Workspaces count).
    pub fn from_resources<'r>(resources: impl IntoIterator<Item = &'r Resource>) -> Self {
        let workspaces = resources
            .into_iter()
            .filter_map(|r| match &r.spec {
                Spec::Workspace(spec) => Some((r.name().to_owned(), spec.clone())),
                _ => None,
            })
            .collect();
        Self { workspaces }
    }

    /// The highest role `principal` has in `workspace` (fleet groups
    /// included).
    pub fn role(&self, principal: &Principal, workspace: &str) -> Option<AccessRole> {
        let Principal::User { name, groups } = principal else {
            return matches!(principal, Principal::Unverified(_)).then_some(AccessRole::Admin);
        };
        if groups.iter().any(|g| g == ADMINS) {
            return Some(AccessRole::Admin);
        }
        let fleet = groups
            .iter()
            .any(|g| g == VIEWERS)
            .then_some(AccessRole::Viewer);
        let bound = self.workspaces.get(workspace).and_then(|spec| {
            spec.bindings
                .iter()
                .filter(|b| {
                    b.users.iter().any(|u| u == name) || b.groups.iter().any(|g| groups.contains(g))
                })
                .map(|b| b.role)
                .max()
        });
        fleet.max(bound)
    }

    /// Whether `rule` needs a second person in `workspace`.
    pub fn needs_approval(&self, workspace: &str, rule: ApprovalRule) -> bool {
        self.workspaces
            .get(workspace)
            .is_some_and(|spec| spec.approvals.contains(&rule))
    }

    /// Whether `principal` may take `action`.
    pub fn decide(&self, principal: &Principal, action: Action<'_>) -> Result<(), Denied> {
        let refuse = |message: String| {
            Err(Denied {
                authenticated: true,
                message,
            })
        };
        match principal {
            Principal::Unverified(_) => return Ok(()),
            Principal::Anonymous => {
                return Err(Denied {
                    authenticated: false,
                    message: format!(
                        "no credentials: to {action}, send an API token (`atoll login`, or `Authorization: Bearer atk_...`) or a user certificate"
                    ),
                });
            }
            // A node reads what it receives on the config stream anyway:
            // its workspace's resources and the fleet's (a gateway looks
            // its own Gateway up). Nothing else.
            Principal::Node(id) => {
                return match action {
                    Action::Read(None) => Ok(()),
                    Action::Read(Some(workspace)) if workspace == id.workspace => Ok(()),
                    _ => refuse(format!(
                        "{id} is a node's certificate ({} role), which may only read its own workspace on the REST API, not {action}; use a person's or a program's API token or user certificate",
                        id.role
                    )),
                };
            }
            Principal::User { .. } if principal.is_fleet_admin() => return Ok(()),
            Principal::User { .. } => {}
        }
        let needs = |workspace: &str, role: AccessRole| -> Result<(), Denied> {
            match self.role(principal, workspace) {
                Some(held) if held >= role => Ok(()),
                held => refuse(format!(
                    "{principal} may not {action}: that needs the {} role in workspace {workspace}, and {}; an admin of {workspace} can bind it in Workspace/{workspace} (docs/security.md#roles)",
                    role.as_str(),
                    match held {
                        Some(held) => format!("they are {} there", held.as_str()),
                        None => "they have no role there".to_owned(),
                    }
                )),
            }
        };
        let fleet_only = || {
            refuse(format!(
                "{principal} may not {action}: that needs the group {ADMINS} (docs/security.md#roles)"
            ))
        };
        match action {
            Action::Read(None) | Action::Observe => Ok(()),
            Action::Read(Some(workspace)) => needs(workspace, AccessRole::Viewer),
            Action::Write(key) | Action::Rollback(key) => match key.kind {
                // A workspace's admins keep its bindings; making or
                // removing a workspace, a region or a zone is the fleet's.
                Kind::Workspace if self.workspaces.contains_key(&key.name) => {
                    needs(&key.name, AccessRole::Admin)
                }
                kind if kind.is_fleet() => fleet_only(),
                _ => needs(&key.workspace, AccessRole::Operator),
            },
            Action::Switchover(workspace) | Action::Approve(workspace) => {
                needs(workspace, AccessRole::Operator)
            }
            Action::BootstrapToken(workspace) => needs(workspace, AccessRole::Admin),
            Action::ReadFleet => {
                if principal.in_group(VIEWERS) {
                    Ok(())
                } else {
                    refuse(format!(
                        "{principal} may not {action}: that spans every workspace and needs the group {VIEWERS} or {ADMINS} (docs/security.md#roles)"
                    ))
                }
            }
            Action::AdministerFleet => fleet_only(),
        }
    }
}

/// What a node of `role` may write with its certificate, apart from the
/// config stream's own messages: agents report the Endpoints of their zone,
/// nobody else writes anything.
pub fn node_may_report_endpoints(id: &AtollId, zone: &str) -> bool {
    id.role == Role::Agent && id.zone == zone
}

#[cfg(test)]
mod tests;
