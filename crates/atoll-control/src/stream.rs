//! The config stream (gRPC `atoll.config.v1.ConfigStream`): each node gets a
//! snapshot, then deltas; ACKs and NACKs update the node registry.
//! `docs/config-stream.md` describes the protocol from a node's side.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use atoll_api::config::config_stream_server::ConfigStream;
use atoll_api::config::{ConfigUpdate, NodeMessage, Resource, ResourceKey, node_message};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::{KindLabels, Metrics};
use crate::nodes::{Identity, NodeRegistry};
use crate::state::{ConfigCache, ConfigState};

/// How long a new stream may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Metadata of a lease renewal a follower passed on to the leader.
const FORWARDED: &str = "x-atoll-forwarded";

/// Updates sent but not yet answered, kept per stream to match ACKs.
const MAX_OUTSTANDING: usize = 64;

/// The gRPC service.
#[derive(Clone, Debug)]
pub(crate) struct ConfigStreamService {
    pub(crate) cache: ConfigCache,
    pub(crate) nodes: Arc<NodeRegistry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) heartbeat_timeout: Duration,
    /// The replica: its leadership and, while it leads, the term's leases.
    pub(crate) control: Arc<crate::control::Control>,
    /// A channel to the leader, for lease renewals that reach a follower.
    pub(crate) leader: Arc<LeaderChannel>,
}

/// gRPC channels to the current leader, one per replica that led.
#[derive(Debug)]
pub(crate) struct LeaderChannel {
    channels: atoll_transport::Channels,
}

impl LeaderChannel {
    pub(crate) fn new(transport: &atoll_transport::Transport) -> Self {
        Self {
            channels: transport.channels(atoll_transport::ChannelOptions {
                connect_timeout: Some(Duration::from_secs(1)),
                timeout: Some(Duration::from_secs(2)),
                keepalive: None,
            }),
        }
    }

    fn to(&self, url: &str) -> Result<tonic::transport::Channel, Status> {
        self.channels
            .to(url)
            .map_err(|e| Status::internal(format!("the leader's URL {url} is not valid: {e}")))
    }
}

/// Whether the call came over TLS: then who calls is known only from a
/// client certificate.
pub(crate) fn over_tls<T>(request: &Request<T>) -> bool {
    request
        .extensions()
        .get::<atoll_transport::Peer>()
        .is_some_and(|peer| peer.tls)
}

pub(crate) fn no_certificate(what: &str) -> Status {
    Status::unauthenticated(format!(
        "this control plane serves TLS and a node must present its certificate to {what}: give the node --cert and --key (a certificate from `atoll ca issue` or from joining)"
    ))
}

/// Whether the call is marked as passed on by another replica, refused
/// when the connection's certificate is not a replica's.
fn passed_on<T>(request: &Request<T>) -> Result<bool, Status> {
    if !request.metadata().contains_key(FORWARDED) {
        return Ok(false);
    }
    let caller = crate::peer::certified(request)?;
    if crate::peer::may_pass_on(request, caller.as_ref()) {
        Ok(true)
    } else {
        Err(Status::permission_denied(
            "only a control-plane replica passes calls on (x-atoll-forwarded); this connection's certificate is not a replica's",
        ))
    }
}

fn identity_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("the first message must be Hello with node.name set")
    } else if name.len() > 253 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("node.name must be at most 253 characters without spaces")
    } else {
        None
    }
}

/// The service's paths, as the audit chain records them.
const RENEW_LEASE: &str = "/atoll.config.v1.ConfigStream/RenewLease";
const REPORT_ENDPOINTS: &str = "/atoll.config.v1.ConfigStream/ReportEndpoints";
const SUBSCRIBE: &str = "/atoll.config.v1.ConfigStream/Subscribe";

/// Who called, for the audit chain: the certificate's identity, or nobody.
/// None for a call another replica passed on: that replica records it.
fn caller_of<T>(request: &Request<T>) -> Option<crate::access::Caller> {
    if request.metadata().contains_key(FORWARDED) {
        return None;
    }
    let remote = request
        .extensions()
        .get::<atoll_transport::Peer>()
        .map(|peer| peer.remote)
        .or_else(|| request.remote_addr());
    Some(match crate::peer::certified(request).ok().flatten() {
        Some(id) => crate::access::Caller {
            credential: format!("certificate {id}"),
            principal: atoll_access::Principal::Node(id),
            remote,
        },
        None => crate::access::Caller {
            principal: atoll_access::Principal::Anonymous,
            credential: "none".to_owned(),
            remote,
        },
    })
}

/// Every call of the service goes through the checks below; a refusal
/// (unauthenticated, permission denied) is recorded in the audit chain, as
/// the REST API's 401s and 403s are.
#[tonic::async_trait]
impl ConfigStream for ConfigStreamService {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn renew_lease(
        &self,
        request: Request<atoll_api::config::LeaseRequest>,
    ) -> Result<Response<atoll_api::config::LeaseGrant>, Status> {
        let caller = caller_of(&request);
        let answer = self.answer_renew_lease(request).await;
        self.record_refusal(caller.as_ref(), RENEW_LEASE, answer.as_ref().err())
            .await;
        answer
    }

    async fn report_endpoints(
        &self,
        request: Request<atoll_api::config::EndpointsReport>,
    ) -> Result<Response<atoll_api::config::EndpointsAnswer>, Status> {
        let caller = caller_of(&request);
        let answer = self.answer_report_endpoints(request).await;
        self.record_refusal(caller.as_ref(), REPORT_ENDPOINTS, answer.as_ref().err())
            .await;
        answer
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller_of(&request);
        let answer = self.answer_subscribe(request).await;
        self.record_refusal(caller.as_ref(), SUBSCRIBE, answer.as_ref().err())
            .await;
        answer
    }
}

impl ConfigStreamService {
    /// Records a refusal in the audit chain; other outcomes are not (lease
    /// renewals come every few hundred milliseconds from every instance).
    async fn record_refusal(
        &self,
        caller: Option<&crate::access::Caller>,
        path: &str,
        error: Option<&Status>,
    ) {
        let (Some(caller), Some(error)) = (caller, error) else {
            return;
        };
        let (status, outcome) = match error.code() {
            tonic::Code::Unauthenticated => {
                (axum::http::StatusCode::UNAUTHORIZED, "unauthenticated")
            }
            tonic::Code::PermissionDenied => (axum::http::StatusCode::FORBIDDEN, "forbidden"),
            _ => return,
        };
        self.control
            .record(crate::audit::Call {
                caller,
                method: &axum::http::Method::POST,
                path,
                status,
                outcome: outcome.to_owned(),
                detail: error.message().to_owned(),
            })
            .await;
    }

    async fn answer_renew_lease(
        &self,
        request: Request<atoll_api::config::LeaseRequest>,
    ) -> Result<Response<atoll_api::config::LeaseGrant>, Status> {
        let forwarded = passed_on(&request)?;
        let verified = over_tls(&request);
        let caller = crate::peer::certified(&request)?;
        let request = request.into_inner();
        let mut node = request.node.clone().unwrap_or_default();
        if let Some(id) = caller.as_ref().filter(|_| !forwarded) {
            node = crate::peer::check_claim(id, &node)?;
        } else if verified && !forwarded {
            return Err(no_certificate("renew a lease"));
        }
        if node.name.is_empty() {
            return Err(Status::invalid_argument(
                "a lease request names its node (node.name): the instance that will hold it",
            ));
        }
        if let Some(problem) = identity_problem(&node.name) {
            return Err(Status::invalid_argument(problem));
        }
        let term = match self.control.leading() {
            Ok(term) => term,
            // Passed on once at most: a replica that does not lead either
            // says so rather than passing it on again.
            Err(not_leading) if forwarded => {
                return Err(Status::unavailable(not_leading.to_string()));
            }
            Err(not_leading) => return self.forward_renewal(request, node, not_leading).await,
        };
        let state = self.cache.current();
        // The version that last changed a shard map: a node must run it.
        let current = state
            .resources
            .iter()
            .filter(|(key, _)| key.kind == atoll_model::Kind::ShardMap)
            .map(|(_, r)| r.resource_version)
            .max()
            .unwrap_or(0);
        let cell = atoll_model::ResourceKey::in_workspace(
            atoll_model::Kind::Cell,
            &node.workspace,
            node.cell.clone(),
        );
        let placed = state
            .resources
            .get(&cell)
            .and_then(|r| match &r.resource.spec {
                atoll_model::Spec::Cell(spec) => Some(spec.zone.clone()),
                _ => None,
            });
        let known = node.cell.is_empty() || placed.is_some();
        // A node whose identity was verified renews only leases of cells
        // in its own zone.
        if verified
            && let Some(zone) = &placed
            && *zone != node.zone
        {
            return Err(Status::permission_denied(format!(
                "{} is a node of zone `{}` and renews only leases of cells placed there; cell `{}` is in `{zone}`",
                node.name, node.zone, node.cell
            )));
        }
        // A cell outside the default workspace holds its lease under its
        // qualified name (`rz01@payments`): the same name in two
        // workspaces is two cells.
        let held = if cell.in_default() {
            node.cell.clone()
        } else {
            format!("{}@{}", cell.name, cell.workspace)
        };
        let renewal = if known {
            term.leases
                .renew(&node.name, &held, request.applied_version, current)
        } else {
            crate::leases::Renewal::Refused(format!("cell `{}` does not exist", node.cell))
        };
        let grant = match renewal {
            crate::leases::Renewal::Granted(duration) => atoll_api::config::LeaseGrant {
                granted: true,
                duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                reason: String::new(),
            },
            crate::leases::Renewal::Off => atoll_api::config::LeaseGrant {
                granted: true,
                duration_ms: 0,
                reason: String::new(),
            },
            crate::leases::Renewal::Refused(reason) => {
                tracing::debug!(node = %node.name, cell = %node.cell, %reason, "lease refused");
                atoll_api::config::LeaseGrant {
                    granted: false,
                    duration_ms: 0,
                    reason,
                }
            }
        };
        Ok(Response::new(grant))
    }

    async fn answer_report_endpoints(
        &self,
        request: Request<atoll_api::config::EndpointsReport>,
    ) -> Result<Response<atoll_api::config::EndpointsAnswer>, Status> {
        let forwarded = passed_on(&request)?;
        let verified = over_tls(&request);
        let caller = crate::peer::certified(&request)?;
        let mut report = request.into_inner();
        let mut node = report.node.clone().unwrap_or_default();
        if let Some(id) = caller.as_ref().filter(|_| !forwarded) {
            node = crate::peer::check_claim(id, &node)?;
            report.node = Some(node.clone());
        } else if verified && !forwarded {
            return Err(no_certificate("report endpoints"));
        }
        if let Some(problem) = identity_problem(&node.name) {
            return Err(Status::invalid_argument(problem));
        }
        if node.role != "agent" || node.zone.is_empty() {
            return Err(Status::permission_denied(format!(
                "only a zone's agent reports Endpoints (node.role `agent` and its node.zone); {} says role `{}`, zone `{}`",
                node.name, node.role, node.zone
            )));
        }
        if let Err(not_leading) = self.control.leading() {
            if forwarded {
                return Err(Status::unavailable(not_leading.to_string()));
            }
            let (url, mut client) = self.leader_client(not_leading).await?;
            let mut outgoing = Request::new(report);
            outgoing.set_timeout(Duration::from_secs(5));
            outgoing
                .metadata_mut()
                .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
            return client.report_endpoints(outgoing).await.map_err(|status| {
                if status.code() == tonic::Code::Unavailable {
                    Status::unavailable(format!(
                        "this replica does not lead and the leader ({url}) did not take the report: {}",
                        status.message()
                    ))
                } else {
                    status
                }
            });
        }
        let zone = node.zone.clone();
        let manifests: Vec<atoll_api::rest::ManifestFile> = report
            .endpoints
            .iter()
            .map(|r| atoll_api::rest::ManifestFile {
                source: format!("agent {zone}: {}", r.name),
                content: String::from_utf8_lossy(&r.json).into_owned(),
            })
            .collect();
        let mut set = tokio::task::spawn_blocking(move || crate::writer::Writer::parse(&manifests))
            .await
            .map_err(|e| Status::internal(format!("parsing the report: {e}")))?
            .map_err(control_status)?;
        // One already gone is fine: only what the store has is deleted.
        let state = self.cache.current();
        set.in_workspace(Some(&node.workspace));
        for name in &report.gone {
            let key = atoll_model::ResourceKey::in_workspace(
                atoll_model::Kind::Endpoints,
                &node.workspace,
                name.clone(),
            );
            if state.resources.contains_key(&key) {
                set.deletes.push((key, None));
            }
        }
        if set.puts.is_empty() && set.deletes.is_empty() && set.issues.is_empty() {
            return Ok(Response::new(atoll_api::config::EndpointsAnswer {
                version: 0,
            }));
        }
        let author = crate::writer::Author::agent(
            &zone,
            (!report.message.is_empty()).then(|| report.message.clone()),
        );
        let applied = self
            .control
            .writer
            .apply(set, false, &author)
            .await
            .map_err(control_status)?;
        Ok(Response::new(atoll_api::config::EndpointsAnswer {
            version: applied.revision,
        }))
    }

    async fn answer_subscribe(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<ReceiverStream<Result<ConfigUpdate, Status>>>, Status> {
        let peer = request
            .extensions()
            .get::<atoll_transport::Peer>()
            .map(|peer| peer.remote)
            .or_else(|| request.remote_addr())
            .map(|a| a.to_string());
        let verified = over_tls(&request);
        let caller = crate::peer::certified(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.message) {
            Some(node_message::Message::Hello(hello)) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be Hello with the node's identity",
                ));
            }
        };
        let mut node = hello.node.unwrap_or_default();
        match &caller {
            Some(id) => node = crate::peer::check_claim(id, &node)?,
            None if verified => return Err(no_certificate("follow the config stream")),
            None => {}
        }
        if let Some(problem) = identity_problem(&node.name) {
            return Err(Status::invalid_argument(problem));
        }
        let identity = Identity {
            name: node.name,
            role: node.role,
            zone: node.zone,
            cell: node.cell,
        };
        // The node's own words: at most 1,024 characters, no control
        // characters (they end up in `atoll nodes` and the logs).
        let problem = (!hello.problem.is_empty()).then(|| {
            hello
                .problem
                .chars()
                .filter(|c| !c.is_control())
                .take(1024)
                .collect::<String>()
        });
        if let Some(problem) = &problem {
            tracing::warn!(node = %identity.name, %problem, "the node could not receive an update");
        }
        tracing::info!(node = %identity.name, role = %identity.role, zone = %identity.zone, cell = %identity.cell, peer = ?peer, applied = hello.applied_version, "node connected");
        let (connection, kicked) =
            self.nodes
                .connect(identity.clone(), hello.applied_version, peer, problem);
        let (sender, receiver) = mpsc::channel(4);
        let session = Session {
            service: self.clone(),
            audience: Audience {
                workspace: if node.workspace.is_empty() {
                    atoll_model::DEFAULT_WORKSPACE.to_owned()
                } else {
                    node.workspace
                },
                role: identity.role.clone(),
                zone: identity.zone.clone(),
            },
            name: identity.name,
            connection,
            sender,
            inbound,
            kicked,
        };
        tokio::spawn(session.run());
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

impl ConfigStreamService {
    /// A client of the leader, for what reached a replica that does not
    /// lead (or cannot act now).
    async fn leader_client(
        &self,
        not_leading: crate::writer::ControlError,
    ) -> Result<
        (
            String,
            atoll_api::config::config_stream_client::ConfigStreamClient<tonic::transport::Channel>,
        ),
        Status,
    > {
        let leadership = &self.control.leadership;
        let mut view = leadership.view();
        if view.url.is_none() || view.url.as_deref() == Some(leadership.advertise()) {
            // A moment old (this replica just stepped down, or thawed).
            view = leadership.current_leader().await;
        }
        let Some(url) = view
            .url
            .filter(|url| url != self.control.leadership.advertise())
        else {
            return Err(Status::unavailable(not_leading.to_string()));
        };
        let channel = self.leader.to(&url)?;
        Ok((
            url,
            atoll_api::config::config_stream_client::ConfigStreamClient::new(channel),
        ))
    }

    /// A renewal that reached a replica that does not lead (or cannot act
    /// now): passed on to the leader, whose answer goes back as it is.
    async fn forward_renewal(
        &self,
        request: atoll_api::config::LeaseRequest,
        node: atoll_api::config::NodeIdentity,
        not_leading: crate::writer::ControlError,
    ) -> Result<Response<atoll_api::config::LeaseGrant>, Status> {
        let (url, mut client) = self.leader_client(not_leading).await?;
        let forwarded = atoll_api::config::LeaseRequest {
            node: Some(node),
            ..request
        };
        let mut outgoing = Request::new(forwarded);
        outgoing.set_timeout(Duration::from_secs(2));
        outgoing
            .metadata_mut()
            .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        client.renew_lease(outgoing).await.map_err(|status| {
            Status::unavailable(format!(
                "this replica does not lead and the leader ({url}) did not answer: {}",
                status.message()
            ))
        })
    }
}

struct Session {
    service: ConfigStreamService,
    /// What the node receives.
    audience: Audience,
    name: String,
    connection: u64,
    sender: mpsc::Sender<Result<ConfigUpdate, Status>>,
    inbound: Streaming<NodeMessage>,
    kicked: oneshot::Receiver<()>,
}

impl Session {
    async fn run(mut self) {
        let mut config = self.service.cache.subscribe();
        let mut shutdown = self.service.shutdown.clone();
        let mut last_sent: Option<Arc<ConfigState>> = None;
        // A revision whose update is larger than the stream carries: not
        // sent (the node is told why through `atoll nodes`) until the next.
        let mut too_large: Option<u64> = None;
        let mut outstanding: VecDeque<(String, u64)> = VecDeque::new();
        let mut sequence = 0u64;
        let silence = self.service.heartbeat_timeout;
        let mut deadline = tokio::time::Instant::now() + silence;
        let end = loop {
            let newest = config.borrow().revision;
            let needs_send = last_sent
                .as_ref()
                .is_none_or(|sent| sent.revision != newest)
                && too_large != Some(newest);
            tokio::select! {
                permit = self.sender.reserve(), if needs_send => {
                    let Ok(permit) = permit else { break "the node closed the stream" };
                    let current = config.borrow_and_update().clone();
                    sequence += 1;
                    let nonce = format!("{}-{sequence}", self.connection);
                    let update = build_update(
                        last_sent.as_deref(),
                        &current,
                        &self.audience,
                        nonce.clone(),
                    );
                    let size = prost::Message::encoded_len(&update);
                    if size > atoll_api::MAX_MESSAGE_BYTES {
                        let problem = format!(
                            "version {} is {} in one update, more than the config stream carries ({}); make the configuration smaller",
                            current.revision,
                            atoll_model::limits::human_bytes(size),
                            atoll_model::limits::human_bytes(atoll_api::MAX_MESSAGE_BYTES)
                        );
                        tracing::error!(node = %self.name, %problem, "update not sent");
                        self.service.nodes.problem(&self.name, self.connection, problem);
                        too_large = Some(current.revision);
                        drop(permit);
                        continue;
                    }
                    let kind = if update.snapshot { "snapshot" } else { "delta" };
                    self.service.metrics.updates_sent.get_or_create(&KindLabels { kind: kind.into() }).inc();
                    permit.send(Ok(update));
                    self.service.nodes.sent(&self.name, self.connection, current.revision);
                    outstanding.push_back((nonce, current.revision));
                    while outstanding.len() > MAX_OUTSTANDING {
                        outstanding.pop_front();
                    }
                    last_sent = Some(current);
                }
                changed = config.changed(), if !needs_send => {
                    too_large = None;
                    if changed.is_err() {
                        break "the control plane is stopping";
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    let _ = self.sender.try_send(Err(Status::deadline_exceeded(format!(
                        "nothing from this node for {}; reconnect",
                        humantime::format_duration(silence)
                    ))));
                    break "no heartbeat in time";
                }
                message = self.inbound.message() => match message {
                    Ok(Some(message)) => {
                        deadline = tokio::time::Instant::now() + silence;
                        self.on_message(message, &mut outstanding);
                    }
                    Ok(None) => break "the node closed the stream",
                    Err(status) => {
                        tracing::debug!(node = %self.name, %status, "stream error");
                        break "the stream failed";
                    }
                },
                _ = &mut self.kicked => {
                    let _ = self.sender.try_send(Err(Status::aborted(
                        "replaced by a newer stream with the same node name",
                    )));
                    break "a newer stream took its name";
                }
                _ = shutdown.changed() => {
                    let _ = self.sender.try_send(Err(Status::unavailable(
                        "the control plane is shutting down; reconnect",
                    )));
                    break "the control plane is shutting down";
                }
            }
        };
        tracing::info!(node = %self.name, reason = end, "node disconnected");
        self.service.nodes.disconnected(&self.name, self.connection);
    }

    fn on_message(&self, message: NodeMessage, outstanding: &mut VecDeque<(String, u64)>) {
        let (nonce, version, nack) = match message.message {
            Some(node_message::Message::Ack(ack)) => (ack.nonce, ack.version, None),
            Some(node_message::Message::Nack(nack)) => {
                (nack.nonce, nack.version, Some(nack.reason))
            }
            Some(node_message::Message::Heartbeat(heartbeat)) => {
                self.service
                    .nodes
                    .reported(&self.name, self.connection, heartbeat.applied_version);
                return;
            }
            Some(node_message::Message::Positions(positions)) => {
                self.service
                    .nodes
                    .positions(&self.name, self.connection, positions);
                return;
            }
            Some(node_message::Message::Hello(_)) | None => {
                tracing::warn!(node = %self.name, "ignoring a message that is neither ACK nor NACK");
                return;
            }
        };
        let Some(position) = outstanding.iter().position(|(n, _)| *n == nonce) else {
            tracing::warn!(node = %self.name, %nonce, version, "ignoring an answer to an unknown nonce");
            return;
        };
        let (_, sent_version) = outstanding[position];
        outstanding.drain(..=position);
        if sent_version != version {
            tracing::warn!(node = %self.name, %nonce, version, sent_version, "answer names another version than was sent; using the sent one");
        }
        match nack {
            None => {
                self.service.metrics.acks.inc();
                self.service
                    .nodes
                    .acked(&self.name, self.connection, sent_version);
            }
            Some(reason) => {
                self.service.metrics.nacks.inc();
                tracing::warn!(node = %self.name, version = sent_version, %reason, "node refused config");
                self.service
                    .nodes
                    .nacked(&self.name, self.connection, sent_version, reason);
            }
        }
    }
}

fn wire(resource: &crate::state::WireResource) -> Resource {
    Resource {
        kind: resource.key.kind.as_str().to_owned(),
        name: resource.key.name.clone(),
        resource_version: resource.resource_version,
        json: resource.json.clone(),
    }
}

/// Who receives a stream's updates: a node of a workspace, role and zone
/// (from its certificate when it has one). It receives what its work needs
/// and no more: the fleet's resources and its workspace's, without the
/// control plane's own records (Switchovers, which change what nodes run
/// only through the shard map) and without Apps (their commands and
/// environments) unless it is the agent of a zone the App runs in.
#[derive(Clone, Debug)]
pub(crate) struct Audience {
    pub(crate) workspace: String,
    pub(crate) role: String,
    pub(crate) zone: String,
}

impl Audience {
    /// Whether the node receives `key` as `state` has it (not at all when
    /// `state` has no such resource).
    fn receives(&self, state: &ConfigState, key: &atoll_model::ResourceKey) -> bool {
        let Some(resource) = state.resources.get(key) else {
            return false;
        };
        if key.kind == atoll_model::Kind::Switchover
            || !(key.workspace.is_empty() || key.workspace == self.workspace)
        {
            return false;
        }
        if key.kind != atoll_model::Kind::App {
            return true;
        }
        if self.role != "agent" || self.zone.is_empty() {
            return false;
        }
        let atoll_model::Spec::App(app) = &resource.resource.spec else {
            return false;
        };
        app.cells.iter().any(|cell| {
            let cell = atoll_model::ResourceKey {
                kind: atoll_model::Kind::Cell,
                workspace: key.workspace.clone(),
                name: cell.clone(),
            };
            state.resources.get(&cell).is_some_and(
                |r| matches!(&r.resource.spec, atoll_model::Spec::Cell(c) if c.zone == self.zone),
            )
        })
    }
}

/// A snapshot when nothing was sent yet, else the delta from `previous`,
/// of what `audience` receives. Every revision is sent, also one that
/// changed nothing the node receives: barriers count versions. A resource
/// the node stops receiving (an App whose cells left its zone) is removed
/// from it, one it starts receiving is sent whole.
pub(crate) fn build_update(
    previous: Option<&ConfigState>,
    current: &ConfigState,
    audience: &Audience,
    nonce: String,
) -> ConfigUpdate {
    match previous {
        None => ConfigUpdate {
            version: current.revision,
            nonce,
            snapshot: true,
            base_version: 0,
            resources: current
                .resources
                .values()
                .filter(|r| audience.receives(current, &r.key))
                .map(|r| wire(r))
                .collect(),
            removed: Vec::new(),
        },
        Some(previous) => {
            let resources = current
                .resources
                .iter()
                .filter(|(key, resource)| {
                    audience.receives(current, key)
                        && (!audience.receives(previous, key)
                            || previous.resources.get(*key).is_none_or(|old| {
                                old.resource_version != resource.resource_version
                            }))
                })
                .map(|(_, r)| wire(r))
                .collect();
            let removed = previous
                .resources
                .keys()
                .filter(|key| audience.receives(previous, key) && !audience.receives(current, key))
                .map(|key| ResourceKey {
                    kind: key.kind.as_str().to_owned(),
                    name: key.name.clone(),
                })
                .collect();
            ConfigUpdate {
                version: current.revision,
                nonce,
                snapshot: false,
                base_version: previous.revision,
                resources,
                removed,
            }
        }
    }
}

/// A control-plane error as a gRPC status a node can act on.
fn control_status(error: crate::writer::ControlError) -> Status {
    use crate::writer::ControlError;
    match error {
        ControlError::Invalid { message, issues } => Status::invalid_argument(format!(
            "{message}: {}",
            issues
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )),
        ControlError::BadRequest(m) => Status::invalid_argument(m),
        ControlError::Forbidden(m) => Status::permission_denied(m),
        ControlError::NotFound(m) => Status::not_found(m),
        ControlError::Conflict(m) => Status::aborted(m),
        ControlError::Unavailable(m) | ControlError::NotLeader(m) => Status::unavailable(m),
    }
}
