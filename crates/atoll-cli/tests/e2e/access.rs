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

/// The embedded store of a stopped control plane, for editing its audit
/// chain as an attacker with the disk would.
struct Disk(atoll_store::EmbeddedStore);

impl Disk {
    fn open(control: &Control) -> Disk {
        Disk(atoll_store::EmbeddedStore::open(&control.state.path().join("control")).unwrap())
    }

    fn key(seq: u64) -> String {
        format!("audit/entries/{seq:020}")
    }

    async fn get(&self, key: &str) -> Vec<u8> {
        use atoll_store::Coordination as _;
        self.0.get_key(key).await.unwrap().expect("the key").value
    }

    async fn put(&self, key: &str, value: Vec<u8>) {
        use atoll_store::Coordination as _;
        self.0
            .write_keys(vec![atoll_store::Write::put(key, value)], None)
            .await
            .unwrap();
    }

    async fn delete(&self, key: &str) {
        use atoll_store::Coordination as _;
        self.0
            .write_keys(vec![atoll_store::Write::delete(key)], None)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_records_calls_and_refusals_and_names_the_first_tampered_entry() {
    let mut secure = secure_control();
    let admin = secure.control.admin_token.clone().expect("an admin token");
    secure
        .run(Some(&admin), &["apply", "-f", examples().to_str().unwrap()])
        .success();
    let olga = secure.token(&["--user", "olga"]);
    // A refusal (403), an unknown token (401), no credential (401), a dry run.
    let shard_map = std::fs::read_to_string(examples().join("20-sharding.yaml")).unwrap();
    secure.apply(&olga, &shard_map).fails(12, &["olga"]);
    let stranger = format!("atk_{}_{}", "1".repeat(16), "b".repeat(64));
    secure
        .run(Some(&stranger), &["get", "cells"])
        .fails(11, &[]);
    secure.run(None, &["get", "cells"]).fails(11, &[]);
    // A dry run that is invalid (other resources use the cell): recorded
    // too, with its outcome.
    secure
        .run(Some(&admin), &["delete", "cell/cz01", "--dry-run"])
        .fails(3, &[]);
    // Reads that are allowed are not recorded.
    secure.run(Some(&admin), &["get", "cells"]).success();

    let calls: serde_json::Value = serde_json::from_str(
        &secure
            .run(Some(&admin), &["audit", "calls", "-o", "json"])
            .success()
            .stdout(),
    )
    .unwrap();
    let calls = calls.as_array().unwrap().clone();
    let summary: Vec<(String, u64, String)> = calls
        .iter()
        .map(|c| {
            (
                c["caller"].as_str().unwrap().to_owned(),
                c["status"].as_u64().unwrap(),
                c["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("admin".to_owned(), 200, "/v1/apply".to_owned()),
            ("admin".to_owned(), 200, "/v1/tokens".to_owned()),
            ("olga".to_owned(), 403, "/v1/apply".to_owned()),
            (
                "anonymous".to_owned(),
                401,
                "/v1/resources/cells".to_owned()
            ),
            (
                "anonymous".to_owned(),
                401,
                "/v1/resources/cells".to_owned()
            ),
            ("admin".to_owned(), 422, "/v1/apply".to_owned()),
        ],
        "{calls:#?}"
    );
    assert!(
        calls[0]["detail"]
            .as_str()
            .unwrap()
            .contains("created Cell/rz01"),
        "{}",
        calls[0]
    );
    assert!(calls[1]["detail"].as_str().unwrap().starts_with("token "));
    assert!(
        !calls[1]
            .to_string()
            .contains(olga.rsplit('_').next().unwrap()),
        "the chain holds no secret"
    );
    assert_eq!(calls[3]["credential"], "token 1111111111111111");
    assert_eq!(calls[4]["credential"], "none");
    assert!(
        calls[2]["remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(
        calls[2]["detail"]
            .as_str()
            .unwrap()
            .contains("operator role")
    );
    let refused = secure
        .run(Some(&admin), &["audit", "calls", "--refused"])
        .success()
        .stdout();
    assert_eq!(refused.lines().count(), 4, "{refused}");

    // Untouched: it verifies, and the head is an anchor.
    let verified: serde_json::Value = serde_json::from_str(
        &secure
            .run(Some(&admin), &["audit", "verify", "-o", "json"])
            .success()
            .stdout(),
    )
    .unwrap();
    assert_eq!(verified["checked"], 6, "{verified}");
    let anchor = verified["head"].as_str().unwrap().to_owned();
    assert!(anchor.starts_with("6:"), "{anchor}");
    // Not for an operator.
    secure
        .run(Some(&olga), &["audit", "verify"])
        .fails(12, &["atoll:viewers"]);

    let tamper = |secure: &mut Secure| {
        secure.control.stop();
        Disk::open(&secure.control)
    };
    let verify_fails = |secure: &Secure, needles: &[&str]| {
        secure
            .run(Some(&admin), &["audit", "verify"])
            .fails(13, needles);
    };

    // Edited: olga's refusal turned into a success.
    let disk = tamper(&mut secure);
    let original = disk.get(&Disk::key(3)).await;
    let edited = String::from_utf8(original.clone())
        .unwrap()
        .replace("\"status\":403", "\"status\":200");
    disk.put(&Disk::key(3), edited.into_bytes()).await;
    drop(disk);
    secure.control.restart_after_stop();
    verify_fails(&secure, &["entry 3 edited", "hashes to"]);

    // Removed.
    let disk = tamper(&mut secure);
    disk.put(&Disk::key(3), original.clone()).await;
    disk.delete(&Disk::key(4)).await;
    drop(disk);
    secure.control.restart_after_stop();
    verify_fails(
        &secure,
        &["entry 4 removed", "entry 3 is followed by entry 5"],
    );

    // Reordered: two entries swapped.
    let disk = tamper(&mut secure);
    disk.put(&Disk::key(4), serde_json::to_vec(&calls[3]).unwrap())
        .await;
    let second = disk.get(&Disk::key(2)).await;
    let third = disk.get(&Disk::key(3)).await;
    disk.put(&Disk::key(2), third.clone()).await;
    disk.put(&Disk::key(3), second.clone()).await;
    drop(disk);
    secure.control.restart_after_stop();
    verify_fails(&secure, &["entry 2 reordered", "entry 2 was moved"]);

    // Put back, it verifies again.
    let disk = tamper(&mut secure);
    disk.put(&Disk::key(2), second).await;
    disk.put(&Disk::key(3), third).await;
    drop(disk);
    secure.control.restart_after_stop();
    secure.run(Some(&admin), &["audit", "verify"]).success();

    // The end cut off and the head rewritten to match: whole on its own,
    // caught by the anchor.
    let disk = tamper(&mut secure);
    disk.delete(&Disk::key(6)).await;
    let head = serde_json::json!({"seq": 5, "hash": calls[4]["hash"]});
    disk.put("audit/head", serde_json::to_vec(&head).unwrap())
        .await;
    drop(disk);
    secure.control.restart_after_stop();
    secure.run(Some(&admin), &["audit", "verify"]).success();
    secure
        .run(Some(&admin), &["audit", "verify", "--anchor", &anchor])
        .fails(13, &["entry 6 removed", "anchored"]);
}
