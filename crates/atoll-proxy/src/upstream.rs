//! Upstream endpoints' runtime state: in-flight requests, active health,
//! passive outlier ejection. Keyed by address and kept across table swaps,
//! so a new config version does not forget that an endpoint is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use atoll_model::OutlierDetection;
use http::uri::Authority;
use parking_lot::Mutex;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Nanoseconds since the first call, from a monotonic clock.
pub(crate) fn now_nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// One upstream address.
#[derive(Debug)]
pub struct Upstream {
    /// `host:port`.
    pub address: String,
    pub(crate) authority: Authority,
    in_flight: AtomicU32,
    /// Set by active health checks (healthy until a check says otherwise).
    checked_healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// 0 when not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// The socket address when `address` is an IP literal (no lookup needed).
    socket: Option<SocketAddr>,
    /// Idle HTTP/1.1 connections of the fast path, most recently used last.
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

/// The most idle connections kept per upstream.
const MAX_IDLE: usize = 1024;

impl Upstream {
    /// The state of a new upstream at `address` (`host:port`), for a data
    /// path of its own (the sidecar) that keeps upstreams by address.
    pub fn shared(address: &str) -> Result<Arc<Self>, String> {
        Self::new(address).map(Arc::new)
    }

    fn new(address: &str) -> Result<Self, String> {
        let authority: Authority = address
            .parse()
            .map_err(|_| format!("`{address}` is not a host:port address"))?;
        Ok(Self {
            address: address.to_owned(),
            authority,
            in_flight: AtomicU32::new(0),
            checked_healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            socket: address.parse().ok(),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Whether it may take requests: healthy by its checks and not ejected.
    pub fn available(&self) -> bool {
        if !self.checked_healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || now_nanos() >= until
    }

    /// Whether passive detection has it ejected now.
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_nanos() < until
    }

    /// Whether its active checks pass.
    pub fn healthy(&self) -> bool {
        self.checked_healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.checked_healthy.store(healthy, Ordering::Relaxed);
    }

    /// Requests in flight.
    pub fn load(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// An idle connection used less than `max_idle` before `now`, if any.
    pub(crate) fn checkout(
        &self,
        max_idle: std::time::Duration,
        now: Instant,
    ) -> Option<TcpStream> {
        let mut idle = self.idle.lock();
        while let Some((stream, since)) = idle.pop() {
            // Skip connections idle too long, or that the upstream closed or
            // wrote to while pooled (free when nothing happened: the
            // readiness check fails without a syscall).
            if now.saturating_duration_since(since) < max_idle && crate::fast::quiet(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps a connection for the next request; `now` is about now (the
    /// caller's clock reading, to save one).
    pub(crate) fn checkin(&self, stream: TcpStream, now: Instant) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push((stream, now));
        }
    }

    /// A new connection, within `timeout`.
    pub(crate) async fn connect(&self, timeout: std::time::Duration) -> std::io::Result<TcpStream> {
        let connect = async {
            let stream = match self.socket {
                Some(socket) => TcpStream::connect(socket).await?,
                None => TcpStream::connect(self.address.as_str()).await?,
            };
            stream.set_nodelay(true)?;
            Ok(stream)
        };
        tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })
    }

    /// Counts a request in flight while the returned guard lives.
    pub(crate) fn start_borrowed(&self) -> InFlightRef<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightRef(self)
    }

    /// Counts a request in flight while the returned guard lives.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records the outcome of a request for outlier detection. Returns true
    /// when this failure ejected the endpoint. `may_eject` says whether the
    /// endpoint's group can lose one more member.
    pub fn record(
        &self,
        success: bool,
        policy: &OutlierDetection,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        if success {
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            if self.ejected_until.load(Ordering::Relaxed) != 0 && !self.ejected() {
                // Back in rotation and succeeding: forget the ejection streak.
                self.ejected_until.store(0, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
            }
            return false;
        }
        if policy.consecutive_errors == 0 {
            return false;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < policy.consecutive_errors || self.ejected() || !may_eject() {
            return false;
        }
        let streak = self.ejections.fetch_add(1, Ordering::Relaxed).min(6);
        let duration = policy.ejection_time.0.saturating_mul(1 << streak);
        let until =
            now_nanos().saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(upstream = %self.address, failures, ejected_for = ?duration, "ejected after consecutive failures");
        true
    }
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Upstream>);

/// Like [`InFlight`], borrowing the upstream.
#[derive(Debug)]
pub(crate) struct InFlightRef<'a>(&'a Upstream);

impl Drop for InFlightRef<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every upstream ever seen, by address. Only touched when a table is
/// installed, never on the request path.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
}

impl Registry {
    /// The upstream for each address, reusing known ones; forgets addresses
    /// no longer used.
    pub(crate) fn resolve(&self, addresses: &[&str]) -> Result<Vec<Arc<Upstream>>, String> {
        let mut upstreams = self.upstreams.lock();
        let mut resolved = Vec::with_capacity(addresses.len());
        for address in addresses {
            let upstream = match upstreams.get(*address) {
                Some(known) => known.clone(),
                None => {
                    let new = Arc::new(Upstream::new(address)?);
                    upstreams.insert((*address).to_owned(), new.clone());
                    new
                }
            };
            resolved.push(upstream);
        }
        upstreams.retain(|address, _| addresses.contains(&address.as_str()));
        Ok(resolved)
    }
}

/// How long to wait between ejection checks in tests.
#[cfg(test)]
pub(crate) const TICK: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_model::DurationValue;

    fn policy(errors: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_errors: errors,
            ejection_time: DurationValue(Duration::from_millis(30)),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_time_brings_back() {
        let upstream = Upstream::new("127.0.0.1:1").expect("address");
        for _ in 0..2 {
            assert!(!upstream.record(false, &policy(3), || true));
        }
        assert!(upstream.available());
        assert!(upstream.record(false, &policy(3), || true));
        assert!(!upstream.available() && upstream.ejected());
        std::thread::sleep(Duration::from_millis(35) + TICK);
        assert!(upstream.available(), "the ejection expires");
        upstream.record(true, &policy(3), || true);
        assert_eq!(
            upstream.ejections.load(Ordering::Relaxed),
            0,
            "success resets the streak"
        );
    }

    #[test]
    fn successes_reset_the_count_and_the_group_cap_holds() {
        let upstream = Upstream::new("127.0.0.1:1").expect("address");
        upstream.record(false, &policy(2), || true);
        upstream.record(true, &policy(2), || true);
        assert!(
            !upstream.record(false, &policy(2), || true),
            "the count restarted"
        );
        assert!(
            !upstream.record(false, &policy(2), || false),
            "the group cannot lose another"
        );
        assert!(upstream.available());
        assert!(
            !upstream.record(false, &policy(0), || true),
            "0 turns ejection off"
        );
    }

    #[test]
    fn the_registry_keeps_state_across_tables() {
        let registry = Registry::default();
        let first = registry
            .resolve(&["127.0.0.1:1", "127.0.0.1:2"])
            .expect("valid");
        first[0].set_healthy(false);
        let second = registry.resolve(&["127.0.0.1:1"]).expect("valid");
        assert!(!second[0].healthy(), "state survives a new table");
        assert!(Arc::ptr_eq(&first[0], &second[0]));
        assert!(registry.resolve(&["not an address"]).is_err());
    }
}
