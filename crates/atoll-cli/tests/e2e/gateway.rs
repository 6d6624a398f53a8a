//! The gateway through the real binaries: a control plane, two gateways in
//! two zones, and test backends that say which cell they serve.

use std::time::{Duration, Instant};

use atoll_model::HashName;
use atoll_model::key::hash;
use atoll_testing::backend::Backend;
use futures::StreamExt;
use serde_json::Value;

use crate::harness::{Control, GatewayProcess, http_get};

/// Cells c0..c5; even ones in zone za, odd ones in zb.
pub(crate) const CELLS: usize = 6;

pub(crate) struct Site {
    pub(crate) control: Control,
    pub(crate) backends: Vec<Backend>,
    pub(crate) gateways: Vec<GatewayProcess>,
    pub(crate) ports: [u16; 2],
    pub(crate) state: tempfile::TempDir,
    pub(crate) http: reqwest::Client,
}

/// How the test's rule reads keys.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    Header,
    Cookie,
    Query,
    Path,
    Body,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Transform {
    Suffix,
    Mod,
    Fnv,
    Xxh3,
}

impl Transform {
    pub(crate) fn shards(self) -> u32 {
        match self {
            Transform::Suffix => 100,
            _ => 120,
        }
    }

    fn yaml(self) -> &'static str {
        match self {
            Transform::Suffix => "{decimalSuffix: 2}",
            Transform::Mod => "{mod: 120}",
            Transform::Fnv => "{hash: fnv1a64}",
            Transform::Xxh3 => "{hash: xxh3}",
        }
    }

    /// The shard of a user, computed here independently of the gateway.
    pub(crate) fn shard(self, id: u64) -> u32 {
        let text = id.to_string();
        (match self {
            Transform::Suffix => id % 100,
            Transform::Mod => id % 120,
            Transform::Fnv => hash(HashName::Fnv1a64, text.as_bytes()) % 120,
            Transform::Xxh3 => hash(HashName::Xxh3, text.as_bytes()) % 120,
        }) as u32
    }
}

impl Source {
    fn yaml(self) -> &'static str {
        match self {
            Source::Header => "{header: x-user-id}",
            Source::Cookie => "{cookie: uid}",
            Source::Query => "{query: uid}",
            Source::Path => "{path: \"/users/{uid}\"}",
            Source::Body => "{body: payer.id}",
        }
    }
}

/// The owner of a shard in the test's map: equal ranges over c0..c5 (or the
/// `moved` variant, where c0's range belongs to c2).
pub(crate) fn owner(shard: u32, shards: u32, moved: bool) -> usize {
    let per = shards as usize / CELLS;
    let cell = (shard as usize / per).min(CELLS - 1);
    if moved && cell == 0 { 2 } else { cell }
}

pub(crate) fn sharding(
    source: Source,
    transform: Transform,
    moved: bool,
    fenced: Option<usize>,
) -> String {
    let shards = transform.shards();
    let per = shards as usize / CELLS;
    let mut text = format!(
        "apiVersion: atoll/v1\nkind: ShardRule\nmetadata: {{name: users}}\nspec:\n  shards: {shards}\n  key:\n    sources: [{}]\n    transform: {}\n---\napiVersion: atoll/v1\nkind: ShardMap\nmetadata: {{name: users}}\nspec:\n  rule: users\n  assignments:\n",
        source.yaml(),
        transform.yaml()
    );
    for cell in 0..CELLS {
        let start = cell * per;
        let end = if cell + 1 == CELLS {
            shards as usize - 1
        } else {
            start + per - 1
        };
        let owner = if moved && cell == 0 { 2 } else { cell };
        let state = if fenced == Some(cell) {
            ", state: fenced"
        } else {
            ""
        };
        text += &format!("    - {{shards: \"{start}-{end}\", cell: c{owner}{state}}}\n");
    }
    text
}

impl Site {
    /// A control plane, 2 backends per cell, 2 gateways (za, zb), and the
    /// topology with `sharding` and `extra` manifests.
    pub(crate) async fn start(sharding: &str, extra: &str) -> Site {
        let control = tokio::task::block_in_place(Control::start);
        let mut backends = Vec::new();
        for cell in 0..CELLS {
            for instance in 0..2 {
                backends.push(
                    Backend::start(
                        &format!("c{cell}-{instance}"),
                        &format!("c{cell}"),
                        "127.0.0.1",
                    )
                    .await,
                );
            }
        }
        let ports = [atoll_testing::free_port(), atoll_testing::free_port()];
        let state = tempfile::tempdir().expect("temp dir");
        let site = Site {
            control,
            backends,
            gateways: Vec::new(),
            ports,
            state,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(128)
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        };
        site.apply(&format!("{}---\n{sharding}---\n{extra}", site.base()));
        let mut site = site;
        for (name, _) in [("gw-a", 0), ("gw-b", 1)] {
            let state = site.state.path().join(name);
            let url = site.control.url.clone();
            site.gateways.push(tokio::task::block_in_place(|| {
                GatewayProcess::start(&url, name, &state, true)
            }));
        }
        site
    }

    pub(crate) fn base(&self) -> String {
        let mut text = String::from(
            "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: r1}\n---\napiVersion: atoll/v1\nkind: Zone\nmetadata: {name: za}\nspec: {region: r1}\n---\napiVersion: atoll/v1\nkind: Zone\nmetadata: {name: zb}\nspec: {region: r1}\n",
        );
        for cell in 0..CELLS {
            let zone = if cell % 2 == 0 { "za" } else { "zb" };
            text += &format!(
                "---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {{name: c{cell}}}\nspec: {{zone: {zone}, type: rzone}}\n"
            );
        }
        text += "---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: bank}\nspec:\n  kind: unitized\n  shardRule: users\n  endpoints:\n";
        for (i, backend) in self.backends.iter().enumerate() {
            text += &format!(
                "    - {{cell: c{}, address: \"{}\"}}\n",
                i / 2,
                backend.address()
            );
        }
        text += "---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: bank}\nspec: {service: bank, retries: {attempts: 1, on: [connectFailure]}}\n";
        for (i, (name, zone)) in [("gw-a", "za"), ("gw-b", "zb")].iter().enumerate() {
            let port = self.ports[i];
            text += &format!(
                "---\napiVersion: atoll/v1\nkind: Gateway\nmetadata: {{name: {name}}}\nspec: {{zone: {zone}, listeners: [{{port: {port}, protocol: http, address: 127.0.0.1}}], advertise: \"127.0.0.1:{port}\"}}\n"
            );
        }
        text
    }

    /// Applies manifests from text; returns the new revision.
    pub(crate) fn apply(&self, text: &str) -> u64 {
        let run = tokio::task::block_in_place(|| {
            self.control
                .atoll_with_stdin(&["apply", "-f", "-"], Some(text))
        });
        let run = run.success();
        run.stderr()
            .split("revision ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| tokio::task::block_in_place(|| self.control.revision()))
    }

    /// Applies and waits until both gateways serve the result.
    pub(crate) fn apply_and_wait(&self, text: &str) -> u64 {
        let version = self.apply(text);
        for gateway in &self.gateways {
            tokio::task::block_in_place(|| gateway.wait_version(version));
        }
        version
    }

    pub(crate) fn url(&self, gateway: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[gateway])
    }

    /// A request for user `id` through gateway `gateway`, with the key where
    /// `source` says.
    pub(crate) fn request(
        &self,
        gateway: usize,
        source: Source,
        id: u64,
    ) -> reqwest::RequestBuilder {
        let base = self.url(gateway);
        match source {
            Source::Header => self
                .http
                .get(format!("{base}/api/balance"))
                .header("x-user-id", id.to_string()),
            Source::Cookie => self
                .http
                .get(format!("{base}/api/balance"))
                .header("cookie", format!("theme=dark; uid={id}")),
            Source::Query => self.http.get(format!("{base}/api/balance?x=1&uid={id}")),
            Source::Path => self.http.get(format!("{base}/users/{id}/balance")),
            Source::Body => self
                .http
                .post(format!("{base}/api/transfer"))
                .header("content-type", "application/json")
                .body(format!(
                    "{{\"payer\": {{\"id\": \"{id}\"}}, \"amount\": 5}}"
                )),
        }
    }
}

/// Sends one request per id (64 at a time) and returns (id, status, body).
pub(crate) async fn send_all(
    site: &Site,
    gateway: usize,
    source: Source,
    ids: impl Iterator<Item = u64>,
) -> Vec<(u64, u16, Value)> {
    futures::stream::iter(ids)
        .map(|id| async move {
            let response = site.request(gateway, source, id).send().await;
            match response {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.json::<Value>().await.unwrap_or(Value::Null);
                    (id, status, body)
                }
                Err(error) => (id, 0, Value::String(error.to_string())),
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

fn user(i: u64) -> u64 {
    2_088_000_000_000_000 + i * 7919
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_users_reach_their_owner_for_every_source_and_transform() {
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    let sources = [
        Source::Header,
        Source::Cookie,
        Source::Query,
        Source::Path,
        Source::Body,
    ];
    let transforms = [
        Transform::Suffix,
        Transform::Mod,
        Transform::Fnv,
        Transform::Xxh3,
    ];
    let started = Instant::now();
    for source in sources {
        for transform in transforms {
            site.apply_and_wait(&sharding(source, transform, false, None));
            let results = send_all(&site, 0, source, (0..10_000).map(user)).await;
            let mut per_cell = [0usize; CELLS];
            for (id, status, body) in &results {
                assert_eq!(*status, 200, "{source:?} {transform:?} user {id}: {body}");
                let expected = owner(transform.shard(*id), transform.shards(), false);
                let cell = body["cell"].as_str().unwrap_or_default();
                assert_eq!(
                    cell,
                    format!("c{expected}"),
                    "{source:?} {transform:?} user {id}: {body}"
                );
                // The shard Atoll computed travels to the backend.
                assert_eq!(
                    body["headers"]["x-atoll-shard"],
                    transform.shard(*id).to_string()
                );
                assert_eq!(body["headers"]["x-atoll-cell"], cell);
                // Cells of zb are reached through zb's gateway: one more hop
                // in X-Forwarded-For, exactly one.
                let hops = body["headers"]["x-forwarded-for"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .count();
                assert_eq!(
                    hops,
                    if expected.is_multiple_of(2) { 1 } else { 2 },
                    "{body}"
                );
                per_cell[expected] += 1;
            }
            assert!(
                per_cell.iter().all(|n| *n > 500),
                "{source:?} {transform:?}: {per_cell:?}"
            );
        }
    }
    eprintln!("200,000 requests in {:?}", started.elapsed());
    // gw-a counted the misroutes it corrected, per cell.
    let metrics = site.gateways[0].metrics();
    assert!(
        metrics.contains("atoll_gateway_misroutes_total{cell=\"c1\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("atoll_gateway_misroutes_total{cell=\"c1\"} 0\n"),
        "misroutes are counted"
    );
    assert!(
        metrics.contains("atoll_gateway_misroutes_total{cell=\"c0\"} 0\n"),
        "c0 is local to gw-a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_request_is_never_forwarded_again() {
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    // User 20 is in shard 20 → c1 (zone zb). Through gw-a it is corrected in
    // one hop.
    let response = site
        .request(0, Source::Header, 20)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["cell"], "c1");
    // Claiming to be forwarded already, to gw-a, for a cell gw-a does not
    // have: a loop is refused with 508 instead of a second hop.
    let response = site
        .request(0, Source::Header, 20)
        .header("x-atoll-hop", "1")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 508);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "misrouteLoop");
    assert_eq!(body["cell"], "c1");
    // A misconfiguration where zb's advertised address is gw-a itself would
    // loop forever without the guard: gw-a forwards once, gw-a (as "zb")
    // refuses the second hop.
    let looped = site.base().replace(
        &format!("advertise: \"127.0.0.1:{}\"", site.ports[1]),
        &format!("advertise: \"127.0.0.1:{}\"", site.ports[0]),
    );
    let version = site.apply(&looped);
    tokio::task::block_in_place(|| site.gateways[0].wait_version(version));
    let response = site
        .request(0, Source::Header, 20)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 508, "{:?}", response.text().await);
    // Users of za are unaffected.
    let response = site
        .request(0, Source::Header, 3)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fenced_shards_refuse_writes_and_serve_reads() {
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    site.apply_and_wait(&sharding(Source::Header, Transform::Suffix, false, Some(0)));
    let epoch = {
        let map = tokio::task::block_in_place(|| site.control.json(&["get", "shardmap", "users"]));
        map["spec"]["epoch"].as_u64().expect("epoch")
    };
    // User 7: shard 7, owned by c0, fenced.
    let write = site
        .http
        .post(format!("{}/api/deposit", site.url(0)))
        .header("x-user-id", "7")
        .send()
        .await
        .expect("sent");
    assert_eq!(write.status(), 503);
    assert_eq!(write.headers()["retry-after"], "1");
    let body: Value = write.json().await.expect("json");
    assert_eq!(body["error"], "shardFenced");
    assert_eq!(body["shard"], 7);
    assert_eq!(body["epoch"], epoch);
    assert_eq!(body["cell"], "c0");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("fenced for a switchover"),
        "{body}"
    );
    let read = site
        .http
        .get(format!("{}/api/balance", site.url(0)))
        .header("x-user-id", "7")
        .send()
        .await
        .expect("sent");
    assert_eq!(read.status(), 200, "reads pass a fence");
    let other = site
        .http
        .post(format!("{}/api/deposit", site.url(0)))
        .header("x-user-id", "42")
        .send()
        .await
        .expect("sent");
    assert_eq!(other.status(), 200, "other shards take writes");
    // Unfencing restores writes.
    site.apply_and_wait(&sharding(Source::Header, Transform::Suffix, false, None));
    let write = site
        .http
        .post(format!("{}/api/deposit", site.url(0)))
        .header("x-user-id", "7")
        .send()
        .await
        .expect("sent");
    assert_eq!(write.status(), 200);
    let metrics = site.gateways[0].metrics();
    assert!(
        metrics.contains("atoll_gateway_fenced_writes_total{service=\"bank\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_config_changes_under_traffic_fail_no_request() {
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    let initial_epoch = tokio::task::block_in_place(|| {
        site.control.json(&["get", "shardmap", "users"])
    })["spec"]["epoch"]
        .as_u64()
        .expect("epoch");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let http = site.http.clone();
        let url = site.url(0);
        tokio::spawn(async move {
            let mut results = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<_> = (0..32)
                    .map(|j| {
                        let id = user(i * 32 + j);
                        let http = http.clone();
                        let url = url.clone();
                        async move {
                            let response = http
                                .get(format!("{url}/api/balance"))
                                .header("x-user-id", id.to_string())
                                .send()
                                .await;
                            match response {
                                Ok(r) => (
                                    id,
                                    r.status().as_u16(),
                                    r.json::<Value>().await.unwrap_or(Value::Null),
                                ),
                                Err(e) => (id, 0, Value::String(e.to_string())),
                            }
                        }
                    })
                    .collect();
                results.extend(futures::future::join_all(batch).await);
                i += 1;
            }
            results
        })
    };
    // 100 changes, alternating who owns c0's shards: each bumps the epoch.
    for change in 0..100 {
        let moved = change % 2 == 0;
        site.apply(&sharding(Source::Header, Transform::Suffix, moved, None));
    }
    let last = tokio::task::block_in_place(|| site.control.revision());
    tokio::task::block_in_place(|| site.gateways[0].wait_version(last));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = traffic.await.expect("traffic");
    assert!(results.len() > 1000, "traffic ran: {}", results.len());
    let mut epochs = std::collections::BTreeSet::new();
    for (id, status, body) in &results {
        assert_eq!(*status, 200, "user {id}: {body}");
        // Every request was routed by one whole version: the epoch it carried
        // says which map, and that map gives its shard to the cell that served it.
        let epoch: u64 = body["headers"]["x-atoll-epoch"]
            .as_str()
            .and_then(|e| e.parse().ok())
            .expect("epoch header");
        let moved = (epoch - initial_epoch) % 2 == 1;
        let expected = owner(Transform::Suffix.shard(*id), 100, moved);
        assert_eq!(
            body["cell"],
            format!("c{expected}"),
            "user {id} at epoch {epoch}: {body}"
        );
        epochs.insert(epoch);
    }
    assert!(epochs.len() > 5, "traffic saw many versions: {epochs:?}");
    eprintln!(
        "{} requests across {} epochs, all served by the owner of their epoch",
        results.len(),
        epochs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_control_plane_gateways_keep_routing_and_restart_from_their_cache() {
    let mut site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    tokio::task::block_in_place(|| site.control.stop());
    for id in [3u64, 20, 55] {
        let response = site
            .request(0, Source::Header, id)
            .send()
            .await
            .expect("sent");
        assert_eq!(
            response.status(),
            200,
            "user {id} with the control plane down"
        );
    }
    // A gateway started while the control plane is down serves its cache.
    let url = site.control.url.clone();
    site.gateways[0].kill();
    let state = site.state.path().join("gw-a");
    let restarted =
        tokio::task::block_in_place(|| GatewayProcess::start(&url, "gw-a", &state, true));
    let config = restarted.config();
    assert_eq!(config["fromCache"], true, "{config}");
    assert_eq!(config["controlConnected"], false);
    let body: Value = site
        .request(0, Source::Header, 3)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(body["cell"], "c0");
    let body: Value = site
        .request(0, Source::Header, 20)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        body["cell"], "c1",
        "misroutes are still corrected through gw-b"
    );
    let (status, _) = http_get(&restarted.admin, "/readyz").expect("admin");
    assert_eq!(status, 200, "ready from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_or_dead_mirror_never_delays_the_primary() {
    let shadow = Backend::start("shadow", "c0", "127.0.0.1").await;
    let dead = atoll_testing::free_port();
    let mirror = |address: String| {
        format!(
            "apiVersion: atoll/v1\nkind: Service\nmetadata: {{name: shadow}}\nspec:\n  kind: local\n  endpoints: [{{cell: c0, address: \"{address}\"}}]\n---\napiVersion: atoll/v1\nkind: Route\nmetadata: {{name: mirrored}}\nspec: {{match: [{{pathPrefix: /mirrored/}}], service: bank, mirror: {{service: shadow, percent: 100}}}}\n"
        )
    };
    let site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        &mirror(shadow.address().to_string()),
    )
    .await;
    let measure = |path: &'static str| {
        let http = site.http.clone();
        let url = site.url(0);
        async move {
            let mut latencies = Vec::new();
            for i in 0..200u64 {
                let started = Instant::now();
                let response = http
                    .post(format!("{url}{path}"))
                    .header("x-user-id", (i * 100 + 2).to_string())
                    .body(vec![b'x'; 1024])
                    .send()
                    .await
                    .expect("sent");
                assert_eq!(response.status(), 200);
                latencies.push(started.elapsed());
            }
            latencies.sort_unstable();
            latencies[latencies.len() * 99 / 100]
        }
    };
    let baseline = measure("/plain").await;
    // The shadow answers instantly: copies arrive.
    let fast = measure("/mirrored/fast").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        shadow.requests() >= 190,
        "mirrored copies arrive: {}",
        shadow.requests()
    );
    let copy = shadow.last().expect("a copy");
    assert_eq!(copy["headers"]["x-atoll-mirror"], "true");
    assert_eq!(copy["bodyBytes"], 1024);
    // The shadow takes 2 s per request (path /slow/2000 is mirrored too).
    let slow = measure("/mirrored/slow/2000").await;
    // The shadow is gone.
    site.apply_and_wait(&mirror(format!("127.0.0.1:{dead}")));
    let gone = measure("/mirrored/dead").await;
    eprintln!(
        "p99: baseline {baseline:?}, fast mirror {fast:?}, slow mirror {slow:?}, dead mirror {gone:?}"
    );
    let bound = baseline * 3 + Duration::from_millis(50);
    for (what, p99) in [("fast", fast), ("slow", slow), ("dead", gone)] {
        assert!(
            p99 < bound,
            "{what} mirror: p99 {p99:?} exceeds {bound:?} (baseline {baseline:?})"
        );
    }
    let metrics = site.gateways[0].metrics();
    assert!(
        metrics.contains("atoll_gateway_mirror_total{reason=\"failed\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_input_gets_a_clean_4xx() {
    use std::io::{Read as _, Write as _};
    let mut site = Site::start(
        &sharding(Source::Header, Transform::Suffix, false, None),
        "",
    )
    .await;
    let raw = |request: &[u8]| -> String {
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", site.ports[0])).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = stream.write_all(request);
        let mut text = Vec::new();
        let _ = stream.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    };
    let answers = tokio::task::block_in_place(|| {
        vec![
            ("garbage", raw(b"\x00\x01\x02 not http at all\r\n\r\n")),
            ("bad method", raw(b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n")),
            (
                "bad header",
                raw(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"),
            ),
            (
                "huge header",
                raw(format!(
                    "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
                    "a".repeat(200_000)
                )
                .as_bytes()),
            ),
            (
                "bad length",
                raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"),
            ),
        ]
    });
    for (what, answer) in &answers {
        let status: u16 = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!((400..500).contains(&status), "{what}: {answer:?}");
    }
    // Bad keys are refused with a JSON reason.
    for (id, code) in [
        ("abc", "invalidKey"),
        ("12x", "invalidKey"),
        (&"9".repeat(300)[..], "invalidKey"),
    ] {
        let response = site
            .http
            .get(format!("{}/api/x", site.url(0)))
            .header("x-user-id", id)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 400, "key {id}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], code);
    }
    let response = site
        .http
        .get(format!("{}/api/x", site.url(0)))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.expect("json")["error"],
        "missingKey"
    );
    // A body key with a body over the limit: refused from the head, before
    // the body is sent.
    site.apply_and_wait(&sharding(Source::Body, Transform::Suffix, false, None));
    let answer = tokio::task::block_in_place(|| {
        raw(format!(
            "POST /api/transfer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{{\"payer\":",
            2 * 1024 * 1024
        )
        .as_bytes())
    });
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(site.gateways[0].alive(), "the gateway survived");
    let (status, _) = http_get(&site.gateways[0].admin, "/healthz").expect("admin");
    assert_eq!(status, 200);
}
