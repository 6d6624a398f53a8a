//! Workspaces: two teams use the same names without meeting. The CLI's
//! `--workspace` picks where manifests go and what `get`, `history` and
//! `delete` look at; references stay inside a workspace; a node of a
//! workspace receives the fleet's resources and its workspace's only.

use serde_json::Value;

use crate::harness::{Control, examples};
use crate::stream::Node;

const PAYMENTS: &str = "\
apiVersion: atoll/v1
kind: Cell
metadata: {name: rz01}
spec: {zone: hz-a, type: rzone}
---
apiVersion: atoll/v1
kind: Cell
metadata: {name: rz02}
spec: {zone: hz-b, type: rzone}
---
apiVersion: atoll/v1
kind: ShardRule
metadata: {name: users}
spec:
  shards: 10
  key:
    sources: [{header: x-user-id}]
    transform: {decimalSuffix: 1}
---
apiVersion: atoll/v1
kind: ShardMap
metadata: {name: users}
spec:
  rule: users
  assignments:
    - {shards: \"0-4\", cell: rz01, standby: rz02}
    - {shards: \"5-9\", cell: rz02, standby: rz01}
";

const WORKSPACE: &str = "\
apiVersion: atoll/v1
kind: Workspace
metadata: {name: payments}
spec: {description: the payments team}
";

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            let workspace = i["metadata"]["workspace"].as_str().unwrap_or("default");
            format!(
                "{}@{workspace}",
                i["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[test]
fn two_workspaces_use_the_same_names_and_never_see_each_other() {
    let control = Control::start();
    let examples = examples();
    control
        .atoll(&["apply", "-f", examples.to_str().unwrap()])
        .success();

    // Into a workspace that does not exist yet: refused, nothing changed.
    let before = control.revision();
    control
        .atoll_with_stdin(
            &["--workspace", "payments", "apply", "-f", "-"],
            Some(PAYMENTS),
        )
        .fails(
            3,
            &["Workspace `payments` does not exist", "metadata.workspace"],
        );
    assert_eq!(control.revision(), before);

    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(WORKSPACE))
        .success();
    control
        .atoll_with_stdin(
            &["--workspace", "payments", "apply", "-f", "-"],
            Some(PAYMENTS),
        )
        .success();

    // Each workspace sees its own cells; '*' sees both.
    let default = names(&control.json(&["get", "cells"]));
    assert!(default.contains(&"rz01@default".to_owned()), "{default:?}");
    assert!(
        !default.iter().any(|n| n.ends_with("@payments")),
        "{default:?}"
    );
    let payments = names(&control.json(&["--workspace", "payments", "get", "cells"]));
    assert_eq!(payments, ["rz01@payments", "rz02@payments"]);
    let all = names(&control.json(&["--workspace", "*", "get", "cells"]));
    assert!(
        all.contains(&"rz01@default".to_owned()) && all.contains(&"rz01@payments".to_owned()),
        "{all:?}"
    );
    // Zones are the fleet's: every workspace lists them.
    let zones = names(&control.json(&["--workspace", "payments", "get", "zones"]));
    assert!(zones.contains(&"hz-a@default".to_owned()), "{zones:?}");

    // One resource by name, its history and a delete, per workspace.
    let map = control.json(&["--workspace", "payments", "get", "shardmap", "users"]);
    assert_eq!(map["metadata"]["workspace"], "payments", "{map}");
    assert_eq!(
        map["spec"]["assignments"].as_array().map(Vec::len),
        Some(2),
        "{map}"
    );
    control
        .atoll(&["--workspace", "payments", "history", "shardmap/users"])
        .success();
    // rz02 of payments is still in payments' map: refused, naming it.
    control
        .atoll(&["--workspace", "payments", "delete", "cell", "rz02"])
        .fails(3, &["ShardMap/users@payments"]);
    // The default workspace's rz02 is not touched by any of it.
    let cell = control.json(&["get", "cell", "rz02"]);
    assert_eq!(cell["spec"]["zone"], "hz-b");
    assert!(cell["metadata"].get("workspace").is_none(), "{cell}");

    // A workspace's name in a manifest wins over the flag; naming
    // `default` is the same as naming none.
    let explicit = "apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: rz02, workspace: default}\nspec: {zone: hz-b, type: rzone}\n";
    let unchanged = control
        .atoll_with_stdin(
            &["--workspace", "payments", "apply", "-f", "-"],
            Some(explicit),
        )
        .success();
    assert!(
        unchanged.stderr().contains("unchanged"),
        "{}",
        unchanged.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_receives_the_fleet_and_its_own_workspace_only() {
    let control = Control::start();
    let examples = examples();
    control
        .atoll(&["apply", "-f", examples.to_str().unwrap()])
        .success();
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(WORKSPACE))
        .success();
    control
        .atoll_with_stdin(
            &["--workspace", "payments", "apply", "-f", "-"],
            Some(PAYMENTS),
        )
        .success();

    let kinds_and_maps = |update: &atoll_api::config::ConfigUpdate| {
        let mut seen: Vec<String> = Vec::new();
        for resource in &update.resources {
            let value: Value = serde_json::from_slice(&resource.json).expect("json");
            seen.push(format!(
                "{}/{}@{}",
                resource.kind,
                resource.name,
                value["metadata"]["workspace"].as_str().unwrap_or("default")
            ));
        }
        seen
    };
    let mut payments = Node::connect_in(&control.url, "gw-pay", "gateway", "payments", 0).await;
    let snapshot = payments.next().await;
    assert!(snapshot.snapshot);
    let seen = kinds_and_maps(&snapshot);
    assert!(
        seen.contains(&"ShardMap/users@payments".to_owned()),
        "{seen:?}"
    );
    assert!(seen.contains(&"Zone/hz-a@default".to_owned()), "{seen:?}");
    assert!(
        seen.contains(&"Workspace/payments@default".to_owned()),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|s| s.ends_with("@default")
            && (s.starts_with("Cell/") || s.starts_with("ShardMap/") || s.starts_with("Service/"))),
        "nothing of the default workspace: {seen:?}"
    );

    let mut default = Node::connect_in(&control.url, "gw-default", "gateway", "", 0).await;
    let seen = kinds_and_maps(&default.next().await);
    assert!(
        seen.contains(&"ShardMap/users@default".to_owned()),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|s| s.ends_with("@payments")), "{seen:?}");

    // A change in the default workspace reaches the payments node as a
    // new version with nothing in it (barriers count versions).
    control
        .atoll_with_stdin(
            &["apply", "-f", "-"],
            Some("apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: rz09}\nspec: {zone: hz-a, type: rzone}\n"),
        )
        .success();
    let update = payments.next().await;
    assert!(!update.snapshot);
    assert!(update.version > snapshot.version);
    assert!(
        update.resources.is_empty() && update.removed.is_empty(),
        "{update:?}"
    );
}
