use super::*;

fn chain(n: u64) -> Vec<AuditEntry> {
    let mut entries: Vec<AuditEntry> = Vec::new();
    for i in 1..=n {
        let entry = AuditEntry {
            v: 0,
            seq: 0,
            prev: String::new(),
            time: format!("2026-12-04T10:00:{i:02}Z"),
            replica: "https://127.0.0.1:7400".to_owned(),
            caller: if i % 2 == 0 { "olga" } else { "ivan" }.to_owned(),
            credential: "token 0123456789abcdef".to_owned(),
            remote: Some("127.0.0.1:50000".to_owned()),
            method: "POST".to_owned(),
            path: "/v1/apply".to_owned(),
            status: 200,
            outcome: "ok".to_owned(),
            detail: format!("revision {i}"),
            hash: String::new(),
        };
        let head = entries.last().map(AuditEntry::head);
        entries.push(entry.seal(head.as_ref()));
    }
    entries
}

fn verify(
    entries: &[AuditEntry],
    head: Option<&AuditHead>,
    anchor: Option<Anchor>,
) -> Result<u64, Problem> {
    let mut verifier = Verifier::new(anchor);
    for entry in entries {
        verifier.push(entry.clone())?;
    }
    verifier.finish(head)?;
    Ok(verifier.checked())
}

fn head(entries: &[AuditEntry]) -> AuditHead {
    entries.last().map(AuditEntry::head).expect("a last entry")
}

#[test]
fn an_untouched_chain_verifies() {
    let entries = chain(10);
    assert_eq!(verify(&entries, Some(&head(&entries)), None), Ok(10));
    assert_eq!(verify(&[], None, None), Ok(0));
    assert_eq!(entries[0].prev, GENESIS);
    assert_eq!(entries[3].prev, entries[2].hash);
}

#[test]
fn an_edited_entry_is_named() {
    let mut entries = chain(10);
    let head = head(&entries);
    entries[4].caller = "mallory".to_owned();
    let problem = verify(&entries, Some(&head), None).expect_err("edited");
    assert_eq!((problem.seq, problem.kind), (5, ProblemKind::Edited));
    assert!(problem.message.contains("entry 5 was edited"), "{problem}");
}

#[test]
fn an_edited_entry_with_its_hash_recomputed_is_named_by_the_next() {
    let mut entries = chain(10);
    let head = head(&entries);
    entries[4].outcome = "forbidden".to_owned();
    entries[4].hash = entries[4].content_hash();
    let problem = verify(&entries, Some(&head), None).expect_err("edited");
    assert_eq!((problem.seq, problem.kind), (5, ProblemKind::Edited));
    assert!(
        problem
            .message
            .contains("entry 5 was changed after entry 6 was written"),
        "{problem}"
    );
}

#[test]
fn the_last_entry_edited_is_caught_by_the_head() {
    let mut entries = chain(4);
    let head = head(&entries);
    entries[3].detail = "nothing".to_owned();
    entries[3].hash = entries[3].content_hash();
    let problem = verify(&entries, Some(&head), None).expect_err("edited");
    assert_eq!((problem.seq, problem.kind), (4, ProblemKind::Edited));
}

#[test]
fn a_removed_entry_is_named() {
    let mut entries = chain(10);
    let head = head(&entries);
    entries.remove(6);
    let problem = verify(&entries, Some(&head), None).expect_err("removed");
    assert_eq!((problem.seq, problem.kind), (7, ProblemKind::Removed));
    assert!(
        problem
            .message
            .contains("entry 7 was removed: entry 6 is followed by entry 8"),
        "{problem}"
    );
    let mut entries = chain(10);
    entries.drain(0..3);
    let problem = verify(&entries, Some(&head), None).expect_err("removed");
    assert_eq!((problem.seq, problem.kind), (1, ProblemKind::Removed));
    assert!(problem.message.contains("starts at entry 4"), "{problem}");
}

#[test]
fn removed_entries_at_the_end_are_caught_by_the_head() {
    let mut entries = chain(10);
    let head = head(&entries);
    entries.truncate(8);
    let problem = verify(&entries, Some(&head), None).expect_err("removed");
    assert_eq!((problem.seq, problem.kind), (9, ProblemKind::Removed));
    assert!(
        problem.message.contains("entries 9 to 10 were removed"),
        "{problem}"
    );
}

#[test]
fn a_cut_chain_with_a_rewritten_head_is_caught_by_an_anchor() {
    let mut entries = chain(10);
    let anchor = Anchor {
        seq: 9,
        hash: entries[8].hash.clone(),
    };
    entries.truncate(8);
    // The head rewritten to match: the chain alone looks whole...
    let rewritten = head(&entries);
    assert_eq!(verify(&entries, Some(&rewritten), None), Ok(8));
    // ...but not against what the auditor wrote down.
    let problem = verify(&entries, Some(&rewritten), Some(anchor)).expect_err("cut");
    assert_eq!((problem.seq, problem.kind), (9, ProblemKind::Removed));
    // And a chain rewritten from the anchor on.
    let entries = chain(10);
    let other = Anchor {
        seq: 3,
        hash: "ab".repeat(32),
    };
    let problem = verify(&entries, Some(&head(&entries)), Some(other)).expect_err("rewritten");
    assert_eq!((problem.seq, problem.kind), (3, ProblemKind::Edited));
}

#[test]
fn swapped_entries_are_named_as_moved() {
    let mut entries = chain(10);
    let head = head(&entries);
    entries.swap(4, 5);
    let problem = verify(&entries, Some(&head), None).expect_err("reordered");
    assert_eq!((problem.seq, problem.kind), (5, ProblemKind::Reordered));
    assert!(problem.message.contains("entry 5 was moved"), "{problem}");
    // Moved far: still named.
    let mut entries = chain(10);
    let moved = entries.remove(2);
    entries.push(moved);
    let problem = verify(&entries, Some(&head), None).expect_err("reordered");
    assert_eq!((problem.seq, problem.kind), (3, ProblemKind::Reordered));
}

#[test]
fn anchors_parse_and_print() {
    let anchor: Anchor = format!("12:{}", "a".repeat(64)).parse().expect("an anchor");
    assert_eq!(anchor.seq, 12);
    assert_eq!(anchor.to_string(), format!("12:{}", "a".repeat(64)));
    assert!("12".parse::<Anchor>().is_err());
    assert!("x:aa".parse::<Anchor>().is_err());
    assert!(format!("3:{}", "G".repeat(64)).parse::<Anchor>().is_err());
}

#[test]
fn the_hash_covers_every_field() {
    let entries = chain(1);
    let base = entries[0].clone();
    type Edit = Box<dyn Fn(&mut AuditEntry)>;
    let edits: Vec<Edit> = vec![
        Box::new(|e| e.seq += 1),
        Box::new(|e| e.prev = "1".repeat(64)),
        Box::new(|e| e.time.push('x')),
        Box::new(|e| e.replica.push('x')),
        Box::new(|e| e.caller.push('x')),
        Box::new(|e| e.credential.push('x')),
        Box::new(|e| e.remote = None),
        Box::new(|e| e.method.push('x')),
        Box::new(|e| e.path.push('x')),
        Box::new(|e| e.status += 1),
        Box::new(|e| e.outcome.push('x')),
        Box::new(|e| e.detail.push('x')),
        Box::new(|e| e.v += 1),
    ];
    for (i, edit) in edits.iter().enumerate() {
        let mut edited = base.clone();
        edit(&mut edited);
        assert_ne!(edited.content_hash(), base.hash, "field {i} is not hashed");
    }
}
