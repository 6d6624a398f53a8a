//! The per-request decision: route → service → cell → endpoint, or a refusal.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use atoll_model::key::{KeyError, KeyOutcome, RequestView};
use atoll_model::{Access, CellType, LoadBalancer, Misroute, OnMissing, ServiceKind};
use http::{HeaderMap, Method};

use crate::matcher::all_hold;
use crate::table::{Group, RoutingTable, Service};
use crate::{CellId, EndpointId, RouteId, ServiceId};

/// Where routing reads a request's headers: an `http::HeaderMap`, or a data
/// path's own parsed form. Names are given in lower case.
pub trait HeaderSource {
    /// The values of one header.
    type Values<'s>: Iterator<Item = &'s [u8]>
    where
        Self: 's;

    /// The values of header `name`, in order.
    fn values<'s>(&'s self, name: &str) -> Self::Values<'s>;
}

type ValueBytes<'s> =
    std::iter::Map<http::header::ValueIter<'s, http::HeaderValue>, fn(&http::HeaderValue) -> &[u8]>;

impl HeaderSource for HeaderMap {
    type Values<'s> = ValueBytes<'s>;

    fn values<'s>(&'s self, name: &str) -> ValueBytes<'s> {
        self.get_all(name)
            .iter()
            .map(http::HeaderValue::as_bytes as fn(&http::HeaderValue) -> &[u8])
    }
}

/// What a request offers to routing.
#[derive(Debug)]
pub struct RequestInfo<'a, H: ?Sized = HeaderMap> {
    /// The method.
    pub method: &'a Method,
    /// The host, without port (`Host` header or authority).
    pub host: Option<&'a str>,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    /// The headers.
    pub headers: &'a H,
    /// The body, when buffered (only for rules that read it).
    pub body: Option<&'a [u8]>,
    /// Whether another gateway already forwarded this request (`x-atoll-hop`).
    pub forwarded: bool,
}

impl<H: ?Sized> Clone for RequestInfo<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H: ?Sized> Copy for RequestInfo<'_, H> {}

impl<H: HeaderSource + ?Sized> RequestView for RequestInfo<'_, H> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .values(name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.headers.values("cookie").find_map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|text| atoll_model::key::cookie_value(text, name))
        })
    }

    fn path(&self) -> &str {
        self.path
    }

    fn query(&self) -> Option<&str> {
        self.query
    }

    fn body(&self) -> Option<&[u8]> {
        self.body
    }
}

/// Runtime state of upstreams, owned by the data path: which are in
/// rotation and how busy they are.
pub trait Health {
    /// Whether the endpoint may take requests (healthy, not ejected).
    fn available(&self, endpoint: EndpointId) -> bool;
    /// Requests in flight to the endpoint, for least-request balancing.
    fn load(&self, endpoint: EndpointId) -> u32 {
        let _ = endpoint;
        0
    }
}

/// Every endpoint available: for tests and tools.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllAvailable;

impl Health for AllAvailable {
    fn available(&self, _: EndpointId) -> bool {
        true
    }
}

/// How the request reaches its cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// To an endpoint of the cell.
    Direct,
    /// To a gateway of the cell's zone, which routes it again.
    Gateway,
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// The matched route.
    pub route: RouteId,
    /// Its service.
    pub service: ServiceId,
    /// The cell that serves it.
    pub cell: CellId,
    /// The upstream: an endpoint of the cell, or a gateway of its zone.
    pub endpoint: EndpointId,
    /// Direct, or through another zone's gateway (a misroute).
    pub via: Via,
    /// Whether it is a write.
    pub write: bool,
    /// The routing key, for unitized services.
    pub key: Option<Cow<'a, str>>,
    /// The shard, for unitized services.
    pub shard: Option<u32>,
    /// The subset chosen by the route's split.
    pub subset: Option<u16>,
}

/// Why a request is not sent anywhere. The data path answers with
/// [`Refusal::status`] and a JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No route matches.
    NoRoute,
    /// A unitized service's rule found no key and says `reject`.
    MissingKey {
        /// The service.
        service: ServiceId,
    },
    /// A key was found but cannot become a shard.
    InvalidKey(KeyError),
    /// A write to a fenced shard.
    Fenced {
        /// The unitized service.
        service: ServiceId,
        /// The shard.
        shard: u32,
        /// The shard map's epoch.
        epoch: u64,
        /// The owner.
        cell: CellId,
    },
    /// The cell has no endpoint in rotation.
    NoEndpoint {
        /// The service.
        service: ServiceId,
        /// The cell, if one was chosen.
        cell: Option<CellId>,
    },
    /// The request needs the gzone and there is none.
    NoGzone {
        /// The service.
        service: ServiceId,
    },
    /// A forwarded request whose cell is not in this zone either: answering
    /// instead of forwarding again makes loops impossible.
    Loop {
        /// The cell it was for.
        cell: CellId,
    },
}

impl Refusal {
    /// The HTTP status to answer.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::NoRoute => 404,
            Refusal::MissingKey { .. } | Refusal::InvalidKey(_) => 400,
            Refusal::Fenced { .. } | Refusal::NoEndpoint { .. } | Refusal::NoGzone { .. } => 503,
            Refusal::Loop { .. } => 508,
        }
    }

    /// A stable code for programs.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NoRoute => "noRoute",
            Refusal::MissingKey { .. } => "missingKey",
            Refusal::InvalidKey(_) => "invalidKey",
            Refusal::Fenced { .. } => "shardFenced",
            Refusal::NoEndpoint { .. } => "noEndpoint",
            Refusal::NoGzone { .. } => "noGzone",
            Refusal::Loop { .. } => "misrouteLoop",
        }
    }

    /// One sentence for the JSON body.
    pub fn message(&self, table: &RoutingTable) -> String {
        let cell = |id: CellId| {
            table
                .cells
                .get(usize::from(id))
                .map_or("?", |c| c.name.as_str())
                .to_owned()
        };
        let service = |id: ServiceId| {
            table
                .services
                .get(id as usize)
                .map_or("?", |s| s.name.as_str())
                .to_owned()
        };
        match self {
            Refusal::NoRoute => "no route matches this request".into(),
            Refusal::MissingKey { service: s } => format!(
                "service {} routes by a key this request does not carry; see the shard rule's sources",
                service(*s)
            ),
            Refusal::InvalidKey(error) => error.to_string(),
            Refusal::Fenced {
                shard,
                epoch,
                cell: c,
                ..
            } => format!(
                "shard {shard} (cell {}) is fenced for a switchover at epoch {epoch}; writes are refused until it completes; retry shortly",
                cell(*c)
            ),
            Refusal::NoEndpoint {
                service: s,
                cell: Some(c),
            } => format!(
                "service {} has no endpoint in rotation in cell {}",
                service(*s),
                cell(*c)
            ),
            Refusal::NoEndpoint {
                service: s,
                cell: None,
            } => {
                format!(
                    "service {} has no endpoint in rotation in any cell",
                    service(*s)
                )
            }
            Refusal::NoGzone { service: s } => {
                format!("service {} needs the gzone and there is none", service(*s))
            }
            Refusal::Loop { cell: c } => format!(
                "this request was forwarded by another gateway for cell {}, which is not in this gateway's zone either; not forwarding again",
                cell(*c)
            ),
        }
    }
}

/// The outcome of routing a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Send it here.
    Upstream(Target<'a>),
    /// Answer it with an error.
    Refuse(Refusal),
}

/// The cell a service kind chose, before the zone check.
pub(crate) struct Choice<'a> {
    pub(crate) cell: CellId,
    pub(crate) key: Option<Cow<'a, str>>,
    pub(crate) shard: Option<u32>,
}

impl RoutingTable {
    /// The route for a request, if any matches.
    pub fn match_route<H: HeaderSource + ?Sized>(
        &self,
        request: &RequestInfo<'_, H>,
    ) -> Option<RouteId> {
        self.hosts
            .find(request.host, request.method, request.path, request.headers)
    }

    /// Decides where a request of `route` goes.
    pub fn decide<'a, H: HeaderSource + ?Sized>(
        &self,
        route_id: RouteId,
        request: &'a RequestInfo<'a, H>,
        health: &impl Health,
    ) -> Decision<'a> {
        let Some(route) = self.routes.get(route_id as usize) else {
            return Decision::Refuse(Refusal::NoRoute);
        };
        let service_id = route.service;
        let service = &self.services[service_id as usize];
        let write = match route.access {
            Some(Access::Write) => true,
            Some(Access::Read) => false,
            None => service.writes.contains(request.method),
        };
        let choice = match self.choose_cell(service_id, service, request, write, health) {
            Ok(choice) => choice,
            Err(refusal) => return Decision::Refuse(refusal),
        };
        let subset = self.split(route_id, request.headers);
        let cell = &self.cells[usize::from(choice.cell)];
        let (endpoint, via) = if cell.zone == self.zone {
            match self.pick(service, choice.cell, subset, None, health) {
                Some(endpoint) => (endpoint, Via::Direct),
                None => {
                    return Decision::Refuse(Refusal::NoEndpoint {
                        service: service_id,
                        cell: Some(choice.cell),
                    });
                }
            }
        } else if request.forwarded {
            return Decision::Refuse(Refusal::Loop { cell: choice.cell });
        } else {
            match self.misroute_target(service, choice.cell, subset, None, health) {
                Some(target) => target,
                None => {
                    return Decision::Refuse(Refusal::NoEndpoint {
                        service: service_id,
                        cell: Some(choice.cell),
                    });
                }
            }
        };
        Decision::Upstream(Target {
            route: route_id,
            service: service_id,
            cell: choice.cell,
            endpoint,
            via,
            write,
            key: choice.key,
            shard: choice.shard,
            subset,
        })
    }

    fn choose_cell<'a, H: HeaderSource + ?Sized>(
        &self,
        service_id: ServiceId,
        service: &Service,
        request: &'a RequestInfo<'a, H>,
        write: bool,
        health: &impl Health,
    ) -> Result<Choice<'a>, Refusal> {
        let serves = |cell: CellId| self.has_available(service, cell, health);
        self.choose_cell_by(service_id, service, request, write, None, &serves)
    }

    /// The cell for a request to `service`, given which cells have an
    /// endpoint in rotation (`serves`) and, for local services, the
    /// caller's own cell to prefer.
    pub(crate) fn choose_cell_by<'a, H: HeaderSource + ?Sized>(
        &self,
        service_id: ServiceId,
        service: &Service,
        request: &'a RequestInfo<'a, H>,
        write: bool,
        nearest: Option<CellId>,
        serves: &impl Fn(CellId) -> bool,
    ) -> Result<Choice<'a>, Refusal> {
        let bare = |cell| Choice {
            cell,
            key: None,
            shard: None,
        };
        match service.kind {
            ServiceKind::Global => self.global_cell(service_id, write, serves).map(bare),
            ServiceKind::Local => self.local_cell(service_id, nearest, serves).map(bare),
            ServiceKind::Unitized => {
                let Some(unit) = &service.unit else {
                    return Err(Refusal::NoEndpoint {
                        service: service_id,
                        cell: None,
                    });
                };
                match unit.rule.route(request) {
                    KeyOutcome::Shard { key, shard } => {
                        let owner = unit.owners[shard as usize];
                        if write && unit.fenced[shard as usize] {
                            return Err(Refusal::Fenced {
                                service: service_id,
                                shard,
                                epoch: unit.epoch,
                                cell: owner,
                            });
                        }
                        Ok(Choice {
                            cell: owner,
                            key: Some(key),
                            shard: Some(shard),
                        })
                    }
                    KeyOutcome::Missing(OnMissing::Reject) => Err(Refusal::MissingKey {
                        service: service_id,
                    }),
                    KeyOutcome::Missing(OnMissing::Global) => {
                        self.global_cell(service_id, write, serves).map(bare)
                    }
                    KeyOutcome::Missing(OnMissing::Local) => {
                        self.local_cell(service_id, nearest, serves).map(bare)
                    }
                    KeyOutcome::Invalid(error) => Err(Refusal::InvalidKey(error)),
                }
            }
        }
    }

    fn has_available(&self, service: &Service, cell: CellId, health: &impl Health) -> bool {
        service.groups[usize::from(cell)]
            .endpoints
            .iter()
            .any(|e| health.available(*e))
    }

    /// Writes go to the gzone; reads to a czone of this region with an
    /// endpoint in rotation, if any, else the gzone.
    pub(crate) fn global_cell(
        &self,
        service_id: ServiceId,
        write: bool,
        serves: &impl Fn(CellId) -> bool,
    ) -> Result<CellId, Refusal> {
        let gzone = self.gzone.ok_or(Refusal::NoGzone {
            service: service_id,
        })?;
        if !write {
            let czones = self.cells.iter().enumerate().filter(|(id, c)| {
                c.cell_type == CellType::Czone && c.region == self.region && serves(*id as CellId)
            });
            if let Some(cell) =
                weighted(czones.map(|(id, c)| (id as CellId, c.weight, c.zone == self.zone)))
            {
                return Ok(cell);
            }
        }
        Ok(gzone)
    }

    /// Cells of this zone, else of this region, else anywhere; weighted
    /// within the first tier that has a cell with an endpoint in rotation and
    /// a non-zero weight.
    pub(crate) fn local_cell(
        &self,
        service_id: ServiceId,
        nearest: Option<CellId>,
        serves: &impl Fn(CellId) -> bool,
    ) -> Result<CellId, Refusal> {
        // A caller's own cell first (a sidecar or SDK client knows it).
        if let Some(own) = nearest
            && self
                .cells
                .get(usize::from(own))
                .is_some_and(|c| c.weight > 0)
            && serves(own)
        {
            return Ok(own);
        }
        let candidates = || {
            self.cells
                .iter()
                .enumerate()
                .filter(|(id, _)| serves(*id as CellId))
        };
        let tiers: [&dyn Fn(&crate::table::Cell) -> bool; 3] = [
            &|c| c.zone == self.zone,
            &|c| c.region == self.region,
            &|_| true,
        ];
        for tier in tiers {
            let cells = candidates()
                .filter(|(_, c)| tier(c) && c.weight > 0)
                .map(|(id, c)| (id as CellId, c.weight, false));
            if let Some(cell) = weighted(cells) {
                return Ok(cell);
            }
        }
        // Every candidate has weight 0 (drained): serving beats failing.
        candidates()
            .map(|(id, _)| id as CellId)
            .next()
            .ok_or(Refusal::NoEndpoint {
                service: service_id,
                cell: None,
            })
    }

    /// The subset a route's split chooses: header-pinned targets first, then
    /// by weight.
    fn split<H: HeaderSource + ?Sized>(&self, route: RouteId, headers: &H) -> Option<u16> {
        let route = &self.routes[route as usize];
        if route.split.is_empty() {
            return None;
        }
        if let Some(pinned) = route
            .split
            .iter()
            .find(|s| !s.headers.is_empty() && all_hold(&s.headers, headers))
        {
            return Some(pinned.subset);
        }
        if route.split_total == 0 {
            return None;
        }
        let mut ticket = fastrand::u32(0..route.split_total);
        for target in &route.split {
            if ticket < target.weight {
                return Some(target.subset);
            }
            ticket -= target.weight;
        }
        None
    }

    /// An endpoint of `service` in `cell`, from the subset when it has one in
    /// rotation, else from the whole cell; never `exclude`.
    fn pick(
        &self,
        service: &Service,
        cell: CellId,
        subset: Option<u16>,
        exclude: Option<EndpointId>,
        health: &impl Health,
    ) -> Option<EndpointId> {
        let group: &Group = service.groups.get(usize::from(cell))?;
        let usable = |e: &EndpointId| Some(*e) != exclude && health.available(*e);
        if let Some(subset) = subset {
            let members = &group.subsets[usize::from(subset)];
            if let Some(found) =
                balance(service.load_balancer, members, &group.next, usable, health)
            {
                return Some(found);
            }
        }
        balance(
            service.load_balancer,
            &group.endpoints,
            &group.next,
            usable,
            health,
        )
    }

    /// For a cell of another zone: one of that zone's gateways, or (with
    /// `misroute: endpoints`, or when none advertises an address) an
    /// endpoint of the cell.
    fn misroute_target(
        &self,
        service: &Service,
        cell: CellId,
        subset: Option<u16>,
        exclude: Option<EndpointId>,
        health: &impl Health,
    ) -> Option<(EndpointId, Via)> {
        if self.misroute == Misroute::Gateway {
            let zone = &self.zones[usize::from(self.cells[usize::from(cell)].zone)];
            let usable = |e: &EndpointId| Some(*e) != exclude && health.available(*e);
            if let Some(gateway) = balance(
                LoadBalancer::RoundRobin,
                &zone.gateways,
                &zone.next,
                usable,
                health,
            ) {
                return Some((gateway, Via::Gateway));
            }
        }
        self.pick(service, cell, subset, exclude, health)
            .map(|e| (e, Via::Direct))
    }

    /// Another upstream for a retry of `target`: same cell (or same zone's
    /// gateways), not the one that failed.
    pub fn retry_endpoint(
        &self,
        target: &Target<'_>,
        failed: EndpointId,
        health: &impl Health,
    ) -> Option<EndpointId> {
        let service = self.services.get(target.service as usize)?;
        match target.via {
            Via::Direct => self.pick(service, target.cell, target.subset, Some(failed), health),
            Via::Gateway => self
                .misroute_target(service, target.cell, target.subset, Some(failed), health)
                .map(|(e, _)| e),
        }
    }

    /// Whether to copy this request to the route's mirror, and where: an
    /// endpoint of the shadow service chosen by its own kind (never through
    /// another gateway).
    pub fn mirror<H: HeaderSource + ?Sized>(
        &self,
        target: &Target<'_>,
        request: &RequestInfo<'_, H>,
        health: &impl Health,
    ) -> Option<EndpointId> {
        let mirror = self.routes.get(target.route as usize)?.mirror.as_ref()?;
        if mirror.per_million == 0 || fastrand::u32(0..1_000_000) >= mirror.per_million {
            return None;
        }
        if let Some(shards) = &mirror.shards
            && !target.shard.is_some_and(|s| shards.contains(s))
        {
            return None;
        }
        let service = self.services.get(mirror.service as usize)?;
        let serves = |cell: CellId| self.has_available(service, cell, health);
        let cell = match service.kind {
            ServiceKind::Unitized => {
                let unit = service.unit.as_ref()?;
                match unit.rule.route(request) {
                    KeyOutcome::Shard { shard, .. } => unit.owners[shard as usize],
                    _ => return None,
                }
            }
            ServiceKind::Global => self
                .global_cell(mirror.service, target.write, &serves)
                .ok()?,
            ServiceKind::Local => self.local_cell(mirror.service, None, &serves).ok()?,
        };
        self.pick(service, cell, None, None, health)
    }
}

/// Picks among endpoints with the balancer; `usable` filters.
fn balance(
    balancer: LoadBalancer,
    endpoints: &[EndpointId],
    next: &std::sync::atomic::AtomicU32,
    usable: impl Fn(&EndpointId) -> bool,
    health: &impl Health,
) -> Option<EndpointId> {
    let count = endpoints.len();
    if count == 0 {
        return None;
    }
    match balancer {
        LoadBalancer::RoundRobin => {
            let start = next.fetch_add(1, Ordering::Relaxed) as usize;
            (0..count)
                .map(|i| endpoints[(start + i) % count])
                .find(|e| usable(e))
        }
        LoadBalancer::LeastRequest => {
            if count == 1 {
                return endpoints.first().copied().filter(|e| usable(e));
            }
            let a = endpoints[fastrand::usize(0..count)];
            let b = endpoints[fastrand::usize(0..count)];
            match (usable(&a), usable(&b)) {
                (true, true) => Some(if health.load(b) < health.load(a) {
                    b
                } else {
                    a
                }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => endpoints.iter().copied().find(|e| usable(e)),
            }
        }
    }
}

/// A weighted random choice; `preferred` candidates win ties of nothing
/// (they only matter when every weight is equal and one is local).
fn weighted(candidates: impl Iterator<Item = (CellId, u64, bool)>) -> Option<CellId> {
    let candidates: smallvec_like::Small = candidates.collect();
    let total: u64 = candidates.iter().map(|(_, w, _)| *w).sum();
    if candidates.is_empty() {
        return None;
    }
    if total == 0 {
        return candidates
            .iter()
            .find(|(_, _, preferred)| *preferred)
            .or(candidates.first())
            .map(|(c, _, _)| *c);
    }
    let mut ticket = fastrand::u64(0..total);
    for (cell, weight, _) in candidates.iter() {
        if ticket < *weight {
            return Some(*cell);
        }
        ticket -= weight;
    }
    None
}

/// A tiny inline vector for the few cells a choice weighs, so that local and
/// global routing do not allocate for ordinary topologies.
mod smallvec_like {
    use crate::CellId;

    const INLINE: usize = 16;

    #[expect(
        clippy::large_enum_variant,
        reason = "inline on purpose: no allocation for up to 16 cells"
    )]
    pub(super) enum Small {
        Inline([(CellId, u64, bool); INLINE], usize),
        Heap(Vec<(CellId, u64, bool)>),
    }

    impl Small {
        pub(super) fn iter(&self) -> std::slice::Iter<'_, (CellId, u64, bool)> {
            match self {
                Small::Inline(items, len) => items[..*len].iter(),
                Small::Heap(items) => items.iter(),
            }
        }

        pub(super) fn is_empty(&self) -> bool {
            match self {
                Small::Inline(_, len) => *len == 0,
                Small::Heap(items) => items.is_empty(),
            }
        }

        pub(super) fn first(&self) -> Option<&(CellId, u64, bool)> {
            self.iter().next()
        }
    }

    impl FromIterator<(CellId, u64, bool)> for Small {
        fn from_iter<I: IntoIterator<Item = (CellId, u64, bool)>>(iter: I) -> Self {
            let mut items = [(0, 0, false); INLINE];
            let mut len = 0;
            let mut iter = iter.into_iter();
            for item in iter.by_ref() {
                if len == INLINE {
                    let mut heap = items.to_vec();
                    heap.push(item);
                    heap.extend(iter);
                    return Small::Heap(heap);
                }
                items[len] = item;
                len += 1;
            }
            Small::Inline(items, len)
        }
    }
}
