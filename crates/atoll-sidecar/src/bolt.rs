//! SOFA Bolt v1 on both sides of the sidecar.
//!
//! A Bolt connection multiplexes requests by id. Downstream, each request
//! is routed on its own (service from the `service` header, key from the
//! header map) and answered on the connection it came in on, in whatever
//! order answers arrive. Upstream, one connection per instance carries the
//! requests of every downstream connection, each under an id of its own;
//! the answer gets the caller's id back. Heartbeats are answered by the
//! sidecar. The class and content are never decoded.
//!
//! Refusals are Bolt responses the Java library raises as exceptions:
//! `SERVER_THREADPOOL_BUSY` for what may succeed when tried again (fenced,
//! no lease, not ready), `SERVER_EXCEPTION` otherwise, with the refusal's
//! code and sentence in the header map (`atoll-refusal`, `atoll-message`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use atoll_bolt::{Frame, Headers, Kind, Limits, status};
use atoll_model::ServiceKind;
use atoll_routing::{HeaderSource, RequestInfo};
use bytes::BytesMut;
use http::Method;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::State;
use crate::metrics::{CallLabels, DirectionLabels};

/// The header naming the service called (SOFARPC's).
pub(crate) const SERVICE: &str = "service";
/// The header SOFARPC names the target app with.
const TARGET_APP: &str = "sofa_head_target_app";
/// `read` marks a call that writes nothing (others are writes: the
/// fence and the write permit apply).
const ACCESS: &str = "atoll.access";

/// Bolt headers as routing reads them (names in any case).
struct BoltHeaders<'h>(&'h Headers);

impl HeaderSource for BoltHeaders<'_> {
    type Values<'s>
        = std::option::IntoIter<&'s [u8]>
    where
        Self: 's;

    fn values<'s>(&'s self, name: &str) -> Self::Values<'s> {
        self.0.get_ignore_case(name).map(str::as_bytes).into_iter()
    }
}

/// The key a Bolt call carries from its inbound request.
fn propagated(headers: &Headers) -> Option<&str> {
    headers
        .get_ignore_case("x-atoll-key")
        .or_else(|| headers.get_ignore_case("atoll.key"))
        .filter(|k| !k.is_empty())
}

fn refusal(request: &Frame, code: &str, message: &str) -> Frame {
    let retry = matches!(code, "shardFenced" | "noLease" | "notReady" | "noEndpoint");
    request.answer(
        if retry {
            status::SERVER_THREADPOOL_BUSY
        } else {
            status::SERVER_EXCEPTION
        },
        &Headers(vec![
            ("atoll-refusal".into(), code.into()),
            ("atoll-message".into(), message.into()),
            ("x-atoll-refused-by".into(), "sidecar".into()),
        ]),
    )
}

/// Serves Bolt connections on `listener` with `route` (outbound or
/// inbound) until `stop`; then each connection finishes the calls it has
/// in flight and is closed when idle between requests (Bolt has no
/// GOAWAY: a client reconnects for its next call).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    inbound: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tasks.spawn(connection(stream, BytesMut::with_capacity(8 * 1024), state.clone(), inbound, stop.clone()));
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// A Bolt connection handed to the sidecar that takes over (hot
/// upgrade): the socket, the bytes read from it but not yet decoded, and
/// which side it is.
#[derive(Debug)]
pub(crate) struct Handed {
    pub(crate) socket: std::os::fd::OwnedFd,
    pub(crate) buffered: bytes::Bytes,
    pub(crate) inbound: bool,
}

/// Serves a connection handed over by the sidecar this one replaced.
pub(crate) fn adopt(handed: Handed, state: Arc<State>, stop: watch::Receiver<bool>) {
    let std = std::net::TcpStream::from(handed.socket);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(stream) = TcpStream::from_std(std) else {
        return;
    };
    let buffered = BytesMut::from(&handed.buffered[..]);
    tokio::spawn(connection(stream, buffered, state, handed.inbound, stop));
}

async fn connection(
    stream: TcpStream,
    mut buf: BytesMut,
    state: Arc<State>,
    inbound: bool,
    mut stop: watch::Receiver<bool>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (answers, mut outgoing) = mpsc::channel::<Frame>(256);
    let in_flight = Arc::new(AtomicU32::new(0));
    // The writer comes back when the answers end (a handoff reunites the
    // socket); None when writing failed.
    let write_task = tokio::spawn(async move {
        let mut out = BytesMut::new();
        while let Some(frame) = outgoing.recv().await {
            out.clear();
            if frame.encode(&mut out).is_err() || writer.write_all(&out).await.is_err() {
                return None;
            }
        }
        Some(writer)
    });
    let limits = Limits::default();
    let mut stopping = false;
    loop {
        // Whole frames first (unless the connection is being handed over:
        // then what is buffered goes with it, undecoded).
        let handing = stopping && state.handoff.lock().is_some();
        if !handing {
            loop {
                let decoded = atoll_bolt::decode(&mut buf, &limits);
                match decoded {
                    Ok(Some(frame)) => {
                        if frame.kind == Kind::Response {
                            continue;
                        }
                        if frame.is_heartbeat() {
                            let _ = answers
                                .send(frame.answer(status::SUCCESS, &Headers::default()))
                                .await;
                            continue;
                        }
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        let state = state.clone();
                        let answers = answers.clone();
                        let in_flight = in_flight.clone();
                        tokio::spawn(async move {
                            let oneway = frame.kind == Kind::Oneway;
                            let answer = if inbound {
                                serve_inbound(&state, frame).await
                            } else {
                                route_outbound(&state, frame).await
                            };
                            if let (Some(answer), false) = (answer, oneway) {
                                let _ = answers.send(answer).await;
                            }
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, "closing a Bolt connection that sent bytes which are not Bolt v1");
                        return close(answers, write_task).await;
                    }
                }
            }
        }
        if handing && in_flight.load(Ordering::SeqCst) == 0 {
            // Nothing in flight: the answers are all queued; once written,
            // the socket goes to the new sidecar with what was read of
            // the next request. No call sees the change.
            return hand_over(reader, answers, write_task, buf, inbound, &state).await;
        }
        if stopping && !handing && buf.is_empty() && in_flight.load(Ordering::SeqCst) == 0 {
            // Idle between requests: closing now fails no call.
            return close(answers, write_task).await;
        }
        tokio::select! {
            read = reader.read_buf(&mut buf), if !handing => match read {
                Ok(0) | Err(_) => {
                    // The caller went: let what it sent finish.
                    while in_flight.load(Ordering::SeqCst) > 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    return close(answers, write_task).await;
                }
                Ok(_) => {}
            },
            () = async { let _ = stop.wait_for(|s| *s).await; }, if !stopping => {
                stopping = true;
            }
            () = tokio::time::sleep(Duration::from_millis(1)), if stopping => {}
        }
    }
}

async fn hand_over(
    reader: tokio::net::tcp::OwnedReadHalf,
    answers: mpsc::Sender<Frame>,
    write_task: tokio::task::JoinHandle<Option<tokio::net::tcp::OwnedWriteHalf>>,
    buf: BytesMut,
    inbound: bool,
    state: &State,
) {
    drop(answers);
    let Ok(Some(writer)) = write_task.await else {
        return;
    };
    let Ok(stream) = reader.reunite(writer) else {
        return;
    };
    let Ok(std) = stream.into_std() else {
        return;
    };
    let handed = Handed {
        socket: std.into(),
        buffered: buf.freeze(),
        inbound,
    };
    let sender = state.handoff.lock().clone();
    if let Some(sender) = sender {
        let _ = sender.send(handed);
    }
}

async fn close(
    answers: mpsc::Sender<Frame>,
    write_task: tokio::task::JoinHandle<Option<tokio::net::tcp::OwnedWriteHalf>>,
) {
    drop(answers);
    if let Ok(Some(mut writer)) = write_task.await {
        let _ = writer.shutdown().await;
    }
}

fn count(state: &State, direction: &'static str, service: &str, cell: &str, result: &str) {
    state
        .metrics
        .calls
        .get_or_create(&CallLabels {
            direction,
            service: service.to_owned(),
            cell: cell.to_owned(),
            result: result.to_owned(),
        })
        .inc();
}

fn refused(
    state: &State,
    direction: &'static str,
    service: &str,
    request: &Frame,
    code: &str,
    message: &str,
) -> Frame {
    state.metrics.refusal(direction, service, code);
    count(state, direction, service, "", &format!("refused {code}"));
    refusal(request, code, message)
}

/// The app's call to another service, sent to an instance of the owning
/// cell.
async fn route_outbound(state: &State, frame: Frame) -> Option<Frame> {
    let started = Instant::now();
    let answer = outbound(state, frame).await;
    state
        .metrics
        .seconds
        .get_or_create(&DirectionLabels {
            direction: "outbound",
        })
        .observe(started.elapsed().as_secs_f64());
    answer
}

async fn outbound(state: &State, mut frame: Frame) -> Option<Frame> {
    let Ok(mut headers) = frame.headers() else {
        return Some(refused(
            state,
            "outbound",
            "",
            &frame,
            "badHeader",
            "the header map does not parse",
        ));
    };
    let Some(view) = state.cell.view() else {
        return Some(refused(
            state,
            "outbound",
            "",
            &frame,
            "notReady",
            "the sidecar has no configuration from the control plane yet",
        ));
    };
    let table = &view.table;
    let named = [SERVICE, TARGET_APP]
        .iter()
        .filter_map(|h| headers.get_ignore_case(h))
        .map(|s| s.split(':').next().unwrap_or(s).to_owned())
        .find(|s| table.service_id(s).is_some());
    let Some(service) = named else {
        let message = format!(
            "name the Atoll Service you call in the `{SERVICE}` header (found `{}`)",
            headers.get_ignore_case(SERVICE).unwrap_or("")
        );
        return Some(refused(
            state,
            "outbound",
            "",
            &frame,
            "unknownService",
            &message,
        ));
    };
    let method = if headers
        .get_ignore_case(ACCESS)
        .is_some_and(|a| a.eq_ignore_ascii_case("read"))
    {
        Method::GET
    } else {
        Method::POST
    };
    let routed = state
        .router
        .route(
            table,
            view.cell,
            &atoll_mesh::Call {
                service: &service,
                method: &method,
                path: "/",
                query: None,
                headers: &BoltHeaders(&headers),
                propagated: propagated(&headers),
            },
        )
        .await;
    let routed = match routed {
        Ok(routed) => routed,
        Err(refusal) => {
            return Some(refused(
                state,
                "outbound",
                &service,
                &frame,
                refusal.code,
                &refusal.message,
            ));
        }
    };
    let cell = routed.cell_name.clone();
    let set = routed.set.clone();
    let (key, shard, epoch) = (routed.key.clone(), routed.shard, routed.epoch);
    if let Some(key) = &key {
        headers.set("x-atoll-key", key);
    }
    if let Some(shard) = shard {
        headers.set("x-atoll-shard", &shard.to_string());
    }
    if let Some(epoch) = epoch {
        headers.set("x-atoll-epoch", &epoch.to_string());
    }
    headers.set("x-atoll-cell", &cell);
    frame.header = headers.encode();
    let policy = routed.outlier.clone();
    let mut exclude: Option<String> = None;
    for attempt in 0..2 {
        let Some(member) = set.pick(exclude.as_deref()) else {
            break;
        };
        let upstream = member.upstream.clone();
        let pool = state.bolt.get(&upstream.address);
        let _in_flight = upstream.start();
        match pool
            .call(frame.clone(), state.options.connect_timeout)
            .await
        {
            Ok(answer) => {
                upstream.record(true, &policy, || true);
                count(
                    state,
                    "outbound",
                    &service,
                    &cell,
                    &format!("bolt {}", answer.as_ref().map_or(0, |a| a.status)),
                );
                return answer;
            }
            Err(failure) => {
                upstream.record(false, &policy, || true);
                // Nothing reached an instance it could not connect to.
                if failure.connect && attempt == 0 {
                    exclude = Some(upstream.address.clone());
                    continue;
                }
                let message = format!(
                    "instance `{}` of `{service}` in cell `{cell}`: {}",
                    member.instance.name, failure.what
                );
                return Some(refused(
                    state,
                    "outbound",
                    &service,
                    &frame,
                    "upstreamFailed",
                    &message,
                ));
            }
        }
    }
    Some(refused(
        state,
        "outbound",
        &service,
        &frame,
        "noEndpoint",
        &format!("no instance of `{service}` to call in cell `{cell}`"),
    ))
}

/// A call to the app, re-checked.
async fn serve_inbound(state: &State, frame: Frame) -> Option<Frame> {
    let started = Instant::now();
    let answer = inbound(state, frame).await;
    state
        .metrics
        .seconds
        .get_or_create(&DirectionLabels {
            direction: "inbound",
        })
        .observe(started.elapsed().as_secs_f64());
    answer
}

async fn inbound(state: &State, frame: Frame) -> Option<Frame> {
    let service = state.options.identity.service.clone();
    let Ok(headers) = frame.headers() else {
        return Some(refused(
            state,
            "inbound",
            &service,
            &frame,
            "badHeader",
            "the header map does not parse",
        ));
    };
    let Some(view) = state.cell.view() else {
        return Some(refused(
            state,
            "inbound",
            &service,
            &frame,
            "notReady",
            "this instance's sidecar has no shard map yet",
        ));
    };
    let table = &view.table;
    let mut permit = None;
    if table.kind(view.service) == Some(ServiceKind::Unitized) {
        let write = !headers
            .get_ignore_case(ACCESS)
            .is_some_and(|a| a.eq_ignore_ascii_case("read"));
        let method = if write { Method::POST } else { Method::GET };
        let source = BoltHeaders(&headers);
        let info = RequestInfo {
            method: &method,
            host: None,
            path: "/",
            query: None,
            headers: &source,
            body: None,
            forwarded: false,
        };
        let from_header = headers
            .get_ignore_case("x-atoll-shard")
            .and_then(|s| s.parse::<u32>().ok());
        let shard =
            match table.decide_call(view.service, &info, propagated(&headers), None, &|_| true) {
                Ok(call) => call.shard.or(from_header),
                Err(atoll_routing::Refusal::MissingKey { .. }) => from_header,
                Err(refusal) => {
                    let message = refusal.message(table);
                    return Some(refused(
                        state,
                        "inbound",
                        &service,
                        &frame,
                        refusal.code(),
                        &message,
                    ));
                }
            };
        let epoch = headers
            .get_ignore_case("x-atoll-epoch")
            .and_then(|e| e.parse::<u64>().ok());
        if let Some(shard) = shard {
            if write {
                match state.cell.admit_write(shard, epoch).await {
                    Ok(held) => permit = Some(held),
                    Err(why) => {
                        let code = why.code();
                        return Some(refused(
                            state,
                            "inbound",
                            &service,
                            &frame,
                            code,
                            &why.to_string(),
                        ));
                    }
                }
            } else if !view.owns(shard) {
                let message = format!(
                    "shard {shard} does not belong to cell {} (epoch {})",
                    state.options.identity.cell,
                    view.epoch()
                );
                return Some(refused(
                    state, "inbound", &service, &frame, "notOwner", &message,
                ));
            }
        }
    }
    let app = state.options.app.to_string();
    let pool = state.bolt.get(&app);
    let answer = match pool
        .call(frame.clone(), state.options.connect_timeout)
        .await
    {
        Ok(answer) => {
            count(
                state,
                "inbound",
                &service,
                &state.options.identity.cell,
                &format!("bolt {}", answer.as_ref().map_or(0, |a| a.status)),
            );
            answer
        }
        Err(failure) => Some(refused(
            state,
            "inbound",
            &service,
            &frame,
            "appUnavailable",
            &format!("the app at {app}: {}", failure.what),
        )),
    };
    // The permit is held until the answer is on its way back.
    drop(permit);
    answer
}

/// Why an upstream call failed.
#[derive(Debug)]
pub(crate) struct Failure {
    /// It never connected (nothing was sent).
    pub(crate) connect: bool,
    pub(crate) what: String,
}

/// One multiplexed connection per upstream address.
#[derive(Debug, Default)]
pub(crate) struct Pools {
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
}

impl Pools {
    pub(crate) fn get(&self, address: &str) -> Arc<Upstream> {
        self.upstreams
            .lock()
            .entry(address.to_owned())
            .or_insert_with(|| {
                Arc::new(Upstream {
                    address: address.to_owned(),
                    connection: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }
}

type Pending = Arc<Mutex<HashMap<u32, (u32, oneshot::Sender<Frame>)>>>;

/// A Bolt upstream: one connection, requests under ids of its own.
#[derive(Debug)]
pub(crate) struct Upstream {
    address: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

#[derive(Debug)]
struct Connection {
    writes: mpsc::Sender<Frame>,
    pending: Pending,
    next: AtomicU32,
    closed: watch::Receiver<bool>,
}

impl Upstream {
    async fn connection(&self, connect_timeout: Duration) -> Result<Arc<Connection>, Failure> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && !*connection.closed.borrow()
        {
            return Ok(connection.clone());
        }
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| Failure {
                connect: true,
                what: format!("no connection within {connect_timeout:?}"),
            })?
            .map_err(|e| Failure {
                connect: true,
                what: format!("cannot connect: {e}"),
            })?;
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (writes, mut queue) = mpsc::channel::<Frame>(1024);
        let pending: Pending = Arc::default();
        let (closing, closed) = watch::channel(false);
        let closing = Arc::new(closing);
        {
            let closing = closing.clone();
            tokio::spawn(async move {
                let mut out = BytesMut::new();
                while let Some(frame) = queue.recv().await {
                    out.clear();
                    if frame.encode(&mut out).is_err() || writer.write_all(&out).await.is_err() {
                        break;
                    }
                }
                closing.send_replace(true);
            });
        }
        {
            let pending = pending.clone();
            tokio::spawn(async move {
                let limits = Limits::default();
                let mut buf = BytesMut::with_capacity(8 * 1024);
                'read: loop {
                    loop {
                        match atoll_bolt::decode(&mut buf, &limits) {
                            Ok(Some(mut frame)) if frame.kind == Kind::Response => {
                                if let Some((original, waiter)) =
                                    pending.lock().remove(&frame.request_id)
                                {
                                    frame.request_id = original;
                                    let _ = waiter.send(frame);
                                }
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(_) => break 'read,
                        }
                    }
                    match reader.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closing.send_replace(true);
                // Every call still waiting fails (its sender drops).
                pending.lock().clear();
            });
        }
        let connection = Arc::new(Connection {
            writes,
            pending,
            next: AtomicU32::new(1),
            closed,
        });
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Sends `frame` and waits for its answer (none for a one-way call).
    pub(crate) async fn call(
        &self,
        mut frame: Frame,
        connect_timeout: Duration,
    ) -> Result<Option<Frame>, Failure> {
        let connection = self.connection(connect_timeout).await?;
        let original = frame.request_id;
        let id = connection.next.fetch_add(1, Ordering::Relaxed);
        frame.request_id = id;
        let oneway = frame.kind == Kind::Oneway;
        let timeout = Duration::from_millis(u64::from(frame.timeout_ms.max(1)).min(120_000))
            + Duration::from_millis(500);
        let receiver = if oneway {
            None
        } else {
            let (sender, receiver) = oneshot::channel();
            connection.pending.lock().insert(id, (original, sender));
            Some(receiver)
        };
        if connection.writes.send(frame).await.is_err() {
            connection.pending.lock().remove(&id);
            return Err(Failure {
                connect: false,
                what: "the connection closed".into(),
            });
        }
        let Some(receiver) = receiver else {
            return Ok(None);
        };
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(answer)) => Ok(Some(answer)),
            Ok(Err(_)) => Err(Failure {
                connect: false,
                what: "the connection closed before the answer".into(),
            }),
            Err(_) => {
                connection.pending.lock().remove(&id);
                Err(Failure {
                    connect: false,
                    what: format!("no answer within {timeout:?}"),
                })
            }
        }
    }
}
