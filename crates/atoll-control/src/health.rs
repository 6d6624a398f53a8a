//! Cell health, computed on read from what agents report: a cell that runs
//! Apps is healthy when the agent of its zone is connected (its config
//! stream, with heartbeats) and at least one of its instances is ready.

use std::collections::BTreeMap;

use atoll_api::rest::NodeInfo;
use atoll_model::{Resource, Spec};
use serde::Serialize;

/// A cell's health, as `status` of a Cell in REST answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CellStatus {
    /// `Healthy`, `Unhealthy`, or `Unmanaged` (no App runs in the cell, so
    /// Atoll cannot tell).
    pub(crate) health: &'static str,
    /// Why, when not healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// Whether the zone's agent is connected.
    pub(crate) agent: bool,
    /// Reported instances that are ready.
    pub(crate) ready_instances: usize,
    /// Reported instances.
    pub(crate) instances: usize,
}

/// The status of every cell.
pub(crate) fn cell_status(
    resources: &[Resource],
    nodes: &[NodeInfo],
) -> BTreeMap<String, CellStatus> {
    let mut out = BTreeMap::new();
    for resource in resources {
        let Spec::Cell(cell) = &resource.spec else {
            continue;
        };
        let name = resource.name();
        let managed = resources
            .iter()
            .any(|r| matches!(&r.spec, Spec::App(app) if app.cells.iter().any(|c| c == name)));
        let agents: Vec<&NodeInfo> = nodes
            .iter()
            .filter(|n| n.role == "agent" && n.zone == cell.zone)
            .collect();
        let agent = agents.iter().any(|n| n.connected);
        let (mut ready, mut total) = (0, 0);
        for r in resources {
            if let Spec::Endpoints(endpoints) = &r.spec {
                for endpoint in endpoints.endpoints.iter().filter(|e| e.cell == name) {
                    total += 1;
                    ready += usize::from(endpoint.ready);
                }
            }
        }
        let reason = if !managed {
            Some("no App runs in this cell".to_owned())
        } else if !agent {
            Some(if agents.is_empty() {
                format!("no agent of zone {} has connected", cell.zone)
            } else {
                format!("the agent of zone {} is not connected", cell.zone)
            })
        } else if ready == 0 {
            Some(format!("no instance is ready ({total} reported)"))
        } else {
            None
        };
        let health = match (&reason, managed) {
            (_, false) => "Unmanaged",
            (None, true) => "Healthy",
            (Some(_), true) => "Unhealthy",
        };
        out.insert(
            name.to_owned(),
            CellStatus {
                health,
                reason,
                agent,
                ready_instances: ready,
                instances: total,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(yaml: &str) -> Vec<Resource> {
        atoll_model::load("test.yaml", yaml)
            .expect("parses")
            .into_iter()
            .map(|l| l.resource)
            .collect()
    }

    const TOPOLOGY: &str = "
apiVersion: atoll/v1
kind: Cell
metadata: {name: rz01}
spec: {zone: hz-a, type: rzone}
---
apiVersion: atoll/v1
kind: Cell
metadata: {name: gz01}
spec: {zone: hz-a, type: gzone}
---
apiVersion: atoll/v1
kind: App
metadata: {name: bank}
spec: {service: bank, cells: [rz01], command: [bank]}
";

    fn agent(connected: bool) -> NodeInfo {
        NodeInfo {
            name: "agent-hz-a".into(),
            role: "agent".into(),
            zone: "hz-a".into(),
            cell: String::new(),
            connected,
            peer: None,
            applied_version: 1,
            sent_version: 1,
            last_nack: None,
            problem: None,
            last_seen: String::new(),
            replica: None,
            positions: None,
        }
    }

    fn endpoints(ready: &[bool]) -> String {
        let list: Vec<String> = ready
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{{cell: rz01, address: \"127.0.0.1:{}\", instance: bank-rz01-{i}, ready: {r}}}", 9000 + i))
            .collect();
        format!(
            "---\napiVersion: atoll/v1\nkind: Endpoints\nmetadata: {{name: bank-hz-a}}\nspec: {{service: bank, zone: hz-a, endpoints: [{}]}}\n",
            list.join(", ")
        )
    }

    #[test]
    fn a_cell_is_healthy_with_its_agent_and_a_ready_instance() {
        let all = resources(&format!("{TOPOLOGY}{}", endpoints(&[true, false])));
        let status = cell_status(&all, &[agent(true)]);
        assert_eq!(status["rz01"].health, "Healthy");
        assert_eq!(
            (status["rz01"].ready_instances, status["rz01"].instances),
            (1, 2)
        );
        assert_eq!(status["gz01"].health, "Unmanaged", "no App runs there");
    }

    #[test]
    fn a_cell_is_unhealthy_when_its_agent_or_all_its_instances_are_gone() {
        let all = resources(&format!("{TOPOLOGY}{}", endpoints(&[true])));
        let gone = cell_status(&all, &[agent(false)]);
        assert_eq!(gone["rz01"].health, "Unhealthy");
        assert_eq!(
            gone["rz01"].reason.as_deref(),
            Some("the agent of zone hz-a is not connected")
        );
        let never = cell_status(&all, &[]);
        assert_eq!(
            never["rz01"].reason.as_deref(),
            Some("no agent of zone hz-a has connected")
        );
        let none_ready = resources(&format!("{TOPOLOGY}{}", endpoints(&[false, false])));
        let status = cell_status(&none_ready, &[agent(true)]);
        assert_eq!(status["rz01"].health, "Unhealthy");
        assert_eq!(
            status["rz01"].reason.as_deref(),
            Some("no instance is ready (2 reported)")
        );
    }
}
