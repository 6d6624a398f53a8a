//! The gateway's data path: protocols (upgrades, h2c, TLS with ALPN),
//! retries, health checks, outlier ejection, canary splits.

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::gateway::{Site, Source, Transform, sharding};

fn site_sharding() -> String {
    sharding(Source::Header, Transform::Suffix, false, None)
}

/// The backend name that served user `id` through gw-a.
async fn served_by(site: &Site, id: u64) -> String {
    let body: Value = site
        .request(0, Source::Header, id)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    body["backend"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_style_upgrades_pass_through() {
    let site = Site::start(&site_sharding(), "").await;
    let port = site.ports[0];
    let echoed = tokio::task::block_in_place(|| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"GET /chat HTTP/1.1\r\nHost: bank.example\r\nx-user-id: 3\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("read head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("upgrade: echo"),
            "{head}"
        );
        stream.write_all(b"hello over the tunnel").expect("write");
        let mut echoed = [0u8; 21];
        stream.read_exact(&mut echoed).expect("echo");
        String::from_utf8_lossy(&echoed).into_owned()
    });
    assert_eq!(echoed, "hello over the tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_cleartext_is_served() {
    let site = Site::start(&site_sharding(), "").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let mut users = Vec::new();
    for id in [3u64, 20, 55, 99] {
        let h2 = h2.clone();
        let url = site.url(0);
        users.push(tokio::spawn(async move {
            let response = h2
                .post(format!("{url}/api/deposit"))
                .header("x-user-id", id.to_string())
                .body("amount=5")
                .send()
                .await
                .expect("sent");
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.expect("json");
            (id, body)
        }));
    }
    for user in users {
        let (id, body) = user.await.expect("task");
        let expected = crate::gateway::owner(Transform::Suffix.shard(id), 100, false);
        assert_eq!(body["cell"], format!("c{expected}"));
        assert_eq!(body["bodyBytes"], 8, "the body streams through");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_listeners_negotiate_h2_and_http1_by_alpn() {
    use tokio_rustls::rustls;
    let site = Site::start(&site_sharding(), "").await;
    let certificate =
        rcgen::generate_simple_self_signed(vec!["bank.example".to_owned()]).expect("certificate");
    let dir = site.state.path();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, certificate.cert.pem()).expect("write");
    std::fs::write(&key_path, certificate.signing_key.serialize_pem()).expect("write");
    let tls_port = atoll_testing::free_port();
    let gateway = site.base().replace(
        &format!("listeners: [{{port: {}, protocol: http, address: 127.0.0.1}}]", site.ports[0]),
        &format!(
            "listeners: [{{port: {}, protocol: http, address: 127.0.0.1}}, {{port: {tls_port}, protocol: https, address: 127.0.0.1, tls: {{certificate: \"{}\", privateKey: \"{}\"}}}}]",
            site.ports[0],
            cert_path.display(),
            key_path.display()
        ),
    );
    site.apply_and_wait(&gateway);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate.cert.der().clone()).expect("root");
    for (alpn, expected) in [(b"h2".to_vec(), "h2"), (b"http/1.1".to_vec(), "http/1.1")] {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("bank.example").expect("name");
        let stream = connector.connect(name, tcp).await.expect("TLS handshake");
        let negotiated = stream
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        assert_eq!(negotiated.as_deref(), Some(expected));
        let io = hyper_util::rt::TokioIo::new(stream);
        let request = http::Request::get("https://bank.example/api/balance")
            .header("x-user-id", "20")
            .header("host", "bank.example")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let response = if expected == "h2" {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .expect("h2");
            tokio::spawn(connection);
            sender.send_request(request).await.expect("response")
        } else {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(io).await.expect("h1");
            tokio::spawn(connection);
            sender.send_request(request).await.expect("response")
        };
        assert_eq!(response.status(), 200, "{expected}");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        let body: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body["cell"], "c1", "{expected}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_failures_are_retried_and_dead_endpoints_ejected() {
    let site = Site::start(&site_sharding(), "").await;
    // c0's first endpoint now points at a closed port.
    let dead = atoll_testing::free_port();
    let first = site.backends[0].address().to_string();
    site.apply_and_wait(&site.base().replace(&first, &format!("127.0.0.1:{dead}")));
    for i in 0..40u64 {
        let response = site
            .request(0, Source::Header, i % 10)
            .send()
            .await
            .expect("sent");
        assert_eq!(
            response.status(),
            200,
            "request {i} is retried on the live endpoint"
        );
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["backend"], "c0-1");
    }
    let metrics = site.gateways[0].metrics();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(value("atoll_gateway_retries_total") >= 1, "{metrics}");
    assert!(
        value("atoll_gateway_ejections_total") >= 1,
        "the dead endpoint was ejected:\n{metrics}"
    );
    let config = site.gateways[0].config();
    let ejected = config["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .any(|u| u["address"] == format!("127.0.0.1:{dead}") && u["ejected"] == true);
    assert!(ejected, "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_checks_take_endpoints_out_and_back() {
    let site = Site::start(&site_sharding(), "").await;
    site.apply_and_wait(&site.base().replace(
        "  kind: unitized\n",
        "  kind: unitized\n  healthCheck: {path: /healthz, interval: 100ms, timeout: 500ms, unhealthyThreshold: 1, healthyThreshold: 1}\n",
    ));
    site.backends[0].set_healthy(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut names = std::collections::HashSet::new();
        for _ in 0..10 {
            names.insert(served_by(&site, 3).await);
        }
        if names.len() == 1 && names.contains("c0-1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c0-0 never left rotation: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    site.backends[0].set_healthy(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut names = std::collections::HashSet::new();
        for _ in 0..10 {
            names.insert(served_by(&site, 3).await);
        }
        if names.contains("c0-0") {
            break;
        }
        assert!(Instant::now() < deadline, "c0-0 never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canaries_by_header_and_by_weight() {
    let site = Site::start(&site_sharding(), "").await;
    // c0-1 is the canary.
    let canary = site.backends[1].address().to_string();
    let text = site
        .base()
        .replace(&format!("address: \"{canary}\"}}"), &format!("address: \"{canary}\", labels: {{track: canary}}}}"))
        .replace("  shardRule: users\n", "  shardRule: users\n  subsets: [{name: canary, labels: {track: canary}}, {name: all, labels: {team: bank}}]\n")
        .replace(
            "spec: {service: bank, retries: {attempts: 1, on: [connectFailure]}}",
            "spec: {service: bank, split: [{subset: all, weight: 100}, {subset: canary, weight: 0, headers: [{name: x-canary, exact: \"1\"}]}]}",
        );
    site.apply_and_wait(&text);
    for _ in 0..20 {
        let body: Value = site
            .request(0, Source::Header, 3)
            .header("x-canary", "1")
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        assert_eq!(body["backend"], "c0-1", "pinned to the canary");
    }
    // Blue-green: everything to the canary by weight.
    site.apply_and_wait(
        &text
            .replace("{subset: all, weight: 100}", "{subset: all, weight: 0}")
            .replace(
                "{subset: canary, weight: 0,",
                "{subset: canary, weight: 100,",
            ),
    );
    for _ in 0..20 {
        assert_eq!(served_by(&site, 3).await, "c0-1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_requests_in_flight() {
    let mut site = Site::start(&site_sharding(), "").await;
    let slow = {
        let request = site
            .http
            .get(format!("{}/slow/700", site.url(0)))
            .header("x-user-id", "3");
        tokio::spawn(async move { request.send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    tokio::task::block_in_place(|| site.gateways[0].stop());
    let response = slow
        .await
        .expect("task")
        .expect("the request in flight completes");
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the gateway waited for it"
    );
    // New connections are refused once it stopped.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", site.ports[0])).is_err(),
        "the listener is closed"
    );
}

/// Reads `count` HTTP/1.1 responses (with Content-Length bodies) from a raw
/// stream: (status, body).
fn read_responses(stream: &mut std::net::TcpStream, count: usize) -> Vec<(u16, String)> {
    let mut responses = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while responses.len() < count {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if pending.len() >= end + 4 + length {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body =
                    String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into_owned();
                pending.drain(..end + 4 + length);
                responses.push((status, body));
                continue;
            }
        }
        let n = stream.read(&mut chunk).expect("read");
        assert!(
            n > 0,
            "connection closed after {} responses",
            responses.len()
        );
        pending.extend_from_slice(&chunk[..n]);
    }
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_keep_their_framing() {
    let site = Site::start(&site_sharding(), "").await;
    let port = site.ports[0];
    let responses = tokio::task::block_in_place(|| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // A refused request, a chunked upload, a fixed-length upload and a
        // plain read, all in one write: each must be answered in order on
        // the same connection.
        stream
            .write_all(
                b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n\
                  POST /api/deposit HTTP/1.1\r\nHost: a\r\nx-user-id: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
                  POST /api/deposit HTTP/1.1\r\nHost: a\r\nx-user-id: 20\r\nContent-Length: 4\r\n\r\nabcd\
                  GET /api/balance HTTP/1.1\r\nHost: a\r\nx-user-id: 55\r\nx-atoll-cell: forged\r\n\r\n",
            )
            .expect("write");
        read_responses(&mut stream, 4)
    });
    assert_eq!(responses[0].0, 400);
    assert!(responses[0].1.contains("missingKey"), "{}", responses[0].1);
    let bodies: Vec<Value> = responses[1..]
        .iter()
        .map(|(_, b)| serde_json::from_str(b).expect("json"))
        .collect();
    assert_eq!(responses[1].0, 200);
    assert_eq!(bodies[0]["bodyBytes"], 11, "the chunked body arrived whole");
    assert_eq!(bodies[0]["cell"], "c0");
    assert_eq!(bodies[1]["bodyBytes"], 4);
    assert_eq!(bodies[1]["cell"], "c1");
    assert_eq!(bodies[2]["cell"], "c3");
    assert_eq!(
        bodies[2]["headers"]["x-atoll-cell"], "c3",
        "the forged header was replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_facts_reach_the_upstream_and_the_access_log() {
    let site = Site::start(&site_sharding(), "").await;
    let body: Value = site
        .request(0, Source::Header, 2_088_000_000_000_007)
        .header("baggage", "team=payments, atoll.cell=forged")
        .header("x-atoll-shard", "99")
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let headers = &body["headers"];
    assert_eq!(headers["x-atoll-key"], "2088000000000007");
    assert_eq!(headers["x-atoll-shard"], "7");
    assert_eq!(headers["x-atoll-cell"], "c0");
    let epoch = headers["x-atoll-epoch"].as_str().expect("epoch").to_owned();
    let baggage = headers["baggage"].as_str().expect("baggage");
    assert!(
        baggage.contains("team=payments"),
        "the client's own members stay: {baggage}"
    );
    assert!(
        !baggage.contains("forged"),
        "client copies of atoll members go: {baggage}"
    );
    assert!(
        baggage.contains(&format!(
            "atoll.key=2088000000000007,atoll.shard=7,atoll.cell=c0,atoll.epoch={epoch}"
        )),
        "{baggage}"
    );
    // The access log has a JSON line per request, with the routing facts.
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(line) = site.gateways[0]
            .access_log()
            .into_iter()
            .find(|l| l["shard"] == 7)
        {
            break line;
        }
        assert!(Instant::now() < deadline, "no access log line");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/api/balance");
    assert_eq!(line["cell"], "c0");
    assert_eq!(line["route"], "bank");
    assert_eq!(line["via"], "direct");
    assert!(line["durationMs"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_that_cannot_be_served_is_refused_and_the_old_one_kept() {
    let site = Site::start(&site_sharding(), "").await;
    // Move gw-a's listener to a port something else holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let moved = site.base().replace(
        &format!(
            "listeners: [{{port: {}, protocol: http, address: 127.0.0.1}}]",
            site.ports[0]
        ),
        &format!("listeners: [{{port: {port}, protocol: http, address: 127.0.0.1}}]"),
    );
    let version = site.apply(&moved);
    let deadline = Instant::now() + Duration::from_secs(20);
    let nack = loop {
        let nodes = tokio::task::block_in_place(|| site.control.json(&["nodes"]));
        let gw = nodes["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == "gw-a")
            .cloned()
            .expect("gw-a");
        if gw["lastNack"]["version"] == version {
            break gw;
        }
        assert!(Instant::now() < deadline, "no NACK: {nodes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = nack["lastNack"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{reason}"
    );
    assert!(nack["appliedVersion"].as_u64().expect("applied") < version);
    // Still serving the old version on the old port.
    let response = site
        .request(0, Source::Header, 3)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(
        site.gateways[0].config()["version"]
            .as_u64()
            .expect("version"),
        version - 1
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fence_hold_lets_writes_wait_for_the_unfence() {
    let site = Site::start(&site_sharding(), "").await;
    let held = site.base().replace(
        &format!("advertise: \"127.0.0.1:{}\"}}", site.ports[0]),
        &format!(
            "advertise: \"127.0.0.1:{}\", writeFenceHold: 5s}}",
            site.ports[0]
        ),
    );
    assert_ne!(held, site.base(), "the hold was set");
    site.apply_and_wait(&held);
    site.apply_and_wait(&sharding(Source::Header, Transform::Suffix, false, Some(0)));
    let write = {
        let request = site
            .http
            .post(format!("{}/api/deposit", site.url(0)))
            .header("x-user-id", "7");
        tokio::spawn(async move {
            let started = Instant::now();
            let response = request.send().await.expect("sent");
            (response.status(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    site.apply_and_wait(&sharding(Source::Header, Transform::Suffix, false, None));
    let (status, waited) = write.await.expect("task");
    assert_eq!(status, 200, "the held write went through after the unfence");
    assert!(
        waited >= Duration::from_millis(400),
        "it waited: {waited:?}"
    );
    // Without an unfence, the hold ends in a refusal.
    site.apply_and_wait(&sharding(Source::Header, Transform::Suffix, false, Some(0)));
    let started = Instant::now();
    let response = site
        .http
        .post(format!("{}/api/deposit", site.url(0)))
        .header("x-user-id", "7")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 503);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "held about 5s: {:?}",
        started.elapsed()
    );
}
