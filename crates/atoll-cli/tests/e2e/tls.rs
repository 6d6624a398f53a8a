//! The control plane over TLS with certificates from `atoll ca`: the CLI
//! reaches it with the CA bundle and is refused, with what to do, without
//! it or with another CA's; a node follows the config stream over mTLS with
//! its own certificate, and is who its certificate says: a claim that
//! differs, a node without a certificate, a lease of another zone's cell and
//! a forged "passed on by a replica" are refused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{ATOLL, Control, examples};

pub(crate) fn ca(dir: &Path, name: &str) -> PathBuf {
    let ca = dir.join(name);
    let status = Command::new(ATOLL)
        .args(["ca", "init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    ca
}

pub(crate) fn issue(ca: &Path, id: &str, out: &Path) {
    let status = Command::new(ATOLL)
        .args(["ca", "issue", "--dir", ca.to_str().unwrap(), "--id", id])
        .args(["--host", "127.0.0.1", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
}

/// A CA in a new directory and a control plane serving TLS with a
/// replica's certificate from it: (directory, CA dir, root bundle, control).
fn tls_control() -> (tempfile::TempDir, PathBuf, PathBuf, Control) {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path(), "ca");
    let root = ca_dir.join("root.pem");
    let control_cert = dir.path().join("control");
    issue(
        &ca_dir,
        "atoll://default/control/-/replica-1",
        &control_cert,
    );
    let control = Control::start_with(vec![
        format!("--ca={}", root.display()),
        format!("--cert={}", control_cert.with_extension("pem").display()),
        format!("--key={}", control_cert.with_extension("key").display()),
    ]);
    (dir, ca_dir, root, control)
}

struct Node(parking_lot::Mutex<u64>);

impl atoll_node::Installer for Node {
    fn install(&self, config: &atoll_node::NodeConfig) -> Result<(), String> {
        *self.0.lock() = config.version;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_tls_and_a_node_follows_it_over_mtls() {
    let (dir, ca_dir, root, control) = tls_control();
    assert!(control.url.starts_with("https://"), "{}", control.url);
    let ca_flag = format!("--ca={}", root.display());

    control
        .atoll(&[&ca_flag, "apply", "-f", examples().to_str().unwrap()])
        .success();
    let cells = control.json(&[&ca_flag, "get", "cells"]);
    assert_eq!(cells["items"].as_array().map(Vec::len), Some(6), "{cells}");

    // Without the CA bundle: refused before anything is sent, saying what to give.
    control
        .atoll(&["get", "cells"])
        .fails(1, &["https://", "no CA bundle", "--ca"]);
    // With another CA's bundle: the server's certificate is not trusted.
    let other = ca(dir.path(), "other");
    control
        .atoll(&[
            &format!("--ca={}", other.join("root.pem").display()),
            "get",
            "cells",
        ])
        .fails(6, &["certificate"]);
    // Plain HTTP to a TLS port: refused, not hung.
    let plain = control.url.replace("https://", "http://");
    control
        .atoll(&["--control", &plain, "get", "cells"])
        .fails(6, &[]);

    // A gateway's certificate, and the config stream over mTLS.
    let gateway = dir.path().join("gw");
    issue(&ca_dir, "atoll://default/gateway/hz-a/gw-hz-a", &gateway);
    let identity = atoll_transport::Identity::from_files(
        &gateway.with_extension("pem"),
        &gateway.with_extension("key"),
    )
    .unwrap();
    let trust = atoll_transport::Trust::from_file(&root).unwrap();
    let tls = atoll_transport::ClientTls::new(&trust, Some(&identity)).unwrap();
    let installed = std::sync::Arc::new(Node(parking_lot::Mutex::new(0)));
    let client = atoll_node::NodeClient::new(
        atoll_node::NodeOptions {
            control: control.url.clone(),
            name: "gw-hz-a".into(),
            role: "gateway".into(),
            zone: "hz-a".into(),
            cell: String::new(),
            workspace: String::new(),
            cache: None,
            transport: atoll_transport::Transport::with_tls(tls),
        },
        installed.clone(),
    );
    let status = client.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let following = tokio::spawn(client.run(stopped));
    let revision = control.json(&[&ca_flag, "status"])["revision"]
        .as_u64()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while *installed.0.lock() < revision {
        assert!(
            std::time::Instant::now() < deadline,
            "the node did not get version {revision} over mTLS: {:?}\n{}",
            status.last_error(),
            control.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nodes = control.json(&[&ca_flag, "nodes"]);
    assert!(nodes.to_string().contains("gw-hz-a"), "{nodes}");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), following).await;
}

#[test]
fn tls_flags_that_do_not_fit_together_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path(), "ca");
    let cert = dir.path().join("c");
    issue(&ca_dir, "atoll://default/control/-/replica-1", &cert);
    let run = |args: &[&str]| {
        Command::new(ATOLL)
            .args(args)
            .env("ATOLL_STATE_DIR", dir.path())
            .env_remove("ATOLL_CONTROL")
            .output()
            .unwrap()
    };
    let pem = cert.with_extension("pem");
    let key = cert.with_extension("key");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--cert", pem.to_str().unwrap(), "status"],
            "--cert and --key go together",
        ),
        (
            &[
                "--cert",
                pem.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "status",
            ],
            "--cert needs --ca",
        ),
        (
            &["--ca", "/nonexistent/root.pem", "status"],
            "cannot read CA bundle",
        ),
        (
            &["--ca", key.to_str().unwrap(), "status"],
            "holds no CERTIFICATE",
        ),
    ];
    for (args, needle) in cases {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// A TLS client of the config stream's service with `identity`.
async fn stream_client(
    root: &Path,
    cert: Option<&Path>,
    url: &str,
) -> atoll_api::config::config_stream_client::ConfigStreamClient<tonic::transport::Channel> {
    let trust = atoll_transport::Trust::from_file(root).unwrap();
    let identity = cert.map(|cert| {
        atoll_transport::Identity::from_files(
            &cert.with_extension("pem"),
            &cert.with_extension("key"),
        )
        .unwrap()
    });
    let tls = atoll_transport::ClientTls::new(&trust, identity.as_ref()).unwrap();
    let channel = atoll_transport::Transport::with_tls(tls)
        .channels(atoll_transport::ChannelOptions::default())
        .connect(url)
        .await
        .unwrap();
    atoll_api::config::config_stream_client::ConfigStreamClient::new(channel)
}

fn lease(name: &str, zone: &str, cell: &str) -> atoll_api::config::LeaseRequest {
    atoll_api::config::LeaseRequest {
        node: Some(atoll_api::config::NodeIdentity {
            name: name.into(),
            role: "app".into(),
            zone: zone.into(),
            cell: cell.into(),
            workspace: String::new(),
        }),
        applied_version: 1_000_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_who_its_certificate_says() {
    let (dir, ca_dir, root, control) = tls_control();
    let ca_flag = format!("--ca={}", root.display());
    control
        .atoll(&[&ca_flag, "apply", "-f", examples().to_str().unwrap()])
        .success();
    let app = dir.path().join("bank");
    issue(&ca_dir, "atoll://default/sdk/hz-a/bank-rz01-0", &app);

    // Its own cell, in its zone: granted (at whatever version; the point
    // is that it is not refused for who it is).
    let mut client = stream_client(&root, Some(&app), &control.url).await;
    let own = client
        .renew_lease(lease("bank-rz01-0", "hz-a", "rz01"))
        .await
        .map(tonic::Response::into_inner);
    assert!(own.is_ok(), "{own:?}");
    // A cell of another zone: refused, naming both zones.
    let other = client
        .renew_lease(lease("bank-rz01-0", "hz-a", "rz03"))
        .await
        .expect_err("refused");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    assert!(other.message().contains("sh-a"), "{}", other.message());
    // Claiming another name or zone than the certificate's: refused.
    for (name, zone) in [("bank-rz03-0", "hz-a"), ("bank-rz01-0", "sh-a")] {
        let claimed = client
            .renew_lease(lease(name, zone, "rz03"))
            .await
            .expect_err("refused");
        assert_eq!(claimed.code(), tonic::Code::PermissionDenied, "{claimed:?}");
        assert!(
            claimed
                .message()
                .contains("a node is who its certificate says"),
            "{}",
            claimed.message()
        );
    }
    // A forged "passed on by a replica" from a node's certificate.
    let mut forged = tonic::Request::new(lease("bank-rz03-0", "sh-a", "rz03"));
    forged.metadata_mut().insert(
        "x-atoll-forwarded",
        tonic::metadata::MetadataValue::from_static("1"),
    );
    let error = client.renew_lease(forged).await.expect_err("refused");
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");
    assert!(
        error.message().contains("only a control-plane replica"),
        "{}",
        error.message()
    );

    // No certificate at all: refused with what to give.
    let mut anonymous = stream_client(&root, None, &control.url).await;
    let error = anonymous
        .renew_lease(lease("bank-rz03-0", "sh-a", "rz03"))
        .await
        .expect_err("refused");
    assert_eq!(error.code(), tonic::Code::Unauthenticated, "{error:?}");
    assert!(error.message().contains("--cert"), "{}", error.message());

    // An agent's certificate of hz-a reporting as the agent of sh-a.
    let agent = dir.path().join("agent");
    issue(&ca_dir, "atoll://default/agent/hz-a/agent-hz-a", &agent);
    let mut client = stream_client(&root, Some(&agent), &control.url).await;
    let error = client
        .report_endpoints(atoll_api::config::EndpointsReport {
            node: Some(atoll_api::config::NodeIdentity {
                name: "agent-hz-a".into(),
                role: "agent".into(),
                zone: "sh-a".into(),
                cell: String::new(),
                workspace: String::new(),
            }),
            endpoints: Vec::new(),
            gone: vec!["bank-sh-a".into()],
            message: "claims sh-a".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");

    // A gateway that says it is another gateway cannot follow the stream.
    let gateway = dir.path().join("gw");
    issue(&ca_dir, "atoll://default/gateway/hz-a/gw-hz-a", &gateway);
    let identity = atoll_transport::Identity::from_files(
        &gateway.with_extension("pem"),
        &gateway.with_extension("key"),
    )
    .unwrap();
    let trust = atoll_transport::Trust::from_file(&root).unwrap();
    let tls = atoll_transport::ClientTls::new(&trust, Some(&identity)).unwrap();
    let installed = std::sync::Arc::new(Node(parking_lot::Mutex::new(0)));
    let client = atoll_node::NodeClient::new(
        atoll_node::NodeOptions {
            control: control.url.clone(),
            name: "gw-sh-a".into(),
            role: "gateway".into(),
            zone: "sh-a".into(),
            cell: String::new(),
            workspace: String::new(),
            cache: None,
            transport: atoll_transport::Transport::with_tls(tls),
        },
        installed.clone(),
    );
    let status = client.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let following = tokio::spawn(client.run(stopped));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if status
            .last_error()
            .is_some_and(|e| e.contains("a node is who its certificate says"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected a refusal, got {:?}",
            status.last_error()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(*installed.0.lock(), 0, "it received nothing");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), following).await;
}
