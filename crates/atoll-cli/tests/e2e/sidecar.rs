//! `atoll sidecar` processes against a real control plane: an app's calls
//! through its sidecar land in the cell that owns the user (by the call's
//! key, or the key propagated from its inbound request), a local service
//! is served by the caller's own cell, and the provider's sidecar refuses
//! what its cell does not own, what is fenced and what was routed by a
//! stale map, with errors the caller sees and metrics that count them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atoll_testing::backend::Backend;
use serde_json::Value;

use crate::harness::{ATOLL, Control, examples, http_get};

/// Apps whose instances the sidecars are beside (no agent runs them: the
/// test starts the apps and the sidecars itself).
pub(crate) const APPS: &str = r#"
apiVersion: atoll/v1
kind: App
metadata: {name: bank}
spec: {service: bank, cells: [rz01, rz02], replicas: 1, command: [bank]}
---
apiVersion: atoll/v1
kind: App
metadata: {name: web}
spec: {service: web, cells: [rz01, rz02], replicas: 1, command: [web]}
"#;

/// One `atoll sidecar`, killed on drop.
pub(crate) struct Sidecar {
    child: Option<Child>,
    pub(crate) inbound: String,
    pub(crate) outbound: String,
    pub(crate) admin: String,
    log: PathBuf,
}

impl Sidecar {
    pub(crate) fn start(
        control: &Control,
        dir: &Path,
        instance: &str,
        placed: (&str, &str, &str),
        app: std::net::SocketAddr,
    ) -> Sidecar {
        Self::start_with(control, dir, instance, placed, app, &[])
    }

    pub(crate) fn start_with(
        control: &Control,
        dir: &Path,
        instance: &str,
        (service, cell, zone): (&str, &str, &str),
        app: std::net::SocketAddr,
        extra: &[String],
    ) -> Sidecar {
        let port = atoll_testing::free_port;
        // A replacement (--take-over) serves the addresses of the one it
        // replaces: they come in `extra`.
        let given = |flag: &str| {
            extra
                .iter()
                .find_map(|a| a.strip_prefix(&format!("--{flag}=")).map(str::to_owned))
        };
        let inbound = given("inbound").unwrap_or_else(|| format!("127.0.0.1:{}", port()));
        let outbound = given("outbound").unwrap_or_else(|| format!("127.0.0.1:{}", port()));
        let admin = given("admin").unwrap_or_else(|| format!("127.0.0.1:{}", port()));
        let log = dir.join(format!(
            "{instance}{}.log",
            if extra.iter().any(|a| a == "--take-over") {
                "-new"
            } else {
                ""
            }
        ));
        let child = Command::new(ATOLL)
            .arg("sidecar")
            .args(["--instance", instance, "--cell", cell, "--zone", zone])
            .args(["--service", service])
            .arg(format!("--app={app}"))
            .arg(format!("--inbound={inbound}"))
            .arg(format!("--outbound={outbound}"))
            .arg(format!("--admin={admin}"))
            .args([
                "--upgrade-socket".to_owned(),
                dir.join(format!("{instance}.sock")).display().to_string(),
            ])
            .args(["--session-ttl=3s", "--drain=200ms"])
            .arg(format!("--data-dir={}", dir.display()))
            .arg(format!("--control={}", control.url))
            .args(extra.iter().filter(|a| {
                !["--inbound=", "--outbound=", "--admin="]
                    .iter()
                    .any(|p| a.starts_with(p))
            }))
            .env("RUST_LOG", "info,atoll_sidecar=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("spawn atoll sidecar");
        let mut sidecar = Sidecar {
            child: Some(child),
            inbound,
            outbound,
            admin,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(&sidecar.admin, "/healthz"), Some((200, _))) {
            if let Some(status) = sidecar
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "sidecar {instance} exited with {status}:\n{}",
                    sidecar.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sidecar {instance} not ready:\n{}",
                sidecar.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sidecar
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Waits for it to exit by itself (an upgraded sidecar drains and
    /// goes); the exit status.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and waits for it to exit (it deregisters and drains).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                assert!(Instant::now() < deadline, "the sidecar did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 call: (status, headers in lower case, body).
fn call(
    address: &str,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        head.push_str("Content-Length: 2\r\n\r\n{}");
    } else {
        head.push_str("\r\n");
    }
    stream.write_all(head.as_bytes()).expect("write");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn json(body: &str) -> Value {
    // A chunked body has its size lines around the JSON.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |e| e + 1);
    serde_json::from_str(&body[start..end]).unwrap_or(Value::Null)
}

/// Waits until `test` holds, or panics with `what`.
pub(crate) fn eventually(within: Duration, what: &str, mut test: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !test() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_through_sidecars_land_in_the_owning_cell_and_providers_refuse_what_they_do_not_own()
{
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(APPS))
        .success();
    let dir = tempfile::tempdir().expect("temp dir");
    let bank1 = Backend::start("bank-rz01-0", "rz01", "127.0.0.1").await;
    let bank2 = Backend::start("bank-rz02-0", "rz02", "127.0.0.1").await;
    let web1 = Backend::start("web-rz01-0", "rz01", "127.0.0.1").await;
    let web2 = Backend::start("web-rz02-0", "rz02", "127.0.0.1").await;
    let provider1 = Sidecar::start(
        &control,
        dir.path(),
        "bank-rz01-0",
        ("bank", "rz01", "hz-a"),
        bank1.address(),
    );
    let mut provider2 = Sidecar::start(
        &control,
        dir.path(),
        "bank-rz02-0",
        ("bank", "rz02", "hz-b"),
        bank2.address(),
    );
    let caller = Sidecar::start(
        &control,
        dir.path(),
        "web-rz01-0",
        ("web", "rz01", "hz-a"),
        web1.address(),
    );
    let _web2_sidecar = Sidecar::start(
        &control,
        dir.path(),
        "web-rz02-0",
        ("web", "rz02", "hz-b"),
        web2.address(),
    );
    eventually(
        Duration::from_secs(15),
        "the sidecars register their instances",
        || {
            let listed = control.json(&["registry", "list"]);
            listed["instances"].as_array().map_or(0, Vec::len) == 4
        },
    );
    let listed = control.json(&["registry", "list", "bank", "--cell", "rz01"]);
    assert_eq!(listed["instances"][0]["mode"], "sidecar", "{listed}");
    assert_eq!(
        listed["instances"][0]["address"],
        provider1.inbound.as_str(),
        "{listed}"
    );

    // By the call's own key (the bank's rule reads x-user-id): user 7 is
    // shard 7 (rz01), user 30 shard 30 (rz02).
    for (user, backend, cell) in [("7", &bank1, "rz01"), ("30", &bank2, "rz02")] {
        let before = backend.requests();
        let (status, _, body) = call(
            &caller.outbound,
            "GET",
            "bank",
            "/api/balance",
            &[("x-user-id", user)],
        );
        assert_eq!(status, 200, "{body}\n{}", caller.log());
        assert_eq!(json(&body)["cell"], cell, "{body}");
        assert_eq!(backend.requests(), before + 1);
        let seen = backend.last().expect("a request");
        assert_eq!(seen["headers"]["x-atoll-cell"], cell, "{seen}");
        assert_eq!(seen["headers"]["x-atoll-shard"], user, "{seen}");
        assert_eq!(seen["headers"]["x-atoll-key"], user, "{seen}");
        assert!(seen["headers"]["x-atoll-epoch"].is_string(), "{seen}");
    }
    // By the key propagated from the app's inbound request: the app passes
    // the gateway's baggage on, as it passes trace context on.
    let (status, _, body) = call(
        &caller.outbound,
        "POST",
        "bank",
        "/api/credit",
        &[("baggage", "atoll.key=30")],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["cell"], "rz02", "{body}");

    // A local service: the caller's own cell first.
    for _ in 0..5 {
        let (status, _, body) = call(&caller.outbound, "GET", "web", "/", &[]);
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["cell"], "rz01", "{body}");
    }

    // A call without a key is the app's to answer (a health check).
    let (status, _, body) = call(&provider1.inbound, "GET", "bank", "/healthz", &[]);
    assert_eq!(status, 200, "{body}");

    // Bad calls are refused by the caller's sidecar, saying why.
    let (status, _, body) = call(&caller.outbound, "GET", "bank", "/api/balance", &[]);
    assert_eq!(status, 400, "{body}");
    assert_eq!(json(&body)["code"], "missingKey", "{body}");
    let (status, _, body) = call(&caller.outbound, "GET", "nosuch", "/", &[]);
    assert_eq!(status, 404, "{body}");
    assert_eq!(json(&body)["code"], "unknownService", "{body}");

    // The provider re-checks. A caller with a wrong (or stale) map sends
    // user 30 to rz01: refused, not served.
    let before = bank1.requests();
    let (status, headers, body) = call(
        &provider1.inbound,
        "GET",
        "bank",
        "/api/balance",
        &[("x-user-id", "30")],
    );
    assert_eq!(status, 421, "{body}");
    assert_eq!(json(&body)["code"], "notOwner", "{body}");
    assert!(
        headers.contains(&("x-atoll-refused-by".into(), "sidecar".into())),
        "{headers:?}"
    );
    let (status, _, body) = call(
        &provider1.inbound,
        "POST",
        "bank",
        "/api/credit",
        &[("x-user-id", "30")],
    );
    assert_eq!(status, 421, "{body}");
    // A write routed at another epoch than the provider's.
    let (status, _, body) = call(
        &provider1.inbound,
        "POST",
        "bank",
        "/api/credit",
        &[("x-user-id", "7"), ("x-atoll-epoch", "999")],
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(json(&body)["code"], "staleEpoch", "{body}");
    assert_eq!(bank1.requests(), before, "a refused call reached the app");
    let metrics = provider1.metrics();
    assert!(
        metrics.contains(
            r#"atoll_sidecar_refused_total{direction="inbound",service="bank",reason="notOwner"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"atoll_sidecar_refused_total{direction="inbound",service="bank",reason="staleEpoch"} 1"#
        ),
        "{metrics}"
    );

    // Shards 0-24 fenced: a write is refused by the caller's sidecar and,
    // sent anyway, by the provider's.
    let fenced = r#"
apiVersion: atoll/v1
kind: ShardMap
metadata: {name: users}
spec:
  rule: users
  epoch: 2
  assignments:
    - {shards: "0-24", cell: rz01, standby: rz02, state: fenced}
    - {shards: "25-49", cell: rz02, standby: rz01}
    - {shards: "50-74", cell: rz03, standby: rz04}
    - {shards: "75-99", cell: rz04, standby: rz03}
"#;
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(fenced))
        .success();
    eventually(
        Duration::from_secs(10),
        "the fence reaches the sidecars",
        || {
            let (status, _, _) = call(
                &provider1.inbound,
                "POST",
                "bank",
                "/api/credit",
                &[("x-user-id", "7")],
            );
            status == 503
        },
    );
    let (status, headers, body) = call(
        &caller.outbound,
        "POST",
        "bank",
        "/api/credit",
        &[("x-user-id", "7")],
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(json(&body)["code"], "shardFenced", "{body}");
    assert!(
        headers.contains(&("retry-after".into(), "1".into())),
        "{headers:?}"
    );
    // Reads still go.
    let (status, _, body) = call(
        &caller.outbound,
        "GET",
        "bank",
        "/api/balance",
        &[("x-user-id", "7")],
    );
    assert_eq!(status, 200, "{body}");

    // A provider killed (no deregistration) leaves every caller within its
    // session's TTL: user 30 then has no instance to go to.
    assert!(
        caller.metrics().contains("atoll_sidecar_endpoints 4"),
        "{}",
        caller.metrics()
    );
    provider2.kill();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(8),
        "the killed provider's session runs out and the caller forgets it",
        || caller.metrics().contains("atoll_sidecar_endpoints 3"),
    );
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
    eventually(
        Duration::from_secs(8),
        "the killed provider leaves the caller's endpoint sets",
        || {
            let (status, _, body) = call(
                &caller.outbound,
                "GET",
                "bank",
                "/api/balance",
                &[("x-user-id", "30")],
            );
            status == 503 && json(&body)["code"] == "noEndpoint"
        },
    );
    let metrics = caller.metrics();
    assert!(
        metrics.contains(r#"atoll_sidecar_calls_total{direction="outbound",service="bank",cell="rz01",result="2xx"}"#),
        "{metrics}"
    );
}

/// gRPC through two sidecars (HTTP/2 on both hops, trailers and all): the
/// provider is a real gRPC server (the control plane's own registry API),
/// behind a sidecar in the gzone; the caller's sidecar sends a global
/// service's write there.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_cross_two_sidecars_with_their_status_and_trailers() {
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    let fx = "apiVersion: atoll/v1\nkind: App\nmetadata: {name: fx}\nspec: {service: fx-rates, cells: [gz01], replicas: 1, command: [fx]}\n";
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(&format!("{APPS}---\n{fx}")))
        .success();
    let dir = tempfile::tempdir().expect("temp dir");
    let grpc_server: std::net::SocketAddr = control
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("control address");
    let _provider = Sidecar::start_with(
        &control,
        dir.path(),
        "fx-gz01-0",
        ("fx-rates", "gz01", "hz-a"),
        grpc_server,
        &["--app-protocol=grpc".to_owned()],
    );
    let app = Backend::start("web-rz01-0", "rz01", "127.0.0.1").await;
    let caller = Sidecar::start(
        &control,
        dir.path(),
        "web-rz01-0",
        ("web", "rz01", "hz-a"),
        app.address(),
    );
    eventually(
        Duration::from_secs(15),
        "the gRPC provider registers",
        || {
            let listed = control.json(&["registry", "list", "fx-rates"]);
            listed["instances"][0]["protocol"] == "grpc"
        },
    );
    // The caller names the service as the authority.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", caller.outbound))
        .expect("endpoint")
        .origin("http://fx-rates".parse().expect("origin"))
        .connect()
        .await
        .expect("connect to the sidecar");
    let mut client = atoll_api::registry::registry_client::RegistryClient::new(channel);
    let answer = client
        .register(atoll_api::registry::RegisterRequest {
            registrant: Some(atoll_api::registry::Registrant {
                name: "hz-a".into(),
                role: "agent".into(),
                zone: "hz-a".into(),
                workspace: String::new(),
            }),
            session: 0,
            ttl_ms: 0,
            instances: Vec::new(),
        })
        .await
        .expect("a unary call through both sidecars")
        .into_inner();
    assert_ne!(answer.session, 0, "{answer:?}");
    // An error status travels back as the server sent it (trailers only).
    let refused = client
        .heartbeat(atoll_api::registry::HeartbeatRequest {
            registrant: None,
            session: 0,
        })
        .await
        .expect_err("no registrant");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("registrant"), "{refused:?}");
    let metrics = caller.metrics();
    assert!(
        metrics.contains(r#"atoll_sidecar_calls_total{direction="outbound",service="fx-rates",cell="gz01",result="2xx"} 2"#),
        "{metrics}"
    );
}

/// An identity for an in-process app of the test (SDK mode).
fn sdk_identity(
    control: &Control,
    instance: &str,
    (service, cell, zone): (&str, &str, &str),
) -> atoll_sdk::Identity {
    atoll_sdk::Identity {
        control: control.url.clone(),
        instance: instance.into(),
        cell: cell.into(),
        zone: zone.into(),
        service: service.into(),
        workspace: String::new(),
        cache: None,
        transport: atoll_transport::Transport::plain(),
        tls_files: atoll_transport::TlsFiles::default(),
        role: "app".into(),
    }
}

/// A provider moves from SDK mode to sidecar mode and back while an SDK
/// client and a sidecar'd caller call it without pause: not one call
/// fails, and the calls of each phase reached it the way that phase says.
#[tokio::test(flavor = "multi_thread")]
async fn a_provider_moves_between_sdk_and_sidecar_mode_under_load_with_no_failed_call() {
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(APPS))
        .success();
    let dir = tempfile::tempdir().expect("temp dir");
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let bank = Backend::start("bank-rz01-0", "rz01", "127.0.0.1").await;
    let provider_cell = atoll_sdk::Cell::start(
        sdk_identity(&control, "bank-rz01-0", ("bank", "rz01", "hz-a")),
        shutdown.clone(),
    );
    provider_cell.ready().await;
    let mode = |wanted: &'static str| {
        let control = &control;
        move || {
            let listed = control.json(&["registry", "list", "bank"]);
            listed["instances"][0]["mode"] == wanted
        }
    };
    // SDK mode: the app registers itself at its own port.
    let sdk = atoll_sdk::mesh::register(
        &provider_cell,
        "127.0.0.1",
        bank.address().port(),
        "http",
        Duration::from_secs(3),
    )
    .expect("register");
    eventually(
        Duration::from_secs(10),
        "registered in SDK mode",
        mode("sdk"),
    );

    // Callers: an SDK client in-process, and an app behind a sidecar.
    let caller_cell = atoll_sdk::Cell::start(
        sdk_identity(&control, "web-rz02-0", ("web", "rz02", "hz-b")),
        shutdown.clone(),
    );
    caller_cell.ready().await;
    let client = atoll_sdk::mesh::Client::start(caller_cell);
    let web = Backend::start("web-rz01-0", "rz01", "127.0.0.1").await;
    let caller = Sidecar::start(
        &control,
        dir.path(),
        "web-rz01-0",
        ("web", "rz01", "hz-a"),
        web.address(),
    );
    let outbound = caller.outbound.clone();

    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let running = running.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let started = Instant::now();
            while running.load(std::sync::atomic::Ordering::SeqCst)
                && started.elapsed() < Duration::from_secs(60)
            {
                // One call in SDK mode (key passed by the app)...
                let request = http::Request::post("/api/credit")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                    .expect("request");
                match client.call("bank", request, Some("7")).await {
                    Ok(response) if response.status() == 200 => ok += 1,
                    Ok(response) => failed.push(format!("sdk: {}", response.status())),
                    Err(error) => failed.push(format!("sdk: {error}")),
                }
                // ...and one through the caller's sidecar.
                let outbound = outbound.clone();
                let (status, _, body) = tokio::task::spawn_blocking(move || {
                    call(
                        &outbound,
                        "POST",
                        "bank",
                        "/api/credit",
                        &[("x-user-id", "7")],
                    )
                })
                .await
                .expect("call");
                if status == 200 {
                    ok += 1;
                } else {
                    failed.push(format!("sidecar: {status} {body}"));
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let direct = bank.requests();
    assert!(direct > 0, "calls reach the provider in SDK mode");

    // To sidecar mode: the sidecar registers (replacing the SDK's record),
    // then the app ends its own registration.
    let mut sidecar = Sidecar::start(
        &control,
        dir.path(),
        "bank-rz01-0",
        ("bank", "rz01", "hz-a"),
        bank.address(),
    );
    eventually(
        Duration::from_secs(10),
        "registered in sidecar mode",
        mode("sidecar"),
    );
    sdk.close().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = sidecar.metrics();
    assert!(
        before.contains(r#"atoll_sidecar_calls_total{direction="inbound",service="bank",cell="rz01",result="2xx"}"#),
        "calls go through the provider's sidecar now: {before}"
    );
    let listed = control.json(&["registry", "list", "bank"]);
    assert_eq!(
        listed["instances"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // And back: the app registers again, then the sidecar stops.
    let sdk = atoll_sdk::mesh::register(
        &provider_cell,
        "127.0.0.1",
        bank.address().port(),
        "http",
        Duration::from_secs(3),
    )
    .expect("register");
    eventually(
        Duration::from_secs(10),
        "registered in SDK mode again",
        mode("sdk"),
    );
    sidecar.stop();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let listed = control.json(&["registry", "list", "bank"]);
    assert_eq!(
        listed["instances"][0]["mode"], "sdk",
        "the sidecar's exit left the record: {listed}"
    );

    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = load.await.expect("load");
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok > 100, "only {ok} calls");
    eprintln!("migration under load: {ok} calls, none failed");
    sdk.close().await;
}
