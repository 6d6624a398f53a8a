//! Replication of a cell's change log to the standby cells of its shards.
//!
//! Every write appends to the cell's log with a monotonically increasing
//! position. Replica 0 of the cell ships the log, in order, to an instance of
//! each standby cell: the entries of the shards that cell stands by for, up
//! to a position; the standby applies them in one transaction and answers
//! with the position it has applied, which the source records. Shipments
//! are signed with the deployment's secret (see `internal`): a standby
//! applies none it cannot verify. `GET /internal/replication/positions`
//! reports, per shard, the last position written and the position the
//! standby has acknowledged: what a switchover's sync gate compares. The
//! same positions go to the control plane on the config stream
//! ([`Positions`], through the SDK), which is where the sync gate reads
//! them; the route serves people and older control planes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::db::LogEntry;
use crate::{Bank, problem};

/// Entries per shipment.
const BATCH: usize = 512;

/// How often an idle shipper looks for new entries (writes of its own
/// process wake it at once).
const IDLE_LOOK: Duration = Duration::from_millis(10);

static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Tells the shipper (in this process) that a write waits for it.
pub(crate) fn wake() {
    WAKE.notify_one();
}

/// A shipment from a source cell to a standby.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Shipment {
    /// The source cell.
    source: String,
    /// The source's shard map epoch when it shipped: the standby takes over
    /// a shard from the copy shipped at the highest epoch.
    #[serde(default)]
    epoch: u64,
    /// The shards this standby stands by for, each with the position the
    /// source believes the standby has applied.
    shards: BTreeMap<u32, i64>,
    /// Every entry of these shards up to here is in `entries` or was
    /// applied before.
    up_to: i64,
    entries: Vec<LogEntry>,
}

/// What a standby answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Applied {
    /// Per shard, the position applied now.
    applied: BTreeMap<u32, i64>,
}

/// Ships the log to the standbys until `stopped`.
pub(crate) async fn ship(bank: Arc<Bank>, mut stopped: watch::Receiver<bool>) {
    let mut next_endpoint = 0usize;
    loop {
        let mut busy = false;
        if let Some(view) = bank.cell.view() {
            // Standby cell -> the shards it stands by for, among the shards
            // this cell owns (fenced ones included: the sync gate waits for
            // them). Only a shard's owner ships it, so a standby's copy of a
            // shard always comes from the cell that last wrote it.
            let mut standbys: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            for shard in view.owned_shards() {
                if let Some(standby) = view.standby(shard)
                    && standby != bank.cell.identity().cell
                {
                    standbys.entry(standby.to_owned()).or_default().push(shard);
                }
            }
            let db = bank.db.clone();
            let state = tokio::task::spawn_blocking(move || {
                Ok::<_, anyhow::Error>((db.acks()?, db.position()?))
            })
            .await;
            let (acks, position) = match state {
                Ok(Ok(state)) => state,
                Ok(Err(e)) => {
                    tracing::warn!("replication: cannot read the log: {e:#}");
                    (BTreeMap::new(), 0)
                }
                Err(_) => (BTreeMap::new(), 0),
            };
            for (standby, shards) in &standbys {
                let believed: BTreeMap<u32, i64> = shards
                    .iter()
                    .map(|s| (*s, acks.get(&(standby.clone(), *s)).copied().unwrap_or(0)))
                    .collect();
                let cursor = believed.values().copied().min().unwrap_or(0);
                if cursor >= position {
                    continue;
                }
                let db = bank.db.clone();
                let entries =
                    match tokio::task::spawn_blocking(move || db.log_after(cursor, BATCH)).await {
                        Ok(Ok(entries)) => entries,
                        _ => continue,
                    };
                let Some(up_to) = entries.last().map(|e| e.position) else {
                    continue;
                };
                let entries: Vec<LogEntry> = entries
                    .into_iter()
                    .filter(|e| {
                        believed
                            .get(&e.shard)
                            .is_some_and(|done| e.position > *done)
                    })
                    .collect();
                let endpoints = view.endpoints(standby);
                if endpoints.is_empty() {
                    tracing::debug!(%standby, "replication: the standby has no ready instance");
                    continue;
                }
                next_endpoint = next_endpoint.wrapping_add(1);
                let address = endpoints[next_endpoint % endpoints.len()];
                let shipment = Shipment {
                    source: bank.cell.identity().cell.clone(),
                    epoch: view.epoch(),
                    shards: believed,
                    up_to,
                    entries,
                };
                match send(&bank, address, &shipment).await {
                    Ok(applied) => {
                        let db = bank.db.clone();
                        let standby = standby.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || db.set_acks(&standby, &applied))
                                .await;
                        bank.cell.positions_changed();
                        busy |= up_to < position;
                    }
                    Err(e) => tracing::warn!(%standby, %address, "replication: {e}"),
                }
            }
        }
        // Writes of other instances of the cell wait for this shipper too:
        // look again soon (a query of the log's end is cheap).
        let wait = if busy { Duration::ZERO } else { IDLE_LOOK };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = WAKE.notified() => {}
            _ = stopped.changed() => return,
        }
    }
}

/// Sends a shipment; the standby's applied positions (also when it reports
/// a gap: then the next shipment starts from what it really has).
async fn send(
    bank: &Bank,
    address: &str,
    shipment: &Shipment,
) -> Result<BTreeMap<u32, i64>, String> {
    const PATH: &str = "/internal/replication/apply";
    let url = format!("http://{address}{PATH}");
    let body = serde_json::to_vec(shipment).map_err(|e| e.to_string())?;
    let response = bank
        .http
        .post(&url)
        .header(
            crate::internal::SIGNATURE,
            bank.secret.sign("POST", PATH, &body),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("{url} answered {status}: {e}"))?;
    if status.is_success() || (status == StatusCode::CONFLICT && body["error"] == "gap") {
        let applied: Applied = serde_json::from_value(body.clone())
            .map_err(|e| format!("{url} answered {body}: {e}"))?;
        if !status.is_success() {
            tracing::warn!(standby = %address, "replication: the standby has less than was acknowledged; resending from what it has: {:?}", applied.applied);
        }
        return Ok(applied.applied);
    }
    Err(format!("{url} answered {status}: {body}"))
}

/// `POST /internal/replication/apply`: applies a shipment as the standby.
pub(crate) async fn apply(
    State(bank): State<Arc<Bank>>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(problem) = bank.secret.verify(&headers, "POST", uri.path(), &body) {
        return problem.into_response();
    }
    let shipment: Shipment = match serde_json::from_slice(&body) {
        Ok(shipment) => shipment,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "badShipment",
                format!("not a replication shipment: {e}"),
            );
        }
    };
    let Some(view) = bank.cell.view() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no shard map yet; retry",
        );
    };
    let me = &bank.cell.identity().cell;
    if &shipment.source == me {
        return problem(
            StatusCode::CONFLICT,
            "badShipment",
            "a cell does not replicate to itself",
        );
    }
    let listed = shipment.shards.keys().copied();
    if let Some(shard) = listed
        .chain(shipment.entries.iter().map(|e| e.shard))
        .find(|s| view.standby(*s) != Some(me.as_str()))
    {
        return problem(
            StatusCode::CONFLICT,
            "notStandby",
            format!(
                "cell {me} is not the standby of shard {shard} (it is {}); the sender's shard map differs, retry",
                view.standby(shard).unwrap_or("none")
            ),
        );
    }
    let db = bank.db.clone();
    let result = tokio::task::spawn_blocking(move || {
        db.apply_replica(
            &shipment.source,
            shipment.epoch,
            &shipment.shards,
            shipment.up_to,
            &shipment.entries,
        )
    })
    .await;
    match result {
        Ok(Ok(Ok(applied))) => (StatusCode::OK, axum::Json(Applied { applied })).into_response(),
        Ok(Ok(Err(applied))) => (
            StatusCode::CONFLICT,
            axum::Json(json!({
                "error": "gap",
                "message": "this standby has applied less than the shipment assumes; send from `applied`",
                "applied": applied,
            })),
        )
            .into_response(),
        Ok(Err(e)) if e.is::<crate::db::NotStandby>() => {
            problem(StatusCode::CONFLICT, "notStandby", e.to_string())
        }
        Ok(Err(e)) => problem(StatusCode::BAD_REQUEST, "badShipment", e.to_string()),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    }
}

/// `GET /internal/replication/positions`.
pub(crate) async fn positions(State(bank): State<Arc<Bank>>) -> Response {
    let Some(view) = bank.cell.view() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no shard map yet; retry",
        );
    };
    let db = bank.db.clone();
    let state = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>((db.position()?, db.written()?, db.acks()?, db.applied()?))
    })
    .await;
    let (position, written, acks, applied) = match state {
        Ok(Ok(state)) => state,
        Ok(Err(e)) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    };
    let shards: Vec<serde_json::Value> = view
        .owned_shards()
        .into_iter()
        .map(|shard| {
            let written = written.get(&shard).copied().unwrap_or(0);
            let standby = view.standby(shard);
            let acknowledged = standby
                .and_then(|s| acks.get(&(s.to_owned(), shard)).copied())
                .unwrap_or(0);
            json!({
                "shard": shard,
                "written": written,
                "standby": standby,
                "acknowledged": acknowledged,
                "caughtUp": standby.is_some() && acknowledged >= written,
            })
        })
        .collect();
    let body = json!({
        "cell": bank.cell.identity().cell,
        "epoch": view.epoch(),
        "position": position,
        "shards": shards,
        "applied": applied,
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The positions the SDK reports on the config stream.
pub(crate) struct Positions {
    pub(crate) db: Arc<crate::db::Db>,
}

impl atoll_sdk::PositionSource for Positions {
    fn read(&self, view: Arc<atoll_sdk::View>) -> atoll_sdk::PositionsRead<'_> {
        let db = self.db.clone();
        Box::pin(async move {
            let owned = view.owned_shards();
            let (written, acks) = tokio::task::spawn_blocking(move || {
                Ok::<_, anyhow::Error>((db.written_of_shards(&owned)?, db.acks()?))
            })
            .await
            .map_err(|e| format!("positions task: {e}"))?
            .map_err(|e| format!("cannot read the log: {e:#}"))?;
            Ok(view
                .owned_shards()
                .into_iter()
                .map(|shard| {
                    let standby = view.standby(shard).map(str::to_owned);
                    atoll_sdk::ShardReport {
                        shard,
                        written: written.get(&shard).copied().unwrap_or(0),
                        acknowledged: standby
                            .as_ref()
                            .and_then(|s| acks.get(&(s.clone(), shard)).copied())
                            .unwrap_or(0),
                        standby,
                    }
                })
                .collect())
        })
    }
}
