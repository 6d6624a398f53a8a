//! The recorded history of a bank workload, and its JSON Lines form.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The version of the history format, written in the `start` event.
pub const FORMAT_VERSION: u32 = 1;

/// A history that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The file cannot be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// A line is not an event.
    #[error(
        "{path}:{line}: not a history event ({source}); each line is one JSON object with an \"event\" field"
    )]
    Parse {
        /// The file.
        path: String,
        /// The line, from 1.
        line: usize,
        /// What was wrong with it.
        source: serde_json::Error,
    },
    /// The history was written by a newer format.
    #[error("{path}:{line}: history format {found}, this checker reads format {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// The line, from 1.
        line: usize,
        /// The version found.
        found: u32,
    },
}

/// One line of a history file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event {
    /// The run begins: the balances read before it.
    Start(Start),
    /// One operation of the run, written when it completed.
    Op(Operation),
    /// The answer to a write re-sent with its key after the run.
    Settle(Settle),
    /// The balances read after the settle and after cross-cell credits drained.
    Final(FinalState),
}

/// The run's beginning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Start {
    /// The format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The run's name: idempotency keys of the run contain it.
    pub run: String,
    /// Wall-clock time of time 0, in milliseconds since the Unix epoch.
    /// Every other time in the history is microseconds since time 0.
    pub started_at_unix_ms: u64,
    /// The gateways the workload used.
    pub gateways: Vec<String>,
    /// Each user's balance before the run, read from its owner.
    pub balances: BTreeMap<String, i64>,
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// Adds `amount` to `user`.
    Deposit,
    /// Takes `amount` from `user`, or is refused for funds.
    Withdraw,
    /// Moves `amount` from `user` to `to`, or is refused for funds.
    Transfer,
    /// Reads `user`'s balance.
    Read,
}

impl Kind {
    /// The name used in the history and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Deposit => "deposit",
            Kind::Withdraw => "withdraw",
            Kind::Transfer => "transfer",
            Kind::Read => "read",
        }
    }
}

/// How an operation, an attempt or a settle ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// A definite success (2xx).
    Ok,
    /// A definite refusal that applied nothing (a 4xx but 421, e.g. 409
    /// `insufficientFunds`).
    Refused,
    /// No definite answer: a timeout, a transport error, a 5xx or a 421.
    Unknown,
}

impl Outcome {
    /// The outcome an HTTP status means, as `atoll load` reads it: 421
    /// (another cell owns the user now) and 5xx say nothing of whether a
    /// write applied; every other answer is definite.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Ok,
            421 | 500.. => Outcome::Unknown,
            _ => Outcome::Refused,
        }
    }

    /// The name used in the history and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Unknown => "unknown",
        }
    }
}

/// One HTTP request of an operation: writes are retried with the same
/// idempotency key, so an operation has one attempt or more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attempt {
    /// When it was sent (µs since time 0).
    pub sent: u64,
    /// When its answer, or its failure, came (µs since time 0).
    pub received: u64,
    /// The gateway it went through.
    pub gateway: String,
    /// The HTTP status, if an answer came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The error code of the answer's JSON body (`{"error": ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why no answer came: `timeout`, `connect` or `transport`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The answer carried `idempotent-replayed: true`: the bank had seen
    /// the key and sent its stored answer, changing nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// The balance in the answer (the user's; the payer's for a transfer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<i64>,
    /// The cell that answered (`x-bank-cell`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
}

impl Attempt {
    /// What this attempt's answer says.
    pub fn outcome(&self) -> Outcome {
        self.status.map_or(Outcome::Unknown, Outcome::of_status)
    }

    /// Whether two definite answers are the same answer (status, error code
    /// and balance: a replay returns the stored body unchanged).
    pub fn same_answer(&self, other: &Attempt) -> bool {
        self.status == other.status && self.error == other.error && self.balance == other.balance
    }
}

/// One operation of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Unique in the history.
    pub id: u64,
    /// The workload's worker that ran it (a worker runs one at a time).
    pub worker: u64,
    /// What it does.
    pub kind: Kind,
    /// The user in the path.
    pub user: String,
    /// The payee of a transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The amount (absent, 0, for reads).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub amount: i64,
    /// The idempotency key of a write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When it started (µs since time 0).
    pub invoke: u64,
    /// When it ended (µs since time 0).
    pub complete: u64,
    /// Every request it took, in order.
    pub attempts: Vec<Attempt>,
    /// Its outcome during the run: that of its last attempt.
    pub outcome: Outcome,
}

impl Operation {
    /// Whether it changes balances when it applies.
    pub fn is_write(&self) -> bool {
        self.kind != Kind::Read
    }

    /// The definite answers among its attempts, in order.
    pub fn answers(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.outcome() != Outcome::Unknown)
    }

    /// How it changes each user's balance when it applies.
    pub fn effects(&self) -> Vec<(&str, i64)> {
        match self.kind {
            Kind::Deposit => vec![(self.user.as_str(), self.amount)],
            Kind::Withdraw => vec![(self.user.as_str(), -self.amount)],
            Kind::Transfer => {
                let mut effects = vec![(self.user.as_str(), -self.amount)];
                if let Some(to) = &self.to {
                    effects.push((to.as_str(), self.amount));
                }
                effects
            }
            Kind::Read => Vec::new(),
        }
    }

    /// "deposit of 57 to user 1001", for reports.
    pub fn describe(&self) -> String {
        match self.kind {
            Kind::Deposit => format!("deposit of {} to user {}", self.amount, self.user),
            Kind::Withdraw => format!("withdrawal of {} from user {}", self.amount, self.user),
            Kind::Transfer => format!(
                "transfer of {} from user {} to user {}",
                self.amount,
                self.user,
                self.to.as_deref().unwrap_or("?")
            ),
            Kind::Read => format!("read of user {}", self.user),
        }
    }
}

/// A write re-sent with its key after the run: the bank replays the stored
/// answer if the write had applied (or been refused), or handles it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settle {
    /// The operation's id.
    pub id: u64,
    /// Its idempotency key.
    pub key: String,
    /// When the settle started (µs since time 0).
    pub invoke: u64,
    /// When it ended (µs since time 0).
    pub complete: u64,
    /// Every request it took; none if the settle's time ran out first.
    pub attempts: Vec<Attempt>,
    /// That of its last attempt.
    pub outcome: Outcome,
}

impl Settle {
    /// Its definite answer, if it got one.
    pub fn answer(&self) -> Option<&Attempt> {
        self.attempts
            .iter()
            .rev()
            .find(|a| a.outcome() != Outcome::Unknown)
    }
}

/// The state after the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FinalState {
    /// When the balances were read (µs since time 0).
    pub at: u64,
    /// Each user's balance, read from its owner.
    pub balances: BTreeMap<String, i64>,
    /// Money in flight (undelivered cross-cell credits) per cell, as
    /// `GET /totals` said just before the balances were read.
    #[serde(default)]
    pub in_flight: BTreeMap<String, i64>,
    /// Whether every cell had `inFlight == 0` before the balances were
    /// read: every credit had landed.
    pub drained: bool,
}

/// A whole history, in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The `start` event.
    pub start: Option<Start>,
    /// The operations, in the order they were recorded.
    pub operations: Vec<Operation>,
    /// The settles, in the order they were recorded.
    pub settles: Vec<Settle>,
    /// The `final` event.
    #[serde(rename = "final")]
    pub final_state: Option<FinalState>,
}

impl History {
    /// Adds an event (a second `start` or `final` replaces the first).
    pub fn push(&mut self, event: Event) {
        match event {
            Event::Start(start) => self.start = Some(start),
            Event::Op(operation) => self.operations.push(operation),
            Event::Settle(settle) => self.settles.push(settle),
            Event::Final(state) => self.final_state = Some(state),
        }
    }

    /// The events, in file order: start, operations, settles, final.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        self.start
            .iter()
            .cloned()
            .map(Event::Start)
            .chain(self.operations.iter().cloned().map(Event::Op))
            .chain(self.settles.iter().cloned().map(Event::Settle))
            .chain(self.final_state.iter().cloned().map(Event::Final))
    }

    /// Reads JSON Lines; `name` names the source in errors. Blank lines are
    /// skipped.
    pub fn read_jsonl(reader: impl BufRead, name: &str) -> Result<History, HistoryError> {
        let mut history = History::default();
        for (index, line) in reader.lines().enumerate() {
            let line = line.map_err(|source| HistoryError::Io {
                path: name.to_owned(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let event: Event =
                serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
                    path: name.to_owned(),
                    line: index + 1,
                    source,
                })?;
            if let Event::Start(start) = &event
                && start.version > FORMAT_VERSION
            {
                return Err(HistoryError::Version {
                    path: name.to_owned(),
                    line: index + 1,
                    found: start.version,
                });
            }
            history.push(event);
        }
        Ok(history)
    }

    /// Reads a history file.
    pub fn read_file(path: &Path) -> Result<History, HistoryError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| HistoryError::Io {
            path: name.clone(),
            source,
        })?;
        History::read_jsonl(std::io::BufReader::new(file), &name)
    }

    /// Writes JSON Lines, one event per line.
    pub fn write_jsonl(&self, mut writer: impl Write) -> Result<(), HistoryError> {
        for event in self.events() {
            write_event(&mut writer, &event)?;
        }
        Ok(())
    }
}

/// Writes one event as one line.
pub fn write_event(writer: &mut impl Write, event: &Event) -> Result<(), HistoryError> {
    let io = |source| HistoryError::Io {
        path: "history".to_owned(),
        source,
    };
    serde_json::to_writer(&mut *writer, event).map_err(|e| io(std::io::Error::other(e)))?;
    writer.write_all(b"\n").map_err(io)
}

fn is_zero(amount: &i64) -> bool {
    *amount == 0
}
