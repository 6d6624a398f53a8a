//! Two-person approvals: where a Workspace's rules say so, a switchover, a
//! ShardMap rollback and a token wait for a second person; the requester
//! cannot approve their own request (refused and audited); a held approval
//! starts the switchover it covers once, for its requester only.

use serde_json::Value;

use crate::access::{Secure, secure_control};
use crate::harness::examples;

const RULES: &str = r#"
apiVersion: atoll/v1
kind: Workspace
metadata: {name: default}
spec:
  bindings:
    - {role: operator, users: [olga, dora]}
    - {role: admin, users: [ada]}
    - {role: viewer, groups: [auditors]}
  approvals: [switchover, shardMapRollback, token]
"#;

/// The approval id in a sentence (`... approval apr-0123456789ab is ...`).
fn approval_id(text: &str) -> String {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
        .find(|w| w.starts_with("apr-") && w.len() == 16)
        .unwrap_or_else(|| panic!("no approval id in {text}"))
        .to_owned()
}

fn show(secure: &Secure, token: &str, id: &str) -> Value {
    let out = secure
        .run(Some(token), &["approval", "show", id, "-o", "json"])
        .success()
        .stdout();
    serde_json::from_str(&out).unwrap()
}

fn switchover(secure: &Secure, token: &str, verb: &str, more: &[&str]) -> crate::harness::Run {
    let mut args = vec!["switchover", verb, "--to", "rz02", "--skip-sync-gate"];
    if !more.contains(&"--shards") {
        args.extend(["--shards", "0-4"]);
    }
    args.extend(more);
    secure.run(Some(token), &args)
}

#[test]
#[allow(clippy::too_many_lines, reason = "one story")]
fn two_person_approvals_guard_switchovers_rollbacks_and_tokens() {
    let secure = secure_control();
    let admin = secure.control.admin_token.clone().expect("an admin token");
    secure
        .run(Some(&admin), &["apply", "-f", examples().to_str().unwrap()])
        .success();
    let olga = secure.token(&["--user", "olga"]);
    let dora = secure.token(&["--user", "dora"]);
    let ada = secure.token(&["--user", "ada"]);
    let ivan = secure.token(&["--user", "ivan", "--group", "auditors"]);
    // A second token of olga's is still olga.
    let olga_again = secure.token(&["--user", "olga"]);
    // From here on, tokens for others need a second person too.
    secure.apply(&admin, RULES).success();
    let eve = secure.run(Some(&admin), &["token", "create", "--user", "eve"]);
    assert_eq!(eve.code(), 14, "{}", eve.stderr());
    let eve_token = eve.stdout().trim().to_owned();
    secure
        .run(Some(&eve_token), &["whoami"])
        .fails(11, &["awaits a second person's approval"]);
    // Withdrawn by its requester: the token stays unusable, revoked.
    secure
        .run(
            Some(&admin),
            &["approval", "reject", &approval_id(&eve.stderr())],
        )
        .success();
    secure
        .run(Some(&eve_token), &["whoami"])
        .fails(11, &["revoked by admin (approval rejected)"]);

    // The plan says a second person is needed.
    let plan = switchover(&secure, &olga, "plan", &[]).success();
    assert!(
        plan.stdout().contains("need a second person's approval"),
        "{}",
        plan.stdout()
    );

    // A ShardMap rollback waits for a second person too.
    let history: Value = secure
        .control
        .json(&[&secure.ca_flag, "history", "shardmap/users"]);
    let first = history["entries"][0]["revision"]
        .as_u64()
        .expect("a first revision");
    let changed = std::fs::read_to_string(examples().join("20-sharding.yaml"))
        .unwrap()
        .replace(
            "{shards: \"50-74\", cell: rz03, standby: rz04}",
            "{shards: \"50-74\", cell: rz03, standby: rz02}",
        );
    secure.apply(&admin, &changed).success();
    let rollback = secure
        .run(
            Some(&olga),
            &[
                "rollback",
                "shardmap/users",
                "--to-revision",
                &first.to_string(),
            ],
        )
        .fails(14, &["rolling ShardMap/users back", "approval apr-"]);
    let rollback_id = approval_id(&rollback.stderr());
    let done = secure
        .run(
            Some(&dora),
            &["approval", "reject", &rollback_id, "-m", "not now"],
        )
        .success();
    assert!(done.stdout().contains("rejected"), "{}", done.stdout());
    secure
        .run(Some(&dora), &["approval", "approve", &rollback_id])
        .fails(4, &["is rejected"]);

    // A held request: asked now, started later by its requester, once.
    let held = switchover(&secure, &olga, "start", &["--hold", "-m", "change 42"]).success();
    let held_id = approval_id(&held.stdout());
    switchover(&secure, &olga, "start", &["--approval", &held_id])
        .fails(4, &["a second person must approve it first"]);
    secure
        .run(Some(&olga_again), &["approval", "approve", &held_id])
        .fails(12, &["olga asked for approval", "cannot approve it"]);
    let granted = secure
        .run(
            Some(&dora),
            &["approval", "approve", &held_id, "-m", "CAB ok"],
        )
        .success();
    assert!(
        granted.stdout().contains("approved by dora") && granted.stdout().contains("held for olga"),
        "{}",
        granted.stdout()
    );
    switchover(&secure, &dora, "start", &["--approval", &held_id])
        .fails(12, &["only they may use it"]);
    secure
        .run(
            Some(&olga),
            &[
                "switchover",
                "start",
                "--shards",
                "0-9",
                "--to",
                "rz02",
                "--skip-sync-gate",
                "--approval",
                &held_id,
            ],
        )
        .fails(1, &["covers"]);
    let started = switchover(
        &secure,
        &olga,
        "start",
        &["--approval", &held_id, "--no-wait"],
    )
    .success();
    assert!(started.stdout().contains("started"), "{}", started.stdout());
    switchover(&secure, &olga, "start", &["--approval", &held_id]).fails(4, &["was used at"]);
    let list = secure
        .control
        .json(&[&secure.ca_flag, "get", "switchovers"]);
    let name = list["items"][0]["metadata"]["name"]
        .as_str()
        .expect("a switchover")
        .to_owned();
    // No node to wait for: it completes at once.
    secure
        .run(Some(&olga), &["switchover", "status", &name, "--watch"])
        .success();

    // Asked and run on approval: nothing starts until a second person
    // approves; the requester's own approval is refused, as is a viewer's.
    let asked = switchover(&secure, &olga, "start", &["--shards", "5-9", "--no-wait"])
        .fails(14, &["approval apr-"]);
    let id = approval_id(&asked.stderr());
    let before = secure
        .control
        .json(&[&secure.ca_flag, "get", "switchovers"]);
    assert_eq!(before["items"].as_array().unwrap().len(), 1, "{before}");
    secure
        .run(Some(&olga), &["approval", "approve", &id])
        .fails(12, &["olga asked for approval", "a second person must"]);
    secure
        .run(Some(&ivan), &["approval", "approve", &id])
        .fails(12, &["ivan", "operator role"]);
    let pending = secure
        .run(Some(&ivan), &["approval", "list", "--state", "pending"])
        .success();
    assert!(
        pending.stdout().contains(&id) && pending.stdout().contains("olga"),
        "{}",
        pending.stdout()
    );
    let approved = secure
        .run(Some(&dora), &["approval", "approve", &id])
        .success();
    assert!(
        approved.stdout().contains("started switchover/"),
        "{}",
        approved.stdout()
    );
    let info = show(&secure, &olga, &id);
    assert_eq!(info["state"], "approved", "{info}");
    assert_eq!(info["requestedBy"], "olga", "{info}");
    assert_eq!(info["decidedBy"], "dora", "{info}");
    let second = info["result"]
        .as_str()
        .and_then(|r| r.strip_prefix("started switchover/"))
        .expect("the switchover it started")
        .to_owned();
    let resource = secure
        .control
        .json(&[&secure.ca_flag, "get", "switchover", &second]);
    assert!(
        resource["spec"]["timeline"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("olga, approved by dora")),
        "{resource}"
    );
    secure
        .run(Some(&dora), &["approval", "approve", &id])
        .fails(4, &["is approved", "by dora"]);

    // A bootstrap token: made unusable until a second admin approves.
    let made = secure.run(
        Some(&ada),
        &["token", "create", "--role", "gateway", "--zone", "hz-a"],
    );
    let bootstrap_id = made
        .stdout()
        .trim()
        .split('_')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    assert_eq!(made.code(), 14, "{}", made.stderr());
    assert!(
        made.stdout().trim().starts_with("atb_"),
        "{}",
        made.stdout()
    );
    let token_approval = approval_id(&made.stderr());
    let listed = secure
        .run(Some(&admin), &["token", "list"])
        .success()
        .stdout();
    assert!(
        listed.contains(&format!("awaiting {token_approval}")),
        "{listed}"
    );
    // An operator may not approve what only an admin may do.
    secure
        .run(Some(&dora), &["approval", "approve", &token_approval])
        .fails(12, &["admin role"]);
    secure
        .run(Some(&ada), &["approval", "approve", &token_approval])
        .fails(12, &["ada asked for approval"]);
    secure
        .run(Some(&admin), &["approval", "approve", &token_approval])
        .success();
    let listed = secure
        .run(Some(&admin), &["token", "list"])
        .success()
        .stdout();
    let line = listed
        .lines()
        .find(|l| l.starts_with(&bootstrap_id))
        .expect("the bootstrap token listed");
    assert!(
        line.contains("valid") && !line.contains("awaiting"),
        "{listed}"
    );

    // The refusals are in the audit chain with the verified caller.
    let calls: Value = serde_json::from_str(
        &secure
            .run(Some(&admin), &["audit", "calls", "-o", "json"])
            .success()
            .stdout(),
    )
    .unwrap();
    let own = calls
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["caller"] == "olga"
                && c["status"] == 403
                && c["path"].as_str() == Some(&format!("/v1/approvals/{id}/approve"))
        })
        .count();
    assert_eq!(own, 1, "{calls:#}");
    assert!(
        calls
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["caller"] == "olga"
                && c["status"] == 202
                && c["outcome"] == "awaiting approval"),
        "{calls:#}"
    );
}
