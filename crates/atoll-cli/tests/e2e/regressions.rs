//! Regression tests for the HTTP/1.1 fast path, each named after the defect
//! it pins (found in review): raw backends that misbehave on purpose.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gateway::{Site, Source, Transform, sharding};

/// How a raw backend misbehaves.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Answers, then 50 ms later writes a second, unasked-for response.
    StrayResponse,
    /// Answers (keep-alive), then closes the connection 50 ms later.
    CloseAfterAnswer,
    /// Sends the head and a first chunk, waits 1.5 s, sends the rest.
    SlowChunks,
}

/// Reads one request (head and Content-Length body); returns the body length.
async fn read_request(stream: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while pending.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                pending.extend_from_slice(&chunk[..n]);
            }
            pending.drain(..end + 4 + length);
            return Some(length);
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}

async fn raw_backend(misbehaviour: Misbehaviour) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut pending = Vec::new();
                while let Some(length) = read_request(&mut stream, &mut pending).await {
                    let body = format!(
                        "{{\"backend\": \"raw\", \"cell\": \"c0\", \"bodyBytes\": {length}}}"
                    );
                    match misbehaviour {
                        Misbehaviour::StrayResponse => {
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = stream.write_all(answer.as_bytes()).await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nSTALE!\n")
                                .await;
                        }
                        Misbehaviour::CloseAfterAnswer => {
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = stream.write_all(answer.as_bytes()).await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            return;
                        }
                        Misbehaviour::SlowChunks => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nchunk1\r\n")
                                .await;
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                            let _ = stream.write_all(b"6\r\nchunk2\r\n0\r\n\r\n").await;
                        }
                    }
                }
            });
        }
    });
    address
}

/// The site, with c0's two endpoints replaced by `address` (twice is not
/// allowed: the second gets a dead port the first outranks by round robin).
async fn site_with_c0_at(address: std::net::SocketAddr, route_extra: &str) -> Site {
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    let c0 = site.backends[0].address().to_string();
    let c0b = site.backends[1].address().to_string();
    let text = site
        .base()
        .replace(&format!("    - {{cell: c0, address: \"{c0b}\"}}\n"), "")
        .replace(&c0, &address.to_string())
        .replace(
            "spec: {service: bank, retries: {attempts: 1, on: [connectFailure]}}",
            &format!("spec: {{service: bank{route_extra}}}"),
        );
    site.apply_and_wait(&text);
    site
}

async fn raw(port: u16, request: &[u8]) -> String {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    exchange(stream, request).await
}

/// Writes `request`, then reads until the peer closes (or 5 s).
async fn exchange(mut stream: tokio::net::TcpStream, request: &[u8]) -> String {
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_with_crlf_is_refused_not_injected() {
    let site = Site::start(&sharding(Source::Query, Transform::Fnv, false, None), "").await;
    let answer = raw(
        site.ports[0],
        b"GET /a?uid=1%0d%0aX-Injected:%20yes%0d%0a%0d%0aGET%20/smuggled%20HTTP/1.1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("invalidKey") && answer.contains("control characters"),
        "{answer}"
    );
    assert!(
        site.backends.iter().all(|b| b.requests() == 0),
        "nothing reached a backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stray_bytes_after_a_response_never_reach_another_client() {
    let backend = raw_backend(Misbehaviour::StrayResponse).await;
    let site = site_with_c0_at(backend, "").await;
    for round in 0..5 {
        let first: Value = site
            .request(0, Source::Header, 3)
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        assert_eq!(first["backend"], "raw", "round {round}");
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A fresh client: must not get the stray response.
        let other = reqwest::Client::new();
        let text = other
            .get(format!("{}/api/x", site.url(0)))
            .header("x-user-id", "5")
            .send()
            .await
            .expect("sent")
            .text()
            .await
            .expect("text");
        assert!(!text.contains("STALE"), "round {round}: {text}");
        // Let this connection's stray bytes arrive too before the next round.
        // (Bytes that arrive after a request was sent cannot be told from its
        // answer by any proxy; bytes that arrive while a connection is
        // pooled must never be read as one.)
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_pooled_connection_is_retried_with_the_body() {
    let backend = raw_backend(Misbehaviour::CloseAfterAnswer).await;
    let site = site_with_c0_at(backend, "").await;
    let warm = site
        .request(0, Source::Header, 3)
        .send()
        .await
        .expect("sent");
    assert_eq!(warm.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The pooled connection is closed now; an idempotent PUT with a body is
    // sent again on a fresh connection, body included.
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        site.http
            .put(format!("{}/api/x", site.url(0)))
            .header("x-user-id", "3")
            .body("hello")
            .send(),
    )
    .await
    .expect("answered within 5s")
    .expect("sent");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["bodyBytes"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_timeout_never_cuts_into_a_streaming_body() {
    let backend = raw_backend(Misbehaviour::SlowChunks).await;
    let site = site_with_c0_at(backend, ", timeout: 1s").await;
    let answer = raw(
        site.ports[0],
        b"GET /x HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("chunk1") && answer.contains("chunk2"),
        "the whole body: {answer}"
    );
    assert_eq!(
        answer.matches("HTTP/1.1").count(),
        1,
        "no second status line inside the body: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_bodies_and_framing_are_refused_and_never_eject_an_endpoint() {
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    for _ in 0..10 {
        let answer = raw(site.ports[0], b"POST /p HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    // A bare LF where a trailer would start: not a second request.
    let answer = raw(
        site.ports[0],
        b"POST /p HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    for request in [
        &b"POST /p HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nContent-Length: +3\r\n\r\nabc"[..],
        b"GET /p HTTP/1.1\r\nHost: x\r\nHost: y\r\nx-user-id: 3\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let answer = raw(site.ports[0], request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{}: {answer}", String::from_utf8_lossy(request));
    }
    let config = site.gateways[0].config();
    assert!(
        config["upstreams"]
            .as_array()
            .expect("upstreams")
            .iter()
            .all(|u| u["ejected"] == false),
        "client mistakes never eject an endpoint: {config}"
    );
}

// === Issue 9: what an adversarial run found ===

/// The site with its route replaced: `extra` after `service: bank`.
async fn site_with_route(route: &str) -> Site {
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    let text = site.base().replace(
        "spec: {service: bank, retries: {attempts: 1, on: [connectFailure]}}",
        &format!("spec: {{service: bank{route}}}"),
    );
    site.apply_and_wait(&format!(
        "{text}---\n{}",
        sharding(Source::Header, Transform::Suffix, false, None)
    ));
    site
}

/// The two routes that take the fast path and hyper's (retries on resets
/// hand a request to hyper), with a 1 s limit.
const BOTH_PATHS: [(&str, &str); 2] = [
    (
        "fast path",
        ", timeout: 1s, retries: {attempts: 1, on: [connectFailure]}",
    ),
    (
        "hyper",
        ", timeout: 1s, retries: {attempts: 1, on: [connectFailure, reset]}",
    ),
];

/// A metric's value in the text exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sends `head`, then `body` one byte every `pause`, and returns the
/// answer (whatever arrived before the gateway closed, or 10 s).
async fn trickle(port: u16, head: &[u8], body: &[u8], pause: Duration) -> (String, Duration) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let started = std::time::Instant::now();
    writer.write_all(head).await.expect("head");
    let body = body.to_vec();
    let writing = tokio::spawn(async move {
        for byte in body {
            tokio::time::sleep(pause).await;
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut answer)).await;
    writing.abort();
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

fn body_of(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_malformed_or_slow_client_bodies_never_eject_a_healthy_instance() {
    for (path, route) in BOTH_PATHS {
        let site = site_with_route(route).await;
        // An invalid chunk size, 12 times: the client's fault, each time.
        for _ in 0..12 {
            let (answer, _) = trickle(
                site.ports[0],
                b"POST /p HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"zz\r\nhello\r\n0\r\n\r\n",
                Duration::from_millis(1),
            )
            .await;
            assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        }
        // A body at a byte every 300 ms under a 1 s limit: 408 to that
        // client, about when the limit runs out.
        for _ in 0..3 {
            let (answer, took) = trickle(
                site.ports[0],
                b"POST /p HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nContent-Length: 20\r\n\r\n",
                b"aaaaaaaaaaaaaaaaaaaa",
                Duration::from_millis(300),
            )
            .await;
            assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
            assert_eq!(
                body_of(&answer)["error"],
                "requestTimeout",
                "{path}: {answer}"
            );
            assert!(
                took < Duration::from_secs(4),
                "{path}: answered after {took:?}"
            );
        }
        let config = site.gateways[0].config();
        assert!(
            config["upstreams"]
                .as_array()
                .expect("upstreams")
                .iter()
                .all(|u| u["ejected"] == false),
            "{path}: no endpoint ejected: {config}"
        );
        let metrics = site.gateways[0].metrics();
        for reason in ["timeout", "reset", "status"] {
            assert_eq!(
                metric(
                    &metrics,
                    &format!("atoll_gateway_upstream_errors_total{{reason=\"{reason}\"}}")
                ),
                0.0,
                "{path}: no upstream {reason} counted:\n{metrics}"
            );
        }
        assert!(
            metric(
                &metrics,
                "atoll_gateway_client_errors_total{reason=\"malformedBody\"}"
            ) >= 12.0,
            "{path}: {metrics}"
        );
        assert!(
            metric(
                &metrics,
                "atoll_gateway_client_errors_total{reason=\"bodyTimeout\"}"
            ) >= 3.0,
            "{path}: {metrics}"
        );
        // And the cell still serves.
        let ok = site
            .request(0, Source::Header, 3)
            .send()
            .await
            .expect("sent");
        assert_eq!(ok.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_a_bare_lf_head_is_answered_like_a_crlf_one() {
    for (path, route) in BOTH_PATHS {
        let site = site_with_route(route).await;
        let started = std::time::Instant::now();
        let answer = raw(
            site.ports[0],
            b"GET /a HTTP/1.1\nHost: x\nx-user-id: 3\nConnection: close\n\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path}: at once"
        );
        // Followed by more bytes (a pipelined second request): the same.
        let answer = raw(
            site.ports[0],
            b"GET /a HTTP/1.1\nHost: x\nx-user-id: 3\n\nGET /b HTTP/1.1\r\nHost: x\r\nx-user-id: 5\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            answer.matches("HTTP/1.1 200").count(),
            2,
            "{path}: {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_dot_segments_never_climb_out_of_a_route() {
    for (path, route) in BOTH_PATHS {
        let site = site_with_route(&format!("{route}, match: [{{pathPrefix: /api/}}]")).await;
        let get = |target: &str| {
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nConnection: close\r\n\r\n")
        };
        // Out of /api/: no route, never the upstream.
        for target in [
            "/api/../admin",
            "/api/7/../../etc/passwd",
            "/api/%2e%2e/admin",
            "/api/.%2E/admin",
            "//api/../admin",
        ] {
            let answer = raw(site.ports[0], get(target).as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 404"),
                "{path} {target}: {answer}"
            );
            assert_eq!(body_of(&answer)["error"], "noRoute", "{path} {target}");
        }
        // Inside it: routed, and the upstream gets the normal form.
        for (target, seen) in [
            ("/api/x/../y?q=1", "/api/y"),
            ("/api//y", "/api/y"),
            ("/api/./y/", "/api/y/"),
            ("/%61pi/y", "/api/y"),
        ] {
            let answer = raw(site.ports[0], get(target).as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "{path} {target}: {answer}"
            );
            assert_eq!(body_of(&answer)["path"], seen, "{path} {target}: {answer}");
        }
        // Separators in disguise: refused.
        for target in [
            "/api/..%2Fadmin",
            "/api/..%5cadmin",
            "/api/a\\..\\b",
            "/api/%zz",
        ] {
            let answer = raw(site.ports[0], get(target).as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{path} {target}: {answer}"
            );
            assert_eq!(
                body_of(&answer)["error"],
                "badPath",
                "{path} {target}: {answer}"
            );
        }
        assert!(
            site.backends
                .iter()
                .filter_map(|b| b.last())
                .all(|last| last["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/api/"))),
            "{path}: nothing outside /api/ reached a backend"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_forwarding_headers_and_atoll_baggage_are_the_gateways() {
    for (path, route) in BOTH_PATHS {
        let site = site_with_route(route).await;
        // User 3 is c0's (zone za): entered at gw-a, then at gw-b (which
        // forwards it to gw-a, a trusted hop).
        for gateway in 0..2 {
            let answer = raw(
                site.ports[gateway],
                b"GET /a HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nX-Forwarded-Proto: https\r\nx-atoll-cell: c9\r\nX-Atoll-Shard: 77\r\nbaggage: ATOLL.SHARD=5, team=a\r\nbaggage: Atoll.Cell=c9;p=1,region=r1\r\nConnection: close\r\n\r\n",
            )
            .await;
            let report = body_of(&answer);
            let headers = &report["headers"];
            assert_eq!(report["cell"], "c0", "{path} via {gateway}: {answer}");
            assert_eq!(
                headers["x-forwarded-proto"], "http",
                "{path} via {gateway}: {report}"
            );
            assert_eq!(
                headers["x-atoll-shard"], "3",
                "{path} via {gateway}: {report}"
            );
            assert_eq!(
                headers["x-atoll-cell"], "c0",
                "{path} via {gateway}: {report}"
            );
            let baggage = headers["baggage"]
                .as_str()
                .expect("baggage")
                .to_ascii_lowercase();
            assert!(
                !baggage.contains("atoll.shard=5") && !baggage.contains("atoll.cell=c9"),
                "{path} via {gateway}: a client's atoll.* members go, in any case: {baggage}"
            );
            assert!(
                baggage.contains("atoll.shard=3"),
                "{path} via {gateway}: {baggage}"
            );
            assert_eq!(
                baggage.matches("atoll.cell=").count(),
                1,
                "{path} via {gateway}: one set of Atoll's members: {baggage}"
            );
            assert!(
                baggage.contains("team=a") && baggage.contains("region=r1"),
                "{path} via {gateway}: the client's own members stay: {baggage}"
            );
        }
    }
}

/// Sends `request` from a socket bound to `ip` (any 127.x address works on
/// Linux) and returns the answer.
async fn raw_from(ip: &str, port: u16, request: &[u8]) -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{ip}:0").parse().expect("address"))
        .expect("bind");
    let stream = socket
        .connect(format!("127.0.0.1:{port}").parse().expect("address"))
        .await
        .expect("connect");
    exchange(stream, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_only_a_gateways_address_vouches_for_the_forwarded_protocol() {
    let site = site_with_route(BOTH_PATHS[0].1).await;
    let forged = b"GET /a HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\nx-atoll-hop: 1\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n";
    // From an address no Gateway advertises: the hop is not a gateway's,
    // and its claim about the protocol is replaced.
    let answer = raw_from("127.0.0.2", site.ports[0], forged).await;
    let report = body_of(&answer);
    assert_eq!(report["headers"]["x-forwarded-proto"], "http", "{answer}");
    // From a gateway's address (every Gateway of the site advertises
    // 127.0.0.1): another gateway's word on the protocol is kept.
    let answer = raw_from("127.0.0.1", site.ports[0], forged).await;
    let report = body_of(&answer);
    assert_eq!(report["headers"]["x-forwarded-proto"], "https", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_header_limits_agree_with_what_the_gateway_fronts() {
    for (path, route) in BOTH_PATHS {
        let site = site_with_route(route).await;
        let request = |count: usize| {
            // Host, x-user-id and Connection, then extras: `count` counted
            // headers in all.
            let mut text = String::from("GET /a HTTP/1.1\r\nHost: x\r\nx-user-id: 3\r\n");
            for i in 0..count - 3 {
                text.push_str(&format!("x-extra-{i}: {i}\r\n"));
            }
            // Atoll's own and the forwarding ones do not count.
            text.push_str("x-atoll-cell: c9\r\nbaggage: team=a\r\nx-forwarded-for: 10.0.0.1\r\nx-forwarded-proto: https\r\nConnection: close\r\n\r\n");
            text
        };
        for gateway in 0..2 {
            let answer = raw(site.ports[gateway], request(100).as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "{path}, 100 headers via {gateway}: {answer}"
            );
            let count = body_of(&answer)["headerCount"].as_u64().expect("count");
            assert!(count <= 108, "{path}: the gateway added at most 8: {count}");
            let answer = raw(site.ports[gateway], request(101).as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 431"),
                "{path}, 101 headers via {gateway}: {answer}"
            );
            let body = body_of(&answer);
            assert_eq!(body["error"], "headersTooLarge", "{path}: {answer}");
            assert!(
                body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("101") && m.contains("100")),
                "{path}: {answer}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_health_answers_without_a_cache_or_a_control_plane() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Nothing listens here: the control plane is down.
    let control = format!("http://127.0.0.1:{}", atoll_testing::free_port());
    for (case, cache) in [
        ("no cache", None),
        ("an empty cache", Some(&b""[..])),
        (
            "a corrupt cache",
            Some(&b"{\"atollConfigCache\": 1, \"node\": \"gw-a\", \"config\": {\"vers"[..]),
        ),
    ] {
        let state = dir.path().join(case.replace(' ', "-"));
        std::fs::create_dir_all(&state).expect("state");
        if let Some(bytes) = cache {
            std::fs::write(state.join("config.json"), bytes).expect("cache");
        }
        let started = std::time::Instant::now();
        let gateway = tokio::task::block_in_place(|| {
            crate::harness::GatewayProcess::start(&control, "gw-a", &state, false)
        });
        let (health, _) = crate::harness::http_get(&gateway.admin, "/healthz").expect("healthz");
        let (ready, why) = crate::harness::http_get(&gateway.admin, "/readyz").expect("readyz");
        assert_eq!((health, ready), (200, 503), "{case}: {why}");
        assert!(why.contains("no configuration"), "{case}: {why}");
        if cache.is_some() {
            assert!(
                why.contains("cache"),
                "{case}: readiness says why the cache was not used: {why}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{case}: the admin API answered after {:?}",
            started.elapsed()
        );
    }
}
