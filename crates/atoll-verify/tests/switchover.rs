//! The switchover model: the correct protocol holds every invariant over every reachable
//! state, and each deliberate flaw is caught with a counterexample.
//!
//! `cargo test -p atoll-verify -- --nocapture` prints state counts and the counterexamples.

#![allow(clippy::expect_used, reason = "tests fail loudly")]

use atoll_verify::switchover::{Config, Flaws, Kind, Switchover, property};
use atoll_verify::{Report, Search, check};

fn run(config: Config, search: Search) -> Report {
    let model = Switchover::new(config).expect("valid configuration");
    check(model, search)
}

/// Checks every reachable state: no `always` property violated, every `sometimes` reached.
fn assert_holds(name: &str, config: Config, floor: usize) -> Report {
    let report = run(config, Search::Exhaustive);
    println!("{name}: {}", report.counts());
    for (property, path) in &report.counterexamples {
        println!("{name}: violated \"{property}\":\n{path}");
    }
    assert!(
        report.counterexamples.is_empty(),
        "{name}: violated {:?}",
        report.counterexamples.keys()
    );
    assert!(
        report.unreached.is_empty(),
        "{name}: never reached {:?}; the model is (partly) vacuous",
        report.unreached
    );
    assert!(
        report.unique_states > floor,
        "{name}: only {} states, expected more than {floor}",
        report.unique_states
    );
    report
}

/// Finds a shortest counterexample (printed), then searches every state and expects each
/// of `violated` among the properties violated.
fn assert_caught(name: &str, config: Config, violated: &[&str]) {
    let shortest = run(config, Search::ShortestCounterexample);
    println!("{name}, shortest: {}", shortest.counts());
    assert!(
        !shortest.counterexamples.is_empty(),
        "{name}: the checker found no counterexample"
    );
    for (property, path) in &shortest.counterexamples {
        println!("{name}: violated \"{property}\":\n{path}");
    }
    let all = run(config, Search::Exhaustive);
    let found: Vec<&str> = all.counterexamples.keys().copied().collect();
    println!("{name}, every state: {}; violated {found:?}", all.counts());
    for property in violated {
        assert!(
            found.contains(property),
            "{name}: expected \"{property}\" violated, found {found:?}"
        );
    }
}

// === The protocol as designed ===

#[test]
fn planned_switchover_holds_every_invariant() {
    let report = assert_holds("planned", Config::planned(), 1_000_000);
    let example = &report.examples[property::COMPLETED_WITH_WRITES_AT_BOTH];
    println!("planned: an example that completes with writes at both cells:\n{example}");
}

#[test]
fn failover_holds_every_invariant() {
    let report = assert_holds("failover", Config::failover(), 500_000);
    let example = &report.examples[property::COMPLETED_WITH_REPORTED_LOSS];
    println!("failover: an example that completes with a reported loss:\n{example}");
}

#[test]
fn failover_with_every_gateway_reachable_holds_every_invariant() {
    let config = Config {
        writes: 3,
        restarts: 1,
        partitioned_gateway: false,
        ..Config::failover()
    };
    assert_holds("failover, gateways reachable", config, 100_000);
}

/// There and back: a write routed before the first move and delivered after the second
/// reaches a cell that owns the shard again, at another epoch.
#[test]
fn round_trip_holds_every_invariant() {
    let config = Config {
        switchovers: 2,
        writes: 2,
        restarts: 1,
        ..Config::planned()
    };
    assert_holds("round trip", config, 500_000);
}

/// Issue 9: a gateway that vanishes (mid-switchover, for good) stops counting in barriers
/// once disconnected; it cannot write, and what it still routes by its old map is refused
/// by the cells. Every invariant holds, and the switchover completes without it.
#[test]
fn regression_a_vanished_gateway_stops_counting_and_every_invariant_holds() {
    let config = Config {
        vanishing_gateway: true,
        restarts: 1,
        ..Config::planned()
    };
    assert_holds("planned, a gateway vanishes", config, 500_000);
}

/// The same there and back: a write the vanished gateway routed at the first epoch and
/// delivered after the shard came back is still refused.
#[test]
fn regression_a_vanished_gateway_in_a_round_trip_holds_every_invariant() {
    let config = Config {
        vanishing_gateway: true,
        switchovers: 2,
        writes: 2,
        restarts: 0,
        ..Config::planned()
    };
    assert_holds("round trip, a gateway vanishes", config, 50_000);
}

/// Without the cells' epoch check, not waiting for the vanished gateway is unsafe: a write
/// it routed by the first map is accepted after the shard came back, at another epoch.
#[test]
fn a_vanished_gateway_needs_the_epoch_check() {
    let config = Config {
        vanishing_gateway: true,
        switchovers: 2,
        writes: 2,
        restarts: 0,
        abort: false,
        flaws: Flaws {
            skip_epoch_check: true,
            ..Flaws::default()
        },
        ..Config::planned()
    };
    assert_caught(
        "vanished gateway, no epoch check",
        config,
        &[property::NO_WRITE_FROM_ANOTHER_EPOCH],
    );
}

/// Issue 10: a replicated control plane changes leaders at any step. The new leader resumes
/// at the persisted phase; the deposed one may still send a write it decided on while it led,
/// and the store refuses it (the term compare). Every invariant holds, and the switchover
/// completes after a refused write of a deposed leader.
#[test]
fn planned_switchover_with_leader_changes_holds_every_invariant() {
    let config = Config {
        restarts: 0,
        leader_changes: 2,
        ..Config::planned()
    };
    let report = assert_holds("planned, leader changes", config, 1_000_000);
    let example = &report.examples[property::COMPLETED_AFTER_LEADER_CHANGE];
    println!("planned, leader changes: an example:\n{example}");
}

#[test]
fn failover_with_leader_changes_holds_every_invariant() {
    let config = Config {
        restarts: 0,
        leader_changes: 2,
        ..Config::failover()
    };
    assert_holds("failover, leader changes", config, 500_000);
}

#[test]
fn round_trip_with_a_leader_change_holds_every_invariant() {
    let config = Config {
        switchovers: 2,
        writes: 2,
        restarts: 0,
        leader_changes: 1,
        ..Config::planned()
    };
    assert_holds("round trip, leader change", config, 100_000);
}

// === Each flaw is caught ===

/// A small planned configuration: enough for each flaw to show, small enough to search fast.
fn small_planned(flaws: Flaws) -> Config {
    Config {
        kind: Kind::Planned,
        gateways: 1,
        writes: 1,
        restarts: 0,
        leader_changes: 0,
        abort: false,
        partitioned_gateway: false,
        vanishing_gateway: false,
        switchovers: 1,
        flaws,
    }
}

#[test]
fn skipping_the_fence_barrier_loses_a_write() {
    let flaws = Flaws {
        skip_fence_barrier: true,
        ..Flaws::default()
    };
    assert_caught(
        "skip fence barrier",
        small_planned(flaws),
        &[
            property::NO_ACKNOWLEDGED_WRITE_LOST,
            property::OWNER_HOLDS_EVERY_WRITE,
        ],
    );
}

#[test]
fn skipping_the_sync_gate_loses_a_write() {
    let flaws = Flaws {
        skip_sync_gate: true,
        ..Flaws::default()
    };
    assert_caught(
        "skip sync gate",
        small_planned(flaws),
        &[
            property::NO_ACKNOWLEDGED_WRITE_LOST,
            property::OWNER_HOLDS_EVERY_WRITE,
        ],
    );
}

#[test]
fn failover_without_waiting_for_the_lease_lets_the_lost_cell_write_on() {
    let flaws = Flaws {
        skip_lease_wait: true,
        ..Flaws::default()
    };
    let config = Config {
        kind: Kind::Failover,
        writes: 2,
        ..small_planned(flaws)
    };
    assert_caught(
        "skip lease wait",
        config,
        &[
            property::RPO_REPORT_TRUTHFUL,
            property::NO_WRITER_BEHIND_NEWER_EPOCH,
        ],
    );
}

/// With two cells and one move, a write stamped with an old epoch can only reach a cell that
/// no longer owns the shard, which the owner check refuses; it takes a move there and back
/// for the epoch check to be the only guard.
#[test]
fn a_cell_that_ignores_the_epoch_accepts_a_stale_write() {
    let flaws = Flaws {
        skip_epoch_check: true,
        ..Flaws::default()
    };
    let config = Config {
        switchovers: 2,
        ..small_planned(flaws)
    };
    assert_caught(
        "skip epoch check",
        config,
        &[property::NO_WRITE_FROM_ANOTHER_EPOCH],
    );
}

#[test]
fn a_view_change_during_a_write_loses_it() {
    let flaws = Flaws {
        apply_during_write: true,
        ..Flaws::default()
    };
    assert_caught(
        "apply during write",
        small_planned(flaws),
        &[
            property::NO_WRITE_WHILE_FENCED,
            property::NO_ACKNOWLEDGED_WRITE_LOST,
        ],
    );
}

/// The control plane's node registry is in memory: right after a restart it knows no node,
/// and a barrier over the nodes it knows passes at once.
#[test]
fn a_barrier_over_known_nodes_passes_after_a_restart() {
    let flaws = Flaws {
        barrier_over_known_nodes: true,
        ..Flaws::default()
    };
    let config = Config {
        restarts: 1,
        ..small_planned(flaws)
    };
    assert_caught(
        "barrier over known nodes",
        config,
        &[
            property::NO_ACKNOWLEDGED_WRITE_LOST,
            property::OWNER_HOLDS_EVERY_WRITE,
        ],
    );
}

/// Without the term compare, a write the deposed leader decided on before it was deposed
/// lands after the new leader went on. The shortest: the old leader passed the sync gate and
/// froze before persisting `Flip`; the new leader aborted and unfenced `A`, which took a write;
/// then the old `Flip` landed, and the new leader, reading it, moved the shard to `B` without
/// that write.
#[test]
fn a_deposed_leaders_write_without_the_term_compare_is_caught() {
    let flaws = Flaws {
        skip_term_compare: true,
        ..Flaws::default()
    };
    let config = Config {
        leader_changes: 1,
        abort: true,
        ..small_planned(flaws)
    };
    assert_caught(
        "no term compare",
        config,
        &[property::OWNER_HOLDS_EVERY_WRITE],
    );
}

/// Without the acting window, a leader goes on acting after a new one was elected: on the
/// lost cell's side of a partition it renews the lost cell's lease after the new leader saw it
/// expire and flipped, so the lost cell writes behind the new owner's epoch. The term compare
/// cannot stop it: a lease renewal is an answer, not a store write.
#[test]
fn failover_without_the_acting_window_lets_a_deposed_leader_renew_the_lost_cell() {
    let flaws = Flaws {
        skip_acting_window: true,
        ..Flaws::default()
    };
    let config = Config {
        kind: Kind::Failover,
        writes: 2,
        leader_changes: 1,
        ..small_planned(flaws)
    };
    assert_caught(
        "no acting window",
        config,
        &[property::NO_WRITER_BEHIND_NEWER_EPOCH],
    );
}
