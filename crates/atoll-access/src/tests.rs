use atoll_identity::{AtollId, Role};
use atoll_model::{AccessRole, ApprovalRule, Kind, ResourceKey, load};

use super::*;

const WORKSPACES: &str = r#"
apiVersion: atoll/v1
kind: Workspace
metadata: {name: payments}
spec:
  bindings:
    - {role: operator, users: [olga]}
    - {role: viewer, groups: [auditors]}
    - {role: admin, users: [ada]}
  approvals: [switchover, shardMapRollback]
---
apiVersion: atoll/v1
kind: Workspace
metadata: {name: cards}
spec:
  bindings:
    - {role: admin, groups: [cards-team]}
"#;

fn policy() -> Policy {
    let located = load("test.yaml", WORKSPACES).expect("manifests load");
    Policy::from_resources(located.iter().map(|l| &l.resource))
}

fn user(name: &str, groups: &[&str]) -> Principal {
    Principal::User {
        name: name.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
    }
}

fn shard_map(workspace: &str) -> ResourceKey {
    ResourceKey::in_workspace(Kind::ShardMap, workspace, "accounts")
}

#[test]
fn roles_come_from_bindings_of_users_and_groups() {
    let policy = policy();
    assert_eq!(
        policy.role(&user("olga", &[]), "payments"),
        Some(AccessRole::Operator)
    );
    assert_eq!(
        policy.role(&user("ivan", &["auditors"]), "payments"),
        Some(AccessRole::Viewer)
    );
    // The highest of several bindings counts.
    assert_eq!(
        policy.role(&user("ada", &["auditors"]), "payments"),
        Some(AccessRole::Admin)
    );
    assert_eq!(policy.role(&user("olga", &[]), "cards"), None);
    assert_eq!(policy.role(&user("olga", &[]), "nowhere"), None);
    assert_eq!(
        policy.role(&user("eve", &[VIEWERS]), "cards"),
        Some(AccessRole::Viewer)
    );
    assert_eq!(
        policy.role(&user("root", &[ADMINS]), "anything"),
        Some(AccessRole::Admin)
    );
}

#[test]
fn deny_by_default() {
    let policy = policy();
    let nobody = user("mallory", &[]);
    for action in [
        Action::Read(Some("payments")),
        Action::Write(&shard_map("payments")),
        Action::Switchover("payments"),
        Action::ReadFleet,
        Action::AdministerFleet,
    ] {
        let denied = policy.decide(&nobody, action).expect_err("denied");
        assert!(denied.authenticated);
        assert!(denied.message.contains("mallory"), "{}", denied.message);
    }
    // Reading the fleet's own kinds and observing need only a credential.
    assert!(policy.decide(&nobody, Action::Read(None)).is_ok());
    assert!(policy.decide(&nobody, Action::Observe).is_ok());
}

#[test]
fn a_viewer_reads_but_does_not_write() {
    let policy = policy();
    let viewer = user("ivan", &["auditors"]);
    assert!(
        policy
            .decide(&viewer, Action::Read(Some("payments")))
            .is_ok()
    );
    let denied = policy
        .decide(&viewer, Action::Write(&shard_map("payments")))
        .expect_err("a viewer may not apply a shard map");
    assert!(
        denied
            .message
            .contains("operator role in workspace payments")
            && denied.message.contains("they are viewer there"),
        "{}",
        denied.message
    );
    assert!(
        policy
            .decide(&viewer, Action::Switchover("payments"))
            .is_err()
    );
}

#[test]
fn an_operator_of_one_workspace_is_nobody_in_another() {
    let policy = policy();
    let olga = user("olga", &[]);
    assert!(
        policy
            .decide(&olga, Action::Write(&shard_map("payments")))
            .is_ok()
    );
    assert!(
        policy
            .decide(&olga, Action::Rollback(&shard_map("payments")))
            .is_ok()
    );
    assert!(policy.decide(&olga, Action::Approve("payments")).is_ok());
    let denied = policy
        .decide(&olga, Action::Write(&shard_map("cards")))
        .expect_err("olga has no role in cards");
    assert!(
        denied.message.contains("they have no role there"),
        "{}",
        denied.message
    );
    // An operator may not change the workspace's own bindings.
    let workspace = ResourceKey::new(Kind::Workspace, "payments");
    assert!(policy.decide(&olga, Action::Write(&workspace)).is_err());
    assert!(
        policy
            .decide(&olga, Action::BootstrapToken("payments"))
            .is_err()
    );
}

#[test]
fn a_workspace_admin_keeps_its_bindings_but_not_the_fleet() {
    let policy = policy();
    let ada = user("ada", &[]);
    let payments = ResourceKey::new(Kind::Workspace, "payments");
    assert!(policy.decide(&ada, Action::Write(&payments)).is_ok());
    assert!(
        policy
            .decide(&ada, Action::BootstrapToken("payments"))
            .is_ok()
    );
    // Making a new workspace, a region or a zone is the fleet's.
    for key in [
        ResourceKey::new(Kind::Workspace, "new-team"),
        ResourceKey::new(Kind::Region, "hangzhou"),
        ResourceKey::new(Kind::Zone, "hz-a"),
    ] {
        let denied = policy
            .decide(&ada, Action::Write(&key))
            .expect_err("fleet kinds need the fleet's admins");
        assert!(denied.message.contains(ADMINS), "{}", denied.message);
    }
    assert!(policy.decide(&ada, Action::AdministerFleet).is_err());
}

#[test]
fn fleet_groups() {
    let policy = policy();
    let admin = user("root", &[ADMINS]);
    let viewer = user("eve", &[VIEWERS]);
    for action in [
        Action::Write(&ResourceKey::new(Kind::Zone, "hz-a")),
        Action::AdministerFleet,
        Action::ReadFleet,
        Action::Switchover("cards"),
    ] {
        assert!(policy.decide(&admin, action).is_ok(), "{action}");
    }
    assert!(policy.decide(&viewer, Action::ReadFleet).is_ok());
    assert!(policy.decide(&viewer, Action::Read(Some("cards"))).is_ok());
    assert!(
        policy
            .decide(&viewer, Action::Write(&shard_map("cards")))
            .is_err()
    );
}

#[test]
fn nodes_read_their_workspace_and_anonymous_callers_nothing() {
    let policy = policy();
    let gateway = Principal::Node(
        AtollId::new("payments", Role::Gateway, "hz-a", "gw-1").expect("a valid id"),
    );
    // A node reads its own workspace, as it does on the config stream.
    assert!(
        policy
            .decide(&gateway, Action::Read(Some("payments")))
            .is_ok()
    );
    assert!(policy.decide(&gateway, Action::Read(None)).is_ok());
    for action in [
        Action::Read(Some("cards")),
        Action::Write(&shard_map("payments")),
        Action::Switchover("payments"),
        Action::ReadFleet,
    ] {
        let denied = policy
            .decide(&gateway, action)
            .expect_err("a node only reads its workspace");
        assert!(denied.authenticated);
        assert!(denied.message.contains("gateway"), "{}", denied.message);
    }

    let denied = policy
        .decide(&Principal::Anonymous, Action::Read(None))
        .expect_err("no credential, no access");
    assert!(!denied.authenticated);
    assert!(denied.message.contains("atoll login"), "{}", denied.message);
}

#[test]
fn without_access_control_everything_is_allowed_and_marked() {
    let policy = policy();
    let claimed = Principal::Unverified("bob".to_owned());
    assert!(policy.decide(&claimed, Action::AdministerFleet).is_ok());
    assert_eq!(claimed.name(), "bob (unverified)");
    assert_eq!(claimed.user(), Some("bob"));
}

#[test]
fn approvals_by_workspace() {
    let policy = policy();
    assert!(policy.needs_approval("payments", ApprovalRule::Switchover));
    assert!(policy.needs_approval("payments", ApprovalRule::ShardMapRollback));
    assert!(!policy.needs_approval("payments", ApprovalRule::Failover));
    assert!(!policy.needs_approval("cards", ApprovalRule::Switchover));
    assert!(!policy.needs_approval("nowhere", ApprovalRule::Switchover));
}

#[test]
fn only_an_agent_of_the_zone_reports_its_endpoints() {
    let agent = AtollId::new("default", Role::Agent, "hz-a", "agent-1").expect("a valid id");
    let gateway = AtollId::new("default", Role::Gateway, "hz-a", "gw-1").expect("a valid id");
    assert!(node_may_report_endpoints(&agent, "hz-a"));
    assert!(!node_may_report_endpoints(&agent, "sh-a"));
    assert!(!node_may_report_endpoints(&gateway, "hz-a"));
}
