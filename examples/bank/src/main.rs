//! `atoll-bank`: Atoll's demo bank, a unitized service written the way Atoll
//! wants users to write one. See `docs/bank.md`.
//!
//! Run under an Atoll agent, which sets `ATOLL_*` in the environment: the
//! instance follows the control plane with `atoll-sdk`, serves the users of
//! the shards its cell owns, refuses writes routed by a stale map, replicates
//! its cell's changes to the standby cells, and delivers cross-cell credits
//! exactly once through the gateway.

mod db;
mod outbox;
mod replication;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use atoll_sdk::{Activation, Cell, Identity, Ownership, Refused, View};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::db::{Db, Operation};

/// The most a single operation may move (a guard against typos, not a
/// business rule).
const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// How the Idempotency-Key of a credit between cells starts.
pub(crate) const CREDIT_KEY_PREFIX: &str = "transfer/";

/// What every handler shares.
pub(crate) struct Bank {
    pub(crate) cell: Cell,
    pub(crate) db: Arc<Db>,
    pub(crate) http: reqwest::Client,
    /// The zone's gateway, for cross-cell credits.
    pub(crate) gateway: Option<String>,
    /// Acknowledge a write only once the shard's standby has it
    /// (`BANK_REPLICATION=sync`, the default): a lost cell then loses no
    /// acknowledged write.
    pub(crate) synchronous: bool,
}

/// How long a write waits for its standby before it is answered 503 (it is
/// committed; a retry with the same key is answered once it is replicated).
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

type Shared = Arc<Bank>;

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| {
        anyhow::anyhow!("{name} is not set; atoll-bank runs under an Atoll agent, which sets ATOLL_* (see docs/bank.md)")
    })
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Before this instance serves a new shard map: takes over the data of
/// shards the cell now owns from what replication brought (see
/// [`Db::take_over`]). Writes wait meanwhile; the control plane hears of the
/// new map only after this.
struct TakeOverShards {
    db: Arc<Db>,
}

impl Ownership for TakeOverShards {
    fn prepare(&self, _current: Option<Arc<View>>, next: Arc<View>) -> Activation<'_> {
        let db = self.db.clone();
        Box::pin(async move {
            let owned = next.owned_shards();
            let epoch = next.epoch();
            let done = tokio::task::spawn_blocking(move || db.take_over(&owned, epoch))
                .await
                .map_err(|e| format!("take-over task: {e}"))?
                .map_err(|e| format!("cannot take over the shards this cell now owns: {e:#}"))?;
            for t in done {
                tracing::info!(shard = t.shard, source = %t.source, accounts = t.accounts, requests = t.requests, credits = t.credits, epoch, "took over a shard from its replicated copy");
            }
            Ok(())
        })
    }
}

async fn run() -> anyhow::Result<()> {
    let identity = Identity::from_env().map_err(|e| anyhow::anyhow!(e))?;
    let port: u16 = env("ATOLL_PORT")?
        .parse()
        .map_err(|e| anyhow::anyhow!("ATOLL_PORT is not a port number: {e}"))?;
    let host = std::env::var("ATOLL_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let address: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| anyhow::anyhow!("ATOLL_HOST `{host}` is not an IP address: {e}"))?;
    let data = PathBuf::from(env("ATOLL_DATA_DIR")?);
    let replica: u32 = std::env::var("ATOLL_REPLICA")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let gateway = std::env::var("ATOLL_GATEWAY_URL")
        .ok()
        .filter(|g| !g.is_empty());
    let synchronous = match std::env::var("BANK_REPLICATION").as_deref() {
        Err(_) | Ok("sync") => true,
        Ok("async") => false,
        Ok(other) => anyhow::bail!("BANK_REPLICATION is `{other}`; use sync or async"),
    };

    let path = data.join("bank.db");
    let db = Arc::new(tokio::task::spawn_blocking(move || Db::open(&path)).await??);
    let (stop, stopped) = watch::channel(false);
    let cell = Cell::start_with(
        identity.clone(),
        stopped.clone(),
        Arc::new(TakeOverShards { db: db.clone() }),
    );
    let bank = Arc::new(Bank {
        cell,
        db,
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()?,
        gateway,
        synchronous,
    });
    // One instance per cell ships the cell's log and its outbox; the others
    // only serve. A crashed replica 0 is restarted by its agent.
    if replica == 0 {
        tokio::spawn(replication::ship(bank.clone(), stopped.clone()));
        tokio::spawn(outbox::deliver(bank.clone(), stopped.clone()));
    }

    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/accounts/{user}", get(balance))
        .route("/accounts/{user}/{operation}", post(write))
        .route("/replication/positions", get(replication::positions))
        .route("/replication/apply", post(replication::apply))
        .route("/totals", get(totals))
        .with_state(bank.clone());
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))?;
    tracing::info!(%address, cell = %identity.cell, instance = %identity.instance, replica, "atoll-bank serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            terminated().await;
            let _ = stop.send(true);
        })
        .await?;
    Ok(())
}

async fn terminated() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A JSON error answer: what went wrong and what to do.
#[derive(Debug)]
pub(crate) struct Problem {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        response
    }
}

/// A JSON error answer.
pub(crate) fn problem(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response {
    fail(status, code, message).into_response()
}

fn fail(status: StatusCode, code: &'static str, message: impl Into<String>) -> Problem {
    Problem {
        status,
        code,
        message: message.into(),
    }
}

fn answer(bank: &Bank, status: StatusCode, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(cell) = HeaderValue::from_str(&bank.cell.identity().cell) {
        response.headers_mut().insert("x-bank-cell", cell);
    }
    response
}

fn refusal(refused: Refused) -> Problem {
    let (status, code) = match &refused {
        Refused::NotReady | Refused::Fenced { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        Refused::NotOwner { .. } => (StatusCode::MISDIRECTED_REQUEST, "notOwner"),
        Refused::StaleEpoch { .. } => (StatusCode::MISDIRECTED_REQUEST, "staleEpoch"),
        Refused::NoLease { .. } => (StatusCode::SERVICE_UNAVAILABLE, "noLease"),
    };
    fail(
        status,
        code,
        format!("{refused}; retry with the same Idempotency-Key"),
    )
}

async fn healthz(State(bank): State<Shared>) -> Response {
    match bank.cell.view() {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the shard map\n",
        )
            .into_response(),
    }
}

/// The shard of `user`, or an answer saying why it has none.
fn shard_of(bank: &Bank, user: &str) -> Result<u32, Problem> {
    let view = bank.cell.view().ok_or_else(|| refusal(Refused::NotReady))?;
    view.shard_of(user).ok_or_else(|| {
        fail(
            StatusCode::BAD_REQUEST,
            "badUser",
            format!(
                "user id `{user}` has no shard under the shard rule (user ids are decimal numbers)"
            ),
        )
    })
}

fn epoch_of(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    match headers.get("x-atoll-epoch") {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                fail(
                    StatusCode::BAD_REQUEST,
                    "badEpoch",
                    "x-atoll-epoch must be a decimal number",
                )
            }),
    }
}

async fn balance(State(bank): State<Shared>, Path(user): Path<String>) -> Response {
    let shard = match shard_of(&bank, &user) {
        Ok(shard) => shard,
        Err(problem) => return problem.into_response(),
    };
    // Reads are served by the owner too: another cell's copy may be behind.
    if let Err(refused) = bank.cell.check_write(shard, None) {
        return refusal(refused).into_response();
    }
    let db = bank.db.clone();
    let name = user.clone();
    match tokio::task::spawn_blocking(move || db.balance(&name)).await {
        Ok(Ok(balance)) => answer(
            &bank,
            StatusCode::OK,
            json!({"user": user, "balance": balance, "shard": shard, "cell": bank.cell.identity().cell}),
        ),
        Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    }
}

/// The body of a write.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    amount: i64,
    #[serde(default)]
    to: Option<String>,
    /// The paying cell, on credits (informational).
    #[serde(default)]
    from: Option<String>,
}

async fn write(
    State(bank): State<Shared>,
    Path((user, operation)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|k| k.to_str().ok())
        .filter(|k| !k.is_empty())
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "missingIdempotencyKey",
            "every write needs an Idempotency-Key header (a unique string per intended operation; reuse it to retry)",
        );
    };
    if key.len() > 200 {
        return problem(
            StatusCode::BAD_REQUEST,
            "badIdempotencyKey",
            "Idempotency-Key may be at most 200 bytes",
        );
    }
    // Credits between cells carry `transfer/<payer>/<key>`; no other write may.
    if key.starts_with(CREDIT_KEY_PREFIX) != (operation == "credit") {
        return problem(
            StatusCode::BAD_REQUEST,
            "badIdempotencyKey",
            format!(
                "keys starting with `{CREDIT_KEY_PREFIX}` are reserved for, and required on, credits between cells"
            ),
        );
    }
    let request: WriteBody = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "badBody",
                format!(
                    "the body must be JSON like {{\"amount\": 100}} (transfers add \"to\": \"<user>\"): {e}"
                ),
            );
        }
    };
    if request.amount <= 0 || request.amount > MAX_AMOUNT {
        return problem(
            StatusCode::BAD_REQUEST,
            "badAmount",
            format!(
                "amount must be a whole number from 1 to {MAX_AMOUNT}, not {}",
                request.amount
            ),
        );
    }
    let shard = match shard_of(&bank, &user) {
        Ok(shard) => shard,
        Err(problem) => return problem.into_response(),
    };
    let epoch = match epoch_of(&headers) {
        Ok(epoch) => epoch,
        Err(problem) => return problem.into_response(),
    };
    // Held until the write is committed: the next shard map does not take
    // effect in this instance (nor is it acknowledged) while it is held.
    let permit = match bank.cell.admit_write(shard, epoch).await {
        Ok(permit) => permit,
        Err(refused) => return refusal(refused).into_response(),
    };
    let view = permit.view().clone();
    let amount = request.amount;
    let (operation, fingerprint) = match (operation.as_str(), request.to) {
        ("deposit", None) => (
            Operation::Deposit {
                user: user.clone(),
                amount,
            },
            format!("deposit {user} {amount}"),
        ),
        ("withdraw", None) => (
            Operation::Withdraw {
                user: user.clone(),
                amount,
            },
            format!("withdraw {user} {amount}"),
        ),
        ("credit", None) => {
            let _ = request.from;
            (
                Operation::Credit {
                    user: user.clone(),
                    amount,
                },
                format!("credit {user} {amount}"),
            )
        }
        ("transfer", Some(to)) => {
            if to == user {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "badTransfer",
                    "a transfer needs two different users",
                );
            }
            let Some(to_shard) = view.shard_of(&to) else {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "badUser",
                    format!(
                        "payee `{to}` has no shard under the shard rule (user ids are decimal numbers)"
                    ),
                );
            };
            let fingerprint = format!("transfer {user} {to} {amount}");
            // A payee whose shard is fenced (moving) is credited like one in
            // another cell: through the gateway, once its owner takes writes.
            if view.owner(to_shard) == Some((bank.cell.identity().cell.as_str(), false)) {
                (
                    Operation::TransferLocal {
                        from: user.clone(),
                        to,
                        to_shard,
                        amount,
                    },
                    fingerprint,
                )
            } else {
                (
                    Operation::TransferRemote {
                        from: user.clone(),
                        to,
                        amount,
                    },
                    fingerprint,
                )
            }
        }
        ("transfer", None) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "badBody",
                "a transfer needs \"to\": the payee's user id",
            );
        }
        ("deposit" | "withdraw" | "credit", Some(_)) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "badBody",
                format!("\"to\" is only for transfers, not {operation}"),
            );
        }
        (other, _) => {
            return problem(
                StatusCode::NOT_FOUND,
                "unknownOperation",
                format!("`{other}` is not an operation; use deposit, withdraw, transfer or credit"),
            );
        }
    };
    let db = bank.db.clone();
    // Keys are per user (as a payment API scopes them per account), so two
    // users' clients never collide, and a credit's key names its payer.
    let key = format!("{user}/{key}");
    let remote = matches!(operation, Operation::TransferRemote { .. });
    // Every shard the write changes: its answer waits for each one's standby.
    let touched: Vec<u32> = match &operation {
        Operation::TransferLocal { to_shard, .. } if *to_shard != shard => vec![shard, *to_shard],
        _ => vec![shard],
    };
    let until = permit.lease_until();
    let outcome = match tokio::task::spawn_blocking(move || {
        db.apply_until(&key, &fingerprint, shard, &operation, until)
    })
    .await
    {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => {
            return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string());
        }
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    };
    drop(permit);
    // Synchronous replication: the answer waits until the shard's standby
    // holds everything written to the shard so far (this write included, or
    // the first answer to it, for a replay).
    if bank.synchronous && outcome.status != 422 && outcome.status != 503 {
        for shard in touched {
            if let Some(standby) = view.standby(shard).map(str::to_owned)
                && standby != bank.cell.identity().cell
                && let Err(problem) = replicated(&bank, &standby, shard).await
            {
                return problem.into_response();
            }
        }
    }
    if remote && !outcome.replayed {
        outbox::wake();
    }
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = answer(&bank, status, outcome.body);
    if outcome.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Waits until `standby` acknowledged every position written to `shard`.
async fn replicated(bank: &Bank, standby: &str, shard: u32) -> Result<(), Problem> {
    let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
    let db = bank.db.clone();
    let written = tokio::task::spawn_blocking(move || db.written_of(shard))
        .await
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()))?
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()))?;
    loop {
        let db = bank.db.clone();
        let standby_name = standby.to_owned();
        let acked = tokio::task::spawn_blocking(move || db.acked(&standby_name, shard))
            .await
            .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()))?
            .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()))?;
        if acked >= written {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "notReplicated",
                format!(
                    "the write is committed but standby {standby} has not confirmed it within {}s (it holds position {acked} of {written}); retry with the same Idempotency-Key",
                    SYNC_TIMEOUT.as_secs()
                ),
            ));
        }
        replication::wake();
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
}

async fn totals(State(bank): State<Shared>) -> Response {
    let Some(view) = bank.cell.view() else {
        return refusal(Refused::NotReady).into_response();
    };
    let owned = view.owned_shards();
    let db = bank.db.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        Ok(json!({
            "epoch": view.epoch(),
            "shards": owned.len(),
            "balances": db.total(&owned)?,
            "inFlight": db.in_flight(&owned)?,
            "position": db.position()?,
            "replicas": db.replica_totals()?,
        }))
    })
    .await;
    match result {
        Ok(Ok(mut body)) => {
            body["cell"] = json!(bank.cell.identity().cell);
            answer(&bank, StatusCode::OK, body)
        }
        Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    }
}
