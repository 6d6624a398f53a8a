//! Replication positions: per shard, how far an app's log was written and
//! how far its standby acknowledged it. App instances report them on their
//! config streams (the SDK's `report_positions`), so the control plane
//! reads them from the fleet view and dials no app instance; the probe
//! route an instance serves is asked only when no instance of the service
//! in the cell reports them (an older SDK).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use atoll_model::{Resource, ShardMapSpec, ShardMove, ShardPosition, Spec};
use atoll_switchover::ProbeProblem;
use serde::Deserialize;

use atoll_api::rest::ReportedShard;
use time::OffsetDateTime;

use super::{PROBE_TIMEOUT, Probed, Switchovers};
use crate::nodes::{instant_of, parse_time};

impl Switchovers {
    /// The latest positions of `cell`'s shards on `map`, when they were
    /// heard, or none when the cell was never heard from (or no service
    /// declares replication). Read from what its instances reported on
    /// their config streams; from the probe route of an instance only when
    /// none of them reports (an SDK older than positions on the stream).
    pub(super) async fn positions_loose(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        cell: &str,
    ) -> Option<Probed> {
        let services = replicated_services(resources, map);
        if services.is_empty() {
            // Nothing to probe: leases alone say whether the cell lives.
            return None;
        }
        let owned = |shard: u32| {
            map.assignments
                .iter()
                .any(|a| a.cell == cell && a.shards.contains(shard))
        };
        let mut out = Vec::new();
        // The oldest of the services' latest reports: the cell is alive as
        // of when every service was last heard from.
        let mut heard: Option<(Instant, OffsetDateTime)> = None;
        for (service, probe) in services {
            let reports = self.nodes.reported_positions(service, cell);
            let (at, shards) = if let Some(latest) = reports.first() {
                let received = parse_time(&latest.received)?;
                let mut seen = BTreeSet::new();
                let shards: Vec<ProbeShard> = reports
                    .iter()
                    .flat_map(|r| r.shards.iter())
                    .filter(|s| seen.insert(s.shard))
                    .map(ProbeShard::from)
                    .collect();
                ((instant_of(received), received), shards)
            } else {
                let answer = self
                    .probe(resources, service, cell, probe, Duration::from_millis(400))
                    .await
                    .ok()?;
                ((Instant::now(), OffsetDateTime::now_utc()), answer.shards)
            };
            heard = Some(heard.map_or(at, |h| if at.0 < h.0 { at } else { h }));
            out.extend(
                shards
                    .into_iter()
                    .filter(|entry| owned(entry.shard))
                    .map(|entry| ShardPosition {
                        shard: entry.shard,
                        service: service.to_owned(),
                        written: entry.written,
                        acknowledged: entry.acknowledged,
                    }),
            );
        }
        heard.map(|(instant, wall)| (instant, wall, out))
    }

    /// Replication positions of the moving shards at their source cells,
    /// for every service that declares replication on this map's rule,
    /// read under config version `since` or later (in a sync gate, the
    /// version of its own record, committed after the fence barrier: no
    /// write of a moving shard can follow them).
    pub(super) async fn positions(
        &self,
        resources: &[Resource],
        map: &ShardMapSpec,
        moves: &[ShardMove],
        since: u64,
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
                let reports = self.nodes.reported_positions(service, cell);
                // Per shard, what the instances said: the reports read
                // under `since` or later, the latest first.
                let entries: Vec<ProbeShard> = if reports.is_empty() {
                    self.probe(resources, service, cell, probe, PROBE_TIMEOUT)
                        .await?
                        .shards
                } else {
                    let fresh: Vec<_> = reports
                        .iter()
                        .filter(|r| r.applied_version >= since)
                        .collect();
                    if fresh.is_empty() {
                        return Err(ProbeProblem {
                            blocking: false,
                            text: format!(
                                "no instance of {service} in {cell} has reported its positions under version {since} of the shard map yet (the latest report, from {}, was read under version {})",
                                reports[0].received, reports[0].applied_version
                            ),
                        });
                    }
                    fresh
                        .iter()
                        .flat_map(|r| r.shards.iter())
                        .map(ProbeShard::from)
                        .collect()
                };
                for m in cell_moves {
                    for shard in m.shards.start..=m.shards.end {
                        let listed: Vec<&ProbeShard> =
                            entries.iter().filter(|s| s.shard == shard).collect();
                        // Any instance that saw the standby caught up
                        // speaks for the cell (they share its log).
                        let entry = listed
                            .iter()
                            .find(|e| {
                                e.standby.as_deref() == Some(m.to.as_str())
                                    && e.acknowledged >= e.written
                            })
                            .or(listed.first());
                        let Some(entry) = entry else {
                            return Err(ProbeProblem {
                                blocking: false,
                                text: format!(
                                    "{service} in {cell} does not report shard {shard}; its instances may not run the current map yet"
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

#[derive(Clone, Debug, Deserialize)]
struct ProbeShard {
    shard: u32,
    written: i64,
    acknowledged: i64,
    #[serde(default)]
    standby: Option<String>,
}

impl From<&ReportedShard> for ProbeShard {
    fn from(s: &ReportedShard) -> Self {
        Self {
            shard: s.shard,
            written: s.written,
            acknowledged: s.acknowledged,
            standby: s.standby.clone(),
        }
    }
}
