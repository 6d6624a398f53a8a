//! The cases every backend must pass.

use std::time::Duration;

use atoll_model::{Kind, Resource, ResourceKey, decode_resource};
use atoll_store::{Action, Change, CommitRequest, Store, StoreError};
use futures::StreamExt;
use serde_json::json;

use crate::Backend;

fn zone(name: &str, region: &str) -> Resource {
    decode_resource(json!({
        "apiVersion": "atoll/v1", "kind": "Zone",
        "metadata": {"name": name}, "spec": {"region": region}
    }))
    .expect("valid zone")
}

fn region(name: &str) -> Resource {
    decode_resource(json!({"apiVersion": "atoll/v1", "kind": "Region", "metadata": {"name": name}}))
        .expect("valid region")
}

fn request(changes: Vec<Change>) -> CommitRequest {
    CommitRequest {
        changes,
        base_revision: None,
        author: "alice".into(),
        message: Some("test".into()),
        fence: None,
    }
}

fn key(kind: Kind, name: &str) -> ResourceKey {
    ResourceKey::new(kind, name)
}

fn region_of(resource: &Resource) -> String {
    match &resource.spec {
        atoll_model::Spec::Zone(z) => z.region.clone(),
        other => panic!("not a zone: {other:?}"),
    }
}

pub(crate) async fn an_empty_store(backend: &impl Backend) {
    let store = backend.open().await;
    assert_eq!(store.revision().await.expect("revision"), 0);
    let snapshot = store.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.revision, 0);
    assert!(snapshot.resources.is_empty());
    assert_eq!(store.get(&key(Kind::Zone, "x")).await.expect("get"), None);
    assert!(
        store
            .history(&key(Kind::Zone, "x"))
            .await
            .expect("history")
            .is_empty()
    );
    assert!(store.commits(0, 10).await.expect("commits").is_empty());
}

pub(crate) async fn creates_and_reads_back(backend: &impl Backend) {
    let store = backend.open().await;
    let commit = store
        .commit(request(vec![
            Change::put(region("hz")),
            Change::put(zone("hz-a", "hz")),
        ]))
        .await
        .expect("commit");
    assert_eq!(commit.revision, 1);
    assert_eq!(commit.author, "alice");
    assert_eq!(commit.changes.len(), 2);
    assert!(commit.changes.iter().all(|c| c.action == Action::Created));
    assert!(
        commit.changes[1].diff.contains("+  region: hz"),
        "{}",
        commit.changes[1].diff
    );

    let stored = store
        .get(&key(Kind::Zone, "hz-a"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(stored.metadata.resource_version, Some(1));
    assert_eq!(stored.without_version(), zone("hz-a", "hz"));

    let snapshot = store.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.revision, 1);
    let keys: Vec<String> = snapshot
        .resources
        .iter()
        .map(|r| r.key().to_string())
        .collect();
    assert_eq!(
        keys,
        ["Region/hz", "Zone/hz-a"],
        "sorted in dependency order"
    );
}

pub(crate) async fn resource_versions_guard_writes(backend: &impl Backend) {
    let store = backend.open().await;
    store
        .commit(request(vec![Change::put(zone("z", "hz"))]))
        .await
        .expect("create");
    // Must-not-exist on an existing resource.
    let err = store
        .commit(request(vec![Change::put(zone("z", "sh")).expecting(0)]))
        .await
        .expect_err("exists");
    assert!(
        matches!(&err, StoreError::Conflict(c) if c[0].actual == Some(1)),
        "{err}"
    );
    assert!(err.to_string().contains("Zone/z already exists"), "{err}");
    // Right version succeeds, then the old version is stale.
    let commit = store
        .commit(request(vec![Change::put(zone("z", "sh")).expecting(1)]))
        .await
        .expect("update at version 1");
    assert_eq!(commit.changes[0].action, Action::Updated);
    assert_eq!(commit.changes[0].previous_revision, Some(1));
    let err = store
        .commit(request(vec![Change::put(zone("z", "sz")).expecting(1)]))
        .await
        .expect_err("stale");
    assert!(
        err.to_string().contains("is at resourceVersion 2, not 1"),
        "{err}"
    );
    let stored = store
        .get(&key(Kind::Zone, "z"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        region_of(&stored),
        "sh",
        "the refused write changed nothing"
    );
    // Deleting with a stale version is refused too.
    let err = store
        .commit(request(vec![
            Change::delete(key(Kind::Zone, "z")).expecting(1),
        ]))
        .await
        .expect_err("stale delete");
    assert!(matches!(err, StoreError::Conflict(_)));
    assert_eq!(store.revision().await.expect("revision"), 2);
}

pub(crate) async fn concurrent_conflicting_writes_have_one_winner(backend: &impl Backend) {
    let store = backend.open().await;
    store
        .commit(request(vec![Change::put(zone("z", "r0"))]))
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .commit(request(vec![
                    Change::put(zone("z", &format!("r{}", i + 1))).expecting(1),
                ]))
                .await
        }));
    }
    let mut winners = Vec::new();
    let mut conflicts = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("task") {
            Ok(commit) => winners.push((i, commit.revision)),
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins: {winners:?}");
    assert_eq!(conflicts, 7);
    assert_eq!(winners[0].1, 2);
    let stored = store
        .get(&key(Kind::Zone, "z"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        region_of(&stored),
        format!("r{}", winners[0].0 + 1),
        "the winner's write is stored"
    );
    assert_eq!(
        store
            .history(&key(Kind::Zone, "z"))
            .await
            .expect("history")
            .len(),
        2
    );
}

pub(crate) async fn concurrent_blind_writes_are_serialized(backend: &impl Backend) {
    let store = backend.open().await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .commit(request(vec![Change::put(zone(&format!("z{i}"), "hz"))]))
                .await
        }));
    }
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.push(task.await.expect("task").expect("commit").revision);
    }
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (1..=10).collect::<Vec<_>>(),
        "each commit gets its own revision"
    );
    assert_eq!(
        store.snapshot().await.expect("snapshot").resources.len(),
        10
    );
}

pub(crate) async fn a_failing_batch_changes_nothing(backend: &impl Backend) {
    let store = backend.open().await;
    store
        .commit(request(vec![Change::put(zone("old", "hz"))]))
        .await
        .expect("create");
    // The second change conflicts: the first must not be applied either.
    let err = store
        .commit(request(vec![
            Change::put(zone("new", "hz")),
            Change::put(zone("old", "sh")).expecting(7),
        ]))
        .await
        .expect_err("conflict");
    assert!(matches!(err, StoreError::Conflict(_)));
    // A delete of a missing resource fails the whole batch too.
    let err = store
        .commit(request(vec![
            Change::put(zone("new", "hz")),
            Change::delete(key(Kind::Zone, "missing")),
        ]))
        .await
        .expect_err("not found");
    assert!(
        matches!(&err, StoreError::NotFound(k) if k.name == "missing"),
        "{err}"
    );
    assert_eq!(store.revision().await.expect("revision"), 1);
    assert_eq!(store.get(&key(Kind::Zone, "new")).await.expect("get"), None);
    let old = store
        .get(&key(Kind::Zone, "old"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(region_of(&old), "hz");
    assert_eq!(
        store.commits(0, 100).await.expect("commits").len(),
        1,
        "no audit record for failures"
    );
}

pub(crate) async fn a_stale_base_revision_is_refused(backend: &impl Backend) {
    let store = backend.open().await;
    store
        .commit(request(vec![Change::put(zone("a", "hz"))]))
        .await
        .expect("create");
    let mut stale = request(vec![Change::put(zone("b", "hz"))]);
    stale.base_revision = Some(0);
    let err = store.commit(stale).await.expect_err("stale base");
    assert!(
        matches!(
            err,
            StoreError::StaleBase {
                expected: 0,
                actual: 1
            }
        ),
        "{err}"
    );
    let mut current = request(vec![Change::put(zone("b", "hz"))]);
    current.base_revision = Some(1);
    assert_eq!(
        store.commit(current).await.expect("current base").revision,
        2
    );
}

pub(crate) async fn history_and_rollback(backend: &impl Backend) {
    let store = backend.open().await;
    let k = key(Kind::Zone, "z");
    store
        .commit(request(vec![Change::put(zone("z", "hz"))]))
        .await
        .expect("create");
    let mut by_bob = request(vec![Change::put(zone("z", "sh"))]);
    by_bob.author = "bob".into();
    store.commit(by_bob).await.expect("update");
    store
        .commit(request(vec![Change::delete(k.clone())]))
        .await
        .expect("delete");

    let history = store.history(&k).await.expect("history");
    let actions: Vec<Action> = history.iter().map(|h| h.action).collect();
    assert_eq!(actions, [Action::Created, Action::Updated, Action::Deleted]);
    assert_eq!(
        history.iter().map(|h| h.revision).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(history[1].author, "bob");
    assert!(
        history[1].diff.contains("-  region: hz\n+  region: sh"),
        "{}",
        history[1].diff
    );
    assert!(history[2].resource.is_none());

    // Roll back to revision 1: its content comes back as a new revision.
    let old = history[0].resource.clone().expect("content at revision 1");
    let commit = store
        .commit(request(vec![Change::put(old).expecting(0)]))
        .await
        .expect("rollback");
    assert_eq!(commit.revision, 4);
    assert_eq!(commit.changes[0].action, Action::Created);
    let stored = store.get(&k).await.expect("get").expect("restored");
    assert_eq!(region_of(&stored), "hz");
    assert_eq!(stored.metadata.resource_version, Some(4));
    assert_eq!(store.history(&k).await.expect("history").len(), 4);
    // Another resource's history is its own, even when its name extends this one.
    store
        .commit(request(vec![Change::put(zone("zz", "hz"))]))
        .await
        .expect("create zz");
    assert_eq!(store.history(&k).await.expect("history").len(), 4);
    assert_eq!(
        store
            .history(&key(Kind::Zone, "zz"))
            .await
            .expect("history")
            .len(),
        1
    );
}

pub(crate) async fn the_audit_log_pages(backend: &impl Backend) {
    let store = backend.open().await;
    for i in 0..5 {
        let mut r = request(vec![Change::put(zone(&format!("z{i}"), "hz"))]);
        r.message = Some(format!("change {i}"));
        store.commit(r).await.expect("commit");
    }
    let first = store.commits(0, 2).await.expect("commits");
    assert_eq!(first.iter().map(|c| c.revision).collect::<Vec<_>>(), [1, 2]);
    let rest = store.commits(2, 100).await.expect("commits");
    assert_eq!(
        rest.iter().map(|c| c.revision).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!(rest[0].message.as_deref(), Some("change 2"));
    assert_eq!(rest[0].author, "alice");
    assert_eq!(rest[0].changes[0].key, key(Kind::Zone, "z2"));
    let age = time::OffsetDateTime::now_utc() - rest[0].time;
    assert!(
        age < time::Duration::minutes(1),
        "commit time is now, not {}",
        rest[0].time
    );
}

type CommitStream = futures::stream::BoxStream<'static, Result<atoll_store::Commit, StoreError>>;

async fn next(watch: &mut CommitStream) -> atoll_store::Commit {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a commit within 10 s")
        .expect("stream open")
        .expect("no error")
}

pub(crate) async fn watch_replays_then_follows(backend: &impl Backend) {
    let store = backend.open().await;
    for i in 0..3 {
        store
            .commit(request(vec![Change::put(zone(&format!("z{i}"), "hz"))]))
            .await
            .expect("commit");
    }
    let mut watch = store.watch(1).await.expect("watch");
    assert_eq!(next(&mut watch).await.revision, 2);
    assert_eq!(next(&mut watch).await.revision, 3);
    let writer = store.clone();
    let handle = tokio::spawn(async move {
        for i in 3..6 {
            writer
                .commit(request(vec![Change::put(zone(&format!("z{i}"), "hz"))]))
                .await
                .expect("commit");
        }
    });
    for expected in 4..=6 {
        let commit = next(&mut watch).await;
        assert_eq!(commit.revision, expected);
        assert_eq!(commit.changes[0].key.name, format!("z{}", expected - 1));
    }
    handle.await.expect("writer");
    // Nothing more: the stream waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), watch.next())
            .await
            .is_err()
    );
}

pub(crate) async fn state_survives_reopening(backend: &impl Backend) {
    {
        let store = backend.open().await;
        store
            .commit(request(vec![
                Change::put(region("hz")),
                Change::put(zone("hz-a", "hz")),
            ]))
            .await
            .expect("commit");
        store
            .commit(request(vec![Change::put(zone("hz-a", "sh"))]))
            .await
            .expect("update");
    }
    let store = backend.open().await;
    assert_eq!(store.revision().await.expect("revision"), 2);
    assert_eq!(store.snapshot().await.expect("snapshot").resources.len(), 2);
    assert_eq!(
        store
            .history(&key(Kind::Zone, "hz-a"))
            .await
            .expect("history")
            .len(),
        2
    );
    assert_eq!(store.commits(0, 10).await.expect("commits").len(), 2);
    let commit = store
        .commit(request(vec![Change::put(zone("hz-b", "hz"))]))
        .await
        .expect("commit");
    assert_eq!(commit.revision, 3, "revisions continue after reopening");
}

pub(crate) async fn malformed_commits_are_refused(backend: &impl Backend) {
    let store = backend.open().await;
    let err = store.commit(request(vec![])).await.expect_err("empty");
    assert!(matches!(err, StoreError::Invalid(_)));
    let err = store
        .commit(request(vec![
            Change::put(zone("z", "a")),
            Change::put(zone("z", "b")),
        ]))
        .await
        .expect_err("twice");
    assert!(err.to_string().contains("Zone/z appears twice"), "{err}");
    assert_eq!(store.revision().await.expect("revision"), 0);
}

fn cell(name: &str, workspace: Option<&str>, zone: &str) -> Resource {
    let mut metadata = json!({"name": name});
    if let Some(workspace) = workspace {
        metadata["workspace"] = json!(workspace);
    }
    decode_resource(json!({
        "apiVersion": "atoll/v1", "kind": "Cell",
        "metadata": metadata, "spec": {"zone": zone, "type": "rzone"}
    }))
    .expect("valid cell")
}

/// Two workspaces hold resources of the same kind and name apart: each
/// has its own content, history and delete, and a key written before
/// workspaces (no `workspace`) reads as the default one's.
pub(crate) async fn workspaces_keep_the_same_name_apart(backend: &impl Backend) {
    let store = backend.open().await;
    store
        .commit(request(vec![
            Change::put(cell("rz01", None, "hz-a")),
            Change::put(cell("rz01", Some("payments"), "hz-b")),
        ]))
        .await
        .expect("both");
    let default = ResourceKey::new(Kind::Cell, "rz01");
    let payments = ResourceKey::in_workspace(Kind::Cell, "payments", "rz01");
    let zone_of = |r: Resource| match r.spec {
        atoll_model::Spec::Cell(c) => c.zone,
        other => panic!("not a cell: {other:?}"),
    };
    assert_eq!(
        zone_of(store.get(&default).await.expect("get").expect("exists")),
        "hz-a"
    );
    assert_eq!(
        zone_of(store.get(&payments).await.expect("get").expect("exists")),
        "hz-b"
    );
    store
        .commit(request(vec![Change::put(cell(
            "rz01",
            Some("payments"),
            "sh-a",
        ))]))
        .await
        .expect("change one");
    assert_eq!(store.history(&default).await.expect("history").len(), 1);
    assert_eq!(store.history(&payments).await.expect("history").len(), 2);
    store
        .commit(request(vec![Change::delete(payments.clone())]))
        .await
        .expect("delete one");
    assert!(store.get(&payments).await.expect("get").is_none());
    assert!(store.get(&default).await.expect("get").is_some());
    let snapshot = store.snapshot().await.expect("snapshot");
    let keys: Vec<String> = snapshot
        .resources
        .iter()
        .map(|r| r.key().to_string())
        .collect();
    assert_eq!(keys, ["Cell/rz01"]);
    let commits = store.commits(0, 10).await.expect("commits");
    let deleted = &commits.last().expect("the delete").changes[0];
    assert_eq!(deleted.key, payments, "the audit log names the workspace");
    let old: ResourceKey =
        serde_json::from_value(json!({"kind": "Cell", "name": "rz01"})).expect("old key");
    assert_eq!(old, default);
}
