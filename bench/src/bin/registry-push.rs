//! Registry push: SUBSCRIBERS watchers (each its own HTTP/2 connection) of
//! one service holding INSTANCES instances; CHANGES times one instance is
//! registered, and each watcher's time to hold it is recorded from the
//! moment the registration was sent. Prints p50/p99/max, the bytes each
//! change cost one subscriber, and the time the snapshots took.
//! See bench/mesh.sh and docs/benchmarks.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use atoll_api::registry::{Instance, Registrant};
use atoll_registry::client::{Registrar, Watcher};
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// The control plane (its topology applied: examples/topology).
    #[arg(long)]
    control: String,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    #[arg(long, default_value_t = 50)]
    changes: usize,
}

fn registrant(role: &str, zone: &str, name: &str) -> Registrant {
    Registrant {
        name: name.into(),
        role: role.into(),
        zone: zone.into(),
        workspace: String::new(),
    }
}

fn instance(name: String, port: u32) -> Instance {
    Instance {
        service: "web".into(),
        name,
        zone: "hz-a".into(),
        cell: "rz01".into(),
        address: "10.1.2.3".into(),
        port,
        protocol: "http".into(),
        version: "v1".into(),
        ..Instance::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let urls = atoll_transport::ControlUrls::parse(&args.control).map_err(anyhow::Error::msg)?;
    let options = atoll_transport::ChannelOptions::default();
    let plain = atoll_transport::Transport::plain();

    // The registry: INSTANCES instances of `web`, from one agent.
    let agent = Registrar::start(
        plain.channels(options.clone()),
        urls.clone(),
        registrant("agent", "hz-a", "bench-agent"),
        Duration::from_secs(30),
    );
    agent.set(
        (0..args.instances)
            .map(|i| instance(format!("web-{i}"), 10_000 + (i as u32 % 50_000)))
            .collect(),
    );
    let loaded = Instant::now();
    agent
        .settled(Duration::from_secs(120))
        .await
        .map_err(anyhow::Error::msg)
        .context("registering the instances")?;
    println!(
        "registered {} instances in {:.0} ms",
        args.instances,
        loaded.elapsed().as_secs_f64() * 1000.0
    );

    // SUBSCRIBERS watchers, each with its own connection.
    let started = Instant::now();
    let watchers: Vec<Arc<Watcher>> = (0..args.subscribers)
        .map(|i| {
            Arc::new(Watcher::start(
                plain.channels(options.clone()),
                urls.clone(),
                registrant("sidecar", "hz-b", &format!("bench-sub-{i}")),
                ["web".to_owned()],
            ))
        })
        .collect();
    for watcher in &watchers {
        watcher
            .wait_until(Duration::from_secs(120), |v| {
                v.count("web") == args.instances
            })
            .await
            .map_err(|_| anyhow::anyhow!("a watcher did not get the snapshot in 120 s"))?;
    }
    println!(
        "{} subscribers hold the {}-instance snapshot after {:.0} ms",
        args.subscribers,
        args.instances,
        started.elapsed().as_secs_f64() * 1000.0
    );
    let bytes_before: u64 = watchers.iter().map(|w| w.read(|v| v.bytes)).sum();

    // CHANGES registrations of one more instance each, one after another.
    let mut samples: Vec<f64> = Vec::with_capacity(args.changes * args.subscribers);
    let mut one_instance_bytes = 0;
    for change in 0..args.changes {
        let probe = instance(format!("probe-{change}"), 9_000);
        one_instance_bytes = prost::Message::encoded_len(&probe);
        let want = args.instances + change + 1;
        let sent = Instant::now();
        agent.put(probe);
        let waits: Vec<_> = watchers
            .iter()
            .map(|w| {
                let w = w.clone();
                tokio::spawn(async move {
                    w.wait_until(Duration::from_secs(30), |v| v.count("web") >= want)
                        .await
                        .map(|_| sent.elapsed())
                })
            })
            .collect();
        for wait in waits {
            let took = wait
                .await?
                .map_err(|_| anyhow::anyhow!("a watcher missed change {change} for 30 s"))?;
            samples.push(took.as_secs_f64() * 1000.0);
        }
    }
    let bytes_after: u64 = watchers.iter().map(|w| w.read(|v| v.bytes)).sum();
    // One instance as subscribers hold it (with what the registry adds:
    // region, weight, registrant, session).
    one_instance_bytes = watchers[0].read(|v| {
        v.services
            .get("web")
            .and_then(|s| s.get(&("hz-a".to_owned(), "probe-0".to_owned())))
            .map_or(one_instance_bytes, |i| {
                prost::Message::encoded_len(i.as_ref())
            })
    });
    samples.sort_by(f64::total_cmp);
    let per_change = (bytes_after - bytes_before) as f64 / (args.changes * args.subscribers) as f64;
    println!(
        "push of one instance to {} subscribers over {} changes, from the registration sent: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (goal p99 under 100 ms: {})",
        args.subscribers,
        args.changes,
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or(0.0),
        if percentile(&samples, 0.99) < 100.0 {
            "met"
        } else {
            "not met"
        }
    );
    println!(
        "bytes per change per subscriber: {per_change:.0} (one instance encodes to {one_instance_bytes} bytes; the service holds {} instances)",
        args.instances + args.changes
    );
    agent.close().await;
    Ok(())
}
