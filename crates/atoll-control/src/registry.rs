//! The service registry's gRPC service (`atoll.registry.v1.Registry`),
//! served by every replica: registrations go straight to the coordination
//! keyspace (no leader involved), watches are answered from this replica's
//! [`atoll_registry::Hub`].

use std::pin::Pin;
use std::sync::Arc;

use atoll_api::registry::registry_server::Registry;
use atoll_api::registry::{
    DeregisterAnswer, DeregisterRequest, HeartbeatAnswer, HeartbeatRequest, InstanceKey, Refusal,
    RegisterAnswer, RegisterRequest, Registrant, RegistryUpdate, WatchRequest,
};
use atoll_registry::check::{self, CheckError};
use atoll_registry::keys::{self, ServiceKey, workspace_or_default};
use atoll_store::{Expect, StoreError, Write};
use futures::Stream;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::control::Control;
use crate::metrics::RegistryCallLabels;
use crate::stream::{no_certificate, over_tls};

/// Where a session's owner is recorded, under the session's own lease: only
/// the registrant that made a session may renew, use or end it.
const SESSIONS: &str = "registry-sessions/";

fn session_key(session: i64) -> String {
    format!("{SESSIONS}{session:x}")
}

/// How long a new watch waits for this replica's index (a replica just
/// started lists the registry first).
const WAIT_FOR_INDEX: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a new watch may take to name its subscriber.
const FIRST_MESSAGE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The service of one replica.
#[derive(Clone, Debug)]
pub(crate) struct RegistryService {
    pub(crate) control: Arc<Control>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<RegistryUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for RegistryService {
    type WatchStream = UpdateStream;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterAnswer>, Status> {
        let answer = self.answer_register(request).await;
        self.count("register", answer.as_ref().err());
        answer.map(Response::new)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatAnswer>, Status> {
        let answer = self.answer_heartbeat(request).await;
        self.count("heartbeat", answer.as_ref().err());
        answer.map(Response::new)
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterAnswer>, Status> {
        let answer = self.answer_deregister(request).await;
        self.count("deregister", answer.as_ref().err());
        answer.map(Response::new)
    }

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let answer = self.answer_watch(request).await;
        self.count("watch", answer.as_ref().err());
        answer.map(Response::new)
    }
}

impl RegistryService {
    fn count(&self, call: &str, error: Option<&Status>) {
        let result = match error {
            None => "ok".to_owned(),
            Some(status) => format!("{:?}", status.code()),
        };
        self.control
            .metrics
            .registry_calls
            .get_or_create(&RegistryCallLabels {
                call: call.to_owned(),
                result,
            })
            .inc();
    }

    async fn answer_register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<RegisterAnswer, Status> {
        let registrant = verified(&request, "register instances")?;
        let request = request.into_inner();
        if request.instances.len() > atoll_registry::MAX_INSTANCES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} instances in one call; register at most {} per call",
                request.instances.len(),
                atoll_registry::MAX_INSTANCES_PER_CALL
            )));
        }
        check::may_register(&registrant).map_err(|e| Status::permission_denied(e.to_string()))?;
        // Checked before a session is made: a call refused whole leaves
        // no lease behind. Each bad instance is refused alone.
        let topology = self.control.cache.current().topology().clone();
        let mut stored = Vec::with_capacity(request.instances.len());
        let mut refused = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (index, instance) in request.instances.iter().enumerate() {
            let key = InstanceKey {
                service: instance.service.clone(),
                zone: instance.zone.clone(),
                name: instance.name.clone(),
            };
            // The session is filled in once known.
            let checked =
                check::instance(&topology, &registrant, 0, index, instance).and_then(|i| {
                    if seen.insert((i.service.clone(), i.zone.clone(), i.name.clone())) {
                        Ok(i)
                    } else {
                        Err(CheckError::Invalid(format!(
                            "instances[{index}] ({}/{}/{}) appears twice in one call",
                            i.service, i.zone, i.name
                        )))
                    }
                });
            match checked {
                Ok(instance) => stored.push(instance),
                Err(error) => refused.push(Refusal {
                    instance: Some(key),
                    code: match error {
                        CheckError::Invalid(_) => "invalid",
                        CheckError::Forbidden(_) => "forbidden",
                    }
                    .to_owned(),
                    reason: error.to_string(),
                }),
            }
        }
        let coordination = &self.control.coordination;
        let (session, ttl, new) = if request.session == 0 {
            let ttl = check::session_ttl(request.ttl_ms).map_err(invalid)?;
            (coordination.grant(ttl).await.map_err(store)?, ttl, true)
        } else {
            self.own_session(&registrant, request.session).await?;
            let ttl = coordination
                .keep_alive(request.session)
                .await
                .map_err(|e| session_gone(request.session, e))?;
            (request.session, ttl, false)
        };
        for instance in &mut stored {
            instance.session = session;
        }
        let mut writes: Vec<Write> = Vec::with_capacity(stored.len() + 1);
        if new {
            writes.push(
                Write::put(
                    session_key(session),
                    check::session_owner(&registrant).into_bytes(),
                )
                .expecting(Expect::Absent)
                .with_lease(session),
            );
        }
        writes.extend(stored.iter().map(|instance| {
            Write::put(
                keys::instance_key(&registrant.workspace, instance),
                instance.encode_to_vec(),
            )
            .with_lease(session)
        }));
        let mut revision = 0;
        for chunk in chunked(writes) {
            revision = coordination.write_keys(chunk, None).await.map_err(store)?;
        }
        if revision == 0 {
            revision = self.control.registry.counts().revision;
        }
        if new {
            tracing::info!(
                registrant = %check::registrant_name(&registrant),
                session = format!("{session:x}"),
                ttl_ms = ttl.as_millis(),
                instances = stored.len(),
                "registry session made"
            );
        }
        if let Some(first) = refused.first() {
            tracing::info!(
                registrant = %check::registrant_name(&registrant),
                refused = refused.len(),
                first = %first.reason,
                "registry instances refused"
            );
        }
        Ok(RegisterAnswer {
            session,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            revision,
            refused,
        })
    }

    async fn answer_heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<HeartbeatAnswer, Status> {
        let registrant = verified(&request, "keep a registry session")?;
        let session = request.into_inner().session;
        self.own_session(&registrant, session).await?;
        let ttl = self
            .control
            .coordination
            .keep_alive(session)
            .await
            .map_err(|e| session_gone(session, e))?;
        Ok(HeartbeatAnswer {
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        })
    }

    async fn answer_deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<DeregisterAnswer, Status> {
        let registrant = verified(&request, "deregister instances")?;
        let request = request.into_inner();
        if request.instances.len() > atoll_registry::MAX_INSTANCES_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} instances in one call; deregister at most {} per call",
                request.instances.len(),
                atoll_registry::MAX_INSTANCES_PER_CALL
            )));
        }
        self.own_session(&registrant, request.session).await?;
        let coordination = &self.control.coordination;
        if request.instances.is_empty() {
            coordination
                .revoke(request.session)
                .await
                .map_err(|e| session_gone(request.session, e))?;
            tracing::info!(
                registrant = %check::registrant_name(&registrant),
                session = format!("{:x}", request.session),
                "registry session ended"
            );
            return Ok(DeregisterAnswer {
                revision: self.control.registry.counts().revision,
            });
        }
        // Only instances of this session: another's registration of the
        // same name (a newer one) stays.
        let mut writes = Vec::new();
        for key in &request.instances {
            let key = keys::key(&registrant.workspace, &key.service, &key.zone, &key.name);
            if let Some(entry) = coordination.get_key(&key).await.map_err(store)?
                && entry.lease == Some(request.session)
            {
                writes.push(Write::delete(key).expecting(Expect::Modified(entry.modified)));
            }
        }
        let mut revision = self.control.registry.counts().revision;
        for chunk in chunked(writes) {
            revision = coordination.write_keys(chunk, None).await.map_err(store)?;
        }
        Ok(DeregisterAnswer { revision })
    }

    /// Refuses a session that is not `registrant`'s (or is gone).
    async fn own_session(&self, registrant: &Registrant, session: i64) -> Result<(), Status> {
        if session == 0 {
            return Err(Status::invalid_argument(
                "session 0: register first (without a session) to get one",
            ));
        }
        let owner = self
            .control
            .coordination
            .get_key(&session_key(session))
            .await
            .map_err(store)?;
        // Another's session is answered as a missing one: a registrant
        // learns nothing of sessions it did not make.
        match owner {
            Some(entry) if entry.value == check::session_owner(registrant).as_bytes() => Ok(()),
            _ => Err(session_gone(session, StoreError::LeaseExpired(session))),
        }
    }

    async fn answer_watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<UpdateStream, Status> {
        let certified = crate::peer::certified(&request)?;
        if certified.is_none() && over_tls(&request) {
            return Err(no_certificate("watch the registry"));
        }
        let hub = self.control.registry.clone();
        // A replica that cannot follow the registry sends its subscribers
        // to one that can, rather than serve them a view that never moves.
        if tokio::time::timeout(WAIT_FOR_INDEX, hub.ready())
            .await
            .is_err()
        {
            return Err(Status::unavailable(
                "this replica cannot read the registry from its keyspace now; watch another replica",
            ));
        }
        let mut incoming = request.into_inner();
        let first = match tokio::time::timeout(FIRST_MESSAGE_WITHIN, incoming.next()).await {
            Ok(Some(Ok(first))) => first,
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) => {
                return Err(Status::invalid_argument(
                    "the watch ended before its first message",
                ));
            }
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "no first watch message within {FIRST_MESSAGE_WITHIN:?}: send the subscriber and its services first"
                )));
            }
        };
        let claimed = first.subscriber.clone().unwrap_or_default();
        let subscriber = match &certified {
            Some(id) => as_certified(id, &claimed)?,
            None => claimed,
        };
        if subscriber.name.is_empty() {
            return Err(Status::invalid_argument(
                "the first watch message names its subscriber (subscriber.name)",
            ));
        }
        let workspace = workspace_or_default(&subscriber.workspace).to_owned();
        let metrics = self.control.metrics.clone();
        let mut shutdown = self.control.shutdown.clone();
        let subscription = hub.subscribe();
        apply_watch_request(&subscription, &workspace, &first)?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<RegistryUpdate, Status>>(1);
        metrics.registry_subscribers.inc();
        tokio::spawn(async move {
            let _gauge = Gauge(metrics.clone());
            loop {
                tokio::select! {
                    next = incoming.next() => match next {
                        Some(Ok(request)) => {
                            if let Err(status) = apply_watch_request(&subscription, &workspace, &request) {
                                let _ = sender.send(Err(status)).await;
                                return;
                            }
                        }
                        Some(Err(_)) | None => return,
                    },
                    pending = subscription.next() => {
                        // Part by part: each is copied for the wire only
                        // when the stream has room for it.
                        for update in pending
                            .into_iter()
                            .flat_map(|p| p.into_updates(atoll_registry::UPDATE_PART))
                        {
                            metrics.registry_updates.inc();
                            metrics.registry_update_bytes.inc_by(update.encoded_len() as u64);
                            if sender.send(Ok(update)).await.is_err() {
                                return;
                            }
                        }
                    }
                    () = hub.until_lost() => {
                        let _ = sender
                            .send(Err(Status::unavailable(
                                "this replica lost its keyspace and cannot follow the registry; watch another",
                            )))
                            .await;
                        return;
                    }
                    () = async { let _ = shutdown.wait_for(|stopping| *stopping).await; } => {
                        let _ = sender
                            .send(Err(Status::unavailable("this replica is stopping; watch another")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

/// Decrements the subscriber gauge when a watch ends.
struct Gauge(Arc<crate::metrics::Metrics>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.registry_subscribers.dec();
    }
}

fn apply_watch_request(
    subscription: &atoll_registry::Subscription,
    workspace: &str,
    request: &WatchRequest,
) -> Result<(), Status> {
    for service in request.add.iter().chain(&request.remove) {
        if let Some(problem) = atoll_model::names::dns_label_problem(service) {
            return Err(Status::invalid_argument(format!(
                "watch of service `{service}`: {problem}"
            )));
        }
    }
    if subscription.services().len() + request.add.len() > 10_000 {
        return Err(Status::invalid_argument(
            "a subscriber watches at most 10000 services",
        ));
    }
    for service in &request.remove {
        subscription.remove(&ServiceKey::new(workspace, service));
    }
    for service in &request.add {
        subscription.add(ServiceKey::new(workspace, service));
    }
    Ok(())
}

/// What `claimed` is as the certificate `id` says (refused when the claim
/// differs), by the same rule as the config stream's.
fn as_certified(id: &atoll_identity::AtollId, claimed: &Registrant) -> Result<Registrant, Status> {
    let node = crate::peer::check_claim(
        id,
        &atoll_api::config::NodeIdentity {
            name: claimed.name.clone(),
            role: claimed.role.clone(),
            zone: claimed.zone.clone(),
            cell: String::new(),
            workspace: claimed.workspace.clone(),
        },
    )?;
    Ok(Registrant {
        name: node.name,
        role: node.role,
        zone: node.zone,
        workspace: node.workspace,
    })
}

/// The registrant of a call: the certificate's identity when the
/// connection has one (what it claims must match), the claim over plain
/// HTTP, refused over TLS without a certificate.
fn verified<T: HasRegistrant>(request: &Request<T>, what: &str) -> Result<Registrant, Status> {
    let claimed = request.get_ref().registrant().clone();
    match crate::peer::certified(request)? {
        Some(id) => as_certified(&id, &claimed),
        None if over_tls(request) => Err(no_certificate(what)),
        None => {
            if claimed.name.is_empty() || claimed.role.is_empty() {
                return Err(Status::invalid_argument(
                    "name the registrant (registrant.name, registrant.role, registrant.zone)",
                ));
            }
            Ok(claimed)
        }
    }
}

trait HasRegistrant {
    fn registrant(&self) -> &Registrant;
}

static NOBODY: std::sync::LazyLock<Registrant> = std::sync::LazyLock::new(Registrant::default);

macro_rules! has_registrant {
    ($($t:ty),*) => {$(
        impl HasRegistrant for $t {
            fn registrant(&self) -> &Registrant {
                self.registrant.as_ref().unwrap_or(&NOBODY)
            }
        }
    )*};
}
has_registrant!(RegisterRequest, HeartbeatRequest, DeregisterRequest);

fn invalid(error: CheckError) -> Status {
    Status::invalid_argument(error.to_string())
}

fn session_gone(session: i64, error: StoreError) -> Status {
    match error {
        StoreError::LeaseExpired(_) => Status::not_found(format!(
            "registry session {session:x} has run out (no heartbeat within its TTL) or was ended; its instances are gone: register them again without a session"
        )),
        other => store(other),
    }
}

fn store(error: StoreError) -> Status {
    if let StoreError::LeaseExpired(session) = error {
        return session_gone(session, error);
    }
    match &error {
        StoreError::Backend { .. } => Status::unavailable(error.to_string()),
        StoreError::KeyConflict { .. } => Status::aborted(error.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(error.to_string()),
        _ => Status::internal(error.to_string()),
    }
}

fn chunked(mut writes: Vec<Write>) -> Vec<Vec<Write>> {
    let mut out = Vec::new();
    while !writes.is_empty() {
        let rest = writes.split_off(writes.len().min(atoll_store::MAX_WRITES_PER_BATCH));
        out.push(std::mem::replace(&mut writes, rest));
    }
    out
}
