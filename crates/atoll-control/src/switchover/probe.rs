//! The replication probes: each app instance answers, per shard, how far
//! its log was written and how far its standby acknowledged it.

use std::collections::BTreeMap;
use std::time::Duration;

use atoll_model::{Resource, ShardMapSpec, ShardMove, ShardPosition, Spec};
use atoll_switchover::ProbeProblem;
use serde::Deserialize;

use super::{PROBE_TIMEOUT, Switchovers};

impl Switchovers {
    /// Positions of the moves' shards, or none when the cell does not answer
    /// (or no service declares a probe).
    pub(super) async fn positions_loose(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        cell: &str,
    ) -> Option<Vec<ShardPosition>> {
        let services = replicated_services(resources, map);
        if services.is_empty() {
            // Nothing to probe: leases alone say whether the cell lives.
            return None;
        }
        let mut out = Vec::new();
        for (service, probe) in services {
            let answer = self
                .probe(resources, service, cell, probe, Duration::from_millis(400))
                .await
                .ok()?;
            for entry in &answer.shards {
                let owned = map
                    .assignments
                    .iter()
                    .any(|a| a.cell == cell && a.shards.contains(entry.shard));
                if owned {
                    out.push(ShardPosition {
                        shard: entry.shard,
                        service: service.to_owned(),
                        written: entry.written,
                        acknowledged: entry.acknowledged,
                    });
                }
            }
        }
        Some(out)
    }

    /// Replication positions of the moving shards, read from the source
    /// cells' probes, for every service that declares one on this map's
    /// rule.
    pub(super) async fn positions(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        moves: &[ShardMove],
    ) -> Result<Vec<ShardPosition>, ProbeProblem> {
        let services = replicated_services(resources, map);
        if services.is_empty() {
            return Err(ProbeProblem {
                blocking: true,
                text: format!(
                    "no service on shard rule `{}` declares `replication.probe`, so nothing says the targets hold the data; declare it, or pass --skip-sync-gate for stateless services",
                    map.rule
                ),
            });
        }
        let mut out = Vec::new();
        for (service, probe) in services {
            let mut by_cell: BTreeMap<&str, Vec<&ShardMove>> = BTreeMap::new();
            for m in moves {
                by_cell.entry(m.from.as_str()).or_default().push(m);
            }
            for (cell, cell_moves) in by_cell {
                let answer = self
                    .probe(resources, service, cell, probe, PROBE_TIMEOUT)
                    .await?;
                for m in cell_moves {
                    for shard in m.shards.start..=m.shards.end {
                        let Some(entry) = answer.shards.iter().find(|s| s.shard == shard) else {
                            return Err(ProbeProblem {
                                blocking: false,
                                text: format!(
                                    "the probe of {service} in {cell} does not list shard {shard}; its instances may not run the current map yet"
                                ),
                            });
                        };
                        if entry.standby.as_deref() != Some(m.to.as_str()) {
                            return Err(ProbeProblem {
                                blocking: true,
                                text: format!(
                                    "{service} in {cell} replicates shard {shard} to {}, not to {}: make {} its standby and wait until it caught up",
                                    entry.standby.as_deref().unwrap_or("no cell"),
                                    m.to,
                                    m.to
                                ),
                            });
                        }
                        out.push(ShardPosition {
                            shard,
                            service: service.to_owned(),
                            written: entry.written,
                            acknowledged: entry.acknowledged,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Asks the ready instances of `service` in `cell`, one after the other,
    /// until one answers.
    async fn probe(
        &self,
        resources: &[Resource],
        service: &str,
        cell: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<ProbeAnswer, ProbeProblem> {
        let mut addresses: Vec<&str> = Vec::new();
        for r in resources {
            match &r.spec {
                Spec::Endpoints(e) if e.service == service => addresses.extend(
                    e.endpoints
                        .iter()
                        .filter(|x| x.cell == cell && x.ready)
                        .map(|x| x.address.as_str()),
                ),
                Spec::Service(s) if r.name() == service => addresses.extend(
                    s.endpoints
                        .iter()
                        .filter(|x| x.cell == cell)
                        .map(|x| x.address.as_str()),
                ),
                _ => {}
            }
        }
        if addresses.is_empty() {
            return Err(ProbeProblem {
                blocking: false,
                text: format!(
                    "{service} has no ready instance in {cell} to ask for its replication positions"
                ),
            });
        }
        let mut last = String::new();
        for address in addresses {
            let url = format!("http://{address}{path}");
            match self.http.get(&url).timeout(timeout).send().await {
                Ok(response) if response.status().is_success() => {
                    match response.json::<ProbeAnswer>().await {
                        Ok(answer) => return Ok(answer),
                        Err(e) => {
                            last = format!("{url} answered something else than positions: {e}")
                        }
                    }
                }
                Ok(response) => last = format!("{url} answered {}", response.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(ProbeProblem {
            blocking: false,
            text: format!(
                "no instance of {service} in {cell} answered its replication probe ({last})"
            ),
        })
    }
}

/// `(service, probe path)` of the services on `map`'s rule that declare a
/// replication probe.
fn replicated_services<'a>(
    resources: &'a [Resource],
    map: &ShardMapSpec,
) -> Vec<(&'a str, &'a str)> {
    resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Service(s) if s.shard_rule.as_deref() == Some(map.rule.as_str()) => {
                Some((r.name(), s))
            }
            _ => None,
        })
        .filter_map(|(name, s)| s.replication.as_ref().map(|rep| (name, rep.probe.as_str())))
        .collect()
}

#[derive(Debug, Deserialize)]
struct ProbeAnswer {
    shards: Vec<ProbeShard>,
}

#[derive(Debug, Deserialize)]
struct ProbeShard {
    shard: u32,
    written: i64,
    acknowledged: i64,
    #[serde(default)]
    standby: Option<String>,
}
