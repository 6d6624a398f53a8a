//! The data path's Prometheus metrics. Handles for every (route, cell) pair
//! are created when a table is installed, so a request only touches atomics:
//! no label formatting, no lock, no allocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Upper bounds of the latency buckets, in seconds.
const BOUNDS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A latency histogram of atomics (prometheus-client's takes a mutex per
/// observation).
#[derive(Debug, Default, Clone)]
pub(crate) struct Latency(Arc<LatencyInner>);

#[derive(Debug, Default)]
struct LatencyInner {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    /// Sum in nanoseconds.
    sum: AtomicU64,
}

impl Latency {
    pub(crate) fn observe(&self, seconds: f64) {
        let index = BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BOUNDS.len());
        self.0.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.0
            .sum
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); BOUNDS.len() + 1];
        let mut count = 0;
        for (i, bucket) in buckets.iter_mut().enumerate() {
            let n = self.0.buckets[i].load(Ordering::Relaxed);
            count += n;
            *bucket = (BOUNDS.get(i).copied().unwrap_or(f64::INFINITY), n);
        }
        let sum = self.0.sum.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) route: String,
    pub(crate) service: String,
    pub(crate) cell: String,
    pub(crate) code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PathLabels {
    pub(crate) route: String,
    pub(crate) service: String,
    pub(crate) cell: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CellLabels {
    pub(crate) cell: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceLabels {
    pub(crate) service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) reason: String,
}

/// Status classes counted per (route, cell).
pub(crate) const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The metrics of one (route, cell) pair.
#[derive(Debug, Clone)]
pub(crate) struct PathMetrics {
    pub(crate) responses: [Counter; 5],
    pub(crate) latency: Latency,
}

impl PathMetrics {
    pub(crate) fn observe(&self, status: u16, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].inc();
        self.latency.observe(seconds);
    }
}

/// Every metric of a proxy.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    responses: Family<RequestLabels, Counter>,
    latency: Family<PathLabels, Latency>,
    pub(crate) refused: Family<ReasonLabels, Counter>,
    misroutes: Family<CellLabels, Counter>,
    fenced_writes: Family<ServiceLabels, Counter>,
    pub(crate) mirror: Family<ReasonLabels, Counter>,
    pub(crate) upstream_errors: Family<ReasonLabels, Counter>,
    pub(crate) client_errors: Family<ReasonLabels, Counter>,
    pub(crate) retries: Counter,
    pub(crate) ejections: Counter,
    pub(crate) access_log_dropped: Counter,
    pub(crate) table_version: Gauge,
    pub(crate) installs: Family<ReasonLabels, Counter>,
    pub(crate) connections: Gauge,
    pub(crate) peer_refused: Counter,
}

impl ProxyMetrics {
    /// Registers every metric under `prefix` (e.g. `atoll_gateway`).
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let responses = Family::<RequestLabels, Counter>::default();
        registry.register(
            "responses",
            "Responses by route, service, cell and status class",
            responses.clone(),
        );
        let latency = Family::<PathLabels, Latency>::default();
        registry.register(
            "request_duration_seconds",
            "Time to response headers by route, service and cell",
            latency.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests answered by the proxy itself, by reason (noRoute, missingKey, invalidKey, shardFenced, noEndpoint, noGzone, misrouteLoop, badRequest, badPath, headersTooLarge)",
            refused.clone(),
        );
        let misroutes = Family::<CellLabels, Counter>::default();
        registry.register(
            "misroutes",
            "Requests for a cell of another zone, forwarded, by cell",
            misroutes.clone(),
        );
        let fenced_writes = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "fenced_writes",
            "Writes refused because their shard is fenced, by service",
            fenced_writes.clone(),
        );
        let mirror = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mirror",
            "Mirrored copies by outcome (sent, dropped, failed, bodyTooLarge)",
            mirror.clone(),
        );
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream tries by reason (connect, timeout, reset, status)",
            upstream_errors.clone(),
        );
        let client_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "client_errors",
            "Requests abandoned for the client's fault, not counted against any upstream, by reason (malformedBody, bodyTimeout, gone)",
            client_errors.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Requests retried on another endpoint",
            retries.clone(),
        );
        let ejections = Counter::default();
        registry.register(
            "ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let table_version = Gauge::default();
        registry.register(
            "config_version",
            "The configuration version being served",
            table_version.clone(),
        );
        let installs = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "config_installs",
            "Configuration versions by result (installed, refused)",
            installs.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "downstream_connections",
            "Open client connections",
            connections.clone(),
        );
        let peer_refused = Counter::default();
        registry.register(
            "peer_connections_refused",
            "Connections to the peer listener refused: no certificate of the CA, or not a gateway of this workspace",
            peer_refused.clone(),
        );
        Self {
            registry,
            responses,
            latency,
            refused,
            misroutes,
            fenced_writes,
            mirror,
            upstream_errors,
            client_errors,
            retries,
            ejections,
            access_log_dropped,
            table_version,
            installs,
            connections,
            peer_refused,
        }
    }

    /// Counts a configuration version installed or refused.
    pub fn record_install(&self, installed: bool) {
        Self::reason(
            &self.installs,
            if installed { "installed" } else { "refused" },
        )
        .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    pub(crate) fn path(&self, route: &str, service: &str, cell: &str) -> PathMetrics {
        let responses = CLASSES.map(|code| {
            self.responses
                .get_or_create(&RequestLabels {
                    route: route.to_owned(),
                    service: service.to_owned(),
                    cell: cell.to_owned(),
                    code: code.to_owned(),
                })
                .clone()
        });
        let latency = self
            .latency
            .get_or_create(&PathLabels {
                route: route.to_owned(),
                service: service.to_owned(),
                cell: cell.to_owned(),
            })
            .clone();
        PathMetrics { responses, latency }
    }

    pub(crate) fn misroute(&self, cell: &str) -> Counter {
        self.misroutes
            .get_or_create(&CellLabels {
                cell: cell.to_owned(),
            })
            .clone()
    }

    pub(crate) fn fenced(&self, service: &str) -> Counter {
        self.fenced_writes
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .clone()
    }

    pub(crate) fn reason(family: &Family<ReasonLabels, Counter>, reason: &str) -> Counter {
        family
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .clone()
    }
}

/// Handles for one table: per (route, cell), per cell, per service.
#[derive(Debug)]
pub(crate) struct TableMetrics {
    cells: usize,
    paths: Vec<PathMetrics>,
    pub(crate) misroutes: Vec<Counter>,
    pub(crate) fenced: Vec<Counter>,
    pub(crate) refused: [Counter; REFUSALS.len()],
    pub(crate) mirror_sent: Counter,
    pub(crate) mirror_dropped: Counter,
    pub(crate) mirror_failed: Counter,
    pub(crate) upstream_connect: Counter,
    pub(crate) upstream_timeout: Counter,
    pub(crate) upstream_reset: Counter,
    pub(crate) upstream_status: Counter,
    pub(crate) client_malformed: Counter,
    pub(crate) client_timeout: Counter,
    pub(crate) client_gone: Counter,
}

/// Refusal codes in the order of `TableMetrics::refused` (an unknown code
/// counts as `badRequest`).
pub(crate) const REFUSALS: [&str; 10] = [
    "noRoute",
    "missingKey",
    "invalidKey",
    "shardFenced",
    "noEndpoint",
    "noGzone",
    "misrouteLoop",
    "badRequest",
    "badPath",
    "headersTooLarge",
];

impl TableMetrics {
    /// Counts a request abandoned for the client's fault by its status
    /// (400 malformed, 408 too slow, none: gone).
    pub(crate) fn client_error(&self, status: Option<u16>) {
        let counter = match status {
            Some(408) => &self.client_timeout,
            Some(_) => &self.client_malformed,
            None => &self.client_gone,
        };
        counter.inc();
    }
}

impl TableMetrics {
    pub(crate) fn new(metrics: &ProxyMetrics, table: &atoll_routing::RoutingTable) -> Self {
        let mut paths = Vec::with_capacity(table.routes.len() * table.cells.len());
        for route in &table.routes {
            let service = &table.services[route.service as usize].name;
            for cell in &table.cells {
                paths.push(metrics.path(&route.name, service, &cell.name));
            }
        }
        Self {
            cells: table.cells.len(),
            paths,
            misroutes: table
                .cells
                .iter()
                .map(|c| metrics.misroute(&c.name))
                .collect(),
            fenced: table
                .services
                .iter()
                .map(|s| metrics.fenced(&s.name))
                .collect(),
            refused: REFUSALS.map(|r| ProxyMetrics::reason(&metrics.refused, r)),
            mirror_sent: ProxyMetrics::reason(&metrics.mirror, "sent"),
            mirror_dropped: ProxyMetrics::reason(&metrics.mirror, "dropped"),
            mirror_failed: ProxyMetrics::reason(&metrics.mirror, "failed"),
            upstream_connect: ProxyMetrics::reason(&metrics.upstream_errors, "connect"),
            upstream_timeout: ProxyMetrics::reason(&metrics.upstream_errors, "timeout"),
            upstream_reset: ProxyMetrics::reason(&metrics.upstream_errors, "reset"),
            upstream_status: ProxyMetrics::reason(&metrics.upstream_errors, "status"),
            client_malformed: ProxyMetrics::reason(&metrics.client_errors, "malformedBody"),
            client_timeout: ProxyMetrics::reason(&metrics.client_errors, "bodyTimeout"),
            client_gone: ProxyMetrics::reason(&metrics.client_errors, "gone"),
        }
    }

    pub(crate) fn path(&self, route: u32, cell: u16) -> &PathMetrics {
        &self.paths[route as usize * self.cells + usize::from(cell)]
    }

    pub(crate) fn refused(&self, code: &str) -> &Counter {
        let index = REFUSALS.iter().position(|r| *r == code).unwrap_or(7);
        &self.refused[index]
    }
}
