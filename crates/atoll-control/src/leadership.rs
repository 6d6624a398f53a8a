//! Leader election among control-plane replicas (docs/design/replicated-control-plane.md).
//!
//! Every replica campaigns in one election of the coordination keyspace,
//! holding a lease of `ttl` that it keeps alive every `ttl / 3`. The leader's
//! fence (its key and term) goes with every write it makes; a write from a
//! deposed leader fails and the replica steps down at once.
//!
//! A leader *acts* only inside its acting window: `ttl - margin` after the
//! last keep-alive it sent that was answered, on its own monotonic clock. A
//! leader that cannot renew in time stops acting before its lease can run
//! out at the store, so it has stopped before anyone else can be elected,
//! whether it was cut off or frozen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_store::{Coordination, Fence, StoreError};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::writer::ControlError;

/// The election every replica campaigns in.
pub(crate) const ELECTION: &str = "election/control";

/// What this replica is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Campaigning (or waiting to reach the store).
    Follower,
    /// Leading, since `since`.
    Leader(Term),
}

/// A term this replica leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Term {
    pub(crate) fence: Fence,
    pub(crate) since: Instant,
}

/// Who leads, as any replica sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LeaderView {
    /// The leader's advertised URL.
    pub(crate) url: Option<String>,
    /// Its term.
    pub(crate) term: Option<i64>,
}

impl LeaderView {
    fn of(leader: Option<atoll_store::Leader>) -> Self {
        Self {
            url: leader
                .as_ref()
                .map(|l| String::from_utf8_lossy(&l.value).into_owned()),
            term: leader.map(|l| l.fence.term),
        }
    }
}

#[derive(Debug)]
struct Acting {
    fence: Fence,
    until: Instant,
}

/// The election, from one replica's side.
pub(crate) struct Leadership {
    coordination: Arc<dyn Coordination>,
    /// This replica's URL, what it campaigns with.
    advertise: String,
    ttl: Duration,
    role: watch::Sender<Role>,
    acting: Mutex<Option<Acting>>,
    view: watch::Sender<LeaderView>,
    /// Fires when a write found this replica deposed.
    deposed: tokio::sync::Notify,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("advertise", &self.advertise)
            .field("role", &*self.role.borrow())
            .finish_non_exhaustive()
    }
}

/// How much of the lease is kept back: the window closes this much before
/// the lease can end at the store (clock rate differences, a slow answer).
fn margin(ttl: Duration) -> Duration {
    (ttl / 6).max(Duration::from_millis(200))
}

impl Leadership {
    pub(crate) fn new(
        coordination: Arc<dyn Coordination>,
        advertise: String,
        ttl: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            coordination,
            advertise,
            ttl,
            role: watch::channel(Role::Follower).0,
            acting: Mutex::new(None),
            view: watch::channel(LeaderView::default()).0,
            deposed: tokio::sync::Notify::new(),
            metrics,
        })
    }

    /// How long a change waits for an election before it is refused:
    /// three TTLs (the old lease runs out within one, a new leader is
    /// elected and starts its term).
    pub(crate) fn election_wait(&self) -> Duration {
        (self.ttl * 3).max(Duration::from_secs(3))
    }

    /// This replica's advertised URL.
    pub(crate) fn advertise(&self) -> &str {
        &self.advertise
    }

    /// Role changes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Who leads, as last seen.
    pub(crate) fn view(&self) -> LeaderView {
        self.view.borrow().clone()
    }

    /// Who leads, read from the store now (and the view brought up to
    /// date): for passing a change on, the view may be a moment old (a
    /// replica just thawed has not seen the election it slept through).
    pub(crate) async fn current_leader(&self) -> LeaderView {
        self.read_leader().await.unwrap_or_else(|_| self.view())
    }

    /// Who leads, read from the store now, or why the store cannot say.
    pub(crate) async fn read_leader(&self) -> Result<LeaderView, StoreError> {
        let view = LeaderView::of(self.coordination.leader(ELECTION).await?);
        self.view.send_replace(view.clone());
        Ok(view)
    }

    /// The fence to write with, while this replica leads and its acting
    /// window is open.
    pub(crate) fn fence(&self) -> Result<Fence, ControlError> {
        let acting = self.acting.lock();
        match &*acting {
            Some(acting) if Instant::now() < acting.until => Ok(acting.fence.clone()),
            Some(_) => Err(ControlError::NotLeader(
                "this replica could not renew its leadership in time and has stopped acting; a leader is being elected".into(),
            )),
            None => Err(ControlError::NotLeader(match self.view().url {
                Some(url) => format!("this replica is not the leader; {url} is"),
                None => "no control-plane replica leads right now (an election is under way, or the store has no quorum); retry shortly".into(),
            })),
        }
    }

    /// Whether this replica leads and may act now.
    pub(crate) fn acting(&self) -> bool {
        self.fence().is_ok()
    }

    /// A write with `fence` was refused as fenced: step down now.
    pub(crate) fn fenced(&self, fence: &Fence) {
        self.metrics.fenced_writes.inc();
        self.step_down_now(fence);
    }

    /// Stops acting on `fence` at once (its term is over or unusable).
    pub(crate) fn step_down_now(&self, fence: &Fence) {
        let mut acting = self.acting.lock();
        if acting.as_ref().is_some_and(|a| a.fence == *fence) {
            *acting = None;
            drop(acting);
            tracing::warn!(
                term = fence.term,
                "a write was fenced: another replica leads; stepping down"
            );
            self.deposed.notify_one();
        }
    }

    /// Maps a store error of a write made with `fence`, stepping down when
    /// it was fenced.
    pub(crate) fn check(&self, fence: &Fence, error: StoreError) -> ControlError {
        if matches!(error, StoreError::Fenced { .. }) {
            self.fenced(fence);
        }
        error.into()
    }

    /// Campaigns, leads, steps down and campaigns again, until `stop`.
    pub(crate) async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let viewer = tokio::spawn(self.clone().follow_leader());
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                break;
            }
            let outcome = tokio::select! {
                outcome = self.clone().one_term() => outcome,
                _ = stop.changed() => break,
            };
            if let Err(error) = outcome {
                failures += 1;
                if failures <= 3 || failures.is_multiple_of(20) {
                    tracing::warn!(%error, failures, "election: cannot campaign; retrying");
                }
                let backoff = Duration::from_millis(200 * u64::from(failures.min(10)));
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
            } else {
                failures = 0;
            }
        }
        // Stopping: give the term up so that another replica leads at once.
        let held = self.acting.lock().take();
        if let Some(acting) = held {
            self.metrics.leader.set(0);
            self.metrics.term.set(0);
            self.role.send_replace(Role::Follower);
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.coordination.resign(&acting.fence),
            )
            .await;
        }
        viewer.abort();
    }

    /// One lease: campaign with it, lead while it lasts, then step down.
    async fn one_term(self: Arc<Self>) -> Result<(), StoreError> {
        let asked = Instant::now();
        let lease = self.coordination.grant(self.ttl).await?;
        // The lease counts from when etcd granted it, after we asked.
        let renewed = Arc::new(Mutex::new(asked));
        let mut keeper = {
            let this = self.clone();
            let renewed = renewed.clone();
            tokio::spawn(async move { this.keep_alive(lease, renewed).await })
        };
        let result = self.campaign_and_lead(lease, &renewed, &mut keeper).await;
        keeper.abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.coordination.revoke(lease)).await;
        result
    }

    async fn campaign_and_lead(
        &self,
        lease: i64,
        renewed: &Arc<Mutex<Instant>>,
        // Ends when the lease is gone; never polled again once it has.
        keeper: &mut tokio::task::JoinHandle<StoreError>,
    ) -> Result<(), StoreError> {
        let campaign =
            self.coordination
                .campaign(ELECTION, self.advertise.as_bytes().to_vec(), lease);
        let fence = tokio::select! {
            fence = campaign => fence?,
            _ = &mut *keeper => {
                return Err(StoreError::LeaseExpired(lease));
            }
        };
        let window = self.ttl.saturating_sub(margin(self.ttl));
        let until = *renewed.lock() + window;
        if Instant::now() >= until {
            // Elected, but too late to act on this lease: campaign anew.
            let _ = self.coordination.resign(&fence).await;
            return Ok(());
        }
        *self.acting.lock() = Some(Acting {
            fence: fence.clone(),
            until,
        });
        self.metrics.elections.inc();
        self.metrics.leader.set(1);
        self.metrics.term.set(fence.term);
        tracing::info!(term = fence.term, advertise = %self.advertise, "elected: this replica leads");
        self.role.send_replace(Role::Leader(Term {
            fence: fence.clone(),
            since: Instant::now(),
        }));
        // Lead while the window keeps being extended.
        let reason = loop {
            let until = {
                let mut acting = self.acting.lock();
                match acting.as_mut() {
                    None => break "a write was fenced",
                    Some(acting) => {
                        acting.until = acting.until.max(*renewed.lock() + window);
                        acting.until
                    }
                }
            };
            if Instant::now() >= until {
                break "the election lease could not be renewed in time";
            }
            let check = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            tokio::select! {
                () = tokio::time::sleep(check) => {}
                () = self.deposed.notified() => {}
                _ = &mut *keeper => {
                    break "the election lease ended";
                }
            }
        };
        *self.acting.lock() = None;
        self.metrics.step_downs.inc();
        self.metrics.leader.set(0);
        self.metrics.term.set(0);
        tracing::warn!(
            term = fence.term,
            reason,
            "stepping down: this replica no longer leads"
        );
        self.role.send_replace(Role::Follower);
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.coordination.resign(&fence)).await;
        Ok(())
    }

    /// Keeps `lease` alive every TTL/3, noting when each answered renewal
    /// was sent. Returns when the lease is gone.
    async fn keep_alive(&self, lease: i64, renewed: Arc<Mutex<Instant>>) -> StoreError {
        let every = self.ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            let sent = Instant::now();
            match tokio::time::timeout(every, self.coordination.keep_alive(lease)).await {
                Ok(Ok(_)) => {
                    let mut last = renewed.lock();
                    *last = (*last).max(sent);
                }
                Ok(Err(error @ StoreError::LeaseExpired(_))) => return error,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "election: cannot renew the lease");
                }
                Err(_) => tracing::warn!("election: the lease renewal timed out"),
            }
        }
    }

    /// Keeps [`LeaderView`] current.
    async fn follow_leader(self: Arc<Self>) {
        loop {
            match self.coordination.leader(ELECTION).await {
                Ok(leader) => {
                    let view = LeaderView::of(leader);
                    self.view.send_if_modified(|old| {
                        let changed = *old != view;
                        *old = view;
                        changed
                    });
                }
                Err(error) => tracing::debug!(%error, "cannot read the leader"),
            }
            let listing = self.coordination.list_keys(ELECTION).await;
            let after = listing.map(|l| l.revision).unwrap_or(0);
            match self.coordination.watch_keys(ELECTION, after).await {
                Ok(mut events) => {
                    use futures::StreamExt;
                    // Any change of the candidacies: read the leader again.
                    let _ = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}
