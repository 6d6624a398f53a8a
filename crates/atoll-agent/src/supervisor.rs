//! One task per instance: start it through the runtime, check its health,
//! restart it with backoff when it exits, stop it when asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_model::HealthCheck;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::runtime::{Instance, InstanceSpec, Runtime};

/// First restart delay; doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An instance that ran this long resets the backoff.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Probe period until an instance is first ready.
const STARTUP_PROBE: Duration = Duration::from_millis(200);

/// What the agent knows about an instance, as `/instances` shows it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceState {
    /// Instance name.
    pub name: String,
    /// Its App.
    pub app: String,
    /// Its cell.
    pub cell: String,
    /// `host:port` of its first port.
    pub address: String,
    /// Whether a process runs now.
    pub running: bool,
    /// Whether it passes its health check.
    pub ready: bool,
    /// Where it runs (`pid 1234`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Times it was restarted after exiting or failing to start.
    pub restarts: u32,
    /// How it last ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Its log file.
    pub log: String,
}

/// Shared by every supervisor of an agent: their states and a bell that
/// rings on any change.
#[derive(Debug, Default)]
pub(crate) struct Board {
    pub(crate) states: Mutex<std::collections::BTreeMap<String, InstanceState>>,
    pub(crate) changed: Notify,
}

impl Board {
    pub(crate) fn update(&self, name: &str, change: impl FnOnce(&mut InstanceState)) {
        let mut states = self.states.lock();
        if let Some(state) = states.get_mut(name) {
            let before = (state.running, state.ready, state.restarts);
            change(state);
            if before != (state.running, state.ready, state.restarts) {
                self.changed.notify_one();
            }
        }
    }
}

/// How readiness is probed.
#[derive(Clone, Debug)]
struct Probe {
    http: Option<(reqwest::Client, String)>,
    address: String,
    interval: Duration,
    timeout: Duration,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
}

impl Probe {
    fn new(spec: &InstanceSpec, check: Option<&HealthCheck>) -> Probe {
        let address = spec.address();
        match check {
            Some(check) => Probe {
                http: reqwest::Client::builder()
                    .timeout(check.timeout.0)
                    .build()
                    .ok()
                    .map(|client| (client, format!("http://{address}{}", check.path))),
                address,
                interval: check.interval.0,
                timeout: check.timeout.0,
                unhealthy_threshold: check.unhealthy_threshold.max(1),
                healthy_threshold: check.healthy_threshold.max(1),
            },
            None => Probe {
                http: None,
                address,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                unhealthy_threshold: 2,
                healthy_threshold: 1,
            },
        }
    }

    /// One probe: an HTTP 2xx, or without a health check a TCP connect.
    async fn check(&self) -> bool {
        match &self.http {
            Some((client, url)) => client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            None => {
                tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(&self.address))
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
        }
    }
}

/// Supervises one instance until `stop` turns true, then stops it within
/// `grace`.
pub(crate) async fn supervise<R: Runtime>(
    runtime: Arc<R>,
    spec: InstanceSpec,
    check: Option<HealthCheck>,
    board: Arc<Board>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let probe = Probe::new(&spec, check.as_ref());
    let mut backoff = MIN_BACKOFF;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let ending = match runtime.start(&spec).await {
            Err(error) => {
                tracing::error!(instance = %spec.name, runtime = runtime.name(), "cannot start: {error}");
                error
            }
            Ok(mut instance) => {
                tracing::info!(instance = %spec.name, address = %spec.address(), process = %instance.describe(), "instance started");
                board.update(&spec.name, |s| {
                    s.running = true;
                    s.process = Some(instance.describe());
                });
                let (mut ready, mut ever_ready) = (false, false);
                let (mut passes, mut failures) = (0u32, 0u32);
                let mut next_probe = tokio::time::Instant::now() + STARTUP_PROBE;
                let ending = loop {
                    tokio::select! {
                        how = instance.exited() => break how,
                        () = stopped(&mut stop) => {
                            board.update(&spec.name, |s| s.ready = false);
                            instance.stop(grace).await;
                            tracing::info!(instance = %spec.name, "instance stopped");
                            board.update(&spec.name, |s| {
                                s.running = false;
                                s.process = None;
                            });
                            return;
                        }
                        () = tokio::time::sleep_until(next_probe) => {
                            let healthy = probe.check().await;
                            if healthy {
                                passes += 1;
                                failures = 0;
                            } else {
                                failures += 1;
                                passes = 0;
                            }
                            let was = ready;
                            // The first readiness of a process takes one
                            // pass, so a fresh instance takes traffic at
                            // once; afterwards the thresholds apply.
                            if !ready && healthy && (!ever_ready || passes >= probe.healthy_threshold) {
                                ready = true;
                                ever_ready = true;
                            } else if ready && failures >= probe.unhealthy_threshold {
                                ready = false;
                            }
                            if ready != was {
                                tracing::info!(instance = %spec.name, ready, "instance {}", if ready { "is ready" } else { "failed its health checks" });
                                board.update(&spec.name, |s| s.ready = ready);
                            }
                            let period = if ever_ready { probe.interval } else { STARTUP_PROBE };
                            next_probe = tokio::time::Instant::now() + period;
                        }
                    }
                };
                tracing::warn!(instance = %spec.name, "instance {ending}");
                ending
            }
        };
        if started.elapsed() >= STABLE_AFTER {
            backoff = MIN_BACKOFF;
        }
        board.update(&spec.name, |s| {
            s.running = false;
            s.ready = false;
            s.process = None;
            s.restarts += 1;
            s.last_exit = Some(ending.clone());
        });
        tracing::info!(instance = %spec.name, "restarting in {backoff:?}");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Completes when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
