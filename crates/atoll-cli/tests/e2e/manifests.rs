//! Applying, reading, refusing, history and rollback.

use crate::harness::{Control, examples};

const MOVE: &str = "apiVersion: atoll/v1
kind: ShardMap
metadata: {name: users}
spec:
  rule: users
  assignments:
    - {shards: \"0-49\", cell: rz01, standby: rz02}
    - {shards: \"50-99\", cell: rz03, standby: rz04}
";

fn example_loaded() -> Control {
    let control = Control::start();
    let examples = examples();
    let run = control
        .atoll(&["apply", "-f", examples.to_str().unwrap()])
        .success();
    assert!(
        run.stdout().contains("cell/rz01 created"),
        "{}",
        run.stdout()
    );
    assert!(
        run.stderr().contains("revision 1: 26 created"),
        "{}",
        run.stderr()
    );
    control
}

#[test]
fn the_example_topology_applies_and_reads_back() {
    let control = example_loaded();
    let cells = control.json(&["get", "cells"]);
    let names: Vec<&str> = cells["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cz01", "gz01", "rz01", "rz02", "rz03", "rz04"]);
    let map = control.json(&["get", "shardmap", "users"]);
    assert_eq!(
        map["spec"]["epoch"], 1,
        "the control plane sets the first epoch"
    );
    assert_eq!(map["metadata"]["resourceVersion"], "1");
    assert_eq!(map["spec"]["assignments"].as_array().unwrap().len(), 4);

    let table = control.atoll(&["get", "cells"]).success().stdout();
    assert!(
        table.starts_with("NAME   TYPE    ZONE   WEIGHT   HEALTH      READY   REVISION\n"),
        "{table}"
    );
    assert!(
        table.contains("gz01   gzone   hz-a   100      Unmanaged   -       1"),
        "{table}"
    );

    // YAML output can be applied again unchanged.
    let yaml = control
        .atoll(&["get", "all", "-o", "yaml"])
        .success()
        .stdout();
    let again = control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(&yaml))
        .success();
    assert!(
        again.stderr().contains("revision 1: 26 unchanged"),
        "{}",
        again.stderr()
    );
    assert_eq!(control.revision(), 1, "an unchanged apply writes nothing");
}

/// Applies `text` as a file named `name`, expecting exit 3 with `needles` in
/// stderr, and checks that nothing changed.
fn refused(control: &Control, name: &str, text: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let before = control.json(&["get", "all"]);
    control
        .atoll(&["apply", "-f", path.to_str().unwrap()])
        .fails(3, needles);
    assert_eq!(
        control.json(&["get", "all"]),
        before,
        "a refused apply changes nothing"
    );
}

#[test]
fn invalid_changes_are_refused_with_clear_errors_and_change_nothing() {
    let control = example_loaded();
    refused(
        &control,
        "overlap.yaml",
        &MOVE.replace("50-99", "40-99"),
        &[
            "overlap.yaml:8:8: ShardMap/users spec.assignments[1].shards: shards 40-49 are also owned by assignments[0] (cell rz01)",
        ],
    );
    refused(
        &control,
        "unowned.yaml",
        &MOVE.replace("50-99", "50-89"),
        &[
            "unowned.yaml:6:3: ShardMap/users spec.assignments: shards 90-99 are owned by no assignment",
        ],
    );
    refused(
        &control,
        "dangling.yaml",
        &MOVE.replace("cell: rz03", "cell: rz09"),
        &[
            "ShardMap/users spec.assignments[1].cell: Cell `rz09` does not exist (known: cz01, gz01, rz01, rz02, rz03, rz04)",
        ],
    );
    refused(
        &control,
        "syntax.yaml",
        "apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: hz-c\nspec: {region: hz}\n",
        &["syntax.yaml:4:", "YAML syntax error"],
    );
    refused(
        &control,
        "unknown.yaml",
        "apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: hz-c}\nspec: {region: hz, wieght: 3}\n",
        &[
            "unknown.yaml:4:20: Zone/hz-c spec.wieght: unknown field `wieght`, expected one of `region`, `weight`, `runAs`",
        ],
    );
    // Every problem of a batch at once, across files.
    refused(
        &control,
        "many.yaml",
        "apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: Bad}\nspec: {zone: nowhere, type: rzone}\n---\napiVersion: atoll/v2\nkind: Zone\nmetadata: {name: z}\nspec: {region: hz}\n",
        &["3 problems", "apiVersion", "metadata.name", "spec.zone"],
    );
    // A change that breaks a stored resource names it.
    control.atoll(&["delete", "zone/hz-a"]).fails(
        3,
        &["stored (revision 1): Cell/rz01 spec.zone: Zone `hz-a` does not exist"],
    );
    assert_eq!(control.revision(), 1);
}

#[test]
fn dry_run_shows_the_diff_and_changes_nothing() {
    let control = example_loaded();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("move.yaml");
    std::fs::write(&path, MOVE).unwrap();
    let run = control
        .atoll(&["apply", "--dry-run", "-f", path.to_str().unwrap()])
        .success();
    let out = run.stdout();
    assert!(out.contains("shardmap/users configured (dry run)"), "{out}");
    assert!(
        out.contains("-  epoch: 1\n+  epoch: 2"),
        "the diff shows the epoch bump: {out}"
    );
    assert!(
        out.contains("-    - shards: 0-24\n+    - shards: 0-49"),
        "{out}"
    );
    assert_eq!(control.revision(), 1);
    assert_eq!(control.json(&["get", "sm", "users"])["spec"]["epoch"], 1);
}

#[test]
fn history_and_rollback() {
    let control = example_loaded();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("move.yaml");
    std::fs::write(&path, MOVE).unwrap();
    control
        .atoll(&["apply", "-f", path.to_str().unwrap(), "-m", "move shards"])
        .success();
    let moved = control.json(&["get", "shardmap", "users"]);
    assert_eq!(
        moved["spec"]["epoch"], 2,
        "an ownership change bumps the epoch"
    );

    let history = control.json(&["history", "shardmap/users"]);
    let entries = history["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1]["author"], "tester (unverified)");
    assert_eq!(entries[1]["message"], "move shards");
    assert_eq!(entries[1]["action"], "updated");
    assert!(
        entries[1]["diff"]
            .as_str()
            .unwrap()
            .contains("+    - shards: 0-49")
    );

    control
        .atoll(&["rollback", "shardmap/users", "--to-revision", "1"])
        .success();
    let restored = control.json(&["get", "shardmap", "users"]);
    assert_eq!(
        restored["spec"]["assignments"],
        entries[0]["resource"]["spec"]["assignments"]
    );
    assert_eq!(
        restored["spec"]["epoch"], 3,
        "a rollback moves the epoch forward, never back"
    );
    let history = control.json(&["history", "shardmap", "users"]);
    let last = &history["entries"].as_array().unwrap()[2];
    assert_eq!(last["message"], "rollback of ShardMap/users to revision 1");

    control
        .atoll(&["rollback", "shardmap/users", "--to-revision", "99"])
        .fails(
            5,
            &["did not change at revision 99; its revisions are 1, 2, 3"],
        );

    // The audit log has every commit, with authors.
    let audit = control.json(&["audit"]);
    let commits = audit["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 3);
    assert!(commits.iter().all(|c| c["author"] == "tester (unverified)"));
}

#[test]
fn optimistic_concurrency_and_deletes() {
    let control = example_loaded();
    // A manifest carrying a stale resourceVersion is refused.
    let stale = "apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: hz-b, resourceVersion: \"7\"}\nspec: {region: hz, weight: 50}\n";
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(stale))
        .fails(4, &["Zone/hz-b is at resourceVersion 1, not 7"]);
    let current = stale.replace("\"7\"", "\"1\"");
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(&current))
        .success();
    assert_eq!(control.json(&["get", "zone", "hz-b"])["spec"]["weight"], 50);

    // Deleting what nothing refers to works; deleting a whole file's
    // resources happens in one revision.
    control.atoll(&["delete", "route", "web"]).success();
    control
        .atoll(&["get", "route", "web"])
        .fails(5, &["Route/web does not exist"]);
    let gateways = examples().join("40-gateways.yaml");
    let run = control
        .atoll(&["delete", "-f", gateways.to_str().unwrap()])
        .success();
    assert!(
        run.stderr().contains("revision 4: 4 deleted"),
        "{}",
        run.stderr()
    );
    control
        .atoll(&["delete", "gateway", "gw-hz-a"])
        .fails(5, &["does not exist"]);
}

/// Posts manifests to `/v1/apply` and returns (status, body).
async fn post_apply(url: &str, source: &str, content: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/apply"))
        .json(&serde_json::json!({"manifests": [{"source": source, "content": content}]}))
        .send()
        .await
        .expect("apply");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// The 688-byte "billion laughs" of the adversarial run: ten levels of ten
/// aliases, 10^10 values if expanded.
fn alias_bomb() -> String {
    let mut text = String::from(
        "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: bomb}\nspec:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for level in 1..10 {
        let items = vec![format!("*a{}", level - 1); 10].join(", ");
        text += &format!("  a{level}: &a{level} [{items}]\n");
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_alias_bombs_get_422_naming_the_limit_and_memory_stays_bounded() {
    let control = tokio::task::block_in_place(Control::start);
    let bomb = alias_bomb();
    assert!(bomb.len() < 800, "{} bytes", bomb.len());
    let before = control.resident_bytes();
    // Sixteen at once, twice.
    for _ in 0..2 {
        let answers = futures::future::join_all((0..16).map(|i| {
            let (url, bomb) = (control.url.clone(), bomb.clone());
            async move { post_apply(&url, &format!("bomb-{i}.yaml"), &bomb).await }
        }))
        .await;
        for (status, body) in answers {
            assert_eq!(status, 422, "{body}");
            let reason = body["issues"][0]["reason"].as_str().unwrap_or("");
            assert!(reason.contains("more than 10000 values"), "{body}");
            assert!(
                body["issues"][0]["line"]
                    .as_u64()
                    .is_some_and(|l| (6..=14).contains(&l)),
                "the line of the alias that went over: {body}"
            );
        }
    }
    let after = control.resident_bytes();
    assert!(
        after < before + 40 * 1024 * 1024,
        "resident memory grew from {} MB to {} MB",
        before / 1_000_000,
        after / 1_000_000
    );
    // And the control plane goes on serving.
    tokio::task::block_in_place(|| control.atoll(&["status"]).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_an_oversized_resource_or_configuration_is_refused_at_apply() {
    let control = tokio::task::block_in_place(Control::start);
    // A 15 MB Region: 422, naming the resource, the size and the limit.
    let huge = format!(
        "apiVersion: atoll/v1\nkind: Region\nmetadata: {{name: huge}}\nspec: {{displayName: \"{}\"}}\n",
        "x".repeat(15_000_000)
    );
    let (status, body) = post_apply(&control.url, "huge.yaml", &huge).await;
    assert_eq!(status, 422, "{body}");
    let issue = &body["issues"][0];
    assert_eq!(issue["resource"], "Region/huge", "{body}");
    assert!(
        issue["reason"]
            .as_str()
            .is_some_and(|r| r.contains("14.3 MiB") && r.contains("512 KiB")),
        "{body}"
    );
    // Regions of 400 KiB each, 25 per apply: the configuration may grow to
    // 32 MiB and no further.
    let batch = |first: usize| -> String {
        (first..first + 25)
            .map(|i| {
                format!(
                    "apiVersion: atoll/v1\nkind: Region\nmetadata: {{name: r{i}}}\nspec: {{displayName: \"{}\"}}\n",
                    "y".repeat(400 * 1024)
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let mut refused = None;
    for round in 0..4 {
        let (status, body) = post_apply(
            &control.url,
            &format!("batch-{round}.yaml"),
            &batch(round * 25),
        )
        .await;
        if status != 200 {
            refused = Some((round, status, body));
            break;
        }
    }
    let (round, status, body) = refused.expect("refused before 40 MiB");
    assert_eq!((round, status), (3, 422), "{body}");
    assert!(
        body["issues"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("configuration would be") && r.contains("32.0 MiB")),
        "{body}"
    );
}
