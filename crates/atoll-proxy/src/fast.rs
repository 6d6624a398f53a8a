//! The HTTP/1.1 fast path for plain listeners: one task per client
//! connection reads request heads in place (httparse, no copies), routes,
//! writes the upstream head into a reused buffer, and relays bodies by their
//! framing, on upstream connections it borrows from a per-endpoint pool. No
//! per-request task, channel or header map.
//!
//! It serves the common case only. A connection whose request needs more
//! (HTTP/1.0, HTTP/2, absolute-form targets, `Expect`, upgrades, a key in the
//! body, mirroring, retries beyond connect failures, a fence hold) is handed
//! to hyper with the bytes already read, and hyper serves it from then on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atoll_model::RetryOn;
use atoll_routing::{Decision, HeaderSource, Refusal, RequestInfo, Via, host_without_port};
use bytes::{Buf, BytesMut};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::access_log::Entry;
use crate::chunked::ChunkedScanner;
use crate::headers::{
    MAX_CLIENT_HEADERS, MAX_PARSED_HEADERS, counted, is_atoll_member, too_many_headers,
};
use crate::{Proxy, Snapshot};

const MAX_HEAD: usize = 64 * 1024;
/// How long an idle keep-alive connection may wait for its next request.
const IDLE: Duration = Duration::from_secs(300);
/// How long a started request head may take to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How a connection left the fast path.
pub(crate) enum Exit {
    /// Closed (by either side, or after an error answer).
    Closed,
    /// Hyper should serve it from here, starting with these bytes.
    Handoff(TcpStream, BytesMut),
}

/// What to do after one request.
enum Next {
    KeepAlive,
    Close,
    Handoff,
}

/// The headers of a parsed head, as routing reads them.
struct Headers<'h, 'b>(&'h [httparse::Header<'b>]);

/// A header name kept inside the iterator (names are short; no allocation
/// up to 64 bytes).
enum Name {
    Inline([u8; 64], u8),
    Heap(String),
}

impl Name {
    fn new(name: &str) -> Self {
        if name.len() <= 64 {
            let mut bytes = [0u8; 64];
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            Name::Inline(bytes, name.len() as u8)
        } else {
            Name::Heap(name.to_owned())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Name::Inline(bytes, len) => &bytes[..usize::from(*len)],
            Name::Heap(text) => text.as_bytes(),
        }
    }
}

/// The values of one header.
pub(crate) struct Values<'h, 'b> {
    headers: std::slice::Iter<'h, httparse::Header<'b>>,
    name: Name,
}

impl<'h, 'b: 'h> Iterator for Values<'h, 'b> {
    type Item = &'h [u8];

    fn next(&mut self) -> Option<&'h [u8]> {
        let name = self.name.bytes();
        self.headers
            .by_ref()
            .find(|h| h.name.as_bytes().eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

impl<'b> HeaderSource for Headers<'_, 'b> {
    type Values<'s>
        = Values<'s, 'b>
    where
        Self: 's;

    fn values<'s>(&'s self, name: &str) -> Values<'s, 'b> {
        Values {
            headers: self.0.iter(),
            name: Name::new(name),
        }
    }
}

/// Facts about a request head needed after it is parsed.
struct Framing {
    content_length: Option<u64>,
    chunked: bool,
    close: bool,
}

/// Serves a plain connection until it closes or needs hyper.
pub(crate) async fn serve(
    proxy: &Arc<Proxy>,
    mut client: TcpStream,
    remote: SocketAddr,
    shutdown: &watch::Receiver<bool>,
) -> Exit {
    let mut buffer = BytesMut::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4 * 1024);
    let mut upstream_buffer = BytesMut::with_capacity(8 * 1024);
    // One timer and one shutdown watch per connection, not per request: the
    // timer is registered once and only moved when it fires early.
    let mut idle_since = Instant::now();
    let timer = tokio::time::sleep(IDLE);
    tokio::pin!(timer);
    let mut stop_receiver = shutdown.clone();
    let stop = async move {
        let _ = stop_receiver.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);
    loop {
        // Read until a whole head is buffered.
        let mut scanned = 0;
        let mut head_started: Option<Instant> = None;
        loop {
            if buffer.starts_with(b"PRI ") {
                return Exit::Handoff(client, buffer);
            }
            if find_head_end(&buffer, scanned).is_some() {
                break;
            }
            scanned = buffer.len().saturating_sub(2);
            if buffer.len() > MAX_HEAD {
                let _ = respond(
                    &mut client,
                    &mut out,
                    431,
                    "headersTooLarge",
                    "the request head is larger than 64 KiB",
                    &[],
                    true,
                )
                .await;
                return Exit::Closed;
            }
            if buffer.capacity() - buffer.len() < 1024 {
                buffer.reserve(8 * 1024);
            }
            let deadline = match head_started {
                None if buffer.is_empty() => idle_since + IDLE,
                None => {
                    // A head has begun: it has HEAD_TIMEOUT to arrive whole.
                    let started = Instant::now();
                    head_started = Some(started);
                    let deadline = started + HEAD_TIMEOUT;
                    if timer.deadline().into_std() > deadline {
                        timer.as_mut().reset(deadline.into());
                    }
                    deadline
                }
                Some(started) => started + HEAD_TIMEOUT,
            };
            tokio::select! {
                biased;
                read = client.read_buf(&mut buffer) => match read {
                    Ok(0) | Err(_) => return Exit::Closed,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if now < deadline {
                        timer.as_mut().reset(deadline.into());
                        continue;
                    }
                    if !buffer.is_empty() {
                        let _ = respond(&mut client, &mut out, 408, "requestTimeout", "the request head did not arrive in time", &[], true).await;
                    }
                    return Exit::Closed;
                }
                () = &mut stop, if buffer.is_empty() => return Exit::Closed,
            }
        }
        let started = Instant::now();
        match one(
            proxy,
            &mut client,
            &mut buffer,
            &mut out,
            &mut upstream_buffer,
            remote,
            started,
        )
        .await
        {
            Next::KeepAlive => {
                if *shutdown.borrow() {
                    return Exit::Closed;
                }
                // Idle time starts when the request is done, however long it took.
                idle_since = Instant::now();
            }
            Next::Close => return Exit::Closed,
            Next::Handoff => return Exit::Handoff(client, buffer),
        }
    }
}

/// The end of the head in `buffer`, searching from `from`: the first empty
/// line. Lines end in CRLF or, as RFC 9112 §2.2 lets a recipient accept
/// and hyper (which serves the other paths) does, a bare LF: a head that
/// ends in `\n\n` is answered like one that ends in `\r\n\r\n`. The
/// head the upstream gets is written anew with CRLF, so the two cannot be
/// read differently downstream.
fn find_head_end(buffer: &[u8], from: usize) -> Option<usize> {
    for at in memchr::memchr_iter(b'\n', &buffer[from..]) {
        let at = from + at;
        match buffer.get(at + 1..at + 3) {
            Some([b'\n', _]) => return Some(at + 2),
            Some(b"\r\n") => return Some(at + 3),
            None if buffer.get(at + 1) == Some(&b'\n') => return Some(at + 2),
            _ => {}
        }
    }
    None
}

fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// Writes a JSON answer of the proxy's own.
async fn respond(
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    status: u16,
    code: &str,
    message: &str,
    extra: &[(&str, serde_json::Value)],
    close: bool,
) -> std::io::Result<()> {
    let mut body = serde_json::Map::new();
    body.insert("error".into(), code.into());
    body.insert("message".into(), message.into());
    for (key, value) in extra {
        body.insert((*key).into(), value.clone());
    }
    let mut text = serde_json::to_vec(&body).unwrap_or_default();
    text.push(b'\n');
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(text.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if status == 503 {
        out.extend_from_slice(b"retry-after: 1\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&text);
    client.write_all(out).await
}

/// Parses, routes and relays one request whose head is in `buffer`.
async fn one(
    proxy: &Arc<Proxy>,
    client: &mut TcpStream,
    buffer: &mut BytesMut,
    out: &mut Vec<u8>,
    upstream_buffer: &mut BytesMut,
    remote: SocketAddr,
    started: Instant,
) -> Next {
    let Some(snapshot) = proxy.snapshot() else {
        let _ = respond(
            client,
            out,
            503,
            "notReady",
            "this node has no configuration yet",
            &[],
            true,
        )
        .await;
        return Next::Close;
    };

    // Parse and decide while the head borrows the buffer; keep owned facts.
    let mut headers = [httparse::EMPTY_HEADER; MAX_PARSED_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buffer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Next::Handoff,
        Err(httparse::Error::TooManyHeaders) => {
            snapshot.metrics.refused("headersTooLarge").inc();
            let _ = respond(
                client,
                out,
                431,
                "headersTooLarge",
                &format!("the request has more than {MAX_PARSED_HEADERS} header lines"),
                &[],
                true,
            )
            .await;
            return Next::Close;
        }
        Err(error) => {
            let _ = respond(
                client,
                out,
                400,
                "badRequest",
                &format!("malformed request: {error}"),
                &[],
                true,
            )
            .await;
            return Next::Close;
        }
    };
    let (Some(method_text), Some(target), Some(1)) =
        (request.method, request.path, request.version)
    else {
        return Next::Handoff;
    };
    if !target.starts_with('/') {
        return Next::Handoff;
    }
    let Ok(method) = Method::from_bytes(method_text.as_bytes()) else {
        let _ = respond(
            client,
            out,
            400,
            "badRequest",
            "malformed method",
            &[],
            true,
        )
        .await;
        return Next::Close;
    };
    let head = Headers(request.headers);
    let client_headers = head.0.iter().filter(|h| counted(h.name.as_bytes())).count();
    if client_headers > MAX_CLIENT_HEADERS {
        snapshot.metrics.refused("headersTooLarge").inc();
        let _ = respond(
            client,
            out,
            431,
            "headersTooLarge",
            &too_many_headers(client_headers),
            &[],
            true,
        )
        .await;
        return Next::Close;
    }
    let framing = match framing(&head) {
        Ok(Some(framing)) => framing,
        Ok(None) => return Next::Handoff,
        Err(message) => {
            let _ = respond(client, out, 400, "badRequest", message, &[], true).await;
            return Next::Close;
        }
    };
    let has_body = framing.chunked || framing.content_length.is_some_and(|n| n > 0);
    let Some(host_value) = head
        .values("host")
        .next()
        .and_then(|h| std::str::from_utf8(h).ok())
    else {
        let _ = respond(
            client,
            out,
            400,
            "badRequest",
            "HTTP/1.1 requests need a Host header",
            &[],
            true,
        )
        .await;
        return Next::Close;
    };
    let host = host_without_port(host_value);
    let (raw_path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    // Routes see, and the upstream gets, the path in one form.
    let path = match atoll_routing::normalize_path(raw_path) {
        Ok(path) => path,
        Err(error) => {
            snapshot.metrics.refused("badPath").inc();
            let close = has_body || framing.close;
            let _ = respond(client, out, 400, "badPath", &error.to_string(), &[], close).await;
            log(
                proxy,
                &method,
                host,
                target,
                remote,
                started,
                400,
                None,
                Some("badPath"),
            );
            if close {
                return Next::Close;
            }
            buffer.advance(head_len);
            return Next::KeepAlive;
        }
    };
    let path = path.as_ref();
    let forwarded = head.values("x-atoll-hop").next().is_some();
    let trusted_hop = snapshot.trusted_hop(forwarded, remote.ip());
    let info = RequestInfo {
        method: &method,
        host: Some(host),
        path,
        query,
        headers: &head,
        body: None,
        forwarded,
    };
    let table = &snapshot.table;
    let Some(route_id) = table.match_route(&info) else {
        snapshot.metrics.refused("noRoute").inc();
        let _ = respond(
            client,
            out,
            404,
            "noRoute",
            "no route matches this request",
            &[],
            has_body || framing.close,
        )
        .await;
        log(
            proxy,
            &method,
            host,
            target,
            remote,
            started,
            404,
            None,
            Some("noRoute"),
        );
        if has_body || framing.close {
            return Next::Close;
        }
        buffer.advance(head_len);
        return Next::KeepAlive;
    };
    let route = &table.routes[route_id as usize];
    if table.needs_body(route_id)
        || table.has_mirror(route_id)
        || route.retry_on.iter().any(|r| *r != RetryOn::ConnectFailure)
    {
        return Next::Handoff;
    }
    let target_decision = match table.decide(route_id, &info, &*snapshot) {
        Decision::Upstream(target) => target,
        Decision::Refuse(Refusal::Fenced { .. }) if !table.write_fence_hold.is_zero() => {
            return Next::Handoff;
        }
        Decision::Refuse(refusal) => {
            let close = has_body || framing.close;
            refuse(&snapshot, client, out, &refusal, close).await;
            log(
                proxy,
                &method,
                host,
                target,
                remote,
                started,
                refusal.status(),
                None,
                Some(refusal.code()),
            );
            if close {
                return Next::Close;
            }
            buffer.advance(head_len);
            return Next::KeepAlive;
        }
    };

    // A gateway reached over mutual TLS: the hyper path has the TLS
    // clients (forwarded requests are the exception, not the fast case).
    if snapshot.over_peer_tls(target_decision.endpoint) {
        return Next::Handoff;
    }

    // Write the upstream head.
    let cell = &table.cells[usize::from(target_decision.cell)];
    out.clear();
    out.extend_from_slice(method_text.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    if let Some(query) = query {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for = None;
    let mut forwarded_for_count = 0;
    let mut forwarded_proto: Option<&[u8]> = None;
    let mut client_baggage = false;
    for header in head.0 {
        let name = header.name;
        match classify(name) {
            Kind::Connection | Kind::HopByHop | Kind::Special | Kind::Internal => continue,
            Kind::ForwardedFor => {
                // Several X-Forwarded-For headers form one list.
                forwarded_for_count += 1;
                if forwarded_for_count == 1 {
                    forwarded_for = Some(header.value);
                }
                continue;
            }
            Kind::Baggage => {
                // Merged into the one baggage header written below.
                client_baggage = true;
                continue;
            }
            Kind::ForwardedProto => {
                // Only another gateway's word on the protocol counts.
                if trusted_hop && forwarded_proto.is_none() {
                    forwarded_proto = Some(header.value);
                }
                continue;
            }
            Kind::Other | Kind::ContentLength | Kind::TransferEncoding | Kind::Host => {}
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if forwarded_for_count > 1 {
        for value in head.values("x-forwarded-for") {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    } else if let Some(previous) = forwarded_for {
        out.extend_from_slice(previous);
        out.extend_from_slice(b", ");
    }
    write_ip(out, remote.ip());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b"x-forwarded-proto: ");
    out.extend_from_slice(forwarded_proto.unwrap_or(b"http"));
    out.extend_from_slice(b"\r\n");
    let shard = target_decision.shard;
    let epoch = shard.and_then(|_| table.epoch(target_decision.service));
    if let Some(key) = target_decision
        .key
        .as_ref()
        .filter(|k| !k.bytes().any(|b| b < 0x20 || b == 0x7f))
    {
        out.extend_from_slice(b"x-atoll-key: ");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(shard) = shard {
        out.extend_from_slice(b"x-atoll-shard: ");
        out.extend_from_slice(itoa::Buffer::new().format(shard).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-atoll-cell: ");
    out.extend_from_slice(cell.name.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(epoch) = epoch {
        out.extend_from_slice(b"x-atoll-epoch: ");
        out.extend_from_slice(itoa::Buffer::new().format(epoch).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"baggage: ");
    if let Some(key) = &target_decision.key {
        out.extend_from_slice(b"atoll.key=");
        for part in percent_encoding::utf8_percent_encode(key, BAGGAGE_SAFE) {
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b',');
    }
    if let Some(shard) = shard {
        out.extend_from_slice(b"atoll.shard=");
        out.extend_from_slice(itoa::Buffer::new().format(shard).as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"atoll.cell=");
    out.extend_from_slice(cell.name.as_bytes());
    if let Some(epoch) = epoch {
        out.extend_from_slice(b",atoll.epoch=");
        out.extend_from_slice(itoa::Buffer::new().format(epoch).as_bytes());
    }
    if client_baggage {
        for value in head.values("baggage") {
            write_members_without_atoll(out, value);
        }
    }
    out.extend_from_slice(b"\r\n");
    if target_decision.via == Via::Gateway {
        out.extend_from_slice(b"x-atoll-hop: 1\r\n");
        snapshot.metrics.misroutes[usize::from(target_decision.cell)].inc();
    }
    out.extend_from_slice(b"\r\n");

    // Facts the rest needs, then let go of the parsed head.
    let routed = Routed {
        route: target_decision.route,
        service: target_decision.service,
        cell: target_decision.cell,
        endpoint: target_decision.endpoint,
        via: target_decision.via,
        subset: target_decision.subset,
        shard,
        write: target_decision.write,
    };
    let idempotent = matches!(
        method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let head_request = method == Method::HEAD;
    // Only the access log needs these after the head is released.
    let names = proxy
        .access_log
        .is_some()
        .then(|| (target.to_owned(), host.to_owned()));
    buffer.advance(head_len);

    let outcome = relay(
        proxy,
        &snapshot,
        client,
        buffer,
        out,
        upstream_buffer,
        &routed,
        &framing,
        idempotent,
        head_request,
        started,
    )
    .await;
    let (status, upstream, error, next) = outcome;
    if let Some((target, host)) = &names {
        log(
            proxy,
            &method,
            host,
            target,
            remote,
            started,
            status,
            Some((&snapshot, &routed, upstream)),
            error,
        );
    }
    if framing.close { Next::Close } else { next }
}

/// The routing outcome, owned.
struct Routed {
    route: u32,
    service: u32,
    cell: u16,
    endpoint: u32,
    via: Via,
    subset: Option<u16>,
    shard: Option<u32>,
    write: bool,
}

const BAGGAGE_SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What a header name means to the proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Other,
    ContentLength,
    TransferEncoding,
    Connection,
    /// Hop-by-hop headers dropped when forwarding (besides `Connection`).
    HopByHop,
    /// Makes a request hyper's (`Expect`, `Upgrade`).
    Special,
    Internal,
    ForwardedFor,
    ForwardedProto,
    Baggage,
    Host,
}

/// Classifies a header name by its length first: most names are compared
/// once, if at all.
fn classify(name: &str) -> Kind {
    let is = |expected: &str| name.eq_ignore_ascii_case(expected);
    match name.len() {
        2 if is("te") => Kind::HopByHop,
        4 if is("host") => Kind::Host,
        6 if is("expect") => Kind::Special,
        7 if is("upgrade") => Kind::Special,
        7 if is("trailer") => Kind::HopByHop,
        7 if is("baggage") => Kind::Baggage,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::HopByHop,
        14 if is("content-length") => Kind::ContentLength,
        15 if is("x-forwarded-for") => Kind::ForwardedFor,
        16 if is("proxy-connection") => Kind::HopByHop,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        17 if is("x-forwarded-proto") => Kind::ForwardedProto,
        _ if starts_with_ignore_case(name, "x-atoll-") => Kind::Internal,
        _ => Kind::Other,
    }
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.len() >= prefix.len()
        && text.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(*octet).as_bytes());
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends the members of a client `baggage` header, except Atoll's own
/// (`atoll.*` in any case), each after a comma.
fn write_members_without_atoll(out: &mut Vec<u8>, value: &[u8]) {
    let Ok(text) = std::str::from_utf8(value) else {
        return;
    };
    for member in text.split(',') {
        let trimmed = member.trim();
        if trimmed.is_empty() || is_atoll_member(trimmed) {
            continue;
        }
        out.push(b',');
        out.extend_from_slice(trimmed.as_bytes());
    }
}

/// Reads the framing headers. `Ok(None)`: hyper should take the request.
fn framing(head: &Headers<'_, '_>) -> Result<Option<Framing>, &'static str> {
    let mut content_length = None;
    let mut chunked = false;
    let mut close = false;
    let mut hosts = 0;
    for header in head.0 {
        match classify(header.name) {
            Kind::Host => {
                hosts += 1;
                if hosts > 1 {
                    return Err("a request has one Host header, not several");
                }
            }
            Kind::ContentLength => {
                let value =
                    parse_length(header.value).ok_or("malformed Content-Length: digits only")?;
                if content_length.is_some_and(|v| v != value) {
                    return Err("conflicting Content-Length headers");
                }
                content_length = Some(value);
            }
            Kind::TransferEncoding => {
                if !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") || chunked {
                    // Other codings, or chunked twice: let hyper judge.
                    return Ok(None);
                }
                chunked = true;
            }
            Kind::Connection => {
                for token in header.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        // Upgrade, or headers named hop-by-hop: hyper's path.
                        return Ok(None);
                    }
                }
            }
            Kind::Special => return Ok(None),
            _ => {}
        }
    }
    if chunked && content_length.is_some() {
        return Err("a request cannot have both Content-Length and Transfer-Encoding");
    }
    Ok(Some(Framing {
        content_length,
        chunked,
        close,
    }))
}

async fn refuse(
    snapshot: &Snapshot,
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    refusal: &Refusal,
    close: bool,
) {
    let facts = snapshot.refusal_facts(refusal);
    let _ = respond(
        client,
        out,
        refusal.status(),
        refusal.code(),
        &refusal.message(&snapshot.table),
        &facts,
        close,
    )
    .await;
}

/// Why a try failed.
enum Failure {
    /// A pooled connection turned out closed before anything was answered:
    /// the request can go again on a fresh connection.
    Stale,
    /// The upstream failed. `answered`: response bytes already reached the
    /// client, so nothing more can be said to it.
    Upstream {
        status: u16,
        code: &'static str,
        message: String,
        answered: bool,
    },
    /// The client failed: went away, stalled, or sent a malformed body. Not
    /// held against the upstream.
    Client {
        status: Option<u16>,
        message: String,
    },
}

/// How long a body may pause, either way, before the exchange is abandoned.
const BODY_IDLE: Duration = Duration::from_secs(60);

type RelayOutcome = (u16, Option<usize>, Option<&'static str>, Next);

/// Sends the request (head in `out`, body from the client) upstream and the
/// response back. Returns (status, upstream index, error code, next).
#[expect(clippy::too_many_arguments, reason = "one request's state")]
async fn relay(
    proxy: &Proxy,
    snapshot: &Snapshot,
    client: &mut TcpStream,
    buffer: &mut BytesMut,
    out: &mut Vec<u8>,
    upstream_buffer: &mut BytesMut,
    routed: &Routed,
    framing: &Framing,
    idempotent: bool,
    head_request: bool,
    started: Instant,
) -> RelayOutcome {
    let table = &snapshot.table;
    let route = &table.routes[routed.route as usize];
    let cell = &table.cells[usize::from(routed.cell)];
    let outlier = &table.services[routed.service as usize].outlier_detection;
    let observe = |status: u16| {
        snapshot
            .metrics
            .path(routed.route, routed.cell)
            .observe(status, started.elapsed().as_secs_f64());
    };
    // Whether the whole body is already buffered (then it can be sent again);
    // a malformed chunked body is refused before any upstream is involved.
    let body_in_buffer = match (framing.chunked, framing.content_length) {
        (false, None) | (false, Some(0)) => true,
        (false, Some(n)) => buffer.len() as u64 >= n,
        (true, _) => {
            match ChunkedScanner::request().scan(buffer) {
                Ok(found) => found.is_some(),
                Err(_) => {
                    snapshot.metrics.client_error(Some(400));
                    let _ = respond(client, out, 400, "badRequest", "malformed chunked request body (or request trailers, which are not accepted)", &[], true).await;
                    return (400, None, Some("badRequest"), Next::Close);
                }
            }
        }
    };
    let has_body = framing.chunked || framing.content_length.is_some_and(|n| n > 0);
    let connect_retries = if route.retry_on.contains(&RetryOn::ConnectFailure) && body_in_buffer {
        route.retries
    } else {
        0
    };
    let deadline = route.timeout.map(|t| started + t);
    let mut endpoint = routed.endpoint;
    let mut attempts_left = connect_retries + 1;
    let mut stale_retry = body_in_buffer && (idempotent || !has_body);
    let target = atoll_routing::Target {
        route: routed.route,
        service: routed.service,
        cell: routed.cell,
        endpoint,
        via: routed.via,
        write: routed.write,
        key: None,
        shard: routed.shard,
        subset: routed.subset,
    };
    loop {
        let upstream = &snapshot.upstreams[endpoint as usize];
        let in_flight = upstream.start_borrowed();
        let (mut stream, fresh) =
            match upstream.checkout(proxy.settings.upstream_idle_timeout, started) {
                Some(stream) => (stream, false),
                None => match upstream.connect(proxy.settings.connect_timeout).await {
                    Ok(stream) => (stream, true),
                    Err(error) => {
                        snapshot.metrics.upstream_connect.inc();
                        if upstream.record(false, outlier, || {
                            snapshot.may_eject(routed.service, routed.cell, endpoint)
                        }) {
                            proxy.metrics.ejections.inc();
                        }
                        drop(in_flight);
                        attempts_left -= 1;
                        // Never to a gateway's peer listener: that one speaks
                        // mutual TLS, which the hyper path does.
                        if attempts_left > 0
                            && let Some(next) = table.retry_endpoint(&target, endpoint, snapshot)
                            && !snapshot.over_peer_tls(next)
                        {
                            proxy.metrics.retries.inc();
                            endpoint = next;
                            continue;
                        }
                        let message = format!(
                            "upstream {} (cell {}) failed: {error}",
                            upstream.address, cell.name
                        );
                        let close = !body_in_buffer || framing.close;
                        let _ = respond(
                            client,
                            out,
                            502,
                            "upstreamUnavailable",
                            &message,
                            &[("cell", cell.name.clone().into())],
                            close,
                        )
                        .await;
                        observe(502);
                        let next = if close {
                            Next::Close
                        } else {
                            consume_body(buffer, framing)
                        };
                        return (502, None, Some("upstreamUnavailable"), next);
                    }
                },
            };
        // The route's time limits cover sending the request and receiving
        // the response head; the body then streams with an idle limit only.
        let limit = match (route.per_try_timeout, deadline) {
            (Some(per_try), Some(deadline)) => {
                Some(per_try.min(deadline.saturating_duration_since(Instant::now())))
            }
            (Some(per_try), None) => Some(per_try),
            (None, Some(deadline)) => Some(deadline.saturating_duration_since(Instant::now())),
            (None, None) => None,
        };
        // Set while the exchange waits for the client's body: a time limit
        // that runs out then is the client's fault, not the upstream's.
        let waiting_for_client = AtomicBool::new(false);
        let sent = send(
            client,
            &mut stream,
            buffer,
            out,
            upstream_buffer,
            framing,
            head_request,
            fresh,
            &waiting_for_client,
        );
        let head = match limit {
            Some(limit) => match tokio::time::timeout(limit, sent).await {
                Ok(result) => result,
                Err(_) if waiting_for_client.load(Ordering::Relaxed) => Err(Failure::Client {
                    status: Some(408),
                    message: format!(
                        "the request body did not arrive within the route's {} limit",
                        format_duration(limit)
                    ),
                }),
                Err(_) => Err(Failure::Upstream {
                    status: 504,
                    code: "upstreamTimeout",
                    message: format!(
                        "upstream {} (cell {}) did not answer within {}",
                        upstream.address,
                        cell.name,
                        format_duration(limit)
                    ),
                    answered: false,
                }),
            },
            None => sent.await,
        };
        let result = match head {
            Ok(head) => answer_body(client, &mut stream, out, upstream_buffer, head).await,
            Err(failure) => Err(failure),
        };
        match result {
            Ok(done) => {
                let failed = done.status >= 500;
                if upstream.record(!failed, outlier, || {
                    snapshot.may_eject(routed.service, routed.cell, endpoint)
                }) {
                    proxy.metrics.ejections.inc();
                }
                if failed {
                    snapshot.metrics.upstream_status.inc();
                }
                if done.reusable {
                    upstream.checkin(stream, started);
                }
                drop(in_flight);
                observe(done.status);
                let next = if done.client_close {
                    Next::Close
                } else {
                    Next::KeepAlive
                };
                return (done.status, Some(endpoint as usize), None, next);
            }
            Err(Failure::Stale) if stale_retry => {
                // The pooled connection had been closed by the upstream and
                // nothing was answered: send the request on a fresh one.
                stale_retry = false;
                drop(in_flight);
                continue;
            }
            Err(Failure::Stale) => {
                drop(in_flight);
                snapshot.metrics.upstream_reset.inc();
                let message = format!(
                    "upstream {} (cell {}) closed the connection before answering",
                    upstream.address, cell.name
                );
                let _ = respond(
                    client,
                    out,
                    502,
                    "upstreamUnavailable",
                    &message,
                    &[("cell", cell.name.clone().into())],
                    true,
                )
                .await;
                observe(502);
                return (
                    502,
                    Some(endpoint as usize),
                    Some("upstreamUnavailable"),
                    Next::Close,
                );
            }
            Err(Failure::Upstream {
                status,
                code,
                message,
                answered,
            }) => {
                drop(in_flight);
                if upstream.record(false, outlier, || {
                    snapshot.may_eject(routed.service, routed.cell, endpoint)
                }) {
                    proxy.metrics.ejections.inc();
                }
                if code == "upstreamTimeout" {
                    snapshot.metrics.upstream_timeout.inc();
                } else {
                    snapshot.metrics.upstream_reset.inc();
                }
                if !answered {
                    let _ = respond(
                        client,
                        out,
                        status,
                        code,
                        &message,
                        &[("cell", cell.name.clone().into())],
                        true,
                    )
                    .await;
                }
                observe(status);
                return (status, Some(endpoint as usize), Some(code), Next::Close);
            }
            Err(Failure::Client { status, message }) => {
                // The upstream connection is mid-request: dropped, not
                // pooled, and nothing is held against the upstream.
                drop(in_flight);
                snapshot.metrics.client_error(status);
                if let Some(status) = status {
                    let code = if status == 408 {
                        "requestTimeout"
                    } else {
                        "badRequest"
                    };
                    let _ = respond(client, out, status, code, &message, &[], true).await;
                }
                return (
                    status.unwrap_or(499),
                    Some(endpoint as usize),
                    Some("clientError"),
                    Next::Close,
                );
            }
        }
    }
}

fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Drops a body that is fully buffered, so the connection can go on.
fn consume_body(buffer: &mut BytesMut, framing: &Framing) -> Next {
    match (framing.chunked, framing.content_length) {
        (false, None) => Next::KeepAlive,
        (false, Some(n)) if buffer.len() as u64 >= n => {
            buffer.advance(n as usize);
            Next::KeepAlive
        }
        (true, _) => match ChunkedScanner::request().scan(buffer) {
            Ok(Some(n)) => {
                buffer.advance(n);
                Next::KeepAlive
            }
            _ => Next::Close,
        },
        _ => Next::Close,
    }
}

/// A response head received from the upstream and written into `out` for
/// the client, with how its body is framed.
struct Head {
    status: u16,
    no_body: bool,
    chunked: bool,
    length: Option<u64>,
    close_delimited: bool,
    upstream_close: bool,
}

/// A completed exchange.
struct Done {
    status: u16,
    reusable: bool,
    client_close: bool,
}

fn upstream_failure(message: impl Into<String>) -> Failure {
    Failure::Upstream {
        status: 502,
        code: "upstreamUnavailable",
        message: message.into(),
        answered: false,
    }
}

fn bad_response(message: &str) -> Failure {
    Failure::Upstream {
        status: 502,
        code: "badResponse",
        message: format!("the upstream's response is not valid: {message}"),
        answered: false,
    }
}

/// Sends the request (head in `out`, body from `buffer` and the client) and
/// reads the response head. Informational (1xx) responses are passed on.
#[expect(clippy::too_many_arguments, reason = "one exchange's state")]
async fn send(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer: &mut BytesMut,
    out: &mut Vec<u8>,
    upstream_buffer: &mut BytesMut,
    framing: &Framing,
    head_request: bool,
    fresh: bool,
    waiting_for_client: &AtomicBool,
) -> Result<Head, Failure> {
    let closed = |fresh: bool, error: &dyn std::fmt::Display| {
        if fresh {
            upstream_failure(format!("sending the request: {error}"))
        } else {
            Failure::Stale
        }
    };
    // The head and the body bytes already buffered, in one write. The
    // buffer is only consumed once the write succeeded, so that a retry on a
    // fresh connection can send the same bytes.
    let head_len = out.len();
    let mut chunked = ChunkedScanner::request();
    let mut body_left: u64 = framing.content_length.unwrap_or(0);
    let mut body_done = !framing.chunked && body_left == 0;
    let mut taken = 0;
    if !body_done {
        if framing.chunked {
            match chunked.scan(buffer) {
                Ok(Some(n)) => {
                    taken = n;
                    body_done = true;
                }
                Ok(None) => taken = buffer.len(),
                Err(_) => {
                    return Err(Failure::Client {
                        status: Some(400),
                        message: "malformed chunked request body".into(),
                    });
                }
            }
        } else {
            taken = (buffer.len() as u64).min(body_left) as usize;
            body_left -= taken as u64;
            body_done = body_left == 0;
        }
        out.extend_from_slice(&buffer[..taken]);
    }
    let written = upstream.write_all(out).await;
    out.truncate(head_len);
    if let Err(error) = written {
        return Err(closed(fresh, &error));
    }
    buffer.advance(taken);

    // The rest of the body, as it arrives.
    let mut streamed = false;
    while !body_done {
        streamed = true;
        buffer.clear();
        waiting_for_client.store(true, Ordering::Relaxed);
        let read = tokio::time::timeout(BODY_IDLE, client.read_buf(buffer)).await;
        waiting_for_client.store(false, Ordering::Relaxed);
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Err(Failure::Client {
                    status: None,
                    message: "the client went away mid-body".into(),
                });
            }
            Err(_) => {
                return Err(Failure::Client {
                    status: Some(408),
                    message: "the request body stalled".into(),
                });
            }
            Ok(Ok(_)) => {}
        }
        let n = if framing.chunked {
            match chunked.scan(buffer) {
                Ok(Some(n)) => {
                    body_done = true;
                    n
                }
                Ok(None) => buffer.len(),
                Err(_) => {
                    return Err(Failure::Client {
                        status: Some(400),
                        message: "malformed chunked request body".into(),
                    });
                }
            }
        } else {
            let n = (buffer.len() as u64).min(body_left) as usize;
            body_left -= n as u64;
            body_done = body_left == 0;
            n
        };
        match tokio::time::timeout(BODY_IDLE, upstream.write_all(&buffer[..n])).await {
            Ok(Ok(())) => {}
            _ => {
                return Err(upstream_failure(
                    "the upstream stopped taking the request body",
                ));
            }
        }
        buffer.advance(n);
    }

    // The response head.
    upstream_buffer.clear();
    let mut informational_sent = false;
    loop {
        while find_head_end(upstream_buffer, 0).is_none() {
            if upstream_buffer.len() > MAX_HEAD {
                return Err(bad_response("its head is larger than 64 KiB"));
            }
            if upstream_buffer.capacity() - upstream_buffer.len() < 1024 {
                upstream_buffer.reserve(8 * 1024);
            }
            let nothing_yet = upstream_buffer.is_empty() && !streamed && !informational_sent;
            match upstream.read_buf(upstream_buffer).await {
                Ok(0) if nothing_yet => return Err(closed(fresh, &"connection closed")),
                Err(error) if nothing_yet => return Err(closed(fresh, &error)),
                Ok(0) => {
                    return Err(Failure::Upstream {
                        status: 502,
                        code: "upstreamReset",
                        message: "the upstream closed the connection before answering".into(),
                        answered: informational_sent,
                    });
                }
                Err(error) => {
                    return Err(Failure::Upstream {
                        status: 502,
                        code: "upstreamReset",
                        message: format!("reading the response: {error}"),
                        answered: informational_sent,
                    });
                }
                Ok(_) => {}
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_PARSED_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(upstream_buffer) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => return Err(bad_response("not HTTP/1.1")),
        };
        let status = response.code.unwrap_or(502);
        let http10 = response.version == Some(0);
        let mut close_token = false;
        let mut keep_alive_token = false;
        // Connection options first: they name headers to drop.
        let mut named: [&[u8]; 8] = [b""; 8];
        let mut named_count = 0;
        let mut lengths: Option<u64> = None;
        let mut chunked_response = false;
        for header in response.headers.iter() {
            match classify(header.name) {
                Kind::Connection => {
                    for token in header.value.split(|b| *b == b',') {
                        let token = token.trim_ascii();
                        if token.eq_ignore_ascii_case(b"close") {
                            close_token = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            keep_alive_token = true;
                        } else if !token.is_empty() && named_count < named.len() {
                            named[named_count] = token;
                            named_count += 1;
                        }
                    }
                }
                Kind::ContentLength => {
                    let value = parse_length(header.value)
                        .ok_or_else(|| bad_response("malformed Content-Length"))?;
                    if lengths.is_some_and(|v| v != value) {
                        return Err(bad_response("conflicting Content-Length headers"));
                    }
                    lengths = Some(value);
                }
                Kind::TransferEncoding => {
                    if !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                        return Err(bad_response("a transfer coding other than chunked"));
                    }
                    chunked_response = true;
                }
                _ => {}
            }
        }
        // HTTP/1.0 upstreams close unless they asked to keep the connection.
        let upstream_close = close_token || (http10 && !keep_alive_token);
        // With chunked framing, Content-Length is ignored and not passed on.
        let length = if chunked_response { None } else { lengths };
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for header in response.headers.iter() {
            let name = header.name;
            match classify(name) {
                Kind::Connection | Kind::HopByHop | Kind::Special => continue,
                Kind::ContentLength if chunked_response => continue,
                _ => {}
            }
            if named[..named_count]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(header.value);
            out.extend_from_slice(b"\r\n");
        }
        let informational = (100..200).contains(&status);
        let no_body = head_request || informational || status == 204 || status == 304;
        // Without a length, the body runs until the upstream closes: the
        // client connection closes after it too.
        let close_delimited = !no_body && !chunked_response && length.is_none();
        if close_delimited {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        upstream_buffer.advance(head_len);
        if informational {
            if client.write_all(out).await.is_err() {
                return Err(Failure::Client {
                    status: None,
                    message: "the client went away".into(),
                });
            }
            informational_sent = true;
            continue;
        }
        return Ok(Head {
            status,
            no_body,
            chunked: chunked_response,
            length,
            close_delimited,
            upstream_close,
        });
    }
}

/// Writes the response head (in `out`) and relays the body to the client.
async fn answer_body(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    out: &mut Vec<u8>,
    upstream_buffer: &mut BytesMut,
    head: Head,
) -> Result<Done, Failure> {
    let gone = || Failure::Client {
        status: None,
        message: "the client went away".into(),
    };
    let broken = |message: &str| Failure::Upstream {
        status: 502,
        code: "upstreamReset",
        message: message.into(),
        answered: true,
    };
    // The head and the body bytes already read, in one write.
    let mut scanner = ChunkedScanner::response();
    let mut left = if head.no_body {
        0
    } else {
        head.length.unwrap_or(u64::MAX)
    };
    let mut complete = head.no_body || (!head.chunked && !head.close_delimited && left == 0);
    if !complete {
        let n = if head.chunked {
            match scanner.scan(upstream_buffer) {
                Ok(Some(n)) => {
                    complete = true;
                    n
                }
                Ok(None) => upstream_buffer.len(),
                Err(_) => return Err(broken("malformed chunked response")),
            }
        } else if head.close_delimited {
            upstream_buffer.len()
        } else {
            let n = (upstream_buffer.len() as u64).min(left) as usize;
            left -= n as u64;
            complete = left == 0;
            n
        };
        out.extend_from_slice(&upstream_buffer[..n]);
        upstream_buffer.advance(n);
    }
    if client.write_all(out).await.is_err() {
        return Err(gone());
    }
    while !complete {
        upstream_buffer.clear();
        match tokio::time::timeout(BODY_IDLE, upstream.read_buf(upstream_buffer)).await {
            Ok(Ok(0)) if head.close_delimited => break,
            Ok(Ok(0)) | Ok(Err(_)) => return Err(broken("the upstream went away mid-response")),
            Err(_) => return Err(broken("the response body stalled")),
            Ok(Ok(_)) => {}
        }
        let n = if head.chunked {
            match scanner.scan(upstream_buffer) {
                Ok(Some(n)) => {
                    complete = true;
                    n
                }
                Ok(None) => upstream_buffer.len(),
                Err(_) => return Err(broken("malformed chunked response")),
            }
        } else if head.close_delimited {
            upstream_buffer.len()
        } else {
            let n = (upstream_buffer.len() as u64).min(left) as usize;
            left -= n as u64;
            complete = left == 0;
            n
        };
        if client.write_all(&upstream_buffer[..n]).await.is_err() {
            return Err(gone());
        }
        upstream_buffer.advance(n);
    }
    // Reuse the connection only if the upstream sent nothing beyond this
    // response: bytes after it (or an EOF) would poison the next request.
    // Costs nothing when the socket is quiet: the readiness check fails
    // without a syscall, or the syscall replaces the one the next read
    // would have made.
    let reusable = !head.upstream_close
        && !head.close_delimited
        && upstream_buffer.is_empty()
        && quiet(upstream);
    Ok(Done {
        status: head.status,
        reusable,
        client_close: head.close_delimited,
    })
}

/// Whether nothing is waiting on a connection (no bytes, no EOF).
pub(crate) fn quiet(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A Content-Length value: ASCII digits only (no sign, no spaces inside).
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[expect(clippy::too_many_arguments, reason = "the facts of one log line")]
fn log(
    proxy: &Proxy,
    method: &Method,
    host: &str,
    target: &str,
    remote: SocketAddr,
    started: Instant,
    status: u16,
    routed: Option<(&Snapshot, &Routed, Option<usize>)>,
    error: Option<&str>,
) {
    let Some(log) = &proxy.access_log else { return };
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let (route, service, cell, shard, upstream, via) = match routed {
        Some((snapshot, routed, upstream)) => {
            let table = &snapshot.table;
            (
                Some(table.routes[routed.route as usize].name.as_str()),
                Some(table.services[routed.service as usize].name.as_str()),
                Some(table.cells[usize::from(routed.cell)].name.as_str()),
                routed.shard,
                upstream.map(|u| snapshot.upstreams[u].address.as_str()),
                Some(if routed.via == Via::Gateway {
                    "gateway"
                } else {
                    "direct"
                }),
            )
        }
        None => (None, None, None, None, None, None),
    };
    log.write(&Entry {
        time,
        remote: remote.to_string(),
        method: method.as_str(),
        host,
        path: target,
        protocol: "HTTP/1.1",
        status,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        route,
        service,
        cell,
        shard,
        upstream,
        via,
        error,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_the_first_empty_line_with_crlf_or_bare_lf() {
        for (head, end) in [
            (&b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY"[..], Some(27)),
            (b"GET / HTTP/1.1\nHost: a\n\nBODY", Some(24)),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\nBODY", Some(26)),
            (b"GET / HTTP/1.1\nHost: a\r\n\nBODY", Some(25)),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", None),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r", None),
            (b"GET / HTTP/1.1\nHost: a\n", None),
        ] {
            assert_eq!(
                find_head_end(head, 0),
                end,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        // Resuming a scan two bytes before the end finds a head split
        // across reads.
        let whole = b"GET / HTTP/1.1\nHost: a\n\n";
        let first = &whole[..23];
        assert_eq!(find_head_end(first, 0), None);
        assert_eq!(find_head_end(whole, first.len() - 2), Some(24));
    }

    #[test]
    fn httparse_reads_a_bare_lf_head_as_a_crlf_one() {
        for text in [
            &b"GET /x HTTP/1.1\nHost: a\nX-Y: 1\n\n"[..],
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-Y: 1\r\n\r\n",
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut request = httparse::Request::new(&mut headers);
            assert_eq!(
                request.parse(text).expect("parses"),
                httparse::Status::Complete(text.len())
            );
            assert_eq!(request.path, Some("/x"));
            assert_eq!(request.headers.len(), 2);
        }
    }
}
