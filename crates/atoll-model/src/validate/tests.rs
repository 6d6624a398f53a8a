use super::*;
use crate::manifest::load;

const EXAMPLE: [(&str, &str); 5] = [
    (
        "00-places.yaml",
        include_str!("../../../../examples/topology/00-places.yaml"),
    ),
    (
        "10-cells.yaml",
        include_str!("../../../../examples/topology/10-cells.yaml"),
    ),
    (
        "20-sharding.yaml",
        include_str!("../../../../examples/topology/20-sharding.yaml"),
    ),
    (
        "30-services.yaml",
        include_str!("../../../../examples/topology/30-services.yaml"),
    ),
    (
        "40-gateways.yaml",
        include_str!("../../../../examples/topology/40-gateways.yaml"),
    ),
];

fn example() -> Vec<Located> {
    EXAMPLE
        .iter()
        .flat_map(|(name, text)| load(name, text).expect("example parses"))
        .collect()
}

/// The example with one file's text replaced.
fn with_file(name: &str, text: &str) -> Vec<Located> {
    EXAMPLE
        .iter()
        .filter(|(n, _)| *n != name)
        .flat_map(|(n, t)| load(n, t).expect("example parses"))
        .chain(load(name, text).expect("replacement parses"))
        .collect()
}

fn issues(resources: &[Located]) -> Vec<Issue> {
    validate(resources).expect_err("must be refused").0
}

fn sharding(assignments: &str) -> String {
    format!(
        "apiVersion: atoll/v1\nkind: ShardRule\nmetadata: {{name: users}}\nspec:\n  shards: 100\n  key:\n    sources: [{{header: x-user-id}}]\n    transform: {{decimalSuffix: 2}}\n---\napiVersion: atoll/v1\nkind: ShardMap\nmetadata: {{name: users}}\nspec:\n  rule: users\n  assignments:\n{assignments}"
    )
}

#[test]
fn the_example_topology_is_valid() {
    let resources = example();
    assert_eq!(resources.len(), 26);
    validate(&resources).expect("example is valid");
}

#[test]
fn overlapping_ranges_name_both_assignments() {
    let found = issues(&with_file(
        "20-sharding.yaml",
        &sharding("    - {shards: \"0-49\", cell: rz01}\n    - {shards: \"40-99\", cell: rz02}\n"),
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    let issue = &found[0];
    assert_eq!(issue.resource.as_deref(), Some("ShardMap/users"));
    assert_eq!(issue.field.as_deref(), Some("spec.assignments[1].shards"));
    assert_eq!(issue.source.as_deref(), Some("20-sharding.yaml"));
    assert_eq!(issue.line, Some(17));
    assert!(
        issue
            .reason
            .contains("shards 40-49 are also owned by assignments[0] (cell rz01)"),
        "{issue}"
    );
}

#[test]
fn unowned_shards_are_reported_as_ranges() {
    let found = issues(&with_file(
        "20-sharding.yaml",
        &sharding("    - {shards: \"1-49\", cell: rz01}\n    - {shards: \"50-94\", cell: rz02}\n"),
    ));
    let reasons: Vec<&str> = found.iter().map(|i| i.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].starts_with("shard 0 is owned by no assignment"));
    assert!(reasons[1].starts_with("shards 95-99 are owned by no assignment"));
}

#[test]
fn ranges_beyond_the_rule_are_refused() {
    let found = issues(&with_file(
        "20-sharding.yaml",
        &sharding("    - {shards: \"0-100\", cell: rz01}\n"),
    ));
    assert!(
        found[0].reason.contains("go beyond the rule's 100 shards"),
        "{found:?}"
    );
}

#[test]
fn dangling_references_list_what_exists() {
    let found = issues(&with_file(
        "20-sharding.yaml",
        &sharding("    - {shards: \"0-99\", cell: rz09, standby: rz01}\n"),
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field.as_deref(), Some("spec.assignments[0].cell"));
    assert!(
        found[0]
            .reason
            .starts_with("Cell `rz09` does not exist (known: cz01, gz01, rz01")
    );
}

#[test]
fn standby_must_be_an_rzone_in_another_zone() {
    let found = issues(&with_file(
        "20-sharding.yaml",
        &sharding(
            "    - {shards: \"0-49\", cell: rz01, standby: rz01}\n    - {shards: \"50-99\", cell: rz03, standby: cz01}\n",
        ),
    ));
    let reasons: Vec<&str> = found.iter().map(|i| i.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("must be another cell")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("standby `cz01` is a czone")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("in zone sh-a, like the owner")),
        "{reasons:?}"
    );
}

#[test]
fn deleting_a_referenced_zone_breaks_its_cells() {
    let resources: Vec<Located> = example()
        .into_iter()
        .filter(|r| r.resource.key() != ResourceKey::new(Kind::Zone, "sz-a"))
        .collect();
    let found = issues(&resources);
    let places: Vec<String> = found
        .iter()
        .map(|i| {
            format!(
                "{} {}",
                i.resource.as_deref().unwrap_or(""),
                i.field.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(places, ["Cell/rz04 spec.zone", "Gateway/gw-sz-a spec.zone"]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = "apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: Bad_Name}\nspec: {zone: nowhere, type: gzone}\n";
    let mut resources = example();
    resources.extend(load("extra.yaml", text).expect("parses"));
    let found = issues(&resources);
    let fields: Vec<&str> = found.iter().filter_map(|i| i.field.as_deref()).collect();
    assert_eq!(
        fields,
        ["metadata.name", "spec.zone", "spec.type"],
        "{found:?}"
    );
}

#[test]
fn duplicates_point_at_the_first_definition() {
    let mut resources = example();
    resources.extend(
        load(
            "again.yaml",
            "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: hz}\n",
        )
        .expect("parses"),
    );
    let found = issues(&resources);
    assert_eq!(found.len(), 1);
    assert!(
        found[0]
            .reason
            .contains("Region/hz is defined twice; the first is at 00-places.yaml:5"),
        "{}",
        found[0]
    );
}

#[test]
fn transforms_must_fit_the_shard_count() {
    let rule = |transform: &str, shards: u32| {
        format!(
            "apiVersion: atoll/v1\nkind: ShardRule\nmetadata: {{name: users}}\nspec:\n  shards: {shards}\n  key:\n    sources: [{{header: x-user-id}}]\n    transform: {transform}\n---\napiVersion: atoll/v1\nkind: ShardMap\nmetadata: {{name: users}}\nspec:\n  rule: users\n  assignments: [{{shards: \"0-{}\", cell: rz01}}]\n",
            shards - 1
        )
    };
    let found = issues(&with_file(
        "20-sharding.yaml",
        &rule("{decimalSuffix: 2}", 1000),
    ));
    assert!(
        found[0].reason.contains("address only 100 shards"),
        "{found:?}"
    );
    let found = issues(&with_file("20-sharding.yaml", &rule("{mod: 64}", 100)));
    assert!(
        found[0].reason.contains("mod 64 must equal shards (100)"),
        "{found:?}"
    );
    validate(&with_file("20-sharding.yaml", &rule("{hash: xxh3}", 1000)))
        .expect("hash fits any count");
    validate(&with_file(
        "20-sharding.yaml",
        &rule("{decimalSuffix: 2}", 50),
    ))
    .expect("fewer shards than 10^n");
}

#[test]
fn services_and_routes_check_their_references() {
    let text = "apiVersion: atoll/v1\nkind: Route\nmetadata: {name: broken}\nspec:\n  match: [{pathPrefix: api, pathExact: /x, methods: [get]}]\n  service: bank\n  split: [{subset: blue, weight: 1}]\n  mirror: {service: bank, percent: 150}\n";
    let mut resources = example();
    resources.extend(load("route.yaml", text).expect("parses"));
    let found = issues(&resources);
    let fields: Vec<&str> = found.iter().filter_map(|i| i.field.as_deref()).collect();
    assert_eq!(
        fields,
        [
            "spec.match[0]",
            "spec.match[0].pathPrefix",
            "spec.match[0].methods[0]",
            "spec.split[0].subset",
            "spec.mirror.service",
            "spec.mirror.percent"
        ],
        "{found:#?}"
    );
}

#[test]
fn a_global_service_needs_the_gzone() {
    let resources: Vec<Located> = example()
        .into_iter()
        .filter(|r| !matches!(r.resource.name(), "gz01"))
        .collect();
    let found = issues(&resources);
    assert!(
        found.iter().any(|i| i.reason.contains("needs a gzone")),
        "{found:?}"
    );
}

#[test]
fn a_single_gzone() {
    let mut resources = example();
    resources.extend(load("g.yaml", "apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: gz02}\nspec: {zone: sh-a, type: gzone}\n").expect("parses"));
    let found = issues(&resources);
    assert!(found[0].reason.contains("already Cell/gz01"), "{found:?}");
}

#[test]
fn gateways_check_listeners_and_cells() {
    let text = "apiVersion: atoll/v1\nkind: Gateway\nmetadata: {name: gw-x}\nspec:\n  zone: hz-a\n  listeners: [{port: 80, protocol: https}, {port: 80, protocol: http}]\n  cells: [rz03]\n";
    let mut resources = example();
    resources.extend(load("gw.yaml", text).expect("parses"));
    let reasons: Vec<String> = issues(&resources)
        .iter()
        .map(|i| i.reason.clone())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("needs `tls"));
    assert!(reasons[1].contains("port 80 is used by another listener"));
    assert!(reasons[2].contains("cell `rz03` is in zone sh-a"));
}

/// The example's cells, shard rule and map again in workspace `payments`.
fn payments(workspace_resource: bool) -> String {
    let mut text = String::new();
    if workspace_resource {
        text.push_str("apiVersion: atoll/v1\nkind: Workspace\nmetadata: {name: payments}\nspec: {description: the payments team}\n---\n");
    }
    text.push_str(
        "apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: rz01, workspace: payments}\nspec: {zone: hz-a, type: rzone}\n---\n\
         apiVersion: atoll/v1\nkind: Cell\nmetadata: {name: rz02, workspace: payments}\nspec: {zone: hz-b, type: rzone}\n---\n\
         apiVersion: atoll/v1\nkind: ShardRule\nmetadata: {name: users, workspace: payments}\nspec:\n  shards: 10\n  key:\n    sources: [{header: x-user-id}]\n    transform: {decimalSuffix: 1}\n---\n\
         apiVersion: atoll/v1\nkind: ShardMap\nmetadata: {name: users, workspace: payments}\nspec:\n  rule: users\n  assignments:\n    - {shards: \"0-4\", cell: rz01, standby: rz02}\n    - {shards: \"5-9\", cell: rz02, standby: rz01}\n",
    );
    text
}

#[test]
fn a_workspace_reuses_names_and_resolves_references_inside_itself() {
    let mut resources = example();
    resources.extend(load("payments.yaml", &payments(true)).expect("parses"));
    validate(&resources).expect("the same names in another workspace are valid");
    let keys: std::collections::HashSet<ResourceKey> =
        resources.iter().map(|r| r.resource.key()).collect();
    assert!(keys.contains(&ResourceKey::new(Kind::Cell, "rz01")));
    assert!(keys.contains(&ResourceKey::in_workspace(Kind::Cell, "payments", "rz01")));
    assert_eq!(
        ResourceKey::in_workspace(Kind::Cell, "payments", "rz01").to_string(),
        "Cell/rz01@payments"
    );
    // Zones are the fleet's: a key of one ignores a workspace.
    assert_eq!(
        ResourceKey::in_workspace(Kind::Zone, "payments", "hz-a"),
        ResourceKey::new(Kind::Zone, "hz-a")
    );
}

#[test]
fn a_reference_never_crosses_into_another_workspace() {
    let mut resources = example();
    let text = payments(true).replace("cell: rz02, standby: rz01", "cell: rz03, standby: rz01");
    resources.extend(load("payments.yaml", &text).expect("parses"));
    let found = issues(&resources);
    // rz03 exists in the default workspace, not in payments.
    assert!(
        found
            .iter()
            .any(|i| i.resource.as_deref() == Some("ShardMap/users@payments")
                && i.reason.contains("Cell `rz03` does not exist")),
        "{found:?}"
    );
    assert!(
        !found
            .iter()
            .any(|i| i.resource.as_deref() == Some("ShardMap/users")),
        "the default workspace's map is untouched: {found:?}"
    );
}

#[test]
fn a_workspace_must_exist_and_the_fleets_kinds_have_none() {
    let mut resources = example();
    resources.extend(load("payments.yaml", &payments(false)).expect("parses"));
    let found = issues(&resources);
    assert!(
        found
            .iter()
            .any(|i| i.field.as_deref() == Some("metadata.workspace")
                && i.reason.contains("Workspace `payments` does not exist")),
        "{found:?}"
    );

    let zone = "apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: bj-a, workspace: payments}\nspec: {region: hz}\n";
    let mut resources = example();
    resources.extend(load("zone.yaml", zone).expect("parses"));
    let found = issues(&resources);
    assert!(
        found
            .iter()
            .any(|i| i.field.as_deref() == Some("metadata.workspace")
                && i.reason.contains("belongs to the whole fleet")),
        "{found:?}"
    );

    let bad = payments(true).replace("workspace: payments}", "workspace: Pay_ments}");
    let mut resources = example();
    resources.extend(load("payments.yaml", &bad).expect("parses"));
    let found = issues(&resources);
    assert!(
        found
            .iter()
            .any(|i| i.field.as_deref() == Some("metadata.workspace")),
        "{found:?}"
    );
}

#[test]
fn a_peer_listener_needs_a_port_of_its_own_and_an_address_to_be_reached_at() {
    let text = "apiVersion: atoll/v1\nkind: Gateway\nmetadata: {name: gw-x}\nspec:\n  zone: hz-a\n  listeners: [{port: 80, protocol: http}]\n  peer: {port: 80, address: nowhere}\n";
    let mut resources = example();
    resources.extend(load("gw.yaml", text).expect("parses"));
    let found = issues(&resources);
    let reasons: Vec<&str> = found.iter().map(|i| i.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("port 80 is used by a listener of this gateway"));
    assert!(reasons[1].contains("`nowhere` is not an IP address"));
    assert!(reasons[2].contains("add `advertise: HOST:80`"));
    assert_eq!(found[2].field.as_deref(), Some("spec.peer"));
    let good = "apiVersion: atoll/v1\nkind: Gateway\nmetadata: {name: gw-x}\nspec:\n  zone: hz-a\n  listeners: [{port: 80, protocol: http}]\n  peer: {port: 7441}\n  advertise: \"10.0.0.1:7441\"\n";
    let mut resources = example();
    resources.extend(load("gw.yaml", good).expect("parses"));
    validate(&resources).expect("a peer listener with its address is valid");
}
