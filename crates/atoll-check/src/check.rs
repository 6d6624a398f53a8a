//! The checks: money conserved, no negative balance, no acknowledged write
//! lost, none applied twice, and what became of the writes that got no
//! answer. `docs/checker.md` says why each is sound.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{Attempt, FinalState, History, Kind, Operation, Outcome, Settle, Start};
use crate::report::{Anomaly, AnomalyKind, Counts, Money, Report, seconds, thousands};

/// Checks a history. Deterministic: the same history (in any event order)
/// gives the same report.
pub fn check(history: &History) -> Report {
    let mut checker = Checker::new(history);
    checker.operations();
    if let (Some(start), Some(state)) = (&history.start, &history.final_state) {
        checker.balances(start, state);
    }
    checker.finish()
}

/// Whether an operation's effect should be in the final balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// It was acknowledged, or its settle answered 2xx (a replay: it had
    /// applied during the run; a fresh answer: the settle applied it).
    Applied,
    /// It was refused, or its settle answered with a refusal.
    NotApplied,
    /// Nobody can tell: no definite answer, not even at settle.
    Undetermined,
}

/// One operation's part in one user's balance.
#[derive(Clone, Copy, Debug)]
struct Part<'h> {
    op: &'h Operation,
    delta: i64,
    effect: Effect,
}

struct Checker<'h> {
    history: &'h History,
    /// By id; the first of duplicates.
    ops: BTreeMap<u64, &'h Operation>,
    /// By operation id.
    settles: BTreeMap<u64, &'h Settle>,
    /// Per user, the operations that change its balance, in time order.
    parts: BTreeMap<&'h str, Vec<Part<'h>>>,
    anomalies: Vec<Anomaly>,
    counts: Counts,
    money: Money,
}

// === impl Checker ===

impl<'h> Checker<'h> {
    fn new(history: &'h History) -> Self {
        let mut checker = Checker {
            history,
            ops: BTreeMap::new(),
            settles: BTreeMap::new(),
            parts: BTreeMap::new(),
            anomalies: Vec::new(),
            counts: Counts::default(),
            money: Money::default(),
        };
        let mut ordered: Vec<&Operation> = history.operations.iter().collect();
        ordered.sort_by_key(|op| (op.invoke, op.id, op.complete));
        for op in ordered {
            if checker.ops.contains_key(&op.id) {
                checker.incomplete(
                    op.invoke,
                    Some(op.id),
                    None,
                    format!(
                        "operation id {} appears more than once; the later ones are ignored",
                        op.id
                    ),
                );
                continue;
            }
            checker.ops.insert(op.id, op);
        }
        let mut settles: Vec<&Settle> = history.settles.iter().collect();
        settles.sort_by_key(|s| (s.id, s.invoke, s.complete));
        for settle in settles {
            let known = checker.ops.get(&settle.id).copied();
            let problem = match known {
                _ if checker.settles.contains_key(&settle.id) => Some(format!(
                    "operation {} is settled more than once; the later settles are ignored",
                    settle.id
                )),
                None => Some(format!(
                    "a settle names operation {}, which the history does not have",
                    settle.id
                )),
                Some(op) if op.key.as_deref() != Some(settle.key.as_str()) => Some(format!(
                    "the settle of operation {} has key {}, the operation {}",
                    settle.id,
                    settle.key,
                    op.key.as_deref().unwrap_or("none")
                )),
                Some(_) => None,
            };
            match problem {
                Some(problem) => checker.incomplete(settle.invoke, Some(settle.id), None, problem),
                None => {
                    checker.settles.insert(settle.id, settle);
                }
            }
        }
        if history.start.is_none() {
            checker.incomplete(
                0,
                None,
                None,
                "the history has no start event, so the starting balances are unknown".into(),
            );
        }
        if history.final_state.is_none() {
            let last = history
                .operations
                .iter()
                .map(|op| op.complete)
                .chain(history.settles.iter().map(|s| s.complete))
                .max()
                .unwrap_or(0);
            checker.incomplete(
                last,
                None,
                None,
                "the history has no final event (the run was cut short), so no balance can be checked"
                    .into(),
            );
        }
        checker
    }

    fn incomplete(&mut self, at: u64, op: Option<u64>, user: Option<&str>, message: String) {
        self.anomalies.push(Anomaly {
            kind: AnomalyKind::Incomplete,
            at,
            op,
            user: user.map(str::to_owned),
            key: None,
            expected: "a complete history".into(),
            found: message.clone(),
            message,
        });
    }

    /// Per operation: counts, negative balances in answers, answers that
    /// disagree, acknowledged writes the bank forgot, and what each
    /// operation should have done to the balances.
    fn operations(&mut self) {
        let ops: Vec<&'h Operation> = self.ops.values().copied().collect();
        let mut ordered = ops;
        ordered.sort_by_key(|op| (op.invoke, op.id));
        for op in ordered {
            self.counts.operations += 1;
            self.counts.attempts += op.attempts.len() as u64;
            let during = op
                .answers()
                .next()
                .map_or(Outcome::Unknown, Attempt::outcome);
            let counts = self
                .counts
                .by_kind
                .entry(op.kind.name().to_owned())
                .or_default();
            match during {
                Outcome::Ok => counts.ok += 1,
                Outcome::Refused => counts.refused += 1,
                Outcome::Unknown => counts.unknown += 1,
            }
            let settle = self.settles.get(&op.id).copied();
            for attempt in op
                .attempts
                .iter()
                .chain(settle.iter().flat_map(|s| s.attempts.iter()))
            {
                if let Some(balance) = attempt.balance.filter(|b| *b < 0) {
                    self.anomalies.push(Anomaly {
                        kind: AnomalyKind::NegativeBalance,
                        at: attempt.received,
                        op: Some(op.id),
                        user: Some(op.user.clone()),
                        key: op.key.clone(),
                        expected: "a balance of 0 or more".into(),
                        found: format!("balance {balance}"),
                        message: format!(
                            "the answer to op {} ({}) shows user {} with balance {balance}",
                            op.id,
                            op.describe(),
                            op.user
                        ),
                    });
                }
            }
            if !op.is_write() {
                continue;
            }
            self.answers_agree(op);
            let settled = settle.and_then(Settle::answer);
            if let Some(answer) = settled {
                self.counts.settled += 1;
                if answer.replayed {
                    self.counts.settle_replayed += 1;
                } else {
                    self.counts.settle_fresh += 1;
                }
            }
            let effect = match during {
                Outcome::Ok => {
                    self.counts.acknowledged += 1;
                    self.acknowledged_held(op, during, settle, settled);
                    Effect::Applied
                }
                Outcome::Refused => {
                    self.counts.refused += 1;
                    self.acknowledged_held(op, during, settle, settled);
                    match settled.map(Attempt::outcome) {
                        Some(Outcome::Ok) => Effect::Applied,
                        _ => Effect::NotApplied,
                    }
                }
                Outcome::Unknown => {
                    self.counts.unknown += 1;
                    match settled {
                        Some(answer) => {
                            if answer.replayed && answer.outcome() == Outcome::Ok {
                                self.counts.unknown_applied += 1;
                            } else {
                                self.counts.unknown_not_applied += 1;
                                if answer.outcome() == Outcome::Ok {
                                    self.counts.unknown_applied_by_settle += 1;
                                }
                            }
                            if answer.outcome() == Outcome::Ok {
                                Effect::Applied
                            } else {
                                Effect::NotApplied
                            }
                        }
                        None => {
                            self.counts.unknown_unresolved += 1;
                            self.unsettled(
                                op,
                                settle,
                                "got no definite answer, during the run or at settle: whether it applied cannot be told",
                            );
                            Effect::Undetermined
                        }
                    }
                }
            };
            for (user, delta) in op.effects() {
                self.parts
                    .entry(user)
                    .or_default()
                    .push(Part { op, delta, effect });
            }
            match (op.kind, effect) {
                (Kind::Deposit, Effect::Applied) => self.money.deposits += op.amount,
                (Kind::Withdraw, Effect::Applied) => self.money.withdrawals += op.amount,
                (Kind::Deposit, Effect::Undetermined) => {
                    self.money.undetermined_deposits += op.amount;
                }
                (Kind::Withdraw, Effect::Undetermined) => {
                    self.money.undetermined_withdrawals += op.amount;
                }
                _ => {}
            }
        }
    }

    /// Every definite answer to one key during the run is the first one,
    /// replayed.
    fn answers_agree(&mut self, op: &Operation) {
        let mut answers = op.answers();
        let Some(first) = answers.next() else {
            return;
        };
        for later in answers {
            if later.replayed && later.same_answer(first) {
                continue;
            }
            self.anomalies.push(Anomaly {
                kind: AnomalyKind::ConflictingAnswers,
                at: later.received,
                op: Some(op.id),
                user: Some(op.user.clone()),
                key: op.key.clone(),
                expected: format!("a replay of {}", answer(first)),
                found: answer(later),
                message: format!(
                    "two answers to key {} during the run differ: {} then {}",
                    op.key.as_deref().unwrap_or(""),
                    answer(first),
                    answer(later)
                ),
            });
        }
    }

    /// (c) A write answered during the run is answered the same at settle,
    /// as a replay: the bank still has it.
    fn acknowledged_held(
        &mut self,
        op: &Operation,
        during: Outcome,
        settle: Option<&Settle>,
        settled: Option<&Attempt>,
    ) {
        let Some(first) = op.answers().next() else {
            return;
        };
        let Some(again) = settled else {
            let what = if during == Outcome::Ok {
                "was acknowledged, but its settle got no definite answer: that the bank kept it cannot be verified"
            } else {
                "was refused, but its settle got no definite answer: that the refusal held cannot be verified"
            };
            self.unsettled(op, settle, what);
            return;
        };
        if again.replayed && again.same_answer(first) {
            return;
        }
        let key = op.key.as_deref().unwrap_or("");
        let (kind, message) = match (during, again.replayed) {
            (Outcome::Ok, false) => (
                AnomalyKind::LostWrite,
                format!(
                    "op {} ({}) was acknowledged at {} ({}), but at settle the bank did not know key {key} and answered anew ({}): the acknowledged write was lost",
                    op.id,
                    op.describe(),
                    seconds(first.received),
                    answer(first),
                    answer(again)
                ),
            ),
            (_, false) => (
                AnomalyKind::ConflictingAnswers,
                format!(
                    "op {} ({}) was refused at {} ({}), but at settle the bank did not know key {key} and answered anew ({})",
                    op.id,
                    op.describe(),
                    seconds(first.received),
                    answer(first),
                    answer(again)
                ),
            ),
            (_, true) => (
                AnomalyKind::ConflictingAnswers,
                format!(
                    "op {} ({}) was answered {} during the run, but the settle replayed {}",
                    op.id,
                    op.describe(),
                    answer(first),
                    answer(again)
                ),
            ),
        };
        self.anomalies.push(Anomaly {
            kind,
            at: again.received,
            op: Some(op.id),
            user: Some(op.user.clone()),
            key: op.key.clone(),
            expected: format!("a replay of {}", answer(first)),
            found: if again.replayed {
                format!("a replay of {}", answer(again))
            } else {
                format!("a fresh answer, {}", answer(again))
            },
            message,
        });
    }

    fn unsettled(&mut self, op: &Operation, settle: Option<&Settle>, what: &str) {
        self.anomalies.push(Anomaly {
            kind: AnomalyKind::Unsettled,
            at: settle.map_or(op.complete, |s| s.complete),
            op: Some(op.id),
            user: Some(op.user.clone()),
            key: op.key.clone(),
            expected: "a definite answer at settle".into(),
            found: match settle {
                None => "no settle".into(),
                Some(s) if s.attempts.is_empty() => "no settle attempt (its time ran out)".into(),
                Some(s) => format!("{} attempts without a definite answer", s.attempts.len()),
            },
            message: format!("op {} ({}) {what}", op.id, op.describe()),
        });
    }

    /// (a), (b), (d): final balances against the starting balances and the
    /// operations that applied.
    fn balances(&mut self, start: &'h Start, state: &'h FinalState) {
        let at = state.at;
        if !state.drained {
            let cells: Vec<String> = state
                .in_flight
                .iter()
                .map(|(cell, n)| format!("{cell} {n}"))
                .collect();
            self.anomalies.push(Anomaly {
                kind: AnomalyKind::NotDrained,
                at,
                op: None,
                user: None,
                key: None,
                expected: "inFlight 0 in every cell before the final read".into(),
                found: if cells.is_empty() {
                    "no cell's totals could be read".into()
                } else {
                    format!("in flight: {}", cells.join(", "))
                },
                message: "cross-cell credits may not all have landed when the final balances were read; balance anomalies below may be credits in flight".into(),
            });
        }
        let users: BTreeSet<&str> = start
            .balances
            .keys()
            .chain(state.balances.keys())
            .map(String::as_str)
            .chain(self.parts.keys().copied())
            .collect();
        self.counts.users = users.len() as u64;
        self.money.start = start.balances.values().sum();
        self.money.final_total = state.balances.values().sum();
        for user in users {
            let before = start.balances.get(user).copied();
            let after = state.balances.get(user).copied();
            if let Some(after) = after.filter(|b| *b < 0) {
                self.anomalies.push(Anomaly {
                    kind: AnomalyKind::NegativeBalance,
                    at,
                    op: None,
                    user: Some(user.to_owned()),
                    key: None,
                    expected: "a balance of 0 or more".into(),
                    found: format!("balance {after}"),
                    message: format!("user {user}'s final balance is {after}"),
                });
            }
            let (Some(before), Some(after)) = (before, after) else {
                let missing = if before.is_none() {
                    "starting"
                } else {
                    "final"
                };
                self.incomplete(
                    at,
                    None,
                    Some(user),
                    format!("user {user} has no {missing} balance in the history"),
                );
                continue;
            };
            self.user_balance(user, before, after, at);
        }
        let m = &mut self.money;
        m.expected = m.start + m.deposits - m.withdrawals;
        m.conserved = m.final_total >= m.expected - m.undetermined_withdrawals
            && m.final_total <= m.expected + m.undetermined_deposits;
        if !m.conserved {
            let difference = m.final_total - m.expected;
            let message = format!(
                "the users' total is {} but should be {} (start {} + deposits {} - withdrawals {} that applied): {} {} {}",
                thousands(m.final_total),
                thousands(m.expected),
                thousands(m.start),
                thousands(m.deposits),
                thousands(m.withdrawals),
                thousands(difference.abs()),
                if difference > 0 {
                    "created"
                } else {
                    "destroyed"
                },
                if m.undetermined_deposits + m.undetermined_withdrawals > 0 {
                    "(beyond what undetermined writes could explain)"
                } else {
                    ""
                }
            );
            self.anomalies.push(Anomaly {
                kind: AnomalyKind::NotConserved,
                at,
                op: None,
                user: None,
                key: None,
                expected: format!("total {}", thousands(m.expected)),
                found: format!("total {}", thousands(m.final_total)),
                message: message.trim_end().to_owned(),
            });
        }
    }

    /// (d) One user's final balance is its start plus the effects of the
    /// operations that applied; a difference that one operation explains is
    /// named after it.
    fn user_balance(&mut self, user: &str, before: i64, after: i64, at: u64) {
        let parts = self.parts.get(user).cloned().unwrap_or_default();
        let applied: i64 = parts
            .iter()
            .filter(|p| p.effect == Effect::Applied)
            .map(|p| p.delta)
            .sum();
        let low: i64 = parts
            .iter()
            .filter(|p| p.effect == Effect::Undetermined)
            .map(|p| p.delta.min(0))
            .sum();
        let high: i64 = parts
            .iter()
            .filter(|p| p.effect == Effect::Undetermined)
            .map(|p| p.delta.max(0))
            .sum();
        let expected = before + applied;
        if after >= expected + low && after <= expected + high {
            return;
        }
        self.counts.users_mismatched += 1;
        let difference = after - expected;
        let exact = low == 0 && high == 0;
        let first = |effect: Effect, delta: i64| {
            parts
                .iter()
                .find(|p| p.effect == effect && p.delta == delta)
                .copied()
        };
        let explanation = if exact {
            first(Effect::Applied, -difference)
                .map(|p| (AnomalyKind::LostWrite, p))
                .or_else(|| {
                    first(Effect::Applied, difference).map(|p| (AnomalyKind::AppliedTwice, p))
                })
                .or_else(|| {
                    first(Effect::NotApplied, difference)
                        .map(|p| (AnomalyKind::AppliedButRefused, p))
                })
        } else {
            None
        };
        let ops = ledger(&parts);
        let range = if exact {
            thousands(expected)
        } else {
            format!(
                "{} to {}",
                thousands(expected + low),
                thousands(expected + high)
            )
        };
        let (kind, op, message) = match explanation {
            Some((kind, part)) => {
                let what = match kind {
                    AnomalyKind::LostWrite => "its effect is missing: the write was lost",
                    AnomalyKind::AppliedTwice => "its effect is there twice: it was applied twice",
                    _ => "it was answered as not applied, yet its effect is there",
                };
                (
                    kind,
                    Some(part.op),
                    format!(
                        "user {user}'s final balance is {} where start {} plus the operations that applied give {range}; the difference, {:+}, is op {} ({}): {what}. The user's operations: {ops}",
                        thousands(after),
                        thousands(before),
                        difference,
                        part.op.id,
                        part.op.describe()
                    ),
                )
            }
            None => (
                AnomalyKind::BalanceMismatch,
                None,
                format!(
                    "user {user}'s final balance is {} where start {} plus the operations that applied give {range}; no single operation explains the difference ({:+}). The user's operations: {ops}",
                    thousands(after),
                    thousands(before),
                    difference
                ),
            ),
        };
        self.anomalies.push(Anomaly {
            kind,
            at,
            op: op.map(|op| op.id),
            user: Some(user.to_owned()),
            key: op.and_then(|op| op.key.clone()),
            expected: format!("balance {range}"),
            found: format!("balance {}", thousands(after)),
            message,
        });
    }

    fn finish(mut self) -> Report {
        if self.history.start.is_none() || self.history.final_state.is_none() {
            self.money.expected = self.money.start + self.money.deposits - self.money.withdrawals;
        }
        self.anomalies.sort_by(|a, b| {
            (a.at, a.kind, a.op, &a.user, &a.key, &a.message)
                .cmp(&(b.at, b.kind, b.op, &b.user, &b.key, &b.message))
        });
        let first = self.anomalies.first().map(|a| self.paragraph(a));
        Report {
            clean: self.anomalies.is_empty(),
            counts: self.counts,
            money: self.money,
            anomalies: self.anomalies,
            first,
        }
    }

    /// The first anomaly, readable on its own.
    fn paragraph(&self, anomaly: &Anomaly) -> String {
        let mut text = format!(
            "{} at {}: {}",
            anomaly.kind,
            seconds(anomaly.at),
            anomaly.message
        );
        if !text.ends_with('.') {
            text.push('.');
        }
        text.push_str(&format!(
            " Expected {}; found {}.",
            anomaly.expected, anomaly.found
        ));
        if let Some(op) = anomaly.op.and_then(|id| self.ops.get(&id)) {
            text.push_str(&format!(
                " Op {} is a {} by worker {}, key {}, invoked at {}, completed at {}, {} during the run.",
                op.id,
                op.describe(),
                op.worker,
                op.key.as_deref().unwrap_or("none"),
                seconds(op.invoke),
                seconds(op.complete),
                op.answers()
                    .next()
                    .map_or(Outcome::Unknown, Attempt::outcome)
                    .name()
            ));
            let attempts: Vec<String> = op
                .attempts
                .iter()
                .enumerate()
                .map(|(i, a)| format!("#{} {}", i + 1, attempt(a)))
                .collect();
            text.push_str(&format!(" Attempts: {}.", attempts.join("; ")));
            match self.settles.get(&op.id) {
                Some(settle) if !settle.attempts.is_empty() => {
                    let attempts: Vec<String> = settle.attempts.iter().map(attempt).collect();
                    text.push_str(&format!(" Settle: {}.", attempts.join("; ")));
                }
                Some(_) => text.push_str(" Settle: its time ran out before it was sent."),
                None if op.is_write() => text.push_str(" Settle: none recorded."),
                None => {}
            }
        }
        text
    }
}

/// "200, balance 57" or "409 insufficientFunds, balance 3".
fn answer(attempt: &Attempt) -> String {
    let mut text = attempt
        .status
        .map_or_else(|| "no answer".to_owned(), |s| s.to_string());
    if let Some(error) = &attempt.error {
        text.push(' ');
        text.push_str(error);
    }
    if let Some(balance) = attempt.balance {
        text.push_str(&format!(", balance {balance}"));
    }
    text
}

/// One attempt, for the paragraph.
fn attempt(attempt: &Attempt) -> String {
    let took = attempt.received.saturating_sub(attempt.sent) / 1_000;
    let mut text = format!("sent {} via {}: ", seconds(attempt.sent), attempt.gateway);
    match attempt.status {
        Some(_) => {
            text.push_str(&answer(attempt));
            if attempt.replayed {
                text.push_str(", replayed");
            }
            if let Some(cell) = &attempt.cell {
                text.push_str(&format!(", from {cell}"));
            }
        }
        None => text.push_str(&format!(
            "no answer ({})",
            attempt.transport.as_deref().unwrap_or("transport")
        )),
    }
    text.push_str(&format!(" in {took} ms"));
    text
}

/// A user's operations: "op 4 deposit +10 applied, op 9 withdraw -5 refused, ...".
fn ledger(parts: &[Part<'_>]) -> String {
    const SHOWN: usize = 30;
    let mut items: Vec<String> = parts
        .iter()
        .take(SHOWN)
        .map(|p| {
            format!(
                "op {} {} {:+} {}",
                p.op.id,
                p.op.kind.name(),
                p.delta,
                match p.effect {
                    Effect::Applied => "applied",
                    Effect::NotApplied => "not applied",
                    Effect::Undetermined => "undetermined",
                }
            )
        })
        .collect();
    if parts.len() > SHOWN {
        items.push(format!("and {} more", parts.len() - SHOWN));
    }
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}
