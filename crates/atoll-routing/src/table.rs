//! The routing table: resources compiled for one data-plane node.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use atoll_model::key::KeyRule;
use atoll_model::{
    Access, CellType, HealthCheck, Kind, LoadBalancer, Misroute, OutlierDetection, Resource,
    RetryOn, ServiceKind, ShardSet, ShardState, Spec,
};
use http::HeaderValue;

use crate::matcher::{HeaderCondition, Hosts, MatchEntry, Methods, PathCondition};
use crate::{CellId, EndpointId, RouteId, ServiceId};

/// Which node the table is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// The node's zone: cells elsewhere are reached through their zone's
    /// gateways.
    pub zone: String,
    /// The Gateway resource the node runs, if it is a gateway: its settings
    /// apply and it is never its own forwarding target.
    pub gateway: Option<String>,
    /// Whether the node can forward over mutual TLS (it has a node
    /// certificate): without, gateways that take forwarded requests only
    /// on a `peer` listener are not forwarding targets.
    pub peer_tls: bool,
}

/// A cell as the table knows it.
#[derive(Debug)]
pub struct Cell {
    /// Its name.
    pub name: String,
    /// Index into the table's zones.
    pub zone: u16,
    /// Index into the table's regions.
    pub region: u16,
    /// rzone, gzone or czone.
    pub cell_type: CellType,
    /// Cell weight × zone weight, for `local` routing.
    pub weight: u64,
    /// The name as a header value, for `x-atoll-cell`.
    pub header: HeaderValue,
}

/// A zone as the table knows it.
#[derive(Debug)]
pub struct Zone {
    /// Its name.
    pub name: String,
    /// Index into the table's regions.
    pub region: u16,
    /// Endpoints (in the table's endpoint list) of the zone's gateways that
    /// advertise an address, to forward misrouted requests to.
    pub gateways: Vec<EndpointId>,
    pub(crate) next: AtomicU32,
}

/// An upstream address: a service endpoint or another gateway.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// The cell it serves (none for a gateway).
    pub cell: Option<CellId>,
    /// The service it belongs to (none for a gateway).
    pub service: Option<ServiceId>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// For a gateway reached on its `peer` listener: who must answer there
    /// (mutual TLS).
    pub peer: Option<Peer>,
}

/// A gateway reached over mutual TLS: the identity its certificate must
/// carry is `atoll://<the node's workspace>/gateway/<zone>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The Gateway's zone.
    pub zone: String,
    /// The Gateway's name.
    pub name: String,
}

/// The endpoints of one service in one cell.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub(crate) endpoints: Vec<EndpointId>,
    /// Per subset of the service: its endpoints in this cell.
    pub(crate) subsets: Vec<Vec<EndpointId>>,
    pub(crate) next: AtomicU32,
}

/// How a unitized service finds a shard's owner.
#[derive(Debug)]
pub(crate) struct Unit {
    pub(crate) rule: KeyRule,
    pub(crate) shards: u32,
    /// Owner cell of each shard.
    pub(crate) owners: Vec<CellId>,
    /// Whether each shard is fenced.
    pub(crate) fenced: Vec<bool>,
    /// Standby cell of each shard, if any.
    pub(crate) standby: Vec<Option<CellId>>,
    /// The transform, to compute shards for keys outside requests.
    pub(crate) transform: atoll_model::Transform,
    pub(crate) epoch: u64,
    pub(crate) epoch_header: HeaderValue,
    /// `x-atoll-shard` values, precomputed for maps of up to 65,536 shards.
    pub(crate) shard_headers: Vec<HeaderValue>,
}

/// A service as the table knows it.
#[derive(Debug)]
pub struct Service {
    /// Its name.
    pub name: String,
    /// unitized, global or local.
    pub kind: ServiceKind,
    pub(crate) writes: Methods,
    pub(crate) unit: Option<Unit>,
    /// Indexed by cell id.
    pub(crate) groups: Vec<Group>,
    /// Subset names, in the order of `Group::subsets`.
    pub(crate) subsets: Vec<String>,
    /// Endpoint choice within a cell.
    pub load_balancer: LoadBalancer,
    /// Active health checks, if any.
    pub health_check: Option<HealthCheck>,
    /// Passive ejection settings.
    pub outlier_detection: OutlierDetection,
}

/// Mirroring of a route.
#[derive(Debug)]
pub(crate) struct Mirror {
    pub(crate) service: ServiceId,
    /// Out of 1,000,000.
    pub(crate) per_million: u32,
    pub(crate) shards: Option<ShardSet>,
}

/// One target of a route's split.
#[derive(Debug)]
pub(crate) struct Split {
    pub(crate) subset: u16,
    pub(crate) weight: u32,
    pub(crate) headers: Vec<HeaderCondition>,
}

/// A route as the table knows it.
#[derive(Debug)]
pub struct Route {
    /// Its name.
    pub name: String,
    /// The service it sends to.
    pub service: ServiceId,
    pub(crate) access: Option<Access>,
    /// Total time allowed.
    pub timeout: Option<Duration>,
    /// Retries after the first try.
    pub retries: u32,
    /// Time allowed per try.
    pub per_try_timeout: Option<Duration>,
    /// Conditions that allow a retry.
    pub retry_on: Vec<RetryOn>,
    pub(crate) split: Vec<Split>,
    pub(crate) split_total: u32,
    pub(crate) mirror: Option<Mirror>,
}

/// Everything a node needs to route requests, compiled from one version of
/// the configuration. Immutable once built (only round-robin counters move),
/// so it is shared by every request and swapped whole.
#[derive(Debug)]
pub struct RoutingTable {
    /// The configuration version it was built from.
    pub version: u64,
    pub(crate) zone: u16,
    pub(crate) region: u16,
    pub(crate) gzone: Option<CellId>,
    /// Cells, by id.
    pub cells: Vec<Cell>,
    /// Zones, by index.
    pub zones: Vec<Zone>,
    /// Regions, by index.
    pub regions: Vec<String>,
    /// Upstreams, by id.
    pub endpoints: Vec<Endpoint>,
    /// Services, by id.
    pub services: Vec<Service>,
    /// Routes, by id.
    pub routes: Vec<Route>,
    pub(crate) hosts: Hosts,
    /// Where misrouted requests go.
    pub misroute: Misroute,
    /// How long a fenced write may wait for the fence to lift.
    pub write_fence_hold: Duration,
}

fn header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("`{text}` cannot be a header value"))
}

fn index<T>(names: &HashMap<&str, T>, name: &str, what: &str) -> Result<T, String>
where
    T: Copy,
{
    names
        .get(name)
        .copied()
        .ok_or_else(|| format!("{what} `{name}` does not exist"))
}

impl RoutingTable {
    /// Builds the table for `scope` from every resource of one version.
    /// Fails (and the node keeps its old table) when the resources do not
    /// make a routable whole; they are expected to have passed
    /// `atoll_model::validate` already.
    pub fn compile(
        version: u64,
        resources: &[Resource],
        scope: &Scope,
    ) -> Result<RoutingTable, String> {
        let of = |kind: Kind| resources.iter().filter(move |r| r.kind() == kind);

        // Regions, zones, cells.
        let regions: Vec<String> = of(Kind::Region).map(|r| r.name().to_owned()).collect();
        let region_ids: HashMap<&str, u16> = regions
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u16))
            .collect();
        let mut zones = Vec::new();
        let mut zone_weights = Vec::new();
        for resource in of(Kind::Zone) {
            if let Spec::Zone(spec) = &resource.spec {
                zones.push(Zone {
                    name: resource.name().to_owned(),
                    region: index(&region_ids, &spec.region, "region")?,
                    gateways: Vec::new(),
                    next: AtomicU32::new(0),
                });
                zone_weights.push(u64::from(spec.weight));
            }
        }
        let zone_names: Vec<String> = zones.iter().map(|z| z.name.clone()).collect();
        let zone_ids: HashMap<&str, u16> = zone_names
            .iter()
            .enumerate()
            .map(|(i, z)| (z.as_str(), i as u16))
            .collect();
        let zone = index(&zone_ids, &scope.zone, "zone")?;
        let mut cells = Vec::new();
        for resource in of(Kind::Cell) {
            if let Spec::Cell(spec) = &resource.spec {
                let z = index(&zone_ids, &spec.zone, "zone")?;
                cells.push(Cell {
                    name: resource.name().to_owned(),
                    zone: z,
                    region: zones[usize::from(z)].region,
                    cell_type: spec.cell_type,
                    weight: u64::from(spec.weight) * zone_weights[usize::from(z)],
                    header: header_value(resource.name())?,
                });
            }
        }
        if cells.len() > usize::from(CellId::MAX) {
            return Err(format!(
                "{} cells; a table holds at most {}",
                cells.len(),
                CellId::MAX
            ));
        }
        let cell_ids: HashMap<&str, CellId> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i as CellId))
            .collect();
        let gzone = cells
            .iter()
            .position(|c| c.cell_type == CellType::Gzone)
            .map(|i| i as CellId);

        // Shard maps by rule.
        let rules: HashMap<&str, &atoll_model::ShardRuleSpec> = of(Kind::ShardRule)
            .filter_map(|r| match &r.spec {
                Spec::ShardRule(spec) => Some((r.name(), spec)),
                _ => None,
            })
            .collect();
        let maps: HashMap<&str, &atoll_model::ShardMapSpec> = of(Kind::ShardMap)
            .filter_map(|r| match &r.spec {
                Spec::ShardMap(spec) => Some((spec.rule.as_str(), spec)),
                _ => None,
            })
            .collect();

        // Services and their endpoints.
        let mut endpoints = Vec::new();
        let mut services = Vec::new();
        let service_resources: Vec<&Resource> = of(Kind::Service).collect();
        for (service_id, resource) in service_resources.iter().enumerate() {
            let Spec::Service(spec) = &resource.spec else {
                continue;
            };
            let unit = match (&spec.kind, &spec.shard_rule) {
                (ServiceKind::Unitized, Some(rule_name)) => {
                    let rule = rules
                        .get(rule_name.as_str())
                        .ok_or_else(|| format!("shard rule `{rule_name}` does not exist"))?;
                    let map = maps
                        .get(rule_name.as_str())
                        .ok_or_else(|| format!("no shard map for rule `{rule_name}`"))?;
                    let shards = rule.shards;
                    let mut owners = vec![CellId::MAX; shards as usize];
                    let mut fenced = vec![false; shards as usize];
                    let mut standby = vec![None; shards as usize];
                    for assignment in &map.assignments {
                        let owner = index(&cell_ids, &assignment.cell, "cell")?;
                        let standby_cell = match &assignment.standby {
                            Some(name) => Some(index(&cell_ids, name, "cell")?),
                            None => None,
                        };
                        for shard in assignment.shards.start..=assignment.shards.end {
                            let slot = owners.get_mut(shard as usize).ok_or_else(|| {
                                format!("shard {shard} is beyond the rule's {shards}")
                            })?;
                            *slot = owner;
                            fenced[shard as usize] = assignment.state == ShardState::Fenced;
                            standby[shard as usize] = standby_cell;
                        }
                    }
                    if let Some(shard) = owners.iter().position(|o| *o == CellId::MAX) {
                        return Err(format!("shard {shard} of rule `{rule_name}` has no owner"));
                    }
                    let shard_headers = if shards <= 65_536 {
                        (0..shards).map(HeaderValue::from).collect()
                    } else {
                        Vec::new()
                    };
                    Some(Unit {
                        rule: KeyRule::new(shards, &rule.key)?,
                        shards,
                        owners,
                        fenced,
                        standby,
                        transform: rule.key.transform.clone(),
                        epoch: map.epoch,
                        epoch_header: HeaderValue::from(map.epoch),
                        shard_headers,
                    })
                }
                (ServiceKind::Unitized, None) => {
                    return Err(format!(
                        "unitized service `{}` has no shard rule",
                        resource.name()
                    ));
                }
                _ => None,
            };
            let subsets: Vec<String> = spec.subsets.iter().map(|s| s.name.clone()).collect();
            let mut groups: Vec<Group> = (0..cells.len()).map(|_| Group::default()).collect();
            for group in &mut groups {
                group.subsets = vec![Vec::new(); subsets.len()];
            }
            // Static endpoints, then the ready ones agents reported (reports
            // for cells that no longer exist are skipped).
            let reported = resources
                .iter()
                .filter_map(|r| match &r.spec {
                    Spec::Endpoints(e) if e.service == resource.name() => Some(e),
                    _ => None,
                })
                .flat_map(|e| e.endpoints.iter().filter(|x| x.ready))
                .filter(|x| cell_ids.contains_key(x.cell.as_str()))
                .map(|x| (x.cell.as_str(), x.address.as_str(), &x.labels));
            let declared = spec
                .endpoints
                .iter()
                .map(|x| (x.cell.as_str(), x.address.as_str(), &x.labels));
            let mut seen = std::collections::HashSet::new();
            for (cell_name, address, labels) in declared.chain(reported) {
                if !seen.insert(address) {
                    continue;
                }
                let cell = index(&cell_ids, cell_name, "cell")?;
                let id = endpoints.len() as EndpointId;
                endpoints.push(Endpoint {
                    address: address.to_owned(),
                    cell: Some(cell),
                    service: Some(service_id as ServiceId),
                    labels: labels.clone(),
                    peer: None,
                });
                let group = &mut groups[usize::from(cell)];
                group.endpoints.push(id);
                for (i, subset) in spec.subsets.iter().enumerate() {
                    if subset.labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                        group.subsets[i].push(id);
                    }
                }
            }
            services.push(Service {
                name: resource.name().to_owned(),
                kind: spec.kind,
                writes: Methods::parse(&spec.writes.methods)?,
                unit,
                groups,
                subsets,
                load_balancer: spec.load_balancer,
                health_check: spec.health_check.clone(),
                outlier_detection: spec.outlier_detection.clone(),
            });
        }
        let service_ids: HashMap<&str, ServiceId> = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i as ServiceId))
            .collect();

        // Gateways: ours gives settings; the others are forwarding targets.
        let mut misroute = Misroute::default();
        let mut write_fence_hold = Duration::ZERO;
        let mut found_self = scope.gateway.is_none();
        for resource in of(Kind::Gateway) {
            let Spec::Gateway(spec) = &resource.spec else {
                continue;
            };
            if scope.gateway.as_deref() == Some(resource.name()) {
                found_self = true;
                misroute = spec.misroute;
                write_fence_hold = spec.write_fence_hold.map(|d| d.0).unwrap_or_default();
                continue;
            }
            let Some(address) = &spec.advertise else {
                continue;
            };
            if spec.peer.is_some() && !scope.peer_tls {
                continue;
            }
            let z = index(&zone_ids, &spec.zone, "zone")?;
            let id = endpoints.len() as EndpointId;
            endpoints.push(Endpoint {
                address: address.clone(),
                cell: None,
                service: None,
                labels: BTreeMap::new(),
                peer: spec.peer.as_ref().map(|_| Peer {
                    zone: spec.zone.clone(),
                    name: resource.name().to_owned(),
                }),
            });
            zones[usize::from(z)].gateways.push(id);
        }
        if !found_self {
            return Err(format!(
                "Gateway `{}` does not exist in version {version}",
                scope.gateway.as_deref().unwrap_or_default()
            ));
        }

        // Routes.
        let mut routes = Vec::new();
        let mut hosts = Hosts::default();
        for resource in of(Kind::Route) {
            let Spec::Route(spec) = &resource.spec else {
                continue;
            };
            let route_id = routes.len() as RouteId;
            let service = index(&service_ids, &spec.service, "service")?;
            let service_spec = &services[service as usize];
            let mut split = Vec::new();
            for target in &spec.split {
                let subset = service_spec
                    .subsets
                    .iter()
                    .position(|s| *s == target.subset)
                    .ok_or_else(|| {
                        format!(
                            "service `{}` has no subset `{}`",
                            spec.service, target.subset
                        )
                    })?;
                split.push(Split {
                    subset: subset as u16,
                    weight: target.weight,
                    headers: target
                        .headers
                        .iter()
                        .map(HeaderCondition::new)
                        .collect::<Result<_, _>>()?,
                });
            }
            let split_total = split.iter().map(|s| s.weight).sum();
            let mirror = match &spec.mirror {
                Some(mirror) => Some(Mirror {
                    service: index(&service_ids, &mirror.service, "service")?,
                    per_million: (mirror.percent.clamp(0.0, 100.0) * 10_000.0).round() as u32,
                    shards: mirror.shards.clone(),
                }),
                None => None,
            };
            let retries = spec.retries.as_ref();
            routes.push(Route {
                name: resource.name().to_owned(),
                service,
                access: spec.access,
                timeout: spec.timeout.map(|d| d.0),
                retries: retries.map(|r| r.attempts).unwrap_or(0),
                per_try_timeout: retries.and_then(|r| r.per_try_timeout).map(|d| d.0),
                retry_on: retries
                    .map(|r| r.on.clone())
                    .unwrap_or_else(|| vec![RetryOn::ConnectFailure]),
                split,
                split_total,
                mirror,
            });
            let entries = if spec.matches.is_empty() {
                vec![MatchEntry {
                    path: PathCondition::Any,
                    methods: Methods::default(),
                    headers: Vec::new(),
                    route: route_id,
                }]
            } else {
                spec.matches
                    .iter()
                    .map(|m| {
                        let path = if let Some(exact) = &m.path_exact {
                            PathCondition::Exact(exact.clone())
                        } else if let Some(prefix) = &m.path_prefix {
                            PathCondition::Prefix(prefix.clone())
                        } else if let Some(template) = &m.path_template {
                            PathCondition::Template(
                                template
                                    .trim_start_matches('/')
                                    .split('/')
                                    .map(|s| {
                                        (!(s == "*" || (s.starts_with('{') && s.ends_with('}'))))
                                            .then(|| s.to_owned())
                                    })
                                    .collect(),
                            )
                        } else {
                            PathCondition::Any
                        };
                        Ok(MatchEntry {
                            path,
                            methods: Methods::parse(&m.methods)?,
                            headers: m
                                .headers
                                .iter()
                                .map(HeaderCondition::new)
                                .collect::<Result<_, String>>()?,
                            route: route_id,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?
            };
            for entry in entries {
                hosts.add(&spec.hosts, entry);
            }
        }
        hosts.finish();

        let region = zones[usize::from(zone)].region;
        Ok(RoutingTable {
            version,
            zone,
            region,
            gzone,
            cells,
            zones,
            regions,
            endpoints,
            services,
            routes,
            hosts,
            misroute,
            write_fence_hold,
        })
    }

    /// The zone the table is for.
    pub fn zone(&self) -> &Zone {
        &self.zones[usize::from(self.zone)]
    }

    /// The id of a cell by name.
    pub fn cell_id(&self, name: &str) -> Option<CellId> {
        self.cells
            .iter()
            .position(|c| c.name == name)
            .map(|i| i as CellId)
    }

    /// The id of a service by name.
    pub fn service_id(&self, name: &str) -> Option<ServiceId> {
        self.services
            .iter()
            .position(|s| s.name == name)
            .map(|i| i as ServiceId)
    }

    /// The endpoints of a service in a cell.
    pub fn endpoints_of(&self, service: ServiceId, cell: CellId) -> &[EndpointId] {
        self.services
            .get(service as usize)
            .and_then(|s| s.groups.get(usize::from(cell)))
            .map(|g| g.endpoints.as_slice())
            .unwrap_or(&[])
    }

    /// The owner cell and fence state of `shard` for a unitized service.
    pub fn owner(&self, service: ServiceId, shard: u32) -> Option<(CellId, bool)> {
        let unit = self.services.get(service as usize)?.unit.as_ref()?;
        let owner = *unit.owners.get(shard as usize)?;
        Some((owner, unit.fenced[shard as usize]))
    }

    /// The standby cell of `shard` of a unitized service, if it has one.
    pub fn standby(&self, service: ServiceId, shard: u32) -> Option<CellId> {
        *self
            .services
            .get(service as usize)?
            .unit
            .as_ref()?
            .standby
            .get(shard as usize)?
    }

    /// The shard of a routing key, for a unitized service (what a gateway
    /// would compute from a request carrying it).
    pub fn shard_of_key(
        &self,
        service: ServiceId,
        key: &str,
    ) -> Option<Result<u32, atoll_model::key::KeyError>> {
        let unit = self.services.get(service as usize)?.unit.as_ref()?;
        Some(atoll_model::key::shard_of(
            &unit.transform,
            unit.shards,
            key.as_bytes(),
        ))
    }

    /// The epoch of a unitized service's shard map.
    pub fn epoch(&self, service: ServiceId) -> Option<u64> {
        Some(self.services.get(service as usize)?.unit.as_ref()?.epoch)
    }

    /// Whether the route mirrors requests.
    pub fn has_mirror(&self, route: RouteId) -> bool {
        self.routes
            .get(route as usize)
            .is_some_and(|r| r.mirror.as_ref().is_some_and(|m| m.per_million > 0))
    }

    /// Whether requests of this route need their body buffered to find the key.
    pub fn needs_body(&self, route: RouteId) -> bool {
        self.routes
            .get(route as usize)
            .and_then(|r| self.services.get(r.service as usize))
            .and_then(|s| s.unit.as_ref())
            .is_some_and(|u| u.rule.needs_body())
    }

    /// `x-atoll-shard` value for a shard of a service.
    pub fn shard_header(&self, service: ServiceId, shard: u32) -> HeaderValue {
        self.services
            .get(service as usize)
            .and_then(|s| s.unit.as_ref())
            .and_then(|u| u.shard_headers.get(shard as usize).cloned())
            .unwrap_or_else(|| HeaderValue::from(shard))
    }

    /// `x-atoll-epoch` value of a unitized service.
    pub fn epoch_header(&self, service: ServiceId) -> Option<&HeaderValue> {
        self.services
            .get(service as usize)
            .and_then(|s| s.unit.as_ref())
            .map(|u| &u.epoch_header)
    }

    /// The number of shards of a unitized service.
    pub fn shards(&self, service: ServiceId) -> Option<u32> {
        Some(self.services.get(service as usize)?.unit.as_ref()?.shards)
    }
}
