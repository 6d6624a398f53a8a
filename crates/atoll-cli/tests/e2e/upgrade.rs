//! Hot upgrade of sidecars under load: a new sidecar process takes the
//! listening sockets of the running one over a Unix socket, the old one
//! drains (HTTP/1.1 closes after the request in flight, HTTP/2 GOAWAY) and
//! hands its live Bolt connections over between requests. Under HTTP/1.1,
//! gRPC and Bolt load through the upgraded sidecars, no call fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atoll_testing::backend::Backend;

use crate::harness::{Control, examples};
use crate::sidecar::{APPS, Sidecar, eventually};

const MORE_APPS: &str = "---
apiVersion: atoll/v1
kind: App
metadata: {name: fx}
spec: {service: fx-rates, cells: [gz01], replicas: 1, command: [fx]}
---
apiVersion: atoll/v1
kind: App
metadata: {name: shadow}
spec: {service: bank-shadow, cells: [rz01], replicas: 1, command: [shadow], protocol: bolt}
";

/// Whether a call failed in the client's transport before it was sent
/// (hyper's `Canceled`): what gRPC clients retry transparently.
fn never_left(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled();
        }
        source = error.source();
    }
    false
}

/// Replaces `old` by a sidecar taking its sockets over, and waits for the
/// old one to drain and exit.
fn upgrade(
    control: &Control,
    dir: &std::path::Path,
    old: &mut Sidecar,
    instance: &str,
    placed: (&str, &str, &str),
    app: std::net::SocketAddr,
    extra: &[String],
) -> Sidecar {
    let mut args = vec![
        format!("--inbound={}", old.inbound),
        format!("--outbound={}", old.outbound),
        format!("--admin={}", old.admin),
        "--take-over".to_owned(),
    ];
    args.extend_from_slice(extra);
    let new = Sidecar::start_with(control, dir, instance, placed, app, &args);
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "the old sidecar exited with {status}:\n{}",
        old.log()
    );
    new
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecars_upgraded_in_place_under_http_grpc_and_bolt_load_fail_no_call() {
    let classpath = crate::bolt::java_classpath();
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(&format!("{APPS}{MORE_APPS}")))
        .success();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();

    // Providers: HTTP (bank), gRPC (the control plane's own API as
    // fx-rates) and Bolt (a Java server as bank-shadow).
    let bank = Backend::start("bank-rz01-0", "rz01", "127.0.0.1").await;
    let grpc: std::net::SocketAddr = control
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    let java_port = atoll_testing::free_port();
    let _java =
        crate::bolt::JavaServer::start(&classpath, java_port, "shadow", &d.join("java.log"));
    let java: std::net::SocketAddr = format!("127.0.0.1:{java_port}").parse().expect("address");
    let bolt = vec!["--app-protocol=bolt".to_owned()];
    let grpc_flag = vec!["--app-protocol=grpc".to_owned()];
    let mut http_provider = Sidecar::start(
        &control,
        d,
        "bank-rz01-0",
        ("bank", "rz01", "hz-a"),
        bank.address(),
    );
    let mut grpc_provider = Sidecar::start_with(
        &control,
        d,
        "fx-gz01-0",
        ("fx-rates", "gz01", "hz-a"),
        grpc,
        &grpc_flag,
    );
    let mut bolt_provider = Sidecar::start_with(
        &control,
        d,
        "shadow-rz01-0",
        ("bank-shadow", "rz01", "hz-a"),
        java,
        &bolt,
    );
    // The caller's sidecar (itself upgraded too, with its app's
    // connections to it).
    let web = Backend::start("web-rz01-0", "rz01", "127.0.0.1").await;
    let outbound_bolt = format!("127.0.0.1:{}", atoll_testing::free_port());
    let caller_flags = vec![format!("--outbound-bolt={outbound_bolt}")];
    let mut caller = Sidecar::start_with(
        &control,
        d,
        "web-rz01-0",
        ("web", "rz01", "hz-a"),
        web.address(),
        &caller_flags,
    );
    eventually(Duration::from_secs(15), "every provider registers", || {
        let listed = control.json(&["registry", "list"]);
        listed["instances"].as_array().map_or(0, Vec::len) == 4
    });

    let running = Arc::new(AtomicBool::new(true));
    // HTTP/1.1 with keep-alive, as an app's pooled client calls.
    let http_load = {
        let running = running.clone();
        let outbound = caller.outbound.clone();
        tokio::spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let (mut ok, mut failed) = (0u32, Vec::new());
            let started = Instant::now();
            while running.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(90) {
                let request = http::Request::post(format!("http://{outbound}/api/credit"))
                    .header("host", "bank")
                    .header("x-user-id", "7")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                    .expect("request");
                match client.request(request).await {
                    Ok(response) if response.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                        ok += 1;
                    }
                    Ok(response) => failed.push(format!("status {}", response.status())),
                    Err(error) => failed.push(format!("{error:?}")),
                }
            }
            (ok, failed)
        })
    };
    // gRPC: one HTTP/2 connection to the caller's sidecar.
    let grpc_load = {
        let running = running.clone();
        let outbound = caller.outbound.clone();
        tokio::spawn(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
                .expect("endpoint")
                .origin("http://fx-rates".parse().expect("origin"))
                .connect()
                .await
                .expect("connect");
            let mut client = atoll_api::registry::registry_client::RegistryClient::new(channel);
            let (mut ok, mut failed, mut resent) = (0u32, Vec::new(), 0u32);
            let started = Instant::now();
            while running.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(90) {
                // As gRPC's own clients do (gRFC A6, "transparent retry"):
                // a call the transport cancelled before sending it (the
                // connection got GOAWAY while the call waited for it) is
                // sent again, once. tonic does not do it by itself.
                let mut heartbeat = None;
                for _ in 0..2 {
                    let answer = client
                        .heartbeat(atoll_api::registry::HeartbeatRequest {
                            registrant: Some(atoll_api::registry::Registrant {
                                name: "hz-a".into(),
                                role: "agent".into(),
                                zone: "hz-a".into(),
                                workspace: String::new(),
                            }),
                            session: 1,
                        })
                        .await;
                    let never_sent = matches!(&answer, Err(status) if status.code() == tonic::Code::Cancelled
                        && never_left(status));
                    heartbeat = Some(answer);
                    if !never_sent {
                        break;
                    }
                    resent += 1;
                }
                // The answer the server gives (no such session) is a
                // success of the path: it came from the server.
                match heartbeat {
                    Some(Err(status)) if status.code() == tonic::Code::NotFound => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            eprintln!("gRPC calls sent again after the transport cancelled them unsent: {resent}");
            (ok, failed)
        })
    };
    // Bolt: the real Java client, thousands of calls on one connection.
    let bolt_load = {
        let classpath = classpath.clone();
        let outbound_bolt = outbound_bolt.clone();
        tokio::task::spawn_blocking(move || {
            crate::bolt::java_calls(&classpath, &outbound_bolt, 4000, &["service=bank-shadow"])
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Upgrade every sidecar in the path, one after the other.
    let new_http = upgrade(
        &control,
        d,
        &mut http_provider,
        "bank-rz01-0",
        ("bank", "rz01", "hz-a"),
        bank.address(),
        &[],
    );
    let new_grpc = upgrade(
        &control,
        d,
        &mut grpc_provider,
        "fx-gz01-0",
        ("fx-rates", "gz01", "hz-a"),
        grpc,
        &grpc_flag,
    );
    let new_bolt = upgrade(
        &control,
        d,
        &mut bolt_provider,
        "shadow-rz01-0",
        ("bank-shadow", "rz01", "hz-a"),
        java,
        &bolt,
    );
    let new_caller = upgrade(
        &control,
        d,
        &mut caller,
        "web-rz01-0",
        ("web", "rz01", "hz-a"),
        web.address(),
        &caller_flags,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.store(false, Ordering::SeqCst);

    let (http_ok, http_failed) = http_load.await.expect("http load");
    let (grpc_ok, grpc_failed) = grpc_load.await.expect("grpc load");
    let bolt_calls = bolt_load.await.expect("bolt load");
    let bolt_failed: Vec<&String> = bolt_calls
        .iter()
        .filter(|l| !l.starts_with("ok "))
        .collect();
    eprintln!(
        "upgrade under load: http {http_ok} ok / {} failed, grpc {grpc_ok} ok / {} failed, bolt {} ok / {} failed",
        http_failed.len(),
        grpc_failed.len(),
        bolt_calls.len() - bolt_failed.len(),
        bolt_failed.len()
    );
    eprintln!("failures: http {http_failed:?} grpc {grpc_failed:?}");
    assert!(http_failed.is_empty(), "HTTP/1.1: {http_failed:?}");
    assert!(grpc_failed.is_empty(), "gRPC: {grpc_failed:?}");
    assert!(
        bolt_failed.is_empty(),
        "Bolt: {:?}",
        &bolt_failed[..bolt_failed.len().min(5)]
    );
    assert!(
        http_ok > 100 && grpc_ok > 100,
        "http {http_ok}, grpc {grpc_ok}"
    );
    assert_eq!(bolt_calls.len(), 4000, "every Bolt call answered");
    assert!(
        new_bolt.log().contains("took over from the old sidecar"),
        "{}",
        new_bolt.log()
    );
    assert!(
        new_caller.log().contains("bolt_connections="),
        "{}",
        new_caller.log()
    );
    // The new sidecars keep the registrations.
    let listed = control.json(&["registry", "list"]);
    assert_eq!(
        listed["instances"].as_array().map_or(0, Vec::len),
        4,
        "{listed}"
    );
    drop((new_http, new_grpc));
}
