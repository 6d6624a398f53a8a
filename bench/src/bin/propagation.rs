//! Propagation: N data-plane nodes subscribed to the config stream on
//! loopback; time from an apply returning to each node holding the change.
//!
//! Usage: propagation --control http://127.0.0.1:7400 --nodes 200 --changes 50
//!
//! With `--ca-dir DIR --token-file F` against a control plane serving TLS:
//! every node follows the stream over mutual TLS with a certificate of its
//! own (issued from the CA of DIR), and applies carry the admin token.

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
    /// The CA (`atoll ca init`) to issue the nodes' certificates from: the
    /// control plane serves TLS and nodes connect with mutual TLS.
    #[arg(long)]
    ca_dir: Option<std::path::PathBuf>,
    /// The admin token for applies (with --ca-dir).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
}

/// How nodes and applies reach the control plane: plain, or TLS with a
/// certificate per node.
struct Access {
    authority: Option<atoll_identity::Authority>,
    trust: Option<atoll_transport::Trust>,
}

impl Access {
    /// The channels node `index` connects with.
    fn channels(&self, index: usize) -> anyhow::Result<atoll_transport::Channels> {
        let options = atoll_transport::ChannelOptions::default();
        let (Some(authority), Some(trust)) = (&self.authority, &self.trust) else {
            return Ok(atoll_transport::Transport::plain().channels(options));
        };
        let id: atoll_identity::AtollId =
            format!("atoll://default/gateway/bench-zone/bench-node-{index}")
                .parse()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        let issued = authority.issue(&atoll_identity::IssueRequest {
            id: &id,
            key: atoll_identity::KeySource::Generate,
            lifetime: Duration::from_secs(3600),
            hosts: &[],
        })?;
        let identity = atoll_transport::Identity::from_pem(
            issued.chain_pem.as_bytes(),
            issued.key_pem.unwrap_or_default().as_bytes(),
            "a bench node",
        )?;
        let tls = atoll_transport::ClientTls::new(trust, Some(&identity))?;
        Ok(atoll_transport::Transport::with_tls(tls).channels(options))
    }
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

async fn run_node(
    url: String,
    index: usize,
    channels: atoll_transport::Channels,
    receipts: Arc<Receipts>,
) -> anyhow::Result<()> {
    let channel = channels
        .connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut client = ConfigStreamClient::new(channel);
    let (outbound, receiver) = mpsc::channel(8);
    outbound
        .send(NodeMessage {
            message: Some(node_message::Message::Hello(Hello {
                node: Some(NodeIdentity {
                    name: format!("bench-node-{index}"),
                    role: "gateway".into(),
                    zone: "bench-zone".into(),
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
    let access = match &args.ca_dir {
        Some(dir) => Access {
            authority: Some(atoll_identity::Authority::load(dir)?),
            trust: Some(atoll_transport::Trust::from_file(&dir.join("root.pem"))?),
        },
        None => Access {
            authority: None,
            trust: None,
        },
    };
    let transport = match &access.trust {
        Some(trust) => {
            atoll_transport::Transport::with_tls(atoll_transport::ClientTls::new(trust, None)?)
        }
        None => atoll_transport::Transport::plain(),
    };
    let mut rest = transport.rest(
        atoll_transport::ControlUrls::parse_in_order(&args.control)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        Some(Duration::from_secs(30)),
    );
    if let Some(file) = &args.token_file {
        rest = rest.with_token(std::fs::read_to_string(file)?.trim())?;
    }
    if let Some(dir) = &args.preload {
        atoll_bench::preload(&rest, dir).await?;
    }
    let setup = "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: bench}\n".to_owned()
        + "---\n"
        + &zone_manifest("bench-zone", 1);
    apply(&rest, &setup).await?;

    let receipts = Arc::new(Receipts {
        nodes: (0..args.nodes).map(|_| Mutex::new(Vec::new())).collect(),
        changed: Notify::new(),
    });
    let started = Instant::now();
    for index in 0..args.nodes {
        let receipts = receipts.clone();
        let channels = access.channels(index)?;
        let url = match &args.spread {
            Some(list) => {
                let replicas: Vec<&str> = list.split(',').collect();
                replicas[index % replicas.len()].to_owned()
            }
            None => args.control.clone(),
        };
        tokio::spawn(async move {
            if let Err(error) = run_node(url, index, channels, receipts).await {
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
        let version = apply(&rest, &zone_manifest("bench-zone", 2 + change)).await?;
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
    let barrier: serde_json::Value = rest
        .post(
            "/v1/barrier",
            &serde_json::json!({"selector": {"role": "gateway", "zone": "bench-zone"}, "timeout": "10s", "minNodes": args.nodes}),
        )
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
