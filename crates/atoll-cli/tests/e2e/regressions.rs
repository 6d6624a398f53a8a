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
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
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
