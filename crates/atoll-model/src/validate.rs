//! Validation of a whole set of resources: each resource on its own, and the
//! references and shard ownership between them.
//!
//! The control plane validates the state a change would produce (what is
//! stored, plus the change), so a change that breaks a resource it does not
//! touch (deleting a zone that cells still use) is refused too. Every problem
//! is reported, not just the first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::issue::{Issue, Issues};
use crate::key::{MAX_SUFFIX_DIGITS, PathTemplate};
use crate::manifest::Located;
use crate::names::{address_problem, dns_label_problem, host_problem, is_token, method_problem};
use crate::resource::{
    AppSpec, CellSpec, CellType, DEFAULT_WORKSPACE, EndpointsSpec, GatewaySpec, HeaderMatch,
    KeySource, Kind, Protocol, ResourceKey, RouteSpec, ServiceKind, ServiceSpec, ShardMapSpec,
    ShardRuleSpec, Spec, Transform, WorkspaceSpec, ZoneSpec,
};

/// The most shards a rule may have.
pub const MAX_SHARDS: u32 = 1_000_000;

/// The most retries a route may ask for.
pub const MAX_RETRIES: u32 = 10;

/// Validates a complete set of resources.
pub fn validate(resources: &[Located]) -> Result<(), Issues> {
    validate_with_pending(resources, &[])
}

/// Validates `resources` when the resources named in `pending` exist but could
/// not be decoded (their own problems are reported elsewhere): references to
/// them are not reported as dangling.
pub fn validate_with_pending(resources: &[Located], pending: &[ResourceKey]) -> Result<(), Issues> {
    // Each workspace is checked on its own, with the fleet's resources
    // (workspaces, regions, zones) it may refer to; the fleet's own
    // resources are checked once, with the default workspace.
    let mut workspaces: BTreeSet<&str> = resources
        .iter()
        .filter(|r| !r.resource.kind().is_fleet())
        .map(|r| r.resource.workspace())
        .collect();
    workspaces.insert(DEFAULT_WORKSPACE);
    let pending: HashSet<ResourceKey> = pending.iter().cloned().collect();
    let mut issues = Vec::new();
    for workspace in workspaces {
        let group: Vec<&Located> = resources
            .iter()
            .filter(|r| r.resource.kind().is_fleet() || r.resource.workspace() == workspace)
            .collect();
        let mut validator = Validator::new(group, workspace);
        validator.pending = pending.clone();
        validator.run();
        issues.extend(validator.issues);
    }
    if issues.is_empty() {
        Ok(())
    } else {
        Err(Issues(issues))
    }
}

struct Validator<'a> {
    /// The fleet's resources and those of `workspace`.
    resources: Vec<&'a Located>,
    /// The workspace checked; the fleet's resources are checked with the
    /// default one.
    workspace: &'a str,
    by_key: HashMap<ResourceKey, &'a Located>,
    pending: HashSet<ResourceKey>,
    /// `names_of` results.
    known: HashMap<Kind, String>,
    issues: Vec<Issue>,
}

/// Reports an issue at `field` of `located`.
macro_rules! report {
    ($self:ident, $located:expr, $field:expr, $($reason:tt)+) => {
        $self.report($located, $field, format!($($reason)+))
    };
}

impl<'a> Validator<'a> {
    fn new(resources: Vec<&'a Located>, workspace: &'a str) -> Self {
        Self {
            resources,
            workspace,
            by_key: HashMap::new(),
            pending: HashSet::new(),
            known: HashMap::new(),
            issues: Vec::new(),
        }
    }

    fn report(&mut self, located: &Located, field: impl Into<String>, reason: String) {
        let label = located.resource.key().to_string();
        self.issues
            .push(located.origin.issue(Some(label), field, reason));
    }

    /// Whether `located` is checked in this pass (the fleet's resources
    /// only in the default workspace's).
    fn checks(&self, located: &Located) -> bool {
        !located.resource.kind().is_fleet() || self.workspace == DEFAULT_WORKSPACE
    }

    fn run(&mut self) {
        let resources = self.resources.clone();
        for located in resources.iter().copied() {
            let key = located.resource.key();
            if let Some(first) = self.by_key.get(&key) {
                let first = first.origin.issue(None, "metadata.name", "");
                let place = match (first.source, first.line) {
                    (Some(source), Some(line)) => format!("{source}:{line}"),
                    (Some(source), None) => source,
                    _ => "elsewhere".into(),
                };
                report!(
                    self,
                    located,
                    "metadata.name",
                    "{key} is defined twice; the first is at {place}"
                );
                continue;
            }
            self.by_key.insert(key, located);
        }
        for located in resources.iter().copied() {
            if !self.checks(located) {
                continue;
            }
            if let Some(problem) = dns_label_problem(located.resource.name()) {
                self.report(located, "metadata.name", problem);
            }
            self.workspace_of(located);
            match &located.resource.spec {
                Spec::Workspace(spec) => self.workspace(located, spec),
                Spec::Region(_) => {}
                Spec::Zone(spec) => self.zone(located, spec),
                Spec::Cell(spec) => self.cell(located, spec),
                Spec::ShardRule(spec) => self.shard_rule(located, spec),
                Spec::ShardMap(spec) => self.shard_map(located, spec),
                Spec::Service(spec) => self.service(located, spec),
                Spec::Route(spec) => self.route(located, spec),
                Spec::Gateway(spec) => self.gateway(located, spec),
                Spec::App(spec) => self.app(located, spec),
                Spec::Endpoints(spec) => self.endpoints(located, spec),
                // A record of the control plane's work, checked when it is
                // started; it never makes the rest of the state invalid.
                Spec::Switchover(_) => {}
            }
        }
        self.single_gzone();
        self.one_map_per_rule();
    }

    /// A resource of `kind` named `name` that a resource of this workspace
    /// may refer to: of the fleet, or of the same workspace.
    fn get(&self, kind: Kind, name: &str) -> Option<&'a Located> {
        self.by_key.get(&self.key(kind, name)).copied()
    }

    fn key(&self, kind: Kind, name: &str) -> ResourceKey {
        ResourceKey::in_workspace(kind, self.workspace, name)
    }

    /// `metadata.workspace`: absent on the fleet's kinds; elsewhere a DNS
    /// label naming a Workspace that exists (the default one always does).
    fn workspace_of(&mut self, located: &Located) {
        let kind = located.resource.kind();
        let Some(workspace) = located.resource.metadata.workspace.as_deref() else {
            return;
        };
        if kind.is_fleet() {
            report!(
                self,
                located,
                "metadata.workspace",
                "a {kind} belongs to the whole fleet, not to a workspace; remove metadata.workspace"
            );
            return;
        }
        if let Some(problem) = dns_label_problem(workspace) {
            self.report(located, "metadata.workspace", problem);
            return;
        }
        if workspace != DEFAULT_WORKSPACE
            && self.get(Kind::Workspace, workspace).is_none()
            && !self
                .pending
                .contains(&ResourceKey::new(Kind::Workspace, workspace))
        {
            let known = self.names_of(Kind::Workspace);
            report!(
                self,
                located,
                "metadata.workspace",
                "Workspace `{workspace}` does not exist ({known}); apply a Workspace named {workspace} first (see docs/manifests.md#workspace)"
            );
        }
    }

    /// "known: a, b, c" for messages, computed once per kind and cut after
    /// ten names so that a large batch of bad references stays cheap.
    fn names_of(&mut self, kind: Kind) -> String {
        if let Some(known) = self.known.get(&kind) {
            return known.clone();
        }
        let mut names: Vec<&str> = self
            .resources
            .iter()
            .filter(|r| r.resource.kind() == kind)
            .map(|r| r.resource.name())
            .collect();
        names.sort_unstable();
        names.dedup();
        let text = match names.len() {
            0 => format!("there are no {}s", kind.as_str()),
            n if n <= 10 => format!("known: {}", names.join(", ")),
            n => format!("known: {} and {} more", names[..10].join(", "), n - 10),
        };
        self.known.insert(kind, text.clone());
        text
    }

    /// Checks that `name` refers to an existing resource of `kind`.
    fn reference(
        &mut self,
        located: &Located,
        field: &str,
        kind: Kind,
        name: &str,
    ) -> Option<&'a Located> {
        let found = self.get(kind, name);
        if found.is_none() && !self.pending.contains(&self.key(kind, name)) {
            let known = self.names_of(kind);
            report!(
                self,
                located,
                field,
                "{kind} `{name}` does not exist ({known})"
            );
        }
        found
    }

    fn cell_spec(&self, name: &str) -> Option<&'a CellSpec> {
        match &self.get(Kind::Cell, name)?.resource.spec {
            Spec::Cell(spec) => Some(spec),
            _ => None,
        }
    }

    fn workspace(&mut self, located: &Located, spec: &WorkspaceSpec) {
        for (i, binding) in spec.bindings.iter().enumerate() {
            if binding.users.is_empty() && binding.groups.is_empty() {
                report!(
                    self,
                    located,
                    &format!("spec.bindings[{i}]"),
                    "binding {} to nobody; list `users`, `groups` or both",
                    binding.role.as_str()
                );
            }
            for (what, names) in [("users", &binding.users), ("groups", &binding.groups)] {
                for (j, name) in names.iter().enumerate() {
                    if name.trim().is_empty()
                        || name.len() > 128
                        || name.chars().any(char::is_control)
                    {
                        report!(
                            self,
                            located,
                            &format!("spec.bindings[{i}].{what}[{j}]"),
                            "`{name}` is not a name; use 1 to 128 printable characters"
                        );
                    }
                }
            }
        }
        let mut seen = HashSet::new();
        for (i, rule) in spec.approvals.iter().enumerate() {
            if !seen.insert(*rule) {
                report!(
                    self,
                    located,
                    &format!("spec.approvals[{i}]"),
                    "{} is listed twice",
                    rule.as_str()
                );
            }
        }
    }

    fn zone(&mut self, located: &Located, spec: &ZoneSpec) {
        self.reference(located, "spec.region", Kind::Region, &spec.region);
        if let Some(user) = &spec.run_as
            && let Err(why) = crate::resource::parse_run_as(user)
        {
            report!(self, located, "spec.runAs", "{why}");
        }
    }

    fn cell(&mut self, located: &Located, spec: &CellSpec) {
        self.reference(located, "spec.zone", Kind::Zone, &spec.zone);
    }

    fn single_gzone(&mut self) {
        let gzones: Vec<&Located> = self
            .resources
            .iter()
            .copied()
            .filter(|r| matches!(&r.resource.spec, Spec::Cell(c) if c.cell_type == CellType::Gzone))
            .collect();
        if let Some((first, rest)) = gzones.split_first() {
            for extra in rest {
                report!(
                    self,
                    extra,
                    "spec.type",
                    "there is one gzone (one writer in the world) and it is already Cell/{}; make this cell an rzone or a czone",
                    first.resource.name()
                );
            }
        }
    }

    fn shard_rule(&mut self, located: &Located, spec: &ShardRuleSpec) {
        if spec.shards == 0 || spec.shards > MAX_SHARDS {
            report!(
                self,
                located,
                "spec.shards",
                "shards must be between 1 and {MAX_SHARDS}, not {}",
                spec.shards
            );
        }
        if spec.key.sources.is_empty() {
            report!(
                self,
                located,
                "spec.key.sources",
                "at least one key source is needed, e.g. `- header: x-user-id`"
            );
        }
        for (i, source) in spec.key.sources.iter().enumerate() {
            let field = format!("spec.key.sources[{i}]");
            match source {
                KeySource::Header(name) if !is_token(name) => {
                    report!(
                        self,
                        located,
                        format!("{field}.header"),
                        "`{name}` is not a valid header name"
                    )
                }
                KeySource::Cookie(name) | KeySource::Query(name) if name.is_empty() => {
                    report!(self, located, field, "the name is empty")
                }
                KeySource::Path(template) => {
                    if let Err(problem) = PathTemplate::parse(template) {
                        self.report(located, format!("{field}.path"), problem);
                    }
                }
                KeySource::Body(path) if path.is_empty() || path.split('.').any(str::is_empty) => {
                    report!(
                        self,
                        located,
                        format!("{field}.body"),
                        "`{path}` is not a dotted JSON field path such as payer.id"
                    )
                }
                _ => {}
            }
        }
        match spec.key.transform {
            Transform::DecimalSuffix(digits) => {
                if digits == 0 || digits > MAX_SUFFIX_DIGITS {
                    report!(
                        self,
                        located,
                        "spec.key.transform.decimalSuffix",
                        "decimalSuffix takes 1 to {MAX_SUFFIX_DIGITS} digits, not {digits}"
                    );
                } else if u64::from(spec.shards) > 10u64.pow(digits) {
                    report!(
                        self,
                        located,
                        "spec.key.transform.decimalSuffix",
                        "{digits} digit(s) address only {} shards but the rule has {}; raise the digits or lower shards",
                        10u64.pow(digits),
                        spec.shards
                    );
                }
            }
            Transform::Mod(modulus) => {
                if modulus != u64::from(spec.shards) {
                    report!(
                        self,
                        located,
                        "spec.key.transform.mod",
                        "mod {modulus} must equal shards ({}) so that every shard can be reached and none is out of range",
                        spec.shards
                    );
                }
            }
            Transform::Hash(_) => {}
        }
    }

    fn shard_map(&mut self, located: &Located, spec: &ShardMapSpec) {
        let rule = self
            .reference(located, "spec.rule", Kind::ShardRule, &spec.rule)
            .and_then(|r| match &r.resource.spec {
                Spec::ShardRule(rule) => Some(rule.shards),
                _ => None,
            });
        if spec.assignments.is_empty() {
            report!(
                self,
                located,
                "spec.assignments",
                "a shard map needs at least one assignment"
            );
        }
        for (i, assignment) in spec.assignments.iter().enumerate() {
            let field = format!("spec.assignments[{i}]");
            if let Some(shards) = rule
                && assignment.shards.end >= shards
            {
                report!(
                    self,
                    located,
                    format!("{field}.shards"),
                    "shards {} go beyond the rule's {shards} shards (0-{})",
                    assignment.shards,
                    shards.saturating_sub(1)
                );
            }
            let owner = self.reference(
                located,
                &format!("{field}.cell"),
                Kind::Cell,
                &assignment.cell,
            );
            let owner_spec = owner.and_then(|_| self.cell_spec(&assignment.cell));
            if let Some(cell) = owner_spec
                && cell.cell_type != CellType::Rzone
            {
                report!(
                    self,
                    located,
                    format!("{field}.cell"),
                    "cell `{}` is a {}; only rzones own shards",
                    assignment.cell,
                    cell.cell_type
                );
            }
            if let Some(standby) = &assignment.standby {
                let standby_field = format!("{field}.standby");
                if standby == &assignment.cell {
                    report!(
                        self,
                        located,
                        standby_field,
                        "the standby must be another cell than the owner `{standby}`"
                    );
                } else if self
                    .reference(located, &standby_field, Kind::Cell, standby)
                    .is_some()
                    && let Some(standby_spec) = self.cell_spec(standby)
                {
                    if standby_spec.cell_type != CellType::Rzone {
                        report!(
                            self,
                            located,
                            standby_field.clone(),
                            "standby `{standby}` is a {}; only rzones own shards",
                            standby_spec.cell_type
                        );
                    }
                    if let Some(owner) = owner_spec
                        && owner.zone == standby_spec.zone
                    {
                        report!(
                            self,
                            located,
                            standby_field,
                            "standby `{standby}` is in zone {}, like the owner `{}`; a standby must be in another zone to survive the zone's loss",
                            standby_spec.zone,
                            assignment.cell
                        );
                    }
                }
            }
        }
        if let Some(shards) = rule {
            self.coverage(located, spec, shards);
        }
    }

    /// Every shard in `[0, shards)` owned exactly once.
    fn coverage(&mut self, located: &Located, spec: &ShardMapSpec, shards: u32) {
        let mut ranges: Vec<(u32, u32, usize)> = spec
            .assignments
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    a.shards.start,
                    a.shards.end.min(shards.saturating_sub(1)),
                    i,
                )
            })
            .filter(|(start, end, _)| start <= end)
            .collect();
        ranges.sort_unstable();
        let mut next: u64 = 0; // first shard not yet covered
        let mut furthest: Option<(u32, usize)> = None; // (end, assignment) reaching furthest
        let mut gaps = Vec::new();
        for (start, end, index) in ranges {
            if u64::from(start) > next {
                gaps.push((next, u64::from(start) - 1));
            }
            if let Some((furthest_end, other)) = furthest
                && start <= furthest_end
            {
                let overlap_end = end.min(furthest_end);
                let overlap = if start == overlap_end {
                    format!("shard {start} is")
                } else {
                    format!("shards {start}-{overlap_end} are")
                };
                report!(
                    self,
                    located,
                    format!("spec.assignments[{index}].shards"),
                    "{overlap} also owned by assignments[{other}] (cell {}); each shard has exactly one owner",
                    spec.assignments[other].cell
                );
            }
            if furthest.is_none_or(|(furthest_end, _)| end > furthest_end) {
                furthest = Some((end, index));
            }
            next = next.max(u64::from(end) + 1);
        }
        if next < u64::from(shards) {
            gaps.push((next, u64::from(shards) - 1));
        }
        for (start, end) in gaps {
            let what = if start == end {
                format!("shard {start} is")
            } else {
                format!("shards {start}-{end} are")
            };
            report!(
                self,
                located,
                "spec.assignments",
                "{what} owned by no assignment; every shard in [0, {shards}) needs exactly one owner"
            );
        }
    }

    fn one_map_per_rule(&mut self) {
        let mut seen: BTreeMap<&str, &Located> = BTreeMap::new();
        for located in self.resources.clone() {
            if let Spec::ShardMap(spec) = &located.resource.spec {
                if let Some(first) = seen.get(spec.rule.as_str()) {
                    report!(
                        self,
                        located,
                        "spec.rule",
                        "ShardMap/{} already assigns the shards of rule `{}`; a rule has one shard map",
                        first.resource.name(),
                        spec.rule
                    );
                } else {
                    seen.insert(spec.rule.as_str(), located);
                }
            }
        }
    }

    fn service(&mut self, located: &Located, spec: &ServiceSpec) {
        if let Some(replication) = &spec.replication {
            if spec.kind != ServiceKind::Unitized {
                report!(
                    self,
                    located,
                    "spec.replication",
                    "only a unitized service has shards to replicate; remove replication or make the service unitized"
                );
            }
            if !replication.probe.starts_with('/')
                || replication.probe.contains(char::is_whitespace)
            {
                report!(
                    self,
                    located,
                    "spec.replication.probe",
                    "`{}` is not an HTTP path; write it like /replication/positions",
                    replication.probe
                );
            }
        }
        match (spec.kind, &spec.shard_rule) {
            (ServiceKind::Unitized, None) => {
                report!(
                    self,
                    located,
                    "spec.shardRule",
                    "a unitized service needs a shardRule to find the owning cell"
                );
            }
            (ServiceKind::Unitized, Some(rule)) => {
                if self
                    .reference(located, "spec.shardRule", Kind::ShardRule, rule)
                    .is_some()
                {
                    let mapped = self
                        .resources
                        .iter()
                        .any(|r| matches!(&r.resource.spec, Spec::ShardMap(m) if &m.rule == rule));
                    if !mapped {
                        report!(
                            self,
                            located,
                            "spec.shardRule",
                            "no ShardMap assigns the shards of rule `{rule}`; add one"
                        );
                    }
                }
            }
            (kind, Some(_)) => {
                report!(
                    self,
                    located,
                    "spec.shardRule",
                    "only unitized services use a shardRule; remove it from this {kind} service"
                );
            }
            (_, None) => {}
        }
        if spec.kind == ServiceKind::Global {
            let has_gzone = self.resources.iter().any(
                |r| matches!(&r.resource.spec, Spec::Cell(c) if c.cell_type == CellType::Gzone),
            );
            if !has_gzone {
                report!(
                    self,
                    located,
                    "spec.kind",
                    "a global service needs a gzone cell to serve its writes; add a Cell with `type: gzone`"
                );
            }
        }
        if spec.writes.methods.is_empty() {
            report!(
                self,
                located,
                "spec.writes.methods",
                "list the methods that are writes (or leave `writes` out for POST, PUT, PATCH, DELETE)"
            );
        }
        for (i, method) in spec.writes.methods.iter().enumerate() {
            if let Some(problem) = method_problem(method) {
                self.report(located, format!("spec.writes.methods[{i}]"), problem);
            }
        }
        let mut subset_names = HashSet::new();
        for (i, subset) in spec.subsets.iter().enumerate() {
            if let Some(problem) = dns_label_problem(&subset.name) {
                self.report(located, format!("spec.subsets[{i}].name"), problem);
            }
            if !subset_names.insert(subset.name.as_str()) {
                report!(
                    self,
                    located,
                    format!("spec.subsets[{i}].name"),
                    "subset `{}` is defined twice",
                    subset.name
                );
            }
            if subset.labels.is_empty() {
                report!(
                    self,
                    located,
                    format!("spec.subsets[{i}].labels"),
                    "a subset selects endpoints by labels; give at least one"
                );
            }
        }
        if let Some(check) = &spec.health_check {
            if !check.path.starts_with('/') {
                report!(
                    self,
                    located,
                    "spec.healthCheck.path",
                    "`{}` must start with `/`",
                    check.path
                );
            }
            if check.interval.0.is_zero() || check.timeout.0.is_zero() {
                report!(
                    self,
                    located,
                    "spec.healthCheck",
                    "interval and timeout must be longer than zero"
                );
            }
            if check.healthy_threshold == 0 || check.unhealthy_threshold == 0 {
                report!(
                    self,
                    located,
                    "spec.healthCheck",
                    "thresholds must be at least 1"
                );
            }
        }
        if spec.outlier_detection.max_ejected_percent > 100 {
            report!(
                self,
                located,
                "spec.outlierDetection.maxEjectedPercent",
                "a percentage is at most 100, not {}",
                spec.outlier_detection.max_ejected_percent
            );
        }
        if spec.outlier_detection.consecutive_errors > 0
            && spec.outlier_detection.ejection_time.0.is_zero()
        {
            report!(
                self,
                located,
                "spec.outlierDetection.ejectionTime",
                "must be longer than zero (or set consecutiveErrors to 0 to turn ejection off)"
            );
        }
        let mut addresses = HashSet::new();
        for (i, endpoint) in spec.endpoints.iter().enumerate() {
            let field = format!("spec.endpoints[{i}]");
            if let Some(problem) = address_problem(&endpoint.address) {
                self.report(located, format!("{field}.address"), problem);
            }
            if !addresses.insert(endpoint.address.as_str()) {
                report!(
                    self,
                    located,
                    format!("{field}.address"),
                    "endpoint {} is listed twice",
                    endpoint.address
                );
            }
            if self
                .reference(
                    located,
                    &format!("{field}.cell"),
                    Kind::Cell,
                    &endpoint.cell,
                )
                .is_some()
                && let Some(cell) = self.cell_spec(&endpoint.cell)
            {
                let allowed = match spec.kind {
                    // The gzone may host instances for keyless requests (`onMissing: global`).
                    ServiceKind::Unitized => cell.cell_type != CellType::Czone,
                    ServiceKind::Global => cell.cell_type != CellType::Rzone,
                    ServiceKind::Local => true,
                };
                if !allowed {
                    let wanted = match spec.kind {
                        ServiceKind::Unitized => "rzones (and the gzone, for keyless requests)",
                        _ => "the gzone or czones",
                    };
                    report!(
                        self,
                        located,
                        format!("{field}.cell"),
                        "cell `{}` is a {}; a {} service runs in {wanted}",
                        endpoint.cell,
                        cell.cell_type,
                        spec.kind
                    );
                }
            }
        }
    }

    fn service_spec(&self, name: &str) -> Option<&'a ServiceSpec> {
        match &self.get(Kind::Service, name)?.resource.spec {
            Spec::Service(spec) => Some(spec),
            _ => None,
        }
    }

    fn headers(&mut self, located: &Located, field: &str, headers: &[HeaderMatch]) {
        for (i, header) in headers.iter().enumerate() {
            if !is_token(&header.name) {
                report!(
                    self,
                    located,
                    format!("{field}[{i}].name"),
                    "`{}` is not a valid header name",
                    header.name
                );
            }
            if header.exact.is_some() && header.prefix.is_some() {
                report!(
                    self,
                    located,
                    format!("{field}[{i}]"),
                    "give `exact` or `prefix`, not both"
                );
            }
        }
    }

    fn route(&mut self, located: &Located, spec: &RouteSpec) {
        for (i, host) in spec.hosts.iter().enumerate() {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if host_problem(bare).is_some() {
                report!(
                    self,
                    located,
                    format!("spec.hosts[{i}]"),
                    "`{host}` is not a host name (exact, or `*.example.com`)"
                );
            }
        }
        for (i, entry) in spec.matches.iter().enumerate() {
            let field = format!("spec.match[{i}]");
            let paths = [
                ("pathExact", &entry.path_exact),
                ("pathPrefix", &entry.path_prefix),
                ("pathTemplate", &entry.path_template),
            ];
            let given: Vec<&str> = paths
                .iter()
                .filter(|(_, v)| v.is_some())
                .map(|(n, _)| *n)
                .collect();
            if given.len() > 1 {
                report!(
                    self,
                    located,
                    field.clone(),
                    "give one of pathExact, pathPrefix, pathTemplate, not {}",
                    given.join(" and ")
                );
            }
            for (name, path) in paths {
                if let Some(path) = path
                    && !path.starts_with('/')
                {
                    report!(
                        self,
                        located,
                        format!("{field}.{name}"),
                        "`{path}` must start with `/`"
                    );
                }
            }
            if let Some(template) = &entry.path_template
                && let Some(bad) = template.split('/').find(|part| {
                    part.contains(['{', '}']) && !(part.starts_with('{') && part.ends_with('}'))
                })
            {
                report!(
                    self,
                    located,
                    format!("{field}.pathTemplate"),
                    "segment `{bad}`: a variable must be a whole segment like `{{uid}}`"
                );
            }
            for (j, method) in entry.methods.iter().enumerate() {
                if let Some(problem) = method_problem(method) {
                    self.report(located, format!("{field}.methods[{j}]"), problem);
                }
            }
            self.headers(located, &format!("{field}.headers"), &entry.headers);
        }
        let service = self
            .reference(located, "spec.service", Kind::Service, &spec.service)
            .and_then(|_| self.service_spec(&spec.service));
        if let Some(timeout) = spec.timeout
            && timeout.0.is_zero()
        {
            report!(
                self,
                located,
                "spec.timeout",
                "a timeout must be longer than zero"
            );
        }
        if let Some(retries) = &spec.retries {
            if retries.attempts > MAX_RETRIES {
                report!(
                    self,
                    located,
                    "spec.retries.attempts",
                    "at most {MAX_RETRIES} retries, not {}",
                    retries.attempts
                );
            }
            if let (Some(per_try), Some(total)) = (retries.per_try_timeout, spec.timeout)
                && per_try > total
            {
                report!(
                    self,
                    located,
                    "spec.retries.perTryTimeout",
                    "the per-try timeout is longer than the route's timeout"
                );
            }
        }
        if !spec.split.is_empty() {
            let weight: u64 = spec.split.iter().map(|t| u64::from(t.weight)).sum();
            if weight == 0 && spec.split.iter().all(|t| t.headers.is_empty()) {
                report!(
                    self,
                    located,
                    "spec.split",
                    "the weights sum to 0, so no request could be sent; give some target a weight"
                );
            }
            for (i, target) in spec.split.iter().enumerate() {
                if let Some(service) = service
                    && !service.subsets.iter().any(|s| s.name == target.subset)
                {
                    let known: Vec<&str> =
                        service.subsets.iter().map(|s| s.name.as_str()).collect();
                    report!(
                        self,
                        located,
                        format!("spec.split[{i}].subset"),
                        "service `{}` has no subset `{}` (it has: {})",
                        spec.service,
                        target.subset,
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    );
                }
                self.headers(
                    located,
                    &format!("spec.split[{i}].headers"),
                    &target.headers,
                );
            }
        }
        if let Some(mirror) = &spec.mirror {
            if mirror.service == spec.service {
                report!(
                    self,
                    located,
                    "spec.mirror.service",
                    "a route cannot mirror to its own service"
                );
            } else {
                self.reference(
                    located,
                    "spec.mirror.service",
                    Kind::Service,
                    &mirror.service,
                );
            }
            if !(0.0..=100.0).contains(&mirror.percent) {
                report!(
                    self,
                    located,
                    "spec.mirror.percent",
                    "percent must be between 0 and 100, not {}",
                    mirror.percent
                );
            }
            if let (Some(shards), Some(service)) = (&mirror.shards, service) {
                let rule_shards = service
                    .shard_rule
                    .as_deref()
                    .and_then(|rule| self.get(Kind::ShardRule, rule))
                    .and_then(|r| match &r.resource.spec {
                        Spec::ShardRule(rule) => Some(rule.shards),
                        _ => None,
                    });
                match rule_shards {
                    None if service.kind != ServiceKind::Unitized => {
                        report!(
                            self,
                            located,
                            "spec.mirror.shards",
                            "only routes to unitized services can mirror by shard"
                        );
                    }
                    Some(count) => {
                        if let Some(range) = shards.ranges.iter().find(|r| r.end >= count) {
                            report!(
                                self,
                                located,
                                "spec.mirror.shards",
                                "shards {range} go beyond the rule's {count} shards"
                            );
                        }
                    }
                    None => {}
                }
            }
        }
    }

    fn app(&mut self, located: &Located, spec: &AppSpec) {
        self.reference(located, "spec.service", Kind::Service, &spec.service);
        if spec.cells.is_empty() {
            report!(
                self,
                located,
                "spec.cells",
                "list the cells the app runs in"
            );
        }
        let mut seen = HashSet::new();
        for (i, cell) in spec.cells.iter().enumerate() {
            if !seen.insert(cell.as_str()) {
                report!(
                    self,
                    located,
                    format!("spec.cells[{i}]"),
                    "cell `{cell}` is listed twice"
                );
            }
            self.reference(located, &format!("spec.cells[{i}]"), Kind::Cell, cell);
        }
        if spec.replicas > 100 {
            report!(
                self,
                located,
                "spec.replicas",
                "at most 100 instances per cell, not {}",
                spec.replicas
            );
        }
        if spec.command.is_empty() && spec.image.is_none() {
            report!(
                self,
                located,
                "spec",
                "give a `command` (local runtime) or an `image` (container runtime)"
            );
        }
        if spec.command.first().is_some_and(|c| c.trim().is_empty()) {
            report!(self, located, "spec.command[0]", "the program is empty");
        }
        if spec.ports.is_empty() {
            report!(
                self,
                located,
                "spec.ports",
                "an app needs at least one port (the first takes the traffic)"
            );
        }
        let mut names = HashSet::new();
        for (i, port) in spec.ports.iter().enumerate() {
            if dns_label_problem(&port.name).is_some() {
                report!(
                    self,
                    located,
                    format!("spec.ports[{i}].name"),
                    "`{}` is not a valid port name (a DNS label)",
                    port.name
                );
            }
            if !names.insert(port.name.as_str()) {
                report!(
                    self,
                    located,
                    format!("spec.ports[{i}].name"),
                    "port `{}` is named twice",
                    port.name
                );
            }
            if port.port == Some(0) {
                report!(
                    self,
                    located,
                    format!("spec.ports[{i}].port"),
                    "a fixed port is between 1 and 65535; leave it out for a free one"
                );
            }
            if port.port.is_some() && spec.replicas > 1 {
                report!(
                    self,
                    located,
                    format!("spec.ports[{i}].port"),
                    "a fixed port cannot be shared by {} instances on one host; leave it out",
                    spec.replicas
                );
            }
        }
        for name in spec.env.keys() {
            if name.is_empty() || name.contains('=') || name.starts_with("ATOLL_") {
                report!(
                    self,
                    located,
                    format!("spec.env.{name}"),
                    "`{name}` cannot be set: names are non-empty, without `=`, and ATOLL_* is reserved for the agent"
                );
            }
        }
        if let Some(check) = &spec.health_check
            && !check.path.starts_with('/')
        {
            report!(
                self,
                located,
                "spec.healthCheck.path",
                "`{}` must start with `/`",
                check.path
            );
        }
    }

    /// Endpoints are reports, not intent: references to a service, zone or
    /// cell that was deleted meanwhile are tolerated (the agent's next report
    /// drops them), so that reports never block a delete.
    fn endpoints(&mut self, located: &Located, spec: &EndpointsSpec) {
        for (i, endpoint) in spec.endpoints.iter().enumerate() {
            let field = format!("spec.endpoints[{i}]");
            if let Some(problem) = address_problem(&endpoint.address) {
                self.report(located, format!("{field}.address"), problem);
            }
            // Cells may disappear while an agent still reports them: the
            // agent's next report drops them; refusing would block deletes.
            if let Some(cell) = self.cell_spec(&endpoint.cell)
                && cell.zone != spec.zone
            {
                report!(
                    self,
                    located,
                    format!("{field}.cell"),
                    "cell `{}` is in zone {}, not {}: an agent reports only its own zone",
                    endpoint.cell,
                    cell.zone,
                    spec.zone
                );
            }
        }
    }

    fn gateway(&mut self, located: &Located, spec: &GatewaySpec) {
        self.reference(located, "spec.zone", Kind::Zone, &spec.zone);
        if spec.listeners.is_empty() {
            report!(
                self,
                located,
                "spec.listeners",
                "a gateway needs at least one listener, e.g. `- {{port: 8080, protocol: http}}`"
            );
        }
        let mut ports = HashSet::new();
        for (i, listener) in spec.listeners.iter().enumerate() {
            let field = format!("spec.listeners[{i}]");
            if listener.port == 0 {
                report!(
                    self,
                    located,
                    format!("{field}.port"),
                    "port must be between 1 and 65535"
                );
            }
            if !ports.insert(listener.port) {
                report!(
                    self,
                    located,
                    format!("{field}.port"),
                    "port {} is used by another listener of this gateway",
                    listener.port
                );
            }
            match (listener.protocol, &listener.tls) {
                (Protocol::Https, None) => report!(
                    self,
                    located,
                    field.clone(),
                    "an https listener needs `tls: {{certificate: ..., privateKey: ...}}`"
                ),
                (Protocol::Http, Some(_)) => report!(
                    self,
                    located,
                    format!("{field}.tls"),
                    "tls is only for https listeners"
                ),
                _ => {}
            }
            if let Some(address) = &listener.address
                && address.parse::<std::net::IpAddr>().is_err()
            {
                report!(
                    self,
                    located,
                    format!("{field}.address"),
                    "`{address}` is not an IP address to bind, e.g. 0.0.0.0 or 127.0.0.1"
                );
            }
        }
        for (i, cell) in spec.cells.iter().enumerate() {
            let field = format!("spec.cells[{i}]");
            if self.reference(located, &field, Kind::Cell, cell).is_some()
                && let Some(cell_spec) = self.cell_spec(cell)
                && cell_spec.zone != spec.zone
            {
                report!(
                    self,
                    located,
                    field,
                    "cell `{cell}` is in zone {}, not in the gateway's zone {}",
                    cell_spec.zone,
                    spec.zone
                );
            }
        }
        if let Some(hold) = spec.write_fence_hold
            && hold.0 > std::time::Duration::from_secs(30)
        {
            report!(
                self,
                located,
                "spec.writeFenceHold",
                "a write waits at most 30s for a fence to lift, not {}",
                humantime::format_duration(hold.0)
            );
        }
        if let Some(advertise) = &spec.advertise
            && let Some(problem) = address_problem(advertise)
        {
            self.report(located, "spec.advertise", problem);
        }
        if let Some(peer) = &spec.peer {
            if peer.port == 0 {
                report!(
                    self,
                    located,
                    "spec.peer.port",
                    "port must be between 1 and 65535"
                );
            } else if !ports.insert(peer.port) {
                report!(
                    self,
                    located,
                    "spec.peer.port",
                    "port {} is used by a listener of this gateway; the peer listener needs its own",
                    peer.port
                );
            }
            if let Some(address) = &peer.address
                && address.parse::<std::net::IpAddr>().is_err()
            {
                report!(
                    self,
                    located,
                    "spec.peer.address",
                    "`{address}` is not an IP address to bind, e.g. 0.0.0.0 or 127.0.0.1"
                );
            }
            if spec.advertise.is_none() {
                report!(
                    self,
                    located,
                    "spec.peer",
                    "a peer listener is reached at `advertise`: add `advertise: HOST:{}` (where other gateways reach this port)",
                    peer.port
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
