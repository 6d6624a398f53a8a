//! A data-plane node on the config stream: snapshot, deltas, ACK, NACK, and
//! barriers that wait for it and name it.

use std::time::Duration;

use atoll_api::config::config_stream_client::ConfigStreamClient;
use atoll_api::config::{Ack, ConfigUpdate, Hello, Nack, NodeIdentity, NodeMessage, node_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::harness::{Control, examples};

/// A test node: sends Hello, then whatever the test says.
pub(crate) struct Node {
    outbound: mpsc::Sender<NodeMessage>,
    inbound: Streaming<ConfigUpdate>,
}

impl Node {
    async fn connect(url: &str, name: &str, role: &str, applied: u64) -> Node {
        Self::connect_in(url, name, role, "", applied).await
    }

    /// A node of `workspace` (empty: the default one) in hz-a.
    pub(crate) async fn connect_in(
        url: &str,
        name: &str,
        role: &str,
        workspace: &str,
        applied: u64,
    ) -> Node {
        Self::connect_as(url, name, role, "hz-a", workspace, applied).await
    }

    /// A node of a role in a zone and a workspace.
    pub(crate) async fn connect_as(
        url: &str,
        name: &str,
        role: &str,
        zone: &str,
        workspace: &str,
        applied: u64,
    ) -> Node {
        let mut client = ConfigStreamClient::connect(url.to_owned())
            .await
            .expect("connect");
        let (outbound, receiver) = mpsc::channel(16);
        outbound
            .send(NodeMessage {
                message: Some(node_message::Message::Hello(Hello {
                    node: Some(NodeIdentity {
                        name: name.into(),
                        role: role.into(),
                        zone: zone.into(),
                        cell: String::new(),
                        workspace: workspace.into(),
                    }),
                    applied_version: applied,
                    problem: String::new(),
                })),
            })
            .await
            .unwrap();
        let inbound = client
            .subscribe(ReceiverStream::new(receiver))
            .await
            .expect("subscribe")
            .into_inner();
        Node { outbound, inbound }
    }

    pub(crate) async fn next(&mut self) -> ConfigUpdate {
        tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
            .await
            .expect("an update within 10s")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn ack(&self, update: &ConfigUpdate) {
        self.outbound
            .send(NodeMessage {
                message: Some(node_message::Message::Ack(Ack {
                    version: update.version,
                    nonce: update.nonce.clone(),
                })),
            })
            .await
            .unwrap();
    }

    async fn nack(&self, update: &ConfigUpdate, reason: &str) {
        self.outbound
            .send(NodeMessage {
                message: Some(node_message::Message::Nack(Nack {
                    version: update.version,
                    nonce: update.nonce.clone(),
                    reason: reason.into(),
                })),
            })
            .await
            .unwrap();
    }
}

/// Runs blocking CLI commands off the async runtime.
async fn atoll(control: &Control, args: &[&str]) -> crate::harness::Run {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let state = control.state.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(crate::harness::ATOLL)
            .args(&args)
            .env("ATOLL_STATE_DIR", state)
            .env_remove("ATOLL_CONTROL")
            .output()
            .unwrap();
        crate::harness::Run(output, args.join(" "))
    })
    .await
    .unwrap()
}

async fn set_weight(control: &Control, zone: &str, weight: u32) {
    let text = format!(
        "apiVersion: atoll/v1\nkind: Zone\nmetadata: {{name: {zone}}}\nspec: {{region: hz, weight: {weight}}}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone.yaml");
    std::fs::write(&path, text).unwrap();
    atoll(control, &["apply", "-f", path.to_str().unwrap()])
        .await
        .success();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_a_snapshot_then_deltas_and_a_barrier_names_it() {
    let control = Control::start();
    atoll(&control, &["apply", "-f", examples().to_str().unwrap()])
        .await
        .success();

    let mut node = Node::connect(&control.url, "gw-test", "gateway", 0).await;
    let snapshot = node.next().await;
    assert!(snapshot.snapshot);
    assert_eq!(snapshot.version, 1);
    assert_eq!(snapshot.resources.len(), 26);
    let map = snapshot
        .resources
        .iter()
        .find(|r| r.kind == "ShardMap" && r.name == "users")
        .expect("the shard map is in the snapshot");
    let map: serde_json::Value = serde_json::from_slice(&map.json).unwrap();
    assert_eq!(map["spec"]["epoch"], 1);
    node.ack(&snapshot).await;

    // A barrier on version 1 is reached once the ACK lands.
    let run = atoll(
        &control,
        &[
            "barrier",
            "--version",
            "1",
            "--role",
            "gateway",
            "--timeout",
            "5s",
        ],
    )
    .await
    .success();
    assert!(
        run.stdout().contains("version 1 reached by 1 node(s)"),
        "{}",
        run.stdout()
    );

    // A change arrives as a delta with only what changed.
    set_weight(&control, "hz-b", 40).await;
    let delta = node.next().await;
    assert!(!delta.snapshot);
    assert_eq!((delta.base_version, delta.version), (1, 2));
    assert_eq!(delta.resources.len(), 1);
    assert_eq!(
        (
            delta.resources[0].kind.as_str(),
            delta.resources[0].name.as_str()
        ),
        ("Zone", "hz-b")
    );
    assert!(delta.removed.is_empty());

    // The node refuses it; the control plane records the NACK and a barrier
    // on version 2 names the node as a laggard, with its reason.
    node.nack(&delta, "weight 40 is not allowed here").await;
    let run = atoll(&control, &["barrier", "--timeout", "1s"]).await;
    assert_eq!(run.code(), 7, "{}\n{}", run.stdout(), run.stderr());
    let out = run.stdout();
    assert!(
        out.contains("version 2 not reached within 1s by 1 of 1 node(s)"),
        "{out}"
    );
    assert!(
        out.contains(
            "gw-test (applied 1, connected, last NACK of v2: weight 40 is not allowed here)"
        ),
        "{out}"
    );

    let nodes: serde_json::Value = serde_json::from_str(
        &atoll(&control, &["nodes", "-o", "json"])
            .await
            .success()
            .stdout(),
    )
    .unwrap();
    let entry = &nodes["nodes"][0];
    assert_eq!(entry["name"], "gw-test");
    assert_eq!(entry["appliedVersion"], 1);
    assert_eq!(entry["sentVersion"], 2);
    assert_eq!(entry["lastNack"]["reason"], "weight 40 is not allowed here");
    let table = atoll(&control, &["nodes"]).await.success().stdout();
    assert!(
        table.contains("gw-test") && table.contains("connected"),
        "{table}"
    );

    // A barrier waiting in the background is released when the node catches up.
    let waiter = {
        let state = control.state.path().to_owned();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(crate::harness::ATOLL)
                .args([
                    "barrier",
                    "--version",
                    "3",
                    "--timeout",
                    "20s",
                    "--min-nodes",
                    "1",
                ])
                .env("ATOLL_STATE_DIR", state)
                .env_remove("ATOLL_CONTROL")
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Deleting a resource arrives as a removal.
    atoll(&control, &["delete", "route/web"]).await.success();
    let delta = node.next().await;
    assert_eq!((delta.base_version, delta.version), (2, 3));
    assert!(delta.resources.is_empty());
    assert_eq!(delta.removed.len(), 1);
    assert_eq!(delta.removed[0].name, "web");
    node.ack(&delta).await;
    let output = waiter.await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("version 3 reached by 1 node(s)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_node_lags_until_it_returns_or_is_forgotten() {
    let control = Control::start();
    atoll(&control, &["apply", "-f", examples().to_str().unwrap()])
        .await
        .success();
    let mut node = Node::connect(&control.url, "gw-gone", "gateway", 0).await;
    let snapshot = node.next().await;
    node.ack(&snapshot).await;
    atoll(&control, &["barrier", "--version", "1", "--timeout", "5s"])
        .await
        .success();
    drop(node);
    set_weight(&control, "hz-b", 10).await;
    let run = atoll(&control, &["barrier", "--timeout", "500ms"]).await;
    assert_eq!(run.code(), 7);
    assert!(
        run.stdout().contains("gw-gone (applied 1, disconnected)"),
        "{}",
        run.stdout()
    );

    // It comes back, says it runs version 1 (from its disk cache), gets a
    // snapshot of version 2 and ACKs it.
    let mut node = Node::connect(&control.url, "gw-gone", "gateway", 1).await;
    let snapshot = node.next().await;
    assert!(snapshot.snapshot && snapshot.version == 2);
    node.ack(&snapshot).await;
    atoll(&control, &["barrier", "--timeout", "5s"])
        .await
        .success();
    drop(node);

    // Forgotten, it no longer counts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    atoll(&control, &["nodes", "forget", "gw-gone"])
        .await
        .success();
    set_weight(&control, "hz-b", 20).await;
    atoll(&control, &["barrier", "--timeout", "1s"])
        .await
        .success();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_hello_is_refused() {
    let control = Control::start();
    let mut client = ConfigStreamClient::connect(control.url.clone())
        .await
        .unwrap();
    let (outbound, receiver) = mpsc::channel(1);
    outbound
        .send(NodeMessage {
            message: Some(node_message::Message::Ack(Ack {
                version: 1,
                nonce: "x".into(),
            })),
        })
        .await
        .unwrap();
    let status = client
        .subscribe(ReceiverStream::new(receiver))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("first message must be Hello"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_control_plane_ends_streams_cleanly() {
    let mut control = Control::start();
    let mut node = Node::connect(&control.url, "gw-stop", "gateway", 0).await;
    let snapshot = node.next().await;
    node.ack(&snapshot).await;
    let stopped = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        control.stop();
        started.elapsed()
    });
    let end = tokio::time::timeout(Duration::from_secs(10), node.inbound.message())
        .await
        .expect("the stream ends within 10s");
    match end {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
            assert!(
                status.message().contains("shutting down; reconnect"),
                "{status}"
            );
        }
        Ok(other) => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    let took = stopped.await.unwrap();
    assert!(
        took < Duration::from_secs(5),
        "stopping took {took:?} with a node connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_watch_streams_commits() {
    let control = Control::start();
    atoll(&control, &["apply", "-f", examples().to_str().unwrap()])
        .await
        .success();
    let mut response = reqwest::Client::new()
        .get(format!("{}/v1/watch?after=0", control.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut buffer = String::new();
    let mut lines = Vec::new();
    let read_line =
        async |response: &mut reqwest::Response, buffer: &mut String| -> serde_json::Value {
            loop {
                if let Some(end) = buffer.find('\n') {
                    let line: String = buffer.drain(..=end).collect();
                    return serde_json::from_str(&line).unwrap();
                }
                let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
                    .await
                    .expect("a line within 10s")
                    .unwrap()
                    .expect("open");
                buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        };
    lines.push(read_line(&mut response, &mut buffer).await);
    assert_eq!(lines[0]["revision"], 1);
    assert_eq!(lines[0]["changes"].as_array().unwrap().len(), 26);
    set_weight(&control, "hz-a", 7).await;
    let next = read_line(&mut response, &mut buffer).await;
    assert_eq!(next["revision"], 2);
    assert_eq!(next["changes"][0]["name"], "hz-a");
    assert_eq!(next["changes"][0]["resource"]["spec"]["weight"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_dropped_after_the_heartbeat_timeout_and_a_heartbeating_one_is_not() {
    let control = Control::start_with(vec!["--heartbeat-timeout=6s".into()]);
    atoll(&control, &["apply", "-f", examples().to_str().unwrap()])
        .await
        .success();
    // A node whose process froze: its TCP connection stays open, it sends
    // nothing after its ACK.
    let mut frozen = Node::connect(&control.url, "gw-frozen", "gateway", 0).await;
    let snapshot = frozen.next().await;
    frozen.ack(&snapshot).await;
    let silent_since = std::time::Instant::now();
    // A live node heartbeats every second here.
    let mut live = Node::connect(&control.url, "gw-live", "gateway", 0).await;
    let snapshot = live.next().await;
    live.ack(&snapshot).await;
    let beats = live.outbound.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let beat = NodeMessage {
                message: Some(node_message::Message::Heartbeat(
                    atoll_api::config::Heartbeat { applied_version: 1 },
                )),
            };
            if beats.send(beat).await.is_err() {
                return;
            }
        }
    });
    let connected = |nodes: &serde_json::Value, name: &str| {
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["connected"] == true)
    };
    let nodes = control.json(&["nodes"]);
    assert_eq!(connected(&nodes, "gw-frozen"), Some(true), "{nodes}");
    let ended = tokio::time::timeout(Duration::from_secs(10), frozen.inbound.message())
        .await
        .expect("the control plane closes the silent stream within 10 s");
    let status = ended.expect_err("closed with a status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        silent_since.elapsed() >= Duration::from_secs(6),
        "not before the timeout: {:?}",
        silent_since.elapsed()
    );
    let nodes = control.json(&["nodes"]);
    assert_eq!(connected(&nodes, "gw-frozen"), Some(false), "{nodes}");
    assert_eq!(
        connected(&nodes, "gw-live"),
        Some(true),
        "heartbeats keep it: {nodes}"
    );
    heartbeat.abort();
}

/// Records the versions it installs.
struct Recorder(parking_lot::Mutex<Vec<u64>>);

impl atoll_node::Installer for Recorder {
    fn install(&self, config: &atoll_node::NodeConfig) -> Result<(), String> {
        self.0.lock().push(config.version);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_config_past_grpcs_default_limit_reaches_nodes_and_one_that_cannot_says_so() {
    let control = Control::start();
    atoll(&control, &["apply", "-f", examples().to_str().unwrap()])
        .await
        .success();
    // 6 MiB of configuration: more than gRPC's default 4 MiB per message.
    let regions: Vec<String> = (0..15)
        .map(|i| {
            format!(
                "apiVersion: atoll/v1\nkind: Region\nmetadata: {{name: big{i}}}\nspec: {{displayName: \"{}\"}}\n",
                "z".repeat(400 * 1024)
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, regions.join("---\n")).unwrap();
    atoll(&control, &["apply", "-f", path.to_str().unwrap()])
        .await
        .success();
    let revision = control.revision();

    // An Atoll node receives it whole, in its first snapshot.
    let recorder = std::sync::Arc::new(Recorder(parking_lot::Mutex::new(Vec::new())));
    let client = atoll_node::NodeClient::new(
        atoll_node::NodeOptions {
            control: control.url.clone(),
            name: "gw-big".into(),
            role: "gateway".into(),
            zone: "hz-a".into(),
            cell: String::new(),
            workspace: String::new(),
            cache: None,
            transport: atoll_transport::Transport::plain(),
        },
        recorder.clone(),
    );
    let status = client.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let following = tokio::spawn(client.run(stopped));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while status.applied_version() < revision {
        assert!(
            std::time::Instant::now() < deadline,
            "the node did not get version {revision}: {:?}",
            status.last_error()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recorder.0.lock().last(), Some(&revision));

    // A node that keeps gRPC's default limit cannot receive it: it says so
    // when it connects again, and `atoll nodes` shows why.
    let mut small = Node::connect(&control.url, "gw-small", "gateway", 0).await;
    let failed = tokio::time::timeout(Duration::from_secs(10), small.inbound.message())
        .await
        .expect("an answer");
    let error = failed.expect_err("too large for a 4 MiB limit");
    assert_eq!(error.code(), tonic::Code::OutOfRange, "{error:?}");
    drop(small);
    let mut client = ConfigStreamClient::connect(control.url.clone())
        .await
        .unwrap();
    let (outbound, receiver) = mpsc::channel(4);
    outbound
        .send(NodeMessage {
            message: Some(node_message::Message::Hello(Hello {
                node: Some(NodeIdentity {
                    name: "gw-small".into(),
                    role: "gateway".into(),
                    zone: "hz-a".into(),
                    cell: String::new(),
                    workspace: String::new(),
                }),
                applied_version: 0,
                problem: format!("cannot receive an update: {}", error.message()),
            })),
        })
        .await
        .unwrap();
    let _stream = client
        .subscribe(ReceiverStream::new(receiver))
        .await
        .unwrap();
    let table = atoll(&control, &["nodes"]).await.success().stdout();
    let line = table
        .lines()
        .find(|l| l.starts_with("gw-small"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("cannot receive an update") && line.contains("message length too large"),
        "{table}"
    );
    let _ = stop.send(true);
    let _ = following.await;
}

/// The Apps in an update, by name.
fn apps(update: &ConfigUpdate) -> Vec<String> {
    update
        .resources
        .iter()
        .filter(|r| r.kind == "App")
        .map(|r| r.name.clone())
        .collect()
}

#[tokio::test]
async fn a_node_receives_what_its_role_and_zone_need_and_no_app_it_does_not_run() {
    let control = Control::start();
    atoll(&control, &["apply", "-f", examples().to_str().unwrap()])
        .await
        .success();
    let app = |name: &str, cell: &str| {
        format!(
            "apiVersion: atoll/v1\nkind: App\nmetadata: {{name: {name}}}\nspec: {{service: bank, cells: [{cell}], command: [/bin/echo, secret-of-{name}], env: {{TOKEN: t-{name}}}}}\n"
        )
    };
    let both = format!(
        "{}---\n{}",
        app("ledger-a", "rz01"),
        app("ledger-sh", "rz03")
    );
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(&both))
        .success();

    // The agent of hz-a receives the App it runs (rz01 is in hz-a), not the
    // one of sh-a; a gateway of hz-a and one of sh-a receive no App at all,
    // and everything routing needs.
    let mut agent = Node::connect_as(&control.url, "agent-hz-a", "agent", "hz-a", "", 0).await;
    let snapshot = agent.next().await;
    assert_eq!(apps(&snapshot), vec!["ledger-a".to_owned()]);
    for (name, zone) in [("gw-hz-a", "hz-a"), ("gw-sh-a", "sh-a")] {
        let mut gateway = Node::connect_as(&control.url, name, "gateway", zone, "", 0).await;
        let snapshot = gateway.next().await;
        assert!(apps(&snapshot).is_empty(), "{name}: {:?}", apps(&snapshot));
        let kinds: std::collections::BTreeSet<&str> =
            snapshot.resources.iter().map(|r| r.kind.as_str()).collect();
        for needed in ["ShardMap", "Service", "Cell", "Zone", "Gateway"] {
            assert!(kinds.contains(needed), "{name} lacks {needed}: {kinds:?}");
        }
        assert!(
            !snapshot
                .resources
                .iter()
                .any(|r| String::from_utf8_lossy(&r.json).contains("secret-of-")),
            "{name} received an App's command"
        );
    }

    // An App that moves into hz-a reaches its agent whole; one that moves out
    // is removed from it.
    let moved = format!(
        "{}---\n{}",
        app("ledger-a", "rz03"),
        app("ledger-sh", "rz01")
    );
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(&moved))
        .success();
    let update = agent.next().await;
    assert!(!update.snapshot);
    assert_eq!(apps(&update), vec!["ledger-sh".to_owned()]);
    let removed: Vec<(&str, &str)> = update
        .removed
        .iter()
        .map(|r| (r.kind.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(removed, vec![("App", "ledger-a")]);
}
