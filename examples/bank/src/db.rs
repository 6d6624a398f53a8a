//! The bank's storage: one SQLite file per cell (WAL, fsync on commit), shared
//! by the cell's instances. Every write is one transaction that records its
//! idempotency key and result, the new balances, and entries in the change
//! log that replication ships to the standby cell.

use std::collections::BTreeMap;
use std::path::Path;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A write the bank can apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    /// Adds money.
    Deposit { user: String, amount: i64 },
    /// Takes money, if there is enough.
    Withdraw { user: String, amount: i64 },
    /// Moves money to a user of this cell.
    TransferLocal {
        from: String,
        to: String,
        to_shard: u32,
        amount: i64,
    },
    /// Moves money to a user of another cell: debit here, credit delivered
    /// later through the outbox.
    TransferRemote {
        from: String,
        to: String,
        amount: i64,
    },
    /// The credit leg of a transfer from another cell.
    Credit { user: String, amount: i64 },
}

/// An entry of the change log (what the standby applies).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub(crate) enum Change {
    /// A user's balance now.
    Balance { user: String, balance: i64 },
    /// An applied request and its answer (so a retry after failover
    /// returns it instead of applying again).
    Request {
        key: String,
        /// What the request was (a reused key for another request gets 422).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        fingerprint: String,
        status: u16,
        body: Value,
    },
    /// A credit to deliver to another cell.
    Outbox {
        key: String,
        payee: String,
        amount: i64,
    },
    /// An outbox entry was delivered.
    Delivered { key: String },
}

/// One log entry with its position and shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogEntry {
    pub(crate) position: i64,
    pub(crate) shard: u32,
    pub(crate) change: Change,
}

/// An undelivered credit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) key: String,
    /// The payer's shard.
    pub(crate) shard: u32,
    pub(crate) payee: String,
    pub(crate) amount: i64,
    /// The log position of the debit: the credit goes out only once the
    /// shard's standby has it, or a failover could lose the debit after the
    /// credit was paid.
    pub(crate) position: i64,
}

/// The answer to a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) body: Value,
    /// Whether this was a replay of an earlier answer.
    pub(crate) replayed: bool,
}

#[derive(Debug)]
pub(crate) struct Db {
    connection: Mutex<Connection>,
}

fn error(e: rusqlite::Error) -> anyhow::Error {
    anyhow::anyhow!("sqlite: {e}")
}

/// Adds a column to a table that lacks it (a database from an older bank).
fn add_column(connection: &Connection, table: &str, column: &str, ty: &str) -> anyhow::Result<()> {
    let exists: bool = connection
        .query_row(
            &format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get(0),
        )
        .map_err(error)?;
    if !exists
        && let Err(e) =
            connection.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))
        // Another instance of the cell, opening the same file, was first.
        && !e.to_string().contains("duplicate column")
    {
        return Err(error(e));
    }
    Ok(())
}

/// The SQL list of shards, for `IN (...)` (shards are numbers).
fn shard_list(shards: &[u32]) -> String {
    let mut list = String::new();
    for (i, shard) in shards.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push_str(&shard.to_string());
    }
    list
}

/// A shipment for a shard this cell owns.
#[derive(Debug)]
pub(crate) struct NotStandby(pub(crate) String);

impl std::fmt::Display for NotStandby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotStandby {}

/// What [`Db::take_over`] did for one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TakeOver {
    pub(crate) shard: u32,
    /// The cell whose replicated data became this cell's.
    pub(crate) source: String,
    /// Accounts, requests and undelivered credits taken over.
    pub(crate) accounts: usize,
    pub(crate) requests: usize,
    pub(crate) credits: usize,
}

/// Promotes `source`'s replicated copy of `shard` to this cell's own data,
/// and logs the result (see [`Db::take_over`]).
fn take_over_shard(
    tx: &rusqlite::Transaction<'_>,
    shard: u32,
    source: &str,
) -> anyhow::Result<TakeOver> {
    let log = |change: &Change| -> anyhow::Result<()> {
        tx.execute(
            "INSERT INTO log (shard, entry) VALUES (?1, ?2)",
            params![shard, serde_json::to_string(change)?],
        )
        .map_err(error)?;
        Ok(())
    };
    tx.execute("DELETE FROM accounts WHERE shard = ?1", [shard])
        .map_err(error)?;
    tx.execute(
        "INSERT INTO accounts (user, shard, balance)
         SELECT user, shard, balance FROM replica_accounts WHERE source = ?1 AND shard = ?2
         ON CONFLICT(user) DO UPDATE SET shard = excluded.shard, balance = excluded.balance",
        params![source, shard],
    )
    .map_err(error)?;
    tx.execute(
        "INSERT OR REPLACE INTO requests (key, fingerprint, status, body)
         SELECT key, fingerprint, status, body FROM replica_requests WHERE source = ?1 AND shard = ?2",
        params![source, shard],
    )
    .map_err(error)?;
    tx.execute(
        "DELETE FROM outbox WHERE shard = ?1 AND delivered = 0",
        [shard],
    )
    .map_err(error)?;
    tx.execute(
        "INSERT INTO outbox (key, shard, payee, amount, delivered)
         SELECT key, shard, payee, amount, 0 FROM replica_outbox WHERE source = ?1 AND shard = ?2
         ON CONFLICT(key) DO UPDATE SET delivered = 0, payee = excluded.payee, amount = excluded.amount",
        params![source, shard],
    )
    .map_err(error)?;
    let accounts: Vec<(String, i64)> = {
        let mut statement = tx
            .prepare("SELECT user, balance FROM accounts WHERE shard = ?1 ORDER BY user")
            .map_err(error)?;
        let rows = statement
            .query_map([shard], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)?
    };
    for (user, balance) in &accounts {
        log(&Change::Balance {
            user: user.clone(),
            balance: *balance,
        })?;
    }
    let requests: Vec<(String, String, u16, String)> = {
        let mut statement = tx
            .prepare("SELECT key, fingerprint, status, body FROM replica_requests WHERE source = ?1 AND shard = ?2 ORDER BY key")
            .map_err(error)?;
        let rows = statement
            .query_map(params![source, shard], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)?
    };
    for (key, fingerprint, status, body) in &requests {
        log(&Change::Request {
            key: key.clone(),
            fingerprint: fingerprint.clone(),
            status: *status,
            body: serde_json::from_str(body).unwrap_or(Value::Null),
        })?;
    }
    let credits: Vec<(String, String, i64)> = {
        let mut statement = tx
            .prepare("SELECT key, payee, amount FROM outbox WHERE shard = ?1 AND delivered = 0 ORDER BY key")
            .map_err(error)?;
        let rows = statement
            .query_map([shard], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)?
    };
    for (key, payee, amount) in &credits {
        log(&Change::Outbox {
            key: key.clone(),
            payee: payee.clone(),
            amount: *amount,
        })?;
        tx.execute(
            "UPDATE outbox SET position = ?1 WHERE key = ?2",
            params![tx.last_insert_rowid(), key],
        )
        .map_err(error)?;
    }
    // The copy is this cell's data now; a stale copy must never come back.
    for table in ["replica_accounts", "replica_requests", "replica_outbox"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE source = ?1 AND shard = ?2"),
            params![source, shard],
        )
        .map_err(error)?;
    }
    Ok(TakeOver {
        shard,
        source: source.to_owned(),
        accounts: accounts.len(),
        requests: requests.len(),
        credits: credits.len(),
    })
}

impl Db {
    /// Opens (or creates) the cell's database.
    pub(crate) fn open(path: &Path) -> anyhow::Result<Db> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // The cell's instances start together and open one new file: the
        // switch to WAL can answer "database is locked" at once, without
        // waiting for the busy timeout. Try again for a few seconds.
        let mut attempt = 0;
        loop {
            match Self::open_once(path) {
                Ok(db) => return Ok(db),
                Err(e)
                    if attempt < 50
                        && (e.to_string().contains("locked") || e.to_string().contains("busy")) =>
                {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn open_once(path: &Path) -> anyhow::Result<Db> {
        let connection = Connection::open(path).map_err(error)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(10))
            .map_err(error)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS accounts (user TEXT PRIMARY KEY, shard INTEGER NOT NULL, balance INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, status INTEGER NOT NULL, body TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS log (position INTEGER PRIMARY KEY AUTOINCREMENT, shard INTEGER NOT NULL, entry TEXT NOT NULL);
                 CREATE INDEX IF NOT EXISTS log_shard ON log (shard, position);
                 CREATE TABLE IF NOT EXISTS outbox (key TEXT PRIMARY KEY, shard INTEGER NOT NULL, payee TEXT NOT NULL, amount INTEGER NOT NULL, delivered INTEGER NOT NULL DEFAULT 0, position INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE IF NOT EXISTS shard_acks (standby TEXT NOT NULL, shard INTEGER NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (standby, shard));
                 CREATE TABLE IF NOT EXISTS replica_accounts (source TEXT NOT NULL, user TEXT NOT NULL, shard INTEGER NOT NULL, balance INTEGER NOT NULL, PRIMARY KEY (source, user));
                 CREATE TABLE IF NOT EXISTS replica_requests (source TEXT NOT NULL, key TEXT NOT NULL, shard INTEGER NOT NULL, status INTEGER NOT NULL, body TEXT NOT NULL, fingerprint TEXT NOT NULL DEFAULT '', PRIMARY KEY (source, key));
                 CREATE TABLE IF NOT EXISTS replica_outbox (source TEXT NOT NULL, key TEXT NOT NULL, shard INTEGER NOT NULL, payee TEXT NOT NULL, amount INTEGER NOT NULL, PRIMARY KEY (source, key));
                 CREATE TABLE IF NOT EXISTS replica_shard_positions (source TEXT NOT NULL, shard INTEGER NOT NULL, position INTEGER NOT NULL, epoch INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (source, shard));
                 CREATE TABLE IF NOT EXISTS tenure (shard INTEGER PRIMARY KEY, epoch INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
            )
            .map_err(error)?;
        // Columns added after the first release of the schema.
        add_column(
            &connection,
            "replica_requests",
            "fingerprint",
            "TEXT NOT NULL DEFAULT ''",
        )?;
        add_column(
            &connection,
            "replica_shard_positions",
            "epoch",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        add_column(
            &connection,
            "outbox",
            "position",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        Ok(Db {
            connection: Mutex::new(connection),
        })
    }

    /// A user's balance (0 for an unknown user).
    pub(crate) fn balance(&self, user: &str) -> anyhow::Result<i64> {
        let connection = self.connection.lock();
        Ok(connection
            .query_row(
                "SELECT balance FROM accounts WHERE user = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()
            .map_err(error)?
            .unwrap_or(0))
    }

    /// Applies a write once: a key seen before returns its first answer, or
    /// 422 when it was first used for a different request (`fingerprint`).
    #[cfg(test)]
    pub(crate) fn apply(
        &self,
        key: &str,
        fingerprint: &str,
        shard: u32,
        operation: &Operation,
    ) -> anyhow::Result<Outcome> {
        self.apply_until(key, fingerprint, shard, operation, None)
    }

    /// [`Db::apply`], committing only before `until` (the end of the cell's
    /// ownership lease): a write that waited past it is rolled back and
    /// answered 503, so a cell whose lease lapsed never commits.
    pub(crate) fn apply_until(
        &self,
        key: &str,
        fingerprint: &str,
        shard: u32,
        operation: &Operation,
        until: Option<std::time::Instant>,
    ) -> anyhow::Result<Outcome> {
        let mut connection = self.connection.lock();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        let previous: Option<(String, u16, String)> = tx
            .query_row(
                "SELECT fingerprint, status, body FROM requests WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(error)?;
        if let Some((first, status, body)) = previous {
            // An empty fingerprint came from an older bank's log: unknown.
            if !first.is_empty() && first != fingerprint {
                return Ok(Outcome {
                    status: 422,
                    body: json!({
                        "error": "idempotencyKeyReused",
                        "message": format!("idempotency key `{key}` was first used for `{first}`, not `{fingerprint}`; use a new key for a new request"),
                    }),
                    replayed: true,
                });
            }
            return Ok(Outcome {
                status,
                body: serde_json::from_str(&body).unwrap_or(Value::Null),
                replayed: true,
            });
        }
        let log =
            |tx: &rusqlite::Transaction<'_>, shard: u32, change: &Change| -> anyhow::Result<()> {
                tx.execute(
                    "INSERT INTO log (shard, entry) VALUES (?1, ?2)",
                    params![shard, serde_json::to_string(change)?],
                )
                .map_err(error)?;
                Ok(())
            };
        let balance_of = |tx: &rusqlite::Transaction<'_>, user: &str| -> anyhow::Result<i64> {
            Ok(tx
                .query_row(
                    "SELECT balance FROM accounts WHERE user = ?1",
                    [user],
                    |r| r.get(0),
                )
                .optional()
                .map_err(error)?
                .unwrap_or(0))
        };
        let set = |tx: &rusqlite::Transaction<'_>,
                   user: &str,
                   shard: u32,
                   balance: i64|
         -> anyhow::Result<()> {
            tx.execute(
                "INSERT INTO accounts (user, shard, balance) VALUES (?1, ?2, ?3)
                 ON CONFLICT(user) DO UPDATE SET balance = excluded.balance",
                params![user, shard, balance],
            )
            .map_err(error)?;
            Ok(())
        };
        let (status, body) = match operation {
            Operation::Deposit { user, amount } | Operation::Credit { user, amount } => {
                let balance = balance_of(&tx, user)? + amount;
                set(&tx, user, shard, balance)?;
                log(
                    &tx,
                    shard,
                    &Change::Balance {
                        user: user.clone(),
                        balance,
                    },
                )?;
                (200, json!({"user": user, "balance": balance}))
            }
            Operation::Withdraw { user, amount } => {
                let balance = balance_of(&tx, user)?;
                if balance < *amount {
                    (
                        409,
                        json!({"error": "insufficientFunds", "message": format!("balance {balance} is less than {amount}"), "user": user, "balance": balance}),
                    )
                } else {
                    let balance = balance - amount;
                    set(&tx, user, shard, balance)?;
                    log(
                        &tx,
                        shard,
                        &Change::Balance {
                            user: user.clone(),
                            balance,
                        },
                    )?;
                    (200, json!({"user": user, "balance": balance}))
                }
            }
            Operation::TransferLocal {
                from,
                to,
                to_shard,
                amount,
            } => {
                let balance = balance_of(&tx, from)?;
                if balance < *amount {
                    (
                        409,
                        json!({"error": "insufficientFunds", "message": format!("balance {balance} is less than {amount}"), "user": from, "balance": balance}),
                    )
                } else {
                    let payer = balance - amount;
                    let payee = balance_of(&tx, to)? + amount;
                    set(&tx, from, shard, payer)?;
                    set(&tx, to, *to_shard, payee)?;
                    log(
                        &tx,
                        shard,
                        &Change::Balance {
                            user: from.clone(),
                            balance: payer,
                        },
                    )?;
                    log(
                        &tx,
                        *to_shard,
                        &Change::Balance {
                            user: to.clone(),
                            balance: payee,
                        },
                    )?;
                    (
                        200,
                        json!({"user": from, "balance": payer, "to": to, "delivered": true}),
                    )
                }
            }
            Operation::TransferRemote { from, to, amount } => {
                let balance = balance_of(&tx, from)?;
                if balance < *amount {
                    (
                        409,
                        json!({"error": "insufficientFunds", "message": format!("balance {balance} is less than {amount}"), "user": from, "balance": balance}),
                    )
                } else {
                    let payer = balance - amount;
                    set(&tx, from, shard, payer)?;
                    tx.execute(
                        "INSERT INTO outbox (key, shard, payee, amount) VALUES (?1, ?2, ?3, ?4)",
                        params![key, shard, to, amount],
                    )
                    .map_err(error)?;
                    log(
                        &tx,
                        shard,
                        &Change::Balance {
                            user: from.clone(),
                            balance: payer,
                        },
                    )?;
                    log(
                        &tx,
                        shard,
                        &Change::Outbox {
                            key: key.to_owned(),
                            payee: to.clone(),
                            amount: *amount,
                        },
                    )?;
                    // Delivered only once this position is replicated.
                    tx.execute(
                        "UPDATE outbox SET position = ?1 WHERE key = ?2",
                        params![tx.last_insert_rowid(), key],
                    )
                    .map_err(error)?;
                    (
                        200,
                        json!({"user": from, "balance": payer, "to": to, "delivered": false}),
                    )
                }
            }
        };
        tx.execute(
            "INSERT INTO requests (key, fingerprint, status, body) VALUES (?1, ?2, ?3, ?4)",
            params![key, fingerprint, status, body.to_string()],
        )
        .map_err(error)?;
        log(
            &tx,
            shard,
            &Change::Request {
                key: key.to_owned(),
                fingerprint: fingerprint.to_owned(),
                status,
                body: body.clone(),
            },
        )?;
        if until.is_some_and(|until| std::time::Instant::now() >= until) {
            // Dropping the transaction rolls it back.
            return Ok(Outcome {
                status: 503,
                body: json!({
                    "error": "noLease",
                    "message": "the cell's ownership lease ended before the write could commit; nothing was written; retry with the same Idempotency-Key",
                }),
                replayed: false,
            });
        }
        tx.commit().map_err(error)?;
        Ok(Outcome {
            status,
            body,
            replayed: false,
        })
    }

    /// Credits waiting to be delivered, oldest first.
    /// Undelivered credits of `shards` (the ones this cell owns and may
    /// write: a shard that moved away is its new owner's to deliver).
    pub(crate) fn pending(&self, shards: &[u32], limit: usize) -> anyhow::Result<Vec<Pending>> {
        let connection = self.connection.lock();
        let mut statement = connection
            .prepare(&format!("SELECT key, shard, payee, amount, position FROM outbox WHERE delivered = 0 AND shard IN ({}) ORDER BY rowid LIMIT ?1", shard_list(shards)))
            .map_err(error)?;
        let rows = statement
            .query_map([limit as i64], |r| {
                Ok(Pending {
                    key: r.get(0)?,
                    shard: r.get(1)?,
                    payee: r.get(2)?,
                    amount: r.get(3)?,
                    position: r.get(4)?,
                })
            })
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)
    }

    /// Marks a credit delivered.
    pub(crate) fn delivered(&self, key: &str) -> anyhow::Result<()> {
        let mut connection = self.connection.lock();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        let shard: Option<u32> = tx
            .query_row(
                "UPDATE outbox SET delivered = 1 WHERE key = ?1 AND delivered = 0 RETURNING shard",
                [key],
                |r| r.get(0),
            )
            .optional()
            .map_err(error)?;
        if let Some(shard) = shard {
            tx.execute(
                "INSERT INTO log (shard, entry) VALUES (?1, ?2)",
                params![
                    shard,
                    serde_json::to_string(&Change::Delivered {
                        key: key.to_owned()
                    })?
                ],
            )
            .map_err(error)?;
        }
        tx.commit().map_err(error)?;
        Ok(())
    }

    /// Money debited but not yet credited, over `shards` (the owned ones).
    pub(crate) fn in_flight(&self, shards: &[u32]) -> anyhow::Result<i64> {
        let connection = self.connection.lock();
        connection
            .query_row(
                &format!(
                    "SELECT COALESCE(SUM(amount), 0) FROM outbox WHERE delivered = 0 AND shard IN ({})",
                    shard_list(shards)
                ),
                [],
                |r| r.get(0),
            )
            .map_err(error)
    }

    /// The sum of the balances of `shards` (the owned ones: rows of shards
    /// that moved away are a stale copy).
    pub(crate) fn total(&self, shards: &[u32]) -> anyhow::Result<i64> {
        let connection = self.connection.lock();
        connection
            .query_row(
                &format!(
                    "SELECT COALESCE(SUM(balance), 0) FROM accounts WHERE shard IN ({})",
                    shard_list(shards)
                ),
                [],
                |r| r.get(0),
            )
            .map_err(error)
    }

    /// Makes this cell's data for `owned` (the shards it owns at `epoch`)
    /// current, in one transaction, before it serves them: for each shard
    /// whose freshest copy is a replica (shipped by another cell at a later
    /// epoch than this cell last held the shard), the replica's accounts,
    /// answered requests and undelivered credits replace this cell's, and are
    /// written to this cell's log so its own standby gets all of it. Shards
    /// no longer owned are forgotten, so holding one again later takes it
    /// over again. Safe to run from every instance, and again.
    pub(crate) fn take_over(&self, owned: &[u32], epoch: u64) -> anyhow::Result<Vec<TakeOver>> {
        let mut connection = self.connection.lock();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        // A map older than one this cell's data already follows (an
        // instance starting from a stale cached map) must not undo a
        // take-over: refuse it; the config stream brings the current one.
        let epoch = epoch as i64;
        let seen: i64 = tx
            .query_row("SELECT value FROM meta WHERE name = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(error)?
            .unwrap_or(0);
        if epoch < seen {
            anyhow::bail!(
                "this shard map (epoch {epoch}) is older than the one this cell's data follows (epoch {seen}); waiting for the current map"
            );
        }
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('epoch', ?1)
             ON CONFLICT(name) DO UPDATE SET value = MAX(value, excluded.value)",
            [epoch],
        )
        .map_err(error)?;
        tx.execute(
            &format!(
                "DELETE FROM tenure WHERE shard NOT IN ({})",
                shard_list(owned)
            ),
            [],
        )
        .map_err(error)?;
        let mut done = Vec::new();
        for &shard in owned {
            let held: Option<i64> = tx
                .query_row("SELECT epoch FROM tenure WHERE shard = ?1", [shard], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(error)?;
            let freshest: Option<(String, i64)> = tx
                .query_row(
                    "SELECT source, epoch FROM replica_shard_positions WHERE shard = ?1 ORDER BY epoch DESC, position DESC LIMIT 1",
                    [shard],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(error)?;
            let take = match (&freshest, held) {
                (Some((_, shipped)), Some(held)) => *shipped > held,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if let (true, Some((source, _))) = (take, freshest) {
                done.push(take_over_shard(&tx, shard, &source)?);
            }
            tx.execute(
                "INSERT INTO tenure (shard, epoch) VALUES (?1, ?2)
                 ON CONFLICT(shard) DO UPDATE SET epoch = MAX(epoch, excluded.epoch)",
                params![shard, epoch],
            )
            .map_err(error)?;
        }
        tx.commit().map_err(error)?;
        Ok(done)
    }

    /// Log entries after `after`, oldest first.
    pub(crate) fn log_after(&self, after: i64, limit: usize) -> anyhow::Result<Vec<LogEntry>> {
        let connection = self.connection.lock();
        let mut statement = connection
            .prepare("SELECT position, shard, entry FROM log WHERE position > ?1 ORDER BY position LIMIT ?2")
            .map_err(error)?;
        let rows = statement
            .query_map(params![after, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(error)?;
        let mut entries = Vec::new();
        for row in rows {
            let (position, shard, entry) = row.map_err(error)?;
            entries.push(LogEntry {
                position,
                shard,
                change: serde_json::from_str(&entry)?,
            });
        }
        Ok(entries)
    }

    /// The highest log position (0 when empty).
    pub(crate) fn position(&self) -> anyhow::Result<i64> {
        let connection = self.connection.lock();
        connection
            .query_row("SELECT COALESCE(MAX(position), 0) FROM log", [], |r| {
                r.get(0)
            })
            .map_err(error)
    }

    /// The last log position that touched each shard.
    pub(crate) fn written(&self) -> anyhow::Result<BTreeMap<u32, i64>> {
        let connection = self.connection.lock();
        let mut statement = connection
            .prepare("SELECT shard, MAX(position) FROM log GROUP BY shard")
            .map_err(error)?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?)))
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)
    }

    /// The last log position that changed each of `shards` (0 if none):
    /// one lookup of the log's (shard, position) index each, where
    /// [`Db::written`] reads the whole log.
    pub(crate) fn written_of_shards(&self, shards: &[u32]) -> anyhow::Result<BTreeMap<u32, i64>> {
        let connection = self.connection.lock();
        let mut statement = connection
            .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM log WHERE shard = ?1")
            .map_err(error)?;
        shards
            .iter()
            .map(|&shard| {
                statement
                    .query_row([shard], |r| r.get(0))
                    .map(|position| (shard, position))
                    .map_err(error)
            })
            .collect()
    }

    /// What each standby has acknowledged applying, per (standby, shard).
    /// The last log position that changed `shard` (0 if none).
    pub(crate) fn written_of(&self, shard: u32) -> anyhow::Result<i64> {
        let connection = self.connection.lock();
        connection
            .query_row(
                "SELECT COALESCE(MAX(position), 0) FROM log WHERE shard = ?1",
                [shard],
                |r| r.get(0),
            )
            .map_err(error)
    }

    /// The position `standby` acknowledged for `shard`.
    pub(crate) fn acked(&self, standby: &str, shard: u32) -> anyhow::Result<i64> {
        let connection = self.connection.lock();
        Ok(connection
            .query_row(
                "SELECT position FROM shard_acks WHERE standby = ?1 AND shard = ?2",
                params![standby, shard],
                |r| r.get(0),
            )
            .optional()
            .map_err(error)?
            .unwrap_or(0))
    }

    pub(crate) fn acks(&self) -> anyhow::Result<BTreeMap<(String, u32), i64>> {
        let connection = self.connection.lock();
        let mut statement = connection
            .prepare("SELECT standby, shard, position FROM shard_acks")
            .map_err(error)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, u32>(1)?),
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)
    }

    /// Records what a standby says it has applied, per shard. The standby's
    /// word is taken as it is, also backwards (a standby that lost its data
    /// must get it again).
    pub(crate) fn set_acks(
        &self,
        standby: &str,
        applied: &BTreeMap<u32, i64>,
    ) -> anyhow::Result<()> {
        let mut connection = self.connection.lock();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        for (shard, position) in applied {
            tx.execute(
                "INSERT INTO shard_acks (standby, shard, position) VALUES (?1, ?2, ?3)
                 ON CONFLICT(standby, shard) DO UPDATE SET position = excluded.position",
                params![standby, shard, position],
            )
            .map_err(error)?;
        }
        tx.commit().map_err(error)?;
        Ok(())
    }

    /// Applies a shipment of `source`'s log as its standby: for each listed
    /// shard, the entries after what this standby applied, up to `up_to`.
    /// `shards` lists each shard with the position the source believes this
    /// standby applied; when this standby has less (it lost data, or never
    /// had the shard), nothing is applied and the answer is `Err` with what
    /// it has, so the source sends from there. Idempotent: entries at or
    /// below a shard's applied position are skipped.
    pub(crate) fn apply_replica(
        &self,
        source: &str,
        epoch: u64,
        shards: &BTreeMap<u32, i64>,
        up_to: i64,
        entries: &[LogEntry],
    ) -> anyhow::Result<Result<BTreeMap<u32, i64>, BTreeMap<u32, i64>>> {
        let mut connection = self.connection.lock();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        // A shard this cell holds (it took it over, or never gave it up)
        // is not a replica any more: confirming a shipment for it would
        // confirm a write that is not in this cell's own data.
        for shard in shards.keys() {
            let held: Option<i64> = tx
                .query_row("SELECT epoch FROM tenure WHERE shard = ?1", [shard], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(error)?;
            if let Some(held) = held {
                return Err(anyhow::Error::new(NotStandby(format!(
                    "this cell owns shard {shard} (since epoch {held}); it is not its standby"
                ))));
            }
        }
        let mut applied = BTreeMap::new();
        for shard in shards.keys() {
            let position: i64 = tx
                .query_row(
                    "SELECT position FROM replica_shard_positions WHERE source = ?1 AND shard = ?2",
                    params![source, shard],
                    |r| r.get(0),
                )
                .optional()
                .map_err(error)?
                .unwrap_or(0);
            applied.insert(*shard, position);
        }
        if shards.iter().any(|(shard, after)| applied[shard] < *after) {
            return Ok(Err(applied));
        }
        for entry in entries {
            let Some(done) = applied.get(&entry.shard) else {
                anyhow::bail!(
                    "entry {} is for shard {}, which the shipment does not list",
                    entry.position,
                    entry.shard
                );
            };
            if entry.position <= *done || entry.position > up_to {
                continue;
            }
            match &entry.change {
                Change::Balance { user, balance } => {
                    tx.execute(
                        "INSERT INTO replica_accounts (source, user, shard, balance) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT(source, user) DO UPDATE SET balance = excluded.balance, shard = excluded.shard",
                        params![source, user, entry.shard, balance],
                    )
                    .map_err(error)?;
                }
                Change::Request {
                    key,
                    fingerprint,
                    status,
                    body,
                } => {
                    tx.execute(
                        "INSERT OR IGNORE INTO replica_requests (source, key, shard, status, body, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![source, key, entry.shard, status, body.to_string(), fingerprint],
                    )
                    .map_err(error)?;
                }
                Change::Outbox { key, payee, amount } => {
                    tx.execute(
                        "INSERT OR IGNORE INTO replica_outbox (source, key, shard, payee, amount) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![source, key, entry.shard, payee, amount],
                    )
                    .map_err(error)?;
                }
                Change::Delivered { key } => {
                    tx.execute(
                        "DELETE FROM replica_outbox WHERE source = ?1 AND key = ?2",
                        params![source, key],
                    )
                    .map_err(error)?;
                }
            }
        }
        for (shard, position) in &mut applied {
            *position = (*position).max(up_to);
            tx.execute(
                "INSERT INTO replica_shard_positions (source, shard, position, epoch) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(source, shard) DO UPDATE SET position = excluded.position, epoch = MAX(epoch, excluded.epoch)",
                params![source, shard, *position, epoch as i64],
            )
            .map_err(error)?;
        }
        tx.commit().map_err(error)?;
        Ok(Ok(applied))
    }

    /// For each cell this one stands by for: the lowest position applied
    /// over its shards (every change of those shards up to it is here).
    pub(crate) fn applied(&self) -> anyhow::Result<BTreeMap<String, i64>> {
        let connection = self.connection.lock();
        let mut statement = connection
            .prepare("SELECT source, MIN(position) FROM replica_shard_positions GROUP BY source")
            .map_err(error)?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)
    }

    /// The sum of the balances replicated from each source cell.
    pub(crate) fn replica_totals(&self) -> anyhow::Result<BTreeMap<String, i64>> {
        let connection = self.connection.lock();
        let mut statement = connection
            .prepare("SELECT source, SUM(balance) FROM replica_accounts GROUP BY source")
            .map_err(error)?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(error)?;
        rows.collect::<Result<_, _>>().map_err(error)
    }

    /// The balances replicated from `source` (for checks).
    #[cfg(test)]
    pub(crate) fn replica_total(&self, source: &str) -> anyhow::Result<i64> {
        let connection = self.connection.lock();
        connection
            .query_row(
                "SELECT COALESCE(SUM(balance), 0) FROM replica_accounts WHERE source = ?1",
                [source],
                |r| r.get(0),
            )
            .map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile_dir::Dir, Db) {
        let dir = tempfile_dir::Dir::new();
        let db = Db::open(&dir.0.join("bank.db")).expect("open");
        (dir, db)
    }

    /// A temporary directory without another dependency.
    mod tempfile_dir {
        pub(crate) struct Dir(pub(crate) std::path::PathBuf);
        impl Dir {
            pub(crate) fn new() -> Self {
                let path = std::env::temp_dir().join(format!(
                    "atoll-bank-{}-{}",
                    std::process::id(),
                    fastrand()
                ));
                std::fs::create_dir_all(&path).expect("dir");
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        fn fastrand() -> u128 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        }
    }

    #[test]
    fn a_retried_key_applies_once() {
        let (_dir, db) = db();
        let deposit = Operation::Deposit {
            user: "u1".into(),
            amount: 50,
        };
        let first = db.apply("k1", "f-k1", 1, &deposit).expect("apply");
        let again = db.apply("k1", "f-k1", 1, &deposit).expect("apply");
        assert!(!first.replayed && again.replayed);
        assert_eq!(again.body, first.body);
        assert_eq!(db.balance("u1").expect("balance"), 50);
    }

    #[test]
    fn a_key_reused_for_another_request_is_refused() {
        let (_dir, db) = db();
        db.apply(
            "k",
            "deposit u 5",
            1,
            &Operation::Deposit {
                user: "u".into(),
                amount: 5,
            },
        )
        .expect("apply");
        let reused = db
            .apply(
                "k",
                "deposit u 6",
                1,
                &Operation::Deposit {
                    user: "u".into(),
                    amount: 6,
                },
            )
            .expect("apply");
        assert_eq!(reused.status, 422);
        assert_eq!(db.balance("u").expect("balance"), 5);
    }

    #[test]
    fn withdrawals_never_go_negative_and_refusals_are_remembered() {
        let (_dir, db) = db();
        db.apply(
            "d",
            "f-d",
            1,
            &Operation::Deposit {
                user: "u".into(),
                amount: 10,
            },
        )
        .expect("apply");
        let refused = db
            .apply(
                "w",
                "f-w",
                1,
                &Operation::Withdraw {
                    user: "u".into(),
                    amount: 11,
                },
            )
            .expect("apply");
        assert_eq!(refused.status, 409);
        db.apply(
            "d2",
            "f-d2",
            1,
            &Operation::Deposit {
                user: "u".into(),
                amount: 10,
            },
        )
        .expect("apply");
        let replay = db
            .apply(
                "w",
                "f-w",
                1,
                &Operation::Withdraw {
                    user: "u".into(),
                    amount: 11,
                },
            )
            .expect("apply");
        assert_eq!(replay.status, 409, "the first answer stands");
        assert_eq!(db.balance("u").expect("balance"), 20);
    }

    #[test]
    fn remote_transfers_wait_in_the_outbox_until_delivered() {
        let (_dir, db) = db();
        db.apply(
            "d",
            "f-d",
            1,
            &Operation::Deposit {
                user: "a".into(),
                amount: 30,
            },
        )
        .expect("apply");
        db.apply(
            "t",
            "f-t",
            1,
            &Operation::TransferRemote {
                from: "a".into(),
                to: "b".into(),
                amount: 12,
            },
        )
        .expect("apply");
        assert_eq!(db.balance("a").expect("balance"), 18);
        assert_eq!(db.in_flight(&[1]).expect("in flight"), 12);
        assert_eq!(
            db.total(&[1]).expect("total") + db.in_flight(&[1]).expect("in flight"),
            30,
            "money is conserved"
        );
        assert_eq!(db.in_flight(&[2]).expect("in flight"), 0, "other shards");
        db.delivered("t").expect("delivered");
        assert_eq!(db.in_flight(&[1]).expect("in flight"), 0);
    }

    #[test]
    fn replicas_apply_in_order_and_only_once() {
        let (_dir, source) = db();
        let (_dir2, standby) = db();
        source
            .apply(
                "d",
                "f-d",
                3,
                &Operation::Deposit {
                    user: "a".into(),
                    amount: 30,
                },
            )
            .expect("apply");
        source
            .apply(
                "w",
                "f-w",
                3,
                &Operation::Withdraw {
                    user: "a".into(),
                    amount: 5,
                },
            )
            .expect("apply");
        let entries = source.log_after(0, 100).expect("log");
        let up_to = source.position().expect("position");
        let from_zero = BTreeMap::from([(3, 0), (4, 0)]);
        let applied = standby
            .apply_replica("rz01", 1, &from_zero, up_to, &entries)
            .expect("apply")
            .expect("no gap");
        assert_eq!(applied, BTreeMap::from([(3, up_to), (4, up_to)]));
        // Sent again: nothing applies twice.
        standby
            .apply_replica("rz01", 1, &from_zero, up_to, &entries)
            .expect("again")
            .expect("no gap");
        assert_eq!(standby.replica_total("rz01").expect("total"), 25);
        assert_eq!(standby.applied().expect("applied")["rz01"], up_to);
        assert_eq!(source.written().expect("written")[&3], up_to);
    }

    #[test]
    fn a_standby_that_lacks_what_the_source_believes_says_so() {
        let (_dir, source) = db();
        let (_dir2, wiped) = db();
        source
            .apply(
                "d",
                "f-d",
                3,
                &Operation::Deposit {
                    user: "a".into(),
                    amount: 30,
                },
            )
            .expect("apply");
        source
            .apply(
                "e",
                "f-e",
                3,
                &Operation::Deposit {
                    user: "a".into(),
                    amount: 1,
                },
            )
            .expect("apply");
        let entries = source.log_after(2, 100).expect("log");
        let up_to = source.position().expect("position");
        // The source believes shard 3 was applied up to 2; this standby has nothing.
        let gap = wiped
            .apply_replica("rz01", 1, &BTreeMap::from([(3, 2)]), up_to, &entries)
            .expect("apply")
            .expect_err("a gap");
        assert_eq!(gap, BTreeMap::from([(3, 0)]));
        assert_eq!(
            wiped.replica_total("rz01").expect("total"),
            0,
            "nothing applied"
        );
        // From where it really is, it catches up.
        let all = source.log_after(0, 100).expect("log");
        wiped
            .apply_replica("rz01", 1, &gap, up_to, &all)
            .expect("apply")
            .expect("no gap");
        assert_eq!(wiped.replica_total("rz01").expect("total"), 31);
    }

    /// Ships everything `source` logged to `standby` (as replica 0 would).
    fn ship(source: &Db, from: &str, standby: &Db, epoch: u64, shards: &[u32]) {
        let entries: Vec<LogEntry> = source
            .log_after(0, 10_000)
            .expect("log")
            .into_iter()
            .filter(|e| shards.contains(&e.shard))
            .collect();
        let up_to = source.position().expect("position");
        let from_zero: BTreeMap<u32, i64> = shards.iter().map(|s| (*s, 0)).collect();
        standby
            .apply_replica(from, epoch, &from_zero, up_to, &entries)
            .expect("apply")
            .expect("no gap");
    }

    #[test]
    fn a_new_owner_takes_over_balances_answers_and_credits_and_hands_them_back() {
        let (_a_dir, a) = db();
        let (_b_dir, b) = db();
        // rz01 (a) owns shard 3 at epoch 1; it serves some writes.
        assert!(
            a.take_over(&[3], 1).expect("take over").is_empty(),
            "nothing to take over at first"
        );
        let deposit = Operation::Deposit {
            user: "u3".into(),
            amount: 40,
        };
        a.apply("u3/k1", "deposit u3 40", 3, &deposit)
            .expect("apply");
        a.apply(
            "u3/k2",
            "transfer u3 u9 15",
            3,
            &Operation::TransferRemote {
                from: "u3".into(),
                to: "u9".into(),
                amount: 15,
            },
        )
        .expect("apply");
        ship(&a, "rz01", &b, 1, &[3]);
        // The switchover flips shard 3 to rz02 (b) at epoch 2.
        let done = b.take_over(&[3], 2).expect("take over");
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(
            (done[0].accounts, done[0].requests, done[0].credits),
            (1, 2, 1)
        );
        assert_eq!(b.balance("u3").expect("balance"), 25);
        assert_eq!(
            b.total(&[3]).expect("total") + b.in_flight(&[3]).expect("in flight"),
            40
        );
        // A retry of an acknowledged write is answered, not applied again.
        let retry = b
            .apply("u3/k1", "deposit u3 40", 3, &deposit)
            .expect("apply");
        assert!(retry.replayed);
        assert_eq!(b.balance("u3").expect("balance"), 25);
        // A second instance (or a restart) does not take over again.
        assert!(b.take_over(&[3], 2).expect("again").is_empty());
        // The credit is now b's to deliver.
        assert_eq!(b.pending(&[3], 10).expect("pending").len(), 1);
        assert!(a.take_over(&[], 2).expect("a lets go").is_empty());
        b.apply(
            "u3/k3",
            "withdraw u3 5",
            3,
            &Operation::Withdraw {
                user: "u3".into(),
                amount: 5,
            },
        )
        .expect("apply");
        // Back to rz01 at epoch 3: b's copy, shipped at epoch 2, wins over
        // what a held at epoch 1.
        ship(&b, "rz02", &a, 2, &[3]);
        let back = a.take_over(&[3], 3).expect("take back");
        assert_eq!(back.len(), 1, "{back:?}");
        assert_eq!(a.balance("u3").expect("balance"), 20);
        let retry = a
            .apply(
                "u3/k3",
                "withdraw u3 5",
                3,
                &Operation::Withdraw {
                    user: "u3".into(),
                    amount: 5,
                },
            )
            .expect("apply");
        assert!(retry.replayed, "b's answer came back with the shard");
    }

    #[test]
    fn an_older_map_cannot_undo_a_take_over_and_an_owner_is_no_standby() {
        let (_a_dir, a) = db();
        let (_b_dir, b) = db();
        a.apply(
            "u3/k1",
            "deposit u3 40",
            3,
            &Operation::Deposit {
                user: "u3".into(),
                amount: 40,
            },
        )
        .expect("apply");
        ship(&a, "rz01", &b, 1, &[3]);
        assert_eq!(b.take_over(&[3], 2).expect("take over").len(), 1);
        b.apply(
            "u3/k2",
            "deposit u3 5",
            3,
            &Operation::Deposit {
                user: "u3".into(),
                amount: 5,
            },
        )
        .expect("apply");
        // An instance of b restarting from a cached map of epoch 1 (where b
        // owned nothing) must not drop the tenure.
        let stale = b.take_over(&[], 1).expect_err("older map");
        assert!(stale.to_string().contains("older"), "{stale}");
        assert!(b.take_over(&[3], 2).expect("current map").is_empty());
        assert_eq!(b.balance("u3").expect("balance"), 45, "nothing was undone");
        // A late shipment from the old owner for the shard b owns now is
        // refused, never confirmed.
        let entries = a.log_after(0, 100).expect("log");
        let late = b
            .apply_replica("rz01", 1, &BTreeMap::from([(3, 0)]), 99, &entries)
            .expect_err("b owns shard 3");
        assert!(late.is::<NotStandby>(), "{late}");
    }

    #[test]
    fn a_write_whose_lease_ended_is_rolled_back() {
        let (_dir, db) = db();
        let past = std::time::Instant::now();
        let outcome = db
            .apply_until(
                "u/k",
                "deposit u 5",
                1,
                &Operation::Deposit {
                    user: "u".into(),
                    amount: 5,
                },
                Some(past),
            )
            .expect("apply");
        assert_eq!(outcome.status, 503);
        assert_eq!(db.balance("u").expect("balance"), 0);
        // Not remembered either: the retry applies.
        let retry = db
            .apply(
                "u/k",
                "deposit u 5",
                1,
                &Operation::Deposit {
                    user: "u".into(),
                    amount: 5,
                },
            )
            .expect("apply");
        assert_eq!((retry.status, retry.replayed), (200, false));
    }

    #[test]
    fn the_instances_of_a_cell_open_a_new_database_together() {
        let (dir, _first) = db();
        for round in 0..5 {
            let path = dir.0.join(format!("together-{round}.db"));
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || Db::open(&path).map(|_| ()))
                })
                .collect();
            for opener in openers {
                opener
                    .join()
                    .expect("thread")
                    .expect("every instance opens the shared database");
            }
        }
    }
}
