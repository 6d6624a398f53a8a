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
    crate::tls::ca(dir, "ca")
}

use crate::tls::issue;

pub(crate) struct Secure {
    dir: tempfile::TempDir,
    ca_dir: PathBuf,
    pub(crate) ca_flag: String,
    pub(crate) control: Control,
}

pub(crate) fn secure_control() -> Secure {
    secure_control_with(|_| Vec::new())
}

/// A secure control plane with more arguments, given the CA directory.
fn secure_control_with(extra: impl FnOnce(&Path) -> Vec<String>) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let root = ca_dir.join("root.pem");
    let cert = dir.path().join("control");
    issue(&ca_dir, "atoll://default/control/-/replica-1", &cert);
    let mut args = vec![
        format!("--ca={}", root.display()),
        format!("--cert={}", cert.with_extension("pem").display()),
        format!("--key={}", cert.with_extension("key").display()),
    ];
    args.extend(extra(&ca_dir));
    let control = Control::start_with(args);
    Secure {
        ca_flag: format!("--ca={}", root.display()),
        dir,
        ca_dir,
        control,
    }
}

impl Secure {
    /// A new API token made by the admin: `atoll token create ARGS`.
    pub(crate) fn token(&self, args: &[&str]) -> String {
        let mut all = vec![self.ca_flag.as_str(), "token", "create"];
        all.extend(args);
        let run = self.control.atoll(&all).success();
        let token = run.stdout().trim().to_owned();
        assert!(token.starts_with("atk_"), "{token}");
        token
    }

    pub(crate) fn run(&self, token: Option<&str>, args: &[&str]) -> crate::harness::Run {
        let mut all = vec![self.ca_flag.as_str()];
        all.extend(args);
        self.control.atoll_as(token, &all, None)
    }

    pub(crate) fn apply(&self, token: &str, manifest: &str) -> crate::harness::Run {
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

/// Two replicas on one etcd, both serving TLS with replica certificates.
fn secure_replicas(etcd: &atoll_testing::EtcdServer) -> (Secure, Control) {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let root = ca_dir.join("root.pem");
    let start = |name: &str| {
        let cert = dir.path().join(name);
        issue(&ca_dir, &format!("atoll://default/control/-/{name}"), &cert);
        Control::start_with(vec![
            format!("--ca={}", root.display()),
            format!("--cert={}", cert.with_extension("pem").display()),
            format!("--key={}", cert.with_extension("key").display()),
            "--store=etcd".into(),
            format!("--etcd-endpoints={}", etcd.endpoint()),
            "--election-ttl=2s".into(),
        ])
    };
    let first = start("replica-1");
    let second = start("replica-2");
    (
        Secure {
            ca_flag: format!("--ca={}", root.display()),
            dir,
            ca_dir,
            control: first,
        },
        second,
    )
}

#[test]
fn a_follower_passes_the_verified_caller_on_and_the_leader_records_it_once() {
    let etcd = atoll_testing::EtcdServer::start();
    let (secure, second) = secure_replicas(&etcd);
    let admin = secure.control.admin_token.clone().expect("an admin token");
    // Wait for a leader both agree on.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let views: Vec<serde_json::Value> = [&secure.control, &second]
            .iter()
            .map(|c| c.json(&[&secure.ca_flag, "get", "controlplane"]))
            .collect();
        if let Some(leader) = views[0]["leader"].as_str()
            && views[1]["leader"].as_str() == Some(leader)
        {
            break leader.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no leader: {views:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (leading, following) = if leader == secure.control.url {
        (&secure.control, &second)
    } else {
        (&second, &secure.control)
    };
    // Each replica has its own static admin token (--admin-token-file).
    let follower_admin = following.admin_token.clone().expect("an admin token");
    let leader_admin = leading.admin_token.clone().expect("an admin token");
    let on = |control: &Control, token: &str, args: &[&str], stdin: Option<&str>| {
        let token = if token == admin {
            if std::ptr::eq(control, following) {
                follower_admin.as_str()
            } else {
                leader_admin.as_str()
            }
        } else {
            token
        };
        let mut all = vec![secure.ca_flag.as_str()];
        all.extend(args);
        control.atoll_as(Some(token), &all, stdin)
    };
    on(
        following,
        &admin,
        &["apply", "-f", examples().to_str().unwrap()],
        None,
    )
    .success();
    on(following, &admin, &["apply", "-f", "-"], Some(BINDINGS)).success();
    // A token made through the follower works on both.
    let dora = on(
        following,
        &admin,
        &["token", "create", "--user", "dora"],
        None,
    )
    .success()
    .stdout()
    .trim()
    .to_owned();
    let ivan = on(
        leading,
        &admin,
        &["token", "create", "--user", "ivan"],
        None,
    )
    .success()
    .stdout()
    .trim()
    .to_owned();
    // The operator's change, through the follower: the leader commits it
    // as dora, not as the replica that passed it on.
    let shard_map = std::fs::read_to_string(examples().join("20-sharding.yaml")).unwrap();
    on(
        following,
        &dora,
        &["apply", "-f", "-", "-m", "through the follower"],
        Some("apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: rz09}\nspec: {zone: hz-a, type: rzone}\n"),
    )
    .success();
    on(following, &ivan, &["apply", "-f", "-"], Some(&shard_map)).fails(12, &["ivan"]);
    let history = leading.json(&[&secure.ca_flag, "audit"]);
    let authors: Vec<&str> = history["commits"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["author"].as_str())
        .collect();
    assert_eq!(authors.last(), Some(&"dora"), "{authors:?}");
    assert!(
        authors.iter().all(|a| *a == "admin" || *a == "dora"),
        "{authors:?}"
    );

    // Each call is in the one chain once, recorded by the replica that
    // answered: the leader, for what the follower passed on.
    let calls: serde_json::Value = serde_json::from_str(
        &on(following, &admin, &["audit", "calls", "-o", "json"], None)
            .success()
            .stdout(),
    )
    .unwrap();
    let applies: Vec<(String, u64, String)> = calls
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["path"] == "/v1/apply")
        .map(|c| {
            (
                c["caller"].as_str().unwrap().to_owned(),
                c["status"].as_u64().unwrap(),
                c["replica"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        applies,
        [
            ("admin".to_owned(), 200, leader.clone()),
            ("admin".to_owned(), 200, leader.clone()),
            ("dora".to_owned(), 200, leader.clone()),
            ("ivan".to_owned(), 403, leader.clone()),
        ],
        "{calls:#}"
    );
    on(leading, &admin, &["audit", "verify"], None).success();
    on(following, &admin, &["audit", "verify"], None).success();
}

#[test]
fn a_node_joins_with_a_one_use_bootstrap_token_and_renews_with_its_certificate() {
    let secure = secure_control_with(|ca_dir| vec![format!("--ca-dir={}", ca_dir.display())]);
    let admin = secure.control.admin_token.clone().expect("an admin token");
    secure.apply(&admin, BINDINGS).success();
    let bootstrap = |args: &[&str]| {
        let mut all = vec!["token", "create"];
        all.extend(args);
        let out = secure.run(Some(&admin), &all).success().stdout();
        let token = out.trim().to_owned();
        assert!(token.starts_with("atb_"), "{token}");
        token
    };
    let token = bootstrap(&["--role", "gateway", "--zone", "hz-a", "--ttl", "10m"]);
    let out = secure.dir.path().join("nodes/gw-hz-a");
    let out_flag = out.to_str().unwrap();
    // No API token: the bootstrap token is the credential.
    let joined = secure
        .run(
            None,
            &[
                "join",
                "--bootstrap-token",
                &token,
                "--name",
                "gw-hz-a",
                "--out",
                out_flag,
            ],
        )
        .success();
    assert!(
        joined
            .stdout()
            .contains("joined as atoll://default/gateway/hz-a/gw-hz-a"),
        "{}",
        joined.stdout()
    );
    let key = out.with_extension("key");
    let certificate = out.with_extension("pem");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(secure.dir.path().join("nodes/gw-hz-a-ca.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let cert_flag = format!("--cert={}", certificate.display());
    let key_flag = format!("--key={}", key.display());
    let me = secure
        .run(None, &[&cert_flag, &key_flag, "whoami"])
        .success()
        .stdout();
    assert!(
        me.starts_with("atoll://default/gateway/hz-a/gw-hz-a (node"),
        "{me}"
    );

    // One use.
    let again = secure.dir.path().join("nodes/again");
    secure
        .run(
            None,
            &[
                "join",
                "--bootstrap-token",
                &token,
                "--name",
                "gw-2",
                "--out",
                again.to_str().unwrap(),
            ],
        )
        .fails(11, &["already used"]);
    // Not an API token, not an expired one, no hosts for a gateway.
    secure
        .run(
            None,
            &[
                "join",
                "--bootstrap-token",
                &admin,
                "--name",
                "x",
                "--out",
                again.to_str().unwrap(),
            ],
        )
        .fails(11, &["is an API token"]);
    let brief = bootstrap(&["--role", "agent", "--zone", "hz-a", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    secure
        .run(
            None,
            &[
                "join",
                "--bootstrap-token",
                &brief,
                "--name",
                "agent-1",
                "--out",
                again.to_str().unwrap(),
            ],
        )
        .fails(11, &["expired at"]);
    let hosted = bootstrap(&["--role", "gateway", "--zone", "hz-b"]);
    secure
        .run(
            None,
            &[
                "join",
                "--bootstrap-token",
                &hosted,
                "--name",
                "gw-hz-b",
                "--host",
                "10.0.0.1",
                "--out",
                again.to_str().unwrap(),
            ],
        )
        .fails(
            1,
            &["only a control-plane replica's certificate names hosts"],
        );
    // A bootstrap token is the workspace admin's to make; a role for a
    // replica, the fleet's.
    let ivan = secure.token(&["--user", "ivan", "--group", "auditors"]);
    secure
        .run(
            Some(&ivan),
            &["token", "create", "--role", "gateway", "--zone", "hz-a"],
        )
        .fails(12, &["admin role in workspace default"]);
    secure
        .run(Some(&admin), &["token", "create", "--role", "gateway"])
        .fails(1, &["needs `zone`"]);

    // Renewal: a new certificate for the same identity, over the files.
    let before = std::fs::read_to_string(&certificate).unwrap();
    let renewed = secure
        .run(None, &[&cert_flag, &key_flag, "renew"])
        .success()
        .stdout();
    assert!(
        renewed.contains("renewed atoll://default/gateway/hz-a/gw-hz-a"),
        "{renewed}"
    );
    assert_ne!(std::fs::read_to_string(&certificate).unwrap(), before);
    let me = secure
        .run(None, &[&cert_flag, &key_flag, "whoami"])
        .success()
        .stdout();
    assert!(
        me.starts_with("atoll://default/gateway/hz-a/gw-hz-a"),
        "{me}"
    );
    // Only a node's certificate renews.
    secure
        .run(Some(&admin), &["renew", &cert_flag, &key_flag])
        .fails(12, &["needs a node's certificate"]);

    // Both are in the audit chain, with whom they issued.
    let calls = secure
        .run(Some(&admin), &["audit", "calls", "-o", "json"])
        .success()
        .stdout();
    assert!(
        calls.contains("issued atoll://default/gateway/hz-a/gw-hz-a"),
        "{calls}"
    );
    assert!(
        !calls.contains(token.rsplit('_').next().unwrap()),
        "no secret in the chain"
    );
}

#[test]
fn a_control_plane_without_tls_issues_no_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let out = Command::new(ATOLL)
        .args([
            "control",
            "--insecure",
            "--no-discovery",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg(format!("--ca-dir={}", ca_dir.display()))
        .env("ATOLL_STATE_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--ca-dir issues certificates, which needs TLS"),
        "{out:?}"
    );
    let out = Command::new(ATOLL)
        .args(["control", "--no-discovery", "--listen", "127.0.0.1:0"])
        .env("ATOLL_STATE_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only with --insecure"),
        "{out:?}"
    );
}

#[test]
fn a_gateway_renews_its_certificate_by_itself_and_stays_connected() {
    let secure = secure_control_with(|ca_dir| {
        vec![
            format!("--ca-dir={}", ca_dir.display()),
            "--node-cert-lifetime=9s".to_owned(),
        ]
    });
    let admin = secure.control.admin_token.clone().expect("an admin token");
    let places = std::fs::read_to_string(examples().join("00-places.yaml")).unwrap();
    secure.apply(&admin, &places).success();
    let port = atoll_testing::free_port();
    secure
        .apply(
            &admin,
            &format!(
                "apiVersion: atoll/v1\nkind: Gateway\nmetadata: {{name: gw-hz-a}}\nspec:\n  zone: hz-a\n  listeners: [{{port: {port}, protocol: http}}]\n"
            ),
        )
        .success();
    let token = secure
        .run(
            Some(&admin),
            &["token", "create", "--role", "gateway", "--zone", "hz-a"],
        )
        .success()
        .stdout()
        .trim()
        .to_owned();
    let out = secure.dir.path().join("gw-hz-a");
    secure
        .run(
            None,
            &[
                "join",
                "--bootstrap-token",
                &token,
                "--name",
                "gw-hz-a",
                "--out",
                out.to_str().unwrap(),
            ],
        )
        .success();
    let joined_at = std::time::Instant::now();
    let certificate = out.with_extension("pem");
    let first = std::fs::read_to_string(&certificate).unwrap();
    let gateway = crate::harness::GatewayProcess::start_with(
        &secure.control.url,
        "gw-hz-a",
        &secure.dir.path().join("gw-state"),
        true,
        &[
            secure.ca_flag.clone(),
            format!("--cert={}", certificate.display()),
            format!("--key={}", out.with_extension("key").display()),
        ],
    );
    // Renewed with a third of its 9 s left, by the gateway itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&certificate).unwrap_or_default() == first
        || !gateway.log().contains("renewed the certificate")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not renew its certificate:\n{}",
            gateway.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Past the first certificate's end: still connected, still ready.
    let past = Duration::from_secs(11).saturating_sub(joined_at.elapsed());
    std::thread::sleep(past);
    let nodes = secure.control.json(&[&secure.ca_flag, "nodes"]);
    let node = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "gw-hz-a")
        .cloned()
        .unwrap_or_default();
    assert_eq!(node["connected"], true, "{nodes}\n{}", gateway.log());
    assert_eq!(
        crate::harness::http_get(&gateway.admin, "/readyz").map(|(s, _)| s),
        Some(200),
        "{}",
        gateway.log()
    );
    assert!(
        gateway.log().contains("using the renewed certificate"),
        "{}",
        gateway.log()
    );
}

/// A control-plane replica renews its own certificate by itself (a third of
/// its life left), keeps the host names clients verify it by, and serves
/// the new one: calls still verify after the first has expired.
#[test]
fn a_replica_renews_its_own_certificate_and_keeps_its_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = ca(dir.path());
    let root = ca_dir.join("root.pem");
    let cert = dir.path().join("control");
    let issued = std::process::Command::new(crate::harness::ATOLL)
        .args(["ca", "issue", "--dir", ca_dir.to_str().unwrap()])
        .args(["--id", "atoll://default/control/-/replica-1"])
        .args(["--host", "127.0.0.1", "--host", "localhost"])
        .args(["--lifetime", "9s", "--out", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(issued.status.success(), "{issued:?}");
    let started = std::time::Instant::now();
    let pem = cert.with_extension("pem");
    let first = std::fs::read_to_string(&pem).unwrap();
    let control = Control::start_with(vec![
        format!("--ca={}", root.display()),
        format!("--cert={}", pem.display()),
        format!("--key={}", cert.with_extension("key").display()),
        format!("--ca-dir={}", ca_dir.display()),
        "--node-cert-lifetime=1h".to_owned(),
    ]);
    let deadline = started + Duration::from_secs(20);
    while std::fs::read_to_string(&pem).unwrap_or_default() == first {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica did not renew its certificate:\n{}",
            control.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let renewed = std::fs::read_to_string(&pem).unwrap();
    let (from, until) = atoll_identity::validity_of_pem(&renewed).unwrap();
    assert!(
        until - from > time::Duration::minutes(50),
        "{from} .. {until}"
    );
    assert_eq!(
        atoll_identity::hosts_of_pem(&renewed),
        ["127.0.0.1", "localhost"],
        "the renewed certificate keeps the replica's names"
    );
    // Past the first certificate's end, the replica serves the new one.
    std::thread::sleep(
        (started + Duration::from_secs(11)).saturating_duration_since(std::time::Instant::now()),
    );
    let admin = control.admin_token.clone().expect("an admin token");
    control
        .atoll_as(
            Some(&admin),
            &[&format!("--ca={}", root.display()), "get", "zones"],
            None,
        )
        .success();
    assert!(
        control.log().contains("renewed the certificate"),
        "{}",
        control.log()
    );
}
