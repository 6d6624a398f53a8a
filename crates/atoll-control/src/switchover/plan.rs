//! Planning a switchover: what a request moves, the checks of its plan,
//! and the start.

use std::sync::Arc;

use atoll_api::rest::{PlanCheck, SwitchoverPlan, SwitchoverRequest};
use atoll_model::{
    DurationValue, Kind, Located, Origin, PhaseRecord, Resource, ShardMapSpec, ShardMove,
    ShardRange, ShardState, Spec, SwitchoverMode, SwitchoverPhase, SwitchoverSpec, diff,
};
use atoll_switchover::shards::set_range;
use time::OffsetDateTime;

use super::{Switchovers, active_on, duration, now, unused_name};
use crate::nodes::rfc3339;
use crate::writer::{Author, ChangeSet, ControlError};

impl Switchovers {
    /// Plans, and unless a dry run, starts.
    pub(crate) async fn start(
        self: &Arc<Self>,
        request: SwitchoverRequest,
        author: &Author,
    ) -> Result<SwitchoverPlan, ControlError> {
        let snapshot = self.writer.store.snapshot().await?;
        let resources = &snapshot.resources;
        let maps: Vec<&Resource> = resources
            .iter()
            .filter(|r| r.kind() == Kind::ShardMap)
            .collect();
        let map = match &request.shard_map {
            Some(name) => maps
                .iter()
                .find(|m| m.name() == name)
                .copied()
                .ok_or_else(|| {
                    ControlError::NotFound(format!(
                        "shardmap/{name} does not exist; `atoll get shardmaps` lists them"
                    ))
                })?,
            None => match maps.as_slice() {
                [only] => *only,
                [] => {
                    return Err(ControlError::BadRequest(
                        "there is no ShardMap to switch over".into(),
                    ));
                }
                _ => {
                    return Err(ControlError::BadRequest(format!(
                        "there are {} shard maps; name one with --shard-map",
                        maps.len()
                    )));
                }
            },
        };
        let Spec::ShardMap(map_spec) = &map.spec else {
            return Err(ControlError::Unavailable(
                "a ShardMap without its spec".into(),
            ));
        };
        if let Some(active) = active_on(resources, map.name()) {
            return Err(ControlError::Conflict(format!(
                "switchover/{active} is still running on shardmap/{}; wait for it (atoll switchover status {active}) or abort it",
                map.name()
            )));
        }
        let moves = moves_for(map_spec, &request, resources)?;
        let barrier_timeout = duration(&request.barrier_timeout, "barrierTimeout", 10)?;
        let sync_timeout = duration(&request.sync_timeout, "syncTimeout", 10)?;
        let name = match &request.name {
            Some(name) => name.clone(),
            // Two in the same second (a drill putting several ranges back)
            // get `-2`, `-3`...: a generated name never clashes.
            None => unused_name(
                resources,
                &format!(
                    "{}-{}",
                    map.name(),
                    OffsetDateTime::now_utc().unix_timestamp()
                ),
            ),
        };
        if let Some(problem) = atoll_model::names::dns_label_problem(&name) {
            return Err(ControlError::BadRequest(format!(
                "switchover name `{name}`: {problem}"
            )));
        }
        if resources
            .iter()
            .any(|r| r.kind() == Kind::Switchover && r.name() == name)
        {
            return Err(ControlError::Conflict(format!(
                "switchover/{name} exists already; choose another --name"
            )));
        }

        // The plan: the diff, the checks, the window to expect.
        let mut flipped = map_spec.clone();
        for m in &moves {
            set_range(&mut flipped, m.shards, |a| {
                a.cell = m.to.clone();
                a.standby = Some(m.from.clone());
            });
        }
        flipped.epoch = map_spec.epoch + 1;
        let after = Resource {
            metadata: map.metadata.clone(),
            spec: Spec::ShardMap(flipped),
        };
        let mut checks = self.checks(resources, map_spec, &moves, &request).await;
        if !request.failover {
            // The map after the flip must be valid, or the switchover would
            // fence and then stop: say so now.
            let set = ChangeSet {
                puts: vec![Located {
                    resource: after.clone(),
                    origin: Origin::Generated {
                        what: Arc::from(format!("the flip of switchover/{name}")),
                    },
                }],
                ..ChangeSet::default()
            };
            let planner = Author::control_plane(format!("switchover/{name}"), None);
            match self.writer.apply(set, true, &planner).await {
                Err(ControlError::Invalid { issues, .. }) => checks.push(PlanCheck {
                    check: "shard map after the flip".into(),
                    result: "blocking".into(),
                    detail: issues
                        .iter()
                        .map(|i| i.reason.clone())
                        .collect::<Vec<_>>()
                        .join("; "),
                }),
                Err(other) => checks.push(PlanCheck {
                    check: "shard map after the flip".into(),
                    result: "warning".into(),
                    detail: format!("could not be checked: {other}"),
                }),
                Ok(_) => checks.push(PlanCheck {
                    check: "shard map after the flip".into(),
                    result: "ok".into(),
                    detail: "valid".into(),
                }),
            }
        }
        // Any positions reported, whatever map they were read under: a
        // plan shows the lag now.
        let probes = self.positions(resources, map_spec, &moves, 0).await;
        let lag: i64 = probes
            .as_ref()
            .map(|p| p.iter().map(|s| (s.written - s.acknowledged).max(0)).sum())
            .unwrap_or(0);
        match (&probes, request.skip_sync_gate) {
            _ if request.failover => checks.push(PlanCheck {
                check: "failover".into(),
                result: "warning".into(),
                detail: format!(
                    "no sync gate: writes the source had not replicated are lost (at its last probe: {}); the flip waits until its lease has expired",
                    match self.probed.lock().get(request.from.as_deref().unwrap_or_default()) {
                        Some((_, at, positions)) => format!(
                            "{} log positions behind on {} shards, {}",
                            positions.iter().map(|p| (p.written - p.acknowledged).max(0)).sum::<i64>(),
                            positions.iter().filter(|p| p.written > p.acknowledged).count(),
                            rfc3339(*at)
                        ),
                        None => "never probed".into(),
                    }
                ),
            }),
            (_, true) => checks.push(PlanCheck {
                check: "sync gate".into(),
                result: "warning".into(),
                detail:
                    "skipped on request: writes not yet replicated when the shards flip are lost"
                        .into(),
            }),
            (Ok(positions), false) => checks.push(PlanCheck {
                check: "replication".into(),
                result: "ok".into(),
                detail: format!(
                    "{} shards probed; the targets are {lag} log positions behind in all",
                    positions.len()
                ),
            }),
            (Err(problem), false) => checks.push(PlanCheck {
                check: "replication".into(),
                result: if problem.blocking {
                    "blocking"
                } else {
                    "warning"
                }
                .into(),
                detail: problem.text.clone(),
            }),
        }
        let shard_count: u32 = moves
            .iter()
            .map(|m| m.shards.end - m.shards.start + 1)
            .sum();
        let plan = SwitchoverPlan {
            name: name.clone(),
            shard_map: map.name().to_owned(),
            epoch: map_spec.epoch,
            moves: moves
                .iter()
                .map(|m| serde_json::json!({"shards": m.shards.to_string(), "from": m.from, "to": m.to}))
                .collect(),
            shard_count,
            diff: diff(&map.key().to_string(), Some(map), Some(&after)),
            checks,
            needs_approval: None,
            expected_fence_window: format!(
                "two barriers over {} nodes (milliseconds each when every node is connected) plus the sync gate: {lag} log positions to replicate now; the sync gate gives up after {}",
                self.nodes.list().len(),
                humantime::format_duration(sync_timeout)
            ),
            dry_run: request.dry_run,
        };
        if request.dry_run {
            return Ok(plan);
        }
        if request.failover {
            let Some(from) = request.from.as_deref() else {
                return Err(ControlError::BadRequest(
                    "a failover moves every shard of a lost cell: give --from CELL".into(),
                ));
            };
            if !self.leases.enabled() {
                return Err(ControlError::Conflict(
                    "this control plane runs without ownership leases (--lease-duration 0s), so nothing stops the lost cell from writing on: stop it for certain, then move its shards with a planned switchover and --skip-sync-gate".into(),
                ));
            }
            let spec = self.failover_spec(
                (map.name(), map_spec.epoch),
                from,
                moves,
                true,
                barrier_timeout,
                request.reason.clone().unwrap_or_else(|| {
                    format!("failover of {from} requested by {}", author.name())
                }),
            );
            self.create(&name, spec, "failover requested").await?;
            return Ok(plan);
        }
        let blocking: Vec<String> = plan
            .checks
            .iter()
            .filter(|c| c.result == "blocking")
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect();
        if !blocking.is_empty() {
            return Err(ControlError::Conflict(format!(
                "the switchover cannot start: {}",
                blocking.join("; ")
            )));
        }
        let spec = SwitchoverSpec {
            shard_map: map.name().to_owned(),
            moves,
            barrier_timeout: DurationValue(barrier_timeout),
            sync_timeout: DurationValue(sync_timeout),
            skip_sync_gate: request.skip_sync_gate,
            reason: request.reason.clone(),
            mode: SwitchoverMode::Planned,
            phase: SwitchoverPhase::Pending,
            abort_requested: false,
            expected_nodes: self.nodes.names(),
            approved: false,
            unreplicated: Vec::new(),
            last_seen: None,
            timeline: vec![PhaseRecord {
                phase: SwitchoverPhase::Pending,
                started: now(),
                millis: None,
                detail: Some(format!("requested by {}", author.name())),
            }],
            epoch_before: Some(map_spec.epoch),
            fence_revision: None,
            flip_revision: None,
            positions: Vec::new(),
            message: None,
        };
        self.create(&name, spec, "requested").await?;
        Ok(plan)
    }

    /// Health and capacity of the targets.
    async fn checks(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        moves: &[ShardMove],
        request: &SwitchoverRequest,
    ) -> Vec<PlanCheck> {
        let status = crate::health::cell_status(resources, &self.nodes.list());
        let mut checks = Vec::new();
        let targets: std::collections::BTreeSet<&str> =
            moves.iter().map(|m| m.to.as_str()).collect();
        for target in targets {
            let incoming: u32 = moves
                .iter()
                .filter(|m| m.to == target)
                .map(|m| m.shards.end - m.shards.start + 1)
                .sum();
            let owned: u32 = map
                .assignments
                .iter()
                .filter(|a| a.cell == target)
                .map(|a| a.shards.end - a.shards.start + 1)
                .sum();
            match status.get(target) {
                Some(s) if s.health == "Unhealthy" => checks.push(PlanCheck {
                    check: format!("health of {target}"),
                    result: "blocking".into(),
                    detail: format!(
                        "{target} is unhealthy: {}",
                        s.reason.clone().unwrap_or_default()
                    ),
                }),
                Some(s) => {
                    let ready = s.ready_instances;
                    let detail = if s.health == "Unmanaged" {
                        format!(
                            "{target} runs no App Atoll manages: its capacity is unknown; it goes from {owned} to {} shards",
                            owned + incoming
                        )
                    } else {
                        format!(
                            "{target} has {ready} ready instances and goes from {owned} to {} shards ({:.1} shards per instance)",
                            owned + incoming,
                            f64::from(owned + incoming) / ready.max(1) as f64
                        )
                    };
                    // Taking on more than twice its shards is worth a look.
                    let heavy = owned > 0 && owned + incoming > owned * 2 + 1;
                    checks.push(PlanCheck {
                        check: format!("capacity of {target}"),
                        result: if heavy { "warning" } else { "ok" }.into(),
                        detail: if heavy {
                            format!("{detail}: more than twice its load today; check its headroom")
                        } else {
                            detail
                        },
                    });
                }
                None => checks.push(PlanCheck {
                    check: format!("health of {target}"),
                    result: "blocking".into(),
                    detail: format!("cell {target} does not exist"),
                }),
            }
        }
        let (connected, disconnected) = self.nodes.counts();
        checks.push(PlanCheck {
            check: "nodes".into(),
            result: if disconnected > 0 { "warning" } else { "ok" }.into(),
            detail: if disconnected > 0 {
                format!("{disconnected} known nodes are disconnected: the barriers wait for each until any lease it held has ended ({} at most), then go on without it (atoll nodes)", humantime::format_duration(self.leases.reach()))
            } else {
                format!("{connected} nodes connected; the barriers wait for all of them")
            },
        });
        let _ = request;
        checks
    }
}

/// What moves where, from a request.
fn moves_for(
    map: &ShardMapSpec,
    request: &SwitchoverRequest,
    resources: &[Resource],
) -> Result<Vec<ShardMove>, ControlError> {
    let cell_exists = |name: &str| {
        resources
            .iter()
            .any(|r| r.kind() == Kind::Cell && r.name() == name)
    };
    for (flag, cell) in [("--from", &request.from), ("--to", &request.to)] {
        if let Some(cell) = cell
            && !cell_exists(cell)
        {
            return Err(ControlError::BadRequest(format!(
                "{flag} {cell}: no such cell; `atoll get cells` lists them"
            )));
        }
    }
    let range = match &request.shards {
        Some(text) => Some(text.parse::<ShardRange>().map_err(|e| {
            ControlError::BadRequest(format!("--shards {text}: {e}; write it like 0-9 or 7"))
        })?),
        None => None,
    };
    if range.is_none() && request.from.is_none() {
        return Err(ControlError::BadRequest(
            "say what moves: --from CELL (all its shards) or --shards RANGE (with --to CELL or to their standbys)".into(),
        ));
    }
    let total = map
        .assignments
        .iter()
        .map(|a| a.shards.end)
        .max()
        .map_or(0, |m| m + 1);
    if let Some(r) = range
        && r.end >= total
    {
        return Err(ControlError::BadRequest(format!(
            "--shards {r}: the map has shards 0-{}",
            total.saturating_sub(1)
        )));
    }
    let mut moves: Vec<ShardMove> = Vec::new();
    for a in &map.assignments {
        let (mut start, mut end) = (a.shards.start, a.shards.end);
        if let Some(r) = range {
            if end < r.start || start > r.end {
                continue;
            }
            start = start.max(r.start);
            end = end.min(r.end);
        }
        if let Some(from) = &request.from
            && &a.cell != from
        {
            continue;
        }
        if a.state == ShardState::Fenced {
            return Err(ControlError::Conflict(format!(
                "shards {}-{} are fenced already; unfence them (atoll apply) before a switchover",
                start, end
            )));
        }
        let to = match (&request.to, &a.standby) {
            (Some(to), _) => to.clone(),
            (None, Some(standby)) => standby.clone(),
            (None, None) => {
                return Err(ControlError::BadRequest(format!(
                    "shards {start}-{end} of {} have no standby; say where they go with --to",
                    a.cell
                )));
            }
        };
        if to == a.cell {
            if range.is_some() && request.from.is_none() {
                // A range that spans shards the target owns already: those stay.
                continue;
            }
            return Err(ControlError::BadRequest(format!(
                "shards {start}-{end} are owned by {to} already"
            )));
        }
        let shards = ShardRange { start, end };
        match moves.last_mut() {
            Some(last) if last.from == a.cell && last.to == to && last.shards.end + 1 == start => {
                last.shards.end = end;
            }
            _ => moves.push(ShardMove {
                shards,
                from: a.cell.clone(),
                to,
            }),
        }
    }
    if moves.is_empty() {
        return Err(ControlError::BadRequest(match (&request.from, range) {
            (Some(from), Some(r)) => format!("{from} owns none of shards {r}"),
            (Some(from), None) => format!("{from} owns no shard of this map"),
            (None, Some(r)) => format!("shards {r} are owned by the target already"),
            (None, None) => "nothing moves".into(),
        }));
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_generated_name_never_clashes() {
        let switchover = |name: &str| {
            let text = format!(
                "apiVersion: atoll/v1\nkind: Switchover\nmetadata: {{name: {name}}}\nspec:\n  shardMap: users\n  moves: [{{shards: \"0-4\", from: rz01, to: rz02}}]\n"
            );
            atoll_model::load("t.yaml", &text).expect("a Switchover")[0]
                .resource
                .clone()
        };
        assert_eq!(super::super::unused_name(&[], "users-7"), "users-7");
        let taken = [switchover("users-7"), switchover("users-7-2")];
        assert_eq!(super::super::unused_name(&taken, "users-7"), "users-7-3");
    }

    use super::*;
    use atoll_model::{Assignment, Metadata};

    fn map() -> ShardMapSpec {
        ShardMapSpec {
            rule: "users".into(),
            epoch: 1,
            assignments: vec![
                Assignment {
                    shards: ShardRange { start: 0, end: 49 },
                    cell: "rz01".into(),
                    standby: Some("rz02".into()),
                    state: ShardState::Serving,
                },
                Assignment {
                    shards: ShardRange { start: 50, end: 99 },
                    cell: "rz02".into(),
                    standby: Some("rz01".into()),
                    state: ShardState::Serving,
                },
            ],
            failover: None,
        }
    }

    #[test]
    fn moves_follow_the_request() {
        let cells: Vec<Resource> = ["rz01", "rz02", "rz03"]
            .iter()
            .map(|name| Resource {
                metadata: Metadata {
                    name: (*name).into(),
                    ..Metadata::default()
                },
                spec: Spec::Cell(atoll_model::CellSpec {
                    zone: "hz-a".into(),
                    cell_type: atoll_model::CellType::Rzone,
                    weight: 100,
                }),
            })
            .collect();
        let whole = moves_for(
            &map(),
            &SwitchoverRequest {
                from: Some("rz01".into()),
                ..SwitchoverRequest::default()
            },
            &cells,
        )
        .expect("moves");
        assert_eq!(whole.len(), 1);
        assert_eq!(
            (whole[0].shards.to_string(), whole[0].to.as_str()),
            ("0-49".into(), "rz02")
        );
        let range = moves_for(
            &map(),
            &SwitchoverRequest {
                shards: Some("40-59".into()),
                to: Some("rz03".into()),
                ..SwitchoverRequest::default()
            },
            &cells,
        )
        .expect("moves");
        let described: Vec<String> = range
            .iter()
            .map(|m| format!("{}:{}->{}", m.shards, m.from, m.to))
            .collect();
        assert_eq!(described, ["40-49:rz01->rz03", "50-59:rz02->rz03"]);
        let unknown = moves_for(
            &map(),
            &SwitchoverRequest {
                from: Some("rz09".into()),
                ..SwitchoverRequest::default()
            },
            &cells,
        )
        .expect_err("no such cell");
        assert!(unknown.to_string().contains("no such cell"), "{unknown}");
        let nothing = moves_for(&map(), &SwitchoverRequest::default(), &cells).expect_err("empty");
        assert!(nothing.to_string().contains("say what moves"), "{nothing}");
    }
}
