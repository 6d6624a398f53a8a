//! Apply throughput of single-resource changes through the control plane's
//! REST API, and the raw store underneath as the anchor.
//!
//! Usage:
//!   apply-throughput api --control URL --count 500 --concurrency 1
//!   apply-throughput embedded --count 500          (raw redb commits, anchor)
//!   apply-throughput etcd --endpoint URL --count 500 (raw etcd puts, anchor)

use std::time::{Duration, Instant};

use atoll_bench::{Samples, apply, ms, zone_manifest};
use atoll_store::{Change, CommitRequest, EmbeddedStore, Store};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
struct Args {
    /// Apply these manifests first (a realistic store).
    #[arg(long, global = true)]
    preload: Option<std::path::PathBuf>,
    #[command(subcommand)]
    target: Target,
    /// Changes to make.
    #[arg(long, global = true, default_value_t = 500)]
    count: usize,
    /// Clients making changes at once.
    #[arg(long, global = true, default_value_t = 1)]
    concurrency: usize,
}

#[derive(Debug, Subcommand)]
enum Target {
    /// Through `POST /v1/apply` (parse, whole-state validation, diff, commit).
    Api {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        control: String,
    },
    /// Raw `Store::commit` on the embedded store in a temporary directory.
    Embedded,
    /// Raw single-key puts with etcd-client.
    Etcd {
        #[arg(long)]
        endpoint: String,
    },
}

fn report(
    label: &str,
    count: usize,
    concurrency: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
) {
    let samples = Samples::new(latencies);
    let rate = count as f64 / elapsed.as_secs_f64();
    println!(
        "{label}: {count} changes, concurrency {concurrency}: {rate:.0}/s, latency p50 {} ms, p99 {} ms",
        ms(samples.percentile(50.0)),
        ms(samples.percentile(99.0))
    );
    println!(
        "RESULT {label} concurrency={concurrency} per_second={rate:.0} p50_ms={} p99_ms={}",
        ms(samples.percentile(50.0)),
        ms(samples.percentile(99.0))
    );
}

fn zone(name: &str, weight: u32) -> atoll_model::Resource {
    let text = zone_manifest(name, weight);
    atoll_model::load("bench", &text)
        .map(|mut r| r.remove(0).resource)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let per_client = args.count / args.concurrency.max(1);
    let count = per_client * args.concurrency.max(1);
    let started;
    let mut latencies = Vec::with_capacity(count);
    let label;
    match args.target {
        Target::Api { control } => {
            label = "api";
            let rest = atoll_transport::Transport::plain().rest(
                atoll_transport::ControlUrls::parse_in_order(&control)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                Some(std::time::Duration::from_secs(30)),
            );
            if let Some(dir) = &args.preload {
                atoll_bench::preload(&rest, dir).await?;
            }
            let mut setup =
                "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: bench}\n".to_owned();
            for client in 0..args.concurrency {
                setup += "---\n";
                setup += &zone_manifest(&format!("tp-{client}"), 1);
            }
            apply(&rest, &setup).await?;
            started = Instant::now();
            let mut tasks = Vec::new();
            for client in 0..args.concurrency {
                let rest = rest.clone();
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_client);
                    for i in 0..per_client {
                        let t = Instant::now();
                        apply(&rest, &zone_manifest(&format!("tp-{client}"), 2 + i as u32)).await?;
                        latencies.push(t.elapsed());
                    }
                    Ok::<_, anyhow::Error>(latencies)
                }));
            }
            for task in tasks {
                latencies.extend(task.await??);
            }
        }
        Target::Embedded => {
            label = "raw-embedded";
            let dir = tempfile::tempdir()?;
            let store = EmbeddedStore::open(dir.path())?;
            started = Instant::now();
            let mut tasks = Vec::new();
            for client in 0..args.concurrency {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_client);
                    for i in 0..per_client {
                        let t = Instant::now();
                        store
                            .commit(CommitRequest {
                                changes: vec![Change::put(zone(
                                    &format!("tp-{client}"),
                                    2 + i as u32,
                                ))],
                                base_revision: None,
                                author: "bench".into(),
                                message: None,
                                fence: None,
                            })
                            .await?;
                        latencies.push(t.elapsed());
                    }
                    Ok::<_, anyhow::Error>(latencies)
                }));
            }
            for task in tasks {
                latencies.extend(task.await??);
            }
        }
        Target::Etcd { endpoint } => {
            label = "raw-etcd";
            let client = etcd_client::Client::connect([endpoint], None).await?;
            let value = serde_json::to_vec(&zone("tp", 1))?;
            started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..args.concurrency {
                let mut kv = client.kv_client();
                let value = value.clone();
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_client);
                    for _ in 0..per_client {
                        let t = Instant::now();
                        kv.put(format!("/bench/tp-{c}"), value.clone(), None)
                            .await?;
                        latencies.push(t.elapsed());
                    }
                    Ok::<_, anyhow::Error>(latencies)
                }));
            }
            for task in tasks {
                latencies.extend(task.await??);
            }
        }
    }
    report(label, count, args.concurrency, started.elapsed(), latencies);
    Ok(())
}
