//! The resource kinds of `apiVersion: atoll/v1` and their specs.
//!
//! Field names follow the manifest contract in `docs/manifests.md`: camelCase in
//! YAML and JSON, and every struct refuses unknown fields so a typo is an error
//! rather than a silently ignored setting.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::shards::{ShardRange, ShardSet};

/// The only API version this release reads and writes.
pub const API_VERSION: &str = "atoll/v1";

/// The kinds of resource, in dependency order: a kind only refers to kinds
/// listed before it, so applying in this order never meets a dangling
/// reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// A group of cells, shard maps, services, apps and gateways that one
    /// team owns; what roles are bound to.
    Workspace,
    /// A geographic location, usually a city.
    Region,
    /// An availability zone (datacenter) in a region.
    Zone,
    /// A logical unit placed in one zone.
    Cell,
    /// How a request's routing key becomes a shard.
    ShardRule,
    /// Which cell owns each shard.
    ShardMap,
    /// A service and how it is routed.
    Service,
    /// An access rule from requests to a service.
    Route,
    /// A north-south entry of one zone.
    Gateway,
    /// An application that agents run in cells.
    App,
    /// The endpoints an agent reports for a service in its zone.
    Endpoints,
    /// A move of shard ranges between cells, run by the control plane.
    Switchover,
}

impl Kind {
    /// Every kind, in dependency order.
    pub const ALL: [Kind; 12] = [
        Kind::Workspace,
        Kind::Region,
        Kind::Zone,
        Kind::Cell,
        Kind::ShardRule,
        Kind::ShardMap,
        Kind::Service,
        Kind::Route,
        Kind::Gateway,
        Kind::App,
        Kind::Endpoints,
        Kind::Switchover,
    ];

    /// The name as written in `kind:` (`ShardMap`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Workspace => "Workspace",
            Kind::Region => "Region",
            Kind::Zone => "Zone",
            Kind::Cell => "Cell",
            Kind::ShardRule => "ShardRule",
            Kind::ShardMap => "ShardMap",
            Kind::Service => "Service",
            Kind::Route => "Route",
            Kind::Gateway => "Gateway",
            Kind::App => "App",
            Kind::Endpoints => "Endpoints",
            Kind::Switchover => "Switchover",
        }
    }

    /// The lower-case plural used in API paths (`shardmaps`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Workspace => "workspaces",
            Kind::Region => "regions",
            Kind::Zone => "zones",
            Kind::Cell => "cells",
            Kind::ShardRule => "shardrules",
            Kind::ShardMap => "shardmaps",
            Kind::Service => "services",
            Kind::Route => "routes",
            Kind::Gateway => "gateways",
            Kind::App => "apps",
            Kind::Endpoints => "endpoints",
            Kind::Switchover => "switchovers",
        }
    }

    /// Parses a kind the way kubectl does: any case, singular or plural, and a
    /// few short names (`svc`, `gw`, `sm`, `sr`).
    pub fn parse(text: &str) -> Option<Kind> {
        let lower = text.to_ascii_lowercase().replace(['-', '_'], "");
        let kind = match lower.as_str() {
            "workspace" | "workspaces" | "ws" => Kind::Workspace,
            "region" | "regions" => Kind::Region,
            "zone" | "zones" => Kind::Zone,
            "cell" | "cells" => Kind::Cell,
            "shardrule" | "shardrules" | "sr" => Kind::ShardRule,
            "shardmap" | "shardmaps" | "sm" => Kind::ShardMap,
            "service" | "services" | "svc" => Kind::Service,
            "route" | "routes" => Kind::Route,
            "gateway" | "gateways" | "gw" => Kind::Gateway,
            "app" | "apps" => Kind::App,
            "endpoints" | "endpoint" | "ep" => Kind::Endpoints,
            "switchover" | "switchovers" | "so" => Kind::Switchover,
            _ => return None,
        };
        Some(kind)
    }

    /// The names `parse` accepts, for error messages.
    pub fn expected() -> &'static str {
        "workspace, region, zone, cell, shardrule, shardmap, service, route, gateway, app, endpoints, switchover (singular or plural)"
    }

    /// Whether resources of this kind belong to the whole fleet (Workspace,
    /// Region, Zone: the datacenters every workspace shares) rather than to
    /// one workspace.
    pub fn is_fleet(self) -> bool {
        matches!(self, Kind::Workspace | Kind::Region | Kind::Zone)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The workspace of a resource whose manifest names none.
pub const DEFAULT_WORKSPACE: &str = "default";

/// A resource's identity: its kind, its workspace (none for the fleet's
/// kinds) and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "RawKey")]
pub struct ResourceKey {
    /// The kind.
    pub kind: Kind,
    /// The workspace: empty for the fleet's kinds ([`Kind::is_fleet`]),
    /// never empty for the others.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workspace: String,
    /// The name, a DNS label.
    pub name: String,
}

/// A key as stored: records written before workspaces have none.
#[derive(Deserialize)]
struct RawKey {
    kind: Kind,
    #[serde(default)]
    workspace: String,
    name: String,
}

impl From<RawKey> for ResourceKey {
    fn from(raw: RawKey) -> Self {
        Self::in_workspace(raw.kind, &raw.workspace, raw.name)
    }
}

impl ResourceKey {
    /// A key in the default workspace (or of the fleet, for its kinds).
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self::in_workspace(kind, DEFAULT_WORKSPACE, name)
    }

    /// A key in `workspace` (empty: the default one); the fleet's kinds
    /// have no workspace, whatever is given.
    pub fn in_workspace(kind: Kind, workspace: &str, name: impl Into<String>) -> Self {
        let workspace = if kind.is_fleet() {
            String::new()
        } else if workspace.is_empty() {
            DEFAULT_WORKSPACE.to_owned()
        } else {
            workspace.to_owned()
        };
        Self {
            kind,
            workspace,
            name: name.into(),
        }
    }

    /// Whether the key is in the default workspace or of the fleet.
    pub fn in_default(&self) -> bool {
        self.workspace.is_empty() || self.workspace == DEFAULT_WORKSPACE
    }
}

/// `Kind/name`, and `Kind/name@workspace` outside the default workspace;
/// also the key's text in the store (a DNS label holds no `@`).
impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.in_default() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}@{}", self.kind, self.name, self.workspace)
        }
    }
}

/// `metadata` of every resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique among resources of its kind in its workspace; a DNS label
    /// (RFC 1123).
    pub name: String,
    /// The workspace, a DNS label; absent for the default workspace and
    /// for the fleet's kinds (Workspace, Region, Zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The store revision that last changed this resource. Set by the control
    /// plane on reads; when a manifest carries it, the write succeeds only if
    /// the resource is still at that revision (optimistic concurrency). `0`
    /// means "must not exist yet".
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "resource_version"
    )]
    pub resource_version: Option<u64>,
}

/// `resourceVersion` is a string on the wire, as in Kubernetes; a bare integer
/// is accepted too.
mod resource_version {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_str(&v.to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Number(n)) => Ok(Some(n)),
            Some(Raw::Text(t)) => t.parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!(
                    "resourceVersion `{t}` is not a revision number; copy it from `atoll get -o yaml` or remove it"
                ))
            }),
        }
    }
}

/// A resource: metadata plus the spec of its kind.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// Name, labels, annotations, resource version.
    pub metadata: Metadata,
    /// The kind-specific part.
    pub spec: Spec,
}

impl Resource {
    /// The kind, taken from the spec.
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Kind, workspace and name.
    pub fn key(&self) -> ResourceKey {
        ResourceKey::in_workspace(
            self.kind(),
            self.metadata.workspace.as_deref().unwrap_or_default(),
            self.metadata.name.clone(),
        )
    }

    /// The workspace (empty for the fleet's kinds).
    pub fn workspace(&self) -> &str {
        if self.kind().is_fleet() {
            ""
        } else {
            self.metadata
                .workspace
                .as_deref()
                .filter(|w| !w.is_empty())
                .unwrap_or(DEFAULT_WORKSPACE)
        }
    }

    /// A copy without server-set metadata, for comparing content.
    pub fn without_version(&self) -> Resource {
        let mut copy = self.clone();
        copy.metadata.resource_version = None;
        copy
    }
}

/// The kind-specific part of a resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// See [`WorkspaceSpec`].
    Workspace(WorkspaceSpec),
    /// See [`RegionSpec`].
    Region(RegionSpec),
    /// See [`ZoneSpec`].
    Zone(ZoneSpec),
    /// See [`CellSpec`].
    Cell(CellSpec),
    /// See [`ShardRuleSpec`].
    ShardRule(ShardRuleSpec),
    /// See [`ShardMapSpec`].
    ShardMap(ShardMapSpec),
    /// See [`ServiceSpec`].
    Service(ServiceSpec),
    /// See [`RouteSpec`].
    Route(RouteSpec),
    /// See [`GatewaySpec`].
    Gateway(GatewaySpec),
    /// See [`AppSpec`].
    App(AppSpec),
    /// See [`EndpointsSpec`].
    Endpoints(EndpointsSpec),
    /// See [`SwitchoverSpec`].
    Switchover(SwitchoverSpec),
}

impl Spec {
    /// The kind of this spec.
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Workspace(_) => Kind::Workspace,
            Spec::Region(_) => Kind::Region,
            Spec::Zone(_) => Kind::Zone,
            Spec::Cell(_) => Kind::Cell,
            Spec::ShardRule(_) => Kind::ShardRule,
            Spec::ShardMap(_) => Kind::ShardMap,
            Spec::Service(_) => Kind::Service,
            Spec::Route(_) => Kind::Route,
            Spec::Gateway(_) => Kind::Gateway,
            Spec::App(_) => Kind::App,
            Spec::Endpoints(_) => Kind::Endpoints,
            Spec::Switchover(_) => Kind::Switchover,
        }
    }
}

/// A workspace: a team's cells, shard maps, services, apps and gateways.
/// The default workspace exists without one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// What the workspace is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Who may do what in it: a role for users and groups. Nobody else
    /// may (deny by default), except the fleet's admins and viewers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<RoleBinding>,
    /// Operations in it that a second person must approve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalRule>,
}

/// A role given to users and groups in a workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleBinding {
    /// `viewer` (read), `operator` (apply, switch over, drill) or `admin`
    /// (also bindings and bootstrap tokens).
    pub role: AccessRole,
    /// User names (an API token's user, a user certificate's name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Group names (an API token's groups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// A role in a workspace; each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AccessRole {
    /// Reads everything in the workspace.
    Viewer,
    /// Also applies and deletes resources, rolls them back, starts, aborts
    /// and approves switchovers.
    Operator,
    /// Also changes the workspace itself (its bindings) and creates
    /// bootstrap tokens for its nodes.
    Admin,
}

impl AccessRole {
    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessRole::Viewer => "viewer",
            AccessRole::Operator => "operator",
            AccessRole::Admin => "admin",
        }
    }
}

/// An operation that needs a second person's approval in a workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ApprovalRule {
    /// Starting a planned switchover.
    Switchover,
    /// Letting a failover that waits for approval run.
    Failover,
    /// Rolling a ShardMap back to a past revision.
    ShardMapRollback,
    /// Creating a bootstrap token, or (in the default workspace) an API
    /// token for someone else.
    Token,
}

impl ApprovalRule {
    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalRule::Switchover => "switchover",
            ApprovalRule::Failover => "failover",
            ApprovalRule::ShardMapRollback => "shardMapRollback",
            ApprovalRule::Token => "token",
        }
    }
}

/// A region has no required settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegionSpec {
    /// A human-readable name, e.g. "Hangzhou".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// An availability zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneSpec {
    /// The region the zone is in.
    pub region: String,
    /// Relative share of `local` traffic this zone takes among its peers.
    #[serde(default = "default_weight", skip_serializing_if = "is_default_weight")]
    pub weight: u32,
    /// The user the zone's agent runs instances as: a user name, a uid or
    /// `uid:gid`. An agent running as root refuses instances of a zone
    /// without one, and runs them as root (`root`, `0`) only when started
    /// with `--allow-root-instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
}

/// The type of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellType {
    /// Owns user shards, reads and writes.
    Rzone,
    /// The one global cell for data that cannot be sharded.
    Gzone,
    /// A city-local read copy of the gzone's data.
    Czone,
}

impl fmt::Display for CellType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CellType::Rzone => "rzone",
            CellType::Gzone => "gzone",
            CellType::Czone => "czone",
        })
    }
}

/// A cell (logical unit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CellSpec {
    /// The zone the cell is placed in.
    pub zone: String,
    /// rzone, gzone or czone.
    #[serde(rename = "type")]
    pub cell_type: CellType,
    /// Relative share of `local` traffic this cell takes within its zone.
    #[serde(default = "default_weight", skip_serializing_if = "is_default_weight")]
    pub weight: u32,
}

/// How a request's routing key becomes a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardRuleSpec {
    /// Number of shards; shards are `0..shards`.
    pub shards: u32,
    /// Where the key comes from and how it becomes a shard.
    pub key: KeySpec,
}

/// The key part of a [`ShardRuleSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpec {
    /// Tried in order; the first source that yields a non-empty value wins.
    pub sources: Vec<KeySource>,
    /// Turns the key into a shard.
    pub transform: Transform,
    /// What to do when no source yields a key.
    #[serde(default)]
    pub on_missing: OnMissing,
}

/// One place a routing key can come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum KeySource {
    /// A request header, by name (case-insensitive).
    Header(String),
    /// A cookie, by name.
    Cookie(String),
    /// A query parameter, by name.
    Query(String),
    /// A path template with exactly one `{variable}`, e.g. `/users/{uid}`.
    Path(String),
    /// A field of a JSON request body, as a dotted path, e.g. `payer.id`.
    Body(String),
}

/// How a key becomes a shard in `[0, shards)`. See `docs/sharding.md`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Transform {
    /// The last N decimal digits of the key (Ant style: `2` → last two digits).
    DecimalSuffix(u32),
    /// The key as a decimal integer, modulo this number (must equal `shards`).
    Mod(u64),
    /// A named stable hash of the key's bytes, modulo `shards`.
    Hash(HashName),
}

/// A stable hash for [`Transform::Hash`]. Its output never changes between
/// releases; `docs/sharding.md` gives the definition and test vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashName {
    /// 64-bit FNV-1a.
    #[serde(rename = "fnv1a64")]
    Fnv1a64,
    /// 64-bit XXH3 with seed 0.
    #[serde(rename = "xxh3")]
    Xxh3,
}

/// What happens to a request without a routing key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// Refused with 400 and a JSON reason.
    #[default]
    Reject,
    /// Sent to the gzone, like a global service.
    Global,
    /// Sent to the nearest healthy cell, like a local service.
    Local,
}

/// Which cell owns each shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardMapSpec {
    /// The ShardRule whose shards this map assigns.
    pub rule: String,
    /// Increases on every ownership change. Managed by the control plane:
    /// leave it out of manifests, or give the current value.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub epoch: u64,
    /// Shard ranges and their owners; together they cover every shard once.
    pub assignments: Vec<Assignment>,
    /// The emergency plan: what the control plane does when a cell that
    /// owns shards of this map is lost. None: nothing automatic (an operator
    /// runs `atoll switchover start --failover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverPolicy>,
}

/// The emergency plan of a shard map (docs/switchover.md, "Failover").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailoverPolicy {
    /// `automatic`: move a lost cell's shards to their standbys at once;
    /// `manual`: prepare the failover and wait for
    /// `atoll switchover approve`.
    #[serde(default)]
    pub approval: Approval,
    /// A cell is lost when, this long, none of its instances renewed its
    /// ownership lease, none answered its replication probe, and its zone's
    /// agent was silent.
    #[serde(default = "default_lost_after")]
    pub lost_after: DurationValue,
}

fn default_lost_after() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}

/// Who starts a failover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    /// The control plane, as soon as the cell is lost.
    Automatic,
    /// An operator (`atoll switchover approve`).
    #[default]
    Manual,
}

impl ShardMapSpec {
    /// The owner of every shard, as `(shard range, cell)` pairs, for comparing
    /// ownership between two versions of a map.
    pub fn ownership(&self) -> Vec<(u32, u32, &str)> {
        let mut owners: Vec<(u32, u32, &str)> = self
            .assignments
            .iter()
            .map(|a| (a.shards.start, a.shards.end, a.cell.as_str()))
            .collect();
        owners.sort_unstable();
        owners
    }

    /// Whether `other` gives some shard a different owner than `self`.
    /// Compared shard by shard (splitting a range without changing owners is
    /// not an ownership change), in one merge walk over both sorted lists.
    pub fn ownership_differs(&self, other: &ShardMapSpec) -> bool {
        let mine = self.ownership();
        let theirs = other.ownership();
        let (mut i, mut j) = (0, 0);
        // The first shard not yet compared.
        let mut shard: u64 = 0;
        loop {
            // Skip ranges that end before `shard` (overlaps in invalid maps).
            while i < mine.len() && u64::from(mine[i].1) < shard {
                i += 1;
            }
            while j < theirs.len() && u64::from(theirs[j].1) < shard {
                j += 1;
            }
            match (mine.get(i), theirs.get(j)) {
                (None, None) => return false,
                (Some(_), None) | (None, Some(_)) => return true,
                (Some(a), Some(b)) => {
                    let a_start = u64::from(a.0).max(shard);
                    let b_start = u64::from(b.0).max(shard);
                    if a_start != b_start || a.2 != b.2 {
                        return true;
                    }
                    shard = u64::from(a.1.min(b.1)) + 1;
                }
            }
        }
    }
}

/// One range of a [`ShardMapSpec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Assignment {
    /// `"0-49"` or a single shard `7`.
    pub shards: ShardRange,
    /// The owning rzone.
    pub cell: String,
    /// The rzone in another zone that takes over on failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// `serving` (default) or `fenced` (writes refused during a switchover).
    #[serde(default, skip_serializing_if = "ShardState::is_serving")]
    pub state: ShardState,
}

/// Whether a shard range takes writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    /// Reads and writes.
    #[default]
    Serving,
    /// Reads only; writes get 503 with Retry-After.
    Fenced,
}

impl ShardState {
    fn is_serving(&self) -> bool {
        *self == ShardState::Serving
    }
}

/// How a service is routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// By routing key to the owning rzone.
    Unitized,
    /// To the gzone; reads may go to a same-city czone.
    Global,
    /// To the nearest healthy cell.
    Local,
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceKind::Unitized => "unitized",
            ServiceKind::Global => "global",
            ServiceKind::Local => "local",
        })
    }
}

/// A service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// unitized, global or local.
    pub kind: ServiceKind,
    /// For unitized services: the ShardRule that finds the owning cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_rule: Option<String>,
    /// Which requests are writes.
    #[serde(default, skip_serializing_if = "Writes::is_default")]
    pub writes: Writes,
    /// Named groups of endpoints, by labels, for canary and blue-green splits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Static endpoints (agents add reported ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// How a data-plane node picks an endpoint within a cell.
    #[serde(default, skip_serializing_if = "LoadBalancer::is_default")]
    pub load_balancer: LoadBalancer,
    /// Active HTTP health checks of the endpoints; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Passive ejection of endpoints that keep failing.
    #[serde(default, skip_serializing_if = "OutlierDetection::is_default")]
    pub outlier_detection: OutlierDetection,
    /// How the service's data follows its shards to their standby cells:
    /// what a switchover's sync gate reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
}

/// A unitized service's replication, as the switchover sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Replication {
    /// HTTP path, on every instance, answering the replication positions
    /// per shard: `{"shards": [{"shard", "written", "acknowledged",
    /// "standby"}]}` (docs/switchover.md).
    pub probe: String,
}

/// How an endpoint is picked within a cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The less busy of two endpoints picked at random (power of two choices).
    LeastRequest,
}

impl LoadBalancer {
    fn is_default(&self) -> bool {
        *self == LoadBalancer::default()
    }
}

/// Active health checks: an HTTP GET to each endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// Path to GET; a 2xx answer is healthy.
    pub path: String,
    /// Time between checks.
    #[serde(default = "default_check_interval")]
    pub interval: DurationValue,
    /// Time allowed for an answer.
    #[serde(default = "default_check_timeout")]
    pub timeout: DurationValue,
    /// Failed checks in a row before an endpoint leaves rotation.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed checks in a row before it comes back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
}

fn default_check_interval() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}

fn default_check_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(1))
}

fn default_unhealthy_threshold() -> u32 {
    3
}

fn default_healthy_threshold() -> u32 {
    2
}

/// Passive outlier ejection: endpoints whose requests keep failing (connect
/// errors, resets, 5xx) leave rotation for a while.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    #[serde(default = "default_consecutive_errors")]
    pub consecutive_errors: u32,
    /// How long the first ejection lasts; each later one lasts longer.
    #[serde(default = "default_ejection_time")]
    pub ejection_time: DurationValue,
    /// At most this share of a cell's endpoints is ejected at once.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_errors: default_consecutive_errors(),
            ejection_time: default_ejection_time(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

impl OutlierDetection {
    fn is_default(&self) -> bool {
        *self == OutlierDetection::default()
    }
}

fn default_consecutive_errors() -> u32 {
    5
}

fn default_ejection_time() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}

fn default_max_ejected_percent() -> u32 {
    50
}

/// Write classification of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Writes {
    /// HTTP methods that are writes.
    pub methods: Vec<String>,
}

impl Default for Writes {
    fn default() -> Self {
        Self {
            methods: ["POST", "PUT", "PATCH", "DELETE"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
    }
}

impl Writes {
    fn is_default(&self) -> bool {
        *self == Writes::default()
    }
}

/// A named group of a service's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    /// Referred to by routes' `split`.
    pub name: String,
    /// An endpoint belongs to the subset when it carries all these labels.
    pub labels: BTreeMap<String, String>,
}

/// A static endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// The cell the endpoint serves.
    pub cell: String,
    /// `host:port`.
    pub address: String,
    /// Labels, matched by subsets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Relative share of its cell's traffic.
    #[serde(default = "default_weight", skip_serializing_if = "is_default_weight")]
    pub weight: u32,
}

/// An access rule from requests to a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// Host names (exact, or `*.example.com`); empty means any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// A request matches when it matches any entry; empty matches everything.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// The service the route sends to.
    pub service: String,
    /// Overrides the service's write classification for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// Total time allowed for the request, e.g. `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationValue>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Weighted or header-pinned split between the service's subsets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitTarget>,
    /// Copies of a share of the requests to a shadow service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// One match entry of a route: all given conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// The path equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    /// The path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The path matches this template (`/users/{uid}/accounts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_template: Option<String>,
    /// The method is one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Every header condition holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// A condition on one header. With neither `exact` nor `prefix`, the header
/// must be present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// Read or write, for a route that overrides its service's classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Every request of the route is a read.
    Read,
    /// Every request of the route is a write.
    Write,
}

/// Retry policy of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try (0 to 10).
    pub attempts: u32,
    /// Time allowed for each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<DurationValue>,
    /// Conditions that allow a retry; default `[connectFailure]`. Only
    /// idempotent requests are ever retried after they reached an upstream.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
}

/// When a retry is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RetryOn {
    /// The upstream connection could not be made.
    ConnectFailure,
    /// The upstream answered 502, 503 or 504.
    GatewayError,
    /// The upstream reset the stream or connection.
    Reset,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure]
}

/// One target of a route's split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SplitTarget {
    /// A subset of the route's service.
    pub subset: String,
    /// Relative weight among the targets.
    #[serde(default)]
    pub weight: u32,
    /// Requests matching all these go to this subset whatever the weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// Mirroring of a route's requests to a shadow service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    /// The shadow service.
    pub service: String,
    /// Share of requests copied, 0 to 100.
    pub percent: f64,
    /// Only requests for these shards, e.g. `"0-9,50-59"`; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardSet>,
}

/// A gateway: the north-south entry of one zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// The zone the gateway serves.
    pub zone: String,
    /// Ports and protocols it listens on.
    pub listeners: Vec<Listener>,
    /// The cells it fronts; all cells of its zone when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<String>,
    /// `host:port` where gateways of other zones reach this one to forward
    /// misrouted requests (its `peer` listener when it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// A listener only for requests other gateways forward: mutual TLS
    /// with the gateway's node certificate, open to gateways of the same
    /// workspace only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerListener>,
    /// Where a request for a cell of another zone goes.
    #[serde(default, skip_serializing_if = "Misroute::is_default")]
    pub misroute: Misroute,
    /// How long a write to a fenced shard may wait for the fence to lift
    /// before it is refused; 0 (the default) refuses at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_fence_hold: Option<DurationValue>,
}

/// Where a gateway sends a request whose cell is in another zone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Misroute {
    /// To a gateway of the cell's zone (one that advertises an address),
    /// once; endpoints directly if none does.
    #[default]
    Gateway,
    /// Straight to the cell's endpoints.
    Endpoints,
}

impl Misroute {
    fn is_default(&self) -> bool {
        *self == Misroute::default()
    }
}

/// A gateway's listener for other gateways (mutual TLS).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerListener {
    /// TCP port.
    pub port: u16,
    /// Address to bind; default `0.0.0.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// One listener of a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// TCP port.
    pub port: u16,
    /// `http` (HTTP/1.1 and h2c) or `https` (TLS, ALPN h2 and http/1.1).
    pub protocol: Protocol,
    /// Address to bind; default `0.0.0.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Certificate and key files, required for `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// Listener protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Plain HTTP/1.1 and HTTP/2 with prior knowledge (h2c).
    Http,
    /// TLS with ALPN.
    Https,
}

/// TLS files of a listener, as paths on the gateway's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub certificate: String,
    /// PEM private key.
    pub private_key: String,
}

/// An application that agents run in cells.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppSpec {
    /// The Service the instances serve; their endpoints are reported under it.
    pub service: String,
    /// The cells to run in.
    pub cells: Vec<String>,
    /// Instances per cell.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// For the local runtime: the program and its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// For a container runtime (Kubernetes, later): the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Named ports; the first is the one traffic goes to. Without a fixed
    /// `port`, the agent picks a free one.
    #[serde(default = "default_ports")]
    pub ports: Vec<AppPort>,
    /// Environment of every instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How the agent tells an instance is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// The version being run; reported endpoints carry it as the label `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// How the instances take part in east-west calls: `sidecar` (the
    /// agent runs `atoll sidecar` beside each instance; callers reach it
    /// through the sidecar, and its calls go out through it) or `sdk` (the
    /// app links the SDK and registers itself). Absent: the agent
    /// registers the instance as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshMode>,
    /// What the instances speak on their first port: `http` (default),
    /// `http2`, `grpc` or `bolt`.
    #[serde(default, skip_serializing_if = "AppProtocol::is_default")]
    pub protocol: AppProtocol,
}

/// An App's east-west mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MeshMode {
    /// A sidecar beside each instance.
    Sidecar,
    /// The app links the SDK.
    Sdk,
}

/// The protocol of an App's first port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    Http,
    /// HTTP/2 (cleartext, prior knowledge).
    Http2,
    /// gRPC (over HTTP/2).
    Grpc,
    /// SOFA Bolt v1.
    Bolt,
}

impl AppProtocol {
    fn is_default(&self) -> bool {
        *self == AppProtocol::default()
    }

    /// Its name in the registry.
    pub fn as_str(&self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Bolt => "bolt",
        }
    }
}

/// A named port of an app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppPort {
    /// Its name; instances find it as `ATOLL_PORT_<NAME>`.
    pub name: String,
    /// A fixed port; the agent picks a free one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn default_replicas() -> u32 {
    1
}

fn default_ports() -> Vec<AppPort> {
    vec![AppPort {
        name: "http".into(),
        port: None,
    }]
}

/// The endpoints an agent reports for a service in its zone. Written by
/// agents; gateways route to the ready ones, besides the service's static
/// endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointsSpec {
    /// The service.
    pub service: String,
    /// The zone whose agent reports them.
    pub zone: String,
    /// The instances.
    #[serde(default)]
    pub endpoints: Vec<ReportedEndpoint>,
}

/// One instance as an agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportedEndpoint {
    /// The cell it serves.
    pub cell: String,
    /// `host:port`.
    pub address: String,
    /// The instance's name.
    pub instance: String,
    /// Whether it passes its health check.
    pub ready: bool,
    /// Labels, matched by subsets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A duration written like `5s`, `250ms` or `1m30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationValue(pub Duration);

impl Serialize for DurationValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(DurationValue)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration ({e}); write it like 5s, 250ms or 1m30s"
                ))
            })
    }
}

/// Who a zone's `runAs` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserRef {
    /// A user by name, looked up on the agent's host.
    Name(String),
    /// A uid, with its primary group from the host when there is one.
    Uid(u32),
    /// A uid and a gid.
    UidGid(u32, u32),
}

/// Parses a zone's `runAs`: a user name (`[a-z_][a-z0-9_.-]*`, at most 32
/// characters, as `useradd` takes them), a uid, or `uid:gid`.
pub fn parse_run_as(text: &str) -> Result<UserRef, String> {
    let number = |part: &str| -> Result<u32, String> {
        part.parse::<u32>()
            .ok()
            .filter(|n| *n != u32::MAX)
            .ok_or_else(|| {
                format!(
                    "`{part}` in runAs `{text}` is not a uid or gid (a number below 4294967295)"
                )
            })
    };
    if let Some((uid, gid)) = text.split_once(':') {
        return Ok(UserRef::UidGid(number(uid)?, number(gid)?));
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(UserRef::Uid(number(text)?));
    }
    let mut bytes = text.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if !first_ok
        || text.len() > 32
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
    {
        return Err(format!(
            "runAs `{text}` is neither a user name (lowercase letters, digits, `_`, `.`, `-`, starting with a letter or `_`, at most 32), a uid nor `uid:gid`; e.g. `nobody` or `1000:1000`"
        ));
    }
    Ok(UserRef::Name(text.to_owned()))
}

fn default_weight() -> u32 {
    100
}

fn is_default_weight(weight: &u32) -> bool {
    *weight == 100
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

/// A move of shard ranges from their owning cells to others (docs/architecture.md,
/// "The switchover protocol"): planned (fence, barrier, sync gate, flip, barrier,
/// unfence), or a failover of a lost cell (fence, barrier, wait for its
/// lease to expire, flip, barrier, unfence; what it had not replicated is
/// reported). Created by `atoll switchover start` or by the control plane's
/// emergency plan; the control plane writes its progress (`phase` onwards).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SwitchoverSpec {
    /// The ShardMap whose shards move.
    pub shard_map: String,
    /// What moves where.
    pub moves: Vec<ShardMove>,
    /// `planned` or `failover`.
    #[serde(default, skip_serializing_if = "SwitchoverMode::is_planned")]
    pub mode: SwitchoverMode,
    /// How long each barrier waits for every node before the switchover
    /// aborts (before the flip) or reports the laggards and keeps waiting
    /// (after it).
    #[serde(default = "default_barrier_timeout")]
    pub barrier_timeout: DurationValue,
    /// How long the sync gate waits for the standby to catch up before the
    /// switchover aborts.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout: DurationValue,
    /// Move without reading replication positions (stateless services, or
    /// an operator who accepts the loss).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_sync_gate: bool,
    /// Who asked, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where it is (written by the control plane).
    #[serde(default)]
    pub phase: SwitchoverPhase,
    /// Set by `atoll switchover abort`: the control plane unfences and stops
    /// (only before the flip).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_requested: bool,
    /// Every data-plane node known when it started: the barriers wait for
    /// them also when a restarted control plane has not heard from them yet
    /// (until the node expiry, as for any disconnected node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_nodes: Vec<String>,
    /// A failover waiting for approval was approved.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approved: bool,
    /// Every phase entered, with its start and duration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<PhaseRecord>,
    /// The shard map epoch before the flip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_before: Option<u64>,
    /// The store revision that fenced the shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_revision: Option<u64>,
    /// The store revision that flipped the owners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip_revision: Option<u64>,
    /// Replication positions per moving shard, as the sync gate read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<ShardPosition>,
    /// A failover's RPO: the moving shards whose writes the lost cell had
    /// not all replicated at its last answered probe, with the positions
    /// (`written` at the lost cell, `acknowledged` by the standby).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreplicated: Vec<ShardPosition>,
    /// For a failover: when the lost cell last answered (RFC 3339), so the
    /// writes it may have taken after that are known to be unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Why it stopped, when it did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn default_barrier_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}

fn default_sync_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}

/// One range that moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardMove {
    /// The shards.
    pub shards: ShardRange,
    /// Their owner before.
    pub from: String,
    /// Their owner after.
    pub to: String,
}

/// Planned or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchoverMode {
    /// Both cells are up: nothing is lost.
    #[default]
    Planned,
    /// The source cell is lost: its lease must expire first, and what it had
    /// not replicated is reported.
    Failover,
}

impl SwitchoverMode {
    fn is_planned(&self) -> bool {
        *self == SwitchoverMode::Planned
    }
}

/// The phases, in order (docs/architecture.md, "The switchover protocol").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum SwitchoverPhase {
    /// Accepted, not started.
    #[default]
    Pending,
    /// A failover waiting for `atoll switchover approve`.
    AwaitingApproval,
    /// Writing the fenced map.
    Fence,
    /// Waiting until every node runs the fenced map.
    FenceBarrier,
    /// Waiting until the target holds every write of the moving shards.
    SyncGate,
    /// A failover waiting until the lost cell's ownership lease has expired.
    LeaseExpiry,
    /// Writing the new owners and epoch.
    Flip,
    /// Waiting until every node runs the new owners.
    FlipBarrier,
    /// Writing the map with the shards serving again.
    Unfence,
    /// Done: the new owners take writes.
    Completed,
    /// Stopped before the flip; the shards serve at their old owners again.
    Aborted,
}

impl SwitchoverPhase {
    /// Whether nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, SwitchoverPhase::Completed | SwitchoverPhase::Aborted)
    }

    /// Whether the owners changed already (no abort from here).
    pub fn flipped(self) -> bool {
        matches!(
            self,
            SwitchoverPhase::FlipBarrier | SwitchoverPhase::Unfence | SwitchoverPhase::Completed
        )
    }
}

impl fmt::Display for SwitchoverPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// A phase as it ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PhaseRecord {
    /// The phase.
    pub phase: SwitchoverPhase,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// How long it took, once it is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millis: Option<u64>,
    /// What happened (laggards, positions, revisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Replication of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardPosition {
    /// The shard.
    pub shard: u32,
    /// The service whose probe answered.
    pub service: String,
    /// The last log position that changed the shard at its owner.
    pub written: i64,
    /// The position its standby confirmed.
    pub acknowledged: i64,
}
