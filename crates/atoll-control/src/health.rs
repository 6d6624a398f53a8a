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
