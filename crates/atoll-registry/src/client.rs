//! The registry's clients: a [`Registrar`] keeps instances registered
//! (heartbeats, registering again after a session ran out), a [`Watcher`]
//! keeps the instances of the services a process calls. Both move to the
//! next control-plane replica when one cannot be reached.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use atoll_api::registry::registry_client::RegistryClient;
use atoll_api::registry::{
    DeregisterRequest, HeartbeatRequest, Instance, InstanceKey, RegisterRequest, Registrant,
    WatchRequest,
};
use atoll_transport::{Channels, ControlUrls};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;

/// (service, zone, name): an instance of a registrar or a view.
pub type InstanceId = (String, String, String);

fn id_of(instance: &Instance) -> InstanceId {
    (
        instance.service.clone(),
        instance.zone.clone(),
        instance.name.clone(),
    )
}

fn channel_of(
    channels: &Channels,
    urls: &ControlUrls,
) -> Result<(String, RegistryClient<tonic::transport::Channel>), tonic::Status> {
    let url = urls.current().to_owned();
    let channel = channels.to(&url).map_err(tonic::Status::invalid_argument)?;
    Ok((
        url,
        RegistryClient::new(channel).max_decoding_message_size(atoll_api::MAX_MESSAGE_BYTES),
    ))
}

/// Whether a status means "this replica cannot be used now; try another".
fn try_elsewhere(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// Runs one call with a deadline of our own: a replica that hangs (stopped,
/// or its host unreachable) answers nothing, and a session must not run
/// out waiting for it.
async fn within<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(deadline, call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {deadline:?}"
        ))),
    }
}

// === impl Registrar ===

/// Keeps a set of instances registered under one session for as long as it
/// lives. [`Registrar::close`] ends the session (its instances go at once);
/// dropping it only stops heartbeating, and the instances go when the
/// session runs out.
#[derive(Debug)]
pub struct Registrar {
    desired: watch::Sender<BTreeMap<InstanceId, Instance>>,
    state: watch::Receiver<RegistrarState>,
    task: Option<tokio::task::JoinHandle<()>>,
    closing: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What a [`Registrar`] has achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistrarState {
    /// The session, once made.
    pub session: i64,
    /// How many times the registrar has had to make a new session (the
    /// first included).
    pub sessions: u64,
    /// The instances registered as the control plane last confirmed.
    pub registered: usize,
    /// The last error, cleared by the next success; or, when the control
    /// plane refused some instances, what it said of the first.
    pub problem: Option<String>,
    /// Instances the control plane refused, with why (tried again every
    /// heartbeat: a Service applied later lets them in).
    pub refused: BTreeMap<String, String>,
}

impl Registrar {
    /// Starts registering for `registrant` with sessions of `ttl`, on the
    /// replicas of `urls`. Nothing is registered until [`Registrar::put`].
    pub fn start(
        channels: Channels,
        urls: ControlUrls,
        registrant: Registrant,
        ttl: Duration,
    ) -> Self {
        let (desired, wanted) = watch::channel(BTreeMap::new());
        let (report, state) = watch::channel(RegistrarState::default());
        let (closing, closed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(
            Run {
                channels,
                urls,
                registrant,
                ttl,
                session: 0,
                registered: BTreeMap::new(),
                refused: BTreeMap::new(),
                report,
            }
            .run(wanted, closed),
        );
        Self {
            desired,
            state,
            task: Some(task),
            closing: Some(closing),
        }
    }

    /// Registers `instance` (or replaces it).
    pub fn put(&self, instance: Instance) {
        self.desired.send_modify(|d| {
            d.insert(id_of(&instance), instance);
        });
    }

    /// Replaces every instance of the registrar with `instances`.
    pub fn set(&self, instances: Vec<Instance>) {
        let next: BTreeMap<InstanceId, Instance> =
            instances.into_iter().map(|i| (id_of(&i), i)).collect();
        self.desired.send_if_modified(|d| {
            if *d == next {
                return false;
            }
            *d = next;
            true
        });
    }

    /// Deregisters the instance `name` of `service` in `zone`.
    pub fn remove(&self, service: &str, zone: &str, name: &str) {
        self.desired.send_modify(|d| {
            d.remove(&(service.to_owned(), zone.to_owned(), name.to_owned()));
        });
    }

    /// What it has achieved.
    pub fn state(&self) -> RegistrarState {
        self.state.borrow().clone()
    }

    /// Waits until the control plane confirmed what was asked last.
    pub async fn settled(&self, within: Duration) -> Result<RegistrarState, String> {
        let want = self.desired.borrow().len();
        let mut state = self.state.clone();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let now = state.borrow_and_update();
                if now.session != 0 && now.registered == want && now.problem.is_none() {
                    return Ok(now.clone());
                }
            }
            if tokio::time::timeout_at(deadline, state.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "not registered within {within:?}: {}",
                    state
                        .borrow()
                        .problem
                        .clone()
                        .unwrap_or_else(|| "no answer".into())
                ));
            }
        }
    }

    /// Ends the session: every instance of it is deregistered now.
    pub async fn close(mut self) {
        if let Some(closing) = self.closing.take() {
            let _ = closing.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

struct Run {
    channels: Channels,
    urls: ControlUrls,
    registrant: Registrant,
    ttl: Duration,
    session: i64,
    registered: BTreeMap<InstanceId, Instance>,
    /// Refused as they are now: not sent again until they change or the
    /// next heartbeat.
    refused: BTreeMap<InstanceId, (Instance, String)>,
    report: watch::Sender<RegistrarState>,
}

impl Run {
    async fn run(
        mut self,
        mut wanted: watch::Receiver<BTreeMap<InstanceId, Instance>>,
        mut closed: tokio::sync::oneshot::Receiver<()>,
    ) {
        let beat = self.ttl / 3;
        let mut next_beat = tokio::time::Instant::now() + beat;
        let mut failures: u32 = 0;
        loop {
            let desired = wanted.borrow_and_update().clone();
            if tokio::time::Instant::now() >= next_beat {
                // Refused instances are tried again with each heartbeat.
                self.refused.clear();
            }
            // Ok(true): the session was renewed by this round.
            let outcome = if self.session == 0 || self.out_of_date(&desired) {
                self.sync(&desired).await
            } else if tokio::time::Instant::now() >= next_beat {
                self.heartbeat().await.map(|()| true)
            } else {
                Ok(false)
            };
            let wait = match outcome {
                Ok(renewed) => {
                    failures = 0;
                    if renewed {
                        next_beat = tokio::time::Instant::now() + beat;
                    }
                    let refused: BTreeMap<String, String> = self
                        .refused
                        .iter()
                        .map(|((service, zone, name), (_, why))| {
                            (format!("{service}/{zone}/{name}"), why.clone())
                        })
                        .collect();
                    let problem = refused.values().next().map(|why| {
                        format!("{} instance(s) refused; the first: {why}", refused.len())
                    });
                    if problem.is_some() && self.report.borrow().refused != refused {
                        tracing::warn!(
                            problem = problem.as_deref(),
                            "the registry refused instances; they are tried again every heartbeat"
                        );
                    }
                    self.report.send_modify(|s| {
                        s.problem = problem;
                        s.refused = refused;
                        s.registered = self.registered.len();
                        s.session = self.session;
                    });
                    next_beat.saturating_duration_since(tokio::time::Instant::now())
                }
                Err(status) => {
                    let problem = format!("{}: {}", self.urls.current(), status.message());
                    // Said once per problem.
                    if self.report.borrow().problem.as_deref() != Some(problem.as_str()) {
                        tracing::warn!(%problem, "cannot keep the registration; trying again");
                    }
                    self.report.send_modify(|s| s.problem = Some(problem));
                    if try_elsewhere(&status) {
                        let url = self.urls.current().to_owned();
                        self.urls.failed(&url);
                    }
                    failures += 1;
                    // 200 ms, doubling, at most a third of the TTL: a
                    // session is not lost to the backoff.
                    (Duration::from_millis(100) * 2u32.saturating_pow(failures.min(8))).min(beat)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = wanted.changed() => {
                    if changed.is_err() { return; }
                }
                _ = &mut closed => {
                    self.end().await;
                    return;
                }
            }
        }
    }

    /// Whether `desired` differs from what is registered (or was refused
    /// as it is).
    fn out_of_date(&self, desired: &BTreeMap<InstanceId, Instance>) -> bool {
        desired.iter().any(|(id, i)| {
            self.registered.get(id) != Some(i) && self.refused.get(id).map(|(r, _)| r) != Some(i)
        }) || self.registered.keys().any(|id| !desired.contains_key(id))
    }

    /// The deadline of one call: well inside a heartbeat interval.
    fn call_deadline(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(500))
    }

    /// A session that ran out (or is not ours): everything again, in a new
    /// one.
    fn forget_session(&mut self) {
        self.session = 0;
        self.registered.clear();
        self.refused.clear();
    }

    /// Registers what is wanted and deregisters what is not any more; a
    /// session that ran out is made again, with everything in it. `true`
    /// when the session was renewed (a registration renews it).
    async fn sync(
        &mut self,
        desired: &BTreeMap<InstanceId, Instance>,
    ) -> Result<bool, tonic::Status> {
        let (_, mut client) = channel_of(&self.channels, &self.urls)?;
        let deadline = self.call_deadline();
        let changed: Vec<Instance> = desired
            .iter()
            .filter(|(id, i)| {
                self.session == 0
                    || (self.registered.get(*id) != Some(*i)
                        && self.refused.get(*id).map(|(r, _)| r) != Some(*i))
            })
            .map(|(_, i)| i.clone())
            .collect();
        let gone: Vec<InstanceKey> = self
            .registered
            .keys()
            .filter(|id| !desired.contains_key(*id))
            .map(|(service, zone, name)| InstanceKey {
                service: service.clone(),
                zone: zone.clone(),
                name: name.clone(),
            })
            .collect();
        self.refused.retain(|id, _| desired.contains_key(id));
        if self.session != 0 && !gone.is_empty() {
            for chunk in gone.chunks(crate::MAX_INSTANCES_PER_CALL) {
                let answer = within(
                    deadline,
                    client.deregister(DeregisterRequest {
                        registrant: Some(self.registrant.clone()),
                        session: self.session,
                        instances: chunk.to_vec(),
                    }),
                )
                .await;
                if let Err(status) = answer {
                    if status.code() == tonic::Code::NotFound {
                        self.forget_session();
                    }
                    return Err(status);
                }
            }
            self.registered.retain(|id, _| desired.contains_key(id));
        }
        if self.session != 0 && changed.is_empty() {
            return Ok(false);
        }
        for chunk in chunks(changed) {
            let answer = within(
                deadline,
                client.register(RegisterRequest {
                    registrant: Some(self.registrant.clone()),
                    session: self.session,
                    ttl_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
                    instances: chunk.clone(),
                }),
            )
            .await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(status) => {
                    if status.code() == tonic::Code::NotFound {
                        self.forget_session();
                    }
                    return Err(status);
                }
            };
            if self.session != answer.session {
                self.session = answer.session;
                self.report.send_modify(|s| s.sessions += 1);
            }
            let refused: HashMap<InstanceId, String> = answer
                .refused
                .into_iter()
                .filter_map(|r| {
                    let key = r.instance?;
                    Some(((key.service, key.zone, key.name), r.reason))
                })
                .collect();
            for instance in chunk {
                let id = id_of(&instance);
                match refused.get(&id) {
                    Some(why) => {
                        self.registered.remove(&id);
                        self.refused.insert(id, (instance, why.clone()));
                    }
                    None => {
                        self.refused.remove(&id);
                        self.registered.insert(id, instance);
                    }
                }
            }
        }
        Ok(true)
    }

    async fn heartbeat(&mut self) -> Result<(), tonic::Status> {
        let (_, mut client) = channel_of(&self.channels, &self.urls)?;
        match within(
            self.call_deadline(),
            client.heartbeat(HeartbeatRequest {
                registrant: Some(self.registrant.clone()),
                session: self.session,
            }),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::warn!(
                    session = self.session,
                    "the registry session ran out; registering again"
                );
                self.forget_session();
                Err(status)
            }
            Err(status) => Err(status),
        }
    }

    async fn end(&mut self) {
        if self.session == 0 {
            return;
        }
        for _ in 0..self.urls.all().len() {
            let Ok((url, mut client)) = channel_of(&self.channels, &self.urls) else {
                return;
            };
            match within(
                self.call_deadline(),
                client.deregister(DeregisterRequest {
                    registrant: Some(self.registrant.clone()),
                    session: self.session,
                    instances: Vec::new(),
                }),
            )
            .await
            {
                Ok(_) => return,
                Err(status) if try_elsewhere(&status) => self.urls.failed(&url),
                Err(_) => return,
            }
        }
    }
}

fn chunks(mut instances: Vec<Instance>) -> Vec<Vec<Instance>> {
    if instances.is_empty() {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    while !instances.is_empty() {
        let rest = instances.split_off(instances.len().min(crate::MAX_INSTANCES_PER_CALL));
        out.push(std::mem::replace(&mut instances, rest));
    }
    out
}

// === impl Watcher ===

/// The instances of the services a process calls, kept current.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct View {
    /// Service -> (zone, name) -> instance.
    pub services: HashMap<String, BTreeMap<(String, String), Arc<Instance>>>,
    /// The revision of the newest update applied.
    pub revision: i64,
    /// Updates applied since the watcher started.
    pub updates: u64,
    /// Bytes of updates received (their encoded size).
    pub bytes: u64,
    /// Per service, how many updates changed it: a holder of endpoint
    /// sets rebuilds only the services whose count moved.
    pub changes: HashMap<String, u64>,
}

impl View {
    /// The instances of `service`, in (zone, name) order.
    pub fn instances(&self, service: &str) -> Vec<&Instance> {
        self.services
            .get(service)
            .map(|s| s.values().map(AsRef::as_ref).collect())
            .unwrap_or_default()
    }

    /// How many instances `service` has.
    pub fn count(&self, service: &str) -> usize {
        self.services.get(service).map_or(0, BTreeMap::len)
    }

    fn apply(&mut self, update: atoll_api::registry::RegistryUpdate) {
        self.bytes += prost::Message::encoded_len(&update) as u64;
        self.updates += 1;
        self.revision = self.revision.max(update.revision);
        *self.changes.entry(update.service.clone()).or_default() += 1;
        let service = self.services.entry(update.service).or_default();
        if update.snapshot {
            service.clear();
        }
        for key in update.removed {
            service.remove(&(key.zone, key.name));
        }
        for instance in update.instances {
            service.insert(
                (instance.zone.clone(), instance.name.clone()),
                Arc::new(instance),
            );
        }
    }
}

/// Watches services of the registry from whichever replica answers.
///
/// Its view is changed in place under a lock held only to apply an update
/// or to read: a reader never makes an update copy the view.
#[derive(Debug)]
pub struct Watcher {
    view: Arc<parking_lot::Mutex<View>>,
    changed: watch::Receiver<u64>,
    services: watch::Sender<BTreeSet<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts watching `services` for `subscriber`.
    pub fn start(
        channels: Channels,
        urls: ControlUrls,
        subscriber: Registrant,
        services: impl IntoIterator<Item = String>,
    ) -> Self {
        let (services, wanted) = watch::channel(services.into_iter().collect());
        let (publish, changed) = watch::channel(0);
        let view = Arc::new(parking_lot::Mutex::new(View::default()));
        let task = tokio::spawn(watch_loop(
            channels,
            urls,
            subscriber,
            wanted,
            Published {
                view: view.clone(),
                changed: publish,
            },
        ));
        Self {
            view,
            changed,
            services,
            task,
        }
    }

    /// Reads the view.
    pub fn read<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        f(&self.view.lock())
    }

    /// A copy of the view.
    pub fn view(&self) -> View {
        self.view.lock().clone()
    }

    /// A receiver woken after every update (its value counts them).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// Watches `service` too.
    pub fn add(&self, service: &str) {
        self.services
            .send_if_modified(|s| s.insert(service.to_owned()));
    }

    /// Stops watching `service`.
    pub fn remove(&self, service: &str) {
        self.services.send_if_modified(|s| s.remove(service));
    }

    /// Waits until `test` holds for the view (run under its lock), or
    /// `within` passes.
    pub async fn wait_until(
        &self,
        within: Duration,
        mut test: impl FnMut(&View) -> bool,
    ) -> Result<(), ()> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            changed.borrow_and_update();
            if test(&self.view.lock()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(());
            }
        }
    }

    /// [`Watcher::wait_until`], then a copy of the view (or of the view at
    /// the deadline, as the error).
    pub async fn wait_for(
        &self,
        within: Duration,
        test: impl FnMut(&View) -> bool,
    ) -> Result<View, View> {
        match self.wait_until(within, test).await {
            Ok(()) => Ok(self.view()),
            Err(()) => Err(self.view()),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Published {
    view: Arc<parking_lot::Mutex<View>>,
    changed: watch::Sender<u64>,
}

impl Published {
    fn update(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.lock());
        self.changed.send_modify(|n| *n += 1);
    }
}

async fn watch_loop(
    channels: Channels,
    urls: ControlUrls,
    subscriber: Registrant,
    mut wanted: watch::Receiver<BTreeSet<String>>,
    publish: Published,
) {
    let mut said: Option<String> = None;
    let mut failures: u32 = 0;
    loop {
        let result = watch_once(&channels, &urls, &subscriber, &mut wanted, &publish).await;
        if wanted.has_changed().is_err() {
            return;
        }
        match result {
            Ok(()) => failures = 0,
            Err(status) => {
                // Said once per problem: a refusal that lasts (a bad
                // subscriber name) is not a warning every 200 ms.
                let problem = status.message().to_owned();
                if said.as_deref() != Some(problem.as_str()) {
                    tracing::warn!(
                        control = urls.current(),
                        error = %problem,
                        "registry watch ended; watching again"
                    );
                    said = Some(problem);
                }
                if try_elsewhere(&status) {
                    let url = urls.current().to_owned();
                    urls.failed(&url);
                    failures = 0;
                } else {
                    failures += 1;
                }
            }
        }
        // 200 ms; doubling up to 5 s for a refusal that stays.
        tokio::time::sleep(
            (Duration::from_millis(200) * 2u32.saturating_pow(failures.min(5)))
                .min(Duration::from_secs(5)),
        )
        .await;
    }
}

async fn watch_once(
    channels: &Channels,
    urls: &ControlUrls,
    subscriber: &Registrant,
    wanted: &mut watch::Receiver<BTreeSet<String>>,
    publish: &Published,
) -> Result<(), tonic::Status> {
    let (_, mut client) = channel_of(channels, urls)?;
    let (requests, outgoing) = mpsc::channel::<WatchRequest>(16);
    let mut watching = wanted.borrow_and_update().clone();
    // A service dropped while no replica was watched leaves the view now.
    publish.update(|view| {
        view.services
            .retain(|service, _| watching.contains(service));
        view.changes.retain(|service, _| watching.contains(service));
    });
    let _ = requests
        .send(WatchRequest {
            subscriber: Some(subscriber.clone()),
            add: watching.iter().cloned().collect(),
            remove: Vec::new(),
        })
        .await;
    let mut updates = client
        .watch(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let mut parts: HashMap<String, Vec<atoll_api::registry::RegistryUpdate>> = HashMap::new();
    loop {
        tokio::select! {
            update = updates.next() => {
                let Some(update) = update else {
                    return Err(tonic::Status::unavailable("the replica ended the watch"));
                };
                let update = update?;
                // A late update of a service no longer watched (it was in
                // flight when the removal was sent) does not bring it back.
                if !watching.contains(&update.service) {
                    continue;
                }
                // The parts of a snapshot are applied together: a view
                // never holds half a service.
                if update.more || parts.contains_key(&update.service) {
                    let more = update.more;
                    let service = update.service.clone();
                    parts.entry(service.clone()).or_default().push(update);
                    if more {
                        continue;
                    }
                    let whole = parts.remove(&service).unwrap_or_default();
                    publish.update(|view| {
                        for part in whole {
                            view.apply(part);
                        }
                    });
                } else {
                    publish.update(|view| view.apply(update));
                }
            }
            changed = wanted.changed() => {
                if changed.is_err() { return Ok(()); }
                let next = wanted.borrow_and_update().clone();
                let add: Vec<String> = next.difference(&watching).cloned().collect();
                let remove: Vec<String> = watching.difference(&next).cloned().collect();
                publish.update(|view| {
                    for service in &remove {
                        view.services.remove(service);
                        view.changes.remove(service);
                    }
                });
                for service in &remove {
                    parts.remove(service);
                }
                watching = next;
                if requests.send(WatchRequest { subscriber: None, add, remove }).await.is_err() {
                    return Err(tonic::Status::unavailable("the watch's request stream closed"));
                }
            }
        }
    }
}
