//! What the checker found: anomalies, counts, and a readable form.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// What is wrong, from the most specific explanation to the most general.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AnomalyKind {
    /// The history lacks something the checks need (its start, its final
    /// state, a balance), or names an operation twice.
    Incomplete,
    /// Cross-cell credits were still in flight when the final balances
    /// were read, so balances may differ by credits yet to land.
    NotDrained,
    /// An acknowledged write is gone: the bank did not recognise its key at
    /// settle, or its effect is missing from the final balance.
    LostWrite,
    /// An operation's effect is in a final balance twice.
    AppliedTwice,
    /// An operation answered as not applied has its effect in a final
    /// balance.
    AppliedButRefused,
    /// Two definite answers for one key differ, or a second answer was not
    /// a replay.
    ConflictingAnswers,
    /// A balance below zero, in an answer or in the final state.
    NegativeBalance,
    /// A write without a definite answer at settle: whether it applied, or
    /// whether its acknowledgement held, cannot be told.
    Unsettled,
    /// The total of final balances is not the starting total plus the
    /// deposits minus the withdrawals that applied.
    NotConserved,
    /// A user's final balance is not its start plus the operations that
    /// applied, and no single operation explains the difference.
    BalanceMismatch,
}

impl AnomalyKind {
    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::Incomplete => "incomplete",
            AnomalyKind::NotDrained => "notDrained",
            AnomalyKind::LostWrite => "lostWrite",
            AnomalyKind::AppliedTwice => "appliedTwice",
            AnomalyKind::AppliedButRefused => "appliedButRefused",
            AnomalyKind::ConflictingAnswers => "conflictingAnswers",
            AnomalyKind::NegativeBalance => "negativeBalance",
            AnomalyKind::Unsettled => "unsettled",
            AnomalyKind::NotConserved => "notConserved",
            AnomalyKind::BalanceMismatch => "balanceMismatch",
        }
    }
}

impl fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing the checker found wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Anomaly {
    /// What kind of wrong.
    pub kind: AnomalyKind,
    /// When the evidence was seen (µs since time 0).
    pub at: u64,
    /// The operation it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<u64>,
    /// The user it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The idempotency key it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What a correct bank would have shown.
    pub expected: String,
    /// What was seen.
    pub found: String,
    /// One sentence.
    pub message: String,
}

/// Operations of one kind, by outcome during the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindCounts {
    /// Definite successes.
    pub ok: u64,
    /// Definite refusals.
    pub refused: u64,
    /// No definite answer during the run.
    pub unknown: u64,
}

/// How many of what.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Operations in the history.
    pub operations: u64,
    /// Requests they took during the run.
    pub attempts: u64,
    /// Operations by kind and outcome.
    pub by_kind: BTreeMap<String, KindCounts>,
    /// Writes acknowledged (`ok`) during the run.
    pub acknowledged: u64,
    /// Writes refused during the run.
    pub refused: u64,
    /// Writes without a definite answer during the run.
    pub unknown: u64,
    /// Of those, the settle says they had applied during the run.
    pub unknown_applied: u64,
    /// Of those, the settle says they had not: refused, or applied only
    /// now, by the settle itself.
    pub unknown_not_applied: u64,
    /// Of the latter, those the settle applied.
    pub unknown_applied_by_settle: u64,
    /// Of those, not even the settle got an answer.
    pub unknown_unresolved: u64,
    /// Writes settled with a definite answer.
    pub settled: u64,
    /// Settle answers that were replays (the key was known).
    pub settle_replayed: u64,
    /// Settle answers that were not (the write was handled only then).
    pub settle_fresh: u64,
    /// Users whose balances were checked.
    pub users: u64,
    /// Of those, users whose final balance is not the expected one.
    pub users_mismatched: u64,
}

/// The money check (a).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Money {
    /// The sum of starting balances.
    pub start: i64,
    /// Deposits that applied.
    pub deposits: i64,
    /// Withdrawals that applied.
    pub withdrawals: i64,
    /// `start + deposits - withdrawals`.
    pub expected: i64,
    /// Deposits whose application could not be told, which widen the
    /// expected range upwards.
    pub undetermined_deposits: i64,
    /// Withdrawals whose application could not be told.
    pub undetermined_withdrawals: i64,
    /// The sum of final balances.
    #[serde(rename = "final")]
    pub final_total: i64,
    /// Whether the final total is the expected one (or in its range).
    pub conserved: bool,
}

/// What [`check`](crate::check) found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// No anomaly.
    pub clean: bool,
    /// How many of what.
    pub counts: Counts,
    /// The money check.
    pub money: Money,
    /// Every anomaly, ordered by time (then from the most specific kind).
    pub anomalies: Vec<Anomaly>,
    /// The first anomaly as a paragraph: the operation, user and key, what
    /// was expected, what was found, and the attempts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
}

impl Report {
    /// Whether the history shows no anomaly.
    pub fn is_clean(&self) -> bool {
        self.anomalies.is_empty()
    }
}

/// 1234567 as "1,234,567".
pub(crate) fn thousands(n: i64) -> String {
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

fn count(n: u64) -> String {
    thousands(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Microseconds since time 0 as "12.345 s".
pub(crate) fn seconds(micros: u64) -> String {
    format!("{}.{:03} s", micros / 1_000_000, (micros / 1_000) % 1_000)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        if self.clean {
            writeln!(
                f,
                "atoll check: clean: {} operations, no acknowledged write lost, none applied twice, money conserved",
                count(c.operations)
            )?;
        } else {
            writeln!(
                f,
                "atoll check: {} {} in {} operations",
                count(self.anomalies.len() as u64),
                if self.anomalies.len() == 1 {
                    "ANOMALY"
                } else {
                    "ANOMALIES"
                },
                count(c.operations)
            )?;
        }
        let kinds: Vec<String> = c
            .by_kind
            .iter()
            .map(|(kind, k)| {
                if kind == "read" {
                    format!(
                        "{kind} {} (unanswered {})",
                        count(k.ok + k.refused),
                        count(k.unknown)
                    )
                } else {
                    format!(
                        "{kind} {}/{}/{}",
                        count(k.ok),
                        count(k.refused),
                        count(k.unknown)
                    )
                }
            })
            .collect();
        writeln!(
            f,
            "  operations  {} (writes: ok/refused/unknown), {} requests",
            kinds.join("  "),
            count(c.attempts)
        )?;
        writeln!(
            f,
            "  writes      {} acknowledged, {} refused, {} unknown: {} had applied, {} had not ({} applied by the settle), {} unresolved",
            count(c.acknowledged),
            count(c.refused),
            count(c.unknown),
            count(c.unknown_applied),
            count(c.unknown_not_applied),
            count(c.unknown_applied_by_settle),
            count(c.unknown_unresolved)
        )?;
        writeln!(
            f,
            "  settle      {} writes re-sent by key: {} replayed, {} handled only then",
            count(c.settled),
            count(c.settle_replayed),
            count(c.settle_fresh)
        )?;
        let m = &self.money;
        let range = if m.undetermined_deposits > 0 || m.undetermined_withdrawals > 0 {
            format!(
                " (from {} to {} with undetermined writes)",
                thousands(m.expected - m.undetermined_withdrawals),
                thousands(m.expected + m.undetermined_deposits)
            )
        } else {
            String::new()
        };
        writeln!(
            f,
            "  money       start {} + deposits {} - withdrawals {} = {}{range}; final {}: {}",
            thousands(m.start),
            thousands(m.deposits),
            thousands(m.withdrawals),
            thousands(m.expected),
            thousands(m.final_total),
            if m.conserved {
                "conserved"
            } else {
                "NOT CONSERVED"
            }
        )?;
        writeln!(
            f,
            "  balances    {} users: {} equal their start plus the operations that applied",
            count(c.users),
            count(c.users.saturating_sub(c.users_mismatched))
        )?;
        if let Some(first) = &self.first {
            writeln!(f)?;
            writeln!(f, "first anomaly: {first}")?;
        }
        if !self.anomalies.is_empty() {
            writeln!(f)?;
            writeln!(f, "anomalies ({}):", count(self.anomalies.len() as u64))?;
            for a in &self.anomalies {
                let mut subject = Vec::new();
                if let Some(op) = a.op {
                    subject.push(format!("op {op}"));
                }
                if let Some(user) = &a.user {
                    subject.push(format!("user {user}"));
                }
                let subject = if subject.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", subject.join(" "))
                };
                writeln!(
                    f,
                    "  {:>11}  {:<18} {subject}{}",
                    seconds(a.at),
                    a.kind.name(),
                    a.message
                )?;
            }
        }
        Ok(())
    }
}
