//! The sidecar's Prometheus metrics (`/metrics` on its admin address).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A call through one side of the sidecar.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CallLabels {
    /// `outbound` (the app calls a service) or `inbound` (a caller calls
    /// the app).
    pub(crate) direction: &'static str,
    /// The service called.
    pub(crate) service: String,
    /// The cell it was sent to (outbound) or this cell (inbound); empty
    /// when refused before a cell was chosen.
    pub(crate) cell: String,
    /// The HTTP status class (`2xx`...) or the refusal code.
    pub(crate) result: String,
}

/// A call refused by the sidecar itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub(crate) direction: &'static str,
    pub(crate) service: String,
    /// `notOwner`, `shardFenced`, `staleEpoch`, `noLease`, `noEndpoint`...
    pub(crate) reason: String,
}

/// Every metric of one sidecar.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) calls: Family<CallLabels, Counter>,
    pub(crate) refused: Family<RefusalLabels, Counter>,
    pub(crate) seconds: Family<DirectionLabels, Histogram>,
    pub(crate) endpoints: Gauge,
    pub(crate) permits: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub(crate) direction: &'static str,
}

impl Metrics {
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            calls: Family::default(),
            refused: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5,
                ])
            }),
            endpoints: Gauge::default(),
            permits: Gauge::default(),
        };
        let sub = registry.sub_registry_with_prefix("atoll_sidecar");
        sub.register(
            "calls",
            "Calls through the sidecar, by direction, service, cell and result",
            metrics.calls.clone(),
        );
        sub.register(
            "refused",
            "Calls the sidecar refused itself: the provider re-check (not owner, fenced, stale epoch, no lease) inbound, routing outbound",
            metrics.refused.clone(),
        );
        sub.register(
            "call_seconds",
            "Time from a call's head to its response head, by direction",
            metrics.seconds.clone(),
        );
        sub.register(
            "endpoints",
            "Instances the sidecar knows, over the services it calls",
            metrics.endpoints.clone(),
        );
        sub.register(
            "write_permits",
            "Inbound writes in flight under a write permit",
            metrics.permits.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// Counts one HTTP call of `direction` that took since `started`: its
    /// status class, or `refused <status>` when the sidecar answered it.
    pub(crate) fn http_call(
        &self,
        direction: &'static str,
        service: String,
        cell: String,
        started: std::time::Instant,
        response: &http::Response<crate::http::Body>,
    ) {
        self.seconds
            .get_or_create(&DirectionLabels { direction })
            .observe(started.elapsed().as_secs_f64());
        let status = response.status().as_u16();
        let result = if response.headers().contains_key(crate::http::REFUSED_BY) {
            format!("refused {status}")
        } else {
            class(status)
        };
        self.calls
            .get_or_create(&CallLabels {
                direction,
                service,
                cell,
                result,
            })
            .inc();
    }

    /// Counts a call the sidecar refused itself.
    pub(crate) fn refusal(&self, direction: &'static str, service: &str, reason: &str) {
        self.refused
            .get_or_create(&RefusalLabels {
                direction,
                service: service.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// `2xx`, `4xx`... for a status.
pub(crate) fn class(status: u16) -> String {
    format!("{}xx", status / 100)
}
