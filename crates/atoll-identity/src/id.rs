//! `atoll://<workspace>/<role>/<zone>/<name>`: who a node is, carried as
//! the only URI SAN of its certificate.

use std::fmt;
use std::str::FromStr;

/// What a node is, and so what it may receive and report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A control-plane replica.
    Control,
    /// A north-south gateway of a zone.
    Gateway,
    /// A zone's agent: runs app instances, reports their endpoints.
    Agent,
    /// An east-west sidecar next to an app instance.
    Sidecar,
    /// An app instance using the SDK (leases, positions).
    Sdk,
    /// A person's or a program's client certificate for the REST API.
    User,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::Control,
        Role::Gateway,
        Role::Agent,
        Role::Sidecar,
        Role::Sdk,
        Role::User,
    ];

    /// The word in an identity (`gateway`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Gateway => "gateway",
            Role::Agent => "agent",
            Role::Sidecar => "sidecar",
            Role::Sdk => "sdk",
            Role::User => "user",
        }
    }

    /// Parses the word of an identity.
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The zone of an identity that belongs to no zone (a control-plane
/// replica, a person).
pub const NO_ZONE: &str = "-";

/// A node's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AtollId {
    /// The workspace the node belongs to.
    pub workspace: String,
    /// What it is.
    pub role: Role,
    /// Its zone, or [`NO_ZONE`].
    pub zone: String,
    /// Its name, unique among the nodes of its role in the workspace.
    pub name: String,
}

/// Why text is not an identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{text}` is not an Atoll identity: {reason} (expected atoll://<workspace>/<role>/<zone>/<name>, e.g. atoll://default/gateway/hz-a/gw-1)"
)]
pub struct IdError {
    text: String,
    reason: String,
}

/// A DNS label: what workspaces, zones and names are.
fn label_problem(what: &str, text: &str) -> Option<String> {
    if text.is_empty() || text.len() > 63 {
        return Some(format!("the {what} must be 1 to 63 characters"));
    }
    let ok = text
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok || text.starts_with('-') || text.ends_with('-') {
        return Some(format!(
            "the {what} `{text}` is not a DNS label (lower-case letters, digits and `-`, not at either end)"
        ));
    }
    None
}

impl AtollId {
    /// An identity; each part is checked.
    pub fn new(workspace: &str, role: Role, zone: &str, name: &str) -> Result<Self, IdError> {
        let text = format!("atoll://{workspace}/{role}/{zone}/{name}");
        let fail = |reason: String| IdError {
            text: text.clone(),
            reason,
        };
        if let Some(problem) = label_problem("workspace", workspace) {
            return Err(fail(problem));
        }
        if zone != NO_ZONE
            && let Some(problem) = label_problem("zone", zone)
        {
            return Err(fail(problem));
        }
        if let Some(problem) = label_problem("name", name) {
            return Err(fail(problem));
        }
        Ok(Self {
            workspace: workspace.to_owned(),
            role,
            zone: zone.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Whether the identity has a zone.
    pub fn has_zone(&self) -> bool {
        self.zone != NO_ZONE
    }
}

impl fmt::Display for AtollId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "atoll://{}/{}/{}/{}",
            self.workspace, self.role, self.zone, self.name
        )
    }
}

impl FromStr for AtollId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, IdError> {
        let fail = |reason: &str| IdError {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = text
            .strip_prefix("atoll://")
            .ok_or_else(|| fail("it does not start with atoll://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [workspace, role, zone, name] = parts[..] else {
            return Err(fail("it needs exactly four parts after atoll://"));
        };
        let role = Role::parse(role).ok_or_else(|| {
            fail("the role must be control, gateway, agent, sidecar, sdk or user")
        })?;
        AtollId::new(workspace, role, zone, name)
    }
}

/// The identity in the first certificate of a PEM chain.
pub fn id_of_pem(pem: &str) -> Result<AtollId, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    id_of_certificate(&block.contents)
}

/// The identity in a certificate (DER): its `atoll://` URI SAN.
pub fn id_of_certificate(der: &[u8]) -> Result<AtollId, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate cannot be read: {e}"))?;
    let names = certificate
        .subject_alternative_name()
        .map_err(|e| format!("the certificate's subject alternative names cannot be read: {e}"))?
        .ok_or("the certificate has no subject alternative name, so no Atoll identity")?;
    let mut found = names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("atoll://") => {
                Some(*uri)
            }
            _ => None,
        });
    let uri = found
        .next()
        .ok_or("the certificate has no atoll:// URI, so no Atoll identity")?;
    if found.next().is_some() {
        return Err("the certificate names more than one Atoll identity".into());
    }
    uri.parse().map_err(|e: IdError| e.to_string())
}
