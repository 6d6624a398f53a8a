use atoll_api::registry::{Instance, Registrant};

use super::*;

const TOPOLOGY: &str = r#"
apiVersion: atoll/v1
kind: Region
metadata: {name: hz}
---
apiVersion: atoll/v1
kind: Zone
metadata: {name: hz-a}
spec: {region: hz}
---
apiVersion: atoll/v1
kind: Zone
metadata: {name: hz-b}
spec: {region: hz}
---
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
kind: Service
metadata: {name: risk}
spec: {kind: local}
---
apiVersion: atoll/v1
kind: Service
metadata: {name: audit}
spec: {kind: local}
---
apiVersion: atoll/v1
kind: App
metadata: {name: risk}
spec: {service: risk, cells: [rz01, rz02], replicas: 2, command: [risk]}
"#;

fn topology() -> Topology {
    let located = atoll_model::load("topology.yaml", TOPOLOGY).expect("valid");
    Topology::from_resources(located.iter().map(|l| &l.resource))
}

fn registrant(role: &str, zone: &str, name: &str) -> Registrant {
    Registrant {
        name: name.into(),
        role: role.into(),
        zone: zone.into(),
        workspace: String::new(),
    }
}

fn risk(zone: &str, cell: &str, name: &str) -> Instance {
    Instance {
        service: "risk".into(),
        name: name.into(),
        zone: zone.into(),
        cell: cell.into(),
        address: "127.0.0.1".into(),
        port: 7000,
        ..Instance::default()
    }
}

#[test]
fn a_registration_is_completed_from_the_topology() {
    let stored = instance(
        &topology(),
        &registrant("sidecar", "hz-a", "risk-rz01-0"),
        7,
        0,
        &risk("hz-a", "rz01", "risk-rz01-0"),
    )
    .expect("allowed");
    assert_eq!(stored.region, "hz");
    assert_eq!(stored.protocol, "http");
    assert_eq!(stored.weight, crate::DEFAULT_WEIGHT);
    assert_eq!(stored.mode, "sidecar");
    assert_eq!(stored.registered_by, "sidecar/hz-a/risk-rz01-0");
    assert_eq!(stored.session, 7);
}

#[test]
fn a_sidecar_registers_only_itself_and_an_agent_only_its_zone() {
    let t = topology();
    let sidecar = registrant("sidecar", "hz-a", "risk-rz01-0");
    let error = instance(&t, &sidecar, 1, 0, &risk("hz-a", "rz01", "risk-rz01-1"))
        .expect_err("another instance");
    assert!(matches!(error, CheckError::Forbidden(_)), "{error}");
    assert!(
        error.to_string().contains("only its own instance"),
        "{error}"
    );
    // Its own name, but as another Service: a certificate for one
    // instance is no licence to serve another Service.
    let error = instance(
        &t,
        &sidecar,
        1,
        0,
        &Instance {
            service: "audit".into(),
            ..risk("hz-a", "rz01", "risk-rz01-0")
        },
    )
    .expect_err("another Service");
    assert!(matches!(error, CheckError::Forbidden(_)), "{error}");
    assert!(error.to_string().contains("Service `risk`"), "{error}");
    // A name no App runs.
    let stray = registrant("sdk", "hz-a", "stray-rz01-0");
    let error = instance(&t, &stray, 1, 0, &risk("hz-a", "rz01", "stray-rz01-0"))
        .expect_err("not an App's instance");
    assert!(error.to_string().contains("no App"), "{error}");
    let error = instance(
        &t,
        &registrant("agent", "hz-a", "hz-a"),
        1,
        0,
        &risk("hz-b", "rz02", "risk-1"),
    )
    .expect_err("another zone");
    assert!(error.to_string().contains("its own zone only"), "{error}");
    assert!(
        instance(
            &t,
            &registrant("agent", "hz-b", "hz-b"),
            1,
            0,
            &risk("hz-b", "rz02", "risk-1")
        )
        .is_ok()
    );
    let error = instance(
        &t,
        &registrant("gateway", "hz-a", "gw"),
        1,
        0,
        &risk("hz-a", "rz01", "gw"),
    )
    .expect_err("gateways do not register");
    assert!(matches!(error, CheckError::Forbidden(_)), "{error}");
}

#[test]
fn bad_registrations_say_which_field_and_what_to_do() {
    let t = topology();
    let agent = registrant("agent", "hz-a", "hz-a");
    let cases: Vec<(Instance, &str)> = vec![
        (risk("hz-a", "rz02", "r"), "cell `rz02` is in zone `hz-b`"),
        (risk("hz-a", "rz09", "r"), "cell `rz09` does not exist"),
        (
            Instance {
                service: "ledger".into(),
                ..risk("hz-a", "rz01", "r")
            },
            "Service `ledger` does not exist",
        ),
        (
            Instance {
                port: 0,
                ..risk("hz-a", "rz01", "r")
            },
            "port 0",
        ),
        (
            Instance {
                address: "10.0.0.1:80".into(),
                ..risk("hz-a", "rz01", "r")
            },
            "no port here",
        ),
        (
            Instance {
                protocol: "thrift".into(),
                ..risk("hz-a", "rz01", "r")
            },
            "protocol `thrift`",
        ),
        (
            Instance {
                weight: 10_001,
                ..risk("hz-a", "rz01", "r")
            },
            "weight 10001",
        ),
        (
            Instance {
                mode: "mesh".into(),
                ..risk("hz-a", "rz01", "r")
            },
            "mode `mesh`",
        ),
        (
            risk("hz-a", "rz01", "Bad_Name"),
            "instances[0] (risk/hz-a/Bad_Name): name",
        ),
    ];
    for (bad, expected) in cases {
        let error = instance(&t, &agent, 1, 0, &bad).expect_err(expected);
        assert!(
            error.to_string().contains(expected),
            "{error} lacks {expected:?}"
        );
    }
}

#[test]
fn a_session_ttl_is_bounded() {
    assert_eq!(session_ttl(0), Ok(crate::DEFAULT_TTL));
    assert_eq!(session_ttl(5_000), Ok(std::time::Duration::from_secs(5)));
    assert!(session_ttl(100).is_err());
    assert!(session_ttl(600_000).is_err());
}
