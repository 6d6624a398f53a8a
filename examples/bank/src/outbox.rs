//! Cross-cell credits: the payer's cell debits the payer and writes an outbox
//! entry in one transaction; this sender delivers each entry as a credit to
//! the payee's cell, through the gateway with the payee's key, under the
//! idempotency key `transfer/<payer>/<transfer key>`, until the payee's cell
//! answers.
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

/// Sends one credit; Ok once the payee's cell has applied it (now or before).
async fn send(bank: &Bank, entry: &Pending) -> Result<(), String> {
    let path = format!("/accounts/{}/credit", entry.payee);
    let (url, epoch) = match &bank.gateway {
        Some(gateway) => (format!("{}{path}", gateway.trim_end_matches('/')), None),
        // Without a gateway, straight to an instance of the owning cell.
        None => {
            let view = bank.cell.view().ok_or("no shard map yet")?;
            let shard = view.shard_of(&entry.payee).ok_or("payee has no shard")?;
            let (owner, _) = view.owner(shard).ok_or("shard has no owner")?;
            let address = *view
                .endpoints(owner)
                .first()
                .ok_or_else(|| format!("cell {owner} has no endpoints"))?;
            (format!("http://{address}{path}"), Some(view.epoch()))
        }
    };
    let mut request = bank
        .http
        .post(&url)
        .header(
            "idempotency-key",
            format!("{}{}", crate::CREDIT_KEY_PREFIX, entry.key),
        )
        .json(&serde_json::json!({"amount": entry.amount, "from": bank.cell.identity().cell}));
    if let Some(epoch) = epoch {
        request = request.header("x-atoll-epoch", epoch);
    }
    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    Err(format!("{url} answered {status}: {}", body.trim()))
}
