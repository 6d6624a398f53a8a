//! Open-loop HTTP/1.1 load at a fixed rate: RATE requests a second for
//! SECONDS over keep-alive connections, each request's latency measured
//! from the moment it was due (so a stall counts for every request it
//! delays, not once). Prints p50, p90, p99, p99.9 and max, and a RESULT
//! line. Optionally first registers INSTANCES instances of a service (to
//! measure a sidecar that knows them). See bench/mesh.sh.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// What to call: `http://host:port/path`.
    #[arg(long)]
    url: Option<String>,
    /// The Host header (the service, through a sidecar).
    #[arg(long, default_value = "bank")]
    host: String,
    /// Extra headers, `name:value`.
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A label for the RESULT line.
    #[arg(long, default_value = "run")]
    label: String,
    /// Instead of load: register this many instances of `--service` in
    /// zone hz-a (cell rz01) with the control plane at `--control`, and
    /// keep them until killed.
    #[arg(long)]
    register: Option<usize>,
    #[arg(long)]
    control: Option<String>,
    #[arg(long, default_value = "web")]
    service: String,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(count) = args.register {
        return register(&args, count).await;
    }
    let url: http::Uri = args.url.clone().unwrap_or_default().parse()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let headers: Vec<(String, String)> = args
        .headers
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let total = u64::from(args.rate) * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let latencies = Arc::new(parking_lot::Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let headers = Arc::new(headers);
    // Warm the pool.
    for _ in 0..16 {
        let mut request = http::Request::get(url.clone()).header("host", &args.host);
        for (n, v) in headers.iter() {
            request = request.header(n, v);
        }
        let _ = client
            .request(request.body(http_body_util::Empty::new())?)
            .await;
    }
    // The schedule runs on a thread of its own with the OS's sleep (tokio's
    // timer ticks in milliseconds, which would bunch requests and add up
    // to a millisecond to each): requests are spawned on the runtime as
    // they fall due.
    let start = Instant::now();
    let handle = tokio::runtime::Handle::current();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let schedule = {
        let client = client.clone();
        let latencies = latencies.clone();
        let errors = errors.clone();
        let host = args.host.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            for i in 0..total {
                let due = start + interval.mul_f64(i as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mut request = http::Request::get(url.clone()).header("host", &host);
                for (n, v) in headers.iter() {
                    request = request.header(n, v);
                }
                let request = request.body(http_body_util::Empty::new())?;
                let client = client.clone();
                let latencies = latencies.clone();
                let errors = errors.clone();
                let done = done_tx.clone();
                handle.spawn(async move {
                    match client.request(request).await {
                        Ok(response) if response.status().is_success() => {
                            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                            let micros =
                                u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
                            latencies.lock().push(micros);
                        }
                        _ => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    let _ = done.send(());
                });
            }
            Ok(())
        })
    };
    let mut finished = 0u64;
    while finished < total {
        if done_rx.recv().await.is_none() {
            break;
        }
        finished += 1;
    }
    schedule
        .join()
        .map_err(|_| anyhow::anyhow!("the schedule thread panicked"))??;
    let elapsed = start.elapsed();
    let mut sorted = latencies.lock().clone();
    sorted.sort_unstable();
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    let (p50, p90, p99, p999) = (
        percentile(&sorted, 50.0),
        percentile(&sorted, 90.0),
        percentile(&sorted, 99.0),
        percentile(&sorted, 99.9),
    );
    let max = sorted.last().copied().unwrap_or(0);
    println!(
        "{}: {} requests at {}/s in {:.1} s, {errors} errors; latency p50 {p50} µs, p90 {p90} µs, p99 {p99} µs, p99.9 {p999} µs, max {max} µs",
        args.label,
        sorted.len(),
        args.rate,
        elapsed.as_secs_f64()
    );
    println!(
        "RESULT {} ok={} errors={errors} p50_us={p50} p90_us={p90} p99_us={p99} p999_us={p999} max_us={max}",
        args.label,
        sorted.len()
    );
    Ok(())
}

async fn register(args: &Args, count: usize) -> anyhow::Result<()> {
    let control = args.control.clone().unwrap_or_default();
    let channels =
        atoll_transport::Transport::plain().channels(atoll_transport::ChannelOptions::default());
    let urls = atoll_transport::ControlUrls::parse(&control).map_err(anyhow::Error::msg)?;
    let registrar = atoll_registry::client::Registrar::start(
        channels,
        urls,
        atoll_api::registry::Registrant {
            name: "hz-a".into(),
            role: "agent".into(),
            zone: "hz-a".into(),
            workspace: String::new(),
        },
        Duration::from_secs(30),
    );
    registrar.set(
        (0..count)
            .map(|i| atoll_api::registry::Instance {
                service: args.service.clone(),
                name: format!("{}-many-{i}", args.service),
                zone: "hz-a".into(),
                cell: "rz01".into(),
                address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                port: 8080,
                protocol: "http".into(),
                ..atoll_api::registry::Instance::default()
            })
            .collect(),
    );
    registrar
        .settled(Duration::from_secs(120))
        .await
        .map_err(anyhow::Error::msg)?;
    println!("registered {count} instances of {}", args.service);
    tokio::signal::ctrl_c().await?;
    registrar.close().await;
    Ok(())
}
