//! Cross-cell credits: the payer's cell debits the payer and writes an outbox
//! entry in one transaction; this sender delivers each entry as a credit
//! (`POST /internal/credits`, signed with the deployment's secret) straight
//! to an instance of the cell that owns the payee in this instance's shard
//! map, with that map's epoch, until the payee's cell answers. A stale map
//! is refused there (421) and the credit goes again once the map is newer.
//! At-least-once delivery plus an idempotent credit: exactly once.

use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::Bank;
use crate::db::Pending;

static WAKE: Notify = Notify::const_new();

/// Tells the sender there is something new (it also polls).
pub(crate) fn wake() {
    WAKE.notify_one();
}

/// Delivers the outbox until `stopped`.
pub(crate) async fn deliver(bank: std::sync::Arc<Bank>, mut stopped: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stopped.borrow() {
            return;
        }
        // The credits of shards this cell owns and may write (a fenced
        // shard's are delivered by whoever owns it after the switchover).
        let shards: Vec<u32> = bank
            .cell
            .view()
            .map(|view| {
                view.owned_shards()
                    .into_iter()
                    .filter(|s| view.owner(*s).is_some_and(|(_, fenced)| !fenced))
                    .collect()
            })
            .unwrap_or_default();
        let db = bank.db.clone();
        let pending = match tokio::task::spawn_blocking(move || db.pending(&shards, 64)).await {
            Ok(Ok(pending)) => pending,
            Ok(Err(e)) => {
                tracing::warn!("outbox: cannot read: {e:#}");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let mut failed = false;
        let mut waiting = false;
        for entry in &pending {
            // Only while this cell may write the payer's shard (it owns it,
            // it is not fenced, the lease holds), and only once the debit is
            // at the shard's standby: a failover must never keep a credit
            // whose debit it lost.
            let Ok(view) = bank.cell.check_write(entry.shard, None) else {
                waiting = true;
                continue;
            };
            if let Some(standby) = view.standby(entry.shard).map(str::to_owned)
                && standby != bank.cell.identity().cell
            {
                let db = bank.db.clone();
                let shard = entry.shard;
                let acked = tokio::task::spawn_blocking(move || db.acked(&standby, shard))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                if acked < entry.position {
                    waiting = true;
                    continue;
                }
            }
            match send(&bank, entry).await {
                Ok(()) => {
                    let db = bank.db.clone();
                    let key = entry.key.clone();
                    match tokio::task::spawn_blocking(move || db.delivered(&key)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(key = %entry.key, "outbox: cannot mark delivered: {e:#}")
                        }
                        Err(e) => {
                            tracing::warn!(key = %entry.key, "outbox: cannot mark delivered: {e}")
                        }
                    }
                }
                Err(e) => {
                    // One failing credit (its payee's cell is down) does not
                    // hold back the others.
                    if !failed {
                        tracing::warn!(key = %entry.key, payee = %entry.payee, "outbox: credit not delivered yet: {e}");
                    }
                    failed = true;
                }
            }
        }
        let wait = if failed {
            backoff = (backoff * 2).min(Duration::from_secs(5));
            backoff
        } else {
            backoff = Duration::from_millis(100);
            if waiting {
                // Credits whose debit is not at the standby yet: soon.
                Duration::from_millis(20)
            } else if pending.len() == 64 {
                Duration::ZERO
            } else {
                Duration::from_millis(200)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = WAKE.notified(), if !failed => {}
            _ = stopped.changed() => {}
        }
    }
}

/// Which instance of a cell the next credit tries (a failing one is not
/// tried twice in a row).
static NEXT_ENDPOINT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sends one credit; Ok once the payee's cell has applied it (now or before).
async fn send(bank: &Bank, entry: &Pending) -> Result<(), String> {
    const PATH: &str = "/internal/credits";
    let view = bank.cell.view().ok_or("no shard map yet")?;
    let shard = view
        .shard_of(&entry.payee)
        .ok_or_else(|| format!("payee {} has no shard", entry.payee))?;
    let (owner, _) = view
        .owner(shard)
        .ok_or_else(|| format!("shard {shard} has no owner"))?;
    let endpoints = view.endpoints(owner);
    if endpoints.is_empty() {
        return Err(format!("cell {owner} has no ready instance"));
    }
    let pick = NEXT_ENDPOINT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let address = endpoints[pick % endpoints.len()];
    let url = format!("http://{address}{PATH}");
    let body = serde_json::to_vec(&crate::CreditBody {
        payee: entry.payee.clone(),
        amount: entry.amount,
        transfer: entry.key.clone(),
        from: bank.cell.identity().cell.clone(),
    })
    .map_err(|e| e.to_string())?;
    let response = bank
        .http
        .post(&url)
        .header(
            crate::internal::SIGNATURE,
            bank.secret.sign("POST", PATH, &body),
        )
        .header("x-atoll-epoch", view.epoch())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    Err(format!("{url} answered {status}: {}", body.trim()))
}
