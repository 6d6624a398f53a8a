//! Active health checks: a task per (endpoint, check) that GETs the check's
//! path and moves the endpoint in and out of rotation by the thresholds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use atoll_model::HealthCheck;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::upstream::Upstream;

/// The running checks, by (address, path, interval).
#[derive(Debug, Default)]
pub(crate) struct HealthChecks {
    running: Mutex<HashMap<(String, String, Duration), JoinHandle<()>>>,
}

impl HealthChecks {
    /// Starts the checks in `wanted` that are not running and stops those
    /// no longer wanted.
    pub(crate) fn reconcile(&self, wanted: Vec<(Arc<Upstream>, HealthCheck)>) {
        let mut running = self.running.lock();
        let mut keep = HashMap::new();
        for (upstream, check) in wanted {
            let key = (
                upstream.address.clone(),
                check.path.clone(),
                check.interval.0,
            );
            if keep.contains_key(&key) {
                continue;
            }
            let task = match running.remove(&key) {
                Some(task) => task,
                None => tokio::spawn(run(upstream, check)),
            };
            keep.insert(key, task);
        }
        for (_, task) in running.drain() {
            task.abort();
        }
        *running = keep;
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for (_, task) in self.running.lock().drain() {
            task.abort();
        }
    }
}

async fn run(upstream: Arc<Upstream>, check: HealthCheck) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(check.timeout.0));
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let uri = format!("http://{}{}", upstream.address, check.path);
    let mut passes = 0u32;
    let mut failures = 0u32;
    let mut tick = tokio::time::interval(check.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let request = match http::Request::get(&uri)
            .header(http::header::USER_AGENT, "atoll-health-check")
            .body(Empty::new())
        {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(%uri, %error, "cannot build a health check request");
                return;
            }
        };
        let ok = match tokio::time::timeout(check.timeout.0, client.request(request)).await {
            Ok(Ok(response)) => {
                let status = response.status();
                // Read the body so the connection can be reused.
                let _ = tokio::time::timeout(check.timeout.0, response.into_body().collect()).await;
                status.is_success()
            }
            _ => false,
        };
        if ok {
            passes += 1;
            failures = 0;
            if !upstream.healthy() && passes >= check.healthy_threshold {
                tracing::info!(upstream = %upstream.address, path = %check.path, "health check passes: back in rotation");
                upstream.set_healthy(true);
            }
        } else {
            failures += 1;
            passes = 0;
            if upstream.healthy() && failures >= check.unhealthy_threshold {
                tracing::warn!(upstream = %upstream.address, path = %check.path, failures, "health check fails: out of rotation");
                upstream.set_healthy(false);
            }
        }
    }
}
