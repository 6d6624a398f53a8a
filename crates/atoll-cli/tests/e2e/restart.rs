//! Restarting the control plane loses no state or history, on both stores.

use atoll_testing::EtcdServer;

use crate::harness::{Control, examples};

fn survives_restart(mut control: Control) {
    let examples = examples();
    control
        .atoll(&["apply", "-f", examples.to_str().unwrap()])
        .success();
    control
        .atoll_with_stdin(
            &["apply", "-f", "-", "-m", "weigh hz-b"],
            Some("apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: hz-b}\nspec: {region: hz, weight: 30}\n"),
        )
        .success();
    let before = control.json(&["get", "all"]);
    let history = control.json(&["history", "zone/hz-b"]);
    let audit = control.json(&["audit"]);

    control.restart();

    assert_eq!(control.json(&["get", "all"]), before);
    assert_eq!(control.json(&["history", "zone/hz-b"]), history);
    assert_eq!(control.json(&["audit"]), audit);
    control.atoll(&["delete", "route/web"]).success();
    assert_eq!(
        control.revision(),
        3,
        "revisions continue after the restart"
    );
}

#[test]
fn the_embedded_store_survives_a_restart() {
    survives_restart(Control::start());
}

#[test]
fn the_etcd_store_survives_a_restart() {
    let etcd = EtcdServer::start();
    let control = Control::start_with(vec![
        "--store=etcd".into(),
        format!("--etcd-endpoints={}", etcd.endpoint()),
    ]);
    let status = control.json(&["status"]);
    assert_eq!(status["store"], "etcd");
    survives_restart(control);
}
