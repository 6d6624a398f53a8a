//! `atoll-bank`: Atoll's demo bank, a unitized service written the way Atoll
//! wants users to write one. See `docs/bank.md`.
//!
//! Run under an Atoll agent, which sets `ATOLL_*` in the environment: the
//! instance follows the control plane with `atoll-sdk`, serves the users of
//! the shards its cell owns, refuses writes routed by a stale map, replicates
//! its cell's changes to the standby cells, and delivers cross-cell credits
//! exactly once, straight to an instance of the payee's cell, signed with
//! the deployment's shared secret (see `internal`).

mod db;
mod internal;
mod outbox;
mod replication;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use atoll_sdk::{Activation, Cell, Identity, Ownership, Refused, View};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::db::{Db, Operation};

/// The most a single operation may move (a guard against typos, not a
/// business rule).
const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// How the idempotency key of a credit between cells starts (in the
/// payee's records: `<payee>/transfer/<payer>/<transfer key>`). Clients may
/// not use keys that start with it.
pub(crate) const CREDIT_KEY_PREFIX: &str = "transfer/";

/// The most digits a user id may have.
const MAX_USER_DIGITS: usize = 64;

/// The most request headers an instance accepts: more than the gateway
/// passes on (100 of the client's and the few it adds), so that a request
/// the gateway accepted is never refused here for its header count.
const MAX_HEADERS: usize = 128;

/// What every handler shares.
pub(crate) struct Bank {
    pub(crate) cell: Cell,
    pub(crate) db: Arc<Db>,
    pub(crate) http: reqwest::Client,
    /// Signs and verifies calls between instances.
    pub(crate) secret: internal::Secret,
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
    let secret = internal::Secret::from_env()?;
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
        secret,
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
        .route("/totals", get(totals))
        // Called by other instances (signed) and the control plane's
        // replication probe; no public route leads here.
        .route("/internal/credits", post(credit))
        .route(
            "/internal/replication/positions",
            get(replication::positions),
        )
        .route("/internal/replication/apply", post(replication::apply))
        .with_state(bank.clone());
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e}"))?;
    // The sync gate of a switchover reads these on the config stream.
    bank.cell.report_positions(Arc::new(replication::Positions {
        db: bank.db.clone(),
    }));
    tracing::info!(%address, cell = %identity.cell, instance = %identity.instance, replica, "atoll-bank serving");
    serve(listener, app, async move {
        terminated().await;
        let _ = stop.send(true);
    })
    .await;
    Ok(())
}

/// Serves `app` on `listener` until `stop` resolves, then lets open
/// requests finish (for up to 10 s). Hyper directly rather than
/// `axum::serve`, for its header limit ([`MAX_HEADERS`]).
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .max_headers(MAX_HEADERS);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open 10 s after the stop; closing them");
    }
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

/// The one form of a user id: decimal digits without a sign, without
/// leading zeros (`01205` is user `1205`, as the gateway's `decimalSuffix`
/// and `mod` rules read it: docs/sharding.md), and its shard. An id whose
/// shard would change with the leading zeros (a `hash` rule reads the bytes
/// as they are) is refused rather than given a second account.
fn canonical_user(view: &View, what: &str, raw: &str) -> Result<(String, u32), Problem> {
    let bad = |why: String| fail(StatusCode::BAD_REQUEST, "badUser", why);
    if raw.is_empty() || raw.len() > MAX_USER_DIGITS || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!(
            "{what} `{}` is not a user id: user ids are 1 to {MAX_USER_DIGITS} decimal digits, without a sign or spaces",
            raw.escape_debug()
        )));
    }
    let trimmed = raw.trim_start_matches('0');
    let canonical = if trimmed.is_empty() { "0" } else { trimmed };
    let shard = view.shard_of(canonical).ok_or_else(|| {
        bad(format!(
            "{what} `{canonical}` has no shard under the shard rule"
        ))
    })?;
    if canonical != raw && view.shard_of(raw) != Some(shard) {
        return Err(bad(format!(
            "{what} `{raw}` is written with leading zeros, which this shard rule does not ignore; write it as `{canonical}`"
        )));
    }
    Ok((canonical.to_owned(), shard))
}

/// The canonical form and shard of `user`, or an answer saying why it has
/// none.
fn shard_of(bank: &Bank, user: &str) -> Result<(String, u32), Problem> {
    let view = bank.cell.view().ok_or_else(|| refusal(Refused::NotReady))?;
    canonical_user(&view, "user id", user)
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
    let (user, shard) = match shard_of(&bank, &user) {
        Ok(found) => found,
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

/// The body of a deposit, withdrawal or transfer: a JSON object with these
/// fields only.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    amount: i64,
    #[serde(default)]
    to: Option<String>,
}

/// The body of a credit between cells (`POST /internal/credits`, signed).
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreditBody {
    /// Who is credited.
    pub(crate) payee: String,
    pub(crate) amount: i64,
    /// The transfer this credit completes: `<payer>/<the payer's key>`.
    pub(crate) transfer: String,
    /// The paying cell (for the logs).
    pub(crate) from: String,
}

/// Parses a request body: a JSON object of `T`'s fields, nothing else (an
/// array in the same order is not accepted, nor a field given twice).
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], example: &str) -> Result<T, Problem> {
    let bad = |why: String| {
        fail(
            StatusCode::BAD_REQUEST,
            "badBody",
            format!("the body must be a JSON object like {example}: {why}"),
        )
    };
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(bad("it is not an object".into()));
    }
    serde_json::from_slice(body).map_err(|e| bad(e.to_string()))
}

fn check_amount(amount: i64) -> Result<(), Problem> {
    if amount <= 0 || amount > MAX_AMOUNT {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "badAmount",
            format!("amount must be a whole number from 1 to {MAX_AMOUNT}, not {amount}"),
        ));
    }
    Ok(())
}

/// `POST /accounts/{user}/{deposit|withdraw|transfer}`.
async fn write(
    State(bank): State<Shared>,
    Path((user, operation)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match try_write(&bank, &user, &operation, &headers, &body).await {
        Ok(response) | Err(response) => response,
    }
}

async fn try_write(
    bank: &Shared,
    user: &str,
    operation: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Response> {
    if !matches!(operation, "deposit" | "withdraw" | "transfer") {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "unknownOperation",
            format!(
                "`{}` is not an operation; use deposit, withdraw or transfer",
                operation.escape_debug()
            ),
        ));
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|k| k.to_str().ok())
        .filter(|k| !k.is_empty())
    else {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "missingIdempotencyKey",
            "every write needs an Idempotency-Key header (a unique string per intended operation; reuse it to retry)",
        ));
    };
    if key.len() > 200 {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "badIdempotencyKey",
            "Idempotency-Key may be at most 200 bytes",
        ));
    }
    if key.starts_with(CREDIT_KEY_PREFIX) {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "badIdempotencyKey",
            format!("Idempotency-Key may not start with `{CREDIT_KEY_PREFIX}` (reserved)"),
        ));
    }
    let request: WriteBody = parse_body(body, r#"{"amount": 100} (transfers add "to": "<user>")"#)
        .map_err(IntoResponse::into_response)?;
    check_amount(request.amount).map_err(IntoResponse::into_response)?;
    let (user, shard) = shard_of(bank, user).map_err(IntoResponse::into_response)?;
    let epoch = epoch_of(headers).map_err(IntoResponse::into_response)?;
    let amount = request.amount;
    let build = |view: &View| -> Result<(Operation, String), Problem> {
        Ok(match (operation, &request.to) {
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
            ("transfer", Some(to)) => {
                let (to, to_shard) = canonical_user(view, "payee", to)?;
                if to == user {
                    return Err(fail(
                        StatusCode::BAD_REQUEST,
                        "badTransfer",
                        "a transfer needs two different users",
                    ));
                }
                let fingerprint = format!("transfer {user} {to} {amount}");
                // A payee whose shard is fenced (moving) is credited like
                // one in another cell: once its owner takes writes.
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
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "badBody",
                    "a transfer needs \"to\": the payee's user id",
                ));
            }
            (other, _) => {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "badBody",
                    format!("\"to\" is only for transfers, not {other}"),
                ));
            }
        })
    };
    // Keys are per user (as a payment API scopes them per account), so two
    // users' clients never collide, and a credit's key names its payer.
    let key = format!("{user}/{key}");
    execute(bank, shard, epoch, key, build).await
}

/// `POST /internal/credits`: the credit leg of a transfer between cells,
/// sent (signed) by the payer's cell once the debit is at its standby.
async fn credit(State(bank): State<Shared>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    match try_credit(&bank, &uri, &headers, &body).await {
        Ok(response) | Err(response) => response,
    }
}

async fn try_credit(
    bank: &Shared,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Response> {
    bank.secret
        .verify(headers, "POST", uri.path(), body)
        .map_err(IntoResponse::into_response)?;
    let request: CreditBody = parse_body(
        body,
        r#"{"payee": "1070", "amount": 30, "transfer": "1001/tr-1", "from": "rz01"}"#,
    )
    .map_err(IntoResponse::into_response)?;
    check_amount(request.amount).map_err(IntoResponse::into_response)?;
    let (payee, shard) = shard_of(bank, &request.payee).map_err(IntoResponse::into_response)?;
    let Some((payer, transfer_key)) = request.transfer.split_once('/') else {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "badBody",
            "\"transfer\" is `<payer>/<the payer's Idempotency-Key>`",
        ));
    };
    if payer == payee || transfer_key.is_empty() || request.transfer.len() > 300 {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "badBody",
            "\"transfer\" must name another user and a key",
        ));
    }
    let epoch = epoch_of(headers).map_err(IntoResponse::into_response)?;
    let amount = request.amount;
    tracing::debug!(payee = %payee, amount, transfer = %request.transfer, from = %request.from, "credit");
    let key = format!("{payee}/{CREDIT_KEY_PREFIX}{}", request.transfer);
    execute(bank, shard, epoch, key, |_| {
        Ok((
            Operation::Credit {
                user: payee.clone(),
                amount,
            },
            format!("credit {payee} {amount}"),
        ))
    })
    .await
}

/// Admits a write to `shard` (ownership, fence, epoch, lease), applies what
/// `build` makes of it under the idempotency key `key`, and answers once
/// the shard's standby holds it.
async fn execute(
    bank: &Shared,
    shard: u32,
    epoch: Option<u64>,
    key: String,
    build: impl FnOnce(&View) -> Result<(Operation, String), Problem>,
) -> Result<Response, Response> {
    // Held until the write is committed: the next shard map does not take
    // effect in this instance (nor is it acknowledged) while it is held.
    let permit = bank
        .cell
        .admit_write(shard, epoch)
        .await
        .map_err(|refused| refusal(refused).into_response())?;
    let view = permit.view().clone();
    let (operation, fingerprint) = build(&view).map_err(IntoResponse::into_response)?;
    let db = bank.db.clone();
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
            return Err(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage",
                e.to_string(),
            ));
        }
        Err(e) => {
            return Err(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage",
                e.to_string(),
            ));
        }
    };
    drop(permit);
    bank.cell.positions_changed();
    // Synchronous replication: the answer waits until the shard's standby
    // holds everything written to the shard so far (this write included, or
    // the first answer to it, for a replay).
    if bank.synchronous && outcome.status != 422 && outcome.status != 503 {
        for shard in touched {
            if let Some(standby) = view.standby(shard).map(str::to_owned)
                && standby != bank.cell.identity().cell
            {
                replicated(bank, &standby, shard)
                    .await
                    .map_err(IntoResponse::into_response)?;
            }
        }
    }
    if remote && !outcome.replayed {
        outbox::wake();
    }
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = answer(bank, status, outcome.body);
    if outcome.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
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
