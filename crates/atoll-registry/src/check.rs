//! What a registrant may register: checked against the topology of the
//! replica's configuration before anything is written.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use atoll_api::registry::{Instance, Registrant};
use atoll_model::{Kind, Resource, Spec};

use crate::keys::{ServiceKey, workspace_or_default};

/// A registration refused: which instance, which field, what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The registration is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The registrant may not register this.
    #[error("{0}")]
    Forbidden(String),
}

/// The parts of the configuration a registration is checked against.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    /// Zone -> region.
    zones: HashMap<String, String>,
    /// (workspace, cell) -> zone.
    cells: HashMap<(String, String), String>,
    /// The Services of every workspace.
    services: HashSet<ServiceKey>,
    /// (workspace, instance name) -> (service, cell): the instances the
    /// Apps of each workspace run, named `<app>-<cell>-<replica>` as the
    /// agents name them. A sidecar or SDK process registers only its own.
    app_instances: HashMap<(String, String), (String, String)>,
}

impl Topology {
    /// The topology of a configuration's resources.
    pub fn from_resources<'r>(resources: impl IntoIterator<Item = &'r Resource>) -> Self {
        let mut topology = Self::default();
        for resource in resources {
            match &resource.spec {
                Spec::Zone(zone) => {
                    topology
                        .zones
                        .insert(resource.name().to_owned(), zone.region.clone());
                }
                Spec::Cell(cell) => {
                    topology.cells.insert(
                        (resource.workspace().to_owned(), resource.name().to_owned()),
                        cell.zone.clone(),
                    );
                }
                Spec::App(app) => {
                    for cell in &app.cells {
                        for replica in 0..app.replicas.min(1_000) {
                            topology.app_instances.insert(
                                (
                                    resource.workspace().to_owned(),
                                    format!("{}-{cell}-{replica}", resource.name()),
                                ),
                                (app.service.clone(), cell.clone()),
                            );
                        }
                    }
                }
                _ if resource.kind() == Kind::Service => {
                    topology
                        .services
                        .insert(ServiceKey::new(resource.workspace(), resource.name()));
                }
                _ => {}
            }
        }
        topology
    }

    /// Whether `service` of `workspace` exists.
    pub fn has_service(&self, workspace: &str, service: &str) -> bool {
        self.services.contains(&ServiceKey::new(workspace, service))
    }
}

/// The TTL a session is made with: `ttl_ms` (0: the default), which must be
/// within [`crate::MIN_TTL`]..=[`crate::MAX_TTL`].
pub fn session_ttl(ttl_ms: u64) -> Result<Duration, CheckError> {
    if ttl_ms == 0 {
        return Ok(crate::DEFAULT_TTL);
    }
    let ttl = Duration::from_millis(ttl_ms);
    if ttl < crate::MIN_TTL || ttl > crate::MAX_TTL {
        return Err(CheckError::Invalid(format!(
            "ttlMs {ttl_ms}: a session lasts {} to {} s; give one in that range, or 0 for {} s",
            crate::MIN_TTL.as_secs(),
            crate::MAX_TTL.as_secs(),
            crate::DEFAULT_TTL.as_secs()
        )));
    }
    Ok(ttl)
}

/// What `registrant` is, for `registered_by`: `<role>/<zone>/<name>`.
pub fn registrant_name(registrant: &Registrant) -> String {
    format!(
        "{}/{}/{}",
        registrant.role, registrant.zone, registrant.name
    )
}

/// Who owns a session: `<workspace>/<role>/<zone>/<name>`, so that the
/// same node name in another workspace is another owner.
pub fn session_owner(registrant: &Registrant) -> String {
    format!(
        "{}/{}",
        workspace_or_default(&registrant.workspace),
        registrant_name(registrant)
    )
}

/// Whether `registrant`'s role registers instances at all (checked before
/// a session is made for it).
pub fn may_register(registrant: &Registrant) -> Result<(), CheckError> {
    match registrant.role.as_str() {
        "agent" | "sidecar" | "sdk" => Ok(()),
        other => Err(CheckError::Forbidden(format!(
            "a `{other}` cannot register instances: agents, sidecars and SDK processes do"
        ))),
    }
}

/// Checks `instance` (number `index` of its call) as registered by
/// `registrant` (whose identity the caller has verified) under `session`,
/// and returns it as stored: region from its zone, defaults filled in,
/// `registered_by` and `session` set.
pub fn instance(
    topology: &Topology,
    registrant: &Registrant,
    session: i64,
    index: usize,
    instance: &Instance,
) -> Result<Instance, CheckError> {
    let at = format!(
        "instances[{index}] ({}/{}/{})",
        instance.service, instance.zone, instance.name
    );
    let invalid = |what: String| CheckError::Invalid(format!("{at}: {what}"));
    let workspace = workspace_or_default(&registrant.workspace);
    for (field, value) in [
        ("service", &instance.service),
        ("zone", &instance.zone),
        ("name", &instance.name),
        ("cell", &instance.cell),
    ] {
        if let Some(problem) = atoll_model::names::dns_label_problem(value) {
            return Err(invalid(format!("{field}: {problem}")));
        }
    }
    match registrant.role.as_str() {
        "agent" => {
            if instance.zone != registrant.zone {
                return Err(CheckError::Forbidden(format!(
                    "{at}: the agent of zone `{}` registers instances of its own zone only, not of `{}`",
                    registrant.zone, instance.zone
                )));
            }
        }
        "sidecar" | "sdk" => {
            if instance.zone != registrant.zone || instance.name != registrant.name {
                return Err(CheckError::Forbidden(format!(
                    "{at}: a {} registers only its own instance (`{}` in zone `{}`)",
                    registrant.role, registrant.name, registrant.zone
                )));
            }
            // Its instance is an App's, and serves that App's Service in
            // that App's cell: a certificate for one instance is no
            // licence to serve another Service.
            match topology
                .app_instances
                .get(&(workspace.to_owned(), instance.name.clone()))
            {
                None => {
                    return Err(CheckError::Forbidden(format!(
                        "{at}: no App of workspace `{workspace}` runs an instance named `{}`; a {} registers the instance of an App (`<app>-<cell>-<replica>`)",
                        instance.name, registrant.role
                    )));
                }
                Some((service, cell)) if *service != instance.service || *cell != instance.cell => {
                    return Err(CheckError::Forbidden(format!(
                        "{at}: instance `{}` is App instance of Service `{service}` in cell `{cell}`; it registers as that, not as `{}` in `{}`",
                        instance.name, instance.service, instance.cell
                    )));
                }
                Some(_) => {}
            }
        }
        _ => may_register(registrant)?,
    }
    let Some(region) = topology.zones.get(&instance.zone) else {
        return Err(invalid(format!(
            "zone `{}` does not exist; apply the Zone first",
            instance.zone
        )));
    };
    match topology
        .cells
        .get(&(workspace.to_owned(), instance.cell.clone()))
    {
        None => {
            return Err(invalid(format!(
                "cell `{}` does not exist in workspace `{workspace}`; apply the Cell first",
                instance.cell
            )));
        }
        Some(zone) if *zone != instance.zone => {
            return Err(invalid(format!(
                "cell `{}` is in zone `{zone}`, not `{}`: an instance serves a cell of the zone it runs in",
                instance.cell, instance.zone
            )));
        }
        Some(_) => {}
    }
    if !topology.has_service(workspace, &instance.service) {
        return Err(invalid(format!(
            "Service `{}` does not exist in workspace `{workspace}`; apply it first",
            instance.service
        )));
    }
    if let Some(problem) = address_problem(&instance.address) {
        return Err(invalid(format!("address: {problem}")));
    }
    if instance.port == 0 || instance.port > u32::from(u16::MAX) {
        return Err(invalid(format!(
            "port {}: give the port the instance listens on (1 to 65535)",
            instance.port
        )));
    }
    let protocol = if instance.protocol.is_empty() {
        "http".to_owned()
    } else {
        instance.protocol.to_ascii_lowercase()
    };
    if !crate::PROTOCOLS.contains(&protocol.as_str()) {
        return Err(invalid(format!(
            "protocol `{}`: one of {}",
            instance.protocol,
            crate::PROTOCOLS.join(", ")
        )));
    }
    if instance.version.len() > 63 || instance.version.chars().any(|c| c.is_control()) {
        return Err(invalid(
            "version: at most 63 printable characters".to_owned(),
        ));
    }
    let weight = match instance.weight {
        0 => crate::DEFAULT_WEIGHT,
        w if w <= 10_000 => w,
        w => {
            return Err(invalid(format!(
                "weight {w}: a relative share from 1 to 10000 (0 for {})",
                crate::DEFAULT_WEIGHT
            )));
        }
    };
    if instance.labels.len() > 32 {
        return Err(invalid(format!(
            "{} labels: at most 32",
            instance.labels.len()
        )));
    }
    for (key, value) in &instance.labels {
        if key.is_empty() || key.len() > 63 || value.len() > 253 {
            return Err(invalid(format!(
                "label `{key}`: a key of 1 to 63 characters, a value of at most 253"
            )));
        }
    }
    let mode = match (instance.mode.as_str(), registrant.role.as_str()) {
        ("", "sidecar" | "sdk") => registrant.role.clone(),
        ("" | "sidecar" | "sdk", _) => instance.mode.clone(),
        (other, _) => {
            return Err(invalid(format!(
                "mode `{other}`: `sidecar`, `sdk`, or empty for a direct instance"
            )));
        }
    };
    Ok(Instance {
        region: region.clone(),
        protocol,
        weight,
        mode,
        registered_by: registrant_name(registrant),
        session,
        ..instance.clone()
    })
}

/// Why `address` is no host callers can connect to, if it is not.
fn address_problem(address: &str) -> Option<String> {
    if address.is_empty() {
        return Some("give the host callers connect to (an IP address or a name)".into());
    }
    if address.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let name_ok = address.len() <= 253
        && address.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    (!name_ok).then(|| {
        format!(
            "`{address}` is neither an IP address nor a host name (no port here: it goes in `port`)"
        )
    })
}

#[cfg(test)]
mod tests;
