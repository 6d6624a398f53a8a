//! Control-plane replicas on one etcd: one leader at a time, writes reach
//! it through any replica, and a leader that dies or freezes is replaced
//! without a write from the deposed one ever landing.

use std::time::{Duration, Instant};

use atoll_testing::EtcdServer;
use serde_json::Value;

use crate::harness::{Control, examples, http_get};

fn replica(etcd: &EtcdServer) -> Control {
    Control::start_with(vec![
        "--store=etcd".into(),
        format!("--etcd-endpoints={}", etcd.endpoint()),
        "--election-ttl=2s".into(),
    ])
}

fn address(control: &Control) -> String {
    control.url.trim_start_matches("http://").to_owned()
}

/// `GET /v1/leader` of one replica.
fn leader_view(control: &Control) -> Option<Value> {
    let (status, body) = http_get(&address(control), "/v1/leader")?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Waits until every replica in `alive` names the same leader among them
/// and lists them all; returns the leader's index and term.
fn agreed_leader(alive: &[&Control], within: Duration) -> (usize, i64) {
    let deadline = Instant::now() + within;
    loop {
        let views: Vec<Option<Value>> = alive.iter().map(|c| leader_view(c)).collect();
        let leaders: Vec<Option<&str>> = views
            .iter()
            .map(|v| v.as_ref().and_then(|v| v["leader"].as_str()))
            .collect();
        if let Some(Some(first)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*first))
            && let Some(index) = alive.iter().position(|c| c.url == *first)
            && views.iter().all(|v| {
                v.as_ref()
                    .and_then(|v| v["replicas"].as_array())
                    .is_some_and(|r| r.len() == alive.len())
            })
        {
            let term = views[0]
                .as_ref()
                .and_then(|v| v["term"].as_i64())
                .unwrap_or(0);
            return (index, term);
        }
        assert!(
            Instant::now() < deadline,
            "the replicas do not agree on a leader within {within:?}: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn audit_authors(control: &Control) -> Vec<String> {
    control.json(&["audit"])["commits"]
        .as_array()
        .expect("commits")
        .iter()
        .map(|c| c["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn three_replicas_elect_one_leader_and_replace_it_when_it_dies() {
    let etcd = EtcdServer::start();
    let mut replicas: Vec<Control> = (0..3).map(|_| replica(&etcd)).collect();
    let all: Vec<&Control> = replicas.iter().collect();
    let (leader, term) = agreed_leader(&all, Duration::from_secs(15));
    let follower = (leader + 1) % 3;

    // A write through a follower lands, made by the leader.
    let examples = examples();
    replicas[follower]
        .atoll(&[
            "apply",
            "-f",
            examples.to_str().unwrap(),
            "-m",
            "through a follower",
        ])
        .success();
    let cells = replicas[follower].json(&["get", "cells"]);
    assert!(
        !cells["items"].as_array().expect("items").is_empty(),
        "{cells}"
    );
    // Every replica serves reads from its own cache, and they agree.
    for r in &replicas {
        let revision = r.revision();
        assert!(revision >= 1, "{}", r.url);
    }

    // The leader dies: another replica leads within a few seconds, with a
    // higher term, and takes writes.
    let killed = Instant::now();
    replicas[leader].kill();
    let alive: Vec<&Control> = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, c)| c)
        .collect();
    let (next, next_term) = agreed_leader(&alive, Duration::from_secs(15));
    let took = killed.elapsed();
    assert!(next_term > term, "term {next_term} after {term}");
    assert!(took < Duration::from_secs(8), "a new leader after {took:?}");
    alive[(next + 1) % 2]
        .atoll_with_stdin(
            &["apply", "-f", "-", "-m", "after the kill"],
            Some("apiVersion: atoll/v1\nkind: Region\nmetadata: {name: bj}\n"),
        )
        .success();
    assert!(
        audit_authors(alive[next])
            .iter()
            .any(|m| m == "after the kill"),
        "the write after the kill is in the audit log"
    );
}

#[test]
fn a_frozen_leader_is_deposed_and_writes_nothing_when_it_thaws() {
    let etcd = EtcdServer::start();
    let replicas: Vec<Control> = (0..3).map(|_| replica(&etcd)).collect();
    let all: Vec<&Control> = replicas.iter().collect();
    let (leader, term) = agreed_leader(&all, Duration::from_secs(15));
    let examples = examples();
    replicas[leader]
        .atoll(&["apply", "-f", examples.to_str().unwrap()])
        .success();

    // Frozen past its lease: the others elect a new leader.
    replicas[leader].signal("STOP");
    let alive: Vec<&Control> = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, c)| c)
        .collect();
    let (next, next_term) = agreed_leader(&alive, Duration::from_secs(15));
    assert!(next_term > term);
    // Thawed: it finds its window closed and its term over. A write sent to
    // it is passed on to the new leader, never made in the old term.
    replicas[leader].signal("CONT");
    replicas[leader]
        .atoll_with_stdin(
            &["apply", "-f", "-", "-m", "sent to the thawed replica"],
            Some("apiVersion: atoll/v1\nkind: Region\nmetadata: {name: bj}\n"),
        )
        .success();
    let (again, _) = agreed_leader(&all, Duration::from_secs(15));
    assert_eq!(
        replicas[again].url, alive[next].url,
        "the thawed replica follows the new leader"
    );
    // It says it follows, and counted the moment it stopped leading.
    let view = leader_view(&replicas[leader]).expect("the thawed replica answers");
    assert_eq!(
        view["leader"].as_str(),
        Some(alive[next].url.as_str()),
        "{view}"
    );
    let (_, metrics) = http_get(&address(&replicas[leader]), "/metrics").expect("metrics");
    assert!(
        metrics.lines().any(|l| l == "atoll_control_leader 0"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "atoll_control_leader_step_downs_total 1"),
        "{metrics}"
    );
    let audit = alive[next].json(&["audit"]);
    let commits = audit["commits"].as_array().expect("commits");
    assert_eq!(
        commits
            .iter()
            .filter(|c| c["message"] == "sent to the thawed replica")
            .count(),
        1,
        "{audit}"
    );
}

/// The sandbox with three replicas on a three-member etcd: the leader is
/// killed right after a planned switchover starts, under the recorded bank
/// workload. Another replica leads within seconds, the switchover goes on
/// from its stored phase and completes, and the checker finds nothing lost
/// or applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_replicated_sandbox_finishes_a_switchover_whose_leader_was_killed() {
    let sandbox = crate::up::Sandbox::start_with(&["--control-replicas", "3"]);
    let replicas = sandbox.up["controlReplicas"]
        .as_array()
        .expect("controlReplicas")
        .len();
    assert_eq!(replicas, 3, "{}", sandbox.up);
    assert_eq!(sandbox.up["etcd"].as_array().map(Vec::len), Some(3));
    let report = crate::switchover::drill(
        &sandbox,
        &[
            "switchover",
            "--shards",
            "0-49",
            "--rate",
            "150",
            "--duration",
            "14s",
            "--start-after",
            "3s",
            "--kill-control-plane",
        ],
    );
    assert_eq!(report["outcome"], "completed", "{report}");
    assert!(report["clean"].as_bool() == Some(true), "{report}");
    assert_eq!(report["lostAcknowledgedWrites"], 0, "{report}");
    let leaderless = crate::switchover::ms(&report, "leaderlessMs");
    assert!(
        leaderless < 6_000,
        "no leader for {leaderless} ms: {report}"
    );
    let notes = report["notes"].to_string();
    assert!(notes.contains("killed the leader"), "{notes}");
}
