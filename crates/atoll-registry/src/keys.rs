//! Where a registered instance lives in the coordination keyspace:
//! `registry/<workspace>/<service>/<zone>/<instance>`, each part a DNS
//! label, so a key splits back without ambiguity.

use atoll_api::registry::{Instance, InstanceKey};

/// The prefix of every registry key.
pub const PREFIX: &str = "registry/";

/// A service of a workspace: what a subscriber watches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The workspace (never empty: `default` for the default one).
    pub workspace: String,
    /// The Service's name.
    pub service: String,
}

impl ServiceKey {
    /// `service` of `workspace` (empty: `default`).
    pub fn new(workspace: &str, service: &str) -> Self {
        Self {
            workspace: workspace_or_default(workspace).to_owned(),
            service: service.to_owned(),
        }
    }

    /// The keyspace prefix of the service's instances.
    pub fn prefix(&self) -> String {
        format!("{PREFIX}{}/{}/", self.workspace, self.service)
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.workspace, self.service)
    }
}

/// `default` for an empty workspace.
pub fn workspace_or_default(workspace: &str) -> &str {
    if workspace.is_empty() {
        atoll_model::DEFAULT_WORKSPACE
    } else {
        workspace
    }
}

/// The key of `instance` of `workspace`.
pub fn instance_key(workspace: &str, instance: &Instance) -> String {
    key(workspace, &instance.service, &instance.zone, &instance.name)
}

/// The key of the instance `name` of `service` in `zone`.
pub fn key(workspace: &str, service: &str, zone: &str, name: &str) -> String {
    format!(
        "{PREFIX}{}/{service}/{zone}/{name}",
        workspace_or_default(workspace)
    )
}

/// A key split back: its service and the instance's key.
pub fn parse(key: &str) -> Option<(ServiceKey, InstanceKey)> {
    let rest = key.strip_prefix(PREFIX)?;
    let mut parts = rest.split('/');
    let (workspace, service, zone, name) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || [workspace, service, zone, name]
            .iter()
            .any(|p| p.is_empty())
    {
        return None;
    }
    Some((
        ServiceKey {
            workspace: workspace.to_owned(),
            service: service.to_owned(),
        },
        InstanceKey {
            service: service.to_owned(),
            zone: zone.to_owned(),
            name: name.to_owned(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_splits_back_into_its_parts() {
        let key = key("", "bank", "hz-a", "bank-rz01-0");
        assert_eq!(key, "registry/default/bank/hz-a/bank-rz01-0");
        let (service, instance) = parse(&key).expect("parses");
        assert_eq!(service, ServiceKey::new("default", "bank"));
        assert_eq!(instance.zone, "hz-a");
        assert_eq!(instance.name, "bank-rz01-0");
        assert!(parse("registry/default/bank/hz-a").is_none());
        assert!(parse("registry/default/bank/hz-a/x/y").is_none());
        assert!(parse("nodes/x").is_none());
        assert!(parse("registry/default//hz-a/x").is_none());
    }
}
