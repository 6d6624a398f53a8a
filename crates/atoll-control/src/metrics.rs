//! Prometheus metrics of the control plane, served at `/metrics` in the text
//! exposition format. `docs/api.md#metrics` lists them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HttpLabels {
    pub(crate) method: String,
    pub(crate) route: String,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub(crate) kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub(crate) state: String,
}

/// Every metric of the control plane.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) http_requests: Family<HttpLabels, Counter>,
    pub(crate) http_duration: Family<RouteLabels, Histogram>,
    pub(crate) revision: Gauge,
    pub(crate) commits: Counter,
    pub(crate) rejected: Family<ResultLabels, Counter>,
    pub(crate) nodes: Family<StateLabels, Gauge>,
    pub(crate) updates_sent: Family<KindLabels, Counter>,
    pub(crate) acks: Counter,
    pub(crate) nacks: Counter,
    pub(crate) barriers: Family<ResultLabels, Counter>,
    pub(crate) barrier_duration: Histogram,
    /// 1 while this replica leads and acts.
    pub(crate) leader: Gauge,
    /// The term this replica leads (0 when it does not).
    pub(crate) term: Gauge,
    pub(crate) elections: Counter,
    pub(crate) step_downs: Counter,
    /// Writes this replica made that were fenced: it had been deposed.
    pub(crate) fenced_writes: Counter,
    /// REST calls refused: no or a bad credential, or no role for it.
    pub(crate) refused: Counter,
    /// Calls that could not be appended to the audit chain.
    pub(crate) audit_failures: Counter,
    /// Registry calls by call and result.
    pub(crate) registry_calls: Family<RegistryCallLabels, Counter>,
    /// Registry updates sent to subscribers, and their bytes.
    pub(crate) registry_updates: Counter,
    pub(crate) registry_update_bytes: Counter,
    /// Registry subscribers on this replica.
    pub(crate) registry_subscribers: Gauge,
    /// Instances in the registry, as this replica's index holds them.
    pub(crate) registry_instances: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RegistryCallLabels {
    pub(crate) call: String,
    pub(crate) result: String,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("atoll_control");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "REST requests by method, route and status",
            http_requests.clone(),
        );
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "REST request latency by route",
            http_duration.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "store_revision",
            "The store's current revision",
            revision.clone(),
        );
        let commits = Counter::default();
        registry.register("commits", "Changes committed to the store", commits.clone());
        let rejected = Family::<ResultLabels, Counter>::default();
        registry.register(
            "changes_rejected",
            "Changes refused, by reason (invalid, conflict)",
            rejected.clone(),
        );
        let nodes = Family::<StateLabels, Gauge>::default();
        registry.register(
            "config_nodes",
            "Known data-plane nodes by state (connected, disconnected)",
            nodes.clone(),
        );
        let updates_sent = Family::<KindLabels, Counter>::default();
        registry.register(
            "config_updates_sent",
            "Config updates sent to nodes, by kind (snapshot, delta)",
            updates_sent.clone(),
        );
        let acks = Counter::default();
        registry.register("config_acks", "Config updates ACKed by nodes", acks.clone());
        let nacks = Counter::default();
        registry.register(
            "config_nacks",
            "Config updates NACKed by nodes",
            nacks.clone(),
        );
        let barriers = Family::<ResultLabels, Counter>::default();
        registry.register(
            "barriers",
            "Barriers by result (reached, timeout)",
            barriers.clone(),
        );
        let barrier_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "barrier_duration_seconds",
            "Time barriers waited",
            barrier_duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica leads the control plane and acts",
            leader.clone(),
        );
        let term = Gauge::default();
        registry.register(
            "leader_term",
            "The term this replica leads (0 when it does not)",
            term.clone(),
        );
        let elections = Counter::default();
        registry.register(
            "leader_elections",
            "Terms this replica won",
            elections.clone(),
        );
        let step_downs = Counter::default();
        registry.register(
            "leader_step_downs",
            "Times this replica stopped leading",
            step_downs.clone(),
        );
        let fenced_writes = Counter::default();
        registry.register(
            "fenced_writes",
            "Writes of this replica refused because another replica had been elected",
            fenced_writes.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "refused_requests",
            "REST calls refused for a missing or bad credential, or a missing role",
            refused.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "audit_failures",
            "Calls answered that could not be appended to the audit chain (the store refused or was unreachable)",
            audit_failures.clone(),
        );
        let registry_calls = Family::<RegistryCallLabels, Counter>::default();
        registry.register(
            "registry_calls",
            "Service registry calls by call (register, heartbeat, deregister, watch) and result (ok, or the gRPC code)",
            registry_calls.clone(),
        );
        let registry_updates = Counter::default();
        registry.register(
            "registry_updates_sent",
            "Service registry updates sent to subscribers (one per service changed)",
            registry_updates.clone(),
        );
        let registry_update_bytes = Counter::default();
        registry.register(
            "registry_update_bytes_sent",
            "Encoded bytes of the service registry updates sent to subscribers",
            registry_update_bytes.clone(),
        );
        let registry_subscribers = Gauge::default();
        registry.register(
            "registry_subscribers",
            "Service registry subscribers connected to this replica",
            registry_subscribers.clone(),
        );
        let registry_instances = Gauge::default();
        registry.register(
            "registry_instances",
            "Instances in the service registry, as this replica's index holds them",
            registry_instances.clone(),
        );
        Self {
            registry,
            http_requests,
            http_duration,
            revision,
            commits,
            rejected,
            nodes,
            updates_sent,
            acks,
            nacks,
            barriers,
            barrier_duration,
            leader,
            term,
            elections,
            step_downs,
            fenced_writes,
            refused,
            audit_failures,
            registry_calls,
            registry_updates,
            registry_update_bytes,
            registry_subscribers,
            registry_instances,
        }
    }

    /// The text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
