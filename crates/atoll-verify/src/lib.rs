//! A model check of Atoll's switchover protocol (docs/architecture.md, "The switchover
//! protocol") with [stateright](https://docs.rs/stateright).
//!
//! [`switchover::Switchover`] models one shard moving between two cells: config delivered to
//! every node asynchronously, change-log shipping with lag, client writes routed by stale
//! views, the orchestrator's phases (fence, barrier, sync gate, flip, barrier, unfence, abort),
//! control-plane restarts, leader changes of a replicated control plane (a deposed leader's
//! write refused by its term), and, for failover, a partitioned cell held back by its lease.
//! [`check`] explores every reachable state breadth-first and reports which properties it
//! violated or reached. [`switchover::Flaws`] removes one protocol step at a time, to show
//! that the checker then finds a counterexample.
//!
//! This crate runs no Atoll code and does no I/O: it checks the protocol's design, not its
//! implementation. `docs/design/model-check.md` says what is modeled and what is not.

pub mod switchover;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use stateright::{Checker, HasDiscoveries, Model, Path};

use crate::switchover::{Action, State, Switchover};

/// What one run of the checker found.
#[derive(Debug)]
pub struct Report {
    /// Distinct states reached.
    pub unique_states: usize,
    /// States generated, counting each time one was reached again.
    pub total_states: usize,
    /// Length of the longest path explored.
    pub max_depth: usize,
    /// Wall-clock time of the run (of every bounded search, for a shortest counterexample).
    pub elapsed: Duration,
    /// `always` properties violated, each with a readable path that ends at the first state
    /// on it that violates the property.
    pub counterexamples: BTreeMap<&'static str, String>,
    /// `sometimes` properties reached, each with a readable path that ends at the first state
    /// on it that reaches the property.
    pub examples: BTreeMap<&'static str, String>,
    /// `sometimes` properties never reached.
    pub unreached: Vec<&'static str>,
}

impl Report {
    /// One line of counts, for test output and the docs.
    pub fn counts(&self) -> String {
        format!(
            "{} unique states, {} generated, max depth {}, {:.1} s",
            self.unique_states,
            self.total_states,
            self.max_depth,
            self.elapsed.as_secs_f64()
        )
    }
}

/// How far to search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// Visit every reachable state (stop early only if every property has a discovery).
    Exhaustive,
    /// Find a shortest path to a violated `always` property: breadth-first searches bounded
    /// at depth 1, 2, 3, ... until one finds a violation or the bound no longer cuts anything
    /// off. For small models; the counts reported are the last search's.
    ShortestCounterexample,
}

/// Runs a single-threaded breadth-first check of `model`.
pub fn check(model: Switchover, search: Search) -> Report {
    let properties = model.property_names();
    let started = Instant::now();
    let checker = match search {
        Search::Exhaustive => model.checker().spawn_bfs().join(),
        Search::ShortestCounterexample => {
            let mut depth = 1;
            loop {
                depth += 1;
                let checker = model
                    .clone()
                    .checker()
                    .finish_when(HasDiscoveries::AnyFailures)
                    .target_max_depth(depth)
                    .spawn_bfs()
                    .join();
                let found = properties
                    .iter()
                    .any(|(name, always)| *always && checker.discovery(name).is_some());
                // Depth counts states: the initial state is at depth 1.
                if found || checker.max_depth() < depth {
                    break checker;
                }
            }
        }
    };
    let elapsed = started.elapsed();
    let mut discoveries = checker.discoveries();
    let mut report = Report {
        unique_states: checker.unique_state_count(),
        total_states: checker.state_count(),
        max_depth: checker.max_depth(),
        elapsed,
        counterexamples: BTreeMap::new(),
        examples: BTreeMap::new(),
        unreached: Vec::new(),
    };
    for (name, always) in properties {
        let Some(path) = discoveries.remove(name) else {
            if !always {
                report.unreached.push(name);
            }
            continue;
        };
        let steps = first_discovery(checker.model(), name, always, path);
        let text = explain(checker.model(), &steps);
        if always {
            report.counterexamples.insert(name, text);
        } else {
            report.examples.insert(name, text);
        }
    }
    report
}

/// The checker keeps the path to the last state it saw violating (or reaching) a property;
/// cut it at the first such state on it.
fn first_discovery(
    model: &Switchover,
    name: &'static str,
    always: bool,
    path: Path<State, Action>,
) -> Vec<(State, Option<Action>)> {
    let condition = model.property(name).condition;
    let mut steps = path.into_vec();
    if let Some(at) = steps
        .iter()
        .position(|(state, _)| condition(model, state) != always)
    {
        steps.truncate(at + 1);
        if let Some(last) = steps.last_mut() {
            last.1 = None;
        }
    }
    steps
}

/// A path as numbered steps, each with the state it leads to.
pub fn explain(model: &Switchover, steps: &[(State, Option<Action>)]) -> String {
    let mut out = String::new();
    if let Some((first, _)) = steps.first() {
        let _ = writeln!(out, "   init: {}", first.summary(model));
    }
    for (i, window) in steps.windows(2).enumerate() {
        let (_, action) = &window[0];
        let (next, _) = &window[1];
        if let Some(action) = action {
            let _ = writeln!(
                out,
                "{:>3}. {:?}\n      -> {}",
                i + 1,
                action,
                next.summary(model)
            );
        }
    }
    out
}
