//! The zero-loss checker: the history of a bank workload, and a check, in the
//! spirit of Jepsen's bank test, that the bank lost no acknowledged write,
//! applied none twice, created or destroyed no money and never showed a
//! negative balance.
//!
//! A [`History`] is what `atoll load --history FILE` records, one [`Event`]
//! per line of JSON (JSON Lines, so a long run streams to disk and a cut-off
//! file still reads up to its last line): the starting balances, every
//! operation with every attempt it took, the answer each write got when it
//! was re-sent with its idempotency key after the run (the *settle*), and
//! the final balances. [`check`] turns a history into a [`Report`].
//!
//! This crate only reads and judges histories: it sends no request and
//! knows nothing of HTTP clients or the sandbox. The format and the checks
//! are described in `docs/checker.md`.

mod check;
mod history;
mod report;

pub use check::check;
pub use history::{
    Attempt, Event, FORMAT_VERSION, FinalState, History, HistoryError, Kind, Operation, Outcome,
    Settle, Start, write_event,
};
pub use report::{Anomaly, AnomalyKind, Counts, KindCounts, Money, Report};

#[cfg(test)]
mod tests;
