//! The command line itself: help, exit codes, finding the control plane.

use std::process::Command;

use crate::harness::{ATOLL, Control};

#[test]
fn every_command_has_help() {
    for command in [
        "control", "apply", "get", "delete", "history", "rollback", "nodes", "barrier", "audit",
        "watch", "status",
    ] {
        let output = Command::new(ATOLL)
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(output.status.success(), "atoll {command} --help failed");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains("Usage: atoll"),
            "atoll {command} --help:\n{text}"
        );
    }
    let output = Command::new(ATOLL).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("Exit codes: 0 success"), "{text}");
}

#[test]
fn an_unreachable_control_plane_is_exit_6_with_advice() {
    let port = atoll_testing::free_port();
    let output = Command::new(ATOLL)
        .args(["get", "cells", "--control", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(6));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains(&format!(
            "cannot reach the control plane at http://127.0.0.1:{port} (from --control)"
        )),
        "{text}"
    );
    assert!(text.contains("start one with `atoll control`"), "{text}");
}

#[test]
fn usage_errors_are_exit_2() {
    let control = Control::start();
    control
        .atoll(&["get", "cellz"])
        .fails(2, &["unknown kind `cellz`"]);
    control
        .atoll(&["history", "users"])
        .fails(2, &["name a resource as KIND/NAME"]);
    control.atoll(&["apply"]).fails(2, &["--filename"]);
}

#[test]
fn a_busy_port_is_named_with_the_flag_to_change_it() {
    let control = Control::start();
    let address = control.url.trim_start_matches("http://").to_owned();
    let output = Command::new(ATOLL)
        .args([
            "control",
            "--insecure",
            "--no-discovery",
            "--listen",
            &address,
        ])
        .env("ATOLL_STATE_DIR", control.state.path().join("other"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains(&format!("{address} is already in use")) && text.contains("--listen"),
        "{text}"
    );
}

#[test]
fn the_env_var_and_flag_override_discovery() {
    let control = Control::start();
    // A discovery file that points at a dead port...
    let state = tempfile::tempdir().unwrap();
    let dead = atoll_testing::free_port();
    std::fs::write(
        state.path().join("control.json"),
        format!("{{\"url\": \"http://127.0.0.1:{dead}\", \"pid\": 1, \"store\": \"embedded:/x\"}}"),
    )
    .unwrap();
    let run = |args: &[&str], env: Option<&str>| {
        let mut command = Command::new(ATOLL);
        command
            .args(args)
            .env("ATOLL_STATE_DIR", state.path())
            .env_remove("ATOLL_CONTROL");
        if let Some(url) = env {
            command.env("ATOLL_CONTROL", url);
        }
        command.output().unwrap()
    };
    // ...is what commands use without flags,
    let output = run(&["status"], None);
    assert_eq!(output.status.code(), Some(6));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains(&format!("127.0.0.1:{dead}")) && text.contains("control.json"),
        "{text}"
    );
    // but the flag and the environment variable win over it.
    let output = run(&["status", "--control", &control.url], None);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = run(&["status"], Some(&control.url));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn metrics_openapi_and_health_are_served() {
    let control = Control::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let get = |path: &str| {
            let http = http.clone();
            let url = format!("{}{path}", control.url);
            async move { http.get(url).send().await.unwrap() }
        };
        assert_eq!(get("/healthz").await.status(), 200);
        assert_eq!(get("/readyz").await.status(), 200);
        let openapi: serde_json::Value = get("/openapi.json").await.json().await.unwrap();
        assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
        for path in ["/v1/apply", "/v1/barrier", "/v1/nodes", "/v1/resources/{kind}/{name}/rollback"] {
            assert!(openapi["paths"][path].is_object(), "OpenAPI lacks {path}");
        }
        // A bad request body is a JSON error, not a panic or HTML.
        let response = http
            .post(format!("{}/v1/apply", control.url))
            .header("content-type", "application/json")
            .body("{\"manifests\": 5}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "badRequest");
        let response = get("/v1/nope").await;
        assert_eq!(response.status(), 404);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("no endpoint GET /v1/nope"));

        let metrics = get("/metrics").await.text().await.unwrap();
        assert!(metrics.contains("atoll_control_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1"), "{metrics}");
        assert!(metrics.contains("atoll_control_store_revision"), "{metrics}");
        assert!(metrics.ends_with("# EOF\n"));
    });
}

#[test]
fn atoll_ca_makes_a_ca_issues_from_it_rotates_it_and_refuses_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca = ca.to_str().unwrap();
    let run = |args: &[&str]| Command::new(ATOLL).args(args).output().unwrap();
    let init = run(&["ca", "init", "--dir", ca]);
    assert!(init.status.success(), "{init:?}");
    assert!(String::from_utf8_lossy(&init.stdout).contains("root.pem"));
    let again = run(&["ca", "init", "--dir", ca]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a CA"));

    let out = dir.path().join("replica-1");
    let issue = run(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "--id",
        "atoll://default/control/-/replica-1",
        "--host",
        "127.0.0.1",
        "--lifetime",
        "2h",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(issue.status.success(), "{issue:?}");
    let pem = std::fs::read_to_string(out.with_extension("pem")).unwrap();
    assert_eq!(
        pem.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and intermediate"
    );
    let leaf: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
    assert_eq!(
        atoll_identity::id_of_certificate(&leaf)
            .unwrap()
            .to_string(),
        "atoll://default/control/-/replica-1"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(out.with_extension("key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let bad = run(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "--id",
        "atoll://default/king/-/x",
        "--out",
        "/tmp/never",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("the role must be"));
    let before = std::fs::read_to_string(dir.path().join("ca/intermediate.pem")).unwrap();
    let rotate = run(&["ca", "rotate", "--dir", ca]);
    assert!(rotate.status.success(), "{rotate:?}");
    let after = std::fs::read_to_string(dir.path().join("ca/intermediate.pem")).unwrap();
    assert_ne!(before, after);
    let show = run(&["ca", "show", "--dir", ca]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("intermediate ends"));
    let missing = run(&[
        "ca",
        "show",
        "--dir",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("atoll ca init"));
}
