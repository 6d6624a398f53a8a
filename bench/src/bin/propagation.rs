//! Propagation: N data-plane nodes subscribed to the config stream on
//! loopback; time from an apply returning to each node holding the change.
//!
//! Usage: propagation --control http://127.0.0.1:7400 --nodes 200 --changes 50

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_api::config::config_stream_client::ConfigStreamClient;
use atoll_api::config::{Ack, Hello, NodeIdentity, NodeMessage, node_message};
use atoll_bench::{Samples, apply, ms, zone_manifest};
use clap::Parser;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
struct Args {
    /// Apply these manifests first (a realistic store).
    #[arg(long, global = true)]
    preload: Option<std::path::PathBuf>,
    /// The control plane.
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    control: String,
    /// Subscribed nodes.
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    /// Changes applied, one after the other.
    #[arg(long, default_value_t = 50)]
    changes: u32,
    /// Control-plane replicas, comma-separated: node i subscribes to
    /// replica i mod N (applies still go to --control).
    #[arg(long)]
    spread: Option<String>,
}

/// When each node received each version.
struct Receipts {
    /// Per node: (version, time received).
    nodes: Vec<Mutex<Vec<(u64, Instant)>>>,
    changed: Notify,
}

impl Receipts {
    fn holds(&self, version: u64) -> Option<Vec<Instant>> {
        self.nodes
            .iter()
            .map(|node| {
                node.lock()
                    .iter()
                    .find(|(v, _)| *v >= version)
                    .map(|(_, at)| *at)
            })
            .collect()
    }
}

async fn run_node(url: String, index: usize, receipts: Arc<Receipts>) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut client = ConfigStreamClient::new(channel);
    let (outbound, receiver) = mpsc::channel(8);
    outbound
        .send(NodeMessage {
            message: Some(node_message::Message::Hello(Hello {
                node: Some(NodeIdentity {
                    name: format!("bench-node-{index}"),
                    role: "bench".into(),
                    zone: "bench".into(),
                    cell: String::new(),
                    ..NodeIdentity::default()
                }),
                applied_version: 0,
                problem: String::new(),
            })),
        })
        .await?;
    let mut inbound = client
        .subscribe(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    while let Some(update) = inbound.message().await? {
        let at = Instant::now();
        receipts.nodes[index].lock().push((update.version, at));
        receipts.changed.notify_waiters();
        outbound
            .send(NodeMessage {
                message: Some(node_message::Message::Ack(Ack {
                    version: update.version,
                    nonce: update.nonce,
                })),
            })
            .await?;
    }
    Ok(())
}

async fn wait_all(receipts: &Receipts, version: u64) -> Vec<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let notified = receipts.changed.notified();
        if let Some(times) = receipts.holds(version) {
            return times;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not get version {version} within 30s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(5), notified).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::new();
    if let Some(dir) = &args.preload {
        atoll_bench::preload(&http, &args.control, dir).await?;
    }
    let setup = "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: bench}\n".to_owned()
        + "---\n"
        + &zone_manifest("bench-zone", 1);
    apply(&http, &args.control, &setup).await?;

    let receipts = Arc::new(Receipts {
        nodes: (0..args.nodes).map(|_| Mutex::new(Vec::new())).collect(),
        changed: Notify::new(),
    });
    let started = Instant::now();
    for index in 0..args.nodes {
        let receipts = receipts.clone();
        let url = match &args.spread {
            Some(list) => {
                let replicas: Vec<&str> = list.split(',').collect();
                replicas[index % replicas.len()].to_owned()
            }
            None => args.control.clone(),
        };
        tokio::spawn(async move {
            if let Err(error) = run_node(url, index, receipts).await {
                eprintln!("node {index}: {error}");
            }
        });
    }
    // Every node holds a snapshot.
    wait_all(&receipts, 1).await;
    println!(
        "{} nodes subscribed in {} ms",
        args.nodes,
        ms(started.elapsed())
    );

    let mut after_return = Vec::new();
    let mut after_send = Vec::new();
    let mut apply_latency = Vec::new();
    let mut early = 0usize;
    for change in 0..args.changes {
        let sent = Instant::now();
        let version = apply(
            &http,
            &args.control,
            &zone_manifest("bench-zone", 2 + change),
        )
        .await?;
        let returned = Instant::now();
        apply_latency.push(returned - sent);
        for at in wait_all(&receipts, version).await {
            if at < returned {
                early += 1;
            }
            after_return.push(at.saturating_duration_since(returned));
            after_send.push(at - sent);
        }
    }
    let after_return = Samples::new(after_return);
    let after_send = Samples::new(after_send);
    let apply_latency = Samples::new(apply_latency);
    println!(
        "propagation after apply returned ({} samples; {early} arrived before the apply returned, counted as 0): p50 {} ms, p99 {} ms, max {} ms",
        after_return.len(),
        ms(after_return.percentile(50.0)),
        ms(after_return.percentile(99.0)),
        ms(after_return.max())
    );
    println!(
        "propagation from apply sent: p50 {} ms, p99 {} ms, max {} ms",
        ms(after_send.percentile(50.0)),
        ms(after_send.percentile(99.0)),
        ms(after_send.max())
    );
    println!(
        "apply latency with {} nodes subscribed: p50 {} ms, p99 {} ms",
        args.nodes,
        ms(apply_latency.percentile(50.0)),
        ms(apply_latency.percentile(99.0))
    );
    // The barrier sees every ACK.
    let barrier: serde_json::Value = http
        .post(format!("{}/v1/barrier", args.control))
        .json(&serde_json::json!({"selector": {"role": "bench"}, "timeout": "10s", "minNodes": args.nodes}))
        .send()
        .await?
        .json()
        .await?;
    println!(
        "barrier on the last version: reached={} matched={} waited {} ms",
        barrier["reached"], barrier["matched"], barrier["waitedMs"]
    );
    println!(
        "RESULT propagation nodes={} changes={} p50_ms={} p99_ms={} max_ms={}",
        args.nodes,
        args.changes,
        ms(after_return.percentile(50.0)),
        ms(after_return.percentile(99.0)),
        ms(after_return.max())
    );
    Ok(())
}
