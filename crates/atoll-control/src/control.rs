//! One replica's control plane: what every replica serves (the writer, the
//! config cache, the node registry) and what only the leader runs, started
//! and stopped with each term ([`TermServices`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use atoll_store::{Coordination, Store, Write};
use tokio::sync::watch;

use crate::leadership::{Leadership, Role, Term};
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::nodes::{NodeRegistry, REPLICAS, replica_key};
use crate::state::ConfigCache;
use crate::switchover::Switchovers;
use crate::writer::{ControlError, Writer};

/// Where the longest lease duration any leader granted with is kept: a new
/// leader waits out the longest, not only its own.
const LEASE_DURATION_KEY: &str = "config/lease-duration-ms";

/// How often a replica reports itself.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The control plane of one replica.
pub(crate) struct Control {
    pub(crate) writer: Arc<Writer>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) coordination: Arc<dyn Coordination>,
    pub(crate) cache: ConfigCache,
    pub(crate) nodes: Arc<NodeRegistry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) leadership: Arc<Leadership>,
    pub(crate) started: Instant,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// How long a disconnected node is remembered (and waited for).
    pub(crate) node_expiry: Duration,
    /// How long an ownership lease lasts (zero: leases are off).
    pub(crate) lease_duration: Duration,
    /// What the current term runs, while this replica leads.
    term: ArcSwapOption<TermServices>,
    /// For passing writes on to the leader.
    pub(crate) http: atoll_transport::HttpClient,
    /// Who may do what on the REST API.
    pub(crate) access: crate::access::AccessOptions,
    /// The audit chain's head as this replica last saw it.
    pub(crate) audit_head: crate::audit::ChainHead,
    /// How node certificates are issued, if they are.
    pub(crate) issuer: Option<crate::join::IssuerOptions>,
    /// The service registry as this replica follows it.
    pub(crate) registry: atoll_registry::Hub,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("store", &self.store.backend())
            .field("leadership", &self.leadership)
            .finish_non_exhaustive()
    }
}

/// What the leader runs during one term: the ownership leases it grants
/// and the switchovers it drives (and the emergency plan).
pub(crate) struct TermServices {
    pub(crate) term: Term,
    pub(crate) leases: Arc<Leases>,
    pub(crate) switchovers: Arc<Switchovers>,
    stop: watch::Sender<bool>,
}

impl Control {
    #[expect(clippy::too_many_arguments, reason = "built once, at start")]
    pub(crate) fn new(
        writer: Arc<Writer>,
        coordination: Arc<dyn Coordination>,
        nodes: Arc<NodeRegistry>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        node_expiry: Duration,
        lease_duration: Duration,
        leadership: Arc<Leadership>,
        transport: &atoll_transport::Transport,
        access: crate::access::AccessOptions,
        issuer: Option<crate::join::IssuerOptions>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: writer.store.clone(),
            cache: writer.cache.clone(),
            writer,
            coordination,
            nodes,
            metrics,
            leadership,
            started: Instant::now(),
            shutdown,
            node_expiry,
            lease_duration,
            term: ArcSwapOption::empty(),
            http: transport.http(Duration::from_secs(2)),
            access,
            audit_head: crate::audit::ChainHead::default(),
            issuer,
            registry: atoll_registry::Hub::new(),
        })
    }

    /// The current term's services, while this replica leads and acts.
    pub(crate) fn leading(&self) -> Result<Arc<TermServices>, ControlError> {
        self.leadership.fence()?;
        self.term.load_full().ok_or_else(|| {
            ControlError::NotLeader(
                "this replica was just elected and is starting to lead; retry shortly".into(),
            )
        })
    }

    /// Starts and stops the term services as leadership comes and goes.
    pub(crate) async fn follow_leadership(self: Arc<Self>) {
        let mut roles = self.leadership.subscribe();
        let mut shutdown = self.shutdown.clone();
        loop {
            let role = roles.borrow_and_update().clone();
            match role {
                Role::Leader(term) => {
                    let current = self.term.load_full();
                    if current.as_ref().is_none_or(|t| t.term != term) {
                        self.end_term();
                        match self.start_term(term.clone()).await {
                            Ok(services) => {
                                self.term.store(Some(services));
                                tracing::info!(
                                    term = term.fence.term,
                                    "leading: switchovers and leases run here"
                                );
                            }
                            Err(error) => {
                                tracing::error!(%error, "cannot start the term's services; stepping down");
                                self.leadership.step_down_now(&term.fence);
                            }
                        }
                    }
                }
                Role::Follower => self.end_term(),
            }
            tokio::select! {
                changed = roles.changed() => if changed.is_err() { break },
                _ = shutdown.changed() => break,
            }
        }
        self.end_term();
    }

    fn end_term(&self) {
        if let Some(services) = self.term.swap(None) {
            let _ = services.stop.send(true);
            tracing::info!(
                term = services.term.fence.term,
                "term over: switchovers and leases stop here"
            );
        }
    }

    async fn start_term(&self, term: Term) -> Result<Arc<TermServices>, ControlError> {
        // The longest lease any leader granted with: waited out too.
        let stored = self
            .coordination
            .get_key(LEASE_DURATION_KEY)
            .await?
            .and_then(|e| String::from_utf8(e.value).ok())
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::ZERO);
        if self.lease_duration > stored {
            let millis = self.lease_duration.as_millis().to_string();
            self.coordination
                .put_key(
                    Write::put(LEASE_DURATION_KEY, millis.into_bytes()),
                    Some(&term.fence),
                )
                .await
                .map_err(|e| self.leadership.check(&term.fence, e))?;
        }
        let leases = Arc::new(Leases::for_term(
            self.lease_duration,
            stored.max(self.lease_duration),
            term.since,
        ));
        let (stop, stopped) = watch::channel(false);
        let switchovers = Switchovers::new(
            self.writer.clone(),
            self.nodes.clone(),
            leases.clone(),
            stopped,
            self.node_expiry,
        );
        switchovers.resume().await?;
        switchovers.watch_cells();
        Ok(Arc::new(TermServices {
            term,
            leases,
            switchovers,
            stop,
        }))
    }
}

impl Control {
    /// Reports this replica under `replicas/` every second, under a lease
    /// that ends soon after the replica does.
    pub(crate) async fn announce(self: Arc<Self>) {
        let key = format!("{REPLICAS}{}", replica_key(self.leadership.advertise()));
        let started = crate::nodes::rfc3339(time::OffsetDateTime::now_utc());
        let mut lease: Option<i64> = None;
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            let id = match lease {
                Some(id) => match self.coordination.keep_alive(id).await {
                    Ok(_) => id,
                    Err(_) => {
                        lease = None;
                        continue;
                    }
                },
                None => match self.coordination.grant(REPORT_EVERY * 4).await {
                    Ok(id) => {
                        lease = Some(id);
                        id
                    }
                    Err(_) => continue,
                },
            };
            let info = atoll_api::rest::ReplicaInfo {
                url: self.leadership.advertise().to_owned(),
                role: if self.leadership.acting() {
                    "leader"
                } else {
                    "follower"
                }
                .into(),
                revision: self.cache.current().revision,
                lag: 0,
                connected_nodes: self.nodes.connected_count(),
                started: started.clone(),
                reported: crate::nodes::rfc3339(time::OffsetDateTime::now_utc()),
            };
            let value = serde_json::to_vec(&info).unwrap_or_default();
            if let Err(error) = self
                .coordination
                .put_key(Write::put(key.clone(), value).with_lease(id), None)
                .await
            {
                tracing::debug!(%error, "cannot report this replica");
                lease = None;
            }
        }
        if let Some(id) = lease {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.coordination.revoke(id)).await;
        }
    }

    /// The replicas alive and who leads.
    pub(crate) async fn replicas(&self) -> Result<atoll_api::rest::LeaderResponse, ControlError> {
        let listing = self.coordination.list_keys(REPLICAS).await?;
        let mut replicas: Vec<atoll_api::rest::ReplicaInfo> = listing
            .entries
            .iter()
            .filter_map(|e| serde_json::from_slice(&e.value).ok())
            .collect();
        let newest = replicas.iter().map(|r| r.revision).max().unwrap_or(0);
        for replica in &mut replicas {
            replica.lag = newest.saturating_sub(replica.revision);
        }
        // Read from the store, not the view: a replica just thawed would
        // otherwise say it leads in the term it slept through the end of.
        let view = self.leadership.current_leader().await;
        for replica in &mut replicas {
            // The election decides, not a report that may be a second old.
            replica.role = if view.url.as_deref() == Some(replica.url.as_str()) {
                "leader"
            } else {
                "follower"
            }
            .into();
        }
        Ok(atoll_api::rest::LeaderResponse {
            leader: view.url,
            term: view.term,
            served_by: self.leadership.advertise().to_owned(),
            replicas,
        })
    }
}
