//! Synthetic histories, made by a model bank that can be told to misbehave.

use std::collections::BTreeMap;

use crate::{
    AnomalyKind, Attempt, Event, FORMAT_VERSION, FinalState, History, Kind, Operation, Outcome,
    Settle, Start, check,
};

/// A model of the bank with idempotency keys, recording a history as
/// `atoll load --history` does.
struct Sim {
    history: History,
    balances: BTreeMap<String, i64>,
    /// Key to the stored answer.
    records: BTreeMap<String, Attempt>,
    clock: u64,
    next: u64,
}

impl Sim {
    fn new(start: &[(&str, i64)]) -> Sim {
        let balances: BTreeMap<String, i64> =
            start.iter().map(|(u, b)| ((*u).to_owned(), *b)).collect();
        let mut history = History::default();
        history.push(Event::Start(Start {
            version: FORMAT_VERSION,
            run: "test".into(),
            started_at_unix_ms: 1_700_000_000_000,
            gateways: vec!["http://gw".into()],
            balances: balances.clone(),
        }));
        Sim {
            history,
            balances,
            records: BTreeMap::new(),
            clock: 0,
            next: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1_000;
        self.clock
    }

    fn answer(&mut self, status: u16, error: Option<&str>, balance: i64) -> Attempt {
        let sent = self.tick();
        Attempt {
            sent,
            received: sent + 500,
            gateway: "http://gw".into(),
            status: Some(status),
            error: error.map(str::to_owned),
            transport: None,
            replayed: false,
            balance: Some(balance),
            cell: Some("rz01".into()),
        }
    }

    fn timeout(&mut self) -> Attempt {
        let sent = self.tick();
        Attempt {
            sent,
            received: sent + 10_000,
            gateway: "http://gw".into(),
            transport: Some("timeout".into()),
            ..Attempt::default()
        }
    }

    /// The bank handling a write: a replay if the key is known, else
    /// applied (or refused for funds) and remembered.
    fn handle(
        &mut self,
        kind: Kind,
        user: &str,
        to: Option<&str>,
        amount: i64,
        key: &str,
    ) -> Attempt {
        if let Some(stored) = self.records.get(key).cloned() {
            let mut again = self.answer(0, None, 0);
            again.status = stored.status;
            again.error = stored.error.clone();
            again.balance = stored.balance;
            again.replayed = true;
            return again;
        }
        let balance = self.balances.get(user).copied().unwrap_or(0);
        let answer = match kind {
            Kind::Deposit => {
                self.balances.insert(user.to_owned(), balance + amount);
                self.answer(200, None, balance + amount)
            }
            Kind::Withdraw | Kind::Transfer if balance < amount => {
                self.answer(409, Some("insufficientFunds"), balance)
            }
            Kind::Withdraw => {
                self.balances.insert(user.to_owned(), balance - amount);
                self.answer(200, None, balance - amount)
            }
            Kind::Transfer => {
                self.balances.insert(user.to_owned(), balance - amount);
                let payee = to.unwrap_or_default().to_owned();
                *self.balances.entry(payee).or_default() += amount;
                self.answer(200, None, balance - amount)
            }
            Kind::Read => unreachable!("reads are not writes"),
        };
        self.records.insert(key.to_owned(), answer.clone());
        answer
    }

    fn record(
        &mut self,
        kind: Kind,
        user: &str,
        to: Option<&str>,
        amount: i64,
        attempts: Vec<Attempt>,
    ) -> u64 {
        self.next += 1;
        let id = self.next;
        let outcome = attempts.last().map_or(Outcome::Unknown, Attempt::outcome);
        self.history.push(Event::Op(Operation {
            id,
            worker: id % 2,
            kind,
            user: user.to_owned(),
            to: to.map(str::to_owned),
            amount,
            key: (kind != Kind::Read).then(|| format!("k{id}")),
            invoke: attempts.first().map_or(self.clock, |a| a.sent),
            complete: attempts.last().map_or(self.clock, |a| a.received),
            attempts,
            outcome,
        }));
        id
    }

    /// A write answered at once.
    fn write(&mut self, kind: Kind, user: &str, to: Option<&str>, amount: i64) -> u64 {
        let key = format!("k{}", self.next + 1);
        let answer = self.handle(kind, user, to, amount, &key);
        self.record(kind, user, to, amount, vec![answer])
    }

    /// A write whose answers were all lost; the bank applied it or not.
    fn write_unanswered(
        &mut self,
        kind: Kind,
        user: &str,
        to: Option<&str>,
        amount: i64,
        applied: bool,
    ) -> u64 {
        let key = format!("k{}", self.next + 1);
        if applied {
            self.handle(kind, user, to, amount, &key);
        }
        let attempts = vec![self.timeout(), self.timeout()];
        self.record(kind, user, to, amount, attempts)
    }

    /// A write that timed out once, then got a (replayed) answer.
    fn write_retried(&mut self, kind: Kind, user: &str, to: Option<&str>, amount: i64) -> u64 {
        let key = format!("k{}", self.next + 1);
        self.handle(kind, user, to, amount, &key);
        let lost = self.timeout();
        let again = self.handle(kind, user, to, amount, &key);
        self.record(kind, user, to, amount, vec![lost, again])
    }

    fn read(&mut self, user: &str) -> u64 {
        let balance = self.balances.get(user).copied().unwrap_or(0);
        let answer = self.answer(200, None, balance);
        self.record(Kind::Read, user, None, 0, vec![answer])
    }

    /// Re-sends every write with its key, then reads the final balances.
    fn settle_and_finish(mut self) -> History {
        let writes: Vec<Operation> = self
            .history
            .operations
            .iter()
            .filter(|op| op.is_write())
            .cloned()
            .collect();
        for op in writes {
            let key = op.key.clone().unwrap_or_default();
            let answer = self.handle(op.kind, &op.user, op.to.as_deref(), op.amount, &key);
            self.history.push(Event::Settle(Settle {
                id: op.id,
                key,
                invoke: answer.sent,
                complete: answer.received,
                outcome: answer.outcome(),
                attempts: vec![answer],
            }));
        }
        let at = self.tick();
        self.history.push(Event::Final(FinalState {
            at,
            balances: self.balances.clone(),
            in_flight: BTreeMap::from([("rz01".to_owned(), 0)]),
            drained: true,
        }));
        self.history
    }
}

/// A clean mixed workload: deposits, withdrawals (some refused), transfers,
/// reads, retried writes, and writes without an answer that had applied or
/// had not.
fn clean_sim() -> Sim {
    let mut sim = Sim::new(&[("1001", 100), ("1002", 0), ("1070", 5)]);
    sim.write(Kind::Deposit, "1001", None, 50);
    sim.read("1001");
    sim.write(Kind::Withdraw, "1002", None, 10); // refused: balance 0
    sim.write(Kind::Transfer, "1001", Some("1070"), 30);
    sim.write_retried(Kind::Deposit, "1002", None, 7);
    sim.write_unanswered(Kind::Deposit, "1070", None, 11, true);
    sim.write_unanswered(Kind::Withdraw, "1001", None, 13, false);
    sim.write(Kind::Withdraw, "1070", None, 40);
    sim.read("1070");
    sim
}

#[test]
fn a_clean_history_passes() {
    let history = clean_sim().settle_and_finish();
    let report = check(&history);
    assert!(report.is_clean(), "{report}");
    assert!(report.clean);
    assert!(report.first.is_none());
    let c = &report.counts;
    assert_eq!(c.operations, 9);
    assert_eq!((c.acknowledged, c.refused, c.unknown), (4, 1, 2));
    assert_eq!(
        (
            c.unknown_applied,
            c.unknown_not_applied,
            c.unknown_unresolved
        ),
        (1, 1, 0)
    );
    assert_eq!((c.settled, c.settle_replayed, c.settle_fresh), (7, 6, 1));
    assert_eq!(c.by_kind["read"].ok, 2);
    assert_eq!(c.by_kind["withdraw"].refused, 1);
    assert_eq!(c.users, 3);
    // 105 at start; deposits 50 + 7 + 11 and the withdrawal of 13 that the
    // settle applied, withdrawals 40 + 13.
    assert_eq!(report.money.start, 105);
    assert_eq!(report.money.deposits, 68);
    assert_eq!(report.money.withdrawals, 53);
    assert_eq!(report.money.final_total, 120);
    assert!(report.money.conserved);
    let text = report.to_string();
    assert!(text.starts_with("atoll check: clean"), "{text}");
    assert!(
        text.contains("1 had applied, 1 had not (1 applied by the settle)"),
        "{text}"
    );
}

#[test]
fn a_lost_acknowledged_write_is_named_first() {
    let mut sim = clean_sim();
    let lost = sim.write(Kind::Deposit, "1002", None, 25);
    // The bank forgets the deposit entirely (say, a failover to a standby
    // that never had it): its balance and its key are gone.
    *sim.balances.entry("1002".into()).or_default() -= 25;
    sim.records.remove(&format!("k{lost}"));
    sim.read("1002");
    let report = check(&sim.settle_and_finish());
    assert!(!report.is_clean());
    let first = &report.anomalies[0];
    assert_eq!(first.kind, AnomalyKind::LostWrite, "{report}");
    assert_eq!(first.op, Some(lost));
    assert_eq!(first.user.as_deref(), Some("1002"));
    assert_eq!(first.key.as_deref(), Some(format!("k{lost}").as_str()));
    let paragraph = report.first.as_deref().unwrap_or_default();
    assert!(paragraph.starts_with("lostWrite at "), "{paragraph}");
    assert!(
        paragraph.contains(&format!(
            "op {lost} (deposit of 25 to user 1002) was acknowledged"
        )),
        "{paragraph}"
    );
    assert!(
        paragraph.contains("the acknowledged write was lost"),
        "{paragraph}"
    );
    assert!(paragraph.contains("Attempts: #1 sent"), "{paragraph}");
    assert!(paragraph.contains("Settle: sent"), "{paragraph}");
    // The settle applied it anew, so the balance holds it once: the only
    // evidence is the settle's fresh answer.
    assert_eq!(report.anomalies.len(), 1, "{report}");
    println!("{report}");
}

#[test]
fn an_acknowledged_write_missing_from_the_balance_is_lost() {
    let mut sim = clean_sim();
    let lost = sim.write(Kind::Withdraw, "1001", None, 20);
    // The key survives but the balance change does not.
    *sim.balances.entry("1001".into()).or_default() += 20;
    let report = check(&sim.settle_and_finish());
    let first = &report.anomalies[0];
    assert_eq!(first.kind, AnomalyKind::LostWrite, "{report}");
    assert_eq!(first.op, Some(lost));
    assert!(
        first.message.contains("its effect is missing"),
        "{}",
        first.message
    );
    assert_eq!(
        report.anomalies[1].kind,
        AnomalyKind::NotConserved,
        "{report}"
    );
}

#[test]
fn a_double_applied_deposit_is_named_first() {
    let mut sim = clean_sim();
    let twice = sim.write(Kind::Deposit, "1070", None, 9);
    *sim.balances.entry("1070".into()).or_default() += 9;
    sim.write(Kind::Deposit, "1001", None, 1);
    let report = check(&sim.settle_and_finish());
    let first = &report.anomalies[0];
    assert_eq!(first.kind, AnomalyKind::AppliedTwice, "{report}");
    assert_eq!(first.op, Some(twice));
    assert_eq!(first.user.as_deref(), Some("1070"));
    // 5 + 30 (transfer) + 11 - 40 + 9.
    assert_eq!(first.expected, "balance 15");
    assert_eq!(first.found, "balance 24");
    println!("{report}");
    let paragraph = report.first.as_deref().unwrap_or_default();
    assert!(paragraph.contains("it was applied twice"), "{paragraph}");
    assert!(
        paragraph.contains(&format!("op {twice} deposit +9 applied")),
        "{paragraph}"
    );
    // Money was created too.
    assert!(
        report
            .anomalies
            .iter()
            .any(|a| a.kind == AnomalyKind::NotConserved)
    );
    assert!(!report.money.conserved);
}

#[test]
fn a_key_the_bank_forgot_but_applied_again_is_lost_and_applied_twice() {
    let mut sim = clean_sim();
    let op = sim.write(Kind::Deposit, "1002", None, 4);
    // The balance survives, the record does not: the settle applies again.
    sim.records.remove(&format!("k{op}"));
    let report = check(&sim.settle_and_finish());
    let kinds: Vec<AnomalyKind> = report.anomalies.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            AnomalyKind::LostWrite,
            AnomalyKind::AppliedTwice,
            AnomalyKind::NotConserved
        ],
        "{report}"
    );
}

#[test]
fn a_negative_balance_is_named_first() {
    let mut sim = clean_sim();
    // An overdraft the bank should have refused.
    let key = format!("k{}", sim.next + 1);
    let balance = sim.balances["1002"];
    sim.balances.insert("1002".into(), balance - 500);
    let answer = sim.answer(200, None, balance - 500);
    sim.records.insert(key, answer.clone());
    let overdraft = sim.record(Kind::Withdraw, "1002", None, 500, vec![answer]);
    let report = check(&sim.settle_and_finish());
    let first = &report.anomalies[0];
    assert_eq!(first.kind, AnomalyKind::NegativeBalance, "{report}");
    assert_eq!(first.op, Some(overdraft));
    assert_eq!(first.found, format!("balance {}", balance - 500));
    // The final balance is negative too, and money is conserved: the
    // overdraft is the only thing wrong.
    assert!(report.money.conserved);
    assert!(
        report
            .anomalies
            .iter()
            .all(|a| a.kind == AnomalyKind::NegativeBalance),
        "{report}"
    );
}

#[test]
fn non_conservation_is_named_first() {
    let mut sim = clean_sim();
    // Money from nowhere, matching no operation.
    *sim.balances.entry("1001".into()).or_default() += 1_000;
    let report = check(&sim.settle_and_finish());
    let first = &report.anomalies[0];
    assert_eq!(first.kind, AnomalyKind::NotConserved, "{report}");
    assert_eq!(first.expected, "total 120");
    assert_eq!(first.found, "total 1,120");
    assert!(first.message.contains("1,000 created"), "{}", first.message);
    assert_eq!(report.anomalies[1].kind, AnomalyKind::BalanceMismatch);
    assert_eq!(report.anomalies[1].user.as_deref(), Some("1001"));
    assert!(report.to_string().contains("NOT CONSERVED"));
}

#[test]
fn a_refused_write_that_applied_is_named() {
    let mut sim = clean_sim();
    let key = format!("k{}", sim.next + 1);
    let refused = sim.handle(Kind::Withdraw, "1002", None, 1_000, &key);
    assert_eq!(refused.status, Some(409));
    let op = sim.record(Kind::Withdraw, "1002", None, 1_000, vec![refused]);
    // The money goes anyway; say, to a user outside the run.
    *sim.balances.entry("1002".into()).or_default() -= 1_000;
    *sim.balances.entry("1001".into()).or_default() += 1_000;
    let report = check(&sim.settle_and_finish());
    let named: Vec<_> = report
        .anomalies
        .iter()
        .filter(|a| a.kind == AnomalyKind::AppliedButRefused)
        .collect();
    assert_eq!(named.len(), 1, "{report}");
    assert_eq!(named[0].op, Some(op));
}

#[test]
fn different_answers_to_one_key_conflict() {
    let mut sim = clean_sim();
    let op = sim.write(Kind::Deposit, "1001", None, 3);
    // The stored answer changes under the key.
    if let Some(stored) = sim.records.get_mut(&format!("k{op}")) {
        stored.balance = Some(1);
    }
    let report = check(&sim.settle_and_finish());
    assert_eq!(report.anomalies.len(), 1, "{report}");
    assert_eq!(report.anomalies[0].kind, AnomalyKind::ConflictingAnswers);
    assert_eq!(report.anomalies[0].op, Some(op));
}

#[test]
fn a_write_nobody_can_resolve_makes_the_check_inconclusive_but_bounded() {
    let mut sim = clean_sim();
    let op = sim.write_unanswered(Kind::Deposit, "1002", None, 6, true);
    let mut history = sim.settle_and_finish();
    // Its settle got no answer either.
    for settle in &mut history.settles {
        if settle.id == op {
            settle.attempts = vec![Attempt {
                sent: settle.invoke,
                received: settle.complete,
                gateway: "http://gw".into(),
                transport: Some("timeout".into()),
                ..Attempt::default()
            }];
            settle.outcome = Outcome::Unknown;
        }
    }
    let report = check(&history);
    assert_eq!(report.anomalies.len(), 1, "{report}");
    assert_eq!(report.anomalies[0].kind, AnomalyKind::Unsettled);
    assert_eq!(report.counts.unknown_unresolved, 1);
    // Either way the balances are explained: 1002 may or may not hold 6.
    assert!(report.money.conserved);
    assert_eq!(report.money.undetermined_deposits, 6);
}

#[test]
fn credits_in_flight_are_named_before_what_they_explain() {
    let mut sim = clean_sim();
    sim.write(Kind::Transfer, "1001", Some("1002"), 5);
    let mut history = sim.settle_and_finish();
    if let Some(state) = &mut history.final_state {
        state.drained = false;
        state.in_flight.insert("rz01".into(), 5);
        *state.balances.entry("1002".into()).or_default() -= 5;
    }
    let report = check(&history);
    assert_eq!(
        report.anomalies[0].kind,
        AnomalyKind::NotDrained,
        "{report}"
    );
    assert_eq!(report.anomalies[0].found, "in flight: rz01 5");
}

#[test]
fn a_cut_off_history_is_incomplete() {
    let mut history = clean_sim().history;
    history.final_state = None;
    let report = check(&history);
    assert_eq!(report.anomalies.len(), 1 + 7, "{report}");
    assert_eq!(report.anomalies[0].kind, AnomalyKind::Unsettled);
    assert!(
        report
            .anomalies
            .iter()
            .any(|a| a.kind == AnomalyKind::Incomplete && a.message.contains("no final event"))
    );
}

#[test]
fn the_history_round_trips_through_json_lines() {
    let history = clean_sim().settle_and_finish();
    let mut bytes = Vec::new();
    history.write_jsonl(&mut bytes).expect("write");
    let text = String::from_utf8(bytes.clone()).expect("utf-8");
    assert_eq!(text.lines().count(), 1 + 9 + 7 + 1);
    assert!(
        text.starts_with("{\"event\":\"start\",\"version\":1,"),
        "{text}"
    );
    assert!(text.lines().all(|l| l.starts_with("{\"event\":")));
    let again = History::read_jsonl(bytes.as_slice(), "h.jsonl").expect("read");
    assert_eq!(again, history);
}

#[test]
fn a_bad_line_is_named_with_its_number() {
    let text =
        "{\"event\":\"final\",\"at\":1,\"balances\":{},\"drained\":true}\n\n{\"event\":\"op\"}\n";
    let error = History::read_jsonl(text.as_bytes(), "h.jsonl").expect_err("bad line");
    assert!(
        error
            .to_string()
            .starts_with("h.jsonl:3: not a history event"),
        "{error}"
    );
}

#[test]
fn the_check_is_deterministic_whatever_the_event_order() {
    let mut sim = clean_sim();
    let twice = sim.write(Kind::Deposit, "1070", None, 9);
    *sim.balances.entry("1070".into()).or_default() += 9;
    *sim.balances.entry("1001".into()).or_default() += 1_000;
    let history = sim.settle_and_finish();
    let report = check(&history);
    assert_eq!(report.anomalies[0].op, Some(twice));
    let mut shuffled = history.clone();
    shuffled.operations.reverse();
    shuffled.settles.reverse();
    let again = check(&shuffled);
    assert_eq!(again, report);
    assert_eq!(again.to_string(), report.to_string());
    assert_eq!(
        serde_json::to_string(&again).expect("json"),
        serde_json::to_string(&report).expect("json")
    );
}
