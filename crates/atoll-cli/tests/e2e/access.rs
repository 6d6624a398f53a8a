//! Access control on a control plane serving TLS: API tokens made, used,
//! listed, revoked and expiring; roles bound per workspace, deny by
//! default; a node's certificate reads its workspace only; a caller forged
//! as "passed on by a replica" is refused; the audit log names the verified
//! user, never the one claimed with `--as`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{ATOLL, Control, examples};

fn ca(dir: &Path) -> PathBuf {
    let ca = dir.join("ca");
    let out = Command::new(ATOLL)
        .args(["ca", "init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    ca
}

fn issue(ca: &Path, id: &str, out: &Path) {
    let status = Command::new(ATOLL)
        .args(["ca", "issue", "--dir", ca.to_str().unwrap(), "--id", id])
        .args(["--host", "127.0.0.1", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
}

struct Secure {
    dir: tempfile::TempDir,
    ca_dir: PathBuf,
    ca_flag: String,
    control: Control,
}

fn secure_control() -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let root = ca_dir.join("root.pem");
    let cert = dir.path().join("control");
    issue(&ca_dir, "atoll://default/control/-/replica-1", &cert);
    let control = Control::start_with(vec![
        format!("--ca={}", root.display()),
        format!("--cert={}", cert.with_extension("pem").display()),
        format!("--key={}", cert.with_extension("key").display()),
    ]);
    Secure {
        ca_flag: format!("--ca={}", root.display()),
        dir,
        ca_dir,
        control,
    }
}

impl Secure {
    /// A new API token made by the admin: `atoll token create ARGS`.
    fn token(&self, args: &[&str]) -> String {
        let mut all = vec![self.ca_flag.as_str(), "token", "create"];
        all.extend(args);
        let run = self.control.atoll(&all).success();
        let token = run.stdout().trim().to_owned();
        assert!(token.starts_with("atk_"), "{token}");
        token
    }

    fn run(&self, token: Option<&str>, args: &[&str]) -> crate::harness::Run {
        let mut all = vec![self.ca_flag.as_str()];
        all.extend(args);
        self.control.atoll_as(token, &all, None)
    }

    fn apply(&self, token: &str, manifest: &str) -> crate::harness::Run {
        self.control.atoll_as(
            Some(token),
            &[self.ca_flag.as_str(), "apply", "-f", "-"],
            Some(manifest),
        )
    }
}

const BINDINGS: &str = r#"
apiVersion: atoll/v1
kind: Workspace
metadata: {name: default}
spec:
  bindings:
    - {role: viewer, groups: [auditors]}
    - {role: operator, users: [dora]}
---
apiVersion: atoll/v1
kind: Workspace
metadata: {name: payments}
spec:
  bindings:
    - {role: operator, users: [olga]}
"#;

const PAYMENTS_CELL: &str = r#"
apiVersion: atoll/v1
kind: Cell
metadata: {name: pay01, workspace: payments}
spec: {zone: hz-a, type: rzone}
"#;

#[test]
fn tokens_roles_and_refusals() {
    let secure = secure_control();
    let admin = secure.control.admin_token.clone().expect("an admin token");
    secure
        .run(Some(&admin), &["apply", "-f", examples().to_str().unwrap()])
        .success();
    secure.apply(&admin, BINDINGS).success();

    // Who the admin is.
    let me = secure.run(Some(&admin), &["whoami"]).success();
    assert!(
        me.stdout().contains("admin (user") && me.stdout().contains("atoll:admins"),
        "{}",
        me.stdout()
    );

    // No credential: 401 (exit 11), saying how to get one.
    secure
        .run(None, &["get", "cells"])
        .fails(11, &["no credentials", "atoll login"]);
    // A token that is not one, and one this control plane never made.
    secure
        .run(Some("hunter2"), &["get", "cells"])
        .fails(11, &["not an Atoll token"]);
    let stranger = format!("atk_{}_{}", "0".repeat(16), "a".repeat(64));
    secure
        .run(Some(&stranger), &["get", "cells"])
        .fails(11, &["is not known here"]);

    let ivan = secure.token(&["--user", "ivan", "--group", "auditors"]);
    let olga = secure.token(&["--user", "olga", "--description", "payments on-call"]);
    let dora = secure.token(&["--user", "dora"]);
    let nobody = secure.token(&["--user", "mallory"]);

    // A viewer reads, and may not apply: 403 (exit 12), naming the role.
    secure.run(Some(&ivan), &["get", "cells"]).success();
    let shard_map = std::fs::read_to_string(examples().join("20-sharding.yaml")).unwrap();
    secure
        .apply(&ivan, &shard_map)
        .fails(12, &["ivan", "operator role in workspace default"]);
    // Nobody in particular: no role anywhere.
    secure
        .run(Some(&nobody), &["get", "cells"])
        .fails(12, &["mallory", "no role there"]);

    // An operator of payments applies there, and nowhere else.
    secure.apply(&olga, PAYMENTS_CELL).success();
    secure
        .run(Some(&olga), &["get", "cells"])
        .fails(12, &["olga", "workspace default"]);
    secure
        .run(
            Some(&olga),
            &[
                "--workspace",
                "payments",
                "delete",
                "cell/pay01",
                "--dry-run",
            ],
        )
        .success();
    // Regions and zones are the fleet's: not even an operator's.
    secure
        .apply(
            &dora,
            "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: extra}\n",
        )
        .fails(12, &["atoll:admins"]);
    // Switchovers need the operator role in the default workspace.
    secure
        .run(
            Some(&ivan),
            &[
                "switchover",
                "plan",
                "--from",
                "rz01",
                "--shard-map",
                "users",
            ],
        )
        .fails(12, &["ivan"]);

    // `--as` does not change who the audit log names.
    secure
        .run(
            Some(&olga),
            &[
                "--as",
                "someone-else",
                "--workspace",
                "payments",
                "delete",
                "cell/pay01",
            ],
        )
        .success();
    let audit = secure.control.json(&[&secure.ca_flag, "audit"]);
    let last = audit["commits"]
        .as_array()
        .and_then(|c| c.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["author"], "olga", "{last}");
    // The audit log spans workspaces: not for an operator of one.
    secure
        .run(Some(&olga), &["audit"])
        .fails(12, &["atoll:viewers"]);

    // Anyone makes a token for themselves, with no more groups than theirs.
    let second = secure
        .run(Some(&olga), &["token", "create", "--ttl", "1h"])
        .success()
        .stdout()
        .trim()
        .to_owned();
    assert!(second.starts_with("atk_"), "{second}");
    secure
        .run(Some(&olga), &["token", "create", "--group", "atoll:admins"])
        .fails(12, &["olga", "atoll:admins"]);
    secure
        .run(Some(&olga), &["token", "create", "--user", "ada"])
        .fails(12, &["atoll:admins"]);
    // Each lists their own; the admin every one.
    let listed = secure
        .run(Some(&olga), &["token", "list", "-o", "json"])
        .success()
        .stdout();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let users: Vec<&str> = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["user"].as_str())
        .collect();
    assert!(users.iter().all(|u| *u == "olga"), "{listed}");
    assert_eq!(users.len(), 2, "{listed}");
    let all = secure
        .run(Some(&admin), &["token", "list"])
        .success()
        .stdout();
    assert!(
        all.contains("ivan") && all.contains("payments on-call"),
        "{all}"
    );
    assert!(
        !all.contains(ivan.rsplit('_').next().unwrap()),
        "a list shows no secret"
    );

    // Revoked: refused at once, saying by whom.
    let ivan_id = ivan.split('_').nth(1).unwrap().to_owned();
    secure
        .run(Some(&olga), &["token", "revoke", &ivan_id])
        .fails(12, &["atoll:admins"]);
    secure
        .run(Some(&admin), &["token", "revoke", &ivan_id])
        .success();
    secure
        .run(Some(&ivan), &["get", "cells"])
        .fails(11, &["revoked by admin"]);

    // Expired: refused, saying when.
    let brief = secure.token(&["--user", "ivan", "--group", "auditors", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    secure
        .run(Some(&brief), &["get", "cells"])
        .fails(11, &["expired at"]);
    secure
        .run(
            Some(&admin),
            &["token", "create", "--user", "x", "--ttl", "400d"],
        )
        .fails(1, &["ttl 400d is out of range", "366d"]);

    // `atoll login` checks the token and saves it 0600; then no flag is
    // needed.
    secure
        .control
        .atoll_as(
            None,
            &[&secure.ca_flag, "login"],
            Some(&format!("{olga}\n")),
        )
        .success();
    let saved = secure.control.state.path().join("config/credentials.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&saved).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", saved.display());
    let me = secure.run(None, &["whoami"]).success();
    assert!(me.stdout().starts_with("olga (user"), "{}", me.stdout());
    secure
        .control
        .atoll_as(
            None,
            &[&secure.ca_flag, "login"],
            Some(&format!("{stranger}\n")),
        )
        .fails(11, &["is not known here"]);
    secure.run(None, &["logout"]).success();
    secure.run(None, &["whoami", "-o", "json"]).success();
    secure
        .run(None, &["get", "cells"])
        .fails(11, &["no credentials"]);

    // Refusals are logged with who and why.
    assert!(
        secure.control.log().contains("refused"),
        "{}",
        secure.control.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_reads_its_workspace_and_nothing_more() {
    let secure = secure_control();
    let admin = secure.control.admin_token.clone().expect("an admin token");
    secure
        .run(Some(&admin), &["apply", "-f", examples().to_str().unwrap()])
        .success();
    let gateway = secure.dir.path().join("gw");
    issue(
        &secure.ca_dir,
        "atoll://default/gateway/hz-a/gw-hz-a",
        &gateway,
    );
    let cert = format!("--cert={}", gateway.with_extension("pem").display());
    let key = format!("--key={}", gateway.with_extension("key").display());
    secure.run(None, &[&cert, &key, "get", "cells"]).success();
    secure
        .run(
            None,
            &[&cert, &key, "get", "cells", "--workspace", "payments"],
        )
        .fails(12, &["node's certificate"]);
    secure
        .run(None, &[&cert, &key, "delete", "cell/rz01", "--dry-run"])
        .fails(12, &["node's certificate", "gateway"]);
    secure
        .run(None, &[&cert, &key, "audit"])
        .fails(12, &["node's certificate"]);

    // A caller "passed on by a replica", from a gateway's connection or
    // from none: refused.
    let root = secure.ca_dir.join("root.pem");
    let trust = atoll_transport::Trust::from_file(&root).unwrap();
    for identity in [
        None,
        Some(
            atoll_transport::Identity::from_files(
                &gateway.with_extension("pem"),
                &gateway.with_extension("key"),
            )
            .unwrap(),
        ),
    ] {
        let tls = atoll_transport::ClientTls::new(&trust, identity.as_ref()).unwrap();
        let transport = atoll_transport::Transport::with_tls(tls);
        let urls = atoll_transport::ControlUrls::parse_in_order(&secure.control.url).unwrap();
        let forged = transport
            .rest(urls, Some(Duration::from_secs(5)))
            .with_header(
                "x-atoll-caller",
                r#"{"kind":"user","name":"admin","groups":["atoll:admins"],"credential":"none"}"#,
            )
            .unwrap();
        let error = forged
            .get::<serde_json::Value>("/v1/resources/cells")
            .await
            .expect_err("a forged caller is refused");
        assert!(
            error.to_string().contains("only a control-plane replica"),
            "{error}"
        );
    }
}
