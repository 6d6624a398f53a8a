//! `atoll load`: drives a bank workload through the gateways, with a live
//! progress line and a summary that checks money is conserved; with
//! `--history`, records every operation and checks the history for lost or
//! doubled writes (`atoll-check`). `atoll check` checks a recorded history.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use atoll_api::rest::ListResponse;
use atoll_check::{Attempt, Event, FORMAT_VERSION, History};
use clap::Args;
use serde::Serialize;

use crate::client::{CliError, Client, exit};
use crate::output::Format;

#[derive(Debug, Args)]
pub(crate) struct LoadArgs {
    /// Gateway URL to send to; repeat for several [default: the advertised
    /// address of every Gateway resource, its public listener when it
    /// advertises its peer listener].
    #[arg(long = "gateway", value_name = "URL")]
    gateways: Vec<String>,

    /// How long to run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    duration: Duration,

    /// Number of users (ids from --first-user on).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=10_000_000))]
    users: u64,

    /// The first user id.
    #[arg(long, default_value_t = 1000)]
    first_user: u64,

    /// Requests in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,

    /// Requests per second in all; 0 runs as fast as the sandbox answers.
    #[arg(long, default_value_t = 0)]
    rate: u64,

    /// Do not check, at the end, that the users' balances changed by exactly
    /// deposits minus withdrawals.
    #[arg(long)]
    no_check: bool,

    /// How long a write is retried (same idempotency key) before it counts
    /// as failed.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    retry_for: Duration,

    /// Record the run's history in FILE (JSON Lines), re-send every write
    /// with its key after the run, and check that no acknowledged write was
    /// lost and none applied twice (docs/checker.md); exit 9 on an anomaly.
    #[arg(long, value_name = "FILE", conflicts_with = "no_check")]
    history: Option<PathBuf>,

    /// With --history: how long re-sending every write may take in all.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    settle_for: Duration,

    /// The progress lines on stderr: `text` for people, `json` for tools
    /// (one object per second: seconds, reqPerSec, errors, retries,
    /// cells: {cell: req/s}).
    #[arg(long, value_enum, default_value_t = Progress::Text)]
    progress: Progress,

    /// Summary format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Progress {
    /// A line for people (updated in place on a terminal).
    Text,
    /// One JSON object per second.
    Json,
}

/// One second of progress, as `--progress json` prints it.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Tick {
    pub(crate) seconds: f64,
    pub(crate) req_per_sec: f64,
    pub(crate) errors: u64,
    pub(crate) retries: u64,
    pub(crate) cells: BTreeMap<String, f64>,
}

/// What happened, for the summary (`-o json`).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    seconds: f64,
    users: u64,
    gateways: Vec<String>,
    /// HTTP requests sent (retries included).
    requests: u64,
    /// Requests that got no definite answer (transport errors, 5xx, 421);
    /// writes among them were retried with the same key.
    errors: u64,
    retries: u64,
    /// Operations that never got a definite answer.
    failed: u64,
    by_cell: BTreeMap<String, u64>,
    by_kind: BTreeMap<String, u64>,
    errors_by_cause: BTreeMap<String, u64>,
    refused_for_funds: u64,
    cross_cell_transfers: u64,
    deposits: i64,
    withdrawals: i64,
    latency_ms: Latency,
    /// The check: the users' total before, after, and whether after equals
    /// before + deposits - withdrawals.
    #[serde(skip_serializing_if = "Option::is_none")]
    money: Option<Money>,
    /// With --history: the checker's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<atoll_check::Report>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Money {
    before: i64,
    after: i64,
    expected: i64,
    conserved: bool,
}

#[derive(Default)]
struct Stats {
    summary: Summary,
    latencies_us: Vec<u32>,
    /// Writes without a definite answer yet.
    unresolved: Vec<Op>,
    /// With --history: every write, to settle after the run.
    writes: Vec<Pending>,
}

/// A write of the history, waiting for its settle.
struct Pending {
    id: u64,
    op: Op,
    /// Whether the summary counted it already (it had a definite answer).
    counted: bool,
}

/// The answer to one logical operation.
enum Outcome {
    /// A definite answer: status, body, the cell that gave it.
    Answer(u16, serde_json::Value),
    /// No definite answer within --retry-for.
    Failed,
}

/// The answer to one logical operation, and every request it took (kept
/// only with --history).
struct Answer {
    outcome: Outcome,
    attempts: Vec<Attempt>,
}

/// One operation of the workload.
#[derive(Clone, Debug)]
struct Op {
    kind: &'static str,
    path: String,
    key: Option<String>,
    body: Option<serde_json::Value>,
    amount: i64,
    user: u64,
    to: Option<u64>,
}

impl Op {
    fn read(user: u64) -> Op {
        Op {
            kind: "balance",
            path: format!("/accounts/{user}"),
            key: None,
            body: None,
            amount: 0,
            user,
            to: None,
        }
    }

    /// Its kind in the history.
    fn history_kind(&self) -> atoll_check::Kind {
        match self.kind {
            "deposit" => atoll_check::Kind::Deposit,
            "withdraw" => atoll_check::Kind::Withdraw,
            "transfer" => atoll_check::Kind::Transfer,
            _ => atoll_check::Kind::Read,
        }
    }

    fn write(kind: &'static str, user: u64, key: String, amount: i64, to: Option<u64>) -> Op {
        let body = match to {
            Some(to) => serde_json::json!({"amount": amount, "to": to.to_string()}),
            None => serde_json::json!({"amount": amount}),
        };
        Op {
            kind,
            path: format!("/accounts/{user}/{kind}"),
            key: Some(key),
            body: Some(body),
            amount,
            user,
            to,
        }
    }
}

/// With --history: the run's events, streamed to the file as they happen.
struct Recorder {
    path: PathBuf,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
    /// The first write error: the file is incomplete after it.
    error: Mutex<Option<String>>,
    /// Time 0 of the history: when the run starts.
    zero: OnceLock<Instant>,
    next_id: AtomicU64,
}

// === impl Recorder ===

impl Recorder {
    fn create(path: PathBuf) -> Result<Recorder, CliError> {
        let file = std::fs::File::create(&path).map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot write the history to {}: {e}", path.display()),
            )
        })?;
        Ok(Recorder {
            path,
            file: Mutex::new(std::io::BufWriter::new(file)),
            error: Mutex::new(None),
            zero: OnceLock::new(),
            next_id: AtomicU64::new(1),
        })
    }

    /// Microseconds from time 0 to `at`.
    fn micros(&self, at: Instant) -> u64 {
        let zero = *self.zero.get_or_init(Instant::now);
        u64::try_from(at.saturating_duration_since(zero).as_micros()).unwrap_or(u64::MAX)
    }

    fn write(&self, event: &Event) {
        // Serialized outside the lock; workers only wait for the copy.
        let mut line = Vec::with_capacity(512);
        let result = atoll_check::write_event(&mut line, event)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.file
                    .lock()
                    .write_all(&line)
                    .map_err(|e| format!("{}: {e}", self.path.display()))
            });
        if let Err(e) = result {
            self.error.lock().get_or_insert(e);
        }
    }

    fn finish(&self) -> Result<(), CliError> {
        if let Err(e) = self.file.lock().flush() {
            self.error
                .lock()
                .get_or_insert(format!("{}: {e}", self.path.display()));
        }
        match self.error.lock().take() {
            Some(e) => Err(CliError::new(
                exit::FAILURE,
                format!("writing the history: {e}"),
            )),
            None => Ok(()),
        }
    }

    /// Records a completed operation; returns its id.
    fn operation(
        &self,
        worker: u64,
        op: &Op,
        invoke: Instant,
        complete: Instant,
        attempts: Vec<Attempt>,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let outcome = attempts
            .last()
            .map_or(atoll_check::Outcome::Unknown, Attempt::outcome);
        self.write(&Event::Op(atoll_check::Operation {
            id,
            worker,
            kind: op.history_kind(),
            user: op.user.to_string(),
            to: op.to.map(|to| to.to_string()),
            amount: op.amount,
            key: op.key.clone(),
            invoke: self.micros(invoke),
            complete: self.micros(complete),
            attempts,
            outcome,
        }));
        id
    }
}

/// Writes re-sent in parallel after the run, with --history.
const SETTLE_IN_FLIGHT: u64 = 32;

struct Load {
    http: reqwest::Client,
    gateways: Vec<String>,
    args: LoadArgs,
    stats: Mutex<Stats>,
    run: String,
    recorder: Option<Recorder>,
}

impl Load {
    fn record(&self, elapsed: Duration, cell: Option<&str>, error: Option<String>) {
        let mut stats = self.stats.lock();
        stats.summary.requests += 1;
        stats
            .latencies_us
            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        if let Some(cell) = cell {
            *stats.summary.by_cell.entry(cell.to_owned()).or_default() += 1;
        }
        if let Some(cause) = error {
            stats.summary.errors += 1;
            *stats.summary.errors_by_cause.entry(cause).or_default() += 1;
        }
    }

    /// Sends a request until it has a definite answer (writes carry the
    /// same idempotency key each time), or `retry_for` passes. `tally`:
    /// count the requests in the summary.
    async fn call(
        &self,
        gateway: usize,
        method: reqwest::Method,
        path: &str,
        (key, body): (Option<&str>, Option<&serde_json::Value>),
        retry_for: Duration,
        tally: bool,
    ) -> Answer {
        let deadline = Instant::now() + retry_for;
        let mut attempt = 0usize;
        let mut attempts = Vec::new();
        let record = |elapsed, cell: Option<&str>, error| {
            if tally {
                self.record(elapsed, cell, error);
            }
        };
        loop {
            let base = &self.gateways[(gateway + attempt) % self.gateways.len()];
            let mut request = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let sent = Instant::now();
            let result = request.send().await;
            let elapsed = sent.elapsed();
            let mut history = self.recorder.as_ref().map(|recorder| Attempt {
                sent: recorder.micros(sent),
                gateway: base.clone(),
                ..Attempt::default()
            });
            let error = match result {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let cell = response
                        .headers()
                        .get("x-bank-cell")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let replayed = response
                        .headers()
                        .get("idempotent-replayed")
                        .is_some_and(|v| v == "true");
                    let body = response
                        .json::<serde_json::Value>()
                        .await
                        .unwrap_or_default();
                    if let (Some(attempt), Some(recorder)) = (&mut history, &self.recorder) {
                        attempt.received = recorder.micros(Instant::now());
                        attempt.status = Some(status);
                        attempt.error = body["error"].as_str().map(str::to_owned);
                        attempt.replayed = replayed;
                        attempt.balance = body["balance"].as_i64();
                        attempt.cell = cell.clone();
                        attempts.push(attempt.clone());
                    }
                    if status < 500 && status != 421 {
                        record(elapsed, cell.as_deref(), None);
                        return Answer {
                            outcome: Outcome::Answer(status, body),
                            attempts,
                        };
                    }
                    let code = body["error"].as_str().unwrap_or("");
                    record(
                        elapsed,
                        cell.as_deref(),
                        Some(format!("{status} {code}").trim().to_owned()),
                    );
                    format!("{status}")
                }
                Err(e) => {
                    let cause = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect"
                    } else {
                        "transport"
                    };
                    if let (Some(mut attempt), Some(recorder)) = (history, &self.recorder) {
                        attempt.received = recorder.micros(Instant::now());
                        attempt.transport = Some(cause.to_owned());
                        attempts.push(attempt);
                    }
                    record(elapsed, None, Some(cause.to_owned()));
                    cause.to_owned()
                }
            };
            attempt += 1;
            if Instant::now() >= deadline {
                tracing::debug!(%path, %error, "giving up");
                return Answer {
                    outcome: Outcome::Failed,
                    attempts,
                };
            }
            if tally {
                self.stats.lock().summary.retries += 1;
            }
            tokio::time::sleep(Duration::from_millis(50 * attempt.min(10) as u64)).await;
        }
    }

    async fn run_op(&self, gateway: usize, op: &Op, retry_for: Duration, tally: bool) -> Answer {
        let method = if op.key.is_some() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        self.call(
            gateway,
            method,
            &op.path,
            (op.key.as_deref(), op.body.as_ref()),
            retry_for,
            tally,
        )
        .await
    }

    /// Counts an operation's definite outcome.
    fn settle(summary: &mut Summary, op: &Op, outcome: Outcome) {
        *summary.by_kind.entry(op.kind.to_owned()).or_default() += 1;
        match outcome {
            Outcome::Failed => summary.failed += 1,
            Outcome::Answer(200, body) => match op.kind {
                "deposit" => summary.deposits += op.amount,
                "withdraw" => summary.withdrawals += op.amount,
                "transfer" if body["delivered"] == serde_json::Value::Bool(false) => {
                    summary.cross_cell_transfers += 1
                }
                _ => {}
            },
            Outcome::Answer(409, _) => summary.refused_for_funds += 1,
            Outcome::Answer(status, body) => {
                summary.failed += 1;
                let cause = format!("{status} {}", body["error"].as_str().unwrap_or(""));
                *summary
                    .errors_by_cause
                    .entry(cause.trim().to_owned())
                    .or_default() += 1;
            }
        }
    }

    fn user(&self, rng: &mut fastrand::Rng) -> u64 {
        self.args.first_user + rng.u64(0..self.args.users)
    }

    /// One worker: random operations until `end`.
    async fn work(self: Arc<Self>, worker: u64, end: Instant, pace: Option<Duration>) {
        let mut rng = fastrand::Rng::with_seed(worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
        let mut n = 0u64;
        let mut next = Instant::now();
        while Instant::now() < end {
            if let Some(pace) = pace {
                next += pace;
                let now = Instant::now();
                if next > now {
                    tokio::time::sleep(next - now).await;
                } else if now - next > pace * 10 {
                    next = now;
                }
            }
            n += 1;
            let gateway = rng.usize(0..self.gateways.len());
            let user = self.user(&mut rng);
            let key = format!("load-{}-{worker}-{n}", self.run);
            let amount = rng.i64(1..=100);
            let roll = rng.u8(0..100);
            let op = if roll < 40 {
                Op::read(user)
            } else if roll < 60 {
                Op::write("deposit", user, key, amount, None)
            } else if roll < 70 {
                Op::write("withdraw", user, key, amount, None)
            } else {
                let mut to = self.user(&mut rng);
                if to == user {
                    to = if user + 1 < self.args.first_user + self.args.users {
                        user + 1
                    } else {
                        self.args.first_user
                    };
                }
                Op::write("transfer", user, key, amount, Some(to))
            };
            let invoke = Instant::now();
            let Answer { outcome, attempts } =
                self.run_op(gateway, &op, self.args.retry_for, true).await;
            if let Some(recorder) = &self.recorder {
                let id = recorder.operation(worker, &op, invoke, Instant::now(), attempts);
                if op.key.is_some() {
                    // Every write is settled at the end; one without an
                    // answer is counted then.
                    let counted = !matches!(outcome, Outcome::Failed);
                    let mut stats = self.stats.lock();
                    if counted {
                        Self::settle(&mut stats.summary, &op, outcome);
                    }
                    stats.writes.push(Pending { id, op, counted });
                    continue;
                }
            }
            if matches!(outcome, Outcome::Failed) && op.key.is_some() {
                // Settled at the end: its key tells whether it applied.
                self.stats.lock().unresolved.push(op);
                continue;
            }
            Self::settle(&mut self.stats.lock().summary, &op, outcome);
        }
    }

    /// Every user's balance, read through the gateways (from its owner).
    async fn balances(self: &Arc<Self>) -> Result<BTreeMap<u64, i64>, CliError> {
        let users: Vec<u64> =
            (self.args.first_user..self.args.first_user + self.args.users).collect();
        let chunks: Vec<Vec<u64>> = users
            .chunks(users.len().div_ceil(self.args.concurrency as usize).max(1))
            .map(<[u64]>::to_vec)
            .collect();
        let mut tasks = Vec::new();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let load = self.clone();
            tasks.push(tokio::spawn(async move {
                let mut balances = Vec::with_capacity(chunk.len());
                for user in chunk {
                    let url = format!("{}/accounts/{user}", load.gateways[i % load.gateways.len()]);
                    let deadline = Instant::now() + load.args.retry_for;
                    loop {
                        let answer = match load.http.get(&url).send().await {
                            Ok(r) if r.status().is_success() => {
                                r.json::<serde_json::Value>().await.ok()
                            }
                            _ => None,
                        };
                        if let Some(balance) = answer.as_ref().and_then(|b| b["balance"].as_i64()) {
                            balances.push((user, balance));
                            break;
                        }
                        if Instant::now() >= deadline {
                            return Err(format!("cannot read the balance of user {user} at {url}"));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Ok(balances)
            }));
        }
        let mut balances = BTreeMap::new();
        for task in tasks {
            balances.extend(
                task.await
                    .map_err(|e| CliError::new(exit::FAILURE, format!("reading balances: {e}")))?
                    .map_err(|e| CliError::new(exit::FAILURE, e))?,
            );
        }
        Ok(balances)
    }

    /// Re-sends every write with its key (--history), at most
    /// `SETTLE_IN_FLIGHT` at a time and within --settle-for, and records
    /// each answer. A write the run left without an answer is counted in
    /// the summary by its settle, as without --history.
    async fn settle_all(self: &Arc<Self>, writes: Vec<Pending>) {
        if self.recorder.is_none() {
            return;
        }
        let started = Instant::now();
        let total = writes.len();
        let in_flight = SETTLE_IN_FLIGHT.max(self.args.concurrency);
        eprintln!(
            "settling all {total} writes by their keys ({in_flight} in flight, at most {})...",
            humantime::format_duration(self.args.settle_for)
        );
        let deadline = started + self.args.settle_for;
        let queue = Arc::new(Mutex::new(writes.into_iter()));
        let tally = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
        let mut tasks = Vec::new();
        for lane in 0..in_flight.min(total as u64).max(1) {
            let (load, queue, tally) = (self.clone(), queue.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(pending) = queue.lock().next() else {
                        return;
                    };
                    let invoke = Instant::now();
                    let Answer { outcome, attempts } = if invoke >= deadline {
                        Answer {
                            outcome: Outcome::Failed,
                            attempts: Vec::new(),
                        }
                    } else {
                        let retry_for = load.args.retry_for.min(deadline - invoke);
                        load.run_op(lane as usize, &pending.op, retry_for, !pending.counted)
                            .await
                    };
                    let answered = attempts
                        .last()
                        .filter(|a| a.outcome() != atoll_check::Outcome::Unknown);
                    {
                        let mut tally = tally.lock();
                        match answered {
                            Some(a) if a.replayed => tally.0 += 1,
                            Some(_) => tally.1 += 1,
                            None => tally.2 += 1,
                        }
                    }
                    if let Some(recorder) = &load.recorder {
                        let outcome =
                            answered.map_or(atoll_check::Outcome::Unknown, Attempt::outcome);
                        recorder.write(&Event::Settle(atoll_check::Settle {
                            id: pending.id,
                            key: pending.op.key.clone().unwrap_or_default(),
                            invoke: recorder.micros(invoke),
                            complete: recorder.micros(Instant::now()),
                            attempts,
                            outcome,
                        }));
                    }
                    if !pending.counted {
                        Self::settle(&mut load.stats.lock().summary, &pending.op, outcome);
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
        let (replayed, fresh, unanswered) = *tally.lock();
        eprintln!(
            "settled {total} writes in {:.1} s: {replayed} replayed, {fresh} handled only now, {unanswered} without an answer",
            started.elapsed().as_secs_f64()
        );
    }
}

/// Money in flight per cell (`inFlight` of each cell's `GET /totals`,
/// asked of the instances the agents report), until every cell has none or
/// `wait` passes; and whether every cell got there.
async fn drain(
    client: &Client,
    http: &reqwest::Client,
    wait: Duration,
) -> (BTreeMap<String, i64>, bool) {
    let mut cells: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Ok(list) = client.get::<ListResponse>("/v1/resources/endpoints").await {
        for item in &list.items {
            let endpoints = item
                .pointer("/spec/endpoints")
                .and_then(|e| e.as_array())
                .map(Vec::as_slice)
                .unwrap_or_default();
            for endpoint in endpoints {
                if let (Some(cell), Some(address)) =
                    (endpoint["cell"].as_str(), endpoint["address"].as_str())
                {
                    let addresses = cells.entry(cell.to_owned()).or_default();
                    // Ready instances first.
                    if endpoint["ready"] == serde_json::Value::Bool(true) {
                        addresses.insert(0, address.to_owned());
                    } else {
                        addresses.push(address.to_owned());
                    }
                }
            }
        }
    }
    if cells.is_empty() {
        return (BTreeMap::new(), false);
    }
    let deadline = Instant::now() + wait;
    loop {
        let mut in_flight = BTreeMap::new();
        let mut drained = true;
        for (cell, addresses) in &cells {
            let mut found = None;
            for address in addresses {
                let answer = match http.get(format!("http://{address}/totals")).send().await {
                    Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
                    _ => None,
                };
                found = answer.and_then(|totals| totals["inFlight"].as_i64());
                if found.is_some() {
                    break;
                }
            }
            match found {
                Some(n) => {
                    drained &= n == 0;
                    in_flight.insert(cell.clone(), n);
                }
                None => drained = false,
            }
        }
        if drained || Instant::now() >= deadline {
            return (in_flight, drained);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where clients reach a Gateway resource (its JSON): its advertised
/// address, or, when that is its peer listener (for other gateways, mutual
/// TLS), the same host at its first public listener.
pub(crate) fn client_url(gateway: &serde_json::Value) -> Option<String> {
    let advertise = gateway.pointer("/spec/advertise")?.as_str()?;
    if gateway
        .pointer("/spec/peer")
        .is_none_or(serde_json::Value::is_null)
    {
        return Some(format!("http://{advertise}"));
    }
    let listener = gateway.pointer("/spec/listeners/0")?;
    let port = listener.get("port")?.as_u64()?;
    let scheme = match listener.get("protocol")?.as_str()? {
        "https" => "https",
        _ => "http",
    };
    let host = advertise
        .rsplit_once(':')
        .map_or(advertise, |(host, _)| host);
    Some(format!("{scheme}://{host}:{port}"))
}

/// The gateways to use: given, or every advertised one.
async fn gateways(client: &Client, given: &[String]) -> Result<Vec<String>, CliError> {
    let normalize = |url: &str| {
        let url = url.trim_end_matches('/');
        if url.starts_with("http://") || url.starts_with("https://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        }
    };
    if !given.is_empty() {
        return Ok(given.iter().map(|g| normalize(g)).collect());
    }
    let list: ListResponse = client.get("/v1/resources/gateways").await?;
    let found: Vec<String> = list.items.iter().filter_map(client_url).collect();
    if found.is_empty() {
        let mut error = CliError::new(exit::FAILURE, "no Gateway resource advertises an address");
        error.details.push(
            "pass --gateway URL (repeat it for several), or start the sandbox with `atoll up`"
                .into(),
        );
        return Err(error);
    }
    Ok(found)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index.min(sorted.len() - 1)]) / 1000.0
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

pub(crate) async fn run(client: &Client, args: LoadArgs) -> Result<u8, CliError> {
    let gateways = gateways(client, &args.gateways).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.concurrency as usize)
        .build()
        .map_err(|e| CliError::new(exit::FAILURE, format!("building the HTTP client: {e}")))?;
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let recorder = args.history.clone().map(Recorder::create).transpose()?;
    let load = Arc::new(Load {
        http,
        gateways: gateways.clone(),
        stats: Mutex::new(Stats::default()),
        run,
        args,
        recorder,
    });
    let args = &load.args;
    eprintln!(
        "atoll load: {} users ({}..{}), {} in flight, {} through {}",
        args.users,
        args.first_user,
        args.first_user + args.users - 1,
        args.concurrency,
        humantime::format_duration(args.duration),
        gateways.join(", ")
    );
    let before = if args.no_check {
        None
    } else {
        if load.recorder.is_some() {
            // Credits of earlier activity land first.
            drain(client, &load.http, Duration::from_secs(30)).await;
        }
        eprintln!("reading every user's balance first...");
        // Until two reads agree: credits of earlier activity may be landing.
        let mut balances = load.balances().await?;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let again = load.balances().await?;
            if again == balances {
                break;
            }
            balances = again;
        }
        if let Some(recorder) = &load.recorder {
            let started_at_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            // Time 0: the run starts now.
            recorder.zero.get_or_init(Instant::now);
            recorder.write(&Event::Start(atoll_check::Start {
                version: FORMAT_VERSION,
                run: load.run.clone(),
                started_at_unix_ms,
                gateways: gateways.clone(),
                balances: balances
                    .iter()
                    .map(|(user, balance)| (user.to_string(), *balance))
                    .collect(),
            }));
        }
        Some(balances.values().sum::<i64>())
    };
    let started = Instant::now();
    let end = started + args.duration;
    let pace = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate as f64));
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        workers.push(tokio::spawn(load.clone().work(worker, end, pace)));
    }
    let terminal = std::io::stderr().is_terminal();
    let mut last = (Instant::now(), 0u64, BTreeMap::<String, u64>::new());
    let mut ticks = 0u64;
    while workers.iter().any(|w| !w.is_finished()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if last.0.elapsed() < Duration::from_secs(1) {
            continue;
        }
        ticks += 1;
        let (requests, errors, retries, by_cell) = {
            let stats = load.stats.lock();
            (
                stats.summary.requests,
                stats.summary.errors,
                stats.summary.retries,
                stats.summary.by_cell.clone(),
            )
        };
        let seconds = last.0.elapsed().as_secs_f64();
        let rate = (requests - last.1) as f64 / seconds;
        let cells: Vec<String> = by_cell
            .iter()
            .map(|(cell, n)| {
                format!(
                    "{cell} {:.0}/s",
                    (*n - last.2.get(cell).copied().unwrap_or(0)) as f64 / seconds
                )
            })
            .collect();
        if args.progress == Progress::Json {
            let tick = Tick {
                seconds: started.elapsed().as_secs_f64(),
                req_per_sec: rate,
                errors,
                retries,
                cells: by_cell
                    .iter()
                    .map(|(cell, n)| {
                        (
                            cell.clone(),
                            (*n - last.2.get(cell).copied().unwrap_or(0)) as f64 / seconds,
                        )
                    })
                    .collect(),
            };
            eprintln!("{}", serde_json::to_string(&tick).unwrap_or_default());
            last = (Instant::now(), requests, by_cell);
            continue;
        }
        let line = format!(
            "{:>4.0}s  {:>6.0} req/s  errors {errors}  retries {retries}  {}",
            started.elapsed().as_secs_f64(),
            rate,
            cells.join("  ")
        );
        if terminal {
            eprint!("\r\x1b[2K{line}");
        } else if ticks.is_multiple_of(5) {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
        last = (Instant::now(), requests, by_cell);
    }
    if terminal && args.progress == Progress::Text {
        eprintln!();
    }
    for worker in workers {
        let _ = worker.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Writes that got no definite answer: their key says whether they
    // applied (a replay), so the ledger stays exact.
    let unresolved = std::mem::take(&mut load.stats.lock().unresolved);
    if !unresolved.is_empty() {
        eprintln!(
            "settling {} writes that got no answer, by their keys...",
            unresolved.len()
        );
    }
    for op in unresolved {
        let outcome = load.run_op(0, &op, load.args.retry_for, true).await.outcome;
        Load::settle(&mut load.stats.lock().summary, &op, outcome);
    }
    // With --history, every write: the answer to an acknowledged one must
    // be a replay.
    let writes = std::mem::take(&mut load.stats.lock().writes);
    load.settle_all(writes).await;
    let mut summary = {
        let mut stats = load.stats.lock();
        stats.latencies_us.sort_unstable();
        let latencies = &stats.latencies_us;
        let latency = Latency {
            p50: percentile(latencies, 0.50),
            p90: percentile(latencies, 0.90),
            p99: percentile(latencies, 0.99),
            max: percentile(latencies, 1.0),
        };
        let mut summary = stats.summary.clone();
        summary.latency_ms = latency;
        summary
    };
    summary.seconds = seconds;
    summary.users = load.args.users;
    summary.gateways = gateways;
    if let Some(before) = before {
        let expected = before + summary.deposits - summary.withdrawals;
        eprintln!("waiting for cross-cell credits in flight, then reading every balance...");
        let drained = match &load.recorder {
            Some(_) => Some(drain(client, &load.http, Duration::from_secs(30)).await),
            None => None,
        };
        // Credits of cross-cell transfers land shortly after the debit.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut balances = load.balances().await?;
        let mut after: i64 = balances.values().sum();
        while after != expected
            && Instant::now() < deadline
            && !drained.as_ref().is_some_and(|(_, drained)| *drained)
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
            balances = load.balances().await?;
            after = balances.values().sum();
        }
        summary.money = Some(Money {
            before,
            after,
            expected,
            conserved: after == expected,
        });
        if let (Some(recorder), Some((in_flight, drained))) = (&load.recorder, drained) {
            recorder.write(&Event::Final(atoll_check::FinalState {
                at: recorder.micros(Instant::now()),
                balances: balances
                    .iter()
                    .map(|(user, balance)| (user.to_string(), *balance))
                    .collect(),
                in_flight,
                drained,
            }));
            recorder.finish()?;
            let history = History::read_file(&recorder.path)
                .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
            eprintln!(
                "history: {} operations, {} settles in {}",
                history.operations.len(),
                history.settles.len(),
                recorder.path.display()
            );
            summary.check = Some(atoll_check::check(&history));
        }
    }
    match load.args.output {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        ),
        _ => {
            print_summary(&summary);
            if let Some(report) = &summary.check {
                println!();
                print!("{report}");
            }
        }
    }
    if summary.check.as_ref().is_some_and(|r| !r.is_clean()) {
        return Ok(ANOMALY);
    }
    let conserved = summary.money.as_ref().is_none_or(|m| m.conserved);
    Ok(if conserved && summary.failed == 0 {
        0
    } else {
        exit::FAILURE
    })
}

/// The exit code when the checker finds an anomaly (`docs/cli.md`).
pub(crate) const ANOMALY: u8 = 9;

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The history, as `atoll load --history FILE` wrote it (JSON Lines).
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// Report format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// `atoll check FILE`: checks a recorded history; exit 9 on an anomaly.
pub(crate) fn check(args: &CheckArgs) -> Result<u8, CliError> {
    let history = History::read_file(&args.file).map_err(|e| {
        let mut error = CliError::new(exit::FAILURE, e.to_string());
        error
            .details
            .push("pass a file written by `atoll load --history FILE`".into());
        error
    })?;
    let report = atoll_check::check(&history);
    let text = match args.output {
        Format::Table => report.to_string(),
        Format::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Format::Yaml => atoll_model::to_yaml(&serde_json::to_value(&report).unwrap_or_default()),
    };
    // A reader that stops early (`| head`) is not an error.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(if report.is_clean() { 0 } else { ANOMALY })
}

fn print_summary(s: &Summary) {
    let n = |v: u64| thousands(i64::try_from(v).unwrap_or(i64::MAX));
    println!(
        "atoll load: {:.1} s, {} users through {} gateways",
        s.seconds,
        n(s.users),
        s.gateways.len()
    );
    println!(
        "  requests   {} ({:.0}/s), errors {}, retries {}, operations failed {}",
        n(s.requests),
        s.requests as f64 / s.seconds.max(0.001),
        n(s.errors),
        n(s.retries),
        n(s.failed)
    );
    if !s.errors_by_cause.is_empty() {
        let causes: Vec<String> = s
            .errors_by_cause
            .iter()
            .map(|(c, k)| format!("{c}: {}", n(*k)))
            .collect();
        println!("  errors     {}", causes.join(", "));
    }
    println!(
        "  latency    p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        s.latency_ms.p50, s.latency_ms.p90, s.latency_ms.p99, s.latency_ms.max
    );
    let cells: Vec<String> = s
        .by_cell
        .iter()
        .map(|(c, k)| format!("{c} {}", n(*k)))
        .collect();
    println!("  by cell    {}", cells.join("  "));
    let kind = |name: &str| n(s.by_kind.get(name).copied().unwrap_or(0));
    println!(
        "  by kind    balance {}  deposit {}  withdraw {}  transfer {} ({} across cells); refused for funds {}",
        kind("balance"),
        kind("deposit"),
        kind("withdraw"),
        kind("transfer"),
        n(s.cross_cell_transfers),
        n(s.refused_for_funds)
    );
    match &s.money {
        Some(m) => println!(
            "  money      before {} + deposits {} - withdrawals {} = {}; after {}: {}",
            thousands(m.before),
            thousands(s.deposits),
            thousands(s.withdrawals),
            thousands(m.expected),
            thousands(m.after),
            if m.conserved {
                "conserved"
            } else {
                "NOT CONSERVED"
            }
        ),
        None => println!("  money      not checked (--no-check)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-1000), "-1,000");
        assert!((percentile(&[1000, 2000, 3000], 0.5) - 2.0).abs() < 1e-9);
        assert!((percentile(&[], 0.5)).abs() < 1e-9);
    }
}
