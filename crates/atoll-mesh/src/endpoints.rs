//! Endpoint sets: the instances of each service the sidecar calls, per
//! cell, fed by the registry watcher. A registry update of one service
//! rebuilds that service's sets only (one instance's change is a delta,
//! never a rebuild of everything), and an instance's upstream state
//! (in-flight count, outlier ejection) survives the rebuild.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use atoll_proxy::Upstream;
use atoll_registry::Instance;
use atoll_registry::client::View;
use parking_lot::Mutex;

/// One instance callers may be sent to.
#[derive(Debug)]
pub struct Member {
    /// The instance as registered.
    pub instance: Arc<Instance>,
    /// Its upstream state (in flight, outlier ejection).
    pub upstream: Arc<Upstream>,
}

/// The instances of one service in one cell.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// Its instances.
    pub members: Vec<Member>,
}

impl EndpointSet {
    /// Whether a member may take calls (healthy, not ejected).
    pub fn available(&self) -> bool {
        self.members.iter().any(|m| m.upstream.available())
    }

    /// A member by weight among those available, other than `exclude`;
    /// when every member is ejected, any of them (serving beats failing,
    /// Envoy's panic mode).
    pub fn pick(&self, exclude: Option<&str>) -> Option<&Member> {
        let usable = |m: &&Member| Some(m.upstream.address.as_str()) != exclude;
        weighted(
            self.members
                .iter()
                .filter(usable)
                .filter(|m| m.upstream.available()),
        )
        .or_else(|| weighted(self.members.iter().filter(usable)))
    }
}

/// One of `members`, by weight.
fn weighted<'m>(members: impl Iterator<Item = &'m Member> + Clone) -> Option<&'m Member> {
    let weight = |m: &Member| u64::from(m.instance.weight.max(1));
    let total: u64 = members.clone().map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(0..total);
    for member in members {
        if ticket < weight(member) {
            return Some(member);
        }
        ticket -= weight(member);
    }
    None
}

/// The sets of one service: cell name -> its instances.
#[derive(Debug, Default)]
pub struct ServiceSets {
    /// Cell name -> its instances.
    pub cells: HashMap<String, Arc<EndpointSet>>,
}

impl ServiceSets {
    /// Whether `cell` has an instance in rotation.
    pub fn serves(&self, cell: &str) -> bool {
        self.cells.get(cell).is_some_and(|s| s.available())
    }

    fn upstreams(&self) -> HashMap<&str, &Arc<Upstream>> {
        self.cells
            .values()
            .flat_map(|s| s.members.iter())
            .map(|m| (m.upstream.address.as_str(), &m.upstream))
            .collect()
    }
}

/// Every service's sets, swapped per service.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    services: ArcSwap<HashMap<String, Arc<ServiceSets>>>,
    /// Per service, the watcher's change count its sets were built at.
    built: Mutex<HashMap<String, u64>>,
}

impl Directory {
    /// The sets of `service`, if it is watched and has had its snapshot.
    pub(crate) fn get(&self, service: &str) -> Option<Arc<ServiceSets>> {
        self.services.load().get(service).cloned()
    }

    /// How many instances the sidecar knows, over every service.
    pub(crate) fn instances(&self) -> usize {
        self.services
            .load()
            .values()
            .flat_map(|s| s.cells.values())
            .map(|s| s.members.len())
            .sum()
    }

    /// Rebuilds the sets of the services whose registry view changed since
    /// the last call, and drops the services no longer watched. Returns the
    /// number of services rebuilt.
    pub(crate) fn refresh(&self, view: &View) -> usize {
        let mut built = self.built.lock();
        let current = self.services.load_full();
        let stale: Vec<&String> = view
            .changes
            .iter()
            .filter(|(service, count)| built.get(*service) != Some(count))
            .map(|(service, _)| service)
            .collect();
        let dropped = current.keys().any(|s| !view.changes.contains_key(s));
        if stale.is_empty() && !dropped {
            return 0;
        }
        let mut next: HashMap<String, Arc<ServiceSets>> = current
            .iter()
            .filter(|(s, _)| view.changes.contains_key(*s))
            .map(|(s, sets)| (s.clone(), sets.clone()))
            .collect();
        for service in &stale {
            let previous = current.get(*service);
            let known = previous.map(|p| p.upstreams()).unwrap_or_default();
            let mut sets: HashMap<String, EndpointSet> = HashMap::new();
            for instance in view
                .services
                .get(*service)
                .into_iter()
                .flat_map(|m| m.values())
            {
                let address = if instance.address.contains(':') {
                    format!("[{}]:{}", instance.address, instance.port)
                } else {
                    format!("{}:{}", instance.address, instance.port)
                };
                let upstream = match known.get(address.as_str()) {
                    Some(upstream) => Arc::clone(upstream),
                    None => match Upstream::shared(&address) {
                        Ok(upstream) => upstream,
                        Err(problem) => {
                            tracing::warn!(service = %service, instance = %instance.name, %problem, "instance skipped");
                            continue;
                        }
                    },
                };
                sets.entry(instance.cell.clone())
                    .or_default()
                    .members
                    .push(Member {
                        instance: instance.clone(),
                        upstream,
                    });
            }
            next.insert(
                (*service).clone(),
                Arc::new(ServiceSets {
                    cells: sets.into_iter().map(|(c, s)| (c, Arc::new(s))).collect(),
                }),
            );
        }
        let rebuilt = stale.len();
        built.retain(|s, _| view.changes.contains_key(s));
        for service in stale {
            built.insert(service.clone(), view.changes[service]);
        }
        self.services.store(Arc::new(next));
        rebuilt
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn instance(service: &str, cell: &str, name: &str, port: u32) -> Arc<Instance> {
        Arc::new(Instance {
            service: service.into(),
            name: name.into(),
            zone: "hz-a".into(),
            cell: cell.into(),
            address: "127.0.0.1".into(),
            port,
            weight: 100,
            ..Instance::default()
        })
    }

    fn view(instances: &[Arc<Instance>], changes: &[(&str, u64)]) -> View {
        let mut view = View::default();
        for i in instances {
            view.services
                .entry(i.service.clone())
                .or_insert_with(BTreeMap::new)
                .insert((i.zone.clone(), i.name.clone()), i.clone());
        }
        view.changes = changes.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect();
        view
    }

    #[test]
    fn one_service_changing_rebuilds_that_service_only_and_keeps_upstream_state() {
        let directory = Directory::default();
        let risk = [instance("risk", "rz01", "risk-rz01-0", 7001)];
        let credit = [
            instance("credit", "rz01", "credit-rz01-0", 7101),
            instance("credit", "rz02", "credit-rz02-0", 7102),
        ];
        let all: Vec<_> = risk.iter().chain(&credit).cloned().collect();
        assert_eq!(
            directory.refresh(&view(&all, &[("risk", 1), ("credit", 1)])),
            2
        );
        let credit_sets = directory.get("credit").expect("credit");
        assert!(credit_sets.serves("rz02"));
        let upstream = credit_sets.cells["rz01"].members[0].upstream.clone();

        // A new risk instance: credit's sets are the same ones.
        let mut more = all.clone();
        more.push(instance("risk", "rz01", "risk-rz01-1", 7002));
        assert_eq!(
            directory.refresh(&view(&more, &[("risk", 2), ("credit", 1)])),
            1
        );
        assert!(Arc::ptr_eq(
            &directory.get("credit").expect("credit"),
            &credit_sets
        ));
        assert_eq!(
            directory.get("risk").expect("risk").cells["rz01"]
                .members
                .len(),
            2
        );
        assert_eq!(directory.instances(), 4);

        // Credit's rz02 instance goes: the rz01 instance keeps its state.
        let fewer: Vec<_> = more
            .iter()
            .filter(|i| i.name != "credit-rz02-0")
            .cloned()
            .collect();
        assert_eq!(
            directory.refresh(&view(&fewer, &[("risk", 2), ("credit", 2)])),
            1
        );
        let credit_now = directory.get("credit").expect("credit");
        assert!(!credit_now.serves("rz02"));
        assert!(Arc::ptr_eq(
            &credit_now.cells["rz01"].members[0].upstream,
            &upstream
        ));

        // A service no longer watched leaves.
        directory.refresh(&view(&fewer, &[("risk", 2)]));
        assert!(directory.get("credit").is_none());
    }

    #[test]
    fn a_pick_honours_weights_and_skips_the_excluded() {
        let heavy = Arc::new(Instance {
            weight: 900,
            ..(*instance("risk", "rz01", "a", 7001)).clone()
        });
        let light = Arc::new(Instance {
            weight: 100,
            ..(*instance("risk", "rz01", "b", 7002)).clone()
        });
        let set = EndpointSet {
            members: vec![
                Member {
                    upstream: Upstream::shared("127.0.0.1:7001").expect("address"),
                    instance: heavy,
                },
                Member {
                    upstream: Upstream::shared("127.0.0.1:7002").expect("address"),
                    instance: light,
                },
            ],
        };
        let heavy_picks = (0..10_000)
            .filter(|_| set.pick(None).expect("a member").instance.name == "a")
            .count();
        assert!((8_500..9_500).contains(&heavy_picks), "{heavy_picks}");
        for _ in 0..100 {
            assert_eq!(
                set.pick(Some("127.0.0.1:7001"))
                    .expect("the other")
                    .instance
                    .name,
                "b"
            );
        }
    }
}
